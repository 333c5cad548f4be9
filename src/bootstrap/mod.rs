//! Reading Envoy's bootstrap: where its config is (from the command line), the admin address, and
//! the files it references. YAML or JSON; the launcher only reads, Envoy stays the judge of validity.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

use crate::certs::TlsPair;
use crate::envoy::flag_value;
use crate::http::Endpoint;

mod parsed;
pub use parsed::{forget_parsed, keep_parsed_in};

/// The parsed bootstrap: the `-c` file, with `--config-yaml` merged over it as Envoy does.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// The `-c` file, None when the whole config is given with `--config-yaml`.
    pub path: Option<PathBuf>,
    /// The `-c` file is a protobuf (`.pb`, `.pb_text`), which Envoy reads and sesame does not:
    /// only the `--config-yaml` over it is known.
    pub opaque: bool,
    value: Value,
    /// The `-c` file alone, before `--config-yaml`; None without one (it is `value` then).
    file: Option<Value>,
    /// The content hash (`files::content_hash`) of the `-c` file as read; None when not read.
    content_hash: Option<u64>,
}

/// What the launcher read of the bootstrap at start: the files it names, and the content hash of
/// the `-c` file they were read from (None when that file was not read: none, or a protobuf). The
/// watcher starts from it instead of parsing the bootstrap again, unless the file changed since.
#[derive(Debug, Clone)]
pub struct BootstrapFiles {
    pub referenced: Vec<PathBuf>,
    pub content_hash: Option<u64>,
}

impl Bootstrap {
    /// Loads the bootstrap that `argv` (an Envoy command line) names; None when it names none.
    pub fn from_command(argv: &[OsString]) -> anyhow::Result<Option<Bootstrap>> {
        let path = crate::envoy::config_path(argv);
        let inline = flag_value(argv, &["--config-yaml"]).map(|v| v.to_string_lossy().into_owned());
        if path.is_none() && inline.is_none() {
            return Ok(None);
        }
        let opaque = path.as_deref().is_some_and(is_protobuf);
        let (mut value, content_hash) = match &path {
            Some(path) if !opaque => {
                let (value, hash) = parsed::parse_file(path)?;
                (value, Some(hash))
            }
            _ => (Value::Object(Default::default()), None),
        };
        let mut file = None;
        if let Some(yaml) = inline {
            let overlay: Value = serde_saphyr::from_str(&yaml).context("--config-yaml is not valid YAML")?;
            file = Some(value.clone());
            merge(&mut value, overlay);
        }
        Ok(Some(Bootstrap { path, opaque, value, file, content_hash }))
    }

    /// The parsed bootstrap, as Envoy will read it (`--config-yaml` merged).
    pub fn value(&self) -> &Value {
        &self.value
    }

    /// The `-c` file alone, as parsed: what a rewrite for Envoy starts from, with Envoy still
    /// merging `--config-yaml` over it itself (sesame's merge knows only some of protobuf's oneofs).
    pub fn file_value(&self) -> &Value {
        self.file.as_ref().unwrap_or(&self.value)
    }

    /// The admin address: `admin.address.pipe.path` or `admin.address.socket_address` (Envoy also
    /// accepts the camelCase spelling of each field).
    pub fn admin_address(&self) -> Option<Endpoint> {
        let address = self.value.get("admin")?.get("address")?;
        if let Some(path) = field(address, "pipe").and_then(|pipe| pipe.get("path")).and_then(Value::as_str) {
            return Some(Endpoint::Unix(PathBuf::from(path)));
        }
        let socket = field(address, "socket_address")?;
        let host = socket.get("address").and_then(Value::as_str).unwrap_or("127.0.0.1");
        let port = field(socket, "port_value").and_then(|p| p.as_u64().or_else(|| p.as_str()?.parse().ok()))?;
        // An admin bound to every address is reached on loopback.
        let host = match host {
            "0.0.0.0" => "127.0.0.1",
            "::" => "::1",
            other => other,
        };
        Some(Endpoint::Tcp(host.to_string(), u16::try_from(port).ok()?))
    }
}

/// Envoy's stats flush interval when the bootstrap does not set one.
pub const DEFAULT_STATS_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

impl Bootstrap {
    /// `stats_flush_interval` (a proto JSON duration such as "10s" or "0.5s").
    pub fn stats_flush_interval(&self) -> Option<std::time::Duration> {
        let text = field(&self.value, "stats_flush_interval")?.as_str()?;
        let secs: f64 = text.strip_suffix('s')?.parse().ok()?;
        std::time::Duration::try_from_secs_f64(secs).ok()
    }
}

/// A field by its proto name (snake_case) or its JSON name (camelCase), both of which Envoy reads.
fn field<'a>(object: &'a Value, snake: &str) -> Option<&'a Value> {
    object.get(snake).or_else(|| object.get(camel_case(snake)))
}

pub fn camel_case(snake: &str) -> String {
    let mut parts = snake.split('_');
    let mut name = parts.next().unwrap_or_default().to_string();
    for part in parts {
        let mut chars = part.chars();
        name.extend(chars.next().map(|c| c.to_ascii_uppercase()));
        name.push_str(chars.as_str());
    }
    name
}

impl Bootstrap {
    /// Every file the bootstrap names with a `filename:` (certificate chains, keys, CAs, ...).
    pub fn referenced_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        visit(&self.value, &mut |object| {
            if let Some(name) = object.get("filename").and_then(Value::as_str) {
                files.push(PathBuf::from(name));
            }
        });
        files.sort();
        files.dedup();
        files
    }

    /// The files it names, with the hash of the content they were read from.
    pub fn files(&self) -> BootstrapFiles {
        BootstrapFiles { referenced: self.referenced_files(), content_hash: self.content_hash }
    }

    /// The stat names (`listener.<name>.`) of the static listeners whose traffic_direction is
    /// INBOUND: their `stat_prefix`, or their address with ':' as '_' as Envoy writes it. None
    /// when the bootstrap has no static listeners (they come from LDS).
    pub fn inbound_listener_stat_names(&self) -> Option<Vec<String>> {
        let listeners = field(field(&self.value, "static_resources")?, "listeners")?.as_array()?;
        let inbound =
            listeners.iter().filter(|l| field(l, "traffic_direction").and_then(Value::as_str) == Some("INBOUND"));
        Some(
            inbound
                .filter_map(|l| {
                    if let Some(prefix) = field(l, "stat_prefix").and_then(Value::as_str) {
                        return Some(prefix.to_string());
                    }
                    let socket = field(l.get("address")?, "socket_address")?;
                    let host = socket.get("address")?.as_str()?;
                    let port = field(socket, "port_value")?;
                    let port = port.as_u64().map(|p| p.to_string()).or_else(|| port.as_str().map(str::to_string))?;
                    let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
                    Some(format!("{host}:{port}").replace(':', "_"))
                })
                .collect(),
        )
    }

    /// The TCP addresses the static listeners bind, with whether each lets a second process bind
    /// beside it (`enable_reuse_port`, true unless set false). Listeners from LDS are not known.
    pub fn listener_binds(&self) -> Vec<ListenerBind> {
        let Some(listeners) =
            field(&self.value, "static_resources").and_then(|r| field(r, "listeners")).and_then(Value::as_array)
        else {
            return Vec::new();
        };
        listeners
            .iter()
            .filter_map(|l| {
                let socket = field(l.get("address")?, "socket_address")?;
                if socket.get("protocol").and_then(Value::as_str) == Some("UDP") {
                    return None;
                }
                let port = field(socket, "port_value")?;
                let port = port.as_u64().or_else(|| port.as_str()?.parse().ok())?;
                let host = socket.get("address").and_then(Value::as_str).unwrap_or("0.0.0.0");
                let name = l.get("name").and_then(Value::as_str).unwrap_or("(unnamed)");
                let reuse_port = field(l, "enable_reuse_port").and_then(Value::as_bool).unwrap_or(true);
                Some(ListenerBind {
                    name: name.to_string(),
                    host: host.to_string(),
                    port: u16::try_from(port).ok()?,
                    reuse_port,
                })
            })
            .collect()
    }

    /// The certificate/key pairs of every `tls_certificates` entry given by file name.
    pub fn tls_pairs(&self) -> Vec<TlsPair> {
        let mut pairs = Vec::new();
        visit(&self.value, &mut |object| {
            let member = |key: &str| object.get(key).or_else(|| object.get(&camel_case(key)));
            let file = |key: &str| member(key)?.get("filename")?.as_str().map(PathBuf::from);
            if let (Some(cert), Some(key)) = (file("certificate_chain"), file("private_key")) {
                let key_password = member("password").is_some_and(|p| !p.is_null());
                pairs.push(TlsPair { cert, key, key_password });
            }
        });
        pairs.dedup();
        pairs
    }
}

/// Calls `f` on every object in the tree.
fn visit(value: &Value, f: &mut impl FnMut(&serde_json::Map<String, Value>)) {
    match value {
        Value::Object(object) => {
            f(object);
            object.values().for_each(|v| visit(v, f));
        }
        Value::Array(items) => items.iter().for_each(|v| visit(v, f)),
        _ => {}
    }
}

/// A TCP address a static listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerBind {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub reuse_port: bool,
}

/// Envoy reads a bootstrap by its extension: `.pb` as binary protobuf, `.pb_text` as text protobuf,
/// anything else as YAML or JSON.
fn is_protobuf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "pb" || e == "pb_text")
}

/// The members of the address oneof: setting one clears the others.
const ADDRESS_ONEOF: &[&str] =
    &["pipe", "socket_address", "socketAddress", "envoy_internal_address", "envoyInternalAddress"];

/// Envoy merges `--config-yaml` over the file as protobuf's `MergeFrom` does: messages field by
/// field (a field named in either spelling), repeated fields appended (a listener added), an `Any`
/// (a `typed_config`, known by its `@type`) and scalars replaced, and a member of a oneof replaces
/// its siblings.
fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) if !overlay.contains_key("@type") => {
            if overlay.keys().any(|k| ADDRESS_ONEOF.contains(&k.as_str())) {
                base.retain(|k, _| !ADDRESS_ONEOF.contains(&k.as_str()) || overlay.contains_key(k));
            }
            for (key, value) in overlay {
                let same = |k: &String| k == &key || camel_case(k) == camel_case(&key);
                let key = base.keys().find(|k| same(k)).cloned().unwrap_or(key);
                merge(base.entry(key).or_insert(Value::Null), value);
            }
        }
        (Value::Array(base), Value::Array(overlay)) => base.extend(overlay),
        (base, overlay) => *base = overlay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    fn argv(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn reads_a_pipe_admin_from_yaml() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), "b.yaml", "admin:\n  address:\n    pipe: { path: /run/e/admin.sock }\n");
        let bootstrap = Bootstrap::from_command(&argv(&["envoy", "-c", path.to_str().expect("utf8")])).expect("load");
        let admin = bootstrap.expect("some").admin_address();
        assert_eq!(admin, Some(Endpoint::Unix("/run/e/admin.sock".into())));
    }

    #[test]
    fn reads_a_socket_admin_from_json_and_config_yaml_overrides() {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = r#"{"admin":{"address":{"socket_address":{"address":"0.0.0.0","port_value":9901}}}}"#;
        let path = write(dir.path(), "b.json", json);
        let path_arg = format!("--config-path={}", path.display());
        let loaded = Bootstrap::from_command(&argv(&["envoy", &path_arg])).expect("load").expect("some");
        assert_eq!(loaded.admin_address(), Some(Endpoint::Tcp("127.0.0.1".into(), 9901)));

        let overlay = "admin: { address: { socket_address: { port_value: 9902 } } }";
        let loaded = Bootstrap::from_command(&argv(&["envoy", &path_arg, "--config-yaml", overlay]))
            .expect("load")
            .expect("some");
        assert_eq!(loaded.admin_address(), Some(Endpoint::Tcp("127.0.0.1".into(), 9902)));
    }

    #[test]
    fn config_yaml_appends_to_repeated_fields_and_replaces_a_typed_config_as_envoy_does() {
        let mut base: Value = serde_json::json!({
            "static_resources": { "listeners": [{ "name": "plain" }] },
            "stats_config": { "stats_tags": [{ "tag_name": "a" }] },
            "admin": { "access_log": [{ "typed_config": { "@type": "t/File", "path": "/a", "log_format": {} } }] },
        });
        let overlay = serde_json::json!({
            "staticResources": { "listeners": [{ "name": "tls" }] },
            "admin": { "access_log": [{ "typed_config": { "@type": "t/File", "path": "/b" } }] },
        });
        merge(&mut base, overlay);
        let names: Vec<&str> = base["static_resources"]["listeners"]
            .as_array()
            .expect("listeners")
            .iter()
            .filter_map(|l| l["name"].as_str())
            .collect();
        assert_eq!(names, ["plain", "tls"], "appended, under the file's spelling: {base}");
        assert!(base.get("staticResources").is_none());
        let logs = base["admin"]["access_log"].as_array().expect("logs");
        assert_eq!(logs.len(), 2);
        assert_eq!(logs[1]["typed_config"], serde_json::json!({ "@type": "t/File", "path": "/b" }));
        let mut base = serde_json::json!({ "x": { "typed_config": { "@type": "A", "p": 1 } } });
        merge(&mut base, serde_json::json!({ "x": { "typed_config": { "@type": "A", "q": 2 } } }));
        assert_eq!(base["x"]["typed_config"], serde_json::json!({ "@type": "A", "q": 2 }), "an Any is replaced whole");
    }

    #[test]
    fn reads_camel_case_and_config_yaml_replaces_the_address_kind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = r#"{"admin":{"address":{"socketAddress":{"address":"::","portValue":"9903"}}}}"#;
        let path = write(dir.path(), "b.json", json);
        let path = path.to_str().expect("utf8");
        let loaded = Bootstrap::from_command(&argv(&["envoy", "-c", path])).expect("load").expect("some");
        assert_eq!(loaded.admin_address(), Some(Endpoint::Tcp("::1".into(), 9903)));

        let overlay = "admin: { address: { pipe: { path: /run/a.sock } } }";
        let loaded = Bootstrap::from_command(&argv(&["envoy", "-c", path, "--config-yaml", overlay])).expect("load");
        assert_eq!(loaded.expect("some").admin_address(), Some(Endpoint::Unix("/run/a.sock".into())));
    }

    #[test]
    fn names_the_inbound_listeners_as_their_stats_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let yaml = r#"
static_resources:
  listeners:
  - name: in
    traffic_direction: INBOUND
    address: { socket_address: { address: 0.0.0.0, port_value: 8443 } }
  - name: in6
    traffic_direction: INBOUND
    address: { socket_address: { address: "::1", port_value: 8444 } }
  - name: named
    trafficDirection: INBOUND
    statPrefix: public
  - name: out
    traffic_direction: OUTBOUND
    address: { socket_address: { address: 127.0.0.1, port_value: 15001 } }
"#;
        let path = write(dir.path(), "b.yaml", yaml);
        let loaded = Bootstrap::from_command(&argv(&["envoy", "-c", path.to_str().expect("utf8")])).expect("load");
        let names = loaded.expect("some").inbound_listener_stat_names();
        assert_eq!(names, Some(vec!["0.0.0.0_8443".into(), "[__1]_8444".into(), "public".into()]));
    }

    #[test]
    fn no_config_and_no_admin() {
        assert!(Bootstrap::from_command(&argv(&["envoy", "--version"])).expect("load").is_none());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), "b.yaml", "static_resources: {}\n");
        let loaded = Bootstrap::from_command(&argv(&["envoy", "-c", path.to_str().expect("utf8")])).expect("load");
        assert_eq!(loaded.expect("some").admin_address(), None);
    }

    #[test]
    fn finds_referenced_files_and_tls_pairs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let yaml = r#"
static_resources:
  listeners:
  - filter_chains:
    - transport_socket:
        typed_config:
          common_tls_context:
            tls_certificates:
            - certificate_chain: { filename: /c/a.crt }
              private_key: { filename: /c/a.key }
            - certificate_chain: { inline_string: "inline" }
              private_key: { inline_string: "inline" }
            validation_context:
              trusted_ca: { filename: /c/ca.crt }
"#;
        let path = write(dir.path(), "b.yaml", yaml);
        let loaded = Bootstrap::from_command(&argv(&["envoy", "-c", path.to_str().expect("utf8")])).expect("load");
        let loaded = loaded.expect("some");
        let files: Vec<PathBuf> = ["/c/a.crt", "/c/a.key", "/c/ca.crt"].iter().map(PathBuf::from).collect();
        assert_eq!(loaded.referenced_files(), files);
        let pair = TlsPair { cert: "/c/a.crt".into(), key: "/c/a.key".into(), key_password: false };
        assert_eq!(loaded.tls_pairs(), vec![pair]);
        assert_eq!(loaded.path, Some(path));
    }

    #[test]
    fn a_missing_or_broken_file_names_itself() {
        let err = Bootstrap::from_command(&argv(&["envoy", "-c", "/nonexistent/b.yaml"])).expect_err("missing");
        assert!(format!("{err:#}").contains("/nonexistent/b.yaml"), "{err:#}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), "b.yaml", "admin: [unclosed\n");
        let err = Bootstrap::from_command(&argv(&["envoy", "-c", path.to_str().expect("utf8")])).expect_err("broken");
        assert!(format!("{err:#}").contains("cannot parse the bootstrap"), "{err:#}");
    }

    #[test]
    fn finds_camel_case_tls_pairs_and_their_password() {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = r#"{"staticResources":{"listeners":[{"filterChains":[{"transportSocket":{"typedConfig":{
            "commonTlsContext":{"tlsCertificates":[
                {"certificateChain":{"filename":"/c/a.crt"},"privateKey":{"filename":"/c/a.key"},
                 "password":{"inlineString":"s3cret"}}]}}}}]}]}}"#;
        let path = write(dir.path(), "b.json", json);
        let loaded = Bootstrap::from_command(&argv(&["envoy", "-c", path.to_str().expect("utf8")])).expect("load");
        let pair = TlsPair { cert: "/c/a.crt".into(), key: "/c/a.key".into(), key_password: true };
        assert_eq!(loaded.expect("some").tls_pairs(), vec![pair]);
    }

    #[test]
    fn reads_the_stats_flush_interval() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), "b.yaml", "stats_flush_interval: 2.5s\n");
        let loaded = Bootstrap::from_command(&argv(&["envoy", "-c", path.to_str().expect("utf8")])).expect("load");
        assert_eq!(loaded.expect("some").stats_flush_interval(), Some(std::time::Duration::from_millis(2500)));
        let path = write(dir.path(), "c.yaml", "static_resources: {}\n");
        let loaded = Bootstrap::from_command(&argv(&["envoy", "-c", path.to_str().expect("utf8")])).expect("load");
        assert_eq!(loaded.expect("some").stats_flush_interval(), None);
    }

    #[test]
    fn a_protobuf_bootstrap_is_opaque_and_config_yaml_still_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), "b.pb_text", "admin { address { pipe { path: \"/x\" } } }\n");
        let path = path.to_str().expect("utf8");
        let loaded = Bootstrap::from_command(&argv(&["envoy", "-c", path])).expect("no parse error").expect("some");
        assert!(loaded.opaque);
        assert_eq!(loaded.admin_address(), None, "what sesame cannot read it does not guess");
        assert!(loaded.referenced_files().is_empty());
        let overlay = "admin: { address: { pipe: { path: /run/a.sock } } }";
        let loaded = Bootstrap::from_command(&argv(&["envoy", "-c", path, "--config-yaml", overlay])).expect("load");
        assert_eq!(loaded.expect("some").admin_address(), Some(Endpoint::Unix("/run/a.sock".into())));
    }
}
