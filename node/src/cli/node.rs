//! `ramster node`: runs a node until SIGINT or SIGTERM.
//!
//! Settings come from, lowest precedence first: built-in defaults, the TOML
//! file given by `--config`, `RAMSTER_*` environment variables, flags.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{ArgMatches, Args, FromArgMatches};
use serde::Deserialize;
use tokio::sync::watch;
use tracing::{info, warn};

pub use super::print_config::{CliSources, SettingSources, Source};
use super::size::{format_size, parse_size};
use super::values::{FileBool, parse_bool, parse_listen};
use crate::admin::{self, ADMIN_LISTEN_DEFAULT, AdminContext, Phase};
use crate::cluster::liveness::LivenessTimings;
use crate::cluster::membership::Role;
use crate::cluster::node::{ClusterNode, ClusterSettings, PeerAuth, parse_role};
use crate::cluster::owner::audit::AuditPace;
use crate::cluster::pressure;
use crate::cluster::stopping::{STOP_DRAIN_SECS_DEFAULT, StopDrain};
use crate::cluster::tls::{self, NodeIdentity, Replaced};
use crate::cluster::transport::TransportConfig;
use crate::cluster::watermarks::Watermarks;
use crate::frontend::nbd::{self, ExportSpec, Exports};
use crate::frontend::{Frontend, api};
use crate::metrics::NodeMetrics;
use crate::store::{PageStore, StoreConfig};

/// Where the NBD server listens when exports are given and no address is.
pub const NBD_LISTEN_DEFAULT: &str = "127.0.0.1:10809";
/// How often export counters are logged (when they changed).
pub const EXPORT_STATS_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// The largest config file read (a config is a few lines).
const CONFIG_BYTES_MAX: u64 = 1 << 20;
/// `--max-udp-payload` bounds: QUIC needs 1200 bytes, UDP carries at most
/// 65527.
const MAX_UDP_PAYLOAD_MIN: u16 = 1200;
const MAX_UDP_PAYLOAD_MAX: u16 = 65_527;

/// Where the peer transport (QUIC) listens when only `--join` is given.
pub const PEER_LISTEN_DEFAULT: &str = "0.0.0.0:7800";
/// Donors per remotified page.
pub const REPLICAS_DEFAULT: usize = 2;
/// With `--capacity auto`, the share of the cgroup memory limit given to
/// pages (the node's own and those it holds for peers); the rest is the
/// process's own (runtime, connections, batch buffers). A peer splits it
/// evenly between its store and its donation, a memory server donates all
/// of it, a client and a standalone node keep all of it.
pub const AUTO_MEMORY_FRACTION: f64 = 0.8;
/// The node's persistent identity in its data dir.
const IDENTITY_FILE: &str = "identity.json";

#[derive(Args, Debug, Default)]
pub struct NodeArgs {
    /// TOML file with the node's settings (keys as the flags: name,
    /// data-dir, capacity, api-socket, nbd-listen, nbd-export = [...], mlock,
    /// admin-listen, ...) [default: none].
    #[arg(long, env = "RAMSTER_CONFIG", help_heading = "Node")]
    pub config: Option<PathBuf>,
    /// Print the settings the node would run with and where each came
    /// from (default, file, environment, flag), then exit.
    #[arg(long, help_heading = "Node")]
    pub print_config: bool,
    /// This node's name, unique in the cluster [required].
    #[arg(long, env = "RAMSTER_NAME", help_heading = "Node")]
    pub name: Option<String>,
    /// Where the node keeps its state (identity, sockets, NBD backing
    /// files) [required].
    #[arg(long, env = "RAMSTER_DATA_DIR", help_heading = "Node")]
    pub data_dir: Option<PathBuf>,
    /// Lock all of the node's memory (mlockall), so that a host swapping
    /// into this node never has the node's own pages swapped out
    /// [default: false].
    #[arg(long, env = "RAMSTER_MLOCK", num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", value_parser = parse_bool, help_heading = "Node")]
    pub mlock: Option<bool>,
    /// Most memory the page store may hold (e.g. 512MiB, 4GiB), or `auto`:
    /// 80% of the cgroup memory limit (v2 memory.max or v1
    /// memory.limit_in_bytes), shared with the donation on a peer
    /// [default: auto].
    #[arg(long, env = "RAMSTER_CAPACITY", value_parser = parse_capacity, help_heading = "Store")]
    pub capacity: Option<Capacity>,
    /// Unix socket of the native API [default: DATA_DIR/api.sock].
    #[arg(long, env = "RAMSTER_API_SOCKET", help_heading = "Front ends")]
    pub api_socket: Option<PathBuf>,
    /// Address of the NBD server, HOST:PORT [default: 127.0.0.1:10809 when
    /// an export is given].
    #[arg(long, env = "RAMSTER_NBD_LISTEN", value_parser = parse_listen, help_heading = "Front ends")]
    pub nbd_listen: Option<SocketAddr>,
    /// An NBD export, NAME:SIZE[:BACKING_PATH] (repeatable; comma-separated
    /// in the environment). The backing file defaults to DATA_DIR/nbd/NAME.swap
    /// and is truncated at start: exports start empty [default: none].
    #[arg(
        long = "nbd-export",
        env = "RAMSTER_NBD_EXPORT",
        value_delimiter = ',',
        help_heading = "Front ends"
    )]
    pub nbd_exports: Vec<ExportSpec>,
    /// Threads serving each NBD connection, taking turns at reading; more
    /// make one request in flight faster on a multi-core host, each costs
    /// an idle thread's stack [default: 32].
    #[arg(long, env = "RAMSTER_NBD_THREADS", value_parser = parse_nbd_threads, help_heading = "Front ends")]
    pub nbd_threads: Option<usize>,
    /// Microseconds an NBD connection's reading thread polls its socket for
    /// the next request before it sleeps, 0 to 1000; it spends up to that
    /// much of a core after each reply to answer the next request sooner.
    /// 0 never polls [default: 50].
    #[arg(long, env = "RAMSTER_NBD_POLL_US", value_parser = parse_poll_us, help_heading = "Front ends")]
    pub nbd_poll_us: Option<u64>,
    /// Where peers reach this node (QUIC, UDP), HOST:PORT [default:
    /// 0.0.0.0:7800 when --join is given]. Giving it makes the node a
    /// cluster member.
    #[arg(long, env = "RAMSTER_LISTEN", value_parser = parse_listen, help_heading = "Cluster")]
    pub listen: Option<SocketAddr>,
    /// The HOST:PORT peers are told to use [default: the listen address,
    /// or this host's name with its port when listening on 0.0.0.0].
    #[arg(long, env = "RAMSTER_ADVERTISE", help_heading = "Cluster")]
    pub advertise: Option<String>,
    /// Seed nodes, HOST:PORT,... (the same list on every node). The first
    /// seed forms the cluster when no seed knows one; everyone else joins
    /// [default: none, a standalone node].
    #[arg(
        long,
        env = "RAMSTER_JOIN",
        value_delimiter = ',',
        help_heading = "Cluster"
    )]
    pub join: Vec<String>,
    /// Directory with ca.crt, node.crt and node.key (`ramster cert`)
    /// [default: DATA_DIR/certs].
    #[arg(long, env = "RAMSTER_CERTS_DIR", help_heading = "Cluster")]
    pub certs_dir: Option<PathBuf>,
    /// Peers are NOT authenticated (encrypted only). For a laptop demo
    /// [default: false].
    #[arg(long, env = "RAMSTER_INSECURE", num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", value_parser = parse_bool, help_heading = "Cluster")]
    pub insecure: Option<bool>,
    /// peer (uses and donates), memory-server (donates its whole capacity,
    /// serves no local clients) or client (never donates) [default: peer].
    #[arg(long, env = "RAMSTER_ROLE", value_parser = parse_role_arg, help_heading = "Cluster")]
    pub role: Option<Role>,
    /// Most memory held for other nodes' pages [default: the capacity;
    /// 0 for a client].
    #[arg(long, env = "RAMSTER_DONATE", value_parser = parse_size, help_heading = "Cluster")]
    pub donate: Option<u64>,
    /// Failure-domain label; replicas go to distinct zones [default: none].
    #[arg(long, env = "RAMSTER_ZONE", help_heading = "Cluster")]
    pub zone: Option<String>,
    /// Donors holding each remotified page (1..=3) [default: 2].
    #[arg(long, env = "RAMSTER_REPLICAS", help_heading = "Cluster")]
    pub replicas: Option<usize>,
    /// Seconds a donor stays down before its copies are re-created on
    /// other donors; one back within them keeps its copies [default: 10].
    #[arg(long, env = "RAMSTER_OUT_AFTER", value_parser = parse_out_after, help_heading = "Cluster")]
    pub out_after: Option<u64>,
    /// Seconds between two audits of what donors hold for this node (a
    /// walk over every donor; copies no page names are released)
    /// [default: 60].
    #[arg(long, env = "RAMSTER_AUDIT_EVERY", value_parser = parse_audit_every, help_heading = "Cluster")]
    pub audit_every: Option<u64>,
    /// Seconds a node asked to stop (SIGTERM) waits for owners to move the
    /// copies it holds for them to other donors before it stops; 0 stops
    /// at once [default: 60].
    #[arg(long, env = "RAMSTER_STOP_DRAIN", value_parser = parse_stop_drain, help_heading = "Cluster")]
    pub stop_drain: Option<u64>,
    /// Remotify starts above this fraction of capacity and stops at the
    /// second: START,STOP [default: 0.85,0.75].
    #[arg(long, env = "RAMSTER_REMOTIFY_WATERMARKS", value_parser = parse_pair, help_heading = "Watermarks")]
    pub remotify_watermarks: Option<(f64, f64)>,
    /// Suction starts below this fraction and stops at the second:
    /// START,STOP [default: 0.60,0.70].
    #[arg(long, env = "RAMSTER_SUCTION_WATERMARKS", value_parser = parse_pair, help_heading = "Watermarks")]
    pub suction_watermarks: Option<(f64, f64)>,
    /// Largest UDP payload this node takes from peers, and the most its
    /// path-MTU discovery probes for (1200..=65527) [default: 6550, the
    /// most with which GSO batches fit a UDP send; discovery settles lower
    /// by itself on a 1500-byte path]. Above 6550 (8952 for jumbo frames,
    /// say), GSO is off.
    #[arg(long, env = "RAMSTER_MAX_UDP_PAYLOAD", help_heading = "Transport")]
    pub max_udp_payload: Option<u16>,
    /// UDP segmentation offload (GSO) for peer traffic; `--gso false` for
    /// virtual NICs or kernels that drop GSO batches [default: true].
    #[arg(long, env = "RAMSTER_GSO", num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", value_parser = parse_bool, help_heading = "Transport")]
    pub gso: Option<bool>,
    /// Microseconds the transport thread, which serves API clients on a
    /// cluster node, keeps polling after a client's request (for the
    /// donors' answers and the client's next request) before it sleeps, 0
    /// to 1000; it spends up to that much of a core after each request to
    /// answer sooner. 0 never polls [default: 200].
    #[arg(long, env = "RAMSTER_POLL_US", value_parser = parse_poll_us, help_heading = "Transport")]
    pub poll_us: Option<u64>,
    /// Address of the admin endpoint (/metrics, /health/live,
    /// /health/ready, /v1/status), HOST:PORT, or `off` [default:
    /// 127.0.0.1:7801].
    #[arg(long, env = "RAMSTER_ADMIN_LISTEN", help_heading = "Admin")]
    pub admin_listen: Option<AdminListen>,
    /// Which of the fields above the environment or the command line set,
    /// by config key; filled by [`NodeArgs::from_matches`].
    #[arg(skip)]
    pub given: CliSources,
}

/// Where the admin endpoint listens: an address, or `off`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct AdminListen(pub Option<SocketAddr>);

impl FromStr for AdminListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().eq_ignore_ascii_case("off") {
            return Ok(AdminListen(None));
        }
        parse_listen(s)
            .map(|a| AdminListen(Some(a)))
            .map_err(|e| format!("{e}, or `off`"))
    }
}

/// A capacity as given: bytes, or sized from the cgroup limit.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Capacity {
    Bytes(u64),
    Auto,
}

fn parse_capacity(s: &str) -> Result<Capacity, String> {
    if s.trim().eq_ignore_ascii_case("auto") {
        Ok(Capacity::Auto)
    } else {
        parse_size(s).map(Capacity::Bytes)
    }
}

/// The store capacity `--capacity auto` picks under a cgroup memory limit
/// of `limit` bytes; `role` is `None` for a standalone node, `donate` the
/// donation when one is given.
pub fn auto_capacity(
    limit: Option<u64>,
    role: Option<Role>,
    donate: Option<u64>,
) -> anyhow::Result<u64> {
    let Some(limit) = limit else {
        bail!(
            "no --capacity, and no cgroup memory limit to size it from: give --capacity SIZE \
             (or `capacity` in the config file, or RAMSTER_CAPACITY), or run under a memory limit"
        );
    };
    let pages = (limit as f64 * AUTO_MEMORY_FRACTION) as u64;
    let capacity = match (role, donate) {
        (Some(Role::Peer), Some(d)) => {
            pages.checked_sub(d).filter(|&c| c > 0).ok_or_else(|| {
                anyhow::anyhow!(
                    "--donate {} leaves nothing of the {} that --capacity auto sizes from the \
                 cgroup limit {}: donate less or give --capacity",
                    format_size(d),
                    format_size(pages),
                    format_size(limit)
                )
            })?
        }
        (Some(Role::Peer), None) => pages / 2,
        _ => pages,
    };
    Ok(capacity)
}

/// A whole number from a flag or the environment.
fn parse_number<T: FromStr>(s: &str) -> Result<T, String> {
    s.trim()
        .parse::<T>()
        .map_err(|_| format!("{s:?} is not a number"))
}

/// Threads per NBD connection, from a flag or the environment.
fn parse_nbd_threads(s: &str) -> Result<usize, String> {
    parse_number(s).and_then(nbd_threads_in_range)
}

fn nbd_threads_in_range(n: usize) -> Result<usize, String> {
    let max = nbd::server::THREADS_PER_CONNECTION_MAX;
    if (1..=max).contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "{n}: threads per NBD connection is a number from 1 to {max}"
        ))
    }
}

/// The longest out-after: a day. Past it, a lost donor would leave pages
/// with one copy for longer than anyone would want.
const OUT_AFTER_SECS_MAX: u64 = 86_400;

fn parse_out_after(s: &str) -> Result<u64, String> {
    parse_number(s).and_then(out_after_in_range)
}

fn parse_stop_drain(s: &str) -> Result<u64, String> {
    parse_number(s).and_then(stop_drain_in_range)
}

/// The longest stop drain: an hour, past any orchestrator's grace period.
const STOP_DRAIN_SECS_MAX: u64 = 3_600;

fn stop_drain_in_range(secs: u64) -> Result<u64, String> {
    if secs > STOP_DRAIN_SECS_MAX {
        return Err(format!(
            "{secs} seconds: at most {STOP_DRAIN_SECS_MAX} (0 stops without draining)"
        ));
    }
    Ok(secs)
}

fn parse_audit_every(s: &str) -> Result<u64, String> {
    parse_number(s).and_then(audit_every_in_range)
}

/// An audit at least every day: garbage and tombstones must not wait longer.
const AUDIT_EVERY_SECS_MAX: u64 = 86_400;

fn audit_every_in_range(secs: u64) -> Result<u64, String> {
    if !(1..=AUDIT_EVERY_SECS_MAX).contains(&secs) {
        return Err(format!(
            "{secs} seconds: must be 1..={AUDIT_EVERY_SECS_MAX}"
        ));
    }
    Ok(secs)
}

/// A setting from the flag (checked by its parser) or else from the file,
/// checked here with the same rule and named by its TOML key.
fn flag_or_checked_file(
    flag: Option<u64>,
    file: Option<u64>,
    key: &str,
    check: fn(u64) -> Result<u64, String>,
) -> anyhow::Result<Option<u64>> {
    match (flag, file) {
        (Some(v), _) => Ok(Some(v)),
        (None, Some(v)) => Ok(Some(
            check(v).map_err(|e| anyhow::anyhow!("config `{key}`: {e}"))?,
        )),
        (None, None) => Ok(None),
    }
}

fn out_after_in_range(secs: u64) -> Result<u64, String> {
    if secs > OUT_AFTER_SECS_MAX {
        return Err(format!(
            "{secs} seconds: at most {OUT_AFTER_SECS_MAX} (0 repairs as soon as a donor is down)"
        ));
    }
    Ok(secs)
}

fn parse_poll_us(s: &str) -> Result<u64, String> {
    parse_number(s).and_then(poll_us_in_range)
}

fn poll_us_in_range(us: u64) -> Result<u64, String> {
    let max = crate::poll::WINDOW_MAX.as_micros() as u64;
    if us <= max {
        Ok(us)
    } else {
        Err(format!(
            "{us}: a poll window is a number of microseconds from 0 to {max}"
        ))
    }
}

fn parse_role_arg(s: &str) -> Result<Role, String> {
    parse_role(s).ok_or_else(|| format!("unknown role {s:?} (peer, memory-server, client)"))
}

fn parse_pair(s: &str) -> Result<(f64, f64), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("{s:?}: expected START,STOP (e.g. 0.85,0.75)"))?;
    let f = |x: &str| {
        x.trim()
            .parse::<f64>()
            .map_err(|_| format!("{x:?} is not a fraction"))
    };
    Ok((f(a)?, f(b)?))
}

/// A size in a config file: `"4GiB"` or a number of bytes.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

/// The TOML config file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ConfigFile {
    name: Option<String>,
    data_dir: Option<PathBuf>,
    capacity: Option<SizeValue>,
    api_socket: Option<PathBuf>,
    nbd_listen: Option<String>,
    #[serde(default)]
    nbd_export: Vec<String>,
    nbd_threads: Option<usize>,
    nbd_poll_us: Option<u64>,
    mlock: Option<FileBool>,
    listen: Option<String>,
    advertise: Option<String>,
    #[serde(default)]
    join: Vec<String>,
    certs_dir: Option<PathBuf>,
    insecure: Option<FileBool>,
    role: Option<String>,
    donate: Option<SizeValue>,
    zone: Option<String>,
    replicas: Option<usize>,
    out_after: Option<u64>,
    audit_every: Option<u64>,
    stop_drain: Option<u64>,
    remotify_watermarks: Option<[f64; 2]>,
    suction_watermarks: Option<[f64; 2]>,
    max_udp_payload: Option<u16>,
    gso: Option<FileBool>,
    poll_us: Option<u64>,
    admin_listen: Option<String>,
}

impl SizeValue {
    fn bytes(&self, key: &str) -> anyhow::Result<u64> {
        match self {
            SizeValue::Bytes(b) => Ok(*b),
            SizeValue::Text(t) => parse_size(t).map_err(|e| anyhow::anyhow!("config `{key}`: {e}")),
        }
    }
}

/// A node's cluster settings once merged.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterArgs {
    pub listen: SocketAddr,
    pub advertise: String,
    pub join: Vec<String>,
    pub certs_dir: PathBuf,
    pub insecure: bool,
    pub role: Role,
    pub donate: u64,
    pub zone: Option<String>,
    pub replicas: usize,
    pub watermarks: Watermarks,
    pub liveness: LivenessTimings,
    pub audit: AuditPace,
    /// How long a stopping node drains first ([`crate::cluster::stopping`]).
    pub stop_drain: Duration,
    pub transport: TransportConfig,
}

/// The node's settings once every source is merged.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSettings {
    pub name: String,
    pub data_dir: PathBuf,
    pub capacity: u64,
    pub api_socket: PathBuf,
    /// `Some` when there are exports to serve.
    pub nbd_listen: Option<SocketAddr>,
    pub nbd_exports: Vec<ExportSpec>,
    /// How each NBD connection is served.
    pub nbd: nbd::server::ServeOptions,
    pub mlock: bool,
    /// `Some` when the node is a cluster member (`--listen` or `--join`).
    pub cluster: Option<ClusterArgs>,
    /// `None` when the admin endpoint is off.
    pub admin_listen: Option<SocketAddr>,
}

/// The config file, and the keys it sets (for `--print-config`).
fn read_config(path: &Path) -> anyhow::Result<(ConfigFile, BTreeSet<String>)> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading config {}", path.display()))?
        .len();
    if len > CONFIG_BYTES_MAX {
        bail!(
            "config {} is {len} bytes; at most {CONFIG_BYTES_MAX}",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    let file: ConfigFile =
        toml::from_str(&text).with_context(|| format!("config {}", path.display()))?;
    let keys = toml::from_str::<toml::Table>(&text)
        .with_context(|| format!("config {}", path.display()))?
        .keys()
        .cloned()
        .collect();
    Ok((file, keys))
}

/// A listen address from the config file, named by its key when it is
/// not one.
fn file_listen(text: Option<String>, key: &str) -> anyhow::Result<Option<SocketAddr>> {
    text.map(|t| parse_listen(&t).map_err(|e| anyhow::anyhow!("config `{key}`: {e}")))
        .transpose()
}

impl NodeArgs {
    /// The `node` subcommand's arguments from its matches, noting which
    /// settings the environment and the command line gave.
    pub fn from_matches(m: &ArgMatches) -> Result<NodeArgs, clap::Error> {
        let mut args = <NodeArgs as FromArgMatches>::from_arg_matches(m)?;
        args.given = CliSources::of(m);
        Ok(args)
    }

    /// Merges flags and environment (already in `self`, flags winning, as
    /// clap does) over the config file over defaults.
    pub fn settings(self) -> anyhow::Result<NodeSettings> {
        self.settings_and_sources().map(|(s, _)| s)
    }

    /// The merged settings and where each came from.
    pub fn settings_and_sources(mut self) -> anyhow::Result<(NodeSettings, SettingSources)> {
        let (file, file_keys) = match &self.config {
            Some(path) => read_config(path)?,
            None => Default::default(),
        };
        let mut origin = SettingSources {
            config: self.config.clone(),
            given: std::mem::take(&mut self.given),
            file_keys,
            capacity_auto: false,
        };
        let missing = |flag: &str, key: &str, env: &str| {
            anyhow::anyhow!("--{flag} is required (or `{key}` in the config file, or {env})")
        };
        let name = self
            .name
            .or(file.name)
            .ok_or_else(|| missing("name", "name", "RAMSTER_NAME"))?;
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .ok_or_else(|| missing("data-dir", "data-dir", "RAMSTER_DATA_DIR"))?;
        let capacity = match (self.capacity, &file.capacity) {
            (Some(c), _) => c,
            (None, Some(SizeValue::Text(t))) if t.trim().eq_ignore_ascii_case("auto") => {
                Capacity::Auto
            }
            (None, Some(v)) => Capacity::Bytes(v.bytes("capacity")?),
            (None, None) => Capacity::Auto,
        };
        origin.capacity_auto = capacity == Capacity::Auto;
        let sources = ClusterSources {
            listen: match self.listen {
                Some(a) => Some(a),
                None => file_listen(file.listen, "listen")?,
            },
            advertise: self.advertise.or(file.advertise),
            join: if self.join.is_empty() {
                file.join
            } else {
                self.join
            },
            certs_dir: self.certs_dir.or(file.certs_dir),
            insecure: self.insecure.or(file.insecure.map(|b| b.0)),
            role: match (self.role, file.role) {
                (Some(r), _) => Some(r),
                (None, Some(r)) => {
                    Some(parse_role_arg(&r).map_err(|e| anyhow::anyhow!("config `role`: {e}"))?)
                }
                (None, None) => None,
            },
            donate: match (self.donate, &file.donate) {
                (Some(d), _) => Some(d),
                (None, Some(v)) => Some(v.bytes("donate")?),
                (None, None) => None,
            },
            zone: self.zone.or(file.zone),
            replicas: self.replicas.or(file.replicas),
            out_after: flag_or_checked_file(
                self.out_after,
                file.out_after,
                "out-after",
                out_after_in_range,
            )?,
            audit_every: flag_or_checked_file(
                self.audit_every,
                file.audit_every,
                "audit-every",
                audit_every_in_range,
            )?,
            stop_drain: flag_or_checked_file(
                self.stop_drain,
                file.stop_drain,
                "stop-drain",
                stop_drain_in_range,
            )?,
            remotify: self
                .remotify_watermarks
                .or(file.remotify_watermarks.map(|[a, b]| (a, b))),
            suction: self
                .suction_watermarks
                .or(file.suction_watermarks.map(|[a, b]| (a, b))),
            max_udp_payload: self.max_udp_payload.or(file.max_udp_payload),
            gso: self.gso.or(file.gso.map(|b| b.0)),
            poll_us: match (self.poll_us, file.poll_us) {
                (Some(us), _) => Some(us),
                (None, Some(us)) => Some(
                    poll_us_in_range(us).map_err(|e| anyhow::anyhow!("config `poll-us`: {e}"))?,
                ),
                (None, None) => None,
            },
        };
        let capacity = match capacity {
            Capacity::Bytes(b) => b,
            Capacity::Auto => {
                let limit = pressure::read_host(Path::new("/")).cgroup_limit_bytes;
                let role = sources
                    .is_cluster()
                    .then(|| sources.role.unwrap_or_default());
                let c = auto_capacity(limit, role, sources.donate)?;
                info!(
                    cgroup_limit = %format_size(limit.unwrap_or_default()),
                    capacity = %format_size(c),
                    "capacity sized from the cgroup memory limit"
                );
                c
            }
        };
        let cluster = cluster_args(sources, &data_dir, capacity)?;
        if cluster
            .as_ref()
            .is_some_and(|c| c.role == Role::MemoryServer)
            && !self.nbd_exports.is_empty()
        {
            bail!("a memory server serves no local clients: drop --nbd-export");
        }
        let api_socket = self
            .api_socket
            .or(file.api_socket)
            .unwrap_or_else(|| data_dir.join("api.sock"));
        let nbd_exports = if self.nbd_exports.is_empty() {
            file.nbd_export
                .iter()
                .map(|s| {
                    s.parse::<ExportSpec>()
                        .map_err(|e| anyhow::anyhow!("config `nbd-export`: {e}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?
        } else {
            self.nbd_exports
        };
        let nbd_listen = match self.nbd_listen {
            Some(a) => Some(a),
            None => file_listen(file.nbd_listen, "nbd-listen")?,
        };
        let nbd_listen = match nbd_listen {
            Some(addr) if nbd_exports.is_empty() => {
                bail!("--nbd-listen {addr} given but no --nbd-export to serve")
            }
            Some(addr) => Some(addr),
            None if nbd_exports.is_empty() => None,
            None => Some(NBD_LISTEN_DEFAULT.parse().expect("valid default")),
        };
        let nbd_threads = match (self.nbd_threads, file.nbd_threads) {
            (Some(n), _) => n,
            (None, Some(n)) => {
                nbd_threads_in_range(n).map_err(|e| anyhow::anyhow!("config `nbd-threads`: {e}"))?
            }
            (None, None) => nbd::server::THREADS_PER_CONNECTION,
        };
        let nbd_poll = match (self.nbd_poll_us, file.nbd_poll_us) {
            (Some(us), _) => Duration::from_micros(us),
            (None, Some(us)) => Duration::from_micros(
                poll_us_in_range(us).map_err(|e| anyhow::anyhow!("config `nbd-poll-us`: {e}"))?,
            ),
            (None, None) => nbd::server::POLL_DEFAULT,
        };
        let admin_listen = match (self.admin_listen, file.admin_listen) {
            (Some(a), _) => a,
            (None, Some(text)) => text
                .parse()
                .map_err(|e| anyhow::anyhow!("config `admin-listen`: {e}"))?,
            (None, None) => ADMIN_LISTEN_DEFAULT.parse().expect("valid default"),
        };
        let settings = NodeSettings {
            name,
            data_dir,
            capacity,
            api_socket,
            nbd_listen,
            nbd_exports,
            nbd: nbd::server::ServeOptions {
                threads: nbd_threads,
                poll: nbd_poll,
            },
            mlock: self.mlock.or(file.mlock.map(|b| b.0)).unwrap_or(false),
            cluster,
            admin_listen: admin_listen.0,
        };
        Ok((settings, origin))
    }
}

/// The cluster settings from flags, environment and file (already merged
/// key by key).
struct ClusterSources {
    listen: Option<SocketAddr>,
    advertise: Option<String>,
    join: Vec<String>,
    certs_dir: Option<PathBuf>,
    insecure: Option<bool>,
    role: Option<Role>,
    donate: Option<u64>,
    zone: Option<String>,
    replicas: Option<usize>,
    out_after: Option<u64>,
    audit_every: Option<u64>,
    stop_drain: Option<u64>,
    remotify: Option<(f64, f64)>,
    suction: Option<(f64, f64)>,
    max_udp_payload: Option<u16>,
    gso: Option<bool>,
    poll_us: Option<u64>,
}

impl ClusterSources {
    /// Whether these settings make the node a cluster member.
    fn is_cluster(&self) -> bool {
        self.listen.is_some() || !self.join.is_empty()
    }
}

fn cluster_args(
    c: ClusterSources,
    data_dir: &Path,
    capacity: u64,
) -> anyhow::Result<Option<ClusterArgs>> {
    if !c.is_cluster() {
        if c.advertise.is_some() || c.role.is_some() || c.donate.is_some() {
            bail!("--advertise, --role and --donate need --listen or --join (a cluster)");
        }
        return Ok(None);
    }
    let listen = c
        .listen
        .unwrap_or_else(|| PEER_LISTEN_DEFAULT.parse().expect("valid default"));
    let advertise = match c.advertise {
        Some(a) => a,
        None if listen.ip().is_unspecified() => {
            let host = hostname().ok_or_else(|| {
                anyhow::anyhow!("--advertise is required when listening on {listen}")
            })?;
            format!("{host}:{}", listen.port())
        }
        None => listen.to_string(),
    };
    for a in std::iter::once(&advertise).chain(&c.join) {
        if a.rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            bail!("{a:?} is not HOST:PORT");
        }
    }
    let role = c.role.unwrap_or_default();
    let donate = match (role, c.donate) {
        (Role::Client, Some(d)) if d > 0 => bail!("a client never donates: drop --donate"),
        (Role::Client, _) => 0,
        (_, Some(d)) => d,
        (_, None) => capacity,
    };
    let replicas = c.replicas.unwrap_or(REPLICAS_DEFAULT);
    if !(1..=crate::store::REPLICAS_MAX).contains(&replicas) {
        bail!(
            "--replicas {replicas}: must be 1..={}",
            crate::store::REPLICAS_MAX
        );
    }
    let mut liveness = LivenessTimings::default();
    if let Some(secs) = c.out_after {
        liveness.out_after = Duration::from_secs(secs);
    }
    let mut audit = AuditPace::NODE;
    if let Some(secs) = c.audit_every {
        audit.pass_every = Duration::from_secs(secs);
    }
    let d = Watermarks::default();
    let (remotify_start, remotify_stop) = c.remotify.unwrap_or((d.remotify_start, d.remotify_stop));
    let (suction_start, suction_stop) = c.suction.unwrap_or((d.suction_start, d.suction_stop));
    let watermarks = Watermarks {
        remotify_start,
        remotify_stop,
        suction_start,
        suction_stop,
    }
    .validate()?;
    let mut transport = TransportConfig::default();
    if let Some(bytes) = c.max_udp_payload {
        if !(MAX_UDP_PAYLOAD_MIN..=MAX_UDP_PAYLOAD_MAX).contains(&bytes) {
            bail!(
                "--max-udp-payload {bytes}: must be {MAX_UDP_PAYLOAD_MIN}..={MAX_UDP_PAYLOAD_MAX} (QUIC's floor, UDP's ceiling)"
            );
        }
        transport.mtu_upper_bound = bytes;
    }
    if let Some(gso) = c.gso {
        transport.segmentation_offload = gso;
    }
    if let Some(us) = c.poll_us {
        transport.poll_window = Duration::from_micros(us);
    }
    Ok(Some(ClusterArgs {
        listen,
        advertise,
        join: c.join,
        certs_dir: c.certs_dir.unwrap_or_else(|| data_dir.join("certs")),
        insecure: c.insecure.unwrap_or(false),
        role,
        donate,
        zone: c.zone,
        replicas,
        watermarks,
        liveness,
        audit,
        stop_drain: Duration::from_secs(c.stop_drain.unwrap_or(STOP_DRAIN_SECS_DEFAULT)),
        transport,
    }))
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// The node's id, kept in the data dir so a restart is the same node.
#[derive(serde::Serialize, Deserialize)]
struct Identity {
    name: String,
    id: u64,
}

fn load_or_create_identity(data_dir: &Path, name: &str) -> anyhow::Result<u64> {
    let path = data_dir.join(IDENTITY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id: Identity = serde_json::from_str(&text)
                .with_context(|| format!("reading {}", path.display()))?;
            if id.name != name {
                bail!(
                    "{} belongs to node {:?}, not {name:?}: use that name or another data dir",
                    data_dir.display(),
                    id.name
                );
            }
            Ok(id.id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Ids go into page descriptors as 32 bits; 0 is never used.
            let id = u64::from(rand::random::<u32>().max(1));
            let tmp = path.with_extension("tmp");
            std::fs::write(
                &tmp,
                serde_json::to_vec_pretty(&Identity {
                    name: name.into(),
                    id,
                })?,
            )
            .with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Locks every page the process has and will have in RAM.
fn lock_memory() -> anyhow::Result<()> {
    // SAFETY: mlockall takes flags only and touches no memory of ours.
    let rc = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        bail!(
            "--mlock: mlockall failed: {e}. Raise the locked-memory limit \
             (ulimit -l unlimited, or LimitMEMLOCK=infinity in a systemd unit) \
             or run with CAP_IPC_LOCK"
        );
    }
    Ok(())
}

pub fn run(args: NodeArgs) -> anyhow::Result<()> {
    if args.print_config {
        // No logging: the output is the settings alone, and the merge's
        // one log line (an auto capacity) is said in the output instead.
        let (s, sources) = args.settings_and_sources()?;
        print!("{}", super::print_config::render(&s, &sources));
        return Ok(());
    }
    init_logging();
    let s = args.settings()?;
    if s.mlock {
        lock_memory()?;
    }
    crate::private_dir(&s.data_dir)
        .with_context(|| format!("creating data dir {}", s.data_dir.display()))?;
    let memory_server = s
        .cluster
        .as_ref()
        .is_some_and(|c| c.role == Role::MemoryServer);
    // A memory server's capacity is all donated: its own store stays empty.
    let store_capacity = if memory_server { 0 } else { s.capacity };
    let store = Arc::new(PageStore::new(StoreConfig::with_capacity(store_capacity)));
    let metrics = Arc::new(NodeMetrics::default());
    let frontend = Arc::new(Frontend::new(s.name.clone(), store.clone()));
    let identity = match &s.cluster {
        Some(c) if !c.insecure => Some(
            NodeIdentity::load(&c.certs_dir)
                .and_then(|i| i.check(&s.name).map(|()| i))
                .with_context(|| {
                    format!(
                        "certificates in {} (make them with `ramster cert`, or run with --insecure)",
                        c.certs_dir.display()
                    )
                })?,
        ),
        _ => None,
    };
    let node_id = match &s.cluster {
        Some(_) => load_or_create_identity(&s.data_dir, &s.name)?,
        None => 0,
    };
    let exports = Arc::new(Exports::open(
        &s.nbd_exports,
        frontend.clone(),
        &s.data_dir,
    )?);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let (stop_tx, stop_rx) = watch::channel(false);
        let cluster = match s.cluster.clone() {
            Some(c) => {
                let node = ClusterNode::start(
                    ClusterSettings {
                        name: s.name.clone(),
                        id: node_id,
                        raft_dir: s.data_dir.join("raft"),
                        listen: c.listen,
                        advertise: c.advertise.clone(),
                        seeds: c.join.clone(),
                        auth: match identity {
                            Some(i) => PeerAuth::Mutual(i),
                            None => PeerAuth::Insecure,
                        },
                        role: c.role,
                        donate_bytes: if memory_server { s.capacity } else { c.donate },
                        zone: c.zone.clone(),
                        replicas: c.replicas,
                        watermarks: c.watermarks,
                        liveness: c.liveness,
                        audit: c.audit,
                        transport: c.transport.clone(),
                    },
                    store.clone(),
                    metrics.clone(),
                    stop_rx.clone(),
                )
                .await?;
                frontend.set_remote(Arc::new(node.clone()));
                tokio::spawn(
                    node.clone()
                        .activate_after_stop_drain(s.data_dir.clone(), stop_rx.clone()),
                );
                if !c.insecure {
                    tokio::spawn(reload_certificates(
                        node.clone(),
                        c.certs_dir.clone(),
                        stop_rx.clone(),
                    ));
                }
                Some(node)
            }
            None => None,
        };
        let admin_ctx = Arc::new(AdminContext::new(
            frontend.clone(),
            metrics.clone(),
            exports.clone(),
            cluster.clone().map(|c| Arc::new(c) as Arc<dyn admin::ClusterView>),
        ));
        // The admin endpoint first and stopped last, with a signal of its
        // own: probes see the node start and stop (live, not ready).
        let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
        let mut admin_server = None;
        if let Some(addr) = s.admin_listen {
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("binding the admin endpoint {addr} (--admin-listen picks another address, or off)")
            })?;
            admin_server = Some(tokio::spawn(admin::serve(
                listener,
                admin_ctx.clone(),
                admin_stop_rx,
            )));
        }
        // NBD first: once the API socket answers, the node serves everything.
        let mut nbd_server = None;
        if let Some(addr) = s.nbd_listen {
            let listener = nbd::server::bind(addr)
                .await
                .with_context(|| format!("binding the NBD listener {addr}"))?;
            if !addr.ip().is_loopback() {
                warn!(%addr, "NBD is served beyond loopback: NBD has no authentication");
            }
            for e in exports.iter() {
                info!(
                    export = %e.name(),
                    size = %format_size(e.size_bytes()),
                    area = e.area(),
                    backing = %e.backing_path().display(),
                    "nbd export"
                );
            }
            nbd_server = Some(tokio::spawn(nbd::server::serve(
                listener,
                exports.clone(),
                s.nbd,
                stop_rx.clone(),
            )));
            tokio::spawn(log_export_stats(exports.clone(), stop_rx.clone()));
        }
        tokio::spawn(keep_latencies(metrics.clone(), stop_rx.clone()));
        // A memory server serves no local clients.
        let server = if memory_server {
            None
        } else {
            let listener = api::bind(&s.api_socket)
                .with_context(|| format!("binding the API socket {}", s.api_socket.display()))?;
            Some(tokio::spawn(api::serve(
                listener,
                frontend,
                metrics,
                api::ServeLimits::default(),
                stop_rx,
            )))
        };
        admin_ctx.set_phase(Phase::Serving);
        info!(
            node = %s.name,
            capacity = %format_size(s.capacity),
            api_socket = %s.api_socket.display(),
            nbd_listen = ?s.nbd_listen,
            admin_listen = ?s.admin_listen,
            mlock = s.mlock,
            "node ready"
        );
        let mut stop = StopSignals::new();
        stop.next().await;
        if let (Some(node), Some(c)) = (&cluster, &s.cluster) {
            tokio::select! {
                d = node.drain_before_stop(&s.data_dir, c.stop_drain) => report_stop_drain(&d),
                _ = stop.next() => warn!(
                    "a second signal: stopping before every copy held here has moved"
                ),
            }
        }
        if nbd_server.is_some() {
            wait_for_nbd_clients(&exports, &mut stop).await;
        }
        info!("stopping");
        admin_ctx.set_phase(Phase::Stopping);
        let _ = stop_tx.send(true);
        if let Some(server) = server {
            let _ = server.await;
        }
        if let Some(c) = &cluster {
            c.shutdown().await;
        }
        if let Some(nbd) = nbd_server {
            let _ = nbd.await;
        }
        for st in exports.stats() {
            info!(stats = %serde_json::to_string(&st).unwrap_or_default(), "nbd export stats");
        }
        let _ = std::fs::remove_file(&s.api_socket);
        let _ = admin_stop_tx.send(true);
        if let Some(admin) = admin_server {
            let _ = admin.await;
        }
        anyhow::Ok(())
    })
}

/// How often the certs dir is read again for a renewed certificate;
/// SIGHUP reads it at once. A renewed Kubernetes Secret reaches the pod's
/// files within a minute or so, and is presented within this after that.
const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(30);

/// Presents a renewed node certificate without a restart: on SIGHUP, and
/// whenever the files change. A certificate that would not pass the checks
/// made at start is refused and the current one kept (said once per error).
async fn reload_certificates(
    node: ClusterNode,
    certs_dir: std::path::PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "no SIGHUP handler: certificates are reloaded only on file change");
            return;
        }
    };
    let mut last_error: Option<String> = None;
    loop {
        let asked = tokio::select! {
            _ = hangup.recv() => true,
            _ = tokio::time::sleep(CERT_CHECK_INTERVAL) => false,
            _ = stop.changed() => return,
        };
        match node.reload_certificate(&certs_dir) {
            Ok(Replaced::Renewed { not_after }) => {
                let days = not_after.map(|t| tls::seconds_until(t) / 86_400);
                info!(
                    certs_dir = %certs_dir.display(),
                    valid_days = ?days,
                    "certificate renewed: presented from the next handshake on; sessions already up keep theirs"
                );
                last_error = None;
            }
            Ok(Replaced::Unchanged) => {
                if asked {
                    info!(certs_dir = %certs_dir.display(), "SIGHUP: the certificate there is the one presented already");
                }
                last_error = None;
            }
            Err(e) => {
                if asked || last_error.as_deref() != Some(e.as_str()) {
                    warn!(
                        certs_dir = %certs_dir.display(),
                        error = %e,
                        "the certificate there was not taken; the current one stays"
                    );
                }
                last_error = Some(e);
            }
        }
    }
}

fn report_stop_drain(d: &StopDrain) {
    match d {
        StopDrain::NothingHeld => {}
        StopDrain::Drained { pages, took } => info!(
            pages,
            took = ?took,
            "drained: every copy held here moved to another donor"
        ),
        StopDrain::TimedOut { held } => warn!(
            held,
            "--stop-drain ran out: the copies still held here are lost with this stop, \
             and owners re-create them from their other copies"
        ),
        StopDrain::NotDrained { why } => warn!(
            %why,
            "could not drain before stopping: the copies held here are lost with this stop, \
             and owners re-create them from their other copies"
        ),
    }
}

/// Logs each export's counters now and then, when they changed.
async fn log_export_stats(exports: Arc<Exports>, mut stop: watch::Receiver<bool>) {
    let mut last = exports.stats();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EXPORT_STATS_LOG_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        let now = exports.stats();
        for (st, before) in now.iter().zip(&last) {
            if st != before {
                info!(stats = %serde_json::to_string(st).unwrap_or_default(), "nbd export stats");
            }
        }
        last = now;
    }
}

/// How often recorded latencies are folded into their buckets: a node
/// nobody scrapes keeps a few seconds of samples at most.
const LATENCY_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

async fn keep_latencies(metrics: Arc<NodeMetrics>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LATENCY_UPKEEP_INTERVAL) => metrics.upkeep(),
            _ = stop.changed() => return,
        }
    }
}

/// SIGINT and SIGTERM, each time one comes.
struct StopSignals {
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> StopSignals {
        use tokio::signal::unix::{SignalKind, signal};
        StopSignals {
            term: signal(SignalKind::terminate()).expect("SIGTERM handler"),
        }
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// How long a node asked to stop keeps serving while NBD clients are still
/// connected: long enough for a host to `swapoff` and disconnect once it
/// sees the node going (the systemd unit orders that), short enough for a
/// supervisor's stop timeout (the unit gives 120 s, the stop drain included).
pub const NBD_STOP_GRACE: Duration = Duration::from_secs(30);

/// A host still connected to an export may have pages here that die with
/// the node: say so loudly, and keep serving everything (donors included)
/// until the hosts have disconnected, [`NBD_STOP_GRACE`] has passed, or a
/// second signal insists.
async fn wait_for_nbd_clients(exports: &Exports, stop: &mut StopSignals) {
    let connected = exports.connections();
    if connected == 0 {
        return;
    }
    warn!(
        connections = connected,
        grace = ?NBD_STOP_GRACE,
        "asked to stop while NBD clients are connected: the pages they swapped out here will be \
         lost; run swapoff on those hosts and disconnect them. Serving on until they go, the \
         grace period ends, or a second signal comes"
    );
    let deadline = tokio::time::Instant::now() + NBD_STOP_GRACE;
    // Bounded by the deadline.
    loop {
        tokio::select! {
            _ = stop.next() => {
                warn!(connections = exports.connections(), "second stop signal: stopping now");
                return;
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        let connected = exports.connections();
        if connected == 0 {
            info!("every NBD client has disconnected");
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(
                connections = connected,
                "NBD clients still connected after the grace period: stopping"
            );
            return;
        }
    }
}

/// Logs to stderr; `RUST_LOG` picks the level (default info).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cmd {
        #[command(flatten)]
        node: NodeArgs,
    }

    fn args(argv: &[&str]) -> NodeArgs {
        Cmd::try_parse_from(std::iter::once("node").chain(argv.iter().copied()))
            .unwrap()
            .node
    }

    /// The arguments as `ramster node` takes them: with where each came from.
    fn noted_args(argv: &[&str]) -> NodeArgs {
        use clap::CommandFactory;
        let m = Cmd::command()
            .try_get_matches_from(std::iter::once("node").chain(argv.iter().copied()))
            .unwrap();
        NodeArgs::from_matches(&m).unwrap()
    }

    /// `--print-config`'s line for `key`: its text before the source, and
    /// the source.
    fn printed<'a>(text: &'a str, key: &str) -> (&'a str, &'a str) {
        let line = text
            .lines()
            .find(|l| {
                let l = l.trim_start_matches("# ");
                l.starts_with(&format!("{key} =")) || l.starts_with(&format!("{key}:"))
            })
            .unwrap_or_else(|| panic!("no line for {key} in\n{text}"));
        let (setting, source) = line.rsplit_once("  # ").expect("a source");
        (setting.trim_end(), source)
    }

    #[test]
    fn print_config_says_where_each_setting_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("node.toml");
        std::fs::write(
            &cfg,
            "name = \"from-file\"\ncapacity = \"1GiB\"\nmlock = \"yes\"\nreplicas = 3\n\
             nbd-export = [\"swap0:64MiB\"]\n",
        )
        .unwrap();
        let cfg = cfg.to_str().unwrap();
        let (s, src) = noted_args(&[
            "--config",
            cfg,
            "--data-dir",
            "/x",
            "--listen",
            "127.0.0.1:7800",
            "--gso",
            "off",
            "--admin-listen",
            "localhost:7901",
        ])
        .settings_and_sources()
        .unwrap();
        let text = super::super::print_config::render(&s, &src);
        let flag = |f: &str| format!("flag --{f}");
        assert_eq!(
            printed(&text, "config"),
            (format!("# config: {cfg}").as_str(), flag("config").as_str())
        );
        assert_eq!(printed(&text, "name"), ("name = \"from-file\"", "file"));
        assert_eq!(
            printed(&text, "data-dir"),
            ("data-dir = \"/x\"", flag("data-dir").as_str())
        );
        assert_eq!(printed(&text, "capacity"), ("capacity = \"1GiB\"", "file"));
        assert_eq!(printed(&text, "mlock"), ("mlock = true", "file"));
        assert_eq!(printed(&text, "replicas"), ("replicas = 3", "file"));
        assert_eq!(
            printed(&text, "nbd-export"),
            ("nbd-export = [\"swap0:64MiB\"]", "file")
        );
        assert_eq!(
            printed(&text, "nbd-listen"),
            ("nbd-listen = \"127.0.0.1:10809\"", "default")
        );
        assert_eq!(
            printed(&text, "api-socket"),
            ("api-socket = \"/x/api.sock\"", "default")
        );
        assert_eq!(printed(&text, "gso"), ("gso = false", flag("gso").as_str()));
        assert_eq!(
            printed(&text, "admin-listen"),
            (
                "admin-listen = \"127.0.0.1:7901\"",
                flag("admin-listen").as_str()
            )
        );
        assert_eq!(printed(&text, "donate"), ("donate = \"1GiB\"", "default"));
        assert_eq!(printed(&text, "zone"), ("# zone: none", "default"));
        assert_eq!(printed(&text, "out-after"), ("out-after = 10", "default"));
        assert_eq!(
            printed(&text, "remotify-watermarks"),
            ("remotify-watermarks = [0.85, 0.75]", "default")
        );

        // What it prints is a config file that gives the same settings.
        let again = dir.path().join("printed.toml");
        std::fs::write(&again, &text).unwrap();
        let (s2, src2) = noted_args(&["--config", again.to_str().unwrap()])
            .settings_and_sources()
            .unwrap();
        assert_eq!(s2, s);
        assert_eq!(src2.of("data-dir"), Source::File);
        assert_eq!(src2.of("config"), Source::Flag("--config".into()));

        // A standalone node has no cluster settings to print; one the file
        // sets anyway is shown as unused.
        std::fs::write(dir.path().join("alone.toml"), "replicas = 3\n").unwrap();
        let alone = dir.path().join("alone.toml");
        let (s, src) = noted_args(&[
            "--config",
            alone.to_str().unwrap(),
            "--name",
            "n",
            "--data-dir",
            "/x",
            "--capacity",
            "4096",
            "--admin-listen",
            "off",
        ])
        .settings_and_sources()
        .unwrap();
        let text = super::super::print_config::render(&s, &src);
        assert_eq!(
            printed(&text, "replicas"),
            ("# replicas: unused, not a cluster member", "file")
        );
        assert_eq!(
            printed(&text, "capacity"),
            ("capacity = \"4KiB\"", "flag --capacity")
        );
        assert_eq!(printed(&text, "nbd-listen").1, "default");
        assert!(
            printed(&text, "nbd-listen")
                .0
                .starts_with("# nbd-listen: off"),
            "{text}"
        );
        assert_eq!(
            printed(&text, "admin-listen"),
            ("admin-listen = \"off\"", "flag --admin-listen")
        );
    }

    #[test]
    fn boolean_flags_and_file_keys_take_the_usual_words() {
        for (argv, want) in [
            (&["--mlock"][..], Some(true)),
            (&["--mlock", "yes"], Some(true)),
            (&["--mlock=on"], Some(true)),
            (&["--mlock", "1"], Some(true)),
            (&["--mlock", "no"], Some(false)),
            (&["--mlock=OFF"], Some(false)),
            (&["--mlock", "0"], Some(false)),
            (&[], None),
        ] {
            assert_eq!(args(argv).mlock, want, "{argv:?}");
        }
        assert_eq!(args(&["--insecure", "--gso", "no"]).insecure, Some(true));
        assert_eq!(args(&["--insecure", "--gso", "no"]).gso, Some(false));
        for flag in ["--mlock", "--insecure", "--gso"] {
            let e = Cmd::try_parse_from(["node", flag, "maybe"]).unwrap_err();
            assert!(e.to_string().contains("yes/no"), "{e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("node.toml");
        let base =
            "name = \"n\"\ndata-dir = \"/x\"\ncapacity = 4096\njoin = [\"127.0.0.1:7800\"]\n";
        std::fs::write(
            &cfg,
            format!("{base}mlock = \"on\"\ninsecure = 1\ngso = \"no\"\n"),
        )
        .unwrap();
        let s = args(&["--config", cfg.to_str().unwrap()])
            .settings()
            .unwrap();
        let c = s.cluster.unwrap();
        assert!(s.mlock);
        assert!(c.insecure);
        assert!(!c.transport.segmentation_offload);
        std::fs::write(&cfg, format!("{base}gso = \"maybe\"\n")).unwrap();
        let e = args(&["--config", cfg.to_str().unwrap()])
            .settings()
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("yes/no") && e.contains("gso"), "{e}");
    }

    #[test]
    fn listen_addresses_take_names() {
        let s = args(&[
            "--name",
            "n",
            "--data-dir",
            "/x",
            "--capacity",
            "4096",
            "--admin-listen",
            "localhost:7901",
            "--nbd-listen",
            "localhost:10900",
            "--nbd-export",
            "e:1MiB",
            "--listen",
            "localhost:7900",
        ])
        .settings()
        .unwrap();
        assert_eq!(s.admin_listen, Some("127.0.0.1:7901".parse().unwrap()));
        assert_eq!(s.nbd_listen, Some("127.0.0.1:10900".parse().unwrap()));
        let c = s.cluster.unwrap();
        assert_eq!(c.listen, "127.0.0.1:7900".parse().unwrap());
        assert_eq!(
            c.advertise, "127.0.0.1:7900",
            "what it listens on, as before"
        );
        let s = args(&[
            "--name",
            "n",
            "--data-dir",
            "/x",
            "--capacity",
            "4096",
            "--admin-listen",
            "[::1]:7901",
        ])
        .settings()
        .unwrap();
        assert_eq!(s.admin_listen, Some("[::1]:7901".parse().unwrap()));

        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("node.toml");
        std::fs::write(
            &cfg,
            "name = \"n\"\ndata-dir = \"/x\"\ncapacity = 4096\nadmin-listen = \"localhost:7902\"\n\
             listen = \"localhost:7903\"\n",
        )
        .unwrap();
        let s = args(&["--config", cfg.to_str().unwrap()])
            .settings()
            .unwrap();
        assert_eq!(s.admin_listen, Some("127.0.0.1:7902".parse().unwrap()));
        assert_eq!(s.cluster.unwrap().listen, "127.0.0.1:7903".parse().unwrap());
        std::fs::write(
            &cfg,
            "name = \"n\"\ndata-dir = \"/x\"\ncapacity = 4096\nlisten = \"nowhere\"\n",
        )
        .unwrap();
        let e = args(&["--config", cfg.to_str().unwrap()])
            .settings()
            .unwrap_err();
        assert!(format!("{e:#}").contains("config `listen`"), "{e:#}");
    }

    #[test]
    fn help_groups_flags_under_headings_and_shows_defaults() {
        use clap::CommandFactory;
        let help = Cmd::command().render_long_help().to_string();
        for heading in [
            "Node:",
            "Store:",
            "Front ends:",
            "Cluster:",
            "Watermarks:",
            "Transport:",
            "Admin:",
        ] {
            assert!(help.contains(heading), "no {heading} in\n{help}");
        }
        let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
        let d = Watermarks::default();
        for default in [
            format!("[default: {}]", nbd::server::THREADS_PER_CONNECTION),
            format!("[default: {}]", nbd::server::POLL_DEFAULT.as_micros()),
            format!("[default: {ADMIN_LISTEN_DEFAULT}]"),
            format!("[default: {NBD_LISTEN_DEFAULT} when an export is given]"),
            format!("[default: {PEER_LISTEN_DEFAULT} when --join is given]"),
            format!("[default: {REPLICAS_DEFAULT}]"),
            format!(
                "[default: {}]",
                crate::cluster::liveness::OUT_AFTER_MS / 1000
            ),
            format!("[default: {}]", AuditPace::NODE.pass_every.as_secs()),
            format!("[default: {STOP_DRAIN_SECS_DEFAULT}]"),
            format!("[default: {}]", crate::cluster::transport::POLL_WINDOW_US),
            format!("[default: {}", TransportConfig::default().mtu_upper_bound),
            format!("[default: {:.2},{:.2}]", d.remotify_start, d.remotify_stop),
            format!("[default: {:.2},{:.2}]", d.suction_start, d.suction_stop),
        ] {
            assert!(flat.contains(&default), "no {default} in\n{help}");
        }
        // Every setting says its default (or that it has none).
        let cmd = Cmd::command();
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "print-config" {
                continue;
            }
            let text = arg.get_long_help().or(arg.get_help()).unwrap().to_string();
            assert!(
                text.contains("[default: ") || text.contains("[required]"),
                "--{long}: {text}"
            );
            assert!(arg.get_help_heading().is_some(), "--{long} has no heading");
        }
    }

    /// The cluster settings of a member started with `extra` flags.
    fn cluster_settings(extra: &[&str]) -> anyhow::Result<ClusterArgs> {
        let mut a = vec![
            "--name",
            "n",
            "--data-dir",
            "/x",
            "--capacity",
            "1GiB",
            "--join",
            "127.0.0.1:7800",
        ];
        a.extend(extra);
        Ok(args(&a).settings()?.cluster.expect("a cluster member"))
    }

    #[test]
    fn flags_win_over_the_config_file_which_wins_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("node.toml");
        std::fs::write(
            &cfg,
            r#"
name = "from-file"
data-dir = "/var/lib/ramster"
capacity = "1GiB"
nbd-export = ["swap0:64MiB", "swap1:1GiB:/srv/swap1"]
nbd-threads = 4
nbd-poll-us = 0
mlock = true
admin-listen = "0.0.0.0:9100"
"#,
        )
        .unwrap();
        let cfg = cfg.to_str().unwrap();
        let s = args(&["--config", cfg]).settings().unwrap();
        assert_eq!(s.name, "from-file");
        assert_eq!(s.capacity, 1 << 30);
        assert_eq!(s.api_socket, PathBuf::from("/var/lib/ramster/api.sock"));
        assert_eq!(s.nbd_exports.len(), 2);
        assert_eq!(s.nbd_listen, Some(NBD_LISTEN_DEFAULT.parse().unwrap()));
        assert_eq!(
            s.nbd,
            nbd::server::ServeOptions {
                threads: 4,
                poll: Duration::ZERO
            }
        );
        assert!(s.mlock);
        assert_eq!(s.admin_listen, Some("0.0.0.0:9100".parse().unwrap()));

        let s = args(&[
            "--config",
            cfg,
            "--name",
            "from-flag",
            "--capacity",
            "2GiB",
            "--nbd-export",
            "only:4096",
            "--nbd-listen",
            "127.0.0.1:7000",
            "--mlock=false",
            "--admin-listen",
            "off",
            "--nbd-threads",
            "1",
            "--nbd-poll-us",
            "200",
        ])
        .settings()
        .unwrap();
        assert_eq!(
            s.nbd,
            nbd::server::ServeOptions {
                threads: 1,
                poll: Duration::from_micros(200)
            }
        );
        assert_eq!(s.name, "from-flag");
        assert_eq!(s.capacity, 2 << 30);
        assert_eq!(s.nbd_exports.len(), 1);
        assert_eq!(s.nbd_listen, Some("127.0.0.1:7000".parse().unwrap()));
        assert!(!s.mlock);
        assert_eq!(s.admin_listen, None, "off");

        let s = args(&["--name", "n", "--data-dir", "/x", "--capacity", "1GiB"])
            .settings()
            .unwrap();
        assert_eq!(s.admin_listen, Some(ADMIN_LISTEN_DEFAULT.parse().unwrap()));
        assert_eq!(s.nbd, nbd::server::ServeOptions::default());
        let s = args(&["--config", cfg, "--admin-listen", "127.0.0.1:9200"])
            .settings()
            .unwrap();
        assert_eq!(s.admin_listen, Some("127.0.0.1:9200".parse().unwrap()));
    }

    #[test]
    fn the_transport_threads_poll_window_comes_from_the_flag_or_the_file() {
        let window = |extra: &[&str]| cluster_settings(extra).unwrap().transport.poll_window;
        assert_eq!(
            window(&[]),
            Duration::from_micros(crate::cluster::transport::POLL_WINDOW_US)
        );
        assert_eq!(window(&["--poll-us", "0"]), Duration::ZERO);
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("node.toml");
        std::fs::write(&cfg, "poll-us = 500\n").unwrap();
        let cfg = cfg.to_str().unwrap();
        assert_eq!(window(&["--config", cfg]), Duration::from_micros(500));
        assert_eq!(
            window(&["--config", cfg, "--poll-us", "50"]),
            Duration::from_micros(50)
        );
    }

    #[test]
    fn audit_every_comes_from_the_flag_or_the_file_within_a_day() {
        let every = |extra: &[&str]| cluster_settings(extra).map(|c| c.audit.pass_every);
        assert_eq!(every(&[]).unwrap(), AuditPace::NODE.pass_every);
        assert_eq!(
            every(&["--audit-every", "5"]).unwrap(),
            Duration::from_secs(5)
        );
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ramster.toml");
        std::fs::write(&cfg, "audit-every = 300\n").unwrap();
        let cfg = cfg.to_str().unwrap();
        assert_eq!(every(&["--config", cfg]).unwrap(), Duration::from_secs(300));
        assert_eq!(
            every(&["--config", cfg, "--audit-every", "7"]).unwrap(),
            Duration::from_secs(7)
        );
        assert!(Cmd::try_parse_from(["node", "--audit-every", "0"]).is_err());
        assert!(Cmd::try_parse_from(["node", "--audit-every", "86401"]).is_err());
        std::fs::write(dir.path().join("bad.toml"), "audit-every = 0\n").unwrap();
        let bad = dir.path().join("bad.toml");
        let e = every(&["--config", bad.to_str().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("audit-every"), "{e}");
    }

    #[test]
    fn stop_drain_comes_from_the_flag_or_the_file_within_an_hour() {
        let drain = |extra: &[&str]| cluster_settings(extra).map(|c| c.stop_drain);
        assert_eq!(
            drain(&[]).unwrap(),
            Duration::from_secs(STOP_DRAIN_SECS_DEFAULT)
        );
        assert_eq!(drain(&["--stop-drain", "0"]).unwrap(), Duration::ZERO);
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ramster.toml");
        std::fs::write(&cfg, "stop-drain = 120\n").unwrap();
        let cfg = cfg.to_str().unwrap();
        assert_eq!(drain(&["--config", cfg]).unwrap(), Duration::from_secs(120));
        assert_eq!(
            drain(&["--config", cfg, "--stop-drain", "5"]).unwrap(),
            Duration::from_secs(5)
        );
        assert!(Cmd::try_parse_from(["node", "--stop-drain", "3601"]).is_err());
        std::fs::write(dir.path().join("bad.toml"), "stop-drain = 7200\n").unwrap();
        let bad = dir.path().join("bad.toml");
        let e = drain(&["--config", bad.to_str().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("stop-drain"), "{e}");
    }

    #[test]
    fn out_after_comes_from_the_flag_or_the_file_within_a_day() {
        let out_after = |extra: &[&str]| cluster_settings(extra).map(|c| c.liveness.out_after);
        assert_eq!(
            out_after(&[]).unwrap(),
            Duration::from_millis(crate::cluster::liveness::OUT_AFTER_MS)
        );
        assert_eq!(out_after(&["--out-after", "0"]).unwrap(), Duration::ZERO);
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("node.toml");
        std::fs::write(&cfg, "out-after = 60\n").unwrap();
        let cfg = cfg.to_str().unwrap();
        assert_eq!(
            out_after(&["--config", cfg]).unwrap(),
            Duration::from_secs(60)
        );
        assert_eq!(
            out_after(&["--config", cfg, "--out-after", "5"]).unwrap(),
            Duration::from_secs(5)
        );
        assert!(Cmd::try_parse_from(["node", "--out-after", "86401"]).is_err());
        std::fs::write(dir.path().join("bad.toml"), "out-after = 100000\n").unwrap();
        let bad = dir.path().join("bad.toml");
        let e = out_after(&["--config", bad.to_str().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("out-after"), "{e}");
    }

    #[test]
    fn auto_capacity_shares_the_cgroup_limit_by_role() {
        let limit = Some(1000 << 20);
        let pages = (1000u64 << 20) as f64 * AUTO_MEMORY_FRACTION;
        assert_eq!(auto_capacity(limit, None, None).unwrap(), pages as u64);
        assert_eq!(
            auto_capacity(limit, Some(Role::Peer), None).unwrap(),
            pages as u64 / 2,
            "a peer keeps half and donates half"
        );
        assert_eq!(
            auto_capacity(limit, Some(Role::Peer), Some(100 << 20)).unwrap(),
            pages as u64 - (100 << 20)
        );
        assert_eq!(
            auto_capacity(limit, Some(Role::MemoryServer), None).unwrap(),
            pages as u64
        );
        assert_eq!(
            auto_capacity(limit, Some(Role::Client), None).unwrap(),
            pages as u64
        );
        let e = auto_capacity(None, None, None).unwrap_err();
        assert!(e.to_string().contains("no cgroup memory limit"), "{e}");
        let e = auto_capacity(limit, Some(Role::Peer), Some(2000 << 20)).unwrap_err();
        assert!(e.to_string().contains("donate less"), "{e}");
    }

    #[test]
    fn capacity_takes_a_size_or_auto() {
        assert_eq!(args(&["--capacity", "auto"]).capacity, Some(Capacity::Auto));
        assert_eq!(
            args(&["--capacity", "64MiB"]).capacity,
            Some(Capacity::Bytes(64 << 20))
        );
        assert!(Cmd::try_parse_from(["node", "--capacity", "lots"]).is_err());
    }

    #[test]
    fn missing_and_bad_settings_say_what_to_do() {
        let e = args(&["--data-dir", "/x", "--capacity", "1GiB"])
            .settings()
            .unwrap_err();
        assert!(e.to_string().contains("--name is required"), "{e}");
        let e = args(&[
            "--name",
            "n",
            "--data-dir",
            "/x",
            "--capacity",
            "1GiB",
            "--nbd-listen",
            "127.0.0.1:1",
        ])
        .settings()
        .unwrap_err();
        assert!(e.to_string().contains("no --nbd-export"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("bad.toml");
        std::fs::write(&cfg, "nmae = \"typo\"\n").unwrap();
        let e = args(&["--config", cfg.to_str().unwrap()])
            .settings()
            .unwrap_err();
        assert!(format!("{e:#}").contains("nmae"), "{e:#}");
        assert!(
            Cmd::try_parse_from(["node", "--nbd-export", "bad/name:1GiB"]).is_err(),
            "a bad export is refused at parse time"
        );
        for bad in ["0", "65"] {
            let e = Cmd::try_parse_from(["node", "--nbd-threads", bad]).unwrap_err();
            assert!(e.to_string().contains("from 1 to 64"), "{e}");
        }
        let e = Cmd::try_parse_from(["node", "--nbd-threads", "many"]).unwrap_err();
        assert!(e.to_string().contains("not a number"), "{e}");
        for flag in ["--nbd-poll-us", "--poll-us"] {
            let e = Cmd::try_parse_from(["node", flag, "1001"]).unwrap_err();
            assert!(e.to_string().contains("from 0 to 1000"), "{e}");
        }
        for bad in ["localhost", "127.0.0.1", "everywhere:http"] {
            let e = Cmd::try_parse_from(["node", "--admin-listen", bad]).unwrap_err();
            assert!(e.to_string().contains("HOST:PORT"), "{e}");
            assert!(e.to_string().contains("`off`"), "{e}");
        }
        for (line, key) in [
            ("admin-listen = \"everywhere\"", "admin-listen"),
            ("nbd-threads = 0", "nbd-threads"),
            ("nbd-poll-us = 5000", "nbd-poll-us"),
            ("poll-us = 5000", "poll-us"),
        ] {
            std::fs::write(
                &cfg,
                format!("name = \"n\"\ndata-dir = \"/x\"\ncapacity = 4096\n{line}\n"),
            )
            .unwrap();
            let e = args(&["--config", cfg.to_str().unwrap()])
                .settings()
                .unwrap_err();
            assert!(
                format!("{e:#}").contains(&format!("config `{key}`")),
                "{e:#}"
            );
        }
    }
}
