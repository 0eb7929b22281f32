//! `ramster cert`: the cluster CA and node certificates (see
//! [`crate::cluster::tls`] for the file layout).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::cluster::tls;

#[derive(Args, Debug)]
pub struct CertArgs {
    #[command(subcommand)]
    pub command: CertCommand,
}

#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Create the cluster CA: DIR/ca.crt and DIR/ca.key (keep the key off the
    /// nodes; only `create-node` needs it).
    CreateCa {
        /// Where the CA is written.
        #[arg(long, env = "RAMSTER_CERTS_DIR")]
        certs_dir: PathBuf,
    },
    /// Issue a node certificate from the CA in DIR: writes DIR/NAME/ca.crt,
    /// node.crt and node.key; point the node's --certs-dir at DIR/NAME.
    CreateNode {
        /// The node's name (a DNS name): peers check its certificate
        /// against it.
        name: String,
        /// Where the CA is, and where the node's directory is created.
        #[arg(long, env = "RAMSTER_CERTS_DIR")]
        certs_dir: PathBuf,
        /// Another DNS name or IP address the node is reached at (repeat).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Days the certificate is valid [default: 825].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3650))]
        days: Option<u64>,
        /// Replace the certificate and key in DIR/NAME (same CA); a running
        /// node presents them on SIGHUP, or within 30 s on its own.
        #[arg(long)]
        renew: bool,
    },
    /// A whole cluster in one go, safe to run again (a container's init
    /// step): the CA in CA_DIR unless it is there, and CERTS_DIR/NAME/
    /// for every node that has no certificate from it yet.
    CreateCluster {
        /// The nodes' names (DNS names).
        #[arg(required = true)]
        names: Vec<String>,
        /// Where the CA is kept (created if empty); only this command
        /// reads its key, so it can stay off the nodes.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Where the nodes' directories are made.
        #[arg(long, env = "RAMSTER_CERTS_DIR")]
        certs_dir: PathBuf,
        /// Another DNS name or IP address every node is reached at (repeat).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

pub fn run(args: CertArgs) -> anyhow::Result<()> {
    match args.command {
        CertCommand::CreateCa { certs_dir } => {
            tls::create_ca(&certs_dir).context("creating the cluster CA")?;
            println!(
                "cluster CA written to {} ({}, {}); keep {} off the nodes",
                certs_dir.display(),
                tls::CA_CERT_FILE,
                tls::CA_KEY_FILE,
                tls::CA_KEY_FILE
            );
        }
        CertCommand::CreateNode {
            name,
            certs_dir,
            hosts,
            days,
            renew,
        } => {
            let options = tls::NodeCertOptions { hosts, days, renew };
            let dir = tls::issue_node(&certs_dir, &certs_dir, &name, &options)
                .with_context(|| format!("issuing a certificate for node {name:?}"))?;
            if renew {
                println!(
                    "node {name}: certificate renewed in {}; `kill -HUP` the node to present it now",
                    dir.display()
                );
            } else {
                println!("node {name}: certificate written to {}", dir.display());
            }
        }
        CertCommand::CreateCluster {
            names,
            ca_dir,
            certs_dir,
            hosts,
        } => {
            let done = tls::create_cluster(&ca_dir, &certs_dir, &names, &hosts)
                .context("creating the cluster's certificates")?;
            for d in done {
                match d {
                    tls::Issued::New(dir) => println!("issued {}", dir.display()),
                    tls::Issued::Kept(dir) => println!("kept {}", dir.display()),
                }
            }
        }
    }
    Ok(())
}
