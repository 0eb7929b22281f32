//! Byte sizes on the command line, in config files and in the
//! environment: `64MiB`, `1.5Gi`, `4096`, `2G`. Kubernetes memory
//! quantities parse as Kubernetes reads them, so a chart value means the
//! same to the node as to the pod's resources.

/// The units a size may carry, for error messages.
const UNITS: &str = "Ki, Mi, Gi, Ti or KiB, MiB, GiB, TiB (powers of 1024); \
                     k, M, G, T or KB, MB, GB, TB (powers of 1000); B or none for bytes";

/// Parses a size: digits with at most one fraction (`1.5`), optionally
/// followed by spaces and a unit. `Ki`, `Mi`, `Gi`, `Ti` (also `KiB`...)
/// are powers of 1024; `k`, `M`, `G`, `T` (also `KB`...) powers of 1000,
/// as in Kubernetes. Units ignore case, except that a bare lowercase `m` is
/// refused: Kubernetes reads `512m` as thousandths of a byte and docker as
/// mebibytes, and neither is what the other meant.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let not_a_size = || format!("{s:?} is not a size (e.g. 64MiB, 2Gi, 4096)");
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let (whole, fraction) = match num.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (num, None),
    };
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || fraction.is_some_and(|f| !digits(f)) {
        return Err(not_a_size());
    }
    let unit = unit.trim_start();
    if unit == "m" {
        return Err(format!(
            "{s:?}: a lowercase m is ambiguous (thousandths of a byte to Kubernetes, \
             mebibytes to docker); write {num}Mi for mebibytes or {num}M for megabytes"
        ));
    }
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        _ => return Err(format!("unknown size unit {unit:?} in {s:?} (use {UNITS})")),
    };
    let out_of_range = || format!("{s:?} is out of range");
    match fraction {
        // Whole numbers stay exact: no trip through f64.
        None => whole
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .ok_or_else(out_of_range),
        Some(_) => {
            let bytes = num.parse::<f64>().map_err(|_| not_a_size())? * mult as f64;
            // u64::MAX as f64 rounds up to 2^64, which no u64 holds.
            if bytes >= u64::MAX as f64 {
                return Err(out_of_range());
            }
            Ok(bytes as u64)
        }
    }
}

/// Formats bytes with a binary unit, for humans.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64 MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_size("2gib"), Ok(2 << 30));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }

    /// Memory quantities as a Kubernetes manifest writes them: `Ki`..`Ti`
    /// are powers of 1024, `k`/`M`/`G`/`T` powers of 1000.
    #[test]
    fn parses_kubernetes_quantities() {
        assert_eq!(parse_size("2Gi"), Ok(2 << 30));
        assert_eq!(parse_size("512Mi"), Ok(512 << 20));
        assert_eq!(parse_size("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_size("64Ki"), Ok(64 << 10));
        assert_eq!(parse_size("1Ti"), Ok(1 << 40));
        assert_eq!(parse_size("2G"), Ok(2_000_000_000));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("512M"), Ok(512_000_000));
        assert_eq!(parse_size("512MB"), Ok(512_000_000));
        assert_eq!(parse_size("4k"), Ok(4000));
        assert_eq!(parse_size("4K"), Ok(4000));
        assert_eq!(parse_size("1T"), Ok(1_000_000_000_000));
        assert_eq!(parse_size("1.5G"), Ok(1_500_000_000));
    }

    /// Neither reading of a lowercase `m` is safe: Kubernetes takes `512m`
    /// as thousandths of a byte, docker as mebibytes.
    #[test]
    fn refuses_a_lowercase_m() {
        let e = parse_size("512m").unwrap_err();
        assert!(e.contains("512Mi"), "{e}");
    }

    /// Numbers as the chart's schema writes them: digits, then at most one
    /// fraction; no sign, no exponent, no bare dot.
    #[test]
    fn refuses_odd_numbers() {
        for s in [".5Gi", "5.Gi", "1.2.3", "-1Gi", "+1Gi", "1e9", "Gi", ""] {
            assert!(parse_size(s).is_err(), "{s:?} taken");
        }
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert!(parse_size("16777216Ti").is_err(), "2^64 bytes");
        assert!(parse_size("18446744073709551616").is_err());
    }

    /// The error names every unit there is.
    #[test]
    fn the_error_lists_the_units() {
        let e = parse_size("3 parsecs").unwrap_err();
        for unit in ["Ki", "Mi", "Gi", "Ti", "KiB", "k", "M", "G", "T", "GB"] {
            assert!(e.contains(unit), "{unit} missing from {e}");
        }
    }

    /// What the chart's values schema takes as a capacity, the node takes:
    /// a pod whose values validate starts. (The schema takes `auto` only in
    /// lowercase, the word the chart's templates compare with; the node
    /// takes it in any case.)
    #[test]
    fn the_chart_schema_takes_what_the_node_takes() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../charts/ramster/values.schema.json");
        let schema: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let pattern = |name: &str| {
            let p = schema["definitions"][name]["pattern"].as_str();
            regex::Regex::new(p.unwrap_or_else(|| panic!("no {name} pattern"))).unwrap()
        };
        // `capacity` takes auto or a size, `size` (donate) a size or nothing.
        let (re, size_re) = (pattern("capacity"), pattern("size"));
        let mut samples: Vec<String> = ["", "4096", "0", "1.5", "12 ", " 12", "1.", ".5", "x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let units = [
            "", "b", "B", "k", "K", "m", "M", "g", "G", "t", "T", "p", "P", "e", "E", "ki", "Ki",
            "KI", "mi", "Mi", "gi", "Gi", "Ti", "Pi", "Ei", "kb", "KB", "kB", "mb", "MB", "Mb",
            "GB", "TB", "KiB", "kib", "MiB", "mIB", "GiB", "TiB", "PiB", "iB", "i", "bb", "Gii",
            "GiBs", "Gi ", "auto",
        ];
        for n in ["2", "1.5", "512"] {
            for u in units {
                samples.push(format!("{n}{u}"));
                samples.push(format!("{n} {u}"));
            }
        }
        for s in &samples {
            let node = s == "auto" || parse_size(s).is_ok();
            let chart = re.is_match(s);
            assert_eq!(chart, node, "{s:?}: schema {chart}, node {node}");
            let (chart, node) = (size_re.is_match(s), s.is_empty() || parse_size(s).is_ok());
            assert_eq!(chart, node, "{s:?}: schema's size {chart}, node {node}");
        }
        assert!(re.is_match("auto"));
        assert!(!re.is_match("AUTO"));
    }

    #[test]
    fn formats_for_humans() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(64 << 20), "64.0 MiB");
    }
}
