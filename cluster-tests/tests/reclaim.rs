//! A donor that needs its memory back gets it without a page being lost:
//! `ramster cluster donate SIZE` lowers a memory server's donation below
//! what it holds, its heartbeats ask the owner for the excess, and the
//! owner moves that many copies to other donors (or home) before they are
//! released there. Every page still loads, with two copies. A donor whose
//! own pages fill its store gives back what it holds the same way.

use std::time::Duration;

use ramster_client::BlockingClient;
use ramster_cluster_tests::{
    MemberSpec, OWNER_MEMSRV_TWO_PEERS, TestCluster, store_into, store_pages, verify_pages,
    wait_for,
};
use ramster_node::cli::corpus::Pages;
use ramster_protocol::v1::Status;

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
    owner.wait_for_copies(&client, 2, 0, FORM_TIMEOUT);
    // Given back, the donation takes pages again.
    let (code, said) = memsrv.cli(&["cluster", "donate", "256MiB"]);
    assert_eq!(code, 0, "{said}");
    assert_eq!(
        memsrv.metric("ramster_donor_limit_bytes"),
        Some(256.0 * MIB)
    );
}

/// Two owners that both fill: `a` also donates, and holds copies of
/// `b`'s pages until its own pages fill its store.
const A_DONATES_THEN_FILLS: [MemberSpec<'static>; 4] = [
    MemberSpec {
        name: "a",
        capacity: "32MiB",
        extra: &["--donate", "64MiB"],
    },
    MemberSpec {
        name: "b",
        capacity: "32MiB",
        extra: &["--role", "client"],
    },
    MemberSpec {
        name: "memsrv",
        capacity: "256MiB",
        extra: &["--role", "memory-server"],
    },
    MemberSpec {
        name: "c",
        capacity: "256MiB",
        extra: &["--donate", "64MiB"],
    },
];

/// Fills of a's store by its own client before its limit must have fallen.
const A_FILLS_MAX: usize = 5;

#[test]
fn a_donor_whose_own_pages_grow_gives_back_what_it_holds() {
    let cluster = TestCluster::start(&A_DONATES_THEN_FILLS).unwrap();
    cluster.wait_up("b", 4, FORM_TIMEOUT).unwrap();
    let (a, b) = (cluster.member("a"), cluster.member("b"));
    let b_client = BlockingClient::connect(&b.socket()).unwrap();
    let b_pages = Pages::synthetic(32_768, 31);
    let b_accepted = store_pages(&b_client, AREA, &b_pages);
    let held = wait_for(FORM_TIMEOUT, || {
        let held = a.metric("ramster_donor_held_bytes")?;
        (held > 2.0 * MIB).then_some(held)
    })
    .unwrap();
    eprintln!("a holds {:.1} MiB of b's pages", held / MIB);
    assert_eq!(a.metric("ramster_donor_limit_bytes"), Some(64.0 * MIB));

    // a's own client stores four times a's store: a ships its own pages
    // out, and while its store is past the remotify line it takes no more
    // of b's and asks b to take back a tenth of what it holds each second.
    let a_client = BlockingClient::connect(&a.socket()).unwrap();
    let a_pages = Pages::synthetic(65_536, 37);
    a_client.init_area(AREA, false).unwrap();
    // Refusals are allowed once the donors a ships to are full. a's policy
    // samples its own fill once a tick (a second), and remotify keeps
    // bringing it back under the line: a fill may end between two samples,
    // so a's client fills again, a bounded number of times, until one
    // sample saw it. What was stored last is what a holds.
    let mut a_accepted = Vec::new();
    let mut limit = 0.0;
    for _ in 0..A_FILLS_MAX {
        a_accepted = store_into(&a_client, AREA, &a_pages, &[Status::RejectedNoCapacity]);
        limit = a.metric("ramster_donor_limit_bytes").unwrap();
        if limit < 64.0 * MIB {
            break;
        }
    }
    // Below the donation, where only pressure puts it (it was at the
    // donation before the fill). What a held is no yardstick: b may have
    // shipped it more pages meanwhile. That a gave pages back is what b's
    // reclaims below show.
    assert!(
        limit < 64.0 * MIB,
        "a's limit stayed at its donation, {:.1} MiB, with its own store full",
        limit / MIB
    );
    let reclaimed = wait_for(RECLAIM_TIMEOUT, || {
        let n = b.metric("ramster_reclaimed_pages_total")?;
        (n > 0.0).then_some(n)
    })
    .unwrap_or_else(|e| {
        panic!(
            "b took nothing back from a ({e}); b's log ends:\n{}",
            b.log_tail(40)
        )
    });
    eprintln!(
        "a's limit fell to {:.1} MiB; b took back {reclaimed} pages; a holds {:.1} MiB",
        limit / MIB,
        a.metric("ramster_donor_held_bytes").unwrap_or(0.0) / MIB
    );
    verify_pages(&b_client, AREA, &b_pages, &b_accepted);
    verify_pages(&a_client, AREA, &a_pages, &a_accepted);
    assert_eq!(b.metric("ramster_unrecoverable_pages"), Some(0.0));
}

/// `ramster cluster capacity SIZE` on an owner: what it holds above the
/// new capacity goes to donors at once, nothing is lost, and given its
/// capacity back it brings the pages home.
#[test]
fn an_owner_given_less_capacity_ships_the_excess_to_donors_and_loses_nothing() {
    let cluster = TestCluster::start(&[
        MemberSpec {
            name: "owner",
            capacity: "32MiB",
            extra: &["--replicas", "2"],
        },
        MemberSpec {
            name: "memsrv",
            capacity: "128MiB",
            extra: &["--role", "memory-server"],
        },
        MemberSpec {
            name: "peer1",
            capacity: "128MiB",
            extra: &["--donate", "96MiB"],
        },
    ])
    .unwrap();
    cluster.wait_up("owner", 3, FORM_TIMEOUT).unwrap();
    let owner = cluster.member("owner");
    let client = BlockingClient::connect(&owner.socket()).unwrap();
    let pages = Pages::synthetic(8192, 31);
    let accepted = store_pages(&client, AREA, &pages);
    let store = || client.stats().unwrap().store.unwrap();
    let held = store().used_bytes as f64;
    assert!(
        held > 8.0 * MIB && held < 0.85 * 32.0 * MIB,
        "{:.1} MiB held: enough to ship, below where remotify starts",
        held / MIB
    );
    assert_eq!(store().remote_pages, 0);

    // Bad input is refused and changes nothing.
    let (code, _) = owner.cli(&["cluster", "capacity", "64MiB"]);
    assert_ne!(code, 0);
    let (code, _) = owner.cli(&["cluster", "capacity", "4KiB"]);
    assert_ne!(code, 0);
    let above =
        ramster_node::cli::admin_client::post(&owner.admin, "/v1/capacity?bytes=67108864").unwrap();
    assert_eq!(above.status, 409, "{}", above.body);
    assert!(above.body.contains("more than"), "{}", above.body);
    let bad = ramster_node::cli::admin_client::post(&owner.admin, "/v1/capacity").unwrap();
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert_eq!(store().capacity_bytes, 32 << 20);

    let (code, said) = owner.cli(&["cluster", "capacity", "4MiB"]);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("above it"), "{said}");
    let shipped = wait_for(RECLAIM_TIMEOUT, || {
        let s = store();
        ((s.used_bytes as f64) <= 0.85 * 4.0 * MIB).then_some(s.remote_pages)
    })
    .unwrap_or_else(|e| panic!("the owner still holds {:?} ({e})", store()));
    assert!(shipped > 0);
    eprintln!("{shipped} pages went to donors");
    verify_pages(&client, AREA, &pages, &accepted);
    assert_eq!(owner.metric("ramster_unrecoverable_pages"), Some(0.0));

    // Its capacity back, the owner is far below the suction line and
    // brings every page home.
    let (code, said) = owner.cli(&["cluster", "capacity", "32MiB"]);
    assert_eq!(code, 0, "{said}");
    wait_for(RECLAIM_TIMEOUT, || {
        (store().remote_pages == 0).then_some(())
    })
    .unwrap_or_else(|e| panic!("pages still on donors ({e}): {:?}", store()));
    verify_pages(&client, AREA, &pages, &accepted);
}
