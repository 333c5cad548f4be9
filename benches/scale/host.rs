//! What the scale bench reads and sets on the host: a sysctl raised for the run and restored after
//! it, RLIMIT_NOFILE, a process's memory and CPU time from /proc, the times in sesame's log, and
//! Envoy started alone, as PID 1, with the flags sesame would give it.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::common::{Launcher, Mode, admin_get, envoy_bin};

/// The inotify instances a user may hold (Envoy takes one per file-based SDS secret).
pub const INOTIFY_INSTANCES: &str = "/proc/sys/fs/inotify/max_user_instances";

pub fn read_sysctl(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A sysctl set for the run; dropping it puts back the value it had, unless someone else has
/// changed it since.
pub struct Sysctl {
    path: &'static str,
    was: u64,
    set: u64,
}

impl Sysctl {
    /// Raises `path` to `value` when it is lower and this process may write it (root).
    pub fn raise(path: &'static str, value: u64) -> Option<Sysctl> {
        let was = read_sysctl(path)?;
        if was >= value {
            return None;
        }
        std::fs::write(path, value.to_string()).ok()?;
        (read_sysctl(path) == Some(value)).then_some(Sysctl { path, was, set: value })
    }

    pub fn was(&self) -> u64 {
        self.was
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if read_sysctl(self.path) == Some(self.set) {
            let _ = std::fs::write(self.path, self.was.to_string());
        }
    }
}

/// Raises this process's RLIMIT_NOFILE (inherited by sesame and Envoy) to at least `wanted` when
/// the hard limit allows it, or root may raise that too; returns the soft limit in force.
pub fn raise_open_files(wanted: u64) -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the limits into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 0;
    }
    let set = |soft: u64, hard: u64| {
        let wanted = libc::rlimit { rlim_cur: soft, rlim_max: hard };
        // SAFETY: setrlimit reads the struct it is given; a refusal leaves the limits as they were.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 }
    };
    if limit.rlim_max < wanted && set(wanted, wanted) {
        return wanted;
    }
    let soft = wanted.min(limit.rlim_max).max(limit.rlim_cur);
    if set(soft, limit.rlim_max) { soft } else { limit.rlim_cur }
}

/// A field of /proc/PID/status in KiB (VmRSS, RssAnon, VmHWM); 0 when it cannot be read.
pub fn status_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let value = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'));
    value.and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

/// The CPU time (user + system, utime + stime of /proc/PID/stat) of `pid` so far, in ms; clock-tick
/// resolution (10 ms).
pub fn cpu_ms(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let fields: Vec<&str> = stat.rsplit_once(')').expect("stat").1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    // SAFETY: sysconf only reads a system constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1000.0 / per_second
}

/// The inotify instances `pid` holds (its file descriptors that are inotify instances).
pub fn inotify_instances(pid: i32) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return 0 };
    fds.flatten()
        .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy().contains("inotify")))
        .count()
}

/// The time of day (UTC, seconds) of a log line `2026-11-27T22:27:21.990323Z  INFO ...`.
fn time_of(line: &str) -> Option<f64> {
    let clock = line.get(11..)?.split_once('Z')?.0;
    let parts: Vec<f64> = clock.split(':').map(|f| f.parse().ok()).collect::<Option<_>>()?;
    (parts.len() == 3).then(|| parts[0] * 3600.0 + parts[1] * 60.0 + parts[2])
}

/// The time of the first log line holding `text`, in seconds of the day.
pub fn logged_at(log: &str, text: &str) -> Option<f64> {
    log.lines().find(|l| l.contains(text)).and_then(time_of)
}

/// Milliseconds from the first line holding `from` to the first holding `to`.
pub fn logged_between_ms(log: &str, from: &str, to: &str) -> Option<f64> {
    Some((logged_at(log, to)? - logged_at(log, from)?).rem_euclid(86_400.0) * 1000.0)
}

/// How many log lines hold `text`.
pub fn count_lines(log: &str, text: &str) -> usize {
    log.lines().filter(|l| l.contains(text)).count()
}

/// Waits until the log has said what a rotation leads to and then stayed the same for `quiet`: no
/// hot restart whose old epoch still drains (as many "drained and exited" as "hot restart done"),
/// nothing written meanwhile. Reading the log costs sesame nothing, unlike asking it.
pub fn settle(log: impl Fn() -> String, quiet: Duration, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let (mut last, mut since) = (String::new(), std::time::Instant::now());
    loop {
        let now = log();
        let drained = count_lines(&now, "hot restart done") <= count_lines(&now, "drained and exited");
        if now != last {
            (last, since) = (now, std::time::Instant::now());
        } else if drained && since.elapsed() >= quiet {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: sesame's log never settled:\n{last}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls Envoy's admin socket until Envoy says it is ready; the time since the launcher started.
pub fn until_live(process: &Launcher, admin: &Path) -> f64 {
    while admin_get(admin, "/ready") != Some(200) {
        assert!(process.started.elapsed() < Duration::from_secs(120), "Envoy not ready; log:\n{}", process.log());
        std::thread::sleep(Duration::from_millis(2));
    }
    process.started.elapsed().as_secs_f64() * 1000.0
}

/// Envoy alone as PID 1 of a PID namespace on `bootstrap`, with the flags sesame gives epoch 0 (its
/// base id written beside the bootstrap).
pub fn start_envoy_alone(bootstrap: &Path) -> Launcher {
    let dir = bootstrap.parent().expect("the bootstrap's directory");
    let path = bootstrap.to_string_lossy().into_owned();
    let flags = crate::support::envoy_flags_as_sesame_gives(dir);
    let args: Vec<&str> = ["-c", path.as_str()].into_iter().chain(flags.iter().map(String::as_str)).collect();
    Launcher::start_program(Mode::Pid1, &envoy_bin(), &args)
}

/// Stops an Envoy started alone and removes the hot-restart memory it leaves.
pub fn stop_envoy_alone(mut process: Launcher, bootstrap: &Path) {
    process.signal(Signal::SIGTERM);
    process.wait(Duration::from_secs(60));
    crate::support::remove_envoy_shared_memory(bootstrap.parent().expect("the bootstrap's directory"));
}
