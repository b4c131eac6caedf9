//! The ring buffer, the loss counter and the common header every record starts with.
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use portx_common::{EventHeader, FAILURE_WAKE_GAP_NS, TASK_COMM_LEN};

use crate::globals::wakeup_bytes;

/// Default size; the agent may override it (`--ring-buffer-kib`).
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Records that could not be written because the ring buffer was full, per CPU.
#[map(name = "DROPS")]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// When a failure record last woke the agent, per CPU (`bpf_ktime_get_ns`).
#[map(name = "LAST_WAKE")]
static LAST_WAKE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

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

/// A header for records whose current task means nothing (state changes outside process
/// context): pid, tid and comm stay 0.
#[inline(always)]
pub fn header_without_task(kind: u32, flags: u32) -> EventHeader {
    EventHeader {
        kind,
        tgid: 0,
        tid: 0,
        flags,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        comm: [0u8; TASK_COMM_LEN],
    }
}

const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// How urgently the agent must see a record.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Failures: wake the agent now (the failure report's latency depends on it), unless a
    /// failure on this CPU woke it less than `FAILURE_WAKE_GAP_NS` ago: a retry loop failing
    /// 200k times a second must not cost 200k context switches. The agent drains again that
    /// long after reading a failure, so none waits long. The ring is ordered, so every state
    /// change written before a failure is read before it.
    Now,
    /// State changes and ports: wake only once `wakeup_bytes` are waiting. Waking the agent for
    /// every record costs a context switch per connection; it drains on failures, on this
    /// threshold and before each summary.
    Batch,
}

/// Writes one record, or counts it as lost.
#[inline(always)]
pub fn emit<T: 'static>(event: T, wake: Wake) {
    let flags = if (wake == Wake::Now && failure_wake_due())
        || EVENTS.query(BPF_RB_AVAIL_DATA) >= u64::from(wakeup_bytes())
    {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            entry.write(event);
            entry.submit(flags);
        }
        None => {
            if let Some(count) = DROPS.get_ptr_mut(0) {
                // Per-CPU slot: no other writer can race with this one.
                unsafe { *count += 1 };
            }
        }
    }
}

/// True (and the time noted) when no failure woke the agent from this CPU in the last gap.
#[inline(always)]
fn failure_wake_due() -> bool {
    let now = unsafe { bpf_ktime_get_ns() };
    match LAST_WAKE.get_ptr_mut(0) {
        Some(last) => {
            // Per-CPU slot: no other writer can race with this one.
            let due = now.wrapping_sub(unsafe { *last }) >= FAILURE_WAKE_GAP_NS;
            if due {
                unsafe { *last = now };
            }
            due
        }
        None => true,
    }
}
