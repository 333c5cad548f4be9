//! Envoy's command line: recognising an Envoy command, and the flags the launcher adds to it.
//! Pure functions over argument lists; the launcher never passes a flag twice.

use std::ffi::{OsStr, OsString};
use std::path::Path;

/// A command is Envoy when its program is named `envoy` or is the configured Envoy binary.
pub fn is_envoy_command(program: &OsStr, envoy_bin: &Path) -> bool {
    let program = Path::new(program);
    program == envoy_bin || program.file_name() == Some(OsStr::new("envoy"))
}

/// Whether `flag` appears in `args`, as `--flag value` or `--flag=value`.
pub fn has_flag(args: &[OsString], flag: &str) -> bool {
    args.iter().any(|arg| is_flag(arg, flag))
}

fn is_flag(arg: &OsStr, flag: &str) -> bool {
    let arg = arg.as_encoded_bytes();
    arg == flag.as_bytes() || (arg.starts_with(flag.as_bytes()) && arg.get(flag.len()) == Some(&b'='))
}

/// `args` without any occurrence of the valued `flag` (both spellings, with its value).
fn without_flag(args: &[OsString], flag: &str) -> Vec<OsString> {
    let mut kept = Vec::with_capacity(args.len());
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == flag {
            iter.next();
        } else if !is_flag(arg, flag) {
            kept.push(arg.clone());
        }
    }
    kept
}

/// Envoy's drain flags, as the launcher would set them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyFlags {
    pub drain_time_s: u64,
    pub drain_strategy: &'static str,
    pub parent_shutdown_time_s: u64,
}

/// Appends each of the launcher's drain flags that the user did not give.
fn add_drain_flags(argv: &mut Vec<OsString>, flags: &EnvoyFlags) {
    let wanted = [
        ("--drain-time-s", flags.drain_time_s.to_string()),
        ("--drain-strategy", flags.drain_strategy.to_string()),
        ("--parent-shutdown-time-s", flags.parent_shutdown_time_s.to_string()),
    ];
    for (flag, value) in wanted {
        if !has_flag(argv, flag) {
            argv.extend([flag.into(), value.into()]);
        }
    }
}

/// The command line of the first epoch: the user's command with `--restart-epoch 0` (replacing any
/// the user gave, since the launcher owns the epochs) and a base id. Unless the user chose a base
/// id, Envoy picks a free one (`--use-dynamic-base-id`) and writes it to `base_id_path`, so that two
/// launchers on one host never share hot-restart memory and later epochs can reuse the id.
pub fn first_epoch_command(command: &[OsString], base_id_path: &Path, flags: &EnvoyFlags) -> Vec<OsString> {
    let mut argv = without_flag(command, "--restart-epoch");
    add_drain_flags(&mut argv, flags);
    argv.extend(["--restart-epoch".into(), "0".into()]);
    if !has_flag(&argv, "--base-id") {
        if !has_flag(&argv, "--use-dynamic-base-id") {
            argv.push("--use-dynamic-base-id".into());
        }
        if !has_flag(&argv, "--base-id-path") {
            argv.extend(["--base-id-path".into(), base_id_path.into()]);
        }
    }
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAGS: EnvoyFlags = EnvoyFlags { drain_time_s: 30, drain_strategy: "immediate", parent_shutdown_time_s: 45 };
    const DRAIN_FLAGS: [&str; 6] =
        ["--drain-time-s", "30", "--drain-strategy", "immediate", "--parent-shutdown-time-s", "45"];

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn recognises_envoy_by_name_or_configured_binary() {
        let bin = Path::new("/opt/envoy/bin/envoy-1.40");
        assert!(is_envoy_command(OsStr::new("envoy"), bin));
        assert!(is_envoy_command(OsStr::new("/usr/local/bin/envoy"), bin));
        assert!(is_envoy_command(OsStr::new("/opt/envoy/bin/envoy-1.40"), bin));
        assert!(!is_envoy_command(OsStr::new("sh"), bin));
        assert!(!is_envoy_command(OsStr::new("/bin/envoy-wrapper"), bin));
    }

    fn with_drain_flags(head: &[&str], tail: &[&str]) -> Vec<OsString> {
        args(&[head, &DRAIN_FLAGS[..], tail].concat())
    }

    #[test]
    fn adds_epoch_drain_flags_and_dynamic_base_id() {
        let argv = first_epoch_command(&args(&["envoy", "-c", "b.yaml"]), Path::new("/run/s/base-id"), &FLAGS);
        let tail = ["--restart-epoch", "0", "--use-dynamic-base-id", "--base-id-path", "/run/s/base-id"];
        assert_eq!(argv, with_drain_flags(&["envoy", "-c", "b.yaml"], &tail));
    }

    #[test]
    fn keeps_the_users_base_id_and_never_repeats_a_flag() {
        let command = args(&["envoy", "--base-id=7", "--restart-epoch", "3", "-c", "b.yaml"]);
        let argv = first_epoch_command(&command, Path::new("/x"), &FLAGS);
        assert_eq!(argv, with_drain_flags(&["envoy", "--base-id=7", "-c", "b.yaml"], &["--restart-epoch", "0"]));

        let command = args(&["envoy", "--use-dynamic-base-id", "--base-id-path", "/mine", "--restart-epoch=0"]);
        let argv = first_epoch_command(&command, Path::new("/x"), &FLAGS);
        let head = ["envoy", "--use-dynamic-base-id", "--base-id-path", "/mine"];
        assert_eq!(argv, with_drain_flags(&head, &["--restart-epoch", "0"]));
    }

    #[test]
    fn keeps_the_users_drain_flags() {
        let command = args(&["envoy", "--drain-time-s=5", "--drain-strategy", "gradual", "--base-id", "1"]);
        let argv = first_epoch_command(&command, Path::new("/x"), &FLAGS);
        let expected = [
            "envoy",
            "--drain-time-s=5",
            "--drain-strategy",
            "gradual",
            "--base-id",
            "1",
            "--parent-shutdown-time-s",
            "45",
            "--restart-epoch",
            "0",
        ];
        assert_eq!(argv, args(&expected));
    }

    #[test]
    fn flag_match_is_exact() {
        assert!(has_flag(&args(&["--base-id", "1"]), "--base-id"));
        assert!(has_flag(&args(&["--base-id=1"]), "--base-id"));
        assert!(!has_flag(&args(&["--base-id-path", "/p"]), "--base-id"));
    }
}
