//! Who is alive, by heartbeats: a node heard from within `suspect_after`
//! is up; within `down_after`, suspect (not chosen for new pages, still
//! asked for the ones it holds); silent longer, or never heard from, down.
//! A donor down for `out_after` is *out*: only then do owners re-create
//! the copies it holds elsewhere (Ceph's down and out). A pause, a stall
//! or a short partition costs no repair and no release of every copy it
//! held once it is back; a donor back with a new incarnation came back
//! empty and is repaired around at once, out or not.
//! Sans-IO: times are passed in, so tests drive a clock by hand.

use std::time::{Duration, Instant};

use hashbrown::HashMap;
use ramster_protocol::peer::Heartbeat;

use super::status::Liveness;

/// Default heartbeat period.
pub const HEARTBEAT_INTERVAL_MS: u64 = 500;
/// Silence after which a peer is suspect: three heartbeats missed.
pub const SUSPECT_AFTER_MS: u64 = 1_500;
/// Silence after which a peer is down.
pub const DOWN_AFTER_MS: u64 = 3_000;
/// Silence after which a donor is out and its copies are repaired: long
/// enough for a stall or a blip to pass without re-creating (and then
/// releasing) everything the donor held, short next to the time a second
/// failure takes to come (see docs on `--out-after`).
pub const OUT_AFTER_MS: u64 = 10_000;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct LivenessTimings {
    pub heartbeat_interval: Duration,
    pub suspect_after: Duration,
    pub down_after: Duration,
    /// Down for this long: out (repaired around). Never below `down_after`.
    pub out_after: Duration,
}

impl Default for LivenessTimings {
    fn default() -> Self {
        LivenessTimings {
            heartbeat_interval: Duration::from_millis(HEARTBEAT_INTERVAL_MS),
            suspect_after: Duration::from_millis(SUSPECT_AFTER_MS),
            down_after: Duration::from_millis(DOWN_AFTER_MS),
            out_after: Duration::from_millis(OUT_AFTER_MS),
        }
    }
}

/// The last word from one peer.
#[derive(Clone, Debug)]
pub struct PeerReport {
    pub last_seen: Instant,
    /// Round trip of our last heartbeat to it, if we sent one.
    pub rtt: Option<Duration>,
    /// Its last heartbeat, which carries its incarnation.
    pub heartbeat: Heartbeat,
}

/// Heartbeat records by node name.
#[derive(Debug, Default)]
pub struct PeerTable {
    timings: LivenessTimings,
    peers: HashMap<String, PeerReport>,
}

impl PeerTable {
    pub fn new(timings: LivenessTimings) -> Self {
        PeerTable {
            timings,
            peers: HashMap::new(),
        }
    }

    pub fn timings(&self) -> LivenessTimings {
        self.timings
    }

    /// A heartbeat from `peer` (its own, or its answer to ours).
    pub fn record(
        &mut self,
        peer: &str,
        now: Instant,
        heartbeat: Heartbeat,
        rtt: Option<Duration>,
    ) {
        let rtt = rtt.or_else(|| self.peers.get(peer).and_then(|r| r.rtt));
        self.peers.insert(
            peer.to_string(),
            PeerReport {
                last_seen: now,
                rtt,
                heartbeat,
            },
        );
    }

    pub fn get(&self, peer: &str) -> Option<&PeerReport> {
        self.peers.get(peer)
    }

    pub fn state(&self, peer: &str, now: Instant) -> Liveness {
        match self.peers.get(peer) {
            None => Liveness::Down,
            Some(r) => {
                let silent = now.saturating_duration_since(r.last_seen);
                if silent < self.timings.suspect_after {
                    Liveness::Up
                } else if silent < self.timings.down_after {
                    Liveness::Suspect
                } else {
                    Liveness::Down
                }
            }
        }
    }

    /// Whether `peer` has been silent (or unheard of) long enough to be
    /// out: down, and for at least `out_after`.
    pub fn is_out(&self, peer: &str, now: Instant) -> bool {
        let out_after = self.timings.out_after.max(self.timings.down_after);
        self.peers
            .get(peer)
            .is_none_or(|r| now.saturating_duration_since(r.last_seen) >= out_after)
    }

    /// Forgets peers that are no longer members.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.peers.retain(|name, _| keep(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_makes_a_peer_suspect_then_down_and_a_heartbeat_brings_it_back() {
        let mut t = PeerTable::new(LivenessTimings::default());
        let t0 = Instant::now();
        assert_eq!(t.state("b", t0), Liveness::Down, "never heard from");
        let run = |incarnation| Heartbeat {
            incarnation,
            ..Heartbeat::default()
        };
        t.record("b", t0, run(1), Some(Duration::from_micros(80)));
        assert_eq!(
            t.state("b", t0 + Duration::from_millis(1_499)),
            Liveness::Up
        );
        assert_eq!(
            t.state("b", t0 + Duration::from_millis(1_500)),
            Liveness::Suspect
        );
        assert_eq!(
            t.state("b", t0 + Duration::from_millis(3_000)),
            Liveness::Down
        );
        let t1 = t0 + Duration::from_secs(10);
        t.record("b", t1, run(2), None);
        assert_eq!(t.state("b", t1), Liveness::Up);
        let r = t.get("b").unwrap();
        assert_eq!(r.heartbeat.incarnation, 2);
        assert_eq!(
            r.rtt,
            Some(Duration::from_micros(80)),
            "an RTT is kept until a new one"
        );
        t.retain(|n| n != "b");
        assert_eq!(t.state("b", t1), Liveness::Down);
    }

    #[test]
    fn a_donor_is_out_only_once_down_for_out_after() {
        let timings = LivenessTimings::default();
        let mut t = PeerTable::new(timings);
        let t0 = Instant::now();
        assert!(t.is_out("b", t0), "never heard from");
        t.record("b", t0, Heartbeat::default(), None);
        let down = t0 + timings.down_after;
        assert_eq!(t.state("b", down), Liveness::Down);
        assert!(!t.is_out("b", down), "down, not out yet");
        assert!(!t.is_out("b", t0 + timings.out_after - Duration::from_millis(1)));
        assert!(t.is_out("b", t0 + timings.out_after));

        // Out-after below down-after: out when down, never before.
        let mut eager = PeerTable::new(LivenessTimings {
            out_after: Duration::ZERO,
            ..timings
        });
        eager.record("b", t0, Heartbeat::default(), None);
        assert!(!eager.is_out("b", t0 + timings.suspect_after));
        assert!(eager.is_out("b", down));
    }
}
