//! The packaging examples agree with the launcher: the Kubernetes manifest's probes, hook and grace
//! period, its Envoy bootstrap (validated by the real Envoy), the systemd unit's timeouts, and the
//! Dockerfile's entrypoint. (No image registry or systemd as PID 1 here: README says what was run.)

mod common;

use std::path::Path;
use std::process::Command;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).expect(path)
}

fn seconds(text: &str) -> u64 {
    humantime::parse_duration(text).expect("duration").as_secs()
}

#[test]
fn kubernetes_manifest_matches_the_control_api_and_its_bootstrap_is_valid() {
    let text = read("examples/kubernetes/envoy-sesame.yaml");
    let docs: Vec<serde_json::Value> =
        text.split("\n---\n").map(|doc| serde_saphyr::from_str(doc).expect("YAML document")).collect();
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").expect("Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["command"], serde_json::json!(["/usr/local/bin/sesame", "run", "--"]));
    assert_eq!(container["lifecycle"]["preStop"]["exec"]["command"][1], "shutdown");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
    // Prometheus scrapes Envoy's metrics through the control port, not Envoy's admin.
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/path"], "/envoy/stats/prometheus");
    let control = container["ports"].as_array().expect("ports").iter().find(|p| p["name"] == "control");
    assert_eq!(annotations["prometheus.io/port"].as_str(), control.map(|p| p["containerPort"].to_string()).as_deref());
    let env = |name: &str| {
        container["env"].as_array().expect("env").iter().find(|e| e["name"] == name).map(|e| e["value"].clone())
    };
    let budget: u64 = ["SESAME_DRAIN_DELAY", "SESAME_DRAIN_TIMEOUT", "SESAME_KILL_TIMEOUT"]
        .iter()
        .map(|name| seconds(env(name).expect(name).as_str().expect("string")))
        .sum();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().expect("grace period");
    assert!(grace > budget, "terminationGracePeriodSeconds {grace} must exceed the drain budget {budget}");

    // The ConfigMap's bootstrap, with its paths moved into a temporary directory, passes Envoy's
    // own validation.
    let config = docs.iter().find(|d| d["kind"] == "ConfigMap").expect("ConfigMap");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = common::tls::certificate(1);
    std::fs::write(dir.path().join("tls.crt"), cert).expect("cert");
    std::fs::write(dir.path().join("tls.key"), key).expect("key");
    let bootstrap = config["data"]["envoy.yaml"]
        .as_str()
        .expect("envoy.yaml")
        .replace("/etc/envoy/tls", &dir.path().to_string_lossy())
        .replace("/run/sesame", &dir.path().to_string_lossy());
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, bootstrap).expect("bootstrap");
    let output =
        Command::new(common::envoy_bin()).args(["--mode", "validate", "-c"]).arg(&path).output().expect("envoy");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn systemd_units_give_the_drain_its_time() {
    check_systemd_unit(&read("examples/systemd/sesame-envoy.service"), "/run/sesame", "sesame");
    // The template: a runtime directory per instance, since a launcher refuses a shared one.
    check_systemd_unit(&read("examples/systemd/sesame-envoy@.service"), "/run/sesame/%i", "sesame/%i");
}

fn check_systemd_unit(unit: &str, runtime_dir: &str, runtime_directory: &str) {
    let value = |key: &str| {
        unit.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).unwrap_or_else(|| panic!("{key}= in the unit"))
    };
    assert_eq!(value("Type"), "notify-reload");
    assert_eq!(value("KillMode"), "mixed");
    assert_eq!(value("NotifyAccess"), "main");
    let exec = value("ExecStart");
    assert!(exec.starts_with("/usr/local/bin/sesame run "), "{exec}");
    assert!(exec.contains(&format!(" --runtime-dir {runtime_dir} ")), "{exec}");
    assert_eq!(value("RuntimeDirectory"), runtime_directory);
    let flag = |name: &str| {
        let words: Vec<&str> = exec.split_whitespace().collect();
        let at = words.iter().position(|w| *w == name).unwrap_or_else(|| panic!("{name} in ExecStart"));
        seconds(words[at + 1])
    };
    let budget = flag("--drain-timeout") + flag("--kill-timeout");
    assert!(seconds(value("TimeoutStopSec")) > budget, "TimeoutStopSec must exceed {budget} s");
    assert!(seconds(value("WatchdogSec")) >= 2, "a watchdog period sesame can ping at half of");
}

#[test]
fn dockerfile_runs_sesame_as_the_entrypoint() {
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/sesame", "run", "--"]"#));
    assert!(dockerfile.contains("STOPSIGNAL SIGTERM"));
    assert!(dockerfile.contains(r#"CMD ["/usr/local/bin/sesame", "status"]"#), "HEALTHCHECK with sesame status");
    assert!(dockerfile.contains("FROM envoyproxy/envoy:v1.40.0"), "the Envoy the tests run");
}
