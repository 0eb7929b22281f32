//! The movers: remotify ships the coldest pages to donors when the store
//! fills past the high watermark; suction brings them home when it empties
//! below the low one; both release donor copies that are no longer wanted.
//! When to move is [`super::watermarks`]' decision, where to
//! [`super::placement`]'s, and what a batch's answers settle to
//! [`super::owner::remotify`]'s; this module only carries it out.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use ramster_protocol::PEER_BATCH_PAGES_MAX;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::donor::{AuditStep, DonatedPage, PageRef, PageStatus};
use super::membership::NodeId;
use super::node::{Inner, decode_checked};
use super::owner::audit::{AUDIT_STEP_COPIES, AuditAsk, Auditor, unwanted_copies};
use super::owner::remotify::{by_copies, settle_shipped};
use super::owner::repair::gone_since;
use super::placement::choose_donors;
use super::watermarks::{Movement, Pressure, SuctionPace};
use crate::metrics::ClusterCounters;
use crate::store::{Outbound, PAGE_BYTES, Released, RemoteRef, Replicas};

/// How often the movers look at the store when nothing wakes them.
pub const MOVER_TICK_MS: u64 = 50;
/// Pages per remotify batch (one put per replica).
pub const REMOTIFY_BATCH_PAGES: usize = 256;
/// Remotify batches in flight at once.
pub const REMOTIFY_BATCHES_IN_FLIGHT: usize = 8;
/// How long one remotify round keeps starting batches before the movers'
/// other chores get their turn.
pub const REMOTIFY_ROUND_MAX: Duration = Duration::from_millis(500);
/// Pages suction checks and installs between two yields to the runtime.
const SUCTION_YIELD_PAGES: usize = 16;
/// Most releases kept for donors that cannot be reached; past this the
/// oldest are forgotten (the next audit of the donor finds those copies).
pub const RELEASE_BACKLOG_MAX: usize = 1 << 20;

pub(super) async fn run(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut pressure = Pressure::default();
    let mut pace = SuctionPace::default();
    // Set when remotify or repair ended its round (cut short by time) with
    // pages still to move: the next round starts at once instead of a tick
    // later.
    let mut more_to_move = false;
    let mut audit = Audit {
        auditor: Auditor::new(inner.audit_pace),
        out: None,
    };
    loop {
        if more_to_move {
            if *stop.borrow() {
                return;
            }
        } else {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(MOVER_TICK_MS)) => {}
                _ = inner.wake_movers.notified() => {}
                _ = stop.changed() => return,
            }
        }
        more_to_move = false;
        // Here, between rounds, none of our puts is unanswered: the
        // placement mark now is a floor (see `owner::audit`).
        audit.step(&inner).await;
        release(&inner).await;
        let more_to_repair = super::repair::repair(&inner).await;
        super::repair::reclaim(&inner).await;
        let st = inner.store.stats();
        forget(&inner, st.remote_pages).await;
        match pressure.decide(
            &inner.watermarks,
            st.used_bytes,
            st.capacity_bytes,
            st.remote_bytes,
        ) {
            Movement::Remotify { bytes } => {
                more_to_move = remotify(&inner, &mut pressure, bytes).await;
            }
            Movement::Suction { bytes } => suction(&inner, bytes, &mut pace).await,
            Movement::Idle => {}
        }
        more_to_move |= more_to_repair;
    }
}

/// Ships about `bytes` of the coldest pages, several batches in flight.
///
/// Clients keep storing while pages leave, so whenever the round has begun
/// shipping all it was asked to, it asks the store again (less what is
/// already in flight) and keeps the pipeline full rather than letting it
/// drain and refill: a round that drained every few MiB left the cores idle
/// between rounds. After [`REMOTIFY_ROUND_MAX`] it starts nothing new, so
/// releases and repair get their turn; `true` if the store still wanted
/// pages shipped then.
async fn remotify(inner: &Arc<Inner>, pressure: &mut Pressure, bytes: u64) -> bool {
    let started = Instant::now();
    // Bytes this round has yet to start shipping, and bytes on their way.
    let mut to_start = bytes;
    let mut in_flight = 0u64;
    let mut batches = JoinSet::new();
    let mut out_of_time = false;
    loop {
        while batches.len() < REMOTIFY_BATCHES_IN_FLIGHT {
            if to_start == 0 {
                if started.elapsed() >= REMOTIFY_ROUND_MAX {
                    out_of_time = true;
                    break;
                }
                to_start = still_to_shed(inner, pressure, in_flight);
                if to_start == 0 {
                    break;
                }
            }
            let out = inner.store.begin_remotify(REMOTIFY_BATCH_PAGES);
            if out.is_empty() {
                break;
            }
            let started_bytes = compressed_bytes(&out);
            to_start = to_start.saturating_sub(started_bytes);
            in_flight += started_bytes;
            for (copies, batch) in by_copies(out, &inner.copies_wanted()) {
                let (inner, bytes) = (inner.clone(), compressed_bytes(&batch));
                batches.spawn(async move { (ship(inner, batch, copies).await, bytes) });
            }
        }
        match batches.join_next().await {
            Some(Ok((ok, bytes))) => {
                in_flight -= bytes;
                inner.room.notify_waiters();
                if !ok {
                    // No donor took it: give up this round; stores are
                    // refused until one can.
                    while batches.join_next().await.is_some() {}
                    inner.room.notify_waiters();
                    return false;
                }
            }
            Some(Err(e)) => warn!(reason = %e, "remotify batch task failed"),
            // Only a round cut short by time asks for another at once: one
            // that ran out of pages it may ship would spin.
            None => return out_of_time && still_to_shed(inner, pressure, 0) > 0,
        }
    }
}

/// What the store wants shipped beyond the `in_flight` bytes already
/// leaving (their local copies count as used until the donors ack).
fn still_to_shed(inner: &Inner, pressure: &mut Pressure, in_flight: u64) -> u64 {
    let st = inner.store.stats();
    match pressure.decide(
        &inner.watermarks,
        st.used_bytes,
        st.capacity_bytes,
        st.remote_bytes,
    ) {
        Movement::Remotify { bytes } => bytes.saturating_sub(in_flight),
        _ => 0,
    }
}

fn compressed_bytes(out: &[Outbound]) -> u64 {
    out.iter().map(|o| o.compressed.len() as u64).sum()
}

/// Puts one batch on `copies` donors; frees the local copies every one of
/// them acked. `false` if no set of donors could be found or all failed.
async fn ship(inner: Arc<Inner>, out: Vec<Outbound>, copies: usize) -> bool {
    let c = &inner.metrics.cluster;
    let total = compressed_bytes(&out);
    let donors = choose_donors(&inner.donor_views(), copies, total, &mut rand::rng());
    if donors.len() < copies {
        for o in &out {
            inner.store.abort_remotify(o.key, o.version);
        }
        ClusterCounters::add(&c.remotify_failures, 1);
        return false;
    }
    {
        let mut sent = inner.sent_since_heartbeat.lock();
        for &d in &donors {
            *sent.entry(d as NodeId).or_default() += total;
        }
    }
    let pages: Arc<Vec<DonatedPage>> = Arc::new(
        out.iter()
            .map(|o| DonatedPage {
                key: o.key,
                version: o.version,
                checksum: o.checksum,
                compressed: true,
                data: o.compressed.clone(),
            })
            .collect(),
    );
    let mut puts = JoinSet::new();
    for &d in &donors {
        let (inner, pages) = (inner.clone(), pages.clone());
        puts.spawn(async move {
            // Ok((run, statuses)): the donor's run the put went to.
            // Err((sent, why)): whether the put left before it failed.
            let r = async {
                let s = inner
                    .donor_session(d as NodeId)
                    .await
                    .map_err(|e| (false, e))?;
                inner.note_shipped(d, s.peer_incarnation());
                let statuses = s
                    .put_pages(&pages)
                    .await
                    .map_err(|e| (true, e.to_string()))?;
                Ok((s.peer_incarnation(), statuses))
            }
            .await;
            (d, r)
        });
    }
    // acked[i]: the donors that hold page i.
    let mut acked: Vec<Vec<u32>> = vec![Vec::new(); out.len()];
    // Donors that got the batch and never answered: they may hold it.
    let mut unanswered = Vec::new();
    let mut runs = Vec::new();
    while let Some(done) = puts.join_next().await {
        let Ok((d, r)) = done else { continue };
        match r {
            Ok((run, statuses)) => {
                runs.push((d, run));
                for (i, s) in statuses.iter().enumerate() {
                    if *s == PageStatus::Ok {
                        acked[i].push(d);
                    }
                }
            }
            Err((sent, e)) => {
                warn!(donor = d, reason = %e, "remotify put failed");
                if sent {
                    unanswered.push(d);
                }
            }
        }
    }
    let mut moved = 0;
    let mut moved_bytes = 0;
    let mut unwanted = Vec::new();
    // Recorded under the lock that strikes a donor's copies off: a donor
    // that came back empty since it acked holds nothing.
    let shipped = inner.shipped_runs();
    let gone = gone_since(&runs, |d| shipped.get(&d).copied());
    for (o, holders) in out.iter().zip(&mut acked) {
        holders.retain(|d| !gone.contains(d));
        let settled = settle_shipped(&donors, holders, &unanswered);
        let freed = match settled.record {
            Some(r) => inner.store.finish_remotify(o.key, o.version, r),
            None => {
                inner.store.abort_remotify(o.key, o.version);
                false
            }
        };
        if freed {
            moved += 1;
            moved_bytes += o.compressed.len() as u64;
        }
        if let Some(replicas) = settled.unwanted(freed) {
            unwanted.push(Released {
                key: o.key,
                version: o.version,
                replicas,
                placement: inner.endpoint.placement_mark(),
            });
        }
    }
    drop(shipped);
    ClusterCounters::add(&c.remotified_pages, moved);
    ClusterCounters::add(&c.remotified_bytes, moved_bytes);
    if moved < out.len() as u64 {
        ClusterCounters::add(&c.remotify_failures, 1);
    }
    if !unwanted.is_empty() {
        inner.release_backlog.lock().extend(unwanted);
    }
    moved > 0
}

/// The audit's driver: at most one step out at a time, sent from the movers
/// loop (where the placement mark is a floor) and answered in the
/// background, so a slow donor holds up nothing.
struct Audit {
    auditor: Auditor,
    out: Option<tokio::task::JoinHandle<(AuditAsk, Result<AuditStep, String>)>>,
}

impl Audit {
    async fn step(&mut self, inner: &Arc<Inner>) {
        if self.out.as_ref().is_some_and(|h| h.is_finished()) {
            let out = self.out.take().expect("finished");
            match out.await {
                Ok((ask, Ok(step))) => self.settle(inner, ask, step),
                Ok((ask, Err(e))) => {
                    debug!(donor = ask.donor, reason = %e, "audit step failed");
                    self.auditor.failed(ask.donor);
                }
                Err(e) => warn!(reason = %e, "audit task failed"),
            }
        }
        if self.out.is_some() {
            return;
        }
        let floor = inner.endpoint.placement_mark();
        let Some(ask) = self
            .auditor
            .next(Instant::now(), &inner.answering_donors(), floor)
        else {
            return;
        };
        let inner = inner.clone();
        self.out = Some(tokio::spawn(async move {
            let step = async {
                let s = inner.donor_session(ask.donor as NodeId).await?;
                match s
                    .audit_pages(ask.floor, ask.cursor, AUDIT_STEP_COPIES)
                    .await
                {
                    Ok(Ok(step)) => Ok(step),
                    Ok(Err(status)) => Err(format!("refused: {status:?}")),
                    Err(e) => Err(e.to_string()),
                }
            }
            .await;
            (ask, step)
        }));
    }

    /// Queues the releases an answered step calls for.
    fn settle(&mut self, inner: &Inner, ask: AuditAsk, step: AuditStep) {
        let unwanted = unwanted_copies(ask.donor, &step.pages, ask.floor, |c| {
            inner.store.lists_copy(c.key, c.version, ask.donor)
        });
        let c = &inner.metrics.cluster;
        ClusterCounters::add(&c.audited_copies, step.pages.len() as u64);
        if !unwanted.is_empty() {
            debug!(
                donor = ask.donor,
                copies = unwanted.len(),
                "audit found copies no page of ours names"
            );
            ClusterCounters::add(&c.audit_released_pages, unwanted.len() as u64);
            inner.release_backlog.lock().extend(unwanted);
        }
        self.auditor.answered(ask.donor, step.next);
    }
}

/// Once no page of ours is on any donor (`remote_pages`, from the store's
/// stats this round) and no release is owed, tells each
/// donor put to since it last forgot us to forget us (`release_owner`). A
/// donor keeps a tombstone for every page of ours released there, so that a
/// put overtaken by its release never resurrects the page; those would
/// otherwise stay, charged to our quota and its donation, until our next
/// incarnation. Nothing of ours can still be put meanwhile: remotify and
/// repair run in this same loop. (A put that went unanswered and lands
/// after the forget leaves a copy nobody refers to, until the next audit.)
async fn forget(inner: &Arc<Inner>, remote_pages: u64) {
    if remote_pages > 0
        || inner.unforgotten.lock().is_empty()
        || !inner.release_backlog.lock().is_empty()
    {
        return;
    }
    // Only donors that are up: dialling one that is gone would hold up
    // this loop for an RPC deadline. The others are asked once they are
    // back (or forget us when our incarnation changes).
    let up = inner.up_donors();
    let donors: Vec<u32> = inner
        .unforgotten
        .lock()
        .iter()
        .copied()
        .filter(|d| up.contains(d))
        .collect();
    for d in donors {
        let forgot = async {
            let s = inner.donor_session(d as NodeId).await?;
            s.release_owner().await.map_err(|e| e.to_string())
        }
        .await;
        match forgot {
            // WrongIncarnation: it knows a newer run of ours, which holds
            // nothing there either.
            Ok(_) => {
                inner.unforgotten.lock().remove(&d);
            }
            Err(e) => debug!(donor = d, reason = %e, "donor not told to forget us yet"),
        }
    }
}

/// Brings about `bytes` of remote pages home, hottest first, at the pace
/// the clients' activity allows.
async fn suction(inner: &Arc<Inner>, bytes: u64, pace: &mut SuctionPace) {
    let mut moved = 0u64;
    while moved < bytes {
        let step = pace.next(inner.store.accesses());
        let refs = inner.store.hottest_remote(step.pages);
        if refs.is_empty() {
            return;
        }
        let started = Instant::now();
        let before = inner
            .metrics
            .cluster
            .suctioned_bytes
            .load(Ordering::Relaxed);
        if bring_home(inner, &refs).await == 0 {
            return;
        }
        let after = inner
            .metrics
            .cluster
            .suctioned_bytes
            .load(Ordering::Relaxed);
        moved += after.saturating_sub(before);
        let rest = step.rest(started.elapsed());
        if !rest.is_zero() {
            tokio::time::sleep(rest).await;
        }
        // Leave the suction stop line to the watermarks: re-check the fill.
        if !inner.has_room_below(inner.watermarks.suction_stop) {
            return;
        }
    }
}

/// Fetches pages from their donors (one batch per donor) and installs them
/// in the store; the donors' copies are then released. Returns the pages
/// brought home.
pub(super) async fn bring_home(inner: &Arc<Inner>, refs: &[RemoteRef]) -> usize {
    let up = inner.up_donors();
    let mut by_donor: HashMap<u32, Vec<RemoteRef>> = HashMap::new();
    for r in refs {
        // A replica that is up; pages with none wait for a later round.
        if let Some(&d) = r.replicas.as_slice().iter().find(|d| up.contains(d)) {
            by_donor.entry(d).or_default().push(*r);
        }
    }
    let mut homed = 0;
    let mut page = Box::new([0u8; PAGE_BYTES]);
    for (donor, refs) in by_donor {
        for chunk in refs.chunks(PEER_BATCH_PAGES_MAX) {
            let asked: Vec<PageRef> = chunk
                .iter()
                .map(|r| PageRef {
                    key: r.key,
                    version: r.version,
                })
                .collect();
            let got = match inner.donor_session(donor as NodeId).await {
                Ok(s) => s.get_pages(&asked).await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            let got = match got {
                Ok(g) => g,
                Err(e) => {
                    debug!(donor, reason = %e, "suction fetch failed");
                    continue;
                }
            };
            let mut released = Vec::new();
            for (n, (r, g)) in chunk.iter().zip(got).enumerate() {
                if n > 0 && n % SUCTION_YIELD_PAGES == 0 {
                    // Checking and installing a whole batch is most of a
                    // millisecond of CPU: a client's load that arrives
                    // meanwhile goes first.
                    tokio::task::yield_now().await;
                }
                let Ok(p) = g else { continue };
                if !p.compressed || !decode_checked(true, &p.data, r.checksum, &mut page) {
                    warn!(donor, key = ?r.key, "a donor's copy failed its checksum");
                    continue;
                }
                if let Some(rel) = inner.store.install_fetched(r, &p.data) {
                    homed += 1;
                    ClusterCounters::add(&inner.metrics.cluster.suctioned_pages, 1);
                    ClusterCounters::add(
                        &inner.metrics.cluster.suctioned_bytes,
                        p.data.len() as u64,
                    );
                    released.push(rel);
                }
            }
            inner.release_backlog.lock().extend(released);
        }
    }
    release(inner).await;
    homed
}

/// Tells donors to drop copies that are no longer wanted; what cannot be
/// delivered now stays queued.
pub(super) async fn release(inner: &Arc<Inner>) {
    // Releases not stamped yet (the store's, pages brought home) were
    // decided since the last pass, after every put sent before now: they
    // cover those puts and no later one.
    let mark = inner.endpoint.placement_mark();
    let mut todo = inner.store.take_released();
    todo.append(&mut inner.release_backlog.lock());
    if todo.is_empty() {
        return;
    }
    for r in todo.iter_mut().filter(|r| r.placement == 0) {
        r.placement = mark;
    }
    // One release message covers one placement mark.
    let mut by_donor: HashMap<(u32, u64), Vec<&Released>> = HashMap::new();
    for r in &todo {
        for &d in r.replicas.as_slice() {
            by_donor.entry((d, r.placement)).or_default().push(r);
        }
    }
    let mut retry: Vec<Released> = Vec::new();
    // Up by heartbeat is enough: a draining or restarted donor takes no new
    // pages but must still hear of the copies it can drop.
    let reachable = inner.answering_donors();
    for ((donor, placement), items) in by_donor {
        // A donor that is not up keeps its releases queued rather than
        // stalling the movers on a connection attempt.
        let session = if !reachable.contains(&donor) {
            None
        } else {
            match inner.donor_session(donor as NodeId).await {
                Ok(s) => Some(s),
                Err(e) => {
                    debug!(donor, reason = %e, "release deferred");
                    None
                }
            }
        };
        for chunk in items.chunks(PEER_BATCH_PAGES_MAX) {
            let refs: Vec<PageRef> = chunk
                .iter()
                .map(|r| PageRef {
                    key: r.key,
                    version: r.version,
                })
                .collect();
            // Per page: whether the donor took the release. One it refused
            // (no room for the tombstone that must outlive a late put) is
            // sent again, like one that never arrived.
            let taken: Vec<bool> = match &session {
                Some(s) => match s.release_pages(&refs, placement).await {
                    Ok(statuses) => statuses.iter().map(|s| *s == PageStatus::Ok).collect(),
                    Err(_) => vec![false; refs.len()],
                },
                None => vec![false; refs.len()],
            };
            let released = taken.iter().filter(|t| **t).count();
            ClusterCounters::add(&inner.metrics.cluster.released_pages, released as u64);
            if released < refs.len()
                && let Some(one) = Replicas::new(&[donor])
            {
                retry.extend(chunk.iter().zip(&taken).filter(|(_, taken)| !**taken).map(
                    |(r, _)| Released {
                        replicas: one,
                        ..**r
                    },
                ));
            }
        }
    }
    if !retry.is_empty() {
        let mut backlog = inner.release_backlog.lock();
        backlog.extend(retry);
        if backlog.len() > RELEASE_BACKLOG_MAX {
            let excess = backlog.len() - RELEASE_BACKLOG_MAX;
            warn!(excess, "release backlog full; forgetting the oldest");
            backlog.drain(..excess);
        }
    }
}
