//! The cost of the init itself, with Envoy running under it: the init's resident memory (VmRSS and
//! its anonymous part, RssAnon), how often it wakes up while nothing happens, and the time from
//! start to Envoy LIVE; sesame against tini, dumb-init, catatonit and Envoy alone, each as PID 1 of
//! a PID namespace. The launchers start in a rotating order, one round to the next, so that none is
//! always first (the first start of a round pays for cold caches). For sesame, the idle memory is
//! also read 2 s after one status request (it gives its idle pages back a second after each control
//! request). Run with `make bench`.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Launcher, Mode, admin_get, envoy_bin, free_port, proxy_bootstrap};
use nix::sys::signal::Signal;
use support::Spread;

const LAUNCHERS: [&str; 5] = ["sesame", "tini", "dumb-init", "catatonit", "envoy alone"];

#[derive(Debug, serde::Serialize)]
struct Run {
    launcher: &'static str,
    /// Its place in the round's start order (0: started first).
    start_position: usize,
    start_to_live_ms: f64,
    /// The init's VmRSS, RssAnon and context switches per minute while idle; None for Envoy alone
    /// (it is its own init).
    rss_kib: Option<u64>,
    rss_anon_kib: Option<u64>,
    wakeups_per_minute: Option<f64>,
    /// sesame only: VmRSS and RssAnon 2 s after one status request on its control socket.
    rss_after_status_kib: Option<u64>,
    rss_anon_after_status_kib: Option<u64>,
}

fn start(launcher: &str, bootstrap: &Path) -> Launcher {
    let envoy = envoy_bin().to_string_lossy().into_owned();
    let flags = support::envoy_flags_as_sesame_gives(bootstrap.parent().expect("bootstrap dir"));
    let bootstrap = bootstrap.to_string_lossy().into_owned();
    let plain: Vec<&str> =
        [envoy.as_str(), "-c", &bootstrap].into_iter().chain(flags.iter().map(String::as_str)).collect();
    match launcher {
        "sesame" => Launcher::start(Mode::Pid1, &[], &[&envoy, "-c", &bootstrap]),
        "tini" => Launcher::start_program(Mode::Pid1, Path::new("/usr/bin/tini"), &[&["--"], &plain[..]].concat()),
        "dumb-init" => Launcher::start_program(Mode::Pid1, Path::new("/usr/bin/dumb-init"), &plain),
        "catatonit" => {
            Launcher::start_program(Mode::Pid1, Path::new("/usr/bin/catatonit"), &[&["--"], &plain[..]].concat())
        }
        _ => Launcher::start_program(Mode::Pid1, Path::new(&envoy), &plain[1..]),
    }
}

fn status_field(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

fn context_switches(pid: i32) -> u64 {
    status_field(pid, "voluntary_ctxt_switches:") + status_field(pid, "nonvoluntary_ctxt_switches:")
}

/// One run: every launcher started in turn (timed alone), round `round` starting with the
/// launcher at that place in LAUNCHERS, then all sampled over the same idle window. The runs come
/// back in the order of LAUNCHERS.
fn one_round(round: usize, idle: Duration) -> Vec<Run> {
    let mut running = Vec::new();
    let mut runs = Vec::new();
    let order = (0..LAUNCHERS.len()).map(|i| LAUNCHERS[(round + i) % LAUNCHERS.len()]);
    for (start_position, launcher) in order.enumerate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bootstrap = proxy_bootstrap(dir.path(), free_port(), free_port());
        let admin = dir.path().join("admin.sock");
        let process = start(launcher, &bootstrap);
        while admin_get(&admin, "/ready") != Some(200) {
            assert!(process.started.elapsed() < Duration::from_secs(30), "{launcher}: Envoy not ready");
            std::thread::sleep(Duration::from_millis(2));
        }
        let start_to_live_ms = process.started.elapsed().as_secs_f64() * 1000.0;
        runs.push(Run {
            launcher,
            start_position,
            start_to_live_ms,
            rss_kib: None,
            rss_anon_kib: None,
            wakeups_per_minute: None,
            rss_after_status_kib: None,
            rss_anon_after_status_kib: None,
        });
        running.push((launcher, process, dir));
    }
    // Start-up settles: sesame gives its idle pages back a second after its epoch is LIVE.
    std::thread::sleep(Duration::from_secs(2));
    let inits: Vec<(usize, i32)> = running
        .iter()
        .enumerate()
        .filter(|(_, (launcher, _, _))| *launcher != "envoy alone")
        .map(|(i, (_, process, _))| (i, process.pid()))
        .collect();
    let before: Vec<u64> = inits.iter().map(|(_, pid)| context_switches(*pid)).collect();
    let window = Instant::now();
    std::thread::sleep(idle);
    let minutes = window.elapsed().as_secs_f64() / 60.0;
    for ((i, pid), before) in inits.iter().zip(before) {
        runs[*i].wakeups_per_minute = Some((context_switches(*pid) - before) as f64 / minutes);
        runs[*i].rss_kib = Some(status_field(*pid, "VmRSS:"));
        runs[*i].rss_anon_kib = Some(status_field(*pid, "RssAnon:"));
    }
    // After the idle figures: the request wakes sesame up.
    let sesame = running.iter().position(|(launcher, _, _)| *launcher == "sesame").expect("sesame runs");
    running[sesame].1.status();
    std::thread::sleep(Duration::from_secs(2));
    let pid = running[sesame].1.pid();
    runs[sesame].rss_after_status_kib = Some(status_field(pid, "VmRSS:"));
    runs[sesame].rss_anon_after_status_kib = Some(status_field(pid, "RssAnon:"));
    for (launcher, mut process, dir) in running {
        process.signal(Signal::SIGTERM);
        process.wait(Duration::from_secs(30));
        // sesame removes Envoy's hot-restart shared memory when it exits; without it, the bench does.
        if launcher != "sesame" {
            support::remove_envoy_shared_memory(dir.path());
        }
    }
    runs.sort_by_key(|r| LAUNCHERS.iter().position(|l| *l == r.launcher));
    runs
}

/// sesame's own start: from its spawn to Envoy's (the log line that says Envoy was started, whose
/// UTC timestamp is compared with the time of day just before the spawn), as a plain process.
fn own_start_ms() -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let bootstrap = proxy_bootstrap(dir.path(), free_port(), free_port()).to_string_lossy().into_owned();
    let envoy = envoy_bin().to_string_lossy().into_owned();
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock");
    let mut process = Launcher::start(Mode::Plain, &[], &[&envoy, "-c", &bootstrap]);
    let mut line = None;
    while line.is_none() {
        assert!(process.started.elapsed() < Duration::from_secs(30), "no 'started' line:\n{}", process.log());
        line = process.log().lines().find(|l| l.contains(" started ")).map(str::to_string);
        std::thread::sleep(Duration::from_millis(2));
    }
    process.signal(Signal::SIGTERM);
    process.wait(Duration::from_secs(30));
    // "2026-11-27T22:27:21.990323Z  INFO started ...": the time of day, UTC.
    let line = line.expect("line");
    let clock: Vec<f64> = line[11..26].split(':').map(|f| f.parse().expect("timestamp")).collect();
    let spawned = clock[0] * 3600.0 + clock[1] * 60.0 + clock[2];
    let spawn = (before.as_secs() % 86_400) as f64 + f64::from(before.subsec_nanos()) / 1e9;
    (spawned - spawn).rem_euclid(86_400.0) * 1000.0
}

fn main() {
    if !support::invoked_by_cargo_bench() {
        return;
    }
    let rounds = support::runs();
    let idle = if support::quick() { Duration::from_secs(5) } else { Duration::from_secs(15) };
    let all: Vec<Run> = (0..rounds).flat_map(|round| one_round(round, idle)).collect();
    let own_start: Vec<f64> = (0..rounds).map(|_| own_start_ms()).collect();
    println!("## Init overhead with Envoy running ({rounds} runs, idle window {idle:?}, init as PID 1)\n");
    println!(
        "Every init runs Envoy with the flags sesame gives it (hot restart on); the start order rotates from one \
         run to the next. Idle RSS: VmRSS / RssAnon of the init; for sesame, also 2 s after one status request.\n"
    );
    println!(
        "| init | idle RSS, KiB (VmRSS / RssAnon) | after a status request | wake-ups per minute while idle | \
         start → Envoy LIVE, ms | vs Envoy alone |"
    );
    println!("|---|---|---|---|---|---|");
    let spread = |launcher: &str, f: &dyn Fn(&Run) -> Option<f64>| {
        let values: Vec<f64> = all.iter().filter(|r| r.launcher == launcher).filter_map(f).collect();
        (!values.is_empty()).then(|| Spread::of(&values))
    };
    for launcher in LAUNCHERS {
        let rss = spread(launcher, &|r| r.rss_kib.map(|v| v as f64));
        let anon = spread(launcher, &|r| r.rss_anon_kib.map(|v| v as f64));
        let rss_after = spread(launcher, &|r| r.rss_after_status_kib.map(|v| v as f64));
        let anon_after = spread(launcher, &|r| r.rss_anon_after_status_kib.map(|v| v as f64));
        let wakeups = spread(launcher, &|r| r.wakeups_per_minute);
        let live = spread(launcher, &|r| Some(r.start_to_live_ms)).expect("start times");
        // The ratio is taken run by run, against Envoy alone started in the same round.
        let ratios: Vec<f64> = all
            .chunks(LAUNCHERS.len())
            .map(|round| {
                let of = |name: &str| round.iter().find(|r| r.launcher == name).expect("launcher").start_to_live_ms;
                of(launcher) / of("envoy alone")
            })
            .collect();
        let show = |s: Option<Spread>| s.map_or_else(|| "— (Envoy is PID 1)".to_string(), |s| s.to_string());
        let memory = |rss: Option<Spread>, anon: Option<Spread>, none: &str| match (rss, anon) {
            (Some(rss), Some(anon)) => format!("{rss} / {anon}"),
            _ => none.to_string(),
        };
        let idle_memory = memory(rss, anon, "— (Envoy is PID 1)");
        let after = memory(rss_after, anon_after, "—");
        println!(
            "| {launcher} | {idle_memory} | {after} | {} | {live} | {:.2}× |",
            show(wakeups),
            Spread::of(&ratios).median
        );
    }
    println!("\n| sesame's own start: spawned → Envoy spawned, ms |\n|---|\n| {} |", Spread::of(&own_start));
    let path = support::write_json("overhead", &all);
    support::write_json("own-start", &own_start);
    println!("\nraw figures: {}", path.display());
}
