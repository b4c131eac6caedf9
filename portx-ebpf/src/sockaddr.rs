//! bind() in flight: the syscall's fd and `struct sockaddr *` (fexit sees them with the result;
//! on the tracepoint path the exit reads them from the task's registers, or, before Linux 5.15,
//! finds them stashed per thread at entry), the address read back at exit, and only when the
//! syscall failed.
//!
//! Entry reads nothing from user memory but the address family (to skip non-IP sockets): a
//! successful bind() never needs its sockaddr. At exit the kernel has just copied the same
//! bytes (`move_addr_to_kernel`), so the page is resident and `bpf_probe_read_user` succeeds.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    maps::HashMap,
    programs::TracePointContext,
};
use portx_common::{kind, syscall_tp, SyscallEvent, AF_INET, AF_INET6};

use crate::{
    emit::{emit, header, Wake},
    globals::agent_tgid,
};

/// One thread's syscall between entry and exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct InFlight {
    /// User address of the `struct sockaddr`.
    pub uaddr: u64,
    pub fd: i32,
    pub family: u16,
    pub _pad: u16,
}

impl InFlight {
    /// The call on `fd` with the user's `uaddr`, unless the thread is the agent or the address
    /// is not IPv4 or IPv6.
    #[inline(always)]
    pub fn of(pid_tgid: u64, fd: i32, uaddr: u64) -> Result<Option<InFlight>, i64> {
        if (pid_tgid >> 32) as u32 == agent_tgid() || uaddr == 0 {
            return Ok(None);
        }
        let family: u16 = unsafe { bpf_probe_read_user(uaddr as *const u16)? };
        if family != AF_INET && family != AF_INET6 {
            return Ok(None);
        }
        Ok(Some(InFlight {
            uaddr,
            fd,
            family,
            _pad: 0,
        }))
    }
}

/// Stashes this thread's call, unless it is the agent's own or not on an IP socket.
#[inline(always)]
pub fn enter(ctx: &TracePointContext, map: &HashMap<u64, InFlight>) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let fd = unsafe { ctx.read_at::<u64>(syscall_tp::ARG0)? } as i32;
    let uaddr: u64 = unsafe { ctx.read_at(syscall_tp::ARG1)? };
    match InFlight::of(pid_tgid, fd, uaddr)? {
        Some(call) => map.insert(&pid_tgid, &call, 0).map_err(i64::from),
        None => Ok(()),
    }
}

/// Takes (reads and deletes) this thread's stashed call.
#[inline(always)]
pub fn take(map: &HashMap<u64, InFlight>, pid_tgid: u64) -> Option<InFlight> {
    let call = unsafe { map.get(&pid_tgid) }.copied();
    if call.is_some() {
        let _ = map.remove(&pid_tgid);
    }
    call
}

/// The port and address the call named. sockaddr_in: port @2, addr @4 (4 bytes);
/// sockaddr_in6: port @2, addr @8 (16 bytes).
#[inline(always)]
fn read_sockaddr(call: &InFlight) -> Result<(u16, [u8; 16]), i64> {
    let port = u16::from_be(unsafe { bpf_probe_read_user((call.uaddr + 2) as *const u16)? });
    let mut addr = [0u8; 16];
    if call.family == AF_INET {
        let a: [u8; 4] = unsafe { bpf_probe_read_user((call.uaddr + 4) as *const [u8; 4])? };
        addr[..4].copy_from_slice(&a);
    } else {
        addr = unsafe { bpf_probe_read_user((call.uaddr + 8) as *const [u8; 16])? };
    }
    Ok((port, addr))
}

/// Emits a failed bind() with the address it was called with; `flags`:
/// [`portx_common::bind_flags`].
#[inline(always)]
pub fn emit_bind_failure(netns: u32, ret: i32, call: &InFlight, flags: u32) -> Result<(), i64> {
    let (port, addr) = read_sockaddr(call)?;
    emit(
        SyscallEvent {
            hdr: header(kind::BIND_FAIL, flags),
            skaddr: 0,
            netns,
            ret,
            family: call.family,
            port,
            fd: call.fd,
            addr,
            count: 0,
            born_ns: 0,
        },
        Wake::Now,
    );
    Ok(())
}
