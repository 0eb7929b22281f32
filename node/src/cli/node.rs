//! `ramster node`: runs a node until SIGINT or SIGTERM.
//!
//! Settings come from, lowest precedence first: built-in defaults, the TOML
//! file given by `--config`, `RAMSTER_*` environment variables, flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde::Deserialize;
use tokio::sync::watch;
use tracing::{info, warn};

use super::size::{format_size, parse_size};
use crate::admin::{self, ADMIN_LISTEN_DEFAULT, AdminContext, Phase};
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

#[derive(Args, Debug, Default)]
pub struct NodeArgs {
    /// TOML file with the node's settings (keys as the flags: name,
    /// data-dir, capacity, api-socket, nbd-listen, nbd-export = [...], mlock,
    /// admin-listen).
    #[arg(long, env = "RAMSTER_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's name, unique in the cluster.
    #[arg(long, env = "RAMSTER_NAME")]
    pub name: Option<String>,
    /// Where the node keeps its state (identity, sockets, NBD backing files).
    #[arg(long, env = "RAMSTER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Most memory the page store may hold (e.g. 512MiB, 4GiB).
    #[arg(long, env = "RAMSTER_CAPACITY", value_parser = parse_size)]
    pub capacity: Option<u64>,
    /// Unix socket of the native API [default: DATA_DIR/api.sock].
    #[arg(long, env = "RAMSTER_API_SOCKET")]
    pub api_socket: Option<PathBuf>,
    /// Address of the NBD server [default: 127.0.0.1:10809 when an export is given].
    #[arg(long, env = "RAMSTER_NBD_LISTEN")]
    pub nbd_listen: Option<SocketAddr>,
    /// An NBD export, NAME:SIZE[:BACKING_PATH] (repeatable; comma-separated
    /// in the environment). The backing file defaults to DATA_DIR/nbd/NAME.swap
    /// and is truncated at start: exports start empty.
    #[arg(long = "nbd-export", env = "RAMSTER_NBD_EXPORT", value_delimiter = ',')]
    pub nbd_exports: Vec<ExportSpec>,
    /// Lock all of the node's memory (mlockall), so that a host swapping
    /// into this node never has the node's own pages swapped out.
    #[arg(long, env = "RAMSTER_MLOCK", num_args = 0..=1, default_missing_value = "true")]
    pub mlock: Option<bool>,
    /// Address of the admin endpoint (/metrics, /health/live,
    /// /health/ready, /v1/status), or `off` [default: 127.0.0.1:7801].
    #[arg(long, env = "RAMSTER_ADMIN_LISTEN")]
    pub admin_listen: Option<AdminListen>,
}

/// Where the admin endpoint listens: an address, or `off`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct AdminListen(pub Option<SocketAddr>);

impl FromStr for AdminListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(AdminListen(None));
        }
        s.parse()
            .map(|a| AdminListen(Some(a)))
            .map_err(|_| format!("{s:?} is not HOST:PORT (an IP address and port) or `off`"))
    }
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
    nbd_listen: Option<SocketAddr>,
    #[serde(default)]
    nbd_export: Vec<String>,
    mlock: Option<bool>,
    admin_listen: Option<String>,
}

/// The node's settings once every source is merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSettings {
    pub name: String,
    pub data_dir: PathBuf,
    pub capacity: u64,
    pub api_socket: PathBuf,
    /// `Some` when there are exports to serve.
    pub nbd_listen: Option<SocketAddr>,
    pub nbd_exports: Vec<ExportSpec>,
    pub mlock: bool,
    /// `None` when the admin endpoint is off.
    pub admin_listen: Option<SocketAddr>,
}

fn read_config(path: &Path) -> anyhow::Result<ConfigFile> {
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
    toml::from_str(&text).with_context(|| format!("config {}", path.display()))
}

impl NodeArgs {
    /// Merges flags and environment (already in `self`, flags winning, as
    /// clap does) over the config file over defaults.
    pub fn settings(self) -> anyhow::Result<NodeSettings> {
        let file = match &self.config {
            Some(path) => read_config(path)?,
            None => ConfigFile::default(),
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
        let capacity = match (self.capacity, file.capacity) {
            (Some(c), _) => c,
            (None, Some(SizeValue::Bytes(b))) => b,
            (None, Some(SizeValue::Text(t))) => {
                parse_size(&t).map_err(|e| anyhow::anyhow!("config `capacity`: {e}"))?
            }
            (None, None) => return Err(missing("capacity", "capacity", "RAMSTER_CAPACITY")),
        };
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
        let nbd_listen = match self.nbd_listen.or(file.nbd_listen) {
            Some(addr) if nbd_exports.is_empty() => {
                bail!("--nbd-listen {addr} given but no --nbd-export to serve")
            }
            Some(addr) => Some(addr),
            None if nbd_exports.is_empty() => None,
            None => Some(NBD_LISTEN_DEFAULT.parse().expect("valid default")),
        };
        let admin_listen = match (self.admin_listen, file.admin_listen) {
            (Some(a), _) => a,
            (None, Some(text)) => text
                .parse()
                .map_err(|e| anyhow::anyhow!("config `admin-listen`: {e}"))?,
            (None, None) => ADMIN_LISTEN_DEFAULT.parse().expect("valid default"),
        };
        Ok(NodeSettings {
            name,
            data_dir,
            capacity,
            api_socket,
            nbd_listen,
            nbd_exports,
            mlock: self.mlock.or(file.mlock).unwrap_or(false),
            admin_listen: admin_listen.0,
        })
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
    init_logging();
    let s = args.settings()?;
    if s.mlock {
        lock_memory()?;
    }
    std::fs::create_dir_all(&s.data_dir)
        .with_context(|| format!("creating data dir {}", s.data_dir.display()))?;
    let store = Arc::new(PageStore::new(StoreConfig::with_capacity(s.capacity)));
    let frontend = Arc::new(Frontend::new(s.name.clone(), store));
    let metrics = Arc::new(NodeMetrics::default());
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
        let admin_ctx = Arc::new(AdminContext::new(
            frontend.clone(),
            metrics.clone(),
            exports.clone(),
            None,
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
                stop_rx.clone(),
            )));
            tokio::spawn(log_export_stats(exports.clone(), stop_rx.clone()));
        }
        let listener = api::bind(&s.api_socket)
            .with_context(|| format!("binding the API socket {}", s.api_socket.display()))?;
        let server = tokio::spawn(api::serve(listener, frontend, metrics, stop_rx));
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
        wait_for_stop_signal().await;
        info!("stopping");
        admin_ctx.set_phase(Phase::Stopping);
        let _ = stop_tx.send(true);
        let _ = server.await;
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

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
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
        ])
        .settings()
        .unwrap();
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
        let s = args(&["--config", cfg, "--admin-listen", "127.0.0.1:9200"])
            .settings()
            .unwrap();
        assert_eq!(s.admin_listen, Some("127.0.0.1:9200".parse().unwrap()));
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
        let e = Cmd::try_parse_from(["node", "--admin-listen", "localhost"]).unwrap_err();
        assert!(e.to_string().contains("HOST:PORT"), "{e}");
        std::fs::write(
            &cfg,
            "name = \"n\"\ndata-dir = \"/x\"\ncapacity = 4096\nadmin-listen = \"everywhere\"\n",
        )
        .unwrap();
        let e = args(&["--config", cfg.to_str().unwrap()])
            .settings()
            .unwrap_err();
        assert!(format!("{e:#}").contains("config `admin-listen`"), "{e:#}");
    }
}
