//! What allow-lists cost new connections through kernel DNAT (issue 23): a client namespace
//! connects as fast as it can through a host namespace, where rproxy's table DNATs the port
//! to a target namespace, with
//!
//! - no list,
//! - a 1,000-entry list on the port (1,000 separate /32s, the client's among them),
//! - 2,000 mappings with a list each (10 entries; the port's among them, with the client's
//!   network),
//! - and no list again, in a set-up of its own: a control, whose difference from the first is
//!   noise,
//!
//! each case in a set of namespaces of its own, set up once, and measured in turn for short
//! windows, many rounds: a machine shared with other work drifts, and neighbouring windows
//! drift together. Reported: each case's median rate, and the median of its per-round ratio
//! to the no-list window beside it. Each connection is a SYN through the filter and DNAT,
//! the handshake, and a reset (no TIME_WAIT to run out of ports). The other 1,999 mappings
//! have lists only (no DNAT rules of their own), so what is measured is the filter's cost,
//! not that of rproxy's DNAT chain, which is linear in the number of mappings.
//!
//! As root (it makes network namespaces):
//!
//! ```text
//! cargo bench --bench allow                    # 21 rounds of 0.4 s per case
//! cargo bench --bench allow -- --rounds 5      # fewer
//! ```

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rproxy::allow::AllowList;
use rproxy::mapping::parse_publish;
use rproxy::nat::Nat;
use rproxy::settings::options::{Mode, Options};

const CLIENTS: usize = 2;
const WINDOW: Duration = Duration::from_millis(400);
const WARMUP: Duration = Duration::from_millis(100);
const HOST_IP: &str = "10.72.2.1";
const CLIENT_IP: &str = "10.72.2.2";
const TARGET_IP: &str = "10.72.1.2";

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("allow bench: needs root (network namespaces)");
        std::process::exit(2);
    }
    let rounds: usize = std::env::args()
        .skip_while(|a| a != "--rounds")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(21);
    let topos: Vec<Topo> = Case::ALL.iter().map(|c| Topo::new(c.tag())).collect();
    let outcome = run(&topos, rounds);
    drop(topos);
    if let Err(e) = outcome {
        eprintln!("allow bench: {e}");
        std::process::exit(1);
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Case {
    None,
    /// No list either, in namespaces of its own: the noise floor.
    Control,
    Long,
    Many,
}

impl Case {
    const ALL: [Case; 4] = [Case::None, Case::Control, Case::Long, Case::Many];
    fn tag(self) -> &'static str {
        match self {
            Case::None => "n",
            Case::Control => "c",
            Case::Long => "l",
            Case::Many => "m",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Case::None => "no list",
            Case::Control => "no list (control: a second set-up)",
            Case::Long => "1,000-entry list",
            Case::Many => "2,000 mappings with 10-entry lists",
        }
    }
}

fn run(topos: &[Topo], rounds: usize) -> Result<(), String> {
    let mut nats = Vec::new();
    for (case, topo) in Case::ALL.into_iter().zip(topos) {
        server(&topo.target)?;
        let (nat, setup) = prepare(topo, case)?;
        eprintln!("{}: set up in {:.2} s", case.label(), setup.as_secs_f64());
        nats.push(nat);
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); Case::ALL.len()];
    let n = Case::ALL.len();
    for round in 0..rounds {
        let mut line = format!("round {}:", round + 1);
        // Each round starts with another case: no case always follows the same one.
        for i in (0..n).map(|k| (k + round) % n) {
            let rate = measure(&topos[i].client)?;
            rates[i].push(rate);
            line.push_str(&format!(" {} {rate:.0}/s;", Case::ALL[i].tag()));
        }
        eprintln!("{line}");
    }
    for (nat, topo) in nats.into_iter().zip(topos) {
        topo.in_host(move || runtime().block_on(nat.close()));
    }
    println!(
        "| new connections through DNAT | median rate | ratio to no list in the same round: \
         median (quartiles) |"
    );
    println!("| --- | ---: | ---: |");
    for (i, case) in Case::ALL.into_iter().enumerate() {
        let ratios: Vec<f64> = rates[i].iter().zip(&rates[0]).map(|(r, b)| r / b).collect();
        println!(
            "| {} | {:.0}/s | {:.3} ({:.3}–{:.3}) |",
            case.label(),
            median(&rates[i]),
            median(&ratios),
            quantile(&ratios, 0.25),
            quantile(&ratios, 0.75)
        );
    }
    let spread = |v: &[f64]| {
        (
            v.iter().cloned().fold(f64::MAX, f64::min),
            v.iter().cloned().fold(0.0, f64::max),
        )
    };
    let (lo, hi) = spread(&rates[0]);
    println!(
        "({rounds} rounds of {:.1} s per case, {CLIENTS} client threads; the no-list windows \
         ranged over {lo:.0}–{hi:.0}/s)",
        WINDOW.as_secs_f64()
    );
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A fresh table for `case`: the measured port's DNAT, and its lists. Returns it and how
/// long the lists took to install.
fn prepare(topo: &Topo, case: Case) -> Result<(Nat, Duration), String> {
    topo.in_host(move || {
        let rt = runtime();
        rt.block_on(async move {
            let nat = Nat::new(Nat::DAEMON_TABLE);
            let options = Options {
                nat: Mode::Require,
                ..Options::default()
            };
            let mapping = |spec: &str| parse_publish(spec, options.clone()).map(|m| m[0].clone());
            let measured = mapping(&format!("8080:{TARGET_IP}:80/tcp"))?;
            nat.install(&measured, false).await?;
            let start = Instant::now();
            match case {
                Case::None | Case::Control => {}
                Case::Long => {
                    // 999 others, the client's address in the middle.
                    let mut entries: Vec<String> = (0..999u32)
                        .map(|i| format!("172.{}.{}.{}/32", 16 + i / 256, i % 256, 1 + i % 200))
                        .collect();
                    entries.insert(500, format!("{CLIENT_IP}/32"));
                    let list = AllowList::parse(&entries).map_err(|e| e.to_string())?;
                    nat.set_allow(&measured, Some(&list)).await?;
                }
                Case::Many => {
                    let list_for = |n: u32, with_client: bool| {
                        let mut entries: Vec<String> = (0..10u32)
                            .map(|i| format!("172.{}.{}.0/24", 16 + n % 16, (n / 16 + i) % 256))
                            .collect();
                        if with_client {
                            entries[5] = "10.72.2.0/24".to_string();
                        }
                        AllowList::parse(&entries).map_err(|e| e.to_string())
                    };
                    for n in 0..1999u32 {
                        let m = mapping(&format!("{}:{TARGET_IP}:80/tcp", 10_000 + n))?;
                        nat.set_allow(&m, Some(&list_for(n, false)?)).await?;
                    }
                    nat.set_allow(&measured, Some(&list_for(1999, true)?))
                        .await?;
                }
            }
            Ok((nat, start.elapsed()))
        })
    })
}

/// Connections per second the client namespace makes to the published port.
fn measure(client: &Ns) -> Result<f64, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let addr: SocketAddr = format!("{HOST_IP}:8080")
        .parse()
        .unwrap_or_else(|_| unreachable!());
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, made, failed) = (stop.clone(), made.clone(), failed.clone());
            let path = client.path();
            std::thread::spawn(move || {
                if enter(&path).is_err() {
                    return;
                }
                while !stop.load(Relaxed) {
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                        Ok(s) => {
                            // A reset, not a FIN: no TIME_WAIT.
                            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                            made.fetch_add(1, Relaxed);
                        }
                        Err(_) => {
                            failed.fetch_add(1, Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(WARMUP);
    let (n0, t0) = (made.load(Relaxed), Instant::now());
    std::thread::sleep(WINDOW);
    let (n1, t1) = (made.load(Relaxed), Instant::now());
    stop.store(true, Relaxed);
    for t in threads {
        let _ = t.join();
    }
    match failed.load(Relaxed) {
        0 => Ok((n1 - n0) as f64 / (t1 - t0).as_secs_f64()),
        n => Err(format!("{n} connections failed")),
    }
}

/// The target: accepts and closes, with a deep queue (a SYN dropped on a full one costs a
/// 1 s retransmission).
fn server(target: &Ns) -> Result<(), String> {
    let path = target.path();
    let listener = std::thread::spawn(move || -> Result<TcpListener, String> {
        enter(&path).map_err(|e| format!("setns: {e}"))?;
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .map_err(|e| e.to_string())?;
        s.set_reuse_address(true).map_err(|e| e.to_string())?;
        s.bind(&SocketAddr::from(([0, 0, 0, 0], 80)).into())
            .map_err(|e| e.to_string())?;
        s.listen(4096).map_err(|e| e.to_string())?;
        Ok(s.into())
    })
    .join()
    .map_err(|_| "the server thread died".to_string())??;
    std::thread::spawn(move || {
        for c in listener.incoming() {
            drop(c);
        }
    });
    Ok(())
}

fn enter(path: &str) -> Result<(), String> {
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())
}

/// A network namespace of this bench, deleted on drop.
struct Ns(String);

impl Ns {
    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// host (bridge 10.72.1.1, uplink 10.72.2.1) ── target 10.72.1.2; client 10.72.2.2.
struct Topo {
    host: Ns,
    target: Ns,
    client: Ns,
}

impl Topo {
    fn new(tag: &str) -> Topo {
        let pid = std::process::id();
        let t = Topo {
            host: Ns(format!("rpx-alb{tag}-h-{pid}")),
            target: Ns(format!("rpx-alb{tag}-t-{pid}")),
            client: Ns(format!("rpx-alb{tag}-c-{pid}")),
        };
        let (h, tg, c) = (&t.host.0, &t.target.0, &t.client.0);
        let script = format!(
            "ip netns add {h} && ip netns add {tg} && ip netns add {c} && \
             for n in {h} {tg} {c}; do ip -n $n link set lo up; done && \
             ip -n {h} link add br0 type bridge && ip -n {h} link set br0 up && \
             ip -n {h} addr add 10.72.1.1/24 dev br0 && \
             ip -n {h} link add vt type veth peer name eth0 netns {tg} && \
             ip -n {h} link set vt master br0 up && ip -n {tg} link set eth0 up && \
             ip -n {tg} addr add {TARGET_IP}/24 dev eth0 && ip -n {tg} route add default via 10.72.1.1 && \
             ip -n {h} link add up0 type veth peer name eth0 netns {c} && ip -n {h} link set up0 up && \
             ip -n {h} addr add {HOST_IP}/24 dev up0 && ip -n {c} link set eth0 up && \
             ip -n {c} addr add {CLIENT_IP}/24 dev eth0 && ip -n {c} route add default via {HOST_IP} && \
             ip netns exec {h} sysctl -qw net.ipv4.ip_forward=1 && \
             ip netns exec {tg} sysctl -qw net.core.somaxconn=4096"
        );
        let ok = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            drop(t);
            eprintln!("allow bench: cannot make the namespaces");
            std::process::exit(1);
        }
        t
    }

    /// Runs `f` on a thread in the host namespace: the NAT thread a first call starts there
    /// stays there.
    fn in_host<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.host.path();
        std::thread::spawn(move || {
            if let Err(e) = enter(&path) {
                eprintln!("allow bench: setns: {e}");
                std::process::exit(1);
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| std::process::exit(1))
    }
}

/// The `q` quantile of `v` (nearest rank).
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n => v[((n - 1) as f64 * q).round() as usize],
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
