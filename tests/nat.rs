//! Kernel NAT (`--nat`): rproxy's nftables DNAT rules against real network namespaces — a
//! "host" running rproxy, a "container" and a "peer" on the host's bridge, and a "remote"
//! client on an uplink. Each client asks the container who it is talking to, so the tests see
//! which path served it: DNAT keeps the client's address, the userland proxy replaces it with
//! the host's.
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::{need_root, rproxy, sh, wait_until, Dir, Netns, Proxy, Spawn};
use nix::sys::signal::Signal;

const CTR: &str = "10.70.1.2";
const CTR6: &str = "fd70:1::2";
const BRIDGE_IP: &str = "10.70.1.1";
const HOST_IP: &str = "10.70.2.1";
const HOST_IP6: &str = "fd70:2::1";
const REMOTE_IP: &str = "10.70.2.2";
const REMOTE_IP6: &str = "fd70:2::2";

/// host (bridge br0 10.70.1.1, uplink 10.70.2.1) ── ctr 10.70.1.2, peer 10.70.1.3 on br0;
/// remote 10.70.2.2 on the uplink. IPv6 alongside: fd70:1::/64 and fd70:2::/64.
struct Topo {
    host: Netns,
    ctr: Netns,
    peer: Netns,
    remote: Netns,
    dir: Dir,
}

impl Topo {
    fn new(tag: &str) -> Topo {
        let t = Topo {
            host: Netns::new(&format!("{tag}h")),
            ctr: Netns::new(&format!("{tag}c")),
            peer: Netns::new(&format!("{tag}p")),
            remote: Netns::new(&format!("{tag}r")),
            dir: Dir::new(&format!("nat-{tag}")),
        };
        let (h, c, p, r) = (&t.host.name, &t.ctr.name, &t.peer.name, &t.remote.name);
        let mut script = format!(
            "ip -n {h} link add br0 type bridge && ip -n {h} link set br0 up && \
             ip -n {h} addr add {BRIDGE_IP}/24 dev br0 && ip -n {h} addr add fd70:1::1/64 dev br0 nodad && \
             ip -n {h} link add up0 type veth peer name eth0 netns {r} && ip -n {h} link set up0 up && \
             ip -n {h} addr add {HOST_IP}/24 dev up0 && ip -n {h} addr add {HOST_IP6}/64 dev up0 nodad && \
             ip -n {r} link set eth0 up && ip -n {r} addr add {REMOTE_IP}/24 dev eth0 && \
             ip -n {r} addr add {REMOTE_IP6}/64 dev eth0 nodad && \
             ip -n {r} route add default via {HOST_IP} && ip -n {r} -6 route add default via {HOST_IP6} && \
             ip netns exec {h} sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1"
        );
        for (ns, n) in [(c, 2), (p, 3)] {
            script.push_str(&format!(
                " && ip -n {h} link add v{n} type veth peer name eth0 netns {ns} && \
                 ip -n {h} link set v{n} master br0 up && ip -n {ns} link set eth0 up && \
                 ip -n {ns} addr add 10.70.1.{n}/24 dev eth0 && ip -n {ns} addr add fd70:1::{n}/64 dev eth0 nodad && \
                 ip -n {ns} route add default via {BRIDGE_IP} && ip -n {ns} -6 route add default via fd70:1::1"
            ));
        }
        sh(&script);
        t
    }

    fn sock(&self) -> String {
        self.dir.sock().to_str().unwrap().to_string()
    }

    /// `rproxy daemon` in the host namespace with `args`, once ready.
    fn daemon(&self, args: &[&str]) -> Proxy {
        let sock = self.sock();
        let mut argv = vec!["daemon", "--control-socket", &sock, "--drain-timeout", "0"];
        argv.extend_from_slice(args);
        let p = Spawn::new(&argv)
            .wrap(&["ip", "netns", "exec", &self.host.name])
            .no_status_pipe()
            .spawn();
        p.wait_log("daemon ready", Duration::from_secs(10));
        p
    }

    /// `rproxy ARGS…` against the daemon; panics unless it succeeds.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(rproxy())
            .args(args)
            .args(["--control-socket", &self.sock()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rproxy {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// (userland connections, kernel connections) of the mapping listening on `listen`.
    fn counts(&self, proto: &str, listen: &str) -> (u64, u64) {
        let table = self.cli(&["ls"]);
        let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
        for line in table.lines().skip(1) {
            let cells: Vec<&str> = line.split_whitespace().collect();
            if cells[col("PROTO")] == proto && cells[col("LISTEN")] == listen {
                return (
                    cells[col("TOTAL")].parse().unwrap(),
                    cells[col("KERNEL_CONNS")].parse().unwrap(),
                );
            }
        }
        panic!("no {proto} {listen} in\n{table}");
    }

    /// Connections the socket hooks sent on, for the mapping listening on `listen`.
    fn socket_conns(&self, proto: &str, listen: &str) -> u64 {
        let table = self.cli(&["ls"]);
        let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
        table
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|c| c[col("PROTO")] == proto && c[col("LISTEN")] == listen)
            .map(|c| c[col("SOCKET_CONNS")].parse().unwrap())
            .unwrap_or_else(|| panic!("no {proto} {listen} in\n{table}"))
    }

    /// `nft list ruleset` in the host namespace.
    fn ruleset(&self) -> String {
        nft(&self.host, "list ruleset")
    }

    /// How many rules rproxy has in the host namespace (each carries an "rproxy …" comment).
    fn our_rules(&self) -> usize {
        self.ruleset().matches("comment \"rproxy ").count()
    }
}

fn nft(ns: &Netns, args: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("ip netns exec {} nft {args}", ns.name))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nft {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A TCP server in `ns` on port 80 (both families) that tells each client its address.
fn whoami_tcp(ns: &Netns) {
    let listener = ns.run(|| {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
        s.set_only_v6(false).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&"[::]:80".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        s.listen(64).unwrap();
        TcpListener::from(s)
    });
    std::thread::spawn(move || {
        for mut conn in listener.incoming().map_while(Result::ok) {
            let peer = conn.peer_addr().unwrap().ip().to_canonical();
            let _ = conn.write_all(peer.to_string().as_bytes());
        }
    });
}

/// A UDP server in `ns` on port 53 (both families) that answers with the sender's address.
fn whoami_udp(ns: &Netns) {
    let socket = ns.run(|| {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None).unwrap();
        s.set_only_v6(false).unwrap();
        s.bind(&"[::]:53".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        UdpSocket::from(s)
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(from.ip().to_canonical().to_string().as_bytes(), from);
        }
    });
}

/// A UDP server in `ns` on port 53 that answers every datagram with `tag`.
fn tagged_udp(ns: &Netns, tag: &'static str) {
    let socket = ns.run(|| UdpSocket::bind("0.0.0.0:53").unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(tag.as_bytes(), from);
        }
    });
}

/// Connects from `ns` to `addr` and returns the address the container saw.
fn ask_tcp(ns: &Netns, addr: &str) -> String {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut seen = String::new();
        s.read_to_string(&mut seen).unwrap();
        seen
    })
}

/// Sends a datagram from `ns` to `addr`; returns (who answered, the address the container saw).
fn ask_udp(ns: &Netns, addr: &str) -> (SocketAddr, String) {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.run(move || {
        let bind = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let s = UdpSocket::bind(bind).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..6 {
            s.send_to(b"who", addr).unwrap();
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                return (from, String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        panic!("no UDP answer through {addr}");
    })
}

#[test]
fn remote_and_host_clients_go_through_dnat_loopback_and_hairpin_through_userland() {
    if !need_root("remote_and_host_clients_go_through_dnat_loopback_and_hairpin_through_userland") {
        return;
    }
    let t = Topo::new("natpaths");
    whoami_tcp(&t.ctr);
    let _d = t.daemon(&[
        "--nat",
        "-p",
        &format!("8080:{CTR}:80"),
        "-p",
        &format!("[::]:8080:[{CTR6}]:80"),
    ]);
    let v4 = "0.0.0.0:8080";

    // A remote client reaches the container through DNAT: its own address arrives, and the
    // userland listener never sees the connection.
    assert_eq!(ask_tcp(&t.remote, &format!("{HOST_IP}:8080")), REMOTE_IP);
    assert_eq!(t.counts("tcp", v4), (0, 1));

    // A host process on a non-loopback address: DNAT in the output chain.
    assert_eq!(ask_tcp(&t.host, &format!("{HOST_IP}:8080")), HOST_IP);
    assert_eq!(t.counts("tcp", v4), (0, 2));

    // Loopback stays in userland: the container sees the host's bridge address.
    assert_eq!(ask_tcp(&t.host, "127.0.0.1:8080"), BRIDGE_IP);
    assert_eq!(t.counts("tcp", v4), (1, 2));

    // Hairpin: a neighbour on the container's bridge, and the container itself, reach the
    // published port through the userland listener (no DNAT for traffic from br0).
    assert_eq!(ask_tcp(&t.peer, &format!("{BRIDGE_IP}:8080")), BRIDGE_IP);
    assert_eq!(ask_tcp(&t.peer, &format!("{HOST_IP}:8080")), BRIDGE_IP);
    assert_eq!(ask_tcp(&t.ctr, &format!("{BRIDGE_IP}:8080")), BRIDGE_IP);
    assert_eq!(t.counts("tcp", v4), (4, 2));

    // IPv6: the same paths.
    let v6 = "[::]:8080";
    assert_eq!(
        ask_tcp(&t.remote, &format!("[{HOST_IP6}]:8080")),
        REMOTE_IP6
    );
    assert_eq!(t.counts("tcp", v6), (0, 1));
    assert_eq!(ask_tcp(&t.host, "[::1]:8080"), "fd70:1::1");
    assert_eq!(t.counts("tcp", v6), (1, 1));
    assert_eq!(ask_tcp(&t.peer, "[fd70:1::1]:8080"), "fd70:1::1");
    assert_eq!(t.counts("tcp", v6), (2, 1));
    assert!(t.cli(&["ls"]).lines().skip(1).all(|l| l.contains("kernel")));
}

#[test]
fn udp_goes_through_dnat_and_replies_come_from_the_published_address() {
    if !need_root("udp_goes_through_dnat_and_replies_come_from_the_published_address") {
        return;
    }
    let t = Topo::new("natudp");
    whoami_udp(&t.ctr);
    let _d = t.daemon(&["--nat", "-p", &format!("5300:{CTR}:53/udp")]);
    let published: SocketAddr = format!("{HOST_IP}:5300").parse().unwrap();
    let (from, seen) = ask_udp(&t.remote, &published.to_string());
    assert_eq!((from, seen.as_str()), (published, REMOTE_IP));
    assert_eq!(t.counts("udp", "0.0.0.0:5300"), (0, 1));
    // Loopback: the userland flow table, which replies from the address the client used.
    let (from, seen) = ask_udp(&t.host, "127.0.0.1:5300");
    assert_eq!(from, "127.0.0.1:5300".parse().unwrap());
    assert_eq!(seen, BRIDGE_IP);
    assert_eq!(t.counts("udp", "0.0.0.0:5300"), (1, 1));
}

#[test]
fn a_udp_client_follows_its_mapping_to_a_new_target() {
    if !need_root("a_udp_client_follows_its_mapping_to_a_new_target") {
        return;
    }
    let t = Topo::new("natflow");
    tagged_udp(&t.ctr, "ctr");
    tagged_udp(&t.peer, "peer");
    let _d = t.daemon(&["--nat", "-p", &format!("5300:{CTR}:53/udp")]);
    // One client socket throughout: the same 5-tuple, whose conntrack entry keeps the DNAT.
    let client = t.remote.run(|| UdpSocket::bind("0.0.0.0:0").unwrap());
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let published = format!("{HOST_IP}:5300");
    let ask = |client: &UdpSocket| -> Option<String> {
        let mut buf = [0u8; 16];
        for _ in 0..10 {
            client.send_to(b"who", &published).unwrap();
            if let Ok(n) = client.recv(&mut buf) {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        None
    };
    assert_eq!(ask(&client).as_deref(), Some("ctr"));
    // The container is replaced: the mapping now goes to the peer's address.
    t.cli(&["rm", &format!("5300:{CTR}:53/udp")]);
    t.cli(&["add", "--nat", "5300:10.70.1.3:53/udp"]);
    assert_eq!(
        ask(&client).as_deref(),
        Some("peer"),
        "the old flow's conntrack entry still steers the client to the removed target"
    );
}

#[test]
fn rules_follow_mappings_and_die_with_the_process() {
    if !need_root("rules_follow_mappings_and_die_with_the_process") {
        return;
    }
    let t = Topo::new("natlife");
    whoami_tcp(&t.ctr);

    // Left behind by a crash on a kernel without owner tables: swept. Not ours: kept.
    let dead_pid = (100_000..4_000_000)
        .find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .unwrap();
    nft(&t.host, "add table inet rproxy");
    nft(
        &t.host,
        "add chain inet rproxy prerouting '{ type nat hook prerouting priority -100; }'",
    );
    nft(
        &t.host,
        "add rule inet rproxy prerouting tcp dport 8080 dnat ip to 10.70.1.9:80",
    );
    nft(&t.host, &format!("add table inet rproxy-{dead_pid}"));
    nft(&t.host, "add table inet someone-else");
    let mut d = t.daemon(&["--nat", "-p", &format!("8080:{CTR}:80")]);
    let tables = nft(&t.host, "list tables");
    assert!(!tables.contains(&format!("rproxy-{dead_pid}")), "{tables}");
    assert!(tables.contains("someone-else"), "{tables}");
    assert!(!t.ruleset().contains("10.70.1.9"), "stale rule survived");
    assert!(t.ruleset().contains("flags owner"));
    assert_eq!(t.our_rules(), 2);

    // Added and removed with the mapping, atomically per mapping.
    t.cli(&["add", "--nat", &format!("8081:{CTR}:80")]);
    assert_eq!(t.our_rules(), 4);
    assert_eq!(ask_tcp(&t.remote, &format!("{HOST_IP}:8081")), REMOTE_IP);
    t.cli(&["rm", &format!("8080:{CTR}:80")]);
    assert_eq!(t.our_rules(), 2);
    assert!(!t.ruleset().contains("0.0.0.0:8080"));
    assert_eq!(ask_tcp(&t.remote, &format!("{HOST_IP}:8081")), REMOTE_IP);
    let refused = t.remote.run(|| {
        TcpStream::connect_timeout(
            &format!("{HOST_IP}:8080").parse().unwrap(),
            Duration::from_secs(2),
        )
    });
    assert!(refused.is_err(), "port 8080 still reachable after rm");

    // SIGTERM: the table goes with the process.
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!nft(&t.host, "list tables").contains("rproxy"));

    // SIGKILL: the kernel deletes an owner table when its socket closes.
    let mut d = t.daemon(&["--nat", "-p", &format!("8080:{CTR}:80")]);
    assert_eq!(t.our_rules(), 2);
    d.signal(Signal::SIGKILL);
    d.wait_exit(Duration::from_secs(5));
    wait_until("the owner table to go", Duration::from_secs(5), || {
        !nft(&t.host, "list tables").contains("rproxy")
    });
    // And a restart installs exactly one set again.
    let _d = t.daemon(&["--nat", "-p", &format!("8080:{CTR}:80")]);
    assert_eq!(t.our_rules(), 2);
    assert_eq!(ask_tcp(&t.remote, &format!("{HOST_IP}:8080")), REMOTE_IP);
}

/// A container's ports go one removal at a time (its shims deregister one by one): each takes
/// exactly its own rules, found from one read of the table.
#[test]
fn mappings_removed_one_by_one_take_exactly_their_rules() {
    if !need_root("mappings_removed_one_by_one_take_exactly_their_rules") {
        return;
    }
    let t = Topo::new("natrm");
    whoami_tcp(&t.ctr);
    let _d = t.daemon(&[
        "--nat",
        "-p",
        &format!("9000-9019:{CTR}:9000-9019"),
        "-p",
        &format!("8080:{CTR}:80"),
    ]);
    assert_eq!(t.our_rules(), 42);
    let rm = |port: u16| t.cli(&["rm", &format!("{port}:{CTR}:{port}")]);
    for port in 9000..9010 {
        rm(port);
    }
    assert_eq!(t.our_rules(), 22);
    // Nobody else can change the rules under rproxy (an owner table refuses other sockets),
    // so handles read once stay good.
    let listing = nft(&t.host, "-a list table inet rproxy");
    let (chain, handle) = {
        let mut chain = "";
        listing
            .lines()
            .find_map(|l| {
                if let Some(c) = l.trim().strip_prefix("chain ") {
                    chain = c.split_whitespace().next().unwrap();
                }
                let h = l
                    .split("rproxy 0.0.0.0:9010:")
                    .nth(1)?
                    .rsplit("handle ")
                    .next()?;
                Some((chain.to_string(), h.trim().to_string()))
            })
            .unwrap_or_else(|| panic!("no rule for 9010 in\n{listing}"))
    };
    let tamper = Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.host.name,
            "nft",
            "delete",
            "rule",
            "inet",
            "rproxy",
        ])
        .args([&chain, "handle", &handle])
        .output()
        .unwrap();
    assert!(!tamper.status.success(), "nft changed rproxy's owner table");
    rm(9010);
    assert_eq!(t.our_rules(), 20);
    assert!(!t.ruleset().contains("0.0.0.0:9010:"));
    for port in 9011..9020 {
        rm(port);
    }
    assert_eq!(t.our_rules(), 2);
    assert_eq!(ask_tcp(&t.remote, &format!("{HOST_IP}:8080")), REMOTE_IP);
}

#[test]
fn without_cap_net_admin_nat_falls_back_or_fails_as_asked() {
    if !need_root("without_cap_net_admin_nat_falls_back_or_fails_as_asked") {
        return;
    }
    let t = Topo::new("natcap");
    whoami_tcp(&t.ctr);
    std::fs::set_permissions(
        &t.dir.0,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    let spawn = |args: &[&str]| {
        let sock = t.sock();
        let mut argv = vec!["daemon", "--control-socket", &sock];
        argv.extend_from_slice(args);
        Spawn::new(&argv)
            .wrap(&["ip", "netns", "exec", &t.host.name])
            .wrap(&nobody)
            .no_status_pipe()
            .spawn()
    };

    // --nat: one warning, then userland serves (the container sees the host, not the client).
    let d = spawn(&["--nat", "-p", &format!("8080:{CTR}:80")]);
    let warning = d.wait_log("kernel NAT unavailable", Duration::from_secs(10));
    assert!(warning.contains("CAP_NET_ADMIN"), "{warning}");
    d.wait_log("daemon ready", Duration::from_secs(10));
    assert_eq!(ask_tcp(&t.remote, &format!("{HOST_IP}:8080")), BRIDGE_IP);
    assert!(t.cli(&["ls"]).contains("userland"));
    drop(d);

    // --nat=require: refuses to start, saying why.
    let mut d = spawn(&["--nat=require", "-p", &format!("8080:{CTR}:80")]);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(1));
    let err = d.stderr_text(Duration::from_millis(200));
    assert!(
        err.contains("kernel NAT required") && err.contains("CAP_NET_ADMIN"),
        "{err}"
    );

    // Docker mode: RPROXY_NAT=require fails on the status pipe, which `docker run` shows.
    let mut p = Spawn::forward("tcp", "0.0.0.0", format!("{CTR}:80").parse().unwrap())
        .wrap(&["ip", "netns", "exec", &t.host.name])
        .wrap(&nobody)
        .env("RPROXY_NAT", "require")
        .env("RPROXY_HANDOFF", "0")
        .spawn();
    let status = String::from_utf8_lossy(&p.status()).into_owned();
    assert!(
        status.starts_with("1\n") && status.contains("CAP_NET_ADMIN"),
        "{status:?}"
    );
    assert_eq!(p.wait_exit(Duration::from_secs(5)), Some(1));
}

#[test]
fn docker_mode_installs_its_own_table_unless_dockerd_nats() {
    if !need_root("docker_mode_installs_its_own_table_unless_dockerd_nats") {
        return;
    }
    let t = Topo::new("natdock");
    whoami_tcp(&t.ctr);
    let spawn = || {
        Spawn::new(&[
            "-proto",
            "tcp",
            "-host-ip",
            "0.0.0.0",
            "-host-port",
            "8080",
            "-container-ip",
            CTR,
            "-container-port",
            "80",
        ])
        .wrap(&["ip", "netns", "exec", &t.host.name])
        .env("RPROXY_NAT", "on")
        .env("RPROXY_HANDOFF", "0")
        .spawn()
    };

    // Alone (dockerd --iptables=false): its own table, named for its pid, gone on SIGTERM.
    let mut p = spawn().ready();
    let table = format!("rproxy-{}", p.child.id());
    assert!(nft(&t.host, "list tables").contains(&table));
    assert_eq!(ask_tcp(&t.remote, &format!("{HOST_IP}:8080")), REMOTE_IP);
    assert_eq!(ask_tcp(&t.host, "127.0.0.1:8080"), BRIDGE_IP);
    p.signal(Signal::SIGINT);
    assert_eq!(p.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(!nft(&t.host, "list tables").contains("rproxy"));

    // A DOCKER chain an earlier dockerd left, with no rule for this port: rproxy's own rules.
    let host = &t.host.name;
    sh(&format!(
        "ip netns exec {host} iptables -t nat -N DOCKER && \
         ip netns exec {host} iptables -t nat -A DOCKER -i br0 -j RETURN"
    ));
    let mut p = spawn().ready();
    assert!(nft(&t.host, "list tables").contains(&format!("rproxy-{}", p.child.id())));
    assert_eq!(ask_tcp(&t.remote, &format!("{HOST_IP}:8080")), REMOTE_IP);
    p.signal(Signal::SIGINT);
    assert_eq!(p.wait_exit(Duration::from_secs(5)), Some(0));

    // dockerd's own DNAT rule for the port (iptables-nft; dockerd adds it before it starts the
    // proxy): no second set of rules, not even an empty table; dockerd's rule translates.
    sh(&format!(
        "ip netns exec {host} iptables -t nat -A DOCKER ! -i br0 -p tcp -m tcp --dport 8080 \
           -j DNAT --to-destination {CTR}:80 && \
         ip netns exec {host} iptables -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER"
    ));
    let mut p = spawn();
    p.wait_log(
        "dockerd's own rules already DNAT it",
        Duration::from_secs(5),
    );
    assert_eq!(p.status(), b"0\n");
    assert!(!t.ruleset().contains("rproxy"), "{}", t.ruleset());
    assert_eq!(ask_tcp(&t.remote, &format!("{HOST_IP}:8080")), REMOTE_IP);
}

/// dockerd's DNAT rule is found where each engine keeps it — `ip nat DOCKER` (iptables-nft)
/// and `ip`/`ip6 docker-bridges` `nat-prerouting-and-output` (Docker 29's nftables backend),
/// written here by hand as those engines write them — and looked for again after start-up:
/// an engine up to 27 adds it after starting the proxy (rproxy's rules give way), and one
/// that goes hands the port back to rproxy's. A 6→4 binding never counts as dockerd's.
#[test]
fn dockerds_rules_are_found_in_both_backends_and_followed() {
    if !need_root("dockerds_rules_are_found_in_both_backends_and_followed") {
        return;
    }
    let t = Topo::new("natrec");
    whoami_tcp(&t.ctr);
    let _daemon = t.daemon(&[]);
    let host = &t.host.name;
    let sock = t.sock();
    // A docker-mode process as dockerd starts it, handing its port to the daemon.
    let publish = |host_ip: &str, port: u16, target: &str| {
        Spawn::new(&[
            "-proto",
            "tcp",
            "-host-ip",
            host_ip,
            "-host-port",
            &port.to_string(),
            "-container-ip",
            target,
            "-container-port",
            "80",
        ])
        .wrap(&["ip", "netns", "exec", host])
        .env("RPROXY_NAT", "on")
        .env("RPROXY_SOCKET", &sock)
        .spawn()
        .ready()
    };
    let nat_of = |listen: &str| -> String {
        let table = t.cli(&["ls"]);
        let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
        table
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|c| c[col("LISTEN")] == listen)
            .map(|c| c[col("NAT")].to_string())
            .unwrap_or_else(|| panic!("no {listen} in\n{table}"))
    };
    // rproxy's rules for a port (each carries the comment "rproxy <spec>").
    let ours = |port: u16| {
        t.ruleset()
            .matches(&format!("comment \"rproxy 0.0.0.0:{port}:"))
            .count()
    };
    let becomes = |listen: &str, want: &str| {
        wait_until(
            &format!("{listen} to become {want}"),
            Duration::from_secs(5),
            || nat_of(listen) == want,
        )
    };

    // Docker 29, nftables backend: its rules exist before the proxy starts.
    sh(&format!(
        "ip netns exec {host} nft -f - <<'EOF'
table ip docker-bridges {{
  chain nat-prerouting-and-output {{
    iifname != \"br0\" tcp dport 8081 counter dnat to {CTR}:80
    iifname != \"br0\" tcp dport 8083 counter dnat to {CTR}:80
    iifname != \"br0\" ip daddr {HOST_IP} tcp dport 8085 counter dnat to {CTR}:80
  }}
  chain nat-PREROUTING {{
    type nat hook prerouting priority dstnat; policy accept;
    fib daddr type local counter jump nat-prerouting-and-output
  }}
}}
table ip6 docker-bridges {{
  chain nat-prerouting-and-output {{
    iifname != \"br0\" tcp dport 8084 counter dnat to [{CTR6}]:80
  }}
}}
EOF"
    ));
    let _p1 = publish("0.0.0.0", 8081, CTR);
    assert_eq!(nat_of("0.0.0.0:8081"), "dockerd");
    assert_eq!(ours(8081), 0, "{}", t.ruleset());
    assert_eq!(ask_tcp(&t.remote, &format!("{HOST_IP}:8081")), REMOTE_IP);
    let _p4 = publish("::", 8084, CTR6);
    assert_eq!(nat_of("[::]:8084"), "dockerd");
    // 6→4 (`-host-ip :: -container-ip <IPv4>`): no dockerd rule, whatever the IPv4 one says.
    let _p3 = publish("::", 8083, CTR);
    assert_eq!(nat_of("[::]:8083"), "userland");
    // A rule for one host address (`-p HOST_IP:8085:80`) covers that address only: a
    // mapping on every address gets rproxy's rules, one on that address is dockerd's.
    let _p5 = publish("0.0.0.0", 8085, CTR);
    assert_eq!(nat_of("0.0.0.0:8085"), "kernel");
    drop(_p5);
    let _p6 = publish(HOST_IP, 8085, CTR);
    assert_eq!(nat_of(&format!("{HOST_IP}:8085")), "dockerd");

    // An engine up to 27: the proxy first (rproxy's rules), then dockerd's (iptables-nft).
    let _p2 = publish("0.0.0.0", 8082, CTR);
    assert_eq!(nat_of("0.0.0.0:8082"), "kernel");
    assert!(ours(8082) > 0, "{}", t.ruleset());
    let rule = format!("! -i br0 -p tcp -m tcp --dport 8082 -j DNAT --to-destination {CTR}:80");
    sh(&format!(
        "ip netns exec {host} iptables -t nat -N DOCKER && \
         ip netns exec {host} iptables -t nat -A DOCKER {rule} && \
         ip netns exec {host} iptables -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER"
    ));
    becomes("0.0.0.0:8082", "dockerd");
    assert_eq!(ours(8082), 0, "{}", t.ruleset());
    assert_eq!(ask_tcp(&t.remote, &format!("{HOST_IP}:8082")), REMOTE_IP);

    // dockerd's rule goes while the port stays: rproxy's rules take over.
    sh(&format!(
        "ip netns exec {host} iptables -t nat -D DOCKER {rule}"
    ));
    becomes("0.0.0.0:8082", "kernel");
    assert!(ours(8082) > 0, "{}", t.ruleset());
    assert_eq!(ask_tcp(&t.remote, &format!("{HOST_IP}:8082")), REMOTE_IP);
}

#[test]
fn config_sets_nat_per_mapping_and_forwarding_off_keeps_userland() {
    if !need_root("config_sets_nat_per_mapping_and_forwarding_off_keeps_userland") {
        return;
    }
    let t = Topo::new("natconf");
    whoami_tcp(&t.ctr);
    let config = t.dir.0.join("rproxy.toml");
    std::fs::write(
        &config,
        format!(
            "nat = \"on\"\npublish = [\"8080:{CTR}:80\"]\n\n\
             [[mapping]]\npublish = \"8081:{CTR}:80\"\nnat = \"off\"\n"
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap().to_string();
    let d = t.daemon(&["--config", &cfg]);
    assert_eq!(ask_tcp(&t.remote, &format!("{HOST_IP}:8080")), REMOTE_IP);
    assert_eq!(ask_tcp(&t.remote, &format!("{HOST_IP}:8081")), BRIDGE_IP);
    let ls = t.cli(&["ls"]);
    let nat_of = |port: &str| {
        ls.lines()
            .find(|l| l.contains(&format!("0.0.0.0:{port} ")))
            .and_then(|l| l.split_whitespace().nth(10))
            .unwrap_or_else(|| panic!("no :{port} in\n{ls}"))
            .to_string()
    };
    assert_eq!(
        (nat_of("8080"), nat_of("8081")),
        ("kernel".into(), "-".into())
    );
    drop(d);

    // A bad mode names the file and line.
    std::fs::write(
        &config,
        format!("[[mapping]]\npublish = \"8080:{CTR}:80\"\nnat = \"maybe\"\n"),
    )
    .unwrap();
    let out = Command::new(rproxy())
        .args(["daemon", "--control-socket", &t.sock(), "--config", &cfg])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("rproxy.toml:3") && err.contains("invalid mode"),
        "{err}"
    );

    // Forwarding off toward the target: translated packets would be dropped, so `on` keeps
    // the mapping in userland (which still serves it) and `require` refuses.
    sh(&format!(
        "ip netns exec {} sysctl -qw net.ipv4.conf.br0.forwarding=0",
        t.host.name
    ));
    let _d = t.daemon(&["--nat", "-p", &format!("8080:{CTR}:80")]);
    assert_eq!(ask_tcp(&t.remote, &format!("{HOST_IP}:8080")), BRIDGE_IP);
    assert!(t.cli(&["ls"]).contains("userland"));
    let out = Command::new(rproxy())
        .args([
            "add",
            "--nat=require",
            &format!("8082:{CTR}:80"),
            "--control-socket",
            &t.sock(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("net.ipv4.conf.br0.forwarding is 0"), "{err}");
}

/// The three paths compose: with --nat and --socket-lb, a remote client goes through DNAT
/// (the container sees it), host processes — on loopback or a host address — through the
/// socket hooks (straight to the container, which sees the host's bridge address, as with
/// the proxy), and hairpin through the listener.
#[test]
fn nat_socket_hooks_and_listener_each_serve_their_clients() {
    if !need_root("nat_socket_hooks_and_listener_each_serve_their_clients") {
        return;
    }
    let t = Topo::new("natslb");
    whoami_tcp(&t.ctr);
    // nsenter, not `ip netns exec`: that one remounts /sys for the namespace, hiding the
    // cgroup v2 mount the hooks attach to (a real host's daemon runs in the host's mounts).
    let sock = t.sock();
    let p = format!("8080:{CTR}:80");
    let d = Spawn::new(&[
        "daemon",
        "--control-socket",
        &sock,
        "--nat",
        "--socket-lb=require",
        "-p",
        &p,
    ])
    .wrap(&["nsenter", &format!("--net=/var/run/netns/{}", t.host.name)])
    .no_status_pipe()
    .spawn();
    d.wait_log("daemon ready", Duration::from_secs(10));
    let v4 = "0.0.0.0:8080";
    assert_eq!(ask_tcp(&t.remote, &format!("{HOST_IP}:8080")), REMOTE_IP);
    assert_eq!(
        t.counts("tcp", v4),
        (0, 1),
        "the remote client went through DNAT"
    );
    // Host processes: the hooks, before DNAT could see them.
    assert_eq!(ask_tcp(&t.host, &format!("{HOST_IP}:8080")), BRIDGE_IP);
    assert_eq!(ask_tcp(&t.host, "127.0.0.1:8080"), BRIDGE_IP);
    assert_eq!(
        t.counts("tcp", v4),
        (0, 1),
        "host clients used DNAT or the listener"
    );
    assert_eq!(t.socket_conns("tcp", v4), 2);
    // Hairpin: the peer container's socket is not the host's; the listener serves it.
    assert_eq!(ask_tcp(&t.peer, &format!("{BRIDGE_IP}:8080")), BRIDGE_IP);
    assert_eq!(t.counts("tcp", v4), (1, 1));
    assert_eq!(t.socket_conns("tcp", v4), 2);
}

/// A server in the container on port 81 that reads a PROXY protocol v1 line and answers
/// with it and the address it was really connected from.
fn proxy_header_whoami(ns: &Netns) {
    let listener = ns.run(|| TcpListener::bind("0.0.0.0:81").unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            let peer = conn.peer_addr().unwrap().ip();
            let mut reader = std::io::BufReader::new(conn);
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut reader, &mut line);
            let mut conn = reader.into_inner();
            let _ = conn.write_all(format!("{} via {peer}", line.trim_end()).as_bytes());
        }
    });
}

#[test]
fn a_mapping_with_a_proxy_header_stays_off_dnat_and_dockerds_dnat_is_named() {
    let test = "a_mapping_with_a_proxy_header_stays_off_dnat_and_dockerds_dnat_is_named";
    if !need_root(test) {
        return;
    }
    let t = Topo::new("natpp");
    proxy_header_whoami(&t.ctr);
    let config = t.dir.0.join("rproxy.toml");
    std::fs::write(
        &config,
        format!(
            "[[mapping]]\npublish = \"8080:{CTR}:81\"\nproxy_protocol = \"v1\"\n\n\
             [[proxy_protocol]]\nports = \"8081\"\nversion = \"v1\"\n"
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap().to_string();
    let d = t.daemon(&["--nat=on", "--config", &cfg]);
    // --nat would have DNATed the remote client (the container would see 10.70.2.2 and no
    // header); with the header, the listener serves it and tells the container who it is.
    let said = ask_tcp(&t.remote, &format!("{HOST_IP}:8080"));
    assert!(
        said.starts_with(&format!("PROXY TCP4 {REMOTE_IP} {HOST_IP} "))
            && said.ends_with(&format!(" 8080 via {BRIDGE_IP}")),
        "{said}"
    );
    assert_eq!(t.our_rules(), 0, "{}", t.ruleset());
    let ls = t.cli(&["ls"]);
    let row = ls
        .lines()
        .find(|l| l.contains("0.0.0.0:8080 "))
        .unwrap_or_else(|| panic!("{ls}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!((cells[10], cells[14]), ("userland", "v1"), "{row}");

    // dockerd's own DNAT for 8081 (iptables-nft, as dockerd writes it): its remote clients
    // would reach the container past the proxy, without a header; the daemon says so when
    // the shim hands the port over. Host clients still go through the proxy and get it.
    let host = &t.host.name;
    sh(&format!(
        "ip netns exec {host} iptables -t nat -N DOCKER && \
         ip netns exec {host} iptables -t nat -A DOCKER ! -i br0 -p tcp -m tcp --dport 8081 \
           -j DNAT --to-destination {CTR}:81 && \
         ip netns exec {host} iptables -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER"
    ));
    let mut shim = Spawn::new(&[
        "-proto",
        "tcp",
        "-host-ip",
        "0.0.0.0",
        "-host-port",
        "8081",
        "-container-ip",
        CTR,
        "-container-port",
        "81",
    ])
    .wrap(&["ip", "netns", "exec", &t.host.name])
    .env("RPROXY_SOCKET", &t.sock())
    .spawn();
    assert_eq!(shim.status(), b"0\n");
    d.wait_log(
        "dockerd's iptables rules DNAT this port",
        Duration::from_secs(5),
    );
    let said = ask_tcp(&t.host, "127.0.0.1:8081");
    assert!(
        said.starts_with("PROXY TCP4 127.0.0.1 127.0.0.1 ")
            && said.ends_with(&format!(" 8081 via {BRIDGE_IP}")),
        "{said}"
    );
    drop(shim);
}

/// A new daemon taking over (`--takeover`) installs its own rules once the old one has
/// deleted its table: remote clients are served all along (DNAT, then the listener for the
/// moment in between, then DNAT again), and one set of rules stands afterwards, the new
/// daemon's.
#[test]
fn a_takeover_hands_the_rules_to_the_new_daemon() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    use std::sync::{Arc, Mutex};
    if !need_root("a_takeover_hands_the_rules_to_the_new_daemon") {
        return;
    }
    let t = Topo::new("nattk");
    whoami_tcp(&t.ctr);
    let spec = format!("8080:{CTR}:80");
    let mut old = t.daemon(&["--nat", "-p", &spec]);
    assert_eq!(t.our_rules(), 2);
    assert_eq!(ask_tcp(&t.remote, &format!("{HOST_IP}:8080")), REMOTE_IP);

    // A remote client connecting throughout; what the container saw, and what failed.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let client = {
        let (stop, failed, seen) = (stop.clone(), failed.clone(), seen.clone());
        let ns = format!("/var/run/netns/{}", t.remote.name);
        std::thread::spawn(move || {
            let f = std::fs::File::open(ns).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let addr: SocketAddr = format!("{HOST_IP}:8080").parse().unwrap();
            while !stop.load(Relaxed) {
                let asked =
                    TcpStream::connect_timeout(&addr, Duration::from_secs(3)).and_then(|mut s| {
                        s.set_read_timeout(Some(Duration::from_secs(3)))?;
                        let mut who = String::new();
                        s.read_to_string(&mut who)?;
                        Ok(who)
                    });
                match asked {
                    Ok(who) if !who.is_empty() => seen.lock().unwrap().push(who),
                    _ => {
                        failed.fetch_add(1, Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let sock = t.sock();
    let new = Spawn::new(&[
        "daemon",
        "--control-socket",
        &sock,
        "--drain-timeout",
        "0",
        "--nat",
        "-p",
        &spec,
        "--takeover",
    ])
    .wrap(&["ip", "netns", "exec", &t.host.name])
    .no_status_pipe()
    .spawn();
    new.wait_log("everything is served here", Duration::from_secs(10));
    assert_eq!(old.wait_exit(Duration::from_secs(10)), Some(0));
    wait_until("the new daemon's rules", Duration::from_secs(5), || {
        t.cli(&["ls"]).contains("kernel")
    });
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Relaxed);
    client.join().unwrap();
    let seen = seen.lock().unwrap();
    let dnat = seen.iter().filter(|w| *w == REMOTE_IP).count();
    let listener = seen.iter().filter(|w| *w == BRIDGE_IP).count();
    println!(
        "nat takeover: {dnat} connections through DNAT, {listener} through the listener, {} failed",
        failed.load(Relaxed)
    );
    assert_eq!(failed.load(Relaxed), 0, "remote connections failed");
    assert_eq!(dnat + listener, seen.len(), "{seen:?}");
    assert_eq!(t.our_rules(), 2, "{}", t.ruleset());
    assert!(t.ruleset().contains("flags owner"));
    let ls = t.cli(&["ls"]);
    assert!(ls.contains(&new.child.id().to_string()), "{ls}");
    let (_, kernel) = t.counts("tcp", "0.0.0.0:8080");
    assert_eq!(ask_tcp(&t.remote, &format!("{HOST_IP}:8080")), REMOTE_IP);
    assert_eq!(t.counts("tcp", "0.0.0.0:8080").1, kernel + 1);
}
