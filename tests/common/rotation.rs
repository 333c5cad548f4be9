//! A TLS Envoy under sesame for the rotation tests: a certificate with serial 1 served from plain
//! files or a Kubernetes-style secret volume, and what the tests ask of it.

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::tls::{HttpsClient, SecretVolume, certificate, replace_file, tls_bootstrap};
use super::{Launcher, Mode, free_port, wait_for};

/// Short drain and parent-shutdown times, so that the old epoch exits within the test.
pub const OPTIONS: &[&str] =
    &["--envoy-drain-time", "2s", "--envoy-parent-shutdown-time", "3s", "--log-level", "debug"];
pub const DEBOUNCE: Duration = Duration::from_millis(500);

pub struct Tls {
    pub launcher: Launcher,
    pub volume: Option<SecretVolume>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bootstrap: PathBuf,
}

/// Envoy serving a certificate with serial 1 from `cert_dir` (plain files, or a secret volume).
pub fn start_tls(volume: bool, extra: &[&str]) -> Tls {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    let (cert_pem, key_pem) = certificate(1);
    let (cert, key, volume) = if volume {
        let volume = SecretVolume::new(&certs, &cert_pem, &key_pem);
        (certs.join("tls.crt"), certs.join("tls.key"), Some(volume))
    } else {
        std::fs::create_dir(&certs).expect("mkdir");
        std::fs::write(certs.join("cert.pem"), &cert_pem).expect("cert");
        std::fs::write(certs.join("key.pem"), &key_pem).expect("key");
        (certs.join("cert.pem"), certs.join("key.pem"), None)
    };
    let port = free_port();
    let bootstrap = dir.path().join("envoy.yaml");
    std::fs::write(&bootstrap, tls_bootstrap(dir.path(), port, &cert, &key, None)).expect("bootstrap");
    let options: Vec<&str> = OPTIONS.iter().chain(extra).copied().collect();
    // One worker: on 2 cores, the other is left to the load clients, the validator and the next epoch.
    let launcher = Launcher::start_envoy_with(Mode::Pid1, &options, &bootstrap, &["--concurrency", "1"]);
    let tls = Tls { launcher, volume, port, dir, cert, key, bootstrap };
    assert_eq!(tls.serial(), 1, "the first certificate is served");
    tls
}

impl Tls {
    pub fn serial(&self) -> u64 {
        let (status, serial) = HttpsClient::new(self.port, false).get().expect("https request");
        assert_eq!(status, 200);
        serial
    }

    pub fn wait_for_serial(&self, serial: u64, within: Duration) {
        wait_for(within, &format!("certificate serial {serial} to be served"), || {
            HttpsClient::new(self.port, false).get().is_ok_and(|(_, s)| s == serial)
        });
    }

    /// Reloads that ended with a new epoch LIVE, as `/metrics` counts them.
    pub fn restarts(&self) -> u64 {
        self.launcher.reloads("success")
    }

    /// Waits until epoch `epoch` serves and no reload is under way or queued.
    pub fn wait_for_epoch(&self, epoch: u64) {
        self.launcher.wait_for_status(&format!("epoch {epoch} to serve, no reload under way"), |s| {
            s["current_epoch"] == epoch && s["reload"].is_null()
        });
    }

    /// Waits until the last reload was refused; returns its reason.
    pub fn wait_for_refusal(&self) -> String {
        let status = self.launcher.wait_for_status("a refused reload", |s| s["last_reload"]["result"] == "refused");
        status["last_reload"]["detail"].as_str().unwrap_or_default().to_string()
    }

    pub fn admin(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    pub fn stop(mut self) -> String {
        self.launcher.signal(Signal::SIGTERM);
        let code = self.launcher.exit_code(Duration::from_secs(30));
        let log = self.launcher.log();
        assert_eq!(code, 0, "log:\n{log}");
        log
    }
}

/// Bad input: after `break_it`, no new epoch and the old certificate still served, with `reason`
/// in the log; then a good pair IS picked up.
pub fn bad_input_changes_nothing(break_it: impl FnOnce(&Tls), reason: &str) {
    let tls = start_tls(false, &[]);
    break_it(&tls);
    let detail = tls.wait_for_refusal();
    assert!(detail.contains(reason), "the reason is '{reason}': {detail}");
    let log = tls.launcher.log();
    assert!(log.contains(reason), "the log says '{reason}':\n{log}");
    assert_eq!(tls.launcher.status()["epochs"].as_array().map(Vec::len), Some(1), "no new epoch:\n{log}");
    assert_eq!(tls.serial(), 1, "the old certificate is still served");

    let (cert, key) = certificate(3);
    replace_file(&tls.key, &key);
    replace_file(&tls.cert, &cert);
    tls.wait_for_serial(3, DEBOUNCE + Duration::from_secs(15));
    tls.wait_for_epoch(1);
    assert_eq!(tls.restarts(), 1);
    tls.stop();
}
