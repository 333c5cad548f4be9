//! Reaping, where SIGCHLD arrives: the signal listener calls `Reaper::reap`, which loops
//! `waitpid(-1, WNOHANG)` until nothing is left. What the children the launcher started did (its
//! epochs, the validator, the version checker: every pid `System::spawn` returned) is kept for the
//! supervisor; orphans the kernel handed over are reaped and counted there and then, so that ten
//! thousand of them cost ten thousand waitpid calls and no event each.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::Exit;

/// What the children the launcher started did, since the supervisor last asked.
#[derive(Debug, Default)]
pub struct Reaped {
    pub exits: Vec<(Pid, Exit)>,
    /// Children that stopped, with the signal that stopped them (job control: Ctrl-Z).
    pub stopped: Vec<(Pid, i32)>,
    /// waitpid answered ECHILD: the launcher has no child left at all.
    pub no_children: bool,
}

/// The reaper shared by the signal listener (which reaps) and the process layer (which names the
/// children it starts and hands their exits to the supervisor). Both run on the runtime's one
/// thread; the lock is never contended.
#[derive(Clone)]
pub struct Reaper(Arc<Mutex<State>>);

struct State {
    /// The children started and not reaped yet.
    known: HashSet<i32>,
    found: Reaped,
    count_orphans: Box<dyn Fn(u64) + Send>,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reaper")
    }
}

impl Reaper {
    /// `count_orphans` is told how many orphans each pass reaped (the metric).
    pub fn new(count_orphans: impl Fn(u64) + Send + 'static) -> Reaper {
        let state = State { known: HashSet::new(), found: Reaped::default(), count_orphans: Box::new(count_orphans) };
        Reaper(Arc::new(Mutex::new(state)))
    }

    /// A child the launcher started: what it does goes to the supervisor.
    pub fn know(&self, pid: Pid) {
        self.state().known.insert(pid.as_raw());
    }

    /// Reaps every child that exited, without blocking. True when the supervisor has something to
    /// hear: a known child exited or stopped, or no child is left at all (the wait for leftovers
    /// ends on it).
    pub fn reap(&self) -> bool {
        let mut state = self.state();
        let State { known, found, count_orphans } = &mut *state;
        let mut orphans = 0;
        found.no_children = wait_all(|status| {
            let (pid, exit) = match status {
                WaitStatus::Exited(pid, code) => (pid, Exit::Code(code)),
                WaitStatus::Signaled(pid, sig, _) => (pid, Exit::Signal(sig as i32)),
                WaitStatus::Stopped(pid, sig) if known.contains(&pid.as_raw()) => {
                    found.stopped.push((pid, sig as i32));
                    return;
                }
                _ => return,
            };
            if known.remove(&pid.as_raw()) {
                found.exits.push((pid, exit));
            } else {
                orphans += 1;
                tracing::debug!(pid = pid.as_raw(), "reaped an adopted orphan ({exit})");
            }
        });
        if orphans > 0 {
            count_orphans(orphans);
        }
        !found.exits.is_empty() || !found.stopped.is_empty() || found.no_children
    }

    /// Reaps, then hands over what the known children did since the last call.
    pub fn take(&self) -> Reaped {
        self.reap();
        std::mem::take(&mut self.state().found)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `waitpid(-1, WNOHANG | WUNTRACED)` until nothing more has exited; each status goes to `each`.
/// True when the launcher has no child left (ECHILD).
fn wait_all(mut each: impl FnMut(WaitStatus)) -> bool {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG | WaitPidFlag::WUNTRACED)) {
            Ok(WaitStatus::StillAlive) => return false,
            Ok(status) => each(status),
            // EINTR: a signal landed mid-call; the next iteration simply asks again.
            Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => return true,
            Err(e) => {
                tracing::warn!("waitpid failed: {e}");
                return false;
            }
        }
    }
}

// No unit test here: waitpid(-1) in the test binary would reap the children of tests running
// beside it. tests/init.rs (200 orphans, as PID 1 and as a subreaper) and every Envoy test cover it.
