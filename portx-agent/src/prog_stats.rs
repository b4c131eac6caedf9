//! Runs the kernel skipped: when a BPF program would run while another one is already running on
//! the same CPU (e.g. a state change in softirq interrupting a syscall tracepoint program), the
//! kernel does not run it and counts a `recursion_miss` on it (Linux 5.12+). Those are events
//! portx never saw; they are reported as `missed`, never dropped silently.
use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::Ebpf;
use aya_obj::generated::bpf_prog_info;

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn recursion_misses(fd: i32) -> std::io::Result<u64> {
    // SAFETY: bpf_prog_info is plain data; zeroed is a valid value.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let attr = InfoAttr {
        bpf_fd: fd as u32,
        info_len: std::mem::size_of::<bpf_prog_info>() as u32,
        info: &mut info as *mut bpf_prog_info as u64,
    };
    // SAFETY: attr and info are valid for the sizes given; the kernel writes at most info_len
    // bytes (fewer on older kernels, leaving newer fields zero).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr as *const InfoAttr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info.recursion_misses)
}

/// `recursion_misses` of every loaded program of `ebpf` that has any (none before Linux 5.12).
pub fn missed_runs(ebpf: &Ebpf) -> Vec<(String, u64)> {
    ebpf.programs()
        .filter_map(|(name, p)| Some((name.to_string(), p.fd().ok()?)))
        .filter_map(|(name, fd)| Some((name, recursion_misses(fd.as_fd().as_raw_fd()).ok()?)))
        .filter(|(_, n)| *n > 0)
        .collect()
}
