//! Test hosts in network namespaces: each member of a cluster gets a
//! namespace of its own with one address on a bridge, and the link between
//! any two of them can be cut and restored. A cut drops the packets on
//! arrival, silently, as a pulled cable would: the sender sees no error,
//! only silence. Nothing of the machine's own network is touched; the
//! namespaces are deleted when the [`Network`] is dropped.
//!
//! Needs root, iproute2 (`ip`) and nftables (`nft`).

use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, bail};

/// The bridge's subnet, private to the namespaces (no route leads to it
/// from the machine's own network).
const SUBNET: [u8; 3] = [10, 77, 0];
/// The bridge's own address, in the switch namespace.
const SWITCH_HOST: u8 = 254;

/// Namespaces made by one test process, numbered so that tests running at
/// once in it never share one.
static NETWORKS: AtomicU32 = AtomicU32::new(0);

/// A bridge in a namespace of its own (the switch) and a namespace per host
/// with a veth link to it.
pub struct Network {
    switch: String,
    hosts: Vec<String>,
}

/// Why namespaces cannot be made here, if they cannot.
pub fn unsupported() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces need root".into());
    }
    for tool in ["ip", "nft"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

impl Network {
    /// Makes the switch and `hosts` hosts, each with its address up and an
    /// empty list of cut links.
    pub fn create(hosts: usize) -> anyhow::Result<Network> {
        assert!(hosts < SWITCH_HOST as usize, "too many hosts");
        let tag = format!(
            "ramster{}n{}",
            std::process::id(),
            NETWORKS.fetch_add(1, Ordering::Relaxed)
        );
        // Made step by step; whatever exists when a step fails is deleted
        // by the drop.
        let mut net = Network {
            switch: format!("{tag}sw"),
            hosts: Vec::new(),
        };
        run(Command::new("ip").args(["netns", "add", &net.switch]))?;
        let switch_address = format!("{}/24", Self::address_of(SWITCH_HOST));
        net.in_switch(&["ip", "link", "set", "lo", "up"])?;
        net.in_switch(&["ip", "link", "add", "br0", "type", "bridge"])?;
        net.in_switch(&["ip", "addr", "add", &switch_address, "dev", "br0"])?;
        net.in_switch(&["ip", "link", "set", "br0", "up"])?;
        for i in 0..hosts {
            let ns = format!("{tag}h{i}");
            run(Command::new("ip").args(["netns", "add", &ns]))?;
            net.hosts.push(ns.clone());
            let port = format!("h{i}");
            // The veth is made in the switch with its other end in the host.
            net.in_switch(&[
                "ip", "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            net.in_switch(&["ip", "link", "set", &port, "master", "br0"])?;
            net.in_switch(&["ip", "link", "set", &port, "up"])?;
            let address = format!("{}/24", net.address(i));
            net.in_host(i, &["ip", "link", "set", "lo", "up"])?;
            net.in_host(i, &["ip", "addr", "add", &address, "dev", "eth0"])?;
            net.in_host(i, &["ip", "link", "set", "eth0", "up"])?;
            // Packets from an address in `cut` are dropped on arrival.
            net.nft(
                i,
                "add table inet ramster\n\
                 add set inet ramster cut { type ipv4_addr; }\n\
                 add chain inet ramster input { type filter hook input priority 0; policy accept; }\n\
                 add rule inet ramster input ip saddr @cut drop\n",
            )?;
        }
        Ok(net)
    }

    /// Host `i`'s address on the bridge.
    pub fn address(&self, i: usize) -> Ipv4Addr {
        assert!(i < self.hosts.len(), "no host {i}");
        Self::address_of(i as u8 + 1)
    }

    fn address_of(host: u8) -> Ipv4Addr {
        Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], host)
    }

    /// Host `i`'s namespace, for `ip netns exec`.
    pub fn namespace(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// Moves the calling thread into the switch namespace, which reaches
    /// every host; processes and threads it starts from then on are there
    /// too. The thread's namespace is restored when the guard is dropped,
    /// on the same thread.
    pub fn enter_switch(&self) -> anyhow::Result<Entered> {
        let original = File::open("/proc/thread-self/ns/net").context("this thread's netns")?;
        let switch = File::open(format!("/run/netns/{}", self.switch))
            .with_context(|| format!("namespace {}", self.switch))?;
        setns(&switch)?;
        Ok(Entered { original })
    }

    /// Cuts the link between hosts `a` and `b`, both ways.
    pub fn cut(&self, a: usize, b: usize) -> anyhow::Result<()> {
        self.nft(
            a,
            &format!("add element inet ramster cut {{ {} }}\n", self.address(b)),
        )?;
        self.nft(
            b,
            &format!("add element inet ramster cut {{ {} }}\n", self.address(a)),
        )
    }

    /// Restores every link.
    pub fn heal_all(&self) -> anyhow::Result<()> {
        for i in 0..self.hosts.len() {
            self.nft(i, "flush set inet ramster cut\n")?;
        }
        Ok(())
    }

    fn in_switch(&self, argv: &[&str]) -> anyhow::Result<()> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.switch])
            .args(argv))
    }

    fn in_host(&self, i: usize, argv: &[&str]) -> anyhow::Result<()> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.hosts[i]])
            .args(argv))
    }

    /// Runs an nft script in host `i`.
    fn nft(&self, i: usize, script: &str) -> anyhow::Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.hosts[i], "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning nft")?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft in {}: {script}: {}",
                self.hosts[i],
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace takes its veth ends (and so the links) with it.
        for ns in self.hosts.iter().chain([&self.switch]) {
            let _ = Command::new("ip")
                .args(["netns", "delete", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The calling thread's place in the switch namespace; dropping it puts the
/// thread back where it was.
pub struct Entered {
    original: File,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let _ = setns(&self.original);
    }
}

fn setns(ns: &File) -> anyhow::Result<()> {
    // SAFETY: the descriptor is a network namespace file that stays open
    // for the call; setns changes only the calling thread.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
