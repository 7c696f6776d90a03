//! The way back: a flow's reply task reads the target's answers on the flow's socket and
//! sends them to the client through the frontend, from the local address the client wrote
//! to (IP_PKTINFO / IPV6_PKTINFO), until the flow has been idle for its timeout.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::batch::{refuses_segmentation, with_batch};
use super::flows::{now_ms, Activity};
use super::grow_receive_buffer;
use super::upstream::Upstream;
use crate::mapping::describe;
use crate::stats::{Failure, Stats};
use crate::sys;

/// Everything a reply task needs to send back to its client.
pub(super) struct ReplyPath {
    pub(super) frontend: Arc<UdpSocket>,
    pub(super) frontend_v6: bool,
    pub(super) client: SocketAddr,
    pub(super) local: Option<IpAddr>,
    pub(super) stats: Arc<Stats>,
    /// As [`Upstream::max_segment`], toward the client. The frontend is not connected, so its
    /// path MTU is unknown: segments are tried up to the UDP maximum, and the kernel's EINVAL
    /// (a segment larger than the route's MTU) turns GSO off for this flow.
    pub(super) max_segment: AtomicUsize,
}

/// Relays the target's replies to the client until the flow has been idle for `timeout`.
/// The task holds its socket only while it runs (`flow` is weak), so that evicting the flow
/// closes the socket at once, and a new flow can have its descriptor right away.
pub(super) async fn replies(
    flow: Weak<Upstream>,
    path: &ReplyPath,
    activity: &Activity,
    timeout: Duration,
) {
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
