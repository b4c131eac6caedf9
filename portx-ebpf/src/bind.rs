//! `syscalls:sys_{enter,exit}_bind`: failed binds. EADDRINUSE on a port-0 bind means the whole
//! range is gone for bind-before-connect.
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};
use portx_common::syscall_tp;

use crate::{
    kernel::current_netns,
    netns_filter,
    sockaddr::{self, InFlight},
};

#[map(name = "BIND_ARGS")]
static BIND_ARGS: HashMap<u64, InFlight> = HashMap::with_max_entries(16384, 0);

#[tracepoint]
pub fn sys_enter_bind(ctx: TracePointContext) -> u32 {
    match sockaddr::enter(&ctx, &BIND_ARGS) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

#[tracepoint]
pub fn sys_exit_bind(ctx: TracePointContext) -> u32 {
    let Some(call) = sockaddr::take(&BIND_ARGS, bpf_get_current_pid_tgid()) else {
        return 0;
    };
    let Ok(ret) = (unsafe { ctx.read_at::<i64>(syscall_tp::RET) }) else {
        return 1;
    };
    let ret = ret as i32;
    if ret >= 0 {
        return 0;
    }
    let netns = current_netns();
    if !netns_filter::wanted(netns) {
        return 0;
    }
    if sockaddr::emit_bind_failure(netns, ret, &call).is_err() {
        return 1;
    }
    0
}
