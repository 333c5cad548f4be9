//! Reading a bootstrap file, and keeping a large YAML one's parsed form. A YAML bootstrap of a
//! megabyte (a thousand SNI filter chains) takes sesame about a quarter of a second to parse, and
//! every reload reads it again, whether it changed or not (a renewed certificate is a reload). Its
//! parsed form is kept in the runtime directory as JSON, which parses many times faster, known by
//! the path and the content hash of the text it was parsed from: it stands for that text only
//! (and behind its own body's hash: a form altered after it was written is not used).
//! It is kept on disk, not in memory, since an idle launcher should hold little.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use serde_json::Value;

use crate::files::content_hash;

/// Where the parsed form is kept: the runtime directory, private to sesame. Unset (as in unit
/// tests), nothing is kept.
static KEPT_IN: OnceLock<PathBuf> = OnceLock::new();

/// Below this, parsing the YAML costs less than reading a kept form.
const KEEP_ABOVE: usize = 64 * 1024;

const KEPT_FILE: &str = "bootstrap-parsed.json";

/// From now on, the parsed form of a large YAML bootstrap is kept in `dir` (set once, at start).
pub fn keep_parsed_in(dir: &Path) {
    let _ = KEPT_IN.set(dir.to_path_buf());
}

/// The kept form is removed (at exit: it holds what the bootstrap holds, inline keys included).
pub fn forget_parsed() {
    if let Some(dir) = KEPT_IN.get() {
        let _ = std::fs::remove_file(dir.join(KEPT_FILE));
    }
}

/// The parsed file and the content hash of what was read.
pub(super) fn parse_file(path: &Path) -> anyhow::Result<(Value, u64)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the bootstrap {}", path.display()))?;
    let hash = content_hash(text.as_bytes());
    let parsed = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(anyhow::Error::from)
    } else {
        // YAML is a superset of JSON: any other extension is read as YAML.
        parse_yaml(path, &text, hash, KEPT_IN.get().map(PathBuf::as_path))
    };
    parsed.map(|value| (value, hash)).with_context(|| format!("cannot parse the bootstrap {}", path.display()))
}

fn parse_yaml(path: &Path, text: &str, hash: u64, kept_in: Option<&Path>) -> anyhow::Result<Value> {
    let kept = kept_in.filter(|_| text.len() > KEEP_ABOVE).map(|dir| dir.join(KEPT_FILE));
    let key = key(path, hash);
    if let Some(value) = kept.as_deref().and_then(|file| read_kept(file, &key)) {
        return Ok(value);
    }
    let value: Value = serde_saphyr::from_str(text)?;
    if let Some(file) = kept
        && let Err(e) = keep(&file, &key, &value)
    {
        tracing::debug!("cannot keep the parsed bootstrap in {}: {e:#}", file.display());
    }
    Ok(value)
}

/// The first line of a kept form: what it was parsed from.
fn key(path: &Path, hash: u64) -> String {
    let path = content_hash(path.as_os_str().as_encoded_bytes());
    format!("sesame-parsed-bootstrap {hash:016x} {path:016x}\n")
}

/// The kept form, when it was parsed from the text `key` names and its body is what was written
/// (anything else, a torn, altered or foreign file included, is not used).
fn read_kept(file: &Path, key: &str) -> Option<Value> {
    let bytes = std::fs::read(file).ok()?;
    let rest = bytes.strip_prefix(key.as_bytes())?;
    let (line, json) = rest.split_at(rest.iter().position(|&b| b == b'\n')? + 1);
    let written = u64::from_str_radix(std::str::from_utf8(line).ok()?.trim_end(), 16).ok()?;
    if written != content_hash(json) {
        return None;
    }
    serde_json::from_slice(json).ok()
}

/// Written whole under another name and renamed: a reader sees the old form or the new.
fn keep(file: &Path, key: &str, value: &Value) -> anyhow::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let staged = file.with_extension(format!("{}.{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    let written = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        let created = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&staged);
        let mut out = std::io::BufWriter::new(created.with_context(|| format!("cannot create {}", staged.display()))?);
        let json = serde_json::to_vec(value)?;
        out.write_all(key.as_bytes())?;
        out.write_all(format!("{:016x}\n", content_hash(&json)).as_bytes())?;
        out.write_all(&json)?;
        out.flush()?;
        std::fs::rename(&staged, file)?;
        anyhow::Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_form_stands_only_for_the_text_it_was_parsed_from() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(KEPT_FILE);
        let value = serde_json::json!({"admin": {"address": {"pipe": {"path": "/a.sock"}}}});
        let key = key(Path::new("/etc/envoy/envoy.yaml"), 7);
        keep(&file, &key, &value).expect("kept");
        assert_eq!(read_kept(&file, &key), Some(value));
        assert_eq!(read_kept(&file, &super::key(Path::new("/etc/envoy/envoy.yaml"), 8)), None, "other content");
        assert_eq!(read_kept(&file, &super::key(Path::new("/etc/envoy/other.yaml"), 7)), None, "another file");
        let mut torn = std::fs::read(&file).expect("read");
        torn.truncate(torn.len() - 3);
        std::fs::write(&file, torn).expect("write");
        assert_eq!(read_kept(&file, &key), None, "a torn form is not used");
        let names: Vec<_> =
            std::fs::read_dir(dir.path()).expect("list").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(KEPT_FILE)], "nothing staged is left");
    }

    #[test]
    fn a_large_yaml_bootstrap_parses_to_the_same_value_from_its_kept_form() {
        let dir = tempfile::tempdir().expect("tempdir");
        let yaml: String = (0..3000)
            .map(|i| format!("k{i}: {{ on: yes, n: 0x1F, f: 1.5e3, s: \"{i}\", t: ~, list: [a, 2, true] }}\n"))
            .collect();
        assert!(yaml.len() > KEEP_ABOVE);
        let path = dir.path().join("envoy.yaml");
        std::fs::write(&path, &yaml).expect("bootstrap");
        let kept = dir.path().join("runtime");
        std::fs::create_dir(&kept).expect("runtime");
        let parsed = parse_yaml(&path, &yaml, 1, Some(&kept)).expect("parsed");
        assert_eq!(parsed, serde_saphyr::from_str::<Value>(&yaml).expect("yaml"), "the first parse is YAML's");
        let form = std::fs::read(kept.join(KEPT_FILE)).expect("its form was kept");
        assert!(form.starts_with(key(&path, 1).as_bytes()));
        // What is kept is used: a form written whole shows through.
        let json = br#"{"from":"kept"}"#;
        let form =
            format!("{}{:016x}\n{}", key(&path, 1), content_hash(json), std::str::from_utf8(json).expect("utf-8"));
        std::fs::write(kept.join(KEPT_FILE), form).expect("write");
        let again = parse_yaml(&path, &yaml, 1, Some(&kept)).expect("parsed again");
        assert_eq!(again, serde_json::json!({"from": "kept"}), "read from the kept form");
        // One altered after it was written is not: the YAML is parsed again.
        std::fs::write(
            kept.join(KEPT_FILE),
            format!("{}{:016x}\n{}", key(&path, 1), content_hash(json), r#"{"from":"altered"}"#),
        )
        .expect("write");
        assert_eq!(parse_yaml(&path, &yaml, 1, Some(&kept)).expect("parsed"), parsed, "an altered form is not used");
        assert_eq!(parse_yaml(&path, &yaml, 2, Some(&kept)).expect("other content"), parsed, "other content: YAML");
    }
}
