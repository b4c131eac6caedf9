//! `portx-agent snapshot`: the table of ports in use per destination, once, from the kernel's
//! own state — sock_diag in every network namespace and /proc for the owners — without eBPF, for
//! hosts where loading eBPF is not allowed (no CAP_BPF or CAP_PERFMON needed; entering other
//! namespaces needs CAP_SYS_ADMIN, reading other processes' fds CAP_SYS_PTRACE or root).
//!
//! What it cannot know without eBPF: who closed a socket now in TIME_WAIT (timewait sockets
//! have no inode, so they are charged to pid 0, `(unknown)`), rates, and failures.
use std::{cmp::Reverse, collections::HashMap, io};

use crate::{
    clock,
    filter::Filter,
    identity::Identities,
    output::Output,
    report::{self, Record, Snapshot},
    seed,
    sysctl::PortSettings,
    tracker::{DestKey, DestStats, Tracker},
};

#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    pub json: bool,
    pub top: usize,
    pub netns: Vec<u32>,
    pub filter: Filter,
}

/// Takes the snapshot and writes one record.
pub fn run(opts: &SnapshotOptions) -> anyhow::Result<()> {
    crate::netns::warn_not_found(&opts.netns);
    let now = clock::monotonic_ns();
    let pass = seed::pass_with_owners(&opts.netns, now);
    for (id, why) in &pass.skipped {
        tracing::warn!("network namespace {id} left out: {why}");
    }
    let rec = build(opts, &pass, now);
    let mut out = Output::new(io::stdout(), opts.json);
    out.record(&Record::Snapshot(rec))?;
    out.flush()?;
    Ok(())
}

/// The record of a pass: the busiest destinations that pass the filter, their holders named.
pub fn build(opts: &SnapshotOptions, pass: &seed::Pass, now_ns: u64) -> Snapshot {
    let mut tracker = Tracker::new();
    seed::apply(&mut tracker, pass);
    let settings: HashMap<u32, &PortSettings> = pass
        .snapshots
        .iter()
        .filter_map(|snap| Some((snap.netns, snap.settings.as_ref()?)))
        .collect();
    for (netns, s) in &settings {
        tracker.set_port_settings(*netns, s);
    }
    let mut identities = Identities::new();
    let mut dests: Vec<(DestKey, &DestStats)> = tracker
        .dests()
        .filter(|(k, s)| opts.filter.dest(k, s))
        .collect();
    dests.sort_by_key(|(k, d)| (Reverse(d.in_use), *k));
    let destinations = dests
        .into_iter()
        .take(opts.top)
        .map(|(key, stats)| {
            let mut rec = report::destination(&key, stats, settings.get(&key.netns).copied());
            if let Some(h) = rec.top_holder.as_mut() {
                if let Some(id) = identities.get(h.pid, now_ns) {
                    h.who = report::Who::from(&*id);
                }
            }
            rec
        })
        .collect();
    Snapshot {
        destinations,
        namespaces: pass.snapshots.len(),
        skipped: pass.skipped.iter().map(|(id, _)| *id).collect(),
        sockets: tracker.tracked(),
        ts: clock::wall_ns(now_ns),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{procfs::ProcInfo, sockdiag::DiagSocket};
    use portx_common::tcp_state as st;
    use std::collections::HashMap;

    fn sock(state: u32, sport: u16, inode: u64) -> DiagSocket {
        DiagSocket {
            family: libc::AF_INET as u16,
            state: state as u8,
            timer: if state == st::TIME_WAIT { 3 } else { 0 },
            saddr: "10.0.0.1".parse().unwrap(),
            sport,
            daddr: "10.0.0.2".parse().unwrap(),
            dport: 443,
            inode,
            uid: 0,
            expires_ms: 30_000,
            cookie: 0,
        }
    }

    #[test]
    fn a_pass_becomes_the_table_with_the_contracted_shape() {
        let mut owners = HashMap::new();
        owners.insert(
            7,
            ProcInfo {
                pid: 4_000_000,
                comm: "hog".into(),
            },
        );
        let pass = seed::Pass {
            snapshots: vec![seed::Snapshot {
                settings: None,
                netns: 1,
                sockets: vec![
                    sock(st::ESTABLISHED, 40000, 7),
                    sock(st::ESTABLISHED, 40001, 7),
                    sock(st::TIME_WAIT, 40002, 0),
                ],
            }],
            started_ns: 1,
            owners: Some(owners),
            skipped: vec![(9, "entering: EPERM".into())],
            only: vec![],
            gone: vec![],
        };
        let opts = SnapshotOptions {
            top: 10,
            ..Default::default()
        };
        let rec = build(&opts, &pass, 1);
        let v = serde_json::to_value(Record::Snapshot(rec)).unwrap();
        assert_eq!(v["type"], "snapshot");
        assert_eq!(v["sockets"], 3);
        assert_eq!(v["namespaces"], 1);
        assert_eq!(v["skipped"][0], 9);
        let d = &v["destinations"][0];
        assert_eq!(d["daddr"], "10.0.0.2");
        assert_eq!(d["dport"], 443);
        assert_eq!(d["in_use"], 3);
        assert_eq!(d["by_state"]["ESTABLISHED"], 2);
        assert_eq!(d["by_state"]["TIME_WAIT"], 1);
        assert_eq!(d["top_holder"]["pid"], 4_000_000);
        assert_eq!(d["top_holder"]["ports"], 2);
        // Filtered to another port: nothing.
        let other = SnapshotOptions {
            top: 10,
            filter: Filter {
                dports: vec![80],
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(build(&other, &pass, 1).destinations.is_empty());
    }
}
