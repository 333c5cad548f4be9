//! A drain that starts while a hot restart's older epoch still serves its last connections (within
//! its parent shutdown time), with the real Envoy under sesame as PID 1 of a PID namespace.

mod common;

use std::time::{Duration, Instant};

use common::{Launcher, Mode, Upstream, free_port, proxy_bootstrap, request, wait_for};
use nix::sys::signal::Signal;

const HOLD: Duration = Duration::from_secs(3);
const IN_FLIGHT: usize = 10;

fn start(upstream_port: u16) -> (Launcher, u16, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let bootstrap = proxy_bootstrap(dir.path(), port, upstream_port);
    // The older epoch would live 60 s: longer than the drain may take.
    let options = ["--envoy-parent-shutdown-time", "60s", "--envoy-drain-time", "50s", "--drain-timeout", "40s"];
    let launcher = Launcher::start_envoy(Mode::Pid1, &options, &bootstrap);
    launcher.wait_for_status("epoch 0 to be ready", |s| s["ready"] == true);
    (launcher, port, dir)
}

fn reload(launcher: &Launcher) {
    launcher.signal(Signal::SIGHUP);
    launcher.wait_for_status("epoch 1 LIVE beside the draining epoch 0", |s| {
        s["current_epoch"] == 1 && s["ready"] == true && s["epochs"].as_array().is_some_and(|e| e.len() == 2)
    });
}

/// Nothing open on either epoch: the drain ends at once, not when the older epoch exits.
#[test]
fn a_drain_after_a_hot_restart_ends_when_both_epochs_are_idle() {
    let (mut launcher, port, _dir) = start(free_port());
    assert_eq!(request(port, "/direct"), Ok(200));
    reload(&launcher);
    let signalled = Instant::now();
    launcher.signal(Signal::SIGTERM);
    let code = launcher.exit_code(Duration::from_secs(60));
    let took = signalled.elapsed();
    let log = launcher.log();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("drain ended: connections reached the threshold"), "{log}");
    // Waiting for the older epoch would take its 60 s parent shutdown time (the drain timeout, 40 s).
    assert!(took < Duration::from_secs(15), "the launcher exited {took:?} after SIGTERM\n{log}");
}

/// Requests held on the older epoch keep the drain open until they are answered: every one gets
/// 200, and the drain ends after them, at the threshold.
#[test]
fn requests_held_on_the_older_epoch_are_answered_before_the_drain_ends() {
    let upstream = Upstream::start(HOLD);
    let (mut launcher, port, _dir) = start(upstream.port);
    let clients: Vec<_> =
        (0..IN_FLIGHT).map(|_| std::thread::spawn(move || (request(port, "/held"), Instant::now()))).collect();
    wait_for(Duration::from_secs(10), "every request to reach the upstream", || upstream.arrived() == IN_FLIGHT);
    reload(&launcher);
    launcher.signal(Signal::SIGTERM);
    let results: Vec<_> = clients.into_iter().map(|c| c.join().expect("client")).collect();
    let code = launcher.exit_code(Duration::from_secs(60));
    let log = launcher.log();
    let ok = results.iter().filter(|(r, _)| *r == Ok(200)).count();
    assert_eq!(ok, IN_FLIGHT, "every request held on epoch 0 got 200: {results:?}\n{log}");
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("drain ended: connections reached the threshold"), "{log}");
}
