//! The native API server: protobuf frames on a Unix socket.
//!
//! Per connection: a handshake, then requests decoded by one reader and
//! executed concurrently (at most [`REQUESTS_IN_FLIGHT_MAX`] at a time), with
//! responses going out through one [`FrameWriter`] as they are ready.
//! Requests still take effect as if run one after another in the order
//! they were sent: each waits for every earlier unfinished one that
//! touches the same page, area or pool where either of them changes it
//! (see [`order`](super::order)); requests that only read overlap. A
//! request whose answer could outgrow a frame is refused before it runs.
//! Small requests run in the reader, larger ones on the runtime's
//! workers. On a cluster node the readers run on the transport's thread
//! ([`ClientThread`](super::ClientThread)): a small load reaches the
//! donors, and their answer the client, without waking another thread, and
//! each small request keeps that thread polling for a while instead of
//! sleeping; an op there that has to wait on donors (a store into a full
//! store, a shrink) goes to the workers' blocking threads, since that
//! thread must never block. A request that cannot be decoded gets an error
//! response; a broken frame (bad length) gets one and the connection is
//! closed, since the stream position is lost. Nothing a client sends can
//! stop the server from serving its other connections.
//!
//! Nothing a client sends, or fails to read, can make its connection hold
//! more than a bound ([`ServeLimits`]; the sum is in `docs/contract.md`):
//! a request's ops are counted before it is decoded, every request takes
//! room for its answer in the connection's [`AnswerBudget`] before it
//! runs, and a client that is slow to say Hello, or that stops reading its
//! answers, is closed.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use prost::Message;
use prost::encoding::encoded_len_varint;
use ramster_protocol::io::{ConnError, FrameReader, FrameWriter, PagesOwed, encode_frame};
use ramster_protocol::v1::{self, op::Kind};
use ramster_protocol::{BATCH_OPS_MAX, FRAME_BYTES_MAX, frame, handshake, shape};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::{debug, error, info};

use super::order::{Footprint, Order};
use super::{Frontend, LoadResult, OpError, Reject, StoreResult, may_block_here};
use crate::metrics::NodeMetrics;
use crate::poll::PollWindow;
use crate::store::{PAGE_BYTES, Page, StoreStats};

/// Requests of one connection executing at once.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 64;
/// Requests with at most this many ops run in the reader itself: for a few
/// pages, spawning a task costs more than it spreads. A shrink never does:
/// it hands back up to a frame of pages, throughput rather than latency.
const INLINE_OPS_MAX: usize = 2;
/// Connections served at once.
pub const CONNECTIONS_MAX: usize = 1024;
/// Bytes of answers one connection holds, computed or waiting to be
/// written (see [`AnswerBudget`]): two full frames, so that one answer
/// is written while the next is made.
pub const ANSWER_BUDGET_BYTES: usize = 2 * (frame::HEADER_BYTES + FRAME_BYTES_MAX);
/// How long a client has to complete the handshake after connecting.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write of answers may make no progress, the client reading
/// nothing, before the connection is closed: long enough for a client
/// paused by its own memory pressure, short enough to free a connection
/// that stopped reading for good.
pub const ANSWER_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection with nothing in flight stays open: for ever. A
/// client that dies closes its end of a Unix socket, so an idle
/// connection is a live client (a kernel module, a pooled client library)
/// that would have to notice the cut and connect again; it holds only its
/// read buffer and a connection slot, both bounded. Redis and PostgreSQL
/// keep idle clients by default, for the same reasons.
pub const IDLE_TIMEOUT: Option<Duration> = None;

const _: () = assert!(
    ANSWER_BUDGET_BYTES >= frame::HEADER_BYTES + FRAME_BYTES_MAX,
    "the largest answer must fit the budget, or its request would wait for ever"
);

/// Bounds on each connection; see `docs/contract.md` for the memory they
/// add up to.
#[derive(Clone, Copy, Debug)]
pub struct ServeLimits {
    pub handshake_timeout: Duration,
    pub stall_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub answer_budget_bytes: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            handshake_timeout: HANDSHAKE_TIMEOUT,
            stall_timeout: ANSWER_STALL_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            answer_budget_bytes: ANSWER_BUDGET_BYTES,
        }
    }
}

/// Serves the API on `listener` until `shutdown` turns true, each
/// connection within `limits`; store and load latencies go to `metrics`.
pub async fn serve(
    listener: UnixListener,
    frontend: Arc<Frontend>,
    metrics: Arc<NodeMetrics>,
    limits: ServeLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let client_thread = frontend.remote().and_then(|r| r.client_thread());
    let workers = tokio::runtime::Handle::current();
    while let Some(((stream, _), permit)) =
        crate::accept::next(&limit, || listener.accept(), &mut shutdown, "api").await
    {
        let served = Served {
            frontend: frontend.clone(),
            metrics: metrics.clone(),
            workers: workers.clone(),
            poll: client_thread.as_ref().and_then(|t| t.poll.clone()),
            limits,
        };
        let serve = |stream| async move {
            if let Err(e) = serve_connection(stream, served).await {
                debug!(error = %e, "connection ended");
            }
            drop(permit);
        };
        match &client_thread {
            None => {
                tokio::spawn(serve(stream));
            }
            Some(thread) => {
                // The socket moves to the client thread's reactor.
                let stream = match stream.into_std() {
                    Ok(s) => s,
                    Err(e) => {
                        debug!(error = %e, "connection lost before it was served");
                        continue;
                    }
                };
                thread.runtime.spawn(async move {
                    match UnixStream::from_std(stream) {
                        Ok(stream) => serve(stream).await,
                        Err(e) => debug!(error = %e, "connection could not be served"),
                    }
                });
            }
        }
    }
    info!("api server stopped accepting");
}

/// Binds the socket, replacing a stale one left by a previous run.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        // A live node would still answer; a dead one left its socket file.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by a running node", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    UnixListener::bind(path)
}

fn error_response(id: u64, code: v1::ErrorCode, message: impl Into<String>) -> v1::Response {
    v1::Response {
        id,
        results: Vec::new(),
        error: Some(v1::Error {
            code: code as i32,
            message: message.into(),
        }),
    }
}

/// What a connection is served with.
struct Served {
    frontend: Arc<Frontend>,
    metrics: Arc<NodeMetrics>,
    /// Where larger requests run, and where an op that may wait on donors
    /// goes when it comes to a thread that must not block: the node
    /// runtime's.
    workers: Handle,
    /// The client thread's poll window, if it polls.
    poll: Option<Arc<PollWindow>>,
    limits: ServeLimits,
}

/// Serves one connection on the runtime it is polled on: the workers', or
/// on a cluster node the client thread's.
async fn serve_connection(stream: UnixStream, served: Served) -> Result<(), ConnError> {
    let Served {
        frontend,
        metrics,
        workers,
        poll,
        limits,
    } = served;
    let (rd, wr) = stream.into_split();
    let mut reader = FrameReader::new(rd, FRAME_BYTES_MAX);
    let writer = FrameWriter::spawn(wr, Some(limits.stall_timeout));
    let budget = AnswerBudget::new(limits.answer_budget_bytes);

    // Handshake.
    let hello = match tokio::time::timeout(limits.handshake_timeout, reader.read_frame()).await {
        Ok(Ok(Some(body))) => frame::decode::<v1::Hello>(body),
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(ConnError::Frame(e))) => Err(e),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            let waited = limits.handshake_timeout;
            let resp = error_response(
                0,
                v1::ErrorCode::HandshakeRequired,
                format!("no Hello within {waited:?} of connecting"),
            );
            budget.reply(&writer, resp).await;
            return Ok(());
        }
    };
    let welcome = hello
        .map_err(|e| {
            error_response(
                0,
                v1::ErrorCode::HandshakeRequired,
                format!("expected Hello: {e}"),
            )
        })
        .and_then(|h| {
            handshake::accept(&h, frontend.name())
                .map_err(|e| error_response(0, v1::ErrorCode::UnsupportedVersion, e.to_string()))
        });
    match welcome {
        Ok(w) => {
            budget
                .queue(&writer, encode_frame(&w).expect("small"), None)
                .await
        }
        Err(resp) => {
            budget.reply(&writer, resp).await;
            return Ok(());
        }
    }

    let in_flight = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX));
    let order = Order::default();
    loop {
        let body = match next_frame(&mut reader, &writer, &budget, limits.idle_timeout).await {
            Ok(Some(body)) => body,
            Ok(None) => break,
            Err(ConnError::Frame(e)) => {
                let code = match e {
                    frame::FrameError::TooLarge { .. } => v1::ErrorCode::FrameTooLarge,
                    _ => v1::ErrorCode::MalformedFrame,
                };
                budget
                    .reply(&writer, error_response(0, code, e.to_string()))
                    .await;
                break;
            }
            Err(e) => return Err(e),
        };
        // What decoding would allocate, counted before it does: a frame of
        // empty ops costs many times its size once decoded.
        let counted = shape::request_shape(&body);
        if let Ok(shape) = counted
            && shape.ops > BATCH_OPS_MAX
        {
            let resp = error_response(
                shape.id,
                v1::ErrorCode::TooManyOps,
                format!(
                    "{} ops in one request; the limit is {BATCH_OPS_MAX}",
                    shape.ops
                ),
            );
            budget.reply(&writer, resp).await;
            continue;
        }
        let request: v1::Request = match counted.and_then(|_| frame::decode(body)) {
            Ok(r) => r,
            Err(e) => {
                // Framing is intact: answer and keep serving.
                let resp = error_response(0, v1::ErrorCode::MalformedFrame, e.to_string());
                budget.reply(&writer, resp).await;
                continue;
            }
        };
        // Room for its answer before it runs: while answers fill the
        // budget, nothing more is read.
        let Some(held) = budget.hold_for(&frontend, &writer, &request.ops).await else {
            break;
        };
        // Its place in the connection's order, taken in the order requests
        // are read: it starts once every earlier request it conflicts
        // with has finished.
        let pass = order.enter(Footprint::of(&request.ops));
        let inline = request.ops.len() <= INLINE_OPS_MAX
            && !request
                .ops
                .iter()
                .any(|o| matches!(o.kind, Some(Kind::Shrink(_))));
        if inline && let Some(p) = &poll {
            // A client that sends a page or two at a time waits on each
            // answer: the donors' answers, and its next request, should
            // find the thread polling. Larger requests are throughput, not
            // latency, and keep nobody polling.
            p.touch();
        }
        let mut answer = Box::pin(execute(
            frontend.clone(),
            metrics.clone(),
            workers.clone(),
            request,
        ));
        if inline && pass.may_start() {
            // Small requests run right here; one that waits on donors, or
            // on an earlier request, goes on below as a task, so the reader
            // keeps reading.
            let polled = answer
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()));
            if let Poll::Ready(resp) = polled {
                drop(pass);
                let (frame, held) = held.fit(encode_answer(resp));
                let _ = writer.send(frame, held).await;
                continue;
            }
        }
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let writer = writer.clone();
        let poll = poll.clone();
        let finish = async move {
            pass.ready().await;
            let resp = answer.await;
            drop(pass);
            let (frame, held) = held.fit(encode_answer(resp));
            if inline {
                writer.write_now(frame, held).await;
                // The client's next request comes soon after its answer.
                if let Some(p) = poll {
                    p.touch();
                }
            } else {
                let _ = writer.send(frame, held).await;
            }
            drop(permit);
        };
        if inline {
            // Still running, so it waits on donors: it finishes here, on
            // the thread where their answer arrives on a cluster node, and
            // writes from here (a page or two to check and decompress).
            tokio::spawn(finish);
        } else {
            // Bigger requests compress and decompress more: the workers'
            // job.
            workers.spawn(finish);
        }
    }
    Ok(())
}

/// The write side of an API connection: each answer holds its share of
/// the answer budget until it is written.
type Writer = FrameWriter<OwnedWriteHalf, Held>;

/// The next frame from the client; `Ok(None)` at a clean end of stream,
/// once the connection is closed (its client stalled), or once it has had
/// nothing in flight for `idle_timeout`.
async fn next_frame(
    reader: &mut FrameReader<OwnedReadHalf>,
    writer: &Writer,
    budget: &AnswerBudget,
    idle_timeout: Option<Duration>,
) -> Result<Option<Bytes>, ConnError> {
    // Reading a frame keeps what has arrived in the reader's buffer, so it
    // can be given up and taken on again.
    let read = reader.read_frame();
    tokio::pin!(read);
    loop {
        let idle = async {
            match idle_timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            frame = &mut read => return frame,
            () = writer.closed() => return Ok(None),
            // A request in flight holds budget until its answer is
            // written: the connection is idle only when the budget is
            // whole, then and a whole timeout later.
            () = idle => if budget.is_whole() {
                debug!(?idle_timeout, "closing an idle connection");
                return Ok(None);
            },
        }
    }
}

/// A connection's budget of answer bytes: every request takes room for
/// the largest answer it could get before it runs, and gives it back once
/// that answer is written. A client that reads nothing fills it, and then
/// nothing more of what it sends is read.
struct AnswerBudget {
    bytes: Arc<Semaphore>,
    max: usize,
}

/// What an answer holds until it is written: its bytes of the budget, and
/// for a shrink's, the pages it owes (see [`FrameWriter::owe_pages`]).
struct Held {
    bytes: OwnedSemaphorePermit,
    _owed: Option<PagesOwed>,
}

impl AnswerBudget {
    fn new(max: usize) -> Self {
        AnswerBudget {
            bytes: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// Whether no answer holds any of it: nothing is in flight.
    fn is_whole(&self) -> bool {
        self.bytes.available_permits() == self.max
    }

    /// Takes `n` bytes, waiting while answers fill the budget; `None` if
    /// the connection closes meanwhile.
    async fn take(&self, n: usize, writer: &Writer) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(n).expect("a budget fits a semaphore");
        tokio::select! {
            permit = self.bytes.clone().acquire_many_owned(n) => Some(permit.expect("never closed")),
            () = writer.closed() => None,
        }
    }

    /// Room for the largest answer `ops` could get ([`answer_bytes_max`],
    /// never past a frame); a whole frame for stats, which can grow with
    /// areas made while the request waits.
    async fn hold_for(&self, fe: &Frontend, writer: &Writer, ops: &[v1::Op]) -> Option<Held> {
        let stats = ops
            .iter()
            .any(|o| matches!(o.kind, Some(Kind::GetStats(_))));
        let body = if stats {
            FRAME_BYTES_MAX
        } else {
            answer_bytes_max(fe, ops).min(FRAME_BYTES_MAX)
        };
        let bytes = self.take(frame::HEADER_BYTES + body, writer).await?;
        let shrinks = ops.iter().any(|o| matches!(o.kind, Some(Kind::Shrink(_))));
        Some(Held {
            bytes,
            _owed: shrinks.then(|| writer.owe_pages()),
        })
    }

    /// Queues `frame`, holding its bytes of the budget (and `owed`) until
    /// it is written.
    async fn queue(&self, writer: &Writer, frame: BytesMut, owed: Option<PagesOwed>) {
        if let Some(bytes) = self.take(frame.len(), writer).await {
            let _ = writer.send(frame, Held { bytes, _owed: owed }).await;
        }
    }

    /// Queues an answer that no request's room was taken for: an error.
    async fn reply(&self, writer: &Writer, resp: v1::Response) {
        self.queue(writer, encode_answer(resp), None).await;
    }
}

impl Held {
    /// Gives back the room the answer did not need.
    fn fit(mut self, frame: BytesMut) -> (BytesMut, Held) {
        let held = self.bytes.num_permits();
        debug_assert!(
            frame.len() <= held,
            "an answer of {} bytes outgrew the {held} held for it",
            frame.len()
        );
        if held > frame.len() {
            drop(self.bytes.split(held - frame.len()));
        }
        (frame, self)
    }
}

/// Applies one request to the front end, timing its stores and loads into
/// `metrics`; or refuses it whole, before any of its ops runs, if its
/// answer could outgrow a frame (see [`answer_bytes_max`]).
///
/// Loads of pages held by donors wait without blocking. A store into a
/// full store and a shrink of pages on donors block while remotify makes
/// room or the pages come home: where the request runs on a thread that
/// must not block (the transport's, on a cluster node), those ops go to
/// `workers`' blocking threads and the request waits for them there.
/// Everything else completes in the first poll.
pub async fn execute(
    frontend: Arc<Frontend>,
    metrics: Arc<NodeMetrics>,
    workers: Handle,
    request: v1::Request,
) -> v1::Response {
    let answer_max = answer_bytes_max(&frontend, &request.ops);
    if answer_max > FRAME_BYTES_MAX {
        return error_response(
            request.id,
            v1::ErrorCode::FrameTooLarge,
            format!(
                "the answer to this request could take {answer_max} bytes, past the frame \
                 limit of {FRAME_BYTES_MAX}: nothing was done; send its ops in smaller \
                 requests (a shrink hands back at most {SHRINK_PAGES_MAX} pages)"
            ),
        );
    }
    let mut results = Vec::with_capacity(request.ops.len());
    let mut ops = request.ops.into_iter().peekable();
    while let Some(op) = ops.next() {
        match op.kind {
            // A run of loads of one area goes to the front end as one call,
            // so the pages of it that live on donors share round trips.
            Some(Kind::Load(first)) => {
                let area = first.area;
                let mut offsets = vec![first.offset];
                while let Some(next) =
                    ops.next_if(|o| matches!(&o.kind, Some(Kind::Load(l)) if l.area == area))
                {
                    if let Some(Kind::Load(l)) = next.kind {
                        offsets.push(l.offset);
                    }
                }
                results.extend(load_run(&frontend, &metrics, area, &offsets).await);
            }
            Some(kind) if may_block_here() => results.push(timed(&frontend, &metrics, kind)),
            Some(kind) => results.push(without_blocking(&frontend, &metrics, &workers, kind).await),
            None => results.push(invalid("empty op")),
        }
    }
    for r in &mut results {
        cut_detail(&mut r.detail);
    }
    v1::Response {
        id: request.id,
        results,
        error: None,
    }
}

/// Executes one op on a thread that must not block. A store that finds
/// the store full, and a shrink on a node with donors, may wait on them:
/// they finish on `workers`' blocking threads while this task waits
/// without blocking. A store that finds room, the common case, completes
/// here.
async fn without_blocking(
    fe: &Arc<Frontend>,
    metrics: &Arc<NodeMetrics>,
    workers: &Handle,
    kind: Kind,
) -> v1::OpResult {
    if fe.remote().is_none() || export_area_of(&kind).is_some() {
        return timed(fe, metrics, kind);
    }
    match kind {
        Kind::Store(o) => {
            let started = Instant::now();
            let result = match fe.store_page_without_waiting(o.area, o.offset, &o.page) {
                Ok(Some(r)) => stored(r, false),
                Err(e) => op_error(e),
                Ok(None) => {
                    let fe = fe.clone();
                    let waited = workers
                        .spawn_blocking(move || fe.store_page(o.area, o.offset, &o.page))
                        .await;
                    match waited {
                        Ok(r) => r.map_or_else(op_error, |r| stored(r, false)),
                        // The node is stopping, or the store panicked.
                        Err(_) => stored(StoreResult::Rejected(Reject::Unavailable), false),
                    }
                }
            };
            metrics.store_latency.observe(started.elapsed());
            result
        }
        Kind::Shrink(_) => {
            let (fe, metrics) = (fe.clone(), metrics.clone());
            workers
                .spawn_blocking(move || timed(&fe, &metrics, kind))
                .await
                .unwrap_or_else(|e| v1::OpResult {
                    detail: format!("shrink did not finish: {e}"),
                    ..status(v1::Status::Unavailable)
                })
        }
        kind => timed(fe, metrics, kind),
    }
}

/// Most pages one shrink hands back: a full batch, which fits a frame.
pub const SHRINK_PAGES_MAX: usize = BATCH_OPS_MAX;

/// Longest detail an op's result carries; a longer one is cut.
const DETAIL_BYTES_MAX: usize = 256;

/// Bytes of a field's key: every field of the API is numbered below 16.
const KEY_BYTES: usize = 1;

/// Most bytes of an integer field's value: a varint of a full `u64` (a
/// negative enum value takes as many).
const VARINT_BYTES_MAX: usize = 10;

/// Bytes of an integer field at its largest.
const INT_FIELD_BYTES_MAX: usize = KEY_BYTES + VARINT_BYTES_MAX;

/// Bytes of a length-delimited field (bytes, string, message) of `body`
/// bytes.
fn field_bytes(body: usize) -> usize {
    KEY_BYTES + encoded_len_varint(body as u64) + body
}

/// The largest answer `ops` could get, in bytes of the encoded response,
/// reckoned from the ops alone before any of them runs. The rule: each
/// op's result holds a status, a value and a detail of at most
/// [`DETAIL_BYTES_MAX`] bytes, and beyond that
/// - a load or get: a page, or a detail saying why not, never both;
/// - a shrink: up to `max_pages` pages (at most [`SHRINK_PAGES_MAX`]), each
///   with its offset;
/// - stats: every area the node has now, plus one for each init in the
///   request;
///
/// every integer at its widest. A request whose answer could pass
/// [`FRAME_BYTES_MAX`] is refused before anything is changed: a shrink
/// must never take out of the store pages its answer cannot carry. A full
/// batch of loads, or a shrink of [`SHRINK_PAGES_MAX`] pages with a few
/// loads beside it, fits.
pub fn answer_bytes_max(fe: &Frontend, ops: &[v1::Op]) -> usize {
    let detail = field_bytes(DETAIL_BYTES_MAX);
    let page = field_bytes(PAGE_BYTES);
    let returned_page = field_bytes(INT_FIELD_BYTES_MAX + page);
    let stats = || {
        let inits = ops
            .iter()
            .filter(|o| matches!(o.kind, Some(Kind::InitArea(_))))
            .count();
        field_bytes(stats_bytes_max(fe.name().len(), fe.area_count() + inits))
    };
    let results: usize = ops
        .iter()
        .map(|op| {
            let carried = match &op.kind {
                Some(Kind::Load(_) | Kind::Get(_)) => page.max(detail),
                Some(Kind::Shrink(o)) => {
                    detail + (o.max_pages as usize).min(SHRINK_PAGES_MAX) * returned_page
                }
                Some(Kind::GetStats(_)) => detail + stats(),
                _ => detail,
            };
            field_bytes(2 * INT_FIELD_BYTES_MAX + carried)
        })
        .sum();
    INT_FIELD_BYTES_MAX + results
}

/// The largest encoded `Stats` of a node named with `name_bytes` bytes
/// that has `areas` areas: every counter at its widest.
fn stats_bytes_max(name_bytes: usize, areas: usize) -> usize {
    let counters = counters_at_most().encoded_len();
    let area = v1::AreaStats {
        area: u32::MAX,
        writethrough: true,
        invalidated: true,
        curr_pages: u64::MAX,
        counters: Some(counters_at_most()),
        replicas: u32::MAX,
    }
    .encoded_len();
    let m = u64::MAX;
    let store = v1::StoreStats {
        capacity_bytes: m,
        used_bytes: m,
        pages: m,
        same_filled_pages: m,
        compressed_pages: m,
        payload_bytes: m,
        slot_bytes: m,
        slab_bytes: m,
        index_bytes: m,
        evicted_pages: m,
        remote_pages: m,
        remote_bytes: m,
    }
    .encoded_len();
    field_bytes(name_bytes) + field_bytes(counters) + field_bytes(store) + areas * field_bytes(area)
}

/// Counters at their widest. Every field is named, so that a new one
/// cannot be left out of the reckoning.
fn counters_at_most() -> v1::Counters {
    let m = u64::MAX;
    v1::Counters {
        succ_stores: m,
        failed_stores_no_capacity: m,
        failed_stores_incompressible: m,
        failed_stores_quota: m,
        failed_stores_area_invalidated: m,
        failed_stores_unavailable: m,
        loads_hit: m,
        loads_miss: m,
        loads_error: m,
        invalidates: m,
        loads_remote: m,
    }
}

/// Cuts `detail` to [`DETAIL_BYTES_MAX`] bytes, on a character boundary.
fn cut_detail(detail: &mut String) {
    if detail.len() > DETAIL_BYTES_MAX {
        let mut end = DETAIL_BYTES_MAX;
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        detail.truncate(end);
    }
}

/// Encodes an answer as a frame. [`answer_bytes_max`] keeps it under the
/// limit; should it be short (areas created between the reckoning and the
/// stats), what can be asked for again gives way, stats and loaded pages
/// turning `UNAVAILABLE` (a private get's page is dropped, as cleancache
/// allows), and the pages a shrink handed back stay: they are nowhere else
/// now.
pub fn encode_answer(mut resp: v1::Response) -> BytesMut {
    let too_large = match encode_frame(&resp) {
        Ok(frame) => return frame,
        Err(e) => e,
    };
    let id = resp.id;
    for r in &mut resp.results {
        if r.returned.is_empty() && (r.stats.is_some() || !r.page.is_empty()) {
            *r = v1::OpResult {
                detail: format!(
                    "the answer outgrew a frame ({too_large}): ask in a smaller request"
                ),
                ..status(v1::Status::Unavailable)
            };
        }
    }
    encode_frame(&resp).unwrap_or_else(|e| {
        error!(request = id, error = %e, "an answer outgrew a frame even without its stats and loaded pages");
        encode_frame(&error_response(
            id,
            v1::ErrorCode::FrameTooLarge,
            format!("the answer outgrew a frame: {e}"),
        ))
        .expect("an error answer is a few bytes")
    })
}

/// Loads `offsets` of `area` together; each page's latency is its share of
/// the run's time.
async fn load_run(
    fe: &Frontend,
    metrics: &NodeMetrics,
    area: u32,
    offsets: &[u64],
) -> Vec<v1::OpResult> {
    if super::nbd::is_export_area(area) {
        return offsets.iter().map(|_| export_refusal(area)).collect();
    }
    // Fresh buffers that become the responses' `Bytes` (no copy).
    let mut bufs: Vec<Vec<u8>> = offsets.iter().map(|_| vec![0u8; PAGE_BYTES]).collect();
    let mut outs: Vec<&mut Page> = bufs
        .iter_mut()
        .map(|b| b.as_mut_slice().try_into().expect("page-sized"))
        .collect();
    let started = Instant::now();
    let loaded_all = fe.load_pages_async(area, offsets, &mut outs).await;
    let share = started.elapsed() / offsets.len() as u32;
    drop(outs);
    metrics.load_latency.observe_many(share, offsets.len());
    match loaded_all {
        Ok(results) => results
            .into_iter()
            .zip(bufs)
            .map(|(r, buf)| loaded(r, buf))
            .collect(),
        Err(e) => offsets.iter().map(|_| op_error(e.clone())).collect(),
    }
}

fn export_refusal(area: u32) -> v1::OpResult {
    v1::OpResult {
        detail: format!("area {area} belongs to an NBD export; API clients cannot use it"),
        ..status(v1::Status::InvalidArgument)
    }
}

fn status(s: v1::Status) -> v1::OpResult {
    v1::OpResult {
        status: s as i32,
        ..Default::default()
    }
}

fn invalid(detail: &str) -> v1::OpResult {
    v1::OpResult {
        detail: detail.to_string(),
        ..status(v1::Status::InvalidArgument)
    }
}

fn value(v: u64) -> v1::OpResult {
    v1::OpResult {
        value: v,
        ..status(v1::Status::Ok)
    }
}

fn op_error(e: OpError) -> v1::OpResult {
    let s = match e {
        OpError::UnknownArea(_) => v1::Status::UnknownArea,
        OpError::UnknownPool(_) => v1::Status::UnknownPool,
        OpError::PageSize(_) | OpError::AreaOutOfRange(_) | OpError::Replicas(_) => {
            v1::Status::InvalidArgument
        }
    };
    v1::OpResult {
        detail: e.to_string(),
        ..status(s)
    }
}

pub fn reject_status(r: Reject) -> v1::Status {
    match r {
        Reject::NoCapacity => v1::Status::RejectedNoCapacity,
        Reject::Incompressible => v1::Status::RejectedIncompressible,
        Reject::Quota => v1::Status::RejectedQuota,
        Reject::AreaInvalidated => v1::Status::RejectedAreaInvalidated,
        Reject::Unavailable => v1::Status::RejectedUnavailable,
    }
}

/// A store's result; a refused cleancache put is reported as `DROPPED`
/// (the contract allows it silently), with the reason in `detail`.
fn stored(r: StoreResult, ephemeral: bool) -> v1::OpResult {
    match r {
        StoreResult::Accepted => status(v1::Status::Ok),
        StoreResult::Rejected(reason) => v1::OpResult {
            detail: reason.as_str().to_string(),
            ..status(if ephemeral {
                v1::Status::Dropped
            } else {
                reject_status(reason)
            })
        },
    }
}

fn loaded(r: LoadResult, page: Vec<u8>) -> v1::OpResult {
    match r {
        LoadResult::Hit => v1::OpResult {
            page: Bytes::from(page),
            ..status(v1::Status::Ok)
        },
        LoadResult::NotFound => status(v1::Status::NotFound),
        LoadResult::Unavailable => status(v1::Status::Unavailable),
        LoadResult::Corrupt => v1::OpResult {
            detail: "stored copy failed its checksum".into(),
            ..status(v1::Status::Corrupt)
        },
    }
}

/// Loads into a fresh buffer that becomes the response's `Bytes` (no copy).
fn load_with(f: impl FnOnce(&mut Page) -> Result<LoadResult, OpError>) -> v1::OpResult {
    let mut buf = vec![0u8; PAGE_BYTES];
    let page: &mut Page = buf.as_mut_slice().try_into().expect("page-sized");
    match f(page) {
        Ok(r) => loaded(r, buf),
        Err(e) => op_error(e),
    }
}

/// The area of a frontswap op, if it is one of the NBD exports' areas.
fn export_area_of(kind: &Kind) -> Option<u32> {
    let area = match kind {
        Kind::InitArea(o) => o.area,
        Kind::Store(o) => o.area,
        Kind::Load(o) => o.area,
        Kind::InvalidatePage(o) => o.area,
        Kind::InvalidateArea(o) => o.area,
        Kind::Shrink(o) => o.area,
        Kind::CurrPages(o) => o.area,
        _ => return None,
    };
    super::nbd::is_export_area(area).then_some(area)
}

/// Executes one op; a store or put counts in the store latency, a load or
/// get in the load latency (one clock read on each side).
fn timed(fe: &Frontend, metrics: &NodeMetrics, kind: Kind) -> v1::OpResult {
    let histogram = match kind {
        Kind::Store(_) | Kind::Put(_) => &metrics.store_latency,
        Kind::Load(_) | Kind::Get(_) => &metrics.load_latency,
        _ => return execute_op(fe, kind),
    };
    let started = Instant::now();
    let result = execute_op(fe, kind);
    histogram.observe(started.elapsed());
    result
}

fn execute_op(fe: &Frontend, kind: Kind) -> v1::OpResult {
    if let Some(area) = export_area_of(&kind) {
        return export_refusal(area);
    }
    let ok = |_| status(v1::Status::Ok);
    let res: Result<v1::OpResult, OpError> = match kind {
        Kind::InitArea(o) => fe
            .init_area_replicas(o.area, o.writethrough, o.replicas)
            .map(ok),
        Kind::Store(o) => fe
            .store_page(o.area, o.offset, &o.page)
            .map(|r| stored(r, false)),
        Kind::Load(o) => return load_with(|p| fe.load_page(o.area, o.offset, p)),
        Kind::InvalidatePage(o) => fe
            .invalidate_page(o.area, o.offset)
            .map(|d| value(d as u64)),
        Kind::InvalidateArea(o) => fe.invalidate_area(o.area).map(value),
        Kind::Shrink(o) => {
            let max = (o.max_pages as usize).min(SHRINK_PAGES_MAX);
            fe.shrink(o.area, o.target_pages, max)
                .map(|s| v1::OpResult {
                    value: s.curr_pages,
                    returned: s
                        .returned
                        .into_iter()
                        .map(|r| v1::ReturnedPage {
                            offset: r.offset,
                            page: r.page,
                        })
                        .collect(),
                    detail: if s.corrupt > 0 {
                        format!("{} pages failed their checksum and were dropped", s.corrupt)
                    } else {
                        String::new()
                    },
                    ..status(v1::Status::Ok)
                })
        }
        Kind::CurrPages(o) => fe.curr_pages(o.area).map(value),
        Kind::NewPool(o) => Ok(value(fe.new_pool(o.shared) as u64)),
        Kind::Put(o) => fe
            .put_page(o.pool, o.object, o.index, &o.page)
            .map(|r| stored(r, true)),
        Kind::Get(o) => return load_with(|p| fe.get_page(o.pool, o.object, o.index, p)),
        Kind::InvalidatePoolPage(o) => fe
            .invalidate_pool_page(o.pool, o.object, o.index)
            .map(|d| value(d as u64)),
        Kind::InvalidateObject(o) => fe.invalidate_object(o.pool, o.object).map(value),
        Kind::InvalidatePool(o) => fe.invalidate_pool(o.pool).map(value),
        Kind::GetStats(_) => Ok(v1::OpResult {
            stats: Some(fe.stats()),
            ..status(v1::Status::Ok)
        }),
    };
    res.unwrap_or_else(op_error)
}

impl Frontend {
    /// Node, area and store figures, as the API reports them.
    pub fn stats(&self) -> v1::Stats {
        let s = self.store().stats();
        v1::Stats {
            node: self.name().to_string(),
            counters: Some(self.counters().to_wire()),
            areas: self
                .area_summaries()
                .into_iter()
                .map(|a| v1::AreaStats {
                    area: a.area,
                    writethrough: a.writethrough,
                    invalidated: a.invalidated,
                    curr_pages: a.curr_pages,
                    counters: Some(a.counters),
                    replicas: a.replicas.map_or(0, |n| n as u32),
                })
                .collect(),
            store: Some((&s).into()),
        }
    }
}

impl From<&StoreStats> for v1::StoreStats {
    fn from(s: &StoreStats) -> Self {
        v1::StoreStats {
            capacity_bytes: s.capacity_bytes,
            used_bytes: s.used_bytes,
            pages: s.pages,
            same_filled_pages: s.same_filled_pages,
            compressed_pages: s.compressed_pages,
            payload_bytes: s.payload_bytes,
            slot_bytes: s.slot_bytes,
            slab_bytes: s.slab_bytes,
            index_bytes: s.index_bytes,
            evicted_pages: s.evicted_pages,
            remote_pages: s.remote_pages,
            remote_bytes: s.remote_bytes,
        }
    }
}
