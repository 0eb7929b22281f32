//! The admin endpoint of a real `ramster node`: `/metrics` is valid
//! Prometheus text whose counters match what was done through the API, the
//! health probes answer, and `ramster status` / `ramster health` read it.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ramster_client::BlockingClient;
use ramster_cluster_tests::{NodeProcess, free_loopback_port, ramster_bin, wait_for};
use ramster_node::cluster::status::{ClusterStatus, HealthLevel, Liveness};
use ramster_protocol::{PAGE_BYTES, v1};

/// Pages stored (all compressible) and offsets asked for that were never stored.
const STORED: u64 = 40;
const MISSING: u64 = 3;

struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// One raw request; the server closes the connection after answering.
fn request(addr: SocketAddr, raw: &str) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Answer {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

fn get(addr: SocketAddr, path: &str) -> Answer {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
    )
}

/// A page that compresses: a pattern with the seed in it.
fn page(seed: u64) -> Bytes {
    let mut p = vec![0u8; PAGE_BYTES];
    for (i, b) in p.iter_mut().enumerate() {
        *b = ((i / 64) as u64 ^ seed) as u8;
    }
    Bytes::from(p)
}

/// A page that does not (xorshift noise).
fn noise() -> Bytes {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut p = vec![0u8; PAGE_BYTES];
    for b in &mut p {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    Bytes::from(p)
}

/// Prometheus' own check of a scrape (`promtool check metrics`, from
/// Debian's `prometheus` package): the format and its lint rules.
fn promtool_check_metrics(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = child.unwrap_or_else(|e| {
        panic!("promtool is needed to check /metrics ({e}); apt-get install prometheus")
    });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One sample: its metric name (with suffix) and labels.
type SampleKey = (String, BTreeMap<String, String>);

/// Parses the text format strictly: only HELP and TYPE comments, each once
/// per family and before its samples; every other line `name{labels} value`;
/// every sample belongs to a family that was described.
fn parse_metrics(text: &str) -> HashMap<SampleKey, f64> {
    let mut help = HashMap::new();
    let mut kind: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    assert!(text.ends_with('\n'), "the answer ends with a newline");
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (word, name, rest) = (
                parts.next().unwrap(),
                parts.next().unwrap().to_string(),
                parts.next().unwrap_or_default().to_string(),
            );
            assert!(valid_name(&name), "bad family name in {line:?}");
            match word {
                "HELP" => {
                    assert!(!rest.is_empty(), "empty help: {line:?}");
                    assert!(help.insert(name, rest).is_none(), "HELP twice: {line:?}");
                }
                "TYPE" => {
                    assert!(
                        ["counter", "gauge", "histogram"].contains(&rest.as_str()),
                        "{line:?}"
                    );
                    assert!(help.contains_key(&name), "TYPE before HELP: {line:?}");
                    assert!(kind.insert(name, rest).is_none(), "TYPE twice: {line:?}");
                }
                _ => panic!("unexpected comment {line:?}"),
            }
            continue;
        }
        // Families are set apart by blank lines.
        if line.is_empty() {
            continue;
        }
        assert!(!line.starts_with('#'), "{line:?}");
        let (name, labels, value) = parse_sample(line);
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .find(|base| kind.get(*base).is_some_and(|k| k == "histogram"))
            .unwrap_or(&name)
            .to_string();
        let k = kind
            .get(&family)
            .unwrap_or_else(|| panic!("{line:?}: family {family} has no TYPE before it"));
        assert!(help.contains_key(&family), "{line:?}: no HELP");
        if k == "counter" {
            assert!(family.ends_with("_total"), "counter {family}");
        }
        assert!(
            samples.insert((name, labels), value).is_none(),
            "sample twice: {line:?}"
        );
    }
    assert_eq!(
        help.len(),
        kind.len(),
        "every family has both HELP and TYPE"
    );
    samples
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_sample(line: &str) -> (String, BTreeMap<String, String>, f64) {
    let name_end = line
        .find(['{', ' '])
        .unwrap_or_else(|| panic!("no value: {line:?}"));
    let name = &line[..name_end];
    assert!(valid_name(name), "bad name in {line:?}");
    let rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        return parse_labels_and_value(line, name, inner);
    }
    let value = rest
        .strip_prefix(' ')
        .unwrap_or_else(|| panic!("no single space before the value: {line:?}"));
    (name.to_string(), BTreeMap::new(), parse_value(line, value))
}

/// `k="v",k="v"} value`: quoted, escaped label values, then one space and
/// the value (no timestamp).
fn parse_labels_and_value(
    line: &str,
    name: &str,
    mut inner: &str,
) -> (String, BTreeMap<String, String>, f64) {
    let mut labels = BTreeMap::new();
    loop {
        let eq = inner.find('=').expect("label without =");
        let key = &inner[..eq];
        assert!(valid_name(key), "bad label name in {line:?}");
        let quoted = inner[eq + 1..]
            .strip_prefix('"')
            .unwrap_or_else(|| panic!("unquoted value in {line:?}"));
        let mut value = String::new();
        let mut it = quoted.char_indices();
        let close = loop {
            match it.next().expect("unterminated label value") {
                (i, '"') => break i,
                (_, '\\') => match it.next().unwrap().1 {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    c => panic!("bad escape \\{c} in {line:?}"),
                },
                (_, c) => value.push(c),
            }
        };
        assert!(labels.insert(key.to_string(), value).is_none(), "{line:?}");
        let after = &quoted[close + 1..];
        if let Some(next) = after.strip_prefix(',') {
            inner = next;
        } else if let Some(rest) = after.strip_prefix('}') {
            let value = rest
                .strip_prefix(' ')
                .unwrap_or_else(|| panic!("no single space before the value: {line:?}"));
            return (name.to_string(), labels, parse_value(line, value));
        } else {
            panic!("{after:?} after a label value in {line:?}");
        }
    }
}

fn parse_value(line: &str, value: &str) -> f64 {
    match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v
            .parse()
            .unwrap_or_else(|_| panic!("bad value (or a timestamp) in {line:?}")),
    }
}

fn value(m: &HashMap<SampleKey, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let key = (
        name.to_string(),
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    *m.get(&key)
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
}

fn ramster(args: &[&str]) -> Output {
    Command::new(ramster_bin())
        .args(args)
        .env_remove("RAMSTER_ENDPOINT")
        .env_remove("RAMSTER_ENDPOINTS")
        .output()
        .expect("running ramster")
}

/// Waits for `/health/ready`: the node turns ready right after its API
/// socket is bound, which is what the fixture waited for.
fn wait_ready(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = get(addr, "/health/ready");
        if a.status == 200 {
            assert_eq!(a.body, "ready\n");
            return;
        }
        assert!(Instant::now() < deadline, "never ready: {}", a.body);
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn metrics_probes_status_and_health_of_a_real_node() {
    let port = free_loopback_port();
    let endpoint = format!("127.0.0.1:{port}");
    let node = NodeProcess::start("admin-test", "64MiB", &["--admin-listen", &endpoint]).unwrap();
    let addr: SocketAddr = endpoint.parse().unwrap();
    assert_eq!(node.admin, Some(addr));
    wait_ready(addr);

    // Work through the API.
    let client = BlockingClient::connect(&node.socket).unwrap();
    client.init_area(1, false).unwrap();
    let pages: Vec<(u64, Bytes)> = (0..STORED).map(|i| (i, page(i))).collect();
    let st = client.store_pages(1, &pages).unwrap();
    assert!(st.iter().all(|s| *s == v1::Status::Ok), "{st:?}");
    let st = client.store_pages(1, &[(STORED, noise())]).unwrap();
    assert_eq!(st, [v1::Status::RejectedIncompressible]);
    let offsets: Vec<u64> = (0..STORED + MISSING).collect();
    let back = client.load_pages(1, &offsets).unwrap();
    for (i, p) in back.iter().enumerate() {
        match pages.get(i) {
            Some((_, want)) => assert_eq!(p.as_ref().unwrap(), want),
            None => assert_eq!(p.as_ref().unwrap_err(), &v1::Status::NotFound),
        }
    }

    // /metrics: valid, and it counts what was done.
    let a = get(addr, "/metrics");
    assert_eq!(a.status, 200);
    let head = a.head.to_ascii_lowercase();
    assert!(
        head.contains("\r\ncontent-type: text/plain; version=0.0.4"),
        "{}",
        a.head
    );
    assert!(head.contains("\r\nconnection: close"), "{}", a.head);
    promtool_check_metrics(&a.body);
    let m = parse_metrics(&a.body);
    let stored = STORED as f64;
    assert_eq!(
        value(&m, "ramster_frontswap_succ_stores_total", &[]),
        stored
    );
    assert_eq!(
        value(
            &m,
            "ramster_frontswap_failed_stores_total",
            &[("reason", "incompressible")]
        ),
        1.0
    );
    for reason in ["no_capacity", "quota", "area_invalidated", "unavailable"] {
        let v = value(
            &m,
            "ramster_frontswap_failed_stores_total",
            &[("reason", reason)],
        );
        assert_eq!(v, 0.0, "{reason}");
    }
    let loads = |result| value(&m, "ramster_frontswap_loads_total", &[("result", result)]);
    assert_eq!(loads("hit"), stored);
    assert_eq!(loads("miss"), MISSING as f64);
    assert_eq!(loads("error"), 0.0);
    assert_eq!(value(&m, "ramster_frontswap_invalidates_total", &[]), 0.0);
    assert_eq!(value(&m, "ramster_store_pages", &[]), stored);
    assert_eq!(
        value(&m, "ramster_store_capacity_bytes", &[]),
        (64 << 20) as f64
    );
    assert!(value(&m, "ramster_store_used_bytes", &[]) > 0.0);
    assert_eq!(value(&m, "ramster_remotified_pages_total", &[]), 0.0);
    // Every store and every load was timed.
    for (family, n) in [
        ("ramster_store_latency_seconds", STORED + 1),
        ("ramster_load_latency_seconds", STORED + MISSING),
    ] {
        let count = value(&m, &format!("{family}_count"), &[]);
        assert_eq!(count, n as f64, "{family}");
        let inf = value(&m, &format!("{family}_bucket"), &[("le", "+Inf")]);
        assert_eq!(inf, count, "{family}: +Inf holds every sample");
        assert!(value(&m, &format!("{family}_sum"), &[]) > 0.0);
    }
    assert_eq!(
        value(
            &m,
            "ramster_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    // Probes and the rest of HTTP.
    let a = get(addr, "/health/live");
    assert_eq!((a.status, a.body.as_str()), (200, "ok\n"));
    assert_eq!(get(addr, "/health/ready").status, 200);
    assert_eq!(get(addr, "/no/such/page").status, 404);
    let a = request(
        addr,
        "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(a.status, 405);
    let a = request(
        addr,
        "HEAD /health/live HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((a.status, a.body.as_str()), (200, ""));
    assert_eq!(request(addr, "nonsense\r\n\r\n").status, 400);

    // ramster status -o json: this node, up, with its pages.
    let out = ramster(&["status", "--endpoint", &endpoint, "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let status: ClusterStatus = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status.nodes.len(), 1);
    let me = &status.nodes[0];
    assert_eq!(me.name, "admin-test");
    assert_eq!(me.state, Liveness::Up);
    assert_eq!(me.raft_role, "none");
    assert_eq!(me.stored_pages, STORED);
    assert_eq!(status.health.status, HealthLevel::Ok);
    assert_eq!((status.nodes_up, status.nodes_total), (1, 1));

    // ramster status: the table.
    let out = ramster(&["status", "--endpoint", &endpoint]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("admin-test"), "{table}");
    assert!(table.contains("HEALTH_OK"), "{table}");

    // ramster health: one line and an exit code; the endpoint from the
    // environment as well as from the flag.
    let out = ramster(&["health", "--endpoint", &endpoint]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "HEALTH_OK\n");
    let out = Command::new(ramster_bin())
        .arg("health")
        .env("RAMSTER_ENDPOINT", &endpoint)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // Nothing listening: health says 1, status fails as commands fail.
    let closed = format!("127.0.0.1:{}", free_loopback_port());
    let out = ramster(&["health", "--endpoint", &closed]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&closed),
        "{out:?}"
    );
    let out = ramster(&["status", "--endpoint", &closed]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn endpoints_fall_over_from_a_dead_one_to_a_live_node() {
    // The live node's admin endpoint given by name: it listens on loopback.
    let port = free_loopback_port();
    let node = NodeProcess::start(
        "endpoints-test",
        "16MiB",
        &["--admin-listen", &format!("localhost:{port}")],
    )
    .unwrap();
    let live = format!("127.0.0.1:{port}");
    wait_ready(live.parse().unwrap());
    let dead = format!("127.0.0.1:{}", free_loopback_port());
    let both = format!("{dead},{live}");

    let out = ramster(&["status", "--endpoints", &both, "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let status: ClusterStatus = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status.answered_by, node.name);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&dead) && err.contains(&live), "{err}");

    let out = Command::new(ramster_bin())
        .arg("health")
        .env_remove("RAMSTER_ENDPOINT")
        .env("RAMSTER_ENDPOINTS", &both)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "HEALTH_OK\n");

    // The old single flag, given twice, is the same list.
    let out = ramster(&["probe", "--endpoint", &dead, "--endpoint", &live]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // None answers: each is named, and health says 1.
    let dead2 = format!("127.0.0.1:{}", free_loopback_port());
    let out = ramster(&["health", "--endpoints", &format!("{dead},{dead2}")]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&dead) && err.contains(&dead2), "{err}");
}

#[test]
fn admin_listen_off_serves_no_admin_endpoint() {
    let node = NodeProcess::start("admin-off", "16MiB", &["--admin-listen", "off"]).unwrap();
    assert_eq!(node.admin, None);
    // The node logs that it is ready just after its API socket answers.
    wait_for(Duration::from_secs(10), || {
        without_ansi_colours(&node.log())
            .contains("admin_listen=None")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}", without_ansi_colours(&node.log())));
}

/// The log as text: the node colours its fields.
fn without_ansi_colours(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // ESC [ params m
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
