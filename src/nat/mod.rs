//! The kernel fast path: DNAT rules for mappings in rproxy's own nftables table, installed
//! over netlink. The userland listener keeps running beside them and serves what DNAT must
//! not or cannot: loopback clients, hairpin traffic from the target's own network, IPv6
//! clients of an IPv4 target.
//!
//! The same table holds the mappings' allow-lists (`Nat::set_allow`, see `filter`): a filter
//! chain ahead of every DNAT, rproxy's and dockerd's alike, whatever a mapping's NAT mode.
//!
//! Ownership: the table is created with NFT_TABLE_F_OWNER, so it belongs to this process's
//! netlink socket and the kernel deletes it when the process exits, even by SIGKILL. Tables
//! that kernels without the owner flag (before 5.12) leave behind are swept at start-up: only
//! tables named like ours, not owned, whose process is gone. Nothing else is ever touched.

mod conntrack;
mod dockerd;
mod filter;
mod netlink;
mod policy;
mod route;
mod rules;
mod sweep;
mod table;
mod worker;

use std::collections::HashMap;
use std::sync::{mpsc, Mutex};

use tokio::sync::oneshot;
use worker::Job;

use crate::allow::AllowList;
use crate::mapping::Mapping;
use crate::settings::options::Mode;

/// How a mapping's traffic is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Path {
    /// DNAT rules in the kernel (plus the listener, for loopback and hairpin clients).
    Kernel,
    /// dockerd's own rules (iptables or nftables backend) DNAT it; rproxy adds none (the
    /// listener still runs).
    Dockerd,
    /// The userland listener only, and why.
    Userland(String),
}

impl Path {
    /// The word `rproxy ls` shows.
    pub fn label(&self) -> &'static str {
        match self {
            Path::Kernel => "kernel",
            Path::Dockerd => "dockerd",
            Path::Userland(_) => "userland",
        }
    }
}

/// A process's kernel path: its table, kept by the NAT thread (started on first use, so a
/// process whose mappings all have NAT off never has one). Every call returns without waiting
/// on the kernel under a lock; the async ones wait for the thread's answer.
pub struct Nat {
    table: String,
    worker: Mutex<Option<mpsc::Sender<Job>>>,
    /// dockerd's mappings whose path the thread changed since it answered `install`.
    current: worker::Current,
}

impl Nat {
    /// The daemon's table name; docker-mode processes serving alone use `rproxy-<pid>`.
    pub const DAEMON_TABLE: &'static str = "rproxy";

    /// The kernel path through table `inet <table>`; nothing is opened yet.
    pub fn new(table: &str) -> Nat {
        Nat {
            table: table.to_string(),
            worker: Mutex::new(None),
            current: Default::default(),
        }
    }

    /// Hands `job` to the thread, starting it if needed.
    fn send(&self, job: Job) -> Result<(), String> {
        let mut worker = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        let job = match worker.as_ref() {
            None => job,
            Some(tx) => match tx.send(job) {
                Ok(()) => return Ok(()),
                // The thread ended (closed): a new one opens the table again.
                Err(mpsc::SendError(job)) => job,
            },
        };
        let tx = worker::spawn(self.table.clone(), self.current.clone())
            .map_err(|e| format!("cannot start the NAT thread: {e}"))?;
        let sent = tx.send(job).map_err(|_| "the NAT thread ended".to_string());
        *worker = Some(tx);
        sent
    }

    /// Sends `job` made with a reply channel and waits for the answer.
    async fn ask<T>(&self, job: impl FnOnce(oneshot::Sender<T>) -> Job) -> Result<T, String> {
        let (tx, rx) = oneshot::channel();
        self.send(job(tx))?;
        rx.await.map_err(|_| "the NAT thread ended".to_string())
    }

    /// Opens (and sweeps) the table now: the daemon with `--nat` reports an unusable kernel
    /// path at start-up. Err only for `Require`; `On` falls back with one warning.
    pub async fn open(&self, mode: Mode) -> Result<(), String> {
        self.ask(|tx| Job::Open(mode, tx)).await?
    }

    /// Gives `m` the path its NAT mode asks for; None when it is off. `from_dockerd`: the
    /// mapping is one dockerd publishes, whose own iptables rules may translate it already.
    pub async fn install(&self, m: &Mapping, from_dockerd: bool) -> Result<Option<Path>, String> {
        if m.options.nat == Mode::Off {
            return Ok(None);
        }
        if let Some(why) = rules::userland_only(m) {
            tracing::info!("{m}: userland only, {why}");
            return Ok(Some(Path::Userland(why.into())));
        }
        let path = self
            .ask(|tx| Job::Install(m.clone(), from_dockerd, tx))
            .await;
        match path {
            Ok(result) => result.map(Some),
            Err(why) if m.options.nat == Mode::Require => Err(why),
            Err(why) => Ok(Some(Path::Userland(why))),
        }
    }

    /// Whether dockerd's own rules DNAT `m`'s port (remote clients then reach the
    /// target without passing the listener); false when that cannot be seen.
    pub async fn dockerd_translates(&self, m: &Mapping) -> bool {
        self.ask(|tx| Job::Dockerd(m.clone(), tx))
            .await
            .unwrap_or(false)
    }

    /// `m`'s path now: `installed` (what `install` answered), unless the thread has since
    /// followed dockerd's rules to another.
    pub fn path_now(&self, m: &Mapping, installed: Option<Path>) -> Option<Path> {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        current.get(m).cloned().or(installed)
    }

    /// Removes `m`'s rules if its path was ours (or, dockerd's, may have become ours). Does
    /// not wait: the thread removes them in order with whatever is asked next.
    pub fn remove(&self, m: &Mapping, path: Option<&Path>) {
        if matches!(path, Some(Path::Kernel | Path::Dockerd)) {
            if let Err(e) = self.send(Job::Remove(m.clone())) {
                tracing::warn!("{m}: kernel NAT not removed: {e}");
            }
        }
    }

    /// Connections the kernel translated, by mapping spec: one dump, shared with every other
    /// caller waiting at the same time; nothing at all when the thread never started.
    pub async fn connections(&self) -> HashMap<String, u64> {
        if !self.started() {
            return HashMap::new();
        }
        self.ask(Job::Counters).await.unwrap_or_default()
    }

    /// Whether the thread runs (a process whose mappings never needed the kernel has none,
    /// and nothing to ask it).
    fn started(&self) -> bool {
        self.worker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Keeps `allow` as the filter of `m`'s published address and port (None: no filter):
    /// new connections and datagrams to it from sources outside the list are dropped in
    /// prerouting, ahead of any DNAT — rproxy's or dockerd's — whatever `m`'s NAT mode; the
    /// host's own processes (arriving through loopback) are never judged. One netlink batch:
    /// a change is atomic. Opens the table (and starts the thread) if needed; Err when the
    /// kernel refuses it. The filter is `m`'s alone: `install` and `remove` leave it be, so
    /// a mapping that goes takes it away with `set_allow(m, None)`.
    pub async fn set_allow(&self, m: &Mapping, allow: Option<&AllowList>) -> Result<(), String> {
        let allow = allow.cloned();
        self.ask(|tx| Job::Allow(m.clone(), allow, tx)).await?
    }

    /// Packets each mapping's filter dropped, by `Mapping::spec()`: one dump; nothing at all
    /// when the thread never started.
    pub async fn denied(&self) -> HashMap<String, u64> {
        if !self.started() {
            return HashMap::new();
        }
        self.ask(Job::Denied).await.unwrap_or_default()
    }

    /// Deletes the table (every rule at once) and ends the thread; a later install starts
    /// over.
    pub async fn close(&self) {
        let tx = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(tx) = tx {
            let (reply, done) = oneshot::channel();
            if tx.send(Job::Close(reply)).is_ok() {
                let _ = done.await;
            }
        }
    }
}
