//! The `struct sockaddr *` argument of connect()/bind(), stashed per thread at syscall entry and
//! consumed at exit.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    maps::HashMap,
    programs::TracePointContext,
};
use portx_common::{syscall_tp, SyscallArgs, SyscallEvent, AF_INET, AF_INET6};

use crate::{
    emit::{emit, header, Wake},
    globals::agent_tgid,
    kernel::current_netns,
};

/// Reads the syscall's fd and sockaddr; `None` for the agent itself and for non-IP families.
#[inline(always)]
pub fn read_args(ctx: &TracePointContext) -> Result<Option<SyscallArgs>, i64> {
    if (bpf_get_current_pid_tgid() >> 32) as u32 == agent_tgid() {
        return Ok(None);
    }
    let fd = unsafe { ctx.read_at::<u64>(syscall_tp::ARG0)? } as i32;
    let uaddr: u64 = unsafe { ctx.read_at(syscall_tp::ARG1)? };
    if uaddr == 0 {
        return Ok(None);
    }
    let family: u16 = unsafe { bpf_probe_read_user(uaddr as *const u16)? };
    // sockaddr_in: family, port @2, addr @4 (4 bytes). sockaddr_in6: port @2, addr @8 (16 bytes).
    let port = u16::from_be(unsafe { bpf_probe_read_user((uaddr + 2) as *const u16)? });
    let mut addr = [0u8; 16];
    if family == AF_INET {
        let a: [u8; 4] = unsafe { bpf_probe_read_user((uaddr + 4) as *const [u8; 4])? };
        addr[..4].copy_from_slice(&a);
    } else if family == AF_INET6 {
        addr = unsafe { bpf_probe_read_user((uaddr + 8) as *const [u8; 16])? };
    } else {
        return Ok(None);
    }
    Ok(Some(SyscallArgs {
        family,
        port,
        fd,
        addr,
    }))
}

/// Takes (reads and deletes) this thread's stashed arguments.
#[inline(always)]
pub fn take(map: &HashMap<u64, SyscallArgs>, pid_tgid: u64) -> Option<SyscallArgs> {
    let args = unsafe { map.get(&pid_tgid) }.copied();
    if args.is_some() {
        let _ = map.remove(&pid_tgid);
    }
    args
}

/// Emits a failed connect()/bind() with the arguments it was called with.
#[inline(always)]
pub fn emit_failure(kind: u32, skaddr: u64, ret: i32, args: &SyscallArgs) {
    emit(
        SyscallEvent {
            hdr: header(kind, 0),
            skaddr,
            netns: current_netns(),
            ret,
            family: args.family,
            port: args.port,
            fd: args.fd,
            addr: args.addr,
        },
        Wake::Now,
    );
}
