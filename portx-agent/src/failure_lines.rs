//! How many `connect_failed`/`bind_failed` lines a failure storm gets: at most one a second per
//! process, destination (or local address), errno and whether the socket was bound, each line
//! saying how many failures it stands for. A retry loop failing 300k times a second would
//! otherwise print 300k lines a second (and the agent would spend most of a core formatting
//! them). Nothing is dropped: a failure without a line of its own is counted into its key's next
//! line, which comes with the next failure due or, for a key that went quiet, at the next flush
//! (about a second later, and at exit); the `failures` of a key's lines add up to its failures.
//! Failures the kernel only counted (see `failure_counts`) arrive as a record standing for
//! several, or as a number found in its map, and are counted the same way.
use std::{net::IpAddr, time::Duration};

use crate::{decoder::SyscallFailure, tracker::Map};

/// Keys followed at once; a failure of a new key past it gets its own line (`failures` 1).
pub const MAX_KEYS: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    connect: bool,
    pid: u32,
    netns: u32,
    addr: IpAddr,
    port: u16,
    errno: i32,
    protocol: Option<u16>,
    /// Whether the socket was bound (as the kernel's key: not which port).
    bound: bool,
}

impl Key {
    fn of(f: &SyscallFailure, connect: bool) -> Self {
        Key {
            connect,
            pid: f.task.pid,
            netns: f.netns,
            addr: f.addr,
            port: f.port,
            errno: f.errno,
            protocol: f.protocol,
            bound: f.bound_port != 0,
        }
    }
}

struct Last {
    /// When the key's last line was due (monotonic ns).
    at_ns: u64,
    /// Failures since that line, none of which had one.
    unshown: u64,
    /// The latest of them: the line a flush writes for them.
    latest: SyscallFailure,
}

/// A line to write: this failure, standing for `failures` failures (itself and those before it
/// that had none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Line {
    pub failure: SyscallFailure,
    pub connect: bool,
    pub failures: u64,
}

pub struct FailureLines {
    every_ns: u64,
    keys: Map<Key, Last>,
}

impl FailureLines {
    /// At most one line per key each `every`; `Duration::ZERO`: a line for every failure.
    pub fn new(every: Duration) -> Self {
        Self {
            every_ns: u64::try_from(every.as_nanos()).unwrap_or(u64::MAX),
            keys: Map::default(),
        }
    }

    /// A failure record at `f.ts_ns` standing for `failures` failures (itself and those the
    /// kernel only counted before it; 0 when a reading of the kernel's counts found them first):
    /// Some(line) if it gets a line now (the key's first, or its last line is `every` old), else
    /// None and they are counted into the key's next line.
    pub fn on_failure(&mut self, f: &SyscallFailure, connect: bool, failures: u64) -> Option<Line> {
        if self.every_ns == 0 {
            return (failures > 0).then_some(Line {
                failure: *f,
                connect,
                failures,
            });
        }
        let key = Key::of(f, connect);
        let Some(last) = self.keys.get_mut(&key) else {
            if self.keys.len() < MAX_KEYS {
                self.keys.insert(
                    key,
                    Last {
                        at_ns: f.ts_ns,
                        unshown: 0,
                        latest: *f,
                    },
                );
            }
            return (failures > 0).then_some(Line {
                failure: *f,
                connect,
                failures,
            });
        };
        last.latest = *f;
        if f.ts_ns.saturating_sub(last.at_ns) < self.every_ns || last.unshown + failures == 0 {
            last.unshown += failures;
            return None;
        }
        last.at_ns = f.ts_ns;
        Some(Line {
            failure: *f,
            connect,
            failures: std::mem::take(&mut last.unshown) + failures,
        })
    }

    /// `failures` failures found in the kernel's counts with no record of their own: counted
    /// into the key's next line, which stands for them with the key's latest record. A key
    /// without one (its record lost, or past `MAX_KEYS`) gets a line for them now, as `f`.
    pub fn on_unrecorded(
        &mut self,
        f: &SyscallFailure,
        connect: bool,
        failures: u64,
    ) -> Option<Line> {
        if failures == 0 {
            return None;
        }
        if self.every_ns != 0 {
            if let Some(last) = self.keys.get_mut(&Key::of(f, connect)) {
                last.unshown += failures;
                return None;
            }
        }
        Some(Line {
            failure: *f,
            connect,
            failures,
        })
    }

    /// Lines for the failures still without one whose key's last line is at least `every` old
    /// at `now_ns` — every such key when `all` (at exit) — oldest key first; keys with nothing
    /// left and no line for `every` are forgotten.
    pub fn flush(&mut self, now_ns: u64, all: bool) -> Vec<Line> {
        let every = self.every_ns;
        let mut lines = Vec::new();
        self.keys.retain(|key, last| {
            let quiet = now_ns.saturating_sub(last.at_ns) >= every;
            if last.unshown > 0 && (quiet || all) {
                lines.push(Line {
                    failure: last.latest,
                    connect: key.connect,
                    failures: std::mem::take(&mut last.unshown),
                });
                last.at_ns = now_ns;
                return true;
            }
            !(quiet && last.unshown == 0)
        });
        lines.sort_by_key(|l| l.failure.ts_ns);
        lines
    }

    /// Keys followed now.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoder::{Comm, Task};

    const SEC: u64 = 1_000_000_000;

    fn failure(pid: u32, port: u16, ts_ns: u64) -> SyscallFailure {
        SyscallFailure {
            ts_ns,
            task: Task {
                pid,
                tid: pid,
                comm: Comm::new("client"),
            },
            skaddr: 1,
            netns: 7,
            errno: libc::EADDRNOTAVAIL,
            addr: IpAddr::from([10, 0, 0, 1]),
            port,
            tally: Default::default(),
            protocol: Some(portx_common::IPPROTO_TCP),
            bound_port: 0,
        }
    }

    fn counts(lines: &[Line]) -> u64 {
        lines.iter().map(|l| l.failures).sum()
    }

    #[test]
    fn a_storm_gets_a_line_a_second_and_every_failure_is_counted_in_one() {
        let mut l = FailureLines::new(Duration::from_secs(1));
        let mut lines = Vec::new();
        // 10_000 failures over 2.5 s, one process, one destination.
        for i in 0..10_000u64 {
            let ts = SEC + i * 250_000;
            lines.extend(l.on_failure(&failure(100, 443, ts), true, 1));
        }
        assert_eq!(lines.len(), 3, "at 1 s, 2 s and 3 s: {lines:?}");
        assert_eq!(lines[0].failures, 1, "the first is shown at once");
        assert_eq!(lines[1].failures, 4000);
        // The rest has no line until the key is quiet for a second, or the agent exits.
        assert!(l.flush(SEC + 10_000 * 250_000, false).is_empty());
        let rest = l.flush(SEC + 10_000 * 250_000, true);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].failure.ts_ns, SEC + 9_999 * 250_000, "the latest");
        lines.extend(rest);
        assert_eq!(counts(&lines), 10_000);
        assert!(l.flush(10 * SEC, true).is_empty(), "nothing twice");
    }

    #[test]
    fn a_quiet_key_is_flushed_after_a_second_then_forgotten() {
        let mut l = FailureLines::new(Duration::from_secs(1));
        assert!(l.on_failure(&failure(100, 443, SEC), true, 1).is_some());
        assert!(l
            .on_failure(&failure(100, 443, SEC + 10), true, 1)
            .is_none());
        assert!(l
            .on_failure(&failure(100, 443, SEC + 20), true, 1)
            .is_none());
        assert!(l.flush(SEC + SEC / 2, false).is_empty(), "not a second yet");
        let lines = l.flush(2 * SEC, false);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].failures, 2);
        assert_eq!(lines[0].failure.ts_ns, SEC + 20);
        assert_eq!(l.len(), 1, "just flushed: kept");
        assert!(l.flush(3 * SEC, false).is_empty());
        assert!(l.is_empty(), "a second with nothing: forgotten");
        assert_eq!(
            l.on_failure(&failure(100, 443, 3 * SEC), true, 1)
                .map(|l| l.failures),
            Some(1)
        );
    }

    #[test]
    fn processes_destinations_errnos_and_calls_are_keyed_apart() {
        let mut l = FailureLines::new(Duration::from_secs(1));
        assert!(l.on_failure(&failure(100, 443, SEC), true, 1).is_some());
        assert!(l.on_failure(&failure(101, 443, SEC), true, 1).is_some());
        assert!(l.on_failure(&failure(100, 80, SEC), true, 1).is_some());
        assert!(l.on_failure(&failure(100, 443, SEC), false, 1).is_some());
        let mut refused = failure(100, 443, SEC);
        refused.errno = libc::ECONNREFUSED;
        assert!(l.on_failure(&refused, true, 1).is_some());
        assert!(l.on_failure(&failure(100, 443, SEC + 1), true, 1).is_none());
        // A bound socket's failures apart from the others, but not one key a port.
        let mut bound = failure(100, 443, SEC);
        bound.bound_port = 30000;
        assert!(l.on_failure(&bound, true, 1).is_some());
        bound.bound_port = 30001;
        assert!(l.on_failure(&bound, true, 1).is_none());
    }

    #[test]
    fn with_no_gap_every_failure_has_its_line() {
        let mut l = FailureLines::new(Duration::ZERO);
        for i in 0..100 {
            let line = l.on_failure(&failure(100, 443, SEC + i), true, 1);
            assert_eq!(line.map(|l| l.failures), Some(1));
        }
        assert!(l.flush(10 * SEC, true).is_empty());
    }

    #[test]
    fn past_the_key_limit_a_failure_gets_its_own_line() {
        let mut l = FailureLines::new(Duration::from_secs(1));
        for pid in 0..MAX_KEYS as u32 {
            assert!(l.on_failure(&failure(pid, 443, SEC), true, 1).is_some());
        }
        assert_eq!(l.len(), MAX_KEYS);
        let extra = failure(MAX_KEYS as u32, 443, SEC);
        assert!(l.on_failure(&extra, true, 1).is_some());
        assert!(
            l.on_failure(&extra, true, 1).is_some(),
            "not followed: shown"
        );
        assert_eq!(l.len(), MAX_KEYS);
    }

    #[test]
    fn failures_counted_in_the_kernel_add_up_in_the_lines() {
        let mut l = FailureLines::new(Duration::from_secs(1));
        let mut lines: Vec<Line> = l
            .on_failure(&failure(100, 443, SEC), true, 1)
            .into_iter()
            .collect();
        // Records standing for 500 failures each, ten a second, and what a reading found.
        for i in 1..=20u64 {
            lines.extend(l.on_failure(&failure(100, 443, SEC + i * SEC / 10), true, 500));
        }
        assert!(
            l.on_unrecorded(&failure(100, 443, 3 * SEC), true, 77)
                .is_none(),
            "into the next line"
        );
        // A record whose failures a reading accounted first is no line by itself.
        assert!(l
            .on_failure(&failure(100, 443, 3 * SEC + 1), true, 0)
            .is_none());
        lines.extend(l.flush(5 * SEC, true));
        assert_eq!(counts(&lines), 1 + 20 * 500 + 77);
        assert_eq!(lines.len(), 4, "at 1 s, 2 s, 3 s and the flush: {lines:?}");
        // Found in the map for a key with no record read: a line of its own, at once.
        let line = l
            .on_unrecorded(&failure(200, 443, 5 * SEC), true, 9)
            .expect("a line");
        assert_eq!(line.failures, 9);
        assert!(l
            .on_unrecorded(&failure(200, 443, 5 * SEC), true, 0)
            .is_none());
    }
}
