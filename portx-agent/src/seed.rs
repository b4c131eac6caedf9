//! The kernel's own truth folded into the tracker: at start-up (connections that already exist,
//! so a culprit that connected before the agent started is still named) and periodically (the
//! tracepoint cannot see a timewait socket die early, an RST in FIN_WAIT2, or
//! `tcp_max_tw_buckets` refusing one; lost events would otherwise stay wrong forever).
//!
//! Each network namespace with a process (or a /run/netns bind mount) is dumped through sock_diag
//! from a thread that entered it; live sockets are attributed to processes through the socket
//! inodes in /proc/<pid>/fd: a readlink for every descriptor of every process, so made only for
//! live sockets the tracker does not hold ([`lacking_owners`]). Timewait sockets have no inode:
//! their owner is unknown unless the tracker already charged them to the process that closed
//! them.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use portx_common::{tcp_state as st, IPPROTO_TCP};

use crate::{
    decoder::Comm,
    netns::{self, NetnsId},
    procfs::{self, ProcInfo},
    sockdiag::{self, DiagSocket},
    sysctl::PortSettings,
    tracker::{DestKey, Owner, Tracker},
};

/// One netns as sock_diag saw it.
pub struct Snapshot {
    pub netns: NetnsId,
    /// Client-side sockets: not listeners, not accepted by a local listener.
    pub sockets: Vec<DiagSocket>,
    /// Its port settings, read by the same thread while it was in the namespace (None if they
    /// could not be read: said at debug level).
    pub settings: Option<PortSettings>,
}

/// The result of one pass over every netns.
pub struct Pass {
    pub snapshots: Vec<Snapshot>,
    /// CLOCK_MONOTONIC (ns) before the first dump: tracker entries updated after it are newer
    /// than the snapshot and left alone.
    pub started_ns: u64,
    /// socket inode -> process, from [`with_owners`]; None until it ran.
    pub owners: Option<HashMap<u64, ProcInfo>>,
    /// Namespaces that could not be entered or dumped, and why.
    pub skipped: Vec<(NetnsId, String)>,
    /// The namespaces the pass was for (the dump for connects left waiting: theirs); empty
    /// for every one.
    pub only: Vec<NetnsId>,
    /// Namespaces the table had ports in that nothing holds any more (see [`pass`]).
    pub gone: Vec<NetnsId>,
}

impl Pass {
    /// True if the pass was for namespace `netns`: it dumped it, skipped it, or did not find
    /// it (gone).
    pub fn covers(&self, netns: NetnsId) -> bool {
        self.only.is_empty() || self.only.contains(&netns)
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Sockets added to the table.
    pub added: usize,
    /// Table entries the kernel no longer has.
    pub removed: usize,
    /// Table entries whose state the kernel reports differently (a missed transition).
    pub corrected: usize,
    /// Of `removed` and `corrected`, the entries the table held in a live state (not
    /// TIME_WAIT): a state change of a socket holding a port that reached the agent in no
    /// record — lost to a full ring, or one the kernel ran no program for (see the README,
    /// Loss). A TIME_WAIT entry the kernel lacks is not counted: the kernel ends TIME_WAIT early
    /// on its own (a reused tuple, a full `tcp_max_tw_buckets`).
    pub repaired: usize,
    /// Table entries forgotten with their namespace, gone (see [`Pass::gone`]).
    pub gone: usize,
}

/// A state a socket holds a port in that only a record can end.
fn live(state: u8) -> bool {
    u32::from(state) != st::TIME_WAIT
}

/// Sockets that hold a local port as a client: drops listeners and the accepted side of
/// connections to a local listener (they share the listener's port, not an ephemeral one).
pub fn client_side(all: Vec<DiagSocket>) -> Vec<DiagSocket> {
    let listening: HashSet<u16> = all
        .iter()
        .filter(|s| u32::from(s.state) == st::LISTEN)
        .map(|s| s.sport)
        .collect();
    all.into_iter()
        .filter(|s| {
            let state = u32::from(s.state);
            state != st::LISTEN
                && state != st::SYN_RECV
                && state != st::NEW_SYN_RECV
                && !listening.contains(&s.sport)
        })
        .collect()
}

/// Dumps every netns (or only `only`, when not empty). Blocking: run it off the event loop. The
/// sockets' processes are looked for apart: see [`lacking_owners`] and [`with_owners`].
///
/// `tracked`: the namespaces the table has ports in. Those of them the pass is for that it does
/// not find, and that no thread or mount holds either ([`netns::held_elsewhere`]), are `gone`: a
/// namespace's sockets die with it, and the records of their ends may have been lost (a full
/// ring), which no later pass could otherwise correct. Nothing is gone if the listing failed,
/// or if it cannot see every process (the agent in a pid namespace of its own).
pub fn pass(only: &[NetnsId], now_ns: u64, tracked: &[NetnsId]) -> Pass {
    let mut snapshots = Vec::new();
    let mut skipped = Vec::new();
    let own = netns::self_id().ok();
    let (namespaces, listed) = match netns::discover() {
        Ok(n) => (n, true),
        Err(e) => {
            tracing::warn!("listing network namespaces: {e}");
            (Vec::new(), false)
        }
    };
    let sees_all = listed && !tracked.is_empty() && procfs::host_pids() == Some(true);
    let mut missing: HashSet<NetnsId> = tracked
        .iter()
        .copied()
        .filter(|id| sees_all && (only.is_empty() || only.contains(id)))
        .collect();
    for ns in &namespaces {
        missing.remove(&ns.id);
    }
    let held = netns::held_elsewhere(&missing);
    let gone: Vec<NetnsId> = missing.difference(&held).copied().collect();
    for ns in namespaces {
        if !only.is_empty() && !only.contains(&ns.id) {
            continue;
        }
        let states = sockdiag::ALL_BUT_LISTEN | (1 << st::LISTEN);
        // Our own namespace needs no setns(), hence no CAP_SYS_ADMIN (`snapshot` unprivileged).
        // The port settings too, while in there: one setns() a namespace a pass (reading them
        // apart took a /proc scan to find each namespace again, on the event loop).
        let dump = move || (sockdiag::dump_tcp(states), PortSettings::read());
        let dumped = if own == Some(ns.id) {
            Ok(dump())
        } else {
            netns::run_in(&ns.path, ns.id, dump)
        };
        match dumped {
            Ok((Ok(all), settings)) => snapshots.push(Snapshot {
                netns: ns.id,
                sockets: client_side(all),
                settings: settings
                    .inspect_err(|e| {
                        tracing::debug!("port settings of netns {}: {e}", ns.id);
                    })
                    .ok(),
            }),
            Ok((Err(e), _)) => {
                tracing::warn!("sock_diag in netns {} failed: {e}", ns.id);
                skipped.push((ns.id, format!("sock_diag: {e}")));
            }
            Err(e) => {
                tracing::debug!("entering netns {} ({}): {e}", ns.id, ns.path.display());
                skipped.push((ns.id, format!("entering {}: {e}", ns.path.display())));
            }
        }
    }
    Pass {
        snapshots,
        started_ns: now_ns,
        owners: None,
        skipped,
        only: only.to_vec(),
        gone,
    }
}

/// The inodes of the sockets that applying `pass` to `tracker` would add and whose process can
/// be found: live ones (timewait and orphaned sockets have no inode) the tracker does not hold.
/// In a steady state the tracker holds every live socket from its records, a periodic pass adds
/// none, and the /proc walk behind [`with_owners`] (a readlink for every descriptor on the host:
/// a quarter of a CPU second with 76,000 of them here) is not made at all.
pub fn lacking_owners(tracker: &Tracker, pass: &Pass) -> HashSet<u64> {
    pass.snapshots
        .iter()
        .flat_map(|snap| {
            snap.sockets
                .iter()
                .filter(|s| s.inode != 0 && tracker.would_seed(&dest_of(snap.netns, s), s.sport))
        })
        .map(|s| s.inode)
        .collect()
}

/// `pass` with the process behind each socket inode of `wanted`, looked for in the processes of
/// `first` before the others (see [`procfs::socket_owners`]).
pub fn with_owners(mut pass: Pass, wanted: &HashSet<u64>, first: &[u32]) -> Pass {
    let began = std::time::Instant::now();
    let found = procfs::socket_owners(wanted, first).unwrap_or_else(|e| {
        tracing::warn!("attributing sockets to processes: {e}");
        procfs::Owners::default()
    });
    let missing = wanted.len().saturating_sub(found.found.len());
    if found.denied > 0 && missing > 0 {
        warn_denied(found.denied, missing);
    }
    let owners = found.found;
    tracing::debug!(
        "found the processes of {} of {} sockets in /proc in {:?} ({} processes looked at first)",
        owners.len(),
        wanted.len(),
        began.elapsed(),
        first.len()
    );
    pass.owners = Some(owners);
    pass
}

/// Says, once a run (then at debug level: a resync every 10 s would repeat it), that sockets
/// were left without an owner because processes' descriptors could not be read: without it,
/// live ports charged to pid 0 read as the TIME_WAIT that pid 0 usually is.
fn warn_denied(denied: usize, missing: usize) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let text = format!(
        "could not read the open files of {denied} processes (permission denied: reading another user's or a more privileged process' /proc/<pid>/fd needs root with CAP_SYS_PTRACE); {missing} live sockets have no known owner and are charged to pid 0, (unknown)"
    );
    if WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::debug!("{text}");
    } else {
        tracing::warn!("{text}");
    }
}

/// A pass with the process of every live socket it found (`snapshot`, `doctor`).
pub fn pass_with_owners(only: &[NetnsId], now_ns: u64) -> Pass {
    let pass = pass(only, now_ns, &[]);
    let wanted = lacking_owners(&Tracker::new(), &pass);
    with_owners(pass, &wanted, &[])
}

fn dest_of(netns: NetnsId, s: &DiagSocket) -> DestKey {
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_canonical(),
        v4 => v4,
    };
    DestKey {
        netns,
        proto: IPPROTO_TCP as u8,
        saddr: canon(s.saddr),
        daddr: canon(s.daddr),
        dport: s.dport,
    }
}

fn owner_of(s: &DiagSocket, owners: Option<&HashMap<u64, ProcInfo>>) -> Owner {
    match owners.and_then(|o| o.get(&s.inode)) {
        Some(p) if s.inode != 0 => Owner {
            pid: p.pid,
            comm: Comm::new(&p.comm),
        },
        _ => Owner::UNKNOWN,
    }
}

/// Folds a pass into the tracker. Entries the kernel no longer has are removed, missing ones
/// added, in the namespaces that were dumped; entries touched by an event after the pass began
/// are newer than the snapshot and kept as they are.
pub fn apply(tracker: &mut Tracker, pass: &Pass) -> Applied {
    let mut applied = Applied::default();
    for snap in &pass.snapshots {
        let mut kernel: HashSet<(DestKey, u16)> = HashSet::with_capacity(snap.sockets.len());
        for s in &snap.sockets {
            let dest = dest_of(snap.netns, s);
            kernel.insert((dest, s.sport));
            let tw_left = u64::from(s.expires_ms) * 1_000_000;
            let state = s.held_state();
            if tracker.seed(
                dest,
                s.sport,
                state,
                owner_of(s, pass.owners.as_ref()),
                pass.started_ns,
                tw_left,
            ) {
                applied.added += 1;
            } else if let Some(held) =
                tracker.correct(dest, s.sport, state, pass.started_ns, tw_left)
            {
                applied.corrected += 1;
                applied.repaired += usize::from(live(held));
            }
        }
        let gone: Vec<(DestKey, u16)> = tracker
            .conns_in(snap.netns)
            .filter(|(d, p, _, updated)| *updated < pass.started_ns && !kernel.contains(&(*d, *p)))
            .map(|(d, p, _, _)| (d, p))
            .collect();
        for (d, p) in gone {
            if let Some(held) = tracker.forget(&d, p) {
                applied.removed += 1;
                applied.repaired += usize::from(live(held));
            }
        }
    }
    for &netns in &pass.gone {
        let stale: Vec<(DestKey, u16)> = tracker
            .conns_in(netns)
            .filter(|(_, _, _, updated)| *updated < pass.started_ns)
            .map(|(d, p, _, _)| (d, p))
            .collect();
        for (d, p) in stale {
            if tracker.forget(&d, p).is_some() {
                applied.gone += 1;
            }
        }
    }
    applied
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoder::{Comm, Opening, StateChange, Task};

    fn sock(state: u32, sport: u16, dport: u16, inode: u64) -> DiagSocket {
        DiagSocket {
            family: libc::AF_INET as u16,
            state: state as u8,
            timer: if state == st::TIME_WAIT { 3 } else { 0 },
            saddr: "127.0.0.1".parse().unwrap(),
            sport,
            daddr: "127.0.0.1".parse().unwrap(),
            dport,
            inode,
            uid: 0,
            expires_ms: 0,
            cookie: 0,
        }
    }

    /// A pass begun at `started_ns` that dumped namespace 1 only, no owners looked for.
    fn pass_in_netns_1(sockets: Vec<DiagSocket>, started_ns: u64) -> Pass {
        Pass {
            snapshots: vec![Snapshot {
                settings: None,
                netns: 1,
                sockets,
            }],
            started_ns,
            owners: None,
            skipped: vec![],
            only: vec![],
            gone: vec![],
        }
    }

    #[test]
    fn accepted_and_listening_sockets_are_not_clients() {
        let all = vec![
            sock(st::LISTEN, 9000, 0, 1),
            sock(st::ESTABLISHED, 9000, 40000, 2), // accepted side
            sock(st::ESTABLISHED, 40000, 9000, 3), // client
            sock(st::TIME_WAIT, 40002, 9000, 0),   // client TIME_WAIT
        ];
        let c = client_side(all);
        assert_eq!(
            c.iter().map(|s| s.sport).collect::<Vec<_>>(),
            vec![40000, 40002]
        );
    }

    #[test]
    fn apply_seeds_with_owners_and_removes_what_the_kernel_lost() {
        let mut t = Tracker::new();
        let mut owners = HashMap::new();
        owners.insert(
            3,
            ProcInfo {
                pid: 77,
                comm: "hog".into(),
            },
        );
        let first = Pass {
            owners: Some(owners),
            ..pass_in_netns_1(
                vec![
                    sock(st::ESTABLISHED, 40000, 9000, 3),
                    sock(st::TIME_WAIT, 40002, 9000, 0),
                ],
                10,
            )
        };
        assert_eq!(
            apply(&mut t, &first),
            Applied {
                added: 2,
                removed: 0,
                corrected: 0,
                repaired: 0,
                gone: 0,
            }
        );
        let key = dest_of(1, &sock(st::ESTABLISHED, 40000, 9000, 3));
        let d = t.dest(&key).unwrap();
        let h = d.holders_ranked();
        assert_eq!((h[0].0, h[0].1.ports), (0, 1), "TIME_WAIT has no owner");
        assert!(h.iter().any(|(pid, _)| *pid == 77));
        assert_eq!((d.resync_net, d.resync_live_net), (2, 1), "not growth");
        // Next pass: the ESTABLISHED socket is gone.
        let second = pass_in_netns_1(vec![sock(st::TIME_WAIT, 40002, 9000, 0)], 20);
        assert_eq!(
            apply(&mut t, &second),
            Applied {
                added: 0,
                removed: 1,
                corrected: 0,
                repaired: 1,
                gone: 0,
            }
        );
        assert_eq!(t.tracked(), 1);
        let d = t.dest(&key).unwrap();
        assert_eq!((d.resync_net, d.resync_live_net), (1, 0));
    }

    #[test]
    fn a_timewait_socket_in_substate_fin_wait2_holds_its_port_as_time_wait() {
        // An orphan in FIN_WAIT2 (closed first, the peer has not closed): the kernel reports
        // a timewait socket with its substate, FIN_WAIT2, and its timer.
        let orphan = |sport| DiagSocket {
            state: st::FIN_WAIT2 as u8,
            timer: 3,
            expires_ms: 20_000,
            ..sock(st::FIN_WAIT2, sport, 9000, 0)
        };
        let full_fin_wait2 = DiagSocket {
            timer: 2,
            ..sock(st::FIN_WAIT2, 40003, 9000, 5)
        };
        const SEC: u64 = 1_000_000_000;
        let mut t = Tracker::new();
        let pass = pass_in_netns_1(vec![orphan(40001), full_fin_wait2], SEC);
        assert_eq!(apply(&mut t, &pass).added, 2);
        let key = dest_of(1, &orphan(40001));
        let d = t.dest(&key).unwrap();
        assert_eq!(d.by_state[st::TIME_WAIT as usize], 1, "the orphan");
        assert_eq!(
            d.by_state[st::FIN_WAIT2 as usize],
            1,
            "a full socket in FIN_WAIT2"
        );
        t.expire(SEC + 20 * SEC - 1);
        assert_eq!(t.tracked(), 2, "the timewait timer has 20 s left");
        t.expire(SEC + 20 * SEC);
        assert_eq!(t.tracked(), 1, "the orphan's port freed with its timer");

        // Records saw the orphan end (FIN_WAIT2 -> CLOSE: TIME_WAIT); a later pass that
        // dumps it does not correct it to FIN_WAIT2.
        let mut t = Tracker::new();
        t.seed(key, 40002, st::FIN_WAIT2 as u8, Owner::UNKNOWN, 5, 0);
        t.on_state(&closed(40002, st::FIN_WAIT2));
        let later = pass_in_netns_1(vec![orphan(40002)], 20);
        assert_eq!(apply(&mut t, &later), Applied::default());
        let d = t.dest(&key).unwrap();
        assert_eq!(d.by_state[st::TIME_WAIT as usize], 1);
    }

    #[test]
    fn owners_are_looked_for_only_for_live_sockets_a_pass_would_add() {
        let mut t = Tracker::with_limit(2);
        let live = sock(st::ESTABLISHED, 40000, 9000, 3);
        let pass_of = |sockets| pass_in_netns_1(sockets, 10);
        let none = HashSet::new();
        // Timewait and orphaned sockets have no inode: no process to find.
        let no_inode = pass_of(vec![
            sock(st::TIME_WAIT, 40002, 9000, 0),
            sock(st::FIN_WAIT1, 40004, 9000, 0),
        ]);
        assert_eq!(lacking_owners(&t, &no_inode), none);
        let with_live = pass_of(vec![live.clone(), sock(st::TIME_WAIT, 40002, 9000, 0)]);
        assert_eq!(lacking_owners(&t, &with_live), HashSet::from([3]));
        // The same tuple in another namespace is another socket.
        let mut elsewhere = pass_of(vec![sock(st::ESTABLISHED, 40000, 9000, 5)]);
        elsewhere.snapshots[0].netns = 2;
        t.seed(
            dest_of(1, &live),
            40000,
            st::ESTABLISHED as u8,
            Owner::UNKNOWN,
            5,
            0,
        );
        assert_eq!(lacking_owners(&t, &with_live), none, "the tracker holds it");
        assert_eq!(lacking_owners(&t, &elsewhere), HashSet::from([5]));
        // At the socket limit a pass adds nothing, so it needs no owners either.
        let other = sock(st::SYN_SENT, 40006, 9000, 4);
        t.seed(
            dest_of(1, &other),
            40006,
            st::SYN_SENT as u8,
            Owner::UNKNOWN,
            5,
            0,
        );
        assert_eq!(t.tracked(), 2);
        assert_eq!(lacking_owners(&t, &elsewhere), none);
    }

    #[test]
    fn only_live_entries_the_kernel_moved_on_count_as_repaired() {
        let mut t = Tracker::new();
        let dest = dest_of(1, &sock(st::ESTABLISHED, 40000, 9000, 3));
        // FIN_WAIT1 in the table, TIME_WAIT in the kernel: its last two changes came in no
        // record. FIN_WAIT2 in the table, gone from the kernel: its end came in none.
        t.seed(dest, 40000, st::FIN_WAIT1 as u8, Owner::UNKNOWN, 5, 0);
        t.seed(dest, 40001, st::FIN_WAIT2 as u8, Owner::UNKNOWN, 5, 0);
        // TIME_WAIT in the table: 40002 gone from the kernel (a reused tuple, say), not a lost
        // record; 40003 in TIME_WAIT there too, nothing to do.
        for sport in [40002, 40003] {
            let tw = st::TIME_WAIT as u8;
            t.seed(dest, sport, tw, Owner::UNKNOWN, 5, 30_000_000_000);
        }
        let pass = pass_in_netns_1(
            vec![
                sock(st::TIME_WAIT, 40000, 9000, 0),
                sock(st::TIME_WAIT, 40003, 9000, 0),
            ],
            10,
        );
        assert_eq!(
            apply(&mut t, &pass),
            Applied {
                added: 0,
                removed: 2,
                corrected: 1,
                repaired: 2,
                gone: 0,
            }
        );
        assert_eq!(t.tracked(), 2);
    }

    #[test]
    fn entries_newer_than_the_snapshot_are_kept() {
        let mut t = Tracker::new();
        let dest = dest_of(1, &sock(st::ESTABLISHED, 40000, 9000, 3));
        t.seed(dest, 40000, st::ESTABLISHED as u8, Owner::UNKNOWN, 50, 0);
        let pass = pass_in_netns_1(vec![], 40);
        assert_eq!(apply(&mut t, &pass).removed, 0);
        assert_eq!(t.tracked(), 1);
    }

    /// The record of a socket's change to CLOSE from `old`, in namespace 1 towards port 9000.
    fn closed(sport: u16, old: u32) -> StateChange {
        StateChange {
            ts_ns: 15,
            task: Task {
                pid: 0,
                tid: 0,
                comm: Comm::new(""),
            },
            opening: Opening::No,
            skaddr: 0xffff_0000 + u64::from(sport),
            netns: 1,
            old,
            new: st::CLOSE,
            saddr: "127.0.0.1".parse().unwrap(),
            sport,
            daddr: "127.0.0.1".parse().unwrap(),
            dport: 9000,
        }
    }

    #[test]
    fn sockets_whose_end_was_read_during_the_pass_are_not_added_back() {
        let mut t = Tracker::new();
        let dest = dest_of(1, &sock(st::ESTABLISHED, 40000, 9000, 3));
        t.seed(dest, 40000, st::ESTABLISHED as u8, Owner::UNKNOWN, 5, 0);
        t.seed(dest, 40001, st::FIN_WAIT2 as u8, Owner::UNKNOWN, 5, 0);
        t.pass_begins();
        // The dump (begun at 10) saw all four; then these records were read: an RST, a close
        // into TIME_WAIT, and the end of a socket whose opening record was lost.
        t.on_state(&closed(40000, st::ESTABLISHED));
        t.on_state(&closed(40001, st::FIN_WAIT2));
        t.on_state(&closed(40002, st::ESTABLISHED));
        let pass = pass_in_netns_1(
            vec![
                sock(st::ESTABLISHED, 40000, 9000, 3),
                sock(st::FIN_WAIT2, 40001, 9000, 4),
                sock(st::ESTABLISHED, 40002, 9000, 5),
                // Live, and no record brought it: the one socket the pass is for.
                sock(st::ESTABLISHED, 40003, 9000, 6),
            ],
            10,
        );
        assert_eq!(lacking_owners(&t, &pass), HashSet::from([6]));
        assert_eq!(
            apply(&mut t, &pass),
            Applied {
                added: 1,
                removed: 0,
                corrected: 0,
                repaired: 0,
                gone: 0,
            }
        );
        t.pass_ends();
        let d = t.dest(&dest).unwrap();
        assert_eq!(d.in_use, 2, "40001 in TIME_WAIT and 40003");
        assert_eq!(d.by_state[st::TIME_WAIT as usize], 1);
        // Once the pass is applied nothing is held back: the same snapshot again (as if a
        // later pass still saw them) adds both.
        assert_eq!(apply(&mut t, &pass).added, 2);
    }

    #[test]
    fn a_pass_for_some_namespaces_covers_only_them() {
        let mut p = pass_in_netns_1(vec![], 1);
        assert!(p.covers(7), "a pass for every namespace");
        p.only = vec![3, 5];
        assert!(p.covers(5));
        assert!(!p.covers(7));
    }

    #[test]
    fn a_pass_names_the_tracked_namespaces_nothing_holds_any_more() {
        let Ok(own) = netns::self_id() else {
            eprintln!("skipped: no /proc/thread-self/ns/net");
            return;
        };
        // Inode 1 is some file system's root directory, never a namespace's.
        let p = pass(&[own, 1], 1, &[own, 1, 7]);
        assert_eq!(p.gone, vec![1], "7 is not what the pass is for");
        let p = pass(&[own], 1, &[own]);
        assert!(p.gone.is_empty());
    }

    #[test]
    fn a_gone_namespaces_entries_are_forgotten_unless_a_record_is_newer() {
        let mut t = Tracker::new();
        let here = dest_of(1, &sock(st::ESTABLISHED, 40000, 9000, 3));
        let gone = dest_of(2, &sock(st::ESTABLISHED, 40000, 9000, 3));
        t.seed(here, 40000, st::ESTABLISHED as u8, Owner::UNKNOWN, 5, 0);
        t.seed(gone, 40000, st::ESTABLISHED as u8, Owner::UNKNOWN, 5, 0);
        t.seed(gone, 40001, st::FIN_WAIT1 as u8, Owner::UNKNOWN, 5, 0);
        // Placed by a record read after the pass began (at 10).
        t.seed(gone, 40002, st::ESTABLISHED as u8, Owner::UNKNOWN, 15, 0);
        assert_eq!(t.namespaces(), vec![1, 2]);
        let pass = Pass {
            gone: vec![2],
            ..pass_in_netns_1(vec![sock(st::ESTABLISHED, 40000, 9000, 3)], 10)
        };
        assert_eq!(
            apply(&mut t, &pass),
            Applied {
                gone: 2,
                ..Applied::default()
            }
        );
        assert_eq!(t.dest(&here).map(|d| d.in_use), Some(1));
        assert_eq!(t.dest(&gone).map(|d| d.in_use), Some(1), "the newer one");
    }

    #[test]
    fn a_pass_reads_each_namespaces_port_settings_while_in_it() {
        // Our own namespace: no setns, no privileges needed.
        let Ok(own) = netns::self_id() else {
            eprintln!("skipped: no /proc/thread-self/ns/net");
            return;
        };
        let p = pass(&[own], 1, &[]);
        let Some(snap) = p.snapshots.iter().find(|s| s.netns == own) else {
            eprintln!("skipped: sock_diag refused here: {:?}", p.skipped);
            return;
        };
        assert_eq!(snap.settings, PortSettings::read().ok());
        assert!(snap.settings.is_some());
    }
}
