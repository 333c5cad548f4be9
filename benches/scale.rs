//! Scale: what sesame costs, and how long it takes, as the configuration and the connections grow.
//!
//! - N = 1, 100, 1,000 SNI certificate pairs in one bootstrap (one listener, a filter chain per
//!   name), in both `--cert-reload` modes, beside Envoy alone: start to LIVE, sesame's own memory,
//!   one pair renewed and all N renewed in a burst. In place needs 2N inotify instances within half
//!   of `fs.inotify.max_user_instances`: sizes beyond the limit in force are run once as they are
//!   (sesame falls back to hot restarts and says so), then, as root, the limit is raised for the
//!   rest of the run and put back after it.
//! - A bootstrap with 10,000 routes and one with 500 listeners: start to LIVE, `envoy --mode
//!   validate` alone, and a hot restart by `POST /reload` split into its checks and the new epoch.
//! - C = 100, 1,000, 10,000 idle keep-alive connections at SIGTERM, closed together and one by one.
//!
//! Prints markdown tables; raw figures go to target/bench/scale-{sni,reload,idle}.json, and
//! `cargo bench --bench charts` draws images/bench-scale-*.svg from them. Each figure is the median
//! of 3 runs (1 with SESAME_BENCH_QUICK). SESAME_BENCH_SCALE_ONLY=sni|reload|idle runs one part;
//! SESAME_BENCH_SCALE_SMALL=1 runs small sizes, for trying the bench out.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

#[path = "scale/certs.rs"]
mod certs;
#[path = "scale/ends.rs"]
mod ends;
#[path = "scale/host.rs"]
mod host;
#[path = "scale/idle.rs"]
mod idle;
#[path = "scale/reload.rs"]
mod reload;
#[path = "scale/sni.rs"]
mod sni;
#[path = "scale/tables.rs"]
mod tables;

use host::{INOTIFY_INSTANCES, Sysctl, read_sysctl};

/// The sizes of each part.
struct Sizes {
    names: Vec<usize>,
    shapes: Vec<reload::Shape>,
    connections: Vec<usize>,
}

fn sizes() -> Sizes {
    if std::env::var_os("SESAME_BENCH_SCALE_SMALL").is_some_and(|v| !v.is_empty()) {
        return Sizes {
            names: vec![1, 10, 40],
            shapes: vec![reload::Shape::Routes(1000), reload::Shape::Listeners(50)],
            connections: vec![10, 100],
        };
    }
    Sizes {
        names: vec![1, 100, 1000],
        shapes: vec![reload::Shape::Routes(10_000), reload::Shape::Listeners(500)],
        connections: vec![100, 1000, 10_000],
    }
}

fn part(name: &str) -> bool {
    std::env::var("SESAME_BENCH_SCALE_ONLY").map_or(true, |only| only.is_empty() || only.split(',').any(|p| p == name))
}

fn rounds() -> usize {
    if support::quick() { 1 } else { 3 }
}

/// The SNI part: sizes that in place cannot take at the limit in force, once as they are; then the
/// limit raised (as root) for the rounds, each N under Envoy alone and both modes in turn.
fn sni_part(names: &[usize]) -> Vec<sni::Run> {
    use sni::Way;
    sni::prepare();
    let limit = read_sysctl(INOTIFY_INSTANCES).unwrap_or(128);
    let mut runs = Vec::new();
    for &n in names.iter().filter(|&&n| 2 * n as u64 > limit / 2) {
        runs.push(sni::sesame(n, Way::InPlace, 0, limit));
    }
    let wanted = 4 * names.iter().copied().max().unwrap_or(1) as u64 + 1024;
    let raised = Sysctl::raise(INOTIFY_INSTANCES, wanted);
    let limit = read_sysctl(INOTIFY_INSTANCES).unwrap_or(limit);
    match &raised {
        Some(sysctl) => println!("fs.inotify.max_user_instances raised from {} to {limit} for the run\n", sysctl.was()),
        None if limit < wanted => {
            println!("fs.inotify.max_user_instances is {limit} and could not be raised (not root?)\n")
        }
        None => {}
    }
    for round in 0..rounds() {
        for &n in names {
            runs.push(sni::envoy_alone(n, round, limit));
            runs.push(sni::sesame(n, Way::HotRestart, round, limit));
            runs.push(sni::sesame(n, Way::InPlace, round, limit));
        }
    }
    drop(raised);
    if let Some(now) = read_sysctl(INOTIFY_INSTANCES) {
        println!("fs.inotify.max_user_instances is {now} again\n");
    }
    runs
}

fn main() {
    if !support::invoked_by_cargo_bench() {
        return;
    }
    let sizes = sizes();
    let wanted = 2 * sizes.connections.iter().copied().max().unwrap_or(0) as u64 + 4096;
    let open_files = host::raise_open_files(wanted);
    println!("# Scale ({} runs each; RLIMIT_NOFILE {open_files})\n", rounds());
    let started = std::time::Instant::now();
    if part("sni") {
        let runs = sni_part(&sizes.names);
        tables::sni(&runs);
        println!("raw figures: {}\n", support::write_json("scale-sni", &runs).display());
    }
    if part("reload") {
        let runs: Vec<reload::Run> =
            (0..rounds()).flat_map(|_| sizes.shapes.iter().map(|s| reload::one_run(*s)).collect::<Vec<_>>()).collect();
        tables::reload(&runs);
        println!("raw figures: {}\n", support::write_json("scale-reload", &runs).display());
    }
    if part("idle") {
        use idle::Way;
        let ways = [Way::EnvoyAlone, Way::EnvoyAloneClosed, Way::Together, Way::OneByOne];
        let runs: Vec<idle::Run> = (0..rounds())
            .flat_map(|_| sizes.connections.iter().flat_map(|c| ways.map(|w| idle::one_run(*c, w))).collect::<Vec<_>>())
            .collect();
        tables::idle(&runs);
        println!("raw figures: {}\n", support::write_json("scale-idle", &runs).display());
    }
    println!("scale bench: {:.0} s", started.elapsed().as_secs_f64());
}
