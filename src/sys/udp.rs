//! UDP with packet info — learn each datagram's local destination, reply from it — and in
//! batches: recvmmsg/sendmmsg, and runs of equal datagrams as one segmented message (GSO).

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};

use super::{cvt, cvt_size, set_int_option};

/// Asks the kernel to report each datagram's destination address. An AF_INET6 socket gets
/// IPV6_RECVPKTINFO and also IP_PKTINFO, which Linux honours for the IPv4 datagrams a
/// dual-stack socket receives.
pub fn enable_pktinfo(fd: BorrowedFd<'_>, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        set_int_option(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
        // A V6ONLY socket never sees IPv4 traffic; failure here is harmless.
        let _ = set_int_option(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1);
        Ok(())
    } else {
        set_int_option(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)
    }
}

/// SO_RCVBUFFORCE: a receive buffer past net.core.rmem_max (needs CAP_NET_ADMIN).
pub fn force_receive_buffer(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    set_int_option(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        bytes.min(i32::MAX as usize) as libc::c_int,
    )
}

/// The largest UDP payload a connected socket can send unfragmented: its path MTU (IP_MTU /
/// IPV6_MTU) less the IP and UDP headers. GSO segments must fit it.
pub fn max_unfragmented_payload(fd: BorrowedFd<'_>, ipv6: bool) -> io::Result<usize> {
    let (level, name, headers) = match ipv6 {
        true => (libc::IPPROTO_IPV6, libc::IPV6_MTU, 40 + 8),
        false => (libc::IPPROTO_IP, libc::IP_MTU, 20 + 8),
    };
    let mut mtu: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into our int and updates `len`.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            &mut mtu as *mut _ as *mut libc::c_void,
            &mut len,
        )
    })?;
    Ok((mtu as usize).saturating_sub(headers))
}

/// One received datagram's envelope.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    /// Its length (as received; see `truncated`).
    pub len: usize,
    /// Who sent it.
    pub source: SocketAddr,
    /// The local address the datagram was sent to, when the kernel reported it.
    pub destination: Option<IpAddr>,
    /// The datagram was larger than the buffer and was cut.
    pub truncated: bool,
}

// Room for both pktinfo messages: a dual-stack socket receiving IPv4 gets IPV6_PKTINFO and
// IP_PKTINFO together (72 bytes); 8-byte aligned.
const CMSG_SPACE: usize = 128;

#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_SPACE]);

fn sockaddr_to_std(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: ss_family says the storage holds a sockaddr_in, which it is large enough for.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: ss_family says the storage holds a sockaddr_in6, which it is large enough for.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn std_to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            let sin = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Reads the destination address out of a received message's control data.
///
/// # Safety
/// `msg` must be a msghdr filled in by recvmsg/recvmmsg whose `msg_control` points to a live
/// buffer of at least `msg_controllen` bytes.
unsafe fn pktinfo_destination(msg: &libc::msghdr) -> Option<IpAddr> {
    let mut destination = None;
    // SAFETY (for the block): the CMSG_* macros walk only within msg_control/msg_controllen
    // (guaranteed by the caller), and a payload is read only when its header's length covers
    // it (a truncated message may be shorter).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            let h = &*c;
            let fits = |size: usize| h.cmsg_len as usize >= libc::CMSG_LEN(size as u32) as usize;
            if h.cmsg_level == libc::IPPROTO_IP
                && h.cmsg_type == libc::IP_PKTINFO
                && fits(size_of::<libc::in_pktinfo>())
            {
                let info = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::in_pktinfo);
                destination = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    info.ipi_addr.s_addr,
                ))));
            } else if h.cmsg_level == libc::IPPROTO_IPV6
                && h.cmsg_type == libc::IPV6_PKTINFO
                && fits(size_of::<libc::in6_pktinfo>())
            {
                let info = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::in6_pktinfo);
                // A dual-stack socket reports IPv4 destinations as v4-mapped: keep one form.
                destination =
                    Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)).to_canonical());
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    destination
}

/// Control messages for one sendmsg, written back to back into a [`CmsgBuf`].
struct Cmsgs {
    buf: CmsgBuf,
    len: usize,
}

impl Cmsgs {
    fn new() -> Cmsgs {
        Cmsgs {
            buf: CmsgBuf([0; CMSG_SPACE]),
            len: 0,
        }
    }

    /// Appends one message. The buffer holds far more than the two rproxy sends at most (a
    /// pktinfo and a segment size); one that would not fit is left out.
    fn push<T: Copy>(&mut self, level: libc::c_int, kind: libc::c_int, value: T) {
        let size = size_of::<T>() as u32;
        // SAFETY: the CMSG_* macros are pure arithmetic on their argument.
        let (space, len, data_at) = unsafe {
            (
                libc::CMSG_SPACE(size) as usize,
                libc::CMSG_LEN(size),
                libc::CMSG_LEN(0) as usize,
            )
        };
        if self.len + space > CMSG_SPACE {
            return;
        }
        let mut header: libc::cmsghdr = unsafe_zeroed();
        header.cmsg_len = len as _;
        header.cmsg_level = level;
        header.cmsg_type = kind;
        let at = self.buf.0[self.len..].as_mut_ptr();
        // SAFETY: `space` bytes are left at `at` (checked above): the header at its start and
        // the value right after it (at CMSG_LEN(0), where CMSG_DATA points) fit; unaligned
        // writes need no alignment.
        unsafe {
            std::ptr::write_unaligned(at as *mut libc::cmsghdr, header);
            std::ptr::write_unaligned(at.add(data_at) as *mut T, value);
        }
        self.len += space;
    }

    /// A pktinfo message choosing `from` as the source address. An AF_INET6 socket
    /// (`ipv6_socket`) takes IPV6_PKTINFO, with IPv4 sources v4-mapped (Linux accepts that for
    /// v4-mapped destinations); an AF_INET one IP_PKTINFO.
    fn source(&mut self, from: IpAddr, ipv6_socket: bool) {
        match (from, ipv6_socket) {
            (from, true) => {
                let v6 = match from {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: v6.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                self.push(libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, info);
            }
            (IpAddr::V4(v4), false) => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(v4).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                self.push(libc::IPPROTO_IP, libc::IP_PKTINFO, info);
            }
            // An IPv6 source cannot go out of an AF_INET socket: let routing choose.
            (IpAddr::V6(_), false) => {}
        }
    }

    /// UDP_SEGMENT: the payload is cut into datagrams of `size` bytes (the last may be shorter).
    fn segment_size(&mut self, size: u16) {
        self.push(libc::SOL_UDP, UDP_SEGMENT, size);
    }

    /// Points `msg` at these messages (or at none). `self` must stay put while `msg` is used.
    fn attach(&mut self, msg: &mut libc::msghdr) {
        if self.len == 0 {
            msg.msg_control = std::ptr::null_mut();
            msg.msg_controllen = 0;
        } else {
            msg.msg_control = self.buf.0.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = self.len as _;
        }
    }
}

/// sendmsg(2) one datagram to `to`, with `from` as its source address when given
/// (IP_PKTINFO `ipi_spec_dst` / IPV6_PKTINFO, interface left to routing).
pub fn send_from(
    fd: BorrowedFd<'_>,
    buf: &[u8],
    to: &SocketAddr,
    from: Option<IpAddr>,
    ipv6_socket: bool,
) -> io::Result<usize> {
    let (mut name, namelen) = std_to_sockaddr(to);
    let mut cmsgs = Cmsgs::new();
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut msg: libc::msghdr = unsafe_zeroed();
    msg.msg_name = &mut name as *mut _ as *mut libc::c_void;
    msg.msg_namelen = namelen;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(from) = from {
        cmsgs.source(from, ipv6_socket);
    }
    cmsgs.attach(&mut msg);
    // SAFETY: all pointers in msg reference live locals with correct lengths; sendmsg only
    // reads through them.
    cvt_size(unsafe {
        libc::sendmsg(
            fd.as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

/// All-zero plain-old-data structs (msghdr, sockaddr_storage, mmsghdr).
fn unsafe_zeroed<T: Zeroable>() -> T {
    // SAFETY: only implemented for C structs of integers and raw pointers, for which all-zero
    // bytes are a valid value.
    unsafe { zeroed() }
}

trait Zeroable {}
impl Zeroable for libc::msghdr {}
impl Zeroable for libc::mmsghdr {}
impl Zeroable for libc::sockaddr_storage {}
impl Zeroable for libc::cmsghdr {}

/// Datagrams per recvmmsg/sendmmsg call.
pub const BATCH: usize = 32;

/// Receive buffers for one recvmmsg call: `BATCH` slots large enough for any datagram. Pages
/// are touched only as far as datagrams fill them, so mostly-small traffic stays cheap.
pub struct RecvBatch {
    data: Vec<u8>,
    slot: usize,
    names: Vec<libc::sockaddr_storage>,
    cmsgs: Vec<CmsgBuf>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    /// The envelopes of the last `recv`, one per datagram.
    pub received: Vec<Received>,
}

impl RecvBatch {
    /// Buffers for [`BATCH`] datagrams of up to `slot` bytes each.
    pub fn new(slot: usize) -> RecvBatch {
        RecvBatch {
            data: vec![0; slot * BATCH],
            slot,
            names: (0..BATCH).map(|_| unsafe_zeroed()).collect(),
            cmsgs: (0..BATCH).map(|_| CmsgBuf([0; CMSG_SPACE])).collect(),
            iovs: Vec::with_capacity(BATCH),
            hdrs: Vec::with_capacity(BATCH),
            received: Vec::with_capacity(BATCH),
        }
    }

    /// The payload of datagram `i` of the last receive.
    pub fn datagram(&self, i: usize) -> &[u8] {
        let start = i * self.slot;
        &self.data[start..start + self.received[i].len.min(self.slot)]
    }

    /// Receives up to `BATCH` datagrams (non-blocking: WouldBlock when none); returns how many,
    /// with their envelopes in `received`.
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        self.iovs.clear();
        self.hdrs.clear();
        self.received.clear();
        for chunk in self.data.chunks_mut(self.slot) {
            self.iovs.push(libc::iovec {
                iov_base: chunk.as_mut_ptr() as *mut libc::c_void,
                iov_len: chunk.len(),
            });
        }
        for i in 0..BATCH {
            let mut h: libc::mmsghdr = unsafe_zeroed();
            h.msg_hdr.msg_name = &mut self.names[i] as *mut _ as *mut libc::c_void;
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = self.cmsgs[i].0.as_mut_ptr() as *mut libc::c_void;
            h.msg_hdr.msg_controllen = CMSG_SPACE as _;
            self.hdrs.push(h);
        }
        // SAFETY: each header points at this batch's own name, iovec (into `data`) and cmsg
        // buffers with their true sizes; none of these Vecs is resized while the call runs.
        let n = cvt(unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        })? as usize;
        for i in 0..n {
            let h = &self.hdrs[i];
            // An IP socket always reports an IP source; anything else is dropped as if truncated.
            let source = sockaddr_to_std(&self.names[i]);
            self.received.push(Received {
                len: h.msg_len as usize,
                source: source.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
                // SAFETY: filled by recvmmsg; the cmsg buffer it points to is alive in `self`.
                destination: unsafe { pktinfo_destination(&h.msg_hdr) },
                truncated: source.is_none() || h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            });
        }
        Ok(self.received.len())
    }
}

/// The UDP_SEGMENT socket option / cmsg (linux/udp.h), not in every libc target.
const UDP_SEGMENT: libc::c_int = 103;
/// Segments one GSO send may carry (UDP_MAX_SEGMENTS before Linux 6.9; 128 since).
const GSO_MAX_SEGMENTS: usize = 64;
/// Payload of one GSO send: what fits an IPv4 datagram (65,535 less IP and UDP headers).
pub const GSO_MAX_BYTES: usize = 65_507;

/// Where the GSO group starting at `start` ends: following datagrams of the same size, and
/// at most one shorter one to close it, within the kernel's segment and size limits. Only
/// datagrams of at most `max_segment` bytes (what the path takes unfragmented) are grouped.
pub fn gso_group_end(datagrams: &[&[u8]], start: usize, max_segment: usize) -> usize {
    let size = datagrams[start].len();
    let (mut end, mut bytes) = (start + 1, size);
    if size == 0 || size > max_segment {
        return end;
    }
    while end < datagrams.len() && end - start < GSO_MAX_SEGMENTS {
        let len = datagrams[end].len();
        if len == 0 || len > size || bytes + len > GSO_MAX_BYTES {
            break;
        }
        (end, bytes) = (end + 1, bytes + len);
        if len < size {
            break;
        }
    }
    end
}

/// (first datagram, count) of each message that sends `datagrams` (see [`gso_group_end`]).
fn gso_groups(datagrams: &[&[u8]], max_segment: usize) -> Vec<(usize, usize)> {
    let mut groups = Vec::with_capacity(datagrams.len());
    let mut start = 0;
    while start < datagrams.len() {
        let end = gso_group_end(datagrams, start, max_segment);
        groups.push((start, end - start));
        start = end;
    }
    groups
}

/// sendmmsg(2) on a connected socket: sends `datagrams` in order; returns how many were sent
/// (a short count means the socket buffer filled). With `max_segment` above 0, runs of
/// equal-sized datagrams up to that size go as one message with UDP_SEGMENT, so the stack is
/// traversed once per run and the kernel (or the NIC) cuts it into the same datagrams; EIO
/// then means the route cannot do it, EINVAL that a segment no longer fits the path.
pub fn send_batch(
    fd: BorrowedFd<'_>,
    datagrams: &[&[u8]],
    max_segment: usize,
) -> io::Result<usize> {
    send_groups(fd, datagrams, None, max_segment)
}

/// sendmmsg(2) of datagrams to one destination, each with `from` as its source address (see
/// [`send_from`]), segmented as [`send_batch`] does with `max_segment` above 0; returns how
/// many datagrams were sent.
pub fn send_batch_from(
    fd: BorrowedFd<'_>,
    datagrams: &[&[u8]],
    to: &SocketAddr,
    from: Option<IpAddr>,
    ipv6_socket: bool,
    max_segment: usize,
) -> io::Result<usize> {
    send_groups(fd, datagrams, Some((to, from, ipv6_socket)), max_segment)
}

/// Both batch senders: one message per GSO group (see [`gso_groups`]), addressed to
/// `to = (destination, source, ipv6_socket)` when the socket is not connected.
fn send_groups(
    fd: BorrowedFd<'_>,
    datagrams: &[&[u8]],
    to: Option<(&SocketAddr, Option<IpAddr>, bool)>,
    max_segment: usize,
) -> io::Result<usize> {
    let mut name = to.map(|(to, _, _)| std_to_sockaddr(to));
    let mut iovs: Vec<libc::iovec> = datagrams
        .iter()
        .map(|d| libc::iovec {
            iov_base: d.as_ptr() as *mut libc::c_void,
            iov_len: d.len(),
        })
        .collect();
    let groups = gso_groups(datagrams, max_segment);
    let mut cmsgs: Vec<Cmsgs> = groups.iter().map(|_| Cmsgs::new()).collect();
    let mut hdrs: Vec<libc::mmsghdr> = Vec::with_capacity(groups.len());
    for (&(first, count), cmsg) in groups.iter().zip(cmsgs.iter_mut()) {
        let mut h: libc::mmsghdr = unsafe_zeroed();
        if let Some((name, namelen)) = &mut name {
            h.msg_hdr.msg_name = name as *mut _ as *mut libc::c_void;
            h.msg_hdr.msg_namelen = *namelen;
        }
        h.msg_hdr.msg_iov = &mut iovs[first];
        h.msg_hdr.msg_iovlen = count as _;
        if let Some((_, Some(from), ipv6_socket)) = to {
            cmsg.source(from, ipv6_socket);
        }
        if count > 1 {
            cmsg.segment_size(datagrams[first].len() as u16);
        }
        cmsg.attach(&mut h.msg_hdr);
        hdrs.push(h);
    }
    // SAFETY: headers point at `name`, `count` consecutive iovecs in `iovs` (into borrowed
    // slices) and their own entry in `cmsgs`, all alive and unmoved for the call; sendmmsg
    // only reads through them.
    let sent = cvt(unsafe {
        libc::sendmmsg(
            fd.as_raw_fd(),
            hdrs.as_mut_ptr(),
            hdrs.len() as libc::c_uint,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })? as usize;
    Ok(groups[..sent].iter().map(|g| g.1).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(sizes: &[usize]) -> Vec<usize> {
        let data: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0; n]).collect();
        let slices: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
        let (mut start, mut out) = (0, Vec::new());
        while start < slices.len() {
            let end = gso_group_end(&slices, start, GSO_MAX_BYTES);
            out.push(end - start);
            start = end;
        }
        out
    }

    #[test]
    fn gso_groups_follow_the_kernels_rules() {
        // Equal sizes group; a shorter one closes the group; a longer one starts the next.
        assert_eq!(groups(&[100, 100, 100, 50, 100]), [4, 1]);
        assert_eq!(groups(&[100, 200, 200]), [1, 2]);
        // Empty datagrams are sent alone (a zero segment size is invalid).
        assert_eq!(groups(&[0, 0, 10, 0]), [1, 1, 1, 1]);
        // At most 64 segments, and at most 65,507 bytes in all.
        assert_eq!(groups(&[1; 130]), [64, 64, 2]);
        assert_eq!(groups(&[16_000; 5]), [4, 1]);
        assert_eq!(groups(&[65_000, 1]), [2]);
        assert_eq!(groups(&[65_000, 600]), [1, 1]);
    }

    #[test]
    fn gso_groups_only_what_fits_the_path() {
        let data = [vec![0u8; 1472], vec![0; 1472], vec![0; 1473], vec![0; 1473]];
        let slices: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
        assert_eq!(gso_group_end(&slices, 0, 1472), 2);
        assert_eq!(gso_group_end(&slices, 2, 1472), 3);
        assert_eq!(gso_group_end(&slices, 0, 0), 1);
    }
}
