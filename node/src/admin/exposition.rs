//! How the node's figures reach Prometheus: through the `metrics` facade,
//! rendered by `metrics-exporter-prometheus`.
//!
//! A metric family is declared once, as a [`Family`] constant (name, help,
//! type), in [`super::node_metrics`] or beside the cluster view that owns
//! it. Two kinds of figures meet in one scrape:
//!
//! - Counters and gauges are state the node keeps anyway (the store's
//!   figures, the frontswap counters, donor usage, peers), read by `ramster
//!   status`, admission and the movers as well as by scrapes. A scrape
//!   publishes their current values into a recorder of its own
//!   ([`MetricsWriter`]), so the page path pays nothing for being observed
//!   and a series that is gone (a removed peer) is gone from the next
//!   scrape.
//! - Latency histograms are recorded on the page path through facade
//!   handles into the node's long-lived recorder ([`Latencies`]), and
//!   rendered from it.
//!
//! Neither recorder is the process-global one: tests run several nodes in
//! one process, and each node's scrape shows that node only.

use std::collections::HashSet;
use std::time::Duration;

use metrics::{Key, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// The `Content-Type` of a scrape answer.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds of the latency buckets, in seconds: 5 µs (a local load) to
/// 5 s (an RPC at its deadline).
pub const LATENCY_BUCKETS_SECONDS: [f64; 19] = [
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric family: what a scraper learns from `# HELP` and `# TYPE`.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
}

impl Family {
    /// A counter; by Prometheus' rules its name ends in `_total`.
    pub const fn counter(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind: Kind::Counter,
        }
    }
    pub const fn gauge(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind: Kind::Gauge,
        }
    }
    /// A latency histogram over [`LATENCY_BUCKETS_SECONDS`]; its name ends
    /// in `_seconds`.
    pub const fn histogram(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind: Kind::Histogram,
        }
    }

    fn key(&self, labels: Labels<'_>) -> Key {
        let labels: Vec<Label> = labels
            .iter()
            .map(|&(k, v)| Label::new(k.to_string(), v.to_string()))
            .collect();
        Key::from_parts(self.name, labels)
    }
}

/// A sample's value: counts stay exact integers, the rest are floats.
#[derive(Copy, Clone, Debug, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(v)
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Value {
        Value::Int(v as u64)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Float(v)
    }
}

impl Value {
    fn as_f64(self) -> f64 {
        match self {
            Value::Int(v) => v as f64,
            Value::Float(v) => v,
        }
    }
}

/// Labels of one sample: (name, value) pairs.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// Where the facade's handles are registered from: the call site is not a
/// module path worth showing, and the exporter ignores it.
static METADATA: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

fn describe(recorder: &impl Recorder, family: &'static Family) {
    let help = SharedString::const_str(family.help);
    let unit = family.name.ends_with("_seconds").then_some(Unit::Seconds);
    let name = family.name.into();
    match family.kind {
        Kind::Counter => recorder.describe_counter(name, unit, help),
        Kind::Gauge => recorder.describe_gauge(name, unit, help),
        Kind::Histogram => recorder.describe_histogram(name, unit, help),
    }
}

/// One scrape's counters and gauges: their values now, published into a
/// recorder that lives for this scrape only.
pub struct MetricsWriter {
    recorder: metrics_exporter_prometheus::PrometheusRecorder,
    described: HashSet<&'static str>,
}

impl Default for MetricsWriter {
    fn default() -> Self {
        MetricsWriter::new()
    }
}

impl MetricsWriter {
    pub fn new() -> MetricsWriter {
        MetricsWriter {
            recorder: PrometheusBuilder::new().build_recorder(),
            described: HashSet::new(),
        }
    }

    /// One sample of a counter (its value so far) or of a gauge.
    pub fn sample(&mut self, family: &'static Family, labels: Labels<'_>, value: impl Into<Value>) {
        if self.described.insert(family.name) {
            describe(&self.recorder, family);
        }
        let key = family.key(labels);
        match (family.kind, value.into()) {
            (Kind::Counter, Value::Int(v)) => {
                self.recorder.register_counter(&key, &METADATA).absolute(v)
            }
            (Kind::Gauge, v) => self
                .recorder
                .register_gauge(&key, &METADATA)
                .set(v.as_f64()),
            (Kind::Counter, Value::Float(_)) | (Kind::Histogram, _) => {
                panic!("{} takes no sample of this kind", family.name)
            }
        }
    }

    /// The Prometheus text of what was written.
    pub fn finish(self) -> String {
        self.recorder.handle().render()
    }
}

/// The node's latency histograms: facade handles recorded on the page path,
/// rendered with fixed buckets so that scrapes aggregate across nodes.
pub struct Latencies {
    recorder: metrics_exporter_prometheus::PrometheusRecorder,
}

impl Latencies {
    pub fn new() -> Latencies {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS_SECONDS)
            .expect("the bucket list is not empty")
            .build_recorder();
        Latencies { recorder }
    }

    /// A histogram of `family`, described; its handle records from any
    /// thread.
    pub fn register(&self, family: &'static Family) -> Latency {
        assert_eq!(family.kind, Kind::Histogram, "{}", family.name);
        describe(&self.recorder, family);
        Latency(
            self.recorder
                .register_histogram(&family.key(&[]), &METADATA),
        )
    }

    /// The histograms' text; drains what was recorded since the last call.
    pub fn render(&self) -> String {
        self.recorder.handle().render()
    }

    /// Folds the samples recorded since the last call into the buckets, so
    /// a node nobody scrapes does not keep every sample.
    pub fn upkeep(&self) {
        self.recorder.handle().run_upkeep();
    }
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies::new()
    }
}

impl std::fmt::Debug for Latencies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Latencies").finish_non_exhaustive()
    }
}

/// One latency histogram's handle.
#[derive(Clone)]
pub struct Latency(metrics::Histogram);

impl Latency {
    pub fn observe(&self, d: Duration) {
        self.0.record(d.as_secs_f64());
    }

    /// `n` samples of `d` each (a batch's time shared among its pages).
    pub fn observe_many(&self, d: Duration, n: usize) {
        self.0.record_many(d.as_secs_f64(), n);
    }
}

impl std::fmt::Debug for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Latency")
    }
}

/// Whether `name` is a valid metric or label name.
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

#[cfg(test)]
mod tests {
    use super::*;

    static STORES: Family = Family::counter("t_stores_total", "Pages stored.");
    static USED: Family = Family::gauge("t_used_bytes", "Bytes in use.\nAll of them.");
    static LATENCY: Family = Family::histogram("t_latency_seconds", "How long.");

    fn lines(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.is_empty()).collect()
    }

    #[test]
    fn help_and_type_come_once_per_family_with_its_samples() {
        let mut w = MetricsWriter::new();
        w.sample(&STORES, &[("reason", "a")], 1u64);
        w.sample(&USED, &[], 0.5);
        // Label values are node and export names; a backslash right before
        // a quote or newline is taken by the exporter as an escape, so the
        // test keeps them apart.
        w.sample(&STORES, &[("reason", "b\"\\x\n")], 2u64);
        let text = w.finish();
        let l = lines(&text);
        for want in [
            "# HELP t_stores_total Pages stored.",
            "# TYPE t_stores_total counter",
            "t_stores_total{reason=\"a\"} 1",
            "t_stores_total{reason=\"b\\\"\\\\x\\n\"} 2",
            "# HELP t_used_bytes Bytes in use.\\nAll of them.",
            "# TYPE t_used_bytes gauge",
            "t_used_bytes 0.5",
        ] {
            assert_eq!(
                l.iter().filter(|x| **x == want).count(),
                1,
                "{want} in {text}"
            );
        }
        // A family's samples follow its TYPE line, together.
        let at = |want: &str| l.iter().position(|x| x.starts_with(want)).unwrap();
        assert!(at("# TYPE t_stores_total") < at("t_stores_total{reason=\"a\"}"));
        assert_eq!(
            at("t_stores_total{reason=\"a\"}").abs_diff(at("t_stores_total{reason=\"b")),
            1
        );
    }

    #[test]
    fn a_scrape_shows_only_what_it_wrote() {
        let mut w = MetricsWriter::new();
        w.sample(&USED, &[("peer", "n2")], 1u64);
        assert!(w.finish().contains("peer=\"n2\""));
        let mut w = MetricsWriter::new();
        w.sample(&USED, &[("peer", "n3")], 1u64);
        assert!(
            !w.finish().contains("peer=\"n2\""),
            "a gone series stays gone"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_in_seconds_and_end_in_inf() {
        let latencies = Latencies::new();
        let h = latencies.register(&LATENCY);
        h.observe(Duration::from_nanos(3_000));
        h.observe_many(Duration::from_nanos(7_000), 2);
        latencies.upkeep();
        h.observe(Duration::from_secs(10));
        let text = latencies.render();
        let l = lines(&text);
        assert_eq!(l[0], "# HELP t_latency_seconds How long.");
        assert_eq!(l[1], "# TYPE t_latency_seconds histogram");
        let buckets: Vec<&str> = l
            .iter()
            .copied()
            .filter(|x| x.contains("_bucket"))
            .collect();
        assert_eq!(buckets.len(), LATENCY_BUCKETS_SECONDS.len() + 1);
        assert_eq!(buckets[0], "t_latency_seconds_bucket{le=\"0.000005\"} 1");
        assert_eq!(buckets[1], "t_latency_seconds_bucket{le=\"0.00001\"} 3");
        assert_eq!(
            buckets[buckets.len() - 1],
            "t_latency_seconds_bucket{le=\"+Inf\"} 4"
        );
        let counts: Vec<u64> = buckets
            .iter()
            .map(|x| x.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
        assert!(l.contains(&"t_latency_seconds_count 4"), "{text}");
        let sum: f64 = l
            .iter()
            .find_map(|x| x.strip_prefix("t_latency_seconds_sum "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((sum - 10.000_017).abs() < 1e-9, "{sum}");
        // Rendering drains nothing the next scrape needs: counts carry on.
        h.observe(Duration::from_nanos(3_000));
        assert!(latencies.render().contains("t_latency_seconds_count 5"));
    }

    #[test]
    fn names_follow_the_rules() {
        assert!(is_valid_name("ramster_store_used_bytes"));
        assert!(is_valid_name("_x:y"));
        assert!(!is_valid_name("9lives"));
        assert!(!is_valid_name("a-b"));
        assert!(!is_valid_name(""));
    }
}
