//! Reads of kernel structs at offsets the agent found in BTF.
use aya_ebpf::{
    helpers::{
        bpf_get_current_task, bpf_get_current_task_btf, bpf_probe_read_kernel, bpf_task_pt_regs,
    },
    macros::map,
    maps::PerCpuArray,
    programs::TracePointContext,
    EbpfContext as _,
};
use portx_common::syscall_tp;

use crate::globals::offsets;

/// Namespaces each CPU remembers the inode of (a power of two).
const NETNS_SLOTS: u32 = 64;

/// Per CPU, namespaces' inodes by the namespace's `net_cookie`: slot `cookie % NETNS_SLOTS`
/// holds the cookie's low 32 bits above the inode, 0 when empty. One u64, written with one
/// store: a program that interrupts another on the same CPU (a state change in softirq) sees
/// a slot whole, before or after.
///
/// Why: `ns.inum` shares a cache line with the namespace's reference count, which every
/// socket's creation and end writes, on whichever CPU. Read on every state change, it missed
/// the cache each time: under the RST storm that one load was 59 % of the state program's
/// samples (`perf`). `net_cookie` sits in a line the kernel writes once. A cookie is never
/// given to two namespaces (it comes from a 64-bit counter), so a remembered inode cannot
/// belong to a namespace that was freed and whose memory a new one reuses; two cookies share
/// a slot's tag only 2^32 namespaces apart.
#[map(name = "NETNS_INODES")]
static NETNS_INODES: PerCpuArray<u64> = PerCpuArray::with_max_entries(NETNS_SLOTS, 0);

/// The inode of the namespace whose cookie is `cookie`, remembered, else `read_inum()` (and
/// remembered). A cookie of 0 (no `net_cookie` in BTF, or 5.10/5.11's lazily made one not made
/// yet) always reads.
#[inline(always)]
pub fn netns_by_cookie(cookie: u64, read_inum: impl FnOnce() -> u32) -> u32 {
    if cookie == 0 {
        return read_inum();
    }
    let tag = cookie as u32;
    let Some(slot) = NETNS_INODES.get_ptr_mut(tag & (NETNS_SLOTS - 1)) else {
        return read_inum();
    };
    // SAFETY: a u64 of this map, this CPU's.
    let held = unsafe { core::ptr::read_volatile(slot) };
    if (held >> 32) as u32 == tag && held as u32 != 0 {
        return held as u32;
    }
    let inum = read_inum();
    if inum != 0 {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(slot, (u64::from(tag) << 32) | u64::from(inum)) };
    }
    inum
}

#[inline(always)]
unsafe fn read_ptr(base: u64, off: u32) -> u64 {
    if base == 0 || off == 0 {
        return 0;
    }
    bpf_probe_read_kernel((base + off as u64) as *const u64).unwrap_or(0)
}

/// `net->ns.inum`, 0 when unknown; remembered by the namespace's cookie ([`netns_by_cookie`]).
#[inline(always)]
unsafe fn net_inum(net: u64) -> u32 {
    let o = offsets();
    if net == 0 || o.net_inum == 0 {
        return 0;
    }
    let cookie = if o.net_cookie == 0 {
        0
    } else {
        bpf_probe_read_kernel((net + o.net_cookie as u64) as *const u64).unwrap_or(0)
    };
    netns_by_cookie(cookie, || {
        bpf_probe_read_kernel((net + o.net_inum as u64) as *const u32).unwrap_or(0)
    })
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

/// The socket (`struct sock *`) behind the current task's descriptor `fd`, None where it cannot
/// be read (no `task_files` offset, `fd` out of the table, a closed fd, a file with no socket).
/// Seven reads: only for a syscall that failed, to learn which socket it was about. A file that is
/// not a socket yields what its `private_data` points to: callers compare it with a socket they
/// know, or check its family.
#[inline(always)]
pub fn current_fd_sock(fd: i32) -> Option<u64> {
    let o = offsets();
    if fd < 0 || o.task_files == 0 {
        return None;
    }
    // Offsets of 0 are valid here (`fdtable.max_fds` is its first member).
    let read = |base: u64, off: u32| -> Option<u64> {
        if base == 0 {
            return None;
        }
        // SAFETY: a probe read, which fails cleanly on a bad address.
        unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const u64) }.ok()
    };
    let task = unsafe { bpf_get_current_task() };
    let files = read(task, o.task_files)?;
    let fdt = read(files, o.files_fdt)?;
    if fdt == 0 {
        return None;
    }
    // SAFETY: as above.
    let max: u32 =
        unsafe { bpf_probe_read_kernel((fdt + u64::from(o.fdtable_max_fds)) as *const u32) }
            .ok()?;
    if fd as u32 >= max {
        return None;
    }
    let fds = read(fdt, o.fdtable_fd)?;
    let file = read(fds, fd as u32 * 8)?;
    let socket = read(file, o.file_private_data)?;
    let sk = read(socket, o.socket_sk)?;
    (sk != 0).then_some(sk)
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

/// A field of type `T` at `off` bytes into `base`, loaded directly: only for BTF-typed pointers
/// (`tp_btf`, fentry), where the verifier checks the load against the type and turns it into a
/// fault-safe one, and `off` must be a constant to it (read from `.rodata` with [`offset!`]).
/// `T` must be exactly the field's width, or within an array field.
///
/// # Safety
/// `base` must be a BTF-typed pointer the verifier knows.
#[inline(always)]
pub unsafe fn btf_load<T>(base: u64, off: u32) -> T {
    core::ptr::read_volatile((base as *const u8).add(off as usize) as *const T)
}

/// An `in6_addr` at `off` bytes into `base`, as two 8-byte loads within its array.
///
/// # Safety
/// As [`btf_load`].
#[inline(always)]
pub unsafe fn btf_load_in6(base: u64, off: u32) -> [u8; 16] {
    let lo: u64 = btf_load(base, off);
    let hi: u64 = btf_load(base, off + 8);
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&lo.to_ne_bytes());
    out[8..].copy_from_slice(&hi.to_ne_bytes());
    out
}

/// A syscall argument at the syscall's exit, `at` bytes into the registers the task entered it
/// with (`bpf_task_pt_regs`, Linux 5.15; `KernelOffsets::regs_arg0`/`regs_arg1`, from BTF).
/// Only in programs the agent loads where both exist.
#[inline(always)]
pub fn syscall_arg_at_exit(at: u32) -> Option<u64> {
    // SAFETY: helpers without preconditions; the task is the current one, its pt_regs a BTF
    // pointer read with a probe read.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as u64;
        bpf_probe_read_kernel((regs + u64::from(at)) as *const u64).ok()
    }
}

/// A `syscalls:sys_exit_*` tracepoint's return value: a direct load of the context (checked by
/// the verifier) instead of a helper call.
#[inline(always)]
pub fn syscall_ret(ctx: &TracePointContext) -> i32 {
    // SAFETY: the tracepoint's record is at least RET + 8 bytes.
    (unsafe {
        (ctx.as_ptr() as *const u8)
            .add(syscall_tp::RET)
            .cast::<i64>()
            .read()
    }) as i32
}
