//! The page store: the zcache part of a node. Sans-IO: synchronous, no
//! sockets, no runtime; every front end and the cluster tasks sit on top.
//!
//! A page is kept one of two ways. A page made of one 8-byte word repeated
//! (zero pages above all) is kept as that word. Any other page is LZ4
//! compressed and its bytes go into the size-class [`arena`]; a page that
//! compresses badly is refused ([`compress::AdmissionPolicy`]). Every page
//! carries the xxh3 checksum of its bytes, checked on every load: the store
//! answers a hit, a miss, or a corruption, never wrong bytes.
//!
//! The index is sharded by key hash; each shard has its own lock and its own
//! recency lists, and the arena locks per size class, so there is no global
//! lock on the store or load path. Every byte the store holds (slabs, index)
//! is charged to a [`Budget`] before it is allocated: `used_bytes` never
//! exceeds the capacity, and a store that does not fit is refused with
//! `NoCapacity` after evicting what may be evicted.

pub mod arena;
pub mod compress;
mod index;

use hashbrown::HashMap;
use parking_lot::{Mutex, MutexGuard, RwLock};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use xxhash_rust::xxh3::xxh3_64;

pub use ramster_protocol::PAGE_BYTES;

use arena::{Arena, Handle};
use compress::{AdmissionPolicy, COMPRESS_BOUND_BYTES};
use index::{Body, Entry, Shard, hash_key};

/// One page of memory.
pub type Page = [u8; PAGE_BYTES];

/// Default number of index shards: enough that two threads rarely meet.
pub const SHARDS_DEFAULT: usize = 64;
/// [`PageStore::coldest`] first takes this many fair shares of every shard.
const COLDEST_FAIR_SHARES: usize = 4;
/// ...and at least this many.
const COLDEST_TAKE_MIN: usize = 8;

/// How many droppable pages one store may evict to make room for itself.
const EVICT_PER_STORE_MAX: usize = 64;

/// The least capacity a running store may be given: room for its index
/// and a few slabs, so it can still take pages brought home.
pub const MIN_CAPACITY_BYTES: u64 = 1 << 20;

/// Why a new capacity was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CapacityError {
    #[error("{asked} bytes is more than the {at_start} the store started with (--capacity)")]
    AboveStart { asked: u64, at_start: u64 },
    #[error("{asked} bytes is less than the least a store may have ({MIN_CAPACITY_BYTES})")]
    BelowMinimum { asked: u64 },
}

/// A page's name in the store. Front ends map their keys onto it: frontswap
/// `(area, offset)` and cleancache `(pool, object, index)` live in disjoint
/// `space`s.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageKey {
    pub space: u32,
    pub object: u64,
    pub index: u64,
}

/// How strongly the store must keep a page. Droppable pages are evicted,
/// coldest first, to make room: ephemeral ones before writethrough ones.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Retention {
    /// Cleancache: may be dropped at any time.
    Ephemeral = 0,
    /// A writethrough frontswap area: the client has its own copy.
    Writethrough = 1,
    /// Frontswap: an accepted page must come back.
    Persistent = 2,
}

impl Retention {
    pub const COUNT: usize = 3;

    /// The node may drop such a page (the client keeps its own copy, or
    /// the page is a cache): evicted under pressure here, and on donors a
    /// copy that is lost or wanted back is dropped rather than repaired.
    pub fn droppable(self) -> bool {
        self != Retention::Persistent
    }
}

/// Why a store was refused.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    NoCapacity,
    Incompressible,
}

/// The answer to a store. Either way no older copy of the key survives: a
/// refused duplicate store drops the old page, so a load never sees it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum StoreOutcome {
    Accepted,
    Rejected(RejectReason),
}

/// The answer to a load.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LoadOutcome {
    Hit,
    Miss,
    /// The stored bytes failed their checksum; the output is not the page.
    Corrupt,
    /// The page is held by donors: fetch it from one of them, check it
    /// against the checksum, and (if there is room) bring it home with
    /// [`PageStore::install_fetched`].
    Remote(RemoteRef),
}

/// A cold page, as handed to the remotify task.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ColdPage {
    pub key: PageKey,
    pub stamp: u64,
}

/// Most donors holding copies of one page.
pub const REPLICAS_MAX: usize = 3;

/// A donor's node id, as page descriptors record it (cluster node ids are
/// assigned below 2^32 so a descriptor stays within the index entry).
pub type DonorId = u32;

/// The donors holding a page's compressed bytes. Empty only for a page
/// whose every copy was lost ([`Replicas::NONE`]): a load of it answers
/// `unavailable`, never wrong bytes.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Replicas {
    ids: [DonorId; REPLICAS_MAX],
    count: u8,
}

impl Replicas {
    /// No copy left anywhere.
    pub const NONE: Replicas = Replicas {
        ids: [0; REPLICAS_MAX],
        count: 0,
    };

    /// The set without `donor`.
    pub fn without(&self, donor: DonorId) -> Replicas {
        let mut out = Replicas::NONE;
        for &d in self.as_slice().iter().filter(|&&d| d != donor) {
            out.ids[out.count as usize] = d;
            out.count += 1;
        }
        out
    }

    /// `None` if there are no donors or more than [`REPLICAS_MAX`].
    pub fn new(donors: &[DonorId]) -> Option<Replicas> {
        if donors.is_empty() || donors.len() > REPLICAS_MAX {
            return None;
        }
        let mut ids = [0; REPLICAS_MAX];
        ids[..donors.len()].copy_from_slice(donors);
        Some(Replicas {
            ids,
            count: donors.len() as u8,
        })
    }

    pub fn as_slice(&self) -> &[DonorId] {
        &self.ids[..self.count as usize]
    }
}

/// A page's compressed bytes on their way to donors (remotify).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outbound {
    pub key: PageKey,
    pub version: u64,
    /// xxh3-64 of the uncompressed page: donors store it, loads check it.
    pub checksum: u64,
    /// Shared, not copied, by the puts to each donor.
    pub compressed: bytes::Bytes,
    /// Writethrough pages travel with fewer copies: the client has one.
    pub retention: Retention,
}

/// Where a page held on donors is, as a load finds it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RemoteRef {
    pub key: PageKey,
    pub version: u64,
    pub checksum: u64,
    pub len: u16,
    pub replicas: Replicas,
    /// A droppable page is dropped, and a load answers a miss, when no
    /// copy can be reached; a persistent one is repaired or `unavailable`.
    pub retention: Retention,
}

/// Donor copies wanted per page, as the areas asked when they were
/// created ([`PageStore::copies_wanted`]).
#[derive(Clone, Debug)]
pub struct CopiesWanted {
    by_space: HashMap<u32, u8>,
    default: usize,
}

impl CopiesWanted {
    /// For a page of `space` and `retention`: what its area asked for,
    /// else the default for a persistent page and one for a droppable one
    /// (the client keeps its own copy).
    pub fn of(&self, space: u32, retention: Retention) -> usize {
        match self.by_space.get(&space) {
            Some(&n) => n as usize,
            None if retention.droppable() => 1,
            None => self.default,
        }
    }
}

/// Copies on donors that are no longer wanted (the page was overwritten,
/// invalidated, or brought home): the cluster tells the donors to drop them.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Released {
    pub key: PageKey,
    pub version: u64,
    pub replicas: Replicas,
    /// The owner's next placement number when the release was decided: it
    /// covers only copies put before (0: not stamped yet; the cluster layer
    /// stamps the store's releases when it takes them).
    pub placement: u64,
}

/// Store configuration.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Hard limit on the bytes the store holds (slabs + index).
    pub capacity_bytes: u64,
    /// Index shards (rounded up to a power of two).
    pub shards: usize,
}

impl StoreConfig {
    pub fn with_capacity(capacity_bytes: u64) -> Self {
        StoreConfig {
            capacity_bytes,
            shards: SHARDS_DEFAULT,
        }
    }
}

/// The bytes a store may hold, and holds. Charged before allocating.
///
/// The capacity may be lowered while the store runs (an operator handing
/// memory back to the host): what is held above it stays, since every
/// accepted page must come back, and new charges fail until enough is freed
/// or moved off (remotify).
#[derive(Debug)]
pub struct Budget {
    capacity: AtomicU64,
    used: AtomicU64,
}

impl Budget {
    pub fn new(capacity: u64) -> Self {
        Budget {
            capacity: AtomicU64::new(capacity),
            used: AtomicU64::new(0),
        }
    }

    /// Charges `bytes` if they fit under the capacity.
    pub fn try_charge(&self, bytes: u64) -> bool {
        let capacity = self.capacity();
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&n| n <= capacity)
            })
            .is_ok()
    }

    pub fn set_capacity(&self, bytes: u64) {
        self.capacity.store(bytes, Ordering::Relaxed);
    }

    /// Replaces a charge of `charged` bytes by the `actual` (smaller or equal) bytes.
    pub fn adjust(&self, charged: u64, actual: u64) {
        debug_assert!(actual <= charged, "allocated more than was charged");
        self.release(charged - actual);
    }

    pub fn release(&self, bytes: u64) {
        let prev = self.used.fetch_sub(bytes, Ordering::Relaxed);
        debug_assert!(prev >= bytes, "released more than charged");
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }

    /// used / capacity: 0.0 ..= 1.0, and above 1.0 for a while after the
    /// capacity was lowered below what is held.
    pub fn fill(&self) -> f64 {
        let capacity = self.capacity();
        if capacity == 0 {
            return 1.0;
        }
        self.used() as f64 / capacity as f64
    }
}

/// What the store holds, byte by byte.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    pub capacity_bytes: u64,
    /// Everything charged: slabs + index. Above `capacity_bytes` only after
    /// the capacity was lowered, until what is held moves off or is freed.
    pub used_bytes: u64,
    pub pages: u64,
    pub same_filled_pages: u64,
    pub compressed_pages: u64,
    /// Compressed bytes of the compressed pages.
    pub payload_bytes: u64,
    /// Bytes of the slots holding them (payload + slack).
    pub slot_bytes: u64,
    /// Bytes of all slabs (slots in use + free slots).
    pub slab_bytes: u64,
    /// Bytes of the index (entries, hash tables, per-space counts).
    pub index_bytes: u64,
    /// Droppable pages evicted to make room.
    pub evicted_pages: u64,
    /// Pages whose bytes are held by donors, and those bytes (compressed).
    pub remote_pages: u64,
    pub remote_bytes: u64,
    /// Remote pages with no copy left anywhere (all their donors came back
    /// empty): loads of them answer `unavailable` until they are written
    /// again or invalidated.
    pub lost_pages: u64,
    /// Droppable pages held on donors that were dropped rather than
    /// fetched, repaired or moved: a copy died or could not be reached, or
    /// its donor wanted the memory back. Their loads answered a miss.
    pub dropped_remote_pages: u64,
}

impl StoreStats {
    /// Wasted in slots: rounding up to the size class.
    pub fn slack_bytes(&self) -> u64 {
        self.slot_bytes - self.payload_bytes
    }
    /// Free slots inside slabs, as a share of all slab bytes.
    pub fn fragmentation(&self) -> f64 {
        if self.slab_bytes == 0 {
            return 0.0;
        }
        (self.slab_bytes - self.slot_bytes) as f64 / self.slab_bytes as f64
    }
    /// Uncompressed bytes of every stored page over the bytes they take,
    /// here (slabs + index) and on donors; 0 when empty.
    pub fn compression_ratio(&self) -> f64 {
        let spent = self.used_bytes + self.remote_bytes;
        if self.pages == 0 || spent == 0 {
            return 0.0;
        }
        (self.pages * PAGE_BYTES as u64) as f64 / spent as f64
    }
    /// Memory per stored page, all overheads included.
    pub fn bytes_per_page(&self) -> f64 {
        if self.pages == 0 {
            return 0.0;
        }
        (self.slab_bytes + self.index_bytes) as f64 / self.pages as f64
    }
}

/// Per-thread scratch: one per thread, not one per page.
struct Scratch {
    /// Compressed bytes: compressor output, or a copy read out of the arena.
    bytes: Box<[u8; COMPRESS_BOUND_BYTES]>,
    table: compress::CompressTable,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        bytes: Box::new([0u8; COMPRESS_BOUND_BYTES]),
        table: compress::CompressTable::default(),
    });
}

/// The compressed page store.
pub struct PageStore {
    shards: Box<[Mutex<Shard>]>,
    shard_shift: u32,
    arena: Arena,
    budget: Budget,
    /// The capacity the store was started with: the most it may be given
    /// later (the node sized it against the host's memory).
    capacity_at_start: u64,
    policy: AdmissionPolicy,
    /// Logical clock for recency stamps.
    clock: AtomicU64,
    same_filled_pages: AtomicU64,
    payload_bytes: AtomicU64,
    evicted_pages: AtomicU64,
    remote_pages: AtomicU64,
    remote_bytes: AtomicU64,
    lost_pages: AtomicU64,
    dropped_remote_pages: AtomicU64,
    /// Droppable pages held on donors now: when there are none, repair has
    /// nothing to drop and need not walk the index for them.
    droppable_remote_pages: AtomicU64,
    /// Donor copies wanted of the pages of a space, where its area asked
    /// for a number of its own.
    space_replicas: RwLock<HashMap<u32, u8>>,
    /// Donor copies to drop, collected for the cluster's release task.
    released: Mutex<Vec<Released>>,
    /// Shard where the next eviction starts, so evictions spread out.
    evict_cursor: AtomicU64,
    /// Stores and loads so far: how background work tells that clients
    /// are using the node.
    accesses: AtomicU64,
}

impl PageStore {
    pub fn new(config: StoreConfig) -> Self {
        let shards = config.shards.max(1).next_power_of_two();
        PageStore {
            shards: (0..shards).map(|_| Mutex::new(Shard::new())).collect(),
            shard_shift: 64 - shards.trailing_zeros(),
            arena: Arena::new(),
            budget: Budget::new(config.capacity_bytes),
            capacity_at_start: config.capacity_bytes,
            policy: AdmissionPolicy::default(),
            clock: AtomicU64::new(1),
            same_filled_pages: AtomicU64::new(0),
            payload_bytes: AtomicU64::new(0),
            evicted_pages: AtomicU64::new(0),
            remote_pages: AtomicU64::new(0),
            remote_bytes: AtomicU64::new(0),
            lost_pages: AtomicU64::new(0),
            dropped_remote_pages: AtomicU64::new(0),
            droppable_remote_pages: AtomicU64::new(0),
            space_replicas: RwLock::new(HashMap::new()),
            released: Mutex::new(Vec::new()),
            evict_cursor: AtomicU64::new(0),
            accesses: AtomicU64::new(0),
        }
    }

    fn shard_of(&self, hash: u64) -> usize {
        if self.shards.len() == 1 {
            0
        } else {
            // The table uses the low bits and the top 7; take the shard from
            // the bits just below the top ones.
            ((hash << 7) >> self.shard_shift) as usize
        }
    }

    fn lock(&self, hash: u64) -> MutexGuard<'_, Shard> {
        self.shards[self.shard_of(hash)].lock()
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Stores a page. On refusal any older copy of `key` is dropped.
    pub fn store(&self, key: PageKey, page: &Page, retention: Retention) -> StoreOutcome {
        self.accesses.fetch_add(1, Ordering::Relaxed);
        let hash = hash_key(&key);
        let checksum = xxh3_64(page);
        let body = if let Some(word) = compress::same_filled_word(page) {
            Body::SameFilled { word }
        } else {
            let placed = SCRATCH.with(|s| {
                let s = &mut *s.borrow_mut();
                let len = compress::compress(page, &mut s.bytes[..], &mut s.table);
                if !self.policy.admit(len, self.budget.fill()) {
                    return Err(RejectReason::Incompressible);
                }
                self.alloc_or_evict(&s.bytes[..len], retention)
                    .map(|h| (h, len))
                    .ok_or(RejectReason::NoCapacity)
            });
            match placed {
                Ok((handle, len)) => Body::Compressed {
                    handle: handle.to_bits(),
                    len: len as u16,
                },
                Err(reason) => {
                    self.invalidate(key);
                    return StoreOutcome::Rejected(reason);
                }
            }
        };
        let mut entry = Entry {
            key,
            checksum,
            body,
            stamp: 0,
            version: 0,
            retention,
            prev: index::NIL,
            next: index::NIL,
            vacant: false,
            remotifying: false,
        };
        let mut evicted = 0;
        let displaced = loop {
            let mut shard = self.lock(hash);
            entry.stamp = self.tick();
            entry.version = entry.stamp;
            if let Some(i) = shard.find(&key, hash) {
                let old = *shard.entry(i);
                shard.replace(i, entry);
                break Some(old);
            }
            if shard.insert(hash, entry, &self.budget).is_some() {
                break None;
            }
            drop(shard);
            // The index could not grow: make room, or give back what was placed.
            if evicted >= EVICT_PER_STORE_MAX || !self.evict_one(retention, None) {
                self.release_body(body);
                return StoreOutcome::Rejected(RejectReason::NoCapacity);
            }
            evicted += 1;
        };
        self.count_body(body, retention, 1);
        if let Some(old) = displaced {
            self.release(&old);
        }
        StoreOutcome::Accepted
    }

    /// Allocates arena space, evicting droppable pages that `retention` may
    /// displace when the budget is exhausted.
    fn alloc_or_evict(&self, bytes: &[u8], retention: Retention) -> Option<Handle> {
        let mut evicted = 0;
        loop {
            if let Some(h) = self.arena.alloc_write(bytes, &self.budget) {
                return Some(h);
            }
            let class = arena::class_of(bytes.len());
            if evicted >= EVICT_PER_STORE_MAX || !self.evict_one(retention, Some(class)) {
                return None;
            }
            evicted += 1;
        }
    }

    /// Evicts a cold droppable page a store of `retention` may displace:
    /// ephemeral pages first, then writethrough ones. Looks at one shard's
    /// list tail per call, rotating over shards; among the few coldest there,
    /// prefers a page of size class `class`, whose slot the caller can reuse
    /// at once (freeing a slot of another class only helps once a whole slab
    /// empties).
    fn evict_one(&self, retention: Retention, class: Option<usize>) -> bool {
        const CANDIDATES: usize = 8;
        let start = self.evict_cursor.fetch_add(1, Ordering::Relaxed) as usize;
        for list in [Retention::Ephemeral, Retention::Writethrough] {
            if list > retention {
                break;
            }
            debug_assert!(list.droppable());
            for k in 0..self.shards.len() {
                let shard_no = (start + k) % self.shards.len();
                let mut shard = self.shards[shard_no].lock();
                let mut tail = shard.coldest(list as usize, CANDIDATES);
                let Some(coldest) = tail.next() else {
                    continue;
                };
                let same_class = class.and_then(|c| {
                    std::iter::once(coldest).chain(tail).find(|&i| {
                        matches!(shard.entry(i).body, Body::Compressed { len, .. } if arena::class_of(len as usize) == c)
                    })
                });
                let victim = same_class.unwrap_or(coldest);
                let hash = hash_key(&shard.entry(victim).key);
                let e = shard.remove(victim, hash);
                drop(shard);
                self.release(&e);
                self.evicted_pages.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
        false
    }

    fn count_body(&self, body: Body, retention: Retention, sign: i64) {
        match body {
            Body::SameFilled { .. } => {
                add_signed(&self.same_filled_pages, sign);
            }
            Body::Compressed { len, .. } => {
                add_signed(&self.payload_bytes, sign * len as i64);
            }
            Body::Remote { len, replicas } => {
                add_signed(&self.remote_pages, sign);
                add_signed(&self.remote_bytes, sign * len as i64);
                if replicas.as_slice().is_empty() {
                    add_signed(&self.lost_pages, sign);
                }
                if retention.droppable() {
                    add_signed(&self.droppable_remote_pages, sign);
                }
            }
        }
    }

    fn release_body(&self, body: Body) {
        if let Body::Compressed { handle, .. } = body {
            self.arena.free(Handle::from_bits(handle), &self.budget);
        }
    }

    /// Frees what a removed entry held; copies on donors are queued for
    /// the cluster to drop.
    fn release(&self, e: &Entry) {
        let held = match e.body {
            Body::Remote { replicas, .. } => replicas,
            _ => Replicas::NONE,
        };
        self.release_to(e, held);
    }

    /// [`release`](Self::release), with the copies to drop on `held` only
    /// (a donor struck off holds none).
    fn release_to(&self, e: &Entry, held: Replicas) {
        self.count_body(e.body, e.retention, -1);
        self.release_body(e.body);
        if !held.as_slice().is_empty() {
            self.released.lock().push(Released {
                key: e.key,
                version: e.version,
                replicas: held,
                placement: 0,
            });
        }
    }

    /// Loads a page into `out`, checking its checksum.
    pub fn load(&self, key: PageKey, out: &mut Page) -> LoadOutcome {
        self.load_inner(key, out, false)
    }

    /// Loads a page and removes it (a cleancache get from a private pool).
    pub fn take(&self, key: PageKey, out: &mut Page) -> LoadOutcome {
        self.load_inner(key, out, true)
    }

    fn load_inner(&self, key: PageKey, out: &mut Page, remove: bool) -> LoadOutcome {
        self.accesses.fetch_add(1, Ordering::Relaxed);
        let hash = hash_key(&key);
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let mut shard = self.lock(hash);
            let Some(i) = shard.find(&key, hash) else {
                return LoadOutcome::Miss;
            };
            let e = *shard.entry(i);
            if let Some(remote) = e.remote_ref() {
                // The bytes are on donors; a private get cannot hand over what
                // is not here, so the entry stays until it is fetched.
                let stamp = self.tick();
                shard.touch(i, stamp);
                return LoadOutcome::Remote(remote);
            }
            // Copy the compressed bytes out under the lock (a short memcpy),
            // decompress after releasing it.
            if let Body::Compressed { handle, len } = e.body {
                self.arena
                    .read(Handle::from_bits(handle), len as usize, &mut s.bytes[..]);
            }
            if remove {
                shard.remove(i, hash);
            } else {
                let stamp = self.tick();
                shard.touch(i, stamp);
            }
            drop(shard);
            if remove {
                self.release(&e);
            }
            let decoded = match e.body {
                Body::SameFilled { word } => {
                    compress::fill_page(word, out);
                    true
                }
                Body::Compressed { len, .. } => compress::decompress(&s.bytes[..len as usize], out),
                Body::Remote { .. } => unreachable!("answered above"),
            };
            if decoded && xxh3_64(out) == e.checksum {
                LoadOutcome::Hit
            } else {
                LoadOutcome::Corrupt
            }
        })
    }

    /// Whether the key is present (no checksum work, no recency change).
    pub fn contains(&self, key: PageKey) -> bool {
        let hash = hash_key(&key);
        self.lock(hash).find(&key, hash).is_some()
    }

    /// Whether the index names `donor` as holding `key` at `version`: the
    /// copy an audit found there is wanted.
    pub fn lists_copy(&self, key: PageKey, version: u64, donor: DonorId) -> bool {
        let hash = hash_key(&key);
        let shard = self.lock(hash);
        shard.find(&key, hash).is_some_and(|i| {
            let e = shard.entry(i);
            matches!(e.body, Body::Remote { replicas, .. }
                if e.version == version && replicas.as_slice().contains(&donor))
        })
    }

    /// Drops one page; `true` if it was there.
    pub fn invalidate(&self, key: PageKey) -> bool {
        let hash = hash_key(&key);
        let mut shard = self.lock(hash);
        let Some(i) = shard.find(&key, hash) else {
            return false;
        };
        let e = shard.remove(i, hash);
        drop(shard);
        self.release(&e);
        true
    }

    /// Drops every page of `space` (and, if given, of one object in it).
    /// Walks every shard: for area and pool teardown, not the page path.
    pub fn invalidate_matching(&self, space: u32, object: Option<u64>) -> u64 {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            if shard.space_pages(space) == 0 {
                continue;
            }
            let doomed: Vec<u32> = shard
                .live_from(0)
                .filter(|&i| {
                    let k = shard.entry(i).key;
                    k.space == space && object.is_none_or(|o| k.object == o)
                })
                .collect();
            let mut removed = Vec::with_capacity(doomed.len());
            for i in doomed {
                let hash = hash_key(&shard.entry(i).key);
                removed.push(shard.remove(i, hash));
            }
            drop(shard);
            for e in &removed {
                self.release(e);
            }
            dropped += removed.len() as u64;
        }
        dropped
    }

    /// Hands back and removes up to `max` pages of `space`, calling `give`
    /// with each key and its bytes (frontswap_shrink). A page whose checksum
    /// fails is handed as `Err` and removed too: it can never be loaded.
    pub fn drain_space(
        &self,
        space: u32,
        max: usize,
        mut give: impl FnMut(PageKey, Result<&Page, ()>),
    ) -> usize {
        let mut handed = 0;
        let mut page = Box::new([0u8; PAGE_BYTES]);
        for shard_no in 0..self.shards.len() {
            // Entries never move, so a position cursor makes one pass per shard.
            let mut pos = 0;
            while handed < max {
                let key = {
                    let shard = self.shards[shard_no].lock();
                    if shard.space_pages(space) == 0 {
                        break;
                    }
                    let found = shard
                        .live_from(pos)
                        .find(|&i| shard.entry(i).key.space == space);
                    match found {
                        Some(i) => {
                            pos = i as usize + 1;
                            shard.entry(i).key
                        }
                        None => break,
                    }
                };
                match self.take(key, &mut page) {
                    LoadOutcome::Hit => give(key, Ok(&page)),
                    LoadOutcome::Corrupt => give(key, Err(())),
                    // Raced with an invalidation: nothing to hand back; or
                    // held on donors: suction brings it home first.
                    LoadOutcome::Miss | LoadOutcome::Remote(_) => continue,
                }
                handed += 1;
            }
        }
        handed
    }

    /// The donor copies each page of `space` should have, in place of the
    /// cluster's default (`None` puts the default back).
    pub fn set_space_replicas(&self, space: u32, replicas: Option<usize>) {
        debug_assert!(replicas.is_none_or(|n| (1..=REPLICAS_MAX).contains(&n)));
        let mut map = self.space_replicas.write();
        match replicas {
            Some(n) => map.insert(space, n as u8),
            None => map.remove(&space),
        };
    }

    /// The donor copies `space` asked for, if it asked.
    pub fn space_replicas(&self, space: u32) -> Option<usize> {
        self.space_replicas.read().get(&space).map(|&n| n as usize)
    }

    /// How many donor copies each page wants, as the areas ask now, with
    /// `default` (the cluster's `--replicas`) where they do not: read once
    /// per batch, not once per page.
    pub fn copies_wanted(&self, default: usize) -> CopiesWanted {
        CopiesWanted {
            by_space: self.space_replicas.read().clone(),
            default,
        }
    }

    /// Pages currently held for `space`.
    pub fn space_pages(&self, space: u32) -> u64 {
        self.shards
            .iter()
            .map(|s| s.lock().space_pages(space))
            .sum()
    }

    /// Up to `max` of the coldest compressed pages of a retention class,
    /// coldest first. Looks at `max` list tails per shard, never the whole
    /// index.
    pub fn coldest(&self, retention: Retention, max: usize) -> Vec<ColdPage> {
        // Keys hash evenly over the shards, so the `max` coldest pages are
        // spread over them too: a few times a fair share from each is
        // nearly always enough. Walking `max` entries of every shard and
        // sorting them all made this a tenth of remotify's time.
        let fair = max.div_ceil(self.shards.len());
        let take = (fair * COLDEST_FAIR_SHARES).max(COLDEST_TAKE_MIN);
        if take < max {
            let (cold, enough) = self.coldest_taking(retention, max, take);
            if enough {
                return cold;
            }
        }
        self.coldest_taking(retention, max, max).0
    }

    /// The `max` coldest pages by stamp, from at most `take` of each shard's
    /// coldest, and whether that was enough: `false` when a shard held more
    /// that might have been colder than the warmest one chosen. (A shard's
    /// list is nearly, not strictly, in stamp order: a page whose remotify
    /// failed goes back to its cold end.)
    fn coldest_taking(
        &self,
        retention: Retention,
        max: usize,
        take: usize,
    ) -> (Vec<ColdPage>, bool) {
        let mut all = Vec::with_capacity(self.shards.len() * take.min(max));
        // The warmest page taken from each shard that had more than `take`.
        let mut cut_short = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock();
            let before = all.len();
            all.extend(shard.coldest(retention as usize, take + 1).map(|i| {
                let e = shard.entry(i);
                ColdPage {
                    key: e.key,
                    stamp: e.stamp,
                }
            }));
            if all.len() - before > take {
                all.pop();
                cut_short.push(all[all.len() - 1].stamp);
            }
        }
        all.sort_unstable_by_key(|c| c.stamp);
        all.truncate(max);
        // Exact unless a shard we stopped short in might hold a page colder
        // than the warmest one chosen (or there are too few chosen).
        let enough = match all.last() {
            Some(last) if all.len() == max => cut_short.iter().all(|&s| s >= last.stamp),
            _ => cut_short.is_empty(),
        };
        (all, enough)
    }

    /// Remotify, step one: takes up to `max` of the coldest persistent and
    /// writethrough pages held here and hands out copies of their
    /// compressed bytes, each under a new version. They stay here, loadable,
    /// until [`finish_remotify`](Self::finish_remotify) says donors hold
    /// them; meanwhile they are not handed out again. Ephemeral (cleancache)
    /// pages stay home: they are evicted, not shipped.
    pub fn begin_remotify(&self, max: usize) -> Vec<Outbound> {
        let mut cold = self.coldest(Retention::Persistent, max);
        cold.extend(self.coldest(Retention::Writethrough, max));
        cold.sort_unstable_by_key(|c| c.stamp);
        cold.truncate(max);
        let mut out = Vec::new();
        for cold in cold {
            let hash = hash_key(&cold.key);
            let mut shard = self.lock(hash);
            let Some(i) = shard.find(&cold.key, hash) else {
                continue;
            };
            let e = *shard.entry(i);
            let Body::Compressed { handle, len } = e.body else {
                continue;
            };
            if e.remotifying {
                continue;
            }
            let mut compressed = vec![0u8; len as usize];
            self.arena
                .read(Handle::from_bits(handle), len as usize, &mut compressed);
            // Every shipment names its copies by a version of its own. An
            // earlier shipment of these bytes (aborted, or brought home
            // since) may still have releases on their way to the same
            // donors: under the old version they would drop the new copies
            // when they land after them, or the donors' tombstones would
            // refuse the new copies for good.
            let version = self.tick();
            shard.relink(i, |e| {
                e.remotifying = true;
                e.version = version;
            });
            out.push(Outbound {
                key: e.key,
                version,
                checksum: e.checksum,
                compressed: compressed.into(),
                retention: e.retention,
            });
        }
        out
    }

    /// Remotify, step two: every replica acked. Frees the local copy and
    /// keeps the descriptor. `false` if the page changed meanwhile (stored
    /// again or invalidated): the donors' copies are stale and the caller
    /// drops them.
    pub fn finish_remotify(&self, key: PageKey, version: u64, replicas: Replicas) -> bool {
        let hash = hash_key(&key);
        let mut shard = self.lock(hash);
        let Some(i) = shard.find(&key, hash) else {
            return false;
        };
        let e = *shard.entry(i);
        let Body::Compressed { len, .. } = e.body else {
            return false;
        };
        if e.version != version || !e.remotifying {
            return false;
        }
        let remote = Body::Remote { replicas, len };
        shard.relink(i, |e| {
            e.body = remote;
            e.remotifying = false;
        });
        drop(shard);
        self.count_body(e.body, e.retention, -1);
        self.release_body(e.body);
        self.count_body(remote, e.retention, 1);
        true
    }

    /// Remotify failed (no donor, a timeout): the page stays here and may
    /// be picked again later.
    pub fn abort_remotify(&self, key: PageKey, version: u64) {
        let hash = hash_key(&key);
        let mut shard = self.lock(hash);
        if let Some(i) = shard.find(&key, hash) {
            let e = *shard.entry(i);
            if e.version == version && e.remotifying {
                // Back where it was taken from: among the coldest.
                shard.relink_cold(i, |e| e.remotifying = false);
            }
        }
    }

    /// Up to `max` of the most recently used pages held on donors, hottest
    /// first: suction brings these home first.
    pub fn hottest_remote(&self, max: usize) -> Vec<RemoteRef> {
        let mut all: Vec<(u64, RemoteRef)> = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock();
            // A page with no copy left has nothing to bring home.
            all.extend(
                shard
                    .hottest(index::REMOTE_LIST, usize::MAX)
                    .filter_map(|i| {
                        let e = shard.entry(i);
                        e.remote_ref()
                            .filter(|r| !r.replicas.as_slice().is_empty())
                            .map(|r| (e.stamp, r))
                    })
                    .take(max),
            );
        }
        all.sort_unstable_by_key(|(stamp, _)| std::cmp::Reverse(*stamp));
        all.into_iter().take(max).map(|(_, r)| r).collect()
    }

    /// Up to `max` pages of `space` held on donors (shrink brings them home).
    /// Walks the shards that hold pages of the space.
    pub fn remote_of_space(&self, space: u32, max: usize) -> Vec<RemoteRef> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            if out.len() >= max {
                break;
            }
            let shard = shard.lock();
            if shard.space_pages(space) == 0 {
                continue;
            }
            for i in shard.live_from(0) {
                let e = shard.entry(i);
                if let (true, Some(remote)) = (e.key.space == space, e.remote_ref()) {
                    out.push(remote);
                    if out.len() >= max {
                        break;
                    }
                }
            }
        }
        out
    }

    /// Repair's work list: up to `max` persistent pages held on donors that
    /// are degraded (a copy on one of the `gone` donors, or fewer donors
    /// listed than [`copies_wanted`](Self::copies_wanted) with `want` as
    /// the default) and have a copy to re-create the missing ones from:
    /// on a donor not gone, or on a gone one that is still `readable` (a
    /// draining donor: leaving, but serving until it is empty). Also
    /// returns how many pages are degraded in all and how many have no copy
    /// left to read (unrecoverable).
    pub fn remote_on(
        &self,
        gone: &[DonorId],
        readable: &[DonorId],
        want: usize,
        max: usize,
    ) -> (Vec<RemoteRef>, u64, u64) {
        let (mut out, mut degraded, mut unrecoverable) = (Vec::new(), 0, 0);
        let wanted = self.copies_wanted(want);
        for shard in self.shards.iter() {
            let shard = shard.lock();
            for i in shard.hottest(index::REMOTE_LIST, usize::MAX) {
                let Some(remote) = shard.entry(i).remote_ref() else {
                    continue;
                };
                // A droppable page is never repaired: its lost copies drop
                // it ([`drop_droppable_on`](Self::drop_droppable_on)).
                if remote.retention.droppable() {
                    continue;
                }
                let held = remote.replicas.as_slice();
                let want = wanted.of(remote.key.space, remote.retention);
                if held.len() >= want && !held.iter().any(|d| gone.contains(d)) {
                    continue;
                }
                degraded += 1;
                if held
                    .iter()
                    .all(|d| gone.contains(d) && !readable.contains(d))
                {
                    unrecoverable += 1;
                } else if out.len() < max {
                    out.push(remote);
                }
            }
        }
        (out, degraded, unrecoverable)
    }

    /// Repair moved a page's copies: donors now hold it on `replicas`.
    /// `false` if the page changed meanwhile (the new copies are stale) or
    /// its set did (a donor was struck off it since `remote` was read: the
    /// set repair built on is out of date).
    pub fn set_replicas(&self, remote: &RemoteRef, replicas: Replicas) -> bool {
        let hash = hash_key(&remote.key);
        let mut shard = self.lock(hash);
        let Some(i) = shard.find(&remote.key, hash) else {
            return false;
        };
        let e = *shard.entry(i);
        match e.body {
            Body::Remote { replicas: now, len }
                if e.version == remote.version && now == remote.replicas =>
            {
                shard.update(i, |e| e.body = Body::Remote { replicas, len });
                true
            }
            _ => false,
        }
    }

    /// A donor came back empty (a new incarnation): strikes it off every
    /// page's set. Returns the pages struck and, of those, the ones left
    /// with no copy at all (each had its only copy there).
    pub fn strike_donor(&self, donor: DonorId) -> (u64, u64) {
        let (mut struck, mut orphaned) = (0, 0);
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            let listed: Vec<u32> = shard
                .hottest(index::REMOTE_LIST, usize::MAX)
                .filter(|&i| {
                    matches!(shard.entry(i).body,
                        Body::Remote { replicas, .. } if replicas.as_slice().contains(&donor))
                })
                .collect();
            for i in listed {
                struck += 1;
                let e = *shard.entry(i);
                let Body::Remote { replicas, len } = e.body else {
                    continue;
                };
                let left = replicas.without(donor);
                if e.retention.droppable() {
                    // Not worth repairing: dropped, the survivors released.
                    shard.remove(i, hash_key(&e.key));
                    self.forgotten(&e, left);
                    continue;
                }
                orphaned += u64::from(left.as_slice().is_empty());
                shard.update(i, |e| {
                    e.body = Body::Remote {
                        replicas: left,
                        len,
                    }
                });
            }
        }
        self.lost_pages.fetch_add(orphaned, Ordering::Relaxed);
        (struck, orphaned)
    }

    /// A droppable page removed while its copies live on `still_held`:
    /// those are released, and the page counts as dropped.
    fn forgotten(&self, e: &Entry, still_held: Replicas) {
        debug_assert!(matches!(e.body, Body::Remote { .. }));
        self.release_to(e, still_held);
        self.dropped_remote_pages.fetch_add(1, Ordering::Relaxed);
    }

    /// A load reached no good copy of a droppable page: the page is dropped
    /// (its copies released) and the load answers a miss; the client's own
    /// copy serves. `false` if the page changed meanwhile.
    pub fn drop_unreachable(&self, remote: &RemoteRef) -> bool {
        debug_assert!(remote.retention.droppable());
        let hash = hash_key(&remote.key);
        let mut shard = self.lock(hash);
        let Some(i) = shard.find(&remote.key, hash) else {
            return false;
        };
        let e = *shard.entry(i);
        match e.body {
            Body::Remote { replicas, .. } if e.version == remote.version => {
                shard.remove(i, hash);
                drop(shard);
                self.forgotten(&e, replicas);
                true
            }
            _ => false,
        }
    }

    /// Drops droppable pages with a copy on any of `donors` (down, or
    /// wanting their memory back), coldest first, until about `max_bytes`
    /// of copies there are gone; their copies are released. Returns the
    /// pages dropped and their bytes on those donors.
    pub fn drop_droppable_on(&self, donors: &[DonorId], max_bytes: u64) -> (u64, u64) {
        let (mut pages, mut bytes) = (0, 0);
        if self.droppable_remote_pages.load(Ordering::Relaxed) == 0 {
            return (pages, bytes);
        }
        for shard in self.shards.iter() {
            if bytes >= max_bytes {
                break;
            }
            let mut shard = shard.lock();
            let mut doomed = Vec::new();
            for i in shard.coldest(index::REMOTE_LIST, usize::MAX) {
                if bytes >= max_bytes {
                    break;
                }
                let e = shard.entry(i);
                if let (true, Body::Remote { replicas, len }) = (e.retention.droppable(), e.body) {
                    let on = replicas
                        .as_slice()
                        .iter()
                        .filter(|d| donors.contains(d))
                        .count() as u64;
                    if on > 0 {
                        doomed.push(i);
                        pages += 1;
                        bytes += on * u64::from(len);
                    }
                }
            }
            for i in doomed {
                let hash = hash_key(&shard.entry(i).key);
                let e = shard.remove(i, hash);
                let Body::Remote { replicas, .. } = e.body else {
                    unreachable!("picked remote pages")
                };
                self.forgotten(&e, replicas);
            }
        }
        (pages, bytes)
    }

    /// Brings a page fetched from a donor home (suction, or a remote load
    /// with room to spare). The caller has checked the bytes against the
    /// checksum. Returns the donors' copies to drop, or `None` if the page
    /// changed meanwhile or there is no room (it then stays remote).
    pub fn install_fetched(&self, remote: &RemoteRef, compressed: &[u8]) -> Option<Released> {
        if compressed.len() != remote.len as usize
            || compressed.is_empty()
            || compressed.len() > arena::SLOT_BYTES_MAX
        {
            return None;
        }
        let handle = self.alloc_or_evict(compressed, remote.retention)?;
        let hash = hash_key(&remote.key);
        let mut shard = self.lock(hash);
        let current = shard.find(&remote.key, hash).map(|i| (i, *shard.entry(i)));
        // The copies to release are the entry's, not the caller's snapshot:
        // repair may have moved a copy (same version) while the page was
        // being fetched, and a copy the index no longer lists is never
        // released by anything else.
        let Some((i, e, replicas)) = current.and_then(|(i, e)| match e.body {
            Body::Remote { replicas, .. } if e.version == remote.version => Some((i, e, replicas)),
            _ => None,
        }) else {
            drop(shard);
            self.arena.free(handle, &self.budget);
            return None;
        };
        let home = Body::Compressed {
            handle: handle.to_bits(),
            len: remote.len,
        };
        let stamp = self.tick();
        shard.relink(i, |e| {
            e.body = home;
            e.stamp = stamp;
        });
        drop(shard);
        self.count_body(e.body, e.retention, -1);
        self.count_body(home, e.retention, 1);
        Some(Released {
            key: remote.key,
            version: remote.version,
            replicas,
            placement: 0,
        })
    }

    /// Takes the queue of donor copies to drop.
    pub fn take_released(&self) -> Vec<Released> {
        std::mem::take(&mut *self.released.lock())
    }

    pub fn stats(&self) -> StoreStats {
        let (pages, index_bytes) = self.shards.iter().fold((0u64, 0u64), |(p, b), s| {
            let s = s.lock();
            (p + s.len() as u64, b + s.index_bytes())
        });
        let arena = self.arena.totals();
        StoreStats {
            capacity_bytes: self.budget.capacity(),
            used_bytes: self.budget.used(),
            pages,
            same_filled_pages: self.same_filled_pages.load(Ordering::Relaxed),
            compressed_pages: arena.slots,
            payload_bytes: self.payload_bytes.load(Ordering::Relaxed),
            slot_bytes: arena.slot_bytes,
            slab_bytes: arena.slab_bytes,
            index_bytes,
            evicted_pages: self.evicted_pages.load(Ordering::Relaxed),
            remote_pages: self.remote_pages.load(Ordering::Relaxed),
            remote_bytes: self.remote_bytes.load(Ordering::Relaxed),
            lost_pages: self.lost_pages.load(Ordering::Relaxed),
            dropped_remote_pages: self.dropped_remote_pages.load(Ordering::Relaxed),
        }
    }

    /// Stores and loads made so far (a page brought home or shipped by
    /// the cluster is neither).
    pub fn accesses(&self) -> u64 {
        self.accesses.load(Ordering::Relaxed)
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.budget.capacity()
    }

    /// The capacity the store was started with, the most it can be given.
    pub fn capacity_at_start(&self) -> u64 {
        self.capacity_at_start
    }

    /// Gives the store a new capacity, at most the one it started with.
    /// Lowered below what is held, nothing is dropped: new stores are
    /// refused until pages are freed or (in a cluster) remotified.
    pub fn set_capacity(&self, bytes: u64) -> Result<(), CapacityError> {
        if bytes > self.capacity_at_start {
            return Err(CapacityError::AboveStart {
                asked: bytes,
                at_start: self.capacity_at_start,
            });
        }
        if bytes < MIN_CAPACITY_BYTES {
            return Err(CapacityError::BelowMinimum { asked: bytes });
        }
        self.budget.set_capacity(bytes);
        Ok(())
    }

    /// Whether remotify could make room for one more page: shipping a page
    /// frees its slab slot, but its index entry stays, so when the index
    /// alone (with a page's worth of slack) fills the capacity, or no page
    /// is held compressed here, every page leaving still leaves the store
    /// full. A store that waited for room then would only wait. Reads
    /// counters only: the index is what the budget holds beyond the slabs.
    pub fn remotify_can_make_room(&self) -> bool {
        let arena = self.arena.totals();
        let index_bytes = self.budget.used().saturating_sub(arena.slab_bytes);
        arena.slots > 0 && index_bytes + PAGE_BYTES as u64 <= self.budget.capacity()
    }

    /// [`StoreStats::lost_pages`], without walking the shards.
    pub fn lost_pages(&self) -> u64 {
        self.lost_pages.load(Ordering::Relaxed)
    }

    /// Bytes charged against the capacity: what [`stats`](Self::stats)
    /// reports as `used_bytes`, without walking the shards.
    pub fn used_bytes(&self) -> u64 {
        self.budget.used()
    }

    /// What the index says of a page, without loading it: its checksum and,
    /// when donors hold it, where. For checks that look at every page after
    /// every step of a simulation, where decompressing would cost too much.
    #[cfg(test)]
    pub(crate) fn peek(&self, key: PageKey) -> Option<(u64, Option<RemoteRef>)> {
        let hash = hash_key(&key);
        let shard = self.lock(hash);
        let e = shard.entry(shard.find(&key, hash)?);
        Some((e.checksum, e.remote_ref()))
    }

    /// Checks every invariant by walking the whole store; for tests.
    #[cfg(test)]
    pub fn audit(&self) {
        for s in self.shards.iter() {
            s.lock().audit();
        }
        let totals = self.arena.totals();
        assert_eq!(totals, self.arena.audit());
        let st = self.stats();
        assert_eq!(
            st.pages,
            st.same_filled_pages + st.compressed_pages + st.remote_pages
        );
        assert!(st.used_bytes <= self.capacity_at_start);
        let index_charged: u64 = self.shards.iter().map(|s| s.lock().charged_bytes()).sum();
        assert_eq!(st.used_bytes, st.slab_bytes + index_charged);
        let droppable_remote: u64 = self
            .shards
            .iter()
            .map(|s| {
                let s = s.lock();
                s.hottest(index::REMOTE_LIST, usize::MAX)
                    .filter(|&i| s.entry(i).retention.droppable())
                    .count() as u64
            })
            .sum();
        assert_eq!(
            self.droppable_remote_pages.load(Ordering::Relaxed),
            droppable_remote
        );
    }
}

fn add_signed(counter: &AtomicU64, delta: i64) {
    if delta >= 0 {
        counter.fetch_add(delta as u64, Ordering::Relaxed);
    } else {
        counter.fetch_sub((-delta) as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
