//! What every accept loop does when accept fails. An error that concerns one half-open
//! connection (ECONNABORTED, …) is skipped at once; anything else — EMFILE, ENFILE, ENOBUFS,
//! ENOMEM — lasts until something is released, so retrying at once would spin at 100% CPU
//! (and docker-proxy simply exits): wait, doubling from 10 ms to 1 s, and keep serving.

use std::io;
use std::time::Duration;

use crate::mapping::describe;

/// One accept loop's back-off state.
#[derive(Debug, Default)]
pub struct Backoff(Duration);

impl Backoff {
    /// Call after an accept succeeded: the next failure waits the shortest time again.
    pub fn reset(&mut self) {
        self.0 = Duration::ZERO;
    }

    /// Call after `what`'s accept failed with `e`: returns at once for a per-connection error,
    /// else logs and sleeps.
    pub async fn failed(&mut self, what: &str, e: &io::Error) {
        if is_transient(e) {
            return;
        }
        self.0 = (self.0 * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        tracing::warn!(
            "{what} accept failed: {}; retrying in {:?}",
            describe(e),
            self.0
        );
        tokio::time::sleep(self.0).await;
    }
}

/// Errors that concern one half-open connection, not the listener.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::EPROTO | libc::EPERM | libc::EINTR)
    )
}
