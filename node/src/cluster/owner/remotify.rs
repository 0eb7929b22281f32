//! Remotify's decisions: how a batch of cold pages is split by the copies
//! its pages want, and what each page's outcome is once the donors answered
//! its puts (record the replica set and free the local copy, or keep it
//! home and release whatever copies were made).

use std::collections::BTreeMap;

use crate::store::{CopiesWanted, Outbound, Replicas};

/// A remotify batch split by the number of donor copies its pages want:
/// one placement per count, in order (a simulated run replays).
pub fn by_copies(out: Vec<Outbound>, wanted: &CopiesWanted) -> BTreeMap<usize, Vec<Outbound>> {
    let mut by = BTreeMap::<usize, Vec<Outbound>>::new();
    for o in out {
        by.entry(wanted.of(o.key.space, o.retention))
            .or_default()
            .push(o);
    }
    by
}

/// One page's outcome of a remotify batch, once its puts are answered.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ShipSettle {
    /// Every chosen donor acked: the set to record, after which the local
    /// copy is freed. `None`: the page stays home.
    pub record: Option<Replicas>,
    /// The donors that hold a copy, or may: a put that went unanswered may
    /// still land, and the release sent after it leaves a tombstone that
    /// refuses it then.
    made: Option<Replicas>,
}

impl ShipSettle {
    /// The copies to release, given whether the store recorded the set (it
    /// refuses when the page was rewritten or invalidated meanwhile).
    pub fn unwanted(&self, recorded: bool) -> Option<Replicas> {
        if recorded { None } else { self.made }
    }
}

/// Settles one shipped page: `donors` were asked, `holders` acked it,
/// `unanswered` got the batch and did not answer. The local copy may go
/// only when every replica acked.
pub fn settle_shipped(donors: &[u32], holders: &[u32], unanswered: &[u32]) -> ShipSettle {
    let complete = !donors.is_empty() && donors.iter().all(|d| holders.contains(d));
    ShipSettle {
        record: if complete {
            Replicas::new(holders)
        } else {
            None
        },
        made: may_hold(holders, unanswered),
    }
}

/// The donors that may hold a copy after a put: those that acked it and
/// those that got it and never answered.
pub fn may_hold(holders: &[u32], unanswered: &[u32]) -> Option<Replicas> {
    let mut maybe = holders.to_vec();
    maybe.extend(unanswered.iter().filter(|d| !holders.contains(d)));
    Replicas::new(&maybe)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ds: &[u32]) -> Replicas {
        Replicas::new(ds).expect("a set")
    }

    #[test]
    fn a_shipped_page_leaves_home_only_when_every_donor_acked() {
        let all = settle_shipped(&[1, 2], &[2, 1], &[]);
        assert_eq!(all.record, Some(set(&[2, 1])));
        assert_eq!(all.unwanted(true), None);
        // Rewritten meanwhile: the copies just made are stale.
        assert_eq!(all.unwanted(false), Some(set(&[2, 1])));

        // 2 got the batch and never answered: the page stays home, and
        // both the acked copy and the one 2 may hold are released.
        let silent = settle_shipped(&[1, 2], &[1], &[2]);
        assert_eq!(silent.record, None);
        assert_eq!(silent.unwanted(false), Some(set(&[1, 2])));

        // No donor was asked: nothing to record, nothing to release.
        let none = settle_shipped(&[], &[], &[]);
        assert_eq!((none.record, none.unwanted(false)), (None, None));
    }
}
