//! The cost of the init itself, with Envoy running under it: the init's resident memory, how often
//! it wakes up while nothing happens, and the time from start to Envoy LIVE; sesame against tini,
//! dumb-init, catatonit and Envoy alone, each as PID 1 of a PID namespace. Run with `make bench`.

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
    start_to_live_ms: f64,
    /// The init's VmRSS and context switches per minute while idle; None for Envoy alone (it is its own init).
    rss_kib: Option<u64>,
    wakeups_per_minute: Option<f64>,
}

fn start(launcher: &str, bootstrap: &Path) -> Launcher {
    let envoy = envoy_bin().to_string_lossy().into_owned();
    let bootstrap = bootstrap.to_string_lossy().into_owned();
    let plain = [envoy.as_str(), "-c", &bootstrap, "--disable-hot-restart"];
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

/// One run: every launcher started in turn (timed alone), then all sampled over the same idle window.
fn one_round(idle: Duration) -> Vec<Run> {
    let mut running = Vec::new();
    let mut runs = Vec::new();
    for launcher in LAUNCHERS {
        let dir = tempfile::tempdir().expect("tempdir");
        let bootstrap = proxy_bootstrap(dir.path(), free_port(), free_port());
        let admin = dir.path().join("admin.sock");
        let process = start(launcher, &bootstrap);
        while admin_get(&admin, "/ready") != Some(200) {
            assert!(process.started.elapsed() < Duration::from_secs(30), "{launcher}: Envoy not ready");
            std::thread::sleep(Duration::from_millis(2));
        }
        let start_to_live_ms = process.started.elapsed().as_secs_f64() * 1000.0;
        runs.push(Run { launcher, start_to_live_ms, rss_kib: None, wakeups_per_minute: None });
        running.push((launcher, process, dir));
    }
    std::thread::sleep(Duration::from_secs(1)); // let start-up settle
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
    }
    for (_, mut process, _) in running {
        process.signal(Signal::SIGTERM);
        process.wait(Duration::from_secs(30));
    }
    runs
}

fn main() {
    if !support::invoked_by_cargo_bench() {
        return;
    }
    let rounds = support::runs();
    let idle = if support::quick() { Duration::from_secs(5) } else { Duration::from_secs(15) };
    let all: Vec<Run> = (0..rounds).flat_map(|_| one_round(idle)).collect();
    println!("## Init overhead with Envoy running ({rounds} runs, idle window {idle:?}, init as PID 1)\n");
    println!("| init | idle RSS, KiB | wake-ups per minute while idle | start → Envoy LIVE, ms | vs Envoy alone |");
    println!("|---|---|---|---|---|");
    let spread = |launcher: &str, f: &dyn Fn(&Run) -> Option<f64>| {
        let values: Vec<f64> = all.iter().filter(|r| r.launcher == launcher).filter_map(f).collect();
        (!values.is_empty()).then(|| Spread::of(&values))
    };
    for launcher in LAUNCHERS {
        let rss = spread(launcher, &|r| r.rss_kib.map(|v| v as f64));
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
        println!("| {launcher} | {} | {} | {live} | {:.2}× |", show(rss), show(wakeups), Spread::of(&ratios).median);
    }
    let path = support::write_json("overhead", &all);
    println!("\nraw figures: {}", path.display());
}
