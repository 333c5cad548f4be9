//! What a change of the watched files does while they settle. From the first change the watcher
//! sees, the checks run on the files as they are then, known by their content hashes; a change that
//! alters those hashes abandons them (its validator killed) and starts them again. When the
//! debounce ends, the reload (`reload::on_files_settled`) takes those checks along when they stand
//! for the files as they are now (passed: the new epoch starts at once; failed: refused as ever;
//! still running: it waits for them); otherwise it checks for itself. A new epoch still never
//! starts on input that was not checked: only the waiting moves off the critical path.

use super::Supervisor;
use super::checks::{CheckRun, Purpose};
use super::reload_state::ReloadState;
use super::shutdown::Phase;
use crate::process::Processes;

/// The checks run for the files while they settle.
#[derive(Debug, Default)]
pub(super) struct Early {
    pub run: Option<CheckRun>,
    /// Runs started in this debounce: files that keep changing must not start a validator per
    /// write (a flood of writes in a `--watch` directory started 160 a second). Zero again when
    /// the debounce ends.
    pub started: u32,
}

/// At most this many early runs per debounce (two-step writes need two); after that the reload
/// checks for itself when the debounce ends.
const STARTS_PER_DEBOUNCE: u32 = 3;

impl<P: Processes> Supervisor<P> {
    /// A watched file was touched, at the start of a debounce or during it: checks of the files as
    /// they are now start, unless the run under way may already stand for them.
    pub(super) fn on_files_changing(&mut self, touched: crate::watch::Touched) {
        self.on_secret_files_touched(touched);
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
        self.early.run = Some(self.start_checks(Purpose::WhileSettling));
    }

    #[cfg(test)]
    pub(super) fn early_checks_started(&self) -> u32 {
        self.early.started
    }

    /// Only where the debounce's end would start a hot restart of its own: a reload under way, a
    /// block (a cold handover checks more) or a stop leave the checks to it.
    fn may_check_early(&self) -> bool {
        // In place, most changes are certificates, which need no validator: a reload checks
        // for itself when the debounce ends.
        !self.rotates_in_place()
            && matches!(self.phase, Phase::Running)
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
