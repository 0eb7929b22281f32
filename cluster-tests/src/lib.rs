//! The fixture for tests that run real `ramster` processes: it builds the
//! binary once, gives each node its own data dir, socket and admin port,
//! waits until the node serves, and ends exactly the processes it started
//! (by PID) when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub mod netns;

/// How long a node may take to start serving.
pub const NODE_START_TIMEOUT: Duration = Duration::from_secs(30);

/// The `ramster` binary of this workspace, built (once per test process) in
/// the same profile as the tests; or the one `RAMSTER_BIN` names, so that a
/// loop of test runs (`scripts/chaos-schedules.sh`) builds it once.
pub fn ramster_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("RAMSTER_BIN") {
            let bin = PathBuf::from(bin);
            assert!(bin.is_file(), "RAMSTER_BIN={} is not a file", bin.display());
            return bin;
        }
        cargo_build(&["-p", "ramster-node", "--bin", "ramster"]).join("ramster")
    })
}

/// The `store_load` example of `ramster-client`, built (once per test
/// process) in the same profile as the tests: cargo sets no path to an
/// example for tests, as it does for binaries.
pub fn client_example_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        cargo_build(&["-p", "ramster-client", "--example", "store_load"])
            .join("examples")
            .join("store_load")
    })
}

/// Runs `cargo build` with `args` in the profile this test was built in,
/// and returns that profile's target directory.
fn cargo_build(args: &[&str]) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet"]).args(args);
    // cargo describes the test's own package to the test process; a
    // build script that watches those variables (ring's does) would see
    // them change between this build and the workspace's, and rebuild
    // half the tree each time a test binary starts.
    for (var, _) in std::env::vars_os() {
        let name = var.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
            ]
            .contains(&name.as_ref())
        {
            cmd.env_remove(&var);
        }
    }
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("running cargo build");
    assert!(status.success(), "cargo build {args:?} failed");
    profile_dir
}

/// A running `ramster node`.
pub struct NodeProcess {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    /// The admin endpoint; `None` when started with `--admin-listen off`.
    pub admin: Option<SocketAddr>,
    /// The arguments it was started with, to start it again.
    args: Vec<String>,
    child: Child,
}

/// Spawns `ramster` with `args` on the data dir `dir`, appending to its
/// `node.log`.
fn spawn_node(args: &[String], dir: &Path) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("node.log"))?;
    Command::new(ramster_bin())
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("spawning ramster node")
}

impl NodeProcess {
    /// Starts a node with `capacity` (e.g. "64MiB") and extra arguments.
    /// Without `--admin-listen` among them, the admin endpoint gets a free
    /// loopback port, so that nodes of parallel tests do not collide on the
    /// default one.
    pub fn start(name: &str, capacity: &str, extra: &[&str]) -> anyhow::Result<NodeProcess> {
        let admin_flag = extra.iter().position(|a| *a == "--admin-listen");
        let mut args: Vec<String> = ["node", "--name", name, "--capacity", capacity]
            .iter()
            .chain(extra)
            .map(|a| a.to_string())
            .collect();
        let admin = match admin_flag {
            Some(i) => {
                let value = extra.get(i + 1).context("--admin-listen without a value")?;
                value.parse().ok()
            }
            None => {
                let addr = SocketAddr::from(([127, 0, 0, 1], free_loopback_port()));
                args.extend(["--admin-listen".to_string(), addr.to_string()]);
                Some(addr)
            }
        };
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("api.sock");
        let child = spawn_node(&args, dir.path())?;
        let mut node = NodeProcess {
            name: name.into(),
            dir,
            socket,
            admin,
            args,
            child,
        };
        node.wait_serving()?;
        Ok(node)
    }

    /// Kills the node (SIGKILL) and starts it again on the same data dir,
    /// ports and flags: a crash and a restart, as a supervisor would do.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The next run's log follows the last one's.
        self.child = spawn_node(&self.args, self.dir.path())?;
        self.wait_serving()
    }

    fn wait_serving(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + NODE_START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("node {} exited with {status}: {}", self.name, self.log());
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "node {} did not serve within {NODE_START_TIMEOUT:?}: {}",
            self.name,
            self.log()
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One sample of the node's `/metrics` (see [`metric_at`]); `None`
    /// without an admin endpoint.
    pub fn metric(&self, name: &str) -> Option<f64> {
        metric_at(&self.admin?.to_string(), name)
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `sig` (e.g. "-TERM") to the node, by its PID.
    pub fn signal(&self, sig: &str) {
        let pid = self.pid().to_string();
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid} failed");
    }

    /// How the process ended, once it has (waits at most `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_for(timeout, || self.child.try_wait().ok().flatten()).ok()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        // Only the process this fixture started, by its PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One sample of the `/metrics` served at `admin`: `name` is the family's
/// name with the sample's labels as the node writes them, e.g.
/// `ramster_nbd_polls_total{export="disk",result="found"}`.
pub fn metric_at(admin: &str, name: &str) -> Option<f64> {
    let text = ramster_node::cli::admin_client::get(admin, "/metrics")
        .ok()?
        .body;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A loopback TCP port that was free a moment ago (the OS picked it), for a
/// node's listener. Another process could take it in between; on a test
/// machine that is rare enough.
pub fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a loopback port")
        .port()
}

/// A member of a test cluster. Its data dir outlives the process, so it can
/// be stopped and started again as the same node.
pub struct Member {
    pub name: String,
    pub data_dir: PathBuf,
    /// `ramster node` arguments after the name and data dir.
    pub args: Vec<String>,
    /// The admin endpoint (`/health`, `/metrics`, `/v1/status`).
    pub admin: String,
    /// The peer (QUIC) address.
    pub peer: String,
    /// The network namespace the process runs in, if not the machine's.
    pub netns: Option<String>,
    child: Option<Child>,
}

impl Member {
    pub fn socket(&self) -> PathBuf {
        self.data_dir.join("api.sock")
    }

    /// Starts the process and waits until its admin endpoint answers.
    pub fn start(&mut self) -> anyhow::Result<()> {
        assert!(self.child.is_none(), "{} is running", self.name);
        std::fs::create_dir_all(&self.data_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.join("node.log"))?;
        // `ip netns exec` execs the node in place: the PID is the node's.
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(ramster_bin());
                cmd
            }
            None => Command::new(ramster_bin()),
        };
        let child = cmd
            .args(["node", "--name", &self.name, "--data-dir"])
            .arg(&self.data_dir)
            .args(&self.args)
            .env("RUST_LOG", "info,openraft=warn")
            // Plain text: logs are read by tests and by people.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning ramster node")?;
        self.child = Some(child);
        let deadline = Instant::now() + NODE_START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().expect("started").try_wait()? {
                self.child = None;
                bail!("node {} exited with {status}: {}", self.name, self.log());
            }
            if std::net::TcpStream::connect(&self.admin).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "node {} did not serve within {NODE_START_TIMEOUT:?}: {}",
            self.name,
            self.log()
        )
    }

    /// SIGTERM, then waits for a clean exit: the node drains first (at
    /// most `--stop-drain`, 60 s unless the test says otherwise), so
    /// SIGKILL only after 90 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGKILL: the node dies without a word to anyone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `sig` (as `kill` spells it: "-STOP", "-CONT") to the running
    /// process.
    pub fn signal(&self, sig: &str) {
        let pid = self.pid().expect("running").to_string();
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid} failed");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("node.log")).unwrap_or_default()
    }

    /// `ramster <args> --endpoint <admin>`: exit code and stdout.
    pub fn cli(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(ramster_bin())
            .args(args)
            .args(["--endpoint", &self.admin])
            .output()
            .expect("running ramster");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// `ramster cluster <args> --endpoint <admin>` (drain, activate,
    /// remove, ...): exit code and what it printed, stdout then stderr.
    pub fn cluster(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(ramster_bin())
            .arg("cluster")
            .args(args)
            .args(["--endpoint", &self.admin])
            .output()
            .expect("running ramster cluster");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// One sample of the member's `/metrics` (see [`metric_at`]).
    pub fn metric(&self, name: &str) -> Option<f64> {
        metric_at(&self.admin, name)
    }

    /// The cluster as this node sees it, straight from its admin endpoint
    /// (`/v1/status`, no `ramster` process): for polling. `None` while it
    /// does not answer.
    pub fn view(&self) -> Option<ramster_node::cluster::status::ClusterStatus> {
        let answer = ramster_node::cli::admin_client::get(&self.admin, "/v1/status").ok()?;
        serde_json::from_str(&answer.body).ok()
    }

    /// The last `lines` lines of the member's log, without peers' refused
    /// connections and Raft's chatter, for a failure's message.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let kept: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains("peer refused") && !l.contains("openraft"))
            .collect();
        kept[kept.len().saturating_sub(lines)..].join("\n")
    }

    /// The cluster as this node sees it (`ramster status -o json`).
    pub fn status(&self) -> anyhow::Result<ramster_node::cluster::status::ClusterStatus> {
        let (code, out) = self.cli(&["status", "-o", "json"]);
        if code != 0 {
            bail!("ramster status exited {code}: {out}");
        }
        serde_json::from_str(&out).with_context(|| format!("status JSON: {out}"))
    }

    /// Copies of this node's pages the others hold, as their last
    /// heartbeats (in this node's status) say.
    pub fn copies_on_donors(&self) -> Option<u64> {
        let s = self.status().ok()?;
        Some(
            s.nodes
                .iter()
                .filter(|n| n.name != self.name)
                .map(|n| n.held_for_others_pages)
                .sum(),
        )
    }

    /// Waits until more than `at_least` of this node's pages (those of
    /// `client`, connected to it) are on donors, each with exactly `copies`
    /// copies; their number. Panics, with the end of this node's log, if
    /// that does not come within `timeout`.
    pub fn wait_for_copies(
        &self,
        client: &ramster_client::BlockingClient,
        copies: u64,
        at_least: u64,
        timeout: Duration,
    ) -> u64 {
        let remote = || client.stats().ok()?.store.map(|s| s.remote_pages);
        wait_for(timeout, || {
            let remote = remote()?;
            (remote > at_least && self.copies_on_donors()? == copies * remote).then_some(remote)
        })
        .unwrap_or_else(|e| {
            panic!(
                "{}'s pages are not on donors with {copies} copies each ({e}): {:?} remote, \
                 {:?} copies; the log ends:\n{}",
                self.name,
                remote(),
                self.copies_on_donors(),
                self.log_tail(30)
            )
        })
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        // Only the process this fixture started, by its PID.
        self.kill();
    }
}

/// A small deterministic generator (xorshift64*), so a test's seed
/// replays its schedule.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// What a member is started with.
#[derive(Clone, Copy)]
pub struct MemberSpec<'a> {
    pub name: &'a str,
    pub capacity: &'a str,
    pub extra: &'a [&'a str],
}

/// Nodes with certificates of one fresh CA, every one given the same seed
/// list: on 127.0.0.1, or each in a network namespace of its own.
pub struct TestCluster {
    // Dropped in this order: the processes, then the test thread's way
    // into the namespaces, then the namespaces, then the files.
    pub members: Vec<Member>,
    entered: Option<netns::Entered>,
    network: Option<netns::Network>,
    pub dir: tempfile::TempDir,
}

/// A node named `small` with `capacity` and `extra`, and two peers of
/// 256 MiB, `big1` and `big2`, that donate all of it: where small's pages
/// go when its store fills.
pub fn small_and_two_donors<'a>(capacity: &'a str, extra: &'a [&'a str]) -> [MemberSpec<'a>; 3] {
    let big = |name| MemberSpec {
        name,
        capacity: "256MiB",
        extra: &["--donate", "256MiB"],
    };
    [
        MemberSpec {
            name: "small",
            capacity,
            extra,
        },
        big("big1"),
        big("big2"),
    ]
}

/// An owner with a small store and room for few pages, a memory server and
/// two peers that donate: most of the owner's pages go to the memory
/// server, their second copies to the peers. The owner repairs as soon as
/// a donor is down (`--out-after 0`): the tests that use it are about
/// what repair does, not about how long it waits.
pub const OWNER_MEMSRV_TWO_PEERS: [MemberSpec<'static>; 4] = [
    MemberSpec {
        name: "owner",
        capacity: "32MiB",
        extra: &["--replicas", "2", "--out-after", "0"],
    },
    MemberSpec {
        name: "memsrv",
        capacity: "256MiB",
        extra: &["--role", "memory-server"],
    },
    MemberSpec {
        name: "peer1",
        capacity: "256MiB",
        extra: &["--donate", "192MiB"],
    },
    MemberSpec {
        name: "peer2",
        capacity: "256MiB",
        extra: &["--donate", "192MiB"],
    },
];

impl TestCluster {
    /// Makes the CA and node certificates and starts every member.
    pub fn start(specs: &[MemberSpec<'_>]) -> anyhow::Result<TestCluster> {
        let mut cluster = TestCluster::new(specs)?;
        for m in &mut cluster.members {
            m.start()?;
        }
        Ok(cluster)
    }

    /// Starts every member in a network namespace of its own (see
    /// [`netns`]), member `i` as host `i`, so that links between them can be
    /// cut with [`TestCluster::network`]. The calling thread moves into the
    /// namespaces' switch while the cluster lives: the admin endpoints and
    /// `ramster` commands it runs reach every member from there.
    pub fn start_in_namespaces(specs: &[MemberSpec<'_>]) -> anyhow::Result<TestCluster> {
        // Built before the thread leaves the machine's network.
        ramster_bin();
        let network = netns::Network::create(specs.len())?;
        let addresses = (0..specs.len())
            .map(|i| {
                let ip = network.address(i);
                (format!("{ip}:7946"), format!("{ip}:9946"))
            })
            .collect();
        let mut cluster = TestCluster::with_addresses(specs, addresses)?;
        for (i, m) in cluster.members.iter_mut().enumerate() {
            m.netns = Some(network.namespace(i).to_string());
        }
        cluster.entered = Some(network.enter_switch()?);
        cluster.network = Some(network);
        for m in &mut cluster.members {
            m.start()?;
        }
        Ok(cluster)
    }

    /// The namespaces of a cluster from [`TestCluster::start_in_namespaces`].
    pub fn network(&self) -> &netns::Network {
        self.network.as_ref().expect("a cluster in namespaces")
    }

    /// Member `name`'s host number in [`TestCluster::network`].
    pub fn host(&self, name: &str) -> usize {
        self.members
            .iter()
            .position(|m| m.name == name)
            .expect("member")
    }

    /// Makes the CA, certificates and settings without starting anything.
    pub fn new(specs: &[MemberSpec<'_>]) -> anyhow::Result<TestCluster> {
        let addresses = specs
            .iter()
            .map(|_| {
                (
                    format!("127.0.0.1:{}", free_loopback_udp_port()),
                    format!("127.0.0.1:{}", free_loopback_port()),
                )
            })
            .collect();
        TestCluster::with_addresses(specs, addresses)
    }

    /// As [`TestCluster::new`], each member with its (peer, admin) address.
    fn with_addresses(
        specs: &[MemberSpec<'_>],
        addresses: Vec<(String, String)>,
    ) -> anyhow::Result<TestCluster> {
        let dir = tempfile::tempdir()?;
        let ca = dir.path().join("ca");
        run_ok(
            Command::new(ramster_bin())
                .args(["cert", "create-ca", "--certs-dir"])
                .arg(&ca),
        )?;
        let seeds = addresses
            .iter()
            .map(|(peer, _)| peer.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (spec, (peer, admin)) in specs.iter().zip(addresses) {
            run_ok(
                Command::new(ramster_bin())
                    .args(["cert", "create-node", spec.name, "--certs-dir"])
                    .arg(&ca),
            )?;
            let mut args: Vec<String> = vec![
                "--capacity".into(),
                spec.capacity.into(),
                "--certs-dir".into(),
                ca.join(spec.name).display().to_string(),
                "--listen".into(),
                peer.clone(),
                "--join".into(),
                seeds.clone(),
                "--admin-listen".into(),
                admin.clone(),
            ];
            args.extend(spec.extra.iter().map(|s| s.to_string()));
            members.push(Member {
                name: spec.name.into(),
                data_dir: dir.path().join(spec.name),
                args,
                admin,
                peer,
                netns: None,
                child: None,
            });
        }
        Ok(TestCluster {
            members,
            entered: None,
            network: None,
            dir,
        })
    }

    pub fn member(&self, name: &str) -> &Member {
        self.members
            .iter()
            .find(|m| m.name == name)
            .expect("member")
    }

    pub fn member_mut(&mut self, name: &str) -> &mut Member {
        self.members
            .iter_mut()
            .find(|m| m.name == name)
            .expect("member")
    }

    /// Waits until `name` sees `up` nodes up; its last status.
    pub fn wait_up(
        &self,
        name: &str,
        up: usize,
        timeout: Duration,
    ) -> anyhow::Result<ramster_node::cluster::status::ClusterStatus> {
        let m = self.member(name);
        wait_for(timeout, || {
            let s = m.status().ok()?;
            (s.nodes_up == up && s.leader.is_some()).then_some(s)
        })
        .with_context(|| format!("{name} never saw {up} nodes up: {}", m.log()))
    }
}

/// Initialises `area` and stores every page of `pages` at its index, 256
/// per request; the offsets accepted (incompressible pages are refused,
/// anything else refused fails the test).
pub fn store_pages(
    client: &ramster_client::BlockingClient,
    area: u32,
    pages: &ramster_node::cli::corpus::Pages,
) -> Vec<u64> {
    client.init_area(area, false).unwrap();
    store_into(client, area, pages, &[])
}

/// Stores every page of `pages` at its index into `area`, which exists,
/// 256 per request; the offsets accepted. Incompressible pages are refused,
/// and so may be pages with a status in `may_refuse`; any other refusal
/// fails the test.
pub fn store_into(
    client: &ramster_client::BlockingClient,
    area: u32,
    pages: &ramster_node::cli::corpus::Pages,
    may_refuse: &[ramster_protocol::v1::Status],
) -> Vec<u64> {
    let mut accepted = Vec::new();
    let offsets: Vec<u64> = (0..pages.len() as u64).collect();
    for chunk in offsets.chunks(256) {
        let batch: Vec<(u64, bytes::Bytes)> = chunk
            .iter()
            .map(|&o| (o, pages.page_bytes(o as usize)))
            .collect();
        for (&o, s) in chunk.iter().zip(client.store_pages(area, &batch).unwrap()) {
            match s {
                ramster_protocol::v1::Status::Ok => accepted.push(o),
                ramster_protocol::v1::Status::RejectedIncompressible => {}
                other if may_refuse.contains(&other) => {}
                other => panic!("page {o} refused: {other:?}"),
            }
        }
    }
    accepted
}

/// Loads `offsets` of `area` back, 256 at a time, and panics unless each
/// is byte for byte the corpus page it was stored from.
pub fn verify_pages(
    client: &ramster_client::BlockingClient,
    area: u32,
    pages: &ramster_node::cli::corpus::Pages,
    offsets: &[u64],
) {
    for chunk in offsets.chunks(256) {
        let got = client.load_pages(area, chunk).unwrap();
        for (&o, g) in chunk.iter().zip(got) {
            let page = g.unwrap_or_else(|s| panic!("page {o} did not load: {s:?}"));
            assert!(
                page[..] == pages.page(o as usize)[..],
                "page {o} came back different"
            );
        }
    }
}

/// Polls `f` every 100 ms until it gives a value or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_ok(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A loopback UDP port that was free a moment ago, for a peer listener.
pub fn free_loopback_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("binding a loopback UDP port")
        .port()
}
