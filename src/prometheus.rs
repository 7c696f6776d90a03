//! Prometheus metrics (`--metrics-addr`): their names and labels, and the `/metrics` endpoint,
//! served on rproxy's own runtime by a small HTTP responder (the exporter's http-listener
//! feature would bring hyper for one GET).
//!
//! The counters `rproxy ls` shows live in each mapping's `Stats`, atomics the data path bumps
//! per connection, chunk or batch. Each scrape copies them into the recorder (`absolute`,
//! `set`), so the data path pays nothing for metrics. The two duration histograms live in
//! `Stats` too (two atomic additions per connection) and are rendered here, so their series
//! go with their mapping.
//!
//! Labels: `proto`, `frontend` (listen address), `backend` (target address), and `reason` or
//! `direction` where a metric needs one; never a client address. A published range is one
//! series set, not one per port ([`groups`]): dockerd publishes `-p 8000-8999:80-1079` as a
//! thousand ports, each its own mapping, and a thousand series sets per metric would make
//! every scrape megabytes and every mapping a few KB of the recorder's memory (Prometheus's
//! own guidance: keep label values bounded). `--metrics-per-port` asks for one set per port.

use std::collections::HashMap;
use std::fmt::Write;
use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use metrics::{counter, gauge, Label};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::backoff::Backoff;
use crate::bpf::SocketLb;
use crate::mapping::{self, describe, Proto};
use crate::nat::Path;
use crate::stats::{Failure, Histogram, Stats, Timings, BUCKETS};
use crate::supervisor::{Status, Supervisor};

/// Installs the Prometheus recorder for the whole process. Call before mappings start, so
/// their histograms record.
pub fn install() -> Result<PrometheusHandle, String> {
    let recorder = PrometheusBuilder::new()
        // Series of removed mappings go: counters and gauges are refreshed at every scrape
        // while their mapping lives.
        .idle_timeout(
            MetricKindMask::COUNTER | MetricKindMask::GAUGE,
            Some(Duration::from_secs(300)),
        )
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|_| "metrics: a recorder is already installed".to_string())?;
    describe_all();
    Ok(handle)
}

/// The mappings one series set stands for: a run of contiguous host ports of one protocol and
/// host address sent to the same contiguous run of ports of one target address (a published
/// range, labelled `frontend="0.0.0.0:8000-8999"`, `backend="172.17.0.2:80-1079"`), or one
/// mapping (labelled as its addresses). Runs form from what is mapped now: a range that grows
/// or shrinks gets new labels, and a sum whose member went restarts lower, which Prometheus
/// takes for a counter reset.
struct Group<'a> {
    labels: Vec<Label>,
    members: Vec<&'a Status>,
}

impl Group<'_> {
    /// The sum of `f` over the members.
    fn sum(&self, f: impl Fn(&Status) -> u64) -> u64 {
        self.members
            .iter()
            .fold(0u64, |acc, s| acc.saturating_add(f(s)))
    }

    fn labels_with(&self, key: &'static str, value: &'static str) -> Vec<Label> {
        let mut l = self.labels.clone();
        l.push(Label::new(key, value));
        l
    }
}

/// `statuses` as series sets: published ranges together, unless `per_port`.
fn groups(statuses: &[Status], per_port: bool) -> Vec<Group<'_>> {
    let all: Vec<&Status> = statuses.iter().collect();
    let runs = match per_port {
        true => all.into_iter().map(|s| vec![s]).collect(),
        false => mapping::runs(all, |s| &s.mapping),
    };
    runs.into_iter()
        .map(|members| {
            let (first, last) = (&members[0].mapping, &members[members.len() - 1].mapping);
            Group {
                labels: vec![
                    Label::new("proto", first.proto.to_string()),
                    Label::new("frontend", mapping::span(first.listen, last.listen)),
                    Label::new("backend", mapping::span(first.target, last.target)),
                ],
                members,
            }
        })
        .collect()
}

/// The TCP duration histograms of every series set, in the text format.
fn histograms(groups: &[Group<'_>]) -> String {
    type Pick = fn(&Timings) -> &Histogram;
    let families: [(&str, &str, Pick); 2] = [
        (
            "rproxy_tcp_connect_duration_seconds",
            "Time from accepting a client to the backend accepting the connection.",
            |t| &t.connect,
        ),
        (
            "rproxy_tcp_relay_duration_seconds",
            "Lifetime of proxied TCP connections, from accept to close.",
            |t| &t.lifetime,
        ),
    ];
    let tcp: Vec<_> = groups
        .iter()
        .filter(|g| g.members[0].mapping.proto == Proto::Tcp)
        .collect();
    let mut out = String::new();
    if tcp.is_empty() {
        return out;
    }
    for (name, help, pick) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for g in &tcp {
            let (mut cumulative, mut count, mut sum) = (vec![0u64; BUCKETS.len()], 0u64, 0f64);
            for s in &g.members {
                let (c, n, total) = pick(&s.stats.timings).snapshot();
                for (acc, v) in cumulative.iter_mut().zip(c) {
                    *acc = acc.saturating_add(v);
                }
                count = count.saturating_add(n);
                sum += total;
            }
            let l = g
                .labels
                .iter()
                .map(|l| format!("{}=\"{}\"", l.key(), l.value()))
                .collect::<Vec<_>>()
                .join(",");
            for (bound, n) in BUCKETS.iter().zip(cumulative) {
                let _ = writeln!(out, "{name}_bucket{{{l},le=\"{bound}\"}} {n}");
            }
            let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {count}");
            let _ = writeln!(out, "{name}_sum{{{l}}} {sum}");
            let _ = writeln!(out, "{name}_count{{{l}}} {count}");
        }
    }
    out
}

fn describe_all() {
    use metrics::{describe_counter, describe_gauge, Unit};
    describe_counter!("rproxy_tcp_connections_total", "TCP connections accepted.");
    describe_gauge!("rproxy_tcp_connections_active", "TCP connections open.");
    describe_counter!(
        "rproxy_tcp_connect_failures_total",
        "TCP connections whose backend could not be reached, by reason."
    );
    describe_counter!(
        "rproxy_bytes_total",
        Unit::Bytes,
        "Bytes relayed in userland: in = client to backend, out = backend to client."
    );
    describe_counter!(
        "rproxy_udp_datagrams_total",
        "UDP datagrams relayed, by direction."
    );
    describe_gauge!(
        "rproxy_udp_flows_active",
        "UDP flows (client address and port) live."
    );
    describe_counter!("rproxy_udp_flows_created_total", "UDP flows created.");
    describe_counter!(
        "rproxy_udp_flows_expired_total",
        "UDP flows ended by their idle timeout."
    );
    describe_counter!(
        "rproxy_udp_flows_evicted_total",
        "UDP flows ended to make room (RPROXY_UDP_MAX_FLOWS)."
    );
    describe_counter!(
        "rproxy_udp_drops_total",
        "UDP datagrams dropped, by reason."
    );
    describe_gauge!(
        "rproxy_nat_rules",
        "Kernel DNAT rules installed for the mapping."
    );
    describe_counter!(
        "rproxy_nat_connections_total",
        "Connections (UDP: flows) the kernel DNAT rules translated."
    );
    describe_counter!(
        "rproxy_socket_lb_connections_total",
        "Connections (TCP, connected UDP) the socket hooks sent straight to the target."
    );
    describe_counter!(
        "rproxy_socket_lb_datagrams_total",
        "Unconnected UDP datagrams the socket hooks sent straight to the target."
    );
    describe_counter!(
        "rproxy_denied_total",
        "Connections and datagrams from sources outside the mapping's allow-list, refused: \
         path=listener (reset at accept, datagram dropped) or path=kernel (dropped ahead of \
         any DNAT; the kernel counts packets, so a retransmitted SYN counts again)."
    );
    describe_gauge!("rproxy_mappings", "Mappings, by state.");
    describe_gauge!(
        "rproxy_process_open_fds",
        "Open file descriptors of the rproxy process."
    );
    describe_gauge!(
        "rproxy_process_resident_memory_bytes",
        Unit::Bytes,
        "Resident memory of the rproxy process."
    );
}

/// Serves `GET /metrics` on `listener` until the task is dropped; `per_port`: one series set
/// per mapping, ranges not summed.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    sup: Supervisor,
    per_port: bool,
) {
    let mut backoff = Backoff::default();
    loop {
        let Some((stream, _)) = backoff.accepted("metrics", listener.accept().await).await else {
            continue;
        };
        let (handle, sup) = (handle.clone(), sup.clone());
        tokio::spawn(async move {
            let answered = tokio::time::timeout(
                Duration::from_secs(10),
                answer(stream, &handle, &sup, per_port),
            )
            .await;
            if let Ok(Err(e)) = answered {
                tracing::debug!("metrics client: {}", describe(&e));
            }
        });
    }
}

/// One HTTP/1.x exchange: the request head, then the exposition (or 404/405), then close.
async fn answer(
    mut stream: TcpStream,
    handle: &PrometheusHandle,
    sup: &Supervisor,
    per_port: bool,
) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 16 * 1024 {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "",
                false,
            )
            .await;
        }
    }
    let line = String::from_utf8_lossy(&head);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let statuses = sup.statuses();
            let kernel = sup.kernel_connections(&statuses).await;
            let denied = sup.kernel_denied(&statuses).await;
            let groups = groups(&statuses, per_port);
            sync(&statuses, &groups, (&kernel, &denied), sup.socket_lb());
            handle.run_upkeep();
            let body = handle.render() + &histograms(&groups);
            respond(&mut stream, "200 OK", &body, method == "HEAD").await
        }
        ("GET" | "HEAD", "/") => {
            respond(
                &mut stream,
                "200 OK",
                "rproxy: metrics at /metrics\n",
                method == "HEAD",
            )
            .await
        }
        ("GET" | "HEAD", _) => respond(&mut stream, "404 Not Found", "not found\n", false).await,
        _ => respond(&mut stream, "405 Method Not Allowed", "", false).await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    body: &str,
    head_only: bool,
) -> io::Result<()> {
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes()).await?;
    if !head_only {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

/// Copies every series set's counters (its mappings' summed), the kernel paths' counters and
/// the process's own figures into the recorder.
fn sync(
    statuses: &[Status],
    groups: &[Group<'_>],
    (kernel, denied): (&HashMap<String, u64>, &HashMap<String, u64>),
    hooks: &SocketLb,
) {
    for g in groups {
        let get =
            |c: fn(&Stats) -> &std::sync::atomic::AtomicU64| g.sum(|s| c(&s.stats).load(Relaxed));
        let labels = || g.labels.clone();
        counter!("rproxy_bytes_total", g.labels_with("direction", "in"))
            .absolute(get(|s| &s.bytes_in));
        counter!("rproxy_bytes_total", g.labels_with("direction", "out"))
            .absolute(get(|s| &s.bytes_out));
        if g.members.iter().any(|s| s.mapping.options.allow.is_some()) {
            counter!("rproxy_denied_total", g.labels_with("path", "listener"))
                .absolute(get(|s| &s.denied));
            let in_kernel = g.sum(|s| denied.get(&s.mapping.spec()).copied().unwrap_or(0));
            counter!("rproxy_denied_total", g.labels_with("path", "kernel")).absolute(in_kernel);
        }
        let failures = |name: &'static str, reasons: &[Failure]| {
            for &why in reasons {
                counter!(name, g.labels_with("reason", why.label()))
                    .absolute(g.sum(|s| s.stats.failures_of(why)));
            }
        };
        match g.members[0].mapping.proto {
            Proto::Tcp => {
                counter!("rproxy_tcp_connections_total", labels()).absolute(get(|s| &s.total));
                gauge!("rproxy_tcp_connections_active", labels()).set(get(|s| &s.active) as f64);
                failures(
                    "rproxy_tcp_connect_failures_total",
                    &[
                        Failure::Refused,
                        Failure::Timeout,
                        Failure::Unreachable,
                        Failure::Limit,
                        Failure::Other,
                    ],
                );
            }
            Proto::Udp => {
                counter!(
                    "rproxy_udp_datagrams_total",
                    g.labels_with("direction", "in")
                )
                .absolute(get(|s| &s.datagrams_in));
                counter!(
                    "rproxy_udp_datagrams_total",
                    g.labels_with("direction", "out")
                )
                .absolute(get(|s| &s.datagrams_out));
                gauge!("rproxy_udp_flows_active", labels()).set(get(|s| &s.active) as f64);
                counter!("rproxy_udp_flows_created_total", labels()).absolute(get(|s| &s.total));
                counter!("rproxy_udp_flows_expired_total", labels()).absolute(get(|s| &s.expired));
                counter!("rproxy_udp_flows_evicted_total", labels()).absolute(get(|s| &s.evicted));
                failures("rproxy_udp_drops_total", &Failure::ALL);
            }
        }
        let kernel_path = |s: &Status| s.path == Some(Path::Kernel);
        gauge!("rproxy_nat_rules", labels())
            .set(g.sum(|s| if kernel_path(s) { 2 } else { 0 }) as f64);
        if g.members.iter().any(|s| kernel_path(s)) {
            let n = g.sum(|s| match kernel_path(s) {
                true => kernel.get(&s.mapping.spec()).copied().unwrap_or(0),
                false => 0,
            });
            counter!("rproxy_nat_connections_total", labels()).absolute(n);
        }
        let hooked = |s: &Status| s.socket_lb == Some(crate::bpf::Path::Socket);
        if g.members.iter().any(|s| hooked(s)) {
            let counts: Vec<(u64, u64)> = g
                .members
                .iter()
                .filter(|s| hooked(s))
                .map(|s| hooks.counters(&s.mapping))
                .collect();
            let total =
                |f: fn(&(u64, u64)) -> u64| counts.iter().map(f).fold(0u64, u64::saturating_add);
            counter!("rproxy_socket_lb_connections_total", labels()).absolute(total(|c| c.0));
            if g.members[0].mapping.proto == Proto::Udp {
                counter!("rproxy_socket_lb_datagrams_total", labels()).absolute(total(|c| c.1));
            }
        }
    }
    let serving = statuses.iter().filter(|s| s.serving).count();
    let stopped = statuses.len() - serving;
    gauge!("rproxy_mappings", "state" => "serving").set(serving as f64);
    gauge!("rproxy_mappings", "state" => "stopped").set(stopped as f64);
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauge!("rproxy_process_open_fds").set(fds.count() as f64);
    }
    if let Some(rss) = resident_bytes() {
        gauge!("rproxy_process_resident_memory_bytes").set(rss as f64);
    }
}

/// VmRSS from /proc/self/status, in bytes.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
