//! A certificate of the cluster's CA lets a node speak for itself only: a
//! holder of one for a name that is not a member cannot campaign or lead
//! in a member's name, and the cluster keeps its leader.

use std::sync::Arc;
use std::time::Duration;

use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::{CommittedLeaderId, LogId, Vote};
use parking_lot::Mutex;
use ramster_cluster_tests::{MemberSpec, TestCluster, ramster_bin};
use ramster_node::cluster::donor::{DonorConfig, DonorStore};
use ramster_node::cluster::membership::RaftRequest;
use ramster_node::cluster::tls::NodeIdentity;
use ramster_node::cluster::transport::{EndpointOptions, PeerEndpoint, PeerTls, TransportConfig};

const FORM_TIMEOUT: Duration = Duration::from_secs(30);

fn member(name: &'static str) -> MemberSpec<'static> {
    MemberSpec {
        name,
        capacity: "64MiB",
        extra: &[],
    }
}

#[test]
fn a_certificate_speaks_for_its_own_name_only() {
    let cluster = TestCluster::start(&[member("a"), member("b"), member("c")]).unwrap();
    cluster.wait_up("a", 3, FORM_TIMEOUT).unwrap();
    let before = cluster.member("a").status().unwrap();
    let leader = before.leader.clone().expect("a leader");
    let id_of = |name: &str| before.nodes.iter().find(|n| n.name == name).unwrap().id;
    // Mallory holds a certificate the cluster's CA issued, for a name that
    // is not a member.
    let ca = cluster.dir.path().join("ca");
    let made = std::process::Command::new(ramster_bin())
        .args(["cert", "create-node", "mallory", "--certs-dir"])
        .arg(&ca)
        .status()
        .unwrap();
    assert!(made.success());
    let identity = NodeIdentity::load(&ca.join("mallory")).unwrap();

    // It asks a follower for its vote in the leader's name, with a term far
    // ahead, and sends it entries as the leader; then votes for itself
    // under an id no member has.
    let follower = ["a", "b", "c"].into_iter().find(|n| *n != leader).unwrap();
    let target = cluster.member(follower).peer.parse().unwrap();
    let as_leader = Vote::new(1_000_000, id_of(&leader));
    let requests = [
        RaftRequest::Vote(VoteRequest::new(as_leader, None)),
        RaftRequest::AppendEntries(AppendEntriesRequest {
            vote: Vote::new_committed(1_000_000, id_of(&leader)),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(1, id_of(&leader)), 0)),
            entries: Vec::new(),
            leader_commit: None,
        }),
        RaftRequest::Vote(VoteRequest::new(Vote::new(1_000_000, 4_000_000), None)),
    ];
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let answers: Vec<String> = runtime.block_on(async {
        let endpoint = PeerEndpoint::bind(
            EndpointOptions {
                node: "mallory".into(),
                incarnation: 1,
                listen: "127.0.0.1:0".parse().unwrap(),
                tls: PeerTls::mutual(&identity).unwrap(),
                transport: TransportConfig::default(),
                metrics: Default::default(),
            },
            Arc::new(Mutex::new(DonorStore::new(DonorConfig::with_donation(0)))),
        )
        .unwrap();
        let session = endpoint.session(follower, target).await.unwrap();
        let mut answers = Vec::new();
        for request in &requests {
            let body = serde_json::to_vec(request).unwrap();
            answers.push(match session.raft(body, Duration::from_secs(5)).await {
                Ok(reply) => format!("answered: {}", String::from_utf8_lossy(&reply)),
                Err(e) => e.to_string(),
            });
        }
        endpoint.close().await;
        answers
    });
    for (request, answer) in requests.iter().zip(&answers) {
        eprintln!("{request:?}\n  -> {answer}");
        assert!(
            answer.contains("mallory") && !answer.starts_with("answered"),
            "{follower} took a Raft request from mallory: {answer}"
        );
    }
    assert!(
        answers[0].contains(&format!("which is {leader}")),
        "{}",
        answers[0]
    );
    assert!(answers[2].contains("not a member"), "{}", answers[2]);

    // Nothing moved: the same leader, and the follower still follows it.
    std::thread::sleep(Duration::from_secs(2));
    let after = cluster.member(follower).status().unwrap();
    assert_eq!(after.leader.as_deref(), Some(leader.as_str()));
    assert!(
        cluster
            .member(follower)
            .log()
            .contains("Raft request refused")
    );
}
