//! Who a pid is, beyond its comm: uid, command line, cgroup, and the container and Kubernetes pod
//! the cgroup path names. Read from /proc once per process and cached; never per event.
//!
//! A pid can be reused, and a process can move to another cgroup. An entry is read again from
//! /proc at most once per [`RECHECK_NS`], when it is looked up: a new start time or cgroup
//! replaces it. A process that has exited keeps its last identity (the TIME_WAIT ports of a
//! churner that exited are still charged to it, and so is its container) for [`KEEP_GONE_NS`]:
//! after that its pid may be anyone's, and is read afresh. A pid found with another start time
//! is another process, whose identity is read, or none if it cannot be (it is exiting too).
use std::{fs, io::Read, sync::Arc};

use crate::{procfs, tracker::Map};

/// How often a cached entry is checked for pid reuse.
pub const RECHECK_NS: u64 = 2_000_000_000;
/// How long an exited process keeps its identity: past TIME_WAIT's 60 s, in which its ports stay
/// charged to it, with room for the timer wheel's lateness.
pub const KEEP_GONE_NS: u64 = 90_000_000_000;
/// Entries kept; past it the least recently checked half is dropped.
pub const MAX_ENTRIES: usize = 32_768;
/// Longest command line kept (bytes).
const CMDLINE_MAX: usize = 256;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// Real uid.
    pub uid: Option<u32>,
    /// Arguments joined by spaces, at most 256 bytes.
    pub cmdline: String,
    /// The cgroup v2 path (or the v1 path of the `pids`/`memory`/systemd hierarchy).
    pub cgroup: Option<String>,
    pub container: Option<Container>,
    /// Kubernetes pod UID, when the cgroup path names one.
    pub pod_uid: Option<String>,
    /// What failures are counted by (see [`group_of`]); computed once per read.
    pub group: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// docker, containerd, cri-o, podman, or `container` when only the id's shape says so.
    pub runtime: &'static str,
    /// The full 64-hex-digit id.
    pub id: String,
}

impl Container {
    /// The 12-digit form `docker ps` and `crictl ps` print.
    pub fn short_id(&self) -> &str {
        self.id.get(..12).unwrap_or(&self.id)
    }
}

/// What to group failures by: `<runtime>://<short id>` for a container, else the cgroup
/// path, else `unknown`.
pub fn group_of(container: Option<&Container>, cgroup: Option<&str>) -> String {
    match (container, cgroup) {
        (Some(c), _) => format!("{}://{}", c.runtime, c.short_id()),
        (None, Some(cg)) => cg.to_string(),
        (None, None) => "unknown".into(),
    }
}

/// The cgroup path of a process from the text of `/proc/<pid>/cgroup`: the v2 line (`0::/path`)
/// unless it is the root (hybrid hosts keep containers in v1), else the v1 path of the `pids`,
/// `memory` or `name=systemd` hierarchy, in that order, that is not the root; `/` if all are.
pub fn parse_cgroup(text: &str) -> Option<String> {
    let mut best: Option<(u8, &str)> = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let rank = if controllers.is_empty() {
            4
        } else {
            controllers.split(',').fold(0u8, |best, c| {
                best.max(match c {
                    "pids" => 3,
                    "memory" => 2,
                    "name=systemd" => 1,
                    _ => 0,
                })
            })
        };
        if rank == 0 {
            continue;
        }
        // A real path beats the root whatever its rank; among equals the higher rank wins.
        let better = match best {
            None => true,
            Some((r, p)) => ((path != "/"), rank) > ((p != "/"), r),
        };
        if better {
            best = Some((rank, path));
        }
    }
    best.map(|(_, p)| p.to_string())
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The container a cgroup path belongs to, from the naming of the usual runtimes:
/// `docker-<id>.scope` and `/docker/<id>` (docker), `cri-containerd-<id>.scope` (containerd),
/// `crio-<id>.scope` (cri-o), `libpod-<id>.scope` (podman), and a bare `<id>` component under
/// `kubepods` (cgroupfs driver). The deepest match wins (nested containers).
pub fn container_of(cgroup: &str) -> Option<Container> {
    const PREFIXES: [(&str, &str); 5] = [
        ("docker-", "docker"),
        ("cri-containerd-", "containerd"),
        ("crio-", "cri-o"),
        ("libpod-", "podman"),
        ("containerd-", "containerd"),
    ];
    let mut found = None;
    let mut parent = "";
    for part in cgroup.split('/') {
        let name = part.strip_suffix(".scope").unwrap_or(part);
        let hit = PREFIXES
            .iter()
            .find_map(|(prefix, runtime)| {
                name.strip_prefix(prefix)
                    .filter(|id| is_container_id(id))
                    .map(|id| (*runtime, id))
            })
            .or_else(|| {
                let runtime = match parent {
                    "docker" => "docker",
                    "libpod" | "machine.slice" => "podman",
                    _ => "container",
                };
                is_container_id(name).then_some((runtime, name))
            });
        if let Some((runtime, id)) = hit {
            found = Some(Container {
                runtime,
                id: id.to_string(),
            });
        }
        parent = part;
    }
    found
}

/// The pod UID in a kubelet cgroup path: `kubepods-burstable-pod<uid>.slice` (systemd driver,
/// `-` written as `_`) or `/kubepods/burstable/pod<uid>/` (cgroupfs driver).
pub fn pod_uid_of(cgroup: &str) -> Option<String> {
    if !cgroup.contains("kubepods") {
        return None;
    }
    cgroup.split('/').find_map(|part| {
        let name = part.strip_suffix(".slice").unwrap_or(part);
        let after = &name[name.rfind("pod")? + 3..];
        let uid = after.replace('_', "-");
        let looks_like_uid = uid.len() == 36
            && uid.bytes().enumerate().all(|(i, b)| {
                if matches!(i, 8 | 13 | 18 | 23) {
                    b == b'-'
                } else {
                    b.is_ascii_hexdigit()
                }
            });
        looks_like_uid.then_some(uid)
    })
}

/// Real uid from the text of `/proc/<pid>/status`.
pub fn parse_status_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `/proc/<pid>/cmdline` (NUL-separated) as one line, at most [`CMDLINE_MAX`] bytes.
pub fn parse_cmdline(raw: &[u8]) -> String {
    let raw = &raw[..raw.len().min(CMDLINE_MAX)];
    let text = String::from_utf8_lossy(raw);
    text.trim_end_matches('\0').replace('\0', " ")
}

/// The first [`CMDLINE_MAX`] bytes of `/proc/<pid>/cmdline`, in one read(2). Every read of that
/// file copies from the process' memory afresh, so a line read in pieces (`fs::read` first reads
/// 32 bytes) can end where an exiting process' memory went away: a torn command line, seen as
/// `/portx/portx-agent workload --ne` for a victim that exited as the agent read it.
fn read_cmdline(pid: u32) -> std::io::Result<Vec<u8>> {
    let mut raw = vec![0u8; CMDLINE_MAX];
    let n = fs::File::open(format!("/proc/{pid}/cmdline"))?.read(&mut raw)?;
    raw.truncate(n);
    Ok(raw)
}

/// True for a zombie or dead process (`State:` Z or X): its cgroup and command line are no
/// longer its own (the kernel shows the root cgroup and no arguments).
pub fn parse_status_exited(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .and_then(|s| s.trim_start().chars().next())
        .is_some_and(|c| c == 'Z' || c == 'X')
}

/// Reads a live process' identity; None if it is gone or exiting, or a kernel thread.
pub fn read(pid: u32) -> Option<Identity> {
    let status = procfs::read_lossy(format!("/proc/{pid}/status")).ok()?;
    if parse_status_exited(&status) {
        return None;
    }
    let cgroup = procfs::read_lossy(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|t| parse_cgroup(&t));
    let cmdline = read_cmdline(pid)
        .map(|raw| parse_cmdline(&raw))
        .unwrap_or_default();
    // No arguments: an exiting process whose memory is gone (and whose cgroup may already read
    // as the root; a victim often exits right after its failure), or a kernel thread, which has
    // no container to name either.
    if cmdline.is_empty() {
        return None;
    }
    let container = cgroup.as_deref().and_then(container_of);
    Some(Identity {
        uid: parse_status_uid(&status),
        cmdline,
        group: group_of(container.as_ref(), cgroup.as_deref()),
        container,
        pod_uid: cgroup.as_deref().and_then(pod_uid_of),
        cgroup,
    })
}

struct Entry {
    identity: Arc<Identity>,
    /// /proc/<pid>/stat start time; None once the process is gone.
    start_time: Option<u64>,
    checked_ns: u64,
    /// When the process was first found gone.
    gone_ns: Option<u64>,
}

/// Cache of identities by pid.
#[derive(Default)]
pub struct Identities {
    entries: Map<u32, Entry>,
    /// Lookups that read /proc (first sight or pid reuse), for tests and debugging.
    pub reads: u64,
}

impl Identities {
    pub fn new() -> Self {
        Self::default()
    }

    /// The identity of `pid` at `now_ns` (monotonic); None for pid 0 or a process that was gone
    /// before it was ever seen.
    pub fn get(&mut self, pid: u32, now_ns: u64) -> Option<Arc<Identity>> {
        if pid == 0 {
            return None;
        }
        if let Some(e) = self.entries.get(&pid) {
            if e.gone_ns
                .is_some_and(|g| now_ns.saturating_sub(g) >= KEEP_GONE_NS)
            {
                self.entries.remove(&pid);
                return self.read_fresh(pid, now_ns);
            }
        }
        if let Some(e) = self.entries.get_mut(&pid) {
            if now_ns.saturating_sub(e.checked_ns) < RECHECK_NS {
                return Some(e.identity.clone());
            }
            e.checked_ns = now_ns;
            // Read again: the pid may be another process now, or the process may have moved
            // to another cgroup.
            self.reads += 1;
            match (procfs::start_time(pid), read(pid)) {
                (Some(start), Some(now)) if e.start_time == Some(start) && *e.identity == now => {
                    return Some(e.identity.clone());
                }
                (Some(start), Some(now)) => {
                    e.start_time = Some(start);
                    e.gone_ns = None;
                    e.identity = Arc::new(now);
                    return Some(e.identity.clone());
                }
                // Another process (a new start time, or one after the cached one was found
                // gone), already exiting: not the one cached.
                (Some(start), None) if e.start_time != Some(start) => {
                    self.entries.remove(&pid);
                    return None;
                }
                // Exiting: keep what it was, for a while.
                (Some(_), None) => {
                    e.gone_ns.get_or_insert(now_ns);
                    return Some(e.identity.clone());
                }
                // Gone: the same.
                (None, _) => {
                    e.start_time = None;
                    e.gone_ns.get_or_insert(now_ns);
                    return Some(e.identity.clone());
                }
            }
        }
        self.read_fresh(pid, now_ns)
    }

    fn read_fresh(&mut self, pid: u32, now_ns: u64) -> Option<Arc<Identity>> {
        let start_time = procfs::start_time(pid)?;
        let identity = Arc::new(read(pid)?);
        self.reads += 1;
        if self.entries.len() >= MAX_ENTRIES {
            self.shrink();
        }
        self.entries.insert(
            pid,
            Entry {
                identity: identity.clone(),
                start_time: Some(start_time),
                checked_ns: now_ns,
                gone_ns: None,
            },
        );
        Some(identity)
    }

    /// Drops the least recently checked half.
    fn shrink(&mut self) {
        let mut stamps: Vec<u64> = self.entries.values().map(|e| e.checked_ns).collect();
        let mid = stamps.len() / 2;
        let (_, cut, _) = stamps.select_nth_unstable(mid);
        let cut = *cut;
        self.entries.retain(|_, e| e.checked_ns > cut);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e1c2b5a6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f";

    #[test]
    fn cgroup_v2_line_wins_over_v1() {
        assert_eq!(
            parse_cgroup("0::/system.slice/nginx.service\n").as_deref(),
            Some("/system.slice/nginx.service")
        );
        let v1 = "12:cpu,cpuacct:/x\n5:memory:/docker/abc\n3:pids:/docker/def\n1:name=systemd:/s\n";
        assert_eq!(parse_cgroup(v1).as_deref(), Some("/docker/def"));
        // Hybrid host: the v2 line is the root, the container lives in v1.
        let hybrid = "9:name=systemd:/\n8:pids:/\n4:memory:/docker/abc\n0::/\n";
        assert_eq!(parse_cgroup(hybrid).as_deref(), Some("/docker/abc"));
        assert_eq!(parse_cgroup("8:pids:/\n0::/\n").as_deref(), Some("/"));
        assert_eq!(parse_cgroup("garbage"), None);
        assert_eq!(parse_cgroup(""), None);
    }

    #[test]
    fn container_ids_of_each_runtime() {
        let cases = [
            (format!("/system.slice/docker-{ID}.scope"), "docker"),
            (format!("/docker/{ID}"), "docker"),
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_4b5a_6978_8a9b_0c1d2e3f4a5b.slice/cri-containerd-{ID}.scope"),
                "containerd",
            ),
            (format!("/kubepods.slice/x.slice/crio-{ID}.scope"), "cri-o"),
            (format!("/machine.slice/libpod-{ID}.scope/container"), "podman"),
            (format!("/kubepods/besteffort/pod0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b/{ID}"), "container"),
        ];
        for (path, runtime) in cases {
            let c = container_of(&path).unwrap_or_else(|| panic!("no container in {path}"));
            assert_eq!((c.runtime, c.id.as_str()), (runtime, ID), "{path}");
            assert_eq!(c.short_id(), &ID[..12]);
            assert_eq!(
                group_of(Some(&c), Some(&path)),
                format!("{runtime}://{}", &ID[..12])
            );
        }
        assert_eq!(
            container_of("/user.slice/user-1000.slice/session-2.scope"),
            None
        );
        assert_eq!(container_of("/docker/not-an-id"), None);
        assert_eq!(container_of(&format!("/docker-{}.scope", &ID[..63])), None);
    }

    #[test]
    fn pod_uids_of_both_cgroup_drivers() {
        let uid = "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b";
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope",
            uid.replace('-', "_")
        );
        assert_eq!(pod_uid_of(&systemd).as_deref(), Some(uid));
        let cgroupfs = format!("/kubepods/besteffort/pod{uid}/{ID}");
        assert_eq!(pod_uid_of(&cgroupfs).as_deref(), Some(uid));
        assert_eq!(pod_uid_of(&format!("/docker/{ID}")), None);
        assert_eq!(pod_uid_of("/kubepods/besteffort/podnot-a-uid/x"), None);
    }

    #[test]
    fn status_and_cmdline() {
        assert_eq!(
            parse_status_uid("Name:\tx\nUid:\t1000\t1000\t1000\t1000\n"),
            Some(1000)
        );
        assert_eq!(parse_status_uid("Name:\tx\n"), None);
        assert!(parse_status_exited("Name:\tx\nState:\tZ (zombie)\n"));
        assert!(!parse_status_exited("Name:\tx\nState:\tS (sleeping)\n"));
        assert!(!parse_status_exited("garbage"));
        assert_eq!(parse_cmdline(b"curl\0-s\0http://x\0"), "curl -s http://x");
        assert_eq!(parse_cmdline(b""), "");
        assert_eq!(parse_cmdline(&[b'a'; 1000]).len(), CMDLINE_MAX);
    }

    #[test]
    fn a_command_line_is_read_whole_in_one_read() {
        // Our own command line is longer than the 32 bytes `fs::read` reads first.
        let me = std::process::id();
        let whole = fs::read(format!("/proc/{me}/cmdline")).expect("our cmdline");
        assert!(whole.len() > 32, "{whole:?}");
        let once = read_cmdline(me).expect("our cmdline");
        assert_eq!(once, whole[..whole.len().min(CMDLINE_MAX)]);
    }

    #[test]
    fn our_own_identity_is_read_once_then_cached() {
        let me = std::process::id();
        let mut ids = Identities::new();
        let a = ids.get(me, 1).expect("we exist");
        assert!(a.cmdline.contains("portx"), "{}", a.cmdline);
        // SAFETY: getuid has no preconditions.
        assert_eq!(a.uid, Some(unsafe { libc::getuid() }));
        assert!(a.cgroup.is_some());
        let b = ids.get(me, 2).expect("cached");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(ids.reads, 1);
        // Past the recheck interval: read again, unchanged, so still the cached entry.
        let c = ids.get(me, 2 + RECHECK_NS).expect("rechecked");
        assert!(Arc::ptr_eq(&a, &c));
        assert_eq!(ids.reads, 2);
        assert_eq!(ids.get(0, 1), None);
    }

    #[test]
    fn an_exited_process_keeps_its_identity_and_a_reused_pid_is_read_again() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        // Until exec() has set up its arguments, the child is a copy of us or has none.
        let t0 = std::time::Instant::now();
        while !read(pid).is_some_and(|id| id.cmdline.starts_with("sleep 30")) {
            assert!(t0.elapsed().as_secs() < 10, "sleep never ran");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let mut ids = Identities::new();
        let seen = ids.get(pid, 1).expect("child is alive");
        assert!(seen.cmdline.starts_with("sleep 30"), "{}", seen.cmdline);
        child.kill().unwrap();
        // A zombie is gone too: not read as a process in the root cgroup with no arguments.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(read(pid), None, "zombie");
        // A cached identity whose start time is not the zombie's was another process: the
        // pid is someone else now, who is exiting: no identity, rather than the old one.
        let mut other = Identities::new();
        other.entries.insert(
            pid,
            Entry {
                identity: Arc::new(Identity::default()),
                start_time: Some(1),
                checked_ns: 0,
                gone_ns: None,
            },
        );
        assert_eq!(other.get(pid, RECHECK_NS), None);
        assert!(other.is_empty());
        child.wait().unwrap();
        let after = ids.get(pid, 1 + RECHECK_NS).expect("kept after exit");
        assert!(Arc::ptr_eq(&seen, &after));
        let later = ids.get(pid, 1 + RECHECK_NS + KEEP_GONE_NS - 1);
        assert!(
            later.is_some_and(|l| Arc::ptr_eq(&seen, &l)),
            "kept a while"
        );
        // Then the pid may be anyone's: read afresh (none, unless it was reused meanwhile).
        let gone = ids.get(pid, 1 + RECHECK_NS + KEEP_GONE_NS);
        assert!(
            gone.as_ref().is_none_or(|g| !Arc::ptr_eq(&seen, g)),
            "{gone:?}"
        );
        // Simulate reuse: an entry whose start time is not the live process'.
        let me = std::process::id();
        ids.entries.insert(
            me,
            Entry {
                identity: Arc::new(Identity::default()),
                start_time: Some(1),
                checked_ns: 0,
                gone_ns: None,
            },
        );
        let fresh = ids.get(me, 10 * RECHECK_NS).unwrap();
        assert!(fresh.cmdline.contains("portx"), "reused pid read again");
    }

    #[test]
    fn the_cache_is_bounded() {
        let mut ids = Identities::new();
        let me = std::process::id();
        for i in 0..MAX_ENTRIES as u32 {
            ids.entries.insert(
                1_000_000 + i,
                Entry {
                    identity: Arc::new(Identity::default()),
                    start_time: None,
                    checked_ns: u64::from(i),
                    gone_ns: None,
                },
            );
        }
        ids.get(me, u64::MAX / 2).unwrap();
        assert!(ids.len() <= MAX_ENTRIES / 2 + 1, "{}", ids.len());
        assert!(ids.entries.contains_key(&me));
    }
}
