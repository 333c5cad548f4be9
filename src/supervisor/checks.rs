//! The one checks machine: it takes the files as they are (read and content-hashed first) and
//! gives a verdict. Preflight (off the runtime thread), then, for a new Envoy binary, `envoy
//! --hot-restart-version`, then `envoy --mode validate`; the two checkers run as our children,
//! each bounded by a `KillTimer` at `--reload-timeout`. The checks run while the files settle, a
//! reload's own checks and a cold handover's are all runs of this machine; the verdict names what
//! it checked (paths and hashes), so that whoever starts an epoch on it can tell whether the files
//! still hold that.

use std::path::PathBuf;

use nix::unistd::Pid;
use tokio::sync::mpsc::UnboundedSender;

use super::epochs::Epochs;
use super::timers::{KillStep, KillTimer, Timers};
use super::{Event, Generation, Settings, Supervisor, shell_words};
use crate::admin::AdminAddress;
use crate::checks::{self, BinaryId, Compatibility, Input, Preflight};
use crate::launch::Launch;
use crate::outcome::Refusal;
use crate::process::{Exit, Processes};

/// What the checks passed.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The files they read, with the hash of each as read.
    pub input: Input,
    /// Where the new epoch's admin will be, from the bootstrap that was checked.
    pub admin: Option<AdminAddress>,
    /// The Envoy binary a new epoch will run.
    pub binary: Option<BinaryId>,
    /// The new binary cannot hot-restart the serving one: a cold handover instead, for this reason.
    pub cold_because: Option<String>,
    /// `--cert-reload in-place`: the SDS files the new epoch runs on, from the bytes checked.
    pub sds: Option<crate::sds::Prepared>,
}

/// What a step of the checks reports back, as `Event::Checked`.
#[derive(Debug)]
pub enum CheckReport {
    /// The files it read, and whether they passed.
    Preflight(Input, Result<Preflight, Refusal>),
    Version(Result<Compatibility, Refusal>),
    Validated(Result<(), Refusal>),
}

/// What a run of the checks is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The files while they settle, for the reload the debounce's end will trigger.
    WhileSettling,
    /// A hot restart.
    HotRestart,
    /// A cold handover: the listeners are checked beside the serving epochs, and no version check
    /// is needed (a new family shares nothing with the serving one).
    ColdHandover,
}

impl Purpose {
    /// How the log names its checks.
    fn checks(self) -> &'static str {
        match self {
            Purpose::WhileSettling => "checks while the files settle",
            Purpose::HotRestart | Purpose::ColdHandover => "checks",
        }
    }
}

/// One run of the checks; its events carry `attempt`.
#[derive(Debug)]
pub struct CheckRun {
    pub attempt: Generation,
    purpose: Purpose,
    /// The files it stands for, once the preflight has read them.
    input: Option<Input>,
    stage: Stage,
}

#[derive(Debug)]
enum Stage {
    Preflight,
    CheckingVersion { checker: Checker, verdict: Verdict },
    Validating { checker: Checker, verdict: Verdict },
    Done(Result<Verdict, Refusal>),
}

/// A checker running as our child. Once it has `exited` (and was reaped) its pid is never
/// signalled again: the kernel may have given it to another process.
#[derive(Debug)]
struct Checker {
    name: &'static str,
    pid: Pid,
    output: PathBuf,
    timer: KillTimer,
    exited: bool,
}

/// What the machine uses of the supervisor while it advances a run held in the supervisor's state.
struct Hands<'a, P> {
    processes: &'a mut P,
    timers: &'a mut Timers,
    events: &'a UnboundedSender<Event>,
    launch: &'a Launch,
    settings: &'a Settings,
    epochs: &'a Epochs,
    serving_binary: Option<&'a BinaryId>,
    killed: &'a mut Vec<Pid>,
}

/// Hands built from the supervisor's fields, so that the run (in `early` or `reload`) stays
/// borrowed beside them.
macro_rules! hands {
    ($sup:ident) => {
        Hands {
            processes: &mut $sup.processes,
            timers: &mut $sup.timers,
            events: &$sup.events,
            launch: &$sup.launch,
            settings: &$sup.settings,
            epochs: &$sup.epochs,
            serving_binary: $sup.binary.as_ref(),
            killed: &mut $sup.killed_checkers,
        }
    };
}

/// Whose run it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Early,
    Reload,
}

/// The run of `attempt` (or whose checker is `pid`), in the early checks or in the reload.
macro_rules! find_run {
    ($sup:ident, $matches:expr) => {{
        let matches = $matches;
        match ($sup.early.run.as_mut(), $sup.reload.checks()) {
            (Some(run), _) if matches(&*run) => Some((Owner::Early, run)),
            (_, Some(run)) if matches(&*run) => Some((Owner::Reload, run)),
            _ => None,
        }
    }};
}

impl CheckRun {
    /// A run at its preflight, for tests of what holds it.
    #[cfg(test)]
    pub fn at(attempt: Generation) -> CheckRun {
        CheckRun { attempt, purpose: Purpose::HotRestart, input: None, stage: Stage::Preflight }
    }

    /// What it is doing, for `/status`.
    pub fn step_name(&self) -> &'static str {
        match self.stage {
            Stage::Preflight => "checking certificates",
            Stage::CheckingVersion { .. } => "checking the new Envoy binary's hot restart version",
            Stage::Validating { .. } => "validating",
            Stage::Done(_) => "checked",
        }
    }

    /// The verdict, once there is one.
    pub fn outcome(&self) -> Option<&Result<Verdict, Refusal>> {
        match &self.stage {
            Stage::Done(outcome) => Some(outcome),
            _ => None,
        }
    }

    /// Whether a checker of this run is still running.
    pub fn checking(&self) -> bool {
        self.checker().is_some_and(|c| !c.exited)
    }

    fn checker(&self) -> Option<&Checker> {
        match &self.stage {
            Stage::CheckingVersion { checker, .. } | Stage::Validating { checker, .. } => Some(checker),
            _ => None,
        }
    }

    fn checker_mut(&mut self) -> Option<&mut Checker> {
        match &mut self.stage {
            Stage::CheckingVersion { checker, .. } | Stage::Validating { checker, .. } => Some(checker),
            _ => None,
        }
    }

    /// Whether it stands for the files as they are now: it has read them (a preflight under way has
    /// not said yet) and they still hold what it read. Blocking (it reads them).
    pub fn stands_for_current_files(&self) -> bool {
        self.input.as_ref().is_some_and(Input::unchanged)
    }

    /// Whether it may: a preflight under way compares the files when it reports.
    pub fn may_stand_for_current_files(&self) -> bool {
        matches!(self.stage, Stage::Preflight) || self.stands_for_current_files()
    }

    fn finish(&mut self, outcome: Result<Verdict, Refusal>) -> bool {
        match &outcome {
            Ok(_) => tracing::debug!("{} passed", self.purpose.checks()),
            Err(refusal) => tracing::debug!("{} failed: {refusal}", self.purpose.checks()),
        }
        self.stage = Stage::Done(outcome);
        true
    }

    /// Handles a report of its current step; true once it has a verdict.
    fn on_report<P: Processes>(&mut self, report: CheckReport, hands: &mut Hands<'_, P>) -> bool {
        let stage = std::mem::replace(&mut self.stage, Stage::Preflight);
        match (stage, report) {
            (Stage::Preflight, CheckReport::Preflight(input, result)) => self.on_preflight(input, result, hands),
            (Stage::CheckingVersion { verdict, .. }, CheckReport::Version(result)) => match result {
                Ok(Compatibility::Compatible) => {
                    tracing::info!("the new Envoy binary's hot restart version matches: a hot restart");
                    self.validate(verdict, hands)
                }
                Ok(Compatibility::Incompatible(why)) => {
                    tracing::warn!("{why}: a cold handover to a new Envoy family instead of a hot restart");
                    self.validate(Verdict { cold_because: Some(why), ..verdict }, hands)
                }
                Err(refusal) => self.finish(Err(refusal)),
            },
            (Stage::Validating { verdict, .. }, CheckReport::Validated(result)) => {
                self.finish(result.map(|()| verdict))
            }
            // A report of a step it has left (a preflight of the files as they were before).
            (stage, _) => {
                self.stage = stage;
                false
            }
        }
    }

    fn on_preflight<P: Processes>(
        &mut self,
        input: Input,
        result: Result<Preflight, Refusal>,
        hands: &mut Hands<'_, P>,
    ) -> bool {
        if !input.unchanged() {
            // Changed while they were checked: checked again, as they are now.
            spawn_preflight(self.attempt, self.purpose, hands);
            return false;
        }
        self.input = Some(input.clone());
        let preflight = match result {
            Ok(preflight) => preflight,
            Err(refusal) => return self.finish(Err(refusal)),
        };
        let admin = hands.launch.admin_address(preflight.admin);
        let verdict = Verdict { input, admin, binary: preflight.binary, cold_because: None, sds: preflight.sds };
        let upgraded = matches!((&verdict.binary, hands.serving_binary), (Some(new), Some(serving)) if new != serving);
        if upgraded && self.purpose != Purpose::ColdHandover {
            return self.check_version(verdict, hands);
        }
        self.validate(verdict, hands)
    }

    /// A new binary: `envoy --hot-restart-version` says whether a hot restart across them can work
    /// (Envoy refuses one across versions, and then blocks until a cold start).
    fn check_version<P: Processes>(&mut self, verdict: Verdict, hands: &mut Hands<'_, P>) -> bool {
        let Some(program) = hands.launch.command.first().cloned() else {
            return self.finish(Err(Refusal::Fault("no Envoy command".into())));
        };
        let argv = vec![program.clone(), "--hot-restart-version".into()];
        match spawn_checker("envoy --hot-restart-version", &argv, "envoy-hot-restart-version.log", hands) {
            Ok(checker) => {
                tracing::info!(
                    "the Envoy binary {} is not the one that serves: checking its hot restart version",
                    program.to_string_lossy()
                );
                self.stage = Stage::CheckingVersion { checker, verdict };
                false
            }
            Err(refusal) => self.finish(Err(refusal)),
        }
    }

    fn validate<P: Processes>(&mut self, verdict: Verdict, hands: &mut Hands<'_, P>) -> bool {
        // On the secrets as checked, when sesame gives them: the validator reads those bytes.
        let files = hands.launch.envoy.as_ref().and_then(|e| e.sds.as_ref()).map(|sds| &sds.files);
        let argv = match (files, &verdict.sds) {
            (Some(files), Some(_)) => files.validate_command(&hands.launch.command),
            _ => crate::envoy::validate_command(&hands.launch.command),
        };
        match spawn_checker("envoy --mode validate", &argv, "envoy-validate.log", hands) {
            Ok(checker) => {
                tracing::debug!("validating: {}", shell_words(&argv));
                self.stage = Stage::Validating { checker, verdict };
                false
            }
            Err(refusal) => self.finish(Err(refusal)),
        }
    }

    /// Its checker `pid` exited; None when `pid` is not its checker, else whether it has a verdict.
    fn on_exit<P: Processes>(&mut self, pid: Pid, exit: Exit, hands: &mut Hands<'_, P>) -> Option<bool> {
        let attempt = self.attempt;
        let version = matches!(self.stage, Stage::CheckingVersion { .. });
        let checker = self.checker_mut().filter(|c| c.pid == pid && !c.exited)?;
        checker.exited = true;
        if checker.timer.killed() {
            let why = format!("{} still running after {:?}: killed", checker.name, hands.settings.reload_timeout);
            return Some(self.finish(Err(Refusal::TimedOut(why))));
        }
        let (output, events) = (checker.output.clone(), hands.events.clone());
        if version {
            let serving = hands.epochs.current_admin();
            tokio::spawn(async move {
                let result = checks::hot_restart_compatibility(exit, output, serving).await;
                let _ = events.send(Event::Checked { attempt, report: CheckReport::Version(result) });
            });
        } else {
            tokio::spawn(async move {
                let result = checks::validation_verdict(exit, output).await;
                let _ = events.send(Event::Checked { attempt, report: CheckReport::Validated(result) });
            });
        }
        Some(false)
    }

    /// A deadline: None when it is not its checker's, else whether it has a verdict.
    fn on_deadline<P: Processes>(&mut self, generation: Generation, hands: &mut Hands<'_, P>) -> Option<bool> {
        let timeout = hands.settings.reload_timeout;
        let checker = self.checker_mut().filter(|c| !c.exited)?;
        match checker.timer.on_deadline(generation, hands.timers)? {
            KillStep::Kill => {
                // Its exit brings the verdict; one that not even SIGKILL ends must not hold the reload.
                tracing::warn!("{} still running after {timeout:?}: SIGKILL", checker.name);
                hands.processes.signal_group(checker.pid, libc::SIGKILL);
                Some(false)
            }
            KillStep::GiveUp => {
                let why = format!("{} survived SIGKILL for {:?}", checker.name, super::timers::REAP_AFTER_KILL_TIMEOUT);
                hands.killed.push(checker.pid);
                Some(self.finish(Err(Refusal::Fault(why))))
            }
        }
    }

    /// No longer wanted: a checker still running is killed, and reaped as ours when it exits.
    fn abandon<P: Processes>(self, processes: &mut P, killed: &mut Vec<Pid>) {
        if let Some(checker) = self.checker().filter(|c| !c.exited) {
            processes.signal_group(checker.pid, libc::SIGKILL);
            killed.push(checker.pid);
        }
    }
}

/// The preflight, off the runtime thread; it reports as `attempt`.
fn spawn_preflight<P>(attempt: Generation, purpose: Purpose, hands: &Hands<'_, P>) {
    let command = hands.launch.command.clone();
    // While the files settle, the run stands for every watched file (a new epoch may read a
    // `--watch` file in ways the bootstrap does not say); a reload's own run stands for what the
    // bootstrap names: a `--watch` neighbour that never rests (an access log) must not make it
    // check again for ever.
    // (Listed off the runtime thread: the bootstrap is read for the files it names.)
    let watch = (purpose == Purpose::WhileSettling).then(|| hands.settings.watch.clone());
    let expiry_warn = hands.settings.cert_expiry_warn;
    let user = hands.launch.user.clone();
    let sds = hands.launch.envoy.as_ref().and_then(|e| e.sds.as_ref()).map(|sds| sds.files.clone());
    // A new family binds every listener beside the serving one: what only the serving epochs may
    // hold is found first.
    let cold = purpose == Purpose::ColdHandover;
    let ours: Option<Vec<i32>> = cold.then(|| hands.epochs.iter().map(|e| e.pid.as_raw()).collect());
    let events = hands.events.clone();
    tokio::task::spawn_blocking(move || {
        let watched = watch.map(|watch| watch.files()).unwrap_or_default();
        let (input, result) =
            checks::preflight(&command, watched, expiry_warn, ours.as_deref(), user.as_ref(), sds.as_ref());
        let _ = events.send(Event::Checked { attempt, report: CheckReport::Preflight(input, result) });
    });
}

/// Spawns a checker with its output in the runtime directory's `file`, which is root's: the checker
/// may run as the Envoy user, but its output file is created by sesame before.
fn spawn_checker<P: Processes>(
    name: &'static str,
    argv: &[std::ffi::OsString],
    file: &str,
    hands: &mut Hands<'_, P>,
) -> Result<Checker, Refusal> {
    let Some(envoy) = &hands.launch.envoy else { return Err(Refusal::NotEnvoy) };
    let output = envoy.runtime_dir.join(file);
    // The runtime directory may have been deleted under us: it is made again, the launcher's own.
    crate::files::create_private_dir(&envoy.runtime_dir)
        .map_err(|e| Refusal::Fault(format!("{name}: cannot write {}: {e:#}", output.display())))?;
    let created = std::fs::File::create(&output)
        .map_err(|e| Refusal::Fault(format!("{name}: cannot write {}: {e}", output.display())))?;
    let pid = hands.processes.spawn(argv, false, Some(created)).map_err(|e| Refusal::Fault(e.to_string()))?;
    let timer = KillTimer::start(hands.timers, hands.settings.reload_timeout);
    Ok(Checker { name, pid, output, timer, exited: false })
}

impl<P: Processes> Supervisor<P> {
    /// A run of the checks on the files as they are now.
    pub(super) fn start_checks(&mut self, purpose: Purpose) -> CheckRun {
        let attempt = self.timers.next();
        spawn_preflight(attempt, purpose, &hands!(self));
        CheckRun { attempt, purpose, input: None, stage: Stage::Preflight }
    }

    /// A run no longer wanted (its files changed, a reload of its own, a stop).
    pub(super) fn abandon_checks(&mut self, run: CheckRun) {
        run.abandon(&mut self.processes, &mut self.killed_checkers);
    }

    pub(super) fn on_check_report(&mut self, attempt: Generation, report: CheckReport) {
        let mut hands = hands!(self);
        let Some((owner, run)) = find_run!(self, |run: &CheckRun| run.attempt == attempt) else { return };
        if run.on_report(report, &mut hands) && owner == Owner::Reload {
            self.on_checks_done();
        }
    }

    /// A child exited: a checker of a run (its verdict is read) or one killed earlier. False when
    /// it is neither.
    pub(super) fn on_checker_exit(&mut self, pid: Pid, exit: Exit) -> bool {
        if let Some(at) = self.killed_checkers.iter().position(|p| *p == pid) {
            self.killed_checkers.swap_remove(at);
            return true;
        }
        let mut hands = hands!(self);
        let holds = |run: &CheckRun| run.checker().is_some_and(|c| c.pid == pid && !c.exited);
        let Some((owner, run)) = find_run!(self, holds) else { return false };
        if run.on_exit(pid, exit, &mut hands) == Some(true) && owner == Owner::Reload {
            self.on_checks_done();
        }
        true
    }

    /// A deadline of a checker: SIGKILL, then giving up on it. False when it is none of theirs.
    pub(super) fn on_check_deadline(&mut self, generation: Generation) -> bool {
        let mut hands = hands!(self);
        if let Some(run) = self.early.run.as_mut()
            && run.on_deadline(generation, &mut hands).is_some()
        {
            return true;
        }
        let Some(done) = self.reload.checks().and_then(|run| run.on_deadline(generation, &mut hands)) else {
            return false;
        };
        if done {
            self.on_checks_done();
        }
        true
    }
}
