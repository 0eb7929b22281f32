//! The cluster layer: how a node keeps pages on its peers.
//!
//! - [`membership`]: who is in the cluster (openraft), persisted.
//! - [`watermarks`]: when pages move; [`placement`]: where they go.
//! - [`pressure`]: what the host says about memory (cgroups, PSI).
//! - [`donor`]: peers' pages held here (sans-IO); [`reclaim`]: how much of
//!   them a donor keeps when it needs memory back.
//! - [`owner`]: what an owner decides about its pages on donors (sans-IO);
//!   [`movers`], [`repair`] and [`node`] carry it out.
//! - [`rpc`]: peer requests checked and applied to the donor (sans-IO).
//! - [`stopping`]: a stopping node hands back what it holds for others.
//! - [`tls`]: the cluster CA, node certificates and the mutual-TLS configs.
//! - [`transport`]: QUIC connections between peers, page batches on
//!   long-lived streams, the serve side that feeds the donor store.

pub mod donor;
pub mod liveness;
pub mod membership;
pub mod movers;
mod net_thread;
pub mod node;
pub mod owner;
pub mod placement;
pub mod pressure;
pub mod reclaim;
pub mod repair;
pub mod rpc;
#[cfg(test)]
mod sim;
pub mod status;
pub mod stopping;
pub mod tls;
pub mod transport;
pub mod view;
pub mod watermarks;

/// An instant for tests of the sans-IO cores to count from: the cores read
/// no clock, so a test hands them this plus whatever time it plays out.
#[cfg(test)]
pub(crate) fn test_epoch() -> std::time::Instant {
    std::time::Instant::now()
}
