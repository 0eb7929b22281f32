//! Repair: when a donor holding copies of our pages is lost (down or
//! removed from the cluster), or came back empty (a new incarnation: its
//! copies are struck off the pages' sets at once), re-create the missing
//! copies from a surviving replica on other donors, so every page is back
//! to its replica count.
//!
//! A draining donor is handled the same way, except that it still serves
//! reads: its copies are re-created from it when no other replica exists,
//! then released, until it holds nothing.
//!
//! Pages shipped in one remotify batch share a replica set, so repair works
//! in groups: one get from a survivor, one put per new donor. A page whose
//! every copy is lost cannot be repaired (that is what replicas prevent);
//! it is counted, and a load of it answers `unavailable`, never wrong bytes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use hashbrown::HashMap;
use tracing::{info, warn};

use super::donor::{DonatedPage, PageRef, PageStatus};
use super::membership::NodeId;
use super::node::{Inner, decode_checked};
use super::placement::{DonorView, choose_donors};
use crate::metrics::ClusterCounters;
use crate::store::{DonorId, PAGE_BYTES, PageKey, PageStore, Released, RemoteRef, Replicas};

/// Degraded pages taken per walk of the index (a walk visits every remote
/// page, so it should take many).
pub const REPAIR_BATCH_PAGES: usize = 16_384;
/// Pages of one replica set repaired together: one get, one put per new
/// donor (as a remotify batch).
pub const REPAIR_CHUNK_PAGES: usize = 256;
/// Chunks repaired at once: copies flow from several survivors to several
/// donors at the same time.
pub const REPAIR_CHUNKS_IN_FLIGHT: usize = 8;
/// How long one repair pass keeps starting batches before the movers'
/// other chores (releases, remotify, suction) get their turn: a donor that
/// held gigabytes takes many passes, and meanwhile the store still sheds
/// and takes back pages.
pub const REPAIR_SLICE_MAX: std::time::Duration = std::time::Duration::from_millis(500);
/// Most stale refusals remembered in one episode.
const REFUSED_MAX: usize = 4096;

/// Where repair stands between passes.
#[derive(Default)]
pub(crate) struct RepairState {
    /// The lost donors whose copies were all re-created (or found
    /// unrecoverable) in the last complete pass; nothing to walk again
    /// until the set changes.
    settled: Vec<DonorId>,
    /// When pages were first found degraded in the current episode.
    since: Option<Instant>,
    /// (page, version, donor): the donor refused a copy as stale. It keeps
    /// a tombstone of that very copy (released earlier) and will refuse it
    /// every time, so repair looks elsewhere for the rest of the episode.
    refused: Vec<(PageKey, u64, DonorId)>,
    /// When a stalled pass was last reported (at most every few seconds).
    stall_reported: Option<Instant>,
    /// Bumped whenever a donor's copies are struck off (it came back
    /// empty): pages may be short of copies with no donor lost.
    struck: u64,
    /// `struck` as of the last complete pass.
    struck_settled: u64,
    /// `struck` when the current pass started.
    struck_walked: u64,
}

/// Pages a pass could not repair, by why: what an operator needs to see
/// when degraded pages do not go away.
#[derive(Debug, Default)]
pub(crate) struct Stalled {
    /// No source answered a get.
    no_source: u64,
    /// A source answered without a good copy of the page.
    no_copy: u64,
    /// Too few donors could take the copies.
    no_donor: u64,
    /// A new donor refused or the page changed meanwhile.
    not_settled: u64,
}

/// How often a stalled repair is reported.
const STALL_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// How a repair pass starts, given the lost donors (sorted).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum PassStart {
    /// No donor is lost: nothing is degraded.
    Healthy,
    /// The last complete pass dealt with every copy these donors held: the
    /// owner may forget them (a donor that is back, empty, takes pages
    /// again).
    Settled,
    /// Walk the pages with a copy on a lost donor.
    Walk,
}

impl RepairState {
    pub(crate) fn start(&mut self, lost: &[DonorId]) -> PassStart {
        self.struck_walked = self.struck;
        let walked = self.struck == self.struck_settled;
        // A donor lost in the last pass may be back: its pages short of a
        // copy (struck off elsewhere) can be repaired now, so walk once more.
        if lost.is_empty() && walked && self.settled.is_empty() {
            self.settled.clear();
            self.refused.clear();
            PassStart::Healthy
        } else if self.settled == lost && walked {
            PassStart::Settled
        } else {
            PassStart::Walk
        }
    }

    /// Whether a stalled pass should be reported now (at most every
    /// [`STALL_REPORT_EVERY`]); if so, the report is counted as made.
    pub(crate) fn stall_report_due(&mut self) -> bool {
        let due = self
            .stall_reported
            .is_none_or(|t| t.elapsed() >= STALL_REPORT_EVERY);
        if due {
            self.stall_reported = Some(Instant::now());
        }
        due
    }

    /// A donor's copies were struck off: the next pass walks the pages.
    pub(crate) fn struck(&mut self) {
        self.struck += 1;
    }

    /// Pages were found degraded at `now`; the start of the episode.
    pub(crate) fn degraded_at(&mut self, now: Instant) -> Instant {
        *self.since.get_or_insert(now)
    }

    /// No page is left to repair on `lost`: remembers them as settled and
    /// hands back when the episode started, if one was running.
    pub(crate) fn settle(&mut self, lost: &[DonorId]) -> Option<Instant> {
        self.settled = lost.to_vec();
        // Copies struck off during the pass are looked at by the next one.
        self.struck_settled = self.struck_walked;
        self.refused.clear();
        self.since.take()
    }

    /// `donor` answered `status` to a repair copy of (key, version).
    pub(crate) fn answered(
        &mut self,
        key: PageKey,
        version: u64,
        donor: DonorId,
        status: PageStatus,
    ) {
        if status == PageStatus::StaleVersion && self.refused.len() < REFUSED_MAX {
            self.refused.push((key, version, donor));
        }
    }

    /// Donors that refused a copy of one of `refs` as stale.
    pub(crate) fn refused_by(&self, refs: &[RemoteRef]) -> Vec<DonorId> {
        self.refused
            .iter()
            .filter(|(k, v, _)| refs.iter().any(|r| r.key == *k && r.version == *v))
            .map(|(_, _, d)| *d)
            .collect()
    }
}

/// What an owner knows of a donor it shipped copies to.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DonorSight {
    /// No longer a member of the cluster.
    Removed,
    /// A member: whether heartbeats say it is down, the incarnation its
    /// heartbeats last announced (0 when not known yet), and whether it is
    /// draining.
    Member {
        down: bool,
        incarnation: u64,
        draining: bool,
    },
}

/// Whether the copies shipped to a donor in `shipped_incarnation` must be
/// re-created elsewhere: the donor left, is down, is back with another
/// incarnation (a restarted donor comes back empty; until its copies are
/// struck off), or is draining.
pub fn copies_lost(shipped_incarnation: u64, sight: DonorSight) -> bool {
    match sight {
        DonorSight::Removed => true,
        DonorSight::Member {
            down,
            incarnation,
            draining,
        } => draining || down || (incarnation != 0 && incarnation != shipped_incarnation),
    }
}

/// What the owner records for a lost donor once repair re-created every
/// copy it held.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum AfterRepair {
    /// It left the cluster: forget it.
    Forget,
    /// It is back in this incarnation and holds only what it got since.
    Holds(u64),
    /// Still down: it stays lost until it is heard from again.
    Keep,
}

pub fn after_repair(sight: DonorSight) -> AfterRepair {
    match sight {
        DonorSight::Removed => AfterRepair::Forget,
        DonorSight::Member {
            down: false,
            incarnation,
            ..
        } => AfterRepair::Holds(incarnation),
        DonorSight::Member { down: true, .. } => AfterRepair::Keep,
    }
}

/// How one replica set's pages are repaired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupPlan {
    /// Donors of the set that still hold copies.
    pub survivors: Vec<DonorId>,
    /// Donors of the set that are lost.
    pub gone: Vec<DonorId>,
    /// New donors needed to be back at the replica count.
    pub need: usize,
}

impl GroupPlan {
    /// Where the group's copies are read from: the survivors first, then
    /// lost donors that still serve theirs (a draining or reclaiming donor
    /// does until they are all moved).
    pub fn sources(&self, readable: &[DonorId]) -> Vec<DonorId> {
        self.survivors
            .iter()
            .chain(self.gone.iter().filter(|d| readable.contains(d)))
            .copied()
            .collect()
    }
}

pub fn plan_group(set: Replicas, lost: &[DonorId], replicas: usize) -> GroupPlan {
    let (gone, survivors): (Vec<DonorId>, Vec<DonorId>) =
        set.as_slice().iter().partition(|d| lost.contains(d));
    let need = replicas.saturating_sub(survivors.len());
    GroupPlan {
        survivors,
        gone,
        need,
    }
}

/// Donors a group's new copies may go to: none of the set (a copy is
/// there already, or the donor is lost), none that is lost, and none with
/// an unanswered release of one of the group's pages (the new copy has the
/// same name as the released one, and the release, landing after it,
/// would drop it while the owner lists it) or that refused one as stale
/// (`shunned`).
pub fn fresh_candidates(
    views: Vec<DonorView>,
    set: Replicas,
    lost: &[DonorId],
    shunned: &[DonorId],
) -> Vec<DonorView> {
    views
        .into_iter()
        .filter(|v| {
            !set.as_slice().contains(&v.id) && !lost.contains(&v.id) && !shunned.contains(&v.id)
        })
        .collect()
}

/// Of `runs` (a donor and the run a put of a batch reached), the donors
/// that came back empty since: `current` gives the run our copies on a
/// donor are recorded in now. Their acks count for nothing.
pub fn gone_since(
    runs: &[(DonorId, u64)],
    current: impl Fn(DonorId) -> Option<u64>,
) -> Vec<DonorId> {
    runs.iter()
        .filter(|&&(d, run)| current(d) != Some(run))
        .map(|&(d, _)| d)
        .collect()
}

/// Of the releases not answered yet, those of pages a repair pass works
/// on, by page version: each chunk of the pass looks its pages up here
/// rather than scanning the backlog (which grows by a release per copy on
/// a lost donor, so a scan per chunk made repair quadratic).
#[derive(Default)]
pub struct PendingReleases(HashMap<(PageKey, u64), Vec<DonorId>>);

impl PendingReleases {
    pub fn of(pending: &[Released], refs: &[RemoteRef]) -> PendingReleases {
        let wanted: hashbrown::HashSet<(PageKey, u64)> =
            refs.iter().map(|r| (r.key, r.version)).collect();
        let mut by_page: HashMap<(PageKey, u64), Vec<DonorId>> = HashMap::new();
        for p in pending {
            if wanted.contains(&(p.key, p.version)) {
                by_page
                    .entry((p.key, p.version))
                    .or_default()
                    .extend_from_slice(p.replicas.as_slice());
            }
        }
        PendingReleases(by_page)
    }

    /// The donors told to drop one of `refs`' pages.
    pub fn releasing_to(&self, refs: &[RemoteRef]) -> Vec<DonorId> {
        let mut to: Vec<DonorId> = refs
            .iter()
            .filter_map(|r| self.0.get(&(r.key, r.version)))
            .flatten()
            .copied()
            .collect();
        to.sort_unstable();
        to.dedup();
        to
    }
}

/// One page's outcome of a repair round, once the new donors answered.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PageSettle {
    /// The set to record when every new donor holds a copy: the survivors
    /// and the new donors. `None`: the page keeps its old set.
    pub record: Option<Replicas>,
    /// Copies on the lost donors: unwanted once the new set is recorded.
    gone: Option<Replicas>,
    /// Copies the new donors acked, or may hold (the put left and its answer
    /// never came): unwanted unless the new set is recorded.
    made: Option<Replicas>,
}

impl PageSettle {
    /// The copies to release, given whether the store took the new set (it
    /// refuses when the page changed meanwhile: the new copies are stale).
    pub fn unwanted(&self, recorded: bool) -> Option<Replicas> {
        if recorded { self.gone } else { self.made }
    }
}

/// Settles one page: `fresh` are the new donors asked, `holders` those
/// that acked a copy of it, `unanswered` those that got the put and did not
/// answer (they may hold a copy nobody would ever release otherwise).
pub fn settle_page(
    plan: &GroupPlan,
    fresh: &[DonorId],
    holders: &[DonorId],
    unanswered: &[DonorId],
) -> PageSettle {
    let complete = fresh.iter().all(|d| holders.contains(d));
    let record = complete.then(|| {
        let mut now_on = plan.survivors.clone();
        now_on.extend(holders);
        Replicas::new(&now_on).expect("within REPLICAS_MAX")
    });
    PageSettle {
        record,
        gone: Replicas::new(&plan.gone),
        made: super::owner::remotify::may_hold(holders, unanswered),
    }
}

/// One repair pass, run by the movers every tick, for at most
/// [`REPAIR_SLICE_MAX`] of batches.
/// `true` when the slice ran out with pages still to repair.
pub(super) async fn repair(inner: &Arc<Inner>) -> bool {
    inner.strike_restarted();
    let mut lost = inner.lost_donors();
    lost.sort_unstable();
    let c = &inner.metrics.cluster;
    let start = inner.repair.lock().start(&lost);
    match start {
        PassStart::Healthy => {
            c.degraded_pages.store(0, Ordering::Relaxed);
            c.unrecoverable_pages
                .store(inner.store.lost_pages(), Ordering::Relaxed);
            return false;
        }
        PassStart::Settled => {
            inner.forget_lost_copies(&lost);
            return false;
        }
        PassStart::Walk => {}
    }
    // Writethrough pages are not worth a repair: a copy on a lost donor
    // drops its page, and a load of it answers a miss.
    let (dropped, _) = inner.store.drop_droppable_on(&lost, u64::MAX);
    if dropped > 0 {
        info!(lost = ?lost, dropped, "writethrough pages with a lost copy dropped");
    }
    let started = Instant::now();
    loop {
        if started.elapsed() >= REPAIR_SLICE_MAX {
            // The rest in the next pass: the episode and its counts carry on.
            return true;
        }
        let (refs, degraded, unrecoverable) = inner.store.remote_on(
            &lost,
            &inner.draining_donors(),
            inner.replicas,
            REPAIR_BATCH_PAGES,
        );
        c.degraded_pages.store(degraded, Ordering::Relaxed);
        c.unrecoverable_pages
            .store(unrecoverable, Ordering::Relaxed);
        if refs.is_empty() {
            let since = inner.repair.lock().settle(&lost);
            if let Some(since) = since {
                let secs = since.elapsed().as_secs_f64();
                c.last_repair_micros
                    .store((secs * 1e6) as u64, Ordering::Relaxed);
                info!(lost = ?lost, secs, unrecoverable, "replicas repaired");
            }
            inner.forget_lost_copies(&lost);
            return false;
        }
        inner.repair.lock().degraded_at(Instant::now());
        let mut stalled = Stalled::default();
        let readable = inner.draining_donors();
        let repaired = repair_batch(inner, &lost, &readable, refs, &mut stalled).await;
        ClusterCounters::add(&c.repaired_pages, repaired);
        if repaired == 0 {
            // Nothing could be repaired now: try again next tick.
            if inner.repair.lock().stall_report_due() {
                warn!(lost = ?lost, degraded, ?stalled, "repair made no progress");
            }
            return false;
        }
    }
}

/// Takes back what donors ask for (their heartbeats say how many bytes of
/// our pages): that many bytes of copies are moved off each such donor to
/// others, read from the donor itself, as a drain moves them; when no other
/// donor has room they are brought home if this node has room. A copy is
/// released on the donor only once it exists elsewhere or at home: no
/// persistent page is dropped to make room. Writethrough pages are the
/// exception, and go first: dropping them costs their next load a miss.
pub(super) async fn reclaim(inner: &Arc<Inner>) {
    for (donor, bytes) in inner.reclaims() {
        let ReclaimStep {
            dropped,
            dropped_bytes,
            to_move: refs,
        } = reclaim_step(&inner.store, donor, bytes);
        if dropped > 0 {
            ClusterCounters::add(&inner.metrics.cluster.reclaimed_pages, dropped);
            inner.note_reclaimed(donor, dropped_bytes);
        }
        if refs.is_empty() {
            continue;
        }
        let total: u64 = refs.iter().map(|r| u64::from(r.len)).sum();
        let mut stalled = Stalled::default();
        let mut moved = repair_batch(inner, &[donor], &[donor], refs.clone(), &mut stalled).await;
        if moved == 0 {
            moved = super::movers::bring_home(inner, &refs).await as u64;
        }
        if moved == 0 {
            if inner.repair.lock().stall_report_due() {
                warn!(
                    donor,
                    bytes,
                    ?stalled,
                    "a donor wants memory back and no other donor nor this node has room"
                );
            }
            continue;
        }
        ClusterCounters::add(&inner.metrics.cluster.reclaimed_pages, moved);
        inner.note_reclaimed(donor, total * moved / refs.len() as u64);
    }
}

/// One round of a reclaim of `bytes` from `donor`, as far as the store
/// decides it.
#[derive(Debug, Default)]
pub struct ReclaimStep {
    /// Writethrough pages dropped, and the bytes of their copies on the
    /// donor (released already, so they count as given back).
    pub dropped: u64,
    pub dropped_bytes: u64,
    /// Copies on the donor to move for what is left: enough to cover it,
    /// within one repair batch.
    pub to_move: Vec<RemoteRef>,
}

/// Writethrough pages on `donor` go first (dropped, costing their next
/// load a miss); persistent copies covering the rest of `bytes` are listed
/// to be moved.
pub fn reclaim_step(store: &PageStore, donor: DonorId, bytes: u64) -> ReclaimStep {
    let (dropped, dropped_bytes) = store.drop_droppable_on(&[donor], bytes);
    let left = bytes.saturating_sub(dropped_bytes);
    if left == 0 {
        return ReclaimStep {
            dropped,
            dropped_bytes,
            to_move: Vec::new(),
        };
    }
    let (candidates, _, _) = store.remote_on(&[donor], &[donor], 0, REPAIR_BATCH_PAGES);
    let mut taken = 0u64;
    let to_move = candidates
        .into_iter()
        // Also listed: pages short of copies elsewhere, not this donor's.
        .filter(|r| r.replicas.as_slice().contains(&donor))
        .take_while(|r| {
            let more = taken < left;
            taken += u64::from(r.len);
            more
        })
        .collect();
    ReclaimStep {
        dropped,
        dropped_bytes,
        to_move,
    }
}

/// Re-creates the lost copies of `refs`, a few chunks at once; the number
/// of pages repaired.
async fn repair_batch(
    inner: &Arc<Inner>,
    lost: &[DonorId],
    readable: &[DonorId],
    refs: Vec<RemoteRef>,
    stalled: &mut Stalled,
) -> u64 {
    let pending = Arc::new(PendingReleases::of(&inner.release_backlog.lock(), &refs));
    // Pages with the same set and the same number of copies wanted share
    // a plan.
    let mut groups: HashMap<(Replicas, usize), Vec<RemoteRef>> = HashMap::new();
    let wanted = inner.copies_wanted();
    for r in refs {
        let want = wanted.of(r.key.space, r.retention);
        groups.entry((r.replicas, want)).or_default().push(r);
    }
    let mut chunks = groups.into_iter().flat_map(|(group, refs)| {
        refs.chunks(REPAIR_CHUNK_PAGES)
            .map(|c| (group, c.to_vec()))
            .collect::<Vec<_>>()
    });
    let lost: Arc<[DonorId]> = lost.into();
    let readable: Arc<[DonorId]> = readable.into();
    let mut running = tokio::task::JoinSet::new();
    let mut repaired = 0;
    loop {
        while running.len() < REPAIR_CHUNKS_IN_FLIGHT {
            let Some(((set, want), refs)) = chunks.next() else {
                break;
            };
            let (inner, lost, pending) = (inner.clone(), lost.clone(), pending.clone());
            let readable = readable.clone();
            running.spawn(async move {
                let mut stalled = Stalled::default();
                let group = (set, want);
                let n = repair_group(
                    &inner,
                    &lost,
                    &readable,
                    &pending,
                    group,
                    &refs,
                    &mut stalled,
                )
                .await;
                (n, stalled)
            });
        }
        match running.join_next().await {
            Some(Ok((n, s))) => {
                repaired += n;
                stalled.no_source += s.no_source;
                stalled.no_copy += s.no_copy;
                stalled.no_donor += s.no_donor;
                stalled.not_settled += s.not_settled;
            }
            Some(Err(e)) => warn!(reason = %e, "repair task failed"),
            None => return repaired,
        }
    }
}

async fn repair_group(
    inner: &Arc<Inner>,
    lost: &[DonorId],
    readable: &[DonorId],
    pending: &PendingReleases,
    (set, want): (Replicas, usize),
    refs: &[RemoteRef],
    stalled: &mut Stalled,
) -> u64 {
    let plan = plan_group(set, lost, want);
    // The copies, checked before they are copied anywhere.
    let pages = match copies_from(inner, &plan.sources(readable), refs).await {
        Some(p) => p,
        None => {
            stalled.no_source += refs.len() as u64;
            return 0;
        }
    };
    stalled.no_copy += pages.iter().filter(|p| p.is_none()).count() as u64;
    let total: u64 = pages.iter().flatten().map(|p| p.data.len() as u64).sum();
    let mut shunned = pending.releasing_to(refs);
    shunned.extend(inner.repair.lock().refused_by(refs));
    let candidates = fresh_candidates(inner.donor_views(), set, lost, &shunned);
    let fresh = choose_donors(&candidates, plan.need, total, &mut rand::rng());
    if fresh.len() < plan.need {
        stalled.no_donor += refs.len() as u64;
        return 0;
    }
    let donated: Vec<DonatedPage> = pages.iter().flatten().cloned().collect();
    if donated.is_empty() {
        return 0;
    }
    {
        // As remotify: the donors' spare room is that much smaller until
        // their next heartbeat says what they hold.
        let mut sent = inner.sent_since_heartbeat.lock();
        for &d in &fresh {
            *sent.entry(d as NodeId).or_default() += total;
        }
    }
    // acked[i]: the new donors that hold donated[i].
    let mut acked: Vec<Vec<DonorId>> = vec![Vec::new(); donated.len()];
    // The run each new donor was put on.
    let mut runs = Vec::new();
    // New donors that got the put and gave no answer.
    let mut unanswered = Vec::new();
    for &d in &fresh {
        let put = async {
            let s = inner.donor_session(d as NodeId).await?;
            inner.note_shipped(d, s.peer_incarnation());
            runs.push((d, s.peer_incarnation()));
            s.put_pages(&donated).await.map_err(|e| e.to_string())
        }
        .await;
        match put {
            Ok(statuses) => {
                let mut state = inner.repair.lock();
                for (i, st) in statuses.iter().enumerate() {
                    state.answered(donated[i].key, donated[i].version, d, *st);
                    if *st == PageStatus::Ok {
                        acked[i].push(d);
                    }
                }
            }
            Err(e) => {
                warn!(donor = d, reason = %e, "repair put failed");
                // Sent (a session was there) but not answered: it may hold
                // copies.
                if runs.last().is_some_and(|&(r, _)| r == d) {
                    unanswered.push(d);
                }
            }
        }
    }
    let by_key: HashMap<_, _> = refs.iter().map(|r| ((r.key, r.version), r)).collect();
    let mut repaired = 0;
    let mut unwanted = Vec::new();
    let shipped = inner.shipped_runs();
    let gone = gone_since(&runs, |d| shipped.get(&d).copied());
    unanswered.retain(|d| !gone.contains(d));
    for (page, holders) in donated.iter().zip(&mut acked) {
        // A new donor that came back empty since it acked holds nothing.
        holders.retain(|d| !gone.contains(d));
        let r = by_key[&(page.key, page.version)];
        let settle = settle_page(&plan, &fresh, holders, &unanswered);
        let recorded = settle
            .record
            .is_some_and(|replicas| inner.store.set_replicas(r, replicas));
        repaired += u64::from(recorded);
        stalled.not_settled += u64::from(!recorded);
        if let Some(replicas) = settle.unwanted(recorded) {
            unwanted.push(Released {
                key: r.key,
                version: r.version,
                replicas,
                placement: inner.endpoint.placement_mark(),
            });
        }
    }
    drop(shipped);
    if !unwanted.is_empty() {
        inner.release_backlog.lock().extend(unwanted);
    }
    repaired
}

/// Gets `refs` from the first of `sources` that answers, each copy checked
/// against its checksum; `None` for a page it gave no good copy of. `None`
/// overall if no source answered.
async fn copies_from(
    inner: &Arc<Inner>,
    sources: &[DonorId],
    refs: &[RemoteRef],
) -> Option<Vec<Option<DonatedPage>>> {
    let wanted: Vec<PageRef> = refs
        .iter()
        .map(|r| PageRef {
            key: r.key,
            version: r.version,
        })
        .collect();
    let mut scratch = Box::new([0u8; PAGE_BYTES]);
    for &d in sources {
        let got = async {
            let s = inner.donor_session(d as NodeId).await?;
            s.get_pages(&wanted).await.map_err(|e| e.to_string())
        }
        .await;
        let got = match got {
            Ok(g) => g,
            Err(e) => {
                warn!(donor = d, reason = %e, "repair could not read a surviving replica");
                continue;
            }
        };
        return Some(
            got.into_iter()
                .zip(refs)
                .map(|(g, r)| {
                    g.ok()
                        .filter(|p| decode_checked(p.compressed, &p.data, r.checksum, &mut scratch))
                })
                .collect(),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ds: &[DonorId]) -> Replicas {
        Replicas::new(ds).expect("a set")
    }

    #[test]
    fn a_page_settles_on_survivors_and_new_copies_or_releases_what_it_made() {
        // Copies on 1 and 2; 2 is lost; 3 was asked for a new copy.
        let plan = plan_group(set(&[1, 2]), &[2], 2);
        assert_eq!((plan.survivors.clone(), plan.need), (vec![1], 1));

        let acked = settle_page(&plan, &[3], &[3], &[]);
        assert_eq!(acked.record, Some(set(&[1, 3])));
        assert_eq!(acked.unwanted(true), Some(set(&[2])));
        // The page changed meanwhile: the new copy is stale.
        assert_eq!(acked.unwanted(false), Some(set(&[3])));

        // 3 got the put and never answered: the set stays, and 3's copy,
        // if it made one, is released rather than left behind for good.
        let silent = settle_page(&plan, &[3], &[], &[3]);
        assert_eq!(silent.record, None);
        assert_eq!(silent.unwanted(false), Some(set(&[3])));

        // 3 refused (it answered): nothing to release.
        let refused = settle_page(&plan, &[3], &[], &[]);
        assert_eq!(refused.unwanted(false), None);
    }
}
