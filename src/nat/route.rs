//! Which interface the kernel would send to a target through: a connected UDP socket learns
//! the source address the route picks (no packet is sent), and that address names the
//! interface. Hairpin traffic is what arrives from that same interface.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};

/// The interface toward `target`, or None when the route leads to this host itself.
pub fn interface_toward(target: SocketAddr) -> io::Result<Option<String>> {
    let bind = match target.ip() {
        IpAddr::V4(_) => SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)),
        IpAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
    };
    let probe = UdpSocket::bind(bind)?;
    probe.connect(target)?;
    let source = probe.local_addr()?.ip();
    if source == target.ip() {
        // The target is one of this host's own addresses.
        return Ok(None);
    }
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    for ifa in addrs {
        let Some(addr) = ifa.address else { continue };
        let ip = match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
            (Some(v4), _) => IpAddr::V4(v4.ip()),
            (_, Some(v6)) => IpAddr::V6(v6.ip()),
            _ => continue,
        };
        if ip == source {
            if ifa.interface_name == "lo" {
                return Ok(None);
            }
            return Ok(Some(ifa.interface_name));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no interface holds {source}, the source address toward {target}"),
    ))
}
