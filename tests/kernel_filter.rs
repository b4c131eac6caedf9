//! What the kernel side leaves out. `--netns`: no record for a namespace that is not traced (so
//! it costs no ring-buffer space and its loss is not counted), every record for the ones that
//! are. And the accepted side of a connection: it holds the listener's port, not an ephemeral
//! one. And what it remembers: each namespace's inode, by the namespace's cookie.
use std::time::{SystemTime, UNIX_EPOCH};

use portx_e2e::{require_root, serial, Agent, Netns};
use serde_json::Value;

const V4: &str = "127.0.0.1:9000";
const COUNT: u32 = 200;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A summary made from rings drained after `since_ns`: the second summary after it. Each
/// summary follows a drain of the rings, but the first one after `since_ns` may follow a drain
/// that began before it (in a one-CPU guest the workload can run in the middle of the drain, and
/// 6 of 400 records were left for the next one).
fn summary_after(agent: &mut Agent, since_ns: u64) -> Value {
    let first = next_summary(agent, since_ns);
    next_summary(agent, first["ts"].as_u64().unwrap_or(since_ns))
}

fn next_summary(agent: &mut Agent, since_ns: u64) -> Value {
    agent.wait_for("summary", |v: &Value| {
        v["type"] == "summary" && v["ts"].as_u64().unwrap_or(0) > since_ns
    })
}

fn count(summary: &Value, key: &str) -> u64 {
    summary[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} count in {summary}"))
}

/// Records the agent has read (`events`) by its first summary after `since_ns`.
fn events_after(agent: &mut Agent, since_ns: u64) -> u64 {
    count(&summary_after(agent, since_ns), "events")
}

/// Churns in a namespace not traced, then in the traced one, with an agent started with
/// `--netns` for each of `before`, then the traced one, then each of `after`.
fn only_the_traced_namespace_is_written(test: &str, before: &[u32], after: &[u32]) {
    let _g = serial();
    if !require_root(test) {
        return;
    }
    let mut traced = Netns::new();
    traced.serve(&[V4]);
    let mut other = Netns::new();
    other.serve(&[V4]);
    let ids: Vec<u32> = before
        .iter()
        .chain(&[traced.id])
        .chain(after)
        .copied()
        .collect();
    let mut agent = Agent::start_netns(&ids);

    other.churn_rst(V4, COUNT);
    let untraced = events_after(&mut agent, now_ns());
    assert_eq!(
        untraced,
        0,
        "{COUNT} connections in a namespace not traced were written\n{}",
        agent.context()
    );

    traced.churn_rst(V4, COUNT);
    let read = events_after(&mut agent, now_ns());
    // At least two records a connection in every hook mode (the record that opens it, with its
    // port where the first record waits for it, and its close).
    assert!(
        read >= 2 * u64::from(COUNT),
        "{read} records for {COUNT} connections in the traced namespace\n{}",
        agent.context()
    );
    let (status, _) = agent.stop(libc::SIGINT);
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_namespace_not_traced_is_not_written() {
    only_the_traced_namespace_is_written("a_namespace_not_traced_is_not_written", &[], &[]);
}

// (Inode numbers no namespace has: the agent traces them, there is just nothing in them.)

#[test]
fn a_namespace_not_traced_is_not_written_with_a_few_traced() {
    // As many as the kernel compares inline (NETNS_FILTER_INLINE), the traced one last.
    only_the_traced_namespace_is_written(
        "a_namespace_not_traced_is_not_written_with_a_few_traced",
        &[1, 2, 3],
        &[],
    );
}

#[test]
fn a_namespace_not_traced_is_not_written_with_several_traced() {
    // One more than the kernel compares inline: it looks them up in its map.
    only_the_traced_namespace_is_written(
        "a_namespace_not_traced_is_not_written_with_several_traced",
        &[],
        &[1, 2, 3, 4],
    );
}

/// `--netns` given as a namespace file traces that namespace; an inode nothing holds is warned
/// about on stderr, not silently traced.
#[test]
fn a_namespace_named_by_its_file_is_traced_and_an_unknown_inode_warned_about() {
    let test = "a_namespace_named_by_its_file_is_traced_and_an_unknown_inode_warned_about";
    let _g = serial();
    if !require_root(test) {
        return;
    }
    let mut ns = Netns::new();
    ns.serve(&[V4]);
    let mut agent = Agent::start_everywhere_with(&["--netns", &ns.path, "--netns", "1"]);
    ns.churn_rst(V4, COUNT);
    let read = events_after(&mut agent, now_ns());
    assert!(
        read >= 2 * u64::from(COUNT),
        "{read} records for {COUNT} connections in the namespace given as {}\n{}",
        ns.path,
        agent.context()
    );
    assert!(
        agent.stderr_says("--netns 1: no process, thread or mount holds"),
        "no warning about --netns 1\n{}",
        agent.context()
    );
    assert!(
        !agent.stderr_says(&format!("--netns {}:", ns.id)),
        "the namespace given by its file was warned about\n{}",
        agent.context()
    );
    let (status, _) = agent.stop(libc::SIGINT);
    assert!(status.success(), "{status:?}");
}

#[test]
fn the_accepted_side_of_a_connection_is_not_written() {
    let _g = serial();
    if !require_root("the_accepted_side_of_a_connection_is_not_written") {
        return;
    }
    let mut ns = Netns::new();
    ns.serve(&[V4]);
    let mut agent = Agent::start(ns.id);
    ns.churn_rst(V4, COUNT);
    let s = summary_after(&mut agent, now_ns());
    // The server's socket of each connection closes too (ESTABLISHED->CLOSE on the RST): had
    // it been written, the tracker would have counted it as a socket it does not track.
    assert_eq!(count(&s, "untracked"), 0, "{s}\n{}", agent.context());
    assert!(
        count(&s, "events") >= 2 * u64::from(COUNT),
        "{s}\n{}",
        agent.context()
    );
    let (status, _) = agent.stop(libc::SIGINT);
    assert!(status.success(), "{status:?}");
}

/// The kernel programs remember each namespace's inode by the namespace's cookie. Namespaces
/// made and freed one after another (a new one may take a freed one's memory, with another
/// inode) and two alive at once must each be named by their own inode: a hog's 16 ports in each
/// are counted under that namespace and no other.
#[test]
fn records_name_their_own_namespace_while_namespaces_come_and_go() {
    let _g = serial();
    if !require_root("records_name_their_own_namespace_while_namespaces_come_and_go") {
        return;
    }
    // No periodic resync during the test: it could repair a misnamed socket from sock_diag and
    // hide the kernel side's mistake.
    let mut agent = Agent::start_everywhere_with(&["--resync", "3600"]);
    for round in 0..6 {
        // Every other round a namespace with no sockets is made first: it takes the lowest free
        // inode, so that the pair's namespaces, which may get memory the last round's had, get
        // other inodes than those had (seen with bpftrace: one `struct net` address, two
        // inodes).
        let _spacer = (round % 2 == 1).then(Netns::new);
        let mut pair = [Netns::new(), Netns::new()];
        let mut hogs = Vec::new();
        for ns in &mut pair {
            ns.serve(&[V4]);
            hogs.push(ns.hog("hog", V4).0);
        }
        for (ns, hog) in pair.iter().zip(&hogs) {
            let since = now_ns();
            let what = format!(
                "round {round}: 16 ports of namespace {} held by {hog}",
                ns.id
            );
            let summary = agent.wait_for(&what, |v| {
                v["type"] == "summary"
                    && v["ts"].as_u64().unwrap_or(0) > since
                    && v["destinations"].as_array().is_some_and(|d| {
                        d.iter().any(|d| {
                            d["netns"] == ns.id
                                && d["dport"] == 9000
                                && d["in_use"] == 16
                                && d["top_holder"]["pid"] == *hog
                        })
                    })
            });
            // Nothing of this namespace's counted under an inode that is not a live one.
            let ids: Vec<u32> = pair.iter().map(|n| n.id).collect();
            let strays: Vec<&Value> = summary["destinations"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| {
                    d["top_holder"]["pid"]
                        .as_u64()
                        .is_some_and(|p| hogs.contains(&(p as u32)))
                        && !ids.iter().any(|id| d["netns"] == *id)
                })
                .collect();
            assert!(
                strays.is_empty(),
                "round {round}: {strays:#?}\n{}",
                agent.context()
            );
        }
        // Freed in one order, then the other: a new namespace gets the lowest free inode, and
        // memory in whatever order the kernel's deferred frees left it, so that one order or the
        // other may pair a freed namespace's memory with another one's inode.
        let [a, b] = pair;
        if round % 2 == 0 {
            drop(a);
            drop(b);
        } else {
            drop(b);
            drop(a);
        }
        // (Namespaces are freed by a kernel worker, after their processes are gone.)
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let (status, _) = agent.stop(libc::SIGINT);
    assert!(status.success(), "{status:?}");
}
