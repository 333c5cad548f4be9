//! Secrets given inline, for hot restarts: the rewritten bootstrap names each secret as a static
//! secret (`static_resources.secrets`) that holds the checked bytes. Envoy reads them once, at the
//! epoch's start, as it read the files: no subscription, no file watch (Envoy takes one inotify
//! instance per file-based SDS secret, 128 per user by default), no node.

use serde_json::{Map, Value};

use super::CheckedSecret;

/// Makes every secret that `rewrite` gave a file-based `sds_config` a static one, holding the
/// bytes `secrets` were checked with.
pub fn inline(bootstrap: &mut Value, secrets: &[CheckedSecret]) {
    let names: Vec<&str> = secrets.iter().map(|s| s.secret.name.as_str()).collect();
    drop_sds_config(bootstrap, &names);
    let Some(root) = bootstrap.as_object_mut() else { return };
    let key = ["static_resources", "staticResources"].into_iter().find(|k| root.contains_key(*k));
    let resources = root.entry(key.unwrap_or("static_resources")).or_insert_with(|| Value::Object(Map::new()));
    let Some(resources) = resources.as_object_mut() else { return };
    let list = resources.entry("secrets").or_insert_with(|| Value::Array(Vec::new()));
    let Some(list) = list.as_array_mut() else { return };
    for secret in secrets {
        let resource: Value = serde_json::from_slice(&secret.resource).unwrap_or_default();
        let mut static_secret = resource["resources"][0].clone();
        if let Some(object) = static_secret.as_object_mut() {
            object.remove("@type");
            list.push(static_secret);
        }
    }
}

fn drop_sds_config(value: &mut Value, names: &[&str]) {
    match value {
        Value::Object(object) => {
            let ours = object.get("name").and_then(Value::as_str).is_some_and(|n| names.contains(&n));
            if ours && object.contains_key("sds_config") {
                object.remove("sds_config");
                return;
            }
            object.values_mut().for_each(|v| drop_sds_config(v, names));
        }
        Value::Array(items) => items.iter_mut().for_each(|v| drop_sds_config(v, names)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::SystemTime;

    use super::*;
    use crate::sds::{check_secrets, rewrite};

    #[test]
    fn secrets_become_static_with_the_checked_bytes_and_no_subscription() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params").self_signed(&key);
        let pem = cert.expect("sign").pem();
        std::fs::write(dir.path().join("c.pem"), &pem).expect("cert");
        std::fs::write(dir.path().join("k.pem"), key.serialize_pem()).expect("key");
        let mut bootstrap = serde_json::json!({ "staticResources": { "listeners": [{ "filter_chains": [{ "transport_socket": {
            "typed_config": { "common_tls_context": { "tls_certificates": [{
                "certificate_chain": { "filename": dir.path().join("c.pem") },
                "private_key": { "filename": dir.path().join("k.pem") },
            }] } } } }] }] } });
        let secrets = rewrite(&mut bootstrap, Path::new("/run/s"));
        let checked = check_secrets(&secrets, SystemTime::now()).expect("checked");
        inline(&mut bootstrap, &checked);
        let text = bootstrap.to_string();
        assert!(!text.contains("sds_config") && !text.contains("\"filename\""), "{text}");
        let secret = &bootstrap["staticResources"]["secrets"][0];
        assert_eq!(secret["name"], secrets[0].name.as_str());
        assert_eq!(secret["tls_certificate"]["certificate_chain"]["inline_string"], pem.as_str());
        assert!(secret.get("@type").is_none());
        assert!(bootstrap.get("static_resources").is_none(), "under the bootstrap's own spelling");
    }
}
