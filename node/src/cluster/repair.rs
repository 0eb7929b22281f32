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
//!
//! What to repair, from where and to whom is decided in
//! [`super::owner::repair`] (and a reclaim's share in
//! [`super::owner::reclaim`]); this module carries it out over peer
//! sessions.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use hashbrown::HashMap;
use tracing::{info, warn};

use super::donor::{DonatedPage, PageRef, PageStatus};
use super::membership::NodeId;
use super::node::{Inner, decode_checked};
use super::owner::reclaim::{ReclaimStep, reclaim_step};
use super::owner::repair::{
    PassStart, PendingReleases, REPAIR_BATCH_PAGES, Stalled, fresh_candidates, gone_since,
    plan_group, settle_page,
};
use super::placement::choose_donors;
use crate::metrics::ClusterCounters;
use crate::store::{DonorId, PAGE_BYTES, Released, RemoteRef, Replicas};

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
            if inner.repair.lock().stall_report_due(Instant::now()) {
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
            if inner.repair.lock().stall_report_due(Instant::now()) {
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
