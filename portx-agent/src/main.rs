use std::process::ExitCode;

use clap::Parser as _;
use portx_agent::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Workload(cmd) => portx_agent::workload::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portx-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
