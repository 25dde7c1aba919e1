//! Goal: `--sync` is parsed once, refused by name when wrong, and means the same clustered
//! as on one node — a clustered node's Raft log (the copy a message's acceptance waits
//! for) is opened with the policy given, not a replacement.
//!
//! Method: the real binary with a bad `--sync` and with a YAML `--config` holding an
//! unknown key must exit non-zero naming the value / the key and the file; then clustered
//! nodes are started in-process (no members yet, so nothing is elected or replicated) with
//! each policy, and the Raft log's opened policy is read back.

use std::process::Command;
use std::time::Duration;

use entrepot::config::BrokerConfig;
use entrepot::raft::{ClusterConfig, ClusterNode, STORE_SYNC_INTERVAL};
use entrepot_storage::SyncPolicy;
use tokio::sync::watch;

/// Runs `entrepot serve` with `args`; it must fail before serving. Returns its stderr.
fn serve_refused(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_entrepot"))
        .arg("serve")
        .args(args)
        .env_remove("ENTREPOT_SYNC")
        .env_remove("ENTREPOT_CONFIG")
        .output()
        .expect("run entrepot");
    assert!(!out.status.success(), "entrepot serve {args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_bad_sync_flag_or_an_unknown_config_key_stops_serve_naming_it() {
    let err = serve_refused(&["--sync", "sometimes"]);
    assert!(err.contains("\"sometimes\""), "{err}");
    let err = serve_refused(&["--sync", "interval:0"]);
    assert!(err.contains("\"interval:0\""), "{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("entrepot.yaml");
    std::fs::write(&file, "sync: always\nmax-conections: 5\n").expect("write config");
    let err = serve_refused(&["--config", file.to_str().expect("utf-8 path")]);
    assert!(err.contains("unknown field `max-conections`"), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_syncs_its_raft_log_as_sync_says() {
    for sync in [
        SyncPolicy::Always,
        SyncPolicy::Interval(Duration::from_millis(7)),
        SyncPolicy::Never,
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = BrokerConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            http: "127.0.0.1:0".parse().expect("addr"),
            data_dir: dir.path().to_path_buf(),
            sync,
            ..BrokerConfig::default()
        };
        let cluster = ClusterConfig {
            node_id: 1,
            peers: Vec::new(),
            listen: "127.0.0.1:0".parse().expect("addr"),
            snapshot_every: entrepot::raft::SNAPSHOT_EVERY_ENTRIES,
            secret: None,
            tls: None,
            auto_join: None,
            metadata_level_max: entrepot::raft::meta_machine::METADATA_LEVEL_MAX,
        };
        let (stop, shutdown) = watch::channel(false);
        let node = ClusterNode::start(config, cluster, shutdown)
            .await
            .expect("cluster node");
        assert_eq!(
            node.raft_log_sync(),
            sync,
            "Raft log opened with --sync {sync}"
        );
        stop.send(true).expect("shutdown");
        node.stopped().await.expect("stopped");
    }
    // The store is not what acceptance waits for: paced in the background, unless `never`.
    let paced = SyncPolicy::Interval(STORE_SYNC_INTERVAL);
    assert_eq!(entrepot::raft::store_sync(SyncPolicy::Always), paced);
    assert_eq!(
        entrepot::raft::store_sync(SyncPolicy::Interval(Duration::from_secs(1))),
        paced
    );
    assert_eq!(
        entrepot::raft::store_sync(SyncPolicy::Never),
        SyncPolicy::Never
    );
}
