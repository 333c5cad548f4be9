//! The example units under a booted systemd: Debian trixie's 257 and bookworm's 252.

use std::time::{Duration, Instant};

use super::common::Upstream;
use super::common::load::{Load, ONE_LOAD_AT_A_TIME};
use super::common::tls::{certificate, certificate_valid};
use super::machine::{Machine, example_unit};
use super::site::{InFlight, Ports, bootstrap, ports, served, upstream};

/// An Envoy for a unit: the bootstrap at /etc/envoy/NAME.yaml, its certificate under
/// /etc/envoy/tls/NAME, the admin in the unit's runtime directory.
struct Site {
    ports: Ports,
    upstream: Upstream,
    name: String,
    runtime_dir: String,
}

impl Site {
    fn install(machine: &Machine, name: &str, runtime_dir: &str) -> Site {
        let site =
            Site { ports: ports(), upstream: upstream(), name: name.to_string(), runtime_dir: runtime_dir.to_string() };
        let (cert, key) = site.files();
        site.write_pair(machine, &certificate(1));
        machine.write(
            &format!("/etc/envoy/{name}.yaml"),
            &bootstrap(runtime_dir, &site.ports, site.upstream.port, &cert, &key),
        );
        site
    }

    fn files(&self) -> (String, String) {
        (format!("/etc/envoy/tls/{}/cert.pem", self.name), format!("/etc/envoy/tls/{}/key.pem", self.name))
    }

    /// Writes a pair the way careful tools do: key, then certificate, each by rename.
    fn write_pair(&self, machine: &Machine, (cert_pem, key_pem): &(String, String)) {
        let (cert, key) = self.files();
        machine.write(&key, key_pem);
        machine.give_to_envoy(&key);
        machine.write(&cert, cert_pem);
    }

    fn served(&self) -> Option<u64> {
        served(self.ports.https)
    }

    fn epoch(&self, machine: &Machine) -> (u64, String) {
        let status = machine.status(&self.runtime_dir);
        let current = status["current_epoch"].as_u64().expect("current_epoch");
        let state = status["epochs"]
            .as_array()
            .and_then(|epochs| epochs.iter().find(|e| e["epoch"].as_u64() == Some(current)))
            .and_then(|e| e["state"].as_str())
            .unwrap_or("none")
            .to_string();
        (current, state)
    }
}

/// Waits for `condition`, failing with the unit's journal after `seconds`.
fn await_unit(machine: &Machine, unit: &str, seconds: u64, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {seconds} s waiting for {what}:\n{}",
            machine.journal(unit)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Installs the unit as it is, and a drop-in that shortens Envoy's drain times: a hot restart waits
/// until the previous one's old epoch has exited (45 s by default), and the tests make several.
fn install_unit(machine: &Machine, file: &str, unit: &str) {
    machine.write(&format!("/etc/systemd/system/{file}"), unit);
    machine.write(
        &format!("/etc/systemd/system/{file}.d/drain-times.conf"),
        "[Service]\nEnvironment=SESAME_ENVOY_DRAIN_TIME=1s SESAME_ENVOY_PARENT_SHUTDOWN_TIME=2s\n",
    );
    machine.ok(&["systemctl", "daemon-reload"]);
}

/// `systemctl reload UNIT`: its exit status, output and how long it took.
fn reload(machine: &Machine, unit: &str) -> (bool, String, Duration) {
    let started = Instant::now();
    let out = machine.run(&["systemctl", "reload", unit]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text, started.elapsed())
}

/// The example unit as it is, under systemd 257: READY once LIVE, a reload under load that returns
/// once the new epoch is LIVE and fails when refused, a cold handover and a drain under the unit's
/// hardening, and a stop that answers every request in flight.
#[test]
fn the_example_unit_on_systemd_257() {
    let machine = Machine::boot("trixie");
    let site = Site::install(&machine, "envoy", "/run/sesame");
    install_unit(&machine, "sesame-envoy.service", &example_unit("sesame-envoy.service"));
    let unit = "sesame-envoy.service";

    machine.ok(&["systemctl", "start", unit]);
    // Start returns on READY=1: Envoy serves at that moment, not some time after.
    assert_eq!(site.served(), Some(1), "served when `systemctl start` returned:\n{}", machine.journal(unit));
    assert_eq!(site.epoch(&machine), (0, "live".into()));
    assert_eq!(machine.show(unit, "User"), "envoy");

    let _one = ONE_LOAD_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let load = Load::start(site.ports.https, 4, 4);
    load.wait_running();

    let (ok, out, took) = reload(&machine, unit);
    assert!(ok, "systemctl reload: {out}\n{}", machine.journal(unit));
    assert_eq!(site.epoch(&machine), (1, "live".into()), "the new epoch is LIVE when `systemctl reload` returns");
    println!("systemctl reload: {} ms", took.as_millis());

    // A bad certificate: sesame refuses the reload it starts by itself, and `systemctl reload`
    // fails with the reason; Envoy goes on serving the old one.
    site.write_pair(&machine, &certificate_valid(2, Some(1)));
    let (ok, out, _) = reload(&machine, unit);
    assert!(!ok, "systemctl reload succeeded with an expired certificate: {out}");
    let journal = machine.journal(unit);
    assert!(journal.contains("reload failed") && journal.contains("expired"), "the reason in the journal:\n{journal}");
    assert_eq!(site.served(), Some(1));
    assert_eq!(machine.show(unit, "ActiveState"), "active");

    // A good one is taken by itself, by a hot restart (the watcher, under ProtectSystem=strict).
    site.write_pair(&machine, &certificate(3));
    await_unit(&machine, unit, 30, "the new certificate to be served", || site.served() == Some(3));

    // A cold handover under the unit's hardening (a new Envoy family beside the serving one).
    let before = machine.status("/run/sesame");
    machine.ok(&["sesame", "reload", "--cold", "--runtime-dir", "/run/sesame"]);
    let after = machine.status("/run/sesame");
    let family = |s: &serde_json::Value| {
        let current = s["current_epoch"].as_u64();
        s["epochs"].as_array().and_then(|e| e.iter().find(|e| e["epoch"].as_u64() == current)?["family"].as_u64())
    };
    assert_ne!(family(&before), family(&after), "a new family after the cold handover: {after}");

    let outcome = load.stop();
    outcome.assert_none_failed(100, &machine.journal(unit));
    let in_flight = InFlight::start(&site.upstream, site.ports.http, 20);
    let started = Instant::now();
    machine.ok(&["systemctl", "stop", unit]);
    println!("systemctl stop with 20 requests in flight: {} ms", started.elapsed().as_millis());
    let journal = machine.journal(unit);
    in_flight.assert_all_answered(&journal);
    assert!(journal.contains("drain"), "the drain in the journal:\n{journal}");
    assert_eq!(machine.show(unit, "ExecMainStatus"), "0", "{journal}");
    assert_eq!(machine.show(unit, "Result"), "success", "{journal}");
}

/// The unit's recovery: an Envoy that stops answering (SIGSTOP) is caught by the watchdog, and a
/// SIGKILLed sesame is started again by Restart=on-failure; each time a new Envoy serves.
#[test]
fn the_watchdog_and_restart_on_failure_on_systemd_257() {
    let machine = Machine::boot("trixie");
    let site = Site::install(&machine, "envoy", "/run/sesame");
    install_unit(&machine, "sesame-envoy.service", &example_unit("sesame-envoy.service"));
    let unit = "sesame-envoy.service";
    // The unit's 30 s period, shortened so that the test waits seconds, not a minute.
    machine.write("/etc/systemd/system/sesame-envoy.service.d/watchdog.conf", "[Service]\nWatchdogSec=4s\n");
    machine.ok(&["systemctl", "daemon-reload"]);
    machine.ok(&["systemctl", "start", unit]);
    assert_eq!(site.served(), Some(1));

    let main_pid = machine.show(unit, "MainPID");
    let envoy = machine.status("/run/sesame")["epochs"][0]["pid"].as_i64().expect("Envoy's pid").to_string();
    machine.ok(&["sh", "-c", &format!("kill -STOP {envoy}")]);
    await_unit(&machine, unit, 60, "the watchdog to restart the unit", || {
        machine.show(unit, "NRestarts") == "1" && machine.show(unit, "ActiveState") == "active"
    });
    let journal = machine.journal(unit);
    assert!(journal.contains("Watchdog timeout"), "the watchdog in the journal:\n{journal}");
    assert_ne!(machine.show(unit, "MainPID"), main_pid);
    await_unit(&machine, unit, 30, "a new Envoy to serve", || site.served() == Some(1));

    let main_pid = machine.show(unit, "MainPID");
    machine.ok(&["sh", "-c", &format!("kill -KILL {main_pid}")]);
    await_unit(&machine, unit, 60, "Restart=on-failure to start sesame again", || {
        machine.show(unit, "NRestarts") == "2" && machine.show(unit, "ActiveState") == "active"
    });
    await_unit(&machine, unit, 30, "a new Envoy to serve", || site.served() == Some(1));
    assert_eq!(site.epoch(&machine), (0, "live".into()), "{}", machine.journal(unit));
    // Nothing of the killed launcher's family is left in the unit: one sesame and one Envoy.
    let tasks = machine.ok(&["systemctl", "show", "-p", "TasksCurrent", "--value", unit]);
    let pids = machine.ok(&["sh", "-c", "cat /sys/fs/cgroup/system.slice/sesame-envoy.service/cgroup.procs"]);
    assert_eq!(pids.lines().count(), 2, "the unit's processes ({tasks} tasks): {pids}");
}

/// The template unit with two instances started by one command: each its own runtime directory,
/// base id and reloads.
#[test]
fn the_template_unit_runs_two_instances_on_systemd_257() {
    let machine = Machine::boot("trixie");
    let edge = Site::install(&machine, "edge", "/run/sesame/edge");
    let internal = Site::install(&machine, "internal", "/run/sesame/internal");
    install_unit(&machine, "sesame-envoy@.service", &example_unit("sesame-envoy@.service"));
    machine.ok(&["systemctl", "start", "sesame-envoy@edge", "sesame-envoy@internal"]);
    assert_eq!((edge.served(), internal.served()), (Some(1), Some(1)));

    let (ok, out, _) = reload(&machine, "sesame-envoy@edge");
    assert!(ok, "{out}\n{}", machine.journal("sesame-envoy@edge"));
    assert_eq!(edge.epoch(&machine), (1, "live".into()));
    assert_eq!(internal.epoch(&machine), (0, "live".into()), "the other instance is left alone");

    machine.ok(&["systemctl", "stop", "sesame-envoy@edge", "sesame-envoy@internal"]);
    for name in ["edge", "internal"] {
        let unit = format!("sesame-envoy@{name}");
        assert_eq!(machine.show(&unit, "Result"), "success", "{}", machine.journal(&unit));
    }
}

/// The same unit as is under systemd 252 (Debian bookworm): start, a reload under load that
/// returns once the new epoch is LIVE, and a stop with requests in flight.
#[test]
fn the_example_unit_on_systemd_252() {
    let machine = Machine::boot("bookworm");
    let version = machine.ok(&["systemctl", "--version"]);
    assert!(version.starts_with("systemd 252"), "{version}");
    let site = Site::install(&machine, "envoy", "/run/sesame");
    install_unit(&machine, "sesame-envoy.service", &example_unit("sesame-envoy.service"));
    let unit = "sesame-envoy.service";
    machine.ok(&["systemctl", "start", unit]);
    assert_eq!(site.served(), Some(1), "{}", machine.journal(unit));

    let _one = ONE_LOAD_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let load = Load::start(site.ports.https, 4, 4);
    load.wait_running();
    let (ok, out, _) = reload(&machine, unit);
    assert!(ok, "{out}\n{}", machine.journal(unit));
    assert_eq!(site.epoch(&machine), (1, "live".into()));
    load.stop().assert_none_failed(100, &machine.journal(unit));
    let in_flight = InFlight::start(&site.upstream, site.ports.http, 20);
    machine.ok(&["systemctl", "stop", unit]);
    let journal = machine.journal(unit);
    in_flight.assert_all_answered(&journal);
    assert_eq!(machine.show(unit, "Result"), "success", "{journal}");
}
