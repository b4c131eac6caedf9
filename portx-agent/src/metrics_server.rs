//! The `--metrics` endpoint: a deliberately small HTTP/1.1 server that answers `GET /metrics`
//! (and `HEAD`) with [`crate::metrics::render`] of the latest [`View`], and nothing else.
//!
//! It must not become the agent's weak point during an outage: a request head is at most
//! [`MAX_HEAD`] bytes and must arrive within [`READ_TIMEOUT`]; a response must be taken within
//! [`WRITE_TIMEOUT`]; at most [`MAX_CONNECTIONS`] are served at once, and at most
//! [`MAX_PER_PEER`] of them from one address, so that one client (a pod holding connections open
//! to `0.0.0.0:9464`) cannot keep the scraper and the liveness probe out (more are closed at once);
//! every response closes the connection. Other methods get 405, other paths 404, garbage 400;
//! a HEAD request gets the head of whichever it is. Lines may end with LF alone (RFC 9112 lets a
//! server take that: `printf 'GET /metrics HTTP/1.0\n\n' | nc` is answered, not timed out).
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{watch, Semaphore},
    task::JoinHandle,
    time::timeout,
};

use crate::{metrics, view::View};

pub const MAX_HEAD: usize = 8 * 1024;
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_CONNECTIONS: usize = 64;
pub const MAX_PER_PEER: usize = 16;
/// What `--metrics` alone binds.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9464";

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Metrics,
    NotFound,
    MethodNotAllowed,
    BadRequest,
    TooLarge,
}

/// The request line of a complete request head (up to the blank line).
pub fn parse(head: &[u8]) -> Request {
    if head.len() > MAX_HEAD {
        return Request::TooLarge;
    }
    let Ok(text) = std::str::from_utf8(head) else {
        return Request::BadRequest;
    };
    let Some(line) = text.split('\n').next() else {
        return Request::BadRequest;
    };
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::BadRequest;
    };
    if !version.starts_with("HTTP/1.")
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !target.starts_with('/')
    {
        return Request::BadRequest;
    }
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => Request::Metrics,
        (_, "/metrics") => Request::MethodNotAllowed,
        _ => Request::NotFound,
    }
}

fn response(status: &str, content_type: &str, body: &str, head_only: bool, extra: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// Whether a request head asks for the head of the response alone (whatever the answer).
fn head_only(head: &[u8]) -> bool {
    head.starts_with(b"HEAD ")
}

fn answer(req: Request, head_only: bool, view: &View, top_k: usize) -> Vec<u8> {
    let text = |status: &str, body: &str, extra: &str| {
        response(status, "text/plain; charset=utf-8", body, head_only, extra)
    };
    match req {
        Request::Metrics => match metrics::render(view, top_k) {
            Ok(body) => response("200 OK", CONTENT_TYPE, &body, head_only, ""),
            Err(e) => text("500 Internal Server Error", &format!("encoding: {e}\n"), ""),
        },
        Request::NotFound => text("404 Not Found", "only /metrics is served\n", ""),
        Request::MethodNotAllowed => text(
            "405 Method Not Allowed",
            "only GET and HEAD\n",
            "Allow: GET, HEAD\r\n",
        ),
        Request::BadRequest => text("400 Bad Request", "not an HTTP/1.x request\n", ""),
        Request::TooLarge => text(
            "431 Request Header Fields Too Large",
            "request head over 8 KiB\n",
            "",
        ),
    }
}

/// The length of the request head in `buf` up to and including the blank line that ends it
/// (CRLF or LF line ends), if it is all there.
fn head_len(buf: &[u8]) -> Option<usize> {
    buf.iter().enumerate().find_map(|(i, &b)| {
        if b != b'\n' {
            return None;
        }
        match buf.get(i + 1..) {
            Some([b'\n', ..]) => Some(i + 2),
            Some([b'\r', b'\n', ..]) => Some(i + 3),
            _ => None,
        }
    })
}

/// Reads up to the end of the request head; Err(TooLarge) past [`MAX_HEAD`].
async fn read_head(sock: &mut TcpStream) -> std::io::Result<Result<Vec<u8>, Request>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Err(Request::BadRequest));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(len) = head_len(&buf) {
            buf.truncate(len);
            return Ok(Ok(buf));
        }
        if buf.len() > MAX_HEAD {
            return Ok(Err(Request::TooLarge));
        }
    }
}

async fn handle(
    mut sock: TcpStream,
    views: watch::Receiver<Arc<View>>,
    top_k: usize,
) -> std::io::Result<()> {
    let (req, head_only) = match timeout(READ_TIMEOUT, read_head(&mut sock)).await {
        Err(_) => return Ok(()), // too slow: drop it
        Ok(r) => match r? {
            Ok(head) => (parse(&head), head_only(&head)),
            Err(req) => (req, false),
        },
    };
    let view = views.borrow().clone();
    let bytes = answer(req, head_only, &view, top_k);
    if timeout(WRITE_TIMEOUT, sock.write_all(&bytes)).await.is_ok() {
        let _ = timeout(WRITE_TIMEOUT, sock.shutdown()).await;
    }
    Ok(())
}

/// Binds the endpoint (before anything is attached, so a bad address fails cleanly).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    if !addr.ip().is_loopback() {
        tracing::warn!(
            "metrics endpoint on {addr}: not loopback, reachable from the network (no authentication)"
        );
    }
    TcpListener::bind(addr).await
}

/// Connections open per client address.
#[derive(Default)]
struct Peers(Mutex<HashMap<IpAddr, usize>>);

/// One of [`Peers`]' connections, given back when dropped.
struct PeerSlot {
    peers: Arc<Peers>,
    ip: IpAddr,
}

impl Peers {
    /// A slot for `ip`, unless it has [`MAX_PER_PEER`] open.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        let mut open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(ip).or_insert(0);
        if *n >= MAX_PER_PEER {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.peers.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Serves until the task is aborted.
pub fn spawn(
    listener: TcpListener,
    views: watch::Receiver<Arc<View>>,
    top_k: usize,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let peers = Arc::new(Peers::default());
        loop {
            let (sock, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: wait rather than spin.
                    tracing::warn!("metrics endpoint: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(peer_slot) = peers.take(peer.ip()) else {
                tracing::debug!(
                    "metrics endpoint: {peer} refused, {MAX_PER_PEER} connections open from {}",
                    peer.ip()
                );
                drop(sock);
                continue;
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                tracing::debug!(
                    "metrics endpoint: {peer} refused, {MAX_CONNECTIONS} connections open"
                );
                drop(sock);
                continue;
            };
            let views = views.clone();
            tokio::spawn(async move {
                let _slots = (slot, peer_slot);
                if let Err(e) = handle(sock, views, top_k).await {
                    tracing::debug!("metrics endpoint: {peer}: {e}");
                }
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_parsed_strictly() {
        let p = |s: &str| parse(s.as_bytes());
        assert_eq!(
            p("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Request::Metrics
        );
        assert_eq!(p("GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Request::Metrics);
        assert_eq!(p("HEAD /metrics HTTP/1.1\r\n\r\n"), Request::Metrics);
        assert_eq!(p("GET /metrics HTTP/1.0\n\n"), Request::Metrics);
        assert_eq!(
            p("POST /metrics HTTP/1.1\r\n\r\n"),
            Request::MethodNotAllowed
        );
        assert_eq!(p("GET / HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(p("GET /metricsx HTTP/1.1\r\n\r\n"), Request::NotFound);
        for junk in [
            "",
            "\r\n\r\n",
            "hello\r\n\r\n",
            "GET /metrics\r\n\r\n",
            "GET /metrics HTTP/2\r\n\r\n",
            "get /metrics HTTP/1.1\r\n\r\n",
            "GET metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1 extra\r\n\r\n",
        ] {
            assert_eq!(p(junk), Request::BadRequest, "{junk:?}");
        }
        assert_eq!(parse(&[0xff, 0xfe, b'\r', b'\n']), Request::BadRequest);
        assert_eq!(parse(&vec![b'a'; MAX_HEAD + 1]), Request::TooLarge);
    }

    #[test]
    fn a_head_ends_at_the_first_blank_line_crlf_or_lf() {
        for head in [
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.0\n\n",
            "GET / HTTP/1.0\nHost: x\r\n\n",
        ] {
            let buf = format!("{head}body\r\n\r\n");
            assert_eq!(head_len(buf.as_bytes()), Some(head.len()), "{head:?}");
        }
        assert_eq!(head_len(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(head_len(b"GET / HTTP/1.1\r\n\r"), None);
        assert_eq!(head_len(b""), None);
    }

    #[test]
    fn responses_close_and_say_their_length() {
        let ok = answer(Request::Metrics, false, &View::default(), 20);
        let text = String::from_utf8(ok).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK"));
        assert!(head.contains("Connection: close"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(body.ends_with("# EOF\n"));
        for req in [Request::Metrics, Request::NotFound, Request::BadRequest] {
            let head = String::from_utf8(answer(req, true, &View::default(), 20)).unwrap();
            assert!(head.ends_with("\r\n\r\n"), "HEAD, {req:?}: no body: {head}");
            assert!(!head.contains("Content-Length: 0\r\n"), "{head}");
        }
        let nope = String::from_utf8(answer(
            Request::MethodNotAllowed,
            false,
            &View::default(),
            20,
        ))
        .unwrap();
        assert!(nope.starts_with("HTTP/1.1 405") && nope.contains("Allow: GET, HEAD"));
        assert!(nope.ends_with("only GET and HEAD\n"), "{nope}");
    }

    /// A request for /metrics from `from`, on a connection bound there, and what came back.
    async fn scrape_from(from: &str, addr: SocketAddr) -> String {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let mut s = s.connect(addr).await.unwrap();
        // A refused connection is closed before or while this is written.
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn one_client_cannot_take_every_connection() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_tx, rx) = watch::channel(Arc::new(View::default()));
        let server = spawn(listener, rx, 20);
        let mut silent = Vec::new();
        for _ in 0..MAX_PER_PEER {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            silent.push(s.connect(addr).await.unwrap());
        }
        // Accepted in order: once another client's scrape is answered, all 16 are held.
        let out = timeout(Duration::from_secs(2), scrape_from("127.0.0.1", addr))
            .await
            .expect("another address is served");
        assert!(out.ends_with("# EOF\n"), "{out}");
        let out = timeout(Duration::from_secs(2), scrape_from("127.0.0.2", addr))
            .await
            .expect("closed at once, not after the read timeout");
        assert_eq!(
            out, "",
            "a 17th connection from one address is closed unanswered"
        );
        // Its slots come back as its connections end.
        silent.clear();
        let out = timeout(Duration::from_secs(2), async {
            loop {
                let out = scrape_from("127.0.0.2", addr).await;
                if !out.is_empty() {
                    return out;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("served again once its connections are closed");
        assert!(out.ends_with("# EOF\n"), "{out}");
        server.abort();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_silent_client_does_not_block_a_scrape_and_junk_gets_400() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_tx, rx) = watch::channel(Arc::new(View::default()));
        let server = spawn(listener, rx, 20);
        let _silent = TcpStream::connect(addr).await.unwrap();
        let scrape = async {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let out = timeout(Duration::from_secs(2), scrape)
            .await
            .expect("served while another client is silent");
        assert!(
            out.starts_with("HTTP/1.1 200 OK") && out.ends_with("# EOF\n"),
            "{out}"
        );
        let mut junk = TcpStream::connect(addr).await.unwrap();
        junk.write_all(b"\x16\x03\x01garbage\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        junk.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        // LF line ends are answered at once; a HEAD of a missing path gets no body.
        for (ask, want) in [
            ("GET /metrics HTTP/1.0\n\n", "# EOF\n"),
            ("HEAD /nope HTTP/1.1\r\n\r\n", "Connection: close\r\n\r\n"),
        ] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(ask.as_bytes()).await.unwrap();
            let mut out = String::new();
            timeout(Duration::from_secs(2), s.read_to_string(&mut out))
                .await
                .expect("answered before the read timeout")
                .unwrap();
            assert!(out.ends_with(want), "{ask:?}: {out}");
        }
        server.abort();
    }
}
