//! Shutdown under load: requests in flight when SIGTERM reaches the init (as PID 1 of a PID
//! namespace), with sesame's drain, with tini and dumb-init (which forward SIGTERM at once), and
//! with Envoy alone as PID 1. Figures: requests answered 200 or failed, and the time from the last
//! response to Envoy's exit. Run with `make bench`.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    Launcher, Mode, Upstream, admin_get, alive, children_of, envoy_bin, free_port, proxy_bootstrap, request, wait_for,
};
use nix::sys::signal::Signal;
use support::Spread;

const HOLD: Duration = Duration::from_secs(1);
const LAUNCHERS: [&str; 4] = ["sesame", "tini", "dumb-init", "envoy alone"];

#[derive(Debug, serde::Serialize)]
struct Run {
    launcher: &'static str,
    in_flight: usize,
    ok: usize,
    errors: usize,
    /// From SIGTERM to Envoy's exit, and from the last response (or error) to Envoy's exit.
    sigterm_to_exit_ms: f64,
    last_response_to_exit_ms: f64,
    /// sesame's admin requests per second of drain (connection polls and the rest), from its log.
    admin_requests_per_s: Option<f64>,
}

/// "drain: N connection polls of the admin in T s, R admin requests in all" → R / T.
fn admin_requests_per_s(log: &str) -> Option<f64> {
    let line = log.lines().find_map(|l| l.split_once("drain: ")?.1.strip_suffix(" admin requests in all"))?;
    let (polls, requests) = line.split_once(" s, ")?;
    let seconds = polls.split_once(" connection polls of the admin in ")?.1;
    Some(requests.parse::<f64>().ok()? / seconds.parse::<f64>().ok()?)
}

fn start(launcher: &'static str, bootstrap: &Path) -> Launcher {
    let envoy = envoy_bin().to_string_lossy().into_owned();
    let bootstrap = bootstrap.to_string_lossy().into_owned();
    // Without sesame nothing manages hot restart: Envoy runs with it disabled.
    let plain = [envoy.as_str(), "-c", &bootstrap, "--disable-hot-restart"];
    match launcher {
        "sesame" => Launcher::start_envoy(Mode::Pid1, &[], Path::new(&bootstrap)),
        "tini" => Launcher::start_program(Mode::Pid1, Path::new("/usr/bin/tini"), &[&["--"], &plain[..]].concat()),
        "dumb-init" => Launcher::start_program(Mode::Pid1, Path::new("/usr/bin/dumb-init"), &plain),
        _ => Launcher::start_program(Mode::Pid1, Path::new(&envoy), &plain[1..]),
    }
}

fn one_run(launcher: &'static str, in_flight: usize) -> Run {
    let upstream = Upstream::start(HOLD);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let bootstrap = proxy_bootstrap(dir.path(), port, upstream.port);
    let mut process = start(launcher, &bootstrap);
    let admin = dir.path().join("admin.sock");
    wait_for(Duration::from_secs(30), "Envoy to be ready", || admin_get(&admin, "/ready") == Some(200));
    let envoy = if launcher == "envoy alone" { process.pid() } else { children_of(process.pid())[0] };

    let clients: Vec<_> =
        (0..in_flight).map(|_| std::thread::spawn(move || (request(port, "/held"), Instant::now()))).collect();
    wait_for(Duration::from_secs(30), "requests to reach the upstream", || upstream.arrived() == in_flight);
    let signalled = Instant::now();
    process.signal(Signal::SIGTERM);
    // Envoy's exit is seen as its pid disappearing (reaped by its init).
    let watcher = std::thread::spawn(move || {
        while alive(envoy) {
            std::thread::sleep(Duration::from_micros(500));
        }
        Instant::now()
    });
    let results: Vec<_> = clients.into_iter().map(|c| c.join().expect("client")).collect();
    let envoy_exit = watcher.join().expect("watcher");
    process.wait(Duration::from_secs(60));
    let ok = results.iter().filter(|(r, _)| *r == Ok(200)).count();
    let last = results.iter().map(|(_, at)| *at).max().expect("results");
    let ms = |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64() * 1000.0;
    Run {
        launcher,
        in_flight,
        ok,
        errors: in_flight - ok,
        sigterm_to_exit_ms: ms(signalled, envoy_exit),
        last_response_to_exit_ms: ms(last, envoy_exit),
        admin_requests_per_s: admin_requests_per_s(&process.log()),
    }
}

fn main() {
    if !support::invoked_by_cargo_bench() {
        return;
    }
    let runs = support::runs();
    let mut all = Vec::new();
    println!("## Shutdown under load ({runs} runs each, upstream holds every response {HOLD:?}, init as PID 1)\n");
    println!(
        "| init | in flight | requests sent | 200 | errors | SIGTERM → Envoy exit, ms | last response → Envoy exit, ms | admin requests/s in the drain |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for in_flight in [20, 200] {
        for launcher in LAUNCHERS {
            let batch: Vec<Run> = (0..runs).map(|_| one_run(launcher, in_flight)).collect();
            let ok: usize = batch.iter().map(|r| r.ok).sum();
            let errors: usize = batch.iter().map(|r| r.errors).sum();
            let to_exit = Spread::of(&batch.iter().map(|r| r.sigterm_to_exit_ms).collect::<Vec<_>>());
            let reaction = Spread::of(&batch.iter().map(|r| r.last_response_to_exit_ms).collect::<Vec<_>>());
            let reaction = if errors == 0 { reaction.to_string() } else { "n/a (requests failed)".into() };
            let polls: Vec<f64> = batch.iter().filter_map(|r| r.admin_requests_per_s).collect();
            let polls = if polls.is_empty() { "—".to_string() } else { Spread::of(&polls).to_string() };
            println!(
                "| {launcher} | {in_flight} | {} | {ok} | {errors} | {to_exit} | {reaction} | {polls} |",
                in_flight * runs
            );
            all.extend(batch);
        }
    }
    let path = support::write_json("shutdown", &all);
    println!("\nraw figures: {}", path.display());
}
