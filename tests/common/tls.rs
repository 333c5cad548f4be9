//! Certificates made in the tests (rcgen) and an HTTPS client that reports which certificate the
//! server presented (by serial), on fresh or keep-alive connections.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// A self-signed certificate for localhost with `serial`; (certificate PEM, key PEM).
pub fn certificate(serial: u64) -> (String, String) {
    certificate_valid(serial, None)
}

/// The same, with a notAfter in the past when `expired_days_ago` is given.
pub fn certificate_valid(serial: u64, expired_days_ago: Option<i64>) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params.serial_number = Some(rcgen::SerialNumber::from(serial));
    if let Some(days) = expired_days_ago {
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(days + 30);
        params.not_after = now - time::Duration::days(days);
    }
    let cert = params.self_signed(&key).expect("self-sign");
    (cert.pem(), key.serialize_pem())
}

/// Writes `contents` to `path` by rename, as cert-manager and careful tools do.
pub fn replace_file(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, contents).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename into place");
}

/// The serial of a DER certificate, as the big-endian bytes of its integer.
pub fn serial_of(cert: &CertificateDer<'_>) -> u64 {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).expect("x509");
    let bytes = parsed.raw_serial();
    bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

/// Accepts any server certificate: the tests check which one was served, not who signed it.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client configuration that accepts any server certificate (see `AcceptAny`).
pub fn client_config() -> Arc<rustls::ClientConfig> {
    client_config_presenting(None)
}

/// The same, presenting a client certificate (its chain and key) when given one.
pub fn client_config_presenting(
    client: Option<(Vec<CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>)>,
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)));
    let config = match client {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// A TLS connection to the loopback `port`, once its handshake is done, and the serial of the
/// certificate the server presented in it. Reads time out after 10 s.
pub fn tls_connect(port: u16, config: &Arc<rustls::ClientConfig>) -> Result<(TlsStream, u64), String> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    // Without it, the handshake's small writes meet delayed ACKs: 40 ms per new connection.
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).map_err(|e| format!("handshake: {e}"))?;
    }
    let serial = tls.conn.peer_certificates().and_then(|c| c.first()).map(serial_of).unwrap_or(0);
    Ok((tls, serial))
}

/// A client's TLS stream over TCP.
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// An HTTPS client on one connection at a time: keeps it alive between requests, and opens a new one
/// when the server asked to close (or when `keep_alive` is off).
pub struct HttpsClient {
    port: u16,
    keep_alive: bool,
    config: Arc<rustls::ClientConfig>,
    connection: Option<(TlsStream, u64)>,
}

impl HttpsClient {
    pub fn new(port: u16, keep_alive: bool) -> HttpsClient {
        HttpsClient { port, keep_alive, config: client_config(), connection: None }
    }

    /// One GET /; the status and the serial of the certificate of the connection it went over.
    pub fn get(&mut self) -> Result<(u16, u64), String> {
        if self.connection.is_none() {
            self.connection = Some(tls_connect(self.port, &self.config)?);
        }
        let (tls, serial) = self.connection.as_mut().expect("connection");
        let serial = *serial;
        let connection = if self.keep_alive { "keep-alive" } else { "close" };
        let request = format!("GET / HTTP/1.1\r\nHost: localhost\r\nConnection: {connection}\r\n\r\n");
        let result = tls.write_all(request.as_bytes()).map_err(|e| format!("write: {e}"));
        let result = result.and_then(|_| super::read_response_head(tls));
        match result {
            Ok((status, close)) => {
                if close || !self.keep_alive {
                    self.connection = None;
                }
                Ok((status, serial))
            }
            Err(e) => {
                self.connection = None;
                Err(e)
            }
        }
    }
}

/// A directory of certificate files laid out as a Kubernetes secret volume: `tls.crt` and `tls.key`
/// are symlinks through `..data` into a versioned directory, swapped atomically.
pub struct SecretVolume {
    pub dir: PathBuf,
    version: u32,
}

impl SecretVolume {
    pub fn new(dir: &Path, cert: &str, key: &str) -> SecretVolume {
        std::fs::create_dir_all(dir).expect("mkdir");
        let mut volume = SecretVolume { dir: dir.to_path_buf(), version: 0 };
        volume.swap(cert, key);
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).expect("symlink");
        }
        volume
    }

    /// Writes a new version and swaps `..data` to it with one rename, as the kubelet does.
    pub fn swap(&mut self, cert: &str, key: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        let target = self.dir.join(&version);
        std::fs::create_dir(&target).expect("mkdir version");
        std::fs::write(target.join("tls.crt"), cert).expect("write cert");
        std::fs::write(target.join("tls.key"), key).expect("write key");
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).expect("symlink tmp");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap ..data");
    }
}

/// An Envoy bootstrap with the admin on `dir/admin.sock` and one HTTPS listener on `port` serving
/// `cert`/`key` (static `tls_certificates` with `filename:`, which Envoy reads only at start).
/// `extra_port` adds a plain HTTP listener, for tests that need a second listener.
pub fn tls_bootstrap(dir: &Path, port: u16, cert: &Path, key: &Path, extra_port: Option<u16>) -> String {
    let hcm = |prefix: &str| {
        format!(
            r#"
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {prefix}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: "ok\n" }} }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"#
        )
    };
    let extra = extra_port.map_or_else(String::new, |extra| {
        format!(
            r#"
  - name: extra
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {extra} }} }}
    filter_chains:
    - filters:{}"#,
            hcm("extra")
        )
    });
    format!(
        r#"admin:
  address: {{ pipe: {{ path: "{admin}" }} }}
static_resources:
  listeners:
  - name: https
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            tls_certificates:
            - certificate_chain: {{ filename: "{cert}" }}
              private_key: {{ filename: "{key}" }}
      filters:{hcm}{extra}
"#,
        admin = dir.join("admin.sock").display(),
        cert = cert.display(),
        key = key.display(),
        hcm = hcm("https"),
    )
}

/// A certificate (serial 1), its key and an HTTPS bootstrap (`tls_bootstrap`, then `edit`) in a fresh
/// directory, for a port that was free a moment ago.
pub struct TlsSite {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bootstrap: PathBuf,
}

impl TlsSite {
    pub fn new(edit: impl FnOnce(String) -> String) -> TlsSite {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert_pem, key_pem) = certificate(1);
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, cert_pem).expect("cert");
        std::fs::write(&key, key_pem).expect("key");
        let port = super::free_port();
        let bootstrap = dir.path().join("envoy.yaml");
        std::fs::write(&bootstrap, edit(tls_bootstrap(dir.path(), port, &cert, &key, None))).expect("bootstrap");
        TlsSite { dir, port, cert, key, bootstrap }
    }
}
