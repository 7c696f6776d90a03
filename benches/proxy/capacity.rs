//! Capacity workloads: idle connections held, and many ports in one process.

use super::*;

/// Accepts connections in the container namespace and keeps them open; while `echo` is set it
/// also echoes whatever arrives on them.
pub(crate) fn hold_server(port: u16, echo: Arc<AtomicBool>) -> Result<Server, String> {
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
pub(crate) fn open_conns(d: SocketAddrV4, n: usize, echo: bool) -> Result<Vec<TcpStream>, String> {
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
pub(crate) fn echo_check(conns: &mut [TcpStream]) -> Result<(), String> {
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
pub(crate) fn idle_count(ctx: &Ctx, kind: Kind) -> usize {
    let per_conn = match kind {
        Kind::DockerProxy => 6,
        _ => 2,
    };
    let cap = ctx.o.nofile.saturating_sub(600) / per_conn;
    ctx.o.idle.min(cap as usize).max(1)
}

/// Connections that carried nothing yet: each costs the proxy two sockets (client and
/// container side), and the bench process two more (client and server).
pub(crate) fn idle_conns(ctx: &Ctx, kind: Kind, port: u16) -> Result<Vec<f64>, String> {
    const WARM: usize = 20;
    const SAMPLE: usize = 100;
    let echo = Arc::new(AtomicBool::new(true));
    let server = hold_server(port, echo.clone())?;
    let proxy = start_proxy(ctx, BRIDGE_CLIENT, kind, Proto::Tcp, port, false)?;
    let pid = proxy.as_ref().ok_or("idle-conns needs a proxy")?.pid();
    let d = BRIDGE_CLIENT.dest(ctx, kind, port);
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

pub(crate) fn many_ports(ctx: &Ctx, kind: Kind, _port: u16) -> Result<Vec<f64>, String> {
    let n = ctx.o.ports as u16;
    let (first, last) = (NPORTS_BASE, NPORTS_BASE + n - 1);
    let mut procs = Vec::new();
    let mut pipes = Vec::new();
    let t0 = Instant::now();
    match kind {
        Kind::Rproxy | Kind::RproxyDaemon => {
            let name = format!("ctl-{}", SEQ.load(Ordering::Relaxed));
            let cmd = daemon_command(
                ctx,
                false,
                &name,
                &format!("{GW}:{first}-{last}:{CTR}:{first}-{last}"),
            )?;
            procs.push(Proc::spawn(cmd, "rproxy-daemon", &ctx.dir)?);
        }
        Kind::DockerProxy => {
            for port in first..=last {
                let mut cmd = command(None, false, &ctx.o.docker_proxy);
                cmd.args(docker_args(Proto::Tcp, GW, CTR, port));
                let read = status_pipe(&mut cmd)?;
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
        Kind::Direct
        | Kind::RproxyNat
        | Kind::RproxyMetrics
        | Kind::RproxySocket
        | Kind::DockerPorts
        | Kind::Haproxy => return Err("ports compares one process with a process per port".into()),
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
