//! `--pid`, `--comm` and `--dport`: which failures and destinations the records show. They
//! narrow what is printed, not what is tracked: the table stays whole, so a destination shown
//! because the filtered process holds ports there still counts everyone's ports.
use crate::{
    decoder::SyscallFailure,
    tracker::{DestKey, DestStats},
};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Processes (tgid); any when empty.
    pub pids: Vec<u32>,
    /// Process names (exact comm, at most 15 bytes as the kernel keeps it); any when empty.
    pub comms: Vec<String>,
    /// Destination ports; any when empty.
    pub dports: Vec<u16>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty() && self.comms.is_empty() && self.dports.is_empty()
    }

    fn process(&self, pid: u32, comm: &str) -> bool {
        (self.pids.is_empty() || self.pids.contains(&pid))
            && (self.comms.is_empty() || self.comms.iter().any(|c| c == comm))
    }

    /// A failed connect() (`connect`) or bind(): by its process, and for connect() its
    /// destination port. A bind() failure has no destination: `--dport` hides it.
    pub fn failure(&self, f: &SyscallFailure, connect: bool) -> bool {
        let port_ok = if connect {
            self.dports.is_empty() || self.dports.contains(&f.port)
        } else {
            self.dports.is_empty()
        };
        port_ok && self.process(f.task.pid, &f.task.comm.as_str())
    }

    /// A destination: by its port, and by whether a matching process holds ports there.
    pub fn dest(&self, key: &DestKey, stats: &DestStats) -> bool {
        if !self.dports.is_empty() && !self.dports.contains(&key.dport) {
            return false;
        }
        if self.pids.is_empty() && self.comms.is_empty() {
            return true;
        }
        stats
            .holders
            .iter()
            .any(|(pid, h)| self.process(*pid, &h.comm.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        decoder::{Comm, Task},
        tracker::Holder,
    };

    fn failure(pid: u32, comm: &str, port: u16) -> SyscallFailure {
        SyscallFailure {
            ts_ns: 0,
            task: Task {
                pid,
                tid: pid,
                comm: Comm::new(comm),
            },
            skaddr: 0,
            netns: 1,
            errno: 99,
            addr: "10.0.0.2".parse().unwrap(),
            port,
            tally: Default::default(),
            protocol: Some(portx_common::IPPROTO_TCP),
            bound_port: 0,
        }
    }

    #[test]
    fn empty_filter_passes_everything() {
        let f = Filter::default();
        assert!(f.is_empty());
        assert!(f.failure(&failure(1, "a", 80), true));
        assert!(f.failure(&failure(1, "a", 0), false));
    }

    #[test]
    fn failures_by_pid_comm_and_port() {
        let f = Filter {
            pids: vec![7],
            comms: vec![],
            dports: vec![443],
        };
        assert!(f.failure(&failure(7, "curl", 443), true));
        assert!(!f.failure(&failure(8, "curl", 443), true));
        assert!(!f.failure(&failure(7, "curl", 80), true));
        assert!(
            !f.failure(&failure(7, "curl", 0), false),
            "bind has no dport"
        );
        let by_comm = Filter {
            comms: vec!["curl".into()],
            ..Default::default()
        };
        assert!(by_comm.failure(&failure(9, "curl", 1), true));
        assert!(!by_comm.failure(&failure(9, "wget", 1), true));
        assert!(by_comm.failure(&failure(9, "curl", 0), false));
    }

    #[test]
    fn destinations_by_port_and_holder() {
        let key = DestKey {
            netns: 1,
            proto: 6,
            saddr: "10.0.0.1".parse().unwrap(),
            daddr: "10.0.0.2".parse().unwrap(),
            dport: 443,
        };
        let mut stats = DestStats::default();
        stats.holders.insert(
            7,
            Holder {
                comm: Comm::new("hog"),
                ports: 3,
                time_wait: 0,
            },
        );
        let only = |pids: Vec<u32>, comms: Vec<&str>, dports: Vec<u16>| Filter {
            pids,
            comms: comms.into_iter().map(String::from).collect(),
            dports,
        };
        assert!(only(vec![], vec![], vec![443]).dest(&key, &stats));
        assert!(!only(vec![], vec![], vec![80]).dest(&key, &stats));
        assert!(only(vec![7], vec![], vec![]).dest(&key, &stats));
        assert!(!only(vec![8], vec![], vec![]).dest(&key, &stats));
        assert!(only(vec![], vec!["hog"], vec![443]).dest(&key, &stats));
        assert!(!only(vec![], vec!["cat"], vec![]).dest(&key, &stats));
    }
}
