//! The rig of the in-place rotation tests: bootstraps with a TLS `tcp_proxy` listener, a listener
//! that requires client certificates from a CA, and a cluster that presents a client certificate
//! to an upstream (a TLS server here that records the serial it was shown).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::DigitallySignedStruct;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};

use super::tls::{certificate, tls_bootstrap};

/// `tls_bootstrap` with a second TLS listener on `tcp_port`, a `tcp_proxy` to `echo_port`.
pub fn tcp_proxy_bootstrap(dir: &Path, port: u16, tcp_port: u16, echo_port: u16, cert: &Path, key: &Path) -> String {
    let mut yaml = tls_bootstrap(dir, port, cert, key, None);
    yaml.push_str(&format!(
        r#"  - name: tcp
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {tcp_port} }} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            tls_certificates:
            - certificate_chain: {{ filename: "{cert}" }}
              private_key: {{ filename: "{key}" }}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: echo
  clusters:
  - name: echo
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: echo
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {echo_port} }} }} }}
"#,
        cert = cert.display(),
        key = key.display(),
    ));
    yaml
}

/// A CA and a client certificate it signed: (CA PEM, client chain PEM, client key PEM).
pub fn ca_and_client(serial: u64) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, format!("test CA {serial}"));
    ca.serial_number = Some(rcgen::SerialNumber::from(serial));
    let ca_cert = ca.self_signed(&ca_key).expect("self-sign CA");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let client_key = rcgen::KeyPair::generate().expect("key");
    let mut client = rcgen::CertificateParams::new(vec!["client".to_string()]).expect("params");
    client.serial_number = Some(rcgen::SerialNumber::from(serial + 1000));
    let client_cert = client.signed_by(&client_key, &issuer).expect("sign client");
    (ca_cert.pem(), client_cert.pem(), client_key.serialize_pem())
}

/// The HTTPS listener of `tls_bootstrap` requiring a client certificate signed by `ca`.
pub fn mtls_bootstrap(dir: &Path, port: u16, cert: &Path, key: &Path, ca: &Path) -> String {
    let yaml = tls_bootstrap(dir, port, cert, key, None);
    let context = "          common_tls_context:\n";
    let with_ca = format!(
        "          require_client_certificate: true\n{context}            validation_context:\n              \
         trusted_ca: {{ filename: \"{}\" }}\n",
        ca.display()
    );
    yaml.replacen(context, &with_ca, 1)
}

/// One HTTPS request on a new connection that presents `chain`/`key`: its status, or why none.
pub fn mtls_get(port: u16, chain: &str, key: &str) -> Result<u16, String> {
    let certs: Vec<CertificateDer<'static>> =
        rustls::pki_types::pem::PemObject::pem_slice_iter(chain.as_bytes()).collect::<Result<_, _>>().expect("chain");
    let key: PrivateKeyDer<'static> = rustls::pki_types::pem::PemObject::from_pem_slice(key.as_bytes()).expect("key");
    let config = super::tls::client_config_presenting(Some((certs, key)));
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    super::read_response_head(&mut tls).map(|(status, _)| status)
}

/// A TLS upstream that requires a client certificate (any) and records the serial of each one it
/// was shown; it answers 200 and closes, so that every request is a new upstream connection.
pub struct ClientCertUpstream {
    pub port: u16,
    pub serials: Arc<Mutex<Vec<u64>>>,
}

impl ClientCertUpstream {
    pub fn start() -> ClientCertUpstream {
        let (cert, key) = certificate(77);
        let certs: Vec<CertificateDer<'static>> =
            rustls::pki_types::pem::PemObject::pem_slice_iter(cert.as_bytes()).collect::<Result<_, _>>().expect("cert");
        let key: PrivateKeyDer<'static> =
            rustls::pki_types::pem::PemObject::from_pem_slice(key.as_bytes()).expect("key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(Arc::new(AnyClient(provider)))
            .with_single_cert(certs, key)
            .expect("server config");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let serials = Arc::new(Mutex::new(Vec::new()));
        let seen = serials.clone();
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                let (config, seen) = (config.clone(), seen.clone());
                std::thread::spawn(move || serve_one(tcp, config, &seen));
            }
        });
        ClientCertUpstream { port, serials }
    }

    pub fn last_serial(&self) -> Option<u64> {
        self.serials.lock().expect("serials").last().copied()
    }
}

fn serve_one(tcp: TcpStream, config: Arc<rustls::ServerConfig>, seen: &Mutex<Vec<u64>>) {
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok(conn) = rustls::ServerConnection::new(config) else { return };
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut buffer = [0u8; 4096];
    let mut request = Vec::new();
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match tls.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buffer[..n]),
        }
    }
    if let Some(serial) = tls.conn.peer_certificates().and_then(|c| c.first()).map(super::tls::serial_of) {
        seen.lock().expect("serials").push(serial);
    }
    let _ = tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
    let _ = tls.flush();
    tls.conn.send_close_notify();
    let _ = tls.conn.complete_io(&mut tls.sock);
}

/// Asks for a client certificate and takes any: the test reads which one came.
#[derive(Debug)]
struct AnyClient(Arc<rustls::crypto::CryptoProvider>);

impl ClientCertVerifier for AnyClient {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
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
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A plain HTTP listener on `port` whose route goes to `upstream_port` over TLS, presenting the
/// client certificate `cert`/`key`.
pub fn client_cert_bootstrap(dir: &Path, port: u16, upstream_port: u16, cert: &Path, key: &Path) -> String {
    format!(
        r#"admin:
  address: {{ pipe: {{ path: "{admin}" }} }}
static_resources:
  listeners:
  - name: http
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: up }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: up
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: up
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {upstream_port} }} }} }}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: localhost
        common_tls_context:
          tls_certificates:
          - certificate_chain: {{ filename: "{cert}" }}
            private_key: {{ filename: "{key}" }}
"#,
        admin = dir.join("admin.sock").display(),
        cert = cert.display(),
        key = key.display(),
    )
}
