//! An epoch's exit: the end of the launcher (the current one), a failed reload (a starting one), or
//! a drained epoch (an older one).

use super::Supervisor;
use super::epochs::Epoch;
use super::shutdown::Phase;
use crate::drain::DrainEnd;
use crate::process::{Exit, Processes};

impl<P: Processes> Supervisor<P> {
    /// An epoch exited. The current one ends the launcher; a starting one fails the reload; an
    /// old one has finished draining, as it should.
    pub(super) fn on_epoch_exit(&mut self, epoch: Epoch, exit: Exit) -> Option<Exit> {
        let lived = epoch.started.elapsed();
        if epoch.number == self.epochs.current_number() {
            let what = if self.launch.is_envoy() { format!("Envoy epoch {}", epoch.number) } else { "child".into() };
            tracing::info!(pid = epoch.pid.as_raw(), "{what} exited with {exit} after {lived:.1?}");
            if matches!(self.phase, Phase::Draining { .. }) {
                self.end_drain(DrainEnd::EnvoyExited);
            }
            // A reload cannot outlive the epoch it would replace: its callers hear so now, not
            // after the wait for the processes left behind.
            self.cancel_reload();
            return Some(exit);
        }
        if let Phase::Stopping { stop_signal, .. } = self.phase {
            // The newest epoch got the SIGTERM; if it died before telling its parent to terminate
            // (a SIGTERM before its handlers were installed does that), the parent is next.
            self.epochs.stop_newest(&mut self.processes, stop_signal);
        }
        if epoch.number < self.epochs.current_number() && epoch.family == self.epochs.current_family() {
            self.older_exited = Some(tokio::time::Instant::now());
            self.on_draining_epoch_exit(&epoch, exit);
        }
        if self.on_reload_epoch_exit(&epoch, exit) {
            return None;
        }
        if exit == Exit::Code(0) {
            tracing::info!(pid = epoch.pid.as_raw(), "epoch {} drained and exited after {lived:.1?}", epoch.number)
        } else {
            tracing::warn!(pid = epoch.pid.as_raw(), "epoch {} exited with {exit} after {lived:.1?}", epoch.number)
        }
        None
    }
}
