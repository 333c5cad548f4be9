//! sesame: a launcher for Envoy. README.md is the user's view; docs/ARCHITECTURE.md the design.
//!
//! Module map (dependencies point down; no worker names the supervisor):
//! - `main`, `cli`, `lock`, `launch`: parse the command line, lock the runtime directory, decide
//!   what runs; `client`: the clients.
//! - `supervisor`: the one owner of state and its event loop; `checks` (the one checks machine),
//!   `file_changes` (checks while the files settle), `reload` and `reload_outcome` (a reload's steps
//!   and ends), `health` (whether hot restarts work), `timers`, `shutdown`; `handover` and
//!   `recovery`: the cold handover to a new Envoy family, and when it runs by itself.
//! - workers, which return or publish results: `signals` (the signal table), `drain`, `checks`
//!   (preflight, verdicts, the input's hashes), `watch`, `control` (the control API), `systemd`.
//! - Envoy: `envoy` (its command line), `bootstrap` (its config), `admin` (its admin API and the
//!   LIVE poll), `ports` (whether a new family can bind beside the serving one).
//! - leaves: `process` (spawn, signal, reap), `http`, `certs`, `outcome` (how a reload ends),
//!   `status`, `metrics`, `demo`, `files`, `clock`, `logging`, `inotify` (directory watches),
//!   `memory` (the pages an idle launcher gives back), `cpu_limit` (the CPU quota, for Envoy's
//!   worker count), `user` (`--envoy-user`: the ids a child takes, and what that user can read).

mod admin;
mod bootstrap;
mod certs;
mod checks;
mod cli;
mod client;
mod clock;
mod control;
mod cpu_limit;
mod demo;
mod drain;
mod envoy;
mod files;
mod health;
mod http;
mod inotify;
mod launch;
mod lock;
mod logging;
mod memory;
mod metrics;
mod outcome;
mod ports;
mod process;
mod sds;
mod signals;
mod status;
mod supervisor;
mod systemd;
mod user;
mod watch;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() {
    memory::fix_heap_thresholds();
    signals::hold();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print and exit 0; a usage error prints what is wrong.
            let _ = e.print();
            std::process::exit(usage_error_status(&e));
        }
    };
    logging::init(&cli.log);
    let code = match cli.command {
        Command::Run(options) => run(&options),
        Command::Shutdown { location, wait_timeout } => client::shutdown(&location, wait_timeout),
        Command::Reload { location, cold, wait_timeout } => client::reload(&location, cold, wait_timeout),
        Command::Status { location, json } => client::status(&location, json),
    };
    std::process::exit(code);
}

/// A usage error of `sesame run` is "could not start" (1, as tini); the clients keep clap's 2,
/// which they also use for "could not ask".
fn usage_error_status(error: &clap::Error) -> i32 {
    if !error.use_stderr() {
        return 0;
    }
    let subcommand = std::env::args().skip(1).find(|a| ["run", "status", "reload", "shutdown"].contains(&a.as_str()));
    if subcommand.as_deref() == Some("run") { 1 } else { 2 }
}

fn run(options: &cli::RunOptions) -> i32 {
    // Before anything is written into the runtime directory, and held until the launcher exits.
    let _lock = match lock::lock_runtime_dir(&options.runtime_dir()) {
        Ok(lock) => lock,
        Err(e) => {
            tracing::error!("{e:#}");
            return 1;
        }
    };
    let launch = match memory::apart(|| launch::plan(options)) {
        Ok(launch) => launch,
        Err(e) => {
            tracing::error!("{e:#}");
            return 1;
        }
    };
    // One current-thread runtime on the main thread: children are forked from this thread, which
    // lives as long as the launcher (Envoy's PR_SET_PDEATHSIG fires when the forking thread exits).
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return 1;
        }
    };
    let watch = watch::WatchSpec {
        envoy_command: (!options.reload.no_auto_watch).then(|| launch.command.clone()),
        extra: options.reload.watch.clone(),
        debounce: options.reload.reload_debounce,
        debounce_max: options.reload.reload_debounce_max,
    };
    let mut drain = options.drain.settings();
    if let Some(envoy) = &launch.envoy {
        drain.counted = envoy.drained_listeners.clone();
    }
    let settings = supervisor::Settings {
        kill_timeout: options.kill_timeout,
        drain,
        reload_timeout: options.reload.reload_timeout,
        cert_expiry_warn: options.reload.cert_expiry_warn,
        watch,
        control: control::ControlSettings {
            socket: options.location.control_socket(),
            runtime_dir: options.runtime_dir(),
            http: options.http.clone(),
            http_tls: options
                .http_tls_cert
                .clone()
                .zip(options.http_tls_key.clone())
                .map(|(cert, key)| certs::TlsPair { cert, key, key_password: false }),
            http_token: options.http_token.clone(),
            debounce: options.reload.reload_debounce,
        },
        recover: supervisor::RecoverSettings {
            enabled: !options.reload.no_recover,
            backoff: options.reload.recover_backoff,
            backoff_max: options.reload.recover_backoff_max,
            migrate_queued_connections: !options.reload.no_tcp_migrate_req,
        },
    };
    runtime.block_on(supervisor::run(launch, settings))
}
