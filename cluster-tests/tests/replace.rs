//! A member whose data dir is lost comes back under its name through an
//! explicit `ramster cluster replace NAME`. Until then the new node is
//! refused with the way out in its log, Raft learns nothing of it, and its
//! heartbeats do not pass for the member's; replace is refused while the
//! member itself is up, or while the leader is too new to know.

use std::time::Duration;

use ramster_cluster_tests::{MemberSpec, TestCluster, wait_for};
use ramster_node::cluster::status::{ClusterStatus, Liveness};

const FORM_TIMEOUT: Duration = Duration::from_secs(30);

fn row(s: &ClusterStatus, name: &str) -> Option<(u64, Liveness)> {
    s.nodes
        .iter()
        .find(|n| n.name == name)
        .map(|n| (n.id, n.state))
}

#[test]
fn a_node_that_lost_its_data_dir_rejoins_under_its_name_after_replace() {
    let spec = |name| MemberSpec {
        name,
        capacity: "64MiB",
        extra: &[],
    };
    let mut cluster = TestCluster::start(&[spec("a"), spec("b"), spec("c")]).unwrap();
    let before = cluster.wait_up("a", 3, FORM_TIMEOUT).unwrap();
    let (old_id, _) = row(&before, "c").expect("c is a member");

    // Refused while c is up (at first because the leader is too new to
    // have heard from everyone, then because it has heard from c).
    wait_for(FORM_TIMEOUT, || {
        let (code, said) = cluster.member("a").cluster(&["replace", "c"]);
        assert_ne!(code, 0, "replace took a member that is up: {said}");
        assert!(
            said.contains("c is up") || said.contains("may not have heard from c"),
            "{said}"
        );
        said.contains("c is up").then_some(())
    })
    .expect("the leader comes to refuse because c is up");

    // c loses its data dir (its certificates live elsewhere) and starts
    // again: a new node id under the old name.
    let c = cluster.member_mut("c");
    c.kill();
    std::fs::remove_dir_all(&c.data_dir).unwrap();
    c.start().unwrap();
    let c = cluster.member("c");
    wait_for(FORM_TIMEOUT, || {
        c.log()
            .contains("`ramster cluster replace c` on a member")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("c was not told the way out ({e}): {}", c.log_tail(20)));
    // The member is down as the others see it, whatever the new node
    // answers to their heartbeats.
    let a = cluster.member("a");
    wait_for(FORM_TIMEOUT, || {
        let s = a.status().ok()?;
        (row(&s, "c")? == (old_id, Liveness::Down)).then_some(())
    })
    .unwrap_or_else(|e| panic!("a never saw the old c down ({e}): {:?}", a.status()));

    let (code, said) = a.cluster(&["replace", "c"]);
    assert_eq!(code, 0, "replace refused: {said}");
    let after = wait_for(FORM_TIMEOUT, || {
        let s = a.status().ok()?;
        let (id, state) = row(&s, "c")?;
        (id != old_id && state == Liveness::Up && s.nodes.len() == 3).then_some(s)
    })
    .unwrap_or_else(|e| {
        panic!(
            "the new c never joined ({e}): {:?}\nc's log ends:\n{}",
            a.status(),
            c.log_tail(20)
        )
    });
    assert_eq!(after.cluster_id, before.cluster_id);
    assert!(
        c.log().contains("member of the cluster"),
        "{}",
        c.log_tail(20)
    );
    // Every member, the new c included, comes to see the cluster healthy.
    for m in &cluster.members {
        wait_for(FORM_TIMEOUT, || (m.cli(&["health"]).0 == 0).then_some(()))
            .unwrap_or_else(|_| panic!("{} never healthy: {:?}", m.name, m.cli(&["health"])));
    }
}
