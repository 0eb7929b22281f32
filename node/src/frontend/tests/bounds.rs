//! Each connection's bounds, on a real socket against a real front end:
//! a client that never says Hello is told so and closed; one with nothing
//! in flight is closed once idle, one waiting on an answer is not; one
//! that reads nothing holds no more answers than its budget and is closed
//! once it has stalled, unless it is owed pages a shrink took out.

use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ramster_protocol::io::{FrameReader, encode_frame};
use ramster_protocol::v1::{self, op::Kind as Op};
use ramster_protocol::{FRAME_BYTES_MAX, frame, handshake};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::super::api::ServeLimits;
use super::ordering::{Served, serve_within};
use super::*;
use crate::store::RemoteRef;

const AREA: u32 = 1;
/// How long a test waits for what must happen before it gives up: a guard
/// against hanging, not a measure of speed.
const PATIENCE: Duration = Duration::from_secs(10);
/// Timeouts short enough that the tests run in a moment.
const SHORT: Duration = Duration::from_millis(100);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A client's raw connection.
struct Raw {
    rd: FrameReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
}

impl Raw {
    async fn connect(served: &Served) -> Raw {
        let (rd, wr) = UnixStream::connect(&served.socket)
            .await
            .unwrap()
            .into_split();
        Raw {
            rd: FrameReader::new(rd, FRAME_BYTES_MAX),
            wr,
        }
    }

    /// Connects and completes the handshake.
    async fn hello(served: &Served) -> Raw {
        let mut raw = Raw::connect(served).await;
        let hello = encode_frame(&handshake::hello("bounds")).unwrap();
        raw.wr.write_all(&hello).await.unwrap();
        let body = raw.next().await.expect("a Welcome");
        frame::decode::<v1::Welcome>(body).unwrap();
        raw
    }

    fn request(id: u64, ops: Vec<v1::Op>) -> Vec<u8> {
        encode_frame(&v1::Request { id, ops }).unwrap().to_vec()
    }

    /// The next frame, or `None` once the server has closed the connection.
    async fn next(&mut self) -> Option<Bytes> {
        tokio::time::timeout(PATIENCE, self.rd.read_frame())
            .await
            .expect("the server neither answered nor closed the connection")
            .ok()
            .flatten()
    }

    async fn next_response(&mut self) -> v1::Response {
        frame::decode(self.next().await.expect("a response")).unwrap()
    }

    /// Waits `wait` for anything to arrive, even the end of the stream;
    /// what arrived, if anything did.
    async fn heard_within(&mut self, wait: Duration) -> Option<String> {
        let heard = tokio::time::timeout(wait, self.rd.read_frame())
            .await
            .ok()?;
        Some(match heard {
            Ok(Some(body)) => format!("{:?}", frame::decode::<v1::Response>(body)),
            other => format!("{other:?}"),
        })
    }
}

fn op(kind: Op) -> v1::Op {
    v1::Op { kind: Some(kind) }
}

fn load(offset: u64) -> v1::Op {
    op(Op::Load(v1::Load { area: AREA, offset }))
}

/// A front end with `pages` distinct pages in `AREA`.
fn frontend_with(capacity: u64, pages: u64) -> Arc<Frontend> {
    let fe = Arc::new(frontend(capacity));
    fe.init_area(AREA, false).unwrap();
    for o in 0..pages {
        let page = make_page(Kind::Compressible, o);
        assert_eq!(fe.store_page(AREA, o, &page), Ok(StoreResult::Accepted));
    }
    fe
}

#[test]
fn a_client_that_never_completes_the_handshake_is_told_so_and_closed() {
    runtime().block_on(async {
        let fe = Arc::new(frontend(1 << 20));
        let limits = ServeLimits {
            handshake_timeout: SHORT,
            ..ServeLimits::default()
        };
        let served = serve_within(&fe, limits);
        let hello = encode_frame(&handshake::hello("slow")).unwrap();
        // Nothing at all, then half a Hello.
        for sent in [&[][..], &hello[..hello.len() / 2]] {
            let mut raw = Raw::connect(&served).await;
            raw.wr.write_all(sent).await.unwrap();
            let error = raw.next_response().await.error.expect("an error");
            assert_eq!(error.code(), v1::ErrorCode::HandshakeRequired, "{error:?}");
            assert!(error.message.contains("no Hello"), "{}", error.message);
            assert!(raw.next().await.is_none(), "the connection stayed open");
        }
        // A client that says Hello in time is served.
        let mut raw = Raw::hello(&served).await;
        let curr = vec![op(Op::CurrPages(v1::CurrPages { area: AREA }))];
        raw.wr.write_all(&Raw::request(1, curr)).await.unwrap();
        assert_eq!(raw.next_response().await.id, 1);
    });
}

/// Donors that make no room, each time only once the test lets them, and
/// that say when a store starts waiting on them.
struct Gate {
    waiting: Mutex<std_mpsc::Sender<()>>,
    open: Mutex<std_mpsc::Receiver<()>>,
}

impl RemotePages for Gate {
    fn fetch_many<'a, 'b: 'a>(
        &'a self,
        remotes: &'a [RemoteRef],
        _outs: &'a mut [&'b mut Page],
    ) -> Fetch<'a> {
        let n = remotes.len();
        Box::pin(async move { vec![LoadResult::Unavailable; n] })
    }

    fn wait(&self, _fetch: Fetch<'_>) -> Vec<LoadResult> {
        Vec::new()
    }

    fn make_room(&self) -> bool {
        let _ = self.waiting.lock().unwrap().send(());
        let _ = self.open.lock().unwrap().recv_timeout(PATIENCE);
        false
    }

    fn bring_home(&self, _space: u32, _max: usize) -> usize {
        0
    }
}

#[test]
fn a_connection_is_closed_once_idle_but_not_while_a_request_is_in_flight() {
    // One thread that must not block, as a cluster node's transport
    // thread: the store that waits on the donors goes to a blocking
    // thread, and the connection's timers keep running.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let fe = frontend_with(256 << 10, 0);
        let (waiting_tx, waiting) = std_mpsc::channel();
        let (open, open_rx) = std_mpsc::channel();
        fe.set_remote(Arc::new(Gate {
            waiting: Mutex::new(waiting_tx),
            open: Mutex::new(open_rx),
        }));
        // Full of pages alike, so that a store of one more waits on the
        // donors.
        let page = Bytes::from(make_page(Kind::Compressible, 7));
        let mut o = 0;
        while let Ok(Some(StoreResult::Accepted)) = fe.store_page_without_waiting(AREA, o, &page) {
            o += 1;
        }
        let limits = ServeLimits {
            idle_timeout: Some(SHORT),
            ..ServeLimits::default()
        };
        let served = serve_within(&fe, limits);
        let mut raw = Raw::hello(&served).await;

        // Stores enough to run on the workers, the first of which waits.
        let stores = (0..3)
            .map(|i| {
                op(Op::Store(v1::Store {
                    area: AREA,
                    offset: 1_000_000 + i,
                    page: page.clone(),
                }))
            })
            .collect();
        raw.wr.write_all(&Raw::request(7, stores)).await.unwrap();
        tokio::task::spawn_blocking(move || waiting.recv_timeout(PATIENCE))
            .await
            .unwrap()
            .expect("the store never waited for room");
        if let Some(heard) = raw.heard_within(10 * SHORT).await {
            panic!("with a request in flight, the client got {heard}");
        }
        for _ in 0..3 {
            open.send(()).unwrap();
        }
        let resp = raw.next_response().await;
        assert_eq!(resp.id, 7);
        assert!(
            resp.results
                .iter()
                .all(|r| r.status() == v1::Status::RejectedNoCapacity),
            "{resp:?}"
        );
        // Nothing in flight now: closed once idle.
        assert!(
            raw.next().await.is_none(),
            "the idle connection stayed open"
        );
    });
}

/// Bytes the kernel buffers for a socket's writes: what a server's
/// answers can take on their way to a client that reads nothing.
fn send_buffer_bytes(s: &OwnedWriteHalf) -> usize {
    let mut bytes: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket and an out-parameter of the size given.
    let rc = unsafe {
        libc::getsockopt(
            s.as_ref().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&mut bytes as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    bytes as usize
}

#[test]
fn a_client_that_reads_nothing_gets_no_more_answers_than_its_budget_then_is_closed() {
    const PAGES: u64 = 64;
    const REQUESTS: u64 = 100;
    runtime().block_on(async {
        let fe = frontend_with(64 << 20, PAGES);
        let limits = ServeLimits {
            answer_budget_bytes: 1 << 20,
            stall_timeout: SHORT,
            ..ServeLimits::default()
        };
        let served = serve_within(&fe, limits);
        let mut raw = Raw::hello(&served).await;

        // Requests whose answers, each of 64 pages, add up to far more
        // than the budget; the client reads none of them.
        let mut wire = Vec::new();
        for id in 0..REQUESTS {
            wire.extend(Raw::request(id, (0..PAGES).map(load).collect()));
        }
        raw.wr.write_all(&wire).await.unwrap();
        // The server stops reading, stalls on its writes, and closes: the
        // client's writes then fail.
        let deadline = Instant::now() + PATIENCE;
        let ping = Raw::request(0, vec![op(Op::CurrPages(v1::CurrPages { area: AREA }))]);
        while raw.wr.write_all(&ping).await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "the stalled client was not closed"
            );
            tokio::time::sleep(SHORT).await;
        }

        // What ran: the answers the budget held, and those that went into
        // the socket's buffer. The kernel's accounting of that buffer is
        // coarse (it may overfill it by a send, and a busy machine was
        // seen to fit one answer more than twice its size): one answer of
        // slack. Without the budget, every request runs.
        let answer_bytes_min = PAGES as usize * PAGE_BYTES;
        let ran = fe.counters().loads_hit.load(Relaxed) / PAGES;
        let held_max =
            limits.answer_budget_bytes + 2 * send_buffer_bytes(&raw.wr) + answer_bytes_min;
        assert!(
            ran as usize * answer_bytes_min <= held_max,
            "{ran} of {REQUESTS} requests ran for a client that read nothing: {} bytes of \
             answers against a budget of {}",
            ran as usize * answer_bytes_min,
            limits.answer_budget_bytes
        );

        // Other clients are served.
        let mut other = Raw::hello(&served).await;
        other
            .wr
            .write_all(&Raw::request(1, vec![load(0)]))
            .await
            .unwrap();
        assert_eq!(
            other.next_response().await.results[0].status(),
            v1::Status::Ok
        );
    });
}

#[test]
fn a_stalled_client_still_gets_every_page_a_shrink_handed_back() {
    const PAGES: u64 = 512;
    runtime().block_on(async {
        let fe = frontend_with(64 << 20, PAGES);
        let limits = ServeLimits {
            stall_timeout: SHORT,
            ..ServeLimits::default()
        };
        let served = serve_within(&fe, limits);
        let mut raw = Raw::hello(&served).await;
        let shrink = op(Op::Shrink(v1::Shrink {
            area: AREA,
            target_pages: 0,
            max_pages: PAGES as u32,
        }));
        raw.wr
            .write_all(&Raw::request(3, vec![shrink]))
            .await
            .unwrap();
        // Its answer (2 MiB) outgrows the socket's buffer; the client reads
        // nothing for many stall timeouts.
        tokio::time::sleep(10 * SHORT).await;
        assert_eq!(fe.curr_pages(AREA), Ok(0), "the shrink did not run");

        let resp = raw.next_response().await;
        assert_eq!(resp.id, 3);
        let returned = &resp.results[0].returned;
        assert_eq!(returned.len(), PAGES as usize, "pages were lost");
        for p in returned {
            assert!(p.page[..] == make_page(Kind::Compressible, p.offset)[..]);
        }
    });
}
