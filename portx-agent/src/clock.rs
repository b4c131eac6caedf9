//! Kernel timestamps (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) to wall-clock Unix nanoseconds. The
//! offset between the two clocks is taken once; NTP slews after that are not followed (a
//! long-running agent drifts by at most what NTP corrects, milliseconds a day).
use std::sync::OnceLock;

fn now(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; both clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC now, in ns, as the kernel's event timestamps read it: in a time namespace
/// the agent's own CLOCK_MONOTONIC is shifted by the namespace's offset, the kernel's is not.
pub fn monotonic_ns() -> u64 {
    let ours = i128::from(now(libc::CLOCK_MONOTONIC));
    (ours - timens_offset_ns()).clamp(0, i128::from(u64::MAX)) as u64
}

/// The monotonic offset of the agent's time namespace (0 outside one, or without time
/// namespaces), read once.
fn timens_offset_ns() -> i128 {
    static OFFSET: OnceLock<i128> = OnceLock::new();
    *OFFSET.get_or_init(|| {
        std::fs::read_to_string("/proc/self/timens_offsets")
            .ok()
            .and_then(|text| parse_timens_monotonic(&text))
            .unwrap_or(0)
    })
}

/// The `monotonic <secs> <nanosecs>` line of `/proc/<pid>/timens_offsets`, in ns.
fn parse_timens_monotonic(text: &str) -> Option<i128> {
    text.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        if fields.next()? != "monotonic" {
            return None;
        }
        let secs: i64 = fields.next()?.parse().ok()?;
        let nanos: i64 = fields.next()?.parse().ok()?;
        Some(i128::from(secs) * 1_000_000_000 + i128::from(nanos))
    })
}

fn offset() -> i128 {
    static OFFSET: OnceLock<i128> = OnceLock::new();
    *OFFSET.get_or_init(|| {
        let mono = monotonic_ns();
        let real = now(libc::CLOCK_REALTIME);
        i128::from(real) - i128::from(mono)
    })
}

/// Unix time in ns of a CLOCK_MONOTONIC timestamp.
pub fn wall_ns(mono_ns: u64) -> u64 {
    (i128::from(mono_ns) + offset()).clamp(0, i128::from(u64::MAX)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_monotonic_offset_of_a_time_namespace() {
        let text = "monotonic      -3600        500\nboottime          7          0\n";
        assert_eq!(parse_timens_monotonic(text), Some(-3_599_999_999_500));
        assert_eq!(parse_timens_monotonic("boottime 1 0\n"), None);
        assert_eq!(parse_timens_monotonic("monotonic x 0\n"), None);
    }

    #[test]
    fn wall_clock_of_now_is_close_to_system_time() {
        let sys = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128;
        let ours = i128::from(wall_ns(monotonic_ns()));
        assert!((sys - ours).abs() < 50_000_000, "off by {} ns", sys - ours);
    }
}
