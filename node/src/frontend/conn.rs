//! One place for frame I/O on a byte stream, shared by the API server and the
//! client: a reader that owns the read buffer ("parse what is buffered, else
//! read more") and a writer whose task coalesces queued frames into few
//! syscalls.

use std::io::IoSlice;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use ramster_protocol::frame::{self, FrameError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Frames queued to one writer before senders wait: back-pressure.
pub const WRITE_QUEUE_FRAMES_MAX: usize = 256;
/// Bytes and frames gathered into one vectored write.
const WRITE_COALESCE_BYTES_MAX: usize = 4 << 20;
const WRITE_COALESCE_FRAMES_MAX: usize = 64;
const READ_CHUNK_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection closed mid-frame")]
    Truncated,
    #[error(transparent)]
    Frame(#[from] FrameError),
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

/// Starts a task writing queued frames to `io`; dropping every sender ends it
/// after the queue drains. Frames already encoded (length prefix included).
pub fn spawn_writer<W: AsyncWrite + Unpin + Send + 'static>(io: W) -> mpsc::Sender<BytesMut> {
    FrameWriter::spawn(io).queue
}

/// The write side of a connection. Frames are queued to a task that writes
/// whatever is queued with one vectored write (no copy into a coalescing
/// buffer: a response of 16 pages is 64 KiB), or written at once by a task
/// that has one ready on another thread, where handing it to the queue
/// would first wake this runtime. A lock keeps frames whole between the two.
pub struct FrameWriter<W> {
    queue: mpsc::Sender<BytesMut>,
    io: Arc<tokio::sync::Mutex<W>>,
}

impl<W> Clone for FrameWriter<W> {
    fn clone(&self) -> Self {
        FrameWriter {
            queue: self.queue.clone(),
            io: self.io.clone(),
        }
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> FrameWriter<W> {
    /// Starts the queue's task; it ends, and shuts `io` down, once every
    /// clone is dropped and the queue has drained.
    pub fn spawn(io: W) -> Self {
        let (queue, mut rx) = mpsc::channel::<BytesMut>(WRITE_QUEUE_FRAMES_MAX);
        let io = Arc::new(tokio::sync::Mutex::new(io));
        let writing = io.clone();
        tokio::spawn(async move {
            let mut batch: Vec<BytesMut> = Vec::new();
            while let Some(first) = rx.recv().await {
                let mut bytes = first.len();
                batch.push(first);
                while bytes < WRITE_COALESCE_BYTES_MAX && batch.len() < WRITE_COALESCE_FRAMES_MAX {
                    match rx.try_recv() {
                        Ok(more) => {
                            bytes += more.len();
                            batch.push(more);
                        }
                        Err(_) => break,
                    }
                }
                if write_all_vectored(&mut *writing.lock().await, &mut batch)
                    .await
                    .is_err()
                {
                    break;
                }
                batch.clear();
            }
            let _ = writing.lock().await.shutdown().await;
        });
        FrameWriter { queue, io }
    }

    /// Queues `frame`; waits while the queue is full. A closed connection
    /// drops it.
    pub async fn send(&self, frame: BytesMut) {
        let _ = self.queue.send(frame).await;
    }

    /// Writes `frame` from the calling task, between two of the queue's
    /// writes. A closed connection drops it.
    pub async fn write_now(&self, frame: BytesMut) {
        let mut io = self.io.lock().await;
        let _ = write_all_vectored(&mut *io, &mut [frame]).await;
    }
}

/// Writes every frame, in order, with as few syscalls as the kernel allows.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    io: &mut W,
    frames: &mut [BytesMut],
) -> std::io::Result<()> {
    let mut first = 0;
    while first < frames.len() {
        let slices: Vec<IoSlice<'_>> = frames[first..].iter().map(|f| IoSlice::new(f)).collect();
        let mut written = io.write_vectored(&slices).await?;
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
