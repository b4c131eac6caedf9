//! The ring buffers, the loss counter and the common header every record starts with.
//!
//! CPU `c` writes to ring `c % RING_COUNT`: with one ring for all CPUs every record took a lock
//! and a cache line that the other CPUs were also taking (measured with two rings on two CPUs:
//! 0.80 -> 0.85 of the RST storm's rate, 0.79 -> 0.86 of the failing one). Records of one ring are in the order they were
//! reserved; the agent merges the rings by the time each record takes once it holds its slot.
use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        generated::bpf_get_current_comm,
    },
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use portx_common::{drops, EventHeader, Record, FAILURE_WAKE_GAP_NS, TASK_COMM_LEN};

use crate::globals::{ring_count, wakeup_bytes};

// Default sizes; the agent sizes the rings it uses (`--ring-buffer-kib`) and shrinks the others
// to a page.
#[map(name = "EVENTS_0")]
static EVENTS_0: RingBuf = RingBuf::with_byte_size(1 << 22, 0);
#[map(name = "EVENTS_1")]
static EVENTS_1: RingBuf = RingBuf::with_byte_size(1 << 22, 0);
#[map(name = "EVENTS_2")]
static EVENTS_2: RingBuf = RingBuf::with_byte_size(1 << 22, 0);
#[map(name = "EVENTS_3")]
static EVENTS_3: RingBuf = RingBuf::with_byte_size(1 << 22, 0);
#[map(name = "EVENTS_4")]
static EVENTS_4: RingBuf = RingBuf::with_byte_size(1 << 22, 0);
#[map(name = "EVENTS_5")]
static EVENTS_5: RingBuf = RingBuf::with_byte_size(1 << 22, 0);
#[map(name = "EVENTS_6")]
static EVENTS_6: RingBuf = RingBuf::with_byte_size(1 << 22, 0);
#[map(name = "EVENTS_7")]
static EVENTS_7: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// This CPU's ring.
#[inline(always)]
fn ring() -> &'static RingBuf {
    // SAFETY: a helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    // RING_COUNT is 1..=MAX_RINGS (the agent's choice); max(1) keeps the division defined. Where
    // every CPU has a ring of its own (up to 8 CPUs), no division: a 64-bit `div` was 2 % of the
    // state program's samples.
    let rings = ring_count().max(1);
    match if cpu < rings { cpu } else { cpu % rings } {
        0 => &EVENTS_0,
        1 => &EVENTS_1,
        2 => &EVENTS_2,
        3 => &EVENTS_3,
        4 => &EVENTS_4,
        5 => &EVENTS_5,
        6 => &EVENTS_6,
        _ => &EVENTS_7,
    }
}

/// What could not be done, per CPU, by [`drops`] entry: records the full ring buffer had no room
/// for, program runs that gave up.
#[map(name = "DROPS")]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drops::COUNT, 0);

/// Adds one to this CPU's `DROPS[entry]`. Per-CPU, but not alone on its CPU: a state change in
/// softirq can interrupt a program between a plain load and store (and fexit programs can be
/// preempted), and that one would go uncounted. An atomic add, as `failure_counts` does.
#[inline(always)]
fn count_drop(entry: u32) {
    if let Some(count) = DROPS.get_ptr_mut(entry) {
        // SAFETY: a u64-aligned value of this map.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, 1) };
    }
}

/// A program run that gave up before writing what it was for (a read that failed, a note the
/// map had no room for): counted, for the agent to report as missed. Only on paths that never
/// run in normal operation.
#[inline(always)]
pub fn gave_up() {
    count_drop(drops::GAVE_UP);
}

/// A program's return value for what its work returned, an error counted by [`gave_up`].
#[inline(always)]
pub fn ran<E>(done: Result<(), E>) -> u32 {
    match done {
        Ok(()) => 0,
        Err(_) => {
            gave_up();
            1
        }
    }
}

/// When a failure record last woke the agent, per CPU (`bpf_ktime_get_ns`).
#[map(name = "LAST_WAKE")]
static LAST_WAKE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// A header for the current task's record: pid and tid here, comm read by `emit` straight into
/// the record's slot (a nonzero tid tells it to). Copied out of the helper's buffer instead, it
/// cost a zeroed buffer and a byte-by-byte copy.
#[inline(always)]
pub fn header(kind: u32, flags: u32) -> EventHeader {
    let pid_tgid = bpf_get_current_pid_tgid();
    EventHeader {
        kind,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        flags,
        // Both set by `emit` once the record has its slot.
        ts_ns: 0,
        comm: [0u8; TASK_COMM_LEN],
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
        // Set by `emit` once the record has its slot.
        ts_ns: 0,
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

/// Writes one record into this CPU's ring, or counts it as lost. Its time is read after its
/// slot is reserved: the agent relies on a record reserved after it looked at a ring carrying a
/// later time than that look. The same reading decides a failure's wake-up (one clock read a
/// record).
#[inline(always)]
pub fn emit<T: Record + 'static>(event: T, wake: Wake) {
    let ring = ring();
    match ring.reserve::<T>(0) {
        Some(mut entry) => {
            let record = write_words(entry.as_mut_ptr(), &event);
            let now = unsafe { bpf_ktime_get_ns() };
            // SAFETY: `T: Record` starts with its EventHeader.
            let hdr = unsafe { &mut *(record as *mut T).cast::<EventHeader>() };
            hdr.ts_ns = now;
            if hdr.tid != 0 {
                // A task's record (`header`; the idle task, tid 0, connects nothing). The helper
                // fills all 16 bytes: the name, NUL-padded, or zeros if it fails.
                // SAFETY: the slot's comm, TASK_COMM_LEN bytes of ring-buffer memory.
                unsafe { bpf_get_current_comm(hdr.comm.as_mut_ptr().cast(), TASK_COMM_LEN as u32) };
            }
            // (What is waiting includes this record, reserved but not yet submitted.)
            let flags = if (wake == Wake::Now && failure_wake_due(now))
                || ring.query(BPF_RB_AVAIL_DATA) >= u64::from(wakeup_bytes())
            {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            };
            entry.submit(flags);
        }
        None => count_drop(drops::RING_FULL),
    }
}

/// Copies `event` into its slot a u64 at a time, each a volatile store (records have no padding:
/// see `Record`), so that its zero fields stay stores of a zero register. With a plain write
/// LLVM merged them into a `memset` (36 bytes for a record without a task), and this target
/// calls `memset`: a BPF-to-BPF call into a byte-by-byte loop, two or three times a record with
/// the header's zeroed name. Gone, with the other changes of its commit, the state program took
/// about 20 ns less a run under the RST storm (docs/performance-log.md, session 31).
#[inline(always)]
fn write_words<T: Record>(slot: *mut T, event: &T) -> *mut T {
    const { assert!(size_of::<T>() % 8 == 0) };
    let from = (event as *const T).cast::<u64>();
    let to = slot.cast::<u64>();
    let mut i = 0;
    while i < size_of::<T>() / 8 {
        // SAFETY: both are size_of::<T>() bytes, 8-aligned (ring-buffer slots are; every record
        // holds a u64).
        unsafe { core::ptr::write_volatile(to.add(i), from.add(i).read()) };
        i += 1;
    }
    slot
}

/// True (and `now` noted) when no failure woke the agent from this CPU in the last gap.
#[inline(always)]
fn failure_wake_due(now: u64) -> bool {
    match LAST_WAKE.get_ptr_mut(0) {
        Some(last) => {
            // Per-CPU slot, but a program that interrupts or preempts this one on its CPU can
            // race with it: at worst the agent is woken once more.
            let due = now.wrapping_sub(unsafe { *last }) >= FAILURE_WAKE_GAP_NS;
            if due {
                unsafe { *last = now };
            }
            due
        }
        None => true,
    }
}
