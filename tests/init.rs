//! sesame as an init: exit statuses, signal forwarding, reaping, leaving nothing behind, and the
//! child's clean signal state. Run with the real binary, as PID 1 of a fresh PID namespace unless
//! the test is about the other mode.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Launcher, Mode, alive, reaped_children, wait_for};
use nix::sys::signal::Signal;

const EXIT: Duration = Duration::from_secs(10);

#[test]
fn exit_codes_pass_through() {
    for code in [0, 1, 2, 64, 127, 255] {
        let mut launcher = Launcher::start(Mode::Pid1, &[], &["sh", "-c", &format!("exit {code}")]);
        assert_eq!(launcher.exit_code(EXIT), code, "log:\n{}", launcher.log());
    }
}

#[test]
fn death_by_signal_gives_128_plus_n() {
    for (sig, code) in [("TERM", 143), ("KILL", 137), ("USR1", 138)] {
        let mut launcher = Launcher::start(Mode::Pid1, &[], &["sh", "-c", &format!("kill -{sig} $$")]);
        assert_eq!(launcher.exit_code(EXIT), code, "SIG{sig}; log:\n{}", launcher.log());
        assert!(launcher.log().contains(&format!("SIG{sig}")), "the log names SIG{sig}:\n{}", launcher.log());
    }
}

#[test]
fn missing_command_is_127_and_directory_is_126_with_the_reason() {
    let mut missing = Launcher::start(Mode::Pid1, &[], &["/nonexistent/command"]);
    assert_eq!(missing.exit_code(EXIT), 127);
    let log = missing.log();
    assert!(log.contains("cannot execute '/nonexistent/command': command not found"), "{log}");

    let mut directory = Launcher::start(Mode::Pid1, &[], &["/tmp"]);
    assert_eq!(directory.exit_code(EXIT), 126);
    let log = directory.log();
    assert!(log.contains("cannot execute '/tmp': it is a directory"), "{log}");
}

#[test]
fn signals_reach_the_child() {
    let script = r#"
        out=$1
        for s in USR1 USR2 WINCH QUIT CONT; do trap "echo $s >> $out" $s; done
        : > "$out.ready"
        while :; do sleep 0.02; done
    "#;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("received");
    let out_arg = out.to_string_lossy().into_owned();
    let mut launcher = Launcher::start(Mode::Pid1, &[], &["sh", "-c", script, "recorder", &out_arg]);
    let ready = dir.path().join("received.ready");
    wait_for(EXIT, "the recording child to set its traps", || ready.exists());

    for (sig, name) in [
        (Signal::SIGUSR1, "USR1"),
        (Signal::SIGUSR2, "USR2"),
        (Signal::SIGWINCH, "WINCH"),
        (Signal::SIGQUIT, "QUIT"),
        (Signal::SIGCONT, "CONT"),
    ] {
        launcher.signal(sig);
        wait_for(EXIT, &format!("the child to record SIG{name}"), || {
            std::fs::read_to_string(&out).is_ok_and(|text| text.lines().any(|l| l == name))
        });
    }
    // Untrapped, SIGTERM kills the shell: forwarded too (until the drain takes it over for Envoy).
    launcher.signal(Signal::SIGTERM);
    assert_eq!(launcher.exit_code(EXIT), 143, "log:\n{}", launcher.log());
}

/// Leaves 200 orphans that exit at once, waits until none of them is a zombie and the file $1
/// exists, then exits 7 (or 99 when zombies remain for 10 s, 98 when $1 does not come within 30 s).
/// $PPID is the launcher in both modes.
const ORPHANS: &str = r#"
    i=0
    while [ $i -lt 200 ]; do (/bin/true &); i=$((i+1)); done
    deadline=$(( $(date +%s) + 10 ))
    while [ "$(awk '$3 == "Z" && $4 == p' p=$PPID /proc/[0-9]*/stat 2>/dev/null | wc -l)" -ne 0 ]; do
        [ "$(date +%s)" -lt $deadline ] || exit 99
        sleep 0.02
    done
    deadline=$(( $(date +%s) + 30 ))
    while [ ! -e "$1" ]; do
        [ "$(date +%s)" -lt $deadline ] || exit 98
        sleep 0.02
    done
    exit 7
"#;

fn assert_reaps_200_orphans(mode: Mode) {
    let dir = tempfile::tempdir().expect("tempdir");
    let done = dir.path().join("counted");
    let done_arg = done.to_string_lossy().into_owned();
    let mut launcher = Launcher::start(mode, &[], &["sh", "-c", ORPHANS, "orphans", &done_arg]);
    // Counted while the command still runs (its exit ends the launcher and its /metrics).
    let reaped = launcher.wait_for_metric(&reaped_children("orphan"), |n| n >= 200);
    std::fs::write(&done, "").expect("tell the command to exit");
    let code = launcher.exit_code(Duration::from_secs(30));
    let log = launcher.log();
    assert_eq!(code, 7, "7 means no zombie was left, 99 that zombies stayed; log:\n{log}");
    assert_eq!(reaped, 200, "every orphan is reaped by the launcher, and counted");
}

#[test]
fn reaps_orphans_as_pid1() {
    assert_reaps_200_orphans(Mode::Pid1);
    let mut launcher = Launcher::start(Mode::Pid1, &["--log-level", "debug"], &["true"]);
    launcher.exit_code(EXIT);
    assert!(launcher.log().contains("running as PID 1"), "{}", launcher.log());
}

#[test]
fn reaps_orphans_as_subreaper() {
    assert_reaps_200_orphans(Mode::Plain);
    let mut launcher = Launcher::start(Mode::Plain, &["--log-level", "debug"], &["true"]);
    launcher.exit_code(EXIT);
    assert!(launcher.log().contains("running as a child subreaper"), "{}", launcher.log());
}

/// Leaves a process that ignores SIGTERM (its pid in $1), then exits 3.
const STUBBORN: &str = r#"
    sh -c 'trap "" TERM; echo $$ > "$0"; exec sleep 1000' "$1" &
    while [ ! -s "$1" ]; do sleep 0.01; done
    exit 3
"#;

#[test]
fn nothing_is_left_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("stubborn.pid");
    let pid_arg = pid_file.to_string_lossy().into_owned();
    let mut launcher =
        Launcher::start(Mode::Plain, &["--kill-timeout", "2s"], &["sh", "-c", STUBBORN, "stubborn", &pid_arg]);
    let code = launcher.exit_code(Duration::from_secs(10));
    let elapsed = launcher.started.elapsed();
    let log = launcher.log();
    assert_eq!(code, 3, "the child's status; log:\n{log}");
    assert!(elapsed >= Duration::from_millis(1900), "SIGTERM was ignored, so the kill timeout ran out: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "exits within kill-timeout + 1 s: {elapsed:?}\n{log}");
    assert!(log.contains("sending SIGKILL"), "{log}");
    let stubborn: i32 = std::fs::read_to_string(&pid_file).expect("pid file").trim().parse().expect("pid");
    assert!(!alive(stubborn), "the process that ignored SIGTERM is gone (killed and reaped)");
}

#[test]
fn nothing_is_left_behind_as_pid1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_arg = dir.path().join("stubborn.pid").to_string_lossy().into_owned();
    let mut launcher =
        Launcher::start(Mode::Pid1, &["--kill-timeout", "1s"], &["sh", "-c", STUBBORN, "stubborn", &pid_arg]);
    assert_eq!(launcher.exit_code(Duration::from_secs(10)), 3);
    let elapsed = launcher.started.elapsed();
    let log = launcher.log();
    assert!(elapsed < Duration::from_secs(2), "exits within kill-timeout + 1 s: {elapsed:?}\n{log}");
    assert!(log.contains("sending SIGKILL") && !log.contains("survived SIGKILL"), "{log}");
}

#[test]
fn an_inherited_signal_mask_does_not_blind_the_launcher() {
    use nix::sys::signal::{SigSet, SigmaskHow};
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let ready = dir.path().join("ready");
    let script = format!("(sleep 0.2 &); : > {}; exec sleep 1000", ready.display());
    // sesame starts with SIGCHLD and SIGTERM blocked, as a careless parent may leave them.
    let mut launcher = Launcher::start_with(Mode::Pid1, &[], &["sh", "-c", &script], |command| {
        // SAFETY: runs in the forked test child before exec; sigprocmask is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                let mut blocked = SigSet::empty();
                blocked.add(Signal::SIGCHLD);
                blocked.add(Signal::SIGTERM);
                nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&blocked), None)?;
                Ok(())
            });
        }
    });
    wait_for(EXIT, "the child to start", || ready.exists());
    // The orphaned sleep is reaped: SIGCHLD reached the launcher.
    launcher.wait_for_metric(&reaped_children("orphan"), |n| n >= 1);
    launcher.signal(Signal::SIGTERM);
    assert_eq!(launcher.exit_code(EXIT), 143, "SIGTERM reached the launcher and the child; log:\n{}", launcher.log());
}

#[test]
fn child_starts_with_a_clean_signal_mask_and_no_ignored_signals() {
    use nix::sys::signal::{SigHandler, SigSet, SigmaskHow};
    use std::os::unix::process::CommandExt;
    let mut launcher = Launcher::start_with(Mode::Pid1, &[], &["cat", "/proc/self/status"], |command| {
        // SAFETY: runs in the forked test child before exec; sigprocmask and signal are async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                let mut blocked = SigSet::empty();
                blocked.add(Signal::SIGUSR1);
                blocked.add(Signal::SIGWINCH);
                nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&blocked), None)?;
                nix::sys::signal::signal(Signal::SIGHUP, SigHandler::SigIgn)?;
                nix::sys::signal::signal(Signal::SIGUSR2, SigHandler::SigIgn)?;
                Ok(())
            });
        }
    });
    assert_eq!(launcher.exit_code(EXIT), 0);
    let log = launcher.log();
    let field = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in:\n{log}"))
            .to_string()
    };
    assert_eq!(field("SigBlk:"), "0000000000000000", "nothing blocked in the child");
    assert_eq!(field("SigIgn:"), "0000000000000000", "nothing ignored in the child");
}

#[test]
fn usage_errors_exit_1_for_run_and_2_for_the_clients() {
    let run = Command::new(common::SESAME).args(["run", "--no-such-option"]).output().expect("sesame run");
    assert_eq!(run.status.code(), Some(1), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(String::from_utf8_lossy(&run.stderr).contains("--no-such-option"));
    let run = Command::new(common::SESAME).args(["--log-level", "info", "run", "--kill-timeout", "soon"]).output();
    let run = run.expect("sesame run");
    assert_eq!(run.status.code(), Some(1), "{}", String::from_utf8_lossy(&run.stderr));
    let status = Command::new(common::SESAME).args(["status", "--no-such-option"]).output().expect("sesame status");
    assert_eq!(status.status.code(), Some(2), "{}", String::from_utf8_lossy(&status.stderr));
    let help = Command::new(common::SESAME).args(["run", "--help"]).output().expect("sesame run --help");
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("--runtime-dir"));
}

#[test]
fn a_client_whose_reader_went_away_exits_quietly() {
    let launcher = Launcher::start(Mode::Plain, &[], &["sleep", "1000"]);
    let socket = launcher.runtime_dir().join("control.sock");
    wait_for(EXIT, "the control socket", || common::control(&socket, "GET", "/ready").is_ok());
    // A pipe whose reader is gone: every write to it fails with EPIPE.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let output = Command::new(common::SESAME)
        .args(["status", "--json", "--runtime-dir"])
        .arg(launcher.runtime_dir())
        .stdout(writer)
        .output()
        .expect("sesame status");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(output.status.code(), Some(0), "the answer is still the readiness: {stderr}");
}

#[test]
fn an_empty_http_token_file_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "  \n").expect("token");
    let token = token.to_string_lossy().into_owned();
    let port = common::free_port().to_string();
    let http = format!("127.0.0.1:{port}");
    let mut launcher = Launcher::start(Mode::Plain, &["--http", &http, "--http-token", &token], &["sleep", "1000"]);
    assert_eq!(launcher.exit_code(EXIT), 1, "{}", launcher.log());
    let expected = format!("--http-token {token} is empty");
    assert!(launcher.log().contains(&expected), "{}", launcher.log());
    assert!(!launcher.log().contains("started sleep"), "nothing was started:\n{}", launcher.log());
}

#[test]
fn a_script_whose_interpreter_is_missing_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("start.sh");
    std::fs::write(&script, "#!/nonexistent/bash\necho hi\n").expect("script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let script = script.to_string_lossy().into_owned();
    let mut launcher = Launcher::start(Mode::Pid1, &[], &[&script]);
    assert_eq!(launcher.exit_code(EXIT), 127);
    let expected = format!("cannot execute '{script}': its interpreter '/nonexistent/bash' is not found");
    assert!(launcher.log().contains(&expected), "{}", launcher.log());
}
