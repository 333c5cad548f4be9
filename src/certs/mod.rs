//! Certificate checks before a hot restart: each certificate/key pair of the bootstrap parses as
//! PEM, the key belongs to the certificate, and the leaf is within its validity period. Envoy would
//! find most of this too, but only by failing to start, which after a hot restart has begun leaves
//! it degraded (docs/ARCHITECTURE.md, "Envoy facts"); so the launcher looks first. Also the
//! certificate of the control API's `--http`, swapped in when its files change.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

pub mod known;

/// A `tls_certificates` entry of the bootstrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPair {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The bootstrap gives a password for an encrypted key.
    pub key_password: bool,
}

/// A pair that passed: when its leaf expires.
#[derive(Debug, Clone)]
pub struct Checked {
    pub expires_in: Duration,
    /// The leaf's notAfter, in seconds since the epoch, and its serial number (lowercase hex).
    pub not_after_unix: i64,
    pub serial: String,
    /// The hash of the leaf's issuer name, and how many certificates the chain holds: a rotation
    /// that keeps both is the same shape of chain.
    pub issuer: u64,
    pub certificates: usize,
    /// Why the key was not matched against the certificate: a key beyond sesame's checks (a curve
    /// that ring does not do, an encrypted key), left to `envoy --mode validate`, which reads it as
    /// Envoy will.
    pub key_left_to_envoy: Option<String>,
}

/// Why a certificate/key pair is refused: one line naming the file at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("{what} {}: cannot read: {error}", path.display())]
    Unreadable { what: &'static str, path: PathBuf, error: String },
    /// Not PEM, or not the PEM block expected: `fault` says how.
    #[error("{what} {}: {fault}", path.display())]
    BadPem { what: &'static str, path: PathBuf, fault: String },
    #[error("private key {} is encrypted and the bootstrap gives no password for it", path.display())]
    EncryptedWithoutPassword { path: PathBuf },
    #[error("private key {} does not match certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    /// The certificate parses as PEM but not as a usable X.509 certificate.
    #[error("certificate {}: {detail}", path.display())]
    Unusable { path: PathBuf, detail: String },
    #[error("certificate {} is not valid before {from}", path.display())]
    NotYetValid { path: PathBuf, from: String, from_unix: i64 },
    #[error("certificate {} expired on {on}", path.display())]
    Expired { path: PathBuf, on: String },
    /// Valid, but the control API's TLS cannot sign with this key type.
    #[error("private key {}: the control API cannot serve with this key type ({detail})", path.display())]
    UnservableKey { path: PathBuf, detail: String },
    #[error("TLS settings: {0}")]
    Tls(String),
}

/// Checks one pair at `now`. Never refuses what Envoy accepts: what it cannot judge, it leaves to
/// Envoy's validator and says so.
pub fn check_pair(pair: &TlsPair, now: SystemTime) -> Result<Checked, CertError> {
    let chain = read(&pair.cert, "certificate")?;
    let key = read(&pair.key, "private key")?;
    check_pair_bytes(pair, &chain, &key, now)
}

/// `check_pair` on bytes already read (`chain` from `pair.cert`, `key` from `pair.key`): what
/// passes is exactly what was read.
pub fn check_pair_bytes(pair: &TlsPair, chain: &[u8], key: &[u8], now: SystemTime) -> Result<Checked, CertError> {
    use crate::files::content_hash;
    let id = (content_hash(chain), content_hash(key), pair.key_password);
    let facts = match known::get(id) {
        Some(facts) => facts,
        None => {
            let facts = pair_facts(pair, chain, key)?;
            known::remember(id, facts.clone());
            facts
        }
    };
    let now_secs = crate::clock::unix_seconds(now) as i64;
    if now_secs < facts.not_before {
        return Err(CertError::NotYetValid {
            path: pair.cert.clone(),
            from: format_time(facts.not_before),
            from_unix: facts.not_before,
        });
    }
    if now_secs > facts.not_after {
        return Err(CertError::Expired { path: pair.cert.clone(), on: format_time(facts.not_after) });
    }
    let expires_in = Duration::from_secs((facts.not_after - now_secs) as u64);
    let known::Facts { not_after, serial, issuer, certificates, key_left_to_envoy, .. } = facts;
    Ok(Checked { expires_in, not_after_unix: not_after, serial, issuer, certificates, key_left_to_envoy })
}

/// Everything a pair's check learns but the comparison with the time.
fn pair_facts(pair: &TlsPair, chain: &[u8], key: &[u8]) -> Result<known::Facts, CertError> {
    let chain = parse_chain(&pair.cert, chain)?;
    let certificates = chain.len();
    let leaf = chain[0].clone();
    let key_left_to_envoy = match parse_key(pair, key)? {
        Key::Encrypted => Some("the key is encrypted (the bootstrap gives its password)".to_string()),
        Key::Plain(key) => match rustls::crypto::ring::sign::any_supported_type(&key) {
            Err(e) => Some(format!("its type is beyond sesame's checks ({e})")),
            Ok(signing_key) => {
                rustls::sign::CertifiedKey::new(chain, signing_key).keys_match().map_err(|e| match e {
                    rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                        CertError::KeyMismatch { cert: pair.cert.clone(), key: pair.key.clone() }
                    }
                    other => CertError::Unusable { path: pair.cert.clone(), detail: other.to_string() },
                })?;
                None
            }
        },
    };
    let (not_before, not_after, serial, issuer) = validity(&leaf, &pair.cert)?;
    Ok(known::Facts { not_before, not_after, serial, issuer, certificates, key_left_to_envoy })
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|e| CertError::Unreadable { what, path: path.into(), error: e.to_string() })
}

/// A CRL file read as `bytes` from `path`: at least one `X509 CRL` block, each whole and a
/// revocation list.
pub fn check_crl(path: &Path, bytes: &[u8]) -> Result<(), CertError> {
    use rustls::pki_types::CertificateRevocationListDer;
    let what = "CRL";
    let lists: Vec<CertificateRevocationListDer<'static>> = CertificateRevocationListDer::pem_slice_iter(bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::BadPem { what, path: path.into(), fault: pem_fault(&e) })?;
    if lists.is_empty() {
        return Err(CertError::BadPem { what, path: path.into(), fault: "no PEM X509 CRL block".into() });
    }
    for list in &lists {
        x509_parser::parse_x509_crl(list).map_err(|e| CertError::BadPem {
            what,
            path: path.into(),
            fault: format!("not a certificate revocation list: {e}"),
        })?;
    }
    Ok(())
}

fn parse_chain(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let what = "certificate";
    let chain: Vec<_> = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::BadPem { what, path: path.into(), fault: pem_fault(&e) })?;
    if chain.is_empty() {
        return Err(CertError::BadPem { what, path: path.into(), fault: "no PEM CERTIFICATE block".into() });
    }
    Ok(chain)
}

enum Key {
    Plain(PrivateKeyDer<'static>),
    /// Encrypted, with a password in the bootstrap: only Envoy can open it.
    Encrypted,
}

fn parse_key(pair: &TlsPair, bytes: &[u8]) -> Result<Key, CertError> {
    let (what, path) = ("private key", &pair.key);
    let text = String::from_utf8_lossy(bytes);
    // PKCS#8 "ENCRYPTED PRIVATE KEY", or the legacy OpenSSL header of an encrypted PKCS#1/SEC1 key.
    if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") || text.contains("Proc-Type: 4,ENCRYPTED") {
        if pair.key_password {
            return Ok(Key::Encrypted);
        }
        return Err(CertError::EncryptedWithoutPassword { path: path.clone() });
    }
    match PrivateKeyDer::from_pem_slice(bytes) {
        Ok(key) => Ok(Key::Plain(key)),
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            Err(CertError::BadPem { what, path: path.clone(), fault: "no PEM PRIVATE KEY block".into() })
        }
        Err(e) => Err(CertError::BadPem { what, path: path.clone(), fault: pem_fault(&e) }),
    }
}

/// What is wrong with a PEM file, in words (the library's own text shows bytes as numbers).
fn pem_fault(error: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match error {
        Error::MissingSectionEnd { end_marker } => format!(
            "a PEM block has no end line (-----END {}-----): is the file half written?",
            String::from_utf8_lossy(end_marker).trim()
        ),
        Error::IllegalSectionStart { line } => {
            format!("bad PEM: a BEGIN line is malformed ({:?})", String::from_utf8_lossy(line).trim())
        }
        Error::Base64Decode(e) => format!("bad PEM: the base64 between BEGIN and END does not decode ({e})"),
        Error::SectionTooLarge => "bad PEM: a block is larger than 256 MB".to_string(),
        Error::NoItemsFound => "no PEM block of the expected kind".to_string(),
        other => format!("bad PEM: {other}"),
    }
}

/// notBefore and notAfter of the certificate read from `path`, in seconds since the epoch, its
/// serial number, and the hash of its issuer's name.
fn validity(cert: &CertificateDer<'_>, path: &Path) -> Result<(i64, i64, String, u64), CertError> {
    let parsed = parse(cert, path)?;
    let validity = parsed.validity();
    let serial = envoy_serial(parsed.tbs_certificate.raw_serial());
    let issuer = crate::files::content_hash(parsed.issuer().as_raw());
    Ok((validity.not_before.timestamp(), validity.not_after.timestamp(), serial, issuer))
}

fn parse<'a>(
    cert: &'a CertificateDer<'_>,
    path: &Path,
) -> Result<x509_parser::certificate::X509Certificate<'a>, CertError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| CertError::Unusable {
        path: path.to_path_buf(),
        detail: format!("not an X.509 certificate: {e}"),
    })?;
    Ok(parsed)
}

/// A serial number as Envoy's `/certs` shows it: lowercase hex of its value, no separators, with
/// neither the zero byte DER puts before a serial whose first bit is set nor other leading zero
/// bytes, and a minus sign for a negative one (which DER stores in two's complement).
fn envoy_serial(raw: &[u8]) -> String {
    let negative = raw.first().is_some_and(|b| b & 0x80 != 0);
    let magnitude: Vec<u8> = if negative {
        // Two's complement: invert, then add one.
        let mut bytes: Vec<u8> = raw.iter().map(|b| !b).collect();
        for byte in bytes.iter_mut().rev() {
            let (sum, carry) = byte.overflowing_add(1);
            *byte = sum;
            if !carry {
                break;
            }
        }
        bytes
    } else {
        raw.to_vec()
    };
    let significant = magnitude
        .iter()
        .position(|b| *b != 0)
        .map_or(&magnitude[magnitude.len().saturating_sub(1)..], |at| &magnitude[at..]);
    if significant.iter().all(|b| *b == 0) {
        return "0".to_string();
    }
    let hex: String = significant.iter().map(|b| format!("{b:02x}")).collect();
    if negative { format!("-{hex}") } else { hex }
}

/// A CA bundle read as `bytes` from `path` (at least one certificate, every block whole): the hash
/// of each certificate's subject name.
pub fn bundle_subjects(path: &Path, bytes: &[u8]) -> Result<Vec<u64>, CertError> {
    let chain = parse_chain(path, bytes)?;
    chain.iter().map(|cert| Ok(crate::files::content_hash(parse(cert, path)?.subject().as_raw()))).collect()
}

fn format_time(secs: i64) -> String {
    let time = SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(time).to_string()
}

/// The `--http` certificate: handed out per handshake, swapped when its files change, kept when the
/// new ones are bad.
#[derive(Debug)]
pub struct ReloadingCert {
    pair: TlsPair,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadingCert {
    pub fn load(pair: TlsPair) -> Result<Arc<ReloadingCert>, CertError> {
        let key = Self::read(&pair)?;
        Ok(Arc::new(ReloadingCert { pair, current: RwLock::new(key) }))
    }

    fn read(pair: &TlsPair) -> Result<Arc<CertifiedKey>, CertError> {
        check_pair(pair, SystemTime::now())?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pair.cert)
            .and_then(|certs| certs.collect())
            .map_err(|e| CertError::BadPem { what: "certificate", path: pair.cert.clone(), fault: pem_fault(&e) })?;
        let key = PrivateKeyDer::from_pem_file(&pair.key).map_err(|e| CertError::BadPem {
            what: "private key",
            path: pair.key.clone(),
            fault: pem_fault(&e),
        })?;
        let key = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| CertError::UnservableKey { path: pair.key.clone(), detail: e.to_string() })?;
        Ok(Arc::new(CertifiedKey::new(chain, key)))
    }

    /// Re-reads the files; a bad pair is refused and the current one kept.
    pub fn reload(&self) -> Result<(), CertError> {
        let key = Self::read(&self.pair)?;
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = key;
        Ok(())
    }

    pub fn files(&self) -> Vec<PathBuf> {
        vec![self.pair.cert.clone(), self.pair.key.clone()]
    }

    pub fn acceptor(self: &Arc<Self>) -> Result<tokio_rustls::TlsAcceptor, CertError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| CertError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_read_as_envoy_shows_them() {
        assert_eq!(envoy_serial(&[0x01]), "01");
        assert_eq!(envoy_serial(&[0x00, 0x99]), "99", "the zero byte DER puts before a high first bit");
        assert_eq!(envoy_serial(&[0x12, 0x34]), "1234");
        assert_eq!(envoy_serial(&[0xfb]), "-05", "negative, in two's complement");
        assert_eq!(envoy_serial(&[0xff, 0x00]), "-0100");
        assert_eq!(envoy_serial(&[0x00]), "0", "zero, as Envoy shows it");
    }

    fn write_pair(dir: &Path, cert_pem: &str, key_pem: &str) -> TlsPair {
        let pair = TlsPair { cert: dir.join("cert.pem"), key: dir.join("key.pem"), key_password: false };
        std::fs::write(&pair.cert, cert_pem).expect("write cert");
        std::fs::write(&pair.key, key_pem).expect("write key");
        pair
    }

    fn generated() -> rcgen::CertifiedKey<rcgen::KeyPair> {
        rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("generate")
    }

    #[test]
    fn a_good_pair_passes_and_reports_its_expiry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = generated();
        let pair = write_pair(dir.path(), &key.cert.pem(), &key.signing_key.serialize_pem());
        let checked = check_pair(&pair, SystemTime::now()).expect("valid");
        assert!(checked.expires_in > Duration::from_secs(86_400 * 300), "{checked:?}");
    }

    #[test]
    fn each_fault_names_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (generated(), generated());

        let pair = write_pair(dir.path(), "garbage", &a.signing_key.serialize_pem());
        let err = check_pair(&pair, SystemTime::now()).map_err(|e| e.to_string()).expect_err("garbage");
        assert!(err.starts_with(&format!("certificate {}", pair.cert.display())), "{err}");

        let pair = write_pair(dir.path(), &a.cert.pem(), &b.signing_key.serialize_pem());
        let err = check_pair(&pair, SystemTime::now()).map_err(|e| e.to_string()).expect_err("mismatch");
        assert!(err.contains("does not match"), "{err}");

        std::fs::remove_file(&pair.key).expect("rm");
        let err = check_pair(&pair, SystemTime::now()).map_err(|e| e.to_string()).expect_err("missing key");
        assert!(err.starts_with(&format!("private key {}: cannot read", pair.key.display())), "{err}");

        let pair = write_pair(dir.path(), &a.cert.pem(), &a.signing_key.serialize_pem());
        let far_future = SystemTime::now() + Duration::from_secs(86_400 * 365 * 5000);
        let err = check_pair(&pair, far_future).map_err(|e| e.to_string()).expect_err("expired");
        assert!(err.contains("expired on"), "{err}");
    }

    #[test]
    fn a_half_written_pem_says_so_in_words() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = generated();
        let cert = a.cert.pem();
        let pair = write_pair(dir.path(), &cert[..cert.len() / 2], &a.signing_key.serialize_pem());
        let err = check_pair(&pair, SystemTime::now()).map_err(|e| e.to_string()).expect_err("half written");
        let expected = format!(
            "certificate {}: a PEM block has no end line (-----END CERTIFICATE-----): is the file half written?",
            pair.cert.display()
        );
        assert_eq!(err, expected);
        let key = a.signing_key.serialize_pem();
        let pair = write_pair(dir.path(), &cert, &key[..key.len() - 40]);
        let err = check_pair(&pair, SystemTime::now()).map_err(|e| e.to_string()).expect_err("half written key");
        assert!(err.contains("has no end line") && err.starts_with("private key"), "{err}");
        let pair = write_pair(dir.path(), &cert, "not a key\n");
        let err = check_pair(&pair, SystemTime::now()).map_err(|e| e.to_string()).expect_err("no key");
        assert_eq!(err, format!("private key {}: no PEM PRIVATE KEY block", pair.key.display()));
    }

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

    fn fixture_pair(name: &str, key_password: bool) -> TlsPair {
        let file = |kind: &str| PathBuf::from(format!("{FIXTURES}/{name}-{kind}.pem"));
        TlsPair { cert: file("cert"), key: file("key"), key_password }
    }

    #[test]
    fn a_key_beyond_sesames_checks_is_left_to_envoy() {
        let checked = check_pair(&fixture_pair("p521", false), SystemTime::now()).expect("P-521 is Envoy's to judge");
        let why = checked.key_left_to_envoy.expect("left to envoy");
        assert!(why.starts_with("its type is beyond sesame's checks"), "{why}");
        // The certificate's own checks still hold.
        let far_future = SystemTime::now() + Duration::from_secs(86_400 * 365 * 200);
        let err = check_pair(&fixture_pair("p521", false), far_future).map_err(|e| e.to_string()).expect_err("expired");
        assert!(err.contains("expired on"), "{err}");
    }

    #[test]
    fn an_encrypted_key_needs_its_password_in_the_bootstrap() {
        let pair = fixture_pair("encrypted", false);
        let err = check_pair(&pair, SystemTime::now()).map_err(|e| e.to_string()).expect_err("no password");
        assert_eq!(
            err,
            format!("private key {} is encrypted and the bootstrap gives no password for it", pair.key.display())
        );
        let checked = check_pair(&fixture_pair("encrypted", true), SystemTime::now()).expect("with its password");
        assert!(checked.key_left_to_envoy.is_some_and(|why| why.contains("encrypted")));
    }
}
