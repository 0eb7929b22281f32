//! What `ramster status` shows: the cluster as one node sees it, from the
//! replicated configuration (who is a member) and heartbeats (who is alive,
//! how full). Plain data, serialised as the admin endpoint's `/v1/status`.

use serde::{Deserialize, Serialize};

use super::membership::{MemberState, Role};

/// Liveness of a node, by heartbeats.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Liveness {
    Up,
    /// Missed heartbeats for a while; not chosen for new pages.
    Suspect,
    /// Silent past the down timeout (or never heard from).
    Down,
}

/// One row of the status table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub id: u64,
    /// Advertised peer address (QUIC).
    pub address: String,
    pub role: Role,
    /// Active or draining (operators' lifecycle).
    pub member_state: MemberState,
    pub state: Liveness,
    /// leader / follower / candidate / learner / unknown.
    pub raft_role: String,
    pub incarnation: u64,
    pub capacity_bytes: u64,
    /// Bytes of the node's own page store in use.
    pub used_bytes: u64,
    /// Most bytes the node holds for other owners.
    pub donate_bytes: u64,
    /// Bytes of other owners' pages it holds now.
    pub held_for_others_bytes: u64,
    /// Other owners' pages it holds now (a drained node: 0).
    #[serde(default)]
    pub held_for_others_pages: u64,
    /// The node's own pages kept on donors.
    pub own_pages_on_peers: u64,
    pub own_bytes_on_peers: u64,
    /// Pages the node's store holds (local and remote).
    pub stored_pages: u64,
    /// The node's own pages on donors with fewer copies than wanted,
    /// those with no copy left included.
    #[serde(default)]
    pub degraded_pages: u64,
    /// The node's own pages with no copy left anywhere: loads of them
    /// answer `unavailable`.
    #[serde(default)]
    pub unrecoverable_pages: u64,
    /// Uncompressed bytes over the bytes used for them; 0 when empty.
    pub compression_ratio: f64,
    /// Round trip from the answering node; `None` for itself or unknown.
    pub rtt_us: Option<u64>,
    /// Milliseconds since the last heartbeat; `None` for itself or never.
    pub last_seen_ms: Option<u64>,
    pub version: String,
}

/// HEALTH_OK / HEALTH_WARN / HEALTH_ERR, as Ceph says it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum HealthLevel {
    #[serde(rename = "HEALTH_OK")]
    Ok,
    #[serde(rename = "HEALTH_WARN")]
    Warn,
    #[serde(rename = "HEALTH_ERR")]
    Err,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub status: HealthLevel,
    /// Why it is not OK, one line each.
    pub reasons: Vec<String>,
}

/// The whole answer of `/v1/status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster_id: String,
    /// The node that answered.
    pub answered_by: String,
    pub leader: Option<String>,
    pub health: Health,
    pub nodes_up: usize,
    pub nodes_total: usize,
    pub memory_servers: usize,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub held_for_others_bytes: u64,
    pub remote_bytes: u64,
    pub nodes: Vec<NodeStatus>,
}

/// A node using at least this share of its capacity is reported (WARN):
/// past it, stores start to be refused or to wait for remotify.
pub const FULL_WARN_PERMILLE: u64 = 900;

impl HealthLevel {
    /// As it is serialised: HEALTH_OK, HEALTH_WARN, HEALTH_ERR.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthLevel::Ok => "HEALTH_OK",
            HealthLevel::Warn => "HEALTH_WARN",
            HealthLevel::Err => "HEALTH_ERR",
        }
    }
}

impl Health {
    pub fn ok() -> Health {
        Health {
            status: HealthLevel::Ok,
            reasons: Vec::new(),
        }
    }

    pub fn err(reason: String) -> Health {
        Health {
            status: HealthLevel::Err,
            reasons: vec![reason],
        }
    }
}

impl NodeStatus {
    /// "last seen 5.2 s ago", or "never seen".
    fn last_seen(&self) -> String {
        match self.last_seen_ms {
            Some(ms) => format!("last seen {:.1} s ago", ms as f64 / 1000.0),
            None => "never seen".to_string(),
        }
    }
}

/// How far a drain has come, as one status answer shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DrainProgress {
    /// Draining, holds no peer's page, and no page is short of copies.
    Drained,
    /// Not yet; `held` is the drained node's pages for others as last
    /// reported (`None` until a report made after the drain began).
    Pending { held: Option<u64>, why: String },
}

impl ClusterStatus {
    /// Whether `node` is drained, judged only from rows reported after the
    /// drain began `since` ago: a heartbeat from before it (or none at all,
    /// which reads as zero pages) would call a node drained that has not
    /// moved a page. The answering node's own row is always current.
    pub fn drain_progress(
        &self,
        node: &str,
        since: std::time::Duration,
    ) -> Result<DrainProgress, String> {
        let row = self
            .nodes
            .iter()
            .find(|n| n.name == node)
            .ok_or_else(|| format!("no member is named {node:?}"))?;
        let since_ms = u64::try_from(since.as_millis()).unwrap_or(u64::MAX);
        let current = |n: &NodeStatus| {
            n.name == self.answered_by || n.last_seen_ms.is_some_and(|ms| ms < since_ms)
        };
        if !current(row) {
            return Ok(DrainProgress::Pending {
                held: None,
                why: format!(
                    "{} has sent {} no report since the drain began ({})",
                    node,
                    self.answered_by,
                    row.last_seen()
                ),
            });
        }
        let held = row.held_for_others_pages;
        if row.member_state != MemberState::Draining {
            return Ok(DrainProgress::Pending {
                held: Some(held),
                why: format!("{node} is {:?}", row.member_state),
            });
        }
        // A node that is down reports nothing; the others must be current,
        // since their counts of pages short of copies are what says the
        // copies were re-created rather than only released.
        let stale: Vec<&str> = self
            .nodes
            .iter()
            .filter(|n| n.state != Liveness::Down && !current(n))
            .map(|n| n.name.as_str())
            .collect();
        let short: u64 = self
            .nodes
            .iter()
            .map(|n| n.degraded_pages.saturating_sub(n.unrecoverable_pages))
            .sum();
        if held == 0 && short == 0 && stale.is_empty() {
            return Ok(DrainProgress::Drained);
        }
        let mut why = format!(
            "{node} holds {held} peers' pages; {short} pages in the cluster are short of copies"
        );
        if !stale.is_empty() {
            why.push_str(&format!(
                "; no report since the drain began from {}",
                stale.join(", ")
            ));
        }
        Ok(DrainProgress::Pending {
            held: Some(held),
            why,
        })
    }

    /// Whether the cluster, as the answering node sees it, has every page
    /// at its wanted copies: what readiness waits for, so that a rolling
    /// restart takes the next node only once the copies the last one
    /// lost are re-created. Pages with no copy left are not waited for
    /// (nothing will bring them back; health reports them).
    ///
    /// A node that has just started has heard from nobody (a row never
    /// heard from reads as no pages short), and the owners whose copies
    /// its restart lost count them only once they have heard it is a new
    /// run: for `down_after`, the time after which a silent member counts
    /// as down, it is not settled, whatever the rows say.
    pub fn settled(
        &self,
        up_for: std::time::Duration,
        down_after: std::time::Duration,
    ) -> Result<(), String> {
        if up_for < down_after {
            return Err(format!(
                "started {:.1} s ago; waiting {:.1} s for every member's report",
                up_for.as_secs_f64(),
                down_after.as_secs_f64()
            ));
        }
        let short: u64 = self
            .nodes
            .iter()
            .map(|n| n.degraded_pages.saturating_sub(n.unrecoverable_pages))
            .sum();
        if short > 0 {
            return Err(format!(
                "{short} pages in the cluster are short of copies (being repaired)"
            ));
        }
        Ok(())
    }

    /// The rows as one node sees them, with `health` what that node knows
    /// of itself; the totals are zero until [`Self::assess`] fills them and
    /// judges the rows.
    pub fn new(
        cluster_id: String,
        answered_by: String,
        leader: Option<String>,
        health: Health,
        nodes: Vec<NodeStatus>,
    ) -> ClusterStatus {
        ClusterStatus {
            cluster_id,
            answered_by,
            leader,
            health,
            nodes_up: 0,
            nodes_total: 0,
            memory_servers: 0,
            capacity_bytes: 0,
            used_bytes: 0,
            held_for_others_bytes: 0,
            remote_bytes: 0,
            nodes,
        }
    }

    /// Fills the totals and the health from the rows, so that every answer
    /// (a cluster's or a standalone node's) is judged by the same rules.
    ///
    /// HEALTH_ERR: no leader known in a cluster of more than one node, fewer
    /// than a majority of nodes up (suspect ones count as up here), any
    /// node down, any page with no copy left. HEALTH_WARN: a node
    /// suspect, a node at least [`FULL_WARN_PERMILLE`] full, a member
    /// draining, any page with fewer copies than wanted (redundancy lost,
    /// repair running). Reasons list errors first, one human line each.
    pub fn assess(&mut self) {
        let nodes = &self.nodes;
        self.nodes_total = nodes.len();
        self.nodes_up = nodes.iter().filter(|n| n.state == Liveness::Up).count();
        self.memory_servers = nodes
            .iter()
            .filter(|n| n.role == Role::MemoryServer)
            .count();
        self.capacity_bytes = nodes.iter().map(|n| n.capacity_bytes).sum();
        self.used_bytes = nodes.iter().map(|n| n.used_bytes).sum();
        self.held_for_others_bytes = nodes.iter().map(|n| n.held_for_others_bytes).sum();
        self.remote_bytes = nodes.iter().map(|n| n.own_bytes_on_peers).sum();

        // Errors the cluster layer reported itself (not a member yet) stay.
        let mut errors = if self.health.status == HealthLevel::Err {
            std::mem::take(&mut self.health.reasons)
        } else {
            Vec::new()
        };
        let mut warnings = Vec::new();
        if self.nodes_total > 1 && self.leader.is_none() {
            errors.push(format!("no leader is known ({} nodes)", self.nodes_total));
        }
        // A suspect node has only missed a few heartbeats: it still counts
        // towards the majority; a down one does not.
        let majority = self.nodes_total / 2 + 1;
        let down = nodes.iter().filter(|n| n.state == Liveness::Down).count();
        if self.nodes_total - down < majority {
            errors.push(format!(
                "{down} of {} nodes are down; a majority ({majority}) must be up",
                self.nodes_total
            ));
        }
        for n in nodes {
            match n.state {
                Liveness::Up => {}
                Liveness::Suspect => {
                    warnings.push(format!("node {} is suspect ({})", n.name, n.last_seen()))
                }
                Liveness::Down => {
                    errors.push(format!("node {} is down ({})", n.name, n.last_seen()))
                }
            }
            if n.capacity_bytes > 0
                && u128::from(n.used_bytes) * 1000
                    >= u128::from(n.capacity_bytes) * u128::from(FULL_WARN_PERMILLE)
            {
                warnings.push(format!(
                    "node {} uses {}% of its capacity",
                    n.name,
                    u128::from(n.used_bytes) * 100 / u128::from(n.capacity_bytes)
                ));
            }
            if n.unrecoverable_pages > 0 {
                errors.push(format!(
                    "node {} has {} pages whose every copy is lost",
                    n.name, n.unrecoverable_pages
                ));
            }
            let short = n.degraded_pages.saturating_sub(n.unrecoverable_pages);
            if short > 0 {
                warnings.push(format!(
                    "node {} has {short} pages with fewer copies than wanted (being repaired)",
                    n.name
                ));
            }
            if n.member_state == MemberState::Draining {
                warnings.push(if n.held_for_others_pages == 0 {
                    format!(
                        "node {} is drained (holds no peer's pages); `ramster cluster remove {}` takes it out",
                        n.name, n.name
                    )
                } else {
                    format!("node {} is draining", n.name)
                });
            }
        }
        let status = if !errors.is_empty() {
            HealthLevel::Err
        } else if !warnings.is_empty() {
            HealthLevel::Warn
        } else {
            HealthLevel::Ok
        };
        errors.append(&mut warnings);
        self.health = Health {
            status,
            reasons: errors,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeStatus {
        NodeStatus {
            name: name.into(),
            id: 1,
            address: format!("{name}:7800"),
            role: Role::Peer,
            member_state: MemberState::Active,
            state: Liveness::Up,
            raft_role: "follower".into(),
            incarnation: 1,
            capacity_bytes: 1000,
            used_bytes: 100,
            donate_bytes: 500,
            held_for_others_bytes: 50,
            held_for_others_pages: 0,
            own_pages_on_peers: 2,
            own_bytes_on_peers: 20,
            stored_pages: 10,
            degraded_pages: 0,
            unrecoverable_pages: 0,
            compression_ratio: 2.0,
            rtt_us: Some(300),
            last_seen_ms: Some(200),
            version: "0.1.0".into(),
        }
    }

    fn cluster(nodes: Vec<NodeStatus>) -> ClusterStatus {
        let mut s = ClusterStatus::new(
            "c".into(),
            "a".into(),
            Some("a".into()),
            Health::ok(),
            nodes,
        );
        s.assess();
        s
    }

    #[test]
    fn settled_waits_for_reports_and_for_repair() {
        use std::time::Duration;
        let down_after = Duration::from_secs(3);
        let mut s = cluster(vec![node("a"), node("b"), node("c")]);
        assert_eq!(s.settled(down_after, down_after), Ok(()));
        // Just started: nobody's report can be trusted to count its restart.
        s.nodes[1].last_seen_ms = None;
        let e = s.settled(Duration::from_secs(1), down_after).unwrap_err();
        assert!(e.contains("started 1.0 s ago"), "{e}");
        // Up for longer than it takes to call a silent node down.
        assert_eq!(s.settled(down_after, down_after), Ok(()));
        // Pages short of copies anywhere: not settled until repaired.
        s.nodes[2].degraded_pages = 5;
        let e = s.settled(down_after, down_after).unwrap_err();
        assert!(e.contains("5 pages"), "{e}");
        // Pages with no copy left are reported by health, not waited for.
        s.nodes[2].unrecoverable_pages = 5;
        assert_eq!(s.settled(down_after, down_after), Ok(()));
    }

    #[test]
    fn a_drain_is_judged_only_on_reports_made_after_it_began() {
        use std::time::Duration;
        let mut memsrv = node("m");
        memsrv.member_state = MemberState::Draining;
        // Never heard from by the node answering: the row says 0 pages,
        // which is no news at all.
        memsrv.last_seen_ms = None;
        let mut s = cluster(vec![node("a"), memsrv.clone(), node("b")]);
        let since = Duration::from_millis(1_000);
        assert!(matches!(
            s.drain_progress("m", since),
            Ok(DrainProgress::Pending { held: None, .. })
        ));
        // Heard from, but before the drain began.
        s.nodes[1].last_seen_ms = Some(1_500);
        assert!(matches!(
            s.drain_progress("m", since),
            Ok(DrainProgress::Pending { held: None, .. })
        ));
        // A report after it: drained once the other nodes are current too.
        s.nodes[1].last_seen_ms = Some(100);
        s.nodes[2].last_seen_ms = Some(4_000);
        let Ok(DrainProgress::Pending { held: Some(0), why }) = s.drain_progress("m", since) else {
            panic!("a stale row counted");
        };
        assert!(why.contains("from b"), "{why}");
        // A node that is down reports nothing and holds nothing up.
        s.nodes[2].state = Liveness::Down;
        assert_eq!(s.drain_progress("m", since), Ok(DrainProgress::Drained));
        // Pages still held, or pages short of copies, are not drained.
        s.nodes[1].held_for_others_pages = 7;
        assert!(matches!(
            s.drain_progress("m", since),
            Ok(DrainProgress::Pending { held: Some(7), .. })
        ));
        s.nodes[1].held_for_others_pages = 0;
        s.nodes[0].degraded_pages = 3;
        assert!(matches!(
            s.drain_progress("m", since),
            Ok(DrainProgress::Pending { held: Some(0), .. })
        ));
        // The answering node's own row is always current.
        s.nodes[0].degraded_pages = 0;
        s.nodes[1].last_seen_ms = None;
        s.answered_by = "m".into();
        assert_eq!(s.drain_progress("m", since), Ok(DrainProgress::Drained));
        assert!(s.drain_progress("x", since).is_err());
    }

    #[test]
    fn a_healthy_cluster_is_ok_and_totals_add_up() {
        let mut ms = node("m");
        ms.role = Role::MemoryServer;
        let s = cluster(vec![node("a"), node("b"), ms]);
        assert_eq!(s.health, Health::ok());
        assert_eq!((s.nodes_up, s.nodes_total, s.memory_servers), (3, 3, 1));
        assert_eq!(s.capacity_bytes, 3000);
        assert_eq!(s.used_bytes, 300);
        assert_eq!(s.held_for_others_bytes, 150);
        assert_eq!(s.remote_bytes, 60);
    }

    #[test]
    fn a_single_node_needs_no_leader() {
        let mut s = cluster(vec![node("a")]);
        assert_eq!(s.health.status, HealthLevel::Ok);
        s.leader = None;
        s.assess();
        assert_eq!(s.health.status, HealthLevel::Ok);
    }

    #[test]
    fn no_leader_or_a_node_down_is_an_error() {
        let mut s = cluster(vec![node("a"), node("b")]);
        s.leader = None;
        s.assess();
        assert_eq!(s.health.status, HealthLevel::Err);
        assert_eq!(s.health.reasons, ["no leader is known (2 nodes)"]);

        let mut down = node("b");
        down.state = Liveness::Down;
        down.last_seen_ms = Some(5_200);
        let mut never = node("c");
        never.state = Liveness::Down;
        never.last_seen_ms = None;
        let s = cluster(vec![node("a"), down, never]);
        assert_eq!(s.health.status, HealthLevel::Err);
        assert_eq!(
            s.health.reasons,
            [
                "2 of 3 nodes are down; a majority (2) must be up",
                "node b is down (last seen 5.2 s ago)",
                "node c is down (never seen)",
            ]
        );
    }

    #[test]
    fn suspect_full_and_draining_nodes_are_warnings_listed_after_errors() {
        let mut suspect = node("b");
        suspect.state = Liveness::Suspect;
        suspect.last_seen_ms = Some(2_100);
        let mut full = node("c");
        full.used_bytes = 900; // exactly 90%
        let mut draining = node("d");
        draining.member_state = MemberState::Draining;
        draining.held_for_others_pages = 1;
        let mut drained = node("f");
        drained.member_state = MemberState::Draining;
        let s = cluster(vec![node("a"), suspect.clone(), full, draining, drained]);
        assert_eq!(s.health.status, HealthLevel::Warn);
        assert_eq!(s.nodes_up, 4);
        assert_eq!(
            s.health.reasons,
            [
                "node b is suspect (last seen 2.1 s ago)",
                "node c uses 90% of its capacity",
                "node d is draining",
                "node f is drained (holds no peer's pages); `ramster cluster remove f` takes it out",
            ]
        );

        let mut down = node("e");
        down.state = Liveness::Down;
        let s = cluster(vec![node("a"), suspect, down]);
        assert_eq!(s.health.status, HealthLevel::Err);
        assert_eq!(
            s.health.reasons,
            [
                "node e is down (last seen 0.2 s ago)",
                "node b is suspect (last seen 2.1 s ago)",
            ]
        );
    }

    #[test]
    fn pages_short_of_copies_warn_and_pages_without_one_are_an_error() {
        let mut degraded = node("a");
        degraded.degraded_pages = 7;
        let s = cluster(vec![degraded.clone(), node("b")]);
        assert_eq!(s.health.status, HealthLevel::Warn);
        assert_eq!(
            s.health.reasons,
            ["node a has 7 pages with fewer copies than wanted (being repaired)"]
        );

        // Two of the seven have no copy left: those are lost, the other
        // five are still being repaired.
        degraded.unrecoverable_pages = 2;
        let s = cluster(vec![degraded, node("b")]);
        assert_eq!(s.health.status, HealthLevel::Err);
        assert_eq!(
            s.health.reasons,
            [
                "node a has 2 pages whose every copy is lost",
                "node a has 5 pages with fewer copies than wanted (being repaired)",
            ]
        );
    }

    #[test]
    fn just_under_the_full_mark_is_fine() {
        let mut n = node("a");
        n.used_bytes = 899;
        assert_eq!(cluster(vec![n]).health.status, HealthLevel::Ok);
    }

    #[test]
    fn health_levels_serialise_as_ceph_says_them() {
        let s = cluster(vec![node("a")]);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["health"]["status"], "HEALTH_OK");
        for level in [HealthLevel::Ok, HealthLevel::Warn, HealthLevel::Err] {
            assert_eq!(serde_json::to_value(level).unwrap(), level.as_str());
        }
        assert_eq!(json["nodes"][0]["state"], "up");
        let back: ClusterStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
    }
}
