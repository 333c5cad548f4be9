//! The secrets' bytes: read once from the user's files, checked, and written for Envoy as SDS
//! resources, atomically, private to Envoy's user. What Envoy reads is what passed the checks.

use std::path::Path;
use std::time::SystemTime;

use serde_json::json;

use super::{Secret, SecretFiles};
use crate::certs::{self, CertError, TlsPair};
use crate::user::EnvoyUser;

/// A secret whose files passed the checks, with their bytes as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedSecret {
    pub secret: Secret,
    /// The SDS resource file's content: empty once it is written and only the record of what Envoy
    /// has is kept (a thousand certificates and keys held for ever would double the launcher's
    /// memory); `resource_hash` still tells it from another.
    pub resource: Vec<u8>,
    pub resource_hash: u64,
    /// For a certificate: its leaf's serial (lowercase hex) and notAfter (Unix seconds).
    pub leaf: Option<(String, i64)>,
    /// How many certificates the chain (or the CA bundle) holds: a file written in steps has
    /// fewer until it is whole.
    pub certificates: usize,
    /// A certificate's leaf issuer (the hash of its name) and whether Envoy alone judges its key
    /// (a type beyond sesame's checks); a CA bundle's subjects (hashes of their names).
    pub issuer: Option<u64>,
    pub key_judged_by_envoy: bool,
    pub subjects: Vec<u64>,
    /// The content hash of its files as read, in order: unchanged files need no check again.
    pub files_hash: u64,
}

impl CheckedSecret {
    /// The record of it, without the bytes.
    pub fn without_bytes(&self) -> CheckedSecret {
        let mut record = self.clone();
        record.resource = Vec::new();
        record
    }

    /// The same, made of this one.
    pub fn into_record(mut self) -> CheckedSecret {
        self.resource = Vec::new();
        self
    }

    /// Whether its files still hold what was checked (one read each, no parsing). Blocking.
    pub fn files_unchanged(&self) -> bool {
        let read: Option<Vec<Vec<u8>>> = self.secret.files.paths().iter().map(|p| std::fs::read(p).ok()).collect();
        read.is_some_and(|bytes| files_hash(&bytes) == self.files_hash)
    }

    /// Where the secret's certificate (or CA bundle) comes from, as the user named it.
    pub fn path(&self) -> &Path {
        match &self.secret.files {
            SecretFiles::Certificate { chain, .. } => chain,
            SecretFiles::TrustedCa { ca, .. } => ca,
        }
    }
}

/// Reads and checks every secret's files at `now`; the first failure names its file.
pub fn check_secrets(secrets: &[Secret], now: SystemTime) -> Result<Vec<CheckedSecret>, CertError> {
    secrets.iter().map(|secret| check_secret(secret, now)).collect()
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|e| CertError::Unreadable { what, path: path.into(), error: e.to_string() })
}

fn text(path: &Path, what: &'static str, bytes: Vec<u8>) -> Result<String, CertError> {
    String::from_utf8(bytes).map_err(|_| CertError::BadPem { what, path: path.into(), fault: "not PEM text".into() })
}

fn files_hash(contents: &[Vec<u8>]) -> u64 {
    let mut all = Vec::with_capacity(contents.iter().map(|c| c.len() + 8).sum());
    for content in contents {
        all.extend_from_slice(&(content.len() as u64).to_le_bytes());
        all.extend_from_slice(content);
    }
    crate::files::content_hash(&all)
}

pub fn check_secret(secret: &Secret, now: SystemTime) -> Result<CheckedSecret, CertError> {
    let hash;
    let (mut issuer, mut key_judged_by_envoy, mut subjects) = (None, false, Vec::new());
    let (content, leaf, certificates) = match &secret.files {
        SecretFiles::Certificate { chain, key } => {
            let (chain_bytes, key_bytes) = (read(chain, "certificate")?, read(key, "private key")?);
            hash = files_hash(&[chain_bytes.clone(), key_bytes.clone()]);
            let pair = TlsPair { cert: chain.clone(), key: key.clone(), key_password: false };
            let checked = certs::check_pair_bytes(&pair, &chain_bytes, &key_bytes, now)?;
            (issuer, key_judged_by_envoy) = (Some(checked.issuer), checked.key_left_to_envoy.is_some());
            let (chain_text, key_text) =
                (text(chain, "certificate", chain_bytes)?, text(key, "private key", key_bytes)?);
            let certificates = checked.certificates;
            let content = json!({ "tls_certificate": {
                "certificate_chain": { "inline_string": chain_text },
                "private_key": { "inline_string": key_text },
            }});
            (content, Some((checked.serial, checked.not_after_unix)), certificates)
        }
        SecretFiles::TrustedCa { ca, crl } => {
            let ca_bytes = read(ca, "CA bundle")?;
            let crl_bytes = crl.as_ref().map(|crl| read(crl, "CRL")).transpose()?;
            hash = files_hash(&std::iter::once(ca_bytes.clone()).chain(crl_bytes.clone()).collect::<Vec<_>>());
            subjects = certs::bundle_subjects(ca, &ca_bytes)?;
            if let (Some(crl), Some(bytes)) = (crl, &crl_bytes) {
                certs::check_crl(crl, bytes)?;
            }
            let ca_text = text(ca, "CA bundle", ca_bytes)?;
            let certificates = subjects.len();
            let mut context = json!({ "trusted_ca": { "inline_string": ca_text } });
            if let (Some(crl), Some(bytes)) = (crl, crl_bytes) {
                context["crl"] = json!({ "inline_string": text(crl, "CRL", bytes)? });
            }
            (json!({ "validation_context": context }), None, certificates)
        }
    };
    let mut resource = content;
    resource["@type"] = json!("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret");
    resource["name"] = json!(secret.name);
    let resource = serde_json::to_vec(&json!({ "resources": [resource] })).unwrap_or_default();
    let files_hash = hash;
    Ok(CheckedSecret {
        secret: secret.clone(),
        resource_hash: crate::files::content_hash(&resource),
        resource,
        leaf,
        certificates,
        files_hash,
        issuer,
        key_judged_by_envoy,
        subjects,
    })
}

/// The directories a secret is written in: the runtime directory, `sds/` and the secret's own, made
/// again when they are gone (the runtime directory deleted under a running launcher). All are the
/// launcher's, so that Envoy's user cannot move a link in their place; with `--envoy-user`, the first
/// two let that user through and the secret's own lets its group read it (Envoy watches it).
fn ensure_dirs(secret_dir: &Path, user: Option<&EnvoyUser>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let sds = secret_dir.parent();
    let runtime = sds.and_then(Path::parent);
    for (dir, mode) in [(runtime, 0o711), (sds, 0o711), (Some(secret_dir), 0o750)] {
        let Some(dir) = dir else { continue };
        crate::files::create_private_dir(dir)?;
        let Some(user) = user else { continue };
        if mode == 0o750 {
            std::os::unix::fs::lchown(dir, None, Some(user.gid.as_raw()))?;
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Writes `checked` where Envoy reads it: by rename into its watched directory (Envoy swaps the
/// secret on the move), mode 0600, owned by Envoy's user when it runs as another.
pub fn write_secret(checked: &CheckedSecret, user: Option<&EnvoyUser>) -> anyhow::Result<()> {
    write_secret_file(&checked.secret.path, &checked.resource, user)
}

/// Writes `resource` as the secret file `path` (see `write_secret`).
pub fn write_secret_file(path: &Path, resource: &[u8], user: Option<&EnvoyUser>) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        ensure_dirs(dir, user)?;
    }
    let tmp = path.with_extension("writing");
    // A leftover (or planted) temporary file or link is removed, never written through.
    let _ = std::fs::remove_file(&tmp);
    let failed = |e: std::io::Error| anyhow::anyhow!("cannot write the secret {}: {e}", path.display());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&tmp)
        .map_err(failed)?;
    // No fsync: the file lives as long as the launcher (made again at every start), and the rename
    // alone makes it whole for Envoy; a sync per secret would block the supervisor at an epoch's
    // start for every certificate.
    file.write_all(resource).map_err(failed)?;
    // Given away before the rename: Envoy must be able to read it the moment it appears.
    if let Some(user) = user {
        std::os::unix::fs::fchown(&file, Some(user.uid.as_raw()), Some(user.gid.as_raw())).map_err(failed)?;
    }
    std::fs::rename(&tmp, path).map_err(failed)
}
