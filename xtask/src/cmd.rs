//! Running commands: echo them, fail with context.
use std::{
    path::PathBuf,
    process::{Command, Output},
};

use anyhow::{bail, Context as _};

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs with inherited stdio, printing the command first; error on non-zero exit.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let line = show(cmd);
    eprintln!("+ {line}");
    let status = cmd.status().with_context(|| format!("starting `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs and captures stdout as text; error (with stderr) on non-zero exit.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    output_bytes(cmd).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// True if the command runs and exits 0 (output discarded).
pub fn ok(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

/// Runs and captures raw stdout; error (with stderr) on non-zero exit.
pub fn output_bytes(cmd: &mut Command) -> anyhow::Result<Vec<u8>> {
    let line = show(cmd);
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().with_context(|| format!("starting `{line}`"))?;
    if !status.success() {
        bail!(
            "`{line}` failed ({status}): {}",
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    Ok(stdout)
}
