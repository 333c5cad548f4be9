//! Command line: every option also reads `SESAME_<NAME>` from the environment, because containers
//! are configured by environment.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "sesame",
    version,
    about = "A launcher for Envoy: a correct init, graceful drains and validated hot restarts"
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogOptions,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start ENVOY_COMMAND (or the embedded demo) and supervise it as its init.
    Run(RunOptions),
}

#[derive(Debug, Args)]
pub struct LogOptions {
    /// Log filter when RUST_LOG is not set: error, warn, info, debug, trace, or tracing directives.
    #[arg(long, global = true, env = "SESAME_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log line format.
    #[arg(long, global = true, env = "SESAME_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Args)]
pub struct RunOptions {
    /// The Envoy binary: run when no command is given, and how an Envoy command is recognised.
    #[arg(long, env = "SESAME_ENVOY_BIN", default_value = "envoy")]
    pub envoy_bin: PathBuf,

    /// Directory for the demo's files and sockets [default: /run/sesame as root, else $XDG_RUNTIME_DIR/sesame].
    #[arg(long, env = "SESAME_RUNTIME_DIR")]
    pub runtime_dir: Option<PathBuf>,

    /// After the command exits: how long the processes it left get between SIGTERM and SIGKILL.
    #[arg(long, env = "SESAME_KILL_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub kill_timeout: Duration,

    /// HTTP port of the embedded demo bootstrap.
    #[arg(long, env = "SESAME_DEMO_HTTP_PORT", default_value_t = 8080)]
    pub demo_http_port: u16,

    /// HTTPS port of the embedded demo bootstrap.
    #[arg(long, env = "SESAME_DEMO_HTTPS_PORT", default_value_t = 8443)]
    pub demo_https_port: u16,

    /// The command to supervise; without one, Envoy runs on the embedded demo bootstrap.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

impl RunOptions {
    pub fn runtime_dir(&self) -> PathBuf {
        self.runtime_dir.clone().unwrap_or_else(default_runtime_dir)
    }
}

fn default_runtime_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/sesame");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("sesame"),
        _ => std::env::temp_dir().join(format!("sesame-{}", nix::unistd::geteuid())),
    }
}

/// Accepts humantime durations ("1.5s", "100ms", "2m") and bare numbers as seconds ("0", "30").
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration '{text}': {e}"));
    }
    humantime::parse_duration(text).map_err(|e| format!("invalid duration '{text}': {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_units_and_bare_seconds() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn command_after_double_dash_is_kept_verbatim() {
        let cli = Cli::try_parse_from([
            "sesame",
            "run",
            "--kill-timeout",
            "2s",
            "--",
            "envoy",
            "-c",
            "x.yaml",
            "--base-id",
            "3",
        ])
        .expect("parses");
        let Command::Run(run) = cli.command;
        assert_eq!(run.kill_timeout, Duration::from_secs(2));
        assert_eq!(run.command, ["envoy", "-c", "x.yaml", "--base-id", "3"]);
    }
}
