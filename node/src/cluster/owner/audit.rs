//! Anti-entropy: an owner audits what its donors hold for it, instead of
//! hoping every release arrived.
//!
//! A copy can outlive the owner's wish for it: a release refused or lost
//! with its connection, a release queued for a donor that stayed away, a put
//! that timed out and landed anyway. So, a step at a time, the owner asks
//! each answering donor for a page of the copies it holds for this run of
//! the owner, and releases those its index does not name there at that
//! version.
//!
//! What makes that safe is the *placement floor* the step carries: the
//! owner's placement mark at a moment when none of its puts is unanswered
//! (the movers take a step between rounds). Every put numbered below it has
//! been settled into the index or given up, and the donor refuses such a
//! put from then on. A listed copy below the floor that the index does not
//! name is therefore unwanted for good, and its release, stamped with the
//! floor, covers it and no put sent since (see `cluster::donor`). The same
//! floor lets the donor drop the tombstones that only refused puts below it,
//! which bounds them by the releases decided since the last audit.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ramster_protocol::PEER_BATCH_PAGES_MAX;

use crate::cluster::donor::AuditedPage;
use crate::store::{DonorId, Released, Replicas};

/// Copies a donor lists per audit step.
pub const AUDIT_STEP_COPIES: usize = PEER_BATCH_PAGES_MAX;

/// How an owner paces its audits.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct AuditPace {
    /// A pass over every answering donor starts this long after the last
    /// one started (or at once after one that took longer).
    pub pass_every: Duration,
    /// The steps of a pass are at least this far apart, so an audit never
    /// takes more than a sliver of a donor's attention or of the movers'.
    pub step_every: Duration,
}

impl AuditPace {
    /// A node's pace: a donor's table is walked about once a minute, a
    /// step every 50 ms (a million copies: a pass of about a minute).
    pub const NODE: AuditPace = AuditPace {
        pass_every: Duration::from_secs(60),
        step_every: Duration::from_millis(50),
    };
}

/// One audit step to send.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct AuditAsk {
    pub donor: DonorId,
    /// Where the donor's listing goes on (0: from the start).
    pub cursor: u64,
    /// The owner's placement floor to announce (see the module doc).
    pub floor: u64,
}

/// Which donor an owner audits next, and where.
#[derive(Debug)]
pub struct Auditor {
    pace: AuditPace,
    /// Donors this pass has still to start on.
    todo: VecDeque<DonorId>,
    /// The donor being walked, and where its listing goes on.
    current: Option<(DonorId, u64)>,
    pass_started: Option<Instant>,
    in_pass: bool,
    last_step: Option<Instant>,
    /// A step is out and not answered yet: one at a time.
    asked: Option<DonorId>,
    passes: u64,
}

impl Auditor {
    pub fn new(pace: AuditPace) -> Self {
        Auditor {
            pace,
            todo: VecDeque::new(),
            current: None,
            pass_started: None,
            in_pass: false,
            last_step: None,
            asked: None,
            passes: 0,
        }
    }

    /// Passes completed so far.
    pub fn passes(&self) -> u64 {
        self.passes
    }

    /// The step to send now, if one is due. `donors` answer now (sorted or
    /// not: a pass takes them in the order given); `floor` is the owner's
    /// placement mark, read when none of its puts is unanswered.
    pub fn next(&mut self, now: Instant, donors: &[DonorId], floor: u64) -> Option<AuditAsk> {
        if self.asked.is_some() {
            return None;
        }
        if self
            .last_step
            .is_some_and(|t| now.saturating_duration_since(t) < self.pace.step_every)
        {
            return None;
        }
        loop {
            if let Some((donor, cursor)) = self.current {
                if donors.contains(&donor) {
                    self.asked = Some(donor);
                    self.last_step = Some(now);
                    return Some(AuditAsk {
                        donor,
                        cursor,
                        floor,
                    });
                }
                // Gone quiet: the next pass takes it from the start.
                self.current = None;
            }
            if let Some(donor) = self.todo.pop_front() {
                self.current = Some((donor, 0));
                continue;
            }
            if self.in_pass {
                self.in_pass = false;
                self.passes += 1;
            }
            let due = self
                .pass_started
                .is_none_or(|t| now.saturating_duration_since(t) >= self.pace.pass_every);
            if !due || donors.is_empty() {
                return None;
            }
            self.pass_started = Some(now);
            self.in_pass = true;
            self.todo = donors.iter().copied().collect();
        }
    }

    /// The step to `donor` was answered; `next` is where its listing goes
    /// on (`None`: it is complete).
    pub fn answered(&mut self, donor: DonorId, next: Option<u64>) {
        if self.asked != Some(donor) {
            return;
        }
        self.asked = None;
        self.current = next.map(|cursor| (donor, cursor));
    }

    /// The step to `donor` got no answer: that donor waits for the next
    /// pass.
    pub fn failed(&mut self, donor: DonorId) {
        if self.asked == Some(donor) {
            self.asked = None;
            self.current = None;
        }
    }
}

/// The releases an audit step of `donor` calls for: the listed copies below
/// `floor` that the index does not name there at that version (`listed_by_index`
/// says whether it does). Each is stamped with the floor: it covers the
/// copy listed and no put sent after the step.
pub fn unwanted_copies(
    donor: DonorId,
    listed: &[AuditedPage],
    floor: u64,
    mut listed_by_index: impl FnMut(&AuditedPage) -> bool,
) -> Vec<Released> {
    let Some(replicas) = Replicas::new(&[donor]) else {
        return Vec::new();
    };
    listed
        .iter()
        .filter(|c| c.placement < floor && !listed_by_index(c))
        .map(|c| Released {
            key: c.key,
            version: c.version,
            replicas,
            placement: floor,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PageKey;

    const PACE: AuditPace = AuditPace {
        pass_every: Duration::from_secs(10),
        step_every: Duration::from_millis(100),
    };

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_pass_walks_each_answering_donor_to_the_end_one_step_at_a_time() {
        let t0 = crate::cluster::test_epoch();
        let mut a = Auditor::new(PACE);
        let ask = a.next(t0, &[2, 3], 7).unwrap();
        assert_eq!(
            ask,
            AuditAsk {
                donor: 2,
                cursor: 0,
                floor: 7
            }
        );
        // One step out at a time, and paced.
        assert_eq!(a.next(ms(t0, 500), &[2, 3], 7), None);
        a.answered(2, Some(1024));
        assert_eq!(a.next(ms(t0, 50), &[2, 3], 8), None);
        let ask = a.next(ms(t0, 100), &[2, 3], 8).unwrap();
        assert_eq!((ask.donor, ask.cursor, ask.floor), (2, 1024, 8));
        a.answered(2, None);
        let ask = a.next(ms(t0, 200), &[2, 3], 9).unwrap();
        assert_eq!((ask.donor, ask.cursor), (3, 0));
        // A donor that fails waits for the next pass, which starts once
        // the interval has passed since this one started.
        a.failed(3);
        assert_eq!(a.next(ms(t0, 300), &[2, 3], 9), None);
        assert_eq!(a.passes(), 1);
        assert_eq!(a.next(ms(t0, 9_999), &[2, 3], 9), None);
        let ask = a.next(ms(t0, 10_000), &[3], 9).unwrap();
        assert_eq!((ask.donor, ask.cursor), (3, 0));
    }

    #[test]
    fn a_donor_that_stops_answering_mid_walk_is_dropped_from_the_pass() {
        let t0 = crate::cluster::test_epoch();
        let mut a = Auditor::new(PACE);
        a.next(t0, &[2, 3], 1).unwrap();
        a.answered(2, Some(10));
        let ask = a.next(ms(t0, 100), &[3], 1).unwrap();
        assert_eq!((ask.donor, ask.cursor), (3, 0));
        // A late answer for a step not out is ignored.
        a.answered(2, Some(20));
        a.answered(3, None);
        assert_eq!(a.next(ms(t0, 200), &[2, 3], 1), None);
    }

    #[test]
    fn only_copies_below_the_floor_that_the_index_does_not_name_are_released() {
        let key = |index| PageKey {
            space: 1,
            object: 0,
            index,
        };
        let copy = |index, version, placement| AuditedPage {
            key: key(index),
            version,
            placement,
        };
        let listed = [
            copy(1, 5, 3),  // named by the index: kept
            copy(2, 5, 3),  // not named: released
            copy(3, 5, 9),  // at the floor: a put maybe not settled yet
            copy(4, 4, 2),  // an older version than the index names
            copy(5, 6, 12), // above the floor
        ];
        let named = |c: &AuditedPage| (c.key.index == 1) || (c.key.index == 4 && c.version == 5);
        let out = unwanted_copies(7, &listed, 9, named);
        let got: Vec<(u64, u64, u64)> = out
            .iter()
            .map(|r| (r.key.index, r.version, r.placement))
            .collect();
        assert_eq!(got, [(2, 5, 9), (4, 4, 9)]);
        assert!(out.iter().all(|r| r.replicas.as_slice() == [7]));
    }
}
