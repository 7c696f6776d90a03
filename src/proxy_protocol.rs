//! The PROXY protocol (HAProxy's `doc/proxy-protocol.txt`), sending side: a header that tells
//! a backend the client's address, written once on every backend connection before any byte
//! of the client's, so backends behind the userland relay (which connects from the host)
//! see who really connected.
//!
//! Written here rather than with the `ppp` crate: the sending side is one fixed layout per
//! version, built on the stack without allocating, and `ppp` is mostly a parser (3,000 lines,
//! Apache-2.0 only, thiserror 1 beside the thiserror 2 we already build).
//!
//! Also here: the daemon's per-port choice for ports dockerd hands over ([`PortRules`]),
//! since dockerd's command line cannot carry it.

use std::fmt;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which header a mapping's backend connections start with. Off unless asked for: a backend
/// that does not expect the header reads it as the client's first bytes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    /// No header.
    #[default]
    Off,
    /// The text header: `PROXY TCP4 <client> <server> <cport> <sport>\r\n`.
    V1,
    /// The binary header (16 bytes and the addresses).
    V2,
}

impl Version {
    /// Whether a header is written.
    pub fn is_on(self) -> bool {
        self != Version::Off
    }
}

impl FromStr for Version {
    type Err = String;
    fn from_str(s: &str) -> Result<Version, String> {
        match s {
            "off" => Ok(Version::Off),
            "v1" | "1" => Ok(Version::V1),
            "v2" | "2" => Ok(Version::V2),
            other => Err(format!(
                "invalid PROXY protocol version {other:?} (v1, v2 or off)"
            )),
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::Off => "off",
            Version::V1 => "v1",
            Version::V2 => "v2",
        })
    }
}

/// The v2 signature, the first 12 bytes of every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The longest header written: a v1 TCP6 line is 104 bytes, a v2 IPv6 header 52.
const MAX_HEADER: usize = 104;

/// One connection's header, on the stack.
#[derive(Clone, Copy)]
pub struct Header {
    buf: [u8; MAX_HEADER],
    len: usize,
}

impl Header {
    /// The bytes to send.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Header({:?})", String::from_utf8_lossy(self.as_bytes()))
    }
}

/// The header for a connection from `client` to `server` (the address the client connected
/// to). IPv4-mapped addresses (an IPv4 client of a dual-stack socket) are written as the
/// IPv4 addresses they are, so the backend logs `1.2.3.4`, not `::ffff:1.2.3.4`; a pair
/// that is still mixed (never from one socket) is written as IPv6. Empty for `Off`.
pub fn header(version: Version, client: SocketAddr, server: SocketAddr) -> Header {
    let mut h = Header {
        buf: [0; MAX_HEADER],
        len: 0,
    };
    let (src, dst) = match (client.ip().to_canonical(), server.ip().to_canonical()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (IpAddr::V4(s), IpAddr::V4(d)),
        (s, d) => (IpAddr::V6(v6(s)), IpAddr::V6(v6(d))),
    };
    let (sport, dport) = (client.port(), server.port());
    match version {
        Version::Off => {}
        Version::V1 => {
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            let mut out = &mut h.buf[..];
            // At most 104 bytes (the spec's longest TCP6 line): it always fits.
            let _ = write!(out, "PROXY {family} {src} {dst} {sport} {dport}\r\n");
            h.len = MAX_HEADER - out.len();
        }
        Version::V2 => {
            let mut out = &mut h.buf[..];
            let _ = out.write_all(&V2_SIGNATURE);
            // Version 2, command PROXY; then the family with STREAM (TCP) and the length of
            // the addresses and ports that follow.
            let _ = match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => out
                    .write_all(&[0x21, 0x11, 0, 12])
                    .and_then(|()| out.write_all(&s.octets()))
                    .and_then(|()| out.write_all(&d.octets())),
                (s, d) => out
                    .write_all(&[0x21, 0x21, 0, 36])
                    .and_then(|()| out.write_all(&v6(s).octets()))
                    .and_then(|()| out.write_all(&v6(d).octets())),
            };
            let _ = out
                .write_all(&sport.to_be_bytes())
                .and_then(|()| out.write_all(&dport.to_be_bytes()));
            h.len = MAX_HEADER - out.len();
        }
    }
    h
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// The daemon's choice for TCP ports dockerd hands over (docker mode has no per-port
/// option): the first rule whose host port range holds the port gives the version. Rules
/// come from `[[proxy_protocol]]` tables of the config file, and are replaced by a reload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortRules(Vec<PortRule>);

/// One `[[proxy_protocol]]` table: host ports `first..=last` get `version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRule {
    /// First host port of the range.
    pub first: u16,
    /// Last host port of the range (equal to `first` for one port).
    pub last: u16,
    /// The header those ports' backends get.
    pub version: Version,
}

impl PortRules {
    /// Rules in the order given (the first match wins).
    pub fn new(rules: Vec<PortRule>) -> PortRules {
        PortRules(rules)
    }

    /// The version for a handed-over TCP port on host port `port`; Off when no rule holds it.
    pub fn version_for(&self, port: u16) -> Version {
        self.0
            .iter()
            .find(|r| (r.first..=r.last).contains(&port))
            .map_or(Version::Off, |r| r.version)
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Parses a rule's `ports`: `"8080"` or `"8000-8100"` (host ports 1-65535), spaces
/// around the numbers allowed (a file written by a person), as a spec's ports otherwise.
pub fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let spaceless: Vec<&str> = s.splitn(2, '-').map(str::trim).collect();
    crate::mapping::parse_port_range(&spaceless.join("-"), "", 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The spec's examples (section 2.1): the HTTP one, and the longest lines it sizes its
    /// buffers for.
    #[test]
    fn v1_lines_are_the_specs() {
        let h = header(
            Version::V1,
            addr("192.168.0.1:56324"),
            addr("192.168.0.11:443"),
        );
        assert_eq!(
            h.as_bytes(),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
        let h = header(
            Version::V1,
            addr("255.255.255.255:65535"),
            addr("255.255.255.255:65535"),
        );
        assert_eq!(
            h.as_bytes(),
            b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
        );
        assert_eq!(h.as_bytes().len(), 56);
        let max = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535";
        let h = header(Version::V1, addr(max), addr(max));
        let line = "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
                    ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(h.as_bytes(), line.as_bytes());
        assert_eq!(h.as_bytes().len(), 104);
        let h = header(Version::V1, addr("[::1]:40000"), addr("[2001:db8::7]:80"));
        assert_eq!(h.as_bytes(), b"PROXY TCP6 ::1 2001:db8::7 40000 80\r\n");
    }

    /// Section 2.2: signature, \x21 (v2, PROXY), \x11 TCP over IPv4 with 12 bytes of
    /// addresses, or \x21 TCP over IPv6 with 36, then source and destination addresses, then
    /// the ports, all in network byte order.
    #[test]
    fn v2_headers_are_the_specs_layout() {
        let h = header(
            Version::V2,
            addr("192.168.0.1:56324"),
            addr("192.168.0.11:443"),
        );
        let mut want = b"\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A".to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C]);
        want.extend_from_slice(&[192, 168, 0, 1, 192, 168, 0, 11]);
        want.extend_from_slice(&[0xDC, 0x04, 0x01, 0xBB]); // 56324, 443
        assert_eq!(h.as_bytes(), want);
        assert_eq!(h.as_bytes().len(), 16 + 12);

        let h = header(Version::V2, addr("[::1]:40000"), addr("[2001:db8::7]:80"));
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x21, 0x00, 0x24]);
        want.extend_from_slice(&[0; 15]);
        want.push(1);
        want.extend_from_slice(&[0x20, 0x01, 0x0D, 0xB8]);
        want.extend_from_slice(&[0; 11]);
        want.push(7);
        want.extend_from_slice(&[0x9C, 0x40, 0x00, 0x50]); // 40000, 80
        assert_eq!(h.as_bytes(), want);
        assert_eq!(h.as_bytes().len(), 16 + 36);
    }

    /// An IPv4 client of a dual-stack IPv6 socket: written as IPv4 (what nginx then logs).
    #[test]
    fn ipv4_mapped_addresses_are_written_as_ipv4() {
        let client = addr("[::ffff:10.1.2.3]:5000");
        let server = addr("[::ffff:10.0.0.1]:80");
        let h = header(Version::V1, client, server);
        assert_eq!(h.as_bytes(), b"PROXY TCP4 10.1.2.3 10.0.0.1 5000 80\r\n");
        let h = header(Version::V2, client, server);
        assert_eq!(&h.as_bytes()[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&h.as_bytes()[16..24], &[10, 1, 2, 3, 10, 0, 0, 1]);
        // Mixed (not from one socket): both as IPv6.
        let h = header(Version::V1, addr("10.1.2.3:5000"), addr("[fd00::1]:80"));
        assert_eq!(
            h.as_bytes(),
            b"PROXY TCP6 ::ffff:10.1.2.3 fd00::1 5000 80\r\n"
        );
        assert!(header(Version::Off, client, server).as_bytes().is_empty());
    }

    #[test]
    fn versions_parse() {
        assert_eq!("v1".parse(), Ok(Version::V1));
        assert_eq!("2".parse(), Ok(Version::V2));
        assert_eq!("off".parse(), Ok(Version::Off));
        for bad in ["", "v3", "V2", "on", "true"] {
            let e = bad.parse::<Version>().expect_err(bad);
            assert!(e.contains("v1, v2 or off"), "{e}");
        }
    }

    #[test]
    fn port_rules_match_by_host_port() {
        let rules = PortRules::new(vec![
            PortRule {
                first: 8080,
                last: 8080,
                version: Version::V1,
            },
            PortRule {
                first: 8000,
                last: 8100,
                version: Version::V2,
            },
        ]);
        assert_eq!(rules.version_for(8080), Version::V1);
        assert_eq!(rules.version_for(8000), Version::V2);
        assert_eq!(rules.version_for(8100), Version::V2);
        assert_eq!(rules.version_for(8101), Version::Off);
        assert_eq!(parse_ports("8000-8100"), Ok((8000, 8100)));
        assert_eq!(parse_ports("443"), Ok((443, 443)));
        assert_eq!(parse_ports(" 8000 - 8100 "), Ok((8000, 8100)));
        assert_eq!(
            parse_ports("9-3"),
            Err("port range 9-3 ends before it starts".into())
        );
        assert_eq!(
            parse_ports("0"),
            Err("invalid port \"0\" (must be 1-65535)".into())
        );
        for bad in ["0", "70000", "9-3", "a", "", "1-"] {
            assert!(parse_ports(bad).is_err(), "{bad}");
        }
    }

    use proptest::prelude::*;

    proptest! {
        /// Any pair of addresses: a header within the buffer, whose v1 line ends in CRLF and
        /// whose v2 length field counts exactly the bytes after the first 16.
        #[test]
        fn any_addresses_make_a_well_formed_header(
            c in any::<(std::net::IpAddr, u16)>(), s in any::<(std::net::IpAddr, u16)>()
        ) {
            let (c, s) = (SocketAddr::from(c), SocketAddr::from(s));
            let v1 = header(Version::V1, c, s);
            prop_assert!(v1.as_bytes().starts_with(b"PROXY TCP") && v1.as_bytes().ends_with(b"\r\n"));
            prop_assert!(v1.as_bytes().len() <= 104);
            let v2 = header(Version::V2, c, s);
            let b = v2.as_bytes();
            let len = u16::from_be_bytes([b[14], b[15]]) as usize;
            prop_assert_eq!(b.len(), 16 + len);
        }
    }
}
