//! The launcher's own files: private directories for keys and sockets, and files replaced whole.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use anyhow::Context;

/// A hash of a file's content, to tell a change from a touch (not a cryptographic one).
pub fn content_hash(bytes: &[u8]) -> u64 {
    use std::hash::{DefaultHasher, Hasher};
    let mut hasher = DefaultHasher::new();
    hasher.write(bytes);
    hasher.finish()
}

/// `content_hash` of a file's content, read in pieces through a buffer on the stack: the watcher
/// reads thousands of files at start, and a heap buffer for each, freed between the records it
/// keeps, would leave the launcher's heap in holes. Blocking.
pub fn content_hash_of_file(path: &Path) -> std::io::Result<u64> {
    use std::hash::{DefaultHasher, Hasher};
    use std::io::Read;
    let mut file = fs::File::open(path)?;
    let (mut hasher, mut buffer) = (DefaultHasher::new(), [0u8; 16 * 1024]);
    loop {
        match file.read(&mut buffer) {
            Ok(0) => return Ok(hasher.finish()),
            Ok(read) => hasher.write(&buffer[..read]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Creates `dir` and its parents, readable by the owner only (it holds keys and sockets). One that
/// exists already must be ours and writable by nobody else, or another user could plant files there.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    let meta = fs::symlink_metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    if meta.file_type().is_symlink() {
        anyhow::bail!(
            "directory {} is not safe for keys and sockets: it is a symbolic link (give the directory it points to)",
            dir.display()
        );
    }
    let euid = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != euid || meta.mode() & 0o022 != 0 {
        anyhow::bail!(
            "directory {} is not safe for keys and sockets: it must be a directory owned by uid {euid} \
             and writable by no one else (found uid {}, mode {:o})",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

/// Creates `dir` (one level, inside a private directory) for another user, `uid:gid` with mode
/// 0700: what Envoy writes when it runs as that user. An existing one is taken over again (the
/// user may have changed), never through a symbolic link.
pub fn create_owned_dir(dir: &Path, uid: nix::unistd::Uid, gid: nix::unistd::Gid) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(e).with_context(|| format!("cannot create the directory {}", dir.display()));
        }
        _ => {}
    }
    let meta = fs::symlink_metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    if !meta.is_dir() {
        anyhow::bail!("{} must be a directory (found a {:?})", dir.display(), meta.file_type());
    }
    std::os::unix::fs::lchown(dir, Some(uid.as_raw()), Some(gid.as_raw()))
        .with_context(|| format!("cannot give {} to uid {uid}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set the mode of {}", dir.display()))
}

/// Replaces `path` by rename, so that Envoy (or a watcher) never sees half a file.
pub fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    // A leftover (or planted) temporary file or symlink is removed, never written through.
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(contents).with_context(|| format!("cannot write {}", tmp.display()))?;
    file.sync_all().with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_read_in_pieces_hashes_as_its_whole_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Longer than the buffer, and not a multiple of it or of the hasher's 8-byte words.
        let bytes: Vec<u8> = (0..40_003u32).map(|i| (i * 7 % 251) as u8).collect();
        for length in [0, 1, 7, 16 * 1024, 16 * 1024 + 1, bytes.len()] {
            let path = dir.path().join(format!("f{length}"));
            fs::write(&path, &bytes[..length]).expect("write");
            assert_eq!(content_hash_of_file(&path).expect("read"), content_hash(&bytes[..length]), "{length} bytes");
        }
        assert!(content_hash_of_file(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = dir.path().join("shared");
        fs::create_dir(&shared).expect("mkdir");
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = create_private_dir(&shared).expect_err("world-writable");
        assert!(format!("{err}").contains("is not safe"), "{err}");
        assert!(create_private_dir(&dir.path().join("new/private")).is_ok());
    }
}
