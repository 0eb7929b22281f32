//! The owner's side of a reclaim: a donor asks, in its heartbeats, for
//! bytes of our pages back (its own memory needs grew; the donor's side is
//! [`crate::cluster::reclaim`]). Writethrough pages on it are dropped
//! first; persistent copies covering the rest are listed to be moved to
//! other donors, or home.

use super::repair::REPAIR_BATCH_PAGES;
use crate::store::{DonorId, PageStore, RemoteRef};

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
