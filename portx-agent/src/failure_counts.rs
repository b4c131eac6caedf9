//! The agent's side of the kernel's failure counts (portx-ebpf `failure_counts.rs`): how many
//! failures each counted record stands for, and those the `FAILURE_COUNTS` map holds that no
//! record brought (a key's failures after its last record).
//!
//! Per key the agent keeps the count it has accounted. A record, or a reading of the map, with a
//! higher count accounts the difference; the kernel only ever adds, so whichever of the two sees
//! a failure first accounts it and the other finds nothing left. An entry made again after the
//! agent deleted it is told apart by its `born_ns`. The agent deletes the entries of processes
//! that are gone, after reading them: nothing can add to those any more. Once the map is half
//! full it also deletes live processes' keys that had no record for [`IDLE_KEY_NS`] (see
//! [`FailureCounts::read`]), so that one long-lived process failing towards many destinations
//! does not fill it for good.
use portx_common::{FailureCount, FailureKey, MAX_FAILURE_KEYS};

use crate::{decoder::Task, tracker::Map};

/// A live process' key with no record for this long is deleted once the map is half full.
pub const IDLE_KEY_NS: u64 = 10_000_000_000;

struct Accounted {
    born_ns: u64,
    count: u64,
    /// The task of the key's latest record and the port its socket was bound to: who a
    /// reading's failures are shown as.
    latest: Option<(Task, u16)>,
    /// Deleted from the map after the last reading: forgotten at the next one.
    deleted: bool,
}

/// Failures a reading of the map found for one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unaccounted {
    pub key: FailureKey,
    pub failures: u64,
    /// The task of the key's latest record, if the agent read one.
    pub task: Option<Task>,
    /// The port that record's socket was bound to (0: none, or no record read).
    pub bound_port: u16,
}

/// What one reading of the map found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reading {
    pub unaccounted: Vec<Unaccounted>,
    /// Entries of processes that are gone, accounted: to delete from the map (and then to pass
    /// to [`FailureCounts::deleted`]).
    pub delete: Vec<FailureKey>,
}

#[derive(Default)]
pub struct FailureCounts {
    keys: Map<FailureKey, Accounted>,
}

impl FailureCounts {
    pub fn new() -> Self {
        Self::default()
    }

    /// A counted record of `key` by `task` (its socket bound to `bound_port`, 0 for none),
    /// whose entry (made at `born_ns`) had counted `count` failures: how many of them were not
    /// accounted yet (0 when a reading of the map found them first).
    pub fn on_record(
        &mut self,
        key: FailureKey,
        count: u64,
        born_ns: u64,
        task: Task,
        bound_port: u16,
    ) -> u64 {
        let fresh = Accounted {
            born_ns,
            count,
            latest: Some((task, bound_port)),
            deleted: false,
        };
        let Some(a) = self.keys.get_mut(&key) else {
            self.keys.insert(key, fresh);
            return count;
        };
        if born_ns > a.born_ns {
            // The entry was made again after the agent deleted it (the process id reused).
            *a = fresh;
            return count;
        }
        if born_ns < a.born_ns {
            // An entry the agent deleted after reading it: accounted then.
            return 0;
        }
        a.latest = Some((task, bound_port));
        let new = count.saturating_sub(a.count);
        a.count = a.count.max(count);
        new
    }

    /// One reading of the map, made after the rings were drained at `now_ns`
    /// (`CLOCK_MONOTONIC`, as the kernel's times): the failures of each entry that neither its
    /// records nor earlier readings accounted. Entries that did not change since the last
    /// reading are listed for deletion if `gone(tgid)` (the process no longer exists; asked
    /// only for those: a process still failing is alive), or, with the map at least half full,
    /// if their key had no record for [`IDLE_KEY_NS`].
    ///
    /// Deleting a live key races with its next failures between this reading and the
    /// deletion: the caller looks each entry up again right before deleting it and keeps it if
    /// its count moved ([`FailureCounts::accounted`]), which leaves the microseconds between
    /// that lookup and the deletion.
    pub fn read(
        &mut self,
        entries: Vec<(FailureKey, FailureCount)>,
        gone: impl Fn(u32) -> bool,
        now_ns: u64,
    ) -> Reading {
        let crowded = entries.len() >= MAX_FAILURE_KEYS as usize / 2;
        let idle =
            |e: &FailureCount| crowded && now_ns.saturating_sub(e.last_record_ns) >= IDLE_KEY_NS;
        let mut reading = Reading::default();
        // Deleted after the last reading and not made again since: forgotten.
        self.keys.retain(|_, a| !a.deleted);
        for (key, entry) in entries {
            let a = self.keys.entry(key).or_insert(Accounted {
                born_ns: entry.born_ns,
                count: 0,
                latest: None,
                deleted: false,
            });
            if entry.born_ns > a.born_ns {
                *a = Accounted {
                    born_ns: entry.born_ns,
                    count: 0,
                    latest: None,
                    deleted: false,
                };
            } else if entry.born_ns < a.born_ns {
                // Cannot be: the map holds one entry per key, and a later one was read.
                continue;
            }
            let new = entry.count.saturating_sub(a.count);
            if new > 0 {
                a.count = entry.count;
                reading.unaccounted.push(Unaccounted {
                    key,
                    failures: new,
                    task: a.latest.map(|(task, _)| task),
                    bound_port: a.latest.map_or(0, |(_, port)| port),
                });
            } else if idle(&entry) || gone(key.tgid) {
                reading.delete.push(key);
            }
        }
        reading
    }

    /// `key`'s entry was deleted from the map: its count is forgotten at the next reading (a
    /// record of it read before then still finds it). An entry that could not be deleted stays
    /// followed, or the next reading would count it again.
    pub fn deleted(&mut self, key: &FailureKey) {
        if let Some(a) = self.keys.get_mut(key) {
            a.deleted = true;
        }
    }

    /// The count of `key`'s entry as accounted so far (records and readings), and when the
    /// entry was made; None for a key not followed.
    pub fn accounted(&self, key: &FailureKey) -> Option<(u64, u64)> {
        self.keys.get(key).map(|a| (a.count, a.born_ns))
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
    use crate::decoder::Comm;

    fn key(tgid: u32) -> FailureKey {
        FailureKey {
            tgid,
            netns: 1,
            ret: -99,
            family: portx_common::AF_INET,
            dport: 443,
            daddr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            bound: 0,
            cpu: 0,
        }
    }

    fn task(pid: u32, tid: u32) -> Task {
        Task {
            pid,
            tid,
            comm: Comm::new("client"),
        }
    }

    fn entry(count: u64, born_ns: u64) -> FailureCount {
        FailureCount {
            count,
            last_record_ns: 0,
            born_ns,
            clock_read_jiffy: 0,
        }
    }

    #[test]
    fn with_the_map_half_full_idle_keys_of_live_processes_are_deleted() {
        let now = 100 * IDLE_KEY_NS;
        let quiet = now - IDLE_KEY_NS;
        let recent = now - IDLE_KEY_NS + 1;
        let keys = |n: u32, last_record_ns: u64| {
            (1..=n).map(move |tgid| {
                let mut e = entry(1, 100);
                e.last_record_ns = last_record_ns;
                (key(tgid), e)
            })
        };
        let half = MAX_FAILURE_KEYS / 2;
        // First reading: every count is new, nothing is deleted.
        let mut c = FailureCounts::new();
        let all: Vec<_> = keys(half, quiet).collect();
        assert_eq!(c.read(all.clone(), |_| false, now).delete.len(), 0);
        // Unchanged, half full, quiet for IDLE_KEY_NS: all deleted though alive.
        assert_eq!(c.read(all, |_| false, now).delete.len(), half as usize);
        // One key fewer (not crowded), or records more recent: kept.
        let mut c = FailureCounts::new();
        let fewer: Vec<_> = keys(half - 1, quiet).collect();
        c.read(fewer.clone(), |_| false, now);
        assert_eq!(c.read(fewer, |_| false, now), Reading::default());
        let mut c = FailureCounts::new();
        let busy: Vec<_> = keys(half, recent).collect();
        c.read(busy.clone(), |_| false, now);
        assert_eq!(c.read(busy, |_| false, now), Reading::default());
    }

    #[test]
    fn records_and_readings_account_each_failure_once_in_any_order() {
        let mut c = FailureCounts::new();
        let k = key(7);
        // The first failure's record, then nine held back, then a record from another thread
        // (a preempted one, on the same CPU) carrying the count as it read it after its add.
        assert_eq!(c.on_record(k, 1, 100, task(7, 7), 0), 1);
        assert_eq!(c.on_record(k, 10, 100, task(7, 8), 0), 9);
        // A reading finds 5 more no record brought; the record carrying 13 comes after it
        // (written before the reading, read after): nothing left for it.
        let r = c.read(vec![(k, entry(15, 100))], |_| false, 0);
        assert_eq!(
            r.unaccounted,
            vec![Unaccounted {
                key: k,
                failures: 5,
                task: Some(task(7, 8)),
                bound_port: 0,
            }]
        );
        assert_eq!(c.on_record(k, 13, 100, task(7, 7), 0), 0);
        assert_eq!(c.on_record(k, 16, 100, task(7, 7), 0), 1);
        // Nothing new: a reading finds nothing.
        assert_eq!(
            c.read(vec![(k, entry(16, 100))], |_| false, 0),
            Reading::default()
        );
    }

    #[test]
    fn each_cpus_entry_of_a_destination_is_accounted_apart() {
        // Two threads failing towards one destination on CPUs 0 and 1: the kernel counts them in
        // two entries, each from 1. Taken for one key, the second CPU's first record would be
        // "already accounted" and its failures lost.
        let mut c = FailureCounts::new();
        let (on0, on1) = (key(7), FailureKey { cpu: 1, ..key(7) });
        assert_eq!(c.on_record(on0, 1, 100, task(7, 7), 0), 1);
        assert_eq!(c.on_record(on1, 1, 105, task(7, 8), 0), 1);
        let r = c.read(
            vec![(on0, entry(5, 100)), (on1, entry(3, 105))],
            |_| false,
            0,
        );
        let mut found: Vec<(u16, u64)> = r
            .unaccounted
            .iter()
            .map(|u| (u.key.cpu, u.failures))
            .collect();
        found.sort();
        assert_eq!(found, vec![(0, 4), (1, 2)]);
    }

    #[test]
    fn a_bound_keys_reading_shows_its_latest_records_port() {
        let mut c = FailureCounts::new();
        let k = FailureKey { bound: 1, ..key(7) };
        c.on_record(k, 1, 100, task(7, 7), 30000);
        c.on_record(k, 2, 100, task(7, 7), 30001);
        let r = c.read(vec![(k, entry(5, 100))], |_| false, 0);
        assert_eq!(
            (r.unaccounted[0].failures, r.unaccounted[0].bound_port),
            (3, 30001)
        );
    }

    #[test]
    fn a_key_seen_only_in_the_map_is_accounted_in_full() {
        // Its first record was lost (ring full) or not read yet.
        let mut c = FailureCounts::new();
        let r = c.read(vec![(key(7), entry(42, 100))], |_| false, 0);
        assert_eq!(r.unaccounted[0].failures, 42);
        assert_eq!(r.unaccounted[0].task, None);
        assert_eq!(c.on_record(key(7), 40, 100, task(7, 7), 0), 0);
    }

    #[test]
    fn a_gone_process_is_deleted_once_read_and_a_new_entry_counts_from_its_start() {
        let mut c = FailureCounts::new();
        let k = key(7);
        c.on_record(k, 1, 100, task(7, 7), 0);
        // Still changing: not asked whether it is gone.
        let r = c.read(vec![(k, entry(3, 100))], |_| panic!("asked"), 0);
        assert_eq!(r.unaccounted[0].failures, 2);
        assert!(r.delete.is_empty());
        // Unchanged and gone: deleted, its failures accounted by now.
        let r = c.read(vec![(k, entry(3, 100))], |pid| pid == 7, 0);
        assert!(r.unaccounted.is_empty());
        assert_eq!(r.delete, vec![k]);
        // Not deleted after all (the map refused): still followed, nothing counted twice.
        let r = c.read(vec![(k, entry(3, 100))], |pid| pid == 7, 0);
        assert!(r.unaccounted.is_empty());
        assert_eq!(r.delete, vec![k]);
        c.deleted(&k);
        // A late record of the deleted entry accounts nothing again.
        assert_eq!(c.on_record(k, 3, 100, task(7, 7), 0), 0);
        // The id reused: a new entry for the same key, made later, counts from 1.
        assert_eq!(c.on_record(k, 1, 500, task(7, 7), 0), 1);
        let r = c.read(vec![(k, entry(4, 500))], |_| false, 0);
        assert_eq!(r.unaccounted[0].failures, 3);
        // A deleted key the map no longer has is forgotten at the next reading.
        let other = key(8);
        c.on_record(other, 2, 100, task(8, 8), 0);
        assert_eq!(
            c.read(vec![(other, entry(2, 100))], |_| true, 0).delete,
            vec![other]
        );
        c.deleted(&other);
        c.read(vec![], |_| true, 0);
        assert_eq!(c.len(), 1, "key 7 was read again, key 8 forgotten");
    }
}
