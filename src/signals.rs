//! The signals the launcher catches, and what each one means: the one signal table. The
//! supervisor asks `intent` and acts on the answer; nothing else interprets a signal number.

use futures_util::StreamExt;
use nix::sys::signal::{SigSet, SigmaskHow, sigprocmask};
use signal_hook::consts::signal::*;
use signal_hook_tokio::Signals;

/// Never caught, as in tini: the synchronous signals (a fault in the launcher itself must not be
/// forwarded as if it were a request), SIGKILL/SIGSTOP (impossible), SIGTTIN/SIGTTOU (ignored, see
/// `process::ignore_tty_stop_signals`), and SIGPIPE, which a write to a closed log pipe raises in
/// the launcher itself and which must not be passed on to Envoy.
const NOT_CAUGHT: &[i32] =
    &[SIGKILL, SIGSTOP, SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE, SIGSEGV, SIGSYS, SIGTTIN, SIGTTOU, SIGPIPE];

/// Every signal number the launcher installs a handler for: SIGCHLD (to reap) and every other
/// catchable signal, real-time ones included (to forward or to act on).
pub fn caught() -> Vec<i32> {
    (1..=libc::SIGRTMAX())
        .filter(|sig| !NOT_CAUGHT.contains(sig))
        // glibc keeps the first real-time signals for its own threads; they cannot be caught.
        .filter(|sig| *sig < 32 || *sig >= libc::SIGRTMIN())
        .collect()
}

/// Blocks every signal the launcher will catch, until `pump_into` takes them: one sent during
/// start-up (while the demo certificate is generated, say) waits instead of killing the launcher,
/// or being dropped, as it would be for PID 1 without a handler.
pub fn hold() {
    // SAFETY: sigemptyset/sigaddset fill a local sigset_t (real-time signals included, which nix's
    // `Signal` cannot name); pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in caught() {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Installs the handlers (so that nothing sent before the child starts is lost), then unblocks
/// every signal, held or inherited from the parent (a blocked SIGCHLD would leave zombies for
/// ever), and hands each caught signal to `deliver`, from a task of its own, until it returns false.
pub fn listen(mut deliver: impl FnMut(i32) -> bool + Send + 'static) -> std::io::Result<()> {
    let mut signals = Signals::new(caught())?;
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
    tokio::spawn(async move {
        while let Some(sig) = signals.next().await {
            if !deliver(sig) {
                break;
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
