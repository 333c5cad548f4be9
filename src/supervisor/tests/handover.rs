//! The cold handover and the recovery that starts it, driven without processes.

use super::*;

/// Epoch 0 serves; a hot restart to epoch 1 failed (it exited): hot restarts are blocked.
async fn blocked() -> Harness {
    let mut h = Harness::serving();
    let new = h.validated_after_sighup().await;
    h.exit(new, Exit::Code(1));
    assert!(h.sup.health.blocked().is_some());
    h
}

impl Harness {
    /// Waits for the recovery timer; returns how long it took.
    async fn recovery_fires(&mut self) -> Duration {
        let started = tokio::time::Instant::now();
        self.until_state("the recovery", |sup| sup.reload.is_cold()).await;
        started.elapsed()
    }

    /// The pid of the new family's first epoch, once validated.
    async fn new_family_started(&mut self) -> Pid {
        self.validator_passes().await;
        let Some(Step::Starting { pid, family: Some(_), .. }) = self.sup.reload.step() else {
            panic!("no new family starting: {:?}", self.sup.reload.step())
        };
        *pid
    }

    fn argv_of(&self, pid: Pid) -> Vec<String> {
        self.world.spawned().into_iter().find(|(p, _)| *p == pid).map(|(_, argv)| argv).unwrap_or_default()
    }
}

fn flag<'a>(argv: &'a [String], name: &str) -> Option<&'a str> {
    argv.iter().position(|a| a == name).and_then(|i| argv.get(i + 1)).map(String::as_str)
}

#[tokio::test(start_paused = true)]
async fn a_blocked_hot_restart_is_recovered_by_a_new_family_that_is_then_put_back_on_the_admin() {
    let mut h = blocked().await;
    assert_eq!(h.recovery_fires().await, Duration::ZERO, "the first try at once");
    let old = h.pid_of(0);
    let new = h.new_family_started().await;
    let argv = h.argv_of(new);
    let family_file = h.dir.path().join("envoy-base-id.family-1");
    assert_eq!(flag(&argv, "--restart-epoch"), Some("0"));
    assert_eq!(flag(&argv, "--base-id-path"), family_file.to_str());
    assert!(flag(&argv, "--config-yaml").is_some_and(|y| y.contains("envoy-admin.family-1.sock")), "{argv:?}");
    assert!(h.world.signals().is_empty(), "nothing signalled before the new family is LIVE");

    std::fs::write(&family_file, "9\n").expect("the new family's base id");
    let epoch = h.sup.epochs.find_pid(new).expect("new epoch").number;
    h.live(epoch);
    let status = h.sup.status();
    assert_eq!((status.current_epoch, status.degraded.as_deref()), (epoch, None), "the new family serves");
    assert_eq!(status.reload, Some("draining the old Envoy family"));
    assert_eq!(h.sup.metrics.degraded.get(), 0);

    // Nobody answers on the old admin in this harness: its drain gives up, and SIGTERM follows.
    h.until("the old family's drain", |e| matches!(e, Event::FamilyDrained { .. })).await;
    assert_eq!(h.world.signals(), vec![(old, libc::SIGTERM)], "only the old family is stopped");
    h.exit(old, Exit::Code(0));

    // The old family is gone: a hot restart of the new one, with the base id it picked.
    let readdress = h.world.spawned().last().map(|(pid, _)| *pid).expect("spawned");
    let argv = h.argv_of(readdress);
    assert_eq!((flag(&argv, "--restart-epoch"), flag(&argv, "--base-id")), (Some("1"), Some("9")), "{argv:?}");
    assert!(flag(&argv, "--config-yaml").is_none(), "back on the configured admin: {argv:?}");
    let next = h.sup.epochs.find_pid(readdress).expect("epoch").number;
    h.live(next);
    let status = h.sup.status();
    assert_eq!((status.current_epoch, status.reload), (next, None));
    let recovery = status.recovery.expect("recovery shown once one ran");
    assert_eq!(recovery.last.map(|l| l.result), Some(ReloadResult::Success));
    assert!(h.sup.metrics.render().contains("sesame_recoveries_total{result=\"success\"} 1"));
}

#[tokio::test(start_paused = true)]
async fn a_failed_new_family_is_retried_with_a_doubling_backoff_and_the_old_one_serves() {
    let mut h = blocked().await;
    for expected in [0, 1, 2, 4, 8, 8] {
        assert_eq!(h.recovery_fires().await, Duration::from_secs(expected));
        let new = h.new_family_started().await;
        h.exit(new, Exit::Code(1));
        assert!(h.sup.health.blocked().is_some() && h.sup.status().ready, "epoch 0 serves on");
        assert_eq!(h.sup.epochs.current_number(), 0);
    }
    assert!(h.world.signals().is_empty(), "the serving epoch is never signalled");
    assert!(h.sup.metrics.render().contains("sesame_recoveries_total{result=\"failed\"} 6"));
}

#[tokio::test(start_paused = true)]
async fn a_stop_while_the_new_family_starts_kills_it_and_drains_the_old_one() {
    let mut h = blocked().await;
    h.recovery_fires().await;
    let new = h.new_family_started().await;
    h.signal(libc::SIGTERM);
    assert_eq!(h.world.signals(), vec![(new, libc::SIGKILL)]);
    assert!(matches!(h.sup.phase, Phase::Draining { .. }), "the serving family drains as usual");
    assert!(h.sup.recovery.status(true).is_some_and(|r| r.next_attempt_in_seconds.is_none()), "no retry armed");
}

#[tokio::test(start_paused = true)]
async fn a_draining_epoch_that_dies_early_starts_a_handover_at_once() {
    let mut h = Harness::serving();
    let new = h.validated_after_sighup().await;
    let epoch = h.sup.epochs.find_pid(new).expect("epoch").number;
    h.live(epoch);
    h.exit(h.pid_of(0), Exit::Signal(libc::SIGKILL));
    assert!(h.sup.reload.is_cold(), "no backoff: epoch 1 aborts within seconds");
    assert!(h.sup.status().degraded.is_some_and(|d| d.contains("will abort")));
}

#[tokio::test(start_paused = true)]
async fn a_cold_handover_by_hand_runs_while_nothing_is_blocked() {
    let mut h = Harness::serving();
    let (tx, mut caller) = oneshot::channel();
    h.sup.handle(Event::Control(ControlRequest::Reload { reply: tx, cold: true }));
    let new = h.new_family_started().await;
    h.exit(new, Exit::Code(1));
    assert!(matches!(caller.try_recv(), Ok(Err(Refusal::Failed(_)))));
    assert!(h.sup.health.blocked().is_none(), "a failed new family blocks nothing");
    assert!(h.sup.recovery.status(false).is_some_and(|r| r.next_attempt_in_seconds.is_none()), "and is not retried");
}

#[tokio::test(start_paused = true)]
async fn a_stop_while_the_old_family_drains_lets_it_finish_then_drains_the_new_one() {
    let mut h = blocked().await;
    h.recovery_fires().await;
    let (old, new) = (h.pid_of(0), h.new_family_started().await);
    std::fs::write(h.dir.path().join("envoy-base-id.family-1"), "9\n").expect("base id");
    let epoch = h.sup.epochs.find_pid(new).expect("new epoch").number;
    h.live(epoch);
    h.signal(libc::SIGTERM);
    assert!(h.world.signals().is_empty(), "nothing is stopped while the old family drains");
    assert!(matches!(h.sup.phase, Phase::AwaitingNewEpoch { .. }));
    h.until("the old family's drain", |e| matches!(e, Event::FamilyDrained { .. })).await;
    assert_eq!(h.world.signals(), vec![(old, libc::SIGTERM)]);
    h.exit(old, Exit::Code(0));
    assert!(matches!(h.sup.phase, Phase::Draining { .. }), "then the new family drains");
    let spawned = h.world.spawned().len();
    assert!(h.world.spawned()[spawned - 1].0 == new, "no hot restart to put the admin back while stopping");
}

#[tokio::test(start_paused = true)]
async fn a_new_binary_that_cannot_hot_restart_the_serving_one_is_checked_again_as_a_cold_handover() {
    let mut h = Harness::serving();
    std::fs::write(h.dir.path().join("envoy"), "a new binary, of another size\n").expect("upgrade");
    h.signal(libc::SIGHUP);
    h.until("the preflight", is_preflight).await;
    let checker = h.world.last_with("--hot-restart-version");
    h.exit(checker, Exit::Code(0));
    // The serving epoch's version is not known here (no admin answers): a cold handover is needed.
    h.validator_passes_after_preflight().await;
    // Its checks ran as a hot restart's: the cold handover's own (the ports beside the serving
    // family) run before any new family starts.
    assert!(h.sup.reload.is_cold(), "{:?}", h.sup.reload.step());
    assert_eq!(h.sup.status().reload, Some("checking certificates"), "checked again, as a cold handover");
    assert_eq!(h.world.spawned().iter().filter(|(_, argv)| argv.iter().any(|a| a.contains("family-"))).count(), 0);
}
