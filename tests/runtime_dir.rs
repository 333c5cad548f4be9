//! One launcher per runtime directory: a second `sesame run` on the same directory exits 1 at once,
//! naming the holder, and touches nothing of the first's (its control socket, its Envoy's admin
//! socket and base id, the demo's files).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Launcher, Mode, SESAME, admin_get, envoy_bin, free_ports, wait_for};
use nix::sys::signal::Signal;

fn demo(mode: Mode, runtime: Option<&Path>, http: u16, https: u16) -> Launcher {
    let envoy = envoy_bin().to_string_lossy().into_owned();
    let (http, https) = (http.to_string(), https.to_string());
    let mut args = vec!["run", "--envoy-bin", &envoy, "--demo-http-port", &http, "--demo-https-port", &https];
    let runtime = runtime.map(|r| r.to_string_lossy().into_owned());
    match &runtime {
        Some(dir) => {
            args.extend(["--runtime-dir", dir.as_str()]);
            Launcher::start_program(mode, Path::new(SESAME), &args)
        }
        None => Launcher::start(mode, &args[1..], &[]),
    }
}

/// What a second launcher must not touch: each file's inode and contents.
fn fingerprint(runtime: &Path) -> Vec<(PathBuf, u64, Vec<u8>)> {
    ["control.sock", "envoy-admin.sock", "envoy-base-id", "demo/envoy.yaml", "demo/cert.pem", "sesame.lock"]
        .iter()
        .map(|name| {
            let path = runtime.join(name);
            let meta = std::fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let contents = if meta.is_file() { std::fs::read(&path).expect("read") } else { Vec::new() };
            (path, meta.ino(), contents)
        })
        .collect()
}

#[test]
fn a_second_launcher_on_the_same_runtime_directory_exits_at_once_and_touches_nothing() {
    let [http, https, other_http, other_https] = free_ports::<4>();
    let mut first = demo(Mode::Pid1, None, http, https);
    let runtime = first.runtime_dir();
    first.wait_for_status("the demo to be ready", |s| s["ready"] == true);
    let before = fingerprint(&runtime);

    let mut second = demo(Mode::Plain, Some(&runtime), other_http, other_https);
    let code = second.exit_code(Duration::from_secs(10));
    let log = second.log();
    assert_eq!(code, 1, "{log}");
    // As PID 1 of its namespace, the first launcher knows itself as pid 1.
    let expected = format!("runtime directory {} is in use by sesame (pid 1)", runtime.display());
    assert!(log.contains(&expected), "the second launcher names the holder:\n{log}");
    assert!(!log.contains("started"), "the second launcher started nothing:\n{log}");

    assert_eq!(fingerprint(&runtime), before, "the first launcher's files are untouched");
    assert_eq!(first.status()["ready"], true, "the first launcher still answers");
    assert_eq!(admin_get(&runtime.join("envoy-admin.sock"), "/ready"), Some(200), "its Envoy still answers");
    assert_eq!(first.status()["current_epoch"], 0, "and was not hot-restarted");
    assert!(common::request(other_http, "/").is_err(), "nothing serves the second launcher's ports");

    // Once the first is gone, the directory is free again.
    first.signal(Signal::SIGTERM);
    assert_eq!(first.exit_code(Duration::from_secs(30)), 0, "{}", first.log());
    let mut third = demo(Mode::Plain, Some(&runtime), other_http, other_https);
    wait_for(Duration::from_secs(30), "the next launcher to be ready", || {
        common::control(&runtime.join("control.sock"), "GET", "/ready").is_ok_and(|(status, _)| status == 200)
    });
    third.signal(Signal::SIGTERM);
    assert_eq!(third.exit_code(Duration::from_secs(30)), 0, "{}", third.log());
}

#[test]
fn a_deleted_runtime_directory_is_created_again_and_hot_restarts_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = common::Upstream::start(Duration::ZERO);
    let port = common::free_port();
    // Envoy's admin outside the runtime directory, as in most real bootstraps.
    let bootstrap = common::proxy_bootstrap(dir.path(), port, upstream.port);
    let options = ["--envoy-drain-time", "1s", "--envoy-parent-shutdown-time", "1s"];
    let launcher = Launcher::start_envoy(Mode::Pid1, &options, &bootstrap);
    let runtime = launcher.runtime_dir();
    launcher.wait_for_status("ready", |s| s["ready"] == true);

    std::fs::remove_dir_all(&runtime).expect("rm -rf the runtime directory");
    // The socket that answers is a new one (the old one went with the directory); the lock is
    // taken again before it is bound.
    launcher.wait_for_status("the control socket to answer again", |s| s["ready"] == true);
    assert!(runtime.join("sesame.lock").exists(), "the lock is taken again");

    // The base id was kept: the next hot restart goes through, though its file is gone.
    launcher.signal(Signal::SIGHUP);
    let status = launcher.wait_for_status("epoch 1 to serve", |s| s["current_epoch"] == 1 && s["ready"] == true);
    assert!(status["degraded"].is_null(), "{status:#}");
    assert_eq!(launcher.reloads("success"), 1, "{}", launcher.log());

    // And the directory is still one launcher's.
    let envoy = envoy_bin().to_string_lossy().into_owned();
    let runtime_arg = runtime.to_string_lossy().into_owned();
    let mut second = Launcher::start_program(
        Mode::Plain,
        Path::new(SESAME),
        &["run", "--runtime-dir", &runtime_arg, "--envoy-bin", &envoy],
    );
    assert_eq!(second.exit_code(Duration::from_secs(10)), 1, "{}", second.log());
    assert!(second.log().contains("is in use by sesame"), "{}", second.log());
}
