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

impl AdminClient {
    /// The update counters of every SDS secret.
    pub async fn sds_updates(&self) -> Result<BTreeMap<String, SdsUpdates>, HttpError> {
        const PATH: &str = "/stats?format=json&filter=%5Esds%5C.";
        let body = self.expect_ok(hyper::Method::GET, PATH).await?;
        Ok(parse_sds_updates(&body))
    }

    /// The serial numbers (lowercase hex) of the certificates Envoy serves now, from `/certs`.
    pub async fn served_serials(&self) -> Result<Vec<String>, HttpError> {
        let body = self.expect_ok(hyper::Method::GET, "/certs").await?;
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let mut serials = Vec::new();
        collect_serials(&value, &mut serials);
        Ok(serials)
    }
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

fn collect_serials(value: &serde_json::Value, serials: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(object) => {
            if let Some(serial) = object.get("serial_number").and_then(|s| s.as_str()) {
                serials.push(serial.to_ascii_lowercase());
            }
            object.values().for_each(|v| collect_serials(v, serials));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_serials(v, serials)),
        _ => {}
    }
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
}
