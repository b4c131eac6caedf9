//! Command line (clap derive). Invalid values are refused by clap with exit code 2.
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::loader::{HookChoice, StateHookChoice};

const EXAMPLES: &str = "\
EXAMPLES:
    sudo portx-agent trace                      watch every network namespace, table every 5 s
    sudo portx-agent trace --json > events.jsonl   JSON Lines on stdout, logs on stderr
    sudo portx-agent trace --netns 4026532281   one namespace (inode of /proc/<pid>/ns/net)
    sudo portx-agent trace --netns /proc/1234/ns/net   the namespace of pid 1234 (or an `ip netns` name)
    sudo portx-agent trace --hooks tracepoint   force a hook mode (default: best available)
    sudo portx-agent trace --dport 443 --comm nginx   only what nginx does to port 443
    sudo portx-agent trace --metrics            Prometheus/OpenMetrics on 127.0.0.1:9464/metrics
    sudo portx-agent top                        live screen of the hottest destinations; q quits
    sudo portx-agent demo                       see an exhaustion caught in a private namespace
    sudo portx-agent snapshot --json            the table once, without eBPF (sock_diag + /proc)
    sudo portx-agent doctor                     settings, what they mean, and what would help

EXIT STATUS:
    0 stopped by SIGINT/SIGTERM, --duration, or q in top, or once stdout is closed; 1 runtime error
    (missing capability, kernel without BTF or ring buffers, attach failure); 2 invalid command
    line.";

#[derive(Debug, Parser)]
#[command(name = "portx-agent", version, about, after_help = EXAMPLES)]
pub struct Cli {
    /// More logging on stderr (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace port allocations, TCP state changes and connect()/bind() failures; report who holds
    /// the ports when a connect() fails with EADDRNOTAVAIL.
    #[command(after_help = EXAMPLES)]
    Trace(TraceArgs),
    /// A live screen: the hottest destinations (utilization, ports by state, churn, time to
    /// exhaustion) and the processes holding the most ports, refreshed every second. q quits.
    Top(TopArgs),
    /// The table of ports in use per destination, once, from sock_diag and /proc: no eBPF, no
    /// CAP_BPF needed.
    Snapshot(SnapshotArgs),
    /// Per network namespace: port settings and what they mean, ports in use, and advice for
    /// the busiest destinations. No eBPF.
    Doctor(DoctorArgs),
    /// Create a private network namespace with a 16-port range, exhaust it with a port hog and a
    /// TIME_WAIT churner, and trace it live. Cleans up after itself.
    Demo(DemoArgs),
    /// Test and demo workloads (connect storms, port hogs) — used by `demo` and the tests.
    #[command(hide = true)]
    Workload(crate::workload::WorkloadArgs),
    /// Print the man page (roff) on stdout.
    #[command(hide = true)]
    Man,
    /// Print shell completions on stdout.
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// JSON Lines on stdout (one object per line; `ts` in Unix nanoseconds).
    #[arg(long)]
    pub json: bool,
    /// How to observe port allocation: fentry/fexit (also for connect() and bind() returning, so
    /// no syscall tracepoint), kprobe/kretprobe or tracepoints only.
    #[arg(long, value_enum, default_value_t = HookChoice::Auto)]
    pub hooks: HookChoice,
    /// How to observe state changes: tp_btf (one checked load per field) where the kernel takes
    /// it, else a raw tracepoint (a helper call per field); the same records either way.
    #[arg(long, value_enum, default_value_t = StateHookChoice::Auto)]
    pub state_hook: StateHookChoice,
    /// Only this network namespace: its inode number, a namespace file (/proc/<pid>/ns/net) or an
    /// `ip netns` name; repeatable, up to 256. The kernel side then writes nothing for the
    /// others. Default: all.
    #[arg(long = "netns", value_name = "NETNS", value_parser = netns_arg)]
    pub netns: Vec<u32>,
    /// Seconds between summaries.
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = seconds)]
    pub interval: Duration,
    /// Destinations per summary.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub top: u16,
    /// Seconds between corrections of the table against the kernel's sock_diag (a namespace
    /// with a blocking connect left waiting in SYN_SENT is dumped within seconds too).
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = seconds)]
    pub resync: Duration,
    /// Size of each ring buffer in KiB (power of two, 4 to 1048576); the kernel side writes to
    /// one ring per CPU, at most 8. Default: 8 MiB shared out, 1 to 4 MiB a ring.
    #[arg(long, value_name = "KIB", value_parser = ring_kib)]
    pub ring_buffer_kib: Option<u32>,
    /// Stop after this many seconds (default: run until SIGINT/SIGTERM).
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    pub duration: Option<Duration>,
    /// Do not read existing connections from sock_diag at start-up.
    #[arg(long)]
    pub no_seed: bool,
    /// Most sockets tracked at once (about 60 bytes each). Past it the oldest TIME_WAIT entries
    /// are dropped first (`evicted` in summaries); with none left, new sockets are not tracked
    /// (`over_limit`).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_SOCKETS,
          value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    pub max_sockets: u32,
    /// A `connect_failed`/`bind_failed` line for every failure (and a kernel record for every
    /// failing connect). Default: at most one a second per process, destination (or local
    /// address) and errno, its `failures` counting those without a line of their own; failing
    /// connects are counted in the kernel, a record about each 100 ms per such key.
    #[arg(long)]
    pub every_failure: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Serve OpenMetrics on http://ADDR/metrics (`--metrics` alone: 127.0.0.1:9464). Loopback
    /// unless told otherwise; no authentication.
    #[arg(long, value_name = "ADDR", num_args = 0..=1,
          default_missing_value = crate::metrics_server::DEFAULT_ADDR)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Destinations (and processes) with their own series in the metrics.
    #[arg(long, value_name = "K", default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub metrics_top: u16,
}

/// `--pid`, `--comm`, `--dport` of `trace` and `snapshot`: they narrow what is shown, never
/// what is tracked (see [`crate::filter`]).
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Only failures of, and destinations with ports held by, this process (repeatable).
    #[arg(long = "pid", value_name = "PID", value_parser = clap::value_parser!(u32).range(1..))]
    pub pids: Vec<u32>,
    /// Only failures of, and destinations with ports held by, threads with this name (exact:
    /// the name of the thread that connected, as in /proc/<pid>/task/<tid>/comm, which a
    /// worker thread may have changed; for `snapshot`, /proc/<pid>/comm; repeatable).
    #[arg(long = "comm", value_name = "NAME", value_parser = comm_name)]
    pub comms: Vec<String>,
    /// Only this destination port (repeatable). Hides bind() failures, which have none.
    #[arg(long = "dport", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub dports: Vec<u16>,
}

impl FilterArgs {
    pub fn filter(&self) -> crate::filter::Filter {
        crate::filter::Filter {
            pids: self.pids.clone(),
            comms: self.comms.clone(),
            dports: self.dports.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// How to observe port allocation: fentry/fexit (also for connect() and bind() returning, so
    /// no syscall tracepoint), kprobe/kretprobe or tracepoints only.
    #[arg(long, value_enum, default_value_t = HookChoice::Auto)]
    pub hooks: HookChoice,
    /// Only this network namespace: inode number, /proc/<pid>/ns/net or an `ip netns` name
    /// (repeatable, up to 256). Default: all.
    #[arg(long = "netns", value_name = "NETNS", value_parser = netns_arg)]
    pub netns: Vec<u32>,
    /// Destinations and processes listed (as many as fit are shown).
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub top: u16,
    /// Do not read existing connections from sock_diag at start-up.
    #[arg(long)]
    pub no_seed: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
}

impl TopArgs {
    pub fn options(&self) -> crate::trace::TraceOptions {
        crate::trace::TraceOptions {
            hooks: self.hooks,
            netns: self.netns.clone(),
            top: usize::from(self.top),
            view_top: usize::from(self.top),
            seed: !self.no_seed,
            filter: self.filter.filter(),
            view_filtered: true,
            ..Default::default()
        }
    }
}

/// A process name as the kernel keeps it: 1 to 15 bytes.
fn comm_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 15 {
        return Err(format!(
            "`{s}`: a process name is 1 to 15 bytes (the kernel truncates comm to 15)"
        ));
    }
    Ok(s.to_string())
}

/// Default `--max-sockets`: about 120 MiB of table.
pub const DEFAULT_MAX_SOCKETS: u32 = 2_000_000;

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// One JSON object on stdout (`"type":"snapshot"`).
    #[arg(long)]
    pub json: bool,
    /// Destinations shown.
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=10000))]
    pub top: u16,
    /// Only this network namespace: inode number, /proc/<pid>/ns/net or an `ip netns` name
    /// (repeatable). Default: all.
    #[arg(long = "netns", value_name = "NETNS", value_parser = netns_arg)]
    pub netns: Vec<u32>,
    #[command(flatten)]
    pub filter: FilterArgs,
}

impl SnapshotArgs {
    pub fn options(&self) -> crate::snapshot::SnapshotOptions {
        crate::snapshot::SnapshotOptions {
            json: self.json,
            top: usize::from(self.top),
            netns: self.netns.clone(),
            filter: self.filter.filter(),
        }
    }
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// One JSON object per network namespace (`"type":"doctor"`).
    #[arg(long)]
    pub json: bool,
    /// Destinations per namespace.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub top: u16,
    /// Only this network namespace: inode number, /proc/<pid>/ns/net or an `ip netns` name
    /// (repeatable). Default: all.
    #[arg(long = "netns", value_name = "NETNS", value_parser = netns_arg)]
    pub netns: Vec<u32>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// JSON Lines instead of readable output.
    #[arg(long)]
    pub json: bool,
    /// How long the demo runs, in seconds.
    #[arg(long, value_name = "SECS", default_value = "8", value_parser = seconds)]
    pub seconds: Duration,
}

/// Seconds, fractional allowed, from 0.1 to one day.
fn seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(0.1..=86_400.0).contains(&v) {
        return Err(format!("{v} s is out of range (0.1 to 86400)"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// `--netns`: see [`crate::netns::resolve_arg`].
fn netns_arg(s: &str) -> Result<u32, String> {
    crate::netns::resolve_arg(s)
}

fn ring_kib(s: &str) -> Result<u32, String> {
    let v: u32 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number"))?;
    if !(4..=1 << 20).contains(&v) || !v.is_power_of_two() {
        return Err(format!("{v} KiB: must be a power of two from 4 to 1048576"));
    }
    Ok(v)
}

impl Cli {
    /// Checks what clap's per-value parsers cannot: exits with status 2 and a clap-style message.
    pub fn validate(self) -> Self {
        use clap::CommandFactory as _;
        let netns = match &self.command {
            Command::Trace(t) => t.netns.len(),
            Command::Top(t) => t.netns.len(),
            _ => 0,
        };
        let max = portx_common::MAX_NETNS_FILTER as usize;
        if netns > max {
            Cli::command()
                .error(
                    clap::error::ErrorKind::TooManyValues,
                    format!("--netns given {netns} times; at most {max}"),
                )
                .exit();
        }
        self
    }
}

impl TraceArgs {
    pub fn options(&self) -> crate::trace::TraceOptions {
        crate::trace::TraceOptions {
            json: self.json,
            hooks: self.hooks,
            state_hook: self.state_hook,
            netns: self.netns.clone(),
            interval: self.interval,
            top: usize::from(self.top),
            resync: self.resync,
            ring_bytes: self.ring_buffer_kib.map(|k| k * 1024),
            duration: self.duration,
            seed: !self.no_seed,
            report_every: Duration::from_secs(1),
            failure_line_every: if self.every_failure {
                Duration::ZERO
            } else {
                Duration::from_secs(1)
            },
            max_sockets: self.max_sockets as usize,
            filter: self.filter.filter(),
            // The View feeds /metrics here, which the filter leaves whole.
            view_filtered: false,
            view_top: 0,
            metrics: self.metrics,
            metrics_top: usize::from(self.metrics_top),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_values_are_refused() {
        for args in [
            &["portx-agent", "trace", "--interval", "0"][..],
            &["portx-agent", "trace", "--interval", "abc"],
            &["portx-agent", "trace", "--top", "0"],
            &["portx-agent", "trace", "--hooks", "uprobe"],
            &["portx-agent", "trace", "--ring-buffer-kib", "3"],
            &["portx-agent", "trace", "--netns", "-1"],
            &["portx-agent", "trace", "--max-sockets", "0"],
            &["portx-agent", "trace", "--pid", "0"],
            &["portx-agent", "trace", "--comm", "a-name-longer-than-15"],
            &["portx-agent", "trace", "--comm", ""],
            &["portx-agent", "trace", "--dport", "0"],
            &["portx-agent", "trace", "--dport", "65536"],
            &["portx-agent", "snapshot", "--top", "0"],
            &["portx-agent", "trace", "--metrics", "localhost"],
            &["portx-agent", "trace", "--metrics", "127.0.0.1:99999"],
            &["portx-agent", "trace", "--metrics-top", "0"],
            &["portx-agent", "snapshot", "--netns", "x"],
        ] {
            let err = Cli::try_parse_from(args).expect_err(&format!("{args:?} accepted"));
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn netns_takes_a_namespace_file() {
        let me = crate::netns::id_of_pid(std::process::id()).unwrap();
        let cli =
            Cli::try_parse_from(["portx-agent", "trace", "--netns", "/proc/self/ns/net"]).unwrap();
        let Command::Trace(t) = cli.command else {
            panic!("not trace")
        };
        assert_eq!(t.netns, vec![me]);
        for args in [
            &["portx-agent", "trace", "--netns", "/proc/self/ns/mnt"][..],
            &["portx-agent", "doctor", "--netns", "/proc/self/status"],
            &["portx-agent", "top", "--netns", "0"],
        ] {
            let err = Cli::try_parse_from(args).expect_err(&format!("{args:?} accepted"));
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn defaults() {
        let cli = Cli::try_parse_from(["portx-agent", "trace"]).unwrap();
        let Command::Trace(t) = cli.command else {
            panic!("not trace")
        };
        let o = t.options();
        assert_eq!(o.hooks, HookChoice::Auto);
        assert_eq!(o.state_hook, StateHookChoice::Auto);
        assert_eq!(o.interval, Duration::from_secs(5));
        assert!(o.seed && !o.json && o.netns.is_empty());
        assert_eq!(o.metrics, None, "metrics are off by default");
        let on = Cli::try_parse_from(["portx-agent", "trace", "--metrics"]).unwrap();
        let Command::Trace(t) = on.command else {
            panic!("not trace")
        };
        assert_eq!(t.metrics, Some("127.0.0.1:9464".parse().unwrap()));
    }
}
