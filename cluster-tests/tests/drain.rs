//! Taking a donor out without losing a copy: `ramster cluster drain` makes
//! owners move the copies it holds to other donors, `ramster status` shows
//! it drained, `ramster cluster remove` takes it out, and once it is gone
//! every page still loads with two copies. A node that still holds pages
//! is not removed without `--force`.

use std::time::Duration;

use ramster_client::BlockingClient;
use ramster_cluster_tests::{
    Member, OWNER_MEMSRV_TWO_PEERS, TestCluster, store_pages, verify_pages, wait_for,
};
use ramster_node::cli::corpus::Pages;
use ramster_node::cluster::membership::MemberState;
use ramster_node::cluster::status::NodeStatus;

const AREA: u32 = 1;
const FORM_TIMEOUT: Duration = Duration::from_secs(30);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

fn row(m: &Member, name: &str) -> Option<NodeStatus> {
    m.status().ok()?.nodes.into_iter().find(|n| n.name == name)
}

#[test]
fn a_drained_donor_is_removed_without_losing_a_copy() {
    let mut cluster = TestCluster::start(&OWNER_MEMSRV_TWO_PEERS).unwrap();
    cluster.wait_up("owner", 4, FORM_TIMEOUT).unwrap();
    let owner = cluster.member("owner");
    let client = BlockingClient::connect(&owner.socket()).unwrap();
    let pages = Pages::synthetic(32_768, 23);
    let accepted = store_pages(&client, AREA, &pages);
    // Every remote page is on the memory server (preferred) and a peer.
    let held = wait_for(FORM_TIMEOUT, || {
        let r = row(owner, "memsrv")?;
        (r.held_for_others_pages > 0).then_some(r.held_for_others_pages)
    })
    .unwrap();
    eprintln!("memsrv holds {held} pages before the drain");

    // Removing a node that holds pages needs a drain first.
    let (code, said) = cluster.member("peer2").cluster(&["remove", "memsrv"]);
    assert_ne!(code, 0, "removed a node holding pages: {said}");
    assert!(said.contains("drain it first"), "{said}");
    let (code, said) = owner.cluster(&["drain", "nosuchnode"]);
    assert_ne!(code, 0);
    assert!(said.contains("no member is named"), "{said}");

    // Asked of a follower, made by the leader; `--wait` returns once the
    // copies are elsewhere, so a script can remove the node next.
    let timeout = DRAIN_TIMEOUT.as_secs().to_string();
    let (code, said) =
        cluster
            .member("peer2")
            .cluster(&["drain", "memsrv", "--wait", "--timeout", &timeout]);
    assert_eq!(
        code,
        0,
        "{said}\nthe owner's log ends:\n{}",
        owner.log_tail(40)
    );
    eprintln!("{said}");
    assert!(said.contains("memsrv is drained"), "{said}");
    // The drain was judged on the answering node's view; the owner's view
    // of memsrv follows with memsrv's next heartbeat to it.
    let drained = wait_for(FORM_TIMEOUT, || {
        row(owner, "memsrv").filter(|r| r.held_for_others_pages == 0)
    })
    .unwrap_or_else(|e| {
        panic!(
            "the owner never saw memsrv drained ({e}): {:?}",
            row(owner, "memsrv")
        )
    });
    assert_eq!(drained.member_state, MemberState::Draining);
    let (_, table) = owner.cli(&["status"]);
    assert!(table.contains("up,drained"), "{table}");
    assert_eq!(owner.metric("ramster_unrecoverable_pages"), Some(0.0));
    verify_pages(&client, AREA, &pages, &accepted);

    let (code, said) = owner.cluster(&["remove", "memsrv"]);
    assert_eq!(code, 0, "{said}");
    wait_for(FORM_TIMEOUT, || {
        let s = owner.status().ok()?;
        (s.nodes_total == 3 && s.nodes.iter().all(|n| n.name != "memsrv")).then_some(())
    })
    .unwrap();
    cluster.member_mut("memsrv").kill();

    // Gone for good: nothing to repair, every page at two copies.
    let owner = cluster.member("owner");
    verify_pages(&client, AREA, &pages, &accepted);
    wait_for(FORM_TIMEOUT, || {
        (owner.metric("ramster_degraded_pages")? == 0.0).then_some(())
    })
    .unwrap();
    assert_eq!(owner.metric("ramster_unrecoverable_pages"), Some(0.0));
    // Copies left over by the moves are released in the background.
    owner.wait_for_copies(&client, 2, 0, FORM_TIMEOUT);
}
