//! `inet_hash_connect(struct inet_timewait_death_row *, struct sock *)`: where connect() gets its
//! source port. fexit sees the socket and the result together, and writes the connect's
//! CLOSE->SYN_SENT record with its port (fentry mode: the state program writes none for it); the
//! kprobe pair stashes the socket at entry because a kretprobe only sees the return value, and
//! writes a port record. Either way the socket's tuple is still intact here (tcp_v4_connect
//! clears it only after this returns).
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{fexit, kprobe, kretprobe, map},
    maps::LruHashMap,
    programs::{FExitContext, ProbeContext, RetProbeContext},
};
use portx_common::{hook_mode, kind, PortEvent};

use crate::{
    emit::{emit, gave_up, header, ran, Wake},
    globals::agent_tgid,
    kernel::{sock_netns, sock_port},
    netns_filter, state,
};

#[map(name = "HASH_SK")]
static HASH_SK: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16384, 0);

#[inline(always)]
fn is_agent(pid_tgid: u64) -> bool {
    (pid_tgid >> 32) as u32 == agent_tgid()
}

#[inline(always)]
fn emit_port(sk: u64, ret: i32, mode: u32) {
    if ret != 0 {
        // A failed search: connect()'s failure record (or, outside connect(), the socket's
        // SYN_SENT->CLOSE) says so; a record here would tell the agent nothing. (Its
        // SYN_SENT->CLOSE is written even where the socket still shows a port: kprobe mode
        // wrote CLOSE->SYN_SENT at once, and with a bound port that record may have placed it.)
        return;
    }
    let netns = sock_netns(sk);
    if !netns_filter::wanted(netns) {
        return;
    }
    emit(
        PortEvent {
            hdr: header(kind::PORT, mode),
            skaddr: sk,
            netns,
            ret,
            sport: sock_port(sk),
            _pad: [0; 3],
        },
        Wake::Batch,
    );
}

#[fexit(function = "inet_hash_connect")]
pub fn inet_hash_connect_fexit(ctx: FExitContext) -> u32 {
    if is_agent(bpf_get_current_pid_tgid()) {
        return 0;
    }
    // fexit's return value follows the arguments (arg 2 here); unlike bpf_get_func_ret this
    // works on every kernel with fexit (5.5+).
    let ret: u64 = ctx.arg(2);
    // The socket is BTF-typed here, as in the state program's tp_btf: checked loads.
    let done = if ret as i32 != 0 {
        // connect()'s failure record says it; the socket's SYN_SENT->CLOSE, next, is held back.
        state::search_failed(ctx.arg(1))
    } else {
        state::connect_with_port(ctx.arg(1))
    };
    ran(done)
}

#[kprobe]
pub fn inet_hash_connect_entry(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if is_agent(pid_tgid) {
        return 0;
    }
    let Some(sk) = ctx.arg::<u64>(1) else {
        gave_up();
        return 1;
    };
    if HASH_SK.insert(&pid_tgid, &sk, 0).is_err() {
        // The kretprobe would find no socket, and the connect no port.
        gave_up();
    }
    0
}

#[kretprobe]
pub fn inet_hash_connect_return(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(sk) = (unsafe { HASH_SK.get(&pid_tgid) }).copied() else {
        return 0;
    };
    let _ = HASH_SK.remove(&pid_tgid);
    let ret: u64 = ctx.ret();
    emit_port(sk, ret as i32, hook_mode::KPROBE);
    0
}
