//! The supervisor: one task that owns the child's state and consumes every event from one channel.
//!
//! Theory of operation: signal handlers are installed before the child starts, so nothing is lost.
//! Each event is handled in turn: SIGCHLD reaps every exited process (the child, or an orphan the
//! kernel handed to us); any other signal is forwarded to the child. When the child has exited, the
//! processes it left behind get SIGTERM, then SIGKILL after the kill timeout, and are all reaped;
//! the launcher then exits with the child's status.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::mpsc::{self, UnboundedReceiver};

use crate::launch::Launch;
use crate::process::{self, Exit, InitMode};
use crate::signals;

/// Everything the supervisor reacts to.
#[derive(Debug)]
pub enum Event {
    Signal(i32),
}

/// How long to wait for SIGKILLed processes to be reaped before giving up on them (a process in
/// uninterruptible sleep can outlive SIGKILL; the launcher must still exit).
const REAP_AFTER_KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `launch` to completion and returns the status the launcher exits with.
pub async fn run(launch: Launch, kill_timeout: Duration) -> i32 {
    let mode = match process::become_init() {
        Ok(mode) => mode,
        Err(e) => {
            tracing::warn!("cannot become a child subreaper ({e}): orphans will not be reaped by sesame");
            InitMode::Subreaper
        }
    };
    tracing::debug!("running as {}", if mode == InitMode::Pid1 { "PID 1" } else { "a child subreaper" });
    process::ignore_tty_stop_signals();

    let (events_tx, mut events) = mpsc::unbounded_channel();
    if let Err(e) = signals::pump_into(events_tx) {
        tracing::error!("cannot install signal handlers: {e}");
        return 1;
    }
    // A plain command gets the terminal as under tini; Envoy does not, so that Ctrl-C reaches the launcher.
    let pid = match process::spawn(&launch.argv, !launch.is_envoy) {
        Ok(pid) => pid,
        Err(e) => {
            tracing::error!("{e}");
            return e.status_code();
        }
    };
    let started = Instant::now();
    tracing::info!(pid = pid.as_raw(), "started {}", shell_words(&launch));

    let exit = supervise(pid, &mut events).await;
    tracing::info!(pid = pid.as_raw(), "child exited with {exit} after {:.1?}", started.elapsed());
    stop_leftovers(mode, pid, kill_timeout, &mut events).await;
    exit.status_code()
}

/// Forwards signals and reaps until the child exits.
async fn supervise(child: Pid, events: &mut UnboundedReceiver<Event>) -> Exit {
    // Children inherited across exec, or a child that exited before its SIGCHLD handler ran, are
    // found by reaping once up front.
    if let Some(exit) = reap(child) {
        return exit;
    }
    while let Some(event) = events.recv().await {
        match event {
            Event::Signal(libc::SIGCHLD) => {
                if let Some(exit) = reap(child) {
                    return exit;
                }
            }
            Event::Signal(sig) => {
                tracing::debug!("forwarding signal {sig} to {child}");
                if let Err(e) = process::send(child, sig) {
                    tracing::warn!("cannot forward signal {sig} to {child}: {e}");
                }
            }
        }
    }
    unreachable_channel_closed()
}

/// Reaps everything that exited; returns the child's exit if it was among them.
fn reap(child: Pid) -> Option<Exit> {
    let mut child_exit = None;
    for (pid, exit) in process::reap_all().exits {
        if pid == child {
            child_exit = Some(exit);
        } else {
            tracing::debug!(pid = pid.as_raw(), "reaped an adopted orphan ({exit})");
        }
    }
    child_exit
}

/// SIGTERM to every process left behind, SIGKILL after `kill_timeout`, and reap them all: the
/// launcher leaves nothing for the kernel to clean up. A SIGTERM or SIGINT meanwhile skips the wait.
async fn stop_leftovers(mode: InitMode, child: Pid, kill_timeout: Duration, events: &mut UnboundedReceiver<Event>) {
    if reap_until_none(child) {
        return;
    }
    tracing::info!("sending SIGTERM to the processes left behind; SIGKILL in {kill_timeout:?}");
    process::signal_descendants(mode, Signal::SIGTERM, Some(child));
    let deadline = tokio::time::sleep(kill_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => {
                tracing::warn!("processes still running after {kill_timeout:?}: sending SIGKILL");
                break;
            }
            event = events.recv() => match event {
                Some(Event::Signal(libc::SIGCHLD)) => if reap_until_none(child) { return },
                Some(Event::Signal(sig @ (libc::SIGTERM | libc::SIGINT))) => {
                    tracing::warn!("signal {sig} while waiting for the processes left behind: sending SIGKILL");
                    break;
                }
                Some(Event::Signal(_)) => {}
                None => break,
            }
        }
    }
    // Repeat SIGKILL on every wake-up: a process may have forked between the scan and the kill.
    let give_up = tokio::time::sleep(REAP_AFTER_KILL_TIMEOUT);
    tokio::pin!(give_up);
    loop {
        process::signal_descendants(mode, Signal::SIGKILL, Some(child));
        tokio::select! {
            _ = &mut give_up => {
                tracing::error!("processes left behind survived SIGKILL for {REAP_AFTER_KILL_TIMEOUT:?}; exiting anyway");
                return;
            }
            _ = events.recv() => {}
        }
        if reap_until_none(child) {
            return;
        }
    }
}

/// Reaps what has exited; true when no child is left.
fn reap_until_none(child: Pid) -> bool {
    let reaped = process::reap_all();
    for (pid, exit) in &reaped.exits {
        tracing::debug!(
            pid = pid.as_raw(),
            "reaped {} ({exit})",
            if *pid == child { "the child" } else { "an adopted orphan" }
        );
    }
    reaped.no_children
}

fn shell_words(launch: &Launch) -> String {
    launch.argv.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

fn unreachable_channel_closed() -> Exit {
    // The signal pump holds the sender for the life of the runtime; it only ends if the runtime does.
    tracing::error!("event channel closed while the child was running");
    Exit::Code(1)
}
