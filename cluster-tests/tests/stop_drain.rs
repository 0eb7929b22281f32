//! A donor asked to stop (SIGTERM) hands back what it holds first: owners
//! move its copies to the other donors before it exits. So with two
//! copies, a second donor dying right after the first one stopped loses
//! nothing; had the first simply exited, every page whose two copies were
//! on those two donors would be gone. When the stopped donor starts again
//! it undoes its own drain and takes pages again.

use std::time::Duration;

use ramster_client::BlockingClient;
use ramster_cluster_tests::{MemberSpec, TestCluster, store_pages, verify_pages, wait_for};
use ramster_node::cli::corpus::Pages;
use ramster_node::cluster::membership::MemberState;

const AREA: u32 = 1;
const FORM_TIMEOUT: Duration = Duration::from_secs(30);

fn donor(name: &'static str) -> MemberSpec<'static> {
    MemberSpec {
        name,
        capacity: "256MiB",
        extra: &["--donate", "192MiB"],
    }
}

#[test]
fn a_stopping_donor_hands_back_its_copies_before_it_exits() {
    let mut cluster = TestCluster::start(&[
        MemberSpec {
            name: "owner",
            capacity: "32MiB",
            // Repair would wait past this test: what loads after the
            // second donor dies is what the drain moved, nothing else.
            extra: &["--replicas", "2", "--out-after", "600"],
        },
        donor("d1"),
        donor("d2"),
        donor("d3"),
    ])
    .unwrap();
    cluster.wait_up("owner", 4, FORM_TIMEOUT).unwrap();
    let owner = cluster.member("owner");
    let client = BlockingClient::connect(&owner.socket()).unwrap();
    let pages = Pages::synthetic(32_768, 43);
    let accepted = store_pages(&client, AREA, &pages);
    owner.wait_for_copies(&client, 2, 0, FORM_TIMEOUT);
    let held = cluster.member("d1").metric("ramster_donor_held_pages");
    assert!(
        held.is_some_and(|h| h > 0.0),
        "d1 holds no copy to hand back: {held:?}"
    );

    cluster.member_mut("d1").stop();
    let log = cluster.member("d1").log();
    assert!(
        log.contains("drained: every copy held here moved to another donor"),
        "d1 stopped without draining; its log ends:\n{}",
        cluster.member("d1").log_tail(30)
    );
    assert!(
        cluster
            .member("d1")
            .data_dir
            .join("drained-at-stop")
            .exists()
    );

    // The second failure, at once: no repair has run (--out-after).
    cluster.member_mut("d2").kill();
    verify_pages(&client, AREA, &pages, &accepted);
    assert_eq!(
        cluster
            .member("owner")
            .metric("ramster_unrecoverable_pages"),
        Some(0.0)
    );

    // Back, d1 asks to be active again and owners may use it.
    cluster.member_mut("d1").start().unwrap();
    let d1 = cluster.member("d1");
    let owner = cluster.member("owner");
    wait_for(FORM_TIMEOUT, || {
        let s = owner.status().ok()?;
        let row = s.nodes.iter().find(|n| n.name == "d1")?;
        (row.member_state == MemberState::Active).then_some(())
    })
    .unwrap_or_else(|e| {
        panic!(
            "d1 stayed drained ({e}); its log ends:\n{}",
            d1.log_tail(30)
        )
    });
    wait_for(FORM_TIMEOUT, || {
        (!d1.data_dir.join("drained-at-stop").exists()).then_some(())
    })
    .expect("the marker of the stop's drain is removed once d1 is active");
    verify_pages(&client, AREA, &pages, &accepted);
}
