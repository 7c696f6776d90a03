//! Whether dockerd already translates a port: its DNAT rule, read back over netlink from the
//! nftables where each engine keeps it, so rproxy adds no second set.
//!
//! - iptables backend (every engine; iptables-nft keeps the rules in nftables): chain `DOCKER`
//!   of table `nat`, in `ip` and `ip6`;
//! - nftables backend (Docker 29, `"firewall-backend": "nftables"`): chain
//!   `nat-prerouting-and-output` of tables `ip docker-bridges` and `ip6 docker-bridges`.
//!
//! Engines up to 27 start the proxy before they add the rule, 28 and later after: one look at
//! start-up is not enough, so the NAT thread looks again (see `worker`). A 6→4 binding (IPv6
//! host address, IPv4 container) never has a dockerd rule. Not visible: iptables-legacy rules,
//! and everything without CAP_NET_ADMIN.

use std::time::{Duration, Instant};

use super::netlink::{self, Attrs, Netlink};
use super::rules;
use crate::mapping::{Mapping, Proto};

/// (table, chain) of each backend's port DNAT rules.
const PLACES: [(&str, &str); 2] = [
    ("nat", "DOCKER"),
    ("docker-bridges", "nat-prerouting-and-output"),
];

/// dockerd's DNAT rules at one moment, by family.
#[derive(Default)]
pub struct Rules {
    v4: Vec<Vec<u8>>,
    v6: Vec<Vec<u8>>,
}

impl Rules {
    /// Reads every place, both families (a table or chain that does not exist has none).
    pub fn read(nl: &mut Netlink) -> Rules {
        let mut out = Rules::default();
        for (family, into) in [
            (netlink::NFPROTO_IPV4, &mut out.v4),
            (netlink::NFPROTO_IPV6, &mut out.v6),
        ] {
            for (table, chain) in PLACES {
                let mut filter = Attrs::default();
                filter
                    .str(rules::NFTA_RULE_TABLE, table)
                    .str(rules::NFTA_RULE_CHAIN, chain);
                if let Ok(found) = nl.dump(netlink::NFT_MSG_GETRULE, family, filter) {
                    into.extend(found.into_iter().map(|r| r.attrs));
                }
            }
        }
        out
    }

    /// Whether a rule translates `m`'s protocol and port for its clients' family.
    pub fn dnat(&self, m: &Mapping) -> bool {
        let rules = match (m.listen.is_ipv6(), m.target.is_ipv6()) {
            (false, false) => &self.v4,
            (true, true) => &self.v6,
            // 6→4: dockerd writes no rule (NAT cannot change the family).
            _ => return false,
        };
        let proto = match m.proto {
            Proto::Tcp => libc::IPPROTO_TCP as u8,
            Proto::Udp => libc::IPPROTO_UDP as u8,
        };
        // dockerd writes `-d H` for a port published on one host address.
        let daddr = Some(m.listen.ip()).filter(|ip| !ip.is_unspecified());
        rules
            .iter()
            .any(|r| rules::translates(r, proto, m.listen.port(), daddr))
    }
}

/// How long one read of dockerd's rules answers for: installs that come together (a range
/// of a thousand ports handed over at once) share a read instead of each dumping every
/// chain. A rule that changes meanwhile is caught by the next look (see `worker`).
const FRESH: Duration = Duration::from_millis(100);

/// dockerd's rules as last read, read again once older than [`FRESH`].
#[derive(Default)]
pub struct Recent {
    read: Option<(Instant, Rules)>,
}

impl Recent {
    /// The rules, read now unless a read is fresh; None when netlink cannot be had.
    pub fn rules(&mut self) -> Option<&Rules> {
        let stale = self
            .read
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() > FRESH);
        if stale {
            let mut nl = Netlink::open().ok()?;
            self.read = Some((Instant::now(), Rules::read(&mut nl)));
        }
        self.read.as_ref().map(|(_, rules)| rules)
    }

    /// Whether dockerd's own rules DNAT `m`'s port (false when they cannot be read).
    pub fn dnat(&mut self, m: &Mapping) -> bool {
        self.rules().is_some_and(|r| r.dnat(m))
    }
}
