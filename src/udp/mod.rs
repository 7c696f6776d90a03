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
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::frontend::Stop;
use crate::mapping::describe;
use crate::stats::{Failure, Stats};
use crate::sys;
use flows::{now_ms, Activity, FlowKey, FlowTable};

/// Whether to send runs of equal-sized datagrams to a flow as one segmented message (UDP GSO,
/// Linux 4.18+): cleared for good when a route cannot offload it (EIO), and by `RPROXY_UDP_GSO=0`.
static GSO: AtomicBool = AtomicBool::new(true);

/// Larger than any UDP payload (65,507 bytes over IPv4, 65,527 over IPv6).
const MAX_DATAGRAM: usize = 1 << 16;

/// Knobs for one UDP mapping, from the environment (dockerd's argv cannot carry them):
/// `RPROXY_UDP_TIMEOUT` seconds of silence before a flow expires (default 90, as docker-proxy),
/// `RPROXY_UDP_MAX_FLOWS` (default 65,536; the least recently used flow goes past it).
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub idle_timeout: Duration,
    pub max_flows: usize,
}

impl Config {
    pub fn from_env() -> Config {
        let idle_timeout = std::env::var("RPROXY_UDP_TIMEOUT")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(Duration::from_secs_f64)
            .unwrap_or(Duration::from_secs(90));
        let max_flows = std::env::var("RPROXY_UDP_MAX_FLOWS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or(65_536);
        if std::env::var("RPROXY_UDP_GSO").is_ok_and(|v| v == "0") {
            GSO.store(false, Relaxed);
        }
        Config {
            idle_timeout,
            max_flows,
        }
    }
}

/// Descriptors the flow table leaves to the rest of the process: an eighth of the limit, at
/// least 64. A docker-mode process needs about a dozen besides its flows (and one more while
/// a new flow's socket exists before the flow it replaces is evicted); a daemon also holds a
/// listener per mapping, two per TCP connection and its control connections, which grow with
/// the limit an operator gives it, hence a share rather than a number. What the reserve
/// cannot cover (other UDP mappings' flows) is met by evicting when socket() fails (see
/// [`Dispatch::flow`]).
fn reserved_fds(limit: u64) -> u64 {
    (limit / 8).max(64)
}

/// The flow table's bound: the operator's `max_flows`, lowered to what the descriptor limit
/// leaves (a flow holds one socket). Past the limit, socket() would fail for every new
/// client until old flows expire.
fn flow_bound(max_flows: usize) -> usize {
    let Ok(limit) = sys::nofile_limit() else {
        return max_flows;
    };
    let bound = bound_by_fds(max_flows, limit);
    static SAID: AtomicBool = AtomicBool::new(false);
    if bound < max_flows && !SAID.swap(true, Relaxed) {
        tracing::info!(
            "UDP flows per port capped at {bound} (RPROXY_UDP_MAX_FLOWS: {max_flows}) by the \
             descriptor limit of {limit}"
        );
    }
    bound
}

fn bound_by_fds(max_flows: usize, limit: u64) -> usize {
    let by_fds = limit.saturating_sub(reserved_fds(limit)).max(1);
    max_flows.min(usize::try_from(by_fds).unwrap_or(usize::MAX))
}

/// A live flow: its socket toward the target and the task relaying replies. The task holds
/// the socket only while it runs, so dropping the flow closes it at once, and stops the task.
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

/// Serves the frontend until `stop`.
pub async fn serve(
    frontend: UdpSocket,
    target: SocketAddr,
    config: Config,
    stats: Arc<Stats>,
    stop: Stop,
) {
    // As a task of its own, whoever awaits this: tokio polls the future given to block_on
    // (docker mode's) ahead of its run queue, with at most 61 tasks run in between, so a
    // frontend busy with new flows would spawn (and abort) their tasks faster than they run,
    // and starve the reply tasks. A task queues behind them instead.
    struct Abort(JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut task = Abort(tokio::spawn(relay(frontend, target, config, stats, stop)));
    let _ = (&mut task.0).await;
}

/// The frontend loop. The table is owned by it alone (no lock); reply tasks report their
/// flow's expiry back over a channel.
async fn relay(
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
        table: FlowTable::new(flow_bound(config.max_flows)),
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
                    // Let the flows' tasks run now and then (every 128 rounds) while the
                    // frontend stays busy.
                    tokio::task::coop::consume_budget().await;
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

    /// The flow for `key`, opened (with its reply task) on first sight. When the process is
    /// out of what a socket needs, the least recently used flow gives up its own, and the
    /// socket is asked for once more.
    fn flow(&mut self, key: FlowKey) -> Option<Arc<Upstream>> {
        if let Some(entry) = self.table.get(&key) {
            entry.activity.touch();
            return Some(entry.flow.socket.clone());
        }
        let opened = match connect(self.target) {
            Err(e) if out_of_resources(&e) => match self.table.evict() {
                Some((old, flow)) => {
                    drop(flow); // closes its socket
                    self.evicted(old, &describe(&e));
                    connect(self.target)
                }
                None => Err(e),
            },
            opened => opened,
        };
        let socket = match opened {
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
            let why = format!("{} flows is the limit", self.table.max());
            self.evicted(old, &why);
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
        let (s, a, timeout) = (
            Arc::downgrade(&socket),
            activity.clone(),
            self.config.idle_timeout,
        );
        self.table.insert(key, activity, |id| Flow {
            socket: socket.clone(),
            replies: tokio::spawn(async move {
                replies(s, &path, &a, timeout).await;
                let _ = expired.send((key, id));
            }),
        });
        Some(socket)
    }

    fn evicted(&self, old: FlowKey, why: &str) {
        Stats::sub(&self.stats.active, 1);
        Stats::add(&self.stats.evicted, 1);
        tracing::debug!("udp flow {} evicted: {why}", old.0);
    }

    /// Sends a run of datagrams for one flow; keeps copies of what did not fit.
    fn flush(&self, upstream: Arc<Upstream>, run: &mut Vec<&[u8]>, leftovers: &mut Leftovers) {
        let socket = &upstream.socket;
        let mut sent = 0;
        let mut retried = false;
        while sent < run.len() {
            let max_segment = upstream.max_segment(run.len() - sent);
            // Straight to the kernel, not through tokio's readiness: tokio holds a new socket
            // unwritable until the runtime has polled it, which sent every new flow's first
            // datagrams to the awaited leftovers. The kernel's EAGAIN says when it is full.
            match sys::send_batch(socket.as_fd(), &run[sent..], max_segment) {
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

/// Whether socket()/bind() failed for want of what another flow's socket holds: descriptors
/// (EMFILE, ENFILE), kernel memory (ENOBUFS, ENOMEM), or a free local port (EADDRINUSE on a
/// bind to port 0: all flows of a mapping share one target address and port, so at most
/// net.ipv4.ip_local_port_range of them exist at once).
fn out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRINUSE)
    )
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
/// The task holds its socket only while it runs (`flow` is weak), so that evicting the flow
/// closes the socket at once, and a new flow can have its descriptor right away.
async fn replies(flow: Weak<Upstream>, path: &ReplyPath, activity: &Activity, timeout: Duration) {
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
        let readable = std::future::poll_fn(|cx| match flow.upgrade() {
            Some(upstream) => upstream.socket.poll_recv_ready(cx).map(|r| r.is_ok()),
            None => Poll::Ready(false),
        });
        tokio::select! {
            ok = readable => if !ok { return },
            _ = tokio::time::sleep(Duration::from_millis(deadline - now)) => continue,
        }
        loop {
            let Some(upstream) = flow.upgrade() else {
                return;
            };
            let socket = &upstream.socket;
            let round = with_batch(|batch| {
                match socket.try_io(Interest::READABLE, || batch.recv(socket.as_fd())) {
                    Ok(n) => {
                        activity.touch();
                        if n == sys::BATCH && !grown {
                            grow_receive_buffer(socket);
                            grown = true;
                        }
                        Some(path.send(batch, n))
                    }
                    // Drained; or an ICMP error from the target (nothing to relay).
                    Err(_) => None,
                }
            });
            drop(upstream);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flow_bound_leaves_descriptors_to_the_rest() {
        assert_eq!(bound_by_fds(65_536, 20_000), 17_500);
        assert_eq!(bound_by_fds(65_536, 256), 192);
        assert_eq!(bound_by_fds(65_536, 1 << 20), 65_536);
        assert_eq!(bound_by_fds(100, 20_000), 100);
        assert_eq!(bound_by_fds(65_536, 10), 1);
        assert_eq!(bound_by_fds(65_536, u64::MAX), 65_536); // RLIM_INFINITY
    }
}
