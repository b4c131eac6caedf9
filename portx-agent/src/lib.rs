//! portx agent: loads the eBPF programs, reads the ring buffer and keeps the live table of
//! ephemeral-port use per destination.
//!
//! Event flow, one module a step:
//! kernel ([`loader`]) -> ring buffer ([`reader`]) -> [`decoder`] -> [`tracker`] -> [`report`]
//! -> [`output`] -> [`stdout_thread`]; [`trace`] runs the loop, and the tracker ages TIME_WAIT with [`time_wait`].
//! Failures: [`decoder`] -> [`failure_counts`] (what the kernel only counted) ->
//! [`failure_lines`] (a line a second per process, destination and errno) -> [`report`]. The kernel's own truth comes from [`sockdiag`],
//! [`procfs`], [`sysctl`] (per netns, cached by [`ranges`]) and [`netns`], folded into the
//! tracker by [`seed`]. Before anything loads: [`privilege`], [`tracefs`], [`btf`].
//! Consumers of the once-a-second [`view`]: [`metrics`] (served by [`metrics_server`]) and the
//! [`top`] screen (drawn by [`screen`], its logs kept by [`log_sink`]).
pub mod advice;
pub mod btf;
pub mod cli;
pub mod clock;
pub mod connect_notes;
pub mod decoder;
pub mod demo;
pub mod doctor;
pub mod failure_counts;
pub mod failure_lines;
pub mod filter;
pub mod forecast;
pub mod identity;
pub mod loader;
pub mod log_sink;
pub mod log_writer;
pub mod manpage;
pub mod metrics;
pub mod metrics_server;
pub mod netns;
pub mod output;
pub mod privilege;
pub mod procfs;
pub mod prog_stats;
pub mod ranges;
pub mod reader;
pub mod reorder;
pub mod report;
pub mod ring;
pub mod screen;
pub mod seed;
pub mod snapshot;
pub mod sockdiag;
pub mod stdout_thread;
pub mod sysctl;
pub mod time_wait;
pub mod top;
pub mod trace;
pub mod tracefs;
pub mod tracker;
pub mod view;
pub mod workload;
