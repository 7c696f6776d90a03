//! What the two directions share to move datagrams in batches: one set of receive buffers
//! per runtime thread (recvmmsg fills it, the sends it feeds read it, and it is never held
//! across an await), and UDP segmentation offload (GSO), which sends a run of equal-sized
//! datagrams as one message until the kernel says a route cannot take it.

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use crate::sys;

/// Whether to send runs of equal-sized datagrams to a flow as one segmented message (UDP GSO,
/// Linux 4.18+): cleared for good when a route cannot offload it (EIO), and by `RPROXY_UDP_GSO=0`.
pub(super) static GSO: AtomicBool = AtomicBool::new(true);

/// Larger than any UDP payload (65,507 bytes over IPv4, 65,527 over IPv6).
pub(super) const MAX_DATAGRAM: usize = 1 << 16;

/// `RPROXY_UDP_GSO=0`: send datagram by datagram, never as one segmented message.
pub fn disable_gso() {
    GSO.store(false, Relaxed);
}

thread_local! {
    /// Receive buffers shared by every frontend and reply task on this runtime thread; only
    /// borrowed between a receive and the sends it feeds, never across an await.
    static BATCH: RefCell<Option<sys::udp::RecvBatch>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's receive batch.
pub(super) fn with_batch<T>(f: impl FnOnce(&mut sys::udp::RecvBatch) -> T) -> T {
    BATCH.with(|cell| {
        let mut slot = cell.borrow_mut();
        f(slot.get_or_insert_with(|| sys::udp::RecvBatch::new(MAX_DATAGRAM)))
    })
}

/// Whether a failed segmented send means "not like this": a segment larger than the path's
/// MTU (EINVAL on a connected socket, EMSGSIZE on the frontend; the flow then sends datagram
/// by datagram), or a route that cannot offload checksums (EIO; the process stops segmenting
/// altogether).
pub(super) fn refuses_segmentation(e: &io::Error) -> bool {
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
