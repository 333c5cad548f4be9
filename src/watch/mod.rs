//! Watching the files a hot restart depends on: the bootstrap, every file it references, and the
//! user's `--watch` paths. Directories are watched, not inodes, so that a rename into place, an
//! editor's replace and the Kubernetes `..data` symlink swap are all seen. After the debounce, the
//! files the events named are hashed again (`tracked`): only a real change is reported (a touch is
//! not). The first event of a debounce is reported too, so that the checks of a reload can run
//! while the files settle. The watcher only reports to the callback it was given; it never
//! restarts anything.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::bootstrap::{Bootstrap, BootstrapFiles};
use crate::inotify::{self, DirWatcher};

mod tracked;

use tracked::{Dirty, Reader, Tracked};

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
    /// The files watched by name, by absolute path (what an event names), each with the forms in
    /// which it was given (shared with the watcher's other tables: a thousand pairs' paths are
    /// held once). No form listed: given as that path only, as nearly always (no allocation).
    named_at: HashMap<Arc<Path>, Vec<Arc<Path>>>,
    /// The same files by absolute parent directory: a volume swap there names them all.
    named_in: HashMap<PathBuf, Vec<Arc<Path>>>,
    file_dirs: BTreeSet<PathBuf>,
    watch_dirs: BTreeSet<PathBuf>,
    dirs: BTreeSet<PathBuf>,
}

impl Relevant {
    /// For the files `named` (the files of a `--watch` directory count through the directory).
    fn new(spec: &WatchSpec, named: &BTreeSet<Arc<Path>>) -> Relevant {
        let mut named_at: HashMap<Arc<Path>, Vec<Arc<Path>>> = HashMap::with_capacity(named.len());
        let mut named_in: HashMap<PathBuf, Vec<Arc<Path>>> = HashMap::new();
        for file in named {
            let at = absolute(file);
            let key = if at == **file { file.clone() } else { Arc::from(at) };
            match named_at.entry(key) {
                Entry::Vacant(vacant) => {
                    let forms = if vacant.key() == file { Vec::new() } else { vec![file.clone()] };
                    vacant.insert(forms);
                }
                Entry::Occupied(mut occupied) => {
                    let key = occupied.key().clone();
                    let forms = occupied.get_mut();
                    if forms.is_empty() {
                        forms.push(key);
                    }
                    forms.push(file.clone());
                }
            }
            if let Some(dir) = absolute_parent(file) {
                named_in.entry(dir).or_default().push(file.clone());
            }
        }
        let file_dirs = named_at.keys().filter_map(|f| f.parent().map(Path::to_path_buf)).collect();
        let watch_dirs: BTreeSet<PathBuf> = spec.extra.iter().filter(|p| p.is_dir()).map(|p| absolute(p)).collect();
        let dirs = named_in.keys().cloned().chain(watch_dirs.iter().cloned()).collect();
        Relevant { named_at, named_in, file_dirs, watch_dirs, dirs }
    }

    /// The forms in which the watched file at `path` (absolute) was given.
    fn forms_of(&self, path: &Path) -> &[Arc<Path>] {
        match self.named_at.get_key_value(path) {
            Some((key, forms)) if forms.is_empty() => std::slice::from_ref(key),
            Some((_, forms)) => forms,
            None => &[],
        }
    }

    fn counts(&self, path: &Path) -> bool {
        let parent = path.parent();
        self.named_at.contains_key(path)
            || self.dirs.contains(path)
            || parent.is_some_and(|dir| self.watch_dirs.contains(dir))
            || (is_volume_internal(path) && parent.is_some_and(|dir| self.file_dirs.contains(dir)))
    }
}

/// A `..data`-style entry of a Kubernetes volume.
fn is_volume_internal(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".."))
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// What one batch of events named: the paths (absolute, as the kernel named them: a file, a
/// `..data` entry, a directory replaced), or anything, when the kernel lost events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Touched {
    Paths(Vec<PathBuf>),
    Everything,
}

/// What the watcher reports.
#[derive(Debug)]
pub enum Change {
    /// A watched file was touched: a debounce runs. Whether its content changed is not known yet.
    Begun(Touched),
    /// The debounce ended: the files whose content changed (none for a touch or a change undone).
    Settled(Vec<PathBuf>),
}

impl WatchSpec {
    /// The files watched now: re-read each time, since the bootstrap may name new ones.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = self.named_files(None);
        for dir in self.extra.iter().filter(|p| p.is_dir()) {
            files.extend(files_in(dir));
        }
        files.into_iter().collect()
    }

    /// The files watched by name (whether they exist or not): the bootstrap and the files it
    /// names (taken from `read`, what the launcher read at start, instead of parsing it again),
    /// and the `--watch` paths that are not directories.
    fn named_files(&self, read: Option<&BootstrapFiles>) -> BTreeSet<PathBuf> {
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
        files.extend(self.extra.iter().filter(|p| !p.is_dir()).cloned());
        files
    }

    /// The `-c` file of the Envoy command.
    fn bootstrap_path(&self) -> Option<PathBuf> {
        crate::envoy::config_path(self.envoy_command.as_ref()?)
    }

    /// The directories to watch for `files`, and the `--watch` directories themselves; absolute,
    /// since an event is named by the path its watch was added for.
    fn directories<'a>(&self, files: impl Iterator<Item = &'a Path>) -> BTreeSet<PathBuf> {
        let mut dirs: BTreeSet<PathBuf> = files.filter_map(absolute_parent).collect();
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

/// Starts watching; each debounce is handed to `report`: `Begun` at its first event and at each
/// event during it, `Settled` with the files whose content changed at its end. Watching ends when
/// `report` returns false. The directories are watched and the files hashed before this returns:
/// a change made afterwards is seen. `read` is what the launcher read of the bootstrap at start:
/// used unless the bootstrap's content differs from what it was read from.
pub fn start(
    spec: WatchSpec,
    read: Option<&BootstrapFiles>,
    report: impl FnMut(Change) -> bool + Send + 'static,
) -> std::io::Result<()> {
    start_reading(spec, read, report, Box::new(tracked::content_hash_of))
}

/// `start`, with the files read by `reader`.
fn start_reading(
    spec: WatchSpec,
    read: Option<&BootstrapFiles>,
    mut report: impl FnMut(Change) -> bool + Send + 'static,
    reader: Reader,
) -> std::io::Result<()> {
    let watcher = DirWatcher::new()?;
    // Watched before the files are read: a change in between is seen.
    watch_directories(&watcher, &spec.directories(spec.named_files(read).iter().map(PathBuf::as_path)));
    let mut tracked = Tracked::scan(spec.clone(), read, reader);
    if read.is_some_and(|read| !read_from(read, spec.bootstrap_path(), &tracked)) {
        // Changed since the launcher read it: read it again, and what it names now.
        watch_directories(&watcher, &spec.directories(spec.named_files(None).iter().map(PathBuf::as_path)));
        tracked.rescan(None);
    }
    let dirs = tracked.dirs().len();
    tracing::info!("watching {} files in {dirs} directories for changes", tracked.len());
    if tracked.len() <= 100 {
        tracing::debug!("watched files: {:?}", tracked.files().collect::<Vec<_>>());
    }

    tokio::spawn(async move {
        loop {
            let mut dirty = Dirty::default();
            let touched = match next_relevant(&watcher, tracked.relevant(), &mut dirty).await {
                Ok(touched) => touched,
                Err(e) => {
                    tracing::warn!("cannot read file changes any more ({e}): hot restarts only on SIGHUP");
                    return;
                }
            };
            if !report(Change::Begun(touched)) {
                return;
            }
            // Debounce: wait until the watched files have been quiet for the debounce time, but
            // never longer than the cap from the first change.
            let cap = tokio::time::sleep(spec.debounce_max);
            tokio::pin!(cap);
            loop {
                tokio::select! {
                    more = next_relevant(&watcher, tracked.relevant(), &mut dirty) => {
                        let Ok(touched) = more else { return };
                        if !report(Change::Begun(touched)) {
                            return;
                        }
                    }
                    _ = tokio::time::sleep(spec.debounce) => break,
                    _ = &mut cap => break,
                }
            }
            // A directory replaced during the debounce is watched anew before its files are
            // read: a write after the read is then seen, and one before it is in the hash. What
            // is in it now is not known: everything is read again.
            if watch_directories(&watcher, tracked.dirs()) {
                dirty.everything();
            }
            let settled = tokio::task::spawn_blocking(move || {
                let changed = tracked.settle(dirty);
                (tracked, changed)
            });
            let Ok((settled, changed)) = settled.await else {
                tracing::warn!("cannot hash the watched files any more: hot restarts only on SIGHUP");
                return;
            };
            tracked = settled;
            // The bootstrap may name files in other directories now.
            watch_directories(&watcher, tracked.dirs());
            if !report(Change::Settled(changed)) {
                return;
            }
        }
    });
    Ok(())
}

/// Whether `read` was read from the bootstrap `path` as `tracked` found it (a file that was not
/// read, a protobuf say, has nothing to differ from).
fn read_from(read: &BootstrapFiles, path: Option<PathBuf>, tracked: &Tracked) -> bool {
    match (read.content_hash, path) {
        (Some(hash), Some(path)) => tracked.hash(&path) == Some(Some(hash)),
        _ => true,
    }
}

/// Waits for an event on what is watched, and notes in `dirty` what the events named (the hashes
/// decide after the debounce): a busy neighbour in the same directory must not hold the debounce
/// open. After an overflow anything may have changed. Returns what this batch named.
async fn next_relevant(watcher: &DirWatcher, relevant: &Relevant, dirty: &mut Dirty) -> std::io::Result<Touched> {
    loop {
        let mut named = Vec::new();
        let mut everything = false;
        for change in watcher.next().await? {
            match change {
                inotify::Change::Path { path } if relevant.counts(&path) => {
                    dirty.path(path.clone());
                    named.push(path);
                }
                inotify::Change::Path { .. } => {}
                inotify::Change::Overflow => {
                    dirty.everything();
                    everything = true;
                }
            }
        }
        if everything {
            return Ok(Touched::Everything);
        }
        if !named.is_empty() {
            return Ok(Touched::Paths(named));
        }
    }
}

/// Watches `dirs` and their parents (again where a directory was replaced: see
/// `DirWatcher::watch`). A directory's own watch ends with it; the parent's sees another created or
/// moved in at its path. True when one of `dirs` is not the directory watched before (replaced,
/// or there again).
fn watch_directories(watcher: &DirWatcher, dirs: &BTreeSet<PathBuf>) -> bool {
    let parents: BTreeSet<&Path> = dirs.iter().filter_map(|d| d.parent()).collect();
    let mut replaced = false;
    for dir in dirs {
        match watcher.watch(dir) {
            Ok(added) => replaced |= added,
            Err(e) => tracing::warn!("cannot watch {}: {e}", dir.display()),
        }
    }
    for parent in parents.into_iter().filter(|p| !dirs.contains(*p)) {
        if let Err(e) = watcher.watch(parent) {
            tracing::debug!("cannot watch {} for its watched directories: {e}", parent.display());
        }
    }
    replaced
}

#[cfg(test)]
mod tests;
