//! `rproxy daemon`: every mapping in one multi-thread runtime — from `--publish`, a config file,
//! `rproxy add`, and docker-mode shims handing over dockerd's ports — with a control socket,
//! reload on SIGHUP and a bounded drain on SIGTERM.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};

use crate::control::{self, Row};
use crate::frontend;
use crate::mapping::{describe, parse_publish, Mapping};
use crate::nat::{self, Mode};
use crate::signals::{Event, Signals};
use crate::supervisor::{Origin, Supervisor};

/// The config file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG: &str = "/etc/rproxy/rproxy.toml";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A mapping: [HOST_IP:]HOST_PORT[-END]:TARGET_IP:TARGET_PORT[-END][/tcp|/udp] (repeatable;
    /// IPv6 addresses in brackets; ranges map one to one).
    #[arg(long = "publish", short = 'p', value_name = "SPEC")]
    publish: Vec<String>,
    /// TOML config file with `publish = [...]` (default /etc/rproxy/rproxy.toml if present);
    /// re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Control socket path (default: $RPROXY_SOCKET, else /run/rproxy/rproxy.sock).
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Seconds open connections may take to finish when their mapping is removed or the daemon
    /// stops.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    drain_timeout: f64,
    /// Kernel fast path: install nftables DNAT rules for each mapping (loopback and hairpin
    /// clients stay on the userland listener). `--nat` or `--nat=on` falls back to userland
    /// with a warning when the kernel path is unavailable; `--nat=require` fails instead.
    #[arg(long, value_name = "MODE", num_args = 0..=1, default_missing_value = "on", require_equals = true)]
    nat: Option<Mode>,
    /// Log lines as text or as JSON objects (default: $RPROXY_LOG_FORMAT, else text).
    #[arg(long, value_name = "FORMAT", value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (default: $RPROXY_METRICS_ADDR,
    /// else none).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<std::net::SocketAddr>,
}

/// The config file. Unknown keys are errors: a typo must not silently drop a mapping.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    publish: Vec<toml::Spanned<String>>,
    /// Mappings with their own options: `[[mapping]] publish = "…" nat = "require"`.
    #[serde(default)]
    mapping: Vec<MappingEntry>,
    control_socket: Option<PathBuf>,
    drain_timeout: Option<f64>,
    /// The NAT mode of every mapping without its own (`--nat` wins).
    nat: Option<toml::Spanned<String>>,
    /// Where to serve Prometheus metrics (`--metrics-addr` wins).
    metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingEntry {
    publish: toml::Spanned<String>,
    nat: Option<toml::Spanned<String>>,
}

/// A mapping and its NAT mode.
type Wanted = (Mapping, Mode);

/// What the daemon runs: the union of `--publish` and the config file.
struct Settings {
    publish: Vec<Wanted>,
    config: Vec<Wanted>,
    config_path: Option<PathBuf>,
    control_socket: PathBuf,
    drain: Duration,
    /// The mode of mappings that name none (from `--nat`, else the config file).
    nat: Mode,
    /// `--nat` as given, which reloads keep over the file's default.
    nat_flag: Option<Mode>,
    metrics_addr: Option<std::net::SocketAddr>,
}

impl Settings {
    /// Parses everything up front; every bad spec is reported (with its line) before
    /// anything binds.
    fn load(args: &Args) -> Result<Settings, Vec<String>> {
        let mut errors = Vec::new();
        let mut specs = Vec::new();
        for spec in &args.publish {
            match parse_publish(spec) {
                Ok(m) => specs.extend(m),
                Err(e) => errors.push(format!("--publish {spec:?}: {e}")),
            }
        }
        let config_path = args.config.clone().or_else(|| {
            Path::new(DEFAULT_CONFIG)
                .exists()
                .then(|| PathBuf::from(DEFAULT_CONFIG))
        });
        // `nat`: --nat, else the file's default, else off (read_config applies the same rule).
        let no_file = || {
            (
                ConfigFile::default(),
                args.nat.unwrap_or_default(),
                Vec::new(),
            )
        };
        let (file, nat, config) = match &config_path {
            Some(path) => match read_config(path, args.nat) {
                Ok(c) => c,
                Err(mut e) => {
                    errors.append(&mut e);
                    no_file()
                }
            },
            None => no_file(),
        };
        let metrics_addr = match crate::prometheus::addr_from_env() {
            Ok(env) => args.metrics_addr.or(file.metrics_addr).or(env),
            Err(e) => {
                errors.push(e);
                None
            }
        };
        let publish: Vec<Wanted> = specs.into_iter().map(|m| (m, nat)).collect();
        let drain = file.drain_timeout.unwrap_or(args.drain_timeout);
        if !(drain.is_finite() && drain >= 0.0) {
            errors.push(format!("drain timeout {drain} is not a number of seconds"));
        }
        let mut seen = BTreeSet::new();
        for (m, _) in publish.iter().chain(&config) {
            if m.listen.port() != 0 && !seen.insert((m.proto, m.listen)) {
                errors.push(format!("{} {} is mapped twice", m.proto, m.listen));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Settings {
            publish,
            config,
            config_path,
            control_socket: control::socket_path(
                args.control_socket.clone().or(file.control_socket),
            ),
            drain: Duration::from_secs_f64(drain.max(0.0)),
            nat,
            nat_flag: args.nat,
            metrics_addr,
        })
    }
}

/// Reads a config file into its settings, its default NAT mode and its mappings (each with
/// its mode: its own, else `nat_flag`, else the file's); errors name the file and line.
fn read_config(
    path: &Path,
    nat_flag: Option<Mode>,
) -> Result<(ConfigFile, Mode, Vec<Wanted>), Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![format!("{}: {}", path.display(), describe(&e))])?;
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let file: ConfigFile = toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|s| format!(":{}", line_of(s.start)))
            .unwrap_or_default();
        vec![format!("{}{line}: {}", path.display(), e.message())]
    })?;
    let mut errors = Vec::new();
    let mut mode = |value: &Option<toml::Spanned<String>>, default: Mode| match value {
        None => default,
        Some(v) => v.get_ref().parse().unwrap_or_else(|e| {
            errors.push(format!(
                "{}:{}: {e}",
                path.display(),
                line_of(v.span().start)
            ));
            default
        }),
    };
    let default = nat_flag.unwrap_or(mode(&file.nat, Mode::Off));
    let entries: Vec<(&toml::Spanned<String>, Mode)> = file
        .publish
        .iter()
        .map(|spec| (spec, default))
        .chain(
            file.mapping
                .iter()
                .map(|e| (&e.publish, mode(&e.nat, default))),
        )
        .collect();
    let mut mappings = Vec::new();
    for (spec, nat) in entries {
        match parse_publish(spec.get_ref()) {
            Ok(m) => mappings.extend(m.into_iter().map(|m| (m, nat))),
            Err(e) => errors.push(format!(
                "{}:{}: publish {:?}: {e}",
                path.display(),
                line_of(spec.span().start),
                spec.get_ref()
            )),
        }
    }
    if errors.is_empty() {
        Ok((file, default, mappings))
    } else {
        Err(errors)
    }
}

/// Runs the daemon; returns the exit code.
pub fn main(args: Args) -> i32 {
    let settings = match Settings::load(&args) {
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
    let sup = Supervisor::new(nat::Manager::new(nat::Nat::DAEMON_TABLE));
    let mut failed = Vec::new();
    if settings.nat != Mode::Off {
        // Open (and sweep) now: an unusable kernel path is reported at start-up.
        if let Err(e) = sup.nat().open(settings.nat) {
            failed.push(e);
        }
    }
    for (mappings, origin) in [
        (&settings.publish, Origin::Publish),
        (&settings.config, Origin::Config),
    ] {
        for (m, mode) in mappings.iter() {
            if let Err(e) = sup.start(*m, None, origin, *mode) {
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
        settings.nat,
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
    let wanted = match read_config(path, settings.nat_flag) {
        Ok((_, _, m)) => m,
        Err(errors) => {
            for e in errors {
                tracing::error!("reload refused, nothing changed: {e}");
            }
            return;
        }
    };
    // A mapping whose target or NAT mode changed is stopped and started again.
    let key = |(m, mode): &Wanted| (m.proto, m.listen, m.target, *mode);
    let wanted_keys: BTreeSet<_> = wanted.iter().map(key).collect();
    let running = sup.mappings(Origin::Config);
    let (mut added, mut removed) = (0, 0);
    for w in &running {
        if !wanted_keys.contains(&key(w)) {
            sup.stop_if(&(w.0.proto, w.0.listen), settings.drain, |o| {
                o == Origin::Config
            });
            removed += 1;
        }
    }
    let running_keys: BTreeSet<_> = running.iter().map(key).collect();
    for (m, mode) in wanted {
        if !running_keys.contains(&key(&(m, mode))) {
            match sup.start(m, None, Origin::Config, mode) {
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

/// An accept loop's client, or None after a failed accept: logged, with a pause so that a
/// lasting error (EMFILE) cannot spin the loop.
pub(crate) async fn accepted<T>(what: &str, result: std::io::Result<T>) -> Option<T> {
    match result {
        Ok(client) => Some(client),
        Err(e) => {
            tracing::warn!("{what} accept failed: {}", describe(&e));
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}

/// Accepts control connections; each is served on its own task.
async fn serve_control(listener: UnixListener, sup: Supervisor, drain: Duration, nat: Mode) {
    let own_uid = nix::unistd::geteuid().as_raw();
    let mut next_id = 0u64;
    loop {
        let Some((stream, _)) = accepted("control", listener.accept().await).await else {
            continue;
        };
        next_id += 1;
        let (sup, id) = (sup.clone(), next_id);
        tokio::spawn(async move {
            if let Err(e) = client(stream, sup, own_uid, id, drain, nat).await {
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
    nat: Mode,
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
            let answer = match add(&sup, arg, nat) {
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
        "register" => register(stream, &sup, arg, fds, id, nat).await,
        _ => reply(&mut stream, &format!("error unknown request {cmd:?}")).await,
    }
}

async fn reply(stream: &mut UnixStream, line: &str) -> std::io::Result<()> {
    stream.write_all(format!("{line}\n").as_bytes()).await
}

/// `SPEC [nat=MODE]`: a request's spec and its NAT mode (`default` when not given).
fn spec_and_mode(arg: &str, default: Mode) -> Result<(&str, Mode), String> {
    let mut words = arg.split_whitespace();
    let spec = words.next().unwrap_or("");
    let mut mode = default;
    for w in words {
        match w.strip_prefix("nat=") {
            Some(m) => mode = m.parse()?,
            None => return Err(format!("unknown option {w:?}")),
        }
    }
    Ok((spec, mode))
}

/// `add SPEC [nat=MODE]`: all of the spec's mappings start, or none do.
fn add(sup: &Supervisor, arg: &str, nat: Mode) -> Result<usize, String> {
    let (spec, mode) = spec_and_mode(arg, nat)?;
    let mappings = parse_publish(spec)?;
    let mut started = Vec::new();
    for m in &mappings {
        match sup.start(*m, None, Origin::Control, mode) {
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
    let mappings = parse_publish(spec)?;
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
    nat: Mode,
) -> std::io::Result<()> {
    let started = (|| -> Result<Mapping, String> {
        let (spec, mode) = spec_and_mode(spec, nat)?;
        let mapping = match parse_publish(spec)?.as_slice() {
            [m] => *m,
            _ => return Err("register takes exactly one port".into()),
        };
        let fd = match (fds.pop(), fds.is_empty()) {
            (Some(fd), true) => fd,
            _ => return Err("register needs exactly one listening socket".into()),
        };
        let socket = frontend::check(&mapping, fd)?;
        sup.start(mapping, Some(socket), Origin::Shim(id), mode)
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
