//! Shutdown under load: requests in flight when SIGTERM reaches the launcher, with sesame's drain
//! and with plain signal forwarding (what tini and dumb-init do, here `--drain-timeout 0`), and the
//! reaction time from the last response to Envoy's exit. Prints markdown tables; raw figures go to
//! target/bench/shutdown.json. Run with `make bench`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Launcher, Mode, Upstream, alive, children_of, free_port, proxy_bootstrap, request, wait_for};
use nix::sys::signal::Signal;

const RUNS: usize = 5;
const HOLD: Duration = Duration::from_secs(1);

#[derive(Debug, serde::Serialize)]
struct Run {
    in_flight: usize,
    drain: bool,
    ok: usize,
    errors: usize,
    /// From the last response to Envoy's exit (reaped), and to the launcher's exit.
    envoy_exit_ms: f64,
    launcher_exit_ms: f64,
}

fn one_run(in_flight: usize, drain: bool) -> Run {
    let upstream = Upstream::start(HOLD);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let bootstrap = proxy_bootstrap(dir.path(), port, upstream.port);
    let options: &[&str] = if drain { &[] } else { &["--drain-timeout", "0"] };
    let mut launcher = Launcher::start_envoy(Mode::Pid1, options, &bootstrap);
    let envoy = children_of(launcher.pid())[0];

    let clients: Vec<_> =
        (0..in_flight).map(|_| std::thread::spawn(move || (request(port, "/held"), Instant::now()))).collect();
    wait_for(Duration::from_secs(30), "requests to reach the upstream", || upstream.arrived() == in_flight);
    launcher.signal(Signal::SIGTERM);
    // Envoy's exit is seen as its pid disappearing (sesame reaps it at once).
    let watcher = std::thread::spawn(move || {
        while alive(envoy) {
            std::thread::sleep(Duration::from_micros(500));
        }
        Instant::now()
    });
    let results: Vec<_> = clients.into_iter().map(|c| c.join().expect("client")).collect();
    launcher.exit_code(Duration::from_secs(60));
    let launcher_exit = Instant::now();
    let envoy_exit = watcher.join().expect("watcher");
    let ok = results.iter().filter(|(r, _)| *r == Ok(200)).count();
    let last = results.iter().map(|(_, at)| *at).max().expect("results");
    let ms = |later: Instant| later.saturating_duration_since(last).as_secs_f64() * 1000.0;
    Run {
        in_flight,
        drain,
        ok,
        errors: in_flight - ok,
        envoy_exit_ms: ms(envoy_exit),
        launcher_exit_ms: ms(launcher_exit),
    }
}

fn median(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (values[values.len() / 2], values[0], values[values.len() - 1])
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("shutdown benchmark: run it with `make bench`");
        return;
    }
    let mut runs = Vec::new();
    println!("## Shutdown under load ({RUNS} runs each, upstream holds every response {HOLD:?})\n");
    println!(
        "| launcher | in flight | requests sent | 200 | errors | last response → Envoy exit, ms (median [min, max]) |"
    );
    println!("|---|---|---|---|---|---|");
    for in_flight in [20, 200] {
        for drain in [true, false] {
            let batch: Vec<Run> = (0..RUNS).map(|_| one_run(in_flight, drain)).collect();
            let ok: usize = batch.iter().map(|r| r.ok).sum();
            let errors: usize = batch.iter().map(|r| r.errors).sum();
            let reaction = if drain {
                let (med, min, max) = median(batch.iter().map(|r| r.envoy_exit_ms).collect());
                format!("{med:.0} [{min:.0}, {max:.0}]")
            } else {
                "n/a (Envoy exits before the responses)".to_string()
            };
            let name = if drain { "sesame (drain)" } else { "plain forwarding (tini)" };
            println!("| {name} | {in_flight} | {} | {ok} | {errors} | {reaction} |", in_flight * RUNS);
            runs.extend(batch);
        }
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).expect("create target/bench");
    let json = serde_json::to_string_pretty(&runs).expect("json");
    std::fs::write(out.join("shutdown.json"), json).expect("write shutdown.json");
    println!("\nraw figures: target/bench/shutdown.json");
}
