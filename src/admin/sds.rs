//! What Envoy says of its SDS secrets: how many updates of each it took or rejected, and the
//! serial numbers of the certificates it serves now.

use std::collections::BTreeMap;

use super::AdminClient;
use crate::http::HttpError;

/// `sds.<name>.update_success` and `sds.<name>.update_rejected` of one secret.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SdsUpdates {
    pub success: u64,
    pub rejected: u64,
}

/// Beyond this many secrets, one request asks for every `sds.` counter rather than a filter naming
/// each (a URL of a few kilobytes, well within Envoy's header limit).
const NAMED_AT_MOST: usize = 64;

impl AdminClient {
    /// The update counters of the SDS secrets `names` (of every one when there are many): Envoy
    /// answers for all of its secrets' stats otherwise, a few hundred kilobytes to parse at every
    /// look with a thousand secrets.
    pub async fn sds_updates(&self, names: &[&str]) -> Result<BTreeMap<String, SdsUpdates>, HttpError> {
        let body = self.expect_ok(hyper::Method::GET, &sds_updates_path(names)).await?;
        Ok(parse_sds_updates(&body))
    }

    /// The serial numbers (lowercase hex) of the certificates Envoy serves now, from `/certs`.
    pub async fn served_serials(&self) -> Result<Vec<String>, HttpError> {
        let body = self.expect_ok(hyper::Method::GET, "/certs").await?;
        Ok(parse_serials(&body))
    }
}

fn sds_updates_path(names: &[&str]) -> String {
    let filter = if names.is_empty() || names.len() > NAMED_AT_MOST {
        r"^sds\.".to_string()
    } else {
        format!(r"^sds\.({})\.update_(success|rejected)$", names.join("|"))
    };
    format!("/stats?format=json&filter={}", percent_encoded(&filter))
}

/// `text` as a URL query value: everything but unreserved characters percent-encoded.
fn percent_encoded(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len() * 2);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// What `/certs` says of each certificate, and nothing else: read without building the whole
/// document (a thousand certificates make a megabyte or two, read at every look while a swap is
/// confirmed).
#[derive(serde::Deserialize, Default)]
struct Certs {
    #[serde(default)]
    certificates: Vec<CertEntry>,
}

#[derive(serde::Deserialize)]
struct CertEntry {
    #[serde(default)]
    ca_cert: Vec<CertDetail>,
    #[serde(default)]
    cert_chain: Vec<CertDetail>,
}

#[derive(serde::Deserialize)]
struct CertDetail {
    #[serde(default)]
    serial_number: String,
}

fn parse_serials(body: &[u8]) -> Vec<String> {
    let certs: Certs = serde_json::from_slice(body).unwrap_or_default();
    let details = certs.certificates.into_iter().flat_map(|entry| entry.ca_cert.into_iter().chain(entry.cert_chain));
    details.map(|detail| detail.serial_number.to_ascii_lowercase()).filter(|serial| !serial.is_empty()).collect()
}

fn parse_sds_updates(body: &[u8]) -> BTreeMap<String, SdsUpdates> {
    let mut found: BTreeMap<String, SdsUpdates> = BTreeMap::new();
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    for stat in value["stats"].as_array().into_iter().flatten() {
        let (Some(name), Some(count)) = (stat["name"].as_str(), stat["value"].as_u64()) else { continue };
        let Some(rest) = name.strip_prefix("sds.") else { continue };
        if let Some(secret) = rest.strip_suffix(".update_success") {
            found.entry(secret.to_string()).or_default().success = count;
        } else if let Some(secret) = rest.strip_suffix(".update_rejected") {
            found.entry(secret.to_string()).or_default().rejected = count;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_update_counters_of_each_secret() {
        let body = br#"{"stats":[{"name":"sds.a.update_success","value":3},{"name":"sds.a.update_rejected","value":1},
            {"name":"sds.b.update_success","value":1},{"name":"sds.b.update_attempt","value":2}]}"#;
        let found = parse_sds_updates(body);
        assert_eq!(found["a"], SdsUpdates { success: 3, rejected: 1 });
        assert_eq!(found["b"], SdsUpdates { success: 1, rejected: 0 });
    }

    #[test]
    fn a_few_secrets_are_asked_for_by_name() {
        let few = sds_updates_path(&["sesame-cert-00ff", "sesame-ca-0a"]);
        assert_eq!(
            few,
            "/stats?format=json&filter=%5Esds%5C.%28sesame-cert-00ff%7Csesame-ca-0a%29%5C.update_%28success%7Crejected%29%24"
        );
        let names: Vec<String> = (0..=NAMED_AT_MOST).map(|i| format!("sesame-cert-{i:016x}")).collect();
        let many: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_eq!(sds_updates_path(&many), "/stats?format=json&filter=%5Esds%5C.");
    }

    #[test]
    fn serials_are_read_from_every_certificate_envoy_shows() {
        let body = br#"{"certificates":[{"ca_cert":[{"path":"/ca","serial_number":"0A"}],
            "cert_chain":[{"path":"/c","serial_number":"3e8","subject_alt_names":[{"dns":"x"}],"days_until_expiration":"9"}]},
            {"ca_cert":[],"cert_chain":[{"serial_number":"-1f"}]},{"cert_chain":[{"path":"/nothing"}]}]}"#;
        assert_eq!(parse_serials(body), vec!["0a", "3e8", "-1f"]);
        assert!(parse_serials(b"not json").is_empty());
    }
}
