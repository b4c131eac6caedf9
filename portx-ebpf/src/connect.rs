//! `syscalls:sys_exit_connect`: the errno of a failing connect(), so that an EADDRNOTAVAIL names
//! the process and the destination; in tracepoint mode also the port a non-blocking connect got.
//!
//! No program at connect()'s entry: the socket and its destination are noted by `state` when
//! the call puts the socket into SYN_SENT (in the calling thread, before any port is sought), and
//! taken here. So only calls that put a TCP socket into SYN_SENT are reported: every failure
//! that involves a port does; a call that fails before (no route, EALREADY, a non-IP socket)
//! never sought one.
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{map, tracepoint},
    maps::LruHashMap,
    programs::TracePointContext,
};
use portx_common::{hook_mode, kind, syscall_tp, tcp_state, PortEvent, SyscallEvent, EINPROGRESS};

use crate::{
    emit::{emit, header, Wake},
    globals::{hook_mode, offsets},
    kernel::{sock_field, sock_port},
};

/// The socket a thread's connect() put into SYN_SENT, and where it goes; written by `state`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Connecting {
    pub sk: u64,
    pub daddr: [u8; 16],
    pub netns: u32,
    pub family: u16,
    /// Host order.
    pub dport: u16,
}

/// By thread. LRU: a connect made outside connect() (io_uring, TCP Fast Open's sendto, a kernel
/// socket) leaves its entry behind; the thread's next connect replaces it, and the map cannot
/// fill up with them.
#[map(name = "CONNECTING")]
pub static CONNECTING: LruHashMap<u64, Connecting> = LruHashMap::with_max_entries(16384, 0);

#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    match try_exit_connect(&ctx) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

fn try_exit_connect(ctx: &TracePointContext) -> Result<(), i64> {
    let ret = unsafe { ctx.read_at::<i64>(syscall_tp::RET)? } as i32;
    let pid_tgid = bpf_get_current_pid_tgid();
    if ret == 0 {
        // The common case, a connect() that succeeded: only its entry to drop (if any; a UDP or
        // unix socket has none).
        let _ = CONNECTING.remove(&pid_tgid);
        return Ok(());
    }
    let Some(call) = (unsafe { CONNECTING.get(&pid_tgid) }).copied() else {
        // No TCP socket went into SYN_SENT in this call (or the agent's own, or a namespace not
        // traced): no port was sought.
        return Ok(());
    };
    let _ = CONNECTING.remove(&pid_tgid);
    // Right after its connect() returned, the socket is in SYN_SENT (in progress, interrupted)
    // or CLOSE (failed), or already ESTABLISHED (loopback answers before the call returns). An
    // entry left by a connect made outside connect() names a socket that has moved on.
    let state = || -> Result<u32, i64> {
        let s: u8 = sock_field(call.sk, offsets().sock_state).ok_or(-1i64)?;
        Ok(u32::from(s))
    };
    if ret == -EINPROGRESS {
        // A blocking connect's port arrives with SYN_SENT->ESTABLISHED and a refused one's with
        // SYN_SENT->CLOSE; in tracepoint mode only a connect still in progress needs the port
        // read here (the other modes have it from inet_hash_connect).
        if hook_mode() != hook_mode::TRACEPOINT {
            return Ok(());
        }
        let state = state()?;
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
        return Ok(());
    }
    let state = state()?;
    if state != tcp_state::SYN_SENT && state != tcp_state::CLOSE {
        return Ok(());
    }
    emit(
        SyscallEvent {
            hdr: header(kind::CONNECT_FAIL, 0),
            skaddr: call.sk,
            netns: call.netns,
            ret,
            family: call.family,
            port: call.dport,
            fd: -1,
            addr: call.daddr,
        },
        Wake::Now,
    );
    Ok(())
}
