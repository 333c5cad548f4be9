//! Job control from an interactive shell, on a real pseudo-terminal: a plain command under sesame
//! gets the terminal only when sesame is in the foreground; Ctrl-Z stops the command and then
//! sesame, so that the shell gets its prompt back; `fg` continues both and gives the terminal back
//! to the command; a background `sesame run ... &` leaves the terminal to the shell.

mod common;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{SESAME, children_of, wait_for};

struct Shell {
    bash: Child,
    master: std::fs::File,
    output: Arc<Mutex<String>>,
    dir: tempfile::TempDir,
}

impl Shell {
    /// An interactive bash whose controlling terminal is a new pseudo-terminal.
    fn start() -> Shell {
        let pty = nix::pty::openpty(None, None).expect("openpty");
        let slave: OwnedFd = pty.slave;
        let stdio = |fd: &OwnedFd| Stdio::from(fd.try_clone().expect("dup"));
        let mut command = Command::new("bash");
        command
            .args(["--norc", "--noprofile", "-i"])
            .env("PS1", "$ ")
            .stdin(stdio(&slave))
            .stdout(stdio(&slave))
            .stderr(stdio(&slave));
        // SAFETY: setsid and ioctl(TIOCSCTTY) are async-signal-safe and touch only the child.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let bash = command.spawn().expect("bash");
        drop(slave);
        let master = std::fs::File::from(pty.master);
        let output = Arc::new(Mutex::new(String::new()));
        let (mut reader, sink) = (master.try_clone().expect("dup master"), output.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().expect("output").push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Shell { bash, master, output, dir: tempfile::tempdir().expect("tempdir") }
    }

    fn type_in(&mut self, keys: &str) {
        self.master.write_all(keys.as_bytes()).expect("type");
    }

    fn output(&self) -> String {
        self.output.lock().expect("output").clone()
    }

    fn bash_pid(&self) -> i32 {
        self.bash.id() as i32
    }

    /// The foreground process group of the terminal.
    fn foreground(&self) -> i32 {
        stat(self.bash_pid())[5].parse().expect("tpgid")
    }

    /// sesame, started by the shell, and the command under it.
    fn sesame_and_command(&self) -> (i32, i32) {
        let mut found = (0, 0);
        wait_for(Duration::from_secs(10), "sesame and its command to run", || {
            let sesame = children_of(self.bash_pid())
                .into_iter()
                .find(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e.ends_with("sesame")));
            let command = sesame.and_then(|s| children_of(s).into_iter().next());
            found = (sesame.unwrap_or(0), command.unwrap_or(0));
            command.is_some()
        });
        found
    }

    fn sesame_command(&self, runtime: &str, background: bool) -> String {
        let dir = self.dir.path().join(runtime);
        format!("{SESAME} run --runtime-dir {} -- sleep 1000{}\n", dir.display(), if background { " &" } else { "" })
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        let _ = self.bash.kill();
        let _ = self.bash.wait();
    }
}

/// The fields of /proc/PID/stat after the command name: state is [0], pgrp [2], tpgid [5].
fn stat(pid: i32) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    text.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().map(String::from).collect()).unwrap_or_default()
}

fn state(pid: i32) -> String {
    stat(pid).first().cloned().unwrap_or_default()
}

#[test]
fn ctrl_z_stops_the_command_and_sesame_and_fg_continues_both() {
    let mut shell = Shell::start();
    let command = shell.sesame_command("fg", false);
    shell.type_in(&command);
    let (sesame, sleep) = shell.sesame_and_command();
    wait_for(Duration::from_secs(10), "the command to hold the terminal", || shell.foreground() == sleep);

    shell.type_in("\x1a"); // Ctrl-Z
    wait_for(Duration::from_secs(10), "the command and sesame to stop", || state(sleep) == "T" && state(sesame) == "T");
    wait_for(Duration::from_secs(10), "the shell to get the terminal back", || shell.foreground() == shell.bash_pid());
    wait_for(Duration::from_secs(10), "the shell to report the stopped job", || shell.output().contains("Stopped"));

    shell.type_in("fg\n");
    wait_for(Duration::from_secs(10), "both to run again", || state(sleep) == "S" && state(sesame) == "S");
    wait_for(Duration::from_secs(10), "the command to hold the terminal again", || shell.foreground() == sleep);

    shell.type_in("\x03"); // Ctrl-C reaches the command, which holds the terminal
    wait_for(Duration::from_secs(10), "sesame to exit with the command", || {
        !std::path::Path::new(&format!("/proc/{sesame}")).exists() || state(sesame) == "Z"
    });
    shell.type_in("echo status=$?\n");
    wait_for(Duration::from_secs(10), "the exit status", || shell.output().contains("status=130"));
}

#[test]
fn a_background_sesame_leaves_the_terminal_to_the_shell() {
    let mut shell = Shell::start();
    let command = shell.sesame_command("bg", true);
    shell.type_in(&command);
    let (sesame, sleep) = shell.sesame_and_command();
    // Give sesame the time it would take to steal the terminal, then check it did not.
    shell.type_in("echo ready-$((20+22))\n");
    wait_for(Duration::from_secs(10), "the shell to answer", || shell.output().contains("ready-42"));
    assert_eq!(shell.foreground(), shell.bash_pid(), "the shell keeps the terminal");
    assert_ne!(stat(sleep)[2], stat(shell.bash_pid())[2], "the command has a process group of its own");
    assert_eq!(state(sesame), "S", "sesame runs in the background, not stopped by SIGTTOU");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(sesame), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    wait_for(Duration::from_secs(10), "sesame to exit", || state(sesame) == "Z" || state(sesame).is_empty());
}
