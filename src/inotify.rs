//! Directory watches on inotify, read by a task on the runtime's thread. Adding a watch is one system
//! call on the caller's thread: no watcher thread to start and wait for, which the file watcher,
//! set up before epoch 0 is spawned, would otherwise add to Envoy's start.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;

/// What is asked of the kernel: every change to a name or a content in the directory, and the
/// directory's own removal. Opens and closes are left out: a reader (Envoy loading its
/// certificates) is no change, and a writer's content changes come as IN_MODIFY.
const MASK: AddWatchFlags = AddWatchFlags::IN_MODIFY
    .union(AddWatchFlags::IN_ATTRIB)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_CREATE)
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF);

/// One event: the path it names (an entry of a watched directory, or the directory itself), or
/// an overflow of the kernel's queue, after which anything may have changed.
#[derive(Debug)]
pub enum Change {
    Path { path: PathBuf },
    Overflow,
}

struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Watches directories, not recursively.
pub struct DirWatcher {
    fd: AsyncFd<Fd>,
    dirs: Mutex<HashMap<WatchDescriptor, PathBuf>>,
}

impl DirWatcher {
    /// Must be called within the tokio runtime (the descriptor is registered with it).
    pub fn new() -> std::io::Result<DirWatcher> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // SAFETY: `Fd` owns the inotify descriptor, which stays open and unchanged for as long as
        // the AsyncFd that holds it lives.
        let fd = unsafe { AsyncFd::register(Fd(inotify)) }.map_err(|e| e.into_parts().1)?;
        Ok(DirWatcher { fd, dirs: Mutex::default() })
    }

    /// Watches `dir` (again, after it was removed and created anew).
    pub fn watch(&self, dir: &Path) -> std::io::Result<()> {
        let wd = self.fd.get_ref().0.add_watch(dir, MASK)?;
        self.dirs.lock().unwrap_or_else(|p| p.into_inner()).insert(wd, dir.to_path_buf());
        Ok(())
    }

    /// The next events, as many as the kernel has queued (at least one).
    pub async fn next(&self) -> std::io::Result<Vec<Change>> {
        loop {
            let mut ready = self.fd.readable().await?;
            match ready.try_io(|fd| fd.get_ref().0.read_events().map_err(std::io::Error::from)) {
                Ok(events) => return Ok(self.changes(events?)),
                Err(_would_block) => continue,
            }
        }
    }

    fn changes(&self, events: Vec<nix::sys::inotify::InotifyEvent>) -> Vec<Change> {
        let mut dirs = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
        let mut changes = Vec::with_capacity(events.len());
        for event in events {
            if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                changes.push(Change::Overflow);
                continue;
            }
            let Some(dir) = dirs.get(&event.wd) else { continue };
            let path = match &event.name {
                Some(name) => dir.join(name),
                None => dir.clone(),
            };
            // The kernel dropped the watch (its directory is gone): a later one may reuse the number.
            if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                dirs.remove(&event.wd);
                continue;
            }
            changes.push(Change::Path { path });
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_the_changed_entry_and_skips_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let watcher = DirWatcher::new().expect("inotify");
        watcher.watch(dir.path()).expect("watch");
        let file = dir.path().join("cert.pem");
        std::fs::write(&file, "one").expect("write");
        let _ = std::fs::read(&file).expect("read");
        let changes = watcher.next().await.expect("events");
        let paths: Vec<&PathBuf> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Path { path, .. } => Some(path),
                Change::Overflow => None,
            })
            .collect();
        assert!(!paths.is_empty() && paths.iter().all(|p| **p == file), "{changes:?}");
    }
}
