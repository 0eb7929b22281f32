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

/// How long a node may take to start serving.
pub const NODE_START_TIMEOUT: Duration = Duration::from_secs(30);

/// The `ramster` binary of this workspace, built (once per test process) in
/// the same profile as the tests.
pub fn ramster_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> -> target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "ramster-node", "--bin", "ramster"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "building the ramster binary failed");
        profile_dir.join("ramster")
    })
}

/// A running `ramster node`.
pub struct NodeProcess {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    /// The admin endpoint; `None` when started with `--admin-listen off`.
    pub admin: Option<SocketAddr>,
    child: Child,
}

impl NodeProcess {
    /// Starts a node with `capacity` (e.g. "64MiB") and extra arguments.
    /// Without `--admin-listen` among them, the admin endpoint gets a free
    /// loopback port, so that nodes of parallel tests do not collide on the
    /// default one.
    pub fn start(name: &str, capacity: &str, extra: &[&str]) -> anyhow::Result<NodeProcess> {
        let admin_flag = extra.iter().position(|a| *a == "--admin-listen");
        let (admin, own_admin_arg) = match admin_flag {
            Some(i) => {
                let value = extra.get(i + 1).context("--admin-listen without a value")?;
                (value.parse().ok(), None)
            }
            None => {
                let addr = SocketAddr::from(([127, 0, 0, 1], free_loopback_port()));
                (Some(addr), Some(addr.to_string()))
            }
        };
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("api.sock");
        let log = std::fs::File::create(dir.path().join("node.log"))?;
        let child = Command::new(ramster_bin())
            .args(["node", "--name", name, "--capacity", capacity, "--data-dir"])
            .arg(dir.path())
            .args(extra)
            .args(
                own_admin_arg
                    .iter()
                    .flat_map(|a| ["--admin-listen", a.as_str()]),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning ramster node")?;
        let mut node = NodeProcess {
            name: name.into(),
            dir,
            socket,
            admin,
            child,
        };
        node.wait_serving()?;
        Ok(node)
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

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        // Only the process this fixture started, by its PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
