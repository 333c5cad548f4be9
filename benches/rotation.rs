//! Certificate rotation under load: failed requests and the time from the last file write to the
//! new certificate being served, with sesame's validated hot restart and with a plain restart
//! (stop, start). Prints markdown tables; raw figures go to target/bench/rotation.json.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::tls::{HttpsClient, TlsSite, certificate, replace_file};
use common::{Launcher, Mode, wait_for};
use nix::sys::signal::Signal;

const CLIENTS: usize = 32;

#[derive(Debug, serde::Serialize)]
struct Run {
    hot_restart: bool,
    keep_alive: bool,
    requests: usize,
    failed: usize,
    visible_ms: f64,
}

fn launcher_options(hot_restart: bool) -> Vec<&'static str> {
    let mut options = vec!["--envoy-drain-time", "2s", "--envoy-parent-shutdown-time", "3s"];
    if !hot_restart {
        options.extend(["--no-auto-watch", "--drain-timeout", "0"]);
    }
    options
}

fn one_run(hot_restart: bool, keep_alive: bool) -> Run {
    let TlsSite { dir: _dir, port, cert, key, bootstrap } = TlsSite::new(|yaml| yaml);
    let options = launcher_options(hot_restart);
    let mut launcher = Launcher::start_envoy(Mode::Pid1, &options, &bootstrap);

    let stop = Arc::new(AtomicBool::new(false));
    let (requests, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, requests, failed) = (stop.clone(), requests.clone(), failed.clone());
            std::thread::spawn(move || {
                common::yield_to_the_system_under_test();
                let mut client = HttpsClient::new(port, keep_alive);
                while !stop.load(Ordering::SeqCst) {
                    requests.fetch_add(1, Ordering::SeqCst);
                    if !matches!(client.get(), Ok((200, _))) {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    let (new_cert, new_key) = certificate(2);
    replace_file(&key, &new_key);
    replace_file(&cert, &new_cert);
    let written = Instant::now();
    if !hot_restart {
        // The plain way: stop Envoy, start it again on the new files.
        launcher.signal(Signal::SIGTERM);
        launcher.exit_code(Duration::from_secs(30));
        let (envoy, bootstrap) = (common::envoy_bin(), bootstrap.to_string_lossy().into_owned());
        launcher = Launcher::start(Mode::Pid1, &options, &[&envoy.to_string_lossy(), "-c", &bootstrap]);
    }
    wait_for(Duration::from_secs(30), "the new certificate", || {
        HttpsClient::new(port, false).get().is_ok_and(|(_, serial)| serial == 2)
    });
    let visible = written.elapsed();
    std::thread::sleep(Duration::from_secs(4)); // load on while the old epoch drains and exits
    stop.store(true, Ordering::SeqCst);
    clients.into_iter().for_each(|c| c.join().expect("client"));
    launcher.signal(Signal::SIGTERM);
    launcher.exit_code(Duration::from_secs(30));
    Run {
        hot_restart,
        keep_alive,
        requests: requests.load(Ordering::SeqCst),
        failed: failed.load(Ordering::SeqCst),
        visible_ms: visible.as_secs_f64() * 1000.0,
    }
}

fn main() {
    if !support::invoked_by_cargo_bench() {
        return;
    }
    let count = support::runs();
    let mut runs = Vec::new();
    println!("## Certificate rotation under load ({CLIENTS} HTTPS clients, {count} runs each)\n");
    println!(
        "| rotation | connections | requests | failed | last write → new certificate served, ms (median [min, max]) |"
    );
    println!("|---|---|---|---|---|");
    for hot_restart in [true, false] {
        for keep_alive in [true, false] {
            let batch: Vec<Run> = (0..count).map(|_| one_run(hot_restart, keep_alive)).collect();
            let requests: usize = batch.iter().map(|r| r.requests).sum();
            let failed: usize = batch.iter().map(|r| r.failed).sum();
            let visible = support::Spread::of(&batch.iter().map(|r| r.visible_ms).collect::<Vec<_>>());
            let name = if hot_restart { "sesame hot restart" } else { "plain restart (stop, start)" };
            let connections = if keep_alive { "keep-alive" } else { "new per request" };
            println!("| {name} | {connections} | {requests} | {failed} | {visible} |");
            runs.extend(batch);
        }
    }
    let path = support::write_json("rotation", &runs);
    println!("\nraw figures: {} (the debounce, 500 ms by default, is part of the time)", path.display());
}
