//! `cargo xtask test`: every test, in the order a failure is cheapest to find.
use std::{process::Command, time::Duration};

use anyhow::Context as _;
use clap::Args;

use crate::{cmd, fuzz, setup, soak, vm};

#[derive(Args)]
pub struct TestArgs {
    /// Skip the QEMU kernel matrix.
    #[arg(long)]
    pub no_vm: bool,
    /// The wider kernel matrix (5.10, 6.18 and the newest backports kernel too).
    #[arg(long)]
    pub wide: bool,
}

/// How long the host's end-to-end tests may take, building them included (about 5 minutes on
/// this project's 2-core machines, 10 from a cold build).
const E2E_LIMIT: Duration = Duration::from_secs(30 * 60);

pub fn run(args: &TestArgs) -> anyhow::Result<()> {
    let root = cmd::root();
    setup::run(&setup::SetupArgs { no_vm: args.no_vm })?;
    let mut summary = Vec::new();
    cmd::run(
        Command::new("cargo")
            .current_dir(&root)
            .args(["build", "-p", "portx-agent"]),
    )?;
    cmd::run(Command::new("cargo").current_dir(&root).args([
        "test",
        "--workspace",
        "--exclude",
        "portx-e2e",
    ]))
    .context("unit tests")?;
    summary.push("unit tests: passed".to_string());
    // About 5 minutes here; a test that hangs stops the stage, not the whole CI budget.
    cmd::run_within(
        Command::new("cargo")
            .current_dir(&root)
            .args([
                "test",
                "-p",
                "portx-e2e",
                "--",
                "--test-threads=1",
                "--nocapture",
            ])
            .env("PORTX_AGENT", root.join("target/debug/portx-agent")),
        E2E_LIMIT,
    )
    .context("end-to-end tests on this kernel")?;
    summary.push("end-to-end tests on this kernel: passed".to_string());
    // A short soak: the agent's memory stays flat under TIME_WAIT churn (`cargo xtask soak`
    // runs the 10-minute one).
    soak::run(&soak::SoakArgs {
        seconds: 120,
        warmup: 75,
        threads: 1,
    })
    .context("2-minute soak")?;
    summary.push("2-minute soak: agent memory flat".to_string());
    fuzz::run(&fuzz::FuzzArgs {
        runs: 10_000_000,
        targets: Vec::new(),
    })
    .context("fuzzing")?;
    summary.push("fuzzing: 3 targets x 10M inputs, no crash".to_string());
    if !args.no_vm {
        let matrix = vm::run(&vm::VmArgs::defaults(args.wide))?;
        summary.push(format!("kernel matrix: {} VM runs passed", matrix.len()));
    }
    eprintln!("\nall tests passed:");
    for s in &summary {
        eprintln!("  {s}");
    }
    // A plain closing line for CI, which reads the last one (each stage fails fast, so none failed).
    println!("stages: {} passed, 0 failed", summary.len());
    Ok(())
}
