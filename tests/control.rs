//! The control socket keeps its promises: a registration is released however its shim goes,
//! a spec must name the socket it comes with, ports dockerd published are dockerd's to
//! remove, idle or stuck peers on either side cost a bounded amount and a bounded wait, and a
//! reload is all or nothing even while `rproxy add/rm` run beside it.

mod common;

use std::io::{IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

fn at(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn serves(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let ok = s.write_all(b"ping").is_ok() && s.shutdown(std::net::Shutdown::Write).is_ok();
    let mut out = Vec::new();
    ok && s.read_to_end(&mut out).is_ok() && out == b"ping"
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Sends a raw request line with `fd` attached, as a shim does; returns the reply line.
fn raw_request(sock: &Path, line: &str, fd: Option<&impl AsRawFd>) -> String {
    let stream = UnixStream::connect(sock).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let data = format!("{line}\n");
    let fds = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage<'_>> = fds.iter().map(|f| ControlMessage::ScmRights(f)).collect();
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(data.as_bytes())],
        &cmsgs,
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    let mut reply = String::new();
    let _ = (&stream).read_to_string(&mut reply);
    reply
}

/// The daemon stops answering (SIGSTOP): a shim's registration times out and it serves the
/// port itself; `rproxy ls` says the daemon is stuck instead of hanging; when the daemon
/// wakes and finds the shim gone from that connection, it keeps nothing registered.
#[test]
fn a_stuck_daemon_costs_a_bounded_wait_and_leaves_nothing_behind() {
    let dir = Dir::new("ctl-stuck");
    let d = daemon(&dir, &[]);
    let echo = tcp_echo("127.0.0.1:0");
    let port = free_ports(1);
    d.signal(Signal::SIGSTOP);
    let started = Instant::now();
    let ls_dir = Dir(dir.0.clone());
    let ls_thread = std::thread::spawn(move || {
        let t = Instant::now();
        let result = cli(&ls_dir, &["ls"]);
        std::mem::forget(ls_dir); // the test's own Dir removes it
        (result, t.elapsed())
    });
    let mut s = Spawn::forward_at("tcp", "127.0.0.1", port, echo)
        .env("RPROXY_SOCKET", dir.sock().to_str().unwrap())
        .spawn();
    assert_eq!(
        String::from_utf8_lossy(&s.status()),
        "0\n",
        "the shim must serve its port itself when the daemon does not answer"
    );
    s.wait_log("serving", Duration::from_secs(5));
    eprintln!("shim gave up after {:?}", started.elapsed());
    let ((code, _, err), took) = ls_thread.join().unwrap();
    assert_eq!(code, 1, "ls against a stuck daemon must fail");
    assert!(err.contains("did not answer"), "{err}");
    assert!(took < Duration::from_secs(20), "ls took {took:?}");
    d.signal(Signal::SIGCONT);
    // The daemon reads the stale registration now; give it time to act on it.
    std::thread::sleep(Duration::from_secs(2));
    let rows = ls(&dir);
    assert!(
        rows.is_empty(),
        "a registration whose shim gave up is still held: {rows:?}"
    );
    assert!(serves(at(port)), "the shim serves its port");
}

/// A spec that names another address than its socket's is refused (it would file the port
/// under a key nothing could stop it by), and nothing is registered.
#[test]
fn a_registration_must_name_its_sockets_address() {
    let dir = Dir::new("ctl-mismatch");
    let _d = daemon(&dir, &[]);
    let echo = tcp_echo("127.0.0.1:0");
    let socket = TcpListener::bind("127.0.0.1:0").unwrap();
    let real = socket.local_addr().unwrap().port();
    let other = free_ports(1);
    let spec = format!("127.0.0.1:{other}:{echo}/tcp");
    let reply = raw_request(
        &dir.sock(),
        &format!(r#"{{"request":"register","spec":"{spec}"}}"#),
        Some(&socket),
    );
    assert!(
        reply.contains("error") && reply.contains(&format!("bound to 127.0.0.1:{real}")),
        "{reply}"
    );
    assert!(ls(&dir).is_empty());
    // Junk requests get a refusal, not a hang or a crash.
    for junk in [
        "ls",
        "{",
        r#"{"request":"register"}"#,
        r#"{"request":"add","spec":"1:1.2.3.4:1","options":{"connect_timeout_ms":0}}"#,
        r#"{"request":"add","spec":"1:1.2.3.4:1","options":{"udp_max_flows":18446744073709551615}}"#,
    ] {
        let reply = raw_request(&dir.sock(), junk, None::<&TcpListener>);
        assert!(reply.contains(r#""reply":"error""#), "{junk}: {reply}");
    }
    assert!(ls(&dir).is_empty());
}

/// `rproxy rm` of a port a shim handed over is refused with the reason: dockerd would go on
/// believing it published.
#[test]
fn rm_leaves_ports_dockerd_published_to_dockerd() {
    let dir = Dir::new("ctl-rm-shim");
    let _d = daemon(&dir, &[]);
    let echo = tcp_echo("127.0.0.1:0");
    let port = free_ports(1);
    let _s = shim(&dir, "tcp", port, echo, None);
    let spec = format!("127.0.0.1:{port}:{echo}");
    let (code, _, err) = cli(&dir, &["rm", &spec]);
    assert_eq!(code, 1, "rm of a shim's port must fail");
    assert!(err.contains("published by dockerd"), "{err}");
    let rows = ls(&dir);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].3, "shim");
    assert!(serves(at(port)));
}

/// 1,000 idle connections to the control socket: `ls` still answers within a second, the
/// daemon holds a bounded number of them, and idle ones are closed after the request
/// timeout.
#[test]
fn idle_control_connections_are_bounded_and_never_lock_out_ls() {
    if raise_nofile_or_skip(
        "idle_control_connections_are_bounded_and_never_lock_out_ls",
        4096,
    )
    .is_none()
    {
        return;
    }
    let dir = Dir::new("ctl-idle");
    let d = daemon(&dir, &[]);
    let pid = d.child.id();
    let base_fds = open_fds(pid);
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(UnixStream::connect(dir.sock()).unwrap());
    }
    // Half a request on some: they count as idle too.
    for s in idle.iter_mut().step_by(10) {
        let _ = s.write_all(br#"{"request":"#);
    }
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let (code, out, err) = cli(&dir, &["ls"]);
    let took = t.elapsed();
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("PROTO"));
    assert!(took < Duration::from_secs(1), "ls took {took:?}");
    let held = open_fds(pid).saturating_sub(base_fds);
    eprintln!(
        "ls answered in {took:?} beside 1,000 idle connections; the daemon holds {held} of them"
    );
    assert!(held <= 100, "the daemon holds {held} idle connections");
    // The newest idle connection (never evicted) is closed when its request is overdue.
    let mut last = idle.pop().unwrap();
    last.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let t = Instant::now();
    let mut buf = Vec::new();
    let _ = last.read_to_end(&mut buf);
    assert!(
        t.elapsed() < Duration::from_secs(7),
        "an idle connection stayed open {:?}",
        t.elapsed()
    );
    assert!(
        String::from_utf8_lossy(&buf).contains("no request within"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
}

/// A reload whose new file cannot be applied as a whole changes nothing, even the parts that
/// could have been applied.
#[test]
fn a_reload_that_cannot_be_applied_whole_changes_nothing() {
    let dir = Dir::new("ctl-reload-atomic");
    let echo = tcp_echo("127.0.0.1:0");
    let base = free_ports(3);
    let config = dir.0.join("rproxy.toml");
    let spec = |p: u16| format!("127.0.0.1:{p}:{echo}");
    write_config(&config, &[spec(base)]);
    let d = daemon(&dir, &["--config", config.to_str().unwrap()]);
    // base + 1 is taken by `rproxy add`; the new file wants it and base + 2.
    let (code, _, err) = cli(&dir, &["add", &spec(base + 1)]);
    assert_eq!(code, 0, "{err}");
    write_config(&config, &[spec(base + 1), spec(base + 2)]);
    d.signal(Signal::SIGHUP);
    d.wait_log("reload refused", Duration::from_secs(5));
    assert!(
        serves(at(base)),
        "the mapping the file dropped was stopped anyway"
    );
    assert!(
        TcpStream::connect(at(base + 2)).is_err(),
        "the mapping the file added was started anyway"
    );
    let origins: Vec<(String, String)> = ls(&dir).into_iter().map(|r| (r.1, r.3)).collect();
    assert_eq!(
        origins,
        [
            (format!("127.0.0.1:{base}"), "config".into()),
            (format!("127.0.0.1:{}", base + 1), "add".into())
        ]
    );
}

/// SIGHUP reloads race `rproxy add` and `rm` of other ports: every add and rm answers for
/// what it did, and in the end the daemon runs exactly the last file plus what the last add/rm
/// left, each mapping serving.
#[test]
fn reloads_racing_add_and_rm_end_consistent() {
    let dir = Dir::new("ctl-reload-race");
    let echo = tcp_echo("127.0.0.1:0");
    let base = free_ports(8);
    let config = dir.0.join("rproxy.toml");
    let spec = |p: u16| format!("127.0.0.1:{p}:{echo}");
    let files = [
        vec![spec(base), spec(base + 1)],
        vec![spec(base + 1), spec(base + 2), spec(base + 3)],
    ];
    write_config(&config, &files[0]);
    let d = daemon(&dir, &["--config", config.to_str().unwrap()]);
    let pid = nix::unistd::Pid::from_raw(d.child.id() as i32);
    let adder_dir = Dir(dir.0.clone());
    let adds = [spec(base + 4), spec(base + 5)];
    let adder = std::thread::spawn(move || {
        let mut present = [false, false];
        for round in 0..30 {
            let i = round % 2;
            let verb = if present[i] { "rm" } else { "add" };
            let (code, _, err) = cli(&adder_dir, &[verb, &adds[i]]);
            assert_eq!(code, 0, "{verb} {}: {err}", adds[i]);
            present[i] = !present[i];
        }
        std::mem::forget(adder_dir);
        present
    });
    for round in 0..30 {
        write_config(&config, &files[round % 2]);
        nix::sys::signal::kill(pid, Signal::SIGHUP).unwrap();
        std::thread::sleep(Duration::from_millis(15));
    }
    let present = adder.join().unwrap();
    // The last reload (file 1) settles.
    let last = &files[1];
    wait_until("the last reload applied", Duration::from_secs(5), || {
        let rows = ls(&dir);
        let config_rows: Vec<String> = rows
            .iter()
            .filter(|r| r.3 == "config")
            .map(|r| r.1.clone())
            .collect();
        config_rows.len() == last.len()
    });
    let rows = ls(&dir);
    let listed = |origin: &str| -> Vec<u16> {
        rows.iter()
            .filter(|r| r.3 == origin)
            .map(|r| r.1.rsplit(':').next().unwrap().parse().unwrap())
            .collect()
    };
    assert_eq!(listed("config"), [base + 1, base + 2, base + 3], "{rows:?}");
    let added: Vec<u16> = (0..2)
        .filter(|&i| present[i])
        .map(|i| base + 4 + i as u16)
        .collect();
    assert_eq!(listed("add"), added, "{rows:?}");
    for port in listed("config").into_iter().chain(added) {
        assert!(serves(at(port)), "{port} is listed but does not serve");
    }
    assert!(
        TcpStream::connect(at(base)).is_err(),
        "{base} still listens"
    );
}
