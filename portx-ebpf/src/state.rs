//! `sock:inet_sock_set_state`: every TCP state change, IPv4 and IPv6.
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};
use aya_log_ebpf::warn;
use portx_common::{
    hook_mode, kind, set_state_tp as tp, tcp_state, StateEvent, AF_INET, IPPROTO_TCP,
};

use crate::{
    connect::CONNECT_SK,
    emit::{emit, header},
    globals::{agent_tgid, hook_mode},
    kernel::sock_netns,
};

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    match try_set_state(&ctx) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// Transitions of sockets that never own an ephemeral port: listeners and the server side of a
/// handshake. Everything a client socket goes through passes. Accepted sockets' later transitions
/// still pass; the agent drops them because it never saw them connect.
#[inline(always)]
fn server_side(old: u32, new: u32) -> bool {
    old == tcp_state::LISTEN
        || new == tcp_state::LISTEN
        || old == tcp_state::SYN_RECV
        || new == tcp_state::SYN_RECV
        || new == tcp_state::NEW_SYN_RECV
}

fn try_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    let protocol: u16 = unsafe { ctx.read_at(tp::PROTOCOL)? };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let old = unsafe { ctx.read_at::<i32>(tp::OLDSTATE)? } as u32;
    let new = unsafe { ctx.read_at::<i32>(tp::NEWSTATE)? } as u32;
    if server_side(old, new) {
        return Ok(());
    }
    let skaddr: u64 = unsafe { ctx.read_at(tp::SKADDR)? };
    if old == tcp_state::CLOSE && new == tcp_state::SYN_SENT {
        // connect() in process context: the one moment the current task owns this socket.
        let pid_tgid = bpf_get_current_pid_tgid();
        if (pid_tgid >> 32) as u32 == agent_tgid() {
            return Ok(());
        }
        if hook_mode() == hook_mode::TRACEPOINT {
            // The port is assigned after this point; sys_exit_connect reads it from the socket.
            let _ = CONNECT_SK.insert(&pid_tgid, &skaddr, 0);
        }
    }
    let family: u16 = unsafe { ctx.read_at(tp::FAMILY)? };
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    if family == AF_INET {
        let s: [u8; 4] = unsafe { ctx.read_at(tp::SADDR)? };
        let d: [u8; 4] = unsafe { ctx.read_at(tp::DADDR)? };
        saddr[..4].copy_from_slice(&s);
        daddr[..4].copy_from_slice(&d);
    } else {
        saddr = unsafe { ctx.read_at(tp::SADDR_V6)? };
        daddr = unsafe { ctx.read_at(tp::DADDR_V6)? };
    }
    let netns = sock_netns(skaddr);
    if netns == 0 {
        // Only possible with wrong BTF offsets: worth a (rare) word on the agent's stderr.
        warn!(ctx, "portx: cannot read the netns of socket {:x}", skaddr);
    }
    emit(StateEvent {
        hdr: header(kind::STATE, 0),
        skaddr,
        netns,
        oldstate: old,
        newstate: new,
        family,
        protocol,
        sport: unsafe { ctx.read_at(tp::SPORT)? },
        dport: unsafe { ctx.read_at(tp::DPORT)? },
        _pad: 0,
        saddr,
        daddr,
    });
    Ok(())
}
