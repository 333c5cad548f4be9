//! Envoy's worker count from the CPU limit, with the real Envoy under sesame in a real cgroup v1
//! `cpu` hierarchy with a quota (the pure parsing, v2 included, is unit-tested in `cpu_limit`).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Launcher, Mode, admin_get, children_of, control, envoy_bin, free_ports, proxy_bootstrap, wait_for};

/// A cgroup with a CPU quota and a child cgroup without one, where the launcher runs: the quota
/// that applies is the parent's. Removed when dropped (after the launcher, declared later).
struct Cgroup {
    parent: PathBuf,
    child: PathBuf,
}

/// Where cgroup v1's `cpu` controller is mounted, from /proc/self/mountinfo.
fn cpu_hierarchy() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    mountinfo
        .lines()
        .find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mut after = after.split(' ');
            let is_cpu = after.next() == Some("cgroup") && after.nth(1)?.split(',').any(|o| o == "cpu");
            if is_cpu { before.split(' ').nth(4).map(PathBuf::from) } else { None }
        })
        .expect("these tests need cgroup v1's cpu controller mounted (see `mount | grep cgroup`)")
}

impl Cgroup {
    fn with_quota(name: &str, quota_us: u64, period_us: u64) -> Cgroup {
        let parent = cpu_hierarchy().join(format!("sesame-test-{name}-{}", std::process::id()));
        let child = parent.join("launcher");
        std::fs::create_dir_all(&child).unwrap_or_else(|e| {
            panic!("cannot create the cgroup {} (root and a writable cpu hierarchy are needed): {e}", child.display())
        });
        std::fs::write(parent.join("cpu.cfs_period_us"), period_us.to_string()).expect("write cpu.cfs_period_us");
        std::fs::write(parent.join("cpu.cfs_quota_us"), quota_us.to_string()).expect("write cpu.cfs_quota_us");
        Cgroup { parent, child }
    }

    fn procs(&self) -> PathBuf {
        self.child.join("cgroup.procs")
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The processes of a killed launcher leave the cgroup as the kernel reaps them.
        let empty = || std::fs::read_to_string(self.procs()).is_ok_and(|p| p.trim().is_empty());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for dir in [&self.child, &self.parent] {
            if let Err(e) = std::fs::remove_dir(dir) {
                eprintln!("cannot remove the test cgroup {}: {e}", dir.display());
            }
        }
    }
}

/// Envoy under sesame as PID 1, in `cgroup`, once its admin says it is ready.
fn start(cgroup: &Cgroup, options: &[&str], envoy_args: &[&str]) -> (Launcher, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let [port, upstream] = free_ports::<2>();
    let bootstrap = proxy_bootstrap(dir.path(), port, upstream).to_string_lossy().into_owned();
    let envoy = envoy_bin().to_string_lossy().into_owned();
    let command: Vec<&str> = [envoy.as_str(), "-c", &bootstrap].into_iter().chain(envoy_args.iter().copied()).collect();
    let launcher = Launcher::start_in_cgroup(Mode::Pid1, &cgroup.procs(), options, &command);
    let admin = dir.path().join("admin.sock");
    wait_for(Duration::from_secs(30), "Envoy to be ready", || admin_get(&admin, "/ready") == Some(200));
    (launcher, dir)
}

/// The command lines of the Envoy processes sesame runs, as the kernel has them.
fn envoy_command_lines(launcher: &Launcher) -> Vec<Vec<String>> {
    children_of(launcher.pid())
        .into_iter()
        .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .map(|raw| {
            raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
        })
        .collect()
}

/// Every value the command line gives `--concurrency`.
fn concurrency_flags(argv: &[String]) -> Vec<String> {
    argv.windows(2).filter(|w| w[0] == "--concurrency").map(|w| w[1].clone()).collect()
}

/// The one Envoy of epoch `epoch`.
fn epoch_command_line(launcher: &Launcher, epoch: u32) -> Vec<String> {
    let epoch = epoch.to_string();
    let lines = envoy_command_lines(launcher);
    let found = lines.iter().find(|argv| argv.windows(2).any(|w| w[0] == "--restart-epoch" && w[1] == epoch));
    found.cloned().unwrap_or_else(|| panic!("no Envoy of epoch {epoch} among {lines:?}; log:\n{}", launcher.log()))
}

#[test]
fn the_quota_of_an_ancestor_cgroup_sets_the_worker_count_of_every_epoch() {
    let cgroup = Cgroup::with_quota("auto", 150000, 100000);
    let options = ["--envoy-drain-time", "1s", "--envoy-parent-shutdown-time", "2s"];
    let (launcher, dir) = start(&cgroup, &options, &[]);
    let argv = epoch_command_line(&launcher, 0);
    assert_eq!(concurrency_flags(&argv), ["2"], "1.5 CPUs round up to 2 workers: {argv:?}");
    let why = format!(
        "--concurrency 2: cgroup v1 cpu.cfs_quota_us 150000 cpu.cfs_period_us 100000 at {}",
        cgroup.parent.display()
    );
    assert!(launcher.log().contains(&why), "the log says why: {why}\n{}", launcher.log());
    let info = common::admin_body(&dir.path().join("admin.sock"), "/server_info").expect("/server_info");
    assert!(info.contains("\"concurrency\": 2"), "Envoy took it: {info}");

    let socket = launcher.runtime_dir().join("control.sock");
    let (status, body) = control(&socket, "POST", "/reload").expect("POST /reload");
    assert_eq!(status, 200, "{body}\n{}", launcher.log());
    let argv = epoch_command_line(&launcher, 1);
    assert_eq!(concurrency_flags(&argv), ["2"], "the same for the next epoch, once: {argv:?}");
}

#[test]
fn a_command_that_sets_its_worker_count_keeps_it() {
    let cgroup = Cgroup::with_quota("own", 150000, 100000);
    let (launcher, _dir) = start(&cgroup, &[], &["--concurrency", "3"]);
    let argv = epoch_command_line(&launcher, 0);
    assert_eq!(concurrency_flags(&argv), ["3"], "the command's own value, never a second one: {argv:?}");
    assert!(launcher.log().contains("the command sets Envoy's worker count"), "{}", launcher.log());
}

#[test]
fn off_passes_no_worker_count() {
    let cgroup = Cgroup::with_quota("off", 150000, 100000);
    let (launcher, _dir) = start(&cgroup, &["--envoy-concurrency", "off"], &[]);
    let argv = epoch_command_line(&launcher, 0);
    assert_eq!(concurrency_flags(&argv), Vec::<String>::new(), "{argv:?}");
    assert!(launcher.log().contains("--envoy-concurrency off"), "{}", launcher.log());
}

#[test]
fn a_number_is_passed_as_given() {
    let cgroup = Cgroup::with_quota("fixed", 150000, 100000);
    let (launcher, _dir) = start(&cgroup, &["--envoy-concurrency", "1"], &[]);
    let argv = epoch_command_line(&launcher, 0);
    assert_eq!(concurrency_flags(&argv), ["1"], "{argv:?}");
    assert!(launcher.log().contains("--concurrency 1: from --envoy-concurrency"), "{}", launcher.log());
}
