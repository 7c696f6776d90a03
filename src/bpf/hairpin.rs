//! The hairpin rule's knowledge: which container network namespaces may be sent straight to
//! which targets, learnt from dockerd and kept current with its events.
//!
//! A container dialling a published port through a host address reaches the listener, which
//! connects to the target from the bridge gateway. Sending it straight to the target instead
//! is what dockerd itself would allow only when both are on the same bridge network and that
//! network lets its containers talk to each other (icc): then the container could have dialled
//! the target's address anyway. So the programs rewrite such a socket only when the pair
//! (its namespace, the target's network) is in `hairpin`; a network with icc off gets no
//! pairs, and every other case stays on the listener. Networks get small numbers here (the
//! Target carries its network's), stable for as long as the daemon runs.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, BufRead};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use crate::engine::Engine;
use crate::mapping::describe;
use crate::sys::bpf as sys;

/// What the programs need to know, at one moment.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Peers {
    /// A container address → its network's number, for networks that allow traffic between
    /// their containers.
    pub network_of: HashMap<IpAddr, u32>,
    /// (netns cookie, network number): that namespace has a container on that network.
    pub pairs: BTreeSet<(u64, u32)>,
}

/// Reads [`Peers`] from dockerd, remembering network numbers, containers' namespaces and
/// their cookies: a sync after an event asks dockerd only about containers it has not seen
/// (a thousand containers starting at once must not cost a million requests).
pub struct Learner {
    engine: Engine,
    numbers: HashMap<String, u32>,
    /// Container ID → its namespace file, while that file exists.
    sandboxes: HashMap<String, PathBuf>,
    /// (sandbox path, its nsfs inode) → netns cookie: a namespace is entered once.
    cookies: HashMap<(PathBuf, u64), u64>,
}

impl Learner {
    /// A learner asking `engine`.
    pub fn new(engine: Engine) -> Learner {
        Learner {
            engine,
            numbers: HashMap::new(),
            sandboxes: HashMap::new(),
            cookies: HashMap::new(),
        }
    }

    /// dockerd's networks now, as pairs and numbers.
    pub fn learn(&mut self) -> io::Result<Peers> {
        let networks = self.engine.networks()?;
        let mut peers = Peers::default();
        let (mut cookies, mut sandboxes) = (HashMap::new(), HashMap::new());
        for n in networks.iter().filter(|n| n.icc) {
            let next = u32::try_from(self.numbers.len() + 1).unwrap_or(u32::MAX);
            let number = *self.numbers.entry(n.id.clone()).or_insert(next);
            for m in &n.members {
                let sandbox = match self.sandboxes.get(&m.container) {
                    Some(path) if path.exists() => path.clone(),
                    _ => match self.engine.sandbox(&m.container)? {
                        Some(path) => path,
                        None => continue,
                    },
                };
                // A container gone between the two reads: its namespace file is gone too.
                let Ok(inode) = std::fs::metadata(&sandbox).map(|md| md.ino()) else {
                    continue;
                };
                sandboxes.insert(m.container.clone(), sandbox.clone());
                let key = (sandbox.clone(), inode);
                let cookie = match self.cookies.get(&key) {
                    Some(&c) => c,
                    None => match sys::netns_cookie_at(&sandbox) {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::debug!(
                                "hairpin: cannot read {}: {}",
                                sandbox.display(),
                                describe(&e)
                            );
                            continue;
                        }
                    },
                };
                cookies.insert(key, cookie);
                peers.pairs.insert((cookie, number));
                for ip in &m.addrs {
                    peers.network_of.insert(*ip, number);
                }
            }
        }
        self.cookies = cookies;
        self.sandboxes = sandboxes;
        Ok(peers)
    }
}

/// Follows dockerd at `engine` for as long as `apply` returns true: learns [`Peers`] at once
/// and again after each network event (a container joining or leaving a network), hands
/// each to `apply`; between events `apply(None)` asks whether to go on. When dockerd does not
/// answer (not started yet, restarting), retries with a growing pause and keeps what it last
/// learnt.
pub fn follow(engine: Engine, mut apply: impl FnMut(Option<Peers>) -> bool) {
    const POLL: Duration = Duration::from_millis(250);
    let mut learner = Learner::new(engine.clone());
    let mut pause = Duration::from_secs(1);
    let mut told = false;
    loop {
        // Subscribe first, then read: an event between the two is not missed.
        let followed = engine.events(POLL).and_then(|events| {
            let peers = learner.learn()?;
            tracing::info!(
                "hairpin: following dockerd at {}: {} container namespaces on networks with icc",
                engine.socket().display(),
                peers.pairs.len()
            );
            Ok((events, peers))
        });
        let (mut events, peers) = match followed {
            Ok(f) => f,
            Err(e) => {
                if !told {
                    tracing::info!(
                        "hairpin: dockerd's API at {} does not answer ({}); containers reach \
                         published ports through the listeners until it does",
                        engine.socket().display(),
                        describe(&e)
                    );
                    told = true;
                }
                let mut waited = Duration::ZERO;
                while waited < pause {
                    if !apply(None) {
                        return;
                    }
                    std::thread::sleep(POLL);
                    waited += POLL;
                }
                pause = (pause * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        told = false;
        pause = Duration::from_secs(1);
        if !apply(Some(peers)) {
            return;
        }
        let mut dirty = false;
        loop {
            let read = match events.fill_buf() {
                Ok([]) => break,
                Ok(b) => Ok(b.len()),
                Err(e) => Err(e),
            };
            match read {
                Ok(n) => {
                    events.consume(n);
                    dirty = true;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    // Quiet for a moment: read again what the burst of events changed.
                    if dirty {
                        dirty = false;
                        match learner.learn() {
                            Ok(p) => {
                                if !apply(Some(p)) {
                                    return;
                                }
                            }
                            Err(e) => {
                                tracing::debug!("hairpin: {}", describe(&e));
                                break;
                            }
                        }
                    } else if !apply(None) {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        tracing::debug!("hairpin: dockerd's event stream ended; subscribing again");
    }
}
