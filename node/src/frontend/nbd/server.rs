//! The NBD server: glue around [`proto`](super::proto) and
//! [`Export`](super::export::Export).
//!
//! Per connection: the fixed newstyle handshake on the runtime, then
//! transmission on a thread of the connection's own, with blocking socket
//! calls (see [`transmission`] for why). That thread parses every request
//! the client has pipelined; small requests are carried out in place and
//! their replies leave together in one write; large ones run on the
//! runtime's blocking pool (at most [`REQUESTS_IN_FLIGHT_MAX`] at a time)
//! and reply when done, so replies may come back out of order, as NBD
//! allows. A one-page write that is the last request received is
//! acknowledged before it is carried out (see [`reply_then_write`]). A
//! client that sends garbage or vanishes mid-request only ends
//! its own connection: requests already received still complete, so
//! nothing that was acknowledged, or could have been, is lost.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex as StdMutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};

use super::export::{Export, Exports};
use super::proto::{self, Command, OptionRequest, ProtoError, Request};
use crate::store::PAGE_BYTES;

/// Connections served at once; more wait in the listen backlog.
pub const CONNECTIONS_MAX: usize = 256;
/// Requests of one connection being carried out at once.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 64;
/// Bytes of large requests being carried out at once, over all
/// connections: what their buffers may take, whatever clients send.
pub const SPAWNED_BYTES_MAX: usize = 256 << 20;
/// Options one handshake may send before picking an export.
pub const HANDSHAKE_OPTIONS_MAX: usize = 256;
/// How long a client may take over the whole handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for connections to finish what they received.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from the socket at a time (many requests per read).
const READ_CHUNK_BYTES: usize = 256 << 10;
/// Replies gathered before they are sent in one write.
const REPLY_BATCH_BYTES_MAX: usize = 256 << 10;
/// Requests at least this long run on a thread of the blocking pool.
pub const SPAWN_BYTES_MIN: usize = 64 << 10;

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

/// Serves `exports` on `listener` until `shutdown` turns true; then closes
/// the connections' reading sides, lets the requests they received finish,
/// and returns once their threads are done (or after [`DRAIN_TIMEOUT`]).
pub async fn serve(
    listener: TcpListener,
    exports: Arc<Exports>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let shared = Arc::new(Shared {
        spawned_bytes: Arc::new(Semaphore::new(SPAWNED_BYTES_MAX / SPAWN_BYTES_MIN)),
        runtime: Handle::current(),
    });
    let live = Arc::new(LiveConnections::default());
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "nbd accept failed");
                    // Out of file descriptors, typically: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let exports = exports.clone();
        let shared = shared.clone();
        let live = live.clone();
        tokio::spawn(async move {
            let ended = match handshake_on(stream, &exports).await {
                Ok(Some((inbox, stream, export))) => {
                    debug!(export = %export.name(), "nbd transmission");
                    // The thread owns the permit: the connection counts until
                    // its last request is done.
                    let spawned =
                        std::thread::Builder::new()
                            .name("nbd-conn".into())
                            .spawn(move || {
                                let key = live.add(&stream);
                                let ended = transmission(inbox, stream, export, &shared);
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
    proto::encode_info_block_size(out, option, BLOCK_SIZE);
    proto::encode_option_reply(out, option, proto::REP_ACK, &[]);
    Some(export.clone())
}

/// Shared by the connection's thread and its large requests: each writes
/// whole replies at once, under the lock, so replies never interleave.
type ReplyWriter = Arc<StdMutex<std::net::TcpStream>>;

/// What a connection's thread needs from the server around it.
struct Shared {
    /// The server-wide budget of large requests, in units of
    /// [`SPAWN_BYTES_MIN`].
    spawned_bytes: Arc<Semaphore>,
    /// Runs large requests (on its blocking pool) and waits on the budget.
    runtime: Handle,
}

/// Why the inner request loop stopped.
enum Drained {
    /// The buffer holds no complete request: read more.
    NeedBytes,
    /// The reply batch is full: send it, then go on.
    BatchFull,
    /// NBD_CMD_DISC.
    Disconnect,
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
            // A large write grew the buffer; give the memory back.
            if self.buf.len() > 4 * READ_CHUNK_BYTES {
                self.buf = vec![0; READ_CHUNK_BYTES];
            }
        }
    }

    /// One read from `io`, with room for at least `want` more bytes than
    /// are kept (the rest of a request whose header says how long it is).
    /// The bytes read; 0 at the end of the stream.
    fn fill(&mut self, io: &mut impl Read, want: usize) -> std::io::Result<usize> {
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
        let n = io.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }
}

/// How many of a connection's requests may run at once: the thread's own,
/// plus its large ones on the runtime's blocking pool.
struct InFlight {
    running: StdMutex<usize>,
    changed: Condvar,
}

impl InFlight {
    fn acquire(&self) {
        let mut n = self.running.lock().expect("in-flight count poisoned");
        while *n >= REQUESTS_IN_FLIGHT_MAX {
            n = self.changed.wait(n).expect("in-flight count poisoned");
        }
        *n += 1;
    }

    fn release(&self) {
        *self.running.lock().expect("in-flight count poisoned") -= 1;
        self.changed.notify_all();
    }

    fn wait_idle(&self) {
        let mut n = self.running.lock().expect("in-flight count poisoned");
        while *n > 0 {
            n = self.changed.wait(n).expect("in-flight count poisoned");
        }
    }
}

/// Transmission, on the connection's own thread with blocking socket calls.
/// A request wakes this thread straight from the socket, as a kernel
/// driver's thread would be woken, rather than an event loop that then
/// polls the connection: at one request in flight that wake is most of the
/// latency. It also suits the export, whose calls are synchronous and may
/// wait on donors: that blocks this connection only, never a runtime
/// worker.
fn transmission(
    mut inbox: Inbox,
    stream: std::net::TcpStream,
    export: Arc<Export>,
    shared: &Shared,
) -> Result<(), ConnError> {
    let mut rd = stream.try_clone()?;
    let writer: ReplyWriter = Arc::new(StdMutex::new(stream));
    let in_flight = Arc::new(InFlight {
        running: StdMutex::new(0),
        changed: Condvar::new(),
    });
    let mut replies = BytesMut::with_capacity(REPLY_BATCH_BYTES_MAX);
    let ended = loop {
        let drained = drain_requests(
            &mut inbox,
            &export,
            &mut replies,
            &writer,
            &in_flight,
            shared,
        );
        if !replies.is_empty() {
            // A client that went away misses its replies; the requests'
            // effects stand, as a disk's would.
            let sent = writer
                .lock()
                .expect("reply writer poisoned")
                .write_all(&replies);
            if let Err(e) = sent {
                break Err(e.into());
            }
            replies.clear();
        }
        let want = match drained {
            Ok(Drained::BatchFull) => continue,
            Ok(Drained::Disconnect) => break Ok(()),
            Ok(Drained::NeedBytes) => proto::request_bytes_missing(inbox.data()),
            Err(e) => break Err(e),
        };
        match inbox.fill(&mut rd, want) {
            Ok(0) if inbox.data().is_empty() => break Ok(()),
            Ok(0) => break Err(ConnError::Truncated),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e.into()),
        }
    };
    // Let every request already received finish before the socket closes.
    in_flight.wait_idle();
    let _ = writer
        .lock()
        .expect("reply writer poisoned")
        .shutdown(std::net::Shutdown::Both);
    ended
}

/// Carries out the complete requests in `inbox`, appending their replies to
/// `replies`. Small requests run right here: a page costs about what
/// handing it to another thread would, and their replies then leave in one
/// write. Large ones run on the runtime's blocking pool, alongside, and
/// reply when done (out of order, as NBD allows).
fn drain_requests(
    inbox: &mut Inbox,
    export: &Arc<Export>,
    replies: &mut BytesMut,
    writer: &ReplyWriter,
    in_flight: &Arc<InFlight>,
    shared: &Shared,
) -> Result<Drained, ConnError> {
    // Each pass consumes one request from a finite buffer.
    loop {
        let Some((req, used)) = proto::parse_request(inbox.data())? else {
            return Ok(Drained::NeedBytes);
        };
        if req.command == Command::Disc {
            inbox.consume(used);
            return Ok(Drained::Disconnect);
        }
        // Checked once, here; a request refused by the checks costs
        // nothing: answer it in place.
        let checked = proto::check_request(&req, export.size_bytes());
        let large = req.length as usize >= SPAWN_BYTES_MIN && checked.is_ok();
        if large {
            let payload = inbox.data()[proto::REQUEST_HEADER_BYTES..used].to_vec();
            inbox.consume(used);
            in_flight.acquire();
            // Only READ and WRITE hold buffers of their length; check_request
            // bounds that by REQUEST_BYTES_MAX, far below the whole budget,
            // so the grant always comes. TRIM and WRITE_ZEROES hold none.
            let units = match req.command {
                Command::Read | Command::Write => {
                    (req.length as usize).div_ceil(SPAWN_BYTES_MIN) as u32
                }
                _ => 1,
            };
            debug_assert!(units as usize <= SPAWNED_BYTES_MAX / SPAWN_BYTES_MIN);
            let budget = shared
                .runtime
                .block_on(shared.spawned_bytes.clone().acquire_many_owned(units))
                .expect("semaphore never closed");
            let export = export.clone();
            let writer = writer.clone();
            let in_flight = in_flight.clone();
            shared.runtime.spawn_blocking(move || {
                let mut reply = BytesMut::new();
                execute(&export, &req, checked, &payload, &mut reply);
                let _ = writer
                    .lock()
                    .expect("reply writer poisoned")
                    .write_all(&reply);
                drop(budget);
                in_flight.release();
            });
        } else {
            let payload = &inbox.data()[proto::REQUEST_HEADER_BYTES..used];
            // Only when what follows is an incomplete request: a complete
            // one rides in this batch, and garbage must end the connection
            // on the next pass, not wait for more bytes.
            if req.command == Command::Write
                && checked.is_ok()
                && matches!(proto::parse_request(&inbox.data()[used..]), Ok(None))
                && let Some(behind) = export.write_behind(req.offset, req.length, req.fua())
            {
                let sent = reply_then_write(behind, &req, payload, replies, writer);
                inbox.consume(used);
                sent?;
                return Ok(Drained::NeedBytes);
            }
            execute(export, &req, checked, payload, replies);
            inbox.consume(used);
            if replies.len() >= REPLY_BATCH_BYTES_MAX {
                return Ok(Drained::BatchFull);
            }
        }
    }
}

/// The last request received is a one-page write: sends its reply, with
/// the batch before it, and only then stores the page. At one request in
/// flight the client's next request no longer waits on the page's
/// compression, which is the most of a write's own time; the client is
/// told no sooner than the page's lock makes the write visible to every
/// connection (see [`WriteBehind`](super::export::WriteBehind)). The write
/// is carried out even if the reply could not be sent.
fn reply_then_write(
    behind: super::export::WriteBehind<'_>,
    req: &Request,
    payload: &[u8],
    replies: &mut BytesMut,
    writer: &ReplyWriter,
) -> Result<(), ConnError> {
    let mut header = [0u8; proto::SIMPLE_REPLY_HEADER_BYTES];
    proto::encode_simple_reply(&mut header, 0, req.handle);
    replies.extend_from_slice(&header);
    let sent = writer
        .lock()
        .expect("reply writer poisoned")
        .write_all(replies);
    replies.clear();
    behind.finish(payload.try_into().expect("a one-page write"));
    Ok(sent?)
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
