//! The `ramster` command line.

pub mod admin_client;
pub mod bench;
pub mod cert;
pub mod cluster;
pub mod corpus;
pub mod demo;
pub mod generate;
pub mod nbd_bench;
pub mod node;
pub mod print_config;
pub mod size;
pub mod status;
pub mod values;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

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
    /// Start a 3-node cluster on loopback and watch pages leave a small node and come home.
    Demo(demo::DemoArgs),
    /// Run a node.
    Node(Box<node::NodeArgs>),
    /// Show the cluster as a node sees it: health, nodes, memory.
    Status(status::StatusArgs),
    /// Print the cluster's health; exit 0 ok, 3 warn, 4 err, 1 no answer.
    Health(status::HealthArgs),
    /// GET an admin path (default /health/ready); exit 0 on 2xx, else 1.
    Probe(status::ProbeArgs),
    /// Change a member: drain it, activate it again, remove it.
    Cluster(cluster::ClusterArgs),
    /// Store pages, load them back in random order, verify every byte, report.
    Bench(bench::BenchArgs),
    /// Create the cluster CA and node certificates for mutual TLS.
    Cert(cert::CertArgs),
    /// Write and read back pages through any NBD server; pages/s, latency, memory per page.
    BenchNbd(nbd_bench::BenchNbdArgs),
    /// Print the completion script for a shell (bash, zsh, fish, elvish, powershell).
    Completions(generate::CompletionsArgs),
    /// Print the man page, or write one per subcommand into --out-dir.
    Man(generate::ManArgs),
}

/// Runs the command line; the process exit code. Errors are for the
/// caller to report; `health` answers with exit codes of its own.
pub fn run() -> anyhow::Result<ExitCode> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let done = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Node(mut a) => {
            // `--print-config` tells the environment from the flags by
            // where clap found each value.
            if let Some(m) = matches.subcommand_matches("node") {
                a.given = print_config::CliSources::of(m);
            }
            node::run(*a)
        }
        Command::Status(a) => status::run_status(a),
        Command::Health(a) => return Ok(status::run_health(a)),
        Command::Probe(a) => return Ok(status::run_probe(a)),
        Command::Cluster(a) => cluster::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Cert(a) => cert::run(a),
        Command::BenchNbd(a) => nbd_bench::run(a),
        Command::Completions(a) => generate::run_completions(a),
        Command::Man(a) => generate::run_man(a),
    };
    done.map(|()| ExitCode::SUCCESS)
}
