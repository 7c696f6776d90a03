//! The docker-proxy contract as dockerd exercises it: Go flag syntax, the fd-3 status pipe on
//! success and on every start-up failure, the fd-4 socket hand-over, and signals.

mod common;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use socket2::{Domain, Socket, Type};

fn run(argv: &[&str]) -> (Option<i32>, Vec<u8>, String, String) {
    let mut p = Spawn::new(argv).close_fd4().spawn();
    let status = p.status();
    let code = p.wait_exit(Duration::from_secs(5));
    let stdout = p.output_stdout();
    let stderr = p.stderr_text(Duration::from_millis(200));
    (code, status, stdout, stderr)
}

/// Argument vectors Go's flag package accepts, and the container port each must end up with.
#[test]
fn go_flag_syntax_accepted() {
    let echo = tcp_echo("127.0.0.1:0");
    let port = echo.port().to_string();
    let hex = format!("{:#x}", echo.port());
    let octal = format!("0o{:o}", echo.port());
    let legacy_octal = format!("0{:o}", echo.port());
    let binary = format!("0b{:b}", echo.port());
    let underscored = format!("0x_{:x}", echo.port());
    let eq = format!("-container-port={port}");
    let dd = format!("--container-port={hex}");
    let cases: Vec<Vec<&str>> = vec![
        vec!["-container-port", &port],
        vec!["-container-port", &hex],
        vec![&eq],
        vec![&dd],
        vec!["--container-port", &octal],
        vec!["-container-port", &legacy_octal],
        vec!["-container-port", &binary],
        vec!["-container-port", &underscored],
        // Last repeat wins.
        vec!["-container-port", "1", "-container-port", &port],
        // Booleans only take `=value`.
        vec!["-use-listen-fd=false", "-container-port", &port],
        vec!["-use-listen-fd=0", "-container-port", &port],
        // Parsing stops at the first non-flag or at "--"; what follows is ignored.
        vec!["-container-port", &port, "extra", "-container-port", "1"],
        vec!["-container-port", &port, "--", "-no-such-flag"],
    ];
    for case in cases {
        let mut argv = vec!["-proto", "tcp", "-host-ip", "127.0.0.1", "-host-port", "0"];
        argv.extend(["-container-ip", "127.0.0.1"]);
        argv.extend(case.iter().copied());
        let p = Spawn::new(&argv).spawn().ready();
        assert_eq!(
            tcp_roundtrip(p.addr(), b"ping"),
            b"ping",
            "argv {argv:?} did not proxy to the echo server"
        );
    }
}

/// Usage errors: exit 2, Go's one-line reason plus usage on stderr, nothing on fd 3.
#[test]
fn go_flag_errors_exit_2_with_usage() {
    let cases: &[(&[&str], &str)] = &[
        (&["-nope"], "flag provided but not defined: -nope"),
        (&["--no-such=1"], "flag provided but not defined: -no-such"),
        (
            &["-use-listen-fd=maybe"],
            "invalid boolean value \"maybe\" for -use-listen-fd",
        ),
        (
            &["-container-port", "8_0"],
            "invalid value \"8_0\" for flag -container-port",
        ),
        (
            &["-container-port", "eighty"],
            "invalid value \"eighty\" for flag -container-port",
        ),
        (
            &["-host-port", "99999999999999999999"],
            "invalid value \"99999999999999999999\"",
        ),
        (
            &["-container-port"],
            "flag needs an argument: -container-port",
        ),
        (&["---proto", "tcp"], "bad flag syntax: ---proto"),
        (&["-=tcp"], "bad flag syntax: -=tcp"),
        (
            &["-host-ip", "1.2.3"],
            "invalid value \"1.2.3\" for flag -host-ip",
        ),
        (
            &["-container-ip", "not-an-ip"],
            "invalid value \"not-an-ip\" for flag -container-ip",
        ),
    ];
    for (argv, reason) in cases {
        let (code, status, _, stderr) = run(argv);
        assert_eq!(code, Some(2), "{argv:?} must exit 2; stderr: {stderr}");
        assert!(status.is_empty(), "{argv:?} wrote {status:?} on fd 3");
        assert!(
            stderr.contains(reason),
            "{argv:?}: stderr lacks {reason:?}:\n{stderr}"
        );
        assert!(stderr.contains("Usage of"), "{argv:?}: no usage:\n{stderr}");
        assert!(
            stderr.contains("-container-port int"),
            "{argv:?}: usage lacks flags:\n{stderr}"
        );
    }
}

#[test]
fn help_and_version() {
    // Go prints usage on stderr; rproxy's help (its subcommands too) goes to stdout, where a
    // person piping it to less looks. dockerd never asks for it.
    for flag in ["-h", "-help", "--help"] {
        let (code, status, stdout, _) = run(&[flag]);
        assert_eq!(code, Some(0), "{flag}");
        assert!(status.is_empty());
        assert!(stdout.contains("-use-listen-fd"), "{flag}: {stdout}");
    }
    for flag in ["-v", "-version", "--version", "-version=true"] {
        let (code, status, stdout, _) = run(&[flag]);
        assert_eq!(code, Some(0), "{flag}");
        assert!(status.is_empty());
        assert!(
            stdout.starts_with("rproxy (commit ") && stdout.contains(" version 0."),
            "{flag}: {stdout:?}"
        );
    }
}

/// `-use-listen-fd false` is not "false": Go sets the flag and stops at "false". With no fd 4
/// that is a start-up failure reported on fd 3.
#[test]
fn bool_flag_never_takes_a_separate_value() {
    let (code, status, _, _) = run(&[
        "-container-ip",
        "127.0.0.1",
        "-container-port",
        "80",
        "-use-listen-fd",
        "false",
    ]);
    assert_eq!(code, Some(1));
    let status = String::from_utf8_lossy(&status);
    assert!(
        status.starts_with("1\n") && status.contains("fd 4"),
        "{status:?}"
    );
}

fn expect_failure(argv: &[&str], reason: &str) {
    let (code, status, _, stderr) = run(argv);
    let status = String::from_utf8_lossy(&status);
    assert_eq!(code, Some(1), "{argv:?}: exit code; stderr: {stderr}");
    assert!(status.starts_with("1\n"), "{argv:?}: status {status:?}");
    assert!(
        status.contains(reason),
        "{argv:?}: status {status:?} lacks {reason:?}"
    );
}

#[test]
fn startup_failures_reach_fd_3() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let base = ["-container-ip", "127.0.0.1", "-container-port", "80"];
    let with = |extra: &[&'static str]| -> Vec<&str> {
        let mut v: Vec<&str> = base.to_vec();
        v.extend_from_slice(extra);
        v
    };
    let mut argv = with(&["-host-ip", "127.0.0.1", "-host-port"]);
    argv.push(&port);
    expect_failure(
        &argv,
        &format!("failed to listen on tcp 127.0.0.1:{port}: address already in use"),
    );

    let udp_taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = udp_taken.local_addr().unwrap().port().to_string();
    let mut argv = with(&["-proto", "udp", "-host-ip", "127.0.0.1", "-host-port"]);
    argv.push(&udp_port);
    expect_failure(&argv, "address already in use");

    // TEST-NET-1 is never a local address: nothing is sent, bind just fails.
    expect_failure(
        &with(&["-host-ip", "192.0.2.1", "-host-port", "8080"]),
        "failed to listen on tcp 192.0.2.1:8080: cannot assign requested address",
    );
    expect_failure(&with(&["-proto", "icmp"]), "unsupported protocol icmp");
    expect_failure(&with(&["-proto", "sctp"]), "SCTP is not supported");
    expect_failure(
        &[
            "-host-ip",
            "127.0.0.1",
            "-container-ip",
            "::1",
            "-container-port",
            "80",
        ],
        "backend family mismatch",
    );
    expect_failure(
        &["-host-port", "8080", "-container-port", "80"],
        "no container address",
    );
    expect_failure(
        &[
            "-host-port",
            "8080",
            "-container-ip",
            "127.0.0.1",
            "-container-port",
            "0",
        ],
        "invalid container port 0",
    );
    expect_failure(
        &[
            "-host-port",
            "70000",
            "-container-ip",
            "127.0.0.1",
            "-container-port",
            "80",
        ],
        "invalid host port 70000",
    );
    expect_failure(&with(&["-use-listen-fd"]), "fd 4 is not open");
}

/// Each start-up failure names what was given, host side first: a port out of range is
/// reported as such even when the container flags are missing too, and a flag that was not
/// given is said to be missing, never shown with a value it does not have (Go's -1).
#[test]
fn startup_failures_name_what_was_given() {
    let said = |argv: &[&str]| -> String {
        let (code, status, _, stderr) = run(argv);
        assert_eq!(code, Some(1), "{argv:?}: {stderr}");
        String::from_utf8_lossy(&status).into_owned()
    };
    let status = said(&["-host-port", "99999"]);
    assert!(
        status.starts_with("1\ninvalid host port 99999 (must be 0-65535)"),
        "{status:?}"
    );
    let status = said(&["-host-port", "8080", "-container-ip", "127.0.0.1"]);
    assert!(
        status.contains("no container port: give -container-port"),
        "{status:?}"
    );
    let status = said(&["-container-ip", "127.0.0.1", "-container-port", "80"]);
    assert!(
        status.contains("no host port: give -host-port"),
        "{status:?}"
    );
    let status = said(&["-host-port", "8080", "-container-port", "80"]);
    assert!(
        status.contains("no container address: give -container-ip"),
        "{status:?}"
    );
    for argv in [
        &["-host-port", "99999"][..],
        &["-host-port", "8080", "-container-ip", "127.0.0.1"],
        &["-container-ip", "127.0.0.1", "-container-port", "80"],
    ] {
        let status = said(argv);
        assert!(!status.contains("-1"), "{argv:?}: {status:?}");
        assert!(!status.contains("0.0.0.0"), "{argv:?}: {status:?}");
    }
    // Given, a value is quoted as given.
    let status = said(&[
        "-host-port",
        "8080",
        "-container-ip",
        "127.0.0.1",
        "-container-port",
        "-1",
    ]);
    assert!(status.contains("invalid container port -1"), "{status:?}");
    let status = said(&[
        "-host-port",
        "8080",
        "-container-ip",
        "0.0.0.0",
        "-container-port",
        "80",
    ]);
    assert!(status.contains("-container-ip is 0.0.0.0"), "{status:?}");
}

#[test]
fn bad_fd_4_is_reported() {
    let base = [
        "-container-ip",
        "127.0.0.1",
        "-container-port",
        "80",
        "-use-listen-fd",
    ];
    // A UDP socket handed to a TCP proxy.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut p = Spawn::new(&base).listen_fd(OwnedFd::from(udp)).spawn();
    let status = String::from_utf8_lossy(&p.status()).to_string();
    assert_eq!(p.wait_exit(Duration::from_secs(5)), Some(1));
    assert!(
        status.starts_with("1\nbad listening socket on fd 4: it is not a tcp socket"),
        "{status:?}"
    );

    // Not a socket at all.
    let file = std::fs::File::open("/dev/null").unwrap();
    let mut p = Spawn::new(&base).listen_fd(OwnedFd::from(file)).spawn();
    let status = String::from_utf8_lossy(&p.status()).to_string();
    assert_eq!(p.wait_exit(Duration::from_secs(5)), Some(1));
    assert!(status.contains("fd 4 is not a socket"), "{status:?}");

    // An IPv4 socket cannot serve an IPv6 host address.
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut argv = base.to_vec();
    argv.extend(["-host-ip", "::1"]);
    let mut p = Spawn::new(&argv).listen_fd(OwnedFd::from(tcp)).spawn();
    let status = String::from_utf8_lossy(&p.status()).to_string();
    assert_eq!(p.wait_exit(Duration::from_secs(5)), Some(1));
    assert!(
        status.contains("an IPv4 socket cannot serve host address ::1"),
        "{status:?}"
    );
}

/// Run by hand (no fd 3), the proxy works and says it is ready in its log.
#[test]
fn works_without_status_pipe() {
    let echo = tcp_echo("127.0.0.1:0");
    let p = Spawn::forward("tcp", "127.0.0.1", echo)
        .no_status_pipe()
        .spawn();
    let line = p.wait_log("serving tcp 127.0.0.1:", Duration::from_secs(5));
    let addr: SocketAddr = line
        .split_whitespace()
        .skip_while(|w| *w != "tcp")
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(tcp_roundtrip(addr, b"by hand"), b"by hand");
}

/// A socket as dockerd 28+ creates it (CLOEXEC, blocking, SO_REUSEADDR, V6ONLY for IPv6,
/// TCP listening, UDP bound with PKTINFO on).
fn docker_socket(proto: &str, addr: &str, v6only: bool) -> (OwnedFd, SocketAddr) {
    let addr: SocketAddr = addr.parse().unwrap();
    let domain = Domain::for_address(addr);
    let ty = if proto == "tcp" {
        Type::STREAM
    } else {
        Type::DGRAM
    };
    let s = Socket::new(domain, ty, None).unwrap();
    s.set_reuse_address(true).unwrap();
    if addr.is_ipv6() {
        s.set_only_v6(v6only).unwrap();
    }
    s.bind(&addr.into()).unwrap();
    if proto == "tcp" {
        s.listen(128).unwrap();
    }
    let local = s.local_addr().unwrap().as_socket().unwrap();
    (s.into(), local)
}

fn spawn_with_fd(proto: &str, host_ip: &str, target: SocketAddr, fd: OwnedFd) -> Proxy {
    let port = target.port().to_string();
    let ip = target.ip().to_string();
    Spawn::new(&[
        "-proto",
        proto,
        "-host-ip",
        host_ip,
        "-host-port",
        "1",
        "-container-ip",
        &ip,
        "-container-port",
        &port,
        "-use-listen-fd",
    ])
    .listen_fd(fd)
    .spawn()
    .ready()
}

/// The adopted socket stays fd 4 and is close-on-exec in the proxy.
fn assert_fd4_cloexec(p: &Proxy) {
    let info = std::fs::read_to_string(format!("/proc/{}/fdinfo/4", p.child.id())).unwrap();
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .unwrap()
        .trim();
    let flags = u32::from_str_radix(flags, 8).unwrap();
    assert!(
        flags & libc::O_CLOEXEC as u32 != 0,
        "fd 4 not close-on-exec: {info}"
    );
    assert!(
        flags & libc::O_NONBLOCK as u32 != 0,
        "fd 4 not non-blocking: {info}"
    );
}

#[test]
fn fd_4_tcp_v4_v6_and_dual_stack() {
    let echo = tcp_echo("127.0.0.1:0");
    let (fd, addr) = docker_socket("tcp", "127.0.0.1:0", true);
    let p = spawn_with_fd("tcp", "127.0.0.1", echo, fd);
    assert_eq!(p.addr(), addr);
    assert_fd4_cloexec(&p);
    assert_eq!(tcp_roundtrip(addr, b"v4 over fd 4"), b"v4 over fd 4");
    if !has_ipv6() {
        skip("IPv6 part", "no IPv6 loopback here");
        return;
    }
    // 6→4, as dockerd's `::` proxy does for an IPv4-only container.
    let (fd, addr) = docker_socket("tcp", "[::1]:0", true);
    let _p6 = spawn_with_fd("tcp", "::1", echo, fd);
    assert_eq!(tcp_roundtrip(addr, b"v6 to v4"), b"v6 to v4");
    // A dual-stack socket (no V6ONLY) serves both families; the proxy must not assume V6ONLY.
    let echo6 = tcp_echo("[::1]:0");
    let (fd, addr) = docker_socket("tcp", "[::]:0", false);
    let _pd = spawn_with_fd("tcp", "::", echo6, fd);
    let v4: SocketAddr = ([127, 0, 0, 1], addr.port()).into();
    let v6: SocketAddr = (std::net::Ipv6Addr::LOCALHOST, addr.port()).into();
    assert_eq!(tcp_roundtrip(v4, b"dual via v4"), b"dual via v4");
    assert_eq!(tcp_roundtrip(v6, b"dual via v6"), b"dual via v6");
}

#[test]
fn fd_4_udp_v4_v6_and_dual_stack() {
    let echo = udp_echo("127.0.0.1:0");
    let (fd, addr) = docker_socket("udp", "127.0.0.1:0", true);
    let p = spawn_with_fd("udp", "127.0.0.1", echo, fd);
    assert_fd4_cloexec(&p);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (reply, from) = udp_roundtrip(&client, addr, b"udp v4 fd 4");
    assert_eq!(reply, b"udp v4 fd 4");
    assert_eq!(
        from, addr,
        "reply must come from the address the client used"
    );
    if !has_ipv6() {
        skip("IPv6 part", "no IPv6 loopback here");
        return;
    }
    let (fd, addr) = docker_socket("udp", "[::1]:0", true);
    let _p6 = spawn_with_fd("udp", "::1", echo, fd);
    let client6 = UdpSocket::bind("[::1]:0").unwrap();
    let (reply, from) = udp_roundtrip(&client6, addr, b"udp 6 to 4");
    assert_eq!(reply, b"udp 6 to 4");
    assert_eq!(from, addr);
    let (fd, addr) = docker_socket("udp", "[::]:0", false);
    let _pd = spawn_with_fd("udp", "::", echo, fd);
    let v4: SocketAddr = ([127, 0, 0, 1], addr.port()).into();
    let (reply, from) = udp_roundtrip(&client, v4, b"dual v4");
    assert_eq!(reply, b"dual v4");
    assert_eq!(
        from, v4,
        "a dual-stack socket must answer IPv4 clients from their address"
    );
    let v6: SocketAddr = (std::net::Ipv6Addr::LOCALHOST, addr.port()).into();
    assert_eq!(udp_roundtrip(&client6, v6, b"dual v6").0, b"dual v6");
}

/// Docker 28 and later hand fd 4 over non-blocking, for every protocol (up to 27 it came
/// blocking, as `docker_socket` leaves it): served the same, and left non-blocking.
#[test]
fn fd_4_already_non_blocking_as_docker_28_passes_it() {
    let echo = tcp_echo("127.0.0.1:0");
    let (fd, addr) = docker_socket("tcp", "127.0.0.1:0", true);
    let fd = Socket::from(fd);
    fd.set_nonblocking(true).unwrap();
    let p = spawn_with_fd("tcp", "127.0.0.1", echo, fd.into());
    assert_fd4_cloexec(&p);
    assert_eq!(tcp_roundtrip(addr, b"28 tcp"), b"28 tcp");

    let echo = udp_echo("127.0.0.1:0");
    let (fd, addr) = docker_socket("udp", "127.0.0.1:0", true);
    let fd = Socket::from(fd);
    fd.set_nonblocking(true).unwrap();
    let p = spawn_with_fd("udp", "127.0.0.1", echo, fd.into());
    assert_fd4_cloexec(&p);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert_eq!(
        udp_roundtrip(&client, addr, b"28 udp"),
        (b"28 udp".to_vec(), addr)
    );
}

/// Rootless Docker 29.6+ keeps a loopback host IP as given (e.g. 127.0.1.2) instead of
/// turning it into 127.0.0.1: any loopback address is served, bound by the proxy or handed
/// over on fd 4, TCP and UDP, and the status pipe reports it.
#[test]
fn any_loopback_host_ip_is_served() {
    let echo = tcp_echo("127.0.0.1:0");
    let p = Spawn::forward("tcp", "127.0.1.2", echo).spawn().ready();
    assert_eq!(p.addr().ip().to_string(), "127.0.1.2");
    assert_eq!(tcp_roundtrip(p.addr(), b"127.0.1.2"), b"127.0.1.2");
    let (fd, addr) = docker_socket("tcp", "127.0.1.2:0", true);
    let _fd4 = spawn_with_fd("tcp", "127.0.1.2", echo, fd);
    assert_eq!(
        tcp_roundtrip(addr, b"fd 4 at 127.0.1.2"),
        b"fd 4 at 127.0.1.2"
    );

    let echo = udp_echo("127.0.0.1:0");
    let (fd, addr) = docker_socket("udp", "127.0.1.2:0", true);
    let _udp = spawn_with_fd("udp", "127.0.1.2", echo, fd);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (reply, from) = udp_roundtrip(&client, addr, b"udp 127.0.1.2");
    assert_eq!(reply, b"udp 127.0.1.2");
    assert_eq!(from, addr, "the reply must come from 127.0.1.2");
}

/// Rootless Docker 29.5+ in "detach-netns" mode starts the proxy as `nsenter -n<netns> -F --
/// <path> …`: nsenter enters the namespace and execs rproxy in its place, fds 3 and 4 passed
/// through. Root here has no rootless namespace: entering our own does the same exec.
#[test]
fn started_through_nsenter_as_rootless_docker_29_5_does() {
    if !need_root("started_through_nsenter_as_rootless_docker_29_5_does") {
        return;
    }
    let echo = tcp_echo("127.0.0.1:0");
    let (fd, addr) = docker_socket("tcp", "127.0.0.1:0", true);
    let netns = format!("-n/proc/{}/ns/net", std::process::id());
    let port = echo.port().to_string();
    let p = Spawn::new(&[
        "-proto",
        "tcp",
        "-host-ip",
        "127.0.0.1",
        "-host-port",
        &addr.port().to_string(),
        "-container-ip",
        "127.0.0.1",
        "-container-port",
        &port,
        "-use-listen-fd",
    ])
    .wrap(&["nsenter", &netns, "-F", "--"])
    .listen_fd(fd)
    .spawn()
    .ready();
    assert_eq!(p.addr(), addr);
    assert_eq!(tcp_roundtrip(addr, b"via nsenter"), b"via nsenter");
}

/// Docker 29 passes SCTP sockets on fd 4 too. This kernel has no SCTP (no SCTP socket can
/// even be made to pass: a TCP one stands in), so the port fails on fd 3 with that reason.
#[test]
fn sctp_on_fd_4_is_refused_with_the_reason() {
    let stand_in = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut p = Spawn::new(&[
        "-proto",
        "sctp",
        "-host-ip",
        "127.0.0.1",
        "-host-port",
        "1",
        "-container-ip",
        "127.0.0.1",
        "-container-port",
        "80",
        "-use-listen-fd",
    ])
    .listen_fd(OwnedFd::from(stand_in))
    .spawn();
    let status = String::from_utf8_lossy(&p.status()).to_string();
    assert_eq!(p.wait_exit(Duration::from_secs(5)), Some(1));
    assert!(
        status.starts_with("1\nSCTP is not supported by this kernel"),
        "{status:?}"
    );
}

/// SIGINT and SIGTERM stop the proxy within 1 s with exit 0, even with connections open;
/// SIGHUP and SIGPIPE do not stop it.
#[test]
fn signals() {
    let echo = tcp_echo("127.0.0.1:0");
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        let mut p = start("tcp", "127.0.0.1", echo);
        let mut held = Vec::new();
        for _ in 0..20 {
            let s = std::net::TcpStream::connect(p.addr()).unwrap();
            held.push(s);
        }
        for s in &mut held {
            use std::io::{Read, Write};
            s.write_all(b"x").unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
        }
        p.signal(Signal::SIGHUP);
        p.signal(Signal::SIGPIPE);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            tcp_roundtrip(p.addr(), b"still here"),
            b"still here",
            "SIGHUP/SIGPIPE stopped it"
        );
        let t = Instant::now();
        p.signal(sig);
        assert_eq!(p.wait_exit(Duration::from_secs(1)), Some(0), "{sig}");
        assert!(t.elapsed() < Duration::from_secs(1));
        // The port is released at once.
        TcpListener::bind(p.addr()).expect("port still held after exit");
    }
}

/// The proxy exits when its parent dies (dockerd crashing must not leave ports held).
#[test]
fn exits_when_parent_dies() {
    let echo = tcp_echo("127.0.0.1:0");
    let port = echo.port().to_string();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("\"$0\" \"$@\" >/dev/null 2>&1 & echo $!; sleep 0.5")
        .arg(rproxy())
        .args([
            "-host-ip",
            "127.0.0.1",
            "-host-port",
            "0",
            "-container-ip",
            "127.0.0.1",
            "-container-port",
            &port,
        ])
        .output()
        .unwrap();
    let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for its new parent to reap it.
        if stat.is_empty() || stat.split_whitespace().nth(2) == Some("Z") {
            break;
        }
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            panic!("rproxy {pid} outlived its parent");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
