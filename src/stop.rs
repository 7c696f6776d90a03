//! Telling a serving mapping to stop: one sender per mapping (kept by whoever runs it), one
//! receiver in its serving task, carrying how long open connections may take to finish and
//! whether another process now serves the same socket.

use std::future::pending;
use std::time::Duration;

use tokio::sync::watch;

/// How a mapping stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopping {
    /// How long open connections may take to finish.
    pub drain: Duration,
    /// Another process serves the same socket from now on (a takeover, a shim handing its
    /// port back): UDP flows keep relaying their replies until they fall quiet, since the
    /// new process would open new flows for them.
    pub handover: bool,
}

/// Tells a serving mapping to stop, and how.
#[derive(Clone)]
pub struct Stop(watch::Receiver<Option<Stopping>>);

/// The sending side of [`Stop`].
pub struct StopHandle(watch::Sender<Option<Stopping>>);

impl Stop {
    /// A linked handle and stop.
    pub fn new() -> (StopHandle, Stop) {
        let (tx, rx) = watch::channel(None);
        (StopHandle(tx), Stop(rx))
    }

    /// Resolves with how to stop once stopped; never resolves if the handle is gone.
    pub async fn wait(&mut self) -> Stopping {
        loop {
            if let Some(stopping) = *self.0.borrow_and_update() {
                return stopping;
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
        let _ = self.0.send(Some(Stopping {
            drain,
            handover: false,
        }));
    }

    /// Stops the mapping because another process serves its socket now; open connections
    /// get `drain` to finish.
    pub fn hand_over(&self, drain: Duration) {
        let _ = self.0.send(Some(Stopping {
            drain,
            handover: true,
        }));
    }
}
