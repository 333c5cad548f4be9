//! Reaping: the time an init (PID 1 of a PID namespace) takes to reap 10,000 orphans that exit
//! together; sesame against tini, dumb-init and catatonit. The orphans come from this same binary run as the
//! init's child (`--orphan-helper`), which forks them through a middle process that exits (so the
//! kernel hands them to the init), releases them at once by closing a pipe, and times until
//! every one of them is gone from /proc. Run with `make bench`.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Launcher, Mode, SESAME};
use nix::unistd::{ForkResult, fork};
use support::Spread;

const INITS: [&str; 4] = ["sesame", "tini", "dumb-init", "catatonit"];

#[derive(Debug, serde::Serialize)]
struct Run {
    init: &'static str,
    orphans: usize,
    /// Wall time from the release to the last orphan reaped: mostly the kernel's exit work.
    reap_ms: f64,
    /// CPU time the init itself spent meanwhile: its own cost of reaping.
    init_cpu_ms: f64,
}

/// Runs inside the init: makes `count` orphans wait on a pipe, releases them, times their reaping.
fn orphan_helper(count: usize) {
    let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
    // The orphans' pids go through a file: a pipe would stay open in every orphan.
    let pids_file = std::env::temp_dir().join(format!("sesame-orphans-{}", std::process::id()));
    // SAFETY: this process is single-threaded here; the children only read, write and _exit.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let mut pids = Vec::with_capacity(count);
            for _ in 0..count {
                // SAFETY: as above; the grandchild blocks on the pipe and exits without unwinding.
                match unsafe { fork() }.expect("fork") {
                    ForkResult::Child => {
                        drop(write_end);
                        let mut byte = [0u8; 1];
                        let _ = nix::unistd::read(&read_end, &mut byte);
                        // SAFETY: _exit ends this forked child at once, as it must after fork.
                        unsafe { libc::_exit(0) };
                    }
                    ForkResult::Parent { child } => pids.push(child.as_raw().to_string()),
                }
            }
            let _ = std::fs::write(&pids_file, pids.join(" "));
            // SAFETY: the middle process ends without running the parent's destructors.
            unsafe { libc::_exit(0) };
        }
        ForkResult::Parent { child } => {
            let _ = nix::sys::wait::waitpid(child, None);
            let text = std::fs::read_to_string(&pids_file).expect("pids");
            let _ = std::fs::remove_file(&pids_file);
            let mut alive: Vec<String> = text.split_whitespace().map(|p| format!("/proc/{p}")).collect();
            assert_eq!(alive.len(), count, "every orphan forked");
            let cpu_before = init_cpu_ms();
            let released = Instant::now();
            drop(write_end); // every orphan reads EOF and exits
            drop(read_end);
            while !alive.is_empty() {
                alive.retain(|path| Path::new(path).exists());
                assert!(released.elapsed() < Duration::from_secs(60), "{} orphans never reaped", alive.len());
                // Leave the cores to the init and the exiting orphans: a busy poll would be timed too.
                std::thread::sleep(Duration::from_millis(2));
            }
            println!("reaped_ms={:.3}", released.elapsed().as_secs_f64() * 1000.0);
            println!("init_cpu_ms={:.1}", init_cpu_ms() - cpu_before);
        }
    }
}

/// CPU time (user + system) PID 1 of this namespace has used, in ms (clock-tick resolution).
fn init_cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/1/stat").expect("/proc/1/stat");
    let fields: Vec<&str> = stat.rsplit_once(')').expect("stat").1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    // SAFETY: sysconf only reads a system constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1000.0 / per_second
}

fn one_run(init: &'static str, orphans: usize) -> Run {
    let helper = std::env::current_exe().expect("bench binary").to_string_lossy().into_owned();
    let count = orphans.to_string();
    let helper_argv = [helper.as_str(), "--orphan-helper", &count];
    let mut process = match init {
        "sesame" => {
            Launcher::start_program(Mode::Pid1, Path::new(SESAME), &[&["run", "--"], &helper_argv[..]].concat())
        }
        "tini" => {
            Launcher::start_program(Mode::Pid1, Path::new("/usr/bin/tini"), &[&["--"], &helper_argv[..]].concat())
        }
        "catatonit" => {
            Launcher::start_program(Mode::Pid1, Path::new("/usr/bin/catatonit"), &[&["--"], &helper_argv[..]].concat())
        }
        _ => Launcher::start_program(Mode::Pid1, Path::new("/usr/bin/dumb-init"), &helper_argv),
    };
    let status = process.wait(Duration::from_secs(120));
    let log = process.log();
    let figure = |name: &str| -> f64 {
        log.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{init}: no {name} ({status:?}):\n{log}"))
    };
    Run { init, orphans, reap_ms: figure("reaped_ms="), init_cpu_ms: figure("init_cpu_ms=") }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--orphan-helper") {
        orphan_helper(args[at + 1].parse().expect("count"));
        return;
    }
    if !support::invoked_by_cargo_bench() {
        return;
    }
    let orphans = if support::quick() { 2_000 } else { 10_000 };
    let runs = support::runs();
    let mut all = Vec::new();
    println!("## Reaping {orphans} orphans that exit together ({runs} runs, init as PID 1)\n");
    println!("| init | time to reap them all, ms (median [min, max]) | vs tini | CPU time of the init meanwhile, ms |");
    println!("|---|---|---|---|");
    // Interleaved, so that a slower moment of the machine hits every init alike.
    for _ in 0..runs {
        for init in INITS {
            all.push(one_run(init, orphans));
        }
    }
    for init in INITS {
        let times: Vec<f64> = all.iter().filter(|r| r.init == init).map(|r| r.reap_ms).collect();
        let ratios: Vec<f64> = all
            .chunks(INITS.len())
            .map(|round| round.iter().find(|r| r.init == init).expect("init").reap_ms / round[1].reap_ms)
            .collect();
        let spread = Spread::of(&times);
        let cpu: Vec<f64> = all.iter().filter(|r| r.init == init).map(|r| r.init_cpu_ms).collect();
        println!("| {init} | {spread} | {:.2}× | {} |", Spread::of(&ratios).median, Spread::of(&cpu));
    }
    let path = support::write_json("reaping", &all);
    println!("\nraw figures: {}", path.display());
}
