//! The socket-level fast path: cgroup sock_addr programs at the cgroup v2 root rewrite the
//! destination of host sockets dialling a published port, so loopback and host clients
//! connect straight to the container — no relay, no per-packet NAT. The listener stays up
//! for everything the hooks leave alone (other namespaces, ports without the option).
//!
//! The daemon attaches one set of programs per host ([`SocketLb`], opened on first use) with
//! BPF links: they are detached when the last fd closes, so when the daemon exits, even by
//! SIGKILL, nothing stays attached. Mappings come and go as map entries; connections already
//! made are the kernel's and never depend on the daemon.

mod cgroup;
mod hairpin;
pub mod insn;
mod maps;
pub mod programs;

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hairpin::Peers;
use maps::Maps;
use programs::Hook;

use crate::engine::Engine;
use crate::mapping::{describe, Mapping, Proto};
use crate::settings::options::Mode;
use crate::sys::bpf as sys;

/// The programs' license: rproxy's own. Loading under it proves they call no GPL-only helper
/// (the kernel refuses those to programs that are not GPL-compatible).
pub const LICENSE: &str = "MIT OR Apache-2.0";

/// How a mapping's host clients are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Path {
    /// The hooks send them to the target.
    Socket,
    /// The listener serves them, and why (the hooks are unavailable).
    Userland(String),
}

impl Path {
    /// The word `rproxy ls` shows.
    pub fn label(&self) -> &'static str {
        match self {
            Path::Socket => "socket",
            Path::Userland(_) => "userland",
        }
    }
}

/// The hooks of a process, attached when a mapping first asks for them.
pub struct SocketLb {
    /// False in docker mode: one shared set per host, owned by the daemon.
    enabled: bool,
    /// dockerd's API, for the hairpin rule (None: containers stay on the listeners).
    engine: Option<Engine>,
    state: Mutex<State>,
}

enum State {
    Closed,
    Open(Arc<Hooks>),
    Unavailable(String),
}

impl SocketLb {
    /// The daemon's: opened on first use. `engine`: the dockerd to learn container networks
    /// from, for hairpin clients.
    pub fn new(engine: Option<Engine>) -> SocketLb {
        SocketLb {
            enabled: true,
            engine,
            state: Mutex::new(State::Closed),
        }
    }

    /// A docker-mode process's: never attaches anything (its mappings' option travels to a
    /// daemon instead).
    pub fn disabled() -> SocketLb {
        SocketLb {
            enabled: false,
            engine: None,
            state: Mutex::new(State::Unavailable(
                "socket hooks are the daemon's (run `rproxy daemon --socket-lb`)".into(),
            )),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The hooks, attaching them now if need be; Err says why they cannot be had.
    fn hooks(&self) -> Result<Arc<Hooks>, String> {
        let mut state = self.state();
        if let State::Closed = *state {
            *state = match Hooks::attach() {
                Ok(h) => {
                    tracing::info!("socket hooks attached at the cgroup v2 root");
                    let h = Arc::new(h);
                    watch_addresses(Arc::downgrade(&h));
                    if let Some(engine) = &self.engine {
                        watch_engine(Arc::downgrade(&h), engine.clone());
                    }
                    State::Open(h)
                }
                Err(why) => {
                    tracing::warn!(
                        "socket hooks unavailable ({why}); host clients use the listeners"
                    );
                    State::Unavailable(why)
                }
            };
        }
        match &*state {
            State::Open(h) => Ok(h.clone()),
            State::Unavailable(why) => Err(why.clone()),
            State::Closed => Err("closed".into()),
        }
    }

    /// Attaches the hooks now (the daemon with `--socket-lb`: say at start-up that they
    /// cannot be had). Err only for `Require`.
    pub fn open(&self, mode: Mode) -> Result<(), String> {
        if mode == Mode::Off || !self.enabled {
            return Ok(());
        }
        match (self.hooks(), mode) {
            (Err(why), Mode::Require) => Err(format!("socket hooks required: {why}")),
            _ => Ok(()),
        }
    }

    /// Gives `m` the path its `socket_lb` option asks for; None when off.
    pub fn publish(&self, m: &Mapping) -> Result<Option<Path>, String> {
        let mode = m.options.socket_lb;
        if mode == Mode::Off {
            return Ok(None);
        }
        let published = self.hooks().and_then(|h| h.publish(m));
        match (published, mode) {
            (Ok(()), _) => Ok(Some(Path::Socket)),
            (Err(why), Mode::Require) => Err(format!("socket hooks required for {m}: {why}")),
            (Err(why), _) => Ok(Some(Path::Userland(why))),
        }
    }

    /// Withdraws `m` if its path was the hooks'. `entry`: delete its map entry too (false when
    /// a mapping replacing it on the same address has written its own).
    pub fn withdraw(&self, m: &Mapping, path: Option<&Path>, entry: bool) {
        if path != Some(&Path::Socket) {
            return;
        }
        if let State::Open(h) = &*self.state() {
            h.withdraw(m, entry);
        }
    }

    /// Writes `m`'s entry again (a change that replaced it was rolled back).
    pub fn restore(&self, m: &Mapping, path: Option<&Path>) {
        if path != Some(&Path::Socket) {
            return;
        }
        if let State::Open(h) = &*self.state() {
            if let Err(e) = h.publish(m) {
                tracing::warn!("{m}: socket hook entry not restored: {e}");
            }
        }
    }

    /// Connections (TCP and connected UDP) and datagrams the hooks sent on to `m`'s target.
    pub fn counters(&self, m: &Mapping) -> (u64, u64) {
        match &*self.state() {
            State::Open(h) => h.counters(m),
            _ => (0, 0),
        }
    }

    /// Detaches everything now.
    pub fn close(&self) {
        *self.state() = State::Closed;
    }
}

/// The attached programs, their maps, and which counter slot each mapping has.
struct Hooks {
    maps: Maps,
    /// Held, not read: closing them detaches the programs.
    _links: Vec<OwnedFd>,
    _programs: Vec<OwnedFd>,
    slots: Mutex<Slots>,
    /// The host addresses `local4`/`local6` hold.
    local: Mutex<BTreeSet<IpAddr>>,
    /// What `hairpin` holds, and each target's network. Locked after `slots`.
    peers: Mutex<Peers>,
}

#[derive(Default)]
struct Slots {
    of: HashMap<Mapping, u32>,
    free: Vec<u32>,
    next: u32,
    /// The mapping whose Target each service entry holds (a mapping replaced on its address
    /// hands the entry over before it goes).
    owners: HashMap<(Proto, SocketAddr), Mapping>,
}

impl Hooks {
    /// Creates the maps, loads every program, links them at the cgroup v2 root and checks
    /// they run for this process's own cgroup.
    fn attach() -> Result<Hooks, String> {
        if !cgroup::in_host_namespace() {
            return Err(
                "this process is in a cgroup namespace: programs attached at its root \
                        would not see the host's sockets"
                    .into(),
            );
        }
        let root = cgroup::v2_root()?;
        let probe = std::net::UdpSocket::bind("127.0.0.1:0")
            .map_err(|e| format!("cannot open a socket: {}", describe(&e)))?;
        let host_netns = sys::netns_cookie(probe.as_fd()).map_err(|e| {
            format!(
                "cannot read the network namespace cookie (SO_NETNS_COOKIE needs Linux 5.14): {}",
                describe(&e)
            )
        })?;
        let bindv6only =
            std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|v| v.trim() == "1");
        let maps = Maps::create(host_netns, bindv6only)
            .map_err(|e| bpf_error("cannot create maps", &e))?;
        let dir = std::fs::File::open(&root)
            .map_err(|e| format!("cannot open {}: {}", root.display(), describe(&e)))?;
        let mut programs = Vec::new();
        let mut links = Vec::new();
        for hook in Hook::ALL {
            let prog = load(hook, &maps)?;
            let link = sys::link_create(prog.as_fd(), dir.as_fd(), hook.attach_type())
                .map_err(|e| bpf_error(&format!("cannot attach {}", hook.name()), &e))?;
            programs.push(prog);
            links.push(link);
        }
        let connect4 = Hook::ALL.iter().position(|h| *h == Hook::Connect4);
        if let Some(prog) = connect4.and_then(|i| programs.get(i)) {
            effective_for_own_cgroup(&root, prog)?;
        }
        let hooks = Hooks {
            maps,
            _links: links,
            _programs: programs,
            slots: Mutex::default(),
            local: Mutex::default(),
            peers: Mutex::default(),
        };
        hooks.sync_addresses();
        Ok(hooks)
    }

    fn publish(&self, m: &Mapping) -> Result<(), String> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = !slots.of.contains_key(m);
        let id = match slots.of.get(m) {
            Some(&id) => id,
            None => {
                let id = match slots.free.pop() {
                    Some(id) => id,
                    None if slots.next < maps::MAX_MAPPINGS => {
                        slots.next += 1;
                        slots.next - 1
                    }
                    None => return Err(format!("more than {} mappings", maps::MAX_MAPPINGS)),
                };
                slots.of.insert(m.clone(), id);
                id
            }
        };
        let network = self.network_of(m);
        match self.maps.publish(m, id, network, fresh) {
            Ok(()) => {
                slots.owners.insert((m.proto, m.listen), m.clone());
                Ok(())
            }
            Err(e) => {
                if fresh {
                    if let Some(id) = slots.of.remove(m) {
                        slots.free.push(id);
                    }
                }
                Err(bpf_error("cannot write the map entry", &e))
            }
        }
    }

    fn withdraw(&self, m: &Mapping, entry: bool) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if entry {
            if let Err(e) = self.maps.withdraw(m) {
                tracing::warn!("{m}: socket hook entry not removed: {}", describe(&e));
            }
            if slots.owners.get(&(m.proto, m.listen)) == Some(m) {
                slots.owners.remove(&(m.proto, m.listen));
            }
        }
        if let Some(id) = slots.of.remove(m) {
            slots.free.push(id);
        }
    }

    /// The number of `m`'s target's network for the hairpin rule (0: none known).
    fn network_of(&self, m: &Mapping) -> u32 {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        hairpin_network(m, &peers)
    }

    /// Makes `hairpin` and the Targets' networks what dockerd says now.
    fn sync_peers(&self, now: Peers) {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if *peers == now {
            return;
        }
        for &(netns, network) in now.pairs.difference(&peers.pairs) {
            if let Err(e) = self.maps.set_hairpin(netns, network, true) {
                tracing::warn!("hairpin: cannot add a namespace: {}", describe(&e));
            }
        }
        for &(netns, network) in peers.pairs.difference(&now.pairs) {
            let _ = self.maps.set_hairpin(netns, network, false);
        }
        for m in slots.owners.values() {
            let (was, is) = (hairpin_network(m, &peers), hairpin_network(m, &now));
            if was == is {
                continue;
            }
            if let Some(&id) = slots.of.get(m) {
                if let Err(e) = self.maps.publish(m, id, is, false) {
                    tracing::warn!("{m}: socket hook entry not updated: {}", describe(&e));
                }
            }
        }
        tracing::debug!(
            "hairpin: {} container namespaces, {} addresses on networks with icc",
            now.pairs.len(),
            now.network_of.len()
        );
        *peers = now;
    }

    /// Makes `local4`/`local6` the host's addresses now.
    fn sync_addresses(&self) {
        let Ok(now) = maps::host_addresses() else {
            return;
        };
        let now: BTreeSet<IpAddr> = now.into_iter().collect();
        let mut known = self.local.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<&IpAddr> = known.difference(&now).collect();
        let added: Vec<&IpAddr> = now.difference(&known).collect();
        tracing::debug!(
            "host addresses rescanned: {}, added {added:?}, gone {gone:?}",
            now.len()
        );
        for ip in gone {
            let _ = self.maps.set_local(*ip, false);
        }
        for ip in added {
            let _ = self.maps.set_local(*ip, true);
        }
        *known = now;
    }

    fn counters(&self, m: &Mapping) -> (u64, u64) {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.of.get(m).map_or((0, 0), |&id| self.maps.counters(id))
    }
}

/// The network number the hooks' hairpin rule gets for `m` (0: none, containers stay on the
/// listener). A mapping with an allow-list gets none: a container is judged by its own
/// address, which only the listener and the kernel's filter see (the hooks see a namespace).
fn hairpin_network(m: &Mapping, peers: &Peers) -> u32 {
    match m.options.allow {
        Some(_) => 0,
        None => peers.network_of.get(&m.target.ip()).copied().unwrap_or(0),
    }
}

/// Loads every program against fresh maps without attaching anything: whether this kernel's
/// verifier accepts them (under rproxy's own license). Returns the names loaded.
pub fn verify() -> Result<Vec<&'static str>, String> {
    let maps = Maps::create(0, false).map_err(|e| bpf_error("cannot create maps", &e))?;
    Hook::ALL
        .iter()
        .map(|&hook| load(hook, &maps).map(|_| hook.name()))
        .collect()
}

/// Loads `hook`'s program with the maps' fds; a refusal quotes the verifier's last words.
fn load(hook: Hook, maps: &Maps) -> Result<OwnedFd, String> {
    let insns = hook
        .code()
        .relocated(|name| maps.fd(name).map(|fd| fd.as_raw_fd()))
        .ok_or_else(|| format!("{} names a map that does not exist", hook.name()))?;
    let bytes = insn::Code::bytes(&insns);
    sys::prog_load(
        hook.prog_type(),
        hook.attach_type(),
        &bytes,
        LICENSE,
        hook.name(),
    )
    .map_err(|r| {
        let last = r.log.lines().rev().take(3).collect::<Vec<_>>().join(" / ");
        format!(
            "{}: {}",
            bpf_error(&format!("cannot load {}", hook.name()), &r.error),
            last
        )
    })
}

/// Checks that the connect4 program (`prog`) runs for this process's own cgroup: attached
/// to a root that is not the host's, it would silently do nothing.
fn effective_for_own_cgroup(root: &std::path::Path, prog: &OwnedFd) -> Result<(), String> {
    let own: PathBuf = cgroup::own(root).unwrap_or_else(|| root.to_path_buf());
    let dir = std::fs::File::open(&own)
        .map_err(|e| format!("cannot open {}: {}", own.display(), describe(&e)))?;
    let id = sys::prog_id(prog.as_fd()).map_err(|e| bpf_error("cannot read a program id", &e))?;
    let effective = sys::prog_query_effective(dir.as_fd(), Hook::Connect4.attach_type())
        .map_err(|e| bpf_error("cannot query the effective programs", &e))?;
    if effective.contains(&id) {
        Ok(())
    } else {
        Err(format!(
            "attached at {} but not in effect for {} (is this the host's cgroup root?)",
            root.display(),
            own.display()
        ))
    }
}

/// A bpf(2) failure in words an operator can act on.
fn bpf_error(what: &str, e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => {
            format!(
                "{what}: {} (needs root, or CAP_BPF and CAP_NET_ADMIN)",
                describe(e)
            )
        }
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => format!(
            "{what}: {} (this kernel may be too old: the hooks need Linux 5.8, the netns \
             check 5.14)",
            describe(e)
        ),
        _ => format!("{what}: {}", describe(e)),
    }
}

/// Keeps `local4`/`local6` equal to the host's addresses, as they come and go: a thread
/// that listens for address changes on a NETLINK_ROUTE socket and rescans on each (an idle
/// host costs nothing but a wake-up a second, to notice the hooks going). It ends when the
/// hooks are gone. Without such a socket, the addresses stay those found at attach time.
fn watch_addresses(hooks: Weak<Hooks>) {
    let Some(socket) = address_events() else {
        tracing::warn!(
            "cannot follow address changes (no NETLINK_ROUTE socket): the socket hooks know \
             the host addresses of now only"
        );
        return;
    };
    let _ = std::thread::Builder::new()
        .name("rproxy-addrs".into())
        .spawn(move || loop {
            let changed = address_changed(&socket);
            let Some(h) = hooks.upgrade() else { return };
            if changed {
                h.sync_addresses();
            }
        });
}

/// Waits up to the socket's timeout for address events; true when any came (or some were
/// lost: the kernel's queue overflowed), after reading every one queued, so a burst of
/// them is one rescan.
fn address_changed(socket: &OwnedFd) -> bool {
    use nix::errno::Errno;
    use nix::sys::socket::{recv, MsgFlags};
    let mut buf = [0u8; 8192];
    let mut flags = MsgFlags::empty();
    let mut changed = false;
    loop {
        match recv(socket.as_raw_fd(), &mut buf, flags) {
            Ok(_) | Err(Errno::ENOBUFS) => changed = true,
            Err(Errno::EINTR) => continue,
            // EAGAIN: the timeout, or nothing more queued.
            Err(_) => return changed,
        }
        flags = MsgFlags::MSG_DONTWAIT;
    }
}

/// Keeps the hairpin rule's knowledge current with dockerd at `engine`: a thread that
/// follows its network events. It ends when the hooks are gone.
fn watch_engine(hooks: Weak<Hooks>, engine: Engine) {
    let _ = std::thread::Builder::new()
        .name("rproxy-dockerd".into())
        .spawn(move || {
            hairpin::follow(engine, |peers| match hooks.upgrade() {
                None => false,
                Some(h) => {
                    if let Some(p) = peers {
                        h.sync_peers(p);
                    }
                    true
                }
            })
        });
}

/// A NETLINK_ROUTE socket subscribed to IPv4 and IPv6 address changes, with a 1 s receive
/// timeout; None when it cannot be had.
fn address_events() -> Option<OwnedFd> {
    use nix::sys::socket::{
        bind, socket, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
    };
    const RTMGRP_IPV4_IFADDR: u32 = 0x10;
    const RTMGRP_IPV6_IFADDR: u32 = 0x100;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .ok()?;
    bind(
        fd.as_raw_fd(),
        &NetlinkAddr::new(0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR),
    )
    .ok()?;
    socket2::SockRef::from(&fd)
        .set_read_timeout(Some(Duration::from_secs(1)))
        .ok()?;
    Some(fd)
}
