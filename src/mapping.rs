//! A Mapping — protocol, listen address, target address and options — is the unit every mode
//! works on: docker-proxy flags, `--publish`, the config file and control requests produce
//! them, and the data path never knows where one came from.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

use crate::settings::options::Options;

/// The transport a mapping forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// Connections, relayed byte for byte with half-close.
    Tcp,
    /// Datagrams, relayed per flow.
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// One forwarded port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mapping {
    /// TCP or UDP.
    pub proto: Proto,
    /// Where clients connect (port 0 = any free port, resolved at bind time).
    pub listen: SocketAddr,
    /// Where connections and datagrams are forwarded.
    pub target: SocketAddr,
    /// How it dials, relays and expires, resolved where the mapping entered.
    pub options: Options,
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} -> {}", self.proto, self.listen, self.target)
    }
}

/// Groups mappings into published ranges: runs of contiguous host ports of one protocol and
/// host address sent to the same contiguous run of ports of one target address (what
/// `-p 8000-8999:80-1079` becomes), each run in port order; a mapping that extends no run is
/// a run of its own. `of` gives each item's mapping.
pub fn runs<T>(mut items: Vec<T>, of: impl Fn(&T) -> &Mapping) -> Vec<Vec<T>> {
    let offset = |m: &Mapping| i32::from(m.target.port()) - i32::from(m.listen.port());
    let group = |m: &Mapping| (m.proto, m.listen.ip(), m.target.ip(), offset(m));
    items.sort_by_key(|t| {
        let m = of(t);
        (group(m), m.listen.port())
    });
    let mut out: Vec<Vec<T>> = Vec::new();
    for t in items {
        let joins = out.last().and_then(|run| run.last()).is_some_and(|last| {
            let (a, b) = (of(last), of(&t));
            group(a) == group(b) && a.listen.port().checked_add(1) == Some(b.listen.port())
        });
        match (joins, out.last_mut()) {
            (true, Some(run)) => run.push(t),
            _ => out.push(vec![t]),
        }
    }
    out
}

/// A run's addresses as one: `127.0.0.1:8000-8999` (or the address, for one port).
pub fn span(first: SocketAddr, last: SocketAddr) -> String {
    match first == last {
        true => first.to_string(),
        false => format!("{first}-{}", last.port()),
    }
}

/// A run of mappings as `rproxy` logs it: `tcp 0.0.0.0:8000-8999 -> 172.17.0.2:80-1079`.
pub fn describe_run(run: &[Mapping]) -> String {
    match (run.first(), run.last()) {
        (Some(a), Some(b)) => format!(
            "{} {} -> {}",
            a.proto,
            span(a.listen, b.listen),
            span(a.target, b.target)
        ),
        _ => String::new(),
    }
}

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Proto, String> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            "sctp" => Err("sctp is not supported".into()),
            other => Err(format!("unknown protocol {other:?} (tcp or udp)")),
        }
    }
}

impl Mapping {
    /// The mapping as a one-port publish spec (`127.0.0.1:8080:172.17.0.2:80/tcp`), the form the
    /// control socket and `rproxy ls` use.
    pub fn spec(&self) -> String {
        format!("{}:{}/{}", self.listen, self.target, self.proto)
    }
}

/// Parses `[HOST_IP:]HOST_PORT[-END]:TARGET_IP:TARGET_PORT[-END][/tcp|/udp]` into one mapping
/// per port, each with `options`. IPv6 addresses go in brackets; the host address defaults to
/// 0.0.0.0; ranges map one to one and must have the same length.
pub fn parse_publish(spec: &str, options: Options) -> Result<Vec<Mapping>, String> {
    let (body, proto) = match spec.rsplit_once('/') {
        Some((body, proto)) => (body, proto.parse::<Proto>()?),
        None => (spec, Proto::Tcp),
    };
    if proto == Proto::Udp && options.proxy_protocol.is_on() {
        return Err(format!(
            "the PROXY protocol is TCP only: a udp mapping cannot have proxy_protocol {}",
            options.proxy_protocol
        ));
    }
    let parts = split_fields(body)?;
    let (host_ip, host_ports, target_ip, target_ports) = match parts.as_slice() {
        [hp, tip, tp] => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), *hp, *tip, *tp),
        [hip, hp, tip, tp] => (parse_ip(hip, "host")?, *hp, *tip, *tp),
        _ => {
            return Err(
                "expected [HOST_IP:]HOST_PORT[-END]:TARGET_IP:TARGET_PORT[-END][/tcp|/udp]".into(),
            )
        }
    };
    let target_ip = parse_ip(target_ip, "target")?;
    if target_ip.is_unspecified() {
        return Err(format!(
            "target address {target_ip} is not an address to connect to"
        ));
    }
    if host_ip.is_ipv4() && target_ip.is_ipv6() {
        return Err(format!(
            "backend family mismatch: IPv4 host address {host_ip} cannot target IPv6 address {target_ip}"
        ));
    }
    let hosts = parse_port_range(host_ports, "host", 0)?;
    let targets = parse_port_range(target_ports, "target", 1)?;
    // Counted in u32: 0-65535 has 65,536 ports, one more than u16 holds.
    let len = |(a, b): (u16, u16)| u32::from(b) - u32::from(a) + 1;
    if len(hosts) != len(targets) {
        return Err(format!(
            "host range {}-{} has {} ports but target range {}-{} has {}",
            hosts.0,
            hosts.1,
            len(hosts),
            targets.0,
            targets.1,
            len(targets)
        ));
    }
    if hosts.0 == 0 && hosts.1 != 0 {
        return Err("host port 0 (any free port) cannot be part of a range".into());
    }
    Ok((hosts.0..=hosts.1)
        .zip(targets.0..=targets.1)
        .map(|(host, target)| Mapping {
            proto,
            listen: SocketAddr::new(host_ip, host),
            target: SocketAddr::new(target_ip, target),
            options: options.clone(),
        })
        .collect())
}

/// Splits on ':' outside brackets.
fn split_fields(s: &str) -> Result<Vec<&str>, String> {
    let mut fields = Vec::new();
    let mut start = 0;
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' if depth > 0 => depth -= 1,
            ']' => return Err("unbalanced ']'".into()),
            ':' if depth == 0 => {
                fields.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '['".into());
    }
    fields.push(&s[start..]);
    Ok(fields)
}

fn parse_ip(s: &str, which: &str) -> Result<IpAddr, String> {
    let inner = s.strip_prefix('[').and_then(|s| s.strip_suffix(']'));
    let ip = match inner {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().map(IpAddr::V6),
        None => s.parse::<std::net::Ipv4Addr>().map(IpAddr::V4),
    };
    ip.map(|ip| ip.to_canonical()).map_err(|_| {
        if inner.is_none() && s.contains(':') {
            format!("invalid {which} address {s:?} (IPv6 addresses go in brackets)")
        } else {
            format!("invalid {which} address {s:?}")
        }
    })
}

/// A port or a run of ports, `N` or `N-M`, as specs and `[[proxy_protocol]]` tables write
/// them: `(first, last)`, each at least `min`. `which` names them in messages (`host`,
/// `target`; empty for plain ports).
pub fn parse_port_range(s: &str, which: &str, min: u16) -> Result<(u16, u16), String> {
    let (port_name, range_name) = match which {
        "" => ("port".to_string(), "port range".to_string()),
        which => (format!("{which} port"), format!("{which} range")),
    };
    let port = |p: &str| -> Result<u16, String> {
        p.parse::<u16>()
            .ok()
            .filter(|&n| n >= min)
            .ok_or_else(|| format!("invalid {port_name} {p:?} (must be {min}-65535)"))
    };
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (port(a)?, port(b)?);
            if b < a {
                return Err(format!("{range_name} {a}-{b} ends before it starts"));
            }
            Ok((a, b))
        }
        None => port(s).map(|p| (p, p)),
    }
}

/// An OS error as a short lowercase phrase ("address already in use"), the way Go prints it,
/// without Rust's " (os error 98)" suffix — these strings end up in `docker run` output.
pub fn describe(err: &std::io::Error) -> String {
    let text = err.to_string();
    let text = match text.find(" (os error") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_runs_of_contiguous_ports_to_one_target() {
        let mut all = parse_publish("8000-8002:10.0.0.2:80-82", Options::default()).unwrap();
        all.extend(parse_publish("8003:10.0.0.2:90", Options::default()).unwrap());
        all.extend(parse_publish("8004:10.0.0.3:84", Options::default()).unwrap());
        all.extend(parse_publish("8005-8006:10.0.0.3:85-86/udp", Options::default()).unwrap());
        all.reverse();
        let runs: Vec<String> = runs(all, |m| m).iter().map(|r| describe_run(r)).collect();
        assert_eq!(
            runs,
            [
                "tcp 0.0.0.0:8000-8002 -> 10.0.0.2:80-82",
                "tcp 0.0.0.0:8003 -> 10.0.0.2:90",
                "tcp 0.0.0.0:8004 -> 10.0.0.3:84",
                "udp 0.0.0.0:8005-8006 -> 10.0.0.3:85-86",
            ]
        );
    }

    fn one(spec: &str) -> String {
        let m = parse_publish(spec, Options::default()).unwrap_or_else(|e| panic!("{spec}: {e}"));
        assert_eq!(m.len(), 1);
        m[0].spec()
    }

    #[test]
    fn publish_specs() {
        assert_eq!(one("8080:10.0.0.2:80"), "0.0.0.0:8080:10.0.0.2:80/tcp");
        assert_eq!(
            one("127.0.0.1:8080:10.0.0.2:80/udp"),
            "127.0.0.1:8080:10.0.0.2:80/udp"
        );
        assert_eq!(
            one("[::1]:8080:[fd00::2]:80/tcp"),
            "[::1]:8080:[fd00::2]:80/tcp"
        );
        assert_eq!(one("[::]:53:10.0.0.2:53/udp"), "[::]:53:10.0.0.2:53/udp");
        assert_eq!(
            one("[::ffff:127.0.0.1]:1:10.0.0.2:2"),
            "127.0.0.1:1:10.0.0.2:2/tcp"
        );
        let r = parse_publish("20000-20002:10.0.0.2:30000-30002/udp", Options::default()).unwrap();
        let specs: Vec<String> = r.iter().map(Mapping::spec).collect();
        assert_eq!(
            specs,
            [
                "0.0.0.0:20000:10.0.0.2:30000/udp",
                "0.0.0.0:20001:10.0.0.2:30001/udp",
                "0.0.0.0:20002:10.0.0.2:30002/udp"
            ]
        );
        // Round trip: what ls prints parses back to the same mapping.
        for m in r {
            assert_eq!(
                parse_publish(&m.spec(), Options::default()).unwrap(),
                vec![m]
            );
        }
    }

    #[test]
    fn bad_publish_specs_say_why() {
        for (spec, why) in [
            ("8080", "expected"),
            ("8080:10.0.0.2", "expected"),
            ("8080:10.0.0.2:80/sctp", "sctp"),
            ("8080:10.0.0.2:80/icmp", "unknown protocol"),
            ("::1:8080:10.0.0.2:80", "expected"),
            ("1-3:10.0.0.2:5-6", "has 3 ports but target range 5-6 has 2"),
            ("9-3:10.0.0.2:9-3", "ends before it starts"),
            ("8080:10.0.0.2:0", "invalid target port"),
            ("70000:10.0.0.2:80", "invalid host port"),
            ("8080:0.0.0.0:80", "not an address"),
            ("8080:10.0.0:80", "invalid target address"),
            ("127.0.0.1:8080:[::1]:80", "family mismatch"),
            ("fd00::1:8080:10.0.0.2:80", "expected"),
            (
                "0-65535:10.0.0.2:1-65535",
                "has 65536 ports but target range 1-65535 has 65535",
            ),
            ("[fd00::1:8080:10.0.0.2:80", "unbalanced"),
        ] {
            let err = parse_publish(spec, Options::default()).expect_err(spec);
            assert!(err.contains(why), "{spec}: {err:?} lacks {why:?}");
        }
    }

    #[test]
    fn os_errors_read_like_go() {
        let e = std::io::Error::from_raw_os_error(libc::EADDRINUSE);
        assert_eq!(describe(&e), "address already in use");
        let e = std::io::Error::other("Custom thing");
        assert_eq!(describe(&e), "custom thing");
    }

    use proptest::prelude::*;

    fn ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u16; 8]>().prop_map(IpAddr::from),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Any string: mappings or a reason, never a panic.
        #[test]
        fn any_spec_parses_or_is_refused(spec in "[-0-9a-f.:\\[\\]/tcpud]{0,40}") {
            match parse_publish(&spec, Options::default()) {
                Ok(m) => prop_assert!(!m.is_empty() && m.len() <= 65_536),
                Err(e) => prop_assert!(!e.is_empty()),
            }
        }

        /// Ranges of any length and position, up to the whole port space.
        #[test]
        fn any_range_maps_one_to_one(a in 0u16.., b in 0u16.., t in 1u16.., udp in any::<bool>()) {
            let (lo, hi) = (a.min(b), a.max(b));
            let len = u32::from(hi) - u32::from(lo);
            let spec = format!("{lo}-{hi}:10.0.0.2:{t}-{}{}", u32::from(t) + len, if udp { "/udp" } else { "" });
            match parse_publish(&spec, Options::default()) {
                Ok(m) => {
                    prop_assert_eq!(m.len() as u32, len + 1);
                    prop_assert!(lo != 0 || hi == 0);
                }
                Err(e) => prop_assert!(
                    u32::from(t) + len > 65_535 || (lo == 0 && hi != 0),
                    "{}: {}", spec, e
                ),
            }
        }

        /// What `ls` prints parses back to the same mapping, for any addresses and ports.
        #[test]
        fn specs_round_trip(host in ip(), target in ip(), hp in any::<u16>(), tp in 1u16.., udp in any::<bool>()) {
            let host = host.to_canonical();
            let target = match (host, target.to_canonical()) {
                // An IPv4 host address only targets IPv4.
                (IpAddr::V4(_), IpAddr::V6(v6)) => IpAddr::from(v6.octets()[12..16].try_into().unwrap_or([10, 0, 0, 1])),
                (_, t) => t,
            };
            prop_assume!(!target.is_unspecified());
            let m = Mapping {
                proto: if udp { Proto::Udp } else { Proto::Tcp },
                listen: SocketAddr::new(host, hp),
                target: SocketAddr::new(target, tp),
                options: Options::default(),
            };
            prop_assert_eq!(parse_publish(&m.spec(), Options::default()), Ok(vec![m]));
        }
    }
}
