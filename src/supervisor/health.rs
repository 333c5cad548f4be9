//! The health of Envoy's hot restart, in one place: serving as it should, doomed because the
//! current epoch's draining parent ended early, or blocked until a cold handover. One setter keeps
//! the metrics, `/status` and systemd's STATUS in step with it; this file also decides what a
//! draining epoch's early end means.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::Supervisor;
use super::epochs::Epoch;
use super::shutdown::Phase;
use super::trigger::Trigger;
use crate::bootstrap::DEFAULT_STATS_FLUSH;
use crate::clock::unix_seconds;
use crate::process::{Exit, Processes};

/// How long Envoy's current epoch retries before it aborts when its parent is gone
/// (docs/ARCHITECTURE.md, "Envoy facts").
const ORPHANED_EPOCH_BLOCK: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HotRestartHealth {
    /// The next reload can be a hot restart.
    #[default]
    Serving,
    /// The current epoch's draining parent ended early: the current epoch will fail to reach it and
    /// abort at about `abort_at` (`abort_by` on the wall clock), so hot restarts are blocked (`why`)
    /// and a new family must serve before then. `warning` says all that to the operator.
    ParentLost { warning: String, why: String, abort_at: Instant, abort_by: SystemTime },
    /// A new epoch failed after it started: Envoy refuses every hot restart until a cold start.
    Blocked { why: String },
}

impl HotRestartHealth {
    /// Why hot restarts are blocked, if they are.
    pub fn blocked(&self) -> Option<&str> {
        match self {
            HotRestartHealth::Serving => None,
            HotRestartHealth::ParentLost { why, .. } | HotRestartHealth::Blocked { why } => Some(why),
        }
    }

    /// What will happen, and when, that the operator should know about now.
    pub fn warning(&self) -> Option<&str> {
        match self {
            HotRestartHealth::ParentLost { warning, .. } => Some(warning),
            _ => None,
        }
    }

    /// When the current epoch will abort, if it will.
    pub fn abort_at(&self) -> Option<Instant> {
        match self {
            HotRestartHealth::ParentLost { abort_at, .. } => Some(*abort_at),
            _ => None,
        }
    }

    /// Blocked for `why`; a lost parent stays what it is (its epoch still aborts), blocked now for `why`.
    fn blocked_for(self, why: String) -> HotRestartHealth {
        match self {
            HotRestartHealth::ParentLost { warning, abort_at, abort_by, .. } => {
                HotRestartHealth::ParentLost { warning, why, abort_at, abort_by }
            }
            _ => HotRestartHealth::Blocked { why },
        }
    }
}

impl<P: Processes> Supervisor<P> {
    /// The one setter: the metrics, and systemd's STATUS when it is not good news (the callers
    /// that bring good news send READY with their own words).
    pub(super) fn set_health(&mut self, health: HotRestartHealth) {
        self.metrics.degraded.set(i64::from(health.blocked().is_some()));
        let abort_by = match &health {
            HotRestartHealth::ParentLost { abort_by, .. } => unix_seconds(*abort_by) as i64,
            _ => 0,
        };
        self.metrics.expected_abort.set(abort_by);
        match &health {
            HotRestartHealth::ParentLost { warning, .. } => self.systemd.status(warning),
            HotRestartHealth::Blocked { why } => self.systemd.status(&format!("degraded: {why}")),
            HotRestartHealth::Serving => {}
        }
        self.health = health;
    }

    /// Hot restarts are blocked for `why` (a new epoch failed after it started).
    pub(super) fn block_hot_restarts(&mut self, why: String) {
        let health = std::mem::take(&mut self.health).blocked_for(why);
        self.set_health(health);
    }

    /// A new epoch serves in the same family: what was said about the one before no longer holds,
    /// but a block stays until a cold handover.
    pub(super) fn forget_lost_parent(&mut self) {
        if let HotRestartHealth::ParentLost { why, .. } = &self.health {
            let why = why.clone();
            self.set_health(HotRestartHealth::Blocked { why });
        }
    }

    /// A draining epoch exited. At its time (told to by its successor) that is the end of a hot
    /// restart; before it, Envoy's current epoch will find its parent gone at its next stats flush
    /// (it merges the parent's stats), retry for 10 s and abort: said at once, with when, and a new
    /// family is started at once (no backoff), since the current epoch cannot be hot-restarted.
    pub(super) fn on_draining_epoch_exit(&mut self, epoch: &Epoch, exit: Exit) {
        // While the launcher stops, the newest epoch tells its parent to exit: that is no loss.
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        let Some(current) = self.epochs.find(self.epochs.current_number()) else { return };
        let Some(envoy) = &self.launch.envoy else { return };
        // Within a second of the time it is told, the exit is the normal one.
        let told_at = current.started + envoy.parent_shutdown_time;
        if told_at.saturating_duration_since(Instant::now()) <= Duration::from_secs(1) {
            return;
        }
        let flush = self.launch.envoy.as_ref().map_or(DEFAULT_STATS_FLUSH, |e| e.stats_flush_interval);
        let abort_by = SystemTime::now() + flush + ORPHANED_EPOCH_BLOCK;
        let abort_at = Instant::now() + flush + ORPHANED_EPOCH_BLOCK;
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
        let why = format!("draining epoch {} ended early and epoch {current} will abort", epoch.number);
        self.set_health(HotRestartHealth::ParentLost { warning, why, abort_at, abort_by });
        if self.settings.recover.enabled {
            let _ = self.request_reload(Trigger::ParentLost { epoch: epoch.number });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_parent_blocked_again_keeps_its_abort_and_forgetting_it_keeps_the_block() {
        let (abort_at, abort_by) = (Instant::now(), SystemTime::now());
        let lost = HotRestartHealth::ParentLost { warning: "w".into(), why: "lost".into(), abort_at, abort_by };
        let blocked = lost.clone().blocked_for("failed".into());
        assert_eq!(
            (blocked.blocked(), blocked.warning(), blocked.abort_at()),
            (Some("failed"), Some("w"), Some(abort_at))
        );
        let plain = HotRestartHealth::Serving.blocked_for("failed".into());
        assert_eq!((plain.blocked(), plain.warning(), plain.abort_at()), (Some("failed"), None, None));
        assert_eq!(HotRestartHealth::Serving.blocked(), None);
    }
}
