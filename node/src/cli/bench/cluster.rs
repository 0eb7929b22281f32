//! `ramster bench --socket PATH --cluster`: what remote memory costs a
//! client. Drives a node that is a member of a cluster through its API:
//!
//! 0. **remotify alone** (with `--shrink-to` and `--admin`): the node is
//!    filled to 70% of its capacity in an area of its own, its capacity is
//!    lowered through the admin endpoint, and the compressed bytes remotify
//!    ships to donors are timed with no client storing meanwhile; every
//!    page loads back byte-identical, then the area is dropped.
//! 1. **store**: every page into the area, `--depth` requests of `--batch`
//!    in flight, more pages than the node holds, while its stats are
//!    polled: remotify throughput is the compressed bytes that went to
//!    donors over the time from the first shipped to the last.
//! 2. **remote loads, one in flight**: random pages among the oldest (the
//!    coldest, which remotify shipped first), one page per request; the
//!    node's `loads_remote` counter says how many really came from donors.
//! 3. **pipelined remote loads**: all those cold pages, `--depth` requests
//!    of `--batch`.
//! 4. **idle loads**: a small hot area (kept local), one page at a time.
//! 5. **loads during suction**: the newest half of the area is invalidated,
//!    so use falls under the suction watermark and suction brings pages
//!    home; the same hot loads run meanwhile, and those issued while the
//!    node's remote pages are still falling are the ones that count.
//! 6. **verify**: every page still stored loads back byte-identical.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use indicatif::ProgressBar;
use ramster_protocol::v1;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use serde::Serialize;

use super::{
    BenchArgs, Outcome, Pipelined, bar, batch_for, load_offsets, percentile_us, store_offsets,
    verdict,
};
use crate::admin::CAPACITY_PATH;
use crate::cli::admin_client;
use crate::cli::corpus::Pages;
use crate::store::PAGE_BYTES;
use ramster_client::Client;

/// How often the node's stats are read while pages move.
const POLL: Duration = Duration::from_millis(20);
/// Remotify is done when the remote page count has not moved for this long.
const REMOTIFY_SETTLED: Duration = Duration::from_secs(1);
/// ...and suction when it has not fallen for this long.
const SUCTION_SETTLED: Duration = Duration::from_millis(500);
/// Upper bound on any wait for pages to move.
const MOVE_WAIT_MAX: Duration = Duration::from_secs(120);
/// Loads in the one-in-flight remote phase.
const SINGLE_LOADS: usize = 5_000;
/// Loads in the idle phase.
const IDLE_LOADS: usize = 20_000;
/// Hot pages: a sliver of the capacity, so they stay local.
const HOT_PAGES_MAX: usize = 4096;
/// Remotify alone: the share of the capacity filled before it is lowered,
/// below where remotify starts (85% by default), so nothing moves before.
const ALONE_FILL: f64 = 0.70;
/// ...filled this many pages at a time, reading the node's use between.
const ALONE_CHUNK_PAGES: u64 = 4096;

#[derive(Debug, Serialize)]
pub struct ClusterReport {
    pub source: String,
    pub pages: usize,
    pub batch: usize,
    pub depth: usize,
    pub accepted: usize,
    pub capacity_bytes: u64,
    /// Remotify with no client storing (`--shrink-to`).
    pub remotify_alone: Option<RemotifyAlone>,
    pub store_pages_per_sec: f64,
    /// Pages and compressed bytes on donors once remotify settled.
    pub remote_pages: u64,
    pub remote_mb: f64,
    pub remotify_secs: f64,
    pub remotify_mb_per_sec: f64,
    pub single_loads: usize,
    /// Of those, answered from a donor (the rest were already home).
    pub single_loads_remote: u64,
    pub single_load_p50_us: f64,
    pub single_load_p99_us: f64,
    pub pipelined_loads: usize,
    pub pipelined_loads_remote: u64,
    pub pipelined_pages_per_sec: f64,
    /// Per request of `batch` pages.
    pub pipelined_p50_us: f64,
    pub pipelined_p99_us: f64,
    pub hot_pages: usize,
    pub idle_loads: usize,
    pub idle_load_p50_us: f64,
    pub idle_load_p99_us: f64,
    pub suctioned_pages: u64,
    pub suction_secs: f64,
    pub suction_loads: usize,
    pub suction_load_p50_us: f64,
    pub suction_load_p99_us: f64,
    pub mismatches: usize,
    pub verified: bool,
}

/// What remotify shipped once the capacity was lowered, no client storing.
#[derive(Debug, Serialize)]
pub struct RemotifyAlone {
    /// The capacity filled to [`ALONE_FILL`], and the one it was lowered to.
    pub capacity_from_bytes: u64,
    pub capacity_to_bytes: u64,
    /// Pages stored to fill it (the corpus repeated).
    pub stored_pages: usize,
    pub shipped_pages: u64,
    pub shipped_mb: f64,
    pub secs: f64,
    pub mb_per_sec: f64,
    pub pages_per_sec: f64,
    /// Stored pages that did not load back byte-identical.
    pub mismatches: usize,
}

pub async fn run(
    args: &BenchArgs,
    client: Arc<Client>,
    pages: &Pages,
    source: String,
    progress: bool,
) -> anyhow::Result<ClusterReport> {
    let remotify_alone = match (args.shrink_to, &args.admin) {
        (Some(to), Some(admin)) => {
            Some(remotify_alone(args, &client, pages, admin, to, progress).await?)
        }
        _ => None,
    };
    let n = pages.len();
    let area = args.area;
    let hot_area = area.checked_add(1).context("--area too large")?;
    let batch = batch_for(args, &client);
    client.init_area(area, false).await?;
    client.init_area(hot_area, false).await?;
    let before = client.stats().await?;
    let capacity = before.store.unwrap_or_default().capacity_bytes;
    if capacity == 0 {
        bail!("the node has no store of its own (a memory server?): bench a peer");
    }
    let mut rng = SmallRng::seed_from_u64(args.seed ^ 0xc105_7e55);
    let mut mismatches = remotify_alone.as_ref().map_or(0, |r| r.mismatches);

    // 1. Store, tracing what remotify ships meanwhile.
    let (tracing, tracer) = RemoteTracer::spawn(client.clone());
    let pb = bar(n, "store", progress);
    let t0 = Instant::now();
    let all: Arc<Vec<u64>> = Arc::new((0..n as u64).collect());
    let stored = store_offsets(args.depth, batch, &client, area, pages, all.clone(), &pb).await?;
    let store_secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let mut accepted = vec![false; n];
    for (i, o) in &stored.outcomes {
        accepted[*i] = matches!(o, Outcome::Stored(v1::Status::Ok));
    }
    tracing.store(false, Ordering::Relaxed);
    let trace = tracer.await??.settle(REMOTIFY_SETTLED).await?;
    let (remote_pages, remote_bytes) = trace.last();
    let remotify = trace.rising_span();
    if remote_pages == 0 {
        bail!(
            "no page went to a donor: is the node in a cluster, with donors up, and was it filled past its remotify watermark?"
        );
    }

    // 2. Remote loads, one in flight. Remotify ships the coldest first, so
    //    the pages stored first are the ones on donors.
    // A margin: pages whose remotify failed went back to the cold end and
    // may have been overtaken by a few later ones.
    let mut cold: Vec<u64> = (0..(remote_pages as usize * 4 / 5).min(n))
        .filter(|&i| accepted[i])
        .map(|i| i as u64)
        .collect();
    cold.shuffle(&mut rng);
    let single: Arc<Vec<u64>> = Arc::new(cold.iter().copied().take(SINGLE_LOADS).collect());
    let remote_before = loads_remote(&client).await?;
    let pb = bar(single.len(), "remote", progress);
    let mut one = load_offsets(1, 1, &client, area, single.clone(), &pb).await?;
    pb.finish_and_clear();
    let single_remote = loads_remote(&client).await? - remote_before;
    mismatches += check(&one, &accepted, pages);

    // 3. Pipelined remote loads of every cold page.
    cold.shuffle(&mut rng);
    let cold = Arc::new(cold);
    let remote_before = loads_remote(&client).await?;
    let pb = bar(cold.len(), "remote", progress);
    let t0 = Instant::now();
    let mut piped = load_offsets(args.depth, batch, &client, area, cold.clone(), &pb).await?;
    let piped_secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let piped_remote = loads_remote(&client).await? - remote_before;
    mismatches += check(&piped, &accepted, pages);

    // 4. Idle: a hot area small enough to stay local.
    let hot = (capacity as usize / PAGE_BYTES / 50).clamp(64, HOT_PAGES_MAX);
    let hot_offsets: Arc<Vec<u64>> = Arc::new((0..hot as u64).collect());
    let hot_stored = store_offsets(1, batch, &client, hot_area, pages, hot_offsets, &pb).await?;
    let mut hot_accepted = vec![false; n];
    for (i, o) in &hot_stored.outcomes {
        hot_accepted[*i] = matches!(o, Outcome::Stored(v1::Status::Ok));
    }
    let idle_order = Arc::new(random_offsets(hot, IDLE_LOADS, &mut rng));
    let mut idle =
        load_offsets(1, 1, &client, hot_area, idle_order, &ProgressBar::hidden()).await?;
    mismatches += check(&idle, &hot_accepted, pages);

    // 5. Free the newest half so suction runs; time the hot loads meanwhile.
    let newest: Vec<u64> = (n as u64 / 2..n as u64).collect();
    for chunk in newest.chunks(batch.max(64)) {
        client.invalidate_pages(area, chunk).await?;
    }
    accepted[n / 2..].fill(false);
    let suction = during_suction(&client, hot_area, hot, &mut rng).await?;
    for (i, p) in &suction.loads {
        let good = match p {
            Ok(p) => hot_accepted[*i] && p[..] == pages.page(*i)[..],
            Err(v1::Status::NotFound) => !hot_accepted[*i],
            Err(_) => false,
        };
        mismatches += !good as usize;
    }
    let mut suction_lat: Vec<Duration> = suction.latencies.clone();

    // 6. Everything still stored comes back byte-identical.
    let rest: Arc<Vec<u64>> = Arc::new((0..n as u64 / 2).collect());
    let pb = bar(rest.len(), "verify", progress);
    let verified = load_offsets(args.depth, batch, &client, area, rest, &pb).await?;
    pb.finish_and_clear();
    mismatches += check(&verified, &accepted, pages);

    Ok(ClusterReport {
        source,
        pages: n,
        batch,
        depth: args.depth,
        accepted: stored
            .outcomes
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Stored(v1::Status::Ok)))
            .count(),
        capacity_bytes: capacity,
        remotify_alone,
        store_pages_per_sec: n as f64 / store_secs,
        remote_pages,
        remote_mb: remote_bytes as f64 / 1e6,
        remotify_secs: remotify.as_secs_f64(),
        remotify_mb_per_sec: remote_bytes as f64 / 1e6 / remotify.as_secs_f64().max(1e-9),
        single_loads: single.len(),
        single_loads_remote: single_remote,
        single_load_p50_us: percentile_us(&mut one.latencies, 0.50),
        single_load_p99_us: percentile_us(&mut one.latencies, 0.99),
        pipelined_loads: cold.len(),
        pipelined_loads_remote: piped_remote,
        pipelined_pages_per_sec: cold.len() as f64 / piped_secs,
        pipelined_p50_us: percentile_us(&mut piped.latencies, 0.50),
        pipelined_p99_us: percentile_us(&mut piped.latencies, 0.99),
        hot_pages: hot,
        idle_loads: idle.latencies.len(),
        idle_load_p50_us: percentile_us(&mut idle.latencies, 0.50),
        idle_load_p99_us: percentile_us(&mut idle.latencies, 0.99),
        suctioned_pages: suction.suctioned_pages,
        suction_secs: suction.span.as_secs_f64(),
        suction_loads: suction_lat.len(),
        suction_load_p50_us: percentile_us(&mut suction_lat, 0.50),
        suction_load_p99_us: percentile_us(&mut suction_lat, 0.99),
        mismatches,
        verified: mismatches == 0,
    })
}

/// Phase 0: fills an area of its own to [`ALONE_FILL`] of the node's
/// capacity, lowers the capacity to `to`, and times what remotify ships.
async fn remotify_alone(
    args: &BenchArgs,
    client: &Arc<Client>,
    pages: &Pages,
    admin: &str,
    to: u64,
    progress: bool,
) -> anyhow::Result<RemotifyAlone> {
    let area = args.area.checked_add(2).context("--area too large")?;
    let batch = batch_for(args, client);
    client.init_area(area, false).await?;
    let store_stats = async || -> anyhow::Result<v1::StoreStats> {
        Ok(client.stats().await?.store.unwrap_or_default())
    };
    let from = store_stats().await?.capacity_bytes;
    if to >= from {
        bail!("--shrink-to {to} must be below the node's capacity, {from} bytes");
    }
    // The fullest the node can be filled with pages that take room: far
    // more pages than that means they are not landing.
    let most_pages = (from / 64).max(ALONE_CHUNK_PAGES);
    let pb = bar(0, "fill", progress);
    let mut stored: Vec<u64> = Vec::new();
    let mut next = 0u64;
    while (store_stats().await?.used_bytes as f64) < ALONE_FILL * from as f64 {
        if next >= most_pages {
            bail!("the node took {next} pages and is still not {ALONE_FILL} full");
        }
        let offsets = Arc::new((next..next + ALONE_CHUNK_PAGES).collect::<Vec<u64>>());
        pb.inc_length(ALONE_CHUNK_PAGES);
        let r = store_offsets(args.depth, batch, client, area, pages, offsets, &pb).await?;
        stored.extend(r.outcomes.iter().filter_map(|(o, out)| {
            matches!(out, Outcome::Stored(v1::Status::Ok)).then_some(*o as u64)
        }));
        next += ALONE_CHUNK_PAGES;
    }
    pb.finish_and_clear();

    let before = store_stats().await?;
    let (tracing, tracer) = RemoteTracer::spawn(client.clone());
    let path = format!("{CAPACITY_PATH}?bytes={to}");
    let admin = admin.to_string();
    let answer = tokio::task::spawn_blocking(move || admin_client::post(&admin, &path)).await??;
    if answer.status != 200 {
        bail!(
            "lowering the capacity was refused: {} (HTTP {})",
            answer.body.trim_end(),
            answer.status
        );
    }
    tracing.store(false, Ordering::Relaxed);
    let trace = tracer.await??.settle(REMOTIFY_SETTLED).await?;
    let (remote_pages, remote_bytes) = trace.last();
    let span = trace.rising_span().as_secs_f64().max(1e-9);
    let shipped_pages = remote_pages.saturating_sub(before.remote_pages);
    let shipped_bytes = remote_bytes.saturating_sub(before.remote_bytes);
    if shipped_pages == 0 {
        bail!("lowering the capacity shipped nothing: is the node in a cluster, with donors up?");
    }

    let stored = Arc::new(stored);
    let pb = bar(stored.len(), "verify", progress);
    let loaded = load_offsets(args.depth, batch, client, area, stored.clone(), &pb).await?;
    pb.finish_and_clear();
    let mismatches = loaded
        .outcomes
        .iter()
        .filter(|(o, out)| match out {
            Outcome::Loaded(Ok(p)) => p[..] != pages.page(o % pages.len())[..],
            _ => true,
        })
        .count();
    client.invalidate_area(area).await?;
    Ok(RemotifyAlone {
        capacity_from_bytes: from,
        capacity_to_bytes: to,
        stored_pages: stored.len(),
        shipped_pages,
        shipped_mb: shipped_bytes as f64 / 1e6,
        secs: span,
        mb_per_sec: shipped_bytes as f64 / 1e6 / span,
        pages_per_sec: shipped_pages as f64 / span,
        mismatches,
    })
}

/// Pages that did not load back as stored (a refused page must be a miss).
fn check(loaded: &Pipelined, accepted: &[bool], pages: &Pages) -> usize {
    loaded
        .outcomes
        .iter()
        .filter(|(i, o)| {
            let good = match o {
                Outcome::Loaded(Ok(p)) => accepted[*i] && p[..] == pages.page(*i)[..],
                Outcome::Loaded(Err(v1::Status::NotFound)) => !accepted[*i],
                _ => false,
            };
            !good
        })
        .count()
}

fn random_offsets(range: usize, count: usize, rng: &mut SmallRng) -> Vec<u64> {
    use rand::Rng;
    (0..count)
        .map(|_| rng.random_range(0..range as u64))
        .collect()
}

async fn loads_remote(client: &Client) -> anyhow::Result<u64> {
    Ok(client
        .stats()
        .await?
        .counters
        .unwrap_or_default()
        .loads_remote)
}

/// The node's remote pages and bytes, sampled while pages move.
struct RemoteTracer {
    client: Arc<Client>,
    samples: Vec<(Instant, u64, u64)>,
}

impl RemoteTracer {
    /// Samples in the background until the flag turns false.
    fn spawn(
        client: Arc<Client>,
    ) -> (
        Arc<AtomicBool>,
        tokio::task::JoinHandle<anyhow::Result<RemoteTracer>>,
    ) {
        let running = Arc::new(AtomicBool::new(true));
        let flag = running.clone();
        let task = tokio::spawn(async move {
            let mut t = RemoteTracer {
                client,
                samples: Vec::new(),
            };
            while flag.load(Ordering::Relaxed) {
                t.sample().await?;
                tokio::time::sleep(POLL).await;
            }
            Ok(t)
        });
        (running, task)
    }

    async fn sample(&mut self) -> anyhow::Result<()> {
        let s = self.client.stats().await?.store.unwrap_or_default();
        self.samples
            .push((Instant::now(), s.remote_pages, s.remote_bytes));
        Ok(())
    }

    /// Keeps sampling until the remote page count has not moved for `still`.
    async fn settle(mut self, still: Duration) -> anyhow::Result<RemoteTracer> {
        let started = Instant::now();
        let mut moved = Instant::now();
        while moved.elapsed() < still && started.elapsed() < MOVE_WAIT_MAX {
            tokio::time::sleep(POLL).await;
            let before = self.last();
            self.sample().await?;
            if self.last() != before {
                moved = Instant::now();
            }
        }
        Ok(self)
    }

    fn last(&self) -> (u64, u64) {
        self.samples.last().map_or((0, 0), |s| (s.1, s.2))
    }

    /// From the last sample before remote bytes first rose to the sample
    /// where they last rose.
    fn rising_span(&self) -> Duration {
        let rises: Vec<usize> = (1..self.samples.len())
            .filter(|&i| self.samples[i].2 > self.samples[i - 1].2)
            .collect();
        match (rises.first(), rises.last()) {
            (Some(&first), Some(&last)) => self.samples[last].0 - self.samples[first - 1].0,
            _ => Duration::ZERO,
        }
    }
}

struct Suction {
    loads: Vec<(usize, Result<bytes::Bytes, v1::Status>)>,
    latencies: Vec<Duration>,
    suctioned_pages: u64,
    span: Duration,
}

/// Loads random hot pages one at a time while suction brings pages home;
/// keeps the latencies of loads issued before remote pages stopped falling.
async fn during_suction(
    client: &Client,
    area: u32,
    hot: usize,
    rng: &mut SmallRng,
) -> anyhow::Result<Suction> {
    use rand::Rng;
    let remote = |s: v1::Stats| s.store.unwrap_or_default().remote_pages;
    let started = Instant::now();
    let first = remote(client.stats().await?);
    let (mut last, mut fell_at, mut polled) = (first, started, started);
    let mut timed: Vec<(Instant, usize, Result<bytes::Bytes, v1::Status>, Duration)> = Vec::new();
    loop {
        let offset = rng.random_range(0..hot as u64);
        let t = Instant::now();
        let mut got = client.load_pages(area, &[offset]).await?;
        timed.push((
            t,
            offset as usize,
            got.pop().context("one page")?,
            t.elapsed(),
        ));
        if polled.elapsed() < POLL {
            continue;
        }
        polled = Instant::now();
        let now = remote(client.stats().await?);
        if now < last {
            fell_at = polled;
        }
        last = now;
        let quiet = fell_at.elapsed() >= SUCTION_SETTLED;
        if (quiet && fell_at > started) || started.elapsed() >= MOVE_WAIT_MAX {
            break;
        }
        if quiet && started.elapsed() >= 4 * SUCTION_SETTLED {
            break; // suction never started
        }
    }
    let kept = timed.iter().filter(|(t, ..)| *t <= fell_at);
    Ok(Suction {
        latencies: kept.clone().map(|(.., d)| *d).collect(),
        loads: timed.into_iter().map(|(_, i, p, _)| (i, p)).collect(),
        suctioned_pages: first.saturating_sub(last),
        span: fell_at - started,
    })
}

pub fn print_table(r: &ClusterReport) {
    println!(
        "ramster cluster bench: {} pages from {} into a node of {} MiB",
        r.pages,
        r.source,
        r.capacity_bytes >> 20
    );
    println!(
        "  store      {:>10.0} pages/s ({} accepted; {} requests of {} pages in flight)",
        r.store_pages_per_sec, r.accepted, r.depth, r.batch
    );
    if let Some(a) = &r.remotify_alone {
        println!(
            "  remotify alone {:>6.1} MB/s compressed, {:.0} pages/s ({} pages, {:.1} MB to donors in {:.2} s, once {} MiB of capacity became {} MiB; {})",
            a.mb_per_sec,
            a.pages_per_sec,
            a.shipped_pages,
            a.shipped_mb,
            a.secs,
            a.capacity_from_bytes >> 20,
            a.capacity_to_bytes >> 20,
            verdict(a.mismatches == 0, a.mismatches)
        );
    }
    println!(
        "  remotify while storing {:>6.1} MB/s compressed ({} pages, {:.1} MB to donors in {:.2} s)",
        r.remotify_mb_per_sec, r.remote_pages, r.remote_mb, r.remotify_secs
    );
    println!(
        "  remote load, 1 in flight: p50 {:.1} µs, p99 {:.1} µs ({} loads, {} from donors)",
        r.single_load_p50_us, r.single_load_p99_us, r.single_loads, r.single_loads_remote
    );
    println!(
        "  remote loads pipelined: {:.0} pages/s ({} loads, {} from donors; per request p50 {:.1} µs, p99 {:.1} µs)",
        r.pipelined_pages_per_sec,
        r.pipelined_loads,
        r.pipelined_loads_remote,
        r.pipelined_p50_us,
        r.pipelined_p99_us
    );
    println!(
        "  hot loads idle:           p50 {:.1} µs, p99 {:.1} µs ({} loads of {} hot pages)",
        r.idle_load_p50_us, r.idle_load_p99_us, r.idle_loads, r.hot_pages
    );
    println!(
        "  hot loads during suction: p50 {:.1} µs, p99 {:.1} µs ({} loads while {} pages came home in {:.2} s)",
        r.suction_load_p50_us,
        r.suction_load_p99_us,
        r.suction_loads,
        r.suctioned_pages,
        r.suction_secs
    );
    println!("  verified: {}", verdict(r.verified, r.mismatches));
}
