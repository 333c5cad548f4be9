//! A child run to its end before the supervisor (and its reaper) exists: the start's check of a
//! key only Envoy can judge. Bounded: a hung child is killed with its process group.

use std::ffi::OsString;

use nix::errno::Errno;
use nix::sys::signal::{self, Signal};

use super::{SpawnError, spawn};
use crate::user::EnvoyUser;

/// Runs `argv` to its end as `user`, its output to `output`: whether it exited 0 within `timeout`
/// (one still running then is killed with its process group, and has not passed). Only before the
/// supervisor runs (no reaper yet takes its exit), from the main thread.
pub fn run_before_start(
    argv: &[OsString],
    output: std::fs::File,
    user: Option<&EnvoyUser>,
    timeout: std::time::Duration,
) -> Result<bool, SpawnError> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let program = argv.first().cloned().unwrap_or_default();
    let pid = spawn(argv, false, Some(output), user)?;
    let deadline = std::time::Instant::now() + timeout;
    let mut killed = false;
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code == 0 && !killed),
            Ok(WaitStatus::Signaled(..)) => return Ok(false),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(SpawnError { program, error: e.into() }),
        }
        if !killed && std::time::Instant::now() >= deadline {
            let _ = signal::killpg(pid, Signal::SIGKILL);
            killed = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_before_start_is_bounded_and_killed_when_it_hangs() {
        let out = || std::fs::File::create("/dev/null").expect("null");
        let argv = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        let started = std::time::Instant::now();
        let hung = run_before_start(&argv(&["sleep", "30"]), out(), None, std::time::Duration::from_millis(100));
        assert!(matches!(hung, Ok(false)) && started.elapsed() < std::time::Duration::from_secs(5), "{hung:?}");
        assert!(matches!(
            run_before_start(&argv(&["true"]), out(), None, std::time::Duration::from_secs(10)),
            Ok(true)
        ));
    }
}
