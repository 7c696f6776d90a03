//! The one thread that talks to netfilter. It owns rproxy's table and answers the runtime over
//! channels, so a slow netlink exchange (each may wait up to 5 s for the kernel) never blocks
//! a runtime worker, nor the supervisor that asked.
//!
//! It also looks again at dockerd's rules for the mappings dockerd publishes: an engine up to
//! 27 adds its DNAT rule after starting the proxy (rproxy's rules then give way to it), and a
//! rule can go while the mapping stays (rproxy's then take over). Soon after each install,
//! then less and less often: 0.25 s, doubling up to 30 s; one dump serves every mapping due.

use std::collections::{HashMap, VecDeque};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::dockerd;
use super::policy::{self, State};
use super::Path;
use crate::allow::AllowList;
use crate::mapping::Mapping;
use crate::settings::options::Mode;

/// The paths of dockerd's mappings as the thread last decided them, for `rproxy ls`.
pub(super) type Current = Arc<Mutex<HashMap<Mapping, Path>>>;

/// The first look again after an install, and the longest pause between looks.
const FIRST_LOOK: Duration = Duration::from_millis(250);
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// A mapping of dockerd's whose path follows dockerd's rules.
struct Watched {
    path: Path,
    next: Instant,
    pause: Duration,
}

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
    /// Set (or, None, remove) a mapping's allow-list filter.
    Allow(
        Mapping,
        Option<AllowList>,
        oneshot::Sender<Result<(), String>>,
    ),
    /// Packets each mapping's filter dropped, by spec.
    Denied(oneshot::Sender<HashMap<String, u64>>),
    /// Whether dockerd's own iptables rules DNAT a mapping's port.
    Dockerd(Mapping, oneshot::Sender<bool>),
    /// Delete the table; the thread then ends.
    Close(oneshot::Sender<()>),
}

/// Starts the thread for `table`; it ends when the sender is dropped or on `Close`.
pub(super) fn spawn(table: String, current: Current) -> std::io::Result<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("rproxy-nat".into())
        .spawn(move || run(table, rx, current))?;
    Ok(tx)
}

fn run(table: String, rx: mpsc::Receiver<Job>, current: Current) {
    let mut state = State::Closed;
    // Jobs that arrived while gathering counter requests, in their order.
    let mut later = VecDeque::new();
    let mut watched: HashMap<Mapping, Watched> = HashMap::new();
    let mut recent = dockerd::Recent::default();
    loop {
        let next = watched.values().map(|w| w.next).min();
        let job = match later.pop_front() {
            Some(job) => job,
            None => match next {
                None => match rx.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                },
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(job) => job,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        look_again(&mut state, &table, &mut watched, &current, &mut recent);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                },
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
                let result = policy::install(&mut state, &table, &m, from_dockerd, &mut recent);
                if let Ok(path @ (Path::Kernel | Path::Dockerd)) = &result {
                    if from_dockerd {
                        lock(&current).insert(m.clone(), path.clone());
                        let watch = Watched {
                            path: path.clone(),
                            next: Instant::now() + FIRST_LOOK,
                            pause: FIRST_LOOK,
                        };
                        watched.insert(m, watch);
                    }
                }
                let _ = reply.send(result);
            }
            Job::Dockerd(m, reply) => {
                let _ = reply.send(recent.dnat(&m));
            }
            Job::Remove(m) => {
                let ours = match watched.remove(&m) {
                    Some(w) => {
                        lock(&current).remove(&m);
                        w.path == Path::Kernel
                    }
                    None => true,
                };
                if let (true, State::Open(t)) = (ours, &mut state) {
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
            Job::Allow(m, allow, reply) => {
                policy::ensure_open(&mut state, &table);
                let result = match &mut state {
                    State::Open(t) => t.set_allow(&m, allow.as_ref()),
                    State::Unavailable(why) => Err(format!("no allow-list for {m}: {why}")),
                    State::Closed => Err("the table is closed".into()),
                };
                let _ = reply.send(result);
            }
            Job::Denied(reply) => {
                let counts = match &mut state {
                    State::Open(t) => t.denied(),
                    _ => HashMap::new(),
                };
                let _ = reply.send(counts);
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

fn lock(current: &Current) -> std::sync::MutexGuard<'_, HashMap<Mapping, Path>> {
    current.lock().unwrap_or_else(|e| e.into_inner())
}

/// Looks at dockerd's rules again for the watched mappings that are due: rproxy's rules give
/// way to a rule of dockerd's that appeared, and take over from one that went.
fn look_again(
    state: &mut State,
    table: &str,
    watched: &mut HashMap<Mapping, Watched>,
    current: &Current,
    recent: &mut dockerd::Recent,
) {
    let now = Instant::now();
    let Some(rules) = recent.rules() else {
        return;
    };
    let mut dropped = Vec::new();
    for (m, w) in watched.iter_mut().filter(|(_, w)| w.next <= now) {
        w.pause = (w.pause * 2).min(MAX_PAUSE);
        w.next = now + w.pause;
        let now_path = match (&w.path, rules.dnat(m)) {
            (Path::Kernel, true) => {
                if let State::Open(t) = state {
                    if let Err(e) = t.remove(m) {
                        tracing::warn!("{e}");
                        continue;
                    }
                }
                tracing::info!("{m}: dockerd's rules DNAT it now; rproxy's are removed");
                Path::Dockerd
            }
            (Path::Dockerd, false) => {
                policy::ensure_open(state, table);
                let installed = match state {
                    State::Open(t) => t.install(m),
                    State::Unavailable(why) => Err(why.clone()),
                    State::Closed => Err("the table is closed".into()),
                };
                match installed {
                    Ok(()) => {
                        tracing::info!("{m}: dockerd's rule for it is gone; rproxy's installed");
                        Path::Kernel
                    }
                    Err(why) => {
                        tracing::warn!(
                            "{m}: dockerd's rule for it is gone and {why}; userland only"
                        );
                        dropped.push(m.clone());
                        Path::Userland(why)
                    }
                }
            }
            _ => continue,
        };
        // Restart the looks: a change may come with more (a restarting engine).
        w.pause = FIRST_LOOK;
        w.next = now + FIRST_LOOK;
        w.path = now_path.clone();
        lock(current).insert(m.clone(), now_path);
    }
    for m in dropped {
        watched.remove(&m);
    }
}
