//! `trace --metrics`: the OpenMetrics endpoint against a real exhaustion, and its manners with
//! junk, silent and wrong-method clients.
use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use portx_e2e::{agent_bin, hooks, require_root, serial, state_hook, Agent, Netns, Started};

const V4: &str = "127.0.0.1:9000";

fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("address").to_string()
}

/// Sends `request` raw and returns everything the server said before closing.
fn raw(addr: &str, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request).expect("sending");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("reading the response");
    String::from_utf8_lossy(&out).to_string()
}

fn scrape(addr: &str) -> String {
    raw(addr, b"GET /metrics HTTP/1.1\r\nHost: portx\r\n\r\n")
}

/// The first scrape whose text passes `until`, polled every 200 ms for up to 15 s: the View is
/// published once a second.
fn scrape_until(addr: &str, what: &str, until: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = scrape(addr);
        if until(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "metrics never {what}:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The value of the first sample line that starts with `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_show_the_exhaustion_and_survive_bad_clients() {
    let _g = serial();
    if !require_root("metrics_show_the_exhaustion_and_survive_bad_clients") {
        return;
    }
    let mut ns = Netns::new();
    ns.serve(&[V4]);
    let addr = free_addr();
    let mut agent = Agent::start_with(ns.id, &["--metrics", &addr]);
    ns.hog("hog", V4);
    ns.victim_fails("victim", V4);
    agent.wait_for("exhaustion", |v| v["type"] == "exhaustion");

    let est = format!(
        "portx_ports_in_use{{netns=\"{}\",saddr=\"127.0.0.1\",daddr=\"127.0.0.1\",dport=\"9000\",state=\"ESTABLISHED\"}}",
        ns.id
    );
    let text = scrape_until(&addr, "showed the exhaustion", |text| {
        sample(text, &est) == Some(16.0)
            && sample(text, "portx_connect_eaddrnotavail_total") >= Some(1.0)
    });
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(
        text.contains("Content-Type: application/openmetrics-text"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_eq!(
        sample(&text, "portx_lost_events_total"),
        Some(0.0),
        "{text}"
    );
    let util = format!(
        "portx_port_utilization{{netns=\"{}\",saddr=\"127.0.0.1\",daddr=\"127.0.0.1\",dport=\"9000\"}}",
        ns.id
    );
    assert_eq!(sample(&text, &util), Some(1.0), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("portx_group_exhaustion_failures_total{")
                && l.contains("syscall=\"connect\"")),
        "{text}"
    );

    // Manners: wrong method, wrong path, junk, an oversized head.
    assert!(raw(&addr, b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    assert!(raw(&addr, b"GET /other HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(raw(&addr, b"\x16\x03\x01\x02\x00junk\r\n\r\n").starts_with("HTTP/1.1 400"));
    let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 9000));
    assert!(raw(&addr, &big).starts_with("HTTP/1.1 431"));
    // Clients that never send, and one that sends but never reads: others are still served
    // at once.
    let silent: Vec<TcpStream> = (0..10)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    let mut no_reader = TcpStream::connect(&addr).expect("connect");
    no_reader
        .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        .expect("send");
    let t0 = Instant::now();
    let again = scrape(&addr);
    assert!(again.starts_with("HTTP/1.1 200 OK"), "{again}");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "a scrape waited {:?} behind silent clients",
        t0.elapsed()
    );
    drop(silent);
    drop(no_reader);
    let (status, _) = agent.stop(libc::SIGINT);
    assert!(status.success(), "agent exit: {status:?}");
}

/// `--pid`, `--comm` and `--dport` narrow what is printed, not `/metrics`: a scraper's alerts on
/// the destinations left out must not go quiet.
#[test]
fn metrics_are_not_narrowed_by_the_print_filters() {
    let _g = serial();
    if !require_root("metrics_are_not_narrowed_by_the_print_filters") {
        return;
    }
    let mut ns = Netns::new();
    ns.serve(&[V4]);
    let addr = free_addr();
    let mut agent = Agent::start_with(ns.id, &["--metrics", &addr, "--dport", "9001"]);
    ns.hog("hog", V4);
    let used = format!(
        "portx_ports_in_use{{netns=\"{}\",saddr=\"127.0.0.1\",daddr=\"127.0.0.1\",dport=\"9000\",state=\"ESTABLISHED\"}}",
        ns.id
    );
    let text = scrape_until(&addr, "showed :9000 with --dport 9001", |text| {
        sample(text, &used) == Some(16.0)
    });
    assert!(
        text.lines()
            .any(|l| l.starts_with("portx_process_ports{") && l.contains("comm=\"hog\"")),
        "the hog among the processes: {text}"
    );
    // The summaries on stdout are narrowed.
    let summary = agent.wait_for("a summary after the hog", |v| {
        v["type"] == "summary" && v["tracked"].as_u64() >= Some(16)
    });
    assert_eq!(
        summary["destinations"],
        serde_json::json!([]),
        "{summary:#}"
    );
    let (status, _) = agent.stop(libc::SIGINT);
    assert!(status.success(), "agent exit: {status:?}");
}

/// UDP shares `ip_local_port_range` with TCP but not its ports: a UDP socket's port-0 bind()
/// failing with EADDRINUSE says the namespace's UDP ports are gone, not its TCP ones. Its line
/// says `udp`; it counts among the other failures, not as bind EADDRINUSE, and gets no
/// exhaustion report. Nor does a TCP bind() to a fixed port that is taken.
#[test]
fn udp_and_fixed_port_bind_failures_are_not_tcp_exhaustion() {
    let _g = serial();
    if !require_root("udp_and_fixed_port_bind_failures_are_not_tcp_exhaustion") {
        return;
    }
    let mut ns = Netns::new();
    let addr = free_addr();
    let mut agent = Agent::start_with(ns.id, &["--metrics", &addr]);
    ns.keep(
        "binder",
        &["bind-hold", "--udp", "--count", "16"],
        "bound 16",
    );
    let victim = ns.spawn("victim", &["bind-hold", "--udp", "--count", "1"]);
    victim.expect("bind failed errno=98");
    let failed = agent.wait_for("bind_failed", |v| {
        v["type"] == "bind_failed" && v["pid"] == victim.pid()
    });
    assert_eq!(failed["error"], "EADDRINUSE", "{failed:#}");
    assert_eq!(failed["protocol"], "udp", "{failed:#}");
    let text = scrape_until(&addr, "counted the failure", |text| {
        sample(text, "portx_other_socket_failures_total") >= Some(1.0)
    });
    let ctx = format!("{text}\n{}", agent.context());
    assert_eq!(
        sample(&text, "portx_other_socket_failures_total"),
        Some(1.0),
        "{ctx}"
    );
    assert_eq!(
        sample(&text, "portx_bind_eaddrinuse_total"),
        Some(0.0),
        "{ctx}"
    );
    assert!(
        !agent.seen().iter().any(|v| v["type"] == "exhaustion"),
        "{ctx}"
    );

    // A TCP socket's bind() to a fixed port a listener holds: a port in use, not the range
    // exhausted. It too is another failure, with no exhaustion report.
    ns.serve(&[V4]);
    let fixed = ns.spawn(
        "fixed",
        &["hold-bound", "--connect", V4, "--from-port", "9000"],
    );
    fixed.expect("bind failed errno=98");
    let failed = agent.wait_for("bind_failed of the fixed port", |v| {
        v["type"] == "bind_failed" && v["pid"] == fixed.pid()
    });
    assert_eq!(failed["protocol"], "tcp", "{failed:#}");
    assert_eq!(failed["sport"], 9000, "{failed:#}");
    let text = scrape_until(&addr, "counted the fixed-port failure", |text| {
        sample(text, "portx_other_socket_failures_total") >= Some(2.0)
    });
    let ctx = format!("{text}\n{}", agent.context());
    assert_eq!(
        sample(&text, "portx_bind_eaddrinuse_total"),
        Some(0.0),
        "{ctx}"
    );
    assert!(
        !text.contains("portx_group_exhaustion_failures_total{"),
        "{ctx}"
    );
    assert!(
        !agent.seen().iter().any(|v| v["type"] == "exhaustion"),
        "{ctx}"
    );
}
/// stdout is a pipe nobody reads (a stalled log shipper, a paused `less`): once it is full the
/// agent still answers `/metrics` and SIGTERM — records wait in (or are dropped from, counted)
/// the queue of the thread that writes them.
#[test]
fn a_stuck_stdout_stops_neither_metrics_nor_sigterm() {
    use std::os::fd::AsRawFd as _;
    let _g = serial();
    if !require_root("a_stuck_stdout_stops_neither_metrics_nor_sigterm") {
        return;
    }
    let mut ns = Netns::new();
    // Eight destinations in TIME_WAIT for the next 60 s: each summary is a few KiB.
    let listen: Vec<String> = (9000..9008).map(|p| format!("127.0.0.1:{p}")).collect();
    ns.serve(&listen.iter().map(String::as_str).collect::<Vec<_>>());
    let churner = ns.spawn(
        "churner",
        &["churn", "--connect", V4, "--count", "1", "--ports", "8"],
    );
    churner.expect("churned ok=8 failed=0");
    let (reader, writer) = std::io::pipe().expect("pipe");
    // SAFETY: fcntl on a pipe fd we own.
    let size = unsafe { libc::fcntl(writer.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(
        size >= 4096,
        "F_SETPIPE_SZ: {}",
        std::io::Error::last_os_error()
    );
    let addr = free_addr();
    let mut agent = Started(
        Command::new(agent_bin())
            .args(["trace", "--json", "--interval", "1", "--metrics", &addr])
            .args(["--hooks", &hooks(), "--state-hook", &state_hook()])
            .args(["--netns", &ns.id.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(writer)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting the agent"),
    );
    let waiting = |r: &std::io::PipeReader| {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD into an int we own.
        unsafe { libc::ioctl(r.as_raw_fd(), libc::FIONREAD, &mut n) };
        n
    };
    // Full: the bytes waiting stop changing while a summary comes every second (a 4 KiB pipe
    // is one page; a write that does not fit the rest of it blocks).
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut last, mut since) = (-1, Instant::now());
    loop {
        let now = waiting(&reader);
        if now != last {
            (last, since) = (now, Instant::now());
        } else if now > 0 && since.elapsed() >= Duration::from_secs(3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pipe never filled: {now} bytes of {size}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let asked = Instant::now();
    let text = scrape(&addr);
    let took = asked.elapsed();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(took < Duration::from_secs(2), "/metrics took {took:?}");
    // SAFETY: a signal to the agent we started.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    let status = agent
        .exit_within(Duration::from_secs(15))
        .expect("the agent ignored SIGTERM for 15 s with its stdout stuck");
    assert_eq!(status.code(), Some(0));
    drop(reader);
}

#[test]
fn an_address_in_use_is_a_clean_error() {
    let _g = serial();
    if !require_root("an_address_in_use_is_a_clean_error") {
        return;
    }
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("address").to_string();
    let out = Command::new(agent_bin())
        .args(["trace", "--duration", "5", "--metrics", &addr])
        .output()
        .expect("running the agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("metrics endpoint on {addr}")) && err.contains("in use"),
        "{err}"
    );
    assert!(
        !err.contains("attached"),
        "nothing is attached before the endpoint is bound: {err}"
    );
}
