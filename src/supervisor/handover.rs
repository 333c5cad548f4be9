//! The cold handover: when Envoy's hot restart is blocked (or by hand), a new Envoy family (a fresh
//! base id, restart epoch 0, the same command) starts beside the serving one. Its listeners bind
//! the same ports (Envoy sets SO_REUSEPORT on them), its admin is on a private socket, since the old
//! family still holds the configured address. Once it is LIVE it serves; the old family is drained
//! through its admin and stopped; then one ordinary hot restart of the new family puts its admin
//! back on the configured address. docs/ARCHITECTURE.md, "The cold handover", has the why.

use std::time::Duration;

use nix::unistd::Pid;
use tokio::time::Instant;

use super::checks::Verdict;
use super::epochs::Epoch;
use super::health::HotRestartHealth;
use super::reload_state::Step;
use super::shutdown::Phase;
use super::timers::{KillStep, KillTimer, REAP_AFTER_KILL_TIMEOUT};
use super::{Event, Generation, Supervisor, shell_words};
use crate::admin::{AdminAddress, Family, NotLive};
use crate::drain::{self, DrainEnd};
use crate::http::Endpoint;
use crate::outcome::{Refusal, ReloadResult};
use crate::process::{Exit, Processes};

/// Envoy's current epoch aborts this long after its stats flush finds its parent gone; the old
/// family's drain must be over before.
const BEFORE_ABORT: Duration = Duration::from_secs(2);

impl<P: Processes> Supervisor<P> {
    /// Starts restart epoch 0 of a new family, with its admin on a private socket.
    pub(super) fn start_new_family(&mut self, verdict: Verdict) {
        if !verdict.input.unchanged() {
            tracing::info!(
                "the files changed since they were checked: checking them again before the new family starts"
            );
            return self.preflight_again();
        }
        if let Some(prepared) = &verdict.sds
            && let Err(e) = self.write_epoch_secrets(prepared)
        {
            return self.reload_refused(Refusal::Fault(format!("{e:#}")));
        }
        let Some(envoy) = &self.launch.envoy else { return };
        let number = self.families;
        let family = self.launch.family(number);
        let admin_socket = private_admin(&envoy.envoy_dir, number);
        forget_files(&family, &admin_socket);
        let argv = match self.launch.handover_argv(&family, &admin_socket) {
            Ok(argv) => argv,
            Err(e) => return self.reload_refused(Refusal::Invalid(e.to_string())),
        };
        let pid = match self.processes.spawn(&argv, false, None) {
            Ok(pid) => pid,
            Err(e) => return self.reload_refused(Refusal::Fault(e.to_string())),
        };
        self.families += 1;
        let epoch = self.epochs.next_number();
        tracing::info!(
            pid = pid.as_raw(),
            "cold handover: started epoch {epoch} (family {number}, restart epoch 0, admin on unix:{}): {}",
            admin_socket.display(),
            shell_words(&argv)
        );
        let admin = AdminAddress::At(Endpoint::Unix(admin_socket));
        self.epochs.add(Epoch::new(epoch, pid, false).in_family(number, 0).with_admin(Some(admin)));
        self.metrics.epochs_started.inc();
        self.metrics.live_epochs.set(self.epochs.len() as i64);
        let (live_poll, poll) = self.poll_live(epoch, family.clone(), Some(self.settings.reload_timeout));
        if let Some(busy) = self.reload.busy() {
            busy.step = Step::Starting { epoch, pid, poll, live_poll, family: Some((family, verdict)) };
        }
    }

    /// The new family's first epoch answered its LIVE poll (or did not): it serves from now on, and
    /// the old family drains; or it is ended, and the old family serves on.
    pub(super) fn on_new_family_live(
        &mut self,
        epoch: u32,
        pid: Pid,
        (mut family, verdict): (Family, Verdict),
        result: Result<Endpoint, NotLive>,
    ) {
        let Some(started) = self.reload.busy().map(|busy| busy.started) else { return };
        if let Err(reason) = result {
            // Nothing depends on it: a new family shares no memory and no socket with the old one.
            self.processes.signal(pid, libc::SIGKILL);
            self.new_family_failed(epoch, reason);
            self.resume_stop();
            return;
        }
        family.base_id = self.launch.base_id(&family);
        let old = std::mem::replace(&mut self.family, family);
        let previous = self.epochs.current_number();
        self.epochs.promote(epoch, &mut self.processes);
        self.metrics.current_epoch.set(i64::from(epoch));
        self.set_health(HotRestartHealth::Serving);
        tracing::info!(
            pid = pid.as_raw(),
            "cold handover: epoch {epoch} (a new Envoy family) is LIVE {:.2?} after the trigger and serves beside \
             epoch {previous}; its statistics start from zero; the old family drains now",
            started.elapsed()
        );
        self.systemd.ready(&format!("serving: epoch {epoch} (new family) is LIVE; the old family drains"));
        self.drain_old_family(old, verdict, started.elapsed());
        self.resume_stop();
    }

    /// Drains the old family through the admin of its newest epoch, bounded by the drain timeout
    /// and, when its epoch lost its parent, by the time it will abort.
    fn drain_old_family(&mut self, old: Family, verdict: Verdict, served_after: Duration) {
        let newest = self.epochs.of_older_families().max_by_key(|e| e.number);
        let admin = newest.and_then(Epoch::admin_client);
        let older_alive = self.epochs.of_older_families().count() > 1;
        let mut until = Instant::now() + self.settings.drain.timeout;
        if let Some(abort) = self.health.abort_at() {
            until = until.min(abort.checked_sub(BEFORE_ABORT).unwrap_or(abort));
        }
        let Some(attempt) = self.reload.busy().map(|busy| busy.attempt) else { return };
        if self.settings.recover.migrate_queued_connections {
            crate::ports::migrate_queued_connections();
        }
        let drain = admin.map(|admin| {
            let (settings, events) = (self.settings.drain.clone(), self.events.clone());
            tokio::spawn(async move {
                let end = drain::old_family(admin, settings, older_alive, until).await;
                let _ = events.send(Event::FamilyDrained { attempt, end });
            })
        });
        let drained = drain.is_some();
        if let Some(busy) = self.reload.busy() {
            busy.step = Step::HandingOver { drain, stop: None, verdict, old, served_after };
        }
        if !drained {
            tracing::warn!("cold handover: the old family has no admin to drain it through: stopping it now");
            self.on_family_drained(attempt, DrainEnd::AdminUnreachable);
        }
    }

    /// The old family's drain ended: SIGTERM to its newest epoch (which tells its parent, if any,
    /// to terminate), SIGKILL after the kill timeout.
    pub(super) fn on_family_drained(&mut self, attempt: Generation, end: DrainEnd) {
        let Some(busy) = self.reload.attempt(attempt) else { return };
        let Step::HandingOver { drain, .. } = &mut busy.step else { return };
        drain.take();
        tracing::info!("cold handover: the old family's drain ended ({end}): SIGTERM");
        self.epochs.stop_older_families(&mut self.processes, libc::SIGTERM);
        let timer = KillTimer::start(&mut self.timers, self.settings.kill_timeout);
        if let Some(Step::HandingOver { stop, .. }) = self.reload.busy().map(|b| &mut b.step) {
            *stop = Some(timer);
        }
    }

    /// A deadline of the old family's stop: SIGKILL, then, after SIGKILL, going on without it.
    pub(super) fn on_handover_deadline(&mut self, generation: Generation) {
        let Some(Step::HandingOver { stop: Some(stop), .. }) = self.reload.busy().map(|b| &mut b.step) else {
            return;
        };
        match stop.on_deadline(generation, &mut self.timers) {
            None => {}
            Some(KillStep::GiveUp) => {
                tracing::error!(
                    "cold handover: the old family survived SIGKILL for {REAP_AFTER_KILL_TIMEOUT:?}; going on"
                );
                self.finish_handover();
            }
            Some(KillStep::Kill) => {
                tracing::warn!(
                    "cold handover: the old family still runs {:?} after SIGTERM: SIGKILL",
                    self.settings.kill_timeout
                );
                let pids: Vec<Pid> = self.epochs.of_older_families().map(|e| e.pid).collect();
                for pid in pids {
                    self.processes.signal(pid, libc::SIGKILL);
                }
            }
        }
    }

    /// An epoch of the old family exited; once none is left, the handover is done. True when the
    /// handover took it.
    pub(super) fn on_old_family_exit(&mut self, epoch: &Epoch, exit: Exit) -> bool {
        if !matches!(self.reload.step(), Some(Step::HandingOver { .. })) || epoch.family >= self.epochs.current_family()
        {
            return false;
        }
        tracing::info!(
            pid = epoch.pid.as_raw(),
            "cold handover: epoch {} of the old family exited with {exit}",
            epoch.number
        );
        if self.epochs.of_older_families().next().is_none() {
            self.finish_handover();
        }
        true
    }

    /// The old family is gone: its shared memory goes too, and one hot restart of the new family
    /// puts its admin back where the user's tools look for it.
    fn finish_handover(&mut self) {
        let Some(busy) = self.reload.busy() else { return };
        let (why, took) = (busy.cold.take().unwrap_or_default(), busy.started.elapsed());
        // The step stays until the next one is set (or the reload ends): its drain is over.
        let Step::HandingOver { verdict, old, served_after, .. } = &busy.step else { return };
        let (verdict, old, served_after) = (verdict.clone(), old.clone(), *served_after);
        if let Some(shm) = old.base_id.map(crate::envoy::shared_memory_path) {
            let _ = std::fs::remove_file(shm);
        }
        let current = self.epochs.current_number();
        tracing::info!(
            "cold handover done in {took:.2?}: epoch {current} serves alone; a hot restart now puts its admin on {}",
            verdict.admin.as_ref().map_or_else(|| "its address".to_string(), ToString::to_string)
        );
        self.record_recovery(ReloadResult::Success, &Ok(current), why, served_after);
        if !matches!(self.phase, Phase::Running) {
            // A stop waited for the old family: the new one is drained next, on its private admin.
            self.reload_ended(ReloadResult::Success, Ok(current), format!("epoch {current} is LIVE"));
            return self.resume_stop();
        }
        self.start_next_epoch(verdict);
    }

    /// The new family's first epoch failed: the old family serves on, as it did.
    pub(super) fn new_family_failed(&mut self, epoch: u32, reason: NotLive) {
        let current = self.epochs.current_number();
        let why = format!("cold handover failed: epoch {epoch} (a new Envoy family): {reason}");
        tracing::error!("{why}; epoch {current} keeps serving");
        self.reload_ended(ReloadResult::Failed, Err(Refusal::Failed(why.clone())), why);
    }
}

impl<P: Processes> Supervisor<P> {
    /// On exit: the base id files and private admin sockets of the families that cold handovers
    /// started (Envoy leaves them behind).
    pub(super) fn remove_family_files(&self) {
        let Some(envoy) = &self.launch.envoy else { return };
        for number in 1..self.families {
            let socket = private_admin(&envoy.envoy_dir, number);
            forget_files(&self.launch.family(number), &socket);
        }
    }
}

/// The admin socket of family `number` until its admin goes back to the configured address.
fn private_admin(envoy_dir: &std::path::Path, number: u32) -> std::path::PathBuf {
    envoy_dir.join(format!("envoy-admin.family-{number}.sock"))
}

/// What an earlier run may have left of a family with this number: its base id file and admin socket.
fn forget_files(family: &Family, admin_socket: &std::path::Path) {
    for file in family.base_id_path.iter().map(std::path::Path::new).chain([admin_socket]) {
        if let Err(e) = std::fs::remove_file(file)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove {}: {e}", file.display());
        }
    }
}
