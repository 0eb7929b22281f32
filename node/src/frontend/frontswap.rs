//! frontswap: persistent areas. Key = (area, offset).
//!
//! - `init_area` (re)creates an area empty; stores are accepted again.
//! - `store` may be refused for any reason; an accepted page loads back
//!   byte-identical until invalidated. A refused duplicate store drops the
//!   old copy, and so does one that fails (a page of the wrong size): a
//!   load never returns stale data.
//! - `invalidate_area` drops everything and refuses stores until the next
//!   `init_area`.
//! - `shrink` hands pages back until at most a target remains.
//! - A writethrough area is a cache: the client keeps its own copy, so the
//!   node may drop its pages under pressure and answer a miss.

use hashbrown::HashMap;
use parking_lot::RwLock;

use super::counters::{Counters, Event};
use super::{Frontend, LoadResult, OpError, Reject, StoreResult, as_page};
use crate::store::{
    LoadOutcome, Page, PageKey, PageStore, REPLICAS_MAX, RejectReason, Retention, StoreOutcome,
};

pub type AreaId = u32;

/// Area ids use the lower half of the store's key spaces; pools the upper.
pub const AREA_ID_MAX: AreaId = (1 << 31) - 1;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Mode {
    Active {
        writethrough: bool,
    },
    /// After `invalidate_area`: every store is refused until `init_area`.
    Invalidated,
}

pub(super) struct Area {
    /// Held shared by every page op and exclusively by init/invalidate, so an
    /// invalidation never races a store into leaving a page behind.
    mode: RwLock<Mode>,
    counters: Counters,
}

#[derive(Default)]
pub(super) struct Areas {
    map: RwLock<HashMap<AreaId, Area>>,
}

fn key(area: AreaId, offset: u64) -> PageKey {
    PageKey {
        space: area,
        object: 0,
        index: offset,
    }
}

/// A page handed back by `shrink`.
#[derive(Debug, Clone)]
pub struct ReturnedPage {
    pub offset: u64,
    /// Copied once out of the store, then handed on without another copy.
    pub page: bytes::Bytes,
}

/// What `shrink` did.
#[derive(Debug, Default)]
pub struct Shrunk {
    pub returned: Vec<ReturnedPage>,
    /// Pages whose copy failed its checksum and could not be handed back.
    pub corrupt: u64,
    /// Pages left in the area.
    pub curr_pages: u64,
}

/// Per-area figures for stats.
#[derive(Debug, Clone)]
pub struct AreaSummary {
    pub area: AreaId,
    pub writethrough: bool,
    pub invalidated: bool,
    pub curr_pages: u64,
    pub counters: ramster_protocol::v1::Counters,
    /// Donor copies the area asked for, if not the node's default.
    pub replicas: Option<usize>,
}

impl Frontend {
    fn with_area<R>(&self, area: AreaId, f: impl FnOnce(&Area) -> R) -> Result<R, OpError> {
        if area > AREA_ID_MAX {
            return Err(OpError::AreaOutOfRange(area));
        }
        let map = self.areas.map.read();
        let a = map.get(&area).ok_or(OpError::UnknownArea(area))?;
        Ok(f(a))
    }

    fn record(&self, a: &Area, event: Event) {
        a.counters.record(event);
        self.counters.record(event);
    }

    /// (Re)creates `area` empty. Later stores are accepted again.
    pub fn init_area(&self, area: AreaId, writethrough: bool) -> Result<(), OpError> {
        self.init_area_replicas(area, writethrough, 0)
    }

    /// [`init_area`](Self::init_area), with the donor copies each of its
    /// pages gets once it leaves the node: 1..=3, or 0 for the node's
    /// default (`--replicas`, or one for a writethrough area).
    pub fn init_area_replicas(
        &self,
        area: AreaId,
        writethrough: bool,
        replicas: u32,
    ) -> Result<(), OpError> {
        if area > AREA_ID_MAX {
            return Err(OpError::AreaOutOfRange(area));
        }
        if replicas as usize > REPLICAS_MAX {
            return Err(OpError::Replicas(replicas));
        }
        let replicas = (replicas > 0).then_some(replicas as usize);
        let fresh = Mode::Active { writethrough };
        {
            let map = self.areas.map.read();
            if let Some(a) = map.get(&area) {
                let mut mode = a.mode.write();
                self.store.invalidate_matching(area, None);
                self.store.set_space_replicas(area, replicas);
                *mode = fresh;
                return Ok(());
            }
        }
        let mut map = self.areas.map.write();
        let a = map.entry(area).or_insert_with(|| Area {
            mode: RwLock::new(fresh),
            counters: Counters::default(),
        });
        // Another init may have created it meanwhile: re-create it empty.
        let mut mode = a.mode.write();
        self.store.invalidate_matching(area, None);
        self.store.set_space_replicas(area, replicas);
        *mode = fresh;
        Ok(())
    }

    pub fn store_page(
        &self,
        area: AreaId,
        offset: u64,
        page: &[u8],
    ) -> Result<StoreResult, OpError> {
        self.store_page_waiting(area, offset, page, true)
            .map(|r| r.expect("a store that may wait for room always settles"))
    }

    /// [`store_page`](Self::store_page) for a thread that must not block:
    /// `None` when the store is full and only waiting for remotify could
    /// make room. Nothing is counted then, and the offset's old page is
    /// already gone, as after any refused store; a `store_page` where
    /// waiting is allowed settles it.
    pub fn store_page_without_waiting(
        &self,
        area: AreaId,
        offset: u64,
        page: &[u8],
    ) -> Result<Option<StoreResult>, OpError> {
        self.store_page_waiting(area, offset, page, false)
    }

    fn store_page_waiting(
        &self,
        area: AreaId,
        offset: u64,
        page: &[u8],
        may_wait: bool,
    ) -> Result<Option<StoreResult>, OpError> {
        let page = match as_page(page) {
            Ok(page) => page,
            Err(e) => {
                // A store that fails drops the offset's old page, as a
                // refused one does: a later load must miss, never return
                // the bytes this store was meant to replace.
                let _ = self.with_area(area, |a| {
                    let _mode = a.mode.read();
                    self.store.invalidate(key(area, offset));
                });
                return Err(e);
            }
        };
        self.with_area(area, |a| {
            let mode = a.mode.read();
            let result = match *mode {
                Mode::Invalidated => StoreResult::Rejected(Reject::AreaInvalidated),
                Mode::Active { writethrough } => {
                    let retention = if writethrough {
                        Retention::Writethrough
                    } else {
                        Retention::Persistent
                    };
                    let k = key(area, offset);
                    let mut outcome = self.store.store(k, page, retention);
                    // Full, with a cluster behind us: wait (bounded) for
                    // remotify to make room rather than refuse at once, as
                    // the kernel throttles a writer in direct reclaim.
                    if outcome == StoreOutcome::Rejected(RejectReason::NoCapacity)
                        && retention == Retention::Persistent
                        && let Some(remote) = self.remote()
                    {
                        if !may_wait {
                            return None;
                        }
                        if remote.make_room() {
                            outcome = self.store.store(k, page, retention);
                        }
                    }
                    match outcome {
                        StoreOutcome::Accepted => StoreResult::Accepted,
                        StoreOutcome::Rejected(r) => StoreResult::Rejected(r.into()),
                    }
                }
            };
            drop(mode);
            self.record(
                a,
                match result {
                    StoreResult::Accepted => Event::Stored,
                    StoreResult::Rejected(r) => Event::Failed(r),
                },
            );
            Some(result)
        })
    }

    pub fn load_page(
        &self,
        area: AreaId,
        offset: u64,
        out: &mut Page,
    ) -> Result<LoadResult, OpError> {
        let mut results = self.load_pages(area, &[offset], &mut [out])?;
        Ok(results.pop().expect("one result per offset"))
    }

    /// Loads several pages of one area. Pages held by donors are fetched
    /// together (one round trip per donor, not one per page), which is what
    /// makes a batch of cold pages cheap.
    pub fn load_pages(
        &self,
        area: AreaId,
        offsets: &[u64],
        outs: &mut [&mut Page],
    ) -> Result<Vec<LoadResult>, OpError> {
        let (mut results, remote) = self.load_local(area, offsets, outs)?;
        if let (false, Some(cluster)) = (remote.refs.is_empty(), self.remote()) {
            let mut targets = remote.targets(outs);
            let fetched = cluster.wait(cluster.fetch_many(&remote.refs, &mut targets));
            remote.apply(&self.store, &mut results, fetched);
        }
        self.record_loads(area, &results, &remote.at);
        Ok(results)
    }

    /// [`load_pages`](Self::load_pages) for async callers: the wait for
    /// donors is an await, not a blocked thread.
    pub async fn load_pages_async(
        &self,
        area: AreaId,
        offsets: &[u64],
        outs: &mut [&mut Page],
    ) -> Result<Vec<LoadResult>, OpError> {
        let (mut results, remote) = self.load_local(area, offsets, outs)?;
        if let (false, Some(cluster)) = (remote.refs.is_empty(), self.remote().cloned()) {
            let mut targets = remote.targets(outs);
            let fetched = cluster.fetch_many(&remote.refs, &mut targets).await;
            remote.apply(&self.store, &mut results, fetched);
        }
        self.record_loads(area, &results, &remote.at);
        Ok(results)
    }

    /// The first half of a load: pages held here go into `outs`; pages held
    /// by donors are listed (their results stay `Unavailable` unless a
    /// fetch replaces them).
    fn load_local(
        &self,
        area: AreaId,
        offsets: &[u64],
        outs: &mut [&mut Page],
    ) -> Result<(Vec<LoadResult>, RemoteLoads), OpError> {
        assert_eq!(offsets.len(), outs.len(), "one buffer per offset");
        self.with_area(area, |a| {
            let _mode = a.mode.read();
            let mut results = Vec::with_capacity(offsets.len());
            let mut remote = RemoteLoads::default();
            for (i, (&offset, out)) in offsets.iter().zip(outs.iter_mut()).enumerate() {
                results.push(match self.store.load(key(area, offset), out) {
                    LoadOutcome::Hit => LoadResult::Hit,
                    LoadOutcome::Miss => LoadResult::NotFound,
                    LoadOutcome::Corrupt => LoadResult::Corrupt,
                    LoadOutcome::Remote(r) => {
                        remote.refs.push(r);
                        remote.at.push(i);
                        LoadResult::Unavailable
                    }
                });
            }
            (results, remote)
        })
    }

    fn record_loads(&self, area: AreaId, results: &[LoadResult], remote_at: &[usize]) {
        let events = || {
            let mut remote_at = remote_at.iter().peekable();
            results.iter().enumerate().map(move |(i, r)| {
                let remote = remote_at.next_if_eq(&&i).is_some();
                match r {
                    LoadResult::Hit if remote => Event::RemoteHit,
                    LoadResult::Hit => Event::LoadHit,
                    LoadResult::NotFound => Event::LoadMiss,
                    LoadResult::Unavailable | LoadResult::Corrupt => Event::LoadError,
                }
            })
        };
        // The area may have been removed while donors answered: then only
        // the node's counters have somewhere to go.
        let recorded = self.with_area(area, |a| events().for_each(|e| self.record(a, e)));
        if recorded.is_err() {
            events().for_each(|e| self.counters.record(e));
        }
    }

    /// Drops one page; `true` if it was there.
    pub fn invalidate_page(&self, area: AreaId, offset: u64) -> Result<bool, OpError> {
        self.with_area(area, |a| {
            let _mode = a.mode.read();
            let dropped = self.store.invalidate(key(area, offset));
            self.record(a, Event::Invalidated(dropped as u64));
            dropped
        })
    }

    /// Drops every page of `area` and refuses stores until the next init.
    /// Returns the pages dropped.
    pub fn invalidate_area(&self, area: AreaId) -> Result<u64, OpError> {
        self.with_area(area, |a| {
            let mut mode = a.mode.write();
            *mode = Mode::Invalidated;
            let dropped = self.store.invalidate_matching(area, None);
            self.record(a, Event::Invalidated(dropped));
            dropped
        })
    }

    /// frontswap_shrink: hands back (and forgets) pages until at most
    /// `target_pages` remain, at most `max_pages` in this call.
    pub fn shrink(
        &self,
        area: AreaId,
        target_pages: u64,
        max_pages: usize,
    ) -> Result<Shrunk, OpError> {
        self.with_area(area, |a| {
            let _mode = a.mode.read();
            let curr = self.store.space_pages(area);
            let want = (curr.saturating_sub(target_pages)).min(max_pages as u64) as usize;
            let mut shrunk = Shrunk::default();
            let drain = |shrunk: &mut Shrunk, max: usize| {
                self.store.drain_space(area, max, |k, page| match page {
                    Ok(p) => shrunk.returned.push(ReturnedPage {
                        offset: k.index,
                        page: bytes::Bytes::copy_from_slice(p),
                    }),
                    Err(()) => shrunk.corrupt += 1,
                })
            };
            let mut handed = drain(&mut shrunk, want);
            // Pages on donors come home through suction's path first, then
            // are handed back like the rest.
            if let Some(remote) = self.remote() {
                while handed < want && remote.bring_home(area, want - handed) > 0 {
                    let more = drain(&mut shrunk, want - handed);
                    if more == 0 {
                        break;
                    }
                    handed += more;
                }
            }
            for _ in 0..shrunk.corrupt {
                self.record(a, Event::LoadError);
            }
            shrunk.curr_pages = self.store.space_pages(area);
            shrunk
        })
    }

    /// Pages the node holds for `area`.
    pub fn curr_pages(&self, area: AreaId) -> Result<u64, OpError> {
        self.with_area(area, |_| self.store.space_pages(area))
    }

    /// Areas the node has, live or invalidated: one entry each in stats.
    pub fn area_count(&self) -> usize {
        self.areas.map.read().len()
    }

    pub fn area_summaries(&self) -> Vec<AreaSummary> {
        let map = self.areas.map.read();
        let mut v: Vec<AreaSummary> = map
            .iter()
            .map(|(&area, a)| {
                let mode = *a.mode.read();
                AreaSummary {
                    area,
                    writethrough: matches!(mode, Mode::Active { writethrough: true }),
                    invalidated: mode == Mode::Invalidated,
                    curr_pages: self.store.space_pages(area),
                    replicas: self.store.space_replicas(area),
                    counters: a.counters.to_wire(),
                }
            })
            .collect();
        v.sort_by_key(|s| s.area);
        v
    }
}

/// The pages of a load that donors hold: their descriptors, and where they
/// sit in the load.
#[derive(Default)]
struct RemoteLoads {
    refs: Vec<crate::store::RemoteRef>,
    at: Vec<usize>,
}

impl RemoteLoads {
    /// The buffers of the remote pages, in `refs` order.
    fn targets<'a>(&self, outs: &'a mut [&mut Page]) -> Vec<&'a mut Page> {
        let mut wanted = self.at.iter().copied().peekable();
        outs.iter_mut()
            .enumerate()
            .filter_map(|(i, out)| wanted.next_if_eq(&i).map(|_| &mut **out))
            .collect()
    }

    /// Puts the fetched results in place. A writethrough page no good copy
    /// of which could be reached is dropped and answers a miss: the client
    /// has its own copy, which serves (it may store the page again).
    fn apply(&self, store: &PageStore, results: &mut [LoadResult], fetched: Vec<LoadResult>) {
        for ((&i, remote), r) in self.at.iter().zip(&self.refs).zip(fetched) {
            results[i] = match r {
                LoadResult::Unavailable | LoadResult::Corrupt if remote.retention.droppable() => {
                    store.drop_unreachable(remote);
                    LoadResult::NotFound
                }
                r => r,
            };
        }
    }
}
