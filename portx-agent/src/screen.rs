//! What `portx-agent top` draws from a [`View`]: a header with the run's totals, the hottest
//! destinations (utilization bar, ports by state, churn, time to exhaustion, top holder), the
//! processes holding the most ports, failures by container, and the last log lines. Drawing only;
//! the loop around it is [`crate::top`].
use ratatui::{
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Cell, Paragraph, Row, Table},
    Frame,
};

use crate::{output::endpoint, report::DestRecord, view::View};

/// Everything drawn besides the View.
pub struct Extras<'a> {
    /// Newest last.
    pub log: &'a [String],
}

/// Log lines shown at the bottom.
pub const LOG_LINES: usize = 3;
const BAR: usize = 10;

pub fn draw(frame: &mut Frame, view: &View, extras: &Extras) {
    let failures = !view.failures_by_group.is_empty();
    let [head, dests, procs, fails, log] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Fill(3),
        Constraint::Fill(2),
        Constraint::Length(if failures {
            view.failures_by_group.len().min(5) as u16 + 3
        } else {
            0
        }),
        Constraint::Length(LOG_LINES as u16 + 2),
    ])
    .areas(frame.area());
    frame.render_widget(header(view), head);
    frame.render_widget(destinations(view), dests);
    frame.render_widget(processes(view), procs);
    if failures {
        frame.render_widget(failure_groups(view), fails);
    }
    let lines: Vec<Line> = extras.log.iter().map(|l| Line::raw(l.as_str())).collect();
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" log ")),
        log,
    );
}

fn header(view: &View) -> Paragraph<'static> {
    let t = &view.totals;
    let first = if view.ts == 0 {
        Line::from(vec![
            Span::styled("portx top", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw("  attached; the first sample comes within a second"),
        ])
    } else {
        Line::from(vec![
            Span::styled("portx top", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(format!(
                "  {} hooks · {} sockets tracked · {} connects pending · {} events",
                view.hooks, t.tracked, t.pending, t.events
            )),
        ])
    };
    let bad = |n: u64| {
        if n > 0 {
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
        } else {
            Style::new()
        }
    };
    let mut second = vec![
        Span::styled(
            format!("EADDRNOTAVAIL {}", t.connect_eaddrnotavail),
            bad(t.connect_eaddrnotavail),
        ),
        Span::raw(" · "),
        Span::styled(
            format!("bind EADDRINUSE {}", t.bind_eaddrinuse),
            bad(t.bind_eaddrinuse),
        ),
        Span::raw(format!(" · other failures {}", t.other_failures)),
        Span::raw(" · "),
        Span::styled(format!("lost {}", t.lost), bad(t.lost)),
        Span::raw(" · "),
        Span::styled(format!("missed {}", t.missed), bad(t.missed)),
    ];
    if t.decode_errors > 0 {
        second.push(Span::styled(
            format!(" · undecodable {}", t.decode_errors),
            bad(t.decode_errors),
        ));
    }
    if t.repaired > 0 {
        // Sockets a resync found in a state the kernel had left: records that never came.
        second.push(Span::styled(
            format!(" · repaired {}", t.repaired),
            bad(t.repaired),
        ));
    }
    if t.evicted + t.over_limit > 0 {
        second.push(Span::styled(
            format!(
                " · --max-sockets: {} evicted, {} not tracked",
                t.evicted, t.over_limit
            ),
            bad(1),
        ));
    }
    second.push(Span::styled(
        "   q quit",
        Style::new().add_modifier(Modifier::DIM),
    ));
    Paragraph::new(vec![first, Line::from(second)])
}

fn destinations(view: &View) -> Table<'static> {
    let header = Row::new([
        "NETNS",
        "SOURCE -> DESTINATION",
        "UTILIZATION",
        "USED/RANGE",
        "ESTAB",
        "SYN",
        "TW",
        "OTHER",
        "NEW/s",
        "TW/s",
        "FULL IN",
        "TOP HOLDER",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let rows = view.destinations.iter().map(destination_row);
    // As wide as the longest pair (an IPv6 pair is up to 90 characters), the rest to the holder.
    let pair = view
        .destinations
        .iter()
        .map(|d| d.saddr.len() + d.daddr.len() + 12)
        .max()
        .unwrap_or(0)
        .clamp(21, 90) as u16;
    Table::new(
        rows,
        [
            Constraint::Length(10),
            Constraint::Length(pair),
            Constraint::Length(BAR as u16 + 6),
            Constraint::Length(11),
            Constraint::Length(5),
            Constraint::Length(5),
            Constraint::Length(5),
            Constraint::Length(5),
            Constraint::Length(6),
            Constraint::Length(6),
            Constraint::Length(8),
            Constraint::Fill(1),
        ],
    )
    .header(header)
    .block(Block::bordered().title(" destinations, most ports in use first "))
}

fn destination_row(d: &DestRecord) -> Row<'static> {
    let state = |name: &str| d.by_state.get(name).copied().unwrap_or(0);
    let (est, syn, tw) = (state("ESTABLISHED"), state("SYN_SENT"), state("TIME_WAIT"));
    let other = d.in_use.saturating_sub(est + syn + tw);
    let holder = d.top_holder.as_ref().map_or(String::new(), |h| {
        let who = if h.pid == 0 {
            h.comm.clone()
        } else {
            format!("{}[{}] {}", h.comm, h.pid, h.ports)
        };
        match h.who.short() {
            Some(place) => format!("{who} {place}"),
            None => who,
        }
    });
    Row::new([
        Cell::from(d.netns.to_string()),
        Cell::from(format!("{} -> {}", d.saddr, endpoint(&d.daddr, d.dport))),
        Cell::from(bar(d.utilization)),
        Cell::from(format!(
            "{}/{}",
            d.in_use,
            d.range.map_or("?".to_string(), |r| r.to_string())
        )),
        Cell::from(est.to_string()),
        Cell::from(syn.to_string()),
        Cell::from(tw.to_string()),
        Cell::from(other.to_string()),
        Cell::from(rate(d.churn_per_s)),
        Cell::from(rate(d.time_wait_per_s)),
        Cell::from(Span::styled(
            full_in(d.time_to_exhaustion_s),
            match d.time_to_exhaustion_s {
                Some(s) if s < 60.0 => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
                Some(_) => Style::new().fg(Color::Yellow),
                None => Style::new(),
            },
        )),
        Cell::from(holder),
    ])
}

fn processes(view: &View) -> Table<'static> {
    let header = Row::new(["PID", "COMM", "PORTS", "TW", "DESTS", "WHERE", "COMMAND"])
        .style(Style::new().add_modifier(Modifier::BOLD));
    let rows = view.processes.iter().map(|p| {
        Row::new([
            if p.pid == 0 {
                "?".to_string()
            } else {
                p.pid.to_string()
            },
            p.comm.clone(),
            p.ports.to_string(),
            p.time_wait.to_string(),
            p.destinations.to_string(),
            p.who.short().unwrap_or_default(),
            p.who.cmdline.clone().unwrap_or_default(),
        ])
    });
    Table::new(
        rows,
        [
            Constraint::Length(8),
            Constraint::Length(16),
            Constraint::Length(7),
            Constraint::Length(7),
            Constraint::Length(6),
            Constraint::Length(28),
            Constraint::Min(10),
        ],
    )
    .header(header)
    .block(Block::bordered().title(" processes, most ports held first "))
}

fn failure_groups(view: &View) -> Table<'static> {
    let header = Row::new(["CONTAINER / CGROUP", "EADDRNOTAVAIL", "bind EADDRINUSE"])
        .style(Style::new().add_modifier(Modifier::BOLD));
    let rows = view.failures_by_group.iter().take(5).map(|g| {
        let name = match &g.pod_uid {
            Some(pod) => format!("{} pod {pod}", g.group),
            None => g.group.clone(),
        };
        Row::new([
            name,
            g.connect_eaddrnotavail.to_string(),
            g.bind_eaddrinuse.to_string(),
        ])
    });
    Table::new(
        rows,
        [
            Constraint::Min(20),
            Constraint::Length(14),
            Constraint::Length(16),
        ],
    )
    .header(header)
    .block(Block::bordered().title(" failures by container or cgroup "))
}

/// `████░░░░░░  40%`, coloured by how close to full; `?` when the range is unknown.
fn bar(utilization: Option<f64>) -> Line<'static> {
    let Some(u) = utilization else {
        return Line::raw("?");
    };
    let u = u.clamp(0.0, 1.0);
    let filled = (u * BAR as f64).round() as usize;
    let colour = if u >= 0.8 {
        Color::Red
    } else if u >= 0.5 {
        Color::Yellow
    } else {
        Color::Green
    };
    Line::from(vec![
        Span::styled("█".repeat(filled), Style::new().fg(colour)),
        Span::styled("░".repeat(BAR - filled), Style::new().fg(Color::DarkGray)),
        Span::raw(format!(" {:>3}%", crate::report::percent(u))),
    ])
}

fn rate(r: Option<f64>) -> String {
    match r {
        None => "-".into(),
        Some(r) if r < 10.0 => format!("{r:.1}"),
        Some(r) => format!("{r:.0}"),
    }
}

/// Time to exhaustion: `FULL` at 0, else the largest unit; `-` when not heading there.
fn full_in(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s <= 0.0 => "FULL".into(),
        Some(s) if s < 1.0 => "<1s".into(),
        Some(s) if s < 120.0 => format!("{s:.0}s"),
        Some(s) if s < 7200.0 => format!("{:.0}m", s / 60.0),
        Some(s) => format!("{:.0}h", s / 3600.0),
    }
}

/// The screen's area when drawn into a test buffer of `width` × `height`, as text lines.
#[cfg(test)]
fn render(view: &View, log: &[String], width: u16, height: u16) -> Vec<String> {
    let mut t = ratatui::Terminal::new(ratatui::backend::TestBackend::new(width, height)).unwrap();
    t.draw(|f| draw(f, view, &Extras { log })).unwrap();
    let buf = t.backend().buffer().clone();
    let area = buf.area;
    (0..area.height)
        .map(|y| {
            (0..area.width)
                .map(|x| buf[(x, y)].symbol().to_string())
                .collect::<String>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        report::{HolderRecord, Who},
        view::{GroupFailures, ProcessRecord, Totals},
    };

    fn view() -> View {
        View {
            ts: 1,
            hooks: "tracepoint".into(),
            destinations: vec![DestRecord {
                netns: 4026532281,
                saddr: "10.0.0.1".into(),
                daddr: "10.0.0.9".into(),
                dport: 443,
                range: Some(16),
                in_use: 16,
                outside_range: 0,
                utilization: Some(1.0),
                by_state: BTreeMap::from([("ESTABLISHED", 4), ("TIME_WAIT", 11), ("FIN_WAIT2", 1)]),
                top_holder: Some(HolderRecord {
                    pid: 42,
                    comm: "envoy".into(),
                    ports: 12,
                    time_wait: 11,
                    who: Who {
                        container_id: Some("3f4e1c2b5a6d7e8f".into()),
                        container_runtime: Some("containerd"),
                        ..Default::default()
                    },
                }),
                churn_per_s: Some(3.25),
                time_wait_per_s: Some(2.0),
                projected_in_use: Some(124),
                time_to_exhaustion_s: Some(0.0),
            }],
            processes: vec![ProcessRecord {
                pid: 42,
                comm: "envoy".into(),
                ports: 12,
                time_wait: 11,
                destinations: 1,
                who: Who {
                    cmdline: Some("envoy -c /etc/envoy.yaml".into()),
                    ..Default::default()
                },
            }],
            failures_by_group: vec![GroupFailures {
                group: "containerd://3f4e1c2b5a6d".into(),
                pod_uid: None,
                connect_eaddrnotavail: 7,
                bind_eaddrinuse: 0,
            }],
            totals: Totals {
                connect_eaddrnotavail: 7,
                tracked: 16,
                ..Default::default()
            },
        }
    }

    fn row<'a>(screen: &'a [String], needle: &str) -> &'a str {
        screen
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in\n{}", screen.join("\n")))
    }

    #[test]
    fn a_full_destination_shows_its_bar_states_rates_and_holder() {
        let s = render(&view(), &["a log line".into()], 160, 30);
        let d = row(&s, "10.0.0.1 -> 10.0.0.9:443");
        for want in [
            "██████████ 100%",
            "16/16",
            "FULL",
            "3.2",
            "envoy[42] 12",
            "containerd",
        ] {
            assert!(d.contains(want), "{want:?} missing from {d:?}");
        }
        // ESTAB 4, SYN 0, TW 11, OTHER 1 (the FIN_WAIT2).
        let cols: Vec<&str> = d.split_whitespace().collect();
        assert!(cols.windows(4).any(|w| w == ["4", "0", "11", "1"]), "{d}");
        assert!(row(&s, "EADDRNOTAVAIL 7").contains("q quit"));
        assert!(row(&s, "envoy -c /etc/envoy.yaml").contains("42"));
        assert!(row(&s, "containerd://3f4e1c2b5a6d").contains('7'));
        row(&s, "a log line");
    }

    #[test]
    fn repaired_sockets_show_beside_lost_and_missed_once_there_are_any() {
        let mut v = view();
        let s = render(&v, &[], 160, 30);
        assert!(!row(&s, "lost 0").contains("repaired"));
        v.totals.repaired = 3;
        let s = render(&v, &[], 160, 30);
        assert!(row(&s, "lost 0").contains("missed 0 · repaired 3"));
    }

    #[test]
    fn before_the_first_sample_it_says_so() {
        let s = render(&View::default(), &[], 100, 20);
        row(&s, "the first sample comes within a second");
    }

    #[test]
    fn a_small_terminal_does_not_panic() {
        for (w, h) in [(1, 1), (20, 5), (80, 10)] {
            render(&view(), &["x".into()], w, h);
        }
    }

    #[test]
    fn bar_and_times_read_right() {
        let text = |l: Line| {
            l.spans
                .iter()
                .map(|s| s.content.to_string())
                .collect::<String>()
        };
        assert_eq!(text(bar(Some(0.42))), "████░░░░░░  42%");
        assert_eq!(text(bar(None)), "?");
        assert_eq!(full_in(Some(0.0)), "FULL");
        assert_eq!(full_in(Some(0.1)), "<1s");
        assert_eq!(full_in(Some(45.2)), "45s");
        assert_eq!(full_in(Some(600.0)), "10m");
        assert_eq!(full_in(Some(36000.0)), "10h");
        assert_eq!(full_in(None), "-");
        assert_eq!(rate(Some(0.25)), "0.2");
        assert_eq!(rate(Some(1234.4)), "1234");
    }
}
