//! UDP through the real binary: echo of the largest datagrams, flow expiry, LRU eviction (also
//! under a flood of sources, and when out of descriptors), a full socket toward the target
//! stalling only its own flow, and replies that leave from the address the client used on a
//! multi-address host.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
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

/// A kB figure of /proc/PID/status (`VmRSS`, `VmHWM`); 0 when unreadable.
fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A UDP echo that counts the datagrams it answered.
fn counting_echo(addr: &str) -> (SocketAddr, Arc<AtomicUsize>) {
    let socket = UdpSocket::bind(addr).unwrap();
    socket2::SockRef::from(&socket)
        .set_recv_buffer_size(4 << 20)
        .unwrap();
    let local = socket.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
            seen.fetch_add(1, Relaxed);
        }
    });
    (local, count)
}

/// A client asking `tag N` every 50 ms until `stop` (or `limit` requests), noting when each
/// request left and when its reply came back.
struct Talk {
    sent: Vec<Instant>,
    answered: Vec<Option<Instant>>,
}

impl Talk {
    fn run(to: SocketAddr, tag: &str, limit: usize, stop: &AtomicBool) -> Talk {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut talk = Talk {
            sent: Vec::new(),
            answered: Vec::new(),
        };
        let mut buf = [0u8; 64];
        let mut listen = |talk: &mut Talk, until: Instant| loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            socket.set_read_timeout(Some(left)).unwrap();
            let Ok(n) = socket.recv(&mut buf) else {
                continue;
            };
            let seq = std::str::from_utf8(&buf[..n])
                .ok()
                .and_then(|s| s.strip_prefix(tag)?.trim().parse::<usize>().ok());
            if let Some(slot) = seq.and_then(|i| talk.answered.get_mut(i)) {
                slot.get_or_insert_with(Instant::now);
            }
        };
        while talk.sent.len() < limit && !stop.load(Relaxed) {
            let seq = talk.sent.len();
            let now = Instant::now();
            socket
                .send_to(format!("{tag} {seq}").as_bytes(), to)
                .unwrap();
            talk.sent.push(now);
            talk.answered.push(None);
            listen(&mut talk, now + Duration::from_millis(50));
        }
        // Late replies still count.
        listen(&mut talk, Instant::now() + Duration::from_millis(300));
        talk
    }

    /// (answered, asked) among the requests sent within `from..to`.
    fn tally(&self, from: Instant, to: Instant) -> (usize, usize) {
        let asked: Vec<usize> = (0..self.sent.len())
            .filter(|&i| self.sent[i] >= from && self.sent[i] < to)
            .collect();
        let answered = asked
            .iter()
            .filter(|&&i| self.answered[i].is_some())
            .count();
        (answered, asked.len())
    }

    /// The longest time within `from..to` with no reply arriving.
    fn longest_silence(&self, from: Instant, to: Instant) -> Duration {
        let mut at: Vec<Instant> = self
            .answered
            .iter()
            .flatten()
            .copied()
            .filter(|t| *t >= from && *t < to)
            .collect();
        at.sort();
        at.insert(0, from);
        at.push(to);
        at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }
}

/// 100,000 sources, one datagram each (from as many 127.x.y.z addresses: all of 127/8 is
/// local), against a docker-mode proxy with the default flow bound (65,536) and at most
/// 20,000 descriptors, which cannot hold that many flows: the flow table stays within the
/// descriptors (17,500 flows) by evicting the least recently used, so a client talking
/// through the flood keeps its replies, a new client right after it is served, and memory
/// stays bounded.
#[test]
fn a_flood_of_sources_locks_no_client_out() {
    // In a namespace of its own when root: where the host tracks connections (any iptables
    // NAT rule loads conntrack), the flood's 200,000 tracked flows would fill its table,
    // and other traffic on the machine would be dropped until they time out.
    match is_root().then(|| Netns::new("flood")) {
        Some(ns) => ns.run(flood_check),
        None => flood_check(),
    }
}

fn flood_check() {
    const SOURCES: usize = 100_000;
    /// The flood's pace, datagrams per second: what the proxy turns into new flows here with
    /// room to spare, so that the sources become flows rather than overflow its buffer.
    const RATE: usize = 20_000;
    const FDS: u64 = 20_000;
    let (echo, echoed) = counting_echo("127.0.0.1:0");
    let mut spawn = Spawn::forward("udp", "127.0.0.1", echo);
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    if hard >= FDS {
        spawn.shell_prefix.push(format!("ulimit -n {FDS}"));
    }
    let p = spawn.spawn().ready();
    let (pid, to) = (p.child.id(), p.addr());
    udp_roundtrip(&UdpSocket::bind("127.0.0.1:0").unwrap(), to, b"warm up");
    let rss_before = status_kb(pid, "VmRSS:");

    let stop = Arc::new(AtomicBool::new(false));
    let talker = {
        let stop = stop.clone();
        std::thread::spawn(move || Talk::run(to, "legit", usize::MAX, &stop))
    };
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut most_fds = 0;
            while !stop.load(Relaxed) {
                most_fds = most_fds.max(open_fds(pid));
                std::thread::sleep(Duration::from_millis(200));
            }
            most_fds
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    let flood_start = Instant::now();
    for i in 0..SOURCES {
        let ip = std::net::Ipv4Addr::new(127, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
        let s = UdpSocket::bind((ip, 0)).unwrap();
        let _ = s.send_to(b"flood", to);
        if i % 500 == 499 {
            let due = flood_start + Duration::from_secs_f64((i + 1) as f64 / RATE as f64);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
    }
    let flood_end = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let rss_peak = status_kb(pid, "VmHWM:");

    // Right after: the client that talked through the flood, and a new one.
    let fresh = Talk::run(to, "fresh", 20, &AtomicBool::new(false));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Relaxed);
    let legit = talker.join().unwrap();
    let most_fds = sampler.join().unwrap();
    let rss_after = status_kb(pid, "VmRSS:");

    let (during, asked_during) = legit.tally(flood_start, flood_end);
    // Once what the flood left in the frontend's buffer has gone through.
    let settled = flood_end + Duration::from_millis(500);
    let (after, asked_after) = legit.tally(settled, Instant::now());
    let (fresh_answered, _) = fresh.tally(flood_start, Instant::now());
    let silence = legit.longest_silence(flood_start, flood_end);
    let flood_took = flood_end - flood_start;
    eprintln!(
        "flood: {SOURCES} sources in {flood_took:.2?}; the backend echoed {} datagrams; \
         at most {most_fds} descriptors open in the proxy",
        echoed.load(Relaxed)
    );
    eprintln!(
        "legit client: {during}/{asked_during} replies during the flood (longest silence \
         {silence:.2?}), {after}/{asked_after} after; new client after: {fresh_answered}/20"
    );
    eprintln!(
        "proxy VmRSS: {rss_before} kB before, {rss_peak} kB peak (VmHWM), {rss_after} kB after"
    );
    assert!(
        fresh_answered >= 19,
        "a new client after the flood got {fresh_answered} of 20 replies"
    );
    assert!(
        after + 1 >= asked_after,
        "the client that talked through the flood got {after} of {asked_after} replies after it"
    );
    // Some requests drown with the flood's datagrams when the frontend's buffer overflows.
    assert!(
        during * 2 >= asked_during && silence < Duration::from_secs(2),
        "during the flood: {during} of {asked_during} replies, {silence:?} without one"
    );
    // About 2 kB a flow (its task, socket and table entries): some 40 MB for 17,500 flows.
    assert!(
        rss_peak < 64 * 1024,
        "the proxy peaked at {rss_peak} kB of resident memory"
    );
}

/// One flow whose socket toward the target is full costs only that flow. The target sits in
/// a namespace behind a veth whose egress (HTB) holds large datagrams to 2 Mbit/s and lets
/// small ones through: the datagrams waiting in the slow class stay charged to the proxy's
/// socket, so a bulk client sending faster than that fills the bulk flow's send buffer
/// (sendmmsg: EAGAIN), while a ping client's small datagrams have a free path. The ping must
/// not wait behind the bulk flow.
#[test]
fn a_full_upstream_socket_stalls_only_its_flow() {
    if !need_root("a_full_upstream_socket_stalls_only_its_flow") {
        return;
    }
    let (host, ctr) = (Netns::new("fullh"), Netns::new("fullc"));
    // Class 1:1 (fast): small IP packets (total length < 1024) and anything not IP (ARP);
    // class 1:2 (slow): every other IP packet.
    sh(&format!(
        "ip -n {h} link add f0 type veth peer name f1 netns {c} && \
         ip -n {h} addr add 10.79.0.1/24 dev f0 && ip -n {h} link set f0 up && \
         ip -n {c} addr add 10.79.0.2/24 dev f1 && ip -n {c} link set f1 up && \
         tc -n {h} qdisc add dev f0 root handle 1: htb default 1 && \
         tc -n {h} class add dev f0 parent 1: classid 1:1 htb rate 10gbit quantum 60000 && \
         tc -n {h} class add dev f0 parent 1: classid 1:2 htb rate 2mbit ceil 2mbit && \
         tc -n {h} filter add dev f0 parent 1: protocol ip prio 1 u32 \
            match u16 0 0xfc00 at 2 flowid 1:1 && \
         tc -n {h} filter add dev f0 parent 1: protocol ip prio 2 u32 match u32 0 0 flowid 1:2",
        h = host.name,
        c = ctr.name
    ));
    let echo = ctr.run(|| udp_echo("10.79.0.2:0"));
    host.run(move || {
        let p = start("udp", "127.0.0.1", echo);
        let (pid, to) = (p.child.id(), p.addr());
        let wmem_default: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_default")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        // 5,000 numbered datagrams of 1,400 bytes a second (56 Mbit/s) toward a 2 Mbit/s
        // path; their echoes must come back in order (some lost: the path cannot take them).
        let bulk_socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let bulk_echoes = {
            let s = bulk_socket.try_clone().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            std::thread::spawn(move || {
                let (mut buf, mut last, mut echoed, mut reordered) = ([0u8; 2048], None, 0, 0);
                while let Ok(n) = s.recv(&mut buf) {
                    let seq = u64::from_be_bytes(buf[..8].try_into().unwrap());
                    assert_eq!(n, 1400);
                    reordered += usize::from(last.is_some_and(|l| seq <= l));
                    (last, echoed) = (Some(seq), echoed + 1);
                }
                (echoed, reordered)
            })
        };
        let bulk = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut sent = 0u64;
                let mut datagram = [7u8; 1400];
                while !stop.load(Relaxed) {
                    for _ in 0..5 {
                        datagram[..8].copy_from_slice(&sent.to_be_bytes());
                        let _ = bulk_socket.send_to(&datagram, to);
                        sent += 1;
                    }
                    let due = start + Duration::from_millis(sent / 5);
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                }
                sent
            })
        };
        // How full the proxy's sockets toward the target get (tx_queue of /proc/net/udp is
        // the bytes charged to the socket's send buffer; sendmmsg fails at the buffer's size).
        let fullest = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let target = format!(
                    "{:08X}:{:04X}",
                    u32::from_le_bytes([10, 79, 0, 2]),
                    echo.port()
                );
                let mut most = 0usize;
                while !stop.load(Relaxed) {
                    let table = std::fs::read_to_string(format!("/proc/{pid}/net/udp")).unwrap();
                    for line in table.lines().filter(|l| l.contains(&target)) {
                        let queues = line.split_whitespace().nth(4).unwrap_or("0:0");
                        let tx = queues.split(':').next().unwrap_or("0");
                        most = most.max(usize::from_str_radix(tx, 16).unwrap_or(0));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                most
            })
        };
        // Let the bulk flow fill its socket, then ping through the proxy beside it.
        std::thread::sleep(Duration::from_millis(500));
        let ping = UdpSocket::bind("127.0.0.1:0").unwrap();
        ping.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut rtts = Vec::new();
        let mut buf = [0u8; 64];
        for i in 0..100u32 {
            let sent = Instant::now();
            ping.send_to(&i.to_be_bytes(), to).unwrap();
            // Replies to pings given up on may still come: wait for this one.
            while let Ok(n) = ping.recv(&mut buf) {
                if buf[..n] == i.to_be_bytes() {
                    rtts.push(sent.elapsed());
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(20).saturating_sub(sent.elapsed()));
        }
        stop.store(true, Relaxed);
        let bulk_sent = bulk.join().unwrap();
        let fullest = fullest.join().unwrap();
        let (bulk_echoed, reordered) = bulk_echoes.join().unwrap();
        rtts.sort();
        let median = rtts.get(rtts.len() / 2).copied().unwrap_or_default();
        let p95 = rtts
            .get((rtts.len() * 95 / 100).min(rtts.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default();
        eprintln!(
            "bulk: {bulk_sent} datagrams sent, {bulk_echoed} echoed, {reordered} out of order; \
             fullest proxy socket toward the target: {fullest} of {wmem_default} bytes; \
             ping: {} of 100 answered, median {median:.2?}, p95 {p95:.2?}",
            rtts.len()
        );
        assert!(
            fullest * 4 >= wmem_default * 3,
            "the bulk flow's socket never filled ({fullest} of {wmem_default} bytes): no EAGAIN"
        );
        assert!(
            rtts.len() >= 95 && p95 < Duration::from_millis(50),
            "the ping flow stalled behind the full one: {} of 100 answered, p95 {p95:?}",
            rtts.len()
        );
        assert!(bulk_echoed > 0 && reordered == 0);
        drop(p);
    });
}

/// A port nothing listens on now (the kernel's pick; the daemon binds it right after).
fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Asks once from a new socket (a new flow); whether the reply came.
fn answered_once(to: SocketAddr, msg: &[u8]) -> bool {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    s.send_to(msg, to).unwrap();
    s.recv(&mut buf).is_ok_and(|n| &buf[..n] == msg)
}

/// Two UDP mappings in one daemon share its descriptors: once the other mapping's flows
/// hold them, socket() fails (EMFILE) for a new flow, which then takes the place of its own
/// mapping's least recently used flow instead of being refused: its first datagram is
/// relayed, no retransmission needed.
#[test]
fn a_new_flow_evicts_when_out_of_descriptors() {
    const LIMIT: usize = 256;
    let echo = udp_echo("127.0.0.1:0");
    let techo = tcp_echo("127.0.0.1:0");
    let dir = Dir::new("udp-emfile");
    let (a, b) = (free_udp_port(), free_udp_port());
    let sock = dir.sock();
    let tcp_spec = format!("127.0.0.1:0:{techo}/tcp");
    let mut spawn = Spawn::new(&[
        "daemon",
        "--control-socket",
        sock.to_str().unwrap(),
        "-p",
        &format!("127.0.0.1:{a}:{echo}/udp"),
        "-p",
        &format!("127.0.0.1:{b}:{echo}/udp"),
        "-p",
        &tcp_spec,
    ])
    .no_status_pipe();
    spawn.shell_prefix.push(format!("ulimit -n {LIMIT}"));
    let p = spawn.spawn();
    p.wait_log("daemon ready", Duration::from_secs(10));
    let pid = p.child.id();
    let tcp_port: u16 = ls(&dir)
        .iter()
        .find(|r| r.0 == "tcp")
        .and_then(|r| r.1.rsplit(':').next()?.parse().ok())
        .expect("the TCP mapping's port");
    let (a, b) = (
        SocketAddr::from(([127, 0, 0, 1], a)),
        SocketAddr::from(([127, 0, 0, 1], b)),
    );
    // Mapping b takes as many flows as its bound allows, and more.
    let b_answered = (0..LIMIT)
        .filter(|i| answered_once(b, format!("b {i}").as_bytes()))
        .count();
    let fds_after_b = open_fds(pid);
    // Mapping a finds the process's flow budget spent, and is served all the same.
    let a_answered = (0..100)
        .filter(|i| answered_once(a, format!("a {i}").as_bytes()))
        .count();
    let fds = open_fds(pid);
    eprintln!(
        "mapping b: {b_answered}/{LIMIT} new flows answered ({fds_after_b} descriptors open); \
         mapping a: {a_answered}/100 ({fds} open, limit {LIMIT})"
    );
    assert_eq!(a_answered, 100, "new flows refused when out of descriptors");
    assert_eq!(b_answered, LIMIT);
    assert!(fds <= LIMIT);
    // The flows of both left the reserve alone: the TCP mapping takes 16 connections at once.
    let mut conns: Vec<std::net::TcpStream> = (0..16)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", tcp_port)).unwrap())
        .collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        std::io::Write::write_all(c, format!("tcp {i:02}").as_bytes()).unwrap();
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let mut buf = [0u8; 6];
        std::io::Read::read_exact(c, &mut buf)
            .unwrap_or_else(|e| panic!("TCP connection {i} beside the UDP floods: {e}"));
        assert_eq!(&buf, format!("tcp {i:02}").as_bytes());
    }
}
