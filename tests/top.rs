//! `portx-agent top` driven in a real terminal (tmux): it shows a full destination, its holder
//! and the failure; `q` and Ctrl-C quit with status 0, leave the alternate screen and detach
//! every program; SIGTERM does too; without a terminal it refuses clearly.
use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use portx_e2e::{
    agent_bin, assert_unloaded, hooks, loaded_since, portx_program_ids, require_root, serial,
    Netns, TIMEOUT,
};

const V4: &str = "127.0.0.1:9000";

/// A tmux server of its own (private socket) running one session; killed, and its socket
/// removed, on drop.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// None (and a line saying why) where tmux is not installed, e.g. the VM guests.
    fn start(test: &str, command: &str) -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().is_err() {
            println!("skipped: {test} drives the screen with tmux, which is not installed here");
            return None;
        }
        let t = Tmux {
            socket: std::env::temp_dir()
                .join(format!("portx-e2e-tmux-{}-{test}", std::process::id())),
        };
        // The shell stays after the agent exits, so its status and the restored screen can be
        // read.
        let wrapped = format!("{command}; echo \"top exited $?\"; sleep 600");
        t.run(&["new-session", "-d", "-x", "170", "-y", "45", &wrapped]);
        Some(t)
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running tmux");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p"])
    }

    fn alternate_screen(&self) -> bool {
        self.run(&["display-message", "-p", "#{alternate_on}"])
            .trim()
            == "1"
    }

    /// The agent: the only child of the pane's shell.
    fn agent_pid(&self) -> u32 {
        let shell = self.run(&["display-message", "-p", "#{pane_pid}"]);
        let out = Command::new("pgrep")
            .args(["-P", shell.trim()])
            .output()
            .expect("running pgrep");
        let text = String::from_utf8_lossy(&out.stdout);
        let pids: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        assert_eq!(pids.len(), 1, "children of the pane's shell: {text}");
        pids[0]
    }

    /// Waits until the screen satisfies `pred`; fails with the screen's text.
    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} on the screen within {TIMEOUT:?}:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        // Hangs up the pane: the shell and the agent (if still there) get SIGHUP.
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn top_command(netns: u32) -> String {
    format!(
        "{} top --hooks {} --netns {netns}",
        agent_bin().display(),
        hooks()
    )
}

/// Quits the screen with `keys` (or SIGTERM when None) and checks the aftermath.
fn quit_and_check(t: &Tmux, keys: Option<&str>, mine: Option<std::collections::HashSet<u32>>) {
    let pid = t.agent_pid();
    match keys {
        Some(k) => {
            t.run(&["send-keys", k]);
        }
        // SAFETY: kill with a pid the test read from its own tmux pane.
        None => assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0),
    }
    let screen = t.wait_for("exit status", |s| s.contains("top exited"));
    assert!(
        screen.contains("top exited 0"),
        "exit status after {keys:?}:\n{screen}"
    );
    assert!(!t.alternate_screen(), "still on the alternate screen");
    assert!(
        !screen.contains("destinations, most ports in use first"),
        "the screen was not restored:\n{screen}"
    );
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert_unloaded(mine);
}

#[test]
fn top_shows_the_full_destination_its_holder_and_the_failure_and_quits_on_q() {
    let _g = serial();
    let test = "top_shows_the_full_destination";
    if !require_root(test) {
        return;
    }
    let mut ns = Netns::new();
    ns.serve(&[V4]);
    let before = portx_program_ids();
    let Some(t) = Tmux::start(test, &top_command(ns.id)) else {
        return;
    };
    t.wait_for("screen", |s| s.contains("q quit"));
    assert!(
        t.alternate_screen(),
        "top does not use the alternate screen"
    );
    let mine = loaded_since(&before);

    // Every port of the 16-port range, then a connect() that cannot get one.
    let (hog, _) = ns.hog("hog", V4);
    ns.victim_fails("victim", V4);

    let hog_pid = format!("hog[{hog}] 16");
    let screen = t.wait_for("full destination with its holder and the failure", |s| {
        s.lines().any(|l| {
            l.contains("127.0.0.1 -> 127.0.0.1:9000")
                && l.contains("16/16")
                && l.contains("100%")
                && l.contains("FULL")
                && l.contains(&hog_pid)
        }) && s.contains("EADDRNOTAVAIL 1 ")
    });
    // The process row, found by PID and COMM: its COMMAND column is cut at the screen's edge,
    // and where depends on how long the checkout's path is.
    let pid = hog.to_string();
    let process = screen
        .lines()
        .map(|l| l.trim_matches(|c: char| c == '│' || c.is_whitespace()))
        .find(|l| l.split_whitespace().take(2).eq([pid.as_str(), "hog"]))
        .unwrap_or_else(|| panic!("no process row for hog[{hog}]:\n{screen}"));
    let cols: Vec<&str> = process.split_whitespace().collect();
    assert_eq!(cols[2..5], ["16", "0", "1"], "PORTS TW DESTS of {process}");
    // COMMAND: the hog's own command line, as far as it fits.
    let cmdline = std::fs::read(format!("/proc/{hog}/cmdline")).expect("the hog's cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    let cmdline = cmdline.trim_end();
    let shown = cmdline
        .get(..24)
        .and_then(|head| process.find(head))
        .map(|at| &process[at..])
        .unwrap_or_else(|| panic!("no command line {cmdline:?} in {process}"));
    assert!(
        cmdline.starts_with(shown),
        "COMMAND {shown:?} is not the hog's {cmdline:?}"
    );
    assert!(
        screen.contains("failures by container or cgroup"),
        "{screen}"
    );

    quit_and_check(&t, Some("q"), mine);
    // What was logged while the screen was up is on the terminal now.
    let after = t.screen();
    assert!(after.contains("tracing with"), "{after}");
}

#[test]
fn top_quits_on_ctrl_c_and_on_sigterm_restoring_the_terminal() {
    let _g = serial();
    let test = "top_quits_on_ctrl_c_and_on_sigterm";
    if !require_root(test) {
        return;
    }
    let ns = Netns::new();
    for keys in [Some("C-c"), None] {
        let before = portx_program_ids();
        let Some(t) = Tmux::start(test, &top_command(ns.id)) else {
            return;
        };
        t.wait_for("screen", |s| s.contains("q quit"));
        let mine = loaded_since(&before);
        if let Some(m) = &mine {
            assert!(!m.is_empty(), "bpftool does not show the agent's programs");
        }
        quit_and_check(&t, keys, mine);
    }
}

#[test]
fn top_without_a_terminal_refuses_and_loads_nothing() {
    let _g = serial();
    let before = portx_program_ids();
    let out = Command::new(agent_bin())
        .args(["top"])
        .stdin(Stdio::null())
        .output()
        .expect("running the agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("top draws on a terminal") && stderr.contains("portx-agent trace"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    if let (Some(b), Some(now)) = (before, portx_program_ids()) {
        assert!(
            now.is_subset(&b),
            "programs were loaded: {:?}",
            now.difference(&b)
        );
    }
}
