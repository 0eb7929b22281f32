//! Loads racing the page they load as it moves home. A load reads where a
//! page's copies are, then asks the donors; meanwhile another load (or
//! suction) may bring the page home and release those copies. The first
//! load must then find the page where it is now, never answer
//! `unavailable` for a page that is safe.
//!
//! The window is made wide on purpose: one donor is frozen (SIGSTOP), so
//! every load of a page listed there first waits a hedge delay on it before
//! it asks the other copy. Several connections load the same pages a
//! moment apart: the first to get the other copy brings the page home
//! (there is room) and releases both copies while the others still wait.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use bytes::Bytes;
use ramster_client::BlockingClient;
use ramster_cluster_tests::{MemberSpec, TestCluster, wait_for};
use ramster_node::cli::corpus::Pages;
use ramster_protocol::v1;

const AREA: u32 = 1;
const FORM_TIMEOUT: Duration = Duration::from_secs(60);
/// Pages stored: a few times the owner's store, so most go to donors.
const STORED: u64 = 24_000;
/// The newest pages, invalidated after the fill: the room that lets a
/// load bring the page it fetched home.
const DROPPED: u64 = 6_000;
const LOADERS: usize = 6;
const PAGES_PER_ROUND: usize = 16;
const ROUNDS: usize = 12;

#[test]
fn loads_of_a_page_that_moves_home_meanwhile_never_answer_unavailable() {
    let cluster = TestCluster::start(&[
        MemberSpec {
            name: "owner",
            capacity: "16MiB",
            extra: &["--replicas", "2"],
        },
        MemberSpec {
            name: "donor1",
            capacity: "256MiB",
            extra: &["--donate", "128MiB"],
        },
        MemberSpec {
            name: "donor2",
            capacity: "256MiB",
            extra: &["--donate", "128MiB"],
        },
    ])
    .unwrap();
    cluster.wait_up("owner", 3, FORM_TIMEOUT).unwrap();
    let socket = cluster.member("owner").socket();
    let client = BlockingClient::connect(&socket).unwrap();
    client.init_area(AREA, false).unwrap();
    let pages = Arc::new(Pages::synthetic(4_096, 3));
    let page_of = |o: u64| (o as usize * 7) % pages.len();
    let mut held = Vec::new();
    for start in (0..STORED).step_by(256) {
        let batch: Vec<(u64, Bytes)> = (start..start + 256)
            .map(|o| (o, pages.page_bytes(page_of(o))))
            .collect();
        let statuses = client.store_pages(AREA, &batch).unwrap();
        for ((o, _), s) in batch.iter().zip(statuses) {
            if s == v1::Status::Ok {
                held.push(*o);
            }
        }
    }
    let owner = cluster.member("owner");
    wait_for(Duration::from_secs(60), || {
        (owner.metric("ramster_store_remote_pages")? > 10_000.0).then_some(())
    })
    .unwrap();
    // Room at home: the newest pages (at home still) go.
    let dropped: Vec<u64> = (STORED - DROPPED..STORED).collect();
    for chunk in dropped.chunks(512) {
        client.invalidate_pages(AREA, chunk).unwrap();
    }
    held.retain(|&o| o < STORED - DROPPED);

    let loaders: Vec<BlockingClient> = (0..LOADERS)
        .map(|_| BlockingClient::connect(&socket).unwrap())
        .collect();
    let mut failures = Vec::new();
    let mut checked = 0;
    // The oldest pages are the coldest: on donors.
    let mut next = held.iter().copied();
    for round in 0..ROUNDS {
        let offsets: Vec<u64> = next.by_ref().take(PAGES_PER_ROUND).collect();
        cluster.member("donor1").signal("-STOP");
        let barrier = Barrier::new(LOADERS);
        std::thread::scope(|s| {
            let handles: Vec<_> = loaders
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let (offsets, barrier, pages) = (&offsets, &barrier, &pages);
                    s.spawn(move || {
                        barrier.wait();
                        // A moment apart: each reads where the pages are
                        // while the one before still waits on donor1.
                        std::thread::sleep(Duration::from_millis(3 * i as u64));
                        let got = c.load_pages(AREA, offsets).unwrap();
                        let mut bad = Vec::new();
                        for (&o, g) in offsets.iter().zip(got) {
                            match g {
                                Ok(p) if p[..] == pages.page(page_of(o))[..] => {}
                                Ok(_) => bad.push(format!("round {round}: page {o} differs")),
                                Err(st) => bad.push(format!("round {round}: page {o}: {st:?}")),
                            }
                        }
                        bad
                    })
                })
                .collect();
            for h in handles {
                failures.extend(h.join().unwrap());
                checked += offsets.len();
            }
        });
        cluster.member("donor1").signal("-CONT");
        // Heard from again before the next round freezes it.
        std::thread::sleep(Duration::from_millis(1_500));
    }
    let relooks = owner.metric("ramster_remote_load_relooks_total");
    eprintln!(
        "{checked} loads checked, {} failed; pages looked up again: {relooks:?}",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {checked} loads failed, first: {:#?}\nthe owner's log ends:\n{}",
        failures.len(),
        &failures[..failures.len().min(10)],
        owner.log_tail(40)
    );
}
