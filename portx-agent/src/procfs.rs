//! Who owns a socket: /proc/<pid>/fd links `socket:[inode]`, and process identity (comm, start
//! time to tell a reused pid from the original). Used at start-up and on resync, never per event.
use std::{
    collections::{HashMap, HashSet},
    fs,
    path::Path,
};

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: u32,
    pub comm: String,
}

#[derive(Debug, Error)]
pub enum ProcError {
    #[error("reading /proc: {0}")]
    Io(#[from] std::io::Error),
}

/// The inode of the kernel's first pid namespace (`PROC_PID_INIT_INO`), the one whose pids the
/// records carry.
const INITIAL_PID_NS: u64 = 0xEFFF_FFFC;

/// Warns on stderr when this process is not in the host's pid namespace (a container without
/// `--pid=host` / `hostPID`): the records carry host pids, and /proc here would name other
/// processes after them, or none.
pub fn warn_unless_host_pids() {
    if host_pids() == Some(false) {
        tracing::warn!(
            "not in the host's pid namespace (run with --pid=host, or hostPID in Kubernetes): \
             the records carry host pids, which /proc here does not show; processes are named \
             by their comm alone, or wrongly"
        );
    }
}

/// Whether this process sees the host's pids in /proc (None if that cannot be read).
pub fn host_pids() -> Option<bool> {
    use std::os::unix::fs::MetadataExt as _;
    match fs::metadata("/proc/self/ns/pid") {
        Ok(m) => Some(m.ino() == INITIAL_PID_NS),
        Err(e) => {
            tracing::debug!("/proc/self/ns/pid: {e}");
            None
        }
    }
}

/// True if no process or thread `pid` exists (`/proc/<pid>` is there for every thread id too,
/// though only thread-group leaders are listed). False when that cannot be told.
pub fn gone(pid: u32) -> bool {
    matches!(
        fs::metadata(format!("/proc/{pid}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound
    )
}

/// True for a `/proc` entry named like a pid.
pub fn is_pid_dir(name: &std::ffi::OsStr) -> bool {
    name.to_str()
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// `socket:[123]` -> 123.
pub fn parse_socket_link(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// A /proc text file, decoded lossily: a process names itself (comm) and its cgroups with any
/// bytes, and one invalid UTF-8 byte must not cost the whole file (the parsers need only ASCII).
pub fn read_lossy(path: impl AsRef<Path>) -> std::io::Result<String> {
    let bytes = fs::read(path)?;
    Ok(match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

pub fn comm(pid: u32) -> Option<String> {
    read_lossy(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end_matches('\n').to_string())
}

/// Field 22 (starttime, clock ticks since boot) of a /proc/<pid>/stat line. comm (field 2) may
/// hold spaces and parentheses, so fields are counted after the *last* `)`.
pub fn parse_stat_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

pub fn start_time(pid: u32) -> Option<u64> {
    parse_stat_start_time(&read_lossy(format!("/proc/{pid}/stat")).ok()?)
}

/// The process behind each socket inode of `wanted`, from the `socket:[inode]` links in
/// /proc/<pid>/fd: the processes of `first` before the others, and the walk stops once every
/// wanted inode is found (it reads a link for every descriptor it passes). Processes and fds
/// that vanish during the walk are skipped; the first owner found wins (a socket shared after
/// fork() is charged to one process).
pub fn socket_owners(wanted: &HashSet<u64>, first: &[u32]) -> Result<Owners, ProcError> {
    let mut walk = OwnerWalk {
        wanted,
        owners: HashMap::with_capacity(wanted.len()),
        unreadable: 0,
        denied: 0,
    };
    for &pid in first {
        walk.process(pid);
    }
    if !walk.done() {
        for entry in fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if first.contains(&pid) {
                continue;
            }
            walk.process(pid);
            if walk.done() {
                break;
            }
        }
    }
    if walk.unreadable > 0 {
        tracing::debug!(
            "{} processes' fds were unreadable or vanished",
            walk.unreadable
        );
    }
    Ok(Owners {
        found: walk.owners,
        denied: walk.denied,
    })
}

/// What [`socket_owners`] found.
#[derive(Debug, Default)]
pub struct Owners {
    /// The process behind each socket inode found.
    pub found: HashMap<u64, ProcInfo>,
    /// Processes whose descriptors this process may not read (`/proc/<pid>/fd` of another
    /// user's process, or of one with capabilities this one lacks, needs CAP_SYS_PTRACE): their
    /// sockets, if wanted, were not found.
    pub denied: usize,
}

struct OwnerWalk<'a> {
    wanted: &'a HashSet<u64>,
    owners: HashMap<u64, ProcInfo>,
    unreadable: usize,
    denied: usize,
}

impl OwnerWalk<'_> {
    fn done(&self) -> bool {
        self.owners.len() == self.wanted.len()
    }

    /// The wanted sockets among `pid`'s descriptors.
    fn process(&mut self, pid: u32) {
        let denied = |e: &std::io::Error| e.kind() == std::io::ErrorKind::PermissionDenied;
        let fds = match fs::read_dir(Path::new("/proc").join(pid.to_string()).join("fd")) {
            Ok(fds) => fds,
            Err(e) => {
                if denied(&e) {
                    self.denied += 1;
                } else {
                    self.unreadable += 1;
                }
                return;
            }
        };
        let mut comm_cache: Option<String> = None;
        for fd in fds.flatten() {
            let link = match fs::read_link(fd.path()) {
                Ok(link) => link,
                // The directory may be listed while its links are refused (the ptrace check):
                // every one of them would be.
                Err(e) if denied(&e) => {
                    self.denied += 1;
                    return;
                }
                // Closed meanwhile.
                Err(_) => continue,
            };
            let Some(inode) = link.to_str().and_then(parse_socket_link) else {
                continue;
            };
            if !self.wanted.contains(&inode) || self.owners.contains_key(&inode) {
                continue;
            }
            let name = comm_cache.get_or_insert_with(|| comm(pid).unwrap_or_default());
            self.owners.insert(
                inode,
                ProcInfo {
                    pid,
                    comm: name.clone(),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::{fd::AsRawFd, unix::fs::MetadataExt};

    #[test]
    fn parses_links_and_stat() {
        assert_eq!(parse_socket_link("socket:[4026]"), Some(4026));
        assert_eq!(parse_socket_link("pipe:[1]"), None);
        assert_eq!(parse_socket_link("socket:[x]"), None);
        let stat =
            "42 (we ird) (name)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat_start_time(stat), Some(987654));
        assert_eq!(parse_stat_start_time("garbage"), None);
    }

    #[test]
    fn finds_the_owner_of_our_own_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let inode = fs::metadata(format!("/proc/self/fd/{}", l.as_raw_fd()))
            .unwrap()
            .ino();
        let me = std::process::id();
        let unknown = u64::MAX; // no socket has it: the walk goes through every process
        let wanted = HashSet::from([inode, unknown]);
        let owners = socket_owners(&wanted, &[]).unwrap().found;
        let found = owners.get(&inode).expect("our socket is found");
        assert_eq!(found.pid, me);
        assert_eq!(owners.len(), 1, "only wanted inodes: {owners:?}");
        assert!(start_time(me).is_some());
        assert_eq!(comm(me).as_deref(), Some(found.comm.as_str()));
    }

    #[test]
    fn the_processes_looked_at_first_win_a_shared_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = l.as_raw_fd();
        let inode = fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino();
        // A child that inherits the socket: both processes hold it.
        // SAFETY: fcntl on our own open fd.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let wanted = HashSet::from([inode]);
        let me = std::process::id();
        let by_child =
            socket_owners(&wanted, &[child.id()]).map(|o| o.found.get(&inode).map(|p| p.pid));
        let by_me = socket_owners(&wanted, &[me]).map(|o| o.found.get(&inode).map(|p| p.pid));
        child.kill().ok();
        child.wait().ok();
        assert_eq!(by_child.unwrap(), Some(child.id()));
        assert_eq!(by_me.unwrap(), Some(me));
    }

    #[test]
    fn a_process_named_with_a_non_utf8_byte_keeps_its_comm_and_start_time() {
        use std::os::unix::ffi::OsStrExt as _;
        // exec takes comm from the name it was called by: a link to sleep named `sl\xffep`. (A
        // link, not a copy: a file just written can be ETXTBSY to exec while another test's
        // fork between open and exec holds it open for writing.)
        let dir = std::env::temp_dir().join(format!("portx-procfs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let exe = dir.join(std::ffi::OsStr::from_bytes(b"sl\xffep"));
        let _ = fs::remove_file(&exe);
        std::os::unix::fs::symlink("/bin/sleep", &exe).unwrap();
        let mut child = std::process::Command::new(&exe).arg("30").spawn().unwrap();
        let pid = child.id();
        let mut comm_now = None;
        for _ in 0..100 {
            comm_now = comm(pid);
            if comm_now.as_deref().is_some_and(|c| c.starts_with("sl")) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let start = start_time(pid);
        let identity = crate::identity::read(pid);
        let _ = child.kill();
        let _ = child.wait();
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(comm_now.as_deref(), Some("sl\u{fffd}ep"));
        assert!(start.is_some());
        assert!(identity.is_some(), "a live process has an identity");
    }
}
