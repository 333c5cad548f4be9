//! What the watcher knows of each watched file: its content hash as last read. A debounce's end
//! reads again only the files its events named (and, for a Kubernetes volume's `..data` swap, the
//! files of that directory, which all change through it), so that the work of a change is
//! proportional to what changed, not to how many files are watched. Everything is read again only
//! when the kernel lost events (its queue overflowed) or a watched directory itself was replaced
//! (its files are others then).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Relevant, WatchSpec, absolute, files_in, is_volume_internal};
use crate::bootstrap::BootstrapFiles;

/// Reads a file's content hash (None: it cannot be read). Given to the watcher so that tests can
/// count what it reads.
pub type Reader = Box<dyn FnMut(&Path) -> Option<u64> + Send>;

/// The reader of the running launcher.
pub fn content_hash_of(path: &Path) -> Option<u64> {
    crate::files::content_hash_of_file(path).ok()
}

/// What the events of one debounce named: paths as the kernel named them (absolute), or that
/// anything may have changed.
#[derive(Debug, Default)]
pub struct Dirty {
    paths: BTreeSet<PathBuf>,
    everything: bool,
}

impl Dirty {
    pub fn path(&mut self, path: PathBuf) {
        self.paths.insert(path);
    }

    /// Events were lost, or a watched directory was replaced: every file is read again.
    pub fn everything(&mut self) {
        self.everything = true;
    }
}

/// The regular files found in one `--watch` directory, by entry name, and the forms in which the
/// directory was given (the files are reported as `GIVEN/NAME`, as a scan names them).
#[derive(Debug, Default)]
struct Listing {
    given: BTreeSet<PathBuf>,
    names: BTreeSet<OsString>,
}

impl Listing {
    fn keys<'a>(&'a self, name: &'a OsString) -> impl Iterator<Item = PathBuf> + 'a {
        self.given.iter().map(move |dir| dir.join(name))
    }
}

/// The watched files and the hash of each as last read.
pub struct Tracked {
    spec: WatchSpec,
    /// The bootstrap, the files it names and the `--watch` files, as given: watched whether they
    /// exist or not.
    named: BTreeSet<Arc<Path>>,
    /// Each `--watch` directory (absolute) and the files found in it.
    listed: BTreeMap<PathBuf, Listing>,
    /// Every watched file (`named` and `listed`) and its hash.
    hashes: BTreeMap<Arc<Path>, Option<u64>>,
    /// The watched files by path and directory, and the directories watched.
    relevant: Relevant,
    read: Reader,
}

impl Tracked {
    /// Lists and reads every watched file, taking the bootstrap's files from `read_at_start` when
    /// given (what the launcher read of it).
    pub fn scan(spec: WatchSpec, read_at_start: Option<&BootstrapFiles>, read: Reader) -> Tracked {
        let mut tracked = Tracked {
            spec,
            named: BTreeSet::new(),
            listed: BTreeMap::new(),
            hashes: BTreeMap::new(),
            relevant: Relevant::default(),
            read,
        };
        tracked.rescan(read_at_start);
        tracked
    }

    /// Lists and reads everything again; returns the files whose content differs from before.
    pub fn rescan(&mut self, read_at_start: Option<&BootstrapFiles>) -> Vec<PathBuf> {
        let before = std::mem::take(&mut self.hashes);
        self.set_named(shared(self.spec.named_files(read_at_start)));
        self.listed.clear();
        for dir in self.spec.extra.iter().filter(|p| p.is_dir()) {
            let listing = self.listed.entry(absolute(dir)).or_default();
            listing.given.insert(dir.clone());
            listing.names.extend(files_in(dir).iter().filter_map(|f| f.file_name().map(OsString::from)));
        }
        let keys: Vec<Arc<Path>> = self.named.iter().cloned().chain(self.listed_keys().map(Arc::from)).collect();
        for key in keys {
            let hash = (self.read)(&key);
            self.hashes.insert(key, hash);
        }
        changed(&before, &self.hashes)
    }

    /// Reads again what the events of a debounce named; returns the files whose content changed
    /// (or that appeared or went).
    pub fn settle(&mut self, dirty: Dirty) -> Vec<PathBuf> {
        if dirty.everything || dirty.paths.iter().any(|p| self.is_a_watched_directory(p)) {
            tracing::debug!("watcher: reading every watched file again");
            return self.rescan(None);
        }
        let mut affected: BTreeSet<Arc<Path>> = BTreeSet::new();
        for path in &dirty.paths {
            self.affected_by(path, &mut affected);
        }
        let mut changed = Vec::new();
        for key in &affected {
            self.read_again(key, &mut changed);
        }
        let bootstrap = self.spec.bootstrap_path();
        if bootstrap.is_some_and(|b| changed.contains(&b)) {
            // It may name other files now.
            self.follow_the_bootstrap(&mut changed);
        }
        tracing::debug!("watcher: {} files read again, {} changed", affected.len(), changed.len());
        changed.sort();
        changed.dedup();
        changed
    }

    pub fn relevant(&self) -> &Relevant {
        &self.relevant
    }

    /// The directories watched (absolute): each named file's, and the `--watch` directories.
    pub fn dirs(&self) -> &BTreeSet<PathBuf> {
        &self.relevant.dirs
    }

    /// How many files are watched.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// The hash of `file` as last read (None inside: it could not be read).
    pub fn hash(&self, file: &Path) -> Option<Option<u64>> {
        self.hashes.get(file).copied()
    }

    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.hashes.keys().map(|k| &**k)
    }

    fn set_named(&mut self, named: BTreeSet<Arc<Path>>) {
        self.relevant = Relevant::new(&self.spec, &named);
        self.named = named;
    }

    fn listed_keys(&self) -> impl Iterator<Item = PathBuf> + '_ {
        self.listed.values().flat_map(|l| l.names.iter().flat_map(|name| l.keys(name)))
    }

    /// A watched directory, or a `--watch` path that is one now: named by an event, it was
    /// created, removed or replaced, and what is in it is not known.
    fn is_a_watched_directory(&self, path: &Path) -> bool {
        self.relevant.dirs.contains(path) || (self.spec.extra.iter().any(|p| absolute(p) == path) && path.is_dir())
    }

    /// The watched files an event on `path` may have changed.
    fn affected_by(&mut self, path: &Path, affected: &mut BTreeSet<Arc<Path>>) {
        let Some(dir) = path.parent() else { return };
        if is_volume_internal(path) {
            // A Kubernetes volume's swap: the visible names lead through `..data`.
            affected.extend(self.relevant.named_in.get(dir).into_iter().flatten().cloned());
            if let Some(listing) = self.listed.get(dir) {
                affected.extend(listing.names.iter().flat_map(|name| listing.keys(name)).map(Arc::from));
            }
            return;
        }
        affected.extend(self.relevant.forms_of(path).iter().cloned());
        let (Some(listing), Some(name)) = (self.listed.get_mut(dir), path.file_name()) else { return };
        let name = OsString::from(name);
        // An entry that is no longer a regular file leaves the listing: reported as gone.
        if path.is_file() {
            listing.names.insert(name.clone());
        } else {
            listing.names.remove(&name);
        }
        affected.extend(listing.keys(&name).map(Arc::from));
    }

    fn is_watched(&self, key: &Path) -> bool {
        if self.named.contains(key) {
            return true;
        }
        let (Some(dir), Some(name)) = (key.parent(), key.file_name()) else { return false };
        self.listed.get(&absolute(dir)).is_some_and(|l| l.given.contains(dir) && l.names.contains(name))
    }

    fn read_again(&mut self, key: &Arc<Path>, changed: &mut Vec<PathBuf>) {
        if !self.is_watched(key) {
            if self.hashes.remove(&**key).is_some() {
                changed.push(key.to_path_buf());
            }
            return;
        }
        let hash = (self.read)(key);
        if self.hashes.insert(key.clone(), hash) != Some(hash) {
            changed.push(key.to_path_buf());
        }
    }

    /// The bootstrap changed: the files it names now are watched (and read, when new), those it no
    /// longer names are not.
    fn follow_the_bootstrap(&mut self, changed: &mut Vec<PathBuf>) {
        let named = self.spec.named_files(None);
        if named.iter().map(PathBuf::as_path).eq(self.named.iter().map(|f| &**f)) {
            return;
        }
        let named = shared(named);
        let gone: Vec<Arc<Path>> = self.named.difference(&named).cloned().collect();
        let new: Vec<Arc<Path>> = named.difference(&self.named).cloned().collect();
        self.set_named(named);
        for key in gone.iter().chain(&new) {
            if !self.hashes.contains_key(&**key) || !self.is_watched(key) {
                self.read_again(key, changed);
            }
        }
    }
}

/// The files whose content differs between two snapshots (added, removed or changed).
pub fn changed(before: &BTreeMap<Arc<Path>, Option<u64>>, after: &BTreeMap<Arc<Path>, Option<u64>>) -> Vec<PathBuf> {
    let keys: BTreeSet<&Path> = before.keys().chain(after.keys()).map(|k| &**k).collect();
    keys.into_iter().filter(|k| before.get(*k) != after.get(*k)).map(Path::to_path_buf).collect()
}

fn shared(files: BTreeSet<PathBuf>) -> BTreeSet<Arc<Path>> {
    files.into_iter().map(Arc::from).collect()
}

#[cfg(test)]
pub(super) mod tests;
