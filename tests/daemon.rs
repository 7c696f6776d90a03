//! `rproxy daemon`: many mappings in one process, the control socket (`ls`, `add`, `rm`),
//! docker-mode shims handing their ports over (and taking them back when the daemon dies),
//! reload on SIGHUP and the drain on SIGTERM.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

fn echo_through(addr: SocketAddr, msg: &[u8]) {
    assert_eq!(tcp_roundtrip(addr, msg), msg, "no echo through {addr}");
}

fn refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect(addr), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

fn at(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn ranges_config_file_and_ls() {
    let dir = Dir::new("ranges");
    let echo = tcp_echo("127.0.0.1:0");
    let uecho = udp_echo("127.0.0.1:0");
    let base = free_ports(5);
    // Three ports of a range mapped one to one onto three echo... all to the same echo via
    // single-port specs in the config, and a range on the command line.
    let config = dir.0.join("rproxy.toml");
    std::fs::write(
        &config,
        format!(
            "# test config\npublish = [\n  \"127.0.0.1:{}:127.0.0.1:{}\",\n  \"127.0.0.1:{}:127.0.0.1:{}/udp\",\n]\n",
            base + 3,
            echo.port(),
            base + 4,
            uecho.port()
        ),
    )
    .unwrap();
    // A range onto consecutive backends: only the first has a server, the others refuse.
    let range = format!(
        "127.0.0.1:{}-{}:127.0.0.1:{}-{}",
        base,
        base + 2,
        echo.port(),
        echo.port() + 2
    );
    let p = daemon(&dir, &["--config", config.to_str().unwrap(), "-p", &range]);
    echo_through(at(base), b"range port 0");
    echo_through(at(base + 3), b"config tcp");
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert_eq!(
        udp_roundtrip(&client, at(base + 4), b"config udp").0,
        b"config udp"
    );
    let rows = ls(&dir);
    assert_eq!(rows.len(), 5, "{rows:?}");
    let row = |port: u16| {
        rows.iter()
            .find(|r| r.1 == format!("127.0.0.1:{port}"))
            .unwrap()
            .clone()
    };
    assert_eq!(row(base + 1).2, format!("127.0.0.1:{}", echo.port() + 1));
    assert_eq!(row(base + 1).3, "publish");
    assert_eq!(row(base + 3).3, "config");
    assert_eq!(row(base + 4).0, "udp");
    assert_eq!(row(base + 4).4, 1, "one live UDP flow");
    // Counters: the tcp row saw our bytes.
    let (_, out, _) = cli(&dir, &["ls"]);
    let line = out
        .lines()
        .find(|l| l.contains(&format!("127.0.0.1:{} ", base + 3)))
        .unwrap();
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!((cells[6], cells[8], cells[9]), ("1", "10", "10"), "{line}");
    drop(p);
}

#[test]
fn bad_specs_are_all_reported_before_anything_binds() {
    let dir = Dir::new("badspecs");
    let base = free_ports(2);
    let config = dir.0.join("bad.toml");
    std::fs::write(
        &config,
        "publish = [\n  \"1:127.0.0.1:2\",\n  \"nonsense\",\n]\n",
    )
    .unwrap();
    let good = format!("127.0.0.1:{base}:127.0.0.1:9");
    let out = Command::new(rproxy())
        .args(["daemon", "--control-socket", dir.sock().to_str().unwrap()])
        .args([
            "-p",
            &good,
            "-p",
            "1-3:127.0.0.1:5-6",
            "--config",
            config.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--publish \"1-3:127.0.0.1:5-6\": host range 1-3 has 3 ports"),
        "{err}"
    );
    assert!(
        err.contains(&format!("{}:3: publish \"nonsense\"", config.display())),
        "{err}"
    );
    assert!(
        !dir.sock().exists(),
        "control socket created despite errors"
    );
    // A typo in a key is an error too, with its line.
    std::fs::write(&config, "publish = []\ndrain_timeuot = 3\n").unwrap();
    let out = Command::new(rproxy())
        .args(["daemon", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(":2:") && err.contains("drain_timeuot"),
        "{err}"
    );
}

#[test]
fn add_rm_ls_at_run_time() {
    let dir = Dir::new("addrm");
    let echo = tcp_echo("127.0.0.1:0");
    let base = free_ports(3);
    let _p = daemon(&dir, &[]);
    assert!(ls(&dir).is_empty());
    let spec = format!(
        "127.0.0.1:{}-{}:127.0.0.1:{}-{}",
        base,
        base + 1,
        echo.port(),
        echo.port() + 1
    );
    let (code, out, err) = cli(&dir, &["add", &spec]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("added 2"), "{out}");
    echo_through(at(base), b"added at run time");
    assert_eq!(ls(&dir).len(), 2);
    // The same port again: refused with the reason, nothing changes.
    let (code, _, err) = cli(&dir, &["add", &format!("127.0.0.1:{base}:127.0.0.1:1")]);
    assert_eq!(code, 1);
    assert!(err.contains("already mapped"), "{err}");
    // A port held by someone else: the bind error comes back.
    let held = TcpListener::bind(at(base + 2)).unwrap();
    let (code, _, err) = cli(
        &dir,
        &["add", &format!("127.0.0.1:{}:127.0.0.1:1", base + 2)],
    );
    assert_eq!(code, 1);
    assert!(err.contains("address already in use"), "{err}");
    drop(held);
    let (code, out, err) = cli(&dir, &["rm", &spec]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("removed 2"), "{out}");
    assert!(refused(at(base)), "port still open after rm");
    assert!(ls(&dir).is_empty());
    let (code, _, err) = cli(&dir, &["rm", &spec]);
    assert_eq!(code, 1);
    assert!(err.contains("no mapping matches"), "{err}");
    // No daemon at all: a clear message.
    let (code, _, err) = cli(&Dir::new("nodaemon"), &["ls"]);
    assert_eq!(code, 1);
    assert!(err.contains("no rproxy daemon at"), "{err}");
}

#[test]
fn only_root_or_the_daemons_uid_may_change_mappings() {
    if !need_root("only_root_or_the_daemons_uid_may_change_mappings") {
        return;
    }
    let dir = Dir::new("peercred");
    let _p = daemon(&dir, &[]);
    let mode = std::fs::metadata(dir.sock())
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
    assert_eq!(mode.unwrap(), 0o600);
    // The directory must let uid 65534 reach the socket for the second half.
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let base = free_ports(1);
    let spec = format!("127.0.0.1:{base}:127.0.0.1:9");
    // The file mode keeps other users out...
    let (code, _, err) = cli_as(&dir, &["add", &spec], Some(65534));
    assert_eq!(code, 1);
    assert!(err.contains("permission denied"), "{err}");
    // ...and if the socket is opened up, the daemon still checks the peer's credentials.
    std::fs::set_permissions(
        dir.sock(),
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    let (code, _, err) = cli_as(&dir, &["add", &spec], Some(65534));
    assert_eq!(code, 1);
    assert!(err.contains("uid 65534 may not change mappings"), "{err}");
    let (code, out, err) = cli_as(&dir, &["ls"], Some(65534));
    assert_eq!(code, 0, "ls is read-only and allowed: {err}");
    assert!(out.starts_with("PROTO"));
    assert!(ls(&dir).is_empty(), "the refused add changed something");
}

fn threads(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn shims_hand_their_ports_to_the_daemon() {
    let dir = Dir::new("shim");
    let echo = tcp_echo("127.0.0.1:0");
    let uecho = udp_echo("127.0.0.1:0");
    let base = free_ports(4);
    let _d = daemon(&dir, &[]);
    // Without fd 4 the shim binds (so a conflict is its own error), then hands the socket over.
    let mut s1 = shim(&dir, "tcp", base, echo, None);
    // With fd 4, as dockerd 28+ does, TCP and UDP.
    let l = TcpListener::bind(at(base + 1)).unwrap();
    let mut s2 = shim(&dir, "tcp", base + 1, echo, Some(l.into()));
    let u = UdpSocket::bind(at(base + 2)).unwrap();
    let s3 = shim(&dir, "udp", base + 2, uecho, Some(u.into()));
    let rows = ls(&dir);
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().all(|r| r.3 == "shim"), "{rows:?}");
    echo_through(at(base), b"via shim 1");
    echo_through(at(base + 1), b"via shim 2");
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (reply, from) = udp_roundtrip(&client, at(base + 2), b"udp via shim");
    assert_eq!(
        (reply.as_slice(), from),
        (&b"udp via shim"[..], at(base + 2))
    );
    // The daemon serves; each shim is a single thread with no runtime.
    for s in [&s1, &s2, &s3] {
        assert_eq!(
            threads(s.child.id()),
            1,
            "shim {} has extra threads",
            s.child.id()
        );
    }
    // dockerd stops a shim with SIGINT: it exits 0 and the mapping is gone.
    s1.signal(Signal::SIGINT);
    assert_eq!(s1.wait_exit(Duration::from_secs(2)), Some(0));
    s2.signal(Signal::SIGTERM);
    assert_eq!(s2.wait_exit(Duration::from_secs(2)), Some(0));
    std::thread::sleep(Duration::from_millis(100));
    let rows = ls(&dir);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(refused(at(base)) && refused(at(base + 1)));
    TcpListener::bind(at(base)).expect("port still held after the shim left");
    // A port already taken: the shim's own bind fails and dockerd hears why.
    let held = TcpListener::bind(at(base + 3)).unwrap();
    let mut p = Spawn::new(&[
        "-host-ip",
        "127.0.0.1",
        "-host-port",
        &(base + 3).to_string(),
        "-container-ip",
        "127.0.0.1",
        "-container-port",
        "9",
    ])
    .env("RPROXY_SOCKET", dir.sock().to_str().unwrap())
    .spawn();
    let status = String::from_utf8_lossy(&p.status()).to_string();
    assert!(
        status.starts_with("1\n") && status.contains("address already in use"),
        "{status:?}"
    );
    drop(held);
}

/// The daemon killed with SIGKILL while shims wait: each shim takes its mapping back, serving
/// from the socket copy it kept, so the port never stops answering.
#[test]
fn shims_take_over_when_the_daemon_dies() {
    let dir = Dir::new("takeover");
    let echo = tcp_echo("127.0.0.1:0");
    let uecho = udp_echo("127.0.0.1:0");
    let base = free_ports(2);
    let d = daemon(&dir, &[]);
    let mut tcp_shim = shim(&dir, "tcp", base, echo, None);
    let u = UdpSocket::bind(at(base + 1)).unwrap();
    let udp_shim = shim(&dir, "udp", base + 1, uecho, Some(u.into()));
    echo_through(at(base), b"before");
    d.signal(Signal::SIGKILL);
    tcp_shim.wait_log("daemon went away", Duration::from_secs(5));
    udp_shim.wait_log("daemon went away", Duration::from_secs(5));
    echo_through(at(base), b"after the daemon died");
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert_eq!(
        udp_roundtrip(&client, at(base + 1), b"udp after").0,
        b"udp after"
    );
    // And dockerd can still stop it the usual way.
    tcp_shim.signal(Signal::SIGINT);
    assert_eq!(tcp_shim.wait_exit(Duration::from_secs(2)), Some(0));
}

/// A backend that reports each datagram's source (the daemon's per-flow socket).
fn observed_udp_echo() -> (SocketAddr, mpsc::Receiver<SocketAddr>) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
            if tx.send(from).is_err() {
                break;
            }
        }
    });
    (addr, rx)
}

#[test]
fn sighup_reload_keeps_unchanged_mappings_and_their_connections() {
    let dir = Dir::new("reload");
    let echo = tcp_echo("127.0.0.1:0");
    let (uecho, sources) = observed_udp_echo();
    let base = free_ports(4);
    let keep_tcp = format!("127.0.0.1:{base}:127.0.0.1:{}", echo.port());
    let keep_udp = format!("127.0.0.1:{}:127.0.0.1:{}/udp", base + 1, uecho.port());
    let dropped = format!("127.0.0.1:{}:127.0.0.1:{}", base + 2, echo.port());
    let added = format!("127.0.0.1:{}:127.0.0.1:{}", base + 3, echo.port());
    let config = dir.0.join("rproxy.toml");
    write_config(
        &config,
        &[keep_tcp.clone(), keep_udp.clone(), dropped.clone()],
    );
    let d = daemon(&dir, &["--config", config.to_str().unwrap()]);
    // An open TCP connection and a UDP flow through the mappings that stay.
    let mut conn = TcpStream::connect(at(base)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 6];
    conn.write_all(b"before").unwrap();
    conn.read_exact(&mut buf).unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp_roundtrip(&client, at(base + 1), b"flow");
    let flow_source = sources.recv_timeout(Duration::from_secs(2)).unwrap();
    echo_through(at(base + 2), b"soon gone");

    write_config(&config, &[keep_tcp, keep_udp, added]);
    d.signal(Signal::SIGHUP);
    d.wait_log("reloaded", Duration::from_secs(5));
    conn.write_all(b"after!").unwrap();
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(
        &buf, b"after!",
        "the open connection did not survive the reload"
    );
    udp_roundtrip(&client, at(base + 1), b"flow");
    let mut last = flow_source;
    while let Ok(s) = sources.recv_timeout(Duration::from_millis(200)) {
        last = s;
    }
    assert_eq!(
        last, flow_source,
        "the UDP flow was recreated by the reload"
    );
    assert!(refused(at(base + 2)), "the removed mapping still listens");
    echo_through(at(base + 3), b"added by reload");
    // A broken config is refused whole; everything keeps running.
    std::fs::write(&config, "publish = [\"garbage\"]\n").unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_log("reload refused", Duration::from_secs(5));
    echo_through(at(base + 3), b"still here");
}

#[test]
fn sigterm_closes_listeners_at_once_and_drains_connections() {
    let dir = Dir::new("drain");
    let echo = tcp_echo("127.0.0.1:0");
    let base = free_ports(1);
    let mut d = daemon(
        &dir,
        &["-p", &format!("127.0.0.1:{base}:127.0.0.1:{}", echo.port())],
    );
    let mut conn = TcpStream::connect(at(base)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(b"one").unwrap();
    let mut buf = [0u8; 3];
    conn.read_exact(&mut buf).unwrap();
    d.signal(Signal::SIGTERM);
    let t = Instant::now();
    while !refused(at(base)) {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "listener still open after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The open connection keeps working during the drain...
    conn.write_all(b"two").unwrap();
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"two");
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "exited before the connection finished"
    );
    // ...and once it closes the daemon exits 0 without waiting out the drain time.
    drop(conn);
    assert_eq!(d.wait_exit(Duration::from_secs(2)), Some(0));
    assert!(!dir.sock().exists(), "control socket left behind");
}

/// systemd Type=notify: READY=1 once every mapping listens, STOPPING=1 on SIGTERM; the shipped
/// example config is valid.
#[test]
fn sd_notify_and_the_packaged_config() {
    let dir = Dir::new("notify");
    let notify = dir.0.join("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/rproxy.toml");
    let sock = dir.sock();
    let mut d = Spawn::new(&[
        "daemon",
        "--config",
        config,
        "--control-socket",
        sock.to_str().unwrap(),
    ])
    .env("NOTIFY_SOCKET", notify.to_str().unwrap())
    .no_status_pipe()
    .spawn();
    let mut buf = [0u8; 64];
    let n = systemd.recv(&mut buf).expect("no READY=1");
    assert_eq!(&buf[..n], b"READY=1");
    assert!(sock.exists(), "READY=1 before the control socket existed");
    d.signal(Signal::SIGTERM);
    let n = systemd.recv(&mut buf).expect("no STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert_eq!(d.wait_exit(Duration::from_secs(2)), Some(0));
}

/// The daemon's refusal reaches dockerd through the shim's status pipe: here a shim running as
/// an unprivileged user, which the daemon must not take registrations from.
#[test]
fn a_refused_registration_reaches_fd_3() {
    if !need_root("a_refused_registration_reaches_fd_3") {
        return;
    }
    let dir = Dir::new("refused");
    let _d = daemon(&dir, &[]);
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        dir.sock(),
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    let base = free_ports(1);
    let mut spawn = Spawn::new(&[
        "-host-ip",
        "127.0.0.1",
        "-host-port",
        &base.to_string(),
        "-container-ip",
        "127.0.0.1",
        "-container-port",
        "9",
    ])
    .env("RPROXY_SOCKET", dir.sock().to_str().unwrap());
    spawn
        .shell_prefix
        .push("exec setpriv --reuid 65534 --regid 65534 --clear-groups -- \"$0\" \"$@\"".into());
    let mut p = spawn.spawn();
    let status = String::from_utf8_lossy(&p.status()).to_string();
    assert_eq!(p.wait_exit(Duration::from_secs(5)), Some(1));
    assert!(
        status.starts_with("1\npermission denied: uid 65534 may not change mappings"),
        "{status:?}"
    );
    assert!(ls(&dir).is_empty());
    TcpListener::bind(at(base)).expect("the refused shim left its port bound");
}

/// `--docker-ports` with no dockerd to follow — its socket missing, or a stale socket file
/// nobody accepts on — says so once and serves everything else: the daemon is ready at once
/// and its own mappings work. Without dockerd's API at all, it refuses to start.
#[test]
fn docker_ports_without_dockerd_warn_and_serve_the_rest() {
    let echo = tcp_echo("127.0.0.1:0");
    let (none, stale) = (Dir::new("dports-none"), Dir::new("dports-stale"));
    drop(std::os::unix::net::UnixListener::bind(stale.0.join("docker.sock")).unwrap());
    for dir in [none, stale] {
        let tag = dir.0.display().to_string();
        let docker = dir.0.join("docker.sock");
        let port = free_ports(1);
        let host = format!("unix://{}", docker.display());
        let publish = format!("127.0.0.1:{port}:{echo}");
        let sock = dir.sock();
        let argv = [
            "daemon",
            "--control-socket",
            sock.to_str().unwrap(),
            "--docker-ports",
            "--socket-lb=off",
            "--docker-host",
            &host,
            "-p",
            &publish,
        ];
        let started = Instant::now();
        let p = Spawn::new(&argv).no_status_pipe().spawn();
        // The warning comes from the follower's task: before or after "ready".
        let lines = p.wait_logs(&["docker ports:", "daemon ready"], Duration::from_secs(10));
        let warning = &lines[0];
        assert!(
            warning.contains("WARN") && warning.contains("does not answer"),
            "{warning}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{tag}: ready late"
        );
        echo_through(at(port), b"served without dockerd");
        let rows = ls_table(&dir);
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0]["ORIGIN"], "publish");
        assert_eq!(rows[0]["CONTAINER"], "-");
    }
    let (code, _, err) = {
        let out = Command::new(rproxy())
            .args(["daemon", "--check", "--docker-ports", "--docker-host", ""])
            .env_remove("RPROXY_SOCKET")
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("docker_ports needs dockerd's API"), "{err}");
}

/// The daemon makes the directories its control socket needs (as /run/rproxy without
/// systemd's RuntimeDirectory) and removes them when it exits, once empty; a directory that
/// was there before, or that holds something else by then, stays.
#[test]
fn the_daemon_removes_the_directory_it_made_for_its_socket() {
    let dir = Dir::new("sockdir");
    let made = dir.0.join("run").join("rproxy");
    let sock = made.join("ctl.sock");
    let start = |sock: &std::path::Path| {
        let p = Spawn::new(&["daemon", "--control-socket", sock.to_str().unwrap()])
            .no_status_pipe()
            .spawn();
        p.wait_log("daemon ready", Duration::from_secs(10));
        p
    };
    let mut p = start(&sock);
    assert!(sock.exists(), "no control socket at {}", sock.display());
    p.signal(Signal::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(
        !dir.0.join("run").exists(),
        "left behind: {:?}",
        std::fs::read_dir(&dir.0).unwrap().collect::<Vec<_>>()
    );

    // Made by the daemon, but someone else put a file there meanwhile: it stays, with the file.
    let mut p = start(&sock);
    std::fs::write(made.join("other"), "not the daemon's").unwrap();
    p.signal(Signal::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(!sock.exists() && made.join("other").exists());

    // There before the daemon: it stays, empty.
    std::fs::remove_file(made.join("other")).unwrap();
    let mut p = start(&sock);
    p.signal(Signal::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(
        !sock.exists() && made.is_dir(),
        "the directory that was there went"
    );
}

/// A shim hands dockerd's listening socket, and `--takeover` asks for every socket, only
/// from a daemon run by root or by the client's own user (SO_PEERCRED of the server): a
/// process of another user listening at the control path gets nothing. Here that process is
/// an rproxy daemon run as uid 65534 on a path root uses.
#[test]
fn sockets_go_only_to_a_daemon_of_root_or_the_same_user() {
    if !need_root("sockets_go_only_to_a_daemon_of_root_or_the_same_user") {
        return;
    }
    let dir = Dir::new("servercred");
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let sock = dir.sock();
    let sock = sock.to_str().unwrap();
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    let mut other = Spawn::new(&["daemon", "--control-socket", sock])
        .wrap(&nobody)
        .no_status_pipe()
        .spawn();
    other.wait_log("daemon ready", Duration::from_secs(10));

    // A shim as dockerd runs it (root): it serves its port itself.
    let echo = tcp_echo("127.0.0.1:0");
    let port = free_ports(1);
    let mut shim = Spawn::forward_at("tcp", "127.0.0.1", port, echo)
        .env("RPROXY_SOCKET", sock)
        .spawn();
    assert_eq!(String::from_utf8_lossy(&shim.status()), "0\n");
    assert!(ls(&dir).is_empty(), "the port went to uid 65534's daemon");
    echo_through(at(port), b"served by the shim");
    let said = shim.wait_log("uid 65534", Duration::from_secs(5));
    assert!(said.contains("serving"), "{said}");
    drop(shim);

    // --takeover (root) refuses to take the sockets of uid 65534's daemon.
    let mut taker = Spawn::new(&["daemon", "--control-socket", sock, "--takeover"])
        .no_status_pipe()
        .spawn();
    assert_eq!(taker.wait_exit(Duration::from_secs(10)), Some(1));
    let said = taker.stderr_text(Duration::from_millis(200));
    assert!(said.contains("uid 65534"), "{said}");
    assert_eq!(
        other.child.try_wait().unwrap(),
        None,
        "the other daemon handed over"
    );
    other.signal(Signal::SIGTERM);
    assert_eq!(other.wait_exit(Duration::from_secs(5)), Some(0));
}
