//! sesame: a launcher for Envoy. See README.md for the user's view and DESIGN.md for the contract.

mod admin;
mod bootstrap;
mod certs;
mod cli;
mod demo;
mod drain;
mod envoy;
mod http;
mod launch;
mod logging;
mod process;
mod reload;
mod signals;
mod supervisor;
mod watch;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() {
    signals::hold();
    let cli = Cli::parse();
    logging::init(&cli.log);
    let code = match cli.command {
        Command::Run(options) => run(&options),
    };
    std::process::exit(code);
}

fn run(options: &cli::RunOptions) -> i32 {
    let launch = match launch::plan(options) {
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
    };
    runtime.block_on(supervisor::run(launch, settings))
}
