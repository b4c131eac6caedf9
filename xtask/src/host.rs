//! Processes and a private network namespace on the host, for `bench` and `soak`.
use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _};

use crate::cmd;

/// Builds the release agent (what users run) and returns its path and a fresh-or-kept output
/// directory `target/<name>`.
pub fn release_agent(name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let root = cmd::root();
    cmd::run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "portx-agent",
    ]))?;
    let dir = root.join("target").join(name);
    fs::create_dir_all(&dir)?;
    Ok((root.join("target/release/portx-agent"), dir))
}

/// Has `c`'s process sent SIGTERM when the thread that starts it ends: `Proc`'s drop does not run
/// when the xtask is killed (a CI timeout, SIGKILL), and an agent or a peer left running would
/// keep its programs attached to every connect on the host. Only for processes started from
/// the main thread, which lives as long as the xtask does.
pub fn dies_with_parent(c: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs between fork and exec and only makes an async-signal-safe call.
    unsafe {
        c.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// A process killed (SIGINT, then SIGKILL) on drop.
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
    pub fn interrupt(&mut self) {
        // SAFETY: kill with a pid we own.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.interrupt();
        }
    }
}

/// A private network namespace held by `portx-agent workload park`.
pub struct Netns {
    park: Proc,
    pub id: u64,
}

impl Netns {
    pub fn new(agent: &Path, sysctls: &[&str]) -> anyhow::Result<Netns> {
        let mut c = Command::new(agent);
        c.args(["workload", "park"]);
        for s in sysctls {
            c.args(["--sysctl", s]);
        }
        let mut child = c.stdout(Stdio::piped()).spawn().context("starting park")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?)
            .read_line(&mut line)?;
        let id = line
            .trim()
            .strip_prefix("ready netns=")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("park said `{line}`"))?;
        Ok(Netns {
            park: Proc(child),
            id,
        })
    }
    pub fn path(&self) -> String {
        format!("/proc/{}/ns/net", self.park.pid())
    }
}

pub fn wait_for_file(path: &Path, needle: &str, secs: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if fs::read_to_string(path).is_ok_and(|s| s.contains(needle)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{} never said `{needle}`", path.display())
}

/// CPU seconds (user + system) a process has used.
pub fn proc_cpu_secs(pid: u32, tick: f64) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / tick
}

/// Peak resident memory of a process (KiB), 0 if unreadable.
pub fn vm_hwm_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// Resident memory of a process now (KiB), 0 if unreadable.
pub fn vm_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
