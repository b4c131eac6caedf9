//! Reads the `EVENTS` ring buffer: the fd is registered with tokio (`AsyncFd`); on readiness
//! everything available is drained in one batch, readiness is cleared, and the buffer is drained
//! once more so that a record that landed between the last read and the clear is not left
//! waiting for the next wake-up.
use std::{io, os::fd::AsRawFd};

use aya::maps::{MapData, RingBuf};
use tokio::io::{unix::AsyncFd, Interest};

/// Registers a ring buffer (the events one, or aya-log's) with tokio for readability.
pub fn register<T: AsRawFd>(ring: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `T` is an aya ring buffer (or a type wrapping one) that owns its map fd for its
    // whole life and always returns that same fd; the AsyncFd owns `T`, so the fd outlives the
    // registration.
    Ok(unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }?)
}

pub struct Reader {
    fd: AsyncFd<RingBuf<MapData>>,
}

impl Reader {
    pub fn new(ring: RingBuf<MapData>) -> io::Result<Self> {
        Ok(Self {
            fd: register(ring)?,
        })
    }

    /// Waits until records are available, then hands each one to `f`. Returns how many.
    pub async fn drain(&mut self, mut f: impl FnMut(&[u8])) -> io::Result<usize> {
        let mut guard = self.fd.readable_mut().await?;
        let mut n = drain_now(guard.get_inner_mut(), &mut f);
        guard.clear_ready();
        n += drain_now(guard.get_inner_mut(), &mut f);
        Ok(n)
    }

    /// Drains without waiting (at exit, so that nothing already written is lost).
    pub fn drain_pending(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        drain_now(self.fd.get_mut(), &mut f)
    }
}

fn drain_now(ring: &mut RingBuf<MapData>, f: &mut impl FnMut(&[u8])) -> usize {
    let mut n = 0;
    while let Some(item) = ring.next() {
        f(&item);
        n += 1;
    }
    n
}
