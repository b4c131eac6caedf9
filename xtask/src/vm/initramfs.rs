//! The guest's initramfs: busybox, the static agent, the static end-to-end test binaries, and an
//! `/init` that mounts what the agent needs, runs every test binary with the hook mode given on
//! the kernel command line (`portx.hooks=`, `portx.state_hook=`), prints `PORTX-VM-RESULT rc=N` and powers off.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context as _};

use crate::cmd;

pub const MARKER: &str = "PORTX-VM-RESULT rc=";
pub const PROBE_MARKER: &str = "PORTX-VM-PROBE ok";

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp /run
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mkdir -p /sys/fs/bpf /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null
ip link set lo up
for m in /portx/modules/*.ko; do
  [ -e "$m" ] && { insmod "$m" || echo "portx-vm: insmod $m failed"; }
done
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    portx.hooks=*) HOOKS="${arg#portx.hooks=}" ;;
    portx.state_hook=*) STATE_HOOK="${arg#portx.state_hook=}" ;;
    portx.probe=1) echo "PORTX-VM-PROBE ok"; poweroff -f ;;
  esac
done
echo "portx-vm: kernel $(uname -r), hooks ${HOOKS:-auto}, state hook ${STATE_HOOK:-auto}"
export PORTX_AGENT=/portx/portx-agent PORTX_HOOKS="${HOOKS:-auto}" PORTX_STATE_HOOK="${STATE_HOOK:-auto}" RUST_BACKTRACE=1
rc=0
for t in /portx/tests/*; do
  echo "portx-vm: running $t"
  "$t" --test-threads=1 --nocapture || rc=1
done
echo "PORTX-VM-RESULT rc=$rc"
poweroff -f
"#;

const TARGET: &str = "x86_64-unknown-linux-gnu";

fn static_build(root: &Path, args: &[&str]) -> anyhow::Result<String> {
    // glibc static, baseline x86-64: the emulated CPU lacks what target-cpu=native would use.
    cmd::output(
        Command::new("cargo")
            .current_dir(root)
            .args(args)
            .args(["--release", "--target", TARGET, "--message-format=json"])
            .env("CARGO_TARGET_DIR", root.join("target/vm/build"))
            .env("RUSTFLAGS", "-C target-feature=+crt-static"),
    )
}

/// Executables in cargo's JSON messages whose manifest path ends with `manifest` (e.g.
/// `portx-agent/Cargo.toml`).
fn executables(json: &str, manifest: &str) -> Vec<PathBuf> {
    json.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact")
        .filter(|v| {
            v["manifest_path"]
                .as_str()
                .is_some_and(|m| m.ends_with(manifest))
        })
        .filter_map(|v| v["executable"].as_str().map(PathBuf::from))
        .collect()
}

/// Builds the static binaries and packs the initramfs; returns its path.
pub fn build(root: &Path) -> anyhow::Result<PathBuf> {
    eprintln!("+ building static agent and end-to-end tests for the guest");
    let agent_json = static_build(
        root,
        &["build", "-p", "portx-agent", "--bin", "portx-agent"],
    )?;
    let agent = executables(&agent_json, "portx-agent/Cargo.toml")
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("cargo built no portx-agent executable"))?;
    let tests_json = static_build(root, &["test", "-p", "portx-e2e", "--no-run"])?;
    let tests = executables(&tests_json, "tests/Cargo.toml");
    if tests.is_empty() {
        bail!("cargo built no portx-e2e test executables");
    }
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        bail!("/bin/busybox missing: run `cargo xtask setup` (busybox-static)");
    }

    let stage = root.join("target/vm/initramfs");
    let _ = fs::remove_dir_all(&stage);
    for d in ["bin", "dev", "portx/tests", "proc", "sys", "tmp"] {
        fs::create_dir_all(stage.join(d))?;
    }
    fs::copy(busybox, stage.join("bin/busybox"))?;
    fs::copy(&agent, stage.join("portx/portx-agent"))?;
    for t in &tests {
        let name = t.file_name().and_then(|n| n.to_str()).unwrap_or("test");
        // cargo names test binaries <name>-<hash>; keep the name only.
        let short = name.rsplit_once('-').map_or(name, |(n, _)| n);
        fs::copy(t, stage.join("portx/tests").join(short))?;
    }
    let init = stage.join("init");
    fs::write(&init, INIT)?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    // Without /dev/console in the archive the kernel has nowhere to print init's output.
    cmd::run(
        Command::new("mknod")
            .arg(stage.join("dev/console"))
            .args(["c", "5", "1"]),
    )?;
    let out = root.join("target/vm/initramfs.cpio.gz");
    cmd::run(
        Command::new("sh")
            .current_dir(&stage)
            .arg("-c")
            .arg(format!(
                "find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
                out.display()
            )),
    )
    .context("packing the initramfs")?;
    Ok(out)
}

/// The base initramfs plus a second archive with this kernel's modules (the kernel unpacks
/// concatenated archives in order).
pub fn with_modules(
    root: &Path,
    base: &Path,
    spec: &str,
    modules: &[PathBuf],
) -> anyhow::Result<PathBuf> {
    let stage = root.join("target/vm/modules-stage").join(spec);
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(stage.join("portx/modules"))?;
    for (i, m) in modules.iter().enumerate() {
        let name = m
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("module.ko");
        // Numbered so that the shell glob in /init loads them in dependency order.
        fs::copy(m, stage.join("portx/modules").join(format!("{i}-{name}")))
            .with_context(|| format!("copying {}", m.display()))?;
    }
    let extra = root.join(format!("target/vm/modules-{spec}.cpio.gz"));
    cmd::run(
        Command::new("sh")
            .current_dir(&stage)
            .arg("-c")
            .arg(format!(
                "find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
                extra.display()
            )),
    )?;
    let out = root.join(format!("target/vm/initramfs-{spec}.cpio.gz"));
    let mut bytes = fs::read(base)?;
    bytes.extend(fs::read(&extra)?);
    fs::write(&out, bytes)?;
    Ok(out)
}
