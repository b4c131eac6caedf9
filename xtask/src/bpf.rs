//! The few bpf(2) commands the bench issues itself (xtask does not link aya): loading the floor's
//! empty programs, switching the kernel's run-time statistics on for a measurement, and naming a
//! program by its id.
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::Context as _;

pub const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
pub const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u64 = 0;
/// `struct bpf_prog_info` up to and including `name[16]` (at byte 64, since Linux 4.15).
const PROG_INFO_NAME_END: usize = 80;

/// bpf(2) with `attr`, a zero-padded `union bpf_attr` of the size passed; the new fd it returns.
pub fn bpf(cmd: libc::c_long, attr: &[u64]) -> std::io::Result<OwnedFd> {
    let ret = bpf_raw(cmd, attr)?;
    // SAFETY: a new fd the kernel just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}

fn bpf_raw(cmd: libc::c_long, attr: &[u64]) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a zero-padded bpf_attr of the size passed; whatever it points to outlives
    // the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ret)
}

/// The kernel's BPF run-time statistics (`run_time_ns`, `run_cnt` of every program), on while
/// this value lives — and off again when it is dropped or this process dies, unlike the
/// `kernel.bpf_stats_enabled` sysctl. While on, every program run on the host reads the clock
/// twice more.
pub struct RunTimeStats {
    _fd: OwnedFd,
}

impl RunTimeStats {
    pub fn enable() -> anyhow::Result<Self> {
        let fd = bpf(BPF_ENABLE_STATS, &[BPF_STATS_RUN_TIME])
            .context("BPF_ENABLE_STATS (BPF_STATS_RUN_TIME, Linux 5.8+)")?;
        Ok(Self { _fd: fd })
    }
}

/// The name program `id` was loaded with (the kernel keeps 15 bytes of it).
pub fn prog_name(id: u32) -> anyhow::Result<String> {
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &[u64::from(id)])
        .with_context(|| format!("BPF_PROG_GET_FD_BY_ID {id}"))?;
    let mut info = [0u8; PROG_INFO_NAME_END];
    // bpf_fd (u32), info_len (u32), info (u64).
    let attr = [
        fd.as_raw_fd() as u64 | (PROG_INFO_NAME_END as u64) << 32,
        info.as_mut_ptr() as u64,
    ];
    bpf_raw(BPF_OBJ_GET_INFO_BY_FD, &attr)
        .with_context(|| format!("BPF_OBJ_GET_INFO_BY_FD of program {id}"))?;
    let name = &info[64..PROG_INFO_NAME_END];
    let len = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..len]).into_owned())
}
