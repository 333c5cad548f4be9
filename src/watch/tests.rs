//! The watcher with the real inotify: what it reports, and what it reads to know.

use tokio::sync::mpsc::UnboundedReceiver;

use super::*;

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
    let relevant = Relevant::new(&spec, &[std::sync::Arc::from(cert.as_path())].into());
    assert!(relevant.counts(&cert));
    assert!(relevant.counts(&dir.path().join("certs/..data")), "a Kubernetes symlink swap");
    assert!(relevant.counts(&dir.path().join("certs/..2026_11_27_10_00_00.123")));
    assert!(!relevant.counts(&dir.path().join("certs/access.log")), "a busy neighbour");
    assert!(!relevant.counts(&dir.path().join("certs/tls.crt.swp")));
    assert!(relevant.counts(&extra.join("anything")), "a --watch directory counts whole");
    assert!(!relevant.counts(&extra.join("sub/deeper")), "not recursive");
}

#[test]
fn a_file_is_known_in_every_form_it_was_given() {
    // Under the working directory, so that the key can be named relative to it too.
    let cwd = std::env::current_dir().expect("cwd");
    let dir = tempfile::tempdir_in(&cwd).expect("tempdir");
    let spec = WatchSpec {
        envoy_command: None,
        extra: vec![],
        debounce: Duration::from_millis(500),
        debounce_max: Duration::from_secs(5),
    };
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    // The key as given twice: by its absolute path, and relative to the working directory.
    let other = key.strip_prefix(&cwd).expect("under the working directory").to_path_buf();
    let named: BTreeSet<Arc<Path>> = [&cert, &key, &other].into_iter().map(|p| Arc::from(p.as_path())).collect();
    let relevant = Relevant::new(&spec, &named);
    assert_eq!(relevant.forms_of(&cert), [Arc::from(cert.as_path())], "given once, as itself");
    let forms: BTreeSet<&Path> = relevant.forms_of(&key).iter().map(|f| &**f).collect();
    assert_eq!(forms, BTreeSet::from([key.as_path(), other.as_path()]), "both forms");
    assert!(relevant.forms_of(&dir.path().join("other")).is_empty());
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
    assert_eq!(spec.named_files(Some(&read)), spec.named_files(None));
    let scan = || Tracked::scan(spec.clone(), None, Box::new(tracked::content_hash_of));
    assert!(read_from(&read, spec.bootstrap_path(), &scan()));
    std::fs::write(&bootstrap, "x: {}\n").expect("rewrite");
    assert!(!read_from(&read, spec.bootstrap_path(), &scan()), "changed since it was read");
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

/// The kernel's inotify queue length: beyond it, events are lost and an overflow is reported.
fn inotify_queue() -> usize {
    let text = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events").expect("inotify's queue length");
    text.trim().parse().expect("a number")
}

/// A `--watch` directory of `n` files, watched with a debounce of 50 ms through a counting reader
/// (the start's scan taken): the reports and the reads.
fn watch_large(n: usize) -> (tempfile::TempDir, PathBuf, UnboundedReceiver<Change>, tracked::tests::Reads) {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("watched");
    std::fs::create_dir(&dir).expect("mkdir");
    for i in 0..n {
        std::fs::write(dir.join(format!("f{i:05}")), format!("content {i}")).expect("write");
    }
    let spec = WatchSpec {
        envoy_command: None,
        extra: vec![dir.clone()],
        debounce: Duration::from_millis(50),
        debounce_max: Duration::from_secs(1),
    };
    let (tx, reports) = tokio::sync::mpsc::unbounded_channel();
    let reads = tracked::tests::Reads::default();
    start_reading(spec, None, move |change| tx.send(change).is_ok(), reads.reader()).expect("start");
    assert_eq!(reads.take().len(), n, "the start reads every file once");
    (root, dir, reports, reads)
}

/// Replaces `file` whole by a rename from outside the watched directory: one event, one change.
fn replace(root: &Path, file: &Path, content: &str) {
    let staged = root.join("staged");
    std::fs::write(&staged, content).expect("write");
    std::fs::rename(&staged, file).expect("rename into place");
}

/// Every file `Settled` reported, until one of them is `last` (within 60 s).
async fn reported_until(reports: &mut UnboundedReceiver<Change>, last: &Path) -> Vec<PathBuf> {
    let mut reported = Vec::new();
    let all = async {
        while !reported.iter().any(|f| f == last) {
            match reports.recv().await {
                Some(Change::Settled(files)) => reported.extend(files),
                Some(Change::Begun(_)) => {}
                None => panic!("the watcher stopped"),
            }
        }
    };
    let waited = tokio::time::timeout(Duration::from_secs(60), all).await;
    assert!(waited.is_ok(), "{} was not reported within 60 s (reported: {reported:?})", last.display());
    reported
}

/// The number in a file's name `fNNNNN`.
fn index(file: &Path) -> Option<usize> {
    file.file_name()?.to_str()?.strip_prefix('f')?.parse().ok()
}

fn touch(file: &Path) {
    let now = std::time::SystemTime::now();
    std::fs::File::options().write(true).open(file).and_then(|f| f.set_modified(now)).expect("touch");
}

/// A flood of touches (within the kernel's queue) in a directory of 20,000 files, one real change
/// among them: the change is reported once, no touched file is, and only what the events named is
/// read again. The sentinel, changed after the flood, ends the wait: its event follows all of them.
#[tokio::test]
async fn a_flood_of_touches_in_a_large_directory_reads_only_what_it_named() {
    let (root, dir, mut reports, reads) = watch_large(20_000);
    let touched = (inotify_queue() / 2).min(10_000);
    let changed = dir.join("f00042");
    for i in 0..touched {
        touch(&dir.join(format!("f{i:05}")));
        if i == touched / 2 {
            replace(root.path(), &changed, "a real change");
        }
    }
    let sentinel = dir.join("f19999");
    replace(root.path(), &sentinel, "the end of the flood");
    let reported = reported_until(&mut reports, &sentinel).await;
    assert_eq!(reported, vec![changed.clone(), sentinel.clone()], "each change once, no touch");
    let read: BTreeSet<PathBuf> = reads.take().into_iter().collect();
    let untouched_read: Vec<&PathBuf> =
        read.iter().filter(|f| **f != sentinel && index(f).is_none_or(|i| i >= touched)).collect();
    assert!(untouched_read.is_empty(), "files no event named were read: {untouched_read:?}");
    assert!(read.len() <= touched + 1, "{} files read for {touched} touched and 2 changed", read.len());
}

/// More touches than the kernel's queue holds: events are lost, everything is read again (a file
/// no event named too), and still only the real change is reported, once.
#[tokio::test]
async fn a_flood_past_the_kernels_queue_reads_everything_and_reports_the_change_once() {
    let files = 20_000.max(inotify_queue() + 1_000);
    let (root, dir, mut reports, reads) = watch_large(files);
    let (untouched, sentinel) = (dir.join(format!("f{:05}", files - 2)), dir.join(format!("f{:05}", files - 1)));
    let changed = dir.join("f00042");
    for i in 0..files - 2 {
        touch(&dir.join(format!("f{i:05}")));
    }
    replace(root.path(), &changed, "a real change");
    replace(root.path(), &sentinel, "the end of the flood");
    let reported = reported_until(&mut reports, &sentinel).await;
    let once = reported.iter().filter(|f| **f == changed).count();
    assert_eq!(once, 1, "the real change reported once: {reported:?}");
    assert!(reported.iter().all(|f| *f == changed || *f == sentinel), "a touch reported: {reported:?}");
    assert!(reads.take().contains(&untouched), "lost events: every file read again");
}
