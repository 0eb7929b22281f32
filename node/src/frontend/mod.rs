//! Front ends: the frontswap and cleancache contracts on top of the page
//! store, and the ways clients reach them (the native API).
//!
//! [`Frontend`] is where the contract of DESIGN §1 is kept exactly; the
//! native API server and other front ends only translate to it.

pub mod api;
pub mod cleancache;
pub mod counters;
pub mod frontswap;
pub mod nbd;
pub mod order;

use std::sync::{Arc, OnceLock};

use crate::store::{PAGE_BYTES, Page, PageStore, REPLICAS_MAX, RejectReason, RemoteRef};

pub use cleancache::PoolId;
pub use counters::Counters;
pub use frontswap::AreaId;

/// Why a store was refused: the contract's reasons.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reject {
    NoCapacity,
    Incompressible,
    Quota,
    AreaInvalidated,
    Unavailable,
}

impl From<RejectReason> for Reject {
    fn from(r: RejectReason) -> Self {
        match r {
            RejectReason::NoCapacity => Reject::NoCapacity,
            RejectReason::Incompressible => Reject::Incompressible,
        }
    }
}

impl Reject {
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::NoCapacity => "no_capacity",
            Reject::Incompressible => "incompressible",
            Reject::Quota => "quota",
            Reject::AreaInvalidated => "area_invalidated",
            Reject::Unavailable => "unavailable",
        }
    }
}

/// The answer to a frontswap store or a cleancache put.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum StoreResult {
    Accepted,
    Rejected(Reject),
}

/// The answer to a load or get. Never wrong bytes: a page whose checksum
/// fails is `Corrupt`, not data.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LoadResult {
    Hit,
    NotFound,
    Unavailable,
    Corrupt,
}

/// An op the front end cannot carry out because it is wrong, not refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum OpError {
    #[error("page is {0} bytes; pages are exactly {PAGE_BYTES} bytes")]
    PageSize(usize),
    #[error("area {0} does not exist (init it first)")]
    UnknownArea(u32),
    #[error("area id {0} is out of range (0..2^31)")]
    AreaOutOfRange(u32),
    #[error("pool {0} does not exist")]
    UnknownPool(u32),
    #[error(
        "replicas {0}: an area's pages have 1..={REPLICAS_MAX} copies on donors (0: the node's default)"
    )]
    Replicas(u32),
}

/// Whether the calling thread may block waiting on donors: not if it is a
/// current-thread runtime's (the transport's), whose own tasks would wait
/// behind it, and where tokio refuses to block with a panic.
pub fn may_block_here() -> bool {
    !tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
}

/// Borrows a client's bytes as a page, or says why they are not one.
pub fn as_page(bytes: &[u8]) -> Result<&Page, OpError> {
    bytes.try_into().map_err(|_| OpError::PageSize(bytes.len()))
}

/// A fetch of remote pages in progress.
pub type Fetch<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Vec<LoadResult>> + Send + 'a>>;

/// How the front end reaches the cluster: pages held on donors, and room
/// made by remotify. [`wait`](Self::wait), [`make_room`](Self::make_room)
/// and [`bring_home`](Self::bring_home) block the calling thread (the front
/// end is synchronous); implementations bound every wait. A thread that
/// must not block (a current-thread runtime's) does not call them: there
/// they come to nothing at once, as if every wait had timed out.
pub trait RemotePages: Send + Sync {
    /// Fetches pages the store holds on donors into `outs` (one buffer per
    /// ref), each checked against its checksum: `Hit`, `Unavailable` (no
    /// replica answered) or `Corrupt` (every copy failed its checksum).
    fn fetch_many<'a, 'b: 'a>(
        &'a self,
        remotes: &'a [RemoteRef],
        outs: &'a mut [&'b mut Page],
    ) -> Fetch<'a>;

    /// Runs a fetch to completion from synchronous code. A page it has no
    /// result for stays `Unavailable`.
    fn wait(&self, fetch: Fetch<'_>) -> Vec<LoadResult>;

    /// The store refused a persistent page for lack of room: waits, for a
    /// bounded time, for remotify to free some. `true` if a retry may now
    /// succeed.
    fn make_room(&self) -> bool;

    /// Pulls up to `max` pages of `space` held on donors back into the
    /// store (frontswap_shrink reaches them this way); the number brought
    /// home.
    fn bring_home(&self, space: u32, max: usize) -> usize;

    /// The thread that receives donors' answers, where API clients are
    /// served (see [`ClientThread`]).
    fn client_thread(&self) -> Option<ClientThread> {
        None
    }
}

/// Where a cluster node serves its API clients: the transport's thread,
/// where donors' answers arrive. A client's load that waits on donors then
/// finishes, and writes its answer, on the thread the answer came in on,
/// and reaches the donors from the thread that read it, without waking
/// another thread on the way.
#[derive(Clone, Debug)]
pub struct ClientThread {
    pub runtime: tokio::runtime::Handle,
    /// Touched by each client request so that the thread polls for the
    /// donors' answers and the client's next request instead of sleeping;
    /// `None` if it never polls.
    pub poll: Option<Arc<crate::poll::PollWindow>>,
}

/// The contract, on one node: frontswap areas and cleancache pools over one
/// page store.
pub struct Frontend {
    name: String,
    store: Arc<PageStore>,
    areas: frontswap::Areas,
    pools: cleancache::Pools,
    counters: Counters,
    remote: OnceLock<Arc<dyn RemotePages>>,
}

impl Frontend {
    pub fn new(name: impl Into<String>, store: Arc<PageStore>) -> Self {
        Frontend {
            name: name.into(),
            store,
            areas: Default::default(),
            pools: Default::default(),
            counters: Counters::default(),
            remote: OnceLock::new(),
        }
    }

    /// Connects the front end to the cluster (once).
    pub fn set_remote(&self, remote: Arc<dyn RemotePages>) {
        let _ = self.remote.set(remote);
    }

    pub(crate) fn remote(&self) -> Option<&Arc<dyn RemotePages>> {
        self.remote.get()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn store(&self) -> &PageStore {
        &self.store
    }

    /// Node-wide counters (all areas and pools).
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

#[cfg(test)]
mod tests;
