//! The client of a ramster node's native API.
//!
//! ramster is cluster memory for swap, after Linux's frontswap, zcache and
//! RAMster: a node keeps 4 KiB pages compressed in its own RAM under the
//! frontswap/cleancache contract, and ships the coldest of them to peers
//! with spare RAM, bringing them home when pressure subsides. This crate
//! speaks the node's native API: [`Client`] is async and pipelined,
//! [`BlockingClient`] wraps it for callers without a runtime.
//!
//! The contract in full, and what one connection may hold, is
//! `docs/contract.md` in the ramster repository; the messages are
//! `protocol/proto/ramster/v1/client.proto` ([`v1`] here). What follows is
//! that contract as a client meets it.
//!
//! # Connecting
//!
//! A node serves the API on a Unix socket: `DATA_DIR/api.sock` unless the
//! node was started with `--api-socket PATH` (or `RAMSTER_API_SOCKET`, or
//! `api-socket` in its configuration file). [`Client::connect`] opens it
//! and does the version handshake; [`Client::welcome`] then names the node
//! and the limits it enforces (`max_frame_bytes`, `max_batch_ops`,
//! `page_bytes`).
//!
//! ```no_run
//! use bytes::Bytes;
//! use ramster_client::{Client, PAGE_BYTES, v1::Status};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::connect("/var/lib/ramster/api.sock".as_ref()).await?;
//! client.init_area(7, false).await?;
//! let page = Bytes::from(vec![0x5a; PAGE_BYTES]);
//! match client.store_pages(7, &[(0, page.clone())]).await?[0] {
//!     // Accepted: the node holds it until it is invalidated.
//!     Status::Ok => assert_eq!(client.load_pages(7, &[0]).await?[0], Ok(page)),
//!     // Refused: the page is still the caller's to keep.
//!     refused => eprintln!("store refused: {refused:?}"),
//! }
//! client.invalidate_pages(7, &[0]).await?;
//! # Ok(())
//! # }
//! ```
//!
//! `examples/store_load.rs` is the same against a running node.
//!
//! # The frontswap rules
//!
//! An area holds pages by offset (frontswap: a swap device's slots):
//!
//! - [`init_area`](Client::init_area) (re)creates the area empty, whatever
//!   it held. Pick an area that no other client uses.
//! - **A store may be refused**, for any reason: `REJECTED_NO_CAPACITY`,
//!   `REJECTED_INCOMPRESSIBLE`, `REJECTED_QUOTA`, `REJECTED_UNAVAILABLE`,
//!   `REJECTED_AREA_INVALIDATED`. A refusal is a [`v1::Status`] in the
//!   results, not an error: the page stays the caller's, who must keep it
//!   (the kernel writes it to its real swap device) and not load it from
//!   the node.
//! - **An accepted page (`OK`) loads back byte-identical** until it is
//!   invalidated, or its area invalidated or initialised again; wherever
//!   the node moved it meanwhile (to donors and back). A load never returns
//!   wrong bytes: a copy that fails its checksum is `CORRUPT`.
//! - **A store that is not accepted drops the offset's old page**: a
//!   refused store over a page, and one that fails (a page of the wrong
//!   size), leave the offset empty (`NOT_FOUND`), never holding the old
//!   bytes. Only the page of the last accepted store can come back.
//! - [`invalidate_pages`](Client::invalidate_pages) drops pages (a later
//!   load misses); [`invalidate_area`](Client::invalidate_area) drops every
//!   page of the area and refuses its stores until the next init.
//! - A writethrough area (`init_area(area, true)`) is a cache: its client
//!   keeps its own copy of every page, so the node may drop pages under
//!   pressure and answer `NOT_FOUND` for a page it accepted.
//! - Shrink (frontswap_shrink) and the cleancache pools (`NewPool`, `Put`,
//!   `Get`, ...) go through [`Client::call`] with [`op`]; a cleancache put
//!   may be `DROPPED`, a private pool's get hands the page over.
//!
//! # Batching and pipelining
//!
//! Every request is a batch: its ops run in order and answer one result
//! each, in order. A request has at most `max_batch_ops`
//! ([`BATCH_OPS_MAX`], 1024) ops and at most `max_frame_bytes`
//! ([`FRAME_BYTES_MAX`]) bytes; and its answer must fit one frame as well
//! (a full batch of loads fits; two full shrinks go in two requests).
//! A batch pays for one round trip and one wake-up of the node over all
//! its pages: put pages that go together in one request.
//!
//! One [`Client`] (shared behind an `Arc`) carries any number of requests
//! at once, each matched to its answer by id; answers come back as they
//! are ready, not in the order asked. Requests on one connection still
//! **take effect in the order they were sent** wherever that can be seen:
//! a request waits for every earlier one that touches a page it touches
//! (one of them changing it) or changes an area it uses, so a load sent
//! after a store of the same page sees that store. A request is sent when
//! its future is first polled; between tasks, send order is whichever
//! reached the connection first, so await the store before loading from
//! another task. Dropping a future does not withdraw a request already
//! sent.
//!
//! # Statuses, errors and what to do
//!
//! Per op ([`v1::Status`] in the results):
//!
//! | status | meaning | what to do |
//! |---|---|---|
//! | `OK` | done; a load carries the page | |
//! | `REJECTED_*` | a store refused | keep the page yourself; try later stores as usual |
//! | `REJECTED_AREA_INVALIDATED` | the area was invalidated | init it again before storing |
//! | `NOT_FOUND` | no page there (never stored, refused, invalidated, or dropped from a writethrough area) | use your own copy, if any |
//! | `UNAVAILABLE` | the page exists but its donors cannot be reached now | try the load again later; the page is not lost |
//! | `CORRUPT` | every copy failed its checksum | the page is lost: an I/O error (or your own copy, writethrough) |
//! | `DROPPED` | a cleancache put not kept | nothing: cleancache may drop puts |
//! | `INVALID_ARGUMENT`, `UNKNOWN_AREA`, `UNKNOWN_POOL` | the op is wrong (page size, an area never initialised) | fix the call |
//!
//! Per request, a [`ClientError`]: see its variants. In short, a
//! [`ClientError::Server`] refused the whole request (split it, or
//! reconnect); [`ClientError::Closed`] means requests in flight may or may
//! not have taken effect, so keep those pages, reconnect, and invalidate
//! their offsets before storing them again.

#![warn(missing_docs)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use ramster_protocol::io::{ConnError, FrameReader, FrameWriter, encode_frame};
use ramster_protocol::v1::op::Kind;
use ramster_protocol::{frame, handshake};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::oneshot;

/// The wire format this client speaks, for the types its answers carry.
pub use ramster_protocol as protocol;
pub use ramster_protocol::v1;
pub use ramster_protocol::{BATCH_OPS_MAX, FRAME_BYTES_MAX, PAGE_BYTES};

/// Why a connection or a request failed as a whole (an op's own outcome is
/// a [`v1::Status`] instead).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be opened: no node serves at `path`, or it is
    /// not ours to open.
    #[error("connecting to {path}: {source}")]
    Connect {
        /// The socket's path.
        path: String,
        /// What connecting said.
        source: std::io::Error,
    },
    /// The node refused the handshake (no protocol version in common), or
    /// what answered is not a ramster node.
    #[error("handshake refused: {0}")]
    Handshake(String),
    /// The node refused a whole request and ran none of its ops:
    /// `FRAME_TOO_LARGE` (its answer could outgrow a frame: split it),
    /// `TOO_MANY_OPS` (more than `max_batch_ops`), `MALFORMED_FRAME`,
    /// `SHUTTING_DOWN` (reconnect once the node is back).
    #[error("server error {code:?}: {message}")]
    Server {
        /// The reason, as a code.
        code: v1::ErrorCode,
        /// The reason, in words.
        message: String,
    },
    /// The connection is gone (the node stopped, or closed it after a
    /// connection-level error). Requests in flight may or may not have
    /// taken effect: keep their pages, reconnect, and invalidate their
    /// offsets before storing them again.
    #[error("connection closed")]
    Closed,
    /// An op of a call that expects `OK` (init, invalidate, counts, stats)
    /// got another status.
    #[error("op failed with {status:?}: {detail}")]
    Op {
        /// The op's status.
        status: v1::Status,
        /// The node's words on it.
        detail: String,
    },
    /// Frames could not be written or read: a request past
    /// [`FRAME_BYTES_MAX`] (split it), a broken stream, or an answer that
    /// is not a frame.
    #[error(transparent)]
    Conn(#[from] ConnError),
}

/// Answers awaited, by request id.
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<v1::Response>>>>;

/// Locks the pending answers; nothing panics while holding the lock, so a
/// poisoned one is still whole.
fn lock(
    pending: &Pending,
) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<v1::Response>>> {
    pending.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An async, pipelined API client: any number of requests in flight on one
/// connection, matched to their answers by id. Cheap to share behind an
/// `Arc`. It runs on the tokio runtime it was connected on, which must
/// keep running while it is used.
pub struct Client {
    writer: FrameWriter<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    welcome: v1::Welcome,
}

impl Client {
    /// Connects to the node's API socket at `path` and does the version
    /// handshake. Must be called within a tokio runtime: the connection's
    /// reader and writer are tasks on it.
    pub async fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (rd, wr) = stream.into_split();
        let mut reader = FrameReader::new(rd, FRAME_BYTES_MAX);
        let writer = FrameWriter::spawn(wr, None);
        let hello = encode_frame(&handshake::hello("ramster-client")).expect("small");
        writer
            .send(hello, ())
            .await
            .map_err(|_| ClientError::Closed)?;
        let body = reader.read_frame().await?.ok_or(ClientError::Closed)?;
        let welcome = match frame::decode::<v1::Welcome>(body.clone()) {
            Ok(w) if w.version != 0 => w,
            _ => {
                let reason = frame::decode::<v1::Response>(body)
                    .ok()
                    .and_then(|r| r.error)
                    .map(|e| e.message)
                    .unwrap_or_else(|| "no Welcome".into());
                return Err(ClientError::Handshake(reason));
            }
        };
        let pending: Pending = Arc::default();
        tokio::spawn(read_responses(reader, pending.clone()));
        Ok(Client {
            writer,
            pending,
            next_id: AtomicU64::new(1),
            welcome,
        })
    }

    /// The node's answer to the handshake: its name, the protocol version,
    /// and the limits a request must stay within.
    pub fn welcome(&self) -> &v1::Welcome {
        &self.welcome
    }

    /// Sends one request of `ops` and waits for its results, one per op in
    /// order. The way to every op, including those without a method here
    /// (shrink, the cleancache pools); build ops with [`op`].
    pub async fn call(&self, ops: Vec<v1::Op>) -> Result<Vec<v1::OpResult>, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let frame = match encode_frame(&v1::Request { id, ops }) {
            Ok(frame) => frame,
            Err(e) => {
                lock(&self.pending).remove(&id);
                return Err(ConnError::from(e).into());
            }
        };
        if self.writer.send(frame, ()).await.is_err() {
            lock(&self.pending).remove(&id);
            return Err(ClientError::Closed);
        }
        let resp = rx.await.map_err(|_| ClientError::Closed)?;
        if let Some(e) = resp.error {
            return Err(ClientError::Server {
                code: v1::ErrorCode::try_from(e.code).unwrap_or(v1::ErrorCode::Unspecified),
                message: e.message,
            });
        }
        Ok(resp.results)
    }

    async fn call_one(&self, kind: Kind) -> Result<v1::OpResult, ClientError> {
        let mut r = self.call(vec![op(kind)]).await?;
        r.pop().ok_or(ClientError::Closed)
    }

    /// (Re)creates `area` empty, its pages getting the node's default
    /// number of donor copies. A `writethrough` area is a cache: the caller
    /// keeps its own copy of every page, and the node may drop them.
    pub async fn init_area(&self, area: u32, writethrough: bool) -> Result<(), ClientError> {
        self.init_area_replicas(area, writethrough, 0).await
    }

    /// [`init_area`](Self::init_area) with the donor copies each page of
    /// the area gets (1..=3; 0 is the node's default).
    pub async fn init_area_replicas(
        &self,
        area: u32,
        writethrough: bool,
        replicas: u32,
    ) -> Result<(), ClientError> {
        ok(self
            .call_one(Kind::InitArea(v1::InitArea {
                area,
                writethrough,
                replicas,
            }))
            .await?)
        .map(drop)
    }

    /// Stores pages of one area, `(offset, page)`, in one request; a status
    /// per page. A page that is not `OK` stays the caller's (see the crate
    /// docs).
    pub async fn store_pages(
        &self,
        area: u32,
        pages: &[(u64, Bytes)],
    ) -> Result<Vec<v1::Status>, ClientError> {
        let ops = pages
            .iter()
            .map(|(offset, page)| {
                op(Kind::Store(v1::Store {
                    area,
                    offset: *offset,
                    page: page.clone(),
                }))
            })
            .collect();
        Ok(self.call(ops).await?.iter().map(|r| r.status()).collect())
    }

    /// Loads pages of one area in one request: per offset the page, or the
    /// status that says why not (`NOT_FOUND`, `UNAVAILABLE`, `CORRUPT`...).
    pub async fn load_pages(
        &self,
        area: u32,
        offsets: &[u64],
    ) -> Result<Vec<Result<Bytes, v1::Status>>, ClientError> {
        let ops = offsets
            .iter()
            .map(|&offset| op(Kind::Load(v1::Load { area, offset })))
            .collect();
        Ok(self
            .call(ops)
            .await?
            .into_iter()
            .map(|r| match r.status() {
                v1::Status::Ok => Ok(r.page),
                s => Err(s),
            })
            .collect())
    }

    /// Invalidates pages of one area in one request; how many of them were
    /// there.
    pub async fn invalidate_pages(&self, area: u32, offsets: &[u64]) -> Result<u64, ClientError> {
        let ops = offsets
            .iter()
            .map(|&offset| op(Kind::InvalidatePage(v1::InvalidatePage { area, offset })))
            .collect();
        let mut dropped = 0;
        for r in self.call(ops).await? {
            dropped += ok(r)?.value;
        }
        Ok(dropped)
    }

    /// Drops every page of `area` (how many there were) and refuses its
    /// stores until the next [`init_area`](Self::init_area).
    pub async fn invalidate_area(&self, area: u32) -> Result<u64, ClientError> {
        Ok(ok(self
            .call_one(Kind::InvalidateArea(v1::InvalidateArea { area }))
            .await?)?
        .value)
    }

    /// How many pages `area` holds (frontswap's curr_pages).
    pub async fn curr_pages(&self, area: u32) -> Result<u64, ClientError> {
        Ok(ok(self
            .call_one(Kind::CurrPages(v1::CurrPages { area }))
            .await?)?
        .value)
    }

    /// The node's counters, per node and per area, and its store's byte
    /// accounting: a snapshot of some moment while the request was out.
    pub async fn stats(&self) -> Result<v1::Stats, ClientError> {
        Ok(ok(self.call_one(Kind::GetStats(v1::GetStats {})).await?)?
            .stats
            .unwrap_or_default())
    }
}

/// Wraps an op kind as an op for [`Client::call`].
pub fn op(kind: Kind) -> v1::Op {
    v1::Op { kind: Some(kind) }
}

/// The result if it is `OK`, else the error that says what it was.
fn ok(r: v1::OpResult) -> Result<v1::OpResult, ClientError> {
    match r.status() {
        v1::Status::Ok => Ok(r),
        status => Err(ClientError::Op {
            status,
            detail: r.detail,
        }),
    }
}

/// Hands each answer to the call awaiting it, until the connection ends.
async fn read_responses(
    mut reader: FrameReader<tokio::net::unix::OwnedReadHalf>,
    pending: Pending,
) {
    while let Ok(Some(body)) = reader.read_frame().await {
        let Ok(resp) = frame::decode::<v1::Response>(body) else {
            break;
        };
        let waiting = lock(&pending).remove(&resp.id);
        if let Some(tx) = waiting {
            let _ = tx.send(resp);
        } else if resp.id == 0 {
            // A connection-level error: nothing more will be answered.
            break;
        }
    }
    // Dropping the senders fails every waiting call with `Closed`.
    lock(&pending).clear();
}

/// A blocking client: the async one driven by its own current-thread
/// runtime, for callers that have none. Not to be used from within a
/// tokio runtime (use [`Client`] there). Its methods are
/// [`Client`]'s.
pub struct BlockingClient {
    rt: tokio::runtime::Runtime,
    inner: Client,
}

impl BlockingClient {
    /// See [`Client::connect`].
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds");
        let inner = rt.block_on(Client::connect(path))?;
        Ok(BlockingClient { rt, inner })
    }

    /// See [`Client::welcome`].
    pub fn welcome(&self) -> &v1::Welcome {
        self.inner.welcome()
    }

    /// See [`Client::call`].
    pub fn call(&self, ops: Vec<v1::Op>) -> Result<Vec<v1::OpResult>, ClientError> {
        self.rt.block_on(self.inner.call(ops))
    }

    /// See [`Client::init_area`].
    pub fn init_area(&self, area: u32, writethrough: bool) -> Result<(), ClientError> {
        self.rt.block_on(self.inner.init_area(area, writethrough))
    }

    /// See [`Client::init_area_replicas`].
    pub fn init_area_replicas(
        &self,
        area: u32,
        writethrough: bool,
        replicas: u32,
    ) -> Result<(), ClientError> {
        self.rt
            .block_on(self.inner.init_area_replicas(area, writethrough, replicas))
    }

    /// See [`Client::store_pages`].
    pub fn store_pages(
        &self,
        area: u32,
        pages: &[(u64, Bytes)],
    ) -> Result<Vec<v1::Status>, ClientError> {
        self.rt.block_on(self.inner.store_pages(area, pages))
    }

    /// See [`Client::load_pages`].
    pub fn load_pages(
        &self,
        area: u32,
        offsets: &[u64],
    ) -> Result<Vec<Result<Bytes, v1::Status>>, ClientError> {
        self.rt.block_on(self.inner.load_pages(area, offsets))
    }

    /// See [`Client::invalidate_pages`].
    pub fn invalidate_pages(&self, area: u32, offsets: &[u64]) -> Result<u64, ClientError> {
        self.rt.block_on(self.inner.invalidate_pages(area, offsets))
    }

    /// See [`Client::invalidate_area`].
    pub fn invalidate_area(&self, area: u32) -> Result<u64, ClientError> {
        self.rt.block_on(self.inner.invalidate_area(area))
    }

    /// See [`Client::curr_pages`].
    pub fn curr_pages(&self, area: u32) -> Result<u64, ClientError> {
        self.rt.block_on(self.inner.curr_pages(area))
    }

    /// See [`Client::stats`].
    pub fn stats(&self) -> Result<v1::Stats, ClientError> {
        self.rt.block_on(self.inner.stats())
    }
}
