//! What would help, said only when the evidence is there: the `explain` section of exhaustion
//! reports and `portx-agent doctor`. Pure functions of a namespace's port settings, a
//! destination's counts and what the agent saw (bind(0) failures); no I/O.
use serde::Serialize;

use crate::{
    sysctl::PortSettings,
    tracker::{DestStats, STATES},
};

/// Linux's default `ip_local_port_range` (32768-60999).
pub const DEFAULT_RANGE: u32 = 28_232;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding {
    /// What is going on, in a few words.
    pub finding: String,
    /// The numbers it rests on.
    pub evidence: String,
    /// The concrete setting or socket option that would help.
    pub fix: String,
}

/// What is known about one destination (or, with `daddr` None, a whole namespace).
pub struct Evidence<'a> {
    pub settings: Option<&'a PortSettings>,
    pub stats: &'a DestStats,
    /// The destination is a loopback address (tcp_tw_reuse=2 applies only there).
    pub loopback: bool,
    /// Processes seen failing bind(port 0) with EADDRINUSE in this namespace: (pid, comm).
    pub bind_zero_failures: &'a [(u32, String)],
    /// A single destination (per-4-tuple limit) rather than a whole namespace.
    pub per_destination: bool,
    /// The port the failing connect()'s socket was bound to before the call, if any.
    pub victim_bound_port: Option<u16>,
    /// A connect() to this destination failed with EADDRNOTAVAIL (an exhaustion report, not
    /// `doctor`'s look at the table).
    pub connect_failed: bool,
}

fn finding(
    finding: impl Into<String>,
    evidence: impl Into<String>,
    fix: impl Into<String>,
) -> Finding {
    Finding {
        finding: finding.into(),
        evidence: evidence.into(),
        fix: fix.into(),
    }
}

fn time_wait(stats: &DestStats) -> u32 {
    let tw = portx_common::tcp_state::TIME_WAIT as usize;
    if tw < STATES {
        stats.by_state[tw]
    } else {
        0
    }
}

/// Findings for `e`, most telling first.
pub fn advise(e: &Evidence<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let tw = time_wait(e.stats);
    let in_use = e.stats.in_use;

    // A bound socket's connect() searched no port: the range did not fail it, and its findings
    // (below) would point at the wrong fix.
    if let Some(port) = e.victim_bound_port {
        out.push(finding(
            format!("the failing socket was bound to port {port} before connect(), and that port already has a connection to this destination"),
            format!("connect() keeps a bound socket's port and searches no other: EADDRNOTAVAIL says the 4-tuple (source address, port {port}, destination) is in use, or in TIME_WAIT that may not be reused"),
            "let connect() pick the port: do not bind() a client socket, or set IP_BIND_ADDRESS_NO_PORT before bind(address, 0); a fixed source port allows one connection to each destination at a time",
        ));
    }

    // tcp_tw_reuse is connect()'s (its 4-tuple check); a namespace-wide report is about
    // bind(), which it never helps.
    if e.per_destination && tw > 0 && in_use > 0 && tw * 2 >= in_use {
        if let Some(s) = e.settings {
            let reuse_applies = s.tw_reuse == 1 || (s.tw_reuse == 2 && e.loopback);
            if !reuse_applies {
                out.push(finding(
                    "TIME_WAIT holds most of these ports and connect() may not reuse them",
                    format!(
                        "{tw} of {in_use} ports in TIME_WAIT; tcp_tw_reuse={} ({})",
                        s.tw_reuse,
                        s.tw_reuse_meaning()
                    ),
                    "sysctl -w net.ipv4.tcp_tw_reuse=1 in this network namespace (outgoing connections only; needs TCP timestamps, on by default)",
                ));
            } else if s.timestamps == Some(0) {
                out.push(finding(
                    "TIME_WAIT holds most of these ports, and tcp_tw_reuse cannot work without TCP timestamps",
                    format!(
                        "{tw} of {in_use} ports in TIME_WAIT; tcp_tw_reuse={} ({}), tcp_timestamps=0",
                        s.tw_reuse,
                        s.tw_reuse_meaning()
                    ),
                    "sysctl -w net.ipv4.tcp_timestamps=1 in this network namespace: connect() takes a TIME_WAIT port over only from a connection that had timestamps",
                ));
            }
        }
    }

    for (pid, h) in e.stats.holders_ranked().into_iter().take(3) {
        let (ports, holder_tw) = (h.ports, h.time_wait);
        if pid != 0 && holder_tw >= 8 && holder_tw * 2 >= ports && holder_tw * 4 >= in_use {
            out.push(finding(
                format!("{}[{pid}] churns short connections to this destination", h.comm),
                format!(
                    "it closed {holder_tw} connections first that now sit in TIME_WAIT for 60 s ({ports} ports held in all)"
                ),
                "reuse connections: a connection pool or HTTP keep-alive in the client; or let the server close first",
            ));
        }
    }

    for (pid, comm) in e.bind_zero_failures.iter().take(3) {
        out.push(finding(
            format!("{comm}[{pid}] binds before it connects"),
            "bind() to port 0 failed with EADDRINUSE: bind() picks a port for every destination at once, so the range runs out long before each destination's would".to_string(),
            "set IP_BIND_ADDRESS_NO_PORT on the socket before bind() (or do not bind() a client socket at all)",
        ));
    }

    if let Some(s) = e.settings.filter(|_| e.victim_bound_port.is_none()) {
        let usable = s.usable();
        let total = u32::from(s.range.1) - u32::from(s.range.0) + 1;
        // The range itself: reserved ports have a finding of their own.
        if total < DEFAULT_RANGE {
            out.push(finding(
                "the ephemeral port range is narrower than Linux's default",
                format!(
                    "ip_local_port_range {}-{}: {total} ports (default 32768-60999: {DEFAULT_RANGE})",
                    s.range.0, s.range.1
                ),
                "widen it, e.g. sysctl -w net.ipv4.ip_local_port_range=\"10000 65535\" (keep listening ports out of it, or reserve them with ip_local_reserved_ports)",
            ));
        }
        if total > 1 && total % 2 == 1 {
            // __inet_hash_connect rounds the ports it scans down to an even number: one port
            // of the range is left out of each search (with 3 ports, always the last).
            out.push(finding(
                "both ends of the port range have the same parity, so each connect() searches one port fewer",
                format!(
                    "ip_local_port_range {}-{}: {total} ports, an odd number; connect() scans {} of them",
                    s.range.0,
                    s.range.1,
                    total - 1
                ),
                "give the ends different parity (one even, one odd), as Linux's ip-sysctl documentation asks, e.g. 32768-60999",
            ));
        }
        let reserved = total - usable;
        if reserved > 0 && reserved * 10 >= total {
            out.push(finding(
                "reserved ports take a notable part of the range",
                format!("{reserved} of {total} ports in the range are in ip_local_reserved_ports"),
                "check net.ipv4.ip_local_reserved_ports: reserve only the ports that listeners need",
            ));
        }
        // Ports bound explicitly outside the range do not fill it.
        let in_range = e.stats.in_range();
        // __inet_hash_connect skips a port whose bind bucket bind() made (fastreuse >= 0),
        // whatever the 4-tuple: such ports are gone for every destination, and the table
        // counts them towards their own (a listener's not at all).
        if e.connect_failed && e.per_destination && usable > 0 && in_range < usable {
            out.push(finding(
                "connect() found no free port, yet fewer than the range's ports to this destination are in use",
                format!(
                    "{in_range} of {usable} ports to this destination in use when connect() failed with EADDRNOTAVAIL; connect() skips every port bound explicitly (bind() before connect() without IP_BIND_ADDRESS_NO_PORT, a listener inside the range), whatever its destination, and portx counts those only towards their own destination, listeners and sockets it has not seen not at all"
                ),
                format!(
                    "find the bound ports: `ss -tanp` in this namespace, local ports {}-{} of listeners and of clients that bind(); set IP_BIND_ADDRESS_NO_PORT before bind(), move listeners out of the range or reserve their ports (ip_local_reserved_ports)",
                    s.range.0, s.range.1
                ),
            ));
        }
        if e.per_destination && usable > 0 && in_range >= usable && usable >= 1024 {
            out.push(finding(
                "one destination used up the whole range",
                format!("{in_range} ports to one (address, port) out of {usable}: the limit is per 4-tuple"),
                "spread the connections: more destination addresses or ports (e.g. several backends), or more source addresses",
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decoder::Comm, tracker::Holder};
    use portx_common::tcp_state as st;

    fn settings(range: (u16, u16), tw_reuse: u8, reserved: Vec<(u16, u16)>) -> PortSettings {
        PortSettings {
            range,
            reserved,
            tw_reuse,
            max_tw_buckets: None,
            timestamps: None,
            tw_reuse_delay_ms: None,
        }
    }

    fn stats(established: u32, time_wait: u32) -> DestStats {
        let mut s = DestStats::default();
        s.by_state[st::ESTABLISHED as usize] = established;
        s.by_state[st::TIME_WAIT as usize] = time_wait;
        s.in_use = established + time_wait;
        s
    }

    fn ev<'a>(
        settings: Option<&'a PortSettings>,
        stats: &'a DestStats,
        binds: &'a [(u32, String)],
    ) -> Evidence<'a> {
        Evidence {
            settings,
            stats,
            loopback: false,
            bind_zero_failures: binds,
            per_destination: true,
            victim_bound_port: None,
            connect_failed: false,
        }
    }

    fn held_by(mut s: DestStats, pid: u32, comm: &str, ports: u32, time_wait: u32) -> DestStats {
        s.holders.insert(
            pid,
            Holder {
                comm: Comm::new(comm),
                ports,
                time_wait,
            },
        );
        s
    }

    fn says(f: &[Finding], what: &str) -> bool {
        f.iter()
            .any(|f| f.fix.contains(what) || f.finding.contains(what))
    }

    #[test]
    fn time_wait_with_reuse_off_suggests_tw_reuse_and_a_pool() {
        let s = settings((32768, 60999), 0, vec![]);
        let st = held_by(stats(100, 28000), 42, "curl", 28000, 28000);
        let f = advise(&ev(Some(&s), &st, &[]));
        assert!(says(&f, "tcp_tw_reuse=1"), "{f:#?}");
        assert!(says(&f, "connection pool"), "{f:#?}");
        assert!(!says(&f, "narrower"), "default range: {f:#?}");
    }

    #[test]
    fn no_evidence_no_advice() {
        let s = settings((32768, 60999), 1, vec![]);
        // Reuse on, all ESTABLISHED, default range, no bind failures.
        let st = held_by(stats(500, 0), 42, "app", 500, 0);
        assert_eq!(advise(&ev(Some(&s), &st, &[])), vec![]);
        // Unknown settings: nothing about settings.
        let tw = stats(1, 10);
        assert!(!says(&advise(&ev(None, &tw, &[])), "tcp_tw_reuse"));
    }

    #[test]
    fn loopback_only_reuse_counts_only_for_loopback() {
        let s = settings((32768, 60999), 2, vec![]);
        let st = stats(0, 100);
        let mut e = ev(Some(&s), &st, &[]);
        assert!(says(&advise(&e), "tcp_tw_reuse=1"), "remote destination");
        e.loopback = true;
        assert!(
            !says(&advise(&e), "tcp_tw_reuse=1"),
            "loopback: reuse applies"
        );
    }

    #[test]
    fn a_bound_victim_is_told_its_4_tuple_and_nothing_about_the_range() {
        let s = settings((40000, 40015), 0, vec![(40000, 40003)]);
        let st = stats(1, 0);
        let mut e = ev(Some(&s), &st, &[]);
        assert!(says(&advise(&e), "narrower"));
        e.victim_bound_port = Some(30000);
        let f = advise(&e);
        assert!(f[0].finding.contains("bound to port 30000"), "{f:#?}");
        assert!(says(&f, "IP_BIND_ADDRESS_NO_PORT"), "{f:#?}");
        assert!(!says(&f, "narrower") && !says(&f, "reserved"), "{f:#?}");
    }

    #[test]
    fn narrow_range_reserved_ports_and_bind_before_connect() {
        let s = settings((40000, 40015), 0, vec![(40000, 40003)]);
        let st = stats(12, 0);
        let binds = [(9, "legacy".to_string())];
        let f = advise(&ev(Some(&s), &st, &binds));
        assert!(says(&f, "ip_local_port_range"), "{f:#?}");
        assert!(says(&f, "ip_local_reserved_ports"), "{f:#?}");
        assert!(says(&f, "IP_BIND_ADDRESS_NO_PORT"), "{f:#?}");
        assert!(f.iter().any(|f| f.finding.contains("legacy[9]")), "{f:#?}");
    }

    #[test]
    fn a_full_wide_range_to_one_destination_is_the_four_tuple_limit() {
        let s = settings((32768, 60999), 1, vec![]);
        let st = stats(28232, 0);
        let f = advise(&ev(Some(&s), &st, &[]));
        assert!(
            says(&f, "per 4-tuple") || f.iter().any(|f| f.evidence.contains("per 4-tuple")),
            "{f:#?}"
        );
        let mut netns_wide = ev(Some(&s), &st, &[]);
        netns_wide.per_destination = false;
        assert!(!advise(&netns_wide)
            .iter()
            .any(|f| f.evidence.contains("4-tuple")));
        // 5,000 of 30,000 bound explicitly outside the range: it is not used up.
        let mut bound_outside = stats(30_000, 0);
        bound_outside.outside_range = 5_000;
        assert!(!advise(&ev(Some(&s), &bound_outside, &[]))
            .iter()
            .any(|f| f.evidence.contains("4-tuple")));
    }

    #[test]
    fn a_failed_connect_below_the_range_points_at_bound_ports() {
        let s = settings((32768, 60999), 1, vec![]);
        let st = held_by(stats(300, 0), 42, "app", 300, 0);
        let below = |f: &[Finding]| f.iter().any(|f| f.finding.contains("fewer than the range"));
        // doctor's look at the same table: nothing failed, nothing to say.
        let mut e = ev(Some(&s), &st, &[]);
        assert!(!below(&advise(&e)));
        e.connect_failed = true;
        let f = advise(&e);
        assert!(below(&f), "{f:#?}");
        let it = f
            .iter()
            .find(|f| f.finding.contains("fewer than the range"));
        let it = it.expect("the finding");
        assert!(it.evidence.contains("300 of 28232"), "{it:#?}");
        assert!(it.fix.contains("32768-60999") && it.fix.contains("IP_BIND_ADDRESS_NO_PORT"));
        // The range full to this destination: the other findings say why.
        let full = stats(28232, 0);
        assert!(!below(&advise(&Evidence {
            connect_failed: true,
            ..ev(Some(&s), &full, &[])
        })));
        // A bound victim searched no port; a namespace-wide report is a bind()'s.
        e.victim_bound_port = Some(30000);
        assert!(!below(&advise(&e)));
        e.victim_bound_port = None;
        e.per_destination = false;
        assert!(!below(&advise(&e)));
    }

    #[test]
    fn the_default_range_is_not_narrower_for_a_reserved_port() {
        // One reserved port (< 10 %: no finding of its own either).
        let s = settings((32768, 60999), 1, vec![(40000, 40000)]);
        let f = advise(&ev(Some(&s), &stats(10, 0), &[]));
        assert!(!says(&f, "narrower"), "{f:#?}");
        assert!(!says(&f, "reserved"), "{f:#?}");
    }

    #[test]
    fn tcp_tw_reuse_without_timestamps_is_said() {
        let mut s = settings((40000, 40015), 1, vec![]);
        let tw = stats(2, 14);
        assert!(!says(&advise(&ev(Some(&s), &tw, &[])), "tcp_timestamps"));
        s.timestamps = Some(0);
        let f = advise(&ev(Some(&s), &tw, &[]));
        assert!(says(&f, "tcp_timestamps=1"), "{f:#?}");
        assert!(!says(&f, "tcp_tw_reuse=1 in"), "{f:#?}");
    }

    #[test]
    fn a_bind_failure_is_not_told_to_turn_on_tcp_tw_reuse() {
        // A namespace-wide report (bind(0) failed) with TIME_WAIT holding most ports:
        // tcp_tw_reuse is connect()'s, not bind()'s.
        let s = settings((40000, 40015), 0, vec![]);
        let st = stats(4, 12);
        let mut e = ev(Some(&s), &st, &[]);
        assert!(says(&advise(&e), "tcp_tw_reuse=1"));
        e.per_destination = false;
        assert!(!says(&advise(&e), "tcp_tw_reuse=1"), "{:#?}", advise(&e));
    }

    #[test]
    fn an_odd_sized_range_says_each_search_skips_a_port() {
        let odd = settings((40000, 40014), 0, vec![]);
        let f = advise(&ev(Some(&odd), &stats(1, 0), &[]));
        let parity: Vec<_> = f.iter().filter(|f| f.finding.contains("parity")).collect();
        assert_eq!(parity.len(), 1, "{f:#?}");
        assert!(parity[0].evidence.contains("15 ports"), "{parity:#?}");
        assert!(parity[0].evidence.contains("scans 14"), "{parity:#?}");
        for even in [(40000, 40015), (32768, 60999), (40000, 40000)] {
            let s = settings(even, 0, vec![]);
            let f = advise(&ev(Some(&s), &stats(1, 0), &[]));
            assert!(
                !f.iter().any(|f| f.finding.contains("parity")),
                "{even:?}: {f:#?}"
            );
        }
    }
}
