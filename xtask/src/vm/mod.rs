//! `cargo xtask vm-test`: the end-to-end tests on Debian kernels under QEMU, once per hook mode,
//! reported as a kernel × hook-mode matrix (also written to `target/vm/last-matrix.json`).
mod initramfs;
mod kernels;
mod qemu;

use std::{
    fs,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::bail;
use clap::Args;

use crate::cmd;

#[derive(Args, Clone)]
pub struct VmArgs {
    /// Kernel to test (repeatable): 6.1, 6.12, 5.10, backports. Default: 6.1 and 6.12.
    #[arg(long = "kernel", value_name = "SPEC")]
    pub kernels: Vec<String>,
    /// Hook mode to force (repeatable): auto, fentry, kprobe or tracepoint, optionally with the
    /// state hook after a slash (`tracepoint/raw-tracepoint`, `fentry/tp-btf`). Default: fentry,
    /// kprobe and tracepoint/raw-tracepoint (the host's own tests cover tracepoint with tp_btf).
    #[arg(long = "hooks", value_name = "MODE[/STATE]", value_parser = row_spec)]
    pub hooks: Vec<String>,
    /// The wider kernel set: 5.10, 6.1, 6.12, 6.18 and the newest trixie-backports kernel.
    #[arg(long)]
    pub wide: bool,
    /// VMs at once.
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// CPUs of each VM. With one (the default, so that two VMs share this 2-core machine) the
    /// agent has one ring buffer and the cross-CPU test skips itself; 2 runs it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8))]
    pub cpus: u8,
    /// Minutes before a guest is considered hung and killed.
    #[arg(long, default_value_t = 10)]
    pub timeout_minutes: u64,
    /// Keep serial logs of passing runs too.
    #[arg(long)]
    pub keep_logs: bool,
}

impl VmArgs {
    pub fn defaults(wide: bool) -> Self {
        Self {
            kernels: Vec::new(),
            hooks: Vec::new(),
            wide,
            jobs: 2,
            cpus: 1,
            timeout_minutes: 10,
            keep_logs: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Row {
    pub kernel: String,
    pub package: String,
    pub mode: String,
    pub pass: bool,
    pub hooks_reported: Vec<String>,
    pub passed: u32,
    pub failed: u32,
    pub secs: f64,
    pub log: Option<String>,
    pub note: String,
}

/// At most this many log lines are shown for a failed row: enough for the panic messages.
const FAILED_LOG_LINES: usize = 60;

const MODES: [&str; 4] = ["auto", "fentry", "kprobe", "tracepoint"];
const STATE_HOOKS: [&str; 3] = ["auto", "tp-btf", "raw-tracepoint"];

fn row_spec(s: &str) -> Result<String, String> {
    let (mode, state) = s.split_once('/').unwrap_or((s, "auto"));
    if !MODES.contains(&mode) {
        return Err(format!("hook mode {mode:?} is not one of {MODES:?}"));
    }
    if !STATE_HOOKS.contains(&state) {
        return Err(format!(
            "state hook {state:?} is not one of {STATE_HOOKS:?}"
        ));
    }
    Ok(s.to_string())
}

/// The kernel command line a row boots with.
fn row_cmdline(spec: &str) -> String {
    let (mode, state) = spec.split_once('/').unwrap_or((spec, "auto"));
    format!("portx.hooks={mode} portx.state_hook={state}")
}

/// True when every agent the tests started attached what the row forced: its mode (unless
/// `auto`) and its state hook (if the row names one other than `auto`). Reported as
/// `MODE/STATE`.
fn attached_as_asked(spec: &str, reported: &[String]) -> bool {
    let (mode, state) = spec.split_once('/').unwrap_or((spec, "auto"));
    !reported.is_empty()
        && reported.iter().all(|r| {
            let (rm, rs) = r.split_once('/').unwrap_or((r, "?"));
            (mode == "auto" || rm == mode) && (state == "auto" || rs == state)
        })
}

/// The tests libtest reported as failed (`test NAME ... FAILED`, possibly with the test's own
/// output between the name and the verdict) in the order they failed.
fn failed_tests(text: &str) -> Vec<String> {
    let mut failed = Vec::new();
    let mut current: Option<&str> = None;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix("test ") {
            if let Some((name, _)) = rest.split_once(" ... ") {
                current = Some(name);
            }
        }
        if line.ends_with("FAILED") && !line.starts_with("test result:") {
            if let Some(name) = current.take() {
                if !failed.iter().any(|f| f == name) {
                    failed.push(name.to_string());
                }
            }
        }
    }
    failed
}

/// What to show of a failed row's log: each panic with the lines after it up to the test's
/// verdict, or when nothing panicked (a hang, a crash, a row that never ran) the log's tail.
fn failure_excerpt(text: &str) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    let mut out = Vec::new();
    let mut in_panic = false;
    for line in &lines {
        if line.starts_with("thread '") && line.contains("panicked at") {
            in_panic = true;
        }
        if in_panic {
            if out.len() >= FAILED_LOG_LINES {
                break;
            }
            out.push(*line);
            if *line == "FAILED" || line.starts_with("stack backtrace:") {
                in_panic = false;
            }
        }
    }
    if out.is_empty() {
        out = lines[lines.len().saturating_sub(FAILED_LOG_LINES)..].to_vec();
    }
    out
}

/// Sums libtest's `test result:` lines and collects the hooks the tests saw the agent attach.
fn parse_log(text: &str) -> (u32, u32, Vec<String>) {
    let (mut passed, mut failed) = (0, 0);
    let mut hooks: Vec<String> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.split("test result: ").nth(1) {
            let num = |word: &str| -> u32 {
                rest.split(';')
                    .find_map(|p| p.trim().strip_suffix(word).map(str::trim))
                    .and_then(|n| n.rsplit(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            };
            passed += num("passed");
            failed += num("failed");
        }
        if let Some(h) = line.split("portx-e2e: agent hooks=").nth(1) {
            let h = h.trim().to_string();
            if !hooks.contains(&h) {
                hooks.push(h);
            }
        }
    }
    (passed, failed, hooks)
}

pub fn run(args: &VmArgs) -> anyhow::Result<Vec<Row>> {
    let root = cmd::root();
    let names: Vec<String> = if !args.kernels.is_empty() {
        args.kernels.clone()
    } else if args.wide {
        kernels::WIDE.iter().map(|s| s.to_string()).collect()
    } else {
        kernels::DEFAULT.iter().map(|s| s.to_string()).collect()
    };
    let modes: Vec<String> = if args.hooks.is_empty() {
        ["fentry", "kprobe", "tracepoint/raw-tracepoint"]
            .map(String::from)
            .to_vec()
    } else {
        args.hooks.clone()
    };
    let mut fetched = Vec::new();
    for n in &names {
        fetched.push(kernels::fetch(&root, kernels::spec(n)?)?);
    }
    let base = initramfs::build(&root)?;
    let mut initrds = Vec::new();
    for k in &fetched {
        initrds.push(initramfs::with_modules(&root, &base, k.spec, &k.modules)?);
    }
    let logs = root.join("target/vm/logs");
    fs::create_dir_all(&logs)?;
    let accel = qemu::choose_accel(&fetched[0].vmlinuz, &base, &logs.join("kvm-probe.log"));

    let jobs: Vec<(usize, usize)> = (0..fetched.len())
        .flat_map(|k| (0..modes.len()).map(move |m| (k, m)))
        .collect();
    let queue = Arc::new(Mutex::new(jobs.into_iter()));
    let rows = Arc::new(Mutex::new(Vec::new()));
    let timeout = Duration::from_secs(args.timeout_minutes * 60);
    std::thread::scope(|s| {
        for _ in 0..args.jobs.max(1) {
            let (queue, rows) = (Arc::clone(&queue), Arc::clone(&rows));
            let (fetched, modes, initrds, logs) = (&fetched, &modes, &initrds, &logs);
            s.spawn(move || loop {
                let next = queue.lock().ok().and_then(|mut q| q.next());
                let Some((k, m)) = next else { break };
                let (kernel, mode) = (&fetched[k], &modes[m]);
                // The index keeps repeated rows (`--hooks kprobe --hooks kprobe`) apart.
                let log = logs.join(format!(
                    "{}-{}-{m}.log",
                    kernel.spec,
                    mode.replace('/', "-")
                ));
                eprintln!(
                    "vm: booting {} ({}) with --hooks {mode}",
                    kernel.spec, kernel.package
                );
                let row = match qemu::boot(
                    qemu::Machine {
                        accel,
                        cpus: args.cpus,
                    },
                    &kernel.vmlinuz,
                    &initrds[k],
                    &row_cmdline(mode),
                    &log,
                    timeout,
                    initramfs::MARKER,
                ) {
                    Ok(b) => {
                        let text = fs::read_to_string(&log).unwrap_or_default();
                        let (passed, failed, hooks_reported) = parse_log(&text);
                        let hooks_ok = mode == "auto" || attached_as_asked(mode, &hooks_reported);
                        let pass = b.rc == Some(0) && failed == 0 && passed > 0 && hooks_ok;
                        let note = if b.timed_out {
                            "timed out".to_string()
                        } else if b.rc.is_none() {
                            "no result marker".to_string()
                        } else if !hooks_ok {
                            format!("agent attached {hooks_reported:?}, not {mode}")
                        } else if failed > 0 {
                            format!("failed: {}", failed_tests(&text).join(", "))
                        } else {
                            String::new()
                        };
                        Row {
                            kernel: kernel.spec.to_string(),
                            package: kernel.package.clone(),
                            mode: mode.clone(),
                            pass,
                            hooks_reported,
                            passed,
                            failed,
                            secs: b.secs,
                            log: Some(log.display().to_string()),
                            note,
                        }
                    }
                    Err(e) => Row {
                        kernel: kernel.spec.to_string(),
                        package: kernel.package.clone(),
                        mode: mode.clone(),
                        pass: false,
                        hooks_reported: Vec::new(),
                        passed: 0,
                        failed: 0,
                        secs: 0.0,
                        log: None,
                        note: format!("{e:#}"),
                    },
                };
                if let Ok(mut r) = rows.lock() {
                    r.push(row);
                }
            });
        }
    });
    let mut rows = Arc::try_unwrap(rows)
        .ok()
        .and_then(|m| m.into_inner().ok())
        .unwrap_or_default();
    rows.sort_by(|a, b| {
        (names.iter().position(|n| *n == a.kernel), &a.mode)
            .cmp(&(names.iter().position(|n| *n == b.kernel), &b.mode))
    });
    for r in &mut rows {
        if r.pass && !args.keep_logs {
            if let Some(l) = r.log.take() {
                let _ = fs::remove_file(l);
            }
        }
    }
    print_matrix(&rows, accel);
    let json: Vec<_> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "kernel": r.kernel, "package": r.package, "hooks": r.mode, "pass": r.pass,
                "hooks_reported": r.hooks_reported, "tests_passed": r.passed,
                "tests_failed": r.failed, "seconds": (r.secs * 10.0).round() / 10.0,
                "log": r.log, "note": r.note,
            })
        })
        .collect();
    fs::write(
        root.join("target/vm/last-matrix.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    let failed: Vec<_> = rows.iter().filter(|r| !r.pass).collect();
    if !failed.is_empty() {
        for r in &failed {
            eprintln!(
                "vm: FAIL {} --hooks {}: {} (log: {})",
                r.kernel,
                r.mode,
                r.note,
                r.log.as_deref().unwrap_or("-")
            );
            // The log lives in the CI machine's target/ and goes with it: say why here.
            if let Some(text) = r.log.as_deref().and_then(|l| fs::read_to_string(l).ok()) {
                for line in failure_excerpt(&text) {
                    eprintln!("  | {line}");
                }
            }
        }
        bail!("{} of {} VM runs failed", failed.len(), rows.len());
    }
    Ok(rows)
}

fn print_matrix(rows: &[Row], accel: qemu::Accel) {
    eprintln!("\nkernel matrix ({accel:?}):");
    eprintln!(
        "  {:<10} {:<40} {:<25} {:<5} {:<25} {:>6} {:>7}  NOTE",
        "KERNEL", "PACKAGE", "HOOKS", "", "ATTACHED", "TESTS", "SECS"
    );
    for r in rows {
        eprintln!(
            "  {:<10} {:<40} {:<25} {:<5} {:<25} {:>6} {:>7.1}  {}",
            r.kernel,
            r.package,
            r.mode,
            if r.pass { "PASS" } else { "FAIL" },
            r.hooks_reported.join(","),
            format!("{}/{}", r.passed, r.passed + r.failed),
            r.secs,
            r.note
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_libtest_results_and_reported_hooks() {
        let log = "portx-e2e: agent hooks=fentry/tp-btf\r\n\
                   test result: ok. 6 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n\
                   portx-e2e: agent hooks=fentry/tp-btf\n\
                   test result: FAILED. 2 passed; 1 failed; 0 ignored\n";
        let (p, f, h) = parse_log(log);
        assert_eq!((p, f), (8, 1));
        assert_eq!(h, vec!["fentry/tp-btf".to_string()]);
    }

    #[test]
    fn a_failed_row_names_its_tests_and_shows_their_panics() {
        let log = "test a_ok ... portx-e2e: agent hooks=fentry/tp-btf\r\nok\r\n\
                   test loses ... portx-e2e: agent hooks=fentry/tp-btf\n\
                   3000 connections: read 9002, lost 2998\n\
                   \n\
                   thread 'loses' (1140) panicked at tests/loss.rs:60:5:\n\
                   assertion `left == right` failed\n\
                   stack backtrace:\n   0: rust_begin_unwind\nFAILED\n\
                   test also_fails ... FAILED\n\
                   failures:\n    loses\n    also_fails\n\
                   test result: FAILED. 1 passed; 2 failed; 0 ignored\n";
        assert_eq!(failed_tests(log), vec!["loses", "also_fails"]);
        assert_eq!(
            failure_excerpt(log),
            vec![
                "thread 'loses' (1140) panicked at tests/loss.rs:60:5:",
                "assertion `left == right` failed",
                "stack backtrace:",
            ]
        );
        let hung = "portx-vm: running /portx/tests/loss\nrunning 3 tests\n";
        assert_eq!(
            failure_excerpt(hung),
            vec!["portx-vm: running /portx/tests/loss", "running 3 tests"]
        );
    }

    #[test]
    fn a_row_passes_only_if_the_agent_attached_what_it_forced() {
        let r = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(attached_as_asked("fentry", &r(&["fentry/tp-btf"])));
        assert!(attached_as_asked("fentry", &r(&["fentry/raw-tracepoint"])));
        assert!(!attached_as_asked(
            "fentry",
            &r(&["fentry/tp-btf", "kprobe/tp-btf"])
        ));
        assert!(!attached_as_asked("fentry", &[]));
        let raw = "tracepoint/raw-tracepoint";
        assert!(attached_as_asked(raw, &r(&[raw])));
        assert!(!attached_as_asked(raw, &r(&["tracepoint/tp-btf"])));
        assert!(!attached_as_asked(raw, &r(&["tracepoint"])));
        assert_eq!(
            row_cmdline(raw),
            "portx.hooks=tracepoint portx.state_hook=raw-tracepoint"
        );
        assert_eq!(
            row_cmdline("kprobe"),
            "portx.hooks=kprobe portx.state_hook=auto"
        );
        assert!(row_spec("tracepoint/raw-tracepoint").is_ok());
        assert!(row_spec("tracepoint/raw").is_err());
        assert!(row_spec("uprobe").is_err());
    }
}
