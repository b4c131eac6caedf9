//! The TIME_WAIT ageing queue: when each port in TIME_WAIT is due, earliest first.
//!
//! A min-heap, so a tick pops only what is due: O(expired · log n), never a scan of the table.
//! Entries are 12 bytes (a million cost 12 MiB): the due time in milliseconds after a base, the
//! destination id and the port. The base moves forward about every 24 days so that the offsets
//! fit in a `u32`. The queue only says when to look: the tracker checks the socket itself (still
//! in TIME_WAIT, and due by its own nanosecond stamp) before ageing it out, so an entry left by an
//! earlier use of the same tuple does nothing.
use std::{cmp::Reverse, collections::BinaryHeap};

const MS: u64 = 1_000_000;

/// Offsets past this (about 24.8 days) move the base.
const REBASE_AFTER_MS: u64 = 1 << 31;

#[derive(Default)]
pub struct TimeWaitQueue {
    /// (due, in ms after `base_ns`, rounded up; destination id; port).
    heap: BinaryHeap<Reverse<(u32, u32, u32)>>,
    base_ns: u64,
}

impl TimeWaitQueue {
    /// Notes that `(dest_id, sport)` is due at `due_ns` (monotonic).
    pub fn push(&mut self, due_ns: u64, dest_id: u32, sport: u16) {
        if self.heap.is_empty() && due_ns.saturating_sub(self.base_ns) / MS >= REBASE_AFTER_MS {
            self.base_ns = due_ns.saturating_sub(crate::tracker::TIME_WAIT_NS);
        }
        // Rounded up: an entry is never looked at before it is due.
        let off = due_ns.saturating_sub(self.base_ns).div_ceil(MS);
        let off = u32::try_from(off).unwrap_or(u32::MAX);
        self.heap.push(Reverse((off, dest_id, u32::from(sport))));
    }

    /// Removes and returns the next entry due at `now_ns`, if any.
    pub fn pop_due(&mut self, now_ns: u64) -> Option<(u32, u16)> {
        if now_ns.saturating_sub(self.base_ns) / MS >= REBASE_AFTER_MS {
            self.rebase(now_ns);
        }
        let Reverse((off, dest_id, sport)) = *self.heap.peek()?;
        if self.base_ns.saturating_add(u64::from(off) * MS) > now_ns {
            return None;
        }
        self.heap.pop();
        Some((dest_id, sport as u16))
    }

    /// Removes and returns the entry due first, due or not (to make room).
    pub fn pop_earliest(&mut self) -> Option<(u32, u16)> {
        let Reverse((_, dest_id, sport)) = self.heap.pop()?;
        Some((dest_id, sport as u16))
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Moves the base to `now_ns` minus TIME_WAIT's length; entries due before it become due
    /// at once (they were already). O(n), once every ~24 days.
    fn rebase(&mut self, now_ns: u64) {
        let new_base = now_ns.saturating_sub(crate::tracker::TIME_WAIT_NS);
        let shift = u32::try_from(new_base.saturating_sub(self.base_ns) / MS).unwrap_or(u32::MAX);
        let entries: Vec<_> = std::mem::take(&mut self.heap)
            .into_iter()
            .map(|Reverse((off, id, port))| Reverse((off.saturating_sub(shift), id, port)))
            .collect();
        self.heap = BinaryHeap::from(entries);
        self.base_ns = new_base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;
    const DAY: u64 = 86_400 * SEC;

    #[test]
    fn entries_come_out_in_due_order_and_never_early() {
        let mut q = TimeWaitQueue::default();
        q.push(3 * SEC + 1, 1, 40001);
        q.push(2 * SEC, 2, 40002);
        assert_eq!(q.pop_due(SEC), None);
        assert_eq!(q.pop_due(2 * SEC), Some((2, 40002)));
        assert_eq!(q.pop_due(3 * SEC), None, "due 1 ns after 3 s: not at 3 s");
        assert_eq!(q.pop_due(3 * SEC + MS), Some((1, 40001)));
        assert!(q.is_empty());
    }

    #[test]
    fn the_base_moves_after_weeks_without_losing_or_reordering_entries() {
        let mut q = TimeWaitQueue::default();
        q.push(60 * SEC, 1, 1);
        // 30 days later, before anyone looked: the old entry is overdue.
        let later = 30 * DAY;
        q.push(later + 10 * SEC, 2, 2);
        q.push(later + 5 * SEC, 3, 3);
        assert_eq!(q.pop_due(later), Some((1, 1)));
        assert_eq!(q.pop_due(later), None);
        assert_eq!(q.pop_due(later + 5 * SEC), Some((3, 3)));
        assert_eq!(q.pop_due(later + 10 * SEC), Some((2, 2)));
        // And once more, 60 days on.
        q.push(90 * DAY + SEC, 4, 4);
        assert_eq!(q.pop_due(90 * DAY), None);
        assert_eq!(q.pop_due(90 * DAY + SEC), Some((4, 4)));
        assert_eq!(q.len(), 0);
    }
}
