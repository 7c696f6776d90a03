//! Allow-lists in the kernel: who may reach a published port, judged in prerouting ahead of
//! any DNAT — rproxy's own, dockerd's iptables rules (legacy or nf_tables backend), Docker
//! 29's nftables ones — whatever the mapping's NAT mode, since without it a port dockerd
//! DNATs is reachable from everywhere (FORWARD, not INPUT, sees its packets, so the host's
//! firewall never does).
//!
//! What it adds to rproxy's table, as `nft list table inet rproxy` prints it:
//!
//! ```text
//! map allow-local { type nf_proto . inet_proto . inet_service : verdict; elements = { ipv4 . tcp . 8080 : jump allow-1 } }
//! map allow-ip    { type ipv4_addr . inet_proto . inet_service : verdict }
//! map allow-ip6   { type ipv6_addr . inet_proto . inet_service : verdict }
//! set allow-1 { type ipv4_addr; flags interval; comment "rproxy allow-list SPEC"; elements = { 10.70.2.0/24 } }
//! chain allow-1 {
//!     meta nfproto ipv4 fib daddr type local ip saddr != @allow-1 counter drop comment "rproxy allow-list SPEC"
//! }
//! chain allow {
//!     type filter hook prerouting priority mangle; policy accept;
//!     iif "lo" accept
//!     ct state != new accept
//!     meta nfproto . meta l4proto . th dport vmap @allow-local
//!     ip daddr . meta l4proto . th dport vmap @allow-ip
//!     ip6 daddr . meta l4proto . th dport vmap @allow-ip6
//! }
//! ```
//!
//! - Priority -150: after conntrack (-200), so `ct state` is known, and before every DNAT
//!   (-100: rproxy's chains, iptables' nat PREROUTING of either backend, Docker's nftables),
//!   so the destination is still the published address and port.
//! - `iif "lo"`: what a host process sends to one of the host's addresses comes back in
//!   through loopback, as new; the host is never judged. A container dialling a host address
//!   arrives from its bridge and is judged by its own address.
//! - `ct state != new`: a list judges new connections and new UDP flows (the listener judges
//!   at accept and when a flow is made); packets of flows it let in, and replies, pass.
//! - Each packet costs three hash lookups however many mappings have lists, and one lookup in
//!   an interval set however long the list; a list's change is one transaction that empties
//!   its set and fills it again, so no packet sees a half-made list.
//! - A mapping on 0.0.0.0 or :: is keyed by family, protocol and port, and its chain checks
//!   that the destination is local; one on a host address is keyed by that address.

use std::net::IpAddr;

use ipnet::IpNet;

use super::netlink::{self, Attrs, Message, NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6};
use super::rules::{self, Match};
use crate::allow::AllowList;
use crate::mapping::{Mapping, Proto};

/// The base chain.
pub const BASE: &str = "allow";
/// Its priority: NF_IP_PRI_MANGLE, between conntrack (-200) and dstnat (-100).
pub const PRIORITY: i32 = -150;
/// The dispatch maps: wildcard mappings, then those on one IPv4 or IPv6 host address.
const LOCAL: &str = "allow-local";
const AT4: &str = "allow-ip";
const AT6: &str = "allow-ip6";
/// Every filter rule's comment starts so; the mapping's spec follows.
const COMMENT: &str = "rproxy allow-list ";

/// Elements per NEWSETELEM message: an attribute's length is 16 bits, and an IPv6 element
/// takes about 40 bytes.
const CHUNK: usize = 1000;

// nf_tables.h numbers.
const NFT_MSG_DELCHAIN: u8 = 5;
const NFT_MSG_NEWSET: u8 = 9;
const NFT_MSG_DELSET: u8 = 11;
const NFT_MSG_NEWSETELEM: u8 = 12;
const NFT_MSG_DELSETELEM: u8 = 14;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_CHAIN_USERDATA: u16 = 12;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_MAP: u32 = 0x8;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NFT_JUMP: i32 = -3;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
/// 32-bit registers: a concatenation's fields go in consecutive ones from NFT_REG_1 (= 8).
const NFT_REG32_00: u32 = 8;
const NFT_META_IIF: u32 = 4;
const NFT_META_L4PROTO: u32 = 16;
const NFT_META_NFPROTO: u32 = 15;
const NFT_CT_STATE: u32 = 0;
/// NF_CT_STATE_BIT(IP_CT_NEW).
const CT_STATE_NEW: u32 = 8;
const LOOPBACK_IFINDEX: u32 = 1;
const NFT_LOOKUP_F_INV: u32 = 1;
// nftables' own types and userdata, so `nft list` prints the sets as it would its own.
const TYPE_NFPROTO: u32 = 2;
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const NFTNL_UDATA_SET_KEYBYTEORDER: u8 = 0;
const NFTNL_UDATA_SET_COMMENT: u8 = 7;
const NFTNL_UDATA_CHAIN_COMMENT: u8 = 0;
const NFTNL_UDATA_RULE_COMMENT: u8 = 0;
const NFTNL_UDATA_SET_ELEM_FLAGS: u8 = 1;
const NFTNL_SET_ELEM_F_INTERVAL_OPEN: u32 = 1;
const BYTEORDER_BIG_ENDIAN: u32 = 2;

/// Where the base chain finds a mapping: a dispatch map and the element's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    map: &'static str,
    bytes: Vec<u8>,
}

/// `m`'s key: (family, protocol, port) for a wildcard listen address, (address, protocol,
/// port) for one host address. Each field fills a 32-bit register, zero-padded.
pub fn key(m: &Mapping) -> Key {
    let pad = |bytes: &[u8]| {
        let mut v = bytes.to_vec();
        v.resize(4, 0);
        v
    };
    let tail = [
        pad(&[l4proto(m.proto)]),
        pad(&m.listen.port().to_be_bytes()),
    ]
    .concat();
    match m.listen.ip() {
        ip if ip.is_unspecified() => Key {
            map: LOCAL,
            bytes: [pad(&[nfproto(ip)]), tail].concat(),
        },
        IpAddr::V4(v4) => Key {
            map: AT4,
            bytes: [v4.octets().to_vec(), tail].concat(),
        },
        IpAddr::V6(v6) => Key {
            map: AT6,
            bytes: [v6.octets().to_vec(), tail].concat(),
        },
    }
}

/// The chain and set of filter `id`.
pub fn name(id: u32) -> String {
    format!("allow-{id}")
}

/// The comment on `m`'s filter rule, set and chain.
pub fn comment(m: &Mapping) -> String {
    format!("{COMMENT}{}", m.spec())
}

/// The mapping spec a filter rule's comment names.
pub fn spec_of(comment: &str) -> Option<&str> {
    comment.strip_prefix(COMMENT)
}

fn l4proto(p: Proto) -> u8 {
    match p {
        Proto::Tcp => libc::IPPROTO_TCP as u8,
        Proto::Udp => libc::IPPROTO_UDP as u8,
    }
}

fn nfproto(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => NFPROTO_IPV4,
        IpAddr::V6(_) => NFPROTO_IPV6,
    }
}

/// The address ranges (first, last) of `list` in `v6`'s family, merged where they overlap or
/// touch (the kernel refuses overlapping intervals), in order. A mapping's clients all have
/// its listen address's family: the other family's entries do not concern it.
pub fn ranges(list: &AllowList, v6: bool) -> Vec<(u128, u128)> {
    let mut out: Vec<(u128, u128)> = Vec::new();
    let mut all: Vec<(u128, u128)> = list
        .nets()
        .iter()
        .filter_map(|n| match (n, v6) {
            (IpNet::V4(n), false) => Some((
                u128::from(u32::from(n.network())),
                u128::from(u32::from(n.broadcast())),
            )),
            (IpNet::V6(n), true) => Some((u128::from(n.network()), u128::from(n.broadcast()))),
            _ => None,
        })
        .collect();
    all.sort_unstable();
    for (first, last) in all {
        match out.last_mut() {
            Some(prev) if first <= prev.1.saturating_add(1) => prev.1 = prev.1.max(last),
            _ => out.push((first, last)),
        }
    }
    out
}

/// One interval-set element: an interval's first address, or the address after its last
/// (`end`); `open`: the interval runs to the family's last address and has no end element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub key: u128,
    pub end: bool,
    pub open: bool,
}

/// The elements of `ranges` as nft writes them: an end element at address 0 first unless an
/// interval starts there, then each interval's start and end.
pub fn elements(ranges: &[(u128, u128)], v6: bool) -> Vec<Element> {
    let max = if v6 { u128::MAX } else { u128::from(u32::MAX) };
    let mut out = Vec::new();
    if ranges.first().is_some_and(|r| r.0 != 0) {
        out.push(Element {
            key: 0,
            end: true,
            open: false,
        });
    }
    for &(first, last) in ranges {
        let open = last >= max;
        out.push(Element {
            key: first,
            end: false,
            open,
        });
        if !open {
            out.push(Element {
                key: last + 1,
                end: true,
                open: false,
            });
        }
    }
    out
}

fn key_bytes(key: u128, v6: bool) -> Vec<u8> {
    match v6 {
        true => key.to_be_bytes().to_vec(),
        // Ranges of IPv4 lists stay below 2^32.
        false => u32::try_from(key)
            .unwrap_or(u32::MAX)
            .to_be_bytes()
            .to_vec(),
    }
}

/// A userdata TLV (nftnl's udata: one byte of type, one of length), the length capped.
fn udata(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    let value = &value[..value.len().min(255)];
    out.push(kind);
    out.push(value.len() as u8);
    out.extend_from_slice(value);
}

/// A comment as nftnl stores it: NUL-terminated.
fn comment_udata(kind: u8, text: &str) -> Vec<u8> {
    let mut bytes = text.as_bytes()[..text.len().min(250)].to_vec();
    bytes.push(0);
    let mut out = Vec::new();
    udata(&mut out, kind, &bytes);
    out
}

fn msg(kind: u8, flags: u16, attrs: Attrs) -> Message {
    Message::new(kind, NFPROTO_INET, flags, attrs)
}

const CREATE: u16 = netlink::NLM_F_CREATE;

/// The base chain, its dispatch maps and rules: the first filter's batch starts with these.
pub fn base(table: &str) -> Vec<Message> {
    let mut msgs = Vec::new();
    let mut chain = Attrs::default();
    chain
        .str(NFTA_CHAIN_TABLE, table)
        .str(NFTA_CHAIN_NAME, BASE)
        .nest(NFTA_CHAIN_HOOK, |h| {
            h.u32(1, rules::Chain::Prerouting.hook())
                .u32(2, PRIORITY as u32);
        })
        .u32(NFTA_CHAIN_POLICY, NF_ACCEPT)
        .str(NFTA_CHAIN_TYPE, "filter");
    msgs.push(msg(netlink::NFT_MSG_NEWCHAIN, CREATE, chain));
    let concat = |first: u32| (first << 12) | (TYPE_INET_PROTOCOL << 6) | TYPE_INET_SERVICE;
    for (n, (map, key_type, key_len)) in [
        (LOCAL, concat(TYPE_NFPROTO), 12),
        (AT4, concat(TYPE_IPADDR), 12),
        (AT6, concat(TYPE_IP6ADDR), 24),
    ]
    .into_iter()
    .enumerate()
    {
        let mut a = Attrs::default();
        a.str(NFTA_SET_TABLE, table)
            .str(NFTA_SET_NAME, map)
            // Required, though only a set used in its own batch before it has a name needs
            // one: numbers past the maps' are the filters'.
            .u32(NFTA_SET_ID, n as u32 + 1)
            .u32(NFTA_SET_FLAGS, NFT_SET_MAP)
            .u32(NFTA_SET_KEY_TYPE, key_type)
            .u32(NFTA_SET_KEY_LEN, key_len)
            .u32(NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT)
            .u32(NFTA_SET_DATA_LEN, 0);
        msgs.push(msg(NFT_MSG_NEWSET, CREATE, a));
    }
    let rule = |fill: &dyn Fn(&mut Attrs)| {
        let mut a = Attrs::default();
        a.str(rules::NFTA_RULE_TABLE, table)
            .str(rules::NFTA_RULE_CHAIN, BASE)
            .nest(rules::NFTA_RULE_EXPRESSIONS, |list| fill(list));
        msg(netlink::NFT_MSG_NEWRULE, CREATE | netlink::NLM_F_APPEND, a)
    };
    // iif "lo" accept
    msgs.push(rule(&|l| {
        meta(l, NFT_REG_1, NFT_META_IIF);
        rules::cmp(l, true, &LOOPBACK_IFINDEX.to_ne_bytes());
        verdict(l, NF_ACCEPT);
    }));
    // ct state != new accept
    msgs.push(rule(&|l| {
        rules::expr(l, "ct", |d| {
            d.u32(1, NFT_REG_1).u32(2, NFT_CT_STATE); // NFTA_CT_DREG, NFTA_CT_KEY
        });
        rules::cmp(l, false, &CT_STATE_NEW.to_ne_bytes());
        verdict(l, NF_ACCEPT);
    }));
    // meta nfproto . meta l4proto . th dport vmap @allow-local
    msgs.push(rule(&|l| {
        meta(l, NFT_REG_1, NFT_META_NFPROTO);
        meta(l, NFT_REG32_00 + 1, NFT_META_L4PROTO);
        dport(l, NFT_REG32_00 + 2);
        vmap(l, LOCAL);
    }));
    // ip daddr . meta l4proto . th dport vmap @allow-ip (and ip6: the address takes four
    // registers)
    for (v6, map) in [(false, AT4), (true, AT6)] {
        msgs.push(rule(&|l| {
            rules::encode_match(l, &Match::Family { v6 });
            let (offset, len, next) = if v6 { (24, 16, 4) } else { (16, 4, 1) };
            rules::payload(l, 1, offset, len);
            meta(l, NFT_REG32_00 + next, NFT_META_L4PROTO);
            dport(l, NFT_REG32_00 + next + 1);
            vmap(l, map);
        }));
    }
    msgs
}

/// meta KEY → reg.
fn meta(list: &mut Attrs, reg: u32, key: u32) {
    rules::expr(list, "meta", |d| {
        d.u32(1, reg).u32(2, key); // NFTA_META_DREG, NFTA_META_KEY
    });
}

/// th dport → reg.
fn dport(list: &mut Attrs, reg: u32) {
    rules::expr(list, "payload", |d| {
        d.u32(1, reg).u32(2, 2).u32(3, 2).u32(4, 2); // transport header + 2, 2 bytes
    });
}

/// Looks reg 1 (and the following) up in verdict map `map`.
fn vmap(list: &mut Attrs, map: &str) {
    rules::expr(list, "lookup", |d| {
        // NFTA_LOOKUP_SET, NFTA_LOOKUP_SREG, NFTA_LOOKUP_DREG
        d.str(1, map).u32(2, NFT_REG_1).u32(3, NFT_REG_VERDICT);
    });
}

/// immediate verdict (accept, drop).
fn verdict(list: &mut Attrs, code: u32) {
    rules::expr(list, "immediate", |d| {
        d.u32(1, NFT_REG_VERDICT).nest(2, |data| {
            data.nest(NFTA_DATA_VERDICT, |v| {
                v.u32(NFTA_VERDICT_CODE, code);
            });
        });
    });
}

/// The matches of `m`'s filter rule before its source lookup.
pub fn matches(m: &Mapping) -> Vec<Match> {
    let v6 = m.listen.is_ipv6();
    let mut out = vec![Match::Family { v6 }];
    if m.listen.ip().is_unspecified() {
        out.push(Match::DaddrLocal);
    }
    out
}

/// `m`'s filter rule as `nft` prints it (without counters and comment).
pub fn describe(m: &Mapping, id: u32) -> String {
    let mut out = String::new();
    for x in matches(m) {
        out.push_str(&format!("{x} "));
    }
    let ip = if m.listen.is_ipv6() { "ip6" } else { "ip" };
    out.push_str(&format!("{ip} saddr != @{} counter drop", name(id)));
    out
}

/// Creates filter `id` for `m` holding `list`: its set, filled, its chain and rule. The
/// dispatch element that leads to it is [`point`]'s.
pub fn create(table: &str, id: u32, m: &Mapping, list: &AllowList) -> Vec<Message> {
    let v6 = m.listen.is_ipv6();
    let name = name(id);
    let text = comment(m);
    let mut set = Attrs::default();
    let mut u = Vec::new();
    udata(
        &mut u,
        NFTNL_UDATA_SET_KEYBYTEORDER,
        &BYTEORDER_BIG_ENDIAN.to_ne_bytes(),
    );
    u.extend(comment_udata(NFTNL_UDATA_SET_COMMENT, &text));
    set.str(NFTA_SET_TABLE, table)
        .str(NFTA_SET_NAME, &name)
        .u32(NFTA_SET_ID, id.wrapping_add(4))
        .u32(NFTA_SET_FLAGS, NFT_SET_INTERVAL)
        .u32(
            NFTA_SET_KEY_TYPE,
            if v6 { TYPE_IP6ADDR } else { TYPE_IPADDR },
        )
        .u32(NFTA_SET_KEY_LEN, if v6 { 16 } else { 4 })
        .put(NFTA_SET_USERDATA, &u);
    let mut msgs = vec![msg(NFT_MSG_NEWSET, CREATE | netlink::NLM_F_EXCL, set)];
    msgs.extend(fill(table, &name, list, v6));
    let mut chain = Attrs::default();
    chain
        .str(NFTA_CHAIN_TABLE, table)
        .str(NFTA_CHAIN_NAME, &name)
        .put(
            NFTA_CHAIN_USERDATA,
            &comment_udata(NFTNL_UDATA_CHAIN_COMMENT, &text),
        );
    msgs.push(msg(
        netlink::NFT_MSG_NEWCHAIN,
        CREATE | netlink::NLM_F_EXCL,
        chain,
    ));
    let mut rule = Attrs::default();
    rule.str(rules::NFTA_RULE_TABLE, table)
        .str(rules::NFTA_RULE_CHAIN, &name)
        .nest(rules::NFTA_RULE_EXPRESSIONS, |l| {
            for x in matches(m) {
                rules::encode_match(l, &x);
            }
            // ip saddr / ip6 saddr
            match v6 {
                false => rules::payload(l, 1, 12, 4),
                true => rules::payload(l, 1, 8, 16),
            }
            rules::expr(l, "lookup", |d| {
                // NFTA_LOOKUP_SET, NFTA_LOOKUP_SREG, NFTA_LOOKUP_FLAGS
                d.str(1, &name).u32(2, NFT_REG_1).u32(5, NFT_LOOKUP_F_INV);
            });
            rules::expr(l, "counter", |_| {});
            verdict(l, NF_DROP);
        })
        .put(
            rules::NFTA_RULE_USERDATA,
            &comment_udata(NFTNL_UDATA_RULE_COMMENT, &text),
        );
    msgs.push(msg(
        netlink::NFT_MSG_NEWRULE,
        CREATE | netlink::NLM_F_APPEND,
        rule,
    ));
    msgs
}

/// Adds `list`'s elements to set `name`, in messages of at most [`CHUNK`] elements.
fn fill(table: &str, name: &str, list: &AllowList, v6: bool) -> Vec<Message> {
    elements(&ranges(list, v6), v6)
        .chunks(CHUNK)
        .map(|chunk| {
            let mut a = Attrs::default();
            a.str(NFTA_SET_ELEM_LIST_TABLE, table)
                .str(NFTA_SET_ELEM_LIST_SET, name)
                .nest(NFTA_SET_ELEM_LIST_ELEMENTS, |list| {
                    for e in chunk {
                        list.nest(rules::NFTA_LIST_ELEM, |el| {
                            el.nest(NFTA_SET_ELEM_KEY, |k| {
                                k.put(NFTA_DATA_VALUE, &key_bytes(e.key, v6));
                            });
                            if e.end {
                                el.u32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
                            }
                            if e.open {
                                let mut u = Vec::new();
                                udata(
                                    &mut u,
                                    NFTNL_UDATA_SET_ELEM_FLAGS,
                                    &NFTNL_SET_ELEM_F_INTERVAL_OPEN.to_ne_bytes(),
                                );
                                el.put(NFTA_SET_ELEM_USERDATA, &u);
                            }
                        });
                    }
                });
            msg(NFT_MSG_NEWSETELEM, CREATE, a)
        })
        .collect()
}

/// Replaces the elements of filter `id`'s set with `list`'s: a flush (DELSETELEM without
/// elements) and the new ones, to be sent in one batch.
pub fn refill(table: &str, id: u32, m: &Mapping, list: &AllowList) -> Vec<Message> {
    let name = name(id);
    let mut flush = Attrs::default();
    flush
        .str(NFTA_SET_ELEM_LIST_TABLE, table)
        .str(NFTA_SET_ELEM_LIST_SET, &name);
    let mut msgs = vec![msg(NFT_MSG_DELSETELEM, 0, flush)];
    msgs.extend(fill(table, &name, list, m.listen.is_ipv6()));
    msgs
}

/// The dispatch element `key` → jump to filter `id`'s chain.
pub fn point(table: &str, key: &Key, id: u32) -> Message {
    let chain = name(id);
    let mut a = Attrs::default();
    a.str(NFTA_SET_ELEM_LIST_TABLE, table)
        .str(NFTA_SET_ELEM_LIST_SET, key.map)
        .nest(NFTA_SET_ELEM_LIST_ELEMENTS, |list| {
            list.nest(rules::NFTA_LIST_ELEM, |el| {
                el.nest(NFTA_SET_ELEM_KEY, |k| {
                    k.put(NFTA_DATA_VALUE, &key.bytes);
                })
                .nest(NFTA_SET_ELEM_DATA, |d| {
                    d.nest(NFTA_DATA_VERDICT, |v| {
                        v.u32(NFTA_VERDICT_CODE, NFT_JUMP as u32)
                            .str(NFTA_VERDICT_CHAIN, &chain);
                    });
                });
            });
        });
    msg(NFT_MSG_NEWSETELEM, CREATE | netlink::NLM_F_EXCL, a)
}

/// Deletes the dispatch element `key`.
pub fn unpoint(table: &str, key: &Key) -> Message {
    let mut a = Attrs::default();
    a.str(NFTA_SET_ELEM_LIST_TABLE, table)
        .str(NFTA_SET_ELEM_LIST_SET, key.map)
        .nest(NFTA_SET_ELEM_LIST_ELEMENTS, |list| {
            list.nest(rules::NFTA_LIST_ELEM, |el| {
                el.nest(NFTA_SET_ELEM_KEY, |k| {
                    k.put(NFTA_DATA_VALUE, &key.bytes);
                });
            });
        });
    msg(NFT_MSG_DELSETELEM, 0, a)
}

/// Deletes filter `id`: its rule, chain and set (no dispatch element may lead to it).
pub fn delete(table: &str, id: u32) -> Vec<Message> {
    let name = name(id);
    let mut flush = Attrs::default();
    flush
        .str(rules::NFTA_RULE_TABLE, table)
        .str(rules::NFTA_RULE_CHAIN, &name);
    let mut chain = Attrs::default();
    chain
        .str(NFTA_CHAIN_TABLE, table)
        .str(NFTA_CHAIN_NAME, &name);
    let mut set = Attrs::default();
    set.str(NFTA_SET_TABLE, table).str(NFTA_SET_NAME, &name);
    vec![
        msg(netlink::NFT_MSG_DELRULE, 0, flush),
        msg(NFT_MSG_DELCHAIN, 0, chain),
        msg(NFT_MSG_DELSET, 0, set),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::parse_publish;

    fn mapping(spec: &str) -> Mapping {
        parse_publish(spec, Default::default()).unwrap()[0].clone()
    }

    fn list(entries: &[&str]) -> AllowList {
        AllowList::parse(entries).unwrap()
    }

    #[test]
    fn lists_become_merged_ranges_of_the_mappings_family() {
        let l = list(&[
            "10.0.0.0/8",
            "10.1.0.0/16",
            "11.0.0.0/8",
            "192.0.2.7",
            "2001:db8::/32",
        ]);
        let v4 = |a: [u8; 4]| u128::from(u32::from_be_bytes(a));
        assert_eq!(
            ranges(&l, false),
            [
                (v4([10, 0, 0, 0]), v4([11, 255, 255, 255])),
                (v4([192, 0, 2, 7]), v4([192, 0, 2, 7])),
            ]
        );
        let db8: u128 = "2001:db8::".parse::<std::net::Ipv6Addr>().unwrap().into();
        assert_eq!(ranges(&l, true), [(db8, db8 | ((1u128 << 96) - 1))]);
        assert!(ranges(&list(&[]), false).is_empty());
    }

    #[test]
    fn elements_are_written_as_nft_writes_them() {
        let e = |key: u128, end: bool, open: bool| Element { key, end, open };
        // 10.1.0.0/16, 255.255.255.0/24: a leading end at 0, the last interval open.
        let ranges = [(0x0a01_0000, 0x0a01_ffff), (0xffff_ff00, 0xffff_ffff)];
        assert_eq!(
            elements(&ranges, false),
            [
                e(0, true, false),
                e(0x0a01_0000, false, false),
                e(0x0a02_0000, true, false),
                e(0xffff_ff00, false, true),
            ]
        );
        // 0.0.0.0/1: no leading end element.
        assert_eq!(
            elements(&[(0, 0x7fff_ffff)], false),
            [e(0, false, false), e(0x8000_0000, true, false)]
        );
        assert_eq!(elements(&[(0, u128::MAX)], true), [e(0, false, true)]);
        assert!(elements(&[], false).is_empty());
    }

    #[test]
    fn keys_pad_each_field_to_a_register() {
        let k = key(&mapping("8080:10.70.1.2:80/tcp"));
        assert_eq!(
            (k.map, k.bytes),
            (LOCAL, vec![2, 0, 0, 0, 6, 0, 0, 0, 0x1f, 0x90, 0, 0])
        );
        let k = key(&mapping("[::]:53:[fd00::2]:53/udp"));
        assert_eq!((k.map, &k.bytes[..4]), (LOCAL, &[10, 0, 0, 0][..]));
        let k = key(&mapping("192.0.2.7:8080:10.70.1.2:80/tcp"));
        assert_eq!(
            (k.map, k.bytes),
            (AT4, vec![192, 0, 2, 7, 6, 0, 0, 0, 0x1f, 0x90, 0, 0])
        );
        let k = key(&mapping("[2001:db8::1]:53:10.70.1.2:53/udp"));
        assert_eq!((k.map, k.bytes.len(), k.bytes[16]), (AT6, 24, 17));
    }

    #[test]
    fn the_rule_matches_the_listen_family_and_local_addresses_for_a_wildcard() {
        assert_eq!(
            describe(&mapping("8080:10.70.1.2:80/tcp"), 1),
            "meta nfproto ipv4 fib daddr type local ip saddr != @allow-1 counter drop"
        );
        // An IPv6 mapping to an IPv4 target still judges IPv6 clients.
        assert_eq!(
            describe(&mapping("[::]:8080:10.70.1.2:80/tcp"), 2),
            "meta nfproto ipv6 fib daddr type local ip6 saddr != @allow-2 counter drop"
        );
        assert_eq!(
            describe(&mapping("192.0.2.7:8080:10.70.1.2:80/tcp"), 3),
            "meta nfproto ipv4 ip saddr != @allow-3 counter drop"
        );
        let m = mapping("8080:10.70.1.2:80/tcp");
        assert_eq!(spec_of(&comment(&m)), Some(m.spec().as_str()));
    }

    #[test]
    fn long_lists_are_sent_in_several_messages() {
        let entries: Vec<String> = (0..3000u32)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
            .collect();
        let m = mapping("8080:10.70.1.2:80/tcp");
        // Adjacent /24s merge into one range: nothing to split.
        assert_eq!(
            create("t", 1, &m, &AllowList::parse(&entries).unwrap()).len(),
            4
        );
        let sparse: Vec<String> = (0..3000u32)
            .map(|i| format!("10.{}.{}.0/25", i / 256, i % 256))
            .collect();
        let msgs = create("t", 1, &m, &AllowList::parse(&sparse).unwrap());
        // set, 6,001 elements in 7 messages, chain, rule
        assert_eq!(msgs.len(), 1 + 7 + 2);
        assert!(
            refill("t", 1, &m, &list(&[])).len() == 1,
            "an empty list: the flush alone"
        );
    }
}
