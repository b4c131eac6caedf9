//! `cargo xtask fuzz`: every cargo-fuzz target in `fuzz/` (ring-buffer records, sock_diag
//! replies, /proc and sysctl text) for `--runs` inputs each, starting from and adding to the
//! corpus kept in `fuzz/corpus/<target>`. A crash, a panic or a leak fails it; libFuzzer writes the
//! input to `fuzz/artifacts/<target>/`.
use std::process::Command;

use anyhow::Context as _;
use clap::Args;

use crate::{cmd, setup};

#[derive(Args)]
pub struct FuzzArgs {
    /// Inputs per target.
    #[arg(long, default_value_t = 10_000_000)]
    pub runs: u64,
    /// Only this target (repeatable; default: all).
    #[arg(long = "target", value_parser = TARGETS)]
    pub targets: Vec<String>,
}

/// Targets and the longest input worth trying for each.
const TARGETS: [&str; 3] = ["decoder", "sockdiag", "proc_text"];

fn max_len(target: &str) -> u32 {
    match target {
        // Several netlink messages in one reply.
        "sockdiag" => 4096,
        "decoder" => 512,
        _ => 256,
    }
}

pub fn run(args: &FuzzArgs) -> anyhow::Result<()> {
    setup::ensure_cargo_fuzz().context("installing cargo-fuzz")?;
    let dir = cmd::root().join("fuzz");
    for target in TARGETS
        .iter()
        .filter(|t| args.targets.is_empty() || args.targets.iter().any(|a| a == *t))
    {
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        cmd::run(
            Command::new("cargo")
                .current_dir(&dir)
                .args(["+nightly", "fuzz", "run", "-O", target])
                .arg(&corpus)
                .arg("--")
                .arg(format!("-runs={}", args.runs))
                .arg(format!("-max_len={}", max_len(target)))
                .arg("-print_final_stats=1"),
        )
        .with_context(|| {
            format!("fuzz target {target} failed (input in fuzz/artifacts/{target}/)")
        })?;
        eprintln!("fuzz: {target}: {} inputs, no crash", args.runs);
    }
    Ok(())
}
