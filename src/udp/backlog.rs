//! Datagrams a flow's socket could not take yet, waiting in order for room, sent by a task
//! of their own so the frontend never waits for one flow; bounded per flow and for the
//! whole process, past which datagrams are dropped as a full socket buffer would drop them.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::task::Poll;

use tokio::task::AbortHandle;

use super::upstream::Upstream;
use crate::stats::Stats;

/// Datagrams a flow's full socket did not take, oldest first, waiting for room. They are sent
/// by a task of their own, so the frontend never waits for one flow's socket.
#[derive(Default)]
pub(super) struct Backlog {
    pub(super) queue: VecDeque<Vec<u8>>,
    /// What `queue` holds, as [`backlog_cost`] counts it.
    pub(super) cost: usize,
    /// The task sending `queue`, while one runs.
    pub(super) drainer: Option<AbortHandle>,
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
    pub(super) fn push(&mut self, datagrams: &[&[u8]]) -> usize {
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
    pub(super) fn pop(&mut self, n: usize) {
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
/// while it runs, as [`super::reply::replies`] does.
pub(super) async fn drain(flow: Weak<Upstream>, stats: Arc<Stats>, target: SocketAddr) {
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
