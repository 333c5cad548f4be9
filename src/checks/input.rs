//! The files a check stands for, as they were read: each path with a hash of its content, so that
//! a later step can tell whether what it is about to use is what was checked.

use std::path::{Path, PathBuf};

/// The files a new epoch reads (the bootstrap, every file it names, the watched ones) and what
/// each held when it was read (None: it could not be read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    files: Vec<(PathBuf, Option<u64>)>,
}

impl Input {
    /// Reads `files` now (sorted, each once). Blocking, but a few small files.
    pub fn read(mut files: Vec<PathBuf>) -> Input {
        files.sort();
        files.dedup();
        Input {
            files: files
                .into_iter()
                .map(|file| {
                    let hash = content_hash(&file);
                    (file, hash)
                })
                .collect(),
        }
    }

    /// Whether the files still hold what they held when read. Blocking, as `read`.
    pub fn unchanged(&self) -> bool {
        self.files.iter().all(|(file, hash)| content_hash(file) == *hash)
    }

    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(file, _)| file.as_path())
    }
}

fn content_hash(file: &Path) -> Option<u64> {
    std::fs::read(file).ok().map(|bytes| crate::files::content_hash(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_input_names_each_file_with_its_hash_and_sees_a_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "one").expect("write");
        let input = Input::read(vec![b.clone(), a.clone(), a.clone()]);
        assert_eq!(input.files().collect::<Vec<_>>(), vec![a.as_path(), b.as_path()], "sorted, once each");
        assert_eq!(input.files[1].1, None, "b was unreadable");
        assert!(input.unchanged());
        std::fs::write(&b, "now here").expect("write");
        assert!(!input.unchanged(), "a file that appears is a change");
        std::fs::remove_file(&b).expect("remove");
        std::fs::write(&a, "two").expect("write");
        assert!(!input.unchanged(), "new content is a change");
    }
}
