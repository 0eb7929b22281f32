//! Membership: the cluster configuration (nodes, roles, quotas,
//! incarnations), replicated by Raft (openraft) and persisted under
//! `DATA_DIR/raft/`, so a full restart keeps the cluster.
//!
//! The rest of the node sees [`Membership`] and [`ClusterConfig`], never Raft
//! types: it proposes [`Command`]s and follows the configuration through a
//! watch channel. Liveness and spare memory travel in heartbeats, not here.

pub mod network;
pub mod state;
pub mod storage;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use tokio::sync::watch;

pub use network::{
    RaftReply, RaftRequest, RaftTransport, TransportError, raft_addr, split_raft_addr,
};
pub use state::{ClusterConfig, Command, CommandResult, MemberState, NodeId, NodeInfo, Role};

openraft::declare_raft_types!(
    /// Raft's types for the cluster configuration.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
);

/// The Raft instance of a node.
pub type Raft = openraft::Raft<TypeConfig>;

/// Most voters: more adds latency to every change and buys little.
pub const VOTERS_MAX: usize = 5;

/// Raft timings, in milliseconds: heartbeats well inside the election timeout.
pub const HEARTBEAT_INTERVAL_MS: u64 = 250;
pub const ELECTION_TIMEOUT_MIN_MS: u64 = 1000;
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 2000;

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("raft storage under {path}: {source}")]
    Storage {
        path: String,
        source: std::io::Error,
    },
    #[error("not the leader; the leader is {leader:?}")]
    NotLeader { leader: Option<(NodeId, String)> },
    #[error("raft: {0}")]
    Raft(String),
}

/// This node's view of, and say in, the cluster configuration.
pub struct Membership {
    id: NodeId,
    raft: Raft,
    config: watch::Receiver<Arc<ClusterConfig>>,
}

impl Membership {
    /// Opens the Raft state under `dir` and starts Raft. A node that was in
    /// a cluster before rejoins it from its own log; a new one waits to be
    /// bootstrapped or added.
    pub async fn open<T: RaftTransport>(
        id: NodeId,
        dir: &Path,
        transport: T,
    ) -> Result<Membership, MembershipError> {
        let storage_err = |source| MembershipError::Storage {
            path: dir.display().to_string(),
            source,
        };
        let log = storage::LogStore::open(dir).map_err(storage_err)?;
        let machine = storage::ConfigMachine::open(dir).map_err(storage_err)?;
        let config = machine.subscribe();
        let raft_config = openraft::Config {
            cluster_name: "ramster".into(),
            heartbeat_interval: HEARTBEAT_INTERVAL_MS,
            election_timeout_min: ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
            ..Default::default()
        }
        .validate()
        .map_err(|e| MembershipError::Raft(e.to_string()))?;
        let raft = Raft::new(
            id,
            Arc::new(raft_config),
            network::Network::new(transport),
            log,
            machine,
        )
        .await
        .map_err(|e| MembershipError::Raft(e.to_string()))?;
        Ok(Membership { id, raft, config })
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The configuration as last applied here.
    pub fn config(&self) -> Arc<ClusterConfig> {
        self.config.borrow().clone()
    }

    /// Follows configuration changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterConfig>> {
        self.config.clone()
    }

    /// Whether this node has ever been part of a Raft group.
    pub async fn is_initialized(&self) -> bool {
        self.raft.is_initialized().await.unwrap_or(false)
    }

    /// Forms a new cluster with these voters. Only the first call anywhere
    /// counts; on a node that already has a log it is a no-op.
    pub async fn bootstrap(&self, voters: BTreeMap<NodeId, String>) -> Result<(), MembershipError> {
        let nodes: BTreeMap<NodeId, BasicNode> = voters
            .into_iter()
            .map(|(id, addr)| (id, BasicNode::new(addr)))
            .collect();
        match self.raft.initialize(nodes).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(MembershipError::Raft(e.to_string())),
        }
    }

    /// The current leader and its address, if known.
    pub async fn leader(&self) -> Option<(NodeId, String)> {
        let metrics = self.raft.metrics().borrow().clone();
        let leader = metrics.current_leader?;
        let addr = metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
            .unwrap_or_default();
        Some((leader, addr))
    }

    /// Adds a node as a learner, then promotes learners two at a time
    /// while there are fewer than [`VOTERS_MAX`] voters: 1 → 3 → 5, since an
    /// even count adds no fault tolerance. Leader only.
    pub async fn add_node(&self, id: NodeId, addr: String) -> Result<(), MembershipError> {
        self.raft
            .add_learner(id, BasicNode::new(addr), true)
            .await
            .map_err(|e| self.write_error(e))?;
        let membership = self.raft_membership();
        let voters = membership.voter_ids().count();
        let learners: BTreeSet<NodeId> = membership.learner_ids().take(2).collect();
        if voters < VOTERS_MAX && learners.len() == 2 {
            self.change(ChangeMembers::AddVoterIds(learners)).await?;
        }
        Ok(())
    }

    /// Removes a node from Raft (voter or learner). Leader only.
    pub async fn remove_node(&self, id: NodeId) -> Result<(), MembershipError> {
        let ids: BTreeSet<NodeId> = [id].into();
        let membership = self.raft_membership();
        if membership.voter_ids().any(|v| v == id) {
            self.change(ChangeMembers::RemoveVoters(ids.clone()))
                .await?;
        }
        self.change(ChangeMembers::RemoveNodes(ids)).await?;
        Ok(())
    }

    /// Refuses a Raft request `peer` sends in another node's name (see
    /// [`network::check_sender`]).
    pub fn check_sender(&self, peer: &str, request: &RaftRequest) -> Result<(), String> {
        network::check_sender(&self.raft_membership(), peer, request)
    }

    /// Whether Raft already knows the node (as voter or learner).
    pub fn has_raft_node(&self, id: NodeId) -> bool {
        self.raft_membership().get_node(&id).is_some()
    }

    /// The Raft membership as last seen here.
    fn raft_membership(&self) -> openraft::Membership<NodeId, BasicNode> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .clone()
    }

    /// Changes Raft's voters or learners and waits until it is committed.
    async fn change(
        &self,
        changes: ChangeMembers<NodeId, BasicNode>,
    ) -> Result<(), MembershipError> {
        self.raft
            .change_membership(changes, false)
            .await
            .map(drop)
            .map_err(|e| self.write_error(e))
    }

    /// Proposes a configuration change and waits until it is committed and
    /// applied. Leader only; otherwise says who the leader is.
    pub async fn propose(&self, cmd: Command) -> Result<CommandResult, MembershipError> {
        self.raft
            .client_write(cmd)
            .await
            .map(|r| r.data)
            .map_err(|e| self.write_error(e))
    }

    fn write_error(
        &self,
        e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>,
    ) -> MembershipError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                MembershipError::NotLeader {
                    leader: f
                        .leader_id
                        .map(|id| (id, f.leader_node.map(|n| n.addr).unwrap_or_default())),
                }
            }
            e => MembershipError::Raft(e.to_string()),
        }
    }

    /// Stops Raft.
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}

#[cfg(test)]
mod tests;
