//! The cluster configuration that Raft replicates, and the commands that
//! change it. Pure data and a pure `apply`: no I/O, no Raft types beyond the
//! node id, so it is tested on its own.
//!
//! Liveness and spare memory are not here: they change every second and
//! travel in heartbeats. What is here changes when an operator or a node's
//! lifecycle says so: who is a member, at which address, in which role, with
//! how much memory, under which quota, in which incarnation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node's id in Raft and in page descriptors.
pub type NodeId = u64;

/// What a node does with its memory.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Uses memory for its own clients and donates spare memory to others.
    #[default]
    Peer,
    /// Donates its whole capacity; serves no local clients.
    MemoryServer,
    /// Uses the cluster's memory; never donates.
    Client,
}

/// Lifecycle of a member as operators see it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MemberState {
    #[default]
    Active,
    /// Pages it holds are being moved elsewhere; it takes no new ones.
    Draining,
}

/// One member of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    /// Where peers reach it (QUIC).
    pub advertise: String,
    pub role: Role,
    pub capacity_bytes: u64,
    /// Most bytes it holds for other owners.
    pub donate_bytes: u64,
    /// Failure-domain label; replicas go to distinct zones when set.
    pub zone: Option<String>,
    pub state: MemberState,
    /// Bumped each time the node restarts: donors drop pages of older
    /// incarnations, since the owner that stored them is gone.
    pub incarnation: u64,
}

/// The replicated cluster configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// Chosen by the node that bootstrapped the cluster; never changes.
    pub cluster_id: String,
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    /// Per-owner limit on bytes stored on other nodes; absent = unlimited.
    pub quotas: BTreeMap<NodeId, u64>,
}

/// A change to the configuration, proposed through Raft.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Names the cluster; only the first one counts.
    SetClusterId {
        cluster_id: String,
    },
    /// Adds a node, or updates one that restarted: its incarnation goes up
    /// by one and its address, role and sizes are refreshed.
    Register {
        id: NodeId,
        name: String,
        advertise: String,
        role: Role,
        capacity_bytes: u64,
        donate_bytes: u64,
        zone: Option<String>,
    },
    SetRole {
        id: NodeId,
        role: Role,
    },
    SetDonate {
        id: NodeId,
        donate_bytes: u64,
    },
    SetState {
        id: NodeId,
        state: MemberState,
    },
    SetQuota {
        owner: NodeId,
        bytes: Option<u64>,
    },
    Remove {
        id: NodeId,
    },
}

/// What applying a command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum CommandResult {
    #[default]
    Done,
    /// `Register`: the node's incarnation after it.
    Registered { incarnation: u64 },
    /// The command named a node that is not a member.
    UnknownNode { id: NodeId },
    /// `Register` for a name already taken by another id.
    NameTaken { name: String, by: NodeId },
}

impl ClusterConfig {
    /// Applies one command. Deterministic: every replica computes the same.
    pub fn apply(&mut self, cmd: &Command) -> CommandResult {
        match cmd {
            Command::SetClusterId { cluster_id } => {
                if self.cluster_id.is_empty() {
                    self.cluster_id = cluster_id.clone();
                }
                CommandResult::Done
            }
            Command::Register {
                id,
                name,
                advertise,
                role,
                capacity_bytes,
                donate_bytes,
                zone,
            } => {
                if let Some(by) = self.name_taken(name, *id) {
                    return CommandResult::NameTaken {
                        name: name.clone(),
                        by,
                    };
                }
                let incarnation = self.nodes.get(id).map_or(1, |n| n.incarnation + 1);
                let state = self.nodes.get(id).map_or(MemberState::Active, |n| n.state);
                self.nodes.insert(
                    *id,
                    NodeInfo {
                        name: name.clone(),
                        advertise: advertise.clone(),
                        role: *role,
                        capacity_bytes: *capacity_bytes,
                        donate_bytes: *donate_bytes,
                        zone: zone.clone(),
                        state,
                        incarnation,
                    },
                );
                CommandResult::Registered { incarnation }
            }
            Command::SetRole { id, role } => self.update(*id, |n| n.role = *role),
            Command::SetDonate { id, donate_bytes } => {
                self.update(*id, |n| n.donate_bytes = *donate_bytes)
            }
            Command::SetState { id, state } => self.update(*id, |n| n.state = *state),
            Command::SetQuota { owner, bytes } => {
                if !self.nodes.contains_key(owner) {
                    return CommandResult::UnknownNode { id: *owner };
                }
                match bytes {
                    Some(b) => self.quotas.insert(*owner, *b),
                    None => self.quotas.remove(owner),
                };
                CommandResult::Done
            }
            Command::Remove { id } => {
                if self.nodes.remove(id).is_none() {
                    return CommandResult::UnknownNode { id: *id };
                }
                self.quotas.remove(id);
                CommandResult::Done
            }
        }
    }

    /// The member other than `id` that goes by `name`, if any: names are
    /// what certificates prove, so each belongs to one node id.
    pub fn name_taken(&self, name: &str, id: NodeId) -> Option<NodeId> {
        self.nodes
            .iter()
            .find(|(other, n)| **other != id && n.name == name)
            .map(|(&by, _)| by)
    }

    fn update(&mut self, id: NodeId, f: impl FnOnce(&mut NodeInfo)) -> CommandResult {
        match self.nodes.get_mut(&id) {
            Some(n) => {
                f(n);
                CommandResult::Done
            }
            None => CommandResult::UnknownNode { id },
        }
    }

    pub fn node_by_name(&self, name: &str) -> Option<(NodeId, &NodeInfo)> {
        self.nodes
            .iter()
            .find(|(_, n)| n.name == name)
            .map(|(id, n)| (*id, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(id: NodeId, name: &str) -> Command {
        Command::Register {
            id,
            name: name.into(),
            advertise: format!("127.0.0.{id}:7000"),
            role: Role::Peer,
            capacity_bytes: 1 << 30,
            donate_bytes: 1 << 29,
            zone: None,
        }
    }

    #[test]
    fn a_restart_registers_a_new_incarnation() {
        let mut c = ClusterConfig::default();
        assert_eq!(
            c.apply(&register(1, "a")),
            CommandResult::Registered { incarnation: 1 }
        );
        c.apply(&Command::SetState {
            id: 1,
            state: MemberState::Draining,
        });
        assert_eq!(
            c.apply(&register(1, "a")),
            CommandResult::Registered { incarnation: 2 }
        );
        // Draining survives a restart: an operator's decision, not the node's.
        assert_eq!(c.nodes[&1].state, MemberState::Draining);
    }

    #[test]
    fn names_are_unique() {
        let mut c = ClusterConfig::default();
        c.apply(&register(1, "a"));
        assert_eq!(
            c.apply(&register(2, "a")),
            CommandResult::NameTaken {
                name: "a".into(),
                by: 1
            }
        );
        assert_eq!(c.nodes.len(), 1);
    }

    #[test]
    fn cluster_id_is_set_once_and_unknown_nodes_are_reported() {
        let mut c = ClusterConfig::default();
        c.apply(&Command::SetClusterId {
            cluster_id: "x".into(),
        });
        c.apply(&Command::SetClusterId {
            cluster_id: "y".into(),
        });
        assert_eq!(c.cluster_id, "x");
        assert_eq!(
            c.apply(&Command::SetRole {
                id: 9,
                role: Role::Client
            }),
            CommandResult::UnknownNode { id: 9 }
        );
        assert_eq!(
            c.apply(&Command::SetQuota {
                owner: 9,
                bytes: Some(1)
            }),
            CommandResult::UnknownNode { id: 9 }
        );
        c.apply(&register(9, "n9"));
        c.apply(&Command::SetQuota {
            owner: 9,
            bytes: Some(1),
        });
        assert_eq!(c.quotas[&9], 1);
        c.apply(&Command::Remove { id: 9 });
        assert!(c.quotas.is_empty() && c.nodes.is_empty());
    }
}
