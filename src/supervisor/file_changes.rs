//! What a change of the watched files does. From the first change the watcher sees, the checks run
//! on the files as they are then, known by their content hashes; a change that alters those hashes
//! abandons them (its validator killed) and starts them again. When the debounce ends, the reload
//! it triggers brings those checks along when they stand for the files as they are now (passed:
//! the new epoch starts at once; failed: refused as ever; still running: it waits for them);
//! otherwise the reload checks for itself. A new epoch still never starts on input that was not
//! checked: only the waiting moves off the critical path.

use std::path::PathBuf;

use super::Supervisor;
use super::checks::CheckRun;
use super::reload_state::ReloadState;
use super::shutdown::Phase;
use super::trigger::Trigger;
use crate::outcome::ReloadResult;
use crate::process::Processes;

/// The checks run for the files while they settle.
#[derive(Debug, Default)]
pub(super) struct Early {
    pub run: Option<CheckRun>,
    /// Runs started in this debounce: files that keep changing must not start a validator per
    /// write (a flood of writes in a `--watch` directory started 160 a second).
    started: u32,
}

/// At most this many early runs per debounce (two-step writes need two); after that the reload
/// checks for itself when the debounce ends.
const STARTS_PER_DEBOUNCE: u32 = 3;

impl<P: Processes> Supervisor<P> {
    /// A watched file was touched, at the start of a debounce or during it: checks of the files as
    /// they are now start, unless the run under way may already stand for them.
    pub(super) fn on_files_changing(&mut self) {
        if !self.may_check_early() {
            return self.discard_early_checks();
        }
        if self.early.run.as_ref().is_some_and(CheckRun::may_stand_for_current_files) {
            return;
        }
        self.discard_early_checks();
        if self.early.started >= STARTS_PER_DEBOUNCE {
            return;
        }
        self.early.started += 1;
        tracing::debug!("a watched file changed: checking the files while they settle");
        self.early.run = Some(self.start_checks(false));
    }

    #[cfg(test)]
    pub(super) fn early_checks_started(&self) -> u32 {
        self.early.started
    }

    /// A debounce ended, with `changed` files since the last one: a reload (which brings the checks
    /// run meanwhile when they stand for the files as they are now), or nothing. The next debounce
    /// may start checks again.
    pub(super) fn on_files_settled(&mut self, changed: Vec<PathBuf>) {
        self.early.started = 0;
        // The watcher compares with the files at its last debounce's end, but a refused reload read
        // them at another moment (a write may have been half done then): after a refusal, files
        // touched again are checked again, even when they hash as before.
        let refused = self.last_reload.as_ref().is_some_and(|r| r.result == ReloadResult::Refused);
        if changed.is_empty() && !refused {
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

    /// Only where the debounce's end would start a hot restart of its own: a reload under way, a
    /// block (a cold handover checks more) or a stop leave the checks to it.
    fn may_check_early(&self) -> bool {
        matches!(self.phase, Phase::Running)
            && matches!(self.reload, ReloadState::Idle)
            && self.health.blocked().is_none()
            && self.launch.is_envoy()
            && self.launch.admin().is_some()
            && self.epochs.current_is_live()
    }

    /// The early checks are no longer wanted.
    pub(super) fn discard_early_checks(&mut self) {
        if let Some(run) = self.early.run.take() {
            self.abandon_checks(run);
        }
    }
}
