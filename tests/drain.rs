//! The graceful drain on SIGTERM, with the real Envoy under sesame as PID 1 of a PID namespace.

mod common;

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{
    Launcher, Mode, Upstream, admin_get, children_of, free_port, idle_keepalive_connection, proxy_bootstrap, request,
    wait_for,
};
use nix::sys::signal::Signal;

const IN_FLIGHT: usize = 20;
const HOLD: Duration = Duration::from_secs(2);

struct Proxy {
    launcher: Launcher,
    port: u16,
    dir: tempfile::TempDir,
}

impl Proxy {
    /// SIGTERM to the launcher, which must exit 0: how long it took, and its log.
    fn stop(&mut self) -> (Duration, String) {
        let signalled = Instant::now();
        self.launcher.signal(Signal::SIGTERM);
        let code = self.launcher.exit_code(Duration::from_secs(20));
        let log = self.launcher.log();
        assert_eq!(code, 0, "log:\n{log}");
        (signalled.elapsed(), log)
    }
}

fn start_proxy(options: &[&str], upstream_port: u16) -> Proxy {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let bootstrap = proxy_bootstrap(dir.path(), port, upstream_port);
    let launcher = Launcher::start_envoy(Mode::Pid1, options, &bootstrap);
    Proxy { launcher, port, dir }
}

/// Starts `IN_FLIGHT` requests through Envoy and waits until the upstream holds all of them.
fn requests_in_flight(proxy: &Proxy, upstream: &Upstream) -> Vec<JoinHandle<(Result<u16, String>, Instant)>> {
    let port = proxy.port;
    let clients: Vec<_> =
        (0..IN_FLIGHT).map(|_| std::thread::spawn(move || (request(port, "/held"), Instant::now()))).collect();
    wait_for(Duration::from_secs(10), "every request to reach the upstream", || upstream.arrived() == IN_FLIGHT);
    clients
}

/// SIGTERM with `IN_FLIGHT` requests held by the upstream: every one must get 200 and the launcher
/// exit 0; returns how long after the last response it exited, and its log.
fn drain_in_flight(options: &[&str]) -> (Duration, String) {
    let upstream = Upstream::start(HOLD);
    let mut proxy = start_proxy(options, upstream.port);
    let clients = requests_in_flight(&proxy, &upstream);
    proxy.launcher.signal(Signal::SIGTERM);
    let results: Vec<_> = clients.into_iter().map(|c| c.join().expect("client")).collect();
    let code = proxy.launcher.exit_code(Duration::from_secs(30));
    let exited = Instant::now();
    let log = proxy.launcher.log();

    let ok = results.iter().filter(|(r, _)| *r == Ok(200)).count();
    assert_eq!(ok, IN_FLIGHT, "every request in flight got 200: {results:?}\n{log}");
    assert_eq!(code, 0, "Envoy exited 0 on SIGTERM after the drain; log:\n{log}");
    assert!(log.contains("drain ended: connections reached the threshold"), "{log}");
    let last_response = results.iter().map(|(_, at)| *at).max().expect("responses");
    (exited.duration_since(last_response), log)
}

#[test]
fn in_flight_requests_complete_and_the_launcher_exits_right_after() {
    let (lag, log) = drain_in_flight(&[]);
    assert!(lag < Duration::from_secs(1), "the launcher exits within 1 s of the last response, not {lag:?}\n{log}");
}

/// Envoy's count is read again as its last connections end (the kernel announces each freed
/// socket), not at the next steady poll: with a poll every 5 s the launcher still exits at once.
#[test]
fn the_drain_sees_the_last_connection_end_without_waiting_for_a_poll() {
    let (lag, log) = drain_in_flight(&["--drain-poll", "5s"]);
    // A steady poll would read the count again 5 s after SIGTERM, 3 s after the last response.
    assert!(lag < Duration::from_millis(2500), "exited {lag:?} after the last response\n{log}");
    assert!(log.contains("drain: 2 connection polls of the admin"), "one poll at the start, one at the end\n{log}");
}

/// A listener the kernel cannot show the connections of (here a unix socket) leaves the drain on
/// its steady poll, which still ends it at the threshold.
#[test]
fn a_listener_on_a_unix_socket_keeps_the_steady_poll() {
    let upstream = Upstream::start(HOLD);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let bootstrap = proxy_bootstrap(dir.path(), port, upstream.port);
    let yaml = std::fs::read_to_string(&bootstrap).expect("read bootstrap");
    let pipe = format!(
        "  - name: local\n    address: {{ pipe: {{ path: \"{}\" }} }}\n    filter_chains:\n    - filters:\n      \
         - name: envoy.filters.network.tcp_proxy\n        typed_config:\n          \"@type\": \
         type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\n          stat_prefix: local\n          \
         cluster: upstream\n  clusters:\n",
        dir.path().join("local.sock").display()
    );
    std::fs::write(&bootstrap, yaml.replacen("  clusters:\n", &pipe, 1)).expect("write bootstrap");
    let mut proxy = Proxy { launcher: Launcher::start_envoy(Mode::Pid1, &[], &bootstrap), port, dir };
    let clients = requests_in_flight(&proxy, &upstream);
    let (_, log) = proxy.stop();
    let ok = clients.into_iter().filter_map(|c| c.join().ok()).filter(|(r, _)| *r == Ok(200)).count();
    assert_eq!(ok, IN_FLIGHT, "every request in flight got 200\n{log}");
    assert!(log.contains("drain: polling Envoy every 100ms (listener 'local' is not on a TCP port)"), "{log}");
    assert!(log.contains("drain ended: connections reached the threshold"), "{log}");
}

#[test]
fn without_the_drain_requests_in_flight_are_reset() {
    let upstream = Upstream::start(HOLD);
    let mut proxy = start_proxy(&["--drain-timeout", "0"], upstream.port);
    let clients = requests_in_flight(&proxy, &upstream);
    proxy.launcher.signal(Signal::SIGTERM);
    let results: Vec<_> = clients.into_iter().map(|c| c.join().expect("client").0).collect();
    assert_eq!(proxy.launcher.exit_code(Duration::from_secs(20)), 0);
    let failed = results.iter().filter(|r| r.is_err()).count();
    assert_eq!(failed, IN_FLIGHT, "plain forwarding resets every request in flight: {results:?}");
    assert!(proxy.launcher.log().contains("SIGTERM: passing SIGTERM on to Envoy (no drain)"));
}

#[test]
fn an_idle_keepalive_connection_holds_the_drain_until_the_timeout() {
    let mut proxy = start_proxy(&["--drain-timeout", "2s"], free_port());
    let _idle = idle_keepalive_connection(proxy.port);
    let (took, log) = proxy.stop();
    assert!(took >= Duration::from_secs(2), "waited for the idle connection: {took:?}\n{log}");
    assert!(took < Duration::from_secs(4), "but no longer than the timeout: {took:?}\n{log}");
    assert!(log.contains("drain ended: drain timeout reached") && log.contains("open at SIGTERM: 1"), "{log}");
}

#[test]
fn drain_connections_threshold_lets_one_connection_stay() {
    let mut proxy = start_proxy(&["--drain-timeout", "30s", "--drain-connections", "1"], free_port());
    let _idle = idle_keepalive_connection(proxy.port);
    let (took, log) = proxy.stop();
    assert!(took < Duration::from_secs(2), "one open connection is within the threshold: {took:?}\n{log}");
    assert!(log.contains("connections reached the threshold") && log.contains("open at SIGTERM: 1"), "{log}");
}

#[test]
fn during_the_drain_delay_envoy_is_not_ready_but_still_serves() {
    let mut proxy = start_proxy(&["--drain-delay", "2s"], free_port());
    let admin = proxy.dir.path().join("admin.sock");
    let signalled = Instant::now();
    proxy.launcher.signal(Signal::SIGTERM);
    wait_for(Duration::from_secs(2), "Envoy's /ready to answer 503", || admin_get(&admin, "/ready") == Some(503));
    let not_ready = signalled.elapsed();
    assert_eq!(request(proxy.port, "/direct"), Ok(200), "requests are still served during the delay");
    let served = signalled.elapsed();
    assert!(served < Duration::from_secs(2), "both within the delay: not ready at {not_ready:?}, served at {served:?}");
    assert_eq!(proxy.launcher.exit_code(Duration::from_secs(20)), 0);
    assert!(signalled.elapsed() >= Duration::from_secs(2), "the delay was kept");
}

#[test]
fn a_second_sigterm_ends_the_drain_at_once() {
    let mut proxy = start_proxy(&["--drain-timeout", "30s"], free_port());
    let _idle = idle_keepalive_connection(proxy.port);
    proxy.launcher.signal(Signal::SIGTERM);
    proxy.launcher.wait_for_drain();
    let second = Instant::now();
    proxy.launcher.signal(Signal::SIGTERM);
    assert_eq!(proxy.launcher.exit_code(Duration::from_secs(20)), 0);
    let log = proxy.launcher.log();
    assert!(second.elapsed() < Duration::from_secs(2), "{:?}\n{log}", second.elapsed());
    assert!(log.contains("drain ended: a second signal skipped the rest"), "{log}");
}

#[test]
fn a_hung_admin_cannot_stretch_the_drain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("hung-admin.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind fake admin");
    // Accepts every connection and never answers.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for connection in listener.incoming() {
            held.push(connection);
        }
    });
    let admin = socket.to_string_lossy().into_owned();
    let options = ["--admin", &admin, "--drain-timeout", "2s", "--kill-timeout", "2s"];
    let mut proxy = start_proxy(&options, free_port());
    let (took, log) = proxy.stop();
    assert!(took < Duration::from_secs(4), "within drain-timeout + kill-timeout: {took:?}\n{log}");
    assert!(log.contains("did not answer within") && log.contains("drain ended: drain timeout reached"), "{log}");
}

#[test]
fn a_missing_admin_ends_the_drain_quickly() {
    let options = ["--admin", "/nonexistent/admin.sock", "--drain-timeout", "30s", "--kill-timeout", "2s"];
    let mut proxy = start_proxy(&options, free_port());
    let (took, log) = proxy.stop();
    assert!(took < Duration::from_secs(2), "an unreachable admin is given up on: {took:?}\n{log}");
    assert!(log.contains("unreachable") && log.contains("drain ended: Envoy's admin is unreachable"), "{log}");
}

#[test]
fn envoy_killed_during_the_drain_ends_the_launcher_with_137() {
    let mut proxy = start_proxy(&["--drain-timeout", "30s"], free_port());
    let _idle = idle_keepalive_connection(proxy.port);
    let envoy = children_of(proxy.launcher.pid());
    assert_eq!(envoy.len(), 1, "one Envoy");
    proxy.launcher.signal(Signal::SIGTERM);
    proxy.launcher.wait_for_drain();
    let killed = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(envoy[0]), Signal::SIGKILL).expect("kill Envoy");
    assert_eq!(proxy.launcher.exit_code(Duration::from_secs(20)), 137);
    let log = proxy.launcher.log();
    assert!(killed.elapsed() < Duration::from_secs(2), "{:?}\n{log}", killed.elapsed());
    assert!(log.contains("drain ended: Envoy exited"), "{log}");
}

/// `bootstrap` without its admin section, as Envoy's own `configs/envoy-demo.yaml` is written.
fn without_admin(bootstrap: &std::path::Path) {
    let text = std::fs::read_to_string(bootstrap).expect("read");
    let without_admin = text.split_once("static_resources:").map(|(_, rest)| format!("static_resources:{rest}"));
    std::fs::write(bootstrap, without_admin.expect("split")).expect("write");
}

#[test]
fn a_bootstrap_without_admin_gets_one_and_is_drained_and_reloaded() {
    for user_config_yaml in [None, Some("stats_flush_interval: 7s")] {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let bootstrap = proxy_bootstrap(dir.path(), port, free_port());
        without_admin(&bootstrap);
        let envoy = common::envoy_bin().to_string_lossy().into_owned();
        let bootstrap_arg = bootstrap.to_string_lossy().into_owned();
        let mut command = vec![envoy.as_str(), "-c", &bootstrap_arg];
        command.extend(user_config_yaml.iter().flat_map(|yaml| ["--config-yaml", *yaml]));
        let options = ["--envoy-drain-time", "1s", "--envoy-parent-shutdown-time", "1s"];
        let mut launcher = Launcher::start(Mode::Pid1, &options, &command);
        let given = format!("unix:{}", launcher.runtime_dir().join("envoy-admin-sesame.sock").display());
        let status = launcher.wait_for_status("Envoy to be ready through the given admin", |s| s["ready"] == true);
        assert_eq!(status["epochs"][0]["admin"], given.as_str(), "{status:#}");
        assert_eq!(request(port, "/direct"), Ok(200));
        // A reload is confirmed LIVE through it, never trusted.
        launcher.signal(Signal::SIGHUP);
        let status =
            launcher.wait_for_status("epoch 1 to be seen LIVE", |s| s["current_epoch"] == 1 && s["ready"] == true);
        // The drain goes through the serving epoch's admin: the given one.
        let epochs = status["epochs"].as_array().expect("epochs");
        let serving = epochs.iter().find(|e| e["epoch"] == 1).expect("epoch 1");
        assert_eq!(serving["admin"], given.as_str(), "{status:#}");
        assert_eq!(launcher.reloads("success"), 1);
        launcher.signal(Signal::SIGTERM);
        assert_eq!(launcher.exit_code(Duration::from_secs(20)), 0, "{}", launcher.log());
        let log = launcher.log();
        assert!(log.contains("drain ended: connections reached the threshold"), "{log}");
    }
}

#[test]
fn inbound_only_drains_wait_for_inbound_connections_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let [inbound, outbound] = common::free_ports();
    let bootstrap = proxy_bootstrap(dir.path(), inbound, free_port());
    let yaml = std::fs::read_to_string(&bootstrap).expect("read");
    // The same listener twice: INBOUND on one port, OUTBOUND on another.
    let (head, rest) = yaml.split_once("  - name: ingress\n").expect("listener");
    let (listener, clusters) = rest.split_once("  clusters:\n").expect("clusters");
    let outbound_listener = listener
        .replace(&format!("port_value: {inbound}"), &format!("port_value: {outbound}"))
        .replace("stat_prefix: ingress", "stat_prefix: egress");
    let yaml = format!(
        "{head}  - name: ingress\n    traffic_direction: INBOUND\n{listener}  - name: egress\n    traffic_direction: OUTBOUND\n{outbound_listener}  clusters:\n{clusters}"
    );
    std::fs::write(&bootstrap, yaml).expect("write");
    let options = ["--drain-inbound-only", "--drain-timeout", "30s"];
    let mut launcher = Launcher::start_envoy(Mode::Pid1, &options, &bootstrap);
    let _idle_outbound = idle_keepalive_connection(outbound);
    let signalled = Instant::now();
    launcher.signal(Signal::SIGTERM);
    assert_eq!(launcher.exit_code(Duration::from_secs(40)), 0);
    let took = signalled.elapsed();
    let log = launcher.log();
    assert!(took < Duration::from_secs(2), "the outbound connection is not waited for: {took:?}\n{log}");
    assert!(
        log.contains("INBOUND listeners [\"127.0.0.1_") && log.contains("connections reached the threshold"),
        "{log}"
    );
}

#[test]
fn a_protobuf_bootstrap_is_drained_and_reloaded_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let [port, admin_port] = common::free_ports();
    let text =
        PB_TEXT_BOOTSTRAP.replace("ADMIN_PORT", &admin_port.to_string()).replace("LISTENER_PORT", &port.to_string());
    let bootstrap = dir.path().join("envoy.pb_text");
    std::fs::write(&bootstrap, text).expect("bootstrap");
    let envoy = common::envoy_bin().to_string_lossy().into_owned();
    let bootstrap_arg = bootstrap.to_string_lossy().into_owned();
    let options = ["--envoy-drain-time", "1s", "--envoy-parent-shutdown-time", "1s"];
    let mut launcher = Launcher::start(Mode::Pid1, &options, &[&envoy, "-c", &bootstrap_arg]);
    launcher.wait_for_status("Envoy to be ready", |s| s["ready"] == true);
    assert_eq!(request(port, "/"), Ok(200));
    let log = launcher.log();
    assert!(log.contains(&format!("sesame cannot read the protobuf bootstrap {bootstrap_arg}")), "{log}");
    assert!(
        log.contains("give them with --watch") && log.contains("replaces any admin of the protobuf bootstrap"),
        "{log}"
    );
    launcher.signal(Signal::SIGHUP);
    launcher.wait_for_status("epoch 1 to be seen LIVE", |s| s["current_epoch"] == 1 && s["ready"] == true);
    launcher.signal(Signal::SIGTERM);
    assert_eq!(launcher.exit_code(Duration::from_secs(20)), 0, "{}", launcher.log());
    assert!(launcher.log().contains("drain ended: connections reached the threshold"), "{}", launcher.log());
}

/// A text-protobuf bootstrap, as Envoy reads a `.pb_text` file: an admin on TCP, one listener.
const PB_TEXT_BOOTSTRAP: &str = r#"admin {
  address { socket_address { address: "127.0.0.1" port_value: ADMIN_PORT } }
}
static_resources {
  listeners {
    name: "l1"
    address { socket_address { address: "127.0.0.1" port_value: LISTENER_PORT } }
    filter_chains {
      filters {
        name: "envoy.filters.network.http_connection_manager"
        typed_config {
          [type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager] {
            stat_prefix: "hcm"
            route_config {
              virtual_hosts {
                name: "vh"
                domains: "*"
                routes {
                  match { prefix: "/" }
                  direct_response { status: 200 body { inline_string: "pbtext\n" } }
                }
              }
            }
            http_filters {
              name: "envoy.filters.http.router"
              typed_config {
                [type.googleapis.com/envoy.extensions.filters.http.router.v3.Router] {}
              }
            }
          }
        }
      }
    }
  }
}
"#;

/// The proxy bootstrap with its admin on TCP `127.0.0.1:admin_port` instead of the unix socket.
fn with_tcp_admin(bootstrap: &std::path::Path, admin_port: u16) {
    let text = std::fs::read_to_string(bootstrap).expect("read");
    let (_, rest) = text.split_once("static_resources:").expect("split");
    let admin =
        format!("admin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}\n");
    std::fs::write(bootstrap, format!("{admin}static_resources:{rest}")).expect("write");
}

#[test]
fn an_admin_address_changed_with_the_bootstrap_is_followed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let [port, first, second] = common::free_ports();
    let bootstrap = proxy_bootstrap(dir.path(), port, free_port());
    with_tcp_admin(&bootstrap, first);
    let envoy = common::envoy_bin().to_string_lossy().into_owned();
    let bootstrap_arg = bootstrap.to_string_lossy().into_owned();
    let options = ["--envoy-drain-time", "1s", "--envoy-parent-shutdown-time", "1s"];
    let mut launcher = Launcher::start(Mode::Pid1, &options, &[&envoy, "-c", &bootstrap_arg]);
    launcher.wait_for_status("Envoy to be ready", |s| s["ready"] == true);
    // The edited bootstrap moves the admin: the new epoch is polled there, and serves.
    with_tcp_admin(&bootstrap, second);
    let status = launcher.wait_for_status("epoch 1 to serve alone, ready", |s| {
        s["current_epoch"] == 1 && s["ready"] == true && s["epochs"].as_array().is_some_and(|e| e.len() == 1)
    });
    assert_eq!(status["epochs"][0]["admin"], format!("127.0.0.1:{second}"), "{status:#}");
    assert_eq!(status["envoy"]["state"], "LIVE");
    assert!(status["degraded"].is_null(), "{status:#}");
    assert_eq!(request(port, "/direct"), Ok(200), "the listener serves");
    launcher.signal(Signal::SIGTERM);
    assert_eq!(launcher.exit_code(Duration::from_secs(20)), 0, "{}", launcher.log());
    // The drain went through the serving epoch's admin (second, above): at the first, gone with
    // epoch 0, it would have ended with the admin unreachable.
    let log = launcher.log();
    assert!(log.contains("drain ended: connections reached the threshold"), "{log}");
}

#[test]
fn an_admin_on_port_0_is_found_through_the_address_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let bootstrap = proxy_bootstrap(dir.path(), port, free_port());
    with_tcp_admin(&bootstrap, 0);
    let envoy = common::envoy_bin().to_string_lossy().into_owned();
    let bootstrap_arg = bootstrap.to_string_lossy().into_owned();
    let options = ["--envoy-drain-time", "1s", "--envoy-parent-shutdown-time", "1s"];
    let mut launcher = Launcher::start(Mode::Pid1, &options, &[&envoy, "-c", &bootstrap_arg]);
    let status = launcher.wait_for_status("Envoy to be ready", |s| s["ready"] == true);
    let first = status["epochs"][0]["admin"].as_str().expect("admin").to_string();
    assert!(first.starts_with("127.0.0.1:") && !first.ends_with(":0"), "the bound address: {first}");
    launcher.signal(Signal::SIGHUP);
    let status = launcher.wait_for_status("epoch 1 to serve alone, ready", |s| {
        s["current_epoch"] == 1 && s["ready"] == true && s["epochs"].as_array().is_some_and(|e| e.len() == 1)
    });
    let second = status["epochs"][0]["admin"].as_str().expect("admin").to_string();
    assert_ne!(first, second, "each epoch binds a port of its own");
    launcher.signal(Signal::SIGTERM);
    assert_eq!(launcher.exit_code(Duration::from_secs(20)), 0, "{}", launcher.log());
    assert!(launcher.log().contains(&format!("draining Envoy through its admin {second}")), "{}", launcher.log());
}
