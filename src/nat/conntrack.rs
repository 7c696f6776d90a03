//! Forgetting translated UDP flows when their mapping goes. UDP has no end: a client that
//! keeps sending keeps its conntrack entry alive, and with it the old DNAT (the classic "the
//! port still goes to the removed container" failure), so the entries are deleted over
//! ctnetlink. TCP connections already translated are left to finish, as the listener drains.

use std::net::IpAddr;

use super::netlink::{self, Attrs, Netlink, NFNL_SUBSYS_CTNETLINK};
use crate::mapping::{Mapping, Proto};

const IPCTNL_MSG_CT_GET: u8 = 1;
const IPCTNL_MSG_CT_DELETE: u8 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_FILTER: u16 = 25;
const CTA_FILTER_REPLY_FLAGS: u16 = 2;
const CTA_FILTER_FLAG_IP_SRC: u32 = 1 << 0;
const CTA_FILTER_FLAG_PROTO_NUM: u32 = 1 << 3;
const CTA_FILTER_FLAG_PROTO_SRC_PORT: u32 = 1 << 4;

/// Deletes the conntrack entries of UDP flows `m`'s rules translated: to its host port, with
/// replies from its target. Returns how many went.
pub fn forget(nl: &mut Netlink, m: &Mapping) -> Result<usize, netlink::Error> {
    if m.proto != Proto::Udp {
        return Ok(0);
    }
    let family = match m.target.ip() {
        IpAddr::V4(_) => netlink::NFPROTO_IPV4,
        IpAddr::V6(_) => netlink::NFPROTO_IPV6,
    };
    // Let the kernel pick the flows whose replies come from the target (Linux 5.8+); an
    // older kernel refuses the filter, and the whole table is read instead.
    let dump = |nl: &mut Netlink, filter| {
        nl.dump_in(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_GET, family, filter)
    };
    let entries = match dump(nl, reply_filter(m)) {
        Ok(e) => e,
        Err(e) if matches!(e.errno, libc::EINVAL | libc::EOPNOTSUPP) => dump(nl, Attrs::default())?,
        Err(e) => return Err(e),
    };
    tracing::debug!("{m}: {} conntrack entries to look at", entries.len());
    let mut deleted = 0;
    for e in &entries {
        let (Some(orig), Some(reply)) = (
            netlink::find(&e.attrs, CTA_TUPLE_ORIG),
            netlink::find(&e.attrs, CTA_TUPLE_REPLY),
        ) else {
            continue;
        };
        let ours = proto_field(orig, CTA_PROTO_NUM) == Some(vec![libc::IPPROTO_UDP as u8])
            && proto_field(orig, CTA_PROTO_DST_PORT)
                == Some(m.listen.port().to_be_bytes().to_vec())
            && reply_source(reply) == Some((m.target.ip(), m.target.port()));
        if !ours {
            continue;
        }
        let mut a = Attrs::default();
        a.nested_raw(CTA_TUPLE_ORIG, orig);
        match nl.request(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_DELETE, family, a) {
            Ok(()) => deleted += 1,
            // Expired meanwhile.
            Err(e) if e.errno == libc::ENOENT => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// A dump filter: UDP flows whose reply tuple's source is `m`'s target.
fn reply_filter(m: &Mapping) -> Attrs {
    let mut a = Attrs::default();
    a.nest(CTA_TUPLE_REPLY, |t| {
        t.nest(CTA_TUPLE_IP, |ip| {
            match m.target.ip() {
                IpAddr::V4(v4) => ip.put(1, &v4.octets()), // CTA_IP_V4_SRC
                IpAddr::V6(v6) => ip.put(3, &v6.octets()), // CTA_IP_V6_SRC
            };
        })
        .nest(CTA_TUPLE_PROTO, |p| {
            p.put(CTA_PROTO_NUM, &[libc::IPPROTO_UDP as u8])
                .put(CTA_PROTO_SRC_PORT, &m.target.port().to_be_bytes());
        });
    })
    .nest(CTA_FILTER, |f| {
        // A host-order u32, unlike most netfilter attributes.
        let flags =
            CTA_FILTER_FLAG_IP_SRC | CTA_FILTER_FLAG_PROTO_NUM | CTA_FILTER_FLAG_PROTO_SRC_PORT;
        f.put(CTA_FILTER_REPLY_FLAGS, &flags.to_ne_bytes());
    });
    a
}

fn proto_field(tuple: &[u8], kind: u16) -> Option<Vec<u8>> {
    let proto = netlink::find(tuple, CTA_TUPLE_PROTO)?;
    netlink::find(proto, kind).map(<[u8]>::to_vec)
}

/// The source of a reply tuple: where the translated flow really goes.
fn reply_source(tuple: &[u8]) -> Option<(IpAddr, u16)> {
    let ip = netlink::find(tuple, CTA_TUPLE_IP)?;
    // CTA_IP_V4_SRC = 1, CTA_IP_V6_SRC = 3.
    let addr = match (netlink::find(ip, 1), netlink::find(ip, 3)) {
        (Some(v4), _) => IpAddr::from(<[u8; 4]>::try_from(v4).ok()?),
        (_, Some(v6)) => IpAddr::from(<[u8; 16]>::try_from(v6).ok()?),
        _ => return None,
    };
    let port = proto_field(tuple, CTA_PROTO_SRC_PORT)?;
    Some((addr, u16::from_be_bytes(port.try_into().ok()?)))
}
