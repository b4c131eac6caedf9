//! The bench's own-CPU line: what portx itself spends under a storm — its programs' run time (the
//! kernel's BPF run-time statistics, on only while measured) and the agent's CPU — as a share of
//! the CPU the whole machine was busy in that same storm. A share within one storm carries that
//! storm's speed in both its parts, where the ratio of two storms' rates carries the machine's
//! drift between them: on a noisy machine this figure holds still when the rate ratios do not.
//! It leaves out what no counter here sees: calling the programs (what the floor costs) and
//! the cache misses their work causes in the kernel's own code.
use std::{collections::BTreeMap, fs};

use anyhow::Context as _;
use serde_json::{json, Value};

use crate::{bench, bpf, floor};

/// One program's run-time statistics as `/proc/<pid>/fdinfo/<fd>` shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgRuns {
    pub id: u32,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// The fdinfo of a BPF program's fd (`prog_id:`, `run_time_ns:`, `run_cnt:` lines), else None.
fn parse_fdinfo(text: &str) -> Option<ProgRuns> {
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?
            .trim()
            .parse()
            .ok()
    };
    Some(ProgRuns {
        id: u32::try_from(field("prog_id")?).ok()?,
        run_time_ns: field("run_time_ns")?,
        run_cnt: field("run_cnt")?,
    })
}

/// The BPF programs process `pid` holds, by id, with their statistics so far.
pub fn programs_of(pid: u32) -> anyhow::Result<BTreeMap<u32, ProgRuns>> {
    let dir = format!("/proc/{pid}/fd");
    let mut progs = BTreeMap::new();
    for entry in fs::read_dir(&dir).with_context(|| dir.clone())? {
        let entry = entry.with_context(|| dir.clone())?;
        // Fds come and go while we look: skip what vanished.
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        if target.to_str() != Some("anon_inode:bpf-prog") {
            continue;
        }
        let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        if let Some(p) = fs::read_to_string(&info)
            .ok()
            .as_deref()
            .and_then(parse_fdinfo)
        {
            progs.insert(p.id, p);
        }
    }
    Ok(progs)
}

/// CPU time the whole machine was busy (every state but idle and iowait), in clock ticks, from
/// the `cpu` line of `/proc/stat` (guest time is counted in user time already).
fn parse_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let busy = [0, 1, 2, 5, 6, 7].iter().filter_map(|i| f.get(*i)).sum();
    (f.len() >= 8).then_some(busy)
}

pub fn busy_ticks() -> anyhow::Result<u64> {
    let stat = fs::read_to_string("/proc/stat").context("/proc/stat")?;
    parse_busy_ticks(&stat).context("no `cpu` line of 8 numbers in /proc/stat")
}

/// The runs of the programs between two readings, by the names the kernel has for them (so read
/// this while they are loaded).
pub fn runs_between(
    before: &BTreeMap<u32, ProgRuns>,
    after: &BTreeMap<u32, ProgRuns>,
) -> BTreeMap<String, (u64, u64)> {
    Storm::programs_between(before, after, |id| {
        bpf::prog_name(id).unwrap_or_else(|e| {
            eprintln!("bench: program {id} has no name: {e:#}");
            format!("prog{id}")
        })
    })
}

/// One storm, measured.
pub struct Storm {
    /// Connections made (failing mode: failures).
    pub connections: u64,
    /// CPU the machine was busy, all CPUs.
    pub busy_s: f64,
    /// The agent's CPU (all its threads, exited ones too).
    pub agent_s: f64,
    /// By program name: runs and nanoseconds run.
    pub programs: BTreeMap<String, (u64, u64)>,
}

impl Storm {
    /// The programs' runs between two readings, named by `name`.
    fn programs_between(
        before: &BTreeMap<u32, ProgRuns>,
        after: &BTreeMap<u32, ProgRuns>,
        name: impl Fn(u32) -> String,
    ) -> BTreeMap<String, (u64, u64)> {
        let mut by_name = BTreeMap::new();
        for (id, a) in after {
            let b = before.get(id);
            let runs = a.run_cnt - b.map_or(0, |b| b.run_cnt.min(a.run_cnt));
            let ns = a.run_time_ns - b.map_or(0, |b| b.run_time_ns.min(a.run_time_ns));
            let e = by_name.entry(name(*id)).or_insert((0, 0));
            e.0 += runs;
            e.1 += ns;
        }
        by_name
    }

    fn programs_s(&self) -> f64 {
        self.programs
            .values()
            .map(|(_, ns)| *ns as f64)
            .sum::<f64>()
            / 1e9
    }

    /// The programs' run time above what `empty` (ns a run by program name, see
    /// [`floor::empty_twin`]) takes on the same hooks.
    fn above_empty_s(&self, empty: &BTreeMap<String, f64>) -> f64 {
        self.programs
            .iter()
            .map(|(name, (runs, ns))| {
                let base = floor::empty_twin(name).and_then(|f| empty.get(f)).copied();
                (*ns as f64 - *runs as f64 * base.unwrap_or(0.0)).max(0.0)
            })
            .sum::<f64>()
            / 1e9
    }
}

/// Over all of `storms`, by program name: runs, nanoseconds.
fn runs_by_name(storms: &[Storm]) -> BTreeMap<&str, (u64, u64)> {
    let mut by_name: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for (name, (runs, ns)) in storms.iter().flat_map(|s| &s.programs) {
        let e = by_name.entry(name).or_insert((0, 0));
        e.0 += runs;
        e.1 += ns;
    }
    by_name
}

/// Median, min and max of `share` over the storms that were busy at all.
fn spread(storms: &[Storm], share: impl Fn(&Storm) -> f64) -> (f64, f64, f64) {
    let mut v: Vec<f64> = storms
        .iter()
        .filter(|s| s.busy_s > 0.0)
        .map(|s| share(s) / s.busy_s)
        .collect();
    let (lo, hi) = bench::min_max(&v);
    (bench::median(&mut v), lo, hi)
}

/// A mode's storms summed up: portx's own CPU as shares of the busy CPUs (median, min–max over
/// storms), in all and above the floor's empty programs measured the same way in `floor`'s
/// storms, and over all storms together the cost per connection.
pub fn summary(storms: &[Storm], floor: &[Storm]) -> Option<Value> {
    let connections: u64 = storms.iter().map(|s| s.connections).sum();
    let busy_s: f64 = storms.iter().map(|s| s.busy_s).sum();
    if connections == 0 || busy_s <= 0.0 {
        return None;
    }
    let empty: BTreeMap<String, f64> = runs_by_name(floor)
        .into_iter()
        .filter(|(_, (runs, _))| *runs > 0)
        .map(|(name, (runs, ns))| (name.to_string(), ns as f64 / runs as f64))
        .collect();
    let (share, lo, hi) = spread(storms, |s| s.programs_s() + s.agent_s);
    let (above, above_lo, above_hi) = spread(storms, |s| s.above_empty_s(&empty) + s.agent_s);
    let programs_s: f64 = storms.iter().map(Storm::programs_s).sum();
    let above_empty_s: f64 = storms.iter().map(|s| s.above_empty_s(&empty)).sum();
    let agent_s: f64 = storms.iter().map(|s| s.agent_s).sum();
    let per_conn_us = |s: f64| s * 1e6 / connections as f64;
    let programs: Vec<Value> = runs_by_name(storms)
        .into_iter()
        .filter(|(_, (runs, _))| *runs > 0)
        .map(|(name, (runs, ns))| {
            json!({
                "name": name,
                "runs_per_connection": runs as f64 / connections as f64,
                "ns_per_run": ns as f64 / runs as f64,
                "empty_ns_per_run": floor::empty_twin(name).and_then(|f| empty.get(f)),
            })
        })
        .collect();
    Some(json!({
        "storms": storms.len(),
        "connections": connections,
        "share_median": share,
        "share_min": lo,
        "share_max": hi,
        "share_above_empty_median": above,
        "share_above_empty_min": above_lo,
        "share_above_empty_max": above_hi,
        "programs_share": programs_s / busy_s,
        "programs_above_empty_share": above_empty_s / busy_s,
        "agent_share": agent_s / busy_s,
        "busy_us_per_connection": per_conn_us(busy_s),
        "programs_us_per_connection": per_conn_us(programs_s),
        "agent_us_per_connection": per_conn_us(agent_s),
        "programs": programs,
        "empty_ns_per_run": empty,
    }))
}

/// The summary as one line of the bench's report.
pub fn line(s: &Value) -> String {
    let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    let pct = |k: &str| 100.0 * f(k);
    let programs: Vec<String> = s["programs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["runs_per_connection"].as_f64().unwrap_or(0.0) >= 0.01)
        .map(|p| {
            let empty = p["empty_ns_per_run"]
                .as_f64()
                .map_or(String::new(), |e| format!(" (empty {e:.0})"));
            format!(
                "{} {:.2} x {:.0} ns{empty}",
                p["name"].as_str().unwrap_or("?"),
                p["runs_per_connection"].as_f64().unwrap_or(f64::NAN),
                p["ns_per_run"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect();
    format!(
        "{:.2} % of the busy CPUs ({:.2}-{:.2}, {} storms), {:.2} % above empty programs ({:.2}-{:.2}): programs {:.2} % ({:.2} % above empty), agent {:.2} %; a connection {:.2} us of busy CPU; programs {:.3} us ({}), agent {:.3} us",
        pct("share_median"),
        pct("share_min"),
        pct("share_max"),
        s["storms"],
        pct("share_above_empty_median"),
        pct("share_above_empty_min"),
        pct("share_above_empty_max"),
        pct("programs_share"),
        pct("programs_above_empty_share"),
        pct("agent_share"),
        f("busy_us_per_connection"),
        f("programs_us_per_connection"),
        programs.join(", "),
        f("agent_us_per_connection"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_of_a_program_gives_its_id_and_statistics() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1044\nprog_type:\t26\n\
                    prog_jited:\t1\nprog_tag:\t5a38da3b5b8110cf\nmemlock:\t4096\nprog_id:\t10107\n\
                    run_time_ns:\t123456\nrun_cnt:\t789\nrecursion_misses:\t0\n";
        assert_eq!(
            parse_fdinfo(text),
            Some(ProgRuns {
                id: 10107,
                run_time_ns: 123456,
                run_cnt: 789
            })
        );
        // A map's fdinfo, or a kernel without the statistics' lines.
        assert_eq!(parse_fdinfo("pos:\t0\nmap_type:\t27\nmap_id:\t5\n"), None);
        assert_eq!(parse_fdinfo("prog_id:\t7\nprog_type:\t5\n"), None);
    }

    #[test]
    fn busy_ticks_leave_out_idle_and_iowait() {
        let stat = "cpu  100 2 30 5000 40 6 7 8 0 0\ncpu0 50 1 15 2500 20 3 3 4 0 0\n";
        assert_eq!(parse_busy_ticks(stat), Some(100 + 2 + 30 + 6 + 7 + 8));
        assert_eq!(parse_busy_ticks("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(parse_busy_ticks("cpu  1 2 3\n"), None);
    }

    #[test]
    fn runs_are_taken_between_readings_and_added_up_by_name() {
        let p = |id, run_time_ns, run_cnt| {
            (
                id,
                ProgRuns {
                    id,
                    run_time_ns,
                    run_cnt,
                },
            )
        };
        let before = BTreeMap::from([p(1, 1000, 10), p(2, 50, 1)]);
        // Program 3 was loaded in between: all of its runs count.
        let after = BTreeMap::from([p(1, 5000, 50), p(2, 250, 5), p(3, 30, 3)]);
        let named = Storm::programs_between(&before, &after, |id| {
            if id == 1 { "state" } else { "exit" }.to_string()
        });
        assert_eq!(named["state"], (40, 4000));
        assert_eq!(named["exit"], (4 + 3, 200 + 30));
    }

    #[test]
    fn shares_are_per_storm_and_costs_per_connection_over_all_storms() {
        let storm = |connections, busy_s, agent_s, prog_ns| Storm {
            connections,
            busy_s,
            agent_s,
            programs: BTreeMap::from([
                ("inet_sock_set_s".to_string(), (connections * 6, prog_ns)),
                ("sys_enter_bind".to_string(), (0, 0)),
            ]),
        };
        // 1 % + 1 % of the first storm's CPU; 1 % + 3 % of the second's.
        let storms = [
            storm(100_000, 2.0, 0.02, 24_000_000),
            storm(100_000, 1.0, 0.03, 12_000_000),
        ];
        // Empty programs: 10 ns a run on the state change.
        let floor = [Storm {
            connections: 1000,
            busy_s: 1.0,
            agent_s: 0.0,
            programs: BTreeMap::from([
                (floor::STATE.to_string(), (6000, 60_000)),
                (floor::EXIT.to_string(), (1000, 5_000)),
            ]),
        }];
        let s = summary(&storms, &floor).expect("storms with connections");
        let f = |k: &str| s[k].as_f64().expect(k);
        let close = |k: &str, want: f64| assert!((f(k) - want).abs() < 1e-9, "{k}: {}", f(k));
        close("share_min", 0.022);
        close("share_max", 0.042);
        close("share_median", 0.032);
        // Above the empty programs (600k runs of 10 ns in each storm): 18 ms of the first
        // storm's 24, 6 of the second's 12.
        close("share_above_empty_min", (0.018 + 0.02) / 2.0);
        close("share_above_empty_max", 0.006 + 0.03);
        // Over both: 0.036 s of programs and 0.05 s of agent in 3 s busy, 200k connections.
        close("programs_share", 0.012);
        close("programs_above_empty_share", 0.024 / 3.0);
        close("agent_share", 0.05 / 3.0);
        close("busy_us_per_connection", 15.0);
        close("agent_us_per_connection", 0.25);
        let programs = s["programs"].as_array().expect("programs");
        assert_eq!(programs.len(), 1, "programs that never ran are left out");
        assert_eq!(programs[0]["runs_per_connection"], 6.0);
        assert_eq!(programs[0]["ns_per_run"], 30.0);
        assert_eq!(programs[0]["empty_ns_per_run"], 10.0);
        assert!(summary(&[], &floor).is_none());
    }
}
