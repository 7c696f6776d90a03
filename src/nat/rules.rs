//! The kernel rules for one mapping, as data: what a packet must match and where DNAT sends
//! it, in which chain of rproxy's table. Choosing them is pure (the route lookup happens
//! before), so the choice is unit-tested and prints the way `nft list` would show it.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use super::netlink::{Attrs, NFPROTO_IPV4, NFPROTO_IPV6};
use crate::mapping::{Mapping, Proto};

/// The base chains of rproxy's table, both at the DNAT priority Docker's own rules use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chain {
    /// Packets arriving from other hosts and from containers.
    Prerouting,
    /// Packets from processes on this host.
    Output,
}

impl Chain {
    pub const ALL: [Chain; 2] = [Chain::Prerouting, Chain::Output];

    pub fn name(self) -> &'static str {
        match self {
            Chain::Prerouting => "prerouting",
            Chain::Output => "output",
        }
    }

    /// NF_INET_PRE_ROUTING / NF_INET_LOCAL_OUT.
    pub fn hook(self) -> u32 {
        match self {
            Chain::Prerouting => 0,
            Chain::Output => 3,
        }
    }
}

/// NF_IP_PRI_NAT_DST: where `nft` puts `priority dstnat` and iptables its nat PREROUTING.
pub const PRIORITY: i32 = -100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// meta nfproto ipv4|ipv6 (the table is `inet`).
    Family { v6: bool },
    /// meta l4proto tcp|udp.
    Proto(Proto),
    /// th dport N.
    Dport(u16),
    /// fib daddr type local: any address of this host (a mapping on 0.0.0.0 or ::).
    DaddrLocal,
    /// ip daddr / ip6 daddr: the mapping's own host address.
    Daddr(IpAddr),
    /// Not 127.0.0.0/8 or ::1: loopback clients stay on the userland listener.
    NotLoopback { v6: bool },
    /// Not from the target's own interface: hairpin traffic (a container reaching a port
    /// published for its own network) goes to the userland listener, as with Docker's proxy.
    IifnameNot(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: Chain,
    pub matches: Vec<Match>,
    pub target: SocketAddr,
    /// Names the mapping (its spec) so rules can be found, counted and removed by it.
    pub comment: String,
}

/// Why a mapping gets no kernel rules and stays entirely in userland.
pub fn userland_only(m: &Mapping) -> Option<&'static str> {
    if m.listen.ip().is_loopback() {
        return Some("it listens on loopback only");
    }
    if m.listen.is_ipv6() && m.target.is_ipv4() {
        return Some("DNAT cannot turn IPv6 clients into IPv4 ones");
    }
    if m.target.ip().is_loopback() {
        return Some("its target is a loopback address");
    }
    None
}

/// The comment every rule of `m` carries.
pub fn comment(m: &Mapping) -> String {
    format!("rproxy {}", m.spec())
}

/// The rules for `m`: one in prerouting (not from `hairpin_if`, the interface the target is
/// reached through) and one in output (not to loopback). Empty when `userland_only`.
pub fn for_mapping(m: &Mapping, hairpin_if: Option<&str>) -> Vec<Rule> {
    if userland_only(m).is_some() {
        return Vec::new();
    }
    let v6 = m.target.is_ipv6();
    let listen = m.listen.ip();
    let mut base = vec![
        Match::Family { v6 },
        Match::Proto(m.proto),
        Match::Dport(m.listen.port()),
    ];
    base.push(match listen.is_unspecified() {
        true => Match::DaddrLocal,
        false => Match::Daddr(listen),
    });
    let mut pre = base.clone();
    if let Some(iface) = hairpin_if {
        pre.push(Match::IifnameNot(iface.to_string()));
    }
    let mut out = base;
    if listen.is_unspecified() {
        out.push(Match::NotLoopback { v6 });
    }
    [(Chain::Prerouting, pre), (Chain::Output, out)]
        .into_iter()
        .map(|(chain, matches)| Rule {
            chain,
            matches,
            target: m.target,
            comment: comment(m),
        })
        .collect()
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ip = |v6: bool| if v6 { "ip6" } else { "ip" };
        match self {
            Match::Family { v6 } => write!(f, "meta nfproto ipv{}", if *v6 { 6 } else { 4 }),
            Match::Proto(p) => write!(f, "meta l4proto {p}"),
            Match::Dport(p) => write!(f, "th dport {p}"),
            Match::DaddrLocal => f.write_str("fib daddr type local"),
            Match::Daddr(a) => write!(f, "{} daddr {a}", ip(a.is_ipv6())),
            Match::NotLoopback { v6: false } => f.write_str("ip daddr != 127.0.0.0/8"),
            Match::NotLoopback { v6: true } => f.write_str("ip6 daddr != ::1"),
            Match::IifnameNot(i) => write!(f, "iifname != \"{i}\""),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.chain.name())?;
        for m in &self.matches {
            write!(f, " {m}")?;
        }
        let family = if self.target.is_ipv6() { "ip6" } else { "ip" };
        write!(f, " counter dnat {family} to {}", self.target)
    }
}

// nf_tables.h attribute numbers, by expression.
pub const NFTA_RULE_TABLE: u16 = 1;
pub const NFTA_RULE_CHAIN: u16 = 2;
pub const NFTA_RULE_HANDLE: u16 = 3;
pub const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub const NFTA_RULE_USERDATA: u16 = 7;
pub const NFTA_LIST_ELEM: u16 = 1;
pub const NFTA_EXPR_NAME: u16 = 1;
pub const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
pub const NFTA_COUNTER_PACKETS: u16 = 2;
/// nftables' rule comment: a userdata TLV the `nft` tool prints as `comment "…"`.
const NFTNL_UDATA_RULE_COMMENT: u8 = 0;
const NFT_REG_1: u32 = 1;
const NFT_REG_2: u32 = 2;

impl Rule {
    /// The NFT_MSG_NEWRULE attributes for this rule in `table`.
    pub fn encode(&self, table: &str) -> Attrs {
        let mut a = Attrs::default();
        a.str(NFTA_RULE_TABLE, table)
            .str(NFTA_RULE_CHAIN, self.chain.name());
        a.nest(NFTA_RULE_EXPRESSIONS, |list| {
            for m in &self.matches {
                encode_match(list, m);
            }
            expr(list, "counter", |_| {});
            let (family, addr) = match self.target.ip() {
                IpAddr::V4(v4) => (NFPROTO_IPV4, v4.octets().to_vec()),
                IpAddr::V6(v6) => (NFPROTO_IPV6, v6.octets().to_vec()),
            };
            immediate(list, NFT_REG_1, &addr);
            immediate(list, NFT_REG_2, &self.target.port().to_be_bytes());
            expr(list, "nat", |d| {
                const NFT_NAT_DNAT: u32 = 1;
                d.u32(1, NFT_NAT_DNAT) // NFTA_NAT_TYPE
                    .u32(2, family as u32) // NFTA_NAT_FAMILY
                    .u32(3, NFT_REG_1) // NFTA_NAT_REG_ADDR_MIN
                    .u32(5, NFT_REG_2); // NFTA_NAT_REG_PROTO_MIN
            });
        });
        let mut udata = vec![NFTNL_UDATA_RULE_COMMENT, (self.comment.len() + 1) as u8];
        udata.extend_from_slice(self.comment.as_bytes());
        udata.push(0);
        a.put(NFTA_RULE_USERDATA, &udata);
        a
    }
}

/// The comment in a rule's userdata, if it has one.
pub fn comment_of(userdata: &[u8]) -> Option<String> {
    let mut rest = userdata;
    while rest.len() >= 2 {
        let (kind, len) = (rest[0], rest[1] as usize);
        let value = rest.get(2..2 + len)?;
        if kind == NFTNL_UDATA_RULE_COMMENT {
            return Some(super::netlink::string(value));
        }
        rest = &rest[2 + len..];
    }
    None
}

/// Whether a rule read back (its NFT_MSG_NEWRULE attributes) matches `meta l4proto PROTO`
/// and `th dport PORT` and translates (a `nat` expression, or iptables-nft's `DNAT` target)
/// every destination `daddr` covers: a rule without a destination address covers all, one
/// with (`-d H`, `ip daddr H`) only that address, so not a wildcard mapping (`daddr` None).
pub fn translates(rule: &[u8], proto: u8, port: u16, daddr: Option<IpAddr>) -> bool {
    use super::netlink::{attrs, be_u32, find, string};
    #[derive(PartialEq)]
    enum Loaded {
        L4proto,
        Dport,
        Daddr,
        Other,
    }
    let (mut loaded, mut proto_ok, mut port_ok, mut nat) = (Loaded::Other, false, false, false);
    let mut rule_daddr: Option<Vec<u8>> = None;
    let exprs = find(rule, NFTA_RULE_EXPRESSIONS).unwrap_or_default();
    for (_, e) in attrs(exprs).filter(|(k, _)| *k == NFTA_LIST_ELEM) {
        let name = find(e, NFTA_EXPR_NAME).map(string).unwrap_or_default();
        let data = find(e, NFTA_EXPR_DATA).unwrap_or_default();
        let u32_at = |kind| find(data, kind).and_then(be_u32);
        match name.as_str() {
            "meta" => {
                loaded = match u32_at(2) {
                    Some(16) => Loaded::L4proto, // NFT_META_L4PROTO
                    _ => Loaded::Other,
                }
            }
            "payload" => {
                loaded = match (u32_at(2), u32_at(3), u32_at(4)) {
                    (Some(2), Some(2), Some(2)) => Loaded::Dport, // transport header + 2, 2 bytes
                    // Network header: the IPv4 (16, 4 bytes) or IPv6 (24, 16) destination.
                    (Some(1), Some(16), Some(4)) | (Some(1), Some(24), Some(16)) => Loaded::Daddr,
                    _ => Loaded::Other,
                }
            }
            "cmp" if u32_at(2) == Some(0) => {
                let value = find(data, 3).and_then(|v| find(v, NFTA_DATA_VALUE));
                match loaded {
                    Loaded::L4proto => proto_ok |= value == Some(&[proto][..]),
                    Loaded::Dport => port_ok |= value == Some(&port.to_be_bytes()[..]),
                    Loaded::Daddr => rule_daddr = value.map(<[u8]>::to_vec),
                    Loaded::Other => {}
                }
            }
            "nat" | "target" => nat = true,
            _ => {}
        }
    }
    let covered = match (daddr, rule_daddr) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(IpAddr::V4(a)), Some(r)) => r == a.octets(),
        (Some(IpAddr::V6(a)), Some(r)) => r == a.octets(),
    };
    proto_ok && port_ok && nat && covered
}

pub(super) fn expr(list: &mut Attrs, name: &str, data: impl FnOnce(&mut Attrs)) {
    list.nest(NFTA_LIST_ELEM, |e| {
        e.str(NFTA_EXPR_NAME, name).nest(NFTA_EXPR_DATA, data);
    });
}

/// meta KEY → reg 1.
fn meta(list: &mut Attrs, key: u32) {
    expr(list, "meta", |d| {
        d.u32(1, NFT_REG_1).u32(2, key); // NFTA_META_DREG, NFTA_META_KEY
    });
}

/// payload BASE OFFSET LEN → reg 1 (base 1 = network header, 2 = transport header).
pub(super) fn payload(list: &mut Attrs, base: u32, offset: u32, len: u32) {
    expr(list, "payload", |d| {
        d.u32(1, NFT_REG_1).u32(2, base).u32(3, offset).u32(4, len);
    });
}

/// reg 1 == value (or !=).
pub(super) fn cmp(list: &mut Attrs, equal: bool, value: &[u8]) {
    expr(list, "cmp", |d| {
        d.u32(1, NFT_REG_1) // NFTA_CMP_SREG
            .u32(2, if equal { 0 } else { 1 }) // NFTA_CMP_OP: NFT_CMP_EQ / NEQ
            .nest(3, |v| {
                v.put(NFTA_DATA_VALUE, value);
            });
    });
}

fn immediate(list: &mut Attrs, reg: u32, value: &[u8]) {
    expr(list, "immediate", |d| {
        d.u32(1, reg).nest(2, |v| {
            v.put(NFTA_DATA_VALUE, value);
        });
    });
}

fn daddr(list: &mut Attrs, v6: bool) {
    match v6 {
        false => payload(list, 1, 16, 4),
        true => payload(list, 1, 24, 16),
    }
}

pub(super) fn encode_match(list: &mut Attrs, m: &Match) {
    const NFT_META_IIFNAME: u32 = 6;
    const NFT_META_NFPROTO: u32 = 15;
    const NFT_META_L4PROTO: u32 = 16;
    match m {
        Match::Family { v6 } => {
            meta(list, NFT_META_NFPROTO);
            cmp(list, true, &[if *v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 }]);
        }
        Match::Proto(p) => {
            meta(list, NFT_META_L4PROTO);
            let number = match p {
                Proto::Tcp => libc::IPPROTO_TCP,
                Proto::Udp => libc::IPPROTO_UDP,
            };
            cmp(list, true, &[number as u8]);
        }
        Match::Dport(port) => {
            payload(list, 2, 2, 2);
            cmp(list, true, &port.to_be_bytes());
        }
        Match::DaddrLocal => {
            expr(list, "fib", |d| {
                const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
                const NFTA_FIB_F_DADDR: u32 = 1 << 1;
                d.u32(1, NFT_REG_1) // NFTA_FIB_DREG
                    .u32(2, NFT_FIB_RESULT_ADDRTYPE)
                    .u32(3, NFTA_FIB_F_DADDR);
            });
            // The address type is a host-order u32 in the register.
            cmp(list, true, &(libc::RTN_LOCAL as u32).to_ne_bytes());
        }
        Match::Daddr(ip) => {
            daddr(list, ip.is_ipv6());
            match ip {
                IpAddr::V4(v4) => cmp(list, true, &v4.octets()),
                IpAddr::V6(v6) => cmp(list, true, &v6.octets()),
            }
        }
        Match::NotLoopback { v6: false } => {
            daddr(list, false);
            expr(list, "bitwise", |d| {
                d.u32(1, NFT_REG_1) // NFTA_BITWISE_SREG
                    .u32(2, NFT_REG_1) // NFTA_BITWISE_DREG
                    .u32(3, 4) // NFTA_BITWISE_LEN
                    .nest(4, |v| {
                        v.put(NFTA_DATA_VALUE, &[255, 0, 0, 0]);
                    })
                    .nest(5, |v| {
                        v.put(NFTA_DATA_VALUE, &[0, 0, 0, 0]);
                    });
            });
            cmp(list, false, &[127, 0, 0, 0]);
        }
        Match::NotLoopback { v6: true } => {
            daddr(list, true);
            cmp(list, false, &std::net::Ipv6Addr::LOCALHOST.octets());
        }
        Match::IifnameNot(name) => {
            meta(list, NFT_META_IIFNAME);
            let mut bytes = name.as_bytes().to_vec();
            bytes.push(0);
            cmp(list, false, &bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::parse_publish;

    fn rules(spec: &str, hairpin: Option<&str>) -> Vec<String> {
        let m = parse_publish(spec, Default::default()).unwrap()[0].clone();
        for_mapping(&m, hairpin)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn wildcard_listen_matches_local_addresses_but_not_loopback_or_hairpin() {
        assert_eq!(
            rules("8080:172.17.0.2:80/tcp", Some("docker0")),
            [
                "prerouting: meta nfproto ipv4 meta l4proto tcp th dport 8080 fib daddr type local \
                 iifname != \"docker0\" counter dnat ip to 172.17.0.2:80",
                "output: meta nfproto ipv4 meta l4proto tcp th dport 8080 fib daddr type local \
                 ip daddr != 127.0.0.0/8 counter dnat ip to 172.17.0.2:80",
            ]
        );
        assert_eq!(
            rules("[::]:53:[fd00::2]:5353/udp", None),
            [
                "prerouting: meta nfproto ipv6 meta l4proto udp th dport 53 fib daddr type local \
                 counter dnat ip6 to [fd00::2]:5353",
                "output: meta nfproto ipv6 meta l4proto udp th dport 53 fib daddr type local \
                 ip6 daddr != ::1 counter dnat ip6 to [fd00::2]:5353",
            ]
        );
    }

    #[test]
    fn specific_host_address_is_matched_exactly() {
        assert_eq!(
            rules("192.0.2.7:8080:172.17.0.2:80/tcp", Some("docker0"))[1],
            "output: meta nfproto ipv4 meta l4proto tcp th dport 8080 ip daddr 192.0.2.7 \
             counter dnat ip to 172.17.0.2:80"
        );
    }

    #[test]
    fn some_mappings_stay_in_userland() {
        for spec in [
            "127.0.0.1:8080:172.17.0.2:80",
            "[::1]:8080:[fd00::2]:80",
            "[::]:8080:172.17.0.2:80",
            "8080:127.0.0.1:80",
        ] {
            assert!(rules(spec, None).is_empty(), "{spec}");
        }
    }

    #[test]
    fn recognises_a_dnat_rule_for_a_port() {
        let m = parse_publish("8080:172.17.0.2:80/tcp", Default::default()).unwrap()[0].clone();
        let rule = &for_mapping(&m, Some("docker0"))[0];
        let bytes = rule.encode("nat").bytes().to_vec();
        assert!(translates(&bytes, 6, 8080, None));
        assert!(!translates(&bytes, 6, 8081, None), "another port");
        assert!(!translates(&bytes, 17, 8080, None), "another protocol");
        // A rule for one host address covers that address, not every one.
        let one = parse_publish("192.0.2.7:8080:172.17.0.2:80/tcp", Default::default()).unwrap()[0]
            .clone();
        let bytes = attrs_bytes(&for_mapping(&one, None)[1].encode("rproxy"));
        let at = |ip: &str| Some(ip.parse().unwrap());
        assert!(translates(&bytes, 6, 8080, at("192.0.2.7")));
        assert!(
            !translates(&bytes, 6, 8080, at("192.0.2.8")),
            "another address"
        );
        assert!(!translates(&bytes, 6, 8080, None), "a wildcard mapping");
    }

    #[test]
    fn comments_survive_the_userdata_encoding() {
        let m = parse_publish("8080:172.17.0.2:80", Default::default()).unwrap()[0].clone();
        let rule = &for_mapping(&m, None)[0];
        let attrs = rule.encode("rproxy");
        let bytes = attrs_bytes(&attrs);
        let udata = super::super::netlink::find(&bytes, NFTA_RULE_USERDATA).unwrap();
        assert_eq!(
            comment_of(udata).as_deref(),
            Some("rproxy 0.0.0.0:8080:172.17.0.2:80/tcp")
        );
    }

    fn attrs_bytes(a: &Attrs) -> Vec<u8> {
        a.bytes().to_vec()
    }
}
