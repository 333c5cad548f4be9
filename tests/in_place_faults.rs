//! `--cert-reload in-place` with the real Envoy when things go wrong: certificates that fail at
//! start, a deleted runtime directory, a drain, Envoy's own refusal at start, no `sds.*` stats, a
//! certificate not yet valid.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::site::{IN_PLACE, Site, Write};
use common::tls::{HttpsClient, certificate, certificate_valid, replace_file};
use common::{Launcher, Mode, free_ports};
use nix::sys::signal::Signal;

/// At start Envoy judges the certificates, as it always did (an expired one is served, and every
/// other listener with it); the first reload whose checks pass gives them by SDS, and the next
/// change is swapped in place.
#[test]
fn a_certificate_that_fails_the_checks_at_start_is_left_to_envoy_until_a_reload_passes() {
    let mut site = Site::start_with(false, IN_PLACE, certificate_valid(7, Some(2)), 7);
    let log = site.launcher.log();
    assert!(log.contains("expired") && log.contains("Envoy reads the certificates from their files"), "{log}");
    assert_eq!(site.launcher.status()["certificates"], serde_json::json!([]), "nothing by SDS yet");
    let (cert, key) = certificate(2);
    site.write(Write::Rename, &cert, &key);
    site.wait_for_serial(2);
    site.launcher.wait_for_status("epoch 1 to serve", |s| s["current_epoch"] == 1 && s["reload"].is_null());
    assert_eq!(site.launcher.reloads("success"), 1, "a hot restart gave the first checked pair");
    assert_eq!(site.certificate()["rotated"], "hot-restart");
    let (cert, key) = certificate(3);
    site.write(Write::Rename, &cert, &key);
    site.wait_for_serial(3);
    site.launcher.wait_for_metric("sesame_rotations_total{mode=\"in_place\",result=\"success\"}", |n| n == 1);
    assert_eq!(site.launcher.status()["current_epoch"], 1, "in place from then on");
    site.stop();
}

/// A deleted runtime directory takes Envoy's watches of the secrets with it: the swap that Envoy
/// does not confirm becomes a hot restart, whose epoch watches the directories made again, and the
/// next change is swapped in place.
#[test]
fn with_the_runtime_directory_deleted_an_unconfirmed_swap_becomes_a_hot_restart_and_then_in_place_again() {
    let mut site = Site::start(false, IN_PLACE);
    std::fs::remove_dir_all(site.launcher.runtime_dir()).expect("rm -rf the runtime directory");
    let (cert, key) = certificate(2);
    site.write(Write::Rename, &cert, &key);
    site.launcher.wait_for_metric("sesame_rotations_total{mode=\"in_place\",result=\"unconfirmed\"}", |n| n == 1);
    site.launcher.wait_for_status("epoch 1 to serve", |s| s["current_epoch"] == 1 && s["reload"].is_null());
    assert_eq!(site.launcher.reloads("success"), 1, "the hot restart's checks and epoch found their files");
    assert_eq!(site.serial(), 2, "the new epoch serves the checked certificate");
    let (cert, key) = certificate(3);
    site.write(Write::Rename, &cert, &key);
    site.wait_for_serial(3);
    site.launcher.wait_for_metric("sesame_rotations_total{mode=\"in_place\",result=\"success\"}", |n| n == 1);
    assert_eq!(site.launcher.status()["current_epoch"], 1, "in place again");
    site.stop();
}

/// A drain lasts up to --drain-timeout: the clients that still connect meanwhile get the
/// certificate rotated during it.
#[test]
fn a_certificate_rotated_during_the_drain_is_swapped_for_the_clients_that_still_connect() {
    let mut site = Site::start(false, &["--cert-reload", "in-place", "--drain-timeout", "30s"]);
    // An idle connection holds the drain open.
    let idle = std::net::TcpStream::connect(("127.0.0.1", site.port)).expect("connect");
    site.launcher.signal(Signal::SIGTERM);
    site.launcher.wait_for_drain();
    let (cert, key) = certificate(2);
    site.write(Write::Rename, &cert, &key);
    site.wait_for_serial(2);
    assert!(site.launcher.is_draining(), "still draining");
    drop(idle);
    assert_eq!(site.launcher.exit_code(Duration::from_secs(60)), 0, "{}", site.launcher.log());
}

/// A key only Envoy can judge, which it refuses, at start: Envoy is given the files and fails as it
/// would without sesame, rather than starting by SDS without the certificate.
#[test]
fn a_pair_envoy_refuses_at_start_fails_the_start_as_without_sesame_in_both_modes() {
    for mode in ["in-place", "hot-restart"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let (cert, key) = (fixtures.join("rsa1024-cert.pem"), fixtures.join("rsa1024-key.pem"));
        let [port] = free_ports();
        let bootstrap = dir.path().join("envoy.yaml");
        std::fs::write(&bootstrap, common::tls::tls_bootstrap(dir.path(), port, &cert, &key, None)).expect("bootstrap");
        let envoy = common::envoy_bin();
        let command = [envoy.to_str().expect("utf-8"), "-c", bootstrap.to_str().expect("utf-8")];
        let mut launcher = Launcher::start(Mode::Plain, &["--cert-reload", mode], &command);
        assert_eq!(launcher.exit_code(Duration::from_secs(30)), 1, "{mode}: Envoy's own exit status");
        let log = launcher.log();
        assert!(log.contains("envoy --mode validate refuses"), "{mode}: sesame says why:\n{log}");
        assert!(log.contains("2048-bit or larger keys"), "{mode}: Envoy's own reason:\n{log}");
    }
}

/// A `stats_matcher` that keeps no `sds.*` stats (as many production bootstraps have): the swap is
/// confirmed by the serial Envoy serves, and stays in place.
#[test]
fn without_envoys_sds_stats_a_swap_is_confirmed_by_the_served_serial() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_pem, key_pem) = certificate(1);
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, cert_pem).expect("cert");
    std::fs::write(&key, key_pem).expect("key");
    let [port] = free_ports();
    let matcher = "stats_config:\n  stats_matcher:\n    inclusion_list:\n      patterns: [{ prefix: \"http.\" }, { prefix: \"listener.\" }, { prefix: \"server.\" }]\n";
    let bootstrap = dir.path().join("envoy.yaml");
    std::fs::write(&bootstrap, format!("{matcher}{}", common::tls::tls_bootstrap(dir.path(), port, &cert, &key, None)))
        .expect("bootstrap");
    let mut launcher = Launcher::start_envoy(Mode::Plain, IN_PLACE, &bootstrap);
    let (cert_pem, key_pem) = certificate(2);
    replace_file(&key, &key_pem);
    replace_file(&cert, &cert_pem);
    launcher.wait_for_metric("sesame_rotations_total{mode=\"in_place\",result=\"success\"}", |n| n == 1);
    assert_eq!(HttpsClient::new(port, false).get().map(|(_, s)| s), Ok(2));
    assert_eq!(launcher.reloads("success"), 0, "no hot restart");
    assert_eq!(launcher.status()["certificates"][0]["envoy"], "confirmed");
    launcher.signal(Signal::SIGTERM);
    assert_eq!(launcher.exit_code(Duration::from_secs(30)), 0);
}

/// A certificate issued by a clock ahead of ours is refused while it is not yet valid, and swapped
/// once it is, with no write needed.
#[test]
fn a_certificate_not_yet_valid_is_swapped_once_it_is() {
    let mut site = Site::start(false, IN_PLACE);
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params.serial_number = Some(rcgen::SerialNumber::from(2u64));
    params.not_before = time::OffsetDateTime::now_utc() + time::Duration::seconds(3);
    let cert = params.self_signed(&key).expect("sign").pem();
    site.write(Write::Rename, &cert, &key.serialize_pem());
    let detail = site.wait_for_refusal();
    assert!(detail.contains("is not valid before"), "{detail}");
    assert_eq!(site.serial(), 1);
    site.wait_for_serial(2);
    site.launcher.wait_for_status("the refusal to clear", |s| s["certificates"][0]["refused"].is_null());
    site.stop();
}
