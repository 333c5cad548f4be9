//! The signals the launcher catches, and what each one means: the one signal table. The
//! supervisor asks `intent` and acts on the answer; nothing else interprets a signal number.

use std::io::Read;
use std::os::fd::FromRawFd;

use libc::{
    SIGABRT, SIGBUS, SIGCHLD, SIGCONT, SIGFPE, SIGHUP, SIGILL, SIGINT, SIGKILL, SIGPIPE, SIGSEGV, SIGSTOP, SIGSYS,
    SIGTERM, SIGTRAP, SIGTSTP, SIGTTIN, SIGTTOU, SIGUSR1,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Never caught, as in tini: the synchronous signals (a fault in the launcher itself must not be
/// forwarded as if it were a request), SIGKILL/SIGSTOP (impossible), SIGTTIN/SIGTTOU (ignored, see
/// `process::ignore_tty_stop_signals`), and SIGPIPE, which a write to a closed log pipe raises in
/// the launcher itself and which must not be passed on to Envoy.
const NOT_CAUGHT: &[i32] =
    &[SIGKILL, SIGSTOP, SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE, SIGSEGV, SIGSYS, SIGTTIN, SIGTTOU, SIGPIPE];

/// Every signal number the launcher takes: SIGCHLD (to reap) and every other catchable signal,
/// real-time ones included (to forward or to act on).
pub fn caught() -> Vec<i32> {
    (1..=libc::SIGRTMAX())
        .filter(|sig| !NOT_CAUGHT.contains(sig))
        // glibc keeps the first real-time signals for its own threads; they cannot be caught.
        .filter(|sig| *sig < 32 || *sig >= libc::SIGRTMIN())
        .collect()
}

fn caught_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset fill a local sigset_t (real-time signals included, which nix's
    // `Signal` cannot name).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in caught() {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Blocks every signal the launcher will take, for good: from the first line of `main`, so that
/// one sent during start-up (while the demo certificate is generated, say) waits instead of
/// killing the launcher, or being dropped, as it would be for PID 1 without a handler. Every thread
/// started later inherits the mask, so the signals stay pending for `listen`'s signalfd.
pub fn hold() {
    let set = caught_set();
    // SAFETY: pthread_sigmask only reads the set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Takes the held signals through a signalfd (no handler: signals that arrive while the launcher is
/// busy wait as one pending signal each, as under tini's sigtimedwait), and sets the mask to
/// exactly them: a signal blocked by the parent but not taken here is unblocked. SIGCHLD is
/// handled where it arrives: `reap` reaps, and the signal reaches `deliver` only when `reap` says
/// the supervisor has something to hear. Every other signal goes to `deliver`, from a task of its
/// own, until it returns false.
pub fn listen(
    mut reap: impl FnMut() -> bool + Send + 'static,
    mut deliver: impl FnMut(i32) -> bool + Send + 'static,
) -> std::io::Result<()> {
    let set = caught_set();
    // SAFETY: signalfd(2) with -1 makes a new descriptor for the signals of a filled set.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by signalfd and is owned by nobody else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    // SAFETY: pthread_sigmask only reads the set.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) };
    // SAFETY: the File owns the descriptor and lives, unchanged, inside the AsyncFd.
    let signals = unsafe { AsyncFd::register_with_interest(file, Interest::READABLE) }.map_err(|e| e.into_parts().1)?;
    tokio::spawn(async move {
        // signalfd_siginfo records are 128 bytes; the signal number is their first u32.
        let mut buffer = [0u8; 128 * 64];
        loop {
            let Ok(mut ready) = signals.readable().await else { return };
            let read = match ready.try_io(|file| file.get_ref().read(&mut buffer)) {
                Ok(Ok(read)) => read,
                Ok(Err(e)) => {
                    tracing::error!("cannot read the signals: {e}");
                    return;
                }
                Err(_would_block) => continue,
            };
            for record in buffer[..read].chunks_exact(128) {
                let sig = i32::from_ne_bytes([record[0], record[1], record[2], record[3]]);
                if sig == SIGCHLD && !reap() {
                    continue;
                }
                if !deliver(sig) {
                    return;
                }
            }
        }
    });
    Ok(())
}

/// What the launcher is running when a signal arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Running {
    /// Envoy: drains and hot restarts apply.
    Envoy,
    /// Any other command, under a plain init.
    Command,
    /// The child has exited; only the processes it left behind remain.
    Leftovers,
}

/// What a signal asks of the launcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// SIGCHLD: reap every exited child.
    Reap,
    /// Stop: drain Envoy, then SIGTERM; a second one skips the rest of the drain; with only
    /// leftovers, stop waiting for them and SIGKILL.
    Stop,
    /// A validated hot restart.
    Reload,
    /// Pass it on to every live epoch (SIGUSR1: every epoch reopens its access logs).
    ForwardToAll,
    /// Job control stop (SIGTSTP): pass it on to every epoch, then stop the launcher itself, so
    /// that the shell sees its job stopped.
    Suspend,
    /// Continued (SIGCONT): hand the terminal back to the child that had it, and pass it on to
    /// every epoch.
    Resume,
    /// Pass it on to the current epoch (or the plain command).
    ForwardToCurrent,
    /// Nothing to do.
    Ignore,
}

/// The signal table.
pub fn intent(sig: i32, running: Running) -> Intent {
    match (sig, running) {
        (SIGCHLD, _) => Intent::Reap,
        (SIGTERM | SIGINT, Running::Envoy | Running::Leftovers) => Intent::Stop,
        (_, Running::Leftovers) => Intent::Ignore,
        (SIGHUP, Running::Envoy) => Intent::Reload,
        (SIGTSTP, _) => Intent::Suspend,
        (SIGCONT, _) => Intent::Resume,
        (SIGUSR1, _) => Intent::ForwardToAll,
        _ => Intent::ForwardToCurrent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libc::{SIGALRM, SIGQUIT, SIGUSR2, SIGWINCH};

    #[test]
    fn catches_what_an_init_must_forward_and_nothing_it_must_not() {
        let caught = caught();
        for sig in [SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGTERM, SIGCHLD, SIGCONT, SIGTSTP, SIGWINCH, SIGALRM] {
            assert!(caught.contains(&sig), "signal {sig} must be caught");
        }
        assert!(caught.contains(&libc::SIGRTMIN()) && caught.contains(&libc::SIGRTMAX()));
        for sig in NOT_CAUGHT {
            assert!(!caught.contains(sig), "signal {sig} must not be caught");
        }
    }

    #[test]
    fn the_signal_table() {
        use Intent::*;
        use Running::*;
        let table = [
            (SIGCHLD, [Reap, Reap, Reap]),
            (SIGTERM, [Stop, ForwardToCurrent, Stop]),
            (SIGINT, [Stop, ForwardToCurrent, Stop]),
            (SIGHUP, [Reload, ForwardToCurrent, Ignore]),
            (SIGUSR1, [ForwardToAll, ForwardToAll, Ignore]),
            (SIGUSR2, [ForwardToCurrent, ForwardToCurrent, Ignore]),
            (SIGQUIT, [ForwardToCurrent, ForwardToCurrent, Ignore]),
            (SIGWINCH, [ForwardToCurrent, ForwardToCurrent, Ignore]),
            (SIGTSTP, [Suspend, Suspend, Ignore]),
            (SIGCONT, [Resume, Resume, Ignore]),
            (libc::SIGRTMIN(), [ForwardToCurrent, ForwardToCurrent, Ignore]),
        ];
        for (sig, expected) in table {
            let got = [intent(sig, Envoy), intent(sig, Command), intent(sig, Leftovers)];
            assert_eq!(got, expected, "signal {sig}");
        }
    }
}
