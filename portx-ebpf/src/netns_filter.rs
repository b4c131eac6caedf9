//! `--netns`: when the agent traces only some network namespaces, records of the others are not
//! written at all (they would cost ring-buffer space, a wake-up share and decoding, and their
//! loss would be counted against the traced ones).
use aya_ebpf::{macros::map, maps::HashMap};

use crate::globals::filter_netns;

/// The namespaces (inode numbers) to trace, when `FILTER_NETNS` is set.
#[map(name = "NETNS_FILTER")]
static NETNS_FILTER: HashMap<u32, u8> =
    HashMap::with_max_entries(portx_common::MAX_NETNS_FILTER, 0);

/// True when records of `netns` are wanted.
#[inline(always)]
pub fn wanted(netns: u32) -> bool {
    // SAFETY: a read-only lookup of a plain u8 value.
    filter_netns() == 0 || unsafe { NETNS_FILTER.get(&netns) }.is_some()
}
