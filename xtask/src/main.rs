//! Project automation: `cargo xtask setup | test | vm-test | bench | soak | fuzz`.
mod bench;
mod bpf;
mod cmd;
mod floor;
mod fuzz;
mod host;
mod own_cpu;
mod setup;
mod soak;
mod syscall_tax;
mod targets;
mod test;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "portx build, setup and test automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need (idempotent): rust-src, bpf-linker, Debian packages.
    Setup(setup::SetupArgs),
    /// Every test: setup, unit tests, end-to-end tests on this kernel, the VM kernel matrix.
    Test(test::TestArgs),
    /// The end-to-end tests on Debian kernels in QEMU, once per hook mode.
    VmTest(vm::VmArgs),
    /// Measure portx's overhead against nothing, tcpstates and bpftrace (not a test).
    Bench(bench::BenchArgs),
    /// Run the agent under a TIME_WAIT churn for a while; fail if its memory keeps growing.
    Soak(soak::SoakArgs),
    /// Run every cargo-fuzz target (10M inputs each by default).
    Fuzz(fuzz::FuzzArgs),
}

/// Errors are printed as their chain of contexts, without the backtrace `anyhow` captures under
/// `RUST_BACKTRACE=1` (set in CI): a failed VM row's own report is the part worth reading.
fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Setup(a) => setup::run(&a),
        Command::Test(a) => test::run(&a),
        Command::VmTest(a) => vm::run(&a).map(|_| ()),
        Command::Bench(a) => bench::run(&a),
        Command::Soak(a) => soak::run(&a),
        Command::Fuzz(a) => fuzz::run(&a),
    }
}
