//! The ramster native API on the wire: protobuf messages (generated from
//! `proto/`), length-delimited framing with an explicit size limit, the
//! version handshake, the peer protocol between nodes, and the limits both
//! sides enforce.
//!
//! There are no sockets here: every function works on byte buffers, so the
//! decoders can be tested and fuzzed on plain slices. The `io` feature adds
//! the `io` module: reading and writing frames on any tokio byte stream, shared by
//! the node and `ramster-client`.

pub mod frame;
pub mod handshake;
#[cfg(feature = "io")]
pub mod io;
pub mod peer_handshake;
pub mod shape;

/// Generated protobuf types of the client API, version 1.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/ramster.v1.rs"));
}

/// Generated protobuf types of the peer protocol (owner ↔ donor), version 1.
pub mod peer {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/ramster.peer.v1.rs"));
}

/// A page, as frontswap defines it. Anything else is rejected.
pub const PAGE_BYTES: usize = 4096;

/// Most ops in one request. Bounds the work one frame can ask for.
pub const BATCH_OPS_MAX: usize = 1024;

/// Largest frame either side accepts: a full batch of pages plus encoding
/// overhead (tags, lengths, keys: well under 64 bytes per op).
pub const FRAME_BYTES_MAX: usize = BATCH_OPS_MAX * (PAGE_BYTES + 64) + 64 * 1024;

/// Most pages in one peer batch (put, get or release). A full batch of
/// uncompressed pages still fits in [`FRAME_BYTES_MAX`].
pub const PEER_BATCH_PAGES_MAX: usize = BATCH_OPS_MAX;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Oldest protocol version this build still speaks.
pub const PROTOCOL_VERSION_MIN: u32 = 1;
