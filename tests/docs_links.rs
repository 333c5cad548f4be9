//! Every link of the README and of the guides under docs/ resolves: the file it names exists
//! (relative to the markdown file that links it), and an anchor (`#heading`, alone or after a `.md`
//! file) names a heading of that file by GitHub's slug rule. Links to `http://`, `https://` and
//! `mailto:` are not followed, and nothing inside fenced code blocks or code spans is a link.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

/// README.md and every docs/*.md, in a stable order.
fn markdown_files(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = fs::read_dir(root.join("docs"))
        .expect("read docs/")
        .map(|entry| entry.expect("docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// Whether a line opens or closes a fenced code block (``` or ~~~, indented by a list item or not).
fn is_fence(line: &str) -> bool {
    let line = line.trim_start();
    line.starts_with("```") || line.starts_with("~~~")
}

/// The text outside fenced code blocks, with each code span blanked out (the lines of a block are
/// kept as empty lines, so that a link never spans a block).
fn prose(markdown: &str) -> String {
    let mut out = String::with_capacity(markdown.len());
    let mut in_fence = false;
    for line in markdown.lines() {
        if is_fence(line) {
            in_fence = !in_fence;
        } else if !in_fence {
            out.push_str(&blank_code_spans(line));
        }
        out.push('\n');
    }
    out
}

/// A line with the contents of its code spans replaced by `x`: `[a](b)` in backticks is no link,
/// and the text of a link may be code (`` [`file`](file) ``).
fn blank_code_spans(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(start) = rest.find('`') {
        out.push_str(&rest[..start]);
        let ticks = rest[start..].chars().take_while(|&c| c == '`').count();
        let fence = &rest[start..start + ticks];
        let after = &rest[start + ticks..];
        match after.find(fence) {
            Some(end) => {
                out.push('x');
                rest = &after[end + ticks..];
            }
            None => {
                out.push_str(&rest[start..start + ticks]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The targets of every inline link `[text](target)` (images included) in the prose.
fn link_targets(prose: &str) -> Vec<String> {
    let chars: Vec<char> = prose.chars().collect();
    let mut targets = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '[' {
            i += 1;
            continue;
        }
        // The `]` that closes this `[`, then `(` right after it.
        let mut depth = 0;
        let mut close = None;
        for (j, &c) in chars.iter().enumerate().skip(i) {
            match c {
                '[' => depth += 1,
                ']' => {
                    depth -= 1;
                    if depth == 0 {
                        close = Some(j);
                        break;
                    }
                }
                _ => {}
            }
        }
        let Some(close) = close else {
            i += 1;
            continue;
        };
        if chars.get(close + 1) != Some(&'(') {
            i += 1;
            continue;
        }
        let mut depth = 0;
        let mut end = None;
        for (j, &c) in chars.iter().enumerate().skip(close + 1) {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(j);
                        break;
                    }
                }
                '\n' if chars.get(j + 1) == Some(&'\n') => break,
                _ => {}
            }
        }
        let Some(end) = end else {
            i += 1;
            continue;
        };
        let inside: String = chars[close + 2..end].iter().collect();
        // A title (`(target "title")`) is not part of the target; `<target>` is the target.
        let target = inside.split_whitespace().next().unwrap_or("");
        let target = target.strip_prefix('<').and_then(|t| t.strip_suffix('>')).unwrap_or(target);
        targets.push(target.to_string());
        // The text may itself hold a link (an image in a link): look inside it too.
        i += 1;
    }
    targets
}

/// GitHub's anchor for a heading's text: lowercase; every char that is not alphanumeric, a space,
/// `-` or `_` removed; spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter(|&c| c.is_alphanumeric() || c == ' ' || c == '-' || c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// A heading's text as GitHub renders it, near enough for its slug: a link becomes its text.
fn heading_text(raw: &str) -> String {
    let raw = raw.trim().trim_end_matches('#').trim_end();
    let mut out = String::new();
    let mut rest = raw;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find("](").map(|c| open + c) else { break };
        let Some(end) = rest[close..].find(')').map(|e| close + e) else { break };
        out.push_str(&rest[..open]);
        out.push_str(&rest[open + 1..close]);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The anchors of a markdown file's headings (ATX, outside fenced code blocks); a repeated
/// heading gets `-1`, `-2`, ... as on GitHub.
fn anchors(markdown: &str) -> HashSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut anchors = HashSet::new();
    let mut in_fence = false;
    for line in markdown.lines() {
        if is_fence(line) {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(&heading_text(&line[hashes..]));
        let count = seen.entry(base.clone()).or_insert(0);
        let mut anchor = base.clone();
        while anchors.contains(&anchor) {
            *count += 1;
            anchor = format!("{base}-{count}");
        }
        anchors.insert(anchor);
    }
    anchors
}

/// What is wrong with a link of `file`, if anything.
fn check_link(root: &Path, file: &Path, markdown: &str, target: &str) -> Option<String> {
    let lower = target.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") || lower.starts_with("mailto:") {
        return None;
    }
    if target.is_empty() {
        return Some("empty target".to_string());
    }
    let (path, anchor) = match target.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (target, None),
    };
    let path = path.split('?').next().unwrap_or(path);
    if path.is_empty() {
        let anchor = anchor.unwrap_or_default();
        return (!anchors(markdown).contains(anchor)).then(|| format!("no heading #{anchor} in this file"));
    }
    let resolved = match path.strip_prefix('/') {
        Some(from_root) => root.join(from_root),
        None => file.parent().expect("a markdown file has a directory").join(path),
    };
    let shown = resolved.strip_prefix(root).unwrap_or(&resolved).display();
    if !resolved.exists() {
        return Some(format!("no file {shown}"));
    }
    match anchor {
        Some(anchor) if resolved.extension().is_some_and(|ext| ext == "md") => {
            let linked = fs::read_to_string(&resolved).expect("read the linked markdown file");
            (!anchors(&linked).contains(anchor)).then(|| format!("no heading #{anchor} in {shown}"))
        }
        _ => None,
    }
}

/// Every broken link of the given markdown files, as `file: (target): why`.
fn broken_links(root: &Path, files: &[PathBuf]) -> Vec<String> {
    let mut broken = Vec::new();
    for file in files {
        let markdown = fs::read_to_string(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        for target in link_targets(&prose(&markdown)) {
            if let Some(why) = check_link(root, file, &markdown, &target) {
                let shown = file.strip_prefix(root).unwrap_or(file);
                broken.push(format!("{}: ({target}): {why}", shown.display()));
            }
        }
    }
    broken
}

#[test]
fn every_link_of_the_readme_and_the_guides_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = markdown_files(root);
    assert!(files.len() > 1, "README.md and at least one guide under docs/");
    let broken = broken_links(root, &files);
    assert!(broken.is_empty(), "{} broken link(s):\n{}", broken.len(), broken.join("\n"));
}

#[test]
fn the_readme_links_every_guide() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = fs::read_to_string(root.join("README.md")).expect("read README.md");
    let linked: HashSet<String> = link_targets(&prose(&readme)).into_iter().collect();
    let unlinked: Vec<String> = markdown_files(root)
        .iter()
        .skip(1)
        .map(|path| format!("docs/{}", path.file_name().expect("a file name").to_string_lossy()))
        .filter(|guide| !linked.iter().any(|target| target.split('#').next() == Some(guide.as_str())))
        .collect();
    assert!(unlinked.is_empty(), "guides the README does not link: {}", unlinked.join(", "));
}

#[test]
fn slugs_follow_github() {
    assert_eq!(slug("Envoy's metrics"), "envoys-metrics");
    assert_eq!(slug("No dead ends: the cold handover"), "no-dead-ends-the-cold-handover");
    assert_eq!(slug("Reaping 10,000 orphans that exit together"), "reaping-10000-orphans-that-exit-together");
    assert_eq!(slug("`POST /reload` and_more"), "post-reload-and_more");
    let repeated = anchors("# A\n## Usage\n```\n# Usage\n```\n### Usage\n## Usage\n");
    let expected: HashSet<String> = ["a", "usage", "usage-1", "usage-2"].map(String::from).into();
    assert_eq!(repeated, expected);
}

#[test]
fn links_are_found_outside_code_only() {
    let markdown = "See [a](a.md) and ![chart](../images/x.svg), `[not](code.md)`,\n[two\nlines](b.md#part) \
                    and [`code`](c.md).\n\n```sh\n[in](fence.md)\n```\n[web](https://example.com) [mail](mailto:x@y)\n";
    assert_eq!(
        link_targets(&prose(markdown)),
        ["a.md", "../images/x.svg", "b.md#part", "c.md", "https://example.com", "mailto:x@y"]
    );
}

#[test]
fn a_broken_link_is_reported() {
    let dir = std::env::temp_dir().join(format!("sesame-docs-links-{}", std::process::id()));
    fs::create_dir_all(dir.join("docs")).expect("create a scratch docs/");
    fs::write(dir.join("README.md"), "# Top\n\n[ok](#top) [gone](docs/missing.md) [bad](docs/g.md#nowhere)\n")
        .expect("write README.md");
    fs::write(dir.join("docs/g.md"), "# Guide\n\n[back](../README.md#top) [up](../README.md#nope)\n")
        .expect("write docs/g.md");
    let broken = broken_links(&dir, &markdown_files(&dir));
    fs::remove_dir_all(&dir).expect("remove the scratch directory");
    assert_eq!(broken.len(), 3, "{broken:#?}");
    assert!(broken[0].starts_with("README.md: (docs/missing.md): no file"), "{broken:#?}");
    assert!(broken[1].starts_with("README.md: (docs/g.md#nowhere): no heading #nowhere"), "{broken:#?}");
    assert!(broken[2].starts_with("docs/g.md: (../README.md#nope): no heading #nope"), "{broken:#?}");
}
