//! No dead ends: when Envoy's hot restart is blocked, a cold handover to a new Envoy family takes
//! over without a failed request, with the real Envoy under HTTPS load (keep-alive clients and a
//! new connection per request). docs/ARCHITECTURE.md, "The cold handover".

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::load::{Load, ONE_LOAD_AT_A_TIME};
use common::tls::{TlsSite, replace_file, tls_bootstrap};
use common::{Launcher, Mode, free_port, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Short drain and parent-shutdown times, so that old epochs exit within the test; a quick first
/// recovery.
const OPTIONS: &[&str] = &[
    "--envoy-drain-time",
    "2s",
    "--envoy-parent-shutdown-time",
    "3s",
    "--drain-timeout",
    "10s",
    "--recover-backoff",
    "300ms",
    "--recover-backoff-max",
    "1s",
    "--log-level",
    "debug",
];

struct Served {
    launcher: Launcher,
    port: u16,
    dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    bootstrap: PathBuf,
}

/// Envoy serving HTTPS on one worker (the other core is the load's), under sesame as PID 1.
fn start(extra_yaml: &str, options: &[&str], program: Option<&Path>) -> Served {
    start_bootstrap(|yaml| yaml + extra_yaml, options, program)
}

/// The same with `clusters` (a `clusters:` list) in `static_resources`, and `extra_yaml` at the end.
fn start_with_clusters(clusters: &str, extra_yaml: &str) -> Served {
    let with =
        |yaml: String| yaml.replacen("static_resources:\n", &format!("static_resources:\n{clusters}"), 1) + extra_yaml;
    start_bootstrap(with, &[], None)
}

fn start_bootstrap(edit: impl FnOnce(String) -> String, options: &[&str], program: Option<&Path>) -> Served {
    let TlsSite { dir, port, cert, key, bootstrap } = TlsSite::new(edit);
    // The test's own options replace the defaults of the same name.
    let defaults = OPTIONS.chunks(2).filter(|pair| !options.contains(&pair[0])).flatten();
    let options: Vec<&str> = defaults.chain(options).copied().collect();
    let envoy = program.map_or_else(common::envoy_bin, Path::to_path_buf);
    let envoy = envoy.to_str().expect("utf-8 path");
    let bootstrap_arg = bootstrap.to_str().expect("utf-8 path");
    let command = [envoy, "-c", bootstrap_arg, "--concurrency", "1"];
    let launcher = Launcher::start(Mode::Pid1, &options, &command);
    let served = Served { launcher, port, dir, cert, key, bootstrap };
    served.launcher.wait_for_status("epoch 0 LIVE", |s| s["ready"] == true);
    served
}

impl Served {
    /// The pid of the epoch started with `--restart-epoch N` (not the validator), once it runs.
    fn epoch_pid(&self, restart_epoch: u32) -> i32 {
        let mut found = None;
        wait_for(Duration::from_secs(30), &format!("an Envoy with --restart-epoch {restart_epoch}"), || {
            found = common::children_of(self.launcher.pid()).into_iter().find(|pid| {
                let argv = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let argv: Vec<&[u8]> = argv.split(|b| *b == 0).collect();
                let epoch = restart_epoch.to_string();
                let is_epoch = argv.windows(2).any(|w| w[0] == b"--restart-epoch" && w[1] == epoch.as_bytes());
                is_epoch && !argv.contains(&&b"validate"[..])
            });
            found.is_some()
        });
        found.expect("found")
    }

    /// Waits until a cold handover has succeeded and nothing is under way or blocked.
    fn wait_for_recovery(&self, what: &str) -> serde_json::Value {
        self.launcher.wait_for_status(what, |s| {
            s["recovery"]["last"]["result"] == "success" && s["reload"].is_null() && s["degraded"].is_null()
        })
    }

    fn stop(mut self) -> String {
        self.launcher.signal(Signal::SIGTERM);
        let code = self.launcher.exit_code(Duration::from_secs(60));
        let log = self.launcher.log();
        assert_eq!(code, 0, "log:\n{log}");
        log
    }
}

fn sigkill(pid: i32) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

/// (1) SIGHUP, and the new epoch is SIGKILLed as it appears (0 and 15 ms after it is seen): the
/// old epoch serves on, a new family takes over by itself, and the next SIGHUP is an ordinary hot
/// restart. No request fails.
#[test]
fn a_new_epoch_killed_as_it_appears_is_replaced_by_a_new_family() {
    let _alone = ONE_LOAD_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    for delay in [0, 15] {
        let served = start("", &[], None);
        let load = Load::start(served.port, 8, 8);
        load.wait_running();
        served.launcher.signal(Signal::SIGHUP);
        let new = served.epoch_pid(1);
        std::thread::sleep(Duration::from_millis(delay));
        sigkill(new);
        let status = served.wait_for_recovery("the cold handover");
        let family = status["epochs"][0]["family"].as_u64();
        assert_eq!(family, Some(1), "a new family serves ({delay} ms): {status:#}");

        let (succeeded, serving) = (served.launcher.reloads("success"), status["current_epoch"].clone());
        served.launcher.signal(Signal::SIGHUP);
        let status = served.launcher.wait_for_status("the next hot restart", |s| {
            s["reload"].is_null() && s["current_epoch"] != serving && s["degraded"].is_null()
        });
        assert_eq!(served.launcher.reloads("success"), succeeded + 1, "{status:#}");
        let handovers = (served.launcher.recoveries("success"), served.launcher.recoveries("failed"));
        let log = served.launcher.log();
        assert_eq!(handovers, (1, 0), "one handover was enough:\n{log}");
        load.stop().assert_none_failed(200, &log);
        let log = served.stop();
        assert!(log.contains("its statistics start from zero"), "{log}");
    }
}

/// A cluster from an ADS server that does not answer: each epoch initializes for 2 s, and a
/// hot-restart child closes its parent's admin listener early in that time.
const SLOW_XDS: &str = r#"node: { id: sesame-test, cluster: sesame-test }
dynamic_resources:
  ads_config: { api_type: GRPC, transport_api_version: V3, grpc_services: [{ envoy_grpc: { cluster_name: xds } }] }
  cds_config: { ads: {}, resource_api_version: V3, initial_fetch_timeout: 2s }
"#;

/// The hot-restart child is SIGKILLed after it has closed the serving epoch's admin listener (its
/// xDS server is slow): sesame still drains the old family, through the connection it kept to that
/// admin, and no request fails.
#[test]
fn a_child_killed_after_it_closed_the_parents_admin_is_still_handed_over_cleanly() {
    let _alone = ONE_LOAD_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let xds_port = free_port();
    let cluster = format!(
        "  clusters:\n  - name: xds\n    type: STATIC\n    connect_timeout: 1s\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {{ http2_protocol_options: {{}} }}\n    load_assignment:\n      cluster_name: xds\n      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {xds_port} }} }} }} }}] }}]\n"
    );
    let served = start_with_clusters(&cluster, SLOW_XDS);
    let load = Load::start(served.port, 8, 8);
    load.wait_running();
    served.launcher.signal(Signal::SIGHUP);
    let child = served.epoch_pid(1);
    let admin = served.dir.path().join("admin.sock");
    // The child closes its parent's admin listener, then binds its own on the same path.
    wait_for(Duration::from_secs(10), "the child to take the admin socket", || {
        // (The body may come chunked: look for the field rather than parse it.)
        common::admin_body(&admin, "/server_info").is_some_and(|info| info.contains("\"restart_epoch\": 1"))
    });
    sigkill(child);
    served.wait_for_recovery("the cold handover");
    let log = served.launcher.log();
    assert!(log.contains("the old family's drain ended (connections reached the threshold)"), "{log}");
    let outcome = load.stop();
    let log = served.stop();
    outcome.assert_none_failed(200, &log);
}

/// (2) The draining old epoch is SIGKILLed: Envoy's current epoch would abort once its stats
/// flush finds its parent gone (1 s here) and 10 s more. sesame hands over to a new family at once
/// and still serves after that time (no exit 134 of the launcher). From its first failed flush the
/// orphaned epoch's main thread is blocked (it retries its parent), so it cannot be drained then:
/// the requests it has in flight when it aborts are reset, at most one per client.
#[test]
fn a_killed_draining_epoch_is_handed_over_before_the_current_one_aborts() {
    let _alone = ONE_LOAD_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let served = start("stats_flush_interval: 1s\n", &["--envoy-parent-shutdown-time", "60s"], None);
    let load = Load::start(served.port, 8, 8);
    load.wait_running();
    served.launcher.signal(Signal::SIGHUP);
    served.launcher.wait_for_status("epoch 1 to serve", |s| s["current_epoch"] == 1 && s["reload"].is_null());
    let draining = served.epoch_pid(0);
    sigkill(draining);
    let killed = Instant::now();
    let status = served.wait_for_recovery("the cold handover after the draining epoch died");
    assert!(status["recovery"]["last"]["detail"].as_str().is_some_and(|d| d.contains("ended early")), "{status:#}");
    // Past the time the orphaned epoch would have aborted (flush 1 s + 10 s), with a margin.
    let abort_by = killed + Duration::from_secs(13);
    std::thread::sleep(abort_by.saturating_duration_since(Instant::now()));
    let status = served.launcher.status();
    assert_eq!(status["ready"], true, "{status:#}");
    let outcome = load.stop();
    let log = served.stop();
    assert!(outcome.sent >= 500, "the load ran: {} requests", outcome.sent);
    let resets = outcome.failures.iter().filter(|f| f.contains("reset") || f.contains("closed")).count();
    assert!(outcome.failures.len() <= 16 && resets == outcome.failures.len(), "{:?}\n{log}", outcome.failures);
}

/// (3) A bootstrap that adds a listener on a port another process holds: the hot restart fails,
/// every cold handover is refused with the reason (the old family serves on), and once the port
/// is free the next one succeeds and serves the new listener.
#[test]
fn a_taken_port_is_reported_and_the_handover_succeeds_once_it_is_free() {
    let _alone = ONE_LOAD_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let served = start("", &[], None);
    let load = Load::start(served.port, 8, 8);
    load.wait_running();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    let bootstrap = tls_bootstrap(served.dir.path(), served.port, &served.cert, &served.key, Some(taken_port));
    replace_file(&served.bootstrap, &bootstrap);
    let status = served.launcher.wait_for_status("a refused handover", |s| {
        s["recovery"]["last"]["result"] == "refused" && !s["degraded"].is_null()
    });
    let detail = status["recovery"]["last"]["detail"].as_str().unwrap_or_default().to_string();
    // sesame, PID 1 of its own namespace, cannot see the test's pid.
    let expected = format!("(127.0.0.1:{taken_port}): the port is held by a process sesame cannot see");
    assert!(detail.contains(&expected), "{detail}");
    assert_eq!((status["current_epoch"].as_u64(), status["ready"].as_bool()), (Some(0), Some(true)), "{status:#}");
    drop(taken);
    served.wait_for_recovery("the handover once the port is free");
    assert_eq!(common::client::http_get(taken_port), Some(200), "the new listener serves");
    let outcome = load.stop();
    let log = served.stop();
    outcome.assert_none_failed(200, &log);
}

/// Envoy proxying to an upstream that answers after 2 s, with 20 requests in flight.
struct InFlight {
    launcher: Launcher,
    port: u16,
    requests: Vec<std::thread::JoinHandle<Result<u16, String>>>,
    _upstream: common::Upstream,
    _dir: tempfile::TempDir,
}

impl InFlight {
    fn start() -> InFlight {
        let dir = tempfile::tempdir().expect("tempdir");
        let upstream = common::Upstream::start(Duration::from_secs(2));
        let port = free_port();
        let bootstrap = common::proxy_bootstrap(dir.path(), port, upstream.port);
        let launcher = Launcher::start_envoy(Mode::Pid1, OPTIONS, &bootstrap);
        launcher.wait_for_status("epoch 0 LIVE", |s| s["ready"] == true);
        let requests = (0..20).map(|_| std::thread::spawn(move || common::client::request(port, "/"))).collect();
        wait_for(Duration::from_secs(10), "20 requests in flight", || upstream.arrived() >= 20);
        InFlight { launcher, port, requests, _upstream: upstream, _dir: dir }
    }
}

/// (4) `sesame reload --cold` with 20 requests in flight (an upstream that answers after 2 s):
/// all are answered, and the client's exit says the handover is done.
#[test]
fn a_cold_reload_by_hand_answers_every_request_in_flight() {
    let _alone = ONE_LOAD_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let InFlight { mut launcher, port, requests: in_flight, _upstream, _dir } = InFlight::start();
    let client = std::process::Command::new(common::SESAME)
        .args(["reload", "--cold", "--runtime-dir"])
        .arg(launcher.runtime_dir())
        .output()
        .expect("sesame reload --cold");
    let answers: Vec<_> = in_flight.into_iter().map(|t| t.join().expect("request")).collect();
    let log = launcher.log();
    assert!(client.status.success(), "{}\n{log}", String::from_utf8_lossy(&client.stderr));
    assert!(answers.iter().all(|a| *a == Ok(200)), "{answers:?}\n{log}");
    assert_eq!(common::client::request(port, "/direct"), Ok(200));
    let status = launcher.status();
    assert_eq!(status["epochs"][0]["family"], 1, "{status:#}");
    launcher.signal(Signal::SIGTERM);
    assert_eq!(launcher.exit_code(Duration::from_secs(60)), 0, "{}", launcher.log());
}

/// SIGTERM while the old family drains in a cold handover: its requests in flight are answered
/// (it finishes its drain), then the new family drains, and the launcher exits 0.
#[test]
fn a_stop_while_the_old_family_drains_answers_every_request_in_flight() {
    let _alone = ONE_LOAD_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let InFlight { mut launcher, requests: in_flight, _upstream, _dir, .. } = InFlight::start();
    let mut client = std::process::Command::new(common::SESAME)
        .args(["reload", "--cold", "--runtime-dir"])
        .arg(launcher.runtime_dir())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("sesame reload --cold");
    let old_family_drains = |s: &serde_json::Value| s["reload"] == "draining the old Envoy family";
    launcher.wait_for_status("the new family to serve and the old one to drain", old_family_drains);
    launcher.signal(Signal::SIGTERM);
    // The stop waits for the old family's drain: sesame is draining, its own drain not begun yet.
    launcher.wait_for_status("the stop to wait for the old family", |s| {
        s["state"] == "draining" && old_family_drains(s) && s["drain"].is_null()
    });
    let answers: Vec<_> = in_flight.into_iter().map(|t| t.join().expect("request")).collect();
    let code = launcher.exit_code(Duration::from_secs(60));
    let _ = client.wait();
    let log = launcher.log();
    assert!(answers.iter().all(|a| *a == Ok(200)), "{answers:?}\n{log}");
    assert_eq!(code, 0, "{log}");
}

/// (5) The Envoy binary is upgraded under load, from the previous release to the pinned one (both
/// report hot restart version 11.104): an ordinary hot restart, no failed request. Then a binary
/// that reports another version: a cold handover, no failed request.
#[test]
fn an_upgraded_binary_hot_restarts_when_it_can_and_hands_over_when_it_cannot() {
    let _alone = ONE_LOAD_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let previous = std::env::var_os("ENVOY_PREVIOUS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("ENVOY_PREVIOUS_BIN is not set: run the tests with `make test`, which installs it"));
    let bin = tempfile::tempdir().expect("tempdir");
    let envoy = bin.path().join("envoy");
    let swap_to = |target: &Path| {
        let tmp = bin.path().join("envoy.new");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).expect("symlink");
        std::fs::rename(&tmp, &envoy).expect("swap");
    };
    swap_to(&previous);
    let served = start("", &[], Some(&envoy));
    let version = |s: &Served| common::admin_body(&s.dir.path().join("admin.sock"), "/server_info").unwrap_or_default();
    assert!(version(&served).contains("/1.39.0/"), "{}", version(&served));
    let load = Load::start(served.port, 8, 8);
    load.wait_running();

    swap_to(&common::envoy_bin());
    let checkers = served.launcher.metric(&common::reaped_children("validator"));
    served.launcher.signal(Signal::SIGHUP);
    let status = served.launcher.wait_for_status("the upgrade", |s| s["current_epoch"] == 1 && s["reload"].is_null());
    assert!(version(&served).contains("/1.40.0/"), "{}", version(&served));
    // The new binary was asked its hot restart version, then validated: two checkers ran.
    let checked = served.launcher.metric(&common::reaped_children("validator")) - checkers;
    assert_eq!(checked, 2, "envoy --hot-restart-version and envoy --mode validate");
    // A hot restart: epoch 1 is restart epoch 1 of the same family, and no cold handover ran.
    let epochs = status["epochs"].as_array().expect("epochs");
    let upgraded = epochs.iter().find(|e| e["epoch"] == 1).expect("epoch 1");
    assert_eq!((upgraded["family"].as_u64(), upgraded["restart_epoch"].as_u64()), (Some(0), Some(1)), "{status:#}");
    assert!(status["recovery"].is_null(), "{status:#}");

    let wrapper = bin.path().join("mismatched");
    let real = common::envoy_bin();
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = --hot-restart-version ]; then echo 99.1 >&2; exit 0; fi\nexec {} \"$@\"\n",
        real.display()
    );
    std::fs::write(&wrapper, script).expect("wrapper");
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    swap_to(&wrapper);
    served.launcher.signal(Signal::SIGHUP);
    let status = served.wait_for_recovery("the cold handover to the mismatched binary");
    let detail = status["recovery"]["last"]["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("hot restart version is 99.1, the serving one's 11.104"), "{status:#}");
    let outcome = load.stop();
    let log = served.stop();
    outcome.assert_none_failed(200, &log);
}
