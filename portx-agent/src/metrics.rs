//! A [`View`] as OpenMetrics text (`prometheus-client`), for `trace --metrics`.
//!
//! Each scrape builds a fresh registry from the latest View: the View's totals are cumulative
//! since start, so a counter set from them is monotonic, and a destination that left the top K
//! leaves the output instead of lingering with a stale value. Cardinality is bounded: per
//! destination series only for the top K destinations (`--metrics-top`), per failure group at
//! most [`crate::view::MAX_GROUPS`] (the rest is `group="other"`).
use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::{Registry, Unit},
};

use crate::view::View;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestLabels {
    netns: u32,
    saddr: String,
    daddr: String,
    dport: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    netns: u32,
    saddr: String,
    daddr: String,
    dport: u16,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    group: String,
    pod_uid: String,
    syscall: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HolderLabels {
    pid: u32,
    comm: String,
    container_id: String,
    pod_uid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    hooks: String,
    version: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge = Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

/// OpenMetrics text of `view`, at most `top_k` destinations; ends with `# EOF`.
pub fn render(view: &View, top_k: usize) -> Result<String, std::fmt::Error> {
    let mut r = Registry::default();
    r.register(
        "portx",
        "The portx agent and the hooks it attached",
        Info::new(InfoLabels {
            hooks: view.hooks.clone(),
            version: env!("CARGO_PKG_VERSION"),
        }),
    );

    let in_use = Family::<StateLabels, Gauge>::default();
    let range = Family::<DestLabels, Gauge>::default();
    let util = Family::<DestLabels, FloatGauge>::default();
    let churn = Family::<DestLabels, FloatGauge>::default();
    let tw_rate = Family::<DestLabels, FloatGauge>::default();
    let tte = Family::<DestLabels, FloatGauge>::default();
    for d in view.destinations.iter().take(top_k) {
        let dest = DestLabels {
            netns: d.netns,
            saddr: d.saddr.clone(),
            daddr: d.daddr.clone(),
            dport: d.dport,
        };
        for (state, n) in &d.by_state {
            in_use
                .get_or_create(&StateLabels {
                    netns: d.netns,
                    saddr: d.saddr.clone(),
                    daddr: d.daddr.clone(),
                    dport: d.dport,
                    state: (*state).to_string(),
                })
                .set(i64::from(*n));
        }
        if let Some(n) = d.range {
            range.get_or_create(&dest).set(i64::from(n));
        }
        if let Some(u) = d.utilization {
            util.get_or_create(&dest).set(u);
        }
        if let Some(c) = d.churn_per_s {
            churn.get_or_create(&dest).set(c);
        }
        if let Some(t) = d.time_wait_per_s {
            tw_rate.get_or_create(&dest).set(t);
        }
        if let Some(t) = d.time_to_exhaustion_s {
            tte.get_or_create(&dest).set(t);
        }
    }
    r.register(
        "portx_ports_in_use",
        "Ephemeral ports in use per destination and TCP state (top destinations only)",
        in_use,
    );
    r.register(
        "portx_port_range_size",
        "Ports connect() may pick in the destination's network namespace (range minus reserved)",
        range,
    );
    r.register(
        "portx_port_utilization",
        "Ports in use / usable range, 0 to 1",
        util,
    );
    r.register(
        "portx_connect_churn_per_second",
        "New connections per second to the destination (smoothed over ~10 s)",
        churn,
    );
    r.register(
        "portx_time_wait_entering_per_second",
        "Ports entering TIME_WAIT per second (smoothed over ~10 s)",
        tw_rate,
    );
    r.register_with_unit(
        "portx_time_to_exhaustion",
        "Time until the destination's ports run out at the recent growth; absent when not heading there",
        Unit::Seconds,
        tte,
    );

    let holders = Family::<HolderLabels, Gauge>::default();
    for p in view.processes.iter().take(top_k) {
        holders
            .get_or_create(&HolderLabels {
                pid: p.pid,
                comm: p.comm.clone(),
                container_id: p.who.container_id.clone().unwrap_or_default(),
                pod_uid: p.who.pod_uid.clone().unwrap_or_default(),
            })
            .set(i64::from(p.ports));
    }
    r.register(
        "portx_process_ports",
        "Ports held by a process over all destinations, TIME_WAIT included (top processes only)",
        holders,
    );

    let failures = Family::<GroupLabels, Counter>::default();
    for g in &view.failures_by_group {
        for (syscall, n) in [
            ("connect", g.connect_eaddrnotavail),
            ("bind", g.bind_eaddrinuse),
        ] {
            if n > 0 {
                failures
                    .get_or_create(&GroupLabels {
                        group: g.group.clone(),
                        pod_uid: g.pod_uid.clone().unwrap_or_default(),
                        syscall,
                    })
                    .inc_by(n);
            }
        }
    }
    r.register(
        "portx_group_exhaustion_failures",
        "connect() EADDRNOTAVAIL and bind() EADDRINUSE failures by container (or cgroup)",
        failures,
    );

    let t = &view.totals;
    counter(
        &mut r,
        "portx_connect_eaddrnotavail",
        "connect() failures with EADDRNOTAVAIL (no local port left, or a bound socket's 4-tuple in use)",
        t.connect_eaddrnotavail,
    );
    counter(
        &mut r,
        "portx_bind_eaddrinuse",
        "port-0 bind() failures of TCP sockets with EADDRINUSE (no port left for bind-before-connect)",
        t.bind_eaddrinuse,
    );
    counter(
        &mut r,
        "portx_other_socket_failures",
        "Other connect()/bind() failures",
        t.other_failures,
    );
    counter(
        &mut r,
        "portx_events",
        "Records read from the kernel ring buffer",
        t.events,
    );
    counter(
        &mut r,
        "portx_lost_events",
        "Records the kernel could not write (ring buffer full): counts may be low until the next resync",
        t.lost,
    );
    counter(
        &mut r,
        "portx_missed_program_runs",
        "Runs of portx programs that saw nothing: skipped by the kernel (recursion) or given up",
        t.missed,
    );
    counter(
        &mut r,
        "portx_repaired_sockets",
        "Sockets a resync found in a live state the kernel no longer reports: state changes that came in no record (lost, or not run by the kernel), corrected then",
        t.repaired,
    );
    counter(
        &mut r,
        "portx_decode_errors",
        "Records that could not be decoded",
        t.decode_errors,
    );
    counter(
        &mut r,
        "portx_output_dropped_lines",
        "Lines of output dropped because stdout did not keep up (its reader stopped reading)",
        t.output_dropped,
    );
    counter(
        &mut r,
        "portx_evicted_sockets",
        "TIME_WAIT entries evicted at --max-sockets",
        t.evicted,
    );
    counter(
        &mut r,
        "portx_untracked_sockets",
        "Sockets not tracked at --max-sockets",
        t.over_limit,
    );
    gauge(
        &mut r,
        "portx_tracked_sockets",
        "Sockets in the table",
        t.tracked as i64,
    );
    gauge(
        &mut r,
        "portx_pending_connects",
        "connect()s whose port is not known yet",
        t.pending as i64,
    );

    let mut out = String::with_capacity(4096);
    encode(&mut out, &r)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        report::{DestRecord, HolderRecord, Who},
        view::{GroupFailures, ProcessRecord, Totals},
    };

    fn dest(dport: u16, in_use: u32) -> DestRecord {
        DestRecord {
            netns: 4026531840,
            saddr: "10.0.0.1".into(),
            daddr: "10.0.0.2".into(),
            dport,
            range: Some(16),
            in_use,
            outside_range: 0,
            utilization: Some(f64::from(in_use) / 16.0),
            by_state: [("ESTABLISHED", in_use - 2), ("TIME_WAIT", 2)]
                .into_iter()
                .collect(),
            top_holder: Some(HolderRecord {
                pid: 7,
                comm: "hog".into(),
                ports: in_use,
                time_wait: 0,
                who: Who::default(),
            }),
            churn_per_s: Some(3.5),
            time_wait_per_s: Some(1.0),
            projected_in_use: Some(70),
            time_to_exhaustion_s: if dport == 443 { Some(12.5) } else { None },
        }
    }

    fn view() -> View {
        View {
            ts: 1,
            hooks: "tracepoint".into(),
            destinations: vec![dest(443, 16), dest(80, 4), dest(8080, 3)],
            processes: vec![ProcessRecord {
                pid: 7,
                comm: "hog".into(),
                ports: 20,
                time_wait: 2,
                destinations: 2,
                who: Who {
                    container_id: Some("3f4e".into()),
                    pod_uid: Some("0f1e".into()),
                    ..Default::default()
                },
            }],
            failures_by_group: vec![GroupFailures {
                group: "containerd://3f4e1c2b5a6d".into(),
                pod_uid: Some("0f1e".into()),
                connect_eaddrnotavail: 5,
                bind_eaddrinuse: 0,
            }],
            totals: Totals {
                events: 100,
                lost: 3,
                repaired: 2,
                connect_eaddrnotavail: 5,
                tracked: 23,
                ..Default::default()
            },
        }
    }

    #[test]
    fn a_view_as_openmetrics() {
        let text = render(&view(), 2).unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("portx_info{hooks=\"tracepoint\""), "{text}");
        assert!(text.contains(
            "portx_ports_in_use{netns=\"4026531840\",saddr=\"10.0.0.1\",daddr=\"10.0.0.2\",dport=\"443\",state=\"ESTABLISHED\"} 14"
        ), "{text}");
        assert!(text.contains("portx_port_utilization{netns=\"4026531840\",saddr=\"10.0.0.1\",daddr=\"10.0.0.2\",dport=\"443\"} 1.0"), "{text}");
        assert!(text.contains("portx_time_to_exhaustion_seconds{netns=\"4026531840\",saddr=\"10.0.0.1\",daddr=\"10.0.0.2\",dport=\"443\"} 12.5"), "{text}");
        assert!(
            text.contains("portx_connect_eaddrnotavail_total 5"),
            "{text}"
        );
        assert!(text.contains("portx_lost_events_total 3"), "{text}");
        assert!(text.contains("portx_repaired_sockets_total 2"), "{text}");
        assert!(text.contains("portx_tracked_sockets 23"), "{text}");
        assert!(text.contains(
            "portx_group_exhaustion_failures_total{group=\"containerd://3f4e1c2b5a6d\",pod_uid=\"0f1e\",syscall=\"connect\"} 5"
        ), "{text}");
        assert!(text.contains("portx_process_ports{pid=\"7\",comm=\"hog\",container_id=\"3f4e\",pod_uid=\"0f1e\"} 20"), "{text}");
        // Top 2 only: port 8080 (third) is not exported.
        assert!(!text.contains("dport=\"8080\""), "{text}");
        assert!(
            text.contains("# TYPE portx_connect_eaddrnotavail counter"),
            "{text}"
        );
    }

    #[test]
    fn an_empty_view_is_still_valid() {
        let text = render(&View::default(), 20).unwrap();
        assert!(text.ends_with("# EOF\n"));
        assert!(text.contains("portx_lost_events_total 0"));
        assert!(text.contains("portx_output_dropped_lines_total 0"));
    }

    #[test]
    fn the_shipped_alert_rules_use_metrics_that_exist() {
        let rules = include_str!("../../deploy/alert-rules.yml");
        let text = render(&view(), 20).unwrap();
        let mut names: Vec<&str> = rules
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("portx_"))
            .collect();
        names.dedup();
        assert!(names.len() >= 4, "{names:?}");
        for name in names {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&format!("{name}{{"))
                        || l.starts_with(&format!("{name} "))),
                "alert-rules.yml uses {name}, which the agent does not export:\n{text}"
            );
        }
    }
}
