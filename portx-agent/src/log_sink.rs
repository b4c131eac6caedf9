//! Where log lines go while a screen owns the terminal (`portx-agent top`): kept in memory
//! (shown at the bottom of the screen) instead of written over the screen, and written to stderr
//! once the terminal is back. Before and after capture, lines go straight to stderr.
use std::{
    collections::VecDeque,
    io::{self, Write},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex,
    },
};

/// Lines kept while capturing; older ones are counted, not kept.
pub const KEEP: usize = 500;

pub struct LogSink {
    capturing: AtomicBool,
    lines: Mutex<VecDeque<String>>,
    /// Lines dropped past [`KEEP`].
    dropped: AtomicU64,
}

/// The process-wide sink `main` hands to the tracing subscriber for `top`.
pub static LOGS: LogSink = LogSink::new();

impl Default for LogSink {
    fn default() -> Self {
        Self::new()
    }
}

impl LogSink {
    pub const fn new() -> Self {
        Self {
            capturing: AtomicBool::new(false),
            lines: Mutex::new(VecDeque::new()),
            dropped: AtomicU64::new(0),
        }
    }

    /// A writer for one log event (tracing-subscriber's `MakeWriter` is any `Fn() -> Write`).
    pub fn writer(&self) -> LineWriter<'_> {
        LineWriter {
            sink: self,
            buf: Vec::new(),
        }
    }

    /// From now on, keep lines instead of writing them.
    pub fn capture(&self) {
        self.capturing.store(true, Ordering::SeqCst);
    }

    /// The last `n` lines kept, oldest first.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines
            .iter()
            .skip(lines.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// Stops capturing and writes what was kept to `out` (with a line saying how many were
    /// dropped, if any).
    pub fn release(&self, out: &mut impl Write) -> io::Result<()> {
        self.capturing.store(false, Ordering::SeqCst);
        let kept: Vec<String> = self
            .lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        let dropped = self.dropped.swap(0, Ordering::SeqCst);
        if dropped > 0 {
            writeln!(
                out,
                "portx-agent: {dropped} earlier log lines were not kept (at most {KEEP})"
            )?;
        }
        for l in kept {
            writeln!(out, "{l}")?;
        }
        out.flush()
    }

    fn take(&self, buf: &[u8]) {
        if !self.capturing.load(Ordering::SeqCst) {
            // Logging must not fail the program; stderr gone is nothing to report to.
            let _ = io::stderr().write_all(buf);
            return;
        }
        let text = String::from_utf8_lossy(buf);
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        for l in text.lines().filter(|l| !l.is_empty()) {
            if lines.len() == KEEP {
                lines.pop_front();
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            lines.push_back(l.to_string());
        }
    }
}

/// Collects one event's output; hands it to the sink when dropped.
pub struct LineWriter<'a> {
    sink: &'a LogSink,
    buf: Vec<u8>,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter<'_> {
    fn drop(&mut self) {
        self.sink.take(&self.buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(sink: &LogSink, text: &str) {
        let mut w = sink.writer();
        w.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn captured_lines_are_kept_and_released_in_order() {
        let sink = LogSink::new();
        sink.capture();
        log(&sink, "one\n");
        log(&sink, "two\nthree\n");
        assert_eq!(sink.tail(2), ["two", "three"]);
        let mut out = Vec::new();
        sink.release(&mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "one\ntwo\nthree\n");
        assert!(sink.tail(5).is_empty(), "released lines are not kept twice");
    }

    #[test]
    fn past_the_bound_the_oldest_go_and_are_counted() {
        let sink = LogSink::new();
        sink.capture();
        for i in 0..KEEP + 3 {
            log(&sink, &format!("line {i}\n"));
        }
        assert_eq!(sink.tail(1), [format!("line {}", KEEP + 2)]);
        let mut out = Vec::new();
        sink.release(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("portx-agent: 3 earlier log lines were not kept"));
        assert!(text.contains("line 3\n") && !text.contains("line 2\n"));
    }
}
