//! C idle keep-alive connections when SIGTERM comes. Envoy's drain does not close an idle
//! connection (it would tell it to close on its next request), so sesame's drain waits for the
//! clients; they close them all together, or one by one over `ONE_BY_ONE`. Figures: the last close
//! → Envoy's exit, the admin requests sesame made during the drain (its log line), and how the drain
//! ended. Envoy alone, for comparison, exits at SIGTERM and cuts them.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;

use crate::common::{self, Launcher, Mode, alive, children_of, free_port, idle_keepalive_connection, proxy_bootstrap};
use crate::ends::{Ends, time_of_day};
use crate::host::{logged_at, start_envoy_alone, until_live};

/// The clients hold their connections this long after SIGTERM, then close them.
const HOLD: Duration = Duration::from_secs(1);
/// The span over which the connections are closed one by one, evenly.
pub const ONE_BY_ONE: Duration = Duration::from_secs(2);
/// Threads that open the connections.
const OPENERS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    Together,
    OneByOne,
    EnvoyAlone,
    /// Envoy alone, its clients closing together with no SIGTERM: how long Envoy itself takes to
    /// close its sides.
    EnvoyAloneClosed,
}

impl Way {
    pub fn name(self) -> &'static str {
        match self {
            Way::Together => "sesame, closed together",
            Way::OneByOne => "sesame, closed one by one",
            Way::EnvoyAlone => "envoy alone",
            Way::EnvoyAloneClosed => "envoy alone, closed together without SIGTERM",
        }
    }
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Run {
    pub connections: usize,
    pub way: &'static str,
    pub open_ms: f64,
    pub sigterm_to_exit_ms: f64,
    /// Connections Envoy had closed when the clients came to close them (or, alone, at its exit).
    pub closed_by_envoy: usize,
    /// sesame: the clients' closes, the last close → Envoy's exit.
    pub closing_ms: Option<f64>,
    pub last_close_to_exit_ms: Option<f64>,
    /// sesame: the clients' last close → the drain's end (the time of its log line).
    pub last_close_to_drain_end_ms: Option<f64>,
    /// sesame: the clients' last close → Envoy's last connection end (its socket freed, as the
    /// kernel announces it), and that end → the drain's end.
    pub last_close_to_last_end_ms: Option<f64>,
    pub last_end_to_drain_end_ms: Option<f64>,
    /// The connection ends the kernel announced, and whether it dropped some.
    pub ends_seen: u64,
    pub ends_lost: bool,
    /// sesame's log: its connection polls and admin requests during the drain, its length, how it
    /// ended and the connections it saw open at SIGTERM.
    pub drain_polls: Option<u64>,
    pub drain_admin_requests: Option<u64>,
    pub drain_seconds: Option<f64>,
    pub drain_end: Option<String>,
    pub open_at_sigterm: Option<String>,
}

/// C connections that each made one request and now sit idle, opened from a few threads.
fn open(port: u16, count: usize) -> Vec<TcpStream> {
    let openers: Vec<_> = (0..OPENERS)
        .map(|t| {
            let share = count / OPENERS + usize::from(t < count % OPENERS);
            std::thread::spawn(move || (0..share).map(|_| idle_keepalive_connection(port)).collect::<Vec<_>>())
        })
        .collect();
    openers.into_iter().flat_map(|t| t.join().expect("opener")).collect()
}

/// How many of `streams` the server has closed (EOF or reset), looked at without blocking.
fn closed_by_server(streams: &[TcpStream]) -> usize {
    let mut byte = [0u8; 1];
    streams
        .iter()
        .filter(|s| {
            s.set_nonblocking(true).expect("nonblocking");
            let closed = match s.peek(&mut byte) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => e.kind() != ErrorKind::WouldBlock,
            };
            s.set_nonblocking(false).expect("blocking");
            closed
        })
        .count()
}

/// When `pid` is gone (reaped by its init), watched from a thread of its own.
fn watch_exit(pid: i32) -> std::thread::JoinHandle<Instant> {
    std::thread::spawn(move || {
        while alive(pid) {
            std::thread::sleep(Duration::from_micros(500));
        }
        Instant::now()
    })
}

/// Closes every connection: at once, or one by one at an even pace over `ONE_BY_ONE`; the time of
/// the last close.
fn close(streams: Vec<TcpStream>, way: Way) -> Instant {
    let (count, started) = (streams.len().max(1) as u32, Instant::now());
    for (i, stream) in streams.into_iter().enumerate() {
        if way == Way::OneByOne {
            let due = started + ONE_BY_ONE * i as u32 / count;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        drop(stream);
    }
    Instant::now()
}

/// "drain: N connection polls of the admin in T s, R admin requests in all" → (N, T, R).
fn drain_line(log: &str) -> Option<(u64, f64, u64)> {
    let rest = log.lines().find_map(|l| l.split_once("drain: ")?.1.strip_suffix(" admin requests in all"))?;
    let (polls, rest) = rest.split_once(" connection polls of the admin in ")?;
    let (seconds, requests) = rest.split_once(" s, ")?;
    Some((polls.parse().ok()?, seconds.parse().ok()?, requests.parse().ok()?))
}

/// "drain ended: WHY, after T; downstream connections open at SIGTERM: N" → (WHY, N).
fn drain_end(log: &str) -> Option<(String, String)> {
    let rest = log.lines().find_map(|l| l.split_once("drain ended: ").map(|(_, r)| r.to_string()))?;
    let (why, rest) = rest.split_once(", after ")?;
    let open = rest.rsplit_once(": ").map_or("?", |(_, n)| n);
    Some((why.to_string(), open.trim().to_string()))
}

/// Envoy alone; the clients close their connections together, and the last of Envoy's sides to
/// end is watched for.
fn alone_closed(connections: usize) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let bootstrap = proxy_bootstrap(dir.path(), port, free_port());
    let process = start_envoy_alone(&bootstrap);
    until_live(&process, &dir.path().join("admin.sock"));
    let opening = Instant::now();
    let streams = open(port, connections);
    let open_ms = opening.elapsed().as_secs_f64() * 1000.0;
    std::thread::sleep(Duration::from_millis(500)); // the last requests' bookkeeping is over
    let ends = Ends::watch(port);
    let closing = Instant::now();
    let last = close(streams, Way::Together);
    let last_wall = time_of_day(SystemTime::now());
    common::wait_for(Duration::from_secs(30), "Envoy to close every connection", || ends.count() >= connections as u64);
    let seen = ends.stop();
    crate::host::stop_envoy_alone(process, &bootstrap);
    let last_end = seen.last.map(time_of_day);
    Run {
        connections,
        way: Way::EnvoyAloneClosed.name(),
        open_ms,
        closing_ms: Some(last.saturating_duration_since(closing).as_secs_f64() * 1000.0),
        last_close_to_last_end_ms: last_end.map(|end| (end - last_wall).rem_euclid(86_400.0) * 1000.0),
        ends_seen: seen.count,
        ends_lost: seen.lost,
        ..Run::default()
    }
}

pub fn one_run(connections: usize, way: Way) -> Run {
    if way == Way::EnvoyAloneClosed {
        return alone_closed(connections);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let bootstrap = proxy_bootstrap(dir.path(), port, free_port());
    let admin = dir.path().join("admin.sock");
    let envoy = common::envoy_bin();
    let mut process = if way == Way::EnvoyAlone {
        start_envoy_alone(&bootstrap)
    } else {
        Launcher::start(Mode::Pid1, &[], &[envoy.to_str().expect("utf-8"), "-c", bootstrap.to_str().expect("utf-8")])
    };
    until_live(&process, &admin);
    let envoy_pid = if way == Way::EnvoyAlone { process.pid() } else { children_of(process.pid())[0] };
    let opening = Instant::now();
    let streams = open(port, connections);
    let open_ms = opening.elapsed().as_secs_f64() * 1000.0;
    std::thread::sleep(Duration::from_millis(500)); // the last requests' bookkeeping is over

    let exited = watch_exit(envoy_pid);
    let signalled = Instant::now();
    process.signal(Signal::SIGTERM);
    let ms = |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64() * 1000.0;
    let mut run = Run { connections, way: way.name(), open_ms, ..Run::default() };
    if way == Way::EnvoyAlone {
        let exit = exited.join().expect("watcher");
        run.sigterm_to_exit_ms = ms(signalled, exit);
        run.closed_by_envoy = closed_by_server(&streams);
        process.wait(Duration::from_secs(60));
        crate::support::remove_envoy_shared_memory(dir.path());
        return run;
    }
    common::wait_for(Duration::from_secs(10), "the drain to start", || process.log().contains("draining Envoy"));
    std::thread::sleep(HOLD.saturating_sub(signalled.elapsed()));
    run.closed_by_envoy = closed_by_server(&streams);
    let ends = Ends::watch(port);
    let closing = Instant::now();
    let last = close(streams, way);
    let last_wall = time_of_day(SystemTime::now());
    let exit = exited.join().expect("watcher");
    process.exit_code(Duration::from_secs(60));
    let seen = ends.stop();
    let log = process.log();
    let drain_ended = logged_at(&log, "drain ended: ");
    let last_end = seen.last.map(time_of_day);
    let ms_between = |from: Option<f64>, to: Option<f64>| Some((to? - from?).rem_euclid(86_400.0) * 1000.0);
    run.last_close_to_drain_end_ms = ms_between(Some(last_wall), drain_ended);
    run.last_close_to_last_end_ms = ms_between(Some(last_wall), last_end);
    run.last_end_to_drain_end_ms = ms_between(last_end, drain_ended);
    (run.ends_seen, run.ends_lost) = (seen.count, seen.lost);
    run.sigterm_to_exit_ms = ms(signalled, exit);
    run.closing_ms = Some(ms(closing, last));
    run.last_close_to_exit_ms = Some(ms(last, exit));
    if let Some((polls, seconds, requests)) = drain_line(&log) {
        (run.drain_polls, run.drain_seconds, run.drain_admin_requests) = (Some(polls), Some(seconds), Some(requests));
    }
    if let Some((why, open)) = drain_end(&log) {
        (run.drain_end, run.open_at_sigterm) = (Some(why), Some(open));
    }
    run
}
