//! The NBD server: glue around [`proto`](super::proto) and
//! [`Export`](super::export::Export).
//!
//! Per connection: the fixed newstyle handshake on the runtime, then
//! transmission on threads of the connection's own (`--nbd-threads`, 32 by
//! default), with blocking socket calls (see [`transmission`] for why). One
//! thread at a time holds the connection's requests: it takes every
//! complete request received (a read often brings many), carries them out
//! in order and sends their replies in one write, then polls the socket for
//! a while (`--nbd-poll-us`) before it blocks in `recv`, so that a client's
//! next request finds it running. A large request, or a lone one that may
//! wait on a disk or on donors, is handed the other way: the thread lets
//! the requests go to the next thread before carrying it out, so replies
//! may come back out of order, as NBD allows. A client that sends garbage or
//! vanishes mid-request only ends its own connection: requests already
//! received still complete, so nothing that was acknowledged, or could
//! have been, is lost.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::{debug, info, warn};

use super::export::{Export, Exports};
use super::proto::{self, Command, OptionRequest, ProtoError, Request};
use crate::store::PAGE_BYTES;

/// Connections served at once; more wait in the listen backlog.
pub const CONNECTIONS_MAX: usize = 256;
/// Threads serving one connection by default (`--nbd-threads`), taking
/// turns at reading (as nbdkit's 16 per connection do). Without polling, at
/// one request in flight the more there are, the likelier the next reader
/// was last woken on the client's core, where it runs at once; 32 answered
/// faster than 16, and 64 no faster than 32 (the NBD benchmark in
/// docs/benchmarks.md). With polling they carry out the requests that may
/// wait while the next is read. Idle ones wait on a lock and cost only
/// their stacks' touched pages.
pub const THREADS_PER_CONNECTION: usize = 32;
/// The most threads a connection may be given: with [`CONNECTIONS_MAX`]
/// connections, 16,384 threads.
pub const THREADS_PER_CONNECTION_MAX: usize = 64;
/// How long the thread holding a connection's requests polls its socket
/// for the next one before it blocks (`--nbd-poll-us`). At one request in
/// flight the client's next request then finds a thread running instead of
/// one to wake, which on an idle core costs more than the request itself
/// (see [`transmission`]). Long enough for a client on the same host to
/// take its reply and send again (docs/benchmarks.md); an idle connection
/// costs one window of a core after its last request.
pub const POLL_DEFAULT: Duration = Duration::from_micros(50);
/// Bytes of large requests being carried out at once, over all
/// connections: what their buffers may take, whatever clients send.
pub const LARGE_BYTES_MAX: usize = 256 << 20;
/// Options one handshake may send before picking an export.
pub const HANDSHAKE_OPTIONS_MAX: usize = 256;
/// How long a client may take over the whole handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a reply may wait for a client that reads nothing before the
/// connection is given up. A client that stops reading would otherwise keep
/// its large requests' share of [`LARGE_BYTES_MAX`] for ever, and with it
/// every other connection's large requests waiting. The kernel's NBD
/// client gives up on a request after 30 s by default too.
pub const REPLY_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the rest of a request may take to arrive once its first bytes
/// have: a client that sends half a large WRITE and stops would otherwise
/// hold its share of [`LARGE_BYTES_MAX`] for ever. Between requests a
/// connection may be idle as long as it likes: a swap device can go hours
/// without I/O, and cutting it would fail the host's swap. A client that
/// is gone without a word is found by TCP keepalive ([`KEEPALIVE_IDLE`]).
pub const REQUEST_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Silence after which the kernel probes an idle connection's peer, every
/// [`KEEPALIVE_INTERVAL`], [`KEEPALIVE_PROBES`] times before it gives the
/// connection (and its slot of [`CONNECTIONS_MAX`]) up.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_PROBES: u32 = 6;
/// How long shutdown waits for connections to finish what they received.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from the socket at a time (many requests per read).
const READ_CHUNK_BYTES: usize = 256 << 10;
/// Bytes of replies (and of WRITE data) one batch of requests may gather
/// before its replies are sent in one write.
const REPLY_BATCH_BYTES_MAX: usize = 256 << 10;
/// The most each of a connection's threads keeps of its reply buffer
/// between batches: what a batch of small requests needs (they are under
/// [`LARGE_BYTES_MIN`] each), so that a client pipelining pages reuses it.
/// Only a large request's replies, paid from [`LARGE_BYTES_MAX`], outgrow
/// it. With [`KEPT_REQUEST_BYTES_MAX`] and [`READ_CHUNK_BYTES`] it bounds
/// what a connection holds outside that budget (the formula is in
/// docs/swap.md).
const KEPT_REPLY_BYTES_MAX: usize = REPLY_BATCH_BYTES_MAX + LARGE_BYTES_MIN;
/// The most each thread keeps of the buffer for requests handed to it:
/// one small request.
const KEPT_REQUEST_BYTES_MAX: usize = LARGE_BYTES_MIN + proto::REQUEST_HEADER_BYTES;
/// Requests at least this long count against [`LARGE_BYTES_MAX`].
pub const LARGE_BYTES_MIN: usize = 64 << 10;

/// The flags every export advertises. CAN_MULTI_CONN holds: all connections
/// share one `Export` (one store area, one backing file), a completed write
/// is visible to reads on every connection, and FLUSH fsyncs the one file
/// that every connection's writes went to.
const EXPORT_FLAGS: u16 = proto::TFLAG_HAS_FLAGS
    | proto::TFLAG_SEND_FLUSH
    | proto::TFLAG_SEND_FUA
    | proto::TFLAG_SEND_TRIM
    | proto::TFLAG_SEND_WRITE_ZEROES
    | proto::TFLAG_CAN_MULTI_CONN;

/// Any byte alignment works (sub-page requests are read-modify-write);
/// whole pages are what the store keeps.
const BLOCK_SIZE: proto::BlockSize = proto::BlockSize {
    min: 1,
    preferred: PAGE_BYTES as u32,
    max: proto::REQUEST_BYTES_MAX as u32,
};

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("client closed the connection in the middle of a message")]
    Truncated,
    #[error("the rest of a request did not come within {REQUEST_STALL_TIMEOUT:?}")]
    RequestStalled,
    #[error("handshake took longer than {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout,
    #[error("more than {HANDSHAKE_OPTIONS_MAX} options without picking an export")]
    TooManyOptions,
    #[error("NBD_OPT_EXPORT_NAME for unknown or malformed export {0:?}")]
    UnknownExport(String),
}

/// Binds the NBD listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// How each connection is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeOptions {
    /// Threads per connection, 1 to [`THREADS_PER_CONNECTION_MAX`].
    pub threads: usize,
    /// How long a connection's reading thread polls before it blocks, up to
    /// [`crate::poll::WINDOW_MAX`]; zero blocks at once.
    pub poll: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            threads: THREADS_PER_CONNECTION,
            poll: POLL_DEFAULT,
        }
    }
}

/// Serves `exports` on `listener` until `shutdown` turns true; then
/// closes the connections' reading sides, lets the requests they received
/// finish, and returns once their threads are done (or after
/// [`DRAIN_TIMEOUT`]).
pub async fn serve(
    listener: TcpListener,
    exports: Arc<Exports>,
    options: ServeOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let shared = Arc::new(Shared {
        large_bytes: Arc::new(Semaphore::new(LARGE_BYTES_MAX / LARGE_BYTES_MIN)),
        runtime: Handle::current(),
        threads: options.threads.clamp(1, THREADS_PER_CONNECTION_MAX),
        poll: options.poll.min(crate::poll::WINDOW_MAX),
    });
    let live = Arc::new(LiveConnections::default());
    while let Some(((stream, peer), permit)) =
        crate::accept::next(&limit, || listener.accept(), &mut shutdown, "nbd").await
    {
        let exports = exports.clone();
        let shared = shared.clone();
        let live = live.clone();
        tokio::spawn(async move {
            let ended = match handshake_on(stream, &exports).await {
                Ok(Some((inbox, stream, export))) => {
                    debug!(export = %export.name(), "nbd transmission");
                    // The first thread owns the permit: the connection counts
                    // until its last request is done.
                    let spawned =
                        std::thread::Builder::new()
                            .name("nbd-conn".into())
                            .spawn(move || {
                                let key = live.add(&stream);
                                let connections = &export.metrics().connections;
                                connections.fetch_add(1, Ordering::Relaxed);
                                let ended = transmission(inbox, stream, export.clone(), shared);
                                connections.fetch_sub(1, Ordering::Relaxed);
                                live.remove(key);
                                log_end(peer, ended);
                                drop(permit);
                            });
                    match spawned {
                        Ok(_) => return,
                        Err(e) => Err(ConnError::Io(e)),
                    }
                }
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            log_end(peer, ended);
        });
    }
    info!("nbd server stopped accepting");
    live.close_reads();
    match tokio::time::timeout(DRAIN_TIMEOUT, limit.acquire_many(CONNECTIONS_MAX as u32)).await {
        Ok(_) => debug!("nbd connections drained"),
        Err(_) => warn!(
            open = CONNECTIONS_MAX - limit.available_permits(),
            "nbd connections still busy at shutdown"
        ),
    }
}

fn log_end(peer: SocketAddr, ended: Result<(), ConnError>) {
    match ended {
        Ok(()) => debug!(%peer, "nbd connection closed"),
        Err(e) => info!(%peer, error = %e, "nbd connection ended"),
    }
}

/// The sockets of the connections in transmission, so that shutdown can
/// end their threads' blocking reads.
#[derive(Default)]
struct LiveConnections {
    next: AtomicU64,
    inner: StdMutex<Live>,
}

#[derive(Default)]
struct Live {
    /// Set by shutdown: a handshake that finishes later gets no new reads.
    closing: bool,
    sockets: HashMap<u64, std::net::TcpStream>,
}

impl LiveConnections {
    fn add(&self, stream: &std::net::TcpStream) -> u64 {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let mut live = self.inner.lock().expect("live set poisoned");
        if live.closing {
            let _ = stream.shutdown(std::net::Shutdown::Read);
        } else if let Ok(clone) = stream.try_clone() {
            live.sockets.insert(key, clone);
        }
        key
    }

    fn remove(&self, key: u64) {
        self.inner
            .lock()
            .expect("live set poisoned")
            .sockets
            .remove(&key);
    }

    /// Each connection's thread sees the end of its stream after the
    /// requests it already has; their replies still go out.
    fn close_reads(&self) {
        let mut live = self.inner.lock().expect("live set poisoned");
        live.closing = true;
        for s in live.sockets.values() {
            let _ = s.shutdown(std::net::Shutdown::Read);
        }
    }
}

/// A socket's read half with its buffer; requests are parsed in place.
struct Reader<R> {
    io: R,
    buf: BytesMut,
}

impl<R: AsyncReadExt + Unpin> Reader<R> {
    /// Parses from the buffer, reading more until `parse` has a value.
    /// `Ok(None)` on a clean end of stream between messages.
    async fn next<T>(
        &mut self,
        parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, ProtoError>,
    ) -> Result<Option<T>, ConnError> {
        // Each pass reads at least one byte, and the parsers bound how many
        // bytes a message may need, so this ends.
        loop {
            if let Some((value, used)) = parse(&self.buf)? {
                self.buf.advance(used);
                return Ok(Some(value));
            }
            self.buf.reserve(READ_CHUNK_BYTES);
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ConnError::Truncated)
                };
            }
        }
    }
}

/// Runs the handshake on the runtime; the bytes already received after it,
/// the socket made blocking for the connection's thread, and the export
/// picked. `None` if the client aborted or went away.
async fn handshake_on(
    stream: TcpStream,
    exports: &Exports,
) -> Result<Option<(Inbox, std::net::TcpStream, Arc<Export>)>, ConnError> {
    // Replies are small and latency matters more than packet count.
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let mut reader = Reader {
        io: rd,
        buf: BytesMut::with_capacity(READ_CHUNK_BYTES),
    };
    let export =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut reader, &mut wr, exports))
            .await
        {
            Ok(Ok(Some(export))) => export,
            Ok(Ok(None)) => return Ok(None),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(ConnError::HandshakeTimeout),
        };
    let stream = reader
        .io
        .reunite(wr)
        .expect("halves of one stream")
        .into_std()?;
    stream.set_nonblocking(false)?;
    // Per send call: a client that reads slowly is fine, one that reads
    // nothing for this long is gone.
    stream.set_write_timeout(Some(REPLY_STALL_TIMEOUT))?;
    // Per recv call: bounds how long a request may be half-received (see
    // `Requests::wait_for_one`); an idle connection just waits again.
    stream.set_read_timeout(Some(REQUEST_STALL_TIMEOUT))?;
    socket2::SockRef::from(&stream).set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES),
    )?;
    Ok(Some((Inbox::new(&reader.buf), stream, export)))
}

/// Runs the option haggling; the export picked, or `None` if the client
/// aborted or went away.
async fn handshake<R: AsyncReadExt + Unpin>(
    reader: &mut Reader<R>,
    wr: &mut OwnedWriteHalf,
    exports: &Exports,
) -> Result<Option<Arc<Export>>, ConnError> {
    let mut out = BytesMut::with_capacity(256);
    proto::encode_greeting(&mut out);
    wr.write_all(&out).await?;
    let Some(client) = reader.next(proto::parse_client_flags).await? else {
        return Ok(None);
    };
    for _ in 0..HANDSHAKE_OPTIONS_MAX {
        let Some(option) = reader.next(proto::parse_option).await? else {
            return Ok(None);
        };
        out.clear();
        let mut chosen = None;
        match option {
            OptionRequest::ExportName(name) => {
                // This option has no way to report an error but closing.
                let export = exports
                    .get(&name)
                    .ok_or(ConnError::UnknownExport(name))?
                    .clone();
                proto::encode_export_name_reply(
                    &mut out,
                    export.size_bytes(),
                    EXPORT_FLAGS,
                    client.no_zeroes,
                );
                chosen = Some(export);
            }
            OptionRequest::Abort => {
                proto::encode_option_reply(&mut out, proto::OPT_ABORT, proto::REP_ACK, &[]);
                // The client may already be gone; that is fine.
                let _ = wr.write_all(&out).await;
                return Ok(None);
            }
            OptionRequest::List => {
                for e in exports.iter() {
                    proto::encode_rep_server(&mut out, e.name());
                }
                proto::encode_option_reply(&mut out, proto::OPT_LIST, proto::REP_ACK, &[]);
            }
            OptionRequest::Info(req) => {
                info_reply(&mut out, proto::OPT_INFO, &req, exports);
            }
            OptionRequest::Go(req) => {
                chosen = info_reply(&mut out, proto::OPT_GO, &req, exports);
            }
            OptionRequest::Unsupported { option } => proto::encode_option_error(
                &mut out,
                option,
                proto::REP_ERR_UNSUP,
                &format!("option {option} is not supported by this server"),
            ),
            OptionRequest::Malformed {
                option: proto::OPT_EXPORT_NAME,
                ..
            } => return Err(ConnError::UnknownExport("<not UTF-8>".into())),
            OptionRequest::Malformed { option, reason } => {
                proto::encode_option_error(&mut out, option, proto::REP_ERR_INVALID, reason)
            }
        }
        wr.write_all(&out).await?;
        if chosen.is_some() {
            return Ok(chosen);
        }
    }
    Err(ConnError::TooManyOptions)
}

/// Answers NBD_OPT_INFO or NBD_OPT_GO: the export's size, flags and block
/// sizes (always sent: we accept any alignment, so no client is hurt by
/// them), its name if asked, then ACK. The export, if there is one.
fn info_reply(
    out: &mut BytesMut,
    option: u32,
    req: &proto::InfoRequest,
    exports: &Exports,
) -> Option<Arc<Export>> {
    let Some(export) = exports.get(&req.name) else {
        proto::encode_option_error(
            out,
            option,
            proto::REP_ERR_UNKNOWN,
            &format!("no export named {:?}", req.name),
        );
        return None;
    };
    proto::encode_info_export(out, option, export.size_bytes(), EXPORT_FLAGS);
    if req.requests.contains(&proto::INFO_NAME) {
        proto::encode_info_name(out, option, export.name());
    }
    if req.requests.contains(&proto::INFO_DESCRIPTION) {
        proto::encode_info_description(out, option, &export.description());
    }
    proto::encode_info_block_size(out, option, BLOCK_SIZE);
    proto::encode_option_reply(out, option, proto::REP_ACK, &[]);
    Some(export.clone())
}

/// The share of [`LARGE_BYTES_MAX`] a large request takes, in units of
/// [`LARGE_BYTES_MIN`]. Only READ and WRITE hold buffers of their length.
fn budget_units(req: &Request) -> u32 {
    match req.command {
        Command::Read | Command::Write => (req.length as usize).div_ceil(LARGE_BYTES_MIN) as u32,
        _ => 1,
    }
}

/// The budget units of the large WRITE whose header heads `buf`, if its
/// data is still to come (and it will be carried out, not refused).
fn large_write_arriving(buf: &[u8], export_bytes: u64) -> Option<u32> {
    if buf.len() < proto::REQUEST_HEADER_BYTES {
        return None;
    }
    let req = proto::parse_request_header(buf).ok()?;
    (req.command == Command::Write
        && req.length as usize >= LARGE_BYTES_MIN
        && proto::check_request(&req, export_bytes).is_ok())
    .then(|| budget_units(&req))
}

/// What a connection's threads need from the server around it.
struct Shared {
    /// The server-wide budget of large requests' buffers, in units of
    /// [`LARGE_BYTES_MIN`].
    large_bytes: Arc<Semaphore>,
    /// Waits on that budget from the connections' threads.
    runtime: Handle,
    /// Threads per connection.
    threads: usize,
    /// How long the reading thread polls before it blocks.
    poll: Duration,
}

/// The bytes a connection has received and not yet carried out. One
/// zeroed allocation is reused: reads land after what is kept, and what is
/// kept moves to the front only when the tail runs short.
struct Inbox {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Inbox {
    fn new(leftover: &[u8]) -> Self {
        let mut buf = vec![0; READ_CHUNK_BYTES.max(leftover.len())];
        buf[..leftover.len()].copy_from_slice(leftover);
        Inbox {
            buf,
            start: 0,
            end: leftover.len(),
        }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            // Only a large WRITE grows the buffer, on the budget it has
            // given back by now: give the memory back too.
            if self.buf.len() > READ_CHUNK_BYTES {
                self.buf = vec![0; READ_CHUNK_BYTES];
            }
        }
    }

    /// Room for at least `want` more bytes than are kept (the rest of a
    /// request whose header says how long it is), and half a chunk at
    /// least: the free tail of the buffer.
    fn room(&mut self, want: usize) -> &mut [u8] {
        let kept = self.end - self.start;
        let room = want.max(READ_CHUNK_BYTES / 2);
        if self.buf.len() - self.end < room {
            self.buf.copy_within(self.start..self.end, 0);
            self.start = 0;
            self.end = kept;
            if self.buf.len() < kept + room {
                self.buf.resize(kept + room, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// One blocking read from `io` into [`Inbox::room`]. The bytes read; 0
    /// at the end of the stream.
    fn fill(&mut self, io: &mut impl Read, want: usize) -> std::io::Result<usize> {
        let n = io.read(self.room(want))?;
        self.end += n;
        Ok(n)
    }

    /// Reads from `io` without blocking, again and again until bytes come
    /// or `until` passes: the bytes read (0 at the end of the stream), or
    /// `None` if nothing came in time. Each try is one `recv` with
    /// MSG_DONTWAIT, a flag of the call: the socket itself stays blocking
    /// for the writer that shares it.
    fn fill_polling(
        &mut self,
        io: &std::net::TcpStream,
        want: usize,
        until: Instant,
    ) -> std::io::Result<Option<usize>> {
        use std::os::fd::AsRawFd;
        loop {
            let tail = self.room(want);
            // SAFETY: `tail` is valid for writes of its length, and `io`'s
            // descriptor is open for as long as `io` is borrowed.
            let n = unsafe {
                libc::recv(
                    io.as_raw_fd(),
                    tail.as_mut_ptr().cast(),
                    tail.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if let Ok(n) = usize::try_from(n) {
                self.end += n;
                return Ok(Some(n));
            }
            let e = std::io::Error::last_os_error();
            if !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) {
                return Err(e);
            }
            if Instant::now() >= until {
                return Ok(None);
            }
            std::hint::spin_loop();
        }
    }
}

/// The reading side of a connection in transmission, held by one of its
/// threads at a time.
struct Requests {
    inbox: Inbox,
    io: std::net::TcpStream,
    /// The budget granted to the large WRITE at the head of the inbox
    /// before its data was read: its buffer is paid for before it grows.
    budget: Option<OwnedSemaphorePermit>,
    /// No more requests will be taken: the stream ended, failed or carried
    /// garbage, or the client said NBD_CMD_DISC.
    done: bool,
}

/// Requests taken off the connection together, to be carried out in order
/// by one thread and answered in one write. They stay where they arrived,
/// the first `span` bytes of the inbox, while the thread keeps the
/// requests; a thread that lets them go first copies those bytes out.
#[derive(Default)]
struct Batch {
    /// Each request, what [`proto::check_request`] said of it, and where
    /// its WRITE data lies within the batch's bytes.
    requests: Vec<(Request, Result<(), u32>, std::ops::Range<usize>)>,
    /// How many bytes of the inbox the batch covers.
    span: usize,
    /// The bytes its READs' replies will take: with `span`, what bounds
    /// the batch (many small READs ask for far more than they send).
    reply_bytes: usize,
    /// No complete request was queued behind the batch: the client is
    /// likely waiting on its replies.
    last: bool,
    /// The batch's share of the server-wide budget, if it is one large
    /// request.
    budget: Option<OwnedSemaphorePermit>,
}

impl Batch {
    fn clear(&mut self) {
        self.requests.clear();
        self.span = 0;
        self.reply_bytes = 0;
        self.last = false;
        self.budget = None;
    }
}

impl Requests {
    /// Waits until a request (or garbage) is complete at the head of the
    /// buffer, reading the socket: polling it for `poll` first, then
    /// blocking. A large WRITE's share of the server-wide budget is taken
    /// as soon as its header is in, before the buffer grows for its data.
    /// `Ok(false)` once the connection is done.
    fn wait_for_one(&mut self, export: &Export, shared: &Shared) -> Result<bool, ConnError> {
        let metrics = export.metrics();
        let mut until = (!shared.poll.is_zero()).then(|| Instant::now() + shared.poll);
        // Each pass reads at least one byte of a request bounded by
        // REQUEST_BYTES_MAX, or ends the poll, or waits out an idle
        // timeout on an empty buffer, so this ends when the client ends.
        while !self.done {
            if !matches!(proto::parse_request(self.inbox.data()), Ok(None)) {
                return Ok(true);
            }
            if self.budget.is_none()
                && let Some(units) = large_write_arriving(self.inbox.data(), export.size_bytes())
            {
                self.budget = Some(shared.take_budget(units));
            }
            let want = proto::request_bytes_missing(self.inbox.data());
            let polled = match until {
                Some(t) => self.inbox.fill_polling(&self.io, want, t).transpose(),
                None => None,
            };
            let read = match polled {
                Some(read) => {
                    metrics.polls_found.fetch_add(1, Ordering::Relaxed);
                    read
                }
                None => {
                    if until.take().is_some() {
                        metrics.polls_slept.fetch_add(1, Ordering::Relaxed);
                    }
                    self.inbox.fill(&mut self.io, want)
                }
            };
            match read {
                Ok(0) => {
                    self.done = true;
                    if !self.inbox.data().is_empty() {
                        return Err(ConnError::Truncated);
                    }
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // The socket's read timeout: fine between requests, not in
                // the middle of one.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if !self.inbox.data().is_empty() {
                        self.done = true;
                        return Err(ConnError::RequestStalled);
                    }
                }
                Err(e) => {
                    self.done = true;
                    return Err(e.into());
                }
            }
        }
        Ok(false)
    }

    /// Gathers the complete requests buffered into `batch`, without reading
    /// or consuming them: small ones up to [`REPLY_BATCH_BYTES_MAX`], or one
    /// large one alone. `Ok(false)` if the connection is done. Requests already complete in
    /// the buffer are still handed out after the stream ended, so
    /// everything received is carried out.
    fn take(
        &mut self,
        export: &Export,
        shared: &Shared,
        batch: &mut Batch,
    ) -> Result<bool, ConnError> {
        batch.clear();
        // Each pass takes a request from a finite buffer.
        loop {
            let data = &self.inbox.data()[batch.span..];
            let (req, used) = match proto::parse_request(data) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    batch.last = true;
                    return Ok(!batch.requests.is_empty());
                }
                // Garbage after a batch ends the connection on the next take.
                Err(_) if !batch.requests.is_empty() => return Ok(true),
                Err(e) => {
                    self.done = true;
                    return Err(e.into());
                }
            };
            if req.command == Command::Disc {
                if !batch.requests.is_empty() {
                    return Ok(true);
                }
                self.inbox.consume(used);
                self.done = true;
                return Ok(false);
            }
            // Checked once, here; a request refused by the checks costs
            // nothing and is answered like any other.
            let checked = proto::check_request(&req, export.size_bytes());
            let large = req.length as usize >= LARGE_BYTES_MIN && checked.is_ok();
            if large {
                if !batch.requests.is_empty() {
                    return Ok(true);
                }
                // A WRITE paid before its data was read; the rest pay now.
                // Waiting here holds this connection's reading back, as
                // it should.
                batch.budget = Some(match self.budget.take() {
                    Some(paid) => paid,
                    None => shared.take_budget(budget_units(&req)),
                });
            }
            let payload = batch.span + proto::REQUEST_HEADER_BYTES..batch.span + used;
            batch.requests.push((req, checked, payload));
            batch.span += used;
            if req.command == Command::Read && checked.is_ok() {
                batch.reply_bytes += req.length as usize;
            }
            if large || batch.span + batch.reply_bytes >= REPLY_BATCH_BYTES_MAX {
                let behind = &self.inbox.data()[batch.span..];
                batch.last = matches!(proto::parse_request(behind), Ok(None));
                return Ok(true);
            }
        }
    }
}

/// One connection in transmission, served by a few threads in turn
/// (leader/followers, as nbdkit serves one): the thread holding the
/// requests takes what has arrived, lets the next thread have them, carries
/// its batch out and sends the replies in one write, under the writer's
/// lock so that batches never interleave. Replies may come back out of
/// order, as NBD allows.
struct Connection {
    export: Arc<Export>,
    requests: StdMutex<Requests>,
    writer: StdMutex<std::net::TcpStream>,
    /// Why the connection ended, if it did not end cleanly: the first error.
    failed: StdMutex<Option<ConnError>>,
}

impl Shared {
    /// Waits for `units` of the server-wide budget. check_request bounds a
    /// request by REQUEST_BYTES_MAX, far below the whole budget, so the
    /// grant always comes once others give theirs back.
    fn take_budget(&self, units: u32) -> OwnedSemaphorePermit {
        debug_assert!(units as usize <= LARGE_BYTES_MAX / LARGE_BYTES_MIN);
        self.runtime
            .block_on(self.large_bytes.clone().acquire_many_owned(units))
            .expect("semaphore never closed")
    }
}

impl Connection {
    /// One thread's share: take, carry out, reply, until the requests are
    /// done. The thread holding the requests keeps them while it carries
    /// out what a client pipelined: what arrives meanwhile gathers into its
    /// next batch, and no other thread is woken; after the replies it polls
    /// for the next request. It lets them go before carrying out a large
    /// request, and a lone one that may wait (see [`may_wait`]), so that
    /// what follows is not held up behind it; with polling off, before any
    /// lone request, so that the next thread already waits in `recv` (see
    /// [`transmission`] for why that matters at one request in flight).
    fn serve(&self, shared: &Shared) {
        let mut batch = Batch::default();
        let mut replies = BytesMut::new();
        // A handed-on batch's bytes, copied out of the inbox.
        let mut owned = Vec::new();
        loop {
            let mut requests = Some(self.requests.lock().expect("requests poisoned"));
            while let Some(mut r) = requests.take() {
                let taken = match r.wait_for_one(&self.export, shared) {
                    Ok(true) => r.take(&self.export, shared, &mut batch),
                    Ok(false) => return,
                    Err(e) => Err(e),
                };
                match taken {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => return self.fail(e),
                }
                let lone = batch.requests.len() == 1 && batch.last;
                let hand_on = batch.budget.is_some()
                    || (lone
                        && (shared.poll.is_zero() || may_wait(&self.export, &batch.requests[0].0)));
                replies.clear();
                let sent = if hand_on {
                    owned.clear();
                    owned.extend_from_slice(&r.inbox.data()[..batch.span]);
                    r.inbox.consume(batch.span);
                    drop(r);
                    self.carry_out(&batch, &owned, &mut replies)
                } else {
                    let sent = self.carry_out(&batch, r.inbox.data(), &mut replies);
                    r.inbox.consume(batch.span);
                    requests = Some(r);
                    sent
                };
                if let Err(e) = sent {
                    // A client that went away, or stopped reading, misses
                    // its replies; the requests' effects stand, as a disk's
                    // would. What was received is still carried out.
                    self.fail(e.into());
                }
                // Gives a large request's budget back now, not at the next take.
                batch.clear();
                // A large request's buffers were paid from the budget it
                // has given back: give the memory back too.
                if replies.capacity() > KEPT_REPLY_BYTES_MAX {
                    replies = BytesMut::new();
                }
                if owned.capacity() > KEPT_REQUEST_BYTES_MAX {
                    owned = Vec::new();
                }
            }
        }
    }

    /// Carries out a batch (its requests' bytes in `bytes`) in order and
    /// sends its replies. Each request is carried out before it is
    /// answered: acknowledging a one-page write before compressing it was
    /// measured no faster at either queue depth once the next request is
    /// read by another thread, and slower at one in flight (the replying
    /// thread then competes with the client for its core).
    fn carry_out(
        &self,
        batch: &Batch,
        bytes: &[u8],
        replies: &mut BytesMut,
    ) -> std::io::Result<()> {
        for (req, checked, payload) in &batch.requests {
            execute(
                &self.export,
                req,
                *checked,
                &bytes[payload.clone()],
                replies,
            );
        }
        self.send(replies)
    }

    /// Sends a batch's replies within [`REPLY_STALL_TIMEOUT`]. If that
    /// fails, the socket is shut both ways while the writer is still held:
    /// reading stops, and the other threads' replies fail at once instead of
    /// each waiting out the timeout on a client that reads nothing.
    fn send(&self, replies: &[u8]) -> std::io::Result<()> {
        let mut writer = self.writer.lock().expect("reply writer poisoned");
        write_within(&mut writer, replies, REPLY_STALL_TIMEOUT).inspect_err(|_| {
            let _ = writer.shutdown(std::net::Shutdown::Both);
        })
    }

    fn fail(&self, e: ConnError) {
        self.failed
            .lock()
            .expect("connection state poisoned")
            .get_or_insert(e);
    }
}

/// Writes all of `bytes` to `stream` by `limit` from now. The socket's
/// send timeout bounds each call, not the whole: a client that takes a few
/// bytes now and then would otherwise hold a reply (and its share of
/// [`LARGE_BYTES_MAX`]) for a multiple of it. The common case, a reply the
/// socket takes in one call, costs that call and a read of the clock; only
/// a short write narrows the timeout, and sets it back after.
fn write_within(
    stream: &mut std::net::TcpStream,
    bytes: &[u8],
    limit: Duration,
) -> std::io::Result<()> {
    let stalled = || {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the client read no reply for {} s", limit.as_secs()),
        )
    };
    let deadline = Instant::now() + limit;
    let mut rest = bytes;
    let mut narrowed = false;
    while !rest.is_empty() {
        match stream.write(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(stalled());
            }
            Err(e) => return Err(e),
        }
        if rest.is_empty() {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(stalled());
        }
        stream.set_write_timeout(Some(left))?;
        narrowed = true;
    }
    if narrowed {
        stream.set_write_timeout(Some(limit))?;
    }
    Ok(())
}

/// Transmission, on threads of the connection's own with blocking socket
/// calls. A request wakes the thread waiting in `recv` straight from the
/// socket, as a kernel driver's thread would be woken, rather than an event
/// loop that then polls the connection. At one request in flight the wakes
/// are most of the latency, and what a wake costs depends on where it
/// lands: a thread woken on the core the client is leaving runs at once,
/// one woken on an idle core waits for it to come out of its idle state,
/// longer than a whole round trip takes when both share a core (the
/// figures are in docs/benchmarks.md). Polling the socket for a while
/// after the replies avoids the wake altogether when the next request
/// comes within the window.
/// With polling off, handing the reading to the next thread before a lone
/// request is carried out wakes that thread while the client sleeps, so
/// it last ran on the client's core, where the client's next request then
/// wakes it. Pipelined requests stay with one thread (see
/// [`Connection::serve`]). The export's calls are synchronous and may wait
/// on donors; that blocks one of this connection's threads, never a
/// runtime worker.
fn transmission(
    inbox: Inbox,
    stream: std::net::TcpStream,
    export: Arc<Export>,
    shared: Arc<Shared>,
) -> Result<(), ConnError> {
    let conn = Arc::new(Connection {
        export,
        requests: StdMutex::new(Requests {
            inbox,
            io: stream.try_clone()?,
            budget: None,
            done: false,
        }),
        writer: StdMutex::new(stream),
        failed: StdMutex::new(None),
    });
    let mut followers = Vec::with_capacity(shared.threads - 1);
    for _ in 1..shared.threads {
        let (conn, shared) = (conn.clone(), shared.clone());
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || conn.serve(&shared));
        match spawned {
            Ok(handle) => followers.push(handle),
            // Fewer threads serve it; the connection still works.
            Err(e) => warn!(error = %e, "nbd connection: no thread for a follower"),
        }
    }
    conn.serve(&shared);
    // Every request received finishes before the socket closes.
    for f in followers {
        if f.join().is_err() {
            conn.fail(ConnError::Io(std::io::Error::other(
                "a connection thread panicked",
            )));
        }
    }
    let _ = conn
        .writer
        .lock()
        .expect("reply writer poisoned")
        .shutdown(std::net::Shutdown::Both);
    match conn
        .failed
        .lock()
        .expect("connection state poisoned")
        .take()
    {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Whether carrying out `req` may take far longer than a page in this
/// node's memory: an fsync of the backing file, or, on a cluster node, a
/// page to fetch from a donor or room to wait for while remotify ships
/// pages out.
fn may_wait(export: &Export, req: &Request) -> bool {
    req.command == Command::Flush || req.fua() || export.has_donors()
}

/// Carries out one request (`payload`: a WRITE's data; `checked`: what
/// [`proto::check_request`] said of it) and appends its whole reply:
/// header, and data for a successful read.
fn execute(
    export: &Export,
    req: &Request,
    checked: Result<(), u32>,
    payload: &[u8],
    out: &mut BytesMut,
) {
    let start = out.len();
    let mut header = [0u8; proto::SIMPLE_REPLY_HEADER_BYTES];
    let error = match checked {
        Err(e) => {
            debug!(export = %export.name(), ?req, error = e, "request refused");
            e
        }
        Ok(()) => {
            let len = u64::from(req.length);
            let done = match req.command {
                Command::Read => {
                    let data = start + proto::SIMPLE_REPLY_HEADER_BYTES;
                    out.resize(data + req.length as usize, 0);
                    export.read(req.offset, &mut out[data..])
                }
                Command::Write => export.write(req.offset, payload, req.fua()),
                Command::WriteZeroes => {
                    export.write_zeroes(req.offset, len, req.fua(), req.no_hole())
                }
                Command::Trim => export.trim(req.offset, len),
                Command::Flush => export.flush(),
                Command::Disc | Command::Other(_) => unreachable!("refused by check_request"),
            };
            match done {
                Ok(()) => 0,
                Err(e) => {
                    warn!(export = %export.name(), ?req, error = %e, "request failed");
                    e.nbd_error()
                }
            }
        }
    };
    proto::encode_simple_reply(&mut header, error, req.handle);
    if error != 0 {
        // No data follows an error.
        out.truncate(start);
    }
    if out.len() == start {
        out.extend_from_slice(&header);
    } else {
        out[start..start + proto::SIMPLE_REPLY_HEADER_BYTES].copy_from_slice(&header);
    }
}
