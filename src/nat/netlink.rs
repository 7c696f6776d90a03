//! Netlink plumbing for nf_tables: messages as bytes (netlink header, nfgenmsg, attributes),
//! one NETLINK_NETFILTER socket, atomic batches and dumps. The numbers come from
//! include/uapi/linux/netlink.h, netfilter/nfnetlink.h and netfilter/nf_tables.h.
//!
//! Hand-written rather than built on netlink-packet-netfilter: that crate has no types for
//! the fib, nat and counter expressions rproxy's rules are made of, so they would be raw
//! bytes beside its typed ones; one small encoder keeps every attribute in one vocabulary.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use nix::sys::socket::{recv, send, MsgFlags};
use socket2::{Domain, Protocol, Socket, Type};

pub const NFPROTO_INET: u8 = 1;
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_IPV6: u8 = 10;

pub const NFT_MSG_NEWTABLE: u8 = 0;
pub const NFT_MSG_GETTABLE: u8 = 1;
pub const NFT_MSG_DELTABLE: u8 = 2;
pub const NFT_MSG_NEWCHAIN: u8 = 3;
pub const NFT_MSG_NEWRULE: u8 = 6;
pub const NFT_MSG_GETRULE: u8 = 7;
pub const NFT_MSG_DELRULE: u8 = 8;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;
const NLM_F_DUMP: u16 = 0x300;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLM_F_ACK_TLVS: u16 = 0x200;
pub const NFNL_SUBSYS_CTNETLINK: u16 = 1;
pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const HEADER: usize = 16;
const NFGENMSG: usize = 4;

/// Attributes being written: type-length-value, each padded to 4 bytes; nested ones are
/// written by a closure so their length is known when it returns.
#[derive(Default, Clone)]
pub struct Attrs(Vec<u8>);

impl Attrs {
    pub fn put(&mut self, kind: u16, value: &[u8]) -> &mut Attrs {
        let len = 4 + value.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        self.pad();
        self
    }

    /// Integers in attributes are big-endian, unlike the netlink header.
    pub fn u32(&mut self, kind: u16, value: u32) -> &mut Attrs {
        self.put(kind, &value.to_be_bytes())
    }

    pub fn u64(&mut self, kind: u16, value: u64) -> &mut Attrs {
        self.put(kind, &value.to_be_bytes())
    }

    pub fn str(&mut self, kind: u16, value: &str) -> &mut Attrs {
        let mut bytes = value.as_bytes().to_vec();
        bytes.push(0);
        self.put(kind, &bytes)
    }

    /// A nested attribute whose contents are already encoded (as read back in a dump).
    pub fn nested_raw(&mut self, kind: u16, contents: &[u8]) -> &mut Attrs {
        self.put(kind | NLA_F_NESTED, contents)
    }

    pub fn nest(&mut self, kind: u16, fill: impl FnOnce(&mut Attrs)) -> &mut Attrs {
        let mut inner = Attrs::default();
        fill(&mut inner);
        self.put(kind | NLA_F_NESTED, &inner.0)
    }

    #[cfg(test)]
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    fn pad(&mut self) {
        while self.0.len() % 4 != 0 {
            self.0.push(0);
        }
    }
}

/// The attributes in `buf`, as (type, value) with the nested flag masked off.
pub fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let value = &buf[4..len];
        buf = &buf[align(len).min(buf.len())..];
        Some((kind, value))
    })
}

/// The first attribute of `kind` in `buf`.
pub fn find(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(buf).find(|(k, _)| *k == kind).map(|(_, v)| v)
}

pub fn be_u32(value: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(value.get(..4)?.try_into().ok()?))
}

pub fn be_u64(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.get(..8)?.try_into().ok()?))
}

/// A NUL-terminated string attribute.
pub fn string(value: &[u8]) -> String {
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).into_owned()
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// One nf_tables request: its type, address family, flags and attributes.
pub struct Message {
    pub kind: u8,
    pub family: u8,
    pub flags: u16,
    pub attrs: Attrs,
}

impl Message {
    pub fn new(kind: u8, family: u8, flags: u16, attrs: Attrs) -> Message {
        Message {
            kind,
            family,
            flags,
            attrs,
        }
    }
}

/// A reply: the object's attributes (after the nfgenmsg header).
pub struct Reply {
    pub attrs: Vec<u8>,
}

/// What the kernel said no with: an errno, and its extended-ack text when it gave one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub errno: i32,
    pub detail: Option<String>,
}

impl Error {
    fn io(e: io::Error) -> Error {
        Error {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            detail: None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = crate::mapping::describe(&io::Error::from_raw_os_error(self.errno));
        match &self.detail {
            Some(d) => write!(f, "{text} ({d})"),
            None => f.write_str(&text),
        }
    }
}

impl From<nix::errno::Errno> for Error {
    fn from(e: nix::errno::Errno) -> Error {
        Error {
            errno: e as i32,
            detail: None,
        }
    }
}

/// A NETLINK_NETFILTER socket. Tables created with the owner flag belong to this socket's
/// port id: the kernel deletes them when it closes, so it lives as long as the rules do.
pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    pub fn open() -> Result<Netlink, Error> {
        let socket = Socket::new(
            Domain::from(libc::AF_NETLINK),
            Type::RAW.cloexec(),
            Some(Protocol::from(libc::NETLINK_NETFILTER)),
        )
        .map_err(Error::io)?;
        // Short acks (no copy of our request) that carry the kernel's reason for an error.
        let fd = socket.as_fd();
        crate::sys::netlink::set_netlink_option(fd, libc::NETLINK_CAP_ACK, 1).map_err(Error::io)?;
        let _ = crate::sys::netlink::set_netlink_option(fd, libc::NETLINK_EXT_ACK, 1);
        // Replies are queued while the kernel runs the batch; a missing one must not hang us.
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(Error::io)?;
        let _ = socket.set_recv_buffer_size(1 << 20);
        Ok(Netlink {
            socket,
            seq: std::process::id().wrapping_mul(1 << 12),
            buf: vec![0; 1 << 17],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn push(
        &mut self,
        out: &mut Vec<u8>,
        kind: u16,
        flags: u16,
        family: u8,
        res_id: u16,
        attrs: &[u8],
    ) -> u32 {
        let seq = self.next_seq();
        let len = HEADER + NFGENMSG + attrs.len();
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&[family, 0]);
        out.extend_from_slice(&res_id.to_be_bytes());
        out.extend_from_slice(attrs);
        seq
    }

    /// Runs `msgs` as one transaction: all of them apply, or none do and the first error is
    /// returned.
    pub fn batch(&mut self, msgs: &[Message]) -> Result<(), Error> {
        if msgs.is_empty() {
            return Ok(());
        }
        let mut out = Vec::new();
        let begin = self.push(
            &mut out,
            NFNL_MSG_BATCH_BEGIN,
            0,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        let mut first = None;
        for m in msgs {
            let kind = (NFNL_SUBSYS_NFTABLES << 8) | m.kind as u16;
            let seq = self.push(&mut out, kind, m.flags | NLM_F_ACK, m.family, 0, &m.attrs.0);
            first.get_or_insert(seq);
        }
        let last = self.seq;
        self.push(
            &mut out,
            NFNL_MSG_BATCH_END,
            0,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        self.room_for(out.len());
        send(self.socket.as_raw_fd(), &out, MsgFlags::empty())?;
        // Every message asked for an ack; on failure the kernel still answers each one.
        let first = first.unwrap_or(last);
        let mut acked = 0;
        let mut failure = None;
        self.receive(|seq, reply| {
            if seq == begin {
                // The kernel refused the batch itself (no nf_tables, no memory): no more
                // replies come.
                if let Err(e) = reply {
                    failure.get_or_insert(e);
                    return true;
                }
            }
            if seq < first || seq > last {
                return false;
            }
            match reply {
                Ok(Some(_)) => {}
                Ok(None) => acked += 1,
                Err(e) => {
                    failure.get_or_insert(e);
                    acked += 1;
                }
            }
            acked as usize >= msgs.len()
        })?;
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Makes the send buffer hold a batch of `len` bytes: one batch is one message, and
    /// the default buffer (212,992 bytes) refuses a long allow-list's. As root the buffer
    /// may grow past net.core.wmem_max, as nft's does.
    fn room_for(&mut self, len: usize) {
        let want = len.saturating_add(4096);
        if self.socket.send_buffer_size().is_ok_and(|n| n >= want) {
            return;
        }
        use nix::sys::socket::{setsockopt, sockopt::SndBufForce};
        // The kernel takes an int.
        let want = want.min(i32::MAX as usize / 2);
        if setsockopt(&self.socket, SndBufForce, &want).is_err() {
            let _ = self.socket.set_send_buffer_size(want);
        }
    }

    /// An nf_tables dump: every object of `kind` in `family` matching `filter` (e.g. a
    /// table name).
    pub fn dump(&mut self, kind: u8, family: u8, filter: Attrs) -> Result<Vec<Reply>, Error> {
        self.dump_in(NFNL_SUBSYS_NFTABLES, kind, family, filter)
    }

    /// One request outside a batch (ctnetlink has none), answered by an ack or an error.
    pub fn request(
        &mut self,
        subsys: u16,
        kind: u8,
        family: u8,
        attrs: Attrs,
    ) -> Result<(), Error> {
        self.exchange(subsys, kind, NLM_F_ACK, family, attrs)
            .map(drop)
    }

    /// A dump from any nfnetlink subsystem.
    pub fn dump_in(
        &mut self,
        subsys: u16,
        kind: u8,
        family: u8,
        filter: Attrs,
    ) -> Result<Vec<Reply>, Error> {
        self.exchange(subsys, kind, NLM_F_DUMP, family, filter)
    }

    /// Sends one message and collects the objects answering it, until its ack, the end of
    /// the dump, or an error.
    fn exchange(
        &mut self,
        subsys: u16,
        kind: u8,
        flags: u16,
        family: u8,
        attrs: Attrs,
    ) -> Result<Vec<Reply>, Error> {
        let mut out = Vec::new();
        let kind = (subsys << 8) | kind as u16;
        let seq = self.push(&mut out, kind, flags, family, 0, &attrs.0);
        send(self.socket.as_raw_fd(), &out, MsgFlags::empty())?;
        let mut objects = Vec::new();
        let mut failure = None;
        self.receive(|s, reply| {
            if s != seq {
                return false;
            }
            match reply {
                Ok(Some(object)) => {
                    objects.push(object);
                    false
                }
                Ok(None) => true,
                Err(e) => {
                    failure = Some(e);
                    true
                }
            }
        })?;
        match failure {
            Some(e) => Err(e),
            None => Ok(objects),
        }
    }

    /// Reads replies, handing each to `done` as Ok(Some(object)), Ok(None) (an ack or the end
    /// of a dump) or Err, until `done` says so.
    fn receive(
        &mut self,
        mut done: impl FnMut(u32, Result<Option<Reply>, Error>) -> bool,
    ) -> Result<(), Error> {
        loop {
            let n = recv(self.socket.as_raw_fd(), &mut self.buf, MsgFlags::empty())?;
            let mut rest = &self.buf[..n];
            while rest.len() >= HEADER {
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
                if len < HEADER || len > rest.len() {
                    break;
                }
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let flags = u16::from_ne_bytes([rest[6], rest[7]]);
                let seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
                let body = &rest[HEADER..len];
                rest = &rest[align(len).min(rest.len())..];
                let reply = match kind {
                    NLMSG_ERROR => match parse_error(body, flags) {
                        None => Ok(None),
                        Some(e) => Err(e),
                    },
                    NLMSG_DONE => Ok(None),
                    _ if body.len() >= NFGENMSG => Ok(Some(Reply {
                        attrs: body[NFGENMSG..].to_vec(),
                    })),
                    _ => continue,
                };
                if done(seq, reply) {
                    return Ok(());
                }
            }
        }
    }
}

/// An NLMSG_ERROR body: None for an ack, else the error and the kernel's message if any.
fn parse_error(body: &[u8], flags: u16) -> Option<Error> {
    let errno = -i32::from_ne_bytes(body.get(0..4)?.try_into().ok()?);
    if errno == 0 {
        return None;
    }
    // After the errno: the offending request's header (payload cut by NETLINK_CAP_ACK),
    // then the extended-ack attributes.
    let detail = (flags & NLM_F_ACK_TLVS != 0)
        .then(|| body.get(4 + HEADER..))
        .flatten()
        .and_then(|tlvs| find(tlvs, NLMSGERR_ATTR_MSG))
        .map(string)
        .filter(|s| !s.is_empty());
    Some(Error { errno, detail })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_padding_and_nesting() {
        let mut a = Attrs::default();
        a.str(1, "nat").u32(2, 0x0102_0304).nest(3, |n| {
            n.put(1, &[9, 9, 9]);
        });
        // 4+4 ("nat\0"), 4+4, 4+(4+3 padded to 8)
        assert_eq!(a.0.len(), 8 + 8 + 12);
        let got: Vec<(u16, Vec<u8>)> = attrs(&a.0).map(|(k, v)| (k, v.to_vec())).collect();
        assert_eq!(got[0], (1, b"nat\0".to_vec()));
        assert_eq!(be_u32(&got[1].1), Some(0x0102_0304));
        assert_eq!(got[2].0, 3, "nested flag masked off");
        assert_eq!(find(&got[2].1, 1), Some(&[9u8, 9, 9][..]));
        assert_eq!(string(b"rproxy\0\0"), "rproxy");
    }
}
