//! The bootstrap rewritten for file-based SDS: every static TLS certificate and trusted CA that the
//! bootstrap names by file becomes an SDS secret read from a file sesame writes, so that Envoy never
//! reads the user's files for them. Pure: it changes the parsed bootstrap and says what each secret
//! is made of; writing is `secrets`'.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

/// What one secret is made of: the user's files it stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SecretFiles {
    /// A `tls_certificates` entry: its certificate chain and private key.
    Certificate { chain: PathBuf, key: PathBuf },
    /// A `validation_context`'s `trusted_ca` (and `crl`, when given by file too).
    TrustedCa { ca: PathBuf, crl: Option<PathBuf> },
}

impl SecretFiles {
    pub fn paths(&self) -> Vec<&Path> {
        match self {
            SecretFiles::Certificate { chain, key } => vec![chain, key],
            SecretFiles::TrustedCa { ca, crl } => std::iter::once(ca.as_path()).chain(crl.as_deref()).collect(),
        }
    }

    /// The file `which` of `paths()` (0 or 1), without building the list.
    pub fn file(&self, which: usize) -> Option<&Path> {
        match (self, which) {
            (SecretFiles::Certificate { chain, .. }, 0) => Some(chain),
            (SecretFiles::Certificate { key, .. }, 1) => Some(key),
            (SecretFiles::TrustedCa { ca, .. }, 0) => Some(ca),
            (SecretFiles::TrustedCa { crl, .. }, 1) => crl.as_deref(),
            _ => None,
        }
    }
}

/// A secret of the rewritten bootstrap: its SDS name and the file Envoy reads it from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    pub name: String,
    pub files: SecretFiles,
    pub path: PathBuf,
}

/// The name of the secret made of `files`: the same files in two contexts are one secret.
fn secret_name(files: &SecretFiles) -> String {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    files.hash(&mut hasher);
    let kind = match files {
        SecretFiles::Certificate { .. } => "cert",
        SecretFiles::TrustedCa { .. } => "ca",
    };
    format!("sesame-{kind}-{:016x}", hasher.finish())
}

/// A field by its proto name or its JSON (camelCase) name, as Envoy reads both; the key found.
fn key_of(object: &Map<String, Value>, snake: &str) -> Option<String> {
    if object.contains_key(snake) {
        return Some(snake.to_string());
    }
    let camel = crate::bootstrap::camel_case(snake);
    object.contains_key(&camel).then_some(camel)
}

fn filename(object: &Map<String, Value>, snake: &str) -> Option<PathBuf> {
    let value = object.get(&key_of(object, snake)?)?;
    let only_filename = value.as_object()?.len() == 1;
    value.get("filename")?.as_str().filter(|_| only_filename).map(PathBuf::from)
}

/// Rewrites `bootstrap` so that its file-named certificates and CAs come from secret files in `dir`;
/// returns the secrets, each once. Entries it does not understand as plain files (a password, an
/// OCSP staple, inline bytes, secrets already given by SDS) are left as they are.
pub fn rewrite(bootstrap: &mut Value, dir: &Path) -> Vec<Secret> {
    let mut secrets = Vec::new();
    walk(bootstrap, dir, &mut secrets);
    secrets.sort_by(|a: &Secret, b| a.name.cmp(&b.name));
    secrets.dedup_by(|a, b| a.name == b.name);
    secrets
}

/// Only a `CommonTlsContext` (of a listener's or a cluster's TLS context, wherever it is nested) is
/// rewritten: a `Secret` of `static_resources.secrets` has a `validation_context` of its own, which
/// has no combined form.
fn walk(value: &mut Value, dir: &Path, secrets: &mut Vec<Secret>) {
    match value {
        Value::Object(object) => {
            for (key, value) in object.iter_mut() {
                if key == "common_tls_context" || key == "commonTlsContext" {
                    if let Some(context) = value.as_object_mut() {
                        rewrite_certificates(context, dir, secrets);
                        rewrite_trusted_ca(context, dir, secrets);
                    }
                } else {
                    walk(value, dir, secrets);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| walk(v, dir, secrets)),
        _ => {}
    }
}

/// Each secret in a directory of its own: Envoy reads every secret watching a directory whenever a
/// file is moved into it, so one shared directory would make each of N swaps N reads.
fn sds_config(name: &str, dir: &Path) -> (Value, PathBuf) {
    let watched = dir.join(name);
    let path = watched.join("secret.json");
    let config = json!({
        "name": name,
        "sds_config": {
            "path_config_source": {
                "path": path.to_string_lossy(),
                "watched_directory": { "path": watched.to_string_lossy() },
            },
            "resource_api_version": "V3",
        },
    });
    (config, path)
}

/// A context's `tls_certificates` become `tls_certificate_sds_secret_configs` when every entry is a
/// chain and a key given by file and nothing else: Envoy refuses SDS and static certificates mixed
/// in one context, so one entry sesame leaves alone (a password, an OCSP staple, inline bytes, a
/// key provider) leaves the whole list as written.
fn rewrite_certificates(object: &mut Map<String, Value>, dir: &Path, secrets: &mut Vec<Secret>) {
    let Some(key) = key_of(object, "tls_certificates") else { return };
    let Some(entries) = object.get(&key).and_then(Value::as_array) else { return };
    let files: Option<Vec<SecretFiles>> = entries
        .iter()
        .map(|entry| {
            let entry = entry.as_object().filter(|e| e.len() == 2)?;
            let (chain, key) = (filename(entry, "certificate_chain")?, filename(entry, "private_key")?);
            Some(SecretFiles::Certificate { chain, key })
        })
        .collect();
    let Some(files) = files.filter(|f| !f.is_empty()) else { return };
    // Beside certificates by SDS (or a provider) Envoy refuses static ones: it would refuse the
    // bootstrap as written, and so it must see it.
    if ["tls_certificate_provider_instance", "tls_certificate_sds_secret_configs"]
        .iter()
        .any(|k| key_of(object, k).is_some())
    {
        return;
    }
    let mut configs = Vec::new();
    for files in files {
        let name = secret_name(&files);
        let (config, path) = sds_config(&name, dir);
        configs.push(config);
        secrets.push(Secret { name, files, path });
    }
    object.remove(&key);
    let sds_key = key_of(object, "tls_certificate_sds_secret_configs")
        .unwrap_or_else(|| "tls_certificate_sds_secret_configs".to_string());
    let list = object.entry(sds_key).or_insert_with(|| Value::Array(Vec::new()));
    if let Some(list) = list.as_array_mut() {
        list.extend(configs);
    }
}

/// A `validation_context` whose `trusted_ca` is a file becomes a `combined_validation_context`:
/// the rest of it as the default, the CA (and a CRL given by file) from a secret.
fn rewrite_trusted_ca(object: &mut Map<String, Value>, dir: &Path, secrets: &mut Vec<Secret>) {
    let Some(key) = key_of(object, "validation_context") else { return };
    if key_of(object, "combined_validation_context").is_some() {
        return;
    }
    let Some(context) = object.get(&key).and_then(Value::as_object) else { return };
    let Some(ca) = filename(context, "trusted_ca") else { return };
    let crl = filename(context, "crl");
    let mut default = context.clone();
    // The CA's own directory watch goes with it: the secret is watched instead.
    for field in ["trusted_ca", "watched_directory"].into_iter().chain(crl.as_ref().map(|_| "crl")) {
        if let Some(found) = key_of(&default, field) {
            default.remove(&found);
        }
    }
    let files = SecretFiles::TrustedCa { ca, crl };
    let name = secret_name(&files);
    let (config, path) = sds_config(&name, dir);
    object.remove(&key);
    object.insert(
        "combined_validation_context".into(),
        json!({ "default_validation_context": default, "validation_context_sds_secret_config": config }),
    );
    secrets.push(Secret { name, files, path });
}

/// Envoy refuses SDS without a node id and cluster: the ones the bootstrap (or `--service-node`,
/// `--service-cluster`) lacks are set; returns what was set.
pub fn ensure_node(bootstrap: &mut Value, command: &[std::ffi::OsString]) -> Vec<&'static str> {
    let mut set = Vec::new();
    let Some(root) = bootstrap.as_object_mut() else { return set };
    let node = root.entry("node").or_insert_with(|| json!({}));
    let Some(node) = node.as_object_mut() else { return set };
    for (field, flag) in [("id", "--service-node"), ("cluster", "--service-cluster")] {
        let given = node.get(field).and_then(Value::as_str).is_some_and(|v| !v.is_empty());
        if !given && crate::envoy::flag_value(command, &[flag]).is_none() {
            node.insert(field.into(), json!("sesame"));
            set.push(field);
        }
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Value {
        serde_saphyr::from_str(text).expect("yaml")
    }

    #[test]
    fn file_named_certificates_and_cas_become_secrets_and_the_rest_stays() {
        let mut bootstrap = yaml(
            r#"
static_resources:
  listeners:
  - filter_chains:
    - transport_socket:
        typed_config:
          common_tls_context:
            tls_certificates:
            - certificate_chain: { filename: /c/a.crt }
              private_key: { filename: /c/a.key }
            validation_context:
              trusted_ca: { filename: /c/ca.crt }
              watched_directory: { path: /c }
              match_typed_subject_alt_names: [{ san_type: DNS, matcher: { exact: client } }]
  - filter_chains:
    - transport_socket:
        typed_config:
          common_tls_context:
            tls_certificates:
            - certificate_chain: { filename: /c/a.crt }
              private_key: { filename: /c/a.key }
            - certificate_chain: { filename: /c/b.crt }
              private_key: { filename: /c/b.key }
              password: { inline_string: secret }
  clusters:
  - transport_socket:
      typed_config:
        commonTlsContext:
          tlsCertificates:
          - certificateChain: { filename: /c/a.crt }
            privateKey: { filename: /c/a.key }
  secrets:
  - name: client-ca
    validation_context:
      trusted_ca: { filename: /c/other-ca.crt }
"#,
        );
        let original = bootstrap.clone();
        let secrets = rewrite(&mut bootstrap, Path::new("/run/s"));
        let kinds: Vec<&SecretFiles> = secrets.iter().map(|s| &s.files).collect();
        let a = SecretFiles::Certificate { chain: "/c/a.crt".into(), key: "/c/a.key".into() };
        let ca = SecretFiles::TrustedCa { ca: "/c/ca.crt".into(), crl: None };
        assert_eq!(kinds.len(), 2, "the pair used twice is one secret: {secrets:?}");
        assert!(kinds.contains(&&a) && kinds.contains(&&ca), "{secrets:?}");
        let listeners = &bootstrap["static_resources"]["listeners"];
        let context = &listeners[0]["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"];
        let sds = &context["tls_certificate_sds_secret_configs"][0];
        assert!(context.get("tls_certificates").is_none());
        let path = sds["sds_config"]["path_config_source"]["path"].as_str().expect("path");
        assert!(path.starts_with("/run/s/sesame-cert-") && path.ends_with("/secret.json"), "{path}");
        let watched = sds["sds_config"]["path_config_source"]["watched_directory"]["path"].as_str().expect("dir");
        assert_eq!(Path::new(path).parent(), Some(Path::new(watched)), "a directory per secret");
        let combined = &context["combined_validation_context"];
        assert!(context.get("validation_context").is_none());
        let default = &combined["default_validation_context"];
        assert!(default.get("trusted_ca").is_none() && default.get("watched_directory").is_none(), "{default}");
        assert!(default["match_typed_subject_alt_names"].is_array());
        // Envoy refuses SDS and static certificates mixed in one context: this one stays whole.
        let mixed = &listeners[1]["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"];
        assert_eq!(
            mixed,
            &original["static_resources"]["listeners"][1]["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
        );
        let cluster =
            &bootstrap["static_resources"]["clusters"][0]["transport_socket"]["typed_config"]["commonTlsContext"];
        assert!(cluster.get("tlsCertificates").is_none(), "camelCase is read too: {cluster}");
        assert_eq!(cluster["tls_certificate_sds_secret_configs"][0]["name"], sds["name"]);
        assert_eq!(bootstrap["static_resources"]["secrets"], original["static_resources"]["secrets"], "secrets stay");
        let mut beside_sds = yaml(
            r#"
static_resources:
  listeners:
  - filter_chains:
    - transport_socket:
        typed_config:
          common_tls_context:
            tls_certificate_sds_secret_configs: [{ name: static }]
            tls_certificates:
            - certificate_chain: { filename: /c/a.crt }
              private_key: { filename: /c/a.key }
"#,
        );
        let as_written = beside_sds.clone();
        assert!(
            rewrite(&mut beside_sds, Path::new("/run/s")).is_empty(),
            "Envoy refuses it as written, and must see it"
        );
        assert_eq!(beside_sds, as_written);
    }

    #[test]
    fn a_node_is_given_only_where_envoy_would_need_one() {
        let mut bare = yaml("static_resources: {}");
        assert_eq!(ensure_node(&mut bare, &[]), vec!["id", "cluster"]);
        assert_eq!(bare["node"], json!({ "id": "sesame", "cluster": "sesame" }));
        let mut named = yaml("node: { id: edge-1, cluster: edge }");
        assert!(ensure_node(&mut named, &[]).is_empty());
        let mut half = yaml("node: { id: edge-1 }");
        assert_eq!(ensure_node(&mut half, &["--service-cluster".into(), "x".into()]), Vec::<&str>::new());
    }
}
