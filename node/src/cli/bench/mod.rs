//! `ramster bench`: stores every page, loads them all back in random order,
//! verifies every byte, and reports throughput, latency and memory.
//!
//! `--embedded` drives a page store in this process on one thread (the
//! store's own speed); `--socket` drives a running node through the native
//! API with `--depth` requests of `--batch` pages in flight; `--peer` runs
//! the same pages, order and checks against zram, memcached or Redis
//! ([`peers`]), so the figures can be set side by side.
//!
//! `--phase store --state FILE` stores once and records which pages the
//! node accepted; `--phase verify --state FILE`, run any number of times
//! later (after a peer died, say), loads every page again and checks each
//! accepted one, without storing anything.

mod cluster;
mod peers;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use ramster_protocol::v1;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

pub use peers::Peer;

use super::corpus::Pages;
use super::size::{format_size, parse_size};
use crate::frontend::{Frontend, LoadResult, StoreResult};
use crate::store::{PAGE_BYTES, PageStore, StoreConfig};
use ramster_client::Client;

/// Synthetic pages when `--pages` is not given: 128 MiB, the corpus's size.
const SYNTHETIC_PAGES_DEFAULT: usize = 32 * 1024;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Drive a page store inside this process, on one thread (the default).
    #[arg(long, conflicts_with_all = ["socket", "peer"])]
    pub embedded: bool,
    /// Drive a running node through its API socket.
    #[arg(long, env = "RAMSTER_API_SOCKET", conflicts_with = "peer")]
    pub socket: Option<PathBuf>,
    /// With `--socket`: measure remote memory on a node in a cluster
    /// (remotify, remote loads one at a time and pipelined, loads during
    /// suction); see `cluster`.
    #[arg(long, requires = "socket")]
    pub cluster: bool,
    /// With `--cluster`: first time remotify alone. The node is filled to
    /// 70% of its capacity (below where remotify starts), its capacity is
    /// then lowered to SIZE through `--admin`, and what remotify ships with
    /// no client storing is timed; the rest of the bench runs at SIZE.
    #[arg(long, value_parser = parse_size, requires_all = ["cluster", "admin"])]
    pub shrink_to: Option<u64>,
    /// The node's admin endpoint (HOST:PORT), for `--shrink-to`.
    #[arg(long, requires = "shrink_to")]
    pub admin: Option<String>,
    /// Run the same bench against another system instead of ramster.
    #[arg(long, value_enum)]
    pub peer: Option<Peer>,
    /// The zram block device (`--peer zram`); it is reset, used and reset again.
    #[arg(long, default_value = "/dev/zram0")]
    pub peer_device: PathBuf,
    /// host:port of memcached or Redis [default: 127.0.0.1:11211 or 127.0.0.1:6379].
    #[arg(long)]
    pub peer_addr: Option<String>,
    /// A corpus of real memory pages (see shared/corpus).
    #[arg(long, conflicts_with = "synthetic")]
    pub corpus: Option<PathBuf>,
    /// Synthetic pages with the corpus's mix (the default).
    #[arg(long)]
    pub synthetic: bool,
    /// Pages to store (a corpus is repeated or cut to this count).
    #[arg(long)]
    pub pages: Option<usize>,
    /// Requests in flight (socket mode, memcached, Redis).
    #[arg(long, default_value_t = 16)]
    pub depth: usize,
    /// Pages per request (socket mode; peers take one page per request).
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Capacity of the embedded store [default: room for every page].
    #[arg(long, value_parser = parse_size)]
    pub capacity: Option<u64>,
    /// The frontswap area to use (socket mode: it is re-initialised).
    #[arg(long, default_value_t = 1)]
    pub area: u32,
    /// Seed for synthetic pages and the load order.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// What to run (socket mode): everything, or storing and verifying
    /// apart, with --state between them.
    #[arg(long, value_enum, default_value = "all", requires = "socket")]
    pub phase: Phase,
    /// The file `--phase store` writes (pages, seed, area and which pages
    /// were accepted) and `--phase verify` reads.
    #[arg(long)]
    pub state: Option<PathBuf>,
}

/// Which part of the bench to run.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Phase {
    /// Store, load back in random order, verify, report.
    All,
    /// Store the pages; write which were accepted to --state.
    Store,
    /// Load every page --state names and check it; store nothing.
    Verify,
}

/// What `--phase store` leaves for `--phase verify`: enough to make the
/// same pages again and to know which ones the node must give back.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct PhaseState {
    pub area: u32,
    pub seed: u64,
    pub pages: usize,
    /// The corpus the pages came from; synthetic pages when absent.
    pub corpus: Option<PathBuf>,
    /// Which pages were accepted: bit `i % 8` of byte `i / 8`, in hex.
    pub accepted: String,
}

impl PhaseState {
    fn accepted_bits(accepted: &[bool]) -> String {
        let mut bytes = vec![0u8; accepted.len().div_ceil(8)];
        for (i, _) in accepted.iter().enumerate().filter(|(_, a)| **a) {
            bytes[i / 8] |= 1 << (i % 8);
        }
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The accepted flags, one per page.
    pub fn accepted(&self) -> anyhow::Result<Vec<bool>> {
        let hex = self.accepted.as_bytes();
        if hex.len() != self.pages.div_ceil(8) * 2 {
            bail!(
                "the accepted bitmap has {} hex digits; {} pages need {}",
                hex.len(),
                self.pages,
                self.pages.div_ceil(8) * 2
            );
        }
        let mut bytes = Vec::with_capacity(hex.len() / 2);
        for pair in hex.chunks(2) {
            let text = std::str::from_utf8(pair).unwrap_or("??");
            bytes.push(
                u8::from_str_radix(text, 16)
                    .with_context(|| format!("{text:?} in the accepted bitmap"))?,
            );
        }
        Ok((0..self.pages)
            .map(|i| bytes[i / 8] & (1 << (i % 8)) != 0)
            .collect())
    }
}

/// What a store or verify phase found.
#[derive(Debug, Serialize, Default, PartialEq)]
pub struct PhaseReport {
    pub phase: String,
    pub pages: usize,
    pub accepted: usize,
    /// Accepted pages that loaded back byte-identical.
    pub good: usize,
    /// Accepted pages the node no longer has (`NOT_FOUND`).
    pub lost: usize,
    /// Accepted pages the node could not reach (`UNAVAILABLE`).
    pub unavailable: usize,
    /// Accepted pages the node found damaged (`CORRUPT`).
    pub corrupt: usize,
    /// Pages that came back with other bytes, or refused pages that came back.
    pub wrong: usize,
    pub seconds: f64,
    /// Latency of one request (of `--batch` pages), microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    /// True when every accepted page loaded back byte-identical.
    pub verified: bool,
}

/// What a bench run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// What was measured: `ramster`, `zram`, `memcached` or `redis`.
    pub system: String,
    pub mode: String,
    pub source: String,
    pub pages: usize,
    pub batch: usize,
    pub depth: usize,
    pub accepted: usize,
    pub rejected: usize,
    pub rejected_no_capacity: usize,
    pub rejected_incompressible: usize,
    pub store_pages_per_sec: f64,
    pub store_mb_per_sec: f64,
    pub load_pages_per_sec: f64,
    pub load_mb_per_sec: f64,
    /// Latency of one op (embedded) or one request (socket), microseconds.
    pub latency_unit: String,
    pub store_p50_us: f64,
    pub store_p99_us: f64,
    pub load_p50_us: f64,
    pub load_p99_us: f64,
    /// Bytes of the accepted pages / bytes the store holds for them.
    pub compression_ratio: f64,
    /// LZ4 alone: bytes of the compressed pages / their compressed bytes.
    pub payload_ratio: f64,
    /// Memory held per stored page: for ramster the store's slabs + index;
    /// for a peer, see `memory_basis`.
    pub bytes_per_page: f64,
    /// Memory per page counting only the pages kept compressed or
    /// same-filled: ramster refuses incompressible pages (they go to the
    /// client's swap device) while zram keeps them whole, so this is the
    /// like-for-like figure. Equal to `bytes_per_page` where nothing is
    /// kept whole.
    pub bytes_per_compressed_page: f64,
    /// Where `bytes_per_page` comes from.
    pub memory_basis: String,
    pub payload_bytes_per_page: f64,
    pub slack_bytes_per_page: f64,
    pub index_bytes_per_page: f64,
    /// Free slot bytes / slab bytes.
    pub fragmentation: f64,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub mismatches: usize,
    /// True only if every accepted page loaded back byte-identical and every
    /// refused one was a miss.
    pub verified: bool,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.phase != Phase::All {
        return run_phase(&args);
    }
    let (pages, source) = match &args.corpus {
        Some(path) => (
            Pages::from_file(path, args.pages)?,
            path.display().to_string(),
        ),
        None => {
            let n = args.pages.unwrap_or(SYNTHETIC_PAGES_DEFAULT);
            (
                Pages::synthetic(n, args.seed),
                format!("synthetic (seed {})", args.seed),
            )
        }
    };
    if pages.is_empty() {
        bail!("no pages to bench");
    }
    if args.batch == 0 || args.depth == 0 {
        bail!("--batch and --depth must be at least 1");
    }
    let progress = !args.json && std::io::stderr().is_terminal();
    let report = match (&args.peer, &args.socket) {
        (Some(peer), _) => peers::run(&args, *peer, &pages, source, progress)?,
        (None, Some(path)) if args.cluster => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let r = rt.block_on(async {
                let client = Arc::new(connect(path).await?);
                cluster::run(&args, client, &pages, source, progress).await
            })?;
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                cluster::print_table(&r);
            }
            if !r.verified {
                bail!(
                    "verification failed: {} pages did not load back as stored",
                    r.mismatches
                );
            }
            return Ok(());
        }
        (None, Some(path)) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run_socket(&args, path.clone(), &pages, source, progress))?
        }
        (None, None) => run_embedded(&args, &pages, source, progress),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    if !report.verified {
        bail!(
            "verification failed: {} pages did not load back as stored",
            report.mismatches
        );
    }
    Ok(())
}

/// `--phase store` or `--phase verify`.
fn run_phase(args: &BenchArgs) -> anyhow::Result<()> {
    let (Some(socket), Some(state_path)) = (&args.socket, &args.state) else {
        bail!("--phase store|verify needs --socket and --state");
    };
    if args.batch == 0 || args.depth == 0 {
        bail!("--batch and --depth must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = match args.phase {
        Phase::Store => {
            let pages = match &args.corpus {
                Some(path) => Pages::from_file(path, args.pages)?,
                None => Pages::synthetic(args.pages.unwrap_or(SYNTHETIC_PAGES_DEFAULT), args.seed),
            };
            if pages.is_empty() {
                bail!("no pages to store");
            }
            let t0 = Instant::now();
            let accepted = rt.block_on(store_phase(args, socket, &pages))?;
            let state = PhaseState {
                area: args.area,
                seed: args.seed,
                pages: pages.len(),
                corpus: args.corpus.clone(),
                accepted: PhaseState::accepted_bits(&accepted),
            };
            let tmp = state_path.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec(&state)?)
                .with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, state_path)
                .with_context(|| format!("writing {}", state_path.display()))?;
            let n = accepted.iter().filter(|a| **a).count();
            PhaseReport {
                phase: "store".into(),
                pages: pages.len(),
                accepted: n,
                seconds: t0.elapsed().as_secs_f64(),
                verified: true,
                ..Default::default()
            }
        }
        Phase::Verify => {
            let text = std::fs::read(state_path)
                .with_context(|| format!("reading {}", state_path.display()))?;
            let state: PhaseState = serde_json::from_slice(&text)
                .with_context(|| format!("reading {}", state_path.display()))?;
            let accepted = state.accepted()?;
            let pages = match &state.corpus {
                Some(path) => Pages::from_file(path, Some(state.pages))?,
                None => Pages::synthetic(state.pages, state.seed),
            };
            let t0 = Instant::now();
            let mut r = rt.block_on(verify_phase(args, socket, &state, &accepted, &pages))?;
            r.seconds = t0.elapsed().as_secs_f64();
            r
        }
        Phase::All => unreachable!("handled by run"),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{}: {} pages, {} accepted; {} good, {} lost, {} unavailable, {} corrupt, {} wrong ({:.1} s; request p50 {:.0} µs, p99 {:.0} µs)",
            report.phase,
            report.pages,
            report.accepted,
            report.good,
            report.lost,
            report.unavailable,
            report.corrupt,
            report.wrong,
            report.seconds,
            report.p50_us,
            report.p99_us
        );
    }
    if !report.verified {
        bail!(
            "verification failed: {} of {} accepted pages did not load back as stored",
            report.accepted - report.good,
            report.accepted
        );
    }
    Ok(())
}

/// Stores every page once into a freshly initialised area; which were accepted.
async fn store_phase(
    args: &BenchArgs,
    socket: &std::path::Path,
    pages: &Pages,
) -> anyhow::Result<Vec<bool>> {
    let client = Arc::new(connect(socket).await?);
    let area = args.area;
    client.init_area(area, false).await?;
    let batch = batch_for(args, &client);
    let stored = store_offsets(
        args.depth,
        batch,
        &client,
        area,
        pages,
        Arc::new((0..pages.len() as u64).collect()),
        &ProgressBar::hidden(),
    )
    .await?;
    let mut accepted = vec![false; pages.len()];
    for (i, o) in stored.outcomes {
        accepted[i] = matches!(o, Outcome::Stored(v1::Status::Ok));
    }
    Ok(accepted)
}

/// Loads every page of the state's area and sorts what came back.
async fn verify_phase(
    args: &BenchArgs,
    socket: &std::path::Path,
    state: &PhaseState,
    accepted: &[bool],
    pages: &Pages,
) -> anyhow::Result<PhaseReport> {
    let client = Arc::new(connect(socket).await?);
    let area = state.area;
    let batch = batch_for(args, &client);
    let mut loaded = load_offsets(
        args.depth,
        batch,
        &client,
        area,
        Arc::new((0..pages.len() as u64).collect()),
        &ProgressBar::hidden(),
    )
    .await?;
    let mut r = PhaseReport {
        phase: "verify".into(),
        pages: pages.len(),
        accepted: accepted.iter().filter(|a| **a).count(),
        p50_us: percentile_us(&mut loaded.latencies, 0.50),
        p99_us: percentile_us(&mut loaded.latencies, 0.99),
        ..Default::default()
    };
    for (i, o) in loaded.outcomes {
        let Outcome::Loaded(got) = o else {
            unreachable!("load phase")
        };
        match (accepted[i], got) {
            (true, Ok(p)) if p[..] == pages.page(i)[..] => r.good += 1,
            (false, Err(v1::Status::NotFound)) => {}
            (true, Err(v1::Status::NotFound)) => r.lost += 1,
            (true, Err(v1::Status::Unavailable)) => r.unavailable += 1,
            (true, Err(v1::Status::Corrupt)) => r.corrupt += 1,
            _ => r.wrong += 1,
        }
    }
    r.verified = r.good == r.accepted && r.wrong == 0;
    Ok(r)
}

fn bar(len: usize, what: &str, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>6} [{bar:40}] {pos}/{len} pages {per_sec} {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

fn percentile_us(lat: &mut [Duration], q: f64) -> f64 {
    if lat.is_empty() {
        return 0.0;
    }
    lat.sort_unstable();
    let i = ((lat.len() as f64 - 1.0) * q).round() as usize;
    lat[i].as_secs_f64() * 1e6
}

/// Load order: every page once, shuffled.
fn load_order(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut SmallRng::seed_from_u64(seed ^ 0x5eed));
    order
}

struct Tally {
    accepted: Vec<bool>,
    rejected_no_capacity: usize,
    rejected_incompressible: usize,
    mismatches: usize,
}

fn run_embedded(args: &BenchArgs, pages: &Pages, source: String, progress: bool) -> Report {
    let n = pages.len();
    // Room for every page uncompressed plus the index, unless told otherwise.
    let capacity = args
        .capacity
        .unwrap_or((n as u64) * (PAGE_BYTES as u64 + 256) + (64 << 20));
    let store = Arc::new(PageStore::new(StoreConfig::with_capacity(capacity)));
    let fe = Frontend::new("bench", store);
    let area = args.area;
    fe.init_area(area, false).expect("area id in range");
    let mut tally = Tally {
        accepted: vec![false; n],
        rejected_no_capacity: 0,
        rejected_incompressible: 0,
        mismatches: 0,
    };

    let mut store_lat = Vec::with_capacity(n);
    let pb = bar(n, "store", progress);
    let t0 = Instant::now();
    for i in 0..n {
        let s = Instant::now();
        let r = fe
            .store_page(area, i as u64, pages.page(i))
            .expect("valid op");
        store_lat.push(s.elapsed());
        match r {
            StoreResult::Accepted => tally.accepted[i] = true,
            StoreResult::Rejected(crate::frontend::Reject::NoCapacity) => {
                tally.rejected_no_capacity += 1
            }
            StoreResult::Rejected(_) => tally.rejected_incompressible += 1,
        }
        if i % 1024 == 1023 {
            pb.inc(1024);
        }
    }
    let store_secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let stats = fe.store().stats();

    let order = load_order(n, args.seed);
    let mut load_lat = Vec::with_capacity(n);
    let mut out = Box::new([0u8; PAGE_BYTES]);
    let pb = bar(n, "load", progress);
    let t0 = Instant::now();
    for (k, &i) in order.iter().enumerate() {
        let s = Instant::now();
        let r = fe.load_page(area, i as u64, &mut out).expect("valid op");
        load_lat.push(s.elapsed());
        let good = match r {
            LoadResult::Hit => tally.accepted[i] && out[..] == pages.page(i)[..],
            LoadResult::NotFound => !tally.accepted[i],
            LoadResult::Unavailable | LoadResult::Corrupt => false,
        };
        tally.mismatches += !good as usize;
        if k % 1024 == 1023 {
            pb.inc(1024);
        }
    }
    let load_secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();

    report(
        args,
        "embedded",
        "op",
        source,
        n,
        &tally,
        (store_secs, &mut store_lat),
        (load_secs, &mut load_lat),
        &(&stats).into(),
    )
}

async fn run_socket(
    args: &BenchArgs,
    path: PathBuf,
    pages: &Pages,
    source: String,
    progress: bool,
) -> anyhow::Result<Report> {
    let n = pages.len();
    let client = Arc::new(connect(&path).await?);
    let area = args.area;
    client.init_area(area, false).await?;
    let batch = batch_for(args, &client);

    // Stores: `depth` workers take batches of offsets off a shared cursor.
    let pb = bar(n, "store", progress);
    let t0 = Instant::now();
    let all: Arc<Vec<u64>> = Arc::new((0..n as u64).collect());
    let stored = store_offsets(args.depth, batch, &client, area, pages, all, &pb).await?;
    let store_secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();

    let mut tally = Tally {
        accepted: vec![false; n],
        rejected_no_capacity: 0,
        rejected_incompressible: 0,
        mismatches: 0,
    };
    for (i, o) in &stored.outcomes {
        match o {
            Outcome::Stored(v1::Status::Ok) => tally.accepted[*i] = true,
            Outcome::Stored(v1::Status::RejectedNoCapacity) => tally.rejected_no_capacity += 1,
            Outcome::Stored(_) => tally.rejected_incompressible += 1,
            Outcome::Loaded(_) => unreachable!("store phase"),
        }
    }
    let stats = client.stats().await?.store.unwrap_or_default();

    // Loads, in random order, verified against the source pages.
    let order: Arc<Vec<u64>> = Arc::new(
        load_order(n, args.seed)
            .into_iter()
            .map(|i| i as u64)
            .collect(),
    );
    let pb = bar(n, "load", progress);
    let t0 = Instant::now();
    let loaded = load_offsets(args.depth, batch, &client, area, order, &pb).await?;
    let load_secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    for (i, o) in loaded.outcomes {
        let good = match o {
            Outcome::Loaded(Ok(p)) => tally.accepted[i] && p[..] == pages.page(i)[..],
            Outcome::Loaded(Err(v1::Status::NotFound)) => !tally.accepted[i],
            _ => false,
        };
        tally.mismatches += !good as usize;
    }

    let (mut store_lat, mut load_lat) = (stored.latencies, loaded.latencies);
    Ok(report(
        args,
        "socket",
        "request",
        source,
        n,
        &tally,
        (store_secs, &mut store_lat),
        (load_secs, &mut load_lat),
        &stats,
    ))
}

async fn connect(path: &std::path::Path) -> anyhow::Result<Client> {
    Client::connect(path)
        .await
        .with_context(|| format!("connecting to the node at {}", path.display()))
}

enum Outcome {
    Stored(v1::Status),
    Loaded(Result<bytes::Bytes, v1::Status>),
}

#[derive(Default)]
struct Pipelined {
    outcomes: Vec<(usize, Outcome)>,
    latencies: Vec<Duration>,
}

/// Requests of this many pages: `--batch`, within what the node takes.
fn batch_for(args: &BenchArgs, client: &Client) -> usize {
    args.batch
        .min(client.welcome().max_batch_ops as usize)
        .max(1)
}

/// Stores the pages at `offsets` (page `i` at offset `i`, the pages
/// repeated past the last), `depth` requests of `batch` in flight.
async fn store_offsets(
    depth: usize,
    batch: usize,
    client: &Arc<Client>,
    area: u32,
    pages: &Pages,
    offsets: Arc<Vec<u64>>,
    pb: &ProgressBar,
) -> anyhow::Result<Pipelined> {
    let (client, pages) = (client.clone(), pages.clone());
    pipeline(depth, offsets.len(), batch, pb, move |range| {
        let (client, pages, offsets) = (client.clone(), pages.clone(), offsets.clone());
        async move {
            let batch: Vec<_> = offsets[range]
                .iter()
                .map(|&o| (o, pages.page_bytes(o as usize % pages.len())))
                .collect();
            let statuses = client.store_pages(area, &batch).await?;
            Ok(batch
                .iter()
                .zip(statuses)
                .map(|((o, _), s)| (*o as usize, Outcome::Stored(s)))
                .collect())
        }
    })
    .await
}

/// Loads the pages at `offsets`, in that order, `depth` requests of
/// `batch` in flight.
async fn load_offsets(
    depth: usize,
    batch: usize,
    client: &Arc<Client>,
    area: u32,
    offsets: Arc<Vec<u64>>,
    pb: &ProgressBar,
) -> anyhow::Result<Pipelined> {
    let client = client.clone();
    pipeline(depth, offsets.len(), batch, pb, move |range| {
        let (client, offsets) = (client.clone(), offsets.clone());
        async move {
            let wanted = &offsets[range];
            let got = client.load_pages(area, wanted).await?;
            Ok(wanted
                .iter()
                .zip(got)
                .map(|(&o, p)| (o as usize, Outcome::Loaded(p)))
                .collect())
        }
    })
    .await
}

/// The report's last line.
fn verdict(verified: bool, mismatches: usize) -> String {
    if verified {
        "every page byte-identical".to_string()
    } else {
        format!("{mismatches} MISMATCHES")
    }
}

/// Runs `call` over `0..n` in batches, `depth` at a time.
async fn pipeline<F, Fut>(
    depth: usize,
    n: usize,
    batch: usize,
    pb: &ProgressBar,
    call: F,
) -> anyhow::Result<Pipelined>
where
    F: Fn(std::ops::Range<usize>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<Vec<(usize, Outcome)>>> + Send,
{
    let cursor = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..depth {
        let (cursor, call, pb) = (cursor.clone(), call.clone(), pb.clone());
        set.spawn(async move {
            let mut mine = Pipelined::default();
            loop {
                let start = cursor.fetch_add(batch, Ordering::Relaxed);
                if start >= n {
                    return anyhow::Ok(mine);
                }
                let range = start..(start + batch).min(n);
                let len = range.len();
                let t = Instant::now();
                mine.outcomes.extend(call(range).await?);
                mine.latencies.push(t.elapsed());
                pb.inc(len as u64);
            }
        });
    }
    let mut all = Pipelined::default();
    while let Some(r) = set.join_next().await {
        let part = r??;
        all.outcomes.extend(part.outcomes);
        all.latencies.extend(part.latencies);
    }
    Ok(all)
}

#[allow(clippy::too_many_arguments)]
fn report(
    args: &BenchArgs,
    mode: &str,
    latency_unit: &str,
    source: String,
    n: usize,
    tally: &Tally,
    (store_secs, store_lat): (f64, &mut [Duration]),
    (load_secs, load_lat): (f64, &mut [Duration]),
    st: &v1::StoreStats,
) -> Report {
    let mb = (n * PAGE_BYTES) as f64 / 1e6;
    let accepted = tally.accepted.iter().filter(|a| **a).count();
    let per_page = |b: u64| {
        if st.pages == 0 {
            0.0
        } else {
            b as f64 / st.pages as f64
        }
    };
    let held = st.slab_bytes + st.index_bytes;
    Report {
        system: "ramster".into(),
        mode: mode.into(),
        source,
        pages: n,
        batch: if mode == "embedded" { 1 } else { args.batch },
        depth: if mode == "embedded" { 1 } else { args.depth },
        accepted,
        rejected: n - accepted,
        rejected_no_capacity: tally.rejected_no_capacity,
        rejected_incompressible: tally.rejected_incompressible,
        store_pages_per_sec: n as f64 / store_secs,
        store_mb_per_sec: mb / store_secs,
        load_pages_per_sec: n as f64 / load_secs,
        load_mb_per_sec: mb / load_secs,
        latency_unit: latency_unit.into(),
        store_p50_us: percentile_us(store_lat, 0.50),
        store_p99_us: percentile_us(store_lat, 0.99),
        load_p50_us: percentile_us(load_lat, 0.50),
        load_p99_us: percentile_us(load_lat, 0.99),
        compression_ratio: if held == 0 {
            0.0
        } else {
            (st.pages * PAGE_BYTES as u64) as f64 / held as f64
        },
        payload_ratio: if st.payload_bytes == 0 {
            0.0
        } else {
            (st.compressed_pages * PAGE_BYTES as u64) as f64 / st.payload_bytes as f64
        },
        bytes_per_page: per_page(held),
        bytes_per_compressed_page: per_page(held),
        memory_basis: "store slabs + index / pages held".into(),
        payload_bytes_per_page: per_page(st.payload_bytes),
        slack_bytes_per_page: per_page(st.slot_bytes - st.payload_bytes),
        index_bytes_per_page: per_page(st.index_bytes),
        fragmentation: if st.slab_bytes == 0 {
            0.0
        } else {
            (st.slab_bytes - st.slot_bytes) as f64 / st.slab_bytes as f64
        },
        used_bytes: st.used_bytes,
        capacity_bytes: st.capacity_bytes,
        mismatches: tally.mismatches,
        verified: tally.mismatches == 0,
    }
}

fn print_table(r: &Report) {
    println!(
        "{} bench: {} pages from {} ({} mode)",
        r.system, r.pages, r.source, r.mode
    );
    if r.depth > 1 {
        let unit = if r.batch == 1 { "page" } else { "pages" };
        println!("  {} requests of {} {unit} in flight", r.depth, r.batch);
    }
    println!(
        "  accepted {} / refused {} (no_capacity {}, incompressible {})",
        r.accepted, r.rejected, r.rejected_no_capacity, r.rejected_incompressible
    );
    println!(
        "  {:<6} {:>12} {:>10} {:>10} {:>10}",
        "", "pages/s", "MB/s", "p50 µs", "p99 µs"
    );
    println!(
        "  {:<6} {:>12.0} {:>10.1} {:>10.2} {:>10.2}",
        "store", r.store_pages_per_sec, r.store_mb_per_sec, r.store_p50_us, r.store_p99_us
    );
    println!(
        "  {:<6} {:>12.0} {:>10.1} {:>10.2} {:>10.2}",
        "load", r.load_pages_per_sec, r.load_mb_per_sec, r.load_p50_us, r.load_p99_us
    );
    println!("  (latency per {})", r.latency_unit);
    println!(
        "  memory: {:.0} B per stored page (payload {:.0}, slack {:.0}, index {:.0}); compression {:.2}x (payload alone {:.2}x); fragmentation {:.1}%",
        r.bytes_per_page,
        r.payload_bytes_per_page,
        r.slack_bytes_per_page,
        r.index_bytes_per_page,
        r.compression_ratio,
        r.payload_ratio,
        r.fragmentation * 100.0
    );
    println!("  memory basis: {}", r.memory_basis);
    println!(
        "  store holds {} of {}",
        format_size(r.used_bytes),
        if r.capacity_bytes == 0 {
            "no set limit".to_string()
        } else {
            format_size(r.capacity_bytes)
        }
    );
    println!("  verified: {}", verdict(r.verified, r.mismatches));
}
