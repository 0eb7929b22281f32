//! Runs of an export: no silent zeros after a restart.
//!
//! Every start of the node begins a new run of each export. Store pages
//! live in RAM and die with the process, and the backing file is truncated
//! at start, so the pages written in an earlier run are gone. A client that
//! reconnects across the restart (`nbd-client -persist`, qemu's
//! `reconnect-delay`) still believes they are there; if it read zeros, every
//! process whose pages were swapped out would run on with corrupt memory.
//! So while an export may have lost acknowledged data (it is *stale*), a
//! page reads only if this run wrote, zeroed or trimmed it; any other page
//! gets EIO. Once every page has been settled in this run (`blkdiscard` of
//! the whole device does it), the export is fresh again.
//!
//! What survives the restart is one small record, `DATA_DIR/nbd/NAME.run`:
//! the run's id, whether the export is stale, and whether this run has
//! acknowledged data. It is rewritten (and fsynced) at start, before the
//! first data write of a run is acknowledged, and when the export becomes
//! fresh: a few writes per run, none on the page path after the first.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::Context;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::export::Bitmap;

/// What the run record holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Record {
    /// The run that wrote the record, in hex (TOML integers are signed).
    run: String,
    /// Some page may hold data, acknowledged in an earlier run, that this
    /// node no longer has.
    stale: bool,
    /// This run has acknowledged data: the next run starts stale.
    written: bool,
}

/// One run of one export.
pub(super) struct Run {
    id: u64,
    path: PathBuf,
    pages: u64,
    stale: AtomicBool,
    /// Pages written, zeroed or trimmed in this run; allocated only when
    /// the run starts stale.
    settled: Option<Bitmap>,
    settled_count: AtomicU64,
    /// The record says `written`.
    written: AtomicBool,
    /// Serialises rewrites of the record.
    record: Mutex<()>,
}

impl Run {
    /// Begins a new run of the export of `pages` pages whose record is at
    /// `path`: stale if the last run left data or was stale itself.
    pub(super) fn begin(path: PathBuf, pages: u64) -> anyhow::Result<Run> {
        let stale = match std::fs::read_to_string(&path) {
            Ok(text) => match toml::from_str::<Record>(&text) {
                Ok(last) => last.stale || last.written,
                Err(e) => {
                    // Unreadable: assume the worst, the client may hold pages.
                    tracing::warn!(record = %path.display(), error = %e, "unreadable export run record: starting stale");
                    true
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let run = Run {
            id: rand::random(),
            path,
            pages,
            stale: AtomicBool::new(stale),
            settled: stale.then(|| Bitmap::new(pages)),
            settled_count: AtomicU64::new(0),
            written: AtomicBool::new(false),
            record: Mutex::new(()),
        };
        run.save(stale, false)?;
        Ok(run)
    }

    pub(super) fn id(&self) -> u64 {
        self.id
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether some page may still be one an earlier run acknowledged.
    pub(super) fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }

    /// Pages that would answer EIO: those not settled in this run while
    /// the export is stale.
    pub(super) fn stale_pages(&self) -> u64 {
        if self.is_stale() {
            self.pages - self.settled_count.load(Ordering::Relaxed)
        } else {
            0
        }
    }

    /// Whether `page` may hold data of an earlier run, which is gone.
    /// Caller holds the page's lock.
    pub(super) fn lost_to_restart(&self, page: u64) -> bool {
        self.is_stale() && self.settled.as_ref().is_some_and(|s| !s.get(page))
    }

    /// Called before data is written: the record must say so before the
    /// write is acknowledged, or the next run would read the page as zeros.
    pub(super) fn before_data_write(&self) -> std::io::Result<()> {
        if self.written.load(Ordering::Acquire) {
            return Ok(());
        }
        let _record = self.record.lock();
        if !self.written.load(Ordering::Acquire) {
            self.write_record(self.is_stale(), true)?;
            self.written.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// `page` now holds what this run gave it. Caller holds its lock.
    pub(super) fn settle(&self, page: u64) {
        let Some(settled) = self.settled.as_ref().filter(|_| self.is_stale()) else {
            return;
        };
        if settled.set(page) && self.settled_count.fetch_add(1, Ordering::AcqRel) + 1 == self.pages
        {
            let _record = self.record.lock();
            match self.write_record(false, self.written.load(Ordering::Acquire)) {
                Ok(()) => {
                    self.stale.store(false, Ordering::Release);
                    tracing::info!(record = %self.path.display(), "every page of the export was rewritten since the restart: it is fresh again");
                }
                // Staying stale costs nothing: every page is settled.
                Err(e) => {
                    tracing::warn!(record = %self.path.display(), error = %e, "could not record that the export is fresh")
                }
            }
        }
    }

    fn save(&self, stale: bool, written: bool) -> anyhow::Result<()> {
        let _record = self.record.lock();
        self.write_record(stale, written)
            .with_context(|| format!("writing the export run record {}", self.path.display()))
    }

    /// Replaces the record atomically and durably: a temporary file,
    /// fsynced, renamed over it, and the directory fsynced.
    fn write_record(&self, stale: bool, written: bool) -> std::io::Result<()> {
        let record = Record {
            run: format!("{:016x}", self.id),
            stale,
            written,
        };
        let text = format!(
            "# The runs of an NBD export since its data was last whole; see docs/swap.md.\n{}",
            toml::to_string(&record).expect("a flat record serialises")
        );
        let tmp = self.path.with_extension("run.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Where the run record of export `name` lives.
pub(super) fn record_path(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("nbd").join(format!("{name}.run"))
}
