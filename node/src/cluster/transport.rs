//! The peer transport: QUIC (quinn) with mutual TLS between nodes. Thin glue:
//! what a request means and whether it is allowed is decided in [`rpc`] and
//! the [`DonorStore`]; this module moves frames and enforces time and space
//! limits.
//!
//! - **One connection per peer.** [`PeerEndpoint::session`] dials a peer once
//!   and hands out the same [`PeerSession`] until the connection is lost,
//!   then dials again. A connection serves both directions: the accepting
//!   node registers it too and sends its own requests over it. (Two nodes
//!   dialling each other at the same instant may briefly hold two
//!   connections; both work, and the later one is only used by its dialler.)
//! - **Long-lived streams.** A session opens [`TransportConfig::page_streams`]
//!   bidirectional streams once and sends every request on one of them as a
//!   length-delimited frame with a request id; answers come back on the same
//!   stream and are matched by id, so many batches are in flight at once. A
//!   stream per request measured ~2.5× slower on loopback.
//! - **Limits.** Every RPC has a deadline (connecting included); a session
//!   has at most `in_flight_requests_max` requests outstanding (callers wait
//!   for a slot: back-pressure); a peer may open at most
//!   [`PEER_STREAMS_MAX`] streams; at most [`SESSIONS_MAX`] incoming
//!   connections are served at once; frames are capped at
//!   [`FRAME_BYTES_MAX`].
//! - **Identity.** The TLS handshake proves that both sides hold a
//!   certificate of the cluster CA; the accepting side then checks that the
//!   name in the peer's hello is a name its certificate is valid for, so a
//!   node cannot speak as another. A peer without a valid certificate never
//!   gets past the handshake and never reaches the donor store.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use hashbrown::HashMap;
use parking_lot::Mutex;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, RecvStream, SendStream, VarInt};
use ramster_protocol::peer::{
    self as wire, PeerErrorCode, PeerHello, PeerRequest, PeerResponse, PeerWelcome, peer_request,
    peer_response,
};
use ramster_protocol::{FRAME_BYTES_MAX, frame, peer_handshake};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::{debug, info, warn};

use super::donor::{DonatedPage, DonorStore, PageRef, PageStatus};
use super::rpc;
use super::tls::{self, CertError, NodeIdentity};
use crate::frontend::conn::{FrameReader, encode_frame, spawn_writer};

/// ALPN of the peer protocol: a client of some other protocol on the same
/// port fails the handshake instead of sending us garbage.
pub const PEER_ALPN: &[u8] = b"ramster-peer/1";

/// A connection with no packet for this long is dead.
pub const IDLE_TIMEOUT_MS: u64 = 10_000;
/// Keep-alives well below the idle timeout, so a quiet but healthy
/// connection never idles out (a few may be lost in a row).
pub const KEEP_ALIVE_INTERVAL_MS: u64 = 2_500;
/// Default deadline of one RPC, connecting included.
pub const RPC_DEADLINE_MS: u64 = 5_000;
/// UDP socket buffers: 4 MiB cut loopback loss sharply under page batches.
pub const UDP_BUFFER_BYTES: usize = 4 << 20;
/// Long-lived request streams per session.
pub const PAGE_STREAMS_DEFAULT: usize = 4;
/// Requests outstanding per session before callers wait.
pub const IN_FLIGHT_REQUESTS_MAX: usize = 64;
/// Bidirectional streams a peer may hold open towards us.
pub const PEER_STREAMS_MAX: u32 = 16;
/// Incoming connections served at once.
pub const SESSIONS_MAX: usize = 1024;
/// Largest UDP payload path-MTU discovery probes for. Above quinn's 1452
/// default so jumbo-frame networks and loopback get big packets (fewer
/// packets, fewer per-packet costs); on a 1500-byte path the probes are lost
/// and discovery settles lower by itself.
pub const MTU_UPPER_BOUND_BYTES: u16 = 8952;
/// Per-stream flow-control window: a few full page batches.
const STREAM_RECEIVE_WINDOW_BYTES: u32 = 16 << 20;
/// Per-connection flow-control window (the most one peer can make us buffer).
const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 64 << 20;

/// QUIC application close codes.
const CLOSE_DONE: u32 = 0;
const CLOSE_REFUSED: u32 = 1;
const CLOSE_PROTOCOL: u32 = 2;

/// Tunables of the transport; the defaults are the named constants above.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    pub rpc_deadline: Duration,
    pub idle_timeout: Duration,
    pub keep_alive_interval: Duration,
    pub udp_buffer_bytes: usize,
    pub page_streams: usize,
    pub in_flight_requests_max: usize,
    /// Upper bound of path-MTU discovery (UDP payload bytes).
    pub mtu_upper_bound: u16,
    /// UDP generic segmentation offload. Some virtual NICs and older kernels
    /// drop GSO batches; this turns it off.
    pub segmentation_offload: bool,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            rpc_deadline: Duration::from_millis(RPC_DEADLINE_MS),
            idle_timeout: Duration::from_millis(IDLE_TIMEOUT_MS),
            keep_alive_interval: Duration::from_millis(KEEP_ALIVE_INTERVAL_MS),
            udp_buffer_bytes: UDP_BUFFER_BYTES,
            page_streams: PAGE_STREAMS_DEFAULT,
            in_flight_requests_max: IN_FLIGHT_REQUESTS_MAX,
            mtu_upper_bound: MTU_UPPER_BOUND_BYTES,
            segmentation_offload: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] CertError),
    #[error("QUIC configuration: {0}")]
    Config(String),
}

/// Why an RPC to a peer failed. `Refused` is the peer's considered answer;
/// the others say nothing about whether the request was applied.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer {peer}: no answer within {ms} ms")]
    Deadline { peer: String, ms: u64 },
    #[error("peer {peer}: connecting to {addr} failed: {reason}")]
    Connect {
        peer: String,
        addr: SocketAddr,
        reason: String,
    },
    #[error("peer {peer}: connection lost: {reason}")]
    ConnectionLost { peer: String, reason: String },
    #[error("peer {peer} refused the request ({code:?}): {message}")]
    Refused {
        peer: String,
        code: PeerErrorCode,
        message: String,
    },
    #[error("peer {peer} answered nonsense: {reason}")]
    BadAnswer { peer: String, reason: String },
    #[error("request to peer {peer} cannot be sent: {reason}")]
    BadRequest { peer: String, reason: String },
}

/// The TLS side of an endpoint: who we are and whom we trust.
pub struct PeerTls {
    server: rustls::ServerConfig,
    client: rustls::ClientConfig,
    insecure: bool,
}

impl PeerTls {
    /// Mutual TLS under the cluster CA (the only mode a node runs with,
    /// short of `--insecure`).
    pub fn mutual(identity: &NodeIdentity) -> Result<Self, CertError> {
        Ok(PeerTls::from_rustls(
            identity.server_config()?,
            identity.client_config()?,
        ))
    }

    /// From configs built elsewhere; the ALPN is set here.
    pub fn from_rustls(mut server: rustls::ServerConfig, mut client: rustls::ClientConfig) -> Self {
        server.alpn_protocols = vec![PEER_ALPN.to_vec()];
        client.alpn_protocols = vec![PEER_ALPN.to_vec()];
        PeerTls {
            server,
            client,
            insecure: false,
        }
    }

    /// `--insecure`: encrypted but unauthenticated; any host that reaches
    /// the port is taken for the node it claims to be. Logged loudly.
    pub fn insecure(node: &str) -> Result<Self, CertError> {
        let (server, client) = tls::insecure_configs(node)?;
        Ok(PeerTls {
            insecure: true,
            ..PeerTls::from_rustls(server, client)
        })
    }
}

/// What an endpoint is bound with.
pub struct EndpointOptions {
    /// This node's name: what we claim in hellos, and what our certificate
    /// must be valid for.
    pub node: String,
    /// This run of the node; donors drop pages of older ones.
    pub incarnation: u64,
    /// 127.0.0.1:0 in tests; the node's `--listen` otherwise.
    pub listen: SocketAddr,
    pub tls: PeerTls,
    pub transport: TransportConfig,
}

type SessionSlot = Arc<tokio::sync::Mutex<Option<Arc<PeerSession>>>>;

struct Shared {
    node: String,
    /// `--insecure`: peers present no certificate to check names against.
    insecure: bool,
    incarnation: u64,
    config: TransportConfig,
    donor: Arc<Mutex<DonorStore>>,
    sessions: Mutex<HashMap<String, SessionSlot>>,
}

impl Shared {
    fn slot(&self, peer: &str) -> SessionSlot {
        self.sessions.lock().entry_ref(peer).or_default().clone()
    }
}

/// A node's QUIC endpoint: accepts peers (and serves their requests from the
/// donor store) and dials them.
#[derive(Clone)]
pub struct PeerEndpoint {
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    shared: Arc<Shared>,
}

impl PeerEndpoint {
    /// Binds the UDP socket and starts accepting peers. Must be called from
    /// within a tokio runtime. Requests from authenticated peers are applied
    /// to `donor`.
    pub fn bind(
        opts: EndpointOptions,
        donor: Arc<Mutex<DonorStore>>,
    ) -> Result<PeerEndpoint, TransportError> {
        let cfg = &opts.transport;
        if cfg.keep_alive_interval >= cfg.idle_timeout {
            return Err(TransportError::Config(format!(
                "keep-alive interval {:?} must be below the idle timeout {:?}",
                cfg.keep_alive_interval, cfg.idle_timeout
            )));
        }
        if cfg.page_streams == 0 || cfg.page_streams > PEER_STREAMS_MAX as usize / 2 {
            return Err(TransportError::Config(format!(
                "page streams must be within 1..={}",
                PEER_STREAMS_MAX / 2
            )));
        }
        if cfg.in_flight_requests_max == 0 {
            return Err(TransportError::Config(
                "in-flight requests must be at least 1".into(),
            ));
        }
        if opts.tls.insecure {
            warn!(
                listen = %opts.listen,
                "INSECURE peer transport: peers are NOT authenticated; anyone who reaches this \
                 port can read, write and release pages. Never run a real cluster like this."
            );
        }
        let insecure = opts.tls.insecure;
        let transport = Arc::new(quic_transport(cfg)?);
        let server_crypto = QuicServerConfig::try_from(opts.tls.server)
            .map_err(|e| TransportError::Config(e.to_string()))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server_config.transport_config(transport.clone());
        let client_crypto = QuicClientConfig::try_from(opts.tls.client)
            .map_err(|e| TransportError::Config(e.to_string()))?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(client_crypto));
        client_config.transport_config(transport);

        let socket = udp_socket(opts.listen, cfg.udp_buffer_bytes).map_err(|source| {
            TransportError::Bind {
                addr: opts.listen,
                source,
            }
        })?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| TransportError::Bind {
            addr: opts.listen,
            source,
        })?;
        let shared = Arc::new(Shared {
            node: opts.node,
            insecure,
            incarnation: opts.incarnation,
            config: opts.transport,
            donor,
            sessions: Mutex::new(HashMap::new()),
        });
        tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
        Ok(PeerEndpoint {
            endpoint,
            client_config,
            shared,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("a bound endpoint has an address")
    }

    pub fn node(&self) -> &str {
        &self.shared.node
    }

    /// Peers with a live session (dialled or accepted), sorted.
    pub fn peers(&self) -> Vec<String> {
        let slots: Vec<(String, SessionSlot)> = self
            .shared
            .sessions
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut live: Vec<String> = slots
            .into_iter()
            .filter(|(_, slot)| {
                // A slot held right now is being dialled: not live yet.
                slot.try_lock()
                    .map(|s| s.as_ref().is_some_and(|s| s.is_alive()))
                    .unwrap_or(false)
            })
            .map(|(k, _)| k)
            .collect();
        live.sort();
        live
    }

    /// The session with `peer` at `addr`: the live one, or a new connection.
    /// Connecting is bounded by the RPC deadline.
    pub async fn session(
        &self,
        peer: &str,
        addr: SocketAddr,
    ) -> Result<Arc<PeerSession>, PeerError> {
        let deadline = self.shared.config.rpc_deadline;
        let slot = self.shared.slot(peer);
        let dial = async {
            let mut current = slot.lock().await;
            if let Some(s) = current.as_ref().filter(|s| s.is_alive()) {
                return Ok(s.clone());
            }
            let s = self.dial(peer, addr).await?;
            *current = Some(s.clone());
            Ok(s)
        };
        tokio::time::timeout(deadline, dial)
            .await
            .unwrap_or_else(|_| {
                Err(PeerError::Deadline {
                    peer: peer.to_string(),
                    ms: deadline.as_millis() as u64,
                })
            })
    }

    async fn dial(&self, peer: &str, addr: SocketAddr) -> Result<Arc<PeerSession>, PeerError> {
        let fail = |reason: String| PeerError::Connect {
            peer: peer.to_string(),
            addr,
            reason,
        };
        tls::check_node_name(peer).map_err(|e| fail(e.to_string()))?;
        // The server name is the peer's node name: rustls checks that the
        // certificate it presents was issued for exactly that node.
        let conn = self
            .endpoint
            .connect_with(self.client_config.clone(), addr, peer)
            .map_err(|e| fail(e.to_string()))?
            .await
            .map_err(|e| fail(e.to_string()))?;
        let (send, recv) = conn.open_bi().await.map_err(|e| fail(e.to_string()))?;
        let writer = spawn_writer(send);
        let hello = peer_handshake::hello(&self.shared.node, self.shared.incarnation);
        let hello = encode_frame(&hello).map_err(|e| fail(e.to_string()))?;
        writer
            .send(hello)
            .await
            .map_err(|_| fail("stream closed before the hello".into()))?;
        let mut reader = FrameReader::new(recv, FRAME_BYTES_MAX);
        // A peer that refuses us closes the connection with a reason; that
        // reason is the most useful error to show.
        let closed = |conn: &quinn::Connection, e: String| {
            fail(conn.close_reason().map(|r| r.to_string()).unwrap_or(e))
        };
        let body = match reader.read_frame().await {
            Ok(Some(body)) => body,
            Ok(None) => return Err(closed(&conn, "closed before its welcome".into())),
            Err(e) => return Err(closed(&conn, e.to_string())),
        };
        let welcome: PeerWelcome = frame::decode(body).map_err(|e| fail(e.to_string()))?;
        if welcome.node != peer {
            conn.close(CLOSE_PROTOCOL.into(), b"welcome from the wrong node");
            return Err(fail(format!(
                "welcome names node {:?}, not {peer:?}",
                welcome.node
            )));
        }
        debug!(peer, %addr, incarnation = welcome.incarnation, "peer session up");
        tokio::spawn(serve_streams(
            conn.clone(),
            self.shared.clone(),
            peer.into(),
        ));
        Ok(PeerSession::start(
            &self.shared,
            conn,
            peer.to_string(),
            welcome.incarnation,
            Some((writer, reader)),
        )
        .await)
    }

    /// Closes every connection and stops accepting; waits until the peers
    /// were told (bounded by the idle timeout).
    pub async fn close(&self) {
        self.endpoint.close(CLOSE_DONE.into(), b"node stopping");
        let _ =
            tokio::time::timeout(self.shared.config.idle_timeout, self.endpoint.wait_idle()).await;
    }
}

fn quic_transport(cfg: &TransportConfig) -> Result<quinn::TransportConfig, TransportError> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        IdleTimeout::try_from(cfg.idle_timeout)
            .map_err(|e| TransportError::Config(e.to_string()))?,
    ));
    t.keep_alive_interval(Some(cfg.keep_alive_interval));
    t.max_concurrent_bidi_streams(VarInt::from_u32(PEER_STREAMS_MAX));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW_BYTES));
    t.receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW_BYTES));
    t.send_window(u64::from(CONNECTION_RECEIVE_WINDOW_BYTES));
    t.enable_segmentation_offload(cfg.segmentation_offload);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(cfg.mtu_upper_bound);
    t.mtu_discovery_config(Some(mtu));
    Ok(t)
}

/// A UDP socket with its buffers sized before quinn gets it. The kernel caps
/// the sizes at net.core.{r,w}mem_max; we say so instead of failing.
fn udp_socket(addr: SocketAddr, buffer_bytes: usize) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_recv_buffer_size(buffer_bytes)?;
    socket.set_send_buffer_size(buffer_bytes)?;
    let (recv, send) = (socket.recv_buffer_size()?, socket.send_buffer_size()?);
    if recv < buffer_bytes || send < buffer_bytes {
        warn!(
            wanted = buffer_bytes,
            recv, send, "UDP socket buffers capped by the kernel; raise net.core.rmem_max/wmem_max"
        );
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    let limit = Arc::new(Semaphore::new(SESSIONS_MAX));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!(remote = %incoming.remote_address(), "too many peer connections; refusing");
            incoming.refuse();
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            if let Err(reason) = accept_peer(incoming, shared).await {
                info!(%remote, %reason, "peer refused");
            }
            drop(permit);
        });
    }
}

/// Takes an incoming connection through TLS and the hello, then serves it
/// until it closes.
async fn accept_peer(incoming: quinn::Incoming, shared: Arc<Shared>) -> Result<(), String> {
    let deadline = shared.config.rpc_deadline;
    let handshake = async {
        // TLS: the peer's certificate must chain to the cluster CA, or the
        // connection fails right here.
        let conn = incoming.await.map_err(|e| format!("TLS handshake: {e}"))?;
        let (send, recv) = conn
            .accept_bi()
            .await
            .map_err(|e| format!("no hello stream: {e}"))?;
        let mut reader = FrameReader::new(recv, FRAME_BYTES_MAX);
        let body = reader
            .read_frame()
            .await
            .map_err(|e| format!("reading the hello: {e}"))?
            .ok_or("stream closed before the hello")?;
        let hello: PeerHello = frame::decode(body).map_err(|e| format!("hello: {e}"))?;
        let refuse = |why: String| {
            conn.close(CLOSE_REFUSED.into(), why.as_bytes());
            why
        };
        let welcome = peer_handshake::accept(&hello, &shared.node, shared.incarnation)
            .map_err(|e| refuse(e.to_string()))?;
        let certified = shared.insecure
            || peer_certificate(&conn).is_some_and(|cert| tls::cert_names_node(&cert, &hello.node));
        if !certified {
            return Err(refuse(format!(
                "the peer's certificate is not valid for the node {:?} it claims to be",
                hello.node
            )));
        }
        let mut send = send;
        let welcome = encode_frame(&welcome).map_err(|e| e.to_string())?;
        send.write_all(&welcome)
            .await
            .map_err(|e| format!("writing the welcome: {e}"))?;
        Ok::<_, String>((conn, hello, reader, send))
    };
    let (conn, hello, reader, send) = tokio::time::timeout(deadline, handshake)
        .await
        .map_err(|_| format!("no hello within {} ms", deadline.as_millis()))??;
    let peer: Arc<str> = hello.node.as_str().into();
    info!(peer = %peer, remote = %conn.remote_address(), incarnation = hello.incarnation, "peer connected");
    // The connection also carries our requests to this peer.
    let session = PeerSession::start(
        &shared,
        conn.clone(),
        hello.node.clone(),
        hello.incarnation,
        None,
    )
    .await;
    {
        let slot = shared.slot(&hello.node);
        let mut current = slot.lock().await;
        if !current.as_ref().is_some_and(|s| s.is_alive()) {
            *current = Some(session);
        }
    }
    tokio::spawn(serve_stream(shared.clone(), peer.clone(), reader, send));
    serve_streams(conn, shared, peer).await;
    Ok(())
}

/// The end-entity certificate the peer authenticated with.
fn peer_certificate(conn: &quinn::Connection) -> Option<rustls_pki_types::CertificateDer<'static>> {
    conn.peer_identity()?
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?
        .into_iter()
        .next()
}

/// Serves every stream the peer opens on `conn` until it closes.
async fn serve_streams(conn: quinn::Connection, shared: Arc<Shared>, peer: Arc<str>) {
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let reader = FrameReader::new(recv, FRAME_BYTES_MAX);
                tokio::spawn(serve_stream(shared.clone(), peer.clone(), reader, send));
            }
            Err(e) => {
                debug!(peer = %peer, reason = %e, "peer connection closed");
                return;
            }
        }
    }
}

/// Answers the requests on one stream, in order. A frame that cannot be
/// read or decoded ends the stream (its position is lost) after an error
/// answer with id 0 says why.
///
/// Each answer is written before the next request is read: a peer that
/// stops reading answers stalls its own stream under QUIC flow control
/// instead of making us queue answers (up to a full batch each) without
/// bound.
async fn serve_stream(
    shared: Arc<Shared>,
    peer: Arc<str>,
    mut reader: FrameReader<RecvStream>,
    mut send: SendStream,
) {
    loop {
        let req = match reader.read_frame().await {
            Ok(Some(body)) => frame::decode::<PeerRequest>(body).map_err(|e| e.to_string()),
            Ok(None) => {
                let _ = send.finish();
                return;
            }
            Err(e) => Err(e.to_string()),
        };
        let resp = match req {
            Ok(req) => rpc::handle(&shared.donor, &peer, req),
            Err(reason) => {
                warn!(peer = %peer, %reason, "malformed frame from peer; closing the stream");
                let resp = error_response(PeerErrorCode::Malformed, reason);
                if let Ok(f) = encode_frame(&resp) {
                    let _ = send.write_all(&f).await;
                }
                let _ = send.finish();
                return;
            }
        };
        let frame = match encode_frame(&resp) {
            Ok(f) => f,
            Err(e) => encode_frame(&PeerResponse {
                id: resp.id,
                ..error_response(PeerErrorCode::TooLarge, e.to_string())
            })
            .expect("an error answer is small"),
        };
        if send.write_all(&frame).await.is_err() {
            return;
        }
    }
}

fn error_response(code: PeerErrorCode, message: String) -> PeerResponse {
    PeerResponse {
        id: 0,
        kind: Some(peer_response::Kind::Error(wire::PeerError {
            code: code as i32,
            message,
        })),
    }
}

/// Requests waiting for their answers. `closed` is set, under the same lock,
/// when the session's answers can no longer arrive: a request started after
/// that fails at once instead of waiting out its deadline.
#[derive(Default)]
struct Waiters {
    by_id: HashMap<u64, oneshot::Sender<PeerResponse>>,
    closed: bool,
}

type Pending = Arc<Mutex<Waiters>>;

/// Our side of a connection to one peer: requests out, answers matched back.
pub struct PeerSession {
    peer: String,
    peer_incarnation: u64,
    owner: String,
    incarnation: u64,
    conn: quinn::Connection,
    streams: Vec<mpsc::Sender<BytesMut>>,
    pending: Pending,
    next_id: AtomicU64,
    in_flight: Semaphore,
    deadline: Duration,
}

/// Removes a request's waiter however the call ends (answer, deadline,
/// error), so abandoned ids never pile up.
struct PendingGuard<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending.lock().by_id.remove(&self.id);
    }
}

impl PeerSession {
    async fn start(
        shared: &Shared,
        conn: quinn::Connection,
        peer: String,
        peer_incarnation: u64,
        first: Option<(mpsc::Sender<BytesMut>, FrameReader<RecvStream>)>,
    ) -> Arc<PeerSession> {
        let pending: Pending = Arc::default();
        let mut streams = Vec::with_capacity(shared.config.page_streams);
        let mut readers = Vec::with_capacity(shared.config.page_streams);
        if let Some((writer, reader)) = first {
            streams.push(writer);
            readers.push(reader);
        }
        while streams.len() < shared.config.page_streams {
            // Opening a stream sends nothing until the first frame; it only
            // waits when the peer's stream limit is reached, which the
            // bounded page_streams keeps us under.
            let Ok((send, recv)) = conn.open_bi().await else {
                break;
            };
            streams.push(spawn_writer::<SendStream>(send));
            readers.push(FrameReader::new(recv, FRAME_BYTES_MAX));
        }
        for reader in readers {
            tokio::spawn(read_answers(reader, pending.clone(), conn.clone()));
        }
        Arc::new(PeerSession {
            peer,
            peer_incarnation,
            owner: shared.node.clone(),
            incarnation: shared.incarnation,
            conn,
            streams,
            pending,
            next_id: AtomicU64::new(1),
            in_flight: Semaphore::new(shared.config.in_flight_requests_max),
            deadline: shared.config.rpc_deadline,
        })
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The peer's incarnation, as its hello or welcome said.
    pub fn peer_incarnation(&self) -> u64 {
        self.peer_incarnation
    }

    pub fn is_alive(&self) -> bool {
        self.conn.close_reason().is_none()
            && !self.streams.is_empty()
            && !self.pending.lock().closed
    }

    /// Round-trip time estimate of the connection.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    fn lost(&self) -> PeerError {
        PeerError::ConnectionLost {
            peer: self.peer.clone(),
            reason: self
                .conn
                .close_reason()
                .map(|r| r.to_string())
                .unwrap_or_else(|| "stream closed".into()),
        }
    }

    fn bad_answer(&self, reason: impl Into<String>) -> PeerError {
        PeerError::BadAnswer {
            peer: self.peer.clone(),
            reason: reason.into(),
        }
    }

    /// One request, one answer, within the deadline.
    async fn call(&self, kind: peer_request::Kind) -> Result<peer_response::Kind, PeerError> {
        match tokio::time::timeout(self.deadline, self.call_unbounded(kind)).await {
            Ok(r) => r,
            Err(_) => Err(PeerError::Deadline {
                peer: self.peer.clone(),
                ms: self.deadline.as_millis() as u64,
            }),
        }
    }

    async fn call_unbounded(
        &self,
        kind: peer_request::Kind,
    ) -> Result<peer_response::Kind, PeerError> {
        if self.streams.is_empty() {
            return Err(self.lost());
        }
        let _slot = self.in_flight.acquire().await.expect("never closed");
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_frame(&PeerRequest {
            id,
            kind: Some(kind),
        })
        .map_err(|e| PeerError::BadRequest {
            peer: self.peer.clone(),
            reason: e.to_string(),
        })?;
        let (tx, rx) = oneshot::channel();
        {
            let mut waiters = self.pending.lock();
            if waiters.closed {
                return Err(self.lost());
            }
            waiters.by_id.insert(id, tx);
        }
        let _guard = PendingGuard {
            pending: &self.pending,
            id,
        };
        let stream = &self.streams[id as usize % self.streams.len()];
        stream.send(frame).await.map_err(|_| self.lost())?;
        let resp = rx.await.map_err(|_| self.lost())?;
        match resp.kind {
            Some(peer_response::Kind::Error(e)) => Err(PeerError::Refused {
                peer: self.peer.clone(),
                code: PeerErrorCode::try_from(e.code).unwrap_or(PeerErrorCode::Unspecified),
                message: e.message,
            }),
            Some(kind) => Ok(kind),
            None => Err(self.bad_answer("answer without a kind")),
        }
    }

    fn statuses(&self, got: Vec<i32>, want: usize) -> Result<Vec<PageStatus>, PeerError> {
        if got.len() != want {
            return Err(self.bad_answer(format!("{} statuses for {want} pages", got.len())));
        }
        got.into_iter()
            .map(|s| rpc::status_from_wire(s).ok_or_else(|| self.bad_answer(format!("status {s}"))))
            .collect()
    }

    /// Puts a batch of our pages on the peer; `statuses[i]` answers
    /// `pages[i]`.
    pub async fn put_pages(&self, pages: &[DonatedPage]) -> Result<Vec<PageStatus>, PeerError> {
        let req = peer_request::Kind::PutPages(wire::PutPages {
            owner: self.owner.clone(),
            incarnation: self.incarnation,
            pages: pages.iter().map(rpc::page_to_wire).collect(),
        });
        match self.call(req).await? {
            peer_response::Kind::PutPages(r) => self.statuses(r.statuses, pages.len()),
            _ => Err(self.bad_answer("put answered with another kind")),
        }
    }

    /// Gets pages back at exactly the versions named. The bytes are as the
    /// peer holds them; the caller decompresses and checks the checksum.
    pub async fn get_pages(
        &self,
        refs: &[PageRef],
    ) -> Result<Vec<Result<DonatedPage, PageStatus>>, PeerError> {
        let req = peer_request::Kind::GetPages(wire::GetPages {
            owner: self.owner.clone(),
            incarnation: self.incarnation,
            pages: refs.iter().map(rpc::ref_to_wire).collect(),
        });
        let got = match self.call(req).await? {
            peer_response::Kind::GetPages(r) => r.pages,
            _ => return Err(self.bad_answer("get answered with another kind")),
        };
        if got.len() != refs.len() {
            return Err(self.bad_answer(format!("{} pages for {} asked", got.len(), refs.len())));
        }
        refs.iter()
            .zip(got)
            .map(|(r, g)| match rpc::status_from_wire(g.status) {
                Some(PageStatus::Ok) if g.version == r.version => Ok(Ok(DonatedPage {
                    key: r.key,
                    version: g.version,
                    checksum: g.checksum,
                    compressed: g.compressed,
                    data: g.data,
                })),
                Some(PageStatus::Ok) => Err(self.bad_answer(format!(
                    "version {} for a get of version {}",
                    g.version, r.version
                ))),
                Some(s) => Ok(Err(s)),
                None => Err(self.bad_answer(format!("status {}", g.status))),
            })
            .collect()
    }

    /// Releases every version ≤ the one named of each page.
    pub async fn release_pages(&self, refs: &[PageRef]) -> Result<Vec<PageStatus>, PeerError> {
        let req = peer_request::Kind::ReleasePages(wire::ReleasePages {
            owner: self.owner.clone(),
            incarnation: self.incarnation,
            pages: refs.iter().map(rpc::ref_to_wire).collect(),
        });
        match self.call(req).await? {
            peer_response::Kind::ReleasePages(r) => self.statuses(r.statuses, refs.len()),
            _ => Err(self.bad_answer("release answered with another kind")),
        }
    }

    /// Drops everything the peer holds for us; the number of pages dropped.
    pub async fn release_owner(&self) -> Result<Result<u64, PageStatus>, PeerError> {
        let req = peer_request::Kind::ReleaseOwner(wire::ReleaseOwner {
            owner: self.owner.clone(),
            incarnation: self.incarnation,
        });
        match self.call(req).await? {
            peer_response::Kind::ReleaseOwner(r) => match rpc::status_from_wire(r.status) {
                Some(PageStatus::Ok) => Ok(Ok(r.released_pages)),
                Some(s) => Ok(Err(s)),
                None => Err(self.bad_answer(format!("status {}", r.status))),
            },
            _ => Err(self.bad_answer("release-owner answered with another kind")),
        }
    }

    /// Tells the peer how we are; answers how it is.
    pub async fn heartbeat(&self, ours: wire::Heartbeat) -> Result<wire::Heartbeat, PeerError> {
        match self.call(peer_request::Kind::Heartbeat(ours)).await? {
            peer_response::Kind::Heartbeat(h) => Ok(h),
            _ => Err(self.bad_answer("heartbeat answered with another kind")),
        }
    }
}

/// Hands each answer on one stream to the request waiting for it. When the
/// stream ends the connection is of no further use: it is closed, which
/// fails every waiting request at once instead of leaving it to its
/// deadline.
async fn read_answers(
    mut reader: FrameReader<RecvStream>,
    pending: Pending,
    conn: quinn::Connection,
) {
    let why: String = loop {
        match reader.read_frame().await {
            Ok(Some(body)) => match frame::decode::<PeerResponse>(body) {
                Ok(resp) if resp.id == 0 => {
                    break match resp.kind {
                        Some(peer_response::Kind::Error(e)) => format!("peer: {}", e.message),
                        _ => "answer with id 0".into(),
                    };
                }
                Ok(resp) => {
                    // No waiter: the call gave up at its deadline.
                    if let Some(tx) = pending.lock().by_id.remove(&resp.id) {
                        let _ = tx.send(resp);
                    }
                }
                Err(e) => break format!("malformed answer: {e}"),
            },
            Ok(None) => break "stream finished".into(),
            Err(e) => break e.to_string(),
        }
    };
    if conn.close_reason().is_none() {
        warn!(reason = %why, "peer stream lost; closing the connection");
        conn.close(CLOSE_PROTOCOL.into(), why.as_bytes());
    }
    let mut waiters = pending.lock();
    waiters.closed = true;
    waiters.by_id.clear();
}
