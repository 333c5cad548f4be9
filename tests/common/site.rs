//! Envoy under sesame for the in-place tests: an HTTPS listener and a TLS `tcp_proxy` listener
//! serving one certificate (plain files or a secret volume), the ways a test writes a new pair,
//! and what it asks of the launcher.

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::in_place::tcp_proxy_bootstrap;
use super::long_lived::echo_upstream;
use super::rotation::OPTIONS;
use super::tls::{HttpsClient, SecretVolume, certificate, replace_file};
use super::{Launcher, Mode, children_of, free_ports, wait_for};

pub const IN_PLACE: &[&str] = &["--cert-reload", "in-place"];

/// How the tests write a new certificate and key.
#[derive(Clone, Copy, Debug)]
pub enum Write {
    /// The kubelet's `..data` symlink swap.
    Volume,
    /// Each file renamed into place, key first.
    Rename,
    /// `cp` over each file: truncated, then written (two steps each).
    CopyOver,
}

pub struct Site {
    pub launcher: Launcher,
    pub volume: Option<SecretVolume>,
    pub port: u16,
    pub tcp_port: u16,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub _dir: tempfile::TempDir,
}

impl Site {
    /// Envoy under sesame serving serial 1 on an HTTPS listener and a TLS `tcp_proxy` listener, in
    /// place, with the bootstrap's certificate files in a secret volume or plain files.
    pub fn start(volume: bool, options: &[&str]) -> Site {
        Self::start_with(volume, options, certificate(1), 1)
    }

    /// The same, serving `pair` whose serial is `serial`.
    pub fn start_with(volume: bool, options: &[&str], pair: (String, String), serial: u64) -> Site {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        let (cert_pem, key_pem) = pair;
        let (cert, key, volume) = if volume {
            let volume = SecretVolume::new(&certs, &cert_pem, &key_pem);
            (certs.join("tls.crt"), certs.join("tls.key"), Some(volume))
        } else {
            std::fs::create_dir(&certs).expect("mkdir");
            std::fs::write(certs.join("cert.pem"), &cert_pem).expect("cert");
            std::fs::write(certs.join("key.pem"), &key_pem).expect("key");
            (certs.join("cert.pem"), certs.join("key.pem"), None)
        };
        let [port, tcp_port] = free_ports();
        let bootstrap = dir.path().join("envoy.yaml");
        let yaml = tcp_proxy_bootstrap(dir.path(), port, tcp_port, echo_upstream(), &cert, &key);
        std::fs::write(&bootstrap, yaml).expect("bootstrap");
        let options: Vec<&str> = OPTIONS.iter().chain(options).copied().collect();
        let launcher = Launcher::start_envoy_with(Mode::Pid1, &options, &bootstrap, &["--concurrency", "1"]);
        let site = Site { launcher, volume, port, tcp_port, cert, key, _dir: dir };
        assert_eq!(site.serial(), serial, "the first certificate is served");
        site
    }

    pub fn serial(&self) -> u64 {
        HttpsClient::new(self.port, false).get().expect("https request").1
    }

    pub fn wait_for_serial(&self, serial: u64) {
        wait_for(Duration::from_secs(15), &format!("certificate serial {serial} to be served"), || {
            HttpsClient::new(self.port, false).get().is_ok_and(|(_, s)| s == serial)
        });
    }

    pub fn write(&mut self, how: Write, cert: &str, key: &str) {
        match how {
            Write::Volume => self.volume.as_mut().expect("a volume").swap(cert, key),
            Write::Rename => {
                replace_file(&self.key, key);
                replace_file(&self.cert, cert);
            }
            Write::CopyOver => {
                std::fs::write(&self.key, key).expect("cp key");
                std::fs::write(&self.cert, cert).expect("cp cert");
            }
        }
    }

    /// The one certificate of `/status`.
    pub fn certificate(&self) -> serde_json::Value {
        let status = self.launcher.status();
        let certificates = status["certificates"].as_array().cloned().unwrap_or_default();
        certificates.into_iter().find(|c| c["path"] == self.cert.to_string_lossy().as_ref()).unwrap_or_else(|| {
            panic!("/status lists {}: {status:#}", self.cert.display());
        })
    }

    pub fn rotations(&self, result: &str) -> i64 {
        self.launcher.metric(&format!("sesame_rotations_total{{mode=\"in_place\",result=\"{result}\"}}"))
    }

    /// Envoy processes under sesame now.
    pub fn envoys(&self) -> usize {
        children_of(self.launcher.pid()).len()
    }

    /// Waits until the files' last state was refused; its reason.
    pub fn wait_for_refusal(&self) -> String {
        let path = self.cert.to_string_lossy().into_owned();
        let status = self.launcher.wait_for_status("the files to be refused", |s| {
            s["certificates"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["path"] == path.as_str() && c["refused"].is_object())
        });
        let certificates = status["certificates"].as_array().cloned().unwrap_or_default();
        let refused = certificates.iter().find(|c| c["path"] == path.as_str()).map(|c| c["refused"]["detail"].clone());
        refused.and_then(|d| d.as_str().map(str::to_string)).unwrap_or_default()
    }

    pub fn stop(mut self) -> String {
        self.launcher.signal(Signal::SIGTERM);
        let code = self.launcher.exit_code(Duration::from_secs(30));
        let log = self.launcher.log();
        assert_eq!(code, 0, "log:\n{log}");
        log
    }
}
