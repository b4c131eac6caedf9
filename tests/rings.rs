//! One socket's records in two ring buffers: each CPU writes to its own ring, so a connection
//! made on one CPU and closed on another has its connect in one ring and its close in the other.
//! The agent must merge the rings in time order, or it would see closes before their connects
//! (and keep those sockets as live forever).
use portx_e2e::{require_root, serial, Agent, Netns};

const V4: &str = "127.0.0.1:9000";

#[test]
fn a_socket_connected_on_one_cpu_and_closed_on_another_is_tracked_in_order() {
    let _g = serial();
    if !require_root("a_socket_connected_on_one_cpu_and_closed_on_another_is_tracked_in_order") {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        // One CPU writes one ring: there is nothing to merge (the VM rows run with one CPU;
        // the host row runs this).
        eprintln!("skipped: one CPU, so one ring buffer");
        return;
    }
    let mut ns = Netns::with(&[
        "net.ipv4.ip_local_port_range=40000 40999",
        "net.ipv4.tcp_tw_reuse=0",
    ]);
    ns.serve(&[V4]);
    let mut agent = Agent::start(ns.id);
    // The connects on the last CPU (the last ring), the closes from the first (ring 0, which
    // the agent reads first): merged by ring, every close would come before its connect.
    let mut churner = ns.spawn(
        "churner",
        &["churn", "--connect", V4, "--count", "300", "--cross-cpu"],
    );
    churner.expect("churned ok=300 failed=0");
    assert!(churner.wait().success());
    // Every socket ends in TIME_WAIT (the server closes after reading EOF), none left live.
    let summary = agent.wait_for("summary with 300 ports, all in TIME_WAIT", |v| {
        v["type"] == "summary"
            && v["destinations"].as_array().is_some_and(|d| {
                d.iter().any(|d| {
                    d["dport"] == 9000
                        && d["in_use"] == 300
                        && d["by_state"].as_object().is_some_and(|s| {
                            s.len() == 1 && s.get("TIME_WAIT") == Some(&300.into())
                        })
                })
            })
    });
    let ctx = format!("{summary:#}\n{}", agent.context());
    assert_eq!(summary["lost"], 0, "{ctx}");
    let (_, rest) = agent.stop(libc::SIGINT);
    let last = rest
        .iter()
        .rev()
        .find(|v| v["type"] == "summary" && v["final"] == true)
        .unwrap_or_else(|| panic!("no final summary: {rest:?}"));
    assert_eq!(last["pending"], 0, "{last:#}");
}
