//! The live table: which ephemeral ports are in use, per destination, by state and by process.
//!
//! A connection's budget is the usable port range per (netns, protocol, source IP, destination IP,
//! destination port) — the [`DestKey`] — because `connect()` only needs the 4-tuple to be unique.
//! Per-destination counts and per-holder counts are updated incrementally on every transition, so
//! an event costs O(1) and a report needs no scan.
//!
//! Ownership: `sock:inet_sock_set_state` often fires in softirq context, where the current task
//! is unrelated to the socket. The owner is learned once, at CLOSE->SYN_SENT (inside connect(), in
//! process context), and carried by socket address until the port is known, then by tuple.
//!
//! TIME_WAIT: the tracepoint never shows it — the socket goes FIN_WAIT2 (or CLOSING) -> CLOSE and
//! a timewait socket takes over. Such a port is kept, still charged to its last owner, for
//! `TCP_TIMEWAIT_LEN` (60 s), in a min-heap by expiry; [`crate::seed`] corrects the table against
//! sock_diag periodically (an RST in FIN_WAIT2 means no timewait socket). Nor is there one once
//! the namespace holds `tcp_max_tw_buckets` of them (the kernel closes the socket instead, and
//! its port is free): the same FIN_WAIT2 -> CLOSE then frees the port once the table holds that
//! many TIME_WAIT entries in the namespace. (The kernel counts its server-side ones too, which
//! the table leaves out: until the next resync the table may still keep a few it refused, never
//! more than the cap.)
use std::{
    cell::Cell,
    cmp::Reverse,
    collections::{hash_map::Entry, HashMap},
    net::IpAddr,
    sync::Arc,
};

/// The maps looked up per event (the tracker's, the failure lines', the identity cache's) hash
/// with foldhash (randomly seeded per map): several lookups per event make std's SipHash a
/// measurable share of the agent's cost under a connect storm.
pub type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

use portx_common::{tcp_state as st, IPPROTO_TCP};

use crate::{
    decoder::{Comm, Opening, PortAssigned, StateChange, SyscallFailure, Task},
    sysctl::PortSettings,
    time_wait::TimeWaitQueue,
};

/// `TCP_TIMEWAIT_LEN` (include/net/tcp.h): hard-coded 60 s on Linux.
pub const TIME_WAIT_NS: u64 = 60 * 1_000_000_000;

/// Number of slots in per-state arrays (TCP states are 1..=12).
pub const STATES: usize = 13;

/// Cap of [`Tracker`]'s owners-without-tuple map; past it the map is cleared (a socket whose
/// owner was there is then placed without one, shown as unknown).
pub const MAX_ORPHAN_OWNERS: usize = 4096;

/// Most tuples [`Tracker::pass_begins`] remembers closed while a sock_diag pass is under way
/// (some 60 bytes each with the map's own, 16 MiB at most: a pass takes milliseconds, or a /proc
/// walk's few hundred of them, against a storm's ~100k closes a second). Past it the pass adds
/// no socket.
pub const MAX_CLOSED_IN_PASS: usize = 1 << 18;

/// A destination: the scope within which source ports must be unique.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DestKey {
    pub netns: u32,
    pub proto: u8,
    pub saddr: IpAddr,
    pub daddr: IpAddr,
    pub dport: u16,
}

impl DestKey {
    pub fn target(&self) -> Target {
        Target {
            netns: self.netns,
            proto: self.proto,
            daddr: self.daddr,
            dport: self.dport,
        }
    }
}

/// What a `connect()` names: a destination without the source address routing will choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub netns: u32,
    pub proto: u8,
    pub daddr: IpAddr,
    pub dport: u16,
}

impl Target {
    /// What a failed TCP `connect()` named.
    pub fn of_connect(f: &SyscallFailure) -> Self {
        Target {
            netns: f.netns,
            proto: IPPROTO_TCP as u8,
            daddr: f.addr,
            dport: f.port,
        }
    }
}

/// The process charged with a port. `pid == 0` means unknown (e.g. a TIME_WAIT socket that
/// existed before the agent started: timewait sockets have no inode, hence no process).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    pub pid: u32,
    pub comm: Comm,
}

impl Owner {
    pub const UNKNOWN: Owner = Owner {
        pid: 0,
        comm: Comm([0; 16]),
    };

    /// The task a record written by the connecting thread carries.
    fn of(task: &Task) -> Owner {
        Owner {
            pid: task.pid,
            comm: task.comm,
        }
    }
}

/// Ports one process holds for one destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    pub comm: Comm,
    /// All ports, TIME_WAIT included.
    pub ports: u32,
    pub time_wait: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DestStats {
    /// Ports in use by TCP state (index = state number).
    pub by_state: [u32; STATES],
    pub in_use: u32,
    /// By pid.
    pub holders: Map<u32, Holder>,
    /// Connections seen taking a port here since the destination was created (rates:
    /// [`crate::forecast`]). Sockets a resync finds ([`Tracker::seed`]) are not counted: they
    /// were not seen connecting, and a TIME_WAIT socket the kernel keeps past the 60 s this
    /// table ages it out at (its timer fires late) is found again.
    pub opened: u64,
    /// Ports seen entering TIME_WAIT here since it was created (not those a resync finds).
    pub tw_entered: u64,
    /// Of `in_use`, ports `connect()` cannot pick in this namespace (outside
    /// `ip_local_port_range`, or reserved): bound explicitly, they do not fill the range. 0
    /// while the namespace's settings are unknown (see [`Tracker::set_port_settings`]).
    pub outside_range: u32,
    /// What resyncs did to [`DestStats::in_range`] since the destination was created: ports
    /// they added ([`Tracker::seed`]) minus those they removed ([`Tracker::forget`]). A
    /// resync's correction after lost records is not growth ([`crate::forecast`]).
    pub resync_net: i64,
    /// The same for live ports (not TIME_WAIT), state corrections included.
    pub resync_live_net: i64,
}

impl DestStats {
    /// Ports in use that `connect()` could have picked: what fills the range.
    pub fn in_range(&self) -> u32 {
        self.in_use.saturating_sub(self.outside_range)
    }

    /// Holders, most ports first (ties: lower pid first, for stable output).
    pub fn holders_ranked(&self) -> Vec<(u32, Holder)> {
        let mut v: Vec<(u32, Holder)> = self.holders.iter().map(|(p, h)| (*p, *h)).collect();
        v.sort_by_key(|(pid, h)| (Reverse(h.ports), *pid));
        v
    }
}

/// Key of [`Tracker::conns`]: a destination's id (see [`Tracker::dest_ids`]) and a source port,
/// packed into 8 bytes.
type ConnKey = u64;

fn conn_key(dest_id: u32, sport: u16) -> ConnKey {
    (u64::from(dest_id) << 16) | u64::from(sport)
}

fn key_parts(key: ConnKey) -> (u32, u16) {
    ((key >> 16) as u32, key as u16)
}

/// One tracked port, 16 bytes: with its 8-byte key a million fit in about 50 MiB, hash table
/// included. The owner's comm lives once per (destination, pid) in [`DestStats::holders`].
#[derive(Clone, Copy, Debug)]
struct Conn {
    /// Last change (monotonic ns) + `TIME_WAIT_NS`: in TIME_WAIT, the expiry. A socket seeded
    /// or corrected into TIME_WAIT gets the kernel's own expiry instead.
    stamp_ns: u64,
    /// Low 32 bits of the kernel socket address with bit 0 set (sockets are 8-byte aligned), or
    /// 0 for sockets learned from sock_diag. Only compared between sockets with the same tuple.
    sk_low: u32,
    /// `pid << 8 | state`: Linux pids stay below 2^22 (`PID_MAX_LIMIT`).
    pid_state: u32,
}

impl Conn {
    fn new(pid: u32, state: u8, skaddr: u64, stamp_ns: u64) -> Conn {
        Conn {
            stamp_ns,
            sk_low: sk_low(skaddr),
            pid_state: (pid.min(0x00ff_ffff) << 8) | u32::from(state),
        }
    }
    fn pid(&self) -> u32 {
        self.pid_state >> 8
    }
    /// When it last changed (for a seeded TIME_WAIT socket: when it entered TIME_WAIT, or 0).
    fn updated_ns(&self) -> u64 {
        self.stamp_ns.saturating_sub(TIME_WAIT_NS)
    }
    fn state(&self) -> u8 {
        self.pid_state as u8
    }
    fn set_state(&mut self, state: u8) {
        self.pid_state = (self.pid_state & !0xff) | u32::from(state);
    }
    /// Moves to `state`, changed at `stamp_ns` (see `stamp_ns`); returns the state it left.
    fn change(&mut self, state: u8, stamp_ns: u64) -> u8 {
        let old = self.state();
        self.set_state(state);
        self.stamp_ns = stamp_ns;
        old
    }
    fn set_pid(&mut self, pid: u32) {
        self.pid_state = (pid.min(0x00ff_ffff) << 8) | (self.pid_state & 0xff);
    }
}

fn sk_low(skaddr: u64) -> u32 {
    if skaddr == 0 {
        0
    } else {
        skaddr as u32 | 1
    }
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    dest: DestKey,
    owner: Owner,
    /// When connect() began (monotonic ns).
    since_ns: u64,
}

/// A connect whose outcome was never seen this long (its records were lost) is forgotten by
/// [`Tracker::expire`]. SYN_SENT gives up after about 2 minutes with default `tcp_syn_retries`.
pub const PENDING_MAX_NS: u64 = 10 * 60 * 1_000_000_000;

/// Counters of events the tracker could not place; reported, never silently dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackerCounters {
    /// State changes of sockets never seen connecting: pre-existing and unseeded, or accepted
    /// from a listener whose backlog is 0 (the kernel side leaves out the others it accepts).
    pub untracked: u64,
    /// TIME_WAIT entries that aged out.
    pub time_wait_expired: u64,
    /// Sockets placed through an owner from a port event because their CLOSE->SYN_SENT was not
    /// seen.
    pub recovered: u64,
    /// TIME_WAIT entries dropped, oldest first, to stay within the socket limit.
    pub evicted: u64,
    /// Sockets not tracked because the limit was reached with no TIME_WAIT entry to evict.
    pub over_limit: u64,
}

/// A destination in use, or kept a while after its last port was freed (see
/// [`Tracker::sweep_idle`]), and its counts.
struct DestSlot {
    key: DestKey,
    stats: DestStats,
    /// Its namespace's port settings, if known.
    ports: Option<Arc<PortSettings>>,
    /// `stats.opened` at the previous [`Tracker::sweep_idle`].
    opened_at_sweep: u64,
    /// The sweep that first saw `opened_at_sweep` (monotonic ns): no connection since.
    quiet_since_ns: u64,
}

/// A destination with no port in use is kept while it had a new connection within this long
/// (the rates' smoothing time): a health checker that connects every few seconds keeps its
/// rates instead of starting over at each probe.
pub const KEEP_EMPTY_NS: u64 = 10 * 1_000_000_000;
/// Past this many destinations kept with no port in use, one whose last port is freed goes at
/// once: the socket limit bounds the destinations in use, this the rest.
pub const MAX_KEPT_EMPTY: usize = 4096;
/// Sweeps closer together than this do nothing (ticks that fire back to back after a stall).
const SWEEP_EVERY_NS: u64 = 900_000_000;

impl DestSlot {
    fn outside_range(&self, sport: u16) -> bool {
        self.ports.as_ref().is_some_and(|p| !p.ephemeral(sport))
    }
}

#[derive(Default)]
pub struct Tracker {
    conns: Map<ConnKey, Conn>,
    /// connect()s in SYN_SENT whose port is not known yet, by socket address.
    pending: Map<u64, Pending>,
    /// Owners learned from a port event (process context) for sockets whose CLOSE->SYN_SENT the
    /// kernel skipped (a program cannot nest in itself on one CPU): the next state change, which
    /// carries the tuple, places the socket. In kprobe mode a socket bound before its connect
    /// gets a port record too though its CLOSE->SYN_SENT carried the port: its owner waits here
    /// until the socket closes. Bounded by [`MAX_ORPHAN_OWNERS`].
    orphan_owners: Map<u64, Owner>,
    /// Destinations kept (in use, or kept a while after, see [`Tracker::sweep_idle`]), by id
    /// (an index into `dest_slots`).
    dest_ids: Map<DestKey, u32>,
    /// The destination last looked up in `dest_ids`, and its id: a storm's records name one
    /// destination over and over, and comparing a key is cheaper than hashing it (the hashing
    /// and probing were ~15 % of the agent's CPU under the RST storm). Cleared when that id is
    /// released.
    last_dest: Cell<Option<(DestKey, u32)>>,
    dest_slots: Vec<Option<DestSlot>>,
    free_dest_ids: Vec<u32>,
    /// Source addresses in use per target, to find the destination a failed connect() meant.
    targets: Map<Target, Vec<IpAddr>>,
    /// When TIME_WAIT entries are due.
    time_wait: TimeWaitQueue,
    /// TIME_WAIT entries by namespace, against its `tcp_max_tw_buckets`.
    time_wait_by_netns: Map<u32, u32>,
    /// Port settings by namespace, as the agent last read them (for `outside_range`).
    port_settings: Map<u32, Arc<PortSettings>>,
    /// Most sockets tracked at once (0: no limit).
    limit: usize,
    /// When [`Tracker::sweep_idle`] last ran (monotonic ns).
    last_sweep_ns: u64,
    /// While a sock_diag pass is under way: the tuples a record closed meanwhile (see
    /// [`Tracker::pass_begins`]).
    closed_in_pass: Option<ClosedInPass>,
    pub counters: TrackerCounters,
}

/// Tuples closed by a record since a sock_diag pass began, up to [`MAX_CLOSED_IN_PASS`].
#[derive(Default)]
struct ClosedInPass {
    tuples: Map<(DestKey, u16), ()>,
    /// More closed than could be remembered: the pass cannot tell which of its sockets are gone.
    overflowed: bool,
}

impl Tracker {
    /// A tracker without a limit on sockets.
    pub fn new() -> Self {
        Self::default()
    }

    /// A tracker that keeps at most `max_sockets`: past it, the oldest TIME_WAIT entries make
    /// room for new connections (counted as `evicted`); with none left, new sockets are not
    /// tracked (`over_limit`). Sockets from sock_diag ([`Tracker::seed`]) are only added below
    /// the limit.
    pub fn with_limit(max_sockets: usize) -> Self {
        Self {
            limit: max_sockets,
            ..Self::default()
        }
    }

    pub fn on_state(&mut self, e: &StateChange) {
        let dest = DestKey {
            netns: e.netns,
            proto: IPPROTO_TCP as u8,
            saddr: e.saddr,
            daddr: e.daddr,
            dport: e.dport,
        };
        if e.new == st::CLOSE && self.closed_in_pass.is_some() {
            self.closed_during_pass(dest, e);
        }
        match e.opening {
            Opening::No => {}
            Opening::InThread => {
                // The connecting thread's record of its socket's first change out of SYN_SENT:
                // the connect and its outcome in one record.
                let owner = Owner::of(&e.task);
                if e.sport != 0 && e.new != st::CLOSE {
                    self.open(dest, e.sport, e.new as u8, owner, e.skaddr, stamp(e.ts_ns));
                }
                return;
            }
            Opening::AtExit => {
                self.opened_at_exit(dest, e);
                return;
            }
        }
        if e.old == st::CLOSE && e.new == st::SYN_SENT {
            let owner = Owner::of(&e.task);
            if e.sport != 0 && !self.held_by_another(&dest, e.sport, e.skaddr) {
                // bind() chose the port before connect().
                self.open(
                    dest,
                    e.sport,
                    st::SYN_SENT as u8,
                    owner,
                    e.skaddr,
                    stamp(e.ts_ns),
                );
            } else {
                self.pending.insert(
                    e.skaddr,
                    Pending {
                        dest,
                        owner,
                        since_ns: e.ts_ns,
                    },
                );
            }
            return;
        }
        if let Some(p) = self.pending.remove(&e.skaddr) {
            // First transition after connect() began: SYN_SENT->ESTABLISHED carries the port;
            // SYN_SENT->CLOSE with port 0 is a failed allocation, with a port a refused connect.
            if e.sport != 0 && e.new != st::CLOSE {
                self.open(
                    p.dest,
                    e.sport,
                    e.new as u8,
                    p.owner,
                    e.skaddr,
                    stamp(e.ts_ns),
                );
            } else if e.sport != 0 {
                self.close_found_waiting(&p.dest, e.sport);
            }
            return;
        }
        // Past the namespace's tcp_max_tw_buckets a close out of FIN_WAIT2 or CLOSING leaves
        // no timewait socket. (Looked up only for such a record, not for every close.)
        let time_wait_full = e.new == st::CLOSE
            && matches!(e.old, st::FIN_WAIT2 | st::CLOSING)
            && self.time_wait_full(dest.netns);
        // One lookup for the socket's entry: it is read, changed or removed through it.
        let found = match self.key_of(&dest, e.sport).map(|key| self.conns.entry(key)) {
            Some(Entry::Occupied(entry)) => Some(entry),
            _ => None,
        };
        let Some(mut entry) = found else {
            if let Some(owner) = self.orphan_owners.remove(&e.skaddr) {
                if e.sport != 0 && e.new != st::CLOSE {
                    self.counters.recovered += 1;
                    self.open(dest, e.sport, e.new as u8, owner, e.skaddr, stamp(e.ts_ns));
                    return;
                }
            }
            if e.old == st::SYN_SENT && e.sport != 0 && e.new != st::CLOSE {
                // A connect whose handshake completed in softirq before its connect() returned
                // (tracepoint mode: the record that names its owner follows, see
                // `opened_at_exit`), or whose first record was lost: its port is in use
                // either way, owner unknown until a record names it.
                self.open(
                    dest,
                    e.sport,
                    e.new as u8,
                    Owner::UNKNOWN,
                    e.skaddr,
                    stamp(e.ts_ns),
                );
                return;
            }
            self.counters.untracked += 1;
            return;
        };
        let key = *entry.key();
        let conn = entry.get_mut();
        if conn.sk_low != 0 && conn.sk_low != sk_low(e.skaddr) {
            // Another socket with this tuple (e.g. the accepting side of a loopback connection).
            self.counters.untracked += 1;
            return;
        }
        if conn.sk_low == 0 {
            // Seeded from sock_diag: adopt the socket address now that an event names it.
            conn.sk_low = sk_low(e.skaddr);
        }
        if e.new == st::CLOSE && !self.orphan_owners.is_empty() {
            self.orphan_owners.remove(&e.skaddr);
        }
        // The record's old state counts too: with FIN_WAIT1->FIN_WAIT2's record lost (a full
        // ring, a run the kernel skipped) the table still says FIN_WAIT1, and the port, which
        // the kernel holds in TIME_WAIT, would be freed and its closer forgotten.
        let from = |state: u32| matches!(state, st::FIN_WAIT2 | st::CLOSING);
        let new = if e.new == st::CLOSE {
            match conn.state() as u32 {
                old if (from(old) || from(e.old)) && !time_wait_full => st::TIME_WAIT,
                _ => {
                    let conn = entry.remove();
                    self.closed(key, conn);
                    return;
                }
            }
        } else {
            e.new
        };
        let old = conn.change(new as u8, stamp(e.ts_ns));
        let pid = conn.pid();
        self.restated(key, pid, old, new as u8, stamp(e.ts_ns));
    }

    /// True if another socket holds `sport` to `dest`: then a socket bound to that port cannot
    /// connect there (the 4-tuple is taken) unless the entry is stale or, in TIME_WAIT, the
    /// kernel lets it be taken again (`tcp_tw_reuse`). Its CLOSE->SYN_SENT waits in `pending`
    /// for the port record or its first change with a port instead of displacing the holder,
    /// and a failed connect ends it there. (A TIME_WAIT holder displaced at once was lost when
    /// the kernel refused the reuse: the SYN_SENT->CLOSE that followed freed the port the
    /// TIME_WAIT socket still held, and the report of the failure it caused named no holder.)
    fn held_by_another(&self, dest: &DestKey, sport: u16, skaddr: u64) -> bool {
        self.key_of(dest, sport)
            .and_then(|key| self.conns.get(&key))
            .is_some_and(|c| c.sk_low != sk_low(skaddr))
    }

    /// A pending connect ended (SYN_SENT->CLOSE with its port: refused, timed out): the entry
    /// a sock_diag pass made for it, if one did — a connect left waiting in SYN_SENT is dumped
    /// by the connect notes before any record gives its port (IPv6 in fentry and kprobe mode) —
    /// goes with it. Only such an entry: no record has named its socket yet, and it waits in
    /// SYN_SENT; a holder a bound socket collided with is in another state, or named.
    fn close_found_waiting(&mut self, dest: &DestKey, sport: u16) {
        let Some(key) = self.key_of(dest, sport) else {
            return;
        };
        if let Entry::Occupied(entry) = self.conns.entry(key) {
            let c = entry.get();
            if c.sk_low == 0 && c.state() as u32 == st::SYN_SENT {
                let conn = entry.remove();
                self.closed(key, conn);
            }
        }
    }

    /// A connect's first record, written when connect() returned with the port it got and the
    /// state the socket was in then: the socket's changes in other contexts came before it, and
    /// opened it without an owner (see `on_state`); this names the owner and keeps the state.
    fn opened_at_exit(&mut self, dest: DestKey, e: &StateChange) {
        let owner = Owner::of(&e.task);
        if let Some(key) = self.key_of(&dest, e.sport) {
            if self
                .conns
                .get(&key)
                .is_some_and(|c| c.sk_low == sk_low(e.skaddr))
            {
                self.adopt(key, owner);
                return;
            }
        }
        if e.sport != 0 && e.new != st::CLOSE {
            self.open(dest, e.sport, e.new as u8, owner, e.skaddr, stamp(e.ts_ns));
        }
    }

    pub fn on_port(&mut self, e: &PortAssigned) {
        if e.ret != 0 || e.sport == 0 {
            // A failed allocation: the connect() failure record (or SYN_SENT->CLOSE) that
            // follows ends the pending entry.
            return;
        }
        if let Some(p) = self.pending.remove(&e.skaddr) {
            self.open(
                p.dest,
                e.sport,
                st::SYN_SENT as u8,
                p.owner,
                e.skaddr,
                stamp(e.ts_ns),
            );
        } else {
            // CLOSE->SYN_SENT was not seen; this event comes from connect() in process context,
            // so its task is the owner.
            if self.orphan_owners.len() >= MAX_ORPHAN_OWNERS {
                self.orphan_owners.clear();
            }
            self.orphan_owners.insert(e.skaddr, Owner::of(&e.task));
        }
    }

    /// A connect() failed: this record, which names the socket, ends its pending connect. When
    /// the port search failed the kernel writes no SYN_SENT->CLOSE for the socket, only this;
    /// for other failures (a refused connect) the state change has ended it already. (A socket
    /// that got a port has already left pending.)
    pub fn on_connect_failed(&mut self, f: &SyscallFailure) {
        if f.skaddr != 0 {
            self.pending.remove(&f.skaddr);
        }
    }

    /// Ages TIME_WAIT entries out. Looks only at entries that are due: O(expired · log n).
    pub fn expire(&mut self, now_ns: u64) {
        // In-flight connects: few, so a scan is cheap.
        self.pending
            .retain(|_, p| now_ns.saturating_sub(p.since_ns) < PENDING_MAX_NS);
        while let Some((id, sport)) = self.time_wait.pop_due(now_ns) {
            let key = conn_key(id, sport);
            // The tuple may have been reused since this entry was queued: age out only a socket
            // that is in TIME_WAIT and due by its own stamp (a later one has its own entry).
            if let Some(c) = self.conns.get(&key) {
                if c.state() as u32 == st::TIME_WAIT && c.stamp_ns <= now_ns {
                    self.close(key);
                    self.counters.time_wait_expired += 1;
                }
            }
        }
    }

    /// Adds a socket found by sock_diag, unless the table already has that tuple or is full
    /// ([`Tracker::would_seed`]).
    /// `time_wait_left_ns` is the kernel's remaining TIME_WAIT time (state TIME_WAIT only).
    pub fn seed(
        &mut self,
        dest: DestKey,
        sport: u16,
        state: u8,
        owner: Owner,
        now_ns: u64,
        time_wait_left_ns: u64,
    ) -> bool {
        if !self.would_seed(&dest, sport) {
            return false;
        }
        let Some(id) = self.place(
            dest,
            sport,
            state,
            owner,
            0,
            kernel_stamp(state, now_ns, time_wait_left_ns),
        ) else {
            return false;
        };
        self.resynced(id, sport, state, 1);
        true
    }

    /// Counts a port a resync added (`by` 1) or removed (-1) in its destination's `resync_*`.
    fn resynced(&mut self, id: u32, sport: u16, state: u8, by: i64) {
        if let Some(slot) = self.slot_mut(id) {
            if !slot.outside_range(sport) {
                slot.stats.resync_net += by;
            }
            if u32::from(state) != st::TIME_WAIT {
                slot.stats.resync_live_net += by;
            }
        }
    }

    /// True if [`Tracker::seed`] would add the tuple: it is not tracked, the table is below
    /// its limit, and no record closed it since the pass under way began (see
    /// [`Tracker::pass_begins`]). (At the limit the table is knowingly partial: a resync does
    /// not evict what events placed; it would swap entries back and forth every pass.)
    pub fn would_seed(&self, dest: &DestKey, sport: u16) -> bool {
        let tracked = self
            .key_of(dest, sport)
            .is_some_and(|key| self.conns.contains_key(&key));
        let closed = self
            .closed_in_pass
            .as_ref()
            .is_some_and(|c| c.overflowed || c.tuples.contains_key(&(*dest, sport)));
        !tracked && !closed && (self.limit == 0 || self.conns.len() < self.limit)
    }

    /// A sock_diag pass begins: from now until [`Tracker::pass_ends`], the tuples records close
    /// are remembered, and the pass does not add them back. Its dump may have seen a socket
    /// before the record of its end was read (an RST, a passive close), and that socket holds
    /// no port any more. (A new socket on a remembered tuple whose record was lost waits for
    /// the next pass.)
    pub fn pass_begins(&mut self) {
        self.closed_in_pass = Some(ClosedInPass::default());
    }

    /// The pass begun by [`Tracker::pass_begins`] is applied (or abandoned).
    pub fn pass_ends(&mut self) {
        if self.closed_in_pass.take().is_some_and(|c| c.overflowed) {
            tracing::debug!(
                "over {MAX_CLOSED_IN_PASS} sockets closed during a sock_diag pass: it added none"
            );
        }
    }

    /// Notes the tuple of `e`, a change to CLOSE, if the socket holds no port after it (not one
    /// entering TIME_WAIT: the table keeps those, and so does the kernel).
    fn closed_during_pass(&mut self, dest: DestKey, e: &StateChange) {
        if e.sport == 0 || e.old == st::FIN_WAIT2 || e.old == st::CLOSING {
            return;
        }
        let Some(closed) = self.closed_in_pass.as_mut() else {
            return;
        };
        if closed.tuples.len() >= MAX_CLOSED_IN_PASS {
            closed.overflowed = true;
        } else {
            closed.tuples.insert((dest, e.sport), ());
        }
    }

    /// Sets a tuple to the state the kernel reports, unless an event touched it at or after
    /// `snapshot_ns` (then the event is newer than the kernel's snapshot). The owner is kept.
    /// Returns the state the table held, if it set one.
    pub fn correct(
        &mut self,
        dest: DestKey,
        sport: u16,
        state: u8,
        snapshot_ns: u64,
        time_wait_left_ns: u64,
    ) -> Option<u8> {
        let key = self.key_of(&dest, sport)?;
        match self.conns.get(&key) {
            Some(c) if c.updated_ns() < snapshot_ns && c.state() != state => {
                let held = c.state();
                let tw = |s: u8| u32::from(s) == st::TIME_WAIT;
                let live_by = i64::from(tw(held)) - i64::from(tw(state));
                self.set_state(
                    key,
                    state,
                    kernel_stamp(state, snapshot_ns, time_wait_left_ns),
                );
                let (id, _) = key_parts(key);
                if let Some(slot) = self.slot_mut(id) {
                    slot.stats.resync_live_net += live_by;
                }
                Some(held)
            }
            _ => None,
        }
    }

    /// Removes a tuple the kernel no longer has (see [`crate::seed`]); returns the state the
    /// table held it in.
    pub fn forget(&mut self, dest: &DestKey, sport: u16) -> Option<u8> {
        let key = self.key_of(dest, sport)?;
        let state = self.conns.get(&key).map(Conn::state)?;
        self.resynced(key_parts(key).0, sport, state, -1);
        self.close(key);
        Some(state)
    }

    /// Tuples of one netns with their state and the time of their last update.
    pub fn conns_in(&self, netns: u32) -> impl Iterator<Item = (DestKey, u16, u8, u64)> + '_ {
        self.conns.iter().filter_map(move |(key, c)| {
            let (id, sport) = key_parts(*key);
            let slot = self.slot(id)?;
            (slot.key.netns == netns).then_some((slot.key, sport, c.state(), c.updated_ns()))
        })
    }

    pub fn dest(&self, key: &DestKey) -> Option<&DestStats> {
        let id = self.dest_ids.get(key)?;
        self.slot(*id).map(|s| &s.stats)
    }

    /// The busiest destination a failed connect() to `target` may have meant (routing picks the
    /// source address, which the syscall does not say).
    pub fn busiest_for(&self, target: &Target) -> Option<(DestKey, &DestStats)> {
        let saddrs = self.targets.get(target)?;
        saddrs
            .iter()
            .filter_map(|s| {
                let key = DestKey {
                    netns: target.netns,
                    proto: target.proto,
                    saddr: *s,
                    daddr: target.daddr,
                    dport: target.dport,
                };
                self.dest(&key).map(|d| (key, d))
            })
            .filter(|(_, d)| d.in_use > 0)
            .max_by_key(|(k, d)| (d.in_use, Reverse(*k)))
    }

    /// Every destination with a port in use.
    pub fn dests(&self) -> impl Iterator<Item = (DestKey, &DestStats)> + '_ {
        self.kept_dests().filter(|(_, d)| d.in_use > 0)
    }

    /// The network namespaces with a port in use, each once.
    pub fn namespaces(&self) -> Vec<u32> {
        let set: std::collections::BTreeSet<u32> = self.dests().map(|(k, _)| k.netns).collect();
        set.into_iter().collect()
    }

    /// Every destination kept, also one with no port in use right now that
    /// [`Tracker::sweep_idle`] has not freed yet: what the rates sample.
    pub fn kept_dests(&self) -> impl Iterator<Item = (DestKey, &DestStats)> + '_ {
        self.dest_slots
            .iter()
            .flatten()
            .map(|slot| (slot.key, &slot.stats))
    }

    /// The `n` destinations with the most ports in use, most first.
    pub fn top(&self, n: usize) -> Vec<(DestKey, &DestStats)> {
        let mut v: Vec<(DestKey, &DestStats)> = self.dests().collect();
        v.sort_by_key(|(k, d)| (Reverse(d.in_use), *k));
        v.truncate(n);
        v
    }

    /// Everything one network namespace holds, each local port counted once (for bind() failures,
    /// which exhaust the netns, not one destination).
    pub fn netns_usage(&self, netns: u32) -> DestStats {
        let mut seen = std::collections::HashSet::new();
        let mut out = DestStats::default();
        for (key, c) in &self.conns {
            let (id, sport) = key_parts(*key);
            let Some(slot) = self.slot(id) else {
                continue;
            };
            if slot.key.netns != netns || !seen.insert((slot.key.saddr, sport)) {
                continue;
            }
            let comm = slot
                .stats
                .holders
                .get(&c.pid())
                .map_or(Comm([0; 16]), |h| h.comm);
            charge(&mut out, c.pid(), comm, c.state());
            out.outside_range += u32::from(slot.outside_range(sport));
        }
        out
    }

    pub fn tracked(&self) -> usize {
        self.conns.len()
    }

    /// Forgets the port settings of namespaces for which `alive` is false (gone).
    pub fn retain_port_settings(&mut self, alive: impl Fn(u32) -> bool) {
        self.port_settings.retain(|id, _| alive(*id));
    }

    /// The port settings of `netns` as just read: its destinations' `outside_range` follows
    /// them (recounted over the table when they change, which is rare; an event costs a
    /// comparison).
    pub fn set_port_settings(&mut self, netns: u32, settings: &PortSettings) {
        if self
            .port_settings
            .get(&netns)
            .is_some_and(|s| **s == *settings)
        {
            return;
        }
        let ports = Arc::new(settings.clone());
        self.port_settings.insert(netns, Arc::clone(&ports));
        let mut in_use = false;
        for slot in self.dest_slots.iter_mut().flatten() {
            if slot.key.netns == netns {
                slot.ports = Some(Arc::clone(&ports));
                slot.stats.outside_range = 0;
                in_use = true;
            }
        }
        if !in_use {
            // No destination there: no socket to recount (every namespace's settings come
            // here, most with nothing in the table).
            return;
        }
        for key in self.conns.keys() {
            let (id, sport) = key_parts(*key);
            if let Some(slot) = self
                .dest_slots
                .get_mut(id as usize)
                .and_then(Option::as_mut)
            {
                if slot.key.netns == netns && slot.outside_range(sport) {
                    slot.stats.outside_range += 1;
                }
            }
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    fn slot(&self, id: u32) -> Option<&DestSlot> {
        self.dest_slots.get(id as usize)?.as_ref()
    }

    fn slot_mut(&mut self, id: u32) -> Option<&mut DestSlot> {
        self.dest_slots.get_mut(id as usize)?.as_mut()
    }

    fn stats_mut(&mut self, id: u32) -> Option<&mut DestStats> {
        self.slot_mut(id).map(|s| &mut s.stats)
    }

    fn key_of(&self, dest: &DestKey, sport: u16) -> Option<ConnKey> {
        self.dest_id(dest).map(|id| conn_key(id, sport))
    }

    /// The id of `dest` if it has one.
    fn dest_id(&self, dest: &DestKey) -> Option<u32> {
        if let Some((last, id)) = self.last_dest.get() {
            if last == *dest {
                return Some(id);
            }
        }
        let id = *self.dest_ids.get(dest)?;
        self.last_dest.set(Some((*dest, id)));
        Some(id)
    }

    /// The id of `dest`, allocated (and its target noted) on first use.
    fn intern(&mut self, dest: DestKey) -> u32 {
        if let Some(id) = self.dest_id(&dest) {
            return id;
        }
        let slot = DestSlot {
            key: dest,
            stats: DestStats::default(),
            ports: self.port_settings.get(&dest.netns).cloned(),
            opened_at_sweep: 0,
            quiet_since_ns: 0,
        };
        let id = match self.free_dest_ids.pop() {
            Some(id) => {
                self.dest_slots[id as usize] = Some(slot);
                id
            }
            None => {
                self.dest_slots.push(Some(slot));
                (self.dest_slots.len() - 1) as u32
            }
        };
        self.dest_ids.insert(dest, id);
        self.last_dest.set(Some((dest, id)));
        let list = self.targets.entry(dest.target()).or_default();
        if !list.contains(&dest.saddr) {
            list.push(dest.saddr);
        }
        id
    }

    /// Frees the destinations with no port in use and no new connection for [`KEEP_EMPTY_NS`]
    /// (called once a second, before the rates are sampled; calls less than ~a second apart do
    /// nothing). A destination whose last port is freed is kept until then (up to
    /// [`MAX_KEPT_EMPTY`] of them): one whose connections come and go one at a time keeps its
    /// slot and its counters, so its rates are not restarted and no slot is allocated per
    /// connection.
    pub fn sweep_idle(&mut self, now_ns: u64) {
        if self.last_sweep_ns != 0 && now_ns.saturating_sub(self.last_sweep_ns) < SWEEP_EVERY_NS {
            return;
        }
        self.last_sweep_ns = now_ns;
        let mut idle = Vec::new();
        for (id, slot) in self.dest_slots.iter_mut().enumerate() {
            let Some(slot) = slot else {
                continue;
            };
            if slot.stats.opened != slot.opened_at_sweep || slot.quiet_since_ns == 0 {
                slot.opened_at_sweep = slot.stats.opened;
                slot.quiet_since_ns = now_ns;
            } else if slot.stats.in_use == 0
                && now_ns.saturating_sub(slot.quiet_since_ns) >= KEEP_EMPTY_NS
            {
                idle.push(id as u32);
            }
        }
        for id in idle {
            self.release(id);
        }
    }

    /// Frees a destination's id.
    fn release(&mut self, id: u32) {
        let Some(slot) = self.dest_slots.get_mut(id as usize).and_then(Option::take) else {
            return;
        };
        self.dest_ids.remove(&slot.key);
        if self.last_dest.get().is_some_and(|(_, last)| last == id) {
            self.last_dest.set(None);
        }
        self.free_dest_ids.push(id);
        let target = slot.key.target();
        if let Some(list) = self.targets.get_mut(&target) {
            list.retain(|s| *s != slot.key.saddr);
            if list.is_empty() {
                self.targets.remove(&target);
            }
        }
    }

    /// A connection seen taking `sport` (an event): placed and counted in the rates.
    fn open(
        &mut self,
        dest: DestKey,
        sport: u16,
        state: u8,
        owner: Owner,
        skaddr: u64,
        stamp_ns: u64,
    ) -> bool {
        let Some(id) = self.place(dest, sport, state, owner, skaddr, stamp_ns) else {
            return false;
        };
        if let Some(stats) = self.stats_mut(id) {
            stats.opened += 1;
            stats.tw_entered += u64::from(state as u32 == st::TIME_WAIT);
        }
        true
    }

    /// Puts a socket in the table (replacing what held its tuple) and charges its port;
    /// returns its destination's id, or None over the limit.
    fn place(
        &mut self,
        dest: DestKey,
        sport: u16,
        state: u8,
        owner: Owner,
        skaddr: u64,
        stamp_ns: u64,
    ) -> Option<u32> {
        let conn = Conn::new(owner.pid, state, skaddr, stamp_ns);
        if self.limit == 0 || self.conns.len() < self.limit {
            // Room without evicting: one lookup finds the tuple and puts the socket there.
            let id = self.intern(dest);
            let key = conn_key(id, sport);
            match self.conns.entry(key) {
                Entry::Vacant(v) => {
                    v.insert(conn);
                }
                Entry::Occupied(mut o) => {
                    let old = o.insert(conn);
                    taken_again(&dest, sport, skaddr, &old);
                    self.uncount(key, old);
                }
            }
            self.placed(id, sport, conn, owner.comm, stamp_ns);
            return Some(id);
        }
        // At the limit: a tuple taken again frees its entry first, which may be the room needed.
        if let Some(old) = self.key_of(&dest, sport) {
            if let Some(c) = self.conns.get(&old) {
                taken_again(&dest, sport, skaddr, c);
                self.close(old);
            }
        }
        if !self.make_room() {
            self.counters.over_limit += 1;
            return None;
        }
        let id = self.intern(dest);
        self.conns.insert(conn_key(id, sport), conn);
        self.placed(id, sport, conn, owner.comm, stamp_ns);
        Some(id)
    }

    /// Charges the port of a socket just put in the table.
    fn placed(&mut self, id: u32, sport: u16, conn: Conn, comm: Comm, stamp_ns: u64) {
        let state = conn.state();
        if state as u32 == st::TIME_WAIT {
            self.time_wait.push(stamp_ns, id, sport);
            self.count_time_wait(id, true);
        }
        if let Some(slot) = self.slot_mut(id) {
            charge(&mut slot.stats, conn.pid(), comm, state);
            if slot.outside_range(sport) {
                slot.stats.outside_range += 1;
            }
        }
    }

    /// Gives a socket opened without an owner its owner, in the state it is in.
    fn adopt(&mut self, key: ConnKey, owner: Owner) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.pid() != 0 || owner.pid == 0 {
            return;
        }
        conn.set_pid(owner.pid);
        let state = conn.state();
        if let Some(stats) = self.stats_mut(key_parts(key).0) {
            discharge(stats, 0, state);
            charge(stats, owner.pid, owner.comm, state);
        }
    }

    /// Below the limit, or brought below it by evicting the oldest TIME_WAIT entry.
    fn make_room(&mut self) -> bool {
        if self.limit == 0 || self.conns.len() < self.limit {
            return true;
        }
        while let Some((id, sport)) = self.time_wait.pop_earliest() {
            let key = conn_key(id, sport);
            if self.conns.get(&key).map(Conn::state) == Some(st::TIME_WAIT as u8) {
                self.close(key);
                self.counters.evicted += 1;
                return true;
            }
        }
        false
    }

    /// One TIME_WAIT entry more (`up`) or fewer in the namespace of destination `id`.
    fn count_time_wait(&mut self, id: u32, up: bool) {
        let Some(netns) = self.slot(id).map(|s| s.key.netns) else {
            return;
        };
        match self.time_wait_by_netns.entry(netns) {
            Entry::Occupied(mut n) if !up => {
                *n.get_mut() = n.get().saturating_sub(1);
                if *n.get() == 0 {
                    n.remove();
                }
            }
            Entry::Occupied(mut n) => *n.get_mut() += 1,
            Entry::Vacant(v) if up => {
                v.insert(1);
            }
            Entry::Vacant(_) => {}
        }
    }

    /// TIME_WAIT entries the table holds in `netns`.
    pub fn time_wait_in(&self, netns: u32) -> u32 {
        self.time_wait_by_netns.get(&netns).copied().unwrap_or(0)
    }

    /// Whether the table holds as many TIME_WAIT entries in `netns` as its
    /// `tcp_max_tw_buckets` (once the agent has read it): the kernel keeps no more.
    fn time_wait_full(&self, netns: u32) -> bool {
        self.port_settings
            .get(&netns)
            .and_then(|p| p.max_tw_buckets)
            .is_some_and(|cap| u64::from(self.time_wait_in(netns)) >= cap)
    }

    fn set_state(&mut self, key: ConnKey, new: u8, stamp_ns: u64) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let old = conn.change(new, stamp_ns);
        let pid = conn.pid();
        self.restated(key, pid, old, new, stamp_ns);
    }

    /// Counts a change of `pid`'s socket at `key` from `old` to `new` (the entry already changed).
    fn restated(&mut self, key: ConnKey, pid: u32, old: u8, new: u8, stamp_ns: u64) {
        let (id, sport) = key_parts(key);
        if new as u32 == st::TIME_WAIT {
            self.time_wait.push(stamp_ns, id, sport);
        }
        let tw = |s: u8| s as u32 == st::TIME_WAIT;
        if tw(old) != tw(new) {
            self.count_time_wait(id, tw(new));
        }
        if let Some(stats) = self.stats_mut(id) {
            restate(stats, pid, old, new);
            stats.tw_entered += u64::from(new as u32 == st::TIME_WAIT && old != new);
        }
    }

    fn close(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            self.closed(key, conn);
        }
    }

    /// Frees the port of a socket just taken out of the table.
    fn closed(&mut self, key: ConnKey, conn: Conn) {
        let id = self.uncount(key, conn);
        // Kept for the sweep (its rates go on), unless too many are kept already: the
        // destinations in use are at most the sockets, and the others at most this many more.
        if self.stats_mut(id).is_some_and(|s| s.in_use == 0)
            && self.dest_ids.len() > self.conns.len() + MAX_KEPT_EMPTY
        {
            self.release(id);
        }
    }

    /// Takes a socket's port out of its destination's counts; returns the destination's id.
    fn uncount(&mut self, key: ConnKey, conn: Conn) -> u32 {
        let (id, sport) = key_parts(key);
        if conn.state() as u32 == st::TIME_WAIT {
            self.count_time_wait(id, false);
        }
        if let Some(slot) = self.slot_mut(id) {
            if slot.outside_range(sport) {
                slot.stats.outside_range = slot.stats.outside_range.saturating_sub(1);
            }
            discharge(&mut slot.stats, conn.pid(), conn.state());
        }
        id
    }
}

/// A port taken by a new socket while the table still has it: it was in TIME_WAIT
/// (tcp_tw_reuse; loopback connects were seen taking TIME_WAIT ports with tcp_tw_reuse=0 too,
/// confirmed by ss) or the entry was stale. The new socket replaces the old entry.
fn taken_again(dest: &DestKey, sport: u16, skaddr: u64, old: &Conn) {
    tracing::debug!(
        "port {sport} to {:?}:{} taken again by sk {skaddr:#x} (was state {} sk_low {:#x} pid {})",
        dest.daddr,
        dest.dport,
        old.state(),
        old.sk_low,
        old.pid()
    );
}

/// The stamp of a change at `ts_ns` seen in an event.
fn stamp(ts_ns: u64) -> u64 {
    ts_ns.saturating_add(TIME_WAIT_NS)
}

/// The stamp of a state the kernel reported at `now_ns`: in TIME_WAIT with `left_ns` to go,
/// its expiry.
fn kernel_stamp(state: u8, now_ns: u64, left_ns: u64) -> u64 {
    if state as u32 == st::TIME_WAIT {
        now_ns.saturating_add(left_ns.min(TIME_WAIT_NS))
    } else {
        stamp(now_ns)
    }
}

/// Counts a port `pid` holds in `state` (one holder lookup).
fn charge(stats: &mut DestStats, pid: u32, comm: Comm, state: u8) {
    if let Some(slot) = stats.by_state.get_mut(state as usize) {
        *slot = slot.saturating_add(1);
    }
    stats.in_use = stats.in_use.saturating_add(1);
    let holder = stats.holders.entry(pid).or_insert(Holder {
        comm,
        ports: 0,
        time_wait: 0,
    });
    holder.ports = holder.ports.saturating_add(1);
    holder.time_wait = holder.time_wait.saturating_add(time_wait(state));
}

/// Uncounts a port `pid` held in `state`; the holder goes with its last port (one lookup).
fn discharge(stats: &mut DestStats, pid: u32, state: u8) {
    if let Some(slot) = stats.by_state.get_mut(state as usize) {
        *slot = slot.saturating_sub(1);
    }
    stats.in_use = stats.in_use.saturating_sub(1);
    if let Entry::Occupied(mut holder) = stats.holders.entry(pid) {
        let h = holder.get_mut();
        h.ports = h.ports.saturating_sub(1);
        h.time_wait = h.time_wait.saturating_sub(time_wait(state));
        if h.ports == 0 {
            holder.remove();
        }
    }
}

/// Moves a port `pid` holds from state `old` to `new`: the holder keeps it (one lookup; a
/// holder the counts lack is made, without a comm, as a port counted out and in again would).
fn restate(stats: &mut DestStats, pid: u32, old: u8, new: u8) {
    if let Some(slot) = stats.by_state.get_mut(old as usize) {
        *slot = slot.saturating_sub(1);
    }
    if let Some(slot) = stats.by_state.get_mut(new as usize) {
        *slot = slot.saturating_add(1);
    }
    let holder = stats.holders.entry(pid).or_insert(Holder {
        comm: Comm::default(),
        ports: 1,
        time_wait: time_wait(old),
    });
    holder.time_wait = holder
        .time_wait
        .saturating_sub(time_wait(old))
        .saturating_add(time_wait(new));
}

/// 1 for TIME_WAIT, else 0.
fn time_wait(state: u8) -> u32 {
    u32::from(state as u32 == st::TIME_WAIT)
}

/// Name of a TCP state as `ss` and the kernel print it.
pub fn state_name(state: u32) -> &'static str {
    match state {
        st::ESTABLISHED => "ESTABLISHED",
        st::SYN_SENT => "SYN_SENT",
        st::SYN_RECV => "SYN_RECV",
        st::FIN_WAIT1 => "FIN_WAIT1",
        st::FIN_WAIT2 => "FIN_WAIT2",
        st::TIME_WAIT => "TIME_WAIT",
        st::CLOSE => "CLOSE",
        st::CLOSE_WAIT => "CLOSE_WAIT",
        st::LAST_ACK => "LAST_ACK",
        st::LISTEN => "LISTEN",
        st::CLOSING => "CLOSING",
        st::NEW_SYN_RECV => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoder::Task;

    const NS: u32 = 4026532000;
    const SEC: u64 = 1_000_000_000;

    fn task(pid: u32, comm: &str) -> Task {
        Task {
            pid,
            tid: pid,
            comm: Comm::new(comm),
        }
    }

    fn ev(sk: u64, old: u32, new: u32, sport: u16, t: Task, ts: u64) -> StateChange {
        StateChange {
            ts_ns: ts,
            task: t,
            opening: Opening::No,
            skaddr: sk,
            netns: NS,
            old,
            new,
            saddr: "10.0.0.1".parse().unwrap(),
            sport,
            daddr: "10.0.0.2".parse().unwrap(),
            dport: 80,
        }
    }

    fn dest() -> DestKey {
        DestKey {
            netns: NS,
            proto: 6,
            saddr: "10.0.0.1".parse().unwrap(),
            daddr: "10.0.0.2".parse().unwrap(),
            dport: 80,
        }
    }

    #[test]
    fn a_pass_with_more_ends_than_it_can_remember_adds_nothing() {
        let mut t = Tracker::new();
        let fresh = DestKey { dport: 1, ..dest() };
        t.pass_begins();
        let mut closed = 0;
        'all: for dport in 2..u16::MAX {
            for sport in 1..u16::MAX {
                if closed > MAX_CLOSED_IN_PASS {
                    break 'all;
                }
                let e = ev(1, st::ESTABLISHED, st::CLOSE, sport, task(0, ""), 1);
                t.on_state(&StateChange { dport, ..e });
                closed += 1;
            }
        }
        assert!(
            !t.would_seed(&fresh, 40000),
            "which ended is no longer known"
        );
        t.pass_ends();
        assert!(t.would_seed(&fresh, 40000));
        assert!(t.would_seed(&DestKey { dport: 2, ..dest() }, 1));
    }

    /// connect() from `owner`, handshake completed in softirq while `irq` was current.
    fn connect(t: &mut Tracker, sk: u64, port: u16, owner: Task, ts: u64) {
        let irq = task(999, "ksoftirqd/0");
        t.on_state(&ev(sk, st::CLOSE, st::SYN_SENT, 0, owner, ts));
        t.on_state(&ev(sk, st::SYN_SENT, st::ESTABLISHED, port, irq, ts));
    }

    fn active_close(t: &mut Tracker, sk: u64, port: u16, ts: u64) {
        let irq = task(999, "swapper/1");
        t.on_state(&ev(sk, st::ESTABLISHED, st::FIN_WAIT1, port, irq, ts));
        t.on_state(&ev(sk, st::FIN_WAIT1, st::FIN_WAIT2, port, irq, ts));
        t.on_state(&ev(sk, st::FIN_WAIT2, st::CLOSE, port, irq, ts));
    }

    /// connect() and an RST close: the port is free again at once.
    fn connect_and_reset(t: &mut Tracker, sk: u64, port: u16, ts: u64) {
        connect(t, sk, port, task(10, "prober"), ts);
        t.on_state(&ev(sk, st::ESTABLISHED, st::CLOSE, port, task(0, "x"), ts));
    }

    #[test]
    fn a_destination_whose_connections_come_one_at_a_time_keeps_its_rate() {
        // A health checker: 100 connections a second to one destination, each reset before the
        // next, so no port is in use at any sampling. Its churn is still 100 a second.
        let mut t = Tracker::new();
        let mut rates = crate::forecast::Rates::new();
        let mut sk = 1;
        for second in 0..30u64 {
            for i in 0..100 {
                connect_and_reset(&mut t, sk, 40000 + (sk % 16) as u16, second * SEC + i);
                sk += 1;
            }
            let now = (second + 1) * SEC;
            t.sweep_idle(now);
            // A tick that fires right after the one before (after a stall) frees nothing.
            t.sweep_idle(now + 1_000_000);
            rates.sample(now, t.kept_dests());
        }
        let (_, stats) = t.kept_dests().next().expect("kept while it is busy");
        assert_eq!((stats.in_use, stats.opened), (0, 3000));
        assert_eq!(t.dests().count(), 0, "listed only with a port in use");
        let f = rates
            .forecast(&dest(), stats, None, None, None)
            .expect("sampled");
        assert!(
            (f.churn_per_s - 100.0).abs() < 10.0,
            "churn {} a second, not 100",
            f.churn_per_s
        );
        // Idle: freed once no connection came for KEEP_EMPTY_NS (the last sweep that saw one
        // was at 30 s).
        t.sweep_idle(39 * SEC);
        assert!(t.dest(&dest()).is_some());
        t.sweep_idle(40 * SEC);
        assert!(t.dest(&dest()).is_none());
    }

    #[test]
    fn a_destination_freed_and_used_again_gets_an_id_of_its_own() {
        // The last destination looked up is remembered with its id: once that id is freed,
        // neither the destination's next connection nor one to another destination that
        // is handed the id may find it there.
        let mut t = Tracker::new();
        connect_and_reset(&mut t, 1, 40000, SEC);
        t.sweep_idle(SEC);
        t.sweep_idle(2 * SEC + KEEP_EMPTY_NS);
        assert!(t.dest(&dest()).is_none(), "freed");
        connect(&mut t, 2, 40001, task(10, "a"), 20 * SEC);
        assert_eq!(t.dest(&dest()).map(|s| s.in_use), Some(1));
        let other = |e: StateChange| StateChange { dport: 443, ..e };
        t.on_state(&other(ev(
            3,
            st::CLOSE,
            st::SYN_SENT,
            0,
            task(11, "b"),
            20 * SEC,
        )));
        t.on_state(&other(ev(
            3,
            st::SYN_SENT,
            st::ESTABLISHED,
            40001,
            task(0, "x"),
            20 * SEC,
        )));
        let b = DestKey {
            dport: 443,
            ..dest()
        };
        assert_eq!(t.dest(&b).map(|s| s.in_use), Some(1));
        t.on_state(&ev(
            2,
            st::ESTABLISHED,
            st::CLOSE,
            40001,
            task(0, "x"),
            21 * SEC,
        ));
        assert_eq!(t.dest(&dest()).map(|s| s.in_use), Some(0));
        assert_eq!(
            t.dest(&b).map(|s| s.in_use),
            Some(1),
            "the other's port stays"
        );
        assert_eq!(t.tracked(), 1);
    }

    #[test]
    fn a_destination_probed_every_few_seconds_is_kept_between_probes() {
        let mut t = Tracker::new();
        let mut rates = crate::forecast::Rates::new();
        for second in 1..=60u64 {
            if second % 3 == 0 {
                connect_and_reset(&mut t, second, 40000, second * SEC);
            }
            t.sweep_idle(second * SEC);
            rates.sample(second * SEC, t.kept_dests());
            if second >= 3 {
                assert_eq!(
                    t.kept_dests().count(),
                    1,
                    "freed between probes at {second} s"
                );
            }
        }
        let stats = t.dest(&dest()).expect("kept");
        let f = rates
            .forecast(&dest(), stats, None, None, None)
            .expect("sampled");
        assert!(
            (f.churn_per_s - 1.0 / 3.0).abs() < 0.1,
            "churn {} a second, not 1/3",
            f.churn_per_s
        );
    }

    #[test]
    fn destinations_kept_with_no_port_in_use_are_bounded() {
        // A scan: one short connection to each of many destinations, no sweep meanwhile.
        let mut t = Tracker::new();
        for i in 0..(MAX_KEPT_EMPTY as u64 + 100) {
            let e = StateChange {
                dport: 1 + i as u16,
                ..ev(i + 1, st::CLOSE, st::SYN_SENT, 0, task(7, "scan"), SEC)
            };
            t.on_state(&e);
            t.on_state(&StateChange {
                old: st::SYN_SENT,
                new: st::ESTABLISHED,
                sport: 40000,
                ..e
            });
            t.on_state(&StateChange {
                old: st::ESTABLISHED,
                new: st::CLOSE,
                sport: 40000,
                ..e
            });
        }
        assert_eq!(t.tracked(), 0);
        assert!(
            t.dest_ids.len() <= MAX_KEPT_EMPTY + 1,
            "{} destinations kept",
            t.dest_ids.len()
        );
        assert_eq!(t.kept_dests().count(), t.dest_ids.len());
    }

    #[test]
    fn owner_is_learned_at_connect_not_from_softirq() {
        let mut t = Tracker::new();
        connect(&mut t, 1, 40000, task(10, "hog"), 0);
        let d = t.dest(&dest()).expect("destination tracked");
        assert_eq!(d.in_use, 1);
        assert_eq!(d.by_state[st::ESTABLISHED as usize], 1);
        let holders = d.holders_ranked();
        assert_eq!(holders.len(), 1);
        assert_eq!(holders[0].0, 10);
        assert_eq!(holders[0].1.comm.as_str(), "hog");
    }

    /// A record the connecting thread wrote, flagged as opening its connect.
    fn opening(
        sk: u64,
        old: u32,
        new: u32,
        port: u16,
        owner: Task,
        how: Opening,
        ts: u64,
    ) -> StateChange {
        StateChange {
            opening: how,
            ..ev(sk, old, new, port, owner, ts)
        }
    }

    #[test]
    fn a_connect_opened_by_its_threads_own_record_needs_no_close_to_syn_sent() {
        let mut t = Tracker::new();
        let hog = task(10, "hog");
        let inthread = Opening::InThread;
        t.on_state(&opening(
            1,
            st::SYN_SENT,
            st::ESTABLISHED,
            40000,
            hog,
            inthread,
            0,
        ));
        // Refused within the call: nothing held.
        t.on_state(&opening(
            2,
            st::SYN_SENT,
            st::CLOSE,
            40001,
            hog,
            inthread,
            0,
        ));
        let d = t.dest(&dest()).expect("destination tracked");
        assert_eq!((d.in_use, d.by_state[st::ESTABLISHED as usize]), (1, 1));
        assert_eq!(d.holders_ranked()[0].0, 10);
        assert_eq!(d.holders_ranked()[0].1.comm.as_str(), "hog");
        assert_eq!((t.pending(), t.counters.untracked), (0, 0));
        t.on_state(&ev(1, st::ESTABLISHED, st::CLOSE, 40000, task(0, ""), 1));
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn a_handshake_done_in_softirq_before_connect_returned_gets_its_owner_at_the_exit() {
        let mut t = Tracker::new();
        let irq = task(0, "");
        // The SYN-ACK handled in softirq while the thread slept in connect(): no owner yet,
        // but the port is in use.
        t.on_state(&ev(1, st::SYN_SENT, st::ESTABLISHED, 40000, irq, 0));
        let d = t.dest(&dest()).expect("tracked without an owner");
        assert_eq!((d.in_use, d.holders_ranked()[0].0), (1, 0));
        // connect() returns: the owner, and the state the socket is in then.
        let at_exit = Opening::AtExit;
        let owner = task(50, "client");
        t.on_state(&opening(
            1,
            st::CLOSE,
            st::ESTABLISHED,
            40000,
            owner,
            at_exit,
            1,
        ));
        let d = t.dest(&dest()).expect("tracked");
        assert_eq!((d.in_use, d.by_state[st::ESTABLISHED as usize]), (1, 1));
        let holders = d.holders_ranked();
        assert_eq!(holders.len(), 1, "{holders:?}");
        assert_eq!((holders[0].0, holders[0].1.ports), (50, 1));
        assert_eq!(t.counters.untracked, 0);
        // The owner stays through the socket's later changes.
        t.on_state(&ev(1, st::ESTABLISHED, st::FIN_WAIT1, 40000, irq, 2));
        let d = t.dest(&dest()).expect("tracked");
        assert_eq!(d.holders_ranked()[0].0, 50);
        assert_eq!(d.by_state[st::FIN_WAIT1 as usize], 1);
    }

    #[test]
    fn a_connect_first_recorded_at_its_exit_is_opened_then() {
        let mut t = Tracker::new();
        let at_exit = Opening::AtExit;
        // A non-blocking connect, still in SYN_SENT when connect() returned.
        let owner = task(60, "proxy");
        t.on_state(&opening(
            1,
            st::CLOSE,
            st::SYN_SENT,
            40000,
            owner,
            at_exit,
            0,
        ));
        let d = t.dest(&dest()).expect("tracked");
        assert_eq!(
            (d.by_state[st::SYN_SENT as usize], d.holders_ranked()[0].0),
            (1, 60)
        );
        t.on_state(&ev(1, st::SYN_SENT, st::ESTABLISHED, 40000, task(0, ""), 1));
        let d = t.dest(&dest()).expect("tracked");
        assert_eq!((d.in_use, d.by_state[st::ESTABLISHED as usize]), (1, 1));
        // Another socket on the same tuple at exit (the old one's records lost): the new one
        // replaces it, with its owner.
        t.on_state(&opening(
            2,
            st::CLOSE,
            st::SYN_SENT,
            40000,
            task(61, "b"),
            at_exit,
            2,
        ));
        let d = t.dest(&dest()).expect("tracked");
        assert_eq!((d.in_use, d.holders_ranked()[0].0), (1, 61));
        // A socket closed again by then holds nothing.
        t.on_state(&opening(3, st::CLOSE, st::CLOSE, 40002, owner, at_exit, 3));
        assert_eq!(t.tracked(), 1);
    }

    #[test]
    fn failed_allocation_and_refused_connect_hold_nothing() {
        let mut t = Tracker::new();
        let v = task(20, "victim");
        t.on_state(&ev(5, st::CLOSE, st::SYN_SENT, 0, v, 0));
        t.on_state(&ev(5, st::SYN_SENT, st::CLOSE, 0, v, 0));
        t.on_state(&ev(6, st::CLOSE, st::SYN_SENT, 0, v, 0));
        t.on_state(&ev(6, st::SYN_SENT, st::CLOSE, 40001, v, 0));
        assert_eq!(t.tracked(), 0);
        assert_eq!(t.pending(), 0);
        assert!(t.dest(&dest()).is_none());
    }

    #[test]
    fn a_connect_failure_record_ends_the_pending_connect_of_its_socket() {
        let mut t = Tracker::new();
        let v = task(20, "victim");
        let failure = |sk| SyscallFailure {
            ts_ns: 0,
            task: v,
            skaddr: sk,
            netns: NS,
            errno: 99,
            addr: "10.0.0.2".parse().unwrap(),
            port: 80,
            tally: Default::default(),
            protocol: Some(portx_common::IPPROTO_TCP),
            bound_port: 0,
        };
        t.on_state(&ev(5, st::CLOSE, st::SYN_SENT, 0, v, 0));
        t.on_state(&ev(6, st::CLOSE, st::SYN_SENT, 0, v, 0));
        // Socket 5's port search failed (no SYN_SENT->CLOSE for it): its failure record names it.
        t.on_connect_failed(&failure(0));
        assert_eq!(t.pending(), 2, "a record without a socket ends nothing");
        t.on_connect_failed(&failure(5));
        assert_eq!(t.pending(), 1);
        t.on_state(&ev(6, st::SYN_SENT, st::ESTABLISHED, 40002, v, 0));
        assert_eq!(t.pending(), 0);
        assert_eq!(t.tracked(), 1);
    }

    #[test]
    fn port_event_gives_the_port_before_the_handshake() {
        let mut t = Tracker::new();
        t.on_state(&ev(7, st::CLOSE, st::SYN_SENT, 0, task(30, "nb"), 0));
        t.on_port(&PortAssigned {
            ts_ns: 0,
            task: task(30, "nb"),
            skaddr: 7,
            netns: NS,
            ret: 0,
            sport: 40002,
            source: 1,
        });
        let d = t.dest(&dest()).unwrap();
        assert_eq!(d.by_state[st::SYN_SENT as usize], 1);
        // The handshake completes later in softirq: same entry, now ESTABLISHED.
        t.on_state(&ev(
            7,
            st::SYN_SENT,
            st::ESTABLISHED,
            40002,
            task(1, "x"),
            1,
        ));
        let d = t.dest(&dest()).unwrap();
        assert_eq!((d.in_use, d.by_state[st::ESTABLISHED as usize]), (1, 1));
    }

    #[test]
    fn active_close_leaves_time_wait_charged_to_the_closer_for_60s() {
        let mut t = Tracker::new();
        for i in 0..16u16 {
            connect(&mut t, 100 + i as u64, 40000 + i, task(40, "churner"), 0);
            active_close(&mut t, 100 + i as u64, 40000 + i, SEC);
        }
        let d = t.dest(&dest()).unwrap();
        assert_eq!(d.in_use, 16);
        assert_eq!(d.by_state[st::TIME_WAIT as usize], 16);
        let h = d.holders_ranked();
        assert_eq!((h[0].0, h[0].1.ports, h[0].1.time_wait), (40, 16, 16));
        t.expire(SEC + TIME_WAIT_NS - 1);
        assert_eq!(t.tracked(), 16, "nothing expires before 60 s");
        t.expire(SEC + TIME_WAIT_NS);
        assert_eq!(t.tracked(), 0);
        assert_eq!(t.dests().count(), 0, "no port in use");
        t.sweep_idle(SEC + TIME_WAIT_NS);
        t.sweep_idle(SEC + TIME_WAIT_NS + KEEP_EMPTY_NS);
        assert!(t.dest(&dest()).is_none());
        assert_eq!(t.counters.time_wait_expired, 16);
    }

    #[test]
    fn past_tcp_max_tw_buckets_a_close_frees_its_port() {
        let mut t = Tracker::new();
        t.set_port_settings(
            NS,
            &PortSettings {
                range: (40000, 40015),
                reserved: vec![],
                tw_reuse: 0,
                max_tw_buckets: Some(10),
                timestamps: None,
                tw_reuse_delay_ms: None,
            },
        );
        for i in 0..16u16 {
            connect(&mut t, 100 + i as u64, 40000 + i, task(40, "churner"), 0);
            active_close(&mut t, 100 + i as u64, 40000 + i, SEC);
        }
        let d = t.dest(&dest()).unwrap();
        assert_eq!((d.in_use, d.by_state[st::TIME_WAIT as usize]), (10, 10));
        assert_eq!(
            d.tw_entered, 10,
            "the rate counts TIME_WAIT the kernel kept"
        );
        assert_eq!(t.time_wait_in(NS), 10);
        // They age out: the next close has its TIME_WAIT again.
        t.expire(SEC + TIME_WAIT_NS);
        assert_eq!(t.time_wait_in(NS), 0);
        connect(&mut t, 200, 40000, task(40, "churner"), 2 * SEC);
        active_close(&mut t, 200, 40000, 2 * SEC);
        assert_eq!(t.time_wait_in(NS), 1);
        // A TIME_WAIT entry taken over by a new socket (tcp_tw_reuse) leaves the count.
        connect(&mut t, 201, 40000, task(41, "again"), 3 * SEC);
        assert_eq!(t.time_wait_in(NS), 0);
        // Without the setting read, nothing is refused.
        let mut t = Tracker::new();
        for i in 0..16u16 {
            connect(&mut t, 100 + i as u64, 40000 + i, task(40, "churner"), 0);
            active_close(&mut t, 100 + i as u64, 40000 + i, SEC);
        }
        assert_eq!(t.time_wait_in(NS), 16);
    }

    #[test]
    fn a_close_from_fin_wait2_enters_time_wait_with_fin_wait2_s_record_lost() {
        let mut t = Tracker::new();
        connect(&mut t, 1, 40000, task(40, "churner"), 0);
        let irq = task(999, "swapper/1");
        t.on_state(&ev(1, st::ESTABLISHED, st::FIN_WAIT1, 40000, irq, SEC));
        // FIN_WAIT1->FIN_WAIT2 lost.
        t.on_state(&ev(1, st::FIN_WAIT2, st::CLOSE, 40000, irq, SEC));
        let d = t.dest(&dest()).unwrap();
        assert_eq!((d.in_use, d.by_state[st::TIME_WAIT as usize]), (1, 1));
        let h = d.holders_ranked();
        assert_eq!(
            (h[0].0, h[0].1.time_wait),
            (40, 1),
            "the closer still named"
        );
    }

    #[test]
    fn passive_close_and_rst_free_the_port_at_once() {
        let mut t = Tracker::new();
        connect(&mut t, 1, 40000, task(1, "a"), 0);
        let irq = task(0, "swapper/0");
        t.on_state(&ev(1, st::ESTABLISHED, st::CLOSE_WAIT, 40000, irq, 1));
        t.on_state(&ev(1, st::CLOSE_WAIT, st::LAST_ACK, 40000, irq, 2));
        t.on_state(&ev(1, st::LAST_ACK, st::CLOSE, 40000, irq, 3));
        connect(&mut t, 2, 40001, task(1, "a"), 4);
        t.on_state(&ev(2, st::ESTABLISHED, st::CLOSE, 40001, irq, 5));
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn time_wait_reuse_replaces_the_old_entry() {
        let mut t = Tracker::new();
        connect(&mut t, 1, 40000, task(1, "old"), 0);
        active_close(&mut t, 1, 40000, 1);
        connect(&mut t, 2, 40000, task(2, "new"), 2 * SEC);
        let d = t.dest(&dest()).unwrap();
        assert_eq!(d.in_use, 1);
        assert_eq!(d.by_state[st::TIME_WAIT as usize], 0);
        // The old owner's port and its TIME_WAIT count went with its entry.
        let h = d.holders_ranked();
        assert_eq!(h.len(), 1);
        assert_eq!((h[0].0, h[0].1.ports, h[0].1.time_wait), (2, 1, 0));
        assert_eq!(h[0].1.comm, Comm::new("new"));
        // The stale heap entry of the first incarnation must not close the new connection.
        t.expire(1 + TIME_WAIT_NS);
        assert_eq!(t.tracked(), 1);
    }

    #[test]
    fn busiest_destination_for_a_failed_connect_and_ranking() {
        let mut t = Tracker::new();
        for i in 0..3u16 {
            connect(&mut t, 10 + i as u64, 40000 + i, task(1, "big"), 0);
        }
        connect(&mut t, 20, 40010, task(2, "small"), 0);
        let target = dest().target();
        let (key, d) = t.busiest_for(&target).expect("found");
        assert_eq!(key, dest());
        let h = d.holders_ranked();
        assert_eq!(
            h.iter().map(|(p, h)| (*p, h.ports)).collect::<Vec<_>>(),
            vec![(1, 3), (2, 1)]
        );
        assert_eq!(t.top(5).len(), 1);
    }

    /// A kretprobe's port record at `ts_ns`: socket 9 got port 40005 in pid 50's connect().
    fn port_of_pid_50(ts_ns: u64) -> PortAssigned {
        PortAssigned {
            ts_ns,
            task: task(50, "client"),
            skaddr: 9,
            netns: NS,
            ret: 0,
            sport: 40005,
            source: 2,
        }
    }

    #[test]
    fn owner_from_the_port_event_places_a_socket_whose_connect_was_not_seen() {
        let mut t = Tracker::new();
        // No CLOSE->SYN_SENT (the kernel skipped it); fexit/kretprobe saw the allocation.
        t.on_port(&port_of_pid_50(0));
        t.on_state(&ev(
            9,
            st::SYN_SENT,
            st::ESTABLISHED,
            40005,
            task(0, "swapper/0"),
            1,
        ));
        let d = t.dest(&dest()).expect("placed");
        assert_eq!(d.holders_ranked()[0].0, 50);
        assert_eq!(t.counters.recovered, 1);
        assert_eq!(t.counters.untracked, 0);
    }

    #[test]
    fn a_bound_sockets_port_record_is_forgotten_when_the_socket_closes() {
        let mut t = Tracker::new();
        // kprobe mode, bind() before connect(): CLOSE->SYN_SENT carries the port, and the
        // kretprobe's port record follows with no connect pending.
        t.on_state(&ev(
            9,
            st::CLOSE,
            st::SYN_SENT,
            40005,
            task(50, "client"),
            1,
        ));
        t.on_port(&port_of_pid_50(2));
        assert_eq!(t.orphan_owners.len(), 1);
        t.on_state(&ev(
            9,
            st::SYN_SENT,
            st::ESTABLISHED,
            40005,
            task(0, "x"),
            3,
        ));
        assert_eq!(t.orphan_owners.len(), 1);
        t.on_state(&ev(9, st::ESTABLISHED, st::CLOSE, 40005, task(0, "x"), 4));
        assert!(t.orphan_owners.is_empty());
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn unknown_sockets_are_counted_not_tracked() {
        let mut t = Tracker::new();
        t.on_state(&ev(
            77,
            st::ESTABLISHED,
            st::CLOSE_WAIT,
            9000,
            task(0, "x"),
            0,
        ));
        assert_eq!(t.counters.untracked, 1);
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn seeded_time_wait_uses_the_kernels_remaining_time() {
        let mut t = Tracker::new();
        assert!(t.seed(
            dest(),
            40000,
            st::TIME_WAIT as u8,
            Owner::UNKNOWN,
            0,
            5 * SEC
        ));
        assert!(!t.seed(
            dest(),
            40000,
            st::TIME_WAIT as u8,
            Owner::UNKNOWN,
            0,
            5 * SEC
        ));
        t.expire(5 * SEC - 1);
        assert_eq!(t.tracked(), 1);
        t.expire(5 * SEC);
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn a_bound_connect_to_a_taken_tuple_does_not_displace_its_holder() {
        // kprobe mode, and IPv6 in fentry mode, write CLOSE->SYN_SENT at once, with the port
        // bind() gave the socket. Process 5 holds 40000 -> dest; process 6 binds 40000 and
        // connects there too: the kernel refuses the 4-tuple (EADDRNOTAVAIL).
        let mut t = Tracker::new();
        connect(&mut t, 1, 40000, task(5, "holder"), 0);
        t.on_state(&ev(
            2,
            st::CLOSE,
            st::SYN_SENT,
            40000,
            task(6, "binder"),
            SEC,
        ));
        t.on_state(&ev(
            2,
            st::SYN_SENT,
            st::CLOSE,
            40000,
            task(6, "binder"),
            SEC,
        ));
        t.on_connect_failed(&SyscallFailure {
            ts_ns: SEC,
            task: task(6, "binder"),
            skaddr: 2,
            netns: NS,
            errno: 99,
            addr: "10.0.0.2".parse().unwrap(),
            port: 80,
            tally: Default::default(),
            protocol: Some(portx_common::IPPROTO_TCP),
            bound_port: 0,
        });
        let d = t.dest(&dest()).unwrap();
        assert_eq!(d.in_use, 1);
        assert_eq!(d.holders_ranked()[0].0, 5, "{:?}", d.holders_ranked());
        assert_eq!(t.pending(), 0);
        // A bound connect that succeeds (the holder's entry was stale) takes the port when its
        // handshake names it.
        t.on_state(&ev(
            3,
            st::CLOSE,
            st::SYN_SENT,
            40000,
            task(7, "binder2"),
            2 * SEC,
        ));
        t.on_state(&ev(
            3,
            st::SYN_SENT,
            st::ESTABLISHED,
            40000,
            task(0, "x"),
            2 * SEC,
        ));
        let d = t.dest(&dest()).unwrap();
        assert_eq!((d.in_use, d.holders_ranked()[0].0), (1, 7));
        // Over a TIME_WAIT holder it waits too: charged once the kernel let it take the tuple
        // (tcp_tw_reuse), not before.
        active_close(&mut t, 3, 40000, 3 * SEC);
        t.on_state(&ev(
            4,
            st::CLOSE,
            st::SYN_SENT,
            40000,
            task(8, "reuser"),
            4 * SEC,
        ));
        let d = t.dest(&dest()).unwrap();
        assert_eq!((d.in_use, d.holders_ranked()[0].0), (1, 7));
        assert_eq!(d.by_state[st::TIME_WAIT as usize], 1);
        t.on_state(&ev(
            4,
            st::SYN_SENT,
            st::ESTABLISHED,
            40000,
            task(0, "x"),
            4 * SEC,
        ));
        let d = t.dest(&dest()).unwrap();
        assert_eq!((d.in_use, d.holders_ranked()[0].0), (1, 8));
        assert_eq!(d.by_state[st::ESTABLISHED as usize], 1);
    }

    /// kprobe mode (and IPv6 in fentry mode): a bound socket's CLOSE->SYN_SENT comes with its
    /// port, and with the 4-tuple in TIME_WAIT and no reuse the kernel refuses the connect
    /// (SYN_SENT->CLOSE with that port): the TIME_WAIT socket, which caused the failure, stays
    /// counted and named.
    #[test]
    fn a_bound_connect_refused_over_a_time_wait_tuple_leaves_the_time_wait_counted() {
        let mut t = Tracker::new();
        connect(&mut t, 1, 40000, task(5, "churner"), 0);
        active_close(&mut t, 1, 40000, SEC);
        let binder = task(6, "binder");
        t.on_state(&ev(2, st::CLOSE, st::SYN_SENT, 40000, binder, 3 * SEC));
        t.on_state(&ev(
            2,
            st::SYN_SENT,
            st::CLOSE,
            40000,
            task(0, "x"),
            3 * SEC,
        ));
        let d = t.dest(&dest()).unwrap();
        assert_eq!((d.in_use, d.by_state[st::TIME_WAIT as usize]), (1, 1));
        assert_eq!(d.holders_ranked()[0].0, 5, "the churner named");
        assert_eq!(t.pending(), 0);
    }

    /// IPv6 in fentry and kprobe mode: CLOSE->SYN_SENT without a port (pending); a blocking
    /// connect() left waiting is dumped by sock_diag (the connect notes), then times out. Its
    /// SYN_SENT->CLOSE frees the port the dump found.
    #[test]
    fn a_waiting_connect_found_by_sock_diag_is_freed_when_it_times_out() {
        let mut t = Tracker::new();
        let owner = task(7, "client");
        t.on_state(&ev(0xa0, st::CLOSE, st::SYN_SENT, 0, owner, 0));
        assert_eq!(t.pending(), 1);
        t.pass_begins();
        assert!(t.seed(
            dest(),
            40000,
            st::SYN_SENT as u8,
            Owner {
                pid: 7,
                comm: Comm::new("client")
            },
            3 * SEC,
            0
        ));
        t.pass_ends();
        assert_eq!(t.dest(&dest()).unwrap().in_use, 1);
        t.on_state(&ev(
            0xa0,
            st::SYN_SENT,
            st::CLOSE,
            40000,
            task(0, "x"),
            127 * SEC,
        ));
        assert_eq!(t.tracked(), 0, "the timed-out connect's port is free");
        // A holder in another state, which a bound socket collided with, is left alone.
        connect(&mut t, 1, 40001, task(5, "holder"), 128 * SEC);
        t.on_state(&ev(0xb0, st::CLOSE, st::SYN_SENT, 40001, owner, 128 * SEC));
        t.on_state(&ev(
            0xb0,
            st::SYN_SENT,
            st::CLOSE,
            40001,
            task(0, "x"),
            128 * SEC,
        ));
        assert_eq!(t.dest(&dest()).unwrap().in_use, 1);
    }

    #[test]
    fn ports_outside_the_range_do_not_fill_it() {
        // A client that binds its source ports itself, below the range (e.g. ports < 1024).
        let settings = PortSettings {
            range: (40000, 40015),
            reserved: vec![(40015, 40015)],
            tw_reuse: 0,
            max_tw_buckets: None,
            timestamps: None,
            tw_reuse_delay_ms: None,
        };
        let mut t = Tracker::new();
        for i in 0..16u16 {
            let sk = 100 + u64::from(i);
            t.on_state(&ev(
                sk,
                st::CLOSE,
                st::SYN_SENT,
                700 + i,
                task(5, "resvport"),
                0,
            ));
            t.on_state(&ev(
                sk,
                st::SYN_SENT,
                st::ESTABLISHED,
                700 + i,
                task(0, "x"),
                0,
            ));
        }
        connect(&mut t, 1, 40000, task(6, "app"), 0);
        // Settings read after the sockets were placed: counted over the table.
        t.set_port_settings(NS, &settings);
        let d = t.dest(&dest()).unwrap();
        assert_eq!((d.in_use, d.outside_range, d.in_range()), (17, 16, 1));
        // Placed after: counted as they come; a reserved port is outside too.
        connect(&mut t, 2, 40015, task(6, "app"), SEC);
        t.on_state(&ev(100, st::ESTABLISHED, st::CLOSE, 700, task(0, "x"), SEC));
        let d = t.dest(&dest()).unwrap();
        assert_eq!((d.in_use, d.outside_range, d.in_range()), (17, 16, 1));
        assert_eq!(t.netns_usage(NS).outside_range, 16);
        let rec = crate::report::destination(&dest(), d, Some(&settings));
        assert_eq!((rec.range, rec.utilization), (Some(15), Some(0.066)));
        let mut rates = crate::forecast::Rates::new();
        rates.sample(2 * SEC, t.dests());
        rates.sample(3 * SEC, t.dests());
        let d = t.dest(&dest()).unwrap();
        let f = rates.forecast(&dest(), d, rec.range, None, None).unwrap();
        assert_eq!(f.time_to_exhaustion_s, None, "1 of 15 in use, not growing");
        // The range widened to take them in, nothing reserved any more: recounted.
        t.set_port_settings(
            NS,
            &PortSettings {
                range: (600, 40015),
                reserved: vec![],
                ..settings
            },
        );
        assert_eq!(t.dest(&dest()).unwrap().outside_range, 0);
    }

    #[test]
    fn a_time_wait_socket_found_again_after_60s_is_not_a_new_connection() {
        // The kernel's timewait timer fires late (a timer-wheel bucket: 61.9 s was seen), so a
        // resync can find a socket this table aged out at 60 s. Its port is in use again, but
        // nothing connected: the rates must not count it.
        let mut t = Tracker::new();
        connect(&mut t, 1, 40000, task(40, "churner"), 0);
        active_close(&mut t, 1, 40000, SEC);
        connect(&mut t, 2, 40001, task(41, "app"), 0);
        t.expire(SEC + TIME_WAIT_NS);
        assert_eq!(t.dest(&dest()).unwrap().in_use, 1);
        assert!(t.seed(
            dest(),
            40000,
            st::TIME_WAIT as u8,
            Owner::UNKNOWN,
            62 * SEC,
            SEC
        ));
        let d = t.dest(&dest()).unwrap();
        assert_eq!((d.in_use, d.by_state[st::TIME_WAIT as usize]), (2, 1));
        assert_eq!((d.opened, d.tw_entered), (2, 1), "as before the resync");
        // Seen connecting and closing: counted.
        connect(&mut t, 3, 40002, task(41, "app"), 63 * SEC);
        active_close(&mut t, 3, 40002, 63 * SEC);
        let d = t.dest(&dest()).unwrap();
        assert_eq!((d.opened, d.tw_entered), (3, 2));
    }

    #[test]
    fn correction_follows_the_kernel_unless_an_event_is_newer() {
        let mut t = Tracker::new();
        connect(&mut t, 1, 40000, task(1, "a"), 0);
        t.on_state(&ev(
            1,
            st::ESTABLISHED,
            st::FIN_WAIT1,
            40000,
            task(0, "x"),
            SEC,
        ));
        // The kernel says TIME_WAIT (a transition the tracepoint missed), 50 s left.
        assert!(
            t.correct(dest(), 40000, st::TIME_WAIT as u8, SEC, 50 * SEC)
                .is_none(),
            "not older"
        );
        assert_eq!(
            t.correct(dest(), 40000, st::TIME_WAIT as u8, 2 * SEC, 50 * SEC),
            Some(st::FIN_WAIT1 as u8),
            "the state it held"
        );
        let d = t.dest(&dest()).unwrap();
        assert_eq!(d.by_state[st::TIME_WAIT as usize], 1);
        assert_eq!(d.holders_ranked()[0].1.time_wait, 1, "owner kept");
        t.expire(52 * SEC - 1);
        assert_eq!(t.tracked(), 1);
        t.expire(52 * SEC);
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn a_connect_whose_outcome_was_lost_is_forgotten_after_ten_minutes() {
        let mut t = Tracker::new();
        t.on_state(&ev(5, st::CLOSE, st::SYN_SENT, 0, task(1, "a"), SEC));
        t.expire(SEC + PENDING_MAX_NS - 1);
        assert_eq!(t.pending(), 1);
        t.expire(SEC + PENDING_MAX_NS);
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn conn_packs_pid_state_and_socket_address() {
        let c = Conn::new(4_194_303, st::FIN_WAIT2 as u8, 0xffff_8880_1234_5640, 7);
        assert_eq!((c.pid(), c.state()), (4_194_303, st::FIN_WAIT2 as u8));
        assert_eq!(c.sk_low, 0x1234_5641, "low half, bit 0 set: never 0");
        assert_eq!(
            Conn::new(1, 1, 0, 0).sk_low,
            0,
            "0 means learned from sock_diag"
        );
        assert_eq!(key_parts(conn_key(70_000, 40015)), (70_000, 40015));
    }

    #[test]
    fn a_reused_destination_id_does_not_inherit_old_time_wait_expiries() {
        let mut t = Tracker::new();
        // Destination A: one port into TIME_WAIT at 1 s, then gone (forgotten) at 2 s.
        connect(&mut t, 1, 40000, task(1, "a"), 0);
        active_close(&mut t, 1, 40000, SEC);
        assert!(t.forget(&dest(), 40000).is_some());
        // A is kept until a sweep finds it idle: the first sees its connection, the one
        // KEEP_EMPTY_NS later nothing new.
        t.sweep_idle(3 * SEC);
        assert_eq!(t.dest(&dest()).map(|d| d.in_use), Some(0));
        t.sweep_idle(3 * SEC + KEEP_EMPTY_NS);
        assert!(t.dest(&dest()).is_none());
        // Destination B takes A's id, same port, and reaches TIME_WAIT later (at 30 s).
        let other = StateChange {
            dport: 443,
            ..ev(2, st::CLOSE, st::SYN_SENT, 0, task(2, "b"), 2 * SEC)
        };
        t.on_state(&other);
        t.on_state(&StateChange {
            old: st::SYN_SENT,
            new: st::ESTABLISHED,
            sport: 40000,
            ..other
        });
        for (old, new) in [
            (st::ESTABLISHED, st::FIN_WAIT1),
            (st::FIN_WAIT1, st::FIN_WAIT2),
            (st::FIN_WAIT2, st::CLOSE),
        ] {
            t.on_state(&StateChange {
                old,
                new,
                sport: 40000,
                ts_ns: 30 * SEC,
                ..other
            });
        }
        t.expire(61 * SEC);
        assert_eq!(t.tracked(), 1, "A's old expiry must not end B's TIME_WAIT");
        t.expire(90 * SEC);
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn past_the_limit_the_oldest_time_wait_makes_room_and_then_nothing_is_dropped_silently() {
        let mut t = Tracker::with_limit(3);
        // Two ports into TIME_WAIT (at 1 s and 2 s), one ESTABLISHED.
        connect(&mut t, 1, 40001, task(1, "a"), 0);
        active_close(&mut t, 1, 40001, SEC);
        connect(&mut t, 2, 40002, task(1, "a"), 0);
        active_close(&mut t, 2, 40002, 2 * SEC);
        connect(&mut t, 3, 40003, task(2, "b"), 0);
        assert_eq!(t.tracked(), 3);
        // A fourth: the oldest TIME_WAIT (40001) goes.
        connect(&mut t, 4, 40004, task(2, "b"), 3 * SEC);
        assert_eq!(t.tracked(), 3);
        assert_eq!(t.counters.evicted, 1);
        let d = t.dest(&dest()).unwrap();
        assert_eq!(
            d.by_state[st::TIME_WAIT as usize],
            1,
            "40002 is still there"
        );
        // A fifth: 40002 goes; a sixth: nothing left to evict, counted, not tracked.
        connect(&mut t, 5, 40005, task(2, "b"), 4 * SEC);
        connect(&mut t, 6, 40006, task(2, "b"), 4 * SEC);
        assert_eq!(t.tracked(), 3);
        assert_eq!(t.counters.evicted, 2);
        assert_eq!(t.counters.over_limit, 1);
        assert_eq!(t.dest(&dest()).unwrap().in_use, 3);
        // Its later transitions are untracked, not misplaced.
        t.on_state(&ev(
            6,
            st::ESTABLISHED,
            st::CLOSE,
            40006,
            task(0, "x"),
            5 * SEC,
        ));
        assert_eq!(t.tracked(), 3);
        // sock_diag sockets are not added at the limit, and evict nothing.
        assert!(!t.seed(
            dest(),
            40010,
            st::TIME_WAIT as u8,
            Owner::UNKNOWN,
            5 * SEC,
            SEC
        ));
        assert_eq!((t.tracked(), t.counters.evicted), (3, 2));
        // The unlimited tracker never evicts.
        let mut u = Tracker::new();
        for i in 0..100u16 {
            connect(&mut u, u64::from(i) + 1, 40000 + i, task(1, "a"), 0);
        }
        assert_eq!((u.tracked(), u.counters.evicted), (100, 0));
    }

    #[test]
    fn netns_usage_counts_each_local_port_once() {
        let mut t = Tracker::new();
        connect(&mut t, 1, 40000, task(1, "a"), 0);
        let mut other = ev(2, st::CLOSE, st::SYN_SENT, 0, task(1, "a"), 0);
        other.dport = 81;
        t.on_state(&other);
        other.old = st::SYN_SENT;
        other.new = st::ESTABLISHED;
        other.sport = 40000;
        t.on_state(&other);
        assert_eq!(t.tracked(), 2);
        assert_eq!(t.netns_usage(NS).in_use, 1);
    }
}
