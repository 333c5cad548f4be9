//! An epoch's SDS files: the user's bootstrap (with `--config-yaml` merged) rewritten for SDS, and
//! every secret from checked bytes. Made (read and checked) by the preflight, written just before
//! the epoch that runs on them starts.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::SystemTime;

use super::{CheckedSecret, ensure_node, rewrite, write_secret};
use crate::bootstrap::Bootstrap;
use crate::certs::CertError;
use crate::user::EnvoyUser;

/// Where an in-place launcher keeps what it gives Envoy.
#[derive(Debug, Clone)]
pub struct SdsFiles {
    /// The watched directory of the secret files.
    pub dir: PathBuf,
    /// The rewritten bootstrap, which Envoy's `-c` names.
    pub bootstrap: PathBuf,
    /// Hot restarts only: the secrets inline in the bootstrap (static secrets), no secret files.
    pub inline: bool,
}

/// What an epoch will run on: the secrets of the user's bootstrap as it was read, each checked,
/// and the rewritten bootstrap. Nothing is written yet.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub secrets: Vec<CheckedSecret>,
    pub bootstrap: Vec<u8>,
    /// The same with every secret inline: what `envoy --mode validate` judges, so that it reads
    /// the bytes that were checked (and not the user's files, which Envoy's user may not read).
    pub validation: Vec<u8>,
    /// The node fields sesame set, for Envoy's SDS (none when the bootstrap has them).
    pub node_set: Vec<&'static str>,
}

impl Prepared {
    /// What is kept once Envoy's files are written: the secrets' records, without the bytes
    /// written, and neither bootstrap.
    pub fn into_records(self) -> Prepared {
        let secrets = self.secrets.into_iter().map(CheckedSecret::into_record).collect();
        Prepared { secrets, bootstrap: Vec::new(), validation: Vec::new(), node_set: self.node_set }
    }
}

impl SdsFiles {
    /// Rewrites `bootstrap` (read from `command`) and reads and checks every secret it names.
    /// Blocking.
    pub fn prepare(&self, bootstrap: &Bootstrap, command: &[OsString]) -> Result<Prepared, CertError> {
        let mut value = bootstrap.file_value().clone();
        let secrets = rewrite(&mut value, &self.dir);
        let secrets = super::check_secrets(&secrets, SystemTime::now())?;
        // Envoy refuses file-based SDS without a node, and needs none for static secrets.
        let node_set = if self.inline {
            super::inline::inline(&mut value, &secrets);
            Vec::new()
        } else if secrets.is_empty() {
            Vec::new()
        } else {
            // What the bootstrap lacks as Envoy merges it, set in the file (under --config-yaml).
            let missing = ensure_node(&mut bootstrap.value().clone(), command);
            if let Some(root) = value.as_object_mut() {
                let node = root.entry("node").or_insert_with(|| serde_json::json!({}));
                for field in &missing {
                    node[*field] = serde_json::json!("sesame");
                }
            }
            missing
        };
        let bootstrap = serde_json::to_vec_pretty(&value).unwrap_or_default();
        let validation = if self.inline {
            bootstrap.clone()
        } else {
            let mut inline = value;
            super::inline::inline(&mut inline, &secrets);
            serde_json::to_vec_pretty(&inline).unwrap_or_default()
        };
        Ok(Prepared { secrets, bootstrap, validation, node_set })
    }

    /// Where the bootstrap `envoy --mode validate` runs on is written.
    fn validation_path(&self) -> std::path::PathBuf {
        self.bootstrap.with_file_name("envoy-validate-bootstrap.json")
    }

    /// Writes the bootstrap the validator judges (private, Envoy's user's: it runs as that user).
    /// Blocking.
    pub fn write_validation(&self, prepared: &Prepared, user: Option<&EnvoyUser>) -> anyhow::Result<()> {
        let path = self.validation_path();
        crate::files::write_atomically(&path, &prepared.validation, 0o600)?;
        if let Some(user) = user {
            std::os::unix::fs::lchown(&path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))?;
        }
        Ok(())
    }

    /// `envoy --mode validate` on what was checked: the user's command with `-c` naming the
    /// validation bootstrap (`--config-yaml` stays, as for the epochs).
    pub fn validate_command(&self, user_command: &[OsString]) -> Vec<OsString> {
        let mut argv = crate::envoy::without_flag(user_command, "-c");
        argv = crate::envoy::without_flag(&argv, "--config-path");
        argv.extend(["-c".into(), self.validation_path().into()]);
        crate::envoy::validate_command(&argv)
    }

    /// Writes what was prepared: the secrets first (Envoy must find them when it reads the
    /// bootstrap), then the bootstrap. The secrets an epoch serves now are swapped too, to bytes
    /// that passed the same checks.
    pub fn write(&self, prepared: &Prepared, user: Option<&EnvoyUser>) -> anyhow::Result<()> {
        for secret in prepared.secrets.iter().filter(|_| !self.inline) {
            write_secret(secret, user)?;
        }
        if let Some(dir) = self.bootstrap.parent() {
            // Made again if it was deleted; Envoy's user passes through it to its files.
            crate::files::create_private_dir(dir)?;
            if user.is_some() {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
            }
        }
        // The secrets' directories are made (again) with them; the bootstrap is beside `sds/`.
        crate::files::write_atomically(&self.bootstrap, &prepared.bootstrap, 0o600)?;
        if let Some(user) = user {
            std::os::unix::fs::lchown(&self.bootstrap, Some(user.uid.as_raw()), Some(user.gid.as_raw()))?;
        }
        Ok(())
    }

    /// The Envoy command that runs on the rewritten bootstrap: `-c` names it, and `--config-yaml`
    /// stays, for Envoy to merge over it as over the file.
    pub fn command(&self, user_command: &[OsString]) -> Vec<OsString> {
        let mut argv = crate::envoy::without_flag(user_command, "-c");
        argv = crate::envoy::without_flag(&argv, "--config-path");
        argv.extend(["-c".into(), self.bootstrap.clone().into()]);
        argv
    }

    /// What a run left: the secrets (keys among them) and the bootstrap. At exit, and before a
    /// start (a run that was SIGKILLed left them).
    pub fn remove(&self) {
        for path in [&self.dir, &self.bootstrap, &self.validation_path()] {
            let removed = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
            if let Err(e) = removed
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }
}
