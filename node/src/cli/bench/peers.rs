//! The same bench against the systems ramster is measured by: zram (the
//! kernel's compressed RAM block device), memcached and Redis. Same pages,
//! same phases (store all, load all in the same random order, verify every
//! byte), same [`Report`], so the figures can be read side by side.
//!
//! This is bench code only; nothing here is on the store's page path.
//!
//! - zram: the device is reset, set to lz4 and sized for the pages; each page
//!   is one 4 KiB `O_DIRECT` pwrite on one thread, then one `O_DIRECT` pread
//!   per page. Memory is the device's own `mm_stat` `mem_used_total`.
//! - memcached and Redis: one page per request under a short key, `--depth`
//!   requests pipelined on one TCP connection. Memory is what the server
//!   itself reports: memcached `stats slabs` `total_malloced` plus `stats`
//!   `hash_bytes`; Redis `INFO memory` `used_memory` grown since a
//!   `FLUSHALL`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::ValueEnum;
use indicatif::ProgressBar;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{Semaphore, mpsc};

use super::{BenchArgs, Pages, Report, Tally, bar, load_order, percentile_us};
use crate::store::PAGE_BYTES;

/// A system to run the bench against.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Peer {
    /// A zram block device, lz4, 4 KiB O_DIRECT reads and writes.
    Zram,
    /// memcached over TCP, text protocol, pipelined.
    Memcached,
    /// Redis over TCP, RESP, pipelined.
    Redis,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Zram => "zram",
            Peer::Memcached => "memcached",
            Peer::Redis => "redis",
        }
    }

    fn default_addr(self) -> &'static str {
        match self {
            Peer::Zram => "",
            Peer::Memcached => "127.0.0.1:11211",
            Peer::Redis => "127.0.0.1:6379",
        }
    }
}

/// Runs the bench against `peer`.
pub fn run(
    args: &BenchArgs,
    peer: Peer,
    pages: &Pages,
    source: String,
    progress: bool,
) -> anyhow::Result<Report> {
    match peer {
        Peer::Zram => run_zram(args, &args.peer_device, pages, source, progress),
        Peer::Memcached | Peer::Redis => {
            let addr = args
                .peer_addr
                .clone()
                .unwrap_or_else(|| peer.default_addr().to_string());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run_tcp(args, peer, &addr, pages, source, progress))
        }
    }
}

/// What one run against a peer measured, before it becomes a [`Report`].
struct Measured {
    peer: Peer,
    mode: &'static str,
    depth: usize,
    tally: Tally,
    store: (f64, Vec<Duration>),
    load: (f64, Vec<Duration>),
    memory: Memory,
}

/// A peer's memory, as the peer reports it.
struct Memory {
    /// Everything the peer holds for the pages.
    total_bytes: u64,
    /// Compressed bytes alone, where the peer compresses.
    payload_bytes: Option<u64>,
    /// Pages kept whole although the peer compresses (zram's huge pages).
    whole_pages: u64,
    /// The peer's limit, 0 if none.
    capacity_bytes: u64,
    basis: String,
}

fn report(m: Measured, source: String, pages: usize) -> Report {
    let Measured {
        peer,
        mode,
        depth,
        tally,
        store: (store_secs, mut store_lat),
        load: (load_secs, mut load_lat),
        memory,
    } = m;
    let mb = (pages * PAGE_BYTES) as f64 / 1e6;
    let accepted = tally.accepted.iter().filter(|a| **a).count();
    let per = |bytes: u64, n: u64| if n == 0 { 0.0 } else { bytes as f64 / n as f64 };
    let held = accepted as u64;
    let compressed_pages = held.saturating_sub(memory.whole_pages);
    let compressed_bytes = memory
        .total_bytes
        .saturating_sub(memory.whole_pages * PAGE_BYTES as u64);
    let bytes_per_page = per(memory.total_bytes, held);
    let payload = memory.payload_bytes.unwrap_or(memory.total_bytes);
    Report {
        system: peer.name().into(),
        mode: mode.into(),
        source,
        pages,
        batch: 1,
        depth,
        accepted,
        rejected: pages - accepted,
        rejected_no_capacity: tally.rejected_no_capacity,
        rejected_incompressible: 0,
        store_pages_per_sec: pages as f64 / store_secs,
        store_mb_per_sec: mb / store_secs,
        load_pages_per_sec: pages as f64 / load_secs,
        load_mb_per_sec: mb / load_secs,
        latency_unit: "request".into(),
        store_p50_us: percentile_us(&mut store_lat, 0.50),
        store_p99_us: percentile_us(&mut store_lat, 0.99),
        load_p50_us: percentile_us(&mut load_lat, 0.50),
        load_p99_us: percentile_us(&mut load_lat, 0.99),
        compression_ratio: per(held * PAGE_BYTES as u64, memory.total_bytes),
        payload_ratio: per(held * PAGE_BYTES as u64, payload),
        bytes_per_page,
        bytes_per_compressed_page: per(compressed_bytes, compressed_pages),
        memory_basis: memory.basis,
        payload_bytes_per_page: per(payload, held),
        slack_bytes_per_page: per(memory.total_bytes.saturating_sub(payload), held),
        index_bytes_per_page: 0.0,
        fragmentation: 0.0,
        used_bytes: memory.total_bytes,
        capacity_bytes: memory.capacity_bytes,
        mismatches: tally.mismatches,
        verified: tally.mismatches == 0,
    }
}

fn new_tally(n: usize) -> Tally {
    Tally {
        accepted: vec![false; n],
        rejected_no_capacity: 0,
        rejected_incompressible: 0,
        mismatches: 0,
    }
}

// ---------------------------------------------------------------- zram

/// A page buffer aligned for `O_DIRECT`.
#[repr(C, align(4096))]
struct AlignedPage([u8; PAGE_BYTES]);

/// The zram device's sysfs directory, reset when dropped so the memory the
/// bench filled is given back even if the run fails half-way.
struct ZramDevice {
    device: PathBuf,
    sys: PathBuf,
}

impl ZramDevice {
    /// Claims `device`: refuses if anything uses it, then resets it and sets
    /// it up as lz4 with room for `bytes`.
    fn claim(device: &Path, bytes: u64) -> anyhow::Result<ZramDevice> {
        let name = device
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| n.starts_with("zram"))
            .with_context(|| format!("{} is not a zram device", device.display()))?;
        let sys = Path::new("/sys/block").join(name);
        ensure!(
            sys.join("reset").exists(),
            "{} has no zram sysfs directory ({}): is the zram module loaded (modprobe zram)?",
            device.display(),
            sys.display()
        );
        refuse_if_in_use(device, &sys)?;
        // Resetting also proves nobody holds the device open (EBUSY); only
        // once it succeeded is the device ours to reset again on drop.
        reset(device, &sys)?;
        let zram = ZramDevice {
            device: device.to_path_buf(),
            sys,
        };
        zram.write_attr("comp_algorithm", "lz4")
            .context("setting comp_algorithm lz4 (is lz4 built into this kernel?)")?;
        let algorithms = zram.read_attr("comp_algorithm")?;
        ensure!(
            algorithms.contains("[lz4]"),
            "zram did not take lz4: comp_algorithm reads {algorithms:?}"
        );
        zram.write_attr("disksize", &bytes.to_string())?;
        Ok(zram)
    }

    fn reset(&self) -> anyhow::Result<()> {
        reset(&self.device, &self.sys)
    }

    fn write_attr(&self, attr: &str, value: &str) -> anyhow::Result<()> {
        write_attr(&self.sys, attr, value)
    }

    fn read_attr(&self, attr: &str) -> anyhow::Result<String> {
        let path = self.sys.join(attr);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// `mm_stat`: orig_data_size compr_data_size mem_used_total mem_limit
    /// mem_used_max same_pages pages_compacted huge_pages ...
    fn mm_stat(&self) -> anyhow::Result<MmStat> {
        let text = self.read_attr("mm_stat")?;
        let f: Vec<u64> = text
            .split_whitespace()
            .map(|w| w.parse::<u64>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("parsing mm_stat {text:?}"))?;
        ensure!(
            f.len() >= 8,
            "mm_stat has {} fields, expected 8 or more",
            f.len()
        );
        Ok(MmStat {
            compr_data_size: f[1],
            mem_used_total: f[2],
            same_pages: f[5],
            huge_pages: f[7],
        })
    }
}

impl Drop for ZramDevice {
    fn drop(&mut self) {
        if let Err(e) = self.reset() {
            eprintln!("warning: {e:#}");
        }
    }
}

fn write_attr(sys: &Path, attr: &str, value: &str) -> anyhow::Result<()> {
    let path = sys.join(attr);
    std::fs::write(&path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

fn reset(device: &Path, sys: &Path) -> anyhow::Result<()> {
    write_attr(sys, "reset", "1").with_context(|| {
        format!(
            "resetting {} (is it open, mounted or swapped on?)",
            device.display()
        )
    })
}

struct MmStat {
    compr_data_size: u64,
    mem_used_total: u64,
    same_pages: u64,
    huge_pages: u64,
}

/// A device that is swapped on or mounted must never be reset under its user.
fn refuse_if_in_use(device: &Path, sys: &Path) -> anyhow::Result<()> {
    let real = std::fs::canonicalize(device).unwrap_or_else(|_| device.to_path_buf());
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    if names_device(&swaps, 1, &[device, &real]) {
        bail!(
            "{} is an active swap device (see /proc/swaps); refusing to reset it. \
             Run `swapoff {}` first or pick another device with --peer-device",
            device.display(),
            device.display()
        );
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if names_device(&mounts, 0, &[device, &real]) {
        bail!(
            "{} is mounted (see /proc/mounts); refusing to reset it",
            device.display()
        );
    }
    let holders = std::fs::read_dir(sys.join("holders"))
        .map(|d| d.count())
        .unwrap_or(0);
    if holders > 0 {
        bail!(
            "{} is held by another block device (see {}); refusing to reset it",
            device.display(),
            sys.join("holders").display()
        );
    }
    Ok(())
}

/// Whether a table such as /proc/swaps or /proc/mounts (after `header`
/// lines) has a line whose first field is one of `names`.
fn names_device(table: &str, header: usize, names: &[&Path]) -> bool {
    table
        .lines()
        .skip(header)
        .filter_map(|l| l.split_whitespace().next())
        .any(|first| names.iter().any(|n| Path::new(first) == *n))
}

fn run_zram(
    args: &BenchArgs,
    device: &Path,
    pages: &Pages,
    source: String,
    progress: bool,
) -> anyhow::Result<Report> {
    let n = pages.len();
    let disksize = (n * PAGE_BYTES) as u64;
    let zram = ZramDevice::claim(device, disksize)?;
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .with_context(|| format!("opening {} with O_DIRECT", device.display()))?;
    let mut tally = new_tally(n);
    let mut buf = Box::new(AlignedPage([0; PAGE_BYTES]));

    let mut store_lat = Vec::with_capacity(n);
    let pb = bar(n, "store", progress);
    let t0 = Instant::now();
    for i in 0..n {
        let s = Instant::now();
        // O_DIRECT needs an aligned buffer; the copy is part of a write.
        buf.0.copy_from_slice(pages.page(i));
        file.write_all_at(&buf.0, (i * PAGE_BYTES) as u64)
            .with_context(|| format!("writing page {i} to {}", device.display()))?;
        store_lat.push(s.elapsed());
        tally.accepted[i] = true;
        tick(&pb, i);
    }
    file.sync_all()?;
    let store_secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let mm = zram.mm_stat()?;

    let order = load_order(n, args.seed);
    let mut load_lat = Vec::with_capacity(n);
    let pb = bar(n, "load", progress);
    let t0 = Instant::now();
    for (k, &i) in order.iter().enumerate() {
        let s = Instant::now();
        file.read_exact_at(&mut buf.0, (i * PAGE_BYTES) as u64)
            .with_context(|| format!("reading page {i} from {}", device.display()))?;
        load_lat.push(s.elapsed());
        tally.mismatches += (buf.0[..] != pages.page(i)[..]) as usize;
        tick(&pb, k);
    }
    let load_secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    drop(file);
    drop(zram);

    let memory = Memory {
        total_bytes: mm.mem_used_total,
        payload_bytes: Some(mm.compr_data_size),
        whole_pages: mm.huge_pages,
        capacity_bytes: disksize,
        basis: format!(
            "zram mm_stat mem_used_total / pages written ({} same-filled pages, \
             {} huge pages kept whole at {PAGE_BYTES} B)",
            mm.same_pages, mm.huge_pages
        ),
    };
    Ok(report(
        Measured {
            peer: Peer::Zram,
            mode: "block device, O_DIRECT",
            depth: 1,
            tally,
            store: (store_secs, store_lat),
            load: (load_secs, load_lat),
            memory,
        },
        source,
        n,
    ))
}

fn tick(pb: &ProgressBar, k: usize) {
    if k % 1024 == 1023 {
        pb.inc(1024);
    }
}

// ----------------------------------------------------- memcached, Redis

/// Longest reply line accepted (a status line or a value header), so a
/// misbehaving server cannot grow the bench's buffer without bound.
const REPLY_LINE_BYTES_MAX: usize = 1024;

fn key(i: usize) -> String {
    format!("p{i}")
}

/// One request, appended to `out`.
fn encode_request(peer: Peer, phase: Phase, i: usize, pages: &Pages, out: &mut Vec<u8>) {
    let k = key(i);
    match (peer, phase) {
        (Peer::Memcached, Phase::Store) => {
            out.extend_from_slice(format!("set {k} 0 0 {PAGE_BYTES}\r\n").as_bytes());
            out.extend_from_slice(pages.page(i));
            out.extend_from_slice(b"\r\n");
        }
        (Peer::Memcached, Phase::Load) => {
            out.extend_from_slice(format!("get {k}\r\n").as_bytes());
        }
        (Peer::Redis, Phase::Store) => {
            out.extend_from_slice(
                format!(
                    "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${PAGE_BYTES}\r\n",
                    k.len()
                )
                .as_bytes(),
            );
            out.extend_from_slice(pages.page(i));
            out.extend_from_slice(b"\r\n");
        }
        (Peer::Redis, Phase::Load) => {
            out.extend_from_slice(format!("*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n", k.len()).as_bytes());
        }
        (Peer::Zram, _) => unreachable!("zram is a block device"),
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Phase {
    Store,
    Load,
}

/// A reply, as far as the bench cares.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Stored,
    /// The server refused a store for lack of memory.
    Refused,
    /// The page is in `page`.
    Hit,
    Miss,
}

/// Reads one line ending in `\r\n` into `line` (without it).
async fn read_line(rd: &mut BufReader<OwnedReadHalf>, line: &mut Vec<u8>) -> anyhow::Result<()> {
    line.clear();
    let mut limited = (&mut *rd).take(REPLY_LINE_BYTES_MAX as u64);
    let got = limited.read_until(b'\n', line).await?;
    ensure!(got > 0, "the server closed the connection");
    ensure!(
        line.ends_with(b"\r\n"),
        "reply line longer than {REPLY_LINE_BYTES_MAX} bytes or cut short: {:?}",
        String::from_utf8_lossy(line)
    );
    line.truncate(line.len() - 2);
    Ok(())
}

/// Reads a value of exactly one page followed by `\r\n` into `page`.
async fn read_value(
    rd: &mut BufReader<OwnedReadHalf>,
    len: &[u8],
    page: &mut [u8; PAGE_BYTES + 2],
) -> anyhow::Result<()> {
    ensure!(
        len == PAGE_BYTES.to_string().as_bytes(),
        "value of {} bytes; every stored value is one {PAGE_BYTES}-byte page",
        String::from_utf8_lossy(len)
    );
    rd.read_exact(&mut page[..]).await?;
    ensure!(&page[PAGE_BYTES..] == b"\r\n", "value not ended by CRLF");
    Ok(())
}

async fn read_reply(
    peer: Peer,
    phase: Phase,
    rd: &mut BufReader<OwnedReadHalf>,
    line: &mut Vec<u8>,
    page: &mut [u8; PAGE_BYTES + 2],
) -> anyhow::Result<Reply> {
    read_line(rd, line).await?;
    let text = || String::from_utf8_lossy(line).into_owned();
    match (peer, phase) {
        (Peer::Memcached, Phase::Store) => match &line[..] {
            b"STORED" => Ok(Reply::Stored),
            l if l.starts_with(b"SERVER_ERROR out of memory") => Ok(Reply::Refused),
            _ => bail!("memcached answered a set with {:?}", text()),
        },
        (Peer::Memcached, Phase::Load) => {
            if line == b"END" {
                return Ok(Reply::Miss);
            }
            // VALUE <key> <flags> <bytes>
            let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
            ensure!(
                fields.len() == 4 && fields[0] == b"VALUE",
                "memcached answered a get with {:?}",
                text()
            );
            let len = fields[3].to_vec();
            read_value(rd, &len, page).await?;
            read_line(rd, line).await?;
            ensure!(line == b"END", "memcached value not followed by END");
            Ok(Reply::Hit)
        }
        (Peer::Redis, Phase::Store) => match &line[..] {
            b"+OK" => Ok(Reply::Stored),
            l if l.starts_with(b"-OOM") => Ok(Reply::Refused),
            _ => bail!("redis answered a SET with {:?}", text()),
        },
        (Peer::Redis, Phase::Load) => match &line[..] {
            b"$-1" => Ok(Reply::Miss),
            [b'$', len @ ..] => {
                let len = len.to_vec();
                read_value(rd, &len, page).await?;
                Ok(Reply::Hit)
            }
            _ => bail!("redis answered a GET with {:?}", text()),
        },
        (Peer::Zram, _) => unreachable!("zram is a block device"),
    }
}

/// Sends one request per index of `order` on a fresh connection, keeping
/// `depth` in flight, and hands each reply to `on_reply` in order. Requests
/// that find free slots together go out in one write, as a pipelining
/// client does. Returns the elapsed seconds and the latency of each request.
#[allow(clippy::too_many_arguments)]
async fn pipeline(
    peer: Peer,
    addr: &str,
    phase: Phase,
    depth: usize,
    order: &[usize],
    pages: &Pages,
    pb: &ProgressBar,
    mut on_reply: impl FnMut(usize, Reply, &[u8]),
) -> anyhow::Result<(f64, Vec<Duration>)> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {} at {addr}", peer.name()))?;
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(256 * 1024, rd);
    let slots = Semaphore::new(depth);
    // The writer tells the reader which request each reply answers, and when
    // it left; the channel never holds more than `depth` entries.
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    let n = order.len();
    let t0 = Instant::now();

    let writer = async {
        let mut out = Vec::with_capacity(depth * (PAGE_BYTES + 64));
        let mut next = 0;
        while next < n {
            slots.acquire().await?.forget();
            let mut granted = 1;
            while granted < n - next {
                match slots.try_acquire() {
                    Ok(p) => {
                        p.forget();
                        granted += 1;
                    }
                    Err(_) => break,
                }
            }
            out.clear();
            let sent_at = Instant::now();
            for &i in &order[next..next + granted] {
                encode_request(peer, phase, i, pages, &mut out);
                sent_tx.send((i, sent_at))?;
            }
            next += granted;
            wr.write_all(&out).await?;
        }
        wr.flush().await?;
        anyhow::Ok(wr)
    };
    let reader = async {
        let mut latencies = Vec::with_capacity(n);
        let mut line = Vec::with_capacity(REPLY_LINE_BYTES_MAX);
        let mut page = Box::new([0u8; PAGE_BYTES + 2]);
        for k in 0..n {
            let (i, sent_at) = sent_rx.recv().await.context("the writer stopped early")?;
            let reply = read_reply(peer, phase, &mut rd, &mut line, &mut page).await?;
            latencies.push(sent_at.elapsed());
            slots.add_permits(1);
            on_reply(i, reply, &page[..PAGE_BYTES]);
            tick(pb, k);
        }
        anyhow::Ok(latencies)
    };
    let (_wr, latencies) = tokio::try_join!(writer, reader)?;
    Ok((t0.elapsed().as_secs_f64(), latencies))
}

/// A short request/response exchange on its own connection, for control
/// commands (flush, stats); reads until a line equal to `last` (memcached)
/// or one RESP bulk string (Redis).
async fn control(peer: Peer, addr: &str, command: &[u8]) -> anyhow::Result<String> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {} at {addr}", peer.name()))?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    wr.write_all(command).await?;
    let mut line = Vec::new();
    let mut text = String::new();
    /// Bounds the lines of a stats answer (memcached prints about 100).
    const CONTROL_LINES_MAX: usize = 10_000;
    match peer {
        Peer::Memcached => {
            for _ in 0..CONTROL_LINES_MAX {
                read_line(&mut rd, &mut line).await?;
                let l = String::from_utf8_lossy(&line);
                if l == "END" || l == "OK" {
                    return Ok(text);
                }
                ensure!(!l.contains("ERROR"), "memcached answered {l:?}");
                text.push_str(&l);
                text.push('\n');
            }
            bail!("memcached answer longer than {CONTROL_LINES_MAX} lines")
        }
        Peer::Redis => {
            read_line(&mut rd, &mut line).await?;
            match line.first() {
                Some(b'+') => Ok(String::from_utf8_lossy(&line[1..]).into_owned()),
                Some(b'$') => {
                    let len: usize = std::str::from_utf8(&line[1..])?.parse()?;
                    ensure!(len <= 1 << 20, "redis INFO of {len} bytes");
                    let mut body = vec![0u8; len + 2];
                    rd.read_exact(&mut body).await?;
                    Ok(String::from_utf8_lossy(&body[..len]).into_owned())
                }
                _ => bail!("redis answered {:?}", String::from_utf8_lossy(&line)),
            }
        }
        Peer::Zram => unreachable!("zram is a block device"),
    }
}

/// The value of `name` in a stats answer: `STAT name value` (memcached) or
/// `name:value` (Redis INFO).
fn stat(text: &str, name: &str) -> anyhow::Result<u64> {
    text.lines()
        .find_map(|l| {
            let l = l.trim_end();
            l.strip_prefix("STAT ")
                .and_then(|r| r.strip_prefix(name))
                .and_then(|r| r.strip_prefix(' '))
                .or_else(|| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        })
        .with_context(|| format!("no {name} in the server's stats"))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {name}"))
}

const REDIS_INFO_MEMORY: &[u8] = b"*2\r\n$4\r\nINFO\r\n$6\r\nmemory\r\n";

async fn run_tcp(
    args: &BenchArgs,
    peer: Peer,
    addr: &str,
    pages: &Pages,
    source: String,
    progress: bool,
) -> anyhow::Result<Report> {
    let n = pages.len();
    // Start from an empty server; Redis's baseline is taken after the flush.
    let baseline = match peer {
        Peer::Memcached => {
            control(peer, addr, b"flush_all\r\n").await?;
            0
        }
        Peer::Redis => {
            control(peer, addr, b"*1\r\n$8\r\nFLUSHALL\r\n").await?;
            stat(
                &control(peer, addr, REDIS_INFO_MEMORY).await?,
                "used_memory",
            )?
        }
        Peer::Zram => unreachable!("zram is a block device"),
    };

    let mut tally = new_tally(n);
    let stores: Vec<usize> = (0..n).collect();
    let pb = bar(n, "store", progress);
    let store = pipeline(
        peer,
        addr,
        Phase::Store,
        args.depth,
        &stores,
        pages,
        &pb,
        |i, r, _| match r {
            Reply::Stored => tally.accepted[i] = true,
            _ => tally.rejected_no_capacity += 1,
        },
    )
    .await?;
    pb.finish_and_clear();

    let memory = match peer {
        Peer::Memcached => {
            let slabs = control(peer, addr, b"stats slabs\r\n").await?;
            let general = control(peer, addr, b"stats\r\n").await?;
            let malloced = stat(&slabs, "total_malloced")?;
            let hash = stat(&general, "hash_bytes")?;
            Memory {
                total_bytes: malloced + hash,
                payload_bytes: Some(stat(&general, "bytes")?),
                whole_pages: 0,
                capacity_bytes: stat(&general, "limit_maxbytes")?,
                basis: "memcached stats slabs total_malloced + stats hash_bytes / pages \
                        (payload: stats bytes, items with their headers)"
                    .into(),
            }
        }
        Peer::Redis => {
            let info = control(peer, addr, REDIS_INFO_MEMORY).await?;
            Memory {
                total_bytes: stat(&info, "used_memory")?.saturating_sub(baseline),
                payload_bytes: None,
                whole_pages: 0,
                capacity_bytes: stat(&info, "maxmemory")?,
                basis: "redis INFO used_memory grown since FLUSHALL / pages".into(),
            }
        }
        Peer::Zram => unreachable!("zram is a block device"),
    };

    let order = load_order(n, args.seed);
    let pb = bar(n, "load", progress);
    let accepted = &tally.accepted;
    let mut mismatches = 0;
    let load = pipeline(
        peer,
        addr,
        Phase::Load,
        args.depth,
        &order,
        pages,
        &pb,
        |i, r, got| {
            let good = match r {
                Reply::Hit => accepted[i] && got == &pages.page(i)[..],
                Reply::Miss => !accepted[i],
                Reply::Stored | Reply::Refused => false,
            };
            mismatches += !good as usize;
        },
    )
    .await?;
    pb.finish_and_clear();
    tally.mismatches = mismatches;

    Ok(report(
        Measured {
            peer,
            mode: "tcp",
            depth: args.depth,
            tally,
            store,
            load,
            memory,
        },
        source,
        n,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_memcached_and_redis_stats_by_exact_name() {
        let memcached = "STAT bytes_read 10\nSTAT bytes 4200\nSTAT hash_bytes 524288\n";
        assert_eq!(stat(memcached, "bytes").unwrap(), 4200);
        assert_eq!(stat(memcached, "hash_bytes").unwrap(), 524288);
        let redis = "# Memory\r\nused_memory_rss:900\r\nused_memory:1234\r\nmaxmemory:0\r\n";
        assert_eq!(stat(redis, "used_memory").unwrap(), 1234);
        assert_eq!(stat(redis, "maxmemory").unwrap(), 0);
        assert!(stat(redis, "used").is_err());
    }

    #[test]
    fn a_swapped_on_zram_device_is_recognised() {
        let swaps = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
                     /dev/zram0                              partition\t4194300\t\t0\t\t100\n";
        let zram0 = Path::new("/dev/zram0");
        assert!(names_device(swaps, 1, &[zram0]));
        assert!(!names_device(swaps, 1, &[Path::new("/dev/zram1")]));
        // The header line is never taken for a device.
        assert!(!names_device(
            "Filename Type\n",
            1,
            &[Path::new("Filename")]
        ));
        let mounts = "/dev/vda / ext4 rw 0 0\n/dev/zram1 /tmp ext4 rw 0 0\n";
        assert!(names_device(mounts, 0, &[Path::new("/dev/zram1")]));
        assert!(!names_device(mounts, 0, &[zram0]));
    }

    #[test]
    fn requests_carry_one_page_under_a_short_key() {
        let pages = Pages::synthetic(2, 7);
        let mut out = Vec::new();
        encode_request(Peer::Memcached, Phase::Store, 1, &pages, &mut out);
        assert!(out.starts_with(b"set p1 0 0 4096\r\n"));
        assert_eq!(&out[17..17 + PAGE_BYTES], &pages.page(1)[..]);
        assert!(out.ends_with(b"\r\n"));
        out.clear();
        encode_request(Peer::Redis, Phase::Load, 0, &pages, &mut out);
        assert_eq!(out, b"*2\r\n$3\r\nGET\r\n$2\r\np0\r\n");
    }
}
