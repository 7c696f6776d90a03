//! What the socket hooks cost traffic they do not touch: every connect() and sendto() of
//! every process on the host runs them once they are attached. Measured on loopback, to a
//! port no mapping publishes, without and with `rproxy daemon --socket-lb` running,
//! alternating, in one run; medians of the rounds, and their ratio.
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
        span(&without.0),
        span(&with.0),
        c1 / c0
    );
    println!(
        "| UDP sendto, 1 byte | {d0:.3} µs ({}) | {d1:.3} µs ({}) | {:.3} |",
        span(&without.1),
        span(&with.1),
        d1 / d0
    );
    println!(
        "\n{rounds} rounds of {CONNECTS} connects and {DATAGRAMS} datagrams, alternating; medians (min–max)."
    );
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

fn span(v: &[f64]) -> String {
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    format!("{lo:.2}–{hi:.2}")
}

/// `rproxy daemon --socket-lb=require` with one mapping of its own (so the maps are not
/// empty), stopped on drop.
struct Daemon(Child, std::path::PathBuf);

impl Daemon {
    fn start(rproxy: &str, round: usize) -> Daemon {
        let sock =
            std::env::temp_dir().join(format!("rproxy-hooks-{}-{round}.sock", std::process::id()));
        let mut child = Command::new(rproxy)
            .args(["daemon", "--socket-lb=require", "--control-socket"])
            .arg(&sock)
            .args(["-p", "127.0.0.1:0:127.0.0.1:9"])
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
