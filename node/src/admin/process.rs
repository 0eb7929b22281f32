//! The process's own figures under the names every Prometheus client uses
//! (`process_*`): resident and virtual memory, CPU time, threads, open and
//! allowed file descriptors, start time. Read from `/proc/self` at each
//! scrape; where `/proc` is not there, nothing is written.

use super::exposition::{Family, MetricsWriter};

static RESIDENT: Family = Family::gauge(
    "process_resident_memory_bytes",
    "Resident memory size in bytes.",
);
static VIRTUAL: Family = Family::gauge(
    "process_virtual_memory_bytes",
    "Virtual memory size in bytes.",
);
static CPU: Family = Family::counter(
    "process_cpu_seconds_total",
    "User and system CPU time spent, in whole seconds.",
);
static THREADS: Family = Family::gauge("process_threads", "Threads of the process.");
static OPEN_FDS: Family = Family::gauge("process_open_fds", "Open file descriptors.");
static MAX_FDS: Family = Family::gauge(
    "process_max_fds",
    "The soft limit on open file descriptors.",
);
static START_TIME: Family = Family::gauge(
    "process_start_time_seconds",
    "Start time of the process since the Unix epoch, in seconds.",
);

#[cfg(test)]
pub(super) static FAMILIES: &[&Family] = &[
    &RESIDENT,
    &VIRTUAL,
    &CPU,
    &THREADS,
    &OPEN_FDS,
    &MAX_FDS,
    &START_TIME,
];

/// What `/proc/self/stat` says, in its own units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// User plus system time, in clock ticks.
    pub cpu_ticks: u64,
    pub threads: u64,
    /// Clock ticks after boot.
    pub start_ticks: u64,
    pub virtual_bytes: u64,
    pub resident_pages: u64,
}

/// Parses `/proc/PID/stat`. The command name (field 2) is in parentheses
/// and may hold spaces and parentheses itself, so the fields are counted
/// from the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // Fields from 3 (state) on; `field(n)` is field n of proc(5).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(Stat {
        cpu_ticks: field(14)? + field(15)?,
        threads: field(20)?,
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
        resident_pages: field(24)?,
    })
}

/// The boot time (`btime`) from `/proc/stat`, in seconds since the epoch.
pub fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf reads a configuration value and has no preconditions.
    let v = unsafe { libc::sysconf(name) };
    u64::try_from(v).ok().filter(|&v| v > 0)
}

fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then_some(limit.rlim_cur)
}

/// Writes the process's families, as far as `/proc` tells them.
pub fn write(out: &mut MetricsWriter) {
    let Some(stat) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|t| parse_stat(&t))
    else {
        return;
    };
    let ticks = sysconf(libc::_SC_CLK_TCK).unwrap_or(100);
    let page = sysconf(libc::_SC_PAGESIZE).unwrap_or(4096);
    out.sample(&RESIDENT, &[], stat.resident_pages * page);
    out.sample(&VIRTUAL, &[], stat.virtual_bytes);
    out.sample(&CPU, &[], stat.cpu_ticks / ticks);
    out.sample(&THREADS, &[], stat.threads);
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        // The directory's own descriptor is among the entries.
        out.sample(&OPEN_FDS, &[], fds.count().saturating_sub(1));
    }
    if let Some(max) = max_fds() {
        out.sample(&MAX_FDS, &[], max);
    }
    if let Some(boot) = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| parse_boot_time(&t))
    {
        let started = boot as f64 + stat.start_ticks as f64 / ticks as f64;
        out.sample(&START_TIME, &[], started);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let line = "4242 (ram ster) (x)) S 1 4242 4242 0 -1 4194560 1200 0 0 0 \
                    350 150 0 0 20 0 17 0 123456 987654321 2048 18446744073709551615 \
                    1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                cpu_ticks: 500,
                threads: 17,
                start_ticks: 123_456,
                virtual_bytes: 987_654_321,
                resident_pages: 2048,
            })
        );
        assert_eq!(parse_stat("4242 (cut short) S 1 2"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    #[test]
    fn boot_time_is_read_from_its_line() {
        let text = "cpu  1 2 3\nintr 5\nbtime 1765000000\nprocesses 9\n";
        assert_eq!(parse_boot_time(text), Some(1_765_000_000));
        assert_eq!(parse_boot_time("cpu 1\n"), None);
    }

    #[test]
    fn this_process_reports_itself() {
        let mut out = MetricsWriter::new();
        write(&mut out);
        let text = out.finish();
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} in {text}"))
                .parse()
                .unwrap()
        };
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_threads") >= 1.0);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = value("process_start_time_seconds");
        assert!(started <= now + 1.0 && started > now - 86_400.0 * 365.0);
    }
}
