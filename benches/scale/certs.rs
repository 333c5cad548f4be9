//! The certificates of the scale bench: up to `MAX` SNI names, each with its own pair signed by one
//! CA (so that a renewal comes from the same issuer, as cert-manager's does), in three generations
//! (served at start, the one renewal, the burst). Made once with rcgen and cached under
//! target/bench/scale-certs/; each run copies the first generation into its own directory, with a
//! bootstrap of one listener and one filter chain per name.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::common::tls::{client_config, replace_file, serial_of};

/// The most names a run serves.
pub const MAX: usize = 1000;
/// Generations: 1 at start, 2 for the one renewal, 3 for the burst.
const GENERATIONS: u64 = 3;
/// Changes when what is cached changes: an older cache is made again.
const STAMP: &str = "scale-certs v1: 1000 names, 3 generations, one CA";

pub fn name(i: usize) -> String {
    format!("h{i}.scale.test")
}

/// The serial of name `i`'s certificate in generation `generation`: tells them all apart.
pub fn serial(generation: u64, i: usize) -> u64 {
    generation * 1_000_000 + i as u64 + 1
}

fn cache() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench/scale-certs")
}

fn cached(generation: u64, i: usize) -> (PathBuf, PathBuf) {
    let dir = cache();
    (dir.join(format!("cert-{generation}-{i}.pem")), dir.join(format!("key-{generation}-{i}.pem")))
}

/// The (certificate, key) PEM of name `i` in `generation`.
pub fn pem(generation: u64, i: usize) -> (String, String) {
    let (cert, key) = cached(generation, i);
    (std::fs::read_to_string(cert).expect("cached certificate"), std::fs::read_to_string(key).expect("cached key"))
}

/// Makes the cache unless it is there whole; the time it took, None when it was there.
pub fn ensure() -> Option<Duration> {
    let stamp = cache().join("complete");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == STAMP) {
        return None;
    }
    let started = Instant::now();
    std::fs::create_dir_all(cache()).expect("mkdir the certificate cache");
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "sesame scale bench CA");
    let ca_cert = ca.self_signed(&ca_key).expect("self-sign the CA");
    std::fs::write(cache().join("ca.pem"), ca_cert.pem()).expect("write the CA");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    for generation in 1..=GENERATIONS {
        for i in 0..MAX {
            let key = rcgen::KeyPair::generate().expect("key");
            let mut params = rcgen::CertificateParams::new(vec![name(i)]).expect("params");
            params.distinguished_name.push(rcgen::DnType::CommonName, name(i));
            params.serial_number = Some(rcgen::SerialNumber::from(serial(generation, i)));
            let cert = params.signed_by(&key, &issuer).expect("sign");
            let (cert_path, key_path) = cached(generation, i);
            std::fs::write(cert_path, cert.pem()).expect("write a certificate");
            std::fs::write(key_path, key.serialize_pem()).expect("write a key");
        }
    }
    std::fs::write(stamp, STAMP).expect("stamp the cache");
    Some(started.elapsed())
}

/// N names served by one Envoy listener, from files in a directory of the run's own.
pub struct SniSite {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub bootstrap: PathBuf,
}

impl SniSite {
    pub fn new(n: usize) -> SniSite {
        assert!(n <= MAX, "at most {MAX} names");
        let dir = tempfile::tempdir().expect("tempdir");
        for i in 0..n {
            let (cert, key) = cached(1, i);
            std::fs::copy(cert, dir.path().join(format!("cert-{i}.pem"))).expect("copy a certificate");
            std::fs::copy(key, dir.path().join(format!("key-{i}.pem"))).expect("copy a key");
        }
        let port = crate::common::free_port();
        let bootstrap = dir.path().join("envoy.yaml");
        std::fs::write(&bootstrap, sni_bootstrap(dir.path(), port, n)).expect("write the bootstrap");
        SniSite { dir, port, bootstrap }
    }

    /// Renews name `i` as a careful tool does: the key, then the certificate, each by rename.
    pub fn renew(&self, i: usize, (cert, key): &(String, String)) {
        replace_file(&self.dir.path().join(format!("key-{i}.pem")), key);
        replace_file(&self.dir.path().join(format!("cert-{i}.pem")), cert);
    }
}

/// One listener with the TLS inspector and a filter chain per name (`server_names`), each with its
/// certificate and key by `filename` and an HTTP connection manager that answers itself.
fn sni_bootstrap(dir: &Path, port: u16, n: usize) -> String {
    let mut yaml = format!(
        r#"admin:
  address: {{ pipe: {{ path: "{admin}" }} }}
static_resources:
  listeners:
  - name: sni
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }}
    filter_chains:
"#,
        admin = dir.join("admin.sock").display()
    );
    for i in 0..n {
        let (cert, key) = (dir.join(format!("cert-{i}.pem")), dir.join(format!("key-{i}.pem")));
        yaml.push_str(&format!(
            r#"    - filter_chain_match: {{ server_names: ["{name}"] }}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            tls_certificates:
            - certificate_chain: {{ filename: "{cert}" }}
              private_key: {{ filename: "{key}" }}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: sni
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
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#,
            name = name(i),
            cert = cert.display(),
            key = key.display(),
        ));
    }
    yaml
}

/// The serial of the certificate served to a client that asks for `name` by SNI, on a fresh
/// connection.
pub fn served_serial(port: u16, name: &str) -> Result<u64, String> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    let config = CONFIG.get_or_init(client_config).clone();
    let conn = rustls::ClientConnection::new(config, server).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).map_err(|e| format!("handshake: {e}"))?;
    }
    let leaf = tls.conn.peer_certificates().and_then(|c| c.first()).ok_or("no certificate")?;
    Ok(serial_of(leaf))
}
