//! Tracepoints need tracefs: aya reads each tracepoint's id from it. Many hosts (this project's
//! CI among them) boot without it mounted, so the agent mounts it where the kernel expects it.
//! The syscall programs read `sys_enter_*`/`sys_exit_*` records at fixed offsets; the
//! tracepoints' `format` files are checked against them before load, so a kernel with another
//! layout is refused with a clear error instead of producing garbage.
use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use portx_common::syscall_tp;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error("tracefs is not mounted and mounting it on {path} failed: {source}")]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tracepoint {event}: field `{field}` is at offset {found:?}, portx was built for {expected}")]
    Layout {
        event: &'static str,
        field: &'static str,
        expected: usize,
        found: Option<usize>,
    },
}

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The tracefs root, mounting it at /sys/kernel/tracing if no candidate has it.
pub fn ensure_mounted() -> Result<PathBuf, TracefsError> {
    for c in CANDIDATES {
        if Path::new(c).join("events").is_dir() {
            return Ok(PathBuf::from(c));
        }
    }
    let path = PathBuf::from(CANDIDATES[0]);
    let target = CString::new(CANDIDATES[0]).expect("static path has no NUL");
    let fstype = CString::new("tracefs").expect("static string has no NUL");
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(TracefsError::Mount {
            path,
            source: std::io::Error::last_os_error(),
        });
    }
    tracing::info!("mounted tracefs on {}", path.display());
    Ok(path)
}

/// Offset of `field` in a tracepoint `format` file.
pub fn field_offset(format: &str, field: &str) -> Option<usize> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let name = decl.split_whitespace().last()?;
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        let off = rest.trim().strip_prefix("offset:")?.split(';').next()?;
        off.trim().parse().ok()
    })
}

fn check(
    root: &Path,
    event: &'static str,
    fields: &[(&'static str, usize)],
) -> Result<(), TracefsError> {
    let path = root.join("events").join(event).join("format");
    let format = std::fs::read_to_string(&path).map_err(|source| TracefsError::Read {
        path: path.clone(),
        source,
    })?;
    for &(field, expected) in fields {
        let found = field_offset(&format, field);
        if found != Some(expected) {
            return Err(TracefsError::Layout {
                event,
                field,
                expected,
                found,
            });
        }
    }
    Ok(())
}

/// Checks every tracepoint layout the kernel programs rely on.
pub fn verify_layouts(root: &Path) -> Result<(), TracefsError> {
    check(
        root,
        "syscalls/sys_enter_bind",
        &[("fd", syscall_tp::ARG0), ("umyaddr", syscall_tp::ARG1)],
    )?;
    check(
        root,
        "syscalls/sys_exit_connect",
        &[("ret", syscall_tp::RET)],
    )?;
    check(root, "syscalls/sys_exit_bind", &[("ret", syscall_tp::RET)])
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = "name: inet_sock_set_state\nID: 2287\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;\n";

    #[test]
    fn finds_field_offsets_including_arrays() {
        assert_eq!(field_offset(FORMAT, "skaddr"), Some(8));
        assert_eq!(field_offset(FORMAT, "saddr_v6"), Some(40));
        assert_eq!(field_offset(FORMAT, "saddr"), None);
        assert_eq!(field_offset("garbage", "skaddr"), None);
    }

    #[test]
    fn this_kernels_layouts_match_when_tracefs_is_there() {
        match CANDIDATES
            .iter()
            .map(Path::new)
            .find(|p| p.join("events").is_dir())
        {
            Some(root) => verify_layouts(root).expect("layouts of this kernel"),
            None => {
                eprintln!("skipped: tracefs not mounted (the agent mounts it; this test does not)")
            }
        }
    }
}
