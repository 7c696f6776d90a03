//! `rproxy daemon`: every mapping in one multi-thread runtime — from `--publish`, a config file,
//! `rproxy add`, and docker-mode shims handing over dockerd's ports — with a control socket,
//! reload on SIGHUP, a bounded drain on SIGTERM, and takeovers: a new daemon (`--takeover`,
//! started by this one on SIGUSR2, or on SIGHUP after an upgrade) receives every socket and
//! serves before this one stops accepting ([`crate::takeover`]).

use std::collections::BTreeSet;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::mpsc;

use crate::bpf::SocketLb;
use crate::control::handover::{self, Giver};
use crate::control::server::{self, Server};
use crate::mapping::{describe, parse_publish, Mapping, Proto};
use crate::nat::Nat;
use crate::settings::config::{Args, Reread, Settings};
use crate::settings::env::Env;
use crate::settings::options::Mode;
use crate::signals::{Event, Signals};
use crate::supervisor::{key, Change, Key, Listener, Origin, OriginKind, Start, Supervisor};
use crate::systemd::{sd_notify, Activation, FdStore};
use crate::takeover;

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
                None => format!(
                    "none ({} does not exist)",
                    crate::settings::config::DEFAULT_CONFIG
                ),
            },
        ),
        ("control socket", s.control_socket.display().to_string()),
        ("drain timeout", secs(s.drain)),
        (
            "docker ports",
            match (&s.engine, s.docker_ports) {
                (Some(e), true) => format!("from dockerd at {}", e.socket().display()),
                _ => "off".into(),
            },
        ),
        (
            "docker allow",
            match &s.docker_allow {
                None => "everyone".into(),
                list => crate::control::client::allow_cell(nets(list).as_deref()),
            },
        ),
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
        let mut table = vec![[
            "PROTO",
            "LISTEN",
            "TARGET",
            "ORIGIN",
            "NAT",
            "SOCKET_LB",
            "ALLOW",
        ]
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
                crate::control::client::allow_cell(nets(&m.options.allow).as_deref()),
            ]);
        }
        out.push('\n');
        out.push_str(&crate::control::client::columns(&table));
    }
    out
}

/// An allow-list's networks as text (None: everyone).
fn nets(allow: &Option<std::sync::Arc<crate::allow::AllowList>>) -> Option<Vec<String>> {
    allow
        .as_ref()
        .map(|a| a.nets().iter().map(ToString::to_string).collect())
}

/// Runs the daemon; returns the exit code. `activation`: the sockets systemd passed back from
/// its fd store ([`crate::systemd`]).
pub fn main(args: Args, env: Env, activation: Activation) -> i32 {
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
    runtime.block_on(run(settings, activation))
}

async fn run(settings: Settings, mut activation: Activation) -> i32 {
    for p in &activation.problems {
        tracing::warn!("systemd: {p}");
    }
    // Now, before an upgrade can replace the file.
    let program = takeover::Program::current();
    let mut signals = match Signals::install_daemon() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("rproxy: cannot handle signals: {}", describe(&e));
            return 1;
        }
    };
    // A takeover first: the sockets (metrics' too) may be the running daemon's.
    let received = match settings.takeover {
        false => None,
        true => match handover::receive(&settings.control_socket).await {
            Ok(Some(r)) => {
                tracing::info!(
                    "taking over from pid {}: {} mappings",
                    r.pid,
                    r.mappings.len()
                );
                Some(r)
            }
            Ok(None) => {
                tracing::info!(
                    "--takeover: no daemon on {}; starting afresh",
                    settings.control_socket.display()
                );
                None
            }
            Err(e) => {
                eprintln!("rproxy: takeover: {e}");
                return 1;
            }
        },
    };
    // What the previous daemon stored in systemd's fd store: its own mappings.
    let stored_before: Vec<String> = received
        .iter()
        .flat_map(|r| r.mappings.iter())
        .filter(|(h, _, _)| matches!(h.origin, OriginKind::Publish | OriginKind::Config))
        .filter_map(|(h, _, _)| parse_publish(&h.spec, Default::default()).ok())
        .flatten()
        .map(|m| crate::systemd::fd_name(&key(&m)))
        .collect();
    let mut fd_store = FdStore::new(&activation, stored_before);
    let (old, pending, handed_control, handed_metrics, handed) = match received {
        Some(r) => (
            Some(r.pid),
            Some(r.pending),
            Some(r.control),
            r.metrics,
            Some(r.mappings),
        ),
        None => (None, None, None, None, None),
    };
    // The recorder first, so every mapping's histograms are real.
    let metrics = match settings
        .metrics_addr
        .map(|addr| metrics_endpoint(addr, handed_metrics))
        .transpose()
    {
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
    if old.is_some() {
        // The running daemon's table stands until it stops accepting.
        sup.hold_nat();
    } else if settings.defaults.nat != Mode::Off {
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
    let port_rules: server::SharedRules =
        std::sync::Arc::new(tokio::sync::Mutex::new(settings.port_rules.clone()));
    let server = Server::new(
        sup.clone(),
        settings.drain,
        settings.defaults.clone(),
        settings.dockerd_defaults(),
        port_rules.clone(),
    );
    let (initial, adopt) = match (old, handed) {
        (Some(old), Some(handed)) => match takeover::plan(&settings, old, handed, &server) {
            Ok((starts, adopt)) => (starts, adopt),
            Err(e) => {
                eprintln!("rproxy: takeover: {e}");
                return 1;
            }
        },
        _ => (own_mappings(&settings, &mut activation), Vec::new()),
    };
    let started = sup
        .change(Duration::ZERO, |_| {
            Ok(Change {
                stop: Vec::new(),
                start: initial,
            })
        })
        .await;
    if let Err(e) = started {
        eprintln!("rproxy: {e}");
        sup.stop_all(Duration::ZERO).await;
        return 1;
    }
    // A socket handed over lives in the directory the first daemon made: not ours to remove.
    let listener = match handed_control {
        Some(fd) => adopt_control(fd).map(|l| (l, MadeDirs::default())),
        None => control_listener(&settings.control_socket),
    };
    let (listener, made_dirs) = match listener {
        Ok(l) => l,
        Err(e) => {
            eprintln!("rproxy: {e}");
            sup.stop_all(Duration::ZERO).await;
            return 1;
        }
    };
    let (events, mut handed_over) = mpsc::unbounded_channel();
    let giver = listener.as_fd().try_clone_to_owned().map(|control| Giver {
        control,
        metrics: metrics
            .as_ref()
            .and_then(|(l, _)| l.as_fd().try_clone_to_owned().ok()),
        events,
    });
    match giver {
        Ok(g) => server.accept_takeovers(g),
        Err(e) => tracing::warn!("no takeover possible: {}", describe(&e)),
    }
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
    for a in adopt {
        server.adopt(a.conn, a.key, a.origin, a.options);
    }
    let control = tokio::spawn(server.clone().serve(listener));
    tokio::spawn(sup.clone().log_kernel_denials(Duration::from_secs(10)));
    follow_dockerd(&settings, &sup).await;
    tracing::info!(
        "daemon ready: {} mappings, control socket {}",
        sup.statuses().len(),
        settings.control_socket.display()
    );
    // Into systemd's store before READY=1: a restart right after the start finds them.
    store_own(&mut fd_store, &sup);
    match (pending, old) {
        (Some(pending), Some(old)) => {
            // systemd: this process is the service now (NotifyAccess=all in the unit).
            sd_notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
            tokio::spawn(finish_takeover(pending, old, sup.clone()));
        }
        _ => sd_notify("READY=1"),
    }
    let handover = loop {
        tokio::select! {
            event = signals.next() => match event {
                Event::Reload => match &program {
                    Some(p) if p.replaced() => {
                        tracing::info!("SIGHUP: the program file was replaced: handing over to it");
                        successor(p);
                    }
                    _ => {
                        reload(&sup, &settings, &port_rules).await;
                        store_own(&mut fd_store, &sup);
                    }
                },
                Event::Successor => match &program {
                    Some(p) => successor(p),
                    None => tracing::warn!("SIGUSR2: cannot tell where this program is"),
                },
                Event::Stop(name) => {
                    tracing::info!(
                        "{name}: stopping; open connections get {:?}",
                        settings.drain
                    );
                    sd_notify("STOPPING=1");
                    break None;
                }
            },
            Some(h) = handed_over.recv() => break Some(h),
        }
    };
    control.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    let tasks = match &handover {
        // The control socket is the new daemon's now.
        Some(h) => {
            let tasks = sup.hand_over_all(settings.drain).await;
            tracing::info!(
                "handed every socket over to pid {}; finishing this process's connections \
                 (up to {:?})",
                h.to,
                settings.drain
            );
            tasks
        }
        None => {
            // Unless a takeover under way has made the socket another daemon's.
            if !server.handing_over() {
                let _ = std::fs::remove_file(&settings.control_socket);
                made_dirs.remove();
            }
            sup.stop_all(settings.drain).await
        }
    };
    // Shims serve their ports themselves now, or are the new daemon's.
    server.release();
    if let Some(h) = handover {
        let _ = h.released.send(());
        // Exit (a drain of nothing) only once the new daemon heard it.
        let _ = tokio::time::timeout(Duration::from_secs(1), h.told).await;
    }
    // A second stop signal cuts the drain short.
    let drained = async {
        for t in tasks {
            let _ = t.await;
        }
    };
    let second = async {
        loop {
            if let Event::Stop(name) = signals.next().await {
                return name;
            }
        }
    };
    tokio::select! {
        _ = drained => {}
        name = second => tracing::info!("{name}: exiting without waiting"),
    }
    0
}

/// The mappings of the daemon's command line and config file, on the sockets systemd kept
/// for them across a restart where it has them (see [`crate::systemd`]).
fn own_mappings(settings: &Settings, activation: &mut Activation) -> Vec<Start> {
    let own = [
        (&settings.publish, Origin::Publish),
        (&settings.config, Origin::Config),
    ];
    let mut reused = 0;
    let starts: Vec<Start> = own
        .iter()
        .flat_map(|(mappings, origin)| mappings.iter().map(move |m| (m, origin)))
        .map(|(m, origin)| {
            let listener = match activation.socket_for(&key(m)) {
                Some(fd) => match takeover::checked(m, fd) {
                    Ok(socket) => {
                        reused += 1;
                        Listener::Socket(socket)
                    }
                    // Dropped: systemd's copy stays until the store is synced, and binding
                    // anew fails while it does; a start that fails says so.
                    Err(e) => {
                        tracing::warn!("fd store: {e}; binding anew");
                        Listener::Bind
                    }
                },
                None => Listener::Bind,
            };
            Start {
                mapping: m.clone(),
                listener,
                origin: origin.clone(),
            }
        })
        .collect();
    if reused > 0 || activation.unused() > 0 {
        tracing::info!(
            "fd store: serving {reused} mappings on the sockets systemd kept; {} kept sockets \
             are no longer wanted",
            activation.unused()
        );
    }
    starts
}

/// Makes systemd's fd store hold the listening sockets of the daemon's own mappings, and no
/// others (a no-op outside systemd).
fn store_own(store: &mut FdStore, sup: &Supervisor) {
    let own = sup.listeners(|o| matches!(o, Origin::Publish | Origin::Config));
    tokio::task::block_in_place(|| store.sync(own));
}

/// `--docker-ports`: follows dockerd's containers on a thread of its own, and waits a moment
/// for its first read of them, so that the daemon is ready (or a takeover done) only once it
/// serves what dockerd publishes. dockerd not answering delays nothing further.
async fn follow_dockerd(settings: &Settings, sup: &Supervisor) {
    const FIRST_READ: Duration = Duration::from_secs(10);
    let Some(engine) = settings.engine.clone() else {
        return;
    };
    // dockerd's ports get docker_allow unless their labels say otherwise.
    let follower = crate::follower::Follower::new(
        engine,
        sup.clone(),
        tokio::runtime::Handle::current(),
        settings.dockerd_defaults(),
        settings.drain,
        settings.docker_ports,
    );
    match follower.spawn() {
        Ok(first) => {
            if tokio::time::timeout(FIRST_READ, first).await.is_err() {
                tracing::warn!("docker ports: dockerd's containers not read within {FIRST_READ:?}");
            }
        }
        Err(e) => tracing::error!(
            "docker ports: cannot start following dockerd: {}",
            describe(&e)
        ),
    }
}

/// After a takeover: tells the old daemon we serve, installs the NAT rules once it stopped
/// accepting (its table is gone then), and says when it has finished draining.
async fn finish_takeover(conn: handover::Pending, old: u32, sup: Supervisor) {
    match conn.serving().await {
        Ok(mut stream) => {
            tracing::info!("pid {old} stopped accepting; everything is served here");
            sup.release_nat().await;
            let mut byte = [0u8; 1];
            let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut byte).await;
            tracing::info!("pid {old} finished its connections and exited");
        }
        Err(e) => {
            tracing::warn!("takeover: {e}");
            sup.release_nat().await;
        }
    }
}

/// Starts this program anew to take over from this process.
fn successor(program: &takeover::Program) {
    match program.start_successor() {
        Ok(pid) => tracing::info!("started pid {pid} to take over"),
        Err(e) => tracing::error!("no takeover: {e}"),
    }
}

/// The control socket's listener a previous daemon handed over.
fn adopt_control(fd: OwnedFd) -> Result<UnixListener, String> {
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener
        .set_nonblocking(true)
        .and_then(|()| UnixListener::from_std(listener))
        .map_err(|e| format!("the control socket handed over: {}", describe(&e)))
}

/// Installs the metrics recorder and binds its endpoint, or takes the listener a previous
/// daemon `handed` over when it is on the same address.
fn metrics_endpoint(
    addr: std::net::SocketAddr,
    handed: Option<OwnedFd>,
) -> Result<
    (
        tokio::net::TcpListener,
        metrics_exporter_prometheus::PrometheusHandle,
    ),
    String,
> {
    let handed = handed
        .map(std::net::TcpListener::from)
        .filter(|l| l.local_addr().is_ok_and(|a| a == addr));
    let listener = match handed {
        Some(l) => Ok(l),
        None => std::net::TcpListener::bind(addr),
    }
    .and_then(|l| l.set_nonblocking(true).map(|()| l))
    .and_then(tokio::net::TcpListener::from_std)
    .map_err(|e| format!("metrics: cannot listen on {addr}: {}", describe(&e)))?;
    let handle = crate::prometheus::install()?;
    Ok((listener, handle))
}

/// Binds the control socket: mode 0600, its directory created; a stale socket file left by a
/// crash is replaced, a live daemon is not. Also returns the directories it made, for the
/// daemon to remove at exit: without systemd's RuntimeDirectory, /run/rproxy would outlive it.
fn control_listener(path: &Path) -> Result<(UnixListener, MadeDirs), String> {
    let ctx = |e: std::io::Error| format!("control socket {}: {}", path.display(), describe(&e));
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(format!(
            "another rproxy daemon is running on {} (`rproxy daemon --takeover` takes over \
             from it)",
            path.display()
        ));
    }
    let made = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => MadeDirs::create(dir).map_err(ctx)?,
        None => MadeDirs::default(),
    };
    let bound = std::fs::remove_file(path)
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Ok(()),
            _ => Err(e),
        })
        .and_then(|()| UnixListener::bind(path))
        .and_then(|l| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map(|()| l)
        });
    match bound {
        Ok(listener) => Ok((listener, made)),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            made.remove();
            Err(ctx(e))
        }
    }
}

/// The directories [`control_listener`] created for the socket, innermost first.
#[derive(Default)]
struct MadeDirs(Vec<std::path::PathBuf>);

impl MadeDirs {
    /// Creates `dir` and whichever of its parents are missing.
    fn create(dir: &Path) -> std::io::Result<MadeDirs> {
        let missing = dir
            .ancestors()
            .take_while(|d| !d.as_os_str().is_empty() && !d.exists());
        let made = MadeDirs(missing.map(Path::to_path_buf).collect());
        std::fs::create_dir_all(dir)?;
        Ok(made)
    }

    /// Removes them innermost first, stopping at the first that is not empty (someone else
    /// put a file there: it is theirs now) or is gone.
    fn remove(&self) {
        for dir in &self.0 {
            if std::fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }
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
                .map(|c| c.mapping.clone())
                .collect();
            let wanted_set: BTreeSet<Mapping> = wanted.iter().cloned().collect();
            let mut stop: Vec<Key> = running.difference(&wanted_set).map(key).collect();
            let mut start: Vec<Start> = wanted_set
                .difference(&running)
                .map(|m| Start {
                    mapping: m.clone(),
                    listener: Listener::Bind,
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
                    let mut mapping = c.mapping.clone();
                    mapping.options.proxy_protocol = version;
                    stop.push(key(&c.mapping));
                    start.push(Start {
                        mapping,
                        listener: Listener::Bind,
                        origin: c.origin.clone(),
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
