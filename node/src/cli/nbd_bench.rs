//! `ramster bench-nbd`: drives any NBD server (a ramster export, nbdkit, ...)
//! with the same pages and the same client, so the numbers compare: write
//! every page at a queue depth, read them all back in random order and
//! verify every byte, report pages/s, latency percentiles and memory per
//! page (RSS delta of the server process, and for ramster the store's own
//! accounting and the backing file's allocated bytes).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Args;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Semaphore;

use super::corpus::Pages;
use crate::frontend::nbd::proto;
use crate::store::PAGE_BYTES;
use ramster_client::BlockingClient;

/// Requests one bench connection keeps in flight at most.
pub const DEPTH_MAX: usize = 1024;
/// How long the server may take to answer any one message.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Args, Debug)]
pub struct BenchNbdArgs {
    /// The NBD server.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub addr: SocketAddr,
    /// Export name ("" = the server's default export).
    #[arg(long, default_value = "")]
    pub export: String,
    /// Corpus file of pages (e.g. /tmp/corpus.bin).
    #[arg(long, conflicts_with = "synthetic")]
    pub corpus: Option<PathBuf>,
    /// Use this many synthetic pages instead of a corpus.
    #[arg(long)]
    pub synthetic: Option<usize>,
    /// Requests in flight.
    #[arg(long, default_value_t = 16)]
    pub depth: usize,
    /// The server's PID, to measure its RSS growth per page written.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// A ramster node's API socket, to report its store accounting.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// A ramster export's backing file, to report the pages it took.
    #[arg(long)]
    pub backing: Option<PathBuf>,
    /// Label of this run in the report.
    #[arg(long, default_value = "server")]
    pub label: String,
    /// Print the report as one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Seed of the random read order.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Pages/s and latency of one phase.
#[derive(Debug, Serialize, Default)]
pub struct Phase {
    pub pages_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// CPU time the server spent (all its threads, user and system) per
    /// page, when its PID is known: what a page costs, polling included.
    pub server_cpu_us_per_page: Option<f64>,
}

#[derive(Debug, Serialize, Default)]
pub struct Report {
    pub label: String,
    pub depth: usize,
    pub pages: usize,
    pub write: Phase,
    pub read: Phase,
    /// Server RSS growth over the write phase, per page written.
    pub rss_bytes_per_page: Option<f64>,
    /// ramster: store bytes (slabs + index) per page in the store.
    pub store_bytes_per_page: Option<f64>,
    pub store_pages: Option<u64>,
    /// ramster: bytes allocated in the backing file (rejected pages).
    pub backing_bytes: Option<u64>,
    /// RSS growth plus backing file, per page written: everything the
    /// export costs, memory or disk.
    pub total_bytes_per_page: Option<f64>,
}

fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS line")?;
    Ok(kib * 1024)
}

/// CPU time a process has used so far (user + system, all threads).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // After the parenthesised command name, utime and stime are the 12th
    // and 13th fields, in clock ticks.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .with_context(|| format!("field {i} of /proc/{pid}/stat"))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((ticks(11)? + ticks(12)?) / hz)
}

/// Runs a phase, adding the server's CPU time per page if `pid` is known.
fn with_server_cpu(
    pid: Option<u32>,
    pages: usize,
    phase: impl FnOnce() -> anyhow::Result<Phase>,
) -> anyhow::Result<Phase> {
    let before = pid.map(cpu_seconds).transpose()?;
    let mut done = phase()?;
    let after = pid.map(cpu_seconds).transpose()?;
    done.server_cpu_us_per_page = before
        .zip(after)
        .map(|(b, a)| (a - b) * 1e6 / pages.max(1) as f64);
    Ok(done)
}

fn allocated_bytes(path: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .blocks()
        * 512)
}

pub fn run(args: BenchNbdArgs) -> anyhow::Result<()> {
    ensure!(
        (1..=DEPTH_MAX).contains(&args.depth),
        "--depth must be 1..={DEPTH_MAX}"
    );
    let pages = match (&args.corpus, args.synthetic) {
        (Some(path), _) => Pages::from_file(path, None)?,
        (None, Some(n)) => Pages::synthetic(n, args.seed),
        (None, None) => bail!("give --corpus FILE or --synthetic PAGES"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (rd, wr, size) = rt.block_on(connect(args.addr, &args.export))?;
    ensure!(
        size >= (pages.len() * PAGE_BYTES) as u64,
        "export {:?} is {size} bytes; {} pages need {}",
        args.export,
        pages.len(),
        pages.len() * PAGE_BYTES
    );
    let mut conn = Conn {
        rd: BufReader::with_capacity(1 << 20, rd),
        wr,
    };
    let rss_before = args.server_pid.map(rss_bytes).transpose()?;
    let writes: Vec<usize> = (0..pages.len()).collect();
    let write = with_server_cpu(args.server_pid, writes.len(), || {
        rt.block_on(conn.phase(&pages, &writes, args.depth, true))
    })?;
    let rss_after = args.server_pid.map(rss_bytes).transpose()?;
    let mut reads = writes;
    reads.shuffle(&mut SmallRng::seed_from_u64(args.seed));
    let read = with_server_cpu(args.server_pid, reads.len(), || {
        rt.block_on(conn.phase(&pages, &reads, args.depth, false))
    })?;
    rt.block_on(conn.disconnect())?;

    let n = pages.len() as f64;
    let rss_per_page = rss_before
        .zip(rss_after)
        .map(|(b, a)| a.saturating_sub(b) as f64 / n);
    let store = args
        .api_socket
        .as_deref()
        .map(|s| BlockingClient::connect(s).and_then(|c| c.stats()))
        .transpose()
        .context("store stats over the API")?
        .and_then(|s| s.store);
    let backing_bytes = args.backing.as_deref().map(allocated_bytes).transpose()?;
    let report = Report {
        label: args.label.clone(),
        depth: args.depth,
        pages: pages.len(),
        write,
        read,
        rss_bytes_per_page: rss_per_page,
        store_bytes_per_page: store
            .as_ref()
            .filter(|s| s.pages > 0)
            .map(|s| (s.slab_bytes + s.index_bytes) as f64 / s.pages as f64),
        store_pages: store.as_ref().map(|s| s.pages),
        backing_bytes,
        total_bytes_per_page: rss_per_page.map(|r| r + backing_bytes.unwrap_or(0) as f64 / n),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &Report) {
    println!(
        "{} depth {}: {} pages, write {:.0} pages/s (p50 {:.1} us, p99 {:.1} us), \
         read+verify {:.0} pages/s (p50 {:.1} us, p99 {:.1} us)",
        r.label,
        r.depth,
        r.pages,
        r.write.pages_per_s,
        r.write.p50_us,
        r.write.p99_us,
        r.read.pages_per_s,
        r.read.p50_us,
        r.read.p99_us
    );
    if let (Some(w), Some(rd)) = (
        r.write.server_cpu_us_per_page,
        r.read.server_cpu_us_per_page,
    ) {
        println!("  server CPU: {w:.1} us/page writing, {rd:.1} us/page reading");
    }
    if let Some(b) = r.rss_bytes_per_page {
        println!("  server RSS growth: {b:.0} B/page");
    }
    if let (Some(b), Some(p)) = (r.store_bytes_per_page, r.store_pages) {
        println!("  store: {p} pages, {b:.0} B/page (slabs + index)");
    }
    if let Some(b) = r.backing_bytes {
        println!("  backing file: {b} bytes allocated");
    }
    if let Some(t) = r.total_bytes_per_page {
        println!("  total (RSS growth + backing file): {t:.0} B/page");
    }
}

/// Opens a connection and negotiates `export` with NBD_OPT_GO; the halves
/// and the export's size.
async fn connect(
    addr: SocketAddr,
    export: &str,
) -> anyhow::Result<(OwnedReadHalf, OwnedWriteHalf, u64)> {
    let s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    let (mut rd, mut wr) = s.into_split();
    let mut greeting = [0u8; proto::GREETING_BYTES];
    timed(rd.read_exact(&mut greeting)).await?;
    ensure!(
        greeting[..8] == proto::NBD_MAGIC.to_be_bytes()
            && greeting[8..16] == proto::IHAVEOPT.to_be_bytes(),
        "{addr} is not a newstyle NBD server"
    );
    let mut msg = (proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    msg.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    msg.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
    msg.extend_from_slice(&(export.len() as u32).to_be_bytes());
    msg.extend_from_slice(export.as_bytes());
    msg.extend_from_slice(&0u16.to_be_bytes());
    wr.write_all(&msg).await?;
    let mut size = None;
    // A server sends a handful of infos then ACK; bound it anyway.
    for _ in 0..64 {
        let mut h = [0u8; 20];
        timed(rd.read_exact(&mut h)).await?;
        let reply = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes")) as usize;
        ensure!(
            len <= proto::OPTION_BYTES_MAX,
            "option reply of {len} bytes"
        );
        let mut data = vec![0u8; len];
        timed(rd.read_exact(&mut data)).await?;
        match reply {
            proto::REP_ACK => {
                let size = size.context("server sent no NBD_INFO_EXPORT")?;
                return Ok((rd, wr, size));
            }
            proto::REP_INFO if len >= 12 && data[..2] == [0, 0] => {
                size = Some(u64::from_be_bytes(data[2..10].try_into().expect("8 bytes")));
            }
            proto::REP_INFO => {}
            e => bail!(
                "export {export:?}: server answered {e:#x}: {}",
                String::from_utf8_lossy(&data)
            ),
        }
    }
    bail!("no ACK to NBD_OPT_GO")
}

async fn timed<T>(f: impl std::future::Future<Output = std::io::Result<T>>) -> anyhow::Result<T> {
    Ok(tokio::time::timeout(REPLY_TIMEOUT, f)
        .await
        .context("the NBD server did not answer in time")??)
}

struct Conn {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
}

fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let i = ((sorted_ns.len() - 1) as f64 * p).round() as usize;
    sorted_ns[i] as f64 / 1000.0
}

impl Conn {
    /// Writes (or reads and verifies) the pages `order` names, page `i` at
    /// offset `i * PAGE_BYTES`, keeping `depth` requests in flight.
    async fn phase(
        &mut self,
        pages: &Pages,
        order: &[usize],
        depth: usize,
        write: bool,
    ) -> anyhow::Result<Phase> {
        let window = Arc::new(Semaphore::new(depth));
        let sent_at: Arc<[AtomicU64]> = (0..order.len()).map(|_| AtomicU64::new(0)).collect();
        let t0 = Instant::now();
        let send = {
            let window = window.clone();
            let sent_at = sent_at.clone();
            let wr = &mut self.wr;
            async move {
                let mut msg = Vec::with_capacity(proto::REQUEST_HEADER_BYTES + PAGE_BYTES);
                for (handle, &page) in order.iter().enumerate() {
                    window.acquire().await.expect("open").forget();
                    msg.clear();
                    msg.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
                    msg.extend_from_slice(&0u16.to_be_bytes());
                    let cmd = if write {
                        proto::CMD_WRITE
                    } else {
                        proto::CMD_READ
                    };
                    msg.extend_from_slice(&cmd.to_be_bytes());
                    msg.extend_from_slice(&(handle as u64).to_be_bytes());
                    msg.extend_from_slice(&((page * PAGE_BYTES) as u64).to_be_bytes());
                    msg.extend_from_slice(&(PAGE_BYTES as u32).to_be_bytes());
                    if write {
                        msg.extend_from_slice(pages.page(page));
                    }
                    sent_at[handle].store(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    wr.write_all(&msg).await?;
                }
                anyhow::Ok(())
            }
        };
        let receive = {
            let rd = &mut self.rd;
            async move {
                let mut latencies = Vec::with_capacity(order.len());
                let mut data = vec![0u8; PAGE_BYTES];
                for _ in 0..order.len() {
                    let mut h = [0u8; proto::SIMPLE_REPLY_HEADER_BYTES];
                    timed(rd.read_exact(&mut h)).await?;
                    ensure!(
                        h[..4] == proto::SIMPLE_REPLY_MAGIC.to_be_bytes(),
                        "not a simple reply"
                    );
                    let error = u32::from_be_bytes(h[4..8].try_into().expect("4 bytes"));
                    let handle = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes")) as usize;
                    ensure!(handle < order.len(), "reply to unknown handle {handle}");
                    ensure!(error == 0, "request {handle} failed with errno {error}");
                    if !write {
                        timed(rd.read_exact(&mut data)).await?;
                        ensure!(
                            data[..] == pages.page(order[handle])[..],
                            "page {} read back different bytes",
                            order[handle]
                        );
                    }
                    let now = t0.elapsed().as_nanos() as u64;
                    latencies.push(now - sent_at[handle].load(Ordering::Relaxed));
                    window.add_permits(1);
                }
                anyhow::Ok(latencies)
            }
        };
        let (sent, latencies) = tokio::join!(send, receive);
        sent?;
        let mut latencies = latencies?;
        let elapsed = t0.elapsed().as_secs_f64();
        latencies.sort_unstable();
        Ok(Phase {
            pages_per_s: order.len() as f64 / elapsed,
            p50_us: percentile_us(&latencies, 0.5),
            p99_us: percentile_us(&latencies, 0.99),
            server_cpu_us_per_page: None,
        })
    }

    async fn disconnect(&mut self) -> anyhow::Result<()> {
        let mut msg = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
        msg.extend_from_slice(&0u16.to_be_bytes());
        msg.extend_from_slice(&proto::CMD_DISC.to_be_bytes());
        msg.extend_from_slice(&[0u8; 20]);
        self.wr.write_all(&msg).await?;
        Ok(())
    }
}
