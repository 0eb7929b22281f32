//! The simulated cluster: a clock, the nodes (their real page and donor
//! stores, and what each knows of its peers), and a network that loses,
//! delays and reorders messages and cuts nodes off.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use ramster_protocol::peer::Heartbeat;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::exec::{Executor, Filled, SlotRef, fill, slot};
use super::oracle::Oracle;
use crate::cluster::donor::{
    AuditStep, DonatedPage, DonorConfig, DonorError, DonorStore, PageRef, PageStatus,
};
use crate::cluster::liveness::{LivenessTimings, PeerTable};
use crate::cluster::membership::Role;
use crate::cluster::owner::audit::Auditor;
use crate::cluster::owner::repair::RepairState;
use crate::cluster::rpc::heartbeat_of;
use crate::store::{DonorId, PageStore, Released, StoreConfig};

/// How long an owner waits for a donor's answer.
pub const RPC_DEADLINE_MS: u64 = 200;
/// A connection takes a round trip to set up.
const CONNECT_MS: u64 = 2;

/// A peer request, as the donor store takes it.
pub enum Request {
    /// Pages, put with the owner's placement number.
    Put(u64, Vec<DonatedPage>),
    Get(Vec<PageRef>),
    /// Releases covering the owner's puts below the placement mark.
    Release(u64, Vec<PageRef>),
    /// An audit step: the owner's floor, where the listing goes on, and
    /// most copies to list.
    Audit {
        floor: u64,
        cursor: u64,
        max: usize,
    },
}

pub enum Reply {
    Put(Result<Vec<PageStatus>, DonorError>),
    Get(Result<Vec<Result<DonatedPage, PageStatus>>, DonorError>),
    Release(Result<Vec<PageStatus>, DonorError>),
    Audit(Result<Result<AuditStep, PageStatus>, DonorError>),
}

enum Body {
    Request { rpc: u64, req: Request },
    Reply { rpc: u64, reply: Reply },
    Heartbeat(Heartbeat),
    HeartbeatAnswer(Heartbeat),
}

struct Message {
    from: usize,
    from_incarnation: u64,
    to: usize,
    /// The receiver's incarnation the sender's connection reached; 0 for a
    /// heartbeat, which finds whatever run is there.
    to_incarnation: u64,
    /// Send order on the (from, to) pair, to count reorders.
    order: u64,
    body: Body,
}

enum Event {
    /// Boxed: a message is several times any other event.
    Deliver(Box<Message>),
    Timer(SlotRef<()>),
    RpcDeadline(u64),
    Restart(usize),
    /// A donor's donation limit changes (a reclaim starts or ends).
    Limit(usize, u64),
    /// A cut-off node is reachable again (only the clock needs to get there).
    Rejoin,
}

/// How faulty the network and the nodes are.
#[derive(Clone, Debug)]
pub struct Faults {
    pub loss: f64,
    pub long_delay: f64,
    /// Mean time between crashes and between partitions, in ms; 0: none.
    pub crash_every_ms: u64,
    pub partition_every_ms: u64,
    /// Mean time between donors asking for memory back, in ms.
    pub reclaim_every_ms: u64,
}

/// What happened in a run, summed over seeds in the report.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub steps: u64,
    pub messages: u64,
    pub lost: u64,
    pub delayed: u64,
    pub reordered: u64,
    pub crashes: u64,
    pub owner_crashes: u64,
    pub partitions: u64,
    /// Donation limits lowered below what a donor held.
    pub reclaims: u64,
    pub stores: u64,
    pub rejected: u64,
    pub loads: u64,
    pub remote_loads: u64,
    pub unavailable_loads: u64,
    /// Remote loads of writethrough pages that reached no copy: the page
    /// was dropped and the load answered a miss.
    pub dropped_loads: u64,
    pub remotified: u64,
    pub suctioned: u64,
    pub repaired: u64,
    /// Copies moved off a donor (or brought home) because it asked.
    pub reclaimed: u64,
    pub stale_puts: u64,
    /// Pages whose every replica was lost to crashes before repair could
    /// copy them (allowed: more than R - 1 failures).
    pub unrecoverable: u64,
    /// Donor copies no owner lists, seen at convergence and still there
    /// `LEAK_SETTLE_MS` later (garbage, not in-flight work).
    pub leaked_copies: u64,
    /// Copies audits found that no index named, and released.
    pub audit_released: u64,
    pub converge_ms: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.steps += o.steps;
        self.messages += o.messages;
        self.lost += o.lost;
        self.delayed += o.delayed;
        self.reordered += o.reordered;
        self.crashes += o.crashes;
        self.owner_crashes += o.owner_crashes;
        self.partitions += o.partitions;
        self.reclaims += o.reclaims;
        self.stores += o.stores;
        self.rejected += o.rejected;
        self.loads += o.loads;
        self.remote_loads += o.remote_loads;
        self.unavailable_loads += o.unavailable_loads;
        self.dropped_loads += o.dropped_loads;
        self.remotified += o.remotified;
        self.suctioned += o.suctioned;
        self.repaired += o.repaired;
        self.reclaimed += o.reclaimed;
        self.stale_puts += o.stale_puts;
        self.unrecoverable += o.unrecoverable;
        self.leaked_copies += o.leaked_copies;
        self.audit_released += o.audit_released;
        self.converge_ms = self.converge_ms.max(o.converge_ms);
    }
}

/// The owner side of a node: what `cluster::node::Inner` keeps.
pub struct OwnerSide {
    pub store: PageStore,
    pub peers: PeerTable,
    pub shipped: BTreeMap<DonorId, u64>,
    pub sent_since_heartbeat: BTreeMap<DonorId, u64>,
    pub reclaimed_since_heartbeat: BTreeMap<DonorId, u64>,
    pub release_backlog: Vec<Released>,
    /// The placement number the next put carries (`PeerEndpoint`'s).
    pub placements: u64,
    pub repair: RepairState,
    pub auditor: Auditor,
    /// Keys loads are fetching (how many loads each); the client leaves
    /// them alone meanwhile, so a load's answer has one right value.
    pub busy: BTreeMap<u64, u32>,
    /// Filling (mostly stores) or draining (mostly invalidations).
    pub filling: bool,
}

pub struct Node {
    pub id: DonorId,
    pub name: String,
    pub role: Role,
    pub alive: bool,
    pub incarnation: u64,
    /// Cut off from every other node until then.
    pub isolated_until: u64,
    pub capacity_bytes: u64,
    pub donor: DonorStore,
    pub owner: Option<OwnerSide>,
    /// Open connections: peer → the incarnation it reached. A connection
    /// to a run that has since crashed stays until a call on it fails.
    pub sessions: BTreeMap<usize, u64>,
}

impl Node {
    pub fn owns(&self) -> bool {
        self.role != Role::MemoryServer
    }
}

pub struct World {
    pub now: u64,
    start: Instant,
    seq: u64,
    events: BTreeMap<(u64, u64), Event>,
    pub rng: SmallRng,
    pub nodes: Vec<Node>,
    pub faults: Faults,
    pub faulty: bool,
    pub replicas: usize,
    pub stats: Stats,
    pub oracle: Oracle,
    /// The first invariant a task saw broken.
    pub failure: Option<String>,
    /// Owners whose pages may have changed since the last check: their
    /// tasks ran, a donor applied one of their requests, or a node crashed.
    pub touched: Vec<bool>,
    /// (owner node, key index) whose history is printed (replays only).
    pub trace: Option<(usize, u64)>,
    next_rpc: u64,
    rpcs: BTreeMap<u64, SlotRef<Result<Reply, String>>>,
    order: BTreeMap<(usize, usize), (u64, u64)>,
}

/// The simulation: the world and the tasks running in it.
pub struct Sim {
    pub world: RefCell<World>,
    pub exec: Executor,
}

pub type SimRef = Rc<Sim>;

impl World {
    pub fn new(seed: u64, faults: Faults, replicas: usize) -> World {
        World {
            now: 0,
            start: Instant::now(),
            seq: 0,
            events: BTreeMap::new(),
            rng: SmallRng::seed_from_u64(seed),
            nodes: Vec::new(),
            faults,
            faulty: true,
            replicas,
            stats: Stats::default(),
            oracle: Oracle::default(),
            failure: None,
            touched: Vec::new(),
            trace: None,
            next_rpc: 0,
            rpcs: BTreeMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// The simulated time as the liveness table reads it.
    pub fn instant(&self) -> Instant {
        self.start + Duration::from_millis(self.now)
    }

    pub fn add_node(&mut self, role: Role, capacity_bytes: u64, donate_bytes: u64) {
        let id = self.nodes.len() as DonorId + 1;
        self.nodes.push(Node {
            id,
            name: format!("n{id}"),
            role,
            alive: true,
            incarnation: 1,
            isolated_until: 0,
            capacity_bytes,
            donor: DonorStore::new(DonorConfig::with_donation(donate_bytes)),
            owner: None,
            sessions: BTreeMap::new(),
        });
        self.reset_owner(self.nodes.len() - 1);
        self.touched.push(true);
    }

    /// A node's owner side as a fresh run finds it: empty.
    /// What node `n` tells peers of itself, its incarnation included.
    fn heartbeat_of(&self, n: usize, to: usize) -> Heartbeat {
        let mut hb = heartbeat_of(&self.nodes[n].donor, &self.nodes[to].name);
        hb.incarnation = self.nodes[n].incarnation;
        hb
    }

    fn reset_owner(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        node.owner = node.owns().then(|| OwnerSide {
            store: PageStore::new(StoreConfig {
                capacity_bytes: node.capacity_bytes,
                shards: 4,
            }),
            peers: PeerTable::new(LivenessTimings::default()),
            shipped: BTreeMap::new(),
            sent_since_heartbeat: BTreeMap::new(),
            reclaimed_since_heartbeat: BTreeMap::new(),
            release_backlog: Vec::new(),
            placements: 1,
            repair: RepairState::default(),
            auditor: Auditor::new(super::owner::AUDIT_PACE),
            busy: BTreeMap::new(),
            filling: true,
        });
    }

    fn schedule(&mut self, at: u64, e: Event) {
        self.seq += 1;
        self.events.insert((at, self.seq), e);
    }

    /// When the next event is due.
    pub fn next_at(&self) -> Option<u64> {
        self.events.keys().next().map(|(t, _)| *t)
    }

    fn cut_off(&self, a: usize, b: usize) -> bool {
        self.nodes[a].isolated_until > self.now || self.nodes[b].isolated_until > self.now
    }

    fn send(&mut self, from: usize, to: usize, to_incarnation: u64, body: Body) {
        self.stats.messages += 1;
        let pair = self.order.entry((from, to)).or_default();
        pair.0 += 1;
        let order = pair.0;
        if self.cut_off(from, to) || (self.faulty && self.rng.random_bool(self.faults.loss)) {
            self.stats.lost += 1;
            return;
        }
        let delay = if self.faulty && self.rng.random_bool(self.faults.long_delay) {
            self.stats.delayed += 1;
            self.rng.random_range(20..=400)
        } else {
            self.rng.random_range(1..=4)
        };
        let m = Message {
            from,
            from_incarnation: self.nodes[from].incarnation,
            to,
            to_incarnation,
            order,
            body,
        };
        self.schedule(self.now + delay, Event::Deliver(Box::new(m)));
    }

    pub fn sleep(&mut self, ms: u64) -> Filled<()> {
        let s = slot();
        self.schedule(self.now + ms, Event::Timer(s.clone()));
        Filled(s)
    }

    /// The connection from `from` to `to`: the incarnation it reached.
    fn session(&mut self, from: usize, to: usize) -> Result<u64, String> {
        if let Some(&inc) = self.nodes[from].sessions.get(&to) {
            return Ok(inc);
        }
        let reachable = self.nodes[to].alive
            && !self.cut_off(from, to)
            && !(self.faulty && self.rng.random_bool(self.faults.loss));
        if !reachable {
            return Err(format!("cannot connect to {}", self.nodes[to].name));
        }
        let inc = self.nodes[to].incarnation;
        self.nodes[from].sessions.insert(to, inc);
        Ok(inc)
    }

    fn apply(&mut self, e: Event) {
        match e {
            Event::Timer(s) => fill(&s, ()),
            Event::RpcDeadline(rpc) => {
                if let Some(s) = self.rpcs.remove(&rpc) {
                    fill(&s, Err("deadline passed".into()));
                }
            }
            Event::Deliver(m) => self.deliver(*m),
            Event::Limit(n, bytes) => {
                self.nodes[n].donor.set_limit(bytes);
            }
            Event::Restart(_) | Event::Rejoin => unreachable!("handled by the driver"),
        }
    }

    fn deliver(&mut self, m: Message) {
        let to = &self.nodes[m.to];
        let dead_end = !to.alive
            || self.cut_off(m.from, m.to)
            || (m.to_incarnation != 0 && m.to_incarnation != to.incarnation);
        if dead_end {
            self.stats.lost += 1;
            return;
        }
        let pair = self.order.entry((m.from, m.to)).or_default();
        if m.order < pair.1 {
            self.stats.reordered += 1;
        }
        pair.1 = pair.1.max(m.order);
        let now = self.instant();
        match m.body {
            Body::Request { rpc, req } => {
                self.touched[m.from] = true;
                let owner = self.nodes[m.from].name.clone();
                let inc = m.from_incarnation;
                let reply = self.serve(m.to, &owner, m.from, inc, req);
                self.send(m.to, m.from, m.from_incarnation, Body::Reply { rpc, reply });
            }
            Body::Reply { rpc, reply } => {
                if let Some(s) = self.rpcs.remove(&rpc) {
                    fill(&s, Ok(reply));
                }
            }
            Body::Heartbeat(hb) => {
                // As the control handler does: the heartbeat names its run.
                let from = self.nodes[m.from].name.clone();
                self.nodes[m.to]
                    .donor
                    .owner_restarted(&from, hb.incarnation);
                if let Some(o) = &mut self.nodes[m.to].owner {
                    o.peers.record(&from, now, hb, None);
                }
                let answer = self.heartbeat_of(m.to, m.from);
                self.send(
                    m.to,
                    m.from,
                    m.from_incarnation,
                    Body::HeartbeatAnswer(answer),
                );
            }
            Body::HeartbeatAnswer(hb) => {
                let name = self.nodes[m.from].name.clone();
                let id = self.nodes[m.from].id;
                self.nodes[m.to]
                    .donor
                    .owner_restarted(&name, hb.incarnation);
                if let Some(o) = &mut self.nodes[m.to].owner {
                    o.peers.record(&name, now, hb, None);
                    o.sent_since_heartbeat.remove(&id);
                    o.reclaimed_since_heartbeat.remove(&id);
                }
            }
        }
    }

    /// The donor side of node `d` answers `owner`.
    fn serve(
        &mut self,
        d: usize,
        owner: &str,
        owner_node: usize,
        owner_incarnation: u64,
        req: Request,
    ) -> Reply {
        let donor_incarnation = self.nodes[d].incarnation;
        if let Some((o, index)) = self.trace
            && o == owner_node
        {
            let (op, items): (&str, Vec<(u64, u64)>) = match &req {
                Request::Put(_, p) => ("put", p.iter().map(|p| (p.key.index, p.version)).collect()),
                Request::Get(r) => ("get", r.iter().map(|r| (r.key.index, r.version)).collect()),
                Request::Release(_, r) => (
                    "release",
                    r.iter().map(|r| (r.key.index, r.version)).collect(),
                ),
                Request::Audit { .. } => ("audit", Vec::new()),
            };
            for (i, v) in items {
                if i == index {
                    eprintln!(
                        "{} ms: {} (incarnation {donor_incarnation}) applies {op} v{v}",
                        self.now, self.nodes[d].name
                    );
                }
            }
        }
        let store = &mut self.nodes[d].donor;
        match req {
            Request::Put(placement, pages) => {
                let r = store.put(owner, owner_incarnation, placement, &pages);
                if let Ok(statuses) = &r {
                    for (p, s) in pages.iter().zip(statuses) {
                        match s {
                            PageStatus::Ok => self.oracle.placed(
                                d,
                                owner_node,
                                owner_incarnation,
                                p,
                                donor_incarnation,
                            ),
                            PageStatus::StaleVersion => self.stats.stale_puts += 1,
                            _ => {}
                        }
                    }
                }
                Reply::Put(r)
            }
            Request::Get(refs) => Reply::Get(store.get(owner, owner_incarnation, &refs)),
            Request::Release(placement, refs) => {
                Reply::Release(store.release(owner, owner_incarnation, placement, &refs))
            }
            Request::Audit { floor, cursor, max } => {
                Reply::Audit(store.audit(owner, owner_incarnation, floor, cursor, max))
            }
        }
    }

    /// Crashes node `n`: its tasks are dropped by the caller; its memory is
    /// gone; it comes back after `down_ms` as a new incarnation.
    pub fn crash(&mut self, n: usize, down_ms: u64) {
        if self.trace.is_some() {
            eprintln!(
                "{} ms: {} crashes for {down_ms} ms",
                self.now, self.nodes[n].name
            );
        }
        self.stats.crashes += 1;
        if self.nodes[n].owns() {
            self.stats.owner_crashes += 1;
        }
        let node = &mut self.nodes[n];
        node.alive = false;
        node.incarnation += 1;
        node.sessions.clear();
        let donate = node.donor.config().donate_bytes;
        node.donor = DonorStore::new(DonorConfig::with_donation(donate));
        self.oracle.owner_restarted(n);
        self.touched.fill(true);
        self.reset_owner(n);
        self.schedule(self.now + down_ms, Event::Restart(n));
    }

    pub fn isolate(&mut self, n: usize, ms: u64) {
        self.stats.partitions += 1;
        self.nodes[n].isolated_until = self.now + ms;
        self.schedule(self.now + ms, Event::Rejoin);
    }

    /// Donor `n` wants memory back: its limit drops to `permille` of what
    /// it holds, until `for_ms` have passed (for good with `None`). A crash
    /// in between brings it back with its whole donation anyway.
    pub fn lower_limit(&mut self, n: usize, permille: u64, for_ms: Option<u64>) {
        let donor = &mut self.nodes[n].donor;
        let held = donor.donated_bytes();
        if held == 0 {
            return;
        }
        self.stats.reclaims += 1;
        donor.set_limit(held * permille / 1000);
        if let Some(ms) = for_ms {
            let donate = donor.config().donate_bytes;
            self.schedule(self.now + ms, Event::Limit(n, donate));
        }
        if self.trace.is_some() {
            eprintln!(
                "{} ms: {} lowers its limit to {} bytes (holds {held})",
                self.now,
                self.nodes[n].name,
                self.nodes[n].donor.limit_bytes()
            );
        }
    }

    /// Faults stop: every node is back and reachable, no message is lost.
    pub fn heal(&mut self) {
        self.faulty = false;
        for n in &mut self.nodes {
            n.isolated_until = 0;
        }
    }

    /// Takes the next event; restarts go to the driver (they spawn tasks).
    pub fn step(&mut self) -> Option<usize> {
        let ((at, _), e) = self.events.pop_first()?;
        self.now = self.now.max(at);
        self.stats.steps += 1;
        match e {
            Event::Restart(n) => Some(n),
            Event::Rejoin => None,
            e => {
                self.apply(e);
                None
            }
        }
    }

    /// Brings a crashed node back now (the driver spawns its tasks).
    pub fn revive(&mut self, n: usize) -> bool {
        if self.nodes[n].alive {
            return false;
        }
        self.nodes[n].alive = true;
        true
    }

    pub fn down_nodes(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&n| !self.nodes[n].alive)
            .collect()
    }
}

/// Runs `f` on the world; never across an await.
pub fn with<T>(sim: &SimRef, f: impl FnOnce(&mut World) -> T) -> T {
    f(&mut sim.world.borrow_mut())
}

pub async fn sleep(sim: &SimRef, ms: u64) {
    let wait = with(sim, |w| w.sleep(ms));
    wait.await
}

/// Sends a heartbeat from `from` to every other node.
pub fn heartbeat_round(w: &mut World, from: usize) {
    for to in 0..w.nodes.len() {
        if to != from {
            let hb = w.heartbeat_of(from, to);
            w.send(from, to, 0, Body::Heartbeat(hb));
        }
    }
}

/// One request from `from` to `to` over their connection: the reply, or
/// why there is none (no connection, the deadline passed).
pub async fn call(sim: &SimRef, from: usize, to: usize, req: Request) -> Result<Reply, String> {
    let incarnation = session(sim, from, to).await?;
    call_on(sim, from, to, incarnation, req, RPC_DEADLINE_MS).await
}

/// The connection from `from` to `to`, made if needed: the incarnation of
/// `to` it reached.
pub async fn session(sim: &SimRef, from: usize, to: usize) -> Result<u64, String> {
    let known = with(sim, |w| w.nodes[from].sessions.get(&to).copied());
    if let Some(inc) = known {
        return Ok(inc);
    }
    sleep(sim, CONNECT_MS).await;
    with(sim, |w| w.session(from, to))
}

pub async fn call_on(
    sim: &SimRef,
    from: usize,
    to: usize,
    incarnation: u64,
    req: Request,
    deadline_ms: u64,
) -> Result<Reply, String> {
    let answer = with(sim, |w| {
        w.next_rpc += 1;
        let rpc = w.next_rpc;
        let s = slot();
        w.rpcs.insert(rpc, s.clone());
        w.send(from, to, incarnation, Body::Request { rpc, req });
        w.schedule(w.now + deadline_ms, Event::RpcDeadline(rpc));
        s
    });
    let r = Filled(answer).await;
    if r.is_err() {
        // A connection that does not answer is closed; the next call makes
        // a new one (to whatever run of the peer is there).
        with(sim, |w| {
            if w.nodes[from].sessions.get(&to) == Some(&incarnation) {
                w.nodes[from].sessions.remove(&to);
            }
        });
    }
    r
}
