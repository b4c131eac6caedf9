//! Any text as what portx reads from /proc: a fd link, a stat line, the port range and the
//! reserved ports. The first byte picks the parser.
#![no_main]
use libfuzzer_sys::fuzz_target;
use portx_agent::{procfs, sysctl};

fuzz_target!(|data: &[u8]| {
    let Some((which, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match which % 4 {
        0 => {
            let _ = procfs::parse_socket_link(&text);
        }
        1 => {
            let _ = procfs::parse_stat_start_time(&text);
        }
        2 => {
            let _ = sysctl::parse_range(&text);
        }
        _ => {
            let _ = sysctl::parse_reserved(&text);
        }
    }
});
