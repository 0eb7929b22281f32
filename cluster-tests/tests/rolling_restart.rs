//! A rolling restart loses nothing: every donor of a four-node cluster is
//! stopped and started again in turn, the next one taken as soon as the
//! restarted node says it is ready (`ramster probe`, as an orchestrator
//! asks), while a client keeps loading; with two copies of every page,
//! every accepted page still loads byte-identical afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ramster_client::BlockingClient;
use ramster_cluster_tests::{MemberSpec, TestCluster, store_pages, verify_pages, wait_for};
use ramster_node::cli::corpus::Pages;

const AREA: u32 = 1;
const FORM_TIMEOUT: Duration = Duration::from_secs(30);
const READY_TIMEOUT: Duration = Duration::from_secs(180);

const DONORS: [&str; 3] = ["d1", "d2", "d3"];

fn donor(name: &'static str) -> MemberSpec<'static> {
    MemberSpec {
        name,
        capacity: "256MiB",
        extra: &["--donate", "192MiB"],
    }
}

#[test]
fn restarting_every_donor_in_turn_loses_no_page() {
    let mut cluster = TestCluster::start(&[
        MemberSpec {
            name: "owner",
            capacity: "32MiB",
            extra: &["--replicas", "2"],
        },
        donor("d1"),
        donor("d2"),
        donor("d3"),
    ])
    .unwrap();
    cluster.wait_up("owner", 4, FORM_TIMEOUT).unwrap();
    let owner = cluster.member("owner");
    let client = BlockingClient::connect(&owner.socket()).unwrap();
    let pages = Arc::new(Pages::synthetic(32_768, 41));
    let accepted = Arc::new(store_pages(&client, AREA, &pages));
    owner.wait_for_copies(&client, 2, 0, FORM_TIMEOUT);

    // A client loading pages all along, every one checked.
    let stop = Arc::new(AtomicBool::new(false));
    let loaded = Arc::new(AtomicU64::new(0));
    let loader = {
        let (socket, pages, accepted) = (owner.socket(), pages.clone(), accepted.clone());
        let (stop, loaded) = (stop.clone(), loaded.clone());
        std::thread::spawn(move || {
            let client = BlockingClient::connect(&socket).unwrap();
            let mut next = 0usize;
            // Bounded by the test: it sets `stop` after the last restart.
            while !stop.load(Ordering::Relaxed) {
                let chunk: Vec<u64> = (0..64)
                    .map(|i| accepted[(next + i * 509) % accepted.len()])
                    .collect();
                next += 1;
                verify_pages(&client, AREA, &pages, &chunk);
                loaded.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        })
    };

    for name in DONORS {
        let m = cluster.member_mut(name);
        m.stop();
        m.start().unwrap();
        let m = cluster.member(name);
        let ready = wait_for(READY_TIMEOUT, || {
            let (code, said) = m.cli(&["probe"]);
            (code == 0).then_some(said)
        });
        let owner = cluster.member("owner");
        assert!(
            ready.is_ok(),
            "{name} never got ready: {:?}\nthe owner's log ends:\n{}",
            m.cli(&["probe"]),
            owner.log_tail(30)
        );
        eprintln!(
            "{name} restarted and ready; {} pages loaded so far",
            loaded.load(Ordering::Relaxed)
        );
    }
    stop.store(true, Ordering::Relaxed);
    loader
        .join()
        .expect("every load during the restarts was right");

    let owner = cluster.member("owner");
    assert_eq!(owner.metric("ramster_unrecoverable_pages"), Some(0.0));
    verify_pages(&client, AREA, &pages, &accepted);
    owner.wait_for_copies(&client, 2, 0, FORM_TIMEOUT);
}
