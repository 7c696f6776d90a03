//! The network: client and container namespaces on a bridge, and the iptables rules for it.

use super::*;

/// Holds the lock that keeps two runs from sharing the bridge.
pub(crate) struct Topology {
    pub(crate) _lock: Flock<File>,
}

impl Topology {
    pub(crate) fn up() -> Result<Topology, String> {
        // Another run (the smoke test of a suite running beside this one) owns the bridge:
        // wait for it rather than fail. The kernel drops the lock when its holder dies.
        let lock = lock_wait(LOCK_PATH, &format!("owns {BRIDGE}"))?;
        let leftover = Path::new("/sys/class/net").join(BRIDGE).exists()
            || links().any(|(veth, ns)| {
                Path::new("/sys/class/net").join(veth).exists()
                    || Path::new("/run/netns").join(ns).exists()
            });
        if leftover {
            eprintln!("bench: removing {BRIDGE} and namespaces left by an earlier run");
            teardown();
        }
        registry().topology = true;
        let gw = format!("{GW}/24");
        sh(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
        sh(&["ip", "addr", "add", &gw, "dev", BRIDGE])?;
        sh(&["ip", "link", "set", BRIDGE, "up"])?;
        for (veth, ns, addr) in VETHS {
            namespace_link(veth, ns, addr, GW)?;
            sh(&["ip", "link", "set", veth, "master", BRIDGE, "up"])?;
        }
        // The remote client: its own link to the host, which routes it to the bridge. Only
        // these two interfaces forward (the host's ip_forward stays as it is).
        let (up, up_addr, remote, remote_addr) = UPLINK;
        namespace_link(up, remote, remote_addr, UPLINK_GW)?;
        sh(&["ip", "addr", "add", up_addr, "dev", up])?;
        sh(&["ip", "link", "set", up, "up"])?;
        for dev in [up, BRIDGE] {
            sh(&[
                "sysctl",
                "-q",
                "-w",
                &format!("net.ipv4.conf.{dev}.forwarding=1"),
            ])?;
        }
        // The client namespace makes tens of thousands of short connections: a wide port range
        // and reuse of TIME_WAIT ports there (per-namespace settings; the host's are untouched).
        for setting in [
            "net.ipv4.ip_local_port_range=15000 64999",
            "net.ipv4.tcp_tw_reuse=1",
        ] {
            sh(&["ip", "netns", "exec", NS_CLI, "sysctl", "-q", "-w", setting])?;
        }
        for (table, chain, rule) in IPTABLES_RULES {
            let mut args = vec!["iptables", "-w", "-t", table, "-I", chain];
            args.extend(rule.split(' '));
            sh(&args)?;
        }
        Ok(Topology { _lock: lock })
    }
}

/// Namespace `ns` with `eth0` at `addr` (its default route via `gw`), the peer of host-side
/// veth `veth`, which the caller attaches.
fn namespace_link(veth: &str, ns: &str, addr: &str, gw: Ipv4Addr) -> Result<(), String> {
    sh(&["ip", "netns", "add", ns])?;
    sh(&[
        "ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    sh(&["ip", "-n", ns, "addr", "add", addr, "dev", "eth0"])?;
    sh(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
    sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
    let gw = gw.to_string();
    sh(&["ip", "-n", ns, "route", "add", "default", "via", &gw])?;
    Ok(())
}

/// Removes the iptables rules, whatever runs in our namespaces, the namespaces and the bridge.
pub(crate) fn teardown() {
    for (table, chain, rule) in IPTABLES_RULES {
        let mut args = vec!["iptables", "-w", "-t", table, "-D", chain];
        args.extend(rule.split(' '));
        for _ in 0..8 {
            if sh(&args).is_err() {
                break;
            }
        }
    }
    for (veth, ns) in links() {
        if Path::new("/run/netns").join(ns).exists() {
            if let Ok(pids) = sh(&["ip", "netns", "pids", ns]) {
                for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
                    kill_tree(pid, None);
                }
            }
        }
        if Path::new("/sys/class/net").join(veth).exists() {
            let _ = sh(&["ip", "link", "del", veth]);
        }
        if Path::new("/run/netns").join(ns).exists() {
            if let Err(e) = sh(&["ip", "netns", "del", ns]) {
                eprintln!("bench: cleanup: {e}");
            }
        }
    }
    if Path::new("/sys/class/net").join(BRIDGE).exists() {
        if let Err(e) = sh(&["ip", "link", "del", BRIDGE]) {
            eprintln!("bench: cleanup: {e}");
        }
    }
}

/// Every (host-side veth, namespace) the topology makes.
fn links() -> impl Iterator<Item = (&'static str, &'static str)> {
    VETHS
        .iter()
        .map(|(veth, ns, _)| (*veth, *ns))
        .chain([(UPLINK.0, UPLINK.2)])
}

pub(crate) fn enter_netns(ns: &str) -> Result<(), String> {
    let f = File::open(Path::new("/run/netns").join(ns)).map_err(|e| format!("netns {ns}: {e}"))?;
    setns(&f, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns {ns}: {e}"))
}

/// Runs `f` on a fresh thread inside network namespace `ns`; sockets it makes stay in `ns`.
pub(crate) fn in_netns<T, F>(ns: &'static str, f: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, String> + Send + 'static,
{
    spawn_in_netns(ns, f)?
        .join()
        .unwrap_or_else(|_| Err(format!("a thread in {ns} panicked")))
}

pub(crate) fn spawn_in_netns<T, F>(
    ns: &'static str,
    f: F,
) -> Result<JoinHandle<Result<T, String>>, String>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, String> + Send + 'static,
{
    thread::Builder::new()
        .name(format!("in-{ns}"))
        .spawn(move || {
            enter_netns(ns)?;
            f()
        })
        .map_err(|e| format!("thread: {e}"))
}

/// Where a workload's client runs, and the published address it dials.
#[derive(Clone, Copy)]
pub(crate) struct Client {
    /// Its network namespace; None: the host's own.
    pub(crate) ns: Option<&'static str>,
    /// The published address: where the proxies listen and the client dials (`direct` dials
    /// the container's address instead).
    pub(crate) front: Ipv4Addr,
}

/// A client on the bridge beside the container, dialling the gateway (dockerd's hairpin case).
pub(crate) const BRIDGE_CLIENT: Client = Client {
    ns: Some(NS_CLI),
    front: GW,
};
/// A client on another network the host routes to the bridge.
pub(crate) const REMOTE_CLIENT: Client = Client {
    ns: Some(NS_REMOTE),
    front: GW,
};
/// A process of the host itself dialling the published port on loopback (`curl
/// localhost:PORT`): what the socket hooks serve.
pub(crate) const HOST_CLIENT: Client = Client {
    ns: None,
    front: Ipv4Addr::LOCALHOST,
};

impl Client {
    /// Where the client sends: the published address, or the container itself for direct.
    pub(crate) fn dest(self, ctx: &Ctx, kind: Kind, port: u16) -> SocketAddrV4 {
        match kind {
            Kind::Direct => SocketAddrV4::new(ctx.ctr(), port),
            _ => SocketAddrV4::new(self.front, port),
        }
    }
}
