//! Which served secrets an in-place attempt reads again: those whose files the watcher's events
//! named since the last attempt began. Reading every served secret's files at each attempt made a
//! renewal's cost grow with the number of certificates (a thousand pairs, two thousand reads).

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::Path;

use crate::watch::Touched;

/// The paths named since the last attempt began, as the bytes of their normal absolute form: the
/// form `ServedFiles` sorts the secrets' files by, and the watcher matches events against.
#[derive(Debug, Default)]
pub(super) struct Named {
    everything: bool,
    paths: HashSet<Vec<u8>>,
    /// The directories in which a Kubernetes volume's `..data`-style entry changed: every file
    /// under them may have changed through it.
    volumes: HashSet<Vec<u8>>,
}

/// Past this many paths named, an attempt reads every served secret, as after lost events: the
/// set would cost more to hold and ask than the reads it saves.
const AS_MANY_AS_EVERYTHING: usize = 10_000;

impl Named {
    pub fn add(&mut self, touched: Touched) {
        match touched {
            Touched::Everything => self.everything = true,
            Touched::Paths(paths) => paths.iter().for_each(|path| self.add_path(path)),
        }
    }

    pub fn add_path(&mut self, path: &Path) {
        if self.everything {
            return;
        }
        if self.paths.len() + self.volumes.len() >= AS_MANY_AS_EVERYTHING {
            // A flood while no attempt can run (a reload under way): held as "everything".
            *self = Named { everything: true, ..Named::default() };
            return;
        }
        let path = normal(path).into_owned();
        let internal = path.rsplit(|&b| b == b'/').next().is_some_and(|name| name.starts_with(b".."));
        if let Some(dir) = parent(&path).filter(|_| internal) {
            self.volumes.insert(dir.to_vec());
        }
        self.paths.insert(path);
    }

    /// Whether a change of `file` may be among what was named: the file itself, a directory above
    /// it (replaced, or moved in), or a volume swap above it. What `ServedFiles::named` finds
    /// for many files at once; here, its definition.
    #[cfg(test)]
    pub fn names(&self, file: &Path) -> bool {
        let file = normal(file);
        let mut above = parent(&file);
        while let Some(dir) = above {
            if self.paths.contains(dir) || self.volumes.contains(dir) {
                return true;
            }
            above = parent(dir);
        }
        self.everything || self.paths.contains(file.as_ref())
    }

    /// Whether everything is named (events were lost).
    pub fn everything(&self) -> bool {
        self.everything
    }

    /// The paths named (files or directories), in their normal form.
    pub fn paths(&self) -> impl Iterator<Item = &[u8]> {
        self.paths.iter().map(Vec::as_slice)
    }

    /// The directories of the volume swaps named: every file under them is.
    pub fn volumes(&self) -> impl Iterator<Item = &[u8]> {
        self.volumes.iter().map(Vec::as_slice)
    }

    /// What was named, leaving nothing named.
    pub fn take(&mut self) -> Named {
        std::mem::take(self)
    }
}

/// A path's normal absolute form as bytes: as it is when it is one already (the common case, and
/// no copy), else as `std::path::absolute` gives it (relative, or with `//` or `.` in it), which
/// is the form the watcher matches events against.
pub(super) fn normal(path: &Path) -> Cow<'_, [u8]> {
    let bytes = path.as_os_str().as_encoded_bytes();
    if is_normal(bytes) {
        return Cow::Borrowed(bytes);
    }
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    Cow::Owned(absolute.into_os_string().into_encoded_bytes())
}

/// Absolute, with no empty or `.` component and no trailing `/`: one pass over the bytes.
fn is_normal(bytes: &[u8]) -> bool {
    if bytes.first() != Some(&b'/') {
        return false;
    }
    if bytes.len() == 1 {
        return true;
    }
    let mut component = 0usize;
    let mut dot = false;
    for &b in &bytes[1..] {
        if b == b'/' {
            if component == 0 || (component == 1 && dot) {
                return false;
            }
            component = 0;
        } else {
            dot = component == 0 && b == b'.';
            component += 1;
        }
    }
    component > 0 && !(component == 1 && dot)
}

/// The directory above a normal absolute path (`/` above `/x`; none above `/`).
fn parent(path: &[u8]) -> Option<&[u8]> {
    let slash = path.iter().rposition(|&b| b == b'/')?;
    match slash {
        0 if path.len() > 1 => Some(&path[..1]),
        0 => None,
        _ => Some(&path[..slash]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

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
    fn a_flood_of_paths_is_held_as_everything() {
        let mut named = Named::default();
        for i in 0..AS_MANY_AS_EVERYTHING + 5 {
            named.add_path(Path::new(&format!("/flood/f{i}")));
        }
        assert!(named.names(Path::new("/certs/tls.crt")), "read as after lost events");
        assert!(named.paths.is_empty(), "and nothing of the flood is kept");
    }

    #[test]
    fn a_plain_absolute_path_is_normal_and_nothing_else_is() {
        for plain in ["/", "/a", "/etc/certs/tls.crt", "/a/..b/.c", "/a/../b", "/.x"] {
            assert!(is_normal(plain.as_bytes()), "{plain}");
        }
        for other in ["", "a/b", "./a", "/a/", "//a", "/a//b", "/a/./b", "/a/.", "/."] {
            assert!(!is_normal(other.as_bytes()), "{other}");
        }
    }

    #[test]
    fn many_paths_named_are_looked_up_as_few_are() {
        let files: Vec<String> = (0..20).map(|i| format!("/certs/cert-{i}.pem")).collect();
        let named = named(&files.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(named.names(Path::new("/certs/cert-19.pem")));
        assert!(!named.names(Path::new("/certs/cert-20.pem")));
    }

    #[test]
    fn paths_are_compared_in_their_normal_form() {
        let named = named(&["/etc/certs/tls.crt", "/srv"]);
        assert!(named.names(Path::new("/etc//certs/./tls.crt")));
        assert!(named.names(Path::new("/srv/a.pem")));
        assert!(!named.names(Path::new("/")));
        let root = named_root();
        assert!(root.names(Path::new("/x.pem")), "the root replaced names what is in it");
    }

    fn named_root() -> Named {
        named(&["/"])
    }

    #[test]
    fn a_relative_file_is_compared_as_absolute() {
        let cwd = std::env::current_dir().expect("cwd");
        let named = named(&[cwd.join("cert.pem").to_str().expect("utf-8")]);
        assert!(named.names(Path::new("cert.pem")));
    }
}
