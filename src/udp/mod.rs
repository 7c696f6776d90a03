//! UDP: one frontend socket, a flow per (client, local destination) with its own connected
//! socket toward the target, and replies sent back through the frontend from the address the
//! client used (IP_PKTINFO / IPV6_PKTINFO), so multi-address hosts answer from the right IP.
//!
//! Both directions move datagrams in batches (recvmmsg/sendmmsg, up to 32 per system call)
//! through one set of receive buffers per runtime thread: per-packet system calls were the
//! bottleneck, and per-flow buffers would cost gigabytes at the flow limit.
//!
//! One concern a file: `frontend` reads the frontend and opens flows, `upstream` is a
//! flow's socket toward the target, `backlog` holds what that socket could not take yet,
//! `reply` sends the target's answers back from the right address, `batch` has the shared
//! receive buffers and segmentation offload, [`flows`] the flow table and `budget` the
//! process's share of descriptors (the private ones are named, not linked: public
//! documentation cannot link them).

mod backlog;
mod batch;
mod budget;
pub mod flows;
mod frontend;
mod reply;
mod upstream;

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use crate::allow::AllowList;
use crate::settings::options::Options;
use crate::stats::Stats;
use crate::stop::Stop;
use crate::sys;

pub use batch::disable_gso;

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
    let mut task = Abort(tokio::spawn(frontend::relay(
        frontend, target, config, stats, stop,
    )));
    let _ = (&mut task.0).await;
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
