//! The listener loop: reads the frontend in batches, finds or opens each datagram's flow
//! (allow-list, flow budget, eviction) and forwards runs of one flow's datagrams together;
//! on a handover it lingers until the flows' replies are in.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::backlog::drain;
use super::batch::{with_batch, GSO, MAX_DATAGRAM};
use super::budget::{flow_bound, Charge};
use super::flows::{now_ms, Activity, FlowKey, FlowTable};
use super::reply::{replies, ReplyPath};
use super::upstream::{connect, out_of_resources, Flow, Upstream};
use super::Config;
use crate::mapping::describe;
use crate::stats::{Failure, Stats};
use crate::stop::Stop;
use crate::sys;

/// The frontend loop. The table is owned by it alone (no lock); reply tasks report their
/// flow's expiry back over a channel.
pub(super) async fn relay(
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
