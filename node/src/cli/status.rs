//! `ramster status` and `ramster health`: the cluster as a node's admin
//! endpoint (`/v1/status`) reports it, as a table, JSON, or an exit code.

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;

use super::admin_client;
use super::size::format_size;
use crate::admin::{ADMIN_LISTEN_DEFAULT, HEALTH_READY_PATH, STATUS_PATH};
use crate::cluster::membership::MemberState;
use crate::cluster::status::{ClusterStatus, HealthLevel, NodeStatus};

/// Exit codes of `ramster health`, for scripts and probes.
pub mod exit {
    pub const OK: u8 = 0;
    /// No answer, or not one a node gives.
    pub const UNREACHABLE: u8 = 1;
    pub const WARN: u8 = 3;
    pub const ERR: u8 = 4;
}

/// The variable that named one endpoint before `RAMSTER_ENDPOINTS` named
/// several; still read when that one is not set.
pub const ENDPOINT_ENV_SINGLE: &str = "RAMSTER_ENDPOINT";

#[derive(Args, Debug, Clone, Default)]
pub struct Endpoint {
    /// Nodes' admin endpoints, HOST:PORT,... (repeatable), asked in order
    /// until one answers; `--endpoint` and RAMSTER_ENDPOINT also work
    /// [default: 127.0.0.1:7801].
    #[arg(
        long = "endpoints",
        visible_alias = "endpoint",
        global = true,
        env = "RAMSTER_ENDPOINTS",
        value_delimiter = ',',
        value_name = "HOST:PORT"
    )]
    pub endpoints: Vec<String>,
}

impl Endpoint {
    /// The endpoints to ask, in order: the flag's or RAMSTER_ENDPOINTS',
    /// else RAMSTER_ENDPOINT's, else the default.
    pub fn list(&self) -> Vec<String> {
        endpoints_or(&self.endpoints, std::env::var(ENDPOINT_ENV_SINGLE).ok())
    }
}

/// `given` without empty entries, else `single` (a comma-separated list
/// too), else the default endpoint.
fn endpoints_or(given: &[String], single: Option<String>) -> Vec<String> {
    let clean = |items: &mut dyn Iterator<Item = &str>| -> Vec<String> {
        items
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect()
    };
    let list = clean(&mut given.iter().map(String::as_str));
    if !list.is_empty() {
        return list;
    }
    let list = clean(&mut single.as_deref().unwrap_or_default().split(','));
    if !list.is_empty() {
        return list;
    }
    vec![ADMIN_LISTEN_DEFAULT.to_string()]
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub endpoint: Endpoint,
    /// How to print it.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct HealthArgs {
    #[command(flatten)]
    pub endpoint: Endpoint,
}

#[derive(Args, Debug)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub endpoint: Endpoint,
    /// The path to GET.
    #[arg(default_value = HEALTH_READY_PATH)]
    pub path: String,
}

/// GETs one path of the admin endpoint; exit 0 on a 2xx answer, else 1.
/// The container image has no shell and no curl: health checks run this.
pub fn run_probe(args: ProbeArgs) -> ExitCode {
    let endpoints = args.endpoint.list();
    match admin_client::get_first(&endpoints, &args.path) {
        Ok((_, a)) => {
            let line = a.body.lines().next().unwrap_or_default();
            println!("{} {line}", a.status);
            if (200..300).contains(&a.status) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(exit::UNREACHABLE)
            }
        }
        Err(e) => {
            eprintln!("ramster probe: {}: {e:#}", args.path);
            ExitCode::from(exit::UNREACHABLE)
        }
    }
}

/// Asks `endpoint` for the cluster's status.
pub fn fetch(endpoint: &str) -> anyhow::Result<ClusterStatus> {
    let answer = admin_client::get(endpoint, STATUS_PATH)
        .with_context(|| format!("asking {endpoint} for {STATUS_PATH}"))?;
    if answer.status != 200 {
        bail!(
            "{endpoint} answered {STATUS_PATH} with {}: {}",
            answer.status,
            answer.body.trim()
        );
    }
    serde_json::from_str(&answer.body).with_context(|| {
        format!("{endpoint} answered {STATUS_PATH} with something else than a status")
    })
}

/// Asks each of `endpoints` in turn for the cluster's status; the first
/// status answered. One that does not answer, or answers with something
/// else than a status, is said on stderr before the next is asked.
pub fn fetch_first(endpoints: &[String]) -> anyhow::Result<ClusterStatus> {
    let mut failures = Vec::new();
    for endpoint in endpoints {
        match fetch(endpoint) {
            Ok(status) => {
                for f in &failures {
                    eprintln!("ramster: {f}; asked {endpoint} instead");
                }
                return Ok(status);
            }
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    match failures.len() {
        0 => bail!("no endpoint to ask"),
        1 => bail!("{}", failures[0]),
        _ => bail!("no endpoint answered: {}", failures.join("; ")),
    }
}

pub fn run_status(args: StatusArgs) -> anyhow::Result<()> {
    let status = fetch_first(&args.endpoint.list())?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        Output::Table => print!("{}", table(&status)),
    }
    Ok(())
}

/// Prints one line and exits 0 (HEALTH_OK), 3 (HEALTH_WARN), 4
/// (HEALTH_ERR), or 1 when no node answers as a node should.
pub fn run_health(args: HealthArgs) -> ExitCode {
    match fetch_first(&args.endpoint.list()) {
        Ok(status) => {
            println!("{}", health_line(&status));
            ExitCode::from(match status.health.status {
                HealthLevel::Ok => exit::OK,
                HealthLevel::Warn => exit::WARN,
                HealthLevel::Err => exit::ERR,
            })
        }
        Err(e) => {
            eprintln!("ramster health: {e:#}");
            ExitCode::from(exit::UNREACHABLE)
        }
    }
}

/// `HEALTH_OK`, or `HEALTH_WARN: reason; reason`.
pub fn health_line(status: &ClusterStatus) -> String {
    let h = &status.health;
    if h.reasons.is_empty() {
        h.status.as_str().to_string()
    } else {
        format!("{}: {}", h.status.as_str(), h.reasons.join("; "))
    }
}

/// A value as serde names it (`memory-server`, `draining`).
fn serde_name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "?".into(),
    }
}

fn or_dash(s: Option<String>) -> String {
    s.unwrap_or_else(|| "-".into())
}

/// The status as people read it: a header, then a row per node.
pub fn table(s: &ClusterStatus) -> String {
    let mut out = String::new();
    let field = |out: &mut String, k: &str, v: &str| out.push_str(&format!("{k:<8}{v}\n"));
    field(
        &mut out,
        "cluster",
        &format!("{} (answered by {})", s.cluster_id, s.answered_by),
    );
    field(&mut out, "health", s.health.status.as_str());
    for r in &s.health.reasons {
        field(&mut out, "", &format!("  {r}"));
    }
    field(
        &mut out,
        "nodes",
        &format!(
            "{} of {} up, {} memory server{}, leader {}",
            s.nodes_up,
            s.nodes_total,
            s.memory_servers,
            if s.memory_servers == 1 { "" } else { "s" },
            s.leader.as_deref().unwrap_or("-")
        ),
    );
    field(
        &mut out,
        "memory",
        &format!(
            "capacity {}, used {}, held for others {}, on peers {}",
            format_size(s.capacity_bytes),
            format_size(s.used_bytes),
            format_size(s.held_for_others_bytes),
            format_size(s.remote_bytes)
        ),
    );
    let degraded: u64 = s.nodes.iter().map(|n| n.degraded_pages).sum();
    let unrecoverable: u64 = s.nodes.iter().map(|n| n.unrecoverable_pages).sum();
    field(
        &mut out,
        "copies",
        &format!(
            "{} pages short of copies, {unrecoverable} with none left",
            degraded.saturating_sub(unrecoverable)
        ),
    );
    out.push('\n');
    let header = [
        "NAME",
        "ADDRESS",
        "ROLE",
        "STATE",
        "RAFT",
        "CAPACITY",
        "USED",
        "DONATE",
        "HELD",
        "ON PEERS",
        "RATIO",
        "RTT",
        "LAST SEEN",
        "VERSION",
    ];
    // Figures align right, words left.
    let right = [
        false, false, false, false, false, true, true, true, true, true, true, true, true, false,
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    rows.extend(s.nodes.iter().map(node_row));
    out.push_str(&layout(&rows, &right));
    out
}

fn node_row(n: &NodeStatus) -> Vec<String> {
    let mut state = serde_name(&n.state);
    if n.member_state == MemberState::Draining {
        state.push_str(if n.held_for_others_pages == 0 {
            ",drained"
        } else {
            ",draining"
        });
    }
    vec![
        n.name.clone(),
        if n.address.is_empty() {
            "-".into()
        } else {
            n.address.clone()
        },
        serde_name(&n.role),
        state,
        n.raft_role.clone(),
        format_size(n.capacity_bytes),
        format_size(n.used_bytes),
        format_size(n.donate_bytes),
        format_size(n.held_for_others_bytes),
        format_size(n.own_bytes_on_peers),
        if n.compression_ratio > 0.0 {
            format!("{:.2}", n.compression_ratio)
        } else {
            "-".into()
        },
        or_dash(n.rtt_us.map(|us| format!("{:.1} ms", us as f64 / 1000.0))),
        or_dash(
            n.last_seen_ms
                .map(|ms| format!("{:.1} s ago", ms as f64 / 1000.0)),
        ),
        n.version.clone(),
    ]
}

/// Columns padded to their widest cell, two spaces apart.
fn layout(rows: &[Vec<String>], right: &[bool]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .zip(right)
            .map(|((cell, &w), &right)| {
                if right {
                    format!("{cell:>w$}")
                } else {
                    format!("{cell:<w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::membership::Role;
    use crate::cluster::status::{Health, Liveness};

    fn status() -> ClusterStatus {
        let me = NodeStatus {
            name: "n1".into(),
            id: 1,
            address: "10.0.0.1:7800".into(),
            role: Role::Peer,
            member_state: MemberState::Active,
            state: Liveness::Up,
            raft_role: "leader".into(),
            incarnation: 1,
            capacity_bytes: 4 << 30,
            used_bytes: 1 << 30,
            donate_bytes: 1 << 30,
            held_for_others_bytes: 0,
            held_for_others_pages: 0,
            own_pages_on_peers: 0,
            own_bytes_on_peers: 0,
            stored_pages: 100,
            degraded_pages: 0,
            unrecoverable_pages: 0,
            compression_ratio: 2.345,
            rtt_us: None,
            last_seen_ms: None,
            version: "0.1.0".into(),
        };
        let mut ms = me.clone();
        ms.name = "memory-1".into();
        ms.role = Role::MemoryServer;
        ms.state = Liveness::Suspect;
        ms.member_state = MemberState::Draining;
        ms.held_for_others_pages = 1;
        ms.raft_role = "follower".into();
        ms.rtt_us = Some(420);
        ms.last_seen_ms = Some(2_100);
        let mut s = ClusterStatus::new(
            "c1".into(),
            "n1".into(),
            Some("n1".into()),
            Health::ok(),
            vec![me, ms],
        );
        s.assess();
        s
    }

    #[test]
    fn the_table_has_a_header_and_a_row_per_node() {
        let t = table(&status());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "cluster c1 (answered by n1)");
        assert_eq!(lines[1], "health  HEALTH_WARN");
        assert_eq!(
            lines[2],
            "          node memory-1 is suspect (last seen 2.1 s ago)"
        );
        assert_eq!(lines[3], "          node memory-1 is draining");
        assert_eq!(lines[4], "nodes   1 of 2 up, 1 memory server, leader n1");
        assert!(
            lines[5].starts_with("memory  capacity 8.0 GiB, used 2.0 GiB"),
            "{t}"
        );
        assert_eq!(
            lines[6],
            "copies  0 pages short of copies, 0 with none left"
        );
        let header = lines[8];
        assert!(header.starts_with("NAME      ADDRESS        ROLE"), "{t}");
        let row = lines[10];
        for cell in [
            "memory-1",
            "memory-server",
            "suspect,draining",
            "follower",
            "4.0 GiB",
            "2.35",
            "0.4 ms",
            "2.1 s ago",
        ] {
            assert!(row.contains(cell), "{cell} not in {row:?}");
        }
        // Columns line up: RAFT starts at the same place in every line.
        let at = header.find("RAFT").unwrap();
        assert_eq!(&lines[9][at..at + 6], "leader");
        assert_eq!(&row[at..at + 8], "follower");
        assert!(lines[9].contains(" - "), "no RTT for itself: {t}");
    }

    #[test]
    fn endpoints_come_from_the_list_then_the_single_variable_then_the_default() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            endpoints_or(&list(&["a:1", " b:2 ", ""]), Some("c:3".into())),
            list(&["a:1", "b:2"])
        );
        assert_eq!(
            endpoints_or(&[], Some("c:3, d:4".into())),
            list(&["c:3", "d:4"])
        );
        assert_eq!(
            endpoints_or(&[], Some(" ".into())),
            list(&[ADMIN_LISTEN_DEFAULT])
        );
        assert_eq!(endpoints_or(&[], None), list(&[ADMIN_LISTEN_DEFAULT]));
    }

    #[test]
    fn endpoints_is_a_list_and_endpoint_still_works() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cmd {
            #[command(flatten)]
            endpoint: Endpoint,
        }
        let parse = |argv: &[&str]| {
            Cmd::try_parse_from(std::iter::once("ramster").chain(argv.iter().copied()))
                .unwrap()
                .endpoint
                .endpoints
        };
        assert_eq!(parse(&["--endpoints", "a:1,b:2"]), ["a:1", "b:2"]);
        assert_eq!(parse(&["--endpoint", "a:1"]), ["a:1"]);
        assert_eq!(
            parse(&["--endpoint", "a:1", "--endpoints", "b:2"]),
            ["a:1", "b:2"]
        );
    }

    #[test]
    fn health_is_one_line() {
        let s = status();
        assert_eq!(
            health_line(&s),
            "HEALTH_WARN: node memory-1 is suspect (last seen 2.1 s ago); node memory-1 is draining"
        );
        let mut ok = s.clone();
        ok.nodes.truncate(1);
        ok.assess();
        assert_eq!(health_line(&ok), "HEALTH_OK");
    }
}
