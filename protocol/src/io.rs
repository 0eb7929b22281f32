//! Frame I/O on an async byte stream (a Unix socket, a QUIC stream), one
//! place for the node's API server, its peer transport and the client: a
//! reader that owns the read buffer ("parse what is buffered, else read
//! more") and a writer whose task coalesces queued frames into few syscalls.
//!
//! Behind the `io` feature: the rest of the crate needs no runtime, and the
//! decoders stay testable on plain slices.

use std::io::IoSlice;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::frame::{self, FrameError};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

/// Frames queued to one writer before senders wait: back-pressure.
pub const WRITE_QUEUE_FRAMES_MAX: usize = 256;
/// Bytes and frames gathered into one vectored write.
const WRITE_COALESCE_BYTES_MAX: usize = 4 << 20;
const WRITE_COALESCE_FRAMES_MAX: usize = 64;
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// Why a stream of frames could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The stream ended inside a frame.
    #[error("connection closed mid-frame")]
    Truncated,
    /// A frame was too large, empty or not the message expected.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream itself failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads whole frames off a stream.
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Reads frames off `io`, refusing any longer than `max` bytes.
    pub fn new(io: R, max: usize) -> Self {
        FrameReader {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK_BYTES),
            max,
        }
    }

    /// The next frame body; `Ok(None)` on a clean end of stream.
    pub async fn read_frame(&mut self) -> Result<Option<Bytes>, ConnError> {
        loop {
            if let Some(body) = frame::split_frame(&mut self.buf, self.max)? {
                return Ok(Some(body));
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK_BYTES / 4 {
                self.buf.reserve(READ_CHUNK_BYTES);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ConnError::Truncated)
                };
            }
        }
    }
}

/// The write side of a connection. Frames are queued to a task that writes
/// whatever is queued with one vectored write (no copy into a coalescing
/// buffer: a response of 16 pages is 64 KiB), or written at once by a task
/// that has one ready on another thread, where handing it to the queue
/// would first wake this runtime. A lock keeps frames whole between the two.
///
/// Each frame comes with something it holds until it is written (`H`: the
/// API server's share of its answer budget), dropped once the frame is out
/// or the connection is closed. A writer with a stall timeout closes the
/// connection when a write makes no progress for that long (the peer reads
/// nothing), unless pages are owed (see [`owe_pages`](Self::owe_pages)).
pub struct FrameWriter<W, H = ()> {
    queue: mpsc::Sender<(BytesMut, H)>,
    shared: Arc<Shared<W>>,
}

struct Shared<W> {
    io: tokio::sync::Mutex<W>,
    /// How long one write may wait on a peer that reads nothing; `None`:
    /// for ever.
    stall: Option<Duration>,
    /// Answers that hand pages back and are not written yet.
    owed: Arc<AtomicUsize>,
    /// Turns true when the connection is closed for a stall or an error.
    closed: watch::Sender<bool>,
}

impl<W, H> Clone for FrameWriter<W, H> {
    fn clone(&self) -> Self {
        FrameWriter {
            queue: self.queue.clone(),
            shared: self.shared.clone(),
        }
    }
}

/// The connection is closed: the frame was dropped.
#[derive(Debug)]
pub struct WriterClosed;

impl<W: AsyncWrite + Unpin + Send + 'static, H: Send + 'static> FrameWriter<W, H> {
    /// Starts the queue's task; it ends, and shuts `io` down, once every
    /// clone is dropped and the queue has drained, or once the connection
    /// is closed.
    pub fn spawn(io: W, stall: Option<Duration>) -> Self {
        let (queue, mut rx) = mpsc::channel::<(BytesMut, H)>(WRITE_QUEUE_FRAMES_MAX);
        let shared = Arc::new(Shared {
            io: tokio::sync::Mutex::new(io),
            stall,
            owed: Arc::default(),
            closed: watch::Sender::new(false),
        });
        let writing = shared.clone();
        tokio::spawn(async move {
            let mut closed = writing.closed.subscribe();
            let mut batch: Vec<BytesMut> = Vec::new();
            let mut held: Vec<H> = Vec::new();
            loop {
                let (first, h) = tokio::select! {
                    queued = rx.recv() => match queued {
                        Some(q) => q,
                        None => break,
                    },
                    _ = closed.wait_for(|c| *c) => break,
                };
                let mut bytes = first.len();
                batch.push(first);
                held.push(h);
                while bytes < WRITE_COALESCE_BYTES_MAX && batch.len() < WRITE_COALESCE_FRAMES_MAX {
                    match rx.try_recv() {
                        Ok((more, h)) => {
                            bytes += more.len();
                            batch.push(more);
                            held.push(h);
                        }
                        Err(_) => break,
                    }
                }
                if writing.write(&mut batch).await.is_err() {
                    break;
                }
                batch.clear();
                held.clear();
            }
            writing.closed.send_replace(true);
            // Frames still queued go, and what they hold with them.
            drop(rx);
            let _ = writing.io.lock().await.shutdown().await;
        });
        FrameWriter { queue, shared }
    }

    /// Queues `frame`; waits while the queue is full.
    pub async fn send(&self, frame: BytesMut, held: H) -> Result<(), WriterClosed> {
        if *self.shared.closed.borrow() {
            return Err(WriterClosed);
        }
        self.queue
            .send((frame, held))
            .await
            .map_err(|_| WriterClosed)
    }

    /// Writes `frame` from the calling task, between two of the queue's
    /// writes. A closed connection drops it.
    pub async fn write_now(&self, frame: BytesMut, held: H) {
        if !*self.shared.closed.borrow() {
            let _ = self.shared.write(&mut [frame]).await;
        }
        drop(held);
    }

    /// Resolves once the connection is closed for a stall or an error.
    pub async fn closed(&self) {
        let _ = self.shared.closed.subscribe().wait_for(|c| *c).await;
    }

    /// Notes an answer that will hand pages back, until the returned guard
    /// is dropped (with the written frame): while one is owed, a stall does
    /// not close the connection, since closing would lose pages that are
    /// nowhere else now.
    pub fn owe_pages(&self) -> PagesOwed {
        self.shared.owed.fetch_add(1, Ordering::Relaxed);
        PagesOwed(self.shared.owed.clone())
    }
}

impl<W: AsyncWrite + Unpin> Shared<W> {
    /// Writes every frame under the lock; on a stall or an error, closes
    /// the connection.
    async fn write(&self, frames: &mut [BytesMut]) -> std::io::Result<()> {
        let mut io = self.io.lock().await;
        if *self.closed.borrow() {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        let written = write_all_vectored(&mut *io, frames, self.stall, &self.owed).await;
        if written.is_err() {
            self.closed.send_replace(true);
        }
        written
    }
}

/// An answer that will hand pages back, not yet written.
pub struct PagesOwed(Arc<AtomicUsize>);

impl Drop for PagesOwed {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Writes every frame, in order, with as few syscalls as the kernel allows.
/// A write that makes no progress within `stall` fails with `TimedOut`,
/// unless pages are `owed`: then it waits on.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    io: &mut W,
    frames: &mut [BytesMut],
    stall: Option<Duration>,
    owed: &AtomicUsize,
) -> std::io::Result<()> {
    let mut first = 0;
    while first < frames.len() {
        let slices: Vec<IoSlice<'_>> = frames[first..].iter().map(|f| IoSlice::new(f)).collect();
        let write = io.write_vectored(&slices);
        let mut written = match stall {
            None => write.await?,
            Some(stall) => match tokio::time::timeout(stall, write).await {
                Ok(written) => written?,
                Err(_) if owed.load(Ordering::Relaxed) == 0 => {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
                // A write that did not finish wrote nothing: try again.
                Err(_) => continue,
            },
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let len = frames[first].len();
            if written >= len {
                written -= len;
                first += 1;
            } else {
                frames[first].advance(written);
                written = 0;
            }
        }
    }
    Ok(())
}

/// Encodes one message as a frame ready for a [`FrameWriter`].
pub fn encode_frame<M: prost::Message>(msg: &M) -> Result<BytesMut, FrameError> {
    let mut out = BytesMut::new();
    frame::encode(msg, &mut out)?;
    Ok(out)
}
