//! When pages move: remotify above the high watermark until the stop
//! watermark; suction below the low watermark until the suction stop, which
//! sits under the remotify stop so a page brought home does not push the
//! node back over the edge (no ping-pong).

use std::time::Duration;

/// Fractions of capacity.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct Watermarks {
    /// Remotify starts above this.
    pub remotify_start: f64,
    /// ...and runs until use is back down to this.
    pub remotify_stop: f64,
    /// Suction starts below this.
    pub suction_start: f64,
    /// ...and brings pages home until use reaches this.
    pub suction_stop: f64,
}

impl Default for Watermarks {
    fn default() -> Self {
        Watermarks {
            remotify_start: 0.85,
            remotify_stop: 0.75,
            suction_start: 0.60,
            suction_stop: 0.70,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "watermarks must satisfy 0 < suction_start < suction_stop < remotify_stop < remotify_start <= 1, got {0:?}"
)]
pub struct BadWatermarks(pub Watermarks);

impl Watermarks {
    pub fn validate(self) -> Result<Self, BadWatermarks> {
        let ok = 0.0 < self.suction_start
            && self.suction_start < self.suction_stop
            && self.suction_stop < self.remotify_stop
            && self.remotify_stop < self.remotify_start
            && self.remotify_start <= 1.0;
        ok.then_some(self).ok_or(BadWatermarks(self))
    }
}

/// What the movers should do now.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Movement {
    Idle,
    /// Ship this many bytes of (compressed) pages to donors.
    Remotify {
        bytes: u64,
    },
    /// Bring up to this many bytes of pages home.
    Suction {
        bytes: u64,
    },
}

/// The hysteresis state: which mover is running.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Pressure {
    remotifying: bool,
    sucking: bool,
}

impl Pressure {
    /// Decides from the store's use and capacity; `remote_bytes` is what
    /// donors hold for us (nothing to suck back when zero).
    pub fn decide(
        &mut self,
        w: &Watermarks,
        used: u64,
        capacity: u64,
        remote_bytes: u64,
    ) -> Movement {
        if capacity == 0 {
            return Movement::Idle;
        }
        let fill = used as f64 / capacity as f64;
        let at = |f: f64| (f * capacity as f64) as u64;
        if fill > w.remotify_start {
            self.remotifying = true;
            self.sucking = false;
        } else if fill <= w.remotify_stop {
            self.remotifying = false;
        }
        if self.remotifying {
            return Movement::Remotify {
                bytes: used.saturating_sub(at(w.remotify_stop)),
            };
        }
        if fill < w.suction_start && remote_bytes > 0 {
            self.sucking = true;
        } else if fill >= w.suction_stop || remote_bytes == 0 {
            self.sucking = false;
        }
        if self.sucking {
            return Movement::Suction {
                bytes: at(w.suction_stop).saturating_sub(used).min(remote_bytes),
            };
        }
        Movement::Idle
    }
}

/// Pages per suction batch on a node no client is using.
pub const SUCTION_BATCH_PAGES: usize = 128;
/// ...and while clients are using it: small, because a client request
/// that arrives during a batch waits for the CPU the batch takes, and how
/// long that is sets the clients' p99.
pub const SUCTION_BUSY_BATCH_PAGES: usize = 8;
/// While clients are active, suction rests this many times as long as its
/// last batch took before the next one: it takes at most a seventeenth of
/// the time, so few of the clients' requests meet a batch at all. Larger
/// batches with shorter rests raised the clients' p99 during suction
/// further above idle on the cluster benchmark; smaller ones slow suction
/// under a busy client, which matters little: pages not home yet still
/// load from donors (docs/benchmarks.md has the figures). An idle node
/// still gets full batches back to back.
pub const SUCTION_BUSY_REST_FACTOR: u32 = 16;
/// The longest rest: suction always moves.
pub const SUCTION_REST_MAX: Duration = Duration::from_millis(50);

/// How hard suction pulls. Bringing pages home is never urgent (pressure
/// has subsided; the pages load from donors meanwhile), so it gives way to
/// clients: while they store or load, small batches with rests between;
/// on a node nobody is using, full batches back to back.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SuctionPace {
    /// The store's access count when the last batch was chosen.
    seen: Option<u64>,
}

/// One suction batch: its size, and the rest to take after it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SuctionStep {
    pub pages: usize,
    /// The rest, as a multiple of the time the batch took.
    pub rest_factor: u32,
}

impl SuctionStep {
    pub fn rest(&self, batch_took: Duration) -> Duration {
        (batch_took * self.rest_factor).min(SUCTION_REST_MAX)
    }
}

impl SuctionPace {
    /// The next batch, given the store's access count now. Clients count
    /// as active if they made any access since the last batch (and, for
    /// the first batch, always: nothing says they are not).
    pub fn next(&mut self, accesses: u64) -> SuctionStep {
        let busy = self.seen.is_none_or(|seen| accesses != seen);
        self.seen = Some(accesses);
        if busy {
            SuctionStep {
                pages: SUCTION_BUSY_BATCH_PAGES,
                rest_factor: SUCTION_BUSY_REST_FACTOR,
            }
        } else {
            SuctionStep {
                pages: SUCTION_BATCH_PAGES,
                rest_factor: 0,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: u64 = 1000;

    #[test]
    fn remotify_runs_from_start_down_to_stop() {
        let w = Watermarks::default();
        let mut p = Pressure::default();
        assert_eq!(p.decide(&w, 800, CAP, 0), Movement::Idle);
        assert_eq!(p.decide(&w, 900, CAP, 0), Movement::Remotify { bytes: 150 });
        // Still above stop: keeps going even below start.
        assert_eq!(
            p.decide(&w, 800, CAP, 100),
            Movement::Remotify { bytes: 50 }
        );
        assert_eq!(p.decide(&w, 750, CAP, 150), Movement::Idle);
        assert_eq!(p.decide(&w, 800, CAP, 150), Movement::Idle);
    }

    #[test]
    fn suction_runs_from_low_up_to_its_stop_and_only_with_remote_pages() {
        let w = Watermarks::default();
        let mut p = Pressure::default();
        assert_eq!(p.decide(&w, 500, CAP, 0), Movement::Idle);
        assert_eq!(
            p.decide(&w, 500, CAP, 300),
            Movement::Suction { bytes: 200 }
        );
        assert_eq!(p.decide(&w, 650, CAP, 150), Movement::Suction { bytes: 50 });
        assert_eq!(p.decide(&w, 700, CAP, 100), Movement::Idle);
        assert_eq!(
            p.decide(&w, 650, CAP, 100),
            Movement::Idle,
            "no restart above suction_start"
        );
    }

    #[test]
    fn a_page_sucked_home_never_triggers_remotify() {
        // Walk use up and down through every level: suction never brings use
        // past its stop, which is below where remotify starts.
        let w = Watermarks::default();
        let mut p = Pressure::default();
        let mut used = 0;
        let mut remote = 2000;
        for _ in 0..100 {
            match p.decide(&w, used, CAP, remote) {
                Movement::Suction { bytes } => {
                    used += bytes;
                    remote -= bytes;
                }
                Movement::Remotify { .. } => panic!("ping-pong at {used}"),
                Movement::Idle => break,
            }
        }
        assert_eq!(used, 700);
    }

    #[test]
    fn suction_gives_way_while_clients_use_the_node() {
        let mut pace = SuctionPace::default();
        // Nothing known yet: careful.
        let first = pace.next(10);
        assert_eq!(first.pages, SUCTION_BUSY_BATCH_PAGES);
        let took = Duration::from_micros(500);
        assert_eq!(first.rest(took), took * SUCTION_BUSY_REST_FACTOR);
        // No access since: full batches, no rest.
        let idle = pace.next(10);
        assert_eq!(idle.pages, SUCTION_BATCH_PAGES);
        assert_eq!(idle.rest(took), Duration::ZERO);
        // A client came back.
        let busy = pace.next(11);
        assert_eq!(busy.pages, SUCTION_BUSY_BATCH_PAGES);
        // A slow batch never stops suction for long.
        assert_eq!(busy.rest(Duration::from_secs(1)), SUCTION_REST_MAX);
    }

    #[test]
    fn bad_watermarks_are_refused() {
        let mut w = Watermarks::default();
        assert!(w.validate().is_ok());
        w.suction_stop = 0.8;
        assert!(w.validate().is_err());
    }
}
