//! Partitions: every member runs in a network namespace of its own, and
//! links between them are cut (packets dropped on arrival, silently, as by
//! a pulled cable) and restored. Loads come from whichever replica the
//! owner can still reach; a page none of whose copies it can reach answers
//! `UNAVAILABLE`, never wrong bytes, never "not found" and never after the
//! RPC deadline has long passed. Once the links are back, every page the
//! owner accepted loads again, those stored during the partition included,
//! and none was lost.
//!
//! Needs root, iproute2 and nftables (`.ci/run` installs them); elsewhere
//! it says why it did not run.

use std::time::{Duration, Instant};

use ramster_client::BlockingClient;
use ramster_cluster_tests::{
    Member, OWNER_MEMSRV_TWO_PEERS, TestCluster, netns, store_pages, verify_pages, wait_for,
};
use ramster_node::cli::corpus::Pages;
use ramster_node::cluster::status::Liveness;
use ramster_protocol::v1::Status;

const AREA: u32 = 1;
const FORM_TIMEOUT: Duration = Duration::from_secs(30);
const HEAL_TIMEOUT: Duration = Duration::from_secs(120);
/// Four times the owner's 32 MiB of pages, so most of them are remote.
const FILL_PAGES: usize = 32_768;
/// Stored while the owner reaches only one donor.
const PARTITION_PAGES: usize = 2_048;
/// How long one load request may take at most: a remote load has one RPC
/// deadline (5 s) however many replicas it tries; twice that leaves room
/// for a loaded machine. Past it, a load hangs.
const LOAD_BOUND: Duration = Duration::from_secs(10);

/// What loading every page gave.
#[derive(Debug, Default)]
struct Loaded {
    ok: usize,
    unavailable: usize,
    slowest: Duration,
}

/// Loads `offsets`, 256 per request. A page either comes back byte for
/// byte as stored or, when `unavailable_allowed`, answers `UNAVAILABLE`;
/// anything else fails the test, as does a request slower than
/// [`LOAD_BOUND`].
fn load_all(
    owner: &Member,
    client: &BlockingClient,
    pages: &Pages,
    offsets: &[u64],
    unavailable_allowed: bool,
) -> Loaded {
    let mut loaded = Loaded::default();
    for chunk in offsets.chunks(256) {
        let started = Instant::now();
        let got = client.load_pages(AREA, chunk).unwrap();
        let took = started.elapsed();
        loaded.slowest = loaded.slowest.max(took);
        assert!(
            took <= LOAD_BOUND,
            "a load of {} pages took {took:?}; the owner's log ends:\n{}",
            chunk.len(),
            owner.log_tail(60)
        );
        for (&o, g) in chunk.iter().zip(got) {
            match g {
                Ok(page) => {
                    assert!(
                        page[..] == pages.page(o as usize % pages.len())[..],
                        "page {o} came back different"
                    );
                    loaded.ok += 1;
                }
                Err(Status::Unavailable) if unavailable_allowed => loaded.unavailable += 1,
                Err(other) => panic!("page {o} answered {other:?}"),
            }
        }
    }
    loaded
}

#[test]
fn loads_use_any_reachable_replica_and_a_partition_loses_nothing() {
    if let Some(why) = netns::unsupported() {
        eprintln!("not run: {why}");
        return;
    }
    let cluster = TestCluster::start_in_namespaces(&OWNER_MEMSRV_TWO_PEERS).unwrap();
    cluster.wait_up("owner", 4, FORM_TIMEOUT).unwrap();
    let net = cluster.network();
    let owner = cluster.member("owner");
    let [me, memsrv, peer1, peer2] = ["owner", "memsrv", "peer1", "peer2"].map(|n| cluster.host(n));
    let client = BlockingClient::connect(&owner.socket()).unwrap();
    let pages = Pages::synthetic(FILL_PAGES, 31);
    let mut accepted = store_pages(&client, AREA, &pages);
    let remote = owner.wait_for_copies(&client, 2, 0, HEAL_TIMEOUT);
    eprintln!(
        "{} of {FILL_PAGES} pages accepted, {remote} of them remote",
        accepted.len()
    );
    let baseline = load_all(owner, &client, &pages, &accepted, false);
    eprintln!("across the bridge, every page loads: {baseline:?}");

    // 1. The owner loses the memory server, which holds a copy of most
    //    remote pages: every page still loads, from the peers, both before
    //    the owner calls the memory server down and after.
    net.cut(me, memsrv).unwrap();
    let at_once = load_all(owner, &client, &pages, &accepted, false);
    eprintln!("memory server cut off, at once: {at_once:?}");
    wait_for(FORM_TIMEOUT, || {
        let s = owner.status().ok()?;
        let n = s.nodes.iter().find(|n| n.name == "memsrv")?;
        (n.state == Liveness::Down).then_some(())
    })
    .unwrap_or_else(|e| panic!("the owner never called memsrv down ({e})"));
    let when_down = load_all(owner, &client, &pages, &accepted, false);
    eprintln!("memory server cut off and down: {when_down:?}");
    net.heal_all().unwrap();
    cluster.wait_up("owner", 4, HEAL_TIMEOUT).unwrap();
    wait_for(HEAL_TIMEOUT, || {
        (owner.metric("ramster_degraded_pages")? == 0.0).then_some(())
    })
    .unwrap_or_else(|e| panic!("copies never repaired ({e}): {}", owner.log_tail(40)));

    // 2. The owner reaches only peer1: pages with a copy there (or at home)
    //    load, the others are unavailable. Stores go on; those the owner
    //    accepts are kept.
    net.cut(me, memsrv).unwrap();
    net.cut(me, peer2).unwrap();
    let half = load_all(owner, &client, &pages, &accepted, true);
    eprintln!("only peer1 reachable: {half:?}");
    assert!(half.ok > 0, "pages at home and on peer1 load: {half:?}");
    let more = Pages::synthetic(PARTITION_PAGES, 37);
    let offsets: Vec<u64> = (FILL_PAGES as u64..(FILL_PAGES + PARTITION_PAGES) as u64).collect();
    let mut stored_in_partition = Vec::new();
    for chunk in offsets.chunks(256) {
        let batch: Vec<(u64, bytes::Bytes)> = chunk
            .iter()
            .map(|&o| (o, more.page_bytes(o as usize - FILL_PAGES)))
            .collect();
        for (&o, s) in chunk.iter().zip(client.store_pages(AREA, &batch).unwrap()) {
            match s {
                Status::Ok => stored_in_partition.push(o),
                // Refusing is the contract's right; losing is not.
                Status::RejectedNoCapacity
                | Status::RejectedIncompressible
                | Status::RejectedUnavailable => {}
                other => panic!("store of page {o} answered {other:?}"),
            }
        }
    }
    eprintln!(
        "{} of {PARTITION_PAGES} pages accepted while only peer1 was reachable",
        stored_in_partition.len()
    );

    // 3. The owner is cut off from every donor: its remote pages are
    //    unavailable, answered within the deadline; its own still load.
    net.cut(me, peer1).unwrap();
    let alone = load_all(owner, &client, &pages, &accepted, true);
    eprintln!("owner cut off from every donor: {alone:?}");
    assert!(
        alone.unavailable > 0,
        "remote pages cannot load with every donor cut off: {alone:?}"
    );
    assert!(alone.ok > 0, "the owner's own pages load: {alone:?}");

    // 4. Healed: every page the owner accepted loads, nothing was lost, and
    //    every remote page gets its two copies back.
    net.heal_all().unwrap();
    cluster.wait_up("owner", 4, HEAL_TIMEOUT).unwrap();
    verify_pages(&client, AREA, &pages, &accepted);
    for chunk in stored_in_partition.chunks(256) {
        let got = client.load_pages(AREA, chunk).unwrap();
        for (&o, g) in chunk.iter().zip(got) {
            let page = g.unwrap_or_else(|s| panic!("page {o} stored in the partition: {s:?}"));
            assert!(
                page[..] == more.page(o as usize - FILL_PAGES)[..],
                "page {o} stored in the partition came back different"
            );
        }
    }
    accepted.extend(&stored_in_partition);
    let remote = owner.wait_for_copies(&client, 2, 0, HEAL_TIMEOUT);
    assert_eq!(owner.metric("ramster_lost_pages_total"), Some(0.0));
    assert_eq!(owner.metric("ramster_unrecoverable_pages"), Some(0.0));
    eprintln!(
        "healed: {} pages load, {remote} remote with two copies each",
        accepted.len()
    );
}
