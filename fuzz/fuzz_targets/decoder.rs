//! Any bytes as a ring-buffer record: decoded or refused, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = portx_agent::decoder::decode(data);
});
