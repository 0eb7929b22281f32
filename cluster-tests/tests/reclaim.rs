//! A donor that needs its memory back gets it without a page being lost:
//! `ramster cluster donate SIZE` lowers a memory server's donation below
//! what it holds, its heartbeats ask the owner for the excess, and the
//! owner moves that many copies to other donors (or home) before they are
//! released there. Every page still loads, with two copies.

use std::time::Duration;

use ramster_cluster_tests::{
    OWNER_MEMSRV_TWO_PEERS, TestCluster, store_pages, verify_pages, wait_for,
};
use ramster_node::cli::corpus::Pages;
use ramster_node::frontend::client::BlockingClient;

const AREA: u32 = 1;
const FORM_TIMEOUT: Duration = Duration::from_secs(30);
const RECLAIM_TIMEOUT: Duration = Duration::from_secs(120);
const MIB: f64 = (1 << 20) as f64;

#[test]
fn a_donor_that_lowers_its_donation_gets_memory_back_and_no_page_is_lost() {
    let cluster = TestCluster::start(&OWNER_MEMSRV_TWO_PEERS).unwrap();
    cluster.wait_up("owner", 4, FORM_TIMEOUT).unwrap();
    let owner = cluster.member("owner");
    let memsrv = cluster.member("memsrv");
    let client = BlockingClient::connect(&owner.socket()).unwrap();
    let pages = Pages::synthetic(32_768, 29);
    let accepted = store_pages(&client, AREA, &pages);
    // The memory server is preferred: it takes a copy of most remote pages.
    let held = wait_for(FORM_TIMEOUT, || {
        let held = memsrv.metric("ramster_donor_held_bytes")?;
        (held > 16.0 * MIB).then_some(held)
    })
    .unwrap();
    eprintln!("memsrv holds {:.1} MiB before the reclaim", held / MIB);

    // Bad input is refused and changes nothing.
    let (code, _) = memsrv.cli(&["cluster", "donate", "lots"]);
    assert_ne!(code, 0);
    let bad = ramster_node::cli::admin_client::post(&memsrv.admin, "/v1/donate").unwrap();
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert_eq!(memsrv.metric("ramster_donor_reclaim_bytes"), Some(0.0));

    let (code, said) = memsrv.cli(&["cluster", "donate", "4MiB"]);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("to give back"), "{said}");
    assert_eq!(memsrv.metric("ramster_donor_limit_bytes"), Some(4.0 * MIB));

    // The owner takes the excess back; the donor ends within its new limit.
    wait_for(RECLAIM_TIMEOUT, || {
        (memsrv.metric("ramster_donor_held_bytes")? <= 4.0 * MIB).then_some(())
    })
    .unwrap_or_else(|e| {
        panic!(
            "memsrv still holds {:?} bytes ({e}); the owner's log ends:\n{}",
            memsrv.metric("ramster_donor_held_bytes"),
            owner.log_tail(40)
        )
    });
    assert_eq!(memsrv.metric("ramster_donor_reclaim_bytes"), Some(0.0));
    let reclaimed = owner.metric("ramster_reclaimed_pages_total").unwrap();
    assert!(reclaimed > 0.0, "the owner moved nothing");
    eprintln!("the owner took back {reclaimed} pages");
    verify_pages(&client, AREA, &pages, &accepted);
    assert_eq!(owner.metric("ramster_degraded_pages"), Some(0.0));
    assert_eq!(owner.metric("ramster_unrecoverable_pages"), Some(0.0));
    // Every remote page still has its two copies, none of them dropped.
    let remote = client.stats().unwrap().store.unwrap().remote_pages;
    assert!(remote > 0);
    wait_for(FORM_TIMEOUT, || {
        let s = owner.status().ok()?;
        let copies: u64 = s
            .nodes
            .iter()
            .filter(|n| n.name != "owner")
            .map(|n| n.held_for_others_pages)
            .sum();
        (copies == 2 * remote).then_some(())
    })
    .unwrap_or_else(|e| {
        panic!(
            "not every remote page has two copies ({e}): {:?}",
            owner.status()
        )
    });
    // Given back, the donation takes pages again.
    let (code, said) = memsrv.cli(&["cluster", "donate", "256MiB"]);
    assert_eq!(code, 0, "{said}");
    assert_eq!(
        memsrv.metric("ramster_donor_limit_bytes"),
        Some(256.0 * MIB)
    );
}
