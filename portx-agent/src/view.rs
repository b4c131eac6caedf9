//! The trace session's state as consumers other than stdout see it (the metrics endpoint).
//! Built about once a second by [`crate::trace`] while someone subscribes, and published through
//! a `tokio::sync::watch` channel as an `Arc<View>`, so readers never lock the event loop.
use serde::Serialize;

use crate::report::{DestRecord, Who};

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct View {
    /// Wall clock, Unix ns.
    pub ts: u64,
    /// fentry, kprobe or tracepoint.
    pub hooks: String,
    /// Destinations with the most ports in use, most first (`--top` or `--metrics-top`,
    /// whichever is larger).
    pub destinations: Vec<DestRecord>,
    /// Processes holding the most ports over all destinations, most first.
    pub processes: Vec<ProcessRecord>,
    /// Failures by container (or cgroup, when not in a container), most first; at most
    /// [`MAX_GROUPS`] groups, the rest summed under `other`.
    pub failures_by_group: Vec<GroupFailures>,
    pub totals: Totals,
}

/// Failure groups kept: the bound on the metrics' cardinality.
pub const MAX_GROUPS: usize = 256;

/// Counters since the agent started (monotonic: suitable for Prometheus counters).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Totals {
    /// Records read from the ring buffer.
    pub events: u64,
    /// Records the kernel could not write (ring buffer full).
    pub lost: u64,
    /// Program runs the kernel skipped.
    pub missed: u64,
    /// Sockets a resync found in a live state the kernel no longer reports (state changes no
    /// record brought), corrected then.
    pub repaired: u64,
    /// Records that could not be decoded.
    pub decode_errors: u64,
    /// connect() failures with EADDRNOTAVAIL.
    pub connect_eaddrnotavail: u64,
    /// bind() failures with EADDRINUSE.
    pub bind_eaddrinuse: u64,
    /// Other connect()/bind() failures.
    pub other_failures: u64,
    /// TIME_WAIT entries evicted at `--max-sockets`.
    pub evicted: u64,
    /// Sockets not tracked at `--max-sockets`.
    pub over_limit: u64,
    /// Lines of output dropped because stdout did not keep up.
    pub output_dropped: u64,
    /// Sockets tracked now (a gauge).
    pub tracked: u64,
    /// connect()s under way whose port is not known yet (a gauge).
    pub pending: u64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ProcessRecord {
    pub pid: u32,
    pub comm: String,
    /// Ports held over all destinations, TIME_WAIT included.
    pub ports: u32,
    pub time_wait: u32,
    /// Destinations it holds ports to.
    pub destinations: u32,
    #[serde(flatten)]
    pub who: Who,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct GroupFailures {
    /// `<runtime>://<short id>` for a container, else the cgroup path; `other` past
    /// [`MAX_GROUPS`]; `unknown` when the process was gone before it could be read.
    pub group: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    pub connect_eaddrnotavail: u64,
    pub bind_eaddrinuse: u64,
}
