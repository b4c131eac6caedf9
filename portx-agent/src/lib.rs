//! portx agent: loads the eBPF programs, reads the ring buffer and keeps the live table of
//! ephemeral-port use per destination.
//!
//! Event flow, one module a step:
//! kernel ([`loader`], [`hooks`]) -> ring buffer ([`reader`]) -> [`decoder`] -> [`tracker`]
//! -> [`report`] -> [`output`]. The kernel's own truth comes from [`sockdiag`], [`procfs`],
//! [`sysctl`] and [`netns`], folded into the tracker by [`seed`]. [`trace`] runs the loop.
pub mod btf;
pub mod cli;
pub mod netns;
pub mod procfs;
pub mod sockdiag;
pub mod sysctl;
pub mod workload;
