//! The supervisor: one task that owns all state (the epochs, the drain, the reload) and handles
//! every event from one channel, in turn. Nothing else changes that state: workers (the drain, the
//! reload's steps, the watcher, the signal and control listeners) return or hand over results, which
//! the supervisor wraps into its own private events.
//!
//! Theory of operation (docs/ARCHITECTURE.md has the whole of it):
//! - SIGCHLD: the signal listener reaps every exited process where the signal arrives; orphans the
//!   kernel handed to us are counted there, and only the exits of our own children (an epoch of
//!   Envoy, the validator, the version checker) reach the supervisor. Only the exit of the
//!   *current* epoch (the one serving) ends the launcher.
//! - SIGTERM/SIGINT to an Envoy start a graceful drain (`shutdown`); then the newest epoch gets
//!   SIGTERM, and SIGKILL after the kill timeout.
//! - SIGHUP, a changed file or `/reload` start a reload (`reload`): the checks (`checks`: certificate
//!   checks, `envoy --mode validate`), then epoch N+1, which must answer LIVE on the admin API. At
//!   most one runs at a time, one more is queued. A new epoch that fails never costs the serving one.
//! - any other signal is forwarded, as the signal table (`signals::intent`) says.
//!
//! Processes are reached only through `Processes`, and every deadline comes back as an event keyed
//! by a generation number (`timers`), so the state machine runs the same under unit tests with a fake process
//! layer and tokio's paused time.

mod checks;
mod epochs;
mod exits;
mod file_changes;
mod handover;
mod health;
mod in_place;
mod recovery;
mod reload;
mod reload_outcome;
mod reload_state;
mod report;
mod served_files;
mod shutdown;
#[cfg(test)]
mod tests;
mod timers;
mod touched;
mod trigger;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;

use crate::admin::{AdminAddress, Family, NotLive};
use crate::checks::BinaryId;
use crate::control::{self, ControlRequest, ControlSettings};
use crate::drain::{DrainEnd, DrainSettings};
use crate::http::Endpoint;
use crate::launch::Launch;
use crate::metrics::Metrics;
use crate::process::{self, Exit, InitMode, Processes, System, signal_name};
use crate::signals::{self, Intent, Running};
use crate::status::ReloadStatus;
use crate::systemd::Notifier;
use crate::watch::{self, WatchSpec};

use checks::CheckReport;
use epochs::{Epoch, Epochs};
use health::HotRestartHealth;
use reload_state::ReloadState;
use shutdown::Phase;
use timers::Timers;
use trigger::Trigger;

/// Numbers the deadlines and the reload attempts: an event that carries an old one is stale.
type Generation = u64;

/// Everything the supervisor reacts to.
#[derive(Debug)]
enum Event {
    Signal(i32),
    DrainEnded(DrainEnd),
    /// A watched file was touched: a debounce runs. What the events named.
    FilesChanging(crate::watch::Touched),
    /// A debounce ended: the watched files whose content changed (maybe none).
    FilesChanged(Vec<PathBuf>),
    /// A step of the checks run `attempt` reports.
    Checked {
        attempt: Generation,
        report: CheckReport,
    },
    /// The LIVE poll `poll` of an epoch ended: it answered LIVE (on this address), or why not.
    EpochLive {
        epoch: u32,
        poll: Generation,
        result: Result<Endpoint, NotLive>,
    },
    /// A timer set by `Timers::schedule` ran out.
    Deadline(Generation),
    /// The drain of the old family in the cold handover `attempt` ended.
    FamilyDrained {
        attempt: Generation,
        end: DrainEnd,
    },
    /// A request on the control API.
    Control(ControlRequest),
    /// The in-place rotation `attempt` ended: what became of each secret Envoy had.
    Rotated {
        attempt: Generation,
        /// By secret name: a reload meanwhile may have changed the list of secrets.
        outcomes: Vec<(String, crate::sds::Outcome)>,
    },
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// Between SIGTERM and SIGKILL, for Envoy and for whatever the child leaves behind.
    pub kill_timeout: Duration,
    pub drain: DrainSettings,
    pub reload_timeout: Duration,
    pub cert_expiry_warn: Duration,
    pub watch: WatchSpec,
    pub control: ControlSettings,
    pub recover: RecoverSettings,
}

/// When hot restarts are blocked: a cold handover after `backoff`, doubling to `backoff_max`.
#[derive(Debug, Clone)]
pub struct RecoverSettings {
    pub enabled: bool,
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// Set net.ipv4.tcp_migrate_req=1 before the old family stops listening.
    pub migrate_queued_connections: bool,
}

struct Supervisor<P: Processes> {
    launch: Launch,
    settings: Settings,
    processes: P,
    events: UnboundedSender<Event>,
    timers: Timers,
    epochs: Epochs,
    phase: Phase,
    reload: ReloadState,
    last_reload: Option<ReloadStatus>,
    metrics: Arc<Metrics>,
    systemd: Notifier,
    /// Callers of /shutdown, answered when the drain ends.
    shutdown_waiters: Vec<tokio::sync::oneshot::Sender<bool>>,
    /// How the drain ended (true: drained), once it has.
    drained: Option<bool>,
    /// When an older (draining) epoch last exited.
    older_exited: Option<tokio::time::Instant>,
    /// Whether more than one epoch lives, for the drain.
    older_alive: tokio::sync::watch::Sender<bool>,
    /// The hot-restart family of the epoch that serves; its base id is read once, when its epoch 0
    /// is LIVE, and kept (the runtime directory may be deleted under us).
    family: Family,
    /// How many families were started (the next one's number).
    families: u32,
    /// Whether the next reload can be a hot restart.
    health: HotRestartHealth,
    recovery: recovery::Recovery,
    /// The Envoy binary the serving family runs: a reload that would run another checks first
    /// whether a hot restart across them can work.
    binary: Option<BinaryId>,
    /// The checks run while the watched files settle.
    early: file_changes::Early,
    /// Checkers killed because their checks were no longer wanted, until they are reaped.
    killed_checkers: Vec<nix::unistd::Pid>,
    /// `--cert-reload in-place`: what Envoy has of the secrets, and the rotation under way.
    in_place: Option<in_place::InPlace>,
}

/// Runs `launch` to completion and returns the status the launcher exits with.
pub async fn run(launch: Launch, settings: Settings) -> i32 {
    let mode = match process::become_init() {
        Ok(mode) => mode,
        Err(e) => {
            tracing::warn!("cannot become a child subreaper ({e}): orphans will not be reaped by sesame");
            InitMode::Subreaper
        }
    };
    tracing::debug!("running as {}", if mode == InitMode::Pid1 { "PID 1" } else { "a child subreaper" });
    process::ignore_tty_stop_signals();
    tokio::spawn(crate::memory::give_back_when_quiet());

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let signal_events = events_tx.clone();
    let metrics = Arc::new(Metrics::new());
    let orphans = metrics.orphans();
    let reaper = process::Reaper::new(move |count| {
        orphans.inc_by(count);
    });
    let reaping = reaper.clone();
    if let Err(e) = signals::listen(move || reaping.reap(), move |sig| signal_events.send(Event::Signal(sig)).is_ok()) {
        tracing::error!("cannot take signals: {e}");
        return 1;
    }
    let control_events = events_tx.clone();
    let ask: control::Ask = Arc::new(move |request| control_events.send(Event::Control(request)).is_ok());
    let (control_socket, keeper) = match control::start(&settings.control, ask, metrics.clone()).await {
        Ok(started) => started,
        Err(e) => {
            tracing::error!("{e:#}");
            return 1;
        }
    };
    let processes = System { mode, first_child: None, terminal_child: None, user: launch.user.clone(), reaper };
    let mut supervisor = match Supervisor::start(launch, settings, processes, events_tx, metrics, Notifier::from_env())
    {
        Ok(supervisor) => supervisor,
        Err(code) => {
            control_socket.remove();
            return code;
        }
    };
    // After the spawn: Envoy's start does not wait for it (the keeper looks once at what it missed).
    keeper.start();
    let exit = supervisor.supervise(&mut events).await;
    supervisor.stop_leftovers(&mut events).await;
    control_socket.remove();
    supervisor.remove_shared_memory();
    supervisor.remove_secrets();
    crate::bootstrap::forget_parsed();
    supervisor.remove_family_files();
    exit.status_code()
}

impl<P: Processes> Supervisor<P> {
    /// Starts epoch 0 (or the plain command), the watcher and the LIVE poll; Err is the exit status
    /// when the command cannot be started.
    fn start(
        mut launch: Launch,
        settings: Settings,
        mut processes: P,
        events: UnboundedSender<Event>,
        metrics: Arc<Metrics>,
        systemd: Notifier,
    ) -> Result<Self, i32> {
        // Watched from before epoch 0 reads the files: a change in between is a change.
        if launch.is_envoy() && !settings.watch.is_empty() {
            let changes = events.clone();
            let report = move |change| {
                let event = match change {
                    watch::Change::Begun(touched) => Event::FilesChanging(touched),
                    watch::Change::Settled(files) => Event::FilesChanged(files),
                };
                changes.send(event).is_ok()
            };
            let read = launch.envoy.as_ref().and_then(|envoy| envoy.bootstrap_files.as_ref());
            if let Err(e) = watch::start(settings.watch.clone(), read, report) {
                tracing::warn!("cannot watch files for changes ({e}): hot restarts only on SIGHUP");
            }
        }
        let family = launch.family(0);
        let argv = launch.epoch_argv(&family, 0);
        let admin = launch.admin();
        forget_admin_address_file(admin.as_ref());
        // A plain command gets the terminal as under tini; Envoy does not, so that Ctrl-C reaches the launcher.
        let pid = processes.spawn(&argv, !launch.is_envoy(), None).map_err(|e| {
            tracing::error!("{e}");
            e.status_code()
        })?;
        tracing::info!(pid = pid.as_raw(), "started {}", shell_words(&argv));
        metrics.epochs_started.inc();
        metrics.live_epochs.set(1);
        let recovery = recovery::Recovery::new(&settings.recover);
        let in_place = launch.envoy.as_mut().and_then(|e| e.sds.as_mut()).map(in_place::InPlace::new);
        let mut supervisor = Supervisor {
            epochs: Epochs::new(Epoch::new(0, pid, admin.is_none()).with_admin(admin.clone())),
            launch,
            settings,
            processes,
            timers: Timers::new(events.clone()),
            events,
            phase: Phase::Running,
            reload: ReloadState::Idle,
            last_reload: None,
            metrics,
            systemd,
            shutdown_waiters: Vec::new(),
            drained: None,
            older_exited: None,
            older_alive: tokio::sync::watch::Sender::new(false),
            family,
            families: 1,
            health: HotRestartHealth::Serving,
            recovery,
            binary: argv.first().and_then(|program| BinaryId::of(program)),
            early: file_changes::Early::default(),
            killed_checkers: Vec::new(),
            in_place,
        };
        supervisor.export_expiry();
        match admin {
            // Ready once Envoy says it is LIVE, however long its initialisation (xDS, say) takes.
            Some(_) => {
                supervisor.systemd.status("Envoy epoch 0 is starting");
                let family = supervisor.family.clone();
                supervisor.poll_live(0, family, None);
            }
            None => {
                let program = argv.first().map(|p| p.to_string_lossy()).unwrap_or_default();
                supervisor.systemd.ready(&format!("{program} is running"));
            }
        }
        Ok(supervisor)
    }

    /// Handles events until the current epoch exits.
    async fn supervise(&mut self, events: &mut UnboundedReceiver<Event>) -> Exit {
        // Children inherited across exec, or a child that exited before the SIGCHLD handler was
        // installed, are found by this first pass; afterwards it runs on every SIGCHLD.
        if let Some(exit) = self.reap() {
            return exit;
        }
        loop {
            let Some(event) = events.recv().await else {
                // The signal listener holds a sender for the life of the runtime.
                tracing::error!("event channel closed while Envoy was running");
                return Exit::Code(1);
            };
            if let Some(exit) = self.handle(event) {
                return exit;
            }
        }
    }

    /// Handles one event; returns the current epoch's exit once there is one.
    fn handle(&mut self, event: Event) -> Option<Exit> {
        let live = matches!(event, Event::EpochLive { result: Ok(_), .. } | Event::Rotated { .. });
        let exit = self.handle_event(event);
        self.rotate_when_possible();
        let older = self.epochs.older().is_some();
        self.older_alive.send_if_modified(|alive| std::mem::replace(alive, older) != older);
        if live {
            // Start-up, a reload or a swap in place is over: what it touched is not needed while
            // Envoy serves.
            crate::memory::after_activity();
        }
        exit
    }

    fn handle_event(&mut self, event: Event) -> Option<Exit> {
        match event {
            Event::Signal(sig) => return self.on_signal(sig),
            Event::Deadline(generation) => return self.on_deadline(generation),
            Event::DrainEnded(end) => self.on_drain_ended(end),
            Event::FamilyDrained { attempt, end } => self.on_family_drained(attempt, end),
            Event::FilesChanging(touched) => self.on_files_changing(touched),
            Event::FilesChanged(files) => self.on_files_settled(files),
            Event::Checked { attempt, report } => self.on_check_report(attempt, report),
            Event::EpochLive { epoch, poll, result } => self.on_epoch_live(epoch, poll, result),
            Event::Control(request) => self.on_control(request),
            Event::Rotated { attempt, outcomes } => self.on_rotated(attempt, outcomes),
        }
        None
    }

    fn running(&self) -> Running {
        if self.launch.is_envoy() { Running::Envoy } else { Running::Command }
    }

    fn on_signal(&mut self, sig: i32) -> Option<Exit> {
        match signals::intent(sig, self.running()) {
            Intent::Reap => return self.reap(),
            Intent::Stop => self.on_stop(&signal_name(sig), sig),
            Intent::Reload => {
                if let Err(refusal) = self.request_reload(Trigger::Signal) {
                    // systemd's notify-reload waits for RELOADING=1 then READY=1 after a SIGHUP.
                    self.systemd.reloading("reload refused");
                    self.systemd.ready(&format!("reload refused: {refusal}"));
                }
            }
            Intent::ForwardToAll => self.epochs.forward_to_all(&mut self.processes, sig),
            Intent::Suspend => {
                self.epochs.signal_all(&mut self.processes, sig);
                self.processes.suspend();
            }
            Intent::Resume => {
                self.processes.resume();
                self.epochs.signal_all(&mut self.processes, sig);
            }
            Intent::ForwardToCurrent => self.epochs.forward_to_current(&mut self.processes, sig),
            Intent::Ignore => {}
        }
        None
    }

    /// Reaps everything that exited and hands each exit to its owner (an epoch's to `exits`, a
    /// checker's to `checks`); returns the current epoch's exit if it was among them.
    fn reap(&mut self) -> Option<Exit> {
        let mut current_exit = None;
        let reaped = self.processes.reap();
        for (pid, sig) in reaped.stopped {
            // A plain command stopped by job control (Ctrl-Z reaches its group, which holds the
            // terminal): the launcher stops too, so that the shell sees its job stopped.
            let job_control = matches!(sig, libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU);
            if job_control && !self.launch.is_envoy() && self.epochs.find(0).is_some_and(|e| e.pid == pid) {
                self.processes.suspend();
            }
        }
        for (pid, exit) in reaped.exits {
            if let Some(epoch) = self.epochs.remove(pid) {
                self.metrics.reaped("epoch");
                self.metrics.live_epochs.set(self.epochs.len() as i64);
                if let Some(exit) = self.on_epoch_exit(epoch, exit) {
                    current_exit = Some(exit);
                }
            } else if self.on_checker_exit(pid, exit) {
                self.metrics.reaped("validator");
            } else {
                self.metrics.reaped("orphan");
                tracing::debug!(pid = pid.as_raw(), "reaped an adopted orphan ({exit})");
            }
        }
        current_exit
    }

    /// A deadline, for whoever waits for it; a deadline whose waiter has moved on is dropped.
    fn on_deadline(&mut self, generation: Generation) -> Option<Exit> {
        if let Some(exit) = self.on_stop_deadline(generation) {
            return exit;
        }
        if self.on_check_deadline(generation) || self.on_rotation_deadline(generation) {
            return None;
        }
        if self.recovery.due(generation) {
            self.recover_now();
            return None;
        }
        self.on_reload_deadline(generation);
        None
    }

    /// Polls the admin until `epoch` answers LIVE (or `timeout` passes); the answer comes back as
    /// `Event::EpochLive` with the poll's generation. No task when there is no admin to poll.
    fn poll_live(
        &mut self,
        epoch: u32,
        family: Family,
        timeout: Option<Duration>,
    ) -> (Generation, Option<JoinHandle<()>>) {
        let poll = self.timers.next();
        let Some((admin, restart_epoch, kept)) =
            self.epochs.find(epoch).and_then(|e| Some((e.admin.clone()?, e.restart_epoch, e.admin_kept.clone())))
        else {
            return (poll, None);
        };
        let events = self.events.clone();
        let task = tokio::spawn(async move {
            let result = crate::admin::await_live(admin, restart_epoch, family, timeout).await;
            // Opened before the supervisor hears of LIVE: from then on the epoch can be drained even
            // if its admin listener goes.
            if let Ok(endpoint) = &result
                && let Err(e) = tokio::time::timeout(crate::admin::REQUEST_TIMEOUT, kept.open(endpoint)).await
            {
                tracing::debug!("cannot keep a connection to epoch {epoch}'s admin: {e}");
            }
            let _ = events.send(Event::EpochLive { epoch, poll, result });
        });
        (poll, Some(task))
    }

    fn on_control(&mut self, request: ControlRequest) {
        match request {
            ControlRequest::Status(reply) => {
                let _ = reply.send(self.status());
            }
            ControlRequest::Shutdown(reply) => self.on_shutdown_request(reply),
            ControlRequest::Reload { reply, cold } => {
                let _ = self.request_reload(Trigger::Control { reply: Some(reply), cold });
            }
            ControlRequest::EnvoyAdmin(reply) => {
                let _ = reply.send(self.current_admin_endpoint());
            }
        }
    }
}

/// For an admin on port 0: the file Envoy writes the bound address to is removed before an epoch
/// starts, so that what is read from it next is that epoch's.
fn forget_admin_address_file(admin: Option<&AdminAddress>) {
    if let Some(AdminAddress::InFile(file)) = admin
        && let Err(e) = std::fs::remove_file(file)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("cannot remove the admin address file {}: {e}", file.display());
    }
}

fn shell_words(argv: &[std::ffi::OsString]) -> String {
    argv.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
}
