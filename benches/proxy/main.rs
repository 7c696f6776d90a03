//! Benchmark harness: the same workloads through no proxy (`direct`), rproxy (per port, and as
//! the daemon with and without metrics or kernel NAT), docker-proxy (when installed), socat and
//! HAProxy (TCP), interleaved round-robin and repeated, reported as one Markdown table of
//! medians (min–max) with ratios to docker-proxy and to direct.
//!
//! As root (it makes network namespaces, a bridge and iptables rules for the bridge):
//!
//! ```text
//! cargo bench --bench proxy                      # full run: 3 rounds of 5 s (~38 min on 2 cores)
//! cargo bench --bench proxy -- --smoke           # every workload once, briefly (~3.5 min)
//! cargo bench --bench proxy -- --only tcp-bulk,rr --rounds 5 --seconds 10 --out /tmp/t.md
//! cargo bench --bench proxy -- --dockerd --rounds 5  # host-* against a real dockerd (~15 min)
//! ```
//!
//! The topology mirrors a published port on a Docker bridge network:
//!
//! ```text
//! netns rpxb-cli 10.231.0.3 ──┐
//!                             ├── bridge rpxb0 10.231.0.1, host netns: the proxies listen here
//! netns rpxb-ctr 10.231.0.2 ──┘   ("container": the servers)
//! ```
//!
//! Clients run in rpxb-cli and connect to 10.231.0.1:PORT, where the proxy (host netns) forwards
//! to 10.231.0.2:PORT, as dockerd's userland proxy does; `direct` talks to 10.231.0.2:PORT over
//! the bridge. The host-* workloads' clients are host processes dialling 127.0.0.1:PORT, where
//! the proxies listen then (and the socket hooks of `rproxy-socket` act); their `direct` dials
//! 10.231.0.2:PORT from the host. Every process started is stopped by PID, and the namespaces, bridge, iptables
//! rules and temporary files go on exit, on panic and on SIGINT/SIGTERM/SIGHUP.
//!
//! `--dockerd` runs the host-* workloads against a container of a real dockerd instead, run
//! with `--userland-proxy=false` and followed by `rproxy daemon --docker-ports` (the
//! `rproxy-docker-ports` column): see dockerd.rs. Its container, dockerd and containerd go
//! the same ways.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags};
use nix::sched::{setns, CloneFlags};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

const BRIDGE: &str = "rpxb0";
const NS_CTR: &str = "rpxb-ctr";
const NS_CLI: &str = "rpxb-cli";
/// A client on another network, routed through the host to the bridge: what kernel NAT serves
/// (clients on the bridge itself are hairpin traffic, which stays in userland).
const NS_REMOTE: &str = "rpxb-rem";
/// Host-side veth, namespace, address inside it.
const VETHS: [(&str, &str, &str); 2] = [
    ("rpxb-ctr0", NS_CTR, "10.231.0.2/24"),
    ("rpxb-cli0", NS_CLI, "10.231.0.3/24"),
];
/// The remote client's link: host-side veth and address, namespace, address inside it.
const UPLINK: (&str, &str, &str, &str) = ("rpxb-up0", "10.232.0.1/24", NS_REMOTE, "10.232.0.2/24");
const UPLINK_GW: Ipv4Addr = Ipv4Addr::new(10, 232, 0, 1);
const GW: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
const CTR: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);
/// (table, chain, rule) for the bridge. FORWARD: once dockerd has run, its policy is DROP, and
/// bridged traffic (direct) passes through it. raw: our traffic skips connection tracking,
/// whose table is shared by the whole machine: tens of thousands of short connections fill it
/// ("nf_conntrack: table full, dropping packet") for every user of it — except what goes to
/// the remote client's network, which kernel NAT translates; and the host clients' loopback
/// leg to the proxies (only the harness's ports: other loopback traffic is left alone).
const IPTABLES_RULES: [(&str, &str, &str); 6] = [
    ("filter", "FORWARD", "-i rpxb0 -j ACCEPT"),
    ("filter", "FORWARD", "-o rpxb0 -j ACCEPT"),
    (
        "raw",
        "PREROUTING",
        "-i rpxb0 ! -d 10.232.0.0/24 -j CT --notrack",
    ),
    ("raw", "OUTPUT", "-o rpxb0 -j CT --notrack"),
    (
        "raw",
        "OUTPUT",
        "-o lo -p tcp -m multiport --ports 23000:25999 -j CT --notrack",
    ),
    (
        "raw",
        "OUTPUT",
        "-o lo -p udp -m multiport --ports 23000:25999 -j CT --notrack",
    ),
];
const LOCK_PATH: &str = "/run/rproxy-bench.lock";
/// Each workload gets 100 ports from here, up to NPORTS_BASE (23000–25999: 30 workloads, which
/// `run` checks): a fresh port per measurement keeps one measurement's TIME_WAIT sockets out of
/// the next one's way.
const PORT_BASE: u16 = 23000;
/// The N-ports workload uses 26000..26000+N.
const NPORTS_BASE: u16 = 26000;
const PIN_CPU: &str = "0";
/// RPROXY_SOCKET for docker-mode rproxy: never hand a port to a daemon the machine may run.
const NO_DAEMON: &str = "/nonexistent/rproxy-bench.sock";
const DOCKER_PROXY: &str = "/usr/sbin/docker-proxy";
/// Tools the harness drives (docker-proxy is optional: its column says "not installed").
const TOOLS: [&str; 9] = [
    "ip", "iptables", "sysctl", "taskset", "iperf3", "sockperf", "wrk", "socat", "haproxy",
];
const HTTP_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
const HTTP_RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nok";

const USAGE: &str = "usage: cargo bench --bench proxy -- [options]   (as root)
  --smoke            every workload once, briefly (1 round, 1 s, small counts)
  --rounds N         rounds; each round runs every proxy once, round-robin (default 3)
  --seconds S        seconds per timed run (default 5)
  --only LIST        comma-separated workloads or prefixes (e.g. tcp-bulk,rr-pinned)
  --proxies LIST     subset of direct,rproxy,docker-proxy,socat,rproxy-daemon,rproxy-nat,
                     rproxy-daemon+metrics,haproxy,rproxy-socket (default: all)
  --dockerd          the host-* workloads against a container of a real dockerd run with
                     --userland-proxy=false, adding the rproxy-docker-ports column (the
                     docker-ports deployment); proxies: direct,rproxy-docker-ports,docker-proxy
                     by default, also rproxy,haproxy,rproxy-socket; at most 10 rounds
  --flows N          udp-flows: concurrent flows (default 1000)
  --flow-msgs N      udp-flows: datagrams per flow (default 5, at most 64)
  --idle N           idle-conns: connections (default 10000)
  --ports N          ports: mappings (default 100)
  --rate N           conn-fixed: offered connections/s (default 10000)
  --rproxy PATH      rproxy binary (default: this build's)
  --docker-proxy P   docker-proxy binary (default /usr/sbin/docker-proxy)
  --out FILE         also write the Markdown table to FILE
  --json FILE        also write every sample as JSON to FILE";

// Explicit paths: tests/bench_smoke.rs includes this file as a module of its own crate,
// where the default module paths would point elsewhere.
#[path = "capacity.rs"]
mod capacity;
#[path = "catalog.rs"]
mod catalog;
#[path = "cleanup.rs"]
mod cleanup;
#[path = "dockerd.rs"]
mod dockerd;
#[path = "options.rs"]
mod options;
#[path = "procfs.rs"]
mod procfs;
#[path = "procs.rs"]
mod procs;
#[path = "proxies.rs"]
mod proxies;
#[path = "servers.rs"]
mod servers;
#[path = "tcp.rs"]
mod tcp;
#[path = "topology.rs"]
mod topology;
#[path = "udp.rs"]
mod udp;

pub(crate) use capacity::*;
pub(crate) use catalog::*;
pub(crate) use cleanup::*;
pub(crate) use dockerd::*;
pub(crate) use options::*;
pub(crate) use procfs::*;
pub(crate) use procs::*;
pub(crate) use proxies::*;
pub(crate) use servers::*;
pub(crate) use tcp::*;
pub(crate) use topology::*;
pub(crate) use udp::*;

// ---------------------------------------------------------------------------------------------
// Driver and report

pub(crate) struct Sample {
    pub(crate) workload: usize,
    pub(crate) kind: Kind,
    pub(crate) round: usize,
    pub(crate) result: Result<Vec<f64>, String>,
}

/// What a run produced: the Markdown table (printed by `main`), the workloads that ran, and
/// every measurement that failed.
pub struct Report {
    pub table: String,
    pub workloads: Vec<String>,
    pub errors: Vec<String>,
}

/// Raises RLIMIT_NOFILE (to 65,536 if allowed: raising the hard limit needs CAP_SYS_RESOURCE,
/// else to the hard limit) and returns the soft limit now in force. The proxies inherit it.
pub(crate) fn raise_nofile() -> Result<u64, String> {
    let want = 65536;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| format!("getrlimit: {e}"))?;
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return Ok(want);
    }
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            .map_err(|e| format!("setrlimit NOFILE {hard}: {e}"))?;
    }
    Ok(hard.max(soft))
}

pub(crate) fn selected<'a>(
    all: &'a [Workload],
    only: &[String],
) -> Result<Vec<&'a Workload>, String> {
    let chosen: Vec<&Workload> = all
        .iter()
        .filter(|w| only.is_empty() || only.iter().any(|o| w.name.starts_with(o.as_str())))
        .collect();
    match chosen.is_empty() {
        true => Err(format!(
            "--only {} matches no workload; workloads: {}",
            only.join(","),
            all.iter().map(|w| w.name).collect::<Vec<_>>().join(", ")
        )),
        false => Ok(chosen),
    }
}

/// The port of one measurement: 100 per workload, a fresh one per round and proxy.
pub(crate) fn port_for(windex: usize, round: usize, kind: Kind) -> u16 {
    PORT_BASE + windex as u16 * 100 + ((round * KINDS.len() + kind.index()) % 100) as u16
}

/// Runs the benchmark (as root) and returns its report. Progress goes to stderr.
pub fn run(args: &[String]) -> Result<Report, String> {
    let mut o = parse_args(args)?;
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "needs root: it creates network namespaces, a bridge and iptables rules".into(),
        );
    }
    let missing = missing_tools();
    if !missing.is_empty() {
        return Err(format!(
            "missing tools: {} (run .ci/install-deps)",
            missing.join(", ")
        ));
    }
    if !o.rproxy.is_file() {
        return Err(format!("no rproxy binary at {}", o.rproxy.display()));
    }
    o.nofile = raise_nofile()?;
    let all = workloads(&o);
    if usize::from(PORT_BASE) + all.len() * 100 > usize::from(NPORTS_BASE) {
        return Err(format!(
            "{} workloads take ports {PORT_BASE} up to past {NPORTS_BASE}, where `ports` starts",
            all.len()
        ));
    }
    let chosen = selected(&all, &o.only)?;
    if let Some(w) = chosen
        .iter()
        .find(|w| o.dockerd && !w.name.starts_with("host-"))
    {
        return Err(format!(
            "--dockerd runs the host-* workloads only, not {}",
            w.name
        ));
    }
    install_signal_cleanup()?;
    registry().closing = false;
    let _guard = CleanupGuard;
    let dir = std::env::temp_dir().join(format!("rproxy-bench.{}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    registry().tmp = Some(dir.clone());
    let have_docker_proxy = o.docker_proxy.is_file();
    if !have_docker_proxy {
        eprintln!(
            "bench: {} not installed: its column stays empty",
            o.docker_proxy.display()
        );
    }
    let kinds: Vec<Kind> = KINDS
        .into_iter()
        .filter(|k| o.proxies.contains(k) && (*k != Kind::DockerProxy || have_docker_proxy))
        .collect();
    let date = sh(&["date", "-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let started = Instant::now();
    let (setup, target): (Box<dyn std::any::Any>, Target) = match o.dockerd {
        false => (Box::new(Topology::up()?), Target::Netns),
        true => {
            // The deployment's ports, published with the container before the run.
            let deployment = kinds.contains(&Kind::DockerPorts);
            let ports: BTreeSet<u16> = chosen
                .iter()
                .filter(|w| deployment && w.kinds.contains(&Kind::DockerPorts))
                .flat_map(|w| {
                    let windex = all.iter().position(|x| x.name == w.name).unwrap_or(0);
                    (0..o.rounds).map(move |r| port_for(windex, r, Kind::DockerPorts))
                })
                .collect();
            let (d, c) = Dockerd::up(&dir, &o.rproxy, &ports, deployment)?;
            (Box::new(d), Target::Container(c))
        }
    };
    let ctx = Ctx {
        o,
        dir,
        kinds,
        target,
    };
    let total: usize = chosen
        .iter()
        .map(|w| ctx.kinds.iter().filter(|k| w.kinds.contains(k)).count() * ctx.o.rounds)
        .sum();
    let mut samples = Vec::new();
    for (wi, w) in chosen.iter().enumerate() {
        let windex = all.iter().position(|x| x.name == w.name).unwrap_or(0);
        eprintln!("bench: {}: {}", w.name, w.about);
        for round in 0..ctx.o.rounds {
            let n = ctx.kinds.len();
            for i in 0..n {
                // Rotated each round, so no proxy always runs first or right after another.
                let kind = ctx.kinds[(i + round) % n];
                if !w.kinds.contains(&kind) {
                    continue;
                }
                let port = port_for(windex, round, kind);
                let t = Instant::now();
                let result = (w.run)(&ctx, kind, port);
                let shown = match &result {
                    Ok(v) => v
                        .iter()
                        .zip(w.metrics)
                        .map(|(v, m)| format!("{} {}", fmt_value(*v, m.decimals), m.name))
                        .collect::<Vec<_>>()
                        .join(", "),
                    Err(e) => format!("ERROR: {e}"),
                };
                eprintln!(
                    "  [{}/{total}] {} round {}/{} {}: {shown} ({:.1} s)",
                    samples.len() + 1,
                    w.name,
                    round + 1,
                    ctx.o.rounds,
                    kind.name(),
                    t.elapsed().as_secs_f64()
                );
                samples.push(Sample {
                    workload: wi,
                    kind,
                    round,
                    result,
                });
                ctx.settle();
            }
        }
    }
    drop(setup);
    let elapsed = started.elapsed().as_secs();
    eprintln!("bench: done in {}m{:02}s", elapsed / 60, elapsed % 60);
    let report = report(&ctx, &chosen, &samples, &date, have_docker_proxy);
    if let Some(path) = &ctx.o.out {
        fs::write(path, &report.table).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = &ctx.o.json {
        let json = samples_json(&ctx, &chosen, &samples, &date);
        fs::write(
            path,
            serde_json::to_string_pretty(&json).unwrap_or_default(),
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(report)
}

pub(crate) fn fmt_value(v: f64, decimals: usize) -> String {
    format!("{v:.decimals$}")
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

pub(crate) fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The successful values of one metric of one proxy in one workload, sorted, and the failures.
pub(crate) fn values(samples: &[Sample], w: usize, kind: Kind, metric: usize) -> (Vec<f64>, usize) {
    let mut v = Vec::new();
    let mut failed = 0;
    for s in samples.iter().filter(|s| s.workload == w && s.kind == kind) {
        match &s.result {
            Ok(r) => v.extend(r.get(metric).copied().filter(|x| x.is_finite())),
            Err(_) => failed += 1,
        }
    }
    v.sort_by(f64::total_cmp);
    (v, failed)
}

pub(crate) const RATIOS: [(Kind, Kind); 12] = [
    (Kind::Rproxy, Kind::DockerProxy),
    (Kind::RproxyDaemon, Kind::DockerProxy),
    (Kind::Rproxy, Kind::Direct),
    (Kind::DockerProxy, Kind::Direct),
    (Kind::Socat, Kind::DockerProxy),
    (Kind::RproxyNat, Kind::Direct),
    (Kind::RproxyMetrics, Kind::RproxyDaemon),
    (Kind::Haproxy, Kind::DockerProxy),
    (Kind::RproxySocket, Kind::Direct),
    (Kind::RproxySocket, Kind::DockerProxy),
    (Kind::DockerPorts, Kind::Direct),
    (Kind::DockerPorts, Kind::DockerProxy),
];

pub(crate) fn report(
    ctx: &Ctx,
    chosen: &[&Workload],
    samples: &[Sample],
    date: &str,
    have_dp: bool,
) -> Report {
    let mut t = String::new();
    let o = &ctx.o;
    t += &format!("### Proxy benchmark, {}\n\n", date.trim());
    t += &format!("`{}` (as root)\n\n", o.command);
    let uname = sh(&["uname", "-r"]).unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let version = |pkg: &str| {
        sh(&["dpkg-query", "-W", "-f", "${Version}", pkg]).unwrap_or_else(|_| "?".into())
    };
    t += &format!(
        "{cpus} CPUs, Linux {}; docker-proxy: {}; iperf3 {}, sockperf {}, wrk {}, socat {}, haproxy {}. \
         Each cell: median (min–max) of {} round(s) of {} s, the proxies interleaved round-robin; \
         ratios divide medians (for latency, time and memory lower is better).\n\n",
        uname.trim(),
        match have_dp {
            true => format!(
                "{} (docker.io {})",
                o.docker_proxy.display(),
                version("docker.io")
            ),
            false => "not installed".into(),
        },
        version("iperf3"),
        version("sockperf"),
        version("wrk"),
        version("socat"),
        version("haproxy"),
        o.rounds,
        o.seconds
    );
    // Only the columns this run can fill: a proxy that was picked and that serves one of the
    // workloads chosen, a ratio of two such that share a workload.
    let serves = |k: Kind| o.proxies.contains(&k) && chosen.iter().any(|w| w.kinds.contains(&k));
    let columns: Vec<Kind> = KINDS.into_iter().filter(|k| serves(*k)).collect();
    let ratios: Vec<(Kind, Kind)> = RATIOS
        .into_iter()
        .filter(|(a, b)| {
            serves(*a)
                && serves(*b)
                && chosen
                    .iter()
                    .any(|w| w.kinds.contains(a) && w.kinds.contains(b))
        })
        .collect();
    t += "| workload | metric |";
    for k in &columns {
        t += &format!(" {} |", k.name());
    }
    for (a, b) in &ratios {
        t += &format!(" {} ÷ {} |", a.name(), b.name());
    }
    t += "\n|---|---|";
    t += &"---:|".repeat(columns.len() + ratios.len());
    t += "\n";
    let mut errors = Vec::new();
    for (wi, w) in chosen.iter().enumerate() {
        for (mi, m) in w.metrics.iter().enumerate() {
            t += &format!("| {} | {} |", w.name, m.name);
            let mut medians = [None; KINDS.len()];
            for &k in &columns {
                let cell = if !w.kinds.contains(&k) {
                    "n/a".to_string()
                } else if k == Kind::DockerProxy && !have_dp {
                    "not installed".to_string()
                } else if !ctx.kinds.contains(&k) {
                    "—".to_string()
                } else {
                    let (v, failed) = values(samples, wi, k, mi);
                    medians[k.index()] = median(&v);
                    let errs = match failed {
                        0 => String::new(),
                        n => format!(" ({n} ERR)"),
                    };
                    match (median(&v), v.first(), v.last()) {
                        (Some(med), Some(lo), Some(hi)) if v.len() > 1 => format!(
                            "{} ({}–{}){errs}",
                            fmt_value(med, m.decimals),
                            fmt_value(*lo, m.decimals),
                            fmt_value(*hi, m.decimals)
                        ),
                        (Some(med), _, _) => format!("{}{errs}", fmt_value(med, m.decimals)),
                        _ => "ERR".to_string(),
                    }
                };
                t += &format!(" {cell} |");
            }
            for (a, b) in &ratios {
                let cell = match (m.ratio, medians[a.index()], medians[b.index()]) {
                    (true, Some(x), Some(y)) if y != 0.0 => format!("{:.2}", x / y),
                    _ => "—".to_string(),
                };
                t += &format!(" {cell} |");
            }
            t += "\n";
        }
        for s in samples.iter().filter(|s| s.workload == wi) {
            if let Err(e) = &s.result {
                errors.push(format!(
                    "{} round {} {}: {e}",
                    w.name,
                    s.round + 1,
                    s.kind.name()
                ));
            }
        }
    }
    t += "\nWorkloads:\n";
    for w in chosen {
        t += &format!("- `{}`: {}\n", w.name, w.about);
    }
    t += &match &ctx.target {
        Target::Netns => setup_netns(),
        Target::Container(c) => setup_dockerd(c),
    };
    if !errors.is_empty() {
        t += "\nErrors:\n";
        for e in &errors {
            t += &format!("- {e}\n");
        }
    }
    Report {
        table: t,
        workloads: chosen.iter().map(|w| w.name.to_string()).collect(),
        errors,
    }
}

/// How the bridge topology's proxies and clients run, for under the table.
fn setup_netns() -> String {
    format!(
        "\nProxies listen on {GW} (bridge {BRIDGE}, host netns) and forward to {CTR} (netns {NS_CTR}); \
         clients run in netns {NS_CLI}. rproxy and docker-proxy run as dockerd runs them \
         (`-proto P -host-ip {GW} -host-port N -container-ip {CTR} -container-port N`, status pipe on fd 3); \
         socat as `socat TCP4-LISTEN:N,bind={GW},fork,reuseaddr TCP4:{CTR}:N` (UDP4 likewise); \
         haproxy (TCP only) as `haproxy -db -f CONFIG`: mode tcp, `bind {GW}:N`, `server {CTR}:N`, \
         `option splice-request` and `splice-response` with `tune.pipesize 1048576` (splicing both \
         ways through 1 MiB pipes, as rproxy and docker-proxy do), its default of one thread per \
         CPU it may run on; \
         direct sends to {CTR} over the bridge. The bridge's traffic is exempt from connection \
         tracking (iptables raw `CT --notrack`), whose table the whole machine shares. \
         remote-* clients run in netns {NS_REMOTE} on their own link ({UPLINK_GW}), which the host \
         routes to the bridge (forwarding on for those two interfaces only), and are tracked; \
         rproxy-nat is `rproxy daemon --nat=require -p {GW}:N:{CTR}:N` and each of its runs is \
         checked to have been served by its kernel rules (`rproxy ls`). \
         host-* clients are processes of the host dialling {HOST}:N, where the proxies listen for \
         them (`-host-ip {HOST}`, `bind {HOST}:N`), and direct dials {CTR}:N from the host; their \
         loopback leg is exempt from tracking too (ports {PORT_BASE}–{last_port}); rproxy-socket \
         is `rproxy daemon --socket-lb=require -p {HOST}:N:{CTR}:N`, its cgroup socket hooks \
         connecting the client straight to {CTR}:N, and each of its runs is checked to have been \
         served by them (`rproxy ls`: SOCKET socket, SOCKET_CONNS above 0, no userland \
         connection).\n",
        HOST = HOST_CLIENT.front,
        last_port = NPORTS_BASE - 1,
    )
}

/// How `--dockerd`'s container, proxies and clients run, for under the table.
fn setup_dockerd(c: &Container) -> String {
    let ip = c.ip;
    format!(
        "\ndockerd {version} (`--userland-proxy=false`, a containerd and roots of its own) runs \
         one container at {ip} on docker0, from an image imported from a tarball (busybox; the \
         host's /usr bound read-only, so iperf3, sockperf and nginx are the host's); each \
         measurement starts its server in it with `docker exec` (`iperf3 -s`, `sockperf server`, \
         nginx with one worker answering \"ok\"). Clients are processes of the host dialling \
         {HOST}:N; direct dials {ip}:N from the host. rproxy-docker-ports is the docker-ports \
         deployment: the container publishes its ports (`-p N:N -p N:N/udp`), and one `rproxy \
         daemon --docker-ports --docker-host unix://…`, started before it, follows dockerd for \
         the whole run; each of its measurements is checked to have been carried by the socket \
         hooks (`rproxy ls`: SOCKET socket, SOCKET_CONNS above 0, no userland connection). \
         docker-proxy (and rproxy) start per measurement as dockerd starts its userland proxy \
         for `-p {HOST}:N:N` (`-proto P -host-ip {HOST} -host-port N -container-ip {ip} \
         -container-port N`, status pipe on fd 3), on ports the container does not publish: \
         with dockerd's userland proxy on, a {HOST} client reaches exactly that process \
         (dockerd's DNAT leaves 127.0.0.0/8 to it). The measured traffic (ports \
         {PORT_BASE}–{last_port} on docker0 and lo) is exempt from connection tracking (iptables \
         raw `CT --notrack`), whose table the whole machine shares; so a host client the hooks \
         missed would find no DNAT either.\n",
        version = c.version,
        HOST = HOST_CLIENT.front,
        last_port = NPORTS_BASE - 1,
    )
}

pub(crate) fn samples_json(
    ctx: &Ctx,
    chosen: &[&Workload],
    samples: &[Sample],
    date: &str,
) -> Value {
    let rows: Vec<Value> = samples
        .iter()
        .map(|s| {
            let w = chosen[s.workload];
            let result = match &s.result {
                Ok(v) => {
                    let metrics: serde_json::Map<String, Value> = w
                        .metrics
                        .iter()
                        .zip(v)
                        .map(|(m, v)| (m.name.to_string(), json!(v)))
                        .collect();
                    json!({ "metrics": metrics })
                }
                Err(e) => json!({ "error": e }),
            };
            json!({
                "workload": w.name,
                "proxy": s.kind.name(),
                "round": s.round + 1,
                "result": result,
            })
        })
        .collect();
    json!({
        "date": date.trim(),
        "command": ctx.o.command,
        "rounds": ctx.o.rounds,
        "seconds": ctx.o.seconds,
        "samples": rows,
    })
}

#[allow(dead_code)] // the smoke test includes this file as a module and calls `run` itself
pub(crate) fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return;
    }
    match run(&args) {
        Ok(report) => {
            print!("{}", report.table);
            eprintln!("bench: workloads: {}", report.workloads.join(", "));
            if !report.errors.is_empty() {
                eprintln!(
                    "bench: {} measurement(s) failed (listed under the table)",
                    report.errors.len()
                );
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    }
}
