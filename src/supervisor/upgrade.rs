//! An upgraded Envoy binary: when the file a reload would run is not the one the serving epoch
//! runs, `envoy --hot-restart-version` (as our child, reaped as any other) says whether a hot
//! restart can work. Envoy refuses one across different versions and blocks until a cold start;
//! sesame turns such a reload into a cold handover before anything is started.

use super::reload_state::{Checked, Step};
use super::{Generation, Supervisor};
use crate::process::Processes;

impl<P: Processes> Supervisor<P> {
    pub(super) fn check_hot_restart_version(&mut self, attempt: Generation, checked: Checked) {
        let Some(program) = self.launch.command.first().cloned() else { return };
        let argv = vec![program.clone(), "--hot-restart-version".into()];
        match self.spawn_with_output(&argv, "envoy-hot-restart-version.log") {
            Ok((pid, output)) => {
                tracing::info!(
                    "the Envoy binary {} is not the one that serves: checking its hot restart version",
                    program.to_string_lossy()
                );
                let deadline = self.schedule(self.settings.reload_timeout);
                if let Some(busy) = self.reload.attempt(attempt) {
                    busy.step = Step::CheckingVersion { pid, output, checked, deadline };
                }
            }
            Err(e) => self.reload_refused(&e),
        }
    }

    /// Compatible: the reload goes on as a hot restart; not: as a cold handover, for that reason.
    pub(super) fn on_version_checked(&mut self, attempt: Generation, result: Result<Option<String>, String>) {
        let Some(busy) = self.reload.attempt(attempt) else { return };
        let Step::CheckingVersion { checked, .. } = &busy.step else { return };
        let checked = checked.clone();
        match result {
            Ok(None) => {
                tracing::info!("the new Envoy binary's hot restart version matches: a hot restart");
                self.spawn_validator(attempt, checked);
            }
            Ok(Some(why)) => {
                tracing::warn!("{why}: a cold handover to a new Envoy family instead of a hot restart");
                busy.cold = Some(why);
                self.spawn_validator(attempt, checked);
            }
            Err(reason) => self.reload_refused(&reason),
        }
    }
}
