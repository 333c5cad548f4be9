//! Validated hot restarts with the real Envoy: certificates rotated under load without a failed
//! request, bad input that changes nothing, storms, SIGHUP, and a new epoch that fails anyway.

mod common;

use std::time::{Duration, Instant};

use common::tls::{certificate, certificate_valid, replace_file, tls_bootstrap};

use common::admin_get;
use common::load::{Load, ONE_LOAD_AT_A_TIME};
use common::rotation::{DEBOUNCE, bad_input_changes_nothing, start_tls};
use nix::sys::signal::Signal;

fn rotation_under_load(volume: bool, keep_alive: bool) {
    let _alone = ONE_LOAD_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut tls = start_tls(volume, &[]);
    let load = if keep_alive { Load::start(tls.port, 32, 0) } else { Load::start(tls.port, 0, 32) };
    // The load runs before the rotation, as in production: every client has been answered a few times.
    load.wait_running();

    let (cert, key) = certificate(2);
    let written = Instant::now();
    if let Some(volume) = tls.volume.as_mut() {
        volume.swap(&cert, &key);
    } else {
        replace_file(&tls.cert, &cert);
        replace_file(&tls.key, &key);
    }
    // A bound for a failure, not a figure: the time is printed below; a loaded machine may take seconds.
    tls.wait_for_serial(2, DEBOUNCE + Duration::from_secs(15));
    let visible = written.elapsed();
    // Keep the load on while the old epoch drains and exits.
    tls.launcher.wait_for_status("epoch 0 to exit", |s| s["epochs"].as_array().is_some_and(|e| e.len() == 1));
    let outcome = load.stop();
    let log = tls.launcher.log();
    outcome.assert_none_failed(1000, &log);
    let sent = outcome.sent;
    assert_eq!(tls.restarts(), 1, "exactly one restart for a certificate and its key:\n{log}");
    assert!(log.contains("epoch 0 drained and exited after"), "the old epoch exited 0:\n{log}");
    eprintln!("new certificate visible {visible:?} after the write; {sent} requests, none failed");
    for line in log.lines().filter(|l| l.contains("changed:") || l.contains("hot restart")) {
        eprintln!("  {line}");
    }
    let log = tls.stop();
    assert!(!log.contains("survived SIGKILL"), "{log}");
}

#[test]
fn rotation_by_rename_under_keepalive_load() {
    rotation_under_load(false, true);
}

#[test]
fn rotation_by_rename_with_a_new_connection_per_request() {
    rotation_under_load(false, false);
}

#[test]
fn rotation_by_kubernetes_symlink_swap_under_load() {
    rotation_under_load(true, true);
}

#[test]
fn a_certificate_directory_replaced_by_a_rename_swap_is_served_and_so_is_a_write_into_it() {
    let tls = start_tls(false, &[]);
    // `mv certs certs.old; mv certs.new certs`: the directory watched is no longer at its path.
    let certs = tls.cert.parent().expect("certs").to_path_buf();
    let new = certs.with_file_name("certs.new");
    std::fs::create_dir(&new).expect("mkdir");
    let (cert, key) = certificate(2);
    std::fs::write(new.join("cert.pem"), &cert).expect("cert");
    std::fs::write(new.join("key.pem"), &key).expect("key");
    std::fs::rename(&certs, certs.with_file_name("certs.old")).expect("mv aside");
    std::fs::rename(&new, &certs).expect("mv in");
    tls.wait_for_serial(2, DEBOUNCE + Duration::from_secs(15));
    // A write into the directory now at the path is seen too.
    let (cert, key) = certificate(3);
    replace_file(&tls.key, &key);
    replace_file(&tls.cert, &cert);
    tls.wait_for_serial(3, DEBOUNCE + Duration::from_secs(15));
    tls.stop();
}

#[test]
fn garbage_certificate_changes_nothing() {
    bad_input_changes_nothing(|tls| replace_file(&tls.cert, "garbage\n"), "no PEM CERTIFICATE block");
}

#[test]
fn mismatched_key_changes_nothing() {
    let (_, other_key) = certificate(9);
    bad_input_changes_nothing(|tls| replace_file(&tls.key, &other_key), "does not match certificate");
}

#[test]
fn expired_certificate_changes_nothing() {
    bad_input_changes_nothing(
        |tls| {
            let (cert, key) = certificate_valid(4, Some(2));
            replace_file(&tls.key, &key);
            replace_file(&tls.cert, &cert);
        },
        "expired on",
    );
}

#[test]
fn deleted_key_changes_nothing() {
    bad_input_changes_nothing(|tls| std::fs::remove_file(&tls.key).expect("rm key"), "cannot read");
}

#[test]
fn certificate_without_its_key_waits_for_the_key() {
    let tls = start_tls(false, &[]);
    let (cert, key) = certificate(5);
    replace_file(&tls.cert, &cert);
    assert!(tls.wait_for_refusal().contains("does not match certificate"));
    assert_eq!(tls.serial(), 1, "the old pair is still served");
    replace_file(&tls.key, &key);
    tls.wait_for_serial(5, DEBOUNCE + Duration::from_secs(15));
    tls.wait_for_epoch(1);
    assert_eq!(tls.restarts(), 1);
    tls.stop();
}

#[test]
fn a_bad_write_then_a_good_one_within_the_debounce_serves_the_good_one_unrefused() {
    // A debounce long enough for the checks of the bad write to end within it on a loaded machine.
    let tls = start_tls(false, &["--reload-debounce", "3s"]);
    // Checks run early only once sesame has seen epoch 0 LIVE (Envoy answers /ready a poll before).
    tls.launcher.wait_for_status("epoch 0 LIVE", |s| s["ready"] == true);
    replace_file(&tls.cert, "garbage\n");
    tls.launcher.wait_for_log("checks while the files settle failed");
    let (cert, key) = certificate(2);
    replace_file(&tls.key, &key);
    replace_file(&tls.cert, &cert);
    tls.wait_for_serial(2, Duration::from_secs(3) + Duration::from_secs(15));
    tls.wait_for_epoch(1);
    let log = tls.launcher.log();
    assert_eq!(tls.launcher.status()["last_reload"]["result"], "success", "{log}");
    assert_eq!(tls.launcher.reloads("refused"), 0, "{log}");
    assert!(
        log.contains("since the first change, for a hot restart to epoch 1"),
        "checked while the files settled:\n{log}"
    );
    tls.stop();
}

#[test]
fn bootstrap_syntax_error_changes_nothing() {
    let tls = start_tls(false, &[]);
    let good = std::fs::read_to_string(&tls.bootstrap).expect("read");
    replace_file(&tls.bootstrap, "admin: [unclosed\n");
    let detail = tls.wait_for_refusal();
    assert!(detail.contains("cannot parse the bootstrap"), "{detail}");
    assert_eq!(tls.serial(), 1);
    assert_eq!(admin_get(&tls.admin(), "/ready"), Some(200), "Envoy still LIVE");
    replace_file(&tls.bootstrap, &good);
    let (cert, key) = certificate(6);
    replace_file(&tls.key, &key);
    replace_file(&tls.cert, &cert);
    tls.wait_for_serial(6, DEBOUNCE + Duration::from_secs(15));
    tls.stop();
}

#[test]
fn a_storm_of_rewrites_makes_at_most_two_restarts_and_ends_on_the_last() {
    let tls = start_tls(false, &[]);
    let pairs: Vec<_> = (100..150).map(certificate).collect();
    for (cert, key) in &pairs {
        replace_file(&tls.key, key);
        replace_file(&tls.cert, cert);
        std::thread::sleep(Duration::from_millis(20));
    }
    tls.wait_for_serial(149, DEBOUNCE + Duration::from_secs(15));
    // Any queued restart has finished once no reload is under way (the watcher's debounce is over:
    // serial 149 is served, so the last change was seen).
    tls.launcher.wait_for_status("no reload under way", |s| s["reload"].is_null());
    assert!(tls.restarts() <= 2, "at most 2 restarts for 50 rewrites:\n{}", tls.launcher.log());
    assert_eq!(tls.serial(), 149);
    tls.stop();
}

#[test]
fn sighup_restarts_without_a_change_and_coalesces_during_a_restart() {
    let tls = start_tls(false, &[]);
    tls.launcher.signal(Signal::SIGHUP);
    tls.wait_for_epoch(1);
    // Three SIGHUPs while the next restart is under way: one more restart, not three.
    tls.launcher.signal(Signal::SIGHUP);
    tls.launcher.wait_for_status("the second reload to start", |s| !s["reload"].is_null());
    tls.launcher.signal(Signal::SIGHUP);
    tls.launcher.signal(Signal::SIGHUP);
    // The two SIGHUPs sent during the second restart make one more (epoch 3), and nothing is under
    // way or queued once it serves.
    tls.wait_for_epoch(3);
    assert_eq!(tls.restarts(), 3, "{}", tls.launcher.log());
    assert_eq!(tls.serial(), 1, "same certificate, new epoch");
    let epochs = common::children_of(tls.launcher.pid()).len();
    assert!(epochs <= 2, "never more than two Envoy processes: {epochs}");
    tls.stop();
}

#[test]
fn without_recovery_a_new_epoch_that_fails_leaves_the_old_one_serving_and_blocked() {
    let tls = start_tls(false, &["--drain-timeout", "2s", "--no-recover"]);
    // A listener added on a port that another process holds: validation cannot see it, the
    // new epoch fails to bind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    let bootstrap = tls_bootstrap(tls.dir.path(), tls.port, &tls.cert, &tls.key, Some(taken_port));
    replace_file(&tls.bootstrap, &bootstrap);
    let status = tls.launcher.wait_for_status("degraded", |s| !s["degraded"].is_null());
    assert!(status["degraded"].as_str().is_some_and(|d| d.contains("epoch 1 failed")), "{status:#}");
    assert_eq!(status["current_epoch"], 0);
    assert_eq!(tls.serial(), 1, "the old epoch still serves");
    tls.launcher.signal(Signal::SIGHUP);
    tls.launcher.wait_for_log("SIGHUP: cannot hot-restart");
    assert_eq!(tls.serial(), 1);
    assert_eq!(tls.launcher.reloads("failed"), 1, "the SIGHUP started nothing");
    tls.stop();
}

#[test]
fn sigterm_during_a_hot_restart_ends_both_epochs() {
    let mut tls = start_tls(false, &["--drain-timeout", "5s"]);
    let first = common::children_of(tls.launcher.pid());
    tls.launcher.signal(Signal::SIGHUP);
    tls.launcher.wait_for_status("epoch 1 to be started", |s| {
        s["epochs"].as_array().is_some_and(|epochs| epochs.iter().any(|e| e["epoch"] == 1))
    });
    tls.launcher.signal(Signal::SIGTERM);
    let code = tls.launcher.exit_code(Duration::from_secs(30));
    let log = tls.launcher.log();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("drain ended"), "the drain ran:\n{log}");
    // (The draining epoch, told to terminate by the new one, may still be exiting when the new one
    // has exited: sesame's SIGTERM to it as a leftover is then harmless.)
    assert!(!log.contains("survived SIGKILL") && !log.contains("sending SIGKILL"), "{log}");
    for pid in first {
        assert!(!common::alive(pid), "epoch 0 (pid {pid}) is gone");
    }
}

#[test]
fn a_pair_changed_while_the_reload_waits_for_the_draining_epoch_is_checked_again() {
    let tls = start_tls(false, &[]);
    let (cert, key) = certificate(2);
    replace_file(&tls.key, &key);
    replace_file(&tls.cert, &cert);
    tls.wait_for_epoch(1);
    // The next rotation is validated, then waits for epoch 0 (parent shutdown time 3 s) ...
    let (cert, key) = certificate(3);
    replace_file(&tls.key, &key);
    replace_file(&tls.cert, &cert);
    tls.launcher
        .wait_for_status("the reload to wait for epoch 0", |s| s["reload"] == "waiting for the draining epoch to exit");
    // ... while a key that does not match is written.
    let (_, wrong_key) = certificate(9);
    replace_file(&tls.key, &wrong_key);
    let status = tls.launcher.wait_for_status("the changed pair to be refused", |s| {
        s["last_reload"]["result"] == "refused" && s["reload"].is_null()
    });
    let detail = status["last_reload"]["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("does not match"), "{status:#}");
    assert_eq!((status["current_epoch"].as_u64(), status["degraded"].is_null()), (Some(1), true), "{status:#}");
    assert_eq!(tls.serial(), 2, "epoch 1 still serves the last good pair");
    // The next good pair goes through.
    let (cert, key) = certificate(4);
    replace_file(&tls.key, &key);
    replace_file(&tls.cert, &cert);
    tls.wait_for_serial(4, DEBOUNCE + Duration::from_secs(15));
    tls.stop();
}

#[test]
fn a_copy_that_straddles_the_draining_epochs_exit_is_checked_again() {
    let tls = start_tls(false, &[]);
    tls.launcher.signal(Signal::SIGHUP);
    tls.wait_for_epoch(1);
    tls.launcher.signal(Signal::SIGHUP);
    tls.launcher
        .wait_for_status("the reload to wait for epoch 0", |s| s["reload"] == "waiting for the draining epoch to exit");
    // `cp cert; cp key`, the first the moment epoch 0 has exited, the second 60 ms later.
    tls.launcher.wait_for_status("epoch 0 to exit", |s| s["epochs"].as_array().is_some_and(|e| e.len() == 1));
    let (cert, key) = certificate(3);
    replace_file(&tls.cert, &cert);
    std::thread::sleep(Duration::from_millis(60));
    replace_file(&tls.key, &key);
    tls.wait_for_serial(3, Duration::from_secs(10));
    let status = tls.launcher.status();
    assert!(status["degraded"].is_null(), "{status:#}");
    tls.stop();
}
