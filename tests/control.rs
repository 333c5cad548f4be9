//! The control surface with the real Envoy behind it: the control socket and --http endpoints,
//! HTTPS with a certificate swapped on change, the client subcommands, and systemd notify.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::tls::{HttpsClient, certificate, replace_file, tls_bootstrap};
use common::{Launcher, Mode, SESAME, control, control_tcp, free_port, wait_for};
use nix::sys::signal::Signal;

struct Tls {
    launcher: Launcher,
    /// Holds the certificate and bootstrap files for as long as Envoy runs.
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

/// In `dir`: a certificate (serial 1), its key, and a bootstrap serving them over HTTPS.
fn tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let (cert_pem, key_pem) = certificate(1);
    std::fs::write(&cert, cert_pem).expect("cert");
    std::fs::write(&key, key_pem).expect("key");
    let bootstrap = dir.join("envoy.yaml");
    std::fs::write(&bootstrap, tls_bootstrap(dir, free_port(), &cert, &key, None)).expect("bootstrap");
    (cert, key, bootstrap)
}

/// Envoy with an HTTPS listener on certificate serial 1, under sesame with `options`.
fn start(options: &[&str]) -> Tls {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key, bootstrap) = tls_files(dir.path());
    let mut all = vec!["--envoy-drain-time", "2s", "--envoy-parent-shutdown-time", "3s"];
    all.extend(options);
    let launcher = Launcher::start_envoy(Mode::Pid1, &all, &bootstrap);
    Tls { launcher, _dir: dir, cert, key }
}

impl Tls {
    fn socket(&self) -> PathBuf {
        self.launcher.runtime_dir().join("control.sock")
    }

    fn get(&self, path: &str) -> (u16, String) {
        control(&self.socket(), "GET", path).expect("control socket")
    }

    fn client(&self, args: &[&str]) -> (i32, String, String) {
        let runtime = self.launcher.runtime_dir();
        let output =
            Command::new(SESAME).args(args).arg("--runtime-dir").arg(&runtime).output().expect("run the client");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (output.status.code().unwrap_or(-1), text(&output.stdout), text(&output.stderr))
    }

    fn wait_ready(&self) {
        wait_for(Duration::from_secs(10), "/ready to answer 200", || {
            control(&self.socket(), "GET", "/ready").is_ok_and(|(status, _)| status == 200)
        });
    }
}

fn metric(text: &str, name: &str, label: Option<(&str, &str)>) -> f64 {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[test]
fn control_socket_endpoints_follow_reloads_and_drains() {
    let mut tls = start(&[]);
    tls.wait_ready();
    let mode = std::fs::metadata(tls.socket()).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is for its owner only");
    assert_eq!(tls.get("/healthz").0, 200);
    let (status, body) = tls.get("/status");
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    assert_eq!(json["state"], "running");
    assert_eq!(json["epochs"][0]["state"], "live");
    assert_eq!(json["envoy"]["state"], "LIVE", "{json:#}");
    assert_eq!(tls.get("/nonexistent").0, 404);

    let (status, body) = control(&tls.socket(), "POST", "/reload").expect("reload");
    assert_eq!((status, body.contains("\"epoch\": 1")), (200, true), "{body}");
    let metrics = tls.get("/metrics").1;
    assert_eq!(metric(&metrics, "sesame_reloads_total", Some(("result", "success"))), 1.0, "{metrics}");
    assert_eq!(metric(&metrics, "sesame_epochs_started_total", None), 2.0, "{metrics}");
    assert_eq!(metric(&metrics, "sesame_current_epoch", None), 1.0, "{metrics}");

    // A bad certificate: refused with the reason, counted, nothing changes.
    replace_file(&tls.cert, "garbage\n");
    let (status, body) = control(&tls.socket(), "POST", "/reload").expect("reload");
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("no PEM CERTIFICATE block"), "{body}");
    let metrics = tls.get("/metrics").1;
    assert_eq!(metric(&metrics, "sesame_reloads_total", Some(("result", "refused"))), 1.0, "{metrics}");
    assert_eq!(tls.get("/ready").0, 200, "still serving");

    // Two callers of /shutdown at once both get the answer when the drain is done.
    let socket = tls.socket();
    let callers: Vec<_> = (0..2)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || control(&socket, "POST", "/shutdown"))
        })
        .collect();
    for caller in callers {
        assert_eq!(caller.join().expect("caller"), Ok((200, "drained\n".to_string())));
    }
    let code = tls.launcher.exit_code(Duration::from_secs(30));
    assert_eq!(code, 0, "log:\n{}", tls.launcher.log());
    assert!(tls.launcher.log().contains("control API /shutdown: draining Envoy"));
}

#[test]
fn http_endpoint_with_a_token() {
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let token_dir = tempfile::tempdir().expect("tempdir");
    let token = token_dir.path().join("token");
    std::fs::write(&token, "s3cret\n").expect("token");
    let token_arg = token.to_string_lossy().into_owned();
    let tls = start(&["--http", &address, "--http-token", &token_arg]);
    tls.wait_ready();
    assert_eq!(control_tcp(port, "GET", "/healthz", &[]).expect("healthz").0, 200);
    assert_eq!(control_tcp(port, "GET", "/ready", &[]).expect("ready").0, 200);
    assert_eq!(control_tcp(port, "POST", "/reload", &[]).expect("reload").0, 401, "no token");
    assert_eq!(control_tcp(port, "POST", "/reload", &["Authorization: Bearer nope"]).expect("reload").0, 401);
    let (status, body) = control_tcp(port, "POST", "/reload", &["Authorization: Bearer s3cret"]).expect("reload");
    assert_eq!(status, 200, "{body}");
    let metrics = control_tcp(port, "GET", "/metrics", &[]).expect("metrics").1;
    assert_eq!(metric(&metrics, "sesame_reloads_total", Some(("result", "success"))), 1.0);
    assert_eq!(control_tcp(port, "GET", "/shutdown", &[]).expect("shutdown").0, 401, "GET /shutdown needs it too");
}

#[test]
fn https_control_certificate_is_swapped_without_a_refused_connection() {
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("control.crt"), dir.path().join("control.key"));
    let (cert_pem, key_pem) = certificate(11);
    std::fs::write(&cert, cert_pem).expect("cert");
    std::fs::write(&key, key_pem).expect("key");
    let (cert_arg, key_arg) = (cert.to_string_lossy().into_owned(), key.to_string_lossy().into_owned());
    let tls = start(&["--http", &address, "--http-tls-cert", &cert_arg, "--http-tls-key", &key_arg]);
    tls.wait_ready();
    let serial = || HttpsClient::new(port, false).get().map(|(_, serial)| serial);
    assert_eq!(serial(), Ok(11));

    // A client keeps connecting while the files change: none is refused.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Err(e) = HttpsClient::new(port, false).get() {
                    failures.push(e);
                }
            }
            failures
        })
    };
    let (cert_pem, key_pem) = certificate(12);
    replace_file(&key, &key_pem);
    replace_file(&cert, &cert_pem);
    wait_for(Duration::from_secs(5), "the new control certificate", || serial() == Ok(12));
    // A bad pair is refused: the served certificate stays.
    replace_file(&cert, "garbage\n");
    tls.launcher.wait_for_log("--http: new certificate refused");
    assert_eq!(serial(), Ok(12));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let failures = prober.join().expect("prober");
    assert!(failures.is_empty(), "connections failed during the swap: {failures:?}");
}

#[test]
fn client_subcommands_report_in_each_state() {
    let tls = start(&[]);
    tls.wait_ready();
    let (code, out, _) = tls.client(&["status"]);
    assert_eq!(code, 0, "ready: {out}");
    assert!(out.contains("state: running (ready)") && out.contains("epoch 0 pid"), "{out}");
    let (code, out, _) = tls.client(&["status", "--json"]);
    assert_eq!(code, 0);
    assert!(serde_json::from_str::<serde_json::Value>(&out).is_ok(), "{out}");

    let (code, out, err) = tls.client(&["reload"]);
    assert_eq!((code, out.trim()), (0, "epoch 1 is LIVE"), "{err}");

    std::fs::remove_file(&tls.key).expect("rm key");
    let (code, _, err) = tls.client(&["reload"]);
    assert_eq!(code, 1);
    assert!(err.contains("reload failed") && err.contains("cannot read"), "{err}");

    let (code, out, err) = tls.client(&["shutdown"]);
    assert_eq!((code, out.trim()), (0, "drained"), "{err}");
    let mut launcher = tls.launcher;
    assert_eq!(launcher.exit_code(Duration::from_secs(30)), 0);
    let runtime = launcher.runtime_dir();
    let output = Command::new(SESAME).args(["status", "--runtime-dir"]).arg(&runtime).output().expect("status");
    assert_eq!(output.status.code(), Some(2), "nothing to talk to");
    assert!(String::from_utf8_lossy(&output.stderr).contains("unreachable"));
}

/// The notify messages, in order, as systemd would receive them.
fn notifications(socket: &std::os::unix::net::UnixDatagram, until: Instant) -> Vec<String> {
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    socket.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
    while Instant::now() < until {
        if let Ok(n) = socket.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    messages
}

fn states(messages: &[String]) -> Vec<String> {
    messages
        .iter()
        .flat_map(|m| m.lines().map(str::to_string).collect::<Vec<_>>())
        .filter(|l| ["READY=1", "RELOADING=1", "STOPPING=1"].contains(&l.as_str()))
        .collect()
}

#[test]
fn systemd_notify_sequence_and_watchdog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind notify socket");
    let notify: &Path = &socket_path;
    let bootstrap_dir = tempfile::tempdir().expect("tempdir");
    let (_, _, bootstrap) = tls_files(bootstrap_dir.path());
    let envoy = common::envoy_bin().to_string_lossy().into_owned();
    let bootstrap_arg = bootstrap.to_string_lossy().into_owned();
    let mut launcher = Launcher::start_with(
        Mode::Pid1,
        &["--envoy-parent-shutdown-time", "3s", "--envoy-drain-time", "2s"],
        &[&envoy, "-c", &bootstrap_arg],
        |command| {
            command.env("NOTIFY_SOCKET", notify).env("WATCHDOG_USEC", "400000");
        },
    );
    let started = notifications(&socket, Instant::now() + Duration::from_secs(3));
    assert_eq!(states(&started), ["READY=1"], "{started:?}");
    let pings = started.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    // A 400 ms watchdog wants a ping every 200 ms: about 15 in 3 s.
    assert!((8..=20).contains(&pings), "{pings} watchdog pings in 3 s: {started:?}");
    assert!(started.iter().any(|m| m.contains("STATUS=serving: epoch 0 is LIVE")), "{started:?}");

    launcher.signal(Signal::SIGHUP);
    let reloaded = notifications(&socket, Instant::now() + Duration::from_secs(2));
    assert_eq!(states(&reloaded), ["RELOADING=1", "READY=1"], "{reloaded:?}");
    assert!(reloaded.iter().any(|m| m.contains("MONOTONIC_USEC=")), "{reloaded:?}");

    launcher.signal(Signal::SIGTERM);
    let stopping = notifications(&socket, Instant::now() + Duration::from_millis(500));
    assert_eq!(states(&stopping).first().map(String::as_str), Some("STOPPING=1"), "{stopping:?}");
    assert_eq!(launcher.exit_code(Duration::from_secs(30)), 0);
}
