//! Membership on real openraft: the storage passes openraft's own suite, and
//! a three-node cluster over an in-process transport (messages serialised as
//! a real transport would) elects, replicates, survives its leader's loss,
//! and comes back from disk after a full restart with no init step.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::BasicNode;
use openraft::storage::RaftLogStorage;
use openraft::testing::{StoreBuilder, Suite};

use super::network::{RaftReply, RaftRequest, handle};
use super::storage::{ConfigMachine, LogStore};
use super::*;

struct DiskStores;

impl StoreBuilder<TypeConfig, LogStore, ConfigMachine, tempfile::TempDir> for DiskStores {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, ConfigMachine), openraft::StorageError<NodeId>> {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(dir.path()).unwrap();
        let machine = ConfigMachine::open(dir.path()).unwrap();
        Ok((dir, log, machine))
    }
}

#[test]
fn storage_passes_openrafts_suite() {
    Suite::test_all(DiskStores).unwrap();
}

#[tokio::test]
async fn log_survives_reopen_and_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        log.save_vote(&openraft::Vote::new(3, 1)).await.unwrap();
        log.save_committed(Some(openraft::LogId::new(
            openraft::CommittedLeaderId::new(3, 1),
            7,
        )))
        .await
        .unwrap();
    }
    // A crash in the middle of writing a record leaves half a line.
    let path = dir.path().join("log.jsonl");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(b"{\"Append\":{\"log_id\":");
    std::fs::write(&path, bytes).unwrap();
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(
        log.read_vote().await.unwrap(),
        Some(openraft::Vote::new(3, 1))
    );
    assert_eq!(
        log.read_committed().await.unwrap().map(|l| l.index),
        Some(7)
    );
}

/// Delivers Raft RPCs between in-process nodes, through serde like a real
/// transport, and can cut a node off.
#[derive(Clone, Default)]
struct Router {
    rafts: Arc<Mutex<HashMap<NodeId, Raft>>>,
    cut: Arc<Mutex<HashSet<NodeId>>>,
}

impl RaftTransport for Router {
    async fn call(
        &self,
        target: NodeId,
        _node: &BasicNode,
        request: RaftRequest,
        _deadline: Duration,
    ) -> Result<RaftReply, TransportError> {
        let raft = {
            if self.cut.lock().unwrap().contains(&target) {
                return Err(TransportError::Unreachable(target, "link cut".into()));
            }
            self.rafts.lock().unwrap().get(&target).cloned()
        };
        let raft = raft.ok_or_else(|| TransportError::Unreachable(target, "not running".into()))?;
        let request: RaftRequest =
            serde_json::from_slice(&serde_json::to_vec(&request).unwrap()).unwrap();
        let reply = handle(&raft, request).await;
        Ok(serde_json::from_slice(&serde_json::to_vec(&reply).unwrap()).unwrap())
    }
}

async fn start(router: &Router, id: NodeId, dir: &Path) -> Membership {
    let m = Membership::open(id, dir, router.clone()).await.unwrap();
    router.rafts.lock().unwrap().insert(id, m.raft().clone());
    router.cut.lock().unwrap().remove(&id);
    m
}

/// Waits (bounded) until one of `nodes` is leader; returns its index.
async fn leader_of(nodes: &[&Membership]) -> usize {
    for _ in 0..300 {
        for (i, n) in nodes.iter().enumerate() {
            if n.leader().await.map(|l| l.0) == Some(n.id()) {
                return i;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no leader elected within 30 s");
}

async fn wait_config(m: &Membership, what: &str, ok: impl Fn(&ClusterConfig) -> bool) {
    for _ in 0..300 {
        if ok(&m.config()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("node {} never saw {what}: {:?}", m.id(), m.config());
}

fn register(id: NodeId) -> Command {
    Command::Register {
        id,
        name: format!("n{id}"),
        advertise: format!("127.0.0.{id}:7100"),
        role: Role::Peer,
        capacity_bytes: 1 << 30,
        donate_bytes: 1 << 29,
        zone: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_survive_the_leader_and_restart_from_disk() {
    let router = Router::default();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        nodes.push(start(&router, i as NodeId + 1, d.path()).await);
    }
    assert!(!nodes[0].is_initialized().await);
    nodes[0]
        .bootstrap(BTreeMap::from([(1, "n1".to_string())]))
        .await
        .unwrap();
    // Bootstrapping twice is harmless.
    nodes[0]
        .bootstrap(BTreeMap::from([(1, "n1".to_string())]))
        .await
        .unwrap();
    assert_eq!(leader_of(&[&nodes[0]]).await, 0);
    nodes[0].add_node(2, "n2".into()).await.unwrap();
    nodes[0].add_node(3, "n3".into()).await.unwrap();
    let voters: Vec<NodeId> = nodes[0]
        .raft()
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    assert_eq!(voters, vec![1, 2, 3]);

    nodes[0]
        .propose(Command::SetClusterId {
            cluster_id: "c1".into(),
        })
        .await
        .unwrap();
    for id in 1..=3 {
        assert_eq!(
            nodes[0].propose(register(id)).await.unwrap(),
            CommandResult::Registered { incarnation: 1 }
        );
    }
    // A follower refuses writes and names the leader.
    match nodes[1].propose(register(9)).await {
        Err(MembershipError::NotLeader {
            leader: Some((1, _)),
        }) => {}
        other => panic!("expected NotLeader(1), got {other:?}"),
    }
    for n in &nodes {
        wait_config(n, "three members", |c| {
            c.nodes.len() == 3 && c.cluster_id == "c1"
        })
        .await;
    }

    // The leader goes away: the other two elect one and keep accepting changes.
    router.cut.lock().unwrap().insert(1);
    let old = nodes.remove(0);
    old.shutdown().await;
    let l = leader_of(&[&nodes[0], &nodes[1]]).await;
    assert_eq!(
        nodes[l].propose(register(1)).await.unwrap(),
        CommandResult::Registered { incarnation: 2 }
    );

    // It restarts from its own disk and catches up.
    let back = start(&router, 1, dirs[0].path()).await;
    assert!(back.is_initialized().await);
    wait_config(&back, "its new incarnation", |c| {
        c.nodes.get(&1).map(|n| n.incarnation) == Some(2)
    })
    .await;
    nodes.insert(0, back);

    // Everyone stops; everyone starts again from disk, with no bootstrap.
    for n in &nodes {
        n.shutdown().await;
    }
    router.rafts.lock().unwrap().clear();
    let mut again = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        again.push(start(&router, i as NodeId + 1, d.path()).await);
    }
    let refs: Vec<&Membership> = again.iter().collect();
    let l = leader_of(&refs).await;
    let c = again[l].config();
    assert_eq!(c.cluster_id, "c1");
    assert_eq!(c.nodes.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(c.nodes[&1].incarnation, 2);
    // And it still takes changes.
    assert_eq!(
        again[l].propose(register(2)).await.unwrap(),
        CommandResult::Registered { incarnation: 2 }
    );
    for n in &again {
        n.shutdown().await;
    }
}
