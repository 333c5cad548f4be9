//! Processes at the OS level: spawning a child with a clean signal state, sending signals, reaping,
//! and finding the descendants that must not outlive the launcher. No policy lives here: the
//! supervisor decides what to signal and when.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::errno::Errno;
use nix::sys::signal::{self, SigHandler, SigSet, SigmaskHow, Signal};
use nix::unistd::Pid;

mod before_start;
mod reap;

pub use before_start::run_before_start;
pub use reap::{Reaped, Reaper};

use crate::user::EnvoyUser;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// The status a shell would report, which the launcher passes on as its own.
    pub fn status_code(self) -> i32 {
        match self {
            Exit::Code(code) => code,
            Exit::Signal(sig) => 128 + sig,
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Exit::Code(code) => write!(f, "exit status {code}"),
            Exit::Signal(sig) => match Signal::try_from(sig) {
                Ok(s) => write!(f, "signal {} ({})", sig, s.as_str()),
                Err(_) => write!(f, "signal {sig}"),
            },
        }
    }
}

/// Why a command could not be started, with the status a shell gives for it.
#[derive(Debug)]
pub struct SpawnError {
    pub program: OsString,
    pub error: io::Error,
}

impl SpawnError {
    /// 127 when the command is not found, 126 when it exists but cannot be executed.
    pub fn status_code(&self) -> i32 {
        if self.error.kind() == io::ErrorKind::NotFound { 127 } else { 126 }
    }
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let program = self.program.to_string_lossy();
        if std::path::Path::new(&self.program).is_dir() {
            return write!(f, "cannot execute '{program}': it is a directory");
        }
        match self.error.kind() {
            // ENOENT also means a script's interpreter is missing: say which, not "not found".
            io::ErrorKind::NotFound => match missing_interpreter(&self.program) {
                Some(interpreter) if interpreter.ends_with('\r') => write!(
                    f,
                    "cannot execute '{program}': its interpreter '{}' is not found (the script has Windows line ends)",
                    interpreter.escape_debug()
                ),
                Some(interpreter) => {
                    write!(f, "cannot execute '{program}': its interpreter '{interpreter}' is not found")
                }
                None => write!(f, "cannot execute '{program}': command not found"),
            },
            _ => write!(f, "cannot execute '{program}': {}", self.error),
        }
    }
}

/// The file exec runs for `program`: a path as given, a bare name looked up in PATH.
pub fn find_program(program: &std::ffi::OsStr) -> Option<std::path::PathBuf> {
    let path = std::path::Path::new(program);
    if path.components().count() > 1 {
        return Some(path.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(path)).find(|p| p.is_file())
}

/// The `#!` interpreter of `program` (found as exec finds it: a path, or in PATH), when the
/// program exists and its interpreter does not.
fn missing_interpreter(program: &std::ffi::OsStr) -> Option<String> {
    use std::io::Read;
    let found = find_program(program)?;
    let mut head = [0u8; 256];
    let n = std::fs::File::open(found).ok()?.read(&mut head).ok()?;
    let head = String::from_utf8_lossy(&head[..n]);
    let line = head.split('\n').next()?;
    // As the kernel reads it: up to the first space or tab, a '\r' included.
    let interpreter = line.strip_prefix("#!")?.trim_start_matches([' ', '\t']).split([' ', '\t']).next()?.to_string();
    (!std::path::Path::new(&interpreter).exists()).then_some(interpreter)
}

/// Starts `argv` in a process group of its own, with default dispositions for every signal and an
/// empty signal mask, whatever the launcher inherited or installed. With `take_terminal`, the
/// child's group takes the terminal, as tini does, so that an interactive child can read it.
/// With `output`, its stdout and stderr go there instead of the launcher's. With `user`, the child
/// takes that user's supplementary groups, gid and uid (in that order: each step needs the
/// privilege the next one drops) before exec, while the launcher stays root.
fn spawn(
    argv: &[OsString],
    take_terminal: bool,
    output: Option<std::fs::File>,
    user: Option<&EnvoyUser>,
) -> Result<Pid, SpawnError> {
    let program = argv.first().cloned().unwrap_or_default();
    let last_signal = libc::SIGRTMAX();
    let mut command = Command::new(&program);
    command.args(&argv[1..]).process_group(0);
    if let Some(file) = output {
        let stderr = file.try_clone().map_err(|error| SpawnError { program: program.clone(), error })?;
        command.stdout(file).stderr(stderr);
    }
    // Resolved here, in the launcher: the child may not read /etc/group or allocate.
    let credentials = user.filter(|u| !u.is_launcher()).map(|u| (u.groups.clone(), u.gid, u.uid));
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe
    // functions (tcsetpgrp, getpgrp, sigaction, sigprocmask, setgroups, setgid, setuid),
    // allocating nothing (the group list was built before the fork).
    unsafe {
        command.pre_exec(move || {
            if take_terminal {
                // SIGTTOU is still ignored here (inherited from the launcher), so taking the
                // terminal from the background cannot stop us; ENOTTY just means no terminal.
                libc::tcsetpgrp(libc::STDIN_FILENO, libc::getpgrp());
            }
            reset_signal_state(last_signal);
            if let Some((groups, gid, uid)) = &credentials {
                // A failure fails the spawn (exec is never reached): Envoy never runs as root by accident.
                nix::unistd::setgroups(groups)?;
                nix::unistd::setgid(*gid)?;
                nix::unistd::setuid(*uid)?;
            }
            Ok(())
        });
    }
    match command.spawn() {
        // The launcher reaps by pid itself; std's Child handle is not needed (dropping it does nothing).
        Ok(child) => Ok(Pid::from_raw(child.id() as i32)),
        Err(error) => Err(SpawnError { program, error }),
    }
}

/// Runs in the forked child: every signal back to SIG_DFL and nothing blocked.
fn reset_signal_state(last_signal: libc::c_int) {
    // The kernel's struct sigaction, all zero: SIG_DFL, no flags, empty mask, whatever the field
    // order. The raw syscall reaches the real-time signals that glibc keeps for itself (32, 33) and
    // refuses in sigaction(), which a parent may still have left ignored.
    let default_action = [0u64; 4];
    for sig in 1..=last_signal {
        // SAFETY: rt_sigaction only reads the 32 zeroed bytes we pass; it is async-signal-safe.
        // EINVAL for SIGKILL and SIGSTOP is expected and harmless.
        unsafe {
            libc::syscall(libc::SYS_rt_sigaction, sig, default_action.as_ptr(), std::ptr::null_mut::<u64>(), 8usize);
        }
    }
    let _ = signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

/// The launcher itself ignores SIGTTIN and SIGTTOU as tini does: it must never be stopped for
/// touching a terminal it does not own (its logs, or handing the terminal to the child).
pub fn ignore_tty_stop_signals() {
    for sig in [Signal::SIGTTIN, Signal::SIGTTOU] {
        // SAFETY: installing SIG_IGN runs no code of ours in signal context.
        let _ = unsafe { signal::signal(sig, SigHandler::SigIgn) };
    }
}

/// Whether the launcher's process group is the foreground group of the terminal on stdin: false
/// without a terminal, and false when a shell started it in the background (`sesame run -- CMD &`),
/// where taking the terminal would steal it from the shell.
fn owns_terminal() -> bool {
    nix::unistd::tcgetpgrp(std::io::stdin()).is_ok_and(|group| group == nix::unistd::getpgrp())
}

/// Hands the terminal to `group` (SIGTTOU is ignored, so a background launcher is not stopped).
fn give_terminal(group: Pid) {
    if let Err(e) = nix::unistd::tcsetpgrp(std::io::stdin(), group) {
        tracing::debug!("cannot hand the terminal to process group {group}: {e}");
    }
}

/// Sends `sig` to one process. A process that is already gone (ESRCH) is the normal race with its
/// exit, not an error.
fn send(pid: Pid, sig: i32) -> nix::Result<()> {
    // SAFETY: kill(2) with a raw signal number: real-time signals have no nix `Signal` variant.
    match Errno::result(unsafe { libc::kill(pid.as_raw(), sig) }) {
        Ok(_) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The process layer as the supervisor sees it: spawning, signalling, reaping. The supervisor owns
/// one and never calls the OS for processes directly, so that its state machine can be driven by
/// unit tests with a fake one.
pub trait Processes {
    fn spawn(&mut self, argv: &[OsString], foreground: bool, output: Option<std::fs::File>) -> Result<Pid, SpawnError>;
    /// Sends `sig` to one process; logs (never fails) when it cannot.
    fn signal(&mut self, pid: Pid, sig: i32);
    /// Sends `sig` to the process group that `leader` (a child spawned in a group of its own, not
    /// reaped yet, so the group id cannot have been reused) leads: a checker and what it started.
    fn signal_group(&mut self, leader: Pid, sig: i32);
    /// What the children the launcher started did since the last call (exited, stopped), and
    /// whether any child is left; orphans are reaped and counted, not returned.
    fn reap(&mut self) -> Reaped;
    /// Sends `sig` to every descendant still alive (the processes a child left behind).
    fn signal_descendants(&mut self, sig: Signal);
    /// Job control: stops the launcher itself, as a shell's Ctrl-Z asks, after taking back the
    /// terminal from the child it handed it to. Returns once the launcher is continued.
    fn suspend(&mut self);
    /// Continued after a stop: hands the terminal back to the child that had it, when the
    /// launcher's own group is in the foreground again (`fg`, not `bg`).
    fn resume(&mut self);
}

/// The real process layer.
#[derive(Debug, Clone)]
pub struct System {
    pub mode: InitMode,
    /// The first child's process group: what can still be named when /proc is not ours.
    pub first_child: Option<Pid>,
    /// The child whose process group was handed the terminal.
    pub terminal_child: Option<Pid>,
    /// Every child runs as this user (`--envoy-user`): Envoy's epochs, its validator and checker,
    /// or the plain command, as su-exec would run it.
    pub user: Option<EnvoyUser>,
    /// Shared with the signal listener, which reaps where SIGCHLD arrives.
    pub reaper: Reaper,
}

impl Processes for System {
    fn spawn(&mut self, argv: &[OsString], foreground: bool, output: Option<std::fs::File>) -> Result<Pid, SpawnError> {
        let take_terminal = foreground && owns_terminal();
        let pid = spawn(argv, take_terminal, output, self.user.as_ref())?;
        // Known before anything can reap it: the signal listener runs on this same thread, and not
        // until the supervisor's handler that spawned returns.
        self.reaper.know(pid);
        self.first_child.get_or_insert(pid);
        if take_terminal {
            self.terminal_child = Some(pid);
        }
        Ok(pid)
    }

    fn signal(&mut self, pid: Pid, sig: i32) {
        tracing::debug!("sending {} to {pid}", signal_name(sig));
        if let Err(e) = send(pid, sig) {
            tracing::warn!("cannot send {} to {pid}: {e}", signal_name(sig));
        }
    }

    fn signal_group(&mut self, leader: Pid, sig: i32) {
        tracing::debug!("sending {} to the process group of {leader}", signal_name(sig));
        if let Err(e) = send(Pid::from_raw(-leader.as_raw()), sig) {
            tracing::warn!("cannot send {} to the process group of {leader}: {e}", signal_name(sig));
        }
    }

    fn reap(&mut self) -> Reaped {
        self.reaper.take()
    }

    fn signal_descendants(&mut self, sig: Signal) {
        signal_descendants(self.mode, sig, self.first_child);
    }

    fn suspend(&mut self) {
        // PID 1 of a namespace cannot be stopped from inside it, and has no shell to return to.
        if self.mode == InitMode::Pid1 {
            return;
        }
        if self.terminal_child.is_some() {
            give_terminal(nix::unistd::getpgrp());
        }
        tracing::debug!("stopping, as job control asks");
        let _ = signal::kill(nix::unistd::getpid(), Signal::SIGSTOP);
    }

    fn resume(&mut self) {
        if let Some(child) = self.terminal_child
            && owns_terminal()
        {
            give_terminal(child);
        }
    }
}

/// A signal's name (SIGTERM), or its number for those nix cannot name (real-time ones).
pub fn signal_name(sig: i32) -> String {
    Signal::try_from(sig).map_or_else(|_| format!("signal {sig}"), |s| s.as_str().to_string())
}

/// Where the launcher sits in the process tree, which decides how it finds its descendants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitMode {
    /// PID 1 of a namespace: the kernel re-parents every orphan to us, and kill(-1) reaches all of them.
    Pid1,
    /// Any other pid: PR_SET_CHILD_SUBREAPER makes orphans of our descendants ours.
    Subreaper,
}

/// Makes sure orphans of our descendants come back to us to be reaped.
pub fn become_init() -> io::Result<InitMode> {
    if nix::unistd::getpid().as_raw() == 1 {
        return Ok(InitMode::Pid1);
    }
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) only sets a flag on this process.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    Errno::result(rc).map_err(io::Error::from)?;
    Ok(InitMode::Subreaper)
}

/// Sends `sig` to every descendant still alive.
pub fn signal_descendants(mode: InitMode, sig: Signal, fallback_group: Option<Pid>) {
    if mode == InitMode::Pid1 {
        // As PID 1 of a namespace, kill(-1) reaches every process in it but ourselves, which are
        // exactly our descendants. ESRCH means there is nobody left.
        match signal::kill(Pid::from_raw(-1), sig) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => tracing::warn!("kill(-1, {sig}) failed: {e}"),
        }
        return;
    }
    match descendants() {
        Some(tree) => {
            for (pid, parent) in &tree {
                signal_if_still_descendant(*pid, *parent, &tree, sig);
            }
        }
        None => {
            // /proc belongs to another pid namespace: the child's process group is what we can name.
            if let Some(group) = fallback_group {
                let _ = send(Pid::from_raw(-group.as_raw()), sig as i32);
            }
        }
    }
}

/// Signals `pid` only if it is still the process the scan found: the pid is pinned with a pidfd,
/// then its parent is checked again, so a pid reused since the scan is never signalled.
fn signal_if_still_descendant(pid: i32, parent: i32, tree: &[(i32, i32)], sig: Signal) {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new file descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return; // ESRCH: gone already.
    }
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let me = nix::unistd::getpid().as_raw();
    let same_parent = procfs::process::Process::new(pid)
        .and_then(|p| p.stat())
        .is_ok_and(|stat| stat.ppid == parent || stat.ppid == me || tree.iter().any(|(p, _)| *p == stat.ppid));
    if same_parent {
        // SAFETY: pidfd_send_signal(2) on a pidfd we own, with no siginfo and no flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                sig as i32,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
    }
}

/// Our descendants with their parents, read from /proc; None when /proc does not show our own
/// pid namespace.
fn descendants() -> Option<Vec<(i32, i32)>> {
    let me = nix::unistd::getpid().as_raw();
    let proc_me = procfs::process::Process::myself().ok()?.pid;
    if proc_me != me {
        return None;
    }
    let parents: Vec<(i32, i32)> = procfs::process::all_processes()
        .ok()?
        .filter_map(|p| p.ok()?.stat().ok())
        .map(|stat| (stat.pid, stat.ppid))
        .collect();
    let mut found: Vec<(i32, i32)> = vec![(me, 0)];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i].0;
        found.extend(parents.iter().filter(|(_, ppid)| *ppid == parent));
        i += 1;
    }
    Some(found.into_iter().skip(1).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::wait::{WaitStatus, waitpid};

    #[test]
    fn exit_statuses_follow_the_shell_convention() {
        assert_eq!(Exit::Code(0).status_code(), 0);
        assert_eq!(Exit::Code(255).status_code(), 255);
        assert_eq!(Exit::Signal(15).status_code(), 143);
        assert_eq!(Exit::Signal(9).status_code(), 137);
        assert_eq!(Exit::Signal(9).to_string(), "signal 9 (SIGKILL)");
    }

    #[test]
    fn spawn_errors_map_to_126_and_127() {
        let missing = spawn(&["/nonexistent/sesame-test".into()], false, None, None).expect_err("missing");
        assert_eq!(missing.status_code(), 127);
        assert!(missing.to_string().contains("command not found"), "{missing}");
        let dir = spawn(&["/".into()], false, None, None).expect_err("directory");
        assert_eq!(dir.status_code(), 126);
        assert!(dir.to_string().contains("is a directory"), "{dir}");

        let scripts = tempfile::tempdir().expect("tempdir");
        let script = scripts.path().join("run.sh");
        std::fs::write(&script, "#!/nonexistent/bash -e\necho hi\n").expect("script");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let missing = spawn(&[script.clone().into()], false, None, None).expect_err("no interpreter");
        assert_eq!(missing.status_code(), 127);
        let expected =
            format!("cannot execute '{}': its interpreter '/nonexistent/bash' is not found", script.display());
        assert_eq!(missing.to_string(), expected);

        std::fs::write(&script, "#!/bin/sh\r\necho hi\r\n").expect("script");
        let crlf = spawn(&[script.clone().into()], false, None, None).expect_err("CRLF");
        let expected = format!(
            "cannot execute '{}': its interpreter '/bin/sh\\r' is not found (the script has Windows line ends)",
            script.display()
        );
        assert_eq!(crlf.to_string(), expected);
    }

    #[test]
    fn a_child_runs_as_the_given_user_and_its_groups() {
        let gid = nix::unistd::Gid::from_raw(65534);
        let extra = nix::unistd::Gid::from_raw(4343);
        let user =
            EnvoyUser { uid: nix::unistd::Uid::from_raw(65534), gid, groups: vec![gid, extra], label: "x".into() };
        let out = tempfile::NamedTempFile::new().expect("output");
        let argv: Vec<OsString> = ["sh", "-c", "id -u; id -g; id -G"].iter().map(OsString::from).collect();
        let pid = spawn(&argv, false, Some(out.reopen().expect("reopen")), Some(&user)).expect("spawn");
        assert_eq!(waitpid(pid, None).expect("waitpid"), WaitStatus::Exited(pid, 0));
        let text = std::fs::read_to_string(out.path()).expect("read");
        assert_eq!(text, "65534\n65534\n65534 4343\n");
    }
}
