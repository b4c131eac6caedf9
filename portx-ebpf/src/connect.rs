//! `syscalls:sys_{enter,exit}_connect`: the destination and errno of every failing connect(), so
//! that an EADDRNOTAVAIL names the process and the destination; in tracepoint mode also the port a
//! non-blocking connect got.
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{map, tracepoint},
    maps::{HashMap, LruHashMap},
    programs::TracePointContext,
};
use portx_common::{hook_mode, kind, syscall_tp, PortEvent, SyscallArgs, EINPROGRESS};

use crate::{
    emit::{emit, header, Wake},
    globals::hook_mode,
    kernel::{sock_netns, sock_port},
    sockaddr,
};

/// connect() arguments by thread, between entry and exit.
#[map(name = "CONNECT_ARGS")]
static CONNECT_ARGS: HashMap<u64, SyscallArgs> = HashMap::with_max_entries(16384, 0);

/// Tracepoint mode: the socket a thread's connect() put into SYN_SENT (set by `state`). LRU so that
/// connects that never return through the syscall (kernel sockets, io_uring) cannot fill it.
#[map(name = "CONNECT_SK")]
pub static CONNECT_SK: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16384, 0);

#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let _ = CONNECT_SK.remove(&pid_tgid);
    match sockaddr::read_args(&ctx) {
        Ok(Some(args)) => {
            let _ = CONNECT_ARGS.insert(&pid_tgid, &args, 0);
            0
        }
        Ok(None) => 0,
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
    let Some(args) = sockaddr::take(&CONNECT_ARGS, pid_tgid) else {
        return Ok(());
    };
    let ret = unsafe { ctx.read_at::<i64>(syscall_tp::RET)? } as i32;
    let mut skaddr = 0u64;
    if hook_mode() == hook_mode::TRACEPOINT {
        if let Some(sk) = unsafe { CONNECT_SK.get(&pid_tgid) }.copied() {
            let _ = CONNECT_SK.remove(&pid_tgid);
            skaddr = sk;
            // A blocking connect's port arrives with SYN_SENT->ESTABLISHED and a failed one's with
            // SYN_SENT->CLOSE; only a connect still in progress needs the port read here.
            if ret == -EINPROGRESS {
                emit(
                    PortEvent {
                        hdr: header(kind::PORT, hook_mode::TRACEPOINT),
                        skaddr,
                        netns: sock_netns(skaddr),
                        ret: 0,
                        sport: sock_port(skaddr),
                        _pad: [0; 3],
                    },
                    Wake::Batch,
                );
            }
        }
    }
    if ret < 0 && ret != -EINPROGRESS {
        sockaddr::emit_failure(kind::CONNECT_FAIL, skaddr, ret, &args);
    }
    Ok(())
}
