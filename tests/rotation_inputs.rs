//! Validated hot restarts with the real Envoy, by input: key types beyond sesame's own checks,
//! half-written and encrypted keys, camelCase JSON, and watched files that never rest.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::rotation::{DEBOUNCE, OPTIONS, bad_input_changes_nothing, start_tls};
use common::tls::{certificate, certificate_valid, replace_file, tls_bootstrap};
use common::{Launcher, Mode, free_port};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{FIXTURES}/{name}")).expect("fixture")
}

#[test]
fn a_key_type_beyond_sesames_checks_is_left_to_envoy_and_rotated_in() {
    let tls = start_tls(false, &[]);
    // P-521: Envoy serves it, ring (sesame's check) cannot load it.
    replace_file(&tls.key, &fixture("p521-key.pem"));
    replace_file(&tls.cert, &fixture("p521-cert.pem"));
    tls.wait_for_epoch(1);
    assert_eq!(tls.restarts(), 1, "{}", tls.launcher.log());
    let certs = common::admin_body(&tls.admin(), "/certs").expect("/certs");
    assert!(certs.contains("\"serial_number\": \"0209\""), "Envoy serves the P-521 certificate (serial 521): {certs}");
    tls.launcher.wait_for_log("not matched against");
    assert!(tls.launcher.log().contains("its type is beyond sesame's checks"), "{}", tls.launcher.log());
    tls.stop();
}

#[test]
fn a_half_written_certificate_is_named_in_words() {
    bad_input_changes_nothing(
        |tls| {
            let (cert, _) = certificate(12);
            replace_file(&tls.cert, &cert[..cert.len() / 2]);
        },
        "a PEM block has no end line (-----END CERTIFICATE-----): is the file half written?",
    );
}

#[test]
fn an_encrypted_key_without_its_password_is_refused_with_the_reason() {
    bad_input_changes_nothing(
        |tls| {
            replace_file(&tls.key, &fixture("encrypted-key.pem"));
            replace_file(&tls.cert, &fixture("encrypted-cert.pem"));
        },
        "is encrypted and the bootstrap gives no password for it",
    );
}

#[test]
fn a_camel_case_json_bootstrap_gets_the_same_pair_checks() {
    // Envoy reads the proto's JSON names too; an expired certificate, which Envoy itself would
    // load and serve, must be refused all the same.
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let (cert_pem, key_pem) = certificate(1);
    std::fs::write(&cert, cert_pem).expect("cert");
    std::fs::write(&key, key_pem).expect("key");
    let port = free_port();
    let yaml = tls_bootstrap(dir.path(), port, &cert, &key, None)
        .replace("certificate_chain:", "certificateChain:")
        .replace("private_key:", "privateKey:")
        .replace("tls_certificates:", "tlsCertificates:");
    let json: serde_json::Value = serde_saphyr::from_str(&yaml).expect("yaml");
    let bootstrap = dir.path().join("envoy.json");
    std::fs::write(&bootstrap, json.to_string()).expect("json");
    let launcher = Launcher::start_envoy_with(Mode::Pid1, OPTIONS, &bootstrap, &["--concurrency", "1"]);
    let (expired_cert, expired_key) = certificate_valid(4, Some(2));
    replace_file(&key, &expired_key);
    replace_file(&cert, &expired_cert);
    let status = launcher.wait_for_status("the reload to be refused", |s| s["last_reload"]["result"] == "refused");
    let detail = status["last_reload"]["detail"].as_str().expect("detail");
    assert!(detail.contains(&format!("certificate {} expired on", cert.display())), "{detail}");
    assert_eq!(status["current_epoch"], 0);
}

/// Writes `file` every `every` until the returned flag is set.
fn keep_writing(file: PathBuf, every: Duration) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut n = 0u64;
        while !flag.load(Ordering::SeqCst) {
            n += 1;
            std::fs::write(&file, format!("line {n}\n")).expect("write");
            std::thread::sleep(every);
        }
    });
    (stop, writer)
}

#[test]
fn a_busy_neighbour_in_the_certificate_directory_does_not_hold_the_reload() {
    let tls = start_tls(false, &[]);
    // An access log written every 100 ms next to the certificate.
    let (stop, writer) = keep_writing(tls.cert.with_file_name("access.log"), Duration::from_millis(100));
    let (cert, key) = certificate(2);
    replace_file(&tls.key, &key);
    replace_file(&tls.cert, &cert);
    tls.wait_for_serial(2, DEBOUNCE + Duration::from_secs(10));
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer");
    tls.wait_for_epoch(1);
    assert_eq!(tls.restarts(), 1, "the access log caused no reload");
    tls.stop();
}

#[test]
fn a_watched_file_that_never_rests_is_reloaded_at_the_debounce_cap() {
    // A --watch directory whose file changes every 100 ms: the debounce never sees quiet, and the
    // cap (1 s here) ends the wait.
    let busy = tempfile::tempdir().expect("tempdir");
    let busy_dir = busy.path().to_string_lossy().into_owned();
    let tls = start_tls(false, &["--watch", &busy_dir, "--reload-debounce-max", "1s"]);
    let (stop, writer) = keep_writing(busy.path().join("config.txt"), Duration::from_millis(100));
    let (cert, key) = certificate(2);
    replace_file(&tls.key, &key);
    replace_file(&tls.cert, &cert);
    tls.wait_for_serial(2, Duration::from_secs(1) + Duration::from_secs(10));
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer");
    tls.stop();
}
