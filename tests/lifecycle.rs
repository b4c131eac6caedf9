//! The agent's life: clean exit with a final summary on SIGINT/SIGTERM and nothing left
//! attached; after SIGKILL nothing left attached either, and a new agent picks up from the
//! kernel's own state; a clear one-line error without privileges; which hooks a mode attaches.
use std::{
    io::{BufRead as _, BufReader},
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
    time::Duration,
};

use portx_e2e::{
    agent_bin, assert_unloaded, hooks, loaded_since, portx_program_ids, require_root, serial,
    state_hook, Agent, Netns, Started,
};

#[test]
fn sigterm_and_sigint_end_cleanly_and_detach_everything() {
    let _g = serial();
    if !require_root("sigterm_and_sigint_end_cleanly_and_detach_everything") {
        return;
    }
    let ns = Netns::new();
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let before = portx_program_ids();
        let agent = Agent::start(ns.id);
        let pid = agent.pid();
        // The programs this agent loaded: present while it runs.
        let mine = loaded_since(&before);
        if let Some(m) = &mine {
            assert!(!m.is_empty(), "bpftool does not show the agent's programs");
        }
        let (status, rest) = agent.stop(signal);
        assert_eq!(status.code(), Some(0), "exit status after signal {signal}");
        assert!(
            rest.iter()
                .any(|v| v["type"] == "summary" && v["final"] == true),
            "no final summary after signal {signal}: {rest:?}"
        );
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
        assert_unloaded(mine);
    }
}

/// `portx-agent trace 2>&1 | head -1`: once the reader is gone, stdout and stderr are both
/// closed pipes. The agent ends as when stdout alone is closed, status 0 — not a panic (101)
/// from a log line it cannot write.
#[test]
fn a_closed_stdout_and_stderr_end_the_agent_cleanly() {
    let _g = serial();
    if !require_root("a_closed_stdout_and_stderr_end_the_agent_cleanly") {
        return;
    }
    let ns = Netns::new();
    let (reader, writer) = std::io::pipe().expect("pipe");
    let mut agent = Started(
        Command::new(agent_bin())
            .args(["trace", "--json", "--interval", "1", "--hooks", &hooks()])
            .args(["--state-hook", &state_hook(), "--netns", &ns.id.to_string()])
            .stdin(Stdio::null())
            .stdout(writer.try_clone().expect("pipe writer"))
            .stderr(writer)
            .spawn()
            .expect("starting the agent"),
    );
    let mut first = String::new();
    let mut lines = BufReader::new(reader);
    lines.read_line(&mut first).expect("the agent's first line");
    drop(lines);
    let status = agent
        .exit_within(Duration::from_secs(30))
        .unwrap_or_else(|| {
            panic!("the agent still runs 30 s after its output was closed ({first})")
        });
    assert_eq!(status.code(), Some(0), "first line: {first}");
}

/// `trace --json 2>&1 | shipper` with the shipper stuck: stderr is a full pipe nobody reads.
/// Log lines must not stop the agent: it still writes its records, heeds SIGTERM, and ends with
/// its final summary.
#[test]
fn a_stderr_nobody_reads_does_not_stop_the_agent() {
    let _g = serial();
    if !require_root("a_stderr_nobody_reads_does_not_stop_the_agent") {
        return;
    }
    let mut ns = Netns::new();
    ns.serve(&["127.0.0.1:9000"]);
    let (reader, writer) = std::io::pipe().expect("pipe");
    let fd = writer.as_raw_fd();
    // SAFETY: fcntl and write on a pipe this test owns; blocking again once full.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        let chunk = [b'x'; 4096];
        while libc::write(fd, chunk.as_ptr().cast(), chunk.len()) > 0 {}
        libc::fcntl(fd, libc::F_SETFL, flags);
    }
    let out = std::env::temp_dir().join(format!("portx-stuck-stderr-{}.jsonl", std::process::id()));
    let mut agent = Started(
        Command::new(agent_bin())
            // -v: debug lines from the start, each of which would block.
            .args([
                "trace",
                "--json",
                "-v",
                "--interval",
                "1",
                "--hooks",
                &hooks(),
            ])
            .args(["--state-hook", &state_hook(), "--netns", &ns.id.to_string()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("output file"))
            .stderr(writer)
            .spawn()
            .expect("starting the agent"),
    );
    let records = |what: &str| -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            if text.contains(what) {
                return text;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {what} within 30 s with stderr stuck: {text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    records("\"started\"");
    ns.churn_rst("127.0.0.1:9000", 50);
    records("\"summary\"");
    // SAFETY: a signal to the agent this test started.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    let status = agent
        .exit_within(Duration::from_secs(15))
        .expect("the agent still runs 15 s after SIGTERM with stderr stuck");
    assert_eq!(status.code(), Some(0));
    let text = records("\"final\":true");
    let _ = std::fs::remove_file(&out);
    drop(reader);
    assert!(
        text.contains("\"connect\"") || text.contains("\"events\""),
        "{text}"
    );
}

/// In a pid namespace of its own (a container without `--pid=host`), /proc does not show the
/// pids the records carry: the agent says so, and runs. In the host's it says nothing.
#[test]
fn outside_the_host_pid_namespace_it_warns() {
    let _g = serial();
    if !require_root("outside_the_host_pid_namespace_it_warns") {
        return;
    }
    let can = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !can {
        println!("skipped: no unshare that makes a pid namespace (util-linux)");
        return;
    }
    let ns = Netns::new();
    let run = |prefix: &[&str]| {
        let mut cmd = Command::new(prefix.first().copied().unwrap_or("env"));
        cmd.args(prefix.iter().skip(1))
            .arg(agent_bin())
            .args(["trace", "--json", "--duration", "1", "--hooks", &hooks()])
            .args(["--state-hook", &state_hook(), "--netns", &ns.id.to_string()]);
        let out = cmd.output().expect("running the agent");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let warning = "not in the host's pid namespace";
    let own = run(&["unshare", "--pid", "--fork", "--mount-proc"]);
    assert!(own.contains(warning), "{own}");
    let host = run(&[]);
    assert!(!host.contains(warning), "{host}");
}

/// In fentry mode connect()'s and bind()'s exits are fexit programs on the syscalls' bodies (a
/// trampoline call instead of a run through the perf tracepoint machinery on each call); in the
/// other modes they are the syscall tracepoints, at the exits only from Linux 5.15 on.
#[test]
fn fentry_mode_attaches_no_syscall_tracepoint() {
    let _g = serial();
    if !require_root("fentry_mode_attaches_no_syscall_tracepoint") {
        return;
    }
    let ns = Netns::new();
    let agent = Agent::start(ns.id);
    let attached = agent.attached.clone();
    let syscall_tracepoints: Vec<&String> = attached
        .iter()
        .filter(|a| a.starts_with("tracepoint:syscalls:"))
        .collect();
    if agent.hooks == "fentry" {
        for hook in [
            "fexit:inet_hash_connect",
            "fexit:__sys_connect",
            "fexit:__sys_bind",
        ] {
            assert!(attached.iter().any(|a| a == hook), "{hook}: {attached:?}");
        }
        assert!(syscall_tracepoints.is_empty(), "{attached:?}");
    } else {
        for event in ["sys_exit_connect", "sys_exit_bind"] {
            let hook = format!("tracepoint:syscalls:{event}");
            assert!(attached.contains(&hook), "{hook}: {attached:?}");
        }
        // bind()'s entry only where its exit cannot read the call's registers: a program
        // there sends every syscall on the machine through the tracing path's entry too.
        let entry = "tracepoint:syscalls:sys_enter_bind".to_string();
        assert_eq!(
            attached.contains(&entry),
            kernel_release() < (5, 15),
            "{attached:?}"
        );
        assert!(
            !attached.iter().any(|a| a.contains("__sys_")),
            "{attached:?}"
        );
    }
    let (status, _) = agent.stop(libc::SIGINT);
    assert!(status.success(), "{status:?}");
}

#[test]
fn after_sigkill_nothing_stays_loaded_and_a_new_agent_still_names_the_hog() {
    use std::os::unix::process::ExitStatusExt as _;
    let _g = serial();
    if !require_root("after_sigkill_nothing_stays_loaded_and_a_new_agent_still_names_the_hog") {
        return;
    }
    let mut ns = Netns::new();
    ns.serve(&["127.0.0.1:9000"]);
    let (hog, _) = ns.hog("hog", "127.0.0.1:9000");
    let before = portx_program_ids();
    let first = Agent::start(ns.id);
    let mine = loaded_since(&before);
    let (status, _) = first.stop(libc::SIGKILL);
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    // No exit handler ran: the kernel drops programs and links with the process's fds.
    assert_unloaded(mine);

    let mut second = Agent::start(ns.id);
    let started = second.wait_for("started", |v| v["type"] == "started");
    assert_eq!(started["seeded"], 16, "{started:#}");
    let victim = ns.victim_fails("victim", "127.0.0.1:9000");
    let report = second.wait_for("exhaustion", |v| {
        v["type"] == "exhaustion" && v["victim"]["pid"] == victim
    });
    assert_eq!(report["holders"][0]["pid"], hog, "{report:#}");
    assert_eq!(report["holders"][0]["ports"], 16, "{report:#}");
}

#[test]
fn without_privileges_it_says_what_is_missing() {
    let _g = serial();
    if !require_root("without_privileges_it_says_what_is_missing") {
        return;
    }
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new(agent_bin());
    cmd.args(["trace", "--json"]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("running the agent as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "stdout must stay empty: {:?}",
        out.stdout
    );
    assert!(stderr.contains("CAP_BPF"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

#[test]
fn invalid_flags_exit_with_status_2() {
    let out = Command::new(agent_bin())
        .args(["trace", "--interval", "0"])
        .output()
        .expect("running the agent");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--interval"));
    // More namespaces than the kernel-side filter holds.
    let many: Vec<String> = (1..=257)
        .flat_map(|i| ["--netns".into(), i.to_string()])
        .collect();
    let out = Command::new(agent_bin())
        .arg("trace")
        .args(&many)
        .output()
        .expect("running the agent");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("at most 256"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The running kernel's (major, minor).
fn kernel_release() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}
