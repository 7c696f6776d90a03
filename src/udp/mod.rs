//! UDP: one frontend socket, a flow per (client, local destination) with its own connected
//! socket toward the target, and replies sent back through the frontend from the address the
//! client used (IP_PKTINFO / IPV6_PKTINFO), so multi-address hosts answer from the right IP.

pub mod flows;

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::frontend::Stop;
use crate::mapping::describe;
use crate::stats::Stats;
use crate::sys;
use flows::{now_ms, Activity, FlowKey, FlowTable};

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
        Config {
            idle_timeout,
            max_flows,
        }
    }
}

/// A live flow: its socket toward the target and the task relaying replies. Dropping it stops
/// the task, which closes the socket.
struct Flow {
    socket: Arc<UdpSocket>,
    replies: JoinHandle<()>,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

/// Everything a reply task needs to send back to its client.
struct ReplyPath {
    frontend: Arc<UdpSocket>,
    frontend_v6: bool,
    client: SocketAddr,
    local: Option<IpAddr>,
    stats: Arc<Stats>,
}

/// Serves the frontend forever. The table is owned by this loop alone (no lock); reply tasks
/// report their flow's expiry back over a channel.
pub async fn serve(
    frontend: UdpSocket,
    target: SocketAddr,
    config: Config,
    stats: Arc<Stats>,
    mut stop: Stop,
) {
    let frontend_v6 = frontend.local_addr().is_ok_and(|a| a.is_ipv6());
    let frontend = Arc::new(frontend);
    let (expired_tx, mut expired_rx) = mpsc::unbounded_channel::<(FlowKey, u64)>();
    let mut table: FlowTable<Flow> = FlowTable::new(config.max_flows);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let received = tokio::select! {
            biased;
            _ = stop.wait() => {
                // Flows close with the table; UDP has nothing to drain.
                stats.active.store(0, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            Some((key, id)) = expired_rx.recv() => {
                if table.remove(&key, id).is_some() {
                    Stats::sub(&stats.active, 1);
                    tracing::debug!("udp flow {} expired ({} left)", key.0, table.len());
                }
                continue;
            }
            r = frontend.async_io(Interest::READABLE, || sys::recv_with_destination(frontend.as_fd(), &mut buf)) => r,
        };
        let received = match received {
            Ok(r) => r,
            Err(e) => {
                // Transient kernel trouble (ENOMEM, ICMP errors); never spin on it.
                tracing::warn!("udp receive failed: {}", describe(&e));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if received.truncated {
            tracing::warn!(
                "udp datagram from {} larger than {MAX_DATAGRAM} bytes dropped",
                received.source
            );
            Stats::add(&stats.failed, 1);
            continue;
        }
        let key: FlowKey = (received.source, received.destination);
        let socket = match table.get(&key) {
            Some(entry) => {
                entry.activity.touch();
                entry.flow.socket.clone()
            }
            None => {
                let socket = match connect(target) {
                    Ok(s) => Arc::new(s),
                    Err(e) => {
                        tracing::warn!("udp flow to {target} not opened: {}", describe(&e));
                        Stats::add(&stats.failed, 1);
                        continue;
                    }
                };
                if let Some((old, _flow)) = table.make_room() {
                    Stats::sub(&stats.active, 1);
                    tracing::debug!(
                        "udp flow {} evicted: {} flows is the limit",
                        old.0,
                        config.max_flows
                    );
                }
                let activity = Arc::new(Activity::default());
                activity.touch();
                let path = ReplyPath {
                    frontend: frontend.clone(),
                    frontend_v6,
                    client: received.source,
                    local: received.destination,
                    stats: stats.clone(),
                };
                Stats::add(&stats.total, 1);
                Stats::add(&stats.active, 1);
                let expired = expired_tx.clone();
                let (s, a, timeout) = (socket.clone(), activity.clone(), config.idle_timeout);
                table.insert(key, activity, |id| Flow {
                    socket: socket.clone(),
                    replies: tokio::spawn(async move {
                        replies(&s, &path, &a, timeout).await;
                        let _ = expired.send((key, id));
                    }),
                });
                socket
            }
        };
        let datagram = &buf[..received.len];
        let mut result = socket.send(datagram).await;
        if matches!(&result, Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED)) {
            // A stale ICMP port-unreachable from an earlier datagram, not this one: retry.
            result = socket.send(datagram).await;
        }
        match result {
            Ok(n) => Stats::add(&stats.bytes_in, n as u64),
            Err(e) => {
                Stats::add(&stats.failed, 1);
                tracing::debug!(
                    "udp datagram from {} to {target} dropped: {}",
                    received.source,
                    describe(&e)
                );
            }
        }
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

thread_local! {
    /// One receive buffer per runtime thread, shared by all reply tasks on it: 65 KiB per flow
    /// would cost gigabytes at the flow limit.
    static REPLY_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM]);
}

enum Step {
    Sent,
    Drained,
    /// The frontend's send buffer is full: this datagram waits (copied out of the shared buffer).
    Blocked(Vec<u8>),
}

/// Relays the target's replies to the client until the flow has been idle for `timeout`.
async fn replies(flow: &UdpSocket, path: &ReplyPath, activity: &Activity, timeout: Duration) {
    let timeout_ms = timeout.as_millis() as u64;
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
            let step = REPLY_BUF.with(|cell| {
                let mut buf = cell.borrow_mut();
                let n = match flow.try_recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Drained,
                    // ICMP unreachable from the target: nothing to relay.
                    Err(_) => return Step::Sent,
                };
                activity.touch();
                match path
                    .frontend
                    .try_io(Interest::WRITABLE, || path.send(&buf[..n]))
                {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        Step::Blocked(buf[..n].to_vec())
                    }
                    Err(e) => {
                        tracing::debug!("udp reply to {} dropped: {}", path.client, describe(&e));
                        Step::Sent
                    }
                    Ok(_) => Step::Sent,
                }
            });
            match step {
                Step::Drained => break,
                Step::Sent => {}
                Step::Blocked(data) => {
                    if let Err(e) = path
                        .frontend
                        .async_io(Interest::WRITABLE, || path.send(&data))
                        .await
                    {
                        tracing::debug!("udp reply to {} dropped: {}", path.client, describe(&e));
                    }
                }
            }
        }
    }
}

impl ReplyPath {
    fn send(&self, data: &[u8]) -> io::Result<usize> {
        Stats::add(&self.stats.bytes_out, data.len() as u64);
        sys::send_from(
            self.frontend.as_fd(),
            data,
            &self.client,
            self.local,
            self.frontend_v6,
        )
    }
}
