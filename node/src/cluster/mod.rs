//! The cluster layer: how a node keeps pages on its peers.
//!
//! - [`donor`]: peers' pages held here (sans-IO).
//! - [`rpc`]: peer requests checked and applied to the donor (sans-IO).
//! - [`tls`]: the cluster CA, node certificates and the mutual-TLS configs.
//! - [`transport`]: QUIC connections between peers, page batches on
//!   long-lived streams, the serve side that feeds the donor store.

pub mod donor;
pub mod rpc;
pub mod tls;
pub mod transport;
