//! Failing connect()s counted per key instead of a record each: a retry loop failing 300k times
//! a second wrote 300k records, each ~115 ns of connect()'s exit and ~180 ns of the agent's CPU.
//!
//! A key ([`FailureKey`]: process, namespace, destination, errno, whether bound, and the CPU
//! that counts it: threads failing towards one destination on several CPUs each add to an entry
//! of their CPU's, not all to one cache line) gets a record for its first failure at once, and
//! so does the first after `FAILURE_RECORD_GAP_NS` without one; every
//! failure adds one to the key's count. A record carries the count, so it stands for the
//! failures before it that had none; those after a key's last record the agent finds in the
//! map, which it reads once a second. Nothing is reset, so the agent's reads race with nothing:
//! the kernel only adds. With the map full a failure of a new key gets its own record, as every
//! failure did before.
//!
//! Whether a record is due needs the time, and reading the clock was the dearest part of a
//! counted failure (~56 of ~116 ns here: `bpf_ktime_get_ns` reads the clocksource). So only the
//! first failure of a key in each jiffy (`bpf_jiffies64`, a load) reads it: the entry keeps the
//! jiffy after the last reading, and a failure before it is held. A key failing nonstop reads
//! the clock once a jiffy (100 to 1000 times a second, by the kernel's HZ) instead of once a
//! failure; a record falls due at the same time as before, and comes at the latest with the
//! key's first failure in the next jiffy (≤ 10 ms late). (`bpf_ktime_get_coarse_ns`, which
//! reads no clocksource, is not for tracing programs.)
use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
    macros::map,
    maps::HashMap,
};
use core::intrinsics::{atomic_xadd, AtomicOrdering};
use portx_common::{FailureCount, FailureKey, MAX_FAILURE_KEYS};

use crate::globals::failure_record_gap_ns;

/// Not an LRU: an entry the kernel dropped would take failures no record stood for with it. The
/// agent deletes the entries of processes that are gone (see `failure_counts.rs` there).
#[map(name = "FAILURE_COUNTS")]
static FAILURE_COUNTS: HashMap<FailureKey, FailureCount> =
    HashMap::with_max_entries(MAX_FAILURE_KEYS, 0);

const BPF_NOEXIST: u64 = 1;

/// What [`count`] made of a failure.
pub enum Counted {
    /// In no count (counting off, or the map full): its record stands for itself alone.
    Alone,
    /// Counted, and due a record: it carries the key's entry as it is now.
    Record { count: u64, born_ns: u64 },
    /// Counted, no record: the key had one less than `FAILURE_RECORD_GAP_NS` ago, or its clock
    /// was read in this jiffy already.
    Held,
}

/// Counts a failure under `key` (before anything else of its record is read: most get none).
#[inline(always)]
pub fn count(key: &FailureKey) -> Counted {
    let gap = failure_record_gap_ns();
    if gap == 0 {
        return Counted::Alone;
    }
    // SAFETY: a helper without arguments.
    let jiffy = unsafe { bpf_jiffies64() };
    match FAILURE_COUNTS.get_ptr_mut(key) {
        Some(entry) => {
            // SAFETY: a value of this map, u64-aligned; `count` is only ever changed by this
            // atomic add (an `add` without fetch: every kernel back to 5.10 has it; the entry is
            // this CPU's, but a thread preempted in this program on a preemptible kernel can
            // meet another one here), the other
            // fields by plain stores (a race there costs at most a record more or less, never
            // a failure: the count has it).
            // (`AtomicU64::fetch_add` needs compare-and-swap, which this target lacks; the
            // intrinsic is the plain atomic add.)
            let count = unsafe {
                let count = core::ptr::addr_of_mut!((*entry).count);
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, 1);
                // Read after the add: it includes this failure and maybe others' since, all of
                // which have happened.
                core::ptr::read_volatile(count)
            };
            // In the jiffy of the key's last clock reading: held, a record due since waits for
            // the next jiffy (see the module's doc). A plain load and store, as
            // `last_record_ns`: CPUs racing here at most read the clock once more.
            if jiffy < unsafe { (*entry).clock_read_jiffy } {
                return Counted::Held;
            }
            unsafe { (*entry).clock_read_jiffy = jiffy.wrapping_add(1) };
            // SAFETY: a helper without arguments.
            let now = unsafe { bpf_ktime_get_ns() };
            let last = unsafe { (*entry).last_record_ns };
            if now.wrapping_sub(last) < gap {
                return Counted::Held;
            }
            unsafe { (*entry).last_record_ns = now };
            Counted::Record {
                count,
                born_ns: unsafe { (*entry).born_ns },
            }
        }
        None => {
            // SAFETY: a helper without arguments.
            let now = unsafe { bpf_ktime_get_ns() };
            let entry = FailureCount {
                count: 1,
                last_record_ns: now,
                born_ns: now,
                clock_read_jiffy: jiffy.wrapping_add(1),
            };
            // Fails with the map full, or when another CPU made the entry first: either way
            // this failure is in no count.
            match FAILURE_COUNTS.insert(key, &entry, BPF_NOEXIST) {
                Ok(()) => Counted::Record {
                    count: 1,
                    born_ns: now,
                },
                Err(_) => Counted::Alone,
            }
        }
    }
}
