//! The user Envoy runs as (`--envoy-user USER[:GROUP]`): resolved once at start, in the launcher,
//! because the child between fork and exec may call nothing that reads /etc/passwd or allocates;
//! and whether that user can read a file, judged from permission bits as the kernel would.

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::unistd::{Gid, Group, Uid, User};

/// A resolved user: the ids the child takes before exec, and a name for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyUser {
    pub uid: Uid,
    pub gid: Gid,
    /// The supplementary groups (`getgrouplist` of the user's name and `gid`, as `initgroups` would
    /// set them); just `gid` for a uid without a passwd entry.
    pub groups: Vec<Gid>,
    /// `nobody (uid 65534, gid 65534)`, for messages.
    pub label: String,
}

/// A file the Envoy user cannot read (or run): one line naming the file, the user and the bits at
/// fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    #[error("{what} {} is not {able} by the Envoy user {user}: it cannot enter the directory {} ({bits})", path.display(), dir.display())]
    Directory {
        what: &'static str,
        able: Access,
        path: std::path::PathBuf,
        user: String,
        dir: std::path::PathBuf,
        bits: String,
    },
    #[error("{what} {} is not {able} by the Envoy user {user} ({bits})", path.display())]
    File { what: &'static str, able: Access, path: std::path::PathBuf, user: String, bits: String },
}

/// What the user must be able to do with a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Execute,
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Access::Read => "readable",
            Access::Execute => "executable",
        })
    }
}

impl EnvoyUser {
    /// Resolves `USER[:GROUP]`: names or numeric ids. Without GROUP, the user's primary group; a
    /// numeric uid without a passwd entry needs GROUP (there is no primary group to take).
    pub fn resolve(spec: &str) -> Result<EnvoyUser, String> {
        let (user, group) = match spec.split_once(':') {
            Some((user, group)) => (user, Some(group)),
            None => (spec, None),
        };
        if user.is_empty() || group == Some("") {
            return Err(format!("--envoy-user '{spec}': expected USER or USER:GROUP (names or numeric ids)"));
        }
        let entry = match user.parse::<u32>() {
            Ok(id) => User::from_uid(Uid::from_raw(id)),
            Err(_) => User::from_name(user),
        }
        .map_err(|e| format!("--envoy-user '{spec}': cannot read the user database: {e}"))?;
        let uid = match (&entry, user.parse::<u32>()) {
            (Some(entry), _) => entry.uid,
            (None, Ok(id)) => Uid::from_raw(id),
            (None, Err(_)) => return Err(format!("--envoy-user '{spec}': no user named '{user}'")),
        };
        let gid = match group {
            Some(group) => match group.parse::<u32>() {
                Ok(id) => Gid::from_raw(id),
                Err(_) => {
                    Group::from_name(group)
                        .map_err(|e| format!("--envoy-user '{spec}': cannot read the group database: {e}"))?
                        .ok_or_else(|| format!("--envoy-user '{spec}': no group named '{group}'"))?
                        .gid
                }
            },
            None => entry.as_ref().map(|e| e.gid).ok_or_else(|| {
                format!("--envoy-user '{spec}': uid {user} has no passwd entry, so no primary group: give USER:GROUP")
            })?,
        };
        let groups = match &entry {
            Some(entry) => {
                let name = CString::new(entry.name.as_str()).map_err(|e| format!("--envoy-user '{spec}': {e}"))?;
                nix::unistd::getgrouplist(&name, gid)
                    .map_err(|e| format!("--envoy-user '{spec}': cannot list the groups of {}: {e}", entry.name))?
            }
            None => vec![gid],
        };
        let name = entry.map_or_else(|| format!("uid {uid}"), |e| e.name);
        let label = format!("{name} (uid {uid}, gid {gid})");
        Ok(EnvoyUser { uid, gid, groups, label })
    }

    /// Whether the launcher itself is this user: then nothing needs to change in the child.
    pub fn is_launcher(&self) -> bool {
        self.uid == Uid::effective() && self.gid == Gid::effective()
    }

    /// Refuses a `path` this user cannot read (or a directory on the way that it cannot search),
    /// in one line naming the file, the user and the bits at fault. Decided from permission bits
    /// and owners: a file with an ACL is left to Envoy (the bits alone do not tell), as is root,
    /// which reads everything. Both the path as given and the one its symbolic links lead to are
    /// checked (a Kubernetes volume's `..data` link), as the kernel walks both.
    pub fn check_readable(&self, what: &'static str, path: &Path) -> Result<(), Unreadable> {
        self.check_access(what, path, Access::Read)
    }

    /// Refuses a program this user cannot run, as `check_readable` does: before a spawn whose
    /// exec would fail with only "permission denied".
    pub fn check_executable(&self, what: &'static str, path: &Path) -> Result<(), Unreadable> {
        self.check_access(what, path, Access::Execute)
    }

    fn check_access(&self, what: &'static str, path: &Path, able: Access) -> Result<(), Unreadable> {
        let want = match able {
            Access::Read => 0o4,
            Access::Execute => 0o1,
        };
        if self.uid.is_root() {
            return Ok(());
        }
        let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        for dir in path.ancestors().skip(1).chain(real.ancestors().skip(1)) {
            if dir.as_os_str().is_empty() {
                continue;
            }
            if let Some(bits) = self.missing(dir, 0o1) {
                let (path, user, dir) = (path.to_path_buf(), self.label.clone(), dir.to_path_buf());
                return Err(Unreadable::Directory { what, able, path, user, dir, bits });
            }
        }
        match self.missing(&real, want) {
            Some(bits) => {
                Err(Unreadable::File { what, able, path: path.to_path_buf(), user: self.label.clone(), bits })
            }
            None => Ok(()),
        }
    }

    /// Whether `want` (0o4 read, 0o1 search or execute) is denied on `path`: the mode and owners that deny it.
    /// None when granted, or when the bits cannot tell (an ACL, a file that cannot be read at all).
    fn missing(&self, path: &Path, want: u32) -> Option<String> {
        let meta = std::fs::metadata(path).ok()?;
        if has_acl(path) {
            return None;
        }
        let mode = meta.mode();
        let granted = if meta.uid() == self.uid.as_raw() {
            (mode >> 6) & want
        } else if self.groups.iter().chain([&self.gid]).any(|g| g.as_raw() == meta.gid()) {
            (mode >> 3) & want
        } else {
            mode & want
        };
        (granted == 0).then(|| format!("mode {:04o}, owner {}:{}", mode & 0o7777, meta.uid(), meta.gid()))
    }
}

/// Whether `path` carries a POSIX access ACL, which the mode bits do not show whole.
fn has_acl(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: getxattr with a null buffer and size 0 only returns the attribute's size; both
    // strings are NUL-terminated and live across the call.
    let size = unsafe { libc::getxattr(path.as_ptr(), c"system.posix_acl_access".as_ptr(), std::ptr::null_mut(), 0) };
    size > 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn nobody() -> EnvoyUser {
        let gid = Gid::from_raw(65534);
        EnvoyUser { uid: Uid::from_raw(65534), gid, groups: vec![gid], label: "nobody (uid 65534, gid 65534)".into() }
    }

    #[test]
    fn names_and_numeric_ids_resolve() {
        let root = EnvoyUser::resolve("root").expect("root");
        assert_eq!((root.uid.as_raw(), root.gid.as_raw()), (0, 0));
        assert_eq!(root.label, "root (uid 0, gid 0)");
        let numeric = EnvoyUser::resolve("0:0").expect("0:0");
        assert_eq!((numeric.uid.as_raw(), numeric.gid.as_raw()), (0, 0));
        let unknown = EnvoyUser::resolve("4242:4343").expect("ids without entries");
        assert_eq!(
            (unknown.uid.as_raw(), unknown.gid.as_raw(), unknown.groups.clone()),
            (4242, 4343, vec![4343.into()])
        );
        assert_eq!(unknown.label, "uid 4242 (uid 4242, gid 4343)");
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let no_user = EnvoyUser::resolve("no-such-user-sesame").expect_err("unknown name");
        assert!(no_user.contains("no user named 'no-such-user-sesame'"), "{no_user}");
        let no_group = EnvoyUser::resolve("root:no-such-group-sesame").expect_err("unknown group");
        assert!(no_group.contains("no group named 'no-such-group-sesame'"), "{no_group}");
        let no_primary = EnvoyUser::resolve("4242").expect_err("no passwd entry");
        assert!(no_primary.contains("give USER:GROUP"), "{no_primary}");
        assert!(EnvoyUser::resolve(":1").is_err() && EnvoyUser::resolve("1:").is_err());
    }

    #[test]
    fn readability_follows_owner_group_and_other_bits() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "x").expect("key");
        let user = nobody();
        let chmod = |mode| std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).expect("chmod");
        chmod(0o644);
        assert_eq!(user.check_readable("private key", &key), Ok(()));
        chmod(0o600);
        let refused = user.check_readable("private key", &key).expect_err("0600 root").to_string();
        let expected = format!(
            "private key {} is not readable by the Envoy user nobody (uid 65534, gid 65534) (mode 0600, owner 0:0)",
            key.display()
        );
        assert_eq!(refused, expected);
        // The group bits count for a member of the file's group.
        chmod(0o640);
        nix::unistd::chown(&key, None, Some(Gid::from_raw(65534))).expect("chgrp");
        assert_eq!(user.check_readable("private key", &key), Ok(()));
        // A directory on the way that the user cannot search.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let refused = user.check_readable("private key", &key).expect_err("closed directory").to_string();
        assert!(refused.contains(&format!("cannot enter the directory {}", dir.path().display())), "{refused}");
    }

    #[test]
    fn a_program_in_a_directory_the_user_cannot_enter_is_named_with_the_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let program = dir.path().join("envoy");
        std::fs::write(&program, "#!/bin/sh\n").expect("program");
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let user = nobody();
        let refused = user.check_executable("the Envoy binary", &program).expect_err("closed").to_string();
        let expected = format!(
            "the Envoy binary {} is not executable by the Envoy user nobody (uid 65534, gid 65534): it cannot enter \
             the directory {} (mode 0700, owner 0:0)",
            program.display(),
            dir.path().display()
        );
        assert_eq!(refused, expected);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(user.check_executable("the Envoy binary", &program), Ok(()));
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o744)).expect("chmod");
        assert!(user.check_executable("the Envoy binary", &program).is_err(), "no x bit for others");
    }
}
