//! Loss is never silent: when the ring buffer is full, every record the kernel could not write is
//! counted, and the agent reports the count.
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
    let mut c = ns.spawn(
        "churner",
        &[
            "churn",
            "--connect",
            V4,
            "--count",
            &count.to_string(),
            "--rst",
        ],
    );
    c.expect(&format!("churned ok={count} failed=0"));
    assert!(c.wait().success());
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
    let per_conn = field(&last, "events") / CALIBRATE;
    assert_eq!(
        field(&last, "events"),
        per_conn * CALIBRATE,
        "records are not a whole number per connection: {}",
        agent.context()
    );
    assert!(per_conn >= 3, "{}", agent.context());

    // Stop the agent, so that nothing reads the ring, and make far more records than it holds.
    const MANY: u64 = 300;
    // SAFETY: signals to the agent we started.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGSTOP) };
    churn(&ns, MANY as u32);
    unsafe { libc::kill(agent.pid() as i32, libc::SIGCONT) };

    // Records the agent read + records counted lost = records the kernel wrote, exactly. Other
    // namespaces' connections (the agent traces the host) may add a few; runs the kernel skipped
    // (`missed`) write nothing.
    let expected = per_conn * (CALIBRATE + MANY);
    let slack = 8 + expected / 50;
    let s = summary(&mut agent, field(&last, "ts"), |v| {
        field(v, "lost") > 0
            && field(v, "events") + field(v, "lost") + 8 * field(v, "missed") + slack >= expected
    });
    let (events, lost, missed) = (field(&s, "events"), field(&s, "lost"), field(&s, "missed"));
    println!("expected {expected} records: read {events}, lost {lost}, missed runs {missed}");
    assert!(
        events + lost <= expected + slack,
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
        agent.stderr().contains("the kernel dropped"),
        "no warning on stderr: {}",
        agent.context()
    );
}
