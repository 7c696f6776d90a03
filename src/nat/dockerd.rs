//! Whether dockerd already translates a port: its iptables DNAT rule, read back over netlink
//! from the nftables that iptables-nft writes, so rproxy adds no second set.

use super::netlink::{self, Attrs, Netlink};
use super::rules;
use crate::mapping::Mapping;

/// Whether dockerd's own iptables rules already DNAT `m`'s port: a rule in the `DOCKER`
/// chain of iptables' nat table (iptables-nft keeps it in nftables) that matches the protocol
/// and destination port and translates. dockerd adds it before it starts the proxy. Then
/// rproxy must not add a second set. Not visible: iptables-legacy rules, and everything
/// without CAP_NET_ADMIN.
pub fn dnats(m: &Mapping) -> bool {
    let family = match m.target.is_ipv6() {
        false => netlink::NFPROTO_IPV4,
        true => netlink::NFPROTO_IPV6,
    };
    let mut filter = Attrs::default();
    filter
        .str(rules::NFTA_RULE_TABLE, "nat")
        .str(rules::NFTA_RULE_CHAIN, "DOCKER");
    let Ok(mut nl) = Netlink::open() else {
        return false;
    };
    let Ok(docker_rules) = nl.dump(netlink::NFT_MSG_GETRULE, family, filter) else {
        return false;
    };
    let proto = match m.proto {
        crate::mapping::Proto::Tcp => libc::IPPROTO_TCP as u8,
        crate::mapping::Proto::Udp => libc::IPPROTO_UDP as u8,
    };
    docker_rules
        .iter()
        .any(|r| rules::translates(&r.attrs, proto, m.listen.port()))
}
