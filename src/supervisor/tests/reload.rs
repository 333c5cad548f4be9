//! Every step of a reload, the queueing rules and the ways a reload fails.

use std::time::Duration;

use super::*;
use crate::http::Endpoint;

#[tokio::test(start_paused = true)]
async fn a_reload_runs_every_step_and_the_new_epoch_serves() {
    let mut h = Harness::serving();
    let mut caller = h.reload_request();
    assert_eq!(h.sup.status().reload, Some("checking certificates"));
    let new = h.validated().await;
    let spawned = h.world.spawned();
    let validate = &spawned[1].1;
    assert!(validate.ends_with(&["--mode".into(), "validate".into()]), "{validate:?}");
    let argv = &spawned.last().expect("epoch 1").1;
    let tail = ["--restart-epoch", "1", "--base-id", "7"].map(String::from);
    assert!(argv.ends_with(&tail), "epoch 1 reuses epoch 0's base id: {argv:?}");
    assert!(caller.try_recv().is_err(), "not answered before LIVE");
    assert!(h.sup.status().ready, "epoch 0 serves while epoch 1 starts");

    h.live(1);
    assert_eq!(caller.try_recv().expect("answered"), Ok(1));
    let status = h.sup.status();
    assert_eq!((status.current_epoch, status.reload, status.ready), (1, None, true));
    assert_eq!(status.last_reload.map(|r| r.result), Some(ReloadResult::Success));
    assert_eq!(h.pid_of(1), new);
    assert!(h.world.signals().is_empty(), "nobody was signalled: {:?}", h.world.signals());

    // The old epoch drains and exits 0 by itself; the launcher goes on.
    assert_eq!(h.exit(h.pid_of(0), Exit::Code(0)), None);
    assert_eq!(h.sup.epochs.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn triggers_during_a_reload_make_one_more_reload() {
    let mut h = Harness::serving();
    h.signal(libc::SIGHUP);
    h.signal(libc::SIGHUP);
    let mut queued = h.reload_request();
    h.signal(libc::SIGHUP);
    h.validated().await;
    h.live(1);
    assert_eq!(h.sup.status().reload, Some("checking certificates"), "the queued reload started");
    assert!(queued.try_recv().is_err(), "the queued caller waits for its own reload");

    // Epoch 0 still drains: epoch 2 waits for it.
    h.validator_passes().await;
    assert_eq!(h.sup.status().reload, Some("waiting for the draining epoch to exit"));
    // Epoch 0 exits at its time, told to by epoch 1 (an earlier exit would be a lost parent).
    tokio::time::advance(PARENT_SHUTDOWN).await;
    h.exit(h.pid_of(0), Exit::Code(0));
    assert_eq!(h.sup.status().reload, Some("letting the files settle"));
    h.until_state("the files to settle", |sup| matches!(sup.reload.step(), Some(Step::Starting { .. }))).await;
    h.live(2);
    assert_eq!(queued.try_recv().expect("answered"), Ok(2));
    assert_eq!(h.sup.status().reload, None, "three triggers during a reload made one more, not three");
    let epochs = h.world.spawned().iter().filter(|(_, argv)| argv.iter().any(|a| a == "--restart-epoch")).count();
    assert_eq!(epochs, 3, "epochs 0, 1 and 2");
}

#[tokio::test(start_paused = true)]
async fn a_refused_reload_changes_nothing_and_the_next_may_succeed() {
    let mut h = Harness::serving();
    let bootstrap = h.dir.path().join("envoy.yaml");
    std::fs::write(&bootstrap, "admin: [unclosed\n").expect("break the bootstrap");
    let mut caller = h.reload_request();
    h.until("the preflight", is_preflight).await;
    let Ok(Err(Refusal::Invalid(reason))) = caller.try_recv() else { panic!("refused as invalid") };
    assert!(reason.contains("cannot parse the bootstrap"), "{reason}");
    assert_eq!(h.world.spawned().len(), 1, "nothing was started");
    assert_eq!(h.sup.status().last_reload.map(|r| r.result), Some(ReloadResult::Refused));

    std::fs::write(&bootstrap, "static_resources: {}\n").expect("mend it");
    h.signal(libc::SIGHUP);
    h.validated().await;
}

#[tokio::test(start_paused = true)]
async fn the_base_id_is_kept_when_its_file_is_deleted() {
    let mut h = Harness::serving();
    std::fs::remove_file(h.dir.path().join("envoy-base-id")).expect("rm");
    h.validated_after_sighup().await;
    let argv = h.world.spawned().last().expect("epoch 1").1.clone();
    assert!(argv.ends_with(&["--base-id".into(), "7".into()]), "read once when epoch 0 was LIVE: {argv:?}");
}

#[tokio::test(start_paused = true)]
async fn a_failing_validator_is_a_refusal() {
    let mut h = Harness::serving();
    let mut caller = h.reload_request();
    h.until("the preflight", is_preflight).await;
    std::fs::write(h.dir.path().join("envoy-validate.log"), "[x][critical][main] error: bad cert\n").expect("log");
    h.exit(h.world.last_with("validate"), Exit::Code(1));
    h.until("the verdict", is_verdict).await;
    let answer = caller.try_recv().expect("answered");
    assert_eq!(answer, Err(Refusal::Invalid("envoy --mode validate failed (exit status 1): error: bad cert".into())));
    assert_eq!(h.world.spawned().len(), 2, "epoch 0 and the validator, no epoch 1");
    assert!(h.sup.health.blocked().is_none(), "a refusal does not block");
}

#[tokio::test(start_paused = true)]
async fn a_hung_validator_is_killed_at_the_reload_timeout() {
    let mut h = Harness::serving();
    let mut caller = h.reload_request();
    h.until("the preflight", is_preflight).await;
    let validator = h.world.last_with("validate");
    let started = tokio::time::Instant::now();
    h.until("the validator's deadline", |e| matches!(e, Event::Deadline(_))).await;
    assert_eq!(started.elapsed(), RELOAD_TIMEOUT);
    assert_eq!(h.world.signals(), vec![(validator, libc::SIGKILL)]);
    h.exit(validator, Exit::Signal(libc::SIGKILL));
    assert_eq!(h.sup.status().last_reload.map(|r| r.result), Some(ReloadResult::Refused));
    assert_eq!(h.sup.status().reload, None);
    // Its end after SIGKILL is no verdict on the input: a timeout, which the control API answers with 504.
    let Ok(Err(Refusal::TimedOut(reason))) = caller.try_recv() else { panic!("refused as timed out") };
    assert_eq!(reason, format!("envoy --mode validate still running after {RELOAD_TIMEOUT:?}: killed"));
}

#[tokio::test(start_paused = true)]
async fn a_new_epoch_that_exits_blocks_hot_restarts_and_the_old_one_serves() {
    let mut h = Harness::serving();
    let mut caller = h.reload_request();
    let new = h.validated().await;
    assert_eq!(h.exit(new, Exit::Code(1)), None, "a new epoch's exit does not end the launcher");
    let Ok(Err(Refusal::Failed(why))) = caller.try_recv() else { panic!("failed") };
    assert!(why.contains("epoch 1 failed (it exited with exit status 1 before it was LIVE)"), "{why}");
    let status = h.sup.status();
    assert_eq!((status.current_epoch, status.ready, status.degraded.is_some()), (0, true, true));
    assert!(h.world.signals().is_empty(), "the serving epoch is never signalled");

    // Any trigger while blocked is applied the only way left: a cold handover.
    let _later = h.reload_request();
    assert!(h.sup.reload.is_cold(), "{:?}", h.sup.reload.step());
}

#[tokio::test(start_paused = true)]
async fn a_caller_queued_behind_a_new_epoch_that_fails_waits_for_the_cold_handover() {
    let mut h = Harness::serving();
    let _first = h.reload_request();
    let new = h.validated().await;
    let mut queued = h.reload_request();
    h.exit(new, Exit::Code(1));
    assert!(queued.try_recv().is_err(), "not refused as blocked: recovery is on");
    assert!(h.sup.reload.is_cold(), "the queued trigger is the cold handover: {:?}", h.sup.reload.step());
    assert_eq!(h.sup.status().reload, Some("checking certificates"));
}

#[tokio::test(start_paused = true)]
async fn without_recovery_a_blocked_hot_restart_refuses_every_trigger() {
    let mut h = Harness::serving();
    h.sup.settings.recover.enabled = false;
    let new = h.validated_after_sighup().await;
    h.exit(new, Exit::Code(1));
    let mut later = h.reload_request();
    assert!(matches!(later.try_recv(), Ok(Err(Refusal::Blocked(_)))));
    assert_eq!(h.signal(libc::SIGHUP), None);
    assert_eq!(h.world.spawned().len(), 3, "no validator, no epoch after the block");
    assert!(h.sup.recovery.status(true).is_some_and(|r| r.next_attempt_in_seconds.is_none()), "no recovery armed");
}

#[tokio::test(start_paused = true)]
async fn a_new_epoch_not_live_in_time_is_sigkilled_alone() {
    let mut h = Harness::serving();
    let new = h.validated_after_sighup().await;
    let started = tokio::time::Instant::now();
    h.until("the LIVE poll to give up", |e| matches!(e, Event::EpochLive { epoch: 1, .. })).await;
    assert!(started.elapsed() >= RELOAD_TIMEOUT, "{:?}", started.elapsed());
    assert_eq!(h.world.signals(), vec![(new, libc::SIGKILL)], "SIGKILL to the new epoch only");
    assert!(h.sup.status().degraded.expect("degraded").contains("did not answer on"));
    assert_eq!(h.sup.epochs.current_number(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_draining_epoch_that_outlives_its_parent_shutdown_time_refuses_the_reload() {
    let mut h = Harness::serving();
    h.signal(libc::SIGHUP);
    h.validated().await;
    h.live(1);
    let mut caller = h.reload_request();
    h.validator_passes().await;
    assert_eq!(h.sup.status().reload, Some("waiting for the draining epoch to exit"));
    let started = tokio::time::Instant::now();
    h.until_state("the draining epoch's deadline", |sup| sup.reload.step().is_none()).await;
    assert!(started.elapsed() <= PARENT_SHUTDOWN + KILL_TIMEOUT, "{:?}", started.elapsed());
    assert!(started.elapsed() >= PARENT_SHUTDOWN, "{:?}", started.elapsed());
    // Not the input's fault: a timeout, which the control API answers with 504.
    let Ok(Err(Refusal::TimedOut(reason))) = caller.try_recv() else { panic!("refused as timed out") };
    assert!(reason.contains("outlived its parent shutdown time"), "{reason}");
    assert!(h.world.signals().is_empty(), "the draining epoch is never ended early");
}

#[tokio::test(start_paused = true)]
async fn a_stale_deadline_is_dropped() {
    let mut h = Harness::serving();
    h.signal(libc::SIGHUP);
    h.validated().await;
    h.live(1);
    h.exit(h.pid_of(0), Exit::Code(0));
    tokio::time::sleep(Duration::from_secs(10)).await;
    h.signal(libc::SIGHUP);
    h.until("the preflight", is_preflight).await;
    let second = h.world.last_with("validate");
    // The first validator's deadline comes 20 s before the second's: it must not kill the second.
    h.until("the first validator's deadline", |e| matches!(e, Event::Deadline(_))).await;
    assert!(h.world.signals().is_empty(), "{:?}", h.world.signals());
    h.until("the second validator's deadline", |e| matches!(e, Event::Deadline(_))).await;
    assert_eq!(h.world.signals(), vec![(second, libc::SIGKILL)]);
}

#[tokio::test(start_paused = true)]
async fn a_validator_that_survives_sigkill_does_not_hold_the_reload() {
    let mut h = Harness::serving();
    let mut caller = h.reload_request();
    h.until("the preflight", is_preflight).await;
    let started = tokio::time::Instant::now();
    h.until_state("the reload to end", |sup| sup.reload.step().is_none()).await;
    assert_eq!(started.elapsed(), RELOAD_TIMEOUT + crate::supervisor::timers::REAP_AFTER_KILL_TIMEOUT);
    // Not the input's fault: sesame could not judge it, which the control API answers with 503.
    let Ok(Err(Refusal::Fault(reason))) = caller.try_recv() else { panic!("refused as a fault") };
    assert!(reason.contains("survived SIGKILL"), "{reason}");
    // The next reload is not held by it either.
    h.signal(libc::SIGHUP);
    assert_eq!(h.sup.status().reload, Some("checking certificates"));
}

#[tokio::test(start_paused = true)]
async fn a_live_answer_from_another_poll_is_stale() {
    let mut h = Harness::serving();
    h.validated_after_sighup().await;
    let Some(Step::Starting { live_poll, .. }) = h.sup.reload.step() else { panic!("starting") };
    let stale = live_poll - 1;
    h.sup.handle(Event::EpochLive { epoch: 1, poll: stale, result: Ok(Endpoint::Unix("/x".into())) });
    assert_eq!(h.sup.epochs.current_number(), 0, "a stale answer promotes nobody");
    h.sup.handle(Event::EpochLive { epoch: 1, poll: stale, result: Err(crate::admin::NotLive::Exited("gone".into())) });
    assert!(h.world.signals().is_empty() && h.sup.health.blocked().is_none(), "nor fails anybody");
    h.live(1);
    assert_eq!(h.sup.epochs.current_number(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_serving_epoch_exiting_answers_the_reload_callers_at_once() {
    let mut h = Harness::serving();
    let mut caller = h.reload_request();
    h.until("the preflight", is_preflight).await;
    let validator = h.world.last_with("validate");
    assert_eq!(h.exit(h.pid_of(0), Exit::Code(1)), Some(Exit::Code(1)));
    assert_eq!(caller.try_recv(), Ok(Err(Refusal::ShuttingDown)));
    assert_eq!(h.world.signals(), vec![(validator, libc::SIGKILL)]);
}

#[tokio::test(start_paused = true)]
async fn input_changed_while_waiting_for_the_draining_epoch_is_checked_again() {
    let mut h = Harness::serving();
    h.validated_after_sighup().await;
    h.live(1);
    let mut caller = h.reload_request();
    h.validator_passes().await;
    assert_eq!(h.sup.status().reload, Some("waiting for the draining epoch to exit"));
    // A new bootstrap is written during the wait.
    std::fs::write(h.dir.path().join("envoy.yaml"), "static_resources: { listeners: [] }\n").expect("write");
    let spawned = h.world.spawned().len();
    h.exit(h.pid_of(0), Exit::Code(0));
    assert_eq!(h.world.spawned().len(), spawned, "no epoch on input that was not checked");
    assert_eq!(h.sup.status().reload, Some("checking certificates"), "checked again");
    assert!(caller.try_recv().is_err(), "the caller waits for the new check");
    h.validator_passes().await;
    assert_eq!(h.sup.status().reload, Some("starting the new epoch"), "unchanged since: started");
    h.live(2);
    assert_eq!(caller.try_recv(), Ok(Ok(2)));
}

#[tokio::test(start_paused = true)]
async fn a_trigger_while_the_current_epoch_initializes_waits_for_it() {
    let mut h = Harness::start(true);
    let epoch0 = h.pid_of(0);
    let mut caller = h.reload_request();
    h.signal(libc::SIGHUP);
    h.signal(libc::SIGUSR1);
    assert_eq!(h.sup.status().reload, Some("waiting for the current epoch to be LIVE"));
    assert_eq!(h.world.spawned().len(), 1, "no validator, no epoch 1 while epoch 0 initializes");
    assert!(h.world.signals().is_empty(), "SIGUSR1 is held for epoch 0 too");
    h.live(0);
    assert_eq!(h.world.signals(), vec![(epoch0, libc::SIGUSR1)]);
    assert_eq!(h.sup.status().reload, Some("checking certificates"), "the held trigger runs");
    h.validator_passes().await;
    h.live(1);
    assert_eq!(caller.try_recv(), Ok(Ok(1)), "the caller waited for it");
}

#[tokio::test(start_paused = true)]
async fn a_copy_that_begins_as_the_draining_epoch_exits_is_checked_again() {
    let mut h = Harness::serving();
    h.validated_after_sighup().await;
    h.live(1);
    h.signal(libc::SIGHUP);
    h.validator_passes().await;
    assert_eq!(h.sup.status().reload, Some("waiting for the draining epoch to exit"));
    let spawned = h.world.spawned().len();
    h.exit(h.pid_of(0), Exit::Code(0));
    // `cp cert` lands a few milliseconds after the exit: within the settling time.
    std::fs::write(h.dir.path().join("envoy.yaml"), "static_resources: { clusters: [] }\n").expect("write");
    h.until_state("the settling time to end", |sup| sup.reload.step_name() != Some("letting the files settle")).await;
    assert_eq!(h.sup.status().reload, Some("checking certificates"), "checked again");
    assert_eq!(h.world.spawned().len(), spawned, "no epoch on files that moved");
}

#[tokio::test(start_paused = true)]
async fn a_watch_neighbour_that_changes_during_a_reload_does_not_make_it_check_again() {
    let mut h = Harness::serving();
    let busy = h.dir.path().join("access.log");
    std::fs::write(&busy, "one\n").expect("write");
    h.sup.settings.watch.extra = vec![busy.clone()];
    h.signal(libc::SIGHUP);
    h.until("the preflight", is_preflight).await;
    // An access log in a --watch directory is written all the time: the reload's own checks stand
    // for what the bootstrap names, so the new epoch starts.
    std::fs::write(&busy, "two\n").expect("write");
    let validator = h.world.last_with("validate");
    h.exit(validator, Exit::Code(0));
    h.until("the verdict", is_verdict).await;
    assert_eq!(h.sup.status().reload, Some("starting the new epoch"));
}
