//! How Raft's RPCs travel. Raft sees [`RaftRequest`]s go out through a
//! [`RaftTransport`] and come in through [`handle`]; the node's peer
//! transport (QUIC) implements the trait, and tests use an in-process one
//! that can cut links.

use std::future::Future;
use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
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
