//! Allow-lists in the kernel (`Nat::set_allow`): against real namespaces — a "host" that
//! publishes the ports, a "target" container on its bridge, and two clients, A and B, each on
//! a routed link of its own. A's network is on the lists, B's is not. Each port is reached
//! through kernel DNAT, rproxy's own (`Nat::install`) or a dockerd-like iptables rule
//! (legacy and nf_tables backends), and a plain listener in the host stands in for the
//! userland one (loopback and hairpin clients reach it).
//!
//! The table is held by a helper process (this test binary again, running the ignored test
//! `helper_holds_the_table` in the host namespace) that uses the library directly, so the
//! tests can SIGKILL it and see what it installed vanish.
mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{need_root, sh, wait_until, Netns};

const TARGET: &str = "10.71.1.2";
const TARGET6: &str = "fd71:1::2";
const BRIDGE: &str = "10.71.1.1";
const HOST_A: &str = "10.71.2.1";
const HOST_A6: &str = "fd71:2::1";
const HOST_B: &str = "10.71.3.1";
const HOST_B6: &str = "fd71:3::1";
const A: &str = "10.71.2.2";
const A6: &str = "fd71:2::2";
const B: &str = "10.71.3.2";
const B6: &str = "fd71:3::2";
/// A's networks: the list every published port gets.
const A_NETS: &str = "10.71.2.0/24,fd71:2::/64";

/// The four published ports: TCP 8080 → 80, UDP 5300 → 53, each in both families.
fn specs() -> [String; 4] {
    [
        format!("8080:{TARGET}:80/tcp"),
        format!("[::]:8080:[{TARGET6}]:80/tcp"),
        format!("5300:{TARGET}:53/udp"),
        format!("[::]:5300:[{TARGET6}]:53/udp"),
    ]
}

/// host: br0 10.71.1.1 (target 10.71.1.2), ua 10.71.2.1 (A 10.71.2.2), ub 10.71.3.1 (B
/// 10.71.3.2); IPv6 alongside in fd71:N::/64.
struct Topo {
    host: Netns,
    target: Netns,
    a: Netns,
    b: Netns,
}

impl Topo {
    fn new(tag: &str) -> Topo {
        let t = Topo {
            host: Netns::new(&format!("{tag}h")),
            target: Netns::new(&format!("{tag}t")),
            a: Netns::new(&format!("{tag}a")),
            b: Netns::new(&format!("{tag}b")),
        };
        let (h, tg) = (&t.host.name, &t.target.name);
        let mut script = format!(
            "ip -n {h} link add br0 type bridge && ip -n {h} link set br0 up && \
             ip -n {h} addr add {BRIDGE}/24 dev br0 && ip -n {h} addr add fd71:1::1/64 dev br0 nodad && \
             ip -n {h} link add vt type veth peer name eth0 netns {tg} && ip -n {h} link set vt master br0 up && \
             ip -n {tg} link set eth0 up && ip -n {tg} addr add {TARGET}/24 dev eth0 && \
             ip -n {tg} addr add {TARGET6}/64 dev eth0 nodad && \
             ip -n {tg} route add default via {BRIDGE} && ip -n {tg} -6 route add default via fd71:1::1 && \
             ip netns exec {h} sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1"
        );
        for (ns, n, link) in [(&t.a.name, 2, "ua"), (&t.b.name, 3, "ub")] {
            script.push_str(&format!(
                " && ip -n {h} link add {link} type veth peer name eth0 netns {ns} && \
                 ip -n {h} link set {link} up && ip -n {h} addr add 10.71.{n}.1/24 dev {link} && \
                 ip -n {h} addr add fd71:{n}::1/64 dev {link} nodad && \
                 ip -n {ns} link set eth0 up && ip -n {ns} addr add 10.71.{n}.2/24 dev eth0 && \
                 ip -n {ns} addr add fd71:{n}::2/64 dev eth0 nodad && \
                 ip -n {ns} route add default via 10.71.{n}.1 && ip -n {ns} -6 route add default via fd71:{n}::1"
            ));
        }
        sh(&script);
        whoami(&t.target, 80, 53, None);
        proxied_whoami(&t.target, 81);
        // The userland listener's stand-in: it answers "host".
        whoami(&t.host, 8080, 5300, Some("host"));
        t
    }

    fn nft(&self, args: &str) -> String {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("ip netns exec {} nft {args}", self.host.name))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// TCP on `tcp` and UDP on `udp` (both families) in `ns`, answering each client with its
/// address, or with `tag`.
fn whoami(ns: &Netns, tcp: u16, udp: u16, tag: Option<&'static str>) {
    let (listener, socket) = ns.run(move || {
        let any: SocketAddr = "[::]:0".parse().unwrap();
        let t = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
        t.set_only_v6(false).unwrap();
        t.set_reuse_address(true).unwrap();
        t.bind(&SocketAddr::new(any.ip(), tcp).into()).unwrap();
        t.listen(4096).unwrap();
        let u = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None).unwrap();
        u.set_only_v6(false).unwrap();
        u.bind(&SocketAddr::new(any.ip(), udp).into()).unwrap();
        (TcpListener::from(t), UdpSocket::from(u))
    });
    std::thread::spawn(move || {
        for mut conn in listener.incoming().map_while(Result::ok) {
            let peer = conn.peer_addr().unwrap().ip().to_canonical().to_string();
            let _ = conn.write_all(tag.map(str::to_string).unwrap_or(peer).as_bytes());
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = socket.recv_from(&mut buf) {
            let peer = from.ip().to_canonical().to_string();
            let _ = socket.send_to(tag.map(str::to_string).unwrap_or(peer).as_bytes(), from);
        }
    });
}

/// TCP on `port` in `ns` behind a PROXY protocol v1 sender: reads the header and answers
/// with the client it names (`-` when the line is not a PROXY header).
fn proxied_whoami(ns: &Netns, port: u16) {
    let listener = ns.run(move || TcpListener::bind(("0.0.0.0", port)).unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            let mut header = String::new();
            let mut reader = BufReader::new(&conn);
            let _ = reader.read_line(&mut header);
            // PROXY TCP4 <client> <server> <client port> <server port>
            let fields: Vec<&str> = header.split_whitespace().collect();
            let client = match fields.as_slice() {
                ["PROXY", _, client, _, _, _] => client,
                _ => "-",
            };
            let _ = (&conn).write_all(client.as_bytes());
        }
    });
}

/// What the server behind `addr` says to a TCP client in `ns`; None when the connection is
/// not made within `wait` (a dropped SYN is retransmitted after 1 s: a shorter wait sends one).
fn tcp_who(ns: &Netns, addr: &str, wait: Duration) -> Option<String> {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, wait).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut seen = String::new();
        s.read_to_string(&mut seen).ok()?;
        Some(seen)
    })
}

/// What answers `tries` datagrams from `ns` to `addr` (each waited for 300 ms), if anything.
fn udp_who(ns: &Netns, addr: &str, tries: usize) -> Option<String> {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.run(move || {
        let s = UdpSocket::bind(if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        })
        .unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..tries {
            s.send_to(b"who", addr).unwrap();
            if let Ok(n) = s.recv(&mut buf) {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        None
    })
}

const LONG: Duration = Duration::from_secs(3);
const ONE_SYN: Duration = Duration::from_millis(300);

/// `host:port` for an IPv4 or IPv6 host address.
fn at(host: &str, port: u16) -> String {
    match host.contains(':') {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    }
}

/// Every client of `ns` at `ip` reaches the target through the published ports on `host_ip`,
/// TCP and UDP, and the target sees it.
fn reaches(ns: &Netns, ip: &str, host_ip: &str) {
    assert_eq!(
        tcp_who(ns, &at(host_ip, 8080), LONG).as_deref(),
        Some(ip),
        "tcp from {ip}"
    );
    assert_eq!(
        udp_who(ns, &at(host_ip, 5300), 6).as_deref(),
        Some(ip),
        "udp from {ip}"
    );
}

/// The helper process holding the table, driven line by line.
struct Holder {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Holder {
    fn start(ns: &Netns) -> Holder {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(exe)
            .args([
                "--exact",
                "helper_holds_the_table",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("RPROXY_ALLOW_HELPER", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // The harness may have written "test … " on the same line first.
                if let Some((_, reply)) = line.split_once("@@") {
                    if tx.send(reply.to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        Holder {
            child,
            stdin,
            lines,
        }
    }

    /// Sends one command; its answer, or a panic with the helper's error.
    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        let reply = self
            .lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("helper: no answer to {command:.80}: {e}"));
        match reply.strip_prefix("ok") {
            Some(rest) => rest.trim().to_string(),
            None => panic!("helper: {command:.80}: {reply}"),
        }
    }

    fn allow(&mut self, spec: &str, list: &str) {
        self.ask(&format!("allow {spec} {list}"));
    }

    fn denied(&mut self) -> HashMap<String, u64> {
        self.counts("denied")
    }

    /// `denied` or `connections` (what rproxy's DNAT rules translated), by spec.
    fn counts(&mut self, which: &str) -> HashMap<String, u64> {
        let text = self.ask(which);
        text.split_whitespace()
            .filter_map(|kv| kv.rsplit_once('='))
            .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
            .collect()
    }

    fn kill(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Not a test: the helper process the tests start (see the module). Commands on stdin, one a
/// line, each answered on stdout by `@@ok …` or `@@err …`:
/// `install SPEC` (kernel NAT on), `allow SPEC LIST` (LIST: comma-separated networks, `none`
/// for the empty list, `-` for no filter), `denied`, `connections`.
#[test]
#[ignore = "the helper process of the other tests"]
fn helper_holds_the_table() {
    if std::env::var_os("RPROXY_ALLOW_HELPER").is_none() {
        return;
    }
    use rproxy::allow::AllowList;
    use rproxy::mapping::parse_publish;
    use rproxy::settings::options::{Mode, Options};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let nat = rproxy::nat::Nat::new(rproxy::nat::Nat::DAEMON_TABLE);
    let options = Options {
        nat: Mode::Require,
        ..Options::default()
    };
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let mapping = |spec: &str| parse_publish(spec, options.clone()).map(|m| m[0].clone());
        let reply: Result<String, String> = rt.block_on(async {
            match words.as_slice() {
                ["install", spec] => {
                    let path = nat.install(&mapping(spec)?, false).await?;
                    Ok(path.map(|p| p.label()).unwrap_or("-").to_string())
                }
                ["allow", spec, list] => {
                    let list = match *list {
                        "-" => None,
                        "none" => Some(AllowList::parse::<&str>(&[]).unwrap()),
                        l => Some(l.parse::<AllowList>().map_err(|e| e.to_string())?),
                    };
                    nat.set_allow(&mapping(spec)?, list.as_ref()).await?;
                    Ok(String::new())
                }
                ["denied"] => Ok(nat
                    .denied()
                    .await
                    .iter()
                    .map(|(k, v)| format!("{k}={v} "))
                    .collect()),
                ["connections"] => Ok(nat
                    .connections()
                    .await
                    .iter()
                    .map(|(k, v)| format!("{k}={v} "))
                    .collect()),
                _ => Err(format!("unknown command {line:?}")),
            }
        });
        match reply {
            Ok(text) => println!("@@ok {text}"),
            Err(e) => println!("@@err {e}"),
        }
    }
}

/// Through rproxy's own DNAT: the gap first (B gets in), then A alone, host processes always,
/// the container judged by its own address, counters, the listing, a change, removal, and
/// everything gone with the process on SIGKILL.
#[test]
fn allow_lists_hold_on_rproxys_own_dnat_and_die_with_the_process() {
    if !need_root("allow_lists_hold_on_rproxys_own_dnat_and_die_with_the_process") {
        return;
    }
    let t = Topo::new("alnat");
    let mut holder = Holder::start(&t.host);
    for spec in specs() {
        assert_eq!(holder.ask(&format!("install {spec}")), "kernel");
    }

    // The gap: without a list, B reaches the container (DNAT keeps its address).
    reaches(&t.b, B, HOST_B);
    reaches(&t.b, B6, HOST_B6);
    reaches(&t.a, A, HOST_A);

    for spec in specs() {
        holder.allow(&spec, A_NETS);
    }
    reaches(&t.a, A, HOST_A);
    reaches(&t.a, A6, HOST_A6);
    // B: three SYNs and three datagrams per port, each dropped (and counted once).
    for host in [HOST_B, HOST_B6] {
        for _ in 0..3 {
            assert_eq!(tcp_who(&t.b, &at(host, 8080), ONE_SYN), None, "tcp {host}");
        }
        assert_eq!(udp_who(&t.b, &at(host, 5300), 3), None, "udp {host}");
    }
    // The host's own processes, on loopback (the listener) and on a host address (rproxy's
    // output DNAT), always get through.
    assert_eq!(
        tcp_who(&t.host, "127.0.0.1:8080", LONG).as_deref(),
        Some("host")
    );
    assert_eq!(
        tcp_who(&t.host, "[::1]:8080", LONG).as_deref(),
        Some("host")
    );
    assert_eq!(
        udp_who(&t.host, "127.0.0.1:5300", 3).as_deref(),
        Some("host")
    );
    assert_eq!(
        tcp_who(&t.host, &at(HOST_B, 8080), LONG).as_deref(),
        Some(HOST_B)
    );
    // The container dialling a host address (hairpin: the listener's) is judged by its own.
    assert_eq!(tcp_who(&t.target, &at(BRIDGE, 8080), ONE_SYN), None);

    let [tcp4, tcp6, udp4, udp6] = specs();
    let want: HashMap<String, u64> = [(&tcp4, 4), (&tcp6, 3), (&udp4, 3), (&udp6, 3)]
        .into_iter()
        .map(|(s, n)| (spec_of(s), n))
        .collect();
    assert_eq!(holder.denied(), want);

    let listing = t.nft("list table inet rproxy");
    println!("{listing}");
    for needle in [
        "type filter hook prerouting priority mangle; policy accept;",
        "iif \"lo\" accept",
        "ct state != new accept",
        "meta nfproto . meta l4proto . th dport vmap @allow-local",
        "ipv4 . tcp . 8080 : jump allow-0",
        "flags interval",
        "elements = { 10.71.2.0/24 }",
        "elements = { fd71:2::/64 }",
        "fib daddr type local ip saddr != @allow-0 counter packets 4 ",
        "fib daddr type local ip6 saddr != @allow-1 counter packets 3 ",
    ] {
        assert!(listing.contains(needle), "no {needle:?} in\n{listing}");
    }

    // A list changes (a label on a restarted container): B now, not A.
    holder.allow(&tcp4, "10.71.3.0/24");
    assert_eq!(tcp_who(&t.b, &at(HOST_B, 8080), LONG).as_deref(), Some(B));
    assert_eq!(tcp_who(&t.a, &at(HOST_A, 8080), ONE_SYN), None);
    // The empty list: no one from outside.
    holder.allow(&tcp4, "none");
    assert_eq!(tcp_who(&t.b, &at(HOST_B, 8080), ONE_SYN), None);
    assert_eq!(holder.denied()[&spec_of(&tcp4)], 6);
    // No list: everyone, and the filter is gone from the table.
    holder.allow(&tcp4, "-");
    assert_eq!(tcp_who(&t.b, &at(HOST_B, 8080), LONG).as_deref(), Some(B));
    assert_eq!(
        udp_who(&t.b, &at(HOST_B, 5300), 1),
        None,
        "UDP keeps its list"
    );
    let listing = t.nft("list table inet rproxy");
    assert!(!listing.contains("chain allow-0 "), "{listing}");
    assert!(!listing.contains("set allow-0 "), "{listing}");
    assert!(!holder.denied().contains_key(&spec_of(&tcp4)));
    assert_eq!(tcp_who(&t.b, &at(HOST_B6, 8080), ONE_SYN), None);

    // A container restarted with a new address: for a moment two mappings share the port,
    // and the newest list is the one in force, whichever goes first.
    let a_only = || {
        assert_eq!(tcp_who(&t.a, &at(HOST_A, 8080), LONG).as_deref(), Some(A));
        assert_eq!(tcp_who(&t.b, &at(HOST_B, 8080), ONE_SYN), None);
    };
    let b_only = || {
        assert_eq!(tcp_who(&t.b, &at(HOST_B, 8080), LONG).as_deref(), Some(B));
        assert_eq!(tcp_who(&t.a, &at(HOST_A, 8080), ONE_SYN), None);
    };
    let renewed = "8080:10.71.1.3:80/tcp";
    holder.allow(&tcp4, A_NETS);
    a_only();
    holder.allow(renewed, "10.71.3.0/24");
    b_only();
    holder.allow(renewed, "-");
    a_only();
    holder.allow(renewed, "10.71.3.0/24");
    holder.allow(&tcp4, "-");
    b_only();
    holder.allow(renewed, "-");
    assert!(!t
        .nft("list table inet rproxy")
        .contains("ipv4 . tcp . 8080"));

    // SIGKILL: the kernel deletes the owner table, filters and all; B is back in (on the
    // listener's stand-in: rproxy's DNAT went too).
    holder.kill();
    wait_until("the owner table to go", Duration::from_secs(5), || {
        !t.nft("list tables").contains("rproxy")
    });
    assert_eq!(
        tcp_who(&t.b, &at(HOST_B6, 8080), LONG).as_deref(),
        Some("host")
    );
}

/// `Mapping::spec()` of a publish spec.
fn spec_of(publish: &str) -> String {
    rproxy::mapping::parse_publish(publish, Default::default()).unwrap()[0].spec()
}

/// dockerd's own DNAT, as its iptables backend writes it (with `iptables` being `binary`):
/// PREROUTING only, so host processes on a host address reach the host's listener through
/// loopback, where nothing judges them.
fn dockerd_rules(t: &Topo, binary: &str) {
    let h = &t.host.name;
    let mut script = Vec::new();
    for (ipt, target) in [
        (binary.to_string(), TARGET.to_string()),
        (
            binary.replace("iptables", "ip6tables"),
            format!("[{TARGET6}]"),
        ),
    ] {
        let ipt = format!("ip netns exec {h} {ipt} -t nat");
        script.push(format!("{ipt} -N DOCKER"));
        script.push(format!(
            "{ipt} -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER"
        ));
        for (proto, port, to) in [("tcp", 8080, 80), ("udp", 5300, 53)] {
            script.push(format!(
                "{ipt} -A DOCKER ! -i br0 -p {proto} -m {proto} --dport {port} \
                 -j DNAT --to-destination {target}:{to}"
            ));
        }
    }
    sh(&script.join(" && "));
}

fn dockerd_dnat_is_filtered(tag: &str, binary: &str) {
    let t = Topo::new(tag);
    dockerd_rules(&t, binary);
    // The gap: dockerd's DNAT lets B in, whatever INPUT would say.
    reaches(&t.b, B, HOST_B);
    reaches(&t.b, B6, HOST_B6);

    let mut holder = Holder::start(&t.host);
    for spec in specs() {
        holder.allow(&spec, A_NETS);
    }
    reaches(&t.a, A, HOST_A);
    reaches(&t.a, A6, HOST_A6);
    for host in [HOST_B, HOST_B6] {
        assert_eq!(tcp_who(&t.b, &at(host, 8080), ONE_SYN), None, "tcp {host}");
        assert_eq!(udp_who(&t.b, &at(host, 5300), 2), None, "udp {host}");
    }
    for host in ["127.0.0.1", "::1", HOST_B, HOST_A6] {
        assert_eq!(
            tcp_who(&t.host, &at(host, 8080), LONG).as_deref(),
            Some("host"),
            "host process to {host}"
        );
        assert_eq!(
            udp_who(&t.host, &at(host, 5300), 3).as_deref(),
            Some("host"),
            "host process to {host}"
        );
    }
    let [tcp4, tcp6, udp4, udp6] = specs();
    let denied = holder.denied();
    for (spec, n) in [(tcp4, 1), (tcp6, 1), (udp4, 2), (udp6, 2)] {
        assert_eq!(denied.get(&spec_of(&spec)), Some(&n), "{spec}: {denied:?}");
    }
    holder.kill();
    wait_until("the owner table to go", Duration::from_secs(5), || {
        !t.nft("list tables").contains("rproxy")
    });
    reaches(&t.b, B, HOST_B);
}

#[test]
fn allow_lists_hold_on_dockerds_dnat_iptables_nft() {
    if !need_root("allow_lists_hold_on_dockerds_dnat_iptables_nft") {
        return;
    }
    dockerd_dnat_is_filtered("alipn", "iptables-nft");
}

#[test]
fn allow_lists_hold_on_dockerds_dnat_iptables_legacy() {
    if !need_root("allow_lists_hold_on_dockerds_dnat_iptables_legacy") {
        return;
    }
    dockerd_dnat_is_filtered("alipl", "iptables-legacy");
}

/// 1,000-entry lists swapped back and forth while A and B connect as fast as they can: every
/// one of A's connections is made (each waited for less than a SYN's retransmission), none of
/// B's; the filter's counter holds B's SYNs exactly, so not one of A's was dropped, and the
/// DNAT rule's holds A's attempts exactly, so not one of B's got past the filter.
#[test]
fn a_list_swapped_under_load_never_lets_an_outsider_in_nor_refuses_an_insider() {
    if !need_root("a_list_swapped_under_load_never_lets_an_outsider_in_nor_refuses_an_insider") {
        return;
    }
    let t = Topo::new("alswap");
    let mut holder = Holder::start(&t.host);
    let [tcp4, ..] = specs();
    assert_eq!(holder.ask(&format!("install {tcp4}")), "kernel");
    // A's address among 999 others, different in each list; B in neither.
    let list = |salt: u32| {
        let mut nets: Vec<String> = (0..999u32)
            .map(|i| {
                let n = i * 2 + salt;
                format!("172.{}.{}.{}/32", 16 + n / 65536, (n / 256) % 256, n % 256)
            })
            .collect();
        nets.push(format!("{A}/32"));
        nets.join(",")
    };
    let lists = [list(0), list(1)];
    holder.allow(&tcp4, &lists[0]);

    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default()); // a ok, a failed, b in, b tried
    let client = |ns: &Netns, addr: String, wait: Duration, ok: usize, bad: usize| {
        let pause = Duration::from_micros(500);
        let (stop, counts) = (stop.clone(), counts.clone());
        let path = format!("/var/run/netns/{}", ns.name);
        std::thread::spawn(move || {
            let f = std::fs::File::open(path).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let addr: SocketAddr = addr.parse().unwrap();
            while !stop.load(Relaxed) {
                let made = TcpStream::connect_timeout(&addr, wait).is_ok();
                counts[if made { ok } else { bad }].fetch_add(1, Relaxed);
                // Paced, so the target's accept queue never overflows (a SYN it drops
                // would be retransmitted too late, and look like the filter's).
                std::thread::sleep(pause);
            }
        })
    };
    let threads = vec![
        client(&t.a, at(HOST_A, 8080), Duration::from_millis(900), 0, 1),
        client(&t.a, at(HOST_A, 8080), Duration::from_millis(900), 0, 1),
        // B: every attempt is one SYN (30 ms, well before the retransmission).
        client(&t.b, at(HOST_B, 8080), Duration::from_millis(30), 2, 3),
        client(&t.b, at(HOST_B, 8080), Duration::from_millis(30), 2, 3),
        client(&t.b, at(HOST_B, 8080), Duration::from_millis(30), 2, 3),
    ];
    let start = Instant::now();
    let mut swaps = 0;
    while start.elapsed() < Duration::from_secs(4) {
        swaps += 1;
        holder.allow(&tcp4, &lists[swaps % 2]);
    }
    stop.store(true, Relaxed);
    for th in threads {
        th.join().unwrap();
    }
    let [a_ok, a_failed, b_in, b_tried] = [0, 1, 2, 3].map(|i| counts[i].load(Relaxed));
    println!(
        "swap under load: {swaps} swaps of 1,000-entry lists; A {a_ok} connections ({a_failed} \
         failed), B {b_tried} attempts ({b_in} got in)"
    );
    assert!(
        a_ok > 1000 && b_tried > 100 && swaps > 50,
        "too little load"
    );
    assert_eq!((a_failed, b_in), (0, 0));
    assert_eq!(holder.denied()[&spec_of(&tcp4)], b_tried);
    assert_eq!(holder.counts("connections")[&spec_of(&tcp4)], a_ok);
}

/// The daemon end to end, in the "host" namespace: mappings of its config file with
/// allow-lists — one through rproxy's own DNAT, one served by its listener alone, one UDP,
/// and one with the PROXY protocol — let A in and not B, and the host's own processes
/// always; `ls --json` shows the lists and counts the refusals, the log tells of the kernel's;
/// SIGHUP swaps the lists whole; SIGKILL takes the filters away with the table.
#[test]
fn the_daemon_holds_each_mappings_list_on_every_path() {
    if !need_root("the_daemon_holds_each_mappings_list_on_every_path") {
        return;
    }
    let t = Topo::new("ald");
    let dir = common::Dir::new("allow-daemon");
    let config = dir.0.join("rproxy.toml");
    let write = |nets: &str| {
        let list = format!("[\"{nets}\"]");
        let text = format!(
            "[[mapping]]\npublish = \"9080:{TARGET}:80\"\nnat = \"on\"\nallow = {list}\n\
             [[mapping]]\npublish = \"9081:{TARGET}:80\"\nallow = {list}\n\
             [[mapping]]\npublish = \"9053:{TARGET}:53/udp\"\nallow = {list}\n\
             [[mapping]]\npublish = \"9082:{TARGET}:81\"\nproxy_protocol = \"v1\"\n\
             allow = {list}\n"
        );
        std::fs::write(&config, text).unwrap();
    };
    write("10.71.2.0/24");
    let sock = dir.sock();
    let mut daemon = common::Spawn::new(&[
        "daemon",
        "--control-socket",
        sock.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ])
    .wrap(&["ip", "netns", "exec", &t.host.name])
    .no_status_pipe()
    .spawn();
    daemon.wait_log("daemon ready", Duration::from_secs(10));

    // rproxy's DNAT keeps the client's address; the listener dials from the bridge.
    assert_eq!(tcp_who(&t.a, &at(HOST_A, 9080), LONG).as_deref(), Some(A));
    assert_eq!(
        tcp_who(&t.a, &at(HOST_A, 9081), LONG).as_deref(),
        Some(BRIDGE)
    );
    assert_eq!(udp_who(&t.a, &at(HOST_A, 9053), 6).as_deref(), Some(BRIDGE));
    // The PROXY protocol mapping: the header names A to the backend.
    assert_eq!(tcp_who(&t.a, &at(HOST_A, 9082), LONG).as_deref(), Some(A));
    for port in [9080, 9081, 9082] {
        for _ in 0..2 {
            assert_eq!(
                tcp_who(&t.b, &at(HOST_B, port), ONE_SYN),
                None,
                "B on {port}"
            );
        }
    }
    assert_eq!(udp_who(&t.b, &at(HOST_B, 9053), 2), None);
    // The host itself, on loopback and on a host address, always.
    assert_eq!(
        tcp_who(&t.host, "127.0.0.1:9081", LONG).as_deref(),
        Some(BRIDGE)
    );
    assert_eq!(
        tcp_who(&t.host, &at(HOST_B, 9081), LONG).as_deref(),
        Some(BRIDGE)
    );

    let rows = |dir: &common::Dir| -> Vec<serde_json::Value> {
        let (code, out, err) = common::cli(dir, &["ls", "--json"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    for r in rows(&dir) {
        assert_eq!(r["allow"], serde_json::json!(["10.71.2.0/24"]), "{r}");
        assert!(
            r["denied"].as_u64().unwrap() >= 2,
            "refusals not counted: {r}"
        );
    }
    let (_, table, _) = common::cli(&dir, &["ls"]);
    assert!(
        table.contains("ALLOW") && table.contains("10.71.2.0/24"),
        "{table}"
    );
    // Dropped ahead of any listener, yet told: a line per mapping now and then.
    let line = daemon.wait_log("dropped in the kernel", Duration::from_secs(15));
    assert!(
        line.contains("WARN") && line.contains("outside the allow-list (10.71.2.0/24)"),
        "{line}"
    );

    // SIGHUP with B's network instead: one change, B in, A out.
    write("10.71.3.0/24");
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    daemon.wait_log("reloaded", Duration::from_secs(10));
    assert_eq!(tcp_who(&t.b, &at(HOST_B, 9080), LONG).as_deref(), Some(B));
    assert_eq!(
        tcp_who(&t.b, &at(HOST_B, 9081), LONG).as_deref(),
        Some(BRIDGE)
    );
    assert_eq!(tcp_who(&t.a, &at(HOST_A, 9080), ONE_SYN), None);
    assert_eq!(udp_who(&t.a, &at(HOST_A, 9053), 2), None);

    daemon.signal(nix::sys::signal::Signal::SIGKILL);
    daemon.wait_exit(Duration::from_secs(5));
    wait_until("the table to go", Duration::from_secs(5), || {
        !t.nft("list tables").contains("inet rproxy")
    });
}

/// The listener's own check, alone (no kernel filter in front of it): a client outside the
/// list is reset at accept and its datagrams dropped before a flow is made, counted; a
/// client on the list is relayed, with a PROXY protocol header where the mapping sends one.
#[test]
fn the_listener_refuses_clients_outside_the_list_by_itself() {
    if !need_root("the_listener_refuses_clients_outside_the_list_by_itself") {
        return;
    }
    use rproxy::allow::AllowList;
    use rproxy::stats::Stats;
    use rproxy::stop::Stop;
    let t = Topo::new("all");
    let allow = Some(Arc::new(AllowList::parse(&["10.71.2.0/24"]).unwrap()));
    let stats = (Arc::new(Stats::default()), Arc::new(Stats::default()));
    let proxied_stats = Arc::new(Stats::default());
    let (handle, stop) = Stop::new();
    let (tcp_config, udp_config) = (
        rproxy::tcp::Config {
            connect_timeout: Duration::from_secs(3),
            splice: true,
            proxy_protocol: rproxy::proxy_protocol::Version::Off,
            allow: allow.clone(),
        },
        rproxy::udp::Config {
            idle_timeout: Duration::from_secs(30),
            max_flows: 100,
            allow,
        },
    );
    let ns = format!("/var/run/netns/{}", t.host.name);
    let (tcp_stats, udp_stats) = stats.clone();
    let proxied = (
        rproxy::tcp::Config {
            proxy_protocol: rproxy::proxy_protocol::Version::V1,
            ..tcp_config.clone()
        },
        proxied_stats.clone(),
    );
    let served = std::thread::spawn(move || {
        let file = std::fs::File::open(ns).unwrap();
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let tcp = tokio::net::TcpListener::bind("0.0.0.0:9180").await.unwrap();
            let udp = tokio::net::UdpSocket::bind("0.0.0.0:9153").await.unwrap();
            let with_header = tokio::net::TcpListener::bind("0.0.0.0:9182").await.unwrap();
            let target = |port: u16| SocketAddr::new(TARGET.parse().unwrap(), port);
            let (config, stats) = proxied;
            tokio::join!(
                rproxy::tcp::serve(tcp, target(80), tcp_config, tcp_stats, stop.clone()),
                rproxy::tcp::serve(with_header, target(81), config, stats, stop.clone()),
                rproxy::udp::serve(udp, target(53), udp_config, udp_stats, stop),
            );
        });
    });
    wait_until("the listener", Duration::from_secs(5), || {
        tcp_who(&t.a, &at(HOST_A, 9180), LONG).as_deref() == Some(BRIDGE)
    });
    // B's connection is made (no kernel filter) and reset at once: nothing relayed.
    let b = tcp_who(&t.b, &at(HOST_B, 9180), LONG);
    assert!(
        b.is_none() || b.as_deref() == Some(""),
        "B was relayed: {b:?}"
    );
    assert_eq!(udp_who(&t.a, &at(HOST_A, 9153), 6).as_deref(), Some(BRIDGE));
    assert_eq!(udp_who(&t.b, &at(HOST_B, 9153), 3), None);
    // With the PROXY protocol: A's header reaches the backend; B is reset before any header.
    assert_eq!(tcp_who(&t.a, &at(HOST_A, 9182), LONG).as_deref(), Some(A));
    let b = tcp_who(&t.b, &at(HOST_B, 9182), LONG);
    assert!(
        b.is_none() || b.as_deref() == Some(""),
        "B got a header through: {b:?}"
    );
    assert_eq!(proxied_stats.denied.load(Relaxed), 1);
    assert_eq!(proxied_stats.total.load(Relaxed), 1);
    let denied = |s: &Stats| s.denied.load(Relaxed);
    assert_eq!(denied(&stats.0), 1, "TCP refusals");
    assert_eq!(denied(&stats.1), 3, "UDP refusals");
    assert_eq!(
        stats.0.total.load(Relaxed),
        1,
        "only A's connection was relayed"
    );
    handle.stop(Duration::ZERO);
    served.join().unwrap();
}

/// dockerd's per-port processes serving alone (no daemon), with `RPROXY_ALLOW` in dockerd's
/// environment: each puts its own filter in the kernel (a table of its own, as it would
/// have to hold on dockerd's DNAT too), so A is relayed and B dropped before the listener,
/// TCP and UDP; the host's own processes get in; each table goes with its process.
#[test]
fn docker_mode_processes_alone_hold_rproxy_allow() {
    if !need_root("docker_mode_processes_alone_hold_rproxy_allow") {
        return;
    }
    let t = Topo::new("alx");
    let target = |port: u16| SocketAddr::new(TARGET.parse().unwrap(), port);
    let start = |proto: &str, port: u16, to: u16| {
        common::Spawn::forward_at(proto, "0.0.0.0", port, target(to))
            .wrap(&["ip", "netns", "exec", &t.host.name])
            .env("RPROXY_ALLOW", "10.71.2.0/24")
            .spawn()
            .ready()
    };
    let (mut tcp, mut udp) = (start("tcp", 9380, 80), start("udp", 9353, 53));
    let tables = t.nft("list tables");
    assert_eq!(tables.matches("table inet rproxy-").count(), 2, "{tables}");
    assert_eq!(
        tcp_who(&t.a, &at(HOST_A, 9380), LONG).as_deref(),
        Some(BRIDGE)
    );
    assert_eq!(udp_who(&t.a, &at(HOST_A, 9353), 6).as_deref(), Some(BRIDGE));
    assert_eq!(tcp_who(&t.b, &at(HOST_B, 9380), ONE_SYN), None);
    assert_eq!(udp_who(&t.b, &at(HOST_B, 9353), 3), None);
    assert_eq!(
        tcp_who(&t.host, &at(HOST_B, 9380), LONG).as_deref(),
        Some(BRIDGE),
        "the host's own process"
    );
    for p in [&mut tcp, &mut udp] {
        p.signal(nix::sys::signal::Signal::SIGTERM);
        p.wait_exit(Duration::from_secs(5));
    }
    wait_until("the tables to go", Duration::from_secs(5), || {
        !t.nft("list tables").contains("inet rproxy")
    });
}
