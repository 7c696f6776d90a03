//! The one thread that talks to netfilter. It owns rproxy's table and answers the runtime over
//! channels, so a slow netlink exchange (each may wait up to 5 s for the kernel) never blocks
//! a runtime worker, nor the supervisor that asked.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc;

use tokio::sync::oneshot;

use super::table::Table;
use super::{dockerd, Path};
use crate::mapping::Mapping;
use crate::options::NatMode;

/// What the runtime asks of the thread.
pub(super) enum Job {
    /// Open the table now; Err only when `Require` cannot have it.
    Open(NatMode, oneshot::Sender<Result<(), String>>),
    /// Give a mapping its kernel path (`from_dockerd`: dockerd may translate it already).
    Install(Mapping, bool, oneshot::Sender<Result<Path, String>>),
    /// Remove a mapping's rules.
    Remove(Mapping),
    /// Connections each mapping's rules translated, by spec.
    Counters(oneshot::Sender<HashMap<String, u64>>),
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

enum State {
    Closed,
    Open(Table),
    Unavailable(String),
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
                ensure_open(&mut state, &table);
                let _ = reply.send(match (&state, mode) {
                    (State::Unavailable(why), NatMode::Require) => {
                        Err(format!("kernel NAT required: {why}"))
                    }
                    _ => Ok(()),
                });
            }
            Job::Install(m, from_dockerd, reply) => {
                let _ = reply.send(install(&mut state, &table, &m, from_dockerd));
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

fn ensure_open(state: &mut State, table: &str) {
    if let State::Closed = state {
        *state = match Table::open(table) {
            Ok(t) => State::Open(t),
            Err(why) => {
                tracing::warn!("kernel NAT unavailable ({why}); serving every port in userland");
                State::Unavailable(why)
            }
        };
    }
}

/// The path a mapping gets: dockerd's rules when they translate its port already, else ours,
/// else (`On`) the listener alone with the reason; `Require` turns every fallback into an
/// error.
fn install(
    state: &mut State,
    table: &str,
    m: &Mapping,
    from_dockerd: bool,
) -> Result<Path, String> {
    let mode = m.options.nat;
    // Before opening our table: a port dockerd translates needs none.
    if from_dockerd && dockerd::dnats(m) {
        tracing::info!("{m}: dockerd's iptables rules already DNAT it (run dockerd with --iptables=false to let rproxy own NAT)");
        return Ok(Path::Dockerd);
    }
    ensure_open(state, table);
    let t = match state {
        State::Open(t) => t,
        State::Unavailable(why) if mode == NatMode::Require => {
            return Err(format!("kernel NAT required for {m}: {why}"))
        }
        State::Unavailable(why) => return Ok(Path::Userland(why.clone())),
        State::Closed => return Err("kernel NAT: the table is closed".into()),
    };
    match t.install(m) {
        Ok(()) => {
            tracing::info!("{m}: kernel NAT installed in table inet {}", t.name());
            Ok(Path::Kernel)
        }
        Err(why) if mode == NatMode::Require => Err(why),
        Err(why) => {
            tracing::warn!("{why}; serving {m} in userland");
            Ok(Path::Userland(why))
        }
    }
}
