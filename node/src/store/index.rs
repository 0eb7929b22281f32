//! One shard of the page index: a hash table of entry numbers into a slab of
//! entries, and intrusive recency lists threaded through the entries (one per
//! retention class for pages held here, one for pages held on donors), so
//! the coldest pages are found at the list tails without scanning.
//!
//! Every byte the shard allocates is charged to the store's [`Budget`] before
//! it is allocated, like the arena's slabs.

use hashbrown::{HashMap, HashTable};

use super::{Budget, PageKey, RemoteRef, Replicas, Retention};

pub(super) const NIL: u32 = u32::MAX;

/// What an entry holds.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Body {
    /// A page made of one 8-byte word repeated.
    SameFilled { word: u64 },
    /// LZ4-compressed bytes in the arena.
    Compressed { handle: u64, len: u16 },
    /// LZ4-compressed bytes held by donors; only the descriptor is here.
    Remote { replicas: Replicas, len: u16 },
}

/// Recency list of pages held on donors (after the retention classes).
pub(super) const REMOTE_LIST: usize = Retention::COUNT;
const LISTS: usize = Retention::COUNT + 1;

#[derive(Copy, Clone, Debug)]
pub(super) struct Entry {
    pub key: PageKey,
    /// xxh3-64 of the uncompressed page.
    pub checksum: u64,
    pub body: Body,
    /// Logical time of the last store or load: smaller is colder.
    pub stamp: u64,
    /// Logical time of the store that wrote these bytes: names this version
    /// of the page on donors, so a late answer about an older version is
    /// recognised as stale.
    pub version: u64,
    pub retention: Retention,
    /// Recency list links or, for a vacant entry, `next` is the free list.
    pub prev: u32,
    pub next: u32,
    pub vacant: bool,
    /// Its bytes are on their way to donors; off the lists meanwhile so it is
    /// not picked twice.
    pub remotifying: bool,
}

impl Entry {
    /// Where the page is, if donors hold it.
    pub fn remote_ref(&self) -> Option<RemoteRef> {
        match self.body {
            Body::Remote { replicas, len } => Some(RemoteRef {
                key: self.key,
                version: self.version,
                checksum: self.checksum,
                len,
                replicas,
                retention: self.retention,
            }),
            _ => None,
        }
    }

    /// The recency list the entry belongs on, if any. Same-filled pages are
    /// on none: they cost no arena bytes and never move.
    pub fn list(&self) -> Option<usize> {
        match self.body {
            Body::Compressed { .. } if !self.remotifying => Some(self.retention as usize),
            Body::Remote { .. } => Some(REMOTE_LIST),
            _ => None,
        }
    }
}

#[derive(Copy, Clone, Debug)]
struct List {
    /// Most recently used.
    head: u32,
    /// Least recently used: the coldest.
    tail: u32,
}

const EMPTY: List = List {
    head: NIL,
    tail: NIL,
};

pub(super) struct Shard {
    table: HashTable<u32>,
    entries: Vec<Entry>,
    free_head: u32,
    lists: [List; LISTS],
    /// Pages per space (area or pool), so `curr_pages` needs no scan.
    space_pages: HashMap<u32, u64>,
    live: usize,
    /// Bytes of `entries` and `table` charged to the budget.
    charged: u64,
}

pub(super) fn hash_key(k: &PageKey) -> u64 {
    fn fmix(mut h: u64) -> u64 {
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
    fmix(k.index ^ fmix(k.object ^ ((k.space as u64) << 40) ^ 0x9e37_79b9_7f4a_7c15))
}

impl Shard {
    pub fn new() -> Self {
        Shard {
            table: HashTable::new(),
            entries: Vec::new(),
            free_head: NIL,
            lists: [EMPTY; LISTS],
            space_pages: HashMap::new(),
            live: 0,
            charged: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.live
    }

    /// Bytes the index of this shard holds.
    pub fn index_bytes(&self) -> u64 {
        self.charged + (self.space_pages.capacity() * (size_of::<(u32, u64)>() + 1)) as u64
    }

    fn table_bytes(&self) -> u64 {
        self.table.allocation_size() as u64
    }

    pub fn find(&self, key: &PageKey, hash: u64) -> Option<u32> {
        let entries = &self.entries;
        self.table
            .find(hash, |&i| entries[i as usize].key == *key)
            .copied()
    }

    pub fn entry(&self, i: u32) -> &Entry {
        &self.entries[i as usize]
    }

    /// Makes room for one more entry, charging the budget for any growth.
    /// `false` if the budget cannot pay for it.
    fn reserve_one(&mut self, budget: &Budget) -> bool {
        if self.free_head == NIL && self.entries.len() == self.entries.capacity() {
            let old = self.entries.capacity();
            let grow = old.clamp(16, 4096);
            let bytes = (grow * size_of::<Entry>()) as u64;
            if !budget.try_charge(bytes) {
                return false;
            }
            self.entries.reserve_exact(grow);
            let actual = ((self.entries.capacity() - old) * size_of::<Entry>()) as u64;
            budget.adjust(bytes, actual);
            self.charged += actual;
        }
        if self.table.len() == self.table.capacity() {
            let before = self.table_bytes();
            // The table doubles: charge a conservative estimate first.
            let estimate = (before * 2).max(1024);
            if !budget.try_charge(estimate) {
                return false;
            }
            let entries = &self.entries;
            self.table
                .reserve(1, |&i| hash_key(&entries[i as usize].key));
            let after = self.table_bytes();
            budget.adjust(estimate, after - before);
            self.charged += after - before;
        }
        true
    }

    /// Inserts a new key (which must not be present). `false` if the index
    /// cannot grow within the budget.
    pub fn insert(&mut self, hash: u64, mut e: Entry, budget: &Budget) -> Option<u32> {
        if !self.reserve_one(budget) {
            return None;
        }
        e.vacant = false;
        e.prev = NIL;
        e.next = NIL;
        let i = if self.free_head != NIL {
            let i = self.free_head;
            self.free_head = self.entries[i as usize].next;
            self.entries[i as usize] = e;
            i
        } else {
            self.entries.push(e);
            (self.entries.len() - 1) as u32
        };
        let entries = &self.entries;
        self.table
            .insert_unique(hash, i, |&j| hash_key(&entries[j as usize].key));
        if e.list().is_some() {
            self.push_head(i);
        }
        *self.space_pages.entry(e.key.space).or_insert(0) += 1;
        self.live += 1;
        Some(i)
    }

    /// Changes entry `i` with `f`, keeping its list membership right; the
    /// entry ends up hottest on whichever list it now belongs to.
    pub fn relink(&mut self, i: u32, f: impl FnOnce(&mut Entry)) {
        if self.entries[i as usize].list().is_some() {
            self.unlink(i);
        }
        f(&mut self.entries[i as usize]);
        if self.entries[i as usize].list().is_some() {
            self.push_head(i);
        }
    }

    /// Like [`relink`](Self::relink), but the entry ends up coldest: for a
    /// page that goes back to where it was taken from (a remotify that
    /// failed), so it is the first to be tried again.
    pub fn relink_cold(&mut self, i: u32, f: impl FnOnce(&mut Entry)) {
        if self.entries[i as usize].list().is_some() {
            self.unlink(i);
        }
        f(&mut self.entries[i as usize]);
        if self.entries[i as usize].list().is_some() {
            self.push_tail(i);
        }
    }

    /// Changes entry `i` with `f` in place: for changes that keep it on
    /// the same list, where it keeps its place.
    pub fn update(&mut self, i: u32, f: impl FnOnce(&mut Entry)) {
        let list = self.entries[i as usize].list();
        f(&mut self.entries[i as usize]);
        debug_assert_eq!(
            self.entries[i as usize].list(),
            list,
            "update changed the list"
        );
    }

    /// Replaces what entry `i` holds (a duplicate store), making it hottest.
    pub fn replace(&mut self, i: u32, e: Entry) {
        self.relink(i, |slot| {
            slot.checksum = e.checksum;
            slot.body = e.body;
            slot.stamp = e.stamp;
            slot.version = e.version;
            slot.retention = e.retention;
            slot.remotifying = false;
        });
    }

    /// Removes entry `i`, returning it.
    pub fn remove(&mut self, i: u32, hash: u64) -> Entry {
        let e = self.entries[i as usize];
        debug_assert!(!e.vacant);
        self.table
            .find_entry(hash, |&j| j == i)
            .expect("entry is in the table")
            .remove();
        if e.list().is_some() {
            self.unlink(i);
        }
        let count = self
            .space_pages
            .get_mut(&e.key.space)
            .expect("space counted");
        *count -= 1;
        if *count == 0 {
            self.space_pages.remove(&e.key.space);
        }
        let slot = &mut self.entries[i as usize];
        slot.vacant = true;
        slot.next = self.free_head;
        self.free_head = i;
        self.live -= 1;
        e
    }

    /// Marks entry `i` as just used.
    pub fn touch(&mut self, i: u32, stamp: u64) {
        self.relink(i, |e| e.stamp = stamp);
    }

    pub fn space_pages(&self, space: u32) -> u64 {
        self.space_pages.get(&space).copied().unwrap_or(0)
    }

    /// Entry numbers of up to `max` of the coldest entries on `list`,
    /// coldest first.
    pub fn coldest(&self, list: usize, max: usize) -> impl Iterator<Item = u32> + '_ {
        let mut i = self.lists[list].tail;
        std::iter::from_fn(move || {
            if i == NIL {
                return None;
            }
            let cur = i;
            i = self.entries[cur as usize].prev;
            Some(cur)
        })
        .take(max)
    }

    /// Entry numbers of up to `max` of the hottest entries on `list`,
    /// hottest first.
    pub fn hottest(&self, list: usize, max: usize) -> impl Iterator<Item = u32> + '_ {
        let mut i = self.lists[list].head;
        std::iter::from_fn(move || {
            if i == NIL {
                return None;
            }
            let cur = i;
            i = self.entries[cur as usize].next;
            Some(cur)
        })
        .take(max)
    }

    /// Entry numbers of live entries from position `from` on, with the position after each.
    pub fn live_from(&self, from: usize) -> impl Iterator<Item = u32> + '_ {
        self.entries[from.min(self.entries.len())..]
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.vacant)
            .map(move |(k, _)| (from + k) as u32)
    }

    fn push_head(&mut self, i: u32) {
        let r = self.entries[i as usize]
            .list()
            .expect("linking an entry that belongs on a list");
        let old_head = self.lists[r].head;
        {
            let e = &mut self.entries[i as usize];
            e.prev = NIL;
            e.next = old_head;
        }
        if old_head != NIL {
            self.entries[old_head as usize].prev = i;
        } else {
            self.lists[r].tail = i;
        }
        self.lists[r].head = i;
    }

    fn push_tail(&mut self, i: u32) {
        let r = self.entries[i as usize]
            .list()
            .expect("linking an entry that belongs on a list");
        let old_tail = self.lists[r].tail;
        {
            let e = &mut self.entries[i as usize];
            e.next = NIL;
            e.prev = old_tail;
        }
        if old_tail != NIL {
            self.entries[old_tail as usize].next = i;
        } else {
            self.lists[r].head = i;
        }
        self.lists[r].tail = i;
    }

    fn unlink(&mut self, i: u32) {
        let e = self.entries[i as usize];
        let (prev, next) = (e.prev, e.next);
        let r = e.list().expect("unlinking an entry that is on a list");
        if prev != NIL {
            self.entries[prev as usize].next = next;
        } else {
            self.lists[r].head = next;
        }
        if next != NIL {
            self.entries[next as usize].prev = prev;
        } else {
            self.lists[r].tail = prev;
        }
    }

    #[cfg(test)]
    pub fn charged_bytes(&self) -> u64 {
        self.charged
    }

    /// Checks the shard's structure; for tests.
    #[cfg(test)]
    pub fn audit(&self) {
        let mut in_lists = 0;
        for (r, list) in self.lists.iter().enumerate() {
            let mut prev = NIL;
            let mut i = list.head;
            while i != NIL {
                let e = &self.entries[i as usize];
                assert!(!e.vacant);
                assert_eq!(e.list(), Some(r));
                assert_eq!(e.prev, prev);
                assert!(prev == NIL || self.entries[prev as usize].stamp >= e.stamp);
                prev = i;
                i = e.next;
                in_lists += 1;
            }
            assert_eq!(list.tail, prev);
        }
        let listed = self
            .entries
            .iter()
            .filter(|e| !e.vacant && e.list().is_some())
            .count();
        assert_eq!(in_lists, listed);
        assert_eq!(self.table.len(), self.live);
        assert_eq!(self.space_pages.values().sum::<u64>(), self.live as u64);
    }
}
