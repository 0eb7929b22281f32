//! The peer transport over real QUIC on 127.0.0.1: pages travel between
//! nodes of one cluster CA byte for byte, and nothing without a valid
//! certificate of that CA gets a connection, let alone a page.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use ramster_node::cluster::donor::{DonatedPage, DonorConfig, DonorStore, PageRef, PageStatus};
use ramster_node::cluster::tls::{self, NodeIdentity};
use ramster_node::cluster::transport::{
    EndpointOptions, PEER_ALPN, PeerEndpoint, PeerError, PeerTls, TransportConfig,
};
use ramster_node::store::compress::{COMPRESS_BOUND_BYTES, CompressTable, compress, decompress};
use ramster_node::store::{PAGE_BYTES, Page, PageKey};
use ramster_protocol::peer::{PeerErrorCode, PeerResponse, peer_response};
use ramster_protocol::{FRAME_BYTES_MAX, frame, peer_handshake};
use xxhash_rust::xxh3::xxh3_64;

const LOCALHOST: &str = "127.0.0.1:0";
/// Guards every test against hanging forever if a deadline were broken; far
/// above any deadline used here.
const TEST_GUARD: Duration = Duration::from_secs(60);

/// A cluster CA with node certificates for `names`, in a temp dir.
struct Cluster {
    dir: tempfile::TempDir,
}

impl Cluster {
    fn new(names: &[&str]) -> Cluster {
        tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        tls::create_ca(dir.path()).unwrap();
        for n in names {
            tls::create_node(dir.path(), n, &["127.0.0.1".to_string()]).unwrap();
        }
        Cluster { dir }
    }

    fn node_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn identity(&self, name: &str) -> NodeIdentity {
        NodeIdentity::load(&self.node_dir(name)).unwrap()
    }
}

fn donor(bytes: u64) -> Arc<Mutex<DonorStore>> {
    Arc::new(Mutex::new(DonorStore::new(DonorConfig::with_donation(
        bytes,
    ))))
}

fn bind_with(
    node: &str,
    tls: PeerTls,
    transport: TransportConfig,
    donor: Arc<Mutex<DonorStore>>,
) -> PeerEndpoint {
    PeerEndpoint::bind(
        EndpointOptions {
            node: node.to_string(),
            incarnation: 1,
            listen: LOCALHOST.parse().unwrap(),
            tls,
            transport,
            metrics: Default::default(),
        },
        donor,
    )
    .unwrap()
}

fn bind(cluster: &Cluster, node: &str, donor: Arc<Mutex<DonorStore>>) -> PeerEndpoint {
    let tls = PeerTls::mutual(&cluster.identity(node)).unwrap();
    bind_with(node, tls, TransportConfig::default(), donor)
}

/// A page that compresses like real memory: text with numbers in it.
fn page(n: u64) -> Box<Page> {
    let mut p = Box::new([0u8; PAGE_BYTES]);
    let text = format!("page {n}: the quick brown fox {} jumps; ", n * 7919);
    for (i, b) in p.iter_mut().enumerate() {
        *b = text.as_bytes()[i % text.len()];
    }
    p
}

fn key(n: u64) -> PageKey {
    PageKey {
        space: 2,
        object: n / 100,
        index: n,
    }
}

/// The page as an owner ships it: compressed (or raw for `raw`), with the
/// checksum of the uncompressed bytes.
fn donated(n: u64, version: u64, raw: bool) -> DonatedPage {
    let p = page(n);
    let data = if raw {
        Bytes::copy_from_slice(&p[..])
    } else {
        let mut out = vec![0u8; COMPRESS_BOUND_BYTES];
        let mut table = CompressTable::default();
        let len = compress(&p, &mut out, &mut table);
        out.truncate(len);
        Bytes::from(out)
    };
    DonatedPage {
        key: key(n),
        version,
        checksum: xxh3_64(&p[..]),
        compressed: !raw,
        data,
    }
}

/// Decompresses a page that came back and checks it against its checksum.
fn unpack(p: &DonatedPage) -> Box<Page> {
    let mut out = Box::new([0u8; PAGE_BYTES]);
    if p.compressed {
        assert!(
            decompress(&p.data, &mut out),
            "page {:?} does not decode",
            p.key
        );
    } else {
        out.copy_from_slice(&p.data);
    }
    assert_eq!(xxh3_64(&out[..]), p.checksum, "checksum of {:?}", p.key);
    out
}

fn refs(range: std::ops::Range<u64>, version: u64) -> Vec<PageRef> {
    range
        .map(|n| PageRef {
            key: key(n),
            version,
        })
        .collect()
}

async fn guarded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_GUARD, f)
        .await
        .expect("the test hung past its guard")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_put_on_a_peer_come_back_byte_identical_and_release_cleanly() {
    guarded(async {
        let cluster = Cluster::new(&["donor-a", "owner-b"]);
        let donor_store = donor(64 << 20);
        let donor_ep = bind(&cluster, "donor-a", donor_store.clone());
        let owner_store = donor(64 << 20);
        let owner_ep = bind(&cluster, "owner-b", owner_store.clone());

        let session = owner_ep
            .session("donor-a", donor_ep.local_addr())
            .await
            .unwrap();
        assert_eq!(session.peer(), "donor-a");
        // Page 0 travels uncompressed, as an incompressible page would.
        let pages: Vec<DonatedPage> = (0..300).map(|n| donated(n, 1, n == 0)).collect();
        let statuses = session.put_pages(&pages).await.unwrap();
        assert!(
            statuses.iter().all(|s| *s == PageStatus::Ok),
            "{statuses:?}"
        );
        let held = donor_store.lock().usage(Some("owner-b"));
        assert_eq!(held.pages, 300);

        let got = session.get_pages(&refs(0..300, 1)).await.unwrap();
        for (n, g) in got.iter().enumerate() {
            let g = g.as_ref().unwrap();
            assert_eq!(g, &pages[n]);
            assert_eq!(*unpack(g), *page(n as u64));
        }

        // The same connection is handed out again: one per peer.
        let again = owner_ep
            .session("donor-a", donor_ep.local_addr())
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&session, &again));
        assert_eq!(donor_ep.peers(), ["owner-b"]);

        let mark = owner_ep.placement_mark();
        let released = session.release_pages(&refs(0..300, 1), mark).await.unwrap();
        assert!(released.iter().all(|s| *s == PageStatus::Ok));
        let got = session.get_pages(&refs(0..3, 1)).await.unwrap();
        assert!(got.iter().all(|g| *g == Err(PageStatus::NotFound)));
        // A put sent after the release was decided (repair moving a copy
        // back) is taken; a release covering every put (placement 0) leaves
        // any later put of that version refused, as an overtaken one is.
        let again = session.put_pages(&pages[..1]).await.unwrap();
        assert_eq!(again, [PageStatus::Ok]);
        session.release_pages(&refs(0..1, 1), 0).await.unwrap();
        let late = session.put_pages(&pages[..1]).await.unwrap();
        assert_eq!(late, [PageStatus::StaleVersion]);
        assert_eq!(donor_store.lock().usage(Some("owner-b")).pages, 0);

        assert_eq!(session.release_owner().await.unwrap(), Ok(0));
        assert_eq!(donor_store.lock().donated_bytes(), 0);
        let beat = session.heartbeat(Default::default()).await.unwrap();
        assert_eq!(beat.spare_bytes, 64 << 20);
        assert_eq!(beat.load_permille, 0);

        // The accepting side reuses the connection for its own requests.
        let back = donor_ep
            .session("owner-b", owner_ep.local_addr())
            .await
            .unwrap();
        let st = back.put_pages(&[donated(7, 1, false)]).await.unwrap();
        assert_eq!(st, [PageStatus::Ok]);
        assert_eq!(owner_store.lock().usage(Some("donor-a")).pages, 1);

        owner_ep.close().await;
        donor_ep.close().await;
    })
    .await
}

#[test]
fn segmentation_offload_is_used_only_where_a_batch_fits_one_send() {
    let with = |bytes: u16, gso: bool| TransportConfig {
        mtu_upper_bound: bytes,
        segmentation_offload: gso,
        ..TransportConfig::default()
    };
    assert!(with(1472, true).uses_segmentation_offload());
    assert!(!with(1472, false).uses_segmentation_offload());
    assert!(TransportConfig::default().uses_segmentation_offload());
    assert!(
        !with(8952, true).uses_segmentation_offload(),
        "ten jumbo datagrams overflow a UDP send"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_batches_on_loopback_travel_in_big_datagrams() {
    // The default (with GSO), and jumbo frames (without).
    for bound in [TransportConfig::default().mtu_upper_bound, 8952] {
        big_datagrams_carry_bursts(bound).await;
    }
}

async fn big_datagrams_carry_bursts(bound: u16) {
    guarded(async {
        let cluster = Cluster::new(&["donor-a", "owner-b"]);
        let transport = TransportConfig {
            mtu_upper_bound: bound,
            ..TransportConfig::default()
        };
        let tls = |node| PeerTls::mutual(&cluster.identity(node)).unwrap();
        let donor_ep = bind_with(
            "donor-a",
            tls("donor-a"),
            transport.clone(),
            donor(256 << 20),
        );
        let owner_ep = bind_with("owner-b", tls("owner-b"), transport, donor(0));
        let session = owner_ep
            .session("donor-a", donor_ep.local_addr())
            .await
            .unwrap();
        // Path-MTU discovery probes while traffic flows; loopback carries
        // 64 KiB, so it must climb to the bound both sides set.
        let mut round = 0u64;
        let mtu = loop {
            let pages: Vec<DonatedPage> = (round * 64..(round + 1) * 64)
                .map(|n| donated(n, 1, true))
                .collect();
            let statuses = session.put_pages(&pages).await.unwrap();
            assert!(statuses.iter().all(|s| *s == PageStatus::Ok));
            let (_, stats) = owner_ep
                .connection_stats()
                .into_iter()
                .find(|(peer, _)| peer == "donor-a")
                .expect("a live connection to donor-a");
            if stats.path.current_mtu == bound || round == 500 {
                break stats.path.current_mtu;
            }
            round += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(
            mtu, bound,
            "path MTU after {round} batches of 64 pages: {mtu}, not {bound}"
        );
        // Bursts of jumbo datagrams then go out whole: were they batched
        // past what one UDP send carries, they would be lost, and the
        // losses taken for a black hole would drop the MTU to 1200.
        for burst in 0..8u64 {
            let pages: Vec<DonatedPage> = (0..256)
                .map(|n| donated(1 << 20 | burst << 8 | n, 1, true))
                .collect();
            let statuses = session.put_pages(&pages).await.unwrap();
            assert!(statuses.iter().all(|s| *s == PageStatus::Ok));
        }
        let (_, stats) = owner_ep.connection_stats().into_iter().next().unwrap();
        assert_eq!(
            stats.path.current_mtu, bound,
            "path MTU after bursts: {} packets lost",
            stats.path.lost_packets
        );
        owner_ep.close().await;
        donor_ep.close().await;
    })
    .await
}

fn bind_incarnation(cluster: &Cluster, node: &str, incarnation: u64) -> PeerEndpoint {
    PeerEndpoint::bind(
        EndpointOptions {
            node: node.to_string(),
            incarnation,
            listen: LOCALHOST.parse().unwrap(),
            tls: PeerTls::mutual(&cluster.identity(node)).unwrap(),
            transport: TransportConfig::default(),
            metrics: Default::default(),
        },
        donor(0),
    )
    .unwrap()
}

/// Waits (bounded) until `session` has noticed its connection is gone.
async fn until_dead(session: &ramster_node::cluster::transport::PeerSession) {
    for _ in 0..500 {
        if !session.is_alive() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the session never noticed its peer closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_redialled_after_a_peer_restarts_and_old_incarnations_are_dropped() {
    guarded(async {
        let cluster = Cluster::new(&["donor-a", "owner-b"]);
        let store = donor(1 << 20);
        let donor_ep = bind(&cluster, "donor-a", store.clone());

        // The owner's first run leaves ten pages on the donor.
        let first_run = bind_incarnation(&cluster, "owner-b", 1);
        let s1 = first_run
            .session("donor-a", donor_ep.local_addr())
            .await
            .unwrap();
        let pages: Vec<_> = (0..10).map(|n| donated(n, 1, false)).collect();
        s1.put_pages(&pages).await.unwrap();
        assert_eq!(store.lock().usage(Some("owner-b")).pages, 10);

        // The donor restarts elsewhere: the owner's session dies and the
        // next one is a new connection to the new address.
        let donor_again = bind(&cluster, "donor-a", store.clone());
        donor_ep.close().await;
        until_dead(&s1).await;
        let err = s1.get_pages(&refs(0..1, 1)).await.unwrap_err();
        assert!(matches!(err, PeerError::ConnectionLost { .. }), "{err}");
        let s2 = first_run
            .session("donor-a", donor_again.local_addr())
            .await
            .unwrap();
        assert!(!Arc::ptr_eq(&s1, &s2));
        let got = s2.get_pages(&refs(0..10, 1)).await.unwrap();
        assert!(got.iter().all(|g| g.is_ok()));
        first_run.close().await;

        // The owner restarts with a new incarnation: its first put makes the
        // donor drop what the old incarnation left.
        let second_run = bind_incarnation(&cluster, "owner-b", 2);
        let s3 = second_run
            .session("donor-a", donor_again.local_addr())
            .await
            .unwrap();
        let st = s3.put_pages(&[donated(99, 1, false)]).await.unwrap();
        assert_eq!(st, [PageStatus::Ok]);
        assert_eq!(store.lock().owner_incarnation("owner-b"), Some(2));
        assert_eq!(store.lock().usage(Some("owner-b")).pages, 1);
        second_run.close().await;
        donor_again.close().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_run_never_replaces_the_session_with_a_newer_one() {
    guarded(async {
        let cluster = Cluster::new(&["donor-a", "owner-b"]);
        let store = donor(1 << 20);
        let donor_ep = bind(&cluster, "donor-a", store.clone());
        let newer = bind_incarnation(&cluster, "owner-b", 7);
        let s_new = newer
            .session("donor-a", donor_ep.local_addr())
            .await
            .unwrap();
        s_new.put_pages(&[donated(1, 1, false)]).await.unwrap();
        let served = || {
            donor_ep
                .live_session("owner-b")
                .map(|s| s.peer_incarnation())
        };
        assert_eq!(served(), Some(7));

        // A run older than the one the donor serves (a process paused
        // across its own restart, say) says hello: refused, and the donor
        // keeps serving the newer run.
        let older = bind_incarnation(&cluster, "owner-b", 6);
        let err = match older.session("donor-a", donor_ep.local_addr()).await {
            Ok(s) => s.put_pages(&[donated(2, 1, false)]).await.unwrap_err(),
            Err(e) => e,
        };
        refused_not_timed_out(&err);
        assert_eq!(served(), Some(7));
        assert!(s_new.is_alive());
        assert_eq!(store.lock().owner_incarnation("owner-b"), Some(7));

        // Dialled by the donor, the older run's welcome is refused too.
        let err = donor_ep
            .session_at(older.local_addr())
            .await
            .map(|_| ())
            .unwrap_err();
        refused_not_timed_out(&err);
        assert_eq!(served(), Some(7));
        assert_eq!(
            s_new.put_pages(&[donated(3, 1, false)]).await.unwrap(),
            [PageStatus::Ok]
        );
        older.close().await;
        newer.close().await;
        donor_ep.close().await;
    })
    .await
}

/// Connects as `node` with `tls` and tries to put a page; returns the error.
async fn intruder_put(node: &str, tls: PeerTls, target: SocketAddr) -> PeerError {
    let ep = bind_with(node, tls, TransportConfig::default(), donor(0));
    let result = match ep.session("donor-a", target).await {
        Ok(s) => s.put_pages(&[donated(1, 1, false)]).await.map(|_| ()),
        Err(e) => Err(e),
    };
    ep.close().await;
    result.expect_err("the intruder got through")
}

fn assert_untouched(donor_ep: &PeerEndpoint, store: &Mutex<DonorStore>) {
    let d = store.lock();
    assert_eq!(d.donated_bytes(), 0);
    assert_eq!(d.usage(None).pages, 0);
    assert_eq!(d.owner_incarnation("owner-b"), None);
    assert!(donor_ep.peers().is_empty(), "{:?}", donor_ep.peers());
}

fn refused_not_timed_out(e: &PeerError) {
    eprintln!("refused as expected: {e}");
    assert!(
        matches!(
            e,
            PeerError::Connect { .. } | PeerError::ConnectionLost { .. }
        ),
        "expected a refusal, got {e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_a_certificate_of_another_ca_is_refused_and_sees_no_page() {
    guarded(async {
        let cluster = Cluster::new(&["donor-a"]);
        let other = Cluster::new(&["owner-b"]);
        let store = donor(1 << 20);
        let donor_ep = bind(&cluster, "donor-a", store.clone());
        // The intruder trusts our CA (so it would accept our donor) but can
        // only present a certificate of its own CA.
        let forged = NodeIdentity {
            ca: cluster.identity("donor-a").ca,
            ..other.identity("owner-b")
        };
        let tls = PeerTls::from_rustls(
            forged.server_config().unwrap(),
            forged.client_config().unwrap(),
        );
        let err = intruder_put("owner-b", tls, donor_ep.local_addr()).await;
        refused_not_timed_out(&err);
        assert_untouched(&donor_ep, &store);
        donor_ep.close().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_a_certificate_is_refused_and_sees_no_page() {
    guarded(async {
        let cluster = Cluster::new(&["donor-a", "owner-b"]);
        let store = donor(1 << 20);
        let donor_ep = bind(&cluster, "donor-a", store.clone());
        let id = cluster.identity("owner-b");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(id.ca.clone()).unwrap();
        let no_cert = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tls = PeerTls::from_rustls(id.server_config().unwrap(), no_cert);
        let err = intruder_put("owner-b", tls, donor_ep.local_addr()).await;
        refused_not_timed_out(&err);
        assert_untouched(&donor_ep, &store);
        donor_ep.close().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cannot_speak_as_another_node_of_the_cluster() {
    guarded(async {
        let cluster = Cluster::new(&["donor-a", "owner-b", "owner-c"]);
        let store = donor(1 << 20);
        let donor_ep = bind(&cluster, "donor-a", store.clone());
        // A valid certificate of the cluster, for owner-c, claiming owner-b.
        let tls = PeerTls::mutual(&cluster.identity("owner-c")).unwrap();
        let err = intruder_put("owner-b", tls, donor_ep.local_addr()).await;
        refused_not_timed_out(&err);
        assert!(err.to_string().contains("not valid for the node"), "{err}");
        assert_untouched(&donor_ep, &store);
        donor_ep.close().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_donor_with_a_certificate_of_another_ca_is_not_trusted_with_pages() {
    guarded(async {
        let cluster = Cluster::new(&["owner-b"]);
        let other = Cluster::new(&["donor-a"]);
        let impostor_store = donor(1 << 20);
        let impostor = bind(&other, "donor-a", impostor_store.clone());
        let owner_ep = bind(&cluster, "owner-b", donor(0));
        let err = owner_ep
            .session("donor-a", impostor.local_addr())
            .await
            .err()
            .expect("an impostor donor was trusted");
        refused_not_timed_out(&err);
        assert_eq!(impostor_store.lock().donated_bytes(), 0);
        owner_ep.close().await;
        impostor.close().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_nodes_talk_to_each_other_but_never_to_a_secure_donor() {
    guarded(async {
        tls::install_default_provider();
        let insecure_store = donor(1 << 20);
        let insecure_donor = bind_with(
            "donor-a",
            PeerTls::insecure("donor-a").unwrap(),
            TransportConfig::default(),
            insecure_store.clone(),
        );
        let owner = bind_with(
            "owner-b",
            PeerTls::insecure("owner-b").unwrap(),
            TransportConfig::default(),
            donor(0),
        );
        let s = owner
            .session("donor-a", insecure_donor.local_addr())
            .await
            .unwrap();
        assert_eq!(
            s.put_pages(&[donated(1, 1, false)]).await.unwrap(),
            [PageStatus::Ok]
        );
        assert_eq!(insecure_store.lock().usage(Some("owner-b")).pages, 1);

        let cluster = Cluster::new(&["donor-a"]);
        let secure_store = donor(1 << 20);
        let secure_donor = bind(&cluster, "donor-a", secure_store.clone());
        let err = intruder_put(
            "owner-b",
            PeerTls::insecure("owner-b").unwrap(),
            secure_donor.local_addr(),
        )
        .await;
        refused_not_timed_out(&err);
        assert_untouched(&secure_donor, &secure_store);
        owner.close().await;
        insecure_donor.close().await;
        secure_donor.close().await;
    })
    .await
}

fn short_deadline() -> TransportConfig {
    TransportConfig {
        rpc_deadline: Duration::from_millis(400),
        ..TransportConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_peer_that_never_answers_fails_at_the_deadline() {
    guarded(async {
        let cluster = Cluster::new(&["owner-b"]);
        // A socket that takes packets and never answers: a stopped peer.
        let silent = std::net::UdpSocket::bind(LOCALHOST).unwrap();
        let tls = PeerTls::mutual(&cluster.identity("owner-b")).unwrap();
        let owner_ep = bind_with("owner-b", tls, short_deadline(), donor(0));
        let err = owner_ep
            .session("donor-a", silent.local_addr().unwrap())
            .await
            .err()
            .expect("a silent peer answered");
        assert!(matches!(err, PeerError::Deadline { ms: 400, .. }), "{err}");
        owner_ep.close().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_to_a_peer_that_stops_answering_fails_at_the_deadline() {
    guarded(async {
        let cluster = Cluster::new(&["donor-a", "owner-b"]);
        let store = donor(1 << 20);
        let donor_ep = bind(&cluster, "donor-a", store.clone());
        let tls = PeerTls::mutual(&cluster.identity("owner-b")).unwrap();
        let owner_ep = bind_with("owner-b", tls, short_deadline(), donor(0));
        let session = owner_ep
            .session("donor-a", donor_ep.local_addr())
            .await
            .unwrap();
        let ok = session.put_pages(&[donated(1, 1, false)]).await.unwrap();
        assert_eq!(ok, [PageStatus::Ok]);
        // Another thread holds the donor's store: the donor's transport
        // thread stops at its first request, and from then on answers
        // nothing, acknowledges nothing, like a stopped process.
        let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
        let (thaw_tx, thaw_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let _held = store.lock();
            held_tx.send(()).unwrap();
            let _ = thaw_rx.recv_timeout(TEST_GUARD);
        });
        held_rx.recv_timeout(TEST_GUARD).unwrap();
        let err = session
            .get_pages(&refs(1..2, 1))
            .await
            .expect_err("a stopped peer answered");
        assert!(matches!(err, PeerError::Deadline { ms: 400, .. }), "{err}");
        thaw_tx.send(()).unwrap();
        holder.join().unwrap();
        owner_ep.close().await;
        donor_ep.close().await;
    })
    .await
}

/// A raw authenticated QUIC connection to `target` after a proper hello:
/// lets a test send bytes no `PeerSession` would.
async fn raw_connection(
    identity: &NodeIdentity,
    node: &str,
    target: SocketAddr,
) -> quinn::Connection {
    let mut client = identity.client_config().unwrap();
    client.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client).unwrap();
    let mut ep = quinn::Endpoint::client(LOCALHOST.parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = ep.connect(target, "donor-a").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut out = BytesMut::new();
    frame::encode(&peer_handshake::hello(node, 1), &mut out).unwrap();
    send.write_all(&out).await.unwrap();
    read_one_frame(&mut recv).await;
    conn
}

async fn read_one_frame(recv: &mut quinn::RecvStream) -> Bytes {
    let mut buf = BytesMut::new();
    loop {
        if let Some(body) = frame::split_frame(&mut buf, FRAME_BYTES_MAX).unwrap() {
            return body;
        }
        let chunk = recv
            .read_chunk(64 * 1024, true)
            .await
            .unwrap()
            .expect("stream ended before a whole frame");
        buf.extend_from_slice(&chunk.bytes);
    }
}

async fn error_answer_to(conn: &quinn::Connection, bytes: &[u8]) -> (PeerErrorCode, String) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    let resp: PeerResponse = frame::decode(read_one_frame(&mut recv).await).unwrap();
    assert_eq!(resp.id, 0);
    match resp.kind {
        Some(peer_response::Kind::Error(e)) => {
            (PeerErrorCode::try_from(e.code).unwrap(), e.message)
        }
        other => panic!("expected an error answer, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_frames_get_a_clear_error() {
    guarded(async {
        let cluster = Cluster::new(&["donor-a", "owner-b"]);
        let store = donor(1 << 20);
        let donor_ep = bind(&cluster, "donor-a", store.clone());
        let conn = raw_connection(
            &cluster.identity("owner-b"),
            "owner-b",
            donor_ep.local_addr(),
        )
        .await;

        let mut garbage = BytesMut::new();
        garbage.put_u32_le(5);
        garbage.put_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        let (code, msg) = error_answer_to(&conn, &garbage).await;
        assert_eq!(code, PeerErrorCode::Malformed);
        assert!(msg.contains("malformed"), "{msg}");

        let mut huge = BytesMut::new();
        huge.put_u32_le(u32::MAX);
        let (code, msg) = error_answer_to(&conn, &huge).await;
        assert_eq!(code, PeerErrorCode::Malformed);
        assert!(msg.contains("exceeds the limit"), "{msg}");

        assert_eq!(store.lock().donated_bytes(), 0);
        conn.close(0u32.into(), b"done");
        donor_ep.close().await;
    })
    .await
}

#[test]
fn certificates_are_issued_for_their_names_and_both_ends_of_a_connection() {
    tls::install_default_provider();
    let cluster = Cluster::new(&[]);
    let dir = tls::create_node(
        cluster.dir.path(),
        "node-1",
        &["10.1.2.3".into(), "node-1.ramster.svc".into()],
    )
    .unwrap();
    assert_eq!(dir, cluster.node_dir("node-1"));
    let id = cluster.identity("node-1");
    let ee = &id.chain[0];
    assert!(tls::cert_names_node(ee, "node-1"));
    assert!(tls::cert_names_node(ee, "node-1.ramster.svc"));
    assert!(!tls::cert_names_node(ee, "node-2"));
    check_chain_and_usages(&id);
    // A second CA in the same place would orphan every node certificate.
    assert!(matches!(
        tls::create_ca(cluster.dir.path()),
        Err(tls::CertError::Exists(_))
    ));
    assert!(matches!(
        tls::create_node(cluster.dir.path(), "not a name!", &[]),
        Err(tls::CertError::BadName(_))
    ));
}

/// The certificate chains to the CA and carries both TLS usages; checked
/// with webpki, as a peer checks it.
fn check_chain_and_usages(id: &NodeIdentity) {
    id.check("node-1").unwrap();
    assert!(id.check("node-2").is_err());
    let ee = webpki::EndEntityCert::try_from(&id.chain[0]).unwrap();
    let ip = rustls_pki_types::ServerName::try_from("10.1.2.3").unwrap();
    ee.verify_is_valid_for_subject_name(&ip).unwrap();
    // Under another CA the same certificate is worthless.
    let other = Cluster::new(&["x"]);
    let foreign = NodeIdentity {
        ca: other.identity("x").ca,
        ..id.clone()
    };
    assert!(foreign.check("node-1").is_err());
}
