//! End to end with a real dockerd (root only): dockerd is started with
//! `--userland-proxy-path=<rproxy>` and every published port must then be served by rproxy
//! processes, exactly as dockerd would use docker-proxy (docs/docker-proxy-contract.md,
//! sections 1-5, 8 and 9).
//!
//! Everything runs against a private containerd and dockerd (own roots, sockets and config file)
//! and an image imported from a tarball (no registry is needed): /bin/busybox from
//! busybox-static with applet symlinks, /www/index.html, and /udpecho (tests/support/udp_echo.rs,
//! compiled here with rustc, because busybox's nc has no UDP mode).
//!
//! Scenarios, one function each (named for what a user of dockerd sees) and called in sequence
//! by a test, with what they share passed in and out: (a) TCP through 127.0.0.1, [::1] (the
//! `::` proxy) and the bridge gateway; (b) the proxies are rproxy processes with the right flags
//! and no docker-proxy runs; with RPROXY_NAT=on they leave IPv4 NAT to dockerd's iptables rules;
//! (d) hairpin from another container through the gateway address; (c) UDP echo including a
//! 60,000-byte datagram; (e) `docker stop` ends the proxies and frees the ports; (f) a host port
//! that is already taken makes `docker run` fail with rproxy's reason; (h) with an `rproxy
//! daemon` listening on dockerd's RPROXY_SOCKET, a published 10-port range plus a UDP port are
//! handed over: the daemon serves them, dockerd's processes are one-thread shims, and
//! `docker rm -f` removes every mapping; (g) daemon shutdown with a running container leaves no
//! rproxy behind. A second test, with dockerd --iptables=false: (i) rproxy installs and removes
//! DNAT rules of its own.
//!
//! Isolation from an rproxy daemon running on this machine: dockerd's environment always carries
//! RPROXY_SOCKET=<work dir>/rproxy.sock. Nothing listens there during (a)-(f), so every proxy
//! serves its port itself; (h) starts our own daemon on exactly that path (shims look for it at
//! each spawn) and stops it by PID afterwards.
//!
//! There are two #[test]s, one per dockerd configuration, each with a harness (containerd and
//! dockerd) of its own; starting dockerd is expensive, so the scenarios of a configuration share
//! one. Two dockerds would fight over docker0 and the DOCKER chains, so a test holds an exclusive
//! flock on /run/lock/rproxy-dockerd-test.lock (MACHINE_LOCK) from before it looks for another
//! dockerd until its cleanup is done: the two tests, and runs from other checkouts of this
//! repository on the same machine, wait for each other (up to 10 minutes) instead of fighting.
//! A test skips (and passes) when not root or when dockerd, containerd, docker, iptables, tar or
//! a static busybox is missing, or when another dockerd (not one of these tests') is running.
//!
//! Host state: dockerd enables IPv4/IPv6 forwarding and sets the FORWARD policy to DROP; both are
//! put back as found. dockerd's iptables chains and the docker0 bridge stay (as after any
//! dockerd run; the next run reuses them). No DOCKER-USER rule is needed: proxied traffic,
//! hairpin included, never crosses FORWARD. `RPROXY_KEEP_DOCKERD_DIR=1` keeps the work directory
//! with dockerd.log, containerd.log, rproxy.log and daemon.log.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const IMAGE: &str = "rproxy-dockerd-test:latest";
/// Busybox applets the scenarios use (plus a few for debugging by hand).
const APPLETS: &[&str] = &[
    "sh", "httpd", "nc", "sleep", "cat", "echo", "ls", "mkdir", "printf", "ps", "ip", "env",
    "true", "wget", "hostname", "id", "kill",
];
/// Fixed test ports are searched from here (below the ephemeral range, see the brief).
const PORT_BASE: u16 = 20080;
const PORT_LIMIT: u16 = 20980;
/// No docker CLI call may take longer than this.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// Held (flock, exclusive) from before the check for another dockerd until the harness is
/// cleaned up: the other test of this file, and these tests run from other checkouts of this
/// repository on this machine, may run at the same time, and two dockerds fight over docker0 and
/// the DOCKER chains.
const MACHINE_LOCK: &str = "/run/lock/rproxy-dockerd-test.lock";
/// How long a test waits for that lock (a whole run of this file takes about 6 minutes here,
/// the 500-port range 1.5 of them; runs from other checkouts and benchmarks may hold it too).
const LOCK_PATIENCE: Duration = Duration::from_secs(1800);

#[test]
fn real_dockerd_uses_rproxy_for_published_ports() {
    let Some(tools) = preflight() else { return };
    let mut h = Harness::start(tools, &[]);

    h.build_image();
    h.step("image built");

    // Four distinct free ports: P1 (127.0.0.1 only), P2 (all addresses), P3 (UDP), P4 (taken).
    let ports = free_ports(4, h.ipv6);
    let (p1, p2, p3, p4) = (ports[0], ports[1], ports[2], ports[3]);
    h.ports = ports.clone();
    h.step(&format!("ports: P1={p1} P2={p2} P3={p3} P4={p4}"));

    // Every proxy serves its port itself: nothing listens on dockerd's RPROXY_SOCKET yet.
    let web = loopback_and_gateway_clients_reach_the_container(&h, "rproxy-test-web", p1, p2);
    the_proxies_are_rproxy_with_the_contracts_flags(&h, &web);
    rproxy_leaves_ipv4_nat_to_dockerds_iptables_rules(&h, &web);
    another_container_reaches_the_port_through_the_gateway(&h, &web);
    let udp = udp_datagrams_are_echoed_through_the_proxy(&h, "rproxy-test-udp", p3);
    docker_stop_ends_the_proxies_and_frees_the_ports(&h, web);
    a_taken_host_port_fails_docker_run_with_the_reason(&h, "rproxy-test-taken", p4);
    with_no_daemon_every_proxy_serves_its_port_itself(&h);

    // From here on our `rproxy daemon` listens on dockerd's RPROXY_SOCKET. Shims look for it at
    // each spawn, so no dockerd restart is needed.
    let range = h.reserve_ports(10);
    let pu = h.reserve_ports(1)[0];
    let pl = h.reserve_ports(2);
    h.step(&format!(
        "daemon phase ports: TCP {}-{}, UDP {pu}",
        range[0], range[9]
    ));
    // With --docker-ports too: under a dockerd whose proxy is rproxy, the shims'
    // registrations win and everything below holds as without it. (Its default of socket
    // hooks on is off here: the scenarios below count the listeners' connections; the test
    // with the hooks runs --docker-ports too.)
    let engine = format!("--docker-host=unix://{}", h.sock.display());
    h.start_rproxy_daemon_with(&["--docker-ports", "--socket-lb=off", &engine]);
    let handed =
        the_daemon_lists_every_mapping_the_shims_hand_over(&h, "rproxy-test-daemon", range, pu);
    the_daemon_carries_the_traffic_of_handed_over_ports(&h, &handed);
    labels_hold_on_ports_the_shims_hand_over(&h, pl[0], pl[1]);
    dockerds_processes_for_handed_over_ports_are_one_thread_shims(&h, &handed, &udp);
    dockerds_ports_go_through_a_takeover_and_a_restart(&mut h, &handed);
    docker_rm_f_drops_every_handed_over_mapping(&h, handed);
    the_daemon_exits_0_on_sigterm_with_nothing_to_drain(&mut h);

    dockerd_shutdown_with_a_running_container_leaves_no_rproxy(&mut h, udp);
}

/// A dockerd configuration of its own, so a harness of its own; the machine-wide lock taken in
/// preflight runs it before or after the test above, never beside it.
#[test]
fn dockerd_without_iptables_leaves_nat_to_rproxy() {
    let Some(tools) = preflight() else { return };
    let mut h = Harness::start(tools, &["--iptables=false"]);

    h.build_image();
    h.step("image built");

    let pn = h.reserve_ports(1)[0];
    rproxy_installs_and_removes_its_own_dnat_rules(&h, "rproxy-test-natweb", pn);
    let graceful = h.stop_daemons();
    assert!(
        graceful,
        "dockerd did not shut down within 20 s\n{}",
        h.diag()
    );
}

/// dockerd's ports handed to a daemon with the socket hooks: host clients reach the
/// containers with no connection through any listener; a harness of its own (the daemon
/// runs from the start).
#[test]
fn dockerd_ports_with_the_socket_hooks_skip_the_proxies() {
    let Some(tools) = preflight() else { return };
    let mut h = Harness::start(tools, &[]);
    h.build_image();
    h.step("image built");
    let ports = h.reserve_ports(4);
    let engine = format!("--docker-host=unix://{}", h.sock.display());
    // --docker-ports changes nothing here: the shims' registrations win.
    h.start_rproxy_daemon_with(&["--socket-lb=require", "--docker-ports", &engine]);
    host_clients_reach_the_container_through_the_socket_hooks(
        &h,
        "rproxy-test-sockweb",
        &ports[..2],
    );
    hairpin_is_direct_only_on_the_targets_network_with_icc(&h, ports[2], ports[3]);
    the_shims_serve_on_when_the_daemon_is_killed(&mut h, "rproxy-test-sockweb2", ports[1]);
    let graceful = h.stop_daemons();
    assert!(
        graceful,
        "dockerd did not shut down within 20 s\n{}",
        h.diag()
    );
}

/// dockerd without a userland proxy (`--userland-proxy=false`, IPv6 and ip6tables on) and
/// the daemon following its API (`--docker-ports`): first what dockerd alone leaves out
/// ([::1], 6→4), then every host client served through the socket hooks with no listener
/// and no process per port, remote clients through dockerd's DNAT (and our listener for an
/// IPv4-only container's IPv6 clients), hairpin, UDP, and the daemon keeping up with
/// containers, dockerd and itself coming and going; last a 500-port range.
#[test]
fn dockerd_without_a_userland_proxy_is_served_by_the_daemon() {
    let Some(tools) = preflight() else { return };
    let mut h = Harness::start(
        tools,
        &["--userland-proxy=false", "--experimental", "--ip6tables"],
    );
    if !h.ipv6 {
        common::skip(
            "dockerd_without_a_userland_proxy_is_served_by_the_daemon",
            "no IPv6 here: the gap it closes is IPv6's",
        );
        return;
    }
    h.build_image();
    h.step("image built");
    let ports = h.reserve_ports(9);
    let set = ProxyOff::run(&h, &ports);
    dockerd_alone_leaves_ipv6_loopback_and_6to4_unserved(&h, &set);
    let engine = format!("--docker-host=unix://{}", h.sock.display());
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, ports[5]));
    let metrics_flag = format!("--metrics-addr={metrics}");
    h.start_rproxy_daemon_with(&["--docker-ports", "--socket-lb=on", &engine, &metrics_flag]);
    the_daemon_serves_host_clients_with_no_listener_and_no_process(&h, &set);
    the_metrics_count_dockerds_ports_like_any_mapping(&h, &set, metrics);
    remote_clients_reach_dockerds_ports_and_the_ipv4_only_containers_ipv6(&h, &set);
    hairpin_follows_icc_without_a_userland_proxy(&h, ports[3], ports[4]);
    labels_say_who_may_reach_a_port_through_dockerds_dnat(&h, ports[6], ports[7], ports[8]);
    hairpin_is_judged_by_the_containers_own_address(&h, ports[6]);
    docker_allow_closes_unlabelled_ports_to_remote_clients(&mut h, &set);
    the_daemon_follows_containers_dockerd_and_itself(&mut h, &set);
    a_500_port_range_costs_no_process(&h);
    the_ports_are_dockerds_alone_after_the_daemons_sigkill(&mut h, &set);
    let graceful = h.stop_daemons();
    assert!(
        graceful,
        "dockerd did not shut down within 20 s\n{}",
        h.diag()
    );
}

/// The containers of the proxy-off test: `web` (IPv4 and IPv6, on the default bridge) with
/// TCP `p_web`, `echo` (UDP `p_udp` to udpecho), and `web4` on an IPv4-only network with
/// TCP `p_v4`.
#[derive(Clone, Copy)]
struct ProxyOff {
    p_web: u16,
    p_udp: u16,
    p_v4: u16,
    web: ContainerNet,
    web4: ContainerNet,
}

impl ProxyOff {
    const WEB: &'static str = "rproxy-test-pw";
    const ECHO: &'static str = "rproxy-test-pecho";
    const WEB4: &'static str = "rproxy-test-pw4";
    const V4NET: &'static str = "rproxy-test-v4only";

    fn run(h: &Harness, ports: &[u16]) -> ProxyOff {
        let (p_web, p_udp, p_v4) = (ports[0], ports[1], ports[2]);
        h.docker_ok(&web_run(Self::WEB, &[&format!("{p_web}:80")]));
        h.docker_ok(&[
            "run",
            "-d",
            "--name",
            Self::ECHO,
            "--stop-timeout",
            "1",
            "-p",
            &format!("{p_udp}:7/udp"),
            IMAGE,
            "/udpecho",
            "7",
        ]);
        h.docker_ok(&["network", "create", Self::V4NET]);
        let mut v4 = web_run(Self::WEB4, &[]);
        let publish = format!("{p_v4}:80");
        v4.splice(4..4, ["--network", Self::V4NET, "-p", &publish]);
        h.docker_ok(&v4);
        let set = ProxyOff {
            p_web,
            p_udp,
            p_v4,
            web: h.container_net(Self::WEB),
            web4: h.container_net(Self::WEB4),
        };
        assert!(set.web.ipv6.is_some(), "{:?}", set.web);
        assert!(set.web4.ipv6.is_none(), "{:?}", set.web4);
        set
    }

    /// The same containers, their addresses read again (after they restarted).
    fn reread(&self, h: &Harness) -> ProxyOff {
        ProxyOff {
            web: h.container_net(Self::WEB),
            web4: h.container_net(Self::WEB4),
            ..*self
        }
    }

    /// The rows `ls` should show for these containers: (proto, listen, target, container).
    fn rows(&self) -> BTreeSet<(String, String, String, String)> {
        let web6 = self.web.ipv6.expect("IPv6");
        let row = |proto: &str, listen: String, target: String, name: &str| {
            (proto.to_string(), listen, target, name.to_string())
        };
        [
            row(
                "tcp",
                format!("0.0.0.0:{}", self.p_web),
                format!("{}:80", self.web.ip),
                Self::WEB,
            ),
            row(
                "tcp",
                format!("[::]:{}", self.p_web),
                format!("[{web6}]:80"),
                Self::WEB,
            ),
            row(
                "tcp",
                format!("0.0.0.0:{}", self.p_v4),
                format!("{}:80", self.web4.ip),
                Self::WEB4,
            ),
            // dockerd lists no IPv6 address for the IPv4-only container: the daemon adds it.
            row(
                "tcp",
                format!("[::]:{}", self.p_v4),
                format!("{}:80", self.web4.ip),
                Self::WEB4,
            ),
        ]
        .into_iter()
        .chain(self.echo_rows())
        .collect()
    }

    fn echo_rows(&self) -> Vec<(String, String, String, String)> {
        let echo = |h: &str| format!("{h}:{}", self.p_udp);
        vec![
            (
                "udp".into(),
                echo("0.0.0.0"),
                String::new(),
                Self::ECHO.into(),
            ),
            ("udp".into(), echo("[::]"), String::new(), Self::ECHO.into()),
        ]
    }
}

/// `ls`'s rows of origin `docker`, as (proto, listen, target, container); UDP targets
/// blanked (the echo container's address is not needed).
fn docker_rows(h: &Harness) -> BTreeSet<(String, String, String, String)> {
    h.rproxy_ls()
        .into_iter()
        .filter(|r| r.origin == "docker")
        .map(|r| {
            let target = if r.proto == "udp" {
                String::new()
            } else {
                r.target
            };
            (r.proto, r.listen, target, r.container)
        })
        .collect()
}

/// Waits until the daemon serves exactly `want` (as [`docker_rows`]).
fn wait_docker_rows(h: &Harness, want: &BTreeSet<(String, String, String, String)>, what: &str) {
    let got = poll(Duration::from_secs(10), || {
        let got = docker_rows(h);
        (got == *want).then_some(()).ok_or(got)
    });
    if let Err(got) = got {
        panic!("{what}: ls shows {got:#?}, not {want:#?}\n{}", h.diag());
    }
}

/// Without the daemon, dockerd alone: 127.0.0.1 answers (DNAT and route_localnet), [::1] does
/// not (dockerd binds `[::]:PORT` to reserve it and never accepts), nor [::1] of the IPv4-only
/// container; no process serves any port. The gap the daemon closes.
fn dockerd_alone_leaves_ipv6_loopback_and_6to4_unserved(h: &Harness, set: &ProxyOff) {
    let v4 = |p| SocketAddr::from((Ipv4Addr::LOCALHOST, p));
    let v6 = |p| SocketAddr::from((Ipv6Addr::LOCALHOST, p));
    h.get_pages(&[v4(set.p_web), v4(set.p_v4)], " (dockerd alone)");
    for addr in [v6(set.p_web), v6(set.p_v4)] {
        let got = http_get(addr, Duration::from_secs(1));
        assert!(
            got.is_err(),
            "dockerd alone served http://{addr}/ ({got:?}): the gap this test documents is gone"
        );
        h.step(&format!(
            "dockerd alone: http://{addr}/ unanswered ({got:?})"
        ));
    }
    a_host_firewall_does_not_keep_a_client_off_dockerds_ports(h, set.p_web);
    let ports = [set.p_web, set.p_udp, set.p_v4];
    assert!(
        proxy_processes()
            .iter()
            .all(|p| !ports.iter().any(|q| p.host_port == q.to_string())),
        "a userland proxy runs: {:#?}",
        proxy_processes()
    );
}

/// The gap allow-lists close: a client the host firewall drops in INPUT (as ufw or firewalld
/// would) cannot reach a service of the host, yet reaches a published port over IPv4 and
/// IPv6, because dockerd's DNAT in PREROUTING sends its packets to FORWARD, past INPUT.
fn a_host_firewall_does_not_keep_a_client_off_dockerds_ports(h: &Harness, port: u16) {
    let outsider = RemoteLink::new("pgap", 80);
    let service = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    let service = SocketAddr::new(outsider.host4, service.local_addr().unwrap().port());
    // ICMPv6 stays open, as ufw and firewalld keep it: without neighbour discovery the
    // client could not reach the host at all.
    let firewall = |op: &str| {
        common::sh(&format!(
            "iptables -w {op} INPUT -s 10.250.80.0/24 -j DROP && \
             ip6tables -w {op} INPUT -s fd7e:250:80::/64 ! -p ipv6-icmp -j DROP"
        ))
    };
    firewall("-I");
    let host_service = outsider.ns.run(move || {
        TcpStream::connect_timeout(&service, Duration::from_secs(2)).map_err(|e| e.kind())
    });
    let published: Vec<bool> = [outsider.host4, outsider.host6]
        .map(|host| outsider.gets(h, SocketAddr::new(host, port), Duration::from_secs(10)))
        .to_vec();
    firewall("-D");
    assert!(
        host_service.is_err(),
        "the firewall let the client reach {service}"
    );
    assert_eq!(
        published,
        [true, true],
        "dockerd alone kept the firewalled client off port {port}: the gap this documents is gone"
    );
    h.step(&format!(
        "dockerd alone: a client dropped in INPUT reaches port {port} anyway (IPv4 and IPv6)"
    ));
}

/// With the daemon: `ls` lists every published port (and `[::]` for the IPv4-only container)
/// with origin docker and the container's name; 127.0.0.1, [::1] and the bridge's IPv4 and
/// IPv6 addresses all get the page with no connection through a listener (the hooks count
/// them); UDP from unbound sockets to 127.0.0.1 and [::1] echoes; no process runs with
/// `-host-port` in its argv.
fn the_daemon_serves_host_clients_with_no_listener_and_no_process(h: &Harness, set: &ProxyOff) {
    wait_docker_rows(h, &set.rows(), "the daemon read dockerd's containers");
    let rows = h.rproxy_ls();
    for r in rows.iter().filter(|r| r.origin == "docker") {
        assert_eq!(r.socket, "socket", "{r:?}\n{}", h.diag());
    }
    let gw6 = set.web.ipv6_gateway.expect("an IPv6 gateway");
    let mut targets = Vec::new();
    for port in [set.p_web, set.p_v4] {
        targets.extend([
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
            SocketAddr::new(set.web.gateway, port),
            SocketAddr::new(gw6, port),
        ]);
    }
    h.get_pages(&targets, " (socket hooks, no userland proxy)");
    let rows = h.rproxy_ls();
    let tcp: Vec<&LsRow> = rows
        .iter()
        .filter(|r| r.origin == "docker" && r.proto == "tcp")
        .collect();
    for r in &tcp {
        assert_eq!(r.total, 0, "through a listener: {r:?}\n{}", h.diag());
    }
    let straight: u64 = tcp.iter().map(|r| r.socket_conns).sum();
    assert!(
        straight >= targets.len() as u64,
        "the hooks counted {straight} of {} connections: {tcp:#?}",
        targets.len()
    );
    h.step(&format!(
        "{straight} host connections went straight to the containers"
    ));
    for addr in [
        SocketAddr::from((Ipv4Addr::LOCALHOST, set.p_udp)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, set.p_udp)),
    ] {
        unbound_udp_echo(addr, h);
        h.step(&format!(
            "UDP echo via {addr} (an unbound socket, the hooks)"
        ));
    }
    let ports = [set.p_web, set.p_udp, set.p_v4];
    let proxies: Vec<ProxyProc> = proxy_processes()
        .into_iter()
        .filter(|p| ports.iter().any(|q| p.host_port == q.to_string()))
        .collect();
    assert!(proxies.is_empty(), "processes per port: {proxies:#?}");
}

/// The daemon's metrics have series for dockerd's ports, labelled by their addresses like any
/// mapping's, with the connections the hooks sent straight to the container.
fn the_metrics_count_dockerds_ports_like_any_mapping(h: &Harness, set: &ProxyOff, at: SocketAddr) {
    let mut s = TcpStream::connect_timeout(&at, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("metrics at {at}: {e}\n{}", h.diag()));
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let series = format!(
        "rproxy_socket_lb_connections_total{{proto=\"tcp\",frontend=\"0.0.0.0:{}\",backend=\"{}:80\"}}",
        set.p_web, set.web.ip
    );
    let count: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"));
    assert!(count >= 2, "{series} {count}");
    h.step(&format!("metrics: {series} {count}"));
}

/// A UDP round trip from an unbound socket (the kernel picks the source, as most clients
/// let it) connected to `addr`.
fn unbound_udp_echo(addr: SocketAddr, h: &Harness) {
    let any: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(any).unwrap();
    sock.connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 2048];
    let echoed = poll(Duration::from_secs(20), || {
        sock.send(b"rproxy unbound").map_err(|e| e.to_string())?;
        let n = sock.recv(&mut buf).map_err(|e| e.to_string())?;
        (&buf[..n] == b"rproxy unbound")
            .then_some(())
            .ok_or_else(|| format!("echo {:?}", &buf[..n]))
    });
    if let Err(e) = echoed {
        panic!("no UDP echo via {addr}: {e}\n{}", h.diag());
    }
    // Replies read as coming from the address dialled (the hooks restore it).
    assert_eq!(sock.peer_addr().unwrap(), addr);
}

/// A client on a link of its own into the host (a namespace routed through a veth pair):
/// dockerd's DNAT carries it to the dual-stack container over IPv4 and IPv6 (the daemon adds
/// nothing there), and to the IPv4-only container over IPv6 the daemon's own `[::]` listener
/// carries it (6→4), counted in `ls`.
fn remote_clients_reach_dockerds_ports_and_the_ipv4_only_containers_ipv6(
    h: &Harness,
    set: &ProxyOff,
) {
    let link = RemoteLink::new("pdn", 77);
    let v4_row = |h: &Harness| {
        let listen = format!("[::]:{}", set.p_v4);
        h.rproxy_ls()
            .into_iter()
            .find(|r| r.listen == listen)
            .unwrap_or_else(|| panic!("{listen} not served\n{}", h.diag()))
    };
    let before = v4_row(h);
    for (addr, via) in [
        (SocketAddr::new(link.host4, set.p_web), "dockerd's DNAT"),
        (SocketAddr::new(link.host6, set.p_web), "dockerd's DNAT"),
        (
            SocketAddr::new(link.host6, set.p_v4),
            "the daemon's listener, 6→4",
        ),
    ] {
        let page = h.page.clone();
        let got = link.ns.run(move || http_get(addr, Duration::from_secs(10)));
        assert_eq!(
            got.as_ref(),
            Ok(&page),
            "remote http://{addr}/\n{}",
            h.diag()
        );
        h.step(&format!("remote client: http://{addr}/ ok ({via})"));
    }
    let after = v4_row(h);
    assert_eq!(after.total, before.total + 1, "{after:?}\n{}", h.diag());
    assert_eq!(after.pid, h.rproxy_daemon_pid().unwrap() as u32);
}

/// A namespace with a veth link into the host, addressed on both families, routed by the
/// host: a client that is not on the host.
struct RemoteLink {
    ns: common::Netns,
    host4: IpAddr,
    host6: IpAddr,
}

impl RemoteLink {
    /// The link 10.250.`net`.0/24 and fd7e:250:`net`::/64, the host at .1 and ::1, the
    /// client at .2 and ::2.
    fn new(tag: &str, net: u8) -> RemoteLink {
        let ns = common::Netns::new(tag);
        let (host_if, ns_if) = (format!("rpx{tag}h"), format!("rpx{tag}n"));
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        common::sh(&format!(
            "ip link add {host_if} type veth peer name {ns_if} netns {n} && \
             ip addr add 10.250.{net}.1/24 dev {host_if} && \
             ip addr add fd7e:250:{net}::1/64 dev {host_if} nodad && ip link set {host_if} up && \
             ip -n {n} addr add 10.250.{net}.2/24 dev {ns_if} && \
             ip -n {n} addr add fd7e:250:{net}::2/64 dev {ns_if} nodad && \
             ip -n {n} link set {ns_if} up && \
             ip -n {n} route add default via 10.250.{net}.1 && \
             ip -n {n} -6 route add default via fd7e:250:{net}::1",
            n = ns.name
        ));
        RemoteLink {
            ns,
            host4: format!("10.250.{net}.1").parse().unwrap(),
            host6: format!("fd7e:250:{net}::1").parse().unwrap(),
        }
    }

    /// The client's networks, as an allow-list label writes them.
    fn nets(&self) -> String {
        let (IpAddr::V4(v4), IpAddr::V6(v6)) = (self.host4, self.host6) else {
            unreachable!("built from literals")
        };
        let o = v4.octets();
        let s = v6.segments();
        format!(
            "{}.{}.{}.0/24,{:x}:{:x}:{:x}::/64",
            o[0], o[1], o[2], s[0], s[1], s[2]
        )
    }

    /// Whether one of `tries` datagrams from the client to `addr` is echoed (each waited
    /// for 300 ms).
    fn udp_echoes(&self, addr: SocketAddr, tries: usize) -> bool {
        self.ns.run(move || {
            let any: SocketAddr = match addr {
                SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
                SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            let s = UdpSocket::bind(any).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut buf = [0u8; 64];
            (0..tries).any(|_| {
                let _ = s.send_to(b"ping", addr);
                matches!(s.recv_from(&mut buf), Ok((4, _)) if &buf[..4] == b"ping")
            })
        })
    }

    /// Whether a GET from the client to `addr` gets the page within `patience`.
    fn gets(&self, h: &Harness, addr: SocketAddr, patience: Duration) -> bool {
        let page = h.page.clone();
        self.ns
            .run(move || http_get(addr, patience))
            .is_ok_and(|p| p == page)
    }
}

/// Who may reach a container's ports, from its labels, on dockerd's own DNAT (the daemon
/// following dockerd, its userland proxy off): `rproxy.allow` lets client A's networks in
/// on every port, `rproxy.allow.<port>` lets B's in on that one port instead; the other
/// client is dropped before dockerd's DNAT (counted), over IPv4 and IPv6; the host's own
/// processes always get in. The same container recreated without labels is open again. A
/// UDP echo container labelled for A answers A's datagrams and not B's, IPv4 and IPv6.
fn labels_say_who_may_reach_a_port_through_dockerds_dnat(h: &Harness, p: u16, q: u16, pu: u16) {
    let (a, b) = (RemoteLink::new("pla", 78), RemoteLink::new("plb", 79));
    let name = "rproxy-test-plabel";
    let run = |labels: &[String]| {
        let mut args: Vec<String> = ["run", "-d", "--name", name].map(String::from).to_vec();
        for l in labels {
            args.extend(["--label".to_string(), l.clone()]);
        }
        for port in [p, q] {
            args.extend(["-p".to_string(), format!("{port}:80")]);
        }
        args.extend([IMAGE, "httpd", "-f", "-p", "80", "-h", "/www"].map(String::from));
        h.docker_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    };
    run(&[
        format!("rproxy.allow={}", a.nets()),
        format!("rproxy.allow.{q}={}", b.nets()),
    ]);
    let listen = format!("0.0.0.0:{p}");
    wait_container_row(h, &listen, name);
    let (long, short) = (Duration::from_secs(10), Duration::ZERO);
    for (link, host) in [(&a, a.host4), (&a, a.host6), (&b, b.host4), (&b, b.host6)] {
        let is_a = std::ptr::eq(link, &a);
        let at = |port| SocketAddr::new(host, port);
        assert_eq!(
            link.gets(h, at(p), if is_a { long } else { short }),
            is_a,
            "{host}:{p}"
        );
        assert_eq!(
            link.gets(h, at(q), if is_a { short } else { long }),
            !is_a,
            "{host}:{q}"
        );
    }
    h.get_pages(
        &[
            SocketAddr::from((Ipv4Addr::LOCALHOST, p)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, q)),
        ],
        " (host, labelled ports)",
    );
    let out = run_json_ls(h);
    let row = out
        .iter()
        .find(|r| r["spec"].as_str().is_some_and(|s| s.starts_with(&listen)))
        .unwrap_or_else(|| panic!("{listen} not in ls --json"));
    assert!(row["denied"].as_u64().unwrap_or(0) >= 2, "{row}");
    h.step(&format!(
        "labels: {} in on {p} and {} on {q}, the other dropped ahead of dockerd's DNAT",
        a.host4, b.host4
    ));
    labelled_udp_echo_lets_in_a_alone(h, (&a, &b), "rproxy-test-plabelu", pu, true);
    h.docker_ok(&["rm", "-f", name]);
    run(&[]);
    assert!(
        b.gets(h, SocketAddr::new(b.host4, p), long),
        "unlabelled, yet B is out"
    );
    h.docker_ok(&["rm", "-f", name]);
    h.step("the container recreated without labels is open to everyone again");
}

/// Hairpin under an allow-list: the socket hooks leave such ports to dockerd's DNAT, where
/// the filter judges a container by its own address: a container on the list reaches the
/// port through its gateway, one off the list does not (both on the default bridge, icc on).
fn hairpin_is_judged_by_the_containers_own_address(h: &Harness, port: u16) {
    let (inside, outside, web) = ("rproxy-test-hin", "rproxy-test-hout", "rproxy-test-hweb");
    for c in [inside, outside] {
        h.docker_ok(&["run", "-d", "--name", c, IMAGE, "sleep", "3600"]);
    }
    let inside_ip = h.container_net(inside).ip;
    let label = format!("rproxy.allow={inside_ip}/32");
    let publish = format!("{port}:80");
    let mut args = web_run(web, &[&publish]);
    args.splice(2..2, ["--label", &label]);
    h.docker_ok(&args);
    let listen = format!("0.0.0.0:{port}");
    wait_container_row(h, &listen, web);
    let gw = h.docker_ok(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.Gateway}}{{end}}",
        inside,
    ]);
    let fetch = |client: &str| {
        let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {gw} {port}");
        h.docker(&["exec", client, "sh", "-c", &script])
    };
    let got = poll(Duration::from_secs(10), || {
        let out = fetch(inside);
        out.stdout
            .contains(h.page.trim_end())
            .then_some(())
            .ok_or(out)
    });
    if let Err(out) = got {
        panic!(
            "{inside} ({inside_ip}) on the list, yet refused: {out}\n{}",
            h.diag()
        );
    }
    let out = fetch(outside);
    assert!(
        !out.stdout.contains(h.page.trim_end()),
        "{outside} is off the list, yet reached {web}: {out}"
    );
    h.step(&format!(
        "hairpin: {inside_ip} on the list reached {gw}:{port}, the other container did not"
    ));
    h.docker_ok(&["rm", "-f", inside, outside, web]);
}

/// `docker_allow` in the daemon's config: a port no label speaks for is closed to remote
/// clients outside the list (IPv4 and IPv6, dockerd's DNAT and the daemon's own 6→4
/// listener alike) and open to those on it; the host's own processes always get in. The
/// daemon is restarted with it, and again without it afterwards.
fn docker_allow_closes_unlabelled_ports_to_remote_clients(h: &mut Harness, set: &ProxyOff) {
    let (a, b) = (RemoteLink::new("pda", 81), RemoteLink::new("pdb", 82));
    let quoted: Vec<String> = a.nets().split(',').map(|n| format!("{n:?}")).collect();
    h.stop_rproxy_daemon();
    h.daemon_config = format!("docker_allow = [{}]\n", quoted.join(", "));
    h.start_rproxy_daemon();
    wait_docker_rows(h, &set.rows(), "with docker_allow");
    let (long, once) = (Duration::from_secs(10), Duration::ZERO);
    for port in [set.p_web, set.p_v4] {
        for host in [a.host4, a.host6] {
            let addr = SocketAddr::new(host, port);
            assert!(a.gets(h, addr, long), "A refused at {addr}\n{}", h.diag());
        }
        for host in [b.host4, b.host6] {
            let addr = SocketAddr::new(host, port);
            assert!(!b.gets(h, addr, once), "B got in at {addr}");
        }
    }
    h.get_pages(
        &[
            SocketAddr::from((Ipv4Addr::LOCALHOST, set.p_web)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, set.p_v4)),
        ],
        " (host, docker_allow)",
    );
    h.step("docker_allow: unlabelled ports open to A alone remotely, to the host always");
    h.stop_rproxy_daemon();
    h.daemon_config = "publish = []\n".into();
    h.start_rproxy_daemon();
    wait_docker_rows(h, &set.rows(), "without docker_allow again");
}

/// A UDP echo container `name` on `pu`, labelled with A's networks: once the daemon shows its
/// list, A's datagrams are echoed and B's are not, over IPv4 (and IPv6 with `ipv6`).
fn labelled_udp_echo_lets_in_a_alone(
    h: &Harness,
    (a, b): (&RemoteLink, &RemoteLink),
    name: &str,
    pu: u16,
    ipv6: bool,
) {
    let label = format!("rproxy.allow={}", a.nets());
    let publish = format!("{pu}:7/udp");
    let mut args = vec!["run", "-d", "--name", name, "--label", &label];
    args.extend([
        "--stop-timeout",
        "1",
        "-p",
        &publish,
        IMAGE,
        "/udpecho",
        "7",
    ]);
    h.docker_ok(&args);
    let listen = format!("0.0.0.0:{pu}");
    wait_listed(h, &listen);
    let mut pairs = vec![(a.host4, b.host4)];
    if ipv6 {
        pairs.push((a.host6, b.host6));
    }
    for (host_a, host_b) in pairs {
        let (to_a, to_b) = (SocketAddr::new(host_a, pu), SocketAddr::new(host_b, pu));
        assert!(a.udp_echoes(to_a, 20), "A's datagrams to {to_a} unanswered");
        assert!(!b.udp_echoes(to_b, 3), "B's datagrams to {to_b} answered");
    }
    h.docker_ok(&["rm", "-f", name]);
    h.step(&format!("labels: UDP {pu} echoes A's datagrams, not B's"));
}

/// Waits (10 s) for `ls` to show `listen` served for `container`.
fn wait_container_row(h: &Harness, listen: &str, container: &str) {
    poll(Duration::from_secs(10), || {
        h.rproxy_ls()
            .iter()
            .any(|r| r.listen == listen && r.container == container)
            .then_some(())
            .ok_or(())
    })
    .unwrap_or_else(|()| panic!("{listen} not served\n{}", h.diag()));
}

/// Waits (10 s) for `ls --json` to show a non-empty allow-list on the mapping at `listen`.
fn wait_listed(h: &Harness, listen: &str) {
    poll(Duration::from_secs(10), || {
        run_json_ls(h)
            .into_iter()
            .find(|r| r["spec"].as_str().is_some_and(|s| s.starts_with(listen)))
            .filter(|r| r["allow"].as_array().is_some_and(|l| !l.is_empty()))
            .ok_or(())
    })
    .unwrap_or_else(|()| panic!("{listen} has no list yet\n{}", h.diag()));
}

/// `rproxy ls --json` against our daemon.
fn run_json_ls(h: &Harness) -> Vec<serde_json::Value> {
    let out = run(
        Command::new(&h.rproxy_arg)
            .args(["ls", "--json", "--control-socket"])
            .arg(&h.rproxy_sock),
        Duration::from_secs(10),
        &h.dir,
    );
    assert!(out.status.success(), "rproxy ls --json: {out}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Hairpin without a userland proxy: a container on the target's own network with icc on
/// reaches the published port through its gateway straight (the target sees its address);
/// with icc off the hooks leave it alone and dockerd refuses it, as without the daemon.
fn hairpin_follows_icc_without_a_userland_proxy(h: &Harness, p_icc: u16, p_off: u16) {
    let mut seen_straight = 0;
    for (net, icc, port) in [
        ("rproxy-test-pnoicc", false, p_off),
        ("rproxy-test-picc", true, p_icc),
    ] {
        let (client, web) = (format!("{net}-client"), format!("{net}-web"));
        h.docker_ok(&[
            "network",
            "create",
            "--opt",
            &format!("com.docker.network.bridge.enable_icc={icc}"),
            net,
        ]);
        h.docker_ok(&[
            "run",
            "-d",
            "--name",
            &client,
            "--network",
            net,
            IMAGE,
            "sleep",
            "3600",
        ]);
        h.docker_ok(&[
            "run",
            "-d",
            "--name",
            &web,
            "--network",
            net,
            "-p",
            &format!("{port}:80"),
            IMAGE,
            "httpd",
            "-f",
            "-vv",
            "-p",
            "80",
            "-h",
            "/www",
        ]);
        let listen = format!("0.0.0.0:{port}");
        let row = || {
            poll(Duration::from_secs(10), || {
                h.rproxy_ls()
                    .into_iter()
                    .find(|r| r.listen == listen)
                    .ok_or(())
            })
            .unwrap_or_else(|()| panic!("{listen} not served\n{}", h.diag()))
        };
        let gw = h.docker_ok(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.Gateway}}{{end}}",
            &client,
        ]);
        let me = h.docker_ok(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &client,
        ]);
        let fetch = || {
            let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {gw} {port}");
            h.docker(&["exec", &client, "sh", "-c", &script])
        };
        let before = row();
        if icc {
            // Once the hairpin rule has learnt the new network (its events come in bursts).
            let got = poll(Duration::from_secs(15), || {
                let out = fetch();
                let counted = row().socket_conns > before.socket_conns;
                (out.stdout.contains(h.page.trim_end()) && counted)
                    .then_some(())
                    .ok_or(out)
            });
            if let Err(out) = got {
                panic!("{client} -> {gw}:{port} not straight: {out}\n{}", h.diag());
            }
            let logs = h.docker(&["logs", &web]).stderr;
            assert!(
                logs.contains(&format!("[::ffff:{me}]:")),
                "{web} saw: {logs}"
            );
            seen_straight += 1;
            h.step(&format!("{net}: hairpin from {me} went straight to {web}"));
        } else {
            let out = fetch();
            assert!(
                !out.stdout.contains(h.page.trim_end()),
                "icc off, yet {client} reached {web}: {out}"
            );
            assert_eq!(
                row().socket_conns,
                before.socket_conns,
                "the hooks carried it"
            );
            h.step(&format!(
                "{net}: icc off, the hooks left it to dockerd, which refused it"
            ));
        }
        h.docker_ok(&["rm", "-f", &client, &web]);
        h.docker_ok(&["network", "rm", net]);
    }
    assert_eq!(seen_straight, 1);
}

/// Lifecycle: every start and death was followed well within 100 ms of dockerd's event (the
/// daemon logs each delay); `docker restart` is followed; SIGHUP, a takeover and a restart of
/// the daemon rebuild the same set; dockerd restarted with a container that comes back
/// (`--restart always`) is read again on its return; `docker rm -f` removes the entries.
fn the_daemon_follows_containers_dockerd_and_itself(h: &mut Harness, set: &ProxyOff) {
    let want = set.rows();
    let ls_pids = |h: &Harness| -> BTreeSet<u32> { h.rproxy_ls().iter().map(|r| r.pid).collect() };
    // docker restart: the entries go and come back (same addresses here, all followed).
    h.docker_ok(&["restart", "-t", "1", ProxyOff::WEB4]);
    wait_docker_rows(h, &want, "after docker restart");
    h.get_pages(
        &[SocketAddr::from((Ipv6Addr::LOCALHOST, set.p_v4))],
        " (after docker restart)",
    );
    // SIGHUP: nothing of dockerd's changes.
    let pid = h.rproxy_daemon_pid().unwrap();
    let _ = kill(Pid::from_raw(pid), Signal::SIGHUP);
    poll(Duration::from_secs(5), || {
        h.daemon_log().contains("reloaded").then_some(()).ok_or(())
    })
    .unwrap_or_else(|()| panic!("no reload\n{}", h.diag()));
    assert_eq!(docker_rows(h), want, "after SIGHUP");
    // A takeover, then a restart: the same set, served by the new process.
    let mut old = h.rproxy_daemon.take().expect("the daemon");
    h.take_over_rproxy_daemon();
    let status = poll(Duration::from_secs(10), || {
        old.try_wait().unwrap().ok_or(())
    });
    assert!(
        matches!(status, Ok(s) if s.success()),
        "{status:?}\n{}",
        h.diag()
    );
    wait_docker_rows(h, &want, "after a takeover");
    let new = h.rproxy_daemon_pid().unwrap() as u32;
    assert_eq!(ls_pids(h), BTreeSet::from([new]));
    h.get_pages(
        &[
            SocketAddr::from((Ipv6Addr::LOCALHOST, set.p_web)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, set.p_v4)),
        ],
        " (after a takeover)",
    );
    let status = h.stop_rproxy_daemon();
    assert!(matches!(status, Some(s) if s.success()), "{status:?}");
    h.start_rproxy_daemon();
    wait_docker_rows(h, &want, "after a restart of the daemon");
    h.get_pages(
        &[SocketAddr::from((Ipv6Addr::LOCALHOST, set.p_v4))],
        " (after a restart of the daemon)",
    );
    h.step("SIGHUP, a takeover and a restart kept the same set");

    // dockerd restarted: its containers stop with it, the two with --restart always come
    // back (the echo container does not), and the daemon reads them once dockerd answers.
    for name in [ProxyOff::WEB, ProxyOff::WEB4] {
        h.docker_ok(&["update", "--restart", "always", name]);
    }
    h.restart_dockerd();
    poll(Duration::from_secs(30), || {
        [ProxyOff::WEB, ProxyOff::WEB4]
            .iter()
            .all(|n| h.docker_ok(&["inspect", "-f", "{{.State.Running}}", n]) == "true")
            .then_some(())
            .ok_or(())
    })
    .unwrap_or_else(|()| panic!("the containers did not come back\n{}", h.diag()));
    let back = set.reread(h);
    let after: BTreeSet<_> = back
        .rows()
        .into_iter()
        .filter(|r| r.3 != ProxyOff::ECHO)
        .collect();
    wait_docker_rows(h, &after, "after dockerd's restart");
    h.get_pages(
        &[SocketAddr::from((Ipv6Addr::LOCALHOST, set.p_web))],
        " (after dockerd's restart)",
    );
    h.step("dockerd restarted: the daemon read it again");

    // Every follow within 100 ms of dockerd's event.
    let delays: Vec<f64> = h
        .daemon_log()
        .lines()
        .filter_map(|l| {
            let (_, rest) = l
                .split_once("mappings, ")
                .or_else(|| l.split_once("gone, "))?;
            rest.split(" ms after dockerd's event").next()?.parse().ok()
        })
        .collect();
    assert!(delays.len() >= 4, "{delays:?}\n{}", h.diag());
    let worst = delays.iter().copied().fold(0.0, f64::max);
    assert!(
        worst < 100.0,
        "a container followed {worst} ms after its event: {delays:?}"
    );
    h.step(&format!(
        "{} container events followed, the slowest {worst:.1} ms after dockerd's event",
        delays.len()
    ));

    h.docker_ok(&["rm", "-f", ProxyOff::WEB]);
    let left: BTreeSet<_> = after
        .into_iter()
        .filter(|r| r.3 == ProxyOff::WEB4)
        .collect();
    wait_docker_rows(h, &left, "after docker rm -f");
    let gone = http_get(
        SocketAddr::from((Ipv6Addr::LOCALHOST, set.p_web)),
        Duration::ZERO,
    );
    assert!(gone.is_err(), "{gone:?}");
    h.step("docker rm -f took the entries away");
}

/// `docker run -p 21000-21499:21000-21499` (a free range like it): 1,000 entries (each port,
/// IPv4 and IPv6), no process for any of them; how long until the daemon serves them all and
/// until `docker rm -f` has them all gone, and the daemon's RSS with them.
fn a_500_port_range_costs_no_process(h: &Harness) {
    let base = free_run(500, true, &h.ports);
    let range = format!("{base}-{}", base + 499);
    let name = "rproxy-test-prange";
    let started = Instant::now();
    let publish = format!("{range}:{range}");
    let args = [
        "run", "-d", "--name", name, "-p", &publish, IMAGE, "sleep", "3600",
    ];
    let out = h.docker_timeout(&args, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "docker run -p {publish}: {out}\n{}",
        h.diag()
    );
    let run = started.elapsed();
    let count = |h: &Harness| h.rproxy_ls().iter().filter(|r| r.container == name).count();
    poll(Duration::from_secs(30), || {
        (count(h) == 1000).then_some(()).ok_or(())
    })
    .unwrap_or_else(|()| panic!("{} entries, not 1,000\n{}", count(h), h.diag()));
    let served = started.elapsed();
    let pid = h.rproxy_daemon_pid().unwrap();
    let rss = proc_field(pid, "status", "VmRSS:").unwrap_or(0);
    let proxies = proxy_processes()
        .into_iter()
        .filter(|p| {
            p.host_port
                .parse::<u16>()
                .is_ok_and(|q| (base..base + 500).contains(&q))
        })
        .count();
    assert_eq!(proxies, 0, "processes for the range");
    // dockerd removes its iptables rules one call at a time: over a minute for the range.
    let removing = Instant::now();
    let out = h.docker_timeout(&["rm", "-f", name], Duration::from_secs(300));
    assert!(
        out.status.success(),
        "docker rm -f {name}: {out}\n{}",
        h.diag()
    );
    let rm = removing.elapsed();
    poll(Duration::from_secs(30), || {
        (count(h) == 0).then_some(()).ok_or(())
    })
    .unwrap_or_else(|()| panic!("{} entries left\n{}", count(h), h.diag()));
    // The daemon's own figures: from dockerd's start and die events to the change done.
    let log = h.daemon_log();
    let after_event = |what: &str| {
        log.lines()
            .filter(|l| l.contains(&format!("container {name}: {what}")))
            .find_map(|l| {
                l.split(", ")
                    .last()?
                    .split(" ms after")
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no \"{what}\" line for {name}\n{}", h.diag()))
    };
    let (up, down) = (after_event("1000 mappings"), after_event("gone"));
    h.step(&format!(
        "500-port range {range}: docker run {:.1} s, all 1,000 entries served {:.1} s after \
         it started ({up:.1} ms after dockerd's start event); docker rm -f {:.1} s (entries \
         gone {down:.1} ms after the die event); daemon RSS {rss} kB; 0 processes",
        run.as_secs_f64(),
        served.as_secs_f64(),
        rm.as_secs_f64()
    ));
}

/// SIGKILL of the daemon: no program stays attached, its `[::]` listener is gone, and the
/// ports behave as dockerd alone serves them (127.0.0.1 answers, [::1] does not).
fn the_ports_are_dockerds_alone_after_the_daemons_sigkill(h: &mut Harness, set: &ProxyOff) {
    let web4 = SocketAddr::from((Ipv6Addr::LOCALHOST, set.p_v4));
    h.get_pages(&[web4], " (before the SIGKILL)");
    h.kill_rproxy_daemon();
    h.get_pages(
        &[SocketAddr::from((Ipv4Addr::LOCALHOST, set.p_v4))],
        " (dockerd alone again)",
    );
    let got = http_get(web4, Duration::ZERO);
    assert!(
        got.is_err(),
        "[::1] still served after the SIGKILL: {got:?}"
    );
    h.step("daemon killed: nothing attached, dockerd alone serves its ports again");
}

// ================================================================================================
// The scenarios, in the order the tests run them. Each takes what it needs (the harness, ports,
// container names, containers an earlier scenario started) and returns what a later one needs.

/// The web container: httpd on port 80, published on 127.0.0.1:`p1` and on `p2` (all
/// addresses).
struct Web {
    name: &'static str,
    net: ContainerNet,
    p1: u16,
    p2: u16,
}

/// The UDP echo container, published on `port`/udp. It stays up until dockerd shuts down.
struct UdpEcho {
    name: &'static str,
    port: u16,
}

/// The container whose ports dockerd's shims handed to our rproxy daemon: TCP `range` (each
/// port to the same port) and `udp_port` (to 7/udp).
struct HandedOver {
    name: &'static str,
    range: Vec<u16>,
    udp_port: u16,
    /// Every mapping `rproxy ls` must list: (proto, listen, target).
    want: BTreeSet<(String, String, String)>,
}

impl HandedOver {
    /// Every host port of the container: the range and the UDP port.
    fn ports(&self) -> Vec<u16> {
        let mut ports = self.range.clone();
        ports.push(self.udp_port);
        ports
    }
}

/// (a) The web container answers through 127.0.0.1 (P1 and P2), the bridge gateway (P2) and,
/// with IPv6, [::1] (P2).
fn loopback_and_gateway_clients_reach_the_container(
    h: &Harness,
    name: &'static str,
    p1: u16,
    p2: u16,
) -> Web {
    h.docker_ok(&web_run(
        name,
        &[&format!("127.0.0.1:{p1}:80"), &format!("{p2}:80")],
    ));
    let net = h.container_net(name);
    h.step(&format!("web container: {net:?}"));
    let gw: IpAddr = net.gateway;

    // Loopback can only be served by the proxy: nat OUTPUT skips 127.0.0.0/8 when it is on.
    let lo1 = SocketAddr::from((Ipv4Addr::LOCALHOST, p1));
    let lo2 = SocketAddr::from((Ipv4Addr::LOCALHOST, p2));
    let gw2 = SocketAddr::new(gw, p2);
    let mut targets = vec![lo1, lo2, gw2];
    if h.ipv6 {
        // [::1] has no NAT path at all: only the `::` proxy can serve it.
        targets.push(SocketAddr::from((Ipv6Addr::LOCALHOST, p2)));
    }
    h.get_pages(&targets, "");
    Web { name, net, p1, p2 }
}

/// (b) The web container's ports are served by rproxy processes with the contract's flags, one
/// per address; no docker-proxy serves them; RPROXY_LOG_FILE reached the proxies through
/// dockerd's environment.
fn the_proxies_are_rproxy_with_the_contracts_flags(h: &Harness, web: &Web) {
    let (net, p1, p2) = (&web.net, web.p1, web.p2);
    let procs = proxy_processes();
    let ours = |port: u16| -> Vec<&ProxyProc> {
        procs
            .iter()
            .filter(|p| p.exe == h.rproxy_arg && p.host_port == port.to_string())
            .collect()
    };
    let on_p1 = ours(p1);
    assert_eq!(
        on_p1.len(),
        1,
        "expected exactly one rproxy for 127.0.0.1:{p1}, found {on_p1:#?}\nall proxies: {procs:#?}"
    );
    assert_eq!(on_p1[0].proto, "tcp");
    assert_eq!(on_p1[0].host_ip, "127.0.0.1");
    assert_eq!(on_p1[0].container_ip, net.ip.to_string());
    assert_eq!(on_p1[0].container_port, "80");
    let on_p2 = ours(p2);
    let want_p2: BTreeSet<&str> = if h.ipv6 {
        ["0.0.0.0", "::"].into()
    } else {
        ["0.0.0.0"].into()
    };
    let got_p2: BTreeSet<&str> = on_p2.iter().map(|p| p.host_ip.as_str()).collect();
    assert_eq!(
        got_p2, want_p2,
        "rproxy processes for port {p2}: {on_p2:#?}\nall proxies: {procs:#?}"
    );
    assert_eq!(on_p2.len(), want_p2.len(), "duplicates: {on_p2:#?}");
    for p in &on_p2 {
        let want_backend = match (p.host_ip.as_str(), net.ipv6) {
            // The `::` proxy targets the container's IPv6 address when it has one, else 6→4.
            ("::", Some(v6)) => v6.to_string(),
            _ => net.ip.to_string(),
        };
        assert_eq!(p.container_ip, want_backend, "backend of {p:#?}");
        assert_eq!((p.proto.as_str(), p.container_port.as_str()), ("tcp", "80"));
    }
    let docker_proxies: Vec<&ProxyProc> = procs
        .iter()
        .filter(|p| p.exe.ends_with("docker-proxy"))
        .filter(|p| [p1, p2].iter().any(|port| p.host_port == port.to_string()))
        .collect();
    assert!(
        docker_proxies.is_empty(),
        "docker-proxy must not serve our ports: {docker_proxies:#?}"
    );
    // RPROXY_LOG_FILE reached the proxies through dockerd's environment.
    let log = h.rproxy_log();
    for words in [
        [
            "serving",
            &format!("127.0.0.1:{p1}"),
            &format!("{}:80", net.ip),
        ],
        [
            "serving",
            &format!("0.0.0.0:{p2}"),
            &format!("{}:80", net.ip),
        ],
    ] {
        assert!(
            log_has(&log, &words),
            "rproxy.log has no line with all of {words:?}:\n{log}"
        );
    }
    h.step("rproxy processes and log ok");
}

/// Default pairing: dockerd's iptables rules DNAT published IPv4 ports; with RPROXY_NAT=on the
/// proxies find dockerd's rule for their port and add none of their own. (dockerd 20.10 writes
/// no ip6tables NAT, so `::` proxies with IPv6 containers do install theirs.)
fn rproxy_leaves_ipv4_nat_to_dockerds_iptables_rules(h: &Harness, web: &Web) {
    let p2 = web.p2;
    let log = h.rproxy_log();
    assert!(
        log_has(
            &log,
            &[
                "dockerd's own rules already DNAT it",
                &format!("0.0.0.0:{p2}")
            ]
        ),
        "rproxy.log does not show NAT left to dockerd:\n{log}"
    );
    let ours = rproxy_rulesets();
    assert!(
        !ours.contains("dnat ip to"),
        "rproxy IPv4 rules beside dockerd's NAT:\n{ours}"
    );
    h.step("RPROXY_NAT=on beside dockerd's iptables NAT: no rproxy IPv4 rules");
}

/// (d) Hairpin: another container on the bridge fetches the web page via the gateway address
/// (each family's) and P2. The proxy terminates the connection on the host, so no FORWARD rule
/// is involved (no DOCKER-USER ACCEPT needed): container → host is INPUT, host → container is
/// OUTPUT.
fn another_container_reaches_the_port_through_the_gateway(h: &Harness, web: &Web) {
    let p2 = web.p2;
    let hosts: Vec<IpAddr> = std::iter::once(web.net.gateway)
        .chain(web.net.ipv6_gateway)
        .collect();
    for host in hosts {
        let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {host} {p2}");
        let mut last = None;
        for _attempt in 0..3 {
            let out = h.docker(&["run", "--rm", IMAGE, "sh", "-c", &script]);
            if out.status.success() && out.stdout.contains(h.page.trim_end()) {
                last = None;
                break;
            }
            last = Some(out);
            sleep(Duration::from_millis(500));
        }
        if let Some(out) = last {
            panic!(
                "hairpin fetch from a container to {host}:{p2} failed: {out}\n{}",
                h.diag()
            );
        }
        h.step(&format!("hairpin via {host}:{p2} ok"));
    }
}

/// (c) UDP echo through the proxy on P3, small and 60,000-byte datagrams, via 127.0.0.1 and
/// (with IPv6) [::1]; only `rproxy -proto udp` serves P3. The container stays up: later
/// scenarios compare footprints with its proxies and shut dockerd down with it running.
fn udp_datagrams_are_echoed_through_the_proxy(h: &Harness, name: &'static str, p3: u16) -> UdpEcho {
    h.docker_ok(&[
        "run",
        "-d",
        "--name",
        name,
        // udpecho is PID 1 without a SIGTERM handler: don't make the daemon shutdown wait 10 s.
        "--stop-timeout",
        "1",
        "-p",
        &format!("{p3}:7/udp"),
        IMAGE,
        "/udpecho",
        "7",
    ]);
    let mut udp_targets = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, p3))];
    if h.ipv6 {
        udp_targets.push(SocketAddr::from((Ipv6Addr::LOCALHOST, p3)));
    }
    for addr in udp_targets {
        udp_check(addr, h);
        h.step(&format!("UDP echo via {addr} ok (3 small + 60,000 bytes)"));
    }
    let on_p3 = h.rproxies_on(&[p3]);
    assert!(
        !on_p3.is_empty() && on_p3.iter().all(|p| p.proto == "udp"),
        "UDP port {p3} must be served by rproxy -proto udp: {on_p3:#?}"
    );
    UdpEcho { name, port: p3 }
}

/// (e) `docker stop` (then `docker rm`) of the web container ends its proxies, on SIGINT, and
/// frees P1 and P2.
fn docker_stop_ends_the_proxies_and_frees_the_ports(h: &Harness, web: Web) {
    let Web { name, p1, p2, .. } = web;
    h.docker_ok(&["stop", "-t", "1", name]);
    h.docker_ok(&["rm", name]);
    h.wait_none(
        Duration::from_secs(10),
        &format!("rproxy processes for {p1}/{p2} still alive 10 s after docker stop"),
        || h.rproxies_on(&[p1, p2]),
    );
    h.wait_none(
        Duration::from_secs(10),
        "ports still busy after docker stop",
        || {
            let mut busy = Vec::new();
            let mut try_bind = |addr: SocketAddr| {
                if let Err(e) = TcpListener::bind(addr) {
                    busy.push(format!("{addr}: {e}"));
                }
            };
            try_bind(SocketAddr::from((Ipv4Addr::LOCALHOST, p1)));
            try_bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, p2)));
            if h.ipv6 {
                try_bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, p2)));
            }
            busy
        },
    );
    // dockerd stops proxies with SIGINT; rproxy logs that it stopped on the signal.
    let log = h.rproxy_log();
    assert!(
        log_has(&log, &["SIGINT", "stopping", &format!("0.0.0.0:{p2}")]),
        "rproxy.log does not show the SIGINT stop of 0.0.0.0:{p2}:\n{log}"
    );
    h.step("docker stop: proxies gone, ports free");
}

/// (f) With P4 already bound on the host, `docker run -p P4:80` fails and its error carries
/// rproxy's reason; no rproxy stays behind for P4.
fn a_taken_host_port_fails_docker_run_with_the_reason(h: &Harness, name: &str, p4: u16) {
    let blocker = TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, p4)))
        .unwrap_or_else(|e| panic!("cannot take port {p4} for the conflict test: {e}"));
    let out = h.docker(&web_run(name, &[&format!("{p4}:80")]));
    assert!(
        !out.status.success(),
        "docker run on taken port {p4} must fail: {out}"
    );
    let reason = format!("failed to listen on tcp 0.0.0.0:{p4}: address already in use");
    assert!(
        out.stderr.contains("address already in use") && out.stderr.contains(&reason),
        "docker run stderr must carry rproxy's reason {reason:?}; docker stderr was:\n{}",
        out.stderr
    );
    h.wait_none(
        Duration::from_secs(5),
        &format!("rproxy processes left for the failed port {p4}"),
        || h.rproxies_on(&[p4]),
    );
    drop(blocker);
    h.docker_ok(&["rm", "-f", name]);
    h.step("taken port: docker run failed with rproxy's reason");
}

/// Labels under a dockerd whose userland proxy is rproxy, its shims handing their ports to
/// the daemon: client A (on the label's networks) reaches the port through dockerd's DNAT
/// over IPv4 and through the daemon's listener over IPv6 (the shim's `[::]` socket, 6→4);
/// client B is dropped ahead of both; the host's own processes get in. The same for a
/// labelled UDP echo container on `pu`.
fn labels_hold_on_ports_the_shims_hand_over(h: &Harness, port: u16, pu: u16) {
    let (a, b) = (RemoteLink::new("sla", 83), RemoteLink::new("slb", 84));
    let name = "rproxy-test-slabel";
    let label = format!("rproxy.allow={}", a.nets());
    let publish = format!("{port}:80");
    let mut args = web_run(name, &[&publish]);
    args.splice(2..2, ["--label", &label]);
    h.docker_ok(&args);
    let listen = format!("0.0.0.0:{port}");
    // The shim registers at once; its container's labels follow dockerd's start event.
    wait_listed(h, &listen);
    let hosts = if h.ipv6 {
        vec![(a.host4, b.host4), (a.host6, b.host6)]
    } else {
        vec![(a.host4, b.host4)]
    };
    for (to_a, to_b) in hosts {
        let (at_a, at_b) = (SocketAddr::new(to_a, port), SocketAddr::new(to_b, port));
        assert!(
            a.gets(h, at_a, Duration::from_secs(10)),
            "A refused at {at_a}\n{}",
            h.diag()
        );
        assert!(!b.gets(h, at_b, Duration::ZERO), "B got in at {at_b}");
    }
    h.get_pages(
        &[SocketAddr::from((Ipv4Addr::LOCALHOST, port))],
        " (host, labelled, shims)",
    );
    h.step(&format!(
        "labels with shims: {} in on {port}, {} dropped",
        a.host4, b.host4
    ));
    labelled_udp_echo_lets_in_a_alone(h, (&a, &b), "rproxy-test-slabelu", pu, h.ipv6);
    h.docker_ok(&["rm", "-f", name]);
}

/// (h, before the daemon starts) Until now nothing listened on dockerd's RPROXY_SOCKET: every
/// proxy served its port itself, and none tried to talk to a daemon.
fn with_no_daemon_every_proxy_serves_its_port_itself(h: &Harness) {
    let log = h.rproxy_log();
    for word in [
        "handed to the daemon",
        "unreachable",
        "daemon did not answer",
    ] {
        assert!(
            !log.contains(word),
            "with no daemon on RPROXY_SOCKET, no proxy may talk to one ({word:?}):\n{log}"
        );
    }
}

/// (h) With our rproxy daemon on dockerd's RPROXY_SOCKET, a container publishing the TCP
/// `range` and `udp_port`: `rproxy ls` lists exactly those mappings, each registered by a shim
/// and serving.
fn the_daemon_lists_every_mapping_the_shims_hand_over(
    h: &Harness,
    name: &'static str,
    range: Vec<u16>,
    udp_port: u16,
) -> HandedOver {
    let pu = udp_port;
    let (r0, r5, r9) = (range[0], range[5], range[9]);
    h.docker_ok(&[
        "run",
        "-d",
        "--name",
        name,
        "--stop-timeout",
        "1",
        "-p",
        &format!("{r0}-{r9}:{r0}-{r9}"),
        "-p",
        &format!("{pu}:7/udp"),
        IMAGE,
        "sh",
        "-c",
        // Two httpds in the background (busybox httpd forks without -f), udpecho as PID 1.
        &format!("httpd -p {r0} -h /www && httpd -p {r5} -h /www && exec /udpecho 7"),
    ]);
    let net = h.container_net(name);
    h.step(&format!("daemon-phase container: {net:?}"));

    // The daemon lists every published port, all registered by shims.
    let v6_target = |port: u16| match net.ipv6 {
        Some(v6) => format!("[{v6}]:{port}"),
        None => format!("{}:{port}", net.ip),
    };
    let mut want: BTreeSet<(String, String, String)> = BTreeSet::new();
    for &p in &range {
        want.insert((
            "tcp".into(),
            format!("0.0.0.0:{p}"),
            format!("{}:{p}", net.ip),
        ));
        if h.ipv6 {
            want.insert(("tcp".into(), format!("[::]:{p}"), v6_target(p)));
        }
    }
    want.insert((
        "udp".into(),
        format!("0.0.0.0:{pu}"),
        format!("{}:7", net.ip),
    ));
    if h.ipv6 {
        want.insert(("udp".into(), format!("[::]:{pu}"), v6_target(7)));
    }
    let listed = poll(Duration::from_secs(10), || {
        let rows = h.rproxy_ls();
        let got: BTreeSet<(String, String, String)> = rows
            .iter()
            .map(|r| (r.proto.clone(), r.listen.clone(), r.target.clone()))
            .collect();
        (got == want && rows.len() == want.len())
            .then_some(())
            .ok_or(rows)
    });
    if let Err(rows) = listed {
        panic!(
            "rproxy ls must list exactly the {} published mappings {want:#?}\ngot {rows:#?}\n{}",
            want.len(),
            h.diag()
        );
    }
    let rows = h.rproxy_ls();
    let tcp_rows = rows.iter().filter(|r| r.proto == "tcp").count();
    assert_eq!(tcp_rows, if h.ipv6 { 20 } else { 10 }, "{rows:#?}");
    for r in &rows {
        assert_eq!(
            (r.origin.as_str(), r.state.as_str()),
            ("shim", "serving"),
            "every mapping comes from a shim: {r:#?}"
        );
    }
    h.step(&format!(
        "rproxy ls: {} mappings ({tcp_rows} TCP), all ORIGIN shim",
        rows.len()
    ));
    HandedOver {
        name,
        range,
        udp_port,
        want,
    }
}

/// (h) httpd on the range's first and sixth port and the UDP echo answer through the daemon, on
/// IPv4 and IPv6 loopback, and the daemon's own counters show that traffic (a shim relays
/// nothing), with the NAT owner the shims' RPROXY_NAT=on leads to.
fn the_daemon_carries_the_traffic_of_handed_over_ports(h: &Harness, handed: &HandedOver) {
    let (r0, r5, pu) = (handed.range[0], handed.range[5], handed.udp_port);
    let mut targets = vec![
        SocketAddr::from((Ipv4Addr::LOCALHOST, r0)),
        SocketAddr::from((Ipv4Addr::LOCALHOST, r5)),
    ];
    if h.ipv6 {
        targets.push(SocketAddr::from((Ipv6Addr::LOCALHOST, r0)));
        targets.push(SocketAddr::from((Ipv6Addr::LOCALHOST, r5)));
    }
    h.get_pages(&targets, " (daemon)");
    let mut udp_targets = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, pu))];
    if h.ipv6 {
        udp_targets.push(SocketAddr::from((Ipv6Addr::LOCALHOST, pu)));
    }
    for addr in &udp_targets {
        udp_check(*addr, h);
        h.step(&format!("UDP echo via {addr} ok (daemon)"));
    }
    // The daemon's own counters prove it carried that traffic (a shim relays nothing).
    let rows = h.rproxy_ls();
    let row = |proto: &str, listen: String| -> LsRow {
        rows.iter()
            .find(|r| r.proto == proto && r.listen == listen)
            .cloned()
            .unwrap_or_else(|| panic!("no {proto} {listen} in rproxy ls: {rows:#?}"))
    };
    let mut carried = vec![
        row("tcp", format!("0.0.0.0:{r0}")),
        row("tcp", format!("0.0.0.0:{r5}")),
        row("udp", format!("0.0.0.0:{pu}")),
    ];
    if h.ipv6 {
        carried.push(row("tcp", format!("[::]:{r0}")));
        carried.push(row("tcp", format!("[::]:{r5}")));
        carried.push(row("udp", format!("[::]:{pu}")));
    }
    for r in &carried {
        assert!(
            r.total >= 1 && r.bytes_in > 0 && r.bytes_out > 0,
            "the daemon's counters show no traffic for {r:#?}"
        );
        // The shims passed RPROXY_NAT=on; dockerd's iptables NAT was there first for IPv4.
        let want = if r.target.starts_with('[') {
            "kernel"
        } else {
            "dockerd"
        };
        assert_eq!(r.nat, want, "{r:#?}");
    }
    let big = carried.iter().filter(|r| r.proto == "udp");
    for r in big {
        assert!(
            r.bytes_in >= 60_000 && r.bytes_out >= 60_000,
            "the 60,000-byte datagram is missing from {r:#?}"
        );
    }
    h.step("daemon counters show the traffic");
}

/// (h) The processes dockerd spawned for the handed-over ports are shims: one per mapping, each
/// logged its hand-over and runs one thread. Prints their memory footprint, and for comparison
/// that of the self-serving proxies of `udp` (still up).
fn dockerds_processes_for_handed_over_ports_are_one_thread_shims(
    h: &Harness,
    handed: &HandedOver,
    udp: &UdpEcho,
) {
    let shims = h.rproxies_on(&handed.ports());
    let want_procs: BTreeSet<(String, String, String)> = handed
        .want
        .iter()
        .map(|(proto, listen, _)| {
            let (ip, port) = listen.rsplit_once(':').unwrap();
            let ip = ip.trim_start_matches('[').trim_end_matches(']');
            (proto.clone(), ip.to_string(), port.to_string())
        })
        .collect();
    let got_procs: BTreeSet<(String, String, String)> = shims
        .iter()
        .map(|p| (p.proto.clone(), p.host_ip.clone(), p.host_port.clone()))
        .collect();
    assert_eq!(
        got_procs, want_procs,
        "one rproxy process per mapping expected: {shims:#?}"
    );
    assert_eq!(shims.len(), want_procs.len(), "duplicates: {shims:#?}");
    let log = h.rproxy_log();
    for (proto, ip, port) in &want_procs {
        let listen = if ip.contains(':') {
            format!("[{ip}]:{port} ->")
        } else {
            format!("{ip}:{port} ->")
        };
        assert!(
            log_has(
                &log,
                &[&format!("{proto} {listen}"), "handed to the daemon"]
            ),
            "rproxy.log has no hand-over of {proto} {listen}:\n{log}"
        );
    }
    let mut shim_pss = 0;
    for p in &shims {
        let threads = proc_threads(p.pid);
        assert_eq!(
            threads,
            Some(1),
            "shim {p:#?} must be a single thread\n{}",
            h.diag()
        );
        shim_pss += proc_pss_kb(p.pid).unwrap_or(0);
    }
    let rows = h.rproxy_ls();
    let dpid = h.rproxy_daemon_pid().expect("the rproxy daemon runs");
    let daemon_pss = proc_pss_kb(dpid).unwrap_or(0);
    let daemon_threads = proc_threads(dpid).unwrap_or(0);
    let n = shims.len();
    eprintln!(
        "FOOTPRINT daemon mode: {} processes ({n} shims x 1 thread + 1 daemon with {daemon_threads} \
         threads) for {} mappings: PSS total {} kB = shims {shim_pss} kB ({} kB each on average) \
         + daemon {daemon_pss} kB; {:.0} kB per mapping",
        n + 1,
        rows.len(),
        shim_pss + daemon_pss,
        shim_pss / n.max(1) as u64,
        (shim_pss + daemon_pss) as f64 / rows.len().max(1) as f64,
    );
    // For comparison, the self-serving proxies of the UDP container.
    let p3 = udp.port;
    let solo: Vec<(u64, u32)> = h
        .rproxies_on(&[p3])
        .into_iter()
        .filter_map(|p| Some((proc_pss_kb(p.pid)?, proc_threads(p.pid)?)))
        .collect();
    if !solo.is_empty() {
        eprintln!(
            "FOOTPRINT without daemon: {} self-serving rproxy processes on port {p3}: PSS {:?} kB, \
             threads {:?}",
            solo.len(),
            solo.iter().map(|s| s.0).collect::<Vec<_>>(),
            solo.iter().map(|s| s.1).collect::<Vec<_>>()
        );
    }
    h.step(&format!("{n} shims, 1 thread each"));
}

/// (h) A new daemon takes over (`rproxy daemon --takeover`), then the daemon restarts
/// (SIGTERM, a new start): after each, dockerd's ports answer through the daemon (its
/// counters), `rproxy ls` lists every mapping under the serving pid, and dockerd's processes
/// are the same single-threaded shims (a takeover moves their registrations; after the
/// restart they served their ports themselves, then handed them back and started over).
fn dockerds_ports_go_through_a_takeover_and_a_restart(h: &mut Harness, handed: &HandedOver) {
    let shims = |h: &Harness| -> BTreeSet<i32> {
        h.rproxies_on(&handed.ports())
            .iter()
            .map(|p| p.pid)
            .collect()
    };
    let before = shims(h);
    let listed = |h: &Harness, pid: i32| {
        let rows = h.rproxy_ls();
        let got: BTreeSet<(String, String, String)> = rows
            .iter()
            .map(|r| (r.proto.clone(), r.listen.clone(), r.target.clone()))
            .collect();
        got == handed.want && rows.iter().all(|r| r.pid == pid as u32)
    };
    let one_thread = |h: &Harness| {
        for pid in shims(h) {
            assert_eq!(proc_threads(pid), Some(1), "shim {pid}\n{}", h.diag());
        }
    };

    let mut old = h.rproxy_daemon.take().expect("the daemon");
    h.take_over_rproxy_daemon();
    let status = poll(Duration::from_secs(10), || {
        old.try_wait().unwrap().ok_or(())
    });
    assert!(
        matches!(status, Ok(s) if s.success()),
        "the old daemon did not exit 0 after the takeover: {status:?}\n{}",
        h.diag()
    );
    let new = h.rproxy_daemon_pid().unwrap();
    assert!(listed(h, new), "{:#?}\n{}", h.rproxy_ls(), h.diag());
    h.step(&format!("pid {new} took over from pid {}", old.id()));
    the_daemon_carries_the_traffic_of_handed_over_ports(h, handed);
    assert_eq!(shims(h), before, "the shims changed in the takeover");
    one_thread(h);
    assert!(
        !h.rproxy_log().contains("daemon went away"),
        "a shim noticed the takeover:\n{}",
        h.rproxy_log()
    );

    let status = h.stop_rproxy_daemon();
    assert!(matches!(status, Some(s) if s.success()), "{status:?}");
    let (r0, pu) = (handed.range[0], handed.udp_port);
    h.get_pages(
        &[SocketAddr::from((Ipv4Addr::LOCALHOST, r0))],
        " (the shim, daemon stopped)",
    );
    udp_check(SocketAddr::from((Ipv4Addr::LOCALHOST, pu)), h);
    h.start_rproxy_daemon();
    let next = h.rproxy_daemon_pid().unwrap();
    poll(Duration::from_secs(15), || {
        listed(h, next).then_some(()).ok_or(())
    })
    .unwrap_or_else(|()| panic!("the shims did not come back\n{}", h.diag()));
    // Each shim finishes its own connections, then starts over (a second or so).
    poll(Duration::from_secs(15), || {
        shims(h)
            .iter()
            .all(|p| proc_threads(*p) == Some(1))
            .then_some(())
            .ok_or(())
    })
    .unwrap_or_else(|()| panic!("shims still serving themselves\n{}", h.diag()));
    h.step("daemon restarted: the shims handed their ports back");
    the_daemon_carries_the_traffic_of_handed_over_ports(h, handed);
    assert_eq!(shims(h), before, "the shims changed in the restart");
    one_thread(h);
}

/// (h) `docker rm -f`: dockerd SIGINTs the shims, the daemon drops every mapping (and logs it),
/// the ports come free.
fn docker_rm_f_drops_every_handed_over_mapping(h: &Harness, handed: HandedOver) {
    let ports = handed.ports();
    let (range, pu) = (&handed.range, handed.udp_port);
    let removing = Instant::now();
    h.docker_ok(&["rm", "-f", handed.name]);
    h.wait_none(
        Duration::from_secs(10),
        "rproxy ls still lists mappings 10 s after docker rm -f",
        || h.rproxy_ls(),
    );
    h.wait_none(
        Duration::from_secs(10),
        "shims still alive 10 s after docker rm -f",
        || h.rproxies_on(&ports),
    );
    h.wait_none(
        Duration::from_secs(10),
        "ports still busy after docker rm -f",
        || {
            let mut busy = Vec::new();
            let mut unspecified = vec![IpAddr::from(Ipv4Addr::UNSPECIFIED)];
            if h.ipv6 {
                unspecified.push(IpAddr::from(Ipv6Addr::UNSPECIFIED));
            }
            for ip in &unspecified {
                for &p in range {
                    if let Err(e) = TcpListener::bind(SocketAddr::new(*ip, p)) {
                        busy.push(format!("tcp {ip} {p}: {e}"));
                    }
                }
                if let Err(e) = UdpSocket::bind(SocketAddr::new(*ip, pu)) {
                    busy.push(format!("udp {ip} {pu}: {e}"));
                }
            }
            busy
        },
    );
    let r0 = range[0];
    let dlog = h.daemon_log();
    assert!(
        log_has(
            &dlog,
            &["stopped", &format!("tcp 0.0.0.0:{r0} ->"), "(shim)"]
        ),
        "daemon.log does not show the mapping of 0.0.0.0:{r0} ending:\n{dlog}"
    );
    h.step(&format!(
        "docker rm -f: mappings, shims and ports gone after {:.1}s",
        removing.elapsed().as_secs_f64()
    ));
}

/// (h) The daemon outlives its shims; SIGTERM (by PID) stops it at once with nothing to drain:
/// exit status 0, control socket removed.
fn the_daemon_exits_0_on_sigterm_with_nothing_to_drain(h: &mut Harness) {
    let status = h.stop_rproxy_daemon();
    assert!(
        matches!(status, Some(s) if s.success()),
        "rproxy daemon did not exit 0 on SIGTERM within 5 s: {status:?}\n{}",
        h.diag()
    );
    assert!(
        !h.rproxy_sock.exists(),
        "the daemon left its control socket behind"
    );
    h.step("rproxy daemon stopped");
}

/// (g) dockerd shutdown with a running container (`udp`) leaves no rproxy behind: dockerd
/// stops the container and SIGINTs its proxies on the way out, waiting for them without a
/// timeout (a proxy that ignored SIGINT would hang the shutdown). Stops containerd too: the
/// harness is done.
fn dockerd_shutdown_with_a_running_container_leaves_no_rproxy(h: &mut Harness, udp: UdpEcho) {
    let graceful = h.stop_daemons();
    assert!(
        graceful,
        "dockerd did not shut down within 20 s of SIGTERM (killed)\n{}",
        h.diag()
    );
    h.wait_none(
        Duration::from_secs(5),
        "rproxy processes outlived dockerd",
        || h.rproxies_on(&h.ports),
    );
    h.step(&format!(
        "daemon shutdown: no rproxy left ({} was running)",
        udp.name
    ));
}

/// (i) With dockerd --iptables=false, rproxy owns NAT (RPROXY_NAT=on): the proxy for `pn`
/// installs a DNAT to the container in a table of its own, the host reaching its bridge address
/// goes through it (the rule counts the connection) while loopback is served by the listener,
/// and `docker rm -f` removes the table.
fn rproxy_installs_and_removes_its_own_dnat_rules(h: &Harness, name: &str, pn: u16) {
    h.docker_ok(&web_run(name, &[&format!("{pn}:80")]));
    let net = h.container_net(name);
    let owner = h
        .rproxies_on(&[pn])
        .into_iter()
        .find(|p| p.host_ip == "0.0.0.0")
        .unwrap_or_else(|| panic!("no rproxy for 0.0.0.0:{pn}\n{}", h.diag()));
    let table = format!("rproxy-{}", owner.pid);
    let rules = || nft(&format!("list table inet {table}"));
    let listed = rules();
    assert!(
        listed.contains(&format!("dnat ip to {}:80", net.ip)),
        "no DNAT to the container in {table}:\n{listed}\n{}",
        h.diag()
    );
    // The host reaching its bridge address: the output chain translates it (the counter
    // moves), while loopback is served by the listener.
    h.get_pages(&[SocketAddr::new(net.gateway, pn)], " (kernel NAT)");
    let after = rules();
    assert!(
        after.contains("counter packets 1 "),
        "the output rule did not count the connection:\n{after}"
    );
    h.get_pages(
        &[SocketAddr::from((Ipv4Addr::LOCALHOST, pn))],
        " (userland, loopback)",
    );
    h.docker_ok(&["rm", "-f", name]);
    h.wait_none(
        Duration::from_secs(10),
        "rproxy tables left after docker rm -f",
        || {
            nft_tables()
                .lines()
                .filter(|l| l.contains("rproxy"))
                .map(str::to_string)
                .collect()
        },
    );
    h.step("dockerd --iptables=false: rproxy installed and removed its DNAT rules");
}

/// `docker run -p 127.0.0.1:P1:80 -p P2:80` with the daemon's socket hooks on: curl-like
/// clients on loopback and on a host address (the bridge gateway) get the page with no
/// connection through the listeners; `docker rm -f` takes the entries away and the loopback
/// port then refuses.
fn host_clients_reach_the_container_through_the_socket_hooks(
    h: &Harness,
    name: &str,
    ports: &[u16],
) {
    let (p1, p2) = (ports[0], ports[1]);
    h.docker_ok(&web_run(
        name,
        &[&format!("127.0.0.1:{p1}:80"), &format!("{p2}:80")],
    ));
    let net = h.container_net(name);
    let expect = [format!("127.0.0.1:{p1}"), format!("0.0.0.0:{p2}")];
    let handed = poll(Duration::from_secs(10), || {
        let rows = h.rproxy_ls();
        expect
            .iter()
            .all(|e| rows.iter().any(|r| &r.listen == e))
            .then_some(rows)
            .ok_or(())
    })
    .unwrap_or_else(|()| panic!("the shims did not hand {expect:?} over\n{}", h.diag()));
    for r in handed.iter().filter(|r| expect.contains(&r.listen)) {
        assert_eq!(r.socket, "socket", "{r:?}\n{}", h.diag());
        // The daemon follows dockerd too (--docker-ports): the shims' registrations win.
        assert_eq!(r.origin, "shim", "{r:?}\n{}", h.diag());
    }
    let mut targets = vec![
        SocketAddr::from((Ipv4Addr::LOCALHOST, p1)),
        SocketAddr::from((Ipv4Addr::LOCALHOST, p2)),
        SocketAddr::new(net.gateway, p2),
    ];
    // dockerd's `::` proxy of the IPv4 container: [::1] (what `curl localhost` tries first)
    // goes 6→4 through the hooks too.
    let v6 = format!("[::]:{p2}");
    let mut expect = expect.to_vec();
    if handed.iter().any(|r| r.listen == v6) {
        targets.push(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, p2)));
        expect.push(v6);
    }
    h.get_pages(&targets, " (socket hooks)");
    let rows = h.rproxy_ls();
    let mine: Vec<&LsRow> = rows.iter().filter(|r| expect.contains(&r.listen)).collect();
    for r in &mine {
        assert_eq!(r.total, 0, "through the listener: {r:?}\n{}", h.diag());
    }
    let redirected: u64 = mine.iter().map(|r| r.socket_conns).sum();
    assert!(
        redirected >= targets.len() as u64,
        "the hooks counted {redirected} connections: {mine:?}"
    );
    h.step(&format!(
        "{redirected} host connections went straight to {}",
        net.ip
    ));
    h.docker_ok(&["rm", "-f", name]);
    h.wait_none(
        Duration::from_secs(10),
        "mappings left after docker rm -f",
        || {
            h.rproxy_ls()
                .into_iter()
                .filter(|r| expect.contains(&r.listen))
                .collect()
        },
    );
    let refused = matches!(
        TcpStream::connect_timeout(&targets[0], Duration::from_secs(3)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    );
    assert!(refused, "127.0.0.1:{p1} still answers after docker rm -f");
    h.step("docker rm -f took the hooks' entries away");
}

/// Hairpin with the socket hooks (the daemon follows dockerd's API): a container on the
/// target's own network with icc on reaches the published port through its gateway straight
/// — the target sees the client container's address, no listener connection — while on a
/// network with icc off the listener serves it as before (the target sees the gateway). A
/// container's own loopback stays its own.
fn hairpin_is_direct_only_on_the_targets_network_with_icc(h: &Harness, p_icc: u16, p_off: u16) {
    struct Net {
        name: &'static str,
        port: u16,
        client: String,
        web: String,
    }
    // icc off first: whatever dockerd state the daemon learns when icc's pair appears, it
    // has seen this network too.
    let nets = [
        ("rproxy-test-noicc", false, p_off),
        ("rproxy-test-icc", true, p_icc),
    ]
    .map(|(name, icc, port)| {
        let (client, web) = (format!("{name}-client"), format!("{name}-web"));
        let words = |line: String| h.docker_ok(&line.split(' ').collect::<Vec<_>>());
        // The icc network with IPv6 too (dockerd runs with --ipv6 where the host has it).
        let v6 = match (icc, h.ipv6) {
            (true, true) => " --ipv6 --subnet fd7e:77::/64",
            _ => "",
        };
        words(format!(
            "network create --opt com.docker.network.bridge.enable_icc={icc}{v6} {name}"
        ));
        words(format!(
            "run -d --name {client} --network {name} {IMAGE} sleep 3600"
        ));
        // httpd -vv logs each client's address: what the target sees.
        words(format!(
            "run -d --name {web} --network {name} -p {port}:80 {IMAGE} httpd -f -vv -p 80 -h /www"
        ));
        Net {
            name,
            port,
            client,
            web,
        }
    });
    let addr = |container: &str| -> (IpAddr, IpAddr) {
        let text = h.docker_ok(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{.Gateway}}{{end}}",
            container,
        ]);
        let mut f = text.split_whitespace().map(|s| s.parse::<IpAddr>());
        match (f.next(), f.next()) {
            (Some(Ok(ip)), Some(Ok(gw))) => (ip, gw),
            _ => panic!("{container}: no address in {text:?}"),
        }
    };
    let row_at = |listen: &str| {
        let listen = listen.to_string();
        h.rproxy_ls()
            .into_iter()
            .find(|r| r.listen == listen)
            .unwrap_or_else(|| panic!("{listen} not handed over\n{}", h.diag()))
    };
    let row = |port: u16| row_at(&format!("0.0.0.0:{port}"));
    let fetch = |net: &Net, host: IpAddr| {
        let script = format!(
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {host} {}",
            net.port
        );
        let out = h.docker(&["exec", &net.client, "sh", "-c", &script]);
        assert!(
            out.status.success() && out.stdout.contains(h.page.trim_end()),
            "{} -> {host}:{}: {out}\n{}",
            net.client,
            net.port,
            h.diag()
        );
    };
    let [off, icc] = &nets;
    // httpd logs each client to stderr (`docker logs` replays it apart), as
    // `[::ffff:a.b.c.d]:port: url:/`.
    let saw = |log: &str, ip: IpAddr| log.contains(&format!("[::ffff:{ip}]:"));
    let (icc_client, icc_gw) = addr(&icc.client);
    let (off_client, off_gw) = addr(&off.client);
    poll(Duration::from_secs(10), || {
        h.rproxy_ls()
            .iter()
            .filter(|r| {
                r.listen == format!("0.0.0.0:{}", icc.port)
                    || r.listen == format!("0.0.0.0:{}", off.port)
            })
            .count()
            .eq(&2)
            .then_some(())
            .ok_or(())
    })
    .unwrap_or_else(|()| panic!("the hairpin ports were not handed over\n{}", h.diag()));

    // icc on: once the daemon has read dockerd's new state, straight to the target.
    poll(Duration::from_secs(15), || {
        fetch(icc, icc_gw);
        (row(icc.port).socket_conns > 0).then_some(()).ok_or(())
    })
    .unwrap_or_else(|()| panic!("no hairpin connection went straight\n{}", h.diag()));
    let before = row(icc.port);
    for _ in 0..3 {
        fetch(icc, icc_gw);
    }
    let after = row(icc.port);
    assert_eq!(after.total, before.total, "through the listener: {after:?}");
    assert_eq!(after.socket_conns, before.socket_conns + 3, "{after:?}");
    let seen = h.docker(&["logs", &icc.web]).stderr;
    assert!(
        saw(&seen, icc_client),
        "{} did not see {icc_client} as the client: {seen}",
        icc.web
    );
    h.step(&format!(
        "{}: hairpin from {icc_client} went straight to the target",
        icc.name
    ));

    // The same over IPv6: the container dials its network's IPv6 gateway, dockerd's `::`
    // proxy's port, and reaches the target's IPv6 address straight.
    if h.ipv6 {
        let text = h.docker_ok(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.GlobalIPv6Address}} {{.IPv6Gateway}}{{end}}",
            &icc.client,
        ]);
        let mut f = text.split_whitespace().map(|s| s.parse::<IpAddr>());
        let (client6, gw6) = match (f.next(), f.next()) {
            (Some(Ok(ip)), Some(Ok(gw))) => (ip, gw),
            _ => panic!("{}: no IPv6 address in {text:?}", icc.client),
        };
        let listen6 = format!("[::]:{}", icc.port);
        let before = row_at(&listen6);
        for _ in 0..3 {
            fetch(icc, gw6);
        }
        let after = row_at(&listen6);
        assert_eq!(after.total, before.total, "through the listener: {after:?}");
        assert_eq!(after.socket_conns, before.socket_conns + 3, "{after:?}");
        let seen = h.docker(&["logs", &icc.web]).stderr;
        assert!(
            seen.contains(&format!("[{client6}]:")),
            "{} did not see {client6} as the client: {seen}",
            icc.web
        );
        h.step(&format!(
            "{}: IPv6 hairpin from {client6} went straight to {}",
            icc.name, after.target
        ));
    }

    // The container's own loopback is its own: refused there, nothing counted.
    let own = h.docker(&[
        "exec",
        &icc.client,
        "sh",
        "-c",
        &format!("echo x | nc -w 2 127.0.0.1 {}", icc.port),
    ]);
    assert!(
        !own.status.success(),
        "127.0.0.1 in the container answered: {own}"
    );
    assert_eq!(row(icc.port).socket_conns, after.socket_conns);

    // icc off: the listener, as dockerd's proxy would.
    let before = row(off.port);
    for _ in 0..3 {
        fetch(off, off_gw);
    }
    let after = row(off.port);
    assert_eq!(after.total, before.total + 3, "{after:?}");
    assert_eq!(after.socket_conns, before.socket_conns, "{after:?}");
    let seen = h.docker(&["logs", &off.web]).stderr;
    assert!(
        saw(&seen, off_gw) && !saw(&seen, off_client),
        "{} should see only the gateway {off_gw}: {seen}",
        off.web
    );
    h.step(&format!("{}: hairpin stayed on the listener", off.name));

    for n in &nets {
        h.docker_ok(&["rm", "-f", &n.client, &n.web]);
        h.docker_ok(&["network", "rm", n.name]);
    }
}

/// SIGKILL of the daemon: no program stays attached (the links died with it) and the shims
/// serve their ports themselves.
fn the_shims_serve_on_when_the_daemon_is_killed(h: &mut Harness, name: &str, port: u16) {
    h.docker_ok(&web_run(name, &[&format!("{port}:80")]));
    let listen = format!("0.0.0.0:{port}");
    poll(Duration::from_secs(10), || {
        h.rproxy_ls()
            .iter()
            .any(|r| r.listen == listen)
            .then_some(())
            .ok_or(())
    })
    .unwrap_or_else(|()| panic!("{listen} not handed over\n{}", h.diag()));
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    h.get_pages(&[loopback], " (socket hooks)");
    h.kill_rproxy_daemon();
    h.get_pages(&[loopback], " (the shim, after the daemon's SIGKILL)");
    h.docker_ok(&["rm", "-f", name]);
    h.step("daemon killed: nothing attached, the shims served on");
}

/// rproxy's programs in effect at the cgroup v2 root, as bpftool lists them: (id, name).
fn attached_programs() -> Vec<(u64, String)> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let Some(root) = info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let f: Vec<&str> = left.split_whitespace().collect();
        (right.starts_with("cgroup2 ") && f.get(3) == Some(&"/")).then(|| f[4].to_string())
    }) else {
        return Vec::new();
    };
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show", &root])
        .output();
    let Ok(out) = out else { return Vec::new() };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_string())))
        .filter(|(_, n)| n.starts_with("rpx_"))
        .collect()
}

/// `docker run -d --name NAME -p P… IMAGE httpd -f -p 80 -h /www`: the test page on port 80,
/// published as `publish` says.
fn web_run<'a>(name: &'a str, publish: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run", "-d", "--name", name];
    for p in publish {
        args.extend(["-p", p]);
    }
    args.extend([IMAGE, "httpd", "-f", "-p", "80", "-h", "/www"]);
    args
}

/// `nft list tables` on this host.
fn nft_tables() -> String {
    nft("list tables")
}

/// The rproxy tables of this host's ruleset, as `nft` prints them.
fn rproxy_rulesets() -> String {
    nft("list ruleset")
        .split("\ntable ")
        .filter(|t| t.trim_start_matches("table ").starts_with("inet rproxy"))
        .collect::<Vec<_>>()
        .join("\ntable ")
}

fn nft(args: &str) -> String {
    let out = Command::new("nft")
        .args(args.split(' '))
        .output()
        .expect("run nft");
    assert!(
        out.status.success(),
        "nft {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ================================================================================================
// Preflight

struct Tools {
    dockerd: PathBuf,
    containerd: PathBuf,
    docker: PathBuf,
    busybox: PathBuf,
    rustc: PathBuf,
    /// The machine-wide lock, taken by preflight and held by the Harness (which owns these
    /// Tools) for its whole lifetime: fields drop after Drop::drop, so it is released only
    /// once dockerd and containerd are stopped and the host state is put back.
    machine_lock: Flock<File>,
}

fn skip(why: &str) -> Option<Tools> {
    common::skip("real-dockerd test", why);
    None
}

fn preflight() -> Option<Tools> {
    if !nix::unistd::geteuid().is_root() {
        return skip("not root (dockerd needs root)");
    }
    let Some(dockerd) = find_exe("dockerd", &["/usr/bin/dockerd", "/usr/sbin/dockerd"]) else {
        return skip("dockerd not found (run .ci/install-deps)");
    };
    let Some(containerd) = find_exe("containerd", &["/usr/bin/containerd"]) else {
        return skip("containerd not found (run .ci/install-deps)");
    };
    // /usr/local/bin/docker may be an unrelated newer CLI; prefer the distribution's one.
    let Some(docker) = find_exe("docker", &["/usr/bin/docker"]) else {
        return skip("docker CLI not found (run .ci/install-deps)");
    };
    if find_exe("iptables", &["/usr/sbin/iptables", "/sbin/iptables"]).is_none() {
        return skip("iptables not found (dockerd needs it; run .ci/install-deps)");
    }
    if find_exe("tar", &["/bin/tar", "/usr/bin/tar"]).is_none() {
        return skip("tar not found (needed to build the test image)");
    }
    let Some(busybox) = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
    else {
        return skip("busybox not found (install busybox-static)");
    };
    if elf_has_interpreter(&busybox) {
        return skip(&format!(
            "{} is dynamically linked; the image needs busybox-static",
            busybox.display()
        ));
    }
    // Before looking for another dockerd: a concurrent real-dockerd test (the other one in this
    // file, or a run from another checkout) waits here for the holder to finish (and stop its
    // dockerd) instead of finding that dockerd and skipping.
    let machine_lock = machine_lock();
    if let Some(pid) = processes_named("dockerd").first() {
        return skip(&format!(
            "another dockerd (pid {pid}) is running; two dockerds fight over docker0 and iptables"
        ));
    }
    let rustc = std::env::var_os("RUSTC")
        .map(PathBuf::from)
        .or_else(|| {
            let cargo = PathBuf::from(std::env::var_os("CARGO")?);
            let sibling = cargo.with_file_name("rustc");
            sibling.is_file().then_some(sibling)
        })
        .or_else(|| find_exe("rustc", &[]));
    let Some(rustc) = rustc else {
        return skip("rustc not found (needed to compile tests/support/udp_echo.rs)");
    };
    Some(Tools {
        dockerd,
        containerd,
        docker,
        busybox,
        rustc,
        machine_lock,
    })
}

/// Takes the machine-wide lock (see MACHINE_LOCK), waiting up to LOCK_PATIENCE for another
/// real-dockerd test (this file's other test, or one run from another worktree or checkout of
/// this repository) to release it.
fn machine_lock() -> Flock<File> {
    let path = Path::new(MACHINE_LOCK);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    }
    // std opens it close-on-exec: containerd, dockerd and the proxies never inherit the lock.
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open the machine-wide lock {MACHINE_LOCK}: {e}"));
    let asked = Instant::now();
    let mut told = false;
    let mut lock = loop {
        // Non-blocking and polled, so a run that never ends fails this one instead of hanging it.
        file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => break lock,
            Err((file, Errno::EWOULDBLOCK | Errno::EINTR)) => file,
            Err((_, e)) => panic!("flock {MACHINE_LOCK}: {e}"),
        };
        let holder = || {
            let text = fs::read_to_string(path).unwrap_or_default();
            match text.trim() {
                // It has just taken the lock and not yet written who it is.
                "" => "not named yet".to_string(),
                named => named.replace('\n', ", "),
            }
        };
        if !told {
            eprintln!(
                "waiting for {MACHINE_LOCK}: another real-dockerd test holds it ({})",
                holder()
            );
            told = true;
        }
        if asked.elapsed() > LOCK_PATIENCE {
            panic!(
                "{MACHINE_LOCK} still held after {LOCK_PATIENCE:?} ({})",
                holder()
            );
        }
        sleep(Duration::from_millis(200));
    };
    if told {
        eprintln!(
            "took {MACHINE_LOCK} after {:.1}s",
            asked.elapsed().as_secs_f64()
        );
    }
    // Who holds it, for the message of whoever waits next.
    let me = format!(
        "pid {}, {}\n",
        std::process::id(),
        std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    let _ = lock.set_len(0).and_then(|()| lock.write_all(me.as_bytes()));
    lock
}

fn find_exe(name: &str, preferred: &[&str]) -> Option<PathBuf> {
    let is_exe = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    preferred
        .iter()
        .map(PathBuf::from)
        .find(|p| is_exe(p))
        .or_else(|| {
            std::env::split_paths(&search_path())
                .map(|d| d.join(name))
                .find(|p| is_exe(p))
        })
}

/// PATH with the sbin directories added (iptables lives there; cargo's PATH may lack them).
fn search_path() -> String {
    let mut path = std::env::var("PATH").unwrap_or_default();
    for dir in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        if !path.split(':').any(|d| d == dir) {
            if !path.is_empty() {
                path.push(':');
            }
            path.push_str(dir);
        }
    }
    path
}

/// True when the ELF file has a PT_INTERP segment (is dynamically linked).
fn elf_has_interpreter(path: &Path) -> bool {
    let Ok(data) = fs::read(path) else {
        return false;
    };
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        return false; // not a 64-bit little-endian ELF: let the container run decide
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(data[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        o + 4 <= data.len() && u32::from_le_bytes(data[o..o + 4].try_into().unwrap()) == 3
    })
}

// ================================================================================================
// The harness: private containerd + dockerd, cleaned up in Drop

struct Harness {
    tools: Tools,
    started: Instant,
    dir: PathBuf,
    sock: PathBuf,
    /// The exact argv[0] dockerd gives rproxy.
    rproxy_arg: String,
    ipv6: bool,
    page: String,
    ports: Vec<u16>,
    containerd: Option<Child>,
    dockerd: Option<Child>,
    /// dockerd's RPROXY_SOCKET: where our `rproxy daemon` listens during (h), and nothing else.
    rproxy_sock: PathBuf,
    /// Our `rproxy daemon` (scenario h only).
    rproxy_daemon: Option<Child>,
    /// The flags it was last started with (a restart or takeover uses them again).
    daemon_flags: Vec<String>,
    /// Its config file's text (kept for restarts too).
    daemon_config: String,
    /// dockerd's own flags (beside the fixed ones), for a restart.
    dockerd_flags: Vec<String>,
    /// Host state dockerd changes and we put back: FORWARD policy and forwarding sysctls.
    forward_policy: [Option<String>; 2],
    sysctls: Vec<(PathBuf, String)>,
    /// Socket programs attached before the test began (another rproxy on this machine): not
    /// ours to wait for.
    foreign_programs: Vec<u64>,
}

/// One row of `rproxy ls`.
#[derive(Debug, Clone)]
#[allow(dead_code)] // active and failed are read through Debug in failure messages
struct LsRow {
    proto: String,
    listen: String,
    target: String,
    origin: String,
    state: String,
    active: u64,
    total: u64,
    failed: u64,
    bytes_in: u64,
    bytes_out: u64,
    nat: String,
    kernel: u64,
    socket: String,
    socket_conns: u64,
    /// The process serving it.
    pid: u32,
    /// The container whose published port it is (`--docker-ports`), else "-".
    container: String,
}

#[derive(Debug, Clone, Copy)]
struct ContainerNet {
    ip: IpAddr,
    gateway: IpAddr,
    ipv6: Option<IpAddr>,
    ipv6_gateway: Option<IpAddr>,
}

impl Harness {
    /// containerd and a dockerd with `dockerd_flags` (beside the fixed ones, see start_dockerd).
    fn start(tools: Tools, dockerd_flags: &[&str]) -> Harness {
        let started = Instant::now();
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        // Short path: unix socket paths are limited to 108 bytes.
        let dir =
            std::env::temp_dir().join(format!("rpdk-{}-{}", std::process::id(), stamp % 1_000_000));
        fs::create_dir_all(&dir).unwrap();
        let rproxy = fs::canonicalize(env!("CARGO_BIN_EXE_rproxy")).unwrap();
        let ipv6 = Path::new("/proc/net/if_inet6").exists()
            && TcpListener::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, 0))).is_ok();
        if !ipv6 {
            eprintln!("note: no IPv6 loopback here; running dockerd without --ipv6, v6 checks off");
        }
        let forward_policy = [forward_policy("iptables"), forward_policy("ip6tables")];
        let sysctls = [
            "/proc/sys/net/ipv4/ip_forward",
            "/proc/sys/net/ipv6/conf/all/forwarding",
            "/proc/sys/net/ipv6/conf/default/forwarding",
        ]
        .iter()
        .filter_map(|p| {
            Some((
                PathBuf::from(p),
                fs::read_to_string(p).ok()?.trim().to_string(),
            ))
        })
        .collect();
        let mut h = Harness {
            tools,
            started,
            sock: dir.join("docker.sock"),
            rproxy_sock: dir.join("rproxy.sock"),
            dir,
            rproxy_arg: rproxy.to_str().unwrap().to_string(),
            ipv6,
            page: format!("rproxy dockerd test page {}-{stamp}\n", std::process::id()),
            ports: Vec::new(),
            containerd: None,
            dockerd: None,
            rproxy_daemon: None,
            daemon_flags: Vec::new(),
            daemon_config: "publish = []\n".into(),
            dockerd_flags: dockerd_flags.iter().map(|f| f.to_string()).collect(),
            forward_policy,
            sysctls,
            foreign_programs: attached_programs().into_iter().map(|(id, _)| id).collect(),
        };
        h.step(&format!("work dir {}", h.dir.display()));
        // For the message of a run that waits for the lock meanwhile: where our logs are.
        let _ = writeln!(&*h.tools.machine_lock, "work dir {}", h.dir.display());
        h.start_containerd();
        h.start_dockerd(&rproxy, dockerd_flags);
        h
    }

    /// `count` consecutive free ports (see free_run), none of them used by the test before,
    /// added to `ports` (so the cleanup kills any rproxy left on them).
    fn reserve_ports(&mut self, count: u16) -> Vec<u16> {
        let base = free_run(count, self.ipv6, &self.ports);
        let run: Vec<u16> = (base..base + count).collect();
        self.ports.extend(&run);
        run
    }

    /// The rproxy processes dockerd started (by their argv[0]) for any of the host `ports`.
    fn rproxies_on(&self, ports: &[u16]) -> Vec<ProxyProc> {
        proxy_processes()
            .into_iter()
            .filter(|p| {
                p.exe == self.rproxy_arg && ports.iter().any(|q| p.host_port == q.to_string())
            })
            .collect()
    }

    /// GET / from every address: each must answer with the container's page.
    fn get_pages(&self, targets: &[SocketAddr], tag: &str) {
        for addr in targets {
            let body = http_get(*addr, Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("GET http://{addr}/ failed: {e}\n{}", self.diag()));
            assert_eq!(
                body,
                self.page,
                "GET http://{addr}/ returned the wrong body\n{}",
                self.diag()
            );
            self.step(&format!("GET http://{addr}/ ok{tag}"));
        }
    }

    /// Polls `find` for up to `timeout` until it finds nothing left; else panics with `what`,
    /// what is left, and the diagnostics.
    fn wait_none<T: std::fmt::Debug>(
        &self,
        timeout: Duration,
        what: &str,
        mut find: impl FnMut() -> Vec<T>,
    ) {
        let result = poll(timeout, || {
            let left = find();
            left.is_empty().then_some(()).ok_or(left)
        });
        if let Err(left) = result {
            panic!("{what}: {left:#?}\n{}", self.diag());
        }
    }

    fn step(&self, what: &str) {
        eprintln!("[{:6.1}s] {what}", self.started.elapsed().as_secs_f64());
    }

    fn start_containerd(&mut self) {
        let d = &self.dir;
        let config = d.join("containerd.toml");
        // A config of our own so /etc/containerd/config.toml cannot interfere; CRI is not needed.
        fs::write(
            &config,
            format!(
                "version = 2\nroot = {:?}\nstate = {:?}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = {:?}\n[debug]\n  address = {:?}\n",
                d.join("ctd-root"),
                d.join("ctd-state"),
                d.join("ctd.sock"),
                d.join("ctd-debug.sock"),
            ),
        )
        .unwrap();
        let log = File::create(d.join("containerd.log")).unwrap();
        let mut cmd = dies_with_test(&self.tools.containerd);
        cmd.arg("--config")
            .arg(&config)
            .arg("--address")
            .arg(d.join("ctd.sock"))
            .arg("--root")
            .arg(d.join("ctd-root"))
            .arg("--state")
            .arg(d.join("ctd-state"))
            .env("PATH", search_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().expect("spawn containerd");
        self.step(&format!("containerd pid {}", child.id()));
        self.containerd = Some(child);
        let sock = d.join("ctd.sock");
        let ok = poll(Duration::from_secs(20), || {
            if let Some(status) = self.containerd.as_mut().unwrap().try_wait().unwrap() {
                return Ok(Err(status));
            }
            if sock.exists() {
                Ok(Ok(()))
            } else {
                Err(())
            }
        });
        match ok {
            Ok(Ok(())) => {}
            Ok(Err(status)) => panic!(
                "containerd exited ({status}):\n{}",
                tail(&d.join("containerd.log"), 30)
            ),
            Err(()) => panic!(
                "containerd socket did not appear in 20 s:\n{}",
                tail(&d.join("containerd.log"), 30)
            ),
        }
    }

    /// dockerd with `extra` flags; its proxies get `RPROXY_NAT=on`, so each scenario also shows
    /// how kernel NAT pairs with dockerd's own iptables rules.
    fn start_dockerd(&mut self, rproxy: &Path, extra: &[&str]) {
        let d = &self.dir;
        // Our own config file: the host's /etc/docker/daemon.json must not clash with our flags.
        // It names the one file dockerd 20.10 writes outside --data-root, its identity key
        // (by default /etc/docker/key.json, which would outlive the test); later engines keep
        // the key in the data root and ignore the setting.
        let config = format!(
            "{{ \"deprecated-key-path\": {:?} }}\n",
            d.join("key.json").to_str().unwrap()
        );
        fs::write(d.join("daemon.json"), config).unwrap();
        let log = File::create(d.join("dockerd.log")).unwrap();
        let mut cmd = dies_with_test(&self.tools.dockerd);
        cmd.arg("--config-file")
            .arg(d.join("daemon.json"))
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .arg(format!("--containerd={}", d.join("ctd.sock").display()))
            .arg(format!("--userland-proxy-path={}", rproxy.display()))
            .arg("--shutdown-timeout=2")
            .args(extra);
        if self.ipv6 {
            cmd.args(["--ipv6", "--fixed-cidr-v6", "fd00:dead:beef::/64"]);
        }
        cmd.env("PATH", search_path())
            .env("RPROXY_LOG", "info")
            .env("RPROXY_LOG_FILE", d.join("rproxy.log"))
            // Never the machine's daemon (/run/rproxy/rproxy.sock or the inherited variable):
            // only ours, and only once (h) starts it.
            .env("RPROXY_SOCKET", &self.rproxy_sock)
            .env("RPROXY_NAT", "on")
            .env_remove("RPROXY_HANDOFF")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("DOCKER_HOST")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().expect("spawn dockerd");
        self.step(&format!("dockerd pid {}", child.id()));
        self.dockerd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.dockerd.as_mut().unwrap().try_wait().unwrap() {
                panic!("dockerd exited early ({status}):\n{}", self.diag());
            }
            if self.sock.exists() {
                let out = self.docker_timeout(
                    &["info", "--format", "{{.ServerVersion}}"],
                    Duration::from_secs(10),
                );
                if out.status.success() {
                    self.step(&format!("dockerd {} ready", out.stdout.trim()));
                    self.dockerd_keeps_its_key_in_the_work_dir(out.stdout.trim());
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!("dockerd not ready after 60 s\n{}", self.diag());
            }
            sleep(Duration::from_millis(250));
        }
    }

    /// dockerd 20.10 writes its identity key at start: in the work dir, removed with it, and
    /// not in /etc/docker, where it would stay after the test. Later engines keep it under
    /// --data-root (inside the work dir too), so there is nothing to check there.
    fn dockerd_keeps_its_key_in_the_work_dir(&self, version: &str) {
        if !version.starts_with("20.") {
            return;
        }
        assert!(
            self.dir.join("key.json").exists(),
            "dockerd {version} wrote its key outside the work dir (/etc/docker/key.json?)"
        );
    }

    /// The image: static busybox + applets, /www/index.html, /udpecho.
    fn build_image(&mut self) {
        let root = self.dir.join("rootfs");
        for sub in ["bin", "www", "tmp", "etc"] {
            fs::create_dir_all(root.join(sub)).unwrap();
        }
        fs::copy(&self.tools.busybox, root.join("bin/busybox")).unwrap();
        for applet in APPLETS {
            symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        fs::write(root.join("www/index.html"), &self.page).unwrap();
        fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").unwrap();
        fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();

        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/udp_echo.rs");
        let out = run(
            Command::new(&self.tools.rustc)
                .args([
                    "-O",
                    "-C",
                    "target-feature=+crt-static",
                    "-C",
                    "strip=symbols",
                    "-o",
                ])
                .arg(root.join("udpecho"))
                .arg(src),
            Duration::from_secs(120),
            &self.dir,
        );
        assert!(out.status.success(), "rustc {src} failed: {out}");
        self.step("udpecho compiled");

        let tarball = self.dir.join("image.tar");
        let out = run(
            Command::new("tar")
                .env("PATH", search_path())
                .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
                .arg(&root)
                .arg("-cf")
                .arg(&tarball)
                .arg("."),
            Duration::from_secs(60),
            &self.dir,
        );
        assert!(out.status.success(), "tar failed: {out}");
        self.docker_ok(&["import", tarball.to_str().unwrap(), IMAGE]);
    }

    fn docker_cmd(&self) -> Command {
        let mut cmd = Command::new(&self.tools.docker);
        cmd.arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .env_remove("DOCKER_TLS_VERIFY")
            .env_remove("DOCKER_CERT_PATH");
        cmd
    }

    fn docker_timeout(&self, args: &[&str], timeout: Duration) -> Out {
        run(self.docker_cmd().args(args), timeout, &self.dir)
    }

    fn docker(&self, args: &[&str]) -> Out {
        self.docker_timeout(args, CLI_TIMEOUT)
    }

    fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed: {out}\n{}",
            self.diag()
        );
        out.stdout.trim().to_string()
    }

    fn container_net(&self, name: &str) -> ContainerNet {
        let text = self.docker_ok(&[
            "inspect",
            "-f",
            // Its one network's (the default bridge's, or a network of its own).
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{.Gateway}} \
             {{.GlobalIPv6Address}} {{.IPv6Gateway}}{{end}}",
            name,
        ]);
        let mut f = text.split_whitespace();
        let mut next = || f.next().and_then(|s| s.parse::<IpAddr>().ok());
        let ip = next().unwrap_or_else(|| panic!("no IPv4 address in {text:?}"));
        let gateway = next().unwrap_or_else(|| panic!("no IPv4 gateway in {text:?}"));
        let (ipv6, ipv6_gateway) = (next(), next());
        ContainerNet {
            ip,
            gateway,
            ipv6,
            ipv6_gateway,
        }
    }

    fn rproxy_log(&self) -> String {
        fs::read_to_string(self.dir.join("rproxy.log")).unwrap_or_default()
    }

    fn daemon_log(&self) -> String {
        fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Log tails for failure messages.
    fn diag(&self) -> String {
        let mut text = format!(
            "--- dockerd.log (tail) ---\n{}\n--- rproxy.log (tail) ---\n{}",
            tail(&self.dir.join("dockerd.log"), 25),
            tail(&self.dir.join("rproxy.log"), 25)
        );
        if self.dir.join("daemon.log").exists() {
            text.push_str(&format!(
                "\n--- daemon.log (tail) ---\n{}\n--- daemon.out (tail) ---\n{}",
                tail(&self.dir.join("daemon.log"), 25),
                tail(&self.dir.join("daemon.out"), 10)
            ));
        }
        text
    }

    /// Starts `rproxy daemon` on dockerd's RPROXY_SOCKET, with a config file of our own (so
    /// /etc/rproxy/rproxy.toml cannot add mappings), and waits until it is ready; with the
    /// flags it last had.
    fn start_rproxy_daemon(&mut self) {
        let flags = self.daemon_flags.clone();
        self.spawn_rproxy_daemon(&flags);
    }

    /// Our daemon, on dockerd's RPROXY_SOCKET, with `extra` flags (kept for restarts).
    fn start_rproxy_daemon_with(&mut self, extra: &[&str]) {
        self.daemon_flags = extra.iter().map(|f| f.to_string()).collect();
        self.start_rproxy_daemon();
    }

    /// A new daemon with the same flags and `--takeover`, taking over from ours (whose Child
    /// the caller took).
    fn take_over_rproxy_daemon(&mut self) {
        let mut flags = self.daemon_flags.clone();
        flags.push("--takeover".into());
        self.spawn_rproxy_daemon(&flags);
    }

    /// dockerd stopped (SIGTERM) and started again with the same flags.
    fn restart_dockerd(&mut self) {
        if let Some(mut dockerd) = self.dockerd.take() {
            assert!(
                stop_child(&mut dockerd, "dockerd", Duration::from_secs(20)),
                "dockerd did not stop\n{}",
                self.diag()
            );
        }
        self.step("dockerd stopped");
        let rproxy = PathBuf::from(&self.rproxy_arg);
        let flags = self.dockerd_flags.clone();
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        self.start_dockerd(&rproxy, &flags);
    }

    fn spawn_rproxy_daemon(&mut self, extra: &[String]) {
        let d = &self.dir;
        let config = d.join("rproxy.toml");
        fs::write(&config, &self.daemon_config).unwrap();
        let out = File::create(d.join("daemon.out")).unwrap();
        let mut cmd = dies_with_test(Path::new(&self.rproxy_arg));
        cmd.arg("daemon")
            .arg("--control-socket")
            .arg(&self.rproxy_sock)
            .arg("--config")
            .arg(&config)
            .args(["--drain-timeout", "2"])
            .args(extra)
            .env("RPROXY_LOG", "info")
            .env("RPROXY_LOG_FILE", d.join("daemon.log"))
            .env_remove("RPROXY_SOCKET")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        // The log file is appended to: earlier daemons' lines are in it.
        let earlier = self.daemon_log().matches("daemon ready").count();
        let child = cmd.spawn().expect("spawn rproxy daemon");
        self.step(&format!("rproxy daemon pid {}", child.id()));
        self.rproxy_daemon = Some(child);
        let ready = poll(Duration::from_secs(10), || {
            if let Some(status) = self.rproxy_daemon.as_mut().unwrap().try_wait().unwrap() {
                return Ok(Err(status));
            }
            if self.rproxy_sock.exists()
                && self.daemon_log().matches("daemon ready").count() > earlier
            {
                Ok(Ok(()))
            } else {
                Err(())
            }
        });
        match ready {
            Ok(Ok(())) => self.step("rproxy daemon ready"),
            Ok(Err(status)) => panic!("rproxy daemon exited ({status}):\n{}", self.diag()),
            Err(()) => panic!("rproxy daemon not ready after 10 s:\n{}", self.diag()),
        }
    }

    fn rproxy_daemon_pid(&self) -> Option<i32> {
        self.rproxy_daemon.as_ref().map(|c| c.id() as i32)
    }

    /// SIGTERM to our daemon's PID; its exit status, or None when it needed a SIGKILL (5 s).
    fn stop_rproxy_daemon(&mut self) -> Option<ExitStatus> {
        let mut child = self.rproxy_daemon.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let status = poll(Duration::from_secs(5), || match child.try_wait() {
            Ok(Some(status)) => Ok(status),
            _ => Err(()),
        });
        match status {
            Ok(status) => Some(status),
            Err(()) => {
                eprintln!(
                    "cleanup: rproxy daemon (pid {}) ignored SIGTERM for 5 s; SIGKILL",
                    child.id()
                );
                let _ = child.kill();
                let _ = child.wait();
                None
            }
        }
    }

    /// SIGKILL to our daemon's PID; waits for it, and for its socket programs to be gone (the
    /// BPF links die with it).
    fn kill_rproxy_daemon(&mut self) {
        let pid = self.rproxy_daemon_pid().expect("the daemon");
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        if let Some(mut child) = self.rproxy_daemon.take() {
            let _ = child.wait();
        }
        self.wait_none(
            Duration::from_secs(5),
            "socket programs left after SIGKILL",
            || self.our_programs(),
        );
    }

    /// The socket programs at the cgroup root that no other rproxy had attached before.
    fn our_programs(&self) -> Vec<String> {
        attached_programs()
            .into_iter()
            .filter(|(id, _)| !self.foreign_programs.contains(id))
            .map(|(_, name)| name)
            .collect()
    }

    /// `rproxy ls` against our daemon, parsed.
    fn rproxy_ls(&self) -> Vec<LsRow> {
        let out = run(
            Command::new(&self.rproxy_arg)
                .arg("ls")
                .arg("--control-socket")
                .arg(&self.rproxy_sock),
            Duration::from_secs(10),
            &self.dir,
        );
        assert!(
            out.status.success(),
            "rproxy ls failed: {out}\n{}",
            self.diag()
        );
        let mut lines = out.stdout.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        assert_eq!(
            header,
            [
                "PROTO",
                "LISTEN",
                "TARGET",
                "ORIGIN",
                "STATE",
                "ACTIVE",
                "TOTAL",
                "FAILED",
                "BYTES_IN",
                "BYTES_OUT",
                "NAT",
                "KERNEL_CONNS",
                "SOCKET",
                "SOCKET_CONNS",
                "PROXY_PROTOCOL",
                "PID",
                "CONTAINER",
                "ALLOW"
            ],
            "rproxy ls header: {out}"
        );
        lines
            .map(|l| {
                let c: Vec<&str> = l.split_whitespace().collect();
                assert_eq!(c.len(), 18, "rproxy ls row {l:?}");
                let num = |i: usize| -> u64 {
                    c[i].parse()
                        .unwrap_or_else(|_| panic!("rproxy ls row {l:?}: column {i}"))
                };
                LsRow {
                    proto: c[0].into(),
                    listen: c[1].into(),
                    target: c[2].into(),
                    origin: c[3].into(),
                    state: c[4].into(),
                    active: num(5),
                    total: num(6),
                    failed: num(7),
                    bytes_in: num(8),
                    bytes_out: num(9),
                    nat: c[10].into(),
                    kernel: num(11),
                    socket: c[12].into(),
                    socket_conns: num(13),
                    pid: num(15) as u32,
                    container: c[16].into(),
                }
            })
            .collect()
    }

    /// Stops dockerd, then containerd; true when dockerd exited on SIGTERM in time.
    fn stop_daemons(&mut self) -> bool {
        let mut graceful = true;
        if let Some(mut dockerd) = self.dockerd.take() {
            graceful = stop_child(&mut dockerd, "dockerd", Duration::from_secs(20));
            self.step("dockerd stopped");
        }
        if let Some(mut containerd) = self.containerd.take() {
            stop_child(&mut containerd, "containerd", Duration::from_secs(10));
            self.step("containerd stopped");
        }
        graceful
    }

    /// Failure-path cleanup: remove every container so dockerd's shutdown is quick.
    fn remove_containers(&self) {
        if self.dockerd.is_none() {
            return;
        }
        let ids = self.docker_timeout(&["ps", "-aq"], Duration::from_secs(15));
        let ids: Vec<&str> = ids.stdout.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids);
            let out = self.docker_timeout(&args, Duration::from_secs(30));
            if !out.status.success() {
                eprintln!("cleanup: docker rm -f failed: {out}");
            }
        }
        // Networks a scenario created: their bridges and rules would outlive dockerd.
        let _ = self.docker_timeout(&["network", "prune", "-f"], Duration::from_secs(30));
    }

    /// Kills what our containerd may have left (shims started with our socket path) and
    /// rproxy processes for our ports that outlived dockerd.
    fn kill_leftovers(&self) {
        let dir = self.dir.to_string_lossy().to_string();
        for (pid, argv) in all_processes() {
            let shim = argv.iter().any(|a| a.contains(&dir));
            let proxy = argv.first().map(String::as_str) == Some(self.rproxy_arg.as_str())
                && argv.windows(2).any(|w| {
                    w[0] == "-host-port" && self.ports.iter().any(|p| w[1] == p.to_string())
                });
            if (shim || proxy) && pid != std::process::id() as i32 {
                eprintln!("cleanup: killing leftover pid {pid}: {}", argv.join(" "));
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }

    fn unmount_all(&self) {
        let prefix = self.dir.to_string_lossy().to_string();
        let mut points: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(unescape_mount)
            .filter(|p| p.starts_with(&prefix))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        points.dedup();
        for p in points {
            if let Err(e) = nix::mount::umount2(p.as_str(), nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("cleanup: umount {p}: {e}");
            }
        }
    }

    fn restore_host_state(&self) {
        // dockerd --ip6tables sets ip6tables' policy too: left at DROP, it would drop the
        // IPv6 traffic of later bridges (br_netfilter) that no dockerd rule accepts.
        for (tool, orig) in ["iptables", "ip6tables"].iter().zip(&self.forward_policy) {
            let Some(orig) = orig else { continue };
            if forward_policy(tool).as_ref() != Some(orig) {
                let out = run(
                    Command::new(tool)
                        .env("PATH", search_path())
                        .args(["-P", "FORWARD", orig]),
                    Duration::from_secs(10),
                    &self.dir,
                );
                if !out.status.success() {
                    eprintln!("cleanup: {tool} -P FORWARD {orig}: {out}");
                }
            }
        }
        for (path, value) in &self.sysctls {
            if fs::read_to_string(path)
                .map(|v| v.trim() != value)
                .unwrap_or(false)
            {
                if let Err(e) = fs::write(path, value) {
                    eprintln!("cleanup: restore {}: {e}", path.display());
                }
            }
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "test failed (RPROXY_KEEP_DOCKERD_DIR=1 keeps the logs in {}):\n{}",
                self.dir.display(),
                self.diag()
            );
        }
        self.remove_containers();
        let _ = self.stop_daemons();
        // After dockerd: its shims are gone by now, so the daemon has nothing left to drain.
        if self.rproxy_daemon.is_some() {
            let status = self.stop_rproxy_daemon();
            self.step(&format!("rproxy daemon stopped ({status:?})"));
        }
        self.kill_leftovers();
        self.unmount_all();
        self.restore_host_state();
        // For debugging by hand: keep the logs (dockerd.log, rproxy.log, containerd.log).
        if std::env::var_os("RPROXY_KEEP_DOCKERD_DIR").is_some() {
            eprintln!("keeping {} (RPROXY_KEEP_DOCKERD_DIR)", self.dir.display());
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("cleanup: remove {}: {e}", self.dir.display());
        }
        self.step("cleaned up");
    }
}

/// A command for `exe` that gets SIGTERM if the test thread dies (util-linux `setpriv` sets
/// the parent-death signal and execs in place), so a killed test run leaves nothing behind.
fn dies_with_test(exe: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "TERM", "--"]).arg(exe);
    cmd
}

/// SIGTERM, then SIGKILL after `grace`; true when the child exited without the SIGKILL.
fn stop_child(child: &mut Child, name: &str, grace: Duration) -> bool {
    if let Ok(Some(_)) = child.try_wait() {
        return true;
    }
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        sleep(Duration::from_millis(50));
    }
    eprintln!(
        "cleanup: {name} (pid {}) ignored SIGTERM for {grace:?}; SIGKILL",
        child.id()
    );
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// The FORWARD chain's policy, as `tool` (iptables or ip6tables) shows it.
fn forward_policy(tool: &str) -> Option<String> {
    let out = Command::new(tool)
        .env("PATH", search_path())
        .args(["-S", "FORWARD"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("-P FORWARD "))
        .map(|p| p.trim().to_string())
}

fn unescape_mount(field: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let mut out = String::new();
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let oct: String = chars.by_ref().take(3).collect();
            if let Ok(b) = u8::from_str_radix(&oct, 8) {
                out.push(b as char);
                continue;
            }
            out.push('\\');
            out.push_str(&oct);
        } else {
            out.push(c);
        }
    }
    out
}

// ================================================================================================
// Running commands with a timeout

struct Out {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    what: String,
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` -> {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what, self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` with output captured in files under `scratch` (no pipe can fill up), killing it
/// and panicking if it takes longer than `timeout`.
fn run(cmd: &mut Command, timeout: Duration, scratch: &Path) -> Out {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let (out_path, err_path) = (
        scratch.join(format!("cmd{n}.out")),
        scratch.join(format!("cmd{n}.err")),
    );
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not finish within {timeout:?}; stderr so far:\n{}",
                fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        sleep(Duration::from_millis(20));
    };
    let read = |p: &Path| {
        let s = fs::read_to_string(p).unwrap_or_default();
        let _ = fs::remove_file(p);
        s
    };
    Out {
        status,
        stdout: read(&out_path),
        stderr: read(&err_path),
        what,
    }
}

/// Calls `f` until it returns Ok or `timeout` passes; returns the last result.
fn poll<T, E>(timeout: Duration, mut f: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let deadline = Instant::now() + timeout;
    loop {
        let r = f();
        if r.is_ok() || Instant::now() > deadline {
            return r;
        }
        sleep(Duration::from_millis(100));
    }
}

/// True when some line of `log` contains every one of `words`.
fn log_has(log: &str, words: &[&str]) -> bool {
    log.lines().any(|l| words.iter().all(|w| l.contains(w)))
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("({}: {e})", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ================================================================================================
// Processes

#[derive(Debug)]
#[allow(dead_code)] // pid is read through Debug in failure messages
struct ProxyProc {
    pid: i32,
    exe: String,
    proto: String,
    host_ip: String,
    host_port: String,
    container_ip: String,
    container_port: String,
}

fn all_processes() -> Vec<(i32, Vec<String>)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let argv: Vec<String> = raw
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        (!argv.is_empty()).then_some((pid, argv))
    })
    .collect()
}

/// Processes whose comm is `comm` (zombies have an empty cmdline, so all_processes skips them).
fn processes_named(comm: &str) -> Vec<i32> {
    all_processes()
        .into_iter()
        .filter(|(pid, _)| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim() == comm)
                .unwrap_or(false)
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// `Threads:` of /proc/PID/status.
fn proc_threads(pid: i32) -> Option<u32> {
    proc_field(pid, "status", "Threads:").and_then(|n| n.try_into().ok())
}

/// Proportional set size in kB (`Pss:` of /proc/PID/smaps_rollup).
fn proc_pss_kb(pid: i32) -> Option<u64> {
    proc_field(pid, "smaps_rollup", "Pss:")
}

/// The number after `key` in /proc/PID/FILE (a unit of kB dropped).
fn proc_field(pid: i32, file: &str, key: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Every process whose command line looks like a docker-proxy invocation (any binary).
fn proxy_processes() -> Vec<ProxyProc> {
    all_processes()
        .into_iter()
        .filter_map(|(pid, argv)| {
            let flag = |name: &str| argv.windows(2).find(|w| w[0] == name).map(|w| w[1].clone());
            Some(ProxyProc {
                pid,
                exe: argv[0].clone(),
                host_port: flag("-host-port")?,
                proto: flag("-proto")?,
                host_ip: flag("-host-ip").unwrap_or_default(),
                container_ip: flag("-container-ip").unwrap_or_default(),
                container_port: flag("-container-port").unwrap_or_default(),
            })
        })
        .collect()
}

// ================================================================================================
// Network helpers

/// True when `port` is free for TCP and UDP, on IPv4 and (if `ipv6`) IPv6.
fn port_free(port: u16, ipv6: bool) -> bool {
    let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    TcpListener::bind(v4).is_ok()
        && UdpSocket::bind(v4).is_ok()
        && (!ipv6 || (TcpListener::bind(v6).is_ok() && UdpSocket::bind(v6).is_ok()))
}

/// The first of `count` consecutive free ports (see port_free) from PORT_BASE up, none of them
/// in `avoid` (ports the test already uses, some of which may be free again by now).
fn free_run(count: u16, ipv6: bool, avoid: &[u16]) -> u16 {
    (PORT_BASE..PORT_LIMIT.saturating_sub(count))
        .find(|&base| (base..base + count).all(|p| !avoid.contains(&p) && port_free(p, ipv6)))
        .unwrap_or_else(|| panic!("no {count} consecutive free ports in {PORT_BASE}..{PORT_LIMIT}"))
}

/// `count` ports from PORT_BASE up that are free for TCP and UDP, on IPv4 and (if any) IPv6.
fn free_ports(count: usize, ipv6: bool) -> Vec<u16> {
    let ports: Vec<u16> = (PORT_BASE..PORT_LIMIT)
        .filter(|&p| port_free(p, ipv6))
        .take(count)
        .collect();
    assert_eq!(
        ports.len(),
        count,
        "not enough free ports in {PORT_BASE}..{PORT_LIMIT}"
    );
    ports
}

/// A plain HTTP/1.0 GET of `/` (no curl, so no proxy settings apply); retried until `patience`
/// runs out, because the container's httpd needs a moment after `docker run -d` returns.
fn http_get(addr: SocketAddr, patience: Duration) -> Result<String, String> {
    let once = || -> Result<String, String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\nHost: rproxy-test\r\n\r\n")
            .map_err(|e| format!("write: {e}"))?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).map_err(|e| format!("read: {e}"))?;
        let resp = String::from_utf8_lossy(&resp).into_owned();
        let (head, body) = resp
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("no HTTP response: {resp:?}"))?;
        if !head.starts_with("HTTP/1.") || !head.contains(" 200 ") {
            return Err(format!("not a 200: {head:?}"));
        }
        Ok(body.to_string())
    };
    poll(patience, once)
}

fn udp_check(addr: SocketAddr, h: &Harness) {
    let local: SocketAddr = if addr.is_ipv6() {
        (Ipv6Addr::LOCALHOST, 0).into()
    } else {
        (Ipv4Addr::LOCALHOST, 0).into()
    };
    let sock = UdpSocket::bind(local).unwrap();
    // Connected: replies must come from the address we sent to (the proxy's frontend).
    sock.connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let mut exchange = |payload: &[u8]| -> Result<(), String> {
        sock.send(payload).map_err(|e| format!("send: {e}"))?;
        // Skip stale echoes of earlier attempts.
        loop {
            let n = sock.recv(&mut buf).map_err(|e| format!("recv: {e}"))?;
            if &buf[..n] == payload {
                return Ok(());
            }
            if n == payload.len() {
                return Err(format!("echo of {} bytes corrupted", n));
            }
        }
    };
    // The first datagram waits for udpecho to be up (retried for up to 20 s).
    let first = poll(Duration::from_secs(20), || exchange(b"hello rproxy"));
    if let Err(e) = first {
        panic!("no UDP echo via {addr}: {e}\n{}", h.diag());
    }
    // Datagram boundaries are kept.
    for msg in [&b"a"[..], b"bb", b"ccc"] {
        let r = poll(Duration::from_secs(3), || exchange(msg));
        assert!(r.is_ok(), "UDP echo of {msg:?} via {addr}: {r:?}");
    }
    let big: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
    let r = poll(Duration::from_secs(5), || exchange(&big));
    assert!(
        r.is_ok(),
        "60,000-byte UDP datagram via {addr} not echoed intact: {r:?}\n{}",
        h.diag()
    );
}
