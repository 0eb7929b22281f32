//! The Prometheus text exposition format (0.0.4), written by hand.
//!
//! A metric family is declared once, as a [`Family`] constant (name, help,
//! type); the writer prints its `# HELP` and `# TYPE` lines before its first
//! sample, so a family with no samples prints nothing, and a family is never
//! described twice. Samples of one family must be written together, as the
//! format requires.

use std::fmt::Write as _;

use crate::metrics::{HistogramSnapshot, LATENCY_BUCKETS_NS};

/// The `Content-Type` of a scrape answer.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
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
    /// A latency histogram over [`LATENCY_BUCKETS_NS`]; its name ends in
    /// `_seconds`.
    pub const fn histogram(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind: Kind::Histogram,
        }
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

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) if v.is_nan() => f.write_str("NaN"),
            Value::Float(v) if v == f64::INFINITY => f.write_str("+Inf"),
            Value::Float(v) if v == f64::NEG_INFINITY => f.write_str("-Inf"),
            // Rust prints the shortest form that reads back exactly, with
            // no exponent: both are what Prometheus parses.
            Value::Float(v) => write!(f, "{v}"),
        }
    }
}

/// Labels of one sample: (name, value) pairs.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// Builds one scrape answer.
#[derive(Default)]
pub struct MetricsWriter {
    out: String,
    /// Families already started, the current one last.
    started: Vec<&'static str>,
}

impl MetricsWriter {
    pub fn new() -> MetricsWriter {
        MetricsWriter::default()
    }

    /// One sample of a counter or gauge.
    pub fn sample(&mut self, family: &'static Family, labels: Labels<'_>, value: impl Into<Value>) {
        assert!(
            family.kind != Kind::Histogram,
            "{} is a histogram",
            family.name
        );
        self.start(family);
        self.line(family.name, "", labels, None, value.into());
    }

    /// A histogram: cumulative `_bucket` lines with `le` in seconds (the
    /// last `+Inf`), then `_sum` (seconds) and `_count`.
    pub fn histogram(
        &mut self,
        family: &'static Family,
        labels: Labels<'_>,
        h: &HistogramSnapshot,
    ) {
        assert_eq!(family.kind, Kind::Histogram, "{}", family.name);
        self.start(family);
        let mut cumulative = 0;
        for (i, n) in h.buckets.iter().enumerate() {
            cumulative += n;
            let le = match LATENCY_BUCKETS_NS.get(i) {
                Some(&ns) => Value::Float(ns as f64 / 1e9).to_string(),
                None => "+Inf".to_string(),
            };
            self.line(
                family.name,
                "_bucket",
                labels,
                Some(&le),
                Value::Int(cumulative),
            );
        }
        let sum = Value::Float(h.sum_ns as f64 / 1e9);
        self.line(family.name, "_sum", labels, None, sum);
        self.line(family.name, "_count", labels, None, Value::Int(h.count));
    }

    pub fn finish(self) -> String {
        self.out
    }

    /// Prints HELP and TYPE before a family's first sample.
    fn start(&mut self, family: &'static Family) {
        if self.started.last() == Some(&family.name) {
            return;
        }
        // A split family is a bug of the code that writes it; the answer
        // would be refused by every scraper.
        assert!(
            !self.started.contains(&family.name),
            "samples of {} are not written together",
            family.name
        );
        self.started.push(family.name);
        let _ = writeln!(
            self.out,
            "# HELP {} {}",
            family.name,
            escape_help(family.help)
        );
        let _ = writeln!(self.out, "# TYPE {} {}", family.name, family.kind.as_str());
    }

    fn line(
        &mut self,
        name: &str,
        suffix: &str,
        labels: Labels<'_>,
        le: Option<&str>,
        value: Value,
    ) {
        let out = &mut self.out;
        out.push_str(name);
        out.push_str(suffix);
        let all = labels.iter().copied().chain(le.map(|le| ("le", le)));
        for (i, (k, v)) in all.enumerate() {
            out.push(if i == 0 { '{' } else { ',' });
            out.push_str(k);
            out.push_str("=\"");
            escape_label_value(out, v);
            out.push('"');
        }
        if !labels.is_empty() || le.is_some() {
            out.push('}');
        }
        let _ = writeln!(out, " {value}");
    }
}

/// HELP text escapes backslash and newline.
fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Label values escape backslash, double quote and newline.
fn escape_label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
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
    use std::time::Duration;

    use super::*;
    use crate::metrics::Histogram;

    static STORES: Family = Family::counter("t_stores_total", "Pages stored.");
    static USED: Family = Family::gauge("t_used_bytes", "Bytes in use.\nAll of them.");
    static LATENCY: Family = Family::histogram("t_latency_seconds", "How long.");

    #[test]
    fn help_and_type_come_once_per_family_before_its_samples() {
        let mut w = MetricsWriter::new();
        w.sample(&STORES, &[("reason", "a")], 1u64);
        w.sample(&STORES, &[("reason", "b\"\\\n")], 2u64);
        w.sample(&USED, &[], 0.5);
        let text = w.finish();
        assert_eq!(
            text,
            "# HELP t_stores_total Pages stored.\n\
             # TYPE t_stores_total counter\n\
             t_stores_total{reason=\"a\"} 1\n\
             t_stores_total{reason=\"b\\\"\\\\\\n\"} 2\n\
             # HELP t_used_bytes Bytes in use.\\nAll of them.\n\
             # TYPE t_used_bytes gauge\n\
             t_used_bytes 0.5\n"
        );
    }

    #[test]
    #[should_panic(expected = "not written together")]
    fn a_family_split_in_two_is_caught() {
        let mut w = MetricsWriter::new();
        w.sample(&STORES, &[], 1u64);
        w.sample(&USED, &[], 1u64);
        w.sample(&STORES, &[], 1u64);
    }

    #[test]
    fn histogram_buckets_are_cumulative_in_seconds_and_end_in_inf() {
        let h = Histogram::default();
        h.observe(Duration::from_nanos(3_000));
        h.observe(Duration::from_nanos(7_000));
        h.observe(Duration::from_nanos(7_000));
        h.observe(Duration::from_secs(10));
        let mut w = MetricsWriter::new();
        w.histogram(&LATENCY, &[("op", "load")], &h.snapshot());
        let text = w.finish();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "# HELP t_latency_seconds How long.");
        assert_eq!(lines[1], "# TYPE t_latency_seconds histogram");
        assert_eq!(
            lines[2],
            "t_latency_seconds_bucket{op=\"load\",le=\"0.000005\"} 1"
        );
        assert_eq!(
            lines[3],
            "t_latency_seconds_bucket{op=\"load\",le=\"0.00001\"} 3"
        );
        let buckets: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.contains("_bucket"))
            .collect();
        assert_eq!(buckets.len(), LATENCY_BUCKETS_NS.len() + 1);
        assert_eq!(
            buckets[buckets.len() - 2],
            "t_latency_seconds_bucket{op=\"load\",le=\"5\"} 3"
        );
        assert_eq!(
            buckets[buckets.len() - 1],
            "t_latency_seconds_bucket{op=\"load\",le=\"+Inf\"} 4"
        );
        let counts: Vec<u64> = buckets
            .iter()
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
        assert_eq!(
            lines[lines.len() - 2],
            "t_latency_seconds_sum{op=\"load\"} 10.000017"
        );
        assert_eq!(
            lines[lines.len() - 1],
            "t_latency_seconds_count{op=\"load\"} 4"
        );
    }

    #[test]
    fn values_print_as_prometheus_reads_them() {
        assert_eq!(Value::Int(u64::MAX).to_string(), "18446744073709551615");
        assert_eq!(Value::Float(2.5).to_string(), "2.5");
        assert_eq!(Value::Float(0.0).to_string(), "0");
        assert_eq!(Value::Float(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Value::Float(f64::NAN).to_string(), "NaN");
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
