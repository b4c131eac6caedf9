//! `cargo xtask setup`: everything building and testing portx needs, installed only when
//! missing, so a second run is a fast no-op.
use std::process::Command;

use anyhow::{bail, Context as _};
use clap::Args;

use crate::cmd;

#[derive(Args, Default)]
pub struct SetupArgs {
    /// Skip the packages only the VM tests need (qemu-system-x86, busybox-static, cpio).
    #[arg(long)]
    pub no_vm: bool,
}

/// Debian packages: bpftool (tests check that nothing stays loaded), tmux and procps (the `top`
/// screen's end-to-end test drives it in one and looks for the agent with pgrep; minimal images
/// lack procps); the VM tests' QEMU, busybox and cpio (installing qemu-system-x86 this way
/// replaces the preinstalled qemu-utils), and xz-utils and zstd for the kernel modules Debian
/// ships compressed.
const PACKAGES: &[&str] = &["bpftool", "tmux", "procps"];
const VM_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils",
    "zstd",
];

fn has_toolchain(name: &str) -> bool {
    cmd::ok(
        Command::new("rustc")
            .arg(format!("+{name}"))
            .arg("--version"),
    )
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let toolchain = if has_toolchain("nightly") {
        "nightly"
    } else {
        "stable"
    };
    let installed = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        toolchain,
    ]))
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    if let Ok(v) = cmd::output(Command::new("bpf-linker").arg("--version")) {
        if v.contains(" 0.13") {
            return Ok(());
        }
    }
    if !has_toolchain("nightly") {
        bail!("bpf-linker 0.13 is built against the nightly toolchain's LLVM, and no nightly is installed (`rustup toolchain install nightly`)");
    }
    let sysroot = cmd::output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = std::path::Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .find_map(|n| {
            n.strip_prefix("lib")
                .and_then(|n| n.strip_suffix(".so"))
                .filter(|n| n.starts_with("LLVM"))
                .map(str::to_string)
        })
        .with_context(|| format!("no libLLVM*.so in {}", lib.display()))?;
    let major = llvm
        .strip_prefix("LLVM-")
        .and_then(|r| r.split(['-', '.']).next())
        .context("unexpected libLLVM name")?
        .to_string();
    let rustflags = format!(
        "-L {0} -C link-arg=-l{llvm} -C link-arg=-Wl,-rpath,{0}",
        lib.display()
    );
    cmd::run(
        Command::new("cargo")
            .args([
                "+nightly",
                "install",
                "bpf-linker",
                "--version",
                "^0.13",
                "--locked",
            ])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major},no-llvm-linking"))
            .env("RUSTFLAGS", rustflags),
    )
}

/// cargo-fuzz 0.13 (for `cargo xtask fuzz`), installed only when missing.
pub fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    if let Ok(v) = cmd::output(Command::new("cargo").args(["fuzz", "--version"])) {
        if v.contains(" 0.13") {
            return Ok(());
        }
    }
    cmd::run(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--version",
        "^0.13",
        "--locked",
    ]))
}

fn missing(packages: &[&str]) -> Vec<String> {
    packages
        .iter()
        .filter(|p| {
            !cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .map(|s| s.contains("install ok installed"))
                .unwrap_or(false)
        })
        .map(|p| p.to_string())
        .collect()
}

pub fn ensure_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing = missing(packages);
    if missing.is_empty() {
        return Ok(());
    }
    cmd::run(Command::new("apt-get").args(["update", "-qq"]))?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

pub fn run(args: &SetupArgs) -> anyhow::Result<()> {
    ensure_rust_src().context("rust-src")?;
    ensure_bpf_linker().context("bpf-linker")?;
    let mut packages = PACKAGES.to_vec();
    if !args.no_vm {
        packages.extend_from_slice(VM_PACKAGES);
    }
    ensure_packages(&packages).context("Debian packages")?;
    eprintln!(
        "setup: rust-src, bpf-linker and {} are present",
        packages.join(", ")
    );
    Ok(())
}
