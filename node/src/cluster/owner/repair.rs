//! Repair's decisions: which donors' copies are lost, how a repair pass
//! starts and where it stands between passes, how one replica set's pages
//! are re-created (read from whom, put on whom) and what each page's
//! outcome is once the new donors answered.
//!
//! A lost donor is one that is down, left the cluster, came back empty (a
//! new incarnation) or is draining; its copies are re-created from a
//! surviving replica, or from the draining donor itself while it still
//! serves reads. A page whose every copy is lost cannot be repaired.

use std::time::Instant;

use hashbrown::HashMap;

use crate::cluster::donor::PageStatus;
use crate::cluster::placement::DonorView;
use crate::store::{DonorId, PageKey, Released, RemoteRef, Replicas};

/// Degraded pages taken per walk of the index (a walk visits every remote
/// page, so it should take many).
pub const REPAIR_BATCH_PAGES: usize = 16_384;
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
    pub(crate) no_source: u64,
    /// A source answered without a good copy of the page.
    pub(crate) no_copy: u64,
    /// Too few donors could take the copies.
    pub(crate) no_donor: u64,
    /// A new donor refused or the page changed meanwhile.
    pub(crate) not_settled: u64,
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

    /// Whether a stalled pass should be reported at `now` (at most every
    /// [`STALL_REPORT_EVERY`]); if so, the report is counted as made.
    pub(crate) fn stall_report_due(&mut self, now: Instant) -> bool {
        let due = self
            .stall_reported
            .is_none_or(|t| now.saturating_duration_since(t) >= STALL_REPORT_EVERY);
        if due {
            self.stall_reported = Some(now);
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
        made: super::remotify::may_hold(holders, unanswered),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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

    #[test]
    fn a_stalled_repair_is_reported_at_most_every_few_seconds() {
        let mut state = RepairState::default();
        let t0 = crate::cluster::test_epoch();
        assert!(state.stall_report_due(t0));
        assert!(!state.stall_report_due(t0 + STALL_REPORT_EVERY / 2));
        assert!(state.stall_report_due(t0 + STALL_REPORT_EVERY));
        // A clock read earlier than the last report (taken on another
        // thread, say) does not report again.
        assert!(!state.stall_report_due(t0));
        assert!(!state.stall_report_due(t0 + STALL_REPORT_EVERY + Duration::from_secs(1)));
    }
}
