//! The embedded default: `sesame run` with no command runs the real Envoy on the demo bootstrap.

mod common;

use std::time::Duration;

use common::{Launcher, Mode, alive, children_of, envoy_bin, free_ports, http_get, https_get, wait_for};
use nix::sys::signal::Signal;

const ENVOY_START: Duration = Duration::from_secs(30);

fn start_demo(mode: Mode) -> (Launcher, u16, u16) {
    let envoy = envoy_bin();
    let [http, https] = free_ports();
    let options = [
        "--envoy-bin".to_string(),
        envoy.to_string_lossy().into_owned(),
        "--demo-http-port".to_string(),
        http.to_string(),
        "--demo-https-port".to_string(),
        https.to_string(),
    ];
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    (Launcher::start(mode, &options, &[]), http, https)
}

fn wait_until_serving(launcher: &Launcher, http: u16, https: u16) {
    let cert = launcher.runtime_dir().join("demo/cert.pem");
    wait_for(ENVOY_START, "the demo to answer 200 over HTTP", || http_get(http) == Some(200));
    assert_eq!(https_get(https, &cert), Some(200), "HTTPS with the generated certificate; log:\n{}", launcher.log());
}

#[test]
fn demo_serves_http_and_https_and_sigterm_ends_everything() {
    let (mut launcher, http, https) = start_demo(Mode::Pid1);
    wait_until_serving(&launcher, http, https);
    let envoy_pids = children_of(launcher.pid());
    assert_eq!(envoy_pids.len(), 1, "one Envoy under the launcher");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", envoy_pids[0])).expect("Envoy's command line");
    let argv: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let flags: [&[u8]; 4] = [b"--restart-epoch", b"0", b"--use-dynamic-base-id", b"--base-id-path"];
    assert!(argv.windows(4).any(|w| w == flags), "{:?}", String::from_utf8_lossy(&cmdline));
    let base_id: u64 = std::fs::read_to_string(launcher.runtime_dir().join("envoy-base-id"))
        .expect("base id file")
        .trim()
        .parse()
        .expect("a number");
    let shared_memory = std::path::PathBuf::from(format!("/dev/shm/envoy_shared_memory_{}", base_id * 10));
    assert!(shared_memory.exists(), "Envoy's hot-restart memory is {}", shared_memory.display());
    let control_socket = launcher.runtime_dir().join("control.sock");
    assert!(control_socket.exists());

    launcher.signal(Signal::SIGTERM);
    assert_eq!(launcher.exit_code(Duration::from_secs(20)), 0, "log:\n{}", launcher.log());
    assert!(!alive(envoy_pids[0]), "Envoy is gone");
    assert_eq!(http_get(http), None, "nothing listens on the demo port any more");
    assert!(!shared_memory.exists(), "the launcher removed {} once no epoch was left", shared_memory.display());
    assert!(!control_socket.exists(), "the launcher removed its control socket");
}

#[test]
fn two_demo_launchers_run_side_by_side() {
    let (mut first, http1, https1) = start_demo(Mode::Pid1);
    let (mut second, http2, https2) = start_demo(Mode::Plain);
    wait_until_serving(&first, http1, https1);
    wait_until_serving(&second, http2, https2);
    let base_id = |launcher: &Launcher| {
        std::fs::read_to_string(launcher.runtime_dir().join("envoy-base-id")).expect("base id file")
    };
    assert_ne!(base_id(&first), base_id(&second), "each Envoy got its own base id");

    for launcher in [&mut first, &mut second] {
        launcher.signal(Signal::SIGTERM);
        assert_eq!(launcher.exit_code(Duration::from_secs(20)), 0, "log:\n{}", launcher.log());
    }
}
