//! What must hold, checked against what the nodes actually hold.
//!
//! The oracle knows, for every owner, the latest bytes (by checksum) it
//! accepted for each key and did not invalidate since, and which donor
//! incarnation each copy was put on. After every step it looks at every
//! such page: the owner's index must name those bytes, and either hold them
//! or list a donor that holds exactly that version; a page whose every
//! listed copy is gone is excused only when at least R of them were lost to
//! crashes (what replicas cannot prevent), never when a copy was released
//! or never made. A writethrough page (every fourth key) may be gone, as
//! the client keeps its own copy, but never stale.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::cluster::donor::{DonatedPage, PageRef};
use crate::store::{DonorId, PageKey, RemoteRef, Retention};

use super::world::World;

/// The key an owner's page `index` is stored under.
pub fn key(index: u64) -> PageKey {
    PageKey {
        space: 1,
        object: 0,
        index,
    }
}

/// How an owner's page `index` is stored: every fourth key is in a
/// writethrough area (one donor copy, dropped rather than repaired).
pub fn retention_of(index: u64) -> Retention {
    if index % 4 == 3 {
        Retention::Writethrough
    } else {
        Retention::Persistent
    }
}

/// Donor copies a page listed on donors should converge to.
fn copies_wanted(w: &World, index: u64) -> usize {
    if retention_of(index).droppable() {
        1
    } else {
        w.replicas
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Expect {
    pub checksum: u64,
    /// Every replica was lost to crashes: loads may answer unavailable.
    pub excused: bool,
}

#[derive(Default)]
pub struct Oracle {
    /// (owner node, key index) → the latest accepted bytes.
    pub pages: BTreeMap<(usize, u64), Expect>,
    /// (donor node, owner node, owner incarnation, key, version) → the
    /// donor's incarnation the copy was put on. Looked up, never iterated.
    placed: HashMap<(usize, usize, u64, PageKey, u64), u64>,
    /// (owner node, key index) → (version, donor) of copies the owner
    /// struck off its index after they were lost to the donor's crash.
    struck: HashMap<(usize, u64), Vec<(u64, DonorId)>>,
}

impl Oracle {
    pub fn accepted(&mut self, owner: usize, index: u64, checksum: u64) {
        self.struck.remove(&(owner, index));
        self.pages.insert(
            (owner, index),
            Expect {
                checksum,
                excused: false,
            },
        );
    }

    /// Invalidated, or refused (a refused store drops the older copy).
    pub fn dropped(&mut self, owner: usize, index: u64) {
        self.struck.remove(&(owner, index));
        self.pages.remove(&(owner, index));
    }

    pub fn expected(&self, owner: usize, index: u64) -> Option<Expect> {
        self.pages.get(&(owner, index)).copied()
    }

    /// A restarted owner starts empty: its clients start over too.
    pub fn owner_restarted(&mut self, owner: usize) {
        let keys: Vec<_> = self
            .pages
            .range((owner, 0)..=(owner, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            self.pages.remove(&k);
            self.struck.remove(&k);
        }
    }

    pub fn placed(
        &mut self,
        donor: usize,
        owner: usize,
        owner_incarnation: u64,
        p: &DonatedPage,
        donor_incarnation: u64,
    ) {
        self.placed.insert(
            (donor, owner, owner_incarnation, p.key, p.version),
            donor_incarnation,
        );
    }
}

/// Owner `owner` is about to strike donor `d` off its index (`d` came
/// back with a new run): remembers the copies listed there that were lost
/// to the crash, so a page left short of copies is judged on every copy
/// it had. A copy put on `d`'s current run is not lost: striking it off
/// is the owner's choice, and losing the page for it is a bug.
pub fn striking(w: &mut World, owner: usize, d: DonorId) {
    let on = &w.nodes[owner];
    let store = &on.owner.as_ref().expect("an owner").store;
    let dn = d as usize - 1;
    let mut lost = Vec::new();
    for &(o, index) in w
        .oracle
        .pages
        .range((owner, 0)..=(owner, u64::MAX))
        .map(|(k, _)| k)
    {
        let Some((_, Some(r))) = store.peek(key(index)) else {
            continue;
        };
        if !r.replicas.as_slice().contains(&d) {
            continue;
        }
        let at = (dn, o, on.incarnation, r.key, r.version);
        if w.oracle
            .placed
            .get(&at)
            .is_some_and(|&inc| inc != w.nodes[dn].incarnation)
        {
            lost.push((index, r.version));
        }
    }
    for (index, version) in lost {
        w.oracle
            .struck
            .entry((owner, index))
            .or_default()
            .push((version, d));
    }
}

/// Whether donor node `d` holds the owner's page at exactly `r.version`
/// with its bytes.
fn holds(w: &World, d: usize, owner: usize, r: &RemoteRef) -> bool {
    let (dn, on) = (&w.nodes[d], &w.nodes[owner]);
    if !dn.alive {
        return false;
    }
    let asked = [PageRef {
        key: r.key,
        version: r.version,
    }];
    match dn.donor.get(&on.name, on.incarnation, &asked) {
        Ok(got) => matches!(&got[0], Ok(p) if p.checksum == r.checksum && p.version == r.version),
        Err(_) => false,
    }
}

/// The invariants of every step: (a) no accepted page lost unless R of
/// its replicas failed, (b) no stale bytes named anywhere, (c) no node over
/// its limits.
pub fn check_step(w: &mut World) -> Result<(), String> {
    for n in &w.nodes {
        let d = &n.donor;
        if d.donated_bytes() > d.config().donate_bytes {
            return Err(format!("donor {} holds more than it donates", n.name));
        }
        if let Some(o) = &n.owner
            && o.store.used_bytes() > n.capacity_bytes
        {
            return Err(format!("owner {} is over its capacity", n.name));
        }
    }
    let mut excused = Vec::new();
    for (&(o, index), e) in &w.oracle.pages {
        // Nothing that could change an untouched owner's pages happened.
        if e.excused || !w.touched[o] {
            continue;
        }
        let on = &w.nodes[o];
        let store = &on.owner.as_ref().expect("pages only for owners").store;
        let droppable = retention_of(index).droppable();
        let r = match store.peek(key(index)) {
            // Dropped: the client's own copy serves.
            None if droppable => continue,
            None => {
                return Err(format!(
                    "lost: {} accepted page {index} and its index no longer has it",
                    on.name
                ));
            }
            Some((checksum, _)) if checksum != e.checksum => {
                return Err(format!(
                    "stale: {}'s index names other bytes than the latest stored for page {index}",
                    on.name
                ));
            }
            Some((_, None)) => continue,
            // Its copies may be gone: the next load answers a miss.
            Some((_, Some(_))) if droppable => continue,
            Some((_, Some(r))) => r,
        };
        let listed = r.replicas.as_slice();
        if listed.iter().any(|&d| holds(w, d as usize - 1, o, &r)) {
            continue;
        }
        let crashed_listed = listed
            .iter()
            .filter(|&&d| {
                let d = d as usize - 1;
                let at = (d, o, on.incarnation, r.key, r.version);
                w.oracle
                    .placed
                    .get(&at)
                    .is_some_and(|&inc| inc != w.nodes[d].incarnation)
            })
            .count();
        // Sets are recorded whole (R donors) and shrink only when a donor
        // that crashed is struck off: the copies missing from the listing
        // are those.
        let struck = w.oracle.struck.get(&(o, index)).map_or(0, |s| {
            s.iter()
                .filter(|(v, d)| *v == r.version && !listed.contains(d))
                .count()
        });
        let crashed = crashed_listed + struck.min(w.replicas.saturating_sub(listed.len()));
        if crashed >= w.replicas {
            excused.push((o, index));
            continue;
        }
        let why: Vec<String> = listed
            .iter()
            .map(|&d| {
                let dn = &w.nodes[d as usize - 1];
                let at = (d as usize - 1, o, on.incarnation, r.key, r.version);
                format!(
                    "{} (alive {}, incarnation {}, copy put on incarnation {:?})",
                    dn.name,
                    dn.alive,
                    dn.incarnation,
                    w.oracle.placed.get(&at)
                )
            })
            .collect();
        return Err(format!(
            "lost: {}'s page {index} version {} is listed on {} and no copy is left ({crashed} lost to crashes)",
            on.name,
            r.version,
            why.join(", ")
        ));
    }
    w.touched.fill(false);
    for k in excused {
        w.stats.unrecoverable += 1;
        if let Some(e) = w.oracle.pages.get_mut(&k) {
            e.excused = true;
        }
    }
    Ok(())
}

/// (d) Replicas converged: every remote page that was not lost beyond its
/// redundancy is on exactly R distinct live donors that hold it, every
/// owner's index holds exactly the pages it accepted, and every donor that
/// wants memory back got what owners can give: it is within its limit or
/// holds no page an owner lists.
pub fn converged(w: &World) -> Result<(), String> {
    let listed = listed_copies(w);
    for node in &w.nodes {
        // Within its limit, or holding nothing an owner could take back:
        // tombstones, and copies no owner lists (see `leaked_copies`).
        let d = &node.donor;
        let wanted: u64 = listed
            .iter()
            .filter(|((_, donor), _)| *donor == node.id)
            .map(|(_, pages)| pages)
            .sum();
        if d.reclaim_bytes() > 0 && wanted > 0 {
            return Err(format!(
                "donor {} holds {} bytes, above its limit of {}, in {} pages, {wanted} of them listed by owners",
                node.name,
                d.donated_bytes(),
                d.limit_bytes(),
                d.usage(None).pages,
            ));
        }
    }
    for (n, node) in w.nodes.iter().enumerate() {
        let Some(o) = &node.owner else { continue };
        // Writethrough pages count only while the index has them.
        let expected = w
            .oracle
            .pages
            .range((n, 0)..=(n, u64::MAX))
            .filter(|((_, index), _)| {
                !retention_of(*index).droppable() || o.store.peek(key(*index)).is_some()
            })
            .count() as u64;
        let held = o.store.stats().pages;
        if held != expected {
            return Err(format!(
                "{} holds {held} pages, {expected} accepted",
                node.name
            ));
        }
    }
    for (&(o, index), e) in &w.oracle.pages {
        if e.excused {
            continue;
        }
        let on = &w.nodes[o];
        let store = &on.owner.as_ref().expect("owner").store;
        let Some((_, Some(r))) = store.peek(key(index)) else {
            continue;
        };
        let listed = r.replicas.as_slice();
        let mut distinct = listed.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let holding = listed
            .iter()
            .filter(|&&d| holds(w, d as usize - 1, o, &r))
            .count();
        let want = copies_wanted(w, index);
        if distinct.len() != want || holding != want {
            let side = on.owner.as_ref().expect("owner");
            let seen: Vec<String> = listed
                .iter()
                .map(|&d| {
                    let dn = &w.nodes[d as usize - 1];
                    format!(
                        "{} (holds {}, incarnation {}; the owner shipped to {:?}, hears {:?} of {:?})",
                        dn.name,
                        holds(w, d as usize - 1, o, &r),
                        dn.incarnation,
                        side.shipped.get(&d),
                        side.peers.state(&dn.name, w.instant()),
                        side.peers.get(&dn.name).map(|p| p.heartbeat.incarnation),
                    )
                })
                .collect();
            return Err(format!(
                "{}'s page {index} is listed on {}; {holding} of them hold it, {want} wanted",
                on.name,
                seen.join(", "),
            ));
        }
    }
    Ok(())
}

/// How many of each owner's pages its index lists on each donor:
/// (owner node, donor id) → pages.
fn listed_copies(w: &World) -> BTreeMap<(usize, u32), u64> {
    let mut listed = BTreeMap::new();
    for (o, on) in w.nodes.iter().enumerate() {
        let Some(side) = &on.owner else { continue };
        for (&(_, index), _) in w.oracle.pages.range((o, 0)..=(o, u64::MAX)) {
            if let Some((_, Some(r))) = side.store.peek(key(index)) {
                for &d in r.replicas.as_slice() {
                    *listed.entry((o, d)).or_default() += 1;
                }
            }
        }
    }
    listed
}

/// Copies donors hold for an owner's current run that its index does not
/// list there at that version: (owner node, donor id, key index, version).
/// Some are on their way out (a release queued, a remotify not yet acked);
/// those still there a while later are garbage, costing donated memory
/// until the owner restarts.
pub fn leaked_copies(w: &World) -> BTreeSet<(usize, u32, u64, u64)> {
    let mut leaked = BTreeSet::new();
    for (o, on) in w.nodes.iter().enumerate() {
        let Some(side) = &on.owner else { continue };
        for dn in &w.nodes {
            if dn.donor.owner_incarnation(&on.name) != Some(on.incarnation) {
                continue;
            }
            for held in dn.donor.held_pages(&on.name) {
                let listed = matches!(
                    side.store.peek(held.key),
                    Some((_, Some(r))) if r.version == held.version && r.replicas.as_slice().contains(&dn.id)
                );
                if !listed {
                    leaked.insert((o, dn.id, held.key.index, held.version));
                }
            }
        }
    }
    leaked
}

/// What the garbage check compares against, taken at convergence.
pub struct AtConvergence {
    /// Copies no owner listed at convergence, and none has listed (or the
    /// donor let go) at any step since: unlisted all along.
    leaked: BTreeSet<(usize, u32, u64, u64)>,
    /// Per owner node: its incarnation, placement mark and audit passes.
    owners: BTreeMap<usize, (u64, u64, u64)>,
}

pub fn at_convergence(w: &World) -> AtConvergence {
    AtConvergence {
        leaked: leaked_copies(w),
        owners: w
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(o, n)| {
                let side = n.owner.as_ref()?;
                Some((o, (n.incarnation, side.placements, side.auditor.passes())))
            })
            .collect(),
    }
}

/// Drops from the candidates for garbage those listed now, or no longer
/// held: a copy unlisted at convergence only because its put was not
/// answered yet, and released since, is not garbage. Run after every step.
pub fn prune_listed(w: &World, seen: &mut AtConvergence) {
    seen.leaked.retain(|&(o, d, index, version)| {
        let (on, dn) = (&w.nodes[o], &w.nodes[d as usize - 1]);
        let listed = on.owner.as_ref().is_some_and(|side| {
            matches!(side.store.peek(key(index)),
                Some((_, Some(r))) if r.version == version && r.replicas.as_slice().contains(&d))
        });
        let asked = [PageRef {
            key: key(index),
            version,
        }];
        let held = dn.alive
            && matches!(dn.donor.get(&on.name, on.incarnation, &asked), Ok(got) if got[0].is_ok());
        held && !listed
    });
}

/// (e), a while after convergence: no copy nobody lists is still there
/// (one unlisted from convergence to now is garbage), and, once an
/// owner's audits have walked every donor twice since, no donor keeps a
/// tombstone of a release the owner decided before convergence.
pub fn garbage_collected(w: &mut World, seen: &AtConvergence) -> Result<(), String> {
    let leaked: Vec<_> = seen.leaked.iter().collect();
    w.stats.leaked_copies = leaked.len() as u64;
    if let Some((o, d, index, version)) = leaked.first() {
        return Err(format!(
            "{} copies no owner lists are still on donors, e.g. n{}'s key {index} v{version} on n{d}",
            leaked.len(),
            o + 1
        ));
    }
    for (&o, &(incarnation, mark, passes)) in &seen.owners {
        let node = &w.nodes[o];
        let Some(side) = node
            .owner
            .as_ref()
            .filter(|_| node.incarnation == incarnation)
        else {
            continue;
        };
        if side.auditor.passes() < passes + 2 {
            return Err(format!(
                "n{}'s audits walked its donors {} times since convergence",
                o + 1,
                side.auditor.passes() - passes
            ));
        }
        for dn in &w.nodes {
            let stale = dn
                .donor
                .tombstone_placements(&node.name)
                .into_iter()
                .filter(|&p| p != 0 && p <= mark)
                .count();
            if stale > 0 && dn.donor.owner_incarnation(&node.name) == Some(incarnation) {
                return Err(format!(
                    "{} keeps {stale} tombstones of n{}'s releases decided before convergence",
                    dn.name,
                    o + 1
                ));
            }
        }
    }
    Ok(())
}
