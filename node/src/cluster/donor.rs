//! The donor store: other nodes' compressed pages, kept in this node's spare
//! RAM. Sans-IO: plain synchronous state, no sockets, no runtime; the peer
//! transport feeds it decoded batches and sends back what it answers.
//!
//! A page here is named by (owner, owner incarnation, key, version):
//!
//! - **Incarnation.** An owner gets a new incarnation every time it starts. A
//!   request naming an older incarnation than the newest one seen is refused
//!   (`WrongIncarnation`); a put or release naming a newer incarnation drops
//!   everything the older one left here first, since a restarted owner has
//!   lost its index and can never ask for those pages again. A get (which
//!   changes nothing) is answered only for the current incarnation.
//! - **Version.** An owner bumps a page's version every time it rewrites it.
//!   The donor keeps at most one version per key: a put of a newer version
//!   replaces the older one; a put of an older version is refused
//!   (`StaleVersion`).
//! - **Release.** Releasing (key, v) removes every version ≤ v and leaves a
//!   *tombstone* remembering v, so that a put of a version ≤ v that was
//!   overtaken by its own release (different streams, a retry) is refused
//!   when it finally arrives instead of resurrecting the page.
//! - **Placement.** An owner may put the same version on a donor again
//!   after releasing it there (repair moves copies back and forth as donors
//!   come and go). To tell such a put from an overtaken one, every put
//!   carries the owner's *placement* number (it grows with every put the
//!   owner sends) and every release the owner's next placement number when
//!   it decided the release: a release covers the puts sent before it
//!   (placement below its own) and only those. A put of the released
//!   version sent after the release is taken; a release that arrives late
//!   does not remove a copy put after it was decided. Placement 0 in a
//!   release covers every put.
//!
//! - **Floor.** An owner audits its donors ([`DonorStore::audit`]) and tells
//!   each its *placement floor*: every put of its numbered below the floor
//!   has been answered or given up. From then on the donor refuses such a
//!   put if it still arrives (it could only resurrect a page the owner no
//!   longer lists), so a tombstone whose release covered only puts below
//!   the floor has nothing left to refuse and goes; so does the tombstone a
//!   release below the floor would have left.
//!
//! **Bounds.** A key has one slot: a page or a tombstone, never both, so
//! tombstones never outnumber the keys an owner has released and not put
//! again; with audits, no more than the releases decided since the owner's
//! last floor. Each tombstone is charged [`TOMBSTONE_BYTES`] to the owner's quota
//! and to the donation limit like a page, so they cannot grow past either. A
//! tombstone goes away when a newer version of its key is put, when an audit
//! raises the floor past it, when the owner
//! releases everything ([`DonorStore::release_owner`]), or when a newer
//! incarnation of the owner shows up. `release_owner` forgets the owner
//! entirely: the owner calls it only once it has no puts in flight to this
//! donor (its puts were all answered), since nothing is left to refuse them.
//!
//! **Accounting.** Every held byte is charged before it is held: a page costs
//! its data length plus [`ENTRY_OVERHEAD_BYTES`] (slot, key, hash table
//! share). `donated_bytes()` never exceeds the donation limit and no owner's
//! usage grows past its quota. Page data is copied out of the request frame
//! on the way in, so a kept page holds exactly its own bytes and not the
//! whole batch frame it arrived in.

use bytes::Bytes;
use hashbrown::{DefaultHashBuilder, HashMap};
use indexmap::IndexMap;
use ramster_protocol::PEER_BATCH_PAGES_MAX;

use crate::store::{PAGE_BYTES, PageKey};

/// Bytes charged per held page on top of its data: the slot in the owner's
/// table (key, version, checksum, `Bytes` header) and the table's slack.
pub const ENTRY_OVERHEAD_BYTES: u64 = 96;

/// Bytes charged per tombstone (a slot with a version and no data).
pub const TOMBSTONE_BYTES: u64 = 48;

/// Most owners one donor keeps pages for; a bound on the owner table. A
/// cluster larger than this is far past what one donor serves anyway.
pub const OWNERS_MAX: usize = 4096;

// A tombstone must never cost more than the page it replaces, so a release
// never needs room that the page it removes did not already hold.
const _: () = assert!(TOMBSTONE_BYTES <= ENTRY_OVERHEAD_BYTES);

/// The donor's limits.
#[derive(Clone, Debug)]
pub struct DonorConfig {
    /// Most bytes of peers' pages this node holds (`--donate`).
    pub donate_bytes: u64,
    /// Each owner's share unless [`DonorStore::set_owner_quota`] says
    /// otherwise.
    pub owner_quota_bytes_default: u64,
}

impl DonorConfig {
    /// A donor where any one owner may use the whole donation.
    pub fn with_donation(donate_bytes: u64) -> Self {
        DonorConfig {
            donate_bytes,
            owner_quota_bytes_default: donate_bytes,
        }
    }
}

/// A page as an owner hands it over and gets it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DonatedPage {
    pub key: PageKey,
    pub version: u64,
    /// xxh3-64 of the uncompressed page; the owner checks it on load.
    pub checksum: u64,
    /// LZ4 block when true, otherwise the raw page.
    pub compressed: bool,
    pub data: Bytes,
}

/// A page named by key and version (get, release).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct PageRef {
    pub key: PageKey,
    pub version: u64,
}

/// Per-item answer of a batch. A refusal is a value, not an error.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum PageStatus {
    Ok,
    NoCapacity,
    Quota,
    StaleVersion,
    NotFound,
    WrongIncarnation,
}

/// A copy an audit lists: what the donor holds for a key, and the placement
/// number of the latest put that brought it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct AuditedPage {
    pub key: PageKey,
    pub version: u64,
    pub placement: u64,
}

/// One step of an audit: a page of the listing and where it goes on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditStep {
    pub pages: Vec<AuditedPage>,
    /// Where the next step starts; `None` when the listing is complete.
    pub next: Option<u64>,
}

/// Slots an audit step looks at per page it may list: tombstones it keeps
/// take a look each too, so a step's work stays bounded.
const AUDIT_SCAN_PER_PAGE: usize = 4;

/// A request the donor cannot make sense of, as a whole.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DonorError {
    #[error("batch of {len} pages exceeds the limit of {max}")]
    BatchTooLarge { len: usize, max: usize },
    #[error("page {item} of the batch: {reason}")]
    InvalidPage { item: usize, reason: String },
    #[error("this donor holds nothing for owner {0:?}")]
    UnknownOwner(String),
}

#[derive(Debug)]
enum Slot {
    Page(Held),
    /// Every version below `version`, and `version` as put before
    /// `placement`, was released.
    Released {
        version: u64,
        placement: u64,
    },
}

#[derive(Debug)]
struct Held {
    version: u64,
    /// The owner's placement number of the put that brought it.
    placement: u64,
    checksum: u64,
    compressed: bool,
    data: Bytes,
}

/// Whether a release decided at `release` (the owner's next placement number
/// then; 0 for every put) covers a put numbered `put`.
fn covers(release: u64, put: u64) -> bool {
    release == 0 || put < release
}

/// Whether a release decided at `release` covers only puts below `floor`,
/// which the donor refuses anyway: its tombstone has nothing to refuse.
fn below_floor(release: u64, floor: u64) -> bool {
    release != 0 && release <= floor
}

impl Slot {
    fn cost(&self) -> u64 {
        match self {
            Slot::Page(h) => page_cost(h.data.len()),
            Slot::Released { .. } => TOMBSTONE_BYTES,
        }
    }
}

fn page_cost(data_len: usize) -> u64 {
    ENTRY_OVERHEAD_BYTES + data_len as u64
}

#[derive(Debug)]
struct Owner {
    incarnation: u64,
    /// The owner's placement floor: puts numbered below it are refused.
    floor: u64,
    used_bytes: u64,
    pages: u64,
    tombstones: u64,
    /// Insertion-ordered so that an audit can page through by position.
    slots: IndexMap<PageKey, Slot, DefaultHashBuilder>,
}

impl Owner {
    fn new(incarnation: u64) -> Self {
        Owner {
            incarnation,
            floor: 0,
            used_bytes: 0,
            pages: 0,
            tombstones: 0,
            slots: IndexMap::default(),
        }
    }
}

/// Counters of what a donor holds.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct DonorUsage {
    pub bytes: u64,
    pub pages: u64,
    pub tombstones: u64,
}

/// Peers' pages held in this node's spare RAM. See the module doc.
#[derive(Debug)]
pub struct DonorStore {
    config: DonorConfig,
    owners: HashMap<String, Owner>,
    quotas: HashMap<String, u64>,
    used_bytes: u64,
    /// What new puts may fill up to: the donation, or less while this node
    /// wants memory back (reclaim). Pages already held above it are never
    /// dropped; owners are asked to take them back.
    limit_bytes: u64,
}

/// Why a request was not admitted for its owner.
enum Refused {
    WrongIncarnation,
    Unknown,
    Full,
}

impl DonorStore {
    pub fn new(config: DonorConfig) -> Self {
        DonorStore {
            limit_bytes: config.donate_bytes,
            config,
            owners: HashMap::new(),
            quotas: HashMap::new(),
            used_bytes: 0,
        }
    }

    pub fn config(&self) -> &DonorConfig {
        &self.config
    }

    /// Bytes held for all owners, overheads included.
    pub fn donated_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// Bytes this donor would still take.
    pub fn spare_bytes(&self) -> u64 {
        self.limit_bytes.saturating_sub(self.used_bytes)
    }

    /// How full the donation is, in thousandths (1000 when nothing is
    /// donated at all: such a node takes no pages).
    pub fn load_permille(&self) -> u32 {
        if self.limit_bytes == 0 {
            return 1000;
        }
        (u128::from(self.used_bytes) * 1000 / u128::from(self.limit_bytes)).min(1000) as u32
    }

    /// What new puts may fill the donation up to now.
    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    /// Lowers (or raises, up to `--donate`) what new puts may fill; what
    /// is held above it is asked back from its owners ([`Self::reclaim_from`]).
    /// Returns the limit now in force.
    pub fn set_limit(&mut self, bytes: u64) -> u64 {
        self.limit_bytes = bytes.min(self.config.donate_bytes);
        self.limit_bytes
    }

    /// Bytes held above the limit: what this donor wants back.
    pub fn reclaim_bytes(&self) -> u64 {
        self.used_bytes.saturating_sub(self.limit_bytes)
    }

    /// `owner`'s share of [`Self::reclaim_bytes`], in proportion to what it
    /// holds here (at least a page's worth while it holds anything, so a
    /// small owner is not left out of a reclaim that needs everyone).
    pub fn reclaim_from(&self, owner: &str) -> u64 {
        let want = self.reclaim_bytes();
        let Some(o) = self.owners.get(owner).filter(|o| o.pages > 0) else {
            return 0;
        };
        if want == 0 || self.used_bytes == 0 {
            return 0;
        }
        let share =
            (u128::from(want) * u128::from(o.used_bytes) / u128::from(self.used_bytes)) as u64;
        share.max(PAGE_BYTES as u64).min(o.used_bytes)
    }

    /// What the donor holds, for one owner or (None) for all.
    pub fn usage(&self, owner: Option<&str>) -> DonorUsage {
        let of = |o: &Owner| DonorUsage {
            bytes: o.used_bytes,
            pages: o.pages,
            tombstones: o.tombstones,
        };
        match owner {
            Some(name) => self.owners.get(name).map(of).unwrap_or_default(),
            None => self
                .owners
                .values()
                .map(of)
                .fold(DonorUsage::default(), |a, b| DonorUsage {
                    bytes: a.bytes + b.bytes,
                    pages: a.pages + b.pages,
                    tombstones: a.tombstones + b.tombstones,
                }),
        }
    }

    /// The incarnation of `owner` this donor holds pages for.
    pub fn owner_incarnation(&self, owner: &str) -> Option<u64> {
        self.owners.get(owner).map(|o| o.incarnation)
    }

    /// `owner` runs `incarnation` now (a heartbeat of its says so): the
    /// pages of an older run can never be asked for again and are dropped,
    /// as that run's first request here would drop them. A restarted owner
    /// that never sends this donor a request (it has no pages to place
    /// here, say, because this donor is full) would otherwise leave them
    /// behind for good, counted against the donation. The pages dropped.
    pub fn owner_restarted(&mut self, owner: &str, incarnation: u64) -> u64 {
        match self.owners.get(owner) {
            Some(o) if incarnation > o.incarnation => {
                let dropped = o.pages;
                self.admit(owner, incarnation, false)
                    .unwrap_or_else(|_| unreachable!("a newer run is admitted"));
                dropped
            }
            _ => 0,
        }
    }

    /// The pages (not tombstones) held for `owner`.
    pub fn held_pages(&self, owner: &str) -> Vec<PageRef> {
        self.owners.get(owner).map_or_else(Vec::new, |o| {
            o.slots
                .iter()
                .filter_map(|(&key, slot)| match slot {
                    Slot::Page(h) => Some(PageRef {
                        key,
                        version: h.version,
                    }),
                    Slot::Released { .. } => None,
                })
                .collect()
        })
    }

    /// Sets one owner's quota. Lowering it below what the owner holds keeps
    /// the pages; the owner's puts are refused until it is back under.
    pub fn set_owner_quota(&mut self, owner: &str, quota_bytes: u64) {
        self.quotas.insert(owner.to_string(), quota_bytes);
    }

    fn quota_of(&self, owner: &str) -> u64 {
        self.quotas
            .get(owner)
            .copied()
            .unwrap_or(self.config.owner_quota_bytes_default)
    }

    /// Readies the owner's state for a request of `incarnation`: drops an
    /// older incarnation's pages, creates the owner when `create`.
    fn admit(&mut self, owner: &str, incarnation: u64, create: bool) -> Result<(), Refused> {
        let owners = self.owners.len();
        match self.owners.get_mut(owner) {
            None if !create => Err(Refused::Unknown),
            None if owners >= OWNERS_MAX => Err(Refused::Full),
            None => {
                self.owners
                    .insert(owner.to_string(), Owner::new(incarnation));
                Ok(())
            }
            Some(o) if incarnation < o.incarnation => Err(Refused::WrongIncarnation),
            Some(o) => {
                if incarnation > o.incarnation {
                    // The owner restarted: its older incarnation's pages can
                    // never be asked for again.
                    self.used_bytes -= o.used_bytes;
                    *o = Owner::new(incarnation);
                }
                Ok(())
            }
        }
    }

    /// Takes a batch of an owner's pages, put with the owner's placement
    /// number `placement`; `statuses[i]` answers `pages[i]`. Items are
    /// applied in order, so a later put of the same key wins.
    pub fn put(
        &mut self,
        owner: &str,
        incarnation: u64,
        placement: u64,
        pages: &[DonatedPage],
    ) -> Result<Vec<PageStatus>, DonorError> {
        check_batch(pages.len())?;
        for (item, p) in pages.iter().enumerate() {
            check_page(p).map_err(|reason| DonorError::InvalidPage { item, reason })?;
        }
        let quota = self.quota_of(owner);
        if let Err(r) = self.admit(owner, incarnation, true) {
            return Ok(vec![refusal_status(r); pages.len()]);
        }
        let donate = self.limit_bytes;
        let o = self.owners.get_mut(owner).expect("admitted");
        if placement < o.floor {
            // Answered or given up by the owner before its last audit: a
            // late arrival, no longer wanted.
            return Ok(vec![PageStatus::StaleVersion; pages.len()]);
        }
        let mut statuses = Vec::with_capacity(pages.len());
        for p in pages {
            let old_cost = match o.slots.get(&p.key) {
                Some(&Slot::Released {
                    version,
                    placement: released,
                }) if p.version < version
                    || (p.version == version && covers(released, placement)) =>
                {
                    statuses.push(PageStatus::StaleVersion);
                    continue;
                }
                Some(Slot::Page(h)) if p.version < h.version => {
                    statuses.push(PageStatus::StaleVersion);
                    continue;
                }
                Some(slot) => slot.cost(),
                None => 0,
            };
            let new_cost = page_cost(p.data.len());
            if new_cost > old_cost {
                let grow = new_cost - old_cost;
                if o.used_bytes + grow > quota {
                    statuses.push(PageStatus::Quota);
                    continue;
                }
                if self.used_bytes + grow > donate {
                    statuses.push(PageStatus::NoCapacity);
                    continue;
                }
            }
            // A late duplicate of the copy held (same version, an older
            // placement) must not lower its mark: a release decided between
            // the two puts would then drop the copy the owner now lists.
            let placement = match o.slots.get(&p.key) {
                Some(Slot::Page(h)) if h.version == p.version => h.placement.max(placement),
                _ => placement,
            };
            let held = Held {
                version: p.version,
                placement,
                checksum: p.checksum,
                compressed: p.compressed,
                // Detach from the request frame: a kept slice would pin the
                // whole batch in memory and make the accounting a lie.
                data: Bytes::copy_from_slice(&p.data),
            };
            match o.slots.insert(p.key, Slot::Page(held)) {
                Some(Slot::Page(_)) => {}
                Some(Slot::Released { .. }) => {
                    o.tombstones -= 1;
                    o.pages += 1;
                }
                None => o.pages += 1,
            }
            o.used_bytes = o.used_bytes - old_cost + new_cost;
            self.used_bytes = self.used_bytes - old_cost + new_cost;
            statuses.push(PageStatus::Ok);
        }
        debug_assert!(self.used_bytes <= self.config.donate_bytes);
        Ok(statuses)
    }

    /// Hands back pages; `answers[i]` answers `refs[i]`. A page is found only
    /// at exactly the version asked for: an owner never gets other bytes than
    /// the ones its index names.
    pub fn get(
        &self,
        owner: &str,
        incarnation: u64,
        refs: &[PageRef],
    ) -> Result<Vec<Result<DonatedPage, PageStatus>>, DonorError> {
        check_batch(refs.len())?;
        let Some(o) = self.owners.get(owner) else {
            return Err(DonorError::UnknownOwner(owner.to_string()));
        };
        if incarnation != o.incarnation {
            return Ok(vec![Err(PageStatus::WrongIncarnation); refs.len()]);
        }
        Ok(refs
            .iter()
            .map(|r| match o.slots.get(&r.key) {
                Some(Slot::Page(h)) if h.version == r.version => Ok(DonatedPage {
                    key: r.key,
                    version: h.version,
                    checksum: h.checksum,
                    compressed: h.compressed,
                    data: h.data.clone(),
                }),
                Some(Slot::Page(h)) if h.version > r.version => Err(PageStatus::StaleVersion),
                _ => Err(PageStatus::NotFound),
            })
            .collect())
    }

    /// Releases every version ≤ `refs[i].version` of each page put before
    /// `placement` (see the module doc) and leaves a tombstone so an
    /// overtaken put of such a version is refused later.
    pub fn release(
        &mut self,
        owner: &str,
        incarnation: u64,
        placement: u64,
        refs: &[PageRef],
    ) -> Result<Vec<PageStatus>, DonorError> {
        check_batch(refs.len())?;
        let quota = self.quota_of(owner);
        // A release may be the first this donor hears of an owner: it overtook
        // the owner's first put, and must still be remembered.
        if let Err(r) = self.admit(owner, incarnation, true) {
            return Ok(vec![refusal_status(r); refs.len()]);
        }
        let donate = self.config.donate_bytes;
        let o = self.owners.get_mut(owner).expect("admitted");
        // Every put this release covers is refused by the floor already: it
        // needs no tombstone to outlive them.
        let needs_tombstone = !below_floor(placement, o.floor);
        let mut statuses = Vec::with_capacity(refs.len());
        for r in refs {
            let tombstone = Slot::Released {
                version: r.version,
                placement,
            };
            match o.slots.get_mut(&r.key) {
                Some(Slot::Page(h))
                    if h.version > r.version
                        || (h.version == r.version && !covers(placement, h.placement)) =>
                {
                    // A newer version, or this one put again after the
                    // release was decided: not what was released; it stays.
                }
                Some(slot @ Slot::Page(_)) if needs_tombstone => {
                    let freed = slot.cost() - TOMBSTONE_BYTES;
                    *slot = tombstone;
                    o.pages -= 1;
                    o.tombstones += 1;
                    o.used_bytes -= freed;
                    self.used_bytes -= freed;
                }
                Some(Slot::Page(_)) => {
                    let freed = o.slots.swap_remove(&r.key).expect("held").cost();
                    o.pages -= 1;
                    o.used_bytes -= freed;
                    self.used_bytes -= freed;
                }
                Some(Slot::Released {
                    version,
                    placement: released,
                }) => {
                    // Remember the widest release: the newest version, and
                    // for it the latest placement (0 covers every put).
                    if r.version > *version {
                        (*version, *released) = (r.version, placement);
                    } else if r.version == *version && *released != 0 {
                        *released = if placement == 0 {
                            0
                        } else {
                            (*released).max(placement)
                        };
                    }
                }
                None if !needs_tombstone => {}
                None => {
                    if o.used_bytes + TOMBSTONE_BYTES > quota {
                        statuses.push(PageStatus::Quota);
                        continue;
                    }
                    if self.used_bytes + TOMBSTONE_BYTES > donate {
                        statuses.push(PageStatus::NoCapacity);
                        continue;
                    }
                    o.slots.insert(r.key, tombstone);
                    o.tombstones += 1;
                    o.used_bytes += TOMBSTONE_BYTES;
                    self.used_bytes += TOMBSTONE_BYTES;
                }
            }
            statuses.push(PageStatus::Ok);
        }
        Ok(statuses)
    }

    /// One step of an owner's audit: raises its placement floor to `floor`
    /// (see the module doc), lists up to `max` of the copies held for it
    /// from position `cursor` on, and drops the tombstones it passes that
    /// the floor made useless. The listing is by position in a table that
    /// changes between steps: a copy may be missed or listed twice, never
    /// invented. An owner this donor has not heard of yet is created, so
    /// that its floor holds against puts still on their way.
    pub fn audit(
        &mut self,
        owner: &str,
        incarnation: u64,
        floor: u64,
        cursor: u64,
        max: usize,
    ) -> Result<Result<AuditStep, PageStatus>, DonorError> {
        check_batch(max)?;
        if let Err(r) = self.admit(owner, incarnation, true) {
            return Ok(Err(refusal_status(r)));
        }
        let o = self.owners.get_mut(owner).expect("admitted");
        o.floor = o.floor.max(floor);
        let mut step = AuditStep::default();
        let scan_max = max.max(1) * AUDIT_SCAN_PER_PAGE;
        let mut i = usize::try_from(cursor).unwrap_or(usize::MAX);
        let mut looked = 0;
        // Past its bound, a step still at position 0 goes on only while it
        // drops tombstones (each shrinks the table): it ends having moved,
        // and position 0 never continues a listing.
        while i < o.slots.len() && step.pages.len() < max && (looked < scan_max || i == 0) {
            looked += 1;
            let (&key, slot) = o.slots.get_index(i).expect("in range");
            match *slot {
                Slot::Page(ref h) => {
                    step.pages.push(AuditedPage {
                        key,
                        version: h.version,
                        placement: h.placement,
                    });
                    i += 1;
                }
                Slot::Released { placement, .. } if below_floor(placement, o.floor) => {
                    // Swaps the last slot into `i`: looked at next.
                    o.slots.swap_remove_index(i);
                    o.tombstones -= 1;
                    o.used_bytes -= TOMBSTONE_BYTES;
                    self.used_bytes -= TOMBSTONE_BYTES;
                }
                Slot::Released { .. } => i += 1,
            }
        }
        step.next = (i < o.slots.len()).then_some(i as u64);
        Ok(Ok(step))
    }

    /// The release placements of the tombstones held for `owner`. For tests
    /// and the simulator's oracle.
    pub fn tombstone_placements(&self, owner: &str) -> Vec<u64> {
        self.owners.get(owner).map_or_else(Vec::new, |o| {
            o.slots
                .values()
                .filter_map(|slot| match slot {
                    Slot::Released { placement, .. } => Some(*placement),
                    Slot::Page(_) => None,
                })
                .collect()
        })
    }

    /// Drops everything held for the owner (pages and tombstones) and forgets
    /// it; the number of pages dropped. See the module doc for when an owner
    /// may call it.
    pub fn release_owner(&mut self, owner: &str, incarnation: u64) -> Result<u64, PageStatus> {
        match self.owners.get(owner) {
            None => Ok(0),
            Some(o) if incarnation < o.incarnation => Err(PageStatus::WrongIncarnation),
            Some(_) => {
                let o = self.owners.remove(owner).expect("present");
                self.used_bytes -= o.used_bytes;
                Ok(o.pages)
            }
        }
    }

    /// Recounts everything from the slots and panics on any mismatch with
    /// the running counters or any limit broken. For tests and debug checks.
    pub fn check_invariants(&self) {
        let mut total = 0;
        for (name, o) in &self.owners {
            let (mut bytes, mut pages, mut tombstones) = (0, 0, 0);
            for slot in o.slots.values() {
                bytes += slot.cost();
                match slot {
                    Slot::Page(h) => {
                        pages += 1;
                        assert!(check_data(h.compressed, h.data.len()).is_ok());
                    }
                    Slot::Released { .. } => tombstones += 1,
                }
            }
            assert_eq!(bytes, o.used_bytes, "owner {name}: bytes");
            assert_eq!(pages, o.pages, "owner {name}: pages");
            assert_eq!(tombstones, o.tombstones, "owner {name}: tombstones");
            total += bytes;
        }
        assert_eq!(total, self.used_bytes, "donated bytes");
        assert!(
            self.used_bytes <= self.config.donate_bytes,
            "over the donation"
        );
        assert!(self.owners.len() <= OWNERS_MAX);
    }
}

fn refusal_status(r: Refused) -> PageStatus {
    match r {
        Refused::WrongIncarnation => PageStatus::WrongIncarnation,
        Refused::Full => PageStatus::NoCapacity,
        Refused::Unknown => PageStatus::NotFound,
    }
}

fn check_batch(len: usize) -> Result<(), DonorError> {
    if len > PEER_BATCH_PAGES_MAX {
        return Err(DonorError::BatchTooLarge {
            len,
            max: PEER_BATCH_PAGES_MAX,
        });
    }
    Ok(())
}

fn check_page(p: &DonatedPage) -> Result<(), String> {
    check_data(p.compressed, p.data.len())
}

fn check_data(compressed: bool, len: usize) -> Result<(), String> {
    if compressed && !(1..=PAGE_BYTES).contains(&len) {
        return Err(format!(
            "compressed length {len} is outside 1..={PAGE_BYTES}"
        ));
    }
    if !compressed && len != PAGE_BYTES {
        return Err(format!(
            "uncompressed page of {len} bytes, expected {PAGE_BYTES}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
