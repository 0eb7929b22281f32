//! Repair: when a donor holding copies of our pages is lost (down, removed
//! from the cluster, or back with a new incarnation, which means it came
//! back empty), re-create the missing copies from a surviving replica on
//! other donors, so every page is back to its replica count.
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
use super::placement::choose_donors;
use crate::metrics::ClusterCounters;
use crate::store::{DonorId, PAGE_BYTES, Released, RemoteRef, Replicas};

/// Pages looked at per pass.
pub const REPAIR_BATCH_PAGES: usize = 1024;

/// Where repair stands between passes.
#[derive(Default)]
pub(super) struct RepairState {
    /// The lost donors whose copies were all re-created (or found
    /// unrecoverable) in the last complete pass; nothing to walk again
    /// until the set changes.
    settled: Vec<DonorId>,
    /// When pages were first found degraded in the current episode.
    since: Option<Instant>,
    /// When a stalled pass was last reported (at most every few seconds).
    stall_reported: Option<Instant>,
}

/// Pages a pass could not repair, by why: what an operator needs to see
/// when degraded pages do not go away.
#[derive(Debug, Default)]
struct Stalled {
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

/// One repair pass, run by the movers every tick.
pub(super) async fn repair(inner: &Arc<Inner>) {
    let mut lost = inner.lost_donors();
    lost.sort_unstable();
    let c = &inner.metrics.cluster;
    if lost.is_empty() {
        c.degraded_pages.store(0, Ordering::Relaxed);
        c.unrecoverable_pages.store(0, Ordering::Relaxed);
        inner.repair.lock().settled.clear();
        return;
    }
    if inner.repair.lock().settled == lost {
        // Nothing left to re-create; a donor that is back (empty) may take
        // pages again.
        inner.forget_lost_copies(&lost);
        return;
    }
    loop {
        let (refs, degraded, unrecoverable) =
            inner
                .store
                .remote_on(&lost, &inner.draining_donors(), REPAIR_BATCH_PAGES);
        c.degraded_pages.store(degraded, Ordering::Relaxed);
        c.unrecoverable_pages
            .store(unrecoverable, Ordering::Relaxed);
        if refs.is_empty() {
            let mut state = inner.repair.lock();
            if let Some(since) = state.since.take() {
                let secs = since.elapsed().as_secs_f64();
                c.last_repair_micros
                    .store((secs * 1e6) as u64, Ordering::Relaxed);
                info!(lost = ?lost, secs, unrecoverable, "replicas repaired");
            }
            state.settled = lost.clone();
            drop(state);
            inner.forget_lost_copies(&lost);
            return;
        }
        inner.repair.lock().since.get_or_insert_with(Instant::now);
        let mut stalled = Stalled::default();
        if repair_batch(inner, &lost, refs, &mut stalled).await == 0 {
            // Nothing could be repaired now: try again next tick.
            let mut state = inner.repair.lock();
            if state
                .stall_reported
                .is_none_or(|t| t.elapsed() >= STALL_REPORT_EVERY)
            {
                state.stall_reported = Some(Instant::now());
                warn!(lost = ?lost, degraded, ?stalled, "repair made no progress");
            }
            return;
        }
    }
}

/// Re-creates the lost copies of `refs`; the number of pages repaired.
async fn repair_batch(
    inner: &Arc<Inner>,
    lost: &[DonorId],
    refs: Vec<RemoteRef>,
    stalled: &mut Stalled,
) -> u64 {
    let mut groups: HashMap<Replicas, Vec<RemoteRef>> = HashMap::new();
    for r in refs {
        groups.entry(r.replicas).or_default().push(r);
    }
    let mut repaired = 0;
    for (set, refs) in groups {
        repaired += repair_group(inner, lost, set, &refs, stalled).await;
    }
    repaired
}

async fn repair_group(
    inner: &Arc<Inner>,
    lost: &[DonorId],
    set: Replicas,
    refs: &[RemoteRef],
    stalled: &mut Stalled,
) -> u64 {
    let survivors: Vec<DonorId> = set
        .as_slice()
        .iter()
        .copied()
        .filter(|d| !lost.contains(d))
        .collect();
    let gone: Vec<DonorId> = set
        .as_slice()
        .iter()
        .copied()
        .filter(|d| lost.contains(d))
        .collect();
    let need = inner.replicas.saturating_sub(survivors.len());
    // Read from the survivors first; a draining donor still serves its
    // copies until they are all moved.
    let draining = inner.draining_donors();
    let sources: Vec<DonorId> = survivors
        .iter()
        .chain(gone.iter().filter(|d| draining.contains(d)))
        .copied()
        .collect();
    // The copies, checked before they are copied anywhere.
    let pages = match copies_from(inner, &sources, refs).await {
        Some(p) => p,
        None => {
            stalled.no_source += refs.len() as u64;
            return 0;
        }
    };
    stalled.no_copy += pages.iter().filter(|p| p.is_none()).count() as u64;
    let total: u64 = pages.iter().flatten().map(|p| p.data.len() as u64).sum();
    let candidates: Vec<_> = inner
        .donor_views()
        .into_iter()
        .filter(|v| !set.as_slice().contains(&v.id) && !lost.contains(&v.id))
        .collect();
    let fresh = choose_donors(&candidates, need, total, &mut rand::rng());
    if fresh.len() < need {
        stalled.no_donor += refs.len() as u64;
        return 0;
    }
    let donated: Vec<DonatedPage> = pages.iter().flatten().cloned().collect();
    if donated.is_empty() {
        return 0;
    }
    // acked[i]: the new donors that hold donated[i].
    let mut acked: Vec<Vec<DonorId>> = vec![Vec::new(); donated.len()];
    for &d in &fresh {
        let put = async {
            let s = inner.donor_session(d as NodeId).await?;
            inner.note_shipped(d, s.peer_incarnation());
            s.put_pages(&donated).await.map_err(|e| e.to_string())
        }
        .await;
        match put {
            Ok(statuses) => {
                for (i, st) in statuses.iter().enumerate() {
                    if *st == PageStatus::Ok {
                        acked[i].push(d);
                    }
                }
            }
            Err(e) => warn!(donor = d, reason = %e, "repair put failed"),
        }
    }
    let by_key: HashMap<_, _> = refs.iter().map(|r| ((r.key, r.version), r)).collect();
    let mut repaired = 0;
    let mut unwanted = Vec::new();
    for (page, holders) in donated.iter().zip(&acked) {
        let r = by_key[&(page.key, page.version)];
        let mut now_on = survivors.clone();
        now_on.extend(holders);
        let complete = holders.len() == fresh.len();
        let replicas = Replicas::new(&now_on).expect("within REPLICAS_MAX");
        if complete && inner.store.set_replicas(r, replicas) {
            repaired += 1;
            if let Some(old) = Replicas::new(&gone) {
                unwanted.push(Released {
                    key: r.key,
                    version: r.version,
                    replicas: old,
                    placement: inner.endpoint.placement_mark(),
                });
            }
        } else {
            stalled.not_settled += 1;
            if let Some(extra) = Replicas::new(holders) {
                unwanted.push(Released {
                    key: r.key,
                    version: r.version,
                    replicas: extra,
                    placement: inner.endpoint.placement_mark(),
                });
            }
        }
    }
    ClusterCounters::add(&inner.metrics.cluster.repaired_pages, repaired);
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
