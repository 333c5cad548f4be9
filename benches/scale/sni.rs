//! N SNI certificate pairs in one bootstrap, under sesame in both `--cert-reload` modes and under
//! Envoy alone: start to LIVE, sesame's own memory, one pair renewed (write to the new serial served
//! for its name, sesame's CPU time for it) and all N renewed in a burst (how many hot restarts or
//! swaps in place, the time until every name serves its new certificate).

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::certs::{self, SniSite, name, pem, serial, served_serial};
use crate::common::{self, Launcher, Mode, children_of};
use crate::host::{cpu_ms, inotify_instances, settle, start_envoy_alone, status_kib, stop_envoy_alone, until_live};

/// Short drains, so that a hot restart's old epoch is gone within the run (45 s by default).
const SESAME_OPTIONS: [&str; 4] = ["--envoy-drain-time", "2s", "--envoy-parent-shutdown-time", "3s"];
/// Between two looks for a new certificate, each on a fresh connection.
const PROBE_EVERY: Duration = Duration::from_millis(2);
/// Threads looking for the new certificates of a burst (at a lower priority than Envoy and sesame).
const PROBERS: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    EnvoyAlone,
    HotRestart,
    InPlace,
}

impl Way {
    pub fn name(self) -> &'static str {
        match self {
            Way::EnvoyAlone => "envoy alone",
            Way::HotRestart => "hot restart",
            Way::InPlace => "in place",
        }
    }
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Run {
    pub n: usize,
    /// The way, and for in place at a limit too low for it, that limit.
    pub way: String,
    pub round: usize,
    /// fs.inotify.max_user_instances during the run.
    pub inotify_limit: u64,
    pub start_to_live_ms: f64,
    /// In place only: sesame said at start that the certificates are rotated by hot restarts.
    pub fell_back: Option<bool>,
    pub envoy_inotify_instances: Option<usize>,
    /// sesame's own memory (not Envoy's), 2 s after LIVE, and its peak over the whole run.
    pub sesame_vm_rss_kib: Option<u64>,
    pub sesame_rss_anon_kib: Option<u64>,
    pub sesame_vm_hwm_kib: Option<u64>,
    /// One pair renewed: its certificate's rename → the new serial served for its name.
    pub one_served_ms: Option<f64>,
    pub one_cpu_ms: Option<f64>,
    pub one: Option<Counts>,
    /// All N renewed one after the other: the writes, the first write → every name served anew,
    /// the last write → the same, and sesame's CPU time for it all.
    pub burst_write_ms: Option<f64>,
    pub burst_served_ms: Option<f64>,
    pub burst_after_last_write_ms: Option<f64>,
    pub burst_cpu_ms: Option<f64>,
    pub burst: Option<Counts>,
}

/// What sesame counted for a renewal: hot restarts, swaps in place, and anything that went wrong.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Counts {
    pub hot_restarts: i64,
    pub swaps: i64,
    pub other: i64,
}

impl Counts {
    fn of(launcher: &Launcher) -> Counts {
        let metrics = launcher.metrics();
        let value = |series: &str| {
            let prefix = format!("{series} ");
            metrics.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse::<f64>().ok()).unwrap_or(0.0) as i64
        };
        let rotations =
            |result: &str| value(&format!("sesame_rotations_total{{mode=\"in_place\",result=\"{result}\"}}"));
        let reloads = |result: &str| value(&format!("sesame_reloads_total{{result=\"{result}\"}}"));
        let wrong =
            ["refused", "rejected", "unconfirmed", "unconfirmable", "failed"].map(rotations).iter().sum::<i64>();
        Counts {
            hot_restarts: reloads("success"),
            swaps: rotations("success"),
            other: wrong + reloads("refused") + reloads("failed"),
        }
    }

    fn since(self, before: Counts) -> Counts {
        Counts {
            hot_restarts: self.hot_restarts - before.hot_restarts,
            swaps: self.swaps - before.swaps,
            other: self.other - before.other,
        }
    }
}

/// Envoy alone as PID 1, with the flags sesame would give it: start to LIVE.
pub fn envoy_alone(n: usize, round: usize, inotify_limit: u64) -> Run {
    let site = SniSite::new(n);
    let process = start_envoy_alone(&site.bootstrap);
    let start_to_live_ms = until_live(&process, &site.dir.path().join("admin.sock"));
    assert_eq!(served_serial(site.port, &name(n / 2)), Ok(serial(1, n / 2)), "Envoy alone serves the names");
    stop_envoy_alone(process, &site.bootstrap);
    Run { n, way: Way::EnvoyAlone.name().into(), round, inotify_limit, start_to_live_ms, ..Run::default() }
}

/// sesame with `--cert-reload` as `way` says, as PID 1: start, memory, one renewal, the burst.
pub fn sesame(n: usize, way: Way, round: usize, inotify_limit: u64) -> Run {
    let site = SniSite::new(n);
    let envoy = common::envoy_bin();
    let mode = if way == Way::InPlace { "in-place" } else { "hot-restart" };
    let options: Vec<&str> = ["--cert-reload", mode].into_iter().chain(SESAME_OPTIONS).collect();
    let command = [envoy.to_str().expect("utf-8"), "-c", site.bootstrap.to_str().expect("utf-8")];
    let mut launcher = Launcher::start(Mode::Pid1, &options, &command);
    let start_to_live_ms = until_live(&launcher, &site.dir.path().join("admin.sock"));
    let k = n / 2;
    assert_eq!(served_serial(site.port, &name(k)), Ok(serial(1, k)), "sesame's Envoy serves the names");
    // sesame gives its idle pages back a second after an epoch is LIVE: its memory once settled.
    std::thread::sleep(Duration::from_secs(2));
    let pid = launcher.pid();
    let (vm_rss, rss_anon) = (status_kib(pid, "VmRSS"), status_kib(pid, "RssAnon"));
    let fell_back = launcher.log().contains("certificates are rotated by hot restarts");
    let envoy_pid = children_of(pid).into_iter().next().expect("Envoy runs under sesame");
    let envoy_inotify = inotify_instances(envoy_pid);
    let label = if way == Way::InPlace && fell_back {
        format!("in place, {inotify_limit} inotify instances")
    } else {
        way.name().to_string()
    };

    // One pair renewed. sesame is not asked anything until it is done: its log says when.
    let renewal = pem(2, k);
    let (cpu, before) = (cpu_ms(pid), Counts::default());
    site.renew(k, &renewal);
    let written = Instant::now();
    let one_served = wait_served(site.port, &name(k), serial(2, k), written);
    settle(|| launcher.log(), Duration::from_millis(1500), "one renewal");
    let one_cpu = cpu_ms(pid) - cpu;
    let after_one = Counts::of(&launcher);

    // All N renewed, one after the other, as fast as the files can be written.
    let pairs: Vec<(String, String)> = (0..n).map(|i| pem(3, i)).collect();
    let cpu = cpu_ms(pid);
    let first = Instant::now();
    for (i, pair) in pairs.iter().enumerate() {
        site.renew(i, pair);
    }
    let last = Instant::now();
    let all_served = wait_all_served(site.port, n, first);
    settle(|| launcher.log(), Duration::from_millis(1500), "the burst");
    let burst_cpu = cpu_ms(pid) - cpu;
    let after_burst = Counts::of(&launcher);
    let vm_hwm = status_kib(pid, "VmHWM");
    launcher.signal(Signal::SIGTERM);
    launcher.exit_code(Duration::from_secs(60));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Run {
        n,
        way: label,
        round,
        inotify_limit,
        start_to_live_ms,
        fell_back: (way == Way::InPlace).then_some(fell_back),
        envoy_inotify_instances: Some(envoy_inotify),
        sesame_vm_rss_kib: Some(vm_rss),
        sesame_rss_anon_kib: Some(rss_anon),
        sesame_vm_hwm_kib: Some(vm_hwm),
        one_served_ms: Some(ms(one_served)),
        one_cpu_ms: Some(one_cpu),
        one: Some(after_one.since(before)),
        burst_write_ms: Some(ms(last - first)),
        burst_served_ms: Some(ms(all_served - first)),
        burst_after_last_write_ms: Some(ms(all_served.saturating_duration_since(last))),
        burst_cpu_ms: Some(burst_cpu),
        burst: Some(after_burst.since(after_one)),
    }
}

/// Polls with fresh connections until one asking for `name` is shown `serial`; the time since
/// `written`.
fn wait_served(port: u16, name: &str, serial: u64, written: Instant) -> Duration {
    loop {
        if served_serial(port, name) == Ok(serial) {
            return written.elapsed();
        }
        assert!(written.elapsed() < Duration::from_secs(60), "{name}: serial {serial} not served within 60 s");
        std::thread::sleep(PROBE_EVERY);
    }
}

/// Looks at every name, again and again, until each has shown its third-generation certificate;
/// when the last one did (a sweep takes one handshake per name still waiting).
fn wait_all_served(port: u16, n: usize, since: Instant) -> Instant {
    let probers: Vec<_> = (0..PROBERS)
        .map(|p| {
            std::thread::spawn(move || {
                common::yield_to_the_system_under_test();
                let mut waiting: Vec<usize> = (p..n).step_by(PROBERS).collect();
                let mut last = since;
                while !waiting.is_empty() {
                    waiting.retain(|&i| {
                        let renewed = served_serial(port, &name(i)) == Ok(serial(3, i));
                        if renewed {
                            last = Instant::now();
                        }
                        !renewed
                    });
                    let left = waiting.len();
                    assert!(since.elapsed() < Duration::from_secs(120), "{left} names not renewed within 120 s");
                    std::thread::sleep(PROBE_EVERY);
                }
                last
            })
        })
        .collect();
    probers.into_iter().map(|p| p.join().expect("prober")).max().expect("probers")
}

/// The pairs are made (or found in the cache) before anything is timed.
pub fn prepare() {
    match certs::ensure() {
        Some(took) => println!(
            "made {} certificate pairs in {took:.1?} (cached under target/bench/scale-certs/)\n",
            3 * certs::MAX
        ),
        None => println!("certificate pairs from the cache under target/bench/scale-certs/\n"),
    }
}
