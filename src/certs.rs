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

/// A `tls_certificates` entry of the bootstrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A pair that passed: when its leaf expires.
#[derive(Debug, Clone, Copy)]
pub struct Checked {
    pub expires_in: Duration,
}

/// Checks one pair at `now`; the error is one line naming the file at fault.
pub fn check_pair(pair: &TlsPair, now: SystemTime) -> Result<Checked, String> {
    let chain = read_chain(&pair.cert)?;
    let key = read_key(&pair.key)?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("private key {}: unsupported key: {e}", pair.key.display()))?;
    let leaf = chain[0].clone();
    rustls::sign::CertifiedKey::new(chain, signing_key).keys_match().map_err(|e| match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            format!("private key {} does not match certificate {}", pair.key.display(), pair.cert.display())
        }
        other => format!("certificate {}: {other}", pair.cert.display()),
    })?;
    let (not_before, not_after) = validity(&leaf).map_err(|e| format!("certificate {}: {e}", pair.cert.display()))?;
    let now_secs = crate::clock::unix_seconds(now) as i64;
    if now_secs < not_before {
        return Err(format!("certificate {} is not valid before {}", pair.cert.display(), format_time(not_before)));
    }
    if now_secs > not_after {
        return Err(format!("certificate {} expired on {}", pair.cert.display(), format_time(not_after)));
    }
    Ok(Checked { expires_in: Duration::from_secs((not_after - now_secs) as u64) })
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("certificate {}: cannot read: {e}", path.display()))?;
    let chain: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate {}: bad PEM: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!("certificate {}: no PEM CERTIFICATE block", path.display()));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("private key {}: cannot read: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| format!("private key {}: no usable PEM key: {e}", path.display()))
}

/// notBefore and notAfter of a certificate, in seconds since the epoch.
fn validity(cert: &CertificateDer<'_>) -> Result<(i64, i64), String> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let validity = parsed.validity();
    Ok((validity.not_before.timestamp(), validity.not_after.timestamp()))
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
    pub fn load(pair: TlsPair) -> Result<Arc<ReloadingCert>, String> {
        let key = Self::read(&pair)?;
        Ok(Arc::new(ReloadingCert { pair, current: RwLock::new(key) }))
    }

    fn read(pair: &TlsPair) -> Result<Arc<CertifiedKey>, String> {
        check_pair(pair, SystemTime::now())?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pair.cert)
            .and_then(|certs| certs.collect())
            .map_err(|e| format!("certificate {}: {e}", pair.cert.display()))?;
        let key =
            PrivateKeyDer::from_pem_file(&pair.key).map_err(|e| format!("private key {}: {e}", pair.key.display()))?;
        let key = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| format!("private key {}: {e}", pair.key.display()))?;
        Ok(Arc::new(CertifiedKey::new(chain, key)))
    }

    /// Re-reads the files; a bad pair is refused and the current one kept.
    pub fn reload(&self) -> Result<(), String> {
        let key = Self::read(&self.pair)?;
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = key;
        Ok(())
    }

    pub fn files(&self) -> Vec<PathBuf> {
        vec![self.pair.cert.clone(), self.pair.key.clone()]
    }

    pub fn acceptor(self: &Arc<Self>) -> Result<tokio_rustls::TlsAcceptor, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
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

    fn write_pair(dir: &Path, cert_pem: &str, key_pem: &str) -> TlsPair {
        let pair = TlsPair { cert: dir.join("cert.pem"), key: dir.join("key.pem") };
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
        let err = check_pair(&pair, SystemTime::now()).expect_err("garbage");
        assert!(err.starts_with(&format!("certificate {}", pair.cert.display())), "{err}");

        let pair = write_pair(dir.path(), &a.cert.pem(), &b.signing_key.serialize_pem());
        let err = check_pair(&pair, SystemTime::now()).expect_err("mismatch");
        assert!(err.contains("does not match"), "{err}");

        std::fs::remove_file(&pair.key).expect("rm");
        let err = check_pair(&pair, SystemTime::now()).expect_err("missing key");
        assert!(err.starts_with(&format!("private key {}: cannot read", pair.key.display())), "{err}");

        let pair = write_pair(dir.path(), &a.cert.pem(), &a.signing_key.serialize_pem());
        let far_future = SystemTime::now() + Duration::from_secs(86_400 * 365 * 5000);
        let err = check_pair(&pair, far_future).expect_err("expired");
        assert!(err.contains("expired on"), "{err}");
    }
}
