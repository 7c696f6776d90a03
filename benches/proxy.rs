//! Benchmark harness: the same workloads through no proxy (`direct`), rproxy, docker-proxy (when
//! installed) and socat, interleaved round-robin and repeated, reported as one Markdown table of
//! medians (min–max) with ratios to docker-proxy and to direct.
//!
//! As root (it makes network namespaces, a bridge and iptables rules for the bridge):
//!
//! ```text
//! cargo bench --bench proxy                      # full run: 3 rounds of 5 s (~15 min on 2 cores)
//! cargo bench --bench proxy -- --smoke           # every workload once, briefly (< 2 min)
//! cargo bench --bench proxy -- --only tcp-bulk,rr --rounds 5 --seconds 10 --out /tmp/t.md
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
//! the bridge. Every process started is stopped by PID, and the namespaces, bridge, iptables
//! rules and temporary files go on exit, on panic and on SIGINT/SIGTERM/SIGHUP.

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
/// Host-side veth, namespace, address inside it.
const VETHS: [(&str, &str, &str); 2] = [
    ("rpxb-ctr0", NS_CTR, "10.231.0.2/24"),
    ("rpxb-cli0", NS_CLI, "10.231.0.3/24"),
];
const GW: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
const CTR: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);
/// (table, chain, direction, target) for the bridge. FORWARD: once dockerd has run, its policy
/// is DROP, and bridged traffic (direct) passes through it. raw: our traffic skips connection
/// tracking, whose table is shared by the whole machine: tens of thousands of short
/// connections fill it ("nf_conntrack: table full, dropping packet") for every user of it.
const IPTABLES_RULES: [(&str, &str, &str, &str); 4] = [
    ("filter", "FORWARD", "-i", "ACCEPT"),
    ("filter", "FORWARD", "-o", "ACCEPT"),
    ("raw", "PREROUTING", "-i", "CT --notrack"),
    ("raw", "OUTPUT", "-o", "CT --notrack"),
];
const LOCK_PATH: &str = "/run/rproxy-bench.lock";
/// Each workload gets 100 ports from here (23000–24299): a fresh port per measurement keeps one
/// measurement's TIME_WAIT sockets out of the next one's way.
const PORT_BASE: u16 = 23000;
/// The N-ports workload uses 25000..25000+N.
const NPORTS_BASE: u16 = 25000;
const PIN_CPU: &str = "0";
/// RPROXY_SOCKET for docker-mode rproxy: never hand a port to a daemon the machine may run.
const NO_DAEMON: &str = "/nonexistent/rproxy-bench.sock";
const DOCKER_PROXY: &str = "/usr/sbin/docker-proxy";
/// Tools the harness drives (docker-proxy is optional: its column says "not installed").
const TOOLS: [&str; 8] = [
    "ip", "iptables", "sysctl", "taskset", "iperf3", "sockperf", "wrk", "socat",
];
const HTTP_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
const HTTP_RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nok";

const USAGE: &str = "usage: cargo bench --bench proxy -- [options]   (as root)
  --smoke            every workload once, briefly (1 round, 1 s, small counts)
  --rounds N         rounds; each round runs every proxy once, round-robin (default 3)
  --seconds S        seconds per timed run (default 5)
  --only LIST        comma-separated workloads or prefixes (e.g. tcp-bulk,rr-pinned)
  --proxies LIST     subset of direct,rproxy,docker-proxy,socat
  --flows N          udp-flows: concurrent flows (default 1000)
  --flow-msgs N      udp-flows: datagrams per flow (default 5, at most 64)
  --idle N           idle-conns: connections (default 10000)
  --ports N          ports: mappings (default 100)
  --rate N           conn-fixed: offered connections/s (default 10000)
  --rproxy PATH      rproxy binary (default: this build's)
  --docker-proxy P   docker-proxy binary (default /usr/sbin/docker-proxy)
  --out FILE         also write the Markdown table to FILE
  --json FILE        also write every sample as JSON to FILE";

// ---------------------------------------------------------------------------------------------
// Options

/// What runs, and where it goes.
#[derive(Clone, Debug)]
pub struct Options {
    pub smoke: bool,
    pub rounds: usize,
    pub seconds: u64,
    pub only: Vec<String>,
    pub proxies: Vec<Kind>,
    pub flows: usize,
    pub flow_msgs: usize,
    pub idle: usize,
    /// RLIMIT_NOFILE in force (the proxies inherit it): it caps idle-conns per proxy.
    pub nofile: u64,
    pub ports: usize,
    pub rate: u64,
    pub rproxy: PathBuf,
    pub docker_proxy: PathBuf,
    pub out: Option<PathBuf>,
    pub json: Option<PathBuf>,
    pub command: String,
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{flag}: not a number: {v:?}"))
}

pub fn parse_args(args: &[String]) -> Result<Options, String> {
    let smoke = args.iter().any(|a| a == "--smoke");
    let pick = |s: usize, f: usize| if smoke { s } else { f };
    let user_args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--bench")
        .collect();
    let mut o = Options {
        smoke,
        rounds: pick(1, 3),
        seconds: pick(1, 5) as u64,
        only: Vec::new(),
        proxies: KINDS.to_vec(),
        flows: pick(200, 1000),
        flow_msgs: pick(2, 5),
        idle: pick(500, 10_000),
        nofile: 0,
        ports: pick(10, 100),
        rate: pick(1000, 10_000) as u64,
        rproxy: PathBuf::from(env!("CARGO_BIN_EXE_rproxy")),
        docker_proxy: PathBuf::from(DOCKER_PROXY),
        out: None,
        json: None,
        command: match user_args.is_empty() {
            true => "cargo bench --bench proxy".into(),
            false => format!("cargo bench --bench proxy -- {}", user_args.join(" ")),
        },
    };
    let mut it = user_args.iter();
    while let Some(&arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg, None),
        };
        let mut value = || -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next().map(|s| s.to_string()))
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag {
            "--smoke" => {}
            "--rounds" => o.rounds = number(flag, &value()?)?,
            "--seconds" => o.seconds = number(flag, &value()?)?,
            "--only" => {
                o.only = value()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            "--proxies" => {
                o.proxies = value()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| Kind::from_name(s).ok_or(format!("--proxies: unknown proxy {s:?}")))
                    .collect::<Result<_, _>>()?
            }
            "--flows" => o.flows = number(flag, &value()?)?,
            "--flow-msgs" => o.flow_msgs = number(flag, &value()?)?,
            "--idle" => o.idle = number(flag, &value()?)?,
            "--ports" => o.ports = number(flag, &value()?)?,
            "--rate" => o.rate = number(flag, &value()?)?,
            "--rproxy" => o.rproxy = value()?.into(),
            "--docker-proxy" => o.docker_proxy = value()?.into(),
            "--out" => o.out = Some(value()?.into()),
            "--json" => o.json = Some(value()?.into()),
            "-h" | "--help" => return Err(USAGE.into()),
            _ => return Err(format!("unknown argument {arg:?}\n{USAGE}")),
        }
    }
    let checks = [
        (o.rounds >= 1, "--rounds must be at least 1"),
        (o.seconds >= 1, "--seconds must be at least 1"),
        (o.flows >= 1, "--flows must be at least 1"),
        (
            (1..=64).contains(&o.flow_msgs),
            "--flow-msgs must be 1..=64",
        ),
        (o.idle >= 1, "--idle must be at least 1"),
        ((1..=1000).contains(&o.ports), "--ports must be 1..=1000"),
        (o.rate >= 1, "--rate must be at least 1"),
    ];
    if let Some((_, e)) = checks.iter().find(|(ok, _)| !ok) {
        return Err(e.to_string());
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// Proxies and workloads

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Rproxy,
    DockerProxy,
    Socat,
}

pub const KINDS: [Kind; 4] = [Kind::Direct, Kind::Rproxy, Kind::DockerProxy, Kind::Socat];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Rproxy => "rproxy",
            Kind::DockerProxy => "docker-proxy",
            Kind::Socat => "socat",
        }
    }

    fn from_name(s: &str) -> Option<Kind> {
        KINDS.into_iter().find(|k| k.name() == s)
    }

    fn index(self) -> usize {
        KINDS.iter().position(|k| *k == self).unwrap_or(0)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

struct Metric {
    name: &'static str,
    decimals: usize,
    /// Whether dividing two proxies' figures means something (not for error counts, loss…).
    ratio: bool,
}

const fn m(name: &'static str, decimals: usize, ratio: bool) -> Metric {
    Metric {
        name,
        decimals,
        ratio,
    }
}

type RunFn = fn(&Ctx, Kind, u16) -> Result<Vec<f64>, String>;

struct Workload {
    name: &'static str,
    about: String,
    metrics: &'static [Metric],
    kinds: &'static [Kind],
    run: RunFn,
}

const ALL: &[Kind] = &KINDS;
const PROXIES: &[Kind] = &[Kind::Rproxy, Kind::DockerProxy, Kind::Socat];
/// socat forks a process per connection: 10,000 of them are no "memory per connection" figure.
const ONE_PROCESS: &[Kind] = &[Kind::Rproxy, Kind::DockerProxy];
const BULK: &[Metric] = &[m("Gb/s", 2, true)];
const RR: &[Metric] = &[
    m("k req/s", 1, true),
    m("p50 µs", 1, true),
    m("p99 µs", 1, true),
];
const WRK: &[Metric] = &[m("k conn/s", 2, true), m("errors", 0, false)];
const FIXED: &[Metric] = &[
    m("k conn/s done", 2, true),
    m("errors", 0, false),
    m("not started", 0, false),
    m("p99 ms", 2, true),
];
const UDP: &[Metric] = &[m("delivered Mb/s", 0, true), m("loss %", 2, false)];
const FLOWS: &[Metric] = &[m("replies %", 2, true), m("misrouted", 0, false)];
const IDLE: &[Metric] = &[
    m("PSS KB/conn", 2, true),
    m("private KB/conn", 2, true),
    m("connections", 0, false),
];
const PORTS: &[Metric] = &[
    m("ready ms", 0, true),
    m("RSS MB", 1, true),
    m("PSS MB", 1, true),
    m("threads", 0, true),
    m("processes", 0, false),
];

fn workloads(o: &Options) -> Vec<Workload> {
    let s = o.seconds;
    let w = |name, about: String, metrics, kinds, run| Workload {
        name,
        about,
        metrics,
        kinds,
        run,
    };
    vec![
        w("tcp-bulk-1", format!("TCP bulk, 1 stream, client → container, {s} s (iperf3)"), BULK, ALL,
            |c, k, p| tcp_bulk(c, k, p, 1, false)),
        w("tcp-bulk-1-rev", format!("TCP bulk, 1 stream, container → client, {s} s (iperf3 -R)"), BULK, ALL,
            |c, k, p| tcp_bulk(c, k, p, 1, true)),
        w("tcp-bulk-4", format!("TCP bulk, 4 streams, client → container, {s} s (iperf3 -P 4)"), BULK, ALL,
            |c, k, p| tcp_bulk(c, k, p, 4, false)),
        w("tcp-bulk-4-rev", format!("TCP bulk, 4 streams, container → client, {s} s (iperf3 -P 4 -R)"), BULK, ALL,
            |c, k, p| tcp_bulk(c, k, p, 4, true)),
        w("rr", format!("TCP request/response, 64 B, one connection, unpinned, {s} s (sockperf ping-pong, full round trip)"), RR, ALL,
            |c, k, p| request_response(c, k, p, false)),
        w("rr-pinned", format!("as rr, with client, proxy and server all on CPU {PIN_CPU} (taskset)"), RR, ALL,
            |c, k, p| request_response(c, k, p, true)),
        w("conn-rate", format!("TCP connections/s, 16 clients, closed loop, one request per connection, {s} s (wrk -t2 -c16, Connection: close)"), WRK, ALL,
            conn_rate),
        w("conn-fixed", format!("TCP connections at {} /s offered for {s} s, 16 client threads, open loop (own generator; errors: connections that failed; not started: still queued behind busy clients when the run ended, {s} s + 5 s; p99 from the scheduled start)", o.rate), FIXED, ALL,
            conn_fixed),
        w("udp-bulk", format!("UDP 1,400 B datagrams, unlimited rate, client → container, {s} s (iperf3 -u -b 0)"), UDP, ALL,
            |c, k, p| udp_bulk(c, k, p, "0")),
        w("udp-500m", format!("UDP 1,400 B datagrams at 500 Mb/s, client → container, {s} s (iperf3 -u -b 500M)"), UDP, ALL,
            |c, k, p| udp_bulk(c, k, p, "500M")),
        w("udp-flows", format!("{} concurrent UDP flows (one client socket each) × {} datagrams to an echo server, sent at ≤10,000 datagrams/s (own code; misrouted: a reply from another address or with another flow's payload)", o.flows, o.flow_msgs), FLOWS, ALL,
            udp_flows),
        w("idle-conns", format!("{} idle proxied TCP connections (fewer where RLIMIT_NOFILE, {}, cannot hold them: docker-proxy keeps 6 fds per idle connection, rproxy 2) that have carried nothing yet: the proxy's user-space memory per connection (PSS and private, /proc/PID/smaps_rollup after minus before, ÷ N); then 100 of them echo a byte to prove they work", o.idle, o.nofile), IDLE, ONE_PROCESS,
            idle_conns),
        w("ports", format!("{} TCP ports: one `rproxy daemon -p RANGE` vs a docker-proxy / socat process per port; ready = all listening", o.ports), PORTS, PROXIES,
            many_ports),
    ]
}

// ---------------------------------------------------------------------------------------------
// Cleanup: every PID we start, the topology and the temporary directory, removed by whoever
// gets there first (the end of `run`, a panic unwinding through it, or the signal thread).

struct Registry {
    pids: Vec<u32>,
    closing: bool,
    topology: bool,
    tmp: Option<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    pids: Vec::new(),
    closing: false,
    topology: false,
    tmp: None,
});

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

fn cleanup_all() {
    let (pids, topology, tmp) = {
        let mut r = registry();
        r.closing = true;
        (
            std::mem::take(&mut r.pids),
            std::mem::take(&mut r.topology),
            r.tmp.take(),
        )
    };
    for pid in pids {
        kill_tree(pid, None);
    }
    if topology {
        teardown();
    }
    if let Some(dir) = tmp {
        let _ = fs::remove_dir_all(dir);
    }
}

/// Runs `cleanup_all` when dropped: at the end of `run`, or while a panic unwinds.
struct CleanupGuard;

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        cleanup_all();
    }
}

fn install_signal_cleanup() -> Result<(), String> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel();
            let spawned = thread::Builder::new()
                .name("bench-signals".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = tx.send(Err(format!("signal runtime: {e}")));
                            return;
                        }
                    };
                    let signal = rt.block_on(async {
                        use tokio::signal::unix::{signal, SignalKind};
                        let (int, term, hup) = (
                            signal(SignalKind::interrupt()),
                            signal(SignalKind::terminate()),
                            signal(SignalKind::hangup()),
                        );
                        let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (int, term, hup) else {
                            let _ = tx.send(Err("cannot install signal handlers".to_string()));
                            return None;
                        };
                        let _ = tx.send(Ok(()));
                        tokio::select! {
                            _ = int.recv() => Some("SIGINT"),
                            _ = term.recv() => Some("SIGTERM"),
                            _ = hup.recv() => Some("SIGHUP"),
                        }
                    });
                    if let Some(signal) = signal {
                        eprintln!(
                            "bench: {signal}: stopping what it started and removing the topology"
                        );
                        cleanup_all();
                        std::process::exit(130);
                    }
                });
            if let Err(e) = spawned {
                return Err(format!("signal thread: {e}"));
            }
            rx.recv()
                .unwrap_or_else(|_| Err("signal thread died".into()))
        })
        .clone()
}

// ---------------------------------------------------------------------------------------------
// Processes

/// `pid` and everything below it, parents first.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some((_, ppid)) = stat(p) {
                parent_of.push((p, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parent_of
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

/// (state, ppid) from /proc/PID/stat.
fn stat(pid: u32) -> Option<(char, u32)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

fn running(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// SIGTERM to `pid` and its descendants, SIGKILL to whatever is left after 3 s; reaps `child`.
fn kill_tree(pid: u32, mut child: Option<&mut Child>) {
    let pids = process_tree(pid);
    for &p in pids.iter().rev() {
        let _ = kill(Pid::from_raw(p as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if let Some(c) = child.as_deref_mut() {
            let _ = c.try_wait();
        }
        let left: Vec<u32> = pids.iter().copied().filter(|&p| running(p)).collect();
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            for p in left {
                let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
            }
            break;
        }
        thread::sleep(Duration::from_millis(5));
    }
    if let Some(c) = child {
        let _ = c.wait();
    }
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A child process with stdout/stderr in files, stopped (with its descendants) when dropped.
struct Proc {
    child: Child,
    name: String,
    out: PathBuf,
    err: PathBuf,
    stopped: bool,
}

impl Proc {
    fn spawn(mut cmd: Command, name: &str, dir: &Path) -> Result<Proc, String> {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let base = dir.join(format!("{n:05}-{}", name.replace(['/', ' '], "_")));
        let out = base.with_extension("out");
        let err = base.with_extension("err");
        let file = |p: &Path| File::create(p).map_err(|e| format!("{}: {e}", p.display()));
        cmd.stdin(Stdio::null())
            .stdout(file(&out)?)
            .stderr(file(&err)?);
        let mut reg = registry();
        if reg.closing {
            return Err("interrupted".into());
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        reg.pids.push(child.id());
        drop(reg);
        // Drop `cmd` now: fds mapped into the child (status pipes) must have no copy left here.
        drop(cmd);
        Ok(Proc {
            child,
            name: name.to_string(),
            out,
            err,
            stopped: false,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// Waits for the process to exit; `Ok(status)` or `Err` after `timeout`.
    fn wait_for(&mut self, timeout: Duration) -> Result<std::process::ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() > deadline => {
                    return Err(format!(
                        "{} did not finish within {} s{}",
                        self.name,
                        timeout.as_secs(),
                        self.logs()
                    ))
                }
                Ok(None) => thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(format!("{}: wait: {e}", self.name)),
            }
        }
    }

    fn stdout(&self) -> String {
        fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// "; NAME said: …" with the last lines of its output, or "" when it said nothing.
    fn logs(&self) -> String {
        let text = format!("{}{}", self.stdout(), self.stderr());
        let t = tail(&text, 4);
        match t.is_empty() {
            true => String::new(),
            false => format!("; {} said: {t}", self.name),
        }
    }

    fn stop(&mut self) {
        if !self.stopped {
            self.stopped = true;
            let pid = self.pid();
            kill_tree(pid, Some(&mut self.child));
            registry().pids.retain(|&p| p != pid);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| name.into())
}

/// The tools the harness needs and cannot find (docker-proxy is optional).
pub fn missing_tools() -> Vec<&'static str> {
    TOOLS
        .into_iter()
        .filter(|t| find_tool(t).is_none())
        .collect()
}

/// `[ip netns exec NS] [taskset -c CPU] PROGRAM`.
fn command(ns: Option<&str>, pin: bool, program: impl AsRef<Path>) -> Command {
    let mut argv: Vec<std::ffi::OsString> = Vec::new();
    if let Some(ns) = ns {
        argv.extend([tool("ip").into(), "netns".into(), "exec".into(), ns.into()]);
    }
    if pin {
        argv.extend([tool("taskset").into(), "-c".into(), PIN_CPU.into()]);
    }
    argv.push(program.as_ref().into());
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    cmd
}

struct ToolOut {
    ok: bool,
    status: String,
    stdout: String,
    stderr: String,
}

/// Runs a client tool to completion (killed after `timeout`).
fn run_tool(ctx: &Ctx, cmd: Command, name: &str, timeout: Duration) -> Result<ToolOut, String> {
    let mut p = Proc::spawn(cmd, name, &ctx.dir)?;
    let status = p.wait_for(timeout)?;
    Ok(ToolOut {
        ok: status.success(),
        status: status.to_string(),
        stdout: p.stdout(),
        stderr: p.stderr(),
    })
}

/// Host command that must succeed (topology set-up).
fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(tool(args[0]))
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Topology

/// Holds the lock that keeps two runs from sharing the bridge.
struct Topology {
    _lock: Flock<File>,
}

impl Topology {
    fn up() -> Result<Topology, String> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_PATH)
            .map_err(|e| format!("{LOCK_PATH}: {e}"))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| {
            format!("another benchmark run holds {LOCK_PATH} (it owns {BRIDGE}); wait for it")
        })?;
        let leftover = Path::new("/sys/class/net").join(BRIDGE).exists()
            || VETHS.iter().any(|(veth, ns, _)| {
                Path::new("/sys/class/net").join(veth).exists()
                    || Path::new("/run/netns").join(ns).exists()
            });
        if leftover {
            eprintln!("bench: removing {BRIDGE} and namespaces left by an earlier run");
            teardown();
        }
        registry().topology = true;
        let gw = format!("{GW}/24");
        sh(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
        sh(&["ip", "addr", "add", &gw, "dev", BRIDGE])?;
        sh(&["ip", "link", "set", BRIDGE, "up"])?;
        for (veth, ns, addr) in VETHS {
            sh(&["ip", "netns", "add", ns])?;
            sh(&[
                "ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ])?;
            sh(&["ip", "link", "set", veth, "master", BRIDGE, "up"])?;
            sh(&["ip", "-n", ns, "addr", "add", addr, "dev", "eth0"])?;
            sh(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            sh(&[
                "ip",
                "-n",
                ns,
                "route",
                "add",
                "default",
                "via",
                &GW.to_string(),
            ])?;
        }
        // The client namespace makes tens of thousands of short connections: a wide port range
        // and reuse of TIME_WAIT ports there (per-namespace settings; the host's are untouched).
        for setting in [
            "net.ipv4.ip_local_port_range=15000 64999",
            "net.ipv4.tcp_tw_reuse=1",
        ] {
            sh(&["ip", "netns", "exec", NS_CLI, "sysctl", "-q", "-w", setting])?;
        }
        for (table, chain, dir, target) in IPTABLES_RULES {
            let mut args = vec![
                "iptables", "-w", "-t", table, "-I", chain, dir, BRIDGE, "-j",
            ];
            args.extend(target.split(' '));
            sh(&args)?;
        }
        Ok(Topology { _lock: lock })
    }
}

/// Removes the iptables rules, whatever runs in our namespaces, the namespaces and the bridge.
fn teardown() {
    for (table, chain, dir, target) in IPTABLES_RULES {
        let mut args = vec![
            "iptables", "-w", "-t", table, "-D", chain, dir, BRIDGE, "-j",
        ];
        args.extend(target.split(' '));
        for _ in 0..8 {
            if sh(&args).is_err() {
                break;
            }
        }
    }
    for (veth, ns, _) in VETHS {
        if Path::new("/run/netns").join(ns).exists() {
            if let Ok(pids) = sh(&["ip", "netns", "pids", ns]) {
                for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
                    kill_tree(pid, None);
                }
            }
        }
        if Path::new("/sys/class/net").join(veth).exists() {
            let _ = sh(&["ip", "link", "del", veth]);
        }
        if Path::new("/run/netns").join(ns).exists() {
            if let Err(e) = sh(&["ip", "netns", "del", ns]) {
                eprintln!("bench: cleanup: {e}");
            }
        }
    }
    if Path::new("/sys/class/net").join(BRIDGE).exists() {
        if let Err(e) = sh(&["ip", "link", "del", BRIDGE]) {
            eprintln!("bench: cleanup: {e}");
        }
    }
}

fn enter_netns(ns: &str) -> Result<(), String> {
    let f = File::open(Path::new("/run/netns").join(ns)).map_err(|e| format!("netns {ns}: {e}"))?;
    setns(&f, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns {ns}: {e}"))
}

/// Runs `f` on a fresh thread inside network namespace `ns`; sockets it makes stay in `ns`.
fn in_netns<T, F>(ns: &'static str, f: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, String> + Send + 'static,
{
    spawn_in_netns(ns, f)?
        .join()
        .unwrap_or_else(|_| Err(format!("a thread in {ns} panicked")))
}

fn spawn_in_netns<T, F>(ns: &'static str, f: F) -> Result<JoinHandle<Result<T, String>>, String>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, String> + Send + 'static,
{
    thread::Builder::new()
        .name(format!("in-{ns}"))
        .spawn(move || {
            enter_netns(ns)?;
            f()
        })
        .map_err(|e| format!("thread: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Sockets seen through /proc, memory

/// (local address, state) of every IPv4 socket in PID's network namespace.
fn sockets(pid: u32, proto: Proto) -> Vec<(SocketAddrV4, u8)> {
    let path = match pid {
        0 => format!("/proc/thread-self/net/{}", proto.name()),
        _ => format!("/proc/{pid}/net/{}", proto.name()),
    };
    let Ok(text) = fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (ip, port) = f.get(1)?.split_once(':')?;
            // The kernel prints the address as a native-endian u32 of network-order bytes.
            let ip = u32::from_str_radix(ip, 16).ok()?.to_ne_bytes();
            let port = u16::from_str_radix(port, 16).ok()?;
            let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
            Some((SocketAddrV4::new(Ipv4Addr::from(ip), port), state))
        })
        .collect()
}

const TCP_LISTEN: u8 = 0x0A;

fn is_bound(pid: u32, proto: Proto, addr: SocketAddrV4) -> bool {
    sockets(pid, proto)
        .iter()
        .any(|(a, st)| *a == addr && (proto == Proto::Udp || *st == TCP_LISTEN))
}

/// Waits until `p` (or, through `ip netns exec`, the program it became) has bound `addr`.
fn wait_bound(p: &mut Proc, proto: Proto, addr: SocketAddrV4) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if is_bound(p.pid(), proto, addr) {
            return Ok(());
        }
        if let Some(status) = p.exited() {
            return Err(format!("{} exited ({status}){}", p.name, p.logs()));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} did not bind {} {addr} within 10 s{}",
                p.name,
                proto.name(),
                p.logs()
            ));
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Reads docker-proxy's status pipe (fd 3): "0\n" once it listens, "1\n<error>" if it cannot.
fn wait_status(p: &mut Proc, pipe: OwnedFd) -> Result<(), String> {
    let mut file = File::from(pipe);
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !buf.contains(&b'\n') {
        if Instant::now() > deadline {
            return Err(format!("{}: no status within 10 s{}", p.name, p.logs()));
        }
        let readable = {
            let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, 100u16).map_err(|e| format!("poll: {e}"))? > 0
        };
        if readable {
            let mut chunk = [0u8; 512];
            match file.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("{}: status pipe: {e}", p.name)),
            }
        }
    }
    let status = String::from_utf8_lossy(&buf);
    match status.starts_with("0\n") {
        true => Ok(()),
        false => Err(format!(
            "{} did not start: status {status:?}{}",
            p.name,
            p.logs()
        )),
    }
}

#[derive(Clone, Copy, Default, Debug)]
struct Mem {
    rss_kb: u64,
    pss_kb: u64,
    private_kb: u64,
    threads: u64,
    processes: u64,
}

fn field_kb(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Memory and threads of `pid` and its descendants.
fn tree_mem(pid: u32) -> Mem {
    let mut total = Mem::default();
    for p in process_tree(pid) {
        let (Ok(rollup), Ok(status)) = (
            fs::read_to_string(format!("/proc/{p}/smaps_rollup")),
            fs::read_to_string(format!("/proc/{p}/status")),
        ) else {
            continue;
        };
        total.rss_kb += field_kb(&rollup, "Rss:");
        total.pss_kb += field_kb(&rollup, "Pss:");
        total.private_kb +=
            field_kb(&rollup, "Private_Clean:") + field_kb(&rollup, "Private_Dirty:");
        total.threads += field_kb(&status, "Threads:");
        total.processes += 1;
    }
    total
}

// ---------------------------------------------------------------------------------------------
// Proxies

struct Ctx {
    o: Options,
    dir: PathBuf,
    kinds: Vec<Kind>,
}

impl Ctx {
    fn settle(&self) {
        thread::sleep(Duration::from_millis(if self.o.smoke { 50 } else { 300 }));
    }
}

/// Where the client sends: the proxy on the bridge gateway, or the container itself.
fn dest(kind: Kind, port: u16) -> SocketAddrV4 {
    match kind {
        Kind::Direct => SocketAddrV4::new(CTR, port),
        _ => SocketAddrV4::new(GW, port),
    }
}

/// docker-proxy's command line, as dockerd passes it.
fn docker_args(proto: Proto, port: u16) -> Vec<String> {
    [
        "-proto",
        proto.name(),
        "-host-ip",
        &GW.to_string(),
        "-host-port",
        &port.to_string(),
        "-container-ip",
        &CTR.to_string(),
        "-container-port",
        &port.to_string(),
    ]
    .map(str::to_string)
    .to_vec()
}

/// Starts one proxy process for `proto` GW:port → CTR:port (nothing for direct), ready to serve.
fn start_proxy(
    ctx: &Ctx,
    kind: Kind,
    proto: Proto,
    port: u16,
    pin: bool,
) -> Result<Option<Proc>, String> {
    let name = format!("{}-{}-{port}", kind.name(), proto.name());
    match kind {
        Kind::Direct => Ok(None),
        Kind::Rproxy | Kind::DockerProxy => {
            let binary = match kind {
                Kind::Rproxy => &ctx.o.rproxy,
                _ => &ctx.o.docker_proxy,
            };
            let mut cmd = command(None, pin, binary);
            cmd.args(docker_args(proto, port))
                .env("RPROXY_SOCKET", NO_DAEMON)
                .env("RPROXY_LOG", "warn")
                .env_remove("RPROXY_LOG_FILE");
            let (read, write) =
                nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
            cmd.fd_mappings(vec![FdMapping {
                parent_fd: write,
                child_fd: 3,
            }])
            .map_err(|e| format!("fd mapping: {e:?}"))?;
            let mut p = Proc::spawn(cmd, &name, &ctx.dir)?;
            wait_status(&mut p, read)?;
            Ok(Some(p))
        }
        Kind::Socat => {
            let (listen, connect) = match proto {
                Proto::Tcp => (
                    format!("TCP4-LISTEN:{port},bind={GW},fork,reuseaddr"),
                    format!("TCP4:{CTR}:{port}"),
                ),
                Proto::Udp => (
                    format!("UDP4-LISTEN:{port},bind={GW},fork,reuseaddr"),
                    format!("UDP4:{CTR}:{port}"),
                ),
            };
            let mut cmd = command(None, pin, tool("socat"));
            cmd.args([listen, connect]);
            let mut p = Proc::spawn(cmd, &name, &ctx.dir)?;
            wait_bound(&mut p, proto, SocketAddrV4::new(GW, port))?;
            Ok(Some(p))
        }
    }
}

/// Appends the proxies' own words to an error, which is where their misbehaviour shows.
fn explain<T>(result: Result<T, String>, procs: &[&Option<Proc>]) -> Result<T, String> {
    result.map_err(|e| {
        let logs: String = procs
            .iter()
            .filter_map(|p| p.as_ref())
            .map(Proc::logs)
            .collect();
        format!("{e}{logs}")
    })
}

/// A server program in the container namespace, listening on CTR:port.
fn start_server(ctx: &Ctx, name: &str, cmd: Command, port: u16) -> Result<Proc, String> {
    let mut p = Proc::spawn(cmd, name, &ctx.dir)?;
    wait_bound(&mut p, Proto::Tcp, SocketAddrV4::new(CTR, port))?;
    Ok(p)
}

fn iperf3_server(ctx: &Ctx, port: u16) -> Result<Proc, String> {
    let mut cmd = command(Some(NS_CTR), false, tool("iperf3"));
    cmd.args(["-s", "-1", "-p", &port.to_string(), "-B", &CTR.to_string()]);
    start_server(ctx, "iperf3-server", cmd, port)
}

fn iperf3_json(out: &ToolOut) -> Result<Value, String> {
    let j: Value = serde_json::from_str(&out.stdout).map_err(|e| {
        format!(
            "iperf3 ({}): no JSON ({e}): {}",
            out.status,
            tail(&out.stderr, 3)
        )
    })?;
    if let Some(e) = j.get("error").and_then(Value::as_str) {
        return Err(format!("iperf3: {e}"));
    }
    if !out.ok {
        return Err(format!("iperf3 exited with {}", out.status));
    }
    Ok(j)
}

fn json_f64(j: &Value, path: &[&str]) -> Result<f64, String> {
    path.iter()
        .try_fold(j, |v, k| v.get(k))
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("iperf3 JSON has no {}", path.join(".")))
}

// ---------------------------------------------------------------------------------------------
// Workloads

fn tcp_bulk(
    ctx: &Ctx,
    kind: Kind,
    port: u16,
    streams: u32,
    reverse: bool,
) -> Result<Vec<f64>, String> {
    let _server = iperf3_server(ctx, port)?;
    let proxy = start_proxy(ctx, kind, Proto::Tcp, port, false)?;
    let d = dest(kind, port);
    let mut cmd = command(Some(NS_CLI), false, tool("iperf3"));
    cmd.args(["-c", &d.ip().to_string(), "-p", &port.to_string()])
        .args(["-t", &ctx.o.seconds.to_string(), "-J"]);
    if streams > 1 {
        cmd.args(["-P", &streams.to_string()]);
    }
    if reverse {
        cmd.arg("-R");
    }
    let result = run_tool(ctx, cmd, "iperf3", Duration::from_secs(ctx.o.seconds + 20))
        .and_then(|out| iperf3_json(&out))
        .and_then(|j| json_f64(&j, &["end", "sum_received", "bits_per_second"]));
    let bps = explain(result, &[&proxy])?;
    Ok(vec![bps / 1e9])
}

fn request_response(ctx: &Ctx, kind: Kind, port: u16, pin: bool) -> Result<Vec<f64>, String> {
    let mut cmd = command(Some(NS_CTR), pin, tool("sockperf"));
    cmd.args([
        "server",
        "--tcp",
        "-i",
        &CTR.to_string(),
        "-p",
        &port.to_string(),
    ]);
    let _server = start_server(ctx, "sockperf-server", cmd, port)?;
    let proxy = start_proxy(ctx, kind, Proto::Tcp, port, pin)?;
    let d = dest(kind, port);
    let mut cmd = command(Some(NS_CLI), pin, tool("sockperf"));
    cmd.args([
        "ping-pong",
        "--tcp",
        "-i",
        &d.ip().to_string(),
        "-p",
        &port.to_string(),
    ])
    .args(["-t", &ctx.o.seconds.to_string(), "-m", "64", "--full-rtt"]);
    let result = run_tool(
        ctx,
        cmd,
        "sockperf",
        Duration::from_secs(ctx.o.seconds + 20),
    )
    .and_then(|out| parse_sockperf(&out));
    explain(result, &[&proxy])
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn number_after(text: &str, key: &str) -> Option<f64> {
    let rest = &text[text.find(key)? + key.len()..];
    let rest = rest.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// [k round trips/s, p50 µs, p99 µs] from sockperf ping-pong's report (valid period only).
fn parse_sockperf(out: &ToolOut) -> Result<Vec<f64>, String> {
    let text = strip_ansi(&format!("{}\n{}", out.stdout, out.stderr));
    let fail = |what: &str| format!("sockperf ({}): no {what}: {}", out.status, tail(&text, 3));
    let valid = text
        .lines()
        .find(|l| l.contains("[Valid Duration]"))
        .ok_or_else(|| fail("[Valid Duration] line"))?;
    let runtime = number_after(valid, "RunTime=").ok_or_else(|| fail("RunTime"))?;
    let received =
        number_after(valid, "ReceivedMessages=").ok_or_else(|| fail("ReceivedMessages"))?;
    let p50 = number_after(&text, "percentile 50.000 =").ok_or_else(|| fail("p50"))?;
    let p99 = number_after(&text, "percentile 99.000 =").ok_or_else(|| fail("p99"))?;
    if runtime <= 0.0 || received <= 0.0 {
        return Err(fail("round trips"));
    }
    Ok(vec![received / runtime / 1e3, p50, p99])
}

/// Tiny HTTP server threads in the container namespace: one response, then close.
struct Server {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
    handles: Vec<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl Server {
    fn new() -> Server {
        Server {
            stop: Arc::new(AtomicBool::new(false)),
            count: Arc::new(AtomicUsize::new(0)),
            handles: Vec::new(),
        }
    }
}

fn tcp_listener_in(ns: &'static str, addr: SocketAddrV4) -> Result<TcpListener, String> {
    in_netns(ns, move || {
        let err = |e: std::io::Error| format!("listen {addr} in {ns}: {e}");
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .map_err(err)?;
        s.set_reuse_address(true).map_err(err)?;
        s.bind(&SocketAddr::V4(addr).into()).map_err(err)?;
        s.listen(4096).map_err(err)?;
        let l = TcpListener::from(s);
        l.set_nonblocking(true).map_err(err)?;
        Ok(l)
    })
}

fn wait_readable(fd: &impl AsFd, ms: u16) {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    let _ = poll(&mut fds, ms);
}

/// Accepts on a non-blocking listener until `stop`, handing each connection to `serve`.
/// The container's web server: one thread, epoll-driven (a tokio current-thread runtime), so
/// it serves every connection at once as nginx does. A server with a thread per connection
/// in flight set the rate itself: with 2, a connection whose request was still crossing a
/// proxy held up the others; with 16, polling threads woke in a herd on every connection.
fn http_server(port: u16) -> Result<Server, String> {
    let listener = tcp_listener_in(NS_CTR, SocketAddrV4::new(CTR, port))?;
    let mut server = Server::new();
    let (stop, count) = (server.stop.clone(), server.count.clone());
    server.handles.push(thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            while !stop.load(Ordering::Relaxed) {
                let accepted =
                    tokio::time::timeout(Duration::from_millis(50), listener.accept()).await;
                if let Ok(Ok((s, _))) = accepted {
                    let count = count.clone();
                    tokio::spawn(async move {
                        if serve_http_async(s).await.is_ok() {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            }
        });
    }));
    Ok(server)
}

async fn serve_http_async(mut s: tokio::net::TcpStream) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.set_nodelay(true)?;
    let mut buf = [0u8; 4096];
    let mut n = 0;
    let read = async {
        while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            if n == buf.len() {
                return Ok(false);
            }
            match s.read(&mut buf[n..]).await? {
                0 => return Ok(false),
                r => n += r,
            }
        }
        Ok::<_, std::io::Error>(true)
    };
    match tokio::time::timeout(Duration::from_secs(2), read).await {
        Ok(Ok(true)) => s.write_all(HTTP_RESPONSE).await,
        Ok(Ok(false)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ErrorKind::TimedOut.into()),
    }
}

fn conn_rate(ctx: &Ctx, kind: Kind, port: u16) -> Result<Vec<f64>, String> {
    let _server = http_server(port)?;
    let proxy = start_proxy(ctx, kind, Proto::Tcp, port, false)?;
    let d = dest(kind, port);
    let mut cmd = command(Some(NS_CLI), false, tool("wrk"));
    cmd.args([
        "-t2",
        "-c16",
        &format!("-d{}s", ctx.o.seconds),
        "--timeout",
        "2s",
    ])
    .args(["-H", "Connection: close", &format!("http://{d}/")]);
    let result =
        run_tool(ctx, cmd, "wrk", Duration::from_secs(ctx.o.seconds + 20)).and_then(|out| {
            let fail = || {
                format!(
                    "wrk ({}): {}",
                    out.status,
                    tail(&format!("{}{}", out.stdout, out.stderr), 3)
                )
            };
            if !out.ok {
                return Err(fail());
            }
            let rate = number_after(&out.stdout, "Requests/sec:").ok_or_else(fail)?;
            let mut errors = 0.0;
            if let Some(line) = out.stdout.lines().find(|l| l.contains("Socket errors:")) {
                for key in ["connect", "read", "write", "timeout"] {
                    errors += number_after(line, key).unwrap_or(0.0);
                }
            }
            errors += number_after(&out.stdout, "Non-2xx or 3xx responses:").unwrap_or(0.0);
            Ok(vec![rate / 1e3, errors])
        });
    explain(result, &[&proxy])
}

fn one_http(d: SocketAddrV4) -> Result<(), String> {
    let timeout = Duration::from_secs(3);
    let mut s =
        TcpStream::connect_timeout(&d.into(), timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(HTTP_REQUEST)
        .map_err(|e| format!("write: {e}"))?;
    let mut response = Vec::with_capacity(256);
    s.read_to_end(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    match response.starts_with(b"HTTP/1.1 200") {
        true => Ok(()),
        false => Err(format!("bad response ({} bytes)", response.len())),
    }
}

struct FixedResult {
    latencies_ms: Vec<f64>,
    errors: u64,
    missed: u64,
    first_error: Option<String>,
    last_done: Option<Instant>,
}

fn conn_fixed(ctx: &Ctx, kind: Kind, port: u16) -> Result<Vec<f64>, String> {
    let _server = http_server(port)?;
    let proxy = start_proxy(ctx, kind, Proto::Tcp, port, false)?;
    let d = dest(kind, port);
    let rate = ctx.o.rate as f64;
    let total = ctx.o.rate * ctx.o.seconds;
    let t0 = Instant::now() + Duration::from_millis(100);
    let give_up = t0 + Duration::from_secs(ctx.o.seconds + 5);
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let next = next.clone();
            spawn_in_netns(NS_CLI, move || {
                let mut r = FixedResult {
                    latencies_ms: Vec::new(),
                    errors: 0,
                    missed: 0,
                    first_error: None,
                    last_done: None,
                };
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let due = t0 + Duration::from_secs_f64(i as f64 / rate);
                    let now = Instant::now();
                    if due > now {
                        thread::sleep(due - now);
                    }
                    if Instant::now() > give_up {
                        r.missed += 1;
                        continue;
                    }
                    match one_http(d) {
                        Ok(()) => {
                            let done = Instant::now();
                            r.latencies_ms.push((done - due).as_secs_f64() * 1e3);
                            r.last_done = Some(done);
                        }
                        Err(e) => {
                            r.errors += 1;
                            r.first_error.get_or_insert(e);
                        }
                    }
                }
                Ok(r)
            })
        })
        .collect::<Result<_, _>>()?;
    let mut lat = Vec::new();
    let (mut errors, mut missed, mut first_error, mut last_done) = (0, 0, None, t0);
    for w in workers {
        let r = w.join().unwrap_or_else(|_| Err("worker panicked".into()))?;
        lat.extend(r.latencies_ms);
        errors += r.errors;
        missed += r.missed;
        first_error = first_error.or(r.first_error);
        last_done = last_done.max(r.last_done.unwrap_or(t0));
    }
    if let Some(e) = first_error {
        eprintln!(
            "    conn-fixed via {}: {errors} errors, first: {e}",
            kind.name()
        );
    }
    let elapsed = (last_done - t0).as_secs_f64().max(ctx.o.seconds as f64);
    let ok = lat.len() as f64;
    lat.sort_by(f64::total_cmp);
    let p99 = percentile(&lat, 99.0).unwrap_or(f64::NAN);
    explain(
        match lat.is_empty() {
            true => Err(format!("no connection succeeded ({errors} errors)")),
            false => Ok(vec![ok / elapsed / 1e3, errors as f64, missed as f64, p99]),
        },
        &[&proxy],
    )
}

fn udp_bulk(ctx: &Ctx, kind: Kind, port: u16, bitrate: &str) -> Result<Vec<f64>, String> {
    let _server = iperf3_server(ctx, port)?;
    // iperf3 runs its control connection over TCP on the same port: two proxies, as dockerd
    // starts for `-p PORT:PORT/tcp -p PORT:PORT/udp`.
    let control = start_proxy(ctx, kind, Proto::Tcp, port, false)?;
    let data = start_proxy(ctx, kind, Proto::Udp, port, false)?;
    let d = dest(kind, port);
    let mut cmd = command(Some(NS_CLI), false, tool("iperf3"));
    cmd.args(["-c", &d.ip().to_string(), "-p", &port.to_string(), "-u"])
        .args([
            "-b",
            bitrate,
            "-l",
            "1400",
            "-t",
            &ctx.o.seconds.to_string(),
            "-J",
        ]);
    let result = run_tool(
        ctx,
        cmd,
        "iperf3-udp",
        Duration::from_secs(ctx.o.seconds + 20),
    )
    .and_then(|out| iperf3_json(&out))
    .and_then(|j| {
        Ok(vec![
            json_f64(&j, &["end", "sum_received", "bits_per_second"])? / 1e6,
            json_f64(&j, &["end", "sum_received", "lost_percent"])?,
        ])
    });
    explain(result, &[&control, &data])
}

fn udp_echo(port: u16) -> Result<Server, String> {
    let addr = SocketAddrV4::new(CTR, port);
    let sock = in_netns(NS_CTR, move || {
        UdpSocket::bind(addr).map_err(|e| format!("udp bind {addr}: {e}"))
    })?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let mut server = Server::new();
    let (stop, count) = (server.stop.clone(), server.count.clone());
    server.handles.push(thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, src)) = sock.recv_from(&mut buf) {
                if sock.send_to(&buf[..n], src).is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }));
    Ok(server)
}

struct Flows {
    socks: Vec<UdpSocket>,
    dest: SocketAddrV4,
    /// Bit k set: flow i got its reply to datagram k, from the right address.
    got: Vec<u64>,
    misrouted: u64,
    example: Option<String>,
}

impl Flows {
    /// Reads every reply that arrives within `ms`.
    fn drain(&mut self, ms: u16) -> Result<(), String> {
        let ready: Vec<usize> = {
            let mut fds: Vec<PollFd> = self
                .socks
                .iter()
                .map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN))
                .collect();
            if poll(&mut fds, ms).map_err(|e| format!("poll: {e}"))? == 0 {
                return Ok(());
            }
            fds.iter()
                .enumerate()
                .filter(|(_, f)| f.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
                .map(|(i, _)| i)
                .collect()
        };
        let mut buf = [0u8; 512];
        for i in ready {
            while let Ok((n, src)) = self.socks[i].recv_from(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]);
                let words: Vec<&str> = text.split_whitespace().collect();
                let parsed = match words[..] {
                    ["rpxb", "flow", f, "msg", k] => {
                        f.parse::<usize>().ok().zip(k.parse::<u32>().ok())
                    }
                    _ => None,
                };
                match parsed {
                    Some((f, k)) if f == i && src == SocketAddr::V4(self.dest) && k < 64 => {
                        self.got[i] |= 1 << k
                    }
                    _ => {
                        self.misrouted += 1;
                        self.example
                            .get_or_insert_with(|| format!("flow {i} got {text:?} from {src}"));
                    }
                }
            }
        }
        Ok(())
    }

    fn complete(&self, k: usize) -> bool {
        self.got.iter().all(|g| g & (1 << k) != 0)
    }
}

fn udp_flows(ctx: &Ctx, kind: Kind, port: u16) -> Result<Vec<f64>, String> {
    let _server = udp_echo(port)?;
    let proxy = start_proxy(ctx, kind, Proto::Udp, port, false)?;
    let (flows, msgs) = (ctx.o.flows, ctx.o.flow_msgs);
    let dest = dest(kind, port);
    let result = in_netns(NS_CLI, move || {
        let mut st = Flows {
            socks: Vec::with_capacity(flows),
            dest,
            got: vec![0; flows],
            misrouted: 0,
            example: None,
        };
        for _ in 0..flows {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
                .map_err(|e| format!("udp socket: {e}"))?;
            s.set_nonblocking(true).map_err(|e| e.to_string())?;
            st.socks.push(s);
        }
        for k in 0..msgs {
            for i in 0..flows {
                let payload = format!("rpxb flow {i} msg {k}");
                // A failed send is a missing reply, counted below.
                let _ = st.socks[i].send_to(payload.as_bytes(), dest);
                if i % 10 == 9 {
                    // Paced (at most 10,000 datagrams/s): this is about flows, not rate.
                    st.drain(0)?;
                    thread::sleep(Duration::from_millis(1));
                }
            }
            let deadline = Instant::now() + Duration::from_secs(1);
            while !st.complete(k) && Instant::now() < deadline {
                st.drain(20)?;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !(0..msgs).all(|k| st.complete(k)) && Instant::now() < deadline {
            st.drain(20)?;
        }
        let replies: u32 = st.got.iter().map(|g| g.count_ones()).sum();
        Ok((replies as f64, st.misrouted as f64, st.example))
    });
    let (replies, misrouted, example) = explain(result, &[&proxy])?;
    if let Some(e) = example {
        eprintln!(
            "    udp-flows via {}: {misrouted} misrouted, e.g. {e}",
            kind.name()
        );
    }
    Ok(vec![replies * 100.0 / (flows * msgs) as f64, misrouted])
}

/// Accepts connections in the container namespace and keeps them open; while `echo` is set it
/// also echoes whatever arrives on them.
fn hold_server(port: u16, echo: Arc<AtomicBool>) -> Result<Server, String> {
    let l = tcp_listener_in(NS_CTR, SocketAddrV4::new(CTR, port))?;
    let mut server = Server::new();
    let (stop, count) = (server.stop.clone(), server.count.clone());
    server.handles.push(thread::spawn(move || {
        let mut held: Vec<TcpStream> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((s, _)) => {
                    if s.set_nonblocking(true).is_ok() {
                        held.push(s);
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => thread::sleep(Duration::from_millis(1)),
            }
            if !echo.load(Ordering::Relaxed) {
                wait_readable(&l, 50);
                continue;
            }
            let ready: Vec<usize> = {
                let mut fds: Vec<PollFd> = held
                    .iter()
                    .map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN))
                    .collect();
                fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
                let _ = poll(&mut fds, 50u16);
                fds[..held.len()]
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty()))
                    .map(|(i, _)| i)
                    .collect()
            };
            let mut closed = Vec::new();
            for i in ready {
                let mut buf = [0u8; 64];
                match held[i].read(&mut buf) {
                    Ok(0) => closed.push(i),
                    Ok(n) => {
                        let _ = held[i].write_all(&buf[..n]);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => closed.push(i),
                }
            }
            for i in closed.into_iter().rev() {
                held.swap_remove(i);
            }
        }
    }));
    Ok(server)
}

/// `n` connections from the client namespace; with `echo`, each sends a byte and waits for it.
fn open_conns(d: SocketAddrV4, n: usize, echo: bool) -> Result<Vec<TcpStream>, String> {
    in_netns(NS_CLI, move || {
        let timeout = Duration::from_secs(5);
        let mut conns = Vec::with_capacity(n);
        for i in 0..n {
            let fail =
                |what: &str, e: std::io::Error| format!("connection {}/{n}: {what}: {e}", i + 1);
            let s =
                TcpStream::connect_timeout(&d.into(), timeout).map_err(|e| fail("connect", e))?;
            s.set_read_timeout(Some(timeout))
                .map_err(|e| fail("timeout", e))?;
            conns.push(s);
        }
        if echo {
            echo_check(&mut conns)?;
        }
        Ok(conns)
    })
}

/// One byte out and back on every connection: they all carry data end to end.
fn echo_check(conns: &mut [TcpStream]) -> Result<(), String> {
    for (i, s) in conns.iter_mut().enumerate() {
        s.write_all(b"x")
            .map_err(|e| format!("connection {}: write: {e}", i + 1))?;
    }
    for (i, s) in conns.iter_mut().enumerate() {
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .map_err(|e| format!("connection {}: no echo: {e}", i + 1))?;
    }
    Ok(())
}

/// How many idle connections `kind` can hold under RLIMIT_NOFILE (which this machine may not
/// let even root raise): a socket per side, plus, for docker-proxy, the splice pipe (2 fds) that
/// Go's io.Copy takes per direction before it waits for data. This process holds 2 per
/// connection too (client and server side), so it is never the tighter bound.
fn idle_count(ctx: &Ctx, kind: Kind) -> usize {
    let per_conn = match kind {
        Kind::DockerProxy => 6,
        _ => 2,
    };
    let cap = ctx.o.nofile.saturating_sub(600) / per_conn;
    ctx.o.idle.min(cap as usize).max(1)
}

/// Connections that carried nothing yet: each costs the proxy two sockets (client and
/// container side), and the bench process two more (client and server).
fn idle_conns(ctx: &Ctx, kind: Kind, port: u16) -> Result<Vec<f64>, String> {
    const WARM: usize = 20;
    const SAMPLE: usize = 100;
    let echo = Arc::new(AtomicBool::new(true));
    let server = hold_server(port, echo.clone())?;
    let proxy = start_proxy(ctx, kind, Proto::Tcp, port, false)?;
    let pid = proxy.as_ref().ok_or("idle-conns needs a proxy")?.pid();
    let d = dest(kind, port);
    let n = idle_count(ctx, kind);
    // Warm up (runtime threads, first allocations, a relay in each direction), so that the
    // delta is what the idle connections themselves cost.
    drop(explain(open_conns(d, WARM, true), &[&proxy])?);
    echo.store(false, Ordering::Relaxed);
    thread::sleep(Duration::from_millis(300));
    let before = tree_mem(pid);
    let mut conns = explain(open_conns(d, n, false), &[&proxy])?;
    // Established end to end once the container side has accepted every one.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.count.load(Ordering::Relaxed) < WARM + n {
        if Instant::now() > deadline {
            let got = server.count.load(Ordering::Relaxed) - WARM;
            return explain(
                Err(format!(
                    "the container side accepted {got} of {n} connections in 30 s"
                )),
                &[&proxy],
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    thread::sleep(Duration::from_millis(if ctx.o.smoke { 200 } else { 1000 }));
    let after = tree_mem(pid);
    // Then a sample of them must still carry data both ways.
    echo.store(true, Ordering::Relaxed);
    let sample = n.min(SAMPLE);
    explain(echo_check(&mut conns[..sample]), &[&proxy])?;
    drop(conns);
    let per_conn = |a: u64, b: u64| (a as f64 - b as f64) / n as f64;
    Ok(vec![
        per_conn(after.pss_kb, before.pss_kb),
        per_conn(after.private_kb, before.private_kb),
        n as f64,
    ])
}

fn many_ports(ctx: &Ctx, kind: Kind, _port: u16) -> Result<Vec<f64>, String> {
    let n = ctx.o.ports as u16;
    let (first, last) = (NPORTS_BASE, NPORTS_BASE + n - 1);
    let mut procs = Vec::new();
    let mut pipes = Vec::new();
    let t0 = Instant::now();
    match kind {
        Kind::Rproxy => {
            let config = ctx.dir.join("empty.toml");
            fs::write(&config, "publish = []\n")
                .map_err(|e| format!("{}: {e}", config.display()))?;
            let socket = ctx
                .dir
                .join(format!("ctl-{}.sock", SEQ.load(Ordering::Relaxed)));
            let mut cmd = command(None, false, &ctx.o.rproxy);
            cmd.arg("daemon")
                .arg("--config")
                .arg(&config)
                .arg("--control-socket")
                .arg(&socket)
                .args(["--drain-timeout", "0", "-p"])
                .arg(format!("{GW}:{first}-{last}:{CTR}:{first}-{last}"))
                .env("RPROXY_LOG", "warn")
                .env_remove("RPROXY_LOG_FILE")
                .env_remove("NOTIFY_SOCKET");
            procs.push(Proc::spawn(cmd, "rproxy-daemon", &ctx.dir)?);
        }
        Kind::DockerProxy => {
            for port in first..=last {
                let mut cmd = command(None, false, &ctx.o.docker_proxy);
                cmd.args(docker_args(Proto::Tcp, port));
                let (read, write) =
                    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
                cmd.fd_mappings(vec![FdMapping {
                    parent_fd: write,
                    child_fd: 3,
                }])
                .map_err(|e| format!("fd mapping: {e:?}"))?;
                procs.push(Proc::spawn(cmd, &format!("docker-proxy-{port}"), &ctx.dir)?);
                pipes.push(read);
            }
        }
        Kind::Socat => {
            for port in first..=last {
                let mut cmd = command(None, false, tool("socat"));
                cmd.args([
                    format!("TCP4-LISTEN:{port},bind={GW},fork,reuseaddr"),
                    format!("TCP4:{CTR}:{port}"),
                ]);
                procs.push(Proc::spawn(cmd, &format!("socat-{port}"), &ctx.dir)?);
            }
        }
        Kind::Direct => return Err("ports needs a proxy".into()),
    }
    let deadline = t0 + Duration::from_secs(30);
    loop {
        let listening: BTreeSet<u16> = sockets(0, Proto::Tcp)
            .into_iter()
            .filter(|(a, st)| {
                *st == TCP_LISTEN && *a.ip() == GW && (first..=last).contains(&a.port())
            })
            .map(|(a, _)| a.port())
            .collect();
        if listening.len() == n as usize {
            break;
        }
        for p in procs.iter_mut() {
            if let Some(status) = p.exited() {
                return Err(format!("{} exited ({status}){}", p.name, p.logs()));
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {n} ports listen after 30 s",
                listening.len()
            ));
        }
        thread::sleep(Duration::from_millis(1));
    }
    let ready_ms = t0.elapsed().as_secs_f64() * 1e3;
    drop(pipes);
    thread::sleep(Duration::from_millis(if ctx.o.smoke { 300 } else { 1000 }));
    let mut total = Mem::default();
    for p in &procs {
        let m = tree_mem(p.pid());
        total.rss_kb += m.rss_kb;
        total.pss_kb += m.pss_kb;
        total.threads += m.threads;
        total.processes += m.processes;
    }
    // Stop them all at once rather than one 3-second wait at a time.
    for p in &procs {
        let _ = kill(Pid::from_raw(p.pid() as i32), Signal::SIGTERM);
    }
    drop(procs);
    Ok(vec![
        ready_ms,
        total.rss_kb as f64 / 1024.0,
        total.pss_kb as f64 / 1024.0,
        total.threads as f64,
        total.processes as f64,
    ])
}

// ---------------------------------------------------------------------------------------------
// Driver and report

struct Sample {
    workload: usize,
    kind: Kind,
    round: usize,
    result: Result<Vec<f64>, String>,
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
fn raise_nofile() -> Result<u64, String> {
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

fn selected<'a>(all: &'a [Workload], only: &[String]) -> Result<Vec<&'a Workload>, String> {
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
    let chosen = selected(&all, &o.only)?;
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
    let ctx = Ctx { o, dir, kinds };
    let date = sh(&["date", "-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let started = Instant::now();
    let topology = Topology::up()?;
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
                let port = PORT_BASE
                    + windex as u16 * 100
                    + ((round * KINDS.len() + kind.index()) % 100) as u16;
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
    drop(topology);
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

fn fmt_value(v: f64, decimals: usize) -> String {
    format!("{v:.decimals$}")
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The successful values of one metric of one proxy in one workload, sorted, and the failures.
fn values(samples: &[Sample], w: usize, kind: Kind, metric: usize) -> (Vec<f64>, usize) {
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

const RATIOS: [(Kind, Kind); 4] = [
    (Kind::Rproxy, Kind::DockerProxy),
    (Kind::Rproxy, Kind::Direct),
    (Kind::DockerProxy, Kind::Direct),
    (Kind::Socat, Kind::DockerProxy),
];

fn report(
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
        "{cpus} CPUs, Linux {}; docker-proxy: {}; iperf3 {}, sockperf {}, wrk {}, socat {}. \
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
        o.rounds,
        o.seconds
    );
    t += "| workload | metric |";
    for k in KINDS {
        t += &format!(" {} |", k.name());
    }
    for (a, b) in RATIOS {
        t += &format!(" {} ÷ {} |", a.name(), b.name());
    }
    t += "\n|---|---|";
    t += &"---:|".repeat(KINDS.len() + RATIOS.len());
    t += "\n";
    let mut errors = Vec::new();
    for (wi, w) in chosen.iter().enumerate() {
        for (mi, m) in w.metrics.iter().enumerate() {
            t += &format!("| {} | {} |", w.name, m.name);
            let mut medians = [None; KINDS.len()];
            for k in KINDS {
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
            for (a, b) in RATIOS {
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
    t += &format!(
        "\nProxies listen on {GW} (bridge {BRIDGE}, host netns) and forward to {CTR} (netns {NS_CTR}); \
         clients run in netns {NS_CLI}. rproxy and docker-proxy run as dockerd runs them \
         (`-proto P -host-ip {GW} -host-port N -container-ip {CTR} -container-port N`, status pipe on fd 3); \
         socat as `socat TCP4-LISTEN:N,bind={GW},fork,reuseaddr TCP4:{CTR}:N` (UDP4 likewise); \
         direct sends to {CTR} over the bridge. The bridge's traffic is exempt from connection \
         tracking (iptables raw `CT --notrack`), whose table the whole machine shares.\n"
    );
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

fn samples_json(ctx: &Ctx, chosen: &[&Workload], samples: &[Sample], date: &str) -> Value {
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
fn main() {
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
