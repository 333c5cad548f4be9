//! The supervisor: one task that owns the child's state and consumes every event from one channel.
//!
//! Theory of operation: signal handlers are installed before the child starts, so nothing is lost.
//! Each event is handled in turn: SIGCHLD reaps every exited process (the child, or an orphan the
//! kernel handed to us); SIGTERM and SIGINT to an Envoy start a graceful drain (a task that talks
//! to Envoy's admin and reports back here), after which Envoy gets SIGTERM and, after the kill
//! timeout, SIGKILL; any other signal is forwarded. When the child has exited, the processes it
//! left behind get SIGTERM, then SIGKILL, and are all reaped; the launcher then exits with the
//! child's status.

use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::drain::{self, DrainEnd, DrainSettings};
use crate::launch::Launch;
use crate::process::{self, Exit, InitMode};
use crate::signals;

/// Everything the supervisor reacts to.
#[derive(Debug)]
pub enum Event {
    Signal(i32),
    /// One poll of the drain: Envoy's open downstream connections, None when the admin failed.
    DrainPolled {
        connections: Option<u64>,
    },
    DrainEnded(DrainEnd),
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// Between SIGTERM and SIGKILL, for Envoy and for whatever the child leaves behind.
    pub kill_timeout: Duration,
    pub drain: DrainSettings,
}

/// How long to wait for SIGKILLed processes to be reaped before giving up on them (a process in
/// uninterruptible sleep can outlive SIGKILL; the launcher must still exit).
const REAP_AFTER_KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the child is in its life.
#[derive(Debug)]
enum Phase {
    Running,
    /// A stop was asked for; the drain task is talking to Envoy's admin.
    Draining {
        started: Instant,
        task: JoinHandle<()>,
        connections: Option<u64>,
    },
    /// The child was sent SIGTERM (or the stop signal, for a plain command); SIGKILL at `kill_at`.
    Stopping {
        kill_at: Option<Instant>,
    },
}

struct Supervisor {
    launch: Launch,
    settings: Settings,
    child: Pid,
    events: UnboundedSender<Event>,
    phase: Phase,
}

/// Runs `launch` to completion and returns the status the launcher exits with.
pub async fn run(launch: Launch, settings: Settings) -> i32 {
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
    if let Err(e) = signals::pump_into(events_tx.clone()) {
        tracing::error!("cannot install signal handlers: {e}");
        return 1;
    }
    // A plain command gets the terminal as under tini; Envoy does not, so that Ctrl-C reaches the launcher.
    let child = match process::spawn(&launch.argv, !launch.is_envoy) {
        Ok(pid) => pid,
        Err(e) => {
            tracing::error!("{e}");
            return e.status_code();
        }
    };
    let started = Instant::now();
    tracing::info!(pid = child.as_raw(), "started {}", shell_words(&launch));

    let kill_timeout = settings.kill_timeout;
    let mut supervisor = Supervisor { launch, settings, child, events: events_tx, phase: Phase::Running };
    let exit = supervisor.supervise(&mut events).await;
    tracing::info!(pid = child.as_raw(), "child exited with {exit} after {:.1?}", started.elapsed());
    stop_leftovers(mode, child, kill_timeout, &mut events).await;
    exit.status_code()
}

impl Supervisor {
    /// Handles events until the child exits.
    async fn supervise(&mut self, events: &mut UnboundedReceiver<Event>) -> Exit {
        // Children inherited across exec, or a child that exited before its SIGCHLD handler ran, are
        // found by reaping once up front.
        if let Some(exit) = reap(self.child) {
            return exit;
        }
        loop {
            let kill_at = match self.phase {
                Phase::Stopping { kill_at } => kill_at,
                _ => None,
            };
            let event = tokio::select! {
                event = events.recv() => event,
                _ = tokio::time::sleep_until(kill_at.unwrap_or_else(Instant::now)), if kill_at.is_some() => {
                    self.kill_after_timeout();
                    continue;
                }
            };
            let Some(event) = event else {
                // The signal pump holds a sender for the life of the runtime.
                tracing::error!("event channel closed while the child was running");
                return Exit::Code(1);
            };
            match event {
                Event::Signal(libc::SIGCHLD) => {
                    if let Some(exit) = reap(self.child) {
                        if matches!(self.phase, Phase::Draining { .. }) {
                            self.end_drain(DrainEnd::EnvoyExited);
                        }
                        return exit;
                    }
                }
                Event::Signal(sig @ (libc::SIGTERM | libc::SIGINT)) if self.launch.is_envoy => self.on_stop_signal(sig),
                Event::Signal(sig) => self.forward(sig),
                Event::DrainPolled { connections: polled } => {
                    if let Phase::Draining { connections, .. } = &mut self.phase {
                        *connections = polled;
                    }
                }
                Event::DrainEnded(end) => {
                    if matches!(self.phase, Phase::Draining { .. }) {
                        self.end_drain(end);
                        self.terminate(libc::SIGTERM);
                    }
                }
            }
        }
    }

    fn on_stop_signal(&mut self, sig: i32) {
        match &self.phase {
            Phase::Running => match &self.launch.admin {
                Some(admin) if !self.settings.drain.timeout.is_zero() => {
                    tracing::info!(
                        "{}: draining Envoy through its admin {} (at most {:?})",
                        signal_name(sig),
                        admin.address(),
                        self.settings.drain.timeout
                    );
                    let task =
                        tokio::spawn(drain::run(admin.clone(), self.settings.drain.clone(), self.events.clone()));
                    self.phase = Phase::Draining { started: Instant::now(), task, connections: None };
                }
                _ => {
                    tracing::info!("{}: passing it on to Envoy (no drain)", signal_name(sig));
                    self.terminate(sig);
                }
            },
            Phase::Draining { .. } => {
                self.end_drain(DrainEnd::SecondSignal);
                self.terminate(libc::SIGTERM);
            }
            Phase::Stopping { .. } => self.forward(sig),
        }
    }

    /// Stops the drain task and logs the one line that tells how the drain went.
    fn end_drain(&mut self, end: DrainEnd) {
        if let Phase::Draining { started, task, connections } = &self.phase {
            task.abort();
            let open = connections.map_or_else(|| "unknown".to_string(), |n| n.to_string());
            let what = if end == DrainEnd::EnvoyExited { "open when Envoy exited" } else { "open at SIGTERM" };
            tracing::info!(
                "drain ended: {end}, after {:.2?}; downstream connections {what}: {open}",
                started.elapsed()
            );
        }
    }

    /// Sends `sig` to the child; for Envoy, SIGKILL follows after the kill timeout.
    fn terminate(&mut self, sig: i32) {
        self.forward(sig);
        let kill_at = self.launch.is_envoy.then(|| Instant::now() + self.settings.kill_timeout);
        self.phase = Phase::Stopping { kill_at };
    }

    fn kill_after_timeout(&mut self) {
        tracing::warn!("Envoy still running {:?} after SIGTERM: sending SIGKILL", self.settings.kill_timeout);
        self.forward(libc::SIGKILL);
        self.phase = Phase::Stopping { kill_at: None };
    }

    fn forward(&self, sig: i32) {
        tracing::debug!("sending {} to {}", signal_name(sig), self.child);
        if let Err(e) = process::send(self.child, sig) {
            tracing::warn!("cannot send {} to {}: {e}", signal_name(sig), self.child);
        }
    }
}

fn signal_name(sig: i32) -> String {
    Signal::try_from(sig).map_or_else(|_| format!("signal {sig}"), |s| s.as_str().to_string())
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
                Some(_) => {}
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
