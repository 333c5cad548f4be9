//! Which served secrets an in-place attempt reads again: those whose files the watcher's events
//! named since the last attempt began. Reading every served secret's files at each attempt made a
//! renewal's cost grow with the number of certificates (a thousand pairs, two thousand reads).

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::watch::Touched;

/// The paths named since the last attempt began (absolute, as the kernel names them).
#[derive(Debug, Default)]
pub(super) struct Named {
    everything: bool,
    paths: HashSet<PathBuf>,
    /// The directories in which a Kubernetes volume's `..data`-style entry changed: every file
    /// under them may have changed through it.
    volumes: HashSet<PathBuf>,
    /// The length of the shortest path in either set: a directory above a file that is shorter
    /// cannot be in them, and is not looked up (a thousand secrets are asked about per attempt).
    shortest: usize,
}

impl Named {
    pub fn add(&mut self, touched: Touched) {
        match touched {
            Touched::Everything => self.everything = true,
            Touched::Paths(paths) => paths.into_iter().for_each(|path| self.add_path(path)),
        }
    }

    pub fn add_path(&mut self, path: PathBuf) {
        let path = absolute(&path).into_owned();
        let internal = path.file_name().is_some_and(|n| n.as_encoded_bytes().starts_with(b".."));
        if let Some(dir) = path.parent().filter(|_| internal) {
            self.shortest = self.shortest_with(dir);
            self.volumes.insert(dir.to_path_buf());
        }
        self.shortest = self.shortest_with(&path);
        self.paths.insert(path);
    }

    fn shortest_with(&self, path: &Path) -> usize {
        let len = path.as_os_str().len();
        if self.paths.is_empty() && self.volumes.is_empty() { len } else { self.shortest.min(len) }
    }

    /// Whether a change of `file` may be among what was named: the file itself, a directory above
    /// it (replaced, or moved in), or a volume swap above it.
    pub fn names(&self, file: &Path) -> bool {
        if self.everything {
            return true;
        }
        let file = absolute(file);
        self.paths.contains(file.as_ref())
            || file
                .ancestors()
                .skip(1)
                .take_while(|dir| dir.as_os_str().len() >= self.shortest)
                .any(|dir| self.paths.contains(dir) || self.volumes.contains(dir))
    }

    /// What was named, leaving nothing named.
    pub fn take(&mut self) -> Named {
        std::mem::take(self)
    }
}

fn absolute(path: &Path) -> Cow<'_, Path> {
    if path.is_absolute() {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(std::path::absolute(path).unwrap_or_else(|_| path.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(paths: &[&str]) -> Named {
        let mut named = Named::default();
        named.add(Touched::Paths(paths.iter().map(PathBuf::from).collect()));
        named
    }

    #[test]
    fn a_file_is_named_by_itself_not_by_its_neighbours() {
        let named = named(&["/certs/cert-5.pem"]);
        assert!(named.names(Path::new("/certs/cert-5.pem")));
        assert!(!named.names(Path::new("/certs/cert-6.pem")), "a neighbour in the same directory is not named");
        assert!(!named.names(Path::new("/certs")), "nor the directory");
    }

    #[test]
    fn a_directory_replaced_names_every_file_under_it() {
        let named = named(&["/etc/tenants/a"]);
        assert!(named.names(Path::new("/etc/tenants/a/tls.crt")));
        assert!(named.names(Path::new("/etc/tenants/a/sub/tls.key")));
        assert!(!named.names(Path::new("/etc/tenants/ab/tls.crt")), "a path prefix is not a directory above");
    }

    #[test]
    fn a_volume_swap_names_the_files_under_its_directory() {
        let named = named(&["/secrets/..data", "/other/..2026_12_07_tmp"]);
        assert!(named.names(Path::new("/secrets/tls.crt")));
        assert!(named.names(Path::new("/secrets/tls/tls.crt")), "a volume item in a subdirectory");
        assert!(named.names(Path::new("/other/ca.crt")));
        assert!(!named.names(Path::new("/elsewhere/tls.crt")));
    }

    #[test]
    fn lost_events_name_everything_and_take_leaves_nothing() {
        let mut named = Named::default();
        named.add(Touched::Everything);
        assert!(named.names(Path::new("/any/file")));
        let taken = named.take();
        assert!(taken.names(Path::new("/any/file")));
        assert!(!named.names(Path::new("/any/file")), "nothing is named after take");
    }

    #[test]
    fn a_short_path_named_after_a_long_one_still_names_what_is_under_it() {
        let named = named(&["/very/long/directory/name/cert.pem", "/etc/x"]);
        assert!(named.names(Path::new("/etc/x/tls.crt")));
        assert!(named.names(Path::new("/very/long/directory/name/cert.pem")));
        assert!(!named.names(Path::new("/very/long/directory/name/other.pem")));
    }

    #[test]
    fn a_relative_file_is_compared_as_absolute() {
        let cwd = std::env::current_dir().expect("cwd");
        let named = named(&[cwd.join("cert.pem").to_str().expect("utf-8")]);
        assert!(named.names(Path::new("cert.pem")));
    }
}
