//! What the socket hooks cost traffic they do not touch: every connect() and sendto() of
//! every process on the host runs them once they are attached. Measured on loopback, to a
//! port no mapping publishes, without and with `rproxy daemon --socket-lb` running,
//! alternating, in one run; medians of the rounds, and their ratio.
//!
//! Then what they cost a connection they carry, from the kernel's own accounting
//! (`kernel.bpf_stats_enabled`: each program's run time and run count): the connect hook on
//! a miss (an unrelated port) beside a hit (a published port, sent to the target), and the
//! getpeername hook, which the kernel also runs in every accept().
//!
//! As root (the hooks attach at the cgroup v2 root):
//!
//! ```text
//! cargo bench --bench hooks                    # 7 rounds of 20,000 connects and 200,000 sendto
//! cargo bench --bench hooks -- --rounds 3      # fewer
//! ```

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CONNECTS: usize = 20_000;
const DATAGRAMS: usize = 200_000;

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("hooks bench: needs root (the hooks attach at the cgroup v2 root)");
        std::process::exit(2);
    }
    let rounds: usize = std::env::args()
        .skip_while(|a| a != "--rounds")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let rproxy = env!("CARGO_BIN_EXE_rproxy");

    // The unrelated servers: a TCP listener that accepts and closes, a UDP sink.
    // A deep accept queue: a SYN dropped on a full one costs a 1 s retransmit, which would
    // swamp the microseconds measured here.
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    listener.listen(4096).unwrap();
    let listener: TcpListener = listener.into();
    let tcp = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in listener.incoming() {
            drop(c);
        }
    });
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp = sink.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 16];
        while sink.recv(&mut buf).is_ok() {}
    });

    let mut without = (Vec::new(), Vec::new());
    let mut with = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (c, d) = measure(tcp, udp);
        without.0.push(c);
        without.1.push(d);
        let daemon = Daemon::start(rproxy, round);
        let (c, d) = measure(tcp, udp);
        with.0.push(c);
        with.1.push(d);
        drop(daemon);
        eprintln!(
            "round {}: connect {:.2} / {:.2} µs, sendto {:.3} / {:.3} µs (without / with hooks)",
            round + 1,
            without.0[round],
            with.0[round],
            without.1[round],
            with.1[round]
        );
    }
    let (c0, c1) = (median(&without.0), median(&with.0));
    let (d0, d1) = (median(&without.1), median(&with.1));
    println!(
        "| operation (unrelated loopback port) | without hooks | with hooks | with ÷ without |"
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| TCP connect + close | {c0:.2} µs ({}) | {c1:.2} µs ({}) | {:.3} |",
        span(&without.0, 2),
        span(&with.0, 2),
        c1 / c0
    );
    println!(
        "| UDP sendto, 1 byte | {d0:.3} µs ({}) | {d1:.3} µs ({}) | {:.3} |",
        span(&without.1, 2),
        span(&with.1, 2),
        d1 / d0
    );
    println!(
        "\n{rounds} rounds of {CONNECTS} connects and {DATAGRAMS} datagrams, alternating; medians (min–max)."
    );
    program_costs(rproxy, tcp, rounds);
}

/// Nanoseconds per run of the connect4 and getpeername4 programs, for connects that miss
/// (to `tcp`) and that hit (to a port published with `tcp` as its target), from the kernel's
/// run-time statistics; medians of the rounds.
fn program_costs(rproxy: &str, tcp: SocketAddr, rounds: usize) {
    let stats_was = std::fs::read_to_string(BPF_STATS).unwrap_or_default();
    std::fs::write(BPF_STATS, "1").expect("kernel.bpf_stats_enabled");
    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let published = free.local_addr().unwrap();
    drop(free);
    let before = programs();
    let spec = format!("{published}:{tcp}");
    let daemon = Daemon::start_with(rproxy, rounds, &spec);
    let ours: Vec<(u64, String)> = programs()
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    let id = |name: &str| {
        ours.iter()
            .find(|(_, n)| n == name)
            .map(|(id, _)| *id)
            .unwrap_or_else(|| panic!("no {name} program of ours in {ours:?}"))
    };
    let (connect4, peername4) = (id("rpx_connect4"), id("rpx_peername4"));
    let mut costs: [Vec<f64>; 4] = Default::default();
    for _ in 0..rounds {
        for (i, addr) in [tcp, published].into_iter().enumerate() {
            let (c0, p0) = (run_stats(connect4), run_stats(peername4));
            for _ in 0..CONNECTS {
                let s = TcpStream::connect(addr).expect("connect");
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            }
            // The listener's thread accepts on its own time: let it catch up.
            std::thread::sleep(Duration::from_millis(200));
            let (c1, p1) = (run_stats(connect4), run_stats(peername4));
            costs[i].push(per_run(c0, c1));
            costs[2 + i].push(per_run(p0, p1));
        }
    }
    drop(daemon);
    let _ = std::fs::write(BPF_STATS, stats_was.trim());
    println!("\n| program (kernel time per run) | connect to an unrelated port | connect to a published port |");
    println!("|---|---:|---:|");
    for (name, miss, hit) in [
        ("connect4", &costs[0], &costs[1]),
        (
            "getpeername4, in the server's accept()",
            &costs[2],
            &costs[3],
        ),
    ] {
        println!(
            "| {name} | {:.0} ns ({}) | {:.0} ns ({}) |",
            median(miss),
            span(miss, 0),
            median(hit),
            span(hit, 0)
        );
    }
    println!(
        "\n{rounds} rounds of {CONNECTS} connects each way, alternating; medians (min–max) of \
         run_time_ns / run_cnt (kernel.bpf_stats_enabled, which adds its own clock reads)."
    );
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Every loaded BPF program named `rpx_*`: (id, name), from `bpftool prog show --json`.
fn programs() -> Vec<(u64, String)> {
    bpftool_progs()
        .into_iter()
        .filter_map(|p| {
            let name = p["name"].as_str()?.to_string();
            (name.starts_with("rpx_")).then_some((p["id"].as_u64()?, name))
        })
        .collect()
}

/// (run_time_ns, run_cnt) of program `id`.
fn run_stats(id: u64) -> (u64, u64) {
    bpftool_progs()
        .into_iter()
        .find(|p| p["id"].as_u64() == Some(id))
        .map(|p| {
            let n = |k: &str| p[k].as_u64().unwrap_or(0);
            (n("run_time_ns"), n("run_cnt"))
        })
        .unwrap_or_else(|| panic!("program {id} is gone"))
}

fn bpftool_progs() -> Vec<serde_json::Value> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .expect("bpftool (.ci/install-deps installs it)");
    serde_json::from_slice(&out.stdout).expect("bpftool's JSON")
}

fn per_run((t0, n0): (u64, u64), (t1, n1): (u64, u64)) -> f64 {
    (t1 - t0) as f64 / (n1 - n0).max(1) as f64
}

/// Microseconds per connect+close, and per sendto.
fn measure(tcp: SocketAddr, udp: SocketAddr) -> (f64, f64) {
    let t = Instant::now();
    for _ in 0..CONNECTS {
        let s = TcpStream::connect(tcp).expect("connect");
        // Reset rather than FIN: no TIME_WAIT, so the loop never runs out of local ports.
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        drop(s);
    }
    let connect = t.elapsed().as_secs_f64() * 1e6 / CONNECTS as f64;
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    let t = Instant::now();
    for _ in 0..DATAGRAMS {
        let _ = u.send_to(b"x", udp);
    }
    let sendto = t.elapsed().as_secs_f64() * 1e6 / DATAGRAMS as f64;
    (connect, sendto)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// "min–max" of `v`, with `decimals` places.
fn span(v: &[f64], decimals: usize) -> String {
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    format!("{lo:.decimals$}–{hi:.decimals$}")
}

/// `rproxy daemon --socket-lb=require` with one mapping of its own (so the maps are not
/// empty), stopped on drop.
struct Daemon(Child, std::path::PathBuf);

impl Daemon {
    fn start(rproxy: &str, round: usize) -> Daemon {
        Daemon::start_with(rproxy, round, "127.0.0.1:0:127.0.0.1:9")
    }

    /// The same with the mapping `spec`.
    fn start_with(rproxy: &str, round: usize, spec: &str) -> Daemon {
        let sock =
            std::env::temp_dir().join(format!("rproxy-hooks-{}-{round}.sock", std::process::id()));
        let mut child = Command::new(rproxy)
            .args(["daemon", "--socket-lb=require", "--control-socket"])
            .arg(&sock)
            .args(["-p", spec])
            .env("RPROXY_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("rproxy daemon");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !line.contains("daemon ready") {
            line.clear();
            if stderr.read_line(&mut line).unwrap_or(0) == 0 || Instant::now() > deadline {
                let mut rest = String::new();
                let _ = stderr.read_to_string(&mut rest);
                panic!("rproxy daemon did not start: {line}{rest}");
            }
        }
        std::thread::spawn(move || {
            let mut sink = String::new();
            let _ = stderr.read_to_string(&mut sink);
        });
        Daemon(child, sock)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}
