//! `--docker-ports`: the daemon follows dockerd's containers through its Engine API and
//! serves their published ports with no process per port, for a dockerd run without a
//! userland proxy.
//!
//! dockerd alone (`"userland-proxy": false`) serves remote clients and 127.0.0.1 by DNAT, but
//! not `[::1]`, and not the IPv6 clients of an IPv4-only container. Each published port
//! becomes a mapping of origin `docker`, served by the kernel paths: the socket hooks send
//! host clients (127.0.0.0/8, ::1, the host's addresses) and containers on the target's own
//! network straight to the container, dockerd's DNAT carries remote clients. dockerd holds
//! the addresses it lists (20.10 binds them to reserve the port), so those mappings have no
//! listener; the `[::]:PORT` of an IPv4-only container, which dockerd leaves free, gets a
//! listener of ours (6→4).
//!
//! Where a userland proxy still serves a port (a shim handed it over, docker-proxy holds
//! it), that wins and nothing is added. The thread reads every running container when it
//! (re)subscribes to dockerd's events, then one container per event; what dockerd does not
//! answer about is kept as it was.

mod proxies;
mod published;

use std::collections::{BTreeSet, HashMap};
use std::io::{self, BufRead};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::runtime::Handle;

pub use published::{carrier, wanted, Wanted};

use crate::engine::{Container, Engine, Event};
use crate::frontend;
use crate::mapping::describe;
use crate::settings::options::Options;
use crate::supervisor::{key, Change, Current, Key, Listener, Origin, Start, Supervisor};

/// How long a read of the event stream waits before looking whether the daemon stops.
const POLL: Duration = Duration::from_millis(250);

/// The longest pause between two attempts to reach dockerd: short, so that a dockerd
/// restarting is read again as soon as it answers (an attempt is a connect(2) that fails at
/// once while its socket is gone).
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// What the follower needs from the daemon.
pub struct Follower {
    engine: Engine,
    sup: Supervisor,
    runtime: Handle,
    /// The options of every mapping it makes (the daemon's defaults).
    options: Options,
    /// How long a stopped container's relayed connections may take to finish.
    drain: Duration,
    /// Container ID → what is served for it.
    served: HashMap<String, Served>,
    /// Serve the containers' ports (`--docker-ports`); else only give the ports shims
    /// handed over the lists their containers' labels ask for.
    serve_ports: bool,
}

/// What is served for one container.
struct Served {
    /// Its name, for the log.
    name: String,
    /// The keys its ports are served under.
    keys: BTreeSet<Key>,
}

impl Follower {
    /// A follower of dockerd at `engine`, starting mappings with `options` on `sup` (whose
    /// runtime `runtime` is) when `serve_ports`, else only labelling shims' ports.
    pub fn new(
        engine: Engine,
        sup: Supervisor,
        runtime: Handle,
        options: Options,
        drain: Duration,
        serve_ports: bool,
    ) -> Follower {
        Follower {
            engine,
            sup,
            runtime,
            options,
            drain,
            served: HashMap::new(),
            serve_ports,
        }
    }

    /// Follows dockerd on a thread of its own until the supervisor stops. The receiver is
    /// told once the first attempt to read dockerd is done (served, or dockerd did not
    /// answer).
    pub fn spawn(self) -> io::Result<tokio::sync::oneshot::Receiver<()>> {
        let (first, done) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("rproxy-docker".into())
            .spawn(move || self.follow(first))?;
        Ok(done)
    }

    fn follow(mut self, first: tokio::sync::oneshot::Sender<()>) {
        let mut first = Some(first);
        let mut pause = Duration::from_millis(250);
        let mut told = false;
        while !self.sup.is_stopped() {
            // Subscribe first, then read: an event between the two is not missed.
            let followed = self
                .engine
                .container_events(POLL)
                .and_then(|events| self.read_all().map(|()| events));
            if let Some(first) = first.take() {
                let _ = first.send(());
            }
            let events = match followed {
                Ok(events) => events,
                Err(e) => {
                    if !told {
                        let at = self.engine.socket().display();
                        let why = describe(&e);
                        // Without --docker-ports it matters only if containers have labels.
                        match self.serve_ports {
                            true => tracing::warn!(
                                "docker ports: dockerd's API at {at} does not answer ({why}); \
                                 its published ports are served as dockerd alone serves them \
                                 until it does (retrying)"
                            ),
                            false => tracing::info!(
                                "docker labels: dockerd's API at {at} does not answer ({why}); \
                                 ports its proxies hand over get the daemon's own allow-list \
                                 until it does"
                            ),
                        }
                        told = true;
                    }
                    self.sleep(pause);
                    pause = (pause * 2).min(MAX_PAUSE);
                    continue;
                }
            };
            if told {
                tracing::info!(
                    "docker ports: dockerd's API at {} answers again",
                    self.engine.socket().display()
                );
            }
            told = false;
            pause = Duration::from_millis(250);
            self.on_events(events);
            tracing::info!("docker ports: dockerd's event stream ended; subscribing again");
        }
    }

    /// Sleeps `pause`, or less when the daemon stops.
    fn sleep(&self, pause: Duration) {
        let until = Instant::now() + pause;
        while Instant::now() < until && !self.sup.is_stopped() {
            std::thread::sleep(POLL.min(until - Instant::now()));
        }
    }

    /// Acts on each event until the stream ends or the daemon stops.
    fn on_events(&mut self, mut events: io::BufReader<std::os::unix::net::UnixStream>) {
        let mut line = Vec::new();
        while !self.sup.is_stopped() {
            match events.read_until(b'\n', &mut line) {
                Ok(0) => return,
                Ok(_) if !line.ends_with(b"\n") => continue,
                Ok(_) => {
                    if let Some((event, at)) = Event::parse(&line) {
                        self.on(event, at);
                    }
                    line.clear();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => {
                    tracing::debug!("docker ports: event stream: {}", describe(&e));
                    return;
                }
            }
        }
    }

    /// One event: read that container again, or drop what it had.
    fn on(&mut self, event: Event, at: Option<SystemTime>) {
        let (id, read) = match event {
            Event::Started(id) => (id, true),
            // Joining a network before its start, renames of containers that publish
            // nothing: nothing to read.
            Event::Changed(id) if !self.served.contains_key(&id) => return,
            Event::Changed(id) => (id, true),
            Event::Gone(id) if !self.served.contains_key(&id) => return,
            Event::Gone(id) => (id, false),
        };
        let container = match read {
            false => None,
            true => match self.engine.containers(Some(&id)) {
                Ok(list) => list.into_iter().next(),
                Err(e) => {
                    tracing::warn!("docker ports: cannot read container {id}: {}", describe(&e));
                    return;
                }
            },
        };
        let name = match (&container, self.served.get(&id)) {
            (Some(c), _) => c.name.clone(),
            (None, Some(s)) => s.name.clone(),
            (None, None) => short(&id).to_string(),
        };
        let had = self.served.get(&id).map_or(0, |s| s.keys.len());
        let has = self.serve(&id, container.as_ref());
        // When dockerd's event happened: how long its ports went without their paths.
        let after = at
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .map(|d| format!(", {:.1} ms after dockerd's event", d.as_secs_f64() * 1e3))
            .unwrap_or_default();
        match (had, has) {
            (0, 0) => {}
            (_, 0) => tracing::info!("docker ports: container {name}: gone{after}"),
            _ => tracing::info!("docker ports: container {name}: {has} mappings{after}"),
        }
    }

    /// Reads every running container and serves what they publish; drops what is served for
    /// containers that no longer run (or that a previous daemon handed over).
    fn read_all(&mut self) -> io::Result<()> {
        let containers = self.engine.containers(None)?;
        let running: BTreeSet<&str> = containers.iter().map(|c| c.id.as_str()).collect();
        let gone: Vec<String> = self
            .served
            .keys()
            .filter(|id| !running.contains(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            self.serve(&id, None);
        }
        let mut total = 0;
        for c in &containers {
            total += self.serve(&c.id, Some(c));
        }
        self.drop_strays();
        tracing::info!(
            "docker ports: following dockerd at {}: {} running containers, {total} mappings",
            self.engine.socket().display(),
            containers.len()
        );
        Ok(())
    }

    /// Stops mappings of origin `docker` that no container here accounts for.
    fn drop_strays(&mut self) {
        let ours: BTreeSet<Key> = self
            .served
            .values()
            .flat_map(|s| s.keys.iter().copied())
            .collect();
        let stopped = self.change(|current| {
            let stop = current
                .iter()
                .filter(|(k, c)| c.origin.container().is_some() && !ours.contains(*k))
                .map(|(k, _)| *k)
                .collect();
            Ok(Change {
                stop,
                start: Vec::new(),
            })
        });
        if let Err(e) = stopped {
            tracing::warn!("docker ports: {e}");
        }
    }

    /// Makes what is served for container `id` what `container` (None: it is gone)
    /// publishes, in one change; returns how many mappings it has now.
    fn serve(&mut self, id: &str, container: Option<&Container>) -> usize {
        let mut bad = Vec::new();
        let wanted = container.map_or_else(Vec::new, |c| wanted(c, &self.options, &mut bad));
        for problem in bad {
            let name = container.map_or("", |c| c.name.as_str());
            tracing::warn!(
                "docker ports: container {name}: {problem}; its ports get the daemon's own list \
                 (docker_allow)"
            );
        }
        let origin = Origin::Container(Arc::from(container.map_or("", |c| c.name.as_str())));
        let had = self
            .served
            .get(id)
            .map(|s| s.keys.clone())
            .unwrap_or_default();
        let engine = &self.engine;
        // Asked only when a port is new to the daemon.
        let proxied = || engine.pid().map(proxies::served).unwrap_or_default();
        let mut kept = BTreeSet::new();
        let serve_ports = self.serve_ports;
        let planned = self.change(|current| {
            let plan = plan(&wanted, &origin, &had, current, serve_ports, proxied);
            kept = plan.serves;
            Ok(plan.change)
        });
        match planned {
            Ok(_) if kept.is_empty() => {
                self.served.remove(id);
            }
            Ok(_) => {
                let name = container.map_or_else(
                    || {
                        self.served
                            .get(id)
                            .map(|s| s.name.clone())
                            .unwrap_or_default()
                    },
                    |c| c.name.clone(),
                );
                self.served
                    .insert(id.to_string(), Served { name, keys: kept });
            }
            Err(e) => {
                let name = container.map_or_else(|| short(id).to_string(), |c| c.name.clone());
                tracing::warn!("docker ports: container {name}: {e}");
            }
        }
        self.served.get(id).map_or(0, |s| s.keys.len())
    }

    /// Applies a change on the daemon's runtime, from this thread.
    fn change(
        &self,
        plan: impl FnOnce(&std::collections::BTreeMap<Key, Current>) -> Result<Change, String>,
    ) -> Result<Vec<crate::mapping::Mapping>, String> {
        self.runtime
            .block_on(self.sup.change(self.drain, plan))
            .map_err(String::from)
    }
}

/// A planned change for one container, and the keys it serves once applied.
struct Plan {
    change: Change,
    serves: BTreeSet<Key>,
}

/// The change that makes one container's mappings `wanted` (under `origin`), given the keys
/// it `had` and the `current` set: a key someone else serves (a shim's registration, the
/// config file) or a userland proxy of dockerd's holds (`proxied`, asked once if need be)
/// is left alone; a new one gets a listener when its address is free, none when dockerd
/// holds it.
fn plan(
    wanted: &[Wanted],
    origin: &Origin,
    had: &BTreeSet<Key>,
    current: &std::collections::BTreeMap<Key, Current>,
    serve_ports: bool,
    proxied: impl Fn() -> BTreeSet<Key>,
) -> Plan {
    let mut change = Change::default();
    let mut serves = BTreeSet::new();
    let mut held: Option<BTreeSet<Key>> = None;
    let wanted_keys: BTreeSet<Key> = wanted.iter().map(|w| key(&w.mapping)).collect();
    for k in had.difference(&wanted_keys) {
        if current
            .get(k)
            .is_some_and(|c| c.origin.container().is_some())
        {
            change.stop.push(*k);
        }
    }
    for w in wanted {
        let k = key(&w.mapping);
        let listener = match current.get(&k) {
            // A container's: this one's as it was, or a stale one (a container whose end
            // was missed, a previous daemon's) that this one replaces on its socket.
            Some(c) if c.origin.container().is_some() => {
                if c.mapping == w.mapping && &c.origin == origin {
                    serves.insert(k);
                    continue;
                }
                change.stop.push(k);
                match c.listener {
                    true => Listener::Bind,
                    false => Listener::None,
                }
            }
            // A shim's registration: the shim serves it, but the container's labels say who
            // may reach it (the registration got the daemon's own list meanwhile).
            Some(c) if matches!(c.origin, Origin::Shim(_)) => {
                if c.mapping.options.allow != w.mapping.options.allow {
                    let mut relabelled = c.mapping.clone();
                    relabelled.options.allow = w.mapping.options.allow.clone();
                    change.stop.push(k);
                    change.start.push(Start {
                        mapping: relabelled,
                        listener: Listener::Bind,
                        origin: c.origin.clone(),
                    });
                }
                continue;
            }
            Some(c) => {
                tracing::debug!(
                    "docker ports: {} is served already ({}); leaving it",
                    w.mapping,
                    c.origin
                );
                continue;
            }
            None if !serve_ports => continue,
            None => {
                let held = held.get_or_insert_with(&proxied);
                if held.contains(&k) {
                    tracing::debug!(
                        "docker ports: {} is served by dockerd's userland proxy; leaving it",
                        w.mapping
                    );
                    continue;
                }
                match listener(w) {
                    Some(l) => l,
                    None => continue,
                }
            }
        };
        serves.insert(k);
        change.start.push(Start {
            mapping: w.mapping.clone(),
            listener,
            origin: origin.clone(),
        });
    }
    Plan { change, serves }
}

/// A new mapping's listener: none for an address dockerd listed, which is dockerd's to
/// hold (binding it while dockerd restarts would make dockerd fail to restore its
/// containers); a socket of ours for the one added here, when it is free; None (not
/// served) when it is taken.
fn listener(w: &Wanted) -> Option<Listener> {
    if w.listed {
        return Some(Listener::None);
    }
    match frontend::bind(&w.mapping) {
        Ok(socket) => Some(Listener::Socket(socket)),
        Err(e) => {
            tracing::debug!("docker ports: {} not served: {e}", w.mapping);
            None
        }
    }
}

/// The first 12 characters of a container ID, as docker shows it.
fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::mapping::{parse_publish, Mapping};

    fn mapping(spec: &str) -> Mapping {
        parse_publish(spec, Options::default()).unwrap()[0].clone()
    }

    fn listed(spec: &str) -> Wanted {
        Wanted {
            mapping: mapping(spec),
            listed: true,
        }
    }

    fn current(entries: &[(&str, Origin, bool)]) -> BTreeMap<Key, Current> {
        entries
            .iter()
            .map(|(spec, origin, listener)| {
                let m = mapping(spec);
                let k = key(&m);
                let c = Current {
                    mapping: m,
                    origin: origin.clone(),
                    listener: *listener,
                };
                (k, c)
            })
            .collect()
    }

    fn web() -> Origin {
        Origin::Container("web".into())
    }

    /// (starts with their listener kind, stops)
    fn summary(p: &Plan) -> (Vec<(String, &'static str)>, Vec<Key>) {
        let starts = p
            .change
            .start
            .iter()
            .map(|s| {
                let kind = match s.listener {
                    Listener::None => "none",
                    Listener::Bind => "bind",
                    Listener::Socket(_) => "socket",
                };
                (s.mapping.spec(), kind)
            })
            .collect();
        (starts, p.change.stop.clone())
    }

    #[test]
    fn dockerds_addresses_get_no_listener_and_others_keep_theirs() {
        let wanted = [
            listed("0.0.0.0:8080:172.17.0.2:80"),
            listed("[::]:8080:[fd00::2]:80"),
        ];
        // A shim registered the IPv6 one: it stays the shim's.
        let now = current(&[("[::]:8080:[fd00::2]:80", Origin::Shim(1), true)]);
        let p = plan(&wanted, &web(), &BTreeSet::new(), &now, true, BTreeSet::new);
        assert_eq!(
            summary(&p),
            (
                vec![("0.0.0.0:8080:172.17.0.2:80/tcp".into(), "none")],
                vec![]
            )
        );
        assert_eq!(p.serves.len(), 1);
    }

    #[test]
    fn a_port_dockerds_proxy_serves_is_left_alone() {
        let wanted = [listed("0.0.0.0:8080:172.17.0.2:80")];
        let proxied = || BTreeSet::from([key(&mapping("0.0.0.0:8080:1.1.1.1:1"))]);
        let p = plan(
            &wanted,
            &web(),
            &BTreeSet::new(),
            &BTreeMap::new(),
            true,
            proxied,
        );
        assert_eq!(summary(&p), (vec![], vec![]));
        assert!(p.serves.is_empty());
    }

    #[test]
    fn what_is_served_already_is_kept_and_what_changed_is_replaced() {
        let same = "0.0.0.0:8080:172.17.0.2:80";
        let moved = "[::]:8080:172.17.0.2:80";
        let now = current(&[
            (same, web(), false),
            (moved, web(), true),
            ("0.0.0.0:9:172.17.0.2:9", web(), false),
        ]);
        let had: BTreeSet<Key> = now.keys().copied().collect();
        // The container restarted with a new address; port 9 is no longer published.
        let wanted = [listed(same), listed("[::]:8080:172.17.0.3:80")];
        let p = plan(&wanted, &web(), &had, &now, true, || {
            panic!("no new port: no need to ask")
        });
        let (starts, mut stops) = summary(&p);
        stops.sort();
        assert_eq!(
            starts,
            vec![("[::]:8080:172.17.0.3:80/tcp".to_string(), "bind")]
        );
        assert_eq!(
            stops,
            vec![key(&mapping("0.0.0.0:9:1.1.1.1:9")), key(&mapping(moved))]
        );
        assert_eq!(p.serves.len(), 2);
    }

    #[test]
    fn a_gone_container_stops_only_what_is_still_its_own() {
        let now = current(&[
            ("0.0.0.0:8080:172.17.0.2:80", web(), false),
            ("0.0.0.0:8081:172.17.0.2:81", Origin::Shim(3), true),
        ]);
        let had: BTreeSet<Key> = now.keys().copied().collect();
        let p = plan(&[], &web(), &had, &now, true, BTreeSet::new);
        assert_eq!(
            summary(&p),
            (vec![], vec![key(&mapping("0.0.0.0:8080:1.1.1.1:1"))])
        );
    }
}
