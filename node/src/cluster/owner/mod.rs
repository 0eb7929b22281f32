//! The owner core: what an owner decides about its pages on donors, kept
//! apart from how the node carries it out. One file per concern:
//! [`remotify`] (what a shipped batch settles to), [`repair`] (lost copies
//! re-created), [`reclaim`] (copies a donor wants back), [`fetch`] (a
//! remote load's plan), [`audit`] (anti-entropy: copies no one wants).
//!
//! It is sans-IO: plain synchronous functions and state over the store's
//! descriptors, with the time passed in and no socket, runtime or clock
//! read here. The node's movers and the deterministic simulator then run
//! the same decisions, one over peer sessions and the other over a
//! simulated network, and a test of a decision needs no cluster. A tidy
//! test (`crate::tidy`) keeps runtimes, clock reads and sockets out.
//!
//! Today it holds the decisions the async glue (`super::movers`,
//! `super::repair`, `super::node`) used to keep among its awaits. It is
//! being grown into one state machine, fed events (a page leaves the store,
//! a load needs remote copies, a donor answered, a donor's liveness
//! changed, a tick, each with `now`) and drained of commands (put, get or
//! release on donor X; complete load N), with the glue left as a thin
//! driver of those commands; suction and releases join it then.

pub mod audit;
pub mod fetch;
pub mod reclaim;
pub mod remotify;
pub mod repair;
