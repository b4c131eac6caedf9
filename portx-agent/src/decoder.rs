//! Ring-buffer records -> typed events. Reads the fixed header first, checks the length for the
//! kind, copies the record with `read_unaligned` (every shared type is plain-old-data, so any bit
//! pattern is a valid value) and converts raw fields into Rust types. Unknown kinds and short
//! records are errors the caller counts and skips; nothing here can panic on kernel bytes.
use std::{
    fmt,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use portx_common::{
    bind_flags, fail_flags, kind, state_flags, EventHeader, FailureKey, PortEvent, StateEvent,
    SyscallEvent, AF_INET, AF_INET6, IPPROTO_MPTCP, IPPROTO_TCP, TASK_COMM_LEN,
};

/// A task's `comm`, NUL-padded as the kernel keeps it. `Copy`, so it travels without allocating.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm(pub [u8; TASK_COMM_LEN]);

impl Comm {
    pub fn new(name: &str) -> Self {
        let mut raw = [0u8; TASK_COMM_LEN];
        let n = name.len().min(TASK_COMM_LEN - 1);
        raw[..n].copy_from_slice(&name.as_bytes()[..n]);
        Self(raw)
    }

    pub fn as_str(&self) -> std::borrow::Cow<'_, str> {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(TASK_COMM_LEN);
        String::from_utf8_lossy(&self.0[..end])
    }
}

impl fmt::Display for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// The task that was current when the kernel wrote the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Task {
    pub pid: u32,
    pub tid: u32,
    pub comm: Comm,
}

/// Whether a state record also opens its socket's connect (see [`portx_common::state_flags`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Opening {
    /// A plain state change (CLOSE->SYN_SENT opens a connect by itself).
    #[default]
    No,
    /// `OPENS`: the connecting thread's record of the change, before connect() returned.
    InThread,
    /// `AT_EXIT`: written when connect() returned, with the port; `new` is the state then.
    AtExit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateChange {
    pub ts_ns: u64,
    /// Only meaningful for CLOSE->SYN_SENT and records that open a connect (process context);
    /// see [`EventHeader::tgid`].
    pub task: Task,
    pub opening: Opening,
    pub skaddr: u64,
    pub netns: u32,
    pub old: u32,
    pub new: u32,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortAssigned {
    pub ts_ns: u64,
    pub task: Task,
    pub skaddr: u64,
    pub netns: u32,
    /// 0, or the negative errno of the allocation.
    pub ret: i32,
    pub sport: u16,
    /// The `hook_mode` that produced it.
    pub source: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallFailure {
    pub ts_ns: u64,
    pub task: Task,
    pub skaddr: u64,
    pub netns: u32,
    /// Positive errno.
    pub errno: i32,
    /// Destination (connect) or local (bind) address and port.
    pub addr: IpAddr,
    pub port: u16,
    /// How many failures the record stands for.
    pub tally: Tally,
    /// The socket's `sk_protocol`: TCP for connect(); for bind() None where the kernel could
    /// not follow the call's fd to its socket.
    pub protocol: Option<u16>,
    /// connect(): the port bind() gave the socket before the call, 0 for none (see
    /// [`Self::bound`]); bind(): 0.
    pub bound_port: u16,
}

impl SyscallFailure {
    /// True unless the failed call's socket is known to take its ports from another space than
    /// TCP's (a UDP or SCTP socket): a TCP socket, or Multipath TCP's (its subflows are TCP
    /// sockets), or one the kernel could not read.
    pub fn takes_tcp_ports(&self) -> bool {
        matches!(self.protocol, None | Some(IPPROTO_TCP | IPPROTO_MPTCP))
    }

    /// The port a failed connect()'s socket was bound to: such a connect() searches no port, so
    /// its EADDRNOTAVAIL says that port's 4-tuple to the destination is in use.
    pub fn bound(&self) -> Option<u16> {
        (self.bound_port != 0).then_some(self.bound_port)
    }
}

/// How many failures a failure record stands for (see [`portx_common::fail_flags`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Tally {
    /// Itself alone.
    #[default]
    Alone,
    /// It was counted in the kernel under `key`, whose entry (made at `born_ns`) had counted
    /// `count` failures then: it stands for those of them not accounted yet.
    Counted {
        key: FailureKey,
        count: u64,
        born_ns: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    State(StateChange),
    Port(PortAssigned),
    ConnectFailed(SyscallFailure),
    BindFailed(SyscallFailure),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than the {need}-byte {what}")]
    Short {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
    #[error("unknown address family {0}")]
    Family(u16),
}

fn read<T: Copy>(buf: &[u8], what: &'static str) -> Result<T, DecodeError> {
    let need = size_of::<T>();
    if buf.len() < need {
        return Err(DecodeError::Short {
            what,
            len: buf.len(),
            need,
        });
    }
    // SAFETY: the length was checked above; `T` is one of portx-common's #[repr(C)] structs of
    // integers and byte arrays, valid for any bit pattern; read_unaligned needs no alignment.
    Ok(unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<T>()) })
}

/// IPv4 for AF_INET (first 4 bytes), IPv6 for AF_INET6 — except IPv4-mapped IPv6 (`::ffff:a.b.c.d`),
/// which is IPv4 traffic sharing the IPv4 4-tuple space, so it is accounted as IPv4.
pub fn ip_from(family: u16, raw: &[u8; 16]) -> Result<IpAddr, DecodeError> {
    match family {
        AF_INET => Ok(ipv4(raw)),
        AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(*raw)).to_canonical()),
        other => Err(DecodeError::Family(other)),
    }
}

/// A record's two addresses (see [`ip_from`]); IPv4, the common case, without going through
/// `ip_from`'s `Result`: built that way, each address was written in pieces and read back at once
/// with a wider load, a store-forwarding stall that was 5 % of the agent's CPU under the RST
/// storm (`perf annotate`).
#[inline(always)]
fn addresses(family: u16, s: &[u8; 16], d: &[u8; 16]) -> Result<(IpAddr, IpAddr), DecodeError> {
    match family {
        AF_INET => Ok((ipv4(s), ipv4(d))),
        _ => Ok((ip_from(family, s)?, ip_from(family, d)?)),
    }
}

/// An AF_INET address: the first 4 bytes.
#[inline(always)]
fn ipv4(raw: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
}

fn task(h: &EventHeader) -> Task {
    Task {
        pid: h.tgid,
        tid: h.tid,
        comm: Comm(h.comm),
    }
}

/// Other bits are ignored: none are defined.
fn opening(flags: u32) -> Opening {
    if flags & state_flags::AT_EXIT != 0 {
        Opening::AtExit
    } else if flags & state_flags::OPENS != 0 {
        Opening::InThread
    } else {
        Opening::No
    }
}

fn syscall_failure(buf: &[u8]) -> Result<SyscallFailure, DecodeError> {
    let e: SyscallEvent = read(buf, "syscall record")?;
    let bound_port = match e.hdr.kind {
        kind::CONNECT_FAIL => fail_flags::bound_port(e.hdr.flags),
        _ => 0,
    };
    Ok(SyscallFailure {
        ts_ns: e.hdr.ts_ns,
        task: task(&e.hdr),
        skaddr: e.skaddr,
        netns: e.netns,
        errno: e.ret.saturating_neg(),
        addr: ip_from(e.family, &e.addr)?,
        port: e.port,
        tally: if e.hdr.kind == kind::CONNECT_FAIL && e.hdr.flags & fail_flags::COUNTED != 0 {
            Tally::Counted {
                key: FailureKey {
                    tgid: e.hdr.tgid,
                    netns: e.netns,
                    ret: e.ret,
                    family: e.family,
                    dport: e.port,
                    daddr: e.addr,
                    bound: u16::from(bound_port != 0),
                    cpu: fail_flags::cpu(e.hdr.flags),
                },
                count: e.count,
                born_ns: e.born_ns,
            }
        } else {
            Tally::Alone
        },
        protocol: match e.hdr.kind {
            kind::CONNECT_FAIL => Some(IPPROTO_TCP),
            _ => bind_flags::protocol(e.hdr.flags),
        },
        bound_port,
    })
}

/// Decodes one ring-buffer record. Inlined into the agent's one caller, which reads the event at
/// once: returned through memory, the event was written in pieces and read back with wider
/// loads, stalling store forwarding at every record.
#[inline(always)]
pub fn decode(buf: &[u8]) -> Result<Event, DecodeError> {
    let hdr: EventHeader = read(buf, "header")?;
    match hdr.kind {
        kind::STATE => {
            let e: StateEvent = read(buf, "state record")?;
            let (saddr, daddr) = addresses(e.family, &e.saddr, &e.daddr)?;
            Ok(Event::State(StateChange {
                ts_ns: e.hdr.ts_ns,
                task: task(&e.hdr),
                opening: opening(e.hdr.flags),
                skaddr: e.skaddr,
                netns: e.netns,
                old: e.oldstate,
                new: e.newstate,
                saddr,
                sport: e.sport,
                daddr,
                dport: e.dport,
            }))
        }
        kind::PORT => {
            let e: PortEvent = read(buf, "port record")?;
            Ok(Event::Port(PortAssigned {
                ts_ns: e.hdr.ts_ns,
                task: task(&e.hdr),
                skaddr: e.skaddr,
                netns: e.netns,
                ret: e.ret,
                sport: e.sport,
                source: e.hdr.flags,
            }))
        }
        kind::CONNECT_FAIL => syscall_failure(buf).map(Event::ConnectFailed),
        kind::BIND_FAIL => syscall_failure(buf).map(Event::BindFailed),
        other => Err(DecodeError::UnknownKind(other)),
    }
}

/// Byte images of kernel records, for tests here and in other modules.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub fn as_bytes<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: T is a #[repr(C)] POD struct from portx-common; viewing it as bytes is sound.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    pub fn header(kind: u32, pid: u32, comm: &str) -> EventHeader {
        EventHeader {
            kind,
            tgid: pid,
            tid: pid,
            flags: 0,
            ts_ns: 1_000,
            comm: Comm::new(comm).0,
        }
    }

    pub fn addr(ip: IpAddr) -> (u16, [u8; 16]) {
        let mut raw = [0u8; 16];
        match ip {
            IpAddr::V4(v4) => {
                raw[..4].copy_from_slice(&v4.octets());
                (AF_INET, raw)
            }
            IpAddr::V6(v6) => (AF_INET6, v6.octets()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fixtures::*, *};
    use portx_common::tcp_state;

    fn state_event() -> StateEvent {
        let (family, saddr) = addr("10.0.0.1".parse().unwrap());
        let (_, daddr) = addr("10.0.0.2".parse().unwrap());
        StateEvent {
            hdr: header(kind::STATE, 42, "curl"),
            skaddr: 0xffff_8880_1234_5678,
            netns: 4026531840,
            oldstate: tcp_state::CLOSE,
            newstate: tcp_state::SYN_SENT,
            family,
            protocol: 6,
            sport: 0,
            dport: 443,
            _pad: 0,
            saddr,
            daddr,
        }
    }

    #[test]
    fn decodes_a_state_change() {
        let ev = decode(&as_bytes(&state_event())).unwrap();
        let Event::State(s) = ev else {
            panic!("wrong kind: {ev:?}")
        };
        assert_eq!(s.task.pid, 42);
        assert_eq!(s.task.comm.as_str(), "curl");
        assert_eq!(s.saddr, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(s.daddr, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!((s.old, s.new, s.dport, s.netns), (7, 2, 443, 4026531840));
        assert_eq!(s.opening, Opening::No);
    }

    #[test]
    fn a_state_records_flags_say_whether_it_opens_a_connect() {
        for (flags, opening) in [
            (state_flags::OPENS, Opening::InThread),
            (state_flags::AT_EXIT, Opening::AtExit),
            (1 << 7, Opening::No),
        ] {
            let mut e = state_event();
            e.hdr.flags = flags;
            let Ok(Event::State(s)) = decode(&as_bytes(&e)) else {
                panic!("not a state change")
            };
            assert_eq!(s.opening, opening, "flags {flags:#x}");
        }
    }

    #[test]
    fn v4_mapped_v6_is_accounted_as_ipv4() {
        let mapped: Ipv6Addr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(
            ip_from(AF_INET6, &mapped.octets()).unwrap(),
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
        let real: Ipv6Addr = "::1".parse().unwrap();
        assert_eq!(ip_from(AF_INET6, &real.octets()).unwrap(), IpAddr::V6(real));
    }

    /// pid 7's connect() to `to` failing with EADDRNOTAVAIL, in no count.
    fn connect_failure(to: IpAddr, port: u16) -> SyscallEvent {
        let (family, raw) = addr(to);
        SyscallEvent {
            hdr: header(kind::CONNECT_FAIL, 7, "victim"),
            skaddr: 0,
            netns: 1,
            ret: -99,
            family,
            port,
            fd: -1,
            addr: raw,
            count: 0,
            born_ns: 0,
        }
    }

    #[test]
    fn decodes_a_connect_failure_with_positive_errno() {
        let e = connect_failure("::1".parse().unwrap(), 9000);
        match decode(&as_bytes(&e)).unwrap() {
            Event::ConnectFailed(f) => {
                assert_eq!(f.errno, 99);
                assert_eq!(f.port, 9000);
                assert_eq!(f.addr, "::1".parse::<IpAddr>().unwrap());
                assert_eq!(f.tally, Tally::Alone);
            }
            other => panic!("wrong event {other:?}"),
        }
    }

    #[test]
    fn a_counted_failure_carries_its_key_and_count() {
        let (family, raw) = addr("10.0.0.1".parse().unwrap());
        let e = connect_failure("10.0.0.1".parse().unwrap(), 443);
        let mut counted = e;
        counted.hdr.flags = fail_flags::COUNTED;
        counted.count = 1234;
        counted.born_ns = 55;
        let Ok(Event::ConnectFailed(f)) = decode(&as_bytes(&counted)) else {
            panic!("not a connect failure")
        };
        let Tally::Counted {
            key,
            count,
            born_ns,
        } = f.tally
        else {
            panic!("not counted: {f:?}")
        };
        assert_eq!((count, born_ns), (1234, 55));
        assert_eq!(
            (key.tgid, key.netns, key.ret, key.family, key.dport, key.daddr),
            (7, 1, -99, family, 443, raw)
        );
        assert_eq!((key.bound, f.bound()), (0, None));
        // A bound socket's failures are a key of their own, as the kernel counts them.
        let mut bound = counted;
        bound.hdr.flags = fail_flags::with_bound_port(fail_flags::COUNTED, 30000);
        let Ok(Event::ConnectFailed(f)) = decode(&as_bytes(&bound)) else {
            panic!("not a connect failure")
        };
        let Tally::Counted { key: bound_key, .. } = f.tally else {
            panic!("not counted: {f:?}")
        };
        assert_eq!((bound_key.bound, f.bound()), (1, Some(30000)));
        assert_eq!(
            FailureKey {
                bound: 0,
                ..bound_key
            },
            key
        );
        // Each CPU's entry of a key is a key of its own: the record carries which.
        let mut on_cpu = counted;
        on_cpu.hdr.flags =
            fail_flags::with_bound_port(fail_flags::with_cpu(fail_flags::COUNTED, 37), 30000);
        let Ok(Event::ConnectFailed(f)) = decode(&as_bytes(&on_cpu)) else {
            panic!("not a connect failure")
        };
        let Tally::Counted { key: cpu_key, .. } = f.tally else {
            panic!("not counted: {f:?}")
        };
        assert_eq!(
            (cpu_key.cpu, cpu_key.bound, f.bound()),
            (37, 1, Some(30000))
        );
        assert_eq!(FailureKey { cpu: 0, ..cpu_key }, bound_key);
        // The flag, not the fields, says it was counted.
        let mut unflagged = counted;
        unflagged.hdr.flags = 0;
        let Ok(Event::ConnectFailed(f)) = decode(&as_bytes(&unflagged)) else {
            panic!("not a connect failure")
        };
        assert_eq!(f.tally, Tally::Alone);
    }

    #[test]
    fn a_bind_failure_carries_its_sockets_protocol_only_where_the_kernel_read_it() {
        let mut e = connect_failure("0.0.0.0".parse().unwrap(), 0);
        e.hdr.kind = kind::BIND_FAIL;
        e.ret = -98;
        let protocol = |flags: u32| {
            let mut e = e;
            e.hdr.flags = flags;
            match decode(&as_bytes(&e)) {
                Ok(Event::BindFailed(f)) => f.protocol,
                other => panic!("not a bind failure: {other:?}"),
            }
        };
        assert_eq!(protocol(0), None);
        assert_eq!(protocol(bind_flags::SOCKET_READ | 17 << 16), Some(17));
        assert_eq!(protocol(bind_flags::socket_read(262)), Some(262));
        // A protocol without the flag is not believed.
        assert_eq!(protocol(6 << 16), None);
        // A connect failure is TCP's whatever its flags.
        let Ok(Event::ConnectFailed(f)) = decode(&as_bytes(&connect_failure(
            "10.0.0.1".parse().unwrap(),
            443,
        ))) else {
            panic!("not a connect failure")
        };
        assert_eq!(f.protocol, Some(IPPROTO_TCP));
        let takes = |protocol| SyscallFailure { protocol, ..f }.takes_tcp_ports();
        assert!(takes(None) && takes(Some(IPPROTO_TCP)) && takes(Some(IPPROTO_MPTCP)));
        assert!(!takes(Some(17)) && !takes(Some(132)));
    }

    #[test]
    fn short_unknown_and_garbled_records_are_errors_not_panics() {
        let bytes = as_bytes(&state_event());
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "len {len} decoded");
        }
        let mut unknown = bytes.clone();
        unknown[0] = 99;
        assert_eq!(decode(&unknown), Err(DecodeError::UnknownKind(99)));
        let mut bad_family = state_event();
        bad_family.family = 1;
        assert_eq!(decode(&as_bytes(&bad_family)), Err(DecodeError::Family(1)));
    }

    #[test]
    fn comm_is_trimmed_at_nul_and_truncated_to_15_bytes() {
        assert_eq!(
            Comm::new("a-very-long-process-name").as_str(),
            "a-very-long-pro"
        );
        assert_eq!(Comm::new("hog").to_string(), "hog");
    }
}
