//! Where the reload is: one type that holds the step under way, the callers waiting for it and the
//! trigger queued behind it, so that a queue without a reload under way, or a step while hot
//! restarts are blocked, cannot be represented. Pure: it starts, signals and spawns nothing; the
//! supervisor does that and records the step here.

use nix::unistd::Pid;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Generation;
use super::checks::{CheckRun, Verdict};
use super::timers::KillTimer;
use crate::admin::Family;
use crate::checks::BinaryId;
use crate::outcome::Refusal;

/// A caller of `/reload`, answered with the new epoch or why there is none.
pub type ReloadReply = oneshot::Sender<Result<u32, Refusal>>;

#[derive(Debug, Default)]
pub enum ReloadState {
    /// Nothing under way; the next trigger starts a reload.
    #[default]
    Idle,
    /// A trigger arrived while the current epoch is not LIVE: Envoy refuses a hot restart while
    /// its current epoch initializes ("previous envoy process is still initializing"), so the
    /// reload starts once it is LIVE, for these callers.
    Held {
        waiters: Vec<ReloadReply>,
    },
    Busy(Box<Busy>),
}

/// A reload under way.
#[derive(Debug)]
pub struct Busy {
    /// Events of the steps carry it; one from an earlier attempt is stale.
    pub attempt: Generation,
    pub started: Instant,
    pub step: Step,
    /// A cold handover (a new Envoy family) rather than a hot restart, and why.
    pub cold: Option<String>,
    /// The Envoy binary the checks found, once they have passed.
    pub binary: Option<BinaryId>,
    /// Callers waiting for this attempt.
    waiters: Vec<ReloadReply>,
    /// A trigger arrived meanwhile: one more reload follows, for these callers (cold if any of
    /// the triggers asked for a cold handover).
    queued: Option<Queued>,
}

#[derive(Debug, Default)]
pub struct Queued {
    pub waiters: Vec<ReloadReply>,
    pub cold: Option<String>,
}

/// The steps of a reload, in order.
#[derive(Debug)]
pub enum Step {
    /// The checks machine: preflight, maybe the new binary's hot restart version, `envoy --mode
    /// validate`.
    Checking(CheckRun),
    /// The previous epoch still drains: the new one waits for it, so that there are never three.
    /// (Ending it early is no option: Envoy's current epoch must tell it to terminate itself when
    /// the next one starts, and aborts when it cannot.) Refused at `deadline`.
    WaitingForDraining { oldest: Pid, verdict: Verdict, deadline: Generation },
    /// The draining epoch has exited: the files must stay as checked for a debounce (a `cp cert;
    /// cp key` may have begun the moment it exited) before the new epoch reads them, at `deadline`.
    Settling { verdict: Verdict, deadline: Generation },
    /// Epoch `epoch` runs; `poll` asks its admin until it is LIVE and answers as `live_poll`.
    /// For a cold handover, `family` is the new family, with what was checked for it.
    Starting {
        epoch: u32,
        pid: Pid,
        poll: Option<JoinHandle<()>>,
        live_poll: Generation,
        family: Option<(Family, Verdict)>,
    },
    /// Cold handover: the new family serves; the old one is drained through its admin (`drain`),
    /// then stopped (SIGTERM at the drain's end, then `stop`: SIGKILL, then going on without it).
    /// Once it is gone, the new family is hot-restarted onto the configured admin address, with
    /// `verdict`.
    HandingOver {
        drain: Option<JoinHandle<()>>,
        stop: Option<KillTimer>,
        verdict: Verdict,
        old: Family,
        /// How long after the trigger the new family served.
        served_after: std::time::Duration,
    },
}

impl Step {
    pub fn name(&self) -> &'static str {
        match self {
            Step::Checking(run) => run.step_name(),
            Step::WaitingForDraining { .. } => "waiting for the draining epoch to exit",
            Step::Settling { .. } => "letting the files settle",
            Step::Starting { .. } => "starting the new epoch",
            Step::HandingOver { .. } => "draining the old Envoy family",
        }
    }
}

/// What becomes of a trigger.
#[derive(Debug)]
pub enum Admission {
    /// Start a reload now, for these callers.
    Start(Vec<ReloadReply>),
    /// Queued behind the reload under way; `first` when nothing was queued before.
    Queued { first: bool },
    /// Held until the current epoch is LIVE; `first` when nothing was held before.
    Held { first: bool },
}

impl ReloadState {
    /// Admits a trigger (with its caller, for `/reload`), knowing whether the current epoch is LIVE.
    /// A cold handover does not wait for the current epoch (it may never be LIVE again): it starts
    /// unless a reload is under way.
    pub fn is_idle(&self) -> bool {
        matches!(self, ReloadState::Idle)
    }

    pub fn admit(&mut self, waiter: Option<ReloadReply>, current_live: bool, cold: Option<&str>) -> Admission {
        match self {
            ReloadState::Idle if current_live || cold.is_some() => Admission::Start(waiter.into_iter().collect()),
            ReloadState::Idle => {
                *self = ReloadState::Held { waiters: waiter.into_iter().collect() };
                Admission::Held { first: true }
            }
            ReloadState::Held { waiters } if cold.is_some() => {
                Admission::Start(std::mem::take(waiters).into_iter().chain(waiter).collect())
            }
            ReloadState::Held { waiters } => {
                waiters.extend(waiter);
                Admission::Held { first: false }
            }
            ReloadState::Busy(busy) => {
                let first = busy.queued.is_none();
                let queued = busy.queued.get_or_insert_with(Queued::default);
                queued.waiters.extend(waiter);
                if queued.cold.is_none() {
                    queued.cold = cold.map(str::to_string);
                }
                Admission::Queued { first }
            }
        }
    }

    /// A reload (cold when `cold` says why) starts with its checks, `run`.
    pub fn begin(&mut self, run: CheckRun, waiters: Vec<ReloadReply>, cold: Option<String>) {
        let attempt = run.attempt;
        let step = Step::Checking(run);
        *self = ReloadState::Busy(Box::new(Busy {
            attempt,
            started: Instant::now(),
            step,
            cold,
            binary: None,
            waiters,
            queued: None,
        }));
    }

    /// The reload under way starts over with new checks, `run`, for the same callers (its input
    /// changed after it was checked).
    pub fn begin_again(&mut self, run: CheckRun) {
        if let ReloadState::Busy(busy) = self {
            busy.attempt = run.attempt;
            busy.step = Step::Checking(run);
        }
    }

    /// The checks of the reload under way, while it is at them.
    pub fn checks(&mut self) -> Option<&mut CheckRun> {
        match self {
            ReloadState::Busy(busy) => match &mut busy.step {
                Step::Checking(run) => Some(run),
                _ => None,
            },
            _ => None,
        }
    }

    /// The reload under way, if it is attempt `attempt`.
    pub fn attempt(&mut self, attempt: Generation) -> Option<&mut Busy> {
        match self {
            ReloadState::Busy(busy) if busy.attempt == attempt => Some(busy),
            _ => None,
        }
    }

    pub fn busy(&mut self) -> Option<&mut Busy> {
        match self {
            ReloadState::Busy(busy) => Some(busy),
            _ => None,
        }
    }

    pub fn step(&self) -> Option<&Step> {
        match self {
            ReloadState::Busy(busy) => Some(&busy.step),
            _ => None,
        }
    }

    pub fn step_name(&self) -> Option<&'static str> {
        match self {
            ReloadState::Held { .. } => Some("waiting for the current epoch to be LIVE"),
            _ => self.step().map(Step::name),
        }
    }

    /// The current epoch is LIVE: a held trigger's callers, whose reload is to start now.
    pub fn release_held(&mut self) -> Option<Vec<ReloadReply>> {
        match std::mem::take(self) {
            ReloadState::Held { waiters } => Some(waiters),
            other => {
                *self = other;
                None
            }
        }
    }

    /// Whether the reload under way is a cold handover.
    pub fn is_cold(&self) -> bool {
        matches!(self, ReloadState::Busy(busy) if busy.cold.is_some())
    }

    /// The reload under way ended with `outcome`: its callers are answered. Returns the callers of
    /// the queued trigger when one was queued: that reload is to start now.
    pub fn finish(&mut self, outcome: &Result<u32, Refusal>) -> Option<Queued> {
        let ReloadState::Busy(busy) = std::mem::take(self) else { return None };
        busy.waiters.into_iter().for_each(|w| answer(Some(w), outcome));
        busy.queued
    }

    /// A new epoch failed and Envoy's hot restart is blocked: the callers of this attempt hear
    /// `failure`; those of the queued trigger are returned, for the recovery (or to be refused).
    pub fn block(&mut self, failure: Refusal) -> Vec<ReloadReply> {
        let ReloadState::Busy(busy) = std::mem::take(self) else { return Vec::new() };
        busy.waiters.into_iter().for_each(|w| answer(Some(w), &Err(failure.clone())));
        busy.queued.map(|q| q.waiters).unwrap_or_default()
    }

    /// The launcher shuts down: every caller hears so. Returns the step that was under way, for the
    /// supervisor to end what it started; a block stays (it is still true).
    pub fn cancel(&mut self) -> Option<Step> {
        match std::mem::take(self) {
            ReloadState::Held { waiters } => {
                waiters.into_iter().for_each(|w| answer(Some(w), &Err(Refusal::ShuttingDown)));
                None
            }
            ReloadState::Busy(busy) => {
                let shutting_down = Err(Refusal::ShuttingDown);
                busy.waiters
                    .into_iter()
                    .chain(busy.queued.into_iter().flat_map(|q| q.waiters))
                    .for_each(|w| answer(Some(w), &shutting_down));
                Some(busy.step)
            }
            other => {
                *self = other;
                None
            }
        }
    }
}

pub fn answer(waiter: Option<ReloadReply>, outcome: &Result<u32, Refusal>) {
    if let Some(waiter) = waiter {
        // A caller that hung up is no longer interested.
        let _ = waiter.send(outcome.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller() -> (ReloadReply, oneshot::Receiver<Result<u32, Refusal>>) {
        oneshot::channel()
    }

    #[tokio::test]
    async fn an_idle_state_starts_and_a_busy_one_queues_once() {
        let mut state = ReloadState::Idle;
        let (first, mut first_rx) = caller();
        let Admission::Start(waiters) = state.admit(Some(first), true, None) else { panic!("idle starts") };
        state.begin(CheckRun::at(1), waiters, None);
        assert_eq!(state.step_name(), Some("checking certificates"));
        assert!(matches!(state.admit(None, true, None), Admission::Queued { first: true }));
        let (second, mut second_rx) = caller();
        assert!(matches!(state.admit(Some(second), true, None), Admission::Queued { first: false }));
        assert!(state.attempt(2).is_none(), "a stale attempt finds nothing");
        assert!(state.attempt(1).is_some());

        let queued = state.finish(&Ok(1)).expect("a queued trigger");
        assert_eq!(first_rx.try_recv().expect("answered"), Ok(1));
        assert!(second_rx.try_recv().is_err(), "the queued caller waits for the next reload");
        assert!(matches!(state, ReloadState::Idle));
        state.begin(CheckRun::at(2), queued.waiters, None);
        assert!(state.finish(&Err(Refusal::Invalid("bad".into()))).is_none(), "nothing queued");
        assert_eq!(second_rx.try_recv().expect("answered"), Err(Refusal::Invalid("bad".into())));
    }

    #[tokio::test]
    async fn a_failed_epoch_answers_its_callers_and_hands_back_the_queued_ones() {
        let mut state = ReloadState::Idle;
        let (first, mut first_rx) = caller();
        let (queued, mut queued_rx) = caller();
        let Admission::Start(waiters) = state.admit(Some(first), true, None) else { panic!("idle starts") };
        state.begin(CheckRun::at(1), waiters, None);
        state.admit(Some(queued), true, None);
        let handed_back = state.block(Refusal::Failed("epoch 1 failed".into()));
        assert_eq!(first_rx.try_recv().expect("answered"), Err(Refusal::Failed("epoch 1 failed".into())));
        assert!(queued_rx.try_recv().is_err(), "the supervisor decides for the queued caller");
        assert_eq!(handed_back.len(), 1);
        assert!(matches!(state, ReloadState::Idle));
    }

    #[tokio::test]
    async fn a_cold_trigger_does_not_wait_for_the_current_epoch_and_a_queued_one_stays_cold() {
        let mut state = ReloadState::Idle;
        assert!(matches!(state.admit(None, false, None), Admission::Held { first: true }));
        let Admission::Start(waiters) = state.admit(None, false, Some("by hand")) else { panic!("cold starts") };
        state.begin(CheckRun::at(1), waiters, Some("by hand".into()));
        assert!(state.is_cold());
        state.admit(None, true, None);
        state.admit(None, true, Some("recovery"));
        state.admit(None, true, Some("later"));
        let queued = state.finish(&Ok(1)).expect("queued");
        assert_eq!(queued.cold.as_deref(), Some("recovery"), "the first cold reason is kept");
    }

    #[tokio::test]
    async fn a_shutdown_answers_every_caller() {
        let mut state = ReloadState::Idle;
        let (first, mut first_rx) = caller();
        let (queued, mut queued_rx) = caller();
        let Admission::Start(waiters) = state.admit(Some(first), true, None) else { panic!("idle starts") };
        state.begin(CheckRun::at(1), waiters, None);
        state.admit(Some(queued), true, None);
        assert!(matches!(state.cancel(), Some(Step::Checking(_))));
        assert_eq!(first_rx.try_recv().expect("answered"), Err(Refusal::ShuttingDown));
        assert_eq!(queued_rx.try_recv().expect("answered"), Err(Refusal::ShuttingDown));
        assert!(matches!(state, ReloadState::Idle));
    }

    #[tokio::test]
    async fn a_trigger_before_the_current_epoch_is_live_is_held_until_it_is() {
        let mut state = ReloadState::Idle;
        let (first, mut first_rx) = caller();
        assert!(matches!(state.admit(Some(first), false, None), Admission::Held { first: true }));
        assert!(matches!(state.admit(None, false, None), Admission::Held { first: false }));
        assert_eq!(state.step_name(), Some("waiting for the current epoch to be LIVE"));
        let waiters = state.release_held().expect("held");
        assert!(matches!(state, ReloadState::Idle));
        assert!(state.release_held().is_none(), "once");
        state.begin(CheckRun::at(1), waiters, None);
        state.finish(&Ok(1));
        assert_eq!(first_rx.try_recv().expect("answered"), Ok(1));

        let (held, mut held_rx) = caller();
        state.admit(Some(held), false, None);
        assert!(state.cancel().is_none());
        assert_eq!(held_rx.try_recv().expect("answered"), Err(Refusal::ShuttingDown));
    }
}
