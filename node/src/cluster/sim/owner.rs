//! A simulated node's tasks: the movers (releases, repair, reclaim,
//! remotify, suction), remote loads, heartbeats and a client storing, overwriting,
//! invalidating and loading pages.
//!
//! This is the node's glue (`cluster::movers`, `cluster::repair`,
//! `cluster::node`) retold over the simulated network, step for step; every
//! decision in it is the node's own code: `Pressure::decide`,
//! `choose_donors`, the owner core's (`cluster::owner`)
//! `repair::{copies_lost, after_repair, plan_group, fresh_candidates,
//! settle_page, gone_since}`, `RepairState`, `reclaim::reclaim_step`,
//! `remotify::{by_copies, settle_shipped}`, `audit::{Auditor,
//! unwanted_copies}`, `fetch::{replica_order, ReplicaWalk,
//! look_again}`, and the real `PageStore` (`strike_donor` included) and
//! `DonorStore`.

use std::future::Future;
use std::pin::Pin;

use ramster_protocol::PEER_BATCH_PAGES_MAX;
use rand::{Rng, RngCore};
use xxhash_rust::xxh3::xxh3_64;

use super::exec::join_all;
use super::oracle::{self, key, retention_of};
use super::world::{
    OwnerSide, RPC_DEADLINE_MS, Reply, Request, SimRef, World, call, call_on, heartbeat_round,
    session, sleep, with,
};
use crate::cluster::donor::{DonatedPage, PageRef, PageStatus};
use crate::cluster::liveness::HEARTBEAT_INTERVAL_MS;
use crate::cluster::movers::MOVER_TICK_MS;
use crate::cluster::node::decode_checked;
use crate::cluster::owner::audit::{AuditPace, unwanted_copies};
use crate::cluster::owner::fetch::{
    LookAgain, RELOOKS_MAX, ReplicaWalk, look_again, replica_order,
};
use crate::cluster::owner::reclaim::reclaim_step;
use crate::cluster::owner::remotify::{by_copies, settle_shipped};
use crate::cluster::owner::repair::{
    self, AfterRepair, DonorSight, PassStart, PendingReleases, REPAIR_BATCH_PAGES,
    fresh_candidates, plan_group, settle_page,
};
use crate::cluster::placement::{DonorView, choose_donors};
use crate::cluster::status::Liveness;
use crate::cluster::watermarks::{Movement, Pressure, Watermarks};
use crate::store::{
    DonorId, LoadOutcome, Outbound, PAGE_BYTES, Page, Released, RemoteRef, Replicas, StoreOutcome,
};

/// Pages per remotify batch; smaller than the node's so that batches
/// interleave with everything else.
const REMOTIFY_BATCH_PAGES: usize = 8;
const REMOTIFY_BATCHES_IN_FLIGHT: usize = 3;
const SUCTION_BATCH_PAGES: usize = 8;
const REPAIR_CHUNK_PAGES: usize = 8;
const REPAIR_CHUNKS_IN_FLIGHT: usize = 3;
/// Audits pass often enough that a run's quiet end sees several, in small
/// steps, so that a walk spans puts, releases and crashes.
pub const AUDIT_PACE: AuditPace = AuditPace {
    pass_every: std::time::Duration::from_millis(1_000),
    step_every: std::time::Duration::from_millis(MOVER_TICK_MS),
};
const AUDIT_STEP_COPIES: usize = 32;
/// How long a remote load waits on a replica before it asks the next one.
const HEDGE_AFTER_MS: u64 = 20;

type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// A put's answer, or why there is none and whether it left first.
type PutAnswer = Result<Reply, (bool, String)>;

fn owner(w: &World, me: usize) -> &OwnerSide {
    w.nodes[me].owner.as_ref().expect("an owner")
}

fn owner_mut(w: &mut World, me: usize) -> &mut OwnerSide {
    w.nodes[me].owner.as_mut().expect("an owner")
}

fn node_of(d: DonorId) -> usize {
    d as usize - 1
}

/// `PeerSession::put_pages` stamping a put: the owner's next placement.
fn next_placement(w: &mut World, me: usize) -> u64 {
    let o = owner_mut(w, me);
    o.placements += 1;
    o.placements - 1
}

/// `Inner::sight`.
fn sight(w: &World, me: usize, d: DonorId) -> DonorSight {
    let o = owner(w, me);
    let name = &w.nodes[node_of(d)].name;
    DonorSight::Member {
        down: o.peers.state(name, w.instant()) == Liveness::Down,
        incarnation: o.peers.get(name).map_or(0, |r| r.heartbeat.incarnation),
        draining: false,
    }
}

/// `Inner::lost_donors`.
fn lost_donors(w: &World, me: usize) -> Vec<DonorId> {
    owner(w, me)
        .shipped
        .iter()
        .filter(|&(&d, &inc)| repair::copies_lost(inc, sight(w, me, d)))
        .map(|(&d, _)| d)
        .collect()
}

/// `Inner::forget_lost_copies`.
fn forget_lost_copies(w: &mut World, me: usize, lost: &[DonorId]) {
    for &d in lost {
        match repair::after_repair(sight(w, me, d)) {
            AfterRepair::Forget => {
                owner_mut(w, me).shipped.remove(&d);
            }
            AfterRepair::Holds(inc) => note_shipped(w, me, d, inc),
            AfterRepair::Keep => {}
        }
    }
}

/// `Inner::note_shipped`: a newer run of a donor came back empty, and
/// its copies are struck off. The oracle hears which of them were lost to
/// the donor's crash (a copy put on its new run is not).
fn note_shipped(w: &mut World, me: usize, d: DonorId, inc: u64) {
    match owner(w, me).shipped.get(&d) {
        None => {
            owner_mut(w, me).shipped.insert(d, inc);
        }
        Some(&had) if inc > had => {
            oracle::striking(w, me, d);
            let o = owner_mut(w, me);
            o.store.strike_donor(d);
            o.shipped.insert(d, inc);
            o.repair.struck();
        }
        Some(_) => {}
    }
}

/// `Inner::strike_restarted`.
fn strike_restarted(w: &mut World, me: usize) {
    let o = owner(w, me);
    let heard: Vec<(DonorId, u64)> = o
        .shipped
        .iter()
        .filter_map(|(&d, &had)| {
            let now = o
                .peers
                .get(&w.nodes[node_of(d)].name)?
                .heartbeat
                .incarnation;
            (now > had).then_some((d, now))
        })
        .collect();
    for (d, inc) in heard {
        note_shipped(w, me, d, inc);
    }
}

/// `repair::gone_since` against the owner's record of runs.
fn gone_since(w: &World, me: usize, runs: &[(DonorId, u64)]) -> Vec<DonorId> {
    let shipped = &owner(w, me).shipped;
    repair::gone_since(runs, |d| shipped.get(&d).copied())
}

/// `Inner::donor_views`.
fn donor_views(w: &World, me: usize) -> Vec<DonorView> {
    let lost = lost_donors(w, me);
    let o = owner(w, me);
    let now = w.instant();
    w.nodes
        .iter()
        .enumerate()
        .filter(|&(n, _)| n != me)
        .map(|(_, n)| {
            let spare = o
                .peers
                .get(&n.name)
                .map_or(0, |r| r.heartbeat.spare_bytes)
                .saturating_sub(o.sent_since_heartbeat.get(&n.id).copied().unwrap_or(0));
            DonorView {
                id: n.id,
                role: n.role,
                up: o.peers.state(&n.name, now) == Liveness::Up && !lost.contains(&n.id),
                draining: false,
                spare_bytes: spare,
                zone: None,
            }
        })
        .collect()
}

fn up_donors(w: &World, me: usize) -> Vec<DonorId> {
    donor_views(w, me)
        .into_iter()
        .filter(|v| v.up)
        .map(|v| v.id)
        .collect()
}

/// `Inner::answering_donors`: up by heartbeat, lost or not (a donor that
/// restarted still hears of the copies it can drop, and is audited).
fn answering_donors(w: &World, me: usize) -> Vec<DonorId> {
    let (o, now) = (owner(w, me), w.instant());
    w.nodes
        .iter()
        .enumerate()
        .filter(|&(n, node)| n != me && o.peers.state(&node.name, now) == Liveness::Up)
        .map(|(_, node)| node.id)
        .collect()
}

fn has_room_below(w: &World, me: usize, fill: f64) -> bool {
    let s = &owner(w, me).store;
    (s.used_bytes() as f64) < fill * s.capacity_bytes() as f64
}

fn refs_of<'a>(items: impl Iterator<Item = (&'a crate::store::PageKey, u64)>) -> Vec<PageRef> {
    items
        .map(|(k, version)| PageRef { key: *k, version })
        .collect()
}

pub async fn heartbeats(sim: SimRef, me: usize) {
    loop {
        sleep(&sim, HEARTBEAT_INTERVAL_MS).await;
        with(&sim, |w| heartbeat_round(w, me));
    }
}

/// `movers::run`.
pub async fn movers(sim: SimRef, me: usize) {
    let mut pressure = Pressure::default();
    let watermarks = Watermarks::default();
    loop {
        sleep(&sim, MOVER_TICK_MS).await;
        audit(&sim, me);
        release(&sim, me).await;
        repair(&sim, me).await;
        reclaim(&sim, me).await;
        let st = with(&sim, |w| owner(w, me).store.stats());
        match pressure.decide(
            &watermarks,
            st.used_bytes,
            st.capacity_bytes,
            st.remote_bytes,
        ) {
            Movement::Remotify { bytes } => remotify(&sim, me, bytes).await,
            Movement::Suction { bytes } => suction(&sim, me, bytes, &watermarks).await,
            Movement::Idle => {}
        }
    }
}

/// `movers::Audit::step`: sent between rounds, where no put is unanswered,
/// and settled by a task of its own when the answer comes.
fn audit(sim: &SimRef, me: usize) {
    let ask = with(sim, |w| {
        let (floor, donors, now) = (
            owner(w, me).placements,
            answering_donors(w, me),
            w.instant(),
        );
        owner_mut(w, me).auditor.next(now, &donors, floor)
    });
    let Some(ask) = ask else { return };
    let task_sim = sim.clone();
    sim.exec.spawn(me, async move {
        let sim = task_sim;
        let to = node_of(ask.donor);
        let req = Request::Audit {
            floor: ask.floor,
            cursor: ask.cursor,
            max: AUDIT_STEP_COPIES,
        };
        let got = match session(&sim, me, to).await {
            Ok(inc) => call_on(&sim, me, to, inc, req, RPC_DEADLINE_MS).await,
            Err(e) => Err(e),
        };
        with(&sim, |w| {
            let o = owner_mut(w, me);
            match got {
                Ok(Reply::Audit(Ok(Ok(step)))) => {
                    let unwanted = unwanted_copies(ask.donor, &step.pages, ask.floor, |c| {
                        o.store.lists_copy(c.key, c.version, ask.donor)
                    });
                    w.stats.audit_released += unwanted.len() as u64;
                    let o = owner_mut(w, me);
                    o.release_backlog.extend(unwanted);
                    o.auditor.answered(ask.donor, step.next);
                }
                _ => o.auditor.failed(ask.donor),
            }
        });
    });
}

/// `movers::release`.
async fn release(sim: &SimRef, me: usize) {
    let (todo, reachable) = with(sim, |w| {
        let o = owner_mut(w, me);
        let mut todo = o.store.take_released();
        todo.append(&mut o.release_backlog);
        for r in todo.iter_mut().filter(|r| r.placement == 0) {
            r.placement = o.placements;
        }
        (todo, answering_donors(w, me))
    });
    if todo.is_empty() {
        return;
    }
    let mut by_donor: std::collections::BTreeMap<(DonorId, u64), Vec<Released>> =
        Default::default();
    for r in &todo {
        for &d in r.replicas.as_slice() {
            by_donor.entry((d, r.placement)).or_default().push(*r);
        }
    }
    let mut retry = Vec::new();
    for ((donor, placement), items) in by_donor {
        let session = if reachable.contains(&donor) {
            session(sim, me, node_of(donor)).await.ok()
        } else {
            None
        };
        for chunk in items.chunks(PEER_BATCH_PAGES_MAX) {
            let refs = refs_of(chunk.iter().map(|r| (&r.key, r.version)));
            let ok = match session {
                Some(inc) => matches!(
                    call_on(
                        sim,
                        me,
                        node_of(donor),
                        inc,
                        Request::Release(placement, refs),
                        RPC_DEADLINE_MS
                    )
                    .await,
                    Ok(Reply::Release(Ok(_)))
                ),
                None => false,
            };
            if !ok {
                let one = Replicas::new(&[donor]).expect("one donor");
                retry.extend(chunk.iter().map(|r| Released {
                    replicas: one,
                    ..*r
                }));
            }
        }
    }
    with(sim, |w| owner_mut(w, me).release_backlog.extend(retry));
}

/// `repair::repair`.
async fn repair(sim: &SimRef, me: usize) {
    let (lost, start) = with(sim, |w| {
        strike_restarted(w, me);
        let mut lost = lost_donors(w, me);
        lost.sort_unstable();
        let start = owner_mut(w, me).repair.start(&lost);
        (lost, start)
    });
    match start {
        PassStart::Healthy => return,
        PassStart::Settled => {
            with(sim, |w| forget_lost_copies(w, me, &lost));
            return;
        }
        PassStart::Walk => {}
    }
    with(sim, |w| {
        owner(w, me).store.drop_droppable_on(&lost, u64::MAX)
    });
    loop {
        let refs = with(sim, |w| {
            owner(w, me)
                .store
                .remote_on(&lost, &[], w.replicas, REPAIR_BATCH_PAGES)
                .0
        });
        if refs.is_empty() {
            with(sim, |w| {
                owner_mut(w, me).repair.settle(&lost);
                forget_lost_copies(w, me, &lost);
            });
            return;
        }
        with(sim, |w| {
            let now = w.instant();
            owner_mut(w, me).repair.degraded_at(now);
        });
        if repair_batch(sim, me, &lost, &[], refs).await == 0 {
            return;
        }
    }
}

/// `repair::reclaim`: copies taken off donors that ask for memory back,
/// moved to other donors (read from the donor that asks) or brought home.
async fn reclaim(sim: &SimRef, me: usize) {
    for (donor, bytes) in with(sim, |w| reclaims(w, me)) {
        let refs = with(sim, |w| {
            let step = reclaim_step(&owner(w, me).store, donor, bytes);
            if step.dropped > 0 {
                w.stats.reclaimed += step.dropped;
                *owner_mut(w, me)
                    .reclaimed_since_heartbeat
                    .entry(donor)
                    .or_default() += step.dropped_bytes;
            }
            step.to_move
        });
        if refs.is_empty() {
            continue;
        }
        let total: u64 = refs.iter().map(|r| u64::from(r.len)).sum();
        let mut moved = repair_batch(sim, me, &[donor], &[donor], refs.clone()).await;
        if moved == 0 {
            moved = bring_home(sim, me, &refs).await.0;
        }
        if moved == 0 {
            continue;
        }
        with(sim, |w| {
            w.stats.reclaimed += moved;
            *owner_mut(w, me)
                .reclaimed_since_heartbeat
                .entry(donor)
                .or_default() += total * moved / refs.len() as u64;
        });
    }
}

/// `Inner::reclaims`: donors (up) that ask for bytes of our pages back,
/// less what was taken since their last heartbeat.
fn reclaims(w: &World, me: usize) -> Vec<(DonorId, u64)> {
    let o = owner(w, me);
    let now = w.instant();
    w.nodes
        .iter()
        .enumerate()
        .filter(|&(n, dn)| n != me && o.peers.state(&dn.name, now) == Liveness::Up)
        .filter_map(|(_, dn)| {
            let asked = o.peers.get(&dn.name)?.heartbeat.reclaim_bytes;
            let taken = o
                .reclaimed_since_heartbeat
                .get(&dn.id)
                .copied()
                .unwrap_or(0);
            let left = asked.saturating_sub(taken);
            (left > 0).then_some((dn.id, left))
        })
        .collect()
}

/// `repair::repair_batch`: the lost copies of `refs` re-created, read from
/// the survivors and from `readable` donors among the lost; the number of
/// pages repaired.
async fn repair_batch(
    sim: &SimRef,
    me: usize,
    lost: &[DonorId],
    readable: &[DonorId],
    refs: Vec<RemoteRef>,
) -> u64 {
    let pending = with(sim, |w| {
        PendingReleases::of(&owner(w, me).release_backlog, &refs)
    });
    // Groups in the order first seen (the node's map has no order).
    let mut groups: Vec<(Replicas, Vec<RemoteRef>)> = Vec::new();
    for r in refs {
        match groups.iter_mut().find(|(s, _)| *s == r.replicas) {
            Some((_, g)) => g.push(r),
            None => groups.push((r.replicas, vec![r])),
        }
    }
    // Chunks of a set, several at once (the node keeps a fixed number
    // in flight; here they go in waves).
    let chunks: Vec<(Replicas, Vec<RemoteRef>)> = groups
        .iter()
        .flat_map(|(set, refs)| refs.chunks(REPAIR_CHUNK_PAGES).map(|c| (*set, c.to_vec())))
        .collect();
    let mut repaired = 0;
    for wave in chunks.chunks(REPAIR_CHUNKS_IN_FLIGHT) {
        let running: Vec<Boxed<'_, u64>> = wave
            .iter()
            .map(|(set, refs)| {
                Box::pin(repair_group(sim, me, lost, readable, &pending, *set, refs))
                    as Boxed<'_, u64>
            })
            .collect();
        repaired += join_all(running).await.into_iter().sum::<u64>();
    }
    repaired
}

/// `repair::repair_group`.
async fn repair_group(
    sim: &SimRef,
    me: usize,
    lost: &[DonorId],
    readable: &[DonorId],
    pending: &PendingReleases,
    set: Replicas,
    refs: &[RemoteRef],
) -> u64 {
    let replicas = with(sim, |w| w.replicas);
    let plan = plan_group(set, lost, replicas);
    let Some(pages) = copies_from(sim, me, &plan.sources(readable), refs).await else {
        return 0;
    };
    let total: u64 = pages.iter().flatten().map(|p| p.data.len() as u64).sum();
    let fresh = with(sim, |w| {
        let o = owner(w, me);
        let mut shunned = pending.releasing_to(refs);
        shunned.extend(o.repair.refused_by(refs));
        let candidates = fresh_candidates(donor_views(w, me), set, lost, &shunned);
        choose_donors(&candidates, plan.need, total, &mut w.rng)
    });
    if fresh.len() < plan.need {
        return 0;
    }
    let donated: Vec<DonatedPage> = pages.into_iter().flatten().collect();
    if donated.is_empty() {
        return 0;
    }
    with(sim, |w| {
        for &d in &fresh {
            *owner_mut(w, me).sent_since_heartbeat.entry(d).or_default() += total;
        }
    });
    let mut acked: Vec<Vec<DonorId>> = vec![Vec::new(); donated.len()];
    let mut runs = Vec::new();
    let mut unanswered = Vec::new();
    for &d in &fresh {
        let put = async {
            let inc = session(sim, me, node_of(d)).await?;
            with(sim, |w| note_shipped(w, me, d, inc));
            runs.push((d, inc));
            call_on(
                sim,
                me,
                node_of(d),
                inc,
                Request::Put(with(sim, |w| next_placement(w, me)), donated.clone()),
                RPC_DEADLINE_MS,
            )
            .await
        }
        .await;
        match put {
            Ok(Reply::Put(Ok(statuses))) => with(sim, |w| {
                let state = &mut owner_mut(w, me).repair;
                for (i, s) in statuses.iter().enumerate() {
                    state.answered(donated[i].key, donated[i].version, d, *s);
                    if *s == PageStatus::Ok {
                        acked[i].push(d);
                    }
                }
            }),
            Err(_) if runs.last().is_some_and(|&(r, _)| r == d) => unanswered.push(d),
            _ => {}
        }
    }
    with(sim, |w| {
        let mut repaired = 0;
        let gone = gone_since(w, me, &runs);
        unanswered.retain(|d| !gone.contains(d));
        for (page, holders) in donated.iter().zip(&mut acked) {
            holders.retain(|d| !gone.contains(d));
            let r = refs
                .iter()
                .find(|r| r.key == page.key && r.version == page.version)
                .expect("asked for");
            let settle = settle_page(&plan, &fresh, holders, &unanswered);
            let o = owner_mut(w, me);
            let recorded = settle
                .record
                .is_some_and(|replicas| o.store.set_replicas(r, replicas));
            repaired += u64::from(recorded);
            if let Some(replicas) = settle.unwanted(recorded) {
                let placement = o.placements;
                o.release_backlog.push(Released {
                    key: r.key,
                    version: r.version,
                    replicas,
                    placement,
                });
            }
        }
        w.stats.repaired += repaired;
        repaired
    })
}

/// `repair::copies_from`.
async fn copies_from(
    sim: &SimRef,
    me: usize,
    survivors: &[DonorId],
    refs: &[RemoteRef],
) -> Option<Vec<Option<DonatedPage>>> {
    let wanted = refs_of(refs.iter().map(|r| (&r.key, r.version)));
    let mut scratch = Box::new([0u8; PAGE_BYTES]);
    for &d in survivors {
        let Ok(Reply::Get(Ok(got))) = call(sim, me, node_of(d), Request::Get(wanted.clone())).await
        else {
            continue;
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

/// `movers::remotify`.
async fn remotify(sim: &SimRef, me: usize, bytes: u64) {
    let mut shipped = 0u64;
    loop {
        let mut batches: Vec<Boxed<'static, bool>> = Vec::new();
        while shipped < bytes && batches.len() < REMOTIFY_BATCHES_IN_FLIGHT {
            let out = with(sim, |w| {
                owner(w, me).store.begin_remotify(REMOTIFY_BATCH_PAGES)
            });
            if out.is_empty() {
                break;
            }
            shipped += out.iter().map(|o| o.compressed.len() as u64).sum::<u64>();
            let wanted = with(sim, |w| owner(w, me).store.copies_wanted(w.replicas));
            for (copies, batch) in by_copies(out, &wanted) {
                batches.push(Box::pin(ship(sim.clone(), me, batch, copies)));
            }
        }
        if batches.is_empty() {
            return;
        }
        // As the node: a batch no donor took ends the round.
        if join_all(batches).await.contains(&false) {
            return;
        }
    }
}

/// `movers::ship`.
async fn ship(sim: SimRef, me: usize, out: Vec<Outbound>, copies: usize) -> bool {
    let total: u64 = out.iter().map(|o| o.compressed.len() as u64).sum();
    let donors = with(&sim, |w| {
        let views = donor_views(w, me);
        choose_donors(&views, copies, total, &mut w.rng)
    });
    if donors.len() < copies {
        with(&sim, |w| {
            for o in &out {
                owner(w, me).store.abort_remotify(o.key, o.version);
            }
        });
        return false;
    }
    with(&sim, |w| {
        for &d in &donors {
            *owner_mut(w, me).sent_since_heartbeat.entry(d).or_default() += total;
        }
    });
    let pages: Vec<DonatedPage> = out
        .iter()
        .map(|o| DonatedPage {
            key: o.key,
            version: o.version,
            checksum: o.checksum,
            compressed: true,
            data: o.compressed.clone(),
        })
        .collect();
    let puts: Vec<Boxed<'_, (DonorId, u64, PutAnswer)>> = donors
        .iter()
        .map(|&d| {
            let (sim, pages) = (&sim, pages.clone());
            Box::pin(async move {
                let mut run = 0;
                let r = async {
                    let inc = session(sim, me, node_of(d)).await.map_err(|e| (false, e))?;
                    with(sim, |w| note_shipped(w, me, d, inc));
                    run = inc;
                    call_on(
                        sim,
                        me,
                        node_of(d),
                        inc,
                        Request::Put(with(sim, |w| next_placement(w, me)), pages),
                        RPC_DEADLINE_MS,
                    )
                    .await
                    .map_err(|e| (true, e))
                }
                .await;
                (d, run, r)
            }) as Boxed<'_, _>
        })
        .collect();
    let mut acked: Vec<Vec<DonorId>> = vec![Vec::new(); out.len()];
    let mut unanswered = Vec::new();
    let mut runs = Vec::new();
    for (d, run, r) in join_all(puts).await {
        match r {
            Ok(Reply::Put(Ok(statuses))) => {
                runs.push((d, run));
                for (i, s) in statuses.iter().enumerate() {
                    if *s == PageStatus::Ok {
                        acked[i].push(d);
                    }
                }
            }
            Err((true, _)) => unanswered.push(d),
            _ => {}
        }
    }
    with(&sim, |w| {
        let mut moved = 0;
        let gone = gone_since(w, me, &runs);
        for (o, holders) in out.iter().zip(&mut acked) {
            holders.retain(|d| !gone.contains(d));
            let settled = settle_shipped(&donors, holders, &unanswered);
            let side = owner_mut(w, me);
            let freed = match settled.record {
                Some(r) => side.store.finish_remotify(o.key, o.version, r),
                None => {
                    side.store.abort_remotify(o.key, o.version);
                    false
                }
            };
            moved += u64::from(freed);
            if let Some(replicas) = settled.unwanted(freed) {
                let placement = side.placements;
                side.release_backlog.push(Released {
                    key: o.key,
                    version: o.version,
                    replicas,
                    placement,
                });
            }
        }
        w.stats.remotified += moved;
        moved > 0
    })
}

/// `movers::suction`.
async fn suction(sim: &SimRef, me: usize, bytes: u64, watermarks: &Watermarks) {
    let mut moved = 0u64;
    while moved < bytes {
        let refs = with(sim, |w| {
            owner(w, me).store.hottest_remote(SUCTION_BATCH_PAGES)
        });
        if refs.is_empty() {
            return;
        }
        let (homed, homed_bytes) = bring_home(sim, me, &refs).await;
        if homed == 0 {
            return;
        }
        moved += homed_bytes;
        if !with(sim, |w| has_room_below(w, me, watermarks.suction_stop)) {
            return;
        }
    }
}

/// `movers::bring_home`: the pages and bytes brought home.
async fn bring_home(sim: &SimRef, me: usize, refs: &[RemoteRef]) -> (u64, u64) {
    let up = with(sim, |w| up_donors(w, me));
    let mut by_donor: std::collections::BTreeMap<DonorId, Vec<RemoteRef>> = Default::default();
    for r in refs {
        if let Some(&d) = r.replicas.as_slice().iter().find(|d| up.contains(d)) {
            by_donor.entry(d).or_default().push(*r);
        }
    }
    let (mut homed, mut homed_bytes) = (0, 0);
    let mut page = Box::new([0u8; PAGE_BYTES]);
    for (donor, refs) in by_donor {
        for chunk in refs.chunks(PEER_BATCH_PAGES_MAX) {
            let asked = refs_of(chunk.iter().map(|r| (&r.key, r.version)));
            let Ok(Reply::Get(Ok(got))) = call(sim, me, node_of(donor), Request::Get(asked)).await
            else {
                continue;
            };
            for (r, g) in chunk.iter().zip(got) {
                let Ok(p) = g else { continue };
                if !p.compressed || !decode_checked(true, &p.data, r.checksum, &mut page) {
                    continue;
                }
                with(sim, |w| {
                    let side = owner_mut(w, me);
                    if let Some(rel) = side.store.install_fetched(r, &p.data) {
                        side.release_backlog.push(rel);
                        homed += 1;
                        homed_bytes += p.data.len() as u64;
                        w.stats.suctioned += 1;
                    }
                });
            }
        }
    }
    release(sim, me).await;
    (homed, homed_bytes)
}

/// What a simulated remote load answered.
enum Fetched {
    Page(Box<Page>),
    /// No good copy reached; the descriptor it last tried.
    Unavailable(RemoteRef),
    /// Invalidated while it was being loaded.
    Gone,
}

/// `Inner::fetch_many` for one page: the replicas the descriptor names,
/// then, if none had it, the page looked up again where the index says it
/// is now (home, or other donors) and fetched from there, at most
/// `RELOOKS_MAX` times.
async fn fetch(sim: &SimRef, me: usize, r: &RemoteRef) -> Fetched {
    let mut r = *r;
    let mut fetched = fetch_from_replicas(sim, me, &r).await;
    for _ in 0..RELOOKS_MAX {
        if fetched.is_some() {
            break;
        }
        let mut out = Box::new([0u8; PAGE_BYTES]);
        let now = with(sim, |w| owner(w, me).store.load(r.key, &mut out));
        match look_again(&r, now) {
            LookAgain::Home => return Fetched::Page(out),
            LookAgain::Gone => return Fetched::Gone,
            LookAgain::Moved(now) => r = now,
            // A simulated load has no corrupt answer.
            LookAgain::Unchanged | LookAgain::Corrupt => break,
        }
        fetched = fetch_from_replicas(sim, me, &r).await;
    }
    match fetched {
        Some(page) => Fetched::Page(page),
        None => Fetched::Unavailable(r),
    }
}

/// One page from the replicas `r` names: those that are up first, the
/// next one asked after the hedge delay, each copy checked. The page, or
/// `None`.
async fn fetch_from_replicas(sim: &SimRef, me: usize, r: &RemoteRef) -> Option<Box<Page>> {
    let order = with(sim, |w| {
        let o = owner(w, me);
        let now = w.instant();
        replica_order(r.replicas, |d| {
            o.peers.state(&w.nodes[node_of(d)].name, now)
        })
    });
    let mut out = Box::new([0u8; PAGE_BYTES]);
    let mut walk = ReplicaWalk::new(order);
    while let Some(d) = walk.next() {
        let hedged = walk.hedged();
        let deadline = if hedged {
            HEDGE_AFTER_MS
        } else {
            RPC_DEADLINE_MS
        };
        let asked = refs_of(std::iter::once((&r.key, r.version)));
        let got = async {
            let inc = session(sim, me, node_of(d)).await?;
            call_on(sim, me, node_of(d), inc, Request::Get(asked), deadline).await
        }
        .await;
        let page = match got {
            Ok(Reply::Get(Ok(mut got))) => got.pop().and_then(Result::ok),
            // No answer within the hedge delay: asked again later.
            Err(_) if hedged => {
                walk.slow();
                continue;
            }
            _ => None,
        };
        let Some(p) = page.filter(|p| decode_checked(p.compressed, &p.data, r.checksum, &mut out))
        else {
            walk.failed();
            continue;
        };
        // `Inner::install_if_room`.
        with(sim, |w| {
            if p.compressed && has_room_below(w, me, Watermarks::default().remotify_stop) {
                let side = owner_mut(w, me);
                if let Some(rel) = side.store.install_fetched(r, &p.data) {
                    side.release_backlog.push(rel);
                    w.stats.suctioned += 1;
                }
            }
        });
        return Some(out);
    }
    None
}

/// A page's bytes: a random head (its length by key, so pages fall in a
/// few size classes) and zeros, or now and then one repeated word (kept
/// as metadata, never remotified).
fn make_page(w: &mut World, index: u64) -> Box<Page> {
    let mut page = Box::new([0u8; PAGE_BYTES]);
    if w.rng.random_ratio(1, 16) {
        page.fill(w.rng.random());
        return page;
    }
    let head = [600, 1200, 2000][(index % 3) as usize];
    w.rng.fill_bytes(&mut page[..head]);
    page
}

fn fail(w: &mut World, why: String) {
    w.failure.get_or_insert(why);
}

/// A client of the owner: stores (new versions), invalidations, loads.
/// Once faults stop it only loads, so the cluster can settle.
pub async fn client(sim: SimRef, me: usize, keys: u64) {
    let mut page = Box::new([0u8; PAGE_BYTES]);
    loop {
        let pause = with(&sim, |w| w.rng.random_range(4..=20));
        sleep(&sim, pause).await;
        let remote = with(&sim, |w| client_step(w, me, keys, &mut page));
        let Some((index, r)) = remote else { continue };
        with(&sim, |w| {
            *owner_mut(w, me).busy.entry(index).or_default() += 1;
            w.stats.remote_loads += 1;
        });
        let got = fetch(&sim, me, &r).await;
        with(&sim, |w| {
            let busy = &mut owner_mut(w, me).busy;
            match busy.get_mut(&index) {
                Some(n) if *n > 1 => *n -= 1,
                _ => {
                    busy.remove(&index);
                }
            }
            let expected = w.oracle.expected(me, index);
            match (got, expected) {
                // As the front end does: the page is dropped, a miss.
                (Fetched::Unavailable(_), _) if r.retention.droppable() => {
                    owner(w, me).store.drop_unreachable(&r);
                    w.stats.dropped_loads += 1;
                }
                (Fetched::Unavailable(last), _) => {
                    w.stats.unavailable_loads += 1;
                    // Unreachable copies excuse it; a page that is home or
                    // listed elsewhere than where the load last looked
                    // was safe.
                    let now = owner(w, me).store.peek(key(index));
                    if let Some((_, where_now)) = now
                        && where_now != Some(last)
                    {
                        fail(
                            w,
                            format!(
                                "a load of {}'s page {index} answered unavailable; the page is {}",
                                w.nodes[me].name,
                                if where_now.is_none() {
                                    "at home"
                                } else {
                                    "on other donors"
                                }
                            ),
                        );
                    }
                }
                (Fetched::Gone, None) => {}
                // Dropped while it was loaded (its copy was lost, or a
                // donor wanted the memory back): a miss, the client's own
                // copy serves.
                (Fetched::Gone, Some(_)) if r.retention.droppable() => {}
                (Fetched::Gone, Some(_)) => fail(
                    w,
                    format!(
                        "a load of {}'s page {index} found it gone while it was never invalidated",
                        w.nodes[me].name
                    ),
                ),
                (Fetched::Page(p), Some(e)) if xxh3_64(&p[..]) == e.checksum => {}
                (Fetched::Page(_), _) => fail(
                    w,
                    format!(
                        "stale read: a remote load of {}'s page {index} returned other bytes than the latest stored",
                        w.nodes[me].name
                    ),
                ),
            }
        });
    }
}

/// One client operation; a load of a remote page is handed back to be
/// fetched.
fn client_step(w: &mut World, me: usize, keys: u64, out: &mut Page) -> Option<(u64, RemoteRef)> {
    let index = w.rng.random_range(0..keys);
    let roll = w.rng.random_range(0..100);
    if w.rng.random_ratio(1, 300) {
        let o = owner_mut(w, me);
        o.filling = !o.filling;
    }
    let filling = owner(w, me).filling;
    let (store_below, invalidate_below) = match (w.faulty, filling) {
        (false, _) => (0, 0),
        (true, true) => (55, 62),
        (true, false) => (8, 45),
    };
    if roll < invalidate_below && owner(w, me).busy.contains_key(&index) {
        return None;
    }
    let name = w.nodes[me].name.clone();
    if roll < store_below {
        let page = make_page(w, index);
        let checksum = xxh3_64(&page[..]);
        w.stats.stores += 1;
        match owner(w, me)
            .store
            .store(key(index), &page, retention_of(index))
        {
            StoreOutcome::Accepted => w.oracle.accepted(me, index, checksum),
            StoreOutcome::Rejected(_) => {
                w.stats.rejected += 1;
                w.oracle.dropped(me, index);
            }
        }
        return None;
    }
    if roll < invalidate_below {
        owner(w, me).store.invalidate(key(index));
        w.oracle.dropped(me, index);
        return None;
    }
    w.stats.loads += 1;
    let expected = w.oracle.expected(me, index);
    match (owner(w, me).store.load(key(index), out), expected) {
        (LoadOutcome::Remote(r), Some(_)) => return Some((index, r)),
        (LoadOutcome::Hit, Some(e)) if xxh3_64(&out[..]) == e.checksum => {}
        (LoadOutcome::Miss, None) => {}
        (LoadOutcome::Miss, Some(e)) if e.excused => {}
        // Dropped (evicted, or its copy lost): the client's own copy serves.
        (LoadOutcome::Miss, Some(_)) if retention_of(index).droppable() => {}
        (outcome, expected) => fail(
            w,
            format!(
                "load of {name}'s page {index}: {outcome:?}, expected {}",
                if expected.is_some() {
                    "the latest bytes stored"
                } else {
                    "nothing (never stored, invalidated or refused)"
                }
            ),
        ),
    }
    None
}
