//! Watching the files a hot restart depends on: the bootstrap, every file it references, and the
//! user's `--watch` paths. Directories are watched, not inodes, so that a rename into place, an
//! editor's replace and the Kubernetes `..data` symlink swap are all seen. After the debounce, the
//! contents are hashed: only a real change is reported (a touch is not). The first event of a
//! debounce is reported too, so that the checks of a reload can run while the files settle. The
//! watcher only reports to the callback it was given; it never restarts anything.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::bootstrap::{Bootstrap, BootstrapFiles};
use crate::inotify::{self, DirWatcher};

/// What to watch.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    /// The Envoy command, whose bootstrap (and the files it names) is watched; None with --no-auto-watch.
    pub envoy_command: Option<Vec<OsString>>,
    /// `--watch` paths: files, or directories whose files are all watched.
    pub extra: Vec<PathBuf>,
    /// Quiet time after the last change before it is reported.
    pub debounce: Duration,
    /// The longest wait from the first change, however busy the files stay.
    pub debounce_max: Duration,
}

/// Which paths count as a change: the watched files, anything in a `--watch` directory, the
/// `..data`-style entries of a Kubernetes volume next to a watched file (its symlink swap touches
/// only those), and the watched directories themselves (replaced whole, by `mv` or `rm -rf` and
/// `mkdir`). Anything else in a watched directory or its parent (an access log, say) is not a change.
#[derive(Debug, Default)]
struct Relevant {
    files: BTreeSet<PathBuf>,
    file_dirs: BTreeSet<PathBuf>,
    watch_dirs: BTreeSet<PathBuf>,
    dirs: BTreeSet<PathBuf>,
}

impl Relevant {
    fn new(spec: &WatchSpec, files: &[PathBuf]) -> Relevant {
        let absolute = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
        let files: BTreeSet<PathBuf> = files.iter().map(absolute).collect();
        let file_dirs = files.iter().filter_map(|f| f.parent().map(Path::to_path_buf)).collect();
        let watch_dirs = spec.extra.iter().filter(|p| p.is_dir()).map(absolute).collect();
        let dirs = spec.directories(&files.iter().cloned().collect::<Vec<_>>());
        Relevant { files, file_dirs, watch_dirs, dirs }
    }

    fn counts(&self, path: &Path) -> bool {
        let parent = path.parent();
        let volume_internal = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".."));
        self.files.contains(path)
            || self.dirs.contains(path)
            || parent.is_some_and(|dir| self.watch_dirs.contains(dir))
            || (volume_internal && parent.is_some_and(|dir| self.file_dirs.contains(dir)))
    }
}

/// What the watcher reports.
#[derive(Debug)]
pub enum Change {
    /// A watched file was touched: a debounce runs. Whether its content changed is not known yet.
    Begun,
    /// The debounce ended: the files whose content changed (none for a touch or a change undone).
    Settled(Vec<PathBuf>),
}

/// Content hash of each watched file; None when it cannot be read (missing, for instance).
type Snapshot = BTreeMap<PathBuf, Option<u64>>;

impl WatchSpec {
    /// The files watched now: re-read each time, since the bootstrap may name new ones.
    pub fn files(&self) -> Vec<PathBuf> {
        self.files_with(None)
    }

    /// `files`, with the bootstrap's files taken from `read` (what the launcher read at start)
    /// instead of parsing it again.
    fn files_with(&self, read: Option<&BootstrapFiles>) -> Vec<PathBuf> {
        let mut files = BTreeSet::new();
        if let Some(command) = &self.envoy_command {
            // The bootstrap is watched even when it does not parse: its repair must be seen.
            files.extend(self.bootstrap_path());
            match read {
                Some(read) => files.extend(read.referenced.iter().cloned()),
                None => {
                    if let Ok(Some(bootstrap)) = Bootstrap::from_command(command) {
                        files.extend(bootstrap.referenced_files());
                    }
                }
            }
        }
        for path in &self.extra {
            if path.is_dir() {
                files.extend(files_in(path));
            } else {
                files.insert(path.clone());
            }
        }
        files.into_iter().collect()
    }

    /// The `-c` file of the Envoy command.
    fn bootstrap_path(&self) -> Option<PathBuf> {
        crate::envoy::config_path(self.envoy_command.as_ref()?)
    }

    /// The directories to watch for `files`, and the `--watch` directories themselves; absolute,
    /// since an event is named by the path its watch was added for.
    fn directories(&self, files: &[PathBuf]) -> BTreeSet<PathBuf> {
        let mut dirs: BTreeSet<PathBuf> = files.iter().filter_map(|f| absolute_parent(f)).collect();
        dirs.extend(self.extra.iter().filter(|p| p.is_dir()).filter_map(|p| std::path::absolute(p).ok()));
        dirs
    }

    pub fn is_empty(&self) -> bool {
        self.envoy_command.is_none() && self.extra.is_empty()
    }
}

fn absolute_parent(file: &Path) -> Option<PathBuf> {
    let parent = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::path::absolute(parent).ok()
}

/// The regular files directly in `dir` (symlinks followed), without the `..data`-style entries of
/// a Kubernetes volume, which are reached through the visible names anyway.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    entries
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with(".."))
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect()
}

fn snapshot(files: &[PathBuf]) -> Snapshot {
    files
        .iter()
        .map(|file| {
            let hash = std::fs::read(file).ok().map(|bytes| crate::files::content_hash(&bytes));
            (file.clone(), hash)
        })
        .collect()
}

/// The files whose content differs between two snapshots (added, removed or changed).
fn changed(before: &Snapshot, after: &Snapshot) -> Vec<PathBuf> {
    let keys: BTreeSet<&PathBuf> = before.keys().chain(after.keys()).collect();
    keys.into_iter().filter(|k| before.get(*k) != after.get(*k)).cloned().collect()
}

/// Starts watching; each debounce is handed to `report`: `Begun` at its first event and at each
/// event during it, `Settled` with the files whose content changed at its end. Watching ends when
/// `report` returns false. The directories are watched and the files hashed before this returns:
/// a change made afterwards is seen. `read` is what the launcher read of the bootstrap at start:
/// used unless the bootstrap's content differs from what it was read from.
pub fn start(
    spec: WatchSpec,
    read: Option<&BootstrapFiles>,
    mut report: impl FnMut(Change) -> bool + Send + 'static,
) -> std::io::Result<()> {
    let watcher = DirWatcher::new()?;
    let mut files = spec.files_with(read);
    let mut dirs = spec.directories(&files);
    watch_directories(&watcher, &dirs);
    let mut last = snapshot(&files);
    if read.is_some_and(|read| !read_from(read, spec.bootstrap_path(), &last)) {
        // Changed since the launcher read it (and watched from before this read): read it again.
        files = spec.files();
        dirs = spec.directories(&files);
        watch_directories(&watcher, &dirs);
        last = snapshot(&files);
    }
    let mut relevant = Relevant::new(&spec, &files);
    tracing::info!("watching {} files in {} directories for changes", files.len(), dirs.len());
    tracing::debug!("watched files: {files:?}");

    tokio::spawn(async move {
        loop {
            if let Err(e) = next_relevant(&watcher, &relevant).await {
                tracing::warn!("cannot read file changes any more ({e}): hot restarts only on SIGHUP");
                return;
            }
            if !report(Change::Begun) {
                return;
            }
            // Debounce: wait until the watched files have been quiet for the debounce time, but
            // never longer than the cap from the first change.
            let cap = tokio::time::sleep(spec.debounce_max);
            tokio::pin!(cap);
            loop {
                tokio::select! {
                    more = next_relevant(&watcher, &relevant) => {
                        if more.is_err() || !report(Change::Begun) {
                            return;
                        }
                    }
                    _ = tokio::time::sleep(spec.debounce) => break,
                    _ = &mut cap => break,
                }
            }
            // A directory replaced during the debounce is watched anew before its files are
            // hashed: a write after the hash is then seen, and one before it is in the hash.
            watch_directories(&watcher, &dirs);
            let spec_now = spec.clone();
            let Ok((files, current)) = tokio::task::spawn_blocking(move || {
                let files = spec_now.files();
                let current = snapshot(&files);
                (files, current)
            })
            .await
            else {
                continue;
            };
            dirs = spec.directories(&files);
            watch_directories(&watcher, &dirs);
            relevant = Relevant::new(&spec, &files);
            let changed = changed(&last, &current);
            last = current;
            if !report(Change::Settled(changed)) {
                return;
            }
        }
    });
    Ok(())
}

/// Whether `read` was read from the bootstrap `path` as `snapshot` found it (a file that was not
/// read, a protobuf say, has nothing to differ from).
fn read_from(read: &BootstrapFiles, path: Option<PathBuf>, snapshot: &Snapshot) -> bool {
    match (read.content_hash, path) {
        (Some(hash), Some(path)) => snapshot.get(&path) == Some(&Some(hash)),
        _ => true,
    }
}

/// Waits for an event on what is watched (the hashes decide after the debounce): a busy neighbour
/// in the same directory must not hold the debounce open. After an overflow anything may have
/// changed.
async fn next_relevant(watcher: &DirWatcher, relevant: &Relevant) -> std::io::Result<()> {
    loop {
        let changes = watcher.next().await?;
        let counts = |change: &inotify::Change| match change {
            inotify::Change::Path { path, .. } => relevant.counts(path),
            inotify::Change::Overflow => true,
        };
        if changes.iter().any(counts) {
            return Ok(());
        }
    }
}

/// Watches `dirs` and their parents (again where a directory was replaced: see
/// `DirWatcher::watch`). A directory's own watch ends with it; the parent's sees another created or
/// moved in at its path, whose files the hash after the debounce then reads.
fn watch_directories(watcher: &DirWatcher, dirs: &BTreeSet<PathBuf>) {
    let parents: BTreeSet<&Path> = dirs.iter().filter_map(|d| d.parent()).collect();
    for dir in dirs {
        if let Err(e) = watcher.watch(dir) {
            tracing::warn!("cannot watch {}: {e}", dir.display());
        }
    }
    for parent in parents.into_iter().filter(|p| !dirs.contains(*p)) {
        if let Err(e) = watcher.watch(parent) {
            tracing::debug!("cannot watch {} for its watched directories: {e}", parent.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_content_changes_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "one").expect("write");
        std::fs::write(&b, "two").expect("write");
        let files = vec![a.clone(), b.clone()];
        let before = snapshot(&files);
        std::fs::write(&a, "one").expect("rewrite, same content");
        assert!(changed(&before, &snapshot(&files)).is_empty());
        std::fs::write(&b, "three").expect("write");
        std::fs::remove_file(&a).expect("rm");
        assert_eq!(changed(&before, &snapshot(&files)), vec![a, b]);
    }

    #[test]
    fn watch_directories_hide_kubernetes_internals() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("..2026_11_27");
        std::fs::create_dir(&data).expect("mkdir");
        std::fs::write(data.join("tls.crt"), "x").expect("write");
        std::os::unix::fs::symlink("..2026_11_27", dir.path().join("..data")).expect("symlink");
        std::os::unix::fs::symlink("..data/tls.crt", dir.path().join("tls.crt")).expect("symlink");
        assert_eq!(files_in(dir.path()), vec![dir.path().join("tls.crt")]);
    }

    #[test]
    fn only_watched_paths_and_volume_swaps_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let extra = dir.path().join("extra");
        std::fs::create_dir(&extra).expect("mkdir");
        let spec = WatchSpec {
            envoy_command: None,
            extra: vec![extra.clone()],
            debounce: Duration::from_millis(500),
            debounce_max: Duration::from_secs(5),
        };
        let cert = dir.path().join("certs/tls.crt");
        let relevant = Relevant::new(&spec, std::slice::from_ref(&cert));
        assert!(relevant.counts(&cert));
        assert!(relevant.counts(&dir.path().join("certs/..data")), "a Kubernetes symlink swap");
        assert!(relevant.counts(&dir.path().join("certs/..2026_11_27_10_00_00.123")));
        assert!(!relevant.counts(&dir.path().join("certs/access.log")), "a busy neighbour");
        assert!(!relevant.counts(&dir.path().join("certs/tls.crt.swp")));
        assert!(relevant.counts(&extra.join("anything")), "a --watch directory counts whole");
        assert!(!relevant.counts(&extra.join("sub/deeper")), "not recursive");
    }

    #[test]
    fn the_bootstrap_read_at_start_is_used_while_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bootstrap = dir.path().join("envoy.yaml");
        let cert = dir.path().join("tls.crt");
        std::fs::write(&bootstrap, format!("x: {{ filename: {} }}\n", cert.display())).expect("write");
        let spec = WatchSpec {
            envoy_command: Some(vec!["envoy".into(), "-c".into(), bootstrap.clone().into()]),
            extra: vec![],
            debounce: Duration::from_millis(500),
            debounce_max: Duration::from_secs(5),
        };
        let read = Bootstrap::from_command(spec.envoy_command.as_ref().unwrap()).expect("parse").expect("some").files();
        assert_eq!(spec.files_with(Some(&read)), spec.files());
        assert!(read_from(&read, spec.bootstrap_path(), &snapshot(&spec.files())));
        std::fs::write(&bootstrap, "x: {}\n").expect("rewrite");
        assert!(!read_from(&read, spec.bootstrap_path(), &snapshot(&spec.files())), "changed since it was read");
    }

    #[test]
    fn a_broken_bootstrap_is_still_watched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bootstrap = dir.path().join("envoy.yaml");
        std::fs::write(&bootstrap, "admin: [unclosed\n").expect("write");
        let spec = WatchSpec {
            envoy_command: Some(vec!["envoy".into(), "-c".into(), bootstrap.clone().into()]),
            extra: vec![],
            debounce: Duration::from_millis(500),
            debounce_max: Duration::from_secs(5),
        };
        assert_eq!(spec.files(), vec![bootstrap]);
    }

    /// The files of the next `Settled` report, within 5 s.
    async fn settled(reports: &mut tokio::sync::mpsc::UnboundedReceiver<Change>) -> Vec<PathBuf> {
        let next = async {
            loop {
                if let Some(Change::Settled(files)) = reports.recv().await {
                    return files;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), next).await.expect("a settled change within 5 s")
    }

    #[tokio::test]
    async fn a_directory_replaced_whole_is_seen_and_so_are_writes_into_its_successor() {
        let root = tempfile::tempdir().expect("tempdir");
        let certs = root.path().join("certs");
        std::fs::create_dir(&certs).expect("mkdir");
        let file = certs.join("tls.crt");
        std::fs::write(&file, "one").expect("write");
        let spec = WatchSpec {
            envoy_command: None,
            extra: vec![file.clone()],
            debounce: Duration::from_millis(50),
            debounce_max: Duration::from_secs(1),
        };
        let (tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
        start(spec, None, move |change| tx.send(change).is_ok()).expect("start");
        for (n, swap) in ["mv", "rm"].into_iter().enumerate() {
            // Replaced whole: `mv certs certs.old; mv certs.new certs`, or `rm -rf certs; mkdir certs`.
            if swap == "mv" {
                let new = root.path().join("certs.new");
                std::fs::create_dir(&new).expect("mkdir");
                std::fs::write(new.join("tls.crt"), swap).expect("write");
                std::fs::rename(&certs, root.path().join(format!("certs.old{n}"))).expect("mv aside");
                std::fs::rename(&new, &certs).expect("mv in");
            } else {
                std::fs::remove_dir_all(&certs).expect("rm -rf");
                std::fs::create_dir(&certs).expect("mkdir");
                std::fs::write(&file, swap).expect("write");
            }
            assert_eq!(settled(&mut reports).await, vec![file.clone()], "{swap}: the replaced directory");
            std::fs::write(&file, format!("{swap} then written")).expect("write");
            assert_eq!(settled(&mut reports).await, vec![file.clone()], "{swap}: a write into its successor");
        }
    }
}
