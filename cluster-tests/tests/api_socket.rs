//! The native API against a real `ramster node` process: bad input gets a
//! clear error, and other connections keep being served; and the client
//! crate's example runs against it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ramster_client::{BlockingClient, ClientError, op};
use ramster_cluster_tests::{NodeProcess, client_example_bin};
use ramster_protocol::v1::{self, op::Kind};
use ramster_protocol::{FRAME_BYTES_MAX, PAGE_BYTES, frame, handshake};

fn page(seed: u8) -> Bytes {
    let mut p = vec![0u8; PAGE_BYTES];
    for (i, b) in p.iter_mut().enumerate() {
        *b = (i / 64) as u8 ^ seed;
    }
    Bytes::from(p)
}

/// A raw connection that has done the handshake.
fn raw(node: &NodeProcess) -> UnixStream {
    let mut s = UnixStream::connect(&node.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = BytesMut::new();
    frame::encode(&handshake::hello("raw"), &mut out).unwrap();
    s.write_all(&out).unwrap();
    let welcome: v1::Welcome = frame::decode(read_frame(&mut s).unwrap()).unwrap();
    assert_eq!(welcome.page_bytes as usize, PAGE_BYTES);
    s
}

fn read_frame(s: &mut UnixStream) -> Option<Bytes> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).ok()?;
    Some(Bytes::from(body))
}

fn error_of(s: &mut UnixStream) -> v1::Error {
    let resp: v1::Response = frame::decode(read_frame(s).expect("an error frame")).unwrap();
    resp.error.expect("a request-level error")
}

fn stores_and_loads(c: &BlockingClient, area: u32) {
    c.init_area(area, false).unwrap();
    let pages: Vec<(u64, Bytes)> = (0..32).map(|i| (i, page(i as u8))).collect();
    let st = c.store_pages(area, &pages).unwrap();
    assert!(st.iter().all(|s| *s == v1::Status::Ok), "{st:?}");
    let back = c.load_pages(area, &(0..32).collect::<Vec<_>>()).unwrap();
    for (i, p) in back.into_iter().enumerate() {
        assert_eq!(p.unwrap(), pages[i].1);
    }
}

#[test]
fn bad_input_gets_clear_errors_and_other_connections_keep_working() {
    let node = NodeProcess::start("api-test", "64MiB", &[]).unwrap();
    let good = BlockingClient::connect(&node.socket).unwrap();
    stores_and_loads(&good, 1);

    // Garbage instead of a handshake: an error frame, then the connection closes.
    let mut s = UnixStream::connect(&node.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"\x05\x00\x00\x00GET /").unwrap();
    let e = error_of(&mut s);
    assert_eq!(e.code(), v1::ErrorCode::HandshakeRequired, "{e:?}");
    assert!(read_frame(&mut s).is_none());

    // A handshake with a version the node does not speak.
    let mut s = UnixStream::connect(&node.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = handshake::hello("future");
    hello.min_version = 99;
    hello.max_version = 100;
    let mut out = BytesMut::new();
    frame::encode(&hello, &mut out).unwrap();
    s.write_all(&out).unwrap();
    assert_eq!(error_of(&mut s).code(), v1::ErrorCode::UnsupportedVersion);

    // After the handshake: a body that is not a Request gets an error and
    // the connection stays usable (framing is intact).
    let mut s = raw(&node);
    s.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap();
    assert_eq!(error_of(&mut s).code(), v1::ErrorCode::MalformedFrame);
    let mut out = BytesMut::new();
    frame::encode(
        &v1::Request {
            id: 9,
            ops: vec![op(Kind::CurrPages(v1::CurrPages { area: 1 }))],
        },
        &mut out,
    )
    .unwrap();
    s.write_all(&out).unwrap();
    let resp: v1::Response = frame::decode(read_frame(&mut s).unwrap()).unwrap();
    assert_eq!(resp.id, 9);
    assert_eq!(resp.results[0].value, 32);

    // An oversized frame length: refused before reading it, connection closed.
    let mut s = raw(&node);
    s.write_all(&((FRAME_BYTES_MAX as u32) + 1).to_le_bytes())
        .unwrap();
    assert_eq!(error_of(&mut s).code(), v1::ErrorCode::FrameTooLarge);
    assert!(read_frame(&mut s).is_none());

    // Random bytes after the handshake, then a hang-up mid-frame.
    let mut s = raw(&node);
    let mut x = 0x1234_5678u32;
    let junk: Vec<u8> = (0..10_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let _ = s.write_all(&junk);
    drop(s);

    // Op-level errors: wrong page size, unknown area, too many ops. The
    // store of the wrong size goes to an offset without a page: a failed
    // store drops the page it was meant to replace.
    let r = good
        .call(vec![
            op(Kind::Store(v1::Store {
                area: 1,
                offset: 32,
                page: Bytes::from(vec![1u8; 100]),
            })),
            op(Kind::Store(v1::Store {
                area: 77,
                offset: 0,
                page: page(1),
            })),
            op(Kind::Load(v1::Load {
                area: 77,
                offset: 0,
            })),
        ])
        .unwrap();
    assert_eq!(r[0].status(), v1::Status::InvalidArgument);
    assert!(r[0].detail.contains("4096"), "{}", r[0].detail);
    assert_eq!(r[1].status(), v1::Status::UnknownArea);
    assert_eq!(r[2].status(), v1::Status::UnknownArea);
    let too_many = (0..ramster_protocol::BATCH_OPS_MAX + 1)
        .map(|_| op(Kind::CurrPages(v1::CurrPages { area: 1 })))
        .collect();
    assert!(matches!(
        good.call(too_many),
        Err(ClientError::Server {
            code: v1::ErrorCode::TooManyOps,
            ..
        })
    ));

    // The first connection, and new ones, still work; nothing was lost.
    let back = good.load_pages(1, &(0..32).collect::<Vec<_>>()).unwrap();
    assert!(
        back.iter()
            .enumerate()
            .all(|(i, p)| p.as_ref().unwrap() == &page(i as u8))
    );
    let fresh = BlockingClient::connect(&node.socket).unwrap();
    stores_and_loads(&fresh, 2);
    let mut node = node;
    assert!(node.is_running(), "node died: {}", node.log());
}

/// Peak resident memory of process `pid`, in bytes.
fn peak_resident_bytes(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .expect("a VmHWM line")
        .trim()
        .trim_end_matches("kB")
        .trim();
    kib.parse::<usize>().unwrap() * 1024
}

#[test]
fn a_frame_of_empty_ops_is_refused_before_it_is_decoded() {
    let node = NodeProcess::start("empty-ops", "64MiB", &[]).unwrap();
    let mut s = raw(&node);
    // An id, then as many empty ops (a key and a zero length: 2 bytes
    // each) as a frame holds.
    let mut body = vec![0x08, 77];
    while body.len() + 2 <= FRAME_BYTES_MAX {
        body.extend_from_slice(&[0x12, 0]);
    }
    let ops = (body.len() - 2) / 2;
    let before = peak_resident_bytes(node.pid());
    let mut wire = (body.len() as u32).to_le_bytes().to_vec();
    wire.extend_from_slice(&body);
    s.write_all(&wire).unwrap();
    let resp: v1::Response = frame::decode(read_frame(&mut s).unwrap()).unwrap();
    assert_eq!(resp.id, 77, "the refusal names the request");
    let e = resp.error.expect("a request-level error");
    assert_eq!(e.code(), v1::ErrorCode::TooManyOps, "{e:?}");
    assert!(e.message.contains(&format!("{ops} ops")), "{}", e.message);

    // The frame itself, in a read buffer that at most doubles as it
    // arrives; decoded, its ops would have taken tens of times more.
    let grown = peak_resident_bytes(node.pid()).saturating_sub(before);
    assert!(
        grown <= 3 * FRAME_BYTES_MAX,
        "the node grew by {grown} bytes for a frame of {} bytes",
        wire.len()
    );

    // The connection goes on.
    let mut out = BytesMut::new();
    frame::encode(
        &v1::Request {
            id: 78,
            ops: vec![op(Kind::CurrPages(v1::CurrPages { area: 1 }))],
        },
        &mut out,
    )
    .unwrap();
    s.write_all(&out).unwrap();
    let resp: v1::Response = frame::decode(read_frame(&mut s).unwrap()).unwrap();
    assert_eq!(resp.id, 78);
    let mut node = node;
    assert!(node.is_running(), "node died: {}", node.log());
}

#[test]
fn many_requests_in_flight_on_one_connection() {
    let node = NodeProcess::start("pipeline-test", "64MiB", &[]).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = std::sync::Arc::new(ramster_client::Client::connect(&node.socket).await.unwrap());
        c.init_area(3, false).await.unwrap();
        let mut tasks = Vec::new();
        for t in 0..32u64 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let pages: Vec<(u64, Bytes)> = (0..16)
                    .map(|i| (t * 16 + i, page((t * 16 + i) as u8)))
                    .collect();
                assert!(
                    c.store_pages(3, &pages)
                        .await
                        .unwrap()
                        .iter()
                        .all(|s| *s == v1::Status::Ok)
                );
                let offs: Vec<u64> = pages.iter().map(|p| p.0).collect();
                for (p, got) in pages.iter().zip(c.load_pages(3, &offs).await.unwrap()) {
                    assert_eq!(got.unwrap(), p.1);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(c.curr_pages(3).await.unwrap(), 512);
        let stats = c.stats().await.unwrap();
        assert_eq!(stats.counters.unwrap().succ_stores, 512);
    });
}

#[test]
fn a_store_that_fails_drops_the_page_it_was_meant_to_replace() {
    let node = NodeProcess::start("failed-store", "64MiB", &[]).unwrap();
    let c = BlockingClient::connect(&node.socket).unwrap();
    c.init_area(1, false).unwrap();
    assert_eq!(c.store_pages(1, &[(5, page(5))]).unwrap(), [v1::Status::Ok]);
    let r = c
        .call(vec![op(Kind::Store(v1::Store {
            area: 1,
            offset: 5,
            page: Bytes::from(vec![6u8; PAGE_BYTES - 1]),
        }))])
        .unwrap();
    assert_eq!(r[0].status(), v1::Status::InvalidArgument, "{r:?}");
    let got = c.load_pages(1, &[5]).unwrap();
    assert!(
        matches!(got[..], [Err(v1::Status::NotFound)]),
        "the old page outlived a store that failed: {:?}",
        got.iter()
            .map(|g| g.as_ref().map(|p| p.len()))
            .collect::<Vec<_>>()
    );
    assert_eq!(c.curr_pages(1).unwrap(), 0);
}

/// The client crate's example, built as its users build it, against a real
/// node: a page stored, loaded back identical, invalidated, then a miss.
#[test]
fn the_client_example_stores_loads_and_invalidates() {
    let node = NodeProcess::start("example", "64MiB", &[]).unwrap();
    let out = Command::new(client_example_bin())
        .arg("--socket")
        .arg(&node.socket)
        .args(["--area", "3"])
        .output()
        .expect("running the store_load example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stdout}{stderr}", out.status);
    for line in [
        "connected to node example",
        "store area 3 offset 42: OK",
        "identical to what was stored",
        "1 page dropped",
        "after invalidate: NOT_FOUND",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}{stderr}");
    }

    // The socket may come from the environment instead; and a socket with
    // no node behind it is an error, in the exit code too.
    let out = Command::new(client_example_bin())
        .env("RAMSTER_API_SOCKET", &node.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = Command::new(client_example_bin())
        .arg("--socket")
        .arg(node.dir.path().join("no-such.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}
