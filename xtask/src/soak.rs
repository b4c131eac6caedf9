//! `cargo xtask soak`: the release agent traces a private network namespace under a steady
//! TIME_WAIT churn (`workload storm --close close`, `tcp_tw_reuse=1`) for `--seconds`, and its
//! resident memory is sampled every 5 s. TIME_WAIT lasts 60 s, so after `--warmup` the table has
//! its steady size; from then on memory must stay flat: the peak of the last 20 s may exceed the
//! peak of the first 20 s after warm-up by at most 10 % + 4 MiB. It also fails if the agent dies
//! or reports undecodable records. `cargo xtask test` runs a 2-minute soak; the default is 10.
use std::{
    fs,
    io::Read as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::Args;
use serde_json::{json, Value};

use crate::host::{dies_with_parent, release_agent, vm_rss_kib, wait_for_file, Netns, Proc};

#[derive(Args)]
pub struct SoakArgs {
    /// How long the churn runs.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(60..=86_400))]
    pub seconds: u64,
    /// Seconds before memory must be flat: TIME_WAIT entries accumulate for their 60 s, so at
    /// least 65.
    #[arg(long, default_value_t = 75, value_parser = clap::value_parser!(u64).range(65..=3600))]
    pub warmup: u64,
    /// Churning threads (each has its own listener).
    #[arg(long, default_value_t = 1)]
    pub threads: u16,
}

const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// The window at each end of the measured part whose peaks are compared.
const WINDOW_SECS: u64 = 20;

pub fn run(args: &SoakArgs) -> anyhow::Result<()> {
    if args.seconds < args.warmup + 2 * WINDOW_SECS {
        bail!(
            "--seconds ({}) must be at least --warmup ({}) + {} so that memory can be compared",
            args.seconds,
            args.warmup,
            2 * WINDOW_SECS
        );
    }
    let (bin, dir) = release_agent("soak")?;
    // The storm's 8 destinations a thread keep up to 8 x 14,116 4-tuples in TIME_WAIT each (the
    // bench's `close` storm): with more than one thread, past the kernel's default of 131,072
    // timewait sockets, closes would skip TIME_WAIT and the table would not fill.
    let ns = Netns::new(
        &bin,
        &[
            "net.ipv4.ip_local_port_range=32768 60999",
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.tcp_max_tw_buckets=262144",
        ],
    )?;
    let out = dir.join("agent.jsonl");
    let err = dir.join("agent.err");
    let mut agent = Proc(
        dies_with_parent(&mut Command::new(&bin))
            .args(["trace", "--json", "--interval", "5"])
            .args(["--netns", &ns.id.to_string()])
            .stdout(fs::File::create(&out)?)
            .stderr(fs::File::create(&err)?)
            .spawn()
            .context("starting the agent")?,
    );
    wait_for_file(&out, "\"started\"", 60)
        .with_context(|| fs::read_to_string(&err).unwrap_or_default())?;
    let mut storm = Proc(
        Command::new(&bin)
            .args(["workload", "--netns", &ns.path(), "storm"])
            .args(["--threads", &args.threads.to_string()])
            .args(["--seconds", &args.seconds.to_string(), "--close", "close"])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the churn")?,
    );
    let mut storm_out = storm.0.stdout.take();

    let start = Instant::now();
    let mut samples: Vec<(u64, u64)> = Vec::new();
    loop {
        std::thread::sleep(SAMPLE_EVERY);
        if let Ok(Some(status)) = agent.0.try_wait() {
            bail!(
                "the agent exited during the soak ({status}): {}",
                fs::read_to_string(&err).unwrap_or_default()
            );
        }
        let t = start.elapsed().as_secs();
        let rss = vm_rss_kib(agent.pid());
        samples.push((t, rss));
        eprintln!("soak: {t:>5} s  agent RSS {:>7.1} MiB", rss as f64 / 1024.0);
        if let Ok(Some(_)) = storm.0.try_wait() {
            break;
        }
    }
    let mut said = String::new();
    if let Some(o) = storm_out.as_mut() {
        o.read_to_string(&mut said)?;
    }
    agent.interrupt();
    let last = fs::read_to_string(&out)?
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["type"] == "summary")
        .unwrap_or(Value::Null);

    let peak = |from: u64, to: u64| {
        samples
            .iter()
            .filter(|(t, _)| (from..to).contains(t))
            .map(|(_, k)| *k)
            .max()
            .unwrap_or(0)
    };
    let end = samples.last().map_or(0, |(t, _)| *t);
    let early = peak(args.warmup, args.warmup + WINDOW_SECS);
    let late = peak(end.saturating_sub(WINDOW_SECS), end + 1);
    let allowed = early + early / 10 + 4096;
    let report = json!({
        "seconds": end, "warmup": args.warmup, "churn": said.trim(),
        "rss_kib_after_warmup": early, "rss_kib_at_end": late, "allowed_kib": allowed,
        "samples": samples, "last_summary": last,
    });
    fs::write(
        dir.join("last.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!(
        "soak: {end} s, {}; agent RSS {:.1} MiB after warm-up, {:.1} MiB at the end (allowed {:.1}); tracked {}, lost {}, missed {}, evicted {}",
        said.trim(),
        early as f64 / 1024.0,
        late as f64 / 1024.0,
        allowed as f64 / 1024.0,
        last["tracked"],
        last["lost"],
        last["missed"],
        last["evicted"]
    );
    if early == 0 || late == 0 {
        bail!("no memory samples in the compared windows");
    }
    if late > allowed {
        bail!("the agent's memory kept growing: {early} KiB after warm-up, {late} KiB at the end");
    }
    if last["decode_errors"].as_u64() != Some(0) {
        bail!("undecodable records or no final summary: {last}");
    }
    Ok(())
}
