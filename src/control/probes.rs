//! The control API's answers about health: `/status` and `/ready` combine what the supervisor saw
//! with what Envoy's admin says now, `/healthz` and the systemd watchdog whether Envoy still answers
//! at all. The rules are in `health`; this module asks the two parties.

use super::{ControlApi, ControlRequest};
use crate::health;
use crate::status::Status;
use crate::systemd;

impl ControlApi {
    /// The supervisor's status with Envoy's own answer folded in: not ready when Envoy says
    /// otherwise, whatever the supervisor saw before. None once the supervisor is gone.
    pub(super) async fn checked_status(&self) -> Option<Status> {
        let mut status = self.ask(ControlRequest::Status).await?;
        if let Some(target) = status.probe.clone() {
            let mut answer = self.health.probe(&target).await;
            if let Ok(health) = answer.as_mut() {
                health.listeners_stopped = self.health.stopped_by_current(&target, health.listeners_stopped);
            }
            status.envoy = Some(self.health.report(&answer));
            if status.ready
                && let Err(why) = health::ready(&target, &answer)
            {
                status.ready = false;
                status.not_ready = Some(why);
            }
        }
        Some(status)
    }

    /// Liveness: the launcher runs and, when there is an admin to ask, Envoy's admin has answered
    /// within the grace period.
    pub(super) async fn liveness(&self) -> Result<(), String> {
        // A supervisor that no longer answers is finishing: the launcher still runs.
        let Some(status) = self.ask(ControlRequest::Status).await else { return Ok(()) };
        let Some(target) = status.probe else { return Ok(()) };
        let _ = self.health.probe(&target).await;
        health::alive(self.health.failing_for())
    }
}

/// Pings systemd's watchdog at half its period while the launcher is alive by the liveness rule.
pub(super) fn spawn_watchdog(api: ControlApi) {
    let Some(period) = systemd::watchdog_period() else { return };
    let interval = (period / 2).max(std::time::Duration::from_millis(10));
    tracing::info!("systemd watchdog every {period:?}: pinging every {interval:?} while Envoy answers");
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        loop {
            ticks.tick().await;
            match api.liveness().await {
                Ok(()) => systemd::ping_watchdog(),
                Err(why) => tracing::warn!("{why}: no watchdog ping"),
            }
        }
    });
}
