//! Real clusters on loopback: three `ramster node` processes with mutual
//! TLS under a fresh CA. Pages leave a small node, come back byte-identical,
//! come home when it empties; memory servers are preferred; a stranger's
//! certificate gets it nothing; a full restart keeps the cluster.

use std::time::Duration;

use bytes::Bytes;
use ramster_client::{BlockingClient, Client};
use ramster_cluster_tests::{
    MemberSpec, TestCluster, small_and_two_donors, verify_pages, wait_for,
};
use ramster_node::cli::corpus::Pages;
use ramster_node::cluster::status::{ClusterStatus, HealthLevel, Liveness};
use ramster_protocol::v1;

const AREA: u32 = 1;
const FORM_TIMEOUT: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

/// Stores `pages` into the area, batch by batch, checking after each batch
/// that the node stays within its capacity. Returns the accepted offsets.
fn fill(client: &BlockingClient, pages: &Pages, capacity: u64) -> Vec<u64> {
    client.init_area(AREA, false).unwrap();
    let mut accepted = Vec::new();
    let offsets: Vec<u64> = (0..pages.len() as u64).collect();
    for chunk in offsets.chunks(256) {
        let batch: Vec<(u64, Bytes)> = chunk
            .iter()
            .map(|&o| (o, pages.page_bytes(o as usize)))
            .collect();
        let statuses = client.store_pages(AREA, &batch).unwrap();
        for (&o, s) in chunk.iter().zip(statuses) {
            match s {
                v1::Status::Ok => accepted.push(o),
                v1::Status::RejectedIncompressible => {}
                other => panic!("page {o} refused: {other:?}"),
            }
        }
        let st = client.stats().unwrap().store.unwrap();
        assert!(
            st.used_bytes <= capacity,
            "the node holds {} bytes over its capacity {capacity}",
            st.used_bytes
        );
    }
    accepted
}

/// Loads pages one page per request, 16 requests in flight on one
/// connection: such a request finishes on the transport's thread and its
/// answer is written from there, between the connection's other answers.
/// Every page must come back whole. Which pages are remote at this point
/// depends on how remotify and the loads before interleaved, so windows of
/// accepted pages are loaded in turn until enough loads came from donors.
fn one_page_loads_from_donors(socket: &std::path::Path, pages: &Pages, accepted: &[u64]) {
    const WANTED_REMOTE: u64 = 1_000;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (remote, loaded) = rt.block_on(async {
        let c = std::sync::Arc::new(Client::connect(socket).await.unwrap());
        let before = c.stats().await.unwrap().counters.unwrap().loads_remote;
        let mut remote = 0;
        let mut loaded = 0;
        for window in accepted.chunks(2_000) {
            let mut tasks = tokio::task::JoinSet::new();
            for lane in window.chunks(window.len().div_ceil(16)) {
                let (c, lane) = (c.clone(), lane.to_vec());
                let expected: Vec<Bytes> =
                    lane.iter().map(|&o| pages.page_bytes(o as usize)).collect();
                tasks.spawn(async move {
                    for (&o, want) in lane.iter().zip(expected) {
                        let got = c.load_pages(AREA, &[o]).await.unwrap().pop().unwrap();
                        assert!(got.unwrap() == want, "page {o} came back different");
                    }
                });
            }
            while let Some(t) = tasks.join_next().await {
                t.unwrap();
            }
            loaded += window.len();
            remote = c.stats().await.unwrap().counters.unwrap().loads_remote - before;
            if remote >= WANTED_REMOTE {
                break;
            }
        }
        (remote, loaded)
    });
    assert!(
        remote >= WANTED_REMOTE,
        "only {remote} of {loaded} one-page loads came from donors"
    );
}

fn remote_pages(client: &BlockingClient) -> u64 {
    client.stats().unwrap().store.unwrap().remote_pages
}

#[test]
fn a_small_node_takes_four_times_its_capacity_and_gets_every_page_back() {
    let cluster = TestCluster::start(&small_and_two_donors("64MiB", &[])).unwrap();
    cluster.wait_up("small", 3, FORM_TIMEOUT).unwrap();
    let small = cluster.member("small");
    let client = BlockingClient::connect(&small.socket()).unwrap();
    // 256 MiB of pages like a real process's memory.
    let pages = Pages::synthetic(65_536, 7);
    let accepted = fill(&client, &pages, 64 * MIB);
    assert!(
        accepted.len() > 50_000,
        "only {} of 65536 pages accepted",
        accepted.len()
    );
    let remote = remote_pages(&client);
    assert!(remote > 10_000, "only {remote} pages went to peers");
    // Status tells what donors hold as of their last heartbeat: wait for
    // one sent after the pages arrived.
    wait_for(Duration::from_secs(10), || {
        let held: u64 = small
            .status()
            .ok()?
            .nodes
            .iter()
            .filter(|n| n.name != "small")
            .map(|n| n.held_for_others_bytes)
            .sum();
        (held > 0).then_some(())
    })
    .unwrap_or_else(|e| panic!("no donor reports holding pages ({e}): {:?}", small.status()));
    verify_pages(&client, AREA, &pages, &accepted);
    let polls = |m: &ramster_cluster_tests::Member| m.metric("ramster_transport_polls_total");
    let polled_before = polls(small).expect("the transport's poll counter");
    one_page_loads_from_donors(&small.socket(), &pages, &accepted);
    // Clients that wait on each page keep the small node's transport
    // thread polling; donors that only serve pages never poll.
    assert!(polls(small).unwrap() > polled_before);
    for donor in ["big1", "big2"] {
        assert_eq!(polls(cluster.member(donor)), Some(0.0), "{donor} polled");
    }

    // Free three quarters: the store empties below the suction line and
    // the remaining remote pages come home.
    let (keep, drop) = accepted.split_at(accepted.len() / 4);
    for chunk in drop.chunks(512) {
        client.invalidate_pages(AREA, chunk).unwrap();
    }
    wait_for(Duration::from_secs(60), || {
        (remote_pages(&client) == 0).then_some(())
    })
    .unwrap_or_else(|_| {
        panic!(
            "{} pages stayed remote: {}",
            remote_pages(&client),
            small.log()
        )
    });
    verify_pages(&client, AREA, &pages, keep);
    // Donors were told to drop what came home or was invalidated, and
    // then, with nothing of small's left on them, to forget small: not
    // even the tombstones of released pages stay.
    for donor in ["big1", "big2"] {
        let m = cluster.member(donor);
        wait_for(Duration::from_secs(30), || {
            (m.metric("ramster_donor_held_pages")? == 0.0
                && m.metric("ramster_donor_tombstones")? == 0.0
                && m.metric("ramster_donor_held_bytes")? == 0.0)
                .then_some(())
        })
        .unwrap_or_else(|_| {
            panic!(
                "{donor} still holds pages or tombstones of small's: {:?} pages, {:?} tombstones",
                m.metric("ramster_donor_held_pages"),
                m.metric("ramster_donor_tombstones")
            )
        });
    }
}

#[test]
fn memory_servers_receive_pages_before_peers() {
    let cluster = TestCluster::start(&[
        MemberSpec {
            name: "owner",
            capacity: "32MiB",
            // One copy per page, so where it goes shows the preference.
            extra: &["--replicas", "1"],
        },
        MemberSpec {
            name: "peer",
            capacity: "256MiB",
            extra: &["--donate", "256MiB"],
        },
        MemberSpec {
            name: "memsrv",
            capacity: "256MiB",
            extra: &["--role", "memory-server"],
        },
    ])
    .unwrap();
    cluster.wait_up("owner", 3, FORM_TIMEOUT).unwrap();
    let owner = cluster.member("owner");
    let client = BlockingClient::connect(&owner.socket()).unwrap();
    let pages = Pages::synthetic(65_536, 11);
    let accepted = fill(&client, &pages, 32 * MIB);
    assert!(remote_pages(&client) > 0);
    let held = |status: &ClusterStatus, name: &str| {
        status
            .nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap()
            .held_for_others_bytes
    };
    // Other nodes' holdings reach the status in their heartbeats, so the
    // first status after the fill may not show them yet.
    let status = wait_for(Duration::from_secs(10), || {
        let status = owner.status().ok()?;
        (held(&status, "memsrv") > 0).then_some(status)
    })
    .unwrap_or_else(|_| panic!("the memory server holds nothing: {:?}", owner.status()));
    // Each donor's own count, not the heartbeat's, says where pages went.
    let donor_pages = |name: &str| cluster.member(name).metric("ramster_donor_held_pages");
    assert!(donor_pages("memsrv").unwrap() > 0.0);
    assert_eq!(
        donor_pages("peer").unwrap(),
        0.0,
        "a peer got pages while the memory server had room: {status:?}"
    );
    let memsrv = status.nodes.iter().find(|n| n.name == "memsrv").unwrap();
    assert_eq!(
        memsrv.role,
        ramster_node::cluster::membership::Role::MemoryServer
    );
    verify_pages(&client, AREA, &pages, &accepted);
}

#[test]
fn a_node_with_another_cas_certificate_is_refused_and_sees_no_page() {
    let mut cluster = TestCluster::start(&[
        MemberSpec {
            name: "a",
            capacity: "64MiB",
            extra: &[],
        },
        MemberSpec {
            name: "b",
            capacity: "64MiB",
            extra: &[],
        },
    ])
    .unwrap();
    cluster.wait_up("a", 2, FORM_TIMEOUT).unwrap();
    // A node with certificates from its own CA, told to join the cluster.
    let mut stranger = TestCluster::new(&[MemberSpec {
        name: "mallory",
        capacity: "64MiB",
        extra: &[],
    }])
    .unwrap();
    let seeds = cluster
        .members
        .iter()
        .map(|m| m.peer.clone())
        .collect::<Vec<_>>()
        .join(",");
    let m = &mut stranger.members[0];
    let join = m.args.iter().position(|a| a == "--join").unwrap();
    m.args[join + 1] = format!("{seeds},{}", m.peer);
    m.start().unwrap();
    // It never becomes a member, and the cluster never lists it.
    std::thread::sleep(Duration::from_secs(5));
    let s = cluster.member("a").status().unwrap();
    assert_eq!(s.nodes.len(), 2, "{s:?}");
    assert!(s.nodes.iter().all(|n| n.name != "mallory"));
    let (code, _) = m.cli(&["health"]);
    assert_ne!(code, 0, "the stranger must not be healthy");
    let log = cluster.member("a").log();
    assert!(
        log.contains("peer refused"),
        "a did not log the refusal: {log}"
    );
    cluster.member_mut("b").stop();
}

#[test]
fn a_full_restart_keeps_the_cluster_without_an_init_step() {
    let mut cluster = TestCluster::start(&[
        MemberSpec {
            name: "n1",
            capacity: "64MiB",
            extra: &[],
        },
        MemberSpec {
            name: "n2",
            capacity: "64MiB",
            extra: &[],
        },
        MemberSpec {
            name: "n3",
            capacity: "64MiB",
            extra: &["--role", "memory-server"],
        },
    ])
    .unwrap();
    let before = cluster.wait_up("n1", 3, FORM_TIMEOUT).unwrap();
    // Every member comes to see the whole cluster healthy.
    for m in &cluster.members {
        wait_for(FORM_TIMEOUT, || (m.cli(&["health"]).0 == 0).then_some(()))
            .unwrap_or_else(|_| panic!("{} never healthy: {:?}", m.name, m.cli(&["health"])));
    }
    for m in &mut cluster.members {
        m.stop();
    }
    for m in &mut cluster.members {
        m.start().unwrap();
    }
    cluster.wait_up("n2", 3, FORM_TIMEOUT).unwrap();
    // Each node registers its new incarnation through Raft once it is back;
    // the status shows it when that entry is applied.
    let n2 = cluster.member("n2");
    let after = wait_for(FORM_TIMEOUT, || {
        let s = n2.status().ok()?;
        (s.nodes.len() == 3 && s.nodes.iter().all(|n| n.incarnation == 2)).then_some(s)
    })
    .unwrap_or_else(|e| panic!("incarnations never all reached 2: {e}: {:?}", n2.status()));
    assert_eq!(after.cluster_id, before.cluster_id);
    let ids = |s: &ClusterStatus| {
        let mut v: Vec<(String, u64)> = s.nodes.iter().map(|n| (n.name.clone(), n.id)).collect();
        v.sort();
        v
    };
    assert_eq!(ids(&after), ids(&before));
    let formed = cluster.member("n1").log().matches("forming one").count();
    assert_eq!(formed, 1, "the cluster was formed again");

    // One node killed: the others call it down and health says so.
    cluster.member_mut("n3").kill();
    let s = wait_for(Duration::from_secs(15), || {
        let s = cluster.member("n1").status().ok()?;
        let n3 = s.nodes.iter().find(|n| n.name == "n3")?;
        (n3.state == Liveness::Down).then_some(s)
    })
    .unwrap();
    assert_eq!(s.health.status, HealthLevel::Err, "{s:?}");
    let (code, _) = cluster.member("n1").cli(&["health"]);
    assert_eq!(code, 4);
}
