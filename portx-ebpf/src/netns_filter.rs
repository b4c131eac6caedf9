//! `--netns`: when the agent traces only some network namespaces, records of the others are not
//! written at all (they would cost ring-buffer space, a wake-up share and decoding, and their
//! loss would be counted against the traced ones).
use aya_ebpf::{macros::map, maps::HashMap};
use portx_common::NETNS_FILTER_INLINE;

use crate::globals::{filter_netns, filter_netns_inline};

/// The namespaces (inode numbers) to trace, when there are more than `NETNS_FILTER_INLINE`.
#[map(name = "NETNS_FILTER")]
static NETNS_FILTER: HashMap<u32, u8> =
    HashMap::with_max_entries(portx_common::MAX_NETNS_FILTER, 0);

/// True when records of `netns` are wanted. A few namespaces (the usual `--netns`) are compared
/// inline: the hash lookup cost the state program about 10 ns a run on average under the RST
/// storm (three of a connection's six runs reach it).
#[inline(always)]
pub fn wanted(netns: u32) -> bool {
    let count = filter_netns() as usize;
    if count == 0 {
        return true;
    }
    if count > NETNS_FILTER_INLINE {
        // SAFETY: a read-only lookup of a plain u8 value.
        return unsafe { NETNS_FILTER.get(&netns) }.is_some();
    }
    let inline = filter_netns_inline();
    let mut i = 0;
    while i < NETNS_FILTER_INLINE {
        // Slots past `count` are unused (0, as an unreadable namespace is).
        if i < count && inline[i] == netns {
            return true;
        }
        i += 1;
    }
    false
}
