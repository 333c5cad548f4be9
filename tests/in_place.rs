//! `--cert-reload in-place` with the real Envoy: certificates swapped through file-based SDS under
//! load, with long-lived connections kept and no new epoch; bad input refused by name with the old
//! certificate served; CA bundles and upstream client certificates rotated in place.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::in_place::{ClientCertUpstream, ca_and_client, client_cert_bootstrap, mtls_bootstrap, mtls_get};
use common::load::{Load, ONE_LOAD_AT_A_TIME};
use common::long_lived::LongLived;
use common::site::{IN_PLACE, Site, Write};
use common::tls::{HttpsClient, certificate, certificate_valid, replace_file};
use common::{Launcher, Mode, children_of, free_ports, http_get, wait_for};
use nix::sys::signal::Signal;

fn fifty_rotations(volume: bool, ways: &[Write]) {
    let _alone = ONE_LOAD_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut site = Site::start(volume, IN_PLACE);
    let started = Instant::now();
    let (https, tcp) = (LongLived::https(site.port), LongLived::tcp_proxy(site.tcp_port));
    let load = Load::start(site.port, 8, 8);
    load.wait_running();
    let mut took = Vec::new();
    for serial in 2..=51u64 {
        let (cert, key) = certificate(serial);
        let written = Instant::now();
        site.write(ways[serial as usize % ways.len()], &cert, &key);
        site.wait_for_serial(serial);
        took.push(written.elapsed());

        assert_eq!(site.envoys(), 1, "one Envoy throughout (rotation {serial})");
    }
    // The connections outlive what a hot restart would have left them (the parent shutdown time).
    let parent_shutdown = Duration::from_secs(3);
    wait_for(parent_shutdown * 2, "the parent shutdown time to pass", || started.elapsed() > parent_shutdown);
    assert!(https.alive() && tcp.alive(), "both long-lived connections are up");
    let outcome = load.stop();
    let log = site.launcher.log();
    outcome.assert_none_failed(500, &log);
    let https_trips = https.stop().unwrap_or_else(|e| panic!("the HTTPS keep-alive connection was cut: {e}\n{log}"));
    let tcp_trips = tcp.stop().unwrap_or_else(|e| panic!("the tcp_proxy connection was cut: {e}\n{log}"));
    let status = site.launcher.status();
    assert_eq!(status["current_epoch"], 0, "no new epoch: {status:#}");
    assert_eq!(status["epochs"].as_array().map(Vec::len), Some(1), "{status:#}");
    assert_eq!(site.launcher.reloads("success"), 0, "no hot restart");
    site.launcher.wait_for_metric("sesame_rotations_total{mode=\"in_place\",result=\"success\"}", |n| n == 50);
    let certificate = site.certificate();
    assert_eq!(certificate["serial"], "33", "the last serial (51) is listed: {certificate:#}");
    assert_eq!(certificate["rotated"], "in-place");
    assert_eq!(certificate["envoy"], "confirmed");
    took.sort();
    eprintln!(
        "{ways:?}: 50 rotations, write to served median {:?} [{:?}, {:?}]; {} requests, none failed; long-lived \
         round trips {https_trips} (HTTPS), {tcp_trips} (tcp_proxy)",
        took[took.len() / 2],
        took[0],
        took[took.len() - 1],
        outcome.sent
    );
    let secrets = site.launcher.runtime_dir().join("sds");
    let mode = |path: &std::path::Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).expect("stat").permissions()) & 0o777
    };
    for dir in std::fs::read_dir(&secrets).expect("the secrets' directory").flatten() {
        assert_eq!(mode(&dir.path()), 0o700, "{} is private", dir.path().display());
        let secret = dir.path().join("secret.json");
        assert_eq!(mode(&secret), 0o600, "{} is private", secret.display());
    }
    let log = site.stop();
    assert!(!secrets.exists(), "the secrets are removed at exit:\n{log}");
}

#[test]
fn fifty_rotations_by_kubernetes_symlink_swap_under_load_cut_nothing() {
    fifty_rotations(true, &[Write::Volume]);
}

#[test]
fn fifty_rotations_by_rename_and_by_cp_over_the_files_under_load_cut_nothing() {
    fifty_rotations(false, &[Write::Rename, Write::CopyOver]);
}

#[test]
fn bad_input_is_refused_by_name_and_the_old_certificate_served() {
    let mut site = Site::start(false, IN_PLACE);
    let (_, other_key) = certificate(9);
    let (expired, expired_key) = certificate_valid(5, Some(3));
    let (cert_2, _) = certificate(2);
    let (whole, _) = certificate(6);
    let half = whole[..whole.len() / 2].to_string();
    let key_path = site.key.clone();
    type Break = Box<dyn Fn(&mut Site)>;
    let cases: Vec<(&str, Break, &str)> = vec![
        ("expired", Box::new(move |s| s.write(Write::Rename, &expired, &expired_key)), "expired"),
        ("mismatched key", Box::new(move |s| replace_file(&s.key.clone(), &other_key)), "does not match"),
        ("half-written PEM", Box::new(move |s| replace_file(&s.cert.clone(), &half)), "cert.pem"),
        (
            "unreadable key",
            Box::new(move |s| {
                replace_file(&s.cert.clone(), &cert_2);
                std::fs::remove_file(&key_path).expect("rm key");
                std::fs::create_dir(&key_path).expect("a directory where the key was");
            }),
            "key.pem",
        ),
    ];
    let mut served = 1;
    for (refused, (name, break_it, reason)) in cases.into_iter().enumerate() {
        break_it(&mut site);
        let detail = site.wait_for_refusal();
        assert!(detail.contains(reason), "{name}: the reason names '{reason}': {detail}");
        site.launcher.wait_for_metric("sesame_rotations_total{mode=\"in_place\",result=\"refused\"}", |n| {
            n == refused as i64 + 1
        });
        assert_eq!(site.serial(), served, "{name}: the old certificate is still served");
        assert_eq!(site.launcher.status()["current_epoch"], 0, "{name}: no new epoch");
        // Back to the good pair, which is served (it is what Envoy has: nothing to swap).
        if site.key.is_dir() {
            std::fs::remove_dir(&site.key).expect("rmdir");
        }
        let (cert, key) = certificate(10 + refused as u64);
        site.write(Write::Rename, &cert, &key);
        served = 10 + refused as u64;
        site.wait_for_serial(served);
        site.launcher.wait_for_status("the refusal to clear", |s| s["certificates"][0]["refused"].is_null());
    }
    assert_eq!(site.rotations("success"), 4);
    let log = site.stop();
    assert!(log.contains("names no node id and cluster"), "sesame says it set a node:\n{log}");
}

/// A good pair, then `delay` later a certificate that does not match its key: only certificates
/// that passed the checks are ever served, whatever the delay.
fn window(options: &[&str], delays: &[u64]) {
    let mut site = Site::start(false, options);
    let mut good = vec![1u64];
    for (i, delay) in delays.iter().enumerate() {
        let serial = 10 * (i as u64 + 1);
        let (cert, key) = certificate(serial);
        let (bad, _) = certificate(serial + 1);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let prober = {
            let (seen, stop, port) = (seen.clone(), stop.clone(), site.port);
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Ok((_, s)) = HttpsClient::new(port, false).get() {
                        seen.lock().expect("seen").insert(s);
                    }
                }
            })
        };
        site.write(Write::Rename, &cert, &key);
        std::thread::sleep(Duration::from_millis(*delay)); // the window under test, not a wait
        replace_file(&site.cert, &bad);
        good.push(serial);
        // Refused by name, in place or as a reload, once the files settle.
        let refusals = || {
            site.launcher.metric("sesame_rotations_total{mode=\"in_place\",result=\"refused\"}")
                + site.launcher.reloads("refused") as i64
        };
        wait_for(Duration::from_secs(30), "the bad certificate to be refused", || refusals() > i as i64);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        prober.join().expect("prober");
        let seen = seen.lock().expect("seen").clone();
        assert!(seen.iter().all(|s| good.contains(s)), "{delay} ms: served only checked serials {good:?}: {seen:?}");
        // A good pair again, the next round starts from it.
        let (cert, key) = certificate(serial + 2);
        site.write(Write::Rename, &cert, &key);
        site.wait_for_serial(serial + 2);
        good.push(serial + 2);
        eprintln!("{options:?} {delay} ms: served {seen:?}");
    }
    site.stop();
}

const DELAYS: &[u64] = &[0, 5, 20, 50, 100];

#[test]
fn a_bad_write_after_a_good_one_is_never_served_in_place() {
    window(IN_PLACE, DELAYS);
}

#[test]
fn a_bad_write_after_a_good_one_is_never_served_by_hot_restart() {
    window(&[], DELAYS);
}

#[test]
fn a_ca_bundle_rotated_in_place_admits_clients_of_the_new_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_pem, key_pem) = certificate(1);
    let (cert, key, ca) = (dir.path().join("cert.pem"), dir.path().join("key.pem"), dir.path().join("ca.pem"));
    std::fs::write(&cert, cert_pem).expect("cert");
    std::fs::write(&key, key_pem).expect("key");
    let (ca_1, client_1, client_key_1) = ca_and_client(100);
    let (ca_2, client_2, client_key_2) = ca_and_client(200);
    std::fs::write(&ca, &ca_1).expect("ca");
    let [port] = free_ports();
    let bootstrap = dir.path().join("envoy.yaml");
    std::fs::write(&bootstrap, mtls_bootstrap(dir.path(), port, &cert, &key, &ca)).expect("bootstrap");
    let mut launcher = Launcher::start_envoy(Mode::Pid1, IN_PLACE, &bootstrap);
    assert_eq!(mtls_get(port, &client_1, &client_key_1), Ok(200), "a client of the first CA is admitted");
    assert!(mtls_get(port, &client_2, &client_key_2).is_err(), "a client of the second is not, yet");
    replace_file(&ca, &ca_2);
    wait_for(Duration::from_secs(15), "a client of the new CA to be admitted", || {
        mtls_get(port, &client_2, &client_key_2) == Ok(200)
    });
    assert!(mtls_get(port, &client_1, &client_key_1).is_err(), "a client of the old CA is refused now");
    assert_eq!(launcher.status()["current_epoch"], 0, "no new epoch");
    launcher.wait_for_metric("sesame_rotations_total{mode=\"in_place\",result=\"success\"}", |n| n == 1);
    launcher.signal(Signal::SIGTERM);
    assert_eq!(launcher.exit_code(Duration::from_secs(30)), 0);
}

#[test]
fn an_upstream_client_certificate_rotated_in_place_is_shown_on_new_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = ClientCertUpstream::start();
    let (cert, key) = (dir.path().join("client.crt"), dir.path().join("client.key"));
    let (cert_pem, key_pem) = certificate(1);
    std::fs::write(&cert, cert_pem).expect("cert");
    std::fs::write(&key, key_pem).expect("key");
    let [port] = free_ports();
    let bootstrap = dir.path().join("envoy.yaml");
    std::fs::write(&bootstrap, client_cert_bootstrap(dir.path(), port, upstream.port, &cert, &key)).expect("bootstrap");
    let mut launcher = Launcher::start_envoy(Mode::Pid1, IN_PLACE, &bootstrap);
    assert_eq!(http_get(port), Some(200), "through the upstream");
    assert_eq!(upstream.last_serial(), Some(1));
    let (cert_pem, key_pem) = certificate(2);
    replace_file(&key, &key_pem);
    replace_file(&cert, &cert_pem);
    wait_for(Duration::from_secs(15), "the upstream to be shown serial 2", || {
        http_get(port) == Some(200) && upstream.last_serial() == Some(2)
    });
    assert_eq!(launcher.status()["current_epoch"], 0, "no new epoch");
    launcher.signal(Signal::SIGTERM);
    assert_eq!(launcher.exit_code(Duration::from_secs(30)), 0);
}

#[test]
fn a_bootstrap_with_no_certificate_file_runs_as_written_and_gets_no_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let [port, upstream] = free_ports();
    let bootstrap = common::proxy_bootstrap(dir.path(), port, upstream);
    let mut launcher = Launcher::start_envoy(Mode::Plain, IN_PLACE, &bootstrap);
    let log = launcher.log();
    assert!(log.contains("the bootstrap names no certificate or CA by file"), "{log}");
    assert!(!log.contains("names no node"), "no node is set where Envoy needs none:\n{log}");
    let argv = std::fs::read(format!("/proc/{}/cmdline", children_of(launcher.pid())[0])).expect("cmdline");
    assert!(String::from_utf8_lossy(&argv).contains(&*bootstrap.to_string_lossy()), "Envoy runs on the user's file");
    launcher.signal(Signal::SIGTERM);
    assert_eq!(launcher.exit_code(Duration::from_secs(30)), 0);
}

#[test]
fn a_pair_envoy_rejects_is_a_refusal_and_its_secret_file_holds_what_envoy_serves_again() {
    let site = Site::start(false, IN_PLACE);
    let first = std::fs::read_to_string(&site.cert).expect("cert");
    let fixture = |name: &str| {
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name))
            .expect("fixture")
    };
    // A pair that matches and is valid, beyond sesame's checks (a 1024-bit RSA key), which Envoy refuses.
    replace_file(&site.key, &fixture("rsa1024-key.pem"));
    replace_file(&site.cert, &fixture("rsa1024-cert.pem"));
    site.launcher.wait_for_metric("sesame_rotations_total{mode=\"in_place\",result=\"rejected\"}", |n| n == 1);
    let detail = site.wait_for_refusal();
    assert!(detail.contains("Envoy rejected") && detail.contains("update_rejected"), "{detail}");
    assert_eq!(site.serial(), 1, "Envoy keeps the old certificate");
    let secrets = std::fs::read_dir(site.launcher.runtime_dir().join("sds")).expect("sds").flatten();
    let written: Vec<serde_json::Value> = secrets
        .map(|dir| {
            serde_json::from_slice(&std::fs::read(dir.path().join("secret.json")).expect("secret")).expect("json")
        })
        .collect();
    let chain = &written[0]["resources"][0]["tls_certificate"]["certificate_chain"]["inline_string"];
    assert_eq!(chain.as_str(), Some(first.as_str()), "written back: the next epoch starts on what Envoy serves");
    // A hot restart now: its checks judge the user's files as Envoy does, and refuse them; the
    // serving epoch is untouched.
    site.launcher.signal(Signal::SIGHUP);
    site.launcher.wait_for_metric("sesame_reloads_total{result=\"refused\"}", |n| n == 1);
    assert_eq!(site.serial(), 1);
    assert_eq!(site.launcher.metric("sesame_rotations_total{mode=\"in_place\",result=\"rejected\"}"), 1);
    let (cert, key) = certificate(2);
    replace_file(&site.key, &key);
    replace_file(&site.cert, &cert);
    site.wait_for_serial(2);
    site.launcher.wait_for_status("the refusal to clear", |s| s["certificates"][0]["refused"].is_null());
    site.stop();
}
