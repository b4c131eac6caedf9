//! The ring buffer, the loss counter and the common header every record starts with.
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use portx_common::{EventHeader, TASK_COMM_LEN};

/// Default size; the agent may override it (`--ring-buffer-kib`).
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Records that could not be written because the ring buffer was full, per CPU.
#[map(name = "DROPS")]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn header(kind: u32, flags: u32) -> EventHeader {
    let pid_tgid = bpf_get_current_pid_tgid();
    EventHeader {
        kind,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        flags,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        comm: bpf_get_current_comm().unwrap_or([0u8; TASK_COMM_LEN]),
    }
}

/// Writes one record, or counts it as lost.
#[inline(always)]
pub fn emit<T: 'static>(event: T) {
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            entry.write(event);
            entry.submit(0);
        }
        None => {
            if let Some(count) = DROPS.get_ptr_mut(0) {
                // Per-CPU slot: no other writer can race with this one.
                unsafe { *count += 1 };
            }
        }
    }
}
