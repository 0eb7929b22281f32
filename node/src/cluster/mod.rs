//! The cluster: who is in it (membership) and, built on that, how pages move
//! between nodes.

pub mod membership;
