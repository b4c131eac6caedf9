//! portx kernel programs. Each hook lives in its own module; this file only wires them together.
//!
//! - `state`: `inet_sock_set_state` as tp_btf, else as a raw tracepoint — every TCP state change
//!   (all modes).
//! - `connect`: connect()'s exit, fexit on `__sys_connect` else `syscalls:sys_exit_connect` —
//!   failed connects (of sockets `state` saw enter SYN_SENT), and in tracepoint mode the port a
//!   non-blocking connect got.
//! - `failure_counts`: failing connects counted per process, destination and errno, a record
//!   now and then instead of one each.
//! - `bind`: bind()'s exit, fexit on `__sys_bind` else `syscalls:sys_exit_bind` (with
//!   `sys_enter_bind` before Linux 5.15) — failed binds (EADDRINUSE on port 0).
//! - `hash_connect`: fexit or kprobe/kretprobe on `inet_hash_connect` — the port allocation itself.
#![no_std]
#![no_main]
// The atomic add of `failure_counts` (bpfel has no compare-and-swap, so no `AtomicU64::fetch_add`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod bind;
mod connect;
mod emit;
mod failure_counts;
mod globals;
mod hash_connect;
mod kernel;
mod netns_filter;
mod sockaddr;
mod state;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never executed.
    loop {}
}
