//! The running mappings of a process: the daemon's many, or a docker-mode process's one.
//!
//! Every change — start, stop, `rproxy add/rm`, a shim's registration, a reload — is a
//! [`Change`] applied as a whole or not at all, one at a time: a change sees the running set,
//! prepares everything that can fail (binding, taking over a listening socket, kernel NAT),
//! and only then swaps the set. A mapping whose target or options change keeps its listening
//! socket (the new one serves a copy of it), so a reload refuses no connection. The running
//! set's lock is held only to read or swap it, never across a kernel call or an await; the
//! kernel path answers from its own thread.
//!
//! A takeover (a new daemon taking this one's sockets) freezes the set: the snapshot handed
//! over stays the truth until the new process serves, and every change asked meanwhile is
//! refused with [`Refusal::HandingOver`] (shims and `rproxy add` try again, and reach the new one).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use socket2::Socket;
use tokio::task::JoinHandle;

use crate::bpf::{self, SocketLb};
use crate::control::Refusal;
use crate::frontend::{self, Frontend};
use crate::mapping::{Mapping, Proto};
use crate::nat::{Nat, Path};
use crate::settings::options::Mode;
use crate::stats::{Stats, Timings};
use crate::stop::{Stop, StopHandle};

/// Where a mapping came from; decides who may remove it (reload only touches `Config`).
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// A published port of the named container, read from dockerd's API (`--docker-ports`).
    Container(Arc<str>),
}

impl Origin {
    /// Whether dockerd published the port: its own rules may translate it, and only dockerd
    /// may take it away.
    pub fn is_dockerds(&self) -> bool {
        matches!(
            self,
            Origin::Shim(_) | Origin::Docker | Origin::Container(_)
        )
    }

    /// The container whose port it is, if it is one the daemon follows.
    pub fn container(&self) -> Option<&str> {
        match self {
            Origin::Container(name) => Some(name),
            _ => None,
        }
    }
}

impl Origin {
    /// What kind of origin it is, as a takeover hands it over and `ls` shows it.
    pub fn kind(&self) -> OriginKind {
        match self {
            Origin::Publish => OriginKind::Publish,
            Origin::Config => OriginKind::Config,
            Origin::Control => OriginKind::Control,
            Origin::Shim(_) => OriginKind::Shim,
            Origin::Docker | Origin::Container(_) => OriginKind::Docker,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.kind().fmt(f)
    }
}

/// An [`Origin`] without what only this process knows (a shim's registration number; a
/// container's name travels beside it): what a takeover hands over, spelled on the wire as
/// daemons of every version spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OriginKind {
    /// `--publish`.
    Publish,
    /// The config file.
    Config,
    /// `rproxy add`.
    #[serde(rename = "add")]
    Control,
    /// A docker-mode shim's registration.
    Shim,
    /// dockerd's: a docker-mode process's own port, or a followed container's.
    Docker,
    /// One a later version added: the daemon that has it keeps it, and drains it.
    #[serde(other)]
    Unknown,
}

impl fmt::Display for OriginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OriginKind::Publish => "publish",
            OriginKind::Config => "config",
            OriginKind::Control => "add",
            OriginKind::Shim => "shim",
            OriginKind::Docker => "docker",
            OriginKind::Unknown => "unknown",
        })
    }
}

/// The NAT path of a mapping started while the previous daemon's rules still stand.
const NAT_HELD: &str = "until the previous daemon's rules are gone";

/// What identifies a running mapping: its protocol and listen address.
pub type Key = (Proto, SocketAddr);

/// The key of `m`.
pub fn key(m: &Mapping) -> Key {
    (m.proto, m.listen)
}

/// Where a started mapping's listening socket comes from.
pub enum Listener {
    /// Bound here, or taken over from the mapping this start replaces on the same address.
    Bind,
    /// Handed over (dockerd's fd 4, a shim's, a previous daemon's) or bound by the caller.
    Socket(Socket),
    /// None: the address is dockerd's, and the kernel paths (the socket hooks, dockerd's
    /// DNAT) serve its clients. A start that replaces such a mapping has none either.
    None,
}

/// A mapping to start, as part of a [`Change`].
pub struct Start {
    /// What to serve.
    pub mapping: Mapping,
    /// Its listening socket.
    pub listener: Listener,
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
#[derive(Debug, Clone)]
pub struct Current {
    /// The mapping, with its real listen address.
    pub mapping: Mapping,
    /// Where it came from.
    pub origin: Origin,
    /// Whether it has a listening socket (see [`Listener::None`]).
    pub listener: bool,
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
    /// Whether it has a listening socket (see [`Listener::None`]).
    pub listener: bool,
}

/// A running mapping with a copy of its listening socket, for a takeover.
pub struct Held {
    /// The mapping.
    pub mapping: Mapping,
    /// Where it came from.
    pub origin: Origin,
    /// A copy of its listening socket.
    pub socket: Socket,
}

struct Running {
    mapping: Mapping,
    origin: Origin,
    path: Option<Path>,
    /// Started with its NAT held (see [`Supervisor::hold_nat`]): rules still to install.
    nat_held: bool,
    /// Its allow-list's filter waits for the same (see [`Filter::Held`]).
    filter_held: bool,
    socket_lb: Option<bpf::Path>,
    stats: Arc<Stats>,
    stop: StopHandle,
    /// Its listener's task; None without a listener.
    task: Option<JoinHandle<()>>,
    /// A copy of the listening socket, which a replacing mapping takes over.
    socket: Option<Socket>,
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
    /// A takeover is under way: changes are refused (set and read under `changes`).
    frozen: AtomicBool,
    /// New mappings start without their NAT rules (see [`Supervisor::hold_nat`]).
    nat_held: AtomicBool,
    /// Everything was stopped: the process is ending, changes are refused.
    stopped: AtomicBool,
}

/// A start that has everything but its task.
struct Prepared {
    frontend: Option<Frontend>,
    mapping: Mapping,
    origin: Origin,
    path: Option<Path>,
    nat_held: bool,
    /// The rules are the replaced mapping's, kept: it must not remove them.
    inherited_rules: bool,
    /// Its allow-list's filter in the kernel.
    filter: Filter,
    socket_lb: Option<bpf::Path>,
    /// The mapping this one replaces on the same address, whose hook entry it overwrote.
    replaces: Option<(Mapping, Option<bpf::Path>)>,
    socket: Option<Socket>,
}

/// Where a mapping's allow-list stands in the kernel (its filter ahead of any DNAT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Filter {
    /// No list, so no filter.
    None,
    /// Installed.
    Installed,
    /// To install once a previous daemon's table is gone (see [`Supervisor::hold_nat`]).
    Held,
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
                frozen: AtomicBool::new(false),
                nat_held: AtomicBool::new(false),
                stopped: AtomicBool::new(false),
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
    ) -> Result<Vec<Mapping>, Refusal> {
        let _one_at_a_time = self.inner.changes.lock().await;
        if self.inner.frozen.load(Ordering::Relaxed) {
            return Err(Refusal::HandingOver);
        }
        if self.is_stopped() {
            return Err(Refusal::Other("the daemon is stopping".into()));
        }
        let current: BTreeMap<Key, Current> = self
            .running()
            .iter()
            .map(|(k, r)| {
                let current = Current {
                    mapping: r.mapping.clone(),
                    origin: r.origin.clone(),
                    listener: r.socket.is_some(),
                };
                (*k, current)
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
                return Err(Refusal::Other(format!(
                    "{} {} is already mapped to {} ({})",
                    k.0, k.1, c.mapping.target, c.origin
                )));
            }
            if !starting.insert(k) {
                return Err(Refusal::Other(format!("{} {} is mapped twice", k.0, k.1)));
            }
        }
        let mut prepared = Vec::with_capacity(change.start.len());
        for s in change.start {
            match self.prepare(s, &current, &stopping).await {
                Ok(p) => prepared.push(p),
                Err(e) => {
                    for p in prepared {
                        self.undo(&p).await;
                    }
                    return Err(Refusal::Other(e));
                }
            }
        }
        // The kernel's filters of stopped mappings that no start takes over (a start with
        // the same spec wrote its own list over theirs already).
        let refiltered: BTreeSet<String> = prepared
            .iter()
            .filter(|p| p.filter != Filter::None)
            .map(|p| p.mapping.spec())
            .collect();
        let unfilter: Vec<Mapping> = change
            .stop
            .iter()
            .filter_map(|k| current.get(k))
            .filter(|c| c.mapping.options.allow.is_some())
            .filter(|c| !refiltered.contains(&c.mapping.spec()))
            .map(|c| c.mapping.clone())
            .collect();
        let started = self.commit(change.stop, prepared, drain);
        for m in unfilter {
            if let Err(e) = self.inner.nat.set_allow(&m, None).await {
                tracing::warn!("{m}: allow-list filter not removed: {e}");
            }
        }
        Ok(started)
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
        let socket = match s.listener {
            Listener::Socket(socket) => Some(socket),
            Listener::None => None,
            Listener::Bind if stopping.contains(&k) => Some(self.listener_of(&k)?),
            Listener::Bind => Some(frontend::bind(&s.mapping)?),
        };
        let (frontend, copy) = match socket {
            Some(socket) => {
                let copy = socket
                    .try_clone()
                    .map_err(|e| format!("cannot keep the listening socket: {e}"))?;
                (Some(Frontend::new(s.mapping.clone(), socket)?), Some(copy))
            }
            None => (None, None),
        };
        let mapping = frontend
            .as_ref()
            .map_or(s.mapping.clone(), Frontend::mapping);
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
        if header && s.origin.is_dockerds() && self.inner.nat.dockerd_translates(&mapping).await {
            tracing::warn!(
                "{mapping}: dockerd's iptables rules DNAT this port, so its remote clients reach \
                 {} without the PROXY protocol header (a backend that expects one refuses \
                 them); run dockerd with --iptables=false to send every client through the proxy",
                mapping.target
            );
        }
        // The allow-list's filter before any DNAT rule: no remote client reaches the target
        // unjudged. Refused by the kernel, the mapping does not start: the listener alone
        // could not hold the list against dockerd's DNAT.
        let filter = match &mapping.options.allow {
            None => Filter::None,
            Some(_) if self.inner.nat_held.load(Ordering::Relaxed) => Filter::Held,
            Some(list) => {
                self.inner
                    .nat
                    .set_allow(&mapping, Some(list))
                    .await
                    .map_err(|e| format!("{mapping}: allow-list filter: {e}"))?;
                Filter::Installed
            }
        };
        // Replaced by the same rules (only the NAT mode or other options changed): keep them.
        let old = current.get(&k).filter(|_| stopping.contains(&k));
        let inherit = !header
            && old.is_some_and(|o| {
                o.mapping.spec() == mapping.spec()
                    && mapping.options.nat != Mode::Off
                    && self.path_of(&k) == Some(Path::Kernel)
            });
        let nat_held = !inherit
            && listener_only.is_none()
            && mapping.options.nat != Mode::Off
            && self.inner.nat_held.load(Ordering::Relaxed);
        let path = match (inherit, &listener_only) {
            (_, Some((nat, _))) => nat.clone().map(Path::Userland),
            (true, None) => Some(Path::Kernel),
            (false, None) if nat_held => Some(Path::Userland(NAT_HELD.into())),
            // Rules only once the listener is up: it serves what DNAT leaves to it.
            (false, None) => {
                self.inner
                    .nat
                    .install(&mapping, s.origin.is_dockerds())
                    .await?
            }
        };
        let replaces = old.map(|o| (o.mapping.clone(), self.socket_path_of(&k)));
        let mut prepared = Prepared {
            frontend,
            mapping: mapping.clone(),
            origin: s.origin,
            path,
            nat_held,
            inherited_rules: inherit,
            filter,
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
                self.undo(&prepared).await;
                return Err(e);
            }
        }
        Ok(prepared)
    }

    /// Takes back what preparing `p` did to the kernel: its NAT rules, its allow-list's
    /// filter and its hook entry (the replaced mapping's written back).
    async fn undo(&self, p: &Prepared) {
        if !p.inherited_rules {
            self.inner.nat.remove(&p.mapping, p.path.as_ref());
        }
        if p.filter == Filter::Installed {
            // The replaced mapping's list, when it had the same spec (so the same filter).
            let old = p
                .replaces
                .as_ref()
                .map(|(old, _)| old)
                .filter(|old| old.spec() == p.mapping.spec());
            let (m, list) = match old {
                Some(old) => (old, old.options.allow.as_deref()),
                None => (&p.mapping, None),
            };
            if let Err(e) = self.inner.nat.set_allow(m, list).await {
                tracing::warn!("{m}: allow-list filter not restored: {e}");
            }
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

    /// Copies of the listening sockets of the running mappings whose origin `which` accepts
    /// (the daemon's own, for systemd's fd store); mappings without one are left out.
    pub fn listeners(&self, which: impl Fn(&Origin) -> bool) -> Vec<(Key, OwnedFd)> {
        self.running()
            .iter()
            .filter(|(_, r)| which(&r.origin))
            .filter_map(|(k, r)| {
                let copy = r.socket.as_ref()?.try_clone().ok()?;
                Some((*k, OwnedFd::from(copy)))
            })
            .collect()
    }

    /// A copy of the running mapping's listening socket.
    fn listener_of(&self, k: &Key) -> Result<Socket, String> {
        let running = self.running();
        let r = running
            .get(k)
            .ok_or_else(|| format!("{} {} is not running", k.0, k.1))?;
        r.socket
            .as_ref()
            .ok_or_else(|| format!("{} {} has no listening socket to take over", k.0, k.1))?
            .try_clone()
            .map_err(|e| format!("cannot take over {} {}: {e}", k.0, k.1))
    }

    fn path_of(&self, k: &Key) -> Option<Path> {
        let r = self
            .running()
            .get(k)
            .map(|r| (r.mapping.clone(), r.path.clone()))?;
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
                let task = p
                    .frontend
                    .map(|f| tokio::spawn(f.serve(stats.clone(), stop)));
                started.push(p.mapping.clone());
                logged_start.push((p.mapping.clone(), p.origin.clone()));
                running.insert(
                    key(&p.mapping),
                    Running {
                        mapping: p.mapping,
                        origin: p.origin,
                        path: p.path,
                        nat_held: p.nat_held,
                        filter_held: p.filter == Filter::Held,
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
            logged_stop.push((r.mapping.clone(), r.origin.clone()));
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
        listener: Listener,
        origin: Origin,
    ) -> Result<Mapping, String> {
        let start = Start {
            mapping,
            listener,
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
        self.stop_everything(drain, false).await
    }

    /// As [`Supervisor::stop_all`], once another process serves the same sockets (a
    /// takeover, a shim's port handed back): UDP flows relay their last replies first (as
    /// shims' ports always do: the shim serves them next).
    pub async fn hand_over_all(&self, drain: Duration) -> Vec<JoinHandle<()>> {
        self.stop_everything(drain, true).await
    }

    /// Whether everything was stopped (the process is ending).
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::Relaxed)
    }

    async fn stop_everything(&self, drain: Duration, handover: bool) -> Vec<JoinHandle<()>> {
        let _one_at_a_time = self.inner.changes.lock().await;
        self.inner.stopped.store(true, Ordering::Relaxed);
        let all = std::mem::take(&mut *self.running());
        self.inner.nat.close().await;
        self.inner.socket_lb.close();
        all.into_values()
            .filter_map(|r| {
                // A shim's port: the shim serves it next, once the daemon lets go.
                match handover || matches!(r.origin, Origin::Shim(_)) {
                    true => r.stop.hand_over(drain),
                    false => r.stop.stop(drain),
                }
                r.task
            })
            .collect()
    }

    /// Freezes the running set for a takeover and returns it, each mapping with a copy of
    /// its listening socket: until [`Supervisor::thaw`], every change is refused with
    /// [`Refusal::HandingOver`]. Mappings without a listener are left out: they are dockerd's
    /// ports, which the new daemon reads from dockerd itself. Err when a takeover is under
    /// way already.
    pub async fn freeze(&self) -> Result<Vec<Held>, Refusal> {
        let _one_at_a_time = self.inner.changes.lock().await;
        if self.inner.frozen.swap(true, Ordering::Relaxed) {
            return Err(Refusal::TakeoverUnderWay);
        }
        let copies: Result<Vec<Held>, String> = self
            .running()
            .values()
            .filter_map(|r| Some((r, r.socket.as_ref()?)))
            .map(|(r, socket)| {
                let socket = socket
                    .try_clone()
                    .map_err(|e| format!("cannot copy the socket of {}: {e}", r.mapping))?;
                Ok(Held {
                    mapping: r.mapping.clone(),
                    origin: r.origin.clone(),
                    socket,
                })
            })
            .collect();
        if copies.is_err() {
            self.inner.frozen.store(false, Ordering::Relaxed);
        }
        copies.map_err(Refusal::Other)
    }

    /// Takes changes again (a takeover failed).
    pub async fn thaw(&self) {
        let _one_at_a_time = self.inner.changes.lock().await;
        self.inner.frozen.store(false, Ordering::Relaxed);
    }

    /// Mappings started from now on leave their NAT rules for later
    /// ([`Supervisor::release_nat`]): a new daemon taking over cannot have the table while
    /// the previous one holds it. Their listeners serve remote clients meanwhile.
    pub fn hold_nat(&self) {
        self.inner.nat_held.store(true, Ordering::Relaxed);
    }

    /// Installs the NAT rules of the mappings started while held, and those of later
    /// mappings at once again. A mapping whose rules cannot be had now stays in userland
    /// (even with `require`: it serves already), and the log says why.
    pub async fn release_nat(&self) {
        let _one_at_a_time = self.inner.changes.lock().await;
        self.inner.nat_held.store(false, Ordering::Relaxed);
        // The allow-lists' filters first: no DNAT rule of ours without its filter.
        let filters: Vec<(Key, Mapping)> = self
            .running()
            .iter()
            .filter(|(_, r)| r.filter_held)
            .map(|(k, r)| (*k, r.mapping.clone()))
            .collect();
        for (k, mapping) in filters {
            let list = mapping.options.allow.as_deref();
            if let Err(e) = self.inner.nat.set_allow(&mapping, list).await {
                tracing::error!("{mapping}: no allow-list filter after the takeover: {e}");
            }
            if let Some(r) = self.running().get_mut(&k) {
                r.filter_held = false;
            }
        }
        let held: Vec<(Key, Mapping, Origin)> = self
            .running()
            .iter()
            .filter(|(_, r)| r.nat_held)
            .map(|(k, r)| (*k, r.mapping.clone(), r.origin.clone()))
            .collect();
        for (k, mapping, origin) in held {
            let path = match self.inner.nat.install(&mapping, origin.is_dockerds()).await {
                Ok(path) => path,
                Err(why) => {
                    tracing::error!("{mapping}: no kernel NAT after the takeover: {why}");
                    Some(Path::Userland(why))
                }
            };
            if let Some(r) = self.running().get_mut(&k) {
                r.path = path;
                r.nat_held = false;
            }
        }
    }

    /// Every mapping with its counters, its NAT path and whether it still serves.
    pub fn statuses(&self) -> Vec<Status> {
        self.running()
            .values()
            .map(|r| Status {
                mapping: r.mapping.clone(),
                origin: r.origin.clone(),
                path: self.inner.nat.path_now(&r.mapping, r.path.clone()),
                socket_lb: r.socket_lb.clone(),
                stats: r.stats.clone(),
                serving: r.task.as_ref().is_none_or(|t| !t.is_finished()),
                listener: r.socket.is_some(),
            })
            .collect()
    }

    /// Packets each mapping's allow-list filter dropped in the kernel, by spec; asks the
    /// kernel only when some mapping has a list.
    pub async fn kernel_denied(
        &self,
        statuses: &[Status],
    ) -> std::collections::HashMap<String, u64> {
        if statuses.iter().any(|s| s.mapping.options.allow.is_some()) {
            self.inner.nat.denied().await
        } else {
            Default::default()
        }
    }

    /// Logs, at most once per period for each mapping, how many packets the kernel's
    /// allow-list filter dropped since the last line. The listener logs its own refusals;
    /// these never reach it (they are dropped ahead of any DNAT), so without this line an
    /// operator would see them only in the counters.
    pub async fn log_kernel_denials(self, every: Duration) {
        let mut seen: std::collections::HashMap<String, u64> = Default::default();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let statuses = self.statuses();
            let denied = self.kernel_denied(&statuses).await;
            for s in &statuses {
                let spec = s.mapping.spec();
                let Some(&now) = denied.get(&spec) else {
                    continue;
                };
                let before = seen.insert(spec.clone(), now).unwrap_or(0);
                // A list that changed was installed afresh, its counter from zero.
                let new = if now >= before { now - before } else { now };
                if let (true, Some(list)) = (new > 0, &s.mapping.options.allow) {
                    tracing::warn!(
                        "{spec}: {new} packets from outside the allow-list ({list}) dropped \
                         in the kernel in the last {} s",
                        every.as_secs()
                    );
                }
            }
            seen.retain(|spec, _| denied.contains_key(spec));
        }
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
        let from = match origin.container() {
            Some(name) => format!("{origin} {name}"),
            None => origin.to_string(),
        };
        by_origin.entry(from).or_default().push(m.clone());
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
