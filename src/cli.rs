//! Command line: every option also reads `SESAME_<NAME>` from the environment, because containers
//! are configured by environment.

use std::ffi::OsString;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use crate::admin::Listeners;
use crate::cpu_limit::ConcurrencySetting;
use crate::drain::DrainSettings;
use crate::envoy::EnvoyFlags;
use crate::http::Endpoint;

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
    Run(Box<RunOptions>),
    /// Drain now and block until drained (exit 0) or the drain timed out (exit 1): a preStop hook.
    Shutdown {
        #[command(flatten)]
        location: Location,
        /// Give up waiting after this long (exit 1); the drain goes on.
        #[arg(long, env = "SESAME_WAIT_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
        wait_timeout: Duration,
    },
    /// Validated hot restart; exit 0 once the new epoch is LIVE, else 1 with the reason.
    Reload {
        #[command(flatten)]
        location: Location,
        /// A cold handover instead: a new Envoy family starts beside the serving one, which is then
        /// drained and stopped (the way out when hot restarts are blocked, or for an Envoy binary
        /// whose hot restart is incompatible).
        #[arg(long)]
        cold: bool,
        /// Give up waiting after this long (exit 1).
        #[arg(long, env = "SESAME_WAIT_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
        wait_timeout: Duration,
    },
    /// State, epochs, pids, drain progress; exit 0 when ready, 1 when not, 2 when unreachable.
    Status {
        #[command(flatten)]
        location: Location,
        /// The JSON of GET /status.
        #[arg(long)]
        json: bool,
    },
}

/// Where the launcher keeps its sockets; the clients find it the same way.
#[derive(Debug, Args, Clone)]
pub struct Location {
    /// Directory for the demo's files and sockets [default: /run/sesame as root, else $XDG_RUNTIME_DIR/sesame].
    #[arg(long, env = "SESAME_RUNTIME_DIR")]
    pub runtime_dir: Option<PathBuf>,

    /// The control socket [default: RUNTIME_DIR/control.sock].
    #[arg(long, env = "SESAME_CONTROL")]
    pub control: Option<PathBuf>,
}

impl Location {
    pub fn runtime_dir(&self) -> PathBuf {
        self.runtime_dir.clone().unwrap_or_else(default_runtime_dir)
    }

    pub fn control_socket(&self) -> PathBuf {
        self.control.clone().unwrap_or_else(|| self.runtime_dir().join("control.sock"))
    }
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

    #[command(flatten)]
    pub location: Location,

    /// Run Envoy (every epoch, its validator, its version check), or a plain command, as this user
    /// and its groups: USER or USER:GROUP, names or numeric ids. sesame itself stays root.
    #[arg(long, env = "SESAME_ENVOY_USER", value_name = "USER[:GROUP]")]
    pub envoy_user: Option<String>,

    /// Also serve the control API on this TCP address (HOST:PORT), for probes and scrapes.
    #[arg(long, env = "SESAME_HTTP", value_name = "ADDR")]
    pub http: Option<String>,

    /// Serve --http over TLS with this certificate chain (re-read when it changes).
    #[arg(long, env = "SESAME_HTTP_TLS_CERT", requires = "http_tls_key")]
    pub http_tls_cert: Option<PathBuf>,

    /// The private key of --http-tls-cert.
    #[arg(long, env = "SESAME_HTTP_TLS_KEY", requires = "http_tls_cert")]
    pub http_tls_key: Option<PathBuf>,

    /// A file holding a token that POST /shutdown and /reload over --http must bear (Authorization: Bearer).
    #[arg(long, env = "SESAME_HTTP_TOKEN")]
    pub http_token: Option<PathBuf>,

    /// After the command exits: how long the processes it left get between SIGTERM and SIGKILL.
    #[arg(long, env = "SESAME_KILL_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub kill_timeout: Duration,

    /// HTTP port of the embedded demo bootstrap.
    #[arg(long, env = "SESAME_DEMO_HTTP_PORT", default_value_t = 8080)]
    pub demo_http_port: u16,

    /// HTTPS port of the embedded demo bootstrap.
    #[arg(long, env = "SESAME_DEMO_HTTPS_PORT", default_value_t = 8443)]
    pub demo_https_port: u16,

    /// Envoy's admin API: a unix socket path, unix:PATH, or HOST:PORT [default: read from the bootstrap].
    #[arg(long, env = "SESAME_ADMIN")]
    pub admin: Option<Endpoint>,

    #[command(flatten)]
    pub drain: DrainOptions,

    #[command(flatten)]
    pub envoy_flags: EnvoyFlagOptions,

    #[command(flatten)]
    pub reload: ReloadOptions,

    /// The command to supervise; without one, Envoy runs on the embedded demo bootstrap.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// The graceful drain on SIGTERM/SIGINT (docs/ARCHITECTURE.md, "The graceful drain").
#[derive(Debug, Args)]
pub struct DrainOptions {
    /// Time between failing the health check and draining the listeners, for load balancers to notice.
    #[arg(long, env = "SESAME_DRAIN_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub drain_delay: Duration,

    /// POST /healthcheck/fail to Envoy when the drain starts.
    #[arg(long, env = "SESAME_DRAIN_HEALTHCHECK_FAIL", default_value_t = true, action = ArgAction::Set)]
    pub drain_healthcheck_fail: bool,

    /// Drain only the listeners whose traffic_direction is INBOUND.
    #[arg(long, env = "SESAME_DRAIN_INBOUND_ONLY")]
    pub drain_inbound_only: bool,

    /// How often to read Envoy's open downstream connections during the drain.
    #[arg(long, env = "SESAME_DRAIN_POLL", default_value = "100ms", value_parser = parse_duration)]
    pub drain_poll: Duration,

    /// The drain is done when at most this many downstream connections are open.
    #[arg(long, env = "SESAME_DRAIN_CONNECTIONS", default_value_t = 0)]
    pub drain_connections: u64,

    /// The drain lasts at least this long.
    #[arg(long, env = "SESAME_DRAIN_MIN", default_value = "0s", value_parser = parse_duration)]
    pub drain_min: Duration,

    /// The drain lasts at most this long, delay included; 0 forwards SIGTERM at once.
    #[arg(long, env = "SESAME_DRAIN_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Listeners keep accepting (and tell each new connection to close) until SIGTERM
    /// (`/drain_listeners?graceful&skip_exit`), instead of refusing connections once Envoy's drain
    /// time is over (`?graceful`).
    #[arg(long, env = "SESAME_DRAIN_KEEP_LISTENING", default_value_t = true, action = ArgAction::Set)]
    pub drain_keep_listening: bool,

    /// Listeners whose whole name (or stat name: stat_prefix, or address as 127.0.0.1_9100) matches
    /// this regex are not waited for by the drain (repeatable): a metrics listener that is scraped
    /// every few seconds would hold it open.
    #[arg(long, env = "SESAME_DRAIN_IGNORE_LISTENER", value_name = "REGEX", value_parser = parse_listener_regex)]
    pub drain_ignore_listener: Vec<regex::Regex>,
}

/// A regex matched against a whole listener name: `metrics` must not also match `metrics-internal`.
fn parse_listener_regex(text: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{text})$")).map_err(|e| format!("invalid regex '{text}': {e}"))
}

impl DrainOptions {
    pub fn settings(&self) -> DrainSettings {
        DrainSettings {
            delay: self.drain_delay,
            healthcheck_fail: self.drain_healthcheck_fail,
            inbound_only: self.drain_inbound_only,
            counted: Listeners::All,
            poll: self.drain_poll.max(Duration::from_millis(1)),
            connections: self.drain_connections,
            min: self.drain_min,
            timeout: self.drain_timeout,
            keep_listening: self.drain_keep_listening,
            ignore: self.drain_ignore_listener.clone(),
        }
    }
}

/// Reloads: validated hot restarts (docs/ARCHITECTURE.md, "The reload").
#[derive(Debug, Args)]
pub struct ReloadOptions {
    /// Also watch this file or directory; a change hot-restarts Envoy (repeatable).
    #[arg(long = "watch", env = "SESAME_WATCH", value_name = "PATH", value_delimiter = ',')]
    pub watch: Vec<PathBuf>,

    /// Do not watch the bootstrap and the files it references; only the --watch paths.
    #[arg(long, env = "SESAME_NO_AUTO_WATCH")]
    pub no_auto_watch: bool,

    /// Quiet time after a file change before the restart, so that a certificate and its key make one.
    #[arg(long, env = "SESAME_RELOAD_DEBOUNCE", default_value = "500ms", value_parser = parse_duration)]
    pub reload_debounce: Duration,

    /// The longest wait from a file's first change to the reload, however often the files change.
    #[arg(long, env = "SESAME_RELOAD_DEBOUNCE_MAX", default_value = "5s", value_parser = parse_duration)]
    pub reload_debounce_max: Duration,

    /// How long a new epoch has to answer LIVE on the admin API.
    #[arg(long, env = "SESAME_RELOAD_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub reload_timeout: Duration,

    /// Warn when a served certificate expires within this time.
    #[arg(long, env = "SESAME_CERT_EXPIRY_WARN", default_value = "7d", value_parser = parse_duration)]
    pub cert_expiry_warn: Duration,

    /// While hot restarts are blocked, the first cold handover is tried after this long; the delay
    /// doubles after each one that fails, up to --recover-backoff-max.
    #[arg(long, env = "SESAME_RECOVER_BACKOFF", default_value = "1s", value_parser = parse_duration)]
    pub recover_backoff: Duration,

    /// The longest delay between two cold handovers while hot restarts stay blocked.
    #[arg(long, env = "SESAME_RECOVER_BACKOFF_MAX", default_value = "5m", value_parser = parse_duration)]
    pub recover_backoff_max: Duration,

    /// Never start a cold handover by itself: a blocked hot restart stays blocked until a cold
    /// start or `sesame reload --cold`.
    #[arg(long, env = "SESAME_NO_RECOVER")]
    pub no_recover: bool,

    /// Leave net.ipv4.tcp_migrate_req alone. By default a cold handover sets it to 1 (in sesame's
    /// network namespace) so that connections queued on the old family's listeners when they close
    /// move to the new family's instead of being reset.
    #[arg(long, env = "SESAME_NO_TCP_MIGRATE_REQ")]
    pub no_tcp_migrate_req: bool,

    /// How a changed certificate, key or CA bundle reaches Envoy: hot-restart (a new epoch), or
    /// in-place (Envoy swaps it through file-based SDS, with the bytes that passed the checks: no new
    /// epoch, no connection touched). Anything else that changes is a hot restart either way.
    #[arg(long, env = "SESAME_CERT_RELOAD", value_enum, default_value_t = CertReload::HotRestart)]
    pub cert_reload: CertReload,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CertReload {
    HotRestart,
    InPlace,
}

/// Envoy's own drain flags, added to an Envoy command only where the user gave none.
#[derive(Debug, Args)]
pub struct EnvoyFlagOptions {
    /// Envoy's --drain-time-s: how long drained listeners keep accepting (shutdown and hot restart).
    #[arg(long, env = "SESAME_ENVOY_DRAIN_TIME", default_value = "30s", value_parser = parse_duration)]
    pub envoy_drain_time: Duration,

    /// Envoy's --drain-strategy: immediate asks every connection to close at once when a drain starts.
    #[arg(long, env = "SESAME_ENVOY_DRAIN_STRATEGY", value_enum, default_value_t = DrainStrategy::Immediate)]
    pub envoy_drain_strategy: DrainStrategy,

    /// Envoy's --parent-shutdown-time-s: when a hot restart's old epoch is told to exit.
    #[arg(long, env = "SESAME_ENVOY_PARENT_SHUTDOWN_TIME", default_value = "45s", value_parser = parse_duration)]
    pub envoy_parent_shutdown_time: Duration,

    /// Envoy's --concurrency, unless the command sets it: auto (the tightest CPU quota of sesame's
    /// cgroups and their ancestors, rounded up, capped by the affinity mask), a number, or off
    /// (Envoy's own choice).
    #[arg(long, env = "SESAME_ENVOY_CONCURRENCY", default_value = "auto", value_parser = ConcurrencySetting::from_str)]
    pub envoy_concurrency: ConcurrencySetting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DrainStrategy {
    Immediate,
    Gradual,
}

impl EnvoyFlagOptions {
    pub fn flags(&self) -> EnvoyFlags {
        // Envoy takes whole seconds; round up so that a drain is never shorter than asked.
        let secs = |d: Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
        EnvoyFlags {
            drain_time_s: secs(self.envoy_drain_time),
            drain_strategy: match self.envoy_drain_strategy {
                DrainStrategy::Immediate => "immediate",
                DrainStrategy::Gradual => "gradual",
            },
            parent_shutdown_time_s: secs(self.envoy_parent_shutdown_time),
            // Decided by `launch`, which knows the command and reads the cgroups.
            concurrency: None,
        }
    }
}

impl RunOptions {
    pub fn runtime_dir(&self) -> PathBuf {
        self.location.runtime_dir()
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
        let Command::Run(run) = cli.command else { panic!("run") };
        assert_eq!(run.kill_timeout, Duration::from_secs(2));
        assert_eq!(run.command, ["envoy", "-c", "x.yaml", "--base-id", "3"]);
    }
}
