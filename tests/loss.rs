//! Loss is never silent: when the ring buffer is full, every record the kernel could not write is
//! counted, and the agent reports the count; at `--max-sockets`, what the tracker drops is
//! counted and reported too.
use portx_e2e::{require_root, serial, Agent, Netns};
use serde_json::Value;

const V4: &str = "127.0.0.1:9000";

fn field(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// A summary newer than `after_ts` that satisfies `pred`.
fn summary(agent: &mut Agent, after_ts: u64, pred: impl Fn(&Value) -> bool) -> Value {
    agent.wait_for("summary", |v| {
        v["type"] == "summary" && field(v, "ts") > after_ts && pred(v)
    })
}

fn churn(ns: &Netns, count: u32) {
    ns.churn_rst(V4, count);
}

#[test]
fn state_records_wake_the_agent_before_the_ring_fills() {
    let _g = serial();
    if !require_root("state_records_wake_the_agent_before_the_ring_fills") {
        return;
    }
    // On one CPU the churner and the server it talks to can keep the woken agent off the CPU for
    // longer than the ring lasts (seen in single-CPU TCG guests: 77 and 2998 of 12000 lost in 2
    // of 15 boots); what this checks — that the kernel side wakes the agent at all — needs a CPU
    // for the agent to run on.
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        println!("skipped: state_records_wake_the_agent_before_the_ring_fills needs 2 CPUs");
        return;
    }
    let mut ns = Netns::new();
    ns.serve(&[V4]);
    // 64 KiB hold ~580 records; the connections below make 10 to 15 times that (two or three
    // records a connection, by hook mode) within a second or two, in which the summaries (each drains the ring) come once a second. Only the wake-ups
    // the kernel side sends after each CPU's share of an eighth of the ring keep anything from
    // being lost.
    let agent = Agent::start_with(ns.id, &["--ring-buffer-kib", "64"]);
    const COUNT: u64 = 3000;
    churn(&ns, COUNT as u32);
    let (status, rest) = agent.stop(libc::SIGINT);
    assert!(status.success(), "{status:?}");
    let last = rest
        .iter()
        .rev()
        .find(|v| v["type"] == "summary")
        .unwrap_or_else(|| panic!("no final summary in {rest:?}"));
    let (events, lost) = (field(last, "events"), field(last, "lost"));
    println!("{COUNT} connections: read {events}, lost {lost}");
    assert_eq!(lost, 0, "{last}");
    assert!(events >= 2 * COUNT, "{last}");
}

#[test]
fn a_full_ring_buffer_is_counted_record_for_record() {
    let _g = serial();
    if !require_root("a_full_ring_buffer_is_counted_record_for_record") {
        return;
    }
    let mut ns = Netns::new();
    ns.serve(&[V4]);
    // One page: room for a few dozen records.
    let mut agent = Agent::start_with(ns.id, &["--ring-buffer-kib", "4"]);

    // How many records one RST connection makes with this kernel and hook mode: a few
    // connections, which fit in the ring, read until the count stops moving.
    const CALIBRATE: u64 = 4;
    churn(&ns, CALIBRATE as u32);
    let mut last = summary(&mut agent, 0, |_| true);
    loop {
        let next = summary(&mut agent, field(&last, "ts"), |_| true);
        if field(&next, "events") == field(&last, "events") && field(&next, "events") > 0 {
            break;
        }
        last = next;
    }
    assert_eq!(field(&last, "lost"), 0, "{}", agent.context());
    // In tracepoint mode a connection whose handshake the connecting thread does not finish
    // itself (the SYN-ACK handled in another CPU's softirq or by ksoftirqd: 7 of 1000 on the
    // 6.18 host, 1 of 4 once in a 6.1 TCG guest) makes one record more: the one opening it at
    // connect()'s exit. Every other connection, and every one in the other modes, makes the
    // same number.
    let late = u64::from(agent.hooks == "tracepoint");
    let per_conn = field(&last, "events") / CALIBRATE;
    let extra = field(&last, "events") - per_conn * CALIBRATE;
    assert!(
        extra == 0 || late == 1,
        "records are not a whole number per connection: {}",
        agent.context()
    );
    assert!(per_conn >= 2, "{}", agent.context());

    // Stop the agent, so that nothing reads the ring, and make far more records than it holds.
    const MANY: u64 = 300;
    // SAFETY: signals to the agent we started.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGSTOP) };
    churn(&ns, MANY as u32);
    unsafe { libc::kill(agent.pid() as i32, libc::SIGCONT) };

    // Records the agent read + records counted lost = records the kernel wrote. How many it
    // wrote is known to within a little slack (and, in tracepoint mode, a record a connection
    // more); runs the kernel skipped (`missed`) write nothing.
    let expected = per_conn * (CALIBRATE + MANY);
    let slack = 8 + expected / 50;
    // At most this many more, where connections can open late.
    let most = expected + late * (CALIBRATE + MANY) + slack;
    let s = summary(&mut agent, field(&last, "ts"), |v| {
        field(v, "lost") > 0
            && field(v, "events") + field(v, "lost") + 8 * field(v, "missed") + slack >= expected
    });
    let (events, lost, missed) = (field(&s, "events"), field(&s, "lost"), field(&s, "missed"));
    println!("expected {expected} records: read {events}, lost {lost}, missed runs {missed}");
    assert!(
        events + lost <= most,
        "more records than connections made: {}",
        agent.context()
    );
    assert!(
        lost >= per_conn * MANY / 2,
        "the ring holds a few dozen records; most of {} must be lost: {}",
        per_conn * MANY,
        agent.context()
    );
    assert!(
        agent.stderr_says("the kernel dropped"),
        "no warning on stderr: {}",
        agent.context()
    );

    // An exhaustion report says how much was lost, so that its reader knows how far to trust it.
    ns.hog("hog", V4);
    let victim = ns.victim_fails("victim", V4);
    let report = agent.wait_for("exhaustion", |v| {
        v["type"] == "exhaustion" && v["victim"]["pid"] == victim
    });
    assert!(field(&report, "lost") >= lost, "{report:#}");
}

/// Records lost to a full ring leave the table short, and the agent knows it: it resyncs with
/// sock_diag at once instead of at its next `--resync` tick (an hour away here).
#[test]
fn lost_records_bring_a_resync_at_once() {
    let _g = serial();
    if !require_root("lost_records_bring_a_resync_at_once") {
        return;
    }
    let mut ns = Netns::new_with(&["net.ipv4.ip_local_port_range=40000 40999"]);
    ns.serve(&[V4]);
    let mut agent = Agent::start_with(ns.id, &["--ring-buffer-kib", "4", "--resync", "3600"]);
    agent.wait_for("started", |v| v["type"] == "started");
    // With nothing reading the rings, a hog opens more connections than they hold records of
    // (about 36 a ring here, at most 8 rings; a record or two a connection, by hook mode): the
    // records of most are lost, whichever CPUs it runs on, and only sock_diag can tell the agent.
    const HELD: u64 = 300;
    // SAFETY: signals to the agent we started.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGSTOP) };
    let (hog, _) = ns.keep(
        "hog",
        &["hold", "--connect", V4, "--count", &HELD.to_string()],
        &format!("held {HELD}"),
    );
    unsafe { libc::kill(agent.pid() as i32, libc::SIGCONT) };
    let s = summary(&mut agent, 0, |v| {
        field(v, "lost") > 0
            && v["destinations"].as_array().is_some_and(|d| {
                d.iter()
                    .any(|d| d["in_use"] == HELD && d["top_holder"]["pid"] == hog)
            })
    });
    println!("lost {}, read {}", field(&s, "lost"), field(&s, "events"));
    assert!(
        agent.stderr_says("sock_diag resync"),
        "the table came back without a resync? {}",
        agent.context()
    );
}

/// State changes lost to a full ring leave sockets in the table in states the kernel has left
/// behind; the resync they bring corrects them and counts them (`repaired`), on stderr too.
#[test]
fn sockets_whose_state_changes_were_lost_are_repaired_and_counted() {
    let _g = serial();
    if !require_root("sockets_whose_state_changes_were_lost_are_repaired_and_counted") {
        return;
    }
    let mut ns = Netns::new_with(&["net.ipv4.ip_local_port_range=40000 40999"]);
    ns.serve(&[V4]);
    let mut agent = Agent::start_with(ns.id, &["--ring-buffer-kib", "4", "--resync", "3600"]);
    agent.wait_for("started", |v| v["type"] == "started");
    // With nothing reading the rings, a hog opens more connections than they hold records of
    // and is killed: the rings keep the first records, openings, and lose the rest, those
    // sockets' ends included. The kernel has them in TIME_WAIT (the hog closed first), the
    // table, once read, still open.
    const HELD: u32 = 300;
    // SAFETY: signals to processes we started.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGSTOP) };
    let mut hog = ns.spawn(
        "hog",
        &["hold", "--connect", V4, "--count", &HELD.to_string()],
    );
    hog.expect(&format!("held {HELD}"));
    unsafe { libc::kill(hog.pid() as i32, libc::SIGKILL) };
    hog.wait();
    unsafe { libc::kill(agent.pid() as i32, libc::SIGCONT) };
    let s = summary(&mut agent, 0, |v| field(v, "repaired") > 0);
    println!(
        "lost {}, read {}, repaired {}",
        field(&s, "lost"),
        field(&s, "events"),
        field(&s, "repaired")
    );
    assert!(field(&s, "lost") > 0, "{}", agent.context());
    assert!(
        field(&s, "repaired") <= u64::from(HELD),
        "more repaired than sockets: {}",
        agent.context()
    );
    assert!(
        agent.stderr_says("sockets were held in a state the kernel no longer reports"),
        "{}",
        agent.context()
    );
    let d = s["destinations"].as_array().and_then(|d| d.first());
    assert!(
        d.is_some_and(|d| d["by_state"]["ESTABLISHED"].is_null()),
        "an open socket is left in the table: {}",
        agent.context()
    );
}

#[test]
fn at_the_socket_limit_the_oldest_time_wait_goes_first_and_is_counted() {
    let _g = serial();
    if !require_root("at_the_socket_limit_the_oldest_time_wait_goes_first_and_is_counted") {
        return;
    }
    let mut ns = Netns::new();
    ns.serve(&[V4]);
    let mut agent = Agent::start_with(ns.id, &["--max-sockets", "4"]);
    // Four connections closed client-first: the table is full of TIME_WAIT.
    let churn_tw = |name: &str| {
        let mut c = ns.spawn(name, &["churn", "--connect", V4, "--count", "4"]);
        c.expect("churned ok=4 failed=0");
        assert!(c.wait().success());
        c.pid()
    };
    let first = churn_tw("first");
    let s = summary(&mut agent, 0, |v| {
        v["destinations"][0]["by_state"]["TIME_WAIT"] == 4
    });
    assert_eq!(s["destinations"][0]["top_holder"]["pid"], first, "{s:#}");
    // Four more: each takes the place of one of the first four, oldest first.
    let second = churn_tw("second");
    let s = summary(&mut agent, field(&s, "ts"), |v| {
        v["destinations"][0]["by_state"]["TIME_WAIT"] == 4 && field(v, "evicted") >= 4
    });
    assert_eq!(field(&s, "tracked"), 4, "{}", agent.context());
    assert_eq!(field(&s, "evicted"), 4, "{}", agent.context());
    assert_eq!(field(&s, "over_limit"), 0, "{}", agent.context());
    let top = &s["destinations"][0];
    assert_eq!(top["top_holder"]["pid"], second, "{s:#}");
    assert_eq!(top["top_holder"]["ports"], 4, "{s:#}");
    assert!(
        agent.stderr_says("--max-sockets reached"),
        "no warning on stderr: {}",
        agent.context()
    );
}

/// A namespace that dies while the agent cannot read (a container stopped during a burst): the
/// records of its sockets' ends are lost, and no dump can correct ports in a namespace that no
/// longer exists. The next pass finds that nothing holds it and forgets its ports.
#[test]
fn a_gone_namespaces_ports_leave_the_table_when_the_records_of_their_ends_were_lost() {
    let _g = serial();
    if !require_root(
        "a_gone_namespaces_ports_leave_the_table_when_the_records_of_their_ends_were_lost",
    ) {
        return;
    }
    let mut ns = Netns::new_with(&["net.ipv4.ip_local_port_range=40000 40999"]);
    let id = ns.id;
    ns.serve(&[V4]);
    let mut agent = Agent::start_with(id, &["--ring-buffer-kib", "4", "--resync", "1"]);
    agent.wait_for("started", |v| v["type"] == "started");
    const HELD: u64 = 300;
    ns.keep(
        "hog",
        &["hold", "--connect", V4, "--count", &HELD.to_string()],
        &format!("held {HELD}"),
    );
    let held = summary(&mut agent, 0, |v| {
        v["destinations"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["netns"] == id && d["in_use"] == HELD))
    });
    // With nothing reading the rings, the namespace and every process in it go: the records
    // of most of the 300 sockets' ends do not fit.
    // SAFETY: signals to the agent we started.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGSTOP) };
    drop(ns);
    std::thread::sleep(std::time::Duration::from_millis(300));
    unsafe { libc::kill(agent.pid() as i32, libc::SIGCONT) };
    let s = summary(&mut agent, field(&held, "ts"), |v| {
        field(v, "lost") > 0
            && v["destinations"]
                .as_array()
                .is_some_and(|d| d.iter().all(|d| d["netns"] != id))
    });
    println!(
        "lost {}, read {}, tracked {}",
        field(&s, "lost"),
        field(&s, "events"),
        field(&s, "tracked")
    );
    assert!(
        agent.stderr_says(&format!("network namespaces [{id}] are gone")),
        "{}",
        agent.context()
    );
}
