//! Which file an Envoy binary is, so that an upgrade shows as a change.

use std::time::SystemTime;

/// Which file an Envoy binary is: an upgrade (a new file at the same path, or a path that now
/// points elsewhere) shows as a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryId {
    device: u64,
    inode: u64,
    modified: Option<SystemTime>,
    size: u64,
}

impl BinaryId {
    /// The file `program` runs, found as exec would; None when there is none.
    pub fn of(program: &std::ffi::OsStr) -> Option<BinaryId> {
        use std::os::unix::fs::MetadataExt;
        let metadata = std::fs::metadata(crate::process::find_program(program)?).ok()?;
        Some(BinaryId {
            device: metadata.dev(),
            inode: metadata.ino(),
            modified: metadata.modified().ok(),
            size: metadata.size(),
        })
    }
}
