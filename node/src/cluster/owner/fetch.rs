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
