//! Writes records to stdout: JSON Lines with `--json`, readable lines otherwise. Logs never go
//! here (they go to stderr through `tracing`), so stdout stays machine-clean. Buffered; the trace
//! loop flushes once per ring-buffer drain, not per record.
use std::io::{self, BufWriter, Write};

use crate::report::{
    self, DestRecord, Exhaustion, Failure, HolderRecord, Record, Snapshot, Summary,
};

pub struct Output<W: Write> {
    json: bool,
    out: BufWriter<W>,
}

impl Output<io::Stdout> {
    pub fn stdout(json: bool) -> Self {
        Self::new(io::stdout(), json)
    }
}

impl<W: Write> Output<W> {
    pub fn new(w: W, json: bool) -> Self {
        Self {
            json,
            out: BufWriter::with_capacity(64 * 1024, w),
        }
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    pub fn record(&mut self, rec: &Record) -> io::Result<()> {
        if self.json {
            serde_json::to_writer(&mut self.out, rec)?;
            return self.out.write_all(b"\n");
        }
        match rec {
            // Human mode says this on stderr (a log line); stdout is for findings.
            Record::Started(_) => Ok(()),
            Record::ConnectFailed(f) => self.failure("connect", f),
            Record::BindFailed(f) => self.failure("bind", f),
            Record::Exhaustion(e) => self.exhaustion(e),
            Record::Summary(s) => self.summary(s),
            Record::Snapshot(s) => self.snapshot(s),
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    pub fn into_inner(self) -> Result<W, io::IntoInnerError<BufWriter<W>>> {
        self.out.into_inner()
    }

    fn failure(&mut self, what: &str, f: &Failure) -> io::Result<()> {
        let (addr, port, dir) = match (&f.daddr, f.dport, &f.saddr, f.sport) {
            (Some(a), Some(p), _, _) => (a.as_str(), p, "->"),
            (_, _, Some(a), Some(p)) => (a.as_str(), p, "on"),
            _ => ("?", 0, "->"),
        };
        write!(
            self.out,
            "{} {what}() FAILED {} ({})  {}[{}] {dir} {}  netns {}",
            clock(f.ts),
            f.error,
            f.errno,
            printable(&f.comm),
            f.pid,
            endpoint(addr, port),
            f.netns
        )?;
        if let (Some(_), Some(p)) = (&f.daddr, f.sport) {
            write!(self.out, "  socket bound to port {p}")?;
        }
        if let Some(p) = f.protocol.filter(|p| *p != "tcp") {
            write!(self.out, "  {p} socket")?;
        }
        if f.failures > 1 {
            write!(self.out, "  ({} failures since its last line)", f.failures)?;
        }
        writeln!(self.out)
    }

    fn exhaustion(&mut self, e: &Exhaustion) -> io::Result<()> {
        let (what, count) = match (&e.saddr, &e.daddr, e.dport) {
            (Some(s), Some(d), Some(p)) => (
                format!("{s} -> {}", endpoint(d, p)),
                format!("{} in use", used(e.in_use, e.range, e.utilization)),
            ),
            // A connect() failure to a destination the table holds no port to.
            (None, Some(d), Some(p)) => (
                format!("-> {}", endpoint(d, p)),
                "no port to it tracked (held by sockets the agent has not seen, or by bind())"
                    .to_string(),
            ),
            _ => (
                "whole netns (bind)".to_string(),
                format!("{} in use", used(e.in_use, e.range, e.utilization)),
            ),
        };
        // A bound victim searched no port: what failed it is one 4-tuple, not the range.
        let headline = match e.victim.sport {
            Some(_) => "BOUND PORT IN USE",
            None => "PORTS EXHAUSTED",
        };
        writeln!(
            self.out,
            "{} {headline} netns {}  {what}  {count}  {}",
            clock(e.ts),
            e.netns,
            states(&e.by_state)
        )?;
        if let (Some([lo, hi]), Some(reuse)) = (e.port_range, e.tw_reuse) {
            writeln!(
                self.out,
                "           range {lo}-{hi}, tcp_tw_reuse={reuse}; {} failure(s) since last report",
                e.failures
            )?;
        }
        if e.lost + e.missed > 0 {
            writeln!(
                self.out,
                "           counts may be low: {} events lost, {} program runs missed since start",
                e.lost, e.missed
            )?;
        }
        let mut victim = format!("{}[{}]", printable(&e.victim.comm), e.victim.pid);
        if let Some(p) = e.victim.sport {
            victim.push_str(&format!(" (its socket bound to port {p})"));
        }
        writeln!(self.out, "           victim:  {victim}")?;
        if e.holders.is_empty() {
            writeln!(self.out, "           holders: none tracked")?;
        }
        for (i, h) in e.holders.iter().take(5).enumerate() {
            let label = if i == 0 { "holders:" } else { "        " };
            writeln!(self.out, "           {label} {}", holder(h))?;
        }
        if e.holders.len() > 5 {
            writeln!(
                self.out,
                "                    … {} more",
                e.holders.len() - 5
            )?;
        }
        for (i, f) in e.explain.iter().enumerate() {
            let label = if i == 0 { "explain:" } else { "        " };
            writeln!(
                self.out,
                "           {label} {} ({})",
                f.finding, f.evidence
            )?;
            writeln!(self.out, "                    fix: {}", f.fix)?;
        }
        Ok(())
    }

    fn summary(&mut self, s: &Summary) -> io::Result<()> {
        writeln!(
            self.out,
            "{} {}tracked {} ports, {} connect failures, lost {} events, missed {}{}",
            clock(s.ts),
            if s.is_final { "FINAL: " } else { "" },
            s.tracked,
            s.connect_failures,
            s.lost,
            s.missed,
            {
                let mut extra = String::new();
                if s.decode_errors > 0 {
                    extra += &format!(", {} undecodable", s.decode_errors);
                }
                if s.evicted + s.over_limit > 0 {
                    extra += &format!(
                        ", {} evicted and {} not tracked at --max-sockets",
                        s.evicted, s.over_limit
                    );
                }
                if s.output_dropped > 0 {
                    extra += &format!(
                        ", {} output lines dropped (stdout did not keep up)",
                        s.output_dropped
                    );
                }
                extra
            }
        )?;
        self.table(&s.destinations)
    }

    fn snapshot(&mut self, s: &Snapshot) -> io::Result<()> {
        writeln!(
            self.out,
            "{} snapshot: {} client ports in use in {} network namespaces{}",
            clock(s.ts),
            s.sockets,
            s.namespaces,
            if s.skipped.is_empty() {
                String::new()
            } else {
                format!(" ({} could not be read)", s.skipped.len())
            }
        )?;
        self.table(&s.destinations)
    }

    fn table(&mut self, destinations: &[DestRecord]) -> io::Result<()> {
        if destinations.is_empty() {
            return Ok(());
        }
        writeln!(
            self.out,
            "  {:<11} {:<40} {:>11} {:>5}  {:<28} TOP HOLDER",
            "NETNS", "SOURCE -> DESTINATION", "USED/RANGE", "UTIL", "STATES"
        )?;
        for d in destinations {
            self.destination(d)?;
        }
        Ok(())
    }

    fn destination(&mut self, d: &DestRecord) -> io::Result<()> {
        let range = d.range.map_or("?".to_string(), |r| r.to_string());
        let util = d
            .utilization
            .map_or("?".to_string(), |u| format!("{}%", report::percent(u)));
        writeln!(
            self.out,
            "  {:<11} {:<40} {:>11} {:>5}  {:<28} {}",
            d.netns,
            format!("{} -> {}", d.saddr, endpoint(&d.daddr, d.dport)),
            format!("{}/{}", d.in_use, range),
            util,
            states(&d.by_state),
            d.top_holder.as_ref().map_or(String::new(), holder)
        )
    }
}

pub(crate) fn endpoint(addr: &str, port: u16) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

fn used(in_use: u32, range: Option<u32>, util: Option<f64>) -> String {
    match (range, util) {
        (Some(r), Some(u)) => format!("{in_use}/{r} ({}%)", report::percent(u)),
        // Every port of the range reserved: known, and nothing connect() may pick.
        (Some(0), _) => format!("{in_use}/0 (no usable port in the range)"),
        _ => format!("{in_use}/? (range unknown)"),
    }
}

fn states(by_state: &std::collections::BTreeMap<&'static str, u32>) -> String {
    by_state
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn holder(h: &HolderRecord) -> String {
    let who = if h.pid == 0 {
        printable(&h.comm).into_owned()
    } else {
        format!("{}[{}]", printable(&h.comm), h.pid)
    };
    let mut line = if h.time_wait > 0 {
        format!("{who} {} ports ({} TIME_WAIT)", h.ports, h.time_wait)
    } else {
        format!("{who} {} ports", h.ports)
    };
    if let Some(place) = h.who.short() {
        line += &format!("  [{}]", printable(&place));
    }
    line
}

/// `s` with control characters shown as `?`: a process names itself (prctl(PR_SET_NAME)) and
/// its cgroups, and an escape sequence or a line break in a name must not reach the terminal
/// of whoever reads the table. (JSON escapes them; `top` filters them.)
fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect::<String>()
            .into()
    } else {
        s.into()
    }
}

/// `HH:MM:SS` UTC of a Unix-nanosecond timestamp.
fn clock(ts_ns: u64) -> String {
    let s = ts_ns / 1_000_000_000;
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Started, Victim};

    fn failure() -> Failure {
        Failure {
            pid: 7,
            tid: 7,
            comm: "victim".into(),
            errno: 99,
            error: "EADDRNOTAVAIL",
            family: "ipv4",
            protocol: Some("tcp"),
            daddr: Some("10.1.2.3".into()),
            dport: Some(443),
            saddr: None,
            sport: None,
            netns: 1,
            ts: 3_600_000_000_000 + 61_000_000_000,
            failures: 1,
            who: Default::default(),
        }
    }

    fn render(json: bool, recs: &[Record]) -> String {
        let mut o = Output::new(Vec::new(), json);
        for r in recs {
            o.record(r).unwrap();
        }
        String::from_utf8(o.into_inner().unwrap()).unwrap()
    }

    #[test]
    fn json_mode_is_one_object_per_line() {
        let text = render(
            true,
            &[
                Record::ConnectFailed(failure()),
                Record::Started(Started {
                    hooks: "tracepoint".into(),
                    attached: vec![],
                    seeded: 0,
                    ts: 1,
                }),
            ],
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        for l in lines {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(v["type"].is_string());
        }
    }

    #[test]
    fn human_failure_line_names_process_and_destination() {
        let text = render(false, &[Record::ConnectFailed(failure())]);
        assert_eq!(
            text,
            "01:01:01 connect() FAILED EADDRNOTAVAIL (99)  victim[7] -> 10.1.2.3:443  netns 1\n"
        );
        let storm = Failure {
            failures: 4000,
            ..failure()
        };
        let text = render(false, &[Record::ConnectFailed(storm)]);
        assert!(
            text.ends_with("netns 1  (4000 failures since its last line)\n"),
            "{text}"
        );
        let bound = Failure {
            sport: Some(30000),
            ..failure()
        };
        let text = render(false, &[Record::ConnectFailed(bound)]);
        assert!(
            text.ends_with("-> 10.1.2.3:443  netns 1  socket bound to port 30000\n"),
            "{text}"
        );
        let udp_bind = Failure {
            error: "EADDRINUSE",
            errno: 98,
            protocol: Some("udp"),
            daddr: None,
            dport: None,
            saddr: Some("0.0.0.0".into()),
            sport: Some(0),
            ..failure()
        };
        let text = render(false, &[Record::BindFailed(udp_bind)]);
        assert_eq!(
            text,
            "01:01:01 bind() FAILED EADDRINUSE (98)  victim[7] on 0.0.0.0:0  netns 1  udp socket\n"
        );
    }

    #[test]
    fn control_characters_in_names_do_not_reach_the_terminal() {
        assert_eq!(printable("curl"), "curl");
        assert_eq!(printable("\x1b[2Jevil\nline"), "?[2Jevil?line");
        let h = HolderRecord {
            pid: 5,
            comm: "a\x1b]0;x\x07".into(),
            ports: 1,
            time_wait: 0,
            who: crate::report::Who {
                cgroup: Some("/x\ny".into()),
                ..Default::default()
            },
        };
        let line = holder(&h);
        assert!(!line.chars().any(char::is_control), "{line:?}");
    }

    #[test]
    fn a_connect_failure_to_a_destination_with_no_port_tracked_says_so() {
        let e = Exhaustion {
            saddr: None,
            daddr: Some("10.0.0.2".into()),
            dport: Some(443),
            in_use: 0,
            utilization: None,
            by_state: Default::default(),
            holders: vec![],
            explain: vec![],
            ..hog_exhaustion()
        };
        let text = render(false, &[Record::Exhaustion(e)]);
        assert!(
            text.contains("PORTS EXHAUSTED netns 1  -> 10.0.0.2:443  no port to it tracked"),
            "{text}"
        );
        assert!(
            !text.contains("whole netns") && !text.contains("0%"),
            "{text}"
        );
    }

    /// A hog holding all 16 ports of `::1 -> [::1]:9000`, and a victim.
    fn hog_exhaustion() -> Exhaustion {
        Exhaustion {
            netns: 1,
            saddr: Some("::1".into()),
            daddr: Some("::1".into()),
            dport: Some(9000),
            range: Some(16),
            in_use: 16,
            outside_range: 0,
            utilization: Some(1.0),
            by_state: [("ESTABLISHED", 16)].into_iter().collect(),
            holders: vec![HolderRecord {
                pid: 5,
                comm: "hog".into(),
                ports: 16,
                time_wait: 0,
                who: crate::report::Who {
                    container_id: Some("3f4e1c2b5a6d".repeat(5) + "3f4e"),
                    container_runtime: Some("docker"),
                    ..Default::default()
                },
            }],
            victim: Victim {
                pid: 7,
                tid: 7,
                comm: "victim".into(),
                sport: None,
                who: Default::default(),
            },
            explain: vec![crate::advice::Finding {
                finding: "the ephemeral port range is narrower than Linux's default".into(),
                evidence: "16 usable ports".into(),
                fix: "widen it".into(),
            }],
            port_range: Some([40000, 40015]),
            tw_reuse: Some(0),
            failures: 1,
            lost: 0,
            missed: 0,
            ts: 0,
        }
    }

    #[test]
    fn human_exhaustion_lists_victim_and_holders() {
        let e = hog_exhaustion();
        let text = render(false, &[Record::Exhaustion(e.clone())]);
        assert!(
            text.contains("::1 -> [::1]:9000  16/16 (100%) in use  ESTABLISHED 16"),
            "{text}"
        );
        assert!(text.contains("victim:  victim[7]"), "{text}");
        assert!(text.contains("holders: hog[5] 16 ports"), "{text}");
        assert!(!text.contains("counts may be low"), "{text}");
        assert!(
            text.contains("explain: the ephemeral port range is narrower")
                && text.contains("fix: widen it"),
            "{text}"
        );
        assert!(text.contains(" PORTS EXHAUSTED netns 1 "), "{text}");
        let lossy = Exhaustion {
            lost: 3,
            ..e.clone()
        };
        let text = render(false, &[Record::Exhaustion(lossy)]);
        assert!(
            text.contains("counts may be low: 3 events lost, 0 program runs missed since start"),
            "{text}"
        );
        // A bound victim's connect() searched no port: one 4-tuple failed it, not the range.
        let bound = Exhaustion {
            victim: Victim {
                sport: Some(30000),
                ..e.victim.clone()
            },
            ..e
        };
        let text = render(false, &[Record::Exhaustion(bound)]);
        assert!(text.contains(" BOUND PORT IN USE netns 1 "), "{text}");
        assert!(
            text.contains("victim:  victim[7] (its socket bound to port 30000)"),
            "{text}"
        );
    }

    #[test]
    fn a_range_with_every_port_reserved_is_known_and_empty() {
        // report::utilization is None for a range of 0: the line must not say "unknown".
        assert_eq!(used(3, Some(0), None), "3/0 (no usable port in the range)");
        assert_eq!(used(3, None, None), "3/? (range unknown)");
        assert_eq!(used(8, Some(16), Some(0.5)), "8/16 (50%)");
    }
}
