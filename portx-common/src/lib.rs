//! Types shared by the portx eBPF programs and the user-space agent.
//!
//! Every record the kernel writes into one of the `EVENTS_<n>` ring buffers starts with an [`EventHeader`]; the
//! agent reads `kind` first and dispatches. All kinds and flags are plain `u32`s (never Rust enums read
//! from kernel bytes), every struct is `#[repr(C)]` with explicit padding, and sizes are asserted at
//! compile time so that a layout change on one side cannot silently break the other.
#![no_std]

use core::mem::size_of;

/// Length of `task_struct::comm`.
pub const TASK_COMM_LEN: usize = 16;

/// Most network namespaces `--netns` may name (the size of the kernel-side filter).
pub const MAX_NETNS_FILTER: u32 = 256;

/// Up to this many `--netns` namespaces the kernel compares inline (`FILTER_NETNS_INLINE`)
/// instead of looking each socket's namespace up in `NETNS_FILTER`.
pub const NETNS_FILTER_INLINE: usize = 4;

/// Failure records wake the agent at most once per this interval per CPU; the agent drains again
/// this long after reading a failure, so a failure that did not wake it waits at most about
/// twice this long.
pub const FAILURE_WAKE_GAP_NS: u64 = 5_000_000;

/// A failing connect()'s key (process, namespace, destination, errno: [`FailureKey`]) gets a
/// record about once per this interval (CPUs failing at the same moment may each write one); the
/// failures in between are only counted, in the `FAILURE_COUNTS` map, and the key's next record
/// or the agent's reading of the map (once a second) accounts them. The agent sets it (global
/// `FAILURE_RECORD_GAP_NS`); 0 (`--every-failure`): a record per failure.
pub const FAILURE_RECORD_GAP_NS: u64 = 100_000_000;

/// Keys `FAILURE_COUNTS` holds at once; a failure of a new key past it gets a record of its own,
/// as every failure did before the counting.
pub const MAX_FAILURE_KEYS: u32 = 4096;

/// Most ring buffers the kernel side writes to: CPU `c` writes to ring `c % RING_COUNT`, and the
/// agent sets `RING_COUNT` (at most this) from the number of CPUs. One ring shared by every CPU
/// costs each record a contended lock and cache line.
pub const MAX_RINGS: usize = 8;

/// Names of the maps and globals in the eBPF object; the agent looks them up by these names.
pub mod names {
    /// The ring buffers, `EVENTS[n]` for ring n.
    pub const EVENTS: [&str; super::MAX_RINGS] = [
        "EVENTS_0", "EVENTS_1", "EVENTS_2", "EVENTS_3", "EVENTS_4", "EVENTS_5", "EVENTS_6",
        "EVENTS_7",
    ];
    pub const RING_COUNT: &str = "RING_COUNT";
    pub const DROPS: &str = "DROPS";
    pub const AGENT_TGID: &str = "AGENT_TGID";
    pub const HOOK_MODE: &str = "HOOK_MODE";
    pub const OFFSETS: &str = "OFFSETS";
    pub const WAKEUP_BYTES: &str = "WAKEUP_BYTES";
    pub const FILTER_NETNS: &str = "FILTER_NETNS";
    pub const FILTER_NETNS_INLINE: &str = "FILTER_NETNS_INLINE";
    pub const NETNS_FILTER: &str = "NETNS_FILTER";
    pub const FAILURE_RECORD_GAP_NS: &str = "FAILURE_RECORD_GAP_NS";
    pub const FAILURE_COUNTS: &str = "FAILURE_COUNTS";
    pub const CONNECTING: &str = "CONNECTING";
}

/// Entries of the per-CPU `DROPS` array: what the kernel side could not do, counted so that the
/// agent can say so instead of the loss passing unseen.
pub mod drops {
    /// Records not written: the ring buffer was full (the agent's `lost`).
    pub const RING_FULL: u32 = 0;
    /// Program runs that gave up before writing what they were for: a kernel or user read that
    /// failed, a per-thread note the map had no room for (the agent counts these into `missed`,
    /// with the runs the kernel skipped).
    pub const GAVE_UP: u32 = 1;
    /// Entries in the array.
    pub const COUNT: u32 = 2;
}

/// Record kinds (`EventHeader::kind`).
pub mod kind {
    /// A TCP socket changed state (`sock:inet_sock_set_state`): [`super::StateEvent`].
    pub const STATE: u32 = 1;
    /// A connect()'s source port is known, or its allocation failed: [`super::PortEvent`].
    pub const PORT: u32 = 2;
    /// A connect() syscall that put a TCP socket into SYN_SENT failed: [`super::SyscallEvent`].
    pub const CONNECT_FAIL: u32 = 3;
    /// A bind() syscall failed: [`super::SyscallEvent`].
    pub const BIND_FAIL: u32 = 4;
}

/// How the kernel side learns the source port of a connect (`HOOK_MODE` global and the
/// `EventHeader::flags` of a [`PortEvent`]).
pub mod hook_mode {
    /// fexit on `inet_hash_connect`.
    pub const FENTRY: u32 = 1;
    /// kretprobe on `inet_hash_connect`, socket stashed by a kprobe at entry.
    pub const KPROBE: u32 = 2;
    /// Tracepoints only: the socket is stashed at CLOSE->SYN_SENT and its port read when
    /// `connect()` returns.
    pub const TRACEPOINT: u32 = 3;
}

/// Flags of a [`kind::STATE`] record (`EventHeader::flags`) on the paths where a connect's
/// first record waits for its port (tracepoint mode; IPv4 in fentry mode has fexit write it).
pub mod state_flags {
    /// Written by the connecting thread, before its connect() returned, for the socket it is
    /// connecting (loopback answers within the call): the record also stands for the socket's
    /// CLOSE->SYN_SENT, and its task is the owner.
    pub const OPENS: u32 = 1;
    /// Written when connect() returned, for a socket no record has opened yet: `oldstate` is
    /// CLOSE, `newstate` the state the socket was in then, `sport` the port it got, the task the
    /// owner. Transitions the socket went through in other contexts (a SYN-ACK handled in
    /// softirq while the thread slept in connect()) came before it, without an owner.
    pub const AT_EXIT: u32 = 2;
}

/// Flags of a [`kind::CONNECT_FAIL`] record (`EventHeader::flags`).
pub mod fail_flags {
    /// The failure was counted in `FAILURE_COUNTS` under its [`super::FailureKey`], and the
    /// record carries the key's entry as it was then: `count` (all failures counted under the
    /// entry so far, its own included) and `born_ns` (when the entry was made). It stands for
    /// those of them the agent has not accounted yet. Without this flag (a record per failure
    /// asked for, the map full, a connect a record opened) the record stands for itself alone.
    pub const COUNTED: u32 = 1;
    /// The bits from here up hold the port bind() gave the socket before connect() (host order;
    /// 0: none). Such a connect() does not search: an EADDRNOTAVAIL says that port's 4-tuple to
    /// the destination is in use, not that the range is.
    pub const BOUND_PORT_SHIFT: u32 = 16;
    /// With [`COUNTED`], the bits from here to [`BOUND_PORT_SHIFT`] hold the key's
    /// [`super::FailureKey::cpu`].
    pub const CPU_SHIFT: u32 = 1;
    /// The CPU numbers a key tells apart: CPUs 32768 apart share entries (and a cache line).
    pub const CPU_MASK: u32 = 0x7fff;

    /// A [`super::FailureKey::cpu`] for CPU `cpu`.
    pub const fn key_cpu(cpu: u32) -> u16 {
        (cpu & CPU_MASK) as u16
    }

    /// `flags` with `cpu` (a [`key_cpu`]) as the key's CPU.
    pub const fn with_cpu(flags: u32, cpu: u16) -> u32 {
        flags | ((cpu as u32) & CPU_MASK) << CPU_SHIFT
    }

    /// The key's CPU a counted record's `flags` carry.
    pub const fn cpu(flags: u32) -> u16 {
        ((flags >> CPU_SHIFT) & CPU_MASK) as u16
    }

    /// `flags` with `port` as the socket's bound port.
    pub const fn with_bound_port(flags: u32, port: u16) -> u32 {
        flags | (port as u32) << BOUND_PORT_SHIFT
    }

    /// The socket's bound port (0: none).
    pub const fn bound_port(flags: u32) -> u16 {
        (flags >> BOUND_PORT_SHIFT) as u16
    }
}

/// Flags of a [`kind::BIND_FAIL`] record (`EventHeader::flags`).
pub mod bind_flags {
    /// The call's fd was followed to its socket: the record's `netns` is the socket's (else the
    /// calling task's), and the bits from [`PROTOCOL_SHIFT`] up hold its `sk_protocol` (else
    /// they are 0: unknown).
    pub const SOCKET_READ: u32 = 1;
    pub const PROTOCOL_SHIFT: u32 = 16;

    /// The flags of a record whose socket was read and has `sk_protocol` `protocol`.
    pub const fn socket_read(protocol: u16) -> u32 {
        SOCKET_READ | (protocol as u32) << PROTOCOL_SHIFT
    }

    /// The socket's protocol, if the record's `flags` say it was read.
    pub const fn protocol(flags: u32) -> Option<u16> {
        if flags & SOCKET_READ == 0 {
            None
        } else {
            Some((flags >> PROTOCOL_SHIFT) as u16)
        }
    }
}

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const SYN_SENT: u32 = 2;
    pub const SYN_RECV: u32 = 3;
    pub const FIN_WAIT1: u32 = 4;
    pub const FIN_WAIT2: u32 = 5;
    pub const TIME_WAIT: u32 = 6;
    pub const CLOSE: u32 = 7;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const LISTEN: u32 = 10;
    pub const CLOSING: u32 = 11;
    pub const NEW_SYN_RECV: u32 = 12;
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;
pub const IPPROTO_UDP: u16 = 17;
/// Multipath TCP's socket (`sk_protocol`); its subflows are TCP sockets and take TCP's ports.
pub const IPPROTO_MPTCP: u16 = 262;
/// `connect()` on a non-blocking socket: the handshake is under way, not a failure.
pub const EINPROGRESS: i32 = 115;
pub const EADDRNOTAVAIL: i32 = 99;
pub const EADDRINUSE: i32 = 98;
pub const ENOMEM: i32 = 12;
pub const EFAULT: i32 = 14;
pub const EINTR: i32 = 4;
/// Kernel-internal: a blocking call interrupted by a signal, restarted or turned into EINTR when
/// the signal is handled (after the syscall's exit tracepoint and fexit have run).
pub const ERESTARTSYS: i32 = 512;

/// Offsets in `syscalls:sys_enter_*` / `sys_exit_*` records (stable since the syscall tracepoints
/// exist; also checked by the agent).
pub mod syscall_tp {
    /// `sys_enter_bind`: the fd argument.
    pub const ARG0: usize = 16;
    /// The `struct sockaddr *` argument.
    pub const ARG1: usize = 24;
    /// `sys_exit_*`: the return value (`long`).
    pub const RET: usize = 16;
}

/// Fixed header of every ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventHeader {
    /// One of [`kind`].
    pub kind: u32,
    /// Process id (`tgid`) of the current task. [`kind::STATE`] records carry a task (pid, tid,
    /// comm) only for CLOSE->SYN_SENT and records with a [`state_flags`] flag, written by the
    /// connecting thread; for every other transition the current task is unrelated to the
    /// socket (softirq, timers) and these fields are 0.
    pub tgid: u32,
    /// Thread id of the current task.
    pub tid: u32,
    /// Per-kind flags; for [`kind::PORT`] the [`hook_mode`] that produced it.
    pub flags: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC), read after the record's space was reserved in its
    /// ring: a record not yet reserved when the agent looked at a ring will carry a later time,
    /// which is what lets the agent merge the rings in time order.
    pub ts_ns: u64,
    pub comm: [u8; TASK_COMM_LEN],
}

/// A TCP state change. Ports in host byte order; IPv4 addresses in the first 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateEvent {
    pub hdr: EventHeader,
    /// Kernel address of the socket: stable for the socket's life, the key that carries the
    /// owner learned in process context to later softirq transitions.
    pub skaddr: u64,
    /// Network namespace inode number (`net->ns.inum`), 0 if unreadable.
    pub netns: u32,
    pub oldstate: u32,
    pub newstate: u32,
    pub family: u16,
    pub protocol: u16,
    pub sport: u16,
    pub dport: u16,
    pub _pad: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// The source port a connect got (`ret == 0`, `sport != 0`) or the allocation failed (`ret < 0`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortEvent {
    pub hdr: EventHeader,
    pub skaddr: u64,
    pub netns: u32,
    /// Return value of `inet_hash_connect` (fentry/kprobe modes) or of `connect()` (tracepoint mode).
    pub ret: i32,
    /// `inet_num` of the socket after the allocation; 0 if none.
    pub sport: u16,
    pub _pad: [u16; 3],
}

/// A failed `connect()` (the destination of the socket it put into SYN_SENT) or `bind()` (the
/// address the caller passed).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallEvent {
    pub hdr: EventHeader,
    /// connect(): the socket it put into SYN_SENT; bind(): 0.
    pub skaddr: u64,
    pub netns: u32,
    /// Negative errno returned by the syscall.
    pub ret: i32,
    pub family: u16,
    /// Destination port (connect) or requested local port (bind; 0 = "any"), host order.
    pub port: u16,
    /// The fd argument; -1 for a connect() whose fd portx did not read (a failed port search,
    /// or the tracepoint path before Linux 5.15).
    pub fd: i32,
    /// Destination (connect) or local (bind) address.
    pub addr: [u8; 16],
    /// With [`fail_flags::COUNTED`]: [`FailureCount::count`] after this failure, else 0.
    pub count: u64,
    /// With [`fail_flags::COUNTED`]: [`FailureCount::born_ns`], else 0.
    pub born_ns: u64,
}

/// Who failed to connect where, and how: a key of `FAILURE_COUNTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FailureKey {
    /// Process id (tgid) of the failing thread.
    pub tgid: u32,
    pub netns: u32,
    /// Negative errno, as connect() returned it.
    pub ret: i32,
    pub family: u16,
    /// Destination port, host order.
    pub dport: u16,
    pub daddr: [u8; 16],
    /// 1 if bind() gave the socket a port before connect() (the records carry which one), else
    /// 0: a bound socket's failures, whose cause is that port's 4-tuple and not the range, are
    /// counted apart. Not the port itself: a client that binds ports of its own choosing would
    /// make a key of each.
    pub bound: u16,
    /// The CPU that counted these failures ([`fail_flags::CPU_MASK`] of its number): each CPU
    /// counts a key's failures in an entry of its own, so that threads failing towards one
    /// destination on several CPUs do not all write one cache line (an atomic add on a line
    /// another CPU just wrote: connect()'s exit 172 against 134 ns a run, session 36). The
    /// agent accounts each entry apart and adds them up; nothing it reports names the CPU.
    pub cpu: u16,
}

/// A `FAILURE_COUNTS` entry. The kernel only ever adds to `count` (atomically: the entry is its
/// CPU's, see [`FailureKey::cpu`], but a thread preempted inside the program on a preemptible
/// kernel can meet another one there), so the agent reading it races with nothing; it deletes an
/// entry once the entry's process is gone, or, with the map half full, once it has been idle.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FailureCount {
    /// Failures counted under the key since the entry was made.
    pub count: u64,
    /// When a failure of the key last got a record (`bpf_ktime_get_ns`).
    pub last_record_ns: u64,
    /// When the entry was made: tells an entry from one made again for the same key after the
    /// agent deleted it.
    pub born_ns: u64,
    /// The jiffy (`bpf_jiffies64`) before which no failure of the key reads the clock: the one
    /// after the last failure that did. A key failing nonstop reads it once a jiffy, not once a
    /// failure (kernel side only).
    pub clock_read_jiffy: u64,
}

/// A `CONNECTING` entry, by thread (`pid_tgid`): the socket the thread's connect() put into
/// SYN_SENT and where it goes, written by the state program in the thread's own context. The
/// agent reads the map too: a note that stays [`connect_phase::SEEKING`] is a connect still
/// waiting in SYN_SENT whose port no record may have brought yet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connecting {
    /// Kernel address of the socket (as [`StateEvent::skaddr`]).
    pub sk: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub netns: u32,
    pub family: u16,
    /// Host order.
    pub dport: u16,
    /// One of [`connect_phase`].
    pub phase: u32,
    /// `skc_num` at CLOSE->SYN_SENT: the port bind() gave the socket (host order), else 0.
    pub bound_port: u16,
    pub _pad: u16,
}

/// Where a noted connect is ([`Connecting::phase`]).
pub mod connect_phase {
    /// Taken by connect()'s exit: nothing left to do with it.
    pub const TAKEN: u32 = 0;
    /// In SYN_SENT, the port being sought or found; where the first record waits for the port,
    /// no record has opened the connect yet.
    pub const SEEKING: u32 = 1;
    /// The port search failed (SYN_SENT->CLOSE with no port) and that state change was not
    /// written: connect()'s failure record names the socket and says it all. Should no
    /// connect() return for it (TCP Fast Open's sendto, io_uring), the thread's next connect or
    /// connect() exit writes it — where a record opened the connect (not where the first
    /// record waits for the port: then nothing opened it).
    pub const SEARCH_FAILED: u32 = 2;
    /// The connect's first record was written by a state change in the connecting thread
    /// before connect() returned ([`super::state_flags::OPENS`]).
    pub const OPENED: u32 = 3;
    /// fexit on `inet_hash_connect` (fentry mode, a connect no record opened) saw the search
    /// fail for a socket that still shows a port in `inet_sport` (one bind() gave it, or one an
    /// earlier connect got and freed), so the SYN_SENT->CLOSE that follows cannot be told a
    /// failed search's by its port. That state change, next in the same call, finds this mark
    /// and makes it [`SEARCH_FAILED`].
    pub const SEARCH_FAILING: u32 = 4;
}

/// Kernel struct field offsets, read by the agent from `/sys/kernel/btf/vmlinux` and set as the
/// `OFFSETS` global before load (Rust eBPF has no CO-RE relocations). All `struct sock` offsets
/// are from the start of `struct sock` (`__sk_common` is its first member).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KernelOffsets {
    /// `skc_family` (u16).
    pub sock_family: u32,
    /// `sk_protocol` (u16 since Linux 5.6).
    pub sock_protocol: u32,
    /// `skc_dport` (__be16).
    pub sock_dport: u32,
    /// `skc_rcv_saddr` (__be32): IPv4 local address.
    pub sock_rcv_saddr: u32,
    /// `skc_daddr` (__be32): IPv4 destination.
    pub sock_daddr: u32,
    /// `skc_v6_rcv_saddr` (struct in6_addr).
    pub sock_v6_rcv_saddr: u32,
    /// `skc_v6_daddr` (struct in6_addr).
    pub sock_v6_daddr: u32,
    /// `skc_num` (u16, local port, host order). Zeroed by `inet_put_port()` before the state
    /// change to CLOSE is traced: use `inet_sport` there.
    pub sock_num: u32,
    /// `struct inet_sock` -> `inet_sport` (__be16): the local port, kept through CLOSE.
    pub inet_sport: u32,
    /// `skc_state` (u8): the TCP state.
    pub sock_state: u32,
    /// `struct sock` -> `__sk_common.skc_net.net` (`struct net *`).
    pub sock_net: u32,
    /// `struct net` -> `ns.inum` (u32).
    pub net_inum: u32,
    /// `struct task_struct` -> `nsproxy` (`struct nsproxy *`).
    pub task_nsproxy: u32,
    /// `struct nsproxy` -> `net_ns` (`struct net *`).
    pub nsproxy_net: u32,
    /// `sk_max_ack_backlog` (u32 since Linux 5.5): a listener's backlog, which the sockets it
    /// accepts inherit (they are copies of it) and a socket that connects never has.
    pub sock_max_ack_backlog: u32,
    /// `struct net` -> `net_cookie` (8 bytes: u64, `atomic64_t` on older kernels), never the
    /// same for two namespaces; 0 where BTF has no such member. The kernel programs remember
    /// each namespace's `ns.inum` by it (`ns.inum` shares a cache line with the namespace's
    /// reference count, which every socket's creation and end writes).
    pub net_cookie: u32,
    /// `struct pt_regs`: where a syscall's first argument is at its exit (x86-64 `di`, arm64
    /// `orig_x0`: arm64 writes the return value over `regs[0]`); 0 where portx does not know the
    /// architecture. With [`Self::regs_arg1`] it lets bind()'s exit read the call's fd and
    /// address from the task's registers, so that no program is needed at bind()'s entry.
    pub regs_arg0: u32,
    /// `struct pt_regs`: a syscall's second argument at its exit (x86-64 `si`, arm64 `regs[1]`).
    pub regs_arg1: u32,
    /// `struct task_struct` -> `files` (`struct files_struct *`); 0 where BTF lacks one of the
    /// descriptor-table members below. With them a failed connect() or bind() follows its fd to
    /// its socket (only then: a few reads a failure, none a success).
    pub task_files: u32,
    /// `struct files_struct` -> `fdt` (`struct fdtable *`).
    pub files_fdt: u32,
    /// `struct fdtable` -> `max_fds` (unsigned int).
    pub fdtable_max_fds: u32,
    /// `struct fdtable` -> `fd` (`struct file **`).
    pub fdtable_fd: u32,
    /// `struct file` -> `private_data`: a socket's file holds its `struct socket *` there.
    pub file_private_data: u32,
    /// `struct socket` -> `sk` (`struct sock *`).
    pub socket_sk: u32,
}

impl KernelOffsets {
    /// True when the fields the state program needs from `struct sock_common` sit where
    /// [`SockCommonHead`] has them (every x86-64 and arm64 kernel with IPv6 since 4.x): it then
    /// reads them with one copy instead of one helper call each.
    pub const fn head_matches(&self) -> bool {
        self.sock_daddr == 0
            && self.sock_rcv_saddr == 4
            && self.sock_dport == 12
            && self.sock_num == 14
            && self.sock_family == 16
            && self.sock_net == 48
            && self.sock_v6_daddr == 56
            && self.sock_v6_rcv_saddr == 72
    }
}

/// The first 88 bytes of `struct sock_common` as [`KernelOffsets::head_matches`] checks them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockCommonHead {
    pub daddr: [u8; 4],
    pub rcv_saddr: [u8; 4],
    pub hash: u32,
    /// Network order.
    pub dport: u16,
    /// Host order.
    pub num: u16,
    pub family: u16,
    pub state: u8,
    pub flags: u8,
    pub bound_dev_if: i32,
    pub bind_node: [u64; 2],
    pub prot: u64,
    /// `struct net *`.
    pub net: u64,
    pub v6_daddr: [u8; 16],
    pub v6_rcv_saddr: [u8; 16],
}

/// Offset of [`EventHeader::ts_ns`] in every record.
pub const TS_OFFSET: usize = 16;

/// A record type: `#[repr(C)]` with an [`EventHeader`] as its first field, a multiple of 8 bytes
/// and no padding the compiler adds (padding is an explicit field; the size assertions below pin
/// it).
///
/// # Safety
/// Implement only for such types: the kernel side writes the time through a header pointer to
/// the record, and copies it into its ring a u64 at a time.
pub unsafe trait Record {}

// SAFETY: each is #[repr(C)] and starts with `hdr: EventHeader`.
unsafe impl Record for StateEvent {}
unsafe impl Record for PortEvent {}
unsafe impl Record for SyscallEvent {}

const _: () = assert!(size_of::<EventHeader>() == 40);
const _: () = assert!(core::mem::offset_of!(EventHeader, ts_ns) == TS_OFFSET);
const _: () = assert!(size_of::<SockCommonHead>() == 88);
const _: () = assert!(size_of::<StateEvent>() == 104);
const _: () = assert!(size_of::<PortEvent>() == 64);
const _: () = assert!(size_of::<SyscallEvent>() == 96);
const _: () = assert!(size_of::<FailureKey>() == 36);
const _: () = assert!(size_of::<FailureCount>() == 32);
const _: () = assert!(size_of::<KernelOffsets>() == 96);
const _: () = assert!(size_of::<Connecting>() == 56);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], made only of integers and byte arrays, with explicit
    // padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::FailureKey {}
    unsafe impl aya::Pod for super::FailureCount {}
    unsafe impl aya::Pod for super::Connecting {}
}
