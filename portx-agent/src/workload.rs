//! Real workloads for `demo` and the end-to-end tests (hidden `portx-agent workload`): a process
//! that holds a private network namespace, a server, a port hog, a TIME_WAIT churner, a single
//! connect, a bind-before-connect hog. Each is a separate process so the tracer sees real pids
//! and comms. Every line printed on stdout is machine-readable and flushed at once; every
//! workload dies with its parent (PR_SET_PDEATHSIG) so a crashed test leaves nothing behind.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::PathBuf,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Subcommand};

use crate::netns;

#[derive(Debug, Args)]
pub struct WorkloadArgs {
    /// Enter this network namespace first (e.g. /proc/<pid>/ns/net).
    #[arg(long, global = true, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Process name (comm) to show up as.
    #[arg(long, global = true, value_name = "COMM")]
    pub name: Option<String>,
    #[command(subcommand)]
    pub cmd: WorkloadCmd,
}

#[derive(Debug, Subcommand)]
pub enum WorkloadCmd {
    /// Create a network namespace (lo up), apply sysctls in it, print `ready netns=ID`, sleep.
    Park {
        /// KEY=VALUE, e.g. net.ipv4.ip_local_port_range="40000 40015" (repeatable).
        #[arg(long, value_name = "KEY=VALUE")]
        sysctl: Vec<String>,
    },
    /// Listen on each address; read every accepted connection to EOF, then close it (so a
    /// client that closes first ends in TIME_WAIT). Prints `ready`.
    Serve {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        /// Never accept: once the accept queue (backlog + 1) is full, the kernel drops further
        /// SYNs and clients stay in SYN_SENT.
        #[arg(long)]
        no_accept: bool,
        #[arg(long, default_value_t = 128)]
        backlog: i32,
        /// Start accepting only this long after `ready`: until then SYNs beyond the accept
        /// queue are dropped, and their clients' retransmitted SYNs finish the handshake in
        /// softirq, outside the connecting thread.
        #[arg(long, value_name = "MS", default_value_t = 0)]
        accept_after_ms: u64,
    },
    /// Open COUNT connections and keep them. Prints `held N ports=a,b,..`; exits 3 if one fails.
    Hold {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Non-blocking connects, not waited for: ports are held from SYN_SENT on.
        #[arg(long)]
        nonblock: bool,
    },
    /// COUNT times: connect, then close first (TIME_WAIT) or with RST. Prints
    /// `churned ok=X failed=Y`.
    Churn {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// COUNT connects to each of PORTS destination ports in turn, from --connect's port up
        /// (one port's in a row).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
        ports: u16,
        /// Close with RST (SO_LINGER 0): no TIME_WAIT.
        #[arg(long)]
        rst: bool,
        /// Connect all COUNT on the last CPU this process may use, then close them from a thread
        /// on the first: one socket's records land in two of the agent's ring buffers, the
        /// closes in the ring read first.
        #[arg(long)]
        cross_cpu: bool,
        /// Milliseconds to sleep after each connect (not with --cross-cpu).
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
        /// Then, --again-after-ms later, the same churn again to this destination (and the
        /// ports after it), from the same process (not with --cross-cpu).
        #[arg(long, conflicts_with = "cross_cpu")]
        again: Option<SocketAddr>,
        #[arg(long, value_name = "MS", default_value_t = 15000)]
        again_after_ms: u64,
    },
    /// COUNT times: connect, shutdown(SHUT_WR), and close() once the peer has acked that FIN
    /// (after MS): a peer that never closes leaves each socket a timewait socket in substate
    /// FIN_WAIT2 at once (`tcp_close`). (A close() that sends the FIN itself may find the
    /// peer's ACK while it holds the socket, and leave a full FIN_WAIT2 socket with a timer.)
    /// Prints `half-closed ok=X failed=Y`.
    HalfClose {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long, value_name = "MS", default_value_t = 50)]
        close_after_ms: u64,
    },
    /// One connect(). Prints `connect ok sport=P` (exit 0) or `connect failed errno=E` (exit 3).
    Connect {
        #[arg(long)]
        connect: SocketAddr,
        /// Non-blocking connect (EINPROGRESS, then poll).
        #[arg(long)]
        nonblock: bool,
    },
    /// Connect storm for benchmarks: each of THREADS threads has its own listener on
    /// 127.0.0.1:(BASE_PORT + i) (in `close` mode 8 of them, from BASE_PORT + 8i, connected to in
    /// turn) and loops connect + accept + close in the same thread (a cross-thread accept loop is
    /// itself the bottleneck). Prints `storm ok=N failed=M secs=S`.
    Storm {
        #[arg(long, default_value_t = 2)]
        threads: u16,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// rst: SO_LINGER 0, no TIME_WAIT; close: client closes first (TIME_WAIT churn; 8
        /// destinations a thread, so that TIME_WAIT's reuse delay does not cap the rate);
        /// fail: first hold 16 connections per thread, then connect() in a loop, each failing
        /// with EADDRNOTAVAIL in a 16-port namespace; fail-one: as fail, but every thread
        /// connects to the first thread's listener, which alone holds 16 (one destination, as a
        /// proxy's threads failing towards one upstream).
        #[arg(long, value_parser = ["rst", "close", "fail", "fail-one"], default_value = "rst")]
        close: String,
        #[arg(long, default_value_t = 20000)]
        base_port: u16,
    },
    /// connect() to an IPv4 destination; on SIGUSR1 connect(AF_UNSPEC) to disconnect the same
    /// socket; on the next SIGUSR1 connect it again and keep it. Prints `connected sport=P`,
    /// `disconnected`, `reconnected sport=Q`.
    Disconnect {
        #[arg(long)]
        connect: std::net::SocketAddrV4,
    },
    /// connect() calls that seek no port, made by a thread whose last TCP connect did not go
    /// through connect(): a connection opened by TCP Fast Open's sendto(MSG_FASTOPEN), then
    /// connect() to a unix socket path that does not exist and to an IPv4 address without a
    /// route. Prints `fastopen ok sport=P` (or `fastopen failed errno=E`: refused, say),
    /// `unix failed errno=E`, `noroute failed errno=E`, and keeps the connection.
    NoPort {
        #[arg(long)]
        fastopen: std::net::SocketAddrV4,
        #[arg(long)]
        unix: PathBuf,
        #[arg(long)]
        noroute: SocketAddr,
    },
    /// A port search that fails outside connect(): sendto(MSG_FASTOPEN) with the range exhausted
    /// (no connect() returns for it). Then, from the same thread, connect() to a unix socket
    /// path that does not exist (`--unix`, seeks no port) or to `--connect` (TCP). Prints
    /// `fastopen failed errno=E`, then `unix failed errno=E` or `connect failed errno=E`, and
    /// stays.
    FastopenFails {
        #[arg(long)]
        fastopen: std::net::SocketAddrV4,
        #[arg(long, conflicts_with = "connect", required_unless_present = "connect")]
        unix: Option<PathBuf>,
        #[arg(long)]
        connect: Option<SocketAddr>,
    },
    /// bind() COUNT sockets to port 0 without connecting, and keep them. Prints `bound N`, or
    /// `bind failed errno=E` and exits 3.
    BindHold {
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long, default_value = "127.0.0.1")]
        addr: std::net::Ipv4Addr,
        /// UDP sockets instead of TCP.
        #[arg(long)]
        udp: bool,
    },
    /// Open COUNT connections (IPv4 or IPv6, as `--connect` is), socket i bound to port FROM+i
    /// of the destination's address first (a client that picks its own source ports, e.g.
    /// outside `ip_local_port_range`), and keep them. Prints `held N ports=a,b,..`; exits 3 if
    /// a bind or connect fails.
    HoldBound {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u16,
        #[arg(long)]
        from_port: u16,
        /// SO_REUSEADDR before bind(): two such processes can bind the same port, and the second
        /// one's connect() to the same destination fails with EADDRNOTAVAIL (4-tuple in use).
        #[arg(long)]
        reuse_addr: bool,
    },
    /// One socket: connect() to `--refused` (nothing listens there: ECONNREFUSED), then
    /// connect() the same socket to `--connect`, and keep it. The kernel leaves the first
    /// port in `inet_sport` after freeing it. Prints `refused errno=E sport=P` (the port
    /// getsockname still shows) and `redialed sport=Q`; exits 3 if a connect ends otherwise.
    Redial {
        #[arg(long)]
        refused: std::net::SocketAddrV4,
        #[arg(long)]
        connect: std::net::SocketAddrV4,
        /// Wait for SIGUSR1 between the two connects (e.g. while another process takes the
        /// freed port).
        #[arg(long)]
        wait_signal: bool,
    },
    /// A blocking connect() interrupted by SIGALRM after MS (a handler without SA_RESTART, so
    /// the call returns EINTR and the connect goes on in the kernel), e.g. while the server's
    /// full accept queue drops its SYNs; keeps the socket. Prints `connect interrupted errno=E
    /// sport=P`, or `connect ok sport=P` if it finished first.
    Interrupted {
        #[arg(long)]
        connect: std::net::SocketAddrV4,
        #[arg(long, value_name = "MS", default_value_t = 300)]
        after_ms: u64,
        /// The handler has SA_RESTART: the kernel restarts the call, which waits on. Prints
        /// `connect ok sport=P` or `connect failed errno=E` (and exits 3) when it ends.
        #[arg(long)]
        restart: bool,
    },
}

/// Exit status of a workload whose socket call failed as it reports on stdout.
pub const EXIT_SOCKET_ERROR: i32 = 3;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout only loses the line; the workload's effect on the kernel is what counts.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn sleep_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

fn prepare(args: &WorkloadArgs) -> anyhow::Result<()> {
    // SAFETY: prctl with constant arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    if let Some(path) = &args.netns {
        let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: valid fd; the process is still single-threaded, so the whole process moves.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("setns into {}", path.display()));
        }
    }
    if let Some(name) = &args.name {
        let c = std::ffi::CString::new(name.as_str()).context("--name contains NUL")?;
        // SAFETY: PR_SET_NAME copies at most 16 bytes from a valid C string.
        unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr(), 0, 0, 0) };
    }
    Ok(())
}

pub fn run(args: WorkloadArgs) -> anyhow::Result<()> {
    prepare(&args)?;
    match args.cmd {
        WorkloadCmd::Park { sysctl } => park(&sysctl),
        WorkloadCmd::Serve {
            listen,
            no_accept,
            backlog,
            accept_after_ms,
        } => serve(
            &listen,
            (!no_accept).then_some(Duration::from_millis(accept_after_ms)),
            backlog,
        ),
        WorkloadCmd::Hold {
            connect,
            count,
            nonblock: false,
        } => hold(connect, count),
        WorkloadCmd::Hold {
            connect,
            count,
            nonblock: true,
        } => hold_nonblocking(connect, count),
        WorkloadCmd::Churn {
            connect,
            count,
            ports,
            rst,
            cross_cpu: false,
            pause_ms,
            again,
            again_after_ms,
        } => {
            let pause = Duration::from_millis(pause_ms);
            churn(connect, count, ports, rst, pause)?;
            match again {
                Some(again) => {
                    std::thread::sleep(Duration::from_millis(again_after_ms));
                    churn(again, count, ports, rst, pause)
                }
                None => Ok(()),
            }
        }
        WorkloadCmd::Churn {
            connect,
            count,
            ports: 1,
            rst,
            cross_cpu: true,
            pause_ms: 0,
            ..
        } => churn_cross_cpu(connect, count, rst),
        WorkloadCmd::Churn {
            cross_cpu: true,
            pause_ms: 0,
            ..
        } => bail!("--cross-cpu takes one destination port"),
        WorkloadCmd::Churn {
            cross_cpu: true, ..
        } => bail!("--cross-cpu takes no --pause-ms"),
        WorkloadCmd::HalfClose {
            connect,
            count,
            close_after_ms,
        } => half_close(connect, count, Duration::from_millis(close_after_ms)),
        WorkloadCmd::Connect { connect, nonblock } => connect_once(connect, nonblock),
        WorkloadCmd::BindHold { count, addr, udp } => bind_hold(count, addr, udp),
        WorkloadCmd::Disconnect { connect } => disconnect(connect),
        WorkloadCmd::HoldBound {
            connect,
            count,
            from_port,
            reuse_addr,
        } => hold_bound(connect, count, from_port, reuse_addr),
        WorkloadCmd::Redial {
            refused,
            connect,
            wait_signal,
        } => redial(refused, connect, wait_signal),
        WorkloadCmd::Interrupted {
            connect,
            after_ms,
            restart,
        } => interrupted(connect, after_ms, restart),
        WorkloadCmd::NoPort {
            fastopen,
            unix,
            noroute,
        } => no_port(fastopen, &unix, noroute),
        WorkloadCmd::FastopenFails {
            fastopen: fast,
            unix,
            connect,
        } => fastopen_fails(fast, unix.as_deref(), connect),
        WorkloadCmd::Storm {
            threads,
            seconds,
            close,
            base_port,
        } => storm(threads, seconds, &close, base_port),
    }
}

/// `net.ipv4.tcp_tw_reuse=0` -> (/proc/sys/net/ipv4/tcp_tw_reuse, "0").
pub fn parse_sysctl(kv: &str) -> anyhow::Result<(PathBuf, String)> {
    let (k, v) = kv
        .split_once('=')
        .ok_or_else(|| anyhow!("`{kv}`: expected KEY=VALUE"))?;
    let k = k.trim();
    if k.is_empty() || k.contains("..") || k.contains('/') {
        bail!("`{k}` is not a sysctl name");
    }
    let path = PathBuf::from("/proc/sys").join(k.replace('.', "/"));
    Ok((path, v.trim().trim_matches('"').to_string()))
}

fn park(sysctls: &[String]) -> anyhow::Result<()> {
    let id = netns::unshare_new().context("creating a network namespace")?;
    for kv in sysctls {
        let (path, value) = parse_sysctl(kv)?;
        std::fs::write(&path, &value)
            .with_context(|| format!("writing `{value}` to {}", path.display()))?;
    }
    say(&format!("ready netns={id}"));
    sleep_forever()
}

/// Listens on `addrs`; accepts after `accept` (never if None).
fn serve(addrs: &[SocketAddr], accept: Option<Duration>, backlog: i32) -> anyhow::Result<()> {
    let mut listeners = Vec::new();
    for a in addrs {
        let l = TcpListener::bind(a).with_context(|| format!("listening on {a}"))?;
        // Calling listen() again on a listening socket sets its backlog.
        // SAFETY: valid listening fd.
        if unsafe { libc::listen(l.as_raw_fd(), backlog) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setting the backlog");
        }
        listeners.push(l);
    }
    let Some(after) = accept else {
        say("ready");
        sleep_forever()
    };
    for l in listeners {
        std::thread::spawn(move || {
            std::thread::sleep(after);
            for conn in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut conn = conn;
                    let mut buf = [0u8; 512];
                    while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
                });
            }
        });
    }
    say("ready");
    sleep_forever()
}

fn hold(addr: SocketAddr, count: u32) -> anyhow::Result<()> {
    let mut held = Vec::new();
    for _ in 0..count {
        match TcpStream::connect(addr) {
            Ok(s) => held.push(s),
            Err(e) => {
                say(&format!("connect failed errno={}", errno(&e)));
                std::process::exit(EXIT_SOCKET_ERROR);
            }
        }
    }
    let ports: Vec<String> = held
        .iter()
        .filter_map(|s| s.local_addr().ok())
        .map(|a| a.port().to_string())
        .collect();
    say(&format!("held {} ports={}", held.len(), ports.join(",")));
    sleep_forever()
}

fn hold_nonblocking(addr: SocketAddr, count: u32) -> anyhow::Result<()> {
    let (sa, len) = sockaddr_any(addr);
    let family = family(addr);
    let mut ports = Vec::new();
    for _ in 0..count {
        // SAFETY: plain socket calls on fds we own (kept open until we are killed).
        let (rc, fd) = unsafe {
            let fd = libc::socket(
                family,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            );
            if fd < 0 {
                return Err(std::io::Error::last_os_error()).context("socket");
            }
            let rc = libc::connect(fd, (&sa as *const libc::sockaddr_storage).cast(), len);
            (rc, fd)
        };
        let err = std::io::Error::last_os_error();
        if rc != 0 && errno(&err) != libc::EINPROGRESS {
            say(&format!("connect failed errno={}", errno(&err)));
            std::process::exit(EXIT_SOCKET_ERROR);
        }
        ports.push(local_port(fd).to_string());
    }
    say(&format!("held {} ports={}", ports.len(), ports.join(",")));
    sleep_forever()
}

fn family(addr: SocketAddr) -> libc::c_int {
    match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    }
}

/// `addr` as a sockaddr for connect() or bind(), with its length.
fn sockaddr_any(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid (empty) value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sa = sockaddr_v4(v4);
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sa) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sa = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sa) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn set_linger_zero(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and option struct for its size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
}

/// Destinations each `close` storm thread spreads its connects over (listeners on consecutive
/// ports). TIME_WAIT caps a connect storm to one destination even with `tcp_tw_reuse`: a port's
/// 4-tuple is taken again only once its TIME_WAIT is `tcp_tw_reuse_delay` (1 s) old, and
/// connect() picks from every other port of the range, so one destination takes about 14,000
/// connections a second in a 28,232-port range. Two threads with one destination each ran at
/// that cap (28.2k connections a second whatever was attached), not at their CPU's pace.
const CLOSE_DESTS_PER_THREAD: u16 = 8;

/// Destinations each thread of `mode` connects to.
fn dests_per_thread(mode: &str) -> u16 {
    if mode == "close" {
        CLOSE_DESTS_PER_THREAD
    } else {
        1
    }
}

/// One storm thread: returns (ok, failed). It connects to each of `dests` in turn, and listens
/// there unless it is `shared` (another thread's listener, which holds the range for all). Every
/// thread waits at `ready` until each has its listeners and, failing, its 16 held connections,
/// and again before letting them go, also when its own part failed (or the others would wait
/// for it for ever).
fn storm_thread(
    dests: std::ops::Range<u16>,
    shared: bool,
    ready: &std::sync::Barrier,
    deadline: std::time::Instant,
    mode: &str,
) -> anyhow::Result<(u64, u64)> {
    let addrs: Vec<SocketAddr> = dests
        .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
        .collect();
    let set_up = || -> anyhow::Result<_> {
        if shared {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut listeners = Vec::new();
        for addr in &addrs {
            listeners
                .push(TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?);
        }
        let mut held = Vec::new();
        if mode == "fail" || mode == "fail-one" {
            for (addr, listener) in addrs.iter().zip(&listeners) {
                for _ in 0..16 {
                    let c = TcpStream::connect(addr)?;
                    held.push((c, listener.accept()?.0));
                }
            }
        }
        Ok((listeners, held))
    };
    let storm = |listeners: &[TcpListener]| -> anyhow::Result<(u64, u64)> {
        let (mut ok, mut failed) = (0u64, 0u64);
        let mut next = 0;
        while std::time::Instant::now() < deadline {
            for _ in 0..64 {
                let at = next % addrs.len();
                next += 1;
                let addr = addrs[at];
                match TcpStream::connect(addr) {
                    Ok(c) => {
                        let Some(listener) = listeners.get(at) else {
                            bail!("connect to {addr} succeeded: the first thread holds no range");
                        };
                        let (s, _) = listener.accept()?;
                        if mode == "rst" {
                            set_linger_zero(&c);
                        }
                        // The client closes first: RST, or FIN and TIME_WAIT on the client side.
                        drop(c);
                        drop(s);
                        ok += 1;
                    }
                    Err(_) => failed += 1,
                }
            }
        }
        Ok((ok, failed))
    };
    let set_up = set_up();
    ready.wait();
    let stormed = set_up.as_ref().ok().map(|(listeners, _)| storm(listeners));
    // Held ports are let go once every thread is done: in fail-one the others fail against them.
    ready.wait();
    let (_, held) = set_up?;
    // At once (RST, no TIME_WAIT), so that the next storm can hold them again.
    for (c, _) in &held {
        set_linger_zero(c);
    }
    stormed.unwrap_or(Ok((0, 0)))
}

fn storm(threads: u16, seconds: f64, mode: &str, base_port: u16) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let one = mode == "fail-one";
    let per = dests_per_thread(mode);
    let last = u32::from(base_port) + u32::from(threads) * u32::from(per);
    if last > 65536 {
        bail!("{threads} threads of {per} destination(s) from port {base_port} pass 65535");
    }
    let ready = std::sync::Arc::new(std::sync::Barrier::new(threads.into()));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (mode, ready) = (mode.to_string(), ready.clone());
            let first = if one { base_port } else { base_port + i * per };
            let dests = first..first + per;
            std::thread::spawn(move || storm_thread(dests, one && i > 0, &ready, deadline, &mode))
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for h in handles {
        let (o, f) = h.join().map_err(|_| anyhow!("storm thread panicked"))??;
        ok += o;
        failed += f;
    }
    say(&format!(
        "storm ok={ok} failed={failed} secs={:.3}",
        start.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn half_close(addr: SocketAddr, count: u32, after: Duration) -> anyhow::Result<()> {
    let (mut ok, mut failed) = (0u32, 0u32);
    let mut open = Vec::new();
    for _ in 0..count {
        match TcpStream::connect(addr) {
            Ok(s) => match s.shutdown(std::net::Shutdown::Write) {
                Ok(()) => open.push(s),
                Err(_) => failed += 1,
            },
            Err(_) => failed += 1,
        }
    }
    std::thread::sleep(after);
    ok += open.len() as u32;
    drop(open);
    say(&format!("half-closed ok={ok} failed={failed}"));
    Ok(())
}

fn churn(
    addr: SocketAddr,
    count: u32,
    ports: u16,
    rst: bool,
    pause: Duration,
) -> anyhow::Result<()> {
    let (mut ok, mut failed) = (0u32, 0u32);
    for i in 0..ports {
        let port = addr
            .port()
            .checked_add(i)
            .ok_or_else(|| anyhow!("--ports {ports} from port {} passes 65535", addr.port()))?;
        let to = SocketAddr::new(addr.ip(), port);
        for _ in 0..count {
            match TcpStream::connect(to) {
                Ok(s) => {
                    ok += 1;
                    if rst {
                        set_linger_zero(&s);
                    }
                    drop(s);
                }
                Err(_) => failed += 1,
            }
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
    }
    say(&format!("churned ok={ok} failed={failed}"));
    Ok(())
}

fn churn_cross_cpu(addr: SocketAddr, count: u32, rst: bool) -> anyhow::Result<()> {
    let cpus = allowed_cpus()?;
    let (Some(&first), Some(&last)) = (cpus.first(), cpus.last()) else {
        bail!("no CPU in this process's affinity mask");
    };
    if first == last {
        bail!("--cross-cpu needs two CPUs; this process may run on CPU {first} only");
    }
    pin_to(last)?;
    let (mut streams, mut failed) = (Vec::new(), 0u32);
    for _ in 0..count {
        match TcpStream::connect(addr) {
            Ok(s) => {
                if rst {
                    set_linger_zero(&s);
                }
                streams.push(s);
            }
            Err(_) => failed += 1,
        }
    }
    let ok = streams.len();
    std::thread::spawn(move || -> anyhow::Result<()> {
        pin_to(first)?;
        drop(streams);
        Ok(())
    })
    .join()
    .map_err(|_| anyhow!("the closing thread panicked"))??;
    say(&format!(
        "churned ok={ok} failed={failed} cpus={last},{first}"
    ));
    Ok(())
}

/// The CPUs this process may run on, ascending.
fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t filled by the kernel, then only tested.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect())
    }
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t with one CPU set, passed with its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("pinning to CPU {cpu}"));
        }
    }
    Ok(())
}

fn sockaddr_v4(addr: std::net::SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// The socket's local port (0 if getsockname fails), IPv4 or IPv6: both sockaddrs keep the
/// port at the same offset.
fn local_port(fd: i32) -> u16 {
    // SAFETY: a zeroed sockaddr_storage with its length, filled by the kernel; sockaddr_in's
    // layout is a prefix of sockaddr_in6's as far as the port.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getsockname(
            fd,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        ) != 0
        {
            return 0;
        }
        u16::from_be((*(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()).sin_port)
    }
}

/// SIGUSR1 blocked, as a set for [`wait_usr1`]. Call it before saying anything, so that the
/// test's signal waits for sigwait.
fn block_usr1() -> libc::sigset_t {
    // SAFETY: plain sigset manipulation on a zeroed set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_usr1(set: &libc::sigset_t) {
    let mut sig = 0;
    // SAFETY: `set` holds SIGUSR1, blocked by block_usr1.
    unsafe { libc::sigwait(set, &mut sig) };
}

fn disconnect(addr: std::net::SocketAddrV4) -> anyhow::Result<()> {
    let set = block_usr1();
    let s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    let fd = s.as_raw_fd();
    say(&format!("connected sport={}", local_port(fd)));
    wait_usr1(&set);
    let unspec = libc::sockaddr {
        sa_family: libc::AF_UNSPEC as u16,
        sa_data: [0; 14],
    };
    // SAFETY: a valid fd and sockaddr of the given length.
    let r = unsafe {
        libc::connect(
            fd,
            &unspec,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if r != 0 {
        bail!("connect(AF_UNSPEC): {}", std::io::Error::last_os_error());
    }
    say("disconnected");
    wait_usr1(&set);
    if let Err(e) = connect_fd(fd, addr.into()) {
        bail!("reconnecting: {}", std::io::Error::from_raw_os_error(e));
    }
    say(&format!("reconnected sport={}", local_port(fd)));
    sleep_forever()
}

/// A new blocking TCP socket of `addr`'s family.
fn tcp_socket(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: socket() with a valid family and constant arguments; the fd is owned by the
    // TcpStream at once.
    let fd = unsafe { libc::socket(family(addr), libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket");
    }
    // SAFETY: fd was just created and is owned by nothing else.
    Ok(unsafe { TcpStream::from_raw_fd(fd) })
}

/// connect() on `fd`: Ok, or the errno it failed with.
fn connect_fd(fd: i32, addr: SocketAddr) -> Result<(), i32> {
    let (sa, len) = sockaddr_any(addr);
    // SAFETY: a valid fd and a sockaddr we own, with its true length.
    let r = unsafe { libc::connect(fd, (&sa as *const libc::sockaddr_storage).cast(), len) };
    if r == 0 {
        Ok(())
    } else {
        Err(errno(&std::io::Error::last_os_error()))
    }
}

fn hold_bound(addr: SocketAddr, count: u16, from: u16, reuse_addr: bool) -> anyhow::Result<()> {
    let mut held = Vec::new();
    for i in 0..count {
        let port = from
            .checked_add(i)
            .context("--from-port + --count passes 65535")?;
        let s = tcp_socket(addr)?;
        if reuse_addr {
            let on: libc::c_int = 1;
            // SAFETY: a valid fd and an int option of its size.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_REUSEADDR,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error()).context("SO_REUSEADDR");
            }
        }
        let (local, len) = sockaddr_any(SocketAddr::new(addr.ip(), port));
        // SAFETY: a valid fd and a sockaddr we own, with its true length.
        let rc = unsafe {
            libc::bind(
                s.as_raw_fd(),
                (&local as *const libc::sockaddr_storage).cast(),
                len,
            )
        };
        if rc != 0 {
            say(&format!(
                "bind failed errno={}",
                errno(&std::io::Error::last_os_error())
            ));
            std::process::exit(EXIT_SOCKET_ERROR);
        }
        if let Err(e) = connect_fd(s.as_raw_fd(), addr) {
            say(&format!("connect failed errno={e}"));
            std::process::exit(EXIT_SOCKET_ERROR);
        }
        held.push((s, port));
    }
    let ports: Vec<String> = held.iter().map(|(_, p)| p.to_string()).collect();
    say(&format!("held {} ports={}", held.len(), ports.join(",")));
    sleep_forever()
}

fn redial(
    refused: std::net::SocketAddrV4,
    addr: std::net::SocketAddrV4,
    wait_signal: bool,
) -> anyhow::Result<()> {
    let set = wait_signal.then(block_usr1);
    let s = tcp_socket(refused.into())?;
    let fd = s.as_raw_fd();
    match connect_fd(fd, refused.into()) {
        Err(e) if e == libc::ECONNREFUSED => {
            say(&format!("refused errno={e} sport={}", local_port(fd)));
        }
        other => {
            say(&format!("connect to {refused} was not refused: {other:?}"));
            std::process::exit(EXIT_SOCKET_ERROR);
        }
    }
    if let Some(set) = &set {
        wait_usr1(set);
    }
    if let Err(e) = connect_fd(fd, addr.into()) {
        say(&format!("connect failed errno={e}"));
        std::process::exit(EXIT_SOCKET_ERROR);
    }
    say(&format!("redialed sport={}", local_port(fd)));
    sleep_forever()
}

extern "C" fn on_alarm(_: libc::c_int) {}

fn interrupted(addr: std::net::SocketAddrV4, after_ms: u64, restart: bool) -> anyhow::Result<()> {
    // SAFETY: a zeroed sigaction with a handler that does nothing; without SA_RESTART the
    // interrupted connect() returns EINTR instead of being restarted.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_alarm as extern "C" fn(libc::c_int) as usize;
        if restart {
            sa.sa_flags = libc::SA_RESTART;
        }
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error()).context("sigaction(SIGALRM)");
        }
    }
    let timer = libc::itimerval {
        it_interval: libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        it_value: libc::timeval {
            tv_sec: (after_ms / 1000) as libc::time_t,
            tv_usec: ((after_ms % 1000) * 1000) as libc::suseconds_t,
        },
    };
    let s = tcp_socket(addr.into())?;
    let fd = s.as_raw_fd();
    // SAFETY: a valid itimerval; the old value is not wanted.
    if unsafe { libc::setitimer(libc::ITIMER_REAL, &timer, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setitimer");
    }
    match connect_fd(fd, addr.into()) {
        Ok(()) => say(&format!("connect ok sport={}", local_port(fd))),
        Err(e) if e == libc::EINTR => {
            say(&format!(
                "connect interrupted errno={e} sport={}",
                local_port(fd)
            ));
        }
        Err(e) => {
            say(&format!("connect failed errno={e}"));
            std::process::exit(EXIT_SOCKET_ERROR);
        }
    }
    sleep_forever()
}

fn connect_once(addr: SocketAddr, nonblock: bool) -> anyhow::Result<()> {
    let result = if nonblock {
        // std's connect_timeout is a non-blocking connect (EINPROGRESS) followed by poll.
        TcpStream::connect_timeout(&addr, Duration::from_secs(10))
    } else {
        TcpStream::connect(addr)
    };
    match result {
        Ok(s) => {
            let sport = s.local_addr().map(|a| a.port()).unwrap_or(0);
            say(&format!("connect ok sport={sport}"));
            Ok(())
        }
        Err(e) => {
            // When connect() returned, in Unix ns: the benchmark's latency reference.
            let at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            say(&format!("connect failed errno={} at={at}", errno(&e)));
            std::process::exit(EXIT_SOCKET_ERROR);
        }
    }
}

/// A blocking TCP connection opened by sendto(MSG_FASTOPEN): the kernel connects inside sendto,
/// so no connect() returns for it.
fn fastopen(addr: std::net::SocketAddrV4) -> anyhow::Result<TcpStream> {
    let stream = tcp_socket(addr.into())?;
    let sa = sockaddr_v4(addr);
    // SAFETY: a one-byte buffer and a sockaddr_in we own, with their true lengths.
    let sent = unsafe {
        libc::sendto(
            stream.as_raw_fd(),
            b"x".as_ptr().cast(),
            1,
            libc::MSG_FASTOPEN,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if sent != 1 {
        return Err(std::io::Error::last_os_error()).context("sendto(MSG_FASTOPEN)");
    }
    Ok(stream)
}

fn no_port(
    fast: std::net::SocketAddrV4,
    unix: &std::path::Path,
    noroute: SocketAddr,
) -> anyhow::Result<()> {
    // Kept open while the process sleeps.
    let _kept = match fastopen(fast) {
        Ok(kept) => {
            let sport = kept.local_addr().map(|a| a.port()).unwrap_or(0);
            say(&format!("fastopen ok sport={sport}"));
            Some(kept)
        }
        Err(e) => {
            let errno = e
                .downcast_ref::<std::io::Error>()
                .map_or(0, |e| e.raw_os_error().unwrap_or(0));
            say(&format!("fastopen failed errno={errno}"));
            None
        }
    };
    match std::os::unix::net::UnixStream::connect(unix) {
        Ok(_) => bail!("{} accepted a connection", unix.display()),
        Err(e) => say(&format!("unix failed errno={}", errno(&e))),
    }
    match TcpStream::connect(noroute) {
        Ok(_) => bail!("{noroute} has a route"),
        Err(e) => say(&format!("noroute failed errno={}", errno(&e))),
    }
    sleep_forever()
}

fn fastopen_fails(
    fast: std::net::SocketAddrV4,
    unix: Option<&std::path::Path>,
    connect: Option<SocketAddr>,
) -> anyhow::Result<()> {
    match fastopen(fast) {
        Ok(_) => bail!("sendto(MSG_FASTOPEN) to {fast} connected: the range is not exhausted"),
        Err(e) => {
            let errno = e
                .downcast_ref::<std::io::Error>()
                .map_or(0, |e| e.raw_os_error().unwrap_or(0));
            say(&format!("fastopen failed errno={errno}"));
        }
    }
    if let Some(unix) = unix {
        match std::os::unix::net::UnixStream::connect(unix) {
            Ok(_) => bail!("{} accepted a connection", unix.display()),
            Err(e) => say(&format!("unix failed errno={}", errno(&e))),
        }
    }
    if let Some(addr) = connect {
        match TcpStream::connect(addr) {
            Ok(_) => bail!("{addr} accepted a connection: the range is not exhausted"),
            Err(e) => say(&format!("connect failed errno={}", errno(&e))),
        }
    }
    sleep_forever()
}

fn bind_hold(count: u32, addr: std::net::Ipv4Addr, udp: bool) -> anyhow::Result<()> {
    let kind = if udp {
        libc::SOCK_DGRAM
    } else {
        libc::SOCK_STREAM
    };
    let mut fds = Vec::new();
    for _ in 0..count {
        // SAFETY: plain socket/bind calls with a sockaddr_in we own; fds are kept open.
        let rc = unsafe {
            let fd = libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                -1
            } else {
                fds.push(fd);
                let sa = sockaddr_v4(std::net::SocketAddrV4::new(addr, 0));
                libc::bind(
                    fd,
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            }
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            say(&format!("bind failed errno={}", errno(&e)));
            std::process::exit(EXIT_SOCKET_ERROR);
        }
    }
    say(&format!("bound {}", fds.len()));
    sleep_forever()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        w: WorkloadArgs,
    }

    #[test]
    fn sysctl_names_map_to_proc_sys_and_refuse_traversal() {
        let (p, v) = parse_sysctl("net.ipv4.ip_local_port_range=\"40000 40015\"").unwrap();
        assert_eq!(p, PathBuf::from("/proc/sys/net/ipv4/ip_local_port_range"));
        assert_eq!(v, "40000 40015");
        assert!(parse_sysctl("net/../../etc=1").is_err());
        assert!(parse_sysctl("novalue").is_err());
    }

    #[test]
    fn global_options_go_anywhere() {
        let t = T::try_parse_from([
            "w",
            "hold",
            "--connect",
            "127.0.0.1:9000",
            "--count",
            "16",
            "--name",
            "hog",
        ])
        .unwrap();
        assert_eq!(t.w.name.as_deref(), Some("hog"));
        assert!(matches!(t.w.cmd, WorkloadCmd::Hold { count: 16, .. }));
        assert!(T::try_parse_from(["w", "connect", "--connect", "nonsense"]).is_err());
    }
}
