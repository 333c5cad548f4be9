//! What sesame reports is true when it is read: `/ready`, `sesame status` and `/healthz` ask
//! Envoy itself, so a health check failed behind sesame's back, stopped listeners, a lost admin
//! socket or a frozen Envoy are reported at once; a reload does not make readiness flap; a draining
//! epoch is shown as draining, and its early end is reported with what will follow.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Launcher, Mode, SESAME, Upstream, admin_post, children_of, control, proxy_bootstrap, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

struct Proxy {
    launcher: Launcher,
    dir: tempfile::TempDir,
    _upstream: Upstream,
}

fn start(options: &[&str]) -> Proxy {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = Upstream::start(Duration::ZERO);
    let bootstrap = proxy_bootstrap(dir.path(), common::free_port(), upstream.port);
    let launcher = Launcher::start_envoy(Mode::Pid1, options, &bootstrap);
    let proxy = Proxy { launcher, dir, _upstream: upstream };
    proxy.wait_ready("Envoy to be ready");
    proxy
}

impl Proxy {
    fn admin(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    fn get(&self, path: &str) -> (u16, String) {
        control(&self.launcher.runtime_dir().join("control.sock"), "GET", path).expect("control socket")
    }

    fn wait_ready(&self, what: &str) {
        wait_for(Duration::from_secs(10), what, || self.get("/ready").0 == 200);
    }

    /// Waits until `/ready` answers 503 with `reason` in its body.
    fn wait_not_ready(&self, reason: &str) {
        wait_for(Duration::from_secs(10), &format!("/ready to say 503 '{reason}'"), || {
            let (status, body) = self.get("/ready");
            status == 503 && body.contains(reason)
        });
    }

    /// `sesame status`: its exit code and its output.
    fn client_status(&self) -> (Option<i32>, String) {
        let output = Command::new(SESAME)
            .args(["status", "--runtime-dir"])
            .arg(self.launcher.runtime_dir())
            .output()
            .expect("sesame status");
        (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn envoy_pid(&self) -> i32 {
        let children = children_of(self.launcher.pid());
        assert_eq!(children.len(), 1, "one Envoy: {children:?}");
        children[0]
    }
}

#[test]
fn a_health_check_failed_behind_sesames_back_is_not_ready() {
    let proxy = start(&[]);
    assert_eq!(admin_post(&proxy.admin(), "/healthcheck/fail"), Some(200));
    proxy.wait_not_ready("Envoy is DRAINING");
    let (code, out) = proxy.client_status();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("not ready: Envoy is DRAINING") && out.contains("Envoy says: DRAINING"), "{out}");
    assert_eq!(admin_post(&proxy.admin(), "/healthcheck/ok"), Some(200));
    proxy.wait_ready("ready again after /healthcheck/ok");
    assert_eq!(proxy.client_status().0, Some(0));
}

#[test]
fn listeners_stopped_behind_sesames_back_are_not_ready() {
    let proxy = start(&[]);
    assert_eq!(admin_post(&proxy.admin(), "/drain_listeners"), Some(200));
    proxy.wait_not_ready("stopped 1 listeners");
    assert_eq!(proxy.client_status().0, Some(1));
}

/// Envoy serves on with its admin socket removed, and sesame still reaches it (and can drain it)
/// over the connection it kept: ready, with a note that says what is wrong with the address.
#[test]
fn a_removed_admin_socket_is_reached_over_the_kept_connection_and_said() {
    let proxy = start(&[]);
    std::fs::remove_file(proxy.admin()).expect("rm admin.sock");
    let status = proxy.launcher.wait_for_status("the note about the admin address", |s| {
        s["envoy"]["note"].as_str().is_some_and(|n| n.contains("takes no new connection"))
    });
    assert_eq!(status["ready"], true, "{status:#}");
    let (code, out) = proxy.client_status();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("NOTE: Envoy's admin address takes no new connection"), "{out}");
    proxy.launcher.signal(Signal::SIGTERM);
}

#[test]
fn a_frozen_envoy_is_not_ready_at_once_and_not_alive_after_the_grace() {
    let proxy = start(&[]);
    let envoy = Pid::from_raw(proxy.envoy_pid());
    // A quiet spell without probes is not silence: nobody asked.
    let quiet = std::time::Instant::now() + Duration::from_secs(11);
    wait_for(Duration::from_secs(15), "a quiet spell of 11 s", || std::time::Instant::now() >= quiet);
    kill(envoy, Signal::SIGSTOP).expect("SIGSTOP Envoy");
    // A storm of probes at a frozen admin: every asker shares one request's verdict.
    let socket = proxy.launcher.runtime_dir().join("control.sock");
    let storm: Vec<_> = (0..20)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let asked = std::time::Instant::now();
                (control(&socket, "GET", "/ready").map(|(status, _)| status), asked.elapsed())
            })
        })
        .collect();
    for asker in storm {
        let (status, took) = asker.join().expect("asker");
        assert_eq!(status, Ok(503), "a frozen Envoy is not ready");
        assert!(took < Duration::from_secs(4), "one admin request for the whole storm, not one each: {took:?}");
    }
    assert_eq!(proxy.client_status().0, Some(1), "sesame status answers, not ready");
    assert_eq!(proxy.get("/healthz").0, 200, "one silent second is not a hung Envoy");
    wait_for(Duration::from_secs(20), "/healthz to fail after 10 s of silence", || {
        let (status, body) = proxy.get("/healthz");
        status == 503 && body.contains("has not answered for")
    });
    kill(envoy, Signal::SIGCONT).expect("SIGCONT Envoy");
    proxy.wait_ready("ready again after SIGCONT");
    assert_eq!(proxy.get("/healthz").0, 200);
}

#[test]
fn readiness_does_not_flap_during_a_reload() {
    // Epoch 0 stops its listeners at the end of its drain time (1 s), and lives on until 7 s:
    // epoch 1's stats flush at 5 s merges that stop into epoch 1's count.
    let proxy = start(&["--envoy-drain-time", "1s", "--envoy-parent-shutdown-time", "7s"]);
    let socket = proxy.launcher.runtime_dir().join("control.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut answers = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                answers.push(control(&socket, "GET", "/ready"));
                std::thread::sleep(Duration::from_millis(20));
            }
            answers
        })
    };
    proxy.launcher.signal(Signal::SIGHUP);
    proxy.launcher.wait_for_status("epoch 1 to serve alone", |s| {
        s["current_epoch"] == 1 && s["epochs"].as_array().is_some_and(|e| e.len() == 1)
    });
    // Readiness must not take the merged stop for epoch 1's own, then or after.
    let after = std::time::Instant::now() + Duration::from_secs(2);
    wait_for(Duration::from_secs(5), "2 s more of polling", || std::time::Instant::now() >= after);
    let metrics = common::admin_body(&proxy.admin(), "/stats?filter=listener_manager.listener_stopped");
    assert!(metrics.as_deref().is_some_and(|m| !m.contains("listener_stopped: 0")), "the stop was merged: {metrics:?}");
    stop.store(true, Ordering::SeqCst);
    let answers = watcher.join().expect("watcher");
    let not_ready: Vec<_> = answers.iter().filter(|a| !matches!(a, Ok((200, _)))).collect();
    assert!(answers.len() > 20, "{} answers", answers.len());
    assert!(not_ready.is_empty(), "{} of {} answers were not 200: {:?}", not_ready.len(), answers.len(), not_ready);
}

#[test]
fn a_draining_epoch_is_shown_as_draining_and_its_early_end_is_reported() {
    let proxy = start(&["--envoy-drain-time", "5s", "--envoy-parent-shutdown-time", "60s"]);
    let old = proxy.envoy_pid();
    proxy.launcher.signal(Signal::SIGHUP);
    let status = proxy.launcher.wait_for_status("epoch 1 to serve", |s| s["current_epoch"] == 1);
    let epochs = status["epochs"].as_array().expect("epochs");
    let draining = epochs.iter().find(|e| e["epoch"] == 0).expect("epoch 0 still there");
    assert_eq!(draining["state"], "draining", "{status:#}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let exits_by = draining["exits_by_unix"].as_u64().expect("exits_by_unix");
    assert!((now + 55..=now + 61).contains(&exits_by), "told to exit 60 s after epoch 1 started: {exits_by} vs {now}");
    assert_eq!(epochs.iter().find(|e| e["epoch"] == 1).expect("epoch 1")["state"], "live");

    kill(Pid::from_raw(old), Signal::SIGKILL).expect("SIGKILL the draining epoch");
    let status = proxy.launcher.wait_for_status("the warning", |s| !s["warnings"].as_array().is_none_or(Vec::is_empty));
    let warning = status["warnings"][0].as_str().expect("text");
    assert!(warning.contains("draining epoch 0 ended early (signal 9 (SIGKILL))"), "{warning}");
    assert!(
        warning.contains("will fail to reach it at its next stats flush") && warning.contains("abort, by about"),
        "{warning}"
    );
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let (_, metrics) = proxy.get("/metrics");
    let abort_by: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sesame_expected_abort_timestamp_seconds "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the expected abort");
    assert!((now + 10..=now + 16).contains(&abort_by), "within a stats flush and 10 s: {abort_by} vs {now}");
    let (_, metrics) = proxy.get("/metrics");
    assert!(metrics.contains("sesame_draining_epochs_lost_total 1"), "{metrics}");
    assert!(!metrics.contains("sesame_expected_abort_timestamp_seconds 0\n"), "{metrics}");
}
