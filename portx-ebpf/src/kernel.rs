//! Reads of kernel structs at offsets the agent found in BTF.
use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel};

use crate::globals::offsets;

#[inline(always)]
unsafe fn read_ptr(base: u64, off: u32) -> u64 {
    if base == 0 || off == 0 {
        return 0;
    }
    bpf_probe_read_kernel((base + off as u64) as *const u64).unwrap_or(0)
}

/// `net->ns.inum`, 0 when unknown.
#[inline(always)]
unsafe fn net_inum(net: u64) -> u32 {
    let off = offsets().net_inum;
    if net == 0 || off == 0 {
        return 0;
    }
    bpf_probe_read_kernel((net + off as u64) as *const u32).unwrap_or(0)
}

/// Network namespace inode of a `struct net *`, 0 when unknown.
#[inline(always)]
pub fn netns_of(net: u64) -> u32 {
    unsafe { net_inum(net) }
}

/// Network namespace inode of a socket.
#[inline(always)]
pub fn sock_netns(sk: u64) -> u32 {
    unsafe { net_inum(read_ptr(sk, offsets().sock_net)) }
}

/// Network namespace inode of the current task (process context only).
#[inline(always)]
pub fn current_netns() -> u32 {
    let o = offsets();
    unsafe {
        let task = bpf_get_current_task();
        let nsproxy = read_ptr(task, o.task_nsproxy);
        net_inum(read_ptr(nsproxy, o.nsproxy_net))
    }
}

/// `sk->__sk_common.skc_num`: the local port, host order, 0 while unassigned.
#[inline(always)]
pub fn sock_port(sk: u64) -> u16 {
    let off = offsets().sock_num;
    if sk == 0 || off == 0 {
        return 0;
    }
    unsafe { bpf_probe_read_kernel((sk + off as u64) as *const u16).unwrap_or(0) }
}

/// A field of type `T` at `off` bytes into `sk`; `None` if unreadable. 0 is a valid offset here
/// (`skc_daddr` is the first field of `struct sock`); the agent always sets every offset.
#[inline(always)]
pub fn sock_field<T>(sk: u64, off: u32) -> Option<T> {
    if sk == 0 {
        return None;
    }
    unsafe { bpf_probe_read_kernel((sk + off as u64) as *const T).ok() }
}
