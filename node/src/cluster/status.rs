//! What `ramster status` shows: the cluster as one node sees it, from the
//! replicated configuration (who is a member) and heartbeats (who is alive,
//! how full). Plain data, serialised as the admin endpoint's `/v1/status`.

use serde::{Deserialize, Serialize};

use super::membership::{MemberState, Role};

/// Liveness of a node, by heartbeats.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Liveness {
    Up,
    /// Missed heartbeats for a while; not chosen for new pages.
    Suspect,
    /// Silent past the down timeout (or never heard from).
    Down,
}

/// One row of the status table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub id: u64,
    /// Advertised peer address (QUIC).
    pub address: String,
    pub role: Role,
    /// Active or draining (operators' lifecycle).
    pub member_state: MemberState,
    pub state: Liveness,
    /// leader / follower / candidate / learner / unknown.
    pub raft_role: String,
    pub incarnation: u64,
    pub capacity_bytes: u64,
    /// Bytes of the node's own page store in use.
    pub used_bytes: u64,
    /// Most bytes the node holds for other owners.
    pub donate_bytes: u64,
    /// Bytes of other owners' pages it holds now.
    pub held_for_others_bytes: u64,
    /// The node's own pages kept on donors.
    pub own_pages_on_peers: u64,
    pub own_bytes_on_peers: u64,
    /// Pages the node's store holds (local and remote).
    pub stored_pages: u64,
    /// Uncompressed bytes over the bytes used for them; 0 when empty.
    pub compression_ratio: f64,
    /// Round trip from the answering node; `None` for itself or unknown.
    pub rtt_us: Option<u64>,
    /// Milliseconds since the last heartbeat; `None` for itself or never.
    pub last_seen_ms: Option<u64>,
    pub version: String,
}

/// HEALTH_OK / HEALTH_WARN / HEALTH_ERR, as Ceph says it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum HealthLevel {
    #[serde(rename = "HEALTH_OK")]
    Ok,
    #[serde(rename = "HEALTH_WARN")]
    Warn,
    #[serde(rename = "HEALTH_ERR")]
    Err,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub status: HealthLevel,
    /// Why it is not OK, one line each.
    pub reasons: Vec<String>,
}

/// The whole answer of `/v1/status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster_id: String,
    /// The node that answered.
    pub answered_by: String,
    pub leader: Option<String>,
    pub health: Health,
    pub nodes_up: usize,
    pub nodes_total: usize,
    pub memory_servers: usize,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub held_for_others_bytes: u64,
    pub remote_bytes: u64,
    pub nodes: Vec<NodeStatus>,
}
