//! A Rust client of the native API: async and pipelined (any number of
//! requests in flight on one connection, matched to responses by id), plus a
//! blocking wrapper for simple callers.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use hashbrown::HashMap;
use parking_lot::Mutex;
use ramster_protocol::v1::{self, op::Kind};
use ramster_protocol::{FRAME_BYTES_MAX, frame, handshake};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::oneshot;

use super::conn::{ConnError, FrameReader, FrameWriter, encode_frame};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("handshake refused: {0}")]
    Handshake(String),
    #[error("server error {code:?}: {message}")]
    Server {
        code: v1::ErrorCode,
        message: String,
    },
    #[error("connection closed")]
    Closed,
    #[error("op failed with {status:?}: {detail}")]
    Op { status: v1::Status, detail: String },
    #[error(transparent)]
    Conn(#[from] ConnError),
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<v1::Response>>>>;

/// An async, pipelined API client. Cheap to share behind an `Arc`.
pub struct Client {
    writer: FrameWriter<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    welcome: v1::Welcome,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (rd, wr) = stream.into_split();
        let mut reader = FrameReader::new(rd, FRAME_BYTES_MAX);
        let writer = FrameWriter::spawn(wr, None);
        let hello = encode_frame(&handshake::hello("ramster-client")).expect("small");
        writer
            .send(hello, ())
            .await
            .map_err(|_| ClientError::Closed)?;
        let body = reader.read_frame().await?.ok_or(ClientError::Closed)?;
        let welcome = match frame::decode::<v1::Welcome>(body.clone()) {
            Ok(w) if w.version != 0 => w,
            _ => {
                let reason = frame::decode::<v1::Response>(body)
                    .ok()
                    .and_then(|r| r.error)
                    .map(|e| e.message)
                    .unwrap_or_else(|| "no Welcome".into());
                return Err(ClientError::Handshake(reason));
            }
        };
        let pending: Pending = Arc::default();
        tokio::spawn(read_responses(reader, pending.clone()));
        Ok(Client {
            writer,
            pending,
            next_id: AtomicU64::new(1),
            welcome,
        })
    }

    pub fn welcome(&self) -> &v1::Welcome {
        &self.welcome
    }

    /// Sends one batch and waits for its results (one per op, in order).
    pub async fn call(&self, ops: Vec<v1::Op>) -> Result<Vec<v1::OpResult>, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        let frame = encode_frame(&v1::Request { id, ops }).map_err(ConnError::from)?;
        if self.writer.send(frame, ()).await.is_err() {
            self.pending.lock().remove(&id);
            return Err(ClientError::Closed);
        }
        let resp = rx.await.map_err(|_| ClientError::Closed)?;
        if let Some(e) = resp.error {
            return Err(ClientError::Server {
                code: v1::ErrorCode::try_from(e.code).unwrap_or(v1::ErrorCode::Unspecified),
                message: e.message,
            });
        }
        Ok(resp.results)
    }

    async fn call_one(&self, kind: Kind) -> Result<v1::OpResult, ClientError> {
        let mut r = self.call(vec![v1::Op { kind: Some(kind) }]).await?;
        r.pop().ok_or(ClientError::Closed)
    }

    pub async fn init_area(&self, area: u32, writethrough: bool) -> Result<(), ClientError> {
        self.init_area_replicas(area, writethrough, 0).await
    }

    /// [`init_area`](Self::init_area) with the donor copies each page of
    /// the area gets (1..=3; 0 is the node's default).
    pub async fn init_area_replicas(
        &self,
        area: u32,
        writethrough: bool,
        replicas: u32,
    ) -> Result<(), ClientError> {
        ok(self
            .call_one(Kind::InitArea(v1::InitArea {
                area,
                writethrough,
                replicas,
            }))
            .await?)
        .map(drop)
    }

    /// Stores pages of one area in one request; a status per page.
    pub async fn store_pages(
        &self,
        area: u32,
        pages: &[(u64, Bytes)],
    ) -> Result<Vec<v1::Status>, ClientError> {
        let ops = pages
            .iter()
            .map(|(offset, page)| {
                op(Kind::Store(v1::Store {
                    area,
                    offset: *offset,
                    page: page.clone(),
                }))
            })
            .collect();
        Ok(self.call(ops).await?.iter().map(|r| r.status()).collect())
    }

    /// Loads pages of one area in one request: the page, or the status.
    pub async fn load_pages(
        &self,
        area: u32,
        offsets: &[u64],
    ) -> Result<Vec<Result<Bytes, v1::Status>>, ClientError> {
        let ops = offsets
            .iter()
            .map(|&offset| op(Kind::Load(v1::Load { area, offset })))
            .collect();
        Ok(self
            .call(ops)
            .await?
            .into_iter()
            .map(|r| match r.status() {
                v1::Status::Ok => Ok(r.page),
                s => Err(s),
            })
            .collect())
    }

    /// Invalidates pages of one area in one request; how many were there.
    pub async fn invalidate_pages(&self, area: u32, offsets: &[u64]) -> Result<u64, ClientError> {
        let ops = offsets
            .iter()
            .map(|&offset| op(Kind::InvalidatePage(v1::InvalidatePage { area, offset })))
            .collect();
        let mut dropped = 0;
        for r in self.call(ops).await? {
            dropped += ok(r)?.value;
        }
        Ok(dropped)
    }

    pub async fn invalidate_area(&self, area: u32) -> Result<u64, ClientError> {
        Ok(ok(self
            .call_one(Kind::InvalidateArea(v1::InvalidateArea { area }))
            .await?)?
        .value)
    }

    pub async fn curr_pages(&self, area: u32) -> Result<u64, ClientError> {
        Ok(ok(self
            .call_one(Kind::CurrPages(v1::CurrPages { area }))
            .await?)?
        .value)
    }

    pub async fn stats(&self) -> Result<v1::Stats, ClientError> {
        Ok(ok(self.call_one(Kind::GetStats(v1::GetStats {})).await?)?
            .stats
            .unwrap_or_default())
    }
}

/// Wraps an op kind.
pub fn op(kind: Kind) -> v1::Op {
    v1::Op { kind: Some(kind) }
}

fn ok(r: v1::OpResult) -> Result<v1::OpResult, ClientError> {
    match r.status() {
        v1::Status::Ok => Ok(r),
        status => Err(ClientError::Op {
            status,
            detail: r.detail,
        }),
    }
}

async fn read_responses(
    mut reader: FrameReader<tokio::net::unix::OwnedReadHalf>,
    pending: Pending,
) {
    while let Ok(Some(body)) = reader.read_frame().await {
        let Ok(resp) = frame::decode::<v1::Response>(body) else {
            break;
        };
        if let Some(tx) = pending.lock().remove(&resp.id) {
            let _ = tx.send(resp);
        } else if resp.id == 0 {
            // A connection-level error: nothing more will be answered.
            break;
        }
    }
    // Dropping the senders fails every waiting call with `Closed`.
    pending.lock().clear();
}

/// A blocking client: the async one driven by its own small runtime.
pub struct BlockingClient {
    rt: tokio::runtime::Runtime,
    inner: Client,
}

impl BlockingClient {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds");
        let inner = rt.block_on(Client::connect(path))?;
        Ok(BlockingClient { rt, inner })
    }

    pub fn call(&self, ops: Vec<v1::Op>) -> Result<Vec<v1::OpResult>, ClientError> {
        self.rt.block_on(self.inner.call(ops))
    }

    pub fn init_area(&self, area: u32, writethrough: bool) -> Result<(), ClientError> {
        self.rt.block_on(self.inner.init_area(area, writethrough))
    }

    pub fn init_area_replicas(
        &self,
        area: u32,
        writethrough: bool,
        replicas: u32,
    ) -> Result<(), ClientError> {
        self.rt
            .block_on(self.inner.init_area_replicas(area, writethrough, replicas))
    }

    pub fn store_pages(
        &self,
        area: u32,
        pages: &[(u64, Bytes)],
    ) -> Result<Vec<v1::Status>, ClientError> {
        self.rt.block_on(self.inner.store_pages(area, pages))
    }

    pub fn load_pages(
        &self,
        area: u32,
        offsets: &[u64],
    ) -> Result<Vec<Result<Bytes, v1::Status>>, ClientError> {
        self.rt.block_on(self.inner.load_pages(area, offsets))
    }

    pub fn invalidate_pages(&self, area: u32, offsets: &[u64]) -> Result<u64, ClientError> {
        self.rt.block_on(self.inner.invalidate_pages(area, offsets))
    }

    pub fn invalidate_area(&self, area: u32) -> Result<u64, ClientError> {
        self.rt.block_on(self.inner.invalidate_area(area))
    }

    pub fn curr_pages(&self, area: u32) -> Result<u64, ClientError> {
        self.rt.block_on(self.inner.curr_pages(area))
    }

    pub fn stats(&self) -> Result<v1::Stats, ClientError> {
        self.rt.block_on(self.inner.stats())
    }
}
