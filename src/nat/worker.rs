//! The one thread that talks to netfilter. It owns rproxy's table and answers the runtime over
//! channels, so a slow netlink exchange (each may wait up to 5 s for the kernel) never blocks
//! a runtime worker, nor the supervisor that asked.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc;

use tokio::sync::oneshot;

use super::policy::{self, State};
use super::{dockerd, Path};
use crate::mapping::Mapping;
use crate::options::Mode;

/// What the runtime asks of the thread.
pub(super) enum Job {
    /// Open the table now; Err only when `Require` cannot have it.
    Open(Mode, oneshot::Sender<Result<(), String>>),
    /// Give a mapping its kernel path (`from_dockerd`: dockerd may translate it already).
    Install(Mapping, bool, oneshot::Sender<Result<Path, String>>),
    /// Remove a mapping's rules.
    Remove(Mapping),
    /// Connections each mapping's rules translated, by spec.
    Counters(oneshot::Sender<HashMap<String, u64>>),
    /// Whether dockerd's own iptables rules DNAT a mapping's port.
    Dockerd(Mapping, oneshot::Sender<bool>),
    /// Delete the table; the thread then ends.
    Close(oneshot::Sender<()>),
}

/// Starts the thread for `table`; it ends when the sender is dropped or on `Close`.
pub(super) fn spawn(table: String) -> std::io::Result<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("rproxy-nat".into())
        .spawn(move || run(table, rx))?;
    Ok(tx)
}

fn run(table: String, rx: mpsc::Receiver<Job>) {
    let mut state = State::Closed;
    // Jobs that arrived while gathering counter requests, in their order.
    let mut later = VecDeque::new();
    loop {
        let job = match later.pop_front() {
            Some(job) => job,
            None => match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        match job {
            Job::Open(mode, reply) => {
                policy::ensure_open(&mut state, &table);
                let _ = reply.send(match (&state, mode) {
                    (State::Unavailable(why), Mode::Require) => {
                        Err(format!("kernel NAT required: {why}"))
                    }
                    _ => Ok(()),
                });
            }
            Job::Install(m, from_dockerd, reply) => {
                let _ = reply.send(policy::install(&mut state, &table, &m, from_dockerd));
            }
            Job::Dockerd(m, reply) => {
                let _ = reply.send(dockerd::dnats(&m));
            }
            Job::Remove(m) => {
                if let State::Open(t) = &mut state {
                    if let Err(e) = t.remove(&m) {
                        tracing::warn!("{e}");
                    }
                }
            }
            Job::Counters(reply) => {
                // Every `ls` and scrape waiting now shares one dump.
                let mut replies = vec![reply];
                while let Ok(job) = rx.try_recv() {
                    match job {
                        Job::Counters(r) => replies.push(r),
                        other => later.push_back(other),
                    }
                }
                let counts = match &mut state {
                    State::Open(t) => t.connections(),
                    _ => HashMap::new(),
                };
                for r in replies {
                    let _ = r.send(counts.clone());
                }
            }
            Job::Close(reply) => {
                // Dropping the table deletes it.
                drop(state);
                let _ = reply.send(());
                return;
            }
        }
    }
}
