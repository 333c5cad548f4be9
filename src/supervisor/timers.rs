//! The supervisor's clock: every deadline comes back as `Event::Deadline(generation)`, and whoever
//! waits for it keeps the generation; a deadline whose waiter has moved on finds nobody and is
//! dropped. And the one escalation of a process that must be gone by a deadline.

use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use super::{Event, Generation};

/// How long to wait for SIGKILLed processes to be reaped before giving up on them (a process in
/// uninterruptible sleep can outlive SIGKILL; the launcher must still exit).
pub const REAP_AFTER_KILL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Timers {
    events: UnboundedSender<Event>,
    /// The last generation handed out.
    last: Generation,
}

impl Timers {
    pub fn new(events: UnboundedSender<Event>) -> Timers {
        Timers { events, last: 0 }
    }

    /// A new generation, for a deadline or for anything whose late answers must be told apart.
    pub fn next(&mut self) -> Generation {
        self.last += 1;
        self.last
    }

    /// `Event::Deadline(generation)` after `after`.
    pub fn schedule(&mut self, after: Duration) -> Generation {
        let generation = self.next();
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = events.send(Event::Deadline(generation));
        });
        generation
    }
}

/// A process (or a group of them) that must be gone by a deadline: SIGKILL when it passes, then
/// `REAP_AFTER_KILL_TIMEOUT` more, after which it is given up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KillTimer {
    deadline: Generation,
    killed: bool,
}

/// What a `KillTimer`'s deadline calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillStep {
    /// Its time is up: SIGKILL it (the timer now waits for the reap).
    Kill,
    /// Not even SIGKILL ended it: go on without it.
    GiveUp,
}

impl KillTimer {
    pub fn start(timers: &mut Timers, after: Duration) -> KillTimer {
        KillTimer { deadline: timers.schedule(after), killed: false }
    }

    /// Whether SIGKILL was sent.
    pub fn killed(&self) -> bool {
        self.killed
    }

    /// What `generation` calls for; None when it is not this timer's deadline.
    pub fn on_deadline(&mut self, generation: Generation, timers: &mut Timers) -> Option<KillStep> {
        if generation != self.deadline {
            return None;
        }
        if self.killed {
            return Some(KillStep::GiveUp);
        }
        self.killed = true;
        self.deadline = timers.schedule(REAP_AFTER_KILL_TIMEOUT);
        Some(KillStep::Kill)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_kill_timer_kills_once_then_gives_up_and_ignores_other_deadlines() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut timers = Timers::new(tx);
        let mut timer = KillTimer::start(&mut timers, Duration::from_secs(10));
        let other = timers.schedule(Duration::from_secs(1));
        let Some(Event::Deadline(first)) = rx.recv().await else { panic!("a deadline") };
        assert_eq!(first, other);
        assert_eq!(timer.on_deadline(other, &mut timers), None, "not its deadline");
        let Some(Event::Deadline(due)) = rx.recv().await else { panic!("a deadline") };
        assert_eq!(timer.on_deadline(due, &mut timers), Some(KillStep::Kill));
        assert!(timer.killed());
        assert_eq!(timer.on_deadline(due, &mut timers), None, "a deadline acts once");
        let started = tokio::time::Instant::now();
        let Some(Event::Deadline(after_kill)) = rx.recv().await else { panic!("a deadline") };
        assert_eq!(started.elapsed(), REAP_AFTER_KILL_TIMEOUT);
        assert_eq!(timer.on_deadline(after_kill, &mut timers), Some(KillStep::GiveUp));
    }
}
