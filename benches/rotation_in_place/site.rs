//! What the rotation bench serves: one certificate (serial 1) on two listeners of one Envoy, an
//! HTTPS listener that answers itself and a TLS-terminating `tcp_proxy` listener in front of a
//! local echo upstream.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;

use crate::common::free_ports;
use crate::common::tls::{certificate, tls_bootstrap};

pub struct Site {
    /// Holds the files: they go with it.
    _dir: tempfile::TempDir,
    /// The HTTPS listener (HTTP connection manager, direct responses).
    pub https: u16,
    /// The TLS listener whose `tcp_proxy` forwards the plain bytes to the echo upstream.
    pub tcp: u16,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bootstrap: PathBuf,
}

impl Site {
    pub fn new() -> Site {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert_pem, key_pem) = certificate(1);
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, cert_pem).expect("cert");
        std::fs::write(&key, key_pem).expect("key");
        let [https, tcp] = free_ports::<2>();
        let echo = echo_upstream();
        let mut yaml = tls_bootstrap(dir.path(), https, &cert, &key, None);
        yaml += &tcp_proxy_listener(tcp, echo, &cert, &key);
        let bootstrap = dir.path().join("envoy.yaml");
        std::fs::write(&bootstrap, yaml).expect("bootstrap");
        Site { _dir: dir, https, tcp, cert, key, bootstrap }
    }
}

/// A second listener for `tls_bootstrap`'s `listeners:` list, and the `clusters:` it needs: TLS
/// with the same certificate, then `tcp_proxy` to the upstream on `echo`.
fn tcp_proxy_listener(port: u16, echo: u16, cert: &std::path::Path, key: &std::path::Path) -> String {
    format!(
        r#"  - name: tls_tcp_proxy
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
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: echo
          cluster: echo
  clusters:
  - name: echo
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: echo
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {echo} }} }} }}
"#,
        cert = cert.display(),
        key = key.display(),
    )
}

/// A loopback upstream that writes back whatever each connection sends, until it closes; its port.
fn echo_upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the echo upstream");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || echo(stream));
        }
    });
    port
}

fn echo(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = stream.read(&mut buf) {
        if stream.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}
