//! The Debian package, as an operator meets it: `cargo deb` builds it from this build's
//! binary; it holds the binary, the systemd unit, the config file as a conffile, both man
//! pages, the completions and the docs; `dpkg -i` installs it on this machine; the installed
//! binary answers, `man rproxy` shows the manual, each shell finds its completions where it
//! looks, `systemd-analyze verify` accepts the unit; an operator's edit of the config survives
//! removal and reinstallation; `dpkg --purge` leaves nothing behind.
//!
//! Host state: the package is installed into the real system and purged before the test ends
//! (also when it fails midway). A machine-wide flock (/run/lock/rproxy-package-test.lock)
//! serialises runs of this test from other checkouts; the test refuses to start when rproxy is
//! installed already or /usr/bin/rproxy or /etc/rproxy exist (they are not its to replace).
//! While installed, /etc/rproxy/rproxy.toml holds no mapping, so a daemon another test starts
//! without --config (which reads it) serves what it would without it.

mod common;

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

const LOCK: &str = "/run/lock/rproxy-package-test.lock";
/// A concurrent run takes a few seconds; an apt run of someone else's, a minute or two.
const PATIENCE: Duration = Duration::from_secs(300);
const TEST: &str = "the_package_installs_works_and_purges_cleanly";

/// Every file the package must hold, with its mode.
const CONTENTS: &[(&str, &str)] = &[
    ("./usr/bin/rproxy", "-rwxr-xr-x"),
    ("./usr/lib/systemd/system/rproxy.service", "-rw-r--r--"),
    ("./etc/rproxy/rproxy.toml", "-rw-r--r--"),
    ("./usr/share/man/man8/rproxy.8.gz", "-rw-r--r--"),
    ("./usr/share/man/man5/rproxy.toml.5.gz", "-rw-r--r--"),
    (
        "./usr/share/bash-completion/completions/rproxy",
        "-rw-r--r--",
    ),
    ("./usr/share/zsh/vendor-completions/_rproxy", "-rw-r--r--"),
    (
        "./usr/share/fish/vendor_completions.d/rproxy.fish",
        "-rw-r--r--",
    ),
    ("./usr/share/doc/rproxy/README.md", "-rw-r--r--"),
    ("./usr/share/doc/rproxy/daemon.json", "-rw-r--r--"),
    ("./usr/share/doc/rproxy/copyright", "-rw-r--r--"),
];

/// Every file the package must hold: [`CONTENTS`], and each page of `docs/` beside the README
/// (it links to them all), so a page added to `docs/` is checked without editing this list.
fn contents() -> Vec<(String, &'static str)> {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let mut pages: Vec<String> = fs::read_dir(&docs)
        .unwrap_or_else(|e| panic!("{}: {e}", docs.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".md"))
        .collect();
    pages.sort();
    assert!(
        pages.iter().any(|p| p == "docker-proxy-contract.md"),
        "{pages:?}"
    );
    CONTENTS
        .iter()
        .map(|&(path, mode)| (path.to_string(), mode))
        .chain(
            pages
                .into_iter()
                .map(|p| (format!("./usr/share/doc/rproxy/docs/{p}"), "-rw-r--r--")),
        )
        .collect()
}

#[test]
fn the_package_installs_works_and_purges_cleanly() {
    if !need_root(TEST) {
        return;
    }
    for tool in ["dpkg", "dpkg-deb"] {
        if !on_path(tool) {
            return skip(TEST, &format!("{tool} not found (not a Debian system?)"));
        }
    }
    if !have_cargo_deb() {
        return skip(TEST, "cargo-deb not found (.ci/install-deps installs it)");
    }
    let _lock = machine_lock();
    let installed = run("dpkg-query", &["-W", "-f=${Status}", "rproxy"]);
    assert!(
        !String::from_utf8_lossy(&installed.stdout).contains("installed"),
        "the rproxy package is installed on this machine already ({}); this test installs and \
         purges it: remove it first (dpkg --purge rproxy)",
        String::from_utf8_lossy(&installed.stdout)
    );
    for path in ["/usr/bin/rproxy", "/etc/rproxy"] {
        assert!(
            !Path::new(path).exists(),
            "{path} exists and belongs to no package; this test would replace and then \
             delete it: move it away first"
        );
    }
    let dir = Dir::new("package");
    let deb = build_deb(&dir.0, false);
    check_contents(&deb);

    let _purge = Purge;
    must(&dpkg(&["-i", deb.to_str().unwrap()]), "dpkg -i");
    assert_eq!(status(), "install ok installed");
    let listed = stdout(&run("dpkg", &["-L", "rproxy"]));
    for (path, _) in contents() {
        assert!(
            listed.contains(&path[1..]),
            "dpkg -L lacks {path}:\n{listed}"
        );
    }

    the_installed_binary_answers();
    the_manual_is_found_by_man();
    each_shell_finds_the_completions();
    the_unit_verifies();

    // An operator's edit of the conffile survives removal and reinstallation; purge removes it.
    let conf = Path::new("/etc/rproxy/rproxy.toml");
    let edited = format!(
        "{}# edited by tests/package.rs\n",
        fs::read_to_string(conf).unwrap()
    );
    fs::write(conf, &edited).unwrap();
    must(&dpkg(&["-r", "rproxy"]), "dpkg -r");
    assert_eq!(status(), "deinstall ok config-files");
    assert!(
        !Path::new("/usr/bin/rproxy").exists(),
        "dpkg -r left /usr/bin/rproxy"
    );
    assert_eq!(
        fs::read_to_string(conf).unwrap(),
        edited,
        "dpkg -r lost the edit"
    );
    must(&dpkg(&["-i", deb.to_str().unwrap()]), "dpkg -i again");
    assert_eq!(
        fs::read_to_string(conf).unwrap(),
        edited,
        "reinstalling replaced the operator's config"
    );
    must(&dpkg(&["--purge", "rproxy"]), "dpkg --purge");
    assert_eq!(status(), "", "dpkg still knows the package after purge");
    for path in [
        "/usr/bin/rproxy",
        "/etc/rproxy",
        "/usr/lib/systemd/system/rproxy.service",
        "/etc/systemd/system/rproxy.service",
        "/etc/systemd/system/multi-user.target.wants/rproxy.service",
        "/var/lib/systemd/deb-systemd-helper-masked/rproxy.service",
        "/usr/share/man/man8/rproxy.8.gz",
        "/usr/share/doc/rproxy",
    ] {
        assert!(
            fs::symlink_metadata(path).is_err(),
            "{path} is still there after purge"
        );
    }
    assert!(
        !run("dpkg", &["-L", "rproxy"]).status.success(),
        "dpkg -L still lists files"
    );
}

/// The files with their modes, the control fields, the conffile, and nothing that edits
/// dockerd's configuration.
fn check_contents(deb: &Path) {
    let deb = deb.to_str().unwrap();
    let list = stdout(&must(&run("dpkg-deb", &["-c", deb]), "dpkg-deb -c"));
    for (path, mode) in contents() {
        let line = list
            .lines()
            .find(|l| l.ends_with(&format!(" {path}")))
            .unwrap_or_else(|| panic!("the package lacks {path}:\n{list}"));
        assert!(line.starts_with(mode), "{path}: {line}");
    }
    assert!(
        !list.contains("/etc/docker"),
        "the package ships files for dockerd:\n{list}"
    );
    let field = |name: &str| {
        stdout(&must(&run("dpkg-deb", &["-f", deb, name]), "dpkg-deb -f"))
            .trim()
            .to_string()
    };
    assert_eq!(field("Package"), "rproxy");
    assert_eq!(field("Version"), format!("{}-1", env!("CARGO_PKG_VERSION")));
    assert!(field("Depends").contains("libc6"), "{}", field("Depends"));
    // The project has no mailing address: the field names it and invents none (a
    // distributor builds with `cargo deb --maintainer 'Name <address>'`).
    let maintainer = field("Maintainer");
    assert_eq!(maintainer, "rproxy developers", "{maintainer}");
    let conffiles = stdout(&must(
        &run("dpkg-deb", &["-I", deb, "conffiles"]),
        "conffiles",
    ));
    assert_eq!(conffiles.trim(), "/etc/rproxy/rproxy.toml");
    // The maintainer scripts only talk to systemd; daemon.json is the operator's to edit.
    for script in ["postinst", "prerm", "postrm"] {
        let text = stdout(&run("dpkg-deb", &["-I", deb, script]));
        assert!(
            !text.contains("docker"),
            "{script} mentions docker:\n{text}"
        );
        assert!(
            !text.contains("systemctl enable") && !text.contains("deb-systemd-invoke start"),
            "{script} enables or starts the daemon:\n{text}"
        );
    }
    // An upgrade reloads a running daemon (a takeover by the new binary), never restarts it.
    let postinst = stdout(&run("dpkg-deb", &["-I", deb, "postinst"]));
    assert!(
        postinst.contains("systemctl reload rproxy.service")
            && !postinst.contains("try-restart")
            && !postinst.contains("invoke restart"),
        "postinst:\n{postinst}"
    );
    let prerm = stdout(&run("dpkg-deb", &["-I", deb, "prerm"]));
    assert!(
        prerm.contains("remove") && !prerm.contains("upgrade"),
        "prerm stops the daemon on upgrade:\n{prerm}"
    );
    // The packaged unit and pages are the ones in packaging/.
    let x = Dir::new("package-x");
    must(
        &run("dpkg-deb", &["-x", deb, x.0.to_str().unwrap()]),
        "dpkg-deb -x",
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging");
    assert_eq!(
        fs::read(x.0.join("usr/lib/systemd/system/rproxy.service")).unwrap(),
        fs::read(root.join("rproxy.service")).unwrap()
    );
    let page = stdout(&run(
        "zcat",
        &[x.0.join("usr/share/man/man8/rproxy.8.gz").to_str().unwrap()],
    ));
    assert_eq!(page, fs::read_to_string(root.join("man/rproxy.8")).unwrap());
}

/// The installed binary, with nothing of this environment's RPROXY_* settings.
fn installed(args: &[&str]) -> Output {
    let mut cmd = Command::new("/usr/bin/rproxy");
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RPROXY_") {
            cmd.env_remove(key);
        }
    }
    cmd.output().expect("/usr/bin/rproxy")
}

fn the_installed_binary_answers() {
    let version = stdout(&must(&installed(&["--version"]), "rproxy --version"));
    assert!(
        version.starts_with("rproxy (commit ")
            && version.contains(&format!("version {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    let help = stdout(&must(&installed(&["--help"]), "rproxy --help"));
    for word in [
        "daemon",
        "ls",
        "add",
        "rm",
        "-container-port",
        "-use-listen-fd",
    ] {
        assert!(help.contains(word), "--help lacks {word}:\n{help}");
    }
    // The packaged config file is the default one, and valid.
    let check = stdout(&must(
        &installed(&["daemon", "--check"]),
        "rproxy daemon --check",
    ));
    assert!(
        check.contains("/etc/rproxy/rproxy.toml") && check.contains("mappings:"),
        "{check}"
    );
}

fn the_manual_is_found_by_man() {
    for (args, needles) in [
        (
            &["8", "rproxy"][..],
            &["DOCKER-PROXY MODE", "RPROXY_CONNECT_TIMEOUT", "--check"][..],
        ),
        (
            &["5", "rproxy.toml"][..],
            &["drain_timeout", "[[mapping]]"][..],
        ),
    ] {
        let mut cmd = Command::new("man");
        cmd.arg("--warnings")
            .args(args)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80");
        let out = cmd.output().expect("man");
        must(&out, &format!("man {args:?}"));
        let text = stdout(&out);
        for needle in needles {
            assert!(
                text.contains(needle),
                "man {args:?} lacks {needle:?}:\n{text}"
            );
        }
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(
            warnings.trim().is_empty(),
            "man {args:?} warned:\n{warnings}"
        );
    }
}

/// Each shell loads the completions from where the package put them, as it would for a
/// person typing `rproxy <TAB>`.
fn each_shell_finds_the_completions() {
    let mut missing = Vec::new();
    if on_path("bash") && Path::new("/usr/share/bash-completion/bash_completion").exists() {
        let out = run(
            "bash",
            &[
                "-c",
                "source /usr/share/bash-completion/bash_completion; \
                 _completion_loader rproxy; \
                 COMP_WORDS=(rproxy da); COMP_CWORD=1; _rproxy rproxy da rproxy; \
                 echo \"${COMPREPLY[@]}\"",
            ],
        );
        assert_eq!(stdout(&out).trim(), "daemon", "bash: {out:?}");
    } else {
        missing.push("bash with bash-completion");
    }
    if on_path("zsh") {
        let out = run(
            "zsh",
            &[
                "-fc",
                "autoload -Uz compinit && compinit -u && print -r -- $_comps[rproxy]",
            ],
        );
        assert_eq!(stdout(&out).trim(), "_rproxy", "zsh: {out:?}");
    } else {
        missing.push("zsh");
    }
    if on_path("fish") {
        // Not --no-config: that empties the completion path too. A home of its own instead.
        let home = Dir::new("package-fish");
        let out = Command::new("fish")
            .args(["-c", "complete -C 'rproxy da'"])
            .env("HOME", &home.0)
            .env("XDG_CONFIG_HOME", home.0.join("config"))
            .env("XDG_DATA_HOME", home.0.join("data"))
            .output()
            .expect("fish");
        assert!(stdout(&out).starts_with("daemon\t"), "fish: {out:?}");
    } else {
        missing.push("fish");
    }
    if !missing.is_empty() {
        skip(
            TEST,
            &format!("completions untried for {missing:?} (.ci/install-deps installs them)"),
        );
    }
}

fn the_unit_verifies() {
    if !on_path("systemd-analyze") {
        return skip(
            TEST,
            "systemd-analyze not found (.ci/install-deps installs systemd)",
        );
    }
    let out = run(
        "systemd-analyze",
        &["verify", "/usr/lib/systemd/system/rproxy.service"],
    );
    let said = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    assert!(
        !said.contains("rproxy.service"),
        "systemd-analyze verify: {said}"
    );
}

/// Purges the package on the way out, so a failing test leaves no /usr/bin/rproxy behind.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = dpkg(&["--purge", "rproxy"]);
    }
}

/// The package's dpkg status ("" when dpkg does not know it).
fn status() -> String {
    stdout(&run("dpkg-query", &["-W", "-f=${Status}", "rproxy"]))
}

/// dpkg, waiting while another dpkg or apt holds its lock.
fn dpkg(args: &[&str]) -> Output {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let out = Command::new("dpkg")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .expect("dpkg");
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !err.contains("lock") || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn must(out: &Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.clone()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Takes LOCK, waiting up to PATIENCE for a run from another checkout to finish.
fn machine_lock() -> Flock<File> {
    let _ = fs::create_dir_all("/run/lock");
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(LOCK)
        .unwrap_or_else(|e| panic!("cannot open {LOCK}: {e}"));
    let asked = Instant::now();
    let mut lock = loop {
        file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => break lock,
            Err((file, Errno::EWOULDBLOCK | Errno::EINTR)) => file,
            Err((_, e)) => panic!("flock {LOCK}: {e}"),
        };
        assert!(
            asked.elapsed() < PATIENCE,
            "{LOCK} still held after {PATIENCE:?} ({})",
            fs::read_to_string(LOCK).unwrap_or_default().trim()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = lock
        .set_len(0)
        .and_then(|()| writeln!(lock, "pid {}", std::process::id()));
    lock
}
