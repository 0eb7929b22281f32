//! Node-wide figures that are not the frontswap counters: latency histograms
//! and the cluster's movement counters. Updated lock-free on the page path;
//! read by the admin endpoint (`/metrics`) and by `ramster status`.
//!
//! The latency histograms go through the `metrics` facade
//! ([`crate::admin::exposition::Latencies`]). [`Histogram`] stays for what
//! the node itself reads back: the hedge delay of a remote load is twice
//! the recent p99 of peer RPCs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::admin::exposition::{Latencies, Latency};
use crate::admin::node_metrics;

/// Upper bounds of the latency buckets, in nanoseconds: 5 µs (a local load)
/// to 5 s (an RPC at its deadline).
pub const LATENCY_BUCKETS_NS: [u64; 19] = [
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
];

/// A latency histogram with fixed buckets (Prometheus `le` semantics: a
/// sample counts in the first bucket whose bound it does not exceed; the
/// last, implicit bucket is +Inf).
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

/// A histogram's figures at one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Samples per bucket (not cumulative); the last is +Inf.
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum_ns: u64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BUCKETS_NS.partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        HistogramSnapshot {
            count: buckets.iter().sum(),
            buckets,
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

impl HistogramSnapshot {
    /// The upper bound of the bucket holding quantile `q` (0..=1); `None`
    /// with no samples, `u64::MAX` if it falls in +Inf.
    pub fn quantile_bound_ns(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(LATENCY_BUCKETS_NS.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        Some(u64::MAX)
    }
}

/// Counters of the cluster's work, as `ramster_*_total` metrics.
#[derive(Debug, Default)]
pub struct ClusterCounters {
    /// Pages (and their compressed bytes) shipped to donors, every replica acked.
    pub remotified_pages: AtomicU64,
    pub remotified_bytes: AtomicU64,
    /// Remotify batches that failed (no donor, refused, timeout); the pages stayed home.
    pub remotify_failures: AtomicU64,
    /// Pages brought home by suction (background or shrink).
    pub suctioned_pages: AtomicU64,
    pub suctioned_bytes: AtomicU64,
    /// Loads answered from a donor.
    pub remote_loads: AtomicU64,
    /// Remote loads that got no good copy (unreachable, bad checksum).
    pub remote_load_errors: AtomicU64,
    /// Pages a remote load looked up again because their copies had moved
    /// (home, or to other donors) while it was reading them.
    pub remote_load_relooks: AtomicU64,
    /// Donor copies released (overwritten, invalidated or brought home).
    pub released_pages: AtomicU64,
    /// Copies donors listed to this owner's audits.
    pub audited_copies: AtomicU64,
    /// Listed copies the index did not name (garbage, or a release on its
    /// way): released by the audit.
    pub audit_released_pages: AtomicU64,
    /// Peer RPCs that failed (deadline, connection, refusal).
    pub rpc_errors: AtomicU64,
    /// Stores that waited for remotify to make room.
    pub store_throttles: AtomicU64,
    /// Lost copies re-created on other donors.
    pub repaired_pages: AtomicU64,
    /// Copies struck off because their donor came back empty (a new run).
    pub struck_pages: AtomicU64,
    /// Pages moved off (or brought home from) donors that asked for memory back.
    pub reclaimed_pages: AtomicU64,
    /// Pages left with no copy anywhere when their donors came back empty.
    pub lost_pages: AtomicU64,
    /// Pages with a copy on a lost donor (gauge).
    pub degraded_pages: AtomicU64,
    /// Pages with no copy left (gauge).
    pub unrecoverable_pages: AtomicU64,
    /// How long the last repair took from the loss to full redundancy (gauge).
    pub last_repair_micros: AtomicU64,
}

impl ClusterCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Everything of a node that `/metrics` shows beyond the frontswap counters,
/// the store and the donor.
#[derive(Debug)]
pub struct NodeMetrics {
    /// One frontswap store / cleancache put, as the front end sees it.
    pub store_latency: Latency,
    /// One load / get answered from this node's memory.
    pub load_latency: Latency,
    /// One load answered from a donor (fetch, checksum, decompress).
    pub remote_load_latency: Latency,
    /// One peer RPC, request sent to answer read.
    rpc_latency: Latency,
    /// The same RPCs in fixed buckets, for the hedge delay.
    rpc_buckets: Histogram,
    pub cluster: ClusterCounters,
    latencies: Latencies,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        let latencies = Latencies::new();
        NodeMetrics {
            store_latency: latencies.register(&node_metrics::STORE_LATENCY),
            load_latency: latencies.register(&node_metrics::LOAD_LATENCY),
            remote_load_latency: latencies.register(&node_metrics::REMOTE_LOAD_LATENCY),
            rpc_latency: latencies.register(&node_metrics::RPC_LATENCY),
            rpc_buckets: Histogram::default(),
            cluster: ClusterCounters::default(),
            latencies,
        }
    }
}

impl NodeMetrics {
    /// One peer RPC took `d`.
    pub fn observe_rpc(&self, d: Duration) {
        self.rpc_latency.observe(d);
        self.rpc_buckets.observe(d);
    }

    /// The peer RPCs' latencies so far, as the hedge delay reads them.
    pub fn rpc_latency(&self) -> HistogramSnapshot {
        self.rpc_buckets.snapshot()
    }

    /// The latency histograms' Prometheus text.
    pub fn render_latencies(&self) -> String {
        self.latencies.render()
    }

    /// Folds recorded latencies into their buckets; the node calls it every
    /// few seconds so that samples never pile up between scrapes.
    pub fn upkeep(&self) {
        self.latencies.upkeep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_land_in_the_first_bucket_that_holds_them() {
        let h = Histogram::default();
        h.observe(Duration::from_nanos(5_000)); // exactly on a bound: that bucket
        h.observe(Duration::from_nanos(5_001));
        h.observe(Duration::from_secs(60)); // +Inf
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], 1);
        assert_eq!(s.buckets[1], 1);
        assert_eq!(*s.buckets.last().unwrap(), 1);
        assert_eq!(s.sum_ns, 5_000 + 5_001 + 60_000_000_000);
        assert_eq!(s.quantile_bound_ns(0.3), Some(5_000));
        assert_eq!(s.quantile_bound_ns(0.5), Some(10_000));
        assert_eq!(s.quantile_bound_ns(1.0), Some(u64::MAX));
        assert_eq!(Histogram::default().snapshot().quantile_bound_ns(0.5), None);
    }
}
