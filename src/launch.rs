//! What to run: the user's command as given, an Envoy command with the launcher's flags, or the
//! embedded demo when no command is given; and, for Envoy, where its admin API is.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::admin::{AdminAddress, Family, Listeners};
use crate::bootstrap::{Bootstrap, BootstrapFiles};
use crate::cli::{CertReload, RunOptions};
use crate::cpu_limit::{self, ConcurrencySetting};
use crate::demo::Demo;
use crate::envoy::{self, BaseId, EnvoyFlags};
use crate::files::{create_owned_dir, create_private_dir};
use crate::http::Endpoint;
use crate::sds::{Prepared, SdsFiles};
use crate::user::EnvoyUser;

/// The command the supervisor starts, and whether it is Envoy (drain and hot restart apply) or any
/// other program (a plain init).
#[derive(Debug, Clone)]
pub struct Launch {
    /// The command as the user gave it (or the demo's), before the launcher's flags.
    pub command: Vec<OsString>,
    pub envoy: Option<EnvoyLaunch>,
    /// `--envoy-user`: every child runs as this user; None runs them as the launcher.
    pub user: Option<EnvoyUser>,
}

/// What the launcher knows about an Envoy command.
#[derive(Debug, Clone)]
pub struct EnvoyLaunch {
    /// Epoch 0's admin (later epochs' come from the bootstrap they start with); None when no admin
    /// address is known.
    pub admin: Option<AdminAddress>,
    /// `--admin` was given: every epoch's admin is there, whatever the bootstrap says.
    pub admin_override: bool,
    /// Where Envoy writes the base id it picked; None when the command fixes it with --base-id.
    pub base_id_file: Option<PathBuf>,
    pub flags: EnvoyFlags,
    /// How long an old epoch lives after the next one starts: the command's
    /// --parent-shutdown-time-s, or the launcher's.
    pub parent_shutdown_time: Duration,
    /// The launcher's own files (the validator's output): private to the launcher's user.
    pub runtime_dir: PathBuf,
    /// What Envoy writes (its admin sockets, base id files, admin address file): the runtime
    /// directory itself, or with `--envoy-user` its `envoy/` subdirectory, owned by that user.
    pub envoy_dir: PathBuf,
    /// The listeners a drain waits for: all, or the INBOUND ones with --drain-inbound-only.
    pub drained_listeners: Listeners,
    /// How often Envoy flushes (and, during a hot restart, merges) its stats.
    pub stats_flush_interval: Duration,
    /// What was read of the command's bootstrap (None when it could not be): the watcher starts
    /// from it.
    pub bootstrap_files: Option<BootstrapFiles>,
    /// Where the rewritten bootstrap and the secret files are; each epoch runs on them. None when
    /// the bootstrap names no certificate by file (or cannot be read).
    pub sds: Option<InPlace>,
}

/// How an in-place launcher gives Envoy its certificates.
#[derive(Debug, Clone)]
pub struct InPlace {
    pub files: SdsFiles,
    /// What epoch 0 starts on (taken by the supervisor).
    pub first: Option<Prepared>,
    /// `--cert-reload in-place`: a change of only these files is swapped in the serving Envoy;
    /// otherwise it is a hot restart, whose new epoch gets them.
    pub rotate_in_place: bool,
    /// The epochs run on the rewritten bootstrap: from the start, or (when the certificates failed
    /// the checks at start) from the first reload whose checks passed.
    pub active: bool,
}

impl Launch {
    pub fn is_envoy(&self) -> bool {
        self.envoy.is_some()
    }

    /// The base id of `family`: the one its epoch 0 picked (read from its file), or the command's
    /// `--base-id`.
    pub fn base_id(&self, family: &Family) -> Option<u32> {
        let text = match &family.base_id_path {
            Some(file) => std::fs::read_to_string(file).ok()?,
            None => envoy::flag_value(&self.command, &["--base-id"])?.into_string().ok()?,
        };
        text.trim().parse().ok()
    }

    /// The hot-restart family `number` as far as the command line tells it: the base id path of a
    /// dynamic base id (its id is known once its epoch 0 has written it), or, for the first family,
    /// the command's `--base-id`. Every family after the first (a cold handover) picks its own id
    /// dynamically: it must not share the hot-restart memory of the one it replaces.
    pub fn family(&self, number: u32) -> Family {
        let Some(envoy) = &self.envoy else { return Family::default() };
        let file = match (&envoy.base_id_file, number) {
            (Some(file), 0) => file.clone(),
            (None, 0) => return Family { base_id_path: None, base_id: self.base_id(&Family::default()) },
            (_, n) => envoy.envoy_dir.join(format!("envoy-base-id.family-{n}")),
        };
        Family { base_id_path: Some(file.to_string_lossy().into_owned()), base_id: None }
    }

    /// Epoch 0's admin, when there is one.
    pub fn admin(&self) -> Option<AdminAddress> {
        self.envoy.as_ref()?.admin.clone()
    }

    /// The admin of an epoch whose bootstrap names `from_bootstrap`: `--admin` when given; for an
    /// admin on port 0, the file Envoy writes the bound address to.
    pub fn admin_address(&self, from_bootstrap: Option<Endpoint>) -> Option<AdminAddress> {
        let envoy = self.envoy.as_ref()?;
        if envoy.admin_override {
            return envoy.admin.clone();
        }
        match from_bootstrap? {
            Endpoint::Tcp(_, 0) => {
                let file = envoy::flag_value(&self.command, &["--admin-address-path"])?;
                Some(AdminAddress::InFile(PathBuf::from(file)))
            }
            endpoint => Some(AdminAddress::At(endpoint)),
        }
    }

    /// The command line of restart epoch `restart_epoch` of `family`. Later epochs reuse the base
    /// id that the family's epoch 0 picked.
    pub fn epoch_argv(&self, family: &Family, restart_epoch: u32) -> Vec<OsString> {
        let Some(envoy) = &self.envoy else { return self.command.clone() };
        let base_id = match (&family.base_id_path, family.base_id) {
            (None, _) => BaseId::FromCommand,
            (Some(_), Some(id)) if restart_epoch > 0 => BaseId::Picked(id),
            (Some(file), _) => BaseId::Dynamic(PathBuf::from(file)),
        };
        let command = match &envoy.sds {
            Some(sds) if sds.active => sds.files.command(&self.command),
            _ => self.command.clone(),
        };
        envoy::epoch_command(&command, restart_epoch, &base_id, &envoy.flags)
    }

    /// The command line of the first epoch of a new family in a cold handover: its admin on
    /// `private_admin` (through `--config-yaml`), since the old family still holds the configured one.
    pub fn handover_argv(&self, family: &Family, private_admin: &Path) -> Result<Vec<OsString>, envoy::BadConfigYaml> {
        envoy::with_admin(&self.epoch_argv(family, 0), private_admin)
    }
}

pub fn plan(options: &RunOptions) -> anyhow::Result<Launch> {
    let runtime_dir = options.runtime_dir();
    let user = envoy_user(options)?;
    let envoy_dir = match &user {
        Some(user) => envoy_dir(&runtime_dir, user)?,
        None => runtime_dir.clone(),
    };
    let command = if options.command.is_empty() {
        let demo = Demo::new(&runtime_dir, &envoy_dir);
        demo.prepare(options.demo_http_port, options.demo_https_port)?;
        if let Some(user) = &user {
            demo.share_with(user)?;
        }
        tracing::info!(
            "no command given: running the demo (http://127.0.0.1:{}/, https://127.0.0.1:{}/, certificate {})",
            options.demo_http_port,
            options.demo_https_port,
            demo.cert.display()
        );
        vec![options.envoy_bin.clone().into(), "-c".into(), demo.bootstrap.into()]
    } else {
        options.command.clone()
    };
    if let (Some(user), Some(program)) = (&user, crate::process::find_program(&command[0])) {
        let what =
            if envoy::is_envoy_command(&command[0], &options.envoy_bin) { "the Envoy binary" } else { "the command" };
        user.check_executable(what, &program)?;
    }
    if !envoy::is_envoy_command(&command[0], &options.envoy_bin) {
        tracing::info!(
            "'{}' is not Envoy: running it under a plain init (no drain, no hot restart)",
            command[0].to_string_lossy()
        );
        return Ok(Launch { command, envoy: None, user });
    }
    create_private_dir(&runtime_dir)?;
    crate::bootstrap::keep_parsed_in(&runtime_dir);
    let read = |command: &[OsString]| match Bootstrap::from_command(command) {
        Ok(bootstrap) => bootstrap,
        Err(e) => {
            // Envoy will refuse a broken bootstrap itself, with its own reason; ours is a hint.
            tracing::warn!("{e:#}");
            None
        }
    };
    let mut command = command;
    let mut bootstrap = read(&command);
    if let Some(file) = bootstrap.as_ref().filter(|b| b.opaque).and_then(|b| b.path.clone()) {
        tracing::warn!(
            "sesame cannot read the protobuf bootstrap {}: the files it names are not watched for changes (give \
             them with --watch) and sesame does not check its certificates (envoy --mode validate still does)",
            file.display()
        );
    }
    let mut admin = options.admin.clone().or_else(|| bootstrap.as_ref()?.admin_address());
    if admin.is_none() {
        // Without an admin there is no drain and no way to see a new epoch LIVE: give Envoy one.
        let socket = envoy_dir.join("envoy-admin-sesame.sock");
        command = envoy::with_admin(&command, &socket).map_err(anyhow::Error::msg)?;
        let replaced = if bootstrap.as_ref().is_some_and(|b| b.opaque) {
            " (it replaces any admin of the protobuf bootstrap: give --admin ADDR to keep yours)"
        } else {
            ""
        };
        tracing::info!(
            "the bootstrap names no admin: sesame gives Envoy one on unix:{} through --config-yaml, to drain it \
             and to see new epochs LIVE{replaced}",
            socket.display()
        );
        bootstrap = read(&command);
        admin = bootstrap.as_ref().and_then(Bootstrap::admin_address);
    }
    if matches!(admin, Some(Endpoint::Tcp(_, 0))) && envoy::flag_value(&command, &["--admin-address-path"]).is_none() {
        // An admin on port 0 is found through the file Envoy writes its address to.
        command.extend(["--admin-address-path".into(), envoy_dir.join("envoy-admin-address").into()]);
    }
    if let Some(address) = &admin {
        tracing::info!("Envoy's admin API: {address}");
    }
    let mut flags = options.envoy_flags.flags();
    flags.concurrency = concurrency(options.envoy_flags.envoy_concurrency, &command);
    let parent_shutdown_secs = envoy::flag_value(&command, &["--parent-shutdown-time-s"])
        .and_then(|v| v.to_str()?.parse().ok())
        .unwrap_or(flags.parent_shutdown_time_s);
    let drained_listeners = if options.drain.drain_inbound_only {
        match bootstrap.as_ref().and_then(Bootstrap::inbound_listener_stat_names) {
            Some(names) => {
                tracing::info!("the drain waits for the connections of the INBOUND listeners {names:?}");
                Listeners::Named(names)
            }
            None => {
                tracing::warn!(
                    "no static listeners in the bootstrap: the drain waits for every listener's connections"
                );
                Listeners::All
            }
        }
    } else {
        Listeners::All
    };
    let admin_override = options.admin.is_some();
    let sds = in_place(options, bootstrap.as_ref(), &command, &runtime_dir, user.as_ref())?;
    let envoy = EnvoyLaunch {
        sds,
        drained_listeners,
        admin: None,
        admin_override,
        base_id_file: envoy::base_id_file(&command, &envoy_dir.join("envoy-base-id")),
        flags,
        parent_shutdown_time: Duration::from_secs(parent_shutdown_secs),
        stats_flush_interval: bootstrap
            .as_ref()
            .and_then(Bootstrap::stats_flush_interval)
            .unwrap_or(crate::bootstrap::DEFAULT_STATS_FLUSH),
        bootstrap_files: bootstrap.as_ref().map(Bootstrap::files),
        runtime_dir,
        envoy_dir,
    };
    let mut launch = Launch { command, envoy: Some(envoy), user };
    let epoch0_admin = if admin_override { admin.map(AdminAddress::At) } else { launch.admin_address(admin) };
    if let Some(envoy) = launch.envoy.as_mut() {
        envoy.admin = epoch0_admin;
    }
    Ok(launch)
}

/// The SDS files epoch 0 starts on, made now from the user's files (a certificate that fails the
/// checks is refused here, by name), when the bootstrap names a certificate or CA by file. In both
/// modes: what Envoy serves is what sesame checked. A bootstrap sesame cannot read (protobuf, or
/// none) is given to Envoy as it is; `--cert-reload in-place` then falls back to hot restarts, said
/// once.
fn in_place(
    options: &RunOptions,
    bootstrap: Option<&Bootstrap>,
    command: &[OsString],
    runtime_dir: &Path,
    user: Option<&EnvoyUser>,
) -> anyhow::Result<Option<InPlace>> {
    let rotate_in_place = options.reload.cert_reload == CertReload::InPlace;
    let Some(bootstrap) = bootstrap.filter(|b| !b.opaque) else {
        if rotate_in_place {
            tracing::warn!(
                "--cert-reload in-place: sesame cannot read this bootstrap (a protobuf, or none): certificates are \
                 read by Envoy from their files and rotated by hot restarts"
            );
        }
        return Ok(None);
    };
    // In the runtime directory, which is the launcher's: Envoy's user owns `envoy/`, and could move
    // a link in place of a directory of its own that the launcher writes keys into.
    if let Some(scalar) = bootstrap.path.as_deref().and_then(crate::sds::ambiguous_scalar) {
        tracing::warn!(
            "the bootstrap holds the YAML value '{scalar}', which YAML readers read differently (quote it to choose): \
             Envoy is given the bootstrap as written and reads the certificates from their files"
        );
        return Ok(None);
    }
    let (dir, bootstrap_path) = (runtime_dir.join("sds"), runtime_dir.join("envoy-sds-bootstrap.json"));
    let mut files = SdsFiles { dir, bootstrap: bootstrap_path, inline: !rotate_in_place };
    files.remove();
    let first = match files.prepare(bootstrap, command) {
        Ok(first) if files.inline || fits_inotify(first.secrets.len()) => Ok(first),
        Ok(_) => {
            files.inline = true;
            files.prepare(bootstrap, command)
        }
        Err(e) => Err(e),
    };
    let rotate_in_place = rotate_in_place && !files.inline;
    let first = match first {
        Ok(first) => first,
        Err(e) => {
            // At start Envoy is the judge, as it always was: one bad certificate must not keep
            // every listener from serving. The first reload whose checks pass gives them by SDS.
            tracing::warn!(
                "{e}: at start, Envoy reads the certificates from their files and judges them itself; they are \
                 given by SDS, checked, from the first reload whose checks pass"
            );
            return Ok(Some(InPlace { files, first: None, rotate_in_place, active: false }));
        }
    };
    if let Some(secret) = first.secrets.iter().find(|s| s.key_judged_by_envoy)
        && let Err(why) = files.write_validation(&first, user).map_err(|e| format!("{e:#}")).and_then(|()| {
            envoy_accepts(&files.validate_command(command), runtime_dir, user, options.reload.reload_timeout)
        })
    {
        // A key only Envoy can judge, which it refuses: without sesame Envoy would not start, and
        // by SDS it would start without that certificate. It is given the files, and says so.
        tracing::warn!(
            "{} has a key beyond sesame's checks that envoy --mode validate refuses ({why}): at start, Envoy \
             reads the certificates from their files and judges them itself",
            secret.path().display()
        );
        return Ok(Some(InPlace { files, first: None, rotate_in_place, active: false }));
    }
    if first.secrets.is_empty() {
        files.remove();
        if rotate_in_place {
            tracing::info!("--cert-reload in-place: the bootstrap names no certificate or CA by file");
        }
        return Ok(None);
    }
    files.write(&first, user)?;
    // Dropped here, on the planning thread (`memory::apart`), the bytes never reach the copy the
    // launcher keeps: there, freed later, they left a megabyte of holes between the records at a
    // thousand pairs, each page of them kept resident by its neighbours.
    let first = first.into_records();
    tracing::info!(
        "{} certificates and CA bundles given to Envoy as checked, {} (Envoy runs on {}); changed, they are {}",
        first.secrets.len(),
        if files.inline {
            "inline in its bootstrap".to_string()
        } else {
            format!("by file-based SDS from {}", files.dir.display())
        },
        files.bootstrap.display(),
        if rotate_in_place { "swapped in place" } else { "hot-restarted" }
    );
    if !first.node_set.is_empty() {
        tracing::info!(
            "the bootstrap names no node {}: Envoy needs one for SDS, sesame sets it to \"sesame\" (set node.id and \
             node.cluster to choose)",
            first.node_set.join(" and ")
        );
    }
    Ok(Some(InPlace { files, first: Some(first), rotate_in_place, active: true }))
}

/// Whether `envoy --mode validate` (run as Envoy's user, on the secrets as checked) accepts the
/// bootstrap: for a key type that only Envoy can judge, before it is given at start. Blocking, on the main thread (Envoy's
/// children must be spawned from it).
fn envoy_accepts(
    validate: &[OsString],
    runtime_dir: &Path,
    user: Option<&EnvoyUser>,
    timeout: Duration,
) -> Result<(), String> {
    let path = runtime_dir.join("envoy-validate.log");
    let output = std::fs::File::create(&path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let started = std::time::Instant::now();
    let passed = crate::process::run_before_start(validate, output, user, timeout).map_err(|e| e.to_string())?;
    if passed {
        return Ok(());
    }
    if started.elapsed() >= timeout {
        return Err(format!("still running after {timeout:?} (--reload-timeout): killed"));
    }
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let reason = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no reason given");
    Err(reason.trim().to_string())
}

/// Whether Envoy can take `secrets` file-based SDS secrets: one inotify instance each, in each of
/// the two epochs of a hot restart, out of `fs.inotify.max_user_instances` (128 by default) shared by
/// every process of the user. Half of it is left to the others; beyond, sesame says what to raise.
fn fits_inotify(secrets: usize) -> bool {
    let path = "/proc/sys/fs/inotify/max_user_instances";
    let limit: usize = std::fs::read_to_string(path).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(128);
    if inotify_budget_holds(secrets, limit) {
        return true;
    }
    tracing::warn!(
        "--cert-reload in-place: {secrets} certificates would take {} of the {limit} inotify instances this user may \
         have ({path}: Envoy watches each file-based SDS secret with one, in each of two epochs during a hot restart): \
         certificates are rotated by hot restarts; raise it to at least {} for in-place rotation",
        2 * secrets,
        4 * secrets
    );
    false
}

fn inotify_budget_holds(secrets: usize, limit: usize) -> bool {
    2 * secrets <= limit / 2
}

/// `--envoy-user`, resolved once: the child between fork and exec cannot read the user database.
/// Only root can become another user; the launcher's own user is no change at all.
fn envoy_user(options: &RunOptions) -> anyhow::Result<Option<EnvoyUser>> {
    let Some(spec) = &options.envoy_user else { return Ok(None) };
    let user = EnvoyUser::resolve(spec).map_err(anyhow::Error::msg)?;
    if user.is_launcher() {
        tracing::info!("--envoy-user {spec}: the launcher's own user, nothing to change");
        return Ok(None);
    }
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "--envoy-user {spec}: only root can run children as another user (sesame runs as uid {})",
            nix::unistd::geteuid()
        );
    }
    tracing::info!("Envoy runs as {} with groups {:?}; sesame stays root", user.label, user.groups);
    Ok(Some(user))
}

/// `RUNTIME_DIR/envoy`, owned by the Envoy user, for what Envoy writes; the runtime directory
/// becomes searchable (0711, not listable) so that the user can reach it, while the control socket,
/// the lock and the validator's output stay the launcher's (0600). The launcher itself never
/// creates or follows anything there: that user may have planted links.
fn envoy_dir(runtime_dir: &Path, user: &EnvoyUser) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    create_private_dir(runtime_dir)?;
    std::fs::set_permissions(runtime_dir, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("cannot make {} searchable for the Envoy user", runtime_dir.display()))?;
    let dir = runtime_dir.join("envoy");
    create_owned_dir(&dir, user.uid, user.gid)?;
    user.check_readable("Envoy's directory", &dir)?;
    Ok(dir)
}

/// The `--concurrency` every epoch gets, decided once at start and said once in the log: a quota
/// changed later (an in-place pod resize) is not followed, since the epochs of one family should
/// not differ in a way the user did not ask for.
fn concurrency(setting: ConcurrencySetting, command: &[OsString]) -> Option<u32> {
    if envoy::sets_concurrency(command) {
        tracing::info!("the command sets Envoy's worker count (--concurrency or --cpuset-threads): kept as given");
        return None;
    }
    match setting {
        ConcurrencySetting::Off => {
            tracing::info!("--envoy-concurrency off: no --concurrency, Envoy picks its worker count itself");
            None
        }
        ConcurrencySetting::Fixed(workers) => {
            tracing::info!("--concurrency {workers}: from --envoy-concurrency");
            Some(workers)
        }
        ConcurrencySetting::Auto => {
            let (workers, why) = cpu_limit::auto_concurrency();
            tracing::info!("{why}");
            workers
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn in_place_takes_at_most_half_the_users_inotify_instances_over_two_epochs() {
        assert!(super::inotify_budget_holds(32, 128), "32 secrets, 64 instances in a hot restart: half of 128");
        assert!(!super::inotify_budget_holds(33, 128));
        assert!(super::inotify_budget_holds(1000, 4000));
    }
}
