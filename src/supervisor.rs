//! The running mappings of a process: the daemon's many, or a docker-mode process's one.
//!
//! Every change — start, stop, `rproxy add/rm`, a shim's registration, a reload — is a
//! [`Change`] applied as a whole or not at all, one at a time: a change sees the running set,
//! prepares everything that can fail (binding, taking over a listening socket, kernel NAT),
//! and only then swaps the set. A mapping whose target or options change keeps its listening
//! socket (the new one serves a copy of it), so a reload refuses no connection. The running
//! set's lock is held only to read or swap it, never across a kernel call or an await; the
//! kernel path answers from its own thread.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::Socket;
use tokio::task::JoinHandle;

use crate::bpf::{self, SocketLb};
use crate::frontend::{self, Frontend};
use crate::mapping::{Mapping, Proto};
use crate::nat::{Nat, Path};
use crate::options::Mode;
use crate::stats::{Stats, Timings};
use crate::stop::{Stop, StopHandle};

/// Where a mapping came from; decides who may remove it (reload only touches `Config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `--publish` on the daemon's command line.
    Publish,
    /// The config file (reloaded on SIGHUP).
    Config,
    /// `rproxy add`.
    Control,
    /// A docker-mode shim's registration; removed when its connection closes.
    Shim(u64),
    /// A docker-mode process serving its own port.
    Docker,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Publish => "publish",
            Origin::Config => "config",
            Origin::Control => "add",
            Origin::Shim(_) => "shim",
            Origin::Docker => "docker",
        })
    }
}

/// What identifies a running mapping: its protocol and listen address.
pub type Key = (Proto, SocketAddr);

/// The key of `m`.
pub fn key(m: &Mapping) -> Key {
    (m.proto, m.listen)
}

/// A mapping to start, as part of a [`Change`].
pub struct Start {
    /// What to serve.
    pub mapping: Mapping,
    /// Its listening socket when handed over (a shim's, fd 4); None: bound here, or taken
    /// over from the mapping this start replaces.
    pub socket: Option<Socket>,
    /// Who asked.
    pub origin: Origin,
}

/// A change to the running set: mappings to stop and mappings to start. A start whose key is
/// stopped in the same change replaces that mapping on its listening socket.
#[derive(Default)]
pub struct Change {
    /// Keys to stop.
    pub stop: Vec<Key>,
    /// Mappings to start.
    pub start: Vec<Start>,
}

/// A running mapping as seen by a [`Change`]'s planner.
#[derive(Debug, Clone, Copy)]
pub struct Current {
    /// The mapping, with its real listen address.
    pub mapping: Mapping,
    /// Where it came from.
    pub origin: Origin,
}

/// A running mapping as reported by `ls` and the metrics.
pub struct Status {
    /// The mapping.
    pub mapping: Mapping,
    /// Where it came from.
    pub origin: Origin,
    /// Its NAT path, when its NAT mode is not off.
    pub path: Option<Path>,
    /// Its host clients' path, when its socket-hook mode is not off.
    pub socket_lb: Option<bpf::Path>,
    /// Its counters.
    pub stats: Arc<Stats>,
    /// False once its serving task ended (its socket failed).
    pub serving: bool,
}

struct Running {
    mapping: Mapping,
    origin: Origin,
    path: Option<Path>,
    socket_lb: Option<bpf::Path>,
    stats: Arc<Stats>,
    stop: StopHandle,
    task: JoinHandle<()>,
    /// A copy of the listening socket, which a replacing mapping takes over.
    socket: Socket,
}

/// The running mappings; cheap to clone (shared).
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    running: Mutex<BTreeMap<Key, Running>>,
    /// Held by one change at a time, across its awaits: changes never interleave.
    changes: tokio::sync::Mutex<()>,
    nat: Nat,
    socket_lb: SocketLb,
    /// Whether TCP mappings record their duration histograms (when metrics are served).
    histograms: bool,
}

/// A start that has everything but its task.
struct Prepared {
    frontend: Frontend,
    mapping: Mapping,
    origin: Origin,
    path: Option<Path>,
    /// The rules are the replaced mapping's, kept: it must not remove them.
    inherited_rules: bool,
    socket_lb: Option<bpf::Path>,
    /// The mapping this one replaces on the same address, whose hook entry it overwrote.
    replaces: Option<(Mapping, Option<bpf::Path>)>,
    socket: Socket,
}

/// What a kernel path (`what`, in `mode`) does for a mapping whose backend gets a PROXY
/// protocol header: nothing, since its clients would reach the backend without the header.
/// None when the mode is off; the reason, said once in the log, when on; an error when
/// required.
fn listener_only(m: &Mapping, mode: Mode, what: &str) -> Result<Option<String>, String> {
    match mode {
        Mode::Off => Ok(None),
        Mode::Require => Err(format!(
            "{what} required for {m}, but its backend gets a PROXY protocol header, which only \
             the listener writes"
        )),
        Mode::On => {
            let why =
                format!("the listener writes the PROXY protocol header, which {what} would bypass");
            tracing::info!("{m}: {what} not used: {why}");
            Ok(Some(why))
        }
    }
}

impl Supervisor {
    /// A supervisor with nothing running, whose mappings get kernel NAT from `nat`, socket
    /// hooks from `socket_lb`, and record duration histograms when `histograms` (metrics are
    /// served).
    pub fn new(nat: Nat, socket_lb: SocketLb, histograms: bool) -> Supervisor {
        Supervisor {
            inner: Arc::new(Inner {
                running: Mutex::default(),
                changes: tokio::sync::Mutex::new(()),
                nat,
                socket_lb,
                histograms,
            }),
        }
    }

    /// The kernel path.
    pub fn nat(&self) -> &Nat {
        &self.inner.nat
    }

    /// The socket hooks.
    pub fn socket_lb(&self) -> &SocketLb {
        &self.inner.socket_lb
    }

    fn running(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, Running>> {
        self.inner.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies the change `plan` makes of the running set, as a whole or not at all; stopped
    /// mappings' connections get `drain`. No other change runs in between. Returns the
    /// started mappings with their real listen addresses. Must run inside the runtime.
    pub async fn change(
        &self,
        drain: Duration,
        plan: impl FnOnce(&BTreeMap<Key, Current>) -> Result<Change, String>,
    ) -> Result<Vec<Mapping>, String> {
        let _one_at_a_time = self.inner.changes.lock().await;
        let current: BTreeMap<Key, Current> = self
            .running()
            .iter()
            .map(|(k, r)| {
                let (mapping, origin) = (r.mapping, r.origin);
                (*k, Current { mapping, origin })
            })
            .collect();
        let change = plan(&current)?;
        let stopping: BTreeSet<Key> = change.stop.iter().copied().collect();
        let mut starting = BTreeSet::new();
        for s in &change.start {
            let k = key(&s.mapping);
            if s.mapping.listen.port() == 0 {
                continue;
            }
            if let Some(c) = current.get(&k).filter(|_| !stopping.contains(&k)) {
                return Err(format!(
                    "{} {} is already mapped to {} ({})",
                    k.0, k.1, c.mapping.target, c.origin
                ));
            }
            if !starting.insert(k) {
                return Err(format!("{} {} is mapped twice", k.0, k.1));
            }
        }
        let mut prepared = Vec::with_capacity(change.start.len());
        for s in change.start {
            match self.prepare(s, &current, &stopping).await {
                Ok(p) => prepared.push(p),
                Err(e) => {
                    for p in prepared {
                        self.undo(&p);
                    }
                    return Err(e);
                }
            }
        }
        Ok(self.commit(change.stop, prepared, drain))
    }

    /// Everything a start needs that can fail: its socket, registered with the runtime, and
    /// its NAT path.
    async fn prepare(
        &self,
        s: Start,
        current: &BTreeMap<Key, Current>,
        stopping: &BTreeSet<Key>,
    ) -> Result<Prepared, String> {
        let k = key(&s.mapping);
        let replaced = stopping.contains(&k).then(|| self.listener_of(&k));
        let socket = match (s.socket, replaced) {
            (Some(socket), _) => socket,
            (None, Some(copy)) => copy?,
            (None, None) => frontend::bind(&s.mapping)?,
        };
        let copy = socket
            .try_clone()
            .map_err(|e| format!("cannot keep the listening socket: {e}"))?;
        let frontend = Frontend::new(s.mapping, socket)?;
        let mapping = frontend.mapping();
        if key(&mapping) != k {
            // Port 0, now resolved: the kernel chose a free port, but not necessarily one we
            // do not already serve through a socket someone handed over.
            if current.contains_key(&key(&mapping)) {
                return Err(format!(
                    "{} {} is already mapped",
                    mapping.proto, mapping.listen
                ));
            }
        }
        // With a PROXY protocol header, the listener serves every client: neither DNAT nor
        // the hooks could write the header.
        let header = mapping.options.proxy_protocol.is_on();
        let listener_only = match header {
            true => Some((
                listener_only(&mapping, mapping.options.nat, "kernel NAT")?,
                listener_only(&mapping, mapping.options.socket_lb, "socket hooks")?,
            )),
            false => None,
        };
        if header
            && matches!(s.origin, Origin::Shim(_) | Origin::Docker)
            && self.inner.nat.dockerd_translates(&mapping).await
        {
            tracing::warn!(
                "{mapping}: dockerd's iptables rules DNAT this port, so its remote clients reach \
                 {} without the PROXY protocol header (a backend that expects one refuses \
                 them); run dockerd with --iptables=false to send every client through the proxy",
                mapping.target
            );
        }
        // Replaced by the same rules (only the NAT mode or other options changed): keep them.
        let old = current.get(&k).filter(|_| stopping.contains(&k));
        let inherit = !header
            && old.is_some_and(|o| {
                o.mapping.spec() == mapping.spec()
                    && mapping.options.nat != Mode::Off
                    && self.path_of(&k) == Some(Path::Kernel)
            });
        let path = match (inherit, &listener_only) {
            (_, Some((nat, _))) => nat.clone().map(Path::Userland),
            (true, None) => Some(Path::Kernel),
            // Rules only once the listener is up: it serves what DNAT leaves to it.
            (false, None) => {
                self.inner
                    .nat
                    .install(
                        &mapping,
                        matches!(s.origin, Origin::Shim(_) | Origin::Docker),
                    )
                    .await?
            }
        };
        let replaces = old.map(|o| (o.mapping, self.socket_path_of(&k)));
        let mut prepared = Prepared {
            frontend,
            mapping,
            origin: s.origin,
            path,
            inherited_rules: inherit,
            socket_lb: None,
            replaces,
            socket: copy,
        };
        if let Some((_, hooks)) = listener_only {
            prepared.socket_lb = hooks.map(bpf::Path::Userland);
            return Ok(prepared);
        }
        match self.inner.socket_lb.publish(&mapping) {
            Ok(p) => prepared.socket_lb = p,
            Err(e) => {
                self.undo(&prepared);
                return Err(e);
            }
        }
        Ok(prepared)
    }

    /// Takes back what preparing `p` did to the kernel: its NAT rules, its hook entry (the
    /// replaced mapping's written back).
    fn undo(&self, p: &Prepared) {
        if !p.inherited_rules {
            self.inner.nat.remove(&p.mapping, p.path.as_ref());
        }
        self.inner
            .socket_lb
            .withdraw(&p.mapping, p.socket_lb.as_ref(), true);
        if let Some((old, old_path)) = &p.replaces {
            self.inner.socket_lb.restore(old, old_path.as_ref());
        }
    }

    fn socket_path_of(&self, k: &Key) -> Option<bpf::Path> {
        self.running().get(k).and_then(|r| r.socket_lb.clone())
    }

    /// A copy of the running mapping's listening socket.
    fn listener_of(&self, k: &Key) -> Result<Socket, String> {
        let running = self.running();
        let r = running
            .get(k)
            .ok_or_else(|| format!("{} {} is not running", k.0, k.1))?;
        r.socket
            .try_clone()
            .map_err(|e| format!("cannot take over {} {}: {e}", k.0, k.1))
    }

    fn path_of(&self, k: &Key) -> Option<Path> {
        let r = self.running().get(k).map(|r| (r.mapping, r.path.clone()))?;
        self.inner.nat.path_now(&r.0, r.1)
    }

    /// Swaps the running set: nothing here can fail.
    fn commit(&self, stop: Vec<Key>, prepared: Vec<Prepared>, drain: Duration) -> Vec<Mapping> {
        let kept_rules: BTreeSet<Key> = prepared
            .iter()
            .filter(|p| p.inherited_rules)
            .map(|p| key(&p.mapping))
            .collect();
        // Hook entries the new mappings wrote over the ones they replace.
        let rewritten: BTreeSet<Key> = prepared
            .iter()
            .filter(|p| p.socket_lb == Some(bpf::Path::Socket))
            .map(|p| key(&p.mapping))
            .collect();
        let mut stopped = Vec::new();
        let mut started = Vec::new();
        let (mut logged_start, mut logged_stop) = (Vec::new(), Vec::new());
        {
            let mut running = self.running();
            for k in &stop {
                if let Some(r) = running.remove(k) {
                    stopped.push(r);
                }
            }
            for p in prepared {
                let timings = match p.mapping.proto {
                    Proto::Tcp if self.inner.histograms => Timings::enabled(),
                    _ => Timings::default(),
                };
                let stats = Arc::new(Stats::with_timings(timings));
                let (handle, stop) = Stop::new();
                let task = tokio::spawn(p.frontend.serve(stats.clone(), stop));
                started.push(p.mapping);
                logged_start.push((p.mapping, p.origin));
                running.insert(
                    key(&p.mapping),
                    Running {
                        mapping: p.mapping,
                        origin: p.origin,
                        path: p.path,
                        socket_lb: p.socket_lb,
                        stats,
                        stop: handle,
                        task,
                        socket: p.socket,
                    },
                );
            }
        }
        for r in stopped {
            logged_stop.push((r.mapping, r.origin));
            if !kept_rules.contains(&key(&r.mapping)) {
                // New connections stop being translated now; translated ones keep their
                // conntrack entries.
                self.inner.nat.remove(&r.mapping, r.path.as_ref());
            }
            let entry = !rewritten.contains(&key(&r.mapping));
            self.inner
                .socket_lb
                .withdraw(&r.mapping, r.socket_lb.as_ref(), entry);
            r.stop.stop(drain);
            // The task finishes by itself once drained; nothing waits on it.
        }
        log_runs("serving", &logged_start);
        log_runs("stopped", &logged_stop);
        started
    }

    /// Starts one mapping (see [`Supervisor::change`]).
    pub async fn start(
        &self,
        mapping: Mapping,
        socket: Option<Socket>,
        origin: Origin,
    ) -> Result<Mapping, String> {
        let start = Start {
            mapping,
            socket,
            origin,
        };
        let started = self
            .change(Duration::ZERO, |_| {
                Ok(Change {
                    stop: Vec::new(),
                    start: vec![start],
                })
            })
            .await?;
        started
            .into_iter()
            .next()
            .ok_or_else(|| "nothing started".into())
    }

    /// Stops everything: listeners close now; returns the tasks, which end once their
    /// connections drained (or `drain` passed). Then deletes the NAT table.
    pub async fn stop_all(&self, drain: Duration) -> Vec<JoinHandle<()>> {
        let _one_at_a_time = self.inner.changes.lock().await;
        let all = std::mem::take(&mut *self.running());
        self.inner.nat.close().await;
        self.inner.socket_lb.close();
        all.into_values()
            .map(|r| {
                r.stop.stop(drain);
                r.task
            })
            .collect()
    }

    /// Every mapping with its counters, its NAT path and whether it still serves.
    pub fn statuses(&self) -> Vec<Status> {
        self.running()
            .values()
            .map(|r| Status {
                mapping: r.mapping,
                origin: r.origin,
                path: self.inner.nat.path_now(&r.mapping, r.path.clone()),
                socket_lb: r.socket_lb.clone(),
                stats: r.stats.clone(),
                serving: !r.task.is_finished(),
            })
            .collect()
    }

    /// Connections each mapping's kernel rules translated, by spec; asks the kernel only when
    /// some mapping has rules.
    pub async fn kernel_connections(
        &self,
        statuses: &[Status],
    ) -> std::collections::HashMap<String, u64> {
        if statuses.iter().any(|s| s.path == Some(Path::Kernel)) {
            self.inner.nat.connections().await
        } else {
            Default::default()
        }
    }
}

/// Logs what a change did, a line per published range: a 1,000-port range is one line, not a
/// thousand that the log's rate limit would cut short (taking "daemon ready" with them).
fn log_runs(verb: &str, done: &[(Mapping, Origin)]) {
    let mut by_origin: std::collections::BTreeMap<String, Vec<Mapping>> = Default::default();
    for (m, origin) in done {
        by_origin.entry(origin.to_string()).or_default().push(*m);
    }
    for (origin, mappings) in by_origin {
        for run in crate::mapping::runs(mappings, |m| m) {
            match run.len() {
                1 => tracing::info!("{verb} {} ({origin})", run[0]),
                n => tracing::info!(
                    "{verb} {} ({origin}, {n} ports)",
                    crate::mapping::describe_run(&run)
                ),
            }
        }
    }
}
