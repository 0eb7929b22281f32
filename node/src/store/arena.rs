//! A size-class arena for compressed pages (the zsmalloc part of zcache).
//!
//! A compressed page of `n` bytes goes into a slot of the smallest class that
//! holds it; classes are [`SLOT_GRANULE_BYTES`] apart, so at most that much
//! minus one is wasted per page ("slack"). Slots are carved out of slabs of
//! about [`SLAB_BYTES_TARGET`]; a slab is returned to the system as soon as its
//! last slot is freed. There is no `Box`/`Vec` per page: a page is a
//! [`Handle`] (class, slab, slot) into memory the arena owns.
//!
//! Each class has its own lock, so stores of different sizes do not contend
//! and there is no global lock. Slab memory is charged to the store's
//! [`Budget`] before it is allocated: the arena never holds more than the
//! capacity allows.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Budget;

/// Distance between slot sizes.
pub const SLOT_GRANULE_BYTES: usize = 32;
/// The largest compressed page the arena holds: 7/8 of a page (zcache's
/// rejection threshold; nothing larger is ever admitted).
pub const SLOT_BYTES_MAX: usize = ramster_protocol::PAGE_BYTES * 7 / 8;
/// Number of size classes.
pub const CLASSES: usize = SLOT_BYTES_MAX / SLOT_GRANULE_BYTES;
/// Slabs are about this big: big enough that the per-slab bookkeeping is
/// negligible, small enough that a mostly-empty class wastes little.
pub const SLAB_BYTES_TARGET: usize = 32 * 1024;

const NOT_PARTIAL: u32 = u32::MAX;

/// Where a compressed page lives: class, slab and slot, packed in 64 bits so
/// the index entry stays small.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Handle(u64);

impl Handle {
    fn new(class: usize, slab: u32, slot: u16) -> Self {
        Handle(((class as u64) << 48) | ((slab as u64) << 16) | slot as u64)
    }
    fn class(self) -> usize {
        (self.0 >> 48) as usize
    }
    fn slab(self) -> usize {
        ((self.0 >> 16) & 0xffff_ffff) as usize
    }
    fn slot(self) -> usize {
        (self.0 & 0xffff) as usize
    }
    pub fn to_bits(self) -> u64 {
        self.0
    }
    pub fn from_bits(bits: u64) -> Self {
        Handle(bits)
    }
}

/// The class holding `len` bytes.
pub fn class_of(len: usize) -> usize {
    debug_assert!(len > 0 && len <= SLOT_BYTES_MAX);
    len.div_ceil(SLOT_GRANULE_BYTES) - 1
}

/// Bytes of a slot of `class`.
pub fn slot_bytes(class: usize) -> usize {
    (class + 1) * SLOT_GRANULE_BYTES
}

fn slots_per_slab(class: usize) -> usize {
    (SLAB_BYTES_TARGET / slot_bytes(class)).clamp(1, u16::MAX as usize)
}

struct Slab {
    mem: Box<[u8]>,
    /// Free slot numbers (a stack: the most recently freed is reused first,
    /// while it is still in cache).
    free: Vec<u16>,
    live: u16,
    /// Position in the class's `partial` list, or `NOT_PARTIAL`.
    partial_pos: u32,
}

struct SizeClass {
    class: usize,
    slabs: Vec<Option<Slab>>,
    /// Slab numbers whose `slabs` entry is `None`, for reuse.
    vacant: Vec<u32>,
    /// Slabs with at least one free slot; allocation takes from the last.
    partial: Vec<u32>,
}

impl SizeClass {
    fn slab_bytes(&self) -> usize {
        slot_bytes(self.class) * slots_per_slab(self.class)
    }

    fn alloc(&mut self, budget: &Budget) -> Option<(u32, u16)> {
        if let Some(&sid) = self.partial.last() {
            let slab = self.slabs[sid as usize]
                .as_mut()
                .expect("partial slab exists");
            let slot = slab.free.pop().expect("partial slab has a free slot");
            slab.live += 1;
            if slab.free.is_empty() {
                self.partial.pop();
                slab.partial_pos = NOT_PARTIAL;
            }
            return Some((sid, slot));
        }
        let bytes = self.slab_bytes();
        if !budget.try_charge(bytes as u64) {
            return None;
        }
        let n = slots_per_slab(self.class);
        // Slot 0 is handed out now; the rest wait on the stack, lowest on top.
        let free: Vec<u16> = (1..n as u16).rev().collect();
        let slab = Slab {
            mem: vec![0u8; bytes].into_boxed_slice(),
            partial_pos: NOT_PARTIAL,
            live: 1,
            free,
        };
        let sid = match self.vacant.pop() {
            Some(sid) => {
                self.slabs[sid as usize] = Some(slab);
                sid
            }
            None => {
                self.slabs.push(Some(slab));
                (self.slabs.len() - 1) as u32
            }
        };
        if n > 1 {
            self.push_partial(sid);
        }
        Some((sid, 0))
    }

    fn push_partial(&mut self, sid: u32) {
        let slab = self.slabs[sid as usize].as_mut().expect("slab exists");
        slab.partial_pos = self.partial.len() as u32;
        self.partial.push(sid);
    }

    fn remove_partial(&mut self, sid: u32) {
        let pos = self.slabs[sid as usize]
            .as_ref()
            .expect("slab exists")
            .partial_pos as usize;
        self.partial.swap_remove(pos);
        if let Some(&moved) = self.partial.get(pos) {
            self.slabs[moved as usize]
                .as_mut()
                .expect("slab exists")
                .partial_pos = pos as u32;
        }
    }

    /// Frees a slot; returns the slab bytes released (0 unless the slab emptied).
    fn free(&mut self, sid: u32, slot: u16) -> usize {
        let per_slab = slots_per_slab(self.class);
        let slab = self.slabs[sid as usize]
            .as_mut()
            .expect("freeing a slot of a live slab");
        debug_assert!(slab.live > 0);
        debug_assert!(!slab.free.contains(&slot), "double free of slot {slot}");
        slab.live -= 1;
        slab.free.push(slot);
        if slab.live == 0 {
            if slab.partial_pos != NOT_PARTIAL {
                self.remove_partial(sid);
            }
            self.slabs[sid as usize] = None;
            self.vacant.push(sid);
            return self.slab_bytes();
        }
        if slab.free.len() == 1 && per_slab > 1 {
            // It was full; it has room again.
            self.push_partial(sid);
        }
        0
    }

    fn slot(&self, sid: usize, slot: usize) -> &[u8] {
        let size = slot_bytes(self.class);
        let slab = self.slabs[sid].as_ref().expect("reading a live slab");
        &slab.mem[slot * size..(slot + 1) * size]
    }

    fn slot_mut(&mut self, sid: usize, slot: usize) -> &mut [u8] {
        let size = slot_bytes(self.class);
        let slab = self.slabs[sid].as_mut().expect("writing a live slab");
        &mut slab.mem[slot * size..(slot + 1) * size]
    }
}

/// Byte totals of the arena.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ArenaTotals {
    /// Memory of all slabs.
    pub slab_bytes: u64,
    /// Memory of the slots in use (payload + slack).
    pub slot_bytes: u64,
    /// Slots in use.
    pub slots: u64,
}

impl ArenaTotals {
    /// Bytes of slabs not holding a page: free slots. Fragmentation.
    pub fn free_slot_bytes(&self) -> u64 {
        self.slab_bytes - self.slot_bytes
    }
}

pub struct Arena {
    classes: Box<[Mutex<SizeClass>]>,
    slab_bytes: AtomicU64,
    slot_bytes: AtomicU64,
    slots: AtomicU64,
}

impl Default for Arena {
    fn default() -> Self {
        Self::new()
    }
}

impl Arena {
    pub fn new() -> Self {
        let classes = (0..CLASSES)
            .map(|class| {
                Mutex::new(SizeClass {
                    class,
                    slabs: Vec::new(),
                    vacant: Vec::new(),
                    partial: Vec::new(),
                })
            })
            .collect();
        Arena {
            classes,
            slab_bytes: AtomicU64::new(0),
            slot_bytes: AtomicU64::new(0),
            slots: AtomicU64::new(0),
        }
    }

    /// Copies `data` into a fresh slot. `None` when a new slab would not fit
    /// the budget.
    pub fn alloc_write(&self, data: &[u8], budget: &Budget) -> Option<Handle> {
        let class = class_of(data.len());
        let mut c = self.classes[class].lock();
        let slabs_before = c.slabs.len() - c.vacant.len();
        let (sid, slot) = c.alloc(budget)?;
        c.slot_mut(sid as usize, slot as usize)[..data.len()].copy_from_slice(data);
        if c.slabs.len() - c.vacant.len() != slabs_before {
            self.slab_bytes
                .fetch_add(c.slab_bytes() as u64, Ordering::Relaxed);
        }
        drop(c);
        self.slot_bytes
            .fetch_add(slot_bytes(class) as u64, Ordering::Relaxed);
        self.slots.fetch_add(1, Ordering::Relaxed);
        Some(Handle::new(class, sid, slot))
    }

    /// Copies the first `len` bytes of the slot into `out`.
    pub fn read(&self, h: Handle, len: usize, out: &mut [u8]) {
        let c = self.classes[h.class()].lock();
        out[..len].copy_from_slice(&c.slot(h.slab(), h.slot())[..len]);
    }

    /// Frees a slot, returning an emptied slab's memory to the budget.
    pub fn free(&self, h: Handle, budget: &Budget) {
        let mut c = self.classes[h.class()].lock();
        let released = c.free(h.slab() as u32, h.slot() as u16);
        drop(c);
        if released > 0 {
            self.slab_bytes
                .fetch_sub(released as u64, Ordering::Relaxed);
            budget.release(released as u64);
        }
        self.slot_bytes
            .fetch_sub(slot_bytes(h.class()) as u64, Ordering::Relaxed);
        self.slots.fetch_sub(1, Ordering::Relaxed);
    }

    /// The running totals (cheap; from counters).
    pub fn totals(&self) -> ArenaTotals {
        ArenaTotals {
            slab_bytes: self.slab_bytes.load(Ordering::Relaxed),
            slot_bytes: self.slot_bytes.load(Ordering::Relaxed),
            slots: self.slots.load(Ordering::Relaxed),
        }
    }

    /// The totals recomputed by walking every slab: what `totals` must equal.
    pub fn audit(&self) -> ArenaTotals {
        let mut t = ArenaTotals::default();
        for c in self.classes.iter() {
            let c = c.lock();
            let per_slab = slots_per_slab(c.class);
            for slab in c.slabs.iter().flatten() {
                assert_eq!(slab.live as usize + slab.free.len(), per_slab);
                assert_eq!(slab.mem.len(), c.slab_bytes());
                t.slab_bytes += slab.mem.len() as u64;
                t.slot_bytes += slab.live as u64 * slot_bytes(c.class) as u64;
                t.slots += slab.live as u64;
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn classes_cover_every_admitted_size() {
        assert_eq!(class_of(1), 0);
        assert_eq!(class_of(32), 0);
        assert_eq!(class_of(33), 1);
        assert_eq!(class_of(SLOT_BYTES_MAX), CLASSES - 1);
        for len in 1..=SLOT_BYTES_MAX {
            let s = slot_bytes(class_of(len));
            assert!(s >= len && s - len < SLOT_GRANULE_BYTES);
        }
    }

    #[test]
    fn a_slab_is_charged_once_and_released_when_empty() {
        let budget = Budget::new(1 << 20);
        let arena = Arena::new();
        let a = arena.alloc_write(&[1; 100], &budget).unwrap();
        let b = arena.alloc_write(&[2; 100], &budget).unwrap();
        let charged = budget.used();
        assert_eq!(charged, arena.totals().slab_bytes);
        let mut out = [0u8; 100];
        arena.read(b, 100, &mut out);
        assert_eq!(out, [2; 100]);
        arena.free(a, &budget);
        assert_eq!(budget.used(), charged);
        arena.free(b, &budget);
        assert_eq!(budget.used(), 0);
        assert_eq!(arena.totals(), ArenaTotals::default());
    }

    #[test]
    fn refuses_a_slab_past_the_budget() {
        let budget = Budget::new(SLAB_BYTES_TARGET as u64 / 2);
        let arena = Arena::new();
        assert!(arena.alloc_write(&[1; 3000], &budget).is_none());
        assert_eq!(budget.used(), 0);
    }

    proptest! {
        /// Random allocs and frees: the running totals equal a walk of every
        /// slab, the budget equals the slab bytes, and every live slot still
        /// holds what was written into it.
        #[test]
        fn accounting_stays_exact(ops in prop::collection::vec((any::<bool>(), 1usize..=SLOT_BYTES_MAX, any::<u8>(), any::<prop::sample::Index>()), 1..400)) {
            let budget = Budget::new(u64::MAX);
            let arena = Arena::new();
            let mut live: Vec<(Handle, usize, u8)> = Vec::new();
            for (alloc, len, fill, pick) in ops {
                if alloc || live.is_empty() {
                    let h = arena.alloc_write(&vec![fill; len], &budget).unwrap();
                    live.push((h, len, fill));
                } else {
                    let (h, _, _) = live.swap_remove(pick.index(live.len()));
                    arena.free(h, &budget);
                }
                let totals = arena.totals();
                prop_assert_eq!(totals, arena.audit());
                prop_assert_eq!(budget.used(), totals.slab_bytes);
                prop_assert_eq!(totals.slots, live.len() as u64);
                let want: u64 = live.iter().map(|(_, len, _)| slot_bytes(class_of(*len)) as u64).sum();
                prop_assert_eq!(totals.slot_bytes, want);
            }
            let mut buf = vec![0u8; SLOT_BYTES_MAX];
            for (h, len, fill) in &live {
                arena.read(*h, *len, &mut buf);
                prop_assert!(buf[..*len].iter().all(|b| b == fill));
            }
            for (h, _, _) in live {
                arena.free(h, &budget);
            }
            prop_assert_eq!(arena.totals(), ArenaTotals::default());
            prop_assert_eq!(budget.used(), 0);
        }
    }
}
