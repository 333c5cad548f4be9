//! What a `/reload` caller is told when the reload did not happen through no fault of the input,
//! with the real Envoy: a validator still running at `--reload-timeout` and a draining epoch that
//! outlives its parent shutdown time are timeouts (504), never "your input is invalid" (422); and
//! the serving epoch serves on.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Launcher, Mode, admin_get, control, envoy_bin, proxy_bootstrap};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// An `envoy` that is the real one, except that `--mode validate` hangs: in its own process
/// (`exec`), or in a child it waits for.
fn envoy_whose_validator_hangs(dir: &Path, hang: &str) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let wrapper = bin.join("envoy");
    let script = format!(
        "#!/bin/sh\nfor arg in \"$@\"; do [ \"$arg\" = validate ] && {hang}; done\nexec {} \"$@\"\n",
        envoy_bin().display()
    );
    std::fs::write(&wrapper, script).expect("wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    wrapper
}

fn reload(launcher: &Launcher) -> (u16, String) {
    control(&launcher.runtime_dir().join("control.sock"), "POST", "/reload").expect("POST /reload")
}

#[test]
fn a_validator_past_the_reload_timeout_is_a_timeout_for_the_caller() {
    validator_past_the_reload_timeout("exec sleep 600");
}

#[test]
fn a_validator_killed_at_the_reload_timeout_leaves_no_process_behind() {
    // A wrapper that does not exec: the validator's own child must go with it.
    let launcher = validator_past_the_reload_timeout("{ sleep 600; exit 0; }");
    let sesame = launcher.pid();
    common::wait_for(Duration::from_secs(10), "the validator's child to be gone", || {
        common::children_of(sesame).iter().all(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            !String::from_utf8_lossy(&cmdline).starts_with("sleep")
        })
    });
}

fn validator_past_the_reload_timeout(hang: &str) -> Launcher {
    let dir = tempfile::tempdir().expect("tempdir");
    let [port] = common::free_ports();
    let bootstrap = proxy_bootstrap(dir.path(), port, common::free_port());
    let envoy = envoy_whose_validator_hangs(dir.path(), hang);
    let (envoy, bootstrap) = (envoy.to_string_lossy().into_owned(), bootstrap.to_string_lossy().into_owned());
    let launcher =
        Launcher::start(Mode::Plain, &["--reload-timeout", "1s", "--no-auto-watch"], &[&envoy, "-c", &bootstrap]);
    launcher.wait_for_status("epoch 0 to be LIVE", |s| s["ready"] == true);

    let (status, body) = reload(&launcher);
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("envoy --mode validate still running after 1s: killed"), "{body}");
    let status = launcher.status();
    assert_eq!((status["current_epoch"].as_u64(), status["ready"].as_bool()), (Some(0), Some(true)), "{status:#}");
    assert_eq!(status["last_reload"]["result"], "refused", "{status:#}");
    assert_eq!(admin_get(&dir.path().join("admin.sock"), "/ready"), Some(200), "epoch 0 serves on");
    launcher
}

#[test]
fn a_draining_epoch_past_its_time_is_a_timeout_for_the_caller() {
    let dir = tempfile::tempdir().expect("tempdir");
    let [port] = common::free_ports();
    let bootstrap = proxy_bootstrap(dir.path(), port, common::free_port());
    let options = ["--envoy-parent-shutdown-time", "3s", "--kill-timeout", "1s", "--no-auto-watch"];
    let launcher = Launcher::start_envoy(Mode::Plain, &options, &bootstrap);
    assert_eq!(reload(&launcher).0, 200, "the first hot restart");
    let draining = launcher.wait_for_status("epoch 0 draining", |s| s["epochs"][0]["state"] == "draining");
    let draining = Pid::from_raw(draining["epochs"][0]["pid"].as_i64().expect("pid") as i32);
    // Stopped, it cannot exit when epoch 1 tells it to: the next reload waits for it in vain.
    kill(draining, Signal::SIGSTOP).expect("SIGSTOP");
    let (status, body) = reload(&launcher);
    kill(draining, Signal::SIGCONT).expect("SIGCONT");
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("outlived its parent shutdown time"), "{body}");
    let status = launcher.status();
    assert_eq!((status["current_epoch"].as_u64(), status["ready"].as_bool()), (Some(1), Some(true)), "{status:#}");
    launcher.wait_for_status("epoch 0 to exit once resumed", |s| s["epochs"].as_array().is_some_and(|e| e.len() == 1));
}
