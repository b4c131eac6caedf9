//! The bench's `floor`: empty BPF programs on the hooks portx attached on this kernel, of the same
//! program types where portx is in tracepoint mode — a raw tracepoint on `inet_sock_set_state`
//! (portx's `tp_btf` there is called the same way) and classic tracepoint programs on the
//! `syscalls:` events portx uses (`sys_exit_connect`, `sys_exit_bind`, and `sys_enter_bind`
//! where portx needs it). What any tool attached there pays before doing any work (the syscall
//! tracepoints: on every syscall of the machine, see `syscall_tax`); what portx keeps below it
//! is its programs' work. fexit and kprobe hooks are not mirrored: the floor says so, and is then
//! below what a tool on portx's hooks pays. Loaded with bpf(2) directly (each program is
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

/// An empty program the floor puts beside one of portx's.
struct Twin {
    /// portx's hook, as its `started` record's `attached` names it (the state change: either of
    /// its program types).
    hooks: &'static [&'static str],
    /// The start of the names of portx's programs there, as the kernel keeps them (15 bytes).
    portx: &'static str,
    /// The floor's program there.
    floor: &'static str,
    /// Where the floor attaches it: a raw tracepoint's name, or a tracefs event.
    at: At,
}

enum At {
    RawTracepoint(&'static str),
    Tracepoint(&'static str),
}

const TWINS: [Twin; 4] = [
    Twin {
        hooks: &[
            "tp_btf:inet_sock_set_state",
            "raw_tracepoint:inet_sock_set_state",
        ],
        portx: "inet_sock_set",
        floor: STATE,
        at: At::RawTracepoint("inet_sock_set_state"),
    },
    Twin {
        hooks: &["tracepoint:syscalls:sys_exit_connect"],
        portx: "sys_exit_connec",
        floor: EXIT,
        at: At::Tracepoint("syscalls/sys_exit_connect"),
    },
    Twin {
        hooks: &["tracepoint:syscalls:sys_enter_bind"],
        portx: "sys_enter_bind",
        floor: "floor_bind_in",
        at: At::Tracepoint("syscalls/sys_enter_bind"),
    },
    // Also `sys_exit_bind_stashed` (the one after sys_enter_bind).
    Twin {
        hooks: &["tracepoint:syscalls:sys_exit_bind"],
        portx: "sys_exit_bind",
        floor: "floor_bind_out",
        at: At::Tracepoint("syscalls/sys_exit_bind"),
    },
];

/// The floor's empty program on the hook of portx's program `name` (as the kernel keeps it),
/// if the floor has one there.
pub fn empty_twin(name: &str) -> Option<&'static str> {
    TWINS
        .iter()
        .find(|t| name.starts_with(t.portx))
        .map(|t| t.floor)
}

/// The floor's twin on portx's `hook`, if it has one.
fn twin_on(hook: &str) -> Option<&'static Twin> {
    TWINS.iter().find(|t| t.hooks.contains(&hook))
}

/// The twins on portx's `hooks`; with `state_only`, the one on the state change alone.
fn twins(hooks: &[String], state_only: bool) -> impl Iterator<Item = &'static Twin> + '_ {
    hooks
        .iter()
        .filter_map(|h| twin_on(h))
        .filter(move |t| !state_only || t.floor == STATE)
}

/// Those of portx's `hooks` on which the floor puts no empty program (fexit, kprobes).
pub fn not_mirrored(hooks: &[String]) -> Vec<String> {
    hooks
        .iter()
        .filter(|h| twin_on(h).is_none())
        .cloned()
        .collect()
}

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
    /// Empty programs on portx's `hooks` (its `started` record's `attached`), but those in
    /// [`not_mirrored`].
    pub fn attach(hooks: &[String]) -> anyhow::Result<Self> {
        Self::attach_twins(hooks, false)
    }

    /// The empty program on the state change alone, where portx has a program there: what a
    /// design with no other hook would pay (the bench's `floor-state`). Every design needs the
    /// state change (it is where ports are freed); the rest of the floor is the syscall
    /// tracepoints', whose tracing path every syscall of the machine takes while one is attached.
    pub fn attach_state_change(hooks: &[String]) -> anyhow::Result<Self> {
        Self::attach_twins(hooks, true)
    }

    fn attach_twins(hooks: &[String], state_only: bool) -> anyhow::Result<Self> {
        let mut fds = Vec::new();
        for twin in twins(hooks, state_only) {
            fds.extend(match twin.at {
                At::RawTracepoint(tp) => attach_raw_tracepoint(tp, twin.floor)?,
                At::Tracepoint(event) => attach_tracepoint(event, twin.floor)?,
            });
        }
        if fds.is_empty() {
            bail!("no empty twin for any of portx's hooks {hooks:?}");
        }
        Ok(Self { _fds: fds })
    }
}

/// An empty raw tracepoint program named `name` on `tracepoint`: its link and program fds.
fn attach_raw_tracepoint(tracepoint: &str, name: &str) -> anyhow::Result<[OwnedFd; 2]> {
    let raw = load_empty(BPF_PROG_TYPE_RAW_TRACEPOINT, name)?;
    let tp = CString::new(tracepoint)?;
    let mut attr = [0u64; 2];
    attr[0] = tp.as_ptr() as u64;
    attr[1] = raw.as_raw_fd() as u64;
    let link = bpf(BPF_RAW_TRACEPOINT_OPEN, &attr)
        .with_context(|| format!("attaching to raw tracepoint {tracepoint}"))?;
    Ok([link, raw])
}

/// An empty classic tracepoint program named `name` on tracefs `event`: its perf event and
/// program fds, the program attached while both are open.
fn attach_tracepoint(event: &str, name: &str) -> anyhow::Result<[OwnedFd; 2]> {
    let tp = load_empty(BPF_PROG_TYPE_TRACEPOINT, name)?;
    let id = tracefs_event_id(event)?;
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
            .with_context(|| format!("perf_event_open({event})"));
    }
    // SAFETY: a new fd the kernel just returned to us.
    let perf = unsafe { OwnedFd::from_raw_fd(pfd as i32) };
    // SAFETY: ioctls on the perf fd with a program fd argument / none.
    unsafe {
        if libc::ioctl(perf.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, tp.as_raw_fd()) < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("PERF_EVENT_IOC_SET_BPF on {event}"));
        }
        if libc::ioctl(perf.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("PERF_EVENT_IOC_ENABLE on {event}"));
        }
    }
    Ok([perf, tp])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_portx_program_in_tracepoint_mode_has_an_empty_twin() {
        // Names as the kernel keeps them: 15 bytes.
        assert_eq!(empty_twin("inet_sock_set_s"), Some(STATE));
        assert_eq!(empty_twin("sys_exit_connec"), Some(EXIT));
        assert_eq!(empty_twin("sys_enter_bind"), Some("floor_bind_in"));
        assert_eq!(empty_twin("sys_exit_bind"), Some("floor_bind_out"));
        assert_eq!(empty_twin("sys_exit_bind_s"), Some("floor_bind_out"));
        // fentry mode's programs sit on other hooks.
        assert_eq!(empty_twin("sys_connect_fex"), None);
        // Every floor name fits the kernel's 15 bytes, so it is shown as given.
        assert!(TWINS.iter().all(|t| t.floor.len() <= 15));
    }

    #[test]
    fn the_floor_mirrors_the_hooks_portx_attached_and_names_those_it_cannot() {
        let hooks = |h: &[&str]| h.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let floor_of = |h: &str| twin_on(h).map(|t| t.floor);
        // This host: tracepoint mode, bind()'s arguments read at its exit.
        assert_eq!(floor_of("tp_btf:inet_sock_set_state"), Some(STATE));
        assert_eq!(floor_of("tracepoint:syscalls:sys_exit_connect"), Some(EXIT));
        assert_eq!(
            floor_of("tracepoint:syscalls:sys_exit_bind"),
            Some("floor_bind_out")
        );
        // An older kernel: bind()'s entry too; a raw tracepoint for the state change.
        assert_eq!(floor_of("raw_tracepoint:inet_sock_set_state"), Some(STATE));
        assert_eq!(
            floor_of("tracepoint:syscalls:sys_enter_bind"),
            Some("floor_bind_in")
        );
        // The state change's alone: its twin, whichever program type portx has there.
        let floors =
            |h: &[String], state_only| twins(h, state_only).map(|t| t.floor).collect::<Vec<_>>();
        let here = hooks(&[
            "tp_btf:inet_sock_set_state",
            "tracepoint:syscalls:sys_exit_connect",
            "tracepoint:syscalls:sys_exit_bind",
        ]);
        assert_eq!(floors(&here, false), [STATE, EXIT, "floor_bind_out"]);
        assert_eq!(floors(&here, true), [STATE]);
        let older = hooks(&[
            "raw_tracepoint:inet_sock_set_state",
            "tracepoint:syscalls:sys_enter_bind",
        ]);
        assert_eq!(floors(&older, true), [STATE]);
        // fentry mode: no twin for fexit.
        let fentry = hooks(&[
            "fexit:inet_hash_connect",
            "tp_btf:inet_sock_set_state",
            "fexit:__sys_connect",
        ]);
        assert_eq!(
            not_mirrored(&fentry),
            hooks(&["fexit:inet_hash_connect", "fexit:__sys_connect"])
        );
        assert!(not_mirrored(&hooks(&["tracepoint:syscalls:sys_exit_bind"])).is_empty());
    }
}
