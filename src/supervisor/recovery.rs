//! Recovery from a blocked hot restart without a person: while Envoy's hot restart is blocked (a
//! new epoch failed, or the draining epoch died before its time), a cold handover to a new Envoy
//! family is tried at once, then after a backoff that doubles from `--recover-backoff` to
//! `--recover-backoff-max`, and starts over once a handover succeeds. At once, because a new epoch
//! that failed may already have told the serving one to stop listening (Envoy does that as the new
//! epoch turns LIVE, before sesame can see it): then nothing serves until a new family does.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::trigger::Trigger;
use super::{Generation, RecoverSettings, Supervisor};
use crate::clock::unix_seconds;
use crate::outcome::{Refusal, ReloadResult};
use crate::process::Processes;
use crate::status::{RecoveryStatus, ReloadStatus};

#[derive(Debug)]
pub struct Recovery {
    settings: RecoverSettings,
    /// The delay before the next attempt.
    next_delay: Duration,
    /// The armed timer and when it fires.
    timer: Option<(Generation, Instant)>,
    /// Cold handovers that did not succeed since the last one that did.
    failures: u32,
    pub last: Option<ReloadStatus>,
}

impl Recovery {
    pub fn new(settings: &RecoverSettings) -> Recovery {
        Recovery { settings: settings.clone(), next_delay: Duration::ZERO, timer: None, failures: 0, last: None }
    }

    /// Whether `generation` is the recovery's timer (which is then disarmed).
    pub fn due(&mut self, generation: Generation) -> bool {
        if self.timer.is_some_and(|(armed, _)| armed == generation) {
            self.timer = None;
            return true;
        }
        false
    }

    pub fn cancel_timer(&mut self) {
        self.timer = None;
    }

    /// The delay for the next attempt (none for the first); the one after is twice as long (at
    /// least the backoff), up to the maximum.
    fn take_delay(&mut self) -> Duration {
        let delay = self.next_delay;
        self.next_delay = (delay * 2).min(self.settings.backoff_max).max(self.settings.backoff);
        delay
    }

    fn succeeded(&mut self) {
        self.failures = 0;
        self.next_delay = Duration::ZERO;
    }

    pub fn status(&self, blocked: bool) -> Option<RecoveryStatus> {
        if !blocked && self.last.is_none() {
            return None;
        }
        Some(RecoveryStatus {
            enabled: self.settings.enabled,
            next_attempt_in_seconds: self
                .timer
                .map(|(_, at)| at.saturating_duration_since(Instant::now()).as_secs_f64()),
            failures_in_a_row: self.failures,
            last: self.last.clone(),
        })
    }
}

impl<P: Processes> Supervisor<P> {
    /// Arms the recovery timer while hot restarts are blocked, unless it is armed, a reload is
    /// under way (its end comes back here), the launcher stops, or recovery is off.
    pub(super) fn schedule_recovery(&mut self) {
        let blocked = self.health.blocked().is_some();
        let idle = !matches!(self.reload, super::ReloadState::Busy(_));
        let running = matches!(self.phase, super::Phase::Running);
        if !self.settings.recover.enabled || !blocked || !idle || !running || self.recovery.timer.is_some() {
            return;
        }
        let delay = self.recovery.take_delay();
        let generation = self.timers.schedule(delay);
        self.recovery.timer = Some((generation, Instant::now() + delay));
        tracing::info!("recovery: a cold handover to a new Envoy family in {delay:?}");
    }

    /// The recovery timer fired: a cold handover now.
    pub(super) fn recover_now(&mut self) {
        let Some(why) = self.health.blocked().map(str::to_string) else { return };
        let _ = self.request_reload(Trigger::Recovery { why });
    }

    /// Records how a cold handover ended (`why` it ran, how long it took).
    pub(super) fn record_recovery(
        &mut self,
        result: ReloadResult,
        outcome: &Result<u32, Refusal>,
        why: String,
        took: Duration,
    ) {
        self.metrics.recovery(result.label());
        let detail = match outcome {
            Ok(epoch) => format!("epoch {epoch} serves, {:.1}s after the trigger ({why})", took.as_secs_f64()),
            Err(refusal) => format!("{refusal} ({why})"),
        };
        if result == ReloadResult::Success {
            self.recovery.succeeded();
        } else {
            self.recovery.failures += 1;
        }
        self.recovery.last = Some(ReloadStatus { result, detail, at_unix: unix_seconds(SystemTime::now()) });
    }
}
