//! `ramster cert` as an operator runs it: a CA, node certificates from it,
//! the files where the docs say, and certificates that peers will accept.

use std::process::Command;

use ramster_cluster_tests::ramster_bin;
use ramster_node::cluster::tls::{self, NodeIdentity};

fn ramster(args: &[&str]) -> std::process::Output {
    Command::new(ramster_bin())
        .args(args)
        .output()
        .expect("running ramster")
}

#[test]
fn create_ca_then_create_node_writes_certificates_peers_accept() {
    tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let certs_arg = certs.to_str().unwrap();

    let out = ramster(&["cert", "create-ca", "--certs-dir", certs_arg]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(certs.join("ca.crt").is_file());
    assert!(certs.join("ca.key").is_file());

    let out = ramster(&[
        "cert",
        "create-node",
        "node-1",
        "--certs-dir",
        certs_arg,
        "--host",
        "127.0.0.1",
        "--host",
        "node-1.peers.local",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node_dir = certs.join("node-1");
    for f in ["ca.crt", "node.crt", "node.key"] {
        assert!(node_dir.join(f).is_file(), "{f} missing");
    }
    // The node never gets the CA key.
    assert!(!node_dir.join("ca.key").exists());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(node_dir.join("node.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "node.key is readable by others: {mode:o}");
    }

    let id = NodeIdentity::load(&node_dir).unwrap();
    id.check("node-1").unwrap();
    assert!(tls::cert_names_node(&id.chain[0], "node-1.peers.local"));
    assert!(!tls::cert_names_node(&id.chain[0], "node-2"));

    // Running create-ca again must not replace the CA under existing nodes.
    let out = ramster(&["cert", "create-ca", "--certs-dir", certs_arg]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists already"));
    // Bad names are refused with a reason.
    let out = ramster(&["cert", "create-node", "bad name", "--certs-dir", certs_arg]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid node name"));
}

#[test]
fn create_cluster_keeps_the_ca_apart_and_is_safe_to_run_again() {
    tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let (ca, certs) = (dir.path().join("ca"), dir.path().join("certs"));
    let (ca_arg, certs_arg) = (ca.to_str().unwrap(), certs.to_str().unwrap());
    let create = |names: &[&str]| {
        let mut args = vec![
            "cert",
            "create-cluster",
            "--ca-dir",
            ca_arg,
            "--certs-dir",
            certs_arg,
        ];
        args.extend_from_slice(names);
        ramster(&args)
    };

    let out = create(&["node1", "node2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ca.join("ca.key").is_file());
    let first_key = std::fs::read(certs.join("node1/node.key")).unwrap();
    for n in ["node1", "node2"] {
        let d = certs.join(n);
        assert!(!d.join("ca.key").exists(), "the CA key stays in the CA dir");
        NodeIdentity::load(&d).unwrap().check(n).unwrap();
    }

    // Again, with one more node: the CA and existing nodes are kept.
    let out = create(&["node1", "node2", "node3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("kept") && text.contains("issued"), "{text}");
    assert_eq!(
        std::fs::read(certs.join("node1/node.key")).unwrap(),
        first_key
    );
    NodeIdentity::load(&certs.join("node3"))
        .unwrap()
        .check("node3")
        .unwrap();

    // A node directory from another CA is an error, not overwritten.
    std::fs::remove_dir_all(&ca).unwrap();
    let out = create(&["node1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not the CA"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
