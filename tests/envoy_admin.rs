//! `GET /envoy/...`: Envoy's metrics and a few read-only admin pages through the control API, with
//! the real Envoy under sesame; nothing that changes Envoy gets through.

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Launcher, Mode, admin_get, children_of, control, free_port, free_ports, get_to_close, proxy_bootstrap};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

struct Envoy {
    launcher: Launcher,
    dir: tempfile::TempDir,
}

fn start(options: &[&str]) -> Envoy {
    let dir = tempfile::tempdir().expect("tempdir");
    let [port, upstream] = free_ports::<2>();
    let bootstrap = proxy_bootstrap(dir.path(), port, upstream);
    let launcher = Launcher::start_envoy(Mode::Pid1, options, &bootstrap);
    Envoy { launcher, dir }
}

impl Envoy {
    fn socket(&self) -> PathBuf {
        self.launcher.runtime_dir().join("control.sock")
    }

    /// A GET over the control socket, read to the end as a scraper reads it.
    fn scrape(&self, path: &str) -> (u16, String, String) {
        let mut stream = UnixStream::connect(self.socket()).expect("connect to the control socket");
        stream.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
        get_to_close(&mut stream, path).unwrap_or_else(|e| panic!("GET {path}: {e}\nlog:\n{}", self.launcher.log()))
    }

    fn envoy_pid(&self) -> i32 {
        let children = children_of(self.launcher.pid());
        assert_eq!(children.len(), 1, "one Envoy: {children:?}");
        children[0]
    }
}

#[test]
fn envoy_metrics_are_read_through_the_control_api_and_nothing_that_changes_envoy() {
    let port = free_port();
    let token_dir = tempfile::tempdir().expect("tempdir");
    let token = token_dir.path().join("token");
    std::fs::write(&token, "s3cret\n").expect("token");
    let address = format!("127.0.0.1:{port}");
    let envoy = start(&["--http", &address, "--http-token", &token.to_string_lossy()]);
    let pid = envoy.envoy_pid();

    let (status, head, body) = envoy.scrape("/envoy/stats/prometheus");
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(head.contains("content-type: text/plain"), "Envoy's content type is passed on: {head}");
    assert!(body.contains("# TYPE envoy_server_live gauge") && body.contains("envoy_server_live{} 1"), "{body}");
    assert!(body.contains("envoy_cluster_manager_"), "every stat without a filter");
    let (status, _, body) = envoy.scrape("/envoy/stats/prometheus?usedonly&filter=%5Eserver%5C.");
    assert_eq!(status, 200);
    assert!(body.contains("envoy_server_live") && !body.contains("envoy_cluster_manager_"), "query passed: {body}");

    // Over --http, a read needs no token, as /metrics does not.
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect --http");
    tcp.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
    let (status, _, body) = get_to_close(&mut tcp, "/envoy/stats/prometheus").expect("scrape over --http");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("envoy_server_live"), "{body}");

    let (status, _, body) = envoy.scrape("/envoy/server_info");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!((status, info["state"].as_str()), (200, Some("LIVE")), "{body}");
    assert_eq!(envoy.scrape("/envoy/ready").0, 200);
    assert_eq!(envoy.scrape("/envoy/certs").0, 200);
    let (status, _, body) = envoy.scrape("/envoy/stats?filter=server.live");
    assert_eq!((status, body.contains("server.live: 1")), (200, true), "{body}");

    for (method, path) in [
        ("GET", "/envoy/quitquitquit"),
        ("POST", "/envoy/quitquitquit"),
        ("POST", "/envoy/drain_listeners?graceful"),
        ("POST", "/envoy/healthcheck/fail"),
        ("GET", "/envoy/config_dump"),
        ("GET", "/envoy/stats/../config_dump"),
        ("GET", "/envoy/clusters"),
    ] {
        let (status, body) = control(&envoy.socket(), method, path).expect("control socket");
        assert_eq!(status, 404, "{method} {path}: {body}");
    }
    let (status, body) = control(&envoy.socket(), "POST", "/envoy/stats/prometheus").expect("control socket");
    assert_eq!(status, 405, "{body}");
    let admin = envoy.dir.path().join("admin.sock");
    assert_eq!(admin_get(&admin, "/ready"), Some(200), "Envoy still serves, undrained");
    let stopped = common::admin_body(&admin, "/stats?filter=listener_manager.listener_stopped").expect("stats");
    assert!(stopped.contains("listener_manager.listener_stopped: 0"), "{stopped}");
    assert_eq!(envoy.envoy_pid(), pid, "the same Envoy");
}

#[test]
fn a_scrape_does_not_hold_the_drain() {
    let mut envoy = start(&["--drain-timeout", "30s", "--drain-min", "1s"]);
    // A scrape whose client reads the head and then nothing more, held through the whole drain.
    let mut held = UnixStream::connect(envoy.socket()).expect("connect");
    held.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    std::io::Write::write_all(&mut held, b"GET /envoy/stats/prometheus HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut head = [0u8; 12];
    held.read_exact(&mut head).expect("read the status line");
    assert_eq!(String::from_utf8_lossy(&head), "HTTP/1.1 200", "the scrape is answered");

    let stop = Instant::now();
    envoy.launcher.signal(Signal::SIGTERM);
    envoy.launcher.wait_for_drain();
    let (status, _, body) = envoy.scrape("/envoy/stats/prometheus");
    assert_eq!((status, body.contains("envoy_server_live")), (200, true), "a scrape during the drain: {body}");
    let code = envoy.launcher.exit_code(Duration::from_secs(30));
    let took = stop.elapsed();
    let log = envoy.launcher.log();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("drain ended: connections reached the threshold"), "{log}");
    assert!(took < Duration::from_secs(4), "the drain ends at --drain-min, not held by the scrapes: {took:?}\n{log}");
}

#[test]
fn a_frozen_envoy_costs_a_scrape_at_most_its_bound() {
    let envoy = start(&[]);
    let pid = Pid::from_raw(envoy.envoy_pid());
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP Envoy");
    let asked = Instant::now();
    let (status, _, body) = envoy.scrape("/envoy/stats/prometheus");
    let took = asked.elapsed();
    kill(pid, Signal::SIGCONT).expect("SIGCONT Envoy");
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("did not answer within 5s"), "{body}");
    assert!(took < Duration::from_secs(7), "bounded: {took:?}");
}

#[test]
fn without_envoy_there_is_no_admin_to_read() {
    let mut launcher = Launcher::start(Mode::Plain, &[], &["sleep", "30"]);
    let socket = launcher.runtime_dir().join("control.sock");
    common::wait_for(Duration::from_secs(10), "the control socket", || socket.exists());
    let (status, body) = control(&socket, "GET", "/envoy/stats/prometheus").expect("control socket");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body, "the command is not Envoy: there is no admin to read\n");
    launcher.signal(Signal::SIGTERM);
    assert_eq!(launcher.exit_code(Duration::from_secs(10)), 143);
}
