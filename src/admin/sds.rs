//! What Envoy says of its SDS secrets: how many updates of each it took or rejected, and the
//! serial numbers of the certificates it serves now.

use std::collections::{BTreeMap, HashSet};

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

    /// Which of `wanted` (serial numbers in lowercase hex) are among the certificates Envoy serves
    /// now, from `/certs`, read as it arrives.
    pub async fn served_among(&self, wanted: &[&str]) -> Result<HashSet<String>, HttpError> {
        let mut scan = SerialsAmong::new(wanted);
        self.http.expect_ok_in_pieces("/certs", |piece| scan.feed(piece)).await?;
        Ok(scan.found)
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

/// The `serial_number` values of `/certs` that are in `wanted`. A thousand certificates make a
/// megabyte or two, read at every look while a swap is confirmed: the keys are found by a byte
/// search, and nothing else of the document is parsed or kept (parsed whole, it was most of a
/// renewal's CPU time). A quote inside a JSON string is escaped, so `"serial_number"` followed by
/// a colon can only be that key.
struct SerialsAmong<'a> {
    wanted: HashSet<&'a str>,
    found: HashSet<String>,
    /// The end of the pieces so far: a key and its value cut between two pieces are found in it
    /// joined to the next piece's start.
    tail: Vec<u8>,
    /// Whether a piece came before: a key at the joint's start is the body's start only if not.
    fed: bool,
}

/// More than a key, its colon, spaces and a serial (at most 20 bytes, 40 hex digits) take.
const SPAN: usize = 128;

const KEY: &[u8] = b"\"serial_number\"";

impl<'a> SerialsAmong<'a> {
    fn new(wanted: &[&'a str]) -> Self {
        SerialsAmong { wanted: wanted.iter().copied().collect(), found: HashSet::new(), tail: Vec::new(), fed: false }
    }

    fn feed(&mut self, piece: &[u8]) {
        let mut joint = std::mem::take(&mut self.tail);
        joint.extend_from_slice(&piece[..piece.len().min(SPAN)]);
        self.scan(&joint, !self.fed);
        self.fed = true;
        // A key right at the piece's start is the joint's (which sees the byte before it).
        self.scan(piece, false);
        let end = if piece.len() >= SPAN { piece } else { &joint };
        self.tail = end[end.len().saturating_sub(SPAN)..].to_vec();
    }

    /// Found twice (in a joint and in its piece), a serial is in the set once. A key at `text`'s
    /// start is taken only `from_start` (the byte before it unseen, it may be an escape).
    fn scan(&mut self, text: &[u8], from_start: bool) {
        for at in memchr::memmem::find_iter(text, KEY) {
            let escaped = if at == 0 { !from_start } else { text[at - 1] == b'\\' };
            if escaped {
                continue;
            }
            let Some(value) = string_after_colon(&text[at + KEY.len()..]) else { continue };
            let Ok(serial) = std::str::from_utf8(value) else { continue };
            let serial = serial.to_ascii_lowercase();
            if self.wanted.contains(serial.as_str()) {
                self.found.insert(serial);
            }
        }
    }
}

#[cfg(test)]
fn serials_among(body: &[u8], wanted: &[&str]) -> HashSet<String> {
    let mut scan = SerialsAmong::new(wanted);
    scan.feed(body);
    scan.found
}

/// The string value at the start of `rest` (`: "value"`, with any whitespace), unescaped: serial
/// numbers are hex digits.
fn string_after_colon(rest: &[u8]) -> Option<&[u8]> {
    let rest = rest.trim_ascii_start().strip_prefix(b":")?.trim_ascii_start().strip_prefix(b"\"")?;
    let end = memchr::memchr2(b'"', b'\\', rest)?;
    (rest[end] == b'"').then_some(&rest[..end])
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
    fn serials_are_found_in_every_certificate_envoy_shows() {
        let body = br#"{"certificates":[{"ca_cert":[{"path":"/ca","serial_number":"0A"}],
            "cert_chain":[{"path":"/c","serial_number" :  "3e8","subject_alt_names":[{"dns":"x"}],"days_until_expiration":"9"}]},
            {"ca_cert":[],"cert_chain":[{"serial_number":"-1f"}]},{"cert_chain":[{"path":"/nothing"}]}]}"#;
        let found = serials_among(body, &["0a", "3e8", "-1f", "77"]);
        let mut found: Vec<&str> = found.iter().map(String::as_str).collect();
        found.sort();
        assert_eq!(found, vec!["-1f", "0a", "3e8"], "each shown serial asked for, in lowercase; 77 is not shown");
        assert!(serials_among(b"not json", &["0a"]).is_empty());
    }

    #[test]
    fn a_body_in_pieces_of_any_size_shows_what_it_shows_whole() {
        let mut body = String::from(r#"{"certificates":["#);
        for i in 0..40 {
            body.push_str(&format!(
                r#"{{"cert_chain":[{{"path":"/certs/c-{i}.pem","serial_number": "{:x}"}}]}},"#,
                4000 + i
            ));
        }
        body.push_str(r#"{"cert_chain":[{"path":"/x\"serial_number\": \"1\"","serial_number":"ab"}]}]}"#);
        let wanted: Vec<String> = (0..40).map(|i| format!("{:x}", 4000 + i)).chain(["ab".into(), "1".into()]).collect();
        let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
        let whole = serials_among(body.as_bytes(), &wanted);
        assert_eq!(whole.len(), 41, "every serial but the quoted one");
        for size in 1..=body.len() {
            let mut scan = SerialsAmong::new(&wanted);
            body.as_bytes().chunks(size).for_each(|piece| scan.feed(piece));
            assert_eq!(scan.found, whole, "in pieces of {size} bytes");
        }
    }

    #[test]
    fn the_key_quoted_inside_a_string_is_not_a_serial() {
        let body =
            br#"{"certificates":[{"cert_chain":[{"path":"/x\"serial_number\": \"3e8\"","serial_number":"0b"}]}]}"#;
        let found = serials_among(body, &["3e8", "0b"]);
        assert!(!found.contains("3e8"), "a path that holds the key quoted is no certificate");
        assert!(found.contains("0b"));
        assert!(serials_among(br#"{"serial_number": "3e8\u0030"}"#, &["3e8"]).is_empty(), "an escape is no hex digit");
    }
}
