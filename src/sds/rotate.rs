//! One in-place rotation attempt: the secrets' files read again, each that changed and passes the
//! checks written for Envoy, and Envoy's answer read back. Off the supervisor: it reports what
//! happened to each secret, and the supervisor records it.

use std::time::{Duration, SystemTime};

use super::{CheckedSecret, check_secret, write_secret, write_secret_file};
use crate::admin::{AdminClient, SdsUpdates};
use crate::certs::CertError;
use crate::user::EnvoyUser;

/// Between two looks at Envoy's counters while a swap is confirmed.
const CONFIRM_POLL: Duration = Duration::from_millis(10);

/// What an attempt did with one secret.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Its files hold what Envoy has.
    Unchanged,
    /// Its files hold what Envoy rejected last: not written again.
    StillRejected,
    /// The files are in a state that is not applied yet (while they settle): a pair that does not
    /// match, a PEM not whole, a file with fewer certificates than the one served.
    Waiting(String),
    /// Once the files settled, they fail the checks: nothing was written.
    Refused(CertError),
    /// Written, and Envoy took it: its update counter moved (and `/certs` shows the new serial).
    Rotated(CheckedSecret),
    /// Written, and Envoy rejected it (`update_rejected` moved): the previous bytes were written
    /// back, so that the next epoch starts on what Envoy serves.
    Rejected(CheckedSecret),
    /// Written, but Envoy said nothing of it within the timeout.
    Unconfirmed(CheckedSecret, String),
    /// Written, where Envoy keeps no `sds.*` stats (a `stats_matcher` leaves them out) and there
    /// is no serial to look for (a CA bundle): nothing can confirm it.
    Unconfirmable(CheckedSecret),
    /// The secret file could not be written.
    Failed(String),
}

/// What an attempt does with a secret's files as they are now.
enum Next {
    Keep,
    Write(CheckedSecret),
    Not(Outcome),
}

/// How `next` differs from `served` in a way that a write in steps would show half done, which
/// only the end of the debounce tells from what was meant: a chain with fewer certificates (its
/// leaf written before its intermediates) or from another issuer (a new leaf whose intermediate
/// comes next), a key sesame cannot match against its certificate (which a write of the key before
/// the certificate would have Envoy reject), a CA bundle that lost a CA (one CA written, the next
/// appended).
fn changes_shape(served: &CheckedSecret, next: &CheckedSecret) -> Option<String> {
    if next.key_judged_by_envoy {
        return Some("has a key that only Envoy can match against its certificate".into());
    }
    if next.certificates < served.certificates {
        return Some(format!("holds {} certificates, {} before", next.certificates, served.certificates));
    }
    if next.issuer != served.issuer {
        return Some("has a leaf from another issuer".into());
    }
    if served.subjects.iter().any(|s| !next.subjects.contains(s)) {
        return Some("no longer holds every CA it held".into());
    }
    None
}

/// What the secret `served` becomes, from its files as they are now. `settled`: the debounce
/// ended, and a state that passes the checks is applied even when it holds fewer certificates.
fn next_state(served: &CheckedSecret, rejected: Option<u64>, settled: bool, now: SystemTime) -> Next {
    if served.files_unchanged() {
        return Next::Keep;
    }
    let checked = match check_secret(&served.secret, now) {
        Ok(checked) => checked,
        Err(e) if settled => return Next::Not(Outcome::Refused(e)),
        Err(e) => return Next::Not(Outcome::Waiting(e.to_string())),
    };
    if checked.resource_hash == served.resource_hash {
        return Next::Keep;
    }
    if rejected == Some(checked.files_hash) {
        return Next::Not(Outcome::StillRejected);
    }
    match (settled, changes_shape(served, &checked)) {
        (false, Some(how)) => {
            Next::Not(Outcome::Waiting(format!("{} {how}: applied once the files settle", checked.path().display())))
        }
        _ => Next::Write(checked),
    }
}

/// Reads every served secret's files, writes those that changed and pass, and confirms each with
/// Envoy's admin within `timeout`. Returns one outcome per served secret, in order. With each
/// secret comes the hash of the files Envoy rejected last, if it did.
pub async fn attempt(
    served: Vec<(CheckedSecret, Option<u64>)>,
    settled: bool,
    admin: AdminClient,
    user: Option<EnvoyUser>,
    timeout: Duration,
) -> Vec<Outcome> {
    let decided = tokio::task::spawn_blocking(move || {
        let now = SystemTime::now();
        served.iter().map(|(served, rejected)| next_state(served, *rejected, settled, now)).collect::<Vec<_>>()
    })
    .await;
    let Ok(decided) = decided else { return Vec::new() };
    // Before anything is written: each swap is known by the counter it moves past this (read for
    // the secrets to be written only).
    let names: Vec<&str> = decided
        .iter()
        .filter_map(|next| match next {
            Next::Write(next) => Some(next.secret.name.as_str()),
            _ => None,
        })
        .collect();
    let before =
        if names.is_empty() { Default::default() } else { admin.sds_updates(&names).await.unwrap_or_default() };
    let written = tokio::task::spawn_blocking(move || {
        let outcomes: Vec<(Option<Vec<u8>>, Next)> = decided
            .into_iter()
            .map(|next| match next {
                Next::Write(next) => {
                    // What Envoy serves, as sesame wrote it: written back should Envoy reject the new
                    // bytes (read from the file rather than kept in memory for every secret).
                    let serving = std::fs::read(&next.secret.path).ok();
                    match write_secret(&next, user.as_ref()) {
                        Ok(()) => (serving, Next::Write(next)),
                        Err(e) => (None, Next::Not(Outcome::Failed(format!("{e:#}")))),
                    }
                }
                other => (None, other),
            })
            .collect();
        (outcomes, user)
    })
    .await;
    let Ok((outcomes, user)) = written else { return Vec::new() };
    let mut pending: Vec<(usize, CheckedSecret)> = Vec::new();
    let mut result: Vec<Outcome> = Vec::with_capacity(outcomes.len());
    let mut serving: Vec<Option<Vec<u8>>> = Vec::with_capacity(outcomes.len());
    for (index, (bytes, next)) in outcomes.into_iter().enumerate() {
        result.push(match next {
            Next::Keep => Outcome::Unchanged,
            Next::Write(next) => {
                pending.push((index, next.clone()));
                Outcome::Unconfirmed(next, String::new())
            }
            Next::Not(outcome) => outcome,
        });
        serving.push(bytes);
    }
    confirm(&admin, &before, pending, &mut result, timeout).await;
    let rejected: Vec<(std::path::PathBuf, Option<Vec<u8>>)> = result
        .iter()
        .zip(&mut serving)
        .filter_map(|(outcome, bytes)| match outcome {
            Outcome::Rejected(secret) => Some((secret.secret.path.clone(), bytes.take())),
            _ => None,
        })
        .collect();
    if !rejected.is_empty() {
        let _ = tokio::task::spawn_blocking(move || {
            for (path, bytes) in &rejected {
                let written = match bytes {
                    Some(bytes) => write_secret_file(path, bytes, user.as_ref()),
                    None => Err(anyhow::anyhow!("{} could not be read before it was replaced", path.display())),
                };
                if let Err(e) = written {
                    tracing::error!("cannot write back the secret Envoy serves: {e:#}");
                }
            }
        })
        .await;
    }
    result
}

/// Waits until Envoy has said, of every `pending` secret, whether it took it: its
/// `update_rejected` or `update_success` past `before`, and for a certificate, its serial in
/// `/certs`.
async fn confirm(
    admin: &AdminClient,
    before: &std::collections::BTreeMap<String, SdsUpdates>,
    mut pending: Vec<(usize, CheckedSecret)>,
    result: &mut [Outcome],
    timeout: Duration,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut taken: Vec<(usize, CheckedSecret)> = Vec::new();
    while !(pending.is_empty() && taken.is_empty()) {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(CONFIRM_POLL).await;
        let names: Vec<&str> = pending.iter().map(|(_, secret)| secret.secret.name.as_str()).collect();
        if !pending.is_empty()
            && let Ok(now) = admin.sds_updates(&names).await
        {
            pending.retain(|(index, secret)| {
                let name = &secret.secret.name;
                if !now.contains_key(name) && !before.contains_key(name) {
                    // No stats for it at all: its serial in /certs is the only answer there is.
                    match secret.leaf {
                        Some(_) => taken.push((*index, secret.clone())),
                        None => result[*index] = Outcome::Unconfirmable(secret.clone()),
                    }
                    return false;
                }
                let was = before.get(name).copied().unwrap_or_default();
                let is = now.get(name).copied().unwrap_or_default();
                if is.rejected > was.rejected {
                    result[*index] = Outcome::Rejected(secret.clone());
                    false
                } else if is.success > was.success {
                    taken.push((*index, secret.clone()));
                    false
                } else {
                    true
                }
            });
        }
        let wanted: Vec<&str> =
            taken.iter().filter_map(|(_, s)| s.leaf.as_ref().map(|(serial, _)| serial.as_str())).collect();
        if !taken.is_empty()
            && let Ok(serials) = admin.served_among(&wanted).await
        {
            taken.retain(|(index, secret)| {
                let shown = secret.leaf.as_ref().is_none_or(|(serial, _)| serials.contains(serial));
                if shown {
                    result[*index] = Outcome::Rotated(secret.clone());
                }
                !shown
            });
        }
    }
    for (index, _) in &pending {
        if let Outcome::Unconfirmed(_, why) = &mut result[*index] {
            *why = format!("Envoy's sds update counters did not move within {timeout:?}");
        }
    }
    for (index, secret) in &taken {
        let serial = secret.leaf.as_ref().map(|(serial, _)| serial.as_str()).unwrap_or_default();
        result[*index] = Outcome::Unconfirmed(
            secret.clone(),
            format!(
                "Envoy took it (sds.{}.update_success), yet /certs did not show serial {serial} within {timeout:?}",
                secret.secret.name
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sds::{Secret, SecretFiles, check_secret};

    fn pair(serial: u64) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        (params.self_signed(&key).expect("sign").pem(), key.serialize_pem())
    }

    struct Files {
        dir: tempfile::TempDir,
        secret: Secret,
    }

    impl Files {
        fn new(cert: &str, key: &str) -> Files {
            let dir = tempfile::tempdir().expect("tempdir");
            let (chain, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
            std::fs::write(&chain, cert).expect("cert");
            std::fs::write(&key_path, key).expect("key");
            let path = dir.path().join("secret.json");
            let secret = Secret { name: "s".into(), files: SecretFiles::Certificate { chain, key: key_path }, path };
            Files { dir, secret }
        }

        fn write(&self, name: &str, text: &str) {
            std::fs::write(self.dir.path().join(name), text).expect("write");
        }

        fn served(&self) -> CheckedSecret {
            check_secret(&self.secret, SystemTime::now()).expect("the first pair passes")
        }
    }

    fn next(served: &CheckedSecret, settled: bool) -> Next {
        next_state(served, None, settled, SystemTime::now())
    }

    #[test]
    fn a_state_that_fails_waits_while_the_files_settle_and_is_refused_once_they_have() {
        let (cert, key) = pair(1);
        let files = Files::new(&cert, &key);
        let served = files.served();
        assert!(matches!(next(&served, false), Next::Keep), "the same bytes: nothing to swap");
        let (_, other_key) = pair(2);
        files.write("k.pem", &other_key);
        assert!(matches!(next(&served, false), Next::Not(Outcome::Waiting(_))), "a key before its certificate");
        assert!(matches!(next(&served, true), Next::Not(Outcome::Refused(_))), "settled on a mismatch");
        files.write("c.pem", &cert[..cert.len() / 2]);
        assert!(matches!(next(&served, false), Next::Not(Outcome::Waiting(_))), "a PEM not whole");
    }

    #[test]
    fn a_chain_with_fewer_certificates_waits_for_the_debounce_and_a_whole_one_is_written_at_once() {
        let (leaf, key) = pair(1);
        let (intermediate, _) = pair(9);
        let files = Files::new(&format!("{leaf}{intermediate}"), &key);
        let served = files.served();
        assert_eq!(served.certificates, 2);
        // The leaf written before the intermediate is appended: it passes the pair check, but a
        // client that needs the intermediate would fail.
        let (new_leaf, new_key) = pair(3);
        files.write("k.pem", &new_key);
        files.write("c.pem", &new_leaf);
        assert!(matches!(next(&served, false), Next::Not(Outcome::Waiting(_))), "a chain that lost a certificate");
        assert!(matches!(next(&served, true), Next::Write(_)), "settled, it is what the user meant");
        files.write("c.pem", &format!("{new_leaf}{intermediate}"));
        match next(&served, false) {
            Next::Write(checked) => assert_eq!(checked.leaf.map(|(serial, _)| serial), Some("03".to_string())),
            _ => panic!("a whole chain is written at once"),
        }
    }

    #[test]
    fn files_envoy_rejected_are_not_written_again_while_they_hold_that() {
        let (cert, key) = pair(1);
        let files = Files::new(&cert, &key);
        let served = files.served();
        let (cert, key) = pair(2);
        files.write("k.pem", &key);
        files.write("c.pem", &cert);
        let Next::Write(rejected) = next(&served, true) else { panic!("a new pair that passes is written") };
        let again = next_state(&served, Some(rejected.files_hash), true, SystemTime::now());
        assert!(matches!(again, Next::Not(Outcome::StillRejected)), "not written again");
        let (cert, _) = pair(3);
        files.write("c.pem", &cert);
        assert!(!matches!(
            next_state(&served, Some(rejected.files_hash), false, SystemTime::now()),
            Next::Not(Outcome::StillRejected)
        ));
    }

    fn signed_by(issuer_name: &str, serial: u64) -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(rcgen::DnType::CommonName, issuer_name);
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        (params.signed_by(&key, &issuer).expect("sign").pem(), key.serialize_pem(), ca_cert.pem())
    }

    #[test]
    fn a_leaf_from_another_issuer_waits_for_the_debounce_one_from_the_same_is_written_at_once() {
        let (leaf, key, _) = signed_by("root", 1);
        let files = Files::new(&leaf, &key);
        let served = files.served();
        // Signed by an intermediate that the next step appends: a client that needs it would fail.
        let (other, other_key, _) = signed_by("intermediate", 2);
        files.write("k.pem", &other_key);
        files.write("c.pem", &other);
        assert!(matches!(next(&served, false), Next::Not(Outcome::Waiting(_))), "another issuer waits");
        assert!(matches!(next(&served, true), Next::Write(_)), "settled, it is applied");
        let (same, same_key, _) = signed_by("root", 3);
        files.write("k.pem", &same_key);
        files.write("c.pem", &same);
        assert!(matches!(next(&served, false), Next::Write(_)), "the same issuer, the same chain: at once");
    }

    #[test]
    fn a_ca_bundle_that_loses_a_ca_waits_for_the_debounce_one_that_adds_is_written_at_once() {
        let (_, _, ca_1) = signed_by("ca one", 1);
        let (_, _, ca_2) = signed_by("ca two", 2);
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &ca_1).expect("ca");
        let secret = Secret {
            name: "ca".into(),
            files: SecretFiles::TrustedCa { ca: ca.clone(), crl: None },
            path: dir.path().join("s/secret.json"),
        };
        let served = check_secret(&secret, SystemTime::now()).expect("a CA");
        std::fs::write(&ca, &ca_2).expect("ca 2 first, ca 1 to be appended");
        assert!(matches!(next(&served, false), Next::Not(Outcome::Waiting(_))), "lost ca one: waits");
        std::fs::write(&ca, format!("{ca_2}{ca_1}")).expect("both");
        assert!(matches!(next(&served, false), Next::Write(_)), "adds ca two: at once");
        let crl = dir.path().join("ca.crl");
        std::fs::write(&crl, "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n").expect("crl");
        let with_crl = Secret { files: SecretFiles::TrustedCa { ca, crl: Some(crl.clone()) }, ..secret };
        let refused = check_secret(&with_crl, SystemTime::now()).expect_err("a CRL that does not parse").to_string();
        assert!(refused.starts_with(&format!("CRL {}", crl.display())), "named by the CRL's path: {refused}");
    }

    #[test]
    fn a_key_only_envoy_can_match_waits_for_the_debounce() {
        let (cert, key) = pair(1);
        let files = Files::new(&cert, &key);
        let served = files.served();
        let fixture = |name: &str| {
            std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name))
                .expect("fixture")
        };
        files.write("k.pem", &fixture("p521-key.pem"));
        files.write("c.pem", &fixture("p521-cert.pem"));
        assert!(
            matches!(next(&served, false), Next::Not(Outcome::Waiting(_))),
            "a key written first would be rejected"
        );
        assert!(matches!(next(&served, true), Next::Write(_)));
    }
}
