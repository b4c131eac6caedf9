//! The kernel's list of TCP sockets, as `ss` gets it: NETLINK_SOCK_DIAG with an
//! `inet_diag_req_v2` dump per address family, in the calling thread's network namespace.
//! TIME_WAIT sockets are included (they have no inode). The parser checks every length and
//! returns an error on anything truncated or garbled; it never panics.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use thiserror::Error;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_msg`: family, state, timer, retrans, sockid (48), expires, rqueue, wqueue,
/// uid, inode.
const DIAG_MSG_LEN: usize = 72;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 56;

const TCP_LISTEN: u32 = 10;
const TCP_NEW_SYN_RECV: u32 = 12;
const TCP_TIME_WAIT: u8 = 6;
/// `idiag_timer` of a timewait socket (`inet_twsk_diag_fill`); full sockets report 0, 1
/// (retransmit), 2 (keepalive) or 4 (zero-window probe).
const TIMER_TIMEWAIT: u8 = 3;

/// Every TCP state bit (1..=11) except LISTEN; NEW_SYN_RECV (12) is a request, not a socket.
pub const ALL_BUT_LISTEN: u32 = (0x1ffe) & !(1 << TCP_LISTEN) & !(1 << TCP_NEW_SYN_RECV);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiagSocket {
    pub family: u16,
    /// Kernel TCP state number (TIME_WAIT = 6); a timewait socket's substate (see
    /// [`DiagSocket::held_state`]).
    pub state: u8,
    /// Which timer runs: 3 for a timewait socket.
    pub timer: u8,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    /// 0 for timewait sockets.
    pub inode: u64,
    pub uid: u32,
    /// Time left on the socket's timer; for TIME_WAIT, the time until it dies.
    pub expires_ms: u32,
    pub cookie: u64,
}

impl DiagSocket {
    /// The state the socket holds its port in: TIME_WAIT for every timewait socket. The kernel
    /// reports a timewait socket's substate, and a socket the application closed first whose
    /// peer has not closed yet (an orphan in FIN_WAIT2) becomes a timewait socket in substate
    /// FIN_WAIT2 (`tcp_time_wait(sk, TCP_FIN_WAIT2, ..)`): `ss` shows it as FIN-WAIT-2 with a
    /// timewait timer. It has no inode and holds its port until that timer fires, as TIME_WAIT
    /// does, and the tracker's records see it end as FIN_WAIT2 -> CLOSE, counted as TIME_WAIT.
    pub fn held_state(&self) -> u8 {
        if self.timer == TIMER_TIMEWAIT {
            TCP_TIME_WAIT
        } else {
            self.state
        }
    }
}

#[derive(Debug, Error)]
pub enum DiagError {
    #[error("sock_diag socket: {0}")]
    Io(#[from] io::Error),
    #[error("sock_diag: kernel answered errno {0}")]
    Kernel(i32),
    #[error("sock_diag: malformed reply: {0}")]
    Malformed(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    More,
    Done,
}

fn u16_ne(b: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([b[off], b[off + 1]])
}

fn u32_ne(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn addr(family: u8, raw: &[u8]) -> Result<IpAddr, DiagError> {
    match i32::from(family) {
        libc::AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        libc::AF_INET6 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&raw[..16]);
            Ok(IpAddr::V6(Ipv6Addr::from(a)))
        }
        _ => Err(DiagError::Malformed("unknown address family")),
    }
}

fn diag_msg(p: &[u8]) -> Result<DiagSocket, DiagError> {
    if p.len() < DIAG_MSG_LEN {
        return Err(DiagError::Malformed("inet_diag_msg shorter than 72 bytes"));
    }
    let family = p[0];
    let id = &p[4..52];
    Ok(DiagSocket {
        family: u16::from(family),
        state: p[1],
        timer: p[2],
        sport: u16::from_be_bytes([id[0], id[1]]),
        dport: u16::from_be_bytes([id[2], id[3]]),
        saddr: addr(family, &id[4..20])?,
        daddr: addr(family, &id[20..36])?,
        cookie: u64::from(u32_ne(id, 40)) | (u64::from(u32_ne(id, 44)) << 32),
        expires_ms: u32_ne(p, 52),
        uid: u32_ne(p, 64),
        inode: u64::from(u32_ne(p, 68)),
    })
}

/// Parses what one recv() returned: pushes sockets, reports the end of the dump.
pub fn parse_messages(buf: &[u8], out: &mut Vec<DiagSocket>) -> Result<Parsed, DiagError> {
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32_ne(buf, off) as usize;
        let kind = u16_ne(buf, off + 4);
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return Err(DiagError::Malformed("netlink message length out of bounds"));
        }
        let payload = &buf[off + NLMSG_HDRLEN..off + len];
        match kind {
            NLMSG_DONE => return Ok(Parsed::Done),
            NLMSG_ERROR => {
                if payload.len() < 4 {
                    return Err(DiagError::Malformed("short NLMSG_ERROR"));
                }
                let err = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
                if err == 0 {
                    return Ok(Parsed::Done);
                }
                return Err(DiagError::Kernel(err.saturating_neg()));
            }
            SOCK_DIAG_BY_FAMILY => out.push(diag_msg(payload)?),
            _ => {}
        }
        off += (len + 3) & !3;
    }
    if off != buf.len() && off < buf.len() {
        return Err(DiagError::Malformed(
            "trailing bytes shorter than a netlink header",
        ));
    }
    Ok(Parsed::More)
}

fn request(family: u8, states: u32, seq: u32) -> [u8; NLMSG_HDRLEN + REQ_LEN] {
    let mut m = [0u8; NLMSG_HDRLEN + REQ_LEN];
    m[0..4].copy_from_slice(&((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
    m[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m[16] = family;
    m[17] = libc::IPPROTO_TCP as u8;
    m[20..24].copy_from_slice(&states.to_ne_bytes());
    m
}

struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

/// All TCP sockets whose state bit (1 << state) is in `states`, IPv4 and IPv6.
pub fn dump_tcp(states: u32) -> Result<Vec<DiagSocket>, DiagError> {
    // SAFETY: plain syscalls on an fd we own; buffers are valid for their lengths.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error().into());
    }
    let fd = Fd(fd);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    for (seq, family) in [(1u32, libc::AF_INET as u8), (2, libc::AF_INET6 as u8)] {
        let req = request(family, states, seq);
        // SAFETY: req is a valid buffer; a zeroed sockaddr_nl addresses the kernel.
        let sent = unsafe {
            let mut sa: libc::sockaddr_nl = std::mem::zeroed();
            sa.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                fd.0,
                req.as_ptr().cast(),
                req.len(),
                0,
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error().into());
        }
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe { libc::recv(fd.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            if parse_messages(&buf[..n as usize], &mut out)? == Parsed::Done {
                break;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn msg(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(payload);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    fn diag_payload() -> Vec<u8> {
        let mut p = vec![0u8; DIAG_MSG_LEN];
        p[0] = libc::AF_INET as u8;
        p[1] = 6; // TIME_WAIT
        p[4..6].copy_from_slice(&40000u16.to_be_bytes());
        p[6..8].copy_from_slice(&9000u16.to_be_bytes());
        p[8..12].copy_from_slice(&[127, 0, 0, 1]);
        p[24..28].copy_from_slice(&[127, 0, 0, 2]);
        p[52..56].copy_from_slice(&59_000u32.to_ne_bytes());
        p
    }

    #[test]
    fn parses_sockets_and_the_end_of_the_dump() {
        let mut buf = msg(SOCK_DIAG_BY_FAMILY, &diag_payload());
        let mut out = Vec::new();
        assert_eq!(parse_messages(&buf, &mut out).unwrap(), Parsed::More);
        assert_eq!(out.len(), 1);
        let s = &out[0];
        assert_eq!(
            (s.state, s.sport, s.dport, s.expires_ms, s.inode),
            (6, 40000, 9000, 59_000, 0)
        );
        assert_eq!(s.daddr, "127.0.0.2".parse::<IpAddr>().unwrap());
        buf.extend(msg(NLMSG_DONE, &[0; 4]));
        out.clear();
        assert_eq!(parse_messages(&buf, &mut out).unwrap(), Parsed::Done);
        let err = msg(NLMSG_ERROR, &(-1i32).to_ne_bytes());
        assert!(matches!(
            parse_messages(&err, &mut out),
            Err(DiagError::Kernel(1))
        ));
    }

    #[test]
    fn truncated_and_garbled_replies_are_errors_not_panics() {
        let good = msg(SOCK_DIAG_BY_FAMILY, &diag_payload());
        for len in 1..good.len() {
            let _ = parse_messages(&good[..len], &mut Vec::new());
        }
        let mut bad_len = good.clone();
        bad_len[0..4].copy_from_slice(&5000u32.to_ne_bytes());
        assert!(parse_messages(&bad_len, &mut Vec::new()).is_err());
        let mut bad_family = good.clone();
        bad_family[NLMSG_HDRLEN] = 99;
        assert!(parse_messages(&bad_family, &mut Vec::new()).is_err());
        let mut tiny = good.clone();
        tiny[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(parse_messages(&tiny, &mut Vec::new()).is_err());
    }

    #[test]
    fn dumps_real_sockets_in_a_private_netns() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (private network namespace)");
            return;
        }
        std::thread::spawn(|| {
            crate::netns::unshare_new().expect("private netns");
            let l4 = TcpListener::bind("127.0.0.1:9000").unwrap();
            let l6 = TcpListener::bind("[::1]:9000").unwrap();
            let mut keep = Vec::new();
            for l in [&l4, &l6] {
                let addr = l.local_addr().unwrap();
                for _ in 0..3 {
                    keep.push(TcpStream::connect(addr).unwrap());
                    // Accept now, so the TIME_WAIT loop below accepts its own connections.
                    keep.push(l.accept().unwrap().0);
                }
            }
            // Two IPv4 clients close first and the server closes after: TIME_WAIT.
            for _ in 0..2 {
                let c = TcpStream::connect("127.0.0.1:9000").unwrap();
                let (s, _) = l4.accept().unwrap();
                drop(c);
                std::thread::sleep(std::time::Duration::from_millis(20));
                drop(s);
            }
            // Two IPv4 clients close first towards a listener that never accepts, so their
            // peers never close: orphans in FIN_WAIT2, timewait sockets in that substate.
            let never = TcpListener::bind("127.0.0.1:9001").unwrap();
            // Shut down first, closed once the FIN is acked: close() then makes each a timewait
            // socket at once (a close() that sends the FIN may leave a full FIN_WAIT2 socket).
            let half: Vec<TcpStream> = (0..2)
                .map(|_| TcpStream::connect("127.0.0.1:9001").unwrap())
                .collect();
            for c in &half {
                c.shutdown(std::net::Shutdown::Write).unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            drop(half);
            std::thread::sleep(std::time::Duration::from_millis(50));
            let all = dump_tcp(ALL_BUT_LISTEN | (1 << TCP_LISTEN)).unwrap();
            let orphans: Vec<&DiagSocket> = all.iter().filter(|s| s.dport == 9001).collect();
            assert_eq!(orphans.len(), 2, "{all:?}");
            assert!(
                orphans.iter().all(|s| s.state == 5
                    && s.timer == TIMER_TIMEWAIT
                    && s.held_state() == TCP_TIME_WAIT
                    && s.inode == 0
                    && s.expires_ms > 0),
                "{orphans:?}"
            );
            let count = |state: u8, v6: bool, client: bool| {
                all.iter()
                    .filter(|s| {
                        s.state == state
                            && s.saddr.is_ipv6() == v6
                            && (s.dport == 9000) == client
                            && (s.sport == 9000 || s.dport == 9000)
                    })
                    .count()
            };
            assert_eq!(count(10, false, false), 1, "IPv4 listener: {all:?}");
            assert_eq!(count(10, true, false), 1, "IPv6 listener");
            assert_eq!(count(1, false, true), 3, "IPv4 clients ESTABLISHED");
            assert_eq!(count(1, true, true), 3, "IPv6 clients ESTABLISHED");
            assert_eq!(count(6, false, true), 2, "IPv4 TIME_WAIT");
            assert!(all
                .iter()
                .filter(|s| s.state == 6)
                .all(|s| s.inode == 0 && s.expires_ms > 0));
            assert!(all
                .iter()
                .filter(|s| s.state == 1)
                .all(|s| s.inode != 0 && s.timer != TIMER_TIMEWAIT && s.held_state() == 1));
            drop((keep, never));
        })
        .join()
        .expect("netns thread");
    }
}
