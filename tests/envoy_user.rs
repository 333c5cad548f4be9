//! `--envoy-user`: the real Envoy runs unprivileged (uid, gid and groups read from /proc) across
//! hot restarts, a certificate rotation and the drain, while sesame stays root; a key that user
//! cannot read is refused by name and the serving epoch keeps serving.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::tls::{HttpsClient, certificate, replace_file, tls_bootstrap};
use common::{Launcher, Mode, free_port, wait_for};
use nix::sys::signal::Signal;

/// `nobody`, which Debian, Ubuntu and Alpine all have with uid 65534.
const USER: &str = "nobody";
const UID: u32 = 65534;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// `Uid:`, `Gid:` (real, effective, saved, filesystem) and `Groups:` of a process.
fn credentials(pid: u64) -> (String, String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let field = |name: &str| {
        let line = status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_default();
        line.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    (field("Uid:"), field("Gid:"), field("Groups:"))
}

struct Unprivileged {
    launcher: Launcher,
    port: u16,
    dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl Unprivileged {
    fn start() -> Unprivileged {
        Self::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Unprivileged {
        let dir = tempfile::tempdir().expect("tempdir");
        // Envoy binds its admin socket here: the directory is the user's, as /etc/envoy would be
        // readable and an admin socket directory writable in an image.
        std::os::unix::fs::chown(dir.path(), Some(UID), Some(UID)).expect("chown");
        chmod(dir.path(), 0o755);
        let (cert_pem, key_pem) = certificate(1);
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, cert_pem).expect("cert");
        std::fs::write(&key, key_pem).expect("key");
        chmod(&key, 0o644);
        let port = free_port();
        let bootstrap = dir.path().join("envoy.yaml");
        std::fs::write(&bootstrap, tls_bootstrap(dir.path(), port, &cert, &key, None)).expect("bootstrap");
        let envoy = common::envoy_bin_for_anyone().to_string_lossy().into_owned();
        let command = [envoy.as_str(), "-c", bootstrap.to_str().expect("utf-8"), "--concurrency", "1"];
        let options: Vec<&str> =
            ["--envoy-user", USER, "--envoy-drain-time", "2s", "--envoy-parent-shutdown-time", "3s"]
                .into_iter()
                .chain(extra.iter().copied())
                .collect();
        let launcher = Launcher::start_with(Mode::Plain, &options, &command, |cmd| {
            // The launcher's temporary directory holds the runtime directory: the user must be
            // able to pass through it, as through /run.
            let args: Vec<_> = cmd.get_args().collect();
            let at = args.iter().position(|a| *a == "--runtime-dir").expect("--runtime-dir");
            chmod(Path::new(args[at + 1]).parent().expect("parent"), 0o711);
        });
        let admin = dir.path().join("admin.sock");
        wait_for(Duration::from_secs(30), "Envoy to be ready", || common::admin_get(&admin, "/ready") == Some(200));
        Unprivileged { launcher, port, dir, cert, key }
    }

    fn serial(&self) -> u64 {
        let (status, serial) = HttpsClient::new(self.port, false).get().expect("https request");
        assert_eq!(status, 200);
        serial
    }

    /// The current epoch's pid once epoch `epoch` serves and no reload is under way.
    fn epoch_pid(&self, epoch: u64) -> u64 {
        let status = self.launcher.wait_for_status(&format!("epoch {epoch} to serve"), |s| {
            s["current_epoch"] == epoch && s["reload"].is_null()
        });
        let epochs = status["epochs"].as_array().expect("epochs");
        let current = epochs.iter().find(|e| e["epoch"] == epoch).unwrap_or_else(|| panic!("epoch {epoch}: {status}"));
        current["pid"].as_u64().expect("pid")
    }

    fn assert_unprivileged(&self, epoch: u64) {
        let pid = self.epoch_pid(epoch);
        let ids = format!("{UID} {UID} {UID} {UID}");
        assert_eq!(credentials(pid), (ids.clone(), ids, UID.to_string()), "epoch {epoch} (pid {pid})");
    }
}

#[test]
fn envoy_runs_as_the_user_through_hot_restarts_a_rotation_and_the_drain() {
    let envoy = Unprivileged::start();
    envoy.assert_unprivileged(0);
    assert_eq!(credentials(envoy.launcher.pid() as u64).0, "0 0 0 0", "sesame stays root");
    // What Envoy writes is in a directory of its own; what only sesame uses stays root's.
    let run = envoy.launcher.runtime_dir();
    let meta = |p: &Path| std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(p).expect("metadata"));
    assert_eq!(meta(&run.join("envoy")), UID);
    assert!(!run.join("envoy-base-id").exists(), "nothing of Envoy's beside sesame's own files");
    assert_eq!(meta(&run.join("envoy/envoy-base-id")), UID, "Envoy wrote its base id itself");
    assert_eq!(meta(&run.join("control.sock")), 0);

    envoy.launcher.signal(Signal::SIGHUP);
    envoy.assert_unprivileged(1);

    let (cert_pem, key_pem) = certificate(2);
    replace_file(&envoy.cert, &cert_pem);
    replace_file(&envoy.key, &key_pem);
    envoy.assert_unprivileged(2);
    assert_eq!(envoy.serial(), 2, "the rotated certificate is served");

    envoy.launcher.wait_for_status("the old epoch to exit", |s| s["epochs"].as_array().is_some_and(|e| e.len() == 1));
    let mut launcher = envoy.launcher;
    launcher.signal(Signal::SIGTERM);
    assert_eq!(launcher.exit_code(Duration::from_secs(30)), 0, "log:\n{}", launcher.log());
    assert!(launcher.log().contains("connections reached the threshold"), "log:\n{}", launcher.log());
    drop(envoy.dir);
}

/// Envoy never reads the certificate files sesame gives it: a key only root can read (as `install
/// -m 600` leaves it) is read by sesame, checked, and served by the unprivileged Envoy.
#[test]
fn a_key_only_root_can_read_is_given_by_sesame_and_served_by_the_unprivileged_envoy() {
    let envoy = Unprivileged::start();
    let (cert_pem, key_pem) = certificate(2);
    // Written private to root, and only then moved into place.
    let tmp = envoy.dir.path().join("key.tmp");
    std::fs::write(&tmp, key_pem).expect("key");
    chmod(&tmp, 0o600);
    std::fs::rename(&tmp, &envoy.key).expect("rename");
    replace_file(&envoy.cert, &cert_pem);
    envoy.assert_unprivileged(1);
    assert_eq!(envoy.serial(), 2, "served from the bytes sesame read");
    let status = envoy.launcher.status();
    assert_eq!(status["last_reload"]["result"], "success", "{status:#}");
}

#[test]
fn an_envoy_binary_the_user_cannot_reach_is_refused_before_the_spawn_naming_the_directory() {
    let closed = tempfile::tempdir().expect("tempdir");
    chmod(closed.path(), 0o700);
    let envoy = closed.path().join("envoy");
    std::fs::copy(common::envoy_bin(), &envoy).expect("copy Envoy");
    chmod(&envoy, 0o755);
    let bootstrap = closed.path().join("envoy.yaml");
    std::fs::write(&bootstrap, "static_resources: {}\n").expect("bootstrap");
    let command = [envoy.to_str().expect("utf-8"), "-c", bootstrap.to_str().expect("utf-8")];
    let mut launcher = Launcher::start(Mode::Plain, &["--envoy-user", USER], &command);
    assert_eq!(launcher.exit_code(Duration::from_secs(10)), 1);
    let log = launcher.log();
    let expected = format!("the Envoy binary {} is not executable by the Envoy user {USER}", envoy.display());
    assert!(log.contains(&expected), "{log}");
    assert!(log.contains(&format!("cannot enter the directory {} (mode 0700", closed.path().display())), "{log}");
    assert!(!log.contains("started "), "nothing was spawned:\n{log}");
}

/// In place, Envoy's user reads the secrets but cannot touch the directories sesame writes keys
/// into: a link moved in place of one would have root write a key wherever it points.
#[test]
fn in_place_the_user_reads_its_secrets_and_cannot_move_their_directories() {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    let envoy = Unprivileged::start_with(&["--cert-reload", "in-place"]);
    let sds = envoy.launcher.runtime_dir().join("sds");
    let meta = |p: &Path| std::fs::symlink_metadata(p).expect("metadata");
    assert_eq!((meta(&sds).uid(), meta(&sds).mode() & 0o777), (0, 0o711), "sesame's, and not listable");
    let secret_dir = std::fs::read_dir(&sds).expect("sds").flatten().next().expect("one secret").path();
    assert_eq!((meta(&secret_dir).uid(), meta(&secret_dir).gid(), meta(&secret_dir).mode() & 0o777), (0, UID, 0o750));
    let secret = secret_dir.join("secret.json");
    assert_eq!((meta(&secret).uid(), meta(&secret).mode() & 0o777), (UID, 0o600), "Envoy's to read");
    let victim = tempfile::tempdir().expect("victim");
    chmod(victim.path(), 0o777);
    let attack = format!(
        "mv {sds} {sds}.old; ln -s {victim} {sds}; mv {dir} {dir}.old; ln -s {victim} {dir}",
        sds = sds.display(),
        dir = secret_dir.display(),
        victim = victim.path().display()
    );
    let tried = std::process::Command::new("sh").args(["-c", &attack]).uid(UID).gid(UID).output().expect("sh");
    assert!(!tried.status.success(), "the user cannot move them");
    let (cert_pem, key_pem) = certificate(2);
    replace_file(&envoy.key, &key_pem);
    replace_file(&envoy.cert, &cert_pem);
    wait_for(Duration::from_secs(15), "serial 2 to be served in place", || {
        HttpsClient::new(envoy.port, false).get().is_ok_and(|(_, s)| s == 2)
    });
    assert_eq!(envoy.launcher.status()["current_epoch"], 0, "in place, no new epoch");
    assert_eq!(std::fs::read_dir(victim.path()).expect("victim").count(), 0, "nothing written through a link");
    let mut launcher = envoy.launcher;
    launcher.signal(Signal::SIGTERM);
    assert_eq!(launcher.exit_code(Duration::from_secs(30)), 0, "log:\n{}", launcher.log());
    drop(envoy.dir);
}
