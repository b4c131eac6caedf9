//! Read-only settings the agent writes before load (`EbpfLoader::override_global`), in the spirit
//! of libbpf-tools' `const volatile` filters. Always read through `read_volatile` so that the
//! compiler cannot fold the zero defaults.
use portx_common::{KernelOffsets, NETNS_FILTER_INLINE};

/// The agent's own pid: its sockets and syscalls are not traced.
#[no_mangle]
static AGENT_TGID: u32 = 0;

/// One of `portx_common::hook_mode`.
#[no_mangle]
static HOOK_MODE: u32 = 0;

/// Bytes waiting in the ring buffer that force a wake-up of the agent (an eighth of a ring).
#[no_mangle]
static WAKEUP_BYTES: u32 = 1 << 19;

/// How many of the ring buffers the CPUs write to (1..=MAX_RINGS).
#[no_mangle]
static RING_COUNT: u32 = 1;

/// How many namespaces `--netns` traces; 0: all of them.
#[no_mangle]
static FILTER_NETNS: u32 = 0;

/// Those namespaces when they are at most `NETNS_FILTER_INLINE`; else `NETNS_FILTER` holds them.
#[no_mangle]
static FILTER_NETNS_INLINE: [u32; NETNS_FILTER_INLINE] = [0; NETNS_FILTER_INLINE];

/// A failing connect()'s key gets a record about once this often; 0: a record per failure
/// (`portx_common::FAILURE_RECORD_GAP_NS`).
#[no_mangle]
static FAILURE_RECORD_GAP_NS: u64 = 0;

/// Kernel struct offsets from BTF.
#[no_mangle]
pub static OFFSETS: KernelOffsets = KernelOffsets {
    sock_family: 0,
    sock_protocol: 0,
    sock_dport: 0,
    sock_rcv_saddr: 0,
    sock_daddr: 0,
    sock_v6_rcv_saddr: 0,
    sock_v6_daddr: 0,
    sock_num: 0,
    inet_sport: 0,
    sock_state: 0,
    sock_net: 0,
    net_inum: 0,
    task_nsproxy: 0,
    nsproxy_net: 0,
    sock_max_ack_backlog: 0,
    net_cookie: 0,
    regs_arg0: 0,
    regs_arg1: 0,
    task_files: 0,
    files_fdt: 0,
    fdtable_max_fds: 0,
    fdtable_fd: 0,
    file_private_data: 0,
    socket_sk: 0,
};

#[inline(always)]
pub fn agent_tgid() -> u32 {
    unsafe { core::ptr::read_volatile(&AGENT_TGID) }
}

#[inline(always)]
pub fn hook_mode() -> u32 {
    unsafe { core::ptr::read_volatile(&HOOK_MODE) }
}

/// One offset, read straight from `.rodata` so that the verifier sees a constant (a copy of the
/// whole struct through the stack may not be one to it): for loads through BTF pointers.
#[macro_export]
macro_rules! offset {
    ($field:ident) => {{
        // Also used inside `unsafe` blocks (the loads it feeds).
        #[allow(unused_unsafe)]
        // SAFETY: a plain u32 in the agent-written, frozen `.rodata`.
        let offset = unsafe {
            core::ptr::read_volatile(core::ptr::addr_of!($crate::globals::OFFSETS.$field))
        };
        offset
    }};
}

#[inline(always)]
pub fn offsets() -> KernelOffsets {
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

#[inline(always)]
pub fn wakeup_bytes() -> u32 {
    unsafe { core::ptr::read_volatile(&WAKEUP_BYTES) }
}

#[inline(always)]
pub fn filter_netns() -> u32 {
    unsafe { core::ptr::read_volatile(&FILTER_NETNS) }
}

#[inline(always)]
pub fn filter_netns_inline() -> [u32; NETNS_FILTER_INLINE] {
    unsafe { core::ptr::read_volatile(&FILTER_NETNS_INLINE) }
}

#[inline(always)]
pub fn ring_count() -> u32 {
    unsafe { core::ptr::read_volatile(&RING_COUNT) }
}

#[inline(always)]
pub fn failure_record_gap_ns() -> u64 {
    unsafe { core::ptr::read_volatile(&FAILURE_RECORD_GAP_NS) }
}
