//! A node asked to stop hands back what it holds for others first.
//!
//! A donor that simply exits takes one copy of every page it held with it:
//! with two copies, each of those pages lives on one donor until repair
//! re-creates the other, and a second failure in that window loses it. A
//! rolling restart does exactly that, node after node. So a stopping node
//! that holds peers' pages drains itself (the same Raft change as `ramster
//! cluster drain`), waits, bounded by `--stop-drain`, until owners have
//! moved every copy off it, and only then stops. Ceph's `noout` takes the
//! other side of the same trade (skip the data movement, accept the
//! window); ramster's pages are small and in RAM, so moving them is cheap.
//!
//! A drain the node made for its own stop is undone when it starts again:
//! a marker file in the data dir says so, and the node asks to be active
//! once registered. A drain an operator asked for stays.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use ramster_protocol::peer::{self as wire, change_node::Action};

use super::membership::MemberState;
use super::node::ClusterNode;
use super::view::CHANGE_DEADLINE;
use crate::admin::ChangeError;

/// How long a stopping node waits for its copies to move, unless
/// `--stop-drain` says otherwise: moving a few hundred MiB of compressed
/// pages takes seconds, and the chart's grace period and the systemd
/// unit's stop timeout leave room for this plus the NBD grace.
pub const STOP_DRAIN_SECS_DEFAULT: u64 = 60;

/// How often the wait looks at what is still held.
const CHECK_EVERY: Duration = Duration::from_millis(200);

/// How often the wait says how far it got.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// How often a restarted node asks again to be active.
const ACTIVATE_RETRY: Duration = Duration::from_secs(1);

/// The file saying "this node drained itself when it last stopped".
pub fn marker_path(data_dir: &Path) -> PathBuf {
    data_dir.join("drained-at-stop")
}

/// How a stop's drain ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopDrain {
    /// Nothing of anyone else's was here.
    NothingHeld,
    /// Every copy moved off (`pages` were here when the drain began).
    Drained { pages: u64, took: Duration },
    /// The limit came first: `held` copies were still here.
    TimedOut { held: u64 },
    /// The cluster could not make the change (no leader, a refusal).
    NotDrained { why: String },
}

impl ClusterNode {
    /// Drains this node before it stops, waiting at most `limit`. The
    /// caller races it against a second signal.
    pub async fn drain_before_stop(&self, data_dir: &Path, limit: Duration) -> StopDrain {
        let inner = &self.inner;
        let held = || inner.donor.lock().usage(None).pages;
        let pages = held();
        if pages == 0 || limit.is_zero() {
            return StopDrain::NothingHeld;
        }
        let began = Instant::now();
        let deadline = began + limit;
        match self.own_state() {
            None => {
                return StopDrain::NotDrained {
                    why: "this node is not a member".into(),
                };
            }
            // An operator's drain: wait for it, and leave it in place.
            Some(MemberState::Draining) => {}
            Some(MemberState::Active) => {
                // The marker first: if the process dies between the two,
                // the next start still undoes a drain that took effect.
                let marker = marker_path(data_dir);
                if let Err(e) = std::fs::write(&marker, b"") {
                    return StopDrain::NotDrained {
                        why: format!("writing {}: {e}", marker.display()),
                    };
                }
                info!(held = pages, limit = ?limit, "stopping: draining first, so that every copy held here moves to another donor");
                let within = deadline.min(began + CHANGE_DEADLINE);
                if let Err(why) = self.change_own_state(Action::Drain, within).await {
                    return StopDrain::NotDrained { why };
                }
            }
        }
        let mut reported = Instant::now();
        loop {
            let now_held = held();
            if now_held == 0 {
                return StopDrain::Drained {
                    pages,
                    took: began.elapsed(),
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return StopDrain::TimedOut { held: now_held };
            }
            if now.duration_since(reported) >= REPORT_EVERY {
                info!(
                    held = now_held,
                    left = ?deadline.duration_since(now),
                    "stopping: owners are moving the copies held here"
                );
                reported = now;
            }
            tokio::time::sleep(CHECK_EVERY.min(deadline - now)).await;
        }
    }

    /// Undoes the drain this node made when it last stopped: once this run
    /// is registered, asks to be active again (retrying until the cluster
    /// answers or the node stops), then removes the marker.
    pub async fn activate_after_stop_drain(
        self,
        data_dir: PathBuf,
        mut stop: watch::Receiver<bool>,
    ) {
        let marker = marker_path(&data_dir);
        if !marker.exists() {
            return;
        }
        let inner = &self.inner;
        let mut registered = inner.registered.subscribe();
        loop {
            if *registered.borrow() {
                let done = match self.own_state() {
                    Some(MemberState::Draining) => {
                        let within = Instant::now() + CHANGE_DEADLINE;
                        match self.change_own_state(Action::Activate, within).await {
                            Ok(()) => {
                                info!(
                                    "active again: this node drained itself when it last stopped"
                                );
                                true
                            }
                            Err(e) => {
                                warn!(error = %e, "asking to be active again after the stop's drain");
                                false
                            }
                        }
                    }
                    // Active already (an operator, or a removal and a new
                    // registration): nothing of ours to undo.
                    Some(MemberState::Active) => true,
                    None => false,
                };
                if done {
                    if let Err(e) = std::fs::remove_file(&marker) {
                        warn!(error = %e, marker = %marker.display(), "removing the stop-drain marker");
                    }
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(ACTIVATE_RETRY) => {}
                    _ = stop.changed() => return,
                }
            } else {
                tokio::select! {
                    r = registered.changed() => if r.is_err() { return },
                    _ = stop.changed() => return,
                }
            }
        }
    }

    /// This run's member state in the configuration; `None` if not a member.
    fn own_state(&self) -> Option<MemberState> {
        let inner = &self.inner;
        inner
            .membership()
            .config()
            .nodes
            .get(&inner.id)
            .map(|n| n.state)
    }

    /// Asks the leader to drain or activate this node, waiting no later
    /// than `within`; why not, if it was not done.
    async fn change_own_state(&self, action: Action, within: Instant) -> Result<(), String> {
        let change = wire::ChangeNode {
            node: self.inner.name.clone(),
            action: action as i32,
            force: false,
        };
        match tokio::time::timeout_at(within, self.inner.change_node(change)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(ChangeError::Refused(why) | ChangeError::Unavailable(why))) => Err(why),
            Err(_) => Err("no answer from the leader".into()),
        }
    }
}
