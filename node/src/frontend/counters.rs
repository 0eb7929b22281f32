//! Counters named as the kernel's frontswap/zswap debugfs ones, kept per area
//! (or pool) and per node.

use std::sync::atomic::{AtomicU64, Ordering};

use ramster_protocol::v1;

use super::Reject;

/// Outcome counters of one area, pool, or the whole node.
#[derive(Debug, Default)]
pub struct Counters {
    pub succ_stores: AtomicU64,
    pub failed_stores_no_capacity: AtomicU64,
    pub failed_stores_incompressible: AtomicU64,
    pub failed_stores_quota: AtomicU64,
    pub failed_stores_area_invalidated: AtomicU64,
    pub failed_stores_unavailable: AtomicU64,
    pub loads_hit: AtomicU64,
    pub loads_miss: AtomicU64,
    pub loads_error: AtomicU64,
    pub invalidates: AtomicU64,
    /// Hits whose bytes came from a donor (a subset of `loads_hit`).
    pub loads_remote: AtomicU64,
}

/// Which counter an event bumps.
#[derive(Copy, Clone, Debug)]
pub enum Event {
    Stored,
    Failed(Reject),
    LoadHit,
    /// A hit served from a donor's copy.
    RemoteHit,
    LoadMiss,
    LoadError,
    Invalidated(u64),
}

impl Counters {
    pub fn record(&self, event: Event) {
        let (counter, n) = match event {
            Event::Stored => (&self.succ_stores, 1),
            Event::Failed(r) => (
                match r {
                    Reject::NoCapacity => &self.failed_stores_no_capacity,
                    Reject::Incompressible => &self.failed_stores_incompressible,
                    Reject::Quota => &self.failed_stores_quota,
                    Reject::AreaInvalidated => &self.failed_stores_area_invalidated,
                    Reject::Unavailable => &self.failed_stores_unavailable,
                },
                1,
            ),
            Event::LoadHit => (&self.loads_hit, 1),
            Event::RemoteHit => {
                self.loads_remote.fetch_add(1, Ordering::Relaxed);
                (&self.loads_hit, 1)
            }
            Event::LoadMiss => (&self.loads_miss, 1),
            Event::LoadError => (&self.loads_error, 1),
            Event::Invalidated(n) => (&self.invalidates, n),
        };
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn failed_stores(&self) -> u64 {
        self.failed_stores_no_capacity.load(Ordering::Relaxed)
            + self.failed_stores_incompressible.load(Ordering::Relaxed)
            + self.failed_stores_quota.load(Ordering::Relaxed)
            + self.failed_stores_area_invalidated.load(Ordering::Relaxed)
            + self.failed_stores_unavailable.load(Ordering::Relaxed)
    }

    pub fn to_wire(&self) -> v1::Counters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        v1::Counters {
            succ_stores: g(&self.succ_stores),
            failed_stores_no_capacity: g(&self.failed_stores_no_capacity),
            failed_stores_incompressible: g(&self.failed_stores_incompressible),
            failed_stores_quota: g(&self.failed_stores_quota),
            failed_stores_area_invalidated: g(&self.failed_stores_area_invalidated),
            failed_stores_unavailable: g(&self.failed_stores_unavailable),
            loads_hit: g(&self.loads_hit),
            loads_miss: g(&self.loads_miss),
            loads_error: g(&self.loads_error),
            invalidates: g(&self.invalidates),
            loads_remote: g(&self.loads_remote),
        }
    }
}
