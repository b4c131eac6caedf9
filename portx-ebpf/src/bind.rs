//! bind()'s exit — fexit on `__sys_bind` in fentry mode, else `syscalls:sys_exit_bind`, reading
//! the call's arguments from the task's registers, else `syscalls:sys_{enter,exit}_bind`: failed
//! binds. EADDRINUSE on a port-0 bind means the whole range is gone for bind-before-connect.
//!
//! Why not both tracepoints where one will do: while any program hangs on a syscall's entry
//! tracepoint, every syscall of every thread on the machine enters through the kernel's
//! syscall-tracing path and looks itself up among the traced ones, not only bind()s: about 10 ns
//! a syscall here, half of what portx's hooks added to a `getppid()` with both bind()
//! tracepoints (docs/performance-log.md, session 21).
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{fexit, map, tracepoint},
    maps::HashMap,
    programs::{FExitContext, TracePointContext},
};

use portx_common::{bind_flags, AF_INET, AF_INET6, EFAULT};

use crate::{
    emit::{gave_up, ran},
    globals::offsets,
    kernel::{
        current_fd_sock, current_netns, sock_field, sock_netns, syscall_arg_at_exit, syscall_ret,
    },
    netns_filter, offset,
    sockaddr::{self, InFlight},
};

#[map(name = "BIND_ARGS")]
static BIND_ARGS: HashMap<u64, InFlight> = HashMap::with_max_entries(16384, 0);

#[tracepoint]
pub fn sys_enter_bind(ctx: TracePointContext) -> u32 {
    ran(sockaddr::enter(&ctx, &BIND_ARGS))
}

/// `syscalls:sys_exit_bind` alone: a failed call's fd and address are still in the registers the
/// task entered the syscall with (`bpf_task_pt_regs`, Linux 5.15; where in them, the agent found
/// in BTF). A call that succeeded costs a load and a compare.
#[tracepoint]
pub fn sys_exit_bind(ctx: TracePointContext) -> u32 {
    let ret = syscall_ret(&ctx);
    if ret >= 0 {
        return 0;
    }
    // One read, then its check, then the other: read both first and LLVM kept the first's
    // payload, undefined when it is None, across the second read's helper calls, and the 6.1
    // verifier refused the program (`R8 !read_ok`) once an unrelated change moved registers
    // around (see connect.rs, `UNREAD`).
    let Some(fd) = syscall_arg_at_exit(offset!(regs_arg0)) else {
        gave_up();
        return 1;
    };
    let Some(uaddr) = syscall_arg_at_exit(offset!(regs_arg1)) else {
        gave_up();
        return 1;
    };
    failed_call(ret, fd as i32, uaddr)
}

/// `syscalls:sys_exit_bind` after `sys_enter_bind` stashed the call, where the registers cannot
/// be read at exit (before Linux 5.15, or an architecture the agent does not know).
#[tracepoint]
pub fn sys_exit_bind_stashed(ctx: TracePointContext) -> u32 {
    let Some(call) = sockaddr::take(&BIND_ARGS, bpf_get_current_pid_tgid()) else {
        return 0;
    };
    ran(failed(syscall_ret(&ctx), &call))
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
    failed_call(ret, fd as i32, uaddr)
}

/// bind() failed with `ret` for `fd` and the user's `uaddr`: its record, unless the call is the
/// agent's or not on an IP address.
#[inline(always)]
fn failed_call(ret: i32, fd: i32, uaddr: u64) -> u32 {
    if ret == -EFAULT {
        // The address could not be read by the call either: no address to report, nothing
        // portx missed.
        return 0;
    }
    match InFlight::of(bpf_get_current_pid_tgid(), fd, uaddr) {
        Ok(Some(call)) => ran(failed(ret, &call)),
        Ok(None) => 0,
        Err(e) => ran(Err(e)),
    }
}

/// bind() returned `ret` for `call`: a failure record if it failed, in a traced namespace — the
/// namespace of the socket and its protocol where its fd leads to it (a process may bind a
/// socket made in another namespace; a UDP socket's ports are not TCP's), else the calling
/// task's namespace and no protocol.
#[inline(always)]
fn failed(ret: i32, call: &InFlight) -> Result<(), i64> {
    if ret >= 0 {
        return Ok(());
    }
    let o = offsets();
    let socket = current_fd_sock(call.fd).and_then(|sk| {
        let family: u16 = sock_field(sk, o.sock_family)?;
        let protocol: u16 = sock_field(sk, o.sock_protocol)?;
        (family == AF_INET || family == AF_INET6).then_some((sk, protocol))
    });
    let (netns, flags) = match socket {
        Some((sk, protocol)) => (sock_netns(sk), bind_flags::socket_read(protocol)),
        None => (current_netns(), 0),
    };
    if !netns_filter::wanted(netns) {
        return Ok(());
    }
    sockaddr::emit_bind_failure(netns, ret, call, flags)
}
