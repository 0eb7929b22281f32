//! The donor store's contract, case by case and against a model.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

fn key(index: u64) -> PageKey {
    PageKey {
        space: 1,
        object: 7,
        index,
    }
}

fn page(index: u64, version: u64, len: usize) -> DonatedPage {
    let fill = (index as u8) ^ (version as u8).rotate_left(3);
    DonatedPage {
        key: key(index),
        version,
        checksum: index * 1_000 + version,
        compressed: len != PAGE_BYTES,
        data: Bytes::from(vec![fill; len]),
    }
}

fn at(index: u64, version: u64) -> PageRef {
    PageRef {
        key: key(index),
        version,
    }
}

#[test]
fn a_put_page_comes_back_byte_identical_at_its_version_only() {
    let mut d = DonorStore::new(DonorConfig::with_donation(1 << 20));
    let p = page(1, 3, 1500);
    assert_eq!(
        d.put("a", 1, 1, std::slice::from_ref(&p)).unwrap(),
        [PageStatus::Ok]
    );
    let got = d.get("a", 1, &[at(1, 3), at(1, 2), at(1, 4)]).unwrap();
    assert_eq!(got[0].as_ref().unwrap(), &p);
    assert_eq!(got[1], Err(PageStatus::StaleVersion));
    assert_eq!(got[2], Err(PageStatus::NotFound));
    assert_eq!(d.donated_bytes(), ENTRY_OVERHEAD_BYTES + 1500);
    d.check_invariants();
}

#[test]
fn a_release_that_overtakes_its_put_keeps_the_page_from_resurrecting() {
    let mut d = DonorStore::new(DonorConfig::with_donation(1 << 20));
    assert_eq!(d.release("a", 1, 0, &[at(5, 2)]).unwrap(), [PageStatus::Ok]);
    assert_eq!(
        d.put("a", 1, 1, &[page(5, 2, 100), page(5, 1, 100)])
            .unwrap(),
        [PageStatus::StaleVersion, PageStatus::StaleVersion]
    );
    assert_eq!(
        d.get("a", 1, &[at(5, 2)]).unwrap(),
        [Err(PageStatus::NotFound)]
    );
    // A newer version is a new page and replaces the tombstone.
    assert_eq!(
        d.put("a", 1, 1, &[page(5, 3, 100)]).unwrap(),
        [PageStatus::Ok]
    );
    assert_eq!(d.usage(Some("a")).tombstones, 0);
    assert_eq!(d.usage(Some("a")).pages, 1);
    d.check_invariants();
}

#[test]
fn placements_tell_a_put_again_after_a_release_from_one_it_overtook() {
    let mut d = DonorStore::new(DonorConfig::with_donation(1 << 20));
    let held = |d: &DonorStore| d.get("a", 1, &[at(5, 2)]).unwrap()[0].is_ok();
    // Put as placement 10; released by a release decided at 11 (it covers
    // puts 0..=10).
    assert_eq!(
        d.put("a", 1, 10, &[page(5, 2, 100)]).unwrap(),
        [PageStatus::Ok]
    );
    assert_eq!(
        d.release("a", 1, 11, &[at(5, 2)]).unwrap(),
        [PageStatus::Ok]
    );
    assert!(!held(&d));
    // A put of the same version sent before the release (placement 9,
    // overtaken) is refused; one sent after it (12: repair moving the copy
    // back) is taken.
    assert_eq!(
        d.put("a", 1, 9, &[page(5, 2, 100)]).unwrap(),
        [PageStatus::StaleVersion]
    );
    assert_eq!(
        d.put("a", 1, 12, &[page(5, 2, 100)]).unwrap(),
        [PageStatus::Ok]
    );
    assert!(held(&d));
    // A release decided before that put (an old one arriving late) does not
    // remove it; one decided after it does.
    assert_eq!(
        d.release("a", 1, 11, &[at(5, 2)]).unwrap(),
        [PageStatus::Ok]
    );
    assert!(held(&d), "a late release removed a copy put after it");
    assert_eq!(
        d.release("a", 1, 13, &[at(5, 2)]).unwrap(),
        [PageStatus::Ok]
    );
    assert!(!held(&d));
    // Repair puts the copy again (20) and then the put it replaced, sent
    // long before (placement 14), arrives late: the copy keeps mark 20, so
    // a release decided between the two (15) does not take it.
    for placement in [20, 14] {
        assert_eq!(
            d.put("a", 1, placement, &[page(5, 2, 100)]).unwrap(),
            [PageStatus::Ok]
        );
    }
    assert_eq!(
        d.release("a", 1, 15, &[at(5, 2)]).unwrap(),
        [PageStatus::Ok]
    );
    assert!(held(&d), "a late duplicate put lowered the copy's mark");
    // An older version is stale whatever its placement; placement 0 in a
    // release covers every put.
    assert_eq!(
        d.put("a", 1, 99, &[page(5, 1, 100)]).unwrap(),
        [PageStatus::StaleVersion]
    );
    assert_eq!(d.release("a", 1, 0, &[at(5, 2)]).unwrap(), [PageStatus::Ok]);
    assert_eq!(
        d.put("a", 1, 1_000, &[page(5, 2, 100)]).unwrap(),
        [PageStatus::StaleVersion]
    );
    assert_eq!(d.usage(Some("a")).tombstones, 1);
    d.check_invariants();
}

#[test]
fn a_release_removes_older_versions_and_spares_a_newer_one() {
    let mut d = DonorStore::new(DonorConfig::with_donation(1 << 20));
    d.put("a", 1, 1, &[page(1, 5, 200), page(2, 5, 200)])
        .unwrap();
    d.release("a", 1, 0, &[at(1, 4), at(2, 9)]).unwrap();
    let got = d.get("a", 1, &[at(1, 5), at(2, 5)]).unwrap();
    assert!(got[0].is_ok(), "version 5 is newer than the release of 4");
    assert_eq!(got[1], Err(PageStatus::NotFound));
    assert_eq!(
        d.donated_bytes(),
        ENTRY_OVERHEAD_BYTES + 200 + TOMBSTONE_BYTES
    );
    d.check_invariants();
}

#[test]
fn an_older_incarnation_is_refused_and_a_newer_one_drops_the_old_pages() {
    let mut d = DonorStore::new(DonorConfig::with_donation(1 << 20));
    d.put("a", 5, 1, &[page(1, 1, 300)]).unwrap();
    assert_eq!(
        d.put("a", 4, 1, &[page(2, 1, 300)]).unwrap(),
        [PageStatus::WrongIncarnation]
    );
    assert_eq!(
        d.get("a", 4, &[at(1, 1)]).unwrap(),
        [Err(PageStatus::WrongIncarnation)]
    );
    assert_eq!(
        d.put("a", 6, 1, &[page(2, 1, 300)]).unwrap(),
        [PageStatus::Ok]
    );
    assert_eq!(d.owner_incarnation("a"), Some(6));
    assert_eq!(d.usage(Some("a")).pages, 1);
    assert_eq!(
        d.get("a", 6, &[at(1, 1)]).unwrap(),
        [Err(PageStatus::NotFound)]
    );
    d.check_invariants();
}

#[test]
fn a_heartbeat_from_a_restarted_owner_drops_its_previous_runs_pages() {
    let mut d = DonorStore::new(DonorConfig::with_donation(1 << 20));
    d.put("a", 5, 1, &[page(1, 1, 300), page(2, 1, 300)])
        .unwrap();
    // The same run, or an older one, changes nothing.
    assert_eq!(d.owner_restarted("a", 5), 0);
    assert_eq!(d.owner_restarted("a", 4), 0);
    assert_eq!(d.owner_restarted("b", 9), 0);
    assert_eq!(d.usage(Some("a")).pages, 2);
    // The new run never sent a request here: its heartbeat is enough.
    assert_eq!(d.owner_restarted("a", 6), 2);
    assert_eq!(d.usage(Some("a")).pages, 0);
    assert_eq!(d.donated_bytes(), 0);
    // The old run's late requests are refused.
    assert_eq!(
        d.put("a", 5, 1, &[page(3, 1, 300)]).unwrap(),
        [PageStatus::WrongIncarnation]
    );
    d.check_invariants();
}

#[test]
fn the_donation_limit_and_the_owner_quota_are_never_exceeded() {
    let cost = ENTRY_OVERHEAD_BYTES + 1000;
    let mut d = DonorStore::new(DonorConfig::with_donation(3 * cost));
    d.set_owner_quota("a", 2 * cost);
    let st = d
        .put(
            "a",
            1,
            1,
            &[page(1, 1, 1000), page(2, 1, 1000), page(3, 1, 1000)],
        )
        .unwrap();
    assert_eq!(st, [PageStatus::Ok, PageStatus::Ok, PageStatus::Quota]);
    let st = d
        .put("b", 1, 1, &[page(1, 1, 1000), page(2, 1, 1000)])
        .unwrap();
    assert_eq!(st, [PageStatus::Ok, PageStatus::NoCapacity]);
    assert_eq!(d.donated_bytes(), 3 * cost);
    assert_eq!(d.spare_bytes(), 0);
    // Rewriting a page with a smaller one needs no new room.
    assert_eq!(
        d.put("b", 1, 1, &[page(1, 2, 10)]).unwrap(),
        [PageStatus::Ok]
    );
    d.check_invariants();
}

#[test]
fn a_lowered_limit_refuses_new_puts_keeps_what_is_held_and_asks_each_owner_its_share() {
    let mut d = DonorStore::new(DonorConfig::with_donation(1 << 20));
    let a: Vec<DonatedPage> = (0..30).map(|i| page(i, 1, 3000)).collect();
    let b: Vec<DonatedPage> = (100..110).map(|i| page(i, 1, 3000)).collect();
    assert!(
        d.put("a", 1, 1, &a)
            .unwrap()
            .iter()
            .all(|s| *s == PageStatus::Ok)
    );
    assert!(
        d.put("b", 1, 1, &b)
            .unwrap()
            .iter()
            .all(|s| *s == PageStatus::Ok)
    );
    let held = d.donated_bytes();
    assert_eq!(d.reclaim_bytes(), 0);
    assert_eq!(d.reclaim_from("a"), 0);

    // Lowered to half of what is held: nothing is dropped, nothing new
    // is taken, and the owners are asked for the excess by their share.
    assert_eq!(d.set_limit(held / 2), held / 2);
    assert_eq!(d.donated_bytes(), held);
    assert_eq!(d.spare_bytes(), 0);
    assert_eq!(d.load_permille(), 1000);
    assert_eq!(d.reclaim_bytes(), held - held / 2);
    assert_eq!(
        d.put("a", 1, 2, &[page(50, 1, 100)]).unwrap(),
        [PageStatus::NoCapacity]
    );
    let (ra, rb) = (d.reclaim_from("a"), d.reclaim_from("b"));
    assert!(
        ra > 2 * rb && rb > 0,
        "a holds three times b's bytes: {ra} {rb}"
    );
    assert!(ra + rb <= d.reclaim_bytes() + 2);
    assert_eq!(d.reclaim_from("nobody"), 0);
    // Every page still reads back.
    let got = d.get("a", 1, &[at(0, 1), at(29, 1)]).unwrap();
    assert!(got.iter().all(|g| g.is_ok()));

    // Releases bring it under the limit; no more is asked.
    let refs: Vec<PageRef> = (0..30).map(|i| at(i, 1)).collect();
    d.release("a", 1, 0, &refs).unwrap();
    assert_eq!(d.reclaim_bytes(), 0);
    assert_eq!(d.reclaim_from("b"), 0);
    // The limit never goes above the donation.
    assert_eq!(d.set_limit(u64::MAX), 1 << 20);
    d.check_invariants();
}

#[test]
fn release_owner_drops_pages_and_tombstones_and_forgets_the_owner() {
    let mut d = DonorStore::new(DonorConfig::with_donation(1 << 20));
    d.put("a", 1, 1, &[page(1, 1, 100), page(2, 1, 100)])
        .unwrap();
    d.release("a", 1, 0, &[at(3, 1)]).unwrap();
    assert_eq!(d.release_owner("a", 0), Err(PageStatus::WrongIncarnation));
    assert_eq!(d.release_owner("a", 1), Ok(2));
    assert_eq!(d.donated_bytes(), 0);
    assert_eq!(
        d.get("a", 1, &[at(1, 1)]),
        Err(DonorError::UnknownOwner("a".into()))
    );
    d.check_invariants();
}

#[test]
fn malformed_batches_are_refused_whole_before_anything_is_applied() {
    let mut d = DonorStore::new(DonorConfig::with_donation(1 << 20));
    let mut bad = page(2, 1, 100);
    bad.data = Bytes::new();
    let err = d.put("a", 1, 1, &[page(1, 1, 100), bad]).unwrap_err();
    assert!(
        matches!(err, DonorError::InvalidPage { item: 1, .. }),
        "{err}"
    );
    let mut raw = page(3, 1, PAGE_BYTES);
    raw.data = Bytes::from(vec![0u8; PAGE_BYTES - 1]);
    assert!(d.put("a", 1, 1, &[raw]).is_err());
    let mut big = page(4, 1, 100);
    big.data = Bytes::from(vec![0u8; PAGE_BYTES + 1]);
    assert!(d.put("a", 1, 1, &[big]).is_err());
    let many: Vec<_> = (0..=PEER_BATCH_PAGES_MAX as u64)
        .map(|i| page(i, 1, 10))
        .collect();
    assert!(matches!(
        d.put("a", 1, 1, &many),
        Err(DonorError::BatchTooLarge { .. })
    ));
    assert_eq!(d.donated_bytes(), 0);
    assert_eq!(d.owner_incarnation("a"), None);
}

#[test]
fn a_kept_page_does_not_pin_its_request_frame() {
    let mut d = DonorStore::new(DonorConfig::with_donation(1 << 20));
    let frame = Bytes::from(vec![1u8; 64 * 1024]);
    let mut p = page(1, 1, 100);
    p.data = frame.slice(0..100);
    d.put("a", 1, 1, &[p]).unwrap();
    let got = d.get("a", 1, &[at(1, 1)]).unwrap();
    let data = &got[0].as_ref().unwrap().data;
    let frame_range = frame.as_ptr() as usize..frame.as_ptr() as usize + frame.len();
    assert!(!frame_range.contains(&(data.as_ptr() as usize)));
}

// ---- model-based property test ----

#[derive(Clone, Debug)]
enum Op {
    Put {
        owner: u8,
        incarnation: u64,
        index: u64,
        version: u64,
        len: usize,
    },
    Get {
        owner: u8,
        incarnation: u64,
        index: u64,
        version: u64,
    },
    Release {
        owner: u8,
        incarnation: u64,
        index: u64,
        version: u64,
    },
    ReleaseOwner {
        owner: u8,
        incarnation: u64,
    },
    SetQuota {
        owner: u8,
        quota: u64,
    },
    /// A heartbeat names the owner's run.
    Heartbeat {
        owner: u8,
        incarnation: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let owner = 0u8..3;
    let inc = 1u64..4;
    let index = 0u64..6;
    let version = 0u64..5;
    let len = prop_oneof![1usize..600, Just(PAGE_BYTES)];
    prop_oneof![
        5 => (owner.clone(), inc.clone(), index.clone(), version.clone(), len).prop_map(
            |(owner, incarnation, index, version, len)| Op::Put { owner, incarnation, index, version, len }
        ),
        3 => (owner.clone(), inc.clone(), index.clone(), version.clone()).prop_map(
            |(owner, incarnation, index, version)| Op::Get { owner, incarnation, index, version }
        ),
        3 => (owner.clone(), inc.clone(), index.clone(), version.clone()).prop_map(
            |(owner, incarnation, index, version)| Op::Release { owner, incarnation, index, version }
        ),
        1 => (owner.clone(), inc.clone()).prop_map(|(owner, incarnation)| Op::ReleaseOwner { owner, incarnation }),
        1 => (owner.clone(), 0u64..6000).prop_map(|(owner, quota)| Op::SetQuota { owner, quota }),
        1 => (owner, inc).prop_map(|(owner, incarnation)| Op::Heartbeat { owner, incarnation }),
    ]
}

/// The contract stated as plainly as possible: per owner an incarnation and,
/// per key, either a page or the highest released version. Bytes are
/// recounted from scratch on every decision.
#[derive(Default)]
struct Model {
    owners: BTreeMap<u8, (u64, BTreeMap<u64, ModelSlot>)>,
    quotas: BTreeMap<u8, u64>,
}

#[derive(Clone)]
enum ModelSlot {
    Page(DonatedPage),
    Released(u64),
}

fn model_cost(s: &ModelSlot) -> u64 {
    match s {
        ModelSlot::Page(p) => ENTRY_OVERHEAD_BYTES + p.data.len() as u64,
        ModelSlot::Released(_) => TOMBSTONE_BYTES,
    }
}

impl Model {
    fn owner_bytes(&self, owner: u8) -> u64 {
        self.owners
            .get(&owner)
            .map(|(_, slots)| slots.values().map(model_cost).sum())
            .unwrap_or(0)
    }
    fn total_bytes(&self) -> u64 {
        self.owners.keys().map(|o| self.owner_bytes(*o)).sum()
    }
    /// None: wrong incarnation. Resets on a newer one; creates if missing.
    fn enter(&mut self, owner: u8, incarnation: u64) -> bool {
        let e = self
            .owners
            .entry(owner)
            .or_insert((incarnation, BTreeMap::new()));
        if incarnation < e.0 {
            return false;
        }
        if incarnation > e.0 {
            *e = (incarnation, BTreeMap::new());
        }
        true
    }
    /// Whether replacing `owner`'s slot for `index` by one costing `new`
    /// fits the quota and the donation.
    fn fits(&self, owner: u8, index: u64, new: u64, quota: u64, donate: u64) -> Option<PageStatus> {
        let old = self.owners[&owner]
            .1
            .get(&index)
            .map(model_cost)
            .unwrap_or(0);
        if new <= old {
            return None;
        }
        if self.owner_bytes(owner) - old + new > quota {
            return Some(PageStatus::Quota);
        }
        if self.total_bytes() - old + new > donate {
            return Some(PageStatus::NoCapacity);
        }
        None
    }
}

const DONATE: u64 = 4 * (PAGE_BYTES as u64) + 900;

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]
    #[test]
    fn the_donor_store_behaves_as_its_model(ops in proptest::collection::vec(op(), 1..120)) {
        let mut d = DonorStore::new(DonorConfig {
            donate_bytes: DONATE,
            owner_quota_bytes_default: DONATE * 2 / 3,
        });
        let mut m = Model::default();
        let name = |o: u8| format!("owner-{o}");
        for op in ops {
            match op {
                Op::Put { owner, incarnation, index, version, len } => {
                    let p = page(index, version, len);
                    let got = d.put(&name(owner), incarnation, 1, std::slice::from_ref(&p)).unwrap()[0];
                    let want = if !m.enter(owner, incarnation) {
                        PageStatus::WrongIncarnation
                    } else {
                        let quota = m.quotas.get(&owner).copied().unwrap_or(DONATE * 2 / 3);
                        let stale = match m.owners[&owner].1.get(&index) {
                            Some(ModelSlot::Released(v)) => version <= *v,
                            Some(ModelSlot::Page(q)) => version < q.version,
                            None => false,
                        };
                        let new = ENTRY_OVERHEAD_BYTES + len as u64;
                        if stale {
                            PageStatus::StaleVersion
                        } else if let Some(refusal) = m.fits(owner, index, new, quota, DONATE) {
                            refusal
                        } else {
                            m.owners.get_mut(&owner).unwrap().1.insert(index, ModelSlot::Page(p));
                            PageStatus::Ok
                        }
                    };
                    prop_assert_eq!(got, want);
                }
                Op::Get { owner, incarnation, index, version } => {
                    let got = d.get(&name(owner), incarnation, &[at(index, version)]);
                    match m.owners.get(&owner) {
                        None => prop_assert_eq!(got, Err(DonorError::UnknownOwner(name(owner)))),
                        Some((inc, _)) if *inc != incarnation => {
                            prop_assert_eq!(got.unwrap(), vec![Err(PageStatus::WrongIncarnation)])
                        }
                        Some((_, slots)) => {
                            let want = match slots.get(&index) {
                                Some(ModelSlot::Page(p)) if p.version == version => Ok(p.clone()),
                                Some(ModelSlot::Page(p)) if p.version > version => Err(PageStatus::StaleVersion),
                                _ => Err(PageStatus::NotFound),
                            };
                            prop_assert_eq!(got.unwrap(), vec![want]);
                        }
                    }
                }
                Op::Release { owner, incarnation, index, version } => {
                    let got = d.release(&name(owner), incarnation, 0, &[at(index, version)]).unwrap()[0];
                    let want = if !m.enter(owner, incarnation) {
                        PageStatus::WrongIncarnation
                    } else {
                        let quota = m.quotas.get(&owner).copied().unwrap_or(DONATE * 2 / 3);
                        match m.owners[&owner].1.get(&index).cloned() {
                            Some(ModelSlot::Page(p)) if p.version > version => PageStatus::Ok,
                            Some(ModelSlot::Released(v)) => {
                                m.owners.get_mut(&owner).unwrap().1.insert(index, ModelSlot::Released(v.max(version)));
                                PageStatus::Ok
                            }
                            slot => match m.fits(owner, index, TOMBSTONE_BYTES, quota, DONATE) {
                                Some(refusal) if slot.is_none() => refusal,
                                _ => {
                                    m.owners.get_mut(&owner).unwrap().1.insert(index, ModelSlot::Released(version));
                                    PageStatus::Ok
                                }
                            },
                        }
                    };
                    prop_assert_eq!(got, want);
                }
                Op::ReleaseOwner { owner, incarnation } => {
                    let got = d.release_owner(&name(owner), incarnation);
                    let want = match m.owners.get(&owner) {
                        None => Ok(0),
                        Some((inc, _)) if incarnation < *inc => Err(PageStatus::WrongIncarnation),
                        Some((_, slots)) => {
                            let pages = slots.values().filter(|s| matches!(s, ModelSlot::Page(_))).count() as u64;
                            m.owners.remove(&owner);
                            Ok(pages)
                        }
                    };
                    prop_assert_eq!(got, want);
                }
                Op::SetQuota { owner, quota } => {
                    d.set_owner_quota(&name(owner), quota);
                    m.quotas.insert(owner, quota);
                }
                Op::Heartbeat { owner, incarnation } => {
                    let got = d.owner_restarted(&name(owner), incarnation);
                    let want = match m.owners.get(&owner) {
                        Some((inc, slots)) if incarnation > *inc => {
                            let pages = slots.values().filter(|s| matches!(s, ModelSlot::Page(_))).count() as u64;
                            m.enter(owner, incarnation);
                            pages
                        }
                        _ => 0,
                    };
                    prop_assert_eq!(got, want);
                }
            }
            d.check_invariants();
            prop_assert_eq!(d.donated_bytes(), m.total_bytes());
            prop_assert!(d.donated_bytes() <= DONATE);
        }
    }
}

// ---- audits: the floor and the listing ----

/// Walks an owner's whole listing, `max` copies a step.
fn audit_all(d: &mut DonorStore, owner: &str, floor: u64, max: usize) -> Vec<AuditedPage> {
    let mut listed = Vec::new();
    let mut cursor = 0;
    for _ in 0..10_000 {
        let step = d.audit(owner, 1, floor, cursor, max).unwrap().unwrap();
        assert!(step.pages.len() <= max);
        listed.extend(step.pages);
        match step.next {
            Some(next) => cursor = next,
            None => return listed,
        }
    }
    panic!("the listing never ended");
}

#[test]
fn an_audit_lists_every_copy_held_once_and_drops_the_tombstones_below_the_floor() {
    let mut d = DonorStore::new(DonorConfig::with_donation(64 << 20));
    // 3,000 copies put at placements 1..=30, a third of them released at
    // placement 40 (after every put), a few more at placement 60.
    for batch in 0..30u64 {
        let pages: Vec<_> = (0..100).map(|i| page(batch * 100 + i, 1, 300)).collect();
        assert!(
            d.put("a", 1, batch + 1, &pages)
                .unwrap()
                .iter()
                .all(|s| *s == PageStatus::Ok)
        );
    }
    let released: Vec<_> = (0..3_000)
        .filter(|i| i % 3 == 0)
        .map(|i| at(i, 1))
        .collect();
    for chunk in released.chunks(500) {
        d.release("a", 1, 40, chunk).unwrap();
    }
    d.release("a", 1, 60, &[at(1, 1), at(2, 1)]).unwrap();
    assert_eq!(d.usage(Some("a")).tombstones, 1_002);
    let held: std::collections::HashSet<_> = d.held_pages("a").into_iter().collect();
    // A floor of 50: the releases at 40 refuse only puts below it, which
    // the floor refuses from now on; those at 60 stay.
    let listed = audit_all(&mut d, "a", 50, 64);
    let mut seen = std::collections::BTreeSet::new();
    for c in &listed {
        assert!(seen.insert(c.key), "{:?} listed twice", c.key);
        assert!(held.contains(&PageRef {
            key: c.key,
            version: c.version
        }));
        assert_eq!(c.placement, c.key.index / 100 + 1);
    }
    assert_eq!(seen.len(), held.len());
    assert_eq!(d.usage(Some("a")).tombstones, 2);
    assert_eq!(d.tombstone_placements("a"), [60, 60]);
    d.check_invariants();
}

#[test]
fn the_floor_refuses_late_puts_and_releases_below_it_leave_no_tombstone() {
    let mut d = DonorStore::new(DonorConfig::with_donation(1 << 20));
    d.put("a", 1, 1, &[page(1, 1, 100), page(2, 1, 100)])
        .unwrap();
    d.release("a", 1, 2, &[at(1, 1)]).unwrap();
    d.audit("a", 1, 5, 0, 16).unwrap().unwrap();
    assert_eq!(d.usage(Some("a")).tombstones, 0);
    // A put numbered below the floor lands late: refused, whatever it is.
    assert_eq!(
        d.put("a", 1, 4, &[page(1, 1, 100), page(3, 9, 100)])
            .unwrap(),
        [PageStatus::StaleVersion, PageStatus::StaleVersion]
    );
    // One numbered at or above it is taken, even of the released version.
    assert_eq!(
        d.put("a", 1, 5, &[page(1, 1, 100)]).unwrap(),
        [PageStatus::Ok]
    );
    // A release decided at or below the floor covers only refused puts:
    // it drops what it covers and leaves no tombstone.
    d.release("a", 1, 3, &[at(2, 1), at(7, 1)]).unwrap();
    assert_eq!(
        d.get("a", 1, &[at(2, 1)]).unwrap(),
        [Err(PageStatus::NotFound)]
    );
    assert_eq!(d.usage(Some("a")).tombstones, 0);
    // ...and never a copy put at or above the floor.
    d.release("a", 1, 4, &[at(1, 1)]).unwrap();
    assert!(d.get("a", 1, &[at(1, 1)]).unwrap()[0].is_ok());
    // A release above the floor still leaves its tombstone.
    d.release("a", 1, 6, &[at(1, 1)]).unwrap();
    assert_eq!(d.usage(Some("a")).tombstones, 1);
    // The floor never goes down.
    d.audit("a", 1, 2, 0, 16).unwrap().unwrap();
    assert_eq!(
        d.put("a", 1, 4, &[page(9, 1, 100)]).unwrap(),
        [PageStatus::StaleVersion]
    );
    d.check_invariants();
}

#[test]
fn an_audit_by_an_owner_not_seen_yet_sets_its_floor_and_old_runs_are_refused() {
    let mut d = DonorStore::new(DonorConfig::with_donation(1 << 20));
    let step = d.audit("b", 2, 10, 0, 16).unwrap().unwrap();
    assert_eq!(step, AuditStep::default());
    assert_eq!(
        d.put("b", 2, 9, &[page(1, 1, 100)]).unwrap(),
        [PageStatus::StaleVersion]
    );
    assert_eq!(
        d.audit("b", 1, 10, 0, 16).unwrap(),
        Err(PageStatus::WrongIncarnation)
    );
    // A newer run starts with no floor.
    assert_eq!(
        d.put("b", 3, 1, &[page(1, 1, 100)]).unwrap(),
        [PageStatus::Ok]
    );
    assert_eq!(
        d.audit("b", 3, 0, 0, PEER_BATCH_PAGES_MAX + 1),
        Err(DonorError::BatchTooLarge {
            len: PEER_BATCH_PAGES_MAX + 1,
            max: PEER_BATCH_PAGES_MAX
        })
    );
    d.check_invariants();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    /// However the table changes between the steps of a walk (puts,
    /// releases, tombstones dropped by the floor), an audit step lists
    /// only copies held then, at the version held: an owner never
    /// releases a copy on the word of a stale listing.
    #[test]
    fn a_walk_lists_nothing_that_is_not_held(
        ops in proptest::collection::vec((0u64..200, 0u8..3), 1..300),
        max in 1usize..40,
    ) {
        let mut d = DonorStore::new(DonorConfig::with_donation(64 << 20));
        let mut cursor = 0;
        let mut placement = 10;
        for (index, what) in ops {
            match what {
                0 => {
                    d.put("a", 1, placement, &[page(index, 1, 64)]).unwrap();
                    placement += 1;
                }
                1 => {
                    d.release("a", 1, placement, &[at(index, 1)]).unwrap();
                }
                _ => {
                    let step = d.audit("a", 1, placement.saturating_sub(5), cursor, max).unwrap().unwrap();
                    for c in &step.pages {
                        let got = d.get("a", 1, &[PageRef { key: c.key, version: c.version }]).unwrap();
                        prop_assert!(got[0].is_ok());
                    }
                    cursor = step.next.unwrap_or(0);
                }
            }
            d.check_invariants();
        }
    }
}
