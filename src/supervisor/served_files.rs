//! The served secrets' files, sorted by their normal form: which of a thousand secrets the
//! watcher's events named, or whether a changed path is a secret's file, is a few binary searches
//! rather than a look at every secret's files (two thousand paths made normal and compared at
//! each attempt, a sixth of a renewal's CPU time at a thousand pairs).

use std::collections::HashMap;
use std::path::Path;

use super::touched::{Named, normal};
use crate::sds::SecretFiles;

/// An index into a slice of secrets, built for it and valid while their files stay the same.
#[derive(Debug, Default)]
pub(super) struct ServedFiles {
    /// `secret * 2 + file` (`SecretFiles::file`), by the file's normal form.
    sorted: Vec<u32>,
    /// The normal form of the files not given in it (relative, or with `.` or `//`): rare, so
    /// the others are compared in place, with no copy.
    unusual: HashMap<u32, Box<[u8]>>,
}

impl ServedFiles {
    pub fn of<S: AsRef<SecretFiles>>(secrets: &[S]) -> ServedFiles {
        let mut index = ServedFiles::default();
        let mut sorted = Vec::with_capacity(secrets.len() * 2);
        for (secret, files) in secrets.iter().enumerate() {
            for which in 0..2 {
                let Some(file) = files.as_ref().file(which) else { continue };
                let code = (secret * 2 + which) as u32;
                if let std::borrow::Cow::Owned(form) = normal(file) {
                    index.unusual.insert(code, form.into_boxed_slice());
                }
                sorted.push(code);
            }
        }
        sorted.sort_by(|a, b| index.key(secrets, *a).cmp(index.key(secrets, *b)));
        index.sorted = sorted;
        index
    }

    /// The secrets (indices into `secrets`, ascending) with a file that `named` names.
    pub fn named<S: AsRef<SecretFiles>>(&self, secrets: &[S], named: &Named) -> Vec<usize> {
        if named.everything() {
            return (0..secrets.len()).collect();
        }
        let mut found = Vec::new();
        for path in named.paths() {
            found.extend(self.equal_to(secrets, path));
            found.extend(self.under(secrets, path));
        }
        for volume in named.volumes() {
            found.extend(self.under(secrets, volume));
        }
        found.sort_unstable();
        found.dedup();
        found
    }

    /// Whether `path` is a file of one of `secrets`.
    pub fn holds<S: AsRef<SecretFiles>>(&self, secrets: &[S], path: &Path) -> bool {
        self.equal_to(secrets, &normal(path)).next().is_some()
    }

    fn equal_to<'a, S: AsRef<SecretFiles>>(
        &'a self,
        secrets: &'a [S],
        path: &'a [u8],
    ) -> impl Iterator<Item = usize> + 'a {
        let first = self.sorted.partition_point(|&code| self.key(secrets, code) < path);
        self.sorted[first..]
            .iter()
            .take_while(move |&&code| self.key(secrets, code) == path)
            .map(|&code| code as usize / 2)
    }

    /// The secrets with a file under the directory `dir`: in sorted order those whose form starts
    /// with `dir/` are one run.
    fn under<'a, S: AsRef<SecretFiles>>(&'a self, secrets: &'a [S], dir: &[u8]) -> impl Iterator<Item = usize> + 'a {
        let mut prefix = dir.to_vec();
        if !prefix.ends_with(b"/") {
            prefix.push(b'/');
        }
        let first = self.sorted.partition_point(|&code| self.key(secrets, code) < prefix.as_slice());
        self.sorted[first..]
            .iter()
            .take_while(move |&&code| self.key(secrets, code).starts_with(&prefix))
            .map(|&code| code as usize / 2)
    }

    fn key<'a, S: AsRef<SecretFiles>>(&'a self, secrets: &'a [S], code: u32) -> &'a [u8] {
        if !self.unusual.is_empty()
            && let Some(form) = self.unusual.get(&code)
        {
            return form;
        }
        let files = secrets[code as usize / 2].as_ref();
        files.file(code as usize % 2).map(|file| file.as_os_str().as_encoded_bytes()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::Touched;
    use std::path::PathBuf;

    impl AsRef<SecretFiles> for SecretFiles {
        fn as_ref(&self) -> &SecretFiles {
            self
        }
    }

    fn pair(chain: &str, key: &str) -> SecretFiles {
        SecretFiles::Certificate { chain: chain.into(), key: key.into() }
    }

    fn secrets() -> Vec<SecretFiles> {
        vec![
            pair("/etc/tenants/a/tls.crt", "/etc/tenants/a/tls.key"),
            pair("/etc/tenants/a-b/tls.crt", "/etc/tenants/a-b/tls.key"),
            pair("/etc/tenants/ab/tls.crt", "/keys/ab.key"),
            SecretFiles::TrustedCa { ca: "/etc/ca.pem".into(), crl: Some("/etc/crl/x.pem".into()) },
            SecretFiles::TrustedCa { ca: "/etc/ca.pem".into(), crl: None },
            pair("relative/tls.crt", "/etc//tenants/./c/tls.key"),
            pair("/secrets/..data/tls.crt", "/secrets/tls.key"),
        ]
    }

    /// Every secret whose files `Named::names` says were named: what the index must find.
    fn by_asking_each(secrets: &[SecretFiles], named: &Named) -> Vec<usize> {
        (0..secrets.len()).filter(|&i| secrets[i].paths().iter().any(|f| named.names(f))).collect()
    }

    #[test]
    fn finds_what_asking_each_secret_finds() {
        let secrets = secrets();
        let index = ServedFiles::of(&secrets);
        let cwd = std::env::current_dir().expect("cwd");
        let relative_dir = cwd.join("relative").display().to_string();
        let cases: Vec<Vec<String>> = [
            vec!["/etc/tenants/a/tls.crt"],
            vec!["/etc/tenants/a"],
            vec!["/etc/tenants/a-b"],
            vec!["/etc/tenants"],
            vec!["/etc/ca.pem"],
            vec!["/etc/crl"],
            vec!["/etc/tenants/c/tls.key"],
            vec!["/secrets/..2026_12_07"],
            vec!["/keys/ab.key", "/nothing/here"],
            vec!["/"],
            vec!["/etc/tenants/a/tls.crt.tmp"],
            vec![relative_dir.as_str()],
        ]
        .iter()
        .map(|case| case.iter().map(|p| p.to_string()).collect())
        .collect();
        for case in cases {
            let mut named = Named::default();
            named.add(Touched::Paths(case.iter().map(PathBuf::from).collect()));
            let want = by_asking_each(&secrets, &named);
            assert_eq!(index.named(&secrets, &named), want, "named {case:?}");
        }
        let mut everything = Named::default();
        everything.add(Touched::Everything);
        assert_eq!(index.named(&secrets, &everything), (0..secrets.len()).collect::<Vec<_>>());
    }

    #[test]
    fn a_neighbour_of_a_directory_is_not_under_it() {
        let secrets = secrets();
        let index = ServedFiles::of(&secrets);
        let mut named = Named::default();
        named.add_path(Path::new("/etc/tenants/a"));
        assert_eq!(index.named(&secrets, &named), vec![0], "not a-b (its '-' sorts before '/')");
    }

    #[test]
    fn holds_each_file_in_any_form_and_nothing_else() {
        let secrets = secrets();
        let index = ServedFiles::of(&secrets);
        assert!(index.holds(&secrets, Path::new("/etc/tenants/a/tls.key")));
        assert!(index.holds(&secrets, Path::new("/etc/tenants/c/tls.key")), "given with // and .");
        assert!(index.holds(&secrets, Path::new("relative/tls.crt")));
        assert!(index.holds(&secrets, Path::new("/etc/crl/x.pem")));
        assert!(!index.holds(&secrets, Path::new("/etc/tenants/a")), "a directory is no file");
        assert!(!index.holds(&secrets, Path::new("/etc/tenants/a/tls")));
    }

    #[test]
    fn many_secrets_are_found_by_name() {
        let secrets: Vec<SecretFiles> =
            (0..1000).map(|i| pair(&format!("/certs/cert-{i}.pem"), &format!("/certs/key-{i}.pem"))).collect();
        let index = ServedFiles::of(&secrets);
        let mut named = Named::default();
        named.add_path(Path::new("/certs/key-500.pem"));
        named.add_path(Path::new("/certs/cert-7.pem"));
        assert_eq!(index.named(&secrets, &named), vec![7, 500]);
        let mut dir = Named::default();
        dir.add_path(Path::new("/certs"));
        assert_eq!(index.named(&secrets, &dir).len(), 1000);
    }
}
