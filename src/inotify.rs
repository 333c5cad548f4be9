//! Directory watches on inotify, read by a task on the runtime's thread. Adding a watch is one system
//! call on the caller's thread: no watcher thread to start and wait for, which the file watcher,
//! set up before epoch 0 is spawned, would otherwise add to Envoy's start.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
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

/// The directories watched, both ways: events name their watch, and a path is watched again when
/// its inode changed. One watch may stand for several paths: the kernel has one watch per inode,
/// and a directory reached by two spellings (a symlink to it, `/run` and `/var/run`, a bind mount
/// seen at both places) is one inode; its events are named under each.
#[derive(Default)]
struct Watches {
    dirs: HashMap<WatchDescriptor, Vec<PathBuf>>,
    /// The watch on each path, and the (device, inode) it was added for.
    paths: HashMap<PathBuf, (WatchDescriptor, (u64, u64))>,
}

impl Watches {
    /// Forgets the watch `wd`: its directory is gone from its paths, and each must be watched
    /// again (a new inode) once something is there.
    fn forget(&mut self, wd: WatchDescriptor) {
        for dir in self.dirs.remove(&wd).unwrap_or_default() {
            if self.paths.get(&dir).is_some_and(|(watched, _)| *watched == wd) {
                self.paths.remove(&dir);
            }
        }
    }

    /// `dir` is no longer watched by `wd`; true when `wd` stands for no path any more.
    fn unname(&mut self, wd: WatchDescriptor, dir: &Path) -> bool {
        let Some(named) = self.dirs.get_mut(&wd) else { return false };
        named.retain(|d| d != dir);
        if named.is_empty() {
            self.dirs.remove(&wd);
            return true;
        }
        false
    }
}

/// Watches directories, not recursively.
pub struct DirWatcher {
    fd: AsyncFd<Fd>,
    watches: Mutex<Watches>,
}

impl DirWatcher {
    /// Must be called within the tokio runtime (the descriptor is registered with it).
    pub fn new() -> std::io::Result<DirWatcher> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // SAFETY: `Fd` owns the inotify descriptor, which stays open and unchanged for as long as
        // the AsyncFd that holds it lives.
        let fd = unsafe { AsyncFd::register(Fd(inotify)) }.map_err(|e| e.into_parts().1)?;
        Ok(DirWatcher { fd, watches: Mutex::default() })
    }

    /// Watches `dir`; again when the directory at that path is not the one watched (it was removed
    /// or moved away, and another put there): inotify watches an inode, not a path. Cheap when
    /// nothing changed (one `stat`), so it can be called for every directory after each debounce.
    /// True when a watch was added: the directory at that path is not the one watched before.
    pub fn watch(&self, dir: &Path) -> std::io::Result<bool> {
        // The inode is read before the watch is added: if the directory is swapped in between, the
        // next call sees an inode that differs and adds the watch again (the kernel's answer for
        // an inode already watched is its existing watch).
        let meta = std::fs::metadata(dir)?;
        let inode = (meta.dev(), meta.ino());
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        if watches.paths.get(dir).is_some_and(|(_, watched)| *watched == inode) {
            return Ok(false);
        }
        let inotify = &self.fd.get_ref().0;
        let wd = inotify.add_watch(dir, MASK)?;
        if let Some((old, _)) = watches.paths.insert(dir.to_path_buf(), (wd, inode))
            && old != wd
            && watches.unname(old, dir)
        {
            // The directory that was at this path lives on elsewhere, and no other watched path
            // leads to it: its events would be named wrongly. Its IN_IGNORED, unknown by then, is
            // skipped.
            let _ = inotify.rm_watch(old);
        }
        let named = watches.dirs.entry(wd).or_default();
        if !named.iter().any(|d| d == dir) {
            named.push(dir.to_path_buf());
        }
        Ok(true)
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
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let mut changes = Vec::with_capacity(events.len());
        for event in events {
            if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                changes.push(Change::Overflow);
                continue;
            }
            let Some(dirs) = watches.dirs.get(&event.wd) else { continue };
            let paths: Vec<PathBuf> = dirs
                .iter()
                .map(|dir| match &event.name {
                    Some(name) => dir.join(name),
                    None => dir.clone(),
                })
                .collect();
            // The directory left its path: removed (the kernel drops the watch, IN_IGNORED) or
            // moved away (the watch would follow it to its new name, so it is removed here). Either
            // way, its path is a change, and must be watched anew once a directory is there again.
            let gone = AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF | AddWatchFlags::IN_IGNORED;
            if event.mask.intersects(gone) {
                watches.forget(event.wd);
                if event.mask.contains(AddWatchFlags::IN_MOVE_SELF) {
                    let _ = self.fd.get_ref().0.rm_watch(event.wd);
                }
            }
            changes.extend(paths.into_iter().map(|path| Change::Path { path }));
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
        let changes = paths(&watcher.next().await.expect("events"));
        assert!(!changes.is_empty() && changes.iter().all(|p| *p == file), "{changes:?}");
    }

    fn paths(changes: &[Change]) -> Vec<PathBuf> {
        changes
            .iter()
            .filter_map(|c| match c {
                Change::Path { path } => Some(path.clone()),
                Change::Overflow => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_directory_moved_away_is_forgotten_and_its_successor_watched() {
        let root = tempfile::tempdir().expect("tempdir");
        let (certs, old, new) =
            (root.path().join("certs"), root.path().join("certs.old"), root.path().join("certs.new"));
        std::fs::create_dir(&certs).expect("mkdir");
        std::fs::create_dir(&new).expect("mkdir");
        let watcher = DirWatcher::new().expect("inotify");
        assert!(watcher.watch(&certs).expect("watch"), "a new watch");
        assert!(!watcher.watch(&certs).expect("watch"), "watching again what is watched is a no-op");
        std::fs::rename(&certs, &old).expect("mv aside");
        std::fs::rename(&new, &certs).expect("mv in");
        assert!(paths(&watcher.next().await.expect("events")).contains(&certs), "the move is a change");
        // The old directory, now elsewhere, is no longer heard; the new one is, once watched.
        std::fs::write(old.join("tls.crt"), "old").expect("write");
        assert!(watcher.watch(&certs).expect("watch the new inode"), "another directory at the path");
        let file = certs.join("tls.crt");
        std::fs::write(&file, "new").expect("write");
        let changes = paths(&watcher.next().await.expect("events"));
        assert!(!changes.is_empty() && changes.iter().all(|p| *p == file), "{changes:?}");
    }

    #[tokio::test]
    async fn a_directory_reached_by_two_spellings_is_heard_under_both() {
        let root = tempfile::tempdir().expect("tempdir");
        let (real, alias) = (root.path().join("real"), root.path().join("alias"));
        std::fs::create_dir(&real).expect("mkdir");
        std::os::unix::fs::symlink("real", &alias).expect("symlink");
        let watcher = DirWatcher::new().expect("inotify");
        assert!(watcher.watch(&real).expect("watch"));
        assert!(watcher.watch(&alias).expect("watch"));
        std::fs::write(real.join("p.crt"), "p").expect("write");
        let changes = paths(&watcher.next().await.expect("events"));
        assert!(changes.contains(&real.join("p.crt")), "named under its first spelling: {changes:?}");
        assert!(changes.contains(&alias.join("p.crt")), "and under its second: {changes:?}");
        // One spelling replaced by another directory: the other still hears the first.
        std::fs::remove_file(&alias).expect("rm the link");
        std::fs::create_dir(&alias).expect("mkdir");
        assert!(watcher.watch(&alias).expect("watch the new inode"), "another directory at the path");
        std::fs::write(real.join("q.crt"), "q").expect("write");
        let changes = paths(&watcher.next().await.expect("events"));
        assert!(changes.contains(&real.join("q.crt")), "{changes:?}");
        assert!(changes.iter().all(|p| p.starts_with(&real)), "nothing named under the other directory: {changes:?}");
    }
}
