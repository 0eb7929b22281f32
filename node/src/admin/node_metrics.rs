//! The node's own metric families: the frontswap counters (named as the
//! kernel's debugfs ones), the page store's figures, the cluster's movement
//! counters, latency histograms, and each NBD export's figures. Every family
//! is declared here once; [`write`] fills them from one node.

use std::sync::atomic::{AtomicU64, Ordering};

use super::exposition::{Family, MetricsWriter};
use crate::frontend::nbd::{ExportStats, Exports};
use crate::frontend::{Frontend, Reject};
use crate::metrics::NodeMetrics;

static BUILD_INFO: Family = Family::gauge(
    "ramster_build_info",
    "Always 1; the labels say which ramster this is.",
);

static SUCC_STORES: Family = Family::counter(
    "ramster_frontswap_succ_stores_total",
    "Frontswap stores accepted (succ_stores).",
);
static FAILED_STORES: Family = Family::counter(
    "ramster_frontswap_failed_stores_total",
    "Frontswap stores refused, by reason (failed_stores).",
);
static LOADS: Family = Family::counter(
    "ramster_frontswap_loads_total",
    "Frontswap loads, by result: hit, miss, error.",
);
static INVALIDATES: Family = Family::counter(
    "ramster_frontswap_invalidates_total",
    "Pages dropped by invalidate_page and invalidate_area.",
);

static STORE_CAPACITY: Family = Family::gauge(
    "ramster_store_capacity_bytes",
    "Most bytes the page store may hold.",
);
static STORE_USED: Family = Family::gauge(
    "ramster_store_used_bytes",
    "Bytes the page store holds: slabs and index.",
);
static STORE_PAGES: Family = Family::gauge(
    "ramster_store_pages",
    "Pages in the store, local and remote.",
);
static STORE_SAME_FILLED: Family = Family::gauge(
    "ramster_store_same_filled_pages",
    "Pages of one repeated word, kept as metadata only.",
);
static STORE_COMPRESSED: Family = Family::gauge(
    "ramster_store_compressed_pages",
    "Pages kept LZ4-compressed in the slabs.",
);
static STORE_PAYLOAD: Family = Family::gauge(
    "ramster_store_compressed_payload_bytes",
    "Compressed bytes of the compressed pages.",
);
static STORE_SLOT: Family = Family::gauge(
    "ramster_store_slot_bytes",
    "Bytes of the slab slots holding compressed pages (payload and slack).",
);
static STORE_SLAB: Family = Family::gauge(
    "ramster_store_slab_bytes",
    "Bytes of all slabs, free slots included.",
);
static STORE_INDEX: Family = Family::gauge("ramster_store_index_bytes", "Bytes of the page index.");
static STORE_EVICTED: Family = Family::counter(
    "ramster_store_evicted_pages_total",
    "Droppable pages evicted to make room.",
);
static STORE_DROPPED_REMOTE: Family = Family::counter(
    "ramster_store_dropped_remote_pages_total",
    "Writethrough pages on donors dropped rather than repaired, moved or fetched (their loads answer a miss).",
);
static STORE_REMOTE_PAGES: Family = Family::gauge(
    "ramster_store_remote_pages",
    "This node's pages held by donors.",
);
static STORE_REMOTE_BYTES: Family = Family::gauge(
    "ramster_store_remote_bytes",
    "Compressed bytes of this node's pages held by donors.",
);

static REMOTIFIED_PAGES: Family = Family::counter(
    "ramster_remotified_pages_total",
    "Pages shipped to donors, every replica acknowledged.",
);
static REMOTIFIED_BYTES: Family = Family::counter(
    "ramster_remotified_bytes_total",
    "Compressed bytes shipped to donors.",
);
static REMOTIFY_FAILURES: Family = Family::counter(
    "ramster_remotify_failures_total",
    "Remotify batches that failed; their pages stayed home.",
);
static SUCTIONED_PAGES: Family = Family::counter(
    "ramster_suctioned_pages_total",
    "Pages brought home from donors.",
);
static SUCTIONED_BYTES: Family = Family::counter(
    "ramster_suctioned_bytes_total",
    "Compressed bytes brought home from donors.",
);
static REMOTE_LOADS: Family =
    Family::counter("ramster_remote_loads_total", "Loads answered from a donor.");
static REMOTE_LOAD_ERRORS: Family = Family::counter(
    "ramster_remote_load_errors_total",
    "Remote loads that found no good copy.",
);
static REMOTE_LOAD_RELOOKS: Family = Family::counter(
    "ramster_remote_load_relooks_total",
    "Pages a remote load looked up again because their copies had moved meanwhile.",
);
static RELEASED_PAGES: Family = Family::counter(
    "ramster_released_pages_total",
    "Donor copies released (overwritten, invalidated or brought home).",
);
static AUDITED_COPIES: Family = Family::counter(
    "ramster_audited_copies_total",
    "Copies donors listed to this owner's audits.",
);
static AUDIT_RELEASED_PAGES: Family = Family::counter(
    "ramster_audit_released_pages_total",
    "Copies an audit found on a donor that the index did not name there (garbage, or a copy whose release was on its way), and released.",
);
static RPC_ERRORS: Family = Family::counter(
    "ramster_rpc_errors_total",
    "Peer RPCs that failed: deadline, connection or refusal.",
);
static STORE_THROTTLES: Family = Family::counter(
    "ramster_store_throttles_total",
    "Stores that waited for remotify to make room.",
);

static REPAIRED_PAGES: Family = Family::counter(
    "ramster_repaired_pages_total",
    "Copies on lost donors re-created on other donors.",
);
static RECLAIMED_PAGES: Family = Family::counter(
    "ramster_reclaimed_pages_total",
    "Pages moved off, or brought home from, donors that asked for their memory back.",
);
static STRUCK_PAGES: Family = Family::counter(
    "ramster_struck_pages_total",
    "Copies struck off because their donor came back empty (restarted).",
);
static LOST_PAGES: Family = Family::counter(
    "ramster_lost_pages_total",
    "Pages left with no copy anywhere: every donor holding one came back empty.",
);
static DEGRADED_PAGES: Family = Family::gauge(
    "ramster_degraded_pages",
    "Pages held on donors with fewer copies than their replica count.",
);
static UNRECOVERABLE_PAGES: Family = Family::gauge(
    "ramster_unrecoverable_pages",
    "Pages whose every copy was on lost donors.",
);
static LAST_REPAIR: Family = Family::gauge(
    "ramster_last_repair_seconds",
    "Time the last repair took, from the first degraded page to full redundancy.",
);

pub static STORE_LATENCY: Family = Family::histogram(
    "ramster_store_latency_seconds",
    "One frontswap store or cleancache put, as the front end sees it.",
);
pub static LOAD_LATENCY: Family = Family::histogram(
    "ramster_load_latency_seconds",
    "One frontswap load or cleancache get answered by this node.",
);
pub static REMOTE_LOAD_LATENCY: Family = Family::histogram(
    "ramster_remote_load_latency_seconds",
    "One load answered from a donor: fetch, checksum, decompress.",
);
pub static RPC_LATENCY: Family = Family::histogram(
    "ramster_rpc_latency_seconds",
    "One peer RPC, from request sent to answer read.",
);

static NBD_SIZE: Family = Family::gauge("ramster_nbd_export_size_bytes", "Size of the NBD export.");
static NBD_READS: Family = Family::counter("ramster_nbd_reads_total", "NBD read requests.");
static NBD_WRITES: Family = Family::counter("ramster_nbd_writes_total", "NBD write requests.");
static NBD_WRITE_ZEROES: Family = Family::counter(
    "ramster_nbd_write_zeroes_total",
    "NBD write-zeroes requests.",
);
static NBD_TRIMS: Family = Family::counter(
    "ramster_nbd_trims_total",
    "NBD trim requests (invalidate_page).",
);
static NBD_FLUSHES: Family = Family::counter(
    "ramster_nbd_flushes_total",
    "NBD flush requests (fsync of the backing file).",
);
static NBD_READ_BYTES: Family =
    Family::counter("ramster_nbd_read_bytes_total", "Bytes read by NBD clients.");
static NBD_WRITTEN_BYTES: Family = Family::counter(
    "ramster_nbd_written_bytes_total",
    "Bytes written by NBD clients.",
);
static NBD_PAGES: Family = Family::gauge(
    "ramster_nbd_pages",
    "Export pages by where their only copy is: the store or the backing file.",
);
static NBD_CONNECTIONS: Family = Family::gauge(
    "ramster_nbd_connections",
    "NBD connections in transmission: hosts that may be swapping into the export.",
);
static NBD_STALE_PAGES: Family = Family::gauge(
    "ramster_nbd_stale_pages",
    "Export pages an earlier run of the node may have held: they read as errors until written again.",
);
static NBD_STORE_REJECTS: Family = Family::counter(
    "ramster_nbd_store_rejects_total",
    "Export pages the store refused, which went to the backing file.",
);
static NBD_ERRORS: Family = Family::counter(
    "ramster_nbd_errors_total",
    "NBD requests answered with an error.",
);
static NBD_POLLS: Family = Family::counter(
    "ramster_nbd_polls_total",
    "Socket reads an NBD connection's poll found bytes for (found), and polls that found none in their window and slept (slept).",
);

/// Every family of this module, for tests of the naming rules.
#[cfg(test)]
pub(super) static FAMILIES: &[&Family] = &[
    &BUILD_INFO,
    &SUCC_STORES,
    &FAILED_STORES,
    &LOADS,
    &INVALIDATES,
    &STORE_CAPACITY,
    &STORE_USED,
    &STORE_PAGES,
    &STORE_SAME_FILLED,
    &STORE_COMPRESSED,
    &STORE_PAYLOAD,
    &STORE_SLOT,
    &STORE_SLAB,
    &STORE_INDEX,
    &STORE_EVICTED,
    &STORE_DROPPED_REMOTE,
    &STORE_REMOTE_PAGES,
    &STORE_REMOTE_BYTES,
    &REMOTIFIED_PAGES,
    &REMOTIFIED_BYTES,
    &REMOTIFY_FAILURES,
    &SUCTIONED_PAGES,
    &SUCTIONED_BYTES,
    &REMOTE_LOADS,
    &REMOTE_LOAD_ERRORS,
    &REMOTE_LOAD_RELOOKS,
    &RELEASED_PAGES,
    &AUDITED_COPIES,
    &AUDIT_RELEASED_PAGES,
    &RPC_ERRORS,
    &STORE_THROTTLES,
    &STORE_LATENCY,
    &LOAD_LATENCY,
    &REMOTE_LOAD_LATENCY,
    &RPC_LATENCY,
    &NBD_SIZE,
    &NBD_READS,
    &NBD_WRITES,
    &NBD_WRITE_ZEROES,
    &NBD_TRIMS,
    &NBD_FLUSHES,
    &NBD_READ_BYTES,
    &NBD_WRITTEN_BYTES,
    &NBD_PAGES,
    &NBD_STALE_PAGES,
    &NBD_CONNECTIONS,
    &NBD_STORE_REJECTS,
    &NBD_ERRORS,
    &NBD_POLLS,
];

/// Writes every counter and gauge of this node, the process's included;
/// the latency histograms are rendered from [`NodeMetrics`] on their own.
pub fn write(
    out: &mut MetricsWriter,
    frontend: &Frontend,
    metrics: &NodeMetrics,
    exports: &Exports,
) {
    out.sample(&BUILD_INFO, &[("version", env!("CARGO_PKG_VERSION"))], 1u64);
    write_frontswap(out, frontend);
    write_store(out, frontend);
    write_cluster_counters(out, metrics);
    write_exports(out, &exports.stats());
    super::process::write(out);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

fn write_frontswap(out: &mut MetricsWriter, frontend: &Frontend) {
    let c = frontend.counters();
    out.sample(&SUCC_STORES, &[], get(&c.succ_stores));
    for (reason, n) in [
        (Reject::NoCapacity, &c.failed_stores_no_capacity),
        (Reject::Incompressible, &c.failed_stores_incompressible),
        (Reject::Quota, &c.failed_stores_quota),
        (Reject::AreaInvalidated, &c.failed_stores_area_invalidated),
        (Reject::Unavailable, &c.failed_stores_unavailable),
    ] {
        out.sample(&FAILED_STORES, &[("reason", reason.as_str())], get(n));
    }
    for (result, n) in [
        ("hit", &c.loads_hit),
        ("miss", &c.loads_miss),
        ("error", &c.loads_error),
    ] {
        out.sample(&LOADS, &[("result", result)], get(n));
    }
    out.sample(&INVALIDATES, &[], get(&c.invalidates));
}

fn write_store(out: &mut MetricsWriter, frontend: &Frontend) {
    let s = frontend.store().stats();
    for (family, v) in [
        (&STORE_CAPACITY, s.capacity_bytes),
        (&STORE_USED, s.used_bytes),
        (&STORE_PAGES, s.pages),
        (&STORE_SAME_FILLED, s.same_filled_pages),
        (&STORE_COMPRESSED, s.compressed_pages),
        (&STORE_PAYLOAD, s.payload_bytes),
        (&STORE_SLOT, s.slot_bytes),
        (&STORE_SLAB, s.slab_bytes),
        (&STORE_INDEX, s.index_bytes),
        (&STORE_EVICTED, s.evicted_pages),
        (&STORE_DROPPED_REMOTE, s.dropped_remote_pages),
        (&STORE_REMOTE_PAGES, s.remote_pages),
        (&STORE_REMOTE_BYTES, s.remote_bytes),
    ] {
        out.sample(family, &[], v);
    }
}

fn write_cluster_counters(out: &mut MetricsWriter, metrics: &NodeMetrics) {
    let c = &metrics.cluster;
    for (family, v) in [
        (&REMOTIFIED_PAGES, &c.remotified_pages),
        (&REMOTIFIED_BYTES, &c.remotified_bytes),
        (&REMOTIFY_FAILURES, &c.remotify_failures),
        (&SUCTIONED_PAGES, &c.suctioned_pages),
        (&SUCTIONED_BYTES, &c.suctioned_bytes),
        (&REMOTE_LOADS, &c.remote_loads),
        (&REMOTE_LOAD_ERRORS, &c.remote_load_errors),
        (&REMOTE_LOAD_RELOOKS, &c.remote_load_relooks),
        (&RELEASED_PAGES, &c.released_pages),
        (&AUDITED_COPIES, &c.audited_copies),
        (&AUDIT_RELEASED_PAGES, &c.audit_released_pages),
        (&RPC_ERRORS, &c.rpc_errors),
        (&STORE_THROTTLES, &c.store_throttles),
        (&REPAIRED_PAGES, &c.repaired_pages),
        (&RECLAIMED_PAGES, &c.reclaimed_pages),
        (&STRUCK_PAGES, &c.struck_pages),
        (&LOST_PAGES, &c.lost_pages),
        (&DEGRADED_PAGES, &c.degraded_pages),
        (&UNRECOVERABLE_PAGES, &c.unrecoverable_pages),
    ] {
        out.sample(family, &[], get(v));
    }
    out.sample(&LAST_REPAIR, &[], get(&c.last_repair_micros) as f64 / 1e6);
}

/// Each family over all exports, so that a family's samples stay together.
fn write_exports(out: &mut MetricsWriter, exports: &[ExportStats]) {
    type Field = fn(&ExportStats) -> u64;
    let plain: [(&'static Family, Field); 11] = [
        (&NBD_SIZE, |e| e.size_bytes),
        (&NBD_READS, |e| e.reads),
        (&NBD_WRITES, |e| e.writes),
        (&NBD_WRITE_ZEROES, |e| e.write_zeroes),
        (&NBD_TRIMS, |e| e.trims),
        (&NBD_FLUSHES, |e| e.flushes),
        (&NBD_READ_BYTES, |e| e.read_bytes),
        (&NBD_WRITTEN_BYTES, |e| e.written_bytes),
        (&NBD_ERRORS, |e| e.errors),
        (&NBD_STALE_PAGES, |e| e.stale_pages),
        (&NBD_CONNECTIONS, |e| e.connections),
    ];
    for (family, field) in plain {
        for e in exports {
            out.sample(family, &[("export", &e.name)], field(e));
        }
    }
    for e in exports {
        for (location, n) in [("store", e.pages_in_store), ("backing", e.pages_in_backing)] {
            out.sample(
                &NBD_PAGES,
                &[("export", &e.name), ("location", location)],
                n,
            );
        }
    }
    for e in exports {
        for (reason, n) in [
            ("no_capacity", e.store_rejects_no_capacity),
            ("incompressible", e.store_rejects_incompressible),
            ("other", e.store_rejects_other),
        ] {
            out.sample(
                &NBD_STORE_REJECTS,
                &[("export", &e.name), ("reason", reason)],
                n,
            );
        }
    }
    for e in exports {
        for (result, n) in [("found", e.polls_found), ("slept", e.polls_slept)] {
            out.sample(&NBD_POLLS, &[("export", &e.name), ("result", result)], n);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::exposition::{Kind, is_valid_name};
    use super::*;
    use crate::frontend::nbd::ExportSpec;
    use crate::store::{PageStore, StoreConfig};

    #[test]
    fn family_names_follow_prometheus_rules() {
        let mut seen = std::collections::HashSet::new();
        let process = super::super::process::FAMILIES;
        for f in FAMILIES.iter().chain(process) {
            assert!(is_valid_name(f.name), "{}", f.name);
            // The process's families keep the names every client uses.
            let prefix = if process.iter().any(|p| p.name == f.name) {
                "process_"
            } else {
                "ramster_"
            };
            assert!(f.name.starts_with(prefix), "{}", f.name);
            assert!(seen.insert(f.name), "{} is declared twice", f.name);
            assert!(!f.help.is_empty(), "{} has no help", f.name);
            match f.kind {
                Kind::Counter => assert!(f.name.ends_with("_total"), "{}", f.name),
                Kind::Histogram => assert!(f.name.ends_with("_seconds"), "{}", f.name),
                Kind::Gauge => assert!(!f.name.ends_with("_total"), "{}", f.name),
            }
        }
    }

    #[test]
    fn a_node_writes_every_family_with_its_figures() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(PageStore::new(StoreConfig::with_capacity(16 << 20)));
        let fe = Arc::new(Frontend::new("n", store));
        let spec: ExportSpec = "swap0:1MiB".parse().unwrap();
        let exports = Exports::open(&[spec], fe.clone(), dir.path()).unwrap();
        fe.init_area(1, false).unwrap();
        let page = [7u8; 4096];
        fe.store_page(1, 0, &page).unwrap();
        fe.store_page(1, 1, &page).unwrap();
        let metrics = NodeMetrics::default();
        metrics.store_latency.observe(Duration::from_micros(3));

        let mut out = MetricsWriter::new();
        write(&mut out, &fe, &metrics, &exports);
        let text = out.finish() + &metrics.render_latencies();
        for f in FAMILIES {
            assert!(
                text.contains(&format!("# TYPE {} ", f.name)),
                "{} missing",
                f.name
            );
        }
        assert!(
            text.contains("\nramster_frontswap_succ_stores_total 2\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "\nramster_frontswap_failed_stores_total{reason=\"area_invalidated\"} 0\n"
            )
        );
        assert!(text.contains("\nramster_store_pages 2\n"));
        assert!(text.contains("\nramster_store_latency_seconds_count 1\n"));
        assert!(text.contains("\nramster_nbd_export_size_bytes{export=\"swap0\"} 1048576\n"));
        assert!(text.contains("\nramster_nbd_pages{export=\"swap0\",location=\"backing\"} 0\n"));
        assert!(
            text.contains("\n# HELP ramster_build_info ")
                || text.starts_with("# HELP ramster_build_info ")
        );
        assert!(text.contains(&format!(
            "\nramster_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
    }
}
