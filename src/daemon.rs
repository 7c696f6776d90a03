//! `rproxy daemon`: every mapping in one multi-thread runtime — from `--publish`, a config file,
//! `rproxy add`, and docker-mode shims handing over dockerd's ports — with a control socket,
//! reload on SIGHUP and a bounded drain on SIGTERM.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use tokio::net::UnixListener;

use crate::bpf::SocketLb;
use crate::config::{Args, Reread, Settings};
use crate::control::server;
use crate::env::Env;
use crate::mapping::{describe, Mapping, Proto};
use crate::nat::Nat;
use crate::options::Mode;
use crate::signals::{Event, Signals};
use crate::supervisor::{key, Change, Key, Origin, Start, Supervisor};

/// `rproxy daemon --check`: resolves the flags, the config file and the environment as a
/// start would, and prints what the daemon would serve; binds, opens and attaches nothing.
/// Returns 0, or 2 after listing every problem (`problems`: the environment's, found before).
pub fn check(args: Args, env: Env, mut problems: Vec<String>) -> i32 {
    match Settings::load(&args, &env) {
        Ok(settings) if problems.is_empty() => {
            crate::output::print(&report(&settings));
            return 0;
        }
        Ok(_) => {}
        Err(mut errors) => problems.append(&mut errors),
    }
    for p in &problems {
        eprintln!("rproxy: {p}");
    }
    let n = problems.len();
    eprintln!(
        "rproxy: {n} problem{}: the daemon would not start",
        if n == 1 { "" } else { "s" }
    );
    2
}

/// What `--check` prints: the resolved settings, then one row per mapping.
fn report(s: &Settings) -> String {
    let secs = |d: Duration| format!("{} s", d.as_secs_f64());
    let o = &s.defaults;
    let mut head = vec![
        (
            "config file",
            match &s.config_path {
                Some(p) => p.display().to_string(),
                None => format!("none ({} does not exist)", crate::config::DEFAULT_CONFIG),
            },
        ),
        ("control socket", s.control_socket.display().to_string()),
        ("drain timeout", secs(s.drain)),
        (
            "metrics",
            s.metrics_addr
                .map_or("off".into(), |a| format!("http://{a}/metrics")),
        ),
        (
            "defaults",
            format!(
                "nat {}, socket-lb {}, connect timeout {}, UDP timeout {}, UDP flows {}, splice {}",
                o.nat,
                o.socket_lb,
                secs(o.connect_timeout),
                secs(o.udp_timeout),
                o.udp_max_flows,
                if o.splice { "on" } else { "off" },
            ),
        ),
    ];
    let mappings: Vec<(&Mapping, &str)> = s
        .publish
        .iter()
        .map(|m| (m, "publish"))
        .chain(s.config.iter().map(|m| (m, "config")))
        .collect();
    head.push(("mappings", mappings.len().to_string()));
    let mut out = crate::control::client::columns(
        &head
            .into_iter()
            .map(|(k, v)| vec![format!("{k}:"), v])
            .collect::<Vec<_>>(),
    );
    if !mappings.is_empty() {
        let mut table = vec![["PROTO", "LISTEN", "TARGET", "ORIGIN", "NAT", "SOCKET_LB"]
            .map(String::from)
            .to_vec()];
        for (m, origin) in mappings {
            table.push(vec![
                m.proto.to_string(),
                m.listen.to_string(),
                m.target.to_string(),
                origin.to_string(),
                m.options.nat.to_string(),
                m.options.socket_lb.to_string(),
            ]);
        }
        out.push('\n');
        out.push_str(&crate::control::client::columns(&table));
    }
    out
}

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
    if let Err(e) = crate::sys::process::raise_nofile_limit() {
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
    let sup = Supervisor::new(
        Nat::new(Nat::DAEMON_TABLE),
        SocketLb::new(settings.engine.clone()),
        metrics.is_some(),
    );
    if settings.defaults.nat != Mode::Off {
        // Open (and sweep) now: an unusable kernel path is reported at start-up.
        if let Err(e) = sup.nat().open(settings.defaults.nat).await {
            eprintln!("rproxy: {e}");
            return 1;
        }
    }
    if let Err(e) = sup.socket_lb().open(settings.defaults.socket_lb) {
        eprintln!("rproxy: {e}");
        return 1;
    }
    let initial = [
        (&settings.publish, Origin::Publish),
        (&settings.config, Origin::Config),
    ];
    let started = sup
        .change(Duration::ZERO, |_| {
            Ok(Change {
                stop: Vec::new(),
                start: initial
                    .iter()
                    .flat_map(|(mappings, origin)| {
                        mappings.iter().map(|m| Start {
                            mapping: *m,
                            socket: None,
                            origin: *origin,
                        })
                    })
                    .collect(),
            })
        })
        .await;
    if let Err(e) = started {
        eprintln!("rproxy: {e}");
        sup.stop_all(Duration::ZERO).await;
        return 1;
    }
    let listener = match control_listener(&settings.control_socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("rproxy: {e}");
            sup.stop_all(Duration::ZERO).await;
            return 1;
        }
    };
    let metrics = metrics.map(|(listener, handle)| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!("metrics at http://{addr}/metrics");
        }
        tokio::spawn(crate::prometheus::serve(
            listener,
            handle,
            sup.clone(),
            settings.metrics_per_port,
        ))
    });
    tracing::info!(
        "daemon ready: {} mappings, control socket {}",
        sup.statuses().len(),
        settings.control_socket.display()
    );
    sd_notify("READY=1");
    let port_rules: server::SharedRules =
        std::sync::Arc::new(tokio::sync::Mutex::new(settings.port_rules.clone()));
    let control = tokio::spawn(server::serve(
        listener,
        sup.clone(),
        settings.drain,
        settings.defaults,
        port_rules.clone(),
    ));
    loop {
        match signals.next().await {
            Event::Reload => reload(&sup, &settings, &port_rules).await,
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
    let tasks = sup.stop_all(settings.drain).await;
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
/// drain time), replace what changed on its listening socket, and leave every unchanged
/// mapping — and its connections — alone. Ports shims handed over whose `[[proxy_protocol]]`
/// rule changed are replaced on their socket too, so new connections get the new header.
/// All of it or, when anything fails, none of it.
async fn reload(sup: &Supervisor, settings: &Settings, port_rules: &server::SharedRules) {
    let Some(path) = &settings.config_path else {
        tracing::info!("SIGHUP: no config file to reload");
        return;
    };
    let Reread {
        mappings: wanted,
        port_rules: new_rules,
    } = match settings.reread() {
        Ok(r) => r,
        Err(errors) => {
            for e in errors {
                tracing::error!("reload refused, nothing changed: {e}");
            }
            return;
        }
    };
    let (mut added, mut removed, mut switched) = (0, 0, 0);
    // Held across the change and the swap: no shim registers in between (see SharedRules).
    let mut rules = port_rules.lock().await;
    let applied = sup
        .change(settings.drain, |current| {
            let running: BTreeSet<Mapping> = current
                .values()
                .filter(|c| c.origin == Origin::Config)
                .map(|c| c.mapping)
                .collect();
            let wanted_set: BTreeSet<Mapping> = wanted.iter().copied().collect();
            let mut stop: Vec<Key> = running.difference(&wanted_set).map(key).collect();
            let mut start: Vec<Start> = wanted_set
                .difference(&running)
                .map(|m| Start {
                    mapping: *m,
                    socket: None,
                    origin: Origin::Config,
                })
                .collect();
            (added, removed) = (start.len(), stop.len());
            for c in current.values() {
                if !matches!(c.origin, Origin::Shim(_)) || c.mapping.proto != Proto::Tcp {
                    continue;
                }
                let version = new_rules.version_for(c.mapping.listen.port());
                if version != c.mapping.options.proxy_protocol {
                    let mut mapping = c.mapping;
                    mapping.options.proxy_protocol = version;
                    stop.push(key(&c.mapping));
                    start.push(Start {
                        mapping,
                        socket: None,
                        origin: c.origin,
                    });
                    switched += 1;
                }
            }
            Ok(Change { stop, start })
        })
        .await;
    match applied {
        Ok(_) => {
            *rules = new_rules;
            tracing::info!(
                "reloaded {}: {added} started, {removed} stopped (a changed mapping is both), \
                 {switched} handed-over ports with a new PROXY protocol setting",
                path.display()
            )
        }
        Err(e) => tracing::error!("reload refused, nothing changed: {e}"),
    }
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
