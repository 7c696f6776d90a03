//! Per-mapping counters, shared by the data path and whoever reports (`rproxy ls`, the
//! Prometheus endpoint). Relaxed atomics, bumped per connection, per chunk or per batch: never
//! a lock on the hot path. The two histograms are recorded once per connection.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Why a connection could not be made, or a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The target refused (RST / ICMP port unreachable).
    Refused,
    /// The target never answered within the connect timeout.
    Timeout,
    /// No route to the target's host or network.
    Unreachable,
    /// Out of descriptors, buffers, memory or local ports, or the flow table's bound.
    Limit,
    /// A datagram larger than the proxy relays.
    TooLarge,
    /// Anything else.
    Other,
}

impl Failure {
    /// Every reason, in the order `Stats` counts them.
    pub const ALL: [Failure; 6] = [
        Failure::Refused,
        Failure::Timeout,
        Failure::Unreachable,
        Failure::Limit,
        Failure::TooLarge,
        Failure::Other,
    ];

    /// Its place in `ALL`, and in `Stats::failures`.
    fn index(self) -> usize {
        Failure::ALL.iter().position(|f| *f == self).unwrap_or(0)
    }

    /// The `reason` label of the metrics.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::Timeout => "timeout",
            Failure::Unreachable => "unreachable",
            Failure::Limit => "limit",
            Failure::TooLarge => "too_large",
            Failure::Other => "other",
        }
    }

    /// The reason an OS error stands for.
    pub fn of(e: &io::Error) -> Failure {
        if e.kind() == io::ErrorKind::TimedOut {
            return Failure::Timeout;
        }
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => Failure::Refused,
            Some(libc::ETIMEDOUT) => Failure::Timeout,
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN | libc::ENETDOWN) => {
                Failure::Unreachable
            }
            Some(
                libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL,
            ) => Failure::Limit,
            Some(libc::EMSGSIZE) => Failure::TooLarge,
            _ => Failure::Other,
        }
    }
}

/// One mapping's counters, shared by its serving task and whoever reports.
#[derive(Debug, Default)]
pub struct Stats {
    /// Open TCP connections, or live UDP flows.
    pub active: AtomicU64,
    /// Connections accepted, or flows created.
    pub total: AtomicU64,
    /// Connections the target refused or never answered; datagrams dropped.
    pub failed: AtomicU64,
    /// `failed` by reason, indexed like `Failure::ALL` (read with `failures_of`).
    failures: [AtomicU64; Failure::ALL.len()],
    /// Bytes from clients to the target.
    pub bytes_in: AtomicU64,
    /// Bytes from the target back to clients.
    pub bytes_out: AtomicU64,
    /// UDP datagrams relayed to the target.
    pub datagrams_in: AtomicU64,
    /// UDP datagrams relayed back to clients.
    pub datagrams_out: AtomicU64,
    /// UDP flows ended by their idle timeout.
    pub expired: AtomicU64,
    /// UDP flows evicted by the flow table's bound.
    pub evicted: AtomicU64,
    /// Connections reset, or datagrams dropped, because their source is not in the
    /// mapping's allow-list.
    pub denied: AtomicU64,
    /// Per-connection timings, when a metrics recorder is installed (no-ops otherwise).
    pub timings: Timings,
    /// The rate of "backend keeps failing" warnings.
    backend_down: Warnings,
    /// The rate of "backend closed on the PROXY protocol header" warnings.
    header_refused: Warnings,
    /// The rate of "refused by the allow-list" lines.
    denied_lines: Warnings,
}

/// One kind of warning's rate limit: when the last went out (ms since the Unix epoch), and
/// the events since.
#[derive(Debug, Default)]
struct Warnings {
    warned_at: AtomicU64,
    unwarned: AtomicU64,
}

impl Warnings {
    /// Counts an event: Some(events since the last warning, this one included) when a
    /// warning is due now, else None (log it at debug).
    fn due(&self) -> Option<u64> {
        self.unwarned.fetch_add(1, Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = self.warned_at.load(Relaxed);
        if last != 0 && now.saturating_sub(last) < WARN_EVERY_MS {
            return None;
        }
        // One task wins the slot; the others keep counting.
        self.warned_at
            .compare_exchange(last, now, Relaxed, Relaxed)
            .ok()
            .map(|_| self.unwarned.swap(0, Relaxed))
    }
}

/// At most one warning of each kind per mapping this often; the rest go to debug.
const WARN_EVERY_MS: u64 = 10_000;

/// The two TCP duration histograms of a mapping. They live here, not in the metrics
/// recorder, so they go with their mapping: the recorder can only forget a series after an
/// idle timeout, and an idle histogram cannot be told apart from a removed one.
#[derive(Debug, Default)]
pub struct Timings {
    /// Off (recording nothing) unless metrics are served.
    enabled: bool,
    /// Seconds from accepting a TCP client to the target answering the connect.
    pub connect: Histogram,
    /// Seconds a TCP connection lived, from accept to close.
    pub lifetime: Histogram,
}

impl Timings {
    /// Timings that record (metrics are served).
    pub fn enabled() -> Timings {
        Timings {
            enabled: true,
            ..Timings::default()
        }
    }

    /// Records how long a connect to the target took.
    pub fn connected(&self, took: Duration) {
        if self.enabled {
            self.connect.record(took);
        }
    }

    /// Records how long a connection lived.
    pub fn closed(&self, lived: Duration) {
        if self.enabled {
            self.lifetime.record(lived);
        }
    }
}

/// Upper bounds of the histogram buckets, in seconds: sub-millisecond connects up to
/// hour-long connections.
pub const BUCKETS: [f64; 19] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 1800.0, 3600.0,
];

/// A Prometheus histogram: a count per bucket (the last one past every bound) and the sum.
/// Recording costs a search of 19 bounds, an atomic addition and a compare-and-swap.
///
/// The sum is a counter and must never go down (Prometheus would read a reset): it is kept in
/// microseconds, which 64 bits hold for 584,000 years of summed durations (nanoseconds: 584
/// years, a few months of a thousand connections open at all times), and saturates rather
/// than wraps.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Counts one observation.
    pub fn record(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS.partition_point(|&bound| bound < secs);
        self.counts[i].fetch_add(1, Relaxed);
        // To the nearest microsecond: a 50 µs connect must not count as 0.
        let micros = u64::try_from(d.as_nanos().saturating_add(500) / 1000).unwrap_or(u64::MAX);
        let _ = self
            .sum_micros
            .fetch_update(Relaxed, Relaxed, |sum| Some(sum.saturating_add(micros)));
    }

    /// (cumulative count per bound of [`BUCKETS`], count, sum in seconds), as Prometheus
    /// exposes them (`le` bounds are inclusive).
    pub fn snapshot(&self) -> (Vec<u64>, u64, f64) {
        let mut running = 0;
        let mut cumulative: Vec<u64> = self
            .counts
            .iter()
            .map(|c| {
                running += c.load(Relaxed);
                running
            })
            .collect();
        let count = cumulative.pop().unwrap_or(0);
        let sum = Duration::from_micros(self.sum_micros.load(Relaxed)).as_secs_f64();
        (cumulative, count, sum)
    }
}

/// A point-in-time copy of the counters `rproxy ls` shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// See [`Stats::active`].
    pub active: u64,
    /// See [`Stats::total`].
    pub total: u64,
    /// See [`Stats::failed`].
    pub failed: u64,
    /// See [`Stats::bytes_in`].
    pub bytes_in: u64,
    /// See [`Stats::bytes_out`].
    pub bytes_out: u64,
}

impl Stats {
    /// Zeroed counters that record into `timings`.
    pub fn with_timings(timings: Timings) -> Stats {
        Stats {
            timings,
            ..Stats::default()
        }
    }

    /// The counters `rproxy ls` shows, now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            active: self.active.load(Relaxed),
            total: self.total.load(Relaxed),
            failed: self.failed.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
        }
    }

    /// Counts one failed connection or dropped datagram, and why.
    pub fn fail(&self, why: Failure) {
        self.failed.fetch_add(1, Relaxed);
        self.failures[why.index()].fetch_add(1, Relaxed);
    }

    /// Failures so far for one reason.
    pub fn failures_of(&self, why: Failure) -> u64 {
        self.failures[why.index()].load(Relaxed)
    }

    /// Counts a backend failure for the rate-limited warning: Some(failures since the last
    /// warning, this one included) when a warning is due now, else None (log it at debug).
    pub fn warning_due(&self) -> Option<u64> {
        self.backend_down.due()
    }

    /// As [`Stats::warning_due`], for backends that closed on the PROXY protocol header: a
    /// limit of its own, so failing connects never hide it (nor it them).
    pub fn header_warning_due(&self) -> Option<u64> {
        self.header_refused.due()
    }

    /// Counts a client the allow-list refused: Some(refusals since the last line) when a
    /// line is due now (one per period per mapping, however many are refused).
    pub fn deny(&self) -> Option<u64> {
        Stats::add(&self.denied, 1);
        self.denied_lines.due()
    }

    /// Adds to a counter (relaxed: counters are statistics, not synchronisation).
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Subtracts from a gauge.
    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_inclusive_and_cumulative() {
        let h = Histogram::default();
        h.record(Duration::from_micros(500)); // exactly the first bound: counted in it
        h.record(Duration::from_micros(600));
        h.record(Duration::from_secs(7200)); // past every bound: +Inf only
        let (cumulative, count, sum) = h.snapshot();
        assert_eq!(cumulative.len(), BUCKETS.len());
        assert_eq!(&cumulative[..3], &[1, 2, 2]);
        assert_eq!(cumulative[BUCKETS.len() - 1], 2);
        assert_eq!(count, 3);
        assert!((sum - 7200.0011).abs() < 1e-9, "{sum}");
    }

    /// The sum is a Prometheus counter: it never goes down, however long the connections
    /// (10^10 s each here, which nanoseconds in 64 bits cannot hold twice).
    #[test]
    fn the_sum_never_goes_down() {
        let h = Histogram::default();
        let mut last = 0.0;
        for d in [
            Duration::from_secs(10_000_000_000),
            Duration::from_secs(10_000_000_000),
            Duration::from_millis(1),
            Duration::MAX,
            Duration::from_millis(1),
        ] {
            h.record(d);
            let sum = h.snapshot().2;
            assert!(
                sum >= last,
                "the sum went from {last} to {sum} s after {d:?}"
            );
            last = sum;
        }
        let h = Histogram::default();
        h.record(Duration::from_secs(10_000_000_000));
        h.record(Duration::from_secs(10_000_000_000));
        assert!((h.snapshot().2 - 2e10).abs() < 1.0, "{}", h.snapshot().2);
    }

    #[test]
    fn timings_record_nothing_unless_enabled() {
        let off = Timings::default();
        off.connected(Duration::from_millis(1));
        assert_eq!(off.connect.snapshot().1, 0);
        let on = Timings::enabled();
        on.connected(Duration::from_millis(1));
        on.closed(Duration::from_millis(1));
        assert_eq!((on.connect.snapshot().1, on.lifetime.snapshot().1), (1, 1));
    }
}
