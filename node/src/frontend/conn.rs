//! One place for frame I/O on a byte stream, shared by the API server and the
//! client: a reader that owns the read buffer ("parse what is buffered, else
//! read more") and a writer task that coalesces queued frames into few
//! syscalls.

use bytes::{Bytes, BytesMut};
use ramster_protocol::frame::{self, FrameError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Frames queued to one writer before senders wait: back-pressure.
pub const WRITE_QUEUE_FRAMES_MAX: usize = 256;
/// Bytes coalesced into one write.
const WRITE_COALESCE_BYTES_MAX: usize = 4 << 20;
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
pub fn spawn_writer<W: AsyncWrite + Unpin + Send + 'static>(mut io: W) -> mpsc::Sender<BytesMut> {
    let (tx, mut rx) = mpsc::channel::<BytesMut>(WRITE_QUEUE_FRAMES_MAX);
    tokio::spawn(async move {
        while let Some(mut out) = rx.recv().await {
            // Coalesce whatever else is already queued into one write.
            while out.len() < WRITE_COALESCE_BYTES_MAX {
                match rx.try_recv() {
                    Ok(more) => out.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            if io.write_all(&out).await.is_err() {
                break;
            }
        }
        let _ = io.shutdown().await;
    });
    tx
}

/// Encodes one message as a frame ready for [`spawn_writer`].
pub fn encode_frame<M: prost::Message>(msg: &M) -> Result<BytesMut, FrameError> {
    let mut out = BytesMut::new();
    frame::encode(msg, &mut out)?;
    Ok(out)
}
