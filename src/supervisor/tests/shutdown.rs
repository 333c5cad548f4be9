//! The drain, the stop, the kill timeout, a plain command's signals and the processes left behind.

use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::*;
use crate::supervisor::shutdown::Phase;
#[tokio::test(start_paused = true)]
async fn sigterm_drains_then_stops_the_newest_epoch() {
    let mut h = Harness::serving();
    let mut caller = h.shutdown_request();
    let status = h.sup.status();
    assert_eq!((status.state, status.ready), ("draining", false));
    assert!(h.world.signals().is_empty(), "nothing is signalled during the drain");
    h.sup.handle(Event::DrainEnded(DrainEnd::Threshold));
    assert_eq!(caller.try_recv(), Ok(true));
    assert_eq!(h.world.signals(), vec![(h.pid_of(0), libc::SIGTERM)]);
    assert_eq!(h.sup.status().state, "stopping");
    let mut late = h.shutdown_request();
    assert_eq!(late.try_recv(), Ok(true), "a later /shutdown hears how the drain ended");
    assert_eq!(h.exit(h.pid_of(0), Exit::Code(0)), Some(Exit::Code(0)));
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_admin_ends_the_drain() {
    let mut h = Harness::serving();
    h.signal(libc::SIGTERM);
    h.until("the drain to end", |e| matches!(e, Event::DrainEnded(DrainEnd::AdminUnreachable))).await;
    assert_eq!(h.world.signals(), vec![(h.pid_of(0), libc::SIGTERM)]);
}

#[tokio::test(start_paused = true)]
async fn a_second_signal_skips_the_drain_and_a_third_is_passed_on() {
    let mut h = Harness::serving();
    let mut caller = h.shutdown_request();
    h.signal(libc::SIGINT);
    assert_eq!(caller.try_recv(), Ok(false), "not drained");
    let epoch0 = h.pid_of(0);
    assert_eq!(h.world.signals(), vec![(epoch0, libc::SIGTERM)]);
    h.signal(libc::SIGTERM);
    assert_eq!(h.world.signals(), vec![(epoch0, libc::SIGTERM), (epoch0, libc::SIGTERM)]);
}

#[tokio::test(start_paused = true)]
async fn sigkill_follows_the_kill_timeout_and_the_launcher_gives_up_after_it() {
    let mut h = Harness::serving();
    h.signal(libc::SIGTERM);
    h.sup.handle(Event::DrainEnded(DrainEnd::Timeout));
    let started = tokio::time::Instant::now();
    assert_eq!(h.until("the kill timeout", |e| matches!(e, Event::Deadline(_))).await, None);
    assert_eq!(started.elapsed(), KILL_TIMEOUT);
    assert_eq!(h.world.signals().last(), Some(&(h.pid_of(0), libc::SIGKILL)));
    let exit = h.until("the wait after SIGKILL", |e| matches!(e, Event::Deadline(_))).await;
    assert_eq!(exit, Some(Exit::Signal(libc::SIGKILL)));
    assert_eq!(started.elapsed(), KILL_TIMEOUT + crate::supervisor::timers::REAP_AFTER_KILL_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn sigterm_while_a_new_epoch_starts_drains_once_it_is_live() {
    let mut h = Harness::serving();
    let mut caller = h.reload_request();
    let new = h.validated().await;
    let mut shutdown = h.shutdown_request();
    // The starting epoch holds Envoy's admin: the drain waits for it.
    let status = h.sup.status();
    assert_eq!((status.state, status.ready), ("draining", false));
    assert!(matches!(h.sup.phase, Phase::AwaitingNewEpoch { .. }));
    let mut later = h.reload_request();
    assert_eq!(later.try_recv(), Ok(Err(Refusal::ShuttingDown)));
    h.live(1);
    assert_eq!(caller.try_recv(), Ok(Ok(1)), "the reload finished");
    assert!(matches!(h.sup.phase, Phase::Draining { .. }), "then the drain, through epoch 1's admin");
    h.sup.handle(Event::DrainEnded(DrainEnd::Threshold));
    assert_eq!(shutdown.try_recv(), Ok(true));
    assert_eq!(h.world.signals(), vec![(new, libc::SIGTERM)], "the newest epoch takes its parent down");
    assert_eq!(h.exit(new, Exit::Code(0)), Some(Exit::Code(0)), "the serving epoch's exit ends the launcher");
}

#[tokio::test(start_paused = true)]
async fn sigterm_while_a_new_epoch_starts_waits_for_its_failure_too() {
    let mut h = Harness::serving();
    let new = h.validated_after_sighup().await;
    h.signal(libc::SIGTERM);
    assert!(matches!(h.sup.phase, Phase::AwaitingNewEpoch { .. }));
    h.exit(new, Exit::Code(1));
    assert!(matches!(h.sup.phase, Phase::Draining { .. }), "the drain goes on through the serving epoch");
}

#[tokio::test(start_paused = true)]
async fn a_second_signal_ends_the_wait_for_a_starting_epoch() {
    let mut h = Harness::serving();
    let new = h.validated_after_sighup().await;
    h.signal(libc::SIGTERM);
    h.signal(libc::SIGTERM);
    assert!(matches!(h.sup.phase, Phase::Stopping { .. }));
    assert_eq!(h.world.signals(), vec![(new, libc::SIGTERM)], "the newest epoch takes its parent down");
    // The newest died before telling its parent: the parent is next, once.
    h.exit(new, Exit::Signal(libc::SIGTERM));
    assert_eq!(h.world.signals(), vec![(new, libc::SIGTERM), (h.pid_of(0), libc::SIGTERM)]);
    assert_eq!(h.exit(h.pid_of(0), Exit::Code(0)), Some(Exit::Code(0)));
}

#[tokio::test(start_paused = true)]
async fn sigterm_while_validating_kills_the_validator() {
    let mut h = Harness::serving();
    h.signal(libc::SIGHUP);
    h.until("the preflight", is_preflight).await;
    let validator = h.world.last_with("validate");
    h.signal(libc::SIGTERM);
    assert_eq!(h.world.signals(), vec![(validator, libc::SIGKILL)]);
}

#[tokio::test(start_paused = true)]
async fn the_current_epoch_exit_ends_the_launcher_with_its_status() {
    let mut h = Harness::serving();
    assert_eq!(h.exit(h.pid_of(0), Exit::Signal(libc::SIGSEGV)), Some(Exit::Signal(libc::SIGSEGV)));
}

#[tokio::test(start_paused = true)]
async fn signals_follow_the_table_for_envoy() {
    let mut h = Harness::serving();
    h.signal(libc::SIGUSR2);
    h.signal(libc::SIGWINCH);
    let epoch0 = h.pid_of(0);
    assert_eq!(h.world.signals(), vec![(epoch0, libc::SIGUSR2), (epoch0, libc::SIGWINCH)]);
    let new = h.validated_after_sighup().await;
    h.signal(libc::SIGUSR1);
    assert_eq!(h.world.signals()[2..], [(epoch0, libc::SIGUSR1)], "held for the epoch that is not LIVE yet");
    h.live(1);
    assert_eq!(h.world.signals()[3..], [(new, libc::SIGUSR1)], "passed on once it is LIVE");
    h.signal(libc::SIGUSR1);
    assert_eq!(h.world.signals()[4..], [(epoch0, libc::SIGUSR1), (new, libc::SIGUSR1)], "every epoch");
}

// A plain command.

#[tokio::test(start_paused = true)]
async fn a_plain_command_gets_every_signal_and_no_reload() {
    let mut h = Harness::start(false);
    assert!(h.sup.status().ready, "a plain command is ready when it runs");
    let child = h.pid_of(0);
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGUSR1] {
        h.signal(sig);
    }
    let expected: Vec<(Pid, i32)> =
        [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGUSR1].into_iter().map(|s| (child, s)).collect();
    assert_eq!(h.world.signals(), expected);
    assert_eq!(h.sup.status().state, "running", "forwarding is not stopping");
    assert_eq!(h.reload_request().try_recv(), Ok(Err(Refusal::NotEnvoy)));
    let mut caller = h.shutdown_request();
    assert_eq!(caller.try_recv(), Ok(true));
    assert_eq!(h.world.signals().last(), Some(&(child, libc::SIGTERM)));
    assert!(matches!(h.sup.phase, Phase::Stopping { stop: None, .. }), "a plain command decides how long it takes");
    assert_eq!(h.exit(child, Exit::Code(3)), Some(Exit::Code(3)));
}

// What the child leaves behind.

#[tokio::test(start_paused = true)]
async fn leftovers_get_sigterm_then_sigkill_after_the_kill_timeout() {
    let mut h = Harness::serving();
    h.world.0.borrow_mut().alive.insert(999);
    let tx = h.sup.events.clone();
    tokio::spawn(async move {
        tokio::time::sleep(KILL_TIMEOUT + Duration::from_secs(1)).await;
        let _ = tx.send(Event::Signal(libc::SIGCHLD));
    });
    let started = tokio::time::Instant::now();
    h.sup.stop_leftovers(&mut h.events).await;
    assert_eq!(h.world.0.borrow().descendants, vec![Signal::SIGTERM, Signal::SIGKILL]);
    assert_eq!(started.elapsed(), KILL_TIMEOUT + Duration::from_secs(1), "reaped at the SIGCHLD after SIGKILL");
}

#[tokio::test(start_paused = true)]
async fn a_stop_signal_skips_the_wait_for_leftovers() {
    let mut h = Harness::serving();
    h.world.0.borrow_mut().alive.insert(999);
    h.sup.events.send(Event::Signal(libc::SIGHUP)).expect("send");
    h.sup.events.send(Event::Signal(libc::SIGTERM)).expect("send");
    h.sup.events.send(Event::Signal(libc::SIGCHLD)).expect("send");
    let started = tokio::time::Instant::now();
    h.sup.stop_leftovers(&mut h.events).await;
    assert_eq!(started.elapsed(), Duration::ZERO, "no wait after the SIGTERM");
    assert_eq!(h.world.0.borrow().descendants, vec![Signal::SIGTERM, Signal::SIGKILL]);
    assert!(h.world.signals().is_empty(), "SIGHUP is not passed on to leftovers");
}

// Job control.

#[tokio::test(start_paused = true)]
async fn ctrl_z_stops_every_epoch_then_the_launcher_and_fg_continues_both() {
    let mut h = Harness::serving();
    let new = h.validated_after_sighup().await;
    let epoch0 = h.pid_of(0);
    h.signal(libc::SIGTSTP);
    assert_eq!(h.world.signals(), vec![(epoch0, libc::SIGTSTP), (new, libc::SIGTSTP)]);
    assert_eq!(h.world.0.borrow().job_control, vec!["suspend"], "stopped after the epochs");
    h.signal(libc::SIGCONT);
    assert_eq!(h.world.0.borrow().job_control, vec!["suspend", "resume"]);
    assert_eq!(h.world.signals()[2..], [(epoch0, libc::SIGCONT), (new, libc::SIGCONT)]);
}

#[tokio::test(start_paused = true)]
async fn a_plain_command_stopped_by_job_control_stops_the_launcher() {
    let mut h = Harness::start(false);
    let child = h.pid_of(0);
    for (sig, suspends) in [(libc::SIGSTOP, false), (libc::SIGTSTP, true), (libc::SIGTTIN, true)] {
        h.world.0.borrow_mut().stopped.push((child, sig));
        assert_eq!(h.signal(libc::SIGCHLD), None, "a stop is not an exit");
        let expected: usize = if suspends { 1 } else { 0 };
        assert_eq!(h.world.0.borrow_mut().job_control.drain(..).count(), expected, "stopped by signal {sig}");
    }
    assert!(h.world.signals().is_empty(), "{:?}", h.world.signals());
}

#[tokio::test(start_paused = true)]
async fn an_envoy_epoch_stopped_by_someone_does_not_stop_the_launcher() {
    let mut h = Harness::serving();
    let epoch0 = h.pid_of(0);
    h.world.0.borrow_mut().stopped.push((epoch0, libc::SIGTSTP));
    assert_eq!(h.signal(libc::SIGCHLD), None);
    assert!(h.world.0.borrow().job_control.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_draining_epoch_told_to_exit_by_a_stop_is_no_loss() {
    let mut h = Harness::serving();
    h.validated_after_sighup().await;
    h.live(1);
    h.signal(libc::SIGTERM);
    h.sup.handle(Event::DrainEnded(DrainEnd::Threshold));
    // The newest epoch's shutdown tells its parent to exit, long before its parent shutdown time.
    h.exit(h.pid_of(0), Exit::Code(0));
    assert!(h.sup.status().warnings.is_empty(), "{:?}", h.sup.status().warnings);
}

#[tokio::test(start_paused = true)]
async fn a_draining_epoch_killed_while_serving_is_reported() {
    let mut h = Harness::serving();
    h.validated_after_sighup().await;
    h.live(1);
    h.exit(h.pid_of(0), Exit::Signal(libc::SIGKILL));
    let warnings = h.sup.status().warnings;
    assert!(warnings.first().is_some_and(|w| w.contains("draining epoch 0 ended early")), "{warnings:?}");
}
