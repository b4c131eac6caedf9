//! Port settings per network namespace (`ip_local_port_range`, reserved ports, `tcp_tw_reuse`),
//! read from inside each netns and cached. Read when a netns is first seen, re-read when a
//! failure report needs it and the cached copy is older than a second, and taken from every
//! sock_diag pass (`--resync`), which reads them while it is in each namespace anyway, off the
//! event loop.
use std::{
    collections::HashMap,
    path::Path,
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

    /// Re-reads `id`. A read that fails keeps the last good copy (the next sock_diag pass
    /// re-reads it, or forgets a namespace that is gone): a failure report with the settings of
    /// a few seconds ago says more than one with none.
    pub fn refresh(&mut self, id: netns::NetnsId, hint_pid: Option<u32>) {
        match read(id, hint_pid) {
            Some(s) => self.set(id, Some(s)),
            None if self.cache.get(&id).is_some_and(|e| e.settings.is_some()) => {}
            None => self.set(id, None),
        }
    }

    /// Settings read by someone already in the namespace (a sock_diag pass, which enters each
    /// one anyway): cached as read now; None if they could not be read.
    pub fn set(&mut self, id: netns::NetnsId, settings: Option<PortSettings>) {
        self.cache.insert(
            id,
            Entry {
                settings,
                read_at: Instant::now(),
            },
        );
    }

    /// Forgets the namespaces not in `alive` (a pass that saw every traced one).
    pub fn retain(&mut self, alive: impl Fn(netns::NetnsId) -> bool) {
        self.cache.retain(|id, _| alive(*id));
    }
}

fn read(id: netns::NetnsId, hint_pid: Option<u32>) -> Option<PortSettings> {
    if let Some(pid) = hint_pid.filter(|&p| netns::id_of_pid(p).ok() == Some(id)) {
        // The hinted process (the one that just failed) often exits right then: if it is gone
        // before we enter through it, find another way in.
        match PortSettings::read_in(Path::new(&format!("/proc/{pid}/ns/net")), id) {
            Ok(s) => return Some(s),
            Err(e) => tracing::debug!("netns {id} through pid {pid}: {e}"),
        }
    }
    let path = match netns::find(id) {
        Ok(Some(r)) => r.path,
        Ok(None) => {
            tracing::debug!("netns {id} has no process or bind mount left");
            return None;
        }
        Err(e) => {
            tracing::warn!("looking for netns {id}: {e}");
            return None;
        }
    };
    match PortSettings::read_in(&path, id) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_re_read_keeps_the_last_good_copy() {
        let s = PortSettings {
            range: (40000, 40015),
            reserved: vec![],
            tw_reuse: 0,
            max_tw_buckets: None,
            timestamps: None,
            tw_reuse_delay_ms: None,
        };
        // No namespace has inode 1: every read of it fails.
        let mut r = Ranges::new();
        r.set(1, Some(s.clone()));
        r.refresh(1, None);
        assert_eq!(r.get(1, None), Some(&s));
        // Never read successfully: None, not a guess.
        r.refresh(2, None);
        assert_eq!(r.get(2, None), None);
    }
}
