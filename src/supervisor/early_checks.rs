//! The checks of a reload run while the watched files settle: from the first change the watcher
//! sees, the preflight and `envoy --mode validate` run on the files as they are then, known by
//! their content hashes. A change that alters those hashes kills the validator and starts the
//! checks again. When the debounce ends, the reload takes over checks of the files as they are
//! now (passed: the new epoch starts at once; failed: refused as ever; still running: it waits for
//! them); anything else, it checks itself. A new epoch still never starts on input that was not
//! checked: only the waiting moves off the critical path.

use std::path::PathBuf;

use nix::unistd::Pid;

use super::reload_state::{Checked, ReloadReply, ReloadState, Step};
use super::shutdown::{Phase, REAP_AFTER_KILL_TIMEOUT};
use super::{Event, Generation, Supervisor};
use crate::bootstrap::Bootstrap;
use crate::process::{Exit, Processes};
use crate::reload::{self, BinaryId, Input, Preflight};
use crate::watch::WatchSpec;

/// The checks under way (or done) for the files as they were at `attempt`'s start, and the
/// validators killed because the files changed under them, until they are reaped.
#[derive(Debug, Default)]
pub(super) struct Early {
    checks: Option<EarlyChecks>,
    killed: Vec<Pid>,
    /// Checks started in this debounce: files that keep changing must not start a validator per
    /// write (a flood of writes in a `--watch` directory started 160 a second).
    started: u32,
}

/// At most this many early checks per debounce (two-step writes need two); after that the reload
/// checks for itself when the debounce ends.
const STARTS_PER_DEBOUNCE: u32 = 3;

#[derive(Debug)]
struct EarlyChecks {
    attempt: Generation,
    stage: Stage,
}

#[derive(Debug)]
enum Stage {
    /// Certificate checks, off the runtime thread; their input is compared when they report.
    Preflight,
    /// `envoy --mode validate` runs as our child; once it has `exited` (and was reaped) its pid is
    /// never signalled again: the kernel may have given it to another process.
    Validating {
        pid: Pid,
        output: PathBuf,
        checked: Checked,
        binary: Option<BinaryId>,
        deadline: Generation,
        killed: bool,
        exited: bool,
    },
    Passed {
        checked: Checked,
        binary: Option<BinaryId>,
    },
    Failed {
        input: Input,
        reason: String,
    },
}

impl Stage {
    /// The files these checks saw, once known.
    fn input(&self) -> Option<&Input> {
        match self {
            Stage::Preflight => None,
            Stage::Validating { checked, .. } | Stage::Passed { checked, .. } => Some(&checked.input),
            Stage::Failed { input, .. } => Some(input),
        }
    }
}

/// The files whose content the checks stand for: the watched ones (the `--watch` paths too: a new
/// epoch may read them in ways the bootstrap does not say), the bootstrap and every file it names.
/// Read before the checks, so that any change during them shows.
fn early_input(command: &[std::ffi::OsString], watch: &WatchSpec) -> Input {
    let mut files = watch.files();
    files.extend(crate::envoy::flag_value(command, &["-c", "--config-path"]).map(PathBuf::from));
    if let Ok(Some(bootstrap)) = Bootstrap::from_command(command) {
        files.extend(bootstrap.referenced_files());
    }
    files.sort();
    files.dedup();
    Input::read(files)
}

impl<P: Processes> Supervisor<P> {
    /// A watched file was touched, at the start of a debounce or during it: checks of the files as
    /// they are now start, unless the checks under way already stand for them.
    pub(super) fn on_files_changing(&mut self) {
        if !self.may_check_early() {
            return self.discard_early_checks();
        }
        let current = match &self.early.checks {
            // The preflight's input is compared when it reports (the change may come before or after).
            Some(checks) => checks.stage.input().is_none_or(Input::unchanged),
            None => false,
        };
        if !current {
            self.discard_early_checks();
            if self.early.started >= STARTS_PER_DEBOUNCE {
                return;
            }
            self.early.started += 1;
            tracing::debug!("a watched file changed: checking the files while they settle");
            self.spawn_early_preflight();
        }
    }

    #[cfg(test)]
    pub(super) fn early_checks_started(&self) -> u32 {
        self.early.started
    }

    /// A debounce ended, with `files` changed since the last one: a reload (which takes over the
    /// checks run meanwhile when they stand for the files), or nothing. The next debounce may start
    /// checks again.
    pub(super) fn on_files_settled(&mut self, files: Vec<PathBuf>) {
        self.early.started = 0;
        // The watcher compares with the files at its last debounce's end, but a refused reload read
        // them at another moment (a write may have been half done then): after a refusal, files
        // touched again are checked again, even when they hash as before.
        let refused = self.last_reload.as_ref().is_some_and(|r| r.result == "refused");
        let trigger = match (files.is_empty(), refused) {
            (true, false) => return self.discard_early_checks(),
            (true, true) => "touched again since the refused reload".to_string(),
            (false, _) => {
                let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
                format!("changed: {}", names.join(", "))
            }
        };
        let _ = self.request_reload(trigger, None, false, true);
    }

    /// Only where the debounce's end would start a hot restart of its own: a reload under way, a
    /// block (a cold handover checks more) or a stop leave the checks to it.
    fn may_check_early(&self) -> bool {
        matches!(self.phase, Phase::Running)
            && matches!(self.reload, ReloadState::Idle)
            && self.blocked.is_none()
            && self.launch.is_envoy()
            && self.launch.admin().is_some()
            && self.epochs.current_is_live()
    }

    fn spawn_early_preflight(&mut self) {
        let command = self.launch.command.clone();
        let watch = self.settings.watch.clone();
        let expiry_warn = self.settings.cert_expiry_warn;
        let user = self.launch.user.clone();
        let attempt = self.next_generation();
        let events = self.events.clone();
        tokio::task::spawn_blocking(move || {
            let input = early_input(&command, &watch);
            let result = reload::preflight(&command, expiry_warn, None, user.as_ref());
            let _ = events.send(Event::EarlyPreflight { attempt, input, result });
        });
        self.early.checks = Some(EarlyChecks { attempt, stage: Stage::Preflight });
    }

    pub(super) fn on_early_preflight(&mut self, attempt: Generation, input: Input, result: Result<Preflight, String>) {
        if !matches!(&self.early.checks, Some(c) if c.attempt == attempt && matches!(c.stage, Stage::Preflight)) {
            return;
        }
        if !input.unchanged() {
            return self.spawn_early_preflight();
        }
        let preflight = match result {
            Ok(preflight) => preflight,
            Err(reason) => {
                tracing::debug!("checks while the files settle failed: {reason}");
                return self.early_stage(Stage::Failed { input, reason });
            }
        };
        if preflight.binary.is_some() && self.binary.is_some() && preflight.binary != self.binary {
            // A new Envoy binary: the reload's own steps check its hot restart version first.
            self.early.checks = None;
            return;
        }
        let checked = Checked { input, admin: self.launch.admin_address(preflight.admin) };
        let argv = crate::envoy::validate_command(&self.launch.command);
        match self.spawn_with_output(&argv, "envoy-validate.log") {
            Ok((pid, output)) => {
                tracing::debug!("validating while the files settle: {}", super::shell_words(&argv));
                let deadline = self.schedule(self.settings.reload_timeout);
                let binary = preflight.binary;
                let stage = Stage::Validating { pid, output, checked, binary, deadline, killed: false, exited: false };
                self.early_stage(stage);
            }
            Err(reason) => self.early_stage(Stage::Failed { input: checked.input, reason }),
        }
    }

    fn early_stage(&mut self, stage: Stage) {
        if let Some(checks) = &mut self.early.checks {
            checks.stage = stage;
        }
    }

    /// Whether `attempt` is the early checks' (a verdict for them, not for a reload).
    pub(super) fn is_early_attempt(&self, attempt: Generation) -> bool {
        self.early.checks.as_ref().is_some_and(|c| c.attempt == attempt)
    }

    pub(super) fn on_early_validated(&mut self, result: Result<(), String>) {
        let Some(checks) = &mut self.early.checks else { return };
        let stage = std::mem::replace(&mut checks.stage, Stage::Preflight);
        checks.stage = match (stage, result) {
            (Stage::Validating { checked, binary, .. }, Ok(())) => {
                tracing::debug!("checks while the files settle passed");
                Stage::Passed { checked, binary }
            }
            (Stage::Validating { checked, .. }, Err(reason)) => {
                tracing::debug!("checks while the files settle failed: {reason}");
                Stage::Failed { input: checked.input, reason }
            }
            (other, _) => other,
        };
    }

    /// A child exited: the early validator (its verdict is read) or one killed earlier. False
    /// when it is neither.
    pub(super) fn on_early_checker_exit(&mut self, pid: Pid, exit: Exit) -> bool {
        if let Some(at) = self.early.killed.iter().position(|p| *p == pid) {
            self.early.killed.swap_remove(at);
            return true;
        }
        let Some(EarlyChecks { attempt, stage: Stage::Validating { pid: validator, output, exited, .. } }) =
            &mut self.early.checks
        else {
            return false;
        };
        if *validator != pid {
            return false;
        }
        *exited = true;
        let (attempt, output, events) = (*attempt, output.clone(), self.events.clone());
        tokio::spawn(async move {
            let result = reload::validation_verdict(exit, output).await;
            let _ = events.send(Event::Validated { attempt, result });
        });
        true
    }

    /// The early validator's deadline, as the reload's: SIGKILL at the reload timeout, failed if
    /// it is not reaped soon after. False when `generation` is not its deadline.
    pub(super) fn on_early_deadline(&mut self, generation: Generation) -> bool {
        let Some(EarlyChecks { stage: Stage::Validating { pid, deadline, killed, checked, exited, .. }, .. }) =
            &mut self.early.checks
        else {
            return false;
        };
        if *deadline != generation || *exited {
            return false;
        }
        let pid = *pid;
        if *killed {
            let reason = format!("envoy --mode validate survived SIGKILL for {REAP_AFTER_KILL_TIMEOUT:?}");
            let input = checked.input.clone();
            self.early.killed.push(pid);
            self.early_stage(Stage::Failed { input, reason });
            return true;
        }
        *killed = true;
        tracing::warn!("envoy --mode validate still running after {:?}: SIGKILL", self.settings.reload_timeout);
        self.processes.signal(pid, libc::SIGKILL);
        let after_kill = self.schedule(REAP_AFTER_KILL_TIMEOUT);
        if let Some(EarlyChecks { stage: Stage::Validating { deadline, .. }, .. }) = &mut self.early.checks {
            *deadline = after_kill;
        }
        true
    }

    /// The early checks are no longer wanted: a validator still running is killed (and reaped
    /// when it exits).
    pub(super) fn discard_early_checks(&mut self) {
        if let Some(EarlyChecks { stage: Stage::Validating { pid, exited: false, .. }, .. }) = self.early.checks.take()
        {
            self.processes.signal(pid, libc::SIGKILL);
            self.early.killed.push(pid);
        }
    }

    /// The debounce ended with a reload to start: it takes over the early checks when they stand
    /// for the files as they are now; otherwise they are discarded and the callers handed back, for
    /// a reload that checks for itself.
    pub(super) fn take_over_early_checks(
        &mut self,
        trigger: &str,
        waiters: Vec<ReloadReply>,
    ) -> Result<(), Vec<ReloadReply>> {
        let current = self.early.checks.as_ref().is_some_and(|c| c.stage.input().is_some_and(Input::unchanged));
        let Some(checks) = self.early.checks.take().filter(|_| current) else {
            self.discard_early_checks();
            return Err(waiters);
        };
        let next = self.epochs.next_number();
        let done = if matches!(checks.stage, Stage::Validating { .. }) { "validating" } else { "checked" };
        tracing::info!("{trigger}: {done} since the first change, for a hot restart to epoch {next}");
        self.systemd.reloading(&format!("hot restart to epoch {next}"));
        self.reload.begin(checks.attempt, waiters, None);
        if let Stage::Failed { reason, .. } = &checks.stage {
            self.reload_refused(reason);
            return Ok(());
        }
        if let Some(reason) = self.base_id_unknown() {
            self.early.checks = Some(checks);
            self.discard_early_checks();
            self.reload_refused(&reason);
            return Ok(());
        }
        match checks.stage {
            Stage::Validating { pid, output, checked, binary, deadline, killed, .. } => {
                if let Some(busy) = self.reload.busy() {
                    busy.binary = binary;
                    busy.step = Step::Validating { pid, output, checked, deadline, killed };
                }
            }
            Stage::Passed { checked, binary } => {
                if let Some(busy) = self.reload.busy() {
                    busy.binary = binary;
                }
                self.start_next_epoch(checked);
            }
            Stage::Failed { .. } | Stage::Preflight => {}
        }
        Ok(())
    }
}
