//! TCP workloads: bulk (iperf3), request/response (sockperf), connection rate (wrk and an
//! open-loop generator).

use super::*;

/// iperf3 from `client`: bulk through the proxy, `streams` at once, or `reverse`d.
pub(crate) fn tcp_bulk(
    ctx: &Ctx,
    client: Client,
    kind: Kind,
    port: u16,
    streams: u32,
    reverse: bool,
) -> Result<Vec<f64>, String> {
    let _server = iperf3_server(ctx, port)?;
    let proxy = start_proxy(ctx, client, kind, Proto::Tcp, port, false)?;
    let d = client.dest(ctx, kind, port);
    let mut cmd = command(client.ns, false, tool("iperf3"));
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
    explain(check_path(ctx, kind, Proto::Tcp, port), &[&proxy])?;
    Ok(vec![bps / 1e9])
}

pub(crate) fn request_response(
    ctx: &Ctx,
    client: Client,
    kind: Kind,
    port: u16,
    pin: bool,
) -> Result<Vec<f64>, String> {
    let (ctr, port_s) = (ctx.ctr().to_string(), port.to_string());
    let _server = ctx.server(
        "sockperf-server",
        pin,
        &["sockperf", "server", "--tcp", "-i", &ctr, "-p", &port_s],
        Proto::Tcp,
        port,
    )?;
    let proxy = start_proxy(ctx, client, kind, Proto::Tcp, port, pin)?;
    let d = client.dest(ctx, kind, port);
    let mut cmd = command(client.ns, pin, tool("sockperf"));
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
    let figures = explain(result, &[&proxy])?;
    explain(check_path(ctx, kind, Proto::Tcp, port), &[&proxy])?;
    Ok(figures)
}

pub(crate) fn strip_ansi(s: &str) -> String {
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

pub(crate) fn number_after(text: &str, key: &str) -> Option<f64> {
    let rest = &text[text.find(key)? + key.len()..];
    let rest = rest.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// [k round trips/s, p50 µs, p99 µs] from sockperf ping-pong's report (valid period only).
pub(crate) fn parse_sockperf(out: &ToolOut) -> Result<Vec<f64>, String> {
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

pub(crate) fn conn_rate(
    ctx: &Ctx,
    client: Client,
    kind: Kind,
    port: u16,
) -> Result<Vec<f64>, String> {
    let _server = ctx.http_server(port)?;
    let proxy = start_proxy(ctx, client, kind, Proto::Tcp, port, false)?;
    let d = client.dest(ctx, kind, port);
    let mut cmd = command(client.ns, false, tool("wrk"));
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
    let figures = explain(result, &[&proxy])?;
    explain(check_path(ctx, kind, Proto::Tcp, port), &[&proxy])?;
    Ok(figures)
}

pub(crate) fn one_http(d: SocketAddrV4) -> Result<(), String> {
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

pub(crate) struct FixedResult {
    pub(crate) latencies_ms: Vec<f64>,
    pub(crate) errors: u64,
    pub(crate) missed: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) last_done: Option<Instant>,
}

pub(crate) fn conn_fixed(ctx: &Ctx, kind: Kind, port: u16) -> Result<Vec<f64>, String> {
    let _server = http_server(port)?;
    let proxy = start_proxy(ctx, BRIDGE_CLIENT, kind, Proto::Tcp, port, false)?;
    let d = BRIDGE_CLIENT.dest(ctx, kind, port);
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
