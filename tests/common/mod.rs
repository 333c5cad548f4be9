//! The test rig: the real `sesame` binary, started as PID 1 of a fresh PID namespace (or as a plain
//! process), with its log captured and every wait bounded.
#![allow(dead_code)]

pub mod client;
pub mod in_place;
pub mod load;
pub mod long_lived;
pub mod rotation;
pub mod site;
pub mod tls;

pub use client::*;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const SESAME: &str = env!("CARGO_BIN_EXE_sesame");

/// The pinned Envoy that `make test` installs. A missing Envoy fails the test: it is never skipped.
pub fn envoy_bin() -> PathBuf {
    let path = std::env::var_os("ENVOY_BIN").map(PathBuf::from).unwrap_or_else(|| {
        panic!("ENVOY_BIN is not set: run the tests with `make test`, which installs the pinned Envoy into .tools/")
    });
    assert!(path.is_file(), "ENVOY_BIN={} does not exist: run `make envoy`", path.display());
    path
}

/// The pinned Envoy where any user can run it: `ENVOY_BIN` itself when every directory on its way
/// lets others through, else a copy under the temporary directory (a checkout in `/root` or in a
/// `mktemp -d` is closed to the user the `--envoy-user` tests run Envoy as).
pub fn envoy_bin_for_anyone() -> PathBuf {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let envoy = envoy_bin();
    let open = |dir: &Path| std::fs::metadata(dir).is_ok_and(|m| m.mode() & 0o001 != 0);
    let absolute = std::fs::canonicalize(&envoy).expect("ENVOY_BIN's path");
    if absolute.ancestors().skip(1).all(open)
        && envoy.ancestors().skip(1).filter(|d| !d.as_os_str().is_empty()).all(open)
    {
        return envoy;
    }
    let meta = std::fs::metadata(&absolute).expect("stat ENVOY_BIN");
    let dir = std::env::temp_dir().join(format!("sesame-tests-envoy-{}-{}", meta.len(), meta.mtime()));
    let copy = dir.join("envoy");
    if !copy.is_file() {
        std::fs::create_dir_all(&dir).expect("mkdir for the copy of Envoy");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        // Test binaries run side by side: each copies under its own name, and the rename is atomic.
        let partial = dir.join(format!("envoy.{}", std::process::id()));
        std::fs::copy(&absolute, &partial).expect("copy Envoy");
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::rename(&partial, &copy).expect("rename the copy of Envoy");
    }
    copy
}

/// Polls `condition` every 10 ms until it holds, or panics after `timeout` naming what was awaited.
pub fn wait_for(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` distinct loopback ports that were free a moment ago (all held until all are chosen).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> =
        (0..N).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port")).collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("local addr").port())
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `unshare --pid --fork --mount-proc`: sesame is PID 1 of a new PID namespace.
    Pid1,
    /// sesame as an ordinary process (a child subreaper).
    Plain,
}

/// A running launcher. Dropping it kills whatever is left.
pub struct Launcher {
    process: Child,
    mode: Mode,
    /// What runs in the launcher's place (sesame, unless comparing).
    program: PathBuf,
    /// sesame's pid as the test sees it (in the test's own namespace), found on first use.
    pid: std::cell::OnceCell<i32>,
    pub dir: tempfile::TempDir,
    log_path: PathBuf,
    pub started: Instant,
}

impl Launcher {
    /// Starts `sesame run OPTIONS -- COMMAND` with stderr in a log file.
    pub fn start(mode: Mode, options: &[&str], command: &[&str]) -> Launcher {
        Self::start_with(mode, options, command, |_| {})
    }

    pub fn start_with(mode: Mode, options: &[&str], command: &[&str], adjust: impl FnOnce(&mut Command)) -> Launcher {
        let dir = tempfile::Builder::new().prefix("sesame-test").tempdir().expect("tempdir");
        let mut argv: Vec<OsString> = vec!["run".into(), "--runtime-dir".into(), dir.path().join("run").into()];
        argv.extend(options.iter().map(OsString::from));
        if !command.is_empty() {
            argv.push("--".into());
            argv.extend(command.iter().map(OsString::from));
        }
        Self::spawn(mode, dir, Path::new(SESAME), &argv, adjust, &[])
    }

    /// Starts `sesame run OPTIONS -- COMMAND` in the cgroup whose `cgroup.procs` file is `procs`: a
    /// shell moves itself there and then execs the launcher, so everything it starts is there too.
    pub fn start_in_cgroup(mode: Mode, procs: &Path, options: &[&str], command: &[&str]) -> Launcher {
        let dir = tempfile::Builder::new().prefix("sesame-test").tempdir().expect("tempdir");
        let mut argv: Vec<OsString> = vec!["run".into(), "--runtime-dir".into(), dir.path().join("run").into()];
        argv.extend(options.iter().map(OsString::from));
        argv.push("--".into());
        argv.extend(command.iter().map(OsString::from));
        let wrapper: Vec<OsString> =
            vec!["sh".into(), "-c".into(), r#"echo $$ > "$0" && exec "$@""#.into(), procs.into()];
        Self::spawn(mode, dir, Path::new(SESAME), &argv, |_| {}, &wrapper)
    }

    /// Any program in sesame's place (tini, dumb-init, Envoy itself): for comparisons.
    pub fn start_program(mode: Mode, program: &Path, args: &[&str]) -> Launcher {
        let dir = tempfile::Builder::new().prefix("sesame-test").tempdir().expect("tempdir");
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        Self::spawn(mode, dir, program, &args, |_| {}, &[])
    }

    fn spawn(
        mode: Mode,
        dir: tempfile::TempDir,
        program: &Path,
        args: &[OsString],
        adjust: impl FnOnce(&mut Command),
        wrapper: &[OsString],
    ) -> Launcher {
        let log_path = dir.path().join("sesame.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let program = program.canonicalize().unwrap_or_else(|e| panic!("{}: {e}", program.display()));
        let mut line: Vec<OsString> = wrapper.to_vec();
        if mode == Mode::Pid1 {
            line.extend(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"].map(OsString::from));
        }
        line.push(program.clone().into());
        let mut cmd = Command::new(&line[0]);
        cmd.args(&line[1..]);
        cmd.args(args).stdin(Stdio::null()).stdout(log.try_clone().expect("log")).stderr(log);
        adjust(&mut cmd);
        let process = cmd.spawn().unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        let started = Instant::now();
        Launcher { process, mode, program, pid: Default::default(), dir, log_path, started }
    }

    /// sesame's pid as the test sees it. As PID 1, it is the child of `unshare` once it has exec'd.
    pub fn pid(&self) -> i32 {
        *self.pid.get_or_init(|| match self.mode {
            Mode::Plain => self.process.id() as i32,
            Mode::Pid1 => find_child_running(self.process.id() as i32, &self.program),
        })
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("signal sesame");
    }

    /// Waits for the launcher to exit; on timeout kills it and fails with its log.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.process.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.process.kill();
                panic!("sesame did not exit within {timeout:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the exit and returns its code (the launcher exits, it is never killed by a signal).
    pub fn exit_code(&mut self, timeout: Duration) -> i32 {
        let status = self.wait(timeout);
        status.code().unwrap_or_else(|| panic!("sesame ended by {status:?}; log:\n{}", self.log()))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// The program that `unshare --fork` started, once it has exec'd.
fn find_child_running(parent: i32, program: &Path) -> i32 {
    let mut found = 0;
    wait_for(Duration::from_secs(10), "unshare to start the launcher", || {
        found = children_of(parent)
            .into_iter()
            .find(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == program))
            .unwrap_or(0);
        found != 0
    });
    found
}

/// Direct children of `parent`, read from /proc.
pub fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return vec![] };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| ppid_of(*pid) == Some(parent))
        .collect()
}

pub fn ppid_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// Whether a process with this pid exists (a zombie counts as existing).
pub fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A test upstream on loopback: answers every request with 200 after holding it for `hold`, and
/// counts the requests that arrived.
pub struct Upstream {
    pub port: u16,
    pub arrived: Arc<std::sync::atomic::AtomicUsize>,
}

impl Upstream {
    pub fn start(hold: Duration) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let port = listener.local_addr().expect("addr").port();
        let arrived = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = arrived.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let counter = counter.clone();
                std::thread::spawn(move || serve_held(stream, hold, &counter));
            }
        });
        Upstream { port, arrived }
    }

    pub fn arrived(&self) -> usize {
        self.arrived.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Keep-alive HTTP/1.1 upstream connection: each request (no body expected) is answered after `hold`.
fn serve_held(mut stream: TcpStream, hold: Duration, arrived: &std::sync::atomic::AtomicUsize) {
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            pending.drain(..end + 4);
            arrived.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(hold);
            if stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n").is_err() {
                return;
            }
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
}

/// Writes an Envoy bootstrap: admin on a unix socket in `dir`, one HTTP listener on `port` that
/// answers `/direct` itself and proxies everything else to the upstream on `upstream_port`.
pub fn proxy_bootstrap(dir: &Path, port: u16, upstream_port: u16) -> PathBuf {
    let admin = dir.join("admin.sock");
    let yaml = format!(
        r#"
admin:
  address: {{ pipe: {{ path: "{admin}" }} }}
static_resources:
  listeners:
  - name: ingress
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/direct" }}
                direct_response: {{ status: 200, body: {{ inline_string: "direct\n" }} }}
              - match: {{ prefix: "/" }}
                route: {{ cluster: upstream, timeout: 30s }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {upstream_port} }} }} }}
"#,
        admin = admin.display()
    );
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, yaml).expect("write bootstrap");
    path
}

impl Launcher {
    /// Runs the real Envoy on `bootstrap` under sesame, and waits until its admin says it is ready.
    pub fn start_envoy(mode: Mode, options: &[&str], bootstrap: &Path) -> Launcher {
        Self::start_envoy_with(mode, options, bootstrap, &[])
    }

    /// The same, with more arguments for Envoy.
    pub fn start_envoy_with(mode: Mode, options: &[&str], bootstrap: &Path, envoy_args: &[&str]) -> Launcher {
        let envoy = envoy_bin().to_string_lossy().into_owned();
        let bootstrap = bootstrap.to_string_lossy().into_owned();
        let command: Vec<&str> =
            [envoy.as_str(), "-c", &bootstrap].into_iter().chain(envoy_args.iter().copied()).collect();
        let launcher = Launcher::start(mode, options, &command);
        let admin = bootstrap_dir(&bootstrap).join("admin.sock");
        wait_for(Duration::from_secs(30), "Envoy to be ready", || admin_get(&admin, "/ready") == Some(200));
        launcher
    }

    /// Waits until the log holds `text`; on timeout, fails with the log.
    pub fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.log().contains(text) {
            assert!(Instant::now() < deadline, "timed out waiting for the log to say '{text}'; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn bootstrap_dir(bootstrap: &str) -> PathBuf {
    Path::new(bootstrap).parent().expect("bootstrap dir").to_path_buf()
}

/// Load generators yield to the system under test: on 2 cores, 32 busy client threads would
/// otherwise measure the scheduler rather than the launcher (in production, clients are elsewhere).
pub fn yield_to_the_system_under_test() {
    // SAFETY: setpriority(2) on the calling thread's own tid only lowers its scheduling priority.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
    }
}

impl Launcher {
    /// The launcher's `GET /status` over its control socket, as JSON.
    pub fn status(&self) -> serde_json::Value {
        self.try_status().unwrap_or_else(|e| panic!("{e}; log:\n{}", self.log()))
    }

    fn try_status(&self) -> Result<serde_json::Value, String> {
        let (code, body) = control(&self.runtime_dir().join("control.sock"), "GET", "/status")
            .map_err(|e| format!("GET /status: {e}"))?;
        if code != 200 {
            return Err(format!("GET /status answered {code}: {body}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("GET /status is not JSON ({e}): {body}"))
    }

    /// Waits until `/status` answers and satisfies `holds`; on timeout, fails with the last status
    /// (or why there was none) and the log.
    pub fn wait_for_status(&self, what: &str, holds: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self.try_status();
            if let Ok(status) = &status
                && holds(status)
            {
                return status.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; status {status:#?}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `/status` shows the drain of a stop under way (sesame talks to Envoy's admin).
    pub fn wait_for_drain(&self) -> serde_json::Value {
        self.wait_for_status("the drain to start", draining)
    }

    /// Whether `/status` shows the drain under way now: false once it has ended (or the launcher is
    /// gone).
    pub fn is_draining(&self) -> bool {
        self.try_status().is_ok_and(|status| draining(&status))
    }

    /// The launcher's `GET /metrics` over its control socket, as text.
    pub fn metrics(&self) -> String {
        self.try_metrics().unwrap_or_else(|e| panic!("{e}; log:\n{}", self.log()))
    }

    fn try_metrics(&self) -> Result<String, String> {
        let (code, text) = control(&self.runtime_dir().join("control.sock"), "GET", "/metrics")
            .map_err(|e| format!("GET /metrics: {e}"))?;
        if code != 200 {
            return Err(format!("GET /metrics answered {code}: {text}"));
        }
        Ok(text)
    }

    /// One series of `/metrics`, named as the text shows it, labels included
    /// (`sesame_reaped_children_total{kind="orphan"}`); 0 while it is not shown (a labelled
    /// counter appears at its first count).
    pub fn metric(&self, series: &str) -> i64 {
        series_value(&self.metrics(), series)
    }

    /// Waits until the series `series` of `/metrics` satisfies `holds`; returns its value. On
    /// timeout, fails with the last scrape (or why there was none) and the log.
    pub fn wait_for_metric(&self, series: &str, holds: impl Fn(i64) -> bool) -> i64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let metrics = self.try_metrics();
            if let Ok(text) = &metrics
                && holds(series_value(text, series))
            {
                return series_value(text, series);
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {series} to hold; metrics {metrics:#?}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `sesame_reloads_total{result="RESULT"}` from the launcher's `/metrics`.
    pub fn reloads(&self, result: &str) -> u64 {
        self.metric(&format!("sesame_reloads_total{{result=\"{result}\"}}")) as u64
    }

    /// `sesame_recoveries_total{result="RESULT"}`: cold handovers by result.
    pub fn recoveries(&self, result: &str) -> u64 {
        self.metric(&format!("sesame_recoveries_total{{result=\"{result}\"}}")) as u64
    }
}

/// The series of `/metrics` that counts the processes reaped of `kind` (epoch, validator, orphan).
pub fn reaped_children(kind: &str) -> String {
    format!("sesame_reaped_children_total{{kind=\"{kind}\"}}")
}

/// Whether a `/status` shows the drain of a stop under way.
pub fn draining(status: &serde_json::Value) -> bool {
    status["drain"].is_object()
}

/// The value of `series` (name and labels, as the text shows them) in a Prometheus text; 0 when
/// it is not there.
fn series_value(text: &str, series: &str) -> i64 {
    let prefix = format!("{series} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse::<f64>().ok()).map_or(0, |value| value as i64)
}
