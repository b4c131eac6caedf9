//! `cargo xtask bench`: portx's cost, measured side by side in one run inside a private network
//! namespace. For each close mode (rst, close, fail, fail-one) and round, the same connect storm
//! runs with nothing attached, with `portx-agent trace`, with bcc's CO-RE `tcpstates`
//! (libbpf-tools) and with a bpftrace script counting the same tracepoints, and with empty
//! programs on portx's hooks (the floor any tool attached there pays) and with the empty program
//! on the state change alone (`floor-state`: what a design with no syscall hook would pay) — in
//! a rotated order each round. Reported: the rate each keeps relative to nothing attached
//! (median, min–max over rounds), the agent's CPU per 100k connections and peak RSS,
//! lost/missed events; after each mode's rounds, portx's own CPU as a share of the busy CPUs in
//! the same storm (`own_cpu`: its programs' run time by the kernel's statistics, above empty
//! programs measured alike, and the agent's CPU); loss with an undersized ring buffer, the
//! syscall tax (what portx's hooks cost every other syscall, see `syscall_tax`), the latency
//! from a failing connect() to its record, and the tracker's scale on synthetic events. The
//! floor mirrors the hooks portx attaches on this kernel. Last, the performance issue's targets,
//! each judged from this run's figures (`targets`).
//! Not a test: it asserts nothing, it measures.
use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context as _};
use clap::Args;
use serde_json::{json, Value};

use crate::{
    bpf, cmd,
    floor::{self, Floor},
    host::{
        self, dies_with_parent, release_agent, vm_hwm_kib, wait_for_file, CpuMeter, Netns, Proc,
    },
    own_cpu, setup, syscall_tax, targets,
};

#[derive(Args)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seconds per storm.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    #[arg(long, default_value_t = 2)]
    pub threads: u16,
    /// Failing connect()s whose latency to the agent's record is measured.
    #[arg(long, default_value_t = 20)]
    pub latency_samples: usize,
    /// Storms per mode in which portx's own CPU is measured, with the kernel's BPF run-time
    /// statistics on (0: none).
    #[arg(long, default_value_t = 3)]
    pub own_cpu_storms: usize,
    /// Seconds of the syscall tax's alternated getppid() bursts (see `syscall_tax`; 0: none).
    #[arg(long, default_value_t = 10.0)]
    pub syscall_tax_seconds: f64,
    /// Only these close modes (default: all of rst, close, fail, fail-one).
    #[arg(long = "mode", value_parser = MODES)]
    pub modes: Vec<String>,
}

const TOOLS: [&str; 6] = [
    "none",
    "portx",
    "tcpstates",
    "bpftrace",
    "floor",
    "floor-state",
];
/// Tools with no process of their own: nothing attached, or the floors' empty programs, which
/// this process holds.
fn holds_no_process(tool: &str) -> bool {
    matches!(tool, "none" | "floor" | "floor-state")
}

/// `fail-one`: the failing storm with every thread failing towards one destination, so that
/// they count their failures under one key, as a proxy's threads failing towards one upstream do
/// (in `fail` each thread has its own destination and key).
const MODES: [&str; 4] = ["rst", "close", "fail", "fail-one"];
const BPFTRACE: &str = "tracepoint:sock:inet_sock_set_state { @states[args->newstate] = count(); }
tracepoint:syscalls:sys_exit_connect { @connects = count(); }
";
fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

struct Started {
    proc: Option<Proc>,
    /// The `floor`'s empty programs, attached while this lives.
    floor: Option<Floor>,
    out: PathBuf,
    /// The process's CPU, and what it had used once ready. (After `proc`: its cgroup goes once
    /// the process has.)
    cpu: Option<CpuMeter>,
    cpu0: f64,
}

/// Starts `tool` (the floor: empty programs on `hooks`, portx's; floor-state: the one of them on
/// the state change) and waits until it is ready.
fn start_tool(
    tool: &str,
    agent: &Path,
    ns: &Netns,
    dir: &Path,
    extra: &[&str],
    hooks: &[String],
    tick: f64,
) -> anyhow::Result<Started> {
    let out = dir.join(format!("{tool}.out"));
    let err = dir.join(format!("{tool}.err"));
    let (mut c, ready) = match tool {
        _ if holds_no_process(tool) => {
            return Ok(Started {
                proc: None,
                floor: match tool {
                    "floor" => Some(Floor::attach(hooks).context("floor")?),
                    "floor-state" => {
                        Some(Floor::attach_state_change(hooks).context("floor-state")?)
                    }
                    _ => None,
                },
                out,
                cpu: None,
                cpu0: 0.0,
            });
        }
        "portx" => {
            let mut c = Command::new(agent);
            c.args([
                "trace",
                "--json",
                "--interval",
                "1",
                "--netns",
                &ns.id.to_string(),
            ])
            .args(extra);
            (c, "\"started\"")
        }
        // tcpstates' header stays in its stdout buffer when not writing to a terminal: no line
        // to wait for, so it gets a fixed settle time below.
        "tcpstates" => (Command::new("/usr/sbin/tcpstates"), ""),
        "bpftrace" => {
            let script = dir.join(format!("{tool}.bt"));
            fs::write(&script, BPFTRACE)?;
            let mut c = Command::new("bpftrace");
            c.arg(script);
            (c, "Attaching")
        }
        other => bail!("unknown tool {other}"),
    };
    // tcpstates' lines (~45 MB a storm) go nowhere, as the issue has portx's JSON: the bench
    // reads nothing of them, and a file would charge the peer for the page cache.
    let stdout = if tool == "tcpstates" {
        fs::File::create("/dev/null")?
    } else {
        fs::File::create(&out)?
    };
    let child = dies_with_parent(&mut c)
        .stdout(stdout)
        .stderr(fs::File::create(&err)?)
        .spawn()
        .with_context(|| format!("starting {tool}"))?;
    let mut p = Proc(child);
    let cpu = CpuMeter::of(p.pid(), tick);
    if ready.is_empty() {
        std::thread::sleep(Duration::from_secs(3));
        // No line to wait for: a peer that exited at start-up (a kernel it cannot attach to)
        // must not pass for one that costs nothing.
        if let Ok(Some(status)) = p.0.try_wait() {
            drop(cpu);
            bail!(
                "{tool} exited at start ({status}): {}",
                fs::read_to_string(&err).unwrap_or_default()
            );
        }
    } else if let Err(e) = wait_for_file(&out, ready, 60) {
        // The process first, then its cgroup (which `cpu` removes once it is empty).
        drop(p);
        return Err(e.context(format!(
            "{tool}: {}",
            fs::read_to_string(&err).unwrap_or_default()
        )));
    }
    std::thread::sleep(Duration::from_millis(300));
    let cpu0 = cpu.secs();
    Ok(Started {
        proc: Some(p),
        floor: None,
        out,
        cpu: Some(cpu),
        cpu0,
    })
}

/// What one storm did.
struct Storm {
    /// Connections made (failures, in the failing modes).
    count: u64,
    secs: f64,
    /// Connects that failed in a mode that should make connections (`rst`, `close`): a storm
    /// slowed by failures (a TIME_WAIT range too young to reuse) must say so, not just look
    /// slower.
    failed: u64,
}

/// The value of `key=value` in a workload's output (`storm ok=N failed=M secs=S`, `at=T`).
fn said<T: std::str::FromStr>(text: &str, key: &str) -> Option<T> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Runs the storm in the namespace.
fn storm(agent: &Path, ns: &Netns, mode: &str, args: &BenchArgs) -> anyhow::Result<Storm> {
    let out = cmd::output(Command::new(agent).args([
        "workload",
        "--netns",
        &ns.path(),
        "storm",
        "--threads",
        &args.threads.to_string(),
        "--seconds",
        &args.seconds.to_string(),
        "--close",
        mode,
    ]))?;
    let field = |k: &str| said::<f64>(&out, k);
    let n = if failing(mode) {
        field("failed")
    } else {
        field("ok")
    }
    .ok_or_else(|| anyhow!("storm said `{out}`"))?;
    let failed = if failing(mode) {
        0
    } else {
        field("failed").unwrap_or(0.0) as u64
    };
    Ok(Storm {
        count: n as u64,
        secs: field("secs").unwrap_or(args.seconds),
        failed,
    })
}

/// The smallest and the largest of `v` (f64::MAX and f64::MIN for none).
pub(crate) fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)))
}

/// The median (of an even count, the mean of the middle two); NaN for none.
pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Per round of `mode`, `tool`'s rate over the rate with nothing attached in the same round.
fn round_ratios(samples: &[Value], mode: &str, tool: &str) -> BTreeMap<u64, f64> {
    let rate = |t: &str, round: &Value| {
        samples
            .iter()
            .find(|s| s["mode"] == mode && s["tool"] == t && s["round"] == *round)?["rate"]
            .as_f64()
    };
    samples
        .iter()
        .filter(|s| s["mode"] == mode && s["tool"] == tool)
        .filter_map(|s| {
            let base = rate("none", &s["round"]).filter(|b| *b > 0.0)?;
            Some((s["round"].as_u64()?, s["rate"].as_f64()? / base))
        })
        .collect()
}

/// portx against the empty programs on its hooks and against bpftrace's counter, round by round
/// (the rounds' noise is mostly shared by the tools of one round).
struct AgainstFloor {
    /// Of `floor`'s ratio minus portx's, per round: what portx costs above the floor.
    gap_median: f64,
    gap_min: f64,
    gap_max: f64,
    /// Rounds in which portx kept more of the storm's rate than bpftrace.
    above_bpftrace: usize,
    /// Rounds with both portx and the floor measured.
    rounds: usize,
}

fn against_floor(samples: &[Value], mode: &str) -> Option<AgainstFloor> {
    let portx = round_ratios(samples, mode, "portx");
    let floor = round_ratios(samples, mode, "floor");
    let bpftrace = round_ratios(samples, mode, "bpftrace");
    let mut gaps: Vec<f64> = portx
        .iter()
        .filter_map(|(round, p)| Some(floor.get(round)? - p))
        .collect();
    if gaps.is_empty() {
        return None;
    }
    let above_bpftrace = portx
        .iter()
        .filter(|(round, p)| bpftrace.get(round).is_some_and(|b| *p > b))
        .count();
    let (gap_min, gap_max) = min_max(&gaps);
    Some(AgainstFloor {
        rounds: gaps.len(),
        gap_median: median(&mut gaps),
        gap_min,
        gap_max,
        above_bpftrace,
    })
}

/// Whether `mode`'s connects fail (its rate is of failures).
fn failing(mode: &str) -> bool {
    mode.starts_with("fail")
}

fn sysctls(mode: &str) -> Vec<&'static str> {
    match mode {
        _ if failing(mode) => vec![
            "net.ipv4.ip_local_port_range=40000 40015",
            "net.ipv4.tcp_tw_reuse=0",
        ],
        // The close storm's threads spread over 8 destinations each (the workload's
        // CLOSE_DESTS_PER_THREAD), so that TIME_WAIT's reuse delay does not cap its rate; their
        // 16 x 14,116 4-tuples (connect() takes every other port) stay in TIME_WAIT, each taken
        // again once 1 s old: the kernel's default of 131,072 TIME_WAIT sockets would send the
        // rest of the closes straight to CLOSE.
        _ => vec![
            "net.ipv4.ip_local_port_range=32768 60999",
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.tcp_max_tw_buckets=262144",
        ],
    }
}

/// The hooks portx attaches on this kernel (its `started` record's `attached`), which the floor
/// mirrors.
fn portx_hooks(agent: &Path, ns: &Netns, dir: &Path, tick: f64) -> anyhow::Result<Vec<String>> {
    let mut t = start_tool("portx", agent, ns, dir, &[], &[], tick)?;
    if let Some(mut p) = t.proc.take() {
        p.interrupt();
    }
    let started = fs::read_to_string(&t.out)?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["type"] == "started")
        .ok_or_else(|| anyhow!("portx wrote no started record to {}", t.out.display()))?;
    started["attached"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|h| Some(h.as_str()?.to_string()))
                .collect()
        })
        .ok_or_else(|| anyhow!("portx's started record has no attached hooks: {started}"))
}

/// The agent's final summary (`"final": true`, written once it has drained the rings at exit),
/// None if it wrote none: a periodic one would undercount what it read and lost.
fn final_summary(out: &Path) -> Option<Value> {
    fs::read_to_string(out)
        .ok()?
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["type"] == "summary" && v["final"] == true)
}

/// What portx read against what the storms made, into its `row` of `mode`: the rounds whose
/// agent left no final summary (its loss and reading unknown), and either the failures its
/// final summaries report against those the storms made (failing modes: every one must be
/// reported, counted in the kernel or not) or the fewest records it read a connection in a round
/// (at least 2 in every hook mode: the record that opens a connection and its close).
fn read_vs_made<'a>(row: &mut Value, mode: &str, samples: impl Iterator<Item = &'a Value>) {
    let samples: Vec<&Value> = samples.collect();
    let no_final = samples
        .iter()
        .filter(|s| s["final_summary"] != true)
        .count();
    row["rounds_without_final_summary"] = json!(no_final);
    let decode_errors: u64 = samples
        .iter()
        .filter_map(|s| s["decode_errors"].as_u64())
        .sum();
    row["decode_errors"] = json!(decode_errors);
    let storm_failed: u64 = samples
        .iter()
        .filter_map(|s| s["storm_failed"].as_u64())
        .sum();
    row["storm_failed"] = json!(storm_failed);
    let with_final = samples.iter().filter(|s| s["final_summary"] == true);
    if failing(mode) {
        let (mut made, mut reported) = (0u64, 0u64);
        for s in with_final {
            made += s["count"].as_u64().unwrap_or(0);
            reported += s["connect_failures"].as_u64().unwrap_or(0);
        }
        row["failures_made"] = json!(made);
        row["failures_reported"] = json!(reported);
    } else {
        let expected = records_per_connection(mode);
        let read: Vec<(f64, f64)> = with_final
            .filter_map(|s| Some((s["events"].as_f64()?, s["count"].as_f64()?)))
            .collect();
        let least = read
            .iter()
            .map(|(events, count)| events / count)
            .fold(f64::INFINITY, f64::min);
        row["records_per_connection_min"] = json!(least.is_finite().then_some(least));
        row["records_per_connection_expected"] = json!(expected);
        // In counts, not a ratio: 2 records short of a million rounds to the expected 4.00.
        let short: Vec<f64> = read
            .iter()
            .map(|(events, count)| expected * count - events)
            .filter(|short| *short > 0.0)
            .collect();
        row["rounds_short"] = json!(short.len());
        row["records_short"] = json!(short.iter().sum::<f64>());
    }
}

/// Records a connection of `mode` makes in every hook mode: its opening and its close (RST),
/// and with a TIME_WAIT close the two FIN states before it.
fn records_per_connection(mode: &str) -> f64 {
    if mode == "close" {
        4.0
    } else {
        2.0
    }
}

/// The order of the tools in `round`: rows of a Williams design, so that over `n` rounds each
/// tool runs in each position once and right after each other tool once (a rotation kept the
/// same neighbours every round: portx always followed nothing attached).
fn round_order(round: usize, n: usize) -> Vec<usize> {
    // First row 0, 1, n-1, 2, n-2, …; row r adds r to each. For an even n (6 tools) this
    // balances who comes right before whom.
    let first = (0..n).map(|i| {
        if i % 2 == 1 {
            i.div_ceil(2)
        } else {
            (n - i / 2) % n
        }
    });
    first.map(|t| (t + round) % n).collect()
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let root = cmd::root();
    setup::ensure_packages(&["libbpf-tools", "bpftrace"])?;
    let (agent, dir) = release_agent("bench")?;
    host::remove_stale_cgroups();
    let tick: f64 = cmd::output(Command::new("getconf").arg("CLK_TCK"))?
        .trim()
        .parse()
        .unwrap_or(100.0);

    let modes: Vec<&str> = MODES
        .into_iter()
        .filter(|m| args.modes.is_empty() || args.modes.iter().any(|a| a == m))
        .collect();
    let hooks = portx_hooks(&agent, &Netns::new(&agent, &sysctls("rst"))?, &dir, tick)?;
    let not_mirrored = floor::not_mirrored(&hooks);
    eprintln!("bench: portx attaches {hooks:?}; the floor leaves out {not_mirrored:?}");
    let mut samples: Vec<Value> = Vec::new();
    let mut own = Vec::new();
    for &mode in &modes {
        let ns = Netns::new(&agent, &sysctls(mode))?;
        for round in 0..args.rounds {
            let order = round_order(round, TOOLS.len());
            for tool in order.into_iter().map(|i| TOOLS[i]) {
                let mut t = start_tool(tool, &agent, &ns, &dir, &[], &hooks, tick)?;
                let Storm {
                    count: n,
                    secs,
                    failed,
                } = storm(&agent, &ns, mode, args)?;
                if failed > 0 {
                    eprintln!("bench: WARNING {mode} round {round} {tool}: {failed} connects failed in the storm");
                }
                if let Some(p) = t.proc.as_mut() {
                    if let Ok(Some(status)) = p.0.try_wait() {
                        bail!("{tool} exited during the {mode} storm ({status}): its rate would be nothing's");
                    }
                }
                // Read as the storm ends. What the agent reads after it (its backlog) is left
                // out: 1 ms of 32 (RST) and of 90 (TIME_WAIT churn) seen here, 1.2 s on; its
                // exit (final drain, detaching) costs 5 or 6 ms more.
                let (mut cpu, mut hwm) = (0.0, 0);
                if let (Some(p), Some(meter)) = (&t.proc, &t.cpu) {
                    cpu = meter.secs() - t.cpu0;
                    hwm = vm_hwm_kib(p.pid());
                }
                let cpu_clock = t.cpu.as_ref().map(CpuMeter::clock);
                if let Some(mut p) = t.proc.take() {
                    p.interrupt();
                }
                drop(t.floor.take());
                let summary = if tool == "portx" {
                    final_summary(&t.out)
                } else {
                    None
                };
                eprintln!(
                    "bench: {mode} round {round} {tool}: {:.0}/s",
                    n as f64 / secs
                );
                samples.push(json!({
                    "mode": mode, "round": round, "tool": tool, "rate": n as f64 / secs, "count": n,
                    "storm_failed": failed,
                    "decode_errors": summary.as_ref().map(|s| s["decode_errors"].clone()),
                    "cpu_s": cpu, "cpu_clock": cpu_clock, "hwm_kib": hwm,
                    "final_summary": summary.is_some(),
                    "events": summary.as_ref().map(|s| s["events"].clone()),
                    "lost": summary.as_ref().map(|s| s["lost"].clone()),
                    "missed": summary.as_ref().map(|s| s["missed"].clone()),
                    "connect_failures": summary.as_ref().map(|s| s["connect_failures"].clone()),
                }));
            }
        }
        // After the rounds: the statistics cost every program on the host a little while on.
        let (mut storms, mut floor) = (Vec::new(), Vec::new());
        for _ in 0..args.own_cpu_storms {
            storms.push(own_cpu_storm(&agent, &ns, mode, args, &dir, tick)?);
            floor.push(floor_storm(&agent, &ns, mode, args, &hooks, tick)?);
        }
        if let Some(mut s) = own_cpu::summary(&storms, &floor) {
            s["mode"] = json!(mode);
            own.push(s);
        }
    }

    let tax = syscall_tax(&hooks, args.syscall_tax_seconds)?;

    // Undersized ring buffer: the loss must be reported, not silent.
    let small = {
        let ns = Netns::new(&agent, &sysctls("rst"))?;
        let mut t = start_tool(
            "portx",
            &agent,
            &ns,
            &dir,
            &["--ring-buffer-kib", "4"],
            &hooks,
            tick,
        )?;
        let n = storm(&agent, &ns, "rst", args)?.count;
        if let Some(mut p) = t.proc.take() {
            p.interrupt();
        }
        let s = final_summary(&t.out);
        let final_seen = s.is_some();
        let s = s.unwrap_or(Value::Null);
        // The agent's warning of the kernel's drops (not of output lines it dropped).
        let warned = fs::read_to_string(dir.join("portx.err"))
            .unwrap_or_default()
            .contains("events (ring buffer full;");
        json!({"connections": n, "events": s["events"], "lost": s["lost"], "missed": s["missed"], "warned_on_stderr": warned, "final_summary": final_seen})
    };

    let latency = json!({
        "idle": latency(&agent, args, false)?,
        "under_rst_storm": latency(&agent, args, true)?,
    });
    let tracker: Value = {
        let out = cmd::output(Command::new("cargo").current_dir(&root).args([
            "bench",
            "-q",
            "-p",
            "portx-agent",
            "--bench",
            "tracker",
        ]))?;
        out.lines()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or(Value::Null)
    };
    let found = Found {
        hooks,
        not_mirrored,
        syscall_tax: tax,
        samples,
        own_cpu: own,
        undersized_ring: small,
        latency,
        tracker,
    };
    report(&modes, &found, args, &dir)
}

/// Bind()'s entry, which portx's hooks include only where bind()'s exit cannot read the call's
/// arguments from the task's registers (before Linux 5.15).
const BIND_ENTRY: &str = "tracepoint:syscalls:sys_enter_bind";

/// The syscall tax of portx's `hooks` (see `syscall_tax`), and where they leave out bind()'s
/// entry, of the same with it, for comparison; by what was measured.
fn syscall_tax(hooks: &[String], seconds: f64) -> anyhow::Result<Vec<(String, Value)>> {
    if seconds <= 0.0 {
        return Ok(Vec::new());
    }
    let mut variants = vec![("portx's hooks".to_string(), hooks.to_vec())];
    let tracepoint_mode = hooks.iter().any(|h| h.starts_with("tracepoint:syscalls:"));
    if tracepoint_mode && !hooks.iter().any(|h| h == BIND_ENTRY) {
        let mut with_entry = hooks.to_vec();
        with_entry.push(BIND_ENTRY.to_string());
        variants.push((
            "portx's hooks and bind()'s entry (portx on kernels before 5.15)".to_string(),
            with_entry,
        ));
    }
    let sets: Vec<Vec<String>> = variants.iter().map(|(_, h)| h.clone()).collect();
    let pairs = syscall_tax::pairs(&sets, seconds)?;
    let found = variants
        .into_iter()
        .zip(pairs)
        .map(|((what, _), p)| (what, syscall_tax::summary(&p)))
        .collect();
    Ok(found)
}

/// One storm with portx attached, measured as [`measured_storm`] says.
fn own_cpu_storm(
    agent: &Path,
    ns: &Netns,
    mode: &str,
    args: &BenchArgs,
    dir: &Path,
    tick: f64,
) -> anyhow::Result<own_cpu::Storm> {
    let mut t = start_tool("portx", agent, ns, dir, &[], &[], tick)?;
    let pid = t
        .proc
        .as_ref()
        .map(Proc::pid)
        .ok_or_else(|| anyhow!("portx has no process"))?;
    let storm = measured_storm(agent, ns, mode, args, pid, t.cpu.as_ref(), tick);
    if let Some(mut p) = t.proc.take() {
        p.interrupt();
    }
    let storm = storm?;
    if storm.programs.is_empty() {
        bail!("portx (pid {pid}) holds no BPF program fd");
    }
    eprintln!(
        "bench: {mode} own CPU storm: {} connections, programs {:?}",
        storm.connections, storm.programs
    );
    Ok(storm)
}

/// One storm with the floor's empty programs attached: what the statistics measure of a
/// program that does nothing.
fn floor_storm(
    agent: &Path,
    ns: &Netns,
    mode: &str,
    args: &BenchArgs,
    hooks: &[String],
    tick: f64,
) -> anyhow::Result<own_cpu::Storm> {
    let _floor = Floor::attach(hooks).context("floor")?;
    let storm = measured_storm(agent, ns, mode, args, std::process::id(), None, tick)?;
    eprintln!(
        "bench: {mode} floor storm: {} connections, programs {:?}",
        storm.connections, storm.programs
    );
    Ok(storm)
}

/// A storm with the kernel's BPF run-time statistics on: the machine's busy CPU, the runs of the
/// programs process `holder` holds and, given one, the CPU `cpu_of` meters (see `own_cpu`).
fn measured_storm(
    agent: &Path,
    ns: &Netns,
    mode: &str,
    args: &BenchArgs,
    holder: u32,
    cpu_of: Option<&CpuMeter>,
    tick: f64,
) -> anyhow::Result<own_cpu::Storm> {
    let cpu = || cpu_of.map_or(0.0, CpuMeter::secs);
    let stats = bpf::RunTimeStats::enable()?;
    let programs0 = own_cpu::programs_of(holder)?;
    let (busy0, cpu0) = (own_cpu::busy_ticks()?, cpu());
    let n = storm(agent, ns, mode, args)?.count;
    let (busy1, cpu1) = (own_cpu::busy_ticks()?, cpu());
    let programs1 = own_cpu::programs_of(holder)?;
    drop(stats);
    Ok(own_cpu::Storm {
        connections: n,
        busy_s: busy1.saturating_sub(busy0) as f64 / tick,
        agent_s: cpu1 - cpu0,
        // Named while still loaded.
        programs: own_cpu::runs_between(&programs0, &programs1),
    })
}

/// Time from a failing connect() returning to the agent's `connect_failed` (and `exhaustion`)
/// line arriving on its stdout. Victims are spaced just over a second apart so that every one of
/// them also gets an exhaustion report (rate-limited to one a second per destination).
///
/// `under_storm`: with the RST storm (`args.threads` threads) running in the same namespace the
/// whole time, so that the agent reads its records and shares the CPUs with it while the
/// failures come: the minute portx is for, not an idle machine. The storm's connections go to
/// its own listeners (ports outside the 16-port range), so they take the range's ports too,
/// each to another destination, while the hog holds every one of them to the victims'.
fn latency(agent: &Path, args: &BenchArgs, under_storm: bool) -> anyhow::Result<Value> {
    let ns = Netns::new(agent, &sysctls("fail"))?;
    let path = ns.path();
    let _server = Proc(
        Command::new(agent)
            .args([
                "workload",
                "--netns",
                &path,
                "serve",
                "--listen",
                "127.0.0.1:9000",
            ])
            .stdout(Stdio::null())
            .spawn()?,
    );
    std::thread::sleep(Duration::from_millis(300));
    let _hog = Proc(
        Command::new(agent)
            .args([
                "workload",
                "--netns",
                &path,
                "hold",
                "--connect",
                "127.0.0.1:9000",
                "--count",
                "16",
            ])
            .stdout(Stdio::null())
            .spawn()?,
    );
    let mut child = dies_with_parent(&mut Command::new(agent))
        .args([
            "trace",
            "--json",
            "--interval",
            "5",
            "--netns",
            &ns.id.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let _agent = Proc(child);
    let (tx, rx) = mpsc::channel::<(u128, Value)>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let at = now_ns();
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send((at, v)).is_err() {
                    break;
                }
            }
        }
    });
    let wait = |pred: &dyn Fn(&Value) -> bool| -> Option<u128> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok((at, v)) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if pred(&v) {
                return Some(at);
            }
        }
        None
    };
    wait(&|v| v["type"] == "started").ok_or_else(|| anyhow!("agent did not start"))?;
    let storm = if under_storm {
        // Long enough for every sample (1.1 s apart, each line within milliseconds); waited for
        // below, so that its rate is the rate the samples were taken under.
        let seconds = args.latency_samples as f64 * 1.2 + 2.0;
        let child = Command::new(agent)
            .args([
                "workload",
                "--netns",
                &path,
                "storm",
                "--threads",
                &args.threads.to_string(),
                "--seconds",
                &format!("{seconds:.1}"),
                "--close",
                "rst",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the storm")?;
        Some(Proc(child))
    } else {
        None
    };
    std::thread::sleep(Duration::from_millis(500));
    let (mut failed_ms, mut report_ms) = (Vec::new(), Vec::new());
    for _ in 0..args.latency_samples {
        let out = Command::new(agent)
            .args([
                "workload",
                "--netns",
                &path,
                "--name",
                "victim",
                "connect",
                "--connect",
                "127.0.0.1:9000",
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let returned: u128 = said(&text, "at").ok_or_else(|| anyhow!("victim said `{text}`"))?;
        // A line that never came (10 s) has no time to go into the percentiles; the counts of
        // lines that came are reported beside them, and the target fails unless every one came
        // (targets.rs).
        if let Some(at) = wait(&|v| v["type"] == "connect_failed") {
            failed_ms.push(at.saturating_sub(returned) as f64 / 1e6);
        }
        if let Some(at) = wait(&|v| v["type"] == "exhaustion") {
            report_ms.push(at.saturating_sub(returned) as f64 / 1e6);
        }
        std::thread::sleep(Duration::from_millis(1100));
    }
    let mut v = json!({
        "samples": args.latency_samples,
        "connect_failed_lines": failed_ms.len(), "exhaustion_lines": report_ms.len(),
        "connect_failed_p50_ms": median(&mut failed_ms.clone()), "connect_failed_p99_ms": percentile(&mut failed_ms, 0.99),
        "exhaustion_p50_ms": median(&mut report_ms.clone()), "exhaustion_p99_ms": percentile(&mut report_ms, 0.99),
    });
    if let Some(storm) = storm {
        v["storm_per_sec"] = storm_rate(storm)?.into();
    }
    Ok(v)
}

/// The connections a second of a latency run's storm, once it has ended by itself: a storm that
/// failed, or that made no connection, leaves the samples taken on an idle machine, which must
/// not pass for figures under load.
fn storm_rate(mut storm: Proc) -> anyhow::Result<f64> {
    use std::io::Read as _;
    // Its output is a line or two: the pipes never fill before it exits.
    let status = storm.0.wait().context("waiting for the storm")?;
    let (mut text, mut err) = (String::new(), String::new());
    if let Some(mut o) = storm.0.stdout.take() {
        o.read_to_string(&mut text)?;
    }
    if let Some(mut e) = storm.0.stderr.take() {
        e.read_to_string(&mut err)?;
    }
    let field = |k: &str| said::<f64>(&text, k);
    match (status.success(), field("ok"), field("secs")) {
        (true, Some(ok), Some(secs)) if ok > 0.0 && secs > 0.0 => Ok(ok / secs),
        _ => bail!(
            "the storm under the latency samples did not run ({status}): {} {}",
            text.trim(),
            err.trim()
        ),
    }
}

/// The `p` percentile of `v` by nearest rank (the smallest value with at least `p` of them at
/// or below it; of 20, p99 is the largest); NaN for none.
pub(crate) fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = (p * v.len() as f64).ceil() as usize;
    v.get(rank.max(1) - 1).copied().unwrap_or(f64::NAN)
}

/// What a run measured, besides the table it prints.
struct Found {
    /// The hooks portx attached on this kernel.
    hooks: Vec<String>,
    /// Those of them on which the floor has no empty program.
    not_mirrored: Vec<String>,
    /// By what was measured, [`syscall_tax::summary`].
    syscall_tax: Vec<(String, Value)>,
    /// One a storm of the rounds: mode, round, tool, rate, the tool's CPU and memory.
    samples: Vec<Value>,
    /// By mode, [`own_cpu::summary`].
    own_cpu: Vec<Value>,
    undersized_ring: Value,
    latency: Value,
    tracker: Value,
}

fn report(
    modes: &[&'static str],
    found: &Found,
    args: &BenchArgs,
    dir: &Path,
) -> anyhow::Result<()> {
    let Found {
        hooks,
        not_mirrored,
        syscall_tax: tax,
        samples,
        own_cpu: own,
        undersized_ring: small,
        latency,
        tracker,
    } = found;
    let mut table = Vec::new();
    println!(
        "\nportx's hooks here: {}; floor: empty programs on {}",
        hooks.join(", "),
        if not_mirrored.is_empty() {
            "every one of them".to_string()
        } else {
            format!("all but {}", not_mirrored.join(", "))
        }
    );
    println!("floor-state: the empty program on the state change alone, what a design without syscall hooks would pay");
    println!("portx bench: {} threads, {} s storms, {} rounds, A/B interleaved (ratio = rate with tool / rate with nothing, same round)", args.threads, args.seconds, args.rounds);
    let run = run_facts(args);
    println!("run: {run}");
    let clocks: std::collections::BTreeSet<&str> = samples
        .iter()
        .filter_map(|s| s["cpu_clock"].as_str())
        .collect();
    if !clocks.is_empty() {
        let clocks: Vec<&str> = clocks.into_iter().collect();
        println!(
            "CPU s/100k: the tool's CPU during the storm, from {}",
            clocks.join(" and ")
        );
    }
    println!(
        "{:<8} {:<12} {:>12} {:>8} {:>15} {:>14} {:>9} {:>12}",
        "MODE", "TOOL", "RATE/s", "RATIO", "MIN-MAX", "CPU s/100k", "RSS MiB", "LOST/MISSED"
    );
    for &mode in modes {
        let of = |tool: &'static str| {
            samples
                .iter()
                .filter(move |s| s["mode"] == mode && s["tool"] == tool)
        };
        for tool in TOOLS {
            let mut ratios: Vec<f64> = round_ratios(samples, mode, tool).into_values().collect();
            let mut rates: Vec<f64> = of(tool).filter_map(|s| s["rate"].as_f64()).collect();
            let (lo, hi) = min_max(&ratios);
            let ratio = median(&mut ratios);
            let rate = median(&mut rates);
            let mut cpu: Vec<f64> = of(tool)
                .filter_map(|s| Some(s["cpu_s"].as_f64()? / (s["count"].as_f64()? / 100_000.0)))
                .collect();
            let cpu = median(&mut cpu);
            let hwm = of(tool)
                .filter_map(|s| s["hwm_kib"].as_u64())
                .max()
                .unwrap_or(0) as f64
                / 1024.0;
            let lost: u64 = of(tool).filter_map(|s| s["lost"].as_u64()).sum();
            let missed: u64 = of(tool).filter_map(|s| s["missed"].as_u64()).sum();
            let loss = if tool == "portx" {
                format!("{lost}/{missed}")
            } else {
                "-".into()
            };
            let (cpu_s, hwm_s) = if holds_no_process(tool) {
                ("-".to_string(), "-".to_string())
            } else {
                (format!("{cpu:.3}"), format!("{hwm:.1}"))
            };
            println!("{mode:<8} {tool:<12} {rate:>12.0} {ratio:>8.3} {:>15} {cpu_s:>14} {hwm_s:>9} {loss:>12}", format!("{lo:.3}-{hi:.3}"));
            // Null where the table prints "-": no process of the tool's own to measure.
            let (cpu_j, hwm_j) = if holds_no_process(tool) {
                (Value::Null, Value::Null)
            } else {
                (json!(cpu), json!(hwm))
            };
            let mut row = json!({"mode": mode, "tool": tool, "rate": rate, "ratio_median": ratio, "ratio_min": lo, "ratio_max": hi, "cpu_s_per_100k": cpu_j, "peak_rss_mib": hwm_j, "lost": lost, "missed": missed});
            if tool == "portx" {
                read_vs_made(&mut row, mode, of(tool));
            }
            table.push(row);
        }
    }
    let mut against = Vec::new();
    for &mode in modes {
        if let Some(a) = against_floor(samples, mode) {
            println!(
                "{mode:<8} floor - portx, same round: median {:.3}, {:.3} to {:.3}; portx above bpftrace in {} of {} rounds",
                a.gap_median, a.gap_min, a.gap_max, a.above_bpftrace, a.rounds
            );
            against.push(json!({"mode": mode, "floor_minus_portx_median": a.gap_median, "floor_minus_portx_min": a.gap_min, "floor_minus_portx_max": a.gap_max, "portx_above_bpftrace_rounds": a.above_bpftrace, "rounds": a.rounds}));
        }
    }
    for s in own {
        println!(
            "{:<8} portx's own CPU, BPF run-time statistics on: {}",
            s["mode"].as_str().unwrap_or("?"),
            own_cpu::line(s)
        );
    }
    for (what, s) in tax {
        println!(
            "syscall tax, one thread's getppid(), bursts with nothing attached alternated with bursts with empty programs on {what}: {}",
            syscall_tax::line(s)
        );
    }
    println!("undersized ring buffer (4 KiB, rst storm): {small}");
    println!(
        "latency failing connect() -> record on stdout, the agent idle: {}",
        latency["idle"]
    );
    println!(
        "latency failing connect() -> record on stdout, the RST storm running in the same namespace: {}",
        latency["under_rst_storm"]
    );
    println!("tracker on synthetic events (one core): {tracker}");
    let targets = targets::judge(&table, small, latency, tracker);
    println!("targets (the performance issue's), in this run:");
    for t in &targets {
        println!("  {:<12} {}: {}", t.verdict(), t.what, t.measured);
    }
    let targets: Vec<Value> = targets.iter().map(targets::Target::json).collect();
    let tax: serde_json::Map<String, Value> = tax.iter().cloned().collect();
    let all = json!({"run": run, "hooks": hooks, "floor_not_mirrored": not_mirrored, "syscall_tax": tax, "table": table, "against_floor": against, "own_cpu": own, "samples": samples, "undersized_ring": small, "latency": latency, "tracker": tracker, "targets": targets});
    let path = dir.join("last.json");
    fs::write(&path, serde_json::to_string_pretty(&all)?)?;
    println!("written to {}", path.display());
    Ok(())
}

/// What ties a JSON to its run: when, on what, and how it was asked for.
fn run_facts(args: &BenchArgs) -> Value {
    let text = |c: &mut Command| cmd::output(c).map(|s| s.trim().to_string()).ok();
    let cpu = fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
        c.lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
            .map(|(_, m)| m.trim().to_string())
    });
    json!({
        "date_utc": text(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])),
        "kernel": text(Command::new("uname").arg("-r")),
        "cpu_model": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "commit": text(Command::new("git").args(["rev-parse", "--short", "HEAD"])),
        "threads": args.threads,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "modes": args.modes,
        "own_cpu_storms": args.own_cpu_storms,
        "syscall_tax_seconds": args.syscall_tax_seconds,
        "latency_samples": args.latency_samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(mode: &str, tool: &str, round: u64, rate: f64) -> Value {
        json!({"mode": mode, "tool": tool, "round": round, "rate": rate})
    }

    #[test]
    fn each_tool_runs_in_each_place_and_after_each_other_tool_once_in_six_rounds() {
        let n = TOOLS.len();
        let rows: Vec<Vec<usize>> = (0..n).map(|r| round_order(r, n)).collect();
        let mut after = BTreeMap::new();
        for row in &rows {
            let mut sorted = row.clone();
            sorted.sort();
            assert_eq!(
                sorted,
                (0..n).collect::<Vec<_>>(),
                "{row:?} runs each tool once"
            );
            for pair in row.windows(2) {
                *after.entry((pair[0], pair[1])).or_insert(0) += 1;
            }
        }
        for place in 0..n {
            let mut tools: Vec<usize> = rows.iter().map(|r| r[place]).collect();
            tools.sort();
            assert_eq!(tools, (0..n).collect::<Vec<_>>(), "place {place}");
        }
        assert_eq!(after.len(), n * (n - 1), "every ordered pair: {after:?}");
        assert!(after.values().all(|c| *c == 1), "{after:?}");
    }

    #[test]
    fn a_workload_value_is_found_by_its_whole_key() {
        let out = "storm ok=120 failed=3 secs=3.001";
        assert_eq!(said::<u64>(out, "ok"), Some(120));
        assert_eq!(said::<f64>(out, "secs"), Some(3.001));
        assert_eq!(said::<u64>(out, "fail"), None, "a prefix of another key");
        assert_eq!(said::<u64>(out, "lost"), None);
    }

    #[test]
    fn p99_of_twenty_is_the_largest_and_p50_the_median() {
        let mut v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.99), 20.0);
        assert_eq!(percentile(&mut v, 0.5), 10.0, "nearest rank");
        assert_eq!(median(&mut v), 10.5);
        assert!(percentile(&mut [], 0.99).is_nan());
    }

    #[test]
    fn what_portx_read_is_held_against_what_the_storms_made() {
        let s = |events: u64, count: u64, failures: u64, fin: bool| {
            json!({"events": events, "count": count, "connect_failures": failures,
                "final_summary": fin})
        };
        let mut row = json!({});
        let rst = [
            s(400, 200, 0, true),
            s(300, 100, 0, true),
            s(1, 100, 0, false),
        ];
        read_vs_made(&mut row, "rst", rst.iter());
        assert_eq!(row["rounds_without_final_summary"], 1);
        assert_eq!(
            (row["rounds_short"].clone(), row["records_short"].clone()),
            (json!(0), json!(0.0))
        );
        assert_eq!(
            row["records_per_connection_min"], 2.0,
            "the round without is left out"
        );
        // A round of session 37's run: a connection's two last state changes ran no program.
        let mut row = json!({});
        let close = [
            s(1_452_542, 363_136, 0, true),
            s(1_452_544, 363_136, 0, true),
        ];
        read_vs_made(&mut row, "close", close.iter());
        assert_eq!(
            (row["rounds_short"].clone(), row["records_short"].clone()),
            (json!(1), json!(2.0))
        );
        let mut row = json!({});
        let fail = [s(5, 1000, 1000, true), s(5, 500, 499, true)];
        read_vs_made(&mut row, "fail", fail.iter());
        assert_eq!(
            (
                row["failures_made"].clone(),
                row["failures_reported"].clone()
            ),
            (json!(1500), json!(1499))
        );
    }

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn the_floor_gap_and_the_bpftrace_wins_are_taken_round_by_round() {
        let mut samples = Vec::new();
        // Round 0: a fast round; round 1: everything slower, nothing attached included.
        for (round, none, portx, floor, bpftrace) in [
            (0, 200.0, 180.0, 196.0, 170.0),
            (1, 100.0, 92.0, 98.0, 94.0),
            (2, 150.0, 135.0, 150.0, 120.0),
        ] {
            samples.push(sample("rst", "none", round, none));
            samples.push(sample("rst", "portx", round, portx));
            samples.push(sample("rst", "floor", round, floor));
            samples.push(sample("rst", "bpftrace", round, bpftrace));
        }
        // Another mode's samples stay out of it.
        samples.push(sample("fail", "none", 0, 10.0));
        samples.push(sample("fail", "portx", 0, 1.0));
        let a = against_floor(&samples, "rst").expect("rounds with both");
        // Gaps per round: 0.98-0.90, 0.98-0.92, 1.00-0.90.
        assert_eq!(a.rounds, 3);
        assert!((a.gap_min - 0.06).abs() < 1e-9, "{}", a.gap_min);
        assert!((a.gap_median - 0.08).abs() < 1e-9, "{}", a.gap_median);
        assert!((a.gap_max - 0.10).abs() < 1e-9, "{}", a.gap_max);
        assert_eq!(a.above_bpftrace, 2, "rounds 0 and 2");
        assert!(
            against_floor(&samples, "fail").is_none(),
            "no floor measured"
        );
    }
}
