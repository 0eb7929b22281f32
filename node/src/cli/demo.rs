//! `ramster demo`: a four-node cluster on loopback, started as child
//! processes with a fresh CA in a temporary directory. A deliberately small
//! node is filled with realistic pages so they remotify, everything is
//! loaded back and checked; then the donor holding the most copies is
//! killed, the small node repairs around it (two copies of every page: none
//! is lost) and every page is checked again; the donor comes back empty;
//! then most pages are freed so suction brings the rest home and the donors
//! let go of everything they held for the small node. Everything stops
//! cleanly at the end, on an error, or on Ctrl-C (children are ended by
//! PID).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use ramster_protocol::v1::{self, op::Kind};

use super::corpus::Pages;
use super::size::{format_size, parse_size};
use super::status;
use crate::cluster::status::ClusterStatus;
use crate::cluster::tls;
use ramster_client::{Client, op};

const AREA: u32 = 1;
/// Pages per request.
const BATCH: usize = 256;
/// How long the cluster may take to form.
const FORM_TIMEOUT: Duration = Duration::from_secs(60);
/// How long suction may take to bring every page home.
const SUCTION_TIMEOUT: Duration = Duration::from_secs(120);
/// How long repair may take, from the kill (the donor must first be out).
const REPAIR_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Capacity of the small node whose pages remotify.
    #[arg(long, default_value = "32MiB", value_parser = parse_size)]
    small: u64,
    /// Uncompressed size of the pages written into it.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    fill: u64,
    /// Keep the temporary directory (logs, certificates, data) at the end.
    #[arg(long)]
    keep: bool,
}

/// A child node, ended by PID when dropped.
struct DemoNode {
    name: &'static str,
    admin: String,
    data_dir: PathBuf,
    child: Child,
    /// How it was started, to start it again.
    command: NodeCommand,
}

/// Everything needed to start a node's process.
struct NodeCommand {
    exe: PathBuf,
    args: Vec<String>,
    log: PathBuf,
}

impl NodeCommand {
    fn spawn(&self) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        Ok(Command::new(&self.exe)
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?)
    }
}

impl DemoNode {
    /// SIGKILL: the node dies without a word to anyone.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the node again, with its data dir (a new run: it comes back
    /// holding nothing for others).
    fn restart(&mut self) -> anyhow::Result<()> {
        self.child = self
            .command
            .spawn()
            .with_context(|| format!("starting node {} again", self.name))?;
        Ok(())
    }
}

impl Drop for DemoNode {
    fn drop(&mut self) {
        // SIGTERM first so the node leaves cleanly; SIGKILL if it lingers.
        // SAFETY: kill(2) on the PID of a child this process started.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("ramster-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = run_in(&args, &dir);
    if args.keep || result.is_err() {
        println!("logs, certificates and data kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn run_in(args: &DemoArgs, dir: &Path) -> anyhow::Result<()> {
    let ca = dir.join("ca");
    tls::create_ca(&ca)?;
    let specs: [(&'static str, u64, &[&str]); 4] = [
        ("small", args.small, &[]),
        ("peer", 128 << 20, &[]),
        ("memory-server", 128 << 20, &["--role", "memory-server"]),
        ("memory-server2", 128 << 20, &["--role", "memory-server"]),
    ];
    let peers: Vec<String> = specs
        .iter()
        .map(|_| free_udp_port().map(|p| format!("127.0.0.1:{p}")))
        .collect::<anyhow::Result<_>>()?;
    let exe = std::env::current_exe().context("locating the ramster binary")?;
    println!("ramster demo: a 4-node cluster on loopback, mutual TLS under a fresh CA");
    println!("  working in {}", dir.display());
    let mut nodes = Vec::new();
    for ((name, capacity, extra), peer) in specs.iter().zip(&peers) {
        let certs = tls::create_node(&ca, name, &[])?;
        let data_dir = dir.join(name);
        std::fs::create_dir_all(&data_dir)?;
        let admin = format!("127.0.0.1:{}", free_tcp_port()?);
        let mut node_args: Vec<String> = [
            "node",
            "--name",
            name,
            "--capacity",
            &capacity.to_string(),
            "--data-dir",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        node_args.push(data_dir.display().to_string());
        node_args.push("--certs-dir".into());
        node_args.push(certs.display().to_string());
        for a in [
            "--listen",
            peer,
            "--join",
            &peers.join(","),
            "--admin-listen",
            &admin,
            // The demo ends by stopping every node at once: nowhere to
            // drain to, so no drain (a restart is where it matters).
            "--stop-drain",
            "0",
        ] {
            node_args.push(a.to_string());
        }
        node_args.extend(extra.iter().map(|a| a.to_string()));
        let command = NodeCommand {
            exe: exe.clone(),
            args: node_args,
            log: dir.join(format!("{name}.log")),
        };
        let child = command
            .spawn()
            .with_context(|| format!("starting node {name}"))?;
        println!(
            "  started {name:<14} pid {:<7} capacity {:>9}  peer {peer}  admin {admin}",
            child.id(),
            format_size(*capacity)
        );
        nodes.push(DemoNode {
            name,
            admin,
            data_dir,
            child,
            command,
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::select! {
            r = scenario(args, &mut nodes) => r,
            _ = tokio::signal::ctrl_c() => {
                println!("\ninterrupted: stopping the nodes");
                Ok(())
            }
        }
    })?;
    println!("stopping the nodes");
    drop(nodes);
    println!("done");
    Ok(())
}

/// The cluster as `node` sees it (blocking HTTP, off the runtime threads).
async fn fetch_status(node: &DemoNode) -> anyhow::Result<ClusterStatus> {
    let admin = node.admin.clone();
    tokio::task::spawn_blocking(move || status::fetch(&admin)).await?
}

/// Prints the status table, redrawing it in place on a terminal.
struct LiveTable {
    lines: usize,
    tty: bool,
}

impl LiveTable {
    fn new() -> Self {
        LiveTable {
            lines: 0,
            tty: std::io::stdout().is_terminal(),
        }
    }

    fn show(&mut self, s: &ClusterStatus, note: &str) {
        let text = format!("{}{note}\n", status::table(s));
        let mut out = std::io::stdout().lock();
        if self.tty && self.lines > 0 {
            // Up over the last table, then clear to the end of the screen.
            let _ = write!(out, "\x1b[{}A\x1b[J", self.lines);
        }
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
        self.lines = text.lines().count();
    }

    /// The next table is printed below, not over, this one.
    fn keep(&mut self) {
        self.lines = 0;
    }
}

async fn scenario(args: &DemoArgs, nodes: &mut [DemoNode]) -> anyhow::Result<()> {
    let n = nodes.len();
    let (small, donors) = nodes.split_first_mut().expect("nodes");
    let small = &*small;
    let mut table = LiveTable::new();
    // 1. The cluster forms by itself from the seed list.
    let deadline = Instant::now() + FORM_TIMEOUT;
    loop {
        if let Ok(s) = fetch_status(small).await
            && s.nodes_up == n
            && s.leader.is_some()
        {
            println!("\n== the cluster formed itself (no init step)");
            table.show(&s, "");
            table.keep();
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the cluster did not form within {FORM_TIMEOUT:?}; see the logs in {}",
                small.data_dir.parent().unwrap_or(Path::new(".")).display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 2. Fill the small node well past its capacity.
    let client = Client::connect(&small.data_dir.join("api.sock")).await?;
    client.init_area(AREA, false).await?;
    let count = (args.fill as usize / ramster_protocol::PAGE_BYTES).max(BATCH);
    let pages = Pages::synthetic(count, 42);
    println!(
        "\n== storing {count} pages ({}) of realistic memory into {} ({} capacity)",
        format_size(args.fill),
        small.name,
        format_size(args.small)
    );
    let mut accepted = Vec::with_capacity(count);
    let mut refused = 0usize;
    let mut last_draw = Instant::now() - Duration::from_secs(1);
    let started = Instant::now();
    for first in (0..count).step_by(BATCH) {
        let batch: Vec<(u64, Bytes)> = (first..(first + BATCH).min(count))
            .map(|i| (i as u64, pages.page_bytes(i)))
            .collect();
        for ((offset, _), s) in batch.iter().zip(client.store_pages(AREA, &batch).await?) {
            if s == v1::Status::Ok {
                accepted.push(*offset);
            } else {
                refused += 1;
            }
        }
        if last_draw.elapsed() >= Duration::from_millis(500) {
            if let Ok(s) = fetch_status(small).await {
                table.show(&s, &format!("stored {} / {count}", first + BATCH));
            }
            last_draw = Instant::now();
        }
    }
    let s = fetch_status(small).await?;
    table.show(
        &s,
        &format!(
            "stored {count} pages in {:.1} s: {} accepted, {refused} refused (incompressible or full)",
            started.elapsed().as_secs_f64(),
            accepted.len()
        ),
    );
    table.keep();
    let stats = client.stats().await?.store.unwrap_or_default();
    println!(
        "   {} of {}'s pages live on its peers ({} compressed); {} used of {}",
        stats.remote_pages,
        small.name,
        format_size(stats.remote_bytes),
        format_size(stats.used_bytes),
        format_size(stats.capacity_bytes)
    );

    // 3. Everything comes back, checked byte for byte.
    println!("\n== loading every accepted page back and checking each byte");
    let started = Instant::now();
    verify(&client, &pages, &accepted).await?;
    println!(
        "   {} pages verified in {:.1} s, local and remote alike",
        accepted.len(),
        started.elapsed().as_secs_f64()
    );

    // 4. A donor dies; with two copies of every page, nothing is lost.
    lose_a_donor(small, donors, &client, &pages, &accepted, &mut table).await?;

    // 5. Free most pages: suction brings the rest home.
    let keep = accepted.len() / 8;
    println!(
        "\n== freeing {} pages: below the low watermark, suction brings the remote ones home",
        accepted.len() - keep
    );
    for chunk in accepted[keep..].chunks(BATCH) {
        let ops = chunk
            .iter()
            .map(|&offset| {
                op(Kind::InvalidatePage(v1::InvalidatePage {
                    area: AREA,
                    offset,
                }))
            })
            .collect();
        client.call(ops).await?;
    }
    let deadline = Instant::now() + SUCTION_TIMEOUT;
    loop {
        let remote = client.stats().await?.store.unwrap_or_default().remote_pages;
        let s = fetch_status(small).await?;
        table.show(&s, &format!("{remote} pages still on peers"));
        if remote == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{remote} pages still remote after {SUCTION_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The donors drop the copies of what came home or was freed; once none
    // of small's pages is left on them, small tells them to forget it,
    // tombstones and all, and they hold nothing more for it.
    loop {
        let s = fetch_status(small).await?;
        let held = s.held_for_others_bytes;
        table.show(
            &s,
            &format!("{} still held for small on the donors", format_size(held)),
        );
        if held == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "donors still hold {} after {SUCTION_TIMEOUT:?}",
                format_size(held)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    table.keep();
    for chunk in accepted[..keep].chunks(BATCH) {
        let got = client.load_pages(AREA, chunk).await?;
        for (&offset, g) in chunk.iter().zip(got) {
            match g {
                Ok(page) if page[..] == pages.page(offset as usize)[..] => {}
                _ => bail!("page {offset} is wrong after suction"),
            }
        }
    }
    println!("   every page is home; the {keep} kept pages verified again");
    Ok(())
}

/// Kills the donor holding the most of `small`'s copies, shows the status
/// while `small` waits for it to be out and repairs around it, checks every
/// page again, and starts the donor again (it comes back empty).
async fn lose_a_donor(
    small: &DemoNode,
    donors: &mut [DemoNode],
    client: &Client,
    pages: &Pages,
    accepted: &[u64],
    table: &mut LiveTable,
) -> anyhow::Result<()> {
    let s = fetch_status(small).await?;
    let held = |name: &str| {
        s.nodes
            .iter()
            .find(|n| n.name == name)
            .map_or(0, |n| n.held_for_others_pages)
    };
    let victim = donors
        .iter_mut()
        .max_by_key(|d| held(d.name))
        .expect("donors");
    println!(
        "\n== killing {} (SIGKILL), which holds {} copies: every page has another",
        victim.name,
        held(victim.name)
    );
    victim.kill();
    let started = Instant::now();
    let mut seen_short = false;
    loop {
        let s = fetch_status(small).await?;
        let me = s.nodes.iter().find(|n| n.name == small.name);
        let short = me.map_or(0, |n| n.degraded_pages);
        let lost = me.map_or(0, |n| n.unrecoverable_pages);
        if lost > 0 {
            bail!("{lost} pages lost every copy");
        }
        seen_short |= short > 0;
        let dead = s.nodes.iter().find(|n| n.name == victim.name);
        // Repair can copy tens of MB between two looks, so the shortfall
        // may never be seen: the live donors then hold the copies again.
        let wanted = me.map_or(0, |n| n.own_pages_on_peers) * super::node::REPLICAS_DEFAULT as u64;
        let on_live: u64 = s
            .nodes
            .iter()
            .filter(|n| n.name != victim.name && n.name != small.name)
            .map(|n| n.held_for_others_pages)
            .sum();
        let down = dead.is_some_and(|n| n.state == crate::cluster::status::Liveness::Down);
        let repaired = short == 0 && (seen_short || (down && wanted > 0 && on_live >= wanted));
        let note = match dead.map(|n| n.state) {
            Some(crate::cluster::status::Liveness::Down) if repaired => {
                "every page has its copies again".to_string()
            }
            Some(crate::cluster::status::Liveness::Down) if !seen_short => format!(
                "{} is down: loads use the other copies; repair waits until it is out (--out-after)",
                victim.name
            ),
            Some(crate::cluster::status::Liveness::Down) => {
                format!(
                    "{} is out: {short} pages are getting their second copy back",
                    victim.name
                )
            }
            _ => format!("{} is silent", victim.name),
        };
        table.show(
            &s,
            &format!(
                "{:.0} s after the kill: {note}",
                started.elapsed().as_secs_f64()
            ),
        );
        if repaired {
            break;
        }
        if started.elapsed() > REPAIR_TIMEOUT {
            bail!("{short} pages still short of copies after {REPAIR_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    table.keep();
    verify(client, pages, accepted).await?;
    println!(
        "   repaired in {:.1} s from the kill; {} pages verified again",
        started.elapsed().as_secs_f64(),
        accepted.len()
    );
    victim.restart()?;
    println!(
        "   {} started again: a new run, holding nothing for others",
        victim.name
    );
    Ok(())
}

/// Loads every page of `accepted` back and checks each byte.
async fn verify(client: &Client, pages: &Pages, accepted: &[u64]) -> anyhow::Result<()> {
    for chunk in accepted.chunks(BATCH) {
        let got = client.load_pages(AREA, chunk).await?;
        for (&offset, g) in chunk.iter().zip(got) {
            match g {
                Ok(page) if page[..] == pages.page(offset as usize)[..] => {}
                Ok(_) => bail!("page {offset} came back different"),
                Err(s) => bail!("page {offset} did not load: {s:?}"),
            }
        }
    }
    Ok(())
}
