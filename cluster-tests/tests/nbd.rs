//! The NBD front end against real third-party clients (qemu-io, qemu-img,
//! nbdinfo) and against a raw socket that misbehaves.
//!
//! The client tools must be installed (`apt-get install qemu-utils
//! libnbd-bin`); a test fails, saying so, when one is missing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ramster_client::BlockingClient;
use ramster_cluster_tests::{NodeProcess, TestCluster, free_loopback_port, small_and_two_donors};
use ramster_node::cli::corpus::Pages;
use ramster_node::frontend::frontswap::AREA_ID_MAX;
use ramster_node::frontend::nbd::proto::{self, REQUEST_MAGIC};

const PAGE: usize = 4096;
/// How long a test cluster may take to form.
const FORM_TIMEOUT: Duration = Duration::from_secs(30);

/// A node serving `exports` ("NAME:SIZE" each) on a free loopback port.
fn node(capacity: &str, exports: &[&str]) -> (NodeProcess, u16) {
    node_with(capacity, exports, &[])
}

/// The same, with more of the node's flags.
fn node_with(capacity: &str, exports: &[&str], extra: &[&str]) -> (NodeProcess, u16) {
    let port = free_loopback_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["--nbd-listen", &listen];
    for e in exports {
        args.extend(["--nbd-export", e]);
    }
    args.extend(extra);
    let node = NodeProcess::start("nbd-test", capacity, &args).unwrap();
    (node, port)
}

fn uri(port: u16, export: &str) -> String {
    format!("nbd://127.0.0.1:{port}/{export}")
}

/// Runs a client tool; its stdout. Panics (clearly) if the tool is missing
/// or fails.
fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {program} ({e}): install it (apt-get install qemu-utils libnbd-bin) \
             to run the NBD tests"
            )
        });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// Runs qemu-io commands against an export; every command must succeed and
/// every pattern check must pass.
fn qemu_io(port: u16, export: &str, commands: &[String]) -> String {
    let target = uri(port, export);
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.extend(["-c", c.as_str()]);
    }
    args.push(&target);
    let out = tool("qemu-io", &args);
    // qemu-io reports a failed command or pattern on stdout; make sure.
    for bad in ["failed", "error", "Pattern verification"] {
        assert!(
            !out.contains(bad),
            "qemu-io {commands:?} reported {bad:?}:\n{out}"
        );
    }
    out
}

fn c(s: &str) -> String {
    s.to_string()
}

fn write_file(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

/// Reads the whole export back through qemu-img (a different client from
/// the one that wrote it).
fn read_export(port: u16, export: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("{export}-readback.raw"));
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri(port, export),
            out.to_str().unwrap(),
        ],
    );
    std::fs::read(out).unwrap()
}

#[test]
fn qemu_io_patterns_files_unaligned_and_sub_page_requests_zeroes_and_discard() {
    let (node, port) = node("64MiB", &["disk:8MiB"]);
    let dir = tempfile::tempdir().unwrap();
    // A source file of noise (rejected by the store: goes to the backing
    // file) and one of text (accepted into the store).
    let noise: Vec<u8> = Pages::synthetic(64, 7)
        .page(0)
        .iter()
        .cycle()
        .take(3 * PAGE + 123)
        .enumerate()
        .map(|(i, b)| b.wrapping_add((i * 7919 % 253) as u8) ^ (i >> 3) as u8)
        .collect();
    let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog; "
        .iter()
        .cycle()
        .take(5 * PAGE + 77)
        .copied()
        .collect();
    let noise_path = dir.path().join("noise.bin");
    let text_path = dir.path().join("text.bin");
    write_file(&noise_path, &noise);
    write_file(&text_path, &text);

    // The model of what the export must hold.
    let mut model = vec![0u8; 8 << 20];
    let mut cmds = Vec::new();
    let mut write_pattern = |cmds: &mut Vec<String>, byte: u8, off: usize, len: usize| {
        cmds.push(format!("write -P {byte:#x} {off} {len}"));
        model[off..off + len].fill(byte);
    };
    write_pattern(&mut cmds, 0x11, 0, 1 << 20);
    // Sub-page and unaligned, across page boundaries.
    write_pattern(&mut cmds, 0x22, 4097, 1000);
    write_pattern(&mut cmds, 0x33, 8190, 5);
    write_pattern(&mut cmds, 0x44, 3 * PAGE + 1, 2 * PAGE + 17);
    write_pattern(&mut cmds, 0x55, (1 << 20) - 3, 7);
    qemu_io(port, "disk", &cmds);
    model[(2 << 20) + 5..(2 << 20) + 5 + noise.len()].copy_from_slice(&noise);
    model[(3 << 20) + 4096..(3 << 20) + 4096 + text.len()].copy_from_slice(&text);
    qemu_io(
        port,
        "disk",
        &[
            format!(
                "write -s {} {} {}",
                noise_path.display(),
                (2 << 20) + 5,
                noise.len()
            ),
            format!(
                "write -f -s {} {} {}",
                text_path.display(),
                (3 << 20) + 4096,
                text.len()
            ),
        ],
    );
    // Reads checked against patterns, in other sizes and alignments than
    // the writes.
    qemu_io(
        port,
        "disk",
        &[
            c("read -P 0x11 0 4097"),
            c("read -P 0x22 4097 1000"),
            c("read -P 0x11 5097 3093"),
            c("read -P 0x33 8190 5"),
            c("read -P 0x44 12289 8209"),
            c("read -P 0x11 20498 1028000"),
            c("read -P 0x55 1048573 7"),
            c("read -P 0 1048580 1048000"),
        ],
    );

    // WRITE_ZEROES with and without permission to unmap, whole and partial
    // pages; then a discard of whole pages (which then read as zeros).
    qemu_io(
        port,
        "disk",
        &[
            c("write -z 100 20000"),
            c("write -z -u 65536 65536"),
            c("discard 262144 131072"),
            c("read -P 0 100 20000"),
            c("read -P 0x44 20100 398"),
            c("read -P 0x11 20498 45038"),
            c("read -P 0 65536 65536"),
            c("read -P 0 262144 131072"),
            c("read -P 0x11 393216 4096"),
        ],
    );
    model[100..20100].fill(0);
    model[65536..131072].fill(0);
    model[262144..393216].fill(0);

    // And everything, byte for byte, through another client.
    let back = read_export(port, "disk", dir.path());
    assert_eq!(back.len(), model.len());
    let first_diff = back.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "export differs from the model");
    assert!(node.log().contains("nbd export"), "{}", node.log());
}

/// Writes a corpus image into an export with qemu-img convert, compares it
/// with qemu-img compare, and reads it back byte for byte. Returns the
/// backing file's allocated bytes.
fn convert_and_compare(capacity: &str) -> (u64, String) {
    let (node, port) = node(capacity, &["img:32MiB"]);
    let dir = tempfile::tempdir().unwrap();
    convert_compare_read_back(port, "img", dir.path());
    let backing: PathBuf = node.dir.path().join("nbd").join("img.swap");
    let allocated =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&backing).unwrap()) * 512;
    (allocated, node.log())
}

/// qemu-img convert of a 32 MiB corpus image into `export`, then qemu-img
/// compare, then every byte read back through another client.
fn convert_compare_read_back(port: u16, export: &str, dir: &Path) {
    const PAGES: usize = 8192; // 32 MiB
    let image = dir.join("corpus.img");
    let pages = Pages::synthetic(PAGES, 42);
    let bytes: Vec<u8> = (0..PAGES).flat_map(|i| pages.page(i).to_vec()).collect();
    write_file(&image, &bytes);
    let target = uri(port, export);
    tool(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-W",
            "-m",
            "16",
            "-f",
            "raw",
            "-O",
            "raw",
            image.to_str().unwrap(),
            &target,
        ],
    );
    let out = tool(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            image.to_str().unwrap(),
            &target,
        ],
    );
    assert!(out.contains("Images are identical"), "{out}");
    assert!(read_export(port, export, dir) == bytes, "read back differs");
}

#[test]
fn qemu_img_convert_of_a_corpus_compares_identical() {
    let (allocated, log) = convert_and_compare("256MiB");
    // Incompressible pages of the corpus are rejected by any store; the
    // rest live in the store. The backing file holds only the former.
    assert!(
        allocated < 16 << 20,
        "backing file has {allocated} bytes\n{log}"
    );
}

#[test]
fn qemu_img_convert_with_a_store_far_below_the_image_spills_to_the_backing_file() {
    let (allocated, log) = convert_and_compare("2MiB");
    // 2 MiB of store cannot hold 32 MiB of pages compressing ~2.3x: most
    // pages must have landed in the backing file, and still read back.
    assert!(
        allocated > 16 << 20,
        "backing file has {allocated} bytes\n{log}"
    );
}

#[test]
fn an_export_on_a_small_node_of_a_cluster_keeps_pages_on_peers_and_reads_them_back() {
    // 8 MiB of store under a 32 MiB image compressing ~2.3x: remotify must
    // ship pages to the donors while qemu-img writes, and reading the image
    // back loads them from there, on the connection's own thread.
    let port = free_loopback_port();
    let listen = format!("127.0.0.1:{port}");
    let cluster = TestCluster::start(&small_and_two_donors(
        "8MiB",
        &["--nbd-listen", &listen, "--nbd-export", "img:32MiB"],
    ))
    .unwrap();
    cluster.wait_up("small", 3, FORM_TIMEOUT).unwrap();
    let small = cluster.member("small");
    let dir = tempfile::tempdir().unwrap();
    convert_compare_read_back(port, "img", dir.path());
    let shipped = small
        .metric("ramster_remotified_pages_total")
        .unwrap_or(0.0);
    let loaded = small.metric("ramster_remote_loads_total").unwrap_or(0.0);
    assert!(
        shipped > 0.0 && loaded > 0.0,
        "remotified {shipped}, loaded from donors {loaded}: {}",
        small.log()
    );
}

#[test]
fn nbdinfo_lists_exports_and_sizes() {
    let (_node, port) = node("64MiB", &["swap0:64MiB", "swap1:1GiB"]);
    let list = tool("nbdinfo", &["--list", &format!("nbd://127.0.0.1:{port}")]);
    assert!(list.contains("swap0") && list.contains("swap1"), "{list}");
    assert!(
        list.contains("67108864") && list.contains("1073741824"),
        "{list}"
    );
    let size = tool("nbdinfo", &["--size", &uri(port, "swap1")]);
    assert_eq!(size.trim(), "1073741824");
    let info = tool("nbdinfo", &[&uri(port, "swap0")]);
    assert!(info.contains("preferred: 4096"), "{info}");
    assert!(info.contains("can_multi_conn: true"), "{info}");
    // An export that does not exist is a clear error (NBD_REP_ERR_UNKNOWN,
    // which libnbd words as ENOENT), not a hang.
    let out = Command::new("nbdinfo")
        .arg(uri(port, "nope"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("export: nope"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A node restarted under a connected client (qemu's NBD client with
/// `reconnect-delay`, as `nbd-client -persist` reconnects the kernel's):
/// what the client wrote before the restart is gone with the node's RAM,
/// and it must read errors for it, never zeros. Discarding the whole
/// device starts it over.
#[test]
fn a_client_reconnecting_across_a_restart_reads_errors_not_zeros() {
    let (mut node, port) = node("64MiB", &["swap:4MiB"]);
    let writes = || node_metric(&node, "ramster_nbd_writes_total{export=\"swap\"}");
    let opts = format!(
        "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,\
         file.server.port={port},file.export=swap,file.reconnect-delay=60,discard=unmap"
    );
    // One client session across the restart: qemu-io runs the commands in
    // order; the node is killed and started again during the `sleep`, once
    // the second write shows that the first read is done.
    let commands = [
        "write -P 0xab 0 64k",
        "read -P 0xab 0 64k",
        "write -P 0x11 1M 4k",
        "sleep 5000",
        // Written before the restart: gone.
        "read -P 0xab 0 4k",
        // Never written by this client, but nothing says so: gone too.
        "read -P 0 2M 4k",
        // A sub-page write needs the rest of its page: refused.
        "write -P 0x22 64k 512",
        // Written again after the restart: fine.
        "write -P 0xcd 8k 4k",
        "read -P 0xcd 8k 4k",
        // blkdiscard: the whole device starts over, and reads as zeros.
        "discard 0 4M",
        "read -P 0 0 4M",
        "write -P 0xee 0 4k",
        "read -P 0xee 0 4k",
    ];
    let mut args = vec!["--image-opts"];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(&opts);
    let session = Command::new("qemu-io")
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-io (apt-get install qemu-utils)");
    ramster_cluster_tests::wait_for(Duration::from_secs(20), || (writes() >= 2.0).then_some(()))
        .expect("qemu-io's writes reached the node");
    node.restart().unwrap();
    let out = session.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let all = format!("{stdout}\n{stderr}");
    // qemu-io prints one line per failed command, in order.
    let failed: Vec<&str> = all.lines().filter(|l| l.contains("failed")).collect();
    assert_eq!(
        failed.len(),
        3,
        "exactly the two reads of pages from before the restart and the sub-page \
         write fail:\n{all}"
    );
    assert!(
        failed
            .iter()
            .all(|l| l.contains("Input/output error") && !l.contains("Pattern")),
        "they fail with EIO, not with zeros:\n{all}"
    );
    assert!(failed[0].starts_with("read failed"), "{all}");
    assert!(failed[2].starts_with("write failed"), "{all}");
    assert!(
        node.log()
            .contains("an earlier run of this export held pages")
    );
    // The device was discarded whole: it is fresh again.
    assert_eq!(
        node_metric(&node, "ramster_nbd_stale_pages{export=\"swap\"}"),
        0.0
    );
    // And a node that restarts after only that run's writes is stale again,
    // which a client sees before it sends a request.
    node.restart().unwrap();
    let info = tool("nbdinfo", &[&uri(port, "swap")]);
    assert!(
        info.contains("1024 pages written before the node restarted"),
        "{info}"
    );
}

fn node_metric(node: &NodeProcess, sample: &str) -> f64 {
    node.metric(sample).unwrap_or(0.0)
}

/// A node asked to stop while a host is connected says so, and keeps
/// serving (the host may still swapoff, reading its pages back) until the
/// host disconnects; then it stops at once, cleanly. A second signal stops
/// it without waiting.
#[test]
fn a_node_asked_to_stop_waits_for_connected_clients_and_says_so() {
    let (mut served, port) = node("64MiB", &["swap:4MiB"]);
    let (mut host, _) = Raw::go(port, "swap");
    host.request(proto::CMD_WRITE, 1, 0, PAGE as u32, &page_of(7));
    assert_eq!(host.reply(|_| 0).1, 0);
    served.signal("-TERM");
    wait_for_stop_warning(&served);
    // Still serving: the host reads its page back.
    host.request(proto::CMD_READ, 2, 0, PAGE as u32, &[]);
    let (handle, error, data) = host.reply(|_| PAGE);
    assert_eq!((handle, error), (2, 0));
    assert_eq!(data, page_of(7));
    assert!(served.is_running());
    // The host disconnects (NBD_CMD_DISC): the node stops, cleanly.
    host.request(proto::CMD_DISC, 3, 0, 0, &[]);
    drop(host);
    let status = served
        .wait_exit(Duration::from_secs(20))
        .expect("the node stops once its clients are gone");
    assert!(status.success(), "{status}: {}", served.log());
    assert!(served.log().contains("every NBD client has disconnected"));

    // A second signal does not wait.
    drop(served);
    let (mut served, port) = node("64MiB", &["swap:4MiB"]);
    let (_host, _) = Raw::go(port, "swap");
    served.signal("-TERM");
    wait_for_stop_warning(&served);
    served.signal("-INT");
    let status = served
        .wait_exit(Duration::from_secs(20))
        .expect("a second signal stops the node");
    assert!(status.success(), "{status}: {}", served.log());
    assert!(served.log().contains("second stop signal"));
}

/// Waits until `node`, asked to stop, warns about its connected clients.
fn wait_for_stop_warning(node: &NodeProcess) {
    ramster_cluster_tests::wait_for(Duration::from_secs(10), || {
        node.log()
            .contains("asked to stop while NBD clients are connected")
            .then_some(())
    })
    .expect("the node warns about its connected clients");
}

// ------------------------------------------------------------- raw client

/// A client that speaks the protocol by hand, to misbehave on purpose.
struct Raw {
    s: TcpStream,
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut r = Raw { s };
        let mut greeting = [0u8; proto::GREETING_BYTES];
        r.s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        r
    }

    /// Handshake with NBD_OPT_GO; the export size.
    fn go(port: u16, export: &str) -> (Raw, u64) {
        let mut r = Raw::connect(port);
        r.send(&3u32.to_be_bytes());
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        r.option(proto::OPT_GO, &data);
        let mut size = None;
        loop {
            let (reply, data) = r.option_reply();
            match reply {
                proto::REP_ACK => break,
                proto::REP_INFO if data[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()))
                }
                proto::REP_INFO => {}
                other => panic!(
                    "GO got reply {other:#x}: {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
        (r, size.expect("NBD_INFO_EXPORT"))
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[..8], &proto::OPTION_REPLY_MAGIC.to_be_bytes());
        let reply = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut data = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        self.s.read_exact(&mut data).unwrap();
        (reply, data)
    }

    fn request(&mut self, cmd: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// One simple reply: (handle, error, data of `read_len` if no error).
    fn reply(&mut self, read_len: impl Fn(u64) -> usize) -> (u64, u32, Vec<u8>) {
        let mut h = [0u8; proto::SIMPLE_REPLY_HEADER_BYTES];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut data = vec![0u8; if error == 0 { read_len(handle) } else { 0 }];
        self.s.read_exact(&mut data).unwrap();
        (handle, error, data)
    }

    /// Whether the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        // Bounded: each read either ends the stream or drains some bytes.
        for _ in 0..1000 {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
        false
    }
}

fn page_of(seed: u8) -> Vec<u8> {
    (0..PAGE).map(|i| (i / 16) as u8 ^ seed).collect()
}

#[test]
fn pipelined_requests_on_several_connections_see_each_others_writes() {
    let (_node, port) = node("64MiB", &["disk:1MiB"]);
    let (mut a, size) = Raw::go(port, "disk");
    assert_eq!(size, 1 << 20);
    let (mut b, _) = Raw::go(port, "disk");
    // 32 writes in flight on connection A, then their replies (any order).
    for i in 0..32u64 {
        a.request(
            proto::CMD_WRITE,
            1000 + i,
            i * PAGE as u64,
            PAGE as u32,
            &page_of(i as u8),
        );
    }
    let mut handles: Vec<u64> = (0..32)
        .map(|_| {
            let (h, e, _) = a.reply(|_| 0);
            assert_eq!(e, 0);
            h
        })
        .collect();
    handles.sort();
    assert_eq!(handles, (1000..1032).collect::<Vec<_>>());
    // Connection B reads them all, pipelined too.
    for i in 0..32u64 {
        b.request(proto::CMD_READ, i, i * PAGE as u64, PAGE as u32, &[]);
    }
    for _ in 0..32 {
        let (h, e, data) = b.reply(|_| PAGE);
        assert_eq!(e, 0);
        assert_eq!(data, page_of(h as u8), "page {h}");
    }
    // One write at a time on A, each read back at once on B, which must
    // never see the page as it was before the reply.
    for i in 0..200u64 {
        let offset = (200 + i % 8) * PAGE as u64;
        let data = page_of((i * 7 + 3) as u8);
        a.request(proto::CMD_WRITE, 5000 + i, offset, PAGE as u32, &data);
        assert_eq!(a.reply(|_| 0).1, 0);
        b.request(proto::CMD_READ, 6000 + i, offset, PAGE as u32, &[]);
        let (_, e, got) = b.reply(|_| PAGE);
        assert_eq!(e, 0);
        assert!(got == data, "write {i}: B read the page as it was before");
    }
    // Large requests (handed to a thread of their own) mixed with small
    // ones (gathered into batches): every reply comes, matched by handle,
    // whatever the order.
    let big: Vec<u8> = (0..(256 << 10))
        .map(|i: usize| (i / 4096) as u8 ^ 0x3c)
        .collect();
    b.request(proto::CMD_WRITE, 100, 1 << 19, big.len() as u32, &big);
    b.request(proto::CMD_READ, 101, 0, PAGE as u32, &[]);
    b.request(proto::CMD_WRITE, 102, 40 * PAGE as u64, 100, &[0xcc; 100]);
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (h, e, data) = b.reply(|h| if h == 101 { PAGE } else { 0 });
        assert_eq!(e, 0, "request {h}");
        if h == 101 {
            assert_eq!(data, page_of(0));
        }
        seen.push(h);
    }
    seen.sort();
    assert_eq!(seen, [100, 101, 102]);
    a.request(proto::CMD_READ, 200, 1 << 19, big.len() as u32, &[]);
    a.request(proto::CMD_READ, 201, 40 * PAGE as u64, 200, &[]);
    for _ in 0..2 {
        let (h, e, data) = a.reply(|h| if h == 200 { big.len() } else { 200 });
        assert_eq!(e, 0);
        if h == 200 {
            assert!(data == big, "big read differs");
        } else {
            assert_eq!(&data[..100], &[0xcc; 100]);
            // Page 40 was never written before: the rest of it reads as zeros.
            assert!(data[100..].iter().all(|&b| b == 0));
        }
    }
    // Out of bounds, unknown commands and flags: errors, and the
    // connection keeps serving.
    b.request(proto::CMD_READ, 1, (1 << 20) - 1, 2, &[]);
    assert_eq!(b.reply(|_| 0).1, proto::EINVAL);
    b.request(proto::CMD_WRITE, 2, 1 << 20, 1, &[9]);
    assert_eq!(b.reply(|_| 0).1, proto::ENOSPC);
    b.request(42, 3, 0, 0, &[]);
    assert_eq!(b.reply(|_| 0).1, proto::EINVAL);
    b.request(proto::CMD_FLUSH, 4, 0, 0, &[]);
    assert_eq!(b.reply(|_| 0).1, 0);
    b.request(proto::CMD_READ, 5, 0, PAGE as u32, &[]);
    assert_eq!(b.reply(|_| PAGE).2, page_of(0));
    b.request(proto::CMD_DISC, 6, 0, 0, &[]);
    assert!(b.closed());
}

#[test]
fn garbage_and_mid_request_disconnects_leave_the_export_serving_and_lose_nothing() {
    let (node, port) = node("64MiB", &["disk:4MiB"]);
    // Acknowledged writes from a well-behaved client.
    qemu_io(
        port,
        "disk",
        &[c("write -P 0x5a 0 1M"), c("write -P 0xa5 2M 64k")],
    );

    // Garbage instead of client flags: the server closes.
    let mut g = Raw::connect(port);
    g.send(b"GET / HTTP/1.1\r\n\r\n");
    assert!(g.closed());
    // Garbage instead of an option.
    let mut g = Raw::connect(port);
    g.send(&1u32.to_be_bytes());
    g.send(&[0xff; 64]);
    assert!(g.closed());
    // An option claiming to be huge.
    let mut g = Raw::connect(port);
    g.send(&1u32.to_be_bytes());
    let mut h = proto::IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    g.send(&h);
    assert!(g.closed());
    // A malformed GO and an unknown option get error replies, then a good GO works.
    let mut g = Raw::connect(port);
    g.send(&1u32.to_be_bytes());
    g.option(proto::OPT_GO, &[0, 0, 0, 99, b'x']);
    assert_eq!(g.option_reply().0, proto::REP_ERR_INVALID);
    g.option(77, &[]);
    assert_eq!(g.option_reply().0, proto::REP_ERR_UNSUP);
    g.option(proto::OPT_ABORT, &[]);
    assert_eq!(g.option_reply().0, proto::REP_ACK);
    // Disconnect in the middle of the handshake.
    let mut g = Raw::connect(port);
    g.send(&[0, 0]);
    drop(g);
    // Garbage after a good handshake: the connection closes.
    let (mut g, _) = Raw::go(port, "disk");
    g.send(&[0x42; 100]);
    assert!(g.closed());
    // A write whose payload never fully arrives, then a disconnect.
    let (mut g, _) = Raw::go(port, "disk");
    g.request(proto::CMD_WRITE, 1, 0, 65536, &[0xee; 1000]);
    drop(g);
    // A write too large to accept.
    let (mut g, _) = Raw::go(port, "disk");
    g.request(proto::CMD_WRITE, 1, 0, u32::MAX, &[]);
    assert!(g.closed());
    // Reads in flight when the client vanishes.
    let (mut g, _) = Raw::go(port, "disk");
    for i in 0..16 {
        g.request(proto::CMD_READ, i, 0, 1 << 20, &[]);
    }
    drop(g);

    // Everything acknowledged is still there, and new clients are served.
    qemu_io(
        port,
        "disk",
        &[
            c("read -P 0x5a 0 1M"),
            c("read -P 0 1M 1M"),
            c("read -P 0xa5 2M 64k"),
            c("write -P 0x77 3M 4k"),
            c("read -P 0x77 3M 4k"),
        ],
    );
    let log = node.log();
    assert!(log.contains("nbd connection ended"), "{log}");
}

#[test]
fn api_clients_cannot_touch_an_exports_area() {
    let (node, _port) = node("64MiB", &["disk:4MiB"]);
    let client = BlockingClient::connect(&node.socket).unwrap();
    let err = client.init_area(AREA_ID_MAX, false).unwrap_err();
    assert!(err.to_string().contains("NBD export"), "{err}");
    // Ordinary areas still work.
    client.init_area(1, false).unwrap();
}

/// The node's threads, from /proc.
fn threads_of(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("a Threads line")
}

/// Waits (bounded) until `ok` holds of the node's thread count; the count.
fn wait_for_threads(pid: u32, ok: impl Fn(usize) -> bool) -> usize {
    let mut n = threads_of(pid);
    for _ in 0..200 {
        if ok(n) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        n = threads_of(pid);
    }
    n
}

/// The export's poll counter with `result` ("found" or "slept").
fn polls(node: &NodeProcess, result: &str) -> f64 {
    node.metric(&format!(
        "ramster_nbd_polls_total{{export=\"disk\",result=\"{result}\"}}"
    ))
    .expect("the node serves its NBD metrics")
}

/// By default the thread holding a connection's requests polls for the
/// next one after its replies: the lone requests a client sends after
/// each reply are found by polling.
#[test]
fn connections_that_come_and_go_leave_no_threads_behind() {
    use ramster_node::frontend::nbd::server::THREADS_PER_CONNECTION;
    let (node, port) = node("64MiB", &["disk:1MiB"]);
    come_and_go(&node, port, THREADS_PER_CONNECTION);
    assert!(polls(&node, "found") > 0.0);
}

/// `--nbd-threads 1 --nbd-poll-us 0`: each connection has its one thread,
/// which takes turns with nobody, never polls, and serves pipelined and
/// lone requests alike.
#[test]
fn a_connection_served_by_one_thread_works_and_has_only_that() {
    let (node, port) = node_with(
        "64MiB",
        &["disk:1MiB"],
        &["--nbd-threads", "1", "--nbd-poll-us", "0"],
    );
    come_and_go(&node, port, 1);
    assert_eq!(polls(&node, "found") + polls(&node, "slept"), 0.0);
}

/// Threads the runtime may start or end of its own while a test counts a
/// node's threads (one was seen), well below what even a few leaked
/// one-thread connections would add.
const RUNTIME_THREADS_SLACK: usize = 4;

/// 24 connections, each given `threads` threads, write and read their own
/// pages, then half say goodbye and half vanish with a read in flight.
fn come_and_go(node: &NodeProcess, port: u16, threads: usize) {
    const CONNECTIONS: usize = 24;
    let pid = node.pid();
    let before = threads_of(pid);
    let mut conns: Vec<Raw> = (0..CONNECTIONS).map(|_| Raw::go(port, "disk").0).collect();
    let expected = before + CONNECTIONS * threads;
    let during = wait_for_threads(pid, |n| n >= expected);
    assert!(during >= expected, "{during} threads, wanted {expected}");
    assert!(
        during < expected + RUNTIME_THREADS_SLACK,
        "{during} threads, {threads} per connection asked for"
    );
    // A lone request on each connection, answered before the next.
    for (c, raw) in conns.iter_mut().enumerate() {
        let page = 200 + c as u64;
        raw.request(
            proto::CMD_WRITE,
            1,
            page * PAGE as u64,
            PAGE as u32,
            &page_of(page as u8),
        );
        assert_eq!(raw.reply(|_| 0).1, 0);
        raw.request(proto::CMD_READ, 2, page * PAGE as u64, PAGE as u32, &[]);
        let (_, e, data) = raw.reply(|_| PAGE);
        assert_eq!(e, 0);
        assert!(data == page_of(page as u8), "page {page}");
    }
    // Each connection: pipelined writes of its own pages, then reads.
    for (c, raw) in conns.iter_mut().enumerate() {
        for i in 0..8u64 {
            let page = c as u64 * 8 + i;
            raw.request(
                proto::CMD_WRITE,
                i,
                page * PAGE as u64,
                PAGE as u32,
                &page_of(page as u8),
            );
        }
        for _ in 0..8 {
            assert_eq!(raw.reply(|_| 0).1, 0);
        }
    }
    for (c, raw) in conns.iter_mut().enumerate() {
        for i in 0..8u64 {
            let page = c as u64 * 8 + i;
            raw.request(proto::CMD_READ, page, page * PAGE as u64, PAGE as u32, &[]);
        }
        for _ in 0..8 {
            let (h, e, data) = raw.reply(|_| PAGE);
            assert_eq!(e, 0);
            assert!(data == page_of(h as u8), "page {h}");
        }
    }
    // Half say goodbye, half vanish with a read in flight.
    for (c, mut raw) in conns.into_iter().enumerate() {
        if c % 2 == 0 {
            raw.request(proto::CMD_DISC, 0, 0, 0, &[]);
            assert!(raw.closed());
        } else {
            raw.request(proto::CMD_READ, 0, 0, PAGE as u32, &[]);
        }
    }
    let after = wait_for_threads(pid, |n| n < before + RUNTIME_THREADS_SLACK);
    assert!(
        after < before + RUNTIME_THREADS_SLACK,
        "{after} threads after the connections closed, {before} before"
    );
}

/// The node's peak resident memory so far (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .expect("a VmHWM line")
        * 1024
}

/// Thousands of READs of just under 64 KiB sent at once ask for far more
/// than they send (28 bytes each for 64 KiB of reply): the replies a batch
/// gathers are bounded, not the request count.
#[test]
fn many_small_reads_sent_at_once_do_not_gather_their_replies_in_memory() {
    const READS: u64 = 6_000;
    const LEN: u32 = 0xFFFF;
    let (node, port) = node("64MiB", &["disk:1MiB"]);
    let (mut raw, _) = Raw::go(port, "disk");
    raw.request(proto::CMD_WRITE, 1, 0, PAGE as u32, &page_of(3));
    assert_eq!(raw.reply(|_| 0).1, 0);
    let before = peak_rss(node.pid());
    let mut burst = Vec::with_capacity(READS as usize * proto::REQUEST_HEADER_BYTES);
    for h in 0..READS {
        burst.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        burst.extend_from_slice(&0u16.to_be_bytes());
        burst.extend_from_slice(&proto::CMD_READ.to_be_bytes());
        burst.extend_from_slice(&(100 + h).to_be_bytes());
        burst.extend_from_slice(&0u64.to_be_bytes());
        burst.extend_from_slice(&LEN.to_be_bytes());
    }
    raw.send(&burst);
    let mut seen = 0;
    for _ in 0..READS {
        let (handle, error, data) = raw.reply(|_| LEN as usize);
        assert_eq!(error, 0);
        assert!((100..100 + READS).contains(&handle));
        assert_eq!(&data[..PAGE], &page_of(3)[..]);
        seen += 1;
    }
    assert_eq!(seen, READS);
    // Unbounded, one batch would have held 6,000 replies: 393 MB.
    let grew = peak_rss(node.pid()).saturating_sub(before);
    assert!(
        grew < 64 << 20,
        "peak RSS grew by {grew} bytes for {} of replies",
        READS * u64::from(LEN)
    );
}

/// A client that sends large READs and reads nothing takes the server's
/// whole budget for large requests; it loses its connection after
/// REPLY_STALL_TIMEOUT, and another client's large request then completes
/// instead of waiting for ever.
#[test]
fn a_client_that_reads_nothing_is_dropped_and_stalls_no_one_for_ever() {
    use ramster_node::frontend::nbd::server::REPLY_STALL_TIMEOUT;
    const BIG: u32 = 32 << 20;
    let (_node, port) = node("64MiB", &["disk:64MiB"]);
    let (mut stalled, _) = Raw::go(port, "disk");
    // Nine: eight take the budget (256 MiB), the ninth waits for it while
    // holding the connection's requests.
    for h in 0..9 {
        stalled.request(proto::CMD_READ, h, 0, BIG, &[]);
    }
    let (mut other, _) = Raw::go(port, "disk");
    other
        .s
        .set_read_timeout(Some(REPLY_STALL_TIMEOUT * 2))
        .unwrap();
    // Let the stalled connection take the budget first.
    std::thread::sleep(Duration::from_secs(2));
    other.request(proto::CMD_READ, 77, 0, 1 << 20, &[]);
    let (handle, error, data) = other.reply(|_| 1 << 20);
    assert_eq!((handle, error), (77, 0));
    assert!(data.iter().all(|&b| b == 0));
    // The stalled client was given up: what reached its socket buffer
    // drains, then the stream ends (or was reset) instead of blocking.
    stalled
        .s
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    // Bounded: 9 replies of 32 MiB at most.
    let ended = (0..300).any(|_| match stalled.s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    });
    assert!(ended, "the stalled connection is still open");
}

/// The resident memory of process `pid`, in bytes.
fn rss_bytes(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib << 10
}

/// Clients that send the header of a 32 MiB WRITE and a little of its data,
/// then nothing: each WRITE's buffer is paid for from the server-wide
/// budget before it grows, so twelve of them cost the budget (eight of
/// them), not 384 MiB; and a half-received request is given up after
/// REQUEST_STALL_TIMEOUT, which hands the budget on.
#[test]
fn half_sent_large_writes_are_paid_for_before_they_are_buffered_and_time_out() {
    use ramster_node::frontend::nbd::server::{LARGE_BYTES_MAX, REQUEST_STALL_TIMEOUT};
    const BIG: u32 = 32 << 20;
    let (node, port) = node("64MiB", &["disk:64MiB"]);
    let before = rss_bytes(node.pid());
    let mut stalled: Vec<Raw> = (0..12)
        .map(|h| {
            let (mut r, _) = Raw::go(port, "disk");
            r.request(proto::CMD_WRITE, h, 0, BIG, &vec![0x5a; 64 << 10]);
            r.s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            r
        })
        .collect();
    // Each header is in at once; what a buffer takes, it takes then.
    std::thread::sleep(Duration::from_secs(3));
    let grown = rss_bytes(node.pid()).saturating_sub(before);
    assert!(
        grown < LARGE_BYTES_MAX + (64 << 20),
        "twelve half-sent 32 MiB writes grew the node by {} MiB",
        grown >> 20
    );
    // The eight that hold the budget are dropped after the stall timeout.
    let deadline = std::time::Instant::now() + REQUEST_STALL_TIMEOUT * 2 + Duration::from_secs(10);
    let mut ended = vec![false; stalled.len()];
    let mut buf = [0u8; 4096];
    while ended.iter().filter(|e| **e).count() < 8 && std::time::Instant::now() < deadline {
        for (i, r) in stalled.iter_mut().enumerate() {
            if !ended[i] {
                ended[i] = match r.s.read(&mut buf) {
                    Ok(0) => true,
                    Ok(_) => false,
                    Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                };
            }
        }
    }
    assert!(
        ended.iter().filter(|e| **e).count() >= 8,
        "stalled writes kept their connections: {ended:?}"
    );
    // And a client that sends its whole large WRITE is served at once.
    let (mut good, _) = Raw::go(port, "disk");
    good.request(proto::CMD_WRITE, 99, 1 << 20, 1 << 20, &vec![0xa5; 1 << 20]);
    let (handle, error, _) = good.reply(|_| 0);
    assert_eq!((handle, error), (99, 0));
    assert!(node.log().contains("did not come within"), "{}", node.log());
}
