//! Log lines go to stderr from a thread of their own, so that the event loop never waits for a
//! stderr nobody reads (`trace --json 2>&1 | shipper` with the shipper stuck, a full journal
//! pipe): it would stop reading the rings, and SIGTERM and `--duration` would go unheeded. Past
//! [`QUEUE`] lines waiting, new ones are dropped and counted, and the count is written where
//! they would have been: ahead of the next line that gets through. At exit,
//! [`LogQueue::finish`] gives the queue a moment to go out.
use std::{
    io::{self, Write},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc::{self, SyncSender, TrySendError},
        Arc,
    },
    time::{Duration, Instant},
};

/// Lines that may wait for stderr before new ones are dropped.
pub const QUEUE: usize = 4096;

#[derive(Default)]
struct Counts {
    /// Lines queued and not yet written.
    waiting: AtomicUsize,
    /// Lines dropped since the last line queued.
    dropped: AtomicU64,
}

/// A line, and how many were dropped just before it.
struct Queued {
    dropped_before: u64,
    line: Vec<u8>,
}

/// The sending side; cloned into every writer the log subscriber makes.
#[derive(Clone)]
pub struct LogQueue {
    tx: SyncSender<Queued>,
    counts: Arc<Counts>,
}

impl LogQueue {
    /// Starts the thread that writes queued lines to `sink` (stderr in the agent).
    pub fn start(sink: impl Write + Send + 'static, capacity: usize) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Queued>(capacity);
        let counts = Arc::new(Counts::default());
        let theirs = Arc::clone(&counts);
        std::thread::Builder::new()
            .name("portx-log".into())
            .spawn(move || {
                let mut sink = sink;
                for q in rx {
                    if q.dropped_before > 0 {
                        let _ = writeln!(
                            sink,
                            "portx-agent: {} log lines dropped: stderr was not taking them",
                            q.dropped_before
                        );
                    }
                    // A closed stderr loses the line, never the run.
                    let _ = sink.write_all(&q.line);
                    let _ = sink.flush();
                    theirs.waiting.fetch_sub(1, Ordering::Release);
                }
            })?;
        Ok(Self { tx, counts })
    }

    /// Lines dropped since the last line queued (which carries the count of those before it).
    pub fn dropped(&self) -> u64 {
        self.counts.dropped.load(Ordering::Relaxed)
    }

    /// Waits until every queued line is written, and the count of lines dropped after the last
    /// of them too, or until `grace` has passed; true if they were.
    pub fn finish(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        let written = || {
            while self.counts.waiting.load(Ordering::Acquire) > 0 {
                if Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            true
        };
        if !written() {
            return false;
        }
        if self.dropped() > 0 {
            // An empty line carries the count.
            let _ = self.clone().write(&[]);
            return written();
        }
        true
    }
}

impl Write for LogQueue {
    /// Queues `buf` (the log subscriber writes each line whole, at once) without waiting.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.counts.waiting.fetch_add(1, Ordering::Acquire);
        let dropped_before = self.counts.dropped.swap(0, Ordering::Relaxed);
        let q = Queued {
            dropped_before,
            line: buf.to_vec(),
        };
        match self.tx.try_send(q) {
            Ok(()) => {}
            Err(TrySendError::Full(q)) => {
                self.counts.waiting.fetch_sub(1, Ordering::Release);
                self.counts
                    .dropped
                    .fetch_add(q.dropped_before + 1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {
                self.counts.waiting.fetch_sub(1, Ordering::Release);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A stderr that takes nothing while the test holds its gate.
    #[derive(Clone)]
    struct Gated {
        gate: Arc<Mutex<()>>,
        out: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Lines written, and the counts the notices of dropped lines gave.
    fn read(out: &Mutex<Vec<u8>>) -> (Vec<String>, u64) {
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let mut lines = Vec::new();
        let mut dropped = 0;
        for l in text.lines() {
            match l
                .strip_prefix("portx-agent: ")
                .and_then(|l| l.strip_suffix(" log lines dropped: stderr was not taking them"))
            {
                Some(n) => dropped += n.parse::<u64>().unwrap(),
                None => lines.push(l.to_string()),
            }
        }
        (lines, dropped)
    }

    #[test]
    fn a_stuck_stderr_never_blocks_the_logger_and_what_it_drops_is_said() {
        let sink = Gated {
            gate: Arc::new(Mutex::new(())),
            out: Arc::new(Mutex::new(Vec::new())),
        };
        let closed = sink.gate.lock().unwrap();
        let mut q = LogQueue::start(sink.clone(), 8).unwrap();
        let began = Instant::now();
        for i in 0..100 {
            q.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        assert!(began.elapsed() < Duration::from_secs(1), "a write waited");
        assert!(!q.finish(Duration::from_millis(50)), "stderr took nothing");
        // Once stderr takes lines again, the queue goes out and the drops are said.
        drop(closed);
        assert!(q.finish(Duration::from_secs(5)));
        q.write_all(b"line 100\n").unwrap();
        assert!(q.finish(Duration::from_secs(5)));
        let (lines, dropped) = read(&sink.out);
        assert_eq!(lines.len() as u64 + dropped, 101, "{lines:?}");
        // A line or two with the stuck thread, 8 queued: the rest dropped.
        assert!(dropped >= 85, "{dropped}");
        assert_eq!(lines.first().map(String::as_str), Some("line 0"));
        assert_eq!(lines.last().map(String::as_str), Some("line 100"));
        assert_eq!(q.dropped(), 0, "said, so no longer counted");

        // Lines dropped after the last one written are said at exit.
        let closed = sink.gate.lock().unwrap();
        sink.out.lock().unwrap().clear();
        for i in 0..20 {
            q.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        assert!(q.dropped() > 0);
        drop(closed);
        assert!(q.finish(Duration::from_secs(5)));
        let (lines, dropped) = read(&sink.out);
        assert_eq!(lines.len() as u64 + dropped, 20, "{lines:?}");
        assert!(dropped > 0);
    }
}
