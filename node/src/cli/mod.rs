//! The `ramster` command line.

pub mod bench;
pub mod cert;
pub mod corpus;
pub mod nbd_bench;
pub mod node;
pub mod size;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "ramster",
    version,
    about = "Cluster memory for swap: compressed pages, kept in RAM"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node.
    Node(node::NodeArgs),
    /// Store pages, load them back in random order, verify every byte, report.
    Bench(bench::BenchArgs),
    /// Create the cluster CA and node certificates for mutual TLS.
    Cert(cert::CertArgs),
    /// Write and read back pages through any NBD server; pages/s, latency, memory per page.
    BenchNbd(nbd_bench::BenchNbdArgs),
}

/// Runs the command line; the process exit code.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Node(a) => node::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Cert(a) => cert::run(a),
        Command::BenchNbd(a) => nbd_bench::run(a),
    }
}
