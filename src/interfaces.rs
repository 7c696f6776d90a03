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
