//! The bench's syscall tax: what portx's hooks cost syscalls that are not connect()s.
//!
//! While any classic syscall tracepoint is attached (portx's on connect()'s and bind()'s exits in
//! tracepoint mode), the kernel sends every syscall of every thread on the machine through its
//! syscall-tracing path, where each looks itself up among the traced ones; a program at a
//! syscall's entry adds the path's entry half. A proxy's reads, writes and epoll_waits pay it,
//! though no program runs for them. fexit on a syscall's body (portx's fentry mode) adds nothing
//! to other syscalls.
//!
//! Measured on `getppid()`, a syscall that does almost nothing, so that the path is a large part
//! of its cost (the share is the worst case for a syscall, not a typical one): bursts with
//! nothing attached alternate with bursts with the floor's empty programs on portx's hooks (and
//! on the hooks to compare them with), attached and detached between bursts (a fraction of a
//! second, where starting and stopping an agent takes seconds).
//! For these syscalls no program of portx runs, so empty ones cost them what portx's do. This
//! machine's speed drifts by a fifth over seconds; two bursts tens of milliseconds apart share
//! the drift, and the median of their differences leaves it out.
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{json, Value};

use crate::{bench, floor::Floor};

/// Calls a burst (about 45 ms here; attaching and detaching the floor between two takes longer).
const BURST: u32 = 300_000;

/// Nanoseconds a `getppid()` took over a burst of [`BURST`] calls.
fn burst_ns() -> f64 {
    let start = Instant::now();
    for _ in 0..BURST {
        // SAFETY: getppid takes no arguments and cannot fail. Through syscall(2), so that no
        // libc could answer it from a cache.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
    start.elapsed().as_nanos() as f64 / f64::from(BURST)
}

/// Rounds of bursts for `seconds`: in each, one burst with nothing attached and one with empty
/// programs on each of `variants` (sets of hooks as portx's `started` record lists them), in an
/// order rotated each round. For each variant, one `(nothing, hooked)` pair of nanoseconds a
/// call per round.
pub fn pairs(variants: &[Vec<String>], seconds: f64) -> anyhow::Result<Vec<Vec<(f64, f64)>>> {
    let run = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut pairs = vec![Vec::new(); variants.len()];
    let mut round = 0;
    while round == 0 || start.elapsed() < run {
        // Slot 0 is nothing attached, slot i + 1 variant i.
        let mut order: Vec<usize> = (0..=variants.len()).collect();
        order.rotate_left(round % (variants.len() + 1));
        let mut ns = vec![0.0; order.len()];
        for slot in order {
            ns[slot] = match slot {
                0 => burst_ns(),
                v => {
                    let _floor = Floor::attach(&variants[v - 1]).context("floor")?;
                    burst_ns()
                }
            };
        }
        for (v, p) in pairs.iter_mut().enumerate() {
            p.push((ns[0], ns[v + 1]));
        }
        round += 1;
    }
    Ok(pairs)
}

/// One variant's pairs summed up: medians with nothing and hooked, and the median difference
/// with its middle half (quartiles).
pub fn summary(pairs: &[(f64, f64)]) -> Value {
    let mut nothing: Vec<f64> = pairs.iter().map(|p| p.0).collect();
    let mut hooked: Vec<f64> = pairs.iter().map(|p| p.1).collect();
    let mut added: Vec<f64> = pairs.iter().map(|p| p.1 - p.0).collect();
    let nothing = bench::median(&mut nothing);
    let added_median = bench::median(&mut added);
    // `added` is sorted now.
    let quartile = |q: f64| added.get(((added.len() as f64 - 1.0) * q).round() as usize);
    json!({
        "pairs": pairs.len(),
        "nothing_ns": nothing,
        "hooked_ns": bench::median(&mut hooked),
        "added_ns": added_median,
        "added_ns_q1": quartile(0.25),
        "added_ns_q3": quartile(0.75),
        "added_share": added_median / nothing,
    })
}

/// The summary as the report's words.
pub fn line(s: &Value) -> String {
    let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    format!(
        "{:.1} ns with nothing attached, {:+.1} ns a call ({:+.1} %; middle half of the pairs {:+.1} to {:+.1}), {} pairs of bursts",
        f("nothing_ns"),
        f("added_ns"),
        100.0 * f("added_share"),
        f("added_ns_q1"),
        f("added_ns_q3"),
        s["pairs"],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tax_is_the_median_difference_within_pairs() {
        // The machine slows down by half between pairs; the hooks add 10 ns, once 30.
        let pairs = [
            (100.0, 110.0),
            (150.0, 160.0),
            (100.0, 130.0),
            (150.0, 160.0),
            (101.0, 111.0),
        ];
        let s = summary(&pairs);
        assert_eq!(s["pairs"], 5);
        assert_eq!(s["nothing_ns"], 101.0);
        assert_eq!(s["hooked_ns"], 130.0);
        assert_eq!(s["added_ns"], 10.0, "{s}");
        assert_eq!(s["added_ns_q1"], 10.0);
        assert_eq!(s["added_ns_q3"], 10.0);
        assert!((s["added_share"].as_f64().unwrap() - 10.0 / 101.0).abs() < 1e-12);
        let words = line(&s);
        assert!(words.contains("+10.0 ns a call"), "{words}");
    }

    #[test]
    fn a_burst_makes_its_calls() {
        let ns = burst_ns();
        assert!(ns > 0.0 && ns < 1e6, "{ns}");
    }
}
