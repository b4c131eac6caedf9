//! What the agent needs from the kernel before it touches anything: capabilities, BTF, ring
//! buffers. Each failure is one line that names the missing piece, so nothing is half-attached.
use std::path::Path;

use thiserror::Error;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, Error)]
pub enum PrivilegeError {
    #[error(
        "missing {0}: loading eBPF needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN); run as root, e.g. `sudo portx-agent trace`"
    )]
    MissingCapability(&'static str),
    #[error("cannot read capabilities from /proc/self/status: {0}")]
    Status(std::io::Error),
    #[error("kernel has no BTF (/sys/kernel/btf/vmlinux missing): portx needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (Linux 5.4+)")]
    NoBtf,
    #[error("kernel does not support BPF ring buffers (needs Linux 5.8+): {0}")]
    NoRingBuf(String),
}

/// Effective capability set, from `CapEff:` in /proc/self/status.
pub fn effective_caps(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

fn has(caps: u64, cap: u32) -> bool {
    caps & (1u64 << cap) != 0
}

/// Which capability is missing for loading and attaching, if any.
pub fn missing_for_bpf(caps: u64) -> Option<&'static str> {
    if has(caps, CAP_SYS_ADMIN) {
        return None;
    }
    match (has(caps, CAP_BPF), has(caps, CAP_PERFMON)) {
        (true, true) => None,
        (false, true) => Some("CAP_BPF"),
        (true, false) => Some("CAP_PERFMON"),
        (false, false) => Some("CAP_BPF and CAP_PERFMON"),
    }
}

/// Checks capabilities, BTF and ring-buffer support, in that order.
pub fn check() -> Result<(), PrivilegeError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(PrivilegeError::Status)?;
    let caps = effective_caps(&status).unwrap_or(0);
    if let Some(missing) = missing_for_bpf(caps) {
        return Err(PrivilegeError::MissingCapability(missing));
    }
    if !has(caps, CAP_SYS_ADMIN) {
        tracing::warn!(
            "no CAP_SYS_ADMIN: other network namespaces' port ranges cannot be read (setns)"
        );
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(PrivilegeError::NoBtf);
    }
    match aya::sys::is_map_supported(aya::maps::MapType::RingBuf) {
        Ok(true) => Ok(()),
        Ok(false) => Err(PrivilegeError::NoRingBuf(
            "BPF_MAP_TYPE_RINGBUF refused".into(),
        )),
        Err(e) => Err(PrivilegeError::NoRingBuf(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cap_eff() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(status), Some(0x1ff_ffff_ffff));
        assert_eq!(effective_caps("Name: x\n"), None);
    }

    #[test]
    fn names_the_missing_capability() {
        assert_eq!(missing_for_bpf(0), Some("CAP_BPF and CAP_PERFMON"));
        assert_eq!(missing_for_bpf(1 << CAP_BPF), Some("CAP_PERFMON"));
        assert_eq!(missing_for_bpf(1 << CAP_PERFMON), Some("CAP_BPF"));
        assert_eq!(missing_for_bpf((1 << CAP_BPF) | (1 << CAP_PERFMON)), None);
        assert_eq!(missing_for_bpf(1 << CAP_SYS_ADMIN), None);
    }
}
