//! `portx-agent top`: the live screen. Runs the tracer with its records kept off stdout, draws
//! each [`View`] it publishes (about once a second, see [`trace::VIEW_EVERY`]) with
//! [`crate::screen`], and quits on `q`, Esc or Ctrl-C — or when the tracer stops (SIGTERM, an
//! error). The terminal is restored in every case, and the log lines kept while the screen was
//! up are written to stderr afterwards.
use std::{
    future::Future,
    io::{self, IsTerminal as _},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _};
use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers},
    DefaultTerminal,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    log_sink::LOGS,
    screen::{self, Extras, LOG_LINES},
    trace::{self, Links, TraceOptions},
    view::View,
};

pub async fn run(opts: TraceOptions) -> anyhow::Result<()> {
    if !io::stdout().is_terminal() || !io::stdin().is_terminal() {
        bail!("top draws on a terminal and reads its keys; stdin or stdout is not one (for a pipe use `portx-agent trace`, or `trace --json`)");
    }
    let (view_tx, mut views) = watch::channel(Arc::new(View::default()));
    let (ready_tx, ready) = oneshot::channel();
    let tracer = trace::run(
        opts,
        Links {
            ready: Some(ready_tx),
            screen: Some(view_tx),
        },
    );
    let mut tracer = Box::pin(tracer);
    // Errors before the screen is up (no privilege, attach failure) print on a normal terminal.
    tokio::select! {
        r = &mut tracer => return r,
        r = ready => if r.is_err() {
            return tracer.await;
        },
    }

    LOGS.capture();
    let result = match ratatui::try_init() {
        Ok(mut terminal) => show(&mut terminal, tracer.as_mut(), &mut views).await,
        Err(e) => Err(anyhow!(e).context("setting up the terminal")),
    };
    let restored = ratatui::try_restore();
    // Dropping the tracer detaches every program; then the kept log lines, on a usable terminal.
    drop(tracer);
    if let Err(e) = LOGS.release(&mut io::stderr()) {
        tracing::warn!("writing the kept log lines: {e}");
    }
    restored.context("restoring the terminal")?;
    result
}

/// Draws until a quit key, or until the tracer stops (its result is returned).
async fn show(
    terminal: &mut DefaultTerminal,
    mut tracer: Pin<&mut impl Future<Output = anyhow::Result<()>>>,
    views: &mut watch::Receiver<Arc<View>>,
) -> anyhow::Result<()> {
    let (key_tx, mut keys) = mpsc::channel(16);
    std::thread::Builder::new()
        .name("portx-keys".into())
        .spawn(move || read_keys(key_tx))
        .context("starting the keyboard reader")?;
    let mut view = views.borrow_and_update().clone();
    loop {
        let log = LOGS.tail(LOG_LINES);
        terminal
            .draw(|f| screen::draw(f, &view, &Extras { log: &log }))
            .context("drawing the screen")?;
        tokio::select! {
            r = tracer.as_mut() => return r,
            changed = views.changed() => match changed {
                Ok(()) => view = views.borrow_and_update().clone(),
                // The tracer dropped its end: it is stopping.
                Err(_) => return tracer.await,
            },
            key = keys.recv() => match key {
                Some(Ok(ev)) if quits(&ev) => return Ok(()),
                // Anything else (a resize, another key) just redraws.
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(anyhow!(e).context("reading the keyboard")),
                None => bail!("the keyboard reader stopped"),
            },
        }
    }
}

/// q, Q, Esc, or Ctrl-C (raw mode turns Ctrl-C into a key, not SIGINT).
fn quits(ev: &Event) -> bool {
    let Event::Key(KeyEvent {
        code,
        modifiers,
        kind,
        ..
    }) = ev
    else {
        return false;
    };
    *kind == KeyEventKind::Press
        && match code {
            KeyCode::Char('q' | 'Q') | KeyCode::Esc => true,
            KeyCode::Char('c') => modifiers.contains(KeyModifiers::CONTROL),
            _ => false,
        }
}

/// Blocking crossterm reads on their own thread; ends when the screen is gone (its receiver
/// dropped) or on the first error, which it hands over.
fn read_keys(tx: mpsc::Sender<io::Result<Event>>) {
    loop {
        let ready = match event::poll(Duration::from_millis(200)) {
            Ok(ready) => ready,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        if !ready {
            if tx.is_closed() {
                return;
            }
            continue;
        }
        let ev = event::read();
        let failed = ev.is_err();
        if tx.blocking_send(ev).is_err() || failed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: KeyCode, modifiers: KeyModifiers) -> Event {
        Event::Key(KeyEvent::new(code, modifiers))
    }

    #[test]
    fn q_esc_and_ctrl_c_quit_other_keys_do_not() {
        assert!(quits(&key(KeyCode::Char('q'), KeyModifiers::NONE)));
        assert!(quits(&key(KeyCode::Char('Q'), KeyModifiers::SHIFT)));
        assert!(quits(&key(KeyCode::Esc, KeyModifiers::NONE)));
        assert!(quits(&key(KeyCode::Char('c'), KeyModifiers::CONTROL)));
        assert!(!quits(&key(KeyCode::Char('c'), KeyModifiers::NONE)));
        assert!(!quits(&key(KeyCode::Char('x'), KeyModifiers::NONE)));
        assert!(!quits(&Event::Resize(80, 24)));
        let mut release = KeyEvent::new(KeyCode::Char('q'), KeyModifiers::NONE);
        release.kind = KeyEventKind::Release;
        assert!(!quits(&Event::Key(release)));
    }
}
