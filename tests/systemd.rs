//! The package's unit under a real systemd as PID 1: a minimal Debian bookworm tree
//! (mmdebstrap from the Debian mirrors this machine's apt uses, cached under
//! /var/cache/rproxy-test/ by a hash of what went into it) boots in `systemd-nspawn --boot`
//! with a network namespace of its own; the package this build makes (`cargo deb`) is
//! installed inside with dpkg, and then, through `systemctl` inside:
//!
//! - `start` returns once the daemon said READY=1 (Type=notify), and it serves at once;
//! - its own mappings' listening sockets are in systemd's fd store (FDSTORE=1);
//! - `reload` (SIGHUP) adds and removes mappings, keeps an open connection of an unchanged
//!   one, keeps the main process, and a broken config changes nothing (logged as an error);
//! - an upgrade (dpkg -i over it: postinst reloads, the new binary takes over and becomes the
//!   main process) while a client connects in a loop: not one connection refused;
//! - `restart`, three times, while a client connects through a published port in a loop:
//!   not one connection refused or lost, and the new process serves on the sockets systemd
//!   kept; the process that took over in the upgrade is systemd's own child, so the first
//!   restart drains a connection open across it instead of SIGKILLing it;
//! - a crash (SIGKILL): Restart=on-failure, the store kept meanwhile: nothing refused;
//! - `stop`: the port is closed (the store is emptied), the control socket's directory gone;
//! - `journalctl -u rproxy` has the daemon's lines at their priorities (info 6, error 3).
//!
//! Needs root, systemd-nspawn (systemd-container), mmdebstrap, util-linux (unshare, nsenter)
//! and cargo-deb; .ci/install-deps installs them. The first run on a machine makes the tree
//! (about 2 minutes on 2 cores: downloading and unpacking ~100 packages; 203 MB kept);
//! later runs boot the cached one (a read-only lower layer under a tmpfs:
//! `--volatile=overlay`, so nothing a run does stays) in about a second, and the whole test
//! takes ~13 s, half of it `cargo deb`. A tree that is out of date (Debian's point releases)
//! is still a bookworm with systemd 252: the key changes only with this file's package list
//! or the machine's apt sources; `rm -r /var/cache/rproxy-test` makes it anew. The host's systemd is not involved: nspawn runs in a mount
//! namespace of its own (`--register=no --keep-unit`, its runtime directory on a private
//! tmpfs), and the container shares nothing with the host but the kernel.

mod common;

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

const TEST: &str = "the_unit_starts_reloads_restarts_without_refusing_and_stops";

/// Where built trees are kept between runs, one directory per key.
const CACHE: &str = "/var/cache/rproxy-test";
const SUITE: &str = "bookworm";
/// What the tree holds beyond the minbase variant: systemd, to boot.
const INCLUDE: &str = "systemd";
/// A build of the tree elsewhere (another checkout) may take this long.
const CACHE_PATIENCE: Duration = Duration::from_secs(900);

/// Ports inside the container's network namespace, which holds nothing else.
const PORT: u16 = 8080;
const ADDED: u16 = 8081;
const UDP_PORT: u16 = 5353;
const ECHO: u16 = 9000;

/// Tools the test runs, with the Debian package each comes from.
const TOOLS: &[(&str, &str)] = &[
    ("systemd-nspawn", "systemd-container"),
    ("mmdebstrap", "mmdebstrap"),
    ("unshare", "util-linux"),
    ("nsenter", "util-linux"),
    ("sha256sum", "coreutils"),
    ("dpkg-deb", "dpkg"),
];

#[test]
fn the_unit_starts_reloads_restarts_without_refusing_and_stops() {
    if !need_root(TEST) {
        return;
    }
    for (tool, package) in TOOLS {
        if !on_path(tool) {
            return skip(
                TEST,
                &format!("{tool} not found (package {package}; .ci/install-deps installs it)"),
            );
        }
    }
    if !have_cargo_deb() {
        return skip(TEST, "cargo-deb not found (.ci/install-deps installs it)");
    }
    let sources = match debian_sources() {
        Ok(s) => s,
        Err(why) => return skip(TEST, &why),
    };
    let started = Instant::now();
    let tree = cached_tree(&sources);
    eprintln!("tree ready after {:?}", started.elapsed());
    let share = Dir::new("systemd");
    let deb = build_deb(&share.0.join("deb"), true);
    let booting = Instant::now();
    let c = Container::boot(&tree, &share.0);
    eprintln!("booted in {:?}", booting.elapsed());

    let deb_inside = Path::new("/mnt/rproxy-test/deb").join(deb.file_name().unwrap());
    c.must(&["dpkg", "-i", deb_inside.to_str().unwrap()]);
    // No man-db in the tree: the Documentation= pages are tests/package.rs's to check.
    c.must(&["systemd-analyze", "verify", "--man=no", "rproxy.service"]);
    let unit = c.must(&["systemctl", "cat", "rproxy.service"]);
    assert!(unit.contains("FileDescriptorStoreMax="), "{unit}");

    // Backends in the container's network namespace, served by threads of this process.
    let tcp_backend = c.in_netns(|| tcp_echo(&format!("127.0.0.1:{ECHO}")));
    let udp_backend = c.in_netns(|| udp_echo(&format!("127.0.0.1:{ECHO}")));
    assert_eq!((tcp_backend.port(), udp_backend.port()), (ECHO, ECHO));
    let config = |extra: &str| {
        format!(
            "publish = [\"127.0.0.1:{PORT}:127.0.0.1:{ECHO}\", \
             \"127.0.0.1:{UDP_PORT}:127.0.0.1:{ECHO}/udp\"{extra}]\n\
             # The userland path, which the fd store keeps: no DNAT, no socket hooks.\n\
             nat = \"off\"\nsocket_lb = \"off\"\n"
        )
    };
    c.write_config(&share.0, &config(""));

    // start: Type=notify, so systemctl returns once the daemon is ready; no retry needed.
    let t = Instant::now();
    c.must(&["systemctl", "start", "rproxy"]);
    eprintln!("systemctl start: {:?}", t.elapsed());
    assert_eq!(c.show("ActiveState"), "active");
    assert_eq!(c.show("SubState"), "running");
    let first_pid = c.show("MainPID");
    assert!(c.in_netns(|| echo_once(PORT, b"at once")).is_ok());
    assert_eq!(c.in_netns(|| udp_once(UDP_PORT, b"udp")), b"udp");
    assert_eq!(c.show("NFileDescriptorStore"), "2", "tcp and udp stored");
    let ls = c.must(&["rproxy", "ls"]);
    assert!(ls.contains(&format!("127.0.0.1:{PORT}")), "{ls}");

    // reload: one added, the unchanged mapping's open connection kept.
    let mut open = c.in_netns(|| TcpStream::connect(("127.0.0.1", PORT)).unwrap());
    talk(&mut open, b"before reload");
    c.write_config(
        &share.0,
        &config(&format!(", \"127.0.0.1:{ADDED}:127.0.0.1:{ECHO}\"")),
    );
    c.must(&["systemctl", "reload", "rproxy"]);
    wait_until("the added mapping", Duration::from_secs(10), || {
        c.in_netns(|| echo_once(ADDED, b"added")).is_ok()
    });
    talk(&mut open, b"after reload");
    assert_eq!(c.show("MainPID"), first_pid, "reload replaced the process");
    wait_until("3 sockets in the store", Duration::from_secs(10), || {
        c.show("NFileDescriptorStore") == "3"
    });
    // ... and removed again: out of the store too, so nothing holds its port.
    c.write_config(&share.0, &config(""));
    c.must(&["systemctl", "reload", "rproxy"]);
    wait_until(
        "the removed mapping refused",
        Duration::from_secs(10),
        || {
            c.in_netns(|| echo_once(ADDED, b"gone"))
                .is_err_and(|e| e == ErrorKind::ConnectionRefused)
        },
    );
    wait_until("2 sockets in the store", Duration::from_secs(10), || {
        c.show("NFileDescriptorStore") == "2"
    });
    talk(&mut open, b"after the second reload");
    // A broken config: refused, logged as an error, nothing changed.
    c.write_config(&share.0, "publish = [\n");
    c.must(&["systemctl", "reload", "rproxy"]);
    wait_until(
        "the refused reload's log line",
        Duration::from_secs(10),
        || {
            c.journal()
                .iter()
                .any(|e| e.message.contains("reload refused"))
        },
    );
    talk(&mut open, b"after a refused reload");
    drop(open);
    c.write_config(&share.0, &config(""));

    // An upgrade: dpkg replaces the binary, postinst reloads, and the daemon hands every
    // socket to the new binary, which names itself the main process (MAINPID=). Nothing
    // refused, the store unchanged.
    let clients = ClientLoop::start(&c, PORT);
    std::thread::sleep(Duration::from_millis(200));
    let before = c.show("MainPID");
    // Open across the takeover: the old process, draining it, is still there when the new
    // one names itself the main process.
    let mut held = c.in_netns(|| TcpStream::connect(("127.0.0.1", PORT)).unwrap());
    talk(&mut held, b"before the upgrade");
    c.must(&["dpkg", "-i", deb_inside.to_str().unwrap()]);
    wait_until(
        "the new binary as the main process",
        Duration::from_secs(20),
        || c.show("MainPID") != before,
    );
    talk(&mut held, b"after the takeover, still the old process's");
    drop(held);
    wait_until("the old process gone", Duration::from_secs(20), || {
        !c.alive(&before)
    });
    std::thread::sleep(Duration::from_millis(200));
    let tally = clients.finish();
    eprintln!("client loop through the upgrade: {tally:?}");
    assert_eq!(
        tally.refused, 0,
        "connections refused during the upgrade: {tally:?}"
    );
    assert!(
        tally.failed.is_empty(),
        "connections failed: {tally:?}\n{}",
        c.unit_log()
    );
    assert_eq!(c.show("ActiveState"), "active");
    assert_eq!(c.show("NFileDescriptorStore"), "2");
    // The process that took over must be systemd's child, as one it started is: a main
    // process it did not fork, it stops with SIGTERM and at once, not waiting for it,
    // SIGKILL (KillMode=mixed), which cuts every connection it relays.
    let log = c.unit_log();
    assert!(
        !log.contains("which is not our child"),
        "the main process after the upgrade is not systemd's child:\n{log}"
    );

    // restart while a client connects in a loop: nothing refused, nothing lost.
    let clients = ClientLoop::start(&c, PORT);
    std::thread::sleep(Duration::from_millis(300));
    let mut windows = Vec::new();
    let restarts = 3;
    for i in 0..restarts {
        let before = c.show("MainPID");
        // The first restart stops the process that took over in the upgrade: a connection
        // open across it is drained, not cut (systemctl waits for that).
        let open = (i == 0).then(|| {
            let mut open = c.in_netns(|| TcpStream::connect(("127.0.0.1", PORT)).unwrap());
            talk(&mut open, b"before the restart");
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                talk(&mut open, b"while the restart drains");
            })
        });
        let t = Instant::now();
        c.must(&["systemctl", "restart", "rproxy"]);
        windows.push((t, Instant::now()));
        if let Some(open) = open {
            assert!(
                open.join().is_ok(),
                "the connection open across the restart was cut\n{}",
                c.unit_log()
            );
        }
        eprintln!("systemctl restart: {:?}", t.elapsed());
        let after = c.show("MainPID");
        assert_ne!(before, after, "restart kept the process");
        assert_eq!(c.show("ActiveState"), "active");
        std::thread::sleep(Duration::from_millis(300));
    }
    let tally = clients.finish();
    eprintln!("client loop through restarts: {tally:?}");
    assert_eq!(
        tally.refused, 0,
        "connections refused during restart: {tally:?}"
    );
    assert!(
        tally.failed.is_empty(),
        "connections failed: {tally:?}\n{}",
        c.unit_log()
    );
    let during = windows
        .iter()
        .map(|(from, to)| {
            tally
                .started
                .iter()
                .filter(|s| *s >= from && *s <= to)
                .count()
        })
        .collect::<Vec<_>>();
    assert!(
        during.iter().all(|n| *n > 0),
        "the client loop made no connection during some restart ({during:?}): the test \
         proves nothing"
    );
    assert_eq!(
        c.in_netns(|| udp_once(UDP_PORT, b"udp again")),
        b"udp again"
    );
    let journal = c.journal();
    let reused: Vec<&Entry> = journal
        .iter()
        .filter(|e| {
            e.message
                .contains("fd store: serving 2 mappings on the sockets systemd kept")
        })
        .collect();
    assert_eq!(
        reused.len(),
        restarts,
        "each restart serves on the stored sockets: {journal:#?}"
    );

    // A crash: Restart=on-failure starts it again, and the store is kept meanwhile (the
    // service is never fully stopped), so the own mappings refuse nothing either; only the
    // connection being relayed at the moment of the crash may break.
    let clients = ClientLoop::start(&c, PORT);
    std::thread::sleep(Duration::from_millis(200));
    let before = c.show("MainPID");
    c.must(&["sh", "-c", &format!("kill -KILL {before}")]);
    wait_until(
        "the restart after the crash",
        Duration::from_secs(20),
        || {
            let now = c.show("MainPID");
            now != before && now != "0" && c.show("ActiveState") == "active"
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    let tally = clients.finish();
    eprintln!("client loop through a crash: {tally:?}");
    assert_eq!(
        tally.refused, 0,
        "connections refused after the crash: {tally:?}"
    );
    assert!(
        tally.failed.len() <= 1,
        "connections failed: {tally:?}\n{}",
        c.unit_log()
    );
    assert_eq!(c.show("NRestarts"), "1");

    // stop: systemd empties the store; the port is closed, the runtime directory gone.
    c.must(&["systemctl", "stop", "rproxy"]);
    assert_eq!(c.show("ActiveState"), "inactive");
    assert_eq!(c.show("NFileDescriptorStore"), "0");
    let stopped = c.in_netns(|| echo_once(PORT, b"stopped"));
    assert_eq!(stopped, Err(ErrorKind::ConnectionRefused));
    assert!(!c.run(&["test", "-e", "/run/rproxy"]).status.success());

    // The journal: the daemon's lines, each at its priority, without a priority prefix.
    let journal = c.journal();
    let find = |needle: &str| {
        journal
            .iter()
            .find(|e| e.message.contains(needle))
            .unwrap_or_else(|| panic!("no journal entry with {needle:?}: {journal:#?}"))
    };
    assert_eq!(find("daemon ready").priority, "6");
    assert_eq!(find("reload refused").priority, "3");
    assert_eq!(find("stopping; open connections get").priority, "6");
    let unexpected: Vec<&Entry> = journal
        .iter()
        .filter(|e| e.priority.as_str() <= "4" && !e.message.contains("reload refused"))
        .collect();
    assert!(
        unexpected.is_empty(),
        "warnings or errors beyond the refused reload: {unexpected:#?}"
    );
    for e in &journal {
        assert!(
            !e.message.starts_with('<') && !e.message.starts_with("20"),
            "a prefix or timestamp in the message: {e:?}"
        );
    }
    eprintln!("{TEST}: {:?} in all", started.elapsed());
}

/// The host's apt sources for Debian's own suite (files with a `bookworm` suite): the tree
/// is made from the same mirrors.
fn debian_sources() -> Result<Vec<PathBuf>, String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources"))
            .collect();
        more.sort();
        files.extend(more);
    }
    let ours: Vec<PathBuf> = files
        .into_iter()
        .filter(|p| {
            fs::read_to_string(p).is_ok_and(|text| {
                text.lines()
                    .filter(|l| !l.trim_start().starts_with('#'))
                    .any(|l| l.split_whitespace().any(|w| w == SUITE))
            })
        })
        .collect();
    match ours.is_empty() {
        true => Err(format!(
            "no apt source for Debian {SUITE} in /etc/apt/sources.list* (not a {SUITE} machine?)"
        )),
        false => Ok(ours),
    }
}

/// The tree for `sources`: from the cache, or made now (and kept) when it is not there.
fn cached_tree(sources: &[PathBuf]) -> PathBuf {
    let mut key = format!("mmdebstrap --variant=minbase --include={INCLUDE} {SUITE}\n");
    for s in sources {
        key += &format!("{}\n{}\n", s.display(), fs::read_to_string(s).unwrap());
    }
    let hash = sha256(&key);
    let dir = Path::new(CACHE).join(format!("nspawn-{SUITE}-{}", &hash[..16]));
    let (tree, done) = (dir.join("tree"), dir.join("complete"));
    fs::create_dir_all(CACHE).unwrap();
    let _lock = lock(&Path::new(CACHE).join("nspawn.lock"), CACHE_PATIENCE);
    if done.exists() {
        eprintln!("cached tree {}", tree.display());
        return tree;
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let started = Instant::now();
    let out = Command::new("mmdebstrap")
        .args([
            "--variant=minbase",
            &format!("--include={INCLUDE}"),
            "--quiet",
            SUITE,
        ])
        .arg(&tree)
        .args(sources)
        .stdin(Stdio::null())
        .output()
        .expect("mmdebstrap");
    assert!(
        out.status.success(),
        "mmdebstrap failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(dir.join("key"), &key).unwrap();
    fs::write(&done, format!("{:?}\n", started.elapsed())).unwrap();
    eprintln!(
        "made {} in {:?} (kept for later runs)",
        tree.display(),
        started.elapsed()
    );
    tree
}

fn sha256(text: &str) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

/// Takes an exclusive flock on `path`, waiting up to `patience`.
fn lock(path: &Path, patience: Duration) -> Flock<File> {
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let asked = Instant::now();
    loop {
        file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return lock,
            Err((file, Errno::EWOULDBLOCK | Errno::EINTR)) => file,
            Err((_, e)) => panic!("flock {}: {e}", path.display()),
        };
        assert!(
            asked.elapsed() < patience,
            "{} still held after {patience:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A booted container: systemd-nspawn, and the container's PID 1 as the host sees it.
struct Container {
    nspawn: Child,
    leader: i32,
    log: PathBuf,
}

impl Container {
    /// Boots `tree` (read-only, a tmpfs over it) with `share` at /mnt/rproxy-test, and waits
    /// until systemd says the system is up.
    fn boot(tree: &Path, share: &Path) -> Container {
        let log = share.join("nspawn.log");
        let name = format!("rpx-systemd-{}", std::process::id());
        // nspawn removes its runtime directory (/run/systemd/nspawn) with checks that refuse
        // a /run that is not a tmpfs: a private one, in a mount namespace of its own.
        let script = "mkdir -p /run/systemd/nspawn && \
                      mount -t tmpfs tmpfs /run/systemd/nspawn && \
                      exec systemd-nspawn \"$@\"";
        let nspawn = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "sh",
            ])
            .args([
                "--boot",
                "--quiet",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--volatile=overlay",
                "--console=passive",
                &format!("--machine={name}"),
                &format!("--bind-ro={}:/mnt/rproxy-test", share.display()),
                "--directory",
            ])
            .arg(tree)
            .stdin(Stdio::null())
            .stdout(File::create(&log).unwrap())
            .stderr(File::create(share.join("nspawn.err")).unwrap())
            .spawn()
            .expect("systemd-nspawn");
        let mut c = Container {
            leader: 0,
            nspawn,
            log,
        };
        let parent = c.nspawn.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(60);
        c.leader = loop {
            if let Some(pid) = pid1_under(parent) {
                break pid;
            }
            if let Ok(Some(status)) = c.nspawn.try_wait() {
                panic!("systemd-nspawn exited ({status}): {}", c.logs());
            }
            assert!(Instant::now() < deadline, "no container: {}", c.logs());
            std::thread::sleep(Duration::from_millis(50));
        };
        // PID 1 exists before it is systemd that answers: /run/systemd/system says it is.
        let booted = format!("/proc/{}/root/run/systemd/system", c.leader);
        while !Path::new(&booted).exists() {
            if let Ok(Some(status)) = c.nspawn.try_wait() {
                panic!("systemd-nspawn exited ({status}): {}", c.logs());
            }
            assert!(
                Instant::now() < deadline,
                "systemd did not start: {}",
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // And its private socket answers a moment later.
        let state = loop {
            let up = c.run(&["systemctl", "is-system-running", "--wait"]);
            let state = String::from_utf8_lossy(&up.stdout).trim().to_string();
            if !state.is_empty() || Instant::now() > deadline {
                break state;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            state == "running" || state == "degraded",
            "the container's systemd is {state:?}: {}\n{}",
            c.run_text(&["systemctl", "--failed", "--no-pager"]),
            c.logs()
        );
        c
    }

    fn logs(&self) -> String {
        let err = self.log.with_file_name("nspawn.err");
        format!(
            "{}\n{}",
            fs::read_to_string(&self.log).unwrap_or_default(),
            fs::read_to_string(err).unwrap_or_default()
        )
    }

    /// Runs `argv` inside (every namespace of the container's PID 1), with a clean
    /// environment and a time limit.
    fn run(&self, argv: &[&str]) -> Output {
        Command::new("timeout")
            .args(["120", "nsenter", "--target"])
            .arg(self.leader.to_string())
            .args(["--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup"])
            .args(["--root", "--wd", "--"])
            .args(argv)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("SYSTEMD_PAGER", "")
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .output()
            .expect("nsenter")
    }

    fn run_text(&self, argv: &[&str]) -> String {
        let out = self.run(argv);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Runs `argv` inside; panics with its output and the unit's journal when it fails.
    fn must(&self, argv: &[&str]) -> String {
        let out = self.run(argv);
        assert!(
            out.status.success(),
            "{argv:?} failed ({}):\n{}{}\n--- journal:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.run_text(&["journalctl", "--no-pager", "-n", "60"])
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// rproxy.service's journal as text, each line with its time and process: what a
    /// failed client tally is read against.
    fn unit_log(&self) -> String {
        format!(
            "--- journal of rproxy.service:\n{}",
            self.run_text(&[
                "journalctl",
                "-u",
                "rproxy",
                "-o",
                "short-precise",
                "--no-pager",
            ])
        )
    }

    /// A property of rproxy.service.
    fn show(&self, property: &str) -> String {
        self.must(&["systemctl", "show", "--value", "-p", property, "rproxy"])
            .trim()
            .to_string()
    }

    /// Whether process `pid` (as the container sees it) runs: the tree has no /bin/kill.
    fn alive(&self, pid: &str) -> bool {
        self.run(&["sh", "-c", &format!("kill -0 {pid}")])
            .status
            .success()
    }

    /// Installs `text` as /etc/rproxy/rproxy.toml, through the shared directory.
    fn write_config(&self, share: &Path, text: &str) {
        fs::write(share.join("rproxy.toml"), text).unwrap();
        self.must(&[
            "install",
            "-m",
            "644",
            "/mnt/rproxy-test/rproxy.toml",
            "/etc/rproxy/rproxy.toml",
        ]);
    }

    /// Runs `f` on a thread in the container's network namespace (threads it starts stay
    /// there).
    fn in_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/proc/{}/ns/net", self.leader);
        std::thread::spawn(move || {
            let ns = File::open(&path).expect("open the container's netns");
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// rproxy.service's journal entries, as journalctl's JSON reports them.
    fn journal(&self) -> Vec<Entry> {
        let out = self.must(&["journalctl", "-u", "rproxy", "-o", "json", "--no-pager"]);
        out.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["_PID"].is_string() && v["SYSLOG_IDENTIFIER"] == "rproxy")
            .map(|v| Entry {
                priority: v["PRIORITY"].as_str().unwrap_or_default().to_string(),
                message: v["MESSAGE"].as_str().unwrap_or_default().to_string(),
            })
            .collect()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // nspawn turns SIGTERM into a clean shutdown of the container.
        let pid = nix::unistd::Pid::from_raw(self.nspawn.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// The process whose parent is `parent` and which is PID 1 of its own PID namespace.
fn pid1_under(parent: i32) -> Option<i32> {
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(status) = fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_default()
                .to_string()
        };
        let nspid = field("NSpid:");
        let ids: Vec<&str> = nspid.split_whitespace().collect();
        if field("PPid:") == parent.to_string() && ids.len() >= 2 && ids.last() == Some(&"1") {
            return Some(pid);
        }
    }
    None
}

#[derive(Debug)]
struct Entry {
    priority: String,
    message: String,
}

/// One connection: writes `data`, half-closes, reads the echo; the error kind of a failure.
fn echo_once(port: u16, data: &[u8]) -> Result<(), ErrorKind> {
    echo_traced(port, data).map_err(|(kind, _)| kind)
}

/// As [`echo_once`]; a failure also says where the client connected from (the daemon's
/// debug lines name it) and what came back.
fn echo_traced(port: u16, data: &[u8]) -> Result<(), (ErrorKind, String)> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(30))
        .map_err(|e| (e.kind(), String::new()))?;
    let from = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let fail = |e: std::io::Error, step: &str| (e.kind(), format!("from {from}, at {step}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(data).map_err(|e| fail(e, "write"))?;
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| fail(e, "shutdown"))?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).map_err(|e| fail(e, "read"))?;
    match back == data {
        true => Ok(()),
        false => Err((
            ErrorKind::InvalidData,
            format!("from {from}: got {:?}", String::from_utf8_lossy(&back)),
        )),
    }
}

fn udp_once(port: u16, data: &[u8]) -> Vec<u8> {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp_roundtrip(&socket, ([127, 0, 0, 1], port).into(), data).0
}

/// One exchange on an open connection.
fn talk(s: &mut TcpStream, data: &[u8]) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(data).unwrap();
    let mut back = vec![0; data.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, data);
}

/// A client connecting through a port over and over, one connection at a time, from the
/// container's network namespace.
struct ClientLoop {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Tally>,
}

#[derive(Default)]
struct Tally {
    ok: usize,
    refused: usize,
    failed: Vec<String>,
    /// When each connection started.
    started: Vec<Instant>,
    slowest: Duration,
}

impl std::fmt::Debug for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} connections: {} echoed, {} refused, {} failed {:?}; slowest {:?}",
            self.started.len(),
            self.ok,
            self.refused,
            self.failed.len(),
            self.failed.iter().take(5).collect::<Vec<_>>(),
            self.slowest
        )
    }
}

impl ClientLoop {
    fn start(c: &Container, port: u16) -> ClientLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let path = format!("/proc/{}/ns/net", c.leader);
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let ns = File::open(&path).expect("open the container's netns");
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let mut tally = Tally::default();
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) {
                n += 1;
                let t = Instant::now();
                tally.started.push(t);
                match echo_traced(port, format!("hello {n}\n").as_bytes()) {
                    Ok(()) => tally.ok += 1,
                    Err((ErrorKind::ConnectionRefused, _)) => tally.refused += 1,
                    Err((e, how)) => tally.failed.push(format!("connection {n}: {e:?} ({how})")),
                }
                tally.slowest = tally.slowest.max(t.elapsed());
                std::thread::sleep(Duration::from_millis(2));
            }
            tally
        });
        ClientLoop { stop, thread }
    }

    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}
