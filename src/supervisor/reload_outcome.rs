//! How a reload ends: the new epoch LIVE (or not), refused before anything started, failed after
//! a new epoch started (which blocks Envoy's hot restart), or cancelled by a shutdown; its callers
//! are answered, the queued trigger starts, and while hot restarts are blocked the recovery is
//! armed.

use super::Supervisor;
use super::reload_state::{Step, answer};
use crate::admin::NotLive;
use crate::clock::unix_seconds;
use crate::http::Endpoint;
use crate::outcome::{Refusal, ReloadResult};
use crate::process::Processes;
use crate::status::ReloadStatus;

impl<P: Processes> Supervisor<P> {
    /// The LIVE poll `live_poll` of `epoch` ended: the launcher is ready (epoch 0, or the current
    /// epoch once more), a new epoch takes over, or it failed.
    pub(super) fn on_epoch_live(
        &mut self,
        epoch: u32,
        live_poll: super::Generation,
        result: Result<Endpoint, NotLive>,
    ) {
        if let Ok(endpoint) = &result {
            self.epochs.answered_on(epoch, endpoint.clone());
        }
        if epoch == self.epochs.current_number() && result.is_ok() {
            if let Some(serving) = self.epochs.mark_live(epoch, &mut self.processes) {
                tracing::info!(pid = serving.pid.as_raw(), "Envoy epoch {epoch} is LIVE");
                self.systemd.ready(&format!("serving: epoch {epoch} is LIVE"));
            }
            self.learn_base_id();
            if let Some(waiters) = self.reload.release_held() {
                let cold = self.cold_while_blocked("the held trigger");
                self.start_reload(&format!("epoch {epoch} is LIVE; the held trigger"), waiters, cold);
            }
            return;
        }
        let Some(busy) = self.reload.busy() else { return };
        let Step::Starting { epoch: starting, pid, live_poll: expected, ref family, .. } = busy.step else { return };
        if starting != epoch || live_poll != expected {
            return;
        }
        if let Some(new_family) = family.clone() {
            return self.on_new_family_live(epoch, pid, new_family, result);
        }
        match result {
            Ok(_) => {
                tracing::info!(
                    pid = pid.as_raw(),
                    "hot restart done: epoch {epoch} is LIVE, {:.2?} after the trigger; epoch {} drains and exits on its own",
                    busy.started.elapsed(),
                    self.epochs.current_number()
                );
                self.epochs.promote(epoch, &mut self.processes);
                self.forget_lost_parent();
                self.metrics.current_epoch.set(i64::from(epoch));
                self.reload_ended(ReloadResult::Success, Ok(epoch), format!("epoch {epoch} is LIVE"));
                self.resume_stop();
            }
            Err(reason) => {
                // Never SIGTERM a new epoch: Envoy's shutdown would take its parent, the serving
                // epoch, down with it. SIGKILL ends it alone.
                self.processes.signal(pid, libc::SIGKILL);
                self.reload_failed_after_start(epoch, reason);
                self.resume_stop();
            }
        }
    }

    /// A reload that ended before any process was started: nothing changed, the next may succeed.
    pub(super) fn reload_refused(&mut self, refusal: Refusal) {
        let what = if self.reload.is_cold() { "cold handover" } else { "hot restart" };
        let current = self.epochs.current_number();
        tracing::error!(refusal = refusal.label(), "{what} refused, epoch {current} keeps serving: {refusal}");
        let status = format!("reload refused: {refusal}");
        self.reload_ended(ReloadResult::Refused, Err(refusal), status);
    }

    /// Records how a reload ended, answers its callers, and starts the queued one or tells systemd.
    pub(super) fn reload_ended(&mut self, result: ReloadResult, outcome: Result<u32, Refusal>, status: String) {
        self.new_epoch_serves(outcome.is_ok());
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
            None => match self.health.blocked().map(str::to_string) {
                Some(why) => {
                    self.systemd.ready(&format!("degraded: {why}"));
                    self.schedule_recovery();
                }
                None => self.systemd.ready(&status),
            },
        }
    }

    pub(super) fn record_reload(&mut self, result: ReloadResult, outcome: &Result<u32, Refusal>) {
        self.metrics.reload(result.label());
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
    pub(super) fn reload_failed_after_start(&mut self, epoch: u32, reason: NotLive) {
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
        let failure = Refusal::Failed(why.clone());
        self.record_reload(ReloadResult::Failed, &Err(failure.clone()));
        self.block_hot_restarts(why.clone());
        self.systemd.ready(&format!("degraded: {why}"));
        let queued = self.reload.block(failure);
        if self.settings.recover.enabled && !queued.is_empty() {
            // The queued callers asked for their files to be served: they wait for the way out, a
            // cold handover, which starts now (the recovery's first attempt would, too).
            let cold = self.cold_while_blocked("the queued trigger");
            return self.start_reload("the queued trigger", queued, cold);
        }
        let blocked = Err(Refusal::Blocked(why));
        queued.into_iter().for_each(|w| answer(Some(w), &blocked));
        self.schedule_recovery();
    }

    /// The launcher shuts down: the reload under way ends, and its callers hear why.
    pub(super) fn cancel_reload(&mut self) {
        self.discard_early_checks();
        let cold = self.reload.is_cold();
        match self.reload.cancel() {
            Some(Step::Checking(run)) => self.abandon_checks(run),
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
