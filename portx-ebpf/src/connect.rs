//! `syscalls:sys_{enter,exit}_connect`: the destination and errno of every failing connect(), so
//! that an EADDRNOTAVAIL names the process and the destination; in tracepoint mode also the port a
//! non-blocking connect got.
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};
use portx_common::{hook_mode, kind, syscall_tp, PortEvent, EINPROGRESS};

use crate::{
    emit::{emit, header, Wake},
    globals::hook_mode,
    kernel::{current_netns, sock_netns, sock_port},
    netns_filter,
    sockaddr::{self, InFlight},
};

/// connect() calls in flight, by thread. In tracepoint mode `state` also notes in the entry the
/// socket the call put into SYN_SENT: one map, one insert and one delete per connect().
#[map(name = "CONNECT_ARGS")]
pub static CONNECT_ARGS: HashMap<u64, InFlight> = HashMap::with_max_entries(16384, 0);

#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    match sockaddr::enter(&ctx, &CONNECT_ARGS) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    match try_exit_connect(&ctx) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

fn try_exit_connect(ctx: &TracePointContext) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(call) = sockaddr::take(&CONNECT_ARGS, pid_tgid) else {
        return Ok(());
    };
    let ret = unsafe { ctx.read_at::<i64>(syscall_tp::RET)? } as i32;
    // A blocking connect's port arrives with SYN_SENT->ESTABLISHED and a refused one's with
    // SYN_SENT->CLOSE; in tracepoint mode only a connect still in progress needs the port read
    // here (the other modes have it from inet_hash_connect).
    let port_record = ret == -EINPROGRESS && call.sk != 0 && hook_mode() == hook_mode::TRACEPOINT;
    let failed = ret < 0 && ret != -EINPROGRESS;
    if !port_record && !failed {
        // The common case, a connect() that succeeded: nothing to read or write.
        return Ok(());
    }
    // The socket's namespace when there is one (a task may have moved since it created it).
    let netns = if call.sk != 0 {
        sock_netns(call.sk)
    } else {
        current_netns()
    };
    if !netns_filter::wanted(netns) {
        return Ok(());
    }
    if port_record {
        emit(
            PortEvent {
                hdr: header(kind::PORT, hook_mode::TRACEPOINT),
                skaddr: call.sk,
                netns,
                ret: 0,
                sport: sock_port(call.sk),
                _pad: [0; 3],
            },
            Wake::Batch,
        );
    }
    // `call.sk` is the socket this call put into SYN_SENT (0 if none): for a failed port
    // allocation the agent ends that socket's pending connect on this record (see `state`).
    if failed {
        sockaddr::emit_failure(kind::CONNECT_FAIL, call.sk, netns, ret, &call)?;
    }
    Ok(())
}
