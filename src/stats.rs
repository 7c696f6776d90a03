//! Per-mapping counters, shared by the data path and whoever reports (`rproxy ls`). Relaxed
//! atomics, bumped per connection, per chunk or per datagram: never a lock on the hot path.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Stats {
    /// Open TCP connections, or live UDP flows.
    pub active: AtomicU64,
    /// Connections accepted, or flows created.
    pub total: AtomicU64,
    /// Connections the target refused or never answered; datagrams dropped.
    pub failed: AtomicU64,
    /// Bytes from clients to the target.
    pub bytes_in: AtomicU64,
    /// Bytes from the target back to clients.
    pub bytes_out: AtomicU64,
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub active: u64,
    pub total: u64,
    pub failed: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Stats {
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            active: self.active.load(Relaxed),
            total: self.total.load(Relaxed),
            failed: self.failed.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Relaxed);
    }
}
