//! What the agent says: the records of `--json` (one object per line, `type` first) and the data
//! the human output prints. Built from tracker state and per-netns port settings; no I/O here.
//!
//! `ts` is wall-clock time as integer nanoseconds since the Unix epoch.
use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;

use crate::{
    advice::{self, Finding},
    decoder::{SyscallFailure, Task},
    identity::Identity,
    sysctl::PortSettings,
    tracker::{state_name, DestKey, DestStats, STATES},
};

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Started(Started),
    ConnectFailed(Failure),
    BindFailed(Failure),
    Exhaustion(Exhaustion),
    Summary(Summary),
    Snapshot(Snapshot),
}

/// `portx-agent snapshot`: the table from sock_diag and /proc, without eBPF.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Snapshot {
    pub destinations: Vec<DestRecord>,
    /// Network namespaces dumped.
    pub namespaces: usize,
    /// Network namespaces that could not be entered or dumped (see stderr for why).
    pub skipped: Vec<u32>,
    /// Client-side sockets found, all destinations.
    pub sockets: usize,
    pub ts: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Started {
    /// fentry, kprobe or tracepoint: how the port allocation is observed.
    pub hooks: String,
    /// Every program attached, as `kind:target`.
    pub attached: Vec<String>,
    /// Sockets found by sock_diag at start-up.
    pub seeded: usize,
    pub ts: u64,
}

/// A failed connect() (`daddr`/`dport`, and `sport` where bind() gave the socket its port before
/// the call) or bind() (`saddr`/`sport`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Failure {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub errno: i32,
    /// Symbolic errno, e.g. EADDRNOTAVAIL.
    pub error: &'static str,
    pub family: &'static str,
    /// The socket's protocol: `tcp` for connect(); for bind() absent where the kernel could not
    /// read the socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daddr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saddr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sport: Option<u16>,
    pub netns: u32,
    pub ts: u64,
    /// Failures this line stands for: itself and those of the same process, destination (or
    /// local address) and errno since that key's previous line, which had none (see
    /// [`crate::failure_lines`]). 1 unless the process fails faster than a line a second.
    pub failures: u64,
    #[serde(flatten)]
    pub who: Who,
}

/// Who a process is beyond pid and comm (see [`crate::identity`]); each field only when known.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Who {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_runtime: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

impl From<&Identity> for Who {
    fn from(id: &Identity) -> Self {
        Who {
            uid: id.uid,
            cmdline: Some(id.cmdline.clone()),
            cgroup: id.cgroup.clone(),
            container_id: id.container.as_ref().map(|c| c.id.clone()),
            container_runtime: id.container.as_ref().map(|c| c.runtime),
            pod_uid: id.pod_uid.clone(),
        }
    }
}

impl Who {
    /// `docker 3f4e1c2b5a6d` / `pod <uid>` / the cgroup path, for human output.
    pub fn short(&self) -> Option<String> {
        match (&self.container_id, self.container_runtime, &self.pod_uid) {
            (Some(id), Some(rt), Some(pod)) => {
                Some(format!("{rt} {} pod {pod}", id.get(..12).unwrap_or(id)))
            }
            (Some(id), Some(rt), None) => Some(format!("{rt} {}", id.get(..12).unwrap_or(id))),
            _ => self.cgroup.clone().filter(|c| c != "/"),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HolderRecord {
    /// 0 when the owner is unknown (a TIME_WAIT socket older than the agent).
    pub pid: u32,
    pub comm: String,
    /// Ports held for this destination, TIME_WAIT included.
    pub ports: u32,
    pub time_wait: u32,
    #[serde(flatten)]
    pub who: Who,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Victim {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// The port bind() gave the failing socket before connect(); absent for none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sport: Option<u16>,
    #[serde(flatten)]
    pub who: Who,
}

/// Why a connect() (or bind()) failed: who holds the ports it needed.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Exhaustion {
    pub netns: u32,
    /// Null for a bind() failure: then the whole netns range is the budget. Null too for a
    /// connect() failure to a destination the table holds no port to (`daddr` and `dport`
    /// set, `in_use` 0, `holders` empty, `utilization` null).
    pub saddr: Option<String>,
    pub daddr: Option<String>,
    pub dport: Option<u16>,
    /// Ports connect() may pick: the netns' `ip_local_port_range` minus reserved ports; null if
    /// the netns could not be read.
    pub range: Option<u32>,
    pub in_use: u32,
    /// Of `in_use`, ports outside the range (or reserved): bound explicitly, they do not count
    /// in `utilization`. Left out when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub outside_range: u32,
    /// (`in_use` − `outside_range`) ÷ `range`.
    pub utilization: Option<f64>,
    pub by_state: BTreeMap<&'static str, u32>,
    pub holders: Vec<HolderRecord>,
    pub victim: Victim,
    /// What would help, each only when the evidence is there (see [`crate::advice`]).
    pub explain: Vec<Finding>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_range: Option<[u16; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tw_reuse: Option<u8>,
    /// Failures to this destination since the previous report (reports are rate-limited).
    pub failures: u64,
    /// Records the kernel could not write (ring buffer full) since the agent started; when not
    /// 0, the counts above may be low until the next resync.
    pub lost: u64,
    /// Program runs that saw nothing (skipped by the kernel, or given up), since start, as of the
    /// last summary.
    pub missed: u64,
    pub ts: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DestRecord {
    pub netns: u32,
    pub saddr: String,
    pub daddr: String,
    pub dport: u16,
    pub range: Option<u32>,
    pub in_use: u32,
    /// As in [`Exhaustion`].
    #[serde(skip_serializing_if = "is_zero")]
    pub outside_range: u32,
    pub utilization: Option<f64>,
    pub by_state: BTreeMap<&'static str, u32>,
    /// The process holding most of these ports.
    pub top_holder: Option<HolderRecord>,
    /// New connections per second to this destination (smoothed over ~10 s); null until two
    /// samples were taken.
    pub churn_per_s: Option<f64>,
    /// Ports entering TIME_WAIT per second (smoothed).
    pub time_wait_per_s: Option<f64>,
    /// Ports in use once TIME_WAIT reaches its steady state at this rate (Little's law: live
    /// ports + TIME_WAIT rate × 60 s).
    pub projected_in_use: Option<u32>,
    /// Seconds until the ports in the range in use reach `range` at the recent growth rate, when it is heading
    /// there; 0 when exhausted; null when not heading for exhaustion or unknown.
    pub time_to_exhaustion_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub destinations: Vec<DestRecord>,
    /// Sockets in the table (all destinations, TIME_WAIT included).
    pub tracked: usize,
    /// connect()s under way whose port the agent has not seen yet.
    pub pending: usize,
    /// Records read from the ring buffer, since start.
    pub events: u64,
    /// Records the kernel could not write (ring buffer full), since start.
    pub lost: u64,
    /// Program runs that saw nothing, since start: the kernel skipped them (another BPF program
    /// was running on that CPU; 0 before Linux 5.12, which does not count them), or they gave up
    /// (`gave_up`).
    pub missed: u64,
    /// Of `missed`, the runs of portx's programs that gave up before writing what they were for:
    /// a kernel (or user) read that failed, a per-thread note the map had no room for. 0 unless
    /// something is wrong.
    pub gave_up: u64,
    /// Sockets a resync (sock_diag) found held in the table in a live state the kernel no
    /// longer reports, since start: state changes that came in no record — lost to a full
    /// ring, or ones the kernel ran no program for — corrected then. 0 unless records go
    /// missing.
    pub repaired: u64,
    /// Records that could not be decoded, since start.
    pub decode_errors: u64,
    /// State changes of sockets the agent never saw connect (see `TrackerCounters`), since start.
    pub untracked: u64,
    /// TIME_WAIT entries dropped, oldest first, to stay within `--max-sockets`, since start.
    pub evicted: u64,
    /// Sockets not tracked because `--max-sockets` was reached with no TIME_WAIT to evict.
    pub over_limit: u64,
    /// connect() failures with EADDRNOTAVAIL since start.
    pub connect_failures: u64,
    /// Lines of output dropped because stdout did not keep up (its reader stopped reading),
    /// since start; whole records, never half of one.
    pub output_dropped: u64,
    /// True for the summary printed at exit.
    #[serde(rename = "final")]
    pub is_final: bool,
    pub ts: u64,
}

pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::EINVAL => "EINVAL",
        libc::EALREADY => "EALREADY",
        libc::EISCONN => "EISCONN",
        libc::EINTR => "EINTR",
        libc::EAGAIN => "EAGAIN",
        libc::ENOBUFS => "ENOBUFS",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::ENETDOWN => "ENETDOWN",
        _ => "other",
    }
}

pub fn family_name(ip: &IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "ipv4",
        IpAddr::V6(_) => "ipv6",
    }
}

pub fn by_state(stats: &DestStats) -> BTreeMap<&'static str, u32> {
    (0..STATES)
        .filter(|&s| stats.by_state[s] > 0)
        .map(|s| (state_name(s as u32), stats.by_state[s]))
        .collect()
}

fn holders(stats: &DestStats) -> Vec<HolderRecord> {
    stats
        .holders_ranked()
        .into_iter()
        .map(|(pid, h)| HolderRecord {
            pid,
            comm: if pid == 0 {
                "(unknown)".into()
            } else {
                h.comm.to_string()
            },
            ports: h.ports,
            time_wait: h.time_wait,
            who: Who::default(),
        })
        .collect()
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A utilization as a whole percentage, rounded down as the utilization is: 100 only when full.
pub fn percent(utilization: f64) -> u64 {
    (utilization * 1000.0).round() as u64 / 10
}

/// In thousandths, rounded down: 1.0 only when the range is full (28,221 of 28,232 ports is
/// 0.999, not 1.0).
fn utilization(in_use: u32, range: Option<u32>) -> Option<f64> {
    range
        .filter(|r| *r > 0)
        .map(|r| (u64::from(in_use) * 1000 / u64::from(r)) as f64 / 1000.0)
}

pub fn failure(f: &SyscallFailure, connect: bool, ts: u64) -> Failure {
    let (addr, port) = (Some(f.addr.to_string()), Some(f.port));
    Failure {
        pid: f.task.pid,
        tid: f.task.tid,
        comm: f.task.comm.to_string(),
        errno: f.errno,
        error: errno_name(f.errno),
        family: family_name(&f.addr),
        protocol: f.protocol.map(protocol_name),
        daddr: if connect { addr.clone() } else { None },
        dport: if connect { port } else { None },
        saddr: if connect { None } else { addr },
        sport: if connect { f.bound() } else { port },
        netns: f.netns,
        ts,
        failures: 1,
        who: Who::default(),
    }
}

/// An IP protocol number as the failure lines name it.
pub fn protocol_name(protocol: u16) -> &'static str {
    match protocol {
        1 => "icmp",
        6 => "tcp",
        17 => "udp",
        58 => "icmpv6",
        132 => "sctp",
        136 => "udplite",
        255 => "raw",
        262 => "mptcp",
        _ => "other",
    }
}

/// What ran out, as an exhaustion report tells it.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// A connect() to a destination the table holds ports to.
    Destination(&'a DestKey),
    /// A connect() to a destination the table holds nothing to (its ports held by bind(), or by
    /// sockets older than the agent): its address and port; how full the range is, unknown.
    Untracked(IpAddr, u16),
    /// A bind() in the namespace: the namespace's whole table.
    Namespace,
}

/// Exhaustion report for `scope`, with `stats` of what the table holds there. `bind_zero` are
/// the processes seen failing bind(0) in this netns (bind-before-connect). `victim_port` is the
/// port the failing connect()'s socket was bound to, if any.
#[allow(clippy::too_many_arguments)]
pub fn exhaustion(
    netns: u32,
    scope: Scope<'_>,
    stats: &DestStats,
    settings: Option<&PortSettings>,
    victim: &Task,
    victim_port: Option<u16>,
    failures: u64,
    ts: u64,
    bind_zero: &[(u32, String)],
) -> Exhaustion {
    let range = settings.map(PortSettings::usable);
    let (saddr, daddr, dport) = match scope {
        Scope::Destination(d) => (Some(d.saddr), Some(d.daddr), Some(d.dport)),
        Scope::Untracked(addr, port) => (None, Some(addr), Some(port)),
        Scope::Namespace => (None, None, None),
    };
    // A report for a destination is a connect()'s; a namespace's, a bind()'s.
    let connect = daddr.is_some();
    let explain = advice::advise(&advice::Evidence {
        settings,
        stats,
        loopback: daddr.is_some_and(|a| a.is_loopback()),
        bind_zero_failures: bind_zero,
        per_destination: connect,
        victim_bound_port: victim_port,
        connect_failed: connect,
    });
    Exhaustion {
        netns,
        saddr: saddr.map(|a| a.to_string()),
        daddr: daddr.map(|a| a.to_string()),
        dport,
        range,
        in_use: stats.in_use,
        outside_range: stats.outside_range,
        // Not 0 of the range where nothing is tracked: unknown.
        utilization: match scope {
            Scope::Untracked(..) => None,
            _ => utilization(stats.in_range(), range),
        },
        by_state: by_state(stats),
        holders: holders(stats),
        victim: Victim {
            pid: victim.pid,
            tid: victim.tid,
            comm: victim.comm.to_string(),
            sport: victim_port,
            who: Who::default(),
        },
        explain,
        port_range: settings.map(|s| [s.range.0, s.range.1]),
        tw_reuse: settings.map(|s| s.tw_reuse),
        failures,
        lost: 0,
        missed: 0,
        ts,
    }
}

pub fn destination(
    key: &DestKey,
    stats: &DestStats,
    settings: Option<&PortSettings>,
) -> DestRecord {
    let range = settings.map(PortSettings::usable);
    DestRecord {
        netns: key.netns,
        saddr: key.saddr.to_string(),
        daddr: key.daddr.to_string(),
        dport: key.dport,
        range,
        in_use: stats.in_use,
        outside_range: stats.outside_range,
        utilization: utilization(stats.in_range(), range),
        by_state: by_state(stats),
        top_holder: holders(stats).into_iter().next(),
        churn_per_s: None,
        time_wait_per_s: None,
        projected_in_use: None,
        time_to_exhaustion_s: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        decoder::Comm,
        tracker::{DestStats, Holder},
    };
    use portx_common::tcp_state as st;

    fn stats() -> DestStats {
        let mut s = DestStats::default();
        s.by_state[st::ESTABLISHED as usize] = 10;
        s.by_state[st::TIME_WAIT as usize] = 6;
        s.in_use = 16;
        s.holders.insert(
            42,
            Holder {
                comm: Comm::new("hog"),
                ports: 10,
                time_wait: 0,
            },
        );
        s.holders.insert(
            7,
            Holder {
                comm: Comm::new("churner"),
                ports: 6,
                time_wait: 6,
            },
        );
        s
    }

    fn settings() -> PortSettings {
        PortSettings {
            range: (40000, 40015),
            reserved: vec![],
            tw_reuse: 0,
            max_tw_buckets: None,
            timestamps: None,
            tw_reuse_delay_ms: None,
        }
    }

    #[test]
    fn exhaustion_json_has_the_contracted_shape() {
        let key = DestKey {
            netns: 5,
            proto: 6,
            saddr: "127.0.0.1".parse().unwrap(),
            daddr: "127.0.0.1".parse().unwrap(),
            dport: 9000,
        };
        let victim = Task {
            pid: 99,
            tid: 100,
            comm: Comm::new("victim"),
        };
        let rec = Record::Exhaustion(exhaustion(
            5,
            Scope::Destination(&key),
            &stats(),
            Some(&settings()),
            &victim,
            None,
            3,
            123,
            &[],
        ));
        let v: serde_json::Value = serde_json::to_value(&rec).unwrap();
        assert_eq!(v["type"], "exhaustion");
        assert_eq!(v["range"], 16);
        assert_eq!(v["in_use"], 16);
        assert_eq!(v["utilization"], 1.0);
        assert_eq!(v["by_state"]["ESTABLISHED"], 10);
        assert_eq!(v["by_state"]["TIME_WAIT"], 6);
        assert_eq!(v["holders"][0]["comm"], "hog");
        assert_eq!(v["holders"][1]["time_wait"], 6);
        assert_eq!(v["victim"]["pid"], 99);
        assert_eq!(v["daddr"], "127.0.0.1");
        assert_eq!(v["dport"], 9000);
        assert_eq!(v["failures"], 3);
        assert_eq!(v["ts"], 123);
        assert!(v["victim"].get("sport").is_none());
        assert!(says(&v, "narrower"), "{v:#}");
        // A bound victim's connect() searched no port: the report says so, and nothing about
        // the range, which did not fail it.
        let v = serde_json::to_value(exhaustion(
            5,
            Scope::Destination(&key),
            &stats(),
            Some(&settings()),
            &victim,
            Some(30000),
            3,
            123,
            &[],
        ))
        .unwrap();
        assert_eq!(v["victim"]["sport"], 30000);
        assert!(says(&v, "bound to port 30000"), "{v:#}");
        assert!(!says(&v, "narrower"), "{v:#}");
    }

    #[test]
    fn a_destination_with_nothing_tracked_is_reported_as_that_destination() {
        let victim = Task {
            pid: 99,
            tid: 100,
            comm: Comm::new("victim"),
        };
        let report = |scope| {
            serde_json::to_value(exhaustion(
                5,
                scope,
                &DestStats::default(),
                Some(&settings()),
                &victim,
                None,
                1,
                123,
                &[],
            ))
            .unwrap()
        };
        let v = report(Scope::Untracked("127.0.0.1".parse().unwrap(), 9000));
        assert_eq!(
            (&v["daddr"], &v["dport"]),
            (&"127.0.0.1".into(), &9000.into())
        );
        assert!(v["saddr"].is_null() && v["utilization"].is_null(), "{v:#}");
        // A connect()'s advice, not a bind()'s: nothing to it in use points at bound ports.
        assert!(says(&v, "fewer than the range"), "{v:#}");
        let ns = report(Scope::Namespace);
        assert!(
            ns["daddr"].is_null() && !says(&ns, "fewer than the range"),
            "{ns:#}"
        );
    }

    /// True if one of the report's findings contains `what`.
    fn says(report: &serde_json::Value, what: &str) -> bool {
        report["explain"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f.to_string().contains(what)))
    }

    #[test]
    fn connect_failure_json_names_destination_not_source() {
        let f = SyscallFailure {
            ts_ns: 0,
            task: Task {
                pid: 1,
                tid: 2,
                comm: Comm::new("curl"),
            },
            skaddr: 0,
            netns: 9,
            errno: 99,
            addr: "::1".parse().unwrap(),
            port: 443,
            tally: Default::default(),
            protocol: Some(portx_common::IPPROTO_TCP),
            bound_port: 0,
        };
        let v = serde_json::to_value(Record::ConnectFailed(failure(&f, true, 5))).unwrap();
        assert_eq!(v["type"], "connect_failed");
        assert_eq!(v["errno"], 99);
        assert_eq!(v["error"], "EADDRNOTAVAIL");
        assert_eq!(v["family"], "ipv6");
        assert_eq!(v["daddr"], "::1");
        assert_eq!(v["dport"], 443);
        assert!(v.get("saddr").is_none());
        assert!(v.get("sport").is_none());
        // A socket bind() gave a port before connect(): the line names that port.
        let bound = SyscallFailure {
            bound_port: 30000,
            ..f
        };
        let v = serde_json::to_value(Record::ConnectFailed(failure(&bound, true, 5))).unwrap();
        assert_eq!(
            (v["daddr"].as_str(), v["sport"].as_u64()),
            (Some("::1"), Some(30000))
        );
        assert!(v.get("saddr").is_none());
        let b = serde_json::to_value(Record::BindFailed(failure(&f, false, 5))).unwrap();
        assert_eq!(b["type"], "bind_failed");
        assert_eq!(b["sport"], 443);
        assert!(b.get("daddr").is_none());
        assert_eq!(v["protocol"], "tcp");
        let udp = SyscallFailure {
            protocol: Some(portx_common::IPPROTO_UDP),
            ..f
        };
        let b = serde_json::to_value(Record::BindFailed(failure(&udp, false, 5))).unwrap();
        assert_eq!(b["protocol"], "udp");
        let unread = SyscallFailure {
            protocol: None,
            ..f
        };
        let b = serde_json::to_value(Record::BindFailed(failure(&unread, false, 5))).unwrap();
        assert!(b.get("protocol").is_none());
    }

    #[test]
    fn only_a_full_range_is_a_utilization_of_one() {
        assert_eq!(utilization(28221, Some(28232)), Some(0.999));
        assert_eq!(utilization(28232, Some(28232)), Some(1.0));
        assert_eq!(utilization(58, Some(100)), Some(0.58));
        assert_eq!(utilization(7, Some(10)), Some(0.7));
        assert_eq!(utilization(0, Some(16)), Some(0.0));
        assert_eq!(utilization(1, Some(0)), None);
        let pct = |u, r| percent(utilization(u, Some(r)).unwrap());
        assert_eq!((pct(28221, 28232), pct(28232, 28232)), (99, 100));
        assert_eq!(
            (pct(58, 100), pct(7, 10), pct(1, 3), pct(0, 16)),
            (58, 70, 33, 0)
        );
    }

    #[test]
    fn unknown_range_gives_null_utilization_not_a_made_up_number() {
        let key = DestKey {
            netns: 5,
            proto: 6,
            saddr: "10.0.0.1".parse().unwrap(),
            daddr: "10.0.0.2".parse().unwrap(),
            dport: 80,
        };
        let d = destination(&key, &stats(), None);
        assert_eq!(d.range, None);
        assert_eq!(d.utilization, None);
    }
}
