//! Telling a serving mapping to stop: one sender per mapping (kept by whoever runs it), one
//! receiver in its serving task, carrying how long open connections may take to finish.

use std::future::pending;
use std::time::Duration;

use tokio::sync::watch;

/// Tells a serving mapping to stop, and how long its open connections may take to finish.
#[derive(Clone)]
pub struct Stop(watch::Receiver<Option<Duration>>);

/// The sending side of [`Stop`].
pub struct StopHandle(watch::Sender<Option<Duration>>);

impl Stop {
    /// A linked handle and stop.
    pub fn new() -> (StopHandle, Stop) {
        let (tx, rx) = watch::channel(None);
        (StopHandle(tx), Stop(rx))
    }

    /// Resolves with the drain time once stopped; never resolves if the handle is gone.
    pub async fn wait(&mut self) -> Duration {
        loop {
            if let Some(drain) = *self.0.borrow_and_update() {
                return drain;
            }
            if self.0.changed().await.is_err() {
                return pending().await;
            }
        }
    }
}

impl StopHandle {
    /// Stops the mapping; its open connections get `drain` to finish.
    pub fn stop(&self, drain: Duration) {
        let _ = self.0.send(Some(drain));
    }
}
