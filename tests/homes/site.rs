//! What Envoy serves in the homes tests: an HTTPS listener (the certificate that rotations change)
//! and a plain HTTP listener proxying to an upstream on the host's loopback that holds each request
//! for a second, so that a stop can be made with requests in flight.

use std::time::Duration;

use super::common::tls::{HttpsClient, tls_bootstrap};
use super::common::{Upstream, free_ports, request, wait_for};

pub struct Ports {
    pub https: u16,
    pub http: u16,
}

/// The bootstrap: the admin in `admin_dir`, the certificate files as Envoy will see them.
pub fn bootstrap(admin_dir: &str, ports: &Ports, upstream: u16, cert: &str, key: &str) -> String {
    let tls = tls_bootstrap(admin_dir.as_ref(), ports.https, cert.as_ref(), key.as_ref(), None);
    let http = format!(
        r#"  - name: http
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
                route: {{ cluster: upstream, timeout: 30s }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {upstream} }} }} }}
"#,
        port = ports.http
    );
    format!("{tls}{http}")
}

pub fn ports() -> Ports {
    let [https, http] = free_ports::<2>();
    Ports { https, http }
}

/// The serial of the certificate a new HTTPS connection to `port` is served, if one is.
pub fn served(port: u16) -> Option<u64> {
    HttpsClient::new(port, false).get().ok().filter(|(status, _)| *status == 200).map(|(_, serial)| serial)
}

/// Requests held by the upstream when the stop comes: all must be answered.
pub struct InFlight {
    clients: Vec<std::thread::JoinHandle<Result<u16, String>>>,
}

impl InFlight {
    /// `count` requests to the HTTP listener on `port`, returned once the upstream holds them all.
    pub fn start(upstream: &Upstream, port: u16, count: usize) -> InFlight {
        let before = upstream.arrived();
        let clients = (0..count).map(|_| std::thread::spawn(move || request(port, "/held"))).collect();
        wait_for(Duration::from_secs(30), "the requests to reach the upstream", || {
            upstream.arrived() >= before + count
        });
        InFlight { clients }
    }

    /// Fails unless every request was answered 200; `log` explains a failure.
    pub fn assert_all_answered(self, log: &str) {
        let results: Vec<_> = self.clients.into_iter().map(|c| c.join().expect("client")).collect();
        let failed: Vec<_> = results.iter().filter(|r| **r != Ok(200)).collect();
        assert!(
            failed.is_empty(),
            "{} of {} requests in flight failed: {failed:?}\n{log}",
            failed.len(),
            results.len()
        );
    }
}

/// An upstream that holds each request for a second.
pub fn upstream() -> Upstream {
    Upstream::start(Duration::from_secs(1))
}
