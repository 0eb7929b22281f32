//! The cluster as the admin endpoint shows it: status rows, readiness, and
//! the cluster's own metric families (donor, peers, membership).

use std::time::Duration;

use super::node::ClusterNode;
use super::status::{ClusterStatus, Liveness};
use ramster_protocol::peer::{self as wire, change_node::Action};

use crate::admin::{ChangeError, ChangeFuture, ClusterView, MemberAction};

/// The longest an operator's change waits for the leader: a Raft entry (two
/// for a removal) and perhaps an election.
pub const CHANGE_DEADLINE: Duration = Duration::from_secs(20);
use crate::admin::exposition::{Family, MetricsWriter};

static DONOR_HELD_BYTES: Family = Family::gauge(
    "ramster_donor_held_bytes",
    "Bytes of other nodes' pages this node holds (entries and their overhead).",
);
static DONOR_HELD_PAGES: Family = Family::gauge(
    "ramster_donor_held_pages",
    "Other nodes' pages this node holds.",
);
static DONOR_LIMIT_BYTES: Family = Family::gauge(
    "ramster_donor_limit_bytes",
    "Bytes new puts may fill the donation up to: --donate, or less while reclaiming.",
);
static DONOR_RECLAIM_BYTES: Family = Family::gauge(
    "ramster_donor_reclaim_bytes",
    "Bytes held for others above the limit: what owners are asked to take back.",
);
static DONOR_TOMBSTONES: Family = Family::gauge(
    "ramster_donor_tombstones",
    "Releases remembered so that a put overtaken by its release never resurrects.",
);
static PEER_UP: Family = Family::gauge(
    "ramster_peer_up",
    "1 when the member answers heartbeats (up), 0 when suspect or down.",
);
static PEER_RTT: Family = Family::gauge(
    "ramster_peer_rtt_seconds",
    "Round trip of the last heartbeat to the member.",
);
static MEMBERS: Family = Family::gauge(
    "ramster_cluster_members",
    "Members of the cluster by liveness, as this node sees them.",
);
static IS_LEADER: Family = Family::gauge(
    "ramster_raft_leader",
    "1 when this node is the Raft leader of the cluster configuration.",
);
static QUIC_DATAGRAMS: Family = Family::counter(
    "ramster_transport_datagrams_total",
    "UDP datagrams on the QUIC connection to a peer, by direction (sent, received).",
);
static QUIC_BYTES: Family = Family::counter(
    "ramster_transport_bytes_total",
    "UDP payload bytes on the QUIC connection to a peer, by direction (sent, received).",
);
static QUIC_LOST_PACKETS: Family = Family::counter(
    "ramster_transport_lost_packets_total",
    "Packets to a peer that QUIC declared lost and sent again.",
);
static QUIC_CONGESTION_EVENTS: Family = Family::counter(
    "ramster_transport_congestion_events_total",
    "Times the congestion controller cut its window on the path to a peer.",
);
static QUIC_PATH_MTU: Family = Family::gauge(
    "ramster_transport_path_mtu_bytes",
    "Largest UDP payload the path to a peer is known to carry (path-MTU discovery).",
);
static QUIC_CWND: Family = Family::gauge(
    "ramster_transport_congestion_window_bytes",
    "The congestion window on the path to a peer.",
);
static TRANSPORT_POLLS: Family = Family::counter(
    "ramster_transport_polls_total",
    "Times the transport thread polled its sockets instead of sleeping, after clients' requests (--poll-us).",
);
static TLS_CERT_EXPIRY: Family = Family::gauge(
    "ramster_tls_cert_expiry_seconds",
    "Seconds until the node certificate presented to peers expires (negative once expired); renew it and send SIGHUP, or wait for the next check of the files.",
);
static RELEASE_BACKLOG: Family = Family::gauge(
    "ramster_release_backlog_pages",
    "Donor copies waiting to be released (their donor unreachable).",
);

impl ClusterView for ClusterNode {
    fn status(&self) -> ClusterStatus {
        ClusterNode::status(self)
    }

    fn ready(&self) -> Result<(), String> {
        ClusterNode::ready(self)
    }

    fn change_member(&self, node: &str, action: MemberAction) -> ChangeFuture {
        let inner = self.inner.clone();
        let (action, force) = match action {
            MemberAction::Drain => (Action::Drain, false),
            MemberAction::Activate => (Action::Activate, false),
            MemberAction::Remove { force } => (Action::Remove, force),
            MemberAction::Replace => (Action::Replace, false),
        };
        let change = wire::ChangeNode {
            node: node.to_string(),
            action: action as i32,
            force,
        };
        Box::pin(async move {
            tokio::time::timeout(CHANGE_DEADLINE, inner.change_node(change))
                .await
                .unwrap_or_else(|_| {
                    Err(ChangeError::Unavailable(format!(
                        "no answer from the leader within {} s",
                        CHANGE_DEADLINE.as_secs()
                    )))
                })
        })
    }

    fn set_donation(&self, bytes: u64) -> Result<String, ChangeError> {
        self.inner.set_donation(bytes)
    }

    fn capacity_changed(&self) {
        self.inner.wake_movers.notify_one();
    }

    fn write_metrics(&self, out: &mut MetricsWriter) {
        if let Some(poll) = self.inner.endpoint.client_thread().poll {
            out.sample(&TRANSPORT_POLLS, &[], poll.spins());
        }
        if let Some(left) = self
            .inner
            .endpoint
            .node_key()
            .and_then(|k| k.seconds_left())
        {
            out.sample(&TLS_CERT_EXPIRY, &[], left as f64);
        }
        let donor = self.inner.donor.lock();
        let usage = donor.usage(None);
        let (limit, reclaim) = (donor.limit_bytes(), donor.reclaim_bytes());
        drop(donor);
        out.sample(&DONOR_HELD_BYTES, &[], usage.bytes);
        out.sample(&DONOR_HELD_PAGES, &[], usage.pages);
        out.sample(&DONOR_LIMIT_BYTES, &[], limit);
        out.sample(&DONOR_RECLAIM_BYTES, &[], reclaim);
        out.sample(&DONOR_TOMBSTONES, &[], usage.tombstones);
        let status = self.status();
        for n in status.nodes.iter().filter(|n| n.name != status.answered_by) {
            let up = u64::from(n.state == Liveness::Up);
            out.sample(&PEER_UP, &[("peer", &n.name)], up);
        }
        for n in status.nodes.iter().filter(|n| n.name != status.answered_by) {
            if let Some(rtt) = n.rtt_us {
                out.sample(&PEER_RTT, &[("peer", &n.name)], rtt as f64 / 1e6);
            }
        }
        for (state, label) in [
            (Liveness::Up, "up"),
            (Liveness::Suspect, "suspect"),
            (Liveness::Down, "down"),
        ] {
            let count = status.nodes.iter().filter(|n| n.state == state).count();
            out.sample(&MEMBERS, &[("state", label)], count);
        }
        let quic = self.inner.endpoint.connection_stats();
        for (peer, st) in &quic {
            out.sample(
                &QUIC_DATAGRAMS,
                &[("peer", peer), ("direction", "sent")],
                st.udp_tx.datagrams,
            );
            out.sample(
                &QUIC_DATAGRAMS,
                &[("peer", peer), ("direction", "received")],
                st.udp_rx.datagrams,
            );
        }
        for (peer, st) in &quic {
            out.sample(
                &QUIC_BYTES,
                &[("peer", peer), ("direction", "sent")],
                st.udp_tx.bytes,
            );
            out.sample(
                &QUIC_BYTES,
                &[("peer", peer), ("direction", "received")],
                st.udp_rx.bytes,
            );
        }
        for (peer, st) in &quic {
            out.sample(&QUIC_LOST_PACKETS, &[("peer", peer)], st.path.lost_packets);
        }
        for (peer, st) in &quic {
            out.sample(
                &QUIC_CONGESTION_EVENTS,
                &[("peer", peer)],
                st.path.congestion_events,
            );
        }
        for (peer, st) in &quic {
            out.sample(
                &QUIC_PATH_MTU,
                &[("peer", peer)],
                u64::from(st.path.current_mtu),
            );
        }
        for (peer, st) in &quic {
            out.sample(&QUIC_CWND, &[("peer", peer)], st.path.cwnd);
        }
        let leader = status.leader.as_deref() == Some(status.answered_by.as_str());
        out.sample(&IS_LEADER, &[], u64::from(leader));
        out.sample(
            &RELEASE_BACKLOG,
            &[],
            self.inner.release_backlog.lock().len(),
        );
    }
}
