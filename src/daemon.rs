//! `rproxy daemon`: every mapping in one multi-thread runtime — from `--publish`, a config file,
//! `rproxy add`, and docker-mode shims handing over dockerd's ports — with a control socket,
//! reload on SIGHUP and a bounded drain on SIGTERM.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};

use crate::backoff::Backoff;
use crate::config::{Args, Settings};
use crate::control::{self, Row};
use crate::env::Env;
use crate::frontend;
use crate::mapping::{describe, parse_publish, Mapping};
use crate::nat;
use crate::options::{NatMode, Options};
use crate::signals::{Event, Signals};
use crate::supervisor::{Origin, Supervisor};

/// Runs the daemon; returns the exit code.
pub fn main(args: Args, env: Env) -> i32 {
    let settings = match Settings::load(&args, &env) {
        Ok(s) => s,
        Err(errors) => {
            for e in errors {
                eprintln!("rproxy: {e}");
            }
            return 2;
        }
    };
    if let Err(e) = crate::sys::raise_nofile_limit() {
        tracing::warn!("cannot raise the open-file limit: {}", describe(&e));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rproxy: cannot start the runtime: {}", describe(&e));
            return 1;
        }
    };
    runtime.block_on(run(settings))
}

async fn run(settings: Settings) -> i32 {
    let mut signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("rproxy: cannot handle signals: {}", describe(&e));
            return 1;
        }
    };
    // The recorder first, so every mapping's histograms are real.
    let metrics = match settings.metrics_addr.map(metrics_endpoint).transpose() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("rproxy: {e}");
            return 1;
        }
    };
    let sup = Supervisor::new(nat::Manager::new(nat::Nat::DAEMON_TABLE), metrics.is_some());
    let mut failed = Vec::new();
    if settings.defaults.nat != NatMode::Off {
        // Open (and sweep) now: an unusable kernel path is reported at start-up.
        if let Err(e) = sup.nat().open(settings.defaults.nat) {
            failed.push(e);
        }
    }
    for (mappings, origin) in [
        (&settings.publish, Origin::Publish),
        (&settings.config, Origin::Config),
    ] {
        for m in mappings.iter() {
            if let Err(e) = sup.start(*m, None, origin) {
                failed.push(e);
            }
        }
    }
    if !failed.is_empty() {
        for e in failed {
            eprintln!("rproxy: {e}");
        }
        sup.stop_all(Duration::ZERO);
        return 1;
    }
    let listener = match control_listener(&settings.control_socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("rproxy: {e}");
            sup.stop_all(Duration::ZERO);
            return 1;
        }
    };
    let metrics = metrics.map(|(listener, handle)| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!("metrics at http://{addr}/metrics");
        }
        tokio::spawn(crate::prometheus::serve(listener, handle, sup.clone()))
    });
    tracing::info!(
        "daemon ready: {} mappings, control socket {}",
        sup.rows().len(),
        settings.control_socket.display()
    );
    sd_notify("READY=1");
    let control = tokio::spawn(serve_control(
        listener,
        sup.clone(),
        settings.drain,
        settings.defaults,
    ));
    loop {
        match signals.next().await {
            Event::Reload => reload(&sup, &settings),
            Event::Stop(name) => {
                tracing::info!(
                    "{name}: stopping; open connections get {:?}",
                    settings.drain
                );
                sd_notify("STOPPING=1");
                break;
            }
        }
    }
    control.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    let _ = std::fs::remove_file(&settings.control_socket);
    let tasks = sup.stop_all(settings.drain);
    // A second signal cuts the drain short.
    let drained = async {
        for t in tasks {
            let _ = t.await;
        }
    };
    tokio::select! {
        _ = drained => {}
        _ = signals.next() => tracing::info!("second signal: exiting without waiting"),
    }
    0
}

/// Installs the metrics recorder and binds its endpoint.
fn metrics_endpoint(
    addr: std::net::SocketAddr,
) -> Result<
    (
        tokio::net::TcpListener,
        metrics_exporter_prometheus::PrometheusHandle,
    ),
    String,
> {
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(tokio::net::TcpListener::from_std)
        .map_err(|e| format!("metrics: cannot listen on {addr}: {}", describe(&e)))?;
    let handle = crate::prometheus::install()?;
    Ok((listener, handle))
}

/// Binds the control socket: mode 0600, its directory created; a stale socket file left by a
/// crash is replaced, a live daemon is not.
fn control_listener(path: &Path) -> Result<UnixListener, String> {
    let ctx = |e: std::io::Error| format!("control socket {}: {}", path.display(), describe(&e));
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(format!(
            "another rproxy daemon is running on {}",
            path.display()
        ));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(ctx)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(ctx(e)),
        _ => {}
    }
    let listener = UnixListener::bind(path).map_err(ctx)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(ctx)?;
    Ok(listener)
}

/// SIGHUP: re-read the config file; start what was added, stop what was removed (with the
/// drain time), leave every unchanged mapping — and its connections — alone.
fn reload(sup: &Supervisor, settings: &Settings) {
    let Some(path) = &settings.config_path else {
        tracing::info!("SIGHUP: no config file to reload");
        return;
    };
    let wanted = match settings.reread() {
        Ok(m) => m,
        Err(errors) => {
            for e in errors {
                tracing::error!("reload refused, nothing changed: {e}");
            }
            return;
        }
    };
    // A mapping whose target or options changed is stopped and started again.
    let wanted_set: BTreeSet<_> = wanted.iter().map(identity).collect();
    let running = sup.mappings(Origin::Config);
    let (mut added, mut removed) = (0, 0);
    for m in &running {
        if !wanted_set.contains(&identity(m)) {
            sup.stop_if(&(m.proto, m.listen), settings.drain, |o| {
                o == Origin::Config
            });
            removed += 1;
        }
    }
    let running_set: BTreeSet<_> = running.iter().map(identity).collect();
    for m in wanted {
        if !running_set.contains(&identity(&m)) {
            match sup.start(m, None, Origin::Config) {
                Ok(_) => added += 1,
                Err(e) => tracing::error!("reload: {e}"),
            }
        }
    }
    tracing::info!(
        "reloaded {}: {added} added, {removed} removed",
        path.display()
    );
}

/// What makes a mapping the same across a reload.
fn identity(m: &Mapping) -> impl Ord {
    (m.proto, m.listen, m.target, m.options)
}

/// Accepts control connections; each is served on its own task.
async fn serve_control(
    listener: UnixListener,
    sup: Supervisor,
    drain: Duration,
    defaults: Options,
) {
    let own_uid = nix::unistd::geteuid().as_raw();
    let mut next_id = 0u64;
    let mut backoff = Backoff::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                backoff.failed("control", &e).await;
                continue;
            }
        };
        backoff.reset();
        next_id += 1;
        let (sup, id) = (sup.clone(), next_id);
        tokio::spawn(async move {
            if let Err(e) = client(stream, sup, own_uid, id, drain, defaults).await {
                tracing::debug!("control client: {}", describe(&e));
            }
        });
    }
}

/// One control connection: read the request line (and any socket sent with it), answer.
async fn client(
    mut stream: UnixStream,
    sup: Supervisor,
    own_uid: u32,
    id: u64,
    drain: Duration,
    defaults: Options,
) -> std::io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let mut buf = vec![0u8; control::MAX_REQUEST];
    let mut len = 0;
    let mut fds = Vec::new();
    while !buf[..len].contains(&b'\n') {
        if len == buf.len() {
            return reply(&mut stream, "error request too long").await;
        }
        let (n, mut got) = stream
            .async_io(Interest::READABLE, || {
                use std::os::fd::AsFd;
                control::recv_request(stream.as_fd(), &mut buf[len..])
            })
            .await?;
        fds.append(&mut got);
        if n == 0 {
            return Ok(());
        }
        len += n;
    }
    let line = String::from_utf8_lossy(&buf[..len]);
    let line = line.trim_end();
    let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
    if cmd != "ls" && uid != 0 && uid != own_uid {
        tracing::warn!("control: uid {uid} may not {cmd}");
        return reply(&mut stream, &format!("error permission denied: uid {uid} may not change mappings (only root or uid {own_uid})")).await;
    }
    match cmd {
        "ls" => {
            let mut out = String::new();
            for row in sup.rows() {
                out.push_str(&row.encode());
                out.push('\n');
            }
            out.push_str("end\n");
            stream.write_all(out.as_bytes()).await
        }
        "add" => {
            let answer = match add(&sup, arg, defaults) {
                Ok(n) => format!("ok added {n}"),
                Err(e) => format!("error {e}"),
            };
            reply(&mut stream, &answer).await
        }
        "rm" => {
            let answer = match remove(&sup, arg, drain) {
                Ok(n) => format!("ok removed {n}"),
                Err(e) => format!("error {e}"),
            };
            reply(&mut stream, &answer).await
        }
        "register" => register(stream, &sup, arg, fds, id, defaults).await,
        _ => reply(&mut stream, &format!("error unknown request {cmd:?}")).await,
    }
}

async fn reply(stream: &mut UnixStream, line: &str) -> std::io::Result<()> {
    stream.write_all(format!("{line}\n").as_bytes()).await
}

/// `SPEC [nat=MODE]`: a request's spec and its options (`defaults`, and the mode if given).
fn spec_and_options(arg: &str, defaults: Options) -> Result<(&str, Options), String> {
    let mut words = arg.split_whitespace();
    let spec = words.next().unwrap_or("");
    let mut options = defaults;
    for w in words {
        match w.strip_prefix("nat=") {
            Some(m) => options.nat = m.parse()?,
            None => return Err(format!("unknown option {w:?}")),
        }
    }
    Ok((spec, options))
}

/// `add SPEC [nat=MODE]`: all of the spec's mappings start, or none do.
fn add(sup: &Supervisor, arg: &str, defaults: Options) -> Result<usize, String> {
    let (spec, options) = spec_and_options(arg, defaults)?;
    let mappings = parse_publish(spec, options)?;
    let mut started = Vec::new();
    for m in &mappings {
        match sup.start(*m, None, Origin::Control) {
            Ok(real) => started.push(real),
            Err(e) => {
                for s in started {
                    sup.stop_if(&(s.proto, s.listen), Duration::ZERO, |_| true);
                }
                return Err(e);
            }
        }
    }
    Ok(started.len())
}

/// `rm SPEC`: stops the spec's mappings (matched by protocol and listen address).
fn remove(sup: &Supervisor, spec: &str, drain: Duration) -> Result<usize, String> {
    let mappings = parse_publish(spec, Options::default())?;
    let mut removed = 0;
    for m in &mappings {
        let key = (m.proto, m.listen);
        match sup.get(&key) {
            Some((running, _)) if running.target != m.target => {
                return Err(format!(
                    "{} {} maps to {}, not {}",
                    m.proto, m.listen, running.target, m.target
                ))
            }
            Some(_) => {
                sup.stop_if(&key, drain, |_| true);
                removed += 1;
            }
            None => {}
        }
    }
    if removed == 0 {
        return Err(format!("no mapping matches {spec:?}"));
    }
    Ok(removed)
}

/// `register SPEC` + socket: serve it for as long as the shim keeps this connection open.
async fn register(
    mut stream: UnixStream,
    sup: &Supervisor,
    spec: &str,
    mut fds: Vec<std::os::fd::OwnedFd>,
    id: u64,
    defaults: Options,
) -> std::io::Result<()> {
    let started = (|| -> Result<Mapping, String> {
        let (spec, options) = spec_and_options(spec, defaults)?;
        let mapping = match parse_publish(spec, options)?.as_slice() {
            [m] => *m,
            _ => return Err("register takes exactly one port".into()),
        };
        let fd = match (fds.pop(), fds.is_empty()) {
            (Some(fd), true) => fd,
            _ => return Err("register needs exactly one listening socket".into()),
        };
        let socket = frontend::check(&mapping, fd)?;
        sup.start(mapping, Some(socket), Origin::Shim(id))
    })();
    let mapping = match started {
        Ok(m) => m,
        Err(e) => return reply(&mut stream, &format!("error {e}")).await,
    };
    reply(&mut stream, &format!("ok {}", mapping.spec())).await?;
    // The shim never writes again: readable means it closed (dockerd stopped it).
    let mut byte = [0u8; 1];
    loop {
        stream.readable().await?;
        match stream.try_read(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            // EOF, an error, or a protocol violation: the registration ends.
            _ => break,
        }
    }
    sup.stop_if(&(mapping.proto, mapping.listen), Duration::ZERO, |o| {
        o == Origin::Shim(id)
    });
    Ok(())
}

/// Tells systemd (Type=notify) about our state, when it asked.
fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| socket.send_to_addr(state.as_bytes(), &a))
    } else {
        socket.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = result {
        tracing::warn!("sd_notify {state}: {}", describe(&e));
    }
}

/// `rproxy ls` / `add` / `rm`: print the answer; exit 1 with the daemon's reason on failure.
pub fn client_main(request: &str, control_socket: Option<PathBuf>) -> i32 {
    let path = control::socket_path(control_socket);
    match control::call(&path, request) {
        Ok(lines) if request == "ls" => {
            let rows: Vec<Row> = lines.iter().filter_map(|l| Row::decode(l)).collect();
            print!("{}", control::format_table(&rows));
            0
        }
        Ok(lines) => {
            for l in lines {
                println!("{}", l.strip_prefix("ok ").unwrap_or(&l));
            }
            0
        }
        Err(e) => {
            eprintln!("rproxy: {e}");
            1
        }
    }
}
