//! What a debounce's end reads: only the files its events named, counted through the reader.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;

/// The files a reader was asked for, in order.
#[derive(Clone, Default)]
pub struct Reads(Arc<Mutex<Vec<PathBuf>>>);

impl Reads {
    pub fn reader(&self) -> Reader {
        let reads = self.0.clone();
        Box::new(move |path| {
            reads.lock().unwrap_or_else(|p| p.into_inner()).push(path.to_path_buf());
            content_hash_of(path)
        })
    }

    /// What was read since the last call.
    pub fn take(&self) -> Vec<PathBuf> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

fn spec(extra: Vec<PathBuf>, envoy_command: Option<Vec<OsString>>) -> WatchSpec {
    WatchSpec { envoy_command, extra, debounce: Duration::from_millis(50), debounce_max: Duration::from_secs(1) }
}

fn dirty(paths: &[&Path]) -> Dirty {
    let mut dirty = Dirty::default();
    for path in paths {
        dirty.path(path.to_path_buf());
    }
    dirty
}

/// A `--watch` directory of `n` files, and the tracker of it (its scan's reads taken).
fn watched_dir(n: usize) -> (tempfile::TempDir, PathBuf, Tracked, Reads) {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("watched");
    std::fs::create_dir(&dir).expect("mkdir");
    for i in 0..n {
        std::fs::write(dir.join(format!("f{i}")), format!("content {i}")).expect("write");
    }
    let reads = Reads::default();
    let tracked = Tracked::scan(spec(vec![dir.clone()], None), None, reads.reader());
    assert_eq!(reads.take().len(), n, "the scan reads every file once");
    (root, dir, tracked, reads)
}

#[test]
fn only_the_files_the_events_name_are_read_again() {
    let (_root, dir, mut tracked, reads) = watched_dir(100);
    let f3 = dir.join("f3");
    std::fs::write(&f3, "content 3").expect("rewrite, same content");
    assert!(tracked.settle(dirty(&[&f3])).is_empty(), "a touch is not a change");
    assert_eq!(reads.take(), vec![f3.clone()]);
    std::fs::write(&f3, "new").expect("write");
    assert_eq!(tracked.settle(dirty(&[&f3])), vec![f3.clone()]);
    assert_eq!(reads.take(), vec![f3.clone()], "one read for one change, of 100 files watched");
    assert!(tracked.settle(dirty(&[&f3])).is_empty(), "reported once: the new content is now the known one");
    assert_eq!(reads.take(), vec![f3]);
}

#[test]
fn a_file_that_appears_or_goes_in_a_watch_directory_is_the_only_one_read() {
    let (_root, dir, mut tracked, reads) = watched_dir(50);
    let new = dir.join("new.pem");
    std::fs::write(&new, "new").expect("write");
    assert_eq!(tracked.settle(dirty(&[&new])), vec![new.clone()], "a new file is a change");
    assert_eq!(reads.take(), vec![new.clone()]);
    let gone = dir.join("f7");
    std::fs::remove_file(&gone).expect("rm");
    assert_eq!(tracked.settle(dirty(&[&gone])), vec![gone.clone()], "a removed file is a change");
    assert!(reads.take().is_empty(), "a file that is gone is not read");
    let sub = dir.join("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    assert!(tracked.settle(dirty(&[&sub])).is_empty(), "a subdirectory is not watched");
    assert_eq!(tracked.len(), 50);
}

#[test]
fn a_volume_swap_reads_the_files_of_its_directory_and_no_other() {
    let root = tempfile::tempdir().expect("tempdir");
    let (certs, other) = (root.path().join("certs"), root.path().join("other"));
    let first = certs.join("..2026_01_01");
    std::fs::create_dir_all(&first).expect("mkdir");
    std::fs::create_dir(&other).expect("mkdir");
    for name in ["tls.crt", "tls.key"] {
        std::fs::write(first.join(name), "one").expect("write");
        std::os::unix::fs::symlink(format!("..data/{name}"), certs.join(name)).expect("symlink");
    }
    std::os::unix::fs::symlink("..2026_01_01", certs.join("..data")).expect("symlink");
    let unrelated = other.join("ca.pem");
    std::fs::write(&unrelated, "ca").expect("write");
    let (crt, key) = (certs.join("tls.crt"), certs.join("tls.key"));
    let reads = Reads::default();
    let files = vec![crt.clone(), key.clone(), unrelated];
    let mut tracked = Tracked::scan(spec(files, None), None, reads.reader());
    reads.take();
    // The kubelet's swap: a new timestamped directory, `..data` renamed over to point at it.
    let second = certs.join("..2026_01_02");
    std::fs::create_dir(&second).expect("mkdir");
    for name in ["tls.crt", "tls.key"] {
        std::fs::write(second.join(name), "two").expect("write");
    }
    std::os::unix::fs::symlink("..2026_01_02", certs.join("..data_tmp")).expect("symlink");
    std::fs::rename(certs.join("..data_tmp"), certs.join("..data")).expect("rename");
    let events = [second.as_path(), &certs.join("..data_tmp"), &certs.join("..data")];
    assert_eq!(tracked.settle(dirty(&events)), vec![crt.clone(), key.clone()]);
    let mut read = reads.take();
    read.sort();
    assert_eq!(read, vec![crt, key], "the two files of the volume, once each");
}

#[test]
fn lost_events_or_a_replaced_directory_read_everything() {
    let (_root, dir, mut tracked, reads) = watched_dir(20);
    let mut lost = Dirty::default();
    lost.everything();
    assert!(tracked.settle(lost).is_empty(), "nothing changed");
    assert_eq!(reads.take().len(), 20);
    std::fs::write(dir.join("f1"), "new").expect("write");
    std::fs::write(dir.join("f30"), "appeared").expect("write");
    let changed = tracked.settle(dirty(&[&dir]));
    assert_eq!(changed, vec![dir.join("f1"), dir.join("f30")], "the directory named itself: read whole");
    assert_eq!(reads.take().len(), 21);
}

#[test]
fn a_bootstrap_naming_another_file_has_that_file_read_and_not_the_rest() {
    let (_root, dir, _, _) = watched_dir(0);
    let bootstrap = dir.join("envoy.yaml");
    let (a, b) = (dir.join("a.pem"), dir.join("b.pem"));
    std::fs::write(&a, "a").expect("write");
    std::fs::write(&b, "b").expect("write");
    let names = |file: &Path| format!("x: {{ filename: {} }}\n", file.display());
    std::fs::write(&bootstrap, names(&a)).expect("write");
    let command = Some(vec!["envoy".into(), "-c".into(), bootstrap.clone().into()]);
    let reads = Reads::default();
    let mut tracked = Tracked::scan(spec(vec![], command), None, reads.reader());
    assert_eq!(reads.take(), vec![a.clone(), bootstrap.clone()]);
    std::fs::write(&bootstrap, names(&b)).expect("write");
    let changed = tracked.settle(dirty(&[&bootstrap]));
    assert_eq!(changed, vec![a, b.clone(), bootstrap.clone()], "a.pem is no longer watched: gone");
    assert_eq!(reads.take(), vec![bootstrap, b]);
}
