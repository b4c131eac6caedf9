//! Running commands: echo them, fail with context.
use std::{
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs with inherited stdio, printing the command first; error on non-zero exit.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let line = show(cmd);
    eprintln!("+ {line}");
    let status = cmd.status().with_context(|| format!("starting `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs and captures stdout as text; error (with stderr) on non-zero exit.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    output_bytes(cmd).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// True if the command runs and exits 0 (output discarded).
pub fn ok(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

/// Runs and captures raw stdout; error (with stderr) on non-zero exit.
pub fn output_bytes(cmd: &mut Command) -> anyhow::Result<Vec<u8>> {
    let line = show(cmd);
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().with_context(|| format!("starting `{line}`"))?;
    if !status.success() {
        bail!(
            "`{line}` failed ({status}): {}",
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    Ok(stdout)
}

/// Like [`run`], but a command still running after `limit` is stopped, with every process it
/// started (SIGTERM, then SIGKILL 10 s later), and reported as having hung. For a stage whose
/// test can wait for ever (an end-to-end test that waits on a line that never comes): CI would
/// otherwise spend its whole budget on it and leave the agents and namespaces it started
/// behind. The command stays in xtask's process group, so Ctrl-C still reaches all of it.
pub fn run_within(cmd: &mut Command, limit: Duration) -> anyhow::Result<()> {
    let line = show(cmd);
    eprintln!("+ {line}");
    let mut child = cmd.spawn().with_context(|| format!("starting `{line}`"))?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() >= limit {
            let stopped = stop_tree(child.id());
            // Reaped here if stop_tree's signals did not already let it go.
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{line}` did not finish within {} minutes: stopped it and {} process(es) it started",
                limit.as_secs() / 60,
                stopped.saturating_sub(1)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// The pids of `root` and every process below it, parents first, from `/proc/<pid>/stat`.
fn tree(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            if let Some(ppid) = ppid_of(&stat) {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found
}

/// The parent pid in a `/proc/<pid>/stat` line: the second field after the command, which is
/// in parentheses and may itself hold spaces and parentheses.
fn ppid_of(stat: &str) -> Option<u32> {
    after_comm(stat).split_whitespace().nth(1)?.parse().ok()
}

/// A `/proc/<pid>/stat` line past its command (state first); empty if it has none.
fn after_comm(stat: &str) -> &str {
    stat.rfind(')').map_or("", |i| &stat[i + 1..])
}

/// SIGTERM to `root`'s tree (children first, so that none is reparented away before it is
/// seen), then SIGKILL to what is still there after 10 s. Returns how many processes it found.
fn stop_tree(root: u32) -> usize {
    let signal_all = |pids: &[u32], signal: i32| {
        for &p in pids.iter().rev() {
            // SAFETY: kill with pids read from /proc; a pid gone meanwhile just fails.
            unsafe { libc::kill(p as i32, signal) };
        }
    };
    let pids = tree(root);
    signal_all(&pids, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && pids.iter().any(|&p| alive(p)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    // Those reparented to init meanwhile are still in `pids`.
    let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    signal_all(&left, libc::SIGKILL);
    pids.len()
}

/// True while `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| after_comm(&s).split_whitespace().next().map(|st| st != "Z"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_pid_after_a_command_with_spaces_and_parentheses() {
        assert_eq!(ppid_of("42 (a b) (c)) S 17 42 42 0 -1"), Some(17));
        assert_eq!(ppid_of("42 (sh) R 1 42"), Some(1));
        assert_eq!(ppid_of("garbage"), None);
    }

    #[test]
    fn a_command_past_its_limit_is_stopped_with_what_it_started() {
        // sh starts a sleep of its own and waits for it: both must be gone afterwards.
        let dir = std::env::temp_dir().join(format!("portx-run-within-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("sleep.pid");
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("sleep 300 & echo $! > \"$1\"; wait")
            .arg("sh")
            .arg(&pidfile);
        let started = Instant::now();
        let err = run_within(&mut c, Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("did not finish within"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(12));
        let sleep: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            !alive(sleep),
            "the command's own child {sleep} is still running"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_command_within_its_limit_is_run_as_run_does() {
        run_within(&mut Command::new("true"), Duration::from_secs(30)).unwrap();
        let err = run_within(&mut Command::new("false"), Duration::from_secs(30)).unwrap_err();
        assert!(err.to_string().contains("failed"), "{err}");
    }
}
