//! Support for portx's end-to-end tests: the real agent binary, real processes and real sockets,
//! each test in its own network namespace (held by a `portx-agent workload park` process), as
//! root. Every guard kills and reaps what it started when dropped, also when a test panics.
//!
//! Environment: `PORTX_AGENT` (agent binary; default `target/debug/portx-agent` of this
//! workspace), `PORTX_HOOKS` (`--hooks` of the agent; default `auto`), `PORTX_STATE_HOOK`
//! (`--state-hook`; default `auto`).
use std::{
    collections::HashSet,
    io::{BufRead as _, BufReader, Read as _},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        mpsc::{self, Receiver, RecvTimeoutError},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use serde_json::Value;

/// How long any single wait may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Port range of a test namespace: 16 ports.
pub const RANGE: &str = "40000 40015";

pub fn agent_bin() -> PathBuf {
    let path = std::env::var_os("PORTX_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/portx-agent")
        });
    assert!(
        path.exists(),
        "agent binary {} not found: build it first (cargo build -p portx-agent) or set PORTX_AGENT",
        path.display()
    );
    path
}

pub fn hooks() -> String {
    std::env::var("PORTX_HOOKS").unwrap_or_else(|_| "auto".into())
}

pub fn state_hook() -> String {
    std::env::var("PORTX_STATE_HOOK").unwrap_or_else(|_| "auto".into())
}

/// Tests share the kernel's tracepoints and a 2-core machine: one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// True if root; otherwise prints why the test is skipped.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        println!("skipped: {test} needs root (eBPF, network namespaces)");
    }
    root
}

fn lines_of(out: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A workload process (`portx-agent workload ...`).
pub struct Workload {
    child: Child,
    lines: Receiver<String>,
    what: String,
}

impl Workload {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line it prints.
    pub fn line(&self) -> String {
        match self.lines.recv_timeout(TIMEOUT) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => panic!("{}: no output within {TIMEOUT:?}", self.what),
            Err(RecvTimeoutError::Disconnected) => panic!("{}: exited without output", self.what),
        }
    }

    /// The next line, which must start with `prefix`.
    pub fn expect(&self, prefix: &str) -> String {
        let l = self.line();
        assert!(
            l.starts_with(prefix),
            "{}: expected `{prefix}…`, got `{l}`",
            self.what
        );
        l
    }

    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(s) = self.child.try_wait().expect("waiting for a workload") {
                return s;
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.what);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn workload(args: &[&str]) -> Workload {
    let child = Command::new(agent_bin())
        .arg("workload")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting workload {args:?}: {e}"));
    let mut child = child;
    let lines = lines_of(child.stdout.take().expect("piped stdout"));
    Workload {
        child,
        lines,
        what: format!("workload {args:?}"),
    }
}

/// A private network namespace with a 16-port range, `tcp_tw_reuse=0` and `tcp_rfc1337=1`,
/// alive as long as this guard (its holder process is killed on drop; workloads are dropped
/// before it).
///
/// `tcp_rfc1337=1` keeps a TIME_WAIT socket for its 60 s when an RST arrives. With the default
/// (0) the RST ends it at once, and loopback can send one under CPU load: in ~1 of 20 runs of
/// `time_wait_churn_names_the_churner` under 3 busy loops, one of the 16 TIME_WAIT ports was
/// gone before the victim connected (and the victim got it), `TcpOutRsts` was 1, and the RST
/// came from the listener in ksoftirqd with reason TCP_FLAGS: an ACK reached it with no
/// connection left to take it. The segment counts (7 a connection, plus that RST) fit a
/// handshake's last ACK held on one CPU's backlog until the same connection's close, taken
/// first on the other CPU, had ended the server's socket.
pub struct Netns {
    /// Dropped (killed) before `park`: fields drop in declaration order.
    workloads: Vec<Workload>,
    /// Holds the namespace; killed on drop.
    _park: Workload,
    pub id: u32,
    pub path: String,
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Netns {
    pub fn new() -> Netns {
        Self::new_with(&[])
    }

    /// As [`Netns::new`], with `extra` sysctls set after its own.
    pub fn new_with(extra: &[&str]) -> Netns {
        let range = format!("net.ipv4.ip_local_port_range={RANGE}");
        let mut sysctls = vec![
            range.as_str(),
            "net.ipv4.tcp_tw_reuse=0",
            "net.ipv4.tcp_rfc1337=1",
        ];
        sysctls.extend_from_slice(extra);
        Self::with(&sysctls)
    }

    pub fn with(sysctls: &[&str]) -> Netns {
        let mut args = vec!["park"];
        for s in sysctls {
            args.extend(["--sysctl", s]);
        }
        let park = workload(&args);
        let line = park.expect("ready netns=");
        let id = line["ready netns=".len()..].parse().expect("netns id");
        let path = format!("/proc/{}/ns/net", park.pid());
        Netns {
            workloads: Vec::new(),
            _park: park,
            id,
            path,
        }
    }

    /// Starts a workload inside the namespace; `--name` sets its comm.
    pub fn spawn(&self, name: &str, args: &[&str]) -> Workload {
        let mut all = vec!["--netns", &self.path, "--name", name];
        all.extend_from_slice(args);
        workload(&all)
    }

    /// Starts a long-running workload owned by the namespace guard, waiting for its first line.
    pub fn keep(&mut self, name: &str, args: &[&str], ready: &str) -> (u32, String) {
        let w = self.spawn(name, args);
        let line = w.expect(ready);
        let pid = w.pid();
        self.workloads.push(w);
        (pid, line)
    }

    /// A process named `name` holding every port of the namespace's 16-port range to `dest`
    /// (kept until the namespace is dropped); its pid and its `held …` line.
    pub fn hog(&mut self, name: &str, dest: &str) -> (u32, String) {
        self.keep(
            name,
            &["hold", "--connect", dest, "--count", "16"],
            "held 16",
        )
    }

    /// One connect() to `dest` by a process named `name`, which must fail with EADDRNOTAVAIL
    /// (exit status 3); its pid.
    pub fn victim_fails(&self, name: &str, dest: &str) -> u32 {
        let mut victim = self.spawn(name, &["connect", "--connect", dest]);
        self.fails_eaddrnotavail(&mut victim, name);
        victim.pid()
    }

    /// `w`'s next line must be its connect() failing with EADDRNOTAVAIL, and its exit status 3.
    pub fn fails_eaddrnotavail(&self, w: &mut Workload, name: &str) {
        let line = w.line();
        assert!(
            line.starts_with("connect failed errno=99"),
            "{name}: expected `connect failed errno=99…`, got `{line}`; the namespace's sockets:\n{}",
            self.sockets()
        );
        assert_eq!(w.wait().code(), Some(3), "{name}'s exit status");
    }

    /// The namespace's IPv4 settings, its TCP sockets (`ss -tanoie`) and counters (`nstat -a`),
    /// for a failure's message.
    pub fn sockets(&self) -> String {
        match Command::new("nsenter")
            .arg(format!("--net={}", self.path))
            .args(["sh", "-c", "sysctl net.ipv4; ss -tanoie; nstat -a"])
            .output()
        {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("(nsenter ss: {e})"),
        }
    }

    /// `count` connections to `dest`, each closed with RST (no TIME_WAIT), by a process named
    /// `churner`; returns once all of them succeeded.
    pub fn churn_rst(&self, dest: &str, count: u32) {
        let count = count.to_string();
        let mut c = self.spawn(
            "churner",
            &["churn", "--connect", dest, "--count", &count, "--rst"],
        );
        c.expect(&format!("churned ok={count} failed=0"));
        assert!(c.wait().success(), "the churner's exit status");
    }

    /// A server that reads each connection to EOF and then closes (client-first close => the
    /// client side gets TIME_WAIT).
    pub fn serve(&mut self, listen: &[&str]) {
        let mut args = vec!["serve"];
        for l in listen {
            args.extend(["--listen", l]);
        }
        self.keep("server", &args, "ready");
    }
}

/// A process a test started itself (not through [`Agent`]), killed if the test ends first.
pub struct Started(pub Child);

impl Started {
    /// Its exit status, or None if it still runs after `limit`.
    pub fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.0.try_wait().expect("waiting for a process") {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent under test: `portx-agent trace --json --netns <id>`.
pub struct Agent {
    child: Option<Child>,
    records: Receiver<String>,
    seen: Vec<Value>,
    stderr: Arc<Mutex<String>>,
    pub hooks: String,
    /// Every program the agent attached, as `kind:target` (its `started` record).
    pub attached: Vec<String>,
}

impl Agent {
    pub fn start(netns: u32) -> Agent {
        Self::start_with(netns, &[])
    }

    pub fn start_with(netns: u32, extra: &[&str]) -> Agent {
        let mut args = vec!["--netns".to_string(), netns.to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(&args)
    }

    /// An agent that traces the namespaces `ids`, in that order (`--netns` each).
    pub fn start_netns(ids: &[u32]) -> Agent {
        let args: Vec<String> = ids
            .iter()
            .flat_map(|id| ["--netns".to_string(), id.to_string()])
            .collect();
        Self::spawn(&args)
    }

    /// An agent that traces every network namespace (no `--netns`).
    pub fn start_everywhere() -> Agent {
        Self::start_everywhere_with(&[])
    }

    /// An agent that traces every network namespace, with `extra` arguments.
    pub fn start_everywhere_with(extra: &[&str]) -> Agent {
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::spawn(&args)
    }

    fn spawn(args: &[String]) -> Agent {
        let mut child = Command::new(agent_bin())
            .args(["trace", "--json", "--interval", "1", "--hooks", &hooks()])
            .args(["--state-hook", &state_hook()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the agent");
        let records = lines_of(child.stdout.take().expect("piped stdout"));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        let mut agent = Agent {
            child: Some(child),
            records,
            seen: Vec::new(),
            stderr,
            hooks: String::new(),
            attached: Vec::new(),
        };
        let started = agent.wait_for("started", |v| v["type"] == "started");
        agent.hooks = started["hooks"].as_str().unwrap_or("?").to_string();
        agent.attached = started["attached"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect();
        // How the state change attached, in `--state-hook`'s spelling.
        let state = agent
            .attached
            .iter()
            .find_map(|a| a.strip_suffix(":inet_sock_set_state"))
            .map(|kind| kind.replace('_', "-"))
            .unwrap_or_else(|| "?".into());
        println!("portx-e2e: agent hooks={}/{state}", agent.hooks);
        agent
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// True once the agent's stderr contains `needle`, waiting up to 5 s: stderr is read by its
    /// own thread, so a line written just before a record on stdout may not be in yet.
    pub fn stderr_says(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if self.stderr().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the agent wrote on stderr after its byte `mark` ([`Agent::stderr`]'s length then),
    /// once it holds `needle` `n` times, waiting up to [`TIMEOUT`]: a fixed sleep and a count
    /// failed where the agent or its stderr reader was slow to get the CPU.
    pub fn stderr_since_with(&self, mark: usize, needle: &str, n: usize) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let said = self.stderr().get(mark..).unwrap_or_default().to_string();
            if said.matches(needle).count() >= n {
                return said;
            }
            assert!(
                Instant::now() < deadline,
                "`{needle}` not {n} times on the agent's stderr within {TIMEOUT:?}:\n{said}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn next(&mut self, deadline: Instant, what: &str) -> Value {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.records.recv_timeout(left) {
            Ok(line) => {
                let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                    panic!("agent stdout is not JSON Lines ({e}): {line}\nstderr:\n{}", self.stderr())
                });
                assert!(v["type"].is_string(), "record without type: {line}");
                v
            }
            Err(_) => panic!(
                "no `{what}` record from the agent within {TIMEOUT:?}; records so far: {:#?}\nagent stderr:\n{}",
                self.seen,
                self.stderr()
            ),
        }
    }

    /// The first record (seen before or arriving within the timeout) that matches `pred`.
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let v = self.next(deadline, what);
            self.seen.push(v.clone());
            if pred(&v) {
                return v;
            }
        }
    }

    /// Every record seen so far.
    pub fn seen(&self) -> &[Value] {
        &self.seen
    }

    /// Context for an assertion message: the last summary (counters: lost, missed, untracked)
    /// and the agent's stderr so far.
    pub fn context(&self) -> String {
        let last = self.seen.iter().rev().find(|v| v["type"] == "summary");
        format!(
            "last summary: {}\nagent stderr:\n{}",
            last.map_or("none".to_string(), |v| v.to_string()),
            self.stderr()
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends `signal`, waits for the exit, and returns the status with the remaining records.
    pub fn stop(mut self, signal: i32) -> (ExitStatus, Vec<Value>) {
        let mut child = self.child.take().expect("agent running");
        // SAFETY: kill with a pid we own.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().expect("waiting for the agent") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "agent ignored signal {signal} for 10 s\nstderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut rest: Vec<Value> = Vec::new();
        while let Ok(line) = self.records.recv_timeout(Duration::from_secs(2)) {
            rest.push(
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")),
            );
        }
        for s in rest.iter().filter(|v| v["type"] == "summary") {
            assert_eq!(
                s["gave_up"].as_u64(),
                Some(0),
                "a summary with program runs that gave up: {s}\nstderr:\n{}",
                self.stderr()
            );
        }
        (status, rest)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test: all the agent said, multi-line errors too (a verifier's log comes
            // in the lines after the one that names the program).
            println!("portx-e2e: agent stderr, all of it:\n{}", self.stderr());
        } else {
            // Corrections and losses the agent reported: shown in every run.
            for line in self.stderr().lines() {
                if line.contains("WARN") || line.contains("resync") {
                    println!("portx-e2e: agent said: {line}");
                }
            }
        }
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill with a pid we own.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if !std::thread::panicking() {
            self.assert_no_program_gave_up();
        }
    }
}

impl Agent {
    /// No run of portx's programs gave up (a read that failed, a note with no room): that
    /// happens only where something is wrong, so every test that runs the agent checks it, in
    /// every hook mode the VM matrix runs (its warning, and the final summary's `gave_up` where
    /// the test stopped the agent itself).
    fn assert_no_program_gave_up(&mut self) {
        // What the test did not read, up to the final summary (the agent has exited: the
        // channel ends once its stdout is drained).
        while let Ok(line) = self.records.recv_timeout(Duration::from_secs(2)) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                self.seen.push(v);
            }
        }
        let said = self.stderr();
        for s in self.seen.iter().filter(|v| v["type"] == "summary") {
            assert_eq!(
                s["gave_up"].as_u64(),
                Some(0),
                "a summary with program runs that gave up: {s}\nstderr:\n{said}"
            );
        }
        assert!(
            !said.contains("programs gave up"),
            "portx programs gave up:\n{said}"
        );
    }
}

/// Names of the portx programs as the kernel shows them (truncated to 15 characters).
pub const PROGRAMS: [&str; 4] = [
    "inet_sock_set_s",
    "sys_exit_connec",
    "sys_enter_bind",
    "sys_exit_bind",
];

/// IDs of loaded programs with portx's names, or None without bpftool.
pub fn portx_program_ids() -> Option<HashSet<u32>> {
    let out = Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(
        text.lines()
            .filter(|l| PROGRAMS.iter().any(|p| l.contains(&format!("name {p}"))))
            .filter_map(|l| l.split(':').next()?.trim().parse().ok())
            .collect(),
    )
}

/// The programs loaded since `before` (None without bpftool).
pub fn loaded_since(before: &Option<HashSet<u32>>) -> Option<HashSet<u32>> {
    match (before, portx_program_ids()) {
        (Some(b), Some(now)) => Some(now.difference(b).copied().collect()),
        _ => None,
    }
}

/// Waits until none of `mine` is loaded. The kernel frees programs asynchronously once their
/// last fd and link are gone.
pub fn assert_unloaded(mine: Option<HashSet<u32>>) {
    let Some(mine) = mine else {
        println!("skipped the bpftool check: bpftool is not installed");
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<u32> = portx_program_ids()
            .unwrap_or_default()
            .intersection(&mine)
            .copied()
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "programs {left:?} still loaded after exit"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
