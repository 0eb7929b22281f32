//! How Raft's RPCs travel. Raft sees [`RaftRequest`]s go out through a
//! [`RaftTransport`] and come in through [`handle`]; the node's peer
//! transport (QUIC) implements the trait, and tests use an in-process one
//! that can cut links.

use std::future::Future;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Membership};
use serde::{Deserialize, Serialize};

use super::state::NodeId;
use super::{Raft, TypeConfig};

/// A Raft RPC, serialisable for any transport.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
}

/// The answer to a [`RaftRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
}

/// Why an RPC did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Not connected, refused, or timed out: back off and retry later.
    #[error("peer {0} unreachable: {1}")]
    Unreachable(NodeId, String),
    /// The reply did not match the request.
    #[error("peer {0} answered out of protocol")]
    Protocol(NodeId),
}

/// Carries Raft RPCs to other nodes.
pub trait RaftTransport: Clone + Send + Sync + 'static {
    fn call(
        &self,
        target: NodeId,
        node: &BasicNode,
        request: RaftRequest,
        deadline: Duration,
    ) -> impl Future<Output = Result<RaftReply, TransportError>> + Send;
}

/// A member's Raft address: `NAME@HOST:PORT` (the name is what TLS checks).
pub fn raft_addr(name: &str, advertise: &str) -> String {
    format!("{name}@{advertise}")
}

/// The name and the peer address of a Raft address.
pub fn split_raft_addr(addr: &str) -> Option<(&str, &str)> {
    addr.split_once('@')
}

impl RaftRequest {
    /// The node this request speaks for: the leader sending entries or a
    /// snapshot, or the candidate asking for a vote.
    pub fn sender(&self) -> Option<NodeId> {
        match self {
            RaftRequest::AppendEntries(r) => r.vote.leader_id().voted_for(),
            RaftRequest::InstallSnapshot(r) => r.vote.leader_id().voted_for(),
            RaftRequest::Vote(r) => r.vote.leader_id().voted_for(),
        }
    }
}

/// Refuses a request that `peer` (the name its certificate proves) sends
/// in the name of another node: a certificate lets a node speak for
/// itself, not lead or campaign as a member it is not.
///
/// A member's name may speak only as its own id, and a member's id only
/// from its name. A name the membership does not list may send entries
/// under an id it does not list either: a node that missed the change
/// adding its new leader must still hear from it to catch up. It may not
/// ask for votes: a candidate that is a voter is known to the majority
/// that committed it.
pub fn check_sender(
    membership: &Membership<NodeId, BasicNode>,
    peer: &str,
    request: &RaftRequest,
) -> Result<(), String> {
    let sender = request
        .sender()
        .ok_or_else(|| format!("{peer} sent a Raft request in nobody's name"))?;
    let name_of = |id: NodeId| {
        membership
            .get_node(&id)
            .map(|n| split_raft_addr(&n.addr).map_or(n.addr.as_str(), |(name, _)| name))
    };
    let peer_id = membership
        .nodes()
        .map(|(id, _)| *id)
        .find(|id| name_of(*id) == Some(peer));
    match (peer_id, name_of(sender)) {
        (Some(id), _) if id == sender => Ok(()),
        (Some(id), _) => Err(format!(
            "{peer} (node {id}) sent a Raft request as node {sender}"
        )),
        (None, Some(name)) => Err(format!(
            "{peer} sent a Raft request as node {sender}, which is {name}"
        )),
        (None, None) if matches!(request, RaftRequest::Vote(_)) => {
            Err(format!("{peer} is not a member and may not ask for votes"))
        }
        (None, None) => Ok(()),
    }
}

/// Applies an incoming RPC to the local Raft.
pub async fn handle(raft: &Raft, request: RaftRequest) -> RaftReply {
    match request {
        RaftRequest::AppendEntries(r) => RaftReply::AppendEntries(raft.append_entries(r).await),
        RaftRequest::InstallSnapshot(r) => {
            RaftReply::InstallSnapshot(raft.install_snapshot(r).await)
        }
        RaftRequest::Vote(r) => RaftReply::Vote(raft.vote(r).await),
    }
}

/// openraft's network factory over a [`RaftTransport`].
#[derive(Clone)]
pub struct Network<T> {
    transport: T,
}

impl<T: RaftTransport> Network<T> {
    pub fn new(transport: T) -> Self {
        Network { transport }
    }
}

/// A client of one peer.
pub struct PeerClient<T> {
    transport: T,
    target: NodeId,
    node: BasicNode,
}

impl<T: RaftTransport> RaftNetworkFactory<TypeConfig> for Network<T> {
    type Network = PeerClient<T>;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerClient {
            transport: self.transport.clone(),
            target,
            node: node.clone(),
        }
    }
}

impl<T: RaftTransport> PeerClient<T> {
    async fn call<E: std::error::Error>(
        &self,
        request: RaftRequest,
        option: &RPCOption,
    ) -> Result<RaftReply, RPCError<NodeId, BasicNode, E>> {
        self.transport
            .call(self.target, &self.node, request, option.hard_ttl())
            .await
            .map_err(|e| match e {
                TransportError::Unreachable(..) => RPCError::Unreachable(Unreachable::new(&e)),
                TransportError::Protocol(_) => RPCError::Network(NetworkError::new(&e)),
            })
    }

    fn remote<E: std::error::Error>(&self, e: E) -> RPCError<NodeId, BasicNode, E> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.node.clone(),
            e,
        ))
    }

    fn protocol<E: std::error::Error>(&self) -> RPCError<NodeId, BasicNode, E> {
        RPCError::Network(NetworkError::new(&TransportError::Protocol(self.target)))
    }
}

impl<T: RaftTransport> RaftNetwork<TypeConfig> for PeerClient<T> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.call(RaftRequest::AppendEntries(rpc), &option).await? {
            RaftReply::AppendEntries(r) => r.map_err(|e| self.remote(e)),
            _ => Err(self.protocol()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self
            .call(RaftRequest::InstallSnapshot(rpc), &option)
            .await?
        {
            RaftReply::InstallSnapshot(r) => r.map_err(|e| self.remote(e)),
            _ => Err(self.protocol()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.call(RaftRequest::Vote(rpc), &option).await? {
            RaftReply::Vote(r) => r.map_err(|e| self.remote(e)),
            _ => Err(self.protocol()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::Vote;
    use openraft::raft::{AppendEntriesRequest, VoteRequest};

    use super::*;

    /// Voters a (1) and b (2), learner c (3).
    fn membership() -> Membership<NodeId, BasicNode> {
        let nodes: BTreeMap<NodeId, BasicNode> = [(1, "a"), (2, "b"), (3, "c")]
            .into_iter()
            .map(|(id, name)| (id, BasicNode::new(raft_addr(name, "127.0.0.1:7800"))))
            .collect();
        Membership::new(vec![BTreeSet::from([1, 2])], nodes)
    }

    fn vote(candidate: NodeId) -> RaftRequest {
        RaftRequest::Vote(VoteRequest::new(Vote::new(7, candidate), None))
    }

    fn entries(leader: NodeId) -> RaftRequest {
        RaftRequest::AppendEntries(AppendEntriesRequest {
            vote: Vote::new_committed(7, leader),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        })
    }

    #[test]
    fn members_speak_only_as_themselves() {
        let m = membership();
        assert_eq!(check_sender(&m, "a", &vote(1)), Ok(()));
        assert_eq!(check_sender(&m, "b", &entries(2)), Ok(()));
        // A learner speaks as itself too (Raft refuses it a vote anyway).
        assert_eq!(check_sender(&m, "c", &entries(3)), Ok(()));
        let err = check_sender(&m, "c", &vote(1)).unwrap_err();
        assert!(
            err.contains("c (node 3) sent a Raft request as node 1"),
            "{err}"
        );
        assert!(check_sender(&m, "a", &entries(2)).is_err());
        // Nor as an id no member has.
        assert!(check_sender(&m, "a", &entries(9)).is_err());
    }

    #[test]
    fn a_stranger_cannot_speak_as_a_member_nor_campaign() {
        let m = membership();
        let err = check_sender(&m, "mallory", &entries(1)).unwrap_err();
        assert!(err.contains("which is a"), "{err}");
        let err = check_sender(&m, "mallory", &vote(9)).unwrap_err();
        assert!(err.contains("not a member"), "{err}");
        // A leader this node has not heard of yet (it missed the change
        // that added it) must reach it to bring it up to date.
        assert_eq!(check_sender(&m, "d", &entries(4)), Ok(()));
        // A node that is not initialised knows nobody.
        let empty = Membership::new(vec![BTreeSet::new()], BTreeMap::<NodeId, BasicNode>::new());
        assert_eq!(check_sender(&empty, "a", &entries(1)), Ok(()));
        assert!(check_sender(&empty, "a", &vote(1)).is_err());
    }
}
