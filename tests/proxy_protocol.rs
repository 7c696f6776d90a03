//! The PROXY protocol toward backends: nginx (`listen … proxy_protocol`) and HAProxy
//! (`accept-proxy`), both from Debian's packages, see the client's real address through the
//! relay, for IPv4 and IPv6 clients, v1 and v2, client-first and server-first protocols; the
//! exact bytes a backend receives (the header once, then the client's bytes); the daemon's
//! config file, `rproxy add`, a reload, and ports docker-mode shims hand to the daemon,
//! chosen by host port in the daemon's config.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Where `rproxy ls` shows a mapping's PROXY protocol (its 15th column).
const PROXY_PROTOCOL_COLUMN: usize = 14;

fn at(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn at6(port: u16) -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))
}

/// Whether `tool` is installed (`.ci/install-deps` brings it); says why not otherwise.
fn have(test: &str, tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool} || test -x /usr/sbin/{tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        skip(
            test,
            &format!("{tool} is not installed (see .ci/install-deps)"),
        );
    }
    found
}

/// A server process of a test, killed (by its pid) when dropped.
struct Server {
    child: Child,
    name: &'static str,
    log: PathBuf,
}

impl Server {
    /// Waits until `port` accepts connections.
    fn wait_port(mut self, port: u16) -> Server {
        let mut tries = 0;
        while TcpStream::connect(at(port)).is_err() {
            tries += 1;
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}): {}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(tries < 500, "{} never listened on {port}", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
        self
    }
}

impl Drop for Server {
    /// SIGTERM first: nginx's master stops its workers on the way out (killed outright, it
    /// would leave them running, holding the port).
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        for _ in 0..250 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx on 127.0.0.1 as an unprivileged configuration in `dir`: an HTTP server on `http`
/// (`listen … proxy_protocol`) answering and logging `$proxy_protocol_addr
/// $proxy_protocol_port $proxy_protocol_server_addr $proxy_protocol_server_port`, and a
/// stream server on `stream` that speaks first: it sends the same four values as soon as
/// the header is read, without waiting for the client.
fn nginx(dir: &Path, http: u16, stream: u16) -> Server {
    let conf = dir.join("nginx.conf");
    let log = dir.join("nginx-error.log");
    let d = dir.display();
    std::fs::write(
        &conf,
        format!(
            r#"load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log info;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    log_format pp '$proxy_protocol_addr $proxy_protocol_port $proxy_protocol_server_addr $proxy_protocol_server_port';
    access_log {d}/nginx-access.log pp;
    server {{
        listen 127.0.0.1:{http} proxy_protocol;
        location / {{
            return 200 "$proxy_protocol_addr $proxy_protocol_port $proxy_protocol_server_addr $proxy_protocol_server_port\n";
        }}
    }}
}}
stream {{
    server {{
        listen 127.0.0.1:{stream} proxy_protocol;
        return "$proxy_protocol_addr $proxy_protocol_port $proxy_protocol_server_addr $proxy_protocol_server_port\n";
    }}
}}
"#
        ),
    )
    .unwrap();
    let child = Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(&log)
        .arg("-c")
        .arg(&conf)
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    Server {
        child,
        name: "nginx",
        log,
    }
    .wait_port(http)
    .wait_port(stream)
}

/// HAProxy in the foreground on 127.0.0.1:`port` with `accept-proxy`, answering every HTTP
/// request with `src src_port dst dst_port` as the PROXY header gave them.
fn haproxy(dir: &Path, port: u16) -> Server {
    let conf = dir.join("haproxy.cfg");
    let log = dir.join("haproxy.log");
    std::fs::write(
        &conf,
        format!(
            r#"global
    pidfile {d}/haproxy.pid
defaults
    mode http
    timeout connect 5s
    timeout client 5s
    timeout server 5s
frontend echo_src
    bind 127.0.0.1:{port} accept-proxy
    http-request return status 200 content-type text/plain lf-string "%[src] %[src_port] %[dst] %[dst_port]\n"
"#,
            d = dir.display()
        ),
    )
    .unwrap();
    let child = Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start haproxy");
    Server {
        child,
        name: "haproxy",
        log,
    }
    .wait_port(port)
}

/// An HTTP/1.0 GET sent the moment the connection is up (the client speaks first: its
/// request waits at the proxy while it dials the backend); returns (the body, the client's
/// own address).
fn http_get(to: SocketAddr) -> (String, SocketAddr) {
    let mut s = TcpStream::connect(to).unwrap_or_else(|e| panic!("connect {to}: {e}"));
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        .unwrap();
    let me = s.local_addr().unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("read from {to}: {e}"));
    assert!(out.starts_with("HTTP/1.1 200"), "from {to}: {out:?}");
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (body.trim_end().to_string(), me)
}

/// Connects and only reads: the server speaks first. Returns (what it said, our address).
fn listen_only(to: SocketAddr) -> (String, SocketAddr) {
    let mut s = TcpStream::connect(to).unwrap_or_else(|e| panic!("connect {to}: {e}"));
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let me = s.local_addr().unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("read from {to}: {e}"));
    (out.trim_end().to_string(), me)
}

/// What a backend should report: the client's address and port, and the address and port
/// it connected to.
fn seen(client: SocketAddr, server: SocketAddr) -> String {
    format!(
        "{} {} {} {}",
        client.ip(),
        client.port(),
        server.ip(),
        server.port()
    )
}

/// A backend that records every byte of each connection until the client's EOF, then
/// closes without sending anything.
fn recording_backend() -> (SocketAddr, mpsc::Receiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                conn.set_read_timeout(Some(TIMEOUT)).unwrap();
                let mut all = Vec::new();
                let _ = conn.read_to_end(&mut all);
                let _ = tx.send(all);
            });
        }
    });
    (addr, rx)
}

/// Connects, writes `data` at once, half-closes, and waits for the end: returns our address.
fn send_and_close(to: SocketAddr, data: &[u8]) -> SocketAddr {
    let mut s = TcpStream::connect(to).unwrap_or_else(|e| panic!("connect {to}: {e}"));
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(data).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    s.local_addr().unwrap()
}

/// The header the spec prescribes, written out here independently of rproxy's code.
fn expected_header(version: u8, client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (client, server) = (canon(client), canon(server));
    match version {
        1 => {
            let fam = if client.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {fam} {} {} {} {}\r\n",
                client.ip(),
                server.ip(),
                client.port(),
                server.port()
            )
            .into_bytes()
        }
        _ => {
            let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
            match (client.ip(), server.ip()) {
                (IpAddr::V4(c), IpAddr::V4(s)) => {
                    h.extend([0x21, 0x11, 0, 12]);
                    h.extend(c.octets());
                    h.extend(s.octets());
                }
                (IpAddr::V6(c), IpAddr::V6(s)) => {
                    h.extend([0x21, 0x21, 0, 36]);
                    h.extend(c.octets());
                    h.extend(s.octets());
                }
                _ => panic!("mixed families"),
            }
            h.extend(client.port().to_be_bytes());
            h.extend(server.port().to_be_bytes());
            h
        }
    }
}

/// One `[[mapping]]` table.
fn mapping(listen: &str, port: u16, target: u16, version: &str) -> String {
    format!(
        "[[mapping]]\npublish = \"{listen}:{port}:127.0.0.1:{target}\"\nproxy_protocol = \"{version}\"\n\n"
    )
}

#[test]
fn nginx_and_haproxy_see_the_client_through_the_daemon() {
    let test = "nginx_and_haproxy_see_the_client_through_the_daemon";
    if !have(test, "nginx") || !have(test, "haproxy") {
        return;
    }
    let v6 = has_ipv6();
    if !v6 {
        skip(test, "no IPv6 loopback here: only IPv4 clients are checked");
    }
    let dir = Dir::new("pp-servers");
    let backends = free_ports(3);
    let (http, stream, ha) = (backends, backends + 1, backends + 2);
    let _nginx = nginx(&dir.0, http, stream);
    let _haproxy = haproxy(&dir.0, ha);
    // Six mappings, each on 127.0.0.1 and [::1]: (nginx http, nginx stream, haproxy) × (v1, v2).
    let base = free_ports(6);
    let targets = [http, http, stream, stream, ha, ha];
    let mut config = String::new();
    for (i, target) in targets.iter().enumerate() {
        let version = if i % 2 == 0 { "v1" } else { "v2" };
        let port = base + i as u16;
        config += &mapping("127.0.0.1", port, *target, version);
        if v6 {
            config += &mapping("[::1]", port, *target, version);
        }
    }
    let path = dir.0.join("rproxy.toml");
    std::fs::write(&path, config).unwrap();
    let d = daemon(&dir, &["--config", path.to_str().unwrap()]);

    let mut fronts = vec![at as fn(u16) -> SocketAddr];
    if v6 {
        fronts.push(at6);
    }
    for front in fronts {
        for i in 0..6u16 {
            let to = front(base + i);
            let (said, me) = match i {
                // The stream server speaks first: nothing comes from the client at all.
                2 | 3 => listen_only(to),
                _ => http_get(to),
            };
            assert_eq!(
                said,
                seen(me, to),
                "mapping {i} ({to}) told the backend wrong"
            );
        }
    }
    // nginx's own log has the same addresses, one line per HTTP request (4 or 2 per family).
    let log = std::fs::read_to_string(dir.0.join("nginx-access.log")).unwrap();
    let from = |ip: &str| log.lines().filter(|l| l.starts_with(ip)).count();
    assert_eq!(log.lines().count(), if v6 { 4 } else { 2 }, "{log}");
    assert_eq!(from("127.0.0.1 "), 2, "{log}");
    assert_eq!(from("::1 "), if v6 { 2 } else { 0 }, "{log}");
    // ls shows the version of every mapping.
    let (code, out, err) = cli(&dir, &["ls"]);
    assert_eq!(code, 0, "{err}");
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    let col = header.iter().position(|h| *h == "PROXY_PROTOCOL").unwrap();
    for line in out.lines().skip(1) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        let port: u16 = cells[1].rsplit(':').next().unwrap().parse().unwrap();
        let want = if (port - base) % 2 == 0 { "v1" } else { "v2" };
        assert_eq!(cells[col], want, "{line}");
    }
    drop(d);
}

#[test]
fn the_header_goes_once_before_the_clients_first_byte() {
    let dir = Dir::new("pp-bytes");
    let (backend, received) = recording_backend();
    let base = free_ports(2);
    let mut config = String::new();
    config += &mapping("127.0.0.1", base, backend.port(), "v1");
    config += &mapping("127.0.0.1", base + 1, backend.port(), "v2");
    let v6 = has_ipv6();
    if v6 {
        config += &mapping("[::1]", base, backend.port(), "v1");
        config += &mapping("[::1]", base + 1, backend.port(), "v2");
    }
    let path = dir.0.join("rproxy.toml");
    std::fs::write(&path, config).unwrap();
    let _d = daemon(&dir, &["--config", path.to_str().unwrap()]);
    let mut cases = vec![(at(base), 1), (at(base + 1), 2)];
    if v6 {
        cases.extend([(at6(base), 1), (at6(base + 1), 2)]);
    }
    // A client that sends the moment it connects (its bytes wait at the proxy while it
    // dials), a client that sends nothing, and one whose bytes look like a header.
    for (to, version) in cases {
        for data in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"",
            b"PROXY TCP4 6.6.6.6 6.6.6.6 1 1\r\n",
        ] {
            let me = send_and_close(to, data);
            let got = received
                .recv_timeout(TIMEOUT)
                .expect("the backend got nothing");
            let mut want = expected_header(version, me, to);
            want.extend_from_slice(data);
            assert_eq!(
                got,
                want,
                "v{version} via {to}: the backend got {:?}",
                String::from_utf8_lossy(&got)
            );
        }
    }
}

#[test]
fn rproxy_add_ls_and_reload_switch_versions_for_new_connections() {
    let dir = Dir::new("pp-add");
    let (backend, received) = recording_backend();
    let base = free_ports(3);
    let path = dir.0.join("rproxy.toml");
    std::fs::write(&path, mapping("127.0.0.1", base, backend.port(), "v1")).unwrap();
    let d = daemon(&dir, &["--config", path.to_str().unwrap()]);

    // rproxy add --proxy-protocol v2, shown in ls.
    let spec = format!("127.0.0.1:{}:{backend}", base + 1);
    let (code, _, err) = cli(&dir, &["add", "--proxy-protocol", "v2", &spec]);
    assert_eq!(code, 0, "{err}");
    let me = send_and_close(at(base + 1), b"x");
    let mut want = expected_header(2, me, at(base + 1));
    want.push(b'x');
    assert_eq!(received.recv_timeout(TIMEOUT).unwrap(), want);
    let (_, out, _) = cli(&dir, &["ls"]);
    let row = |port: u16| {
        out.lines()
            .find(|l| l.contains(&format!("127.0.0.1:{port} ")))
            .map(|l| {
                l.split_whitespace()
                    .nth(PROXY_PROTOCOL_COLUMN)
                    .unwrap()
                    .to_string()
            })
            .unwrap_or_else(|| panic!("no :{port} in\n{out}"))
    };
    assert_eq!(
        (row(base).as_str(), row(base + 1).as_str()),
        ("v1", "v2"),
        "{out}"
    );

    // Refused with a reason: a bad version, or a header on UDP (usage errors, exit 2, found
    // before the daemon is asked); a kernel path required (the daemon's refusal, exit 1).
    let (code, _, err) = cli(&dir, &["add", "--proxy-protocol", "v3", &spec]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("v1, v2 or off"), "{err}");
    let udp = format!("127.0.0.1:{}:{backend}/udp", base + 2);
    let (code, _, err) = cli(&dir, &["add", "--proxy-protocol", "v1", &udp]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("TCP only"), "{err}");
    let tcp = format!("127.0.0.1:{}:{backend}", base + 2);
    for kernel in ["--nat=require", "--socket-lb=require"] {
        let (code, _, err) = cli(&dir, &["add", kernel, "--proxy-protocol", "v1", &tcp]);
        assert_eq!(code, 1, "{kernel}: {err}");
        assert!(err.contains("PROXY protocol header"), "{kernel}: {err}");
    }
    // On (not required): served by the listener, the header written, ls says userland.
    let (code, _, err) = cli(
        &dir,
        &[
            "add",
            "--nat=on",
            "--socket-lb=on",
            "--proxy-protocol",
            "v1",
            &tcp,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let me = send_and_close(at(base + 2), b"");
    assert_eq!(
        received.recv_timeout(TIMEOUT).unwrap(),
        expected_header(1, me, at(base + 2))
    );

    // A reload switches the config mapping to v2: new connections get v2.
    std::fs::write(&path, mapping("127.0.0.1", base, backend.port(), "v2")).unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_log("reloaded", TIMEOUT);
    let me = send_and_close(at(base), b"after");
    let mut want = expected_header(2, me, at(base));
    want.extend_from_slice(b"after");
    assert_eq!(received.recv_timeout(TIMEOUT).unwrap(), want);
    // And off again: the bytes alone.
    std::fs::write(&path, mapping("127.0.0.1", base, backend.port(), "off")).unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_log("reloaded", TIMEOUT);
    send_and_close(at(base), b"plain");
    assert_eq!(received.recv_timeout(TIMEOUT).unwrap(), b"plain");
}

#[test]
fn handed_over_ports_get_the_daemons_choice_by_host_port() {
    let test = "handed_over_ports_get_the_daemons_choice_by_host_port";
    let dir = Dir::new("pp-shim");
    let (backend, received) = recording_backend();
    let base = free_ports(4);
    let path = dir.0.join("rproxy.toml");
    let rules = |v: &str| {
        format!(
            "[[proxy_protocol]]\nports = \"{}-{}\"\nversion = \"{v}\"\n",
            base,
            base + 1
        )
    };
    std::fs::write(&path, rules("v2")).unwrap();
    let d = daemon(&dir, &["--config", path.to_str().unwrap()]);

    // In the range: the header. Outside it (base + 3): none, never on by default.
    let inside = shim_on(&dir, "tcp", "127.0.0.1", base, backend, None);
    let outside = shim_on(&dir, "tcp", "127.0.0.1", base + 3, backend, None);
    let me = send_and_close(at(base), b"in");
    let mut want = expected_header(2, me, at(base));
    want.extend_from_slice(b"in");
    assert_eq!(received.recv_timeout(TIMEOUT).unwrap(), want);
    send_and_close(at(base + 3), b"out");
    assert_eq!(received.recv_timeout(TIMEOUT).unwrap(), b"out");

    // dockerd's IPv6 socket may be dual-stack: an IPv4 client then has an IPv4-mapped
    // address, which the header gives as the IPv4 address it is (TCP4), as nginx logs it.
    let dual = if has_ipv6() {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
        s.set_only_v6(false).unwrap();
        s.set_reuse_address(true).unwrap();
        let bound = s
            .bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, base + 1)).into())
            .and_then(|()| s.listen(16));
        match bound {
            Ok(()) => Some(shim_on(
                &dir,
                "tcp",
                "::",
                base + 1,
                backend,
                Some(s.into()),
            )),
            Err(e) => {
                skip(test, &format!("cannot bind [::]:{}: {e}", base + 1));
                None
            }
        }
    } else {
        skip(test, "no IPv6 here: the dual-stack hand-off is not checked");
        None
    };
    if dual.is_some() {
        let me = send_and_close(at(base + 1), b"mapped");
        let mut want = expected_header(2, me, at(base + 1));
        assert!(
            want.starts_with(b"\r\n\r\n\0\r\nQUIT\n\x21\x11"),
            "TCP over IPv4"
        );
        want.extend_from_slice(b"mapped");
        assert_eq!(received.recv_timeout(TIMEOUT).unwrap(), want);
    }

    // A reload with v1 for the range: the handed-over ports switch for new connections.
    std::fs::write(&path, rules("v1")).unwrap();
    d.signal(Signal::SIGHUP);
    let line = d.wait_log("reloaded", TIMEOUT);
    let switched = if dual.is_some() { 2 } else { 1 };
    assert!(
        line.contains(&format!("{switched} handed-over ports")),
        "{line}"
    );
    let me = send_and_close(at(base), b"v1 now");
    let mut want = expected_header(1, me, at(base));
    want.extend_from_slice(b"v1 now");
    assert_eq!(received.recv_timeout(TIMEOUT).unwrap(), want);
    let (_, out, _) = cli(&dir, &["ls"]);
    let inside_row = out
        .lines()
        .find(|l| l.contains(&format!("127.0.0.1:{base} ")))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        inside_row.contains(" shim ")
            && inside_row.split_whitespace().nth(PROXY_PROTOCOL_COLUMN) == Some("v1"),
        "{inside_row}"
    );

    // The daemon dies: the shim takes its port back with the header it was given (at
    // registration: v2), so the backend never sees a connection without one.
    drop(d);
    inside.wait_log("went away", TIMEOUT);
    let me = send_and_close(at(base), b"alone");
    let mut want = expected_header(2, me, at(base));
    want.extend_from_slice(b"alone");
    assert_eq!(received.recv_timeout(TIMEOUT).unwrap(), want);

    // A daemon comes back, its rules now saying v1: the shim hands the port back to it and
    // starts over (a new image) as a waiting shim. When that daemon dies too, the shim serves
    // with the header this daemon gave it, not the first one's nor none.
    std::fs::write(&path, rules("v1")).unwrap();
    let d = daemon(&dir, &["--config", path.to_str().unwrap()]);
    inside.wait_log("the daemon serves it again", TIMEOUT);
    let me = send_and_close(at(base), b"back");
    let mut want = expected_header(1, me, at(base));
    want.extend_from_slice(b"back");
    assert_eq!(received.recv_timeout(TIMEOUT).unwrap(), want);
    drop(d);
    inside.wait_log("went away", TIMEOUT);
    let me = send_and_close(at(base), b"alone again");
    let mut want = expected_header(1, me, at(base));
    want.extend_from_slice(b"alone again");
    assert_eq!(received.recv_timeout(TIMEOUT).unwrap(), want);
    drop((inside, outside, dual));
}

#[test]
fn a_backend_that_hangs_up_on_the_header_is_logged_once_per_period() {
    let dir = Dir::new("pp-refused");
    // A backend that reads to the client's EOF and closes without a word (not a refusal:
    // the client left first), and one that closes as soon as it has read the header.
    let (patient, received) = recording_backend();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let rude = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let mut r = BufReader::new(conn);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            // Closing with the client's bytes unread: a reset, as nginx gives a broken header.
        }
    });
    let base = free_ports(2);
    let path = dir.0.join("rproxy.toml");
    let config = mapping("127.0.0.1", base, patient.port(), "v1")
        + &mapping("127.0.0.1", base + 1, rude.port(), "v1");
    std::fs::write(&path, config).unwrap();
    let d = daemon(&dir, &["--config", path.to_str().unwrap()]);
    for _ in 0..3 {
        send_and_close(at(base), b"");
        received.recv_timeout(TIMEOUT).unwrap();
    }
    for _ in 0..5 {
        let mut s = TcpStream::connect(at(base + 1)).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }
    let log = d.stderr_text(Duration::from_millis(500));
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("after the PROXY protocol v1 header"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning per 10 s:\n{log}");
    assert!(
        warnings[0].contains(&rude.to_string()) && warnings[0].contains("WARN"),
        "{}",
        warnings[0]
    );
    assert!(
        warnings[0].contains("does it expect the header"),
        "{}",
        warnings[0]
    );
}
