//! The supervisor: one task that owns all state (the epochs, the drain, the hot restart) and
//! consumes every event from one channel.
//!
//! Theory of operation: signal handlers are installed before the first child starts, so nothing is
//! lost. Each event is handled in turn:
//! - SIGCHLD reaps every exited process: an epoch of Envoy, the validator, or an orphan the kernel
//!   handed to us. Only the exit of the *current* epoch (the one serving) ends the launcher.
//! - SIGTERM/SIGINT to an Envoy start a graceful drain (a task that talks to Envoy's admin and
//!   reports back here); then every live epoch gets SIGTERM, and SIGKILL after the kill timeout.
//! - SIGHUP or a changed file starts a validated hot restart: certificate checks, `envoy --mode
//!   validate`, then epoch N+1, which must answer LIVE on the admin API. At most one runs at a time,
//!   one more is queued. A new epoch that fails never costs the serving one: the launcher keeps
//!   serving, degraded, and refuses further hot restarts.
//! - any other signal is forwarded (SIGUSR1 to every epoch, the rest to the current one).
//!
//! When the current epoch has exited, whatever is left gets SIGTERM, then SIGKILL, and is reaped;
//! the launcher exits with that epoch's status.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::certs::TlsPair;
use crate::control::{self, ControlApi, ControlRequest, DrainStatus, EpochStatus, ReloadStatus, ReloadingCert, Status};
use crate::drain::{self, DrainContext, DrainEnd, DrainSettings};
use crate::envoy;
use crate::launch::Launch;
use crate::metrics::Metrics;
use crate::process::{self, Exit, InitMode};
use crate::reload::{self, Preflight};
use crate::signals;
use crate::systemd::{self, Notifier};
use crate::watch::{self, WatchSpec};

/// Everything the supervisor reacts to.
#[derive(Debug)]
pub enum Event {
    Signal(i32),
    /// One poll of the drain: Envoy's open downstream connections, None when the admin failed.
    DrainPolled {
        connections: Option<u64>,
    },
    DrainEnded(DrainEnd),
    /// Watched files whose content changed (debounced).
    FilesChanged(Vec<PathBuf>),
    Preflight(Result<Preflight, String>),
    Validated(Result<(), String>),
    EpochReady {
        epoch: u32,
        result: Result<(), String>,
    },
    /// A draining epoch that a restart waits for did not exit when it should have.
    DrainingEpochOverdue(Pid),
    /// `envoy --mode validate` has run for the whole reload timeout.
    ValidatorOverdue(Pid),
    /// A request on the control API.
    Control(ControlRequest),
    /// The certificate or key of `--http` changed.
    HttpTlsChanged(Vec<PathBuf>),
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
}

/// Where the control API listens.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    pub socket: PathBuf,
    pub http: Option<String>,
    pub http_tls: Option<TlsPair>,
    pub http_token: Option<PathBuf>,
}

/// A reply to `POST /reload`: the new epoch, or the HTTP status and the reason.
type ReloadReply = oneshot::Sender<Result<u32, (u16, String)>>;

/// How long to wait for SIGKILLed processes to be reaped before giving up on them (a process in
/// uninterruptible sleep can outlive SIGKILL; the launcher must still exit).
const REAP_AFTER_KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// One Envoy process (or, for a plain command, the command itself as epoch 0).
#[derive(Debug)]
struct Epoch {
    number: u32,
    pid: Pid,
    started: Instant,
    started_at: SystemTime,
    /// Its admin answered LIVE as this epoch (for a plain command or without admin: from the start).
    live: bool,
    /// It was sent the stop signal: never twice, since a second SIGTERM during its shutdown finds
    /// Envoy's handler gone and kills it (status 143).
    stopped: bool,
}

impl Epoch {
    fn new(number: u32, pid: Pid, live: bool) -> Epoch {
        Epoch { number, pid, started: Instant::now(), started_at: SystemTime::now(), live, stopped: false }
    }
}

/// Where the launcher is in its life.
#[derive(Debug)]
enum Phase {
    Running,
    /// A stop was asked for; the drain task is talking to Envoy's admin.
    Draining {
        started: Instant,
        task: JoinHandle<()>,
        connections: Option<u64>,
    },
    /// SIGTERM was sent (or the stop signal, to a plain command); at `deadline`, SIGKILL, or after
    /// SIGKILL (`killed`), giving up on a process that not even SIGKILL ends (uninterruptible sleep).
    Stopping {
        deadline: Option<Instant>,
        killed: bool,
        /// What the epochs are sent, newest first (SIGTERM, or the user's signal without a drain).
        stop_signal: i32,
    },
}

/// Where the hot restart is.
#[derive(Debug)]
enum Restart {
    Idle,
    /// Certificate checks and the base id, off the runtime thread.
    Preflight {
        started: Instant,
    },
    /// `envoy --mode validate` runs as our child.
    Validating {
        started: Instant,
        pid: Pid,
        output: PathBuf,
        base_id: Option<u32>,
    },
    /// The previous epoch still drains: the new one waits for it, so that there are never three.
    /// (Ending it early is no option: Envoy's current epoch must tell it to terminate itself when
    /// the next one starts, and aborts when it cannot.)
    WaitingForDraining {
        started: Instant,
        oldest: Pid,
        base_id: Option<u32>,
    },
    /// Epoch `epoch` runs; the waiter polls its admin until it is LIVE.
    Starting {
        started: Instant,
        epoch: u32,
        pid: Pid,
        waiter: JoinHandle<()>,
    },
}

struct Supervisor {
    launch: Launch,
    settings: Settings,
    events: UnboundedSender<Event>,
    /// Live Envoy processes, oldest first.
    epochs: Vec<Epoch>,
    /// The number of the epoch that serves; its exit ends the launcher.
    current: u32,
    phase: Phase,
    restart: Restart,
    /// A trigger arrived while a restart was under way: one more follows it.
    restart_queued: bool,
    /// Why hot restarts are blocked, after a new epoch failed.
    degraded: Option<String>,
    metrics: Arc<Metrics>,
    systemd: Notifier,
    http_tls: Option<Arc<ReloadingCert>>,
    /// Callers of /shutdown, answered when the drain ends.
    shutdown_waiters: Vec<oneshot::Sender<bool>>,
    /// How the drain ended (true: drained), once it has.
    drained: Option<bool>,
    /// Callers of /reload waiting for the restart under way, and for the one queued after it.
    reload_waiters: Vec<ReloadReply>,
    queued_reload_waiters: Vec<ReloadReply>,
    last_reload: Option<ReloadStatus>,
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

    let (events_tx, mut events) = mpsc::unbounded_channel();
    if let Err(e) = signals::pump_into(events_tx.clone()) {
        tracing::error!("cannot install signal handlers: {e}");
        return 1;
    }
    let metrics = Arc::new(Metrics::new());
    let http_tls = match start_control(&settings, events_tx.clone(), metrics.clone()).await {
        Ok(http_tls) => http_tls,
        Err(e) => {
            tracing::error!("{e:#}");
            return 1;
        }
    };
    let argv = launch.epoch_argv(0, None);
    // A plain command gets the terminal as under tini; Envoy does not, so that Ctrl-C reaches the launcher.
    let pid = match process::spawn(&argv, !launch.is_envoy(), None) {
        Ok(pid) => pid,
        Err(e) => {
            tracing::error!("{e}");
            return e.status_code();
        }
    };
    tracing::info!(pid = pid.as_raw(), "started {}", shell_words(&argv));
    metrics.epochs_started.inc();
    metrics.live_epochs.set(1);
    if launch.is_envoy()
        && !settings.watch.is_empty()
        && let Err(e) = watch::start(settings.watch.clone(), events_tx.clone(), Event::FilesChanged)
    {
        tracing::warn!("cannot watch files for changes ({e}): hot restarts only on SIGHUP");
    }
    let admin = launch.envoy.as_ref().and_then(|e| e.admin.clone());
    let systemd = Notifier::from_env();
    systemd::spawn_watchdog(admin.clone());
    match &admin {
        // Ready once Envoy says it is LIVE, however long its initialisation (xDS, say) takes.
        Some(admin) => {
            systemd.status("Envoy epoch 0 is starting");
            tokio::spawn(reload::await_live(admin.clone(), 0, None, events_tx.clone()));
        }
        None => systemd.ready(&format!("{} is running", argv[0].to_string_lossy())),
    }

    let kill_timeout = settings.kill_timeout;
    let mut supervisor = Supervisor {
        launch,
        settings,
        events: events_tx,
        epochs: vec![Epoch::new(0, pid, admin.is_none())],
        current: 0,
        phase: Phase::Running,
        restart: Restart::Idle,
        restart_queued: false,
        degraded: None,
        metrics,
        systemd,
        http_tls,
        shutdown_waiters: Vec::new(),
        drained: None,
        reload_waiters: Vec::new(),
        queued_reload_waiters: Vec::new(),
        last_reload: None,
    };
    let exit = supervisor.supervise(&mut events).await;
    stop_leftovers(mode, pid, kill_timeout, &mut events).await;
    exit.status_code()
}

impl Supervisor {
    /// Handles events until the current epoch exits.
    async fn supervise(&mut self, events: &mut UnboundedReceiver<Event>) -> Exit {
        loop {
            // Children inherited across exec, or a child that exited before its SIGCHLD handler
            // ran, are found by this first pass; afterwards it runs on every SIGCHLD.
            if let Some(exit) = self.reap() {
                return exit;
            }
            loop {
                let deadline = match self.phase {
                    Phase::Stopping { deadline, .. } => deadline,
                    _ => None,
                };
                let event = tokio::select! {
                    event = events.recv() => event,
                    _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                        if let Some(exit) = self.on_stop_deadline() {
                            return exit;
                        }
                        continue;
                    }
                };
                let Some(event) = event else {
                    // The signal pump holds a sender for the life of the runtime.
                    tracing::error!("event channel closed while Envoy was running");
                    return Exit::Code(1);
                };
                if matches!(event, Event::Signal(libc::SIGCHLD)) {
                    break;
                }
                self.handle(event);
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Signal(sig @ (libc::SIGTERM | libc::SIGINT)) if self.launch.is_envoy() => {
                self.on_stop(&signal_name(sig), sig)
            }
            Event::Signal(libc::SIGHUP) if self.launch.is_envoy() => {
                if let Err((_, reason)) = self.request_restart("SIGHUP".into()) {
                    // systemd's notify-reload waits for RELOADING=1 then READY=1 after a SIGHUP.
                    self.systemd.reloading("reload refused");
                    self.systemd.ready(&format!("reload refused: {reason}"));
                }
            }
            Event::Signal(libc::SIGUSR1) => self.signal_epochs(libc::SIGUSR1),
            Event::Signal(sig) => self.signal_current(sig),
            Event::DrainPolled { connections: polled } => {
                if let Phase::Draining { connections, .. } = &mut self.phase {
                    *connections = polled;
                }
            }
            Event::DrainEnded(end) => {
                if matches!(self.phase, Phase::Draining { .. }) {
                    self.end_drain(end);
                    self.terminate(libc::SIGTERM);
                }
            }
            Event::FilesChanged(files) => {
                let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
                let _ = self.request_restart(format!("changed: {}", names.join(", ")));
            }
            Event::Control(request) => self.on_control(request),
            Event::HttpTlsChanged(files) => {
                if let Some(tls) = &self.http_tls {
                    match tls.reload() {
                        Ok(()) => tracing::info!("--http: new certificate in use (changed: {files:?})"),
                        Err(reason) => tracing::error!("--http: new certificate refused, the old one stays: {reason}"),
                    }
                }
            }
            Event::Preflight(result) => self.on_preflight(result),
            Event::Validated(result) => self.on_validated(result),
            Event::EpochReady { epoch, result } => self.on_epoch_ready(epoch, result),
            Event::ValidatorOverdue(pid) => {
                if matches!(self.restart, Restart::Validating { pid: validator, .. } if validator == pid) {
                    tracing::warn!(
                        "envoy --mode validate still running after {:?}: SIGKILL",
                        self.settings.reload_timeout
                    );
                    send(pid, libc::SIGKILL);
                }
            }
            Event::DrainingEpochOverdue(pid) => {
                if matches!(self.restart, Restart::WaitingForDraining { oldest, .. } if oldest == pid) {
                    self.restart_refused(&format!("the draining epoch (pid {pid}) outlived its parent shutdown time"));
                }
            }
        }
    }

    /// Reaps everything that exited; returns the current epoch's exit if it was among them.
    fn reap(&mut self) -> Option<Exit> {
        let mut current_exit = None;
        for (pid, exit) in process::reap_all().exits {
            if let Some(i) = self.epochs.iter().position(|e| e.pid == pid) {
                let epoch = self.epochs.remove(i);
                self.metrics.reaped("epoch");
                self.metrics.live_epochs.set(self.epochs.len() as i64);
                if let Some(exit) = self.on_epoch_exit(epoch, exit) {
                    current_exit = Some(exit);
                }
            } else if let Restart::Validating { pid: validator, output, .. } = &self.restart
                && *validator == pid
            {
                self.metrics.reaped("validator");
                tokio::spawn(reload::validation_verdict(exit, output.clone(), self.events.clone()));
            } else {
                self.metrics.reaped("orphan");
                tracing::debug!(pid = pid.as_raw(), "reaped an adopted orphan ({exit})");
            }
        }
        current_exit
    }

    /// An epoch exited. The current one ends the launcher; a starting one fails the restart; an
    /// old one has finished draining, as it should.
    fn on_epoch_exit(&mut self, epoch: Epoch, exit: Exit) -> Option<Exit> {
        let lived = epoch.started.elapsed();
        if epoch.number == self.current {
            let what = if self.launch.is_envoy() { format!("Envoy epoch {}", epoch.number) } else { "child".into() };
            tracing::info!(pid = epoch.pid.as_raw(), "{what} exited with {exit} after {lived:.1?}");
            if matches!(self.phase, Phase::Draining { .. }) {
                self.end_drain(DrainEnd::EnvoyExited);
            }
            return Some(exit);
        }
        if let Phase::Stopping { stop_signal, .. } = self.phase {
            // The newest epoch got the SIGTERM; if it died before telling its parent to terminate
            // (a SIGTERM before its handlers were installed does that), the parent is next.
            self.stop_newest(stop_signal);
        }
        match &self.restart {
            Restart::Starting { epoch: starting, waiter, .. } if *starting == epoch.number => {
                waiter.abort();
                self.restart_failed_after_start(epoch.number, format!("it exited with {exit} before it was LIVE"));
            }
            Restart::WaitingForDraining { oldest, base_id, .. } if *oldest == epoch.pid => {
                tracing::info!("epoch {} drained and exited with {exit}: the next one starts", epoch.number);
                let base_id = *base_id;
                self.start_next_epoch(base_id);
            }
            _ if exit == Exit::Code(0) => {
                tracing::info!(pid = epoch.pid.as_raw(), "epoch {} drained and exited after {lived:.1?}", epoch.number)
            }
            _ => {
                tracing::warn!(pid = epoch.pid.as_raw(), "epoch {} exited with {exit} after {lived:.1?}", epoch.number)
            }
        }
        None
    }

    fn on_stop(&mut self, trigger: &str, sig: i32) {
        match &self.phase {
            Phase::Running => {
                self.cancel_restart();
                match self.launch.envoy.as_ref().and_then(|e| e.admin.clone()) {
                    Some(admin) if !self.settings.drain.timeout.is_zero() => {
                        tracing::info!(
                            "{trigger}: draining Envoy through its admin {} (at most {:?})",
                            admin.address(),
                            self.settings.drain.timeout
                        );
                        let context = DrainContext {
                            older_epoch_alive: self.epochs.len() > 1,
                            degraded: self.degraded.is_some(),
                        };
                        let drain = drain::run(admin, self.settings.drain.clone(), context, self.events.clone());
                        self.phase =
                            Phase::Draining { started: Instant::now(), task: tokio::spawn(drain), connections: None };
                        self.systemd.stopping("draining Envoy");
                    }
                    _ => {
                        tracing::info!("{trigger}: passing SIGTERM on to Envoy (no drain)");
                        self.systemd.stopping("stopping Envoy (no drain)");
                        self.answer_shutdown_waiters(true);
                        self.terminate(sig);
                    }
                }
            }
            Phase::Draining { .. } => {
                self.end_drain(DrainEnd::SecondSignal);
                self.terminate(libc::SIGTERM);
            }
            Phase::Stopping { .. } => self.signal_newest(sig),
        }
    }

    /// Stops the drain task and logs the one line that tells how the drain went.
    fn end_drain(&mut self, end: DrainEnd) {
        if let Phase::Draining { started, task, connections } = &self.phase {
            task.abort();
            let open = connections.map_or_else(|| "unknown".to_string(), |n| n.to_string());
            let what = if end == DrainEnd::EnvoyExited { "open when Envoy exited" } else { "open at SIGTERM" };
            let took = started.elapsed();
            tracing::info!("drain ended: {end}, after {took:.2?}; downstream connections {what}: {open}");
            self.metrics.drains.get_or_create(&crate::metrics::ReasonLabel { reason: end.label().into() }).inc();
            self.metrics.drain_seconds.observe(took.as_secs_f64());
            self.metrics.connections_at_sigterm.set(connections.map_or(-1, |n| n as i64));
            self.systemd.status(&format!("drain ended: {end}"));
            self.answer_shutdown_waiters(matches!(end, DrainEnd::Threshold | DrainEnd::EnvoyExited));
        }
    }

    fn answer_shutdown_waiters(&mut self, drained: bool) {
        self.drained.get_or_insert(drained);
        for waiter in self.shutdown_waiters.drain(..) {
            let _ = waiter.send(drained);
        }
    }

    /// Sends `sig` to the newest epoch; for Envoy, SIGKILL follows after the kill timeout. For a
    /// plain command this is plain forwarding: it decides how long it takes.
    ///
    /// Only the newest: an Envoy that shuts down tells its parent epoch to terminate, and aborts
    /// when that parent is already gone; so the parent is left to it (and to `stop_leftovers`,
    /// should it outlive the newest).
    fn terminate(&mut self, sig: i32) {
        self.stop_newest(sig);
        let deadline = self.launch.is_envoy().then(|| Instant::now() + self.settings.kill_timeout);
        self.phase = Phase::Stopping { deadline, killed: false, stop_signal: sig };
    }

    /// Sends `sig` to the newest epoch that has not been sent it yet.
    fn stop_newest(&mut self, sig: i32) {
        if let Some(newest) = self.epochs.iter_mut().filter(|e| !e.stopped).max_by_key(|e| e.number) {
            newest.stopped = true;
            send(newest.pid, sig);
        }
    }

    /// SIGKILL when SIGTERM was not enough; the launcher's own exit (137) when SIGKILL was not either.
    fn on_stop_deadline(&mut self) -> Option<Exit> {
        if matches!(self.phase, Phase::Stopping { killed: true, .. }) {
            tracing::error!(
                "Envoy survived SIGKILL for {REAP_AFTER_KILL_TIMEOUT:?} (uninterruptible sleep?): exiting anyway"
            );
            return Some(Exit::Signal(libc::SIGKILL));
        }
        tracing::warn!("Envoy still running {:?} after SIGTERM: sending SIGKILL", self.settings.kill_timeout);
        self.signal_epochs(libc::SIGKILL);
        let stop_signal = libc::SIGKILL;
        self.phase =
            Phase::Stopping { deadline: Some(Instant::now() + REAP_AFTER_KILL_TIMEOUT), killed: true, stop_signal };
        None
    }

    fn signal_epochs(&self, sig: i32) {
        for epoch in &self.epochs {
            send(epoch.pid, sig);
        }
    }

    fn signal_newest(&self, sig: i32) {
        if let Some(newest) = self.epochs.iter().max_by_key(|e| e.number) {
            send(newest.pid, sig);
        }
    }

    fn signal_current(&self, sig: i32) {
        if let Some(epoch) = self.epochs.iter().find(|e| e.number == self.current) {
            send(epoch.pid, sig);
        }
    }

    // The hot restart, step by step.

    /// Starts a hot restart, or queues one behind the restart under way. Refused while shutting
    /// down or degraded, with the HTTP status and reason for the control API.
    fn request_restart(&mut self, trigger: String) -> Result<(), (u16, String)> {
        if !matches!(self.phase, Phase::Running) {
            tracing::info!("{trigger}: no hot restart while shutting down");
            return Err((409, "shutting down".into()));
        }
        if let Some(why) = &self.degraded {
            tracing::error!("{trigger}: cannot hot-restart: {why}");
            return Err((409, format!("cannot hot-restart: {why}")));
        }
        if !matches!(self.restart, Restart::Idle) {
            if !self.restart_queued {
                tracing::info!("{trigger}: a hot restart is under way; one more will follow it");
            }
            self.restart_queued = true;
            return Ok(());
        }
        let Some(envoy) = &self.launch.envoy else { return Err((409, "not Envoy".into())) };
        tracing::info!("{trigger}: validating for a hot restart to epoch {}", self.next_epoch());
        self.systemd.reloading(&format!("hot restart to epoch {}", self.next_epoch()));
        let command = self.launch.command.clone();
        let base_id_file = envoy.base_id_file.clone();
        let expiry_warn = self.settings.cert_expiry_warn;
        let events = self.events.clone();
        tokio::task::spawn_blocking(move || {
            let result = reload::preflight(&command, base_id_file.as_deref(), expiry_warn);
            let _ = events.send(Event::Preflight(result));
        });
        self.restart = Restart::Preflight { started: Instant::now() };
        Ok(())
    }

    fn on_preflight(&mut self, result: Result<Preflight, String>) {
        let Restart::Preflight { started } = self.restart else { return };
        let preflight = match result {
            Ok(preflight) => preflight,
            Err(reason) => return self.restart_refused(&reason),
        };
        let Some(envoy) = &self.launch.envoy else { return };
        let argv = envoy::validate_command(&self.launch.command);
        let output_path = envoy.runtime_dir.join("envoy-validate.log");
        let output = match std::fs::File::create(&output_path) {
            Ok(file) => file,
            Err(e) => return self.restart_refused(&format!("cannot write {}: {e}", output_path.display())),
        };
        match process::spawn(&argv, false, Some(output)) {
            Ok(pid) => {
                tracing::debug!("validating: {}", shell_words(&argv));
                // A validator that hangs must not hold the restart (and its callers) for ever.
                let (events, timeout) = (self.events.clone(), self.settings.reload_timeout);
                tokio::spawn(async move {
                    tokio::time::sleep(timeout).await;
                    let _ = events.send(Event::ValidatorOverdue(pid));
                });
                self.restart = Restart::Validating { started, pid, output: output_path, base_id: preflight.base_id };
            }
            Err(e) => self.restart_refused(&e.to_string()),
        }
    }

    fn on_validated(&mut self, result: Result<(), String>) {
        let Restart::Validating { base_id, .. } = self.restart else { return };
        match result {
            Ok(()) => self.start_next_epoch(base_id),
            Err(reason) => self.restart_refused(&reason),
        }
    }

    /// Starts epoch N+1, once no draining epoch is left besides the current one: Envoy keeps at
    /// most two processes, and so does the launcher.
    fn start_next_epoch(&mut self, base_id: Option<u32>) {
        let started = self.restart_started().unwrap_or_else(Instant::now);
        let Some(envoy) = &self.launch.envoy else { return };
        if let Some(oldest) = self.epochs.iter().find(|e| e.number != self.current) {
            // The current epoch tells its parent to terminate parent_shutdown_time after it started.
            let current_age = self.epochs.iter().find(|e| e.number == self.current).map(|e| e.started.elapsed());
            let wait =
                envoy.parent_shutdown_time.saturating_sub(current_age.unwrap_or_default()) + self.settings.kill_timeout;
            tracing::info!(
                "epoch {} is still draining (it exits within its parent shutdown time): epoch {} starts after it",
                oldest.number,
                self.next_epoch()
            );
            let (pid, events) = (oldest.pid, self.events.clone());
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let _ = events.send(Event::DrainingEpochOverdue(pid));
            });
            self.restart = Restart::WaitingForDraining { started, oldest: pid, base_id };
            return;
        }
        let epoch = self.next_epoch();
        let argv = self.launch.epoch_argv(epoch, base_id);
        let pid = match process::spawn(&argv, false, None) {
            Ok(pid) => pid,
            Err(e) => return self.restart_refused(&e.to_string()),
        };
        tracing::info!(pid = pid.as_raw(), "hot restart: started epoch {epoch}: {}", shell_words(&argv));
        self.epochs.push(Epoch::new(epoch, pid, false));
        self.metrics.epochs_started.inc();
        self.metrics.live_epochs.set(self.epochs.len() as i64);
        let waiter = match self.launch.envoy.as_ref().and_then(|e| e.admin.clone()) {
            Some(admin) => {
                tokio::spawn(reload::await_live(admin, epoch, Some(self.settings.reload_timeout), self.events.clone()))
            }
            None => {
                // Without an admin API there is no way to see the new epoch LIVE: trust its start.
                let _ = self.events.send(Event::EpochReady { epoch, result: Ok(()) });
                tokio::spawn(async {})
            }
        };
        self.restart = Restart::Starting { started, epoch, pid, waiter };
    }

    fn on_epoch_ready(&mut self, epoch: u32, result: Result<(), String>) {
        if epoch == self.current
            && result.is_ok()
            && let Some(serving) = self.epochs.iter_mut().find(|e| e.number == epoch && !e.live)
        {
            serving.live = true;
            tracing::info!(pid = serving.pid.as_raw(), "Envoy epoch {epoch} is LIVE");
            self.systemd.ready(&format!("serving: epoch {epoch} is LIVE"));
            return;
        }
        let Restart::Starting { started, epoch: starting, pid, .. } = self.restart else { return };
        if starting != epoch {
            return;
        }
        match result {
            Ok(()) => {
                tracing::info!(
                    pid = pid.as_raw(),
                    "hot restart done: epoch {epoch} is LIVE, {:.2?} after the trigger; epoch {} drains and exits on its own",
                    started.elapsed(),
                    self.current
                );
                self.current = epoch;
                if let Some(new) = self.epochs.iter_mut().find(|e| e.number == epoch) {
                    new.live = true;
                }
                self.metrics.current_epoch.set(i64::from(epoch));
                self.restart = Restart::Idle;
                self.reload_finished("success", Ok(epoch), format!("epoch {epoch} is LIVE"));
                self.run_queued_restart();
            }
            Err(reason) => {
                // Never SIGTERM a new epoch: Envoy's shutdown would take its parent, the serving
                // epoch, down with it. SIGKILL ends it alone.
                send(pid, libc::SIGKILL);
                self.restart_failed_after_start(epoch, reason);
            }
        }
    }

    /// A restart that failed before any process was started: nothing changed, the next may succeed.
    fn restart_refused(&mut self, reason: &str) {
        tracing::error!("hot restart refused, epoch {} keeps serving: {reason}", self.current);
        self.restart = Restart::Idle;
        self.reload_finished("refused", Err((422, reason.to_string())), format!("reload refused: {reason}"));
        self.run_queued_restart();
    }

    /// Records how a hot restart ended, answers its /reload callers and tells systemd.
    fn reload_finished(&mut self, result: &'static str, reply: Result<u32, (u16, String)>, status: String) {
        self.metrics.reload(result);
        let detail = match &reply {
            Ok(epoch) => format!("epoch {epoch}"),
            Err((_, reason)) => reason.clone(),
        };
        let at_unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.last_reload = Some(ReloadStatus { result, detail, at_unix });
        for waiter in self.reload_waiters.drain(..) {
            let _ = waiter.send(reply.clone());
        }
        if !self.restart_queued {
            self.systemd.ready(&status);
        }
    }

    /// A new epoch failed after it started: the serving epoch is never signalled, but Envoy's hot
    /// restart is now blocked (its shared memory says a child is still initializing) and the
    /// serving epoch may have lost its admin API. Until the next cold start the launcher refuses
    /// hot restarts and drains by time on shutdown.
    fn restart_failed_after_start(&mut self, epoch: u32, reason: String) {
        let why = format!(
            "epoch {epoch} failed ({reason}); Envoy's hot restart is blocked until a cold start \
             (restart sesame) and epoch {}'s admin API may be gone",
            self.current
        );
        tracing::error!("degraded: {why}; epoch {} keeps serving", self.current);
        self.degraded = Some(why.clone());
        self.metrics.degraded.set(1);
        self.restart = Restart::Idle;
        self.restart_queued = false;
        self.reload_finished("failed", Err((500, why.clone())), format!("degraded: {why}"));
        for waiter in self.queued_reload_waiters.drain(..) {
            let _ = waiter.send(Err((409, format!("cannot hot-restart: {why}"))));
        }
    }

    fn run_queued_restart(&mut self) {
        if std::mem::take(&mut self.restart_queued) {
            let waiters = std::mem::take(&mut self.queued_reload_waiters);
            match self.request_restart("queued trigger".into()) {
                Ok(()) => self.reload_waiters.extend(waiters),
                Err(reply) => waiters.into_iter().for_each(|w| drop(w.send(Err(reply.clone())))),
            }
        }
    }

    fn cancel_restart(&mut self) {
        match std::mem::replace(&mut self.restart, Restart::Idle) {
            Restart::Validating { pid, .. } => send(pid, libc::SIGKILL),
            Restart::Starting { waiter, .. } => waiter.abort(),
            _ => {}
        }
        self.restart_queued = false;
        for waiter in self.reload_waiters.drain(..).chain(self.queued_reload_waiters.drain(..)) {
            let _ = waiter.send(Err((409, "shutting down".into())));
        }
    }

    // The control API.

    fn on_control(&mut self, request: ControlRequest) {
        match request {
            ControlRequest::Status(reply) => {
                let _ = reply.send(self.status());
            }
            ControlRequest::Shutdown(reply) => {
                if let Some(drained) = self.drained {
                    let _ = reply.send(drained);
                    return;
                }
                self.shutdown_waiters.push(reply);
                if matches!(self.phase, Phase::Running) {
                    if self.launch.is_envoy() {
                        self.on_stop("control API /shutdown", libc::SIGTERM);
                    } else {
                        self.answer_shutdown_waiters(true);
                        self.terminate(libc::SIGTERM);
                    }
                }
            }
            ControlRequest::Reload(reply) => {
                let under_way = !matches!(self.restart, Restart::Idle);
                match self.request_restart("control API".into()) {
                    Ok(()) if under_way => self.queued_reload_waiters.push(reply),
                    Ok(()) => self.reload_waiters.push(reply),
                    Err(refused) => drop(reply.send(Err(refused))),
                }
            }
        }
    }

    fn status(&self) -> Status {
        let current_live = self.epochs.iter().any(|e| e.number == self.current && e.live);
        let state = match self.phase {
            Phase::Running if current_live => "running",
            Phase::Running => "starting",
            Phase::Draining { .. } => "draining",
            Phase::Stopping { .. } => "stopping",
        };
        let since_epoch = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Status {
            state,
            ready: matches!(self.phase, Phase::Running) && current_live,
            degraded: self.degraded.clone(),
            current_epoch: self.current,
            epochs: self
                .epochs
                .iter()
                .map(|e| EpochStatus {
                    epoch: e.number,
                    pid: e.pid.as_raw(),
                    started_unix: since_epoch(e.started_at),
                    live: e.live,
                })
                .collect(),
            restart: match self.restart {
                Restart::Idle => None,
                Restart::Preflight { .. } => Some("checking certificates"),
                Restart::Validating { .. } => Some("validating"),
                Restart::WaitingForDraining { .. } => Some("waiting for the draining epoch to exit"),
                Restart::Starting { .. } => Some("starting the new epoch"),
            },
            last_reload: self.last_reload.clone(),
            drain: match &self.phase {
                Phase::Draining { started, connections, .. } => {
                    Some(DrainStatus { elapsed_seconds: started.elapsed().as_secs_f64(), connections: *connections })
                }
                _ => None,
            },
        }
    }

    fn restart_started(&self) -> Option<Instant> {
        match self.restart {
            Restart::Idle => None,
            Restart::Preflight { started }
            | Restart::Validating { started, .. }
            | Restart::WaitingForDraining { started, .. }
            | Restart::Starting { started, .. } => Some(started),
        }
    }

    fn next_epoch(&self) -> u32 {
        self.epochs.iter().map(|e| e.number).max().unwrap_or(self.current) + 1
    }
}

/// Binds the control socket (and `--http`) and serves them; returns the `--http` certificate, which
/// the supervisor swaps when its files change.
async fn start_control(
    settings: &Settings,
    events: UnboundedSender<Event>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Option<Arc<ReloadingCert>>> {
    use anyhow::Context;
    let control = &settings.control;
    let token = match &control.http_token {
        Some(file) => Some(
            std::fs::read_to_string(file)
                .with_context(|| format!("cannot read --http-token {}", file.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let api = ControlApi::new(events.clone(), metrics, token.clone());
    let listener = control::bind_unix(&control.socket)?;
    tracing::info!("control API on unix:{}", control.socket.display());
    tokio::spawn(api.clone().serve_unix(listener));
    let Some(address) = &control.http else { return Ok(None) };
    let listener =
        tokio::net::TcpListener::bind(address).await.with_context(|| format!("cannot bind --http {address}"))?;
    let local = listener.local_addr().context("--http address")?;
    let tls = match &control.http_tls {
        Some(pair) => Some(ReloadingCert::load(pair.clone()).map_err(|e| anyhow::anyhow!("--http-tls: {e}"))?),
        None => None,
    };
    if tls.is_none() && !local.ip().is_loopback() {
        tracing::warn!("--http {local} is not loopback and has no TLS: the control API is readable by the network");
    }
    if token.is_none() && !local.ip().is_loopback() {
        tracing::warn!("--http {local} has no --http-token: anyone who reaches it can shut Envoy down");
    }
    let acceptor = match &tls {
        Some(cert) => {
            let spec = WatchSpec { envoy_command: None, extra: cert.files(), debounce: settings.watch.debounce };
            watch::start(spec, events, Event::HttpTlsChanged).context("cannot watch the --http certificate")?;
            Some(cert.acceptor().map_err(|e| anyhow::anyhow!("--http-tls: {e}"))?)
        }
        None => None,
    };
    tracing::info!("control API on {}://{local}", if acceptor.is_some() { "https" } else { "http" });
    tokio::spawn(api.serve_tcp(listener, acceptor));
    Ok(tls)
}

fn send(pid: Pid, sig: i32) {
    tracing::debug!("sending {} to {pid}", signal_name(sig));
    if let Err(e) = process::send(pid, sig) {
        tracing::warn!("cannot send {} to {pid}: {e}", signal_name(sig));
    }
}

fn signal_name(sig: i32) -> String {
    Signal::try_from(sig).map_or_else(|_| format!("signal {sig}"), |s| s.as_str().to_string())
}

fn shell_words(argv: &[std::ffi::OsString]) -> String {
    argv.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

/// SIGTERM to every process left behind, SIGKILL after `kill_timeout`, and reap them all: the
/// launcher leaves nothing for the kernel to clean up. A SIGTERM or SIGINT meanwhile skips the wait.
async fn stop_leftovers(mode: InitMode, child: Pid, kill_timeout: Duration, events: &mut UnboundedReceiver<Event>) {
    if reap_until_none() {
        return;
    }
    tracing::info!("sending SIGTERM to the processes left behind; SIGKILL in {kill_timeout:?}");
    process::signal_descendants(mode, Signal::SIGTERM, Some(child));
    let deadline = tokio::time::sleep(kill_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => {
                tracing::warn!("processes still running after {kill_timeout:?}: sending SIGKILL");
                break;
            }
            event = events.recv() => match event {
                Some(Event::Signal(libc::SIGCHLD)) => if reap_until_none() { return },
                Some(Event::Signal(sig @ (libc::SIGTERM | libc::SIGINT))) => {
                    tracing::warn!("{} while waiting for the processes left behind: sending SIGKILL", signal_name(sig));
                    break;
                }
                Some(_) => {}
                None => break,
            }
        }
    }
    // Repeat SIGKILL on every wake-up: a process may have forked between the scan and the kill.
    let give_up = tokio::time::sleep(REAP_AFTER_KILL_TIMEOUT);
    tokio::pin!(give_up);
    loop {
        process::signal_descendants(mode, Signal::SIGKILL, Some(child));
        tokio::select! {
            _ = &mut give_up => {
                tracing::error!("processes left behind survived SIGKILL for {REAP_AFTER_KILL_TIMEOUT:?}; exiting anyway");
                return;
            }
            _ = events.recv() => {}
        }
        if reap_until_none() {
            return;
        }
    }
}

/// Reaps what has exited; true when no child is left.
fn reap_until_none() -> bool {
    let reaped = process::reap_all();
    for (pid, exit) in &reaped.exits {
        tracing::debug!(pid = pid.as_raw(), "reaped an adopted orphan ({exit})");
    }
    reaped.no_children
}
