//! How many UDP flows a process may hold: each holds a socket, and a process that spends
//! every descriptor on flows can accept no TCP connection and open no flow for a new client
//! until old ones expire — what a flood of source addresses would otherwise achieve.
//!
//! Two bounds: each mapping's table stays under the descriptor limit less a reserve
//! ([`flow_bound`]), and the flows of all mappings together stay under the same figure (a
//! [`Charge`] per flow). A mapping that finds the process's budget spent replaces its own
//! least recently used flow; its first flow it always gets.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::OnceLock;

use crate::sys;

/// Descriptors flows leave to the rest of the process: an eighth of the limit, at least 64.
/// A docker-mode process needs about a dozen besides its flows (and one more while a new
/// flow's socket exists before the flow it replaces is evicted); a daemon also holds a
/// listener per mapping, two per TCP connection and its control connections, which grow with
/// the limit an operator gives it, hence a share rather than a number.
fn reserved_fds(limit: u64) -> u64 {
    (limit / 8).max(64)
}

/// What the descriptor limit leaves to flows, lowering `max_flows`.
fn bound_by_fds(max_flows: usize, limit: u64) -> usize {
    let by_fds = limit.saturating_sub(reserved_fds(limit)).max(1);
    max_flows.min(usize::try_from(by_fds).unwrap_or(usize::MAX))
}

/// A mapping's flow table bound: the operator's `max_flows`, lowered to what the descriptor
/// limit leaves (said once at info).
pub fn flow_bound(max_flows: usize) -> usize {
    let Ok(limit) = sys::process::nofile_limit() else {
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

/// The flows of every mapping in this process, and how many there may be.
struct Budget {
    max: usize,
    used: AtomicUsize,
}

fn budget() -> &'static Budget {
    static BUDGET: OnceLock<Budget> = OnceLock::new();
    // Read at the first flow, after start-up raised the limit.
    BUDGET.get_or_init(|| Budget {
        max: sys::process::nofile_limit().map_or(usize::MAX, |l| bound_by_fds(usize::MAX, l)),
        used: AtomicUsize::new(0),
    })
}

/// One flow's share of the process's budget, given back on drop.
#[derive(Debug)]
pub struct Charge(());

impl Charge {
    /// A share, if the budget has one left.
    pub fn take() -> Option<Charge> {
        let b = budget();
        b.used
            .fetch_update(Relaxed, Relaxed, |n| (n < b.max).then_some(n + 1))
            .ok()
            .map(|_| Charge(()))
    }

    /// A share whatever the budget says: after the caller gave one back (evicting a flow of
    /// its own), or for a mapping's first flow.
    pub fn force() -> Charge {
        budget().used.fetch_add(1, Relaxed);
        Charge(())
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        budget().used.fetch_sub(1, Relaxed);
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
