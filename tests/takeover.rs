//! Restart and upgrade without an outage: a new daemon takes the running one's sockets
//! (`rproxy daemon --takeover`, SIGUSR2, SIGHUP after the program file was replaced) while
//! clients keep connecting, and shims whose daemon stopped or died hand their ports back to
//! the next one. Every test drives real clients through real processes and counts what they
//! saw: refused connections, established connections that broke, UDP requests unanswered.
//!
//! `cargo test --release --test takeover -- --nocapture` prints the figures.

mod common;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

fn at(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// What the TCP clients saw.
#[derive(Default)]
struct TcpTally {
    /// Connections that exchanged all their messages and closed cleanly.
    ok: AtomicU64,
    /// Connections refused (nothing accepting).
    refused: AtomicU64,
    /// Established connections that broke: reset, cut short, timed out, wrong bytes.
    broken: AtomicU64,
    errors: Mutex<Vec<String>>,
    /// Each good connection's start and end.
    spans: Mutex<Vec<(Instant, Instant)>>,
}

/// What the UDP clients saw.
#[derive(Default)]
struct UdpTally {
    answered: AtomicU64,
    /// Requests without a reply within a second.
    lost: AtomicU64,
    /// ICMP port unreachable (nothing reading the port).
    refused: AtomicU64,
}

/// Clients connecting and exchanging data continuously until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    tcp: Arc<TcpTally>,
    udp: Arc<UdpTally>,
}

impl Load {
    /// `per` client threads for each address.
    fn start(tcp: &[SocketAddr], udp: &[SocketAddr], per: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (t, u) = (Arc::new(TcpTally::default()), Arc::new(UdpTally::default()));
        let mut threads = Vec::new();
        for &addr in tcp {
            for _ in 0..per {
                let (stop, t) = (stop.clone(), t.clone());
                threads.push(std::thread::spawn(move || tcp_client(addr, &stop, &t)));
            }
        }
        for &addr in udp {
            for _ in 0..per {
                let (stop, u) = (stop.clone(), u.clone());
                threads.push(std::thread::spawn(move || udp_client(addr, &stop, &u)));
            }
        }
        Load {
            stop,
            threads,
            tcp: t,
            udp: u,
        }
    }

    fn finish(self) -> (Arc<TcpTally>, Arc<UdpTally>) {
        self.stop.store(true, Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        (self.tcp, self.udp)
    }
}

/// Connections of five 256-byte round trips 10 ms apart, then a clean close; one after the
/// other until stopped.
fn tcp_client(addr: SocketAddr, stop: &AtomicBool, tally: &TcpTally) {
    let message: Vec<u8> = (0..=255u8).collect();
    while !stop.load(Relaxed) {
        let start = Instant::now();
        let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tally.refused.fetch_add(1, Relaxed);
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => {
                tally.broken.fetch_add(1, Relaxed);
                tally
                    .errors
                    .lock()
                    .unwrap()
                    .push(format!("{addr} connect: {e}"));
                continue;
            }
        };
        let mut exchange = || -> io::Result<()> {
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut buf = [0u8; 256];
            for _ in 0..5 {
                s.write_all(&message)?;
                s.read_exact(&mut buf)?;
                if buf[..] != message[..] {
                    return Err(io::Error::other("the echo differs"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            s.shutdown(std::net::Shutdown::Write)?;
            match s.read(&mut buf)? {
                0 => Ok(()),
                n => Err(io::Error::other(format!("{n} bytes after the end"))),
            }
        };
        match exchange() {
            Ok(()) => {
                tally.ok.fetch_add(1, Relaxed);
                tally.spans.lock().unwrap().push((start, Instant::now()));
            }
            Err(e) => {
                tally.broken.fetch_add(1, Relaxed);
                tally.errors.lock().unwrap().push(format!("{addr}: {e}"));
            }
        }
    }
}

/// A request every 5 ms, each waiting up to a second for its reply.
fn udp_client(addr: SocketAddr, stop: &AtomicBool, tally: &UdpTally) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut seq = 0u64;
    let mut buf = [0u8; 256];
    while !stop.load(Relaxed) {
        seq += 1;
        let mut msg = seq.to_be_bytes().to_vec();
        msg.resize(100, 7);
        if s.send(&msg).is_err() {
            tally.refused.fetch_add(1, Relaxed);
            continue;
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match s.recv(&mut buf) {
                Ok(n) if n >= 8 && buf[..8] == seq.to_be_bytes() => {
                    tally.answered.fetch_add(1, Relaxed);
                    break;
                }
                // A late reply to an earlier request.
                Ok(_) if Instant::now() < deadline => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tally.refused.fetch_add(1, Relaxed);
                    break;
                }
                _ => {
                    tally.lost.fetch_add(1, Relaxed);
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Says what the clients saw, and returns how many good TCP connections were open at `when`.
fn report(what: &str, tcp: &TcpTally, udp: &UdpTally, when: Instant) -> u64 {
    let spanning = tcp
        .spans
        .lock()
        .unwrap()
        .iter()
        .filter(|(a, b)| *a < when && when < *b)
        .count() as u64;
    println!(
        "{what}: TCP {} connections completed ({spanning} of them open across it), {} refused, \
         {} broken; UDP {} requests answered, {} unanswered, {} refused",
        tcp.ok.load(Relaxed),
        tcp.refused.load(Relaxed),
        tcp.broken.load(Relaxed),
        udp.answered.load(Relaxed),
        udp.lost.load(Relaxed),
        udp.refused.load(Relaxed),
    );
    for e in tcp.errors.lock().unwrap().iter().take(10) {
        println!("  {e}");
    }
    spanning
}

fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .unwrap()
}

/// A daemon's argv on this test's control socket.
fn daemon_args<'a>(dir: &'a Dir, sock: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let _ = dir;
    let mut argv = vec!["daemon", "--control-socket", sock, "--drain-timeout", "5"];
    argv.extend_from_slice(extra);
    argv
}

/// The notify socket a test stands up in systemd's place.
struct Systemd(UnixDatagram, String);

impl Systemd {
    fn new(dir: &Dir) -> Systemd {
        let path = dir.0.join("notify.sock");
        let s = UnixDatagram::bind(&path).unwrap();
        Systemd(s, path.to_str().unwrap().into())
    }

    /// The next message about the service's state, or None within `timeout`. The fd store's
    /// messages (FDSTORE=1 with a listening socket attached, FDSTOREREMOVE=1) are passed over:
    /// tests/systemd.rs tries them on a real systemd.
    fn next(&self, timeout: Duration) -> Option<String> {
        self.0.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 512];
        loop {
            let n = self.0.recv(&mut buf).ok()?;
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            if !message.starts_with("FDSTORE") {
                return Some(message);
            }
        }
    }
}

/// GET /metrics; None when refused.
fn scrape(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

/// The value of `metric` for the mapping listening on `frontend`.
fn sample(body: &str, metric: &str, frontend: SocketAddr) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(metric) && l.contains(&format!("frontend=\"{frontend}\"")))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A new daemon takes every socket over while clients connect and exchange data on TCP and
/// UDP mappings of every origin (`--publish`, `rproxy add`, shims): nothing is refused,
/// nothing established breaks, no UDP request goes unanswered; `ls` shows the new process
/// serving everything, the shims never noticed, systemd hears the new main pid, and the
/// metrics endpoint keeps answering (its counters start over in the new process).
#[test]
fn takeover_under_load_refuses_and_breaks_nothing() {
    let dir = Dir::new("takeover-load");
    let echo = tcp_echo("127.0.0.1:0");
    let uecho = udp_echo("127.0.0.1:0");
    let base = free_ports(6);
    let sock = dir.sock();
    let sock = sock.to_str().unwrap();
    let systemd = Systemd::new(&dir);
    let (tcp_pub, udp_pub) = (
        format!("127.0.0.1:{base}:{echo}"),
        format!("127.0.0.1:{}:{uecho}/udp", base + 1),
    );
    let metrics = at(base + 5);
    let metrics_arg = metrics.to_string();
    let own = [
        "-p",
        tcp_pub.as_str(),
        "-p",
        udp_pub.as_str(),
        "--metrics-addr",
        metrics_arg.as_str(),
    ];
    let mut old = Spawn::new(&daemon_args(&dir, sock, &own))
        .env("NOTIFY_SOCKET", &systemd.1)
        .no_status_pipe()
        .spawn();
    old.wait_log("daemon ready", Duration::from_secs(10));
    assert_eq!(
        systemd.next(Duration::from_secs(5)).as_deref(),
        Some("READY=1")
    );
    let (code, _, err) = cli(&dir, &["add", &format!("127.0.0.1:{}:{echo}", base + 2)]);
    assert_eq!(code, 0, "{err}");
    let tcp_shim = shim(&dir, "tcp", base + 3, echo, None);
    let u = UdpSocket::bind(at(base + 4)).unwrap();
    let udp_shim = shim(&dir, "udp", base + 4, uecho, Some(u.into()));
    let shims = [tcp_shim.child.id(), udp_shim.child.id()];

    // A scraper, every 20 ms.
    let scrapes = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let stop_scraping = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (scrapes, stop) = (scrapes.clone(), stop_scraping.clone());
        std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                match scrape(metrics) {
                    Some(_) => scrapes.0.fetch_add(1, Relaxed),
                    None => scrapes.1.fetch_add(1, Relaxed),
                };
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let load = Load::start(
        &[at(base), at(base + 2), at(base + 3)],
        &[at(base + 1), at(base + 4)],
        2,
    );
    std::thread::sleep(Duration::from_secs(1));
    let before = scrape(metrics).unwrap();
    let old_count = sample(&before, "rproxy_tcp_connections_total", at(base)).unwrap();

    let mut new = Spawn::new(&daemon_args(
        &dir,
        sock,
        &[&own[..], &["--takeover"]].concat(),
    ))
    .env("NOTIFY_SOCKET", &systemd.1)
    .no_status_pipe()
    .spawn();
    new.wait_log("daemon ready", Duration::from_secs(10));
    let handed_over = Instant::now();
    let new_pid = new.child.id();
    assert_eq!(
        systemd.next(Duration::from_secs(5)),
        Some(format!("MAINPID={new_pid}\nREADY=1")),
        "the new daemon must name itself the main process"
    );
    // The old one finishes its connections (a few milliseconds each) and exits.
    let drained = Instant::now();
    assert_eq!(old.wait_exit(Duration::from_secs(10)), Some(0));
    let drain_took = drained.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let (tcp, udp) = load.finish();
    stop_scraping.store(true, Relaxed);
    scraper.join().unwrap();

    let spanning = report("takeover", &tcp, &udp, handed_over);
    println!(
        "takeover: the old daemon exited {:?} after the new one was ready; metrics scraped {} \
         times, refused {}",
        drain_took,
        scrapes.0.load(Relaxed),
        scrapes.1.load(Relaxed)
    );
    assert_eq!(tcp.refused.load(Relaxed), 0, "refused connections");
    assert_eq!(tcp.broken.load(Relaxed), 0, "broken connections");
    assert!(spanning > 0, "no connection was open across the takeover");
    assert!(tcp.ok.load(Relaxed) > 100, "too little traffic to tell");
    assert_eq!(
        (udp.lost.load(Relaxed), udp.refused.load(Relaxed)),
        (0, 0),
        "UDP requests unanswered"
    );
    assert!(udp.answered.load(Relaxed) > 100);
    assert_eq!(
        scrapes.1.load(Relaxed),
        0,
        "the metrics endpoint refused a scrape"
    );

    // Everything is the new process's, each mapping where it came from.
    let rows = ls_table(&dir);
    let mut origins: Vec<&str> = rows.iter().map(|r| r["ORIGIN"].as_str()).collect();
    origins.sort();
    assert_eq!(
        origins,
        ["add", "publish", "publish", "shim", "shim"],
        "{rows:?}"
    );
    for r in &rows {
        assert_eq!(r["PID"], new_pid.to_string(), "{r:?}");
        assert_eq!(r["STATE"], "serving", "{r:?}");
    }
    let total = |port: u16| -> u64 {
        let row = rows
            .iter()
            .find(|r| r["LISTEN"] == format!("127.0.0.1:{port}"))
            .unwrap();
        row["TOTAL"].parse().unwrap()
    };
    assert!(total(base) > 0 && total(base + 3) > 0 && total(base + 4) > 0);
    // The shims noticed nothing: same processes, one thread each, no "went away".
    for (pid, s) in shims.iter().zip([&tcp_shim, &udp_shim]) {
        assert_eq!(proc_status(*pid, "Threads:"), 1);
        let said = s.stderr_text(Duration::from_millis(100));
        assert!(!said.contains("went away"), "{said}");
    }
    // Metrics go on from the new process, its counters from zero.
    let after = scrape(metrics).expect("metrics after the takeover");
    let new_count = sample(&after, "rproxy_tcp_connections_total", at(base)).unwrap();
    println!("takeover: rproxy_tcp_connections_total of {tcp_pub}: {old_count} in the old daemon a second before, {new_count} in the new one after");
    assert!(new_count > 0.0);
    // The old daemon left the socket file to the new one, and told systemd nothing.
    assert!(dir.sock().exists());
    assert_eq!(systemd.next(Duration::from_millis(300)), None);
    // SIGTERM on the new one: STOPPING=1 from it.
    new.signal(Signal::SIGTERM);
    assert_eq!(
        systemd.next(Duration::from_secs(5)).as_deref(),
        Some("STOPPING=1")
    );
    assert_eq!(new.wait_exit(Duration::from_secs(10)), Some(0));
}

/// `systemctl restart`: the daemon stops (SIGTERM), another starts. Shims serve their ports
/// themselves in between and hand them back: nothing refused, nothing broken, and the shims
/// end up as they were, one thread and a fresh process's memory.
#[test]
fn a_daemon_restart_with_shims_refuses_and_breaks_nothing() {
    let mut t = ShimsUnderLoad::start("takeover-restart");
    let shims = [&t.tcp_shim, &t.udp_shim];
    t.old.signal(Signal::SIGTERM);
    let stopped = Instant::now();
    for s in shims {
        s.wait_log("daemon went away", Duration::from_secs(5));
    }
    assert_eq!(t.old.wait_exit(Duration::from_secs(10)), Some(0));
    let new = next_daemon(&t.dir, &shims);
    let back = stopped.elapsed();
    let (dir, fresh, load) = (&t.dir, &t.fresh, t.load);
    std::thread::sleep(Duration::from_secs(1));
    let (tcp, udp) = load.finish();
    let spanning = report("restart", &tcp, &udp, stopped);
    println!("restart: the shims were waiting on the new daemon again {back:?} after SIGTERM");
    assert_eq!(tcp.refused.load(Relaxed), 0, "refused connections");
    assert_eq!(tcp.broken.load(Relaxed), 0, "broken connections");
    assert!(spanning > 0, "no connection was open across the stop");
    assert_eq!(
        (udp.lost.load(Relaxed), udp.refused.load(Relaxed)),
        (0, 0),
        "UDP requests unanswered"
    );
    shims_are_back(dir, &shims, fresh, new.child.id());
}

/// A daemon with a TCP and a UDP shim, and clients using both continuously (for a second
/// already): what a restart or a crash of the daemon is tried on.
struct ShimsUnderLoad {
    dir: Dir,
    old: Proxy,
    tcp_shim: Proxy,
    udp_shim: Proxy,
    /// The shims' RssAnon as first registered.
    fresh: Vec<u64>,
    load: Load,
}

impl ShimsUnderLoad {
    fn start(name: &str) -> ShimsUnderLoad {
        let dir = Dir::new(name);
        let echo = tcp_echo("127.0.0.1:0");
        let uecho = udp_echo("127.0.0.1:0");
        let base = free_ports(2);
        let old = daemon(&dir, &[]);
        let tcp_shim = shim(&dir, "tcp", base, echo, None);
        let u = UdpSocket::bind(at(base + 1)).unwrap();
        let udp_shim = shim(&dir, "udp", base + 1, uecho, Some(u.into()));
        let fresh = [&tcp_shim, &udp_shim]
            .iter()
            .map(|s| proc_status(s.child.id(), "RssAnon:"))
            .collect();
        let load = Load::start(&[at(base)], &[at(base + 1)], 3);
        std::thread::sleep(Duration::from_secs(1));
        ShimsUnderLoad {
            dir,
            old,
            tcp_shim,
            udp_shim,
            fresh,
            load,
        }
    }
}

/// The next daemon, once the shims serve their ports themselves; returns when every shim
/// waits on it again.
fn next_daemon(dir: &Dir, shims: &[&Proxy]) -> Proxy {
    std::thread::sleep(Duration::from_millis(500));
    let new = daemon(dir, &[]);
    for s in shims {
        s.wait_log("the daemon serves it again", Duration::from_secs(15));
    }
    new
}

/// The shims re-registered with daemon `pid`, are single-threaded processes with a fresh
/// shim's memory again (`fresh`: their RssAnon before), and the daemon carries their traffic.
fn shims_are_back(dir: &Dir, shims: &[&Proxy], fresh: &[u64], pid: u32) {
    let rows = ls_table(dir);
    assert_eq!(rows.len(), shims.len(), "{rows:?}");
    for r in &rows {
        assert_eq!(
            (r["ORIGIN"].as_str(), r["PID"].clone()),
            ("shim", pid.to_string())
        );
    }
    for (s, before) in shims.iter().zip(fresh) {
        let spid = s.child.id();
        let after = proc_status(spid, "RssAnon:");
        println!("shim {spid}: RssAnon {before} kB as registered first, {after} kB after handing its port back");
        assert_eq!(proc_status(spid, "Threads:"), 1);
        assert!(
            after <= before + 64,
            "shim {spid}: {after} kB, was {before} kB"
        );
        let comm = std::fs::read_to_string(format!("/proc/{spid}/comm")).unwrap();
        assert_eq!(comm.trim(), "rproxy");
    }
    let total = |rows: &[HashMap<String, String>]| -> u64 {
        rows.iter()
            .map(|r| r["TOTAL"].parse::<u64>().unwrap())
            .sum()
    };
    let before = total(&rows);
    let listen: Vec<SocketAddr> = rows
        .iter()
        .filter(|r| r["PROTO"] == "tcp")
        .map(|r| r["LISTEN"].parse().unwrap())
        .collect();
    for addr in listen {
        assert_eq!(
            tcp_roundtrip(addr, b"through the daemon"),
            b"through the daemon"
        );
    }
    assert!(
        total(&ls_table(dir)) > before,
        "the daemon did not carry the traffic"
    );
}

/// The daemon killed (SIGKILL) and started again: the shims' ports refuse nothing (the shims
/// serve them from the sockets they kept), the connections the daemon relayed are cut, and
/// the shims go back to the new daemon.
#[test]
fn shims_serve_through_a_crash_and_go_back_to_the_next_daemon() {
    let t = ShimsUnderLoad::start("takeover-crash");
    let shims = [&t.tcp_shim, &t.udp_shim];
    t.old.signal(Signal::SIGKILL);
    let crashed = Instant::now();
    for s in shims {
        s.wait_log("daemon went away", Duration::from_secs(5));
    }
    let new = next_daemon(&t.dir, &shims);
    std::thread::sleep(Duration::from_secs(1));
    let (tcp, udp) = t.load.finish();
    report("crash", &tcp, &udp, crashed);
    assert_eq!(tcp.refused.load(Relaxed), 0, "refused connections");
    assert_eq!(udp.refused.load(Relaxed), 0, "UDP refused");
    // At most the connections open in the daemon when it died (three clients).
    assert!(
        tcp.broken.load(Relaxed) <= 3,
        "more broke than the crash cut"
    );
    shims_are_back(&t.dir, &shims, &t.fresh, new.child.id());
}

/// The running program file replaced (as a package upgrade does): SIGHUP starts the new
/// file, which takes over; SIGUSR2 starts a fresh process of the same file, which takes
/// over from that one. A client keeps connecting throughout.
#[test]
fn sighup_after_an_upgrade_and_sigusr2_hand_over_to_a_new_process() {
    // Processes whose parent exits come to us, so the test can reap them.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let dir = Dir::new("takeover-upgrade");
    let echo = tcp_echo("127.0.0.1:0");
    let base = free_ports(2);
    let bin = dir.0.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let program = bin.join("rproxy");
    std::fs::copy(rproxy(), &program).unwrap();
    let sock = dir.sock();
    let sock = sock.to_str().unwrap();
    let publish = format!("127.0.0.1:{base}:{echo}");
    let mut spawn = Spawn::new(&daemon_args(&dir, sock, &["-p", &publish]));
    spawn.program = Some(program.to_str().unwrap().into());
    let mut old = spawn.no_status_pipe().spawn();
    old.wait_log("daemon ready", Duration::from_secs(10));
    let _shim = shim(&dir, "tcp", base + 1, echo, None);
    let load = Load::start(&[at(base), at(base + 1)], &[], 1);
    let pid_of = |dir: &Dir| -> u32 {
        let rows = ls_table(dir);
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[0]["PID"], rows[1]["PID"]);
        rows[0]["PID"].parse().unwrap()
    };
    let first = old.child.id();
    assert_eq!(pid_of(&dir), first);

    // Same file: SIGHUP only reloads (here: no config file).
    old.signal(Signal::SIGHUP);
    old.wait_log("no config file to reload", Duration::from_secs(5));
    // An upgrade writes a new file and renames it over the old one.
    let staged = bin.join("rproxy.new");
    std::fs::copy(rproxy(), &staged).unwrap();
    std::fs::rename(&staged, &program).unwrap();
    let upgraded = Instant::now();
    old.signal(Signal::SIGHUP);
    old.wait_log("program file was replaced", Duration::from_secs(5));
    assert_eq!(old.wait_exit(Duration::from_secs(10)), Some(0));
    let second = pid_of(&dir);
    assert_ne!(second, first);
    let exe = std::fs::read_link(format!("/proc/{second}/exe")).unwrap();
    assert_eq!(exe, program, "the new daemon runs the new file");

    // SIGUSR2: a fresh process of the same file takes over from that one.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(second as i32), Signal::SIGUSR2).unwrap();
    assert_eq!(reap(second, Duration::from_secs(10)), Some(0));
    let third = pid_of(&dir);
    assert!(third != second && third != first);
    std::thread::sleep(Duration::from_millis(500));
    let (tcp, udp) = load.finish();
    report("upgrades", &tcp, &udp, upgraded);
    assert_eq!(tcp.refused.load(Relaxed), 0, "refused connections");
    assert_eq!(tcp.broken.load(Relaxed), 0, "broken connections");
    assert!(tcp.ok.load(Relaxed) > 10);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(third as i32), Signal::SIGTERM).unwrap();
    assert_eq!(reap(third, Duration::from_secs(10)), Some(0));
}

/// A new daemon that cannot serve what it would take over exits with the reason, and the
/// running one carries on as if nothing happened: same process, same mappings, changes taken.
#[test]
fn a_failed_takeover_changes_nothing() {
    let dir = Dir::new("takeover-fail");
    let echo = tcp_echo("127.0.0.1:0");
    let base = free_ports(3);
    let sock = dir.sock();
    let sock = sock.to_str().unwrap();
    let old = daemon(&dir, &[]);
    let _shim = shim(&dir, "tcp", base, echo, None);
    // The new daemon's own --publish wants the port a shim handed over.
    let clash = format!("127.0.0.1:{base}:{echo}");
    let mut new = Spawn::new(&daemon_args(&dir, sock, &["-p", &clash, "--takeover"]))
        .no_status_pipe()
        .spawn();
    assert_eq!(new.wait_exit(Duration::from_secs(10)), Some(1));
    let said = new.stderr_text(Duration::from_millis(200));
    assert!(said.contains("published by dockerd"), "{said}");
    old.wait_log("still serving everything here", Duration::from_secs(5));
    let rows = ls_table(&dir);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["PID"], old.child.id().to_string());
    echo_ok(at(base));
    let (code, _, err) = cli(&dir, &["add", &format!("127.0.0.1:{}:{echo}", base + 1)]);
    assert_eq!(code, 0, "changes are taken again: {err}");
    echo_ok(at(base + 1));
    // Without --takeover a second daemon refuses to start, and says how to take over.
    let mut second = Spawn::new(&daemon_args(&dir, sock, &[]))
        .no_status_pipe()
        .spawn();
    assert_eq!(second.wait_exit(Duration::from_secs(10)), Some(1));
    let said = second.stderr_text(Duration::from_millis(200));
    assert!(said.contains("--takeover"), "{said}");
    // With --takeover and no daemon, a daemon starts as usual.
    let dir2 = Dir::new("takeover-none");
    let sock2 = dir2.sock();
    let port = base + 2;
    let publish = format!("127.0.0.1:{port}:{echo}");
    let lone = Spawn::new(&daemon_args(
        &dir2,
        sock2.to_str().unwrap(),
        &["-p", &publish, "--takeover"],
    ))
    .no_status_pipe()
    .spawn();
    lone.wait_log("starting afresh", Duration::from_secs(10));
    lone.wait_log("daemon ready", Duration::from_secs(10));
    echo_ok(at(port));
}

fn echo_ok(addr: SocketAddr) {
    assert_eq!(tcp_roundtrip(addr, b"still here"), b"still here");
}

/// The shipped unit passes `systemd-analyze verify` and lets the new daemon name itself the
/// main process.
#[test]
fn the_unit_verifies_and_accepts_a_new_main_pid() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/rproxy.service"
    ))
    .unwrap();
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for wanted in [
        "Type=notify",
        "NotifyAccess=all",
        "ExecReload=/bin/sh -c 'kill -HUP \"$MAINPID\"'",
    ] {
        assert!(lines.contains(&wanted), "the unit lacks {wanted}");
    }
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        skip(
            "the_unit_verifies_and_accepts_a_new_main_pid",
            "no systemd-analyze (apt-get install systemd)",
        );
        return;
    }
    // As installed, with this build's binary where the unit expects it.
    let dir = Dir::new("takeover-unit");
    let path = dir.0.join("rproxy.service");
    // Its manual is the package's (tests/package.rs verifies the unit as installed, pages
    // and all); here the unit alone, with this build's binary.
    let unit: String = unit
        .replace("/usr/bin/rproxy", rproxy())
        .lines()
        .filter(|l| !l.starts_with("Documentation="))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&path, unit).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    assert!(!said.contains("rproxy.service"), "{said}");
}

/// A takeover keeps a listener's queued connections: those the old daemon had not accepted
/// when it stopped are the new one's to accept.
#[test]
fn connections_queued_during_a_takeover_are_served() {
    let dir = Dir::new("takeover-queue");
    let echo = tcp_echo("127.0.0.1:0");
    let base = free_ports(1);
    let sock = dir.sock();
    let sock = sock.to_str().unwrap();
    let publish = format!("127.0.0.1:{base}:{echo}");
    let mut old = Spawn::new(&daemon_args(&dir, sock, &["-p", &publish]))
        .no_status_pipe()
        .spawn();
    old.wait_log("daemon ready", Duration::from_secs(10));
    // Stop the old daemon (SIGSTOP): connections now wait in the listen queue.
    old.signal(Signal::SIGSTOP);
    let queued: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(at(base)).unwrap())
        .collect();
    let new = Spawn::new(&daemon_args(&dir, sock, &["-p", &publish, "--takeover"]))
        .no_status_pipe()
        .spawn();
    // The takeover waits for the stopped daemon's answer: let it run again.
    std::thread::sleep(Duration::from_millis(200));
    old.signal(Signal::SIGCONT);
    new.wait_log("daemon ready", Duration::from_secs(10));
    // Each is served: by the old daemon if it accepted it before it stopped accepting (it
    // then relays it until it closes), else by the new one.
    for mut c in queued {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"queued").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"queued");
    }
    assert_eq!(old.wait_exit(Duration::from_secs(10)), Some(0));
    drop(new);
}

/// Waits up to `timeout` for `pid` (a child of ours, or an orphan we reap as subreaper) to
/// exit; its exit code.
fn reap(pid: u32, timeout: Duration) -> Option<i32> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    let deadline = Instant::now() + timeout;
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Some(code),
            Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => panic!("pid {pid}: {other:?}"),
        }
    }
}

/// More sockets than one SCM_RIGHTS message carries (253): 200 TCP and 200 UDP mappings,
/// the control socket's listener. All arrive, each with its mapping.
#[test]
fn takeover_hands_over_more_sockets_than_one_message_carries() {
    let dir = Dir::new("takeover-many");
    let echo = tcp_echo("127.0.0.1:0");
    let uecho = udp_echo("127.0.0.1:0");
    let base = free_ports(200);
    let sock = dir.sock();
    let sock = sock.to_str().unwrap();
    // One echo server behind every port: a config file with a line per mapping (a range
    // would map to as many target ports).
    let mut argv = vec![];
    let specs: Vec<String> = (0..200u16)
        .flat_map(|i| {
            [
                format!("127.0.0.1:{}:{echo}", base + i),
                format!("127.0.0.1:{}:{uecho}/udp", base + i),
            ]
        })
        .collect();
    let config = dir.0.join("rproxy.toml");
    write_config(&config, &specs);
    let config = config.to_str().unwrap().to_string();
    argv.extend(["--config", config.as_str()]);
    // (400 "serving" lines: the log's rate limit hides "daemon ready"; ls tells instead.)
    let mut old = Spawn::new(&daemon_args(&dir, sock, &argv))
        .no_status_pipe()
        .spawn();
    let serving = |pid: u32| {
        let (code, out, _) = cli(&dir, &["ls"]);
        let pid_at = out
            .lines()
            .next()
            .and_then(|h| h.split_whitespace().position(|c| c == "PID"));
        code == 0
            && out
                .lines()
                .filter(|l| {
                    pid_at.and_then(|i| l.split_whitespace().nth(i)) == Some(&pid.to_string())
                })
                .count()
                == 400
    };
    wait_until("the old daemon", Duration::from_secs(10), || {
        serving(old.child.id())
    });
    let mut argv2 = argv.clone();
    argv2.push("--takeover");
    let new = Spawn::new(&daemon_args(&dir, sock, &argv2))
        .no_status_pipe()
        .spawn();
    assert_eq!(old.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(serving(new.child.id()), "{:?}", ls_table(&dir));
    for i in [0, 126, 127, 199] {
        echo_ok(at(base + i));
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(udp_roundtrip(&client, at(base + i), b"many").0, b"many");
    }
}

/// Sends one request line on a fresh connection to the control socket; returns the stream
/// and the first reply line (descriptors sent with it are not taken, so the kernel drops them).
fn raw_request(sock: &str, line: &str) -> (std::os::unix::net::UnixStream, String) {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        reply.push(byte[0]);
    }
    (s, String::from_utf8_lossy(&reply).into_owned())
}

/// A second `--takeover` while one is under way is refused, and leaves the first one's
/// hand-over alone: changes still get `moved` (ask the process taking over), and a SIGTERM
/// leaves the control socket to that process. The first taker is this test on the wire: it
/// takes the list and does not say `serving`, so the hand-over stays under way.
#[test]
fn a_second_takeover_leaves_the_first_alone() {
    let dir = Dir::new("takeover-twice");
    let echo = tcp_echo("127.0.0.1:0");
    let base = free_ports(2);
    let sock = dir.sock();
    let sock = sock.to_str().unwrap();
    let mut old = daemon(&dir, &["-p", &format!("127.0.0.1:{base}:{echo}")]);
    let (_first, handover) = raw_request(sock, r#"{"request":"takeover"}"#);
    assert!(handover.contains(r#""reply":"handover""#), "{handover}");
    let me = std::process::id();
    let moved = format!(r#"{{"reply":"moved","pid":{me}}}"#);
    let add = format!(
        r#"{{"request":"add","spec":"127.0.0.1:{}:{echo}"}}"#,
        base + 1
    );
    assert_eq!(
        raw_request(sock, &add).1,
        moved,
        "before the second takeover"
    );

    let mut second = Spawn::new(&daemon_args(&dir, sock, &["--takeover"]))
        .no_status_pipe()
        .spawn();
    assert_eq!(second.wait_exit(Duration::from_secs(10)), Some(1));
    let said = second.stderr_text(Duration::from_millis(200));
    assert!(said.contains("another takeover is under way"), "{said}");

    assert_eq!(
        raw_request(sock, &add).1,
        moved,
        "after the second takeover"
    );
    old.signal(Signal::SIGTERM);
    assert_eq!(old.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        std::path::Path::new(sock).exists(),
        "the stopping daemon removed the control socket a takeover under way hands over"
    );
}
