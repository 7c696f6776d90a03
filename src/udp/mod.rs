//! UDP: one frontend socket, a flow per (client, local destination) with its own connected
//! socket toward the target, and replies sent back through the frontend from the address the
//! client used (IP_PKTINFO / IPV6_PKTINFO), so multi-address hosts answer from the right IP.
//!
//! Both directions move datagrams in batches (recvmmsg/sendmmsg, up to 32 per system call)
//! through one set of receive buffers per runtime thread: per-packet system calls were the
//! bottleneck, and per-flow buffers would cost gigabytes at the flow limit.

pub mod flows;

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::mapping::describe;
use crate::options::Options;
use crate::stats::{Failure, Stats};
use crate::stop::Stop;
use crate::sys;
use flows::{now_ms, Activity, FlowKey, FlowTable};

/// Whether to send runs of equal-sized datagrams to a flow as one segmented message (UDP GSO,
/// Linux 4.18+): cleared for good when a route cannot offload it (EIO), and by `RPROXY_UDP_GSO=0`.
static GSO: AtomicBool = AtomicBool::new(true);

/// Larger than any UDP payload (65,507 bytes over IPv4, 65,527 over IPv6).
const MAX_DATAGRAM: usize = 1 << 16;

/// What the UDP path takes from a mapping's options.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Silence (both directions) after which a flow expires.
    pub idle_timeout: Duration,
    /// Flows before the least recently used is evicted.
    pub max_flows: usize,
}

impl From<&Options> for Config {
    fn from(o: &Options) -> Config {
        Config {
            idle_timeout: o.udp_timeout,
            max_flows: o.udp_max_flows,
        }
    }
}

/// `RPROXY_UDP_GSO=0`: send datagram by datagram, never as one segmented message.
pub fn disable_gso() {
    GSO.store(false, Relaxed);
}

/// A live flow: its socket toward the target and the task relaying replies. Dropping it stops
/// the task, which closes the socket.
struct Flow {
    socket: Arc<Upstream>,
    replies: JoinHandle<()>,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

/// A flow's connected socket toward the target, and the largest datagram it may send as a
/// GSO segment: its path's unfragmented payload, asked of the kernel the first time a run of
/// datagrams could use it ([`UNKNOWN`] until then), 0 once the kernel refused a segmented send.
struct Upstream {
    socket: UdpSocket,
    ipv6: bool,
    max_segment: AtomicUsize,
}

/// [`Upstream::max_segment`] before the path MTU has been asked: most flows (a DNS query, a
/// handshake) never send two datagrams at once, and need not pay for the syscall.
const UNKNOWN: usize = usize::MAX;

impl Upstream {
    fn new(socket: UdpSocket, target: SocketAddr) -> Upstream {
        Upstream {
            socket,
            ipv6: target.is_ipv6(),
            max_segment: AtomicUsize::new(if GSO.load(Relaxed) { UNKNOWN } else { 0 }),
        }
    }

    /// The segment limit for sending `n` datagrams (0: no segmentation).
    fn max_segment(&self, n: usize) -> usize {
        if n < 2 {
            return 0;
        }
        match self.max_segment.load(Relaxed) {
            UNKNOWN => {
                let known =
                    sys::max_unfragmented_payload(self.socket.as_fd(), self.ipv6).unwrap_or(0);
                self.max_segment.store(known, Relaxed);
                known
            }
            max => max,
        }
    }
}

/// Everything a reply task needs to send back to its client.
struct ReplyPath {
    frontend: Arc<UdpSocket>,
    frontend_v6: bool,
    client: SocketAddr,
    local: Option<IpAddr>,
    stats: Arc<Stats>,
    /// As [`Upstream::max_segment`], toward the client. The frontend is not connected, so its
    /// path MTU is unknown: segments are tried up to the UDP maximum, and the kernel's EINVAL
    /// (a segment larger than the route's MTU) turns GSO off for this flow.
    max_segment: AtomicUsize,
}

thread_local! {
    /// Receive buffers shared by every frontend and reply task on this runtime thread; only
    /// borrowed between a receive and the sends it feeds, never across an await.
    static BATCH: RefCell<Option<sys::RecvBatch>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's receive batch.
fn with_batch<T>(f: impl FnOnce(&mut sys::RecvBatch) -> T) -> T {
    BATCH.with(|cell| {
        let mut slot = cell.borrow_mut();
        f(slot.get_or_insert_with(|| sys::RecvBatch::new(MAX_DATAGRAM)))
    })
}

/// Datagrams that did not fit a full socket buffer, copied out to be sent after awaiting room.
type Leftovers = Vec<(Arc<Upstream>, Vec<u8>)>;

/// Serves the frontend until `stop`. The table is owned by this loop alone (no lock); reply
/// tasks report their flow's expiry back over a channel.
pub async fn serve(
    frontend: UdpSocket,
    target: SocketAddr,
    config: Config,
    stats: Arc<Stats>,
    mut stop: Stop,
) {
    let frontend = Arc::new(frontend);
    let (expired_tx, mut expired_rx) = mpsc::unbounded_channel();
    let mut ctx = Dispatch {
        frontend_v6: frontend.local_addr().is_ok_and(|a| a.is_ipv6()),
        frontend: frontend.clone(),
        target,
        config,
        stats,
        table: FlowTable::new(config.max_flows),
        expired_tx,
    };
    loop {
        tokio::select! {
            biased;
            _ = stop.wait() => {
                // Flows close with the table; UDP has nothing to drain.
                ctx.stats.active.store(0, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            Some((key, id)) = expired_rx.recv() => {
                if ctx.table.remove(&key, id).is_some() {
                    Stats::sub(&ctx.stats.active, 1);
                    Stats::add(&ctx.stats.expired, 1);
                    tracing::debug!("udp flow {} expired ({} left)", key.0, ctx.table.len());
                }
                continue;
            }
            ready = frontend.readable() => if let Err(e) = ready {
                tracing::error!("udp frontend failed: {}", describe(&e));
                return;
            },
        }
        loop {
            let round = with_batch(|batch| {
                match frontend.try_io(Interest::READABLE, || batch.recv(frontend.as_fd())) {
                    Ok(n) => Ok(Some(ctx.dispatch(batch, n))),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                    Err(e) => Err(e),
                }
            });
            match round {
                Ok(Some(leftovers)) => {
                    for (upstream, data) in leftovers {
                        match upstream.socket.send(&data).await {
                            Ok(n) => {
                                Stats::add(&ctx.stats.bytes_in, n as u64);
                                Stats::add(&ctx.stats.datagrams_in, 1);
                            }
                            Err(e) => ctx.stats.fail(Failure::of(&e)),
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    // Transient kernel trouble (ENOMEM, ICMP errors); never spin on it.
                    tracing::warn!("udp receive failed: {}", describe(&e));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    break;
                }
            }
        }
    }
}

/// The frontend loop's state: the flow table and what new flows need.
struct Dispatch {
    frontend: Arc<UdpSocket>,
    frontend_v6: bool,
    target: SocketAddr,
    config: Config,
    stats: Arc<Stats>,
    table: FlowTable<Flow>,
    /// Reply tasks report their flow's expiry here: (key, flow id).
    expired_tx: mpsc::UnboundedSender<(FlowKey, u64)>,
}

impl Dispatch {
    /// Forwards one received batch: consecutive datagrams of the same flow go out in one
    /// sendmmsg. Returns what a full socket buffer could not take.
    fn dispatch(&mut self, batch: &sys::RecvBatch, n: usize) -> Leftovers {
        let mut leftovers = Vec::new();
        let mut run: Vec<&[u8]> = Vec::with_capacity(sys::BATCH);
        let mut run_socket: Option<Arc<Upstream>> = None;
        for i in 0..n {
            let received = batch.received[i];
            if received.truncated {
                tracing::warn!(
                    "udp datagram from {} larger than {MAX_DATAGRAM} bytes dropped",
                    received.source
                );
                self.stats.fail(Failure::TooLarge);
                continue;
            }
            let Some(socket) = self.flow((received.source, received.destination)) else {
                continue;
            };
            if run_socket
                .as_ref()
                .is_some_and(|s| !Arc::ptr_eq(s, &socket))
            {
                self.flush(run_socket.take().unwrap(), &mut run, &mut leftovers);
            }
            run_socket = Some(socket);
            run.push(batch.datagram(i));
        }
        if let Some(socket) = run_socket {
            self.flush(socket, &mut run, &mut leftovers);
        }
        leftovers
    }

    /// The flow for `key`, created (with its reply task) on first sight.
    fn flow(&mut self, key: FlowKey) -> Option<Arc<Upstream>> {
        if let Some(entry) = self.table.get(&key) {
            entry.activity.touch();
            return Some(entry.flow.socket.clone());
        }
        let socket = match connect(self.target) {
            Ok(s) => Arc::new(Upstream::new(s, self.target)),
            Err(e) => {
                self.stats.fail(Failure::of(&e));
                match self.stats.warning_due() {
                    Some(n) => tracing::warn!(
                        "udp flow to {} not opened: {} ({n} since the last warning)",
                        self.target,
                        describe(&e)
                    ),
                    None => {
                        tracing::debug!("udp flow to {} not opened: {}", self.target, describe(&e))
                    }
                }
                return None;
            }
        };
        if let Some((old, _flow)) = self.table.make_room() {
            Stats::sub(&self.stats.active, 1);
            Stats::add(&self.stats.evicted, 1);
            tracing::debug!(
                "udp flow {} evicted: {} flows is the limit",
                old.0,
                self.config.max_flows
            );
        }
        let activity = Arc::new(Activity::default());
        activity.touch();
        let path = ReplyPath {
            frontend: self.frontend.clone(),
            frontend_v6: self.frontend_v6,
            client: key.0,
            local: key.1,
            stats: self.stats.clone(),
            max_segment: AtomicUsize::new(if GSO.load(Relaxed) {
                sys::GSO_MAX_BYTES
            } else {
                0
            }),
        };
        Stats::add(&self.stats.total, 1);
        Stats::add(&self.stats.active, 1);
        tracing::debug!("udp flow {} opened to {}", key.0, self.target);
        let expired = self.expired_tx.clone();
        let (s, a, timeout) = (socket.clone(), activity.clone(), self.config.idle_timeout);
        self.table.insert(key, activity, |id| Flow {
            socket: socket.clone(),
            replies: tokio::spawn(async move {
                replies(&s.socket, &path, &a, timeout).await;
                let _ = expired.send((key, id));
            }),
        });
        Some(socket)
    }

    /// Sends a run of datagrams for one flow; keeps copies of what did not fit.
    fn flush(&self, upstream: Arc<Upstream>, run: &mut Vec<&[u8]>, leftovers: &mut Leftovers) {
        let socket = &upstream.socket;
        let mut sent = 0;
        let mut retried = false;
        while sent < run.len() {
            let max_segment = upstream.max_segment(run.len() - sent);
            match socket.try_io(Interest::WRITABLE, || {
                sys::send_batch(socket.as_fd(), &run[sent..], max_segment)
            }) {
                Ok(n) => {
                    let bytes: usize = run[sent..sent + n].iter().map(|d| d.len()).sum();
                    Stats::add(&self.stats.bytes_in, bytes as u64);
                    Stats::add(&self.stats.datagrams_in, n as u64);
                    sent += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    leftovers.extend(run[sent..].iter().map(|d| (upstream.clone(), d.to_vec())));
                    break;
                }
                Err(e) if max_segment > 0 && refuses_segmentation(&e) => {
                    upstream.max_segment.store(0, Relaxed);
                }
                // A stale ICMP port-unreachable from an earlier datagram, not this one: retry once.
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) && !retried => {
                    retried = true
                }
                Err(e) => {
                    tracing::debug!("udp datagram to {} dropped: {}", self.target, describe(&e));
                    self.stats.fail(Failure::of(&e));
                    sent += 1;
                }
            }
        }
        run.clear();
    }
}

/// Whether a failed segmented send means "not like this": a segment larger than the path's
/// MTU (EINVAL on a connected socket, EMSGSIZE on the frontend; the flow then sends datagram
/// by datagram), or a route that cannot offload checksums (EIO; the process stops segmenting
/// altogether).
fn refuses_segmentation(e: &io::Error) -> bool {
    match e.raw_os_error() {
        Some(libc::EINVAL | libc::EMSGSIZE) => true,
        Some(libc::EIO) => {
            if GSO.swap(false, Relaxed) {
                tracing::info!(
                    "UDP segmentation offload unavailable: sending datagrams one by one"
                );
            }
            true
        }
        _ => false,
    }
}

/// Receive buffer asked for on UDP sockets that take bursts (frontends).
const RECEIVE_BUFFER: usize = 4 << 20;

/// Raises a socket's receive buffer to [`RECEIVE_BUFFER`]: SO_RCVBUFFORCE when privileged
/// (past net.core.rmem_max), else as far as rmem_max allows.
pub fn grow_receive_buffer(socket: &impl AsFd) {
    if socket2::SockRef::from(socket)
        .set_recv_buffer_size(RECEIVE_BUFFER)
        .is_ok()
    {
        let _ = sys::force_receive_buffer(socket.as_fd(), RECEIVE_BUFFER);
    }
}

/// A fresh connected socket toward the target (kernel-chosen source address and port).
fn connect(target: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = match target {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.connect(target)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// Relays the target's replies to the client until the flow has been idle for `timeout`.
async fn replies(flow: &UdpSocket, path: &ReplyPath, activity: &Activity, timeout: Duration) {
    let timeout_ms = timeout.as_millis() as u64;
    // A flow socket starts with the kernel's default buffer (~208 KiB: cheap for the many
    // small flows); one whose replies fill a whole batch is streaming, and gets the
    // frontend's buffer so bursts from the target are not dropped before they are read.
    let mut grown = false;
    loop {
        let deadline = activity.last() + timeout_ms;
        let now = now_ms();
        if now >= deadline {
            return;
        }
        tokio::select! {
            r = flow.readable() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_millis(deadline - now)) => continue,
        }
        loop {
            let round = with_batch(|batch| {
                match flow.try_io(Interest::READABLE, || batch.recv(flow.as_fd())) {
                    Ok(n) => {
                        activity.touch();
                        if n == sys::BATCH && !grown {
                            grow_receive_buffer(flow);
                            grown = true;
                        }
                        Some(path.send(batch, n))
                    }
                    // Drained; or an ICMP error from the target (nothing to relay).
                    Err(_) => None,
                }
            });
            match round {
                None => break,
                Some(leftovers) => {
                    for data in leftovers {
                        let sent = path
                            .frontend
                            .async_io(Interest::WRITABLE, || path.send_one(&data))
                            .await;
                        if let Err(e) = sent {
                            tracing::debug!(
                                "udp reply to {} dropped: {}",
                                path.client,
                                describe(&e)
                            );
                        }
                    }
                }
            }
        }
    }
}

impl ReplyPath {
    /// Sends a received batch back to the client; returns copies of what did not fit.
    fn send(&self, batch: &sys::RecvBatch, n: usize) -> Vec<Vec<u8>> {
        let datagrams: Vec<&[u8]> = (0..n)
            .filter(|&i| !batch.received[i].truncated)
            .map(|i| batch.datagram(i))
            .collect();
        let mut sent = 0;
        while sent < datagrams.len() {
            let fd: BorrowedFd<'_> = self.frontend.as_fd();
            let max_segment = self.max_segment.load(Relaxed);
            let result = self.frontend.try_io(Interest::WRITABLE, || {
                sys::send_batch_from(
                    fd,
                    &datagrams[sent..],
                    &self.client,
                    self.local,
                    self.frontend_v6,
                    max_segment,
                )
            });
            match result {
                Ok(k) => {
                    let bytes: usize = datagrams[sent..sent + k].iter().map(|d| d.len()).sum();
                    Stats::add(&self.stats.bytes_out, bytes as u64);
                    Stats::add(&self.stats.datagrams_out, k as u64);
                    sent += k;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return datagrams[sent..].iter().map(|d| d.to_vec()).collect();
                }
                Err(e) if max_segment > 0 && refuses_segmentation(&e) => {
                    self.max_segment.store(0, Relaxed);
                }
                Err(e) => {
                    tracing::debug!("udp reply to {} dropped: {}", self.client, describe(&e));
                    self.stats.fail(Failure::of(&e));
                    sent += 1;
                }
            }
        }
        Vec::new()
    }

    fn send_one(&self, data: &[u8]) -> io::Result<usize> {
        let n = sys::send_from(
            self.frontend.as_fd(),
            data,
            &self.client,
            self.local,
            self.frontend_v6,
        )?;
        Stats::add(&self.stats.bytes_out, n as u64);
        Stats::add(&self.stats.datagrams_out, 1);
        Ok(n)
    }
}
