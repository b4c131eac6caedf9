//! Tracker scale, without the kernel: synthetic decoded events fed to `Tracker` on one core.
//! Prints one JSON object (read by `cargo xtask bench`). Run: `cargo bench -p portx-agent --bench tracker`.
use std::{net::IpAddr, time::Instant};

use portx_agent::{
    decoder::{Comm, Opening, StateChange, Task},
    tracker::Tracker,
};
use portx_common::tcp_state as st;

const SOCKETS: u32 = 1_000_000;
const PER_DEST: u32 = 50_000;

/// A `/proc/self/status` figure in KiB (`VmRSS:`, `VmHWM:`).
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}

fn event(i: u32, old: u32, new: u32, with_port: bool, ts: u64) -> StateChange {
    StateChange {
        ts_ns: ts,
        task: Task {
            pid: 1000 + i % 64,
            tid: 1000 + i % 64,
            comm: Comm::new("client"),
        },
        opening: Opening::No,
        skaddr: 0xffff_8880_0000_0000 + u64::from(i) * 2048,
        netns: 4026531840,
        old,
        new,
        saddr: IpAddr::from([10, 0, 0, 1]),
        sport: if with_port {
            (10_000 + i % PER_DEST) as u16
        } else {
            0
        },
        daddr: IpAddr::from([10, 1, (i / PER_DEST) as u8, 1]),
        dport: 443,
    }
}

/// A connect storm as the agent sees it (see the README's Performance section): each connection
/// opened by its thread's record with the port and closed by an RST, two threads to two
/// destinations, a handful of sockets alive at once. Returns events per second.
fn churn(connections: u32) -> f64 {
    let mut t = Tracker::new();
    let start = Instant::now();
    for i in 0..connections {
        let ts = u64::from(i) * 1_000;
        let thread = i % 2;
        let mut e = StateChange {
            ts_ns: ts,
            task: Task {
                pid: 4000,
                tid: 4001 + thread,
                comm: Comm::new("storm"),
            },
            opening: Opening::InThread,
            skaddr: 0xffff_8880_0000_0000 + u64::from(i % 4096) * 2048,
            netns: 4026532000,
            old: st::SYN_SENT,
            new: st::ESTABLISHED,
            saddr: IpAddr::from([127, 0, 0, 1]),
            sport: (32768 + i % 28000) as u16,
            daddr: IpAddr::from([127, 0, 0, 1]),
            dport: 40000 + thread as u16,
        };
        t.on_state(&e);
        e.opening = Opening::No;
        e.task = Task {
            pid: 0,
            tid: 0,
            comm: Comm::default(),
        };
        e.old = st::ESTABLISHED;
        e.new = st::CLOSE;
        t.on_state(&e);
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(t.tracked(), 0);
    f64::from(connections) * 2.0 / secs
}

fn main() {
    let churn_events_per_sec = churn(2_000_000);
    let mut t = Tracker::new();
    let rss0 = rss_kib();
    let start = Instant::now();
    for i in 0..SOCKETS {
        t.on_state(&event(i, st::CLOSE, st::SYN_SENT, false, 0));
        t.on_state(&event(i, st::SYN_SENT, st::ESTABLISHED, true, 0));
    }
    let open_secs = start.elapsed().as_secs_f64();
    let rss1 = rss_kib();
    assert_eq!(t.tracked(), SOCKETS as usize);
    let start = Instant::now();
    for i in 0..SOCKETS {
        // Closes spread over 10 s, so TIME_WAIT expiries spread over 10 s too.
        let ts = u64::from(i) * 10_000;
        t.on_state(&event(i, st::ESTABLISHED, st::FIN_WAIT1, true, ts));
        t.on_state(&event(i, st::FIN_WAIT1, st::FIN_WAIT2, true, ts));
        t.on_state(&event(i, st::FIN_WAIT2, st::CLOSE, true, ts));
    }
    let close_secs = start.elapsed().as_secs_f64();
    // The same million, now in TIME_WAIT: the ageing heap adds its entries.
    let rss2 = rss_kib();
    // The most the process held: the table's growth included (a hash table that doubles holds
    // its old and new arrays for a moment).
    let hwm = status_kib("VmHWM:");
    // A tick with nothing due must not touch the million TIME_WAIT entries.
    let start = Instant::now();
    for _ in 0..1000 {
        t.expire(1);
    }
    let idle_tick_ns = start.elapsed().as_nanos() as f64 / 1000.0;
    let start = Instant::now();
    let mut now = 60_000_000_000u64;
    let mut ticks = 0;
    while t.tracked() > 0 {
        now += 1_000_000_000;
        t.expire(now);
        ticks += 1;
    }
    let expire_secs = start.elapsed().as_secs_f64();
    let events = f64::from(SOCKETS) * 5.0;
    let mib = |kib: u64| kib as f64 / 1024.0;
    // rss_mib_1m*: what the table added to the process; process_*: the process's own RSS then
    // (what a target on RSS is about), and its peak.
    println!(
        "{{\"churn_events_per_sec\":{:.0},\"events_per_sec\":{:.0},\"open_events_per_sec\":{:.0},\"rss_mib_1m\":{:.1},\"rss_mib_1m_time_wait\":{:.1},\"baseline_rss_mib\":{:.1},\"process_rss_mib_1m\":{:.1},\"process_rss_mib_1m_time_wait\":{:.1},\"process_peak_rss_mib\":{:.1},\"bytes_per_socket\":{:.0},\"idle_tick_ns\":{:.0},\"expire_all_ms\":{:.1},\"expire_ticks\":{}}}",
        churn_events_per_sec,
        events / (open_secs + close_secs),
        f64::from(SOCKETS) * 2.0 / open_secs,
        (rss1.saturating_sub(rss0)) as f64 / 1024.0,
        (rss2.saturating_sub(rss0)) as f64 / 1024.0,
        mib(rss0),
        mib(rss1),
        mib(rss2),
        mib(hwm),
        (rss1.saturating_sub(rss0)) as f64 * 1024.0 / f64::from(SOCKETS),
        idle_tick_ns,
        expire_secs * 1000.0,
        ticks
    );
}
