//! Recovery under load: a hot restart's new epoch is SIGKILLed as it appears, which blocks Envoy's
//! hot restart. Failed requests and the time from the kill to a healthy, hot-restartable Envoy:
//! sesame's cold handover (with net.ipv4.tcp_migrate_req as sesame sets it, and left at 0), against
//! what a user has without it: restarting the launcher (stop, start). Prints a markdown table; raw
//! figures go to target/bench/recovery.json.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::time::{Duration, Instant};

use common::load::Load;
use common::tls::TlsSite;
use common::{Launcher, Mode, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const CLIENTS: usize = 16;
const TCP_MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Handover,
    HandoverWithoutMigration,
    RestartLauncher,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Handover => "sesame cold handover",
            Way::HandoverWithoutMigration => "sesame cold handover, tcp_migrate_req 0",
            Way::RestartLauncher => "restart the launcher (stop, start)",
        }
    }
}

#[derive(Debug, serde::Serialize)]
struct Run {
    way: &'static str,
    keep_alive: bool,
    requests: usize,
    failed: usize,
    healthy_ms: f64,
}

fn start(bootstrap: &std::path::Path, way: Way) -> Launcher {
    // A drain bounded at 15 s (60 s by default): under a steady load the connections never all
    // close, so the restart's drain runs to its bound.
    let mut options = vec!["--envoy-drain-time", "2s", "--envoy-parent-shutdown-time", "3s", "--drain-timeout", "15s"];
    if way == Way::HandoverWithoutMigration {
        options.push("--no-tcp-migrate-req");
    }
    let envoy = common::envoy_bin();
    let command = [envoy.to_str().expect("utf-8"), "-c", bootstrap.to_str().expect("utf-8"), "--concurrency", "1"];
    let launcher = Launcher::start(Mode::Pid1, &options, &command);
    launcher.wait_for_status("epoch 0 LIVE", |s| s["ready"] == true);
    launcher
}

/// The pid of the epoch started with `--restart-epoch 1` (not the validator), once it runs.
fn new_epoch(launcher: &Launcher) -> i32 {
    let mut found = None;
    wait_for(Duration::from_secs(30), "epoch 1", || {
        found = common::children_of(launcher.pid()).into_iter().find(|pid| {
            let argv = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let argv: Vec<&[u8]> = argv.split(|b| *b == 0).collect();
            argv.windows(2).any(|w| w[0] == b"--restart-epoch" && w[1] == b"1") && !argv.contains(&&b"validate"[..])
        });
        found.is_some()
    });
    found.expect("found")
}

fn one_run(way: Way, keep_alive: bool) -> Run {
    let TlsSite { dir: _dir, port, bootstrap, .. } = TlsSite::new(|yaml| yaml);
    let migrate = if way == Way::Handover { "1" } else { "0" };
    // Each run starts from the same setting: sesame sets it to 1 unless told not to.
    let _ = std::fs::write(TCP_MIGRATE_REQ, "0");
    let mut launcher = start(&bootstrap, way);
    let load = if keep_alive { Load::start(port, CLIENTS, 0) } else { Load::start(port, 0, CLIENTS) };
    load.wait_running();

    launcher.signal(Signal::SIGHUP);
    let _ = kill(Pid::from_raw(new_epoch(&launcher)), Signal::SIGKILL);
    let killed = Instant::now();
    match way {
        Way::Handover | Way::HandoverWithoutMigration => {
            launcher.wait_for_status("the cold handover", |s| {
                s["recovery"]["last"]["result"] == "success" && s["reload"].is_null() && s["degraded"].is_null()
            });
        }
        Way::RestartLauncher => {
            launcher.wait_for_status("degraded", |s| !s["degraded"].is_null());
            launcher.signal(Signal::SIGTERM);
            launcher.exit_code(Duration::from_secs(90));
            launcher = start(&bootstrap, way);
        }
    }
    let healthy = killed.elapsed();
    std::thread::sleep(Duration::from_secs(1)); // the load on a little longer, on the new family
    let outcome = load.stop();
    launcher.signal(Signal::SIGTERM);
    launcher.exit_code(Duration::from_secs(60));
    assert_eq!(std::fs::read_to_string(TCP_MIGRATE_REQ).map(|v| v.trim() == migrate).ok(), Some(true));
    Run {
        way: way.name(),
        keep_alive,
        requests: outcome.sent,
        failed: outcome.failures.len(),
        healthy_ms: healthy.as_secs_f64() * 1000.0,
    }
}

fn main() {
    if !support::invoked_by_cargo_bench() {
        return;
    }
    let before = std::fs::read_to_string(TCP_MIGRATE_REQ).unwrap_or_default();
    let count = support::runs();
    let mut runs = Vec::new();
    println!("## Recovery under load ({CLIENTS} HTTPS clients, {count} runs each)\n");
    println!("A hot restart's new epoch is SIGKILLed as it appears: Envoy's hot restart is blocked.\n");
    println!(
        "| way out | connections | requests | failed | kill → healthy, hot-restartable Envoy, ms (median [min, max]) |"
    );
    println!("|---|---|---|---|---|");
    for way in [Way::Handover, Way::HandoverWithoutMigration, Way::RestartLauncher] {
        for keep_alive in [true, false] {
            let batch: Vec<Run> = (0..count).map(|_| one_run(way, keep_alive)).collect();
            let requests: usize = batch.iter().map(|r| r.requests).sum();
            let failed: usize = batch.iter().map(|r| r.failed).sum();
            let healthy = support::Spread::of(&batch.iter().map(|r| r.healthy_ms).collect::<Vec<_>>());
            let connections = if keep_alive { "keep-alive" } else { "new per request" };
            println!("| {} | {connections} | {requests} | {failed} | {healthy} |", way.name());
            runs.extend(batch);
        }
    }
    let _ = std::fs::write(TCP_MIGRATE_REQ, before.trim());
    let path = support::write_json("recovery", &runs);
    println!(
        "\nraw figures: {} (sesame's time includes --recover-backoff, 1 s; the restart's, its drain, --drain-timeout 15s)",
        path.display()
    );
}
