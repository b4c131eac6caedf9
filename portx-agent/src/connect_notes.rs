//! The kernel's connect notes (`CONNECTING`, portx-ebpf `connect.rs`), read once a second for
//! connects that wait in SYN_SENT with a port no record has brought.
//!
//! Where a connect's first record waits for its port (tracepoint mode), or its port comes only
//! when connect() returns (IPv6 in the other modes: `inet6_hash_connect` is not hooked), a
//! *blocking* connect() that sleeps in SYN_SENT writes nothing with its port until it returns:
//! to an unanswered destination (a blackhole, a full accept queue) that is about two minutes
//! (`tcp_syn_retries`), with the port held all along. Its note stays [`connect_phase::SEEKING`]
//! meanwhile. A note found waiting, for the same socket, in two readings in a row is such a
//! connect: the agent dumps its namespace through sock_diag (the resync's pass) at once, which
//! charges the port to the process whose fd holds the socket, instead of at the next resync.
//! A connect that returns or moves on between two readings (every connect a loopback or LAN
//! peer answers) is never seen waiting twice, so a storm asks for nothing.
use std::collections::{BTreeSet, HashMap, HashSet};

use portx_common::{connect_phase, Connecting, AF_INET6};

/// A note: the thread (`pid_tgid`, the map's key) and its socket.
type NoteId = (u64, u64);

#[derive(Default)]
pub struct StuckConnects {
    /// Notes waiting at the last reading.
    waiting: HashSet<NoteId>,
    /// Notes waiting in two readings or more and not yet dumped for, with their namespace.
    stuck: HashMap<NoteId, u32>,
    /// Notes already dumped for, while they keep waiting.
    dumped: HashSet<NoteId>,
}

impl StuckConnects {
    pub fn new() -> Self {
        Self::default()
    }

    /// One reading of the map (`(pid_tgid, note)`). `every_family`: every waiting note lacks its
    /// port (tracepoint mode); else only IPv6 ones do. Returns the namespaces that have a connect
    /// found waiting since the previous reading and not dumped for yet.
    pub fn read(
        &mut self,
        notes: impl IntoIterator<Item = (u64, Connecting)>,
        every_family: bool,
    ) -> BTreeSet<u32> {
        let mut now = HashSet::new();
        let mut stuck = HashMap::new();
        for (thread, note) in notes {
            if note.phase != connect_phase::SEEKING || !(every_family || note.family == AF_INET6) {
                continue;
            }
            let id = (thread, note.sk);
            now.insert(id);
            if self.waiting.contains(&id) && !self.dumped.contains(&id) {
                stuck.insert(id, note.netns);
            }
        }
        self.dumped.retain(|id| now.contains(id));
        self.waiting = now;
        self.stuck = stuck;
        self.stuck.values().copied().collect()
    }

    /// The processes (tgid) of the connects behind the namespaces the last [`read`](Self::read)
    /// returned: their fds hold the sockets a dump is asked for.
    pub fn processes(&self) -> Vec<u32> {
        let tgids: BTreeSet<u32> = self
            .stuck
            .keys()
            .map(|(thread, _)| (thread >> 32) as u32)
            .collect();
        tgids.into_iter().collect()
    }

    /// The namespaces the last [`read`](Self::read) returned were dumped (by a pass that began
    /// after that reading): their connects are not asked for again while they keep waiting.
    pub fn dumped(&mut self) {
        self.dumped.extend(self.stuck.drain().map(|(id, _)| id));
    }
}

/// Notes the map holds before [`stale`] looks for dead threads' notes: a quarter of its 16,384.
pub const CLEAN_FROM: usize = 4096;
/// Threads [`stale`] checks at most a reading (a stat of `/proc/<tid>` each).
pub const CHECK_MOST: usize = 1024;

/// The keys of notes to delete: taken by their connect()'s exit, of threads that are gone. The
/// kernel keeps a thread's note for its next connect (updated in place: no allocation a
/// connect) and never deletes one, so a client that makes a process a request (a `curl` loop,
/// CGI) fills the map with dead threads' notes; every reading then goes through all 16,384
/// (23 ms a reading at 16,000, 2.3 % of a core), and a waiting connect's note is among the
/// first the LRU evicts. Looked for only with at least `from` notes, `most` threads checked a
/// reading (`gone(tid)`). A note still waiting or failed is left: its thread's exit, or the
/// thread's next connect, still has work to do with it.
pub fn stale(
    notes: &[(u64, Connecting)],
    from: usize,
    most: usize,
    gone: impl Fn(u32) -> bool,
) -> Vec<u64> {
    if notes.len() < from {
        return Vec::new();
    }
    notes
        .iter()
        .filter(|(_, n)| n.phase == connect_phase::TAKEN)
        .take(most)
        .filter(|(thread, _)| gone(*thread as u32))
        .map(|(thread, _)| *thread)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use portx_common::AF_INET;

    fn note(sk: u64, netns: u32, family: u16, phase: u32) -> Connecting {
        Connecting {
            sk,
            saddr: [0; 16],
            daddr: [0; 16],
            netns,
            family,
            dport: 9000,
            phase,
            bound_port: 0,
            _pad: 0,
        }
    }

    fn waiting(sk: u64, netns: u32) -> Connecting {
        note(sk, netns, AF_INET, connect_phase::SEEKING)
    }

    #[test]
    fn a_connect_waiting_in_two_readings_asks_for_its_namespace_once() {
        let mut s = StuckConnects::new();
        assert!(
            s.read([(1, waiting(0xa, 7))], true).is_empty(),
            "one reading"
        );
        assert_eq!(s.read([(1, waiting(0xa, 7))], true), BTreeSet::from([7]));
        assert_eq!(s.processes(), vec![0], "tgid 0 in the key's high half");
        s.dumped();
        assert!(s.processes().is_empty());
        assert!(s.read([(1, waiting(0xa, 7))], true).is_empty(), "dumped");
        // Another thread's connect in the same namespace, and one in another.
        let notes = [
            (1, waiting(0xa, 7)),
            (2, waiting(0xb, 7)),
            (3, waiting(0xc, 8)),
        ];
        assert!(s.read(notes, true).is_empty());
        assert_eq!(s.read(notes, true), BTreeSet::from([7, 8]));
        // Threads 2 and 3 of process 42, and process 43.
        let threads = [(42 << 32) | 2, (42 << 32) | 3, (43 << 32) | 43];
        let notes = [
            (threads[0], waiting(0xd, 7)),
            (threads[1], waiting(0xe, 7)),
            (threads[2], waiting(0xf, 8)),
        ];
        s.read(notes, true);
        s.read(notes, true);
        assert_eq!(s.processes(), vec![42, 43]);
    }

    #[test]
    fn connects_that_move_on_between_readings_ask_for_nothing() {
        let mut s = StuckConnects::new();
        // A thread connecting over and over (a storm): each reading sees another socket.
        for sk in 0..5 {
            assert!(s.read([(1, waiting(sk, 7))], true).is_empty());
        }
        // Taken by connect()'s exit, or opened by the thread's own record.
        s.read([(1, waiting(9, 7))], true);
        assert!(s
            .read([(1, note(9, 7, AF_INET, connect_phase::TAKEN))], true)
            .is_empty());
        s.read([(1, waiting(10, 7))], true);
        assert!(s
            .read([(1, note(10, 7, AF_INET, connect_phase::OPENED))], true)
            .is_empty());
    }

    #[test]
    fn not_dumped_yet_asks_again() {
        let mut s = StuckConnects::new();
        s.read([(1, waiting(0xa, 7))], true);
        assert_eq!(s.read([(1, waiting(0xa, 7))], true), BTreeSet::from([7]));
        // No pass could run (one was under way): still asked for.
        assert_eq!(s.read([(1, waiting(0xa, 7))], true), BTreeSet::from([7]));
    }

    #[test]
    fn a_socket_waiting_again_after_it_moved_on_is_a_new_connect() {
        let mut s = StuckConnects::new();
        s.read([(1, waiting(0xa, 7))], true);
        s.read([(1, waiting(0xa, 7))], true);
        s.dumped();
        // connect() returned; the same socket (or memory) connects again and waits.
        s.read([(1, note(0xa, 7, AF_INET, connect_phase::TAKEN))], true);
        s.read([(1, waiting(0xa, 7))], true);
        assert_eq!(s.read([(1, waiting(0xa, 7))], true), BTreeSet::from([7]));
    }

    #[test]
    fn only_taken_notes_of_gone_threads_are_stale_and_only_in_a_crowded_map() {
        let taken = |sk| note(sk, 7, AF_INET, connect_phase::TAKEN);
        // Threads 1..=4 (key's low half): 2 and 4 are gone; 3 is gone but its connect waits.
        let notes = [
            (1, taken(1)),
            ((9 << 32) | 2, taken(2)),
            (3, waiting(3, 7)),
            (4, taken(4)),
        ];
        let gone = |tid: u32| tid.is_multiple_of(2) || tid == 3;
        assert_eq!(stale(&notes, 4, 10, gone), vec![(9 << 32) | 2, 4]);
        assert!(stale(&notes, 5, 10, gone).is_empty(), "not crowded");
        assert_eq!(
            stale(&notes, 4, 2, gone),
            vec![(9 << 32) | 2],
            "two checked"
        );
    }

    #[test]
    fn where_ipv4_ports_have_records_only_ipv6_notes_count() {
        let mut s = StuckConnects::new();
        let notes = [
            (1, waiting(0xa, 7)),
            (2, note(0xb, 8, AF_INET6, connect_phase::SEEKING)),
        ];
        s.read(notes, false);
        assert_eq!(s.read(notes, false), BTreeSet::from([8]));
    }
}
