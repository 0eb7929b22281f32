//! `ramster node`: runs a node until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tokio::sync::watch;
use tracing::info;

use super::size::{format_size, parse_size};
use crate::frontend::{Frontend, api};
use crate::store::{PageStore, StoreConfig};

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// This node's name, unique in the cluster.
    #[arg(long, env = "RAMSTER_NAME")]
    pub name: String,
    /// Where the node keeps its state (identity, sockets).
    #[arg(long, env = "RAMSTER_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Most memory the page store may hold (e.g. 512MiB, 4GiB).
    #[arg(long, env = "RAMSTER_CAPACITY", value_parser = parse_size)]
    pub capacity: u64,
    /// Unix socket of the native API [default: DATA_DIR/api.sock].
    #[arg(long, env = "RAMSTER_API_SOCKET")]
    pub api_socket: Option<PathBuf>,
}

pub fn run(args: NodeArgs) -> anyhow::Result<()> {
    init_logging();
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data dir {}", args.data_dir.display()))?;
    let socket = args
        .api_socket
        .clone()
        .unwrap_or_else(|| args.data_dir.join("api.sock"));
    let store = Arc::new(PageStore::new(StoreConfig::with_capacity(args.capacity)));
    let frontend = Arc::new(Frontend::new(args.name.clone(), store));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let listener = api::bind(&socket)
            .with_context(|| format!("binding the API socket {}", socket.display()))?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(api::serve(listener, frontend, stop_rx));
        info!(
            node = %args.name,
            capacity = %format_size(args.capacity),
            api_socket = %socket.display(),
            "node ready"
        );
        wait_for_stop_signal().await;
        info!("stopping");
        let _ = stop_tx.send(true);
        let _ = server.await;
        let _ = std::fs::remove_file(&socket);
        anyhow::Ok(())
    })
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
