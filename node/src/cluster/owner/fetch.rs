//! A remote load's plan: the order it asks a page's replicas in, and what
//! it does when none of them had the page.
//!
//! Suction, a reclaim, a drain or repair may move a page (home, or to
//! other donors) and release the copies a load is reading from: every
//! replica the load asked then answers "not found" for a page that is
//! safe. So a load that found no copy looks the page up again before it
//! answers `unavailable`, and follows the page where it went.

use crate::cluster::status::Liveness;
use crate::store::{DonorId, LoadOutcome, RemoteRef, Replicas};

/// Times a remote load looks a page up again after its copies were not
/// where the descriptor said: each look follows one move of the page. The
/// load fetches from the descriptor it read, then, after each look that
/// finds the page moved, from where it is now.
pub const RELOOKS_MAX: usize = 4;

/// The order a load asks a page's replicas in: up donors first, then
/// suspect ones, then down ones (most likely gone, but a copy there beats
/// none). Donors alike keep the descriptor's order.
pub fn replica_order(replicas: Replicas, liveness: impl Fn(DonorId) -> Liveness) -> Vec<DonorId> {
    let mut order = replicas.as_slice().to_vec();
    order.sort_by_key(|&d| match liveness(d) {
        Liveness::Up => 0,
        Liveness::Suspect => 1,
        Liveness::Down => 2,
    });
    order
}

/// One page's walk over its replicas during a load: which to ask next,
/// whether that ask may be cut short at the hedge delay, and a second,
/// later chance for each replica that was only slow.
///
/// A replica that does not answer within the hedge delay is given up on
/// for now and asked again, once, after the others. Every replica gets
/// that second chance, not only the first to be slow: with one donor
/// stopped and the other merely busy past the hedge delay, the busy one's
/// second ask is the one that finds the page (and, as the last ask, it
/// waits for the rest of the load's deadline).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaWalk {
    order: Vec<DonorId>,
    next: usize,
    /// Replicas queued a second time already.
    again: Vec<DonorId>,
}

impl ReplicaWalk {
    pub fn new(order: Vec<DonorId>) -> Self {
        ReplicaWalk {
            order,
            next: 0,
            again: Vec::new(),
        }
    }

    /// The replica to ask now; `None` once every ask is spent.
    pub fn next(&self) -> Option<DonorId> {
        self.order.get(self.next).copied()
    }

    /// Whether the ask of [`Self::next`] may be cut short at the hedge
    /// delay: another ask remains after it. The last one gets the load's
    /// whole deadline.
    pub fn hedged(&self) -> bool {
        self.next + 1 < self.order.len()
    }

    /// The replica asked did not answer within the hedge delay: on to the
    /// next, and this one is asked again after the others (once).
    pub fn slow(&mut self) {
        if let Some(d) = self.next() {
            if !self.again.contains(&d) {
                self.again.push(d);
                self.order.push(d);
            }
            self.next += 1;
        }
    }

    /// The replica asked failed, or had no good copy: on to the next.
    pub fn failed(&mut self) {
        if self.next < self.order.len() {
            self.next += 1;
        }
    }
}

/// What a load does with a page none of whose copies it found, by what the
/// store says of the page now.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LookAgain {
    /// At home: the store loaded it; the load answers from there.
    Home,
    /// Invalidated, or stored again and refused, meanwhile: not found.
    Gone,
    /// At home, and its bytes failed their checksum.
    Corrupt,
    /// On other donors: fetch it again from them.
    Moved(RemoteRef),
    /// Still where the load looked: none of its copies can be had, and the
    /// load answers so.
    Unchanged,
}

/// The page `asked` named was fetched from its replicas in vain; `now` is
/// what the store's load of its key found.
pub fn look_again(asked: &RemoteRef, now: LoadOutcome) -> LookAgain {
    match now {
        LoadOutcome::Remote(now) if now == *asked => LookAgain::Unchanged,
        LoadOutcome::Remote(now) => LookAgain::Moved(now),
        LoadOutcome::Hit => LookAgain::Home,
        LoadOutcome::Miss => LookAgain::Gone,
        LoadOutcome::Corrupt => LookAgain::Corrupt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{PageKey, Retention};

    fn on(ds: &[DonorId]) -> RemoteRef {
        RemoteRef {
            key: PageKey {
                space: 1,
                object: 0,
                index: 7,
            },
            version: 3,
            checksum: 0xfeed,
            len: 1200,
            replicas: Replicas::new(ds).expect("a set"),
            retention: Retention::Persistent,
        }
    }

    #[test]
    fn a_load_asks_up_replicas_first_and_down_ones_last() {
        let liveness = |d: DonorId| match d {
            1 | 4 => Liveness::Down,
            2 => Liveness::Suspect,
            _ => Liveness::Up,
        };
        assert_eq!(
            replica_order(on(&[1, 2, 3]).replicas, liveness),
            vec![3, 2, 1]
        );
        // Alike, they keep the descriptor's order.
        assert_eq!(
            replica_order(on(&[4, 5, 1]).replicas, liveness),
            vec![5, 4, 1]
        );
    }

    #[test]
    fn a_page_whose_copies_were_not_found_is_followed_where_it_went() {
        let asked = on(&[1, 2]);
        let elsewhere = on(&[3, 2]);
        assert_eq!(
            look_again(&asked, LoadOutcome::Remote(elsewhere)),
            LookAgain::Moved(elsewhere)
        );
        assert_eq!(look_again(&asked, LoadOutcome::Hit), LookAgain::Home);
        assert_eq!(look_again(&asked, LoadOutcome::Miss), LookAgain::Gone);
        assert_eq!(look_again(&asked, LoadOutcome::Corrupt), LookAgain::Corrupt);
        // Same donors, a newer version: a store since, not the same page.
        let rewritten = RemoteRef {
            version: 4,
            ..asked
        };
        assert_eq!(
            look_again(&asked, LoadOutcome::Remote(rewritten)),
            LookAgain::Moved(rewritten)
        );
        assert_eq!(
            look_again(&asked, LoadOutcome::Remote(asked)),
            LookAgain::Unchanged
        );
    }
}

#[cfg(test)]
mod walk_tests {
    use super::*;

    /// Asks until a replica answers: `slow(d)` says whether `d` misses the
    /// hedge delay (it answers when the ask is not hedged); `None` if the
    /// walk ran out.
    fn walk(
        order: &[DonorId],
        slow: impl Fn(DonorId) -> bool,
        dead: &[DonorId],
    ) -> Vec<(DonorId, bool)> {
        let mut w = ReplicaWalk::new(order.to_vec());
        let mut asks = Vec::new();
        while let Some(d) = w.next() {
            let hedged = w.hedged();
            asks.push((d, hedged));
            if dead.contains(&d) {
                if hedged { w.slow() } else { w.failed() }
            } else if hedged && slow(d) {
                w.slow();
            } else {
                return asks;
            }
        }
        asks
    }

    #[test]
    fn a_busy_replica_behind_a_stopped_one_gets_the_last_unhedged_ask() {
        // 1 is stopped, 2 answers only past the hedge delay.
        let asks = walk(&[1, 2], |d| d == 2, &[1]);
        assert_eq!(asks, [(1, true), (2, true), (1, true), (2, false)]);
    }

    #[test]
    fn a_replica_is_asked_at_most_twice_and_the_walk_ends() {
        let asks = walk(&[1, 2, 3], |_| true, &[1, 2, 3]);
        assert_eq!(asks.len(), 6);
        assert_eq!(asks.last(), Some(&(3, false)));
        let mut w = ReplicaWalk::new(vec![4]);
        assert!(!w.hedged());
        w.failed();
        assert_eq!(w.next(), None);
        w.slow();
        w.failed();
        assert_eq!(w.next(), None);
    }

    #[test]
    fn a_replica_that_answers_ends_the_walk_at_once() {
        assert_eq!(walk(&[1, 2], |_| false, &[]), [(1, true)]);
    }
}
