//! Several discovery instances in one process on 127.0.0.1, port 0.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::*;

const CLUSTER: &str = "test-cluster";
/// Generous bound for three nodes on a loaded 2-core machine; typically ~1 s.
const CONVERGE: Duration = Duration::from_secs(20);

fn config(dir: &Path, cluster: &str, node_id: u64, join: Vec<String>) -> DiscoveryConfig {
    DiscoveryConfig {
        data_dir: dir.to_path_buf(),
        cluster: cluster.to_owned(),
        listen: "/ip4/127.0.0.1/tcp/0".to_owned(),
        join,
        record: NodeRecord {
            node_id,
            grpc: SocketAddr::from(([127, 0, 0, 1], 7000 + node_id as u16)),
            http: Some(SocketAddr::from(([127, 0, 0, 1], 8000 + node_id as u16))),
            peer_id: String::new(),
            p2p: Vec::new(),
        },
    }
}

/// `rec.p2p[0]` without its `/p2p/<id>` suffix.
fn without_peer_id(rec: &NodeRecord) -> String {
    let full = &rec.p2p[0];
    let cut = full.find("/p2p/").unwrap();
    full[..cut].to_owned()
}

fn ids(records: &[NodeRecord]) -> Vec<u64> {
    records.iter().map(|r| r.node_id).collect()
}

/// Polls `status()` until `pred` holds or `within` passes.
async fn wait_status(
    d: &Discovery,
    within: Duration,
    pred: impl Fn(&DiscoveryStatus) -> bool,
) -> DiscoveryStatus {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let s = d.status().await.unwrap();
        if pred(&s) || tokio::time::Instant::now() >= deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_find_each_other_and_other_clusters_stay_out() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, rec_a) = Discovery::start(config(dirs[0].path(), CLUSTER, 1, vec![]))
        .await
        .unwrap();
    assert!(!rec_a.peer_id.is_empty());
    assert_eq!(rec_a.p2p.len(), 1);
    assert!(rec_a.p2p[0].starts_with("/ip4/127.0.0.1/tcp/"));
    assert!(rec_a.p2p[0].ends_with(&format!("/p2p/{}", rec_a.peer_id)));
    assert_eq!(a.local_record(), rec_a);

    // B joins with the peer id, C without it.
    let (b, rec_b) = Discovery::start(config(
        dirs[1].path(),
        CLUSTER,
        2,
        vec![rec_a.p2p[0].clone()],
    ))
    .await
    .unwrap();
    let (c, rec_c) = Discovery::start(config(
        dirs[2].path(),
        CLUSTER,
        3,
        vec![without_peer_id(&rec_a)],
    ))
    .await
    .unwrap();

    let want = vec![rec_a.clone(), rec_b.clone(), rec_c.clone()];
    for (name, d) in [("a", &a), ("b", &b), ("c", &c)] {
        let got = d.wait_for_members(3, CONVERGE).await.unwrap();
        assert_eq!(got, want, "node {name} sees {:?}", ids(&got));
        assert_eq!(d.members().await.unwrap(), want);
    }

    // A node of another cluster joining A is turned away on both sides.
    let (d, rec_d) = Discovery::start(config(
        dirs[3].path(),
        "other-cluster",
        4,
        vec![without_peer_id(&rec_a)],
    ))
    .await
    .unwrap();
    let sd = wait_status(&d, CONVERGE, |s| s.foreign_peers.contains(&rec_a.peer_id)).await;
    assert!(
        sd.foreign_peers.contains(&rec_a.peer_id),
        "D never saw A: {sd:?}"
    );
    let sa = wait_status(&a, CONVERGE, |s| s.foreign_peers.contains(&rec_d.peer_id)).await;
    assert!(
        sa.foreign_peers.contains(&rec_d.peer_id),
        "A never saw D: {sa:?}"
    );
    assert!(!sa.cluster_peers.contains(&rec_d.peer_id));
    assert!(!sd.cluster_peers.contains(&rec_a.peer_id));
    // Searching again on both sides must not bring them together.
    a.refresh().await.unwrap();
    d.refresh().await.unwrap();
    let seen_by_d = d.wait_for_members(2, Duration::from_secs(2)).await.unwrap();
    assert_eq!(seen_by_d, vec![rec_d.clone()]);
    let seen_by_a = a.members().await.unwrap();
    assert_eq!(seen_by_a, want);
    assert!(!seen_by_a.iter().any(|r| r.peer_id == rec_d.peer_id));

    for x in [&a, &b, &c, &d] {
        x.shutdown().await;
    }
    assert!(matches!(a.members().await, Err(DiscoveryError::Stopped)));
    assert!(matches!(a.refresh().await, Err(DiscoveryError::Stopped)));
    // Shutting down twice is harmless.
    a.shutdown().await;
}

#[tokio::test]
async fn restart_keeps_the_peer_id() {
    let dir = tempfile::tempdir().unwrap();
    let (d1, rec1) = Discovery::start(config(dir.path(), CLUSTER, 1, vec![]))
        .await
        .unwrap();
    d1.shutdown().await;
    assert!(dir.path().join("p2p_key").is_file());
    let (d2, rec2) = Discovery::start(config(dir.path(), CLUSTER, 1, vec![]))
        .await
        .unwrap();
    assert_eq!(rec1.peer_id, rec2.peer_id);
    d2.shutdown().await;

    let other = tempfile::tempdir().unwrap();
    let (d3, rec3) = Discovery::start(config(other.path(), CLUSTER, 1, vec![]))
        .await
        .unwrap();
    assert_ne!(rec1.peer_id, rec3.peer_id);
    d3.shutdown().await;
}

#[tokio::test]
async fn restarted_member_is_found_again_with_its_new_address() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, rec_a) = Discovery::start(config(da.path(), CLUSTER, 1, vec![]))
        .await
        .unwrap();
    let join = vec![rec_a.p2p[0].clone()];
    let (b, rec_b) = Discovery::start(config(db.path(), CLUSTER, 2, join.clone()))
        .await
        .unwrap();
    let got = a.wait_for_members(2, CONVERGE).await.unwrap();
    assert_eq!(got, vec![rec_a.clone(), rec_b.clone()]);
    b.shutdown().await;

    // Same data dir, new gRPC port: A must end up with the new record, not the old one.
    let mut cfg = config(db.path(), CLUSTER, 2, join);
    cfg.record.grpc = SocketAddr::from(([127, 0, 0, 1], 9002));
    let (b2, rec_b2) = Discovery::start(cfg).await.unwrap();
    assert_eq!(rec_b2.peer_id, rec_b.peer_id);
    let deadline = tokio::time::Instant::now() + CONVERGE;
    let seen = loop {
        let m = a.wait_for_members(2, Duration::from_secs(1)).await.unwrap();
        let b_seen = m.iter().find(|r| r.node_id == 2).cloned();
        if b_seen.as_ref() == Some(&rec_b2) || tokio::time::Instant::now() >= deadline {
            break b_seen;
        }
        a.refresh().await.unwrap();
    };
    assert_eq!(seen, Some(rec_b2));
    a.shutdown().await;
    b2.shutdown().await;
}

#[tokio::test]
async fn garbage_join_address_is_an_error_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let err = Discovery::start(config(
        dir.path(),
        CLUSTER,
        1,
        vec!["/ip4/127.0.0.1/tcp/1".into(), "not a multiaddr".into()],
    ))
    .await
    .unwrap_err();
    match &err {
        DiscoveryError::BadJoinAddress { addr, .. } => assert_eq!(addr, "not a multiaddr"),
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.to_string().contains("not a multiaddr"), "{err}");
}

#[tokio::test]
async fn unreachable_join_address_is_retried_until_it_answers() {
    // Reserve a port, free it, and join it before anything listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (b, rec_b) = Discovery::start(config(
        db.path(),
        CLUSTER,
        2,
        vec![format!("/ip4/127.0.0.1/tcp/{port}")],
    ))
    .await
    .unwrap();
    let mut cfg = config(da.path(), CLUSTER, 1, vec![]);
    cfg.listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let (a, rec_a) = Discovery::start(cfg).await.unwrap();
    let got = b.wait_for_members(2, CONVERGE).await.unwrap();
    assert_eq!(got, vec![rec_a, rec_b]);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn joining_itself_is_harmless() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(
        dir.path(),
        CLUSTER,
        1,
        vec![format!("/ip4/127.0.0.1/tcp/{port}")],
    );
    cfg.listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let (a, rec_a) = Discovery::start(cfg).await.unwrap();
    a.refresh().await.unwrap();
    let got = a
        .wait_for_members(2, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(got, vec![rec_a]);
    let s = a.status().await.unwrap();
    assert!(
        s.cluster_peers.is_empty() && s.foreign_peers.is_empty(),
        "{s:?}"
    );
    a.shutdown().await;
}

#[tokio::test]
async fn corrupt_key_file_is_a_clear_error_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("p2p_key");
    std::fs::write(&key, b"definitely not a protobuf keypair").unwrap();
    let err = Discovery::start(config(dir.path(), CLUSTER, 1, vec![]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DiscoveryError::CorruptKey { path, .. } if *path == key),
        "{err:?}"
    );
    assert!(err.to_string().contains("p2p_key"), "{err}");
    assert_eq!(
        std::fs::read(&key).unwrap(),
        b"definitely not a protobuf keypair"
    );
}

#[tokio::test]
async fn bad_cluster_names_and_listen_addresses_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["", "has space", "a/b", &"x".repeat(65)] {
        let err = Discovery::start(config(dir.path(), bad, 1, vec![]))
            .await
            .unwrap_err();
        assert!(
            matches!(err, DiscoveryError::InvalidCluster(_)),
            "{bad:?}: {err:?}"
        );
    }
    let mut cfg = config(dir.path(), CLUSTER, 1, vec![]);
    cfg.listen = "127.0.0.1:0".into();
    let err = Discovery::start(cfg).await.unwrap_err();
    assert!(
        matches!(err, DiscoveryError::BadListenAddress { .. }),
        "{err:?}"
    );
}
