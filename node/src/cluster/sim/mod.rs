//! Deterministic simulation of the cluster's deciding logic.
//!
//! A seed draws a cluster (peers, memory servers, clients; capacities and
//! donations), a network (loss, long delays that reorder) and a fault
//! schedule (node crashes and restarts, nodes cut off for a while, donors
//! that want some or all of their memory back for a while), and
//! runs it on a simulated clock: one thread, one executor, every choice
//! drawn from the seed, so a failing seed replays exactly.
//!
//! **Real:** each owner's `PageStore` (compression, index, remote refs,
//! `begin/finish/abort_remotify`, `remote_on`, `set_replicas`, `strike_donor`,
//! `install_fetched`, releases), each node's `DonorStore` (incarnations,
//! versions, tombstones, limits), `PeerTable` liveness, and every decision
//! the node's movers take: `Pressure::decide`, `choose_donors`, the owner
//! core's (`cluster::owner`) `repair::{copies_lost, after_repair,
//! plan_group, fresh_candidates, settle_page, gone_since}`, `RepairState`,
//! `reclaim::reclaim_step`, `remotify::{by_copies, settle_shipped}`,
//! `fetch::{replica_order, look_again}` (a remote load's order and its
//! second look), `audit::{Auditor, unwanted_copies}` (anti-entropy), and
//! the donors' reclaim asks in their heartbeats
//! (`rpc::heartbeat_of`).
//!
//! **Modelled:** the glue around them ([`owner`] retells `movers.rs`,
//! `repair.rs` (reclaim included) and the remote-load and donor-view parts of `node.rs` step
//! for step over the simulated network, with smaller batches); QUIC
//! connections (a connection reaches one run of a peer; calls on it to a
//! run that crashed go unanswered until the deadline closes it); heartbeats
//! (every node to every node, no more than the spare bytes and the
//! incarnation); membership (fixed: every node a member; a restart is a new
//! incarnation, as `Register` gives). Messages are not encoded (the wire
//! codecs have their own tests).
//!
//! After every step (one event and the tasks it woke) the [`oracle`]
//! checks: (a) every accepted page is in its owner's index, local or on a
//! listed donor that holds exactly its version, unless R replicas of it
//! were lost to crashes; (b) no index, donor copy or load names older
//! bytes than the latest stored; (c) no donor over its donation, no owner
//! over its capacity. When faults stop and the network heals (half the
//! seeds leaving one donor wanting half its memory back for good), (d)
//! every remote page must be back on R live donors, and every donor within
//! its limit or holding no page an owner lists, within [`HEAL_MS_MAX`];
//! and (e) [`LEAK_SETTLE_MS`] after that, once the owners' audits
//! (`owner::audit`) walked their donors twice, no copy that no owner lists
//! is still on a donor and no donor keeps a tombstone of a release decided
//! before convergence.
//!
//! `RAMSTER_SIM_SEEDS=N` runs N seeds (default [`SEEDS_DEFAULT`]),
//! `RAMSTER_SIM_FIRST_SEED` shifts them, `RAMSTER_SIM_SEED=S` replays one
//! with its history.

mod exec;
mod oracle;
mod owner;
mod world;

use std::rc::Rc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::membership::Role;
use exec::Executor;
use world::{Faults, Sim, SimRef, Stats, World};

/// Seeds run by `cargo test` when `RAMSTER_SIM_SEEDS` is not set.
pub const SEEDS_DEFAULT: u64 = 1_000;
/// Faults happen during the first this many simulated ms.
pub const FAULT_MS: u64 = 12_000;
/// Then the cluster has this long to converge.
pub const HEAL_MS_MAX: u64 = 30_000;
/// How long after convergence copies no owner lists are looked at again:
/// those still there are leaked, and audits had that long to release them
/// and to clear the tombstones of releases decided before convergence.
const LEAK_SETTLE_MS: u64 = 5_000;
/// How often convergence is looked at once faults stopped.
const CONVERGE_POLL_MS: u64 = 100;
/// Replicas per remote page (the node's default).
const REPLICAS: usize = 2;
/// Most nodes down at once: more than R - 1, so that losses beyond the
/// redundancy happen too and must be told apart from bugs.
const DOWN_AT_ONCE_MAX: usize = 2;

/// How one seed ended.
pub struct Outcome {
    pub stats: Stats,
    /// A broken safety invariant: (a), (b) or (c).
    pub failure: Option<String>,
    /// Replicas did not converge (d).
    pub unconverged: Option<String>,
}

fn start_node(sim: &SimRef, n: usize, keys: u64) {
    let owns = with_world(sim, |w| w.nodes[n].owns());
    sim.exec.spawn(n, owner::heartbeats(sim.clone(), n));
    if owns {
        sim.exec.spawn(n, owner::movers(sim.clone(), n));
        sim.exec.spawn(n, owner::client(sim.clone(), n, keys));
        // A second client, so that loads overlap.
        sim.exec.spawn(n, owner::client(sim.clone(), n, keys));
    }
}

fn with_world<T>(sim: &SimRef, f: impl FnOnce(&mut World) -> T) -> T {
    world::with(sim, f)
}

/// Draws the cluster of `seed`.
fn build(seed: u64) -> (World, u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let faults = Faults {
        loss: rng.random_range(0.0..0.15),
        long_delay: rng.random_range(0.0..0.15),
        crash_every_ms: rng.random_range(800..4_000),
        partition_every_ms: rng.random_range(1_000..6_000),
        reclaim_every_ms: rng.random_range(1_500..6_000),
    };
    let mut w = World::new(rng.random(), faults, REPLICAS);
    let nodes = rng.random_range(5..=7);
    let mut roles: Vec<Role> = (0..nodes)
        .map(|_| match rng.random_range(0..10) {
            0..6 => Role::Peer,
            6..9 => Role::MemoryServer,
            _ => Role::Client,
        })
        .collect();
    // At least one owner; and for every owner, R + 1 other donors: one may
    // be down (or back empty) and repair still has somewhere to go.
    roles[0] = Role::Peer;
    while roles.iter().filter(|r| **r != Role::Client).count() < REPLICAS + 2 {
        let i = rng.random_range(1..nodes);
        roles[i] = Role::MemoryServer;
    }
    let keys = rng.random_range(64..=160);
    for role in roles {
        let capacity = rng.random_range(96..=192) << 10;
        let donate = match role {
            Role::MemoryServer => rng.random_range(512..=2048) << 10,
            Role::Peer => rng.random_range(128..=768) << 10,
            Role::Client => 0,
        };
        w.add_node(role, capacity, donate);
    }
    (w, keys)
}

/// Runs one seed to its end: converged, or the first broken invariant.
pub fn run(seed: u64) -> Outcome {
    let (world, keys) = build(seed);
    let sim: SimRef = Rc::new(Sim {
        world: std::cell::RefCell::new(world),
        exec: Executor::default(),
    });
    let nodes = with_world(&sim, |w| w.nodes.len());
    for n in 0..nodes {
        start_node(&sim, n, keys);
    }
    let (mut next_crash, mut next_partition, mut next_reclaim) = with_world(&sim, |w| {
        let (c, p, r) = (
            w.faults.crash_every_ms,
            w.faults.partition_every_ms,
            w.faults.reclaim_every_ms,
        );
        (
            w.rng.random_range(0..2 * c),
            w.rng.random_range(0..2 * p),
            w.rng.random_range(0..2 * r),
        )
    });
    let mut next_poll = FAULT_MS;
    let trace = std::env::var("RAMSTER_SIM_TRACE").ok().and_then(|t| {
        let (o, k) = t.split_once(':')?;
        Some((o.parse::<usize>().ok()? - 1, k.parse().ok()?))
    });
    with_world(&sim, |w| w.trace = trace);
    let mut traced = None;
    let mut ran = vec![false; nodes];
    let mut unconverged = None;
    // Once converged: when to look again for copies nobody lists, and what
    // was seen at convergence.
    let mut leak_check: Option<(u64, oracle::AtConvergence)> = None;
    let failure = loop {
        sim.exec.run_ready(&mut ran);
        let verdict = with_world(&sim, |w| {
            for (t, r) in w.touched.iter_mut().zip(ran.iter_mut()) {
                *t |= std::mem::take(r);
            }
            if let Some(f) = w.failure.take() {
                return Some(Err(f));
            }
            if let Some((o, index)) = w.trace {
                let now = w.nodes[o]
                    .owner
                    .as_ref()
                    .and_then(|s| s.store.peek(oracle::key(index)));
                let now =
                    now.map(|(c, r)| (c, r.map(|r| (r.version, r.replicas.as_slice().to_vec()))));
                if now != traced {
                    eprintln!("{} ms: index of n{}: {now:?}", w.now, o + 1);
                    traced = now;
                }
            }
            if let Err(f) = oracle::check_step(w) {
                return Some(Err(f));
            }
            None::<Result<(), String>>
        });
        if let Some(Err(f)) = verdict {
            break Some(f);
        }
        if let Some((_, seen)) = &mut leak_check {
            with_world(&sim, |w| oracle::prune_listed(w, seen));
        }
        let mut w = sim.world.borrow_mut();
        let next = w.next_at().expect("every node has a task asleep");
        if w.faulty {
            let fault_at = next_crash.min(next_partition).min(next_reclaim);
            if fault_at <= next && fault_at < FAULT_MS {
                w.now = w.now.max(fault_at);
                if fault_at == next_crash {
                    let c = w.faults.crash_every_ms;
                    next_crash += w.rng.random_range(c / 2..=c * 3 / 2);
                    let alive: Vec<usize> = (0..nodes).filter(|&n| w.nodes[n].alive).collect();
                    if nodes - alive.len() < DOWN_AT_ONCE_MAX {
                        let n = alive[w.rng.random_range(0..alive.len())];
                        // Some come back before peers call them down, some after.
                        let down_ms = w.rng.random_range(100..=5_000);
                        sim.exec.kill(n);
                        w.crash(n, down_ms);
                    }
                } else if fault_at == next_reclaim {
                    let r = w.faults.reclaim_every_ms;
                    next_reclaim += w.rng.random_range(r / 2..=r * 3 / 2);
                    // A donor wants some or all of its memory back for a
                    // while, always given back before faults stop.
                    let donors: Vec<usize> = (0..nodes)
                        .filter(|&n| w.nodes[n].alive && w.nodes[n].role != Role::Client)
                        .collect();
                    let n = donors[w.rng.random_range(0..donors.len())];
                    let permille = w.rng.random_range(0..=800);
                    let ms = w.rng.random_range(500..=4_000).min(FAULT_MS - 1 - w.now);
                    w.lower_limit(n, permille, Some(ms));
                } else {
                    let p = w.faults.partition_every_ms;
                    next_partition += w.rng.random_range(p / 2..=p * 3 / 2);
                    let n = w.rng.random_range(0..nodes);
                    let ms = w.rng.random_range(300..=4_000);
                    w.isolate(n, ms);
                }
                continue;
            }
            if next >= FAULT_MS {
                w.now = w.now.max(FAULT_MS);
                w.heal();
                // Half the seeds end with a donor that keeps wanting half
                // its memory back: convergence includes owners taking it.
                if w.rng.random_bool(0.5) {
                    let n = w.rng.random_range(0..nodes);
                    if w.nodes[n].role != Role::Client {
                        w.lower_limit(n, 500, None);
                    }
                }
                for n in w.down_nodes() {
                    w.revive(n);
                    drop(w);
                    start_node(&sim, n, keys);
                    w = sim.world.borrow_mut();
                }
                continue;
            }
        } else if w.now >= next_poll {
            next_poll = w.now + CONVERGE_POLL_MS;
            if let Some((due, seen)) = &leak_check {
                if w.now >= *due {
                    if let Err(why) = oracle::garbage_collected(&mut w, seen) {
                        unconverged = Some(format!("at {} ms: {why}", w.now));
                    }
                    break None;
                }
            } else {
                match oracle::converged(&w) {
                    Ok(()) => {
                        w.stats.converge_ms = w.now - FAULT_MS;
                        leak_check = Some((w.now + LEAK_SETTLE_MS, oracle::at_convergence(&w)));
                    }
                    Err(why) if w.now >= FAULT_MS + HEAL_MS_MAX => {
                        unconverged = Some(format!(
                            "at {} ms: not converged {HEAL_MS_MAX} ms after faults stopped: {why}",
                            w.now
                        ));
                        break None;
                    }
                    Err(_) => {}
                }
            }
        }
        if let Some(n) = w.step()
            && w.revive(n)
        {
            drop(w);
            start_node(&sim, n, keys);
        }
    };
    let mut w = sim.world.borrow_mut();
    let failure = failure.map(|f| format!("at {} ms, step {}: {f}", w.now, w.stats.steps));
    Outcome {
        stats: std::mem::take(&mut w.stats),
        failure,
        unconverged,
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}"))
    })
}

const REPLAY: &str = "cargo test -p ramster-node --release --lib cluster::sim";

/// Runs the seeds asked for by the environment; panics on the first
/// failure (and on a seed that did not converge, when `converge`).
fn run_seeds(test: &str, converge: bool) {
    let replay = format!("{REPLAY}::{test} -- --include-ignored");
    if let Some(seed) = env_u64("RAMSTER_SIM_SEED") {
        let started = Instant::now();
        let o = run(seed);
        eprintln!("seed {seed}: {:?} in {:?}", o.stats, started.elapsed());
        if let Some(f) = o.failure {
            panic!("seed {seed}: {f}");
        }
        if let Some(f) = o.unconverged.filter(|_| converge) {
            panic!("seed {seed}: {f}");
        }
        return;
    }
    let seeds = env_u64("RAMSTER_SIM_SEEDS").unwrap_or(SEEDS_DEFAULT);
    let first = env_u64("RAMSTER_SIM_FIRST_SEED").unwrap_or(0);
    let next = AtomicU64::new(first);
    let total = Mutex::new(Stats::default());
    let failures = Mutex::new(Vec::new());
    let unconverged = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= first + seeds {
                        return;
                    }
                    let o = run(seed);
                    total.lock().expect("stats").add(&o.stats);
                    if let Some(f) = o.failure {
                        failures.lock().expect("failures").push((seed, f));
                    }
                    if let Some(f) = o.unconverged {
                        unconverged.lock().expect("unconverged").push((seed, f));
                    }
                }
            });
        }
    });
    let t = total.into_inner().expect("stats");
    let mut failures = failures.into_inner().expect("failures");
    failures.sort();
    let mut unconverged = unconverged.into_inner().expect("unconverged");
    unconverged.sort();
    eprintln!(
        "{seeds} seeds in {:.1?}: {} failed, {} did not converge; {} steps, {} messages ({} lost, \
         {} delayed, {} reordered), {} crashes ({} of owners), {} partitions, {} reclaims; {} stores \
         ({} refused), {} loads ({} remote, {} unavailable, {} writethrough misses); {} remotified, {} brought home, {} repaired, \
         {} reclaimed, \
         {} stale puts refused; {} pages lost beyond R replicas; {} copies released by audits, \
         {} leaked; slowest convergence {} ms",
        started.elapsed(),
        failures.len(),
        unconverged.len(),
        t.steps,
        t.messages,
        t.lost,
        t.delayed,
        t.reordered,
        t.crashes,
        t.owner_crashes,
        t.partitions,
        t.reclaims,
        t.stores,
        t.rejected,
        t.loads,
        t.remote_loads,
        t.unavailable_loads,
        t.dropped_loads,
        t.remotified,
        t.suctioned,
        t.repaired,
        t.reclaimed,
        t.stale_puts,
        t.unrecoverable,
        t.audit_released,
        t.leaked_copies,
        t.converge_ms,
    );
    for (seed, f) in failures.iter().chain(&unconverged).take(8) {
        eprintln!("seed {seed}: {f}");
    }
    if let Some((seed, f)) = failures.first() {
        panic!(
            "{} of {seeds} seeds failed; first: seed {seed}: {f}\nreplay: RAMSTER_SIM_SEED={seed} {replay}",
            failures.len()
        );
    }
    if converge && let Some((seed, f)) = unconverged.first() {
        panic!(
            "{} of {seeds} seeds did not converge; first: seed {seed}: {f}\nreplay: RAMSTER_SIM_SEED={seed} {replay}",
            unconverged.len()
        );
    }
}

/// (a), (b), (c) on every step of every seed, and (d) once faults stop.
#[test]
fn no_accepted_page_is_lost_or_stale_and_replicas_converge() {
    run_seeds(
        "no_accepted_page_is_lost_or_stale_and_replicas_converge",
        true,
    );
}
