//! The embedded demo: an Envoy bootstrap with an admin unix socket, an HTTP and an HTTPS listener,
//! and a self-signed certificate generated on first use. One command shows the whole product.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

const BOOTSTRAP_TEMPLATE: &str = include_str!("demo/bootstrap.yaml");

/// The files of a prepared demo, all under the runtime directory.
#[derive(Debug, Clone)]
pub struct Demo {
    pub bootstrap: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub admin_socket: PathBuf,
}

impl Demo {
    pub fn new(runtime_dir: &Path) -> Self {
        let dir = runtime_dir.join("demo");
        Demo {
            bootstrap: dir.join("envoy.yaml"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            admin_socket: runtime_dir.join("envoy-admin.sock"),
        }
    }

    /// Writes the bootstrap for these ports and, when there is none yet, a self-signed certificate
    /// for localhost and 127.0.0.1. An existing certificate is kept: it may be one the user rotated in.
    pub fn prepare(&self, http_port: u16, https_port: u16) -> anyhow::Result<()> {
        create_private_dir(self.bootstrap.parent().context("demo directory")?)?;
        if !(self.cert.exists() && self.key.exists()) {
            let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .context("cannot generate the demo certificate")?;
            write_atomically(&self.key, generated.signing_key.serialize_pem().as_bytes(), 0o600)?;
            write_atomically(&self.cert, generated.cert.pem().as_bytes(), 0o644)?;
        }
        write_atomically(&self.bootstrap, self.bootstrap_yaml(http_port, https_port).as_bytes(), 0o644)
    }

    fn bootstrap_yaml(&self, http_port: u16, https_port: u16) -> String {
        // A JSON string is a valid YAML double-quoted scalar, so any path is quoted correctly.
        let quoted = |path: &Path| serde_json::Value::from(path.to_string_lossy()).to_string();
        BOOTSTRAP_TEMPLATE
            .replace("\"{admin_socket}\"", &quoted(&self.admin_socket))
            .replace("\"{cert}\"", &quoted(&self.cert))
            .replace("\"{key}\"", &quoted(&self.key))
            .replace("{http_port}", &http_port.to_string())
            .replace("{https_port}", &https_port.to_string())
    }
}

/// Creates `dir` and its parents, readable by the owner only (it holds keys and sockets). One that
/// exists already must be ours and writable by nobody else, or another user could plant files there.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    let meta = fs::symlink_metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let euid = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != euid || meta.mode() & 0o022 != 0 {
        anyhow::bail!(
            "directory {} is not safe for keys and sockets: it must be a directory owned by uid {euid} \
             and writable by no one else (found uid {}, mode {:o})",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

/// Replaces `path` by rename, so that Envoy (or a watcher) never sees half a file.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    // A leftover (or planted) temporary file or symlink is removed, never written through.
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(contents).with_context(|| format!("cannot write {}", tmp.display()))?;
    file.sync_all().with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_has_every_placeholder_filled() {
        let demo = Demo::new(Path::new("/run/with \"quote\""));
        let yaml = demo.bootstrap_yaml(18080, 18443);
        assert!(!yaml.contains("{admin_socket}") && !yaml.contains("{cert}") && !yaml.contains("{http_port}"));
        assert!(yaml.contains("port_value: 18080") && yaml.contains("port_value: 18443"));
        assert!(yaml.contains(r#"path: "/run/with \"quote\"/envoy-admin.sock""#), "{yaml}");
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = dir.path().join("shared");
        fs::create_dir(&shared).expect("mkdir");
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = create_private_dir(&shared).expect_err("world-writable");
        assert!(format!("{err}").contains("is not safe"), "{err}");
        assert!(create_private_dir(&dir.path().join("new/private")).is_ok());
    }

    #[test]
    fn prepare_generates_a_certificate_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let demo = Demo::new(dir.path());
        demo.prepare(1, 2).expect("prepare");
        let first = fs::read(&demo.cert).expect("cert");
        assert!(String::from_utf8_lossy(&first).starts_with("-----BEGIN CERTIFICATE-----"));
        demo.prepare(1, 2).expect("prepare again");
        assert_eq!(fs::read(&demo.cert).expect("cert"), first, "an existing certificate is kept");
    }
}
