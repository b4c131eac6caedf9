//! `inet_sock_set_state` as a raw tracepoint: every TCP state change, IPv4 and IPv6.
//!
//! Raw, not the classic `sock:` tracepoint: classic tracepoint and kprobe programs share one
//! per-CPU recursion guard, so a state change in softirq that interrupts another portx program
//! on the same CPU would be skipped by the kernel; raw tracepoints guard per program. It also
//! avoids copying the event's fields on every hit: the program reads only what it keeps, from the
//! socket, at offsets the agent found in BTF.
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::raw_tracepoint, programs::RawTracePointContext,
};
use aya_log_ebpf::warn;
use portx_common::{
    kind, tcp_state, KernelOffsets, SockCommonHead, StateEvent, AF_INET, AF_INET6, IPPROTO_TCP,
};

use crate::{
    connect::{Connecting, CONNECTING},
    emit::{emit, header, header_without_task, Wake},
    globals::{agent_tgid, offsets},
    kernel::{netns_of, sock_field, sock_netns},
    netns_filter,
};

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: RawTracePointContext) -> i32 {
    match try_set_state(&ctx) {
        Ok(()) => 0,
        Err(()) => 1,
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

/// Where a socket is, as the record carries it (ports in network order).
struct Endpoints {
    family: u16,
    saddr: [u8; 16],
    daddr: [u8; 16],
    dport: u16,
    netns: u32,
}

/// The socket's family, addresses, destination port and namespace; None for a non-IP family.
/// Where the kernel lays out `sock_common` as [`SockCommonHead`] (checked on the offsets from
/// BTF), one copy reads them all: each `bpf_probe_read_kernel` is a helper call, and this runs
/// on every state change of every client socket.
#[inline(always)]
fn endpoints(sk: u64, o: &KernelOffsets) -> Result<Option<Endpoints>, ()> {
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    if o.head_matches() {
        let head: SockCommonHead = sock_field(sk, 0).ok_or(())?;
        if head.family == AF_INET {
            saddr[..4].copy_from_slice(&head.rcv_saddr);
            daddr[..4].copy_from_slice(&head.daddr);
        } else if head.family == AF_INET6 {
            saddr = head.v6_rcv_saddr;
            daddr = head.v6_daddr;
        } else {
            return Ok(None);
        }
        return Ok(Some(Endpoints {
            family: head.family,
            saddr,
            daddr,
            dport: head.dport,
            netns: netns_of(head.net),
        }));
    }
    let family: u16 = sock_field(sk, o.sock_family).ok_or(())?;
    if family == AF_INET {
        let s: [u8; 4] = sock_field(sk, o.sock_rcv_saddr).ok_or(())?;
        let d: [u8; 4] = sock_field(sk, o.sock_daddr).ok_or(())?;
        saddr[..4].copy_from_slice(&s);
        daddr[..4].copy_from_slice(&d);
    } else if family == AF_INET6 {
        saddr = sock_field(sk, o.sock_v6_rcv_saddr).ok_or(())?;
        daddr = sock_field(sk, o.sock_v6_daddr).ok_or(())?;
    } else {
        return Ok(None);
    }
    Ok(Some(Endpoints {
        family,
        saddr,
        daddr,
        dport: sock_field(sk, o.sock_dport).ok_or(())?,
        netns: sock_netns(sk),
    }))
}

fn try_set_state(ctx: &RawTracePointContext) -> Result<(), ()> {
    // trace_inet_sock_set_state(const struct sock *sk, const int oldstate, const int newstate)
    let sk: u64 = ctx.arg(0);
    let old = ctx.arg::<u64>(1) as u32;
    let new = ctx.arg::<u64>(2) as u32;
    if server_side(old, new) {
        return Ok(());
    }
    let o = offsets();
    let protocol: u16 = sock_field(sk, o.sock_protocol).ok_or(())?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    // connect() in process context: the one moment the current task owns this socket.
    let connecting = old == tcp_state::CLOSE && new == tcp_state::SYN_SENT;
    let pid_tgid = if connecting {
        bpf_get_current_pid_tgid()
    } else {
        0
    };
    if connecting && (pid_tgid >> 32) as u32 == agent_tgid() {
        return Ok(());
    }
    let Some(Endpoints {
        family,
        saddr,
        daddr,
        dport,
        netns,
    }) = endpoints(sk, &o)?
    else {
        return Ok(());
    };
    if !netns_filter::wanted(netns) {
        return Ok(());
    }
    if netns == 0 {
        // Only possible with wrong BTF offsets: worth a (rare) word on the agent's stderr.
        warn!(ctx, "portx: cannot read the netns of socket {:x}", sk);
    }
    if connecting {
        // The port is sought after this point: in tracepoint mode sys_exit_connect reads it from
        // the socket; in every mode a failed connect()'s record comes from this entry.
        let _ = CONNECTING.insert(
            &pid_tgid,
            &Connecting {
                sk,
                daddr,
                netns,
                family,
                dport: u16::from_be(dport),
            },
            0,
        );
    }
    // inet_sport, not skc_num: on ->CLOSE, inet_put_port() has already zeroed skc_num.
    let sport: u16 = sock_field(sk, o.inet_sport).ok_or(())?;
    emit(
        StateEvent {
            // Other transitions run in whatever context (softirq, timers): the current task is
            // unrelated to the socket, so it is not recorded (and comm not read).
            hdr: if connecting {
                header(kind::STATE, 0)
            } else {
                header_without_task(kind::STATE, 0)
            },
            skaddr: sk,
            netns,
            oldstate: old,
            newstate: new,
            family,
            protocol,
            sport: u16::from_be(sport),
            dport: u16::from_be(dport),
            _pad: 0,
            saddr,
            daddr,
        },
        Wake::Batch,
    );
    Ok(())
}
