//! Logs someone can read: dockerd sends the proxy's stderr to /dev/null, so rproxy must log to
//! the syslog socket (journald's /dev/log) or to RPROXY_LOG_FILE, rate-limited.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::*;

/// A proxy as dockerd runs it (stderr to /dev/null, socket on fd 4) toward a dead backend.
fn proxy_to_nowhere(env: &[(&str, &str)]) -> (Proxy, SocketAddr) {
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = dead.local_addr().unwrap();
    drop(dead);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut spawn = Spawn::new(&[
        "-container-ip",
        "127.0.0.1",
        "-container-port",
        &target.port().to_string(),
        "-host-ip",
        "127.0.0.1",
        "-use-listen-fd",
    ])
    .listen_fd(OwnedFd::from(listener));
    spawn.stderr_null = true;
    for (k, v) in env {
        spawn = spawn.env(k, v);
    }
    let mut p = spawn.spawn();
    assert_eq!(p.status(), b"0\n");
    (p, addr)
}

fn refused_connections(addr: SocketAddr, n: usize) {
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = std::io::Read::read(&mut s, &mut [0u8; 1]);
    }
}

#[test]
fn syslog_when_stderr_goes_nowhere_with_rate_limit() {
    let dir = std::env::temp_dir().join(format!("rproxy-syslog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("log.sock");
    let _ = std::fs::remove_file(&path);
    let journal = UnixDatagram::bind(&path).unwrap();
    journal
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    // Read as journald does, concurrently with the flood.
    let collector = std::thread::spawn(move || {
        let mut lines = Vec::new();
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = journal.recv(&mut buf) {
            lines.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
        lines
    });
    let (p, addr) = proxy_to_nowhere(&[
        ("RPROXY_SYSLOG_SOCKET", path.to_str().unwrap()),
        ("RPROXY_LOG", "debug"),
    ]);
    // A flood of failing connections: each logs a line at debug (the warning itself comes
    // once per 10 s).
    refused_connections(addr, 400);
    std::thread::sleep(Duration::from_millis(300));
    refused_connections(addr, 1);
    let lines = collector.join().unwrap();
    let tag = format!(">rproxy[{}]: ", p.child.id());
    let warnings = lines
        .iter()
        .filter(|l| l.contains("connection refused"))
        .count();
    assert!(
        lines.iter().all(|l| ["<28>", "<30>", "<31>"]
            .iter()
            .any(|pri| l.starts_with(pri) && l.contains(&tag))),
        "syslog lines not in `<PRI>rproxy[pid]: msg` form: {:?}",
        &lines[..lines.len().min(3)]
    );
    assert!(
        warnings >= 100,
        "only {warnings} warnings reached syslog: {:?}",
        &lines[..lines.len().min(5)]
    );
    assert!(
        warnings < 300,
        "{warnings} of 401 warnings passed: no rate limit"
    );
    assert!(
        lines.iter().any(|l| l.contains("log lines suppressed")),
        "no note of suppressed lines"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn log_file_and_filter_from_environment() {
    let file = std::env::temp_dir().join(format!("rproxy-log-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let (_p, addr) = proxy_to_nowhere(&[
        ("RPROXY_LOG_FILE", file.to_str().unwrap()),
        ("RPROXY_LOG", "debug"),
    ]);
    refused_connections(addr, 1);
    std::thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("INFO") && text.contains("serving tcp 127.0.0.1:"),
        "{text}"
    );
    assert!(
        text.contains("WARN") && text.contains("connection refused"),
        "{text}"
    );
    let _ = std::fs::remove_file(&file);
}

#[test]
fn a_failing_backend_warns_once_per_interval_not_per_connection() {
    let file = std::env::temp_dir().join(format!("rproxy-warn-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let (_p, addr) = proxy_to_nowhere(&[
        ("RPROXY_LOG_FILE", file.to_str().unwrap()),
        ("RPROXY_LOG", "warn"),
    ]);
    refused_connections(addr, 20);
    std::thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(&file).unwrap();
    let warnings = text.lines().filter(|l| l.contains("cannot reach")).count();
    assert_eq!(warnings, 1, "{text}");
    let _ = std::fs::remove_file(&file);
}

#[test]
fn json_lines_in_both_modes() {
    let file = std::env::temp_dir().join(format!("rproxy-json-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&file);
    // Docker mode: RPROXY_LOG_FORMAT (dockerd's argv cannot carry a flag).
    let (_p, addr) = proxy_to_nowhere(&[
        ("RPROXY_LOG_FILE", file.to_str().unwrap()),
        ("RPROXY_LOG", "info"),
        ("RPROXY_LOG_FORMAT", "json"),
    ]);
    refused_connections(addr, 1);
    std::thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(&file).unwrap();
    let _ = std::fs::remove_file(&file);
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(events.iter().any(|e| e["level"] == "WARN"
        && e["message"]
            .as_str()
            .is_some_and(|m| m.contains("connection refused"))));
    assert!(events.iter().all(|e| e["timestamp"].is_string()), "{text}");

    // The daemon: --log-format json.
    let sock = std::env::temp_dir().join(format!("rproxy-json-{}.sock", std::process::id()));
    let mut d = Spawn::new(&[
        "daemon",
        "--log-format",
        "json",
        "--control-socket",
        sock.to_str().unwrap(),
        "-p",
        "127.0.0.1:0:127.0.0.1:9",
    ])
    .no_status_pipe()
    .spawn();
    let line = d.wait_log("daemon ready", Duration::from_secs(10));
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["level"], "INFO", "{line}");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
}

/// A process whose stderr is a pipe nobody reads (journald stalled on its stream socket, a
/// `| less` left paused) keeps serving: log lines that cannot be written at once are dropped
/// and counted, never waited for on a runtime thread. The pipe is shrunk to one page so a
/// few lines fill it; once it is read again, the next line says how many were dropped.
#[test]
fn a_stalled_stderr_drops_lines_and_blocks_nothing() {
    let echo = tcp_echo("127.0.0.1:0");
    let dir = Dir::new("stalled-stderr");
    let sock = dir.sock();
    let port = free_ports(2);
    let daemon_publish = format!("127.0.0.1:{port}:{echo}");
    let daemon = [
        "daemon",
        "--control-socket",
        sock.to_str().unwrap(),
        "-p",
        &daemon_publish,
    ];
    let docker_port = (port + 1).to_string();
    let echo_port = echo.port().to_string();
    let docker = [
        "-host-ip",
        "127.0.0.1",
        "-host-port",
        &docker_port,
        "-container-ip",
        "127.0.0.1",
        "-container-port",
        &echo_port,
    ];
    for (argv, addr) in [(&daemon[..], at(port)), (&docker[..], at(port + 1))] {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096)).unwrap();
        let mut child = std::process::Command::new(rproxy())
            .args(argv)
            .env("RPROXY_LOG", "debug")
            .env("RPROXY_SOCKET", "/nonexistent/rproxy-test.sock")
            .env_remove("RPROXY_LOG_FILE")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::from(write))
            .spawn()
            .unwrap();
        wait_until("the proxy serves", Duration::from_secs(10), || {
            TcpStream::connect(addr).is_ok()
        });
        // Two debug lines per connection: the page fills within the first few dozen.
        for i in 0..150 {
            let msg = format!("connection {i}");
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.write_all(msg.as_bytes()).unwrap();
            let mut got = vec![0u8; msg.len()];
            if let Err(e) = s.read_exact(&mut got) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{argv:?}: {msg} got no echo ({e}): the proxy waits on its stderr");
            }
        }
        // Read the pipe again; the next line (one more connection) reports the drops.
        let mut pipe = std::fs::File::from(read);
        let mut seen = Vec::new();
        let flags = nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&pipe, nix::fcntl::FcntlArg::F_SETFL(flags)).unwrap();
        let mut chunk = [0u8; 4096];
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !String::from_utf8_lossy(&seen).contains("log lines dropped") {
            assert!(
                std::time::Instant::now() < deadline,
                "{argv:?}: no word of the dropped lines in:\n{}",
                String::from_utf8_lossy(&seen)
            );
            let _ = TcpStream::connect(addr);
            std::thread::sleep(Duration::from_millis(50));
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                seen.extend_from_slice(&chunk[..n]);
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn at(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
