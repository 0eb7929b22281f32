//! An NBD export: a frontswap persistent area with a real swap device behind
//! it, as the kernel had.
//!
//! Every page of the export lives in exactly one of three places:
//! - the page store (frontswap accepted it): its bit in `in_store` is set;
//! - the sparse backing file (the store rejected it, as the kernel then wrote
//!   the page to the swap device): its bit in `in_backing` is set;
//! - nowhere: never written, trimmed, or zeroed; it reads as zeros, unless
//!   an earlier run of the export may have held it (see [`run`](super::run)):
//!   then it reads as an error.
//!
//! Both bits are never set at once. Each page has a lock (striped), held for
//! the whole of one page's load/modify/store, so that concurrent sub-page
//! writes from several requests or connections never lose each other's
//! bytes, and a read never sees a page half-moved between store and file.
//!
//! Every request is carried out before it is answered: a WRITE's reply
//! means the page is in the store or in the backing file, so an error
//! always reaches the request that caused it.
//!
//! The export starts empty every time the node starts: its store pages live
//! in RAM and die with the process, so the backing file alone would be a
//! stale half of the device. It is truncated on open, and the pages an
//! earlier run held answer EIO until they are written again.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, MutexGuard};
use serde::Serialize;

use super::run::{Run, record_path};
use crate::frontend::frontswap::{AREA_ID_MAX, AreaId};
use crate::frontend::{Frontend, LoadResult, OpError, Reject, StoreResult};
use crate::store::{PAGE_BYTES, Page};

/// Exports one node may serve.
pub const EXPORTS_MAX: usize = 1024;
/// The largest export: 1 TiB (its two bitmaps then take 64 MiB).
pub const EXPORT_BYTES_MAX: u64 = 1 << 40;
/// Page locks, shared by stripes of pages. Adjacent pages use different
/// locks, so the pages of one sequential request never wait on each other.
pub const PAGE_LOCK_STRIPES: usize = 4096;

/// Exports take the top [`EXPORTS_MAX`] ids of the frontswap area range.
/// The native API refuses these ids (see [`is_export_area`]), so a client
/// can never init, store into or invalidate an export's area.
pub const EXPORT_AREA_FIRST: AreaId = AREA_ID_MAX - EXPORTS_MAX as AreaId + 1;

/// Whether `area` belongs to an NBD export (and so is off limits to API clients).
pub fn is_export_area(area: AreaId) -> bool {
    (EXPORT_AREA_FIRST..=AREA_ID_MAX).contains(&area)
}

/// `NAME:SIZE[:BACKING_PATH]`, as given on the command line or in TOML.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSpec {
    pub name: String,
    pub size_bytes: u64,
    /// Default: `DATA_DIR/nbd/NAME.swap`.
    pub backing: Option<PathBuf>,
}

impl FromStr for ExportSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.splitn(3, ':');
        let name = parts.next().unwrap_or_default().to_string();
        let size = parts.next().ok_or_else(|| {
            format!("export {s:?} has no size: use NAME:SIZE[:BACKING_PATH], e.g. swap0:4GiB")
        })?;
        let size_bytes = crate::cli::size::parse_size(size)?;
        let backing = parts.next().filter(|p| !p.is_empty()).map(PathBuf::from);
        let spec = ExportSpec {
            name,
            size_bytes,
            backing,
        };
        spec.validate()?;
        Ok(spec)
    }
}

impl ExportSpec {
    fn validate(&self) -> Result<(), String> {
        let name = &self.name;
        // The name becomes a file name under the data dir, so keep it plain.
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            || name.starts_with('.')
        {
            return Err(format!(
                "export name {name:?}: use 1-64 characters of A-Z a-z 0-9 - _ . (not starting with .)"
            ));
        }
        if self.size_bytes == 0
            || !self.size_bytes.is_multiple_of(PAGE_BYTES as u64)
            || self.size_bytes > EXPORT_BYTES_MAX
        {
            return Err(format!(
                "export {name:?}: size {} must be a non-zero multiple of {PAGE_BYTES} bytes, at most 1TiB",
                self.size_bytes
            ));
        }
        Ok(())
    }
}

/// Why an export operation failed; each maps to an NBD error value.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("backing file {path}: {source}")]
    Backing {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("export run record {path}: {source}")]
    RunRecord {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("page {page}: the store's copy failed its checksum")]
    Corrupt { page: u64 },
    #[error("page {page}: the store has no copy though it accepted one")]
    Lost { page: u64 },
    #[error("page {page}: the store's copy is unavailable")]
    Unavailable { page: u64 },
    #[error(
        "page {page}: may have been written before the node restarted, and that data is gone; \
         swapoff, then blkdiscard the device (or write every page) before using it again"
    )]
    LostToRestart { page: u64 },
    #[error("frontswap: {0}")]
    Op(#[from] OpError),
}

impl ExportError {
    /// The errno an NBD client gets.
    pub fn nbd_error(&self) -> u32 {
        use super::proto::{EIO, ENOSPC};
        match self {
            ExportError::Backing { source, .. }
                if source.kind() == std::io::ErrorKind::StorageFull =>
            {
                ENOSPC
            }
            _ => EIO,
        }
    }
}

/// Counters of one export. Atomics with Prometheus-ready names; gauges say so.
#[derive(Debug, Default)]
pub struct ExportMetrics {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub trims: AtomicU64,
    pub flushes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    /// Gauge: pages whose only copy is in the page store.
    pub pages_in_store: AtomicU64,
    /// Gauge: pages whose only copy is in the backing file.
    pub pages_in_backing: AtomicU64,
    /// Page stores the store refused (the page then went to the backing file).
    pub store_rejects_no_capacity: AtomicU64,
    pub store_rejects_incompressible: AtomicU64,
    pub store_rejects_other: AtomicU64,
    /// Requests answered with an error (I/O, corrupt or lost pages).
    pub errors: AtomicU64,
    /// Socket reads that a connection's poll found bytes for, and polls
    /// that found nothing in their window and went to sleep in `recv`.
    pub polls_found: AtomicU64,
    pub polls_slept: AtomicU64,
    /// Gauge: connections in transmission on this export.
    pub connections: AtomicU64,
}

/// A plain copy of [`ExportMetrics`], for logs and stats replies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExportStats {
    pub name: String,
    pub area: AreaId,
    pub size_bytes: u64,
    pub reads: u64,
    pub writes: u64,
    pub write_zeroes: u64,
    pub trims: u64,
    pub flushes: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub pages_in_store: u64,
    pub pages_in_backing: u64,
    pub store_rejects_no_capacity: u64,
    pub store_rejects_incompressible: u64,
    pub store_rejects_other: u64,
    pub errors: u64,
    pub polls_found: u64,
    pub polls_slept: u64,
    pub connections: u64,
    /// This run's id, in hex.
    pub run: String,
    /// Pages that read as errors: an earlier run may have held them.
    pub stale_pages: u64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// One bit per page. Bits are only changed under the page's lock; the
/// atomics make reading them from stats safe, not the page protocol.
pub(super) struct Bitmap {
    words: Box<[AtomicU64]>,
}

impl Bitmap {
    pub(super) fn new(pages: u64) -> Bitmap {
        Bitmap {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    pub(super) fn get(&self, page: u64) -> bool {
        self.words[(page / 64) as usize].load(Ordering::Relaxed) & (1 << (page % 64)) != 0
    }
    /// Sets the bit; whether it was clear.
    pub(super) fn set(&self, page: u64) -> bool {
        let bit = 1 << (page % 64);
        self.words[(page / 64) as usize].fetch_or(bit, Ordering::Relaxed) & bit == 0
    }
    /// Clears the bit; whether it was set.
    fn clear(&self, page: u64) -> bool {
        let bit = 1 << (page % 64);
        self.words[(page / 64) as usize].fetch_and(!bit, Ordering::Relaxed) & bit != 0
    }
}

/// One page's share of a request: `page`, bytes `start..start+len` of it.
#[derive(Copy, Clone, Debug)]
struct Span {
    page: u64,
    start: usize,
    len: usize,
}

impl Span {
    fn whole(&self) -> bool {
        self.len == PAGE_BYTES
    }
}

/// The pages `offset..offset+len` touches. Callers have checked the bounds.
fn spans(offset: u64, len: u64) -> impl Iterator<Item = Span> {
    let end = offset + len;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let page = at / PAGE_BYTES as u64;
        let start = (at % PAGE_BYTES as u64) as usize;
        let len = (PAGE_BYTES - start).min((end - at) as usize);
        at += len as u64;
        Some(Span { page, start, len })
    })
}

const ZERO_PAGE: Page = [0u8; PAGE_BYTES];

/// An export being served.
pub struct Export {
    name: String,
    area: AreaId,
    size_bytes: u64,
    frontend: Arc<Frontend>,
    backing: File,
    backing_path: PathBuf,
    in_store: Bitmap,
    in_backing: Bitmap,
    run: Run,
    page_locks: Box<[Mutex<()>]>,
    metrics: ExportMetrics,
}

impl Export {
    /// Creates the export's area (empty) and its backing file (truncated to
    /// a hole of the export's size), and begins its run.
    pub fn open(
        spec: &ExportSpec,
        area: AreaId,
        frontend: Arc<Frontend>,
        data_dir: &Path,
    ) -> anyhow::Result<Export> {
        use anyhow::Context;
        spec.validate().map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            is_export_area(area),
            "area {area} is not in the export range"
        );
        let backing_path = spec
            .backing
            .clone()
            .unwrap_or_else(|| data_dir.join("nbd").join(format!("{}.swap", spec.name)));
        if let Some(dir) = backing_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // Pages the store refuses are written here as they are: the
        // host's swapped-out memory, for the node's user alone.
        let backing = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&backing_path)
            .with_context(|| format!("opening backing file {}", backing_path.display()))?;
        backing
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making backing file {} private", backing_path.display()))?;
        backing
            .set_len(spec.size_bytes)
            .with_context(|| format!("sizing backing file {}", backing_path.display()))?;
        frontend.init_area(area, false)?;
        let pages = spec.size_bytes / PAGE_BYTES as u64;
        let run = Run::begin(record_path(data_dir, &spec.name), pages)?;
        if run.is_stale() {
            tracing::warn!(
                export = %spec.name,
                "an earlier run of this export held pages that are gone: they read as errors, \
                 not zeros, until written again (swapoff and blkdiscard the device to start over)"
            );
        }
        Ok(Export {
            name: spec.name.clone(),
            area,
            size_bytes: spec.size_bytes,
            frontend,
            backing,
            backing_path,
            in_store: Bitmap::new(pages),
            in_backing: Bitmap::new(pages),
            run,
            page_locks: (0..PAGE_LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            metrics: ExportMetrics::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn area(&self) -> AreaId {
        self.area
    }
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    pub fn backing_path(&self) -> &Path {
        &self.backing_path
    }
    /// What a client is told of the export (NBD_INFO_DESCRIPTION).
    pub fn description(&self) -> String {
        let stale = self.run.stale_pages();
        let mut d = format!("ramster export {}, run {:016x}", self.name, self.run.id());
        if stale > 0 {
            d += &format!(
                "; {stale} pages written before the node restarted are gone and read as errors"
            );
        }
        d
    }
    pub fn metrics(&self) -> &ExportMetrics {
        &self.metrics
    }
    /// Whether this node keeps pages on donors: a read may then wait for a
    /// donor's answer, and a write for remotify to make room.
    pub fn has_donors(&self) -> bool {
        self.frontend.remote().is_some()
    }

    pub fn stats(&self) -> ExportStats {
        let m = &self.metrics;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ExportStats {
            name: self.name.clone(),
            area: self.area,
            size_bytes: self.size_bytes,
            reads: g(&m.reads),
            writes: g(&m.writes),
            write_zeroes: g(&m.write_zeroes),
            trims: g(&m.trims),
            flushes: g(&m.flushes),
            read_bytes: g(&m.read_bytes),
            written_bytes: g(&m.written_bytes),
            pages_in_store: g(&m.pages_in_store),
            pages_in_backing: g(&m.pages_in_backing),
            store_rejects_no_capacity: g(&m.store_rejects_no_capacity),
            store_rejects_incompressible: g(&m.store_rejects_incompressible),
            store_rejects_other: g(&m.store_rejects_other),
            errors: g(&m.errors),
            polls_found: g(&m.polls_found),
            polls_slept: g(&m.polls_slept),
            connections: g(&m.connections),
            run: format!("{:016x}", self.run.id()),
            stale_pages: self.run.stale_pages(),
        }
    }

    fn lock(&self, page: u64) -> MutexGuard<'_, ()> {
        self.page_locks[(page % PAGE_LOCK_STRIPES as u64) as usize].lock()
    }

    fn backing_error(&self, source: std::io::Error) -> ExportError {
        ExportError::Backing {
            path: self.backing_path.clone(),
            source,
        }
    }

    fn counted<T>(&self, r: Result<T, ExportError>) -> Result<T, ExportError> {
        if r.is_err() {
            bump(&self.metrics.errors, 1);
        }
        r
    }

    /// Reads `out.len()` bytes at `offset`: load from the store, else the
    /// backing file, else zeros.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), ExportError> {
        self.check_bounds(offset, out.len() as u64);
        bump(&self.metrics.reads, 1);
        bump(&self.metrics.read_bytes, out.len() as u64);
        let mut scratch = ZERO_PAGE;
        let mut at = 0;
        let r = spans(offset, out.len() as u64).try_for_each(|s| {
            let chunk = &mut out[at..at + s.len];
            at += s.len;
            let _page = self.lock(s.page);
            if s.whole() {
                self.read_page(s.page, chunk.try_into().expect("page-sized"))
            } else {
                self.read_page(s.page, &mut scratch)?;
                chunk.copy_from_slice(&scratch[s.start..s.start + s.len]);
                Ok(())
            }
        });
        self.counted(r)
    }

    /// Writes `data` at `offset`; sub-page parts are read, patched and
    /// written back under the page's lock. With `fua`, pages that went to
    /// the backing file are on disk before this returns (pages in the store
    /// are as durable as the store: RAM, then peers).
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        self.check_bounds(offset, data.len() as u64);
        bump(&self.metrics.writes, 1);
        bump(&self.metrics.written_bytes, data.len() as u64);
        let mut scratch = ZERO_PAGE;
        let mut at = 0;
        let mut to_backing = false;
        let r = spans(offset, data.len() as u64).try_for_each(|s| {
            let chunk = &data[at..at + s.len];
            at += s.len;
            let _page = self.lock(s.page);
            to_backing |= if s.whole() {
                self.write_page(s.page, chunk.try_into().expect("page-sized"))?
            } else {
                self.patch_page(s, &mut scratch, |part| part.copy_from_slice(chunk))?
            };
            Ok(())
        });
        self.counted(r.and_then(|()| self.sync_if(fua && to_backing)))
    }

    /// Zeroes `offset..offset+len`. Whole pages become holes (read as zeros,
    /// cost nothing) unless `no_hole` asks for them to stay allocated; then
    /// they are stored as zero pages (8 bytes of metadata in the store).
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        no_hole: bool,
    ) -> Result<(), ExportError> {
        self.check_bounds(offset, len);
        bump(&self.metrics.write_zeroes, 1);
        bump(&self.metrics.written_bytes, len);
        let mut scratch = ZERO_PAGE;
        let mut to_backing = false;
        let r = spans(offset, len).try_for_each(|s| {
            let _page = self.lock(s.page);
            if s.whole() && !no_hole {
                self.drop_page(s.page)
            } else if s.whole() {
                to_backing |= self.write_page(s.page, &ZERO_PAGE)?;
                Ok(())
            } else {
                to_backing |= self.patch_page(s, &mut scratch, |part| part.fill(0))?;
                Ok(())
            }
        });
        self.counted(r.and_then(|()| self.sync_if(fua && to_backing)))
    }

    /// TRIM: the client no longer needs these bytes. Whole pages are
    /// invalidated in the store and punched out of the backing file; partial
    /// pages keep their data (TRIM is advisory, and zeroing part of a page
    /// would be a write the client did not ask for).
    pub fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.check_bounds(offset, len);
        bump(&self.metrics.trims, 1);
        let r = spans(offset, len).filter(Span::whole).try_for_each(|s| {
            let _page = self.lock(s.page);
            self.drop_page(s.page)
        });
        self.counted(r)
    }

    /// FLUSH: every write acknowledged so far, from any connection, is on
    /// disk. Store pages need nothing (they are as durable as the store);
    /// the backing file is fsynced.
    pub fn flush(&self) -> Result<(), ExportError> {
        bump(&self.metrics.flushes, 1);
        let r = self.sync();
        self.counted(r)
    }

    /// FUA: pages that went to the backing file reach the disk before the
    /// reply.
    fn sync_if(&self, needed: bool) -> Result<(), ExportError> {
        if needed { self.sync() } else { Ok(()) }
    }

    fn sync(&self) -> Result<(), ExportError> {
        self.backing.sync_all().map_err(|e| self.backing_error(e))
    }

    fn check_bounds(&self, offset: u64, len: u64) {
        // The server checks every request before it gets here.
        assert!(
            offset
                .checked_add(len)
                .is_some_and(|end| end <= self.size_bytes),
            "request {offset}+{len} outside export {} of {} bytes",
            self.name,
            self.size_bytes
        );
    }

    /// Reads one page wherever it lives. Caller holds the page's lock.
    fn read_page(&self, page: u64, out: &mut Page) -> Result<(), ExportError> {
        if self.in_store.get(page) {
            return match self.frontend.load_page(self.area, page, out)? {
                LoadResult::Hit => Ok(()),
                LoadResult::NotFound => Err(ExportError::Lost { page }),
                LoadResult::Corrupt => Err(ExportError::Corrupt { page }),
                LoadResult::Unavailable => Err(ExportError::Unavailable { page }),
            };
        }
        if self.in_backing.get(page) {
            return self
                .backing
                .read_exact_at(out, page * PAGE_BYTES as u64)
                .map_err(|e| self.backing_error(e));
        }
        if self.run.lost_to_restart(page) {
            return Err(ExportError::LostToRestart { page });
        }
        out.fill(0);
        Ok(())
    }

    /// Read-modify-write of part of a page: `patch` changes the span's bytes
    /// of the page read into `scratch`. Returns whether the page went to the
    /// backing file. Caller holds the page's lock.
    ///
    /// If the patched page can be kept nowhere (the store refuses it, which
    /// drops the old copy, and the backing file fails), the page as it was
    /// is put back: the failed request's bytes are undefined, the rest of
    /// the page was acknowledged earlier and must survive it.
    fn patch_page(
        &self,
        s: Span,
        scratch: &mut Page,
        patch: impl FnOnce(&mut [u8]),
    ) -> Result<bool, ExportError> {
        self.read_page(s.page, scratch)?;
        let before = *scratch;
        patch(&mut scratch[s.start..s.start + s.len]);
        self.write_page(s.page, scratch).inspect_err(|e| {
            if let Err(lost) = self.write_page(s.page, &before) {
                tracing::error!(
                    export = %self.name,
                    page = s.page,
                    write = %e,
                    restore = %lost,
                    "a failed sub-page write could not put the page back: it reads as zeros"
                );
            }
        })
    }

    /// Stores one whole page; on rejection it goes to the backing file.
    /// Returns whether it went to the backing file. Caller holds the lock.
    fn write_page(&self, page: u64, data: &Page) -> Result<bool, ExportError> {
        self.run
            .before_data_write()
            .map_err(|source| ExportError::RunRecord {
                path: self.run.path().to_path_buf(),
                source,
            })?;
        let to_backing = self.put_page(page, data)?;
        self.run.settle(page);
        Ok(to_backing)
    }

    /// [`Export::write_page`] once the run is recorded as written.
    fn put_page(&self, page: u64, data: &Page) -> Result<bool, ExportError> {
        let m = &self.metrics;
        match self.frontend.store_page(self.area, page, data)? {
            StoreResult::Accepted => {
                if self.in_store.set(page) {
                    bump(&m.pages_in_store, 1);
                }
                if self.in_backing.clear(page) {
                    m.pages_in_backing.fetch_sub(1, Ordering::Relaxed);
                    // The file's copy is stale now; give the disk space back.
                    self.punch_hole(page);
                }
                Ok(false)
            }
            StoreResult::Rejected(reason) => {
                bump(
                    match reason {
                        Reject::NoCapacity => &m.store_rejects_no_capacity,
                        Reject::Incompressible => &m.store_rejects_incompressible,
                        _ => &m.store_rejects_other,
                    },
                    1,
                );
                if self.in_store.clear(page) {
                    m.pages_in_store.fetch_sub(1, Ordering::Relaxed);
                    // A refused duplicate store already dropped the old copy
                    // (the contract); saying so again costs one lookup and
                    // makes a stale load impossible whatever the store does.
                    self.frontend.invalidate_page(self.area, page)?;
                }
                self.backing
                    .write_all_at(data, page * PAGE_BYTES as u64)
                    .map_err(|e| self.backing_error(e))?;
                if self.in_backing.set(page) {
                    bump(&m.pages_in_backing, 1);
                }
                Ok(true)
            }
        }
    }

    /// Forgets one page: it reads as zeros from now on. Caller holds the lock.
    fn drop_page(&self, page: u64) -> Result<(), ExportError> {
        let m = &self.metrics;
        if self.in_store.clear(page) {
            m.pages_in_store.fetch_sub(1, Ordering::Relaxed);
            self.frontend.invalidate_page(self.area, page)?;
        }
        if self.in_backing.clear(page) {
            m.pages_in_backing.fetch_sub(1, Ordering::Relaxed);
            self.punch_hole(page);
        }
        self.run.settle(page);
        Ok(())
    }

    /// Deallocates one page of the backing file. Only disk space depends on
    /// it: a page whose `in_backing` bit is clear is never read from the
    /// file, so a file system without hole punching loses nothing.
    fn punch_hole(&self, page: u64) {
        // SAFETY: fallocate on a file descriptor we own, with plain integers.
        let rc = unsafe {
            libc::fallocate(
                self.backing.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (page * PAGE_BYTES as u64) as libc::off_t,
                PAGE_BYTES as libc::off_t,
            )
        };
        if rc != 0 {
            tracing::debug!(
                export = %self.name,
                page,
                error = %std::io::Error::last_os_error(),
                "could not punch a hole in the backing file"
            );
        }
    }
}

/// The exports of one node, by name.
pub struct Exports {
    exports: Vec<Arc<Export>>,
}

impl Exports {
    /// Opens every export, giving each the next area id of the export range.
    pub fn open(
        specs: &[ExportSpec],
        frontend: Arc<Frontend>,
        data_dir: &Path,
    ) -> anyhow::Result<Exports> {
        anyhow::ensure!(
            specs.len() <= EXPORTS_MAX,
            "{} exports given; at most {EXPORTS_MAX}",
            specs.len()
        );
        let mut exports: Vec<Arc<Export>> = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            anyhow::ensure!(
                exports.iter().all(|e| e.name != spec.name),
                "export {:?} is given twice",
                spec.name
            );
            let export = Export::open(
                spec,
                EXPORT_AREA_FIRST + i as AreaId,
                frontend.clone(),
                data_dir,
            )?;
            if let Some(other) = exports
                .iter()
                .find(|e| e.backing_path == export.backing_path)
            {
                anyhow::bail!(
                    "exports {:?} and {:?} share the backing file {}",
                    other.name,
                    spec.name,
                    export.backing_path.display()
                );
            }
            exports.push(Arc::new(export));
        }
        Ok(Exports { exports })
    }

    /// The export called `name`; the empty name is the default export (the
    /// first one), as `nbd-client` without `-N` asks for it.
    pub fn get(&self, name: &str) -> Option<&Arc<Export>> {
        if name.is_empty() {
            return self.exports.first();
        }
        self.exports.iter().find(|e| e.name == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.exports.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.exports.is_empty()
    }

    pub fn stats(&self) -> Vec<ExportStats> {
        self.exports.iter().map(|e| e.stats()).collect()
    }

    /// Connections in transmission, over all exports: hosts that may be
    /// swapping into this node.
    pub fn connections(&self) -> u64 {
        self.exports
            .iter()
            .map(|e| e.metrics.connections.load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{PageStore, StoreConfig};

    fn export(capacity: u64, size: u64) -> (tempfile::TempDir, Export) {
        let dir = tempfile::tempdir().unwrap();
        let e = export_in(dir.path(), capacity, size);
        (dir, e)
    }

    /// The export as a node started on `dir` serves it: a fresh store each
    /// time, as after a restart.
    fn export_in(dir: &Path, capacity: u64, size: u64) -> Export {
        let store = Arc::new(PageStore::new(StoreConfig::with_capacity(capacity)));
        let fe = Arc::new(Frontend::new("t", store));
        let spec: ExportSpec = format!("t:{size}").parse().unwrap();
        Export::open(&spec, EXPORT_AREA_FIRST, fe, dir).unwrap()
    }

    fn lost_to_restart(e: &Export, offset: u64, len: usize) -> bool {
        let mut out = vec![0u8; len];
        matches!(
            e.read(offset, &mut out),
            Err(ExportError::LostToRestart { .. })
        )
    }

    fn random_page(seed: u64) -> Page {
        let mut p = ZERO_PAGE;
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for b in p.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        p
    }

    #[test]
    fn backing_files_and_their_folder_are_the_node_users_alone() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        // A backing file left readable by an older node is made private.
        std::fs::create_dir_all(data.join("nbd")).unwrap();
        let old = data.join("nbd").join("t.swap");
        std::fs::write(&old, b"old").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        let _e = export_in(&data, 1 << 20, 1 << 20);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&old), 0o600);

        let fresh = dir.path().join("fresh");
        let _e = export_in(&fresh, 1 << 20, 1 << 20);
        assert_eq!(mode(&fresh.join("nbd")), 0o700);
        assert_eq!(mode(&fresh.join("nbd").join("t.swap")), 0o600);
    }

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        let s: ExportSpec = "swap0:1GiB:/var/lib/x:y.swap".parse().unwrap();
        assert_eq!(s.name, "swap0");
        assert_eq!(s.size_bytes, 1 << 30);
        assert_eq!(s.backing, Some(PathBuf::from("/var/lib/x:y.swap")));
        assert!(
            "swap0"
                .parse::<ExportSpec>()
                .unwrap_err()
                .contains("no size")
        );
        assert!(
            "a/b:4096"
                .parse::<ExportSpec>()
                .unwrap_err()
                .contains("name")
        );
        assert!(
            "a:4097"
                .parse::<ExportSpec>()
                .unwrap_err()
                .contains("multiple")
        );
        assert!("a:0".parse::<ExportSpec>().is_err());
    }

    #[test]
    fn export_areas_are_the_top_of_the_area_range() {
        assert!(is_export_area(AREA_ID_MAX));
        assert!(is_export_area(EXPORT_AREA_FIRST));
        assert!(!is_export_area(EXPORT_AREA_FIRST - 1));
        assert!(!is_export_area(0));
    }

    #[test]
    fn unwritten_pages_read_as_zeros_and_writes_read_back() {
        let (_d, e) = export(64 << 20, 1 << 20);
        let mut out = vec![1u8; 3 * PAGE_BYTES];
        e.read(4096, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0));
        let p = random_page(1);
        let mut q = ZERO_PAGE;
        q[..100].copy_from_slice(&[7; 100]);
        e.write(8192, &p, false).unwrap();
        e.write(12288, &q, false).unwrap();
        let mut out = vec![0u8; 2 * PAGE_BYTES];
        e.read(8192, &mut out).unwrap();
        assert_eq!(&out[..PAGE_BYTES], &p[..]);
        assert_eq!(&out[PAGE_BYTES..], &q[..]);
    }

    #[test]
    fn rejected_pages_go_to_the_backing_file_and_come_back() {
        // A store too small for anything: every page is rejected.
        let (_d, e) = export(0, 1 << 20);
        let p = random_page(2);
        e.write(0, &p, true).unwrap();
        let st = e.stats();
        assert_eq!((st.pages_in_store, st.pages_in_backing), (0, 1));
        assert!(st.store_rejects_no_capacity + st.store_rejects_incompressible >= 1);
        let mut out = ZERO_PAGE;
        e.read(0, &mut out).unwrap();
        assert_eq!(out, p);
        e.trim(0, PAGE_BYTES as u64).unwrap();
        e.read(0, &mut out).unwrap();
        assert_eq!(out, ZERO_PAGE);
        assert_eq!(e.stats().pages_in_backing, 0);
    }

    #[test]
    fn a_page_moving_from_file_to_store_never_reads_stale() {
        let (_d, e) = export(64 << 20, 1 << 20);
        // Incompressible: rejected into the file.
        let noise = random_page(3);
        e.write(0, &noise, false).unwrap();
        assert_eq!(e.stats().pages_in_backing, 1);
        // Compressible: accepted into the store; the file copy is stale.
        let mut text = ZERO_PAGE;
        text.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 7) as u8);
        e.write(0, &text, false).unwrap();
        let st = e.stats();
        assert_eq!((st.pages_in_store, st.pages_in_backing), (1, 0));
        let mut out = ZERO_PAGE;
        e.read(0, &mut out).unwrap();
        assert_eq!(out, text);
        // And back to the file: the store copy is dropped.
        e.write(0, &noise, false).unwrap();
        e.read(0, &mut out).unwrap();
        assert_eq!(out, noise);
        assert_eq!(e.frontend.curr_pages(e.area).unwrap(), 0);
    }

    #[test]
    fn unaligned_writes_and_zeroes_patch_only_their_bytes() {
        let (_d, e) = export(64 << 20, 1 << 20);
        let mut model = vec![0u8; 4 * PAGE_BYTES];
        let base = random_page(4);
        for i in 0..4 {
            e.write(i * 4096, &base, false).unwrap();
            model[i as usize * PAGE_BYTES..][..PAGE_BYTES].copy_from_slice(&base);
        }
        let patch: Vec<u8> = (0..5000).map(|i| (i * 31 % 251) as u8).collect();
        e.write(3000, &patch, false).unwrap();
        model[3000..8000].copy_from_slice(&patch);
        e.write_zeroes(100, 9000, false, false).unwrap();
        model[100..9100].fill(0);
        e.write_zeroes(12000, 4000, false, true).unwrap();
        model[12000..16000].fill(0);
        e.trim(16000, 384).unwrap(); // partial page: data stays
        let mut out = vec![0u8; 4 * PAGE_BYTES];
        e.read(0, &mut out).unwrap();
        assert_eq!(out, model);
        let mut odd = vec![0u8; 777];
        e.read(5555, &mut odd).unwrap();
        assert_eq!(odd, model[5555..5555 + 777]);
    }

    #[test]
    fn concurrent_sub_page_writes_lose_nothing() {
        let (_d, e) = export(64 << 20, 1 << 20);
        let e = Arc::new(e);
        // 8 threads each own 512 bytes of every page of 16 pages.
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let e = e.clone();
                s.spawn(move || {
                    for page in 0..16u64 {
                        let bytes = [t + 1; 512];
                        e.write(page * 4096 + t as u64 * 512, &bytes, false)
                            .unwrap();
                    }
                });
            }
        });
        let mut out = vec![0u8; 16 * PAGE_BYTES];
        e.read(0, &mut out).unwrap();
        for (i, b) in out.iter().enumerate() {
            assert_eq!(*b as usize, (i % PAGE_BYTES) / 512 + 1, "byte {i}");
        }
    }

    #[test]
    fn a_write_the_backing_file_refuses_fails_and_keeps_the_old_page() {
        // Random pages do not compress: they go to the backing file.
        let (_d, mut e) = export(64 << 20, 1 << 20);
        let old = random_page(1);
        e.write(5 * 4096, &old, false).unwrap();
        let writable = std::mem::replace(&mut e.backing, File::open(&e.backing_path).unwrap());

        assert!(e.write(5 * 4096, &random_page(2), false).is_err());
        assert_eq!(e.stats().errors, 1);
        let mut out = [0u8; PAGE_BYTES];
        e.read(5 * 4096, &mut out).unwrap();
        assert_eq!(out, old, "a failed write changed the page");

        e.backing = writable;
        let new = random_page(3);
        e.write(5 * 4096, &new, false).unwrap();
        e.flush().unwrap();
        e.read(5 * 4096, &mut out).unwrap();
        assert_eq!(out, new);
    }

    #[test]
    fn a_failed_sub_page_write_keeps_the_rest_of_a_page_the_store_held() {
        // A page that compresses lives in the store; random bytes over most
        // of it make one the store refuses, and the backing file fails.
        let (_d, mut e) = export(64 << 20, 1 << 20);
        let mut old = ZERO_PAGE;
        for (i, b) in old.iter_mut().enumerate() {
            *b = (i / 64) as u8;
        }
        e.write(7 * 4096, &old, false).unwrap();
        assert_eq!(e.stats().pages_in_store, 1);
        let writable = std::mem::replace(&mut e.backing, File::open(&e.backing_path).unwrap());

        let noise = random_page(4);
        assert!(
            e.write(7 * 4096 + 8, &noise[..PAGE_BYTES - 8], false)
                .is_err()
        );
        let mut out = [0u8; PAGE_BYTES];
        e.read(7 * 4096, &mut out).unwrap();
        assert_eq!(
            out[..8],
            old[..8],
            "bytes outside the failed write were lost"
        );

        // The same through WRITE_ZEROES of part of a page it had to patch.
        e.backing = writable;
        e.write(9 * 4096, &noise, false).unwrap();
        e.write(9 * 4096, &old[..8], false).unwrap();
        e.backing = File::open(&e.backing_path).unwrap();
        let r = e.write_zeroes(9 * 4096 + 4000, 96, false, false);
        // Zeroing 96 bytes keeps the page incompressible: it stays in the
        // file, which refuses; the page reads as before.
        assert!(r.is_err());
        e.read(9 * 4096, &mut out).unwrap();
        assert_eq!(out[..8], old[..8]);
        assert_eq!(out[8..4000], noise[8..4000]);
    }

    #[test]
    fn pages_of_an_earlier_run_read_as_errors_never_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let text = {
            let mut p = ZERO_PAGE;
            p.iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i % 13) as u8);
            p
        };
        {
            let e = export_in(dir.path(), 64 << 20, 1 << 20);
            e.write(3 * 4096, &text, false).unwrap(); // into the store
            e.write(4 * 4096, &random_page(5), false).unwrap(); // the file
            assert_eq!(e.stats().stale_pages, 0);
        }
        // The node restarts: the client that reconnects gets errors for
        // what it wrote, and for every page it might have written.
        let e = export_in(dir.path(), 64 << 20, 1 << 20);
        assert!(lost_to_restart(&e, 3 * 4096, PAGE_BYTES));
        assert!(lost_to_restart(&e, 4 * 4096, PAGE_BYTES));
        assert!(lost_to_restart(&e, 100 * 4096 + 7, 10));
        assert_eq!(e.stats().stale_pages, 256);
        assert!(e.description().contains("256 pages written before"));
        // A sub-page write needs the rest of the page: refused too.
        assert!(e.write(5 * 4096 + 1, &[1, 2, 3], false).is_err());
        // What this run writes, zeroes or trims reads back.
        e.write(3 * 4096, &text, false).unwrap();
        e.write_zeroes(6 * 4096, 4096, false, false).unwrap();
        e.trim(7 * 4096, 4096).unwrap();
        let mut out = vec![0u8; 5 * PAGE_BYTES];
        e.read(3 * 4096, &mut out[..PAGE_BYTES]).unwrap();
        assert_eq!(&out[..PAGE_BYTES], &text[..]);
        e.read(6 * 4096, &mut out[..2 * PAGE_BYTES]).unwrap();
        assert!(out[..2 * PAGE_BYTES].iter().all(|&b| b == 0));
        assert!(lost_to_restart(&e, 4 * 4096, PAGE_BYTES));
        assert_eq!(e.stats().stale_pages, 253);
        // Discarding the whole device (blkdiscard) makes it fresh.
        e.trim(0, 1 << 20).unwrap();
        assert_eq!(e.stats().stale_pages, 0);
        e.read(0, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0));
        drop(e);
        // This run wrote data (page 3): the next one starts stale again.
        let e = export_in(dir.path(), 64 << 20, 1 << 20);
        assert!(lost_to_restart(&e, 0, PAGE_BYTES));
    }

    #[test]
    fn staleness_outlives_runs_that_write_nothing_and_runs_that_only_trim_do_not_cause_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let e = export_in(dir.path(), 64 << 20, 1 << 20);
            // Reads, trims and holes leave nothing a later run could lose.
            let mut out = ZERO_PAGE;
            e.read(0, &mut out).unwrap();
            e.trim(0, 8192).unwrap();
            e.write_zeroes(8192, 8192, false, false).unwrap();
        }
        {
            let e = export_in(dir.path(), 64 << 20, 1 << 20);
            assert_eq!(e.stats().stale_pages, 0);
            e.write(0, &random_page(1), false).unwrap();
        }
        // Two restarts, the first with no writes at all: still stale.
        drop(export_in(dir.path(), 64 << 20, 1 << 20));
        let e = export_in(dir.path(), 64 << 20, 1 << 20);
        assert!(lost_to_restart(&e, 0, PAGE_BYTES));
        drop(e);
        // A record nobody can read is taken as the worst case.
        std::fs::write(record_path(dir.path(), "t"), "garbage = [").unwrap();
        let e = export_in(dir.path(), 64 << 20, 1 << 20);
        assert_eq!(e.stats().stale_pages, 256);
    }
}
