//! The repository stands alone: what it tracks names no file outside the checkout, every
//! `docs/` page the README and the code cite exists, and no run artefact (pid file, log) is
//! tracked. A maintainer who clones it alone must find everything it refers to.

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
