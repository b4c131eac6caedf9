//! Port settings of a network namespace. `/proc/sys/net/...` shows the netns of the *reading
//! thread*, so `read` reads the caller's own and `read_in` reads another through
//! [`crate::netns::run_in`].
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::netns;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSettings {
    /// `ip_local_port_range`, inclusive.
    pub range: (u16, u16),
    /// `ip_local_reserved_ports`, as inclusive ranges.
    pub reserved: Vec<(u16, u16)>,
    /// `tcp_tw_reuse`: 0 off, 1 on, 2 loopback only.
    pub tw_reuse: u8,
    /// `tcp_max_tw_buckets`.
    pub max_tw_buckets: Option<u64>,
    /// `tcp_timestamps` (0: off); None if it could not be read.
    pub timestamps: Option<u8>,
    /// `tcp_tw_reuse_delay` in ms (Linux 6.13 on); None where it does not exist.
    pub tw_reuse_delay_ms: Option<u32>,
}

#[derive(Debug, Error)]
pub enum SysctlError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot parse `{value}` from {what}")]
    Parse { what: &'static str, value: String },
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
}

const BASE: &str = "/proc/sys/net/ipv4";

fn read_file(name: &str) -> Result<String, SysctlError> {
    let path = Path::new(BASE).join(name);
    std::fs::read_to_string(&path).map_err(|source| SysctlError::Read { path, source })
}

fn bad(what: &'static str, value: &str) -> SysctlError {
    SysctlError::Parse {
        what,
        value: value.trim().to_string(),
    }
}

/// `"32768\t60999\n"` -> (32768, 60999).
pub fn parse_range(s: &str) -> Result<(u16, u16), SysctlError> {
    let mut it = s.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi)), None) if lo <= hi => Ok((lo, hi)),
        _ => Err(bad("ip_local_port_range", s)),
    }
}

/// `""` or `"8080,9000-9010\n"` -> inclusive ranges.
pub fn parse_reserved(s: &str) -> Result<Vec<(u16, u16)>, SysctlError> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|part| {
            let part = part.trim();
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
                (Ok(lo), Ok(hi)) if lo <= hi => Ok((lo, hi)),
                _ => Err(bad("ip_local_reserved_ports", part)),
            }
        })
        .collect()
}

impl PortSettings {
    /// Settings of the calling thread's netns.
    pub fn read() -> Result<Self, SysctlError> {
        let range = parse_range(&read_file("ip_local_port_range")?)?;
        let reserved = parse_reserved(&read_file("ip_local_reserved_ports")?)?;
        let reuse = read_file("tcp_tw_reuse")?;
        let tw_reuse = reuse
            .trim()
            .parse()
            .map_err(|_| bad("tcp_tw_reuse", &reuse))?;
        let number = |name| read_file(name).ok().and_then(|v| v.trim().parse().ok());
        Ok(Self {
            range,
            reserved,
            tw_reuse,
            max_tw_buckets: number("tcp_max_tw_buckets"),
            timestamps: number("tcp_timestamps").and_then(|v: u64| u8::try_from(v).ok()),
            tw_reuse_delay_ms: number("tcp_tw_reuse_delay").and_then(|v| u32::try_from(v).ok()),
        })
    }

    /// Settings of netns `id`, entered through `ns` (e.g. `/proc/<pid>/ns/net`).
    pub fn read_in(ns: &Path, id: netns::NetnsId) -> Result<Self, SysctlError> {
        netns::run_in(ns, id, Self::read)?
    }

    /// Ports `connect()` can pick automatically: the inclusive range minus reserved ports in it.
    pub fn usable(&self) -> u32 {
        let (lo, hi) = self.range;
        let total = u32::from(hi) - u32::from(lo) + 1;
        let mut reserved = vec![false; total as usize];
        for &(a, b) in &self.reserved {
            for p in a.max(lo)..=b.min(hi) {
                if let Some(slot) = reserved.get_mut(usize::from(p - lo)) {
                    *slot = true;
                }
            }
        }
        total - reserved.iter().filter(|r| **r).count() as u32
    }

    pub fn in_range(&self, port: u16) -> bool {
        (self.range.0..=self.range.1).contains(&port)
    }

    /// A port `connect()` may pick automatically: in the range and not reserved.
    pub fn ephemeral(&self, port: u16) -> bool {
        self.in_range(port) && !self.reserved.iter().any(|&(a, b)| (a..=b).contains(&port))
    }

    /// How long a TIME_WAIT socket keeps its port from a `connect()` to the same destination
    /// when `tcp_tw_reuse` lets `connect()` take the port over (`tcp_twsk_unique`): with it 1,
    /// or 2 towards loopback, and TCP timestamps on (the peer's too, which the agent cannot see:
    /// assumed on, as Linux's are). Seconds: `tcp_tw_reuse_delay` (6.13 on, counted from the
    /// last timestamp received, about the entry into TIME_WAIT), else 1: older kernels take it
    /// over once the seconds clock has passed that timestamp's second
    /// (`time_after32(ktime_get_seconds(), tw_ts_recent_stamp)`), at most 1 s later (1 to 2 s
    /// under the older rule, `get_seconds() - stamp > 1`, of kernels older than portx's 5.8).
    /// None where TIME_WAIT holds its port for all of its 60 s.
    pub fn time_wait_reusable_after_s(&self, loopback: bool) -> Option<f64> {
        let applies = self.tw_reuse == 1 || (self.tw_reuse == 2 && loopback);
        (applies && self.timestamps != Some(0)).then(|| {
            self.tw_reuse_delay_ms
                .map_or(1.0, |ms| f64::from(ms) / 1000.0)
        })
    }

    pub fn tw_reuse_meaning(&self) -> &'static str {
        match self.tw_reuse {
            0 => "off",
            1 => "on",
            2 => "loopback only",
            _ => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernels_formats() {
        assert_eq!(parse_range("32768\t60999\n").unwrap(), (32768, 60999));
        assert!(parse_range("60999 32768").is_err());
        assert!(parse_range("1").is_err());
        assert!(parse_range("1 2 3").is_err());
        assert!(parse_range("a b").is_err());
        assert_eq!(parse_reserved("\n").unwrap(), vec![]);
        assert_eq!(
            parse_reserved("8080,9000-9010\n").unwrap(),
            vec![(8080, 8080), (9000, 9010)]
        );
        assert!(parse_reserved("9010-9000").is_err());
        assert!(parse_reserved("x").is_err());
    }

    #[test]
    fn usable_is_range_minus_reserved_inside_it() {
        let s = PortSettings {
            range: (40000, 40015),
            reserved: vec![(39990, 40001), (40010, 40010), (50000, 50010)],
            tw_reuse: 0,
            max_tw_buckets: None,
            timestamps: None,
            tw_reuse_delay_ms: None,
        };
        assert_eq!(s.usable(), 16 - 2 - 1);
        assert!(s.in_range(40015) && !s.in_range(40016));
        assert_eq!(s.tw_reuse_meaning(), "off");
    }

    #[test]
    fn time_wait_is_taken_over_only_where_tcp_tw_reuse_applies() {
        let s = |tw_reuse, timestamps, tw_reuse_delay_ms| PortSettings {
            range: (32768, 60999),
            reserved: vec![],
            tw_reuse,
            max_tw_buckets: None,
            timestamps,
            tw_reuse_delay_ms,
        };
        assert_eq!(
            s(0, Some(1), Some(1000)).time_wait_reusable_after_s(true),
            None
        );
        assert_eq!(
            s(1, Some(1), Some(1000)).time_wait_reusable_after_s(false),
            Some(1.0)
        );
        assert_eq!(
            s(2, Some(1), Some(500)).time_wait_reusable_after_s(true),
            Some(0.5)
        );
        assert_eq!(
            s(2, Some(1), Some(500)).time_wait_reusable_after_s(false),
            None
        );
        assert_eq!(
            s(1, Some(0), Some(1000)).time_wait_reusable_after_s(false),
            None,
            "no timestamps"
        );
        assert_eq!(
            s(1, None, None).time_wait_reusable_after_s(false),
            Some(1.0),
            "before 6.13"
        );
    }

    #[test]
    fn reads_another_netns_settings() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let id = netns::unshare_new().unwrap();
            std::fs::write(format!("{BASE}/ip_local_port_range"), "40000 40015").unwrap();
            std::fs::write(format!("{BASE}/tcp_tw_reuse"), "0").unwrap();
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            tx.send((
                id,
                format!("/proc/{}/task/{tid}/ns/net", std::process::id()),
            ))
            .unwrap();
            let _ = done_rx.recv();
        });
        let (id, path) = rx.recv().unwrap();
        let s = PortSettings::read_in(Path::new(&path), id).unwrap();
        assert_eq!((s.range, s.tw_reuse, s.usable()), ((40000, 40015), 0, 16));
        let host = PortSettings::read().unwrap();
        assert_ne!(
            host.range,
            (40000, 40015),
            "the host's own range was changed"
        );
        done_tx.send(()).unwrap();
        holder.join().unwrap();
    }
}
