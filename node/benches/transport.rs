//! Pages between two nodes over loopback QUIC with mutual TLS: how fast
//! remotify can put compressed pages on a donor (MB/s of compressed bytes)
//! and how many pages/s pipelined remote loads get back, every page
//! decompressed and checked against its checksum as a remote load does.
//!
//! `cargo bench -p ramster-node --bench transport`; `RAMSTER_BENCH_PAGES`
//! sets the corpus size (default 65536 pages, 256 MiB before compression),
//! `RAMSTER_BENCH_GSO=0` turns segmentation offload off,
//! `RAMSTER_BENCH_MTU=1452` sets the path-MTU discovery bound.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use ramster_node::cli::corpus::Pages;
use ramster_node::cluster::donor::{DonatedPage, DonorConfig, DonorStore, PageRef, PageStatus};
use ramster_node::cluster::tls::{self, NodeIdentity};
use ramster_node::cluster::transport::{
    EndpointOptions, PeerEndpoint, PeerSession, PeerTls, TransportConfig,
};
use ramster_node::store::compress::{
    COMPRESS_BOUND_BYTES, CompressTable, REJECT_ABOVE_BYTES, compress, decompress, same_filled_word,
};
use ramster_node::store::{PAGE_BYTES, PageKey};
use xxhash_rust::xxh3::xxh3_64;

const PUT_BATCH_PAGES: usize = 256;
const PUT_CONCURRENCY: usize = 8;
/// (pages per get, gets in flight) combinations measured.
const GET_SHAPES: &[(usize, usize)] = &[(1, 64), (16, 16), (64, 8), (256, 4)];
/// Sequential one-page gets timed for the round-trip latency.
const ROUND_TRIPS: usize = 5000;

/// CPU seconds this process has used (user + system), from /proc: with
/// other work on the machine, throughput per CPU-second says more than
/// throughput per wall second.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 12th and 13th of them, in clock ticks (100 per second on Linux).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    tls::install_default_provider();
    let pages: usize = std::env::var("RAMSTER_BENCH_PAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(65_536);
    let gso = std::env::var("RAMSTER_BENCH_GSO").map_or(true, |v| v != "0");
    let mtu: Option<u16> = std::env::var("RAMSTER_BENCH_MTU")
        .ok()
        .and_then(|s| s.parse().ok());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(pages, gso, mtu));
}

/// The pages remotify would ship: not same-filled (those stay local as one
/// word) and compressing within the store's admission limit.
fn remotable(corpus: &Pages) -> Vec<DonatedPage> {
    let mut out = vec![0u8; COMPRESS_BOUND_BYTES];
    let mut table = CompressTable::default();
    let mut pages = Vec::with_capacity(corpus.len());
    for i in 0..corpus.len() {
        let page = corpus.page(i);
        if same_filled_word(page).is_some() {
            continue;
        }
        let len = compress(page, &mut out, &mut table);
        if len > REJECT_ABOVE_BYTES {
            continue;
        }
        pages.push(DonatedPage {
            key: PageKey {
                space: 1,
                object: 0,
                index: i as u64,
            },
            version: 1,
            checksum: xxh3_64(page),
            compressed: true,
            data: Bytes::copy_from_slice(&out[..len]),
        });
    }
    pages
}

async fn run(corpus_pages: usize, gso: bool, mtu: Option<u16>) {
    let dir = tempfile::tempdir().expect("temp dir");
    tls::create_ca(dir.path()).expect("CA");
    for n in ["donor-a", "owner-b"] {
        tls::create_node(dir.path(), n, &[]).expect("node cert");
    }
    let transport = TransportConfig {
        segmentation_offload: gso,
        rpc_deadline: Duration::from_secs(30),
        ..TransportConfig::default()
    };
    let transport = TransportConfig {
        mtu_upper_bound: mtu.unwrap_or(transport.mtu_upper_bound),
        ..transport
    };
    let bind = |name: &str, donor| {
        let id = NodeIdentity::load(&dir.path().join(name)).expect("identity");
        PeerEndpoint::bind(
            EndpointOptions {
                node: name.into(),
                incarnation: 1,
                listen: "127.0.0.1:0".parse().unwrap(),
                tls: PeerTls::mutual(&id).expect("tls"),
                transport: transport.clone(),
                metrics: Default::default(),
            },
            donor,
        )
        .expect("bind")
    };
    let donor_store = Arc::new(Mutex::new(DonorStore::new(DonorConfig::with_donation(
        4 << 30,
    ))));
    let donor_ep = bind("donor-a", donor_store.clone());
    let owner_ep = bind(
        "owner-b",
        Arc::new(Mutex::new(DonorStore::new(DonorConfig::with_donation(0)))),
    );
    let session = owner_ep
        .session("donor-a", donor_ep.local_addr())
        .await
        .expect("session");

    let pages = Arc::new(remotable(&Pages::synthetic(corpus_pages, 42)));
    let compressed: usize = pages.iter().map(|p| p.data.len()).sum();
    println!(
        "corpus: {} pages drawn, {} remotable, {:.1} MiB compressed ({:.2}x), GSO {}, MTU bound {}",
        corpus_pages,
        pages.len(),
        compressed as f64 / (1 << 20) as f64,
        (pages.len() * PAGE_BYTES) as f64 / compressed as f64,
        if gso { "on" } else { "off" },
        transport.mtu_upper_bound
    );

    // Put: remotify's side.
    let start = Instant::now();
    let cpu = cpu_secs();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..PUT_CONCURRENCY {
        let (session, pages) = (session.clone(), pages.clone());
        tasks.spawn(async move {
            let batches = pages
                .chunks(PUT_BATCH_PAGES)
                .skip(t)
                .step_by(PUT_CONCURRENCY);
            for batch in batches {
                let st = session.put_pages(batch).await.expect("put");
                assert!(st.iter().all(|s| *s == PageStatus::Ok), "put refused");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("put task");
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu;
    println!(
        "put  batch {PUT_BATCH_PAGES:>3} x {PUT_CONCURRENCY:>2} in flight: {:>9.0} pages/s  {:>7.1} MB/s compressed  ({:.2} s; {:.0} MB/CPU-s, both ends)",
        pages.len() as f64 / secs,
        compressed as f64 / secs / 1e6,
        secs,
        compressed as f64 / cpu / 1e6,
    );
    assert_eq!(
        donor_store.lock().usage(Some("owner-b")).pages,
        pages.len() as u64
    );

    // Get: pipelined remote loads, each page decompressed and checked.
    for &(batch, in_flight) in GET_SHAPES {
        let total = pages.len() / batch * batch;
        let start = Instant::now();
        let cpu = cpu_secs();
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..in_flight {
            let (session, pages) = (session.clone(), pages.clone());
            tasks.spawn(get_share(session, pages, total, batch, t, in_flight));
        }
        let mut loaded = 0;
        while let Some(r) = tasks.join_next().await {
            loaded += r.expect("get task");
        }
        let secs = start.elapsed().as_secs_f64();
        let cpu = cpu_secs() - cpu;
        println!(
            "get  batch {batch:>3} x {in_flight:>2} in flight: {:>9.0} pages/s  ({loaded} pages verified in {:.2} s; {:.0} pages/CPU-s, both ends)",
            loaded as f64 / secs,
            secs,
            loaded as f64 / cpu,
        );
    }
    // One page, one request in flight: the round trip a remote load pays.
    let mut lat = Vec::with_capacity(ROUND_TRIPS);
    for p in pages.iter().cycle().take(ROUND_TRIPS) {
        let started = Instant::now();
        let got = session
            .get_pages(&[PageRef {
                key: p.key,
                version: p.version,
            }])
            .await
            .expect("get");
        lat.push(started.elapsed());
        assert!(got[0].is_ok(), "page held by the donor");
    }
    lat.sort_unstable();
    let q = |f: f64| lat[((lat.len() - 1) as f64 * f) as usize].as_secs_f64() * 1e6;
    println!(
        "get  batch   1 x  1 in flight: p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs ({ROUND_TRIPS} round trips)",
        q(0.5),
        q(0.9),
        q(0.99)
    );
    owner_ep.close().await;
    donor_ep.close().await;
}

/// Loads task `t`'s share of the first `total` pages, `batch` at a time;
/// returns how many were loaded and verified.
async fn get_share(
    session: Arc<PeerSession>,
    pages: Arc<Vec<DonatedPage>>,
    total: usize,
    batch: usize,
    t: usize,
    tasks: usize,
) -> usize {
    let mut page = Box::new([0u8; PAGE_BYTES]);
    let mut loaded = 0;
    for chunk in pages[..total].chunks(batch).skip(t).step_by(tasks) {
        let refs: Vec<PageRef> = chunk
            .iter()
            .map(|p| PageRef {
                key: p.key,
                version: p.version,
            })
            .collect();
        for got in session.get_pages(&refs).await.expect("get") {
            let got = got.expect("page held by the donor");
            assert!(decompress(&got.data, &mut page), "page does not decode");
            assert_eq!(xxh3_64(&page[..]), got.checksum, "checksum mismatch");
            loaded += 1;
        }
    }
    loaded
}
