//! Network namespaces: identified by the inode of their nsfs file (the kernel's `net->ns.inum`,
//! which the eBPF programs report), found through /proc/<pid>/ns/net and /run/netns, and entered
//! from a short-lived thread (setns affects only the calling thread) to read per-namespace state.
use std::{
    collections::HashSet,
    fs,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use thiserror::Error;

/// Inode number of a netns file == kernel `net->ns.inum`.
pub type NetnsId = u32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetnsRef {
    pub id: NetnsId,
    /// `/proc/<pid>/ns/net` or `/run/netns/<name>`.
    pub path: PathBuf,
}

#[derive(Debug, Error)]
pub enum NetnsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("setns into {path}: {source}")]
    Setns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the thread working in {0} panicked")]
    Thread(PathBuf),
    #[error("{path} is network namespace {found} now, not {expected} (its process gone, the pid reused)")]
    Moved {
        path: PathBuf,
        expected: NetnsId,
        found: NetnsId,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> NetnsError + '_ {
    move |source| NetnsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn id_of_path(path: &Path) -> Result<NetnsId, NetnsError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    Ok(meta.ino() as NetnsId)
}

/// `NS_GET_NSTYPE` (`_IO(0xb7, 0x3)`, Linux 4.11): the `CLONE_NEW*` type of a namespace file.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// What `--netns` names: an inode number as the records carry it, a namespace file
/// (`/proc/<pid>/ns/net`, `/run/netns/<name>`, a container runtime's bind mount), or a name that
/// `ip netns` made (looked up in `/run/netns`). A file must be a network namespace's: a path
/// that is anything else is refused, not read as an inode.
pub fn resolve_arg(arg: &str) -> Result<NetnsId, String> {
    if !arg.is_empty() && arg.bytes().all(|b| b.is_ascii_digit()) {
        return match arg.parse::<NetnsId>() {
            Ok(0) | Err(_) => Err(format!(
                "`{arg}` is not a namespace inode (1 to {})",
                NetnsId::MAX
            )),
            Ok(id) => Ok(id),
        };
    }
    if arg.is_empty() || arg == "." || arg == ".." {
        return Err(format!("`{arg}` is not a network namespace"));
    }
    let path = if arg.contains('/') {
        PathBuf::from(arg)
    } else {
        Path::new("/run/netns").join(arg)
    };
    let file = fs::File::open(&path).map_err(|e| {
        if arg.contains('/') {
            format!("{}: {e}", path.display())
        } else {
            format!(
                "`{arg}`: no such network namespace ({}: {e}); give an inode number, a path such \
                 as /proc/<pid>/ns/net, or a name `ip netns list` shows",
                path.display()
            )
        }
    })?;
    // SAFETY: an ioctl without an argument on a file this function holds open.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    if kind != libc::CLONE_NEWNET {
        return Err(format!(
            "{}: not a network namespace file (such as /proc/<pid>/ns/net)",
            path.display()
        ));
    }
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(meta.ino() as NetnsId)
}

/// Those of `ids` that no process, thread or mount holds now: a typo, or a namespace gone.
pub fn not_found(ids: &[NetnsId]) -> Result<Vec<NetnsId>, NetnsError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut missing: Vec<NetnsId> = ids.to_vec();
    scan(|r| {
        missing.retain(|id| *id != r.id);
        missing.is_empty()
    })?;
    let held = held_elsewhere(&missing.iter().copied().collect());
    missing.retain(|id| !held.contains(id));
    Ok(missing)
}

/// Warns on stderr of each `--netns` namespace that nothing holds: its records would never come,
/// and an empty table must not read as a quiet namespace.
pub fn warn_not_found(ids: &[NetnsId]) {
    match not_found(ids) {
        Ok(missing) => {
            for id in missing {
                tracing::warn!(
                    "--netns {id}: no process, thread or mount holds a network namespace with \
                     this inode; nothing will be reported for it unless one does"
                );
            }
        }
        Err(e) => tracing::warn!("cannot check that the --netns namespaces exist: {e}"),
    }
}

/// Those of `ids` that something other than what [`discover`] looks at holds: a thread that
/// entered another namespace than its process's first thread (`/proc/<pid>/task/<tid>/ns/net`),
/// or a namespace mounted outside /run/netns (an `nsfs` mount in `/proc/self/mountinfo`, such as
/// a container runtime's). A walk over every thread: made only for namespaces the quicker
/// listing did not find. (A namespace only an open file or a mount in another mount namespace
/// holds is not found.)
pub fn held_elsewhere(ids: &HashSet<NetnsId>) -> HashSet<NetnsId> {
    let mut held = HashSet::new();
    if ids.is_empty() {
        return held;
    }
    if let Ok(text) = fs::read_to_string("/proc/self/mountinfo") {
        held.extend(
            text.lines()
                .filter_map(nsfs_mount)
                .filter(|id| ids.contains(id)),
        );
    }
    let Ok(procs) = fs::read_dir("/proc") else {
        return held;
    };
    for p in procs.flatten() {
        if !crate::procfs::is_pid_dir(&p.file_name()) {
            continue;
        }
        let Ok(tasks) = fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            match id_of_path(&t.path().join("ns/net")) {
                Ok(id) if ids.contains(&id) => {
                    held.insert(id);
                    if held.len() == ids.len() {
                        return held;
                    }
                }
                _ => {}
            }
        }
    }
    held
}

/// The network namespace a `/proc/self/mountinfo` line mounts, if it is an `nsfs` mount of one:
/// `36 25 0:4 net:[4026532177] /run/netns/a rw shared:5 - nsfs nsfs rw`.
fn nsfs_mount(line: &str) -> Option<NetnsId> {
    let (mount, fs) = line.split_once(" - ")?;
    if fs.split_whitespace().next()? != "nsfs" {
        return None;
    }
    mount
        .split_whitespace()
        .nth(3)?
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The calling thread's netns.
pub fn self_id() -> Result<NetnsId, NetnsError> {
    id_of_path(Path::new("/proc/thread-self/ns/net"))
}

pub fn id_of_pid(pid: u32) -> Result<NetnsId, NetnsError> {
    id_of_path(&PathBuf::from(format!("/proc/{pid}/ns/net")))
}

/// Every distinct netns with a process, plus those bind-mounted in /run/netns.
pub fn discover() -> Result<Vec<NetnsRef>, NetnsError> {
    let mut out = Vec::new();
    scan(|r| {
        out.push(r);
        false
    })?;
    Ok(out)
}

/// A path to netns `id`, if anything still holds it.
pub fn find(id: NetnsId) -> Result<Option<NetnsRef>, NetnsError> {
    let mut found = None;
    scan(|r| {
        if r.id == id {
            found = Some(r);
            true
        } else {
            false
        }
    })?;
    Ok(found)
}

/// Calls `f` once per distinct netns until it returns true.
fn scan(mut f: impl FnMut(NetnsRef) -> bool) -> Result<(), NetnsError> {
    let mut seen = HashSet::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(dir) = fs::read_dir("/run/netns") {
        candidates.extend(dir.flatten().map(|e| e.path()));
    }
    let proc = Path::new("/proc");
    let entries = fs::read_dir(proc).map_err(io_err(proc))?;
    for e in entries.flatten() {
        if crate::procfs::is_pid_dir(&e.file_name()) {
            candidates.push(e.path().join("ns/net"));
        }
    }
    for path in candidates {
        // Processes exit and mounts go away while we scan: skip what vanished.
        let Ok(id) = id_of_path(&path) else { continue };
        if seen.insert(id) && f(NetnsRef { id, path }) {
            break;
        }
    }
    Ok(())
}

/// Runs `f` on a new thread that has entered the netns at `path`, which must be namespace
/// `expect`; the caller is untouched. The namespace entered is the file opened, checked: a
/// `/proc/<pid>/ns/net` listed a moment ago may be another process's namespace by now.
pub fn run_in<T: Send + 'static>(
    path: &Path,
    expect: NetnsId,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    let file = fs::File::open(path).map_err(io_err(path))?;
    let found = file.metadata().map_err(io_err(path))?.ino() as NetnsId;
    if found != expect {
        return Err(NetnsError::Moved {
            path: path.to_path_buf(),
            expected: expect,
            found,
        });
    }
    let owned = path.to_path_buf();
    let handle = std::thread::Builder::new()
        .name("portx-netns".into())
        .spawn(move || -> Result<T, NetnsError> {
            // SAFETY: setns on a valid fd; it changes only this thread's namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(NetnsError::Setns {
                    path: owned,
                    source: std::io::Error::last_os_error(),
                });
            }
            Ok(f())
        })
        .map_err(io_err(path))?;
    handle
        .join()
        .map_err(|_| NetnsError::Thread(path.to_path_buf()))?
}

/// Sets `lo` up in the calling thread's netns (a new netns starts with it down).
pub fn bring_lo_up() -> std::io::Result<()> {
    // SAFETY: plain socket/ioctl calls on a struct we own; the fd is closed below.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let mut rc = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            rc = libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        }
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err);
        }
    }
    Ok(())
}

/// Moves the calling thread into a new, empty netns with `lo` up. For tests and workloads.
pub fn unshare_new() -> std::io::Result<NetnsId> {
    // SAFETY: unshare affects only the calling thread (CLONE_NEWNET).
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    bring_lo_up()?;
    self_id().map_err(|e| std::io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        let ok = unsafe { libc::geteuid() } == 0;
        if !ok {
            eprintln!("skipped: needs root (unshare/setns)");
        }
        ok
    }

    #[test]
    fn own_netns_is_discovered() {
        let me = id_of_pid(std::process::id()).unwrap();
        let all = discover().unwrap();
        assert!(all.iter().any(|r| r.id == me));
        assert_eq!(find(me).unwrap().map(|r| r.id), Some(me));
    }

    #[test]
    fn netns_args_resolve_to_inodes() {
        let me = id_of_pid(std::process::id()).unwrap();
        assert_eq!(resolve_arg("4026531840"), Ok(4026531840));
        assert_eq!(resolve_arg("/proc/self/ns/net"), Ok(me));
        assert_eq!(
            resolve_arg(&format!("/proc/{}/ns/net", std::process::id())),
            Ok(me)
        );
        for bad in ["0", "4294967296", "", "..", "-1"] {
            assert!(resolve_arg(bad).is_err(), "{bad:?} accepted");
        }
        // A namespace file of another type, and a file that is no namespace's.
        let mnt = resolve_arg("/proc/self/ns/mnt").unwrap_err();
        assert!(mnt.contains("not a network namespace file"), "{mnt}");
        let plain = resolve_arg("/proc/self/status").unwrap_err();
        assert!(plain.contains("not a network namespace file"), "{plain}");
        let missing = resolve_arg("/nonexistent/ns").unwrap_err();
        assert!(missing.starts_with("/nonexistent/ns: "), "{missing}");
        let name = resolve_arg("portx-no-such-netns-name").unwrap_err();
        assert!(
            name.contains("/run/netns/portx-no-such-netns-name") && name.contains("ip netns"),
            "{name}"
        );
    }

    #[test]
    fn netns_not_found_names_only_the_missing() {
        let me = id_of_pid(std::process::id()).unwrap();
        // Inode 1 is the root directory's of some file system, never a namespace's.
        assert_eq!(not_found(&[me, 1]).unwrap(), vec![1]);
        assert_eq!(not_found(&[me]).unwrap(), Vec::<NetnsId>::new());
        assert_eq!(not_found(&[]).unwrap(), Vec::<NetnsId>::new());
    }

    #[test]
    fn nsfs_mounts_are_read_from_mountinfo_lines() {
        let line = |root: &str, fs: &str| {
            format!("36 25 0:4 {root} /run/docker/netns/1c2 rw shared:5 - {fs} {fs} rw")
        };
        assert_eq!(
            nsfs_mount(&line("net:[4026532177]", "nsfs")),
            Some(4026532177)
        );
        assert_eq!(nsfs_mount(&line("mnt:[4026532177]", "nsfs")), None);
        assert_eq!(nsfs_mount(&line("net:[4026532177]", "ext4")), None);
        assert_eq!(nsfs_mount(&line("/", "tmpfs")), None);
        assert_eq!(nsfs_mount("36 25 0:4 net:[x] /a rw - nsfs nsfs rw"), None);
        assert_eq!(nsfs_mount("garbage"), None);
    }

    #[test]
    fn a_namespace_only_a_thread_is_in_is_held_elsewhere() {
        if !root() {
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            tx.send(unshare_new().unwrap()).unwrap();
            let _ = done_rx.recv();
        });
        let id = rx.recv().unwrap();
        assert!(
            discover().unwrap().iter().all(|r| r.id != id),
            "a thread's namespace listed as a process's"
        );
        let asked: HashSet<NetnsId> = [id, 1].into_iter().collect();
        assert_eq!(held_elsewhere(&asked), [id].into_iter().collect());
        done_tx.send(()).unwrap();
        holder.join().unwrap();
        // The thread gone, nothing holds it.
        assert!(held_elsewhere(&asked).is_empty());
    }

    #[test]
    fn run_in_enters_another_netns_and_leaves_the_caller_alone() {
        if !root() {
            return;
        }
        let mine = self_id().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let id = unshare_new().unwrap();
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            tx.send((
                id,
                format!("/proc/{}/task/{tid}/ns/net", std::process::id()),
            ))
            .unwrap();
            let _ = done_rx.recv();
        });
        let (new_id, path) = rx.recv().unwrap();
        assert_ne!(new_id, mine);
        let seen = run_in(Path::new(&path), new_id, || self_id().unwrap()).unwrap();
        assert_eq!(seen, new_id);
        let wrong = run_in(Path::new(&path), mine, || ()).unwrap_err();
        assert!(matches!(wrong, NetnsError::Moved { .. }), "{wrong}");
        assert_eq!(self_id().unwrap(), mine, "caller's netns changed");
        done_tx.send(()).unwrap();
        holder.join().unwrap();
    }
}
