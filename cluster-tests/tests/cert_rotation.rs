//! Certificates rotate without an outage: every node's certificate is
//! renewed (`ramster cert create-node --renew`) while a client stores and
//! loads, each node is sent SIGHUP, and each then reports the new expiry
//! (`ramster_tls_cert_expiry_seconds`) without a single new peer
//! connection; every page still loads, a renewal under another CA is
//! refused with the current certificate kept, and a node restarted on
//! its renewed certificate rejoins.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ramster_client::BlockingClient;
use ramster_cluster_tests::{
    Member, MemberSpec, TestCluster, ramster_bin, store_pages, verify_pages, wait_for,
};
use ramster_node::cli::corpus::Pages;

const AREA: u32 = 1;
const FORM_TIMEOUT: Duration = Duration::from_secs(30);
const DAY: f64 = 86_400.0;

fn certs_dir(m: &Member) -> PathBuf {
    let at = m.args.iter().position(|a| a == "--certs-dir").unwrap();
    PathBuf::from(&m.args[at + 1])
}

fn expiry_days(m: &Member) -> f64 {
    m.metric("ramster_tls_cert_expiry_seconds")
        .expect("the expiry metric")
        / DAY
}

fn connections(m: &Member) -> usize {
    m.log().matches("peer connected").count()
}

fn cert(args: &[&str]) {
    let out = Command::new(ramster_bin())
        .arg("cert")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ramster cert {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_certificate_is_renewed_under_traffic_without_a_reconnect() {
    let member = |name, capacity, extra| MemberSpec {
        name,
        capacity,
        extra,
    };
    let mut cluster = TestCluster::start(&[
        member("owner", "32MiB", &["--replicas", "2"]),
        member("d1", "128MiB", &[]),
        member("d2", "128MiB", &[]),
    ])
    .unwrap();
    cluster.wait_up("owner", 3, FORM_TIMEOUT).unwrap();
    let owner = cluster.member("owner");
    let client = BlockingClient::connect(&owner.socket()).unwrap();
    let pages = Arc::new(Pages::synthetic(32_768, 47));
    let accepted = Arc::new(store_pages(&client, AREA, &pages));
    owner.wait_for_copies(&client, 2, 0, FORM_TIMEOUT);
    for m in &cluster.members {
        let days = expiry_days(m);
        assert!(days > 800.0, "{}: {days} days", m.name);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let loaded = Arc::new(AtomicU64::new(0));
    let loader = {
        let (socket, pages, accepted) = (owner.socket(), pages.clone(), accepted.clone());
        let (stop, loaded) = (stop.clone(), loaded.clone());
        std::thread::spawn(move || {
            let client = BlockingClient::connect(&socket).unwrap();
            let mut next = 0usize;
            // Bounded by the test: it sets `stop` once every node renewed.
            while !stop.load(Ordering::Relaxed) {
                let chunk: Vec<u64> = (0..64)
                    .map(|i| accepted[(next + i * 509) % accepted.len()])
                    .collect();
                next += 1;
                verify_pages(&client, AREA, &pages, &chunk);
                loaded.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        })
    };

    let before: Vec<usize> = cluster.members.iter().map(connections).collect();
    for m in &cluster.members {
        let dir = certs_dir(m);
        let ca = dir.parent().unwrap().to_str().unwrap().to_string();
        cert(&[
            "create-node",
            &m.name,
            "--certs-dir",
            &ca,
            "--renew",
            "--days",
            "30",
        ]);
        m.signal("-HUP");
        wait_for(FORM_TIMEOUT, || (expiry_days(m) < 31.0).then_some(())).unwrap_or_else(|e| {
            panic!(
                "{} kept its old certificate ({e}): {}",
                m.name,
                m.log_tail(20)
            )
        });
        assert!(
            m.log().contains("certificate renewed"),
            "{}",
            m.log_tail(20)
        );
    }
    // Loads went on through the renewals; no session was dropped for them.
    let at_renewal = loaded.load(Ordering::Relaxed);
    wait_for(FORM_TIMEOUT, || {
        (loaded.load(Ordering::Relaxed) > at_renewal + 1_000).then_some(())
    })
    .expect("loads go on after every renewal");
    stop.store(true, Ordering::Relaxed);
    loader
        .join()
        .expect("every load during the renewals was right");
    let after: Vec<usize> = cluster.members.iter().map(connections).collect();
    assert_eq!(before, after, "renewals made peers connect again");

    // A renewal under another CA is refused; the node keeps presenting the
    // certificate it has.
    let d2 = cluster.member("d2");
    let foreign = tempfile::tempdir().unwrap();
    let foreign_ca = foreign.path().to_str().unwrap();
    cert(&["create-ca", "--certs-dir", foreign_ca]);
    cert(&["create-node", "d2", "--certs-dir", foreign_ca]);
    let d2_dir = certs_dir(d2);
    for f in ["ca.crt", "node.crt", "node.key"] {
        std::fs::copy(foreign.path().join("d2").join(f), d2_dir.join(f)).unwrap();
    }
    d2.signal("-HUP");
    wait_for(FORM_TIMEOUT, || {
        d2.log()
            .contains("the certificate there was not taken")
            .then_some(())
    })
    .unwrap_or_else(|e| {
        panic!(
            "d2 took another CA's certificate ({e}): {}",
            d2.log_tail(20)
        )
    });
    assert!(expiry_days(d2) < 31.0);

    // d1 restarted: it dials and is dialled with its renewed certificate.
    let d1 = cluster.member_mut("d1");
    d1.kill();
    d1.start().unwrap();
    cluster.wait_up("owner", 3, FORM_TIMEOUT).unwrap();
    assert!(expiry_days(cluster.member("d1")) < 31.0);
    verify_pages(&client, AREA, &pages, &accepted);
}
