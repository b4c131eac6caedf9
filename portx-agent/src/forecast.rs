//! How long until a destination runs out of ports: rates sampled from the tracker's per
//! destination counters about once a second, smoothed (an exponentially weighted mean of the
//! rates measured so far, time constant [`TAU_SECS`]), and projected.
//!
//! - churn: new ports charged to the destination per second;
//! - TIME_WAIT: by Little's law the ports in TIME_WAIT settle at (rate entering TIME_WAIT) ×
//!   60 s (`TCP_TIMEWAIT_LEN`), but never above the namespace's `tcp_max_tw_buckets` (past it a
//!   closing socket skips TIME_WAIT and frees its port), so `projected_in_use` = live ports +
//!   that; where `tcp_tw_reuse`
//!   lets connect() take a TIME_WAIT port to the destination over once it is a second or two
//!   old, only TIME_WAIT younger than that keeps connect() from a port (see
//!   [`Rates::forecast`]);
//! - time to exhaustion: (range − in use) / growth of in-use ports (ports in the range: one bound
//!   explicitly outside it does not fill it), given only when the growth
//!   is positive, in-use ports rose lately (the smoothed growth takes ~50 s to fade after they
//!   stop), and either the projection reaches the range or live ports (not TIME_WAIT, which
//!   levels off) are what grows. 0 once nothing is left.
use std::collections::HashMap;

use portx_common::tcp_state as st;

use crate::tracker::{DestKey, DestStats};

/// Smoothing time constant: rates follow changes within about this long.
pub const TAU_SECS: f64 = 10.0;
/// TIME_WAIT length on Linux (`TCP_TIMEWAIT_LEN`).
pub const TIME_WAIT_SECS: f64 = 60.0;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Forecast {
    pub churn_per_s: f64,
    pub time_wait_per_s: f64,
    pub projected_in_use: u32,
    pub time_to_exhaustion_s: Option<f64>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at_ns: u64,
    opened: u64,
    tw_entered: u64,
    /// Ports in use in the range ([`DestStats::in_range`]): what growth and exhaustion are about.
    in_use: u32,
    live: u32,
    /// [`DestStats::resync_net`] and [`DestStats::resync_live_net`]: left out of the growth.
    resync_net: i64,
    resync_live_net: i64,
    churn: f64,
    tw_rate: f64,
    growth: f64,
    live_growth: f64,
    /// The weight the smoothed rates above have gathered (1 - e^(-t/TAU) after t seconds of
    /// samples): they start from 0, and divided by it they are the weighted mean of the rates
    /// measured so far. Undivided, the first forecast would be a tenth of the rate measured,
    /// and an agent started in the middle of an outage would report a tenth of the churn.
    weight: f64,
    /// The last sample at which in-use ports were more than at the one before.
    rose_at_ns: u64,
    /// Samples since this destination (re)appeared: rates need two.
    count: u32,
}

/// How long ago in-use ports may last have risen for the growth to count as going on: at least
/// this, or three times the interval the growth rate itself implies.
const RECENT_RISE_SECS: f64 = 5.0;

/// Per destination rate state. Destinations not sampled in a pass are dropped.
#[derive(Default)]
pub struct Rates {
    samples: HashMap<DestKey, Sample>,
    /// When the previous pass was taken (0: none yet).
    last_pass_ns: u64,
}

fn live(stats: &DestStats) -> u32 {
    stats
        .in_use
        .saturating_sub(stats.by_state[st::TIME_WAIT as usize])
}

impl Rates {
    pub fn new() -> Self {
        Self::default()
    }

    /// Samples every destination at `now_ns` (monotonic).
    pub fn sample<'a>(
        &mut self,
        now_ns: u64,
        dests: impl Iterator<Item = (DestKey, &'a DestStats)>,
    ) {
        let mut next = HashMap::with_capacity(self.samples.len());
        for (key, stats) in dests {
            let fresh = Sample {
                at_ns: now_ns,
                opened: stats.opened,
                tw_entered: stats.tw_entered,
                in_use: stats.in_range(),
                live: live(stats),
                resync_net: stats.resync_net,
                resync_live_net: stats.resync_live_net,
                churn: 0.0,
                tw_rate: 0.0,
                growth: 0.0,
                live_growth: 0.0,
                weight: 0.0,
                rose_at_ns: 0,
                count: 1,
            };
            // A destination that appeared since the previous pass had nothing then: what it has
            // now came in since (a burst between two passes is a rate, not a baseline).
            let empty = Sample {
                at_ns: self.last_pass_ns,
                opened: 0,
                tw_entered: 0,
                in_use: 0,
                live: 0,
                resync_net: 0,
                resync_live_net: 0,
                ..fresh
            };
            let prev = match self.samples.get(&key) {
                Some(prev) => Some(prev),
                None if self.last_pass_ns > 0 => Some(&empty),
                None => None,
            };
            let sample = match prev {
                // The tracker restarts a destination's counters when it frees an idle one and
                // it comes back; start over.
                Some(prev)
                    if prev.opened <= stats.opened && prev.tw_entered <= stats.tw_entered =>
                {
                    let dt = now_ns.saturating_sub(prev.at_ns) as f64 / 1e9;
                    if dt <= 0.0 {
                        *prev
                    } else {
                        let alpha = 1.0 - (-dt / TAU_SECS).exp();
                        let ewma = |old: f64, new: f64| old + alpha * (new - old);
                        // What connections did, not what a resync corrected.
                        let grew = (i64::from(stats.in_range()) - i64::from(prev.in_use))
                            - (stats.resync_net - prev.resync_net);
                        let live_grew = (i64::from(fresh.live) - i64::from(prev.live))
                            - (stats.resync_live_net - prev.resync_live_net);
                        Sample {
                            churn: ewma(prev.churn, (stats.opened - prev.opened) as f64 / dt),
                            tw_rate: ewma(
                                prev.tw_rate,
                                (stats.tw_entered - prev.tw_entered) as f64 / dt,
                            ),
                            growth: ewma(prev.growth, grew as f64 / dt),
                            live_growth: ewma(prev.live_growth, live_grew as f64 / dt),
                            weight: ewma(prev.weight, 1.0),
                            rose_at_ns: if grew > 0 { now_ns } else { prev.rose_at_ns },
                            count: prev.count.saturating_add(1),
                            ..fresh
                        }
                    }
                }
                _ => fresh,
            };
            next.insert(key, sample);
        }
        self.samples = next;
        self.last_pass_ns = now_ns;
    }

    /// The forecast for a destination sampled at least twice; None before.
    ///
    /// `reuse_after_s`: where `tcp_tw_reuse` lets `connect()` take a TIME_WAIT port to this
    /// destination over once it is that old (see
    /// [`crate::sysctl::PortSettings::time_wait_reusable_after_s`]), only TIME_WAIT younger than
    /// that keeps a port from it: about the rate entering TIME_WAIT × that. Then live ports and
    /// those are what can exhaust the range, and what the time to exhaustion is about; and
    /// TIME_WAIT, taken over before its 60 s, does not pass the range.
    ///
    /// `max_time_wait`: the namespace's `tcp_max_tw_buckets`. Its TIME_WAIT sockets, this
    /// destination's and all others', never pass it: a close past it goes straight to CLOSE.
    /// This destination's projected TIME_WAIT is capped there (an upper bound: other
    /// destinations share the cap).
    pub fn forecast(
        &self,
        key: &DestKey,
        stats: &DestStats,
        range: Option<u32>,
        reuse_after_s: Option<f64>,
        max_time_wait: Option<u64>,
    ) -> Option<Forecast> {
        let s = self.samples.get(key).filter(|s| s.count >= 2)?;
        let mean = |smoothed: f64| {
            if s.weight > 0.0 {
                smoothed / s.weight
            } else {
                0.0
            }
        };
        let (churn, tw_rate, growth, live_growth) = (
            mean(s.churn),
            mean(s.tw_rate),
            mean(s.growth),
            mean(s.live_growth),
        );
        let live_now = f64::from(live(stats));
        let tw_settled = match max_time_wait {
            Some(cap) => (tw_rate * TIME_WAIT_SECS).min(cap as f64),
            None => tw_rate * TIME_WAIT_SECS,
        };
        let mut projected = live_now + tw_settled;
        let in_range = stats.in_range();
        let outside = f64::from(stats.outside_range);
        // Ports that keep connect() from a port to this destination: now, where they settle,
        // and how fast they grow.
        let (blocking, blocking_projected, blocking_growth) = match reuse_after_s {
            None => (f64::from(in_range), projected - outside, growth),
            Some(after) => {
                let time_wait = f64::from(stats.by_state[st::TIME_WAIT as usize]);
                let young = (tw_rate * after).min(time_wait);
                if let Some(r) = range {
                    projected = projected.min(f64::from(r) + outside);
                }
                (
                    (f64::from(in_range) - time_wait).max(0.0) + young,
                    live_now + tw_rate * after - outside,
                    live_growth,
                )
            }
        };
        let projected_in_use = projected.round().min(f64::from(u32::MAX)) as u32;
        let time_to_exhaustion_s = range.and_then(|r| {
            let r = f64::from(r);
            if blocking >= r {
                return Some(0.0);
            }
            // Ports outside the range (bound explicitly) neither fill it nor count towards it.
            let heading = blocking_projected >= r || live_growth > 0.05;
            let since_rise = s.at_ns.saturating_sub(s.rose_at_ns) as f64 / 1e9;
            let rising = since_rise <= RECENT_RISE_SECS.max(3.0 / blocking_growth);
            // In tenths, at least one: 0 means the range is full.
            (heading && rising && blocking_growth > 0.05)
                .then(|| (((r - blocking) / blocking_growth * 10.0).round() / 10.0).max(0.1))
        });
        Some(Forecast {
            churn_per_s: (churn * 10.0).round() / 10.0,
            time_wait_per_s: (tw_rate * 10.0).round() / 10.0,
            projected_in_use,
            time_to_exhaustion_s,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn key() -> DestKey {
        DestKey {
            netns: 1,
            proto: 6,
            saddr: "10.0.0.1".parse().unwrap(),
            daddr: "10.0.0.2".parse().unwrap(),
            dport: 443,
        }
    }

    fn stats(opened: u64, tw_entered: u64, live: u32, tw: u32) -> DestStats {
        let mut s = DestStats {
            opened,
            tw_entered,
            ..Default::default()
        };
        s.by_state[st::ESTABLISHED as usize] = live;
        s.by_state[st::TIME_WAIT as usize] = tw;
        s.in_use = live + tw;
        s
    }

    #[test]
    fn no_forecast_from_the_first_pass() {
        let mut r = Rates::new();
        let s = stats(100, 0, 100, 0);
        r.sample(SEC, [(key(), &s)].into_iter());
        assert_eq!(r.forecast(&key(), &s, Some(1000), None, None), None);
    }

    #[test]
    fn an_agent_started_during_a_storm_reports_its_rate_at_once() {
        // 500 connections/s into TIME_WAIT, and live ports leaking 20/s, long before the
        // agent's first pass; range 28232.
        let at = |t: u64| {
            let n = 1000 + 500 * t;
            stats(n, n, (100 + 20 * t) as u32, 5000 + 500 * t as u32)
        };
        let mut r = Rates::new();
        r.sample(SEC, [(key(), &at(1))].into_iter());
        r.sample(2 * SEC, [(key(), &at(2))].into_iter());
        let f = r.forecast(&key(), &at(2), Some(28232), None, None).unwrap();
        assert_eq!((f.churn_per_s, f.time_wait_per_s), (500.0, 500.0), "{f:?}");
        assert_eq!(f.projected_in_use, 140 + 30_000, "{f:?}");
        // 28232 - 6140 ports left, in use growing by 520/s.
        assert_eq!(f.time_to_exhaustion_s, Some(42.5), "{f:?}");
    }

    #[test]
    fn time_wait_settles_at_tcp_max_tw_buckets() {
        // 500 connections/s into TIME_WAIT towards a destination, 100 live ports: uncapped,
        // 30,000 TIME_WAIT would pass the 28,232 ports; a namespace that keeps 16,384 TIME_WAIT
        // sockets at most never gets there.
        let at = |t: u64| {
            let n = 1000 + 500 * t;
            stats(n, n, 100, 500 * t as u32)
        };
        let mut r = Rates::new();
        for t in 1..=5 {
            r.sample(t * SEC, [(key(), &at(t))].into_iter());
        }
        let uncapped = r.forecast(&key(), &at(5), Some(28232), None, None).unwrap();
        assert_eq!(uncapped.projected_in_use, 30_100, "{uncapped:?}");
        assert!(uncapped.time_to_exhaustion_s.is_some(), "{uncapped:?}");
        let capped = r
            .forecast(&key(), &at(5), Some(28232), None, Some(16_384))
            .unwrap();
        assert_eq!(capped.projected_in_use, 16_484, "{capped:?}");
        assert_eq!(capped.time_to_exhaustion_s, None, "{capped:?}");
        // A cap above what the rate settles at changes nothing.
        let loose = r
            .forecast(&key(), &at(5), Some(28232), None, Some(262_144))
            .unwrap();
        assert_eq!(loose, uncapped);
    }

    #[test]
    fn a_burst_between_two_passes_is_a_rate() {
        let mut r = Rates::new();
        r.sample(SEC, std::iter::empty());
        let s = stats(80, 80, 0, 80);
        r.sample(2 * SEC, [(key(), &s)].into_iter());
        let f = r
            .forecast(&key(), &s, Some(100), None, None)
            .expect("rated from the empty pass");
        assert!(f.churn_per_s > 5.0 && f.time_wait_per_s > 5.0, "{f:?}");
        assert!(f.projected_in_use > 100, "{f:?}");
        let tte = f.time_to_exhaustion_s.expect("heading for exhaustion");
        assert!(tte > 0.0 && tte < 10.0, "{tte}");
    }

    #[test]
    fn time_wait_churn_is_projected_by_littles_law() {
        // 100 connections/s, each closed at once into TIME_WAIT; range 28232.
        let mut r = Rates::new();
        let mut last = stats(0, 0, 0, 0);
        for t in 0..=120u64 {
            let tw = (100 * t).min(6000) as u32;
            last = stats(100 * t, 100 * t, 0, tw);
            r.sample(t * SEC, [(key(), &last)].into_iter());
        }
        let f = r.forecast(&key(), &last, Some(28232), None, None).unwrap();
        assert!((f.churn_per_s - 100.0).abs() < 1.0, "{f:?}");
        assert!((f.time_wait_per_s - 100.0).abs() < 1.0, "{f:?}");
        assert!((5900..=6100).contains(&f.projected_in_use), "{f:?}");
        assert_eq!(f.time_to_exhaustion_s, None, "levels off at 6000 < 28232");
        // The same churn against a 4000-port range: heading for exhaustion while growing.
        let mut r = Rates::new();
        let mut last = stats(0, 0, 0, 0);
        for t in 0..=30u64 {
            last = stats(100 * t, 100 * t, 0, (100 * t) as u32);
            r.sample(t * SEC, [(key(), &last)].into_iter());
        }
        let f = r.forecast(&key(), &last, Some(4000), None, None).unwrap();
        let tte = f.time_to_exhaustion_s.expect("heading for exhaustion");
        assert!(
            (8.0..=14.0).contains(&tte),
            "1000 ports left at ~100/s: {tte}"
        );
    }

    #[test]
    fn where_time_wait_is_taken_over_only_young_time_wait_counts() {
        // 5,000 connections/s into TIME_WAIT to one destination, taken over after 1 s
        // (tcp_tw_reuse): the table fills the range with TIME_WAIT, and connect() still finds
        // ports. Range 28232.
        let mut r = Rates::new();
        let mut last = stats(0, 0, 0, 0);
        for t in 0..=30u64 {
            last = stats(5000 * t, 5000 * t, 10, (5000 * t).min(28222) as u32);
            r.sample(t * SEC, [(key(), &last)].into_iter());
        }
        let f = r
            .forecast(&key(), &last, Some(28232), Some(1.0), None)
            .unwrap();
        assert_eq!(f.time_to_exhaustion_s, None, "{f:?}");
        assert_eq!(f.projected_in_use, 28232, "no more than the range: {f:?}");
        // Without reuse the same table is full.
        let f = r.forecast(&key(), &last, Some(28232), None, None).unwrap();
        assert_eq!(f.time_to_exhaustion_s, Some(0.0), "{f:?}");
        // A leak of live connections beside the churn: heading for exhaustion, at the leak's
        // rate, from live ports + the TIME_WAIT younger than 1 s.
        let mut r = Rates::new();
        for t in 0..=30u64 {
            last = stats(
                5000 * t,
                5000 * t,
                (100 * t) as u32,
                (5000 * t).min(20000) as u32,
            );
            r.sample(t * SEC, [(key(), &last)].into_iter());
        }
        let f = r
            .forecast(&key(), &last, Some(28232), Some(1.0), None)
            .unwrap();
        let tte = f.time_to_exhaustion_s.expect("live ports leak");
        // (28232 - 3000 live - 5000 young) / 100 per s.
        assert!((200.0..=225.0).contains(&tte), "{tte}");
    }

    #[test]
    fn what_a_resync_adds_or_removes_is_not_growth() {
        // 2,000 live ports, steady; records were lost, and a resync adds back the 3,000 the
        // table missed (then, another time, removes 1,000 it had too many).
        let mut r = Rates::new();
        let mut last = stats(0, 0, 2000, 0);
        for t in 0..=10u64 {
            r.sample(t * SEC, [(key(), &last)].into_iter());
        }
        last = stats(0, 0, 5000, 0);
        last.resync_net = 3000;
        last.resync_live_net = 3000;
        for t in 11..=13u64 {
            r.sample(t * SEC, [(key(), &last)].into_iter());
            let f = r.forecast(&key(), &last, Some(8000), None, None).unwrap();
            assert_eq!(f.time_to_exhaustion_s, None, "{t}: {f:?}");
        }
        last = stats(0, 0, 4000, 0);
        last.resync_net = 2000;
        last.resync_live_net = 2000;
        // A real leak after: 10 a second.
        for t in 14..=40u64 {
            let mut s = stats(10 * (t - 14), 0, 4000 + 10 * (t - 14) as u32, 0);
            (s.resync_net, s.resync_live_net) = (2000, 2000);
            last = s;
            r.sample(t * SEC, [(key(), &last)].into_iter());
        }
        let f = r.forecast(&key(), &last, Some(8000), None, None).unwrap();
        let tte = f.time_to_exhaustion_s.expect("the leak");
        // 3,740 left at ~10/s, not hidden by the 1,000 removed.
        assert!((330.0..=420.0).contains(&tte), "{tte}");
    }

    #[test]
    fn a_leak_of_live_connections_is_heading_for_exhaustion() {
        let mut r = Rates::new();
        let mut last = stats(0, 0, 0, 0);
        for t in 0..=60u64 {
            last = stats(10 * t, 0, (10 * t) as u32, 0);
            r.sample(t * SEC, [(key(), &last)].into_iter());
        }
        let f = r.forecast(&key(), &last, Some(1000), None, None).unwrap();
        assert_eq!(f.projected_in_use, 600);
        let tte = f.time_to_exhaustion_s.expect("live ports grow");
        assert!((35.0..=50.0).contains(&tte), "400 left at ~10/s: {tte}");
    }

    #[test]
    fn exhausted_is_zero_and_steady_is_none() {
        let mut r = Rates::new();
        let full = stats(16, 0, 16, 0);
        r.sample(SEC, [(key(), &full)].into_iter());
        r.sample(2 * SEC, [(key(), &full)].into_iter());
        let f = r.forecast(&key(), &full, Some(16), None, None).unwrap();
        assert_eq!(f.time_to_exhaustion_s, Some(0.0));
        assert_eq!(
            r.forecast(&key(), &full, Some(100), None, None)
                .unwrap()
                .time_to_exhaustion_s,
            None
        );
        assert_eq!(
            r.forecast(&key(), &full, None, None, None)
                .unwrap()
                .time_to_exhaustion_s,
            None
        );
    }

    #[test]
    fn a_destination_that_emptied_starts_over() {
        let mut r = Rates::new();
        r.sample(SEC, [(key(), &stats(1000, 0, 10, 0))].into_iter());
        r.sample(2 * SEC, [(key(), &stats(1100, 0, 10, 0))].into_iter());
        // Counters restarted (the tracker released and re-created the destination): a new
        // baseline, no rate from the old counters.
        let again = stats(5, 0, 5, 0);
        r.sample(3 * SEC, [(key(), &again)].into_iter());
        assert_eq!(r.forecast(&key(), &again, Some(100), None, None), None);
        // Not sampled: forgotten.
        r.sample(4 * SEC, std::iter::empty());
        assert!(r.samples.is_empty());
    }

    #[test]
    fn no_time_to_exhaustion_once_in_use_stopped_rising() {
        // Live ports leak 10/s for 9 s, then stay at 90 of 100.
        let mut r = Rates::new();
        let at = |t: u64, r: &mut Rates| {
            let n = 10 * t.min(9);
            let s = stats(n, 0, n as u32, 0);
            r.sample(t * SEC, [(key(), &s)].into_iter());
            r.forecast(&key(), &s, Some(100), None, None)
                .and_then(|f| f.time_to_exhaustion_s)
        };
        for t in 0..=8 {
            at(t, &mut r);
        }
        assert!(at(9, &mut r).is_some(), "still rising");
        for t in 10..=14 {
            assert!(at(t, &mut r).is_some(), "{t}: within 5 s of the last rise");
        }
        for t in 15..=40 {
            assert_eq!(at(t, &mut r), None, "{t}: flat for {} s", t - 9);
        }
        // A slow leak, a port every 8 s, keeps its forecast between the rises.
        let mut r = Rates::new();
        let mut last = None;
        for t in 0..=80u64 {
            let n = (t / 8) as u32;
            let s = stats(u64::from(n), 0, n, 0);
            r.sample(t * SEC, [(key(), &s)].into_iter());
            last = r
                .forecast(&key(), &s, Some(100), None, None)
                .and_then(|f| f.time_to_exhaustion_s);
            if t >= 40 {
                assert!(last.is_some(), "{t}: a steady slow leak");
            }
        }
        assert!(last.is_some());
    }
}
