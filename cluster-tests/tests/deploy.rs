//! What the deployment files lean on, checked against real nodes: every
//! metric the alert rules and the Grafana dashboard name is one a node
//! exports, the health probe containers run answers as documented, and the
//! store-once/verify-later bench that the compose chaos run drives finds
//! lost pages.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use ramster_client::BlockingClient;
use ramster_cluster_tests::{
    MemberSpec, NodeProcess, TestCluster, free_loopback_port, ramster_bin,
};
use ramster_node::cli::admin_client;

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn ramster(args: &[&str]) -> Output {
    Command::new(ramster_bin())
        .args(args)
        .output()
        .expect("running ramster")
}

/// The `ramster_*` names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("ramster_") {
        // Not part of a longer identifier (a label value, a name like x_ramster_y).
        let preceded = rest[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '"');
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !preceded {
            names.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// The `expr:` of every rule in the alert rules file (one line each).
fn rule_exprs(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(|e| e.trim().to_string())
        .collect()
}

/// Every `expr` in the dashboard's panels and template queries.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// The sample names of a Prometheus text exposition.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn alert_rules_and_dashboard_name_only_metrics_nodes_export() {
    let rules = std::fs::read_to_string(repo_file("charts/ramster/files/alerts.yaml")).unwrap();
    let exprs = rule_exprs(&rules);
    assert!(
        rules.matches("- alert:").count() == exprs.len() && exprs.len() >= 6,
        "every rule has a one-line expr: {exprs:?}"
    );
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("charts/ramster/files/dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut panel_exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut panel_exprs);
    assert!(panel_exprs.len() >= 10, "{panel_exprs:?}");

    let used: BTreeSet<String> = exprs
        .iter()
        .chain(&panel_exprs)
        .flat_map(|e| metric_names(e))
        .collect();
    for family in [
        "ramster_peer_up",
        "ramster_store_used_bytes",
        "ramster_remote_load_errors_total",
        "ramster_frontswap_failed_stores_total",
    ] {
        assert!(used.contains(family), "{family} is watched: {used:?}");
    }

    // A peer and a memory server: the cluster families exist only in a cluster.
    let cluster = TestCluster::start(&[
        MemberSpec {
            name: "watched-a",
            capacity: "16MiB",
            extra: &[],
        },
        MemberSpec {
            name: "watched-b",
            capacity: "16MiB",
            extra: &["--role", "memory-server"],
        },
    ])
    .unwrap();
    cluster
        .wait_up("watched-a", 2, Duration::from_secs(30))
        .unwrap();
    let metrics = admin_client::get(&cluster.member("watched-a").admin, "/metrics").unwrap();
    assert_eq!(metrics.status, 200);
    let have = exported(&metrics.body);
    let missing: Vec<_> = used.iter().filter(|n| !have.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "named by the rules or dashboard but not exported: {missing:?}\nexported: {have:?}"
    );
}

#[test]
fn probe_exits_zero_only_on_a_2xx_answer() {
    let port = free_loopback_port();
    let endpoint = format!("127.0.0.1:{port}");
    let _node = NodeProcess::start("probed", "16MiB", &["--admin-listen", &endpoint]).unwrap();
    let ok = ramster_node::cli::status::exit::OK as i32;
    let ready = (0..100).any(|_| {
        let out = ramster(&["probe", "--endpoint", &endpoint]);
        std::thread::sleep(Duration::from_millis(50));
        out.status.code() == Some(ok)
    });
    assert!(ready, "the probe never saw /health/ready answer 200");
    let out = ramster(&["probe", "--endpoint", &endpoint, "/health/live"]);
    assert_eq!(out.status.code(), Some(ok));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("200"));
    let out = ramster(&["probe", "--endpoint", &endpoint, "/no/such/path"]);
    assert_eq!(out.status.code(), Some(1));
    let closed = format!("127.0.0.1:{}", free_loopback_port());
    let out = ramster(&["probe", "--endpoint", &closed]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn bench_stores_once_and_verifies_again_until_pages_are_lost() {
    let node = NodeProcess::start("phases", "64MiB", &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("pages.json");
    let bench = |phase: &str, extra: &[&str]| {
        let mut args = vec![
            "bench",
            "--socket",
            node.socket.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
            "--phase",
            phase,
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = ramster(&args);
        let line = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .to_string();
        let report: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{e}: {line:?} {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.success(), report)
    };

    let (ok, stored) = bench("store", &["--pages", "3000", "--seed", "7"]);
    assert!(ok, "{stored}");
    let accepted = stored["accepted"].as_u64().unwrap();
    // The synthetic mix has incompressible pages, which the node refuses.
    assert!(accepted > 2000 && accepted < 3000, "{stored}");

    // Verify twice: loads leave the pages where they are.
    for _ in 0..2 {
        let (ok, r) = bench("verify", &[]);
        assert!(ok, "{r}");
        assert_eq!(r["good"].as_u64(), Some(accepted), "{r}");
        assert_eq!(r["verified"], true);
    }

    // The client drops the area: every accepted page is now lost.
    BlockingClient::connect(&node.socket)
        .unwrap()
        .invalidate_area(1)
        .unwrap();
    let (ok, r) = bench("verify", &[]);
    assert!(!ok, "a verify that finds lost pages fails: {r}");
    assert_eq!(r["lost"].as_u64(), Some(accepted), "{r}");
    assert_eq!(r["verified"], false);

    // A state file that does not fit its page count is refused.
    let mut s: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    s["pages"] = serde_json::json!(5000);
    std::fs::write(&state, s.to_string()).unwrap();
    let out = ramster(&[
        "bench",
        "--socket",
        node.socket.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        "--phase",
        "verify",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bitmap"));
}

#[test]
fn the_metric_name_scanner_skips_label_values_and_longer_names() {
    let e = r#"sum by (instance) (rate(ramster_frontswap_failed_stores_total{reason="ramster_x"}[5m])) / x_ramster_y"#;
    assert_eq!(
        metric_names(e).into_iter().collect::<Vec<_>>(),
        ["ramster_frontswap_failed_stores_total"]
    );
}
