//! What an area asks for at init, with real node processes.
//!
//! A writethrough area is a cache: the client keeps its own copy of every
//! page. Its pages use peers' spare RAM like any other, with one copy each
//! instead of R, and a copy that dies is not repaired: the page is dropped
//! and its next load answers NOT_FOUND, never UNAVAILABLE and never wrong
//! bytes. Persistent pages beside it keep their R copies and all load.
//!
//! An area may ask for its own number of copies (1..=3) in place of the
//! node's `--replicas`.

use std::time::Duration;

use ramster_client::{BlockingClient, ClientError};
use ramster_cluster_tests::{
    OWNER_MEMSRV_TWO_PEERS, TestCluster, store_into, verify_pages, wait_for,
};
use ramster_node::cli::corpus::Pages;
use ramster_node::cluster::status::Liveness;
use ramster_protocol::v1::{AreaStats, Status};

const PERSISTENT: u32 = 1;
const WRITETHROUGH: u32 = 2;
const FORM_TIMEOUT: Duration = Duration::from_secs(30);
const DOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until over a thousand of the owner's pages are on donors with
/// exactly `copies` copies each; their number.
fn wait_for_copies(cluster: &TestCluster, client: &BlockingClient, copies: u64) -> u64 {
    cluster
        .member("owner")
        .wait_for_copies(client, copies, 1_000, FORM_TIMEOUT)
}

#[test]
fn writethrough_pages_travel_with_one_copy_and_a_lost_one_is_a_miss() {
    let mut cluster = TestCluster::start(&OWNER_MEMSRV_TWO_PEERS).unwrap();
    cluster.wait_up("owner", 4, FORM_TIMEOUT).unwrap();
    let client = BlockingClient::connect(&cluster.member("owner").socket()).unwrap();

    // Twice the owner's store in writethrough pages: the coldest go to
    // donors, one copy each.
    let cache = Pages::synthetic(32_768, 41);
    client.init_area(WRITETHROUGH, true).unwrap();
    let cached = store_into(&client, WRITETHROUGH, &cache, &[Status::RejectedNoCapacity]);
    let remote = wait_for_copies(&cluster, &client, 1);
    eprintln!(
        "{} of {} writethrough pages accepted, {remote} on donors with one copy each",
        cached.len(),
        cache.len()
    );

    // Persistent pages beside them push more out; theirs have two copies.
    // A store that waits too long for remotify to make room is refused, as
    // frontswap allows (on a starved machine remotify falls behind); the
    // pages accepted are what the rest of the test holds the node to.
    let kept = Pages::synthetic(8_192, 43);
    client.init_area(PERSISTENT, false).unwrap();
    let accepted = store_into(&client, PERSISTENT, &kept, &[Status::RejectedNoCapacity]);
    assert!(
        accepted.len() >= kept.len() / 2,
        "only {} of {} persistent pages accepted",
        accepted.len(),
        kept.len()
    );
    verify_pages(&client, PERSISTENT, &kept, &accepted);

    // The memory server, which holds most copies, dies for good.
    let memsrv_copies = cluster
        .member("owner")
        .status()
        .unwrap()
        .nodes
        .iter()
        .find(|n| n.name == "memsrv")
        .map(|n| n.held_for_others_pages)
        .unwrap();
    assert!(memsrv_copies > 0, "the memory server holds nothing");
    cluster.member_mut("memsrv").kill();
    wait_for(DOWN_TIMEOUT, || {
        let s = cluster.member("owner").status().ok()?;
        s.nodes
            .iter()
            .any(|n| n.name == "memsrv" && n.state == Liveness::Down)
            .then_some(())
    })
    .unwrap();

    // Every persistent page loads; every writethrough page loads right or
    // is a miss.
    verify_pages(&client, PERSISTENT, &kept, &accepted);
    let (mut hits, mut misses) = (0u64, 0u64);
    for chunk in cached.chunks(256) {
        for (&o, got) in chunk
            .iter()
            .zip(client.load_pages(WRITETHROUGH, chunk).unwrap())
        {
            match got {
                Ok(page) => {
                    assert!(
                        page[..] == cache.page(o as usize)[..],
                        "page {o} came back different"
                    );
                    hits += 1;
                }
                Err(Status::NotFound) => misses += 1,
                Err(other) => {
                    panic!("writethrough page {o} answered {other:?}, not a hit or a miss")
                }
            }
        }
    }
    eprintln!("after the kill: {hits} writethrough hits, {misses} misses");
    assert!(
        misses > 0,
        "no writethrough page had its copy on the memory server"
    );
    let owner = cluster.member("owner");
    let dropped = owner
        .metric("ramster_store_dropped_remote_pages_total")
        .unwrap();
    assert!(dropped > 0.0, "nothing counted as dropped");
    assert_eq!(owner.metric("ramster_unrecoverable_pages"), Some(0.0));
    assert_eq!(owner.metric("ramster_lost_pages_total"), Some(0.0));

    // A miss is the client's cue to store the page again: it loads.
    let again = cached
        .iter()
        .copied()
        .find(|&o| {
            matches!(
                client.load_pages(WRITETHROUGH, &[o]).unwrap()[0],
                Err(Status::NotFound)
            )
        })
        .expect("a missing page");
    let statuses = client
        .store_pages(WRITETHROUGH, &[(again, cache.page_bytes(again as usize))])
        .unwrap();
    assert_eq!(statuses, vec![Status::Ok]);
    let got = client
        .load_pages(WRITETHROUGH, &[again])
        .unwrap()
        .pop()
        .unwrap();
    assert!(got.unwrap()[..] == cache.page(again as usize)[..]);

    // Repair brings every persistent page back to two copies.
    wait_for(DOWN_TIMEOUT, || {
        (owner.metric("ramster_degraded_pages")? == 0.0).then_some(())
    })
    .unwrap();
    verify_pages(&client, PERSISTENT, &kept, &accepted);
}

fn area_stats(client: &BlockingClient, area: u32) -> AreaStats {
    client
        .stats()
        .unwrap()
        .areas
        .into_iter()
        .find(|a| a.area == area)
        .expect("the area is listed")
}

#[test]
fn an_area_asks_for_its_own_number_of_copies() {
    let cluster = TestCluster::start(&OWNER_MEMSRV_TWO_PEERS).unwrap();
    cluster.wait_up("owner", 4, FORM_TIMEOUT).unwrap();
    let client = BlockingClient::connect(&cluster.member("owner").socket()).unwrap();

    // More than three copies is refused, and the area is not created.
    match client.init_area_replicas(PERSISTENT, false, 4) {
        Err(ClientError::Op { status, detail }) => {
            assert_eq!(status, Status::InvalidArgument);
            assert!(detail.contains("replicas 4"), "{detail}");
        }
        other => panic!("four copies were not refused: {other:?}"),
    }
    assert!(
        client
            .stats()
            .unwrap()
            .areas
            .iter()
            .all(|a| a.area != PERSISTENT)
    );

    // Three copies of each page, though the node's default is two.
    client.init_area_replicas(PERSISTENT, false, 3).unwrap();
    assert_eq!(area_stats(&client, PERSISTENT).replicas, 3);
    let pages = Pages::synthetic(32_768, 47);
    let accepted = store_into(&client, PERSISTENT, &pages, &[]);
    let remote = wait_for_copies(&cluster, &client, 3);
    eprintln!("{remote} pages on donors with three copies each");
    verify_pages(&client, PERSISTENT, &pages, &accepted);

    // Re-created with one copy: the old pages are gone with their copies,
    // the new ones have one each.
    client.init_area_replicas(PERSISTENT, false, 1).unwrap();
    assert_eq!(area_stats(&client, PERSISTENT).replicas, 1);
    let accepted = store_into(&client, PERSISTENT, &pages, &[]);
    let remote = wait_for_copies(&cluster, &client, 1);
    eprintln!("{remote} pages on donors with one copy each");
    verify_pages(&client, PERSISTENT, &pages, &accepted);
}
