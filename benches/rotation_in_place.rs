//! Certificate rotation in place (`--cert-reload in-place`: Envoy swaps the certificate through
//! file-based SDS) against a hot restart (`--cert-reload hot-restart`, the default), side by side
//! under HTTPS load. Per rotation: the time from the rename of the new certificate into place to
//! the first handshake that presents it, the failed requests of the load, the long-lived
//! connections cut (TLS keep-alive, and TLS through a `tcp_proxy` listener, kept past
//! `--envoy-parent-shutdown-time`), and the Envoy processes during the rotation with their summed
//! resident memory at its peak. Prints markdown tables; raw figures go to
//! target/bench/rotation-in-place.json.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

#[path = "rotation_in_place/envoys.rs"]
mod envoys;
#[path = "rotation_in_place/long_lived.rs"]
mod long_lived;
#[path = "rotation_in_place/site.rs"]
mod site;

use std::time::{Duration, Instant};

use common::load::Load;
use common::tls::{certificate, client_config, replace_file, tls_connect};
use common::{Launcher, Mode};
use long_lived::{Kind, LongLived};
use nix::sys::signal::Signal;
use support::Spread;

/// HTTPS clients on keep-alive connections, and on a new connection per request.
const KEEP_ALIVE: usize = 8;
const NEW_CONNECTION: usize = 8;
/// Long-lived connections of each kind.
const LONG_LIVED: usize = 2;
/// Short, so that a hot restart's old epoch exits (and cuts what it still holds) within the run.
const PARENT_SHUTDOWN: Duration = Duration::from_secs(3);
/// Between two looks for the new certificate, each on a fresh connection.
const PROBE_EVERY: Duration = Duration::from_millis(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reload {
    HotRestart,
    InPlace,
}

impl Reload {
    fn flag(self) -> &'static str {
        match self {
            Reload::HotRestart => "hot-restart",
            Reload::InPlace => "in-place",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Reload::HotRestart => "hot restart",
            Reload::InPlace => "in place",
        }
    }
}

#[derive(Debug, serde::Serialize)]
struct Run {
    mode: &'static str,
    /// Rename of the new certificate into place → first handshake that presents it.
    served_ms: f64,
    keep_alive_requests: usize,
    keep_alive_failed: usize,
    new_connection_requests: usize,
    new_connection_failed: usize,
    long_lived_https: usize,
    long_lived_https_cut: usize,
    long_lived_tcp: usize,
    long_lived_tcp_cut: usize,
    /// Why each cut connection ended, and the round trips each made.
    cuts: Vec<String>,
    long_lived_round_trips: Vec<u64>,
    /// Envoy processes during the rotation at most (serving epochs and checks), and of them epochs.
    envoys_max: usize,
    epochs_max: usize,
    vm_rss_before_kib: u64,
    vm_rss_peak_kib: u64,
    rss_anon_before_kib: u64,
    rss_anon_peak_kib: u64,
    /// What sesame counted: epochs started by hot restarts, and swaps in place.
    hot_restarts: u64,
    in_place_swaps: i64,
}

/// Polls with fresh connections until one's handshake presents `serial`; the time since `written`.
fn wait_served(port: u16, serial: u64, written: Instant) -> Duration {
    let config = client_config();
    let deadline = written + Duration::from_secs(30);
    loop {
        if tls_connect(port, &config).is_ok_and(|(_, served)| served == serial) {
            return written.elapsed();
        }
        assert!(Instant::now() < deadline, "the new certificate was not served within 30 s");
        std::thread::sleep(PROBE_EVERY);
    }
}

/// Until the rotation is over: the old epoch gone (hot restart) or the swap confirmed (in place).
fn wait_rotated(launcher: &Launcher, mode: Reload) {
    match mode {
        Reload::HotRestart => launcher.wait_for_status("the old epoch to exit", |s| {
            s["current_epoch"] == 1 && s["epochs"].as_array().map(Vec::len) == Some(1) && s["reload"].is_null()
        }),
        Reload::InPlace => launcher.wait_for_status("the swap to be confirmed", |s| {
            s["certificates"]
                .as_array()
                .is_some_and(|certs| certs.iter().all(|c| c["rotated"] == "in-place" && c["envoy"] == "confirmed"))
        }),
    };
}

fn one_run(mode: Reload) -> Run {
    let site = site::Site::new();
    let shutdown = format!("{}s", PARENT_SHUTDOWN.as_secs());
    let options = ["--cert-reload", mode.flag(), "--envoy-drain-time", "2s", "--envoy-parent-shutdown-time", &shutdown];
    let mut launcher = Launcher::start_envoy(Mode::Pid1, &options, &site.bootstrap);
    launcher.wait_for_status("epoch 0 LIVE", |s| s["ready"] == true);

    let (keep_alive, fresh) = (Load::start(site.https, KEEP_ALIVE, 0), Load::start(site.https, 0, NEW_CONNECTION));
    let long_lived = LongLived::start(site.https, site.tcp, LONG_LIVED);
    keep_alive.wait_running();
    fresh.wait_running();
    long_lived.wait_running();
    let sampler = envoys::Sampler::start(launcher.pid(), &common::envoy_bin());

    let (new_cert, new_key) = certificate(2);
    replace_file(&site.key, &new_key);
    replace_file(&site.cert, &new_cert);
    let written = Instant::now();
    let served = wait_served(site.https, 2, written);
    wait_rotated(&launcher, mode);
    // What is measured, not a wait for something: the long-lived connections are kept for longer
    // than the parent shutdown time (a hot restart's old epoch has exited by then, awaited above,
    // and cut what it held), then each makes one more round trip.
    let kept = (written + PARENT_SHUTDOWN + Duration::from_secs(1)).saturating_duration_since(Instant::now());
    std::thread::sleep(kept);
    long_lived.wait_one_more_round_trip();
    let before = sampler.before;
    let peak = sampler.stop();

    let (keep_alive, fresh, lives) = (keep_alive.stop(), fresh.stop(), long_lived.stop());
    let hot_restarts = launcher.reloads("success");
    let in_place_swaps = launcher.metric("sesame_rotations_total{mode=\"in_place\",result=\"success\"}");
    launcher.signal(Signal::SIGTERM);
    launcher.exit_code(Duration::from_secs(30));
    let count = |kind: Kind, cut: bool| lives.iter().filter(|l| l.kind == kind && (!cut || l.cut.is_some())).count();
    Run {
        mode: mode.name(),
        served_ms: served.as_secs_f64() * 1000.0,
        keep_alive_requests: keep_alive.sent,
        keep_alive_failed: keep_alive.failures.len(),
        new_connection_requests: fresh.sent,
        new_connection_failed: fresh.failures.len(),
        long_lived_https: count(Kind::Https, false),
        long_lived_https_cut: count(Kind::Https, true),
        long_lived_tcp: count(Kind::TcpProxy, false),
        long_lived_tcp_cut: count(Kind::TcpProxy, true),
        cuts: lives.iter().filter_map(|l| Some(format!("{:?}: {}", l.kind, l.cut.as_ref()?))).collect(),
        long_lived_round_trips: lives.iter().map(|l| l.round_trips).collect(),
        envoys_max: peak.envoys,
        epochs_max: peak.epochs,
        vm_rss_before_kib: before.vm_rss_kib,
        vm_rss_peak_kib: peak.vm_rss_kib,
        rss_anon_before_kib: before.rss_anon_kib,
        rss_anon_peak_kib: peak.rss_anon_kib,
        hot_restarts,
        in_place_swaps,
    }
}

fn spread(batch: &[&Run], value: impl Fn(&Run) -> f64) -> Spread {
    Spread::of(&batch.iter().map(|r| value(r)).collect::<Vec<_>>())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One row of the table: the runs of one mode, summed (requests, cuts), at most (processes), or as
/// a median with its spread (times, memory).
fn row(mode: Reload, batch: &[&Run]) -> String {
    let sum = |value: fn(&Run) -> usize| batch.iter().map(|r| value(r)).sum::<usize>();
    let served = spread(batch, |r| r.served_ms);
    let requests = format!("{} / {}", sum(|r| r.keep_alive_requests), sum(|r| r.new_connection_requests));
    let failed = format!("{} / {}", sum(|r| r.keep_alive_failed), sum(|r| r.new_connection_failed));
    let https = format!("{} of {}", sum(|r| r.long_lived_https_cut), sum(|r| r.long_lived_https));
    let tcp = format!("{} of {}", sum(|r| r.long_lived_tcp_cut), sum(|r| r.long_lived_tcp));
    let envoys = batch.iter().map(|r| r.envoys_max).max().unwrap_or(0);
    let epochs = batch.iter().map(|r| r.epochs_max).max().unwrap_or(0);
    let before = spread(batch, |r| mib(r.vm_rss_before_kib)).median;
    let peak = spread(batch, |r| mib(r.vm_rss_peak_kib));
    let anon_before = spread(batch, |r| mib(r.rss_anon_before_kib)).median;
    let anon = spread(batch, |r| mib(r.rss_anon_peak_kib));
    format!(
        "| {} | {served} | {requests} | {failed} | {https} | {tcp} | {envoys} ({epochs}) | {before:.0} → {peak} | \
         {anon_before:.0} → {anon} |",
        mode.name()
    )
}

/// The targets of the rotation in place, next to what this run measured (not asserted).
fn targets(batch: &[&Run]) {
    let served = spread(batch, |r| r.served_ms).median;
    let failed: usize = batch.iter().map(|r| r.keep_alive_failed + r.new_connection_failed).sum();
    let cut: usize = batch.iter().map(|r| r.long_lived_https_cut + r.long_lived_tcp_cut).sum();
    let envoys = batch.iter().map(|r| r.envoys_max).max().unwrap_or(0);
    let met = |ok: bool| if ok { "met" } else { "missed" };
    println!("| in place | target | this run | |");
    println!("|---|---|---|---|");
    println!("| write → new certificate served (median) | ≤ 100 ms | {served:.0} ms | {} |", met(served <= 100.0));
    println!("| failed requests | 0 | {failed} | {} |", met(failed == 0));
    println!("| long-lived connections cut | 0 | {cut} | {} |", met(cut == 0));
    println!("| Envoy processes during the rotation | 1 | {envoys} | {} |", met(envoys == 1));
}

fn main() {
    if !support::invoked_by_cargo_bench() {
        return;
    }
    let count = support::runs();
    const MODES: [Reload; 2] = [Reload::HotRestart, Reload::InPlace];
    // The modes take turns, so that what else the machine does weighs on both alike.
    let runs: Vec<Run> = (0..count).flat_map(|_| MODES.map(one_run)).collect();
    let of = |mode: Reload| -> Vec<&Run> { runs.iter().filter(|r| r.mode == mode.name()).collect() };
    println!(
        "## Certificate rotation in place against hot restart ({KEEP_ALIVE} keep-alive and {NEW_CONNECTION} \
         new-connection HTTPS clients, {LONG_LIVED} long-lived connections of each kind, {count} runs each)\n"
    );
    println!(
        "| rotation | write → new certificate served, ms | requests (keep-alive / new conn.) | failed (keep-alive / \
         new conn.) | long-lived TLS keep-alive cut | long-lived TCP via tcp_proxy cut | Envoy processes, max \
         (epochs) | Envoy VmRSS summed, MiB: before → peak | Envoy RssAnon summed, MiB: before → peak |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for mode in MODES {
        println!("{}", row(mode, &of(mode)));
    }
    println!();
    targets(&of(Reload::InPlace));
    // Each run did what its mode says, as sesame counted it: one new epoch, or one swap and none.
    for run in &runs {
        let (epochs, swaps) = if run.mode == Reload::InPlace.name() { (0, 1) } else { (1, 0) };
        if (run.hot_restarts, run.in_place_swaps) != (epochs, swaps) {
            let (mode, restarts, swapped) = (run.mode, run.hot_restarts, run.in_place_swaps);
            println!("\nnote: a run {mode} counted {restarts} hot restarts and {swapped} swaps in place");
        }
    }
    let path = support::write_json("rotation-in-place", &runs);
    println!(
        "\nraw figures: {} (--envoy-parent-shutdown-time {}s; the hot restart's time includes the 500 ms debounce)",
        path.display(),
        PARENT_SHUTDOWN.as_secs()
    );
}
