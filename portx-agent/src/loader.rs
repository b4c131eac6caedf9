//! Loads the embedded eBPF object, sets its globals, and attaches the programs for one hook mode.
//!
//! Hook modes differ only in how the port allocation (`inet_hash_connect`) is observed:
//! fexit (cheapest, needs BTF trampolines), else kprobe/kretprobe (needs CONFIG_KPROBES), else
//! tracepoints alone (the port is read from the socket when connect() returns). `auto` tries them
//! in that order, each on a fresh load of the object, so a failed mode leaves nothing attached
//! (dropping the `Ebpf` detaches every link it made). The state and syscall tracepoints are
//! attached in every mode.
use std::fmt;

use anyhow::{anyhow, Context as _};
use aya::{
    maps::HashMap,
    programs::{FExit, KProbe, RawTracePoint, TracePoint},
    Btf, Ebpf, EbpfLoader,
};
use portx_common::{hook_mode, names, KernelOffsets};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portx-ebpf"));

/// `--hooks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HookChoice {
    /// fentry/fexit, else kprobe/kretprobe, else tracepoints.
    Auto,
    Fentry,
    Kprobe,
    Tracepoint,
}

/// The mode that got attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookMode {
    Fentry,
    Kprobe,
    Tracepoint,
}

impl HookMode {
    fn raw(self) -> u32 {
        match self {
            HookMode::Fentry => hook_mode::FENTRY,
            HookMode::Kprobe => hook_mode::KPROBE,
            HookMode::Tracepoint => hook_mode::TRACEPOINT,
        }
    }
}

impl fmt::Display for HookMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HookMode::Fentry => "fentry",
            HookMode::Kprobe => "kprobe",
            HookMode::Tracepoint => "tracepoint",
        })
    }
}

impl HookChoice {
    fn candidates(self) -> &'static [HookMode] {
        match self {
            HookChoice::Auto => &[HookMode::Fentry, HookMode::Kprobe, HookMode::Tracepoint],
            HookChoice::Fentry => &[HookMode::Fentry],
            HookChoice::Kprobe => &[HookMode::Kprobe],
            HookChoice::Tracepoint => &[HookMode::Tracepoint],
        }
    }
}

pub struct Loaded {
    pub ebpf: Ebpf,
    pub mode: HookMode,
    /// `kind:target` of every attached program.
    pub attached: Vec<String>,
    /// Reader of the kernel programs' rare aya-log messages (to stderr via `tracing`).
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

pub struct LoadOptions {
    pub hooks: HookChoice,
    pub offsets: KernelOffsets,
    /// Ring buffer size in bytes (a power of two, multiple of the page size).
    pub ring_bytes: Option<u32>,
    /// Only these network namespaces are written by the kernel side (all when empty; at most
    /// `MAX_NETNS_FILTER`).
    pub netns: Vec<u32>,
}

/// Raw tracepoint attached in every mode: TCP state changes.
const STATE_TP: &str = "inet_sock_set_state";

/// Tracepoints attached in every mode: (program, category, event). connect() needs no entry
/// program: the state change into SYN_SENT notes what its exit needs.
const TRACEPOINTS: [(&str, &str, &str); 3] = [
    ("sys_exit_connect", "syscalls", "sys_exit_connect"),
    ("sys_enter_bind", "syscalls", "sys_enter_bind"),
    ("sys_exit_bind", "syscalls", "sys_exit_bind"),
];

const HASH_CONNECT: &str = "inet_hash_connect";

/// Size of `EVENTS` in the eBPF object (4 MiB) unless `--ring-buffer-kib` overrides it.
const DEFAULT_RING_BYTES: u32 = 1 << 22;

/// Loads and attaches the first hook mode of `opts.hooks` that works on this kernel.
pub fn load(opts: &LoadOptions) -> anyhow::Result<Loaded> {
    let mut failures = Vec::new();
    for &mode in opts.hooks.candidates() {
        match load_mode(mode, opts) {
            Ok(loaded) => return Ok(loaded),
            Err(e) => {
                if opts.hooks == HookChoice::Auto {
                    tracing::info!("{mode} hooks unavailable on this kernel: {e:#}");
                }
                failures.push(format!("{mode}: {e:#}"));
            }
        }
    }
    Err(anyhow!(
        "no hook mode could be attached ({})",
        failures.join("; ")
    ))
}

fn load_mode(mode: HookMode, opts: &LoadOptions) -> anyhow::Result<Loaded> {
    let pid = std::process::id();
    let raw_mode = mode.raw();
    // Wake the agent once an eighth of the ring buffer is waiting (failures always wake it).
    let wakeup_bytes = opts.ring_bytes.unwrap_or(DEFAULT_RING_BYTES) / 8;
    let filter_netns = u32::from(!opts.netns.is_empty());
    let mut loader = EbpfLoader::new();
    loader
        .override_global(names::AGENT_TGID, &pid, true)
        .override_global(names::HOOK_MODE, &raw_mode, true)
        .override_global(names::OFFSETS, &opts.offsets, true)
        .override_global(names::WAKEUP_BYTES, &wakeup_bytes, true)
        .override_global(names::FILTER_NETNS, &filter_netns, true);
    if let Some(bytes) = opts.ring_bytes {
        loader.map_max_entries(names::EVENTS, bytes);
    }
    let mut ebpf = loader.load(OBJECT).context("loading the eBPF object")?;
    if !opts.netns.is_empty() {
        let mut filter: HashMap<_, u32, u8> = HashMap::try_from(
            ebpf.map_mut(names::NETNS_FILTER)
                .ok_or_else(|| anyhow!("map {} missing", names::NETNS_FILTER))?,
        )?;
        for ns in &opts.netns {
            filter
                .insert(ns, 1, 0)
                .with_context(|| format!("adding netns {ns} to the kernel-side filter"))?;
        }
    }
    // Before the programs load: they reference the log map.
    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!("kernel-side diagnostics unavailable: {e}");
            None
        }
    };
    let mut attached = Vec::new();
    // The mode-specific hook first: it is the one most likely to be refused.
    match mode {
        HookMode::Fentry => {
            let btf = Btf::from_sys_fs().context("reading kernel BTF")?;
            let prog: &mut FExit = program(&mut ebpf, "inet_hash_connect_fexit")?;
            prog.load(HASH_CONNECT, &btf)
                .with_context(|| format!("loading fexit/{HASH_CONNECT}"))?;
            prog.attach()
                .with_context(|| format!("attaching fexit/{HASH_CONNECT}"))?;
            attached.push(format!("fexit:{HASH_CONNECT}"));
        }
        HookMode::Kprobe => {
            for (name, kind) in [
                ("inet_hash_connect_entry", "kprobe"),
                ("inet_hash_connect_return", "kretprobe"),
            ] {
                let prog: &mut KProbe = program(&mut ebpf, name)?;
                prog.load()
                    .with_context(|| format!("loading {kind}/{HASH_CONNECT}"))?;
                prog.attach(HASH_CONNECT, 0)
                    .with_context(|| format!("attaching {kind}/{HASH_CONNECT}"))?;
                attached.push(format!("{kind}:{HASH_CONNECT}"));
            }
        }
        HookMode::Tracepoint => {}
    }
    let prog: &mut RawTracePoint = program(&mut ebpf, STATE_TP)?;
    prog.load()
        .with_context(|| format!("loading raw tracepoint {STATE_TP}"))?;
    prog.attach(STATE_TP)
        .with_context(|| format!("attaching raw tracepoint {STATE_TP}"))?;
    attached.push(format!("raw_tracepoint:{STATE_TP}"));
    for (name, category, event) in TRACEPOINTS {
        let prog: &mut TracePoint = program(&mut ebpf, name)?;
        prog.load()
            .with_context(|| format!("loading tracepoint {category}:{event}"))?;
        prog.attach(category, event)
            .with_context(|| format!("attaching tracepoint {category}:{event}"))?;
        attached.push(format!("tracepoint:{category}:{event}"));
    }
    tracing::info!("attached {mode} hooks: {}", attached.join(", "));
    Ok(Loaded {
        ebpf,
        mode,
        attached,
        logger,
    })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
    prog.try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}
