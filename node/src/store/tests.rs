use super::*;
use std::sync::Arc;

fn page_of(seed: u64, compressible: bool) -> Box<Page> {
    let mut p = Box::new([0u8; PAGE_BYTES]);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for (i, chunk) in p.chunks_exact_mut(8).enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Compressible: one random word in sixteen, the rest a repeated pattern.
        let v = if !compressible || i % 16 == 0 {
            x
        } else {
            0x6c6c_6568_0000_0000 | (i as u64 % 4)
        };
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    p
}

fn key(i: u64) -> PageKey {
    PageKey {
        space: 1,
        object: 0,
        index: i,
    }
}

#[test]
fn stores_and_loads_every_kind_of_page() {
    let s = PageStore::new(StoreConfig::with_capacity(64 << 20));
    let zero = Box::new([0u8; PAGE_BYTES]);
    let mut same = Box::new([0u8; PAGE_BYTES]);
    compress::fill_page(0xdead_beef_0000_0001, &mut same);
    let comp = page_of(1, true);
    let pages: [&Page; 3] = [&zero, &same, &comp];
    for (i, p) in pages.iter().enumerate() {
        assert_eq!(
            s.store(key(i as u64), p, Retention::Persistent),
            StoreOutcome::Accepted
        );
    }
    let mut out = Box::new([0u8; PAGE_BYTES]);
    for (i, p) in pages.iter().enumerate() {
        assert_eq!(s.load(key(i as u64), &mut out), LoadOutcome::Hit);
        assert_eq!(&out[..], &p[..]);
    }
    let st = s.stats();
    assert_eq!(
        (st.pages, st.same_filled_pages, st.compressed_pages),
        (3, 2, 1)
    );
    s.audit();
}

#[test]
fn incompressible_pages_are_refused_and_drop_the_old_copy() {
    let s = PageStore::new(StoreConfig::with_capacity(64 << 20));
    assert_eq!(
        s.store(key(1), &page_of(1, true), Retention::Persistent),
        StoreOutcome::Accepted
    );
    assert_eq!(
        s.store(key(1), &page_of(2, false), Retention::Persistent),
        StoreOutcome::Rejected(RejectReason::Incompressible)
    );
    let mut out = Box::new([0u8; PAGE_BYTES]);
    assert_eq!(s.load(key(1), &mut out), LoadOutcome::Miss);
    s.audit();
}

#[test]
fn used_bytes_never_exceed_capacity_and_full_means_no_capacity() {
    let cap = 1 << 20;
    let s = PageStore::new(StoreConfig::with_capacity(cap));
    let mut accepted = 0;
    let mut refused = 0;
    for i in 0..2000 {
        match s.store(key(i), &page_of(i, true), Retention::Persistent) {
            StoreOutcome::Accepted => accepted += 1,
            StoreOutcome::Rejected(RejectReason::NoCapacity) => refused += 1,
            StoreOutcome::Rejected(r) => panic!("unexpected {r:?}"),
        }
        assert!(s.stats().used_bytes <= cap);
    }
    assert!(
        accepted > 0 && refused > 0,
        "{accepted} accepted, {refused} refused"
    );
    s.audit();
}

#[test]
fn a_lowered_capacity_keeps_every_page_and_refuses_new_ones_until_room_is_made() {
    let s = PageStore::new(StoreConfig::with_capacity(8 << 20));
    for i in 0..4000 {
        assert_eq!(
            s.store(key(i), &page_of(i, true), Retention::Persistent),
            StoreOutcome::Accepted
        );
    }
    let held = s.used_bytes();
    assert_eq!(
        s.set_capacity(16 << 20),
        Err(CapacityError::AboveStart {
            asked: 16 << 20,
            at_start: 8 << 20
        })
    );
    assert_eq!(
        s.set_capacity(4096),
        Err(CapacityError::BelowMinimum { asked: 4096 })
    );
    assert_eq!(s.capacity_bytes(), 8 << 20);
    assert!(held > MIN_CAPACITY_BYTES, "{held}");
    s.set_capacity(MIN_CAPACITY_BYTES).unwrap();
    assert_eq!(s.stats().capacity_bytes, MIN_CAPACITY_BYTES);
    // Held above the new capacity, nothing is dropped...
    let mut out = Box::new([0u8; PAGE_BYTES]);
    for i in 0..4000 {
        assert_eq!(s.load(key(i), &mut out), LoadOutcome::Hit);
        assert_eq!(&out[..], &page_of(i, true)[..]);
    }
    // ...but new pages take no more memory: only slack in slabs already
    // charged, and the rest are refused, until enough is freed.
    let mut refused = 0;
    for i in 10_000..11_000 {
        match s.store(key(i), &page_of(i, true), Retention::Persistent) {
            StoreOutcome::Accepted => {}
            StoreOutcome::Rejected(RejectReason::NoCapacity) => refused += 1,
            other => panic!("{other:?}"),
        }
        assert!(s.used_bytes() <= held);
    }
    assert!(refused > 900, "{refused} of 1000 refused");
    for i in (0..4000).chain(10_000..11_000) {
        s.invalidate(key(i));
    }
    assert_eq!(
        s.store(key(5000), &page_of(5000, true), Retention::Persistent),
        StoreOutcome::Accepted
    );
    s.set_capacity(8 << 20).unwrap();
    s.audit();
}

#[test]
fn persistent_stores_evict_ephemeral_pages_first_then_writethrough() {
    let cap = 512 << 10;
    let s = PageStore::new(StoreConfig {
        capacity_bytes: cap,
        shards: 4,
    });
    let eph = |i| PageKey {
        space: 7,
        object: 0,
        index: i,
    };
    let wt = |i| PageKey {
        space: 8,
        object: 0,
        index: i,
    };
    let mut n = 0;
    while s.store(eph(n), &page_of(n, true), Retention::Ephemeral) == StoreOutcome::Accepted
        && n < 10_000
    {
        n += 1;
    }
    for i in 0..20 {
        assert_eq!(
            s.store(wt(i), &page_of(1000 + i, true), Retention::Writethrough),
            StoreOutcome::Accepted
        );
    }
    // Persistent stores keep succeeding while there is anything to evict.
    for i in 0..50 {
        assert_eq!(
            s.store(key(i), &page_of(5000 + i, true), Retention::Persistent),
            StoreOutcome::Accepted
        );
    }
    assert!(s.stats().evicted_pages > 0);
    // Writethrough pages outlive ephemeral ones.
    assert_eq!(s.space_pages(8), 20);
    assert!(s.space_pages(7) < n);
    let mut out = Box::new([0u8; PAGE_BYTES]);
    for i in 0..50 {
        assert_eq!(s.load(key(i), &mut out), LoadOutcome::Hit);
        assert_eq!(&out[..], &page_of(5000 + i, true)[..]);
    }
    s.audit();
}

#[test]
fn coldest_pages_come_oldest_first_and_loads_warm_them() {
    let s = PageStore::new(StoreConfig::with_capacity(64 << 20));
    for i in 0..100 {
        s.store(key(i), &page_of(i, true), Retention::Persistent);
    }
    let mut out = Box::new([0u8; PAGE_BYTES]);
    s.load(key(0), &mut out);
    let cold = s.coldest(Retention::Persistent, 10);
    let idx: Vec<u64> = cold.iter().map(|c| c.key.index).collect();
    assert_eq!(idx, (1..11).collect::<Vec<_>>());
    assert!(s.coldest(Retention::Ephemeral, 10).is_empty());
}

/// The coldest pages, however unevenly they fall over the shards, are the
/// ones a walk of every shard's whole list finds.
#[test]
fn coldest_is_exact_when_the_cold_pages_crowd_into_one_shard() {
    let s = PageStore::new(StoreConfig::with_capacity(256 << 20));
    let n = 8_000u64;
    for i in 0..n {
        s.store(key(i), &page_of(i, true), Retention::Persistent);
    }
    let full = |max| {
        let (cold, enough) = s.coldest_taking(Retention::Persistent, max, n as usize);
        assert!(enough, "a walk of every whole list is enough");
        cold
    };
    let keys = |c: Vec<ColdPage>| c.into_iter().map(|c| c.key).collect::<Vec<_>>();
    // Evenly spread: the first, cheap take is enough.
    assert_eq!(keys(s.coldest(Retention::Persistent, 256)), keys(full(256)));
    // Warm every page outside shard 0: its pages (about 125) become the
    // coldest, far more than a fair share of 256 over 64 shards.
    let mut out = Box::new([0u8; PAGE_BYTES]);
    for i in 0..n {
        if s.shard_of(hash_key(&key(i))) != 0 {
            s.load(key(i), &mut out);
        }
    }
    let cold = s.coldest(Retention::Persistent, 256);
    let crowded = cold
        .iter()
        .filter(|c| s.shard_of(hash_key(&c.key)) == 0)
        .count();
    assert!(
        crowded > 64,
        "{crowded} of shard 0's pages among the coldest"
    );
    assert_eq!(keys(cold), keys(full(256)));
}

#[test]
fn take_removes_and_invalidate_matching_drops_a_space() {
    let s = PageStore::new(StoreConfig::with_capacity(64 << 20));
    for i in 0..50 {
        s.store(
            PageKey {
                space: 2,
                object: i % 5,
                index: i,
            },
            &page_of(i, true),
            Retention::Ephemeral,
        );
        s.store(key(i), &page_of(i, true), Retention::Persistent);
    }
    let mut out = Box::new([0u8; PAGE_BYTES]);
    assert_eq!(s.take(key(3), &mut out), LoadOutcome::Hit);
    assert_eq!(s.load(key(3), &mut out), LoadOutcome::Miss);
    assert_eq!(s.invalidate_matching(2, Some(1)), 10);
    assert_eq!(s.space_pages(2), 40);
    assert_eq!(s.invalidate_matching(2, None), 40);
    assert_eq!(s.space_pages(2), 0);
    assert_eq!(s.space_pages(1), 49);
    s.audit();
}

#[test]
fn drain_hands_back_each_page_once() {
    let s = PageStore::new(StoreConfig::with_capacity(64 << 20));
    for i in 0..300 {
        s.store(
            key(i),
            &page_of(i, i % 3 != 0 || i % 2 == 0),
            Retention::Persistent,
        );
    }
    let held = s.space_pages(1);
    let mut seen = std::collections::HashSet::new();
    let handed = s.drain_space(1, 100, |k, p| {
        assert_eq!(
            &p.unwrap()[..],
            &page_of(k.index, k.index % 3 != 0 || k.index % 2 == 0)[..]
        );
        assert!(seen.insert(k.index));
    });
    assert_eq!(handed, 100);
    assert_eq!(s.space_pages(1), held - 100);
    s.audit();
}

#[test]
fn concurrent_stores_and_loads_see_their_own_pages() {
    let s = Arc::new(PageStore::new(StoreConfig::with_capacity(256 << 20)));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut out = Box::new([0u8; PAGE_BYTES]);
                for round in 0..3u64 {
                    for i in 0..500 {
                        let k = PageKey {
                            space: t as u32,
                            object: 0,
                            index: i,
                        };
                        let p = page_of(t * 1_000_000 + round * 1000 + i, true);
                        assert_eq!(
                            s.store(k, &p, Retention::Persistent),
                            StoreOutcome::Accepted
                        );
                        assert_eq!(s.load(k, &mut out), LoadOutcome::Hit);
                        assert_eq!(&out[..], &p[..]);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(s.stats().pages, 2000);
    s.audit();
}

fn donors(ids: &[DonorId]) -> Replicas {
    Replicas::new(ids).unwrap()
}

#[test]
fn replicas_hold_one_to_three_donors() {
    assert!(Replicas::new(&[]).is_none());
    assert!(Replicas::new(&[1, 2, 3, 4]).is_none());
    assert_eq!(donors(&[4, 9]).as_slice(), &[4, 9]);
}

#[test]
fn remotify_frees_the_local_copy_only_after_donors_ack() {
    let s = PageStore::new(StoreConfig::with_capacity(64 << 20));
    for i in 0..10 {
        s.store(key(i), &page_of(i, true), Retention::Persistent);
    }
    let mut out = Box::new([0u8; PAGE_BYTES]);
    s.load(key(0), &mut out); // page 0 is now the hottest
    let outbound = s.begin_remotify(3);
    let picked: Vec<u64> = outbound.iter().map(|o| o.key.index).collect();
    assert_eq!(picked, vec![1, 2, 3]);
    // Not handed out twice while in flight, and still loadable here.
    assert!(s.begin_remotify(3).iter().all(|o| o.key.index > 3));
    assert_eq!(s.load(key(1), &mut out), LoadOutcome::Hit);
    s.audit();

    // The bytes shipped decode to the page and match its checksum.
    let o = &outbound[1];
    let mut page = Box::new([0u8; PAGE_BYTES]);
    assert!(compress::decompress(&o.compressed, &mut page));
    assert_eq!(xxh3_64(&page[..]), o.checksum);

    let before = s.stats();
    assert!(s.finish_remotify(o.key, o.version, donors(&[7])));
    let after = s.stats();
    assert_eq!(after.remote_pages, before.remote_pages + 1);
    assert_eq!(after.compressed_pages, before.compressed_pages - 1);
    assert_eq!(after.pages, before.pages);
    match s.load(o.key, &mut out) {
        LoadOutcome::Remote(r) => {
            assert_eq!(
                (r.version, r.checksum, r.replicas),
                (o.version, o.checksum, donors(&[7]))
            );
            assert_eq!(r.len as usize, o.compressed.len());
        }
        other => panic!("expected Remote, got {other:?}"),
    }
    s.audit();
}

#[test]
fn a_page_stored_again_while_in_flight_makes_the_donor_copy_stale() {
    let s = PageStore::new(StoreConfig::with_capacity(64 << 20));
    s.store(key(1), &page_of(1, true), Retention::Persistent);
    let o = s.begin_remotify(1).pop().unwrap();
    s.store(key(1), &page_of(2, true), Retention::Persistent);
    assert!(
        !s.finish_remotify(o.key, o.version, donors(&[3])),
        "a stale version was installed"
    );
    let mut out = Box::new([0u8; PAGE_BYTES]);
    assert_eq!(s.load(key(1), &mut out), LoadOutcome::Hit);
    assert_eq!(&out[..], &page_of(2, true)[..]);
    // An aborted remotify puts a page back in line.
    let o = s.begin_remotify(1).pop().unwrap();
    s.abort_remotify(o.key, o.version);
    assert_eq!(s.begin_remotify(1).pop().map(|p| p.key), Some(key(1)));
    s.audit();
}

#[test]
fn dropping_or_overwriting_a_remote_page_queues_its_donor_copies() {
    let s = PageStore::new(StoreConfig::with_capacity(64 << 20));
    for i in 0..3 {
        s.store(key(i), &page_of(i, true), Retention::Persistent);
    }
    for o in s.begin_remotify(3) {
        assert!(s.finish_remotify(o.key, o.version, donors(&[1, 2])));
    }
    assert!(s.take_released().is_empty());
    s.invalidate(key(0));
    s.store(key(1), &page_of(9, true), Retention::Persistent);
    let released: Vec<u64> = s.take_released().iter().map(|r| r.key.index).collect();
    assert_eq!(released, vec![0, 1]);
    assert_eq!(s.stats().remote_pages, 1);
    s.audit();
}

#[test]
fn fetched_pages_come_home_hottest_first_unless_changed() {
    let s = PageStore::new(StoreConfig::with_capacity(64 << 20));
    let mut shipped = std::collections::HashMap::new();
    for i in 0..5 {
        s.store(key(i), &page_of(i, true), Retention::Persistent);
    }
    for o in s.begin_remotify(5) {
        assert!(s.finish_remotify(o.key, o.version, donors(&[4])));
        shipped.insert(o.key, o.compressed);
    }
    let mut out = Box::new([0u8; PAGE_BYTES]);
    let LoadOutcome::Remote(_) = s.load(key(3), &mut out) else {
        panic!()
    };
    let hot = s.hottest_remote(2);
    assert_eq!(hot[0].key, key(3));
    // Bring page 3 home: donors' copies are released, loads hit locally.
    let released = s.install_fetched(&hot[0], &shipped[&key(3)]).unwrap();
    assert_eq!(released.replicas, donors(&[4]));
    assert_eq!(s.load(key(3), &mut out), LoadOutcome::Hit);
    assert_eq!(&out[..], &page_of(3, true)[..]);
    // A page stored again meanwhile is not overwritten by its old bytes.
    let r = hot[1];
    s.store(r.key, &page_of(77, true), Retention::Persistent);
    assert!(s.install_fetched(&r, &shipped[&r.key]).is_none());
    assert_eq!(s.load(r.key, &mut out), LoadOutcome::Hit);
    assert_eq!(&out[..], &page_of(77, true)[..]);
    // Wrong length is refused.
    let r = s.hottest_remote(1)[0];
    assert!(s.install_fetched(&r, &[1, 2, 3]).is_none());
    s.audit();
}

#[test]
fn a_page_brought_home_releases_the_copies_it_has_now_not_those_it_was_fetched_with() {
    let s = PageStore::new(StoreConfig::with_capacity(64 << 20));
    s.store(key(0), &page_of(0, true), Retention::Persistent);
    let o = s.begin_remotify(1).pop().expect("one page to ship");
    assert!(s.finish_remotify(o.key, o.version, donors(&[1, 2])));
    // A load (or suction) reads the page's location: copies on 1 and 2.
    let fetched_with = s.hottest_remote(1)[0];
    // Meanwhile repair moves the copy on 2 (down) to 3: same version.
    assert!(s.set_replicas(&fetched_with, donors(&[1, 3])));
    let released = s
        .install_fetched(&fetched_with, &o.compressed)
        .expect("same version, still remote: it comes home");
    assert_eq!(
        released.replicas,
        donors(&[1, 3]),
        "the copy on 3 would be held for ever"
    );
    s.audit();
}

#[test]
fn an_aborted_remotify_puts_the_page_back_among_the_coldest() {
    // Enough pages that every shard holds more than one batch's worth: a
    // page put back at the hot end would not be among the tails looked at.
    let s = PageStore::new(StoreConfig::with_capacity(256 << 20));
    for i in 0..8192 {
        s.store(key(i), &page_of(i, true), Retention::Persistent);
    }
    let taken = s.begin_remotify(3);
    let first: Vec<u64> = taken.iter().map(|o| o.key.index).collect();
    assert_eq!(first, vec![0, 1, 2]);
    for o in &taken {
        s.abort_remotify(o.key, o.version);
    }
    let again: Vec<u64> = s.begin_remotify(3).iter().map(|o| o.key.index).collect();
    assert_eq!(again, first, "aborted pages lost their place in line");
    s.audit();
}

#[test]
fn repair_lists_pages_with_a_gone_copy_and_something_left_to_read() {
    let s = PageStore::new(StoreConfig::with_capacity(64 << 20));
    for i in 0..4 {
        s.store(key(i), &page_of(i, true), Retention::Persistent);
    }
    let sets = [&[1, 2][..], &[2, 3], &[3], &[1]];
    for o in s.begin_remotify(4) {
        let set = sets[o.key.index as usize];
        assert!(s.finish_remotify(o.key, o.version, donors(set)));
    }
    let listed = |gone: &[u32], readable: &[u32]| {
        let (refs, degraded, unrecoverable) = s.remote_on(gone, readable, 1, 10);
        let mut keys: Vec<u64> = refs.iter().map(|r| r.key.index).collect();
        keys.sort_unstable();
        (keys, degraded, unrecoverable)
    };
    assert_eq!(listed(&[], &[]), (vec![], 0, 0));
    // Donor 1 lost: page 0 has donor 2 left, page 3 nothing.
    assert_eq!(listed(&[1], &[]), (vec![0], 2, 1));
    // Donor 1 draining: it still serves, so page 3 can be moved too.
    assert_eq!(listed(&[1], &[1]), (vec![0, 3], 2, 0));
    // Donors 2 and 3 lost: pages 1 and 2 have no copy left.
    assert_eq!(listed(&[2, 3], &[]), (vec![0], 3, 2));
    // At most `max` listed; all counted.
    let (refs, degraded, _) = s.remote_on(&[1, 2, 3], &[1, 2, 3], 1, 1);
    assert_eq!((refs.len(), degraded), (1, 4));
    // Two copies wanted: pages 2 and 3 are short of one.
    assert_eq!(s.remote_on(&[], &[], 2, 10).0.len(), 2);
}

#[test]
fn a_donor_struck_off_leaves_pages_short_or_lost_and_stale_sets_are_not_recorded() {
    let s = PageStore::new(StoreConfig::with_capacity(64 << 20));
    for i in 0..3 {
        s.store(key(i), &page_of(i, true), Retention::Persistent);
    }
    let sets = [&[1, 2][..], &[2, 3], &[2]];
    for o in s.begin_remotify(3) {
        assert!(s.finish_remotify(o.key, o.version, donors(sets[o.key.index as usize])));
    }
    let before = s.remote_on(&[], &[], 2, 10).0;
    let short = |s: &PageStore| {
        let (refs, degraded, unrecoverable) = s.remote_on(&[], &[], 2, 10);
        let mut keys: Vec<u64> = refs.iter().map(|r| r.key.index).collect();
        keys.sort_unstable();
        (keys, degraded, unrecoverable)
    };
    assert_eq!(short(&s), (vec![2], 1, 0));
    // Donor 2 came back empty: every page loses its copy there; page 2
    // had no other.
    assert_eq!(s.strike_donor(2), (3, 1));
    assert_eq!(s.strike_donor(2), (0, 0), "struck twice");
    assert_eq!(short(&s), (vec![0, 1], 3, 1));
    assert_eq!(s.stats().lost_pages, 1);
    let mut out = Box::new([0u8; PAGE_BYTES]);
    match s.load(key(2), &mut out) {
        LoadOutcome::Remote(r) => assert!(r.replicas.as_slice().is_empty()),
        other => panic!("a lost page must stay listed (unavailable), got {other:?}"),
    }
    // Repair built on the set read before the strike: not recorded.
    let stale = before.iter().find(|r| r.key.index == 2).expect("page 2");
    assert!(!s.set_replicas(stale, donors(&[2, 4])));
    // Built on the current set: recorded.
    let now = s.remote_on(&[], &[], 2, 10).0;
    let r0 = now.iter().find(|r| r.key.index == 0).expect("page 0");
    assert!(s.set_replicas(r0, donors(&[1, 4])));
    assert_eq!(short(&s), (vec![1], 2, 1));
    // Suction has nothing to bring home for a lost page.
    assert!(s.hottest_remote(10).iter().all(|r| r.key.index != 2));
    // Writing the page again makes it whole.
    s.store(key(2), &page_of(2, true), Retention::Persistent);
    assert_eq!(s.stats().lost_pages, 0);
    s.audit();
}

#[test]
fn writethrough_pages_ship_and_are_dropped_not_repaired_when_a_copy_is_lost() {
    let s = PageStore::new(StoreConfig::with_capacity(64 << 20));
    let wt = |i: u64| PageKey {
        space: 2,
        object: 0,
        index: i,
    };
    // Oldest first: two persistent pages, four writethrough ones, then an
    // ephemeral one, which never ships.
    for i in 0..2 {
        s.store(key(i), &page_of(i, true), Retention::Persistent);
    }
    for i in 0..4 {
        s.store(wt(i), &page_of(100 + i, true), Retention::Writethrough);
    }
    s.store(key(50), &page_of(50, true), Retention::Ephemeral);
    let outbound = s.begin_remotify(10);
    let shipped: Vec<(u32, Retention)> = outbound
        .iter()
        .map(|o| (o.key.space, o.retention))
        .collect();
    assert_eq!(
        shipped.len(),
        6,
        "persistent and writethrough pages, coldest first"
    );
    assert!(
        shipped[..2]
            .iter()
            .all(|&(sp, r)| sp == 1 && r == Retention::Persistent)
    );
    assert!(
        shipped[2..]
            .iter()
            .all(|&(sp, r)| sp == 2 && r == Retention::Writethrough)
    );
    // Writethrough pages 0 and 1 on donor 5, 2 on 6, 3 on 5 and 6;
    // persistent pages on 5 alone.
    for o in &outbound {
        let set: &[DonorId] = match (o.key.space, o.key.index) {
            (2, 2) => &[6],
            (2, 3) => &[5, 6],
            _ => &[5],
        };
        assert!(s.finish_remotify(o.key, o.version, donors(set)));
    }
    s.take_released();
    let mut out = Box::new([0u8; PAGE_BYTES]);
    match s.load(wt(1), &mut out) {
        LoadOutcome::Remote(r) => assert_eq!(r.retention, Retention::Writethrough),
        other => panic!("expected Remote, got {other:?}"),
    }

    // Repair lists only the persistent pages on a lost donor.
    let (refs, degraded, _) = s.remote_on(&[5], &[5], 1, 10);
    assert!(refs.iter().all(|r| r.retention == Retention::Persistent));
    assert_eq!((refs.len(), degraded), (2, 2));

    // A reclaim of one page's bytes from donor 6 drops one page (the
    // coldest there: page 2), and releases its copy.
    let len2 = outbound
        .iter()
        .find(|o| o.key == wt(2))
        .unwrap()
        .compressed
        .len() as u64;
    assert_eq!(s.drop_droppable_on(&[6], 1), (1, len2));
    assert!(!s.contains(wt(2)));
    let released = s.take_released();
    assert_eq!((released.len(), released[0].replicas), (1, donors(&[6])));

    // Donor 5 comes back empty: its writethrough pages are dropped, the
    // copy of page 3 on donor 6 is released, nothing counts as lost; the
    // persistent pages lose their only copy and are lost.
    let before = s.stats();
    assert_eq!(s.strike_donor(5), (5, 2));
    let after = s.stats();
    assert_eq!(after.lost_pages, 2);
    assert_eq!(after.dropped_remote_pages, before.dropped_remote_pages + 3);
    assert_eq!(after.remote_pages, before.remote_pages - 3);
    for i in 0..4 {
        assert!(!s.contains(wt(i)), "writethrough page {i} still listed");
    }
    let released = s.take_released();
    assert_eq!(released.len(), 1, "only page 3 had a copy left");
    assert_eq!(
        (released[0].key, released[0].replicas),
        (wt(3), donors(&[6]))
    );
    s.audit();
}

#[test]
fn an_unreachable_writethrough_page_is_dropped_only_at_the_version_fetched() {
    let s = PageStore::new(StoreConfig::with_capacity(64 << 20));
    let k = PageKey {
        space: 1,
        object: 0,
        index: 9,
    };
    let mut out = Box::new([0u8; PAGE_BYTES]);
    let remote = |s: &PageStore, seed| {
        s.store(k, &page_of(seed, true), Retention::Writethrough);
        let o = s.begin_remotify(1).pop().unwrap();
        assert!(s.finish_remotify(o.key, o.version, donors(&[3])));
        let mut out = Box::new([0u8; PAGE_BYTES]);
        match s.load(k, &mut out) {
            LoadOutcome::Remote(r) => r,
            other => panic!("expected Remote, got {other:?}"),
        }
    };
    let old = remote(&s, 1);
    let new = remote(&s, 2);
    s.take_released();
    assert!(
        !s.drop_unreachable(&old),
        "an older version dropped the new one"
    );
    assert!(matches!(s.load(k, &mut out), LoadOutcome::Remote(_)));
    assert!(s.drop_unreachable(&new));
    assert_eq!(s.load(k, &mut out), LoadOutcome::Miss);
    assert_eq!(s.take_released()[0].replicas, donors(&[3]));
    assert_eq!(s.stats().dropped_remote_pages, 1);
    s.audit();
}

#[test]
fn an_area_may_want_its_own_number_of_copies() {
    let s = PageStore::new(StoreConfig::with_capacity(64 << 20));
    let in_space = |space: u32, i: u64| PageKey {
        space,
        object: 0,
        index: i,
    };
    // Defaults: the cluster's for persistent pages, one for droppable ones.
    assert_eq!(s.copies_wanted(2).of(1, Retention::Persistent), 2);
    assert_eq!(s.copies_wanted(2).of(1, Retention::Writethrough), 1);
    s.set_space_replicas(1, Some(3));
    s.set_space_replicas(2, Some(1));
    assert_eq!(s.copies_wanted(2).of(1, Retention::Persistent), 3);
    assert_eq!(s.copies_wanted(2).of(1, Retention::Writethrough), 3);
    assert_eq!(s.space_replicas(2), Some(1));
    // Each page on two donors: short of copies only where three are wanted.
    for space in [1, 2, 3] {
        s.store(
            in_space(space, 0),
            &page_of(space as u64, true),
            Retention::Persistent,
        );
    }
    for o in s.begin_remotify(3) {
        assert!(s.finish_remotify(o.key, o.version, donors(&[4, 5])));
    }
    let (refs, degraded, _) = s.remote_on(&[], &[], 2, 10);
    assert_eq!(degraded, 1);
    assert_eq!(refs[0].key, in_space(1, 0));
    s.set_space_replicas(1, None);
    assert_eq!(s.remote_on(&[], &[], 2, 10).1, 0);
    s.audit();
}

#[test]
fn remotify_cannot_make_room_once_the_index_alone_fills_the_store() {
    let s = PageStore::new(StoreConfig::with_capacity(MIN_CAPACITY_BYTES));
    assert!(
        !s.remotify_can_make_room(),
        "an empty store has nothing to ship"
    );
    s.store(key(0), &page_of(0, true), Retention::Persistent);
    assert!(s.remotify_can_make_room());
    // Store, and ship every page that fits, until a store is refused with
    // every page remote: only the index is left to hold.
    let mut next = 1;
    loop {
        for o in s.begin_remotify(usize::MAX) {
            assert!(s.finish_remotify(o.key, o.version, donors(&[1, 2])));
        }
        if s.store(key(next), &page_of(next, true), Retention::Persistent) != StoreOutcome::Accepted
        {
            break;
        }
        next += 1;
        assert!(next < 1_000_000, "the index never filled the store");
    }
    for o in s.begin_remotify(usize::MAX) {
        assert!(s.finish_remotify(o.key, o.version, donors(&[1, 2])));
    }
    let st = s.stats();
    assert_eq!(st.compressed_pages, 0, "{st:?}");
    assert!(st.remote_pages > 1_000, "{st:?}");
    assert!(
        !s.remotify_can_make_room(),
        "nothing here to ship, and the index fills the store: {st:?}"
    );
    // Freeing pages gives room back, to new stores and to remotify alike.
    for i in 0..next {
        s.invalidate(key(i));
    }
    s.store(key(0), &page_of(0, true), Retention::Persistent);
    assert!(s.remotify_can_make_room());
}
