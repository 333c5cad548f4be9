//! The embedded demo: an Envoy bootstrap with an admin unix socket, an HTTP and an HTTPS listener,
//! and a self-signed certificate generated on first use. One command shows the whole product.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::files::{create_private_dir, write_atomically};
use crate::user::EnvoyUser;

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
    /// The demo's files in `runtime_dir/demo`, its admin socket in `envoy_dir` (where Envoy can
    /// bind it: the runtime directory, or its `envoy/` with `--envoy-user`).
    pub fn new(runtime_dir: &Path, envoy_dir: &Path) -> Self {
        let dir = runtime_dir.join("demo");
        Demo {
            bootstrap: dir.join("envoy.yaml"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            admin_socket: envoy_dir.join("envoy-admin.sock"),
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

    /// Lets `user` (`--envoy-user`) read the demo: its directory searchable, the key its own.
    pub fn share_with(&self, user: &EnvoyUser) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.bootstrap.parent().context("demo directory")?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
            .with_context(|| format!("cannot make {} searchable", dir.display()))?;
        std::os::unix::fs::lchown(&self.key, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
            .with_context(|| format!("cannot give {} to {}", self.key.display(), user.label))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn bootstrap_has_every_placeholder_filled() {
        let demo = Demo::new(Path::new("/run/with \"quote\""), Path::new("/run/with \"quote\""));
        let yaml = demo.bootstrap_yaml(18080, 18443);
        assert!(!yaml.contains("{admin_socket}") && !yaml.contains("{cert}") && !yaml.contains("{http_port}"));
        assert!(yaml.contains("port_value: 18080") && yaml.contains("port_value: 18443"));
        assert!(yaml.contains(r#"path: "/run/with \"quote\"/envoy-admin.sock""#), "{yaml}");
    }

    #[test]
    fn prepare_generates_a_certificate_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let demo = Demo::new(dir.path(), dir.path());
        demo.prepare(1, 2).expect("prepare");
        let first = fs::read(&demo.cert).expect("cert");
        assert!(String::from_utf8_lossy(&first).starts_with("-----BEGIN CERTIFICATE-----"));
        demo.prepare(1, 2).expect("prepare again");
        assert_eq!(fs::read(&demo.cert).expect("cert"), first, "an existing certificate is kept");
    }
}
