//! Logs someone can read: dockerd sends the proxy's stderr to /dev/null, so rproxy must log to
//! the syslog socket (journald's /dev/log) or to RPROXY_LOG_FILE, rate-limited.

mod common;

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
    let (p, addr) = proxy_to_nowhere(&[("RPROXY_SYSLOG_SOCKET", path.to_str().unwrap())]);
    // A flood of failing connections: each logs a warning.
    refused_connections(addr, 400);
    std::thread::sleep(Duration::from_millis(300));
    refused_connections(addr, 1);
    let lines = collector.join().unwrap();
    let prefix = format!("<28>rproxy[{}]: ", p.child.id());
    let warnings = lines
        .iter()
        .filter(|l| l.contains("connection refused"))
        .count();
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with(&prefix) || l.starts_with("<30>")),
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
