//! The preflight: blocking checks of what a new epoch will read, before any process is started.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::{BinaryId, Input};
use crate::bootstrap::Bootstrap;
use crate::certs;
use crate::http::Endpoint;
use crate::outcome::Refusal;
use crate::sds::{Prepared, SdsFiles};
use crate::user::EnvoyUser;

/// What the preflight learned, besides that the input passed.
#[derive(Debug, Clone)]
pub struct Preflight {
    /// The admin address the bootstrap (with `--config-yaml`) names now.
    pub admin: Option<Endpoint>,
    /// The Envoy binary a new epoch would run.
    pub binary: Option<BinaryId>,
    /// `--cert-reload in-place`: the SDS files the new epoch will run on, made from the bytes that
    /// passed (written when it starts).
    pub sds: Option<Prepared>,
}

/// Blocking: reads the bootstrap and checks every certificate/key pair; for a cold handover
/// (`handover_beside`: the pids of the serving epochs), also that its listeners can bind beside
/// them; with `--envoy-user`, that the user can read every file (the launcher reads them as root).
/// The input is `watched` (the watched files, for the checks run while they settle), the
/// bootstrap and every file it names, read before anything is checked (and returned, passed or
/// not): a change from then on shows when the epoch is started.
pub fn preflight(
    command: &[OsString],
    watched: Vec<PathBuf>,
    expiry_warn: Duration,
    handover_beside: Option<&[i32]>,
    user: Option<&EnvoyUser>,
    sds: Option<&SdsFiles>,
) -> (Input, Result<Preflight, Refusal>) {
    certs::known::new_round();
    let mut files = watched;
    files.extend(crate::envoy::config_path(command));
    let bootstrap = match Bootstrap::from_command(command) {
        Ok(bootstrap) => bootstrap,
        Err(e) => return (Input::read(files), Err(Refusal::Invalid(format!("{e:#}")))),
    };
    files.extend(bootstrap.iter().flat_map(Bootstrap::referenced_files));
    let input = Input::read(files);
    let result = check(command, bootstrap, &input, expiry_warn, handover_beside, user, sds);
    (input, result)
}

fn check(
    command: &[OsString],
    bootstrap: Option<Bootstrap>,
    input: &Input,
    expiry_warn: Duration,
    handover_beside: Option<&[i32]>,
    user: Option<&EnvoyUser>,
    sds: Option<&SdsFiles>,
) -> Result<Preflight, Refusal> {
    let binary = command.first().and_then(|program| BinaryId::of(program));
    if let (Some(ours), Some(bootstrap)) = (handover_beside, &bootstrap) {
        crate::ports::check_handover(&bootstrap.listener_binds(), ours).map_err(invalid)?;
    }
    let admin = bootstrap.as_ref().and_then(Bootstrap::admin_address);
    let sds = match (sds, &bootstrap) {
        (Some(files), Some(bootstrap)) => {
            let prepared = files.prepare(bootstrap, command).map_err(invalid)?;
            files
                .write_validation(&prepared, user)
                .map_err(|e| Refusal::Fault(format!("cannot write the bootstrap to validate: {e:#}")))?;
            Some(prepared)
        }
        _ => None,
    };
    // Envoy reads these as sesame wrote them: the user's files need be readable by sesame only.
    let given: std::collections::HashSet<&std::path::Path> =
        sds.iter().flat_map(|p| &p.secrets).flat_map(|s| s.secret.files.paths()).collect();
    let pairs = bootstrap.map(|b| b.tls_pairs()).unwrap_or_default();
    if let Some(user) = user {
        let named = pairs.iter().flat_map(|p| [("certificate", p.cert.as_path()), ("private key", p.key.as_path())]);
        for (what, file) in named.chain(input.files().map(|f| ("file", f))).filter(|(_, f)| !given.contains(f)) {
            user.check_readable(what, file).map_err(invalid)?;
        }
    }
    let now = SystemTime::now();
    for pair in &pairs {
        let checked = certs::check_pair(pair, now).map_err(invalid)?;
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
    Ok(Preflight { admin, binary, sds })
}

fn invalid(problem: impl std::fmt::Display) -> Refusal {
    Refusal::Invalid(problem.to_string())
}
