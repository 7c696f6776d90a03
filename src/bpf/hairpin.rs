//! The hairpin rule's knowledge: which container network namespaces may be sent straight to
//! which targets, learnt from dockerd and kept current with its events.
//!
//! A container dialling a published port through a host address reaches the listener, which
//! connects to the target from the bridge gateway. Sending it straight to the target instead
//! is what dockerd itself would allow only when both are on the same bridge network and that
//! network lets its containers talk to each other (icc): then the container could have dialled
//! the target's address anyway. So the programs rewrite such a socket only when the pair
//! (its namespace, the target's network) is in `hairpin`; a network with icc off gets no
//! pairs, and every other case stays on the listener. Networks get numbers here (the Target
//! carries its network's), kept while dockerd lists the network and never reused.

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
    numbers: Numbers,
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
            numbers: Numbers::default(),
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
            let number = self.numbers.of(&n.id);
            // 0 is every Target with no network: never a pair's.
            if number == 0 {
                continue;
            }
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
        self.numbers
            .keep(networks.iter().filter(|n| n.icc).map(|n| n.id.as_str()));
        Ok(peers)
    }
}

/// Numbers for dockerd's networks, which the Targets carry (0: none). A network keeps its
/// number while dockerd lists it; the numbers of networks gone are forgotten, and never given
/// again while the daemon runs, so a Target still carrying one cannot match a new network.
#[derive(Debug, Default)]
struct Numbers {
    by_id: HashMap<String, u32>,
    /// The last number given.
    last: u32,
}

impl Numbers {
    /// The number of network `id`, given now if it has none; 0 once four billion have been
    /// given (its containers then use the listeners).
    fn of(&mut self, id: &str) -> u32 {
        if let Some(&n) = self.by_id.get(id) {
            return n;
        }
        let Some(next) = self.last.checked_add(1) else {
            return 0;
        };
        self.last = next;
        self.by_id.insert(id.to_string(), next);
        next
    }

    /// Forgets every network but those `listed`.
    fn keep<'a>(&mut self, listed: impl IntoIterator<Item = &'a str>) {
        let listed: BTreeSet<&str> = listed.into_iter().collect();
        self.by_id.retain(|id, _| listed.contains(id.as_str()));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Networks come and go (a CI job's, a compose project's): the numbers of those dockerd
    /// no longer lists are forgotten, and a number is never given to two networks.
    #[test]
    fn numbers_of_networks_gone_are_forgotten_and_never_shared() {
        let mut numbers = Numbers::default();
        let long_lived = numbers.of("bridge");
        let mut given = vec![long_lived];
        for round in 0..1000 {
            let id = format!("job-{round}");
            let n = numbers.of(&id);
            assert!(
                !given.contains(&n),
                "{id} got {n}, another network's number"
            );
            given.push(n);
            assert_eq!(numbers.of(&id), n, "{id} changed number");
            numbers.keep(["bridge", id.as_str()]);
        }
        numbers.keep(["bridge"]);
        assert_eq!(numbers.of("bridge"), long_lived);
        assert_eq!(
            numbers.by_id.len(),
            1,
            "remembered: {}",
            numbers.by_id.len()
        );
    }
}
