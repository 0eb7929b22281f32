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
//! `draining`, then `drained`; `drain --wait` returns once it is), then
//! `remove` it, then stop it. `remove` refuses a node that still holds
//! peers' pages unless `--force`.

use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use super::admin_client;
use super::size::parse_size;
use super::status::Endpoint;
use crate::admin::{CAPACITY_PATH, DONATE_PATH, MEMBERS_PATH};
use crate::cluster::status::DrainProgress;

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
    Drain {
        node: String,
        /// Return only once NODE holds no peer's page and no page in the
        /// cluster is short of copies (a progress bar on a terminal); exit
        /// 1 if that takes longer than `--timeout`.
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits, in seconds.
        #[arg(long, default_value_t = 600, requires = "wait")]
        timeout: u64,
    },
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
    /// Take NODE out of the cluster because its data dir is gone, so that
    /// a node started under its name with a fresh data dir can join;
    /// refused while NODE is up. Owners re-create the copies it held.
    Replace { node: String },
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
            Change::Drain { node, .. } => format!("{MEMBERS_PATH}{node}/drain"),
            Change::Activate { node } => format!("{MEMBERS_PATH}{node}/activate"),
            Change::Remove { node, force } => {
                let force = if *force { "?force=1" } else { "" };
                format!("{MEMBERS_PATH}{node}/remove{force}")
            }
            Change::Replace { node } => format!("{MEMBERS_PATH}{node}/replace"),
            Change::Donate { size } => format!("{DONATE_PATH}?bytes={size}"),
            Change::Capacity { size } => format!("{CAPACITY_PATH}?bytes={size}"),
        }
    }
}

pub fn run(a: ClusterArgs) -> anyhow::Result<()> {
    let endpoints = a.endpoint.list();
    let began = Instant::now();
    let (answered, answer) = admin_client::post_first(&endpoints, &a.change.path())?;
    let said = answer.body.trim_end();
    if answer.status != 200 {
        anyhow::bail!("{said} (HTTP {})", answer.status)
    }
    println!("{said}");
    if let Change::Drain {
        node,
        wait: true,
        timeout,
    } = &a.change
    {
        // The node that made the change first, the others should it go.
        let mut ask = vec![answered.clone()];
        ask.extend(endpoints.into_iter().filter(|e| *e != answered));
        wait_drained(&ask, node, began, Duration::from_secs(*timeout))?;
    }
    Ok(())
}

/// How often `drain --wait` looks at the cluster's status.
const DRAIN_POLL: Duration = Duration::from_millis(500);

/// Waits until `node` is draining, holds no peer's page, and no page in the
/// cluster is short of copies (the copies it held were re-created, not
/// just released), as the status answered by the first of `endpoints`
/// that answers reports it, on reports made after `began`.
fn wait_drained(
    endpoints: &[String],
    node: &str,
    began: Instant,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} pages moved")
            .expect("a valid template"),
    );
    bar.set_message(format!("draining {node}"));
    let mut first_held = None;
    // Bounded by the deadline.
    loop {
        let last = match super::status::fetch_first(endpoints) {
            Ok(status) => match status
                .drain_progress(node, began.elapsed())
                .map_err(anyhow::Error::msg)?
            {
                DrainProgress::Drained => {
                    bar.finish_and_clear();
                    println!(
                        "{node} is drained: it holds no peer's page, and no page is short of copies"
                    );
                    return Ok(());
                }
                DrainProgress::Pending { held, why } => {
                    if let Some(held) = held {
                        let start = *first_held.get_or_insert(held);
                        bar.set_length(start.max(held));
                        bar.set_position(start.saturating_sub(held));
                    }
                    why
                }
            },
            // The node answering may be busy or electing a leader: ask again.
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bar.abandon();
            anyhow::bail!("not drained after {} s: {last}", timeout.as_secs());
        }
        std::thread::sleep(DRAIN_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_change_has_its_path() {
        let node = || "n2".to_string();
        assert_eq!(
            Change::Drain {
                node: node(),
                wait: false,
                timeout: 600
            }
            .path(),
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
