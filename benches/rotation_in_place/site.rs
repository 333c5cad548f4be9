//! What the rotation bench serves: one certificate (serial 1) on two listeners of one Envoy, an
//! HTTPS listener that answers itself and a TLS-terminating `tcp_proxy` listener in front of a
//! local echo upstream (the in-place tests' rig).

use std::path::PathBuf;

use crate::common::free_ports;
use crate::common::in_place::tcp_proxy_bootstrap;
use crate::common::long_lived::echo_upstream;
use crate::common::tls::certificate;

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
        let yaml = tcp_proxy_bootstrap(dir.path(), https, tcp, echo_upstream(), &cert, &key);
        let bootstrap = dir.path().join("envoy.yaml");
        std::fs::write(&bootstrap, yaml).expect("bootstrap");
        Site { _dir: dir, https, tcp, cert, key, bootstrap }
    }
}
