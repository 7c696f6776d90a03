//! UDP through the real binary: echo of the largest datagrams, flow expiry, LRU eviction, and
//! replies that leave from the address the client used on a multi-address host.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// A backend that echoes and tells the test which source address each datagram came from
/// (the proxy's per-flow socket), so tests can see flows come and go.
fn observed_echo(addr: &str, reply: bool) -> (SocketAddr, mpsc::Receiver<(Vec<u8>, SocketAddr)>) {
    let socket = UdpSocket::bind(addr).unwrap();
    let local = socket.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            if reply {
                let _ = socket.send_to(&buf[..n], from);
            }
            if tx.send((buf[..n].to_vec(), from)).is_err() {
                break;
            }
        }
    });
    (local, rx)
}

fn next_from(rx: &mpsc::Receiver<(Vec<u8>, SocketAddr)>, payload: &[u8]) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (data, from) = rx.recv_timeout(left).expect("backend saw nothing");
        if data == payload {
            return from;
        }
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn largest_datagrams_pass_intact() {
    let echo = udp_echo("127.0.0.1:0");
    let p = start("udp", "127.0.0.1", echo);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    for len in [0, 1, 1472, 9000, 65_507] {
        let data = pattern(len);
        let (reply, from) = udp_roundtrip(&client, p.addr(), &data);
        assert_eq!(reply.len(), len);
        assert!(reply == data, "{len}-byte datagram corrupted");
        assert_eq!(from, p.addr());
    }
    if !has_ipv6() {
        skip("IPv6 part", "no IPv6 loopback here");
        return;
    }
    // docker-proxy truncates IPv6 datagrams above 65,507 bytes; the IPv6 maximum is 65,527.
    let echo6 = udp_echo("[::1]:0");
    let p6 = start("udp", "::1", echo6);
    let client6 = UdpSocket::bind("[::1]:0").unwrap();
    for len in [65_508, 65_527] {
        let data = pattern(len);
        let (reply, _) = udp_roundtrip(&client6, p6.addr(), &data);
        assert_eq!(reply.len(), len, "IPv6 datagram of {len} bytes truncated");
        assert!(reply == data);
    }
}

/// Flows expire after RPROXY_UDP_TIMEOUT of silence in both directions (the backend then sees
/// a new source port), live on while either side keeps talking, even one-way.
#[test]
fn flows_expire_when_idle_only() {
    let (echo, seen) = observed_echo("127.0.0.1:0", true);
    let p = start_with("udp", "127.0.0.1", echo, &[("RPROXY_UDP_TIMEOUT", "1")]);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp_roundtrip(&client, p.addr(), b"first");
    let first = next_from(&seen, b"first");
    // Traffic every 400 ms for 2.5 s keeps the flow.
    for i in 0..6 {
        std::thread::sleep(Duration::from_millis(400));
        let msg = format!("keep {i}");
        udp_roundtrip(&client, p.addr(), msg.as_bytes());
        assert_eq!(
            next_from(&seen, msg.as_bytes()),
            first,
            "flow replaced while active"
        );
    }
    std::thread::sleep(Duration::from_millis(2500));
    udp_roundtrip(&client, p.addr(), b"after idle");
    let second = next_from(&seen, b"after idle");
    assert_ne!(
        second, first,
        "flow did not expire after 2.5 s of silence with a 1 s timeout"
    );

    // One-way traffic (the backend never answers) also keeps a flow alive: docker-proxy before
    // 28.0.2 tore such flows down every 90 s.
    let (sink, seen) = observed_echo("127.0.0.1:0", false);
    let p = start_with("udp", "127.0.0.1", sink, &[("RPROXY_UDP_TIMEOUT", "1")]);
    client.send_to(b"one-way 0", p.addr()).unwrap();
    let first = next_from(&seen, b"one-way 0");
    for i in 1..8 {
        std::thread::sleep(Duration::from_millis(400));
        let msg = format!("one-way {i}");
        client.send_to(msg.as_bytes(), p.addr()).unwrap();
        assert_eq!(
            next_from(&seen, msg.as_bytes()),
            first,
            "one-way flow expired while the client talked"
        );
    }
}

/// Past RPROXY_UDP_MAX_FLOWS the least recently used flow is evicted, and the proxy's
/// descriptors stay bounded however many clients come.
#[test]
fn flows_are_bounded_with_lru_eviction() {
    let (echo, seen) = observed_echo("127.0.0.1:0", true);
    let p = start_with("udp", "127.0.0.1", echo, &[("RPROXY_UDP_MAX_FLOWS", "2")]);
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    let send = |s: &UdpSocket, msg: &str| {
        udp_roundtrip(s, p.addr(), msg.as_bytes());
        let from = next_from(&seen, msg.as_bytes());
        std::thread::sleep(Duration::from_millis(20));
        from
    };
    let a1 = send(&a, "a1");
    let b1 = send(&b, "b1");
    assert_eq!(send(&a, "a2"), a1); // a is now more recent than b
    send(&c, "c1"); // the table is full: b, the least recent, goes
    assert_eq!(send(&a, "a3"), a1, "the recently used flow was evicted");
    assert_ne!(
        send(&b, "b2"),
        b1,
        "the least recently used flow was not evicted"
    );

    let p = start_with("udp", "127.0.0.1", echo, &[("RPROXY_UDP_MAX_FLOWS", "50")]);
    let clients: Vec<UdpSocket> = (0..300)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    for (i, s) in clients.iter().enumerate() {
        let (reply, _) = udp_roundtrip(s, p.addr(), format!("many {i}").as_bytes());
        assert_eq!(reply, format!("many {i}").as_bytes());
    }
    let fds = std::fs::read_dir(format!("/proc/{}/fd", p.child.id()))
        .unwrap()
        .count();
    assert!(fds < 50 + 20, "{fds} descriptors for a 50-flow limit");
}

/// A client that sent to one of several local addresses gets its replies from that address,
/// with the proxy listening on the wildcard (docker-proxy before 28 answered from whatever
/// address routing picked).
fn reply_source_check(host_ip: &str, client_ip: IpAddr, dests: &[IpAddr], echo_ip: &str) {
    let echo = udp_echo(&format!("{echo_ip}:0"));
    let p = start("udp", host_ip, echo);
    let port = p.addr().port();
    let client = UdpSocket::bind(SocketAddr::new(client_ip, 0)).unwrap();
    for &dest in dests {
        let to = SocketAddr::new(dest, port);
        let msg = format!("to {dest}");
        let (reply, from) = udp_roundtrip(&client, to, msg.as_bytes());
        assert_eq!(reply, msg.as_bytes());
        assert_eq!(
            from, to,
            "reply to a datagram sent to {to} came from {from}"
        );
    }
}

#[test]
fn reply_source_on_loopback_aliases() {
    // 127.0.0.0/8 is all local on Linux: a multi-address host without root.
    let ips: Vec<IpAddr> = ["127.0.0.2", "127.0.0.3"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    reply_source_check("0.0.0.0", "127.0.0.1".parse().unwrap(), &ips, "127.0.0.1");
}

#[test]
fn reply_source_in_a_namespace_with_two_addresses() {
    if !need_root("reply_source_in_a_namespace_with_two_addresses") {
        return;
    }
    let ns = Netns::new("udpsrc");
    sh(&format!(
        "ip -n {n} link add d0 type veth peer name d1 && ip -n {n} link set d0 up && \
         ip -n {n} link set d1 up && \
         ip -n {n} addr add 10.77.0.1/24 dev d0 && ip -n {n} addr add 10.77.0.2/24 dev d0 && \
         ip -n {n} addr add fd77::1/64 dev d0 nodad && ip -n {n} addr add fd77::2/64 dev d0 nodad",
        n = ns.name
    ));
    ns.run(|| {
        let v4: Vec<IpAddr> = ["10.77.0.1", "10.77.0.2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        reply_source_check("0.0.0.0", "10.77.0.1".parse().unwrap(), &v4, "10.77.0.1");
        let v6: Vec<IpAddr> = ["fd77::1", "fd77::2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        reply_source_check("::", "fd77::1".parse().unwrap(), &v6, "[fd77::1]");
        // 6→4 on the IPv6 wildcard, as dockerd's `::` proxy does.
        reply_source_check("::", "fd77::1".parse().unwrap(), &v6, "10.77.0.2");
    });
}

/// Bursts of datagrams in runs of equal and varying sizes, which the proxy sends on as
/// segmented (GSO) messages, to the container and back: each must arrive as the same
/// datagram, boundaries and bytes intact, in order; with GSO on (the default) and off.
#[test]
fn bursts_keep_datagram_boundaries() {
    for gso in ["1", "0"] {
        let backend = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        burst_check(backend, client, "127.0.0.1", gso);
    }
}

/// The same through a 1,500-byte MTU link both ways (client and container behind it): runs
/// of datagrams too big for it are sent whole (IP fragments), not as GSO segments, which the
/// kernel refuses.
#[test]
fn bursts_keep_datagram_boundaries_over_a_1500_mtu_link() {
    if !need_root("bursts_keep_datagram_boundaries_over_a_1500_mtu_link") {
        return;
    }
    let (host, ctr) = (Netns::new("gsoh"), Netns::new("gsoc"));
    sh(&format!(
        "ip -n {h} link add g0 mtu 1500 type veth peer name g1 netns {c} && \
         ip -n {h} addr add 10.78.0.1/24 dev g0 && ip -n {h} link set g0 up && \
         ip -n {c} addr add 10.78.0.2/24 dev g1 && ip -n {c} link set g1 up",
        h = host.name,
        c = ctr.name
    ));
    let (backend, client) = ctr.run(|| {
        (
            UdpSocket::bind("10.78.0.2:0").unwrap(),
            UdpSocket::bind("10.78.0.2:0").unwrap(),
        )
    });
    host.run(move || burst_check(backend, client, "10.78.0.1", "1"));
}

fn burst_check(backend: UdpSocket, client: UdpSocket, listen: &str, gso: &str) {
    // Runs that exercise the grouping: equal sizes past the 64-segment limit, a shorter one
    // closing a run, a longer one starting the next, empty datagrams, near-64 KiB totals.
    let mut sizes = Vec::new();
    sizes.extend(std::iter::repeat_n(1400, 100));
    sizes.extend([
        1400, 700, 1400, 1400, 0, 0, 9000, 9000, 9000, 9000, 9000, 9000, 9000, 9000,
    ]);
    sizes.extend(std::iter::repeat_n(1, 70));
    sizes.extend(std::iter::repeat_n(16_000, 5));
    sizes.extend([200, 300, 300, 300, 65_000, 1]);
    for s in [&backend, &client] {
        socket2::SockRef::from(s)
            .set_recv_buffer_size(8 << 20)
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    let p = start_with(
        "udp",
        listen,
        backend.local_addr().unwrap(),
        &[("RPROXY_UDP_GSO", gso)],
    );
    // First a datagram to open the flow, so the burst below queues up behind it.
    client.send_to(b"open", p.addr()).unwrap();
    let mut buf = vec![0u8; 65536];
    let (n, flow) = backend.recv_from(&mut buf).unwrap();
    assert_eq!(n, 4);
    let datagram = |i: usize, len: usize| -> Vec<u8> {
        (0..len).map(|j| (i * 31 + j * 7 + j / 253) as u8).collect()
    };
    // Bursts sized to fit a receive buffer at the kernel's default cap (212 KiB, counting
    // each datagram's overhead), so that what is measured is boundaries, not buffer space.
    let mut bursts: Vec<std::ops::Range<usize>> = Vec::new();
    let mut cost = 0;
    for (i, &len) in sizes.iter().enumerate() {
        if bursts.is_empty() || cost + len + 1024 > 150_000 {
            bursts.push(i..i);
            cost = 0;
        }
        cost += len + 1024;
        bursts.last_mut().unwrap().end = i + 1;
    }
    for burst in bursts {
        for i in burst.clone() {
            client.send_to(&datagram(i, sizes[i]), p.addr()).unwrap();
        }
        for i in burst.clone() {
            let len = sizes[i];
            let n = backend
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("datagram {i} ({len} B) lost: {e} (GSO {gso})"));
            assert_eq!(n, len, "datagram {i}: length (GSO {gso})");
            assert!(
                buf[..n] == datagram(i, len)[..],
                "datagram {i} ({len} B) altered (GSO {gso})"
            );
        }
        // And back: the container answers with the same burst.
        for i in burst.clone() {
            backend.send_to(&datagram(i, sizes[i]), flow).unwrap();
        }
        for i in burst {
            let len = sizes[i];
            let (n, from) = client
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("reply {i} ({len} B) lost: {e} (GSO {gso})"));
            assert_eq!(from, p.addr(), "reply {i} from the wrong address");
            assert_eq!(n, len, "reply {i}: length (GSO {gso})");
            assert!(
                buf[..n] == datagram(i, len)[..],
                "reply {i} ({len} B) altered (GSO {gso})"
            );
        }
    }
}

/// A flow whose replies stream (a full receive batch) gets a large receive buffer, so a burst
/// from the container that arrives while the proxy is busy waits instead of being dropped.
/// Deterministic: the proxy is stopped (SIGSTOP) while each burst is sent.
#[test]
fn streaming_replies_get_a_large_receive_buffer() {
    if !need_root("streaming_replies_get_a_large_receive_buffer") {
        return; // SO_RCVBUFFORCE past net.core.rmem_max needs CAP_NET_ADMIN
    }
    use nix::sys::signal::{kill, Signal};
    let backend = UdpSocket::bind("127.0.0.1:0").unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    for s in [&backend, &client] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    let fd = std::os::fd::AsFd::as_fd(&client);
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::RcvBufForce, &(16 << 20)).unwrap();
    let p = start("udp", "127.0.0.1", backend.local_addr().unwrap());
    let pid = nix::unistd::Pid::from_raw(p.child.id() as i32);
    client.send_to(b"open", p.addr()).unwrap();
    let mut buf = vec![0u8; 2048];
    let (_, flow) = backend.recv_from(&mut buf).unwrap();
    let mut burst = |n: usize, tag: u8| {
        kill(pid, Signal::SIGSTOP).unwrap();
        for i in 0..n {
            let mut d = vec![tag; 1400];
            d[..4].copy_from_slice(&(i as u32).to_be_bytes());
            backend.send_to(&d, flow).unwrap();
        }
        kill(pid, Signal::SIGCONT).unwrap();
        for i in 0..n {
            let n = client
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("burst {tag}: reply {i} lost: {e}"));
            assert_eq!(n, 1400);
            assert_eq!(
                &buf[..4],
                &(i as u32).to_be_bytes(),
                "burst {tag}: out of order"
            );
        }
    };
    // 40 replies fit the default buffer and fill a batch: the flow is streaming now.
    burst(40, 1);
    // 2,000 (about 5 MB with the kernel's overhead) would overflow the default 208 KiB.
    burst(2000, 2);
}
