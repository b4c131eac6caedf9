use std::{
    io::{IsTerminal as _, Write as _},
    process::ExitCode,
    time::Duration,
};

use clap::Parser as _;
use portx_agent::{
    cli::{Cli, Command},
    log_sink::LOGS,
    log_writer::{self, LogQueue},
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse().validate();
    let default = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    // A log line that cannot be written (stderr closed, e.g. `2>&1 | head`) is lost, not a
    // panic: tracing-subscriber would otherwise report it with eprintln!, which panics there.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
        )
        .log_internal_errors(false);
    let mut queue = None;
    if matches!(cli.command, Command::Top(_)) {
        // The screen owns the terminal: lines are kept and shown there, written out after.
        logs.with_writer(|| LOGS.writer()).with_ansi(false).init();
    } else {
        // From a thread of its own: a stderr nobody reads must not stop the event loop.
        match LogQueue::start(std::io::stderr(), log_writer::QUEUE) {
            Ok(q) => {
                queue = Some(q.clone());
                logs.with_writer(move || q.clone())
                    .with_ansi(std::io::stderr().is_terminal())
                    .init();
            }
            Err(_) => logs
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .init(),
        }
    }
    let result = match cli.command {
        Command::Trace(args) => runtime().and_then(|rt| {
            rt.block_on(portx_agent::trace::run(args.options(), Default::default()))
        }),
        Command::Top(args) => {
            runtime().and_then(|rt| rt.block_on(portx_agent::top::run(args.options())))
        }
        Command::Snapshot(args) => portx_agent::snapshot::run(&args.options()),
        Command::Doctor(args) => {
            portx_agent::doctor::run(args.json, usize::from(args.top), &args.netns)
        }
        Command::Demo(args) => runtime().and_then(|rt| rt.block_on(portx_agent::demo::run(&args))),
        Command::Workload(args) => portx_agent::workload::run(args),
        Command::Man => portx_agent::manpage::write_man(&mut std::io::stdout().lock())
            .map_err(|e| anyhow::anyhow!("writing the man page: {e}")),
        Command::Completions { shell } => {
            portx_agent::manpage::write_completions(shell, &mut std::io::stdout().lock())
                .map_err(|e| anyhow::anyhow!("writing completions: {e}"))
        }
    };
    // Queued log lines go out first, unless stderr stays stuck.
    if let Some(q) = queue {
        q.finish(Duration::from_secs(2));
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not eprintln!: it panics on a closed stderr, and the exit status says it anyway.
            let _ = writeln!(std::io::stderr(), "portx-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
