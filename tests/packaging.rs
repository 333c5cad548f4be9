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
    // Restricted: sesame and Envoy run as one unprivileged user, the admin socket in RUNTIME_DIR.
    assert_eq!(env("SESAME_ENVOY_USER"), None, "no user to switch to without root");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(container["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(text.contains("path: /run/sesame/envoy-admin.sock"), "the admin in RUNTIME_DIR");
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
    // A refused reload must fail `systemctl reload`, which only ExecReload= can say.
    assert_eq!(value("Type"), "notify");
    assert_eq!(value("ExecReload"), format!("/usr/local/bin/sesame reload --runtime-dir {runtime_dir}"));
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
fn dockerfile_runs_sesame_through_the_official_images_entrypoint_contract() {
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("COPY --chmod=755 docker-entrypoint.sh /usr/local/bin/sesame-entrypoint.sh"));
    assert!(dockerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/sesame-entrypoint.sh"]"#));
    assert!(read("docker-entrypoint.sh").trim_end().ends_with(r#"exec sesame run -- "$@""#), "sesame is PID 1");
    assert!(dockerfile.contains("STOPSIGNAL SIGTERM"));
    assert!(dockerfile.contains(r#"CMD ["/usr/local/bin/sesame", "status"]"#), "HEALTHCHECK with sesame status");
    assert!(dockerfile.contains("ARG ENVOY_IMAGE=envoyproxy/envoy:v1.40.0"), "the Envoy the tests run");
    assert!(dockerfile.contains("FROM ${ENVOY_IMAGE}"), "the base is the official image unless told otherwise");
}

/// What the image's entrypoint runs, with `sesame`, `id` and `chown` replaced by stubs that
/// record what they were given: (sesame's arguments, SESAME_ENVOY_USER, what chown was asked).
fn entrypoint(uid: u32, env: &[(&str, &str)], args: &[&str]) -> (String, String, String) {
    let bin = tempfile::tempdir().expect("tempdir");
    let stub = |name: &str, body: &str| {
        let path = bin.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("stub");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    };
    let record = bin.path().join("record");
    stub("sesame", &format!(r#"echo "$*|${{SESAME_ENVOY_USER:-}}" >> "{}""#, record.display()));
    stub("chown", &format!(r#"echo "chown $*" >> "{}""#, record.display()));
    stub("id", &format!("echo {uid}"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker-entrypoint.sh");
    let path = format!("{}:/usr/bin:/bin", bin.path().display());
    let status = Command::new(&script).args(args).env_clear().env("PATH", path).envs(env.iter().copied()).status();
    assert!(status.expect("run the entrypoint").success());
    let text = std::fs::read_to_string(&record).expect("record");
    let chown = text.lines().filter(|l| l.starts_with("chown ")).collect::<Vec<_>>().join(";");
    let ran = text.lines().find(|l| !l.starts_with("chown ")).expect("sesame ran");
    let (argv, user) = ran.rsplit_once('|').expect("separator");
    (argv.to_string(), user.to_string(), chown)
}

#[test]
fn the_image_runs_envoy_as_envoy_unless_envoy_uid_is_0() {
    let default = ["envoy", "-c", "/etc/envoy/envoy.yaml"];
    let run = "run -- envoy -c /etc/envoy/envoy.yaml";
    let chown = |user: &str| format!("chown {user} /dev/stdout /dev/stderr");
    assert_eq!(entrypoint(0, &[], &default), (run.into(), "envoy".into(), chown("envoy")));
    assert_eq!(entrypoint(0, &[("ENVOY_UID", "0")], &default), (run.into(), String::new(), String::new()));
    let uid = entrypoint(0, &[("ENVOY_UID", "1234")], &default);
    assert_eq!(uid, (run.into(), "1234:envoy".into(), chown("1234:envoy")));
    assert_eq!(entrypoint(0, &[("ENVOY_GID", "5000")], &default).1, "envoy:5000");
    assert_eq!(entrypoint(0, &[("ENVOY_UID", "1234"), ("ENVOY_GID", "5000")], &default).1, "1234:5000");
    // Started as another user already (`docker run --user`): nothing to drop.
    assert_eq!(entrypoint(1000, &[], &default), (run.into(), String::new(), String::new()));
    // An explicit SESAME_ENVOY_USER wins.
    assert_eq!(entrypoint(0, &[("SESAME_ENVOY_USER", "nobody")], &default).1, "nobody");
}

#[test]
fn the_image_takes_flags_for_envoy_and_loglevel() {
    let (argv, _, _) = entrypoint(0, &[("loglevel", "debug")], &["-c", "/x.yaml"]);
    assert_eq!(argv, "run -- envoy -c /x.yaml --log-level debug");
    // Any other command runs as the user too (as su-exec would), without --log-level.
    let (argv, user, _) = entrypoint(0, &[("loglevel", "debug")], &["sh", "-c", "true"]);
    assert_eq!((argv.as_str(), user.as_str()), ("run -- sh -c true", "envoy"));
}
