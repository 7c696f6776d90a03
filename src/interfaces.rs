//! The host's interface addresses, as getifaddrs(3) lists them: what the socket hooks count
//! as the host's own addresses, and how the NAT path names the interface toward a target.

use std::io;
use std::net::IpAddr;

/// Every (interface name, IPv4 or IPv6 address) pair, in the kernel's order.
pub fn addresses() -> io::Result<Vec<(String, IpAddr)>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        let Some(addr) = ifa.address else { continue };
        let ip = match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
            (Some(v4), _) => IpAddr::V4(v4.ip()),
            (_, Some(v6)) => IpAddr::V6(v6.ip()),
            _ => continue,
        };
        out.push((ifa.interface_name, ip));
    }
    Ok(out)
}

/// Whether `ip` is this host's own (loopback included): a client the allow-lists always let
/// through, as host firewalls do. From a snapshot of the host's addresses taken at most a
/// second ago, so a flood of refused clients costs a set lookup each, not a getifaddrs walk.
pub fn is_local(ip: IpAddr) -> bool {
    use std::collections::HashSet;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    static SNAPSHOT: Mutex<Option<(Instant, HashSet<IpAddr>)>> = Mutex::new(None);
    let ip = ip.to_canonical();
    if ip.is_loopback() {
        return true;
    }
    let mut snapshot = SNAPSHOT.lock().unwrap_or_else(|e| e.into_inner());
    let fresh = snapshot
        .as_ref()
        .is_some_and(|(at, _)| at.elapsed() < Duration::from_secs(1));
    if !fresh {
        let now: HashSet<IpAddr> = addresses()
            .map(|list| list.into_iter().map(|(_, a)| a).collect())
            .unwrap_or_default();
        *snapshot = Some((Instant::now(), now));
    }
    snapshot
        .as_ref()
        .is_some_and(|(_, addrs)| addrs.contains(&ip))
}
