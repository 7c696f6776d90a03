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
    for (name, ip) in crate::interfaces::addresses()? {
        if ip == source {
            if name == "lo" {
                return Ok(None);
            }
            return Ok(Some(name));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no interface holds {source}, the source address toward {target}"),
    ))
}
