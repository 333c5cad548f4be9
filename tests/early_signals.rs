//! Signals and triggers at unlucky milliseconds: an epoch that has not installed its signal
//! handlers yet is killed by a SIGUSR1 (logrotate's `kill -USR1`), so sesame holds forwarded
//! signals until the epoch is LIVE; Envoy refuses a hot restart while its current epoch
//! initializes, so sesame holds a trigger until it is LIVE. Each case is swept over several delays.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Launcher, Mode, Upstream, alive, children_of, envoy_bin, free_port, proxy_bootstrap, wait_for};
use nix::sys::signal::Signal;

const DELAYS_MS: [u64; 4] = [0, 5, 20, 50];
const OPTIONS: &[&str] = &["--envoy-drain-time", "1s", "--envoy-parent-shutdown-time", "1s"];

/// The pid of Envoy epoch `epoch` under the launcher (the validator is not one), once it runs.
fn epoch_pid(launcher: &Launcher, epoch: u32) -> i32 {
    let wanted = format!("--restart-epoch\0{epoch}\0");
    let mut found = 0;
    wait_for(Duration::from_secs(30), &format!("epoch {epoch} to be spawned"), || {
        found = children_of(launcher.pid())
            .into_iter()
            .find(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| contains(&c, wanted.as_bytes())))
            .unwrap_or(0);
        found != 0
    });
    found
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn start(bootstrap: &Path) -> Launcher {
    let envoy = envoy_bin().to_string_lossy().into_owned();
    let bootstrap = bootstrap.to_string_lossy().into_owned();
    Launcher::start(Mode::Pid1, OPTIONS, &[&envoy, "-c", &bootstrap, "--concurrency", "1"])
}

fn proxy() -> (tempfile::TempDir, PathBuf, Upstream) {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = Upstream::start(Duration::ZERO);
    let bootstrap = proxy_bootstrap(dir.path(), free_port(), upstream.port);
    (dir, bootstrap, upstream)
}

fn wait_for_epoch(launcher: &Launcher, epoch: u64) -> serde_json::Value {
    launcher.wait_for_status(&format!("epoch {epoch} to serve alone"), |s| {
        s["current_epoch"] == epoch && s["ready"] == true && s["epochs"].as_array().is_some_and(|e| e.len() == 1)
    })
}

#[test]
fn sigusr1_just_after_a_new_epoch_is_spawned_does_not_kill_it() {
    let (_dir, bootstrap, _upstream) = proxy();
    let launcher = start(&bootstrap);
    wait_for_epoch(&launcher, 0);
    for (i, delay) in DELAYS_MS.into_iter().enumerate() {
        let epoch = i as u32 + 1;
        launcher.signal(Signal::SIGHUP);
        let pid = epoch_pid(&launcher, epoch);
        std::thread::sleep(Duration::from_millis(delay));
        launcher.signal(Signal::SIGUSR1);
        let status = wait_for_epoch(&launcher, u64::from(epoch));
        assert!(status["degraded"].is_null(), "SIGUSR1 {delay} ms after epoch {epoch} was spawned: {status:#}");
        assert!(alive(pid), "epoch {epoch} survived SIGUSR1 {delay} ms after its spawn");
        assert_eq!(launcher.reloads("success"), u64::from(epoch));
    }
    assert!(launcher.log().contains("SIGUSR1 held for epoch"), "{}", launcher.log());
}

#[test]
fn sigusr1_just_after_the_first_epoch_is_spawned_does_not_kill_it() {
    let (_dir, bootstrap, _upstream) = proxy();
    for delay in DELAYS_MS {
        let launcher = start(&bootstrap);
        let pid = epoch_pid(&launcher, 0);
        std::thread::sleep(Duration::from_millis(delay));
        launcher.signal(Signal::SIGUSR1);
        wait_for_epoch(&launcher, 0);
        assert!(alive(pid), "epoch 0 survived SIGUSR1 {delay} ms after its spawn");
    }
}

#[test]
fn sighup_just_after_the_start_waits_for_the_first_epoch() {
    let (_dir, bootstrap, _upstream) = proxy();
    for delay in DELAYS_MS {
        let launcher = start(&bootstrap);
        epoch_pid(&launcher, 0);
        std::thread::sleep(Duration::from_millis(delay));
        launcher.signal(Signal::SIGHUP);
        let status = wait_for_epoch(&launcher, 1);
        assert_eq!(status["last_reload"]["result"], "success", "SIGHUP {delay} ms after the start: {status:#}");
        assert_eq!(launcher.reloads("refused") + launcher.reloads("failed"), 0, "{}", launcher.log());
    }
}

/// A cluster `xds` at a port where nothing listens, and an ADS over it: `resource` (`lds_config`,
/// `cds_config`) comes from it, so each epoch initializes for `fetch_timeout`, as under Contour,
/// Envoy Gateway or consul-dataplane with a slow server. Appended to a `clusters:` list.
fn dead_xds(resource: &str, fetch_timeout: &str) -> String {
    format!(
        r#"  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: xds
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }}] }}]
node: {{ id: sesame-test, cluster: sesame-test }}
dynamic_resources:
  ads_config: {{ api_type: GRPC, transport_api_version: V3, grpc_services: [{{ envoy_grpc: {{ cluster_name: xds }} }}] }}
  {resource}: {{ ads: {{}}, resource_api_version: V3, initial_fetch_timeout: {fetch_timeout} }}
"#,
        port = free_port(),
    )
}

/// Envoy with its listeners (LDS) from an xDS server that does not answer.
fn slow_xds_bootstrap(dir: &Path, fetch_timeout: &str) -> PathBuf {
    let yaml = format!(
        "admin: {{ address: {{ pipe: {{ path: \"{}\" }} }} }}\nstatic_resources:\n  clusters:\n{}",
        dir.join("admin.sock").display(),
        dead_xds("lds_config", fetch_timeout)
    );
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, yaml).expect("bootstrap");
    path
}

#[test]
fn a_trigger_while_the_xds_server_is_slow_waits_for_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bootstrap = slow_xds_bootstrap(dir.path(), "3s");
    let launcher = start(&bootstrap);
    launcher.wait_for_status("Envoy's admin to say INITIALIZING", |s| s["envoy"]["state"] == "INITIALIZING");
    launcher.signal(Signal::SIGHUP);
    let status = launcher.wait_for_status("the trigger to be held", |s| !s["reload"].is_null());
    assert_eq!(status["reload"], "waiting for the current epoch to be LIVE", "{status:#}");
    assert_eq!(status["ready"], false);
    // A client that waits less than Envoy's initialization hears why, not "unreachable".
    let client = std::process::Command::new(common::SESAME)
        .args(["reload", "--wait-timeout", "500ms", "--runtime-dir"])
        .arg(launcher.runtime_dir())
        .output()
        .expect("sesame reload");
    let stderr = String::from_utf8_lossy(&client.stderr);
    assert_eq!(client.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not finished within 500ms: waiting for the current epoch to be LIVE"), "{stderr}");
    // Epoch 0 goes LIVE at its fetch timeout; then epoch 1 starts, and goes LIVE at its own.
    let status = wait_for_epoch(&launcher, 1);
    assert!(status["degraded"].is_null(), "{status:#}");
    assert_eq!(launcher.reloads("success"), 1, "{}", launcher.log());
}

/// Adds to a static bootstrap a CDS over ADS from a server that does not answer: each epoch
/// initializes for `fetch_timeout`, holding the admin while the epoch before it still serves.
fn with_slow_cds(bootstrap: &Path, fetch_timeout: &str) {
    let text = std::fs::read_to_string(bootstrap).expect("read");
    let xds = dead_xds("cds_config", fetch_timeout);
    std::fs::write(bootstrap, format!("{}\n{xds}", text.trim_end())).expect("write");
}

#[test]
fn sigterm_just_after_a_new_epoch_is_spawned_drops_no_request() {
    for delay in DELAYS_MS {
        let dir = tempfile::tempdir().expect("tempdir");
        let upstream = Upstream::start(Duration::from_secs(2));
        let port = free_port();
        let bootstrap = proxy_bootstrap(dir.path(), port, upstream.port);
        with_slow_cds(&bootstrap, "2s");
        let envoy = envoy_bin().to_string_lossy().into_owned();
        let bootstrap_arg = bootstrap.to_string_lossy().into_owned();
        let options = ["--envoy-drain-time", "1s", "--envoy-parent-shutdown-time", "3s", "--drain-timeout", "20s"];
        let mut launcher = Launcher::start(Mode::Pid1, &options, &[&envoy, "-c", &bootstrap_arg, "--concurrency", "1"]);
        wait_for_epoch(&launcher, 0);
        // Requests in flight on epoch 0 (the upstream holds each for 2 s).
        let in_flight: Vec<_> = (0..5).map(|_| std::thread::spawn(move || common::request(port, "/slow"))).collect();
        wait_for(Duration::from_secs(10), "the requests to reach the upstream", || upstream.arrived() >= 5);
        launcher.signal(Signal::SIGHUP);
        epoch_pid(&launcher, 1);
        std::thread::sleep(Duration::from_millis(delay));
        launcher.signal(Signal::SIGTERM);
        let answers: Vec<_> = in_flight.into_iter().map(|t| t.join().expect("request")).collect();
        assert!(answers.iter().all(|a| *a == Ok(200)), "SIGTERM {delay} ms after epoch 1 was spawned: {answers:?}");
        assert_eq!(launcher.exit_code(Duration::from_secs(30)), 0, "{}", launcher.log());
    }
}

/// How a keep-alive client fared in a drain.
#[derive(Debug, PartialEq, Eq)]
enum Client {
    /// Envoy never accepted it (it was stopped before it served).
    NeverConnected,
    /// Told to close (`connection: close`) after this many answers.
    ToldToClose(u32),
    /// A request got no answer.
    Cut(u32),
    NeverToldToClose,
}

/// A client that connects as soon as Envoy accepts and sends a keep-alive request every 20 ms
/// until it is told to close.
fn keepalive_client(port: u16) -> std::thread::JoinHandle<Client> {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let mut stream = loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(stream) => break stream,
                Err(_) if started.elapsed() < Duration::from_secs(10) => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => return Client::NeverConnected,
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(15))).expect("read timeout");
        for answered in 0..1000 {
            if stream.write_all(b"GET /direct HTTP/1.1\r\nHost: localhost\r\n\r\n").is_err() {
                return Client::Cut(answered);
            }
            let mut response = Vec::new();
            let mut buffer = [0u8; 1024];
            while !response.ends_with(b"direct\n") {
                match stream.read(&mut buffer) {
                    Ok(0) | Err(_) => return Client::Cut(answered),
                    Ok(read) => response.extend_from_slice(&buffer[..read]),
                }
            }
            if String::from_utf8_lossy(&response).to_ascii_lowercase().contains("connection: close") {
                return Client::ToldToClose(answered + 1);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Client::NeverToldToClose
    })
}

/// SIGTERM just after Envoy's spawn, before its admin is up: the drain's requests fail at first
/// and are sent again until Envoy takes them, so a client that connects once Envoy serves is told
/// to close and the drain ends on the threshold. Before, they were sent once: Envoy was never
/// drained, its client never told to close, and the drain ended on its timeout with a request cut.
#[test]
fn sigterm_just_after_the_spawn_drains_envoy_once_its_admin_is_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = Upstream::start(Duration::ZERO);
    let port = free_port();
    let bootstrap = proxy_bootstrap(dir.path(), port, upstream.port);
    let (envoy, bootstrap) = (envoy_bin().to_string_lossy().into_owned(), bootstrap.to_string_lossy().into_owned());
    // The minimum keeps the drain open while the client comes; the timeout ends a drain that fails.
    let options = [OPTIONS, &["--drain-min", "2s", "--drain-timeout", "8s"]].concat();
    for delay in DELAYS_MS {
        let mut launcher = Launcher::start(Mode::Pid1, &options, &[&envoy, "-c", &bootstrap]);
        epoch_pid(&launcher, 0);
        std::thread::sleep(Duration::from_millis(delay));
        launcher.signal(Signal::SIGTERM);
        let client = keepalive_client(port).join().expect("client");
        let code = launcher.exit_code(Duration::from_secs(20));
        let log = launcher.log();
        assert!(
            matches!(client, Client::ToldToClose(_) | Client::NeverConnected),
            "SIGTERM {delay} ms after the spawn: {client:?}\n{log}"
        );
        // Never served (the admin stayed unreachable for five tries, so the drain gave up and Envoy
        // was stopped as it started), nothing was cut; what it exits with is Envoy's own.
        if client != Client::NeverConnected {
            assert_eq!(code, 0, "{log}");
            assert!(log.contains("drain ended: connections reached the threshold"), "{log}");
        }
        eprintln!("SIGTERM {delay} ms after the spawn: {client:?}");
    }
}
