//! The supervisor driven without processes: a fake process layer records what would be spawned and
//! signalled and lets a test decide who exits, and tokio's paused time runs the deadlines. The
//! admin API is a socket nobody listens on: a LIVE poll never succeeds by itself (the test says
//! when an epoch is LIVE) and a drain finds the admin unreachable.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::rc::Rc;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio::sync::oneshot;

use super::reload_state::Step;
use super::*;
use crate::admin::{AdminAddress, Listeners};
use crate::envoy::EnvoyFlags;
use crate::http::Endpoint;
use crate::launch::EnvoyLaunch;
use crate::outcome::{Refusal, ReloadResult};
use crate::process::{Reaped, SpawnError};

mod file_changes;
mod handover;
mod in_place;
mod reload;
mod shutdown;

const KILL_TIMEOUT: Duration = Duration::from_secs(10);
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);
const PARENT_SHUTDOWN: Duration = Duration::from_secs(45);
const RECOVER_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Default)]
struct World {
    next_pid: i32,
    spawned: Vec<(Pid, Vec<String>)>,
    signals: Vec<(Pid, i32)>,
    descendants: Vec<Signal>,
    alive: BTreeSet<i32>,
    exited: Vec<(Pid, Exit)>,
    stopped: Vec<(Pid, i32)>,
    job_control: Vec<&'static str>,
}

#[derive(Clone, Default)]
struct Fake(Rc<RefCell<World>>);

impl Processes for Fake {
    fn spawn(&mut self, argv: &[OsString], _: bool, _: Option<std::fs::File>) -> Result<Pid, SpawnError> {
        let mut world = self.0.borrow_mut();
        world.next_pid += 1;
        let pid = Pid::from_raw(100 + world.next_pid);
        world.spawned.push((pid, argv.iter().map(|a| a.to_string_lossy().into_owned()).collect()));
        world.alive.insert(pid.as_raw());
        Ok(pid)
    }

    fn signal(&mut self, pid: Pid, sig: i32) {
        self.0.borrow_mut().signals.push((pid, sig));
    }

    fn signal_group(&mut self, leader: Pid, sig: i32) {
        self.signal(leader, sig);
    }

    fn reap(&mut self) -> Reaped {
        let mut world = self.0.borrow_mut();
        let (exits, stopped) = (std::mem::take(&mut world.exited), std::mem::take(&mut world.stopped));
        Reaped { exits, stopped, no_children: world.alive.is_empty() }
    }

    fn suspend(&mut self) {
        self.0.borrow_mut().job_control.push("suspend");
    }

    fn resume(&mut self) {
        self.0.borrow_mut().job_control.push("resume");
    }

    fn signal_descendants(&mut self, sig: Signal) {
        let mut world = self.0.borrow_mut();
        world.descendants.push(sig);
        if sig == Signal::SIGKILL {
            world.alive.clear();
        }
    }
}

impl Fake {
    fn spawned(&self) -> Vec<(Pid, Vec<String>)> {
        self.0.borrow().spawned.clone()
    }

    /// The pid of the last process whose command line holds `word`.
    fn last_with(&self, word: &str) -> Pid {
        let spawned = self.spawned();
        let found = spawned.iter().rev().find(|(_, argv)| argv.iter().any(|a| a == word));
        found.unwrap_or_else(|| panic!("nothing spawned with {word}: {spawned:?}")).0
    }

    fn signals(&self) -> Vec<(Pid, i32)> {
        self.0.borrow().signals.clone()
    }
}

/// The preflight of a run of the checks reports.
fn is_preflight(event: &Event) -> bool {
    matches!(event, Event::Checked { report: checks::CheckReport::Preflight(..), .. })
}

/// The validator's verdict is read.
fn is_verdict(event: &Event) -> bool {
    matches!(event, Event::Checked { report: checks::CheckReport::Validated(_), .. })
}

pub(super) struct Harness {
    sup: Supervisor<Fake>,
    events: UnboundedReceiver<Event>,
    world: Fake,
    dir: tempfile::TempDir,
}

fn launch(dir: &std::path::Path, envoy: bool) -> Launch {
    let bootstrap = dir.join("envoy.yaml");
    std::fs::write(&bootstrap, "static_resources: {}\n").expect("bootstrap");
    std::fs::write(dir.join("envoy-base-id"), "7\n").expect("base id");
    // A file of its own, so that a test can upgrade it (sesame knows a binary by its inode and size).
    let binary = dir.join("envoy");
    std::fs::write(&binary, "the serving binary\n").expect("binary");
    let command: Vec<OsString> = vec![binary.into(), "-c".into(), bootstrap.into()];
    if !envoy {
        return Launch { command: vec!["sleep".into(), "1000".into()], envoy: None, user: None };
    }
    let flags =
        EnvoyFlags { drain_time_s: 30, drain_strategy: "immediate", parent_shutdown_time_s: 45, concurrency: None };
    let envoy = EnvoyLaunch {
        admin: Some(AdminAddress::At(Endpoint::Unix(dir.join("nobody-listens.sock")))),
        admin_override: true,
        base_id_file: Some(dir.join("envoy-base-id")),
        flags,
        parent_shutdown_time: PARENT_SHUTDOWN,
        runtime_dir: dir.to_path_buf(),
        envoy_dir: dir.to_path_buf(),
        drained_listeners: Listeners::All,
        stats_flush_interval: Duration::from_secs(5),
        bootstrap_files: None,
        sds: None,
    };
    Launch { command, envoy: Some(envoy), user: None }
}

fn settings(dir: &std::path::Path) -> Settings {
    Settings {
        kill_timeout: KILL_TIMEOUT,
        drain: DrainSettings { min: Duration::ZERO, ..crate::drain::tests::settings() },
        reload_timeout: RELOAD_TIMEOUT,
        cert_expiry_warn: Duration::from_secs(86_400),
        watch: WatchSpec {
            envoy_command: None,
            extra: vec![],
            debounce: Duration::from_millis(500),
            debounce_max: Duration::from_secs(5),
        },
        control: ControlSettings {
            socket: dir.join("control.sock"),
            runtime_dir: dir.to_path_buf(),
            http: None,
            http_tls: None,
            http_token: None,
            debounce: Duration::from_millis(500),
        },
        recover: RecoverSettings {
            enabled: true,
            backoff: RECOVER_BACKOFF,
            backoff_max: Duration::from_secs(8),
            migrate_queued_connections: false,
        },
    }
}

impl Harness {
    fn start(envoy: bool) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let world = Fake::default();
        let (tx, events) = mpsc::unbounded_channel();
        let sup = Supervisor::start(
            launch(dir.path(), envoy),
            settings(dir.path()),
            world.clone(),
            tx,
            Arc::new(Metrics::new()),
            Notifier::from_env(),
        )
        .unwrap_or_else(|code| panic!("start failed with {code}"));
        Harness { sup, events, world, dir }
    }

    /// Envoy epoch 0, LIVE.
    fn serving() -> Harness {
        let mut h = Harness::start(true);
        assert_eq!(h.live(0), None);
        assert!(h.sup.status().ready);
        h
    }

    /// Epoch `epoch` answers LIVE, as its LIVE poll would report it.
    fn live(&mut self, epoch: u32) -> Option<Exit> {
        let poll = match self.sup.reload.step() {
            Some(Step::Starting { epoch: starting, live_poll, .. }) if *starting == epoch => *live_poll,
            _ => 0,
        };
        let answered = Endpoint::Unix(self.dir.path().join("nobody-listens.sock"));
        self.sup.handle(Event::EpochLive { epoch, poll, result: Ok(answered) })
    }

    fn pid_of(&self, epoch: u32) -> Pid {
        self.sup.epochs.find(epoch).unwrap_or_else(|| panic!("no epoch {epoch}")).pid
    }

    /// `pid` exits with `exit`, and SIGCHLD says so.
    fn exit(&mut self, pid: Pid, exit: Exit) -> Option<Exit> {
        {
            let mut world = self.world.0.borrow_mut();
            world.alive.remove(&pid.as_raw());
            world.exited.push((pid, exit));
        }
        self.sup.handle(Event::Signal(libc::SIGCHLD))
    }

    fn signal(&mut self, sig: i32) -> Option<Exit> {
        self.sup.handle(Event::Signal(sig))
    }

    /// Handles the events as they come (paused time runs the timers) until one matches `what`,
    /// which is handled too; returns what handling it returned.
    async fn until(&mut self, what: &str, matches: impl Fn(&Event) -> bool) -> Option<Exit> {
        loop {
            let event = tokio::time::timeout(Duration::from_secs(3600), self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("no event for an hour while waiting for {what}"))
                .expect("channel open");
            let done = matches(&event);
            let exit = self.sup.handle(event);
            if done {
                return exit;
            }
            assert!(exit.is_none(), "the launcher ended ({exit:?}) while waiting for {what}");
        }
    }

    /// Handles the events as they come until `holds` holds.
    async fn until_state(&mut self, what: &str, holds: impl Fn(&Supervisor<Fake>) -> bool) {
        while !holds(&self.sup) {
            self.until(what, |_| true).await;
        }
    }

    /// A reload through to `Starting`: preflight and validator pass; returns the new epoch's pid.
    /// The reload under way passes its preflight and its validator.
    async fn validator_passes(&mut self) {
        self.until("the preflight", is_preflight).await;
        let validator = self.world.last_with("validate");
        assert_eq!(self.sup.status().reload, Some("validating"));
        self.exit(validator, Exit::Code(0));
        self.until("the verdict", is_verdict).await;
    }

    /// The reload's validator, spawned after a step that follows the preflight, passes.
    async fn validator_passes_after_preflight(&mut self) {
        let validator = loop {
            let spawned = self.world.spawned();
            if let Some((pid, _)) = spawned.iter().rev().find(|(_, argv)| argv.iter().any(|a| a == "validate")) {
                break *pid;
            }
            self.until("the validator", |_| true).await;
        };
        self.exit(validator, Exit::Code(0));
        self.until("the verdict", is_verdict).await;
    }

    async fn validated(&mut self) -> Pid {
        self.validator_passes().await;
        let Some(Step::Starting { pid, .. }) = self.sup.reload.step() else {
            panic!("not starting: {:?}", self.sup.reload.step())
        };
        *pid
    }

    async fn validated_after_sighup(&mut self) -> Pid {
        self.signal(libc::SIGHUP);
        self.validated().await
    }

    fn reload_request(&mut self) -> oneshot::Receiver<Result<u32, Refusal>> {
        let (tx, rx) = oneshot::channel();
        self.sup.handle(Event::Control(ControlRequest::Reload { reply: tx, cold: false }));
        rx
    }

    fn shutdown_request(&mut self) -> oneshot::Receiver<bool> {
        let (tx, rx) = oneshot::channel();
        self.sup.handle(Event::Control(ControlRequest::Shutdown(tx)));
        rx
    }
}
