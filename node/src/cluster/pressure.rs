//! How much memory this node may use, and how hard the kernel is squeezing
//! it: the cgroup limit (v2 `memory.max`, or v1 `memory.limit_in_bytes`
//! inside most containers), `MemAvailable`, and PSI
//! (`/proc/pressure/memory`).
//!
//! The parsers are pure functions over file contents, tested on fixtures;
//! [`read_host`] is the thin part that reads the files.

use std::path::{Path, PathBuf};

/// cgroup v1 reports "no limit" as a huge number near `i64::MAX` rounded
/// down to a page; anything above this is treated as unlimited.
const CGROUP_V1_UNLIMITED_BYTES: u64 = 1 << 60;

/// What the host says about memory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostMemory {
    /// The cgroup's limit, if one is set.
    pub cgroup_limit_bytes: Option<u64>,
    /// The cgroup's current usage, if known.
    pub cgroup_usage_bytes: Option<u64>,
    /// `MemAvailable` from /proc/meminfo.
    pub available_bytes: Option<u64>,
    /// PSI "some" average over 10 s, percent of time stalled.
    pub psi_some_avg10: Option<f64>,
}

impl HostMemory {
    /// The most memory this process can count on: the cgroup limit when set,
    /// else what the kernel reports available.
    pub fn usable_bytes(&self) -> Option<u64> {
        match (self.cgroup_limit_bytes, self.available_bytes) {
            (Some(limit), Some(avail)) => {
                Some(limit.min(avail + self.cgroup_usage_bytes.unwrap_or(0)))
            }
            (Some(limit), None) => Some(limit),
            (None, avail) => avail,
        }
    }
}

/// The cgroup v2 path of this process, from /proc/self/cgroup ("0::/path").
pub fn parse_cgroup_v2_path(proc_self_cgroup: &str) -> Option<String> {
    proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// The cgroup v1 memory controller path ("N:memory:/path").
pub fn parse_cgroup_v1_memory_path(proc_self_cgroup: &str) -> Option<String> {
    proc_self_cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then(|| path.to_string())
    })
}

/// cgroup v2 `memory.max`: a number of bytes or "max".
pub fn parse_memory_max(s: &str) -> Option<u64> {
    let s = s.trim();
    if s == "max" {
        return None;
    }
    s.parse().ok()
}

/// cgroup v1 `memory.limit_in_bytes`: a number, huge when unlimited.
pub fn parse_limit_in_bytes(s: &str) -> Option<u64> {
    s.trim()
        .parse()
        .ok()
        .filter(|&b| b < CGROUP_V1_UNLIMITED_BYTES)
}

/// `MemAvailable` from /proc/meminfo, in bytes.
pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemAvailable:")?;
        let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    })
}

/// The "some avg10" figure of /proc/pressure/memory.
pub fn parse_psi_some_avg10(psi: &str) -> Option<f64> {
    let line = psi.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix("avg10="))
        .and_then(|v| v.parse().ok())
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// Reads this host's figures (`root` is "/" except in tests).
pub fn read_host(root: &Path) -> HostMemory {
    let at = |p: &str| -> PathBuf { root.join(p.trim_start_matches('/')) };
    let cgroups = read(&at("/proc/self/cgroup")).unwrap_or_default();
    let mut limit = None;
    let mut usage = None;
    // v2 first (most hosts), then v1 (Docker on cgroup v1 hosts).
    if let Some(path) = parse_cgroup_v2_path(&cgroups) {
        let dir = at("/sys/fs/cgroup").join(path.trim_start_matches('/'));
        if let Some(max) = read(&dir.join("memory.max")) {
            limit = parse_memory_max(&max);
            usage = read(&dir.join("memory.current")).and_then(|s| s.trim().parse().ok());
        }
    }
    if limit.is_none() {
        // Inside a container the v1 hierarchy is usually mounted at the
        // cgroup's own root; outside it is under the path /proc names.
        let base = at("/sys/fs/cgroup/memory");
        let candidates = [
            Some(base.clone()),
            parse_cgroup_v1_memory_path(&cgroups).map(|p| base.join(p.trim_start_matches('/'))),
        ];
        for dir in candidates.into_iter().flatten() {
            if let Some(l) =
                read(&dir.join("memory.limit_in_bytes")).and_then(|s| parse_limit_in_bytes(&s))
            {
                limit = Some(l);
                usage =
                    read(&dir.join("memory.usage_in_bytes")).and_then(|s| s.trim().parse().ok());
                break;
            }
        }
    }
    HostMemory {
        cgroup_limit_bytes: limit,
        cgroup_usage_bytes: usage,
        available_bytes: read(&at("/proc/meminfo")).and_then(|s| parse_mem_available(&s)),
        psi_some_avg10: read(&at("/proc/pressure/memory")).and_then(|s| parse_psi_some_avg10(&s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cgroup_paths_of_both_versions() {
        let v1 = "9:name=systemd:/\n4:memory:/docker/abc\n0::/\n";
        assert_eq!(
            parse_cgroup_v1_memory_path(v1).as_deref(),
            Some("/docker/abc")
        );
        assert_eq!(
            parse_cgroup_v2_path("0::/system.slice/ramster.service\n").as_deref(),
            Some("/system.slice/ramster.service")
        );
        assert_eq!(parse_cgroup_v1_memory_path("0::/x\n"), None);
    }

    #[test]
    fn parses_limits_and_treats_huge_or_max_as_none() {
        assert_eq!(parse_memory_max("max\n"), None);
        assert_eq!(parse_memory_max("268435456\n"), Some(256 << 20));
        assert_eq!(parse_limit_in_bytes("9223372036854771712\n"), None);
        assert_eq!(parse_limit_in_bytes("536870912\n"), Some(512 << 20));
    }

    #[test]
    fn parses_meminfo_and_psi() {
        let meminfo =
            "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   22257752 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(22257752 * 1024));
        let psi = "some avg10=1.50 avg60=0.20 avg300=0.00 total=123\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_psi_some_avg10(psi), Some(1.5));
    }

    #[test]
    fn reads_a_v2_container_and_a_v1_container_from_files() {
        let root = tempfile::tempdir().unwrap();
        let w = |p: &str, s: &str| {
            let path = root.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, s).unwrap();
        };
        w("proc/self/cgroup", "0::/pod\n");
        w("sys/fs/cgroup/pod/memory.max", "1073741824\n");
        w("sys/fs/cgroup/pod/memory.current", "104857600\n");
        w("proc/meminfo", "MemAvailable: 4194304 kB\n");
        let h = read_host(root.path());
        assert_eq!(h.cgroup_limit_bytes, Some(1 << 30));
        assert_eq!(h.usable_bytes(), Some(1 << 30));

        let root = tempfile::tempdir().unwrap();
        let w = |p: &str, s: &str| {
            let path = root.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, s).unwrap();
        };
        w("proc/self/cgroup", "4:memory:/docker/abc\n0::/\n");
        w("sys/fs/cgroup/memory/memory.limit_in_bytes", "268435456\n");
        w("proc/meminfo", "MemAvailable: 65536 kB\n");
        let h = read_host(root.path());
        assert_eq!(h.cgroup_limit_bytes, Some(256 << 20));
        // Less is available than the limit allows: available wins.
        assert_eq!(h.usable_bytes(), Some(64 << 20));
    }

    #[test]
    fn this_host_reports_something_usable() {
        let h = read_host(Path::new("/"));
        assert!(h.usable_bytes().is_some_and(|b| b > 0), "{h:?}");
    }
}
