//! Floods on the control API: idle, slowloris and silent-TLS connections on `--http` and on the
//! control socket, with systemd's default soft limit of 1024 file descriptors, and with far fewer.
//! The launcher must stay cheap (CPU, log lines, file descriptors), keep answering on the control
//! socket, and close what does not send a request in time.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Launcher, Mode, SESAME, control, control_tcp, free_port, wait_for};
use nix::sys::signal::Signal;

/// The launcher's limits, as the README names them.
const MAX_CONNECTIONS: usize = 128;
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Enough file descriptors for the test's own side of the flood.
fn raise_own_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the local struct only.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max.min(65_536);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// sesame with a plain command, `--http` on `port`, and at most `fds` open files.
fn start(runtime: &Path, port: u16, fds: u32) -> Launcher {
    let script = format!(
        "ulimit -n {fds} && exec {SESAME} run --runtime-dir {} --http 127.0.0.1:{port} -- sleep 1000",
        runtime.display()
    );
    let launcher = Launcher::start_program(Mode::Plain, Path::new("/bin/sh"), &["-c", &script]);
    let socket = runtime.join("control.sock");
    wait_for(Duration::from_secs(10), "the control socket", || {
        control(&socket, "GET", "/ready").is_ok_and(|(status, _)| status == 200)
    });
    launcher
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat.rsplit_once(')').expect("comm").1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks as f64 / 100.0
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fd dir").count()
}

/// Whether the server has closed `stream` (EOF or reset), waiting at most `within`.
fn closed_by_server(stream: &mut impl Read, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + within;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                if Instant::now() >= deadline {
                    return false;
                }
            }
            Err(_) => return true,
        }
    }
}

fn client_status(runtime: &Path) -> (Option<i32>, Duration) {
    let started = Instant::now();
    let status = Command::new(SESAME)
        .args(["status", "--runtime-dir"])
        .arg(runtime)
        .output()
        .expect("sesame status")
        .status
        .code();
    (status, started.elapsed())
}

struct Flood {
    tcp: Vec<TcpStream>,
    unix: Vec<UnixStream>,
}

/// `idle` silent TCP connections, `slow` that send half a request head, and `unix` silent ones on
/// the control socket.
fn flood(port: u16, socket: &Path, idle: usize, slow: usize, unix: usize) -> Flood {
    let mut tcp = Vec::new();
    for i in 0..idle + slow {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect --http");
        stream.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
        if i >= idle {
            let _ = stream.write_all(b"GET /status HTTP/1.1\r\nHost: flood\r\n");
        }
        tcp.push(stream);
    }
    let unix = (0..unix)
        .map(|_| {
            let stream = UnixStream::connect(socket).expect("connect control socket");
            stream.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
            stream
        })
        .collect();
    Flood { tcp, unix }
}

#[test]
fn a_flood_of_idle_and_slow_connections_costs_little_and_is_closed_in_time() {
    raise_own_fd_limit();
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime: PathBuf = dir.path().join("run");
    let port = free_port();
    let mut launcher = start(&runtime, port, 1024);
    let pid = launcher.pid();
    let (cpu_before, lines_before) = (cpu_seconds(pid), launcher.log().lines().count());

    // 1,100 idle and 100 slowloris connections on --http, 100 idle ones on the control socket.
    let mut flood = flood(port, &runtime.join("control.sock"), 1_100, 100, 100);
    let flooded = Instant::now();
    let (status, took) = client_status(&runtime);
    assert_eq!(status, Some(0), "sesame status answers during the flood (took {took:?})");
    std::thread::sleep(Duration::from_secs(2)); // the window whose cost is measured
    let (cpu, lines, fds) =
        (cpu_seconds(pid) - cpu_before, launcher.log().lines().count() - lines_before, open_fds(pid));
    eprintln!("during the flood: {cpu:.2} s CPU in {:?}, {lines} log lines, {fds} open fds", flooded.elapsed());
    assert!(cpu < 0.5, "the flood costs {cpu:.2} s of CPU in {:?}", flooded.elapsed());
    assert!(lines <= 10, "{lines} log lines:\n{}", launcher.log());
    assert!(fds <= 2 * MAX_CONNECTIONS + 32, "{fds} open fds");

    // What sent no whole request head is closed once the header read timeout is over (counted
    // from when the last connection was opened, with a margin for a loaded machine).
    let deadline = flooded + HEADER_READ_TIMEOUT + Duration::from_secs(3);
    let left = |deadline: Instant| deadline.saturating_duration_since(Instant::now());
    let open_tcp = flood.tcp.iter_mut().map(|s| closed_by_server(s, left(deadline))).filter(|c| !c).count();
    let open_unix = flood.unix.iter_mut().map(|s| closed_by_server(s, left(deadline))).filter(|c| !c).count();
    assert_eq!((open_tcp, open_unix), (0, 0), "connections still open after the header read timeout");
    let (status, body) = control_tcp(port, "GET", "/healthz", &[]).expect("--http after the flood");
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    launcher.signal(Signal::SIGTERM);
    assert_eq!(launcher.exit_code(Duration::from_secs(10)), 143, "{}", launcher.log());
}

#[test]
fn out_of_file_descriptors_the_launcher_backs_off_and_recovers() {
    raise_own_fd_limit();
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime: PathBuf = dir.path().join("run");
    let port = free_port();
    // Fewer descriptors than the connection cap: accept fails with EMFILE.
    let mut launcher = start(&runtime, port, 40);
    let pid = launcher.pid();
    // Fewer than the listen backlog, so that every connect completes at once.
    let flood = flood(port, &runtime.join("control.sock"), 100, 0, 0);
    launcher.wait_for_log("--http: accept failed");
    let (cpu_before, lines_before) = (cpu_seconds(pid), launcher.log().lines().count());
    std::thread::sleep(Duration::from_secs(2)); // the window whose cost is measured
    let (cpu, lines) = (cpu_seconds(pid) - cpu_before, launcher.log().lines().count() - lines_before);
    let log = launcher.log();
    eprintln!("out of fds: {cpu:.2} s CPU in 2 s, {lines} log lines");
    assert!(log.contains("--http: accept failed") && log.contains("Too many open files"), "{log}");
    assert!(cpu < 0.5, "backing off costs {cpu:.2} s of CPU in 2 s");
    assert!(lines <= 3, "accept errors are logged at most once a second: {lines} lines in 2 s:\n{log}");

    // Once the clients give up, the launcher serves again.
    drop(flood);
    wait_for(Duration::from_secs(15), "the control socket to answer again", || {
        control(&runtime.join("control.sock"), "GET", "/healthz").is_ok_and(|(status, _)| status == 200)
    });
    launcher.signal(Signal::SIGTERM);
    assert_eq!(launcher.exit_code(Duration::from_secs(10)), 143, "{}", launcher.log());
}

#[test]
fn the_last_burst_over_the_cap_is_counted_in_the_log() {
    raise_own_fd_limit();
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime: PathBuf = dir.path().join("run");
    let port = free_port();
    let mut launcher = start(&runtime, port, 1024);
    // 300 connections at once (fewer than the listen backlog), and nothing after them.
    let flooded = Instant::now();
    let flood = flood(port, &runtime.join("control.sock"), 300, 0, 0);
    let refused = (300 - MAX_CONNECTIONS) as u64;
    let counted = || -> u64 {
        let log = launcher.log();
        let counts = log.lines().filter_map(|l| l.split_once("--http: ")?.1.split_once(" connections closed at once"));
        counts.filter_map(|(count, _)| count.parse::<u64>().ok()).sum()
    };
    wait_for(Duration::from_secs(5), "every refused connection to be counted, the last ones too", || {
        counted() == refused
    });
    // At most one line a second (a loaded machine may spread the accepts over a few).
    let lines = launcher.log().matches("connections closed at once").count() as u64;
    assert!(lines <= 2 + flooded.elapsed().as_secs(), "{lines} lines in {:?}:\n{}", flooded.elapsed(), launcher.log());
    drop(flood);
    launcher.signal(Signal::SIGTERM);
    assert_eq!(launcher.exit_code(Duration::from_secs(10)), 143, "{}", launcher.log());
}
