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
    /// What `what`'s accept returned: the client, or None once the failure has been waited
    /// out (at once for a per-connection error, else logged and slept on).
    pub async fn accepted<T>(&mut self, what: &str, result: io::Result<T>) -> Option<T> {
        match result {
            Ok(client) => {
                self.0 = Duration::ZERO;
                Some(client)
            }
            Err(e) => {
                self.failed(what, &e).await;
                None
            }
        }
    }

    async fn failed(&mut self, what: &str, e: &io::Error) {
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
