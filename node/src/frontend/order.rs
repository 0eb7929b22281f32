//! The order of one connection's requests.
//!
//! A connection's requests run concurrently (small ones in the reader,
//! larger ones on the workers, a store that waits for room on a blocking
//! thread), yet each must take effect as if they ran one after another in
//! the order they were sent, wherever that order can be seen: two requests
//! that touch the same page, one of them changing it, and a request that
//! changes an area or pool as a whole (init, invalidate, shrink) against
//! anything in it. Requests that only read (loads, stats) still overlap one
//! another, so pipelined loads keep their concurrency.
//!
//! [`Footprint`] is what a request touches and how; [`touches`] is the one
//! place that says it for each op. [`Gate`] decides, without any I/O,
//! which requests may start: one may once every earlier request it
//! conflicts with has finished. [`Order`] is the gate shared by the tasks
//! of a connection, with a [`Pass`] per request to wait on.

use std::collections::BTreeMap;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Poll, Waker};

use hashbrown::HashMap;
use parking_lot::Mutex;
use ramster_protocol::v1::{self, op::Kind};

/// How an op touches what it touches.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    Read,
    Write,
}

/// Whether two accesses of the same thing must keep their order: unless
/// both only read.
fn clash(a: Option<Access>, b: Option<Access>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a == Access::Write || b == Access::Write)
}

/// First step of every path below the root: the frontswap areas, the
/// cleancache pools.
const AREAS: u64 = 0;
const POOLS: u64 = 1;

/// A path from the root (everything the node holds) down: at most four
/// steps.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Path {
    steps: [u64; 4],
    len: usize,
}

impl Path {
    fn new(steps: &[u64]) -> Path {
        let mut path = Path {
            steps: [0; 4],
            len: steps.len(),
        };
        path.steps[..steps.len()].copy_from_slice(steps);
        path
    }

    pub fn steps(&self) -> &[u64] {
        &self.steps[..self.len]
    }
}

/// What `kind` touches, as the path to the least that contains it, and
/// how; `None` for an op outside the order (stats). Paths: `[AREAS, area]`,
/// `[AREAS, area, offset]`, `[POOLS]`, `[POOLS, pool]`, `[POOLS, pool,
/// object]`, `[POOLS, pool, object, index]`. Two ops touch something in
/// common if one's path starts the other's.
pub fn touches(kind: &Kind) -> Option<(Path, Access)> {
    use Access::{Read, Write};
    let area = |a: u32| Path::new(&[AREAS, a.into()]);
    let page = |a: u32, offset: u64| Path::new(&[AREAS, a.into(), offset]);
    let pool_page = |p: u32, object: u64, index: u64| Path::new(&[POOLS, p.into(), object, index]);
    Some(match kind {
        Kind::InitArea(o) => (area(o.area), Write),
        Kind::InvalidateArea(o) => (area(o.area), Write),
        Kind::Shrink(o) => (area(o.area), Write),
        Kind::CurrPages(o) => (area(o.area), Read),
        Kind::Store(o) => (page(o.area, o.offset), Write),
        Kind::InvalidatePage(o) => (page(o.area, o.offset), Write),
        Kind::Load(o) => (page(o.area, o.offset), Read),
        // Its id is not known before it runs.
        Kind::NewPool(_) => (Path::new(&[POOLS]), Write),
        Kind::InvalidatePool(o) => (Path::new(&[POOLS, o.pool.into()]), Write),
        Kind::InvalidateObject(o) => (Path::new(&[POOLS, o.pool.into(), o.object]), Write),
        Kind::Put(o) => (pool_page(o.pool, o.object, o.index), Write),
        // A private pool's get hands the page over: it goes.
        Kind::Get(o) => (pool_page(o.pool, o.object, o.index), Write),
        Kind::InvalidatePoolPage(o) => (pool_page(o.pool, o.object, o.index), Write),
        // Counters are a snapshot of some moment while the request is
        // out, not a point in the connection's order: a client that polls
        // them while it pipelines stores must not drain its pipeline.
        Kind::GetStats(_) => return None,
    })
}

/// Everything one request touches, and how: a tree of the paths of
/// [`touches`].
#[derive(Debug, Default)]
pub struct Footprint {
    root: Node,
}

#[derive(Debug, Default)]
struct Node {
    /// How this node is touched as a whole: everything under it.
    whole: Option<Access>,
    /// The strongest access of anything under it.
    under: Option<Access>,
    /// Smallest and largest key of `children`: disjoint runs of pages
    /// are told apart without a look at each.
    lo: u64,
    hi: u64,
    children: HashMap<u64, Node>,
}

impl Footprint {
    /// The footprint of a request of `ops`.
    pub fn of(ops: &[v1::Op]) -> Footprint {
        let mut fp = Footprint::default();
        for (path, access) in ops.iter().filter_map(|o| o.kind.as_ref().and_then(touches)) {
            fp.touch(path.steps(), access);
        }
        fp
    }

    /// Adds an access of `path`.
    pub fn touch(&mut self, path: &[u64], access: Access) {
        self.root.touch(path, access);
    }

    /// Whether this and `other` touch something in common and one of them
    /// changes it: then the one sent later must wait for the other.
    pub fn conflicts(&self, other: &Footprint) -> bool {
        self.root.conflicts(&other.root)
    }
}

impl Node {
    fn touch(&mut self, path: &[u64], access: Access) {
        let Some((&key, rest)) = path.split_first() else {
            self.whole = self.whole.max(Some(access));
            return;
        };
        self.under = self.under.max(Some(access));
        if self.children.is_empty() {
            (self.lo, self.hi) = (key, key);
        } else {
            (self.lo, self.hi) = (self.lo.min(key), self.hi.max(key));
        }
        self.children.entry(key).or_default().touch(rest, access);
    }

    fn strongest(&self) -> Option<Access> {
        self.whole.max(self.under)
    }

    fn conflicts(&self, other: &Node) -> bool {
        if clash(self.whole, other.strongest()) || clash(other.whole, self.strongest()) {
            return true;
        }
        if !clash(self.under, other.under) || self.hi < other.lo || other.hi < self.lo {
            return false;
        }
        let (few, many) = if self.children.len() <= other.children.len() {
            (self, other)
        } else {
            (other, self)
        };
        few.children
            .iter()
            .any(|(key, a)| many.children.get(key).is_some_and(|b| a.conflicts(b)))
    }
}

/// A request's place in its connection's [`Gate`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(u64);

/// Decides which of one connection's requests may start: each enters in
/// the order it was sent, and may start once every earlier request it
/// conflicts with has finished. No I/O and no waiting: the caller runs
/// what it is told may start.
///
/// A request waits only on earlier ones, so the earliest request still
/// open can always start: nothing waits forever.
#[derive(Debug, Default)]
pub struct Gate {
    next: u64,
    /// Requests entered and not finished, by ticket (the order they came).
    open: BTreeMap<Ticket, Entry>,
}

#[derive(Debug)]
struct Entry {
    footprint: Footprint,
    /// Earlier requests it still waits on.
    waits_on: usize,
    /// Later requests waiting on it.
    holds: Vec<Ticket>,
}

impl Gate {
    /// Enters the next request, after every one entered before it: its
    /// ticket, and whether it may start at once.
    pub fn enter(&mut self, footprint: Footprint) -> (Ticket, bool) {
        let ticket = Ticket(self.next);
        self.next += 1;
        let mut waits_on = 0;
        for earlier in self.open.values_mut() {
            if earlier.footprint.conflicts(&footprint) {
                earlier.holds.push(ticket);
                waits_on += 1;
            }
        }
        self.open.insert(
            ticket,
            Entry {
                footprint,
                waits_on,
                holds: Vec::new(),
            },
        );
        (ticket, waits_on == 0)
    }

    /// Whether `ticket`'s request may start (or has).
    pub fn may_start(&self, ticket: Ticket) -> bool {
        self.open.get(&ticket).is_some_and(|e| e.waits_on == 0)
    }

    /// `ticket`'s request finished (or will never run): the requests that
    /// may start now and could not before.
    pub fn finish(&mut self, ticket: Ticket) -> Vec<Ticket> {
        let Some(done) = self.open.remove(&ticket) else {
            return Vec::new();
        };
        done.holds
            .into_iter()
            .filter(|t| {
                self.open.get_mut(t).is_some_and(|e| {
                    e.waits_on -= 1;
                    e.waits_on == 0
                })
            })
            .collect()
    }

    /// Requests entered and not finished.
    pub fn open(&self) -> usize {
        self.open.len()
    }
}

/// A connection's [`Gate`], shared by the tasks running its requests.
#[derive(Clone, Default)]
pub struct Order {
    shared: Arc<Mutex<Shared>>,
}

#[derive(Default)]
struct Shared {
    gate: Gate,
    /// Tasks waiting to start, by ticket.
    wakers: HashMap<Ticket, Waker>,
}

impl Order {
    /// Enters the next request, touching `footprint`; it runs once its
    /// pass says it may, and finishes when the pass is dropped.
    pub fn enter(&self, footprint: Footprint) -> Pass {
        let (ticket, _) = self.shared.lock().gate.enter(footprint);
        Pass {
            order: self.clone(),
            ticket,
        }
    }
}

/// One request's place in its connection's order. Dropping it finishes
/// the request, run or not, and lets those waiting on it start.
pub struct Pass {
    order: Order,
    ticket: Ticket,
}

impl Pass {
    /// Whether the request may start now.
    pub fn may_start(&self) -> bool {
        self.order.shared.lock().gate.may_start(self.ticket)
    }

    /// Waits until the request may start.
    pub async fn ready(&self) {
        poll_fn(|cx| {
            let mut shared = self.order.shared.lock();
            if shared.gate.may_start(self.ticket) {
                shared.wakers.remove(&self.ticket);
                Poll::Ready(())
            } else {
                shared.wakers.insert(self.ticket, cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let wake: Vec<Waker> = {
            let mut shared = self.order.shared.lock();
            shared.wakers.remove(&self.ticket);
            let ready = shared.gate.finish(self.ticket);
            ready
                .iter()
                .filter_map(|t| shared.wakers.remove(t))
                .collect()
        };
        wake.into_iter().for_each(Waker::wake);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use ramster_protocol::v1::{self, op::Kind};

    use super::*;

    fn op(kind: Kind) -> v1::Op {
        v1::Op { kind: Some(kind) }
    }

    fn store(area: u32, offset: u64) -> v1::Op {
        op(Kind::Store(v1::Store {
            area,
            offset,
            page: Bytes::new(),
        }))
    }

    fn load(area: u32, offset: u64) -> v1::Op {
        op(Kind::Load(v1::Load { area, offset }))
    }

    fn invalidate(area: u32, offset: u64) -> v1::Op {
        op(Kind::InvalidatePage(v1::InvalidatePage { area, offset }))
    }

    fn invalidate_area(area: u32) -> v1::Op {
        op(Kind::InvalidateArea(v1::InvalidateArea { area }))
    }

    fn stats() -> v1::Op {
        op(Kind::GetStats(v1::GetStats {}))
    }

    fn fp(ops: &[v1::Op]) -> Footprint {
        Footprint::of(ops)
    }

    /// Whether requests of `a` and of `b` conflict, either way round.
    fn conflict(a: impl AsRef<[v1::Op]>, b: impl AsRef<[v1::Op]>) -> bool {
        let (x, y) = (fp(a.as_ref()), fp(b.as_ref()));
        assert_eq!(x.conflicts(&y), y.conflicts(&x), "not symmetric");
        x.conflicts(&y)
    }

    #[test]
    fn ops_on_the_same_page_conflict_unless_both_read() {
        assert!(conflict(&[store(1, 5)], &[invalidate(1, 5)]));
        assert!(conflict(&[store(1, 5)], &[load(1, 5)]));
        assert!(conflict(&[store(1, 5)], &[store(1, 5)]));
        assert!(!conflict(&[load(1, 5)], &[load(1, 5)]));
        // Other pages, other areas.
        assert!(!conflict(&[store(1, 5)], &[invalidate(1, 6)]));
        assert!(!conflict(&[store(1, 5)], &[invalidate(2, 5)]));
        // Somewhere in a batch.
        let batch: Vec<_> = (0..16).map(|o| store(1, o)).collect();
        assert!(conflict(&batch, &[invalidate(1, 15)]));
        assert!(conflict(&[load(1, 0), load(1, 7)], &batch));
        assert!(!conflict(&batch, &[invalidate(1, 16)]));
        let far: Vec<_> = (1_000..1_016).map(|o| store(1, o)).collect();
        assert!(!conflict(&batch, &far));
        let loads: Vec<_> = (0..16).map(|o| load(1, o)).collect();
        assert!(!conflict(&loads, &loads));
    }

    #[test]
    fn ops_on_a_whole_area_conflict_with_anything_in_it() {
        let shrink = op(Kind::Shrink(v1::Shrink {
            area: 1,
            target_pages: 0,
            max_pages: 8,
        }));
        let init = op(Kind::InitArea(v1::InitArea {
            area: 1,
            writethrough: false,
            replicas: 0,
        }));
        let curr = op(Kind::CurrPages(v1::CurrPages { area: 1 }));
        for whole in [invalidate_area(1), shrink, init] {
            assert!(conflict([whole.clone()], &[load(1, 3)]));
            assert!(conflict([whole.clone()], &[store(1, 3)]));
            assert!(conflict([whole.clone()], [curr.clone()]));
            assert!(conflict([whole.clone()], [whole.clone()]));
            assert!(!conflict([whole.clone()], &[store(2, 3)]));
            assert!(!conflict(&[whole], &[invalidate_area(2)]));
        }
        // Counting pages only reads them.
        assert!(conflict([curr.clone()], &[store(1, 3)]));
        assert!(!conflict([curr.clone()], &[load(1, 3)]));
        assert!(!conflict(&[curr], &[store(2, 3)]));
    }

    #[test]
    fn stats_wait_on_nothing_and_pool_ops_cover_their_pool() {
        assert!(!conflict(&[stats()], &[store(1, 3)]));
        assert!(!conflict(&[stats()], &[invalidate_area(7)]));
        assert!(!conflict(&[stats()], &[load(1, 3)]));
        assert!(!conflict(&[stats()], &[stats()]));

        let put = |pool, object, index| {
            op(Kind::Put(v1::Put {
                pool,
                object,
                index,
                page: Bytes::new(),
            }))
        };
        let get = |pool, object, index| {
            op(Kind::Get(v1::Get {
                pool,
                object,
                index,
            }))
        };
        let object = op(Kind::InvalidateObject(v1::InvalidateObject {
            pool: 4,
            object: 9,
        }));
        let pool = op(Kind::InvalidatePool(v1::InvalidatePool { pool: 4 }));
        let new_pool = op(Kind::NewPool(v1::NewPool { shared: false }));
        assert!(conflict(&[put(4, 9, 1)], &[get(4, 9, 1)]));
        // A private pool's get takes the page.
        assert!(conflict(&[get(4, 9, 1)], &[get(4, 9, 1)]));
        assert!(!conflict(&[put(4, 9, 1)], &[get(4, 9, 2)]));
        assert!(conflict([object.clone()], &[put(4, 9, 1)]));
        assert!(!conflict(&[object], &[put(4, 8, 1)]));
        assert!(conflict([pool.clone()], &[put(4, 8, 1)]));
        assert!(!conflict([pool.clone()], &[put(5, 8, 1)]));
        assert!(conflict([new_pool.clone()], &[pool]));
        assert!(!conflict([new_pool.clone()], &[stats()]));
        // Pools are not areas.
        assert!(!conflict(&[new_pool], &[store(4, 9)]));
        assert!(!conflict(&[put(1, 3, 0)], &[store(1, 3)]));
    }

    #[test]
    fn a_request_starts_once_every_earlier_one_it_conflicts_with_finished() {
        let mut gate = Gate::default();
        let batch: Vec<_> = (0..16).map(|o| store(1, o)).collect();
        let (stores, now) = gate.enter(fp(&batch));
        assert!(now);
        // Loads of other pages overlap the stores; an invalidate of one of
        // its pages waits, and a load of that page waits for both.
        let (other, now) = gate.enter(fp(&[load(1, 100)]));
        assert!(now);
        let (inval, now) = gate.enter(fp(&[invalidate(1, 15)]));
        assert!(!now);
        let (reload, now) = gate.enter(fp(&[load(1, 15)]));
        assert!(!now);
        // A load of a page only the batch touches waits on the batch alone.
        let (early, now) = gate.enter(fp(&[load(1, 3)]));
        assert!(!now);
        assert_eq!(gate.open(), 5);

        assert_eq!(gate.finish(other), []);
        assert_eq!(gate.finish(stores), [inval, early]);
        assert!(gate.may_start(inval) && gate.may_start(early));
        assert!(!gate.may_start(reload));
        assert_eq!(gate.finish(early), []);
        assert_eq!(gate.finish(inval), [reload]);
        assert!(gate.may_start(reload));
        assert_eq!(gate.finish(reload), []);
        assert_eq!(gate.open(), 0);
        // Finishing twice, or a ticket never entered, changes nothing.
        assert_eq!(gate.finish(reload), []);
    }

    #[test]
    fn readers_overlap_and_a_writer_waits_for_all_of_them() {
        let mut gate = Gate::default();
        let loads: Vec<_> = (0..16).map(|o| load(1, o)).collect();
        let readers: Vec<Ticket> = (0..16)
            .map(|_| {
                let (t, now) = gate.enter(fp(&loads));
                assert!(now, "loads wait on loads");
                t
            })
            .collect();
        let (wipe, now) = gate.enter(fp(&[invalidate_area(1)]));
        assert!(!now);
        // Later loads wait on the invalidate, not the other way round.
        let (after, now) = gate.enter(fp(&loads));
        assert!(!now);
        for (i, r) in readers.iter().enumerate() {
            let ready = gate.finish(*r);
            if i + 1 < readers.len() {
                assert_eq!(ready, []);
            } else {
                assert_eq!(ready, [wipe]);
            }
        }
        assert!(!gate.may_start(after));
        assert_eq!(gate.finish(wipe), [after]);
    }

    #[test]
    fn a_request_dropped_before_it_ran_lets_later_ones_go() {
        let mut gate = Gate::default();
        let (first, _) = gate.enter(fp(&[store(1, 1)]));
        let (second, now) = gate.enter(fp(&[store(1, 1)]));
        assert!(!now);
        let (third, now) = gate.enter(fp(&[load(1, 1)]));
        assert!(!now);
        // The second never ran (its task went away): it still counts as
        // finished for the third, which waits on the first as well.
        assert_eq!(gate.finish(second), []);
        assert_eq!(gate.finish(first), [third]);
    }

    #[tokio::test]
    async fn a_pass_waits_until_the_earlier_conflicting_one_is_dropped() {
        let order = Order::default();
        let first = order.enter(fp(&[store(1, 1)]));
        let second = order.enter(fp(&[invalidate(1, 1)]));
        let unrelated = order.enter(fp(&[store(1, 2)]));
        assert!(first.may_start() && unrelated.may_start());
        assert!(!second.may_start());
        let waiting = tokio::spawn(async move {
            second.ready().await;
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(unrelated);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .unwrap();
    }
}
