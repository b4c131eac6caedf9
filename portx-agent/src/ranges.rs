//! Port settings per network namespace (`ip_local_port_range`, reserved ports, `tcp_tw_reuse`),
//! read from inside each netns and cached. Read when a netns is first seen, re-read when a
//! failure report needs it and the cached copy is older than a second, and on every summary.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::{netns, sysctl::PortSettings};

const FRESH: Duration = Duration::from_secs(1);

struct Entry {
    settings: Option<PortSettings>,
    read_at: Instant,
}

#[derive(Default)]
pub struct Ranges {
    cache: HashMap<netns::NetnsId, Entry>,
}

impl Ranges {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cached settings of `id`, read if never read. `hint_pid` is a process likely to be in it
    /// (the one that just failed), which saves a /proc scan.
    pub fn get(&mut self, id: netns::NetnsId, hint_pid: Option<u32>) -> Option<&PortSettings> {
        if !self.cache.contains_key(&id) {
            self.refresh(id, hint_pid);
        }
        self.cache.get(&id).and_then(|e| e.settings.as_ref())
    }

    /// Like [`Ranges::get`], but re-reads a copy older than a second: the value a failure report
    /// prints must be the one in force now.
    pub fn current(&mut self, id: netns::NetnsId, hint_pid: Option<u32>) -> Option<&PortSettings> {
        let stale = self
            .cache
            .get(&id)
            .is_none_or(|e| e.read_at.elapsed() > FRESH);
        if stale {
            self.refresh(id, hint_pid);
        }
        self.cache.get(&id).and_then(|e| e.settings.as_ref())
    }

    pub fn refresh(&mut self, id: netns::NetnsId, hint_pid: Option<u32>) {
        let settings = read(id, hint_pid);
        self.cache.insert(
            id,
            Entry {
                settings,
                read_at: Instant::now(),
            },
        );
    }

    /// Re-reads every cached netns; forgets the ones that are gone.
    pub fn refresh_all(&mut self) {
        let ids: Vec<_> = self.cache.keys().copied().collect();
        for id in ids {
            match read(id, None) {
                Some(s) => {
                    self.cache.insert(
                        id,
                        Entry {
                            settings: Some(s),
                            read_at: Instant::now(),
                        },
                    );
                }
                None => {
                    self.cache.remove(&id);
                }
            }
        }
    }
}

fn read(id: netns::NetnsId, hint_pid: Option<u32>) -> Option<PortSettings> {
    let path = match hint_pid.filter(|&p| netns::id_of_pid(p).ok() == Some(id)) {
        Some(pid) => std::path::PathBuf::from(format!("/proc/{pid}/ns/net")),
        None => match netns::find(id) {
            Ok(Some(r)) => r.path,
            Ok(None) => {
                tracing::debug!("netns {id} has no process or bind mount left");
                return None;
            }
            Err(e) => {
                tracing::warn!("looking for netns {id}: {e}");
                return None;
            }
        },
    };
    match PortSettings::read_in(&path) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(
                "reading port settings of netns {id} ({}): {e}",
                path.display()
            );
            None
        }
    }
}
