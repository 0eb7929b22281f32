//! The frontswap and cleancache contracts, checked against plain models:
//! random op sequences under capacity pressure; a load returns exactly the
//! last accepted page, or a miss after a refusal or invalidation — never
//! stale bytes.

use std::collections::HashMap;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::store::{PageStore, StoreConfig};

/// Page contents by kind, so the mix has zero, same-filled, compressible and
/// incompressible pages, and every version of a key differs.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Zero,
    SameFilled,
    Compressible,
    Incompressible,
}

fn make_page(kind: Kind, seed: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_BYTES];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    match kind {
        Kind::Zero => {}
        Kind::SameFilled => {
            let w = next() | 1;
            p.chunks_exact_mut(8)
                .for_each(|c| c.copy_from_slice(&w.to_le_bytes()));
        }
        Kind::Compressible => {
            let base = next();
            for (i, c) in p.chunks_exact_mut(8).enumerate() {
                let v = if i % 3 == 0 {
                    base ^ (next() % 64)
                } else {
                    i as u64 % 11
                };
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        Kind::Incompressible => p
            .chunks_exact_mut(8)
            .for_each(|c| c.copy_from_slice(&next().to_le_bytes())),
    }
    p
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        1 => Just(Kind::Zero),
        1 => Just(Kind::SameFilled),
        5 => Just(Kind::Compressible),
        2 => Just(Kind::Incompressible),
    ]
}

#[derive(Clone, Debug)]
enum FsOp {
    Init(u32),
    Store(u32, u64, Kind, u64),
    Load(u32, u64),
    InvalidatePage(u32, u64),
    InvalidateArea(u32),
    Shrink(u32, u64, usize),
}

/// Areas 0..=1 are persistent, 2 is writethrough, 3 is never initialised.
const WRITETHROUGH_AREA: u32 = 2;
const UNKNOWN_AREA: u32 = 3;

fn fs_op() -> impl Strategy<Value = FsOp> {
    let area = 0u32..4;
    let offset = 0u64..48;
    prop_oneof![
        1 => area.clone().prop_map(FsOp::Init),
        12 => (area.clone(), offset.clone(), kind(), any::<u64>()).prop_map(|(a, o, k, s)| FsOp::Store(a, o, k, s)),
        8 => (area.clone(), offset.clone()).prop_map(|(a, o)| FsOp::Load(a, o)),
        2 => (area.clone(), offset).prop_map(|(a, o)| FsOp::InvalidatePage(a, o)),
        1 => area.clone().prop_map(FsOp::InvalidateArea),
        1 => (area, 0u64..40, 1usize..20).prop_map(|(a, t, m)| FsOp::Shrink(a, t, m)),
    ]
}

#[derive(PartialEq, Debug, Clone, Copy)]
enum ModelArea {
    Active,
    Invalidated,
}

struct FsModel {
    areas: HashMap<u32, ModelArea>,
    pages: HashMap<(u32, u64), Vec<u8>>,
}

impl FsModel {
    fn drop_area(&mut self, area: u32) {
        self.pages.retain(|(a, _), _| *a != area);
    }
    fn count(&self, area: u32) -> u64 {
        self.pages.keys().filter(|(a, _)| *a == area).count() as u64
    }
}

fn frontend(capacity: u64) -> Frontend {
    Frontend::new(
        "test",
        Arc::new(PageStore::new(StoreConfig {
            capacity_bytes: capacity,
            shards: 8,
        })),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn frontswap_matches_the_model(ops in prop::collection::vec(fs_op(), 1..300), capacity_kib in 96u64..1024) {
        let fe = frontend(capacity_kib << 10);
        let mut m = FsModel { areas: HashMap::new(), pages: HashMap::new() };
        let mut out = Box::new([0u8; PAGE_BYTES]);
        for op in ops {
            match op {
                FsOp::Init(area) => {
                    let wt = area == WRITETHROUGH_AREA;
                    if area == UNKNOWN_AREA { continue; }
                    fe.init_area(area, wt).unwrap();
                    m.drop_area(area);
                    m.areas.insert(area, ModelArea::Active);
                }
                FsOp::Store(area, offset, kind, seed) => {
                    let page = make_page(kind, seed);
                    let r = fe.store_page(area, offset, &page);
                    match m.areas.get(&area) {
                        None => prop_assert_eq!(r, Err(OpError::UnknownArea(area))),
                        Some(ModelArea::Invalidated) => {
                            prop_assert_eq!(r, Ok(StoreResult::Rejected(Reject::AreaInvalidated)));
                        }
                        Some(ModelArea::Active) => match r.unwrap() {
                            StoreResult::Accepted => {
                                prop_assert!(!matches!(kind, Kind::Incompressible), "accepted a random page");
                                m.pages.insert((area, offset), page);
                            }
                            StoreResult::Rejected(reason) => {
                                prop_assert!(matches!(reason, Reject::NoCapacity | Reject::Incompressible));
                                // Refused duplicate: the old copy is gone too.
                                m.pages.remove(&(area, offset));
                            }
                        },
                    }
                }
                FsOp::Load(area, offset) => {
                    let r = fe.load_page(area, offset, &mut out);
                    if !m.areas.contains_key(&area) {
                        prop_assert_eq!(r, Err(OpError::UnknownArea(area)));
                        continue;
                    }
                    match (r.unwrap(), m.pages.get(&(area, offset))) {
                        (LoadResult::Hit, Some(want)) => prop_assert_eq!(&out[..], &want[..]),
                        (LoadResult::Hit, None) => prop_assert!(false, "loaded a page that was never accepted or was invalidated"),
                        (LoadResult::NotFound, None) => {}
                        (LoadResult::NotFound, Some(_)) => {
                            // Only a writethrough area may lose a page.
                            prop_assert_eq!(area, WRITETHROUGH_AREA, "lost an accepted page");
                            m.pages.remove(&(area, offset));
                        }
                        (other, _) => prop_assert!(false, "unexpected {:?}", other),
                    }
                }
                FsOp::InvalidatePage(area, offset) => {
                    let r = fe.invalidate_page(area, offset);
                    if !m.areas.contains_key(&area) {
                        prop_assert!(r.is_err());
                        continue;
                    }
                    let had = m.pages.remove(&(area, offset)).is_some();
                    if area != WRITETHROUGH_AREA {
                        prop_assert_eq!(r.unwrap(), had);
                    }
                }
                FsOp::InvalidateArea(area) => {
                    let r = fe.invalidate_area(area);
                    if !m.areas.contains_key(&area) {
                        prop_assert!(r.is_err());
                        continue;
                    }
                    m.drop_area(area);
                    m.areas.insert(area, ModelArea::Invalidated);
                }
                FsOp::Shrink(area, target, max) => {
                    let r = fe.shrink(area, target, max);
                    if !m.areas.contains_key(&area) {
                        prop_assert!(r.is_err());
                        continue;
                    }
                    let s = r.unwrap();
                    prop_assert_eq!(s.corrupt, 0);
                    for p in &s.returned {
                        let want = m.pages.remove(&(area, p.offset));
                        if area == WRITETHROUGH_AREA && want.is_none() { continue; }
                        prop_assert_eq!(Some(&p.page[..]), want.as_deref(), "shrink handed back a page not in the model");
                    }
                    if area != WRITETHROUGH_AREA {
                        prop_assert_eq!(s.curr_pages, m.count(area));
                        prop_assert!(s.returned.len() == max || s.curr_pages <= target);
                    }
                }
            }
            // curr_pages agrees with the model for persistent areas.
            for area in [0u32, 1] {
                if m.areas.contains_key(&area) {
                    prop_assert_eq!(fe.curr_pages(area).unwrap(), m.count(area));
                }
            }
            let st = fe.store().stats();
            prop_assert!(st.used_bytes <= st.capacity_bytes);
        }
        fe.store().audit();
    }
}

#[derive(Clone, Debug)]
enum CcOp {
    Put(bool, u64, u64, Kind, u64),
    Get(bool, u64, u64),
    InvalidatePage(bool, u64, u64),
    InvalidateObject(bool, u64),
}

fn cc_op() -> impl Strategy<Value = CcOp> {
    let shared = any::<bool>();
    let obj = 0u64..4;
    let idx = 0u64..16;
    prop_oneof![
        10 => (shared, obj.clone(), idx.clone(), kind(), any::<u64>()).prop_map(|(s, o, i, k, x)| CcOp::Put(s, o, i, k, x)),
        8 => (shared, obj.clone(), idx.clone()).prop_map(|(s, o, i)| CcOp::Get(s, o, i)),
        2 => (shared, obj.clone(), idx).prop_map(|(s, o, i)| CcOp::InvalidatePage(s, o, i)),
        1 => (shared, obj).prop_map(|(s, o)| CcOp::InvalidateObject(s, o)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn cleancache_never_returns_stale_pages(ops in prop::collection::vec(cc_op(), 1..300), capacity_kib in 96u64..1024) {
        let fe = frontend(capacity_kib << 10);
        let private = fe.new_pool(false);
        let shared = fe.new_pool(true);
        let pool = |s: bool| if s { shared } else { private };
        let mut m: HashMap<(bool, u64, u64), Vec<u8>> = HashMap::new();
        let mut out = Box::new([0u8; PAGE_BYTES]);
        for op in ops {
            match op {
                CcOp::Put(s, o, i, kind, seed) => {
                    let page = make_page(kind, seed);
                    match fe.put_page(pool(s), o, i, &page).unwrap() {
                        StoreResult::Accepted => { m.insert((s, o, i), page); }
                        StoreResult::Rejected(_) => { m.remove(&(s, o, i)); }
                    }
                }
                CcOp::Get(s, o, i) => match fe.get_page(pool(s), o, i, &mut out).unwrap() {
                    LoadResult::Hit => {
                        let want = if s { m.get(&(s, o, i)).cloned() } else { m.remove(&(s, o, i)) };
                        prop_assert_eq!(Some(&out[..]), want.as_deref(), "stale or phantom page");
                        if !s {
                            // Private gets are exclusive: a second get misses.
                            prop_assert_eq!(fe.get_page(pool(s), o, i, &mut out).unwrap(), LoadResult::NotFound);
                        }
                    }
                    LoadResult::NotFound => { m.remove(&(s, o, i)); }
                    other => prop_assert!(false, "unexpected {:?}", other),
                },
                CcOp::InvalidatePage(s, o, i) => {
                    fe.invalidate_pool_page(pool(s), o, i).unwrap();
                    m.remove(&(s, o, i));
                }
                CcOp::InvalidateObject(s, o) => {
                    fe.invalidate_object(pool(s), o).unwrap();
                    m.retain(|(ms, mo, _), _| !(*ms == s && *mo == o));
                }
            }
        }
        fe.invalidate_pool(shared).unwrap();
        prop_assert_eq!(fe.get_page(shared, 0, 0, &mut out), Err(OpError::UnknownPool(shared)));
        fe.store().audit();
    }
}

#[test]
fn wrong_page_sizes_and_unknown_areas_are_errors_not_refusals() {
    let fe = frontend(1 << 20);
    assert_eq!(
        fe.store_page(0, 0, &[0u8; 4095]),
        Err(OpError::PageSize(4095))
    );
    assert_eq!(
        fe.store_page(9, 0, &[0u8; PAGE_BYTES]),
        Err(OpError::UnknownArea(9))
    );
    assert_eq!(
        fe.init_area(u32::MAX, false),
        Err(OpError::AreaOutOfRange(u32::MAX))
    );
    assert_eq!(
        fe.put_page(77, 0, 0, &[0u8; PAGE_BYTES]),
        Err(OpError::UnknownPool(77))
    );
}

#[test]
fn invalidated_area_refuses_until_init_then_accepts() {
    let fe = frontend(8 << 20);
    fe.init_area(0, false).unwrap();
    let page = make_page(Kind::Compressible, 1);
    assert_eq!(fe.store_page(0, 1, &page), Ok(StoreResult::Accepted));
    assert_eq!(fe.invalidate_area(0), Ok(1));
    assert_eq!(
        fe.store_page(0, 1, &page),
        Ok(StoreResult::Rejected(Reject::AreaInvalidated))
    );
    let mut out = Box::new([0u8; PAGE_BYTES]);
    assert_eq!(fe.load_page(0, 1, &mut out), Ok(LoadResult::NotFound));
    fe.init_area(0, false).unwrap();
    assert_eq!(fe.store_page(0, 1, &page), Ok(StoreResult::Accepted));
    let c = fe.counters();
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(c.succ_stores.load(Relaxed), 2);
    assert_eq!(c.failed_stores_area_invalidated.load(Relaxed), 1);
    assert_eq!(c.loads_miss.load(Relaxed), 1);
}

#[test]
fn a_store_that_fails_drops_the_old_page() {
    let fe = frontend(1 << 20);
    fe.init_area(0, false).unwrap();
    let page = make_page(Kind::Compressible, 7);
    assert_eq!(fe.store_page(0, 5, &page), Ok(StoreResult::Accepted));
    assert_eq!(
        fe.store_page(0, 5, &page[..PAGE_BYTES - 1]),
        Err(OpError::PageSize(PAGE_BYTES - 1))
    );
    let mut out = Box::new([0u8; PAGE_BYTES]);
    assert_eq!(
        fe.load_page(0, 5, &mut out),
        Ok(LoadResult::NotFound),
        "the page a failed store was meant to replace came back"
    );
    assert_eq!(fe.curr_pages(0), Ok(0));
}

#[test]
fn a_put_that_fails_drops_the_old_page() {
    let fe = frontend(1 << 20);
    let pool = fe.new_pool(true);
    let page = make_page(Kind::Compressible, 7);
    assert_eq!(fe.put_page(pool, 3, 5, &page), Ok(StoreResult::Accepted));
    assert_eq!(
        fe.put_page(pool, 3, 5, &page[..PAGE_BYTES - 1]),
        Err(OpError::PageSize(PAGE_BYTES - 1))
    );
    let mut out = Box::new([0u8; PAGE_BYTES]);
    assert_eq!(
        fe.get_page(pool, 3, 5, &mut out),
        Ok(LoadResult::NotFound),
        "the page a failed put was meant to replace came back"
    );
}

/// The API's side of a request: ops in, a response out.
mod answers {
    use std::sync::Mutex;

    use bytes::Bytes;
    use ramster_protocol::io::encode_frame;
    use ramster_protocol::v1::{self, op::Kind as Op};
    use ramster_protocol::{BATCH_OPS_MAX, FRAME_BYTES_MAX};

    use super::super::api::{self, SHRINK_PAGES_MAX, answer_bytes_max};
    use super::*;
    use crate::metrics::NodeMetrics;
    use crate::store::RemoteRef;

    fn op(kind: Op) -> v1::Op {
        v1::Op { kind: Some(kind) }
    }

    fn shrink(area: u32, max_pages: u32) -> v1::Op {
        op(Op::Shrink(v1::Shrink {
            area,
            target_pages: 0,
            max_pages,
        }))
    }

    fn store_op(area: u32, offset: u64) -> v1::Op {
        op(Op::Store(v1::Store {
            area,
            offset,
            page: Bytes::from(make_page(Kind::Compressible, offset)),
        }))
    }

    fn load(area: u32, offset: u64) -> v1::Op {
        op(Op::Load(v1::Load { area, offset }))
    }

    /// The transport's kind of thread, with a node runtime's workers beside
    /// it.
    struct Threads {
        client: tokio::runtime::Runtime,
        workers: tokio::runtime::Runtime,
    }

    impl Threads {
        fn new() -> Threads {
            Threads {
                client: tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap(),
                workers: tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap(),
            }
        }

        /// Executes `ops` on the client thread, as a cluster node's reader
        /// runs a small request.
        fn execute(&self, fe: &Arc<Frontend>, ops: Vec<v1::Op>) -> v1::Response {
            self.client.block_on(api::execute(
                fe.clone(),
                Arc::new(NodeMetrics::default()),
                self.workers.handle().clone(),
                v1::Request { id: 1, ops },
            ))
        }
    }

    /// Donors that note whether each wait on them came from a thread that
    /// may block, and make no room and bring nothing home.
    #[derive(Default)]
    struct Donors {
        waits: Mutex<Vec<(&'static str, bool)>>,
    }

    impl Donors {
        fn note(&self, what: &'static str) {
            self.waits.lock().unwrap().push((what, may_block_here()));
        }
    }

    impl RemotePages for Donors {
        fn fetch_many<'a, 'b: 'a>(
            &'a self,
            remotes: &'a [RemoteRef],
            _outs: &'a mut [&'b mut Page],
        ) -> Fetch<'a> {
            let n = remotes.len();
            Box::pin(async move { vec![LoadResult::Unavailable; n] })
        }

        fn wait(&self, _fetch: Fetch<'_>) -> Vec<LoadResult> {
            self.note("wait");
            Vec::new()
        }

        fn make_room(&self) -> bool {
            self.note("make_room");
            false
        }

        fn bring_home(&self, _space: u32, _max: usize) -> usize {
            self.note("bring_home");
            0
        }
    }

    #[test]
    fn what_waits_on_donors_never_blocks_the_transport_thread() {
        let fe = Arc::new(frontend(256 << 10));
        fe.init_area(1, false).unwrap();
        let mut full_at = None;
        for o in 0..10_000 {
            let page = make_page(Kind::Compressible, o);
            if fe.store_page(1, o, &page) == Ok(StoreResult::Rejected(Reject::NoCapacity)) {
                full_at = Some(o);
                break;
            }
        }
        let full_at = full_at.expect("the store fills");
        let donors = Arc::new(Donors::default());
        fe.set_remote(donors.clone());
        let threads = Threads::new();

        // A one-page store into the full store waits for room, off the
        // client thread, and is then refused.
        let answer = threads.execute(&fe, vec![store_op(1, full_at)]);
        assert_eq!(
            answer.results[0].status(),
            v1::Status::RejectedNoCapacity,
            "{answer:?}"
        );

        // Then some of the pages go to donors.
        let shipped = fe.store().begin_remotify(16);
        assert!(!shipped.is_empty());
        for s in &shipped {
            let on_donor = crate::store::Replicas::new(&[7]).unwrap();
            assert!(fe.store().finish_remotify(s.key, s.version, on_donor));
        }

        // Now the store finds room without waiting for any.
        let answer = threads.execute(&fe, vec![store_op(1, full_at)]);
        assert_eq!(answer.results[0].status(), v1::Status::Ok);

        // A load of a page on a donor waits without blocking anything.
        let answer = threads.execute(&fe, vec![load(1, shipped[0].key.index)]);
        assert_eq!(answer.results[0].status(), v1::Status::Unavailable);

        // A one-op shrink asks the donors for the pages they hold, off the
        // client thread, and hands back those at home.
        let answer = threads.execute(&fe, vec![shrink(1, 1024)]);
        assert_eq!(
            answer.results[0].returned.len() as u64,
            full_at + 1 - shipped.len() as u64
        );

        let waits = donors.waits.lock().unwrap().clone();
        let asked: Vec<&str> = waits.iter().map(|w| w.0).collect();
        assert_eq!(asked, ["make_room", "bring_home"]);
        assert!(
            waits.iter().all(|w| w.1),
            "waited on donors from the client thread: {waits:?}"
        );
    }

    /// An area of `pages` distinct pages; their bytes by offset.
    fn area_of(fe: &Frontend, area: u32, pages: u64) -> HashMap<u64, Vec<u8>> {
        fe.init_area(area, false).unwrap();
        (0..pages)
            .map(|o| {
                let page = make_page(Kind::Compressible, o);
                assert_eq!(fe.store_page(area, o, &page), Ok(StoreResult::Accepted));
                (o, page)
            })
            .collect()
    }

    #[test]
    fn an_answer_that_could_outgrow_a_frame_is_refused_before_anything_runs() {
        let fe = Arc::new(frontend(64 << 20));
        let mut kept = area_of(&fe, 1, 2_100);
        let threads = Threads::new();

        // Two full shrinks: the pages they would take could not all be
        // handed back in one answer.
        let refused = threads.execute(&fe, vec![shrink(1, 1024), shrink(1, 1024)]);
        let e = refused.error.expect("refused whole");
        assert_eq!(e.code(), v1::ErrorCode::FrameTooLarge, "{e:?}");
        assert!(e.message.contains("smaller requests"), "{}", e.message);
        assert!(refused.results.is_empty());
        assert_eq!(fe.curr_pages(1), Ok(2_100), "a refused shrink took pages");

        // A shrink and loads beside it, past the limit together.
        let mut ops = vec![shrink(1, 1024)];
        ops.extend((0..64).map(|o| load(1, o)));
        assert!(threads.execute(&fe, ops).error.is_some());
        assert_eq!(fe.curr_pages(1), Ok(2_100));

        // Stats once the node has many areas, asked for many times.
        for area in 2..300 {
            fe.init_area(area, false).unwrap();
        }
        let stats = (0..BATCH_OPS_MAX)
            .map(|_| op(Op::GetStats(v1::GetStats {})))
            .collect();
        assert!(threads.execute(&fe, stats).error.is_some());

        // One full shrink fits: every page it takes is in its answer.
        let answer = threads.execute(&fe, vec![shrink(1, 1024)]);
        assert!(answer.error.is_none(), "{:?}", answer.error);
        encode_frame(&answer).expect("the answer fits a frame");
        let returned = &answer.results[0].returned;
        assert_eq!(returned.len(), 1024);
        for p in returned {
            let want = kept.remove(&p.offset).expect("a page of the area");
            assert_eq!(&p.page[..], &want[..]);
        }
        assert_eq!(fe.curr_pages(1), Ok(kept.len() as u64));
    }

    #[test]
    fn the_reckoning_covers_the_widest_answers() {
        let fe = frontend(1 << 20);
        for area in 0..40 {
            fe.init_area(area, false).unwrap();
        }
        let detail = "d".repeat(256);
        let page = Bytes::from(vec![0xa5u8; PAGE_BYTES]);
        let widest = |s: v1::Status| v1::OpResult {
            status: s as i32,
            value: u64::MAX,
            detail: detail.clone(),
            ..Default::default()
        };
        let loaded = || v1::OpResult {
            page: page.clone(),
            detail: String::new(),
            ..widest(v1::Status::Ok)
        };
        let returned = v1::OpResult {
            returned: (0..SHRINK_PAGES_MAX)
                .map(|_| v1::ReturnedPage {
                    offset: u64::MAX,
                    page: page.clone(),
                })
                .collect(),
            ..widest(v1::Status::Ok)
        };
        let m = u64::MAX;
        let counters = v1::Counters {
            succ_stores: m,
            failed_stores_no_capacity: m,
            failed_stores_incompressible: m,
            failed_stores_quota: m,
            failed_stores_area_invalidated: m,
            failed_stores_unavailable: m,
            loads_hit: m,
            loads_miss: m,
            loads_error: m,
            invalidates: m,
            loads_remote: m,
        };
        let mut stats = fe.stats();
        stats.counters = Some(counters);
        stats.store = Some(v1::StoreStats {
            capacity_bytes: m,
            used_bytes: m,
            pages: m,
            same_filled_pages: m,
            compressed_pages: m,
            payload_bytes: m,
            slot_bytes: m,
            slab_bytes: m,
            index_bytes: m,
            evicted_pages: m,
            remote_pages: m,
            remote_bytes: m,
        });
        assert_eq!(stats.areas.len(), 40);
        for a in &mut stats.areas {
            *a = v1::AreaStats {
                area: u32::MAX,
                writethrough: true,
                invalidated: true,
                curr_pages: m,
                counters: Some(counters),
                replicas: u32::MAX,
            };
        }
        let stats = v1::OpResult {
            stats: Some(stats),
            ..widest(v1::Status::Ok)
        };
        let cases: Vec<(Vec<v1::Op>, Vec<v1::OpResult>)> = vec![
            (vec![load(0, 0)], vec![loaded()]),
            (vec![load(0, 0)], vec![widest(v1::Status::Corrupt)]),
            (
                vec![op(Op::InvalidatePage(v1::InvalidatePage {
                    area: 0,
                    offset: 0,
                }))],
                vec![widest(v1::Status::UnknownArea)],
            ),
            (vec![shrink(0, u32::MAX)], vec![returned.clone()]),
            (vec![op(Op::GetStats(v1::GetStats {}))], vec![stats]),
            (
                (0..BATCH_OPS_MAX as u64).map(|o| load(0, o)).collect(),
                (0..BATCH_OPS_MAX).map(|_| loaded()).collect(),
            ),
            (
                vec![shrink(0, 1024), load(0, 0), load(0, 1)],
                vec![returned, loaded(), loaded()],
            ),
        ];
        for (ops, results) in cases {
            let reckoned = answer_bytes_max(&fe, &ops);
            let answer = v1::Response {
                id: u64::MAX,
                results,
                error: None,
            };
            let len = prost::Message::encoded_len(&answer);
            assert!(
                len <= reckoned,
                "{} ops answered in {len} bytes, reckoned {reckoned}",
                ops.len()
            );
            assert!(reckoned <= FRAME_BYTES_MAX, "{} ops refused", ops.len());
        }
    }

    #[test]
    fn an_answer_past_the_reckoning_keeps_the_pages_a_shrink_took() {
        let page = Bytes::from(vec![0x5au8; PAGE_BYTES]);
        let shrunk = v1::OpResult {
            returned: (0..1000u64)
                .map(|offset| v1::ReturnedPage {
                    offset,
                    page: page.clone(),
                })
                .collect(),
            ..Default::default()
        };
        // Stats grown past what was reckoned for them, as if areas had been
        // created meanwhile, and a loaded page beside them.
        let stats = v1::OpResult {
            stats: Some(v1::Stats {
                node: "n".repeat(FRAME_BYTES_MAX / 8),
                ..Default::default()
            }),
            ..Default::default()
        };
        let loaded = v1::OpResult {
            page: page.clone(),
            ..Default::default()
        };
        let answer = v1::Response {
            id: 9,
            results: vec![shrunk, stats, loaded],
            error: None,
        };
        assert!(encode_frame(&answer).is_err());
        let mut frame = api::encode_answer(answer);
        let body = frame
            .split_off(ramster_protocol::frame::HEADER_BYTES)
            .freeze();
        let back: v1::Response = ramster_protocol::frame::decode(body).unwrap();
        assert!(back.error.is_none(), "{:?}", back.error);
        assert_eq!(
            back.results[0].returned.len(),
            1000,
            "a shrink's pages were lost"
        );
        for r in &back.results[1..] {
            assert_eq!(r.status(), v1::Status::Unavailable);
            assert!(r.stats.is_none() && r.page.is_empty());
        }
    }
}

/// Requests pipelined on one connection take effect in the order they
/// were sent, whichever of them runs in the reader, on the workers or on a
/// blocking thread.
mod ordering {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Mutex, Weak};
    use std::time::Duration;

    use bytes::Bytes;
    use ramster_protocol::io::{FrameReader, encode_frame};
    use ramster_protocol::v1::{self, op::Kind as Op};
    use ramster_protocol::{FRAME_BYTES_MAX, frame, handshake};
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixStream;
    use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
    use tokio::sync::watch;

    use super::super::api;
    use super::*;
    use crate::metrics::NodeMetrics;
    use crate::store::RemoteRef;

    const AREA: u32 = 1;

    /// The API served on a socket of its own, until this is dropped.
    pub(super) struct Served {
        pub(super) socket: PathBuf,
        _stop: watch::Sender<bool>,
        _dir: tempfile::TempDir,
    }

    /// Serves `fe` from the calling runtime, as a standalone node does.
    fn serve(fe: &Arc<Frontend>) -> Served {
        serve_within(fe, api::ServeLimits::default())
    }

    /// Serves `fe` from the calling runtime, each connection within
    /// `limits`.
    pub(super) fn serve_within(fe: &Arc<Frontend>, limits: api::ServeLimits) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let listener = api::bind(&socket).unwrap();
        let (stop, shutdown) = watch::channel(false);
        tokio::spawn(api::serve(
            listener,
            fe.clone(),
            Arc::new(NodeMetrics::default()),
            limits,
            shutdown,
        ));
        Served {
            socket,
            _stop: stop,
            _dir: dir,
        }
    }

    /// A connection that writes requests together, so that the server
    /// reads them at once.
    struct Conn {
        rd: FrameReader<OwnedReadHalf>,
        wr: OwnedWriteHalf,
        next_id: u64,
    }

    impl Conn {
        async fn open(served: &Served) -> Conn {
            let (rd, mut wr) = UnixStream::connect(&served.socket)
                .await
                .unwrap()
                .into_split();
            let hello = encode_frame(&handshake::hello("ordering")).unwrap();
            wr.write_all(&hello).await.unwrap();
            let mut rd = FrameReader::new(rd, FRAME_BYTES_MAX);
            let body = rd.read_frame().await.unwrap().unwrap();
            frame::decode::<v1::Welcome>(body).unwrap();
            Conn { rd, wr, next_id: 1 }
        }

        /// Sends `batches` in one write; their results, in the order sent.
        async fn pipeline(&mut self, batches: Vec<Vec<v1::Op>>) -> Vec<Vec<v1::OpResult>> {
            let first = self.next_id;
            let mut bytes = Vec::new();
            for ops in batches {
                let id = self.next_id;
                self.next_id += 1;
                bytes.extend_from_slice(&encode_frame(&v1::Request { id, ops }).unwrap());
            }
            self.wr.write_all(&bytes).await.unwrap();
            let mut answers = vec![None; (self.next_id - first) as usize];
            for _ in 0..answers.len() {
                let body = self.rd.read_frame().await.unwrap().unwrap();
                let resp: v1::Response = frame::decode(body).unwrap();
                assert!(resp.error.is_none(), "{resp:?}");
                answers[(resp.id - first) as usize] = Some(resp.results);
            }
            answers.into_iter().map(Option::unwrap).collect()
        }

        /// Whether page `offset` is there now: a hit, or a miss.
        async fn is_there(&mut self, offset: u64) -> bool {
            let load = op(Op::Load(v1::Load { area: AREA, offset }));
            match self.pipeline(vec![vec![load]]).await[0][0].status() {
                v1::Status::Ok => true,
                v1::Status::NotFound => false,
                other => panic!("load {offset}: {other:?}"),
            }
        }
    }

    fn op(kind: Op) -> v1::Op {
        v1::Op { kind: Some(kind) }
    }

    fn store(offset: u64, page: Bytes) -> v1::Op {
        op(Op::Store(v1::Store {
            area: AREA,
            offset,
            page,
        }))
    }

    fn invalidate(offset: u64) -> v1::Op {
        op(Op::InvalidatePage(v1::InvalidatePage {
            area: AREA,
            offset,
        }))
    }

    fn statuses(results: &[v1::OpResult]) -> Vec<v1::Status> {
        results.iter().map(|r| r.status()).collect()
    }

    #[test]
    fn a_batch_of_stores_then_an_invalidate_of_one_leave_it_invalidated() {
        const ROUNDS: u64 = 200;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let fe = Arc::new(frontend(64 << 20));
            fe.init_area(AREA, false).unwrap();
            let served = serve(&fe);
            let mut conn = Conn::open(&served).await;
            let mut back = 0;
            for round in 0..ROUNDS {
                // Enough stores that the batch runs on the workers; the
                // invalidate, one op, would run in the reader.
                let first = round * 16;
                let x = first + 15;
                let stores = (first..=x)
                    .map(|o| store(o, Bytes::from(make_page(Kind::Compressible, o))))
                    .collect();
                let answers = conn.pipeline(vec![stores, vec![invalidate(x)]]).await;
                assert!(
                    answers[0].iter().all(|r| r.status() == v1::Status::Ok),
                    "{:?}",
                    statuses(&answers[0])
                );
                assert_eq!(statuses(&answers[1]), [v1::Status::Ok]);
                back += conn.is_there(x).await as u64;
            }
            assert_eq!(
                back, 0,
                "{back} of {ROUNDS} rounds brought an invalidated page back"
            );
        });
    }

    /// Donors that make room, after a while, by taking filler pages out of
    /// the store.
    struct Room {
        fe: Weak<Frontend>,
        fillers: Mutex<Vec<u64>>,
        made: AtomicUsize,
    }

    const FILLER_AREA: u32 = 2;

    impl Room {
        /// Stores filler pages like `page` until the store is full.
        fn fill(&self, page: &[u8], next: &mut u64) {
            let fe = self.fe.upgrade().unwrap();
            loop {
                match fe.store_page_without_waiting(FILLER_AREA, *next, page) {
                    Ok(Some(StoreResult::Accepted)) => self.fillers.lock().unwrap().push(*next),
                    Ok(None) => return,
                    other => panic!("filler {next}: {other:?}"),
                }
                *next += 1;
            }
        }
    }

    impl RemotePages for Room {
        fn fetch_many<'a, 'b: 'a>(
            &'a self,
            remotes: &'a [RemoteRef],
            _outs: &'a mut [&'b mut Page],
        ) -> Fetch<'a> {
            let n = remotes.len();
            Box::pin(async move { vec![LoadResult::Unavailable; n] })
        }

        fn wait(&self, _fetch: Fetch<'_>) -> Vec<LoadResult> {
            Vec::new()
        }

        fn make_room(&self) -> bool {
            std::thread::sleep(Duration::from_millis(10));
            let fe = self.fe.upgrade().unwrap();
            let mut fillers = self.fillers.lock().unwrap();
            for _ in 0..4 {
                if let Some(o) = fillers.pop() {
                    fe.invalidate_page(FILLER_AREA, o).unwrap();
                }
            }
            self.made.fetch_add(1, Ordering::Relaxed);
            true
        }

        fn bring_home(&self, _space: u32, _max: usize) -> usize {
            0
        }
    }

    #[test]
    fn a_store_that_waits_for_room_then_an_invalidate_leave_the_page_invalidated() {
        const ROUNDS: u64 = 50;
        // One thread that must not block, as a cluster node's transport
        // thread: a store into the full store goes to a blocking thread.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let fe = Arc::new(frontend(256 << 10));
        fe.init_area(AREA, false).unwrap();
        fe.init_area(FILLER_AREA, false).unwrap();
        let room = Arc::new(Room {
            fe: Arc::downgrade(&fe),
            fillers: Mutex::default(),
            made: AtomicUsize::new(0),
        });
        fe.set_remote(room.clone());
        // Every page alike, so that one freed makes room for another.
        let page = Bytes::from(make_page(Kind::Compressible, 7));
        let mut next_filler = 0;
        rt.block_on(async {
            let served = serve(&fe);
            let mut conn = Conn::open(&served).await;
            let (mut accepted, mut back) = (0, 0);
            for x in 0..ROUNDS {
                room.fill(&page, &mut next_filler);
                let answers = conn
                    .pipeline(vec![vec![store(x, page.clone())], vec![invalidate(x)]])
                    .await;
                match answers[0][0].status() {
                    v1::Status::Ok => accepted += 1,
                    v1::Status::RejectedNoCapacity => {}
                    other => panic!("store {x}: {other:?}"),
                }
                assert_eq!(statuses(&answers[1]), [v1::Status::Ok]);
                back += conn.is_there(x).await as u64;
            }
            let made = room.made.load(Ordering::Relaxed) as u64;
            assert_eq!(made, ROUNDS, "not every store waited for room");
            assert!(accepted > ROUNDS / 2, "{accepted} stores accepted");
            assert_eq!(
                back, 0,
                "{back} of {ROUNDS} rounds ({accepted} stores accepted) brought an \
                 invalidated page back"
            );
        });
    }
}

mod bounds;
