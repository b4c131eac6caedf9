//! Records reach stdout from a thread of their own. A reader that stops reading — a stalled log
//! shipper, a paused `less`, a full pipe — must not stop the agent: the trace loop goes on
//! draining the rings, serving `/metrics` and answering SIGTERM. The loop hands over what it
//! wrote between two flushes (whole records) as one batch; while the thread is stuck, up to
//! [`QUEUE_BYTES`] wait, and a batch that would pass that is dropped whole and its lines
//! counted ([`Queued::dropped_lines`]: the summary's `output_dropped`, and a warning on stderr),
//! never cut in half. A write error (the reader is gone) comes back from the next flush, and
//! the loop stops as it would have on a direct write.
use std::{
    io::{self, Write},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    time::Duration,
};

/// Most bytes waiting for a stuck stdout.
pub const QUEUE_BYTES: usize = 16 << 20;

struct Shared {
    queued: AtomicUsize,
    dropped_lines: AtomicU64,
    failed: Mutex<Option<io::Error>>,
}

/// The loop's end of the pipe to the thread: an `io::Write` whose `flush` hands the batch over.
pub struct Queued {
    batch: Vec<u8>,
    tx: mpsc::Sender<Vec<u8>>,
    shared: Arc<Shared>,
    limit: usize,
}

/// Waits, at exit, for what is queued to be written.
pub struct Finish {
    done: mpsc::Receiver<()>,
}

/// Starts the thread writing to `out`.
pub fn spawn(out: Box<dyn Write + Send>) -> io::Result<(Queued, Finish)> {
    spawn_with_limit(out, QUEUE_BYTES)
}

fn spawn_with_limit(mut out: Box<dyn Write + Send>, limit: usize) -> io::Result<(Queued, Finish)> {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let (done_tx, done) = mpsc::channel();
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        dropped_lines: AtomicU64::new(0),
        failed: Mutex::new(None),
    });
    let theirs = Arc::clone(&shared);
    std::thread::Builder::new()
        .name("portx-stdout".into())
        .spawn(move || {
            for batch in rx {
                let written = out.write_all(&batch).and_then(|()| out.flush());
                theirs.queued.fetch_sub(batch.len(), Ordering::AcqRel);
                if let Err(e) = written {
                    *theirs.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    break;
                }
            }
            let _ = done_tx.send(());
        })?;
    Ok((
        Queued {
            batch: Vec::new(),
            tx,
            shared,
            limit,
        },
        Finish { done },
    ))
}

impl Queued {
    /// Lines dropped since start because stdout did not keep up.
    pub fn dropped_lines(&self) -> u64 {
        self.shared.dropped_lines.load(Ordering::Relaxed)
    }

    /// A handle on the same count, for whoever reports it.
    pub fn dropped_counter(&self) -> DroppedLines {
        DroppedLines(Arc::clone(&self.shared))
    }
}

/// [`Queued::dropped_lines`], readable by whoever holds it.
#[derive(Clone)]
pub struct DroppedLines(Arc<Shared>);

impl DroppedLines {
    pub fn get(&self) -> u64 {
        self.0.dropped_lines.load(Ordering::Relaxed)
    }
}

impl Write for Queued {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.batch.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(e) = self
            .shared
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(e);
        }
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        let queued = self.shared.queued.load(Ordering::Acquire);
        // One batch past the limit is still taken when nothing waits: it exists already, and
        // stdout is keeping up.
        if queued > 0 && queued + batch.len() > self.limit {
            let lines = batch.iter().filter(|b| **b == b'\n').count() as u64;
            self.shared
                .dropped_lines
                .fetch_add(lines, Ordering::Relaxed);
            return Ok(());
        }
        self.shared.queued.fetch_add(batch.len(), Ordering::AcqRel);
        self.tx
            .send(batch)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the stdout thread is gone"))
    }
}

impl Drop for Queued {
    /// What was written since the last flush goes too (a `BufWriter` above empties into this
    /// on drop without flushing it).
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

impl Finish {
    /// Waits up to `grace` for the thread to write what was queued (its queue closes when the
    /// [`Queued`] end is dropped); false if it did not finish in time (stdout still stuck).
    pub fn wait(self, grace: Duration) -> bool {
        match self.done.recv_timeout(grace) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => true,
            Err(mpsc::RecvTimeoutError::Timeout) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stdout that takes everything, kept for the test to read.
    #[derive(Clone, Default)]
    struct Collected(Arc<Mutex<Vec<u8>>>);

    impl Write for Collected {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A writer that blocks until told to go on, then records what it got.
    struct Gate {
        open: mpsc::Receiver<()>,
        got: Arc<Mutex<Vec<u8>>>,
        waited: bool,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if !self.waited {
                let _ = self.open.recv();
                self.waited = true;
            }
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_stdout_costs_whole_batches_counted_not_the_writer() {
        let (go, open) = mpsc::channel();
        let got = Arc::new(Mutex::new(Vec::new()));
        let gate = Gate {
            open,
            got: Arc::clone(&got),
            waited: false,
        };
        let (mut q, finish) = spawn_with_limit(Box::new(gate), 20).unwrap();
        // The first batch is taken by the thread, which then blocks on the gate.
        q.write_all(b"one\n").unwrap();
        q.flush().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        // It still counts its 4 bytes: 4 + 15 fit in 20, the next 15 do not — that batch
        // goes, counted by its lines.
        q.write_all(b"two\nthree\nfour\n").unwrap();
        q.flush().unwrap();
        q.write_all(b"five\nsix\nseven\n").unwrap();
        q.flush().unwrap();
        assert_eq!(q.dropped_lines(), 3);
        let dropped = q.dropped_counter();
        go.send(()).unwrap();
        drop(q);
        assert!(finish.wait(Duration::from_secs(5)));
        assert_eq!(&*got.lock().unwrap(), b"one\ntwo\nthree\nfour\n");
        assert_eq!(dropped.get(), 3);
    }

    #[test]
    fn a_batch_past_the_limit_goes_out_when_nothing_waits() {
        let out = Collected::default();
        let (mut q, finish) = spawn_with_limit(Box::new(out.clone()), 8).unwrap();
        // A drain of full rings under --every-failure: one flush of far more than the limit.
        q.write_all(b"one\ntwo\nthree\nfour\n").unwrap();
        q.flush().unwrap();
        assert_eq!(q.dropped_lines(), 0);
        drop(q);
        assert!(finish.wait(Duration::from_secs(5)));
        assert_eq!(&*out.0.lock().unwrap(), b"one\ntwo\nthree\nfour\n");
    }

    #[test]
    fn a_write_error_comes_back_from_the_next_flush() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (mut q, finish) = spawn(Box::new(Closed)).unwrap();
        q.write_all(b"line\n").unwrap();
        q.flush().unwrap();
        assert!(finish.wait(Duration::from_secs(5)), "the thread ends");
        q.write_all(b"next\n").unwrap();
        let e = q.flush().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn what_was_written_goes_out_when_the_writer_is_dropped() {
        let out = Collected::default();
        let (mut q, finish) = spawn(Box::new(out.clone())).unwrap();
        q.write_all(b"last\n").unwrap();
        drop(q);
        assert!(finish.wait(Duration::from_secs(5)));
        assert_eq!(&*out.0.lock().unwrap(), b"last\n");
    }

    #[test]
    fn finish_gives_up_on_a_stdout_that_stays_stuck() {
        let (_go, open) = mpsc::channel::<()>();
        let gate = Gate {
            open,
            got: Arc::default(),
            waited: false,
        };
        let (mut q, finish) = spawn(Box::new(gate)).unwrap();
        q.write_all(b"stuck\n").unwrap();
        q.flush().unwrap();
        drop(q);
        assert!(!finish.wait(Duration::from_millis(100)));
    }
}
