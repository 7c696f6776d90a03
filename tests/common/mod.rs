//! Shared helpers for the integration tests: spawning the built binary the way dockerd does
//! (status pipe on fd 3, optional socket on fd 4), reading its verdict, and skipping clearly
//! when a test needs root.
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};

/// The binary under test: this build's, or `RPROXY_TEST_BINARY` (another build, e.g. the one
/// before a fix, to see a test fail on it).
pub fn rproxy() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        std::env::var("RPROXY_TEST_BINARY")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_rproxy").to_string())
    })
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Says why `test` (or a part of it) cannot run here. Run by hand, that is a skip; under
/// `.ci/run`, which sets `RPROXY_TEST_STRICT=1`, it is a failure: a green CI run means every
/// test really ran.
pub fn skip(test: &str, why: &str) {
    if std::env::var_os("RPROXY_TEST_STRICT").is_some_and(|v| v == "1") {
        panic!("{test} cannot run: {why} (RPROXY_TEST_STRICT=1: every test must run)");
    }
    eprintln!("SKIP {test}: {why}");
}

/// Returns false (after saying why, see [`skip`]) when the test needs root and we are not root.
pub fn need_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    skip(
        test,
        "needs root (network namespaces / addresses); run the suite as root",
    );
    false
}

pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A running (or finished) rproxy child with the read end of its status pipe.
pub struct Proxy {
    pub child: Child,
    status: Option<File>,
    stderr_lines: mpsc::Receiver<String>,
    pub listen: Option<SocketAddr>,
}

pub struct Spawn {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Variables whose values need not be UTF-8.
    pub env_os: Vec<(String, std::ffi::OsString)>,
    pub status_pipe: bool,
    pub listen_fd: Option<OwnedFd>,
    /// Shell commands run before exec'ing rproxy (`sh -c '…; exec rproxy …'`): rlimits, closing
    /// inherited fds (cargo's jobserver pipe may sit on fd 4).
    pub shell_prefix: Vec<String>,
    /// stderr to /dev/null, as dockerd does (the log then goes to syslog).
    pub stderr_null: bool,
    /// Commands rproxy runs under (`ip netns exec NS`, `setpriv …`), outermost first.
    pub wrappers: Vec<String>,
    /// The program to run instead of [`rproxy`] (a copy of it, as an upgrade installs).
    pub program: Option<String>,
}

impl Spawn {
    pub fn new(args: &[&str]) -> Spawn {
        Spawn {
            args: self::args(args),
            env: vec![
                ("RPROXY_LOG".into(), "info".into()),
                // Never hand off to a daemon the machine may be running; daemon tests set their own.
                (
                    "RPROXY_SOCKET".into(),
                    "/nonexistent/rproxy-test.sock".into(),
                ),
            ],
            env_os: Vec::new(),
            status_pipe: true,
            listen_fd: None,
            shell_prefix: Vec::new(),
            stderr_null: false,
            wrappers: Vec::new(),
            program: None,
        }
    }

    /// Runs rproxy under `command` (e.g. `["ip", "netns", "exec", "ns1"]`); fds 3 and 4 pass
    /// through.
    pub fn wrap(mut self, command: &[&str]) -> Spawn {
        self.wrappers.extend(command.iter().map(|s| s.to_string()));
        self
    }

    /// Starts with this soft RLIMIT_NOFILE, as children of dockerd do.
    pub fn soft_nofile(mut self, n: u64) -> Spawn {
        self.shell_prefix.push(format!("ulimit -Sn {n}"));
        self
    }

    /// Starts with fd 4 closed.
    pub fn close_fd4(mut self) -> Spawn {
        self.shell_prefix.push("exec 4>&-".into());
        self
    }

    /// The docker-proxy flags dockerd passes: `proto` from `listen` (any port) to `target`.
    pub fn forward(proto: &str, listen: &str, target: SocketAddr) -> Spawn {
        Spawn::forward_at(proto, listen, 0, target)
    }

    /// As [`Spawn::forward`], from `listen`:`port`.
    pub fn forward_at(proto: &str, listen: &str, port: u16, target: SocketAddr) -> Spawn {
        Spawn::new(&[
            "-proto",
            proto,
            "-host-ip",
            listen,
            "-host-port",
            &port.to_string(),
            "-container-ip",
            &target.ip().to_string(),
            "-container-port",
            &target.port().to_string(),
        ])
    }

    pub fn env(mut self, key: &str, value: &str) -> Spawn {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets `key` to `value` (replacing any earlier setting), which need not be UTF-8.
    pub fn env_os(mut self, key: &str, value: &std::ffi::OsStr) -> Spawn {
        self.env.retain(|(k, _)| k != key);
        self.env_os.push((key.into(), value.into()));
        self
    }

    pub fn listen_fd(mut self, fd: impl Into<OwnedFd>) -> Spawn {
        self.listen_fd = Some(fd.into());
        self
    }

    pub fn no_status_pipe(mut self) -> Spawn {
        self.status_pipe = false;
        self
    }

    pub fn spawn(self) -> Proxy {
        let program = self.program.clone().unwrap_or_else(|| rproxy().to_string());
        let mut cmd = match self.shell_prefix.is_empty() {
            false => {
                let mut c = self.command("sh");
                c.arg("-c")
                    .arg(format!(
                        "{} && exec \"$0\" \"$@\"",
                        self.shell_prefix.join(" && ")
                    ))
                    .arg(&program)
                    .args(&self.args);
                c
            }
            true => {
                let mut c = self.command(&program);
                c.args(&self.args);
                c
            }
        };
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        cmd.stderr(if self.stderr_null {
            Stdio::null()
        } else {
            Stdio::piped()
        });
        cmd.env_remove("RPROXY_LOG_FILE");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in &self.env_os {
            cmd.env(k, v);
        }
        let mut mappings = Vec::new();
        let mut status = None;
        if self.status_pipe {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
            mappings.push(FdMapping {
                parent_fd: w,
                child_fd: 3,
            });
            status = Some(File::from(r));
        }
        if let Some(fd) = self.listen_fd {
            mappings.push(FdMapping {
                parent_fd: fd,
                child_fd: 4,
            });
        }
        cmd.fd_mappings(mappings).expect("fd mappings");
        let mut child = cmd.spawn().expect("spawn rproxy");
        // Our copies of the mapped fds were moved into `cmd`; drop it so only the child holds them.
        drop(cmd);
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take();
        std::thread::spawn(move || {
            let Some(stderr) = stderr else { return };
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("  [rproxy] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proxy {
            child,
            status,
            stderr_lines: rx,
            listen: None,
        }
    }
}

impl Spawn {
    fn command(&self, program: &str) -> Command {
        match self.wrappers.split_first() {
            None => Command::new(program),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
        }
    }
}

impl Proxy {
    /// Reads the status pipe to EOF (what dockerd ends up seeing), within 16 s like dockerd.
    pub fn status(&mut self) -> Vec<u8> {
        let mut f = self.status.take().expect("no status pipe");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = f.read_to_end(&mut out);
            let _ = tx.send(out);
        });
        rx.recv_timeout(Duration::from_secs(16))
            .expect("status pipe: no EOF within 16 s")
    }

    /// Waits for "0\n" and learns the bound address from the readiness log line.
    pub fn ready(mut self) -> Proxy {
        let status = self.status();
        assert_eq!(
            String::from_utf8_lossy(&status),
            "0\n",
            "rproxy did not report readiness"
        );
        let line = self.wait_log("serving ", Duration::from_secs(5));
        // "serving tcp 127.0.0.1:41000 -> 127.0.0.1:8000"
        let addr = line
            .split_whitespace()
            .skip_while(|w| *w != "serving")
            .nth(2)
            .unwrap();
        self.listen = Some(addr.parse().expect("listen address in the log"));
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.listen.expect("proxy address unknown")
    }

    /// Waits for the daemon to say where it serves metrics (`--metrics-addr`, port 0
    /// resolved), then to be ready; returns that address.
    pub fn metrics_addr(&self) -> SocketAddr {
        let line = self.wait_log("metrics at http://", Duration::from_secs(10));
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no metrics address in {line:?}"));
        self.wait_log("daemon ready", Duration::from_secs(10));
        addr
    }

    /// Waits for a stderr line containing `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("no log line containing {needle:?} within {timeout:?}"),
            }
        }
    }

    /// Waits for stderr lines containing each of `needles`, in whatever order they come
    /// (lines from different tasks race); returns them in the order of `needles`.
    pub fn wait_logs(&self, needles: &[&str], timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut found: Vec<Option<String>> = vec![None; needles.len()];
        while found.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.stderr_lines.recv_timeout(left) else {
                panic!("no log lines containing all of {needles:?} within {timeout:?}");
            };
            for (needle, slot) in needles.iter().zip(found.iter_mut()) {
                if slot.is_none() && line.contains(needle) {
                    *slot = Some(line.clone());
                }
            }
        }
        found.into_iter().flatten().collect()
    }

    /// Waits for the process to exit; returns its exit code (None: killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                panic!("rproxy did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).expect("kill");
    }

    pub fn output_stdout(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut out) = self.child.stdout.take() {
            let _ = out.read_to_string(&mut s);
        }
        s
    }

    /// Every stderr line that arrives within `period` from now.
    pub fn log_lines_for(&self, period: Duration) -> Vec<String> {
        let deadline = Instant::now() + period;
        let mut lines = Vec::new();
        while let Ok(line) = self
            .stderr_lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            lines.push(line);
        }
        lines
    }

    pub fn stderr_text(&self, timeout: Duration) -> String {
        let mut all = String::new();
        while let Ok(line) = self.stderr_lines.recv_timeout(timeout) {
            all.push_str(&line);
            all.push('\n');
        }
        all
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a proxy for `proto` from `listen` (port 0 = any) to `target` and waits until ready.
pub fn start(proto: &str, listen: &str, target: SocketAddr) -> Proxy {
    start_with(proto, listen, target, &[])
}

pub fn start_with(proto: &str, listen: &str, target: SocketAddr, env: &[(&str, &str)]) -> Proxy {
    let mut spawn = Spawn::forward(proto, listen, target);
    for (k, v) in env {
        spawn = spawn.env(k, v);
    }
    spawn.spawn().ready()
}

/// Does the kernel let us bind IPv6 loopback here?
pub fn has_ipv6() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

/// A TCP echo server on `addr` (port 0 = any), one thread per connection; echoes until EOF,
/// then closes its write side.
pub fn tcp_echo(addr: &str) -> SocketAddr {
    let listener = std::net::TcpListener::bind(addr).expect("bind echo server");
    let local = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut reader = conn.try_clone().unwrap();
                let _ = std::io::copy(&mut reader, &mut conn);
                let _ = conn.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    local
}

/// A UDP echo server on `addr`; replies to every datagram with the same bytes.
pub fn udp_echo(addr: &str) -> SocketAddr {
    let socket = std::net::UdpSocket::bind(addr).expect("bind udp echo");
    let local = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    });
    local
}

/// Sends `data` to `to` from `socket` and waits for one reply (retrying a few times: UDP).
pub fn udp_roundtrip(
    socket: &std::net::UdpSocket,
    to: SocketAddr,
    data: &[u8],
) -> (Vec<u8>, SocketAddr) {
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = vec![0u8; 65536];
    for _ in 0..10 {
        socket.send_to(data, to).expect("udp send");
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            return (buf[..n].to_vec(), from);
        }
    }
    panic!("no UDP reply from {to}");
}

/// Writes `data`, half-closes, and reads everything back.
pub fn tcp_roundtrip(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).expect("connect through proxy");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(data).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read echo");
    out
}

/// A scratch directory for one test (control socket, config files), removed on drop.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("rproxy-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    /// Where a daemon of this test puts its control socket.
    pub fn sock(&self) -> PathBuf {
        self.0.join("ctl.sock")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `ok` every 20 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A network namespace made by a test (root only), deleted on drop.
pub struct Netns {
    pub name: String,
}

pub fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// Creates `rpx-<tag>-<pid>` with loopback up.
    pub fn new(tag: &str) -> Netns {
        let name = format!("rpx-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&format!(
            "ip netns add {name} && ip -n {name} link set lo up"
        ));
        Netns { name }
    }

    /// Runs `f` on a fresh thread that has entered the namespace: sockets it opens, threads
    /// and processes it starts all live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).expect("open netns");
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

// ------------------------------------------------------------------------------------------
// The daemon and its control socket
// ------------------------------------------------------------------------------------------

/// `n` consecutive ports free for TCP and UDP on 127.0.0.1, below the ephemeral range.
pub fn free_ports(n: u16) -> u16 {
    // Tests run in parallel: each call starts somewhere else.
    static CALLS: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let seed = (std::process::id() as u16)
        .wrapping_mul(7919)
        .wrapping_add(call.wrapping_mul(1013));
    for attempt in 0..200u16 {
        let base = 20_000 + (seed.wrapping_add(attempt.wrapping_mul(97)) % 10_000);
        let ok = (base..base + n).all(|p| {
            TcpListener::bind(("127.0.0.1", p)).is_ok() && UdpSocket::bind(("127.0.0.1", p)).is_ok()
        });
        if ok {
            return base;
        }
    }
    panic!("no {n} consecutive free ports");
}

pub fn daemon(dir: &Dir, extra: &[&str]) -> Proxy {
    let sock = dir.sock();
    let mut argv = vec![
        "daemon",
        "--control-socket",
        sock.to_str().unwrap(),
        "--drain-timeout",
        "5",
    ];
    argv.extend_from_slice(extra);
    let p = Spawn::new(&argv).no_status_pipe().spawn();
    p.wait_log("daemon ready", Duration::from_secs(10));
    p
}

/// Runs an rproxy client command; returns (exit code, stdout, stderr).
pub fn cli(dir: &Dir, args: &[&str]) -> (i32, String, String) {
    cli_as(dir, args, None)
}

pub fn cli_as(dir: &Dir, args: &[&str], uid: Option<u32>) -> (i32, String, String) {
    let mut cmd = match uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid",
                &uid.to_string(),
                "--regid",
                &uid.to_string(),
                "--clear-groups",
                "--",
            ]);
            c.arg(rproxy());
            c
        }
        None => Command::new(rproxy()),
    };
    let out = cmd
        .args(args)
        .arg("--control-socket")
        .arg(dir.sock())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// `rproxy ls` rows, each column by its header.
pub fn ls_table(dir: &Dir) -> Vec<std::collections::HashMap<String, String>> {
    let (code, out, err) = cli(dir, &["ls"]);
    assert_eq!(code, 0, "ls failed: {err}");
    let mut lines = out.lines();
    let header: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    lines
        .map(|l| {
            header
                .iter()
                .cloned()
                .zip(l.split_whitespace().map(String::from))
                .collect()
        })
        .collect()
}

/// `rproxy ls` rows as (proto, listen, target, origin, active).
pub fn ls(dir: &Dir) -> Vec<(String, String, String, String, u64)> {
    let (code, out, err) = cli(dir, &["ls"]);
    assert_eq!(code, 0, "ls failed: {err}");
    out.lines()
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            (
                c[0].into(),
                c[1].into(),
                c[2].into(),
                c[3].into(),
                c[5].parse().unwrap(),
            )
        })
        .collect()
}

/// A docker-mode process spawned as dockerd does for 127.0.0.1:`port`, pointed at the
/// daemon; returns once it handed its port over.
pub fn shim(dir: &Dir, proto: &str, port: u16, target: SocketAddr, fd: Option<OwnedFd>) -> Proxy {
    shim_on(dir, proto, "127.0.0.1", port, target, fd)
}

/// As [`shim`], for `host_ip`:`port`.
pub fn shim_on(
    dir: &Dir,
    proto: &str,
    host_ip: &str,
    port: u16,
    target: SocketAddr,
    fd: Option<OwnedFd>,
) -> Proxy {
    let port = port.to_string();
    let tport = target.port().to_string();
    let tip = target.ip().to_string();
    let mut argv = vec!["-proto", proto, "-host-ip", host_ip, "-host-port", &port];
    argv.extend(["-container-ip", &tip, "-container-port", &tport]);
    if fd.is_some() {
        argv.push("-use-listen-fd");
    }
    let mut spawn = Spawn::new(&argv).env("RPROXY_SOCKET", dir.sock().to_str().unwrap());
    if let Some(fd) = fd {
        spawn = spawn.listen_fd(fd);
    }
    let mut p = spawn.spawn();
    assert_eq!(String::from_utf8_lossy(&p.status()), "0\n");
    p.wait_log("handed to the daemon", Duration::from_secs(5));
    p
}

/// Writes a config file publishing `specs`.
pub fn write_config(path: &std::path::Path, specs: &[String]) {
    let list: Vec<String> = specs.iter().map(|s| format!("  \"{s}\",")).collect();
    std::fs::write(path, format!("publish = [\n{}\n]\n", list.join("\n"))).unwrap();
}

/// Raises this test process's soft fd limit to the hard one and returns it, or says why
/// `test` cannot run (see [`skip`]) when the hard limit is under `need`.
pub fn raise_nofile_or_skip(test: &str, need: u64) -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if hard < need {
        skip(
            test,
            &format!("hard RLIMIT_NOFILE is {hard}; this test needs {need}"),
        );
        return None;
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    Some(hard)
}

/// A server in its own process: `script` (python3, on every machine of this kind) prints the
/// port it bound on its first line. Returns the process (kill it) and the port.
pub fn python_server(script: &str) -> (Child, u16) {
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().parse().expect("the server's port");
    (child, port)
}

// ------------------------------------------------------------------------------------------
// The Debian package
// ------------------------------------------------------------------------------------------

/// Whether `program` is on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Whether `cargo deb` (cargo-deb, which .ci/install-deps installs) is there.
pub fn have_cargo_deb() -> bool {
    Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds the Debian package into `out` with `cargo deb` over the binary this test run built
/// (no second build: the profile whose directory holds it); returns its path. `fast`: with
/// cargo-deb's quick compression (a larger file, built in a quarter of the time), for a test
/// that only installs it.
pub fn build_deb(out: &std::path::Path, fast: bool) -> PathBuf {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_rproxy"));
    let profile = match binary.parent().and_then(std::path::Path::file_name) {
        Some(d) if d == "debug" => "dev",
        _ => "release",
    };
    let started = Instant::now();
    let output = Command::new("cargo")
        .args(["deb", "--no-build", "--profile", profile])
        .args(fast.then_some("--fast"))
        .arg("--output")
        .arg(out)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo deb");
    assert!(
        output.status.success(),
        "cargo deb failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("cargo deb: {:?}", started.elapsed());
    let debs: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "{debs:?}");
    debs[0].clone()
}
