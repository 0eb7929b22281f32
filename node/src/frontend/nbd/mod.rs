//! The NBD front end: a stock Linux host can `nbd-client` + `swapon` into
//! the node. Each export is a frontswap persistent area with a sparse
//! backing file behind it that takes the pages the store rejects.
//!
//! - [`proto`]: the wire protocol as pure functions over buffers (fuzzable).
//! - [`export`]: an export's semantics (store, backing file, page bitmap).
//! - [`run`]: runs of an export, so that a restart never reads as zeros.
//! - [`server`]: the tokio listener and per-connection handlers.

pub mod export;
pub mod proto;
mod run;
pub mod server;

pub use export::{Export, ExportSpec, ExportStats, Exports, is_export_area};
