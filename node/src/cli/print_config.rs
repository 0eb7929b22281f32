//! `ramster node --print-config`: the settings a node would run with, as
//! TOML its config file takes, each line saying where its value came from.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use clap::ArgMatches;
use clap::parser::ValueSource;

use super::node::{AUTO_MEMORY_FRACTION, NodeArgs, NodeSettings};

/// Where a setting's value came from, lowest precedence first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Built in, or worked out from other settings.
    Default,
    /// The `--config` file.
    File,
    /// The environment variable it names.
    Env(String),
    /// The flag it names.
    Flag(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File => f.write_str("file"),
            Source::Env(var) => write!(f, "env {var}"),
            Source::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// The settings the environment or the command line gave, by config key
/// (which is the flag's name).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CliSources(BTreeMap<String, Source>);

impl CliSources {
    /// Reads them off the `node` subcommand's matches: clap knows whether
    /// a value came from the command line or from the environment.
    pub fn of(m: &ArgMatches) -> CliSources {
        let cmd = <NodeArgs as clap::Args>::augment_args(clap::Command::new("node"));
        let mut given = BTreeMap::new();
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else {
                continue;
            };
            let source = match m.value_source(arg.get_id().as_str()) {
                Some(ValueSource::CommandLine) => Source::Flag(format!("--{long}")),
                Some(ValueSource::EnvVariable) => Source::Env(
                    arg.get_env()
                        .map(|v| v.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                ),
                _ => continue,
            };
            given.insert(long.to_string(), source);
        }
        CliSources(given)
    }
}

/// Where each merged setting came from.
#[derive(Clone, Debug)]
pub struct SettingSources {
    pub config: Option<PathBuf>,
    pub given: CliSources,
    /// The keys the config file sets.
    pub file_keys: BTreeSet<String>,
    /// Whether the capacity was sized from the cgroup limit.
    pub capacity_auto: bool,
}

impl SettingSources {
    /// The source of the setting `key` (a config key): the flag or the
    /// environment when either gave it, else the file, else the default.
    pub fn of(&self, key: &str) -> Source {
        if let Some(s) = self.given.0.get(key) {
            return s.clone();
        }
        if self.file_keys.contains(key) {
            return Source::File;
        }
        Source::Default
    }
}

/// One line: a key with a value in TOML, or a key the node runs without
/// (shown as a comment, so that the output still reads as a config file).
struct Line {
    key: &'static str,
    value: Result<String, String>,
    note: Option<String>,
}

fn set(key: &'static str, value: impl Into<toml::Value>) -> Line {
    Line {
        key,
        value: Ok(value.into().to_string()),
        note: None,
    }
}

fn unset(key: &'static str, why: impl Into<String>) -> Line {
    Line {
        key,
        value: Err(why.into()),
        note: None,
    }
}

fn path(p: &Path) -> toml::Value {
    toml::Value::String(p.display().to_string())
}

/// A size as the file takes it: in the largest binary unit that divides
/// it, else in bytes.
fn exact_size(bytes: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes > 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

fn size(bytes: u64) -> toml::Value {
    toml::Value::String(exact_size(bytes))
}

fn strings<T: ToString>(items: impl IntoIterator<Item = T>) -> toml::Value {
    toml::Value::Array(
        items
            .into_iter()
            .map(|i| toml::Value::String(i.to_string()))
            .collect(),
    )
}

fn pair((a, b): (f64, f64)) -> toml::Value {
    toml::Value::Array(vec![a.into(), b.into()])
}

/// The settings as `--print-config` shows them: `key = value  # source`,
/// aligned, one line per setting.
pub fn render(s: &NodeSettings, src: &SettingSources) -> String {
    let mut lines = vec![
        unset(
            "config",
            src.config
                .as_deref()
                .map_or("none".into(), |p| p.display().to_string()),
        ),
        set("name", s.name.as_str()),
        set("data-dir", path(&s.data_dir)),
        Line {
            note: src.capacity_auto.then(|| {
                format!(
                    "auto: {:.0}% of the cgroup memory limit, shared by role",
                    AUTO_MEMORY_FRACTION * 100.0
                )
            }),
            ..set("capacity", size(s.capacity))
        },
        set("api-socket", path(&s.api_socket)),
        match s.nbd_listen {
            Some(a) => set("nbd-listen", a.to_string()),
            None => unset("nbd-listen", "off, no export to serve"),
        },
        set(
            "nbd-export",
            strings(s.nbd_exports.iter().map(|e| {
                let mut spec = format!("{}:{}", e.name, exact_size(e.size_bytes));
                if let Some(b) = &e.backing {
                    spec.push_str(&format!(":{}", b.display()));
                }
                spec
            })),
        ),
        set("nbd-threads", s.nbd.threads as i64),
        set("nbd-poll-us", s.nbd.poll.as_micros() as i64),
        set("mlock", s.mlock),
    ];
    match &s.cluster {
        Some(c) => lines.extend([
            set("listen", c.listen.to_string()),
            set("advertise", c.advertise.as_str()),
            set("join", strings(&c.join)),
            set("certs-dir", path(&c.certs_dir)),
            set("insecure", c.insecure),
            set(
                "role",
                toml::Value::try_from(c.role).expect("a role is a word"),
            ),
            set("donate", size(c.donate)),
            match &c.zone {
                Some(z) => set("zone", z.as_str()),
                None => unset("zone", "none"),
            },
            set("replicas", c.replicas as i64),
            set("out-after", c.liveness.out_after.as_secs() as i64),
            set("audit-every", c.audit.pass_every.as_secs() as i64),
            set("stop-drain", c.stop_drain.as_secs() as i64),
            set(
                "remotify-watermarks",
                pair((c.watermarks.remotify_start, c.watermarks.remotify_stop)),
            ),
            set(
                "suction-watermarks",
                pair((c.watermarks.suction_start, c.watermarks.suction_stop)),
            ),
            set("max-udp-payload", i64::from(c.transport.mtu_upper_bound)),
            set("gso", c.transport.segmentation_offload),
            set("poll-us", c.transport.poll_window.as_micros() as i64),
        ]),
        None => {
            lines.push(unset(
                "listen",
                "none, not a cluster member (no --listen or --join)",
            ));
            for key in [
                "advertise",
                "join",
                "certs-dir",
                "insecure",
                "role",
                "donate",
                "zone",
                "replicas",
                "out-after",
                "audit-every",
                "stop-drain",
                "remotify-watermarks",
                "suction-watermarks",
                "max-udp-payload",
                "gso",
                "poll-us",
            ] {
                lines.push(unset(key, "unused, not a cluster member"));
            }
        }
    }
    lines.push(match s.admin_listen {
        Some(a) => set("admin-listen", a.to_string()),
        None => set("admin-listen", "off"),
    });

    let left: Vec<String> = lines
        .iter()
        .map(|l| match &l.value {
            Ok(v) => format!("{} = {v}", l.key),
            Err(why) => format!("# {}: {why}", l.key),
        })
        .collect();
    let width = left.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let mut out = String::from(
        "# The settings `ramster node` would run with; after each, where it came from\n\
         # (default, file, env VAR or flag --FLAG).\n",
    );
    for (line, text) in lines.iter().zip(left) {
        let mut source = src.of(line.key).to_string();
        if let Some(note) = &line.note {
            source.push_str(&format!("; {note}"));
        }
        out.push_str(&format!("{text:<width$}  # {source}\n"));
    }
    out
}
