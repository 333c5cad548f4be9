//! The supervisor's side of a reload (a validated hot restart), step by step: admit the trigger,
//! preflight, `envoy --mode validate`, wait for a draining epoch, start epoch N+1, wait until it is
//! LIVE. Each step records itself in `ReloadState`; its result comes back as an event.

use nix::unistd::Pid;

use super::epochs::Epoch;
use super::reload_state::{Admission, Checked, ReloadReply, Step};
use super::shutdown::{Phase, REAP_AFTER_KILL_TIMEOUT};
use super::{Event, Generation, Supervisor, shell_words};
use crate::envoy;
use crate::http::Endpoint;
use crate::process::{Exit, Processes};
use crate::reload::{self, Preflight, Refusal};

impl<P: Processes> Supervisor<P> {
    /// Starts a reload, or queues one behind the reload under way; `waiter` (a `/reload` caller)
    /// is answered when it ends. Refused while shutting down or while hot restarts are blocked.
    pub(super) fn request_reload(
        &mut self,
        trigger: String,
        waiter: Option<ReloadReply>,
        cold: bool,
        files_settled: bool,
    ) -> Result<(), Refusal> {
        let refusal = if !matches!(self.phase, Phase::Running) {
            Some(Refusal::ShuttingDown)
        } else if !self.launch.is_envoy() {
            Some(Refusal::NotEnvoy)
        } else if self.launch.admin().is_none() {
            // Never confirm an epoch that was not seen LIVE (sesame gives Envoy an admin when the
            // bootstrap names none, so this is an admin it could not reach at all).
            Some(Refusal::Invalid("Envoy has no admin to see a new epoch LIVE".into()))
        } else {
            // With --no-recover, only a cold handover asked for by hand gets past a block.
            let refused = !cold && !self.settings.recover.enabled;
            self.blocked.as_ref().filter(|_| refused).map(|why| Refusal::Blocked(why.clone()))
        };
        if let Some(refusal) = refusal {
            match refusal {
                Refusal::ShuttingDown => tracing::info!("{trigger}: no hot restart while shutting down"),
                Refusal::Blocked(_) => tracing::error!("{trigger}: {refusal}"),
                _ => tracing::debug!("{trigger}: no hot restart: {refusal}"),
            }
            if let Some(waiter) = waiter {
                let _ = waiter.send(Err(refusal.clone()));
            }
            return Err(refusal);
        }
        let cold = if cold { Some(trigger.clone()) } else { self.cold_while_blocked(&trigger) };
        match self.reload.admit(waiter, self.epochs.current_is_live(), cold.as_deref()) {
            Admission::Held { first } => {
                if first {
                    tracing::info!(
                        "{trigger}: epoch {} is not LIVE yet, and Envoy refuses a hot restart while it initializes: \
                         the reload starts once it is LIVE",
                        self.epochs.current_number()
                    );
                }
                Ok(())
            }
            Admission::Queued { first } => {
                if first {
                    tracing::info!("{trigger}: a hot restart is under way; one more will follow it");
                }
                Ok(())
            }
            Admission::Start(waiters) => {
                // The end of a debounce: the checks may have run while the files settled.
                let waiters = if files_settled && cold.is_none() {
                    match self.take_over_early_checks(&trigger, waiters) {
                        Ok(()) => return Ok(()),
                        Err(waiters) => waiters,
                    }
                } else {
                    waiters
                };
                self.start_reload(&trigger, waiters, cold);
                Ok(())
            }
        }
    }

    /// While hot restarts are blocked, every trigger is applied the only way left: a cold handover,
    /// for this reason.
    pub(super) fn cold_while_blocked(&self, trigger: &str) -> Option<String> {
        let why = self.blocked.as_ref()?;
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
        let attempt = self.spawn_preflight(cold.is_some());
        self.reload.begin(attempt, waiters, cold);
    }

    /// The reload under way checks its input again, from the first step.
    pub(super) fn preflight_again(&mut self) {
        let attempt = self.spawn_preflight(self.reload.is_cold());
        self.reload.begin_again(attempt);
    }

    /// Runs the preflight off the runtime thread; its result comes back as the returned attempt.
    fn spawn_preflight(&mut self, cold: bool) -> Generation {
        let command = self.launch.command.clone();
        let expiry_warn = self.settings.cert_expiry_warn;
        let user = self.launch.user.clone();
        let attempt = self.next_generation();
        let events = self.events.clone();
        // A new family binds every listener beside the serving one: what only the serving epochs
        // may hold is found first.
        let ours: Option<Vec<i32>> = cold.then(|| self.epochs.iter().map(|e| e.pid.as_raw()).collect());
        tokio::task::spawn_blocking(move || {
            let result = reload::preflight(&command, expiry_warn, ours.as_deref(), user.as_ref());
            let _ = events.send(Event::Preflight { attempt, result });
        });
        attempt
    }

    pub(super) fn on_preflight(&mut self, attempt: Generation, result: Result<Preflight, String>) {
        if !matches!(self.reload.attempt(attempt), Some(busy) if matches!(busy.step, Step::Preflight)) {
            return;
        }
        let preflight = match result {
            Ok(preflight) => preflight,
            Err(reason) => return self.reload_refused(&reason),
        };
        if self.launch.envoy.is_none() {
            return;
        }
        let cold = self.reload.is_cold();
        if let Some(reason) = self.base_id_unknown().filter(|_| !cold) {
            return self.reload_refused(&reason);
        }
        let admin = self.launch.admin_address(preflight.admin);
        if let Some(busy) = self.reload.attempt(attempt) {
            busy.binary = preflight.binary.clone();
        }
        let checked = Checked { input: preflight.input, admin };
        let upgraded = preflight.binary.is_some() && self.binary.is_some() && preflight.binary != self.binary;
        if upgraded && !cold {
            return self.check_hot_restart_version(attempt, checked);
        }
        self.spawn_validator(attempt, checked);
    }

    /// Why a hot restart cannot join the serving family: the base id epoch 0 picked is not known.
    pub(super) fn base_id_unknown(&self) -> Option<String> {
        let envoy = self.launch.envoy.as_ref()?;
        if self.family.base_id_path.is_none() || self.family.base_id.is_some() {
            return None;
        }
        let file = envoy.base_id_file.as_ref().map(|f| f.display().to_string()).unwrap_or_default();
        Some(format!("the base id epoch 0 picked is not known: {file} could not be read"))
    }

    /// Runs `envoy --mode validate` on what was checked, as our child, bounded by the reload timeout.
    pub(super) fn spawn_validator(&mut self, attempt: Generation, checked: Checked) {
        let argv = envoy::validate_command(&self.launch.command);
        match self.spawn_with_output(&argv, "envoy-validate.log") {
            Ok((pid, output)) => {
                tracing::debug!("validating: {}", shell_words(&argv));
                // A validator that hangs must not hold the reload (and its callers) for ever.
                let deadline = self.schedule(self.settings.reload_timeout);
                if let Some(busy) = self.reload.attempt(attempt) {
                    busy.step = Step::Validating { pid, output, checked, deadline, killed: false };
                }
            }
            Err(e) => self.reload_refused(&e),
        }
    }

    /// Spawns a checker (the validator, the version check) with its output in the runtime
    /// directory's `name`, which is root's: the checker may run as the Envoy user, but its output
    /// file is created by sesame before.
    pub(super) fn spawn_with_output(
        &mut self,
        argv: &[std::ffi::OsString],
        name: &str,
    ) -> Result<(Pid, std::path::PathBuf), String> {
        let Some(envoy) = &self.launch.envoy else { return Err("not Envoy".into()) };
        let output = envoy.runtime_dir.join(name);
        let file = std::fs::File::create(&output).map_err(|e| format!("cannot write {}: {e}", output.display()))?;
        let pid = self.processes.spawn(argv, false, Some(file)).map_err(|e| e.to_string())?;
        Ok((pid, output))
    }

    /// A checker exited (the validator, or the version check, which also needs the serving epoch's
    /// version): its verdict is read off the runtime thread. False when `pid` is neither.
    pub(super) fn on_checker_exit(&mut self, pid: Pid, exit: Exit) -> bool {
        if self.on_early_checker_exit(pid, exit) {
            return true;
        }
        let serving = self.epochs.current_admin();
        let events = self.events.clone();
        let Some(busy) = self.reload.busy() else { return false };
        let attempt = busy.attempt;
        match &busy.step {
            Step::Validating { pid: validator, output, .. } if *validator == pid => {
                let output = output.clone();
                tokio::spawn(async move {
                    let result = reload::validation_verdict(exit, output).await;
                    let _ = events.send(Event::Validated { attempt, result });
                });
            }
            Step::CheckingVersion { pid: checker, output, .. } if *checker == pid => {
                let output = output.clone();
                tokio::spawn(async move {
                    let result = reload::hot_restart_compatibility(exit, output, serving).await;
                    let _ = events.send(Event::VersionChecked { attempt, result });
                });
            }
            _ => return false,
        }
        true
    }

    pub(super) fn on_validated(&mut self, attempt: Generation, result: Result<(), String>) {
        let Some(busy) = self.reload.attempt(attempt) else { return };
        let Step::Validating { checked, .. } = &busy.step else { return };
        let checked = checked.clone();
        let cold = busy.cold.is_some();
        match result {
            Ok(()) if cold => self.start_new_family(checked),
            Ok(()) => self.start_next_epoch(checked),
            Err(reason) => self.reload_refused(&reason),
        }
    }

    /// Starts epoch N+1, once no draining epoch is left besides the current one: Envoy keeps at
    /// most two processes, and so does the launcher.
    pub(super) fn start_next_epoch(&mut self, checked: Checked) {
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
            let deadline = self.schedule(wait);
            if let Some(busy) = self.reload.busy() {
                busy.step = Step::WaitingForDraining { oldest, checked, deadline };
            }
            return;
        }
        let epoch = self.epochs.next_number();
        let restart_epoch = self.epochs.next_restart_epoch();
        // What the new epoch reads must be what was checked: a change since (a rotation during
        // the wait for a draining epoch, a copy that straddled it) is checked again first.
        if !checked.input.unchanged() {
            tracing::info!(
                "the files changed since they were checked: checking them again before epoch {epoch} starts"
            );
            return self.preflight_again();
        }
        if checked.admin.is_none() {
            return self.reload_refused("the bootstrap names no admin (sesame gives one only at its start)");
        }
        if let (Some(file), None) = (&self.family.base_id_path, self.family.base_id) {
            return self
                .reload_refused(&format!("the base id of the serving family is not known: {file} could not be read"));
        }
        super::forget_admin_address_file(checked.admin.as_ref());
        let argv = self.launch.epoch_argv(&self.family, restart_epoch);
        let pid = match self.processes.spawn(&argv, false, None) {
            Ok(pid) => pid,
            Err(e) => return self.reload_refused(&e.to_string()),
        };
        tracing::info!(pid = pid.as_raw(), "hot restart: started epoch {epoch}: {}", shell_words(&argv));
        let family = self.epochs.current_family();
        let epoch_of_family = Epoch::new(epoch, pid, false).in_family(family, restart_epoch);
        self.epochs.add(epoch_of_family.with_admin(checked.admin.clone()));
        self.metrics.epochs_started.inc();
        self.metrics.live_epochs.set(self.epochs.len() as i64);
        let (live_poll, poll) = self.poll_live(epoch, self.family.clone(), Some(self.settings.reload_timeout));
        if let Some(busy) = self.reload.busy() {
            busy.step = Step::Starting { epoch, pid, poll, live_poll, family: None };
        }
    }

    pub(super) fn on_epoch_live(&mut self, epoch: u32, live_poll: Generation, result: Result<Endpoint, String>) {
        if let Ok(endpoint) = &result {
            self.epochs.answered_on(epoch, endpoint.clone());
        }
        if epoch == self.epochs.current_number() && result.is_ok() {
            if let Some(serving) = self.epochs.mark_live(epoch, &mut self.processes) {
                tracing::info!(pid = serving.pid.as_raw(), "Envoy epoch {epoch} is LIVE");
                self.systemd.ready(&format!("serving: epoch {epoch} is LIVE"));
            }
            if self.family.base_id.is_none() {
                // Once, now that epoch 0 has written it: later epochs need it even if the runtime
                // directory is deleted under us.
                self.family.base_id = self.launch.base_id(&self.family);
            }
            if let Some(waiters) = self.reload.release_held() {
                let cold = self.cold_while_blocked("the held trigger");
                self.start_reload(&format!("epoch {epoch} is LIVE; the held trigger"), waiters, cold);
            }
            return;
        }
        let Some(busy) = self.reload.busy() else { return };
        let Step::Starting { epoch: starting, pid, live_poll: expected, ref family, .. } = busy.step else { return };
        if starting != epoch || live_poll != expected {
            return;
        }
        if let Some(new_family) = family.clone() {
            return self.on_new_family_live(epoch, pid, new_family, result);
        }
        match result {
            Ok(_) => {
                tracing::info!(
                    pid = pid.as_raw(),
                    "hot restart done: epoch {epoch} is LIVE, {:.2?} after the trigger; epoch {} drains and exits on its own",
                    busy.started.elapsed(),
                    self.epochs.current_number()
                );
                self.epochs.promote(epoch, &mut self.processes);
                self.forget_lost_parent();
                self.metrics.current_epoch.set(i64::from(epoch));
                self.reload_ended("success", Ok(epoch), format!("epoch {epoch} is LIVE"));
                self.resume_stop();
            }
            Err(reason) => {
                // Never SIGTERM a new epoch: Envoy's shutdown would take its parent, the serving
                // epoch, down with it. SIGKILL ends it alone.
                self.processes.signal(pid, libc::SIGKILL);
                self.reload_failed_after_start(epoch, reason);
                self.resume_stop();
            }
        }
    }

    /// A deadline of the reload ran out; stale ones are dropped.
    pub(super) fn on_reload_deadline(&mut self, generation: Generation) {
        match self.reload.step() {
            Some(Step::Validating { deadline, killed: true, .. }) if *deadline == generation => {
                let reason = format!("envoy --mode validate survived SIGKILL for {REAP_AFTER_KILL_TIMEOUT:?}");
                self.reload_refused(&reason);
            }
            Some(Step::Validating { pid, deadline, .. }) if *deadline == generation => {
                tracing::warn!("envoy --mode validate still running after {:?}: SIGKILL", self.settings.reload_timeout);
                let pid = *pid;
                self.processes.signal(pid, libc::SIGKILL);
                // Its exit brings the verdict; one that not even SIGKILL ends must not hold the reload.
                let after_kill = self.schedule(REAP_AFTER_KILL_TIMEOUT);
                if let Some(Step::Validating { deadline, killed, .. }) = self.reload.busy().map(|b| &mut b.step) {
                    (*deadline, *killed) = (after_kill, true);
                }
            }
            Some(Step::Settling { checked, deadline }) if *deadline == generation => {
                let checked = checked.clone();
                self.start_next_epoch(checked);
            }
            Some(Step::CheckingVersion { pid, deadline, .. }) if *deadline == generation => {
                let pid = *pid;
                self.processes.signal(pid, libc::SIGKILL);
                let reason =
                    format!("envoy --hot-restart-version still running after {:?}", self.settings.reload_timeout);
                self.reload_refused(&reason);
            }
            Some(Step::HandingOver { .. }) => {
                self.on_handover_deadline(generation);
            }
            Some(Step::WaitingForDraining { oldest, deadline, .. }) if *deadline == generation => {
                let reason = format!("the draining epoch (pid {oldest}) outlived its parent shutdown time");
                self.reload_refused(&reason);
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
                self.reload_failed_after_start(epoch.number, format!("it exited with {exit} before it was LIVE"));
                self.resume_stop();
                true
            }
            Step::WaitingForDraining { oldest, checked, .. } if *oldest == epoch.pid => {
                let checked = checked.clone();
                if !checked.input.unchanged() {
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
                let deadline = self.schedule(settle);
                if let Some(busy) = self.reload.busy() {
                    busy.step = Step::Settling { checked, deadline };
                }
                true
            }
            _ => false,
        }
    }
}
