//! One BPF ring buffer, consumed from its memory mapping (the layout of
//! `kernel/bpf/ringbuf.c`): a read-write page holding the consumer position, then a read-only
//! page holding the producer position, then the data pages, mapped twice in a row so that a
//! record that wraps around the end reads as one slice.
//!
//! Each record starts with an 8-byte header: its length with the BUSY bit (reserved, not yet
//! submitted) and the DISCARD bit, then the page offset the kernel uses. Records are 8-byte
//! aligned. Unlike aya's reader this one says why it stopped: at the producer position (every
//! record reserved before it looked has been read) or at a record still being written — which
//! is what merging several rings in time order needs to know.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, RawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use aya::maps::MapData;

// The positions are the kernel's `unsigned long`s, read here as u64.
#[cfg(not(target_pointer_width = "64"))]
compile_error!("ring.rs reads the ring positions as 64-bit values");

const BUSY_BIT: u32 = 1 << 31;
const DISCARD_BIT: u32 = 1 << 30;
const HEADER_BYTES: usize = 8;

/// Why a drain stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// At the producer position read when the drain started: every record reserved before that
    /// was read.
    CaughtUp,
    /// At a record reserved but not yet submitted; the ones behind it wait for it.
    Busy,
}

/// A shared mapping, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(fd: RawFd, len: usize, prot: libc::c_int, offset: usize) -> io::Result<Self> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ring offset too large"))?;
        // SAFETY: a fresh shared mapping of a ring buffer map's fd; the kernel checks the length,
        // offset and protection against what the ring allows.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd,
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null pointer"))?;
        Ok(Self { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; nothing borrows the mapping past
        // the Ring that owns it.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The page size: the unit of a ring's mapping, and the smallest ring the kernel takes.
pub fn page_size() -> io::Result<usize> {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .map_err(|_| io::Error::other("sysconf(_SC_PAGESIZE) failed"))
}

pub struct Ring {
    map: MapData,
    consumer: Mapping,
    producer: Mapping,
    page: usize,
    mask: usize,
    /// Our consumer position (we are its only writer).
    pos: u64,
}

// SAFETY: the mappings are owned by the Ring and only read or written through &mut self (the
// consumer position) or atomically.
unsafe impl Send for Ring {}

impl Ring {
    /// Maps the ring buffer `map` of `bytes` bytes (its `max_entries`).
    pub fn new(map: MapData, bytes: usize) -> io::Result<Self> {
        let page = page_size()?;
        if !bytes.is_power_of_two() || !bytes.is_multiple_of(page) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ring size {bytes} is not a power-of-two multiple of the page size {page}"),
            ));
        }
        let fd = map.fd().as_fd().as_raw_fd();
        let consumer = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page + 2 * bytes, libc::PROT_READ, page)?;
        let mut ring = Self {
            map,
            consumer,
            producer,
            page,
            mask: bytes - 1,
            pos: 0,
        };
        ring.pos = ring.consumer_pos().load(Ordering::Acquire);
        Ok(ring)
    }

    fn consumer_pos(&self) -> &AtomicU64 {
        // SAFETY: the page starts with the kernel's `unsigned long consumer_pos`, page-aligned;
        // 64-bit targets only (u64 == unsigned long).
        unsafe { &*self.consumer.ptr.as_ptr().cast::<AtomicU64>() }
    }

    fn producer_pos(&self) -> &AtomicU64 {
        // SAFETY: as consumer_pos, for the producer page.
        unsafe { &*self.producer.ptr.as_ptr().cast::<AtomicU64>() }
    }

    /// Hands every submitted record up to the producer position (read once, at the start) to
    /// `f`, skipping discarded ones; stops early at a record still being written.
    pub fn drain(&mut self, mut f: impl FnMut(&[u8])) -> (usize, Stop) {
        let end = self.producer_pos().load(Ordering::Acquire);
        let data = self.page;
        let mut n = 0;
        let mut stop = Stop::CaughtUp;
        while self.pos < end {
            let at = data + (self.pos as usize & self.mask);
            // SAFETY: `at` is within the first copy of the data pages, 8-byte aligned (every
            // record is); the header is written by the kernel with release semantics.
            let header = unsafe { &*self.producer.ptr.as_ptr().add(at).cast::<AtomicU32>() }
                .load(Ordering::Acquire);
            if header & BUSY_BIT != 0 {
                stop = Stop::Busy;
                break;
            }
            let len = (header & !(BUSY_BIT | DISCARD_BIT)) as usize;
            if header & DISCARD_BIT == 0 {
                let start = at + HEADER_BYTES;
                // The kernel never reserves more than the ring holds; a length past the double
                // mapping would be a kernel bug, and reading it would fault: handed on empty, it
                // counts as a record that could not be decoded.
                let record: &[u8] = if start + len <= self.producer.len {
                    // SAFETY: in bounds (checked), and the kernel does not touch a submitted
                    // record until the consumer position moves past it.
                    unsafe {
                        std::slice::from_raw_parts(self.producer.ptr.as_ptr().add(start), len)
                    }
                } else {
                    &[]
                };
                f(record);
                n += 1;
            }
            self.pos += ((HEADER_BYTES + len + 7) & !7) as u64;
        }
        self.consumer_pos().store(self.pos, Ordering::Release);
        (n, stop)
    }
}

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}
