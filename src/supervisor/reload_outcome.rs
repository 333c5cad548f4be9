//! How a reload ends: refused before anything started, failed after a new epoch started (which
//! blocks Envoy's hot restart), done, or cancelled by a shutdown; its callers are answered, the
//! queued trigger starts, and while hot restarts are blocked the recovery is armed.

use super::Supervisor;
use super::reload_state::Step;
use crate::clock::unix_seconds;
use crate::process::Processes;
use crate::reload::Refusal;
use crate::status::ReloadStatus;

impl<P: Processes> Supervisor<P> {
    /// A reload that failed before any process was started: nothing changed, the next may succeed.
    pub(super) fn reload_refused(&mut self, reason: &str) {
        let what = if self.reload.is_cold() { "cold handover" } else { "hot restart" };
        tracing::error!("{what} refused, epoch {} keeps serving: {reason}", self.epochs.current_number());
        self.reload_ended("refused", Err(Refusal::Invalid(reason.to_string())), format!("reload refused: {reason}"));
    }

    /// Records how a reload ended, answers its callers, and starts the queued one or tells systemd.
    pub(super) fn reload_ended(&mut self, result: &'static str, outcome: Result<u32, Refusal>, status: String) {
        let handover = self.reload.busy().and_then(|busy| Some((busy.cold.clone()?, busy.started.elapsed())));
        if outcome.is_ok()
            && let Some(binary) = self.reload.busy().and_then(|busy| busy.binary.take())
        {
            // The binary this epoch runs is the one whose hot restart the next reload must match.
            self.binary = Some(binary);
        }
        self.record_reload(result, &outcome);
        if let Some((why, took)) = handover {
            self.record_recovery(result, &outcome, why, took);
        }
        match self.reload.finish(&outcome) {
            Some(queued) => {
                let cold = queued.cold.or_else(|| self.cold_while_blocked("the queued trigger"));
                self.start_reload("queued trigger", queued.waiters, cold)
            }
            None if self.blocked.is_some() => {
                let why = self.blocked.clone().unwrap_or_default();
                self.systemd.ready(&format!("degraded: {why}"));
                self.schedule_recovery();
            }
            None => self.systemd.ready(&status),
        }
    }

    pub(super) fn record_reload(&mut self, result: &'static str, outcome: &Result<u32, Refusal>) {
        self.metrics.reload(result);
        let detail = match outcome {
            Ok(epoch) => format!("epoch {epoch}"),
            Err(refusal) => refusal.to_string(),
        };
        self.last_reload = Some(ReloadStatus { result, detail, at_unix: unix_seconds(std::time::SystemTime::now()) });
    }

    /// A new epoch failed after it started: the serving epoch is never signalled, but Envoy's hot
    /// restart is now blocked (its shared memory says a child is still initializing) and the
    /// serving epoch may have lost its admin API. The way out is a cold handover to a new family
    /// (after the recovery backoff, or at once for the next trigger); with --no-recover, hot
    /// restarts are refused until the launcher restarts.
    pub(super) fn reload_failed_after_start(&mut self, epoch: u32, reason: String) {
        if self.reload.is_cold() {
            return self.new_family_failed(epoch, reason);
        }
        let current = self.epochs.current_number();
        let way_out = if self.settings.recover.enabled {
            "until a cold handover to a new Envoy family"
        } else {
            "until a cold start (restart sesame; --no-recover is set)"
        };
        let why = format!(
            "epoch {epoch} failed ({reason}); Envoy's hot restart is blocked {way_out}, and epoch {current}'s admin \
             API may be gone"
        );
        tracing::error!("degraded: {why}; epoch {current} keeps serving");
        self.metrics.degraded.set(1);
        let failure = Refusal::Failed(why.clone());
        self.record_reload("failed", &Err(failure.clone()));
        self.systemd.ready(&format!("degraded: {why}"));
        let queued = self.reload.block(failure);
        let blocked = Err(Refusal::Blocked(why.clone()));
        queued.into_iter().for_each(|w| super::reload_state::answer(Some(w), &blocked));
        self.blocked = Some(why);
        self.schedule_recovery();
    }

    /// The launcher shuts down: the reload under way ends, and its callers hear why.
    pub(super) fn cancel_reload(&mut self) {
        self.discard_early_checks();
        let cold = self.reload.is_cold();
        match self.reload.cancel() {
            Some(Step::Validating { pid, .. }) => self.processes.signal(pid, libc::SIGKILL),
            Some(Step::Starting { poll, pid, .. }) => {
                if let Some(poll) = poll {
                    poll.abort();
                }
                // A new family serves nobody yet, and shares nothing with the serving one.
                if cold {
                    self.processes.signal(pid, libc::SIGKILL);
                }
            }
            Some(Step::HandingOver { drain: Some(drain), .. }) => drain.abort(),
            _ => {}
        }
        self.recovery.cancel_timer();
    }
}
