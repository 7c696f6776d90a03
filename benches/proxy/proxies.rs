//! Starting each proxy as dockerd would (status pipe on fd 3), or the daemon for N ports.

use std::collections::BTreeMap;

use super::*;

pub(crate) struct Ctx {
    pub(crate) o: Options,
    pub(crate) dir: PathBuf,
    pub(crate) kinds: Vec<Kind>,
    pub(crate) target: Target,
}

impl Ctx {
    pub(crate) fn settle(&self) {
        thread::sleep(Duration::from_millis(if self.o.smoke { 50 } else { 300 }));
    }

    /// The container's address: where its servers listen, the proxies forward and direct
    /// dials.
    pub(crate) fn ctr(&self) -> Ipv4Addr {
        match &self.target {
            Target::Netns => CTR,
            Target::Container(c) => c.ip,
        }
    }

    /// Starts `argv` in the container (its namespace, or `docker exec`) and waits until it
    /// listens on (UDP: has bound) the container's address at `port`.
    pub(crate) fn server(
        &self,
        name: &str,
        pin: bool,
        argv: &[&str],
        proto: Proto,
        port: u16,
    ) -> Result<Proc, String> {
        let addr = SocketAddrV4::new(self.ctr(), port);
        match &self.target {
            Target::Netns => {
                let mut cmd = command(Some(NS_CTR), pin, tool(argv[0]));
                cmd.args(&argv[1..]);
                spawn_listening(self, cmd, name, proto, addr)
            }
            Target::Container(c) => c.exec(&self.dir, name, pin, argv, proto, addr),
        }
    }

    /// The container's web server at `port` (see `http_server`; nginx in a real container),
    /// running until the value returned is dropped.
    pub(crate) fn http_server(&self, port: u16) -> Result<Box<dyn std::any::Any>, String> {
        match &self.target {
            Target::Netns => Ok(Box::new(http_server(port)?)),
            Target::Container(c) => {
                Ok(Box::new(c.nginx(&self.dir, SocketAddrV4::new(c.ip, port))?))
            }
        }
    }
}

/// docker-proxy's command line, as dockerd passes it for `-p FRONT:PORT:PORT/PROTO`.
pub(crate) fn docker_args(proto: Proto, front: Ipv4Addr, ctr: Ipv4Addr, port: u16) -> Vec<String> {
    [
        "-proto",
        proto.name(),
        "-host-ip",
        &front.to_string(),
        "-host-port",
        &port.to_string(),
        "-container-ip",
        &ctr.to_string(),
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

/// Starts one proxy process for `proto` FRONT:port → the container's port, FRONT being the
/// address `client` dials (nothing for direct, nor for the docker-ports daemon, which serves
/// the run's ports from its start), ready to serve.
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
    let ctr = ctx.ctr();
    match kind {
        Kind::Direct | Kind::DockerPorts => Ok(None),
        Kind::Rproxy | Kind::DockerProxy => {
            let binary = match kind {
                Kind::Rproxy => &ctx.o.rproxy,
                _ => &ctx.o.docker_proxy,
            };
            let mut cmd = command(None, pin, binary);
            cmd.args(docker_args(proto, front, ctr, port))
                .env("RPROXY_SOCKET", NO_DAEMON)
                .env("RPROXY_LOG", "warn")
                .env_remove("RPROXY_LOG_FILE");
            let read = status_pipe(&mut cmd)?;
            let mut p = Proc::spawn(cmd, &name, &ctx.dir)?;
            wait_status(&mut p, read)?;
            Ok(Some(p))
        }
        Kind::RproxyDaemon | Kind::RproxyNat | Kind::RproxyMetrics | Kind::RproxySocket => {
            let publish = format!("{front}:{port}:{ctr}:{port}/{}", proto.name());
            let mut cmd = daemon_command(ctx, pin, &name, &publish)?;
            match kind {
                Kind::RproxyNat => {
                    cmd.arg("--nat=require");
                }
                Kind::RproxySocket => {
                    cmd.arg("--socket-lb=require");
                }
                // A port the kernel picks: nothing scrapes it (the recorder's cost is the
                // point), and a fixed one may be anybody's (the dockerd tests publish theirs
                // in 20080-20980).
                Kind::RproxyMetrics => {
                    cmd.arg("--metrics-addr=127.0.0.1:0");
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
            fs::write(&config, haproxy_config(ctx.o.nofile, front, ctr, port))
                .map_err(|e| format!("{}: {e}", config.display()))?;
            let mut cmd = command(None, pin, tool("haproxy"));
            cmd.arg("-db").arg("-f").arg(&config);
            spawn_listening(ctx, cmd, &name, proto, listen).map(Some)
        }
        Kind::Socat => {
            let (accept, connect) = match proto {
                Proto::Tcp => (
                    format!("TCP4-LISTEN:{port},bind={front},fork,reuseaddr"),
                    format!("TCP4:{ctr}:{port}"),
                ),
                Proto::Udp => (
                    format!("UDP4-LISTEN:{port},bind={front},fork,reuseaddr"),
                    format!("UDP4:{ctr}:{port}"),
                ),
            };
            let mut cmd = command(None, pin, tool("socat"));
            cmd.args([accept, connect]);
            spawn_listening(ctx, cmd, &name, proto, listen).map(Some)
        }
    }
}

/// HAProxy relaying front:port to ctr:port in TCP mode, set up for throughput the way rproxy and
/// Go (docker-proxy) are: splicing both ways through 1 MiB pipes. Its defaults would copy
/// through its buffers (`tune.bufsize`, 16 KiB), and `splice-auto` splices only streams it
/// judges fast (measured here: 6.28 Gb/s on tcp-bulk-4, against 13.8-15.6 with these
/// settings). Each connection takes two descriptors and each pipe two more, so `maxconn`
/// stays within the descriptor limit.
fn haproxy_config(nofile: u64, front: Ipv4Addr, ctr: Ipv4Addr, port: u16) -> String {
    format!(
        "global\n    maxconn {maxconn}\n    tune.pipesize 1048576\n\
         defaults\n    mode tcp\n    timeout connect 10s\n    timeout client 1h\n    \
         timeout server 1h\n    option splice-request\n    option splice-response\n\
         listen bench\n    bind {front}:{port}\n    server container {ctr}:{port}\n",
        maxconn = nofile / 5
    )
}

/// The `rproxy ls` rows of the daemon at `control`, each cell by its column header.
pub(crate) fn ls_rows(
    rproxy: &Path,
    control: &Path,
) -> Result<Vec<BTreeMap<String, String>>, String> {
    let out = Command::new(rproxy)
        .arg("ls")
        .arg("--control-socket")
        .arg(control)
        .output()
        .map_err(|e| format!("rproxy ls: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "rproxy ls ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let table = String::from_utf8_lossy(&out.stdout);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    Ok(lines
        .map(|line| {
            header
                .iter()
                .zip(line.split_whitespace())
                .map(|(h, c)| (h.to_string(), c.to_string()))
                .collect()
        })
        .collect())
}

/// The `ls` row that serves this measurement: the one mapping of its own daemon, or the
/// docker-ports daemon's 0.0.0.0:port of the container.
fn ls_row(
    ctx: &Ctx,
    kind: Kind,
    proto: Proto,
    port: u16,
) -> Result<BTreeMap<String, String>, String> {
    let docker_ports = match (&ctx.target, kind) {
        (Target::Container(c), Kind::DockerPorts) => c.control.clone(),
        _ => None,
    };
    let Some(control) = docker_ports else {
        let name = proxy_name(kind, proto, port);
        let rows = ls_rows(&ctx.o.rproxy, &ctx.dir.join(format!("{name}.sock")))?;
        return Ok(rows.into_iter().next().unwrap_or_default());
    };
    let listen = format!("0.0.0.0:{port}");
    ls_rows(&ctx.o.rproxy, &control)?
        .into_iter()
        .find(|r| cell(r, "PROTO") == proto.name() && cell(r, "LISTEN") == listen)
        .ok_or_else(|| format!("rproxy ls lists no {listen}/{}", proto.name()))
}

pub(crate) fn cell<'a>(row: &'a BTreeMap<String, String>, header: &str) -> &'a str {
    row.get(header).map_or("?", String::as_str)
}

/// Checks that a run of `rproxy-nat`, `rproxy-socket` or `rproxy-docker-ports` took the path
/// its column claims: kernel NAT rules or the socket hooks, with no connection left to a
/// listener (the `ls` row's userland TOTAL is 0 and the path's own count is not; each port
/// serves one measurement). Nothing to check for the others.
pub(crate) fn check_path(ctx: &Ctx, kind: Kind, proto: Proto, port: u16) -> Result<(), String> {
    let (path, label, count, what) = match kind {
        Kind::RproxyNat => ("NAT", "kernel", "KERNEL_CONNS", "its kernel rules"),
        Kind::RproxySocket | Kind::DockerPorts => {
            ("SOCKET", "socket", "SOCKET_CONNS", "the socket hooks")
        }
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
        // The daemon binds its listener before its control socket: not answering yet is
        // "not yet".
        let path = match ls_row(ctx, Kind::RproxySocket, proto, port) {
            Ok(row) => cell(&row, "SOCKET").to_string(),
            Err(e) => e,
        };
        if path == "socket" {
            return Ok(());
        }
        if let Some(status) = p.exited() {
            return Err(format!("{} exited ({status}){}", p.name, p.logs()));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{}: the socket hooks do not hold the mapping after 10 s (SOCKET {path}){}",
                p.name,
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
    let (port_s, ctr) = (port.to_string(), ctx.ctr().to_string());
    ctx.server(
        "iperf3-server",
        false,
        &["iperf3", "-s", "-1", "-p", &port_s, "-B", &ctr],
        Proto::Tcp,
        port,
    )
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
