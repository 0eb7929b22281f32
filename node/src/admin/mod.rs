//! The admin endpoint: what operators and their tools ask a node over HTTP.
//!
//! - `/metrics`: Prometheus text format ([`exposition`], [`node_metrics`]).
//! - `/health/live`: 200 while the process serves HTTP at all.
//! - `/health/ready`: 200 when the node takes pages, 503 with the reason.
//! - `/v1/status`: the cluster as this node sees it ([`ClusterStatus`]),
//!   health assessed by [`ClusterStatus::assess`]; what `ramster status`
//!   and `ramster health` read.
//! - `POST /v1/members/NAME/{drain,activate,remove}`: an operator's change
//!   to a member, made through the Raft leader (`ramster cluster`).
//!
//! A standalone node answers for itself; a node in a cluster answers with
//! what its cluster layer knows, through [`ClusterView`].

pub mod exposition;
pub mod http;
pub mod node_metrics;
mod process;
mod routes;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::cluster::membership::{MemberState, Role};
use crate::cluster::status::{ClusterStatus, Health, Liveness, NodeStatus};
use crate::frontend::Frontend;
use crate::frontend::nbd::Exports;
use crate::metrics::NodeMetrics;
pub use exposition::MetricsWriter;
pub use routes::{
    CAPACITY_PATH, DONATE_PATH, HEALTH_LIVE_PATH, HEALTH_READY_PATH, MEMBERS_PATH, METRICS_PATH,
    STATUS_PATH,
};

/// Where the admin endpoint listens unless told otherwise; also where
/// `ramster status` and `ramster health` look by default.
pub const ADMIN_LISTEN_DEFAULT: &str = "127.0.0.1:7801";

/// The cluster id a node outside any cluster reports.
pub const STANDALONE_CLUSTER_ID: &str = "standalone";

/// What the cluster layer tells the admin endpoint.
pub trait ClusterView: Send + Sync {
    /// Every member's row and the leader, as this node sees them. Totals and
    /// health may be left unset: the endpoint assesses them from the rows.
    fn status(&self) -> ClusterStatus;
    /// Whether this node can take part: a member with a known leader, say.
    /// The error is the reason, shown to probes.
    fn ready(&self) -> Result<(), String>;
    /// The cluster layer's own families (donor usage, peers), written after
    /// the node's.
    fn write_metrics(&self, out: &mut MetricsWriter);
    /// Changes a member through the leader; what was done, or why not.
    fn change_member(&self, node: &str, action: MemberAction) -> ChangeFuture;
    /// Donates `bytes` from now on (up to `--donate`); what was done.
    fn set_donation(&self, bytes: u64) -> Result<String, ChangeError>;
    /// The store's capacity changed: move pages now (remotify what is held
    /// above the new watermarks, or bring pages home below them) rather
    /// than at the next tick.
    fn capacity_changed(&self);
}

/// An operator's change to a member.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum MemberAction {
    /// Take no new pages; owners move the copies it holds elsewhere.
    Drain,
    /// Undo a drain.
    Activate,
    /// Out of the cluster. Refused while it holds peers' pages, unless
    /// `force`.
    Remove { force: bool },
    /// Out of the cluster because it lost its data: only while it is
    /// down; a new run under the name may then join.
    Replace,
}

/// Why a change was not made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeError {
    /// The leader said no (unknown node, still holding pages, ...).
    Refused(String),
    /// No leader could be asked; trying again later may work.
    Unavailable(String),
}

pub type ChangeFuture = Pin<Box<dyn Future<Output = Result<String, ChangeError>> + Send>>;

/// Where the node is in its life, as readiness sees it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Listeners being opened; nothing takes pages yet.
    Starting = 0,
    /// Every front end is serving.
    Serving = 1,
    /// Shutting down: take no new work here.
    Stopping = 2,
}

/// Everything the admin endpoint reads.
pub struct AdminContext {
    frontend: Arc<Frontend>,
    metrics: Arc<NodeMetrics>,
    exports: Arc<Exports>,
    cluster: Option<Arc<dyn ClusterView>>,
    phase: AtomicU8,
}

impl AdminContext {
    /// A context in [`Phase::Starting`].
    pub fn new(
        frontend: Arc<Frontend>,
        metrics: Arc<NodeMetrics>,
        exports: Arc<Exports>,
        cluster: Option<Arc<dyn ClusterView>>,
    ) -> AdminContext {
        AdminContext {
            frontend,
            metrics,
            exports,
            cluster,
            phase: AtomicU8::new(Phase::Starting as u8),
        }
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Serving,
            _ => Phase::Stopping,
        }
    }

    /// Ready when every front end serves and, in a cluster, the cluster
    /// layer says so too.
    pub fn ready(&self) -> Result<(), String> {
        match self.phase() {
            Phase::Starting => return Err("the node is starting".into()),
            Phase::Stopping => return Err("the node is stopping".into()),
            Phase::Serving => {}
        }
        match &self.cluster {
            Some(c) => c.ready(),
            None => Ok(()),
        }
    }

    /// One scrape's answer.
    pub fn metrics_text(&self) -> String {
        let mut out = MetricsWriter::new();
        node_metrics::write(&mut out, &self.frontend, &self.metrics, &self.exports);
        if let Some(c) = &self.cluster {
            c.write_metrics(&mut out);
        }
        let mut text = out.finish();
        text.push_str(&self.metrics.render_latencies());
        text
    }

    /// Changes a member; a node outside any cluster has none to change.
    pub fn change_member(&self, node: &str, action: MemberAction) -> ChangeFuture {
        match &self.cluster {
            Some(c) => c.change_member(node, action),
            None => Box::pin(std::future::ready(Err(ChangeError::Refused(
                "this node is not in a cluster".into(),
            )))),
        }
    }

    /// Changes what this node donates; a node outside any cluster donates
    /// nothing.
    pub fn set_donation(&self, bytes: u64) -> Result<String, ChangeError> {
        match &self.cluster {
            Some(c) => c.set_donation(bytes),
            None => Err(ChangeError::Refused("this node is not in a cluster".into())),
        }
    }

    /// Gives this node's store a new capacity, at most the one it started
    /// with. Lowered below what the store holds, every page is kept: new
    /// stores wait or are refused while remotify ships the coldest pages to
    /// donors (in a cluster) or clients free some.
    pub fn set_capacity(&self, bytes: u64) -> Result<String, ChangeError> {
        let store = self.frontend.store();
        if store.capacity_at_start() == 0 {
            return Err(ChangeError::Refused(
                "this node has no store of its own (a memory server donates all it has)".into(),
            ));
        }
        store
            .set_capacity(bytes)
            .map_err(|e| ChangeError::Refused(e.to_string()))?;
        if let Some(c) = &self.cluster {
            c.capacity_changed();
        }
        let held = store.used_bytes();
        tracing::info!(capacity = bytes, held, "store capacity changed");
        Ok(format!(
            "{} has a capacity of {bytes} bytes (at most {} from --capacity); it holds {held}, {} above it",
            self.frontend.name(),
            store.capacity_at_start(),
            held.saturating_sub(bytes)
        ))
    }

    /// The status with totals and health filled in.
    pub fn status(&self) -> ClusterStatus {
        let mut status = match &self.cluster {
            Some(c) => c.status(),
            None => self.standalone_status(),
        };
        status.assess();
        status
    }

    /// A node outside any cluster: one row, itself, up.
    fn standalone_status(&self) -> ClusterStatus {
        let s = self.frontend.store().stats();
        let name = self.frontend.name().to_string();
        let me = NodeStatus {
            name: name.clone(),
            id: 0,
            address: String::new(),
            role: Role::Peer,
            member_state: MemberState::Active,
            state: Liveness::Up,
            raft_role: "none".into(),
            incarnation: 0,
            capacity_bytes: s.capacity_bytes,
            used_bytes: s.used_bytes,
            donate_bytes: 0,
            held_for_others_bytes: 0,
            held_for_others_pages: 0,
            own_pages_on_peers: s.remote_pages,
            own_bytes_on_peers: s.remote_bytes,
            stored_pages: s.pages,
            degraded_pages: 0,
            unrecoverable_pages: 0,
            compression_ratio: s.compression_ratio(),
            rtt_us: None,
            last_seen_ms: None,
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        ClusterStatus::new(
            STANDALONE_CLUSTER_ID.into(),
            name,
            None,
            Health::ok(),
            vec![me],
        )
    }
}

impl AdminContext {
    /// The answer to one request: changes (POST) may wait on the cluster,
    /// reads never.
    pub async fn answer(&self, req: &http::Request) -> http::Response {
        routes::answer(self, req).await
    }
}

/// Serves the admin endpoint on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, ctx: Arc<AdminContext>, shutdown: watch::Receiver<bool>) {
    http::serve(
        listener,
        move |req| {
            let ctx = ctx.clone();
            async move { ctx.answer(&req).await }
        },
        shutdown,
    )
    .await
}
