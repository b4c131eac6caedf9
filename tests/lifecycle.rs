//! The agent's life: clean exit with a final summary on SIGINT/SIGTERM and nothing left
//! attached; a clear one-line error without privileges.
use std::{
    collections::HashSet,
    process::Command,
    time::{Duration, Instant},
};

use portx_e2e::{agent_bin, require_root, serial, Agent, Netns};

/// Names of the portx programs as the kernel shows them (truncated to 15 characters).
const PROGRAMS: [&str; 4] = [
    "inet_sock_set_s",
    "sys_exit_connec",
    "sys_enter_conne",
    "sys_exit_bind",
];

/// IDs of loaded programs with portx's names, or None without bpftool.
fn portx_program_ids() -> Option<HashSet<u32>> {
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
        let mine: Option<HashSet<u32>> = match (&before, portx_program_ids()) {
            (Some(b), Some(now)) => Some(now.difference(b).copied().collect()),
            _ => None,
        };
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
        match mine {
            Some(mine) => {
                // The kernel frees programs asynchronously once their last fd and link are gone.
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    let left: Vec<u32> = portx_program_ids()
                        .unwrap_or_default()
                        .intersection(&mine)
                        .copied()
                        .collect();
                    if left.is_empty() {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "programs {left:?} still loaded after exit"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            None => println!("skipped the bpftool check: bpftool is not installed"),
        }
    }
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
}
