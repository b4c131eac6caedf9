//! Loads the embedded eBPF object, sets its globals, and attaches the programs for one hook mode.
//!
//! Hook modes differ in how the port allocation (`inet_hash_connect`) is observed: fexit
//! (cheapest, needs BTF trampolines), else kprobe/kretprobe (needs CONFIG_KPROBES), else
//! tracepoints alone (the port is read from the socket when connect() returns). `auto` tries them
//! in that order, each on a fresh load of the object, so a failed mode leaves nothing attached
//! (dropping the `Ebpf` detaches every link it made). The state change is attached in every
//! mode; connect()'s and bind()'s exits by fexit in fentry mode, else by the syscall tracepoints.
use std::fmt;

use anyhow::{anyhow, bail, Context as _};
use aya::{
    maps::HashMap,
    programs::{BtfTracePoint, FExit, KProbe, RawTracePoint, TracePoint},
    Btf, Ebpf, EbpfLoader,
};
use portx_common::{hook_mode, names, KernelOffsets, MAX_RINGS, NETNS_FILTER_INLINE};

use crate::btf::Prototype;

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

/// `--state-hook`: how the state-change program attaches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum StateHookChoice {
    /// `tp_btf` where the kernel has BTF and takes it, else a raw tracepoint.
    #[default]
    Auto,
    /// `tp_btf` only: fields read with checked loads, no helper call each.
    TpBtf,
    /// Raw tracepoint only: fields read with `bpf_probe_read_kernel`.
    RawTracepoint,
}

impl StateHookChoice {
    fn tp_btf(self) -> bool {
        self != StateHookChoice::RawTracepoint
    }

    fn raw(self) -> bool {
        self != StateHookChoice::TpBtf
    }
}

pub struct Loaded {
    pub ebpf: Ebpf,
    pub mode: HookMode,
    /// `kind:target` of every attached program.
    pub attached: Vec<String>,
    /// Reader of the kernel programs' rare aya-log messages (to stderr via `tracing`).
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// The rings the CPUs write to: `names::EVENTS[..rings.count]`.
    pub rings: RingLayout,
}

/// How many ring buffers the CPUs write to, and the size of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    pub count: usize,
    pub bytes: u32,
}

impl RingLayout {
    /// One ring per CPU up to `MAX_RINGS`. Each is `ring_bytes` if given, else 8 MiB shared out
    /// (a power of two between 1 and 4 MiB each).
    pub fn for_cpus(cpus: usize, ring_bytes: Option<u32>) -> Self {
        let count = cpus.clamp(1, MAX_RINGS);
        let bytes = ring_bytes.unwrap_or_else(|| {
            let share = TOTAL_RING_BYTES / count as u32;
            // Largest power of two not above the share.
            (1u32 << (31 - share.leading_zeros()))
                .clamp(MIN_DEFAULT_RING_BYTES, MAX_DEFAULT_RING_BYTES)
        });
        Self { count, bytes }
    }
}

pub struct LoadOptions {
    pub hooks: HookChoice,
    pub state_hook: StateHookChoice,
    pub offsets: KernelOffsets,
    /// Ring buffer size in bytes (a power of two, multiple of the page size).
    pub ring_bytes: Option<u32>,
    /// Only these network namespaces are written by the kernel side (all when empty; at most
    /// `MAX_NETNS_FILTER`).
    pub netns: Vec<u32>,
    /// A failing connect()'s key gets a record about once this often, the failures in between
    /// only counted (`portx_common::FAILURE_RECORD_GAP_NS`); 0: a record per failure.
    pub failure_record_gap_ns: u64,
    /// The prototypes of the syscall bodies fentry mode hooks, from the kernel's BTF.
    pub prototypes: Prototypes,
}

/// What the kernel's BTF says of each syscall body fentry mode hooks with fexit.
#[derive(Debug, Clone)]
pub struct Prototypes(Vec<(&'static str, Result<Option<Prototype>, String>)>);

impl Prototypes {
    pub fn of(btf: &crate::btf::Btf) -> Self {
        Prototypes(
            SYSCALL_EXITS
                .iter()
                .map(|e| {
                    (
                        e.function,
                        btf.prototype(e.function).map_err(|e| e.to_string()),
                    )
                })
                .collect(),
        )
    }

    /// Why fexit on `function` cannot read its result as argument 3, if it cannot.
    fn unsuitable(&self, function: &str) -> Option<String> {
        let found = self.0.iter().find(|(f, _)| *f == function).map(|(_, p)| p);
        match found {
            Some(Ok(Some(p))) if p.params == 3 && p.returns_int => None,
            Some(Ok(Some(p))) => Some(format!(
                "{function} takes {} parameters{} in this kernel's BTF; the program expects 3 and an int",
                p.params,
                if p.returns_int { "" } else { " and returns no int" }
            )),
            Some(Ok(None)) => Some(format!("{function} is not in this kernel's BTF")),
            Some(Err(e)) => Some(format!("reading {function}'s prototype from BTF: {e}")),
            None => Some(format!("{function}'s prototype was not looked up")),
        }
    }
}

/// Attached in every mode: TCP state changes, as `tp_btf` (program `STATE_BTF`) or as a raw
/// tracepoint (program `STATE_TP`).
const STATE_TP: &str = "inet_sock_set_state";
const STATE_BTF: &str = "inet_sock_set_state_btf";

/// A syscall whose exit portx needs: in fentry mode fexit on its body `function` (program
/// `fexit`), else the first of `tracepoints` that loads. connect() needs no entry program: the
/// state change into SYN_SENT notes what its exit needs.
struct SyscallExit {
    fexit: &'static str,
    function: &'static str,
    tracepoints: &'static [Tracepoints],
}

/// Tracepoint programs that do a syscall's work together: (program, category, event) each.
struct Tracepoints {
    programs: &'static [(&'static str, &'static str, &'static str)],
    /// Reads the call's arguments from the task's registers at exit: only where the agent found
    /// them in BTF (`KernelOffsets::regs_arg0`), and the kernel has `bpf_task_pt_regs` (5.15).
    needs_arg_regs: bool,
}

const SYSCALL_EXITS: [SyscallExit; 2] = [
    SyscallExit {
        fexit: "sys_connect_fexit",
        function: "__sys_connect",
        // A failed call's exit follows its fd to its socket (is it the one the thread's note
        // names?); where it cannot read the fd, the socket's state alone must tell.
        tracepoints: &[
            Tracepoints {
                programs: &[("sys_exit_connect", "syscalls", "sys_exit_connect")],
                needs_arg_regs: true,
            },
            Tracepoints {
                programs: &[("sys_exit_connect_no_fd", "syscalls", "sys_exit_connect")],
                needs_arg_regs: false,
            },
        ],
    },
    SyscallExit {
        fexit: "sys_bind_fexit",
        function: "__sys_bind",
        // A program at a syscall's entry puts every syscall of the machine through the
        // syscall-tracing path's entry too: only where the exit cannot read the arguments.
        tracepoints: &[
            Tracepoints {
                programs: &[("sys_exit_bind", "syscalls", "sys_exit_bind")],
                needs_arg_regs: true,
            },
            Tracepoints {
                programs: &[
                    ("sys_enter_bind", "syscalls", "sys_enter_bind"),
                    ("sys_exit_bind_stashed", "syscalls", "sys_exit_bind"),
                ],
                needs_arg_regs: false,
            },
        ],
    },
];

const HASH_CONNECT: &str = "inet_hash_connect";

/// What the rings' default sizes share out (see [`RingLayout::for_cpus`]).
const TOTAL_RING_BYTES: u32 = 8 << 20;
const MIN_DEFAULT_RING_BYTES: u32 = 1 << 20;
const MAX_DEFAULT_RING_BYTES: u32 = 4 << 20;

/// Loads and attaches the first hook mode of `opts.hooks` that works on this kernel.
pub fn load(opts: &LoadOptions) -> anyhow::Result<Loaded> {
    if opts.offsets.task_files == 0 {
        tracing::warn!(
            "this kernel's BTF lacks a step from a task's fds to their sockets: a failed connect() \
             is told from another socket's by that socket's state alone, and a failed bind() is \
             counted in the caller's namespace with no protocol"
        );
    }
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
    let cpus = aya::util::nr_cpus()
        .map_err(|(path, e)| anyhow!("reading the number of CPUs from {path}: {e}"))?;
    let rings = RingLayout::for_cpus(cpus, opts.ring_bytes);
    let ring_count = rings.count as u32;
    // A ring no CPU writes to gets the smallest size the kernel takes.
    let unused_ring_bytes = crate::ring::page_size()
        .ok()
        .and_then(|p| u32::try_from(p).ok())
        .context("reading the page size")?;
    // Wake the agent once an eighth of a ring is waiting (failures always wake it).
    let wakeup_bytes = rings.bytes / 8;
    // Checked against MAX_NETNS_FILTER by the CLI.
    let filter_netns = u32::try_from(opts.netns.len()).context("too many --netns")?;
    let mut filter_netns_inline = [0u32; NETNS_FILTER_INLINE];
    if opts.netns.len() <= NETNS_FILTER_INLINE {
        filter_netns_inline[..opts.netns.len()].copy_from_slice(&opts.netns);
    }
    let mut loader = EbpfLoader::new();
    loader
        .override_global(names::AGENT_TGID, &pid, true)
        .override_global(names::HOOK_MODE, &raw_mode, true)
        .override_global(names::OFFSETS, &opts.offsets, true)
        .override_global(names::WAKEUP_BYTES, &wakeup_bytes, true)
        .override_global(names::RING_COUNT, &ring_count, true)
        .override_global(names::FILTER_NETNS, &filter_netns, true)
        .override_global(names::FILTER_NETNS_INLINE, &filter_netns_inline, true)
        .override_global(
            names::FAILURE_RECORD_GAP_NS,
            &opts.failure_record_gap_ns,
            true,
        );
    for (i, name) in names::EVENTS.iter().enumerate() {
        let bytes = if i < rings.count {
            rings.bytes
        } else {
            unused_ring_bytes
        };
        loader.map_max_entries(name, bytes);
    }
    let mut ebpf = loader.load(OBJECT).context("loading the eBPF object")?;
    if opts.netns.len() > NETNS_FILTER_INLINE {
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
    let btf = Btf::from_sys_fs();
    // The mode-specific hook first: it is the one most likely to be refused.
    match mode {
        HookMode::Fentry => {
            let btf = btf
                .as_ref()
                .map_err(|e| anyhow!("reading kernel BTF: {e}"))?;
            let prog: &mut FExit = program(&mut ebpf, "inet_hash_connect_fexit")?;
            prog.load(HASH_CONNECT, btf)
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
    attached.push(attach_state(
        &mut ebpf,
        btf.as_ref().map_err(ToString::to_string),
        opts.state_hook,
    )?);
    for exit in &SYSCALL_EXITS {
        if mode == HookMode::Fentry {
            // (BTF was read for this mode's first program.)
            let btf = btf
                .as_ref()
                .map_err(|e| anyhow!("reading kernel BTF: {e}"))?;
            match attach_syscall_fexit(&mut ebpf, btf, &opts.prototypes, exit) {
                Ok(()) => {
                    attached.push(format!("fexit:{}", exit.function));
                    continue;
                }
                Err(e) => tracing::warn!(
                    "fexit/{} unavailable, using the syscall's tracepoints instead: {e:#}",
                    exit.function
                ),
            }
        }
        attached.extend(attach_syscall_tracepoints(
            &mut ebpf,
            exit,
            opts.offsets.regs_arg0 != 0 && opts.offsets.regs_arg1 != 0,
        )?);
    }
    tracing::info!("attached {mode} hooks: {}", attached.join(", "));
    tracing::info!(
        "{} ring buffer(s) of {} KiB, CPU n writing to ring n % {}",
        rings.count,
        rings.bytes / 1024,
        rings.count
    );
    Ok(Loaded {
        ebpf,
        mode,
        attached,
        logger,
        rings,
    })
}

/// fexit on a syscall's body, instead of its tracepoints: a direct call from a trampoline
/// instead of the perf tracepoint machinery on each call (and no syscall tracepoint enabled puts
/// no task's syscalls on the kernel's slow path). The program reads the return value as the
/// argument after the three the body takes, so the prototype is checked first.
fn attach_syscall_fexit(
    ebpf: &mut Ebpf,
    btf: &Btf,
    prototypes: &Prototypes,
    exit: &SyscallExit,
) -> anyhow::Result<()> {
    let function = exit.function;
    if let Some(why) = prototypes.unsuitable(function) {
        bail!(why);
    }
    let prog: &mut FExit = program(ebpf, exit.fexit)?;
    prog.load(function, btf)
        .with_context(|| format!("loading fexit/{function}"))?;
    prog.attach()
        .with_context(|| format!("attaching fexit/{function}"))?;
    Ok(())
}

/// The first of `exit.tracepoints` whose programs all load, attached; returns them as
/// `kind:target`. A set is left for the next one only when a program fails to load (before any
/// of the set is attached).
fn attach_syscall_tracepoints(
    ebpf: &mut Ebpf,
    exit: &SyscallExit,
    arg_regs_known: bool,
) -> anyhow::Result<Vec<String>> {
    let mut refused = Vec::new();
    for set in exit.tracepoints {
        if set.needs_arg_regs && !arg_regs_known {
            refused.push(format!(
                "{}: the syscall's arguments are not found in this kernel's struct pt_regs",
                set.programs[0].0
            ));
            continue;
        }
        let loaded = set
            .programs
            .iter()
            .try_for_each(|&(name, category, event)| {
                let prog: &mut TracePoint = program(ebpf, name)?;
                prog.load()
                    .with_context(|| format!("loading {name} on tracepoint {category}:{event}"))
            });
        if let Err(e) = loaded {
            refused.push(format!("{e:#}"));
            continue;
        }
        if !refused.is_empty() {
            tracing::info!(
                "{}: {}; using {} instead",
                exit.function,
                refused.join("; "),
                set.programs
                    .iter()
                    .map(|p| p.0)
                    .collect::<Vec<_>>()
                    .join(" and ")
            );
        }
        let mut attached = Vec::new();
        for &(name, category, event) in set.programs {
            let prog: &mut TracePoint = program(ebpf, name)?;
            prog.attach(category, event)
                .with_context(|| format!("attaching tracepoint {category}:{event}"))?;
            attached.push(format!("tracepoint:{category}:{event}"));
        }
        return Ok(attached);
    }
    bail!(
        "no tracepoint programs for {} loaded: {}",
        exit.function,
        refused.join("; ")
    )
}

/// The state-change program, as `tp_btf` if `choice` allows and the kernel takes it, else as a
/// raw tracepoint; returns what got attached as `kind:target`.
fn attach_state(
    ebpf: &mut Ebpf,
    btf: Result<&Btf, String>,
    choice: StateHookChoice,
) -> anyhow::Result<String> {
    let mut why = None;
    if choice.tp_btf() {
        let tried = (|| -> anyhow::Result<()> {
            let btf = btf.map_err(|e| anyhow!("reading kernel BTF: {e}"))?;
            let prog: &mut BtfTracePoint = program(ebpf, STATE_BTF)?;
            prog.load(STATE_TP, btf)
                .with_context(|| format!("loading tp_btf/{STATE_TP}"))?;
            prog.attach()
                .with_context(|| format!("attaching tp_btf/{STATE_TP}"))?;
            Ok(())
        })();
        match tried {
            Ok(()) => return Ok(format!("tp_btf:{STATE_TP}")),
            Err(e) if choice.raw() => {
                tracing::info!("tp_btf unavailable for {STATE_TP}, using a raw tracepoint: {e:#}");
                why = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    let prog: &mut RawTracePoint = program(ebpf, STATE_TP)?;
    prog.load()
        .with_context(|| format!("loading raw tracepoint {STATE_TP}"))
        .map_err(|e| match why {
            Some(w) => e.context(format!("(after tp_btf failed: {w:#})")),
            None => e,
        })?;
    prog.attach(STATE_TP)
        .with_context(|| format!("attaching raw tracepoint {STATE_TP}"))?;
    Ok(format!("raw_tracepoint:{STATE_TP}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_per_cpu_up_to_eight_sharing_8_mib_by_default() {
        let layout = |cpus, bytes| {
            let l = RingLayout::for_cpus(cpus, bytes);
            (l.count, l.bytes >> 10)
        };
        assert_eq!(layout(1, None), (1, 4096));
        assert_eq!(layout(2, None), (2, 4096));
        // 8 MiB / 3 rounds down to a power of two.
        assert_eq!(layout(3, None), (3, 2048));
        assert_eq!(layout(8, None), (8, 1024));
        assert_eq!(layout(64, None), (MAX_RINGS, 1024));
        // --ring-buffer-kib sizes each ring.
        assert_eq!(layout(4, Some(4096)), (4, 4));
        assert_eq!(layout(0, Some(1 << 16)), (1, 64));
    }

    #[test]
    fn fexit_on_a_syscall_body_needs_three_parameters_and_an_int() {
        let proto = |params, returns_int| {
            Ok(Some(Prototype {
                params,
                returns_int,
            }))
        };
        let p = Prototypes(vec![
            ("__sys_connect", proto(3, true)),
            ("__sys_bind", proto(4, true)),
            ("a", proto(3, false)),
            ("b", Ok(None)),
            ("c", Err("malformed BTF: x".into())),
        ]);
        assert_eq!(p.unsuitable("__sys_connect"), None);
        // A fourth parameter would be read as the result.
        let why = p.unsuitable("__sys_bind").expect("unsuitable");
        assert!(why.contains("takes 4 parameters"), "{why}");
        let why = p.unsuitable("a").expect("unsuitable");
        assert!(why.contains("returns no int"), "{why}");
        let why = p.unsuitable("b").expect("unsuitable");
        assert!(why.contains("not in this kernel's BTF"), "{why}");
        let why = p.unsuitable("c").expect("unsuitable");
        assert!(why.contains("malformed BTF: x"), "{why}");
        assert!(p.unsuitable("never looked up").is_some());
    }

    #[test]
    fn this_kernels_syscall_bodies_take_fexit() {
        let Ok(btf) = crate::btf::Btf::from_sys_fs() else {
            eprintln!("skipped: no kernel BTF");
            return;
        };
        let p = Prototypes::of(&btf);
        for exit in &SYSCALL_EXITS {
            assert_eq!(p.unsuitable(exit.function), None, "{p:?}");
        }
    }
}
