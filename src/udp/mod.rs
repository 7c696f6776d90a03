//! UDP: one frontend socket, a flow per (client, local destination) with its own connected
//! socket toward the target, and replies sent back through the frontend from the address the
//! client used (IP_PKTINFO / IPV6_PKTINFO), so multi-address hosts answer from the right IP.
//!
//! Both directions move datagrams in batches (recvmmsg/sendmmsg, up to 32 per system call)
//! through one set of receive buffers per runtime thread: per-packet system calls were the
//! bottleneck, and per-flow buffers would cost gigabytes at the flow limit.

mod budget;
pub mod flows;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{
    AtomicBool, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::Poll;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};

use crate::allow::AllowList;
use crate::mapping::describe;
use crate::options::Options;
use crate::stats::{Failure, Stats};
use crate::stop::Stop;
use crate::sys;
use budget::{flow_bound, Charge};
use flows::{now_ms, Activity, FlowKey, FlowTable};

/// Whether to send runs of equal-sized datagrams to a flow as one segmented message (UDP GSO,
/// Linux 4.18+): cleared for good when a route cannot offload it (EIO), and by `RPROXY_UDP_GSO=0`.
static GSO: AtomicBool = AtomicBool::new(true);

/// Larger than any UDP payload (65,507 bytes over IPv4, 65,527 over IPv6).
const MAX_DATAGRAM: usize = 1 << 16;

/// What the UDP path takes from a mapping's options.
#[derive(Debug, Clone)]
pub struct Config {
    /// Silence (both directions) after which a flow expires.
    pub idle_timeout: Duration,
    /// Flows before the least recently used is evicted.
    pub max_flows: usize,
    /// Who may open a flow (None: everyone).
    pub allow: Option<Arc<AllowList>>,
}

impl From<&Options> for Config {
    fn from(o: &Options) -> Config {
        Config {
            idle_timeout: o.udp_timeout,
            max_flows: o.udp_max_flows,
            allow: o.allow.clone(),
        }
    }
}

/// `RPROXY_UDP_GSO=0`: send datagram by datagram, never as one segmented message.
pub fn disable_gso() {
    GSO.store(false, Relaxed);
}

/// A live flow: its socket toward the target and the task relaying replies. Its tasks hold
/// the socket only while they run, so dropping the flow closes it at once, and stops them.
struct Flow {
    socket: Arc<Upstream>,
    replies: JoinHandle<()>,
    /// Its share of the process's flow budget, given back when it goes.
    _charge: Charge,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.replies.abort();
        if let Some(drainer) = self
            .socket
            .backlog()
            .as_mut()
            .and_then(|b| b.drainer.take())
        {
            drainer.abort();
        }
    }
}

/// A flow's connected socket toward the target, and the largest datagram it may send as a
/// GSO segment: its path's unfragmented payload, asked of the kernel the first time a run of
/// datagrams could use it ([`UNKNOWN`] until then), 0 once the kernel refused a segmented send.
struct Upstream {
    socket: UdpSocket,
    ipv6: bool,
    max_segment: AtomicUsize,
    /// Set while datagrams wait in `backlog`: later ones queue behind them, keeping order.
    backlogged: AtomicBool,
    /// Boxed, and only while used: most flows never have one.
    backlog: Mutex<Option<Box<Backlog>>>,
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
            backlogged: AtomicBool::new(false),
            backlog: Mutex::new(None),
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
                    sys::udp::max_unfragmented_payload(self.socket.as_fd(), self.ipv6).unwrap_or(0);
                self.max_segment.store(known, Relaxed);
                known
            }
            max => max,
        }
    }

    /// Sends the backlog until the socket is full (false) or nothing waits (true: the
    /// drainer's work is done).
    fn send_backlog(&self, stats: &Stats, target: SocketAddr) -> bool {
        let mut slot = self.backlog();
        while let Some(backlog) = slot.as_mut() {
            let run: Vec<&[u8]> = backlog
                .queue
                .iter()
                .take(sys::udp::BATCH)
                .map(|d| &d[..])
                .collect();
            if run.is_empty() {
                break;
            }
            let sent = self.send(&run, stats, target, true);
            let full = sent < run.len();
            backlog.pop(sent);
            if full {
                return false;
            }
        }
        *slot = None;
        self.backlogged.store(false, Release);
        true
    }

    fn backlog(&self) -> MutexGuard<'_, Option<Box<Backlog>>> {
        // Nothing panics while holding it (release builds abort anyway): never poisoned.
        self.backlog.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `run` in order until done or the send buffer is full; returns how many datagrams
    /// it consumed (sent, or dropped on an error): fewer than `run.len()` means full.
    ///
    /// `gated`: through tokio's readiness, which a full buffer clears, for a task about to
    /// wait on it. Otherwise straight to the kernel: tokio holds a new socket unwritable until
    /// the runtime has polled it, and a flow's first datagrams need not wait for that (the
    /// kernel's EAGAIN still says when the buffer is full).
    fn send(&self, run: &[&[u8]], stats: &Stats, target: SocketAddr, gated: bool) -> usize {
        let socket = &self.socket;
        let mut sent = 0;
        let mut retried = false;
        while sent < run.len() {
            let max_segment = self.max_segment(run.len() - sent);
            let send = || sys::udp::send_batch(socket.as_fd(), &run[sent..], max_segment);
            let result = match gated {
                true => socket.try_io(Interest::WRITABLE, send),
                false => send(),
            };
            match result {
                Ok(n) if n > 0 => {
                    let bytes: usize = run[sent..sent + n].iter().map(|d| d.len()).sum();
                    Stats::add(&stats.bytes_in, bytes as u64);
                    Stats::add(&stats.datagrams_in, n as u64);
                    sent += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if max_segment > 0 && refuses_segmentation(&e) => {
                    self.max_segment.store(0, Relaxed);
                }
                // A stale ICMP port-unreachable from an earlier datagram, not this one: retry once.
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) && !retried => {
                    retried = true
                }
                // (Ok(0) cannot happen for a non-empty run; were it to, drop rather than spin.)
                result => {
                    let e = result
                        .err()
                        .unwrap_or_else(|| io::ErrorKind::WriteZero.into());
                    tracing::debug!("udp datagram to {target} dropped: {}", describe(&e));
                    stats.fail(Failure::of(&e));
                    sent += 1;
                }
            }
        }
        sent
    }
}

/// Datagrams a flow's full socket did not take, oldest first, waiting for room. They are sent
/// by a task of their own, so the frontend never waits for one flow's socket.
#[derive(Default)]
struct Backlog {
    queue: VecDeque<Vec<u8>>,
    /// What `queue` holds, as [`backlog_cost`] counts it.
    cost: usize,
    /// The task sending `queue`, while one runs.
    drainer: Option<AbortHandle>,
}

/// The most a flow's backlog may hold, about one more default socket send buffer (212,992
/// bytes with the kernel's per-datagram overhead): beyond it the path is slower than the
/// client, and later datagrams are dropped (`limit`) as a full buffer would drop them.
const FLOW_BACKLOG: usize = 256 << 10;
/// The most all backlogs of the process may hold together, whatever the number of flows.
const ALL_BACKLOGS: usize = 32 << 20;
/// What all backlogs hold now.
static BACKLOGGED: AtomicUsize = AtomicUsize::new(0);

/// Memory a queued datagram holds: its bytes and its allocation's bookkeeping.
fn backlog_cost(datagram: &[u8]) -> usize {
    datagram.len() + 64
}

impl Backlog {
    /// Queues copies of `datagrams` behind what waits; returns how many did not fit.
    fn push(&mut self, datagrams: &[&[u8]]) -> usize {
        let mut dropped = 0;
        for d in datagrams {
            let cost = backlog_cost(d);
            let fits = self.cost + cost <= FLOW_BACKLOG
                && BACKLOGGED
                    .fetch_update(Relaxed, Relaxed, |all| {
                        Some(all + cost).filter(|&n| n <= ALL_BACKLOGS)
                    })
                    .is_ok();
            if fits {
                self.queue.push_back(d.to_vec());
                self.cost += cost;
            } else {
                dropped += 1;
            }
        }
        dropped
    }

    /// Forgets the first `n` datagrams (sent, or dropped on an error).
    fn pop(&mut self, n: usize) {
        for d in self.queue.drain(..n.min(self.queue.len())) {
            let cost = backlog_cost(&d);
            self.cost -= cost;
            BACKLOGGED.fetch_sub(cost, Relaxed);
        }
    }
}

impl Drop for Backlog {
    fn drop(&mut self) {
        BACKLOGGED.fetch_sub(self.cost, Relaxed);
    }
}

/// Sends a flow's backlog as its socket makes room, in order, then ends. Holds the flow only
/// while it runs, as [`replies`] does.
async fn drain(flow: Weak<Upstream>, stats: Arc<Stats>, target: SocketAddr) {
    loop {
        match flow.upgrade() {
            Some(upstream) => {
                if upstream.send_backlog(&stats, target) {
                    return;
                }
            }
            None => return,
        }
        let writable = std::future::poll_fn(|cx| match flow.upgrade() {
            Some(upstream) => upstream.socket.poll_send_ready(cx).map(|r| r.is_ok()),
            None => Poll::Ready(false),
        });
        if !writable.await {
            return;
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
    static BATCH: RefCell<Option<sys::udp::RecvBatch>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's receive batch.
fn with_batch<T>(f: impl FnOnce(&mut sys::udp::RecvBatch) -> T) -> T {
    BATCH.with(|cell| {
        let mut slot = cell.borrow_mut();
        f(slot.get_or_insert_with(|| sys::udp::RecvBatch::new(MAX_DATAGRAM)))
    })
}

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
        table: FlowTable::new(flow_bound(config.max_flows)),
        config,
        stats,
        expired_tx,
    };
    loop {
        tokio::select! {
            biased;
            stopping = stop.wait() => {
                if stopping.handover {
                    linger(&mut ctx, &mut expired_rx, stopping.drain).await;
                }
                // Flows close with the table.
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
                    Ok(n) => {
                        ctx.dispatch(batch, n);
                        Ok(true)
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
                    Err(e) => Err(e),
                }
            });
            match round {
                // Let the flows' tasks run now and then (every 128 rounds) while the frontend
                // stays busy.
                Ok(true) => tokio::task::coop::consume_budget().await,
                Ok(false) => break,
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

/// How long a handed-over mapping's flows must have been silent before this process lets
/// them go: their replies in flight have arrived by then.
const QUIET: Duration = Duration::from_secs(1);

/// After a handover (another process reads the frontend now): keeps the flows relaying the
/// replies to what they forwarded, until all have been silent for [`QUIET`], or `drain` is
/// over. Nothing new is read: datagrams that arrive from now on open flows in the new
/// process (toward the target from a new source port).
async fn linger(
    ctx: &mut Dispatch,
    expired: &mut mpsc::UnboundedReceiver<(FlowKey, u64)>,
    drain: Duration,
) {
    let deadline = tokio::time::Instant::now() + drain;
    let quiet_ms = QUIET.as_millis() as u64;
    while let Some(last) = ctx.table.last_activity() {
        let silent = now_ms().saturating_sub(last);
        if silent >= quiet_ms {
            break;
        }
        let wake =
            (tokio::time::Instant::now() + Duration::from_millis(quiet_ms - silent)).min(deadline);
        tokio::select! {
            Some((key, id)) = expired.recv() => {
                if ctx.table.remove(&key, id).is_some() {
                    Stats::sub(&ctx.stats.active, 1);
                    Stats::add(&ctx.stats.expired, 1);
                }
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            break;
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
    /// sendmmsg.
    fn dispatch(&mut self, batch: &sys::udp::RecvBatch, n: usize) {
        let mut run: Vec<&[u8]> = Vec::with_capacity(sys::udp::BATCH);
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
            if let Some(s) = run_socket.take_if(|s| !Arc::ptr_eq(s, &socket)) {
                self.flush(&s, &run);
                run.clear();
            }
            run_socket = Some(socket);
            run.push(batch.datagram(i));
        }
        if let Some(socket) = run_socket {
            self.flush(&socket, &run);
        }
    }

    /// The flow for `key`, opened (with its reply task) on first sight. When the process is
    /// out of what a socket needs, the least recently used flow gives up its own, and the
    /// socket is asked for once more.
    fn flow(&mut self, key: FlowKey) -> Option<Arc<Upstream>> {
        if let Some(entry) = self.table.get(&key) {
            entry.activity.touch();
            return Some(entry.flow.socket.clone());
        }
        if let Some(list) = self.config.allow.as_ref().filter(|l| !l.admits(key.0.ip())) {
            match self.stats.deny() {
                Some(n) => tracing::warn!(
                    "udp {}: dropped, not in the allow-list ({list}){}",
                    key.0,
                    match n {
                        0 | 1 => String::new(),
                        n => format!(" ({n} datagrams since the last warning)"),
                    }
                ),
                None => tracing::debug!("udp {}: dropped, not in the allow-list", key.0),
            }
            return None;
        }
        let charge = match Charge::take() {
            Some(c) => c,
            // The flows of every mapping hold all the descriptors they may: this mapping
            // gives up its own least recently used flow (a mapping's first flow it always
            // gets, so no port is locked out by another's flood).
            None => {
                if let Some((old, flow)) = self.table.evict() {
                    drop(flow);
                    self.evicted(
                        old,
                        "the process's UDP flows hold every descriptor they may",
                    );
                }
                Charge::force()
            }
        };
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
                sys::udp::GSO_MAX_BYTES
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
            _charge: charge,
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

    /// Sends a run of datagrams for one flow; what its full socket does not take waits in the
    /// flow's backlog (as does all of it while older datagrams wait there).
    fn flush(&self, upstream: &Arc<Upstream>, run: &[&[u8]]) {
        let sent = match upstream.backlogged.load(Acquire) {
            false => upstream.send(run, &self.stats, self.target, false),
            true => 0,
        };
        if sent == run.len() {
            return;
        }
        let mut slot = upstream.backlog();
        let backlog = slot.get_or_insert_with(Box::default);
        let dropped = backlog.push(&run[sent..]);
        if dropped > 0 {
            tracing::debug!(
                "udp: {dropped} datagrams to {} dropped: the flow's backlog is full",
                self.target
            );
            for _ in 0..dropped {
                self.stats.fail(Failure::Limit);
            }
        }
        if backlog.drainer.is_none() {
            if backlog.queue.is_empty() {
                *slot = None;
                return;
            }
            upstream.backlogged.store(true, Release);
            let flow = Arc::downgrade(upstream);
            let task = tokio::spawn(drain(flow, self.stats.clone(), self.target));
            backlog.drainer = Some(task.abort_handle());
        }
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
        let _ = sys::udp::force_receive_buffer(socket.as_fd(), RECEIVE_BUFFER);
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
                        if n == sys::udp::BATCH && !grown {
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
    fn send(&self, batch: &sys::udp::RecvBatch, n: usize) -> Vec<Vec<u8>> {
        let datagrams: Vec<&[u8]> = (0..n)
            .filter(|&i| !batch.received[i].truncated)
            .map(|i| batch.datagram(i))
            .collect();
        let mut sent = 0;
        while sent < datagrams.len() {
            let fd: BorrowedFd<'_> = self.frontend.as_fd();
            let max_segment = self.max_segment.load(Relaxed);
            let result = self.frontend.try_io(Interest::WRITABLE, || {
                sys::udp::send_batch_from(
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
        let n = sys::udp::send_from(
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
    fn backlogs_are_bounded_and_give_their_memory_back() {
        let datagram = [7u8; 1000];
        let fit = FLOW_BACKLOG / backlog_cost(&datagram);
        let mut backlog = Backlog::default();
        assert_eq!(backlog.push(&vec![&datagram[..]; fit + 3]), 3);
        assert_eq!(backlog.queue.len(), fit);
        // Empty datagrams cost their bookkeeping: they only fill what is left.
        let room = (FLOW_BACKLOG - backlog.cost) / backlog_cost(&[]);
        assert_eq!(backlog.push(&[&[][..]; 100]), 100 - room);
        assert_eq!(BACKLOGGED.load(Relaxed), backlog.cost);
        backlog.pop(fit + room - 2);
        assert_eq!(backlog.queue.len(), 2);
        assert_eq!(backlog.push(&[&[1u8][..]]), 0);
        assert_eq!(backlog.queue.back().map(|d| &d[..]), Some(&[1u8][..]));
        drop(backlog);
        assert_eq!(BACKLOGGED.load(Relaxed), 0);
    }
}
