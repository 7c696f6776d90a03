//! UDP workloads: bulk at unlimited and fixed rate, both directions (iperf3), and many
//! concurrent flows.

use super::*;

pub(crate) fn udp_bulk(
    ctx: &Ctx,
    client: Client,
    kind: Kind,
    port: u16,
    bitrate: &str,
    reverse: bool,
) -> Result<Vec<f64>, String> {
    let _server = iperf3_server(ctx, port)?;
    // iperf3 runs its control connection over TCP on the same port: two proxies, as dockerd
    // starts for `-p PORT:PORT/tcp -p PORT:PORT/udp`.
    let control = start_proxy(ctx, client, kind, Proto::Tcp, port, false)?;
    let data = start_proxy(ctx, client, kind, Proto::Udp, port, false)?;
    let d = client.dest(ctx, kind, port);
    let mut cmd = command(client.ns, false, tool("iperf3"));
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
    if reverse {
        // The server sends, to the address the client's first datagrams came from: through a
        // proxy, that is the proxy's flow socket, so the data takes the proxy's reply path.
        cmd.arg("-R");
    }
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
    let figures = explain(result, &[&control, &data])?;
    explain(check_path(ctx, kind, Proto::Tcp, port), &[&control, &data])?;
    explain(check_path(ctx, kind, Proto::Udp, port), &[&control, &data])?;
    Ok(figures)
}

pub(crate) fn udp_echo(port: u16) -> Result<Server, String> {
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

pub(crate) struct Flows {
    pub(crate) socks: Vec<UdpSocket>,
    pub(crate) dest: SocketAddrV4,
    /// Bit k set: flow i got its reply to datagram k, from the right address.
    pub(crate) got: Vec<u64>,
    pub(crate) misrouted: u64,
    pub(crate) example: Option<String>,
}

impl Flows {
    /// Reads every reply that arrives within `ms`.
    pub(crate) fn drain(&mut self, ms: u16) -> Result<(), String> {
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

    pub(crate) fn complete(&self, k: usize) -> bool {
        self.got.iter().all(|g| g & (1 << k) != 0)
    }
}

pub(crate) fn udp_flows(ctx: &Ctx, kind: Kind, port: u16) -> Result<Vec<f64>, String> {
    let _server = udp_echo(port)?;
    let proxy = start_proxy(ctx, BRIDGE_CLIENT, kind, Proto::Udp, port, false)?;
    let (flows, msgs) = (ctx.o.flows, ctx.o.flow_msgs);
    let dest = BRIDGE_CLIENT.dest(ctx, kind, port);
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
