//! connect()'s exit — fexit on `__sys_connect` in fentry mode, else `syscalls:sys_exit_connect`:
//! the errno of a failing connect(), so that an EADDRNOTAVAIL names the process and the
//! destination; in tracepoint mode also the record that opens a connect no record of the
//! connecting thread has opened yet (see [`opened_late`]). Both see the same calls (the
//! syscall's, not io_uring's) with the same return value; fexit is a direct call from a
//! trampoline, the tracepoint a run through the perf tracepoint machinery each call.
//!
//! No program at connect()'s entry: the socket and its destination are noted by `state` when
//! the call puts the socket into SYN_SENT (in the calling thread, before any port is sought), and
//! taken here. So only calls that put a TCP socket into SYN_SENT are reported: every failure
//! that involves a port does; a call that fails before (no route, EALREADY, a non-IP socket)
//! never sought one. A connect() whose port search failed writes one record here, not also its
//! SYN_SENT->CLOSE (see [`phase::SEARCH_FAILED`]); where no record opened the connect, a
//! failure is counted and gets a record only now and then (see `failure_counts`).
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_smp_processor_id},
    macros::{fexit, map, tracepoint},
    maps::LruHashMap,
    programs::{FExitContext, TracePointContext},
};
pub use portx_common::connect_phase as phase;
use portx_common::{
    fail_flags, hook_mode, kind, state_flags, tcp_state, Connecting, FailureKey, PortEvent,
    SyscallEvent, AF_INET, AF_INET6, EADDRNOTAVAIL, EINPROGRESS, EINTR, ENOMEM, ERESTARTSYS,
    IPPROTO_MPTCP,
};

use crate::{
    emit::{emit, gave_up, header, header_without_task, Wake},
    failure_counts::{self, Counted},
    globals::{hook_mode, offsets},
    kernel::{current_fd_sock, sock_field, sock_port, syscall_arg_at_exit, syscall_ret},
    offset,
    state::Endpoints,
};

/// Where the noted socket is, as a state record carries it.
#[inline(always)]
fn endpoints_of(call: &Connecting) -> Endpoints {
    Endpoints {
        family: call.family,
        saddr: call.saddr,
        daddr: call.daddr,
        dport: call.dport.to_be(),
        netns: call.netns,
    }
}

/// True where a connect's first record waits until its port is known, so that one record opens
/// it with the port instead of a CLOSE->SYN_SENT without one and a second record with the port
/// — and a failed port search writes only connect()'s failure record. In fentry mode fexit on
/// `inet_hash_connect` writes it for IPv4 (IPv6 seeks its port in `inet6_hash_connect`); in
/// tracepoint mode the thread's next record of the socket does (`state_flags::OPENS`: loopback
/// answers within connect()), else connect()'s exit (`state_flags::AT_EXIT`). In kprobe mode
/// CLOSE->SYN_SENT is written as it happens and the kretprobe adds the port.
#[inline(always)]
pub fn deferred(family: u16) -> bool {
    let mode = hook_mode();
    mode == hook_mode::TRACEPOINT || (mode == hook_mode::FENTRY && family == AF_INET)
}

/// By thread. LRU: a connect made outside connect() (io_uring, TCP Fast Open's sendto, a kernel
/// socket) leaves its entry behind; the thread's next connect replaces it, and the map cannot
/// fill up with them. Entries are updated in place (a lookup and stores, no allocation or lock):
/// only the thread itself writes its entry. (An LRU may hand an element to another key while a
/// program holds it; that needs more threads in connect() at once than the map has entries.)
/// The agent reads it once a second (portx-agent `connect_notes.rs`): a note left
/// [`phase::SEEKING`] for the same socket in two readings is a connect waiting in SYN_SENT.
#[map(name = "CONNECTING")]
pub static CONNECTING: LruHashMap<u64, Connecting> = LruHashMap::with_max_entries(16384, 0);

/// Notes the calling thread's connect (CLOSE->SYN_SENT), in place if the thread has an entry.
/// Returns the entry it replaced if that one still owes its socket's SYN_SENT->CLOSE.
#[inline(always)]
pub fn note(pid_tgid: u64, call: &Connecting) -> Option<Connecting> {
    match CONNECTING.get_ptr_mut(&pid_tgid) {
        Some(entry) => {
            // SAFETY: a value of this map; only this thread writes its own entry.
            let prev = unsafe { entry.read() };
            unsafe { entry.write(*call) };
            (prev.phase == phase::SEARCH_FAILED).then_some(prev)
        }
        None => {
            if CONNECTING.insert(&pid_tgid, call, 0).is_err() {
                // No note: this connect's first record (tracepoint mode) and failure would go
                // unwritten.
                gave_up();
            }
            None
        }
    }
}

/// The port search for `sk` failed in the current thread (fexit on `inet_hash_connect`), and the
/// socket still shows a port in `inet_sport`: marks the thread's note of it
/// [`phase::SEARCH_FAILING`] for the SYN_SENT->CLOSE that follows (see [`from_syn_sent`]).
/// Without the mark that state change would be written with a port the socket does not hold,
/// and close whatever entry the agent has under that 4-tuple (a connection found by sock_diag,
/// say, that a bound socket collided with). Only where no record opened the connect
/// ([`deferred`]): one that did (an IPv6 socket connecting to a v4-mapped address) needs its
/// close.
#[inline(always)]
pub fn search_failing(pid_tgid: u64, sk: u64) {
    let Some(entry) = CONNECTING.get_ptr_mut(&pid_tgid) else {
        return;
    };
    // SAFETY: a value of this map; only this thread writes its own entry.
    unsafe {
        if (*entry).sk == sk && (*entry).phase == phase::SEEKING && deferred((*entry).family) {
            (*entry).phase = phase::SEARCH_FAILING;
        }
    }
}

/// What a state change out of SYN_SENT is to the connect the current thread has noted.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum FromSynSent {
    /// Not the socket the current thread is connecting before its connect() returned (the
    /// usual case: a SYN-ACK or RST handled in softirq, or a connect already returned).
    Elsewhere,
    /// That socket's port search failed (SYN_SENT->CLOSE with no port, or marked
    /// [`phase::SEARCH_FAILING`]): the entry is marked [`phase::SEARCH_FAILED`] and the state
    /// change need not be written.
    SearchFailed,
    /// That socket, and no record has opened its connect (tracepoint mode): this state change's
    /// record does (`state_flags::OPENS`), and the entry is marked [`phase::OPENED`].
    Opens,
}

/// Looks the current thread's noted connect up at a state change of `sk` out of SYN_SENT:
/// `searched` is true for SYN_SENT->CLOSE with no port. Called only where it can matter (a
/// SYN_SENT->CLOSE, or in tracepoint mode a deferred first record): a lookup per such state
/// change.
#[inline(always)]
pub fn from_syn_sent(sk: u64, searched: bool) -> FromSynSent {
    let Some(entry) = CONNECTING.get_ptr_mut(bpf_get_current_pid_tgid()) else {
        return FromSynSent::Elsewhere;
    };
    // SAFETY: a value of this map; only this thread writes its own entry.
    unsafe {
        if (*entry).sk != sk {
            return FromSynSent::Elsewhere;
        }
        let now = (*entry).phase;
        if now == phase::SEARCH_FAILING || (searched && now == phase::SEEKING) {
            (*entry).phase = phase::SEARCH_FAILED;
            return FromSynSent::SearchFailed;
        }
        // Only in tracepoint mode does a state change open a connect: in fentry mode fexit on
        // inet_hash_connect has opened an IPv4 one, and other connects' first records are
        // written at CLOSE->SYN_SENT.
        if now != phase::SEEKING || hook_mode() != hook_mode::TRACEPOINT {
            return FromSynSent::Elsewhere;
        }
        (*entry).phase = phase::OPENED;
    }
    FromSynSent::Opens
}

/// The SYN_SENT->CLOSE that [`from_syn_sent`] held back, for a call that no failure record
/// covers.
#[inline(always)]
pub fn emit_held_close(call: &Connecting) {
    if deferred(call.family) {
        // No record opened this connect: its first record waits for a port.
        return;
    }
    let at = endpoints_of(call);
    let hdr = header_without_task(kind::STATE, 0);
    let event = at.state_event(hdr, call.sk, tcp_state::SYN_SENT, tcp_state::CLOSE, 0);
    emit(event, Wake::Batch);
}

/// A blocking connect() interrupted by a signal while it waited for the handshake
/// (`inet_wait_for_connect`; `sock_intr_errno`: -ERESTARTSYS, or -EINTR with SO_SNDTIMEO): the
/// call is restarted or returns EINTR, and the connect goes on as after EINPROGRESS.
#[inline(always)]
fn interrupted(ret: i32) -> bool {
    ret == -ERESTARTSYS || ret == -EINTR
}

/// What a failed port search returns (`__inet_hash_connect`): with another error, a
/// search-failed entry is not this call's.
#[inline(always)]
fn search_error(ret: i32) -> bool {
    ret == -EADDRNOTAVAIL || ret == -ENOMEM
}

/// `syscalls:sys_exit_connect`, reading the call's fd from the task's registers when the call
/// failed (see [`exit_connect`]): where the agent found them in BTF and the kernel has
/// `bpf_task_pt_regs` (5.15).
#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let fd = || syscall_arg_at_exit(offset!(regs_arg0)).map(|fd| fd as i32);
    exit_connect(syscall_ret(&ctx), fd);
    0
}

/// `syscalls:sys_exit_connect` where the call's fd cannot be read at exit.
#[tracepoint]
pub fn sys_exit_connect_no_fd(ctx: TracePointContext) -> u32 {
    exit_connect(syscall_ret(&ctx), || None);
    0
}

/// `int __sys_connect(int fd, struct sockaddr __user *uservaddr, int addrlen)`, the syscall's
/// body: the agent attaches this only where BTF gives it exactly those three parameters, so
/// that the return value is argument 3.
#[fexit(function = "__sys_connect")]
pub fn sys_connect_fexit(ctx: FExitContext) -> u32 {
    let ret: u64 = ctx.arg(3);
    let fd = || Some(ctx.arg::<u64>(0) as i32);
    exit_connect(ret as i32, fd);
    0
}

/// Whether the socket behind the current task's `fd` is `sk`, the one the thread's note names:
/// None where that cannot be told (the fd not known, -1, or not followed to a socket, or an
/// MPTCP socket, whose fd leads to the MPTCP socket while the state changes are its TCP
/// subflow's).
#[inline(always)]
fn fd_is(fd: i32, sk: u64) -> Option<bool> {
    let of_fd = current_fd_sock(fd)?;
    if of_fd == sk {
        return Some(true);
    }
    let protocol: u16 = sock_field(of_fd, offsets().sock_protocol)?;
    (protocol != IPPROTO_MPTCP).then_some(false)
}

/// The socket's state not read yet (a TCP state is below 16). [`exit_connect`] keeps no `Option`
/// across its helper calls: a None's payload is undefined, and LLVM may spill that undefined
/// register to the stack, which the verifier refuses (`R4 !read_ok`: the 6.1 and 6.12 verifiers
/// refused `fexit/__sys_connect` so after a one-condition change, and the agent fell back to the
/// syscall tracepoint). Which register holds it, and whether it is spilled, moves with any edit.
const UNREAD: u32 = u32::MAX;

/// The noted socket's state could not be read: its memory is gone (see `exit_connect`).
const GONE: u32 = u32::MAX - 1;

/// connect() returned `ret` in the current thread; `fd()` is the call's fd, if it can be read
/// (only a call that failed other than in its port search reads it).
#[inline(always)]
fn exit_connect(ret: i32, fd: impl FnOnce() -> Option<i32>) {
    let Some(entry) = CONNECTING.get_ptr_mut(bpf_get_current_pid_tgid()) else {
        // No TCP socket of this thread ever went into SYN_SENT (or only the agent's, or in a
        // namespace not traced).
        return;
    };
    // SAFETY: a value of this map; only this thread writes its own entry.
    let call = unsafe { entry.read() };
    if call.phase == phase::TAKEN {
        // Taken by an earlier exit: this call put no TCP socket into SYN_SENT.
        return;
    }
    // An interrupted call is restarted (SA_RESTART) and waits on for the same socket, whose
    // failure its exit then reports: the note stays, marked opened (any record that opens the
    // connect is written by this exit). Else the note is taken, and so is a search-failed one
    // (not this call's: a call that waits put its own socket into SYN_SENT, replacing it, or
    // waits on one an earlier call did, whose note a search outside connect() replaced).
    let next = if interrupted(ret) && call.phase != phase::SEARCH_FAILED {
        phase::OPENED
    } else {
        phase::TAKEN
    };
    unsafe { (*entry).phase = next };
    if call.phase == phase::SEARCH_FAILED && !search_error(ret) {
        // Left by a connect made outside connect() whose port search failed: its state change,
        // and nothing for this call (which sought no port).
        emit_held_close(&call);
        return;
    }
    // Right after its connect() returned, the socket is in SYN_SENT (in progress, interrupted)
    // or CLOSE (failed), or already ESTABLISHED (loopback answers before the call returns). An
    // entry left by a connect made outside connect() names a socket that has moved on.
    // Memory that cannot be read is a socket freed long since (KFENCE guards some freed
    // objects): not this call's, whose fd holds it, and gone, so nothing to report of it.
    let read_state =
        || -> u32 { sock_field::<u8>(call.sk, offsets().sock_state).map_or(GONE, u32::from) };
    // Sentinels, not Options, for what this function reads once and keeps across helper calls
    // (see [`UNREAD`]).
    let mut state = UNREAD;
    if call.phase == phase::SEEKING && hook_mode() == hook_mode::TRACEPOINT {
        state = read_state();
        opened_late(&call, state);
    }
    if ret == 0 {
        // The common case, a connect() that succeeded.
        return;
    }
    if ret == -EINPROGRESS || interrupted(ret) {
        // A connect still in progress has its port by now (an interrupted one too: not a
        // failure yet; restarted, its exit reports one, and if it is not restarted the socket's
        // state change tells the handshake's end). In
        // tracepoint mode its first record carried it; in the others IPv4's came from fexit or
        // the kretprobe, and IPv6 sockets, which seek their port in inet6_hash_connect (not
        // seen there), need it read here. A blocking connect's port arrives with
        // SYN_SENT->ESTABLISHED.
        if hook_mode() == hook_mode::TRACEPOINT || call.family != AF_INET6 {
            return;
        }
        if state == UNREAD {
            state = read_state();
        }
        if state == tcp_state::SYN_SENT || state == tcp_state::ESTABLISHED {
            emit(
                PortEvent {
                    hdr: header(kind::PORT, hook_mode::TRACEPOINT),
                    skaddr: call.sk,
                    netns: call.netns,
                    ret: 0,
                    sport: sock_port(call.sk),
                    _pad: [0; 3],
                },
                Wake::Batch,
            );
        }
        return;
    }
    // A failed search was marked by this thread's SYN_SENT->CLOSE: the socket is closed, and the
    // range full for its destination. (Its fd is not followed: that would cost each failure of
    // an EADDRNOTAVAIL storm seven reads. Were the mark left by a search that failed outside
    // connect() and this call failed before its own search, the destination is still one the
    // thread found full.)
    let mut fd_read = -1;
    if call.phase != phase::SEARCH_FAILED {
        // Not this call's socket: the note was left by a connect made outside connect() (TCP
        // Fast Open's sendto, io_uring) or by an interrupted call not restarted, and this call
        // failed before putting a socket into SYN_SENT (a UDP or AF_UNIX socket, no route): not
        // a connect failure portx reports, and never against another socket's destination.
        fd_read = fd().unwrap_or(-1);
        if fd_is(fd_read, call.sk) == Some(false) {
            return;
        }
        // Any failure after SYN_SENT closes the socket before connect() returns
        // (tcp_v4_connect's failure path, or a handshake that failed while the call waited): a
        // socket not in CLOSE is not this call's (where its fd could not tell).
        if state == UNREAD {
            state = read_state();
        }
        if state != tcp_state::CLOSE {
            return;
        }
    }
    // Counted where no record opened the connect (where one did, in kprobe mode and for IPv6
    // in fentry mode, the agent waits for this record to close it).
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: a helper without arguments.
    let cpu = fail_flags::key_cpu(unsafe { bpf_get_smp_processor_id() });
    let counted = if deferred(call.family) {
        failure_counts::count(&FailureKey {
            tgid: (pid_tgid >> 32) as u32,
            netns: call.netns,
            ret,
            family: call.family,
            dport: call.dport,
            daddr: call.daddr,
            bound: u16::from(call.bound_port != 0),
            cpu,
        })
    } else {
        Counted::Alone
    };
    let (flags, count, born_ns) = match counted {
        Counted::Held => return,
        Counted::Alone => (0, 0, 0),
        Counted::Record { count, born_ns } => (
            fail_flags::with_cpu(fail_flags::COUNTED, cpu),
            count,
            born_ns,
        ),
    };
    let flags = fail_flags::with_bound_port(flags, call.bound_port);
    // For a failed search, this record also stands for the SYN_SENT->CLOSE not written.
    emit(
        SyscallEvent {
            hdr: header(kind::CONNECT_FAIL, flags),
            skaddr: call.sk,
            netns: call.netns,
            ret,
            family: call.family,
            port: call.dport,
            fd: fd_read,
            addr: call.daddr,
            count,
            born_ns,
        },
        Wake::Now,
    );
}

/// Whether the noted socket still has the note's destination address: with the port alone, a
/// socket freed since and its memory taken by another connection to the same port (443, say)
/// passed for it. Compared as integers, not arrays (an array comparison is a `bcmp` call on
/// this target); an unreadable address matches nothing.
#[inline(always)]
fn same_daddr(call: &Connecting) -> bool {
    let o = offsets();
    let a = &call.daddr;
    if call.family == AF_INET {
        let now: u32 = sock_field(call.sk, o.sock_daddr).unwrap_or(0);
        return now != 0 && now == u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
    }
    let lo: u64 = sock_field(call.sk, o.sock_v6_daddr).unwrap_or(0);
    let hi: u64 = sock_field(call.sk, o.sock_v6_daddr + 8).unwrap_or(0);
    let word = |i: usize| {
        u64::from_ne_bytes([
            a[i],
            a[i + 1],
            a[i + 2],
            a[i + 3],
            a[i + 4],
            a[i + 5],
            a[i + 6],
            a[i + 7],
        ])
    };
    (lo | hi) != 0 && lo == word(0) && hi == word(8)
}

/// Tracepoint mode, at connect()'s exit, for a connect no record has opened yet (the thread saw
/// no state change of its socket before the call returned): the record that opens it, with the
/// port it got and the state it is in now ([`state_flags::AT_EXIT`]). Whatever the socket went
/// through meanwhile in other contexts was written before, without an owner; a socket already
/// closed again holds no port and gets none.
///
/// The entry may be left by a connect made outside connect() (TCP Fast Open's sendto), taken by
/// a later connect() of the thread that put no socket into SYN_SENT: its socket, if still open,
/// gets its owner now; if closed and its memory reused, the destination (port and address) no
/// longer matches, unless the new socket connected to the same one.
#[inline(always)]
fn opened_late(call: &Connecting, state: u32) {
    if state == tcp_state::CLOSE || state == GONE {
        return;
    }
    let Some(dport) = sock_field::<u16>(call.sk, offsets().sock_dport) else {
        gave_up();
        return;
    };
    if dport != call.dport.to_be() || !same_daddr(call) {
        return;
    }
    // inet_sport, network order, as every state record reads the port.
    let Some(sport) = sock_field::<u16>(call.sk, offsets().inet_sport) else {
        gave_up();
        return;
    };
    if sport == 0 {
        return;
    }
    let at = endpoints_of(call);
    let hdr = header(kind::STATE, state_flags::AT_EXIT);
    let event = at.state_event(hdr, call.sk, tcp_state::CLOSE, state, sport);
    emit(event, Wake::Batch);
}
