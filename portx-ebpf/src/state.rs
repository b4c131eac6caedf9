//! `inet_sock_set_state`: every TCP state change, IPv4 and IPv6, as `tp_btf` where the kernel
//! allows it, else as a raw tracepoint.
//!
//! Not the classic `sock:` tracepoint: classic tracepoint and kprobe programs share one per-CPU
//! recursion guard, so a state change in softirq that interrupts another portx program on the
//! same CPU would be skipped by the kernel; raw tracepoints (and `tp_btf`, one of them) guard per
//! program. Neither copies the event's fields on every hit: the program reads only what it keeps,
//! from the socket, at offsets the agent found in BTF. As `tp_btf` the socket is a BTF-typed
//! pointer: each field is one load the verifier checks against BTF (the offsets are constants
//! to it: `.rodata` is frozen before the programs load) instead of a `bpf_probe_read_kernel`
//! call, and `bpf_skc_to_tcp_sock` tells TCP sockets apart.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_skc_to_tcp_sock},
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
    EbpfContext,
};
use aya_log_ebpf::warn;
use portx_common::{
    hook_mode, kind, state_flags, tcp_state, Connecting, EventHeader, SockCommonHead, StateEvent,
    AF_INET, AF_INET6, IPPROTO_TCP,
};

use crate::{
    connect::{self, phase, FromSynSent},
    emit::{emit, header, header_without_task, ran, Wake},
    globals::{agent_tgid, hook_mode, offsets},
    kernel::{btf_load, btf_load_in6, netns_by_cookie, netns_of, sock_field, sock_netns},
    netns_filter, offset,
};

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
    // inet_sock_set_state(const struct sock *sk, const int oldstate, const int newstate)
    let (sk, old, new) = (
        ctx.arg(0),
        ctx.arg::<u64>(1) as u32,
        ctx.arg::<u64>(2) as u32,
    );
    on_state(&ctx, sk, old, new, &BtfRead)
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: RawTracePointContext) -> i32 {
    let (sk, old, new) = (
        ctx.arg(0),
        ctx.arg::<u64>(1) as u32,
        ctx.arg::<u64>(2) as u32,
    );
    on_state(&ctx, sk, old, new, &ProbeRead)
}

#[inline(always)]
fn on_state<C: EbpfContext>(ctx: &C, sk: u64, old: u32, new: u32, read: &impl SockRead) -> i32 {
    if server_side(old, new) {
        return 0;
    }
    // Before the socket is known to be TCP (the field is in `struct sock`): an accepted socket's
    // transitions then cost no helper call (`bpf_skc_to_tcp_sock`: 9 % of the program's samples
    // under the RST storm, where an accepted socket's close made one of its four calls a
    // connection).
    match accepted(sk, read) {
        Ok(false) => {}
        Ok(true) => return 0,
        Err(()) => return ran(Err(())) as i32,
    }
    match read.tcp(sk) {
        Ok(Some(tcp)) => ran(state_change(ctx, tcp, old, new, read)) as i32,
        Ok(None) => 0,
        Err(()) => ran(Err(())) as i32,
    }
}

/// Transitions of sockets that never own an ephemeral port: listeners and the server side of a
/// handshake, told by the states alone. Everything a client socket goes through passes. An
/// accepted socket's later transitions are left out by [`accepted`].
#[inline(always)]
fn server_side(old: u32, new: u32) -> bool {
    old == tcp_state::LISTEN
        || new == tcp_state::LISTEN
        || old == tcp_state::SYN_RECV
        || new == tcp_state::SYN_RECV
        || new == tcp_state::NEW_SYN_RECV
}

/// Where a socket is, as the record carries it (ports in network order).
pub struct Endpoints {
    pub family: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub dport: u16,
    pub netns: u32,
}

impl Endpoints {
    /// The record of socket `sk` going from `old` to `new` with source port `sport` (network
    /// order), under `hdr`.
    #[inline(always)]
    pub fn state_event(
        &self,
        hdr: EventHeader,
        sk: u64,
        old: u32,
        new: u32,
        sport: u16,
    ) -> StateEvent {
        StateEvent {
            hdr,
            skaddr: sk,
            netns: self.netns,
            oldstate: old,
            newstate: new,
            family: self.family,
            protocol: IPPROTO_TCP,
            sport: u16::from_be(sport),
            dport: u16::from_be(self.dport),
            _pad: 0,
            saddr: self.saddr,
            daddr: self.daddr,
        }
    }
}

/// How a program reads the socket.
trait SockRead {
    /// The socket to read from if it is a TCP socket, else None.
    fn tcp(&self, sk: u64) -> Result<Option<u64>, ()>;
    /// The socket's family, addresses, destination port and namespace; None for a non-IP family.
    fn endpoints(&self, sk: u64) -> Result<Option<Endpoints>, ()>;
    /// `inet_sport` (network order), not skc_num: on ->CLOSE, inet_put_port() has already
    /// zeroed skc_num.
    fn sport(&self, sk: u64) -> Result<u16, ()>;
    /// `skc_num` (host order): at CLOSE->SYN_SENT the port bind() gave the socket, else 0. Not
    /// `inet_sport` there: freeing a port zeroes skc_num but leaves inet_sport behind, so a
    /// socket that connects again after a refused or failed connect still shows the old port.
    fn num(&self, sk: u64) -> Result<u16, ()>;
    /// `sk_max_ack_backlog`, a `struct sock` field (so `sk` need not be a TCP socket yet):
    /// nonzero on a socket accepted from a listener (see [`accepted`]).
    fn backlog(&self, sk: u64) -> Result<u32, ()>;
}

/// True for the socket a listener accepted: `sk_clone_lock` makes it a copy of the listener,
/// `sk_max_ack_backlog` (the backlog `listen()` set) included; a socket that connects never
/// listened. It holds the listener's port, not an ephemeral one, and the agent drops its records
/// (as the seed drops such sockets): written, they were a quarter of the RST storm's records and
/// three of the eight of a connection that ends in TIME_WAIT. A listener with backlog 0, or a
/// kernel that ever clears the copy, has them written again, and the agent drops them as it
/// did before. (A socket that listened or was accepted, was disconnected with
/// `connect(AF_UNSPEC)` and then connects is left out too: the periodic resync sees it.)
#[inline(always)]
fn accepted(sk: u64, read: &impl SockRead) -> Result<bool, ()> {
    Ok(read.backlog(sk)? != 0)
}

/// Any pointer (raw tracepoint): a `bpf_probe_read_kernel` per read.
struct ProbeRead;

impl SockRead for ProbeRead {
    #[inline(always)]
    fn tcp(&self, sk: u64) -> Result<Option<u64>, ()> {
        let protocol: u16 = sock_field(sk, offsets().sock_protocol).ok_or(())?;
        Ok((protocol == IPPROTO_TCP).then_some(sk))
    }

    /// Where the kernel lays out `sock_common` as [`SockCommonHead`] (checked on the offsets from
    /// BTF), one copy reads them all: each `bpf_probe_read_kernel` is a helper call.
    #[inline(always)]
    fn endpoints(&self, sk: u64) -> Result<Option<Endpoints>, ()> {
        let o = offsets();
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

    #[inline(always)]
    fn sport(&self, sk: u64) -> Result<u16, ()> {
        sock_field(sk, offsets().inet_sport).ok_or(())
    }

    #[inline(always)]
    fn num(&self, sk: u64) -> Result<u16, ()> {
        sock_field(sk, offsets().sock_num).ok_or(())
    }

    #[inline(always)]
    fn backlog(&self, sk: u64) -> Result<u32, ()> {
        sock_field(sk, offsets().sock_max_ack_backlog).ok_or(())
    }
}

/// A BTF-typed `struct tcp_sock *` (`tp_btf`): a checked load per field, each of the field's
/// own width (the verifier refuses a load that spans two fields).
struct BtfRead;

impl SockRead for BtfRead {
    /// `bpf_skc_to_tcp_sock`: the socket as a `struct tcp_sock *` if it is a full TCP socket.
    #[inline(always)]
    fn tcp(&self, sk: u64) -> Result<Option<u64>, ()> {
        // SAFETY: sk is the tracepoint's BTF-typed socket.
        let tcp = unsafe { bpf_skc_to_tcp_sock(sk as *mut _) } as u64;
        Ok((tcp != 0).then_some(tcp))
    }

    #[inline(always)]
    fn endpoints(&self, sk: u64) -> Result<Option<Endpoints>, ()> {
        let mut saddr = [0u8; 16];
        let mut daddr = [0u8; 16];
        // SAFETY (all loads): sk is the verifier-checked BTF pointer, each offset a field's.
        let family: u16 = unsafe { btf_load(sk, offset!(sock_family)) };
        if family == AF_INET {
            saddr[..4]
                .copy_from_slice(&unsafe { btf_load::<[u8; 4]>(sk, offset!(sock_rcv_saddr)) });
            daddr[..4].copy_from_slice(&unsafe { btf_load::<[u8; 4]>(sk, offset!(sock_daddr)) });
        } else if family == AF_INET6 {
            saddr = unsafe { btf_load_in6(sk, offset!(sock_v6_rcv_saddr)) };
            daddr = unsafe { btf_load_in6(sk, offset!(sock_v6_daddr)) };
        } else {
            return Ok(None);
        }
        let net: u64 = unsafe { btf_load(sk, offset!(sock_net)) };
        Ok(Some(Endpoints {
            family,
            saddr,
            daddr,
            dport: unsafe { btf_load(sk, offset!(sock_dport)) },
            netns: if net == 0 {
                0
            } else {
                let cookie_at = offset!(net_cookie);
                let cookie = if cookie_at == 0 {
                    0
                } else {
                    unsafe { btf_load::<u64>(net, cookie_at) }
                };
                netns_by_cookie(cookie, || unsafe { btf_load(net, offset!(net_inum)) })
            },
        }))
    }

    #[inline(always)]
    fn sport(&self, sk: u64) -> Result<u16, ()> {
        Ok(unsafe { btf_load(sk, offset!(inet_sport)) })
    }

    #[inline(always)]
    fn num(&self, sk: u64) -> Result<u16, ()> {
        Ok(unsafe { btf_load(sk, offset!(sock_num)) })
    }

    #[inline(always)]
    fn backlog(&self, sk: u64) -> Result<u32, ()> {
        Ok(unsafe { btf_load(sk, offset!(sock_max_ack_backlog)) })
    }
}

/// A TCP socket's state change, past the early returns both programs share.
#[inline(always)]
fn state_change<C: EbpfContext>(
    ctx: &C,
    sk: u64,
    old: u32,
    new: u32,
    read: &impl SockRead,
) -> Result<(), ()> {
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
    // The connecting thread's own state changes of its socket before connect() returns: a
    // failed port search, or (where the first record waits for the port) the handshake that
    // loopback completes within the call.
    let mut flags = 0;
    if old == tcp_state::SYN_SENT {
        // Every SYN_SENT->CLOSE: a failed search of a socket that still shows a port was marked
        // by inet_hash_connect's fexit (`connect::search_failing`).
        let closes = new == tcp_state::CLOSE;
        let searched = closes && read.sport(sk)? == 0;
        let mode = hook_mode();
        if searched || (closes && mode == hook_mode::FENTRY) || mode == hook_mode::TRACEPOINT {
            match connect::from_syn_sent(sk, searched) {
                // connect()'s failure record will name the socket; this record would say
                // nothing more (one record a failed connect, under exactly the storm portx is
                // for).
                FromSynSent::SearchFailed => return Ok(()),
                // Refused within the call: the port it got is free again, and connect()'s
                // failure record tells the rest.
                FromSynSent::Opens if new == tcp_state::CLOSE => return Ok(()),
                FromSynSent::Opens => flags = state_flags::OPENS,
                FromSynSent::Elsewhere => {}
            }
        }
    }
    let Some(at) = read.endpoints(sk)? else {
        return Ok(());
    };
    if !netns_filter::wanted(at.netns) {
        return Ok(());
    }
    if at.netns == 0 {
        // Only possible with wrong BTF offsets: worth a (rare) word on the agent's stderr. (Not
        // the socket's address: as tp_btf it is a pointer, and formatting it shifts it.)
        warn!(
            ctx,
            "portx: cannot read the netns of a socket ({}->{})", old, new
        );
    }
    // At CLOSE->SYN_SENT the port bind() gave the socket, if any (see `SockRead::num`).
    let bound = if connecting { read.num(sk)? } else { 0 };
    if connecting {
        // The port is sought after this point: in tracepoint mode sys_exit_connect reads it from
        // the socket; in every mode a failed connect()'s record comes from this entry.
        let held = connect::note(
            pid_tgid,
            &Connecting {
                sk,
                saddr: at.saddr,
                daddr: at.daddr,
                netns: at.netns,
                family: at.family,
                dport: u16::from_be(at.dport),
                phase: phase::SEEKING,
                bound_port: bound,
                _pad: 0,
            },
        );
        if let Some(prev) = held {
            // The thread's previous connect failed its search outside connect(): its state
            // change, before this one.
            connect::emit_held_close(&prev);
        }
        if connect::deferred(at.family) {
            // This record waits for the port (see `connect::deferred`): one record opens the
            // connect with it, and a failed search's only record is connect()'s failure.
            return Ok(());
        }
    }
    // Other transitions run in whatever context (softirq, timers): the current task is unrelated
    // to the socket, so it is not recorded (and comm not read) — unless it is the connecting
    // thread's, opening the connect.
    let hdr = if connecting || flags != 0 {
        header(kind::STATE, flags)
    } else {
        header_without_task(kind::STATE, 0)
    };
    let sport = if connecting {
        bound.to_be()
    } else {
        read.sport(sk)?
    };
    emit(at.state_event(hdr, sk, old, new, sport), Wake::Batch);
    Ok(())
}

/// fexit on `inet_hash_connect` returned an error, in the connecting thread (fentry mode): the
/// search for a port failed. Where the socket still shows one in `inet_sport`, the thread's
/// note is marked so that the SYN_SENT->CLOSE that follows is not written with it (see
/// [`connect::search_failing`]); with none there, that state change tells by itself.
#[inline(always)]
pub fn search_failed(sk: u64) -> Result<(), ()> {
    let read = BtfRead;
    let Some(tcp) = read.tcp(sk)? else {
        return Ok(());
    };
    if read.sport(tcp)? != 0 {
        connect::search_failing(bpf_get_current_pid_tgid(), tcp);
    }
    Ok(())
}

/// fexit on `inet_hash_connect` returned 0, in the connecting thread (fentry mode): the
/// connect's CLOSE->SYN_SENT record, with the port it got. The state program wrote none for it,
/// and no other record of the socket can come before this one (the SYN goes out after).
#[inline(always)]
pub fn connect_with_port(sk: u64) -> Result<(), ()> {
    // (IPv6 seeks its port in inet6_hash_connect, not here.)
    let read = BtfRead;
    let Some(tcp) = read.tcp(sk)? else {
        // inet_hash_connect also serves DCCP on kernels that have it.
        return Ok(());
    };
    let Some(at) = read.endpoints(tcp)? else {
        return Ok(());
    };
    if at.family != AF_INET || !netns_filter::wanted(at.netns) {
        // An IPv6 socket connecting to a v4-mapped address comes through here too; the state
        // program wrote its record (it does so for every IPv6 socket).
        return Ok(());
    }
    let hdr = header(kind::STATE, 0);
    let event = at.state_event(
        hdr,
        tcp,
        tcp_state::CLOSE,
        tcp_state::SYN_SENT,
        read.sport(tcp)?,
    );
    emit(event, Wake::Batch);
    Ok(())
}
