//! `ramster cluster drain|activate|remove NODE`: an operator's changes to
//! members, asked of any node's admin endpoint, which has the Raft leader
//! make them.
//!
//! `ramster cluster donate SIZE` changes how much the node answering donates
//! (up to its `--donate`); lowered below what it holds, its owners are asked
//! to take the excess back.
//!
//! `ramster cluster capacity SIZE` changes the store capacity of the node
//! answering (up to its `--capacity`); lowered below what it holds, nothing
//! is dropped: remotify ships the coldest pages to donors at once, and new
//! stores wait for room.
//!
//! Taking a donor out without losing a replica: `drain` it (owners move
//! the copies it holds to other donors; `ramster status` shows it
//! `draining`, then `drained`), then `remove` it, then stop it. `remove`
//! refuses a node that still holds peers' pages unless `--force`.

use clap::{Args, Subcommand};

use super::admin_client;
use super::size::parse_size;
use super::status::Endpoint;
use crate::admin::{CAPACITY_PATH, DONATE_PATH, MEMBERS_PATH};

#[derive(Args, Debug)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub change: Change,
    #[command(flatten)]
    pub endpoint: Endpoint,
}

#[derive(Subcommand, Debug)]
pub enum Change {
    /// Stop placing pages on NODE and move the copies it holds to other donors.
    Drain { node: String },
    /// Let NODE take pages again (undoes `drain`).
    Activate { node: String },
    /// Take NODE out of the cluster; drain it first.
    Remove {
        node: String,
        /// Remove it even though it still holds peers' pages: owners then
        /// re-create those copies from other replicas (a page with no other
        /// replica is lost).
        #[arg(long)]
        force: bool,
    },
    /// Donate SIZE (up to `--donate`) on the node answering; what it holds
    /// above that, its owners take back.
    Donate {
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// Give the node answering a store capacity of SIZE (up to its
    /// `--capacity`); what it holds above that, remotify ships to donors.
    Capacity {
        #[arg(value_parser = parse_size)]
        size: u64,
    },
}

impl Change {
    /// The admin path that makes this change.
    fn path(&self) -> String {
        match self {
            Change::Drain { node } => format!("{MEMBERS_PATH}{node}/drain"),
            Change::Activate { node } => format!("{MEMBERS_PATH}{node}/activate"),
            Change::Remove { node, force } => {
                let force = if *force { "?force=1" } else { "" };
                format!("{MEMBERS_PATH}{node}/remove{force}")
            }
            Change::Donate { size } => format!("{DONATE_PATH}?bytes={size}"),
            Change::Capacity { size } => format!("{CAPACITY_PATH}?bytes={size}"),
        }
    }
}

pub fn run(a: ClusterArgs) -> anyhow::Result<()> {
    let answer = admin_client::post(&a.endpoint.endpoint, &a.change.path())?;
    let said = answer.body.trim_end();
    if answer.status == 200 {
        println!("{said}");
        Ok(())
    } else {
        anyhow::bail!("{said} (HTTP {})", answer.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_change_has_its_path() {
        let node = || "n2".to_string();
        assert_eq!(
            Change::Drain { node: node() }.path(),
            "/v1/members/n2/drain"
        );
        assert_eq!(
            Change::Activate { node: node() }.path(),
            "/v1/members/n2/activate"
        );
        assert_eq!(
            Change::Donate { size: 4 << 20 }.path(),
            "/v1/donate?bytes=4194304"
        );
        assert_eq!(
            Change::Capacity { size: 64 << 20 }.path(),
            "/v1/capacity?bytes=67108864"
        );
        assert_eq!(
            Change::Remove {
                node: node(),
                force: true
            }
            .path(),
            "/v1/members/n2/remove?force=1"
        );
    }
}
