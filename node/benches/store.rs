//! The page store on one thread, against its ceiling: storing and loading
//! synthetic pages (the corpus's mix) through `PageStore` directly, and raw
//! lz4_flex compression and decompression of the same pages, which no store
//! built on LZ4 can beat.
//!
//!   cargo bench -p ramster-node --bench store

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use ramster_node::cli::corpus::Pages;
use ramster_node::store::{LoadOutcome, PAGE_BYTES, PageKey, PageStore, Retention, StoreConfig};

/// 16 MiB of pages: more than the caches hold, quick to set up.
const PAGES: usize = 4096;
const SEED: u64 = 1;

fn key(i: usize) -> PageKey {
    PageKey {
        space: 1,
        object: 0,
        index: i as u64,
    }
}

/// Room for every page uncompressed, so no store is refused for capacity.
fn empty_store() -> PageStore {
    PageStore::new(StoreConfig::with_capacity(
        (PAGES * (PAGE_BYTES + 256)) as u64 + (64 << 20),
    ))
}

fn page_store(c: &mut Criterion) {
    let pages = Pages::synthetic(PAGES, SEED);
    let mut group = c.benchmark_group("page_store");
    group.throughput(Throughput::Elements(PAGES as u64));
    group.sample_size(10);

    // Into an empty store each time: first stores, not overwrites.
    group.bench_function("store", |b| {
        b.iter_batched(
            empty_store,
            |store| {
                for i in 0..PAGES {
                    black_box(store.store(key(i), pages.page(i), Retention::Persistent));
                }
                store
            },
            BatchSize::PerIteration,
        )
    });

    let store = empty_store();
    for i in 0..PAGES {
        store.store(key(i), pages.page(i), Retention::Persistent);
    }
    let mut out = Box::new([0u8; PAGE_BYTES]);
    group.bench_function("load", |b| {
        b.iter(|| {
            let mut hits = 0;
            for i in 0..PAGES {
                hits += (store.load(key(i), &mut out) == LoadOutcome::Hit) as usize;
            }
            black_box(hits)
        })
    });
    group.finish();
}

fn lz4_ceiling(c: &mut Criterion) {
    let pages = Pages::synthetic(PAGES, SEED);
    let bound = lz4_flex::block::get_maximum_output_size(PAGE_BYTES);
    let compressed: Vec<Vec<u8>> = (0..PAGES)
        .map(|i| lz4_flex::block::compress(pages.page(i)))
        .collect();
    let mut group = c.benchmark_group("lz4_flex");
    group.throughput(Throughput::Elements(PAGES as u64));
    group.sample_size(10);

    let mut scratch = vec![0u8; bound];
    group.bench_function("compress", |b| {
        b.iter(|| {
            let mut bytes = 0;
            for i in 0..PAGES {
                bytes += lz4_flex::block::compress_into(pages.page(i), &mut scratch)
                    .expect("scratch sized to the bound");
            }
            black_box(bytes)
        })
    });

    let mut out = Box::new([0u8; PAGE_BYTES]);
    group.bench_function("decompress", |b| {
        b.iter(|| {
            for c in &compressed {
                lz4_flex::block::decompress_into(c, &mut out[..])
                    .expect("compressed by lz4_flex above");
            }
            black_box(&out);
        })
    });
    group.finish();
}

/// What observing one latency costs a page op: the node's histograms go
/// through the `metrics` facade; the fixed-bucket atomic histogram (which
/// the hedge delay still reads) is the baseline.
fn latency_recording(c: &mut Criterion) {
    const OPS: u64 = 10_000;
    let mut group = c.benchmark_group("latency_observe");
    group.throughput(Throughput::Elements(OPS));
    let atomic = ramster_node::metrics::Histogram::default();
    group.bench_function("fixed_buckets", |b| {
        b.iter(|| {
            for i in 0..OPS {
                atomic.observe(std::time::Duration::from_nanos(5_000 + i));
            }
        })
    });
    let node = ramster_node::metrics::NodeMetrics::default();
    group.bench_function("metrics_facade", |b| {
        b.iter(|| {
            for i in 0..OPS {
                node.store_latency
                    .observe(std::time::Duration::from_nanos(5_000 + i));
            }
            // As the node does every few seconds.
            node.upkeep();
        })
    });
    group.finish();
}

criterion_group!(benches, page_store, lz4_ceiling, latency_recording);
criterion_main!(benches);
