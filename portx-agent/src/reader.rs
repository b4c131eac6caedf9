//! Reads the `EVENTS_<n>` ring buffers (one per group of CPUs) and hands their records on in
//! time order: every ring's fd is registered with tokio (`AsyncFd`); on any readiness every ring
//! is drained into [`Reorder`], which releases what no ring can still precede (see reorder.rs).
//! Records the watermark holds back are looked at again a millisecond later, so none waits
//! for the next wake-up.
use std::{future::poll_fn, io, os::fd::AsRawFd, task::Poll, time::Duration};

use tokio::io::{unix::AsyncFd, Interest};

use crate::{
    clock,
    reorder::Reorder,
    ring::{Ring, Stop},
};

/// Slack for the kernel's record times (`ktime_get_mono_fast_ns`) against the agent's
/// CLOCK_MONOTONIC reading: the two are the same clock read through different snapshots of the
/// timekeeper, apart by at most what NTP slews within a tick (500 ppm of 4 ms: 2 µs).
const CLOCK_SLACK_NS: u64 = 10_000;

/// How soon held-back records are looked at again when nothing wakes the agent.
const LOOK_AGAIN: Duration = Duration::from_millis(1);

/// Registers a ring buffer (one of the events rings, or aya-log's) with tokio for readability.
pub fn register<T: AsRawFd>(ring: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `T` is a ring buffer (or a type wrapping one) that owns its map fd for its whole
    // life and always returns that same fd; the AsyncFd owns `T`, so the fd outlives the
    // registration.
    Ok(unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }?)
}

struct Watched {
    fd: AsyncFd<Ring>,
    /// When this ring was last read up to its producer position (CLOCK_MONOTONIC ns).
    caught_up_at: u64,
    /// The last look stopped at a record still being written.
    busy: bool,
}

pub struct Reader {
    rings: Vec<Watched>,
    reorder: Reorder,
}

impl Reader {
    pub fn new(rings: Vec<Ring>) -> io::Result<Self> {
        let rings = rings
            .into_iter()
            .map(|r| {
                Ok(Watched {
                    fd: register(r)?,
                    caught_up_at: 0,
                    busy: false,
                })
            })
            .collect::<io::Result<_>>()?;
        Ok(Self {
            rings,
            reorder: Reorder::default(),
        })
    }

    /// Waits until a ring has records (or, with records held back or a ring stopped at a record
    /// still being written, a millisecond at most),
    /// then hands on each record that is due, in time order. Returns how many. Cancel-safe:
    /// what was read and not handed on stays held.
    pub async fn drain(&mut self, mut f: impl FnMut(&[u8])) -> io::Result<usize> {
        // A ring left at a record still being written is looked at again soon too: the records
        // behind it (a failure that forced a wake-up, say) may wake nothing more.
        if self.reorder.is_empty() && !self.rings.iter().any(|w| w.busy) {
            self.readable().await?;
        } else {
            tokio::select! {
                r = self.readable() => r?,
                _ = tokio::time::sleep(LOOK_AGAIN) => {}
            }
        }
        let mut n = self.pass(&mut f);
        if !self.reorder.is_empty() {
            // Records younger than the slack when the first look began (a failure that woke
            // the agent at once, say) are usually older than it by now.
            n += self.pass(&mut f);
        }
        Ok(n)
    }

    /// Reads the rings into the reorder buffer without handing anything on, while it holds
    /// less than `limit` bytes: the rings' space is freed while their records cannot be handled
    /// yet (during the start-up seed). Returns the bytes held.
    pub fn hold(&mut self, limit: usize) -> usize {
        let reorder = &mut self.reorder;
        for w in &mut self.rings {
            if reorder.held_bytes() >= limit {
                break;
            }
            let (_, stop) = w.fd.get_mut().drain(|r| reorder.push(r));
            w.busy = stop == Stop::Busy;
        }
        self.reorder.held_bytes()
    }

    /// Reads every ring without waiting and hands on what is due.
    pub fn drain_pending(&mut self, f: impl FnMut(&[u8])) -> usize {
        self.pass(f)
    }

    /// Reads every ring and hands on everything read, held records included (at exit, once
    /// the programs are detached, so that nothing written is lost). A record still being
    /// written (a program run that began before the detach) is waited for, up to `patience`:
    /// returns how many records were handed on, and whether a ring was still busy then.
    pub fn drain_all(&mut self, mut f: impl FnMut(&[u8]), patience: Duration) -> (usize, bool) {
        let deadline = std::time::Instant::now() + patience;
        let mut n = self.pass(&mut f);
        while self.rings.iter().any(|w| w.busy) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
            n += self.pass(&mut f);
        }
        let busy = self.rings.iter().any(|w| w.busy);
        (n + self.reorder.release_all(f), busy)
    }

    /// Records handed on after a newer one (see reorder.rs); 0 unless the clocks misbehave.
    pub fn late(&self) -> u64 {
        self.reorder.late()
    }

    /// Resolves once any ring is readable, clearing the readiness of those that are: records
    /// written after that wake it again.
    async fn readable(&self) -> io::Result<()> {
        poll_fn(|cx| {
            let mut ready = false;
            for w in &self.rings {
                match w.fd.poll_read_ready(cx) {
                    Poll::Ready(Ok(mut guard)) => {
                        guard.clear_ready();
                        ready = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            if ready {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// One look at every ring, then the release of what is due.
    fn pass(&mut self, f: impl FnMut(&[u8])) -> usize {
        let now = clock::monotonic_ns();
        let reorder = &mut self.reorder;
        for w in &mut self.rings {
            let (_, stop) = w.fd.get_mut().drain(|r| reorder.push(r));
            w.busy = stop == Stop::Busy;
            if stop == Stop::CaughtUp {
                w.caught_up_at = now;
            }
        }
        let watermark = match self.rings.len() {
            // One ring is already in the order its records were reserved.
            1 => u64::MAX,
            _ => self
                .rings
                .iter()
                .map(|w| w.caught_up_at)
                .min()
                .unwrap_or(now)
                .saturating_sub(CLOCK_SLACK_NS),
        };
        self.reorder.release_before(watermark, f)
    }
}
