//! A ramster node: a compressed page store (the zcache part), the frontswap
//! and cleancache contracts on top of it, and the native API through which
//! clients reach them.

pub mod accept;
pub mod admin;
pub mod cli;
pub mod cluster;
pub mod frontend;
pub mod metrics;
pub mod poll;
pub mod store;
#[cfg(test)]
mod tidy;
