//! The steps of a reload (a validated hot restart) that run off the supervisor: the preflight
//! (certificate checks and the base id), reading the validator's verdict, and waiting for a new
//! epoch to be LIVE. Each returns its result to the supervisor, which started it; none of them
//! starts or signals a process. Also why a reload did not happen, as the control API reports it.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::admin::{AdminAddress, AdminClient, Family};
use crate::bootstrap::Bootstrap;
use crate::certs;
use crate::http::Endpoint;
use crate::process::Exit;
use crate::user::EnvoyUser;

/// Why a reload did not happen (or did not succeed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The launcher is draining or stopping.
    ShuttingDown,
    /// Hot restarts are blocked (a new epoch failed earlier); the reason.
    Blocked(String),
    /// The input is bad (certificates, bootstrap, validator): nothing was started.
    Invalid(String),
    /// A new epoch was started and failed; the serving epoch still serves.
    Failed(String),
    /// The command is not Envoy: there is nothing to hot-restart.
    NotEnvoy,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::ShuttingDown => f.write_str("shutting down"),
            Refusal::Blocked(why) => write!(f, "cannot hot-restart: {why}"),
            Refusal::Invalid(reason) | Refusal::Failed(reason) => f.write_str(reason),
            Refusal::NotEnvoy => f.write_str("not Envoy"),
        }
    }
}

/// What the preflight learned: the input it checked, so that the new epoch is started only on
/// that same input.
#[derive(Debug, Clone)]
pub struct Preflight {
    pub input: Input,
    /// The admin address the bootstrap (with `--config-yaml`) names now.
    pub admin: Option<Endpoint>,
    /// The Envoy binary a new epoch would run.
    pub binary: Option<BinaryId>,
}

/// Which file an Envoy binary is: an upgrade (a new file at the same path, or a path that now
/// points elsewhere) shows as a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryId {
    device: u64,
    inode: u64,
    modified: Option<SystemTime>,
    size: u64,
}

impl BinaryId {
    /// The file `program` runs, found through PATH as exec would; None when there is none.
    pub fn of(program: &std::ffi::OsStr) -> Option<BinaryId> {
        use std::os::unix::fs::MetadataExt;
        let path = PathBuf::from(program);
        let found = if path.components().count() > 1 {
            Some(path)
        } else {
            let dirs = std::env::var_os("PATH")?;
            std::env::split_paths(&dirs).map(|dir| dir.join(&path)).find(|p| p.is_file())
        };
        let metadata = std::fs::metadata(found?).ok()?;
        Some(BinaryId {
            device: metadata.dev(),
            inode: metadata.ino(),
            modified: metadata.modified().ok(),
            size: metadata.size(),
        })
    }
}

/// Whether the binary that `envoy --hot-restart-version` ran as (`exit`, its output in `output`)
/// can hot-restart the serving epoch (`serving`, its admin): Ok(None) when it can, Ok(Some(why))
/// when it cannot, Err when that cannot be known.
pub async fn hot_restart_compatibility(
    exit: Exit,
    output: PathBuf,
    serving: Option<AdminClient>,
) -> Result<Option<String>, String> {
    let text = tokio::fs::read_to_string(&output).await.unwrap_or_default();
    if exit != Exit::Code(0) {
        return Err(format!("envoy --hot-restart-version failed ({exit}): {}", last_error_line(&text)));
    }
    // Envoy prints it on stderr, as a log line or bare, depending on the version.
    let new = last_error_line(&text);
    let running = match serving {
        Some(admin) => admin.server_info().await.ok().and_then(|info| info.hot_restart_version),
        None => None,
    };
    Ok(match running {
        Some(running) if running == new => None,
        Some(running) => {
            Some(format!("the new Envoy binary's hot restart version is {new}, the serving one's {running}"))
        }
        None => Some(format!("the serving epoch's hot restart version is not known (the new binary's is {new})")),
    })
}

/// The files a new epoch reads (the bootstrap and every file it names) and their contents when
/// they were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub files: Vec<PathBuf>,
    pub fingerprint: u64,
}

impl Input {
    pub fn read(files: Vec<PathBuf>) -> Input {
        let fingerprint = fingerprint(&files);
        Input { files, fingerprint }
    }

    /// Whether the files still hold what was checked. Blocking, but a few small files.
    pub fn unchanged(&self) -> bool {
        fingerprint(&self.files) == self.fingerprint
    }
}

fn fingerprint(files: &[PathBuf]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    for file in files {
        file.hash(&mut hasher);
        std::fs::read(file).ok().hash(&mut hasher);
    }
    hasher.finish()
}

/// Blocking: reads the bootstrap and checks every certificate/key pair; for a cold handover
/// (`handover_beside`: the pids of the serving epochs), also that its listeners can bind beside them;
/// with `--envoy-user`, that the user can read every file (the launcher reads them as root).
pub fn preflight(
    command: &[OsString],
    expiry_warn: Duration,
    handover_beside: Option<&[i32]>,
    user: Option<&EnvoyUser>,
) -> Result<Preflight, String> {
    let binary = command.first().and_then(|program| BinaryId::of(program));
    let bootstrap = Bootstrap::from_command(command).map_err(|e| format!("{e:#}"))?;
    if let (Some(ours), Some(bootstrap)) = (handover_beside, &bootstrap) {
        crate::ports::check_handover(&bootstrap.listener_binds(), ours)?;
    }
    // Read before anything is checked: a change from now on shows when the epoch is started.
    let mut files: Vec<PathBuf> = bootstrap.iter().flat_map(|b| b.path.clone()).collect();
    files.extend(bootstrap.iter().flat_map(Bootstrap::referenced_files));
    let input = Input::read(files);
    let admin = bootstrap.as_ref().and_then(Bootstrap::admin_address);
    let pairs = bootstrap.map(|b| b.tls_pairs()).unwrap_or_default();
    if let Some(user) = user {
        let named = pairs.iter().flat_map(|p| [("certificate", &p.cert), ("private key", &p.key)]);
        for (what, file) in named.chain(input.files.iter().map(|f| ("file", f))) {
            user.check_readable(what, file)?;
        }
    }
    let now = SystemTime::now();
    for pair in &pairs {
        let checked = certs::check_pair(pair, now)?;
        if let Some(why) = &checked.key_left_to_envoy {
            tracing::info!(
                "private key {}: not matched against {} by sesame, {why}: envoy --mode validate judges it",
                pair.key.display(),
                pair.cert.display()
            );
        }
        if checked.expires_in < expiry_warn {
            tracing::warn!(
                "certificate {} expires in {}",
                pair.cert.display(),
                humantime::format_duration(Duration::from_secs(checked.expires_in.as_secs()))
            );
        }
    }
    tracing::debug!("{} certificate/key pairs checked", pairs.len());
    Ok(Preflight { input, admin, binary })
}

/// Reads what `envoy --mode validate` printed and turns its exit into the verdict.
pub async fn validation_verdict(exit: Exit, output: PathBuf) -> Result<(), String> {
    if exit == Exit::Code(0) {
        return Ok(());
    }
    let text = tokio::fs::read_to_string(&output).await.unwrap_or_default();
    Err(format!("envoy --mode validate failed ({exit}): {}", last_error_line(&text)))
}

/// The line of Envoy's output that says what is wrong: the last non-empty one, without the log prefix.
fn last_error_line(text: &str) -> String {
    let line = text.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no output");
    // "[2026-11-27 09:03:29.125][2][critical][main] [source/...] error: ..." → after the last "] ".
    line.rsplit_once("] ").map_or(line, |(_, message)| message).to_string()
}

/// How often a starting epoch's admin is asked whether it is LIVE: often while a start usually
/// ends (Envoy on a plain bootstrap is LIVE within 50-100 ms, and each poll's wait is added to the
/// start and to every reload), then less, for an epoch that waits on xDS.
const LIVE_POLL_FAST: Duration = Duration::from_millis(5);
const LIVE_POLL: Duration = Duration::from_millis(50);
const LIVE_POLL_FAST_FOR: Duration = Duration::from_secs(2);

/// Polls the admin until it answers as `epoch` in state LIVE, or `timeout` passes (None: no limit).
/// Polls `address` until it answers as `epoch` of `family` in state LIVE, or `timeout` passes
/// (None: no limit); returns the address it answered on.
pub async fn await_live(
    address: AdminAddress,
    epoch: u32,
    family: Family,
    timeout: Option<Duration>,
) -> Result<Endpoint, String> {
    // Also ends when a later epoch holds the admin: this one will never answer there again, and a
    // poll that never ends would wake the launcher 20 times a second for good.
    let last_state = std::sync::Mutex::new(None::<String>);
    let started = tokio::time::Instant::now();
    let poll = async {
        loop {
            // An admin on port 0 is found once Envoy has written its address; an Envoy of another
            // family on the same address (one still dying, another launcher's) is no answer at all.
            let endpoint = address.resolve();
            let answer = match &endpoint {
                Some(endpoint) => AdminClient::new(endpoint.clone()).server_info().await.ok(),
                None => None,
            };
            if let (Some(endpoint), Some(info)) = (endpoint, answer)
                && family.owns(&info.family)
            {
                if info.restart_epoch == epoch && info.state == "LIVE" {
                    return Ok(endpoint);
                }
                if info.restart_epoch == epoch {
                    *last_state.lock().unwrap_or_else(|p| p.into_inner()) = Some(info.state);
                }
                if info.restart_epoch > epoch {
                    return Err(format!(
                        "epoch {epoch} was superseded by epoch {} before it was LIVE",
                        info.restart_epoch
                    ));
                }
            }
            let every = if started.elapsed() < LIVE_POLL_FAST_FOR { LIVE_POLL_FAST } else { LIVE_POLL };
            tokio::time::sleep(every).await;
        }
    };
    let Some(timeout) = timeout else { return poll.await };
    match tokio::time::timeout(timeout, poll).await {
        Ok(result) => result,
        Err(_) => {
            // Not LIVE in time; but once it has started its workers it has told the old epoch to
            // drain its listeners, and it is the one that serves: it must not be killed then.
            let serving = match address.resolve() {
                Some(endpoint) => {
                    AdminClient::new(endpoint.clone()).workers_started().await.is_ok_and(|s| s).then_some(endpoint)
                }
                None => None,
            };
            match serving {
                Some(endpoint) => {
                    tracing::warn!(
                        "epoch {epoch} was not LIVE within {timeout:?}, but it has started its workers and serves"
                    );
                    Ok(endpoint)
                }
                None => {
                    let last = last_state.lock().unwrap_or_else(|p| p.into_inner()).take();
                    Err(match last {
                        Some(state) => format!(
                            "epoch {epoch} was still {state} after {timeout:?} (--reload-timeout; an xDS server's \
                             initial_fetch_timeout longer than it needs a longer one)"
                        ),
                        None => format!("epoch {epoch} did not answer on {address} within {timeout:?}"),
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_is_the_last_line_without_log_prefix() {
        let output = "[2026-11-27 09:03:29.125][2][info][main] starting\n\
                      [2026-11-27 09:03:29.126][2][critical][main] [source/server/server.cc:100] error initializing configuration: Failed to load certificate chain from /c/a.crt\n\n";
        assert_eq!(
            last_error_line(output),
            "error initializing configuration: Failed to load certificate chain from /c/a.crt"
        );
        assert_eq!(last_error_line(""), "no output");
    }
}
