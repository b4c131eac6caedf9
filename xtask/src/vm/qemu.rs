//! Booting a kernel under QEMU with a timeout, reading the result marker from its serial log.
//! KVM is tried once with a short probe boot; where it is missing or broken (a software nested
//! /dev/kvm aborts or crawls) TCG is used.
use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::initramfs::{MARKER, PROBE_MARKER};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

pub struct Boot {
    /// The marker's exit code, if the guest got that far.
    pub rc: Option<i32>,
    pub timed_out: bool,
    pub secs: f64,
}

/// What a guest runs on.
#[derive(Clone, Copy)]
pub struct Machine {
    pub accel: Accel,
    pub cpus: u8,
}

pub fn boot(
    machine: Machine,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    log: &Path,
    timeout: Duration,
    marker: &str,
) -> anyhow::Result<Boot> {
    let _ = fs::remove_file(log);
    // qemu's own complaints (a kernel or initrd it cannot load, an accelerator it cannot use):
    // to a file, not a pipe nobody reads (a full one would stall qemu until the timeout), and
    // onto the end of the serial log afterwards, where a failed row's note looks.
    let stderr_path = log.with_extension("qemu-stderr");
    let stderr = fs::File::create(&stderr_path)
        .with_context(|| format!("creating {}", stderr_path.display()))?;
    let (accel_arg, cpu) = match machine.accel {
        Accel::Kvm => ("kvm", "host"),
        Accel::Tcg => ("tcg", "max"),
    };
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", accel_arg, "-cpu", cpu, "-m", "1024"])
        .args(["-smp", &machine.cpus.to_string()])
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-nic",
            "none",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet {cmdline}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .spawn()
        .context("starting qemu-system-x86_64 (cargo xtask setup installs it)")?;
    let mut timed_out = false;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let complaints = fs::read_to_string(&stderr_path).unwrap_or_default();
    let _ = fs::remove_file(&stderr_path);
    let mut text = fs::read_to_string(log).unwrap_or_default();
    if !complaints.trim().is_empty() {
        text.push_str("\n--- qemu stderr ---\n");
        text.push_str(&complaints);
        fs::write(log, &text).with_context(|| format!("writing {}", log.display()))?;
    }
    let rc = if marker == PROBE_MARKER {
        text.contains(PROBE_MARKER).then_some(0)
    } else {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(MARKER))
            .and_then(|r| r.trim().parse().ok())
    };
    Ok(Boot {
        rc,
        timed_out,
        secs: started.elapsed().as_secs_f64(),
    })
}

/// KVM if a probe boot with it reaches init within 20 s, else TCG.
pub fn choose_accel(kernel: &Path, initrd: &Path, log: &Path) -> Accel {
    if !Path::new("/dev/kvm").exists() {
        return Accel::Tcg;
    }
    match boot(
        Machine {
            accel: Accel::Kvm,
            cpus: 1,
        },
        kernel,
        initrd,
        "portx.probe=1",
        log,
        Duration::from_secs(20),
        PROBE_MARKER,
    ) {
        Ok(b) if b.rc == Some(0) => {
            eprintln!("vm: KVM works ({:.1} s probe boot)", b.secs);
            Accel::Kvm
        }
        _ => {
            eprintln!("vm: KVM unusable here; using TCG (software emulation)");
            Accel::Tcg
        }
    }
}
