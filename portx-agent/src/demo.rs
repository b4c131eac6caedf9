//! `portx-agent demo`: the point of portx in ten seconds. A private network namespace with a
//! 16-port range and `tcp_tw_reuse=0`; a server; a hog holding 10 connections; a churner leaving
//! 6 ports in TIME_WAIT and exiting; then a victim whose connect() fails with EADDRNOTAVAIL —
//! traced live by the same tracer as `trace`, filtered to that namespace. Every process is a real
//! child (killed on drop, and on our death through PR_SET_PDEATHSIG), so nothing outlives it.
use std::{io::Write as _, process::Stdio, time::Duration};

use anyhow::{anyhow, bail, Context as _};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader, Lines},
    process::{Child, ChildStdout, Command},
    sync::oneshot,
};

use crate::{
    cli::DemoArgs,
    loader::HookChoice,
    trace::{self, TraceOptions},
};

const DEST: &str = "127.0.0.1:9000";

struct Proc {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Proc {
    async fn spawn(args: &[&str]) -> anyhow::Result<Proc> {
        let exe = std::env::current_exe().context("finding our own binary")?;
        let mut child = Command::new(exe)
            .arg("workload")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting workload {args:?}"))?;
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        Ok(Proc {
            child,
            lines: BufReader::new(out).lines(),
        })
    }

    /// The next line the workload prints (5 s at most).
    async fn line(&mut self) -> anyhow::Result<String> {
        match tokio::time::timeout(Duration::from_secs(5), self.lines.next_line()).await {
            Ok(Ok(Some(l))) => Ok(l),
            Ok(Ok(None)) => bail!("workload exited without saying anything"),
            Ok(Err(e)) => Err(e).context("reading a workload's output"),
            Err(_) => bail!("workload said nothing for 5 s"),
        }
    }
}

fn narrate(json: bool, what: &str) {
    if !json {
        // A closed stderr loses the narration, not the demo.
        let _ = writeln!(std::io::stderr(), "demo: {what}");
    }
}

async fn scenario(
    ns: String,
    json: bool,
    ready: oneshot::Receiver<()>,
) -> anyhow::Result<Vec<Proc>> {
    ready.await.context("tracer did not start")?;
    let mut keep = Vec::new();
    let netns = ["--netns", ns.as_str()];
    let mut server = Proc::spawn(&[&netns[..], &["serve", "--listen", DEST]].concat()).await?;
    server.line().await?;
    keep.push(server);
    narrate(
        json,
        "`hog` opens 10 connections to 127.0.0.1:9000 and keeps them",
    );
    let mut hog = Proc::spawn(
        &[
            &netns[..],
            &["--name", "hog", "hold", "--connect", DEST, "--count", "10"],
        ]
        .concat(),
    )
    .await?;
    hog.line().await?;
    keep.push(hog);
    narrate(
        json,
        "`churner` makes 6 short connections, closes first (TIME_WAIT) and exits",
    );
    let mut churner = Proc::spawn(
        &[
            &netns[..],
            &[
                "--name",
                "churner",
                "churn",
                "--connect",
                DEST,
                "--count",
                "6",
            ],
        ]
        .concat(),
    )
    .await?;
    churner.line().await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..2 {
        narrate(json, "`victim` tries one more connection to 127.0.0.1:9000");
        let mut victim = Proc::spawn(
            &[
                &netns[..],
                &["--name", "victim", "connect", "--connect", DEST],
            ]
            .concat(),
        )
        .await?;
        let said = victim.line().await?;
        narrate(json, &format!("victim says: {said}"));
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    Ok(keep)
}

pub async fn run(args: &DemoArgs) -> anyhow::Result<()> {
    crate::privilege::check()?;
    let mut park = Proc::spawn(&[
        "park",
        "--sysctl",
        "net.ipv4.ip_local_port_range=40000 40015",
        "--sysctl",
        "net.ipv4.tcp_tw_reuse=0",
        // An RST that reaches a TIME_WAIT socket ends it unless this is set, and loopback
        // under CPU load can send one (see tests/support's `Netns`): the churner's ports stay
        // in TIME_WAIT for their 60 s, and the victim fails as promised.
        "--sysctl",
        "net.ipv4.tcp_rfc1337=1",
    ])
    .await?;
    let line = park.line().await?;
    let id: u32 = line
        .strip_prefix("ready netns=")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("unexpected answer from the namespace holder: {line}"))?;
    let pid = park
        .child
        .id()
        .ok_or_else(|| anyhow!("namespace holder exited"))?;
    let ns = format!("/proc/{pid}/ns/net");
    narrate(
        args.json,
        &format!("private network namespace {id}: ports 40000-40015 (16), tcp_tw_reuse=0"),
    );
    let (tx, rx) = oneshot::channel();
    let opts = TraceOptions {
        json: args.json,
        hooks: HookChoice::Auto,
        netns: vec![id],
        interval: Duration::from_secs(2),
        top: 5,
        resync: Duration::from_secs(10),
        ring_bytes: None,
        duration: Some(args.seconds),
        seed: true,
        ..Default::default()
    };
    let (traced, workloads) = tokio::join!(
        trace::run(
            opts,
            trace::Links {
                ready: Some(tx),
                ..Default::default()
            },
        ),
        scenario(ns, args.json, rx)
    );
    traced?;
    let keep = workloads?;
    drop(keep);
    drop(park);
    narrate(args.json, "done; the namespace and every workload are gone");
    Ok(())
}
