//! A flow's way to the target: its own connected socket, which sends the client's
//! datagrams in order — in segmented runs where the path allows, else one by one — and
//! queues what a full socket does not take in the flow's [`Backlog`].

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed, Ordering::Release};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use super::backlog::Backlog;
use super::batch::{refuses_segmentation, GSO};
use super::budget::Charge;
use crate::mapping::describe;
use crate::stats::{Failure, Stats};
use crate::sys;

/// A live flow: its socket toward the target and the task relaying replies. Its tasks hold
/// the socket only while they run, so dropping the flow closes it at once, and stops them.
pub(super) struct Flow {
    pub(super) socket: Arc<Upstream>,
    pub(super) replies: JoinHandle<()>,
    /// Its share of the process's flow budget, given back when it goes.
    pub(super) _charge: Charge,
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
pub(super) struct Upstream {
    pub(super) socket: UdpSocket,
    ipv6: bool,
    max_segment: AtomicUsize,
    /// Set while datagrams wait in `backlog`: later ones queue behind them, keeping order.
    pub(super) backlogged: AtomicBool,
    /// Boxed, and only while used: most flows never have one.
    backlog: Mutex<Option<Box<Backlog>>>,
}

/// [`Upstream::max_segment`] before the path MTU has been asked: most flows (a DNS query, a
/// handshake) never send two datagrams at once, and need not pay for the syscall.
const UNKNOWN: usize = usize::MAX;

impl Upstream {
    pub(super) fn new(socket: UdpSocket, target: SocketAddr) -> Upstream {
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
    pub(super) fn send_backlog(&self, stats: &Stats, target: SocketAddr) -> bool {
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

    pub(super) fn backlog(&self) -> MutexGuard<'_, Option<Box<Backlog>>> {
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
    pub(super) fn send(
        &self,
        run: &[&[u8]],
        stats: &Stats,
        target: SocketAddr,
        gated: bool,
    ) -> usize {
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

/// Whether socket()/bind() failed for want of what another flow's socket holds: descriptors
/// (EMFILE, ENFILE), kernel memory (ENOBUFS, ENOMEM), or a free local port (EADDRINUSE on a
/// bind to port 0: all flows of a mapping share one target address and port, so at most
/// net.ipv4.ip_local_port_range of them exist at once).
pub(super) fn out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRINUSE)
    )
}

/// A fresh connected socket toward the target (kernel-chosen source address and port).
pub(super) fn connect(target: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = match target {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.connect(target)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}
