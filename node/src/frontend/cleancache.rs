//! cleancache: ephemeral pools. Key = (pool, object, index).
//!
//! A put may be silently dropped and a get may miss. A get from a private
//! pool hands the page over (it is removed); from a shared pool it stays.
//! Ephemeral pages are the first the store evicts.

use hashbrown::HashMap;
use parking_lot::RwLock;
use std::sync::atomic::{AtomicU32, Ordering};

use super::counters::{Counters, Event};
use super::frontswap::AREA_ID_MAX;
use super::{Frontend, LoadResult, OpError, StoreResult, as_page};
use crate::store::{LoadOutcome, Page, PageKey, Retention, StoreOutcome};

pub type PoolId = u32;

/// Pools live in the upper half of the store's key spaces.
const POOL_SPACE_BIT: u32 = AREA_ID_MAX + 1;

pub(super) struct Pool {
    shared: bool,
    counters: Counters,
}

#[derive(Default)]
pub(super) struct Pools {
    /// Read-held by page ops, write-held to create or destroy a pool, so a
    /// put never lands in a pool being destroyed.
    map: RwLock<HashMap<PoolId, Pool>>,
    next_id: AtomicU32,
}

fn space(pool: PoolId) -> u32 {
    POOL_SPACE_BIT | pool
}

fn key(pool: PoolId, object: u64, index: u64) -> PageKey {
    PageKey {
        space: space(pool),
        object,
        index,
    }
}

impl Frontend {
    fn with_pool<R>(&self, pool: PoolId, f: impl FnOnce(&Pool) -> R) -> Result<R, OpError> {
        let map = self.pools.map.read();
        let p = map.get(&pool).ok_or(OpError::UnknownPool(pool))?;
        Ok(f(p))
    }

    fn record_pool(&self, p: &Pool, event: Event) {
        p.counters.record(event);
        self.counters.record(event);
    }

    /// Creates a pool and returns its id.
    pub fn new_pool(&self, shared: bool) -> PoolId {
        let mut map = self.pools.map.write();
        let id = self.pools.next_id.fetch_add(1, Ordering::Relaxed) & AREA_ID_MAX;
        map.insert(
            id,
            Pool {
                shared,
                counters: Counters::default(),
            },
        );
        id
    }

    /// Puts a page; `Rejected` means it was dropped (allowed). Either way no
    /// older copy survives.
    pub fn put_page(
        &self,
        pool: PoolId,
        object: u64,
        index: u64,
        page: &[u8],
    ) -> Result<StoreResult, OpError> {
        let page = match as_page(page) {
            Ok(page) => page,
            Err(e) => {
                // A put that fails drops the page it was meant to replace,
                // as a refused one does: a later get must miss, never
                // return the older version of the file's page.
                let _ = self.with_pool(pool, |_| self.store.invalidate(key(pool, object, index)));
                return Err(e);
            }
        };
        self.with_pool(pool, |p| {
            let result =
                match self
                    .store
                    .store(key(pool, object, index), page, Retention::Ephemeral)
                {
                    StoreOutcome::Accepted => StoreResult::Accepted,
                    StoreOutcome::Rejected(r) => StoreResult::Rejected(r.into()),
                };
            self.record_pool(
                p,
                match result {
                    StoreResult::Accepted => Event::Stored,
                    StoreResult::Rejected(r) => Event::Failed(r),
                },
            );
            result
        })
    }

    /// Gets a page: from a private pool it is handed over and removed.
    pub fn get_page(
        &self,
        pool: PoolId,
        object: u64,
        index: u64,
        out: &mut Page,
    ) -> Result<LoadResult, OpError> {
        self.with_pool(pool, |p| {
            let k = key(pool, object, index);
            let outcome = if p.shared {
                self.store.load(k, out)
            } else {
                self.store.take(k, out)
            };
            let (result, event) = match outcome {
                LoadOutcome::Hit => (LoadResult::Hit, Event::LoadHit),
                LoadOutcome::Miss => (LoadResult::NotFound, Event::LoadMiss),
                LoadOutcome::Corrupt => (LoadResult::Corrupt, Event::LoadError),
                // Ephemeral pages are never sent to donors.
                LoadOutcome::Remote(_) => (LoadResult::Unavailable, Event::LoadError),
            };
            self.record_pool(p, event);
            result
        })
    }

    pub fn invalidate_pool_page(
        &self,
        pool: PoolId,
        object: u64,
        index: u64,
    ) -> Result<bool, OpError> {
        self.with_pool(pool, |p| {
            let dropped = self.store.invalidate(key(pool, object, index));
            self.record_pool(p, Event::Invalidated(dropped as u64));
            dropped
        })
    }

    /// Drops every page of one object (a file's pages, in the kernel).
    pub fn invalidate_object(&self, pool: PoolId, object: u64) -> Result<u64, OpError> {
        self.with_pool(pool, |p| {
            let dropped = self.store.invalidate_matching(space(pool), Some(object));
            self.record_pool(p, Event::Invalidated(dropped));
            dropped
        })
    }

    /// Drops every page of the pool and the pool itself.
    pub fn invalidate_pool(&self, pool: PoolId) -> Result<u64, OpError> {
        let mut map = self.pools.map.write();
        let p = map.remove(&pool).ok_or(OpError::UnknownPool(pool))?;
        let dropped = self.store.invalidate_matching(space(pool), None);
        self.record_pool(&p, Event::Invalidated(dropped));
        Ok(dropped)
    }

    /// Pages the node holds for `pool`.
    pub fn pool_pages(&self, pool: PoolId) -> Result<u64, OpError> {
        self.with_pool(pool, |_| self.store.space_pages(space(pool)))
    }
}
