//! A Debian root booted with systemd under `systemd-nspawn`: its own PID 1, /run, /dev/shm and
//! journal, the host's network (so the tests reach Envoy on 127.0.0.1), and an ephemeral copy of
//! the cached root (`-x`: nothing a test does outlives it). sesame and Envoy are bind-mounted
//! read-only at /usr/local/bin.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::common::wait_for;

pub struct Machine {
    nspawn: Child,
    leader: i32,
    pub name: String,
    log: PathBuf,
}

/// The roots and the stand-in image that `make homes` made (tests/homes/setup.sh).
pub fn homes() -> PathBuf {
    let dir = std::env::var_os("SESAME_HOMES")
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("SESAME_HOMES is not set: run these tests with `make test-homes`"));
    assert!(dir.is_dir(), "SESAME_HOMES={} is missing: run `make homes`", dir.display());
    dir
}

/// The sesame under test without its debug sections (a fifth of its size), made once per run.
pub fn sesame_stripped() -> PathBuf {
    static STRIPPED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    STRIPPED
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("sesame-homes-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("mkdir for the stripped sesame");
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            let stripped = dir.join("sesame");
            let out = Command::new("objcopy")
                .arg("--strip-debug")
                .arg(super::common::SESAME)
                .arg(&stripped)
                .output()
                .expect("objcopy");
            assert!(out.status.success(), "objcopy --strip-debug: {}", String::from_utf8_lossy(&out.stderr));
            stripped
        })
        .clone()
}

impl Machine {
    /// Boots `suite` (a root under SESAME_HOMES) and waits until systemd has finished starting up.
    pub fn boot(suite: &str) -> Machine {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let name = format!("sesame-{suite}-{}-{}", std::process::id(), COUNT.fetch_add(1, Ordering::SeqCst));
        let log = std::env::temp_dir().join(format!("{name}.console.log"));
        let console = std::fs::File::create(&log).expect("console log");
        let envoy = std::fs::canonicalize(super::common::envoy_bin()).expect("ENVOY_BIN");
        let nspawn = Command::new("systemd-nspawn")
            .arg("--quiet")
            .arg("-D")
            .arg(homes().join(suite))
            .args(["-x", "--keep-unit", "--register=no", "--boot", "--console=pipe", "-M", &name])
            .arg(format!("--bind-ro={}:/usr/local/bin/sesame", sesame_stripped().display()))
            .arg(format!("--bind-ro={}:/usr/local/bin/envoy", envoy.display()))
            // This host mixes cgroup hierarchies; systemd in the machine wants the unified one.
            .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .stdin(Stdio::null())
            .stdout(console.try_clone().expect("console"))
            .stderr(console)
            .spawn()
            .expect("systemd-nspawn (installed by `make homes`)");
        let nspawn_pid = nspawn.id() as i32;
        let mut machine = Machine { nspawn, leader: 0, name, log };
        // nspawn's own child runs first, then execs the machine's systemd.
        let is_systemd =
            |pid: &i32| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "systemd");
        wait_for(Duration::from_secs(30), "the machine's systemd", || {
            machine.leader = super::common::children_of(nspawn_pid).into_iter().find(is_systemd).unwrap_or(0);
            machine.leader != 0 || machine.nspawn.try_wait().ok().flatten().is_some()
        });
        assert!(machine.leader != 0, "systemd-nspawn exited:\n{}", machine.console());
        // Until its manager listens, systemctl cannot ask it; then --wait blocks until booted.
        let mut state = String::new();
        wait_for(Duration::from_secs(60), "the machine to boot", || {
            let out = machine.run(&["systemctl", "is-system-running", "--wait"]);
            state = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            let state = state.trim();
            state == "running" || state == "degraded" || machine.nspawn.try_wait().ok().flatten().is_some()
        });
        assert!(
            matches!(state.trim(), "running" | "degraded"),
            "the machine did not finish booting ({state}):\n{}",
            machine.console()
        );
        machine.ok(&["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "envoy"]);
        machine
    }

    /// A command in the machine (all its namespaces), bounded at two minutes.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .args(["120", "nsenter", "-t", &self.leader.to_string(), "-a", "--"])
            .args(args)
            .output()
            .expect("nsenter")
    }

    /// `run`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} in {} failed ({}): {}{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The host's path to `path` in the machine.
    pub fn path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.leader)).join(path.trim_start_matches('/'))
    }

    /// Writes `contents` at `path` in the machine by rename, making its directories.
    pub fn write(&self, path: &str, contents: &str) {
        let target = self.path(path);
        std::fs::create_dir_all(target.parent().expect("a parent")).expect("mkdir in the machine");
        let partial = target.with_extension("partial-write");
        std::fs::write(&partial, contents).expect("write in the machine");
        std::fs::rename(&partial, &target).expect("rename in the machine");
    }

    /// Gives `path` to the machine's user envoy, readable by it alone.
    pub fn give_to_envoy(&self, path: &str) {
        self.ok(&["chown", "envoy:envoy", path]);
        self.ok(&["chmod", "0600", path]);
    }

    /// A property of a unit, as `systemctl show` gives it.
    pub fn show(&self, unit: &str, property: &str) -> String {
        self.ok(&["systemctl", "show", "--value", "-p", property, unit]).trim().to_string()
    }

    /// The unit's journal, for assertions and failure messages.
    pub fn journal(&self, unit: &str) -> String {
        self.ok(&["journalctl", "--no-pager", "-o", "cat", "-u", unit])
    }

    /// `sesame status --json` for the runtime directory `dir`, parsed.
    pub fn status(&self, dir: &str) -> serde_json::Value {
        let out = self.run(&["sesame", "status", "--json", "--runtime-dir", dir]);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("sesame status in {}: {e}: {}", self.name, String::from_utf8_lossy(&out.stderr)))
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Machine {
    /// SIGTERM asks nspawn to shut the machine down; a machine that does not is killed.
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.nspawn.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..300 {
            if self.nspawn.try_wait().ok().flatten().is_some() {
                let _ = std::fs::remove_file(&self.log);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// The example unit file `name` of examples/systemd.
pub fn example_unit(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/systemd").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
