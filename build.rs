//! Two things for the binary, no dependency:
//!
//! - It names the commit it is built from, for `rproxy --version` (which, like docker-proxy's,
//!   says `(commit …)`): `RPROXY_COMMIT` when whoever builds sets it (a package built from a
//!   tarball), else what `git describe` says of the checkout, else nothing and the program
//!   says "unknown". git's own command line, when it and a checkout are there; any failure is
//!   silent.
//! - It is linked position-dependent (`-no-pie`), with libgcc's unwinder inside: see
//!   [`position_dependent`] and [`static_unwinder`].

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn main() {
    position_dependent();
    static_unwinder();
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

/// Links the program (the bin target only: tests and the library keep the defaults) as a
/// position-dependent executable. dockerd runs one process of it per published port (a
/// waiting shim, when a daemon serves the ports), so what each process dirties on its own
/// is multiplied by the number of ports. As a PIE, the dynamic loader writes every pointer
/// of the binary's `.data.rel.ro` (~88 KB here: vtables, tables of string slices) at its
/// load address, which makes those pages private to each process: measured with smaps, 100
/// of a waiting shim's 240 KB of private dirty memory. Linked at a fixed address, they
/// stay clean pages of the file, shared by every process (144 KB private dirty per shim;
/// a `sleep` has 108 KB). The price: the program's own image is not randomised (ASLR still
/// places its libraries, stack and heap). `RPROXY_PIE=1` builds a PIE as before.
fn position_dependent() {
    println!("cargo:rerun-if-env-changed=RPROXY_PIE");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    let pie = std::env::var("RPROXY_PIE").is_ok_and(|v| v == "1");
    if linux && !pie {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
}

/// Links libgcc's unwinder (`libgcc_eh.a`, what a `crt-static` build uses) into the program
/// instead of loading `libgcc_s.so.1`: a shared library costs every process its own
/// written pages (its relocated data and the loader's bookkeeping), 8 KB of a waiting
/// shim's private memory for a library it never calls. Declared on the library target, so
/// it comes before std's `-lgcc_s` on the link line, which `--as-needed` then drops.
fn static_unwinder() {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") == "linux" && var("CARGO_CFG_TARGET_ENV") == "gnu" {
        println!("cargo:rustc-link-lib=static:-bundle=gcc_eh");
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
