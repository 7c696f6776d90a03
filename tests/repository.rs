//! The repository stands alone: what it tracks names no file outside the checkout, every
//! `docs/` page the README and the code cite exists, and no run artefact (pid file, log) is
//! tracked. A maintainer who clones it alone must find everything it refers to. The docs hold
//! together: every relative link in README.md and docs/*.md leads to a tracked file (and to a
//! heading there, when it names one), the README links to every page of `docs/`, and each
//! page opens with a paragraph saying what it covers.

mod common;

use std::path::Path;
use std::process::Command;

use common::skip;

const TEST: &str = "repository";

/// The tracked files, or None (after saying why) when this is not a git checkout.
fn tracked(test: &str) -> Option<Vec<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(root)
        .output();
    match out {
        Ok(o) if o.status.success() => Some(
            String::from_utf8_lossy(&o.stdout)
                .split('\0')
                .filter(|f| !f.is_empty())
                .map(str::to_string)
                .collect(),
        ),
        _ => {
            skip(test, "not a git checkout (or no git): nothing to list");
            None
        }
    }
}

fn text_of(file: &str) -> Option<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    std::fs::read_to_string(path).ok()
}

/// Paths that lead out of the checkout: the sibling directory the specs were kept in while
/// the project started, and the work area around it. Spelt in pieces so this file does not
/// match itself.
fn outside_references() -> [String; 2] {
    [
        format!("..{}shared{}", '/', '/'),
        format!("{}work{}shared", '/', '/'),
    ]
}

#[test]
fn no_tracked_file_points_outside_the_repository() {
    let Some(files) = tracked(&format!("{TEST}::no_tracked_file_points_outside")) else {
        return;
    };
    let mut found = Vec::new();
    for file in files.iter().filter(|f| !f.ends_with("Cargo.lock")) {
        let Some(text) = text_of(file) else { continue };
        for (n, line) in text.lines().enumerate() {
            if outside_references()
                .iter()
                .any(|r| line.contains(r.as_str()))
            {
                found.push(format!("{file}:{}: {line}", n + 1));
            }
        }
    }
    assert!(
        found.is_empty(),
        "references outside the repository:\n{}",
        found.join("\n")
    );
}

#[test]
fn every_cited_docs_page_exists() {
    let Some(files) = tracked(&format!("{TEST}::every_cited_docs_page_exists")) else {
        return;
    };
    let mut missing = Vec::new();
    for file in &files {
        let Some(text) = text_of(file) else { continue };
        for (i, _) in text.match_indices("docs/") {
            // A page name: docs/ then name characters, ending in .md.
            let rest = &text[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || "/-_.".contains(c)))
                .unwrap_or(rest.len());
            let cited = rest[..end].trim_end_matches('.');
            let starts_a_word = i == 0 || !text.as_bytes()[i - 1].is_ascii_alphanumeric();
            if starts_a_word && cited.ends_with(".md") && !files.iter().any(|f| f == cited) {
                missing.push(format!("{file} cites {cited}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "cited but not tracked:\n{}",
        missing.join("\n")
    );
}

#[test]
fn no_run_artefacts_are_tracked() {
    let Some(files) = tracked(&format!("{TEST}::no_run_artefacts_are_tracked")) else {
        return;
    };
    let artefacts: Vec<&String> = files
        .iter()
        .filter(|f| [".pid", ".log", ".sock"].iter().any(|ext| f.ends_with(ext)))
        .collect();
    assert!(artefacts.is_empty(), "run artefacts tracked: {artefacts:?}");
}

/// The Markdown pages a reader moves between: the README and every page under `docs/`.
fn pages(files: &[String]) -> Vec<&String> {
    files
        .iter()
        .filter(|f| *f == "README.md" || (f.starts_with("docs/") && f.ends_with(".md")))
        .collect()
}

/// The targets of the inline links `[text](target)` in a Markdown text, outside code blocks
/// and code spans.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Drop code spans, whose brackets are not links.
        let prose: String = line.split('`').step_by(2).collect::<Vec<_>>().join(" ");
        let mut rest = prose.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            targets.push(after[..end].trim().to_string());
            rest = &after[end..];
        }
    }
    targets
}

/// The anchor GitHub gives a heading: lower case, punctuation dropped but `-` and `_`,
/// spaces turned into `-`.
fn anchor_of(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            found.push(anchor_of(line.trim_start_matches('#')));
        }
    }
    found
}

/// Where a relative link leads from the page that holds it, as a path from the checkout's
/// root (`..` resolved), or None when it leaves the checkout.
fn resolve(page: &str, target: &str) -> Option<String> {
    let mut parts: Vec<&str> = page.split('/').collect();
    parts.pop();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let Some(files) = tracked(&format!("{TEST}::every_relative_link_in_the_docs_resolves")) else {
        return;
    };
    let mut broken = Vec::new();
    for page in pages(&files) {
        let Some(text) = text_of(page) else { continue };
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let file = if path.is_empty() {
                Some(page.clone())
            } else {
                resolve(page, path)
            };
            let Some(file) = file else {
                broken.push(format!("{page}: {target} leads out of the repository"));
                continue;
            };
            let is_dir = files.iter().any(|f| f.starts_with(&format!("{file}/")));
            if !files.contains(&file) && !is_dir {
                broken.push(format!("{page}: {target}: no tracked {file}"));
                continue;
            }
            if let Some(anchor) = anchor {
                let heads = text_of(&file).map(|t| anchors(&t)).unwrap_or_default();
                if !heads.iter().any(|h| h == anchor) {
                    broken.push(format!("{page}: {target}: {file} has no heading #{anchor}"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn every_docs_page_is_linked_from_the_readme() {
    let Some(files) = tracked(&format!(
        "{TEST}::every_docs_page_is_linked_from_the_readme"
    )) else {
        return;
    };
    let readme = text_of("README.md").expect("README.md");
    let linked: Vec<String> = link_targets(&readme)
        .iter()
        .filter_map(|t| resolve("README.md", t.split('#').next().unwrap_or_default()))
        .collect();
    let unlinked: Vec<&String> = pages(&files)
        .into_iter()
        .filter(|p| *p != "README.md" && !linked.contains(p))
        .collect();
    assert!(
        unlinked.is_empty(),
        "docs pages the README does not link to: {unlinked:?}"
    );
}

#[test]
fn every_docs_page_says_first_what_it_covers() {
    let Some(files) = tracked(&format!(
        "{TEST}::every_docs_page_says_first_what_it_covers"
    )) else {
        return;
    };
    let mut bare = Vec::new();
    for page in pages(&files).into_iter().filter(|p| *p != "README.md") {
        let Some(text) = text_of(page) else { continue };
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let title = lines.next().unwrap_or_default();
        let first = lines.next().unwrap_or_default();
        if !title.starts_with("# ") || first.starts_with('#') || first.starts_with('|') {
            bare.push(page.as_str());
        }
    }
    assert!(
        bare.is_empty(),
        "docs pages that do not open with a title and a paragraph saying what they cover: \
         {bare:?}"
    );
}

#[test]
fn link_checking_understands_markdown() {
    let text = "See [a](dir/a.md#x) and `[not](a link)`.\n```sh\n[no](code)\n```\n# X y: `z`\n";
    assert_eq!(link_targets(text), ["dir/a.md#x"]);
    assert_eq!(anchors(text), ["x-y-z"]);
    assert_eq!(anchor_of(" Kernel DNAT: `--nat`"), "kernel-dnat---nat");
    assert_eq!(
        resolve("dir/a.md", "../README.md"),
        Some("README.md".to_string())
    );
    assert_eq!(resolve("dir/a.md", "../../x"), None);
}
