//! `portx-agent trace`: the event loop. Kernel -> ring buffer -> decoder -> tracker -> report ->
//! output, plus the periodic work (TIME_WAIT ageing, summary, sock_diag resync) and a clean exit
//! on SIGINT/SIGTERM (final summary; dropping the `Ebpf` detaches every program).
use std::{
    cmp::Reverse,
    collections::{HashMap, HashSet},
    io,
    sync::Arc,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use portx_common::{
    drops, names, Connecting, FailureCount, FailureKey, EADDRINUSE, EADDRNOTAVAIL,
    FAILURE_RECORD_GAP_NS, FAILURE_WAKE_GAP_NS,
};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{oneshot, watch},
};

use crate::{
    btf, clock,
    connect_notes::{self, StuckConnects},
    decoder::{self, Event, SyscallFailure, Tally, Task},
    failure_counts::FailureCounts,
    failure_lines::{self, FailureLines},
    filter::Filter,
    forecast::Rates,
    identity::Identities,
    loader::{self, HookChoice, HookMode, LoadOptions, StateHookChoice},
    metrics_server,
    output::Output,
    privilege, prog_stats,
    ranges::Ranges,
    reader::Reader,
    report::{self, DestRecord, HolderRecord, Record, Started, Summary, Who},
    ring::Ring,
    seed, stdout_thread,
    sysctl::PortSettings,
    tracefs,
    tracker::{DestKey, DestStats, Map, Target, Tracker},
    view::{GroupFailures, ProcessRecord, Totals, View, MAX_GROUPS},
};

#[derive(Debug, Clone)]
pub struct TraceOptions {
    pub json: bool,
    pub hooks: HookChoice,
    pub state_hook: StateHookChoice,
    /// Only these network namespaces (inode numbers); all when empty.
    pub netns: Vec<u32>,
    pub interval: Duration,
    pub top: usize,
    pub resync: Duration,
    pub ring_bytes: Option<u32>,
    pub duration: Option<Duration>,
    pub seed: bool,
    /// Minimum time between two exhaustion reports for one destination.
    pub report_every: Duration,
    /// Minimum time between two failure lines of one process, destination and errno (see
    /// [`failure_lines`]); zero: a line for every failure.
    pub failure_line_every: Duration,
    /// Most sockets the tracker keeps (see [`Tracker::with_limit`]).
    pub max_sockets: usize,
    /// What the records on stdout are restricted to (`--pid`, `--comm`, `--dport`).
    pub filter: Filter,
    /// Whether each [`View`] is restricted by `filter` too: `top`'s screen is (it shows what
    /// was asked for), `/metrics` is not (alerts on other destinations must not go quiet, and its
    /// failure counters are everyone's).
    pub view_filtered: bool,
    /// Destinations and processes in each [`View`] (at least `top`).
    pub view_top: usize,
    /// Serve metrics there (see [`crate::metrics_server`]).
    pub metrics: Option<std::net::SocketAddr>,
    /// Destinations with their own series in the metrics.
    pub metrics_top: usize,
}

impl Default for TraceOptions {
    fn default() -> Self {
        Self {
            json: false,
            hooks: HookChoice::Auto,
            state_hook: StateHookChoice::Auto,
            netns: Vec::new(),
            interval: Duration::from_secs(5),
            top: 10,
            resync: Duration::from_secs(10),
            ring_bytes: None,
            duration: None,
            seed: true,
            report_every: Duration::from_secs(1),
            failure_line_every: Duration::from_secs(1),
            max_sockets: crate::cli::DEFAULT_MAX_SOCKETS as usize,
            filter: Filter::default(),
            view_filtered: false,
            view_top: 0,
            metrics: None,
            metrics_top: 20,
        }
    }
}

/// What a run talks to besides stdout.
#[derive(Default)]
pub struct Links {
    /// Told once everything is attached and seeded.
    pub ready: Option<oneshot::Sender<()>>,
    /// A screen (`portx-agent top`): gets a [`View`] each [`VIEW_EVERY`], and stdout gets no
    /// records (the screen owns the terminal).
    pub screen: Option<watch::Sender<Arc<View>>>,
}

/// How often rates are sampled and a [`View`] is published.
pub const VIEW_EVERY: Duration = Duration::from_secs(1);

/// A namespace is dumped for connects waiting in SYN_SENT (see `connect_notes`) no sooner than
/// this after the last dump of any kind began: during an outage that keeps blocking connects
/// waiting, each dump's /proc scan is paid at most this often, not once a second.
const STUCK_DUMP_GAP: Duration = Duration::from_secs(2);
/// Each [`VIEW_EVERY`], the identities of the top holders of the busiest destinations are read
/// (cached) while those processes are alive.
const PREFETCH_DESTS: usize = 10;
const PREFETCH_HOLDERS: usize = 3;
/// Namespaces with bind-before-connect evidence kept (cleared past it).
const MAX_BIND_EVIDENCE_NETNS: usize = 256;

/// Counters of the whole run.
#[derive(Default)]
struct Counters {
    events: u64,
    /// connect()/bind() failure records (any errno).
    failure_records: u64,
    decode_errors: u64,
    connect_failures: u64,
    /// bind() failures with EADDRINUSE.
    bind_failures: u64,
    /// Other connect()/bind() failures.
    other_failures: u64,
    lost: u64,
    /// Runs of portx's programs the kernel skipped (`prog_stats`).
    skipped: u64,
    /// Runs of portx's programs that gave up (`DROPS[GAVE_UP]`).
    gave_up: u64,
    /// Sockets a resync found held in a live state the kernel no longer reports
    /// ([`seed::Applied::repaired`]).
    repaired: u64,
}

impl Counters {
    /// Program runs that saw nothing, what the summaries call `missed`: skipped by the
    /// kernel, or given up.
    fn missed(&self) -> u64 {
        self.skipped + self.gave_up
    }
}

/// Rate limit of exhaustion reports, per destination.
#[derive(Default)]
struct LastReport {
    at_ns: u64,
    failures_since: u64,
    /// The last failure counted here (monotonic ns), for [`prune_reports`].
    touched_ns: u64,
}

/// Failures left in a destination's tally this long after its last one are dropped with it:
/// a report that much later would mislabel them as recent (they are in the summaries' counts).
const REPORT_TALLY_KEPT: Duration = Duration::from_secs(600);

struct Session<W: io::Write> {
    opts: TraceOptions,
    hooks: String,
    identities: Identities,
    rates: Rates,
    groups: Map<String, GroupFailures>,
    /// Processes seen failing bind(0) with EADDRINUSE, per netns (bind-before-connect).
    bind_zero: HashMap<u32, Vec<(u32, String)>>,
    /// `--netns` (looked up per record: foldhash, like the tracker's maps, not SipHash).
    filter: HashSet<u32, foldhash::fast::RandomState>,
    tracker: Tracker,
    ranges: Ranges,
    out: Output<W>,
    counters: Counters,
    reports: Map<Target, LastReport>,
    bind_reports: Map<u32, LastReport>,
    failure_lines: FailureLines,
    failure_counts: FailureCounts,
    /// The kernel's counts of failing connects (None in tests).
    failure_map: Option<BpfHashMap<MapData, FailureKey, FailureCount>>,
    /// A write to stdout failed (reader gone): stop.
    broken: Option<io::Error>,
    /// The kernel's per-CPU count of records it could not write (None in tests).
    drop_map: Option<PerCpuArray<MapData, u64>>,
    /// Lines the stdout thread dropped (None when writing directly).
    output_dropped: Option<stdout_thread::DroppedLines>,
    /// `output_dropped` as last warned about.
    output_dropped_warned: u64,
}

impl<W: io::Write> Session<W> {
    fn emit(&mut self, rec: &Record) {
        if self.broken.is_none() {
            if let Err(e) = self.out.record(rec) {
                self.broken = Some(e);
            }
        }
    }

    /// Lines of output dropped since start; warns on stderr when more were.
    fn output_dropped_now(&mut self) -> u64 {
        let n = self.output_dropped.as_ref().map_or(0, |d| d.get());
        if n > self.output_dropped_warned {
            tracing::warn!(
                "stdout is not keeping up (its reader stopped reading?): {n} lines of output dropped since start"
            );
            self.output_dropped_warned = n;
        }
        n
    }

    /// Records lost since start, read from the kernel now (and the runs that gave up, into
    /// `missed`).
    fn lost_now(&mut self) -> u64 {
        if let Some(map) = &self.drop_map {
            let [ring_full, gave_up] = drop_counts(map);
            let c = &mut self.counters;
            c.lost = c.lost.max(ring_full);
            c.gave_up = c.gave_up.max(gave_up);
        }
        self.counters.lost
    }

    /// An exhaustion report with the loss so far, so that its reader knows how far to trust it,
    /// and who its processes are.
    fn emit_exhaustion(&mut self, mut rec: report::Exhaustion) {
        rec.lost = self.lost_now();
        rec.missed = self.counters.missed();
        rec.victim.who = self.who(rec.victim.pid);
        self.name_holders(&mut rec.holders);
        self.emit(&Record::Exhaustion(rec));
    }

    fn wanted(&self, netns: u32) -> bool {
        self.filter.is_empty() || self.filter.contains(&netns)
    }

    fn handle(&mut self, buf: &[u8]) {
        self.counters.events += 1;
        let event = match decoder::decode(buf) {
            Ok(e) => e,
            Err(e) => {
                self.counters.decode_errors += 1;
                if self.counters.decode_errors <= 10 {
                    tracing::warn!("skipping an undecodable record: {e}");
                }
                return;
            }
        };
        match event {
            Event::State(s) if self.wanted(s.netns) => self.tracker.on_state(&s),
            Event::Port(p) if self.wanted(p.netns) => self.tracker.on_port(&p),
            Event::ConnectFailed(f) => {
                self.counters.failure_records += 1;
                self.tracker.on_connect_failed(&f);
                let failures = match f.tally {
                    Tally::Alone => 1,
                    Tally::Counted {
                        key,
                        count,
                        born_ns,
                    } => self
                        .failure_counts
                        .on_record(key, count, born_ns, f.task, f.bound_port),
                };
                if self.wanted(f.netns) {
                    self.count_failure(&f, true, failures);
                    if self.opts.filter.failure(&f, true) {
                        self.connect_failed(&f, failures);
                    }
                }
            }
            Event::BindFailed(f) => {
                self.counters.failure_records += 1;
                if self.wanted(f.netns) {
                    self.count_failure(&f, false, 1);
                    if self.opts.filter.failure(&f, false) {
                        self.bind_failed(&f);
                    }
                }
            }
            _ => {}
        }
    }

    /// Who `pid` is (cached; see [`Identities`]).
    fn who(&mut self, pid: u32) -> Who {
        self.identities
            .get(pid, clock::monotonic_ns())
            .map(|id| Who::from(&*id))
            .unwrap_or_default()
    }

    fn name_holders(&mut self, holders: &mut [HolderRecord]) {
        for h in holders {
            h.who = self.who(h.pid);
        }
    }

    /// Counts `failures` failures like `f` in the run's totals and in its process' group
    /// (container or cgroup).
    fn count_failure(&mut self, f: &SyscallFailure, connect: bool, failures: u64) {
        if failures == 0 {
            return;
        }
        // As `bind_failed` has it: only a TCP socket's port-0 bind() says the ports are gone;
        // one to a fixed port says that port is taken.
        let exhausted = if connect {
            f.errno == EADDRNOTAVAIL
        } else {
            f.errno == EADDRINUSE && f.port == 0 && f.takes_tcp_ports()
        };
        if !exhausted {
            self.counters.other_failures += failures;
            return;
        }
        if connect {
            self.counters.connect_failures += failures;
        } else {
            self.counters.bind_failures += failures;
        }
        // No allocation per failure: the group string is computed once per process read.
        let id = self.identities.get(f.task.pid, f.ts_ns);
        let mut group = id.as_deref().map_or("unknown", |i| i.group.as_str());
        if !self.groups.contains_key(group) {
            if self.groups.len() >= MAX_GROUPS - 1 {
                group = "other";
            }
            if !self.groups.contains_key(group) {
                self.groups.insert(
                    group.to_string(),
                    GroupFailures {
                        group: group.to_string(),
                        pod_uid: id
                            .as_ref()
                            .filter(|_| group != "other")
                            .and_then(|i| i.pod_uid.clone()),
                        ..Default::default()
                    },
                );
            }
        }
        let Some(entry) = self.groups.get_mut(group) else {
            return;
        };
        if connect {
            entry.connect_eaddrnotavail += failures;
        } else {
            entry.bind_eaddrinuse += failures;
        }
    }

    /// Reads the kernel's failure counts (after the rings were drained) and accounts what no
    /// record brought: a key's failures after its last record. Deletes the entries of processes
    /// that are gone, once read, and idle ones when the map is half full.
    fn read_failure_counts(&mut self) {
        let Some(map) = &mut self.failure_map else {
            return;
        };
        let entries = match map.iter().collect::<Result<Vec<_>, _>>() {
            Ok(entries) => entries,
            Err(e) => {
                // Read again in a second; nothing is lost meanwhile (the kernel only adds).
                tracing::warn!("reading the kernel's failure counts: {e}");
                return;
            }
        };
        let now = clock::monotonic_ns();
        let reading = self.failure_counts.read(entries, crate::procfs::gone, now);
        for key in &reading.delete {
            // Looked up again first: the reading and the /proc checks took milliseconds, and
            // failures counted meanwhile would go with the entry.
            match map.get(key, 0) {
                Ok(now) if self.failure_counts.accounted(key) == Some((now.count, now.born_ns)) => {
                }
                Ok(_) => continue,
                Err(_) => {}
            }
            match map.remove(key) {
                Ok(()) => self.failure_counts.deleted(key),
                Err(e) => tracing::debug!("deleting a failure count: {e}"),
            }
        }
        for u in reading.unaccounted {
            let Ok(addr) = decoder::ip_from(u.key.family, &u.key.daddr) else {
                continue;
            };
            let f = SyscallFailure {
                ts_ns: now,
                task: u.task.unwrap_or(Task {
                    pid: u.key.tgid,
                    tid: 0,
                    comm: Default::default(),
                }),
                skaddr: 0,
                netns: u.key.netns,
                errno: u.key.ret.saturating_neg(),
                addr,
                port: u.key.dport,
                tally: Tally::Alone,
                protocol: Some(portx_common::IPPROTO_TCP),
                // A bound key's failures show its latest record's port; with no record read
                // (its first lost), they are shown, and lined, as unbound ones.
                bound_port: u.bound_port,
            };
            if !self.wanted(f.netns) {
                continue;
            }
            self.count_failure(&f, true, u.failures);
            if f.errno == EADDRNOTAVAIL {
                // Into the destination's next report (the records bring the reports).
                let entry = self.reports.entry(Target::of_connect(&f)).or_default();
                entry.failures_since += u.failures;
                entry.touched_ns = now;
            }
            if self.opts.filter.failure(&f, true) {
                if let Some(line) = self.failure_lines.on_unrecorded(&f, true, u.failures) {
                    self.failure_line(&line);
                }
            }
        }
    }

    /// A `connect_failed` or `bind_failed` line.
    fn failure_line(&mut self, line: &failure_lines::Line) {
        let f = &line.failure;
        let mut rec = report::failure(f, line.connect, clock::wall_ns(f.ts_ns));
        rec.failures = line.failures;
        rec.who = self.who(f.task.pid);
        self.emit(&if line.connect {
            Record::ConnectFailed(rec)
        } else {
            Record::BindFailed(rec)
        });
    }

    /// Lines for failures still without one (see [`FailureLines::flush`]).
    fn flush_failure_lines(&mut self, all: bool) {
        for line in self.failure_lines.flush(clock::monotonic_ns(), all) {
            self.failure_line(&line);
        }
    }

    /// A connect failure record standing for `failures` failures (0: a reading of the kernel's
    /// counts accounted them first; the record still tells that the destination is failing).
    fn connect_failed(&mut self, f: &SyscallFailure, failures: u64) {
        let ts = clock::wall_ns(f.ts_ns);
        if let Some(line) = self.failure_lines.on_failure(f, true, failures) {
            self.failure_line(&line);
        }
        if f.errno != EADDRNOTAVAIL {
            return;
        }
        let target = Target::of_connect(f);
        let Some(failures) = due(
            &mut self.reports,
            target,
            f.ts_ns,
            self.opts.report_every,
            failures,
        ) else {
            return;
        };
        let settings = self.port_settings(f.netns, Some(f.task.pid), true);
        let busiest = self.tracker.busiest_for(&target);
        let nothing = DestStats::default();
        let (scope, stats) = match &busiest {
            Some((key, stats)) => (report::Scope::Destination(key), *stats),
            // Nothing tracked for this destination: say so rather than invent holders. The
            // ports may be held by bind() or by sockets older than the agent.
            None => (report::Scope::Untracked(f.addr, f.port), &nothing),
        };
        let rec = report::exhaustion(
            f.netns,
            scope,
            stats,
            settings.as_ref(),
            &f.task,
            f.bound(),
            failures,
            ts,
            self.bind_zero.get(&f.netns).map_or(&[][..], Vec::as_slice),
        );
        self.emit_exhaustion(rec);
    }

    fn bind_failed(&mut self, f: &SyscallFailure) {
        let ts = clock::wall_ns(f.ts_ns);
        if let Some(line) = self.failure_lines.on_failure(f, false, 1) {
            self.failure_line(&line);
        }
        if f.errno != EADDRINUSE || f.port != 0 || !f.takes_tcp_ports() {
            // Only a TCP socket's port-0 bind() says the namespace's TCP ports are gone (a UDP
            // socket's says its UDP ports are, which the table does not hold).
            return;
        }
        // Evidence of bind-before-connect for this netns' reports, a few processes each.
        if self.bind_zero.len() >= MAX_BIND_EVIDENCE_NETNS && !self.bind_zero.contains_key(&f.netns)
        {
            self.bind_zero.clear();
        }
        let seen = self.bind_zero.entry(f.netns).or_default();
        if seen.len() < 8 && !seen.iter().any(|(pid, _)| *pid == f.task.pid) {
            seen.push((f.task.pid, f.task.comm.to_string()));
        }
        let Some(failures) = due(
            &mut self.bind_reports,
            f.netns,
            f.ts_ns,
            self.opts.report_every,
            1,
        ) else {
            return;
        };
        let settings = self.port_settings(f.netns, Some(f.task.pid), true);
        let usage = self.tracker.netns_usage(f.netns);
        let rec = report::exhaustion(
            f.netns,
            report::Scope::Namespace,
            &usage,
            settings.as_ref(),
            &f.task,
            None,
            failures,
            ts,
            self.bind_zero.get(&f.netns).map_or(&[][..], Vec::as_slice),
        );
        self.emit_exhaustion(rec);
    }

    /// The port settings of `netns` (re-read if older than a second when `fresh`), also handed
    /// to the tracker, whose `outside_range` counts follow them.
    fn port_settings(
        &mut self,
        netns: u32,
        hint_pid: Option<u32>,
        fresh: bool,
    ) -> Option<PortSettings> {
        let settings = if fresh {
            self.ranges.current(netns, hint_pid)
        } else {
            self.ranges.get(netns, hint_pid)
        }
        .cloned();
        if let Some(s) = &settings {
            self.tracker.set_port_settings(netns, s);
        }
        settings
    }

    /// The port settings a sock_diag pass read in each namespace it dumped; namespaces it was
    /// for and did not see (gone) are forgotten. Those it was not for (the dump for connects
    /// left waiting is for their namespaces only) keep theirs: forgotten, each was read again
    /// on the event loop, with a /proc scan to find it.
    fn take_port_settings(&mut self, pass: &seed::Pass) {
        for snap in &pass.snapshots {
            // The tracker gets every namespace's, in use or not: a storm's first closes in a
            // namespace with no port in use yet must already meet its tcp_max_tw_buckets.
            if let Some(settings) = &snap.settings {
                self.tracker.set_port_settings(snap.netns, settings);
            }
            self.ranges.set(snap.netns, snap.settings.clone());
        }
        let seen: HashSet<u32> = pass
            .snapshots
            .iter()
            .map(|s| s.netns)
            .chain(pass.skipped.iter().map(|(id, _)| *id))
            .collect();
        let kept = |id: u32| seen.contains(&id) || !pass.covers(id);
        self.ranges.retain(kept);
        self.tracker.retain_port_settings(kept);
        self.sync_port_settings();
    }

    /// The settings of every namespace with a destination in use (read once, then taken from
    /// each sock_diag pass), handed to the tracker before its counts are reported or sampled.
    fn sync_port_settings(&mut self) {
        for netns in self.tracker.namespaces() {
            self.port_settings(netns, None, false);
        }
    }

    /// The `n` destinations with the most ports in use (that pass the filter if `filtered`),
    /// most first.
    fn top_dests(&self, n: usize, filtered: bool) -> Vec<(DestKey, DestStats)> {
        let mut v: Vec<(DestKey, &DestStats)> = self
            .tracker
            .dests()
            .filter(|(k, s)| !filtered || self.opts.filter.dest(k, s))
            .collect();
        v.sort_by_key(|(k, d)| (Reverse(d.in_use), *k));
        v.into_iter().take(n).map(|(k, s)| (k, s.clone())).collect()
    }

    /// A destination's record with its forecast and its top holder named.
    fn dest_record(&mut self, key: &DestKey, stats: &DestStats) -> DestRecord {
        let settings = self.ranges.get(key.netns, None).cloned();
        let mut rec = report::destination(key, stats, settings.as_ref());
        let reuse_after_s = settings.as_ref().and_then(|s| {
            s.time_wait_reusable_after_s(key.daddr.is_loopback() || key.saddr.is_loopback())
        });
        let max_time_wait = settings.as_ref().and_then(|s| s.max_tw_buckets);
        if let Some(f) = self
            .rates
            .forecast(key, stats, rec.range, reuse_after_s, max_time_wait)
        {
            rec.churn_per_s = Some(f.churn_per_s);
            rec.time_wait_per_s = Some(f.time_wait_per_s);
            rec.projected_in_use = Some(f.projected_in_use);
            rec.time_to_exhaustion_s = f.time_to_exhaustion_s;
        }
        if let Some(h) = rec.top_holder.as_mut() {
            h.who = self.who(h.pid);
        }
        rec
    }

    fn summary(&mut self, is_final: bool) {
        let now = clock::monotonic_ns();
        self.tracker.expire(now);
        prune_reports(&mut self.reports, now, self.opts.report_every);
        prune_reports(&mut self.bind_reports, now, self.opts.report_every);
        self.sync_port_settings();
        let destinations = self
            .top_dests(self.opts.top, true)
            .iter()
            .map(|(k, s)| self.dest_record(k, s))
            .collect();
        let rec = Record::Summary(Summary {
            destinations,
            tracked: self.tracker.tracked(),
            pending: self.tracker.pending(),
            events: self.counters.events,
            lost: self.counters.lost,
            missed: self.counters.missed(),
            gave_up: self.counters.gave_up,
            repaired: self.counters.repaired,
            decode_errors: self.counters.decode_errors,
            untracked: self.tracker.counters.untracked,
            evicted: self.tracker.counters.evicted,
            over_limit: self.tracker.counters.over_limit,
            connect_failures: self.counters.connect_failures,
            output_dropped: self.output_dropped_now(),
            is_final,
            ts: clock::wall_ns(clock::monotonic_ns()),
        });
        self.emit(&rec);
    }

    /// Samples the rates; builds a [`View`] when `publish`.
    fn tick_view(&mut self, publish: bool) -> Option<View> {
        let now = clock::monotonic_ns();
        self.tracker.expire(now);
        self.tracker.sweep_idle(now);
        self.sync_port_settings();
        self.rates.sample(now, self.tracker.kept_dests());
        // Learn who the likely culprits are while they are alive: a churner that exits before a
        // report would otherwise be named by pid and comm only.
        let culprits: Vec<u32> = self
            .tracker
            .top(PREFETCH_DESTS)
            .iter()
            .flat_map(|(_, s)| s.holders_ranked().into_iter().take(PREFETCH_HOLDERS))
            .map(|(pid, _)| pid)
            .collect();
        for pid in culprits {
            self.identities.get(pid, now);
        }
        if !publish {
            return None;
        }
        let n = self.opts.view_top.max(self.opts.top);
        let filtered = self.opts.view_filtered;
        let destinations = self
            .top_dests(n, filtered)
            .iter()
            .map(|(k, s)| self.dest_record(k, s))
            .collect();
        let mut by_pid: HashMap<u32, ProcessRecord> = HashMap::new();
        for (key, stats) in self.tracker.dests() {
            if filtered && !self.opts.filter.dest(&key, stats) {
                continue;
            }
            for (pid, h) in &stats.holders {
                let p = by_pid.entry(*pid).or_insert_with(|| ProcessRecord {
                    pid: *pid,
                    comm: if *pid == 0 {
                        "(unknown)".into()
                    } else {
                        h.comm.to_string()
                    },
                    ..Default::default()
                });
                p.ports += h.ports;
                p.time_wait += h.time_wait;
                p.destinations += 1;
            }
        }
        let mut processes: Vec<ProcessRecord> = by_pid.into_values().collect();
        processes.sort_by_key(|p| (Reverse(p.ports), p.pid));
        processes.truncate(n);
        for p in &mut processes {
            p.who = self.who(p.pid);
        }
        let mut failures_by_group: Vec<GroupFailures> = self.groups.values().cloned().collect();
        failures_by_group.sort_by(|a, b| {
            (b.connect_eaddrnotavail + b.bind_eaddrinuse)
                .cmp(&(a.connect_eaddrnotavail + a.bind_eaddrinuse))
                .then_with(|| a.group.cmp(&b.group))
        });
        Some(View {
            ts: clock::wall_ns(now),
            hooks: self.hooks.clone(),
            destinations,
            processes,
            failures_by_group,
            totals: Totals {
                events: self.counters.events,
                lost: self.lost_now(),
                missed: self.counters.missed(),
                repaired: self.counters.repaired,
                decode_errors: self.counters.decode_errors,
                connect_eaddrnotavail: self.counters.connect_failures,
                bind_eaddrinuse: self.counters.bind_failures,
                other_failures: self.counters.other_failures,
                evicted: self.tracker.counters.evicted,
                over_limit: self.tracker.counters.over_limit,
                output_dropped: self.output_dropped_now(),
                tracked: self.tracker.tracked() as u64,
                pending: self.tracker.pending() as u64,
            },
        })
    }

    fn flush(&mut self) {
        if self.broken.is_none() {
            if let Err(e) = self.out.flush() {
                self.broken = Some(e);
            }
        }
    }
}

/// Counts `failures` failures; returns the count since the last report when a report is due.
fn due<K: std::hash::Hash + Eq>(
    reports: &mut Map<K, LastReport>,
    key: K,
    now_ns: u64,
    every: Duration,
    failures: u64,
) -> Option<u64> {
    let every = every.as_nanos() as u64;
    let entry = reports.entry(key).or_default();
    entry.failures_since += failures;
    entry.touched_ns = now_ns;
    if entry.at_ns != 0 && now_ns.saturating_sub(entry.at_ns) < every {
        return None;
    }
    entry.at_ns = now_ns.max(1);
    Some(std::mem::take(&mut entry.failures_since))
}

/// Forgets what a destination's rate limit no longer needs, so that the maps hold only
/// destinations failing lately (a proxy whose upstreams come and go would grow them for good):
/// an entry past its interval with nothing tallied (a new failure finds a report due either
/// way), and any entry whose last failure is [`REPORT_TALLY_KEPT`] old.
fn prune_reports<K>(reports: &mut Map<K, LastReport>, now_ns: u64, every: Duration) {
    let every = every.as_nanos() as u64;
    let kept = REPORT_TALLY_KEPT.as_nanos() as u64;
    reports.retain(|_, r| {
        let idle = now_ns.saturating_sub(r.touched_ns);
        let due = r.at_ns == 0 || now_ns.saturating_sub(r.at_ns) >= every;
        !(due && r.failures_since == 0) && idle < kept.max(every)
    });
}

/// One reading of the kernel's connect notes (see `connect_notes`): the namespaces with a
/// connect newly found waiting in SYN_SENT with no record of its port. A reading that fails is
/// skipped: the next one, a second later, finds the same notes (and the periodic resync the
/// ports meanwhile).
fn read_connect_notes(
    map: &mut BpfHashMap<MapData, u64, Connecting>,
    stuck: &mut StuckConnects,
    every_family: bool,
) -> std::collections::BTreeSet<u32> {
    let notes = match map.iter().collect::<Result<Vec<_>, _>>() {
        Ok(notes) => notes,
        Err(e) => {
            tracing::warn!("reading the kernel's connect notes: {e}");
            return Default::default();
        }
    };
    let stale = connect_notes::stale(
        &notes,
        connect_notes::CLEAN_FROM,
        connect_notes::CHECK_MOST,
        crate::procfs::gone,
    );
    for key in &stale {
        if let Err(e) = map.remove(key) {
            tracing::debug!("deleting a dead thread's connect note: {e}");
        }
    }
    if !stale.is_empty() {
        tracing::debug!(
            "deleted {} connect notes of threads that are gone",
            stale.len()
        );
    }
    stuck.read(notes, every_family)
}

/// The kernel's `DROPS` entries, each summed over the CPUs: records the full ring had no room
/// for, program runs that gave up. An entry that cannot be read counts 0 this time (the callers
/// keep the largest count seen: never lower).
fn drop_counts(map: &PerCpuArray<MapData, u64>) -> [u64; 2] {
    let entry = |i: u32, what: &str| match map.get(&i, 0) {
        Ok(values) => values.iter().sum(),
        Err(e) => {
            tracing::warn!("reading the kernel's count of {what}: {e}");
            0
        }
    };
    [
        entry(drops::RING_FULL, "records lost"),
        entry(drops::GAVE_UP, "program runs that gave up"),
    ]
}

/// Runs the tracer until SIGINT/SIGTERM (or `duration`); see [`Links`] for what it tells whom.
pub async fn run(opts: TraceOptions, links: Links) -> anyhow::Result<()> {
    let Links { ready, screen } = links;
    let quiet = screen.is_some();
    // The View goes to whoever subscribes (the screen, the metrics endpoint); built only while
    // someone does.
    let view = screen.unwrap_or_else(|| watch::channel(Arc::new(View::default())).0);
    // Before anything is attached or announced: a signal that arrives once `started` is out
    // must reach the loop, not kill the process with the default action.
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    privilege::check()?;
    crate::netns::warn_not_found(&opts.netns);
    crate::procfs::warn_unless_host_pids();
    // Before anything is attached: an address in use is a clean error with nothing loaded.
    let metrics_listener = match opts.metrics {
        Some(addr) => Some(
            metrics_server::bind(addr)
                .await
                .with_context(|| format!("metrics endpoint on {addr}"))?,
        ),
        None => None,
    };
    let mut opts = opts;
    if opts.metrics.is_some() {
        opts.view_top = opts.view_top.max(opts.metrics_top);
    }
    let tracefs_root = tracefs::ensure_mounted()?;
    tracefs::verify_layouts(&tracefs_root)?;
    let btf = btf::Btf::from_sys_fs().context("reading kernel BTF")?;
    let offsets = btf::kernel_offsets(&btf).context("finding kernel struct offsets in BTF")?;
    tracing::debug!(?offsets, "kernel struct offsets");

    let mut loaded = loader::load(&LoadOptions {
        hooks: opts.hooks,
        state_hook: opts.state_hook,
        offsets,
        ring_bytes: opts.ring_bytes,
        netns: opts.netns.clone(),
        // A line per failure asked for: a record per failure.
        failure_record_gap_ns: if opts.failure_line_every.is_zero() {
            0
        } else {
            FAILURE_RECORD_GAP_NS
        },
        prototypes: loader::Prototypes::of(&btf),
    })?;
    let mut rings = Vec::with_capacity(loaded.rings.count);
    for name in &names::EVENTS[..loaded.rings.count] {
        let map = match loaded.ebpf.take_map(name) {
            Some(aya::maps::Map::RingBuf(m)) => m,
            Some(_) => bail!("map {name} is not a ring buffer"),
            None => bail!("map {name} missing"),
        };
        rings.push(
            Ring::new(map, loaded.rings.bytes as usize)
                .with_context(|| format!("mapping ring buffer {name}"))?,
        );
    }
    let drop_map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(
        loaded
            .ebpf
            .take_map(names::DROPS)
            .ok_or_else(|| anyhow!("map {} missing", names::DROPS))?,
    )?;
    let failure_map: BpfHashMap<MapData, FailureKey, FailureCount> = BpfHashMap::try_from(
        loaded
            .ebpf
            .take_map(names::FAILURE_COUNTS)
            .ok_or_else(|| anyhow!("map {} missing", names::FAILURE_COUNTS))?,
    )?;
    let mut connect_notes: BpfHashMap<MapData, u64, Connecting> = BpfHashMap::try_from(
        loaded
            .ebpf
            .take_map(names::CONNECTING)
            .ok_or_else(|| anyhow!("map {} missing", names::CONNECTING))?,
    )?;
    // In tracepoint mode no connect's port has a record before the thread's next record of the
    // socket or connect()'s exit; in the others IPv6's alone waits for the exit.
    let every_family = loaded.mode == HookMode::Tracepoint;
    let mut stuck = StuckConnects::new();
    let mut reader = Reader::new(rings).context("registering the ring buffers with tokio")?;
    let mut logger = match loaded.logger.take() {
        Some(l) => Some(crate::reader::register(l).context("registering the kernel log buffer")?),
        None => None,
    };

    let out: Box<dyn io::Write + Send> = if quiet {
        Box::new(io::sink())
    } else {
        Box::new(io::stdout())
    };
    let (out, finish_output) =
        stdout_thread::spawn(out).context("starting the thread that writes stdout")?;
    let output_dropped = out.dropped_counter();
    let out: Box<dyn io::Write + Send> = Box::new(out);
    let mut session = Session {
        hooks: loaded.mode.to_string(),
        identities: Identities::new(),
        rates: Rates::new(),
        groups: Map::default(),
        bind_zero: HashMap::new(),
        filter: opts.netns.iter().copied().collect(),
        tracker: Tracker::with_limit(opts.max_sockets),
        ranges: Ranges::new(),
        out: Output::new(out, opts.json),
        counters: Counters::default(),
        reports: Map::default(),
        bind_reports: Map::default(),
        failure_lines: FailureLines::new(opts.failure_line_every),
        failure_counts: FailureCounts::new(),
        failure_map: Some(failure_map),
        broken: None,
        drop_map: Some(drop_map),
        output_dropped: Some(output_dropped),
        output_dropped_warned: 0,
        opts,
    };

    // Seed after attaching: a connection made in between is seen by both, and the tracker keeps
    // the event's version (newer than the snapshot).
    let mut seeded = 0;
    if session.opts.seed {
        let only = session.opts.netns.clone();
        let seeding =
            tokio::task::spawn_blocking(move || seed::pass(&only, clock::monotonic_ns(), &[]));
        let mut pass = holding_records(&mut reader, seeding)
            .await
            .context("seeding thread")?;
        let wanted = seed::lacking_owners(&session.tracker, &pass);
        if !wanted.is_empty() {
            let owners = tokio::task::spawn_blocking(move || seed::with_owners(pass, &wanted, &[]));
            pass = holding_records(&mut reader, owners)
                .await
                .context("seeding thread")?;
        }
        seeded = seed::apply(&mut session.tracker, &pass).added;
        session.take_port_settings(&pass);
        tracing::info!(
            "seeded {seeded} existing client sockets from {} network namespaces",
            pass.snapshots.len()
        );
    }
    let started = Started {
        hooks: loaded.mode.to_string(),
        attached: loaded.attached.clone(),
        seeded,
        ts: clock::wall_ns(clock::monotonic_ns()),
    };
    if !session.out.is_json() {
        tracing::info!("tracing with {} hooks; Ctrl-C to stop", started.hooks);
    }
    session.emit(&Record::Started(started));
    let metrics_task = metrics_listener.map(|l| {
        if let Ok(addr) = l.local_addr() {
            tracing::info!("metrics on http://{addr}/metrics");
        }
        metrics_server::spawn(l, view.subscribe(), session.opts.metrics_top)
    });
    session.flush();
    if let Some(tx) = ready {
        let _ = tx.send(());
    }

    let mut tick = tokio::time::interval(session.opts.interval);
    tick.tick().await;
    let mut resync = tokio::time::interval(session.opts.resync);
    resync.tick().await;
    let mut view_tick = tokio::time::interval(VIEW_EVERY);
    view_tick.tick().await;
    let deadline = session
        .opts
        .duration
        .map(|d| tokio::time::Instant::now() + d);
    let mut resync_job: Option<tokio::task::JoinHandle<seed::Pass>> = None;
    // When the last sock_diag pass began (the start-up seed counts as one).
    let mut last_pass = tokio::time::Instant::now();
    // Processes whose sockets the running pass is for (connects found waiting).
    let mut look_first: Vec<u32> = Vec::new();
    // A failure wakes the agent at most once per FAILURE_WAKE_GAP_NS per CPU (portx-ebpf
    // emit.rs); after reading one, read again that long later for those that did not wake it.
    let follow_up_gap = Duration::from_nanos(FAILURE_WAKE_GAP_NS);
    let mut follow_up: Option<tokio::time::Instant> = None;
    let mut failures_seen = 0;
    let mut warned_limit = 0;
    let mut warned_lost = 0;
    let mut warned_gave_up = 0;
    let mut warned_late = 0;

    loop {
        tokio::select! {
            r = reader.drain(|buf| session.handle(buf)) => {
                r.context("reading the ring buffer")?;
                session.flush();
            }
            _ = async {
                match follow_up {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                follow_up = None;
                reader.drain_pending(|buf| session.handle(buf));
                session.flush();
            }
            r = async {
                match logger.as_mut() {
                    Some(l) => l.readable_mut().await,
                    None => std::future::pending().await,
                }
            } => {
                let mut guard = r.context("kernel log buffer")?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = tick.tick() => {
                // State changes do not wake the agent one by one (see portx-ebpf emit.rs):
                // read what is waiting before summarizing.
                reader.drain_pending(|buf| session.handle(buf));
                session.read_failure_counts();
                // Set where the table is known to be off: a resync repairs it now, not at the
                // next `--resync` tick (a minute or more away, as some run it).
                let mut off = false;
                let lost = session.lost_now();
                if lost > warned_lost {
                    tracing::warn!(
                        "the kernel dropped {} events (ring buffer full; {lost} since start): port counts may be low until the resync this starts",
                        lost - warned_lost
                    );
                    warned_lost = lost;
                    off = true;
                }
                if reader.late() > warned_late {
                    tracing::warn!(
                        "{} records arrived after newer ones were handled ({} since start): the kernel's and the agent's CLOCK_MONOTONIC disagree; port counts may be off until the resync this starts",
                        reader.late() - warned_late,
                        reader.late()
                    );
                    warned_late = reader.late();
                    off = true;
                }
                let by_program = prog_stats::missed_runs(&loaded.ebpf);
                let skipped: u64 = by_program.iter().map(|(_, n)| n).sum();
                if skipped > session.counters.skipped {
                    let detail: Vec<String> =
                        by_program.iter().map(|(p, n)| format!("{p} {n}")).collect();
                    tracing::warn!(
                        "the kernel skipped portx programs {} times (recursion; since start: {}): port counts may be off until the resync this starts",
                        skipped - session.counters.skipped,
                        detail.join(", ")
                    );
                    session.counters.skipped = skipped;
                    off = true;
                }
                // (lost_now, above, read it.)
                if session.counters.gave_up > warned_gave_up {
                    tracing::warn!(
                        "portx programs gave up {} times (a kernel read failed, or a per-thread map had no room; {} since start, counted as missed): port counts may be off until the resync this starts",
                        session.counters.gave_up - warned_gave_up,
                        session.counters.gave_up
                    );
                    warned_gave_up = session.counters.gave_up;
                    off = true;
                }
                if off {
                    // The resync branch runs at once, or right after a pass under way (which
                    // may have dumped before the loss).
                    resync.reset_immediately();
                }
                let (evicted, over) = (session.tracker.counters.evicted, session.tracker.counters.over_limit);
                if evicted + over > warned_limit {
                    tracing::warn!(
                        "--max-sockets reached: {evicted} TIME_WAIT entries evicted, {over} sockets not tracked since start"
                    );
                    warned_limit = evicted + over;
                }
                session.flush_failure_lines(false);
                session.summary(false);
                session.flush();
            }
            _ = view_tick.tick() => {
                reader.drain_pending(|buf| session.handle(buf));
                session.read_failure_counts();
                session.flush_failure_lines(false);
                // What the drain and the flush wrote goes out now, not with the next summary.
                session.flush();
                if let Some(v) = session.tick_view(view.receiver_count() > 0) {
                    view.send_replace(Arc::new(v));
                }
                let waiting = read_connect_notes(&mut connect_notes, &mut stuck, every_family);
                if !waiting.is_empty()
                    && resync_job.is_none()
                    && last_pass.elapsed() >= STUCK_DUMP_GAP
                {
                    let only: Vec<u32> = waiting.into_iter().collect();
                    tracing::debug!(
                        "connects waiting in SYN_SENT with no record of their port in netns {only:?}: sock_diag now"
                    );
                    // Their processes hold the sockets the pass is for: looked at first.
                    look_first = stuck.processes();
                    stuck.dumped();
                    last_pass = tokio::time::Instant::now();
                    session.tracker.pass_begins();
                    let tracked = session.tracker.namespaces();
                    resync_job = Some(tokio::task::spawn_blocking(move || {
                        seed::pass(&only, clock::monotonic_ns(), &tracked)
                    }));
                }
            }
            _ = resync.tick(), if resync_job.is_none() => {
                last_pass = tokio::time::Instant::now();
                look_first.clear();
                let only = session.opts.netns.clone();
                session.tracker.pass_begins();
                let tracked = session.tracker.namespaces();
                resync_job = Some(tokio::task::spawn_blocking(move || {
                    seed::pass(&only, clock::monotonic_ns(), &tracked)
                }));
            }
            r = async { resync_job.as_mut().expect("guarded by if").await }, if resync_job.is_some() => {
                resync_job = None;
                let pass = r.context("resync thread")?;
                // Records of sockets the dump saw may still wait in the rings (wake-ups are
                // batched): read first, so that only sockets no record brought (lost records,
                // connects waiting with no record of their port) send the agent through /proc.
                reader.drain_pending(|buf| session.handle(buf));
                let wanted = match pass.owners {
                    None => seed::lacking_owners(&session.tracker, &pass),
                    Some(_) => Default::default(),
                };
                if !wanted.is_empty() {
                    tracing::debug!(
                        "sock_diag pass: {} live sockets the table lacks; looking for their processes in /proc",
                        wanted.len()
                    );
                    let first = std::mem::take(&mut look_first);
                    resync_job = Some(tokio::task::spawn_blocking(move || {
                        seed::with_owners(pass, &wanted, &first)
                    }));
                } else {
                    if pass.owners.is_none() {
                        tracing::debug!("sock_diag pass: no live socket the table lacks; no /proc scan");
                    }
                    let applied = seed::apply(&mut session.tracker, &pass);
                    session.tracker.pass_ends();
                    session.take_port_settings(&pass);
                    if applied.added + applied.removed + applied.corrected > 0 {
                        tracing::info!(
                            "sock_diag resync: {} sockets added, {} removed, {} corrected",
                            applied.added, applied.removed, applied.corrected
                        );
                    }
                    if applied.repaired > 0 {
                        session.counters.repaired += applied.repaired as u64;
                        tracing::warn!(
                            "sock_diag resync: {} sockets were held in a state the kernel no longer reports ({} since start, {} records lost since start): their state changes came in no record (lost to a full ring, run by no program of the kernel's, or of a socket that once listened or was accepted, whose records the kernel side leaves out); corrected",
                            applied.repaired,
                            session.counters.repaired,
                            session.counters.lost
                        );
                    }
                    if applied.gone > 0 {
                        tracing::info!(
                            "sock_diag resync: network namespaces {:?} are gone; {} sockets of theirs whose end no record brought forgotten",
                            pass.gone, applied.gone
                        );
                    }
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => break,
        }
        if let Some(e) = session.broken.take() {
            tracing::info!("stdout closed ({e}); stopping");
            return Ok(());
        }
        if session.counters.failure_records != failures_seen {
            failures_seen = session.counters.failure_records;
            follow_up = Some(tokio::time::Instant::now() + follow_up_gap);
        }
    }
    // Detached before the last read: records written while it ran (behind a record still being
    // written, or after it), and failures counted after the count map's reading, would be
    // missing from the final summary, and not counted as lost either. The rings and maps the
    // agent reads were taken out of `loaded` and stay.
    let skipped: u64 = prog_stats::missed_runs(&loaded.ebpf)
        .iter()
        .map(|(_, n)| n)
        .sum();
    drop(loaded);
    tracing::debug!("detached every program");
    let (_, busy) = reader.drain_all(|buf| session.handle(buf), Duration::from_millis(100));
    if busy {
        tracing::warn!(
            "a record was still being written 100 ms after every program was detached; records behind it are not in the final summary"
        );
    }
    session.read_failure_counts();
    // A program whose statistics could not be read is left out of the sum: never lower.
    session.counters.skipped = session.counters.skipped.max(skipped);
    session.lost_now();
    session.flush_failure_lines(true);
    session.summary(true);
    session.flush();
    if let Some(t) = metrics_task {
        t.abort();
    }
    // What is queued for stdout, the final summary last, goes out unless stdout stays stuck.
    let dropped = session.output_dropped.clone();
    let warned = session.output_dropped_warned;
    drop(session);
    if !finish_output.wait(OUTPUT_GRACE) {
        tracing::warn!(
            "stdout took nothing for {OUTPUT_GRACE:?}: exiting without the records still queued"
        );
    }
    // The last flush may itself have been dropped (the queue full), with no summary after it.
    let dropped = dropped.map_or(0, |d| d.get());
    if dropped > warned {
        tracing::warn!(
            "{} output lines dropped at exit (the final summary may be among them): stdout was not taking them",
            dropped - warned
        );
    }
    Ok(())
}

/// Records held in memory while the start-up seed runs, at most: about 3 s of a storm of 70k
/// connections a second (three records of ~110 bytes each).
const SEED_HOLD_BYTES: usize = 64 << 20;

/// Awaits `job` (the start-up seed, which takes seconds with many sockets or descriptors on
/// the host), reading the rings into memory every 20 ms meanwhile: under a storm they would
/// otherwise fill, and the records lost. Nothing is handled before the seed is applied and
/// the `started` record written; past [`SEED_HOLD_BYTES`] the rings are left to fill, and what
/// they drop is counted as ever.
async fn holding_records<T>(
    reader: &mut Reader,
    job: tokio::task::JoinHandle<T>,
) -> Result<T, tokio::task::JoinError> {
    tokio::pin!(job);
    let mut every = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            r = &mut job => return r,
            _ = every.tick() => {
                reader.hold(SEED_HOLD_BYTES);
            }
        }
    }
}

/// How long the agent waits at exit for a stuck stdout to take its last records.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_rate_limited_per_destination_and_count_what_they_skip() {
        let mut m: Map<u32, LastReport> = Map::default();
        let sec = Duration::from_secs(1);
        assert_eq!(due(&mut m, 1, 5, sec, 1), Some(1));
        assert_eq!(due(&mut m, 1, 6, sec, 1), None);
        assert_eq!(
            due(&mut m, 1, 7, sec, 40),
            None,
            "a record counted in the kernel"
        );
        assert_eq!(
            due(&mut m, 2, 7, sec, 1),
            Some(1),
            "other destination is independent"
        );
        assert_eq!(due(&mut m, 1, 5 + 1_000_000_000, sec, 1), Some(42));
    }

    #[test]
    fn report_limits_forget_destinations_no_longer_failing() {
        let sec = Duration::from_secs(1);
        const S: u64 = 1_000_000_000;
        let mut m: Map<u32, LastReport> = Map::default();
        for dest in 0..1000 {
            assert_eq!(due(&mut m, dest, S, sec, 1), Some(1));
        }
        // Destination 7 failed again within its interval: its tally waits for its next report.
        assert_eq!(due(&mut m, 7, S + S / 2, sec, 3), None);
        prune_reports(&mut m, S + S / 2, sec);
        assert_eq!(m.len(), 1000, "within the interval: all kept");
        prune_reports(&mut m, 3 * S, sec);
        assert_eq!(m.len(), 1, "only the one with a tally");
        assert_eq!(
            due(&mut m, 7, 4 * S, sec, 1),
            Some(4),
            "the tally reaches the report"
        );
        assert_eq!(
            due(&mut m, 8, 4 * S, sec, 1),
            Some(1),
            "a forgotten one: due at once"
        );
        // A tally nobody reports (no failure since) goes after REPORT_TALLY_KEPT.
        assert_eq!(due(&mut m, 9, 4 * S, sec, 1), Some(1));
        assert_eq!(due(&mut m, 9, 4 * S + 1, sec, 5), None);
        prune_reports(&mut m, 4 * S + 599 * S, sec);
        assert!(m.contains_key(&9));
        prune_reports(&mut m, 4 * S + 1 + 600 * S, sec);
        assert!(m.is_empty());
    }
}
