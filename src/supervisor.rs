//! The running mappings of a daemon: start one (binding its socket or taking one handed over,
//! and giving it kernel NAT when its mode asks), stop one (rules first, then the listener
//! with a drain time), list them with their counters. Shared by the control socket, reload
//! and shutdown behind one mutex that is never held across an await.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::Socket;
use tokio::task::JoinHandle;

use crate::control::Row;
use crate::frontend::{self, Frontend};
use crate::mapping::{Mapping, Proto};
use crate::nat::{self, Path};
use crate::stats::{Stats, Timings};
use crate::stop::{Stop, StopHandle};

/// Where a mapping came from; decides who may remove it (reload only touches `Config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `--publish` on the daemon's command line.
    Publish,
    /// The config file (reloaded on SIGHUP).
    Config,
    /// `rproxy add`.
    Control,
    /// A docker-mode shim's registration; removed when its connection closes.
    Shim(u64),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Publish => "publish",
            Origin::Config => "config",
            Origin::Control => "add",
            Origin::Shim(_) => "shim",
        })
    }
}

pub type Key = (Proto, SocketAddr);

struct Running {
    mapping: Mapping,
    origin: Origin,
    /// The kernel path, when its NAT mode was not off.
    path: Option<Path>,
    stats: Arc<Stats>,
    stop: StopHandle,
    task: JoinHandle<()>,
}

#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Mutex<BTreeMap<Key, Running>>>,
    nat: Arc<nat::Manager>,
    /// Whether TCP mappings record their duration histograms (when metrics are served).
    histograms: bool,
}

impl Supervisor {
    /// A supervisor with nothing running, whose mappings get kernel NAT from `nat` and record
    /// duration histograms when `histograms` (metrics are served).
    pub fn new(nat: nat::Manager, histograms: bool) -> Supervisor {
        Supervisor {
            inner: Arc::default(),
            nat: Arc::new(nat),
            histograms,
        }
    }

    pub fn nat(&self) -> &nat::Manager {
        &self.nat
    }

    /// Starts serving `mapping` on `socket` (bound here when None), with kernel NAT as its
    /// options ask. Returns the mapping with its real listen address. Must run inside the
    /// runtime.
    pub fn start(
        &self,
        mapping: Mapping,
        socket: Option<Socket>,
        origin: Origin,
    ) -> Result<Mapping, String> {
        let key = (mapping.proto, mapping.listen);
        let mut map = self.inner.lock().unwrap();
        if mapping.listen.port() != 0 {
            if let Some(r) = map.get(&key) {
                return Err(format!(
                    "{} {} is already mapped to {}",
                    key.0, key.1, r.mapping.target
                ));
            }
        }
        let socket = match socket {
            Some(s) => s,
            None => frontend::bind(&mapping)?,
        };
        let frontend = Frontend::new(mapping, socket)?;
        let mapping = frontend.mapping();
        // Rules only once the listener is up: it serves what DNAT leaves to it.
        let path = self.nat.install(
            &mapping,
            mapping.options.nat,
            matches!(origin, Origin::Shim(_)),
        )?;
        let timings = match mapping.proto {
            Proto::Tcp if self.histograms => Timings::enabled(),
            _ => Timings::default(),
        };
        let stats = Arc::new(Stats::with_timings(timings));
        let (stop, stopped) = Stop::new();
        let task = tokio::spawn(frontend.serve(stats.clone(), stopped));
        tracing::info!("serving {mapping} ({origin})");
        map.insert(
            (mapping.proto, mapping.listen),
            Running {
                mapping,
                origin,
                path,
                stats,
                stop,
                task,
            },
        );
        Ok(mapping)
    }

    /// Stops the mapping at `key` if `allowed` says so: the listener closes now, open
    /// connections get `drain` to finish. Returns what was stopped.
    pub fn stop_if(
        &self,
        key: &Key,
        drain: Duration,
        allowed: impl Fn(Origin) -> bool,
    ) -> Option<Mapping> {
        let mut map = self.inner.lock().unwrap();
        if !allowed(map.get(key)?.origin) {
            return None;
        }
        let r = map.remove(key)?;
        // New connections stop being translated now; translated ones keep their conntrack.
        self.nat.remove(&r.mapping, r.path.as_ref());
        r.stop.stop(drain);
        tracing::info!("stopped {} ({})", r.mapping, r.origin);
        // The task finishes by itself once drained; nothing waits on it.
        drop(r.task);
        Some(r.mapping)
    }

    /// Stops everything from `origin`-matching mappings; returns the tasks to await for drain.
    pub fn stop_all(&self, drain: Duration) -> Vec<JoinHandle<()>> {
        let mut map = self.inner.lock().unwrap();
        self.nat.close();
        std::mem::take(&mut *map)
            .into_values()
            .map(|r| {
                r.stop.stop(drain);
                r.task
            })
            .collect()
    }

    /// The mappings from one origin.
    pub fn mappings(&self, origin: Origin) -> Vec<Mapping> {
        let map = self.inner.lock().unwrap();
        map.values()
            .filter(|r| r.origin == origin)
            .map(|r| r.mapping)
            .collect()
    }

    pub fn get(&self, key: &Key) -> Option<(Mapping, Origin)> {
        self.inner
            .lock()
            .unwrap()
            .get(key)
            .map(|r| (r.mapping, r.origin))
    }

    /// Every mapping with its counters, its NAT path and whether it still serves.
    pub fn entries(&self) -> Vec<(Mapping, Arc<Stats>, Option<Path>, bool)> {
        let map = self.inner.lock().unwrap();
        map.values()
            .map(|r| {
                (
                    r.mapping,
                    r.stats.clone(),
                    r.path.clone(),
                    !r.task.is_finished(),
                )
            })
            .collect()
    }

    pub fn rows(&self) -> Vec<Row> {
        let kernel = self.nat.connections();
        let map = self.inner.lock().unwrap();
        map.values()
            .map(|r| Row {
                nat: r.path.as_ref().map_or("-", Path::label).into(),
                kernel_connections: kernel.get(&r.mapping.spec()).copied().unwrap_or(0),
                spec: r.mapping.spec(),
                origin: r.origin.to_string(),
                state: if r.task.is_finished() {
                    "stopped"
                } else {
                    "serving"
                }
                .into(),
                stats: r.stats.snapshot(),
            })
            .collect()
    }
}
