//! The Kubernetes example's pod, run by podman with the settings the example asks for (read off
//! the manifest: user, read-only root, no capabilities, no privilege escalation, command, env,
//! volumes), and stopped as the kubelet stops it: the preStop hook, then SIGTERM with the grace
//! period. podman's `kube play` is not used: Debian's podman 4.3 takes neither the secret volumes
//! nor the memory emptyDir of the manifest.

use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::common::load::{Load, ONE_LOAD_AT_A_TIME};
use super::common::tls::{SecretVolume, certificate};
use super::common::{control_tcp, free_ports};
use super::podman::Container;
use super::site::served;

fn manifest() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/kubernetes/envoy-sesame.yaml");
    let text = std::fs::read_to_string(&path).expect("the Kubernetes example");
    text.split("\n---\n").map(|doc| serde_saphyr::from_str(doc).expect("YAML document")).collect()
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().expect("a list").iter().map(|v| v.as_str().expect("a string").to_string()).collect()
}

/// podman's options for the pod's security settings, as the manifest gives them.
fn security_options(pod: &Value, container: &Value) -> Vec<String> {
    let (pod_security, security) = (&pod["securityContext"], &container["securityContext"]);
    assert_eq!(pod_security["runAsNonRoot"], true, "the example asks for a non-root pod");
    let id = |v: &Value| v.as_u64().expect("a numeric id").to_string();
    let mut options = vec![
        "--user".to_string(),
        format!("{}:{}", id(&pod_security["runAsUser"]), id(&pod_security["runAsGroup"])),
        "--group-add".to_string(),
        id(&pod_security["fsGroup"]),
    ];
    if security["readOnlyRootFilesystem"] == true {
        options.push("--read-only".into());
    }
    if security["allowPrivilegeEscalation"] == false {
        options.extend(["--security-opt".into(), "no-new-privileges".into()]);
    }
    for cap in strings(&security["capabilities"]["drop"]) {
        options.extend(["--cap-drop".into(), cap]);
    }
    options
}

/// The example's pod under load: a rotated Secret is served, then the preStop hook drains it with
/// every request answered, and the kubelet's SIGTERM finds it stopping; exit status 0.
#[test]
fn the_kubernetes_example_with_its_restricted_settings() {
    let docs = manifest();
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").expect("Deployment");
    let config = docs.iter().find(|d| d["kind"] == "ConfigMap").expect("ConfigMap");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];

    // On the host's network, the manifest's ports are moved to free ones.
    let [https, control] = free_ports::<2>();
    let volumes = tempfile::tempdir().expect("tempdir");
    let root = volumes.path();
    let bootstrap = config["data"]["envoy.yaml"]
        .as_str()
        .expect("envoy.yaml")
        .replace("port_value: 8443", &format!("port_value: {https}"));
    std::fs::write(root.join("envoy.yaml"), bootstrap).expect("config");
    let (cert, key) = certificate(1);
    let mut secret = SecretVolume::new(&root.join("tls"), &cert, &key);
    std::fs::create_dir(root.join("token")).expect("mkdir token");
    std::fs::write(root.join("token/token"), "s3cret").expect("token");
    let mut options = vec!["--network".to_string(), "host".to_string()];
    options.extend(security_options(pod, container));
    let entrypoint = serde_json::to_string(&container["command"]).expect("command");
    options.extend(["--entrypoint".into(), entrypoint]);
    for env in container["env"].as_array().expect("env") {
        let (name, value) = (env["name"].as_str().expect("name"), env["value"].as_str().expect("value"));
        let value = if name == "SESAME_HTTP" { format!("127.0.0.1:{control}") } else { value.to_string() };
        options.extend(["-e".into(), format!("{name}={value}")]);
    }
    // The volumes: config (subPath), the Secret and the token read-only, the emptyDir (root's,
    // 0777, as the kubelet makes it).
    let mount = |from: &Path, to: &str| ["-v".to_string(), format!("{}:{to}:ro", from.display())];
    options.extend(mount(&root.join("envoy.yaml"), "/etc/envoy/envoy.yaml"));
    options.extend(mount(&root.join("tls"), "/etc/envoy/tls"));
    options.extend(mount(&root.join("token"), "/etc/sesame/token"));
    let run = container["volumeMounts"].as_array().expect("volumeMounts").iter().find(|m| m["name"] == "run");
    let run = run.and_then(|m| m["mountPath"].as_str()).expect("the emptyDir's mount");
    // A directory of the host's, not podman's --tmpfs: podman makes a /run of its own 0755.
    let empty_dir = root.join("run");
    std::fs::create_dir(&empty_dir).expect("mkdir emptyDir");
    std::fs::set_permissions(&empty_dir, std::fs::Permissions::from_mode(0o777)).expect("chmod emptyDir");
    options.extend(["-v".into(), format!("{}:{run}", empty_dir.display())]);
    let args = strings(&container["args"]);
    let pod = Container::run(
        &options.iter().map(String::as_str).collect::<Vec<_>>(),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );

    let probe = |path: &str| control_tcp(control, "GET", path, &[]).map(|(status, _)| status);
    pod.wait(60, "the readiness probe", || probe("/ready") == Ok(200));
    assert_eq!(probe("/healthz"), Ok(200), "the liveness probe");
    assert_eq!(served(https), Some(1), "{}", pod.logs());

    let _one = ONE_LOAD_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let load = Load::start(https, 4, 4);
    load.wait_running();
    let (cert, key) = certificate(2);
    secret.swap(&cert, &key);
    pod.wait(30, "the rotated Secret to be served", || served(https) == Some(2));

    // The kubelet runs the preStop hook, then sends SIGTERM once it returns. Until the drain delay
    // has passed, clients still come (the endpoints controller is slow): they are answered.
    let hook = strings(&container["lifecycle"]["preStop"]["exec"]["command"]);
    let name = pod.name.clone();
    let pre_stop = std::thread::spawn(move || {
        let mut all = vec!["exec".to_string(), name];
        all.extend(hook);
        std::process::Command::new("timeout").arg("120").arg("podman").args(&all).output().expect("podman exec")
    });
    pod.wait(30, "readiness to fail once the drain has begun", || probe("/ready") != Ok(200));
    let outcome = load.stop();
    let hook = pre_stop.join().expect("preStop");
    assert!(
        hook.status.success(),
        "preStop: {}{}\n{}",
        String::from_utf8_lossy(&hook.stdout),
        String::from_utf8_lossy(&hook.stderr),
        pod.logs()
    );
    outcome.assert_none_failed(40, &pod.logs());
    let grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64().expect("grace");
    assert_eq!(pod.stop(grace as u32), 0, "{}", pod.logs());
}
