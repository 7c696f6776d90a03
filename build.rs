//! Names the commit the binary is built from, for `rproxy --version` (which, like
//! docker-proxy's, says `(commit …)`): `RPROXY_COMMIT` when whoever builds sets it (a package
//! built from a tarball), else what `git describe` says of the checkout, else nothing and the
//! program says "unknown". No dependency: git's own command line, when it and a checkout are
//! there; any failure is silent.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn main() {
    println!("cargo:rerun-if-env-changed=RPROXY_COMMIT");
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(given) = std::env::var("RPROXY_COMMIT") {
        println!("cargo:rustc-env=RPROXY_COMMIT={given}");
        return;
    }
    let Some(commit) = git(&["describe", "--always", "--abbrev=12"]) else {
        return;
    };
    println!("cargo:rustc-env=RPROXY_COMMIT={commit}");
    // Build again when HEAD moves: a commit, a checkout, a fetch that repacks the refs.
    let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]).map(absolute) {
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}

/// git's answer in the package's directory, trimmed; None when git is missing or fails.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(manifest_dir())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| ".".into()))
}

/// git prints paths relative to the directory it ran in.
fn absolute(path: String) -> PathBuf {
    match Path::new(&path).is_absolute() {
        true => PathBuf::from(path),
        false => manifest_dir().join(path),
    }
}
