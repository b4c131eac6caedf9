//! Processes and a private network namespace on the host, for `bench` and `soak`.
use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
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

/// A process's CPU time, from a cgroup (v2) of its own where the bench can make one: `cpu.stat`'s
/// `usage_usec` counts every thread's, those that ended too, to the microsecond. Else from
/// `/proc/<pid>/stat` in clock ticks (10 ms here: an agent's CPU in a 3 s storm was a few ticks,
/// so a storm's figure could be off by a third). The process is moved in once it runs, so its
/// start-up is not counted; the cgroup goes when this is dropped, after the process has ended.
pub struct CpuMeter {
    pid: u32,
    tick: f64,
    cgroup: Option<PathBuf>,
}

impl CpuMeter {
    pub fn of(pid: u32, tick: f64) -> CpuMeter {
        static MADE: AtomicU32 = AtomicU32::new(0);
        let cgroup = cgroup2_root().and_then(|root| {
            let n = MADE.fetch_add(1, Ordering::Relaxed);
            let dir = root.join(format!("portx-bench-{}-{n}", std::process::id()));
            fs::create_dir(&dir).ok()?;
            if fs::write(dir.join("cgroup.procs"), pid.to_string()).is_err()
                || read_usage_usec(&dir).is_none()
            {
                let _ = fs::remove_dir(&dir);
                return None;
            }
            Some(dir)
        });
        CpuMeter { pid, tick, cgroup }
    }

    /// CPU seconds used so far (since it was moved into the cgroup, with one).
    pub fn secs(&self) -> f64 {
        match &self.cgroup {
            Some(dir) => read_usage_usec(dir).map_or(0.0, |us| us as f64 / 1e6),
            None => proc_cpu_secs(self.pid, self.tick),
        }
    }

    /// How [`CpuMeter::secs`] reads.
    pub fn clock(&self) -> &'static str {
        if self.cgroup.is_some() {
            "cgroup v2 cpu.stat usage_usec"
        } else {
            "/proc/<pid>/stat clock ticks"
        }
    }
}

impl Drop for CpuMeter {
    fn drop(&mut self) {
        if let Some(dir) = &self.cgroup {
            // Empty once the process has been reaped; a moment later if its exit is not done.
            for _ in 0..50 {
                if fs::remove_dir(dir).is_ok() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("bench: could not remove {}", dir.display());
        }
    }
}

/// Removes the cgroups [`CpuMeter`] made for a bench that no longer runs (killed before its
/// drops ran; its processes died with it, so they are empty).
pub fn remove_stale_cgroups() {
    let Some(root) = cgroup2_root() else {
        return;
    };
    let Ok(dir) = fs::read_dir(&root) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("portx-bench-"))
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir(e.path());
        }
    }
}

/// Where cgroup v2 is mounted (the unified hierarchy), if it is.
fn cgroup2_root() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    })
}

fn read_usage_usec(dir: &Path) -> Option<u64> {
    fs::read_to_string(dir.join("cpu.stat"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())
}

/// CPU seconds (user + system) a process has used.
fn proc_cpu_secs(pid: u32, tick: f64) -> f64 {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A busy process metered for about half a second: the meter reads about that, from its
    /// cgroup where one can be made (root, cgroup v2), and the cgroup is gone afterwards.
    #[test]
    fn a_busy_process_is_metered_and_its_cgroup_removed() {
        let child = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .expect("spawning sh");
        let mut p = Proc(child);
        let meter = CpuMeter::of(p.pid(), 100.0);
        let dir = meter.cgroup.clone();
        let clock = meter.clock();
        let t0 = std::time::Instant::now();
        let before = meter.secs();
        std::thread::sleep(Duration::from_millis(500));
        let used = meter.secs() - before;
        let wall = t0.elapsed().as_secs_f64();
        // Stopped before any assertion, so that a failing one leaves no busy process in the
        // cgroup (which could not be removed then).
        p.interrupt();
        drop(meter);
        // One CPU for the time measured (a sleep may overshoot on a busy machine; /proc ticks
        // are 10 ms), less what the machine's other work took of it.
        assert!(
            used >= 0.2 && used <= wall + 0.02,
            "{used} s in {wall} s by {clock}"
        );
        match dir {
            Some(dir) => assert!(!dir.exists(), "{} left behind", dir.display()),
            // SAFETY: geteuid has no preconditions.
            None if unsafe { libc::geteuid() } == 0 && cgroup2_root().is_some() => {
                panic!("root with cgroup v2 mounted, and no cgroup made")
            }
            None => eprintln!("no cgroup v2 here: metered from /proc ticks"),
        }
    }
}
