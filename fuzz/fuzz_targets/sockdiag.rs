//! Any bytes as one recv() from NETLINK_SOCK_DIAG: sockets, the end of the dump or an error,
//! never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    let _ = portx_agent::sockdiag::parse_messages(data, &mut out);
});
