//! The Dockerfile's image, built by podman from the sesame under test on the stand-in base, and its
//! containers. runc, not crun: crun refuses this host's mixed cgroup hierarchies; ulimits at or
//! below the host's, which podman would otherwise raise past them.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::machine::sesame_stripped;

pub const STANDIN: &str = "localhost/sesame-standin-envoy:v1.40.0";

fn podman(args: &[&str]) -> Output {
    Command::new("timeout").arg("180").arg("podman").args(args).output().expect("podman (installed by `make homes`)")
}

fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The image, built once per run the way a release pipeline builds it: the binary made outside,
/// given by `--build-arg SESAME_FROM=prebuilt`, in a context of its own.
pub fn image() -> &'static str {
    static IMAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| {
        let context = tempfile::tempdir().expect("tempdir");
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        for file in ["Dockerfile", "docker-entrypoint.sh"] {
            std::fs::copy(repo.join(file), context.path().join(file)).expect("copy into the context");
        }
        std::fs::copy(sesame_stripped(), context.path().join("sesame")).expect("copy sesame");
        let tag = format!("localhost/envoy-sesame:homes-{}", std::process::id());
        let context_arg = context.path().to_string_lossy().into_owned();
        podman_ok(&[
            "build",
            "--quiet",
            "--runtime",
            "runc",
            // HEALTHCHECK is an extension of Docker's format: OCI images drop it.
            "--format",
            "docker",
            "--build-arg",
            "SESAME_FROM=prebuilt",
            "--build-arg",
            "SESAME_BINARY=sesame",
            "--build-arg",
            &format!("ENVOY_IMAGE={STANDIN}"),
            "-t",
            &tag,
            &context_arg,
        ]);
        tag
    })
}

pub struct Container {
    pub name: String,
}

impl Container {
    /// `podman run -d` of the image with `options` before it and `args` after it.
    pub fn run(options: &[&str], args: &[&str]) -> Container {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let name = format!("sesame-homes-{}-{}", std::process::id(), COUNT.fetch_add(1, Ordering::SeqCst));
        let mut all = vec!["run", "-d", "--runtime", "runc", "--name", &name];
        all.extend(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]);
        all.extend(options);
        all.push(image());
        all.extend(args);
        podman_ok(&all);
        Container { name }
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["exec", &self.name];
        all.extend(args);
        podman(&all)
    }

    /// `sesame status --json` in the container, if it answers.
    pub fn status(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.exec(&["sesame", "status", "--json"]).stdout).ok()
    }

    /// Waits until the current epoch `epoch` is LIVE, failing with the container's log.
    pub fn wait_live(&self, epoch: u64) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.status()
                && status["current_epoch"].as_u64() == Some(epoch)
                && status["ready"] == true
            {
                return status;
            }
            assert!(Instant::now() < deadline, "epoch {epoch} never LIVE in {}:\n{}", self.name, self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The current epoch's Envoy: (uid, gid, command line) read off /proc in the container.
    pub fn envoy(&self) -> (String, String, String) {
        let status = self.wait_live(0);
        let pid = status["epochs"][0]["pid"].as_i64().expect("Envoy's pid");
        let proc_status =
            String::from_utf8_lossy(&self.exec(&["cat", &format!("/proc/{pid}/status")]).stdout).into_owned();
        let field = |name: &str| {
            proc_status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|ids| ids.split_whitespace().next())
                .unwrap_or_default()
                .to_string()
        };
        let cmdline = self.exec(&["cat", &format!("/proc/{pid}/cmdline")]).stdout;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        (field("Uid:"), field("Gid:"), cmdline.trim().to_string())
    }

    /// Waits for `condition`, failing with the container's log after `seconds`.
    pub fn wait(&self, seconds: u64, what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out after {seconds} s waiting for {what}:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid1(&self) -> String {
        String::from_utf8_lossy(&self.exec(&["cat", "/proc/1/comm"]).stdout).trim().to_string()
    }

    pub fn logs(&self) -> String {
        let out = podman(&["logs", &self.name]);
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    /// `podman kill -s SIGNAL`.
    pub fn kill(&self, signal: &str) {
        podman_ok(&["kill", "-s", signal, &self.name]);
    }

    /// `podman healthcheck run`: true when healthy.
    pub fn healthy(&self) -> bool {
        podman(&["healthcheck", "run", &self.name]).status.success()
    }

    /// `podman stop -t SECONDS` (SIGTERM, then SIGKILL after them); the container's exit code.
    pub fn stop(&self, seconds: u32) -> i64 {
        podman_ok(&["stop", "-t", &seconds.to_string(), &self.name]);
        self.exit_code()
    }

    pub fn exit_code(&self) -> i64 {
        podman_ok(&["inspect", "--format", "{{.State.ExitCode}}", &self.name]).parse().expect("an exit code")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.name]);
    }
}
