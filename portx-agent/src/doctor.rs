//! `portx-agent doctor`: per network namespace, the port settings and what they mean, the
//! client ports in use (sock_diag, as `snapshot`), and the advice ([`crate::advice`]) for the
//! busiest destinations. No eBPF: it cannot see failures or bind-before-connect, so it does not
//! claim them.
use std::{cmp::Reverse, io::Write as _};

use serde::Serialize;

use crate::{
    advice::{self, Finding},
    clock,
    report::{self, DestRecord},
    seed,
    tracker::{DestKey, DestStats, Tracker},
};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NetnsReport {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub netns: u32,
    /// `ip_local_port_range`; null when the namespace's settings could not be read.
    pub port_range: Option<[u16; 2]>,
    pub reserved: Vec<[u16; 2]>,
    /// Ports connect() may pick: the range minus reserved ports.
    pub usable: Option<u32>,
    pub tw_reuse: Option<u8>,
    pub tw_reuse_meaning: Option<&'static str>,
    pub max_tw_buckets: Option<u64>,
    /// Client-side ports in use, all destinations.
    pub client_ports: u32,
    pub destinations: Vec<DoctorDest>,
    pub ts: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DoctorDest {
    #[serde(flatten)]
    pub dest: DestRecord,
    pub explain: Vec<Finding>,
}

/// One report per namespace of `pass`, busiest destinations first (`top` of them).
pub fn reports(pass: &seed::Pass, top: usize, now_ns: u64) -> Vec<NetnsReport> {
    let mut tracker = Tracker::new();
    seed::apply(&mut tracker, pass);
    for snap in &pass.snapshots {
        if let Some(s) = &snap.settings {
            tracker.set_port_settings(snap.netns, s);
        }
    }
    let mut out = Vec::new();
    for snap in &pass.snapshots {
        let settings = snap.settings.clone();
        let mut dests: Vec<(DestKey, &DestStats)> = tracker
            .dests()
            .filter(|(k, _)| k.netns == snap.netns)
            .collect();
        dests.sort_by_key(|(k, d)| (Reverse(d.in_use), *k));
        let client_ports = tracker.netns_usage(snap.netns).in_use;
        let destinations = dests
            .into_iter()
            .take(top)
            .map(|(key, stats)| DoctorDest {
                dest: report::destination(&key, stats, settings.as_ref()),
                // sock_diag cannot show bind(0) failures: no bind-before-connect evidence.
                explain: advice::advise(&advice::Evidence {
                    settings: settings.as_ref(),
                    stats,
                    loopback: key.daddr.is_loopback(),
                    bind_zero_failures: &[],
                    per_destination: true,
                    victim_bound_port: None,
                    connect_failed: false,
                }),
            })
            .collect();
        out.push(NetnsReport {
            kind: "doctor",
            netns: snap.netns,
            port_range: settings.as_ref().map(|s| [s.range.0, s.range.1]),
            reserved: settings
                .as_ref()
                .map(|s| s.reserved.iter().map(|(a, b)| [*a, *b]).collect())
                .unwrap_or_default(),
            usable: settings.as_ref().map(|s| s.usable()),
            tw_reuse: settings.as_ref().map(|s| s.tw_reuse),
            tw_reuse_meaning: settings.as_ref().map(|s| s.tw_reuse_meaning()),
            max_tw_buckets: settings.as_ref().and_then(|s| s.max_tw_buckets),
            client_ports,
            destinations,
            ts: clock::wall_ns(now_ns),
        });
    }
    out
}

fn human(r: &NetnsReport, w: &mut impl std::io::Write) -> std::io::Result<()> {
    writeln!(w, "netns {}", r.netns)?;
    match (r.port_range, r.usable) {
        (Some([lo, hi]), Some(usable)) => writeln!(
            w,
            "  ip_local_port_range {lo}-{hi}: {usable} usable ports{}",
            if r.reserved.is_empty() {
                String::new()
            } else {
                format!(
                    " ({} reserved ranges: {})",
                    r.reserved.len(),
                    r.reserved
                        .iter()
                        .map(|[a, b]| if a == b {
                            a.to_string()
                        } else {
                            format!("{a}-{b}")
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                )
            }
        )?,
        _ => writeln!(w, "  port settings: could not be read")?,
    }
    if let (Some(reuse), Some(meaning)) = (r.tw_reuse, r.tw_reuse_meaning) {
        writeln!(
            w,
            "  tcp_tw_reuse {reuse} ({meaning}): {}",
            match reuse {
                0 => "connect() is not meant to take a port whose 4-tuple is in TIME_WAIT (loopback connects were seen to, rarely)",
                1 => "connect() may take a TIME_WAIT port over once it is tcp_tw_reuse_delay old (1 s by default; at most 1 s before Linux 6.13), with TCP timestamps on",
                2 => "like 1, but only for loopback destinations",
                _ => "unknown value",
            }
        )?;
    }
    if let Some(b) = r.max_tw_buckets {
        writeln!(
            w,
            "  tcp_max_tw_buckets {b}: past it, closing sockets skip TIME_WAIT"
        )?;
    }
    writeln!(w, "  client ports in use: {}", r.client_ports)?;
    for d in &r.destinations {
        let range = d.dest.range.map_or("?".into(), |r| r.to_string());
        writeln!(
            w,
            "  {} -> {}:{}  {}/{range}  {}",
            d.dest.saddr,
            d.dest.daddr,
            d.dest.dport,
            d.dest.in_use,
            d.dest
                .by_state
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        for f in &d.explain {
            writeln!(w, "    - {} ({})", f.finding, f.evidence)?;
            writeln!(w, "      fix: {}", f.fix)?;
        }
    }
    Ok(())
}

/// Prints the reports: readable, or one JSON object per namespace.
pub fn run(json: bool, top: usize, netns: &[u32]) -> anyhow::Result<()> {
    crate::netns::warn_not_found(netns);
    let now = clock::monotonic_ns();
    let pass = seed::pass_with_owners(netns, now);
    for (id, why) in &pass.skipped {
        tracing::warn!("network namespace {id} left out: {why}");
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for r in reports(&pass, top, now) {
        if json {
            serde_json::to_writer(&mut out, &r)?;
            writeln!(out)?;
        } else {
            human(&r, &mut out)?;
        }
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockdiag::DiagSocket;
    use portx_common::tcp_state as st;

    #[test]
    fn a_report_per_namespace_with_advice_only_where_evidence_is() {
        let tw = |sport| DiagSocket {
            family: libc::AF_INET as u16,
            state: st::TIME_WAIT as u8,
            timer: 3,
            saddr: "10.0.0.1".parse().unwrap(),
            sport,
            daddr: "10.0.0.2".parse().unwrap(),
            dport: 443,
            inode: 0,
            uid: 0,
            expires_ms: 30_000,
            cookie: 0,
        };
        // A namespace id that does not exist: its settings cannot be read, so no advice about
        // settings, and `null`s rather than guesses.
        let pass = seed::Pass {
            snapshots: vec![seed::Snapshot {
                netns: 1,
                sockets: (40000..40010).map(tw).collect(),
                settings: None,
            }],
            started_ns: 1,
            owners: None,
            skipped: vec![],
            only: vec![],
            gone: vec![],
        };
        let r = reports(&pass, 5, 1);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].client_ports, 10);
        assert_eq!(r[0].port_range, None);
        assert_eq!(r[0].tw_reuse, None);
        assert_eq!(r[0].destinations[0].dest.in_use, 10);
        assert!(
            r[0].destinations[0].explain.is_empty(),
            "{:?}",
            r[0].destinations[0].explain
        );
        let v = serde_json::to_value(&r[0]).unwrap();
        assert_eq!(v["type"], "doctor");
        assert_eq!(v["destinations"][0]["dport"], 443);
        assert!(v["destinations"][0]["explain"].is_array());
    }
}
