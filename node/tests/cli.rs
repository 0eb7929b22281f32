//! The `ramster` binary as operators run it: `node --print-config` names
//! where each setting came from (default, file, environment, flag), and
//! the environment takes the same words as the flags. Nothing is started:
//! `--print-config` exits before the node would.

use std::process::{Command, Output};

fn ramster(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ramster"));
    cmd.args(args);
    // Only what the test sets: a RAMSTER_* variable of the caller's would
    // change the sources seen.
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("RAMSTER_") {
            cmd.env_remove(var);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("running ramster")
}

/// The line for `key`: its setting and its source.
fn line<'a>(text: &'a str, key: &str) -> (&'a str, &'a str) {
    let l = text
        .lines()
        .find(|l| {
            let l = l.trim_start_matches("# ");
            l.starts_with(&format!("{key} =")) || l.starts_with(&format!("{key}:"))
        })
        .unwrap_or_else(|| panic!("no line for {key} in\n{text}"));
    let (setting, source) = l.rsplit_once("  # ").expect("a source");
    (setting.trim_end(), source)
}

#[test]
fn print_config_names_default_file_environment_and_flag() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node.toml");
    std::fs::write(
        &cfg,
        "name = \"from-file\"\ncapacity = \"64MiB\"\nzone = \"file-zone\"\nreplicas = 1\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let out = ramster(
        &[
            "node",
            "--print-config",
            "--config",
            cfg.to_str().unwrap(),
            "--zone",
            "flag-zone",
            "--admin-listen",
            "localhost:7999",
            "--mlock",
        ],
        &[
            ("RAMSTER_DATA_DIR", data.to_str().unwrap()),
            ("RAMSTER_NAME", "from-env"),
            ("RAMSTER_JOIN", "127.0.0.1:7800"),
            ("RAMSTER_GSO", "no"),
            ("RAMSTER_INSECURE", "on"),
        ],
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = data.to_str().unwrap();
    assert_eq!(
        line(&text, "name"),
        ("name = \"from-env\"", "env RAMSTER_NAME")
    );
    assert_eq!(
        line(&text, "data-dir"),
        (
            format!("data-dir = \"{data}\"").as_str(),
            "env RAMSTER_DATA_DIR"
        )
    );
    assert_eq!(line(&text, "capacity"), ("capacity = \"64MiB\"", "file"));
    assert_eq!(line(&text, "replicas"), ("replicas = 1", "file"));
    assert_eq!(line(&text, "zone"), ("zone = \"flag-zone\"", "flag --zone"));
    assert_eq!(line(&text, "mlock"), ("mlock = true", "flag --mlock"));
    assert_eq!(line(&text, "gso"), ("gso = false", "env RAMSTER_GSO"));
    assert_eq!(
        line(&text, "insecure"),
        ("insecure = true", "env RAMSTER_INSECURE")
    );
    assert_eq!(
        line(&text, "join"),
        ("join = [\"127.0.0.1:7800\"]", "env RAMSTER_JOIN")
    );
    assert_eq!(
        line(&text, "listen"),
        ("listen = \"0.0.0.0:7800\"", "default")
    );
    assert_eq!(
        line(&text, "admin-listen"),
        ("admin-listen = \"127.0.0.1:7999\"", "flag --admin-listen")
    );
    assert_eq!(
        line(&text, "certs-dir"),
        (format!("certs-dir = \"{data}/certs\"").as_str(), "default")
    );
    assert_eq!(line(&text, "audit-every"), ("audit-every = 60", "default"));
    assert!(
        !std::path::Path::new(data).exists(),
        "--print-config starts nothing, not even the data dir"
    );

    // A flag wins over the environment, and says so.
    let out = ramster(
        &["node", "--print-config", "--name", "from-flag"],
        &[
            ("RAMSTER_NAME", "from-env"),
            ("RAMSTER_DATA_DIR", data),
            ("RAMSTER_CAPACITY", "1GiB"),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(line(&text, "name"), ("name = \"from-flag\"", "flag --name"));
    assert_eq!(
        line(&text, "capacity"),
        ("capacity = \"1GiB\"", "env RAMSTER_CAPACITY")
    );
}

#[test]
fn a_boolean_the_parser_does_not_know_is_refused_naming_the_words() {
    let out = ramster(
        &[
            "node",
            "--print-config",
            "--name",
            "n",
            "--data-dir",
            "/nonexistent",
            "--capacity",
            "1GiB",
        ],
        &[("RAMSTER_MLOCK", "maybe")],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("maybe") && err.contains("yes/no"), "{err}");

    let out = ramster(
        &["node", "--print-config", "--admin-listen", "localhost"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HOST:PORT"), "{err}");
}

#[test]
fn help_groups_the_node_flags() {
    let out = ramster(&["node", "--help"], &[]);
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8(out.stdout).unwrap();
    let at = |h: &str| {
        help.find(&format!("\n{h}:\n"))
            .unwrap_or_else(|| panic!("no {h} heading in\n{help}"))
    };
    let headings = [
        "Node",
        "Store",
        "Front ends",
        "Cluster",
        "Watermarks",
        "Transport",
        "Admin",
    ];
    for pair in headings.windows(2) {
        assert!(at(pair[0]) < at(pair[1]), "{pair:?} out of order");
    }
    let admin = &help[at("Admin")..];
    assert!(admin.contains("--admin-listen"), "{admin}");
}
