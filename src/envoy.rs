//! Envoy's command line: recognising an Envoy command, and the flags the launcher adds to it.
//! Pure functions over argument lists; the launcher never passes a flag twice.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A command is Envoy when its program is named `envoy` or is the configured Envoy binary.
pub fn is_envoy_command(program: &OsStr, envoy_bin: &Path) -> bool {
    let program = Path::new(program);
    program == envoy_bin || program.file_name() == Some(OsStr::new("envoy"))
}

/// Whether `flag` appears in `args`, as `--flag value` or `--flag=value` (Envoy takes only the
/// first; the second is recognised so that the launcher never adds a flag the user meant to set).
pub fn has_flag(args: &[OsString], flag: &str) -> bool {
    args.iter().any(|arg| is_flag(arg, flag))
}

fn is_flag(arg: &OsStr, flag: &str) -> bool {
    let arg = arg.as_encoded_bytes();
    arg == flag.as_bytes() || (arg.starts_with(flag.as_bytes()) && arg.get(flag.len()) == Some(&b'='))
}

/// `args` without any occurrence of the valued `flag` (both spellings, with its value).
pub fn without_flag(args: &[OsString], flag: &str) -> Vec<OsString> {
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

/// Envoy's flags as the launcher would set them: the drain, and the worker count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyFlags {
    pub drain_time_s: u64,
    pub drain_strategy: &'static str,
    pub parent_shutdown_time_s: u64,
    /// `--concurrency`, when the launcher chose one.
    pub concurrency: Option<u32>,
}

/// Whether the command chooses Envoy's worker count itself (`--cpuset-threads` derives it from
/// the cpuset, and a `--concurrency` added next to it would override that).
pub fn sets_concurrency(command: &[OsString]) -> bool {
    has_flag(command, "--concurrency") || has_flag(command, "--cpuset-threads")
}

/// Appends each of the launcher's flags that the user did not give.
fn add_launcher_flags(argv: &mut Vec<OsString>, flags: &EnvoyFlags) {
    let mut wanted = vec![
        ("--drain-time-s", flags.drain_time_s.to_string()),
        ("--drain-strategy", flags.drain_strategy.to_string()),
        ("--parent-shutdown-time-s", flags.parent_shutdown_time_s.to_string()),
    ];
    if let Some(workers) = flags.concurrency.filter(|_| !sets_concurrency(argv)) {
        wanted.push(("--concurrency", workers.to_string()));
    }
    for (flag, value) in wanted {
        if !has_flag(argv, flag) {
            argv.extend([flag.into(), value.into()]);
        }
    }
}

/// How an epoch gets its base id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseId {
    /// The user's command sets it (`--base-id`): left as given.
    FromCommand,
    /// Epoch 0 lets Envoy pick a free one (`--use-dynamic-base-id`) and write it to this file.
    Dynamic(PathBuf),
    /// Later epochs reuse the one epoch 0 picked: hot restart needs the same id.
    Picked(u32),
}

/// The bootstrap file an Envoy command line names (`-c` or `--config-path`, the last one wins).
pub fn config_path(args: &[OsString]) -> Option<PathBuf> {
    flag_value(args, &["-c", "--config-path"]).map(PathBuf::from)
}

/// The value of a valued flag in `args` (`--flag value` or `--flag=value`) under any of its
/// `names` (`-c` and `--config-path`, say): the last one given, as Envoy takes it.
pub fn flag_value(args: &[OsString], names: &[&str]) -> Option<OsString> {
    let mut found = None;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        for name in names {
            if arg == *name {
                found = iter.next().cloned();
                break;
            } else if is_flag(arg, name) {
                found = Some(OsStr::from_bytes(&arg.as_bytes()[name.len() + 1..]).to_os_string());
                break;
            }
        }
    }
    found
}

/// The file of Envoy's hot-restart shared memory for `base_id` (its name multiplies the id by 10,
/// leaving room for the epochs' domain sockets).
pub fn shared_memory_path(base_id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/shm/envoy_shared_memory_{}", u64::from(base_id) * 10))
}

/// The base id of the running Envoy `pid`, from the hot-restart memory it maps: for when the file
/// it was written to is gone (the runtime directory deleted before sesame read it).
pub fn base_id_from_maps(pid: i32) -> Option<u32> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    base_id_in_maps(&maps)
}

fn base_id_in_maps(maps: &str) -> Option<u32> {
    let at = maps.find("/dev/shm/envoy_shared_memory_")? + "/dev/shm/envoy_shared_memory_".len();
    let digits: String = maps[at..].chars().take_while(char::is_ascii_digit).collect();
    let scaled: u64 = digits.parse().ok()?;
    u32::try_from(scaled / 10).ok()
}

/// The base id file of a command: the user's `--base-id-path` when they asked for a dynamic base
/// id with one, `default` when the launcher picks dynamically, None when `--base-id` fixes it.
pub fn base_id_file(command: &[OsString], default: &Path) -> Option<PathBuf> {
    if has_flag(command, "--base-id") {
        return None;
    }
    Some(flag_value(command, &["--base-id-path"]).map_or_else(|| default.to_path_buf(), PathBuf::from))
}

/// The command line of epoch `epoch`: the user's command with `--restart-epoch` (replacing any the
/// user gave, since the launcher owns the epochs), the base id, and the drain and worker flags the
/// user did not set. Unless the user chose a base id, epoch 0 lets Envoy pick a free one, so that
/// two launchers on one host never share hot-restart memory, and later epochs reuse it.
pub fn epoch_command(command: &[OsString], epoch: u32, base_id: &BaseId, flags: &EnvoyFlags) -> Vec<OsString> {
    let mut argv = without_flag(command, "--restart-epoch");
    add_launcher_flags(&mut argv, flags);
    argv.extend(["--restart-epoch".into(), epoch.to_string().into()]);
    match base_id {
        BaseId::FromCommand => {}
        BaseId::Dynamic(path) => {
            // The path is the user's --base-id-path for the first family; a later family (a cold
            // handover) replaces it and any --base-id with its own.
            argv = without_flag(&without_flag(&argv, "--base-id-path"), "--base-id");
            argv.retain(|arg| arg != "--use-dynamic-base-id");
            argv.extend(["--use-dynamic-base-id".into(), "--base-id-path".into(), path.into()]);
        }
        BaseId::Picked(id) => {
            // --use-dynamic-base-id is refused for epochs above 0.
            argv = without_flag(&argv, "--base-id-path");
            argv.retain(|arg| arg != "--use-dynamic-base-id");
            argv.extend(["--base-id".into(), id.to_string().into()]);
        }
    }
    argv
}

/// `command` with an admin on the unix socket `socket`, given through `--config-yaml` (which Envoy
/// merges over the bootstrap). Envoy takes one `--config-yaml` only: the user's is merged into it.
/// Err when the user's `--config-yaml` is not YAML.
pub fn with_admin(command: &[OsString], socket: &Path) -> Result<Vec<OsString>, BadConfigYaml> {
    let mut overlay: serde_json::Value = match flag_value(command, &["--config-yaml"]) {
        Some(yaml) => serde_saphyr::from_str(&yaml.to_string_lossy()).map_err(|e| BadConfigYaml(e.to_string()))?,
        None => serde_json::json!({}),
    };
    let admin = serde_json::json!({ "address": { "pipe": { "path": socket.to_string_lossy() } } });
    match overlay.as_object_mut() {
        Some(object) => {
            object.insert("admin".into(), admin);
        }
        None => overlay = serde_json::json!({ "admin": admin }),
    }
    let mut argv = without_flag(command, "--config-yaml");
    // JSON is YAML: Envoy reads it as it reads any --config-yaml.
    argv.extend(["--config-yaml".into(), overlay.to_string().into()]);
    Ok(argv)
}

/// The user's `--config-yaml` does not parse: why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--config-yaml is not valid YAML: {0}")]
pub struct BadConfigYaml(String);

/// The command for `envoy --mode validate`: the user's configuration, none of the hot-restart flags
/// (validation must not touch the shared memory of the serving epochs).
pub fn validate_command(command: &[OsString]) -> Vec<OsString> {
    let mut argv = command.to_vec();
    for flag in ["--restart-epoch", "--base-id", "--base-id-path", "--mode"] {
        argv = without_flag(&argv, flag);
    }
    argv.retain(|arg| arg != "--use-dynamic-base-id");
    argv.extend(["--mode".into(), "validate".into()]);
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_id_is_read_from_the_hot_restart_memory_mapped() {
        let maps = "7f00-7f01 rw-s 00000000 00:19 12 /dev/shm/envoy_shared_memory_1559881310\n\
                    7f02-7f03 r-xp 00000000 08:01 99 /usr/lib/libc.so.6\n";
        assert_eq!(base_id_in_maps(maps), Some(155_988_131));
        assert_eq!(base_id_in_maps("7f02-7f03 r-xp 0 08:01 99 /usr/lib/libc.so.6\n"), None);
    }

    const FLAGS: EnvoyFlags =
        EnvoyFlags { drain_time_s: 30, drain_strategy: "immediate", parent_shutdown_time_s: 45, concurrency: None };
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
        let dynamic = BaseId::Dynamic("/run/s/base-id".into());
        let argv = epoch_command(&args(&["envoy", "-c", "b.yaml"]), 0, &dynamic, &FLAGS);
        let tail = ["--restart-epoch", "0", "--use-dynamic-base-id", "--base-id-path", "/run/s/base-id"];
        assert_eq!(argv, with_drain_flags(&["envoy", "-c", "b.yaml"], &tail));
    }

    #[test]
    fn keeps_the_users_base_id_and_never_repeats_a_flag() {
        let command = args(&["envoy", "--base-id", "7", "--restart-epoch", "3", "-c", "b.yaml"]);
        assert_eq!(base_id_file(&command, Path::new("/x")), None);
        let argv = epoch_command(&command, 0, &BaseId::FromCommand, &FLAGS);
        assert_eq!(argv, with_drain_flags(&["envoy", "--base-id", "7", "-c", "b.yaml"], &["--restart-epoch", "0"]));

        let command = args(&["envoy", "--use-dynamic-base-id", "--base-id-path", "/mine", "--restart-epoch", "0"]);
        assert_eq!(base_id_file(&command, Path::new("/x")), Some("/mine".into()));
        let argv = epoch_command(&command, 0, &BaseId::Dynamic("/mine".into()), &FLAGS);
        let tail = ["--restart-epoch", "0", "--use-dynamic-base-id", "--base-id-path", "/mine"];
        assert_eq!(argv, with_drain_flags(&["envoy"], &tail));
    }

    #[test]
    fn a_new_family_replaces_any_base_id_with_its_own() {
        for command in [&["envoy", "--base-id", "7"][..], &["envoy", "--use-dynamic-base-id", "--base-id-path=/mine"]] {
            let argv = epoch_command(&args(command), 0, &BaseId::Dynamic("/run/s/family-1".into()), &FLAGS);
            let tail = ["--restart-epoch", "0", "--use-dynamic-base-id", "--base-id-path", "/run/s/family-1"];
            assert_eq!(argv, with_drain_flags(&["envoy"], &tail), "{command:?}");
        }
    }

    #[test]
    fn keeps_the_users_drain_flags() {
        let command = args(&["envoy", "--drain-time-s", "5", "--drain-strategy", "gradual", "--base-id", "1"]);
        let argv = epoch_command(&command, 0, &BaseId::FromCommand, &FLAGS);
        let expected = [
            "envoy",
            "--drain-time-s",
            "5",
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
    fn the_worker_count_is_added_unless_the_command_chooses_it() {
        let flags = EnvoyFlags { concurrency: Some(2), ..FLAGS };
        for epoch in [0, 3] {
            let argv =
                epoch_command(&args(&["envoy", "-c", "b.yaml", "--base-id", "1"]), epoch, &BaseId::FromCommand, &flags);
            let position = argv.iter().position(|a| a == "--concurrency").expect("--concurrency added");
            assert_eq!(argv[position + 1], "2", "{argv:?}");
        }
        for own in [&["--concurrency", "3"][..], &["--concurrency=3"], &["--cpuset-threads"]] {
            let command = args(&[&["envoy", "--base-id", "1"][..], own].concat());
            let argv = epoch_command(&command, 0, &BaseId::FromCommand, &flags);
            let given: Vec<_> = argv.iter().filter(|a| a.to_string_lossy().starts_with("--c")).collect();
            assert_eq!(given.len(), 1, "only the command's own: {argv:?}");
        }
    }

    #[test]
    fn later_epochs_reuse_the_picked_base_id() {
        let command = args(&["envoy", "-c", "b.yaml", "--use-dynamic-base-id", "--base-id-path", "/mine"]);
        let argv = epoch_command(&command, 2, &BaseId::Picked(41), &FLAGS);
        assert_eq!(argv, with_drain_flags(&["envoy", "-c", "b.yaml"], &["--restart-epoch", "2", "--base-id", "41"]));
    }

    #[test]
    fn validation_runs_without_hot_restart_flags() {
        let command =
            args(&["envoy", "-c", "b.yaml", "--base-id", "4", "--restart-epoch", "3", "--use-dynamic-base-id"]);
        assert_eq!(validate_command(&command), args(&["envoy", "-c", "b.yaml", "--mode", "validate"]));
        assert_eq!(flag_value(&args(&["a", "--x=1", "--x", "2"]), &["--x"]), Some("2".into()));
        assert_eq!(flag_value(&args(&["a", "--x=1"]), &["--x"]), Some("1".into()));
        assert_eq!(config_path(&args(&["a", "-c", "x", "--config-path=y"])), Some("y".into()));
        assert_eq!(config_path(&args(&["a", "--config-path", "y", "-c=z"])), Some("z".into()));
        assert_eq!(config_path(&args(&["a", "-cx"])), None);
    }

    #[test]
    fn flag_match_is_exact() {
        assert!(has_flag(&args(&["--base-id", "1"]), "--base-id"));
        assert!(has_flag(&args(&["--base-id=1"]), "--base-id"));
        assert!(!has_flag(&args(&["--base-id-path", "/p"]), "--base-id"));
    }

    #[test]
    fn an_admin_is_given_through_config_yaml_merged_with_the_users() {
        let socket = Path::new("/run/s/admin.sock");
        let argv = with_admin(&args(&["envoy", "-c", "b.yaml"]), socket).expect("merged");
        let expected = r#"{"admin":{"address":{"pipe":{"path":"/run/s/admin.sock"}}}}"#;
        assert_eq!(argv, args(&["envoy", "-c", "b.yaml", "--config-yaml", expected]));
        let users = args(&["envoy", "-c", "b.yaml", "--config-yaml", "stats_flush_interval: 7s"]);
        let argv = with_admin(&users, socket).expect("merged");
        assert_eq!(argv.iter().filter(|a| *a == "--config-yaml").count(), 1, "one --config-yaml only: {argv:?}");
        let merged: serde_json::Value = serde_json::from_str(&argv[4].to_string_lossy()).expect("json");
        assert_eq!(merged["stats_flush_interval"], "7s");
        assert_eq!(merged["admin"]["address"]["pipe"]["path"], "/run/s/admin.sock");
        assert!(with_admin(&args(&["envoy", "--config-yaml", "[unclosed"]), socket).is_err());
    }
}
