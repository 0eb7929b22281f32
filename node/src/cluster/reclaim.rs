//! Donor reclaim: a donor that needs its memory back asks the owners of
//! the pages it holds to take some back, instead of dropping any.
//!
//! The donor side decides how much it may hold ([`ReclaimPolicy::limit`],
//! sans-IO): the operator's donation (`--donate`, lowered or restored at
//! runtime with `ramster donate`), less what the host needs when the
//! cgroup nears its limit (v2 `memory.max` / `memory.current`, v1
//! `memory.limit_in_bytes` / `memory.usage_in_bytes`), when PSI shows
//! tasks stalled on memory, or when the node's own pages grow past its
//! remotify line (it is short of memory itself: its own pages come before
//! its peers'). New puts are refused above that limit; each
//! heartbeat tells each owner its share of the excess. Owners move that
//! many bytes of copies to other donors, or bring them home when no donor
//! has room (the owner side is [`super::repair::reclaim`]). Persistent
//! pages are never dropped to make room: a donor that nobody takes pages
//! from stays over its limit and says so.

use std::time::{Duration, Instant};

use super::pressure::HostMemory;

/// The share of its cgroup limit a node keeps itself under: above it, the
/// donation gives back the excess.
pub const CGROUP_FILL_MAX: f64 = 0.90;
/// PSI "some avg10" at or above this (percent of time some task stalled
/// on memory) shrinks the donation by [`PRESSURE_STEP`] of what is held.
pub const PSI_STALL_PERCENT: f64 = 10.0;
/// What a tick of PSI stalls, or of the node's own pages over its remotify
/// line, takes off the donation: a share of what is held, so the pages go
/// back gradually and stop going once the pressure does.
pub const PRESSURE_STEP: f64 = 0.10;
/// A limit lowered for pressure holds this long after the last sign of
/// it, so pages do not flow back the moment the host breathes again.
pub const PRESSURE_HOLD: Duration = Duration::from_secs(30);
/// How often a donor looks at the host.
pub const RECLAIM_TICK: Duration = Duration::from_secs(1);

/// The donor's memory, as the policy reads it each tick.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reading {
    /// What the operator donates now (`--donate`, or `ramster donate`).
    pub donation: u64,
    /// Bytes held for peers.
    pub held: u64,
    /// The node's own store: the share of its capacity in use, and the
    /// remotify start line (above it the node ships its own pages out, and
    /// should not be holding its peers').
    pub own_fill: f64,
    pub own_fill_max: f64,
    pub host: HostMemory,
}

/// Remembers a limit lowered for pressure until the pressure is over.
#[derive(Debug, Default)]
pub struct ReclaimPolicy {
    /// The lowered limit and until when it holds.
    capped: Option<(u64, Instant)>,
}

impl ReclaimPolicy {
    /// What new puts may fill the donation up to now.
    pub fn limit(&mut self, now: Instant, r: &Reading) -> u64 {
        if let Some(cap) = pressure_cap(r) {
            let cap = match self.capped {
                Some((was, until)) if now < until => cap.min(was),
                _ => cap,
            };
            self.capped = Some((cap, now + PRESSURE_HOLD));
        } else if self.capped.is_some_and(|(_, until)| now >= until) {
            self.capped = None;
        }
        match self.capped {
            Some((cap, _)) => cap.min(r.donation),
            None => r.donation,
        }
    }
}

/// The limit the host's state calls for, if it calls for one.
fn pressure_cap(r: &Reading) -> Option<u64> {
    let mut cap: Option<u64> = None;
    if let (Some(limit), Some(usage)) = (r.host.cgroup_limit_bytes, r.host.cgroup_usage_bytes) {
        let allowed = (limit as f64 * CGROUP_FILL_MAX) as u64;
        if usage > allowed {
            cap = Some(r.held.saturating_sub(usage - allowed));
        }
    }
    let stalled = r
        .host
        .psi_some_avg10
        .is_some_and(|stalled| stalled >= PSI_STALL_PERCENT);
    if stalled || r.own_fill > r.own_fill_max {
        let stepped = (r.held as f64 * (1.0 - PRESSURE_STEP)) as u64;
        cap = Some(cap.map_or(stepped, |c| c.min(stepped)));
    }
    cap
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn reading(donation: u64, held: u64, host: HostMemory) -> Reading {
        Reading {
            donation,
            held,
            own_fill: 0.5,
            own_fill_max: 0.85,
            host,
        }
    }

    #[test]
    fn without_pressure_the_limit_is_the_donation() {
        let mut p = ReclaimPolicy::default();
        let now = Instant::now();
        assert_eq!(
            p.limit(now, &reading(512 * MIB, 100 * MIB, HostMemory::default())),
            512 * MIB
        );
        // Lowered by the operator below what is held: that is the limit,
        // and the excess is what owners are asked for.
        assert_eq!(
            p.limit(now, &reading(64 * MIB, 100 * MIB, HostMemory::default())),
            64 * MIB
        );
    }

    #[test]
    fn a_cgroup_near_its_limit_gives_back_the_excess() {
        let mut p = ReclaimPolicy::default();
        let now = Instant::now();
        let host = HostMemory {
            cgroup_limit_bytes: Some(1000 * MIB),
            cgroup_usage_bytes: Some(950 * MIB),
            ..Default::default()
        };
        // 90% of 1000 MiB is 900: 50 MiB over, taken off the 300 held.
        assert_eq!(
            p.limit(now, &reading(512 * MIB, 300 * MIB, host.clone())),
            250 * MIB
        );
        // Under the line: no cap from the cgroup.
        let calm = HostMemory {
            cgroup_usage_bytes: Some(800 * MIB),
            ..host
        };
        let later = now + PRESSURE_HOLD + Duration::from_secs(1);
        assert_eq!(
            p.limit(later, &reading(512 * MIB, 250 * MIB, calm)),
            512 * MIB
        );
    }

    #[test]
    fn psi_stalls_step_the_limit_down_and_it_holds_until_they_stop() {
        let mut p = ReclaimPolicy::default();
        let t0 = Instant::now();
        let stalled = HostMemory {
            psi_some_avg10: Some(25.0),
            ..Default::default()
        };
        let calm = HostMemory {
            psi_some_avg10: Some(0.5),
            ..Default::default()
        };
        assert_eq!(
            p.limit(t0, &reading(512 * MIB, 200 * MIB, stalled.clone())),
            180 * MIB
        );
        let t1 = t0 + RECLAIM_TICK;
        assert_eq!(
            p.limit(t1, &reading(512 * MIB, 180 * MIB, stalled)),
            162 * MIB
        );
        // Calm again: the lowered limit holds for a while, then lifts.
        let t2 = t1 + RECLAIM_TICK;
        assert_eq!(
            p.limit(t2, &reading(512 * MIB, 162 * MIB, calm.clone())),
            162 * MIB
        );
        let t3 = t1 + PRESSURE_HOLD;
        assert_eq!(p.limit(t3, &reading(512 * MIB, 162 * MIB, calm)), 512 * MIB);
    }

    #[test]
    fn own_pages_past_the_remotify_line_step_the_limit_down_until_they_settle() {
        let mut p = ReclaimPolicy::default();
        let t0 = Instant::now();
        let own = |fill| Reading {
            own_fill: fill,
            ..reading(512 * MIB, 200 * MIB, HostMemory::default())
        };
        // At the line, not past it: the node has room for its own pages.
        assert_eq!(p.limit(t0, &own(0.85)), 512 * MIB);
        // Past it: the node ships its own pages out; it takes no more of
        // its peers' and gives back a tenth of what it holds per tick.
        assert_eq!(p.limit(t0, &own(0.90)), 180 * MIB);
        let t1 = t0 + RECLAIM_TICK;
        let held = Reading {
            held: 180 * MIB,
            ..own(0.88)
        };
        assert_eq!(p.limit(t1, &held), 162 * MIB);
        // Back under the line: the limit holds a while, then lifts.
        let t2 = t1 + RECLAIM_TICK;
        assert_eq!(p.limit(t2, &own(0.70)), 162 * MIB);
        assert_eq!(p.limit(t1 + PRESSURE_HOLD, &own(0.70)), 512 * MIB);
    }
}
