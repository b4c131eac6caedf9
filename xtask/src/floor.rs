//! The bench's `floor`: empty BPF programs on the hooks portx uses in tracepoint mode, of the same
//! program types — a raw tracepoint on `inet_sock_set_state` and a classic tracepoint program on
//! `syscalls:sys_exit_connect`. What any tool attached there pays before doing any work; what
//! portx keeps below it is its programs' work. Loaded with bpf(2) directly (each program is
//! `r0 = 0; exit`), held while the value lives, detached on drop.
use std::{
    ffi::CString,
    fs,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{bail, Context as _};

use crate::bpf::{bpf, BPF_PROG_LOAD, BPF_RAW_TRACEPOINT_OPEN};

const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `_IO('$', 8)` and `_IOW('$', 0, __u32)`.
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;

/// `mov r0, 0; exit`.
const EMPTY: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];

pub struct Floor {
    _fds: Vec<OwnedFd>,
}

/// The floor's program on the state change, by the name the kernel shows.
pub const STATE: &str = "floor_state";
/// The floor's program on connect()'s exit.
pub const EXIT: &str = "floor_exit";

/// BPF_PROG_LOAD of the empty program as `prog_type`, named `name` (at most 15 bytes).
fn load_empty(prog_type: u32, name: &str) -> anyhow::Result<OwnedFd> {
    let license = CString::new("GPL")?;
    let mut attr = [0u64; 16];
    // prog_type (u32), insn_cnt (u32), insns (u64), license (u64); log fields, kern_version and
    // prog_flags stay 0; prog_name[16] at byte 48.
    attr[0] = u64::from(prog_type) | (EMPTY.len() as u64) << 32;
    attr[1] = EMPTY.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    let mut prog_name = [0u8; 16];
    let len = name.len().min(15);
    prog_name[..len].copy_from_slice(&name.as_bytes()[..len]);
    for (i, half) in prog_name.chunks_exact(8).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(half);
        attr[6 + i] = u64::from_ne_bytes(b);
    }
    bpf(BPF_PROG_LOAD, &attr)
        .with_context(|| format!("loading an empty program of type {prog_type}"))
}

fn tracefs_event_id(event: &str) -> anyhow::Result<u64> {
    for root in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        let path = format!("{root}/events/{event}/id");
        if let Ok(s) = fs::read_to_string(&path) {
            return s.trim().parse().with_context(|| format!("{path}: {s:?}"));
        }
    }
    bail!("no tracefs id for {event} (is tracefs mounted?)")
}

impl Floor {
    pub fn attach() -> anyhow::Result<Self> {
        let raw = load_empty(BPF_PROG_TYPE_RAW_TRACEPOINT, STATE)?;
        let name = CString::new("inet_sock_set_state")?;
        let mut attr = [0u64; 2];
        attr[0] = name.as_ptr() as u64;
        attr[1] = raw.as_raw_fd() as u64;
        let link = bpf(BPF_RAW_TRACEPOINT_OPEN, &attr)
            .context("attaching to raw tracepoint inet_sock_set_state")?;

        let tp = load_empty(BPF_PROG_TYPE_TRACEPOINT, EXIT)?;
        let id = tracefs_event_id("syscalls/sys_exit_connect")?;
        // perf_event_attr, its first 64 bytes (PERF_ATTR_SIZE_VER0): type, size, config,
        // sample_period 1, wakeup_events 1; everything else 0.
        let mut pattr = [0u64; 8];
        pattr[0] = u64::from(PERF_TYPE_TRACEPOINT) | 64 << 32;
        pattr[1] = id;
        pattr[2] = 1;
        pattr[6] = 1;
        // SAFETY: a valid attr; pid -1 with cpu 0 and no group, as every tracepoint program uses
        // (the program runs on every CPU: it hangs on the event, not on this perf event).
        let pfd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                pattr.as_ptr(),
                -1,
                0,
                -1,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if pfd < 0 {
            return Err(std::io::Error::last_os_error())
                .context("perf_event_open(syscalls:sys_exit_connect)");
        }
        // SAFETY: a new fd the kernel just returned to us.
        let perf = unsafe { OwnedFd::from_raw_fd(pfd as i32) };
        // SAFETY: ioctls on the perf fd with a program fd argument / none.
        unsafe {
            if libc::ioctl(perf.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, tp.as_raw_fd()) < 0 {
                return Err(std::io::Error::last_os_error()).context("PERF_EVENT_IOC_SET_BPF");
            }
            if libc::ioctl(perf.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) < 0 {
                return Err(std::io::Error::last_os_error()).context("PERF_EVENT_IOC_ENABLE");
            }
        }
        Ok(Self {
            _fds: vec![link, raw, perf, tp],
        })
    }
}
