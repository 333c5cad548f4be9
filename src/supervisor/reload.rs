//! The supervisor's side of a reload (a validated hot restart), step by step: admit the trigger,
//! the checks (`checks`: preflight, version check, `envoy --mode validate`), wait for a draining
//! epoch, start epoch N+1. Each step records itself in `ReloadState`; its result comes back as an
//! event. How it ends (LIVE, refused, failed) is `reload_outcome`'s.

use super::checks::{CheckRun, Purpose};
use super::epochs::Epoch;
use super::reload_state::{Admission, ReloadReply, Step, answer};
use super::shutdown::Phase;
use super::trigger::Trigger;
use super::{Supervisor, shell_words};
use crate::outcome::{Refusal, ReloadResult};
use crate::process::{Exit, Processes};

impl<P: Processes> Supervisor<P> {
    /// Starts a reload, or queues one behind the reload under way; the trigger's caller (of
    /// `/reload`) is answered when it ends. Refused while shutting down or while hot restarts are
    /// blocked.
    pub(super) fn request_reload(&mut self, mut trigger: Trigger) -> Result<(), Refusal> {
        let carried = trigger.take_checks();
        let reply = trigger.take_reply();
        if let Some(refusal) = self.refusal_for(&trigger) {
            match refusal {
                Refusal::ShuttingDown => tracing::info!("{trigger}: no hot restart while shutting down"),
                Refusal::Blocked(_) => tracing::error!("{trigger}: {refusal}"),
                _ => tracing::debug!("{trigger}: no hot restart: {refusal}"),
            }
            self.abandon_carried(carried);
            answer(reply, &Err(refusal.clone()));
            return Err(refusal);
        }
        let cold =
            if trigger.cold() { Some(trigger.to_string()) } else { self.cold_while_blocked(&trigger.to_string()) };
        match self.reload.admit(reply, self.epochs.current_is_live(), cold.as_deref()) {
            Admission::Held { first } => {
                if first {
                    tracing::info!(
                        "{trigger}: epoch {} is not LIVE yet, and Envoy refuses a hot restart while it initializes: \
                         the reload starts once it is LIVE",
                        self.epochs.current_number()
                    );
                }
                self.abandon_carried(carried);
            }
            Admission::Queued { first } => {
                if first {
                    tracing::info!("{trigger}: a hot restart is under way; one more will follow it");
                }
                self.abandon_carried(carried);
            }
            // Checks run while the files settled stand for them: a cold handover checks more.
            Admission::Start(waiters) => match carried {
                Some(run) if cold.is_none() => self.adopt_checks(&trigger, run, waiters),
                carried => {
                    self.abandon_carried(carried);
                    self.start_reload(&trigger.to_string(), waiters, cold);
                }
            },
        }
        Ok(())
    }

    /// A debounce ended, with `changed` files since the last one: a reload (which brings the checks
    /// run meanwhile when they stand for the files as they are now), or nothing. The next debounce
    /// may start checks again.
    pub(super) fn on_files_settled(&mut self, changed: Vec<std::path::PathBuf>) {
        self.early.started = 0;
        // The watcher compares with the files at its last debounce's end, but a refused reload read
        // them at another moment (a write may have been half done then): after a refusal, files
        // touched again are checked again, even when they hash as before.
        let refused = self.last_reload.as_ref().is_some_and(|r| r.result == ReloadResult::Refused);
        if self.rotate_settled(&changed) || (changed.is_empty() && !refused) {
            return self.discard_early_checks();
        }
        let checks = match self.early.run.take() {
            Some(run) if run.stands_for_current_files() => Some(Box::new(run)),
            Some(run) => {
                self.abandon_checks(run);
                None
            }
            None => None,
        };
        let _ = self.request_reload(Trigger::FilesSettled { changed, checks });
    }

    /// Why `trigger` cannot start a reload now, if it cannot.
    fn refusal_for(&self, trigger: &Trigger) -> Option<Refusal> {
        if !matches!(self.phase, Phase::Running) {
            return Some(Refusal::ShuttingDown);
        }
        if !self.launch.is_envoy() {
            return Some(Refusal::NotEnvoy);
        }
        if self.launch.admin().is_none() {
            // Never confirm an epoch that was not seen LIVE (sesame gives Envoy an admin when the
            // bootstrap names none, so this is an admin it could not reach at all).
            return Some(Refusal::Invalid("Envoy has no admin to see a new epoch LIVE".into()));
        }
        // With --no-recover, only a cold handover asked for by hand gets past a block.
        let refused = !trigger.cold() && !self.settings.recover.enabled;
        self.health.blocked().filter(|_| refused).map(|why| Refusal::Blocked(why.to_string()))
    }

    fn abandon_carried(&mut self, carried: Option<CheckRun>) {
        if let Some(run) = carried {
            self.abandon_checks(run);
        }
    }

    /// While hot restarts are blocked, every trigger is applied the only way left: a cold handover,
    /// for this reason.
    pub(super) fn cold_while_blocked(&self, trigger: &str) -> Option<String> {
        let why = self.health.blocked()?;
        Some(format!("{trigger}, while hot restarts are blocked ({why})"))
    }

    pub(super) fn start_reload(&mut self, trigger: &str, waiters: Vec<ReloadReply>, cold: Option<String>) {
        // A reload of its own (SIGHUP, /reload, a queued or held trigger) checks for itself.
        self.discard_early_checks();
        let next = self.epochs.next_number();
        if cold.is_some() {
            self.recovery.cancel_timer();
            tracing::info!("{trigger}: validating for a cold handover to a new Envoy family (epoch {next})");
            self.systemd.status(&format!("cold handover to epoch {next}"));
        } else {
            tracing::info!("{trigger}: validating for a hot restart to epoch {next}");
            self.systemd.reloading(&format!("hot restart to epoch {next}"));
        }
        let run = self.start_checks(if cold.is_some() { Purpose::ColdHandover } else { Purpose::HotRestart });
        self.reload.begin(run, waiters, cold);
    }

    /// The reload takes over the checks run while the files settled: it waits for them, or acts on
    /// their verdict at once.
    fn adopt_checks(&mut self, trigger: &Trigger, run: CheckRun, waiters: Vec<ReloadReply>) {
        let next = self.epochs.next_number();
        let done = if run.checking() { "validating" } else { "checked" };
        tracing::info!("{trigger}: {done} since the first change, for a hot restart to epoch {next}");
        self.systemd.reloading(&format!("hot restart to epoch {next}"));
        let finished = run.outcome().is_some();
        self.reload.begin(run, waiters, None);
        if finished {
            self.on_checks_done();
        }
    }

    /// The reload under way checks its input again, from the first step.
    pub(super) fn preflight_again(&mut self) {
        let run = self.start_checks(if self.reload.is_cold() { Purpose::ColdHandover } else { Purpose::HotRestart });
        self.reload.begin_again(run);
    }

    /// The reload's checks have a verdict: refused, or on to the new epoch (or new family: the
    /// checks may have found that the new binary needs one).
    pub(super) fn on_checks_done(&mut self) {
        let Some(outcome) = self.reload.checks().and_then(|run| run.outcome().cloned()) else { return };
        let verdict = match outcome {
            Ok(verdict) => verdict,
            Err(refusal) => return self.reload_refused(refusal),
        };
        let Some(busy) = self.reload.busy() else { return };
        busy.binary = verdict.binary.clone();
        if busy.cold.is_none()
            && let Some(why) = verdict.cold_because.clone()
        {
            // These checks were a hot restart's: a cold handover's also look at the ports beside
            // the serving family, so they run again, as its own.
            busy.cold = Some(why);
            return self.preflight_again();
        }
        if busy.cold.is_some() { self.start_new_family(verdict) } else { self.start_next_epoch(verdict) }
    }

    /// The base id of the serving family, once: from the file its epoch 0 wrote, or (that file gone)
    /// from the hot-restart memory the current epoch maps. Later epochs need it even if the runtime
    /// directory is deleted under us.
    pub(super) fn learn_base_id(&mut self) {
        if self.family.base_id.is_none() {
            let pid = self.epochs.find(self.epochs.current_number()).map(|e| e.pid.as_raw());
            self.family.base_id =
                self.launch.base_id(&self.family).or_else(|| pid.and_then(crate::envoy::base_id_from_maps));
        }
    }

    /// Why a hot restart cannot join the serving family: the base id epoch 0 picked is not known.
    fn base_id_unknown(&mut self) -> Option<Refusal> {
        self.learn_base_id();
        let file = self.family.base_id_path.as_ref().filter(|_| self.family.base_id.is_none())?;
        Some(Refusal::Fault(format!("the base id epoch 0 picked is not known: {file} could not be read")))
    }

    /// Starts epoch N+1, once no draining epoch is left besides the current one: Envoy keeps at
    /// most two processes, and so does the launcher.
    pub(super) fn start_next_epoch(&mut self, verdict: super::checks::Verdict) {
        let Some(envoy) = &self.launch.envoy else { return };
        if let Some(oldest) = self.epochs.older() {
            // The current epoch tells its parent to terminate parent_shutdown_time after it started.
            let current_age = self.epochs.find(self.epochs.current_number()).map(|e| e.started.elapsed());
            let wait =
                envoy.parent_shutdown_time.saturating_sub(current_age.unwrap_or_default()) + self.settings.kill_timeout;
            tracing::info!(
                "epoch {} is still draining (it exits within its parent shutdown time): epoch {} starts after it",
                oldest.number,
                self.epochs.next_number()
            );
            let oldest = oldest.pid;
            let deadline = self.timers.schedule(wait);
            if let Some(busy) = self.reload.busy() {
                busy.step = Step::WaitingForDraining { oldest, verdict, deadline };
            }
            return;
        }
        let epoch = self.epochs.next_number();
        let restart_epoch = self.epochs.next_restart_epoch();
        // What the new epoch reads must be what was checked: a change since (a rotation during
        // the wait for a draining epoch, a copy that straddled it) is checked again first.
        if !verdict.input.unchanged() {
            tracing::info!(
                "the files changed since they were checked: checking them again before epoch {epoch} starts"
            );
            return self.preflight_again();
        }
        if verdict.admin.is_none() {
            let why = "the bootstrap names no admin (sesame gives one only at its start)";
            return self.reload_refused(Refusal::Invalid(why.into()));
        }
        if let Some(refusal) = self.base_id_unknown() {
            return self.reload_refused(refusal);
        }
        if let Some(prepared) = &verdict.sds
            && let Err(e) = self.write_epoch_secrets(prepared)
        {
            return self.reload_refused(Refusal::Fault(format!("{e:#}")));
        }
        super::forget_admin_address_file(verdict.admin.as_ref());
        let argv = self.launch.epoch_argv(&self.family, restart_epoch);
        let pid = match self.processes.spawn(&argv, false, None) {
            Ok(pid) => pid,
            Err(e) => return self.reload_refused(Refusal::Fault(e.to_string())),
        };
        tracing::info!(pid = pid.as_raw(), "hot restart: started epoch {epoch}: {}", shell_words(&argv));
        let family = self.epochs.current_family();
        let epoch_of_family = Epoch::new(epoch, pid, false).in_family(family, restart_epoch);
        self.epochs.add(epoch_of_family.with_admin(verdict.admin.clone()));
        self.metrics.epochs_started.inc();
        self.metrics.live_epochs.set(self.epochs.len() as i64);
        let (live_poll, poll) = self.poll_live(epoch, self.family.clone(), Some(self.settings.reload_timeout));
        if let Some(busy) = self.reload.busy() {
            busy.step = Step::Starting { epoch, pid, poll, live_poll, family: None };
        }
    }

    /// A deadline of the reload's own steps ran out; stale ones are dropped.
    pub(super) fn on_reload_deadline(&mut self, generation: super::Generation) {
        match self.reload.step() {
            Some(Step::Settling { verdict, deadline }) if *deadline == generation => {
                let verdict = verdict.clone();
                self.start_next_epoch(verdict);
            }
            Some(Step::HandingOver { .. }) => self.on_handover_deadline(generation),
            Some(Step::WaitingForDraining { oldest, deadline, .. }) if *deadline == generation => {
                let why = format!("the draining epoch (pid {oldest}) outlived its parent shutdown time");
                self.reload_refused(Refusal::TimedOut(why));
            }
            _ => {}
        }
    }

    /// An epoch other than the current one exited: the reload may have waited for it (a draining
    /// epoch) or started it (a new epoch that failed). True when the reload took it.
    pub(super) fn on_reload_epoch_exit(&mut self, epoch: &Epoch, exit: Exit) -> bool {
        if self.on_old_family_exit(epoch, exit) {
            return true;
        }
        let Some(busy) = self.reload.busy() else { return false };
        match &busy.step {
            Step::Starting { epoch: starting, poll, .. } if *starting == epoch.number => {
                if let Some(poll) = poll {
                    poll.abort();
                }
                let reason = crate::admin::NotLive::Exited(exit.to_string());
                self.reload_failed_after_start(epoch.number, reason);
                self.resume_stop();
                true
            }
            Step::WaitingForDraining { oldest, verdict, .. } if *oldest == epoch.pid => {
                let verdict = verdict.clone();
                if !verdict.input.unchanged() {
                    tracing::info!(
                        "the files changed while the reload waited for epoch {}: checking them again",
                        epoch.number
                    );
                    self.preflight_again();
                    return true;
                }
                let settle = self.settings.watch.debounce;
                tracing::info!(
                    "epoch {} drained and exited with {exit}: the next one starts once the files have stayed as \
                     checked for {settle:?}",
                    epoch.number
                );
                let deadline = self.timers.schedule(settle);
                if let Some(busy) = self.reload.busy() {
                    busy.step = Step::Settling { verdict, deadline };
                }
                true
            }
            _ => false,
        }
    }
}
