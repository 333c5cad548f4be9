//! Bootstraps whose certificates sesame gives Envoy by SDS, with the real Envoy: what Envoy serves
//! must be what it would serve from the bootstrap as written. A static secret of the bootstrap, a
//! context that holds a certificate sesame leaves as written beside one it could give, and a
//! `--config-yaml` that adds a listener.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::tls::{HttpsClient, certificate, tls_bootstrap};
use common::{Launcher, Mode, admin_get, envoy_bin, free_ports, http_get, wait_for};
use nix::sys::signal::Signal;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A P-256 pair with serial `serial` in `dir`.
fn pair(dir: &Path, serial: u64) -> (PathBuf, PathBuf) {
    let (cert_pem, key_pem) = certificate(serial);
    let (cert, key) = (dir.join(format!("cert-{serial}.pem")), dir.join(format!("key-{serial}.pem")));
    std::fs::write(&cert, cert_pem).expect("cert");
    std::fs::write(&key, key_pem).expect("key");
    (cert, key)
}

/// Runs `command` under sesame in place until Envoy is ready; the launcher.
fn start(dir: &Path, bootstrap: &str, extra: &[&str]) -> Launcher {
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, bootstrap).expect("bootstrap");
    let envoy = envoy_bin();
    let mut command = vec![envoy.to_str().expect("utf-8"), "-c", path.to_str().expect("utf-8")];
    command.extend(extra);
    let launcher = Launcher::start(Mode::Plain, &["--cert-reload", "in-place"], &command);
    let admin = dir.join("admin.sock");
    wait_for(Duration::from_secs(30), "Envoy to be ready", || admin_get(&admin, "/ready") == Some(200));
    launcher
}

fn stop(mut launcher: Launcher) {
    launcher.signal(Signal::SIGTERM);
    assert_eq!(launcher.exit_code(Duration::from_secs(30)), 0, "{}", launcher.log());
}

#[test]
fn a_static_secret_of_the_bootstrap_is_left_to_envoy_and_the_listeners_certificate_is_given_by_sds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = pair(dir.path(), 1);
    let [port] = free_ports();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, std::fs::read(&cert).expect("cert")).expect("ca");
    // The listener asks for client certificates verified against the bootstrap's own secret.
    let yaml = tls_bootstrap(dir.path(), port, &cert, &key, None).replacen(
        "          common_tls_context:\n",
        "          common_tls_context:\n            validation_context_sds_secret_config: { name: client-ca }\n",
        1,
    ) + &format!(
        "  secrets:\n  - name: client-ca\n    validation_context:\n      trusted_ca: {{ filename: \"{}\" }}\n",
        ca.display()
    );
    let launcher = start(dir.path(), &yaml, &[]);
    assert_eq!(HttpsClient::new(port, false).get().map(|(_, serial)| serial), Ok(1));
    let status = launcher.status();
    let listed: Vec<&str> =
        status["certificates"].as_array().into_iter().flatten().filter_map(|c| c["path"].as_str()).collect();
    assert_eq!(listed, [cert.to_str().expect("utf-8")], "the secret's CA is Envoy's own: {status:#}");
    stop(launcher);
}

#[test]
fn a_context_with_a_certificate_sesame_leaves_as_written_is_left_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = pair(dir.path(), 1);
    let [port] = free_ports();
    // A second certificate (RSA beside the P-256 one) with a field sesame does not give by SDS:
    // Envoy refuses SDS and static certificates in one context, so both stay files.
    let rsa = format!(
        "            - certificate_chain: {{ filename: \"{}\" }}\n              private_key: {{ filename: \"{}\" }}\n              \
         watched_directory: {{ path: \"{}\" }}\n",
        fixture("rsa2048-cert.pem").display(),
        fixture("rsa2048-key.pem").display(),
        fixture("").display()
    );
    let yaml = tls_bootstrap(dir.path(), port, &cert, &key, None);
    let at = yaml.find("      filters:").expect("the filters after the context");
    let yaml = format!("{}{rsa}{}", &yaml[..at], &yaml[at..]);
    let launcher = start(dir.path(), &yaml, &[]);
    assert_eq!(HttpsClient::new(port, false).get().map(|(_, serial)| serial), Ok(1), "the P-256 one still served");
    let status = launcher.status();
    assert!(status["certificates"].is_null(), "nothing by SDS: Envoy reads both files: {status:#}");
    stop(launcher);
}

#[test]
fn a_listener_added_by_config_yaml_is_served_beside_those_of_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = pair(dir.path(), 1);
    let [https, plain] = free_ports();
    let yaml = tls_bootstrap(dir.path(), https, &cert, &key, None);
    let overlay = format!(
        r#"{{"static_resources":{{"listeners":[{{"name":"plain","address":{{"socket_address":{{"address":"127.0.0.1","port_value":{plain}}}}},"filter_chains":[{{"filters":[{{"name":"envoy.filters.network.http_connection_manager","typed_config":{{"@type":"type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager","stat_prefix":"plain","route_config":{{"virtual_hosts":[{{"name":"all","domains":["*"],"routes":[{{"match":{{"prefix":"/"}},"direct_response":{{"status":200}}}}]}}]}},"http_filters":[{{"name":"envoy.filters.http.router","typed_config":{{"@type":"type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}}}]}}}}]}}]}}]}}}}"#
    );
    let launcher = start(dir.path(), &yaml, &["--config-yaml", &overlay]);
    assert_eq!(http_get(plain), Some(200), "the listener of --config-yaml");
    assert_eq!(HttpsClient::new(https, false).get().map(|(_, serial)| serial), Ok(1), "the file's, by SDS");
    assert_eq!(launcher.status()["certificates"].as_array().map(Vec::len), Some(1));
    stop(launcher);
}

/// The serial served to a client that asks for `name` by SNI.
fn serial_for(port: u16, name: &str) -> Result<u64, String> {
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(common::tls::client_config(), server).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).map_err(|e| format!("handshake: {e}"))?;
    }
    let leaf = tls.conn.peer_certificates().and_then(|c| c.first()).ok_or("no certificate")?;
    Ok(common::tls::serial_of(leaf))
}

/// Hot restarts give the certificates inline: Envoy takes no inotify instance for them, which it
/// would for each file-based SDS secret (128 per user by default), however many there are.
#[test]
fn forty_sni_certificates_by_hot_restart_take_no_inotify_instance_and_one_is_renewed_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let [port] = free_ports();
    let (cert, key) = pair(dir.path(), 1);
    let base = tls_bootstrap(dir.path(), port, &cert, &key, None);
    let chain_at = base.find("    filter_chains:\n").expect("filter chains") + "    filter_chains:\n".len();
    let chain = base[chain_at..].to_string();
    let mut chains = String::new();
    for i in 0..40u64 {
        let (cert, key) = pair(dir.path(), 100 + i);
        let this = chain
            .replace(&cert_path(dir.path(), 1), &cert.display().to_string())
            .replace(&dir.path().join("key-1.pem").display().to_string(), &key.display().to_string());
        chains += &this.replacen(
            "    - transport_socket:",
            &format!("    - filter_chain_match: {{ server_names: [\"h{i}.test\"] }}\n      transport_socket:"),
            1,
        );
    }
    let listener_filters = "    listener_filters:\n    - name: envoy.filters.listener.tls_inspector\n      typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }\n";
    let yaml =
        format!("{}{listener_filters}    filter_chains:\n{chains}", &base[..chain_at - "    filter_chains:\n".len()]);
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, &yaml).expect("bootstrap");
    let envoy = envoy_bin();
    let command = [envoy.to_str().expect("utf-8"), "-c", path.to_str().expect("utf-8")];
    let mut launcher = Launcher::start(Mode::Plain, &[], &command);
    let admin = dir.path().join("admin.sock");
    wait_for(Duration::from_secs(30), "Envoy to be ready", || admin_get(&admin, "/ready") == Some(200));
    assert_eq!(serial_for(port, "h7.test"), Ok(107));
    let envoy_pid = common::children_of(launcher.pid())[0];
    let inotify = std::fs::read_dir(format!("/proc/{envoy_pid}/fd"))
        .expect("fds")
        .flatten()
        .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy().contains("inotify")))
        .count();
    assert_eq!(inotify, 0, "no inotify instance for 40 certificates");
    assert_eq!(launcher.status()["certificates"].as_array().map(Vec::len), Some(40));
    let (cert_pem, key_pem) = certificate(207);
    common::tls::replace_file(&dir.path().join("key-107.pem"), &key_pem);
    common::tls::replace_file(&dir.path().join("cert-107.pem"), &cert_pem);
    wait_for(Duration::from_secs(20), "the renewed certificate on its name", || serial_for(port, "h7.test") == Ok(207));
    assert_eq!(serial_for(port, "h8.test"), Ok(108), "the others as they were");
    launcher.wait_for_metric("sesame_reloads_total{result=\"success\"}", |n| n == 1);
    launcher.signal(Signal::SIGTERM);
    assert_eq!(launcher.exit_code(Duration::from_secs(60)), 0, "{}", launcher.log());
}

fn cert_path(dir: &Path, serial: u64) -> String {
    dir.join(format!("cert-{serial}.pem")).display().to_string()
}

/// Envoy merges `--config-yaml` over the bootstrap sesame rewrote, as over the file: a member of a
/// oneof replaces its sibling (here the stats matcher's), which only protobuf knows.
#[test]
fn config_yaml_is_merged_by_envoy_itself_over_the_rewritten_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = pair(dir.path(), 1);
    let [port] = free_ports();
    let matcher = "stats_config:\n  stats_matcher:\n    exclusion_list:\n      patterns: [{ prefix: \"cluster.\" }]\n";
    let yaml = format!("{matcher}{}", tls_bootstrap(dir.path(), port, &cert, &key, None));
    let launcher =
        start(dir.path(), &yaml, &["--config-yaml", "stats_config: { stats_matcher: { reject_all: true } }"]);
    assert_eq!(HttpsClient::new(port, false).get().map(|(_, serial)| serial), Ok(1), "by SDS, Envoy started");
    assert_eq!(launcher.status()["certificates"].as_array().map(Vec::len), Some(1));
    stop(launcher);
}

/// A YAML value that readers read differently (an octal port, as Envoy's reader takes it): the
/// bootstrap is given to Envoy as written, not re-serialised with another meaning.
#[test]
fn a_bootstrap_with_an_ambiguous_yaml_value_is_given_to_envoy_as_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = pair(dir.path(), 1);
    let [port] = free_ports();
    let yaml = tls_bootstrap(dir.path(), port, &cert, &key, None)
        .replace(&format!("port_value: {port} "), &format!("port_value: 0{port:o} "));
    assert!(yaml.contains(&format!("0{port:o}")), "{yaml}");
    let launcher = start(dir.path(), &yaml, &[]);
    assert_eq!(HttpsClient::new(port, false).get().map(|(_, serial)| serial), Ok(1), "on the port Envoy read");
    assert!(launcher.log().contains("which YAML readers read differently"), "{}", launcher.log());
    assert!(launcher.status()["certificates"].is_null(), "the files, as written");
    stop(launcher);
}
