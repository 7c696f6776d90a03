//! Starting each proxy as dockerd would (status pipe on fd 3), or the daemon for N ports.

use std::collections::BTreeMap;

use super::*;

pub(crate) struct Ctx {
    pub(crate) o: Options,
    pub(crate) dir: PathBuf,
    pub(crate) kinds: Vec<Kind>,
}

impl Ctx {
    pub(crate) fn settle(&self) {
        thread::sleep(Duration::from_millis(if self.o.smoke { 50 } else { 300 }));
    }
}

/// docker-proxy's command line, as dockerd passes it for `-p FRONT:PORT:PORT/PROTO`.
pub(crate) fn docker_args(proto: Proto, front: Ipv4Addr, port: u16) -> Vec<String> {
    [
        "-proto",
        proto.name(),
        "-host-ip",
        &front.to_string(),
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

/// The name of a proxy's process, its files and (for the daemon) its control socket.
fn proxy_name(kind: Kind, proto: Proto, port: u16) -> String {
    format!("{}-{}-{port}", kind.name(), proto.name())
}

/// Starts one proxy process for `proto` FRONT:port → CTR:port, FRONT being the address
/// `client` dials (nothing for direct), ready to serve.
pub(crate) fn start_proxy(
    ctx: &Ctx,
    client: Client,
    kind: Kind,
    proto: Proto,
    port: u16,
    pin: bool,
) -> Result<Option<Proc>, String> {
    let name = proxy_name(kind, proto, port);
    let front = client.front;
    let listen = SocketAddrV4::new(front, port);
    match kind {
        Kind::Direct => Ok(None),
        Kind::Rproxy | Kind::DockerProxy => {
            let binary = match kind {
                Kind::Rproxy => &ctx.o.rproxy,
                _ => &ctx.o.docker_proxy,
            };
            let mut cmd = command(None, pin, binary);
            cmd.args(docker_args(proto, front, port))
                .env("RPROXY_SOCKET", NO_DAEMON)
                .env("RPROXY_LOG", "warn")
                .env_remove("RPROXY_LOG_FILE");
            let read = status_pipe(&mut cmd)?;
            let mut p = Proc::spawn(cmd, &name, &ctx.dir)?;
            wait_status(&mut p, read)?;
            Ok(Some(p))
        }
        Kind::RproxyDaemon | Kind::RproxyNat | Kind::RproxyMetrics | Kind::RproxySocket => {
            let publish = format!("{front}:{port}:{CTR}:{port}/{}", proto.name());
            let mut cmd = daemon_command(ctx, pin, &name, &publish)?;
            match kind {
                Kind::RproxyNat => {
                    cmd.arg("--nat=require");
                }
                Kind::RproxySocket => {
                    cmd.arg("--socket-lb=require");
                }
                // Below the ephemeral range, one per workload port and protocol (UDP workloads
                // run a TCP mapping beside: iperf3's control connection): 23000-25999 →
                // 20000-22999 (TCP), 18700-21699 (UDP).
                Kind::RproxyMetrics => {
                    let metrics_port = match proto {
                        Proto::Tcp => port - 3000,
                        Proto::Udp => port - 4300,
                    };
                    cmd.arg(format!("--metrics-addr=127.0.0.1:{metrics_port}"));
                }
                _ => {}
            }
            let mut p = spawn_listening(ctx, cmd, &name, proto, listen)?;
            if kind == Kind::RproxySocket {
                // The listener is up before the hooks hold the mapping: a client let in
                // between would be the listener's.
                wait_socket_path(ctx, &mut p, proto, port)?;
            }
            Ok(Some(p))
        }
        Kind::Haproxy => {
            let config = ctx.dir.join(format!("{name}.cfg"));
            fs::write(&config, haproxy_config(ctx.o.nofile, front, port))
                .map_err(|e| format!("{}: {e}", config.display()))?;
            let mut cmd = command(None, pin, tool("haproxy"));
            cmd.arg("-db").arg("-f").arg(&config);
            spawn_listening(ctx, cmd, &name, proto, listen).map(Some)
        }
        Kind::Socat => {
            let (accept, connect) = match proto {
                Proto::Tcp => (
                    format!("TCP4-LISTEN:{port},bind={front},fork,reuseaddr"),
                    format!("TCP4:{CTR}:{port}"),
                ),
                Proto::Udp => (
                    format!("UDP4-LISTEN:{port},bind={front},fork,reuseaddr"),
                    format!("UDP4:{CTR}:{port}"),
                ),
            };
            let mut cmd = command(None, pin, tool("socat"));
            cmd.args([accept, connect]);
            spawn_listening(ctx, cmd, &name, proto, listen).map(Some)
        }
    }
}

/// HAProxy relaying front:port to CTR:port in TCP mode, set up for throughput the way rproxy and
/// Go (docker-proxy) are: splicing both ways through 1 MiB pipes. Its defaults would copy
/// through its buffers (`tune.bufsize`, 16 KiB), and `splice-auto` splices only streams it
/// judges fast (measured here: 6.28 Gb/s on tcp-bulk-4, against 13.8-15.6 with these
/// settings). Each connection takes two descriptors and each pipe two more, so `maxconn`
/// stays within the descriptor limit.
fn haproxy_config(nofile: u64, front: Ipv4Addr, port: u16) -> String {
    format!(
        "global\n    maxconn {maxconn}\n    tune.pipesize 1048576\n\
         defaults\n    mode tcp\n    timeout connect 10s\n    timeout client 1h\n    \
         timeout server 1h\n    option splice-request\n    option splice-response\n\
         listen bench\n    bind {front}:{port}\n    server container {CTR}:{port}\n",
        maxconn = nofile / 5
    )
}

/// The daemon's `rproxy ls` row for its one mapping, cell by column header.
fn ls_row(
    ctx: &Ctx,
    kind: Kind,
    proto: Proto,
    port: u16,
) -> Result<BTreeMap<String, String>, String> {
    let name = proxy_name(kind, proto, port);
    let out = Command::new(&ctx.o.rproxy)
        .arg("ls")
        .arg("--control-socket")
        .arg(ctx.dir.join(format!("{name}.sock")))
        .output()
        .map_err(|e| format!("rproxy ls: {e}"))?;
    let table = String::from_utf8_lossy(&out.stdout);
    let mut lines = table.lines();
    let header = lines.next().unwrap_or("").split_whitespace();
    let row = lines.next().unwrap_or("").split_whitespace();
    Ok(header
        .zip(row)
        .map(|(h, c)| (h.to_string(), c.to_string()))
        .collect())
}

fn cell<'a>(row: &'a BTreeMap<String, String>, header: &str) -> &'a str {
    row.get(header).map_or("?", String::as_str)
}

/// Checks that a run of `rproxy-nat` or `rproxy-socket` took the path its column claims:
/// kernel NAT rules or the socket hooks, with no connection left to the listener (the `ls`
/// row's userland TOTAL is 0 and the path's own count is not). Nothing to check for the others.
pub(crate) fn check_path(ctx: &Ctx, kind: Kind, proto: Proto, port: u16) -> Result<(), String> {
    let (path, label, count, what) = match kind {
        Kind::RproxyNat => ("NAT", "kernel", "KERNEL_CONNS", "its kernel rules"),
        Kind::RproxySocket => ("SOCKET", "socket", "SOCKET_CONNS", "the socket hooks"),
        _ => return Ok(()),
    };
    let row = ls_row(ctx, kind, proto, port)?;
    match (cell(&row, path), cell(&row, "TOTAL"), cell(&row, count)) {
        (p, "0", n) if p == label && n != "0" && n != "?" => Ok(()),
        (p, total, n) => Err(format!(
            "{} ({}) was not served by {what}: {path} {p}, userland connections {total}, \
             {count} {n}",
            kind.name(),
            proto.name()
        )),
    }
}

/// Waits until the daemon's `ls` row shows its mapping on the socket hooks.
fn wait_socket_path(ctx: &Ctx, p: &mut Proc, proto: Proto, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let row = ls_row(ctx, Kind::RproxySocket, proto, port)?;
        if cell(&row, "SOCKET") == "socket" {
            return Ok(());
        }
        if let Some(status) = p.exited() {
            return Err(format!("{} exited ({status}){}", p.name, p.logs()));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{}: the socket hooks do not hold the mapping after 10 s (SOCKET {}){}",
                p.name,
                cell(&row, "SOCKET"),
                p.logs()
            ));
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Appends the proxies' own words to an error, which is where their misbehaviour shows.
pub(crate) fn explain<T>(result: Result<T, String>, procs: &[&Option<Proc>]) -> Result<T, String> {
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
pub(crate) fn start_server(ctx: &Ctx, name: &str, cmd: Command, port: u16) -> Result<Proc, String> {
    spawn_listening(ctx, cmd, name, Proto::Tcp, SocketAddrV4::new(CTR, port))
}

/// Starts `cmd` and waits until it has bound `addr`.
fn spawn_listening(
    ctx: &Ctx,
    cmd: Command,
    name: &str,
    proto: Proto,
    addr: SocketAddrV4,
) -> Result<Proc, String> {
    let mut p = Proc::spawn(cmd, name, &ctx.dir)?;
    wait_bound(&mut p, proto, addr)?;
    Ok(p)
}

pub(crate) fn iperf3_server(ctx: &Ctx, port: u16) -> Result<Proc, String> {
    let mut cmd = command(Some(NS_CTR), false, tool("iperf3"));
    cmd.args(["-s", "-1", "-p", &port.to_string(), "-B", &CTR.to_string()]);
    start_server(ctx, "iperf3-server", cmd, port)
}

pub(crate) fn iperf3_json(out: &ToolOut) -> Result<Value, String> {
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

pub(crate) fn json_f64(j: &Value, path: &[&str]) -> Result<f64, String> {
    path.iter()
        .try_fold(j, |v, k| v.get(k))
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("iperf3 JSON has no {}", path.join(".")))
}

/// Gives `cmd` a status pipe on fd 3, as dockerd does; returns the read end.
pub(crate) fn status_pipe(cmd: &mut Command) -> Result<OwnedFd, String> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    cmd.fd_mappings(vec![FdMapping {
        parent_fd: write,
        child_fd: 3,
    }])
    .map_err(|e| format!("fd mapping: {e:?}"))?;
    Ok(read)
}

/// `rproxy daemon -p PUBLISH` with an empty config and its own control socket (`NAME.sock`).
pub(crate) fn daemon_command(
    ctx: &Ctx,
    pin: bool,
    name: &str,
    publish: &str,
) -> Result<Command, String> {
    let config = ctx.dir.join("empty.toml");
    fs::write(&config, "publish = []\n").map_err(|e| format!("{}: {e}", config.display()))?;
    let mut cmd = command(None, pin, &ctx.o.rproxy);
    cmd.arg("daemon")
        .arg("--config")
        .arg(&config)
        .arg("--control-socket")
        .arg(ctx.dir.join(format!("{name}.sock")))
        .args(["--drain-timeout", "0", "-p", publish])
        .env("RPROXY_LOG", "warn")
        .env_remove("RPROXY_LOG_FILE")
        .env_remove("NOTIFY_SOCKET");
    Ok(cmd)
}
