//! bind()'s exit — fexit on `__sys_bind` in fentry mode, else `syscalls:sys_{enter,exit}_bind`:
//! failed binds. EADDRINUSE on a port-0 bind means the whole range is gone for
//! bind-before-connect.
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{fexit, map, tracepoint},
    maps::HashMap,
    programs::{FExitContext, TracePointContext},
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
    match failed(ret as i32, &call) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// `int __sys_bind(int fd, struct sockaddr __user *umyaddr, int addrlen)`, the syscall's body:
/// the agent attaches this only where BTF gives it exactly those three parameters, so that the
/// return value is argument 3. The user's sockaddr is read only when the call failed.
#[fexit(function = "__sys_bind")]
pub fn sys_bind_fexit(ctx: FExitContext) -> u32 {
    let ret: u64 = ctx.arg(3);
    let ret = ret as i32;
    if ret >= 0 {
        return 0;
    }
    let fd: u64 = ctx.arg(0);
    let uaddr: u64 = ctx.arg(1);
    match InFlight::of(bpf_get_current_pid_tgid(), fd as i32, uaddr) {
        Ok(Some(call)) => match failed(ret, &call) {
            Ok(()) => 0,
            Err(_) => 1,
        },
        Ok(None) => 0,
        Err(_) => 1,
    }
}

/// bind() returned `ret` for `call`: a failure record if it failed, in a traced namespace.
#[inline(always)]
fn failed(ret: i32, call: &InFlight) -> Result<(), i64> {
    if ret >= 0 {
        return Ok(());
    }
    let netns = current_netns();
    if !netns_filter::wanted(netns) {
        return Ok(());
    }
    sockaddr::emit_bind_failure(netns, ret, call)
}
