//! Command line (clap derive).
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "portx-agent", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Test and demo workloads (connect storms, port hogs) — used by `demo` and the tests.
    #[command(hide = true, subcommand)]
    Workload(crate::workload::WorkloadCmd),
}
