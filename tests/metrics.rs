//! Prometheus metrics (`rproxy daemon --metrics-addr`): counters that move by exactly what
//! real TCP and UDP traffic did, an exposition `promtool` accepts, and a real Prometheus
//! server scraping it and answering a query.
mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    rproxy, tcp_echo, tcp_roundtrip, udp_echo, udp_roundtrip, wait_until, Dir, Proxy, Spawn,
};

/// A daemon serving `publish` with metrics on a free loopback port; returns it, the metrics
/// address and the mappings' listen addresses (in `ls` order).
fn daemon(dir: &Dir, publish: &[String]) -> (Proxy, SocketAddr, Vec<String>) {
    daemon_with(dir, publish, &[])
}

/// As [`daemon`], with `extra` flags.
fn daemon_with(dir: &Dir, publish: &[String], extra: &[&str]) -> (Proxy, SocketAddr, Vec<String>) {
    let sock = dir.0.join("ctl.sock");
    let sock = sock.to_str().unwrap();
    let mut argv = vec![
        "daemon",
        "--control-socket",
        sock,
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    argv.extend(extra);
    for p in publish {
        argv.extend(["-p", p.as_str()]);
    }
    let d = Spawn::new(&argv).no_status_pipe().spawn();
    let addr = d.metrics_addr();
    let ls = Command::new(rproxy())
        .args(["ls", "--control-socket", sock])
        .output()
        .unwrap();
    let listens = String::from_utf8_lossy(&ls.stdout)
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
        .collect();
    (d, addr, listens)
}

/// GET /metrics.
fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

/// The value of the sample `name` whose labels include every `labels` pair.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            return None;
        }
        let ok = labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        ok.then(|| l.rsplit(' ').next()?.parse().ok()).flatten()
    })
}

#[test]
fn counters_move_by_what_tcp_and_udp_traffic_did() {
    let dir = Dir::new("traffic");
    let echo = tcp_echo("127.0.0.1:0");
    let uecho = udp_echo("127.0.0.1:0");
    // A backend that refuses: a port nothing listens on any more.
    let refused = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (_d, metrics, listens) = daemon(
        &dir,
        &[
            format!("127.0.0.1:0:{echo}/tcp"),
            format!("127.0.0.1:0:{refused}/tcp"),
            format!("127.0.0.1:0:{uecho}/udp"),
        ],
    );
    let front = |target: SocketAddr| {
        listens
            .iter()
            .find(|l| {
                value(
                    &scrape(metrics),
                    "rproxy_bytes_total",
                    &[("frontend", l), ("backend", &target.to_string())],
                )
                .is_some()
            })
            .unwrap_or_else(|| panic!("no mapping for {target}"))
            .clone()
    };
    let (tcp, dead, udp) = (front(echo), front(refused), front(uecho));
    let before = scrape(metrics);
    let ours = [("frontend", tcp.as_str())];
    assert_eq!(
        value(&before, "rproxy_tcp_connections_total", &ours),
        Some(0.0)
    );

    // Five connections of 1,000 bytes each way.
    for _ in 0..5 {
        assert_eq!(
            tcp_roundtrip(tcp.parse().unwrap(), &[7u8; 1000]).len(),
            1000
        );
    }
    // Two connections to a backend that refuses: reset at once, counted by reason.
    for _ in 0..2 {
        let mut c = TcpStream::connect(dead.as_str()).unwrap();
        let _ = c.read(&mut [0u8; 1]);
    }
    // Three datagrams of 100 bytes from one client socket: one flow.
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..3 {
        let (reply, _) = udp_roundtrip(&client, udp.parse().unwrap(), &[1u8; 100]);
        assert_eq!(reply.len(), 100);
    }

    wait_until(
        "the relay histogram to count 5 closed connections",
        Duration::from_secs(10),
        || {
            value(
                &scrape(metrics),
                "rproxy_tcp_relay_duration_seconds_count",
                &ours,
            ) == Some(5.0)
        },
    );
    let after = scrape(metrics);
    let v = |name: &str, extra: &[(&str, &str)], front: &str| {
        let mut l = vec![("frontend", front)];
        l.extend_from_slice(extra);
        value(&after, name, &l).unwrap_or_else(|| panic!("no {name} {l:?} in\n{after}"))
    };
    assert_eq!(v("rproxy_tcp_connections_total", &[], &tcp), 5.0);
    assert_eq!(v("rproxy_tcp_connections_active", &[], &tcp), 0.0);
    assert_eq!(
        v("rproxy_bytes_total", &[("direction", "in")], &tcp),
        5000.0
    );
    assert_eq!(
        v("rproxy_bytes_total", &[("direction", "out")], &tcp),
        5000.0
    );
    assert_eq!(
        v("rproxy_tcp_connect_duration_seconds_count", &[], &tcp),
        5.0
    );
    assert_eq!(
        v(
            "rproxy_tcp_connect_failures_total",
            &[("reason", "refused")],
            &tcp
        ),
        0.0
    );
    assert_eq!(
        v(
            "rproxy_tcp_connect_failures_total",
            &[("reason", "refused")],
            &dead
        ),
        2.0
    );
    assert_eq!(
        v(
            "rproxy_tcp_connect_failures_total",
            &[("reason", "timeout")],
            &dead
        ),
        0.0
    );
    assert_eq!(
        v("rproxy_udp_datagrams_total", &[("direction", "in")], &udp),
        3.0
    );
    assert_eq!(
        v("rproxy_udp_datagrams_total", &[("direction", "out")], &udp),
        3.0
    );
    assert_eq!(v("rproxy_bytes_total", &[("direction", "in")], &udp), 300.0);
    assert_eq!(
        v("rproxy_bytes_total", &[("direction", "out")], &udp),
        300.0
    );
    assert_eq!(v("rproxy_udp_flows_created_total", &[], &udp), 1.0);
    assert_eq!(v("rproxy_udp_flows_active", &[], &udp), 1.0);
    assert_eq!(
        v("rproxy_udp_drops_total", &[("reason", "too_large")], &udp),
        0.0
    );
    assert_eq!(
        value(&after, "rproxy_mappings", &[("state", "serving")]),
        Some(3.0)
    );
    assert!(value(&after, "rproxy_process_open_fds", &[]).is_some_and(|n| n > 3.0));
    // No client address anywhere.
    let client_port = client.local_addr().unwrap().port().to_string();
    assert!(
        !after
            .lines()
            .any(|l| l.contains(&format!(":{client_port}\""))),
        "a client address leaked into a label"
    );

    // Buckets add up to +Inf = count; a removed mapping's histograms go with it at once.
    let bucket = |le: &str| {
        value(
            &after,
            "rproxy_tcp_relay_duration_seconds_bucket",
            &[("frontend", tcp.as_str()), ("le", le)],
        )
    };
    assert_eq!(bucket("+Inf"), Some(5.0));
    assert!(bucket("3600").is_some_and(|n| n <= 5.0));
    let sock = dir.0.join("ctl.sock");
    let rm = Command::new(rproxy())
        .args(["rm", "--control-socket", sock.to_str().unwrap()])
        .arg(format!("{tcp}:{echo}/tcp"))
        .output()
        .unwrap();
    assert!(rm.status.success(), "{rm:?}");
    let gone = scrape(metrics);
    for name in [
        "rproxy_tcp_relay_duration_seconds_count",
        "rproxy_tcp_connect_duration_seconds_bucket",
    ] {
        assert_eq!(
            value(&gone, name, &ours),
            None,
            "{name} of a removed mapping"
        );
    }
    let theirs = [("frontend", dead.as_str())];
    assert_eq!(
        value(&gone, "rproxy_tcp_relay_duration_seconds_count", &theirs),
        Some(2.0),
        "the other mapping's histogram"
    );
}

#[test]
fn promtool_accepts_the_exposition() {
    if Command::new("promtool").arg("--version").output().is_err() {
        common::skip(
            "promtool_accepts_the_exposition",
            "promtool not installed (Debian's prometheus package; .ci/install-deps installs it)",
        );
        return;
    }
    let dir = Dir::new("promtool");
    let echo = tcp_echo("127.0.0.1:0");
    let uecho = udp_echo("127.0.0.1:0");
    let (_d, metrics, listens) = daemon(
        &dir,
        &[
            format!("127.0.0.1:0:{echo}/tcp"),
            format!("127.0.0.1:0:{uecho}/udp"),
        ],
    );
    // Traffic first, so histograms and every labelled series are present.
    for l in &listens {
        let addr: SocketAddr = l.parse().unwrap();
        let _ = TcpStream::connect(addr).map(|_| tcp_roundtrip(addr, b"x"));
    }
    let text = scrape(metrics);
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(check.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics:\n{said}\non:\n{text}"
    );
}

#[test]
fn a_real_prometheus_scrapes_and_answers_a_query() {
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        common::skip(
            "a_real_prometheus_scrapes_and_answers_a_query",
            "prometheus not installed (Debian's prometheus package; .ci/install-deps installs it)",
        );
        return;
    }
    let dir = Dir::new("server");
    let echo = tcp_echo("127.0.0.1:0");
    let (_d, metrics, listens) = daemon(&dir, &[format!("127.0.0.1:0:{echo}/tcp")]);
    for _ in 0..4 {
        tcp_roundtrip(listens[0].parse().unwrap(), b"hello");
    }
    let web = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = dir.0.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: rproxy\n    \
             static_configs:\n      - targets: ['{metrics}']\n"
        ),
    )
    .unwrap();
    let server = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.0.join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.0.join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    struct Stop(Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Stop(server);
    let query = |q: &str| -> Option<serde_json::Value> {
        let mut s = TcpStream::connect(web).ok()?;
        let request = format!("GET /api/v1/query?query={q} HTTP/1.0\r\nHost: x\r\n\r\n");
        std::io::Write::write_all(&mut s, request.as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        serde_json::from_str(out.split_once("\r\n\r\n")?.1).ok()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer = loop {
        let got = query("rproxy_tcp_connections_total").and_then(|j| {
            let r = j["data"]["result"].as_array()?.first()?.clone();
            Some((r["metric"].clone(), r["value"][1].as_str()?.to_string()))
        });
        if let Some((labels, value)) = got {
            break (labels, value);
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus has no rproxy_tcp_connections_total after 30 s:\n{}",
            std::fs::read_to_string(dir.0.join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(answer.1, "4", "{answer:?}");
    assert_eq!(answer.0["frontend"], listens[0].as_str());
    assert_eq!(answer.0["backend"], echo.to_string().as_str());
    assert_eq!(answer.0["job"], "rproxy");
}

#[test]
fn a_bad_or_taken_metrics_address_is_refused_clearly() {
    let dir = Dir::new("bad");
    let sock = dir.0.join("ctl.sock");
    let run = |addr: &str| {
        let out = Command::new(rproxy())
            .args([
                "daemon",
                "--control-socket",
                sock.to_str().unwrap(),
                "--metrics-addr",
                addr,
            ])
            .env("RPROXY_SOCKET", "/nonexistent")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run("localhost");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--metrics-addr"), "{err}");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let (code, err) = run(&taken.local_addr().unwrap().to_string());
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("metrics: cannot listen on") && err.contains("address already in use"),
        "{err}"
    );
}

#[test]
fn ports_dockerd_publishes_show_up_through_the_daemon() {
    let dir = Dir::new("shim");
    let echo = tcp_echo("127.0.0.1:0");
    let (_d, metrics, _) = daemon(&dir, &[]);
    // A docker-mode process, as dockerd starts it, hands its port to the daemon.
    let shim = Spawn::forward("tcp", "127.0.0.1", echo)
        .env("RPROXY_SOCKET", dir.0.join("ctl.sock").to_str().unwrap())
        .spawn()
        .ready();
    let front = shim.addr().to_string();
    tcp_roundtrip(shim.addr(), b"through the daemon");
    wait_until(
        "the shim's mapping in the metrics",
        Duration::from_secs(10),
        || {
            value(
                &scrape(metrics),
                "rproxy_tcp_connections_total",
                &[("frontend", &front), ("backend", &echo.to_string())],
            ) == Some(1.0)
        },
    );
}

/// A published range is one series set: a daemon with a 1,000-port TCP range and a 1,000-port
/// UDP range serves a scrape of a few KB whose counters sum what went through any of its
/// ports, labelled with the range; `--metrics-per-port` gives each port its own set again.
#[test]
fn a_published_range_is_one_series_set() {
    let base = common::free_ports(2000);
    let (front, back) = (base, base + 1000);
    let (front_end, back_end) = (front + 999, back + 999);
    // Backends for two ports of each range: the first and the sixth.
    for p in [back, back + 5] {
        tcp_echo(&format!("127.0.0.1:{p}"));
        udp_echo(&format!("127.0.0.1:{p}"));
    }
    let publish = [
        format!("127.0.0.1:{front}-{front_end}:127.0.0.1:{back}-{back_end}/tcp"),
        format!("127.0.0.1:{front}-{front_end}:127.0.0.1:{back}-{back_end}/udp"),
    ];
    let frontend = format!("127.0.0.1:{front}-{front_end}");
    let backend = format!("127.0.0.1:{back}-{back_end}");
    let dir = Dir::new("ranges");
    let (d, metrics, listens) = daemon_with(&dir, &publish, &[]);
    assert_eq!(listens.len(), 2000);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    for p in [front, front + 5] {
        let addr = SocketAddr::from(([127, 0, 0, 1], p));
        assert_eq!(tcp_roundtrip(addr, b"range"), b"range");
        assert_eq!(udp_roundtrip(&client, addr, b"range").0, b"range");
    }
    let ours = [
        ("frontend", frontend.as_str()),
        ("backend", backend.as_str()),
    ];
    wait_until("both connections summed", Duration::from_secs(10), || {
        value(&scrape(metrics), "rproxy_tcp_connections_total", &ours) == Some(2.0)
    });
    let text = scrape(metrics);
    let tcp = [("proto", "tcp"), ours[0], ours[1]];
    let udp = [("proto", "udp"), ours[0], ours[1]];
    assert_eq!(
        value(&text, "rproxy_udp_flows_created_total", &udp),
        Some(2.0)
    );
    assert_eq!(
        value(
            &text,
            "rproxy_bytes_total",
            &[tcp[0], tcp[1], ("direction", "in")]
        ),
        Some(10.0)
    );
    assert_eq!(
        value(&text, "rproxy_tcp_connect_duration_seconds_count", &tcp),
        Some(2.0)
    );
    assert_eq!(
        value(&text, "rproxy_mappings", &[("state", "serving")]),
        Some(2000.0)
    );
    let single = format!("127.0.0.1:{front}");
    assert_eq!(
        value(
            &text,
            "rproxy_tcp_connections_total",
            &[("frontend", &single)]
        ),
        None,
        "a per-port series beside the range's"
    );
    let rss = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    };
    let grouped = (text.len(), rss(d.child.id()));
    drop(d);

    // Per port, as asked: each port its own set, the range's gone.
    let dir = Dir::new("ranges-per-port");
    let (d, metrics, _) = daemon_with(&dir, &publish, &["--metrics-per-port"]);
    let text = scrape(metrics);
    for p in [front, front_end] {
        let f = format!("127.0.0.1:{p}");
        assert_eq!(
            value(&text, "rproxy_tcp_connections_total", &[("frontend", &f)]),
            Some(0.0),
            "{f}"
        );
    }
    assert_eq!(value(&text, "rproxy_tcp_connections_total", &ours), None);
    let per_port = (text.len(), rss(d.child.id()));
    eprintln!(
        "1,000 TCP + 1,000 UDP mappings: scrape {} bytes and daemon VmRSS {} kB as two ranges, \
         {} bytes and {} kB per port",
        grouped.0, grouped.1, per_port.0, per_port.1
    );
    assert!(grouped.0 < 500_000, "scrape of {} bytes", grouped.0);
    assert!(grouped.0 * 100 < per_port.0, "{grouped:?} vs {per_port:?}");
    assert!(grouped.1 * 2 < per_port.1, "{grouped:?} vs {per_port:?}");
}
