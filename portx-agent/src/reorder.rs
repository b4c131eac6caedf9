//! Merges the records of several ring buffers into time order.
//!
//! Each CPU writes to its own ring, so the records of one socket (its connect on one CPU, the
//! SYN-ACK's state change in another CPU's softirq) can sit in two rings; the tracker needs them
//! in the order they happened. Every record carries the time it took once its slot was reserved
//! (`EventHeader::ts_ns`), so a record reserved after the agent looked at a ring carries a later
//! time than that look. The reader tells this buffer a *watermark*: the earliest of the times at
//! which each ring was last seen read up to its producer position. No record still unread can be
//! older than that, so every held record older than it is released, oldest first; the rest wait
//! for a later look.
//!
//! Two changes of one socket are ordered by the socket's lock: the first record is submitted
//! before the second one's program runs, hence before its time is read. A record older than one
//! already released would mean the watermark was wrong (a clock step between the kernel's and
//! the agent's reading of CLOCK_MONOTONIC, say); it is still handed on, and counted as `late`.
use portx_common::TS_OFFSET;

/// A record held back: where its bytes are in `bytes`, and its time.
#[derive(Debug, Clone, Copy)]
struct Held {
    ts: u64,
    start: usize,
    len: usize,
}

#[derive(Debug, Default)]
pub struct Reorder {
    bytes: Vec<u8>,
    held: Vec<Held>,
    /// Spare buffer for compacting `bytes` without allocating each time.
    spare: Vec<u8>,
    /// The newest time handed on so far.
    released_up_to: u64,
    late: u64,
}

/// The kernel time a record carries; 0 for one too short to have it (the decoder rejects it).
pub fn record_time(record: &[u8]) -> u64 {
    record
        .get(TS_OFFSET..TS_OFFSET + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_ne_bytes)
        .unwrap_or(0)
}

impl Reorder {
    /// Holds a copy of `record`.
    pub fn push(&mut self, record: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(record);
        self.held.push(Held {
            ts: record_time(record),
            start,
            len: record.len(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Bytes of the records held (`bytes` holds those alone: compacted on each release).
    pub fn held_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Records handed on that were older than one handed on before them.
    pub fn late(&self) -> u64 {
        self.late
    }

    /// Hands on, oldest first, every held record older than `watermark`; returns how many.
    /// Records of equal time keep the order they were pushed in (one ring's slot order).
    pub fn release_before(&mut self, watermark: u64, mut f: impl FnMut(&[u8])) -> usize {
        if self.held.is_empty() {
            return 0;
        }
        // `held` is a few runs already in time order, or nearly: what an earlier pass kept
        // back, then each ring's records in slot order. The stable sort finds those runs and
        // merges them (an unstable one sorted from scratch: 12 % of the agent's CPU under the
        // RST storm; this one takes a scratch buffer a pass), and equal times keep the order they
        // were pushed in.
        self.held.sort_by_key(|h| h.ts);
        let n = self.held.partition_point(|h| h.ts < watermark);
        for h in &self.held[..n] {
            // (A record too short to carry a time is a decode error, not a late one.)
            if h.ts != 0 && h.ts < self.released_up_to {
                self.late += 1;
            }
            self.released_up_to = self.released_up_to.max(h.ts);
            f(&self.bytes[h.start..h.start + h.len]);
        }
        if n == self.held.len() {
            self.held.clear();
            self.bytes.clear();
        } else if n > 0 {
            self.held.drain(..n);
            self.spare.clear();
            for h in &mut self.held {
                let start = self.spare.len();
                self.spare
                    .extend_from_slice(&self.bytes[h.start..h.start + h.len]);
                h.start = start;
            }
            std::mem::swap(&mut self.bytes, &mut self.spare);
        }
        n
    }

    /// Hands on everything held, oldest first (at exit: nothing read is left behind).
    pub fn release_all(&mut self, f: impl FnMut(&[u8])) -> usize {
        self.release_before(u64::MAX, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record of `len` bytes with time `ts` and a tag in its first byte.
    fn record(ts: u64, tag: u8) -> Vec<u8> {
        let mut r = vec![0u8; 40];
        r[0] = tag;
        r[TS_OFFSET..TS_OFFSET + 8].copy_from_slice(&ts.to_ne_bytes());
        r
    }

    fn release(r: &mut Reorder, watermark: u64) -> Vec<u8> {
        let mut out = Vec::new();
        r.release_before(watermark, |b| out.push(b[0]));
        out
    }

    #[test]
    fn merges_two_rings_in_time_order_up_to_the_watermark() {
        let mut r = Reorder::default();
        // Ring 0 then ring 1, each in its own order.
        for (ts, tag) in [(10, b'a'), (30, b'c'), (50, b'e')] {
            r.push(&record(ts, tag));
        }
        for (ts, tag) in [(20, b'b'), (40, b'd')] {
            r.push(&record(ts, tag));
        }
        assert_eq!(release(&mut r, 45), b"abcd");
        // 50 is not older than the watermark: it waits, its bytes intact after compaction.
        r.push(&record(60, b'f'));
        assert_eq!(release(&mut r, 45), b"");
        assert_eq!(release(&mut r, 61), b"ef");
        assert!(r.is_empty());
        assert_eq!(r.late(), 0);
    }

    #[test]
    fn equal_times_keep_the_order_they_were_read_in() {
        let mut r = Reorder::default();
        for tag in [b'x', b'y', b'z'] {
            r.push(&record(7, tag));
        }
        assert_eq!(release(&mut r, 8), b"xyz");
    }

    #[test]
    fn a_record_older_than_one_handed_on_is_still_handed_on_and_counted_late() {
        let mut r = Reorder::default();
        r.push(&record(100, b'a'));
        assert_eq!(release(&mut r, 101), b"a");
        r.push(&record(90, b'b'));
        assert_eq!(release(&mut r, 200), b"b");
        assert_eq!(r.late(), 1);
    }

    #[test]
    fn a_short_record_is_kept_with_time_zero_and_released_first() {
        let mut r = Reorder::default();
        r.push(&record(5, b'a'));
        r.push(&[b's', 1, 2]);
        let mut out = Vec::new();
        assert_eq!(r.release_all(|b| out.push(b.to_vec())), 2);
        assert_eq!(out[0], vec![b's', 1, 2]);
        assert_eq!(out[1][0], b'a');
    }
}
