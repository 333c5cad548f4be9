//! What the supervisor reports: `/status` as it stands, and where Envoy's admin answers.

use std::time::{Duration, SystemTime};

use super::Supervisor;
use super::epochs::Epoch;
use super::reload_state::Step;
use super::shutdown::Phase;
use crate::clock::unix_seconds;
use crate::control::NoAdmin;
use crate::health::ProbeTarget;
use crate::http::Endpoint;
use crate::process::Processes;
use crate::status::{DrainStatus, EpochStatus, Status};

/// How long after an older epoch exits its counters may still arrive in the current one (the
/// current epoch merges them at its stats flushes, every 5 s by default).
const OLDER_EPOCH_STATS_MERGE: Duration = Duration::from_secs(10);

impl<P: Processes> Supervisor<P> {
    pub(super) fn status(&self) -> Status {
        let current_live = self.epochs.current_is_live();
        let (state, not_ready) = match self.phase {
            Phase::Running if current_live => ("running", None),
            Phase::Running => ("starting", Some(format!("epoch {} is not LIVE yet", self.epochs.current_number()))),
            Phase::Draining { .. } => ("draining", Some("draining for shutdown".to_string())),
            Phase::AwaitingNewEpoch { .. } => (
                "draining",
                Some(
                    "a reload step ends first (a new epoch starts, or an old family drains); the drain follows"
                        .to_string(),
                ),
            ),
            Phase::Stopping { .. } => ("stopping", Some("stopping".to_string())),
        };
        // The health probe compares with what Envoy reports: restart epochs, in the serving family
        // (a new family's first epoch has its own admin, so it never answers on the current one's).
        let starting = match self.reload.step() {
            Some(Step::Starting { epoch, family: None, .. }) => self.epochs.find(*epoch).map(|e| e.restart_epoch),
            _ => None,
        };
        let current_restart_epoch = self.epochs.find(self.epochs.current_number()).map_or(0, |e| e.restart_epoch);
        let probe = self.epochs.current_admin().map(|admin| ProbeTarget {
            admin,
            current: current_restart_epoch,
            starting,
            family: self.family.clone(),
            older_epoch_recently: self.epochs.older().is_some()
                || self.older_exited.is_some_and(|at| at.elapsed() < OLDER_EPOCH_STATS_MERGE),
        });
        Status {
            state,
            ready: not_ready.is_none(),
            not_ready,
            degraded: self.health.blocked().map(str::to_string),
            recovery: self.recovery.status(self.health.blocked().is_some()),
            warnings: self.health.warning().map(str::to_string).into_iter().collect(),
            certificates: self.in_place.as_ref().map(|i| i.report()),
            current_epoch: self.epochs.current_number(),
            epochs: self.epochs.iter().map(|e| self.epoch_status(e)).collect(),
            reload: self.reload.step_name(),
            last_reload: self.last_reload.clone(),
            drain: match &self.phase {
                Phase::Draining { started, progress, .. } => Some(DrainStatus {
                    elapsed_seconds: started.elapsed().as_secs_f64(),
                    connections: *progress.borrow(),
                }),
                _ => None,
            },
            envoy: None,
            probe,
        }
    }

    /// Where the serving epoch's admin answers, for the control API's read-only window on it; or
    /// why there is none.
    pub(super) fn current_admin_endpoint(&self) -> Result<Endpoint, NoAdmin> {
        if !self.launch.is_envoy() {
            return Err(NoAdmin::NotEnvoy);
        }
        match self.epochs.current_admin() {
            Some(admin) => Ok(admin.address().clone()),
            None => Err(NoAdmin::NotKnownYet { epoch: self.epochs.current_number() }),
        }
    }

    fn epoch_status(&self, epoch: &Epoch) -> EpochStatus {
        let current = self.epochs.current_number();
        let state = match epoch.number {
            n if n < current => "draining",
            n if n == current && epoch.live => "live",
            _ => "starting",
        };
        let exits_by_unix = (epoch.number < current).then(|| self.parent_told_to_exit_at()).flatten().map(unix_seconds);
        EpochStatus {
            epoch: epoch.number,
            family: epoch.family,
            restart_epoch: epoch.restart_epoch,
            pid: epoch.pid.as_raw(),
            started_unix: unix_seconds(epoch.started_at),
            state,
            exits_by_unix,
            admin: epoch.admin_client().map(|admin| admin.address().to_string()),
        }
    }

    /// When the current epoch tells its parent to exit: its start plus the parent shutdown time.
    fn parent_told_to_exit_at(&self) -> Option<SystemTime> {
        let current = self.epochs.find(self.epochs.current_number())?;
        Some(current.started_at + self.launch.envoy.as_ref()?.parent_shutdown_time)
    }
}
