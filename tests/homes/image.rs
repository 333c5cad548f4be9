//! The Dockerfile's image, run the ways the official Envoy image is run.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::common::load::{Load, ONE_LOAD_AT_A_TIME};
use super::common::tls::{certificate, replace_file};
use super::podman::Container;
use super::site::{InFlight, Ports, bootstrap, ports, served, upstream};

/// A bootstrap and its certificate on the host, for a container on the host's network to mount:
/// the bootstrap at /x.yaml, the certificate directory at /etc/envoy/tls.
struct Mounted {
    dir: tempfile::TempDir,
    ports: Ports,
}

impl Mounted {
    fn new(admin_dir: &str, upstream: u16) -> Mounted {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let mounted = Mounted { dir, ports: ports() };
        std::fs::create_dir(mounted.tls()).expect("mkdir tls");
        mounted.write_pair(1);
        let yaml = bootstrap(admin_dir, &mounted.ports, upstream, "/etc/envoy/tls/cert.pem", "/etc/envoy/tls/key.pem");
        std::fs::write(mounted.dir.path().join("x.yaml"), yaml).expect("bootstrap");
        mounted
    }

    fn tls(&self) -> std::path::PathBuf {
        self.dir.path().join("tls")
    }

    /// A new pair by rename, key first; readable by the container's user whoever it is.
    fn write_pair(&self, serial: u64) {
        let (cert, key) = certificate(serial);
        replace_file(&self.tls().join("key.pem"), &key);
        replace_file(&self.tls().join("cert.pem"), &cert);
    }

    fn volumes(&self) -> Vec<String> {
        let at = |from: &Path, to: &str| format!("{}:{to}:ro", from.display());
        vec![
            "-v".into(),
            at(&self.dir.path().join("x.yaml"), "/x.yaml"),
            "-v".into(),
            at(&self.tls(), "/etc/envoy/tls"),
        ]
    }
}

/// The image's own config looks up www.envoyproxy.io, and there is no DNS here: a resolver that
/// answers at once (refused), as a working one would, keeps Envoy's start from waiting on it.
const NO_DNS: [&str; 2] = ["--dns", "127.0.0.1"];

fn strs(owned: &[String]) -> Vec<&str> {
    owned.iter().map(String::as_str).collect()
}

/// `docker run IMAGE`: sesame is PID 1, Envoy runs as envoy on the image's own config, healthy
/// once LIVE; SIGHUP is a hot restart; `stop` drains and returns Envoy's exit status.
#[test]
fn the_image_runs_as_the_official_one_does() {
    let container = Container::run(&NO_DNS, &[]);
    let (uid, gid, cmdline) = container.envoy();
    assert_eq!(container.pid1(), "sesame", "PID 1 of the container");
    assert_eq!((uid.as_str(), gid.as_str()), ("101", "101"), "Envoy as the user envoy: {cmdline}");
    assert!(cmdline.starts_with("envoy -c /etc/envoy/envoy.yaml "), "{cmdline}");
    assert!(container.healthy(), "the health check once LIVE:\n{}", container.logs());

    container.kill("HUP");
    container.wait_live(1);
    assert!(container.healthy(), "healthy after the hot restart");
    // A cold handover, sesame root without CAP_SYS_PTRACE and Envoy another user: sesame cannot
    // read that Envoy's open files, and must still know its listening sockets for its own.
    let cold = container.exec(&["sesame", "reload", "--cold"]);
    assert!(
        cold.status.success(),
        "sesame reload --cold: {}\n{}",
        String::from_utf8_lossy(&cold.stderr),
        container.logs()
    );
    assert!(container.healthy(), "healthy after the cold handover");
    assert_eq!(container.stop(30), 0, "Envoy's exit status:\n{}", container.logs());
    let logs = container.logs();
    assert!(logs.contains("SIGTERM: draining Envoy"), "the drain in the log:\n{logs}");
}

/// The official image's ways of giving Envoy its flags and user, each in its own container.
#[test]
fn flags_users_cpus_and_loglevel_reach_envoy() {
    let mounted = Mounted::new("/run/sesame/envoy", upstream().port);
    let volumes = mounted.volumes();
    let with_config: Vec<&str> = strs(&volumes);
    // All at once: each takes a second or two to be LIVE.
    let cases: Vec<(&str, Container)> = vec![
        ("flags", Container::run(&with_config, &["-c", "/x.yaml", "--component-log-level", "upstream:debug"])),
        ("uid 0", Container::run(&[&NO_DNS[..], &["-e", "ENVOY_UID=0"]].concat(), &[])),
        (
            "uid and gid",
            Container::run(&[&NO_DNS[..], &["-e", "ENVOY_UID=1234", "-e", "ENVOY_GID=4321"]].concat(), &[]),
        ),
        ("uid alone", Container::run(&[&NO_DNS[..], &["-e", "ENVOY_UID=1234"]].concat(), &[])),
        ("loglevel", Container::run(&[&NO_DNS[..], &["-e", "loglevel=debug"]].concat(), &[])),
        ("cpus", Container::run(&[&NO_DNS[..], &["--cpus", "1"]].concat(), &[])),
    ];
    for (case, container) in &cases {
        let (uid, gid, cmdline) = container.envoy();
        let ids = (uid.as_str(), gid.as_str());
        match *case {
            "flags" => {
                // sesame runs Envoy on its rewrite of /x.yaml, with the flags given.
                assert!(cmdline.starts_with("envoy --component-log-level upstream:debug -c /run/sesame/"), "{cmdline}");
                let sesame = container.exec(&["cat", "/proc/1/cmdline"]).stdout;
                let sesame = String::from_utf8_lossy(&sesame).replace('\0', " ");
                assert!(sesame.contains("run -- envoy -c /x.yaml --component-log-level upstream:debug"), "{sesame}");
                assert_eq!(ids, ("101", "101"));
            }
            "uid 0" => assert_eq!(ids, ("0", "0"), "ENVOY_UID=0 keeps root"),
            "uid and gid" => assert_eq!(ids, ("1234", "4321")),
            "uid alone" => assert_eq!(ids, ("1234", "101"), "the new uid in the envoy group"),
            "loglevel" => assert!(cmdline.contains(" --log-level debug"), "{cmdline}"),
            "cpus" => assert!(cmdline.contains(" --concurrency 1"), "--cpus 1 is one worker: {cmdline}"),
            _ => unreachable!(),
        }
        if *case != "cpus" {
            assert!(!cmdline.contains("--concurrency"), "{case}: no CPU limit, no --concurrency: {cmdline}");
        }
    }
}

/// On the host's network with the bootstrap and the certificates bind-mounted: a certificate
/// rotated on the host is served without a failed request, in both `--cert-reload` modes, and
/// `podman stop` answers every request in flight and exits 0.
#[test]
fn a_bind_mounted_certificate_rotates_and_stop_answers_every_request() {
    for mode in ["hot-restart", "in-place"] {
        let upstream = upstream();
        let mounted = Mounted::new("/run/sesame/envoy", upstream.port);
        let volumes = mounted.volumes();
        let mut options = strs(&volumes);
        let env = format!("SESAME_CERT_RELOAD={mode}");
        options.extend(["--network", "host", "-e", &env]);
        let container = Container::run(&options, &["-c", "/x.yaml"]);
        container.wait_live(0);
        assert_eq!(served(mounted.ports.https), Some(1));

        let _one = ONE_LOAD_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let load = Load::start(mounted.ports.https, 4, 4);
        load.wait_running();
        mounted.write_pair(2);
        container.wait(30, "the rotated certificate to be served", || served(mounted.ports.https) == Some(2));
        load.stop().assert_none_failed(40, &container.logs());
        let epoch = container.status().expect("status")["current_epoch"].as_u64();
        assert_eq!(epoch, Some(if mode == "in-place" { 0 } else { 1 }), "{mode}:\n{}", container.logs());

        let in_flight = InFlight::start(&upstream, mounted.ports.http, 20);
        assert_eq!(container.stop(30), 0, "{mode}:\n{}", container.logs());
        in_flight.assert_all_answered(&container.logs());
    }
}

/// Locked down: a read-only root, no capabilities, a non-root user and a 1 MiB /dev/shm still give
/// a LIVE Envoy, a hot restart, a healthy check and a drained stop.
#[test]
fn a_locked_down_container_serves_hot_restarts_and_drains() {
    let upstream = upstream();
    // sesame runs as 101 and gives Envoy its own user: the admin goes where both may write.
    let mounted = Mounted::new("/tmp", upstream.port);
    let volumes = mounted.volumes();
    let mut options = strs(&volumes);
    options.extend(["--network", "host", "--read-only", "--cap-drop", "ALL", "--user", "101:101", "--shm-size", "1m"]);
    let container = Container::run(&options, &["-c", "/x.yaml"]);
    let (uid, _, _) = container.envoy();
    assert_eq!(uid, "101");
    assert_eq!(served(mounted.ports.https), Some(1), "{}", container.logs());
    assert!(container.healthy(), "{}", container.logs());
    container.kill("HUP");
    container.wait_live(1);
    let in_flight = InFlight::start(&upstream, mounted.ports.http, 20);
    assert_eq!(container.stop(30), 0, "{}", container.logs());
    in_flight.assert_all_answered(&container.logs());
}
