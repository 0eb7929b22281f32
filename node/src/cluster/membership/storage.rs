//! Raft's durable state under `DATA_DIR/raft/`: the log, the vote, the
//! committed id, and snapshots of the cluster configuration.
//!
//! The log is one append-only file of JSON records (append, truncate, purge,
//! committed), replayed when the node starts; a torn last record (a crash in
//! the middle of a write) is dropped, since it was never acknowledged. The
//! file is rewritten compactly once it holds mostly dead records. The vote and
//! snapshots are small files replaced atomically (write, fsync, rename).
//! Every write is fsynced before Raft is told it is done.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Cursor, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StorageError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};

use super::TypeConfig;
use super::state::{ClusterConfig, CommandResult, NodeId};

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// Dead records tolerated in the log file before it is rewritten.
const LOG_DEAD_RECORDS_MAX: usize = 4096;

fn io_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl Into<std::io::Error>,
) -> StorageError<NodeId> {
    StorageError::from_io_error(subject, verb, e.into())
}

fn json_err(e: serde_json::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

/// Replaces `path` with `bytes` atomically and durably.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(json_err),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[derive(Serialize, Deserialize)]
enum LogRecord {
    Append(Entry<TypeConfig>),
    /// Drop entries from this index on.
    Truncate(u64),
    /// Drop entries up to and including this id.
    Purge(LogId<NodeId>),
    Committed(Option<LogId<NodeId>>),
}

struct LogInner {
    path: PathBuf,
    vote_path: PathBuf,
    file: File,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    last_purged: Option<LogId<NodeId>>,
    committed: Option<LogId<NodeId>>,
    vote: Option<Vote<NodeId>>,
    /// Records in the file that no longer describe a live entry.
    dead_records: usize,
}

impl LogInner {
    fn write(&mut self, records: &[LogRecord]) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r).map_err(json_err)?;
            buf.push(b'\n');
        }
        self.file.write_all(&buf)?;
        self.file.sync_data()
    }

    /// Rewrites the file with only what is live, once enough is dead.
    fn maybe_compact(&mut self) -> std::io::Result<()> {
        if self.dead_records < LOG_DEAD_RECORDS_MAX {
            return Ok(());
        }
        let tmp = self.path.with_extension("compact");
        {
            let mut f = File::create(&tmp)?;
            let mut buf = Vec::new();
            let mut records = Vec::new();
            if let Some(p) = self.last_purged {
                records.push(LogRecord::Purge(p));
            }
            records.push(LogRecord::Committed(self.committed));
            for r in records.iter().chain(
                self.entries
                    .values()
                    .map(|e| LogRecord::Append(e.clone()))
                    .collect::<Vec<_>>()
                    .iter(),
            ) {
                serde_json::to_writer(&mut buf, r).map_err(json_err)?;
                buf.push(b'\n');
            }
            f.write_all(&buf)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        sync_dir(&self.path)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.dead_records = 0;
        Ok(())
    }
}

/// Raft's log and vote, on disk.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<LogInner>>,
}

impl LogStore {
    /// Opens (or creates) the log under `dir`, replaying what is there.
    pub fn open(dir: &Path) -> std::io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("log.jsonl");
        let vote_path = dir.join("vote.json");
        let mut entries = BTreeMap::new();
        let mut last_purged = None;
        let mut committed = None;
        let mut dead_records = 0;
        let mut good_bytes = 0u64;
        if path.exists() {
            let reader = BufReader::new(File::open(&path)?);
            for line in reader.split(b'\n') {
                let line = line?;
                let Ok(record) = serde_json::from_slice::<LogRecord>(&line) else {
                    // A torn tail from a crash mid-write: never acknowledged.
                    break;
                };
                good_bytes += line.len() as u64 + 1;
                match record {
                    LogRecord::Append(e) => {
                        if entries.insert(e.log_id.index, e).is_some() {
                            dead_records += 1;
                        }
                    }
                    LogRecord::Truncate(from) => {
                        dead_records += entries.split_off(&from).len() + 1;
                    }
                    LogRecord::Purge(upto) => {
                        let keep = entries.split_off(&(upto.index + 1));
                        dead_records += entries.len() + 1;
                        entries = keep;
                        last_purged = Some(upto);
                    }
                    LogRecord::Committed(c) => {
                        committed = c;
                        dead_records += 1;
                    }
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        file.set_len(good_bytes)?;
        let vote = read_json(&vote_path)?;
        Ok(LogStore {
            inner: Arc::new(Mutex::new(LogInner {
                path,
                vote_path,
                file,
                entries,
                last_purged,
                committed,
                vote,
                dead_records,
            })),
        })
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let inner = self.inner.lock().await;
        Ok(inner.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let inner = self.inner.lock().await;
        let last = inner
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(inner.last_purged);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        let mut inner = self.inner.lock().await;
        let bytes = serde_json::to_vec(vote)
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, json_err(e)))?;
        write_atomic(&inner.vote_path, &bytes)
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        Ok(self.inner.lock().await.vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        let mut inner = self.inner.lock().await;
        inner
            .write(&[LogRecord::Committed(committed)])
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        inner.committed = committed;
        inner.dead_records += 1;
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self.inner.lock().await.committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.inner.lock().await;
        let entries: Vec<_> = entries.into_iter().collect();
        let records: Vec<_> = entries.iter().cloned().map(LogRecord::Append).collect();
        let written = inner.write(&records);
        if let Err(e) = written {
            let err = io_err(
                ErrorSubject::Logs,
                ErrorVerb::Write,
                std::io::Error::new(e.kind(), e.to_string()),
            );
            callback.log_io_completed(Err(e));
            return Err(err);
        }
        for e in entries {
            if inner.entries.insert(e.log_id.index, e).is_some() {
                inner.dead_records += 1;
            }
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let mut inner = self.inner.lock().await;
        inner
            .write(&[LogRecord::Truncate(log_id.index)])
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        let dropped = inner.entries.split_off(&log_id.index).len();
        inner.dead_records += dropped + 1;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let mut inner = self.inner.lock().await;
        inner
            .write(&[LogRecord::Purge(log_id)])
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        let keep = inner.entries.split_off(&(log_id.index + 1));
        inner.dead_records += inner.entries.len() + 1;
        inner.entries = keep;
        inner.last_purged = Some(log_id);
        inner
            .maybe_compact()
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))
    }
}

/// A snapshot as stored on disk.
#[derive(Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    /// The serialized `ClusterConfig`.
    data: Vec<u8>,
}

struct MachineInner {
    snapshot_path: PathBuf,
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, openraft::BasicNode>,
    config: ClusterConfig,
    snapshot: Option<StoredSnapshot>,
    snapshots_built: u64,
}

/// The state machine: the cluster configuration, published to the rest of
/// the node through a watch channel on every change.
#[derive(Clone)]
pub struct ConfigMachine {
    inner: Arc<Mutex<MachineInner>>,
    publish: Arc<watch::Sender<Arc<ClusterConfig>>>,
}

impl ConfigMachine {
    /// Opens the state machine under `dir`, starting from its last snapshot;
    /// Raft replays the log after it.
    pub fn open(dir: &Path) -> std::io::Result<ConfigMachine> {
        std::fs::create_dir_all(dir)?;
        let snapshot_path = dir.join("snapshot.json");
        let snapshot: Option<StoredSnapshot> = read_json(&snapshot_path)?;
        let (last_applied, last_membership, config) = match &snapshot {
            Some(s) => (
                s.meta.last_log_id,
                s.meta.last_membership.clone(),
                serde_json::from_slice(&s.data).map_err(json_err)?,
            ),
            None => (None, StoredMembership::default(), ClusterConfig::default()),
        };
        let (publish, _) = watch::channel(Arc::new(config.clone()));
        Ok(ConfigMachine {
            inner: Arc::new(Mutex::new(MachineInner {
                snapshot_path,
                last_applied,
                last_membership,
                config,
                snapshot,
                snapshots_built: 0,
            })),
            publish: Arc::new(publish),
        })
    }

    /// Follows the configuration as it changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterConfig>> {
        self.publish.subscribe()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for ConfigMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let mut inner = self.inner.lock().await;
        let data = serde_json::to_vec(&inner.config)
            .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, json_err(e)))?;
        inner.snapshots_built += 1;
        let snapshot_id = match inner.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, inner.snapshots_built),
            None => format!("--{}", inner.snapshots_built),
        };
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied,
            last_membership: inner.last_membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        let bytes = serde_json::to_vec(&stored)
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, json_err(e)))?;
        write_atomic(&inner.snapshot_path, &bytes)
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        inner.snapshot = Some(stored);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for ConfigMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(
        Option<LogId<NodeId>>,
        StoredMembership<NodeId, openraft::BasicNode>,
    )> {
        let inner = self.inner.lock().await;
        Ok((inner.last_applied, inner.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<CommandResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.inner.lock().await;
        let mut results = Vec::new();
        let mut changed = false;
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => CommandResult::Done,
                EntryPayload::Normal(cmd) => {
                    changed = true;
                    inner.config.apply(&cmd)
                }
                EntryPayload::Membership(m) => {
                    inner.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    CommandResult::Done
                }
            };
            results.push(result);
        }
        if changed {
            self.publish.send_replace(Arc::new(inner.config.clone()));
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let config: ClusterConfig = serde_json::from_slice(&data).map_err(|e| {
            io_err(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                json_err(e),
            )
        })?;
        let mut inner = self.inner.lock().await;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        let bytes = serde_json::to_vec(&stored).map_err(|e| {
            io_err(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                json_err(e),
            )
        })?;
        write_atomic(&inner.snapshot_path, &bytes).map_err(|e| {
            io_err(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                e,
            )
        })?;
        inner.last_applied = meta.last_log_id;
        inner.last_membership = meta.last_membership.clone();
        inner.config = config;
        inner.snapshot = Some(stored);
        self.publish.send_replace(Arc::new(inner.config.clone()));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let inner = self.inner.lock().await;
        Ok(inner.snapshot.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}
