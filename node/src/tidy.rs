//! Tidy: rules of the source that the compiler does not check.
//!
//! The sans-IO cores (the owner core in `cluster/owner/`, the donor store
//! in `cluster/donor.rs` and `cluster/donor/`) are given events and the
//! time, and hand back what to do; the node drives them over sockets and
//! a clock, the simulator over a simulated network and clock. A runtime, a
//! clock read or a socket inside one would make the simulator run other
//! code than the node, so none may be named there, not even in a comment
//! or a test: a test of a core that needs an instant to count from takes
//! [`crate::cluster::test_epoch`].

use std::path::{Path, PathBuf};

/// The sans-IO cores, as paths in the crate: a folder, or one file.
const SANS_IO: &[&str] = &[
    "src/cluster/owner",
    "src/cluster/donor",
    "src/cluster/donor.rs",
];

/// What a sans-IO core must not name: the async runtime, the clocks, the
/// network and the QUIC transport.
const IO_NAMES: &[&str] = &["tokio", "Instant::now", "SystemTime", "std::net", "quinn"];

/// Every line of the `.rs` files under `paths` (relative to `root`) that
/// names one of `IO_NAMES`, as `file:line: name: text`.
fn io_named(root: &Path, paths: &[&str]) -> Vec<String> {
    let mut files = Vec::new();
    for p in paths {
        let path = root.join(p);
        assert!(
            path.exists(),
            "{} is gone: tidy guards nothing there",
            path.display()
        );
        rust_files(&path, &mut files);
    }
    files.sort();
    let mut found = Vec::new();
    for file in files {
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let shown = file.strip_prefix(root).unwrap_or(&file);
        for (n, line) in text.lines().enumerate() {
            for name in IO_NAMES.iter().filter(|name| line.contains(**name)) {
                found.push(format!(
                    "{}:{}: {name}: {}",
                    shown.display(),
                    n + 1,
                    line.trim()
                ));
            }
        }
    }
    found
}

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let entries = std::fs::read_dir(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for entry in entries {
            rust_files(&entry.expect("a directory entry").path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_path_buf());
    }
}

#[test]
fn sans_io_cores_name_no_runtime_clock_or_socket() {
    let found = io_named(Path::new(env!("CARGO_MANIFEST_DIR")), SANS_IO);
    assert!(
        found.is_empty(),
        "the sans-IO cores must take events and `now` as arguments, not reach for a runtime, a clock or a socket:\n{}",
        found.join("\n")
    );
}

#[test]
fn tidy_names_the_file_and_line_of_what_it_refuses() {
    let root = tempfile::tempdir().expect("a temporary folder");
    let core = root.path().join("core");
    std::fs::create_dir_all(core.join("deeper")).expect("folders");
    std::fs::write(
        core.join("clean.rs"),
        "pub fn f(now: u64) -> u64 {\n    now\n}\n",
    )
    .expect("write");
    std::fs::write(
        core.join("deeper/dirty.rs"),
        "// hands back commands\nuse std::net::UdpSocket;\nfn f() { let _ = std::time::Instant::now(); }\n",
    )
    .expect("write");
    std::fs::write(core.join("notes.txt"), "tokio\n").expect("write");
    let found = io_named(root.path(), &["core"]);
    assert_eq!(
        found,
        vec![
            "core/deeper/dirty.rs:2: std::net: use std::net::UdpSocket;".to_string(),
            "core/deeper/dirty.rs:3: Instant::now: fn f() { let _ = std::time::Instant::now(); }"
                .to_string(),
        ]
    );
}
