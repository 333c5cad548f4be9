//! The Envoy processes under a launcher, sampled from /proc every few milliseconds while a rotation
//! runs: how many there were at most (serving epochs, and checkers such as `--mode validate`), and
//! their summed resident memory at its peak.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

const EVERY: Duration = Duration::from_millis(5);

/// What the samples showed at most; memory in KiB, summed over the Envoy processes of one sample.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Peak {
    pub envoys: usize,
    pub epochs: usize,
    pub vm_rss_kib: u64,
    pub rss_anon_kib: u64,
}

impl Peak {
    fn include(&mut self, sample: Peak) {
        self.envoys = self.envoys.max(sample.envoys);
        self.epochs = self.epochs.max(sample.epochs);
        self.vm_rss_kib = self.vm_rss_kib.max(sample.vm_rss_kib);
        self.rss_anon_kib = self.rss_anon_kib.max(sample.rss_anon_kib);
    }
}

pub struct Sampler {
    /// The first sample, taken before the sampling thread started.
    pub before: Peak,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Peak>,
}

impl Sampler {
    /// Samples the Envoy processes (running `envoy`) among the children of `launcher`.
    pub fn start(launcher: i32, envoy: &Path) -> Sampler {
        let envoy = envoy.canonicalize().expect("the Envoy binary");
        let before = sample(launcher, &envoy);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = before;
            while !stopped.load(Ordering::SeqCst) {
                peak.include(sample(launcher, &envoy));
                std::thread::sleep(EVERY);
            }
            peak
        });
        Sampler { before, stop, thread }
    }

    pub fn stop(self) -> Peak {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("sampler")
    }
}

/// The children of every thread of `pid` (the kernel lists a child under the thread that forked it).
fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| list.split_whitespace().filter_map(|pid| pid.parse().ok()).collect::<Vec<i32>>())
        .collect()
}

/// One look: the processes running `envoy`, those of them that serve (started with a restart epoch,
/// not a check), and their VmRSS and RssAnon summed.
fn sample(launcher: i32, envoy: &PathBuf) -> Peak {
    let mut found = Peak::default();
    for pid in children(launcher) {
        if std::fs::read_link(format!("/proc/{pid}/exe")).ok().as_ref() != Some(envoy) {
            continue; // not Envoy, or not exec'd yet
        }
        let argv = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let argv: Vec<&[u8]> = argv.split(|b| *b == 0).collect();
        let check = argv.iter().any(|a| *a == b"validate" || *a == b"--hot-restart-version");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kib = |field: &str| -> u64 {
            let line = status.lines().find_map(|l| l.strip_prefix(field));
            line.and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
        };
        found.envoys += 1;
        found.epochs += usize::from(!check && argv.contains(&&b"--restart-epoch"[..]));
        found.vm_rss_kib += kib("VmRSS:");
        found.rss_anon_kib += kib("RssAnon:");
    }
    found
}
