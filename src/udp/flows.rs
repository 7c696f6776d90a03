//! The UDP flow table: one entry per (client address, local destination address), bounded in
//! number with least-recently-used eviction.
//!
//! Recency is tracked lazily so the per-datagram cost is one atomic store: each flow sits in an
//! ordered queue at the time it was last *queued*; when the table is full the first entry is
//! examined, and if it saw traffic since, it is re-queued at the time of that traffic instead
//! of evicted. The entry evicted is then the one whose last activity is oldest, as in a true
//! LRU (to the millisecond).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// A flow is identified by who sent and which local address they sent to: replies must leave
/// from that address, and two clients behind different local addresses are different flows.
pub type FlowKey = (SocketAddr, Option<IpAddr>);

/// Milliseconds since the process's first call; cheap, monotonic, fits an atomic.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Last activity of a flow in either direction (ms, from [`now_ms`]); shared with its reply task.
#[derive(Debug, Default)]
pub struct Activity(AtomicU64);

impl Activity {
    /// Notes traffic now.
    pub fn touch(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }
    /// When the flow last saw traffic (ms, from [`now_ms`]).
    pub fn last(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A flow in the table, with what the table keeps about it.
pub struct Entry<F> {
    /// The flow.
    pub flow: F,
    /// Its last activity, touched by its data path.
    pub activity: Arc<Activity>,
    /// Unique per flow ever created; lets a late expiry notice tell a replaced flow apart.
    pub id: u64,
    /// Position in the recency queue: (last activity known when queued, id).
    queued: (u64, u64),
}

/// The flows of one mapping, bounded, least recently used first out.
pub struct FlowTable<F> {
    flows: HashMap<FlowKey, Entry<F>>,
    queue: BTreeMap<(u64, u64), FlowKey>,
    next: u64,
    max: usize,
}

impl<F> FlowTable<F> {
    /// An empty table of at most `max` flows (at least one).
    pub fn new(max: usize) -> Self {
        FlowTable {
            flows: HashMap::new(),
            queue: BTreeMap::new(),
            next: 0,
            max: max.max(1),
        }
    }

    /// How many flows live.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether no flow lives.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// The most recent activity of any flow (ms, from [`now_ms`]); None when there is none.
    pub fn last_activity(&self) -> Option<u64> {
        self.flows.values().map(|e| e.activity.last()).max()
    }

    /// The flow for `key`.
    pub fn get(&self, key: &FlowKey) -> Option<&Entry<F>> {
        self.flows.get(key)
    }

    /// The bound on flows.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Makes room for one more flow; returns the evicted flow, if one had to go.
    pub fn make_room(&mut self) -> Option<(FlowKey, F)> {
        if self.flows.len() < self.max {
            return None;
        }
        self.evict()
    }

    /// Removes the least recently used flow, below the bound or not (its socket is wanted for
    /// a new flow).
    pub fn evict(&mut self) -> Option<(FlowKey, F)> {
        while let Some(((queued, id), key)) = self.queue.pop_first() {
            let Some(entry) = self.flows.get_mut(&key) else {
                continue;
            };
            let last = entry.activity.last();
            if last > queued {
                // Used since it was queued: back in line at the time of that use.
                entry.queued = (last, id);
                self.queue.insert(entry.queued, key);
                continue;
            }
            return self.flows.remove(&key).map(|e| (key, e.flow));
        }
        None
    }

    /// Inserts a new flow built from its id (call [`make_room`](Self::make_room) first).
    pub fn insert(
        &mut self,
        key: FlowKey,
        activity: Arc<Activity>,
        flow: impl FnOnce(u64) -> F,
    ) -> u64 {
        self.next += 1;
        let id = self.next;
        let flow = flow(id);
        let queued = (now_ms(), id);
        self.queue.insert(queued, key);
        if let Some(old) = self.flows.insert(
            key,
            Entry {
                flow,
                activity,
                id,
                queued,
            },
        ) {
            self.queue.remove(&old.queued);
        }
        id
    }

    /// Removes the flow if it is still the one with `id`.
    pub fn remove(&mut self, key: &FlowKey, id: u64) -> Option<F> {
        match self.flows.get(key) {
            Some(e) if e.id == id => {
                let e = self.flows.remove(key)?;
                self.queue.remove(&e.queued);
                Some(e.flow)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        (SocketAddr::from(([127, 0, 0, 1], port)), None)
    }

    #[test]
    fn evicts_least_recently_used() {
        let mut t = FlowTable::new(2);
        let a1 = Arc::new(Activity::default());
        let a2 = Arc::new(Activity::default());
        t.insert(key(1), a1.clone(), |_| "one");
        t.insert(key(2), a2, |_| "two");
        // Flow 1 sees traffic after it was queued, so flow 2 is now the least recent.
        std::thread::sleep(std::time::Duration::from_millis(3));
        a1.touch();
        assert_eq!(t.make_room(), Some((key(2), "two")));
        let id = t.insert(key(3), Arc::new(Activity::default()), |_| "three");
        assert_eq!(t.len(), 2);
        assert!(t.get(&key(1)).is_some());
        // A stale expiry (wrong id) does not remove the current flow.
        assert_eq!(t.remove(&key(3), id + 100), None);
        assert_eq!(t.remove(&key(3), id), Some("three"));
        assert_eq!(t.make_room(), None);
        // Below the bound, evict still gives up the least recent flow.
        assert_eq!(t.evict(), Some((key(1), "one")));
        assert_eq!((t.len(), t.evict()), (0, None));
    }

    /// Both flows saw traffic since they were queued: the one whose traffic is older goes,
    /// not the one queued first.
    #[test]
    fn evicts_by_last_activity_when_all_were_used() {
        let mut t = FlowTable::new(2);
        let a = Arc::new(Activity::default());
        let b = Arc::new(Activity::default());
        t.insert(key(1), a.clone(), |_| "a");
        t.insert(key(2), b.clone(), |_| "b");
        std::thread::sleep(std::time::Duration::from_millis(3));
        b.touch();
        std::thread::sleep(std::time::Duration::from_millis(3));
        a.touch();
        assert_eq!(t.make_room(), Some((key(2), "b")));
    }
}
