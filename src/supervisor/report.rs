//! What the supervisor reports: `/status` as it stands, and what a draining epoch's early end
//! means for the epoch that serves.

use std::time::{Duration, SystemTime};

use super::Supervisor;
use super::epochs::Epoch;
use super::reload_state::Step;
use super::shutdown::Phase;
use crate::bootstrap::DEFAULT_STATS_FLUSH;
use crate::clock::unix_seconds;
use crate::health::ProbeTarget;
use crate::http::Endpoint;
use crate::process::{Exit, Processes};
use crate::status::{DrainStatus, EpochStatus, Status};

/// How long Envoy's current epoch retries before it aborts when its parent is gone
/// (docs/ARCHITECTURE.md, "Envoy facts").
const ORPHANED_EPOCH_BLOCK: Duration = Duration::from_secs(10);

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
            degraded: self.blocked.clone(),
            recovery: self.recovery.status(self.blocked.is_some()),
            warnings: self.lost_parent.iter().cloned().collect(),
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
    pub(super) fn current_admin_endpoint(&self) -> Result<Endpoint, String> {
        if !self.launch.is_envoy() {
            return Err("the command is not Envoy: there is no admin to read".into());
        }
        let current = self.epochs.current_number();
        match self.epochs.current_admin() {
            Some(admin) => Ok(admin.address().clone()),
            None => Err(format!("the admin address of Envoy's epoch {current} is not known yet")),
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

    /// A draining epoch exited. At its time (told to by its successor) that is the end of a hot
    /// restart; before it, Envoy's current epoch will find its parent gone at its next stats flush
    /// (it merges the parent's stats), retry for 10 s and abort: said at once, with when.
    pub(super) fn on_draining_epoch_exit(&mut self, epoch: &Epoch, exit: Exit) {
        // While the launcher stops, the newest epoch tells its parent to exit: that is no loss.
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        let Some(current) = self.epochs.find(self.epochs.current_number()) else { return };
        let Some(envoy) = &self.launch.envoy else { return };
        // Within a second of the time it is told, the exit is the normal one.
        let told_at = current.started + envoy.parent_shutdown_time;
        let early = told_at.saturating_duration_since(tokio::time::Instant::now()) > Duration::from_secs(1);
        if !early {
            return;
        }
        let flush = self.launch.envoy.as_ref().map_or(DEFAULT_STATS_FLUSH, |e| e.stats_flush_interval);
        let abort_by = SystemTime::now() + flush + ORPHANED_EPOCH_BLOCK;
        self.expected_abort = Some(tokio::time::Instant::now() + flush + ORPHANED_EPOCH_BLOCK);
        let current = self.epochs.current_number();
        let warning = format!(
            "draining epoch {} ended early ({exit}): Envoy's epoch {current} will fail to reach it at its next \
             stats flush (within {}s), retry for {}s and abort, by about {}; a hot restart before then fails too",
            epoch.number,
            flush.as_secs(),
            ORPHANED_EPOCH_BLOCK.as_secs(),
            humantime::format_rfc3339_seconds(abort_by),
        );
        tracing::error!("{warning}");
        self.metrics.draining_epochs_lost.inc();
        self.metrics.expected_abort.set(unix_seconds(abort_by) as i64);
        self.systemd.status(&warning);
        self.lost_parent = Some(warning.clone());
        // The current epoch is doomed and cannot be hot-restarted: a new family must serve before it
        // aborts, so no backoff.
        self.blocked = Some(format!("draining epoch {} ended early and epoch {current} will abort", epoch.number));
        self.metrics.degraded.set(1);
        if self.settings.recover.enabled {
            let _ = self.request_reload(format!("draining epoch {} ended early", epoch.number), None, true, false);
        }
    }

    /// A new epoch serves: what was said about the one before no longer holds.
    pub(super) fn forget_lost_parent(&mut self) {
        self.expected_abort = None;
        if self.lost_parent.take().is_some() {
            self.metrics.expected_abort.set(0);
        }
    }
}
