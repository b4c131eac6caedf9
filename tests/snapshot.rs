//! `portx-agent snapshot`: the table from sock_diag and /proc, without eBPF — also where loading
//! eBPF is not allowed at all.
use std::process::Command;

use portx_e2e::{agent_bin, require_root, serial, Agent, Netns};
use serde_json::Value;

const V4: &str = "127.0.0.1:9000";

fn snapshot(prefix: &[&str], netns: u32) -> (Value, String) {
    let bin = agent_bin();
    let mut cmd = Command::new(
        prefix
            .first()
            .copied()
            .unwrap_or(bin.to_str().expect("utf-8 path")),
    );
    if !prefix.is_empty() {
        cmd.args(&prefix[1..]).arg(&bin);
    }
    let out = cmd
        .args(["snapshot", "--json", "--netns", &netns.to_string()])
        .output()
        .expect("running the agent");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "snapshot failed: {stderr}");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON object: {text}");
    let v: Value = serde_json::from_str(lines[0]).expect("JSON");
    (v, stderr)
}

fn hog_row(v: &Value) -> &Value {
    v["destinations"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["dport"] == 9000))
        .unwrap_or_else(|| panic!("no row for :9000 in {v:#}"))
}

#[test]
fn snapshot_names_the_hog_without_ebpf() {
    let _g = serial();
    if !require_root("snapshot_names_the_hog_without_ebpf") {
        return;
    }
    let mut ns = Netns::new();
    ns.serve(&[V4]);
    let (hog, _) = ns.keep(
        "hog",
        &["hold", "--connect", V4, "--count", "12"],
        "held 12",
    );
    let (v, _) = snapshot(&[], ns.id);
    assert_eq!(v["type"], "snapshot");
    assert_eq!(v["namespaces"], 1, "{v:#}");
    let row = hog_row(&v);
    assert_eq!(row["in_use"], 12, "{v:#}");
    assert_eq!(row["range"], 16, "{v:#}");
    assert_eq!(row["by_state"]["ESTABLISHED"], 12, "{v:#}");
    assert_eq!(row["top_holder"]["pid"], hog, "{v:#}");
    assert_eq!(row["top_holder"]["comm"], "hog", "{v:#}");
}

#[test]
fn snapshot_works_where_trace_is_refused() {
    let _g = serial();
    if !require_root("snapshot_works_where_trace_is_refused") {
        return;
    }
    // util-linux's setpriv; busybox's (in the VM guests) cannot drop from the bounding set.
    let can_drop = Command::new("setpriv")
        .args(["--inh-caps=-bpf", "--bounding-set=-bpf", "--", "true"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !can_drop {
        println!("skipped: no setpriv that can drop capabilities (util-linux)");
        return;
    }
    let mut ns = Netns::new();
    ns.serve(&[V4]);
    ns.keep("hog", &["hold", "--connect", V4, "--count", "5"], "held 5");
    // Inside the namespace, without CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN.
    let drop = "-bpf,-perfmon,-sys_admin";
    let bounding = format!("--bounding-set={drop}");
    let inherit = format!("--inh-caps={drop}");
    let net = format!("--net={}", ns.path);
    let prefix = ["nsenter", &net, "setpriv", &inherit, &bounding, "--"];
    let refused = Command::new(prefix[0])
        .args(&prefix[1..])
        .arg(agent_bin())
        .args(["trace", "--duration", "1"])
        .output()
        .expect("running the agent");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("CAP_BPF"),
        "trace must be refused without the capabilities: {err}"
    );
    let (v, stderr) = snapshot(&prefix, ns.id);
    let row = hog_row(&v);
    assert_eq!(row["in_use"], 5, "{v:#}\n{stderr}");
    assert_eq!(row["top_holder"]["comm"], "hog", "{v:#}\n{stderr}");
    assert!(!stderr.contains("CAP_SYS_PTRACE"), "{stderr}");

    // Without CAP_SYS_PTRACE too, the hog's descriptors (a process with every capability) are
    // refused: its live ports have no owner, and stderr says why rather than let pid 0 pass
    // for TIME_WAIT.
    let drop = "-bpf,-perfmon,-sys_admin,-sys_ptrace";
    let bounding = format!("--bounding-set={drop}");
    let inherit = format!("--inh-caps={drop}");
    let prefix = ["nsenter", &net, "setpriv", &inherit, &bounding, "--"];
    let (v, stderr) = snapshot(&prefix, ns.id);
    let row = hog_row(&v);
    assert_eq!(row["in_use"], 5, "{v:#}\n{stderr}");
    assert_eq!(row["top_holder"]["pid"], 0, "{v:#}\n{stderr}");
    assert!(
        stderr.contains("permission denied") && stderr.contains("CAP_SYS_PTRACE"),
        "{stderr}"
    );
}

#[test]
fn doctor_reads_the_namespace_settings_and_advises_on_evidence() {
    let _g = serial();
    if !require_root("doctor_reads_the_namespace_settings_and_advises_on_evidence") {
        return;
    }
    let mut ns = Netns::new();
    ns.serve(&[V4]);
    let mut churner = ns.spawn("churner", &["churn", "--connect", V4, "--count", "16"]);
    churner.expect("churned ok=16 failed=0");
    churner.wait();
    let out = Command::new(agent_bin())
        .args(["doctor", "--json", "--netns", &ns.id.to_string()])
        .output()
        .expect("running the agent");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(text.lines().next().expect("one line")).expect("JSON");
    assert_eq!(v["type"], "doctor", "{v:#}");
    assert_eq!(v["netns"], ns.id, "{v:#}");
    assert_eq!(v["port_range"], serde_json::json!([40000, 40015]), "{v:#}");
    assert_eq!(v["usable"], 16, "{v:#}");
    assert_eq!(v["tw_reuse"], 0, "{v:#}");
    let d = &v["destinations"][0];
    assert_eq!(d["dport"], 9000, "{v:#}");
    assert!(d["by_state"]["TIME_WAIT"].as_u64() >= Some(12), "{v:#}");
    let explain = d["explain"].to_string();
    assert!(explain.contains("net.ipv4.tcp_tw_reuse=1"), "{v:#}");
    assert!(explain.contains("ip_local_port_range"), "{v:#}");
}

/// A client that closes first while its peer never closes ends as a timewait socket in
/// substate FIN_WAIT2, which sock_diag reports as FIN_WAIT2 with a timewait timer: it holds its
/// port until that timer fires, as TIME_WAIT does. A snapshot counts it as TIME_WAIT, and so
/// does the agent's table, from its records and through every resync.
#[test]
fn orphans_in_fin_wait2_hold_their_ports_as_time_wait() {
    let _g = serial();
    if !require_root("orphans_in_fin_wait2_hold_their_ports_as_time_wait") {
        return;
    }
    let mut ns = Netns::new();
    // Never accepts: the 8 connections wait in the accept queue, and their server sockets never
    // close.
    ns.keep(
        "server",
        &["serve", "--listen", V4, "--no-accept", "--backlog", "16"],
        "ready",
    );
    let mut agent = Agent::start_with(ns.id, &["-v", "--resync", "1"]);
    agent.wait_for("started", |v| v["type"] == "started");
    let mut churner = ns.spawn("churner", &["half-close", "--connect", V4, "--count", "8"]);
    churner.expect("half-closed ok=8 failed=0");
    churner.wait();
    // Once the peers' ACKs of the FINs are in (at once on loopback), the kernel holds 8
    // timewait sockets in substate FIN_WAIT2 (`ss` shows FIN-WAIT-2 and a timewait timer).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let v = loop {
        let (v, _) = snapshot(&[], ns.id);
        let settled = v["destinations"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["dport"] == 9000))
            .is_some_and(|d| d["in_use"] == 8 && d["by_state"].get("FIN_WAIT1").is_none());
        if settled {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "{v:#}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let row = hog_row(&v);
    assert_eq!(
        row["by_state"],
        serde_json::json!({"TIME_WAIT": 8}),
        "{v:#}"
    );
    assert_eq!(row["top_holder"]["time_wait"], 8, "{v:#}");

    let in_time_wait = |v: &Value| {
        v["type"] == "summary"
            && v["destinations"].as_array().is_some_and(|d| {
                d.iter().any(|d| {
                    d["dport"] == 9000 && d["by_state"] == serde_json::json!({"TIME_WAIT": 8})
                })
            })
    };
    agent.wait_for("a summary with 8 ports in TIME_WAIT", in_time_wait);
    let mark = agent.stderr().len();
    // Two resyncs at least (--resync 1), each of which dumps the 8 orphans as FIN_WAIT2.
    let said = agent.stderr_since_with(mark, "sock_diag pass", 2);
    assert!(
        !said.contains("sock_diag resync:"),
        "a resync changed the table:\n{said}"
    );
    let (_, records) = agent.stop(libc::SIGINT);
    let last = records
        .iter()
        .rev()
        .find(|v| v["type"] == "summary")
        .expect("a final summary");
    assert!(in_time_wait(last), "{last:#}");
}
