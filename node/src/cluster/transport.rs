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
//!   stream per request was measured slower on loopback.
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

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use parking_lot::Mutex;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, RecvStream, SendStream, VarInt};
use ramster_protocol::io::{ConnError, FrameReader, encode_frame};
use ramster_protocol::peer::{
    self as wire, PeerErrorCode, PeerHello, PeerRequest, PeerResponse, PeerWelcome, peer_request,
    peer_response,
};
use ramster_protocol::{FRAME_BYTES_MAX, PEER_BATCH_PAGES_MAX, frame, peer_handshake};
use tokio::sync::{Semaphore, oneshot};
use tracing::{debug, info, warn};

use super::donor::{AuditStep, DonatedPage, DonorStore, PageRef, PageStatus};
use super::net_thread::NetThread;
use super::rpc::{self, RpcRefusal};
use super::tls::{self, CertError, NodeIdentity};
use crate::frontend::ClientThread;
use crate::metrics::NodeMetrics;

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
/// How long the transport thread polls after a client's request before it
/// sleeps (see [`crate::poll`]): long enough for a donor's answer on a
/// local network and for the client's next request after an answer (the
/// cluster benchmarks in docs/benchmarks.md).
pub const POLL_WINDOW_US: u64 = 200;
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
/// Largest UDP payload path-MTU discovery probes for, and the largest we
/// tell peers we take: the largest with which a full GSO batch still fits
/// one UDP send (see [`TransportConfig::uses_segmentation_offload`]). Above
/// quinn's 1452 default so loopback and jumbo-frame networks get bigger
/// packets (a compressed page or more in one); on a 1500-byte path the
/// probes are lost and discovery settles lower by itself, keeping GSO.
pub const MTU_UPPER_BOUND_BYTES: u16 = (UDP_SEND_BYTES_MAX / GSO_BATCH_DATAGRAMS) as u16;
/// Datagrams quinn puts in one GSO send (its `MAX_TRANSMIT_SEGMENTS`).
const GSO_BATCH_DATAGRAMS: usize = 10;
/// The most one UDP send may carry: 65,535 less the IPv4 and UDP headers.
const UDP_SEND_BYTES_MAX: usize = 65_507;
/// Per-stream flow-control window: a few full page batches.
const STREAM_RECEIVE_WINDOW_BYTES: u32 = 16 << 20;
/// Per-connection flow-control window (the most one peer can make us buffer).
const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 64 << 20;

/// QUIC application close codes.
const CLOSE_DONE: u32 = 0;
const CLOSE_REFUSED: u32 = 1;
const CLOSE_PROTOCOL: u32 = 2;

/// Tunables of the transport; the defaults are the named constants above.
#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// How long the transport thread, which also serves API clients, polls
    /// after a client's request before it sleeps; zero never polls.
    pub poll_window: Duration,
}

impl TransportConfig {
    /// Whether GSO is used: asked for, and a whole batch of the largest
    /// datagrams fits in one UDP send. quinn batches up to
    /// [`GSO_BATCH_DATAGRAMS`] datagrams per send, and the kernel refuses a
    /// send above [`UDP_SEND_BYTES_MAX`] (EMSGSIZE): with jumbo datagrams
    /// every full batch would be lost, and path-MTU discovery, taking the
    /// losses for a black hole, would fall back to 1200 bytes. A jumbo
    /// datagram is as few sends per byte as a batch of small ones anyway.
    pub fn uses_segmentation_offload(&self) -> bool {
        self.segmentation_offload
            && GSO_BATCH_DATAGRAMS * usize::from(self.mtu_upper_bound) <= UDP_SEND_BYTES_MAX
    }
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
            poll_window: Duration::from_micros(POLL_WINDOW_US),
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
    /// For dialling an address whose node name is not known yet (a seed):
    /// the certificate must chain to the CA; the name is checked against
    /// the peer's welcome afterwards.
    seed_client: Option<rustls::ClientConfig>,
    /// What the configs present, for reloads; `None` with `--insecure`.
    key: Option<Arc<tls::NodeKey>>,
    insecure: bool,
}

impl PeerTls {
    /// Mutual TLS under the cluster CA (the only mode a node runs with,
    /// short of `--insecure`).
    pub fn mutual(identity: &NodeIdentity) -> Result<Self, CertError> {
        let key = identity.node_key()?;
        let mut seed = identity.seed_client_config_with(key.clone())?;
        seed.alpn_protocols = vec![PEER_ALPN.to_vec()];
        Ok(PeerTls {
            seed_client: Some(seed),
            key: Some(key.clone()),
            ..PeerTls::from_rustls(
                identity.server_config_with(key.clone())?,
                identity.client_config_with(key)?,
            )
        })
    }

    /// From configs built elsewhere; the ALPN is set here.
    pub fn from_rustls(mut server: rustls::ServerConfig, mut client: rustls::ClientConfig) -> Self {
        server.alpn_protocols = vec![PEER_ALPN.to_vec()];
        client.alpn_protocols = vec![PEER_ALPN.to_vec()];
        PeerTls {
            server,
            client,
            seed_client: None,
            key: None,
            insecure: false,
        }
    }

    /// `--insecure`: encrypted but unauthenticated; any host that reaches
    /// the port is taken for the node it claims to be. Logged loudly.
    pub fn insecure(node: &str) -> Result<Self, CertError> {
        let (server, client) = tls::insecure_configs(node)?;
        let tls = PeerTls::from_rustls(server, client);
        Ok(PeerTls {
            insecure: true,
            seed_client: Some(tls.client.clone()),
            ..tls
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
    /// Where RPC latencies and failures are counted.
    pub metrics: Arc<NodeMetrics>,
}

type SessionSlot = Arc<tokio::sync::Mutex<Option<Arc<PeerSession>>>>;

/// What a control request's handler returns.
pub type ControlFuture<'a> =
    Pin<Box<dyn Future<Output = Result<peer_response::Kind, RpcRefusal>> + Send + 'a>>;

/// Serves the requests that are about the cluster rather than pages:
/// heartbeats, Raft, joins. Set once the node's membership is running;
/// until then such requests are answered from the donor alone (heartbeats)
/// or refused as unavailable.
pub trait ControlHandler: Send + Sync + 'static {
    fn handle(&self, peer: Arc<str>, request: peer_request::Kind) -> ControlFuture<'_>;
}

fn is_control(kind: &peer_request::Kind) -> bool {
    matches!(
        kind,
        peer_request::Kind::Heartbeat(_)
            | peer_request::Kind::Raft(_)
            | peer_request::Kind::Join(_)
            | peer_request::Kind::ChangeNode(_)
    )
}

struct Shared {
    /// Where quinn and our stream tasks run (see [`super::net_thread`]).
    net: tokio::runtime::Handle,
    node: String,
    /// `--insecure`: peers present no certificate to check names against.
    insecure: bool,
    incarnation: u64,
    config: TransportConfig,
    donor: Arc<Mutex<DonorStore>>,
    sessions: Mutex<HashMap<String, SessionSlot>>,
    /// Node names learnt from welcomes of seeds dialled by address.
    seed_names: Mutex<HashMap<SocketAddr, String>>,
    /// The newest run of each peer that a hello or welcome has shown: an
    /// older run (a process paused or partitioned across its own restart)
    /// is refused, so it never replaces the session with the newer one.
    newest_runs: Mutex<HashMap<String, u64>>,
    control: OnceLock<Arc<dyn ControlHandler>>,
    metrics: Arc<NodeMetrics>,
    /// The next placement number our puts carry (see the donor module):
    /// one counter for every donor, starting at 1 (0 in a release means
    /// every put).
    placements: Arc<AtomicU64>,
}

impl Shared {
    fn slot(&self, peer: &str) -> SessionSlot {
        self.sessions.lock().entry_ref(peer).or_default().clone()
    }

    /// Records that `peer`'s run `incarnation` is speaking, or refuses it if
    /// a newer run of that peer has been seen: only one run of a node is
    /// real, and it is the newest.
    fn admit_run(&self, peer: &str, incarnation: u64) -> Result<(), String> {
        let mut newest = self.newest_runs.lock();
        let seen = newest.entry_ref(peer).or_insert(incarnation);
        if incarnation < *seen {
            return Err(format!(
                "{peer} speaks as its run {incarnation}, older than its run {seen} seen already"
            ));
        }
        *seen = incarnation;
        Ok(())
    }
}

/// A node's QUIC endpoint: accepts peers (and serves their requests from the
/// donor store) and dials them.
#[derive(Clone)]
pub struct PeerEndpoint {
    /// Kept by every clone; the last one dropped stops the thread.
    net_thread: Arc<NetThread>,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    seed_client_config: Option<quinn::ClientConfig>,
    node_key: Option<Arc<tls::NodeKey>>,
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
        let node_key = opts.tls.key.clone();
        let transport = Arc::new(quic_transport(cfg)?);
        let server_crypto = QuicServerConfig::try_from(opts.tls.server)
            .map_err(|e| TransportError::Config(e.to_string()))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server_config.transport_config(transport.clone());
        let client_crypto = QuicClientConfig::try_from(opts.tls.client)
            .map_err(|e| TransportError::Config(e.to_string()))?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(client_crypto));
        client_config.transport_config(transport.clone());
        let seed_client_config = match opts.tls.seed_client {
            Some(seed) => {
                let crypto = QuicClientConfig::try_from(seed)
                    .map_err(|e| TransportError::Config(e.to_string()))?;
                let mut c = quinn::ClientConfig::new(Arc::new(crypto));
                c.transport_config(transport);
                Some(c)
            }
            None => None,
        };

        let socket = udp_socket(opts.listen, cfg.udp_buffer_bytes).map_err(|source| {
            TransportError::Bind {
                addr: opts.listen,
                source,
            }
        })?;
        let net = NetThread::start(&opts.node, cfg.poll_window).map_err(|source| {
            TransportError::Bind {
                addr: opts.listen,
                source,
            }
        })?;
        // What we tell peers we can receive. Path-MTU discovery on their
        // side probes no higher than this, whatever their own upper bound:
        // left at quinn's 1472, packets stay Ethernet-sized on loopback and
        // jumbo-frame networks alike.
        if cfg.segmentation_offload && !cfg.uses_segmentation_offload() {
            info!(
                max_udp_payload = cfg.mtu_upper_bound,
                "UDP segmentation offload off: a batch of datagrams this large does not fit one send"
            );
        }
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config
            .max_udp_payload_size(cfg.mtu_upper_bound)
            .map_err(|_| {
                TransportError::Config(format!(
                    "MTU upper bound {} must be within 1200..=65527",
                    cfg.mtu_upper_bound
                ))
            })?;
        let endpoint =
            quinn::Endpoint::new(endpoint_config, Some(server_config), socket, net.runtime())
                .map_err(|source| TransportError::Bind {
                    addr: opts.listen,
                    source,
                })?;
        let shared = Arc::new(Shared {
            net: net.handle().clone(),
            node: opts.node,
            insecure,
            incarnation: opts.incarnation,
            config: opts.transport,
            donor,
            sessions: Mutex::new(HashMap::new()),
            seed_names: Mutex::new(HashMap::new()),
            newest_runs: Mutex::new(HashMap::new()),
            control: OnceLock::new(),
            metrics: opts.metrics,
            placements: Arc::new(AtomicU64::new(1)),
        });
        shared
            .net
            .spawn(accept_loop(endpoint.clone(), shared.clone()));
        Ok(PeerEndpoint {
            net_thread: Arc::new(net),
            endpoint,
            client_config,
            seed_client_config,
            node_key,
            shared,
        })
    }

    /// The certificate and key this endpoint presents (`None` when
    /// insecure): replacing them reaches every later handshake.
    pub fn node_key(&self) -> Option<&Arc<tls::NodeKey>> {
        self.node_key.as_ref()
    }

    /// Installs the handler of heartbeats, Raft and joins (once; later
    /// calls are ignored).
    pub fn set_control_handler(&self, handler: Arc<dyn ControlHandler>) {
        let _ = self.shared.control.set(handler);
    }

    /// The session with whichever node answers at `addr` (a seed whose name
    /// is not known yet). Its certificate must chain to the cluster CA and
    /// be valid for the name its welcome gives.
    pub async fn session_at(&self, addr: SocketAddr) -> Result<Arc<PeerSession>, PeerError> {
        let deadline = self.shared.config.rpc_deadline;
        let seed = addr.to_string();
        let fail = |reason: String| PeerError::Connect {
            peer: seed.clone(),
            addr,
            reason,
        };
        let known = self.shared.seed_names.lock().get(&addr).cloned();
        if let Some(name) = known {
            let slot = self.shared.slot(&name);
            if let Ok(current) = slot.try_lock()
                && let Some(s) = current.as_ref().filter(|s| s.is_alive())
            {
                return Ok(s.clone());
            }
        }
        let Some(config) = self.seed_client_config.clone() else {
            return Err(fail("no TLS configuration for dialling by address".into()));
        };
        let dial = async {
            // Any valid DNS name will do: the verifier checks the chain only.
            let conn = self
                .endpoint
                .connect_with(config, addr, "seed.ramster")
                .map_err(|e| fail(e.to_string()))?
                .await
                .map_err(|e| fail(e.to_string()))?;
            let (writer, reader, welcome) = self.handshake(&conn).await.map_err(fail)?;
            let certified = self.shared.insecure
                || peer_certificate(&conn)
                    .is_some_and(|cert| tls::cert_names_node(&cert, &welcome.node));
            if !certified {
                conn.close(
                    CLOSE_REFUSED.into(),
                    b"certificate not valid for the welcome's name",
                );
                return Err(fail(format!(
                    "the certificate at {addr} is not valid for the node {:?} it claims to be",
                    welcome.node
                )));
            }
            if let Err(why) = self.shared.admit_run(&welcome.node, welcome.incarnation) {
                conn.close(CLOSE_REFUSED.into(), why.as_bytes());
                return Err(fail(why));
            }
            Ok((conn, writer, reader, welcome))
        };
        let (conn, writer, reader, welcome) = tokio::time::timeout(deadline, dial)
            .await
            .unwrap_or_else(|_| {
                Err(PeerError::Deadline {
                    peer: seed.clone(),
                    ms: deadline.as_millis() as u64,
                })
            })?;
        self.shared
            .seed_names
            .lock()
            .insert(addr, welcome.node.clone());
        let slot = self.shared.slot(&welcome.node);
        let mut current = slot.lock().await;
        if let Some(s) = current.as_ref().filter(|s| s.serves(welcome.incarnation)) {
            conn.close(CLOSE_DONE.into(), b"a session exists already");
            return Ok(s.clone());
        }
        retire_stale(current.as_ref(), welcome.incarnation);
        self.shared.net.spawn(serve_streams(
            conn.clone(),
            self.shared.clone(),
            welcome.node.as_str().into(),
        ));
        let session = PeerSession::start(
            &self.shared,
            conn,
            welcome.node.clone(),
            welcome.incarnation,
            Some((writer, reader)),
        )
        .await;
        *current = Some(session.clone());
        Ok(session)
    }

    /// The hello / welcome exchange on a new connection we dialled.
    async fn handshake(
        &self,
        conn: &quinn::Connection,
    ) -> Result<(SendStream, FrameReader<RecvStream>, PeerWelcome), String> {
        let (mut writer, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let hello = peer_handshake::hello(&self.shared.node, self.shared.incarnation);
        let hello = encode_frame(&hello).map_err(|e| e.to_string())?;
        writer
            .write_all(&hello)
            .await
            .map_err(|_| "stream closed before the hello".to_string())?;
        let mut reader = FrameReader::new(recv, FRAME_BYTES_MAX);
        // A peer that refuses us closes the connection with a reason; that
        // reason is the most useful error to show.
        let closed = |e: String| conn.close_reason().map(|r| r.to_string()).unwrap_or(e);
        let body = match reader.read_frame().await {
            Ok(Some(body)) => body,
            Ok(None) => return Err(closed("closed before its welcome".into())),
            Err(e) => return Err(closed(e.to_string())),
        };
        let welcome: PeerWelcome = frame::decode(body).map_err(|e| e.to_string())?;
        Ok((writer, reader, welcome))
    }

    /// The transport thread as the place to serve API clients.
    pub fn client_thread(&self) -> ClientThread {
        ClientThread {
            runtime: self.shared.net.clone(),
            poll: self.net_thread.poll().cloned(),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("a bound endpoint has an address")
    }

    pub fn node(&self) -> &str {
        &self.shared.node
    }

    /// This run's incarnation, as our hellos and welcomes announce it.
    pub fn incarnation(&self) -> u64 {
        self.shared.incarnation
    }

    /// The placement number our next put will carry: a release decided now
    /// covers every put sent so far and none sent after.
    pub fn placement_mark(&self) -> u64 {
        self.shared.placements.load(Ordering::Relaxed)
    }

    /// Live sessions (dialled or accepted), sorted by peer.
    fn live_sessions(&self) -> Vec<(String, Arc<PeerSession>)> {
        let slots: Vec<(String, SessionSlot)> = self
            .shared
            .sessions
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut live: Vec<(String, Arc<PeerSession>)> = slots
            .into_iter()
            .filter_map(|(peer, slot)| {
                // A slot held right now is being dialled: not live yet.
                let session = slot.try_lock().ok()?.as_ref()?.clone();
                session.is_alive().then_some((peer, session))
            })
            .collect();
        live.sort_by(|a, b| a.0.cmp(&b.0));
        live
    }

    /// QUIC's own figures of each live connection (datagrams, losses, path
    /// MTU, congestion window), by peer, sorted. They restart from zero
    /// when a connection is replaced.
    pub fn connection_stats(&self) -> Vec<(String, quinn::ConnectionStats)> {
        self.live_sessions()
            .into_iter()
            .map(|(peer, session)| (peer, session.conn.stats()))
            .collect()
    }

    /// Peers with a live session (dialled or accepted), sorted.
    pub fn peers(&self) -> Vec<String> {
        self.live_sessions()
            .into_iter()
            .map(|(peer, _)| peer)
            .collect()
    }

    /// The deadline of one RPC, and of one remote load as a whole.
    pub fn rpc_deadline(&self) -> Duration {
        self.shared.config.rpc_deadline
    }

    /// The live session with `peer`, if there is one, without dialling.
    pub fn live_session(&self, peer: &str) -> Option<Arc<PeerSession>> {
        let slot = self.shared.slot(peer);
        let current = slot.try_lock().ok()?;
        current.as_ref().filter(|s| s.is_alive()).cloned()
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
        let (writer, reader, welcome) = self.handshake(&conn).await.map_err(fail)?;
        if welcome.node != peer {
            conn.close(CLOSE_PROTOCOL.into(), b"welcome from the wrong node");
            return Err(fail(format!(
                "welcome names node {:?}, not {peer:?}",
                welcome.node
            )));
        }
        if let Err(why) = self.shared.admit_run(peer, welcome.incarnation) {
            conn.close(CLOSE_REFUSED.into(), why.as_bytes());
            return Err(fail(why));
        }
        debug!(peer, %addr, incarnation = welcome.incarnation, "peer session up");
        self.shared.net.spawn(serve_streams(
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
    t.enable_segmentation_offload(cfg.uses_segmentation_offload());
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
        shared.net.clone().spawn(async move {
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
        shared
            .admit_run(&hello.node, hello.incarnation)
            .map_err(refuse)?;
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
    // The connection also carries our requests to this peer, unless we
    // have a live session with this run of it already (both dialled at
    // once): then it only serves the peer's requests, and opening streams
    // we would never use is avoided. A session with an earlier run is
    // replaced: that process is gone, and its connection only looks alive
    // until the idle timeout says otherwise.
    {
        let slot = shared.slot(&hello.node);
        let mut current = slot.lock().await;
        if !current
            .as_ref()
            .is_some_and(|s| s.serves(hello.incarnation))
        {
            retire_stale(current.as_ref(), hello.incarnation);
            let session = PeerSession::start(
                &shared,
                conn.clone(),
                hello.node.clone(),
                hello.incarnation,
                None,
            )
            .await;
            *current = Some(session);
        }
    }
    shared
        .net
        .spawn(serve_stream(shared.clone(), peer.clone(), reader, send));
    serve_streams(conn, shared, peer).await;
    Ok(())
}

/// Closes `current` if it is a live session with an earlier run of its peer
/// than `incarnation`, failing its waiting requests at once.
fn retire_stale(current: Option<&Arc<PeerSession>>, incarnation: u64) {
    if let Some(s) = current.filter(|s| s.is_alive()) {
        info!(
            peer = %s.peer,
            old = s.peer_incarnation,
            new = incarnation,
            "peer restarted; closing the session with its previous run"
        );
        s.conn.close(CLOSE_DONE.into(), b"the peer restarted");
    }
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
                shared
                    .net
                    .spawn(serve_stream(shared.clone(), peer.clone(), reader, send));
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
            // The connection went away: nothing to answer, nobody to tell.
            Err(ConnError::Io(e)) => {
                debug!(peer = %peer, reason = %e, "peer stream ended");
                return;
            }
            Err(e) => Err(e.to_string()),
        };
        let resp = match req {
            Ok(PeerRequest {
                id,
                kind: Some(kind),
            }) if is_control(&kind) && shared.control.get().is_some() => {
                let handler = shared.control.get().expect("checked").clone();
                let kind = match handler.handle(peer.clone(), kind).await {
                    Ok(kind) => kind,
                    Err(r) => peer_response::Kind::Error(wire::PeerError {
                        code: r.code as i32,
                        message: r.message,
                    }),
                };
                PeerResponse {
                    id,
                    kind: Some(kind),
                }
            }
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
        // Handed over whole: quinn keeps the buffer instead of copying it.
        if send.write_chunk(frame.freeze()).await.is_err() {
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
    /// Written by the caller itself under the lock (no writer task to
    /// wake): a request costs one hop less on its way out.
    streams: Vec<tokio::sync::Mutex<SendStream>>,
    pending: Pending,
    next_id: AtomicU64,
    in_flight: Semaphore,
    deadline: Duration,
    metrics: Arc<NodeMetrics>,
    placements: Arc<AtomicU64>,
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
        first: Option<(SendStream, FrameReader<RecvStream>)>,
    ) -> Arc<PeerSession> {
        let pending: Pending = Arc::default();
        let mut streams = Vec::with_capacity(shared.config.page_streams);
        let mut readers = Vec::with_capacity(shared.config.page_streams);
        if let Some((writer, reader)) = first {
            streams.push(tokio::sync::Mutex::new(writer));
            readers.push(reader);
        }
        while streams.len() < shared.config.page_streams {
            // Opening a stream sends nothing until the first frame; it only
            // waits when the peer's stream limit is reached, which the
            // bounded page_streams keeps us under.
            let Ok((send, recv)) = conn.open_bi().await else {
                break;
            };
            streams.push(tokio::sync::Mutex::new(send));
            readers.push(FrameReader::new(recv, FRAME_BYTES_MAX));
        }
        for reader in readers {
            shared
                .net
                .spawn(read_answers(reader, pending.clone(), conn.clone()));
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
            metrics: shared.metrics.clone(),
            placements: shared.placements.clone(),
        })
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The peer's incarnation, as its hello or welcome said.
    pub fn peer_incarnation(&self) -> u64 {
        self.peer_incarnation
    }

    /// Whether this session is alive and reaches the peer's run
    /// `incarnation`.
    fn serves(&self, incarnation: u64) -> bool {
        self.peer_incarnation == incarnation && self.is_alive()
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
        self.timed(self.deadline, self.call_unbounded(kind)).await
    }

    /// Bounds an RPC by `deadline`, recording its latency and failures.
    async fn timed(
        &self,
        deadline: Duration,
        rpc: impl Future<Output = Result<peer_response::Kind, PeerError>>,
    ) -> Result<peer_response::Kind, PeerError> {
        let started = Instant::now();
        let r = match tokio::time::timeout(deadline, rpc).await {
            Ok(r) => r,
            Err(_) => Err(PeerError::Deadline {
                peer: self.peer.clone(),
                ms: deadline.as_millis() as u64,
            }),
        };
        self.metrics.observe_rpc(started.elapsed());
        if r.is_err() {
            self.metrics
                .cluster
                .rpc_errors
                .fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// A control request (heartbeat, Raft, join) on a stream of its own, so
    /// it never queues behind page batches; bounded by `deadline`.
    pub async fn control(
        &self,
        kind: peer_request::Kind,
        deadline: Duration,
    ) -> Result<peer_response::Kind, PeerError> {
        self.timed(deadline, self.control_unbounded(kind)).await
    }

    async fn control_unbounded(
        &self,
        kind: peer_request::Kind,
    ) -> Result<peer_response::Kind, PeerError> {
        let frame = encode_frame(&PeerRequest {
            id: 1,
            kind: Some(kind),
        })
        .map_err(|e| PeerError::BadRequest {
            peer: self.peer.clone(),
            reason: e.to_string(),
        })?;
        let (mut send, recv) = self.conn.open_bi().await.map_err(|_| self.lost())?;
        send.write_all(&frame).await.map_err(|_| self.lost())?;
        let _ = send.finish();
        let mut reader = FrameReader::new(recv, FRAME_BYTES_MAX);
        let body = match reader.read_frame().await {
            Ok(Some(body)) => body,
            Ok(None) => return Err(self.bad_answer("control stream closed without an answer")),
            Err(_) => return Err(self.lost()),
        };
        let resp: PeerResponse = frame::decode(body).map_err(|e| self.bad_answer(e.to_string()))?;
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
        stream
            .lock()
            .await
            .write_chunk(frame.freeze())
            .await
            .map_err(|_| self.lost())?;
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
            placement: self.placements.fetch_add(1, Ordering::Relaxed),
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
    /// Releases the copies of `refs` put before the placement mark
    /// `placement` (see [`PeerEndpoint::placement_mark`]).
    pub async fn release_pages(
        &self,
        refs: &[PageRef],
        placement: u64,
    ) -> Result<Vec<PageStatus>, PeerError> {
        let req = peer_request::Kind::ReleasePages(wire::ReleasePages {
            owner: self.owner.clone(),
            incarnation: self.incarnation,
            pages: refs.iter().map(rpc::ref_to_wire).collect(),
            placement,
        });
        match self.call(req).await? {
            peer_response::Kind::ReleasePages(r) => self.statuses(r.statuses, refs.len()),
            _ => Err(self.bad_answer("release answered with another kind")),
        }
    }

    /// One step of an audit of what the peer holds for us: tells it our
    /// placement floor and lists up to `max` copies from `cursor` on (see
    /// [`DonorStore::audit`](super::donor::DonorStore::audit)).
    pub async fn audit_pages(
        &self,
        floor: u64,
        cursor: u64,
        max: usize,
    ) -> Result<Result<AuditStep, PageStatus>, PeerError> {
        let req = peer_request::Kind::AuditPages(wire::AuditPages {
            owner: self.owner.clone(),
            incarnation: self.incarnation,
            floor,
            cursor,
            max: max.min(PEER_BATCH_PAGES_MAX) as u32,
        });
        let r = match self.call(req).await? {
            peer_response::Kind::AuditPages(r) => r,
            _ => return Err(self.bad_answer("audit answered with another kind")),
        };
        match rpc::status_from_wire(r.status) {
            Some(PageStatus::Ok) => {}
            Some(s) => return Ok(Err(s)),
            None => return Err(self.bad_answer(format!("status {}", r.status))),
        }
        if r.pages.len() > max {
            return Err(self.bad_answer(format!("{} copies listed, {max} asked", r.pages.len())));
        }
        let pages = r
            .pages
            .iter()
            .map(|p| {
                rpc::audited_from_wire(p).ok_or_else(|| self.bad_answer("a copy without a key"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Ok(AuditStep {
            pages,
            next: (r.next != 0).then_some(r.next),
        }))
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
        match self
            .control(peer_request::Kind::Heartbeat(ours), self.deadline)
            .await?
        {
            peer_response::Kind::Heartbeat(h) => Ok(h),
            _ => Err(self.bad_answer("heartbeat answered with another kind")),
        }
    }

    /// Carries one Raft message; the answer's body.
    pub async fn raft(&self, body: Vec<u8>, deadline: Duration) -> Result<Vec<u8>, PeerError> {
        match self
            .control(
                peer_request::Kind::Raft(wire::RaftMessage { body: body.into() }),
                deadline,
            )
            .await?
        {
            peer_response::Kind::Raft(m) => Ok(m.body.to_vec()),
            _ => Err(self.bad_answer("raft answered with another kind")),
        }
    }

    /// Asks the peer to make us a member.
    pub async fn join(&self, join: wire::Join) -> Result<wire::JoinResult, PeerError> {
        match self
            .control(peer_request::Kind::Join(join), self.deadline)
            .await?
        {
            peer_response::Kind::Join(r) => Ok(r),
            _ => Err(self.bad_answer("join answered with another kind")),
        }
    }

    /// Asks the peer (the leader, we think) to change a member.
    pub async fn change_node(
        &self,
        change: wire::ChangeNode,
    ) -> Result<wire::ChangeNodeResult, PeerError> {
        match self
            .control(peer_request::Kind::ChangeNode(change), self.deadline)
            .await?
        {
            peer_response::Kind::ChangeNode(r) => Ok(r),
            _ => Err(self.bad_answer("change answered with another kind")),
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
    let graceful = why == "stream finished";
    if conn.close_reason().is_none() {
        if graceful {
            debug!("peer finished a stream; closing the connection");
        } else {
            warn!(reason = %why, "peer stream lost; closing the connection");
        }
        conn.close(CLOSE_PROTOCOL.into(), why.as_bytes());
    }
    let mut waiters = pending.lock();
    waiters.closed = true;
    waiters.by_id.clear();
}
