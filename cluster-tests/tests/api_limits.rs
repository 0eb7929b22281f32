//! The native API at its limits, against real `ramster node` processes: a
//! small request that has to wait on donors never stops the thread that
//! serves it, and a request whose answer could not fit in one frame is
//! refused before it changes anything. Either way no accepted page is lost.

use std::collections::HashSet;
use std::ops::Range;
use std::process::Command;
use std::time::{Duration, Instant};

use ramster_client::{BlockingClient, ClientError, op};
use ramster_cluster_tests::{
    Member, MemberSpec, NodeProcess, TestCluster, store_into, verify_pages,
};
use ramster_node::cli::corpus::Pages;
use ramster_protocol::BATCH_OPS_MAX;
use ramster_protocol::v1::{self, Status, op::Kind};

const AREA: u32 = 1;
const FORM_TIMEOUT: Duration = Duration::from_secs(30);

/// An owner whose store fills fast, keeping one copy of each page that
/// leaves it, and a peer with room for all of them.
const OWNER_AND_DONOR: [MemberSpec<'static>; 2] = [
    MemberSpec {
        name: "owner",
        capacity: "8MiB",
        extra: &["--replicas", "1"],
    },
    MemberSpec {
        name: "donor",
        capacity: "256MiB",
        extra: &["--donate", "256MiB"],
    },
];

fn shrink(area: u32, max_pages: u32) -> v1::Op {
    op(Kind::Shrink(v1::Shrink {
        area,
        target_pages: 0,
        max_pages,
    }))
}

/// Shrinks `area` to nothing, `max_pages` per request of one op, checking
/// each page handed back against the corpus; the offsets handed back.
fn shrink_to_nothing(
    client: &BlockingClient,
    area: u32,
    pages: &Pages,
    max_pages: u32,
) -> HashSet<u64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut handed = HashSet::new();
    loop {
        let r = client
            .call(vec![shrink(area, max_pages)])
            .unwrap_or_else(|e| panic!("shrink after {} pages: {e}", handed.len()))
            .pop()
            .unwrap();
        assert_eq!(r.status(), Status::Ok, "{}", r.detail);
        assert!(r.detail.is_empty(), "{}", r.detail);
        for p in &r.returned {
            assert!(
                p.page[..] == pages.page(p.offset as usize)[..],
                "page {} came back different",
                p.offset
            );
            assert!(
                handed.insert(p.offset),
                "page {} handed back twice",
                p.offset
            );
        }
        if r.value == 0 {
            return handed;
        }
        assert!(
            Instant::now() < deadline,
            "{} pages still in the area after {} handed back",
            r.value,
            handed.len()
        );
    }
}

fn assert_no_panic(log: &str) {
    assert!(
        !log.contains("panicked"),
        "the node panicked; its log:\n{log}"
    );
}

/// What one-page stores came to.
#[derive(Default)]
struct Stored {
    accepted: Vec<u64>,
    refused_for_room: usize,
}

/// Stores `offsets` of `pages` into `area`, one page per request as a
/// simple client sends them, until `enough` says so. Any answer but a
/// status fails the test, with the end of `owner`'s log.
fn store_one_page_each(
    client: &BlockingClient,
    owner: &Member,
    pages: &Pages,
    offsets: Range<u64>,
    enough: impl Fn(&Stored) -> bool,
) -> Stored {
    let mut stored = Stored::default();
    for o in offsets {
        if enough(&stored) {
            break;
        }
        let statuses = client
            .store_pages(AREA, &[(o, pages.page_bytes(o as usize))])
            .unwrap_or_else(|e| {
                panic!(
                    "store {o} failed ({e}); the owner's log ends:\n{}",
                    owner.log_tail(20)
                )
            });
        match statuses[..] {
            [Status::Ok] => stored.accepted.push(o),
            [Status::RejectedIncompressible] => {}
            [Status::RejectedNoCapacity] => stored.refused_for_room += 1,
            ref other => panic!("store {o} answered {other:?}"),
        }
    }
    stored
}

fn signal(m: &Member, sig: &str) {
    let pid = m.pid().expect("running").to_string();
    let ok = Command::new("kill")
        .args([sig, &pid])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid} failed");
}

#[test]
fn one_page_stores_into_a_full_owner_wait_for_room_without_stopping_its_transport() {
    let cluster = TestCluster::start(&OWNER_AND_DONOR).unwrap();
    cluster.wait_up("owner", 2, FORM_TIMEOUT).unwrap();
    let owner = cluster.member("owner");
    let donor = cluster.member("donor");
    let client = BlockingClient::connect(&owner.socket()).unwrap();
    client.init_area(AREA, false).unwrap();
    let pages = Pages::synthetic(16_384, 25);

    // Past what the owner holds, while remotify ships older pages to the
    // donor.
    let before = store_one_page_each(&client, owner, &pages, 0..8_192, |_| false);

    // The donor stops answering but is still up in the owner's view for a
    // while: remotify stalls, the owner fills, and each store waits for
    // room, then is refused.
    signal(donor, "-STOP");
    let paused = store_one_page_each(&client, owner, &pages, 8_192..16_384, |s| {
        s.refused_for_room >= 8
    });
    signal(donor, "-CONT");
    let waited = owner.metric("ramster_store_throttles_total").unwrap();
    eprintln!(
        "{} and {} pages accepted before and while the donor was stopped, {} refused for \
         lack of room, {waited} stores waited for room",
        before.accepted.len(),
        paused.accepted.len(),
        paused.refused_for_room
    );
    assert!(paused.refused_for_room > 0, "the owner never filled");
    assert!(waited > 0.0, "no store waited for room");

    // The transport still carries pages both ways: once the donor is back,
    // stores are accepted again, and every accepted page loads back, one
    // page per request for some of them.
    cluster.wait_up("owner", 2, FORM_TIMEOUT).unwrap();
    let next = 8_192 + (paused.accepted.len() + paused.refused_for_room) as u64;
    let after = store_one_page_each(&client, owner, &pages, next..next + 2_048, |_| false);
    assert!(
        !after.accepted.is_empty(),
        "no store accepted after the pause"
    );
    let accepted: Vec<u64> = [before.accepted, paused.accepted, after.accepted].concat();
    verify_pages(&client, AREA, &pages, &accepted);
    for &o in accepted.iter().step_by(64) {
        let got = client.load_pages(AREA, &[o]).unwrap().pop().unwrap();
        assert!(
            got.unwrap_or_else(|s| panic!("page {o} did not load: {s:?}"))[..]
                == pages.page(o as usize)[..],
            "page {o} came back different"
        );
    }
    let remote = client.stats().unwrap().store.unwrap().remote_pages;
    assert!(remote > 0, "nothing went to the donor");
    assert_no_panic(&owner.log());
}

#[test]
fn a_one_op_shrink_brings_pages_home_from_the_donor_and_hands_back_every_one() {
    let cluster = TestCluster::start(&OWNER_AND_DONOR).unwrap();
    cluster.wait_up("owner", 2, FORM_TIMEOUT).unwrap();
    let owner = cluster.member("owner");
    let client = BlockingClient::connect(&owner.socket()).unwrap();
    client.init_area(AREA, false).unwrap();
    let pages = Pages::synthetic(12_288, 27);
    let accepted = store_into(&client, AREA, &pages, &[Status::RejectedNoCapacity]);
    let remote = owner.wait_for_copies(&client, 1, 1_000, FORM_TIMEOUT);
    eprintln!("{} pages accepted, {remote} on the donor", accepted.len());

    // Small shrinks, one op each, as a client sends them: the pages at home
    // run out first, then each shrink brings pages home from the donor.
    let handed = shrink_to_nothing(&client, AREA, &pages, 256);
    let accepted: HashSet<u64> = accepted.into_iter().collect();
    assert_eq!(
        handed.len(),
        accepted.len(),
        "accepted pages were not handed back"
    );
    assert_eq!(handed, accepted);
    assert_eq!(client.curr_pages(AREA).unwrap(), 0);

    // The node goes on serving pages that live on the donor.
    let more = Pages::synthetic(4_096, 28);
    client.init_area(AREA + 1, false).unwrap();
    let accepted_more = store_into(&client, AREA + 1, &more, &[Status::RejectedNoCapacity]);
    verify_pages(&client, AREA + 1, &more, &accepted_more);
    assert_no_panic(&owner.log());
}

/// The request is refused whole as too large an answer.
fn assert_refused(result: Result<Vec<v1::OpResult>, ClientError>) {
    match result {
        Err(ClientError::Server {
            code: v1::ErrorCode::FrameTooLarge,
            message,
        }) => assert!(message.contains("smaller requests"), "{message}"),
        other => panic!("not refused as too large an answer: {other:?}"),
    }
}

#[test]
fn a_request_whose_answer_could_outgrow_a_frame_is_refused_before_it_changes_anything() {
    let node = NodeProcess::start("frame-limit", "256MiB", &[]).unwrap();
    let client = BlockingClient::connect(&node.socket).unwrap();
    client.init_area(AREA, false).unwrap();
    let pages = Pages::synthetic(3_000, 29);
    let accepted = store_into(&client, AREA, &pages, &[]);
    let held = accepted.len() as u64;

    // Two shrinks that would take out more pages than one answer carries.
    assert_refused(client.call(vec![shrink(AREA, 1024), shrink(AREA, 1024)]));
    assert_eq!(client.curr_pages(AREA).unwrap(), held, "pages were taken");

    // A full shrink and loads beside it.
    let mut ops = vec![shrink(AREA, 1024)];
    ops.extend((0..64).map(|o| {
        op(Kind::Load(v1::Load {
            area: AREA,
            offset: o,
        }))
    }));
    assert_refused(client.call(ops));
    assert_eq!(client.curr_pages(AREA).unwrap(), held, "pages were taken");

    // Stats, once the node has hundreds of areas, asked for many times.
    for area in 100..400 {
        client.init_area(area, true).unwrap();
    }
    let stats = (0..BATCH_OPS_MAX)
        .map(|_| op(Kind::GetStats(v1::GetStats {})))
        .collect();
    assert_refused(client.call(stats));

    // What fits is served on the same connection: a full batch of loads,
    // and a full shrink, each page of which is in its answer.
    let full: Vec<u64> = accepted.iter().copied().take(BATCH_OPS_MAX).collect();
    for (&o, got) in full.iter().zip(client.load_pages(AREA, &full).unwrap()) {
        assert!(got.unwrap()[..] == pages.page(o as usize)[..]);
    }
    let r = client
        .call(vec![shrink(AREA, u32::MAX)])
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(r.returned.len(), BATCH_OPS_MAX);
    let mut handed: HashSet<u64> = HashSet::new();
    for p in &r.returned {
        assert!(p.page[..] == pages.page(p.offset as usize)[..]);
        handed.insert(p.offset);
    }
    handed.extend(shrink_to_nothing(&client, AREA, &pages, 1024));
    assert_eq!(
        handed,
        accepted.iter().copied().collect::<HashSet<u64>>(),
        "accepted pages were lost"
    );

    let mut node = node;
    assert!(node.is_running(), "the node died: {}", node.log());
    assert_no_panic(&node.log());
}
