//! The socket-level fast path (`rproxy daemon --socket-lb`): host clients of a published port
//! connect straight to its target — no connection through the listener — and see the address
//! they dialled; everything else is left alone; nothing stays attached after the daemon.
//!
//! As root (BPF, cgroups, namespaces); the programs attach at the host's cgroup v2 root, so
//! they see every process here: each test uses ports nobody else does.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use socket2::{Domain, SockAddr, Socket, Type};

const TEST: &str = "socket_lb";

/// The `rproxy ls` row of the mapping listening on `listen`, each column by its header.
fn row(dir: &Dir, listen: &str) -> std::collections::HashMap<String, String> {
    ls_table(dir)
        .into_iter()
        .find(|r| r["LISTEN"] == listen)
        .unwrap_or_else(|| panic!("no mapping on {listen}"))
}

/// Connects (from a socket of `domain`, dual-stack unless `v6only`) and exchanges a message;
/// returns (what came back, the peer getpeername reports, the local address).
fn exchange(
    to: SocketAddr,
    v6only: bool,
    msg: &[u8],
) -> std::io::Result<(Vec<u8>, SocketAddr, SocketAddr)> {
    let domain = Domain::for_address(to);
    let s = Socket::new(domain, Type::STREAM, None)?;
    if domain == Domain::IPV6 {
        s.set_only_v6(v6only)?;
    }
    s.connect_timeout(&SockAddr::from(to), Duration::from_secs(5))?;
    let mut s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let peer = s.peer_addr()?;
    let local = s.local_addr()?;
    s.write_all(msg)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok((out, peer, local))
}

/// The peer of the established TCP socket with local address `local`, as the kernel has it
/// (`ss`, through sock_diag: what getpeername would say without the hooks).
fn kernel_peer(local: SocketAddr) -> Option<String> {
    let out = Command::new("ss")
        .args([
            "-Htn",
            // Established only: a TIME-WAIT socket of an earlier connection (this test's, or
            // a parallel one's) may hold the same local port towards another peer.
            "state",
            "established",
            &format!("( sport = :{} )", local.port()),
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.contains(&local.port().to_string()))
        .and_then(|l| l.split_whitespace().last().map(String::from))
}

fn v6(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn the_kernel_verifier_accepts_every_program() {
    if !need_root("the_kernel_verifier_accepts_every_program") {
        return;
    }
    let loaded = rproxy::bpf::verify().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.len(), 9, "{loaded:?}");
}

/// The programs as a reviewer reads them (mnemonics, one instruction a line): any change to
/// them is deliberate, and shows in the golden files' diff (RPROXY_BLESS=1 rewrites them
/// after a review of the difference).
#[test]
fn the_bytecode_is_what_was_reviewed() {
    use rproxy::bpf::programs::Hook;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/bpf");
    for hook in Hook::ALL {
        let text = hook.code().render();
        let path = dir.join(format!("{}.txt", hook.name()));
        if std::env::var_os("RPROXY_BLESS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &text).unwrap();
        }
        let golden = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (RPROXY_BLESS=1 writes it)", path.display()));
        assert!(golden == text, "{} changed:\n{text}", hook.name());
    }
}

/// Host clients on every local address reach the target with no connection through the
/// listener, see the published address as their peer while the kernel has them connected to
/// the target; a mapping bound to 127.0.0.1 leaves the host address alone; an unpublished
/// port and another namespace's sockets are untouched.
#[test]
fn host_clients_connect_straight_to_the_target() {
    if !need_root("host_clients_connect_straight_to_the_target") {
        return;
    }
    let dir = Dir::new("slb-tcp");
    let echo4 = tcp_echo("127.0.0.1:0");
    let echo6 = has_ipv6().then(|| tcp_echo("[::1]:0"));
    let base = free_ports(5);
    let (wild, v6port, six_to_four, lo_only, unpublished) =
        (base, base + 1, base + 2, base + 3, base + 4);
    let mut args = vec![
        "--socket-lb=require".to_string(),
        "-p".into(),
        format!("{wild}:{echo4}"),
        "-p".into(),
        format!("127.0.0.1:{lo_only}:{echo4}"),
    ];
    if let Some(e6) = echo6 {
        args.extend(["-p".into(), format!("[::]:{v6port}:{e6}")]);
        args.extend(["-p".into(), format!("[::]:{six_to_four}:{echo4}")]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let _d = daemon(&dir, &argv);
    // A host address that appears after the daemon started (on a veth pair of our own: this
    // kernel has no dummy links): the hooks follow it.
    let host_ip = "10.231.0.1";
    let dummy = format!("rpxslb{}", std::process::id() % 10_000);
    sh(&format!(
        "ip link add {dummy} type veth peer name {dummy}p && ip addr add {host_ip}/32 dev {dummy} \
         && ip link set {dummy} up && ip link set {dummy}p up"
    ));
    struct Link(String);
    impl Drop for Link {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).output();
        }
    }
    let _link = Link(dummy);
    std::thread::sleep(Duration::from_millis(300));

    let mut expected_socket = 0;
    let mut clients: Vec<(IpAddr, u16, SocketAddr, bool)> = vec![
        ("127.0.0.1".parse().unwrap(), wild, echo4, false),
        ("127.0.0.2".parse().unwrap(), wild, echo4, false),
        (host_ip.parse().unwrap(), wild, echo4, false),
        (v6("::ffff:127.0.0.1"), wild, echo4, false),
        ("127.0.0.1".parse().unwrap(), lo_only, echo4, false),
    ];
    if let Some(e6) = echo6 {
        clients.push((v6("::1"), v6port, e6, false));
        // 6→4 from a dual-stack socket: the IPv4 target, reached IPv4-mapped.
        clients.push((v6("::1"), six_to_four, echo4, false));
    }
    for (ip, port, target, v6only) in &clients {
        let to = SocketAddr::new(*ip, *port);
        let msg = format!("to {to}");
        let (got, peer, local) =
            exchange(to, *v6only, msg.as_bytes()).unwrap_or_else(|e| panic!("{to}: {e}"));
        assert_eq!(got, msg.as_bytes(), "{to}: data differs");
        assert_eq!(peer, to, "getpeername of a client of {to}");
        expected_socket += 1;
        let _ = (target, local);
    }
    // The kernel has the client connected to the target itself (checked on a live one).
    let s = TcpStream::connect(("127.0.0.1", wild)).unwrap();
    let local = s.local_addr().unwrap();
    assert_eq!(
        kernel_peer(local).as_deref(),
        Some(echo4.to_string().as_str()),
        "ss shows where the client is really connected"
    );
    drop(s);
    expected_socket += 1;
    // Nothing went through the listeners; the hooks counted every connection.
    let mut socket_conns = 0;
    for r in ls_table(&dir) {
        assert_eq!(
            r["TOTAL"], "0",
            "{} relayed in userland: {r:?}",
            r["LISTEN"]
        );
        assert_eq!(r["SOCKET"], "socket", "{r:?}");
        socket_conns += r["SOCKET_CONNS"].parse::<u64>().unwrap();
    }
    assert_eq!(socket_conns, expected_socket);

    // A mapping bound to 127.0.0.1 leaves the host address alone (nothing listens there).
    let refused = |to: SocketAddr| {
        matches!(TcpStream::connect_timeout(&to, Duration::from_secs(2)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    };
    assert!(refused(SocketAddr::new(host_ip.parse().unwrap(), lo_only)));
    assert!(refused(SocketAddr::from(([127, 0, 0, 2], lo_only))));
    // An unpublished port is untouched.
    assert!(refused(SocketAddr::from(([127, 0, 0, 1], unpublished))));
    // 6→4 from an IPv6-only socket cannot reach an IPv4-mapped address: the listener serves.
    if echo6.is_some() {
        let before = row(&dir, &format!("[::]:{six_to_four}"))["TOTAL"].clone();
        let to = SocketAddr::new(v6("::1"), six_to_four);
        let (got, _, _) = exchange(to, true, b"v6only").unwrap();
        assert_eq!(got, b"v6only");
        let after = row(&dir, &format!("[::]:{six_to_four}"))["TOTAL"].clone();
        assert_eq!(
            (before.as_str(), after.as_str()),
            ("0", "1"),
            "a v6-only client went through the listener"
        );
    }
    // Another namespace's sockets are untouched: its own 127.0.0.1:wild answers there.
    let ns = Netns::new("slb");
    let answer = ns.run(move || {
        let l = std::net::TcpListener::bind(("127.0.0.1", wild)).unwrap();
        std::thread::spawn(move || {
            if let Ok((mut c, _)) = l.accept() {
                let _ = c.write_all(b"the namespace's own");
            }
        });
        let mut c = TcpStream::connect(("127.0.0.1", wild)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        out
    });
    assert_eq!(answer, b"the namespace's own");
}

/// UDP: connected sockets and sendto/recvfrom get replies whose source is the published
/// address; a mapping changed to a new target is followed by new sockets.
#[test]
fn udp_replies_come_from_the_published_address() {
    if !need_root("udp_replies_come_from_the_published_address") {
        return;
    }
    let dir = Dir::new("slb-udp");
    let echo = udp_echo("127.0.0.1:0");
    let port = free_ports(1);
    let published = SocketAddr::from(([127, 0, 0, 1], port));
    let _d = daemon(
        &dir,
        &["--socket-lb=require", "-p", &format!("{port}:{echo}/udp")],
    );
    // Connected: send and recv.
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.connect(published).unwrap();
    assert_eq!(c.peer_addr().unwrap(), published);
    c.send(b"connected").unwrap();
    let mut buf = [0u8; 64];
    let n = c.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"connected");
    // Unconnected: sendto, recvfrom sees the published address.
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for i in 0..3 {
        let msg = format!("datagram {i}");
        u.send_to(msg.as_bytes(), published).unwrap();
        let (n, from) = u.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], msg.as_bytes());
        assert_eq!(from, published, "reply source");
    }
    let r = row(&dir, &format!("0.0.0.0:{port}"));
    assert_eq!(r["TOTAL"], "0", "flows through the listener: {r:?}");
    assert_eq!(r["SOCKET_CONNS"], "1", "{r:?}");
    // The mapping moves to a new target: new sockets follow.
    let echo2 = udp_echo("127.0.0.1:0");
    let (code, _, err) = cli(&dir, &["rm", &format!("{port}:{echo}/udp")]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cli(
        &dir,
        &["add", "--socket-lb=require", &format!("{port}:{echo2}/udp")],
    );
    assert_eq!(code, 0, "{err}");
    let fresh = UdpSocket::bind("127.0.0.1:0").unwrap();
    fresh
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    fresh.send_to(b"after", published).unwrap();
    let (n, from) = fresh.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"after"[..], published));
    let r = row(&dir, &format!("0.0.0.0:{port}"));
    assert_eq!(r["TARGET"], echo2.to_string());
    assert_eq!(r["TOTAL"], "0", "{r:?}");
}

/// The programs run for processes in child cgroups (checked as the kernel has them, with
/// bpftool), and are gone once the daemon is killed; a docker-mode process attaches none.
#[test]
fn programs_are_effective_below_the_root_and_die_with_the_daemon() {
    if !need_root("programs_are_effective_below_the_root_and_die_with_the_daemon") {
        return;
    }
    if Command::new("bpftool").arg("version").output().is_err() {
        skip(TEST, "bpftool not installed (.ci/install-deps installs it)");
        return;
    }
    let root = cgroup_v2_root();
    let child = root.join(format!("rproxy-test-{}", std::process::id()));
    std::fs::create_dir_all(&child).unwrap();
    struct Rmdir(std::path::PathBuf);
    impl Drop for Rmdir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _child = Rmdir(child.clone());
    // Programs in effect for the child cgroup, as (id, name); other tests' daemons may come
    // and go meanwhile, so a process's own programs are told apart by their ids.
    let effective = || -> Vec<(u64, String)> {
        let out = Command::new("bpftool")
            .args(["-j", "cgroup", "show", child.to_str().unwrap(), "effective"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_string())))
            .collect()
    };
    // A docker-mode process serving alone holds no program, whatever it is told.
    let echo = tcp_echo("127.0.0.1:0");
    let p = Spawn::forward("tcp", "127.0.0.1", echo)
        .env("RPROXY_SOCKET_LB", "on")
        .spawn()
        .ready();
    assert!(
        programs_of(p.child.id()).is_empty(),
        "a docker-mode process loaded programs"
    );
    drop(p);
    let dir = Dir::new("slb-attach");
    let mut d = daemon(&dir, &["--socket-lb=require"]);
    let ids = programs_of(d.child.id());
    assert_eq!(ids.len(), 9, "the daemon's programs: {ids:?}");
    let attached: Vec<(u64, String)> = effective()
        .into_iter()
        .filter(|(id, _)| ids.contains(id))
        .collect();
    let mut names: Vec<&str> = attached.iter().map(|(_, n)| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "rpx_connect4",
            "rpx_connect6",
            "rpx_peername4",
            "rpx_peername6",
            "rpx_recvmsg4",
            "rpx_recvmsg6",
            "rpx_sendmsg4",
            "rpx_sendmsg6",
            "rpx_setsockopt",
        ],
        "the daemon's programs in effect for a child cgroup"
    );
    d.signal(Signal::SIGKILL);
    d.wait_exit(Duration::from_secs(5));
    wait_until(
        "the links are gone with the daemon",
        Duration::from_secs(5),
        || effective().iter().all(|(id, _)| !ids.contains(id)),
    );
}

/// The ids of the BPF programs process `pid` holds (its fds' fdinfo says `prog_id:`).
fn programs_of(pid: u32) -> Vec<u64> {
    let mut ids = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(info) = std::fs::read_to_string(fd.path()) else {
            continue;
        };
        if info.lines().any(|l| l.starts_with("link_id:")) {
            continue;
        }
        for l in info.lines() {
            if let Some(id) = l
                .strip_prefix("prog_id:")
                .and_then(|v| v.trim().parse().ok())
            {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
    }
    ids
}

fn cgroup_v2_root() -> std::path::PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split_whitespace().collect();
            (right.starts_with("cgroup2 ") && f.get(3) == Some(&"/")).then(|| f[4].into())
        })
        .expect("a cgroup v2 mount")
}

/// A process of a test's, killed when the test ends, passed or failed (a failing test would
/// otherwise leave it behind, holding the test's output open).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A DNS server in its own process (python3, on every machine of this kind): answers every
/// A query with 192.0.2.7, from `ip`:PORT.
fn dns_server(ip: &str) -> (Reaped, SocketAddr) {
    const SERVER: &str = r#"
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("HOST", 0))
print(s.getsockname()[1], flush=True)
while True:
    q, peer = s.recvfrom(512)
    if len(q) < 12:
        continue
    qid, flags, qd = struct.unpack(">HHH", q[:6])
    end = 12
    while end < len(q) and q[end] != 0:
        end += q[end] + 1
    question = q[12:end + 5]
    header = struct.pack(">HHHHHH", qid, 0x8180, 1, 1, 0, 0)
    answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, 7])
    s.sendto(header + question + answer, peer)
"#;
    let (child, port) = python_server(&SERVER.replace("HOST", ip));
    (Reaped(child), SocketAddr::new(ip.parse().unwrap(), port))
}

/// Resolvers check where a reply came from: `dig @127.0.0.1 -p PORT` gets its answer through
/// the hooks (replies read as from the published address), and a client reading with
/// recvmmsg sees the same source.
#[test]
fn dig_and_recvmmsg_accept_the_replies() {
    if !need_root("dig_and_recvmmsg_accept_the_replies") {
        return;
    }
    if Command::new("dig").arg("-v").output().is_err() {
        skip(
            TEST,
            "dig not installed (.ci/install-deps installs bind9-dnsutils)",
        );
        return;
    }
    let (_server, dns) = dns_server("127.0.0.1");
    let dir = Dir::new("slb-dig");
    let port = free_ports(1);
    let _d = daemon(
        &dir,
        &["--socket-lb=require", "-p", &format!("{port}:{dns}/udp")],
    );
    let out = Command::new("dig")
        .args([
            "+short",
            "+tries=1",
            "+time=3",
            "-p",
            &port.to_string(),
            "@127.0.0.1",
            "rproxy.test",
        ])
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        answer.trim(),
        "192.0.2.7",
        "dig: {answer} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // recvmmsg.
    let published = SocketAddr::from(([127, 0, 0, 1], port));
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let query = |id: u8| -> Vec<u8> {
        let mut q = vec![0, id, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend(b"\x01a\x04test\x00\x00\x01\x00\x01");
        q
    };
    for id in 1..=3 {
        c.send_to(&query(id), published).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
    use std::io::IoSliceMut;
    let mut bufs = [[0u8; 512]; 3];
    let mut slices: Vec<[IoSliceMut<'_>; 1]> = bufs
        .iter_mut()
        .map(|b| [IoSliceMut::new(&mut b[..])])
        .collect();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(3, None);
    use std::os::fd::AsRawFd;
    let got: Vec<SocketAddr> = recvmmsg(
        c.as_raw_fd(),
        &mut headers,
        slices.iter_mut(),
        MsgFlags::MSG_DONTWAIT,
        None,
    )
    .unwrap()
    .filter_map(|m| {
        m.address.and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::from((v4.ip(), v4.port())))
        })
    })
    .collect();
    assert_eq!(got, vec![published; 3], "recvmmsg sources");
    let r = row(&dir, &format!("0.0.0.0:{port}"));
    assert_eq!(r["TOTAL"], "0", "through the listener: {r:?}");
}

/// Without the privilege to load programs: `--socket-lb` warns once and the listener serves;
/// `--socket-lb=require` refuses to start, saying why; a docker-mode process told to require
/// the hooks, with no daemon, fails on fd 3 (they are the daemon's).
#[test]
fn without_the_privilege_the_hooks_fall_back_or_fail_as_asked() {
    if !need_root("without_the_privilege_the_hooks_fall_back_or_fail_as_asked") {
        return;
    }
    let dir = Dir::new("slb-nopriv");
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let echo = tcp_echo("127.0.0.1:0");
    let port = free_ports(1);
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    let spawn = |mode: &str| {
        let sock = dir.sock();
        let p = format!("127.0.0.1:{port}:{echo}");
        Spawn::new(&[
            "daemon",
            "--control-socket",
            sock.to_str().unwrap(),
            mode,
            "-p",
            &p,
        ])
        .wrap(&nobody)
        .no_status_pipe()
        .spawn()
    };
    let d = spawn("--socket-lb");
    let warning = d.wait_log("socket hooks unavailable", Duration::from_secs(10));
    assert!(warning.contains("CAP_BPF"), "{warning}");
    d.wait_log("daemon ready", Duration::from_secs(10));
    let (got, _, _) = exchange(SocketAddr::from(([127, 0, 0, 1], port)), false, b"hi").unwrap();
    assert_eq!(got, b"hi");
    let r = row(&dir, &format!("127.0.0.1:{port}"));
    assert_eq!(
        (r["SOCKET"].as_str(), r["TOTAL"].as_str()),
        ("userland", "1"),
        "{r:?}"
    );
    drop(d);

    let mut d = spawn("--socket-lb=require");
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(1));
    let err = d.stderr_text(Duration::from_millis(200));
    assert!(
        err.contains("socket hooks required") && err.contains("CAP_BPF"),
        "{err}"
    );

    let mut p = Spawn::forward("tcp", "127.0.0.1", echo)
        .env("RPROXY_SOCKET_LB", "require")
        .spawn();
    let status = String::from_utf8_lossy(&p.status()).into_owned();
    assert!(
        status.starts_with("1\n") && status.contains("rproxy daemon --socket-lb"),
        "{status:?}"
    );
    assert_eq!(p.wait_exit(Duration::from_secs(5)), Some(1));
}

/// Prometheus counts what the hooks redirected, per mapping: connections for TCP, datagrams
/// (and connected sockets) for UDP.
#[test]
fn metrics_count_what_the_hooks_redirected() {
    if !need_root("metrics_count_what_the_hooks_redirected") {
        return;
    }
    let dir = Dir::new("slb-metrics");
    let echo = tcp_echo("127.0.0.1:0");
    let uecho = udp_echo("127.0.0.1:0");
    let base = free_ports(2);
    let sock = dir.sock();
    let d = Spawn::new(&[
        "daemon",
        "--control-socket",
        sock.to_str().unwrap(),
        "--socket-lb=require",
        "--metrics-addr",
        "127.0.0.1:0",
        "-p",
        &format!("127.0.0.1:{base}:{echo}"),
        "-p",
        &format!("127.0.0.1:{}:{uecho}/udp", base + 1),
    ])
    .no_status_pipe()
    .spawn();
    let metrics = d.metrics_addr();
    for i in 0..3 {
        let to = SocketAddr::from(([127, 0, 0, 1], base));
        exchange(to, false, format!("m{i}").as_bytes()).unwrap();
    }
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    for _ in 0..2 {
        u.send_to(b"d", ("127.0.0.1", base + 1)).unwrap();
        u.recv_from(&mut buf).unwrap();
    }
    let value = |name: &str, frontend: &str| metric(metrics, name, frontend);
    assert_eq!(
        value(
            "rproxy_socket_lb_connections_total",
            &format!("127.0.0.1:{base}")
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            "rproxy_socket_lb_datagrams_total",
            &format!("127.0.0.1:{}", base + 1)
        ),
        Some(2.0)
    );
    assert_eq!(
        value("rproxy_tcp_connections_total", &format!("127.0.0.1:{base}")),
        Some(0.0),
        "the listener relayed nothing"
    );
}

/// RPROXY_SOCKET_LB in a shim's environment (dockerd's, in real life) travels with the port:
/// a daemon started without --socket-lb gives that port the hooks.
#[test]
fn a_shims_environment_asks_for_the_hooks() {
    if !need_root("a_shims_environment_asks_for_the_hooks") {
        return;
    }
    let dir = Dir::new("slb-shim");
    let _d = daemon(&dir, &[]);
    let echo = tcp_echo("127.0.0.1:0");
    let port = free_ports(1);
    let mut s = Spawn::forward_at("tcp", "127.0.0.1", port, echo)
        .env("RPROXY_SOCKET", dir.sock().to_str().unwrap())
        .env("RPROXY_SOCKET_LB", "require")
        .spawn();
    assert_eq!(String::from_utf8_lossy(&s.status()), "0\n");
    s.wait_log("handed to the daemon", Duration::from_secs(5));
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let (got, peer, _) = exchange(to, false, b"shim").unwrap();
    assert_eq!((got.as_slice(), peer), (&b"shim"[..], to));
    let r = row(&dir, &format!("127.0.0.1:{port}"));
    assert_eq!(
        (
            r["ORIGIN"].as_str(),
            r["SOCKET"].as_str(),
            r["TOTAL"].as_str(),
            r["SOCKET_CONNS"].as_str()
        ),
        ("shim", "socket", "0", "1"),
        "{r:?}"
    );
}

/// The value of Prometheus series `name` for `frontend`, as the daemon serving metrics at
/// `at` reports it now.
fn metric(at: SocketAddr, name: &str, frontend: &str) -> Option<f64> {
    let mut s = TcpStream::connect(at).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix('{')?;
        rest.contains(&format!("frontend=\"{frontend}\""))
            .then(|| l.rsplit(' ').next()?.parse().ok())
            .flatten()
    })
}

// ------------------------------------------------------------------------------------------
// What the hooks leave to the listener (issue 22): a client the kernel could not send to the
// target from where it is bound works through the listener exactly as without the hooks.
// ------------------------------------------------------------------------------------------

/// A stand-in for a container: a namespace behind a veth pair with TCP and UDP echo servers
/// on its own addresses — a target the host reaches by a route through another interface,
/// not over loopback, as a container on a bridge. `host4`/`host6`: the host's end of the
/// pair, host addresses (in `local4`/`local6`).
struct Container {
    ns: Netns,
    link: String,
    host4: IpAddr,
    host6: IpAddr,
    ip4: IpAddr,
    tcp4: SocketAddr,
    udp4: SocketAddr,
    tcp6: SocketAddr,
    udp6: SocketAddr,
}

impl Container {
    /// `n` (0-3): this test's own number, so that tests running at once get subnets of
    /// their own (the process id tells this run from another's).
    fn new(tag: &str, n: u32) -> Container {
        let ns = Netns::new(tag);
        let pid = std::process::id();
        let (a, b) = (200 + pid % 50, (pid / 50) % 60 * 4 + n);
        let link = format!("rpxc{}{n}", pid % 100_000);
        let (h4, c4) = (format!("10.{a}.{b}.1"), format!("10.{a}.{b}.2"));
        let (h6, c6) = (
            format!("fd42:{a:x}:{b:x}::1"),
            format!("fd42:{a:x}:{b:x}::2"),
        );
        sh(&format!(
            "ip link add {link} type veth peer name eth0 netns {ns} && \
             ip addr add {h4}/24 dev {link} && ip addr add {h6}/64 dev {link} nodad && \
             ip link set {link} up && ip -n {ns} addr add {c4}/24 dev eth0 && \
             ip -n {ns} addr add {c6}/64 dev eth0 nodad && ip -n {ns} link set eth0 up && \
             ip -n {ns} route add default via {h4} && ip -n {ns} -6 route add default via {h6}",
            ns = ns.name
        ));
        let (t4, u4, t6, u6) = (c4.clone(), c4.clone(), c6.clone(), c6.clone());
        let (tcp4, udp4, tcp6, udp6) = ns.run(move || {
            (
                tcp_echo(&format!("{t4}:0")),
                udp_echo(&format!("{u4}:0")),
                tcp_echo(&format!("[{t6}]:0")),
                udp_echo(&format!("[{u6}]:0")),
            )
        });
        Container {
            ns,
            link,
            host4: h4.parse().unwrap(),
            host6: h6.parse().unwrap(),
            ip4: c4.parse().unwrap(),
            tcp4,
            udp4,
            tcp6,
            udp6,
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .output();
    }
}

/// What a client got: the bytes back and the peer it saw (getpeername, or the source of the
/// reply), or the error.
type Outcome = std::io::Result<(Vec<u8>, SocketAddr)>;

/// How a client's socket is made ready before it dials (bound, given options).
type Setup = dyn Fn(&Socket) -> std::io::Result<()>;

/// A TCP client: `setup`, then connect to `to`, send `msg`, read the echo to EOF.
fn tcp_client(to: SocketAddr, msg: &[u8], setup: &Setup) -> Outcome {
    let s = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
    setup(&s)?;
    s.connect_timeout(&SockAddr::from(to), Duration::from_secs(3))?;
    let mut s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let peer = s.peer_addr()?;
    s.write_all(msg)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok((out, peer))
}

/// A UDP client: `setup`, then `msg` to `to` — with connect() and send() if `connected`,
/// else sendto() — and one reply, with its source.
fn udp_client(to: SocketAddr, msg: &[u8], setup: &Setup, connected: bool) -> Outcome {
    let s = Socket::new(Domain::for_address(to), Type::DGRAM, None)?;
    setup(&s)?;
    let s: UdpSocket = s.into();
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut buf = [0u8; 2048];
    if connected {
        s.connect(to)?;
        s.send(msg)?;
        let n = s.recv(&mut buf)?;
        return Ok((buf[..n].to_vec(), s.peer_addr()?));
    }
    s.send_to(msg, to)?;
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((buf[..n].to_vec(), from))
}

/// A UDP client that sends from an unbound socket with the source given per datagram
/// (IP_PKTINFO / IPV6_PKTINFO), as a server answering on the address it was asked on does.
fn udp_pktinfo_client(to: SocketAddr, msg: &[u8], source: IpAddr) -> Outcome {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let s = UdpSocket::bind(match to {
        SocketAddr::V4(_) => "0.0.0.0:0",
        SocketAddr::V6(_) => "[::]:0",
    })?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let dest = SockaddrStorage::from(to);
    let iov = [std::io::IoSlice::new(msg)];
    let sent = match source {
        IpAddr::V4(ip) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from_ne_bytes(ip.octets()),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            let cmsg = [ControlMessage::Ipv4PacketInfo(&info)];
            sendmsg(s.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), Some(&dest))
        }
        IpAddr::V6(ip) => {
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: ip.octets(),
                },
                ipi6_ifindex: 0,
            };
            let cmsg = [ControlMessage::Ipv6PacketInfo(&info)];
            sendmsg(s.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), Some(&dest))
        }
    };
    sent.map_err(std::io::Error::from)?;
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((buf[..n].to_vec(), from))
}

/// Binds to `ip` (port 0); a dual-stack socket for an IPv4-mapped address.
fn bound_to(ip: &str) -> Box<Setup> {
    let at: SocketAddr = SocketAddr::new(ip.parse().unwrap(), 0);
    Box::new(move |s: &Socket| {
        if at.is_ipv6() {
            s.set_only_v6(false)?;
        }
        s.bind(&SockAddr::from(at))
    })
}

/// Runs `client` against the listener alone (port `off`) and with the hooks (port `on`),
/// both publishing the same target on `ip`: each must answer with the bytes sent, from the
/// address dialled — what the listener does is what the hooks must keep.
fn same_as_listener(
    what: &str,
    ip: &str,
    (off, on): (u16, u16),
    client: impl Fn(SocketAddr, &[u8]) -> Outcome,
) {
    let ip: IpAddr = ip.parse().unwrap();
    for (port, how) in [(off, "the listener alone"), (on, "with the hooks")] {
        let to = SocketAddr::new(ip, port);
        let got = client(to, what.as_bytes())
            .unwrap_or_else(|e| panic!("{what}, {how}: {e} (os error {:?})", e.raw_os_error()));
        assert_eq!(got, (what.as_bytes().to_vec(), to), "{what}, {how}");
    }
}

/// Publishes each (listen, target) spec twice: on its own port through the listener alone,
/// and on the port after it with `--socket-lb=require` (added to the running daemon).
fn publish_both(dir: &Dir, specs: &[(String, SocketAddr, &str)]) {
    for (listen, target, proto) in specs {
        let (ip, port) = listen.rsplit_once(':').unwrap();
        let port: u16 = port.parse().unwrap();
        let off = format!("{ip}:{port}:{target}/{proto}");
        let on = format!("{ip}:{}:{target}/{proto}", port + 1);
        for args in [
            vec!["add", off.as_str()],
            vec!["add", "--socket-lb=require", on.as_str()],
        ] {
            let (code, _, err) = cli(dir, &args);
            assert_eq!(code, 0, "{args:?}: {err}");
        }
    }
}

/// A daemon serving Prometheus metrics, one series set per port, without hooks of its own
/// (mappings ask for them).
fn daemon_with_metrics(dir: &Dir) -> (Proxy, SocketAddr) {
    let sock = dir.sock();
    let d = Spawn::new(&[
        "daemon",
        "--control-socket",
        sock.to_str().unwrap(),
        "--metrics-addr",
        "127.0.0.1:0",
        // A mapping and its neighbour through the listener are each their own series.
        "--metrics-per-port",
    ])
    .no_status_pipe()
    .spawn();
    let at = d.metrics_addr();
    (d, at)
}

/// A policy route that delivers replies to `ip` (an address no interface has) to the host,
/// for the host's own traffic only (`iif lo`): what a transparent proxy arranges for the
/// addresses it binds. Anything else sent to `ip` is dropped (blackhole), never routed out.
struct ReplyRoute {
    table: u32,
    ip: String,
}

impl ReplyRoute {
    fn new(ip: &str) -> ReplyRoute {
        let table = 20_000 + std::process::id() % 10_000;
        sh(&format!(
            "ip route add local {ip}/32 dev lo table {table} && \
             ip rule add to {ip} iif lo lookup {table} pref {table} && \
             ip route add blackhole {ip}/32"
        ));
        ReplyRoute {
            table,
            ip: ip.into(),
        }
    }
}

impl Drop for ReplyRoute {
    fn drop(&mut self) {
        let t = self.table;
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ip rule del pref {t}; ip route flush table {t}; ip route del blackhole {}/32",
                self.ip
            ))
            .output();
    }
}

/// The `rproxy ls` column `col` of the mapping listening on `listen`, as a number.
fn count(dir: &Dir, listen: &str, col: &str) -> u64 {
    row(dir, listen)[col].parse().unwrap()
}

/// TCP clients bound where the kernel cannot send them to a routed target — to loopback
/// (127.0.0.1, ::1, ::ffff:127.0.0.1), to a device (SO_BINDTODEVICE lo), to an address no
/// interface has (IP_TRANSPARENT, its replies routed back for the host's own traffic only) —
/// work through the listener with the hooks as without them, and the hooks count nothing for
/// them. Bound to a host address, or to loopback with a loopback target, they still go
/// straight to the target.
#[test]
fn bound_tcp_clients_the_hooks_cannot_carry_get_the_listener() {
    if !need_root("bound_tcp_clients_the_hooks_cannot_carry_get_the_listener") {
        return;
    }
    if !has_ipv6() {
        skip(TEST, "no IPv6 here");
        return;
    }
    let c = Container::new("slb-btcp", 0);
    let dir = Dir::new("slb-btcp");
    let _d = daemon(&dir, &[]);
    let echo = tcp_echo("127.0.0.1:0");
    let base = free_ports(6);
    // Each pair: through the listener alone, then with the hooks.
    let (v4, v6, lo) = ((base, base + 1), (base + 2, base + 3), (base + 4, base + 5));
    publish_both(
        &dir,
        &[
            (format!("0.0.0.0:{base}"), c.tcp4, "tcp"),
            (format!("[::]:{}", base + 2), c.tcp6, "tcp"),
            (format!("0.0.0.0:{}", base + 4), echo, "tcp"),
        ],
    );
    let on = |(_, on): (u16, u16), v6: bool| match v6 {
        false => format!("0.0.0.0:{on}"),
        true => format!("[::]:{on}"),
    };
    let tcp = |setup: Box<Setup>| move |to, msg: &[u8]| tcp_client(to, msg, &*setup);
    let host4 = c.host4.to_string();
    let pid = std::process::id();
    let nowhere = format!("198.19.{}.{}", (pid >> 8) & 0xff, pid & 0xff);
    let _route = ReplyRoute::new(&nowhere);
    let transparent: Box<Setup> = {
        let at = SocketAddr::new(nowhere.parse().unwrap(), 0);
        Box::new(move |s: &Socket| {
            s.set_ip_transparent_v4(true)?;
            s.bind(&SockAddr::from(at))
        })
    };
    let lo_device: Box<Setup> = Box::new(|s: &Socket| s.bind_device(Some(b"lo")));
    same_as_listener(
        "bound to 127.0.0.1",
        "127.0.0.1",
        v4,
        tcp(bound_to("127.0.0.1")),
    );
    same_as_listener(
        "bound to 127.0.0.1, to a host address",
        &host4,
        v4,
        tcp(bound_to("127.0.0.1")),
    );
    same_as_listener(
        "bound to ::ffff:127.0.0.1",
        "::ffff:127.0.0.1",
        v4,
        tcp(bound_to("::ffff:127.0.0.1")),
    );
    same_as_listener("SO_BINDTODEVICE lo", "127.0.0.1", v4, tcp(lo_device));
    same_as_listener(
        "IP_TRANSPARENT, bound to no interface's address",
        "127.0.0.1",
        v4,
        tcp(transparent),
    );
    same_as_listener("bound to ::1", "::1", v6, tcp(bound_to("::1")));
    // All through the listener, none counted by the hooks.
    assert_eq!(count(&dir, &on(v4, false), "TOTAL"), 5);
    assert_eq!(count(&dir, &on(v6, true), "TOTAL"), 1);
    for m in [on(v4, false), on(v6, true)] {
        assert_eq!(
            count(&dir, &m, "SOCKET_CONNS"),
            0,
            "{m}: counted by the hooks"
        );
    }

    // What the kernel can route still goes straight to the target.
    let host6 = c.host6.to_string();
    same_as_listener(
        "not bound",
        "127.0.0.1",
        v4,
        tcp(Box::new(|_: &Socket| Ok(()))),
    );
    same_as_listener(
        "bound to a host address",
        "127.0.0.1",
        v4,
        tcp(bound_to(&host4)),
    );
    same_as_listener(
        "bound to a host IPv6 address",
        "::1",
        v6,
        tcp(bound_to(&host6)),
    );
    same_as_listener(
        "bound to 127.0.0.1, loopback target",
        "127.0.0.1",
        lo,
        tcp(bound_to("127.0.0.1")),
    );
    same_as_listener(
        "bound to ::ffff:127.0.0.1, loopback target",
        "::ffff:127.0.0.1",
        lo,
        tcp(bound_to("::ffff:127.0.0.1")),
    );
    for (m, straight, relayed) in [
        (on(v4, false), 2, 5),
        (on(v6, true), 1, 1),
        (on(lo, false), 2, 0),
    ] {
        assert_eq!(
            (count(&dir, &m, "SOCKET_CONNS"), count(&dir, &m, "TOTAL")),
            (straight, relayed),
            "{m}: (straight to the target, through the listener)"
        );
    }
    // The kernel has the host-address client connected to the container itself.
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SockAddr::from(SocketAddr::new(c.host4, 0)))
        .unwrap();
    s.connect(&SockAddr::from(SocketAddr::from(([127, 0, 0, 1], v4.1))))
        .unwrap();
    let local = s.local_addr().unwrap().as_socket().unwrap();
    assert_eq!(
        kernel_peer(local),
        Some(c.tcp4.to_string()),
        "ss: where it is connected"
    );
}

/// UDP clients sending from loopback to a routed target — bound to 127.0.0.1 or ::1
/// (sendto and connect), or with the source given per datagram (IP_PKTINFO) — and dig
/// bound to 127.0.0.1, and a storm of 2,000 queries from 400 such sockets, work through the
/// listener as without the hooks, the hooks counting nothing; an unbound socket, and one
/// bound to loopback with a loopback target, still go straight to the target.
#[test]
fn udp_from_loopback_to_a_routed_target_gets_the_listener() {
    if !need_root("udp_from_loopback_to_a_routed_target_gets_the_listener") {
        return;
    }
    if !has_ipv6() {
        skip(TEST, "no IPv6 here");
        return;
    }
    let c = Container::new("slb-budp", 1);
    let dir = Dir::new("slb-budp");
    let (_d, metrics) = daemon_with_metrics(&dir);
    let uecho = udp_echo("127.0.0.1:0");
    let ip4 = c.ip4.to_string();
    let (_dns, dns_at) = c.ns.run(move || dns_server(&ip4));
    let base = free_ports(8);
    let (v4, v6, lo, named) = (
        (base, base + 1),
        (base + 2, base + 3),
        (base + 4, base + 5),
        (base + 6, base + 7),
    );
    publish_both(
        &dir,
        &[
            (format!("0.0.0.0:{base}"), c.udp4, "udp"),
            (format!("[::]:{}", base + 2), c.udp6, "udp"),
            (format!("0.0.0.0:{}", base + 4), uecho, "udp"),
            (format!("0.0.0.0:{}", base + 6), dns_at, "udp"),
        ],
    );
    let on = |(_, on): (u16, u16), v6: bool| match v6 {
        false => format!("0.0.0.0:{on}"),
        true => format!("[::]:{on}"),
    };
    let datagrams = |m: &str| metric(metrics, "rproxy_socket_lb_datagrams_total", m);
    let udp = |setup: Box<Setup>, connected: bool| {
        move |to, msg: &[u8]| udp_client(to, msg, &*setup, connected)
    };
    same_as_listener(
        "sendto from 127.0.0.1",
        "127.0.0.1",
        v4,
        udp(bound_to("127.0.0.1"), false),
    );
    same_as_listener(
        "connect from 127.0.0.1",
        "127.0.0.1",
        v4,
        udp(bound_to("127.0.0.1"), true),
    );
    same_as_listener("IP_PKTINFO 127.0.0.1", "127.0.0.1", v4, |to, msg: &[u8]| {
        udp_pktinfo_client(to, msg, "127.0.0.1".parse().unwrap())
    });
    same_as_listener("sendto from ::1", "::1", v6, udp(bound_to("::1"), false));
    same_as_listener("connect from ::1", "::1", v6, udp(bound_to("::1"), true));
    same_as_listener("IPV6_PKTINFO ::1", "::1", v6, |to, msg: &[u8]| {
        udp_pktinfo_client(to, msg, "::1".parse().unwrap())
    });
    // dig bound to 127.0.0.1, then the storm.
    if Command::new("dig").arg("-v").output().is_err() {
        skip(
            TEST,
            "dig not installed (.ci/install-deps installs bind9-dnsutils)",
        );
    } else {
        for port in [named.0, named.1] {
            let out = Command::new("dig")
                .args(["-b", "127.0.0.1", "+short", "+tries=1", "+time=3", "-p"])
                .arg(port.to_string())
                .args(["@127.0.0.1", "rproxy.test"])
                .output()
                .unwrap();
            let answer = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                answer.trim(),
                "192.0.2.7",
                "dig -b 127.0.0.1 -p {port}: {answer} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let published = SocketAddr::from(([127, 0, 0, 1], v4.1));
    let storm: Vec<UdpSocket> = (0..400)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let mut buf = [0u8; 64];
    for round in 0..5 {
        for (i, s) in storm.iter().enumerate() {
            let msg = format!("{round}/{i}");
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.send_to(msg.as_bytes(), published)
                .unwrap_or_else(|e| panic!("query {round}/{i}: {e}"));
            let (n, from) = s.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (msg.as_bytes(), published));
        }
    }
    for m in [on(v4, false), on(v6, true), on(named, false)] {
        assert!(
            count(&dir, &m, "TOTAL") > 0,
            "{m}: not through the listener"
        );
        assert_eq!(
            count(&dir, &m, "SOCKET_CONNS"),
            0,
            "{m}: counted by the hooks"
        );
        assert_eq!(datagrams(&m), Some(0.0), "{m}: counted by the hooks");
    }

    // What the kernel can route still goes straight to the target.
    let relayed = count(&dir, &on(v4, false), "TOTAL");
    same_as_listener(
        "sendto, not bound",
        "127.0.0.1",
        v4,
        udp(Box::new(|_: &Socket| Ok(())), false),
    );
    same_as_listener(
        "sendto from 127.0.0.1, loopback target",
        "127.0.0.1",
        lo,
        udp(bound_to("127.0.0.1"), false),
    );
    assert_eq!(count(&dir, &on(v4, false), "TOTAL"), relayed);
    assert_eq!(count(&dir, &on(lo, false), "TOTAL"), 0);
    assert_eq!(datagrams(&on(v4, false)), Some(1.0));
    assert_eq!(datagrams(&on(lo, false)), Some(1.0));
}

/// An unconnected IPv6 UDP socket: to [::1] of a mapping with an IPv4 target (6→4) the
/// kernel refuses what a sendmsg6 program rewrites to an IPv4-mapped address (ENOTSUPP), so
/// those datagrams are the listener's; connect() then send() still goes straight. To
/// ::ffff:127.0.0.1 of an IPv4 mapping (the kernel's IPv4 path, sendmsg4) the reply reads
/// as from the published address, as through the listener.
#[test]
fn unconnected_ipv6_udp_to_an_ipv4_target_works_as_through_the_listener() {
    if !need_root("unconnected_ipv6_udp_to_an_ipv4_target_works_as_through_the_listener") {
        return;
    }
    if !has_ipv6() {
        skip(TEST, "no IPv6 here");
        return;
    }
    let dir = Dir::new("slb-udp64");
    let (_d, metrics) = daemon_with_metrics(&dir);
    let uecho = udp_echo("127.0.0.1:0");
    let base = free_ports(4);
    let (six_to_four, mapped) = ((base, base + 1), (base + 2, base + 3));
    publish_both(
        &dir,
        &[
            (format!("[::]:{base}"), uecho, "udp"),
            (format!("0.0.0.0:{}", base + 2), uecho, "udp"),
        ],
    );
    let datagrams = |m: &str| metric(metrics, "rproxy_socket_lb_datagrams_total", m);
    let dual = |connected: bool| {
        move |to, msg: &[u8]| udp_client(to, msg, &|s: &Socket| s.set_only_v6(false), connected)
    };
    same_as_listener("sendto [::1], 6→4", "::1", six_to_four, dual(false));
    let m = format!("[::]:{}", six_to_four.1);
    assert_eq!(count(&dir, &m, "TOTAL"), 1, "{m}: not through the listener");
    assert_eq!(datagrams(&m), Some(0.0), "{m}: counted by the hooks");
    same_as_listener("connect [::1], 6→4", "::1", six_to_four, dual(true));
    assert_eq!(
        count(&dir, &m, "SOCKET_CONNS"),
        1,
        "{m}: connect() not straight"
    );
    assert_eq!(count(&dir, &m, "TOTAL"), 1, "{m}");
    same_as_listener(
        "sendto ::ffff:127.0.0.1",
        "::ffff:127.0.0.1",
        mapped,
        dual(false),
    );
    let m = format!("0.0.0.0:{}", mapped.1);
    assert_eq!(datagrams(&m), Some(1.0), "{m}: not straight");
    assert_eq!(count(&dir, &m, "TOTAL"), 0, "{m}");
}

/// IPV6_V6ONLY as the kernel has it decides 6→4, not as last asked: a change the kernel
/// refuses (the socket is already bound) is not taken for the socket's setting. An IPv6-only
/// socket that then asks to be dual-stack goes through the listener (the kernel would not
/// let it reach an IPv4-mapped address); a dual-stack one that then asks to be IPv6-only
/// still goes straight.
#[test]
fn ipv6_v6only_set_too_late_is_not_taken() {
    if !need_root("ipv6_v6only_set_too_late_is_not_taken") {
        return;
    }
    if !has_ipv6() {
        skip(TEST, "no IPv6 here");
        return;
    }
    let dir = Dir::new("slb-v6late");
    let _d = daemon(&dir, &[]);
    let echo = tcp_echo("127.0.0.1:0");
    let base = free_ports(2);
    publish_both(&dir, &[(format!("[::]:{base}"), echo, "tcp")]);
    let m = format!("[::]:{}", base + 1);
    let late = |first: bool| -> Box<Setup> {
        Box::new(move |s: &Socket| {
            s.set_only_v6(first)?;
            s.bind(&SockAddr::from(SocketAddr::from(([0u16; 8], 0))))?;
            let refused = s.set_only_v6(!first).unwrap_err();
            assert_eq!(refused.raw_os_error(), Some(libc::EINVAL), "{refused}");
            Ok(())
        })
    };
    let tcp = |setup: Box<Setup>| move |to, msg: &[u8]| tcp_client(to, msg, &*setup);
    same_as_listener(
        "IPv6-only, dual-stack too late",
        "::1",
        (base, base + 1),
        tcp(late(true)),
    );
    assert_eq!(
        (count(&dir, &m, "SOCKET_CONNS"), count(&dir, &m, "TOTAL")),
        (0, 1),
        "{m}: (straight, through the listener)"
    );
    same_as_listener(
        "dual-stack, IPv6-only too late",
        "::1",
        (base, base + 1),
        tcp(late(false)),
    );
    assert_eq!(
        (count(&dir, &m, "SOCKET_CONNS"), count(&dir, &m, "TOTAL")),
        (1, 1),
        "{m}: (straight, through the listener)"
    );
}
