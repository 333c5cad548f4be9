//! The signals the launcher catches. Their meaning is decided by the supervisor; this module only
//! says which ones are caught and turns them into events.

use futures_util::StreamExt;
use nix::sys::signal::{SigSet, SigmaskHow, sigprocmask};
use signal_hook::consts::signal::*;
use signal_hook_tokio::Signals;
use tokio::sync::mpsc::UnboundedSender;

use crate::supervisor::Event;

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
/// ever), and pumps the signals into the supervisor's event channel from a task of their own.
pub fn pump_into(events: UnboundedSender<Event>) -> std::io::Result<()> {
    let mut signals = Signals::new(caught())?;
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
    tokio::spawn(async move {
        while let Some(sig) = signals.next().await {
            if events.send(Event::Signal(sig)).is_err() {
                break;
            }
        }
    });
    Ok(())
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
}
