//! A node's life in the cluster: the peer endpoint, membership (Raft over
//! the peer transport), joining from a seed list, heartbeats, and the
//! cluster side of the front end (remote loads, room for stores, shrink).
//! The movers (remotify, suction, releases) are in [`super::movers`].
//!
//! Joining: every node is given the same seed list (`--join`). A node that
//! has a Raft log is a member already and only registers its new run. A new
//! node asks the seeds to let it in; whoever is leader adds it as a learner
//! (promoted to voter up to five) and registers it. Only when no reachable
//! seed knows of a cluster does the first seed in the list form one, on its
//! own; the others then join it. So the seeds bootstrap exactly once, with
//! no init step.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hashbrown::{HashMap, HashSet};
use openraft::{BasicNode, ServerState};
use parking_lot::Mutex;
use ramster_protocol::peer::{
    self as wire, PeerErrorCode, change_node::Action, change_node_result::Outcome as ChangeOutcome,
    join_result::Outcome, peer_request, peer_response,
};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};
use xxhash_rust::xxh3::xxh3_64;

use super::donor::{DonatedPage, DonorConfig, DonorStore, PageRef};
use super::liveness::{LivenessTimings, PeerTable};
use super::membership::{
    self, Command, CommandResult, MemberState, Membership, MembershipError, NodeId, RaftReply,
    RaftRequest, RaftTransport, Role, raft_addr, split_raft_addr,
};
use super::owner::audit::AuditPace;
use super::owner::fetch::{LookAgain, RELOOKS_MAX, ReplicaWalk, look_again, replica_order};
use super::owner::repair;
use super::placement::DonorView;
use super::rpc::{self, RpcRefusal};
use super::status::{ClusterStatus, Health, Liveness, NodeStatus};
use super::tls::{NodeIdentity, Replaced};
use super::transport::{
    ControlFuture, ControlHandler, EndpointOptions, PeerEndpoint, PeerSession, PeerTls,
    TransportConfig,
};
use super::watermarks::Watermarks;
use super::{pressure, reclaim};
use crate::admin::ChangeError;
use crate::frontend::{Fetch, LoadResult, RemotePages};
use crate::metrics::{ClusterCounters, NodeMetrics};
use crate::store::{self, DonorId, PAGE_BYTES, Page, PageStore, Released, RemoteRef};

/// How long a store waits for remotify to make room before it is refused.
pub const MAKE_ROOM_WAIT_MS: u64 = 1_000;
/// Pause between rounds of asking the seeds to join.
const JOIN_RETRY_MS: u64 = 1_000;
/// Tries at reaching the leader for an operator's change (about 200 ms
/// apart: an election takes a few hundred).
const CHANGE_ATTEMPTS: usize = 10;

/// How peers are authenticated.
pub enum PeerAuth {
    /// Mutual TLS under the cluster CA (certs dir with ca.crt, node.crt, node.key).
    Mutual(NodeIdentity),
    /// `--insecure`: encrypted, not authenticated.
    Insecure,
}

/// What the cluster side of a node is started with.
pub struct ClusterSettings {
    pub name: String,
    pub id: NodeId,
    /// Where the Raft log and snapshot live.
    pub raft_dir: PathBuf,
    pub listen: SocketAddr,
    /// HOST:PORT peers reach us at (a DNS name is fine).
    pub advertise: String,
    /// Seed addresses, HOST:PORT; empty = a cluster of one.
    pub seeds: Vec<String>,
    pub auth: PeerAuth,
    pub role: Role,
    pub donate_bytes: u64,
    pub zone: Option<String>,
    /// Donors holding each remotified page.
    pub replicas: usize,
    pub watermarks: Watermarks,
    pub liveness: LivenessTimings,
    /// How often the movers audit what donors hold for us.
    pub audit: AuditPace,
    pub transport: TransportConfig,
}

/// Where a node keeps the last incarnation it announced.
const INCARNATION_FILE: &str = "incarnation";

/// This run's incarnation: larger than every earlier run's, so donors drop
/// the older run's pages and take the new run's. Microseconds since the
/// epoch, but never below the last run's plus one (kept in `dir`): a clock
/// stepped back must not make a restarted node look older than the run its
/// peers remember, which they would refuse, or never strike off.
fn next_incarnation(dir: &std::path::Path) -> anyhow::Result<u64> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(INCARNATION_FILE);
    let last = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().with_context(|| {
            format!(
                "reading {} (remove it to take the clock's time)",
                path.display()
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let incarnation = now.max(last + 1);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, incarnation.to_string())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(incarnation)
}

/// The running cluster side of a node. Cheap to clone.
#[derive(Clone)]
pub struct ClusterNode {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    /// When this run started.
    started: Instant,
    pub(super) name: String,
    pub(super) id: NodeId,
    pub(super) advertise: String,
    seeds: Vec<String>,
    pub(super) role: Role,
    pub(super) donate_bytes: u64,
    zone: Option<String>,
    pub(super) replicas: usize,
    pub(super) watermarks: Watermarks,
    pub(super) audit_pace: AuditPace,
    pub(super) store: Arc<PageStore>,
    pub(super) donor: Arc<Mutex<DonorStore>>,
    pub(super) endpoint: PeerEndpoint,
    membership: tokio::sync::OnceCell<Membership>,
    pub(super) peers: Mutex<PeerTable>,
    pub(super) metrics: Arc<NodeMetrics>,
    runtime: tokio::runtime::Handle,
    /// Wakes the movers before their next tick.
    pub(super) wake_movers: Notify,
    /// Told whenever remotify freed room in the store.
    pub(super) room: Notify,
    /// Donor copies to release that could not be released yet.
    pub(super) release_backlog: Mutex<Vec<Released>>,
    /// Bytes put on each donor since its last heartbeat (its spare figure
    /// is that much too high until the next one).
    pub(super) sent_since_heartbeat: Mutex<HashMap<NodeId, u64>>,
    /// Bytes taken back from each donor since its last heartbeat asked for
    /// some (its ask is that much smaller until the next one).
    reclaimed_since_heartbeat: Mutex<HashMap<NodeId, u64>>,
    /// What the operator donates now: `--donate`, or `ramster cluster
    /// donate` since.
    donation: std::sync::atomic::AtomicU64,
    resolved: Mutex<HashMap<String, SocketAddr>>,
    /// Whether this run is registered (joined) in the cluster.
    pub(super) registered: watch::Sender<bool>,
    heartbeats_in_flight: Mutex<HashSet<NodeId>>,
    /// Donors holding copies of our pages, with the incarnation those
    /// copies live in: a donor back with another one came back empty.
    shipped: Mutex<HashMap<DonorId, u64>>,
    /// Donors put to since they last forgot us: they keep a tombstone for
    /// every page of ours released there, until told to forget us
    /// ([`super::movers`]' `forget`).
    pub(super) unforgotten: Mutex<HashSet<DonorId>>,
    pub(super) repair: Mutex<repair::RepairState>,
}

/// A donor's watch on its memory: every tick, the limit new puts may fill
/// up to is the operator's donation less what host pressure, or its own
/// pages' growth, calls for
/// ([`reclaim::ReclaimPolicy`]); what is held above it, owners are asked
/// to take back in heartbeats.
async fn reclaim_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut policy = reclaim::ReclaimPolicy::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(reclaim::RECLAIM_TICK) => {}
            _ = stop.changed() => return,
        }
        let host = pressure::read_host(std::path::Path::new("/"));
        let mut donor = inner.donor.lock();
        let reading = reclaim::Reading {
            donation: inner.donation.load(Ordering::Relaxed),
            held: donor.donated_bytes(),
            own_fill: inner.store.used_bytes() as f64 / inner.store.capacity_bytes().max(1) as f64,
            own_fill_max: inner.watermarks.remotify_start,
            host,
        };
        let before = donor.limit_bytes();
        let limit = donor.set_limit(policy.limit(Instant::now(), &reading));
        let reclaim = donor.reclaim_bytes();
        drop(donor);
        if limit != before {
            info!(
                limit,
                held = reading.held,
                reclaim,
                own_fill = reading.own_fill,
                psi_some_avg10 = ?reading.host.psi_some_avg10,
                cgroup_usage = ?reading.host.cgroup_usage_bytes,
                cgroup_limit = ?reading.host.cgroup_limit_bytes,
                "donation limit changed"
            );
        }
    }
}

/// Bounds of the delay after which a remote load asks the next replica.
const HEDGE_AFTER_MIN: Duration = Duration::from_millis(5);
const HEDGE_AFTER_MAX: Duration = Duration::from_millis(250);

fn unavailable(msg: impl Into<String>) -> RpcRefusal {
    RpcRefusal::new(PeerErrorCode::Unavailable, msg)
}

impl ClusterNode {
    /// Binds the peer endpoint, opens membership, and starts joining,
    /// heartbeats and the movers in the background. Must run inside the
    /// node's (multi-thread) runtime.
    pub async fn start(
        s: ClusterSettings,
        store: Arc<PageStore>,
        metrics: Arc<NodeMetrics>,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<ClusterNode> {
        if s.id == 0 || s.id > u64::from(u32::MAX) {
            anyhow::bail!("node id {} out of range (1..2^32)", s.id);
        }
        let donor = Arc::new(Mutex::new(DonorStore::new(DonorConfig::with_donation(
            s.donate_bytes,
        ))));
        let tls = match &s.auth {
            PeerAuth::Mutual(identity) => PeerTls::mutual(identity)?,
            PeerAuth::Insecure => PeerTls::insecure(&s.name)?,
        };
        let incarnation = next_incarnation(&s.raft_dir)?;
        let endpoint = PeerEndpoint::bind(
            EndpointOptions {
                node: s.name.clone(),
                incarnation,
                listen: s.listen,
                tls,
                transport: s.transport.clone(),
                metrics: metrics.clone(),
            },
            donor.clone(),
        )?;
        let inner = Arc::new(Inner {
            started: Instant::now(),
            name: s.name.clone(),
            id: s.id,
            advertise: s.advertise.clone(),
            seeds: s.seeds.clone(),
            role: s.role,
            donate_bytes: s.donate_bytes,
            zone: s.zone.clone(),
            replicas: s.replicas,
            watermarks: s.watermarks,
            audit_pace: s.audit,
            store,
            donor,
            endpoint: endpoint.clone(),
            membership: tokio::sync::OnceCell::new(),
            peers: Mutex::new(PeerTable::new(s.liveness)),
            metrics,
            runtime: tokio::runtime::Handle::current(),
            wake_movers: Notify::new(),
            room: Notify::new(),
            release_backlog: Mutex::new(Vec::new()),
            sent_since_heartbeat: Mutex::new(HashMap::new()),
            reclaimed_since_heartbeat: Mutex::new(HashMap::new()),
            donation: std::sync::atomic::AtomicU64::new(s.donate_bytes),
            resolved: Mutex::new(HashMap::new()),
            registered: watch::channel(false).0,
            heartbeats_in_flight: Mutex::new(HashSet::new()),
            shipped: Mutex::new(HashMap::new()),
            unforgotten: Mutex::new(HashSet::new()),
            repair: Mutex::new(Default::default()),
        });
        endpoint.set_control_handler(Arc::new(Control(Arc::downgrade(&inner))));
        let membership = Membership::open(s.id, &s.raft_dir, QuicRaft(Arc::downgrade(&inner)))
            .await
            .context("opening membership")?;
        let _ = inner.membership.set(membership);
        let node = ClusterNode { inner };
        info!(
            node = %s.name,
            id = s.id,
            listen = %node.inner.endpoint.local_addr(),
            advertise = %s.advertise,
            role = ?s.role,
            seeds = ?s.seeds,
            "peer endpoint up"
        );
        tokio::spawn(node.clone().join_loop(stop.clone()));
        tokio::spawn(node.clone().heartbeat_loop(stop.clone()));
        tokio::spawn(node.clone().follow_config(stop.clone()));
        if s.role != Role::Client {
            tokio::spawn(reclaim_loop(node.inner.clone(), stop.clone()));
        }
        tokio::spawn(super::movers::run(node.inner.clone(), stop));
        Ok(node)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner.endpoint.local_addr()
    }

    pub fn membership(&self) -> &Membership {
        self.inner.membership()
    }

    pub fn metrics(&self) -> &Arc<NodeMetrics> {
        &self.inner.metrics
    }

    /// Reads `certs_dir` again and presents its certificate from the next
    /// handshake on; sessions already up keep theirs. Refused (the current
    /// one kept) unless it passes the checks made at start, under the CA
    /// the node started with.
    pub fn reload_certificate(&self, certs_dir: &std::path::Path) -> Result<Replaced, String> {
        let Some(key) = self.inner.endpoint.node_key() else {
            return Err("--insecure: there is no certificate to reload".into());
        };
        let identity = NodeIdentity::load(certs_dir).map_err(|e| e.to_string())?;
        key.replace(&identity, &self.inner.name)
            .map_err(|e| e.to_string())
    }

    /// Stops Raft and closes peer connections.
    pub async fn shutdown(&self) {
        self.inner.membership().shutdown().await;
        self.inner.endpoint.close().await;
    }

    /// Ready when this run is registered, a leader is known, and no page
    /// in the cluster is short of copies as far as this node has heard
    /// ([`ClusterStatus::settled`]): a node restarted in a rolling restart
    /// is ready once what its restart cost is repaired, not before.
    pub fn ready(&self) -> Result<(), String> {
        self.inner.registered_or_why()?;
        let m = self.inner.membership();
        if m.raft().metrics().borrow().current_leader.is_none() {
            return Err("no Raft leader known".into());
        }
        let down_after = self.inner.peers.lock().timings().down_after;
        self.status()
            .settled(self.inner.started.elapsed(), down_after)
    }

    /// Keeps asking to join until this run is registered.
    async fn join_loop(self, mut stop: watch::Receiver<bool>) {
        let mut logged = false;
        loop {
            match self.inner.try_join().await {
                Ok(Some(joined)) => {
                    info!(
                        cluster = %joined.cluster_id,
                        incarnation = joined.incarnation,
                        "member of the cluster"
                    );
                    self.inner.registered.send_replace(true);
                    return;
                }
                Ok(None) => {}
                Err(e) => {
                    if !logged {
                        warn!(reason = %e, "cannot join the cluster yet; retrying");
                        logged = true;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(JOIN_RETRY_MS)) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Sends heartbeats to every member, each at most one in flight.
    async fn heartbeat_loop(self, mut stop: watch::Receiver<bool>) {
        let interval = self.inner.peers.lock().timings().heartbeat_interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.changed() => return,
            }
            let config = self.inner.membership().config();
            for (&id, n) in &config.nodes {
                if id == self.inner.id || !self.inner.heartbeats_in_flight.lock().insert(id) {
                    continue;
                }
                let inner = self.inner.clone();
                let (name, addr) = (n.name.clone(), n.advertise.clone());
                tokio::spawn(async move {
                    inner.heartbeat(id, &name, &addr).await;
                    inner.heartbeats_in_flight.lock().remove(&id);
                });
            }
        }
    }

    /// Applies configuration changes that concern this node's donor and
    /// peer table.
    async fn follow_config(self, mut stop: watch::Receiver<bool>) {
        let mut rx = self.inner.membership().subscribe();
        loop {
            let config = rx.borrow_and_update().clone();
            {
                let mut donor = self.inner.donor.lock();
                for (owner, bytes) in &config.quotas {
                    if let Some(n) = config.nodes.get(owner) {
                        donor.set_owner_quota(&n.name, *bytes);
                    }
                }
            }
            let names: HashSet<&str> = config.nodes.values().map(|n| n.name.as_str()).collect();
            self.inner.peers.lock().retain(|p| names.contains(p));
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
            }
        }
    }

    /// The cluster as this node sees it.
    pub fn status(&self) -> ClusterStatus {
        self.inner.status()
    }
}

impl Inner {
    pub(super) fn membership(&self) -> &Membership {
        self.membership
            .get()
            .expect("membership is opened at start")
    }

    /// HOST:PORT to a socket address; names are resolved once and cached
    /// (a failed connection forgets the entry).
    pub(super) async fn resolve(&self, addr: &str) -> Result<SocketAddr, String> {
        if let Ok(a) = addr.parse() {
            return Ok(a);
        }
        if let Some(a) = self.resolved.lock().get(addr) {
            return Ok(*a);
        }
        let found = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| format!("resolving {addr}: {e}"))?
            .next()
            .ok_or_else(|| format!("{addr} resolves to no address"))?;
        self.resolved.lock().insert(addr.to_string(), found);
        Ok(found)
    }

    /// The session with a member, by name and advertised address.
    pub(super) async fn session(
        &self,
        name: &str,
        advertise: &str,
    ) -> Result<Arc<PeerSession>, String> {
        let addr = self.resolve(advertise).await?;
        self.endpoint.session(name, addr).await.map_err(|e| {
            self.resolved.lock().remove(advertise);
            e.to_string()
        })
    }

    /// The live session with a donor, without dialling it.
    fn live_donor_session(&self, id: NodeId) -> Option<Arc<PeerSession>> {
        let name = self.membership().config().nodes.get(&id)?.name.clone();
        self.endpoint.live_session(&name)
    }

    /// The session with a donor, by its id in page descriptors.
    pub(super) async fn donor_session(&self, id: NodeId) -> Result<Arc<PeerSession>, String> {
        let (name, addr) = {
            let config = self.membership().config();
            let n = config
                .nodes
                .get(&id)
                .ok_or_else(|| format!("donor {id} is not a member"))?;
            (n.name.clone(), n.advertise.clone())
        };
        self.session(&name, &addr).await
    }

    fn join_request(&self) -> wire::Join {
        wire::Join {
            id: self.id,
            name: self.name.clone(),
            advertise: self.advertise.clone(),
            role: role_name(self.role).into(),
            capacity_bytes: match self.role {
                Role::MemoryServer => self.donate_bytes,
                _ => self.store.capacity_bytes(),
            },
            donate_bytes: self.donate_bytes,
            zone: self.zone.clone().unwrap_or_default(),
        }
    }

    /// One round of joining. `Ok(Some(_))` once registered.
    async fn try_join(&self) -> Result<Option<wire::JoinResult>, String> {
        let m = self.membership();
        // Leader ourselves (a restarted cluster of one, or elected already):
        // register directly.
        if let Some((leader, _)) = m.leader().await
            && leader == self.id
        {
            return self.admit(self.join_request()).await.map(registered);
        }
        let mut knows_a_cluster = false;
        let mut last_error = String::from("no seed reachable");
        for seed in &self.seeds {
            if *seed == self.advertise {
                continue;
            }
            let answer = async {
                let addr = self.resolve(seed).await?;
                let s = self.endpoint.session_at(addr).await.map_err(|e| {
                    // A seed restarted in a container may come back at
                    // another address under the same name.
                    self.resolved.lock().remove(seed);
                    e.to_string()
                })?;
                s.join(self.join_request()).await.map_err(|e| e.to_string())
            }
            .await;
            let r = match answer {
                Ok(r) => r,
                Err(e) => {
                    last_error = e;
                    continue;
                }
            };
            match r.outcome() {
                Outcome::Joined => return Ok(Some(r)),
                Outcome::NotLeader => {
                    knows_a_cluster = true;
                    let Some((name, addr)) = split_raft_addr(&r.leader) else {
                        last_error = format!("{seed}: no leader yet");
                        continue;
                    };
                    if name == self.name {
                        continue;
                    }
                    match self.session(name, addr).await {
                        Ok(s) => match s.join(self.join_request()).await {
                            Ok(r) if r.outcome() == Outcome::Joined => return Ok(Some(r)),
                            Ok(r) => {
                                last_error =
                                    format!("leader {name}: {:?} {}", r.outcome(), r.message)
                            }
                            Err(e) => last_error = e.to_string(),
                        },
                        Err(e) => last_error = e,
                    }
                }
                Outcome::NotInitialized => {}
                Outcome::Refused => {
                    return Err(format!("{seed} refused us: {}", r.message));
                }
                Outcome::Unspecified => last_error = format!("{seed}: answer without an outcome"),
            }
        }
        if knows_a_cluster || m.is_initialized().await {
            return Err(last_error);
        }
        if !self.is_first_seed() {
            return Err(format!(
                "waiting for the first seed to form the cluster ({last_error})"
            ));
        }
        info!("no seed knows of a cluster: forming one");
        let voters = BTreeMap::from([(self.id, raft_addr(&self.name, &self.advertise))]);
        m.bootstrap(voters).await.map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while m.leader().await.map(|(id, _)| id) != Some(self.id) {
            if Instant::now() > deadline {
                return Err("formed the cluster but was not elected".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cluster_id = format!("{:016x}", rand::random::<u64>());
        m.propose(Command::SetClusterId { cluster_id })
            .await
            .map_err(|e| e.to_string())?;
        self.admit(self.join_request()).await.map(registered)
    }

    /// The first seed forms the cluster: the first `--join` entry that is
    /// our own advertised address (or no seeds at all).
    fn is_first_seed(&self) -> bool {
        match self.seeds.first() {
            None => true,
            Some(first) => *first == self.advertise,
        }
    }

    /// Leader side of a join: adds the node to Raft if new and registers
    /// this run of it.
    async fn admit(&self, j: wire::Join) -> Result<wire::JoinResult, String> {
        let m = self.membership();
        let refused = |message: String| wire::JoinResult {
            outcome: Outcome::Refused as i32,
            message,
            ..Default::default()
        };
        if j.id == 0 || j.id > u64::from(u32::MAX) {
            return Ok(refused(format!("node id {} out of range (1..2^32)", j.id)));
        }
        let Some(role) = parse_role(&j.role) else {
            return Ok(refused(format!("unknown role {:?}", j.role)));
        };
        let config = m.config();
        if let Some(other) = config.nodes.get(&j.id).filter(|n| n.name != j.name) {
            return Ok(refused(format!(
                "node id {} is taken by {:?}; give this node a fresh data dir",
                j.id, other.name
            )));
        }
        // Refused before Raft hears of the new id: a node whose data dir
        // was lost must not leave a learner behind each time it asks.
        if let Some(by) = config.name_taken(&j.name, j.id) {
            return Ok(refused(name_taken(&j.name, by)));
        }
        if !m.has_raft_node(j.id) {
            m.add_node(j.id, raft_addr(&j.name, &j.advertise))
                .await
                .map_err(|e| e.to_string())?;
        }
        let result = m
            .propose(Command::Register {
                id: j.id,
                name: j.name.clone(),
                advertise: j.advertise.clone(),
                role,
                capacity_bytes: j.capacity_bytes,
                donate_bytes: j.donate_bytes,
                zone: (!j.zone.is_empty()).then(|| j.zone.clone()),
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok(match result {
            CommandResult::Registered { incarnation } => {
                info!(node = %j.name, id = j.id, incarnation, "node registered");
                wire::JoinResult {
                    outcome: Outcome::Joined as i32,
                    cluster_id: m.config().cluster_id.clone(),
                    incarnation,
                    ..Default::default()
                }
            }
            CommandResult::NameTaken { name, by } => refused(name_taken(&name, by)),
            other => refused(format!("registration: {other:?}")),
        })
    }

    /// Answers a join from a peer: admits it when we lead, else says who does.
    async fn on_join(&self, peer: &str, j: wire::Join) -> Result<wire::JoinResult, RpcRefusal> {
        if j.name != peer {
            return Err(RpcRefusal::new(
                PeerErrorCode::NotOwner,
                format!("{peer} asked to join as {:?}", j.name),
            ));
        }
        let m = self.membership();
        if !m.is_initialized().await {
            return Ok(wire::JoinResult {
                outcome: Outcome::NotInitialized as i32,
                ..Default::default()
            });
        }
        match m.leader().await {
            Some((id, _)) if id == self.id => self.admit(j).await.map_err(unavailable),
            leader => Ok(wire::JoinResult {
                outcome: Outcome::NotLeader as i32,
                leader: leader.map(|(_, addr)| addr).unwrap_or_default(),
                ..Default::default()
            }),
        }
    }

    /// An operator's change to a member: made here when we lead, else sent
    /// to the leader. `Ok` carries what was done, `Err` why not.
    pub(super) async fn change_node(
        &self,
        change: wire::ChangeNode,
    ) -> Result<String, ChangeError> {
        // The leader may change (or be elected) while we ask.
        let mut last = String::from("no leader elected");
        for _ in 0..CHANGE_ATTEMPTS {
            let leader = self.membership().leader().await;
            let r = match &leader {
                Some((id, _)) if *id == self.id => self.apply_change(&change).await,
                Some((_, raft_addr)) => {
                    let asked = async {
                        let (name, addr) = split_raft_addr(raft_addr)
                            .ok_or_else(|| format!("leader address {raft_addr:?} unreadable"))?;
                        let s = self.session(name, addr).await?;
                        s.change_node(change.clone())
                            .await
                            .map_err(|e| e.to_string())
                    };
                    match asked.await {
                        Ok(r) => r,
                        Err(e) => {
                            last = e;
                            wire::ChangeNodeResult::default()
                        }
                    }
                }
                None => wire::ChangeNodeResult::default(),
            };
            match r.outcome() {
                ChangeOutcome::Done => return Ok(r.message),
                ChangeOutcome::Refused => return Err(ChangeError::Refused(r.message)),
                ChangeOutcome::NotLeader | ChangeOutcome::Unspecified => {
                    if !r.leader.is_empty() {
                        last = format!("leadership moved to {}", r.leader);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        Err(ChangeError::Unavailable(format!(
            "could not reach the leader: {last}"
        )))
    }

    /// Answers a peer's change: made when we lead, else says who does.
    async fn on_change_node(&self, change: wire::ChangeNode) -> wire::ChangeNodeResult {
        match self.membership().leader().await {
            Some((id, _)) if id == self.id => self.apply_change(&change).await,
            leader => wire::ChangeNodeResult {
                outcome: ChangeOutcome::NotLeader as i32,
                leader: leader.map(|(_, addr)| addr).unwrap_or_default(),
                ..Default::default()
            },
        }
    }

    /// Leader side of a change: one configuration entry through Raft (and,
    /// for a removal, the Raft membership change).
    async fn apply_change(&self, change: &wire::ChangeNode) -> wire::ChangeNodeResult {
        let answer = |outcome: ChangeOutcome, message: String| wire::ChangeNodeResult {
            outcome: outcome as i32,
            message,
            ..Default::default()
        };
        let m = self.membership();
        let config = m.config();
        let Some((&id, member)) = config.nodes.iter().find(|(_, n)| n.name == change.node) else {
            return answer(
                ChangeOutcome::Refused,
                format!("no member is named {:?}", change.node),
            );
        };
        let name = &member.name;
        let done = match change.action() {
            Action::Drain | Action::Activate => {
                let (state, did) = if change.action() == Action::Drain {
                    (
                        MemberState::Draining,
                        "draining: it takes no new pages, and owners move the copies it holds to other donors",
                    )
                } else {
                    (MemberState::Active, "active: it takes pages again")
                };
                m.propose(Command::SetState { id, state })
                    .await
                    .map(|_| format!("{name} is {did}"))
            }
            Action::Remove => {
                let held = if id == self.id {
                    self.donor.lock().usage(None).pages
                } else {
                    self.peers
                        .lock()
                        .get(name)
                        .map_or(0, |r| r.heartbeat.held_pages)
                };
                if held > 0 && !change.force {
                    return answer(
                        ChangeOutcome::Refused,
                        format!(
                            "{name} still holds {held} of peers' pages; drain it first \
                             (ramster cluster drain {name}) or remove it with --force"
                        ),
                    );
                }
                remove_member(m, id)
                    .await
                    .map(|()| format!("{name} is no longer a member"))
            }
            Action::Replace => {
                // Only a node that is gone: replacing a live one would
                // strand its copies and let anyone take over its name.
                let (state, down_after) = {
                    let peers = self.peers.lock();
                    (
                        peers.state(name, Instant::now()),
                        peers.timings().down_after,
                    )
                };
                // A leader up for less than the down timeout has not heard
                // from every live member yet: all of them read down.
                if self.started.elapsed() < down_after {
                    return answer(
                        ChangeOutcome::Refused,
                        format!(
                            "this leader started {:.1} s ago and may not have heard from {name} \
                             yet; ask again in a few seconds",
                            self.started.elapsed().as_secs_f64()
                        ),
                    );
                }
                if id == self.id || state != Liveness::Down {
                    return answer(
                        ChangeOutcome::Refused,
                        format!(
                            "{name} is {}: replace is for a member whose data dir is gone; \
                             stop it first, or drain and remove it",
                            if id == self.id {
                                "answering this request"
                            } else {
                                "up"
                            }
                        ),
                    );
                }
                remove_member(m, id).await.map(|()| {
                    format!(
                        "{name} (node id {id}) is no longer a member: a node started as \
                         {name} with a fresh data dir joins in its place, and owners \
                         re-create the copies it held from other replicas"
                    )
                })
            }
            Action::Unspecified => {
                return answer(ChangeOutcome::Refused, "no action given".into());
            }
        };
        match done {
            Ok(message) => {
                info!(node = %name, action = ?change.action(), "member changed");
                answer(ChangeOutcome::Done, message)
            }
            Err(MembershipError::NotLeader { leader }) => wire::ChangeNodeResult {
                outcome: ChangeOutcome::NotLeader as i32,
                leader: leader.map(|(_, addr)| addr).unwrap_or_default(),
                ..Default::default()
            },
            Err(e) => answer(ChangeOutcome::Refused, e.to_string()),
        }
    }

    /// Whether a heartbeat from `name` saying node id `node_id` speaks for
    /// the member of that name: not when the member has another id (a
    /// node started under the name with a fresh data dir, before `ramster
    /// cluster replace`), or its liveness and run would be the new one's.
    fn speaks_as_member(&self, name: &str, node_id: NodeId) -> bool {
        node_id == 0
            || self
                .membership()
                .config()
                .nodes
                .iter()
                .find(|(_, n)| n.name == name)
                .is_none_or(|(&id, _)| id == node_id)
    }

    /// What we tell peer `to` about ourselves.
    pub(super) fn own_heartbeat(&self, to: &str) -> wire::Heartbeat {
        let st = self.store.stats();
        let mut hb = rpc::heartbeat_of(&self.donor.lock(), to);
        // A memory server's capacity is what it donates.
        if self.role == Role::MemoryServer {
            hb.capacity_bytes = hb.donate_bytes;
            hb.used_bytes = hb.donated_bytes;
        } else {
            hb.capacity_bytes = st.capacity_bytes;
            hb.used_bytes = st.used_bytes;
        }
        hb.stored_pages = st.pages;
        let c = &self.metrics.cluster;
        hb.degraded_pages = c.degraded_pages.load(Ordering::Relaxed);
        hb.unrecoverable_pages = c.unrecoverable_pages.load(Ordering::Relaxed);
        hb.remote_pages = st.remote_pages;
        hb.remote_bytes = st.remote_bytes;
        hb.compression_ratio = compression_ratio(&st);
        hb.raft_role = self.raft_role().into();
        hb.version = env!("CARGO_PKG_VERSION").into();
        hb.incarnation = self.endpoint.incarnation();
        hb.node_id = self.id;
        hb
    }

    fn raft_role(&self) -> &'static str {
        match self.membership.get() {
            Some(m) => match m.raft().metrics().borrow().state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "stopped",
            },
            None => "unknown",
        }
    }

    async fn heartbeat(&self, id: NodeId, name: &str, advertise: &str) {
        let started = Instant::now();
        let answer = async {
            let s = self.session(name, advertise).await?;
            let hb = s
                .heartbeat(self.own_heartbeat(name))
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(hb)
        }
        .await;
        if let Ok(hb) = answer {
            if !self.speaks_as_member(name, hb.node_id) {
                return;
            }
            let now = Instant::now();
            self.owner_heard(name, hb.incarnation);
            self.peers.lock().record(name, now, hb, Some(now - started));
            self.sent_since_heartbeat.lock().remove(&id);
            self.reclaimed_since_heartbeat.lock().remove(&id);
        }
    }

    /// A peer's heartbeat named its run: if it is newer than the run this
    /// node holds pages for, those pages can never be asked for again.
    fn owner_heard(&self, owner: &str, incarnation: u64) {
        let dropped = self.donor.lock().owner_restarted(owner, incarnation);
        if dropped > 0 {
            info!(
                owner,
                incarnation, dropped, "dropped the pages of an owner's previous run"
            );
        }
    }

    /// The donors that are up now.
    pub(super) fn up_donors(&self) -> Vec<DonorId> {
        self.donor_views()
            .iter()
            .filter(|d| d.up)
            .map(|d| d.id)
            .collect()
    }

    /// Donors as placement sees them: members other than us, with the spare
    /// room their last heartbeat gave minus what we put there since.
    pub(super) fn donor_views(&self) -> Vec<DonorView> {
        // Until repair is through with a lost donor, it takes no new pages.
        let lost = self.lost_donors();
        let config = self.membership().config();
        let now = Instant::now();
        let peers = self.peers.lock();
        let sent = self.sent_since_heartbeat.lock();
        config
            .nodes
            .iter()
            .filter(|(id, _)| **id != self.id)
            .map(|(&id, n)| {
                let spare = peers
                    .get(&n.name)
                    .map_or(0, |r| r.heartbeat.spare_bytes)
                    .saturating_sub(sent.get(&id).copied().unwrap_or(0));
                DonorView {
                    id: id as u32,
                    role: n.role,
                    up: peers.state(&n.name, now) == Liveness::Up && !lost.contains(&(id as u32)),
                    draining: n.state == MemberState::Draining,
                    spare_bytes: spare,
                    zone: n.zone.clone(),
                }
            })
            .collect()
    }

    /// Donors that ask for bytes of our pages back (their last heartbeat
    /// said how many), less what we took back since; only those that are
    /// up, since the copies are read from them.
    pub(super) fn reclaims(&self) -> Vec<(DonorId, u64)> {
        let config = self.membership().config();
        let now = Instant::now();
        let peers = self.peers.lock();
        let taken = self.reclaimed_since_heartbeat.lock();
        config
            .nodes
            .iter()
            .filter(|&(&id, n)| id != self.id && peers.state(&n.name, now) == Liveness::Up)
            .filter_map(|(&id, n)| {
                let asked = peers.get(&n.name)?.heartbeat.reclaim_bytes;
                let left = asked.saturating_sub(taken.get(&id).copied().unwrap_or(0));
                (left > 0).then_some((id as DonorId, left))
            })
            .collect()
    }

    /// `bytes` of our pages left `donor` for a reclaim.
    pub(super) fn note_reclaimed(&self, donor: DonorId, bytes: u64) {
        *self
            .reclaimed_since_heartbeat
            .lock()
            .entry(donor as NodeId)
            .or_default() += bytes;
    }

    /// The operator's new donation, up to `--donate`: new puts stop at it,
    /// and owners are asked to take back what is held above it.
    pub(super) fn set_donation(&self, bytes: u64) -> Result<String, ChangeError> {
        if self.role == Role::Client {
            return Err(ChangeError::Refused("a client node donates nothing".into()));
        }
        let bytes = bytes.min(self.donate_bytes);
        self.donation.store(bytes, Ordering::Relaxed);
        let (limit, held) = {
            let mut donor = self.donor.lock();
            // The policy may hold it lower for host pressure; this applies
            // the operator's part at once.
            let limit = donor.set_limit(bytes);
            (limit, donor.donated_bytes())
        };
        info!(donation = bytes, limit, held, "donation changed");
        Ok(format!(
            "{} donates {bytes} bytes (at most {} from --donate); it holds {held}, {} to give back",
            self.name,
            self.donate_bytes,
            held.saturating_sub(limit)
        ))
    }

    /// Donors whose copies of our pages must be re-created elsewhere: down,
    /// no longer members, back with a new incarnation (empty), or draining.
    pub(super) fn lost_donors(&self) -> Vec<DonorId> {
        let shipped: Vec<(DonorId, u64)> =
            self.shipped.lock().iter().map(|(&d, &i)| (d, i)).collect();
        shipped
            .into_iter()
            .filter(|&(id, incarnation)| repair::copies_lost(incarnation, self.sight(id)))
            .map(|(id, _)| id)
            .collect()
    }

    /// What membership and heartbeats say of a donor, for repair.
    fn sight(&self, donor: DonorId) -> repair::DonorSight {
        let config = self.membership().config();
        let Some(n) = config.nodes.get(&(donor as NodeId)) else {
            return repair::DonorSight::Removed;
        };
        let peers = self.peers.lock();
        repair::DonorSight::Member {
            // Repair waits for out, not down: see `liveness`.
            down: peers.is_out(&n.name, Instant::now()),
            incarnation: peers.get(&n.name).map_or(0, |r| r.heartbeat.incarnation),
            draining: n.state == MemberState::Draining,
        }
    }

    /// Draining donors that still answer: their copies are moved elsewhere,
    /// and can be read from them until then.
    pub(super) fn draining_donors(&self) -> Vec<DonorId> {
        self.members_up(|n| n.state == MemberState::Draining)
    }

    /// Other members that answer heartbeats, whatever else they are.
    pub(super) fn answering_donors(&self) -> Vec<DonorId> {
        self.members_up(|_| true)
    }

    fn members_up(&self, which: impl Fn(&membership::NodeInfo) -> bool) -> Vec<DonorId> {
        let config = self.membership().config();
        let now = Instant::now();
        let peers = self.peers.lock();
        config
            .nodes
            .iter()
            .filter(|&(&id, n)| {
                id != self.id && which(n) && peers.state(&n.name, now) == Liveness::Up
            })
            .map(|(&id, _)| id as DonorId)
            .collect()
    }

    /// Our copies are on `donor`, in its run `incarnation` (as a session
    /// or a heartbeat tells it). A newer run than the one recorded came
    /// back empty: every copy listed on the donor is struck off at once,
    /// so repair re-creates them and the donor takes new copies like any
    /// other, instead of waiting as lost until all of them are re-created.
    pub(super) fn note_shipped(&self, donor: DonorId, incarnation: u64) {
        self.unforgotten.lock().insert(donor);
        let mut shipped = self.shipped.lock();
        match shipped.get(&donor) {
            None => {
                shipped.insert(donor, incarnation);
            }
            Some(&had) if incarnation > had => {
                // Under the lock: a batch recorded meanwhile is checked
                // against the run it was put on (`shipped_runs`).
                let (struck, orphaned) = self.store.strike_donor(donor);
                shipped.insert(donor, incarnation);
                self.repair.lock().struck();
                if struck > 0 {
                    let c = &self.metrics.cluster;
                    ClusterCounters::add(&c.struck_pages, struck);
                    ClusterCounters::add(&c.lost_pages, orphaned);
                    if orphaned > 0 {
                        warn!(
                            donor,
                            struck,
                            orphaned,
                            "a donor came back empty; pages whose only copy it held are lost"
                        );
                    } else {
                        info!(
                            donor,
                            struck, "a donor came back empty; its copies are struck off for repair"
                        );
                    }
                }
            }
            Some(_) => {}
        }
    }

    /// Donors whose heartbeats announce a newer run than the one our
    /// copies are on: struck off (`note_shipped`).
    pub(super) fn strike_restarted(&self) {
        let heard: Vec<(DonorId, u64)> = {
            let config = self.membership().config();
            let peers = self.peers.lock();
            self.shipped
                .lock()
                .iter()
                .filter_map(|(&d, &had)| {
                    let n = config.nodes.get(&(d as NodeId))?;
                    let now = peers.get(&n.name)?.heartbeat.incarnation;
                    (now > had).then_some((d, now))
                })
                .collect()
        };
        for (d, incarnation) in heard {
            self.note_shipped(d, incarnation);
        }
    }

    /// The runs our copies are on, held while a batch's acks are recorded:
    /// an ack from a run older than the recorded one is from a donor that
    /// has since come back empty, and counts for nothing.
    pub(super) fn shipped_runs(&self) -> parking_lot::MutexGuard<'_, HashMap<DonorId, u64>> {
        self.shipped.lock()
    }

    /// Repair re-created every copy the `lost` donors held: a donor that is
    /// back (with a new incarnation) holds only what it got since.
    pub(super) fn forget_lost_copies(&self, lost: &[DonorId]) {
        for &d in lost {
            match repair::after_repair(self.sight(d)) {
                repair::AfterRepair::Forget => {
                    self.shipped.lock().remove(&d);
                }
                // Back in a newer run, it may have come back since the
                // pass read the pages: strike what it is still listed for.
                repair::AfterRepair::Holds(incarnation) => self.note_shipped(d, incarnation),
                repair::AfterRepair::Keep => {}
            }
        }
    }

    /// Donor copies wanted per page: its area's number, or the node's
    /// `--replicas` (one for a writethrough page).
    pub(super) fn copies_wanted(&self) -> store::CopiesWanted {
        self.store.copies_wanted(self.replicas)
    }

    /// Whether any donor could take a page now.
    pub(super) fn any_donor(&self) -> bool {
        self.donor_views()
            .iter()
            .filter(|d| d.up && !d.draining && d.role != Role::Client && d.spare_bytes > 0)
            .count()
            >= self.replicas
    }

    /// Fetches pages from their replicas, checked, live replicas first. Each
    /// round asks every donor once for all the pages it is next in line
    /// for; a page whose donor failed, or whose copy failed its checksum,
    /// is asked of its next replica in the following round.
    ///
    /// The whole fetch has one RPC deadline, however many replicas it goes
    /// through: a page none of whose copies answers in time is
    /// `Unavailable` then, not after a deadline per replica. A donor called
    /// down is asked only over a connection that is still up; dialling it
    /// here would spend the deadline on a peer that is most likely gone.
    ///
    /// A page none of whose copies was found where its descriptor said is
    /// looked up again before it is answered `Unavailable`: suction, a
    /// reclaim, a drain or repair may have moved it (home, or to other
    /// donors) and released the copies the load was reading from. The
    /// order of replicas and what a second look finds are the owner core's
    /// ([`super::owner::fetch`]), which the simulator's loads run too.
    pub(super) async fn fetch_many(
        &self,
        refs: &[RemoteRef],
        outs: &mut [&mut Page],
    ) -> Vec<LoadResult> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started) + self.endpoint.rpc_deadline();
        let mut results = self.fetch_from_replicas(refs, outs, deadline).await;
        // Only a load that missed pays for a second look.
        if results.iter().any(|r| *r != LoadResult::Hit) {
            self.follow_moved_pages(refs, outs, &mut results, deadline)
                .await;
        }
        let c = &self.metrics.cluster;
        let hits = results.iter().filter(|r| **r == LoadResult::Hit).count() as u64;
        ClusterCounters::add(&c.remote_loads, hits);
        ClusterCounters::add(&c.remote_load_errors, refs.len() as u64 - hits);
        let elapsed = started.elapsed();
        for _ in refs {
            self.metrics.remote_load_latency.observe(elapsed);
        }
        results
    }

    /// The second look of [`Self::fetch_many`]: each page not fetched is
    /// looked up in the store again; one at home answers from there, one
    /// on other donors is fetched from them, at most [`RELOOKS_MAX`] moves.
    async fn follow_moved_pages(
        &self,
        refs: &[RemoteRef],
        outs: &mut [&mut Page],
        results: &mut [LoadResult],
        deadline: tokio::time::Instant,
    ) {
        let mut current: Vec<RemoteRef> = refs.to_vec();
        for _ in 0..RELOOKS_MAX {
            // Pages that moved since their descriptor was read: fetched
            // again where the index says they are now.
            let mut moved: Vec<usize> = Vec::new();
            let mut changed = 0;
            for (i, result) in results.iter_mut().enumerate() {
                if *result == LoadResult::Hit {
                    continue;
                }
                let now = match look_again(&current[i], self.store.load(current[i].key, outs[i])) {
                    LookAgain::Unchanged => continue,
                    LookAgain::Moved(now) => {
                        current[i] = now;
                        moved.push(i);
                        continue;
                    }
                    LookAgain::Home => LoadResult::Hit,
                    LookAgain::Gone => LoadResult::NotFound,
                    LookAgain::Corrupt => LoadResult::Corrupt,
                };
                *result = now;
                changed += 1;
            }
            if changed + moved.len() > 0 {
                ClusterCounters::add(
                    &self.metrics.cluster.remote_load_relooks,
                    (changed + moved.len()) as u64,
                );
            }
            if moved.is_empty() || tokio::time::Instant::now() >= deadline {
                break;
            }
            let again: Vec<RemoteRef> = moved.iter().map(|&i| current[i]).collect();
            let mut targets: Vec<&mut Page> = outs
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| moved.binary_search(i).is_ok())
                .map(|(_, out)| &mut **out)
                .collect();
            let fetched = self
                .fetch_from_replicas(&again, &mut targets, deadline)
                .await;
            for (&i, r) in moved.iter().zip(fetched) {
                results[i] = r;
            }
        }
    }

    /// One fetch of `refs` from the replicas they name, within `deadline`.
    async fn fetch_from_replicas(
        &self,
        refs: &[RemoteRef],
        outs: &mut [&mut Page],
        deadline: tokio::time::Instant,
    ) -> Vec<LoadResult> {
        let (mut walks, down): (Vec<ReplicaWalk>, HashSet<NodeId>) = {
            let now = Instant::now();
            let config = self.membership().config();
            let peers = self.peers.lock();
            let state = |id: &NodeId| {
                config
                    .nodes
                    .get(id)
                    .map_or(Liveness::Down, |n| peers.state(&n.name, now))
            };
            let orders: Vec<Vec<DonorId>> = refs
                .iter()
                .map(|r| replica_order(r.replicas, |d| state(&(d as NodeId))))
                .collect();
            let down = orders
                .iter()
                .flatten()
                .map(|&d| d as NodeId)
                .filter(|d| state(d) == Liveness::Down)
                .collect();
            (orders.into_iter().map(ReplicaWalk::new).collect(), down)
        };
        let hedge_after = self.hedge_delay();
        let mut results = vec![LoadResult::Unavailable; refs.len()];
        let mut pending: Vec<usize> = (0..refs.len()).collect();
        while !pending.is_empty() && tokio::time::Instant::now() < deadline {
            let mut by_donor: BTreeMap<NodeId, Vec<usize>> = BTreeMap::new();
            for &i in &pending {
                if let Some(donor) = walks[i].next() {
                    by_donor.entry(donor as NodeId).or_default().push(i);
                }
            }
            let mut answers = Vec::new();
            let mut asks = Vec::new();
            for (donor, idx) in by_donor {
                let session = if down.contains(&donor) {
                    self.live_donor_session(donor)
                        .ok_or_else(|| "down, and no connection is up".to_string())
                } else {
                    tokio::time::timeout_at(deadline, self.donor_session(donor))
                        .await
                        .unwrap_or_else(|_| Err("no connection within the deadline".into()))
                };
                match session {
                    Ok(session) => {
                        let wanted: Vec<PageRef> = idx
                            .iter()
                            .map(|&i| PageRef {
                                key: refs[i].key,
                                version: refs[i].version,
                            })
                            .collect();
                        // A page with another replica to try does not wait
                        // on a slow donor (a stopped one, say) past the
                        // hedge delay; the last replica gets the whole
                        // deadline.
                        let hedge = idx
                            .iter()
                            .all(|&i| walks[i].hedged())
                            .then_some(hedge_after);
                        asks.push(async move {
                            let get = session.get_pages(&wanted);
                            // Err((slow, why)).
                            let until = hedge.map_or(deadline, |after| {
                                deadline.min(tokio::time::Instant::now() + after)
                            });
                            let got = match tokio::time::timeout_at(until, get).await {
                                Ok(got) => got.map_err(|e| (false, e.to_string())),
                                Err(_) => match hedge {
                                    Some(after) if until < deadline => Err((
                                        true,
                                        format!(
                                            "no answer within {after:?}; asking the next replica"
                                        ),
                                    )),
                                    _ => Err((false, "the load's deadline passed".into())),
                                },
                            };
                            (donor, idx, got)
                        });
                    }
                    Err(e) => answers.push((donor, idx, Err((false, e)))),
                }
            }
            // One donor (the common case for a small load) is awaited right
            // here; several are asked at once.
            if asks.len() == 1 {
                answers.push(asks.pop().expect("one").await);
            } else {
                let mut set = tokio::task::JoinSet::new();
                for ask in asks {
                    set.spawn(ask);
                }
                while let Some(joined) = set.join_next().await {
                    answers.push(joined.expect("a get task never panics"));
                }
            }
            pending.clear();
            for (donor, idx, got) in answers {
                let pages = match got {
                    Ok(pages) => pages,
                    Err((slow, reason)) => {
                        warn!(donor, pages = idx.len(), %reason, "remote load from a replica failed");
                        for i in idx {
                            if slow {
                                walks[i].slow();
                            } else {
                                walks[i].failed();
                            }
                            pending.push(i);
                        }
                        continue;
                    }
                };
                for (i, page) in idx.into_iter().zip(pages) {
                    let page = match page {
                        Ok(p) => p,
                        Err(status) => {
                            warn!(donor, key = ?refs[i].key, ?status, "a replica does not have the page");
                            walks[i].failed();
                            pending.push(i);
                            continue;
                        }
                    };
                    if !decode_checked(page.compressed, &page.data, refs[i].checksum, outs[i]) {
                        warn!(donor, key = ?refs[i].key, "a replica's copy failed its checksum");
                        results[i] = LoadResult::Corrupt;
                        walks[i].failed();
                        pending.push(i);
                        continue;
                    }
                    results[i] = LoadResult::Hit;
                    self.install_if_room(&refs[i], &page);
                }
            }
        }
        results
    }

    /// How long a remote load waits on one replica before it asks the next:
    /// twice the recent p99 of peer RPCs, within bounds.
    fn hedge_delay(&self) -> Duration {
        let p99 = self
            .metrics
            .rpc_latency()
            .quantile_bound_ns(0.99)
            .unwrap_or(0);
        Duration::from_nanos(p99.saturating_mul(2)).clamp(HEDGE_AFTER_MIN, HEDGE_AFTER_MAX)
    }

    /// Brings a fetched page home while there is room under the remotify
    /// stop line, so a hot page stops costing a round trip.
    fn install_if_room(&self, r: &RemoteRef, page: &DonatedPage) {
        if page.compressed
            && self.has_room_below(self.watermarks.remotify_stop)
            && let Some(released) = self.store.install_fetched(r, &page.data)
        {
            self.release_backlog.lock().push(released);
            ClusterCounters::add(&self.metrics.cluster.suctioned_pages, 1);
            ClusterCounters::add(
                &self.metrics.cluster.suctioned_bytes,
                page.data.len() as u64,
            );
        }
    }

    pub(super) fn has_room_below(&self, fill: f64) -> bool {
        let used = self.store.used_bytes();
        (used as f64) < fill * self.store.capacity_bytes() as f64
    }

    /// Runs `f` to completion from synchronous front-end code, without
    /// stalling the runtime's other tasks. `None`, without running it, on
    /// a current-thread runtime's thread (the transport's): blocking there
    /// would stop the very tasks `f` waits on, and tokio refuses it with a
    /// panic. Callers route such waits elsewhere; reaching this from there
    /// is a bug, answered as if the wait had come to nothing.
    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> Option<T> {
        let may_block = crate::frontend::may_block_here();
        debug_assert!(may_block, "waiting on donors from a current-thread runtime");
        may_block.then(|| tokio::task::block_in_place(|| self.runtime.block_on(f)))
    }

    fn registered_or_why(&self) -> Result<(), String> {
        if *self.registered.borrow() {
            Ok(())
        } else {
            Err(format!(
                "{} is not a member of a cluster yet (seeds: {})",
                self.name,
                self.seeds.join(",")
            ))
        }
    }

    fn status(&self) -> ClusterStatus {
        let m = self.membership();
        let config = m.config();
        let now = Instant::now();
        let leader = m.raft().metrics().borrow().current_leader;
        let own = self.own_heartbeat(&self.name);
        let peers = self.peers.lock();
        let (donor_usage, donor_pages) = {
            let donor = self.donor.lock();
            (donor.donated_bytes(), donor.usage(None).pages)
        };
        let mut nodes: Vec<NodeStatus> = config
            .nodes
            .iter()
            .map(|(&id, n)| {
                let me = id == self.id;
                let report = peers.get(&n.name);
                let hb = if me {
                    Some(&own)
                } else {
                    report.map(|r| &r.heartbeat)
                };
                let g = |f: fn(&wire::Heartbeat) -> u64| hb.map_or(0, f);
                NodeStatus {
                    name: n.name.clone(),
                    id,
                    address: n.advertise.clone(),
                    role: n.role,
                    member_state: n.state,
                    state: if me {
                        Liveness::Up
                    } else {
                        peers.state(&n.name, now)
                    },
                    raft_role: hb.map_or("unknown".into(), |h| h.raft_role.clone()),
                    incarnation: n.incarnation,
                    capacity_bytes: if hb.is_some() {
                        g(|h| h.capacity_bytes)
                    } else {
                        n.capacity_bytes
                    },
                    used_bytes: g(|h| h.used_bytes),
                    donate_bytes: n.donate_bytes,
                    held_for_others_bytes: if me {
                        donor_usage
                    } else {
                        g(|h| h.donated_bytes)
                    },
                    held_for_others_pages: if me { donor_pages } else { g(|h| h.held_pages) },
                    own_pages_on_peers: g(|h| h.remote_pages),
                    own_bytes_on_peers: g(|h| h.remote_bytes),
                    stored_pages: g(|h| h.stored_pages),
                    degraded_pages: g(|h| h.degraded_pages),
                    unrecoverable_pages: g(|h| h.unrecoverable_pages),
                    compression_ratio: hb.map_or(0.0, |h| h.compression_ratio),
                    rtt_us: if me {
                        None
                    } else {
                        report.and_then(|r| r.rtt).map(|d| d.as_micros() as u64)
                    },
                    last_seen_ms: if me {
                        None
                    } else {
                        report
                            .map(|r| now.saturating_duration_since(r.last_seen).as_millis() as u64)
                    },
                    version: hb.map_or(String::new(), |h| h.version.clone()),
                }
            })
            .collect();
        if !config.nodes.contains_key(&self.id) {
            // Not registered yet: show ourselves anyway.
            nodes.push(NodeStatus {
                name: self.name.clone(),
                id: self.id,
                address: self.advertise.clone(),
                role: self.role,
                member_state: MemberState::Active,
                state: Liveness::Up,
                raft_role: own.raft_role.clone(),
                incarnation: 0,
                capacity_bytes: own.capacity_bytes,
                used_bytes: own.used_bytes,
                donate_bytes: self.donate_bytes,
                held_for_others_bytes: donor_usage,
                held_for_others_pages: donor_pages,
                own_pages_on_peers: own.remote_pages,
                own_bytes_on_peers: own.remote_bytes,
                stored_pages: own.stored_pages,
                degraded_pages: own.degraded_pages,
                unrecoverable_pages: own.unrecoverable_pages,
                compression_ratio: own.compression_ratio,
                rtt_us: None,
                last_seen_ms: None,
                version: own.version.clone(),
            });
        }
        ClusterStatus::new(
            config.cluster_id.clone(),
            self.name.clone(),
            leader.and_then(|id| config.nodes.get(&id).map(|n| n.name.clone())),
            self.registered_or_why()
                .map_or_else(Health::err, |()| Health::ok()),
            nodes,
        )
    }
}

fn registered(r: wire::JoinResult) -> Option<wire::JoinResult> {
    (r.outcome() == Outcome::Joined).then_some(r)
}

/// Uncompressed bytes of the locally held pages over the bytes they use.
fn compression_ratio(st: &store::StoreStats) -> f64 {
    let local = st.pages.saturating_sub(st.remote_pages);
    if st.used_bytes == 0 || local == 0 {
        return 0.0;
    }
    (local * PAGE_BYTES as u64) as f64 / st.used_bytes as f64
}

/// Decodes a donor's copy into `out` and checks it against the checksum
/// the owner recorded when it stored the page.
pub(super) fn decode_checked(compressed: bool, data: &[u8], checksum: u64, out: &mut Page) -> bool {
    let decoded = if compressed {
        store::compress::decompress(data, out)
    } else if data.len() == PAGE_BYTES {
        out.copy_from_slice(data);
        true
    } else {
        false
    };
    decoded && xxh3_64(out) == checksum
}

/// Takes member `id` out: the configuration first, so that owners stop
/// using it as a donor at once, whatever happens to the Raft change after.
async fn remove_member(m: &Membership, id: NodeId) -> Result<(), MembershipError> {
    m.propose(Command::Remove { id }).await?;
    m.remove_node(id).await
}

/// Why a join under a member's name is refused, and the way out.
fn name_taken(name: &str, by: NodeId) -> String {
    format!(
        "the name {name:?} is taken by node id {by}; if that node lost its data dir, \
         `ramster cluster replace {name}` on a member lets this one join in its place"
    )
}

pub fn role_name(r: Role) -> &'static str {
    match r {
        Role::Peer => "peer",
        Role::MemoryServer => "memory-server",
        Role::Client => "client",
    }
}

pub fn parse_role(s: &str) -> Option<Role> {
    Some(match s {
        "peer" => Role::Peer,
        "memory-server" => Role::MemoryServer,
        "client" => Role::Client,
        _ => return None,
    })
}

/// Serves heartbeats, Raft and joins from peers.
struct Control(Weak<Inner>);

impl ControlHandler for Control {
    fn handle(&self, peer: Arc<str>, request: peer_request::Kind) -> ControlFuture<'_> {
        Box::pin(async move {
            let inner = self
                .0
                .upgrade()
                .ok_or_else(|| unavailable("node stopping"))?;
            match request {
                peer_request::Kind::Heartbeat(hb) => {
                    if inner.speaks_as_member(&peer, hb.node_id) {
                        inner.owner_heard(&peer, hb.incarnation);
                        inner.peers.lock().record(&peer, Instant::now(), hb, None);
                    }
                    Ok(peer_response::Kind::Heartbeat(inner.own_heartbeat(&peer)))
                }
                peer_request::Kind::Raft(msg) => {
                    let m = inner
                        .membership
                        .get()
                        .ok_or_else(|| unavailable("membership not started"))?;
                    let req: RaftRequest = serde_json::from_slice(&msg.body).map_err(|e| {
                        RpcRefusal::new(PeerErrorCode::Malformed, format!("raft message: {e}"))
                    })?;
                    m.check_sender(&peer, &req).map_err(|why| {
                        warn!(peer = %peer, %why, "Raft request refused");
                        RpcRefusal::new(PeerErrorCode::NotOwner, why)
                    })?;
                    let reply = membership::network::handle(m.raft(), req).await;
                    let body = serde_json::to_vec(&reply)
                        .map_err(|e| unavailable(format!("raft reply: {e}")))?;
                    Ok(peer_response::Kind::Raft(wire::RaftMessage {
                        body: body.into(),
                    }))
                }
                peer_request::Kind::ChangeNode(c) => Ok(peer_response::Kind::ChangeNode(
                    inner.on_change_node(c).await,
                )),
                peer_request::Kind::Join(j) => {
                    if inner.membership.get().is_none() {
                        return Err(unavailable("membership not started"));
                    }
                    inner.on_join(&peer, j).await.map(peer_response::Kind::Join)
                }
                _ => Err(RpcRefusal::new(
                    PeerErrorCode::Malformed,
                    "not a control request",
                )),
            }
        })
    }
}

/// Raft's RPCs over the peer transport, on control streams.
#[derive(Clone)]
struct QuicRaft(Weak<Inner>);

impl RaftTransport for QuicRaft {
    async fn call(
        &self,
        target: NodeId,
        node: &BasicNode,
        request: RaftRequest,
        deadline: Duration,
    ) -> Result<RaftReply, membership::TransportError> {
        let unreachable = |e: String| membership::TransportError::Unreachable(target, e);
        let inner = self
            .0
            .upgrade()
            .ok_or_else(|| unreachable("node stopping".into()))?;
        let (name, addr) = split_raft_addr(&node.addr)
            .ok_or_else(|| unreachable(format!("bad raft address {:?}", node.addr)))?;
        let session = inner.session(name, addr).await.map_err(unreachable)?;
        let body = serde_json::to_vec(&request).map_err(|e| unreachable(e.to_string()))?;
        let reply = session
            .raft(body, deadline)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        serde_json::from_slice(&reply).map_err(|_| membership::TransportError::Protocol(target))
    }
}

impl RemotePages for ClusterNode {
    fn fetch_many<'a, 'b: 'a>(
        &'a self,
        remotes: &'a [RemoteRef],
        outs: &'a mut [&'b mut Page],
    ) -> Fetch<'a> {
        Box::pin(self.inner.fetch_many(remotes, outs))
    }

    fn wait(&self, fetch: Fetch<'_>) -> Vec<LoadResult> {
        // A client (an NBD connection's thread) waits on the donors: their
        // answers should find the transport thread polling.
        if let Some(poll) = self.inner.endpoint.client_thread().poll {
            poll.touch();
        }
        // Results left out stay `Unavailable`.
        self.inner.block_on(fetch).unwrap_or_default()
    }

    fn make_room(&self) -> bool {
        let inner = &self.inner;
        if !inner.any_donor() || !inner.store.remotify_can_make_room() {
            return false;
        }
        ClusterCounters::add(&inner.metrics.cluster.store_throttles, 1);
        let room_made = inner.block_on(async {
            let room = inner.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            inner.wake_movers.notify_one();
            tokio::time::timeout(Duration::from_millis(MAKE_ROOM_WAIT_MS), room)
                .await
                .is_ok()
        });
        room_made.unwrap_or(false)
    }

    fn bring_home(&self, space: u32, max: usize) -> usize {
        let refs = self.inner.store.remote_of_space(space, max);
        if refs.is_empty() {
            return 0;
        }
        self.inner
            .block_on(super::movers::bring_home(&self.inner, &refs))
            .unwrap_or(0)
    }

    fn client_thread(&self) -> Option<crate::frontend::ClientThread> {
        Some(self.inner.endpoint.client_thread())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_run_announces_a_larger_incarnation_even_after_the_clock_went_back() {
        let dir = tempfile::tempdir().unwrap();
        let first = next_incarnation(dir.path()).unwrap();
        let second = next_incarnation(dir.path()).unwrap();
        assert!(second > first);
        // The last run's clock was far ahead of ours (ours was stepped back).
        let ahead = first + 3_600_000_000;
        std::fs::write(dir.path().join(INCARNATION_FILE), ahead.to_string()).unwrap();
        assert_eq!(next_incarnation(dir.path()).unwrap(), ahead + 1);
        std::fs::write(dir.path().join(INCARNATION_FILE), "garbage").unwrap();
        assert!(
            next_incarnation(dir.path()).is_err(),
            "a damaged file is not ignored"
        );
    }
}
