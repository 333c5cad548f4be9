//! Large bootstraps (10,000 routes; 500 listeners): start to LIVE under sesame and under Envoy
//! alone, `envoy --mode validate` alone on the same file, and a hot restart by `POST /reload` (what
//! `sesame reload` sends; answered once the new epoch is LIVE), split by sesame's log into its
//! checks (the validator among them) and the new epoch's start.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::common::{self, Launcher, Mode, control, free_port};
use crate::host::{cpu_ms, logged_between_ms, settle, start_envoy_alone, status_kib, stop_envoy_alone, until_live};

const SESAME_OPTIONS: [&str; 4] = ["--envoy-drain-time", "2s", "--envoy-parent-shutdown-time", "3s"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Routes(usize),
    Listeners(usize),
}

impl Shape {
    pub fn name(self) -> String {
        match self {
            Shape::Routes(n) => format!("{} routes", thousands(n)),
            Shape::Listeners(n) => format!("{} listeners", thousands(n)),
        }
    }
}

pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Run {
    pub bootstrap: String,
    pub bootstrap_bytes: u64,
    pub envoy_alone_start_to_live_ms: f64,
    pub validate_alone_ms: f64,
    pub sesame_start_to_live_ms: f64,
    /// POST /reload → its answer, the new epoch LIVE.
    pub reload_ms: f64,
    /// From sesame's log: the trigger → the new epoch started (sesame's checks and `envoy --mode
    /// validate`), and the new epoch started → LIVE.
    pub reload_checks_ms: Option<f64>,
    pub reload_new_epoch_ms: Option<f64>,
    /// sesame's own CPU time for the reload (until its old epoch has exited and it is quiet again).
    pub sesame_reload_cpu_ms: f64,
    pub sesame_vm_rss_kib: u64,
    pub sesame_rss_anon_kib: u64,
    pub sesame_vm_hwm_kib: u64,
}

fn hcm(prefix: &str, routes: &str) -> String {
    format!(
        r#"      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {prefix}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
{routes}          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#
    )
}

const CATCH_ALL: &str = "              - match: { prefix: \"/\" }\n                direct_response: { status: 200 }\n";

fn listener(name: &str, port: u16, routes: &str) -> String {
    format!(
        "  - name: {name}\n    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}\n    \
         filter_chains:\n    - filters:\n{}",
        hcm(name, routes)
    )
}

/// The bootstrap of `shape`, admin on `dir/admin.sock`.
fn bootstrap(dir: &Path, shape: Shape) -> PathBuf {
    let mut yaml = format!(
        "admin:\n  address: {{ pipe: {{ path: \"{}\" }} }}\nstatic_resources:\n  listeners:\n",
        dir.join("admin.sock").display()
    );
    match shape {
        Shape::Routes(n) => {
            let mut routes = String::new();
            for i in 0..n {
                routes += &format!(
                    "              - match: {{ path: \"/r{i}\" }}\n                direct_response: {{ status: 200 }}\n"
                );
            }
            yaml += &listener("routes", free_port(), &(routes + CATCH_ALL));
        }
        Shape::Listeners(n) => {
            let ports: Vec<std::net::TcpListener> =
                (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port")).collect();
            for (i, held) in ports.iter().enumerate() {
                yaml += &listener(&format!("l{i}"), held.local_addr().expect("addr").port(), CATCH_ALL);
            }
        }
    }
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, yaml).expect("write the bootstrap");
    path
}

fn envoy_alone(bootstrap: &Path) -> f64 {
    let process = start_envoy_alone(bootstrap);
    let live = until_live(&process, &bootstrap.with_file_name("admin.sock"));
    stop_envoy_alone(process, bootstrap);
    live
}

/// `envoy --mode validate -c BOOTSTRAP`, as sesame runs it before a hot restart: its wall time.
fn validate_alone(bootstrap: &Path) -> f64 {
    let started = Instant::now();
    let status = Command::new(common::envoy_bin())
        .args(["-c".as_ref(), bootstrap.as_os_str(), "--mode".as_ref(), "validate".as_ref()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run envoy --mode validate");
    assert!(status.success(), "envoy --mode validate refused {}", bootstrap.display());
    started.elapsed().as_secs_f64() * 1000.0
}

pub fn one_run(shape: Shape) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = bootstrap(dir.path(), shape);
    let bootstrap_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let envoy_alone_start_to_live_ms = envoy_alone(&path);
    let validate_alone_ms = validate_alone(&path);

    let envoy = common::envoy_bin();
    let command = [envoy.to_str().expect("utf-8"), "-c", path.to_str().expect("utf-8")];
    let mut launcher = Launcher::start(Mode::Pid1, &SESAME_OPTIONS, &command);
    let sesame_start_to_live_ms = until_live(&launcher, &dir.path().join("admin.sock"));
    std::thread::sleep(Duration::from_secs(2)); // sesame settles (its idle pages go a second after LIVE)
    let pid = launcher.pid();
    let (vm_rss, rss_anon) = (status_kib(pid, "VmRSS"), status_kib(pid, "RssAnon"));
    let cpu = cpu_ms(pid);
    let asked = Instant::now();
    let (code, body) = control(&launcher.runtime_dir().join("control.sock"), "POST", "/reload").expect("POST /reload");
    let reload_ms = asked.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(code, 200, "POST /reload answered {code}: {body}\n{}", launcher.log());
    settle(|| launcher.log(), Duration::from_millis(1500), "the reload");
    let sesame_reload_cpu_ms = cpu_ms(pid) - cpu;
    let log = launcher.log();
    let vm_hwm = status_kib(pid, "VmHWM");
    launcher.signal(Signal::SIGTERM);
    launcher.exit_code(Duration::from_secs(60));
    Run {
        bootstrap: shape.name(),
        bootstrap_bytes,
        envoy_alone_start_to_live_ms,
        validate_alone_ms,
        sesame_start_to_live_ms,
        reload_ms,
        reload_checks_ms: logged_between_ms(
            &log,
            "validating for a hot restart to epoch 1",
            "hot restart: started epoch 1",
        ),
        reload_new_epoch_ms: logged_between_ms(
            &log,
            "hot restart: started epoch 1",
            "hot restart done: epoch 1 is LIVE",
        ),
        sesame_reload_cpu_ms,
        sesame_vm_rss_kib: vm_rss,
        sesame_rss_anon_kib: rss_anon,
        sesame_vm_hwm_kib: vm_hwm,
    }
}
