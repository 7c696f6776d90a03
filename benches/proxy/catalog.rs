//! What is compared (direct and the proxies) and what is measured: the workload table.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Direct,
    /// rproxy as dockerd runs it: one process per port (current-thread runtime).
    Rproxy,
    DockerProxy,
    Socat,
    /// `rproxy daemon -p …`: the one-process mode (multi-thread runtime).
    RproxyDaemon,
    /// `rproxy daemon --nat=require -p …`: kernel DNAT, for clients that are not on the bridge.
    RproxyNat,
    /// `rproxy daemon --metrics-addr … -p …`: the daemon with its Prometheus recorder on, to
    /// show what metrics cost.
    RproxyMetrics,
    /// HAProxy in TCP mode, tuned as a throughput-minded operator would (see `haproxy_config`):
    /// the event-driven C proxy people hold up as the fast one, for the TCP workloads.
    Haproxy,
    /// `rproxy daemon --socket-lb=require -p …`: cgroup socket hooks connect host clients
    /// straight to the container, for the host-* workloads (clients in the host namespace).
    RproxySocket,
    /// `--dockerd` only: dockerd `--userland-proxy=false` publishing the ports, and one
    /// `rproxy daemon --docker-ports` for the whole run following it (its socket hooks carry
    /// host clients): the `docker-ports` deployment, nothing started per measurement.
    DockerPorts,
}

/// Columns in this order; later additions last so the others keep their places.
pub const KINDS: [Kind; 10] = [
    Kind::Direct,
    Kind::Rproxy,
    Kind::DockerProxy,
    Kind::Socat,
    Kind::RproxyDaemon,
    Kind::RproxyNat,
    Kind::RproxyMetrics,
    Kind::Haproxy,
    Kind::RproxySocket,
    Kind::DockerPorts,
];

/// What `--dockerd` can run: the host-* workloads' kinds, against a real container.
pub(crate) const DOCKERD_KINDS: &[Kind] = &[
    Kind::Direct,
    Kind::Rproxy,
    Kind::DockerProxy,
    Kind::Haproxy,
    Kind::RproxySocket,
    Kind::DockerPorts,
];
/// Its columns unless `--proxies` says otherwise: the deployment, against direct and against
/// docker-proxy for context.
pub(crate) const DOCKERD_DEFAULT: &[Kind] = &[Kind::Direct, Kind::DockerProxy, Kind::DockerPorts];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Rproxy => "rproxy",
            Kind::DockerProxy => "docker-proxy",
            Kind::Socat => "socat",
            Kind::RproxyDaemon => "rproxy-daemon",
            Kind::RproxyNat => "rproxy-nat",
            Kind::RproxyMetrics => "rproxy-daemon+metrics",
            Kind::Haproxy => "haproxy",
            Kind::RproxySocket => "rproxy-socket",
            Kind::DockerPorts => "rproxy-docker-ports",
        }
    }

    pub(crate) fn from_name(s: &str) -> Option<Kind> {
        KINDS.into_iter().find(|k| k.name() == s)
    }

    pub(crate) fn index(self) -> usize {
        KINDS.iter().position(|k| *k == self).unwrap_or(0)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

pub(crate) struct Metric {
    pub(crate) name: &'static str,
    pub(crate) decimals: usize,
    /// Whether dividing two proxies' figures means something (not for error counts, loss…).
    pub(crate) ratio: bool,
}

pub(crate) const fn m(name: &'static str, decimals: usize, ratio: bool) -> Metric {
    Metric {
        name,
        decimals,
        ratio,
    }
}

pub(crate) type RunFn = fn(&Ctx, Kind, u16) -> Result<Vec<f64>, String>;

pub(crate) struct Workload {
    pub(crate) name: &'static str,
    pub(crate) about: String,
    pub(crate) metrics: &'static [Metric],
    pub(crate) kinds: &'static [Kind],
    pub(crate) run: RunFn,
}

/// Every kind that serves a client on the bridge over TCP (kernel NAT leaves those to
/// userland), HAProxy last.
pub(crate) const BRIDGE_TCP: &[Kind] = &[
    Kind::Direct,
    Kind::Rproxy,
    Kind::DockerProxy,
    Kind::Socat,
    Kind::RproxyDaemon,
    Kind::RproxyMetrics,
    Kind::Haproxy,
];
/// The same over UDP: all but HAProxy, which relays no UDP.
pub(crate) const BRIDGE_UDP: &[Kind] = match BRIDGE_TCP.split_last() {
    Some((Kind::Haproxy, rest)) => rest,
    _ => panic!("BRIDGE_TCP ends with HAProxy"),
};
/// A client on another network, routed through the host.
pub(crate) const REMOTE: &[Kind] = &[
    Kind::Direct,
    Kind::Rproxy,
    Kind::DockerProxy,
    Kind::RproxyNat,
];
/// A process of the host dialling the published port on loopback: the userland proxies
/// listening there, and the socket hooks, which serve only host clients (with `--dockerd`,
/// also as the docker-ports deployment); HAProxy last.
pub(crate) const HOST_TCP: &[Kind] = &[
    Kind::Direct,
    Kind::Rproxy,
    Kind::RproxySocket,
    Kind::DockerProxy,
    Kind::DockerPorts,
    Kind::Haproxy,
];
pub(crate) const HOST_UDP: &[Kind] = match HOST_TCP.split_last() {
    Some((Kind::Haproxy, rest)) => rest,
    _ => panic!("HOST_TCP ends with HAProxy"),
};
pub(crate) const PROXIES: &[Kind] = &[Kind::Rproxy, Kind::DockerProxy, Kind::Socat];
/// socat forks a process per connection: 10,000 of them are no "memory per connection" figure.
pub(crate) const ONE_PROCESS: &[Kind] = &[Kind::Rproxy, Kind::DockerProxy, Kind::RproxyDaemon];
pub(crate) const BULK: &[Metric] = &[m("Gb/s", 2, true)];
pub(crate) const RR: &[Metric] = &[
    m("k req/s", 1, true),
    m("p50 µs", 1, true),
    m("p99 µs", 1, true),
];
pub(crate) const WRK: &[Metric] = &[m("k conn/s", 2, true), m("errors", 0, false)];
pub(crate) const FIXED: &[Metric] = &[
    m("k conn/s done", 2, true),
    m("errors", 0, false),
    m("not started", 0, false),
    m("p99 ms", 2, true),
];
pub(crate) const UDP: &[Metric] = &[m("delivered Mb/s", 0, true), m("loss %", 2, false)];
pub(crate) const FLOWS: &[Metric] = &[m("replies %", 2, true), m("misrouted", 0, false)];
pub(crate) const IDLE: &[Metric] = &[
    m("PSS KB/conn", 2, true),
    m("private KB/conn", 2, true),
    m("connections", 0, false),
];
pub(crate) const PORTS: &[Metric] = &[
    m("ready ms", 0, true),
    m("RSS MB", 1, true),
    m("PSS MB", 1, true),
    m("threads", 0, true),
    m("processes", 0, false),
];

pub(crate) fn workloads(o: &Options) -> Vec<Workload> {
    let s = o.seconds;
    let w = |name, about: String, metrics, kinds, run| Workload {
        name,
        about,
        metrics,
        kinds,
        run,
    };
    vec![
        w("tcp-bulk-1", format!("TCP bulk, 1 stream, client → container, {s} s (iperf3)"), BULK, BRIDGE_TCP,
            |c, k, p| tcp_bulk(c, BRIDGE_CLIENT, k, p, 1, false)),
        w("tcp-bulk-1-rev", format!("TCP bulk, 1 stream, container → client, {s} s (iperf3 -R)"), BULK, BRIDGE_TCP,
            |c, k, p| tcp_bulk(c, BRIDGE_CLIENT, k, p, 1, true)),
        w("tcp-bulk-4", format!("TCP bulk, 4 streams, client → container, {s} s (iperf3 -P 4)"), BULK, BRIDGE_TCP,
            |c, k, p| tcp_bulk(c, BRIDGE_CLIENT, k, p, 4, false)),
        w("tcp-bulk-4-rev", format!("TCP bulk, 4 streams, container → client, {s} s (iperf3 -P 4 -R)"), BULK, BRIDGE_TCP,
            |c, k, p| tcp_bulk(c, BRIDGE_CLIENT, k, p, 4, true)),
        w("remote-bulk-1", format!("TCP bulk, 1 stream, from a client on another network routed through the host ({NS_REMOTE}) → container, {s} s (iperf3); direct is routed too"), BULK, REMOTE,
            |c, k, p| tcp_bulk(c, REMOTE_CLIENT, k, p, 1, false)),
        w("remote-bulk-4", format!("as remote-bulk-1 with 4 streams, {s} s (iperf3 -P 4)"), BULK, REMOTE,
            |c, k, p| tcp_bulk(c, REMOTE_CLIENT, k, p, 4, false)),
        w("rr", format!("TCP request/response, 64 B, one connection, unpinned, {s} s (sockperf ping-pong, full round trip)"), RR, BRIDGE_TCP,
            |c, k, p| request_response(c, BRIDGE_CLIENT, k, p, false)),
        w("rr-pinned", format!("as rr, with client, proxy and server all on CPU {PIN_CPU} (taskset)"), RR, BRIDGE_TCP,
            |c, k, p| request_response(c, BRIDGE_CLIENT, k, p, true)),
        w("conn-rate", format!("TCP connections/s, 16 clients, closed loop, one request per connection, {s} s (wrk -t2 -c16, Connection: close)"), WRK, BRIDGE_TCP,
            |c, k, p| conn_rate(c, BRIDGE_CLIENT, k, p)),
        w("conn-fixed", format!("TCP connections at {} /s offered for {s} s, 16 client threads, open loop (own generator; errors: connections that failed; not started: still queued behind busy clients when the run ended, {s} s + 5 s; p99 from the scheduled start)", o.rate), FIXED, BRIDGE_TCP,
            conn_fixed),
        w("udp-bulk", format!("UDP 1,400 B datagrams, unlimited rate, client → container, {s} s (iperf3 -u -b 0)"), UDP, BRIDGE_UDP,
            |c, k, p| udp_bulk(c, BRIDGE_CLIENT, k, p, "0", false)),
        w("udp-bulk-rev", format!("UDP 1,400 B datagrams, unlimited rate, container → client (the proxy's reply path), {s} s (iperf3 -u -b 0 -R)"), UDP, BRIDGE_UDP,
            |c, k, p| udp_bulk(c, BRIDGE_CLIENT, k, p, "0", true)),
        w("udp-500m", format!("UDP 1,400 B datagrams at 500 Mb/s, client → container, {s} s (iperf3 -u -b 500M)"), UDP, BRIDGE_UDP,
            |c, k, p| udp_bulk(c, BRIDGE_CLIENT, k, p, "500M", false)),
        w("udp-flows", format!("{} concurrent UDP flows (one client socket each) × {} datagrams to an echo server, sent at ≤10,000 datagrams/s (own code; misrouted: a reply from another address or with another flow's payload)", o.flows, o.flow_msgs), FLOWS, BRIDGE_UDP,
            udp_flows),
        w("idle-conns", format!("{} idle proxied TCP connections (fewer where RLIMIT_NOFILE, {}, cannot hold them: docker-proxy keeps 6 fds per idle connection, rproxy 2) that have carried nothing yet: the proxy's user-space memory per connection (PSS and private, /proc/PID/smaps_rollup after minus before, ÷ N); then 100 of them echo a byte to prove they work", o.idle, o.nofile), IDLE, ONE_PROCESS,
            idle_conns),
        w("ports", format!("{} TCP ports: one `rproxy daemon -p RANGE` (in the rproxy column) vs a docker-proxy / socat process per port; ready = all listening", o.ports), PORTS, PROXIES,
            many_ports),
        // Host clients: a process of the host dials 127.0.0.1:PORT, where the proxies listen;
        // direct dials the container's address from the host.
        w("host-bulk-1", format!("as tcp-bulk-1 from a host process to 127.0.0.1 (direct: to the container's address), {s} s (iperf3)"), BULK, HOST_TCP,
            |c, k, p| tcp_bulk(c, HOST_CLIENT, k, p, 1, false)),
        w("host-bulk-1-rev", format!("as host-bulk-1, container → host, {s} s (iperf3 -R)"), BULK, HOST_TCP,
            |c, k, p| tcp_bulk(c, HOST_CLIENT, k, p, 1, true)),
        w("host-bulk-4", format!("as host-bulk-1 with 4 streams, {s} s (iperf3 -P 4)"), BULK, HOST_TCP,
            |c, k, p| tcp_bulk(c, HOST_CLIENT, k, p, 4, false)),
        w("host-bulk-4-rev", format!("as host-bulk-4, container → host, {s} s (iperf3 -P 4 -R)"), BULK, HOST_TCP,
            |c, k, p| tcp_bulk(c, HOST_CLIENT, k, p, 4, true)),
        w("host-rr", format!("as rr from a host process to 127.0.0.1, {s} s (sockperf ping-pong)"), RR, HOST_TCP,
            |c, k, p| request_response(c, HOST_CLIENT, k, p, false)),
        w("host-rr-pinned", format!("as host-rr, with client, proxy and server all on CPU {PIN_CPU} (taskset)"), RR, HOST_TCP,
            |c, k, p| request_response(c, HOST_CLIENT, k, p, true)),
        w("host-conn-rate", format!("as conn-rate from a host process to 127.0.0.1, {s} s (wrk -t2 -c16, Connection: close)"), WRK, HOST_TCP,
            |c, k, p| conn_rate(c, HOST_CLIENT, k, p)),
        w("host-udp-bulk", format!("as udp-bulk from a host process to 127.0.0.1, {s} s (iperf3 -u -b 0)"), UDP, HOST_UDP,
            |c, k, p| udp_bulk(c, HOST_CLIENT, k, p, "0", false)),
    ]
}
