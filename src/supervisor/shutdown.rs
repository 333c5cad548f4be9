//! The supervisor's side of a stop: the graceful drain, SIGTERM to the newest epoch, SIGKILL at
//! the kill timeout, and, once the current epoch has exited, the processes it left behind.

use nix::sys::signal::Signal;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::reload_state::Step;
use super::timers::{KillStep, KillTimer, REAP_AFTER_KILL_TIMEOUT};
use super::{Event, Generation, Supervisor};
use crate::drain::{self, DrainEnd};
use crate::process::{Exit, Processes, signal_name};
use crate::signals::{self, Intent, Running};

/// Where the launcher is in its life.
#[derive(Debug)]
pub enum Phase {
    Running,
    /// A stop was asked for while a new epoch starts (it holds Envoy's admin: the old epoch closed
    /// its own), or while a cold handover drains the old family: the drain waits until the new epoch
    /// is LIVE (or has failed), or the old family is gone, to go through the right admin.
    AwaitingNewEpoch {
        trigger: String,
        sig: i32,
    },
    /// A stop was asked for; the drain task is talking to Envoy's admin.
    Draining {
        started: Instant,
        task: JoinHandle<()>,
        /// The open connections at the drain's last poll.
        progress: watch::Receiver<Option<u64>>,
    },
    /// The stop signal was sent (SIGTERM, or the user's signal without a drain); `stop` then
    /// escalates to SIGKILL, and gives up on a process that not even SIGKILL ends (uninterruptible
    /// sleep). No timer for a plain command: it decides how long it takes.
    Stopping {
        stop: Option<KillTimer>,
        stop_signal: i32,
    },
}

impl<P: Processes> Supervisor<P> {
    /// A stop signal (or `/shutdown`) for Envoy: drain, skip the rest of a drain, or pass it on.
    pub(super) fn on_stop(&mut self, trigger: &str, sig: i32) {
        // Checks run while the files settle are for a reload that will not come.
        self.discard_early_checks();
        match &self.phase {
            Phase::Running => {
                // A new family's first epoch holds nothing of the serving one's: it is ended below.
                if let Some(Step::Starting { epoch, family: None, .. }) = self.reload.step() {
                    tracing::info!(
                        "{trigger}: epoch {epoch} is starting and holds Envoy's admin: the drain starts once it is \
                         LIVE or has failed (within --reload-timeout)"
                    );
                    self.systemd.stopping(&format!("waiting for epoch {epoch} to start, then draining"));
                    self.phase = Phase::AwaitingNewEpoch { trigger: trigger.to_string(), sig };
                    return;
                }
                if let Some(Step::HandingOver { .. }) = self.reload.step() {
                    // The old family's connections are drained by the handover; cutting it short
                    // would drop them. The new family's drain follows once it is gone.
                    tracing::info!(
                        "{trigger}: the old Envoy family drains first (within --drain-timeout), then the new one"
                    );
                    self.systemd.stopping("draining the old Envoy family, then the new one");
                    self.phase = Phase::AwaitingNewEpoch { trigger: trigger.to_string(), sig };
                    return;
                }
                self.cancel_reload();
                match self.epochs.current_admin() {
                    Some(admin) if !self.settings.drain.timeout.is_zero() => {
                        tracing::info!(
                            "{trigger}: draining Envoy through its admin {} (at most {:?})",
                            admin.address(),
                            self.settings.drain.timeout
                        );
                        let older = self.older_alive.subscribe();
                        let older_admin = self.epochs.older().and_then(|e| e.kept_admin_client());
                        let (publish, progress) = watch::channel(None);
                        let (settings, events) = (self.settings.drain.clone(), self.events.clone());
                        let task = tokio::spawn(async move {
                            let end = drain::run(admin, settings, older, older_admin, publish).await;
                            let _ = events.send(Event::DrainEnded(end));
                        });
                        self.phase = Phase::Draining { started: Instant::now(), task, progress };
                        self.systemd.stopping("draining Envoy");
                    }
                    _ => {
                        tracing::info!("{trigger}: passing SIGTERM on to Envoy (no drain)");
                        self.systemd.stopping("stopping Envoy (no drain)");
                        self.answer_shutdown_waiters(true);
                        self.terminate(sig);
                    }
                }
            }
            Phase::Draining { .. } => {
                self.end_drain(DrainEnd::SecondSignal);
                self.terminate(libc::SIGTERM);
            }
            Phase::AwaitingNewEpoch { .. } => {
                // A second signal skips the rest, as it skips the rest of a drain.
                tracing::info!("{trigger}: no more waiting for the starting epoch: stopping");
                self.cancel_reload();
                self.answer_shutdown_waiters(false);
                self.terminate(libc::SIGTERM);
            }
            Phase::Stopping { .. } => self.epochs.signal_newest(&mut self.processes, sig),
        }
    }

    /// The starting epoch is LIVE, or has failed: a stop that waited for it goes on.
    pub(super) fn resume_stop(&mut self) {
        if let Phase::AwaitingNewEpoch { trigger, sig } = std::mem::replace(&mut self.phase, Phase::Running) {
            self.on_stop(&trigger, sig);
        }
    }

    /// `/shutdown`: start the drain (once), answer when it ends.
    pub(super) fn on_shutdown_request(&mut self, reply: oneshot::Sender<bool>) {
        if let Some(drained) = self.drained {
            let _ = reply.send(drained);
            return;
        }
        self.shutdown_waiters.push(reply);
        if matches!(self.phase, Phase::Running) {
            if self.launch.is_envoy() {
                self.on_stop("control API /shutdown", libc::SIGTERM);
            } else {
                self.answer_shutdown_waiters(true);
                self.terminate(libc::SIGTERM);
            }
        }
    }

    pub(super) fn on_drain_ended(&mut self, end: DrainEnd) {
        if matches!(self.phase, Phase::Draining { .. }) {
            self.end_drain(end);
            self.terminate(libc::SIGTERM);
        }
    }

    /// Stops the drain task and logs the one line that tells how the drain went.
    pub(super) fn end_drain(&mut self, end: DrainEnd) {
        if let Phase::Draining { started, task, progress } = &self.phase {
            task.abort();
            let connections = *progress.borrow();
            let open = connections.map_or_else(|| "unknown".to_string(), |n| n.to_string());
            let what = if end == DrainEnd::EnvoyExited { "open when Envoy exited" } else { "open at SIGTERM" };
            let took = started.elapsed();
            tracing::info!("drain ended: {end}, after {took:.2?}; downstream connections {what}: {open}");
            self.metrics.drains.get_or_create(&crate::metrics::ReasonLabel { reason: end.label().into() }).inc();
            self.metrics.drain_seconds.observe(took.as_secs_f64());
            self.metrics.connections_at_sigterm.set(connections.map_or(-1, |n| n as i64));
            self.systemd.status(&format!("drain ended: {end}"));
            self.answer_shutdown_waiters(matches!(end, DrainEnd::Threshold | DrainEnd::EnvoyExited));
        }
    }

    fn answer_shutdown_waiters(&mut self, drained: bool) {
        self.drained.get_or_insert(drained);
        for waiter in self.shutdown_waiters.drain(..) {
            let _ = waiter.send(drained);
        }
    }

    /// Sends `sig` to the newest epoch; for Envoy, SIGKILL follows after the kill timeout. For a
    /// plain command this is plain forwarding: it decides how long it takes.
    fn terminate(&mut self, sig: i32) {
        self.epochs.stop_newest(&mut self.processes, sig);
        // An old family still draining after a cold handover stops too.
        self.epochs.stop_older_families(&mut self.processes, sig);
        let stop = self.launch.is_envoy().then(|| KillTimer::start(&mut self.timers, self.settings.kill_timeout));
        self.phase = Phase::Stopping { stop, stop_signal: sig };
    }

    /// A deadline of the stop: SIGKILL when SIGTERM was not enough; the launcher's own exit (137)
    /// when SIGKILL was not either. None when `generation` is not the stop's.
    pub(super) fn on_stop_deadline(&mut self, generation: Generation) -> Option<Option<Exit>> {
        let Phase::Stopping { stop: Some(stop), stop_signal } = &mut self.phase else { return None };
        match stop.on_deadline(generation, &mut self.timers)? {
            KillStep::GiveUp => {
                tracing::error!(
                    "Envoy survived SIGKILL for {REAP_AFTER_KILL_TIMEOUT:?} (uninterruptible sleep?): exiting anyway"
                );
                Some(Some(Exit::Signal(libc::SIGKILL)))
            }
            KillStep::Kill => {
                *stop_signal = libc::SIGKILL;
                tracing::warn!("Envoy still running {:?} after SIGTERM: sending SIGKILL", self.settings.kill_timeout);
                self.epochs.signal_all(&mut self.processes, libc::SIGKILL);
                Some(None)
            }
        }
    }

    /// SIGTERM to every process left behind, SIGKILL after the kill timeout, and reap them all: the
    /// launcher leaves nothing for the kernel to clean up. A stop signal meanwhile skips the wait.
    pub(super) async fn stop_leftovers(&mut self, events: &mut UnboundedReceiver<Event>) {
        if self.reap_until_none() {
            return;
        }
        let kill_timeout = self.settings.kill_timeout;
        tracing::info!("sending SIGTERM to the processes left behind; SIGKILL in {kill_timeout:?}");
        self.processes.signal_descendants(Signal::SIGTERM);
        let deadline = tokio::time::sleep(kill_timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => {
                    tracing::warn!("processes still running after {kill_timeout:?}: sending SIGKILL");
                    break;
                }
                event = events.recv() => match event {
                    Some(Event::Signal(sig)) => match signals::intent(sig, Running::Leftovers) {
                        Intent::Reap if self.reap_until_none() => return,
                        Intent::Stop => {
                            tracing::warn!("{} while waiting for the processes left behind: sending SIGKILL", signal_name(sig));
                            break;
                        }
                        _ => {}
                    },
                    Some(_) => {}
                    None => break,
                }
            }
        }
        // Repeat SIGKILL on every wake-up: a process may have forked between the scan and the kill.
        let give_up = tokio::time::sleep(REAP_AFTER_KILL_TIMEOUT);
        tokio::pin!(give_up);
        loop {
            self.processes.signal_descendants(Signal::SIGKILL);
            tokio::select! {
                _ = &mut give_up => {
                    tracing::error!("processes left behind survived SIGKILL for {REAP_AFTER_KILL_TIMEOUT:?}; exiting anyway");
                    return;
                }
                _ = events.recv() => {}
            }
            if self.reap_until_none() {
                return;
            }
        }
    }

    /// Once no epoch is left, the hot-restart shared memory of their base id goes too (Envoy leaves
    /// it behind, 4 KiB a cold start). Before the first epoch wrote its base id there is none.
    pub(super) fn remove_shared_memory(&self) {
        let Some(path) =
            self.family.base_id.or_else(|| self.launch.base_id(&self.family)).map(crate::envoy::shared_memory_path)
        else {
            return;
        };
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::debug!("removed {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove Envoy's shared memory {}: {e}", path.display()),
        }
    }

    /// Reaps what has exited; true when no child is left.
    fn reap_until_none(&mut self) -> bool {
        let reaped = self.processes.reap();
        for (pid, exit) in &reaped.exits {
            tracing::debug!(pid = pid.as_raw(), "reaped an adopted orphan ({exit})");
        }
        reaped.no_children
    }
}
