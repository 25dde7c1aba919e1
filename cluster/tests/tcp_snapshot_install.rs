//! Goal: a node that joins after the leader purged its log catches up from a snapshot
//! shipped over the inter-node TCP port, in many chunks, and then holds every message.
//! Method: a 1-node cluster on `127.0.0.1:0` that snapshots every 10 entries and keeps no
//! log behind a snapshot; after 40 batches a second node is started and added as a
//! learner (blocking until caught up). A small `snapshot_max_chunk_size` forces the
//! transfer through several `install_snapshot` RPCs. Every wait is bounded.

// openraft's error types are large; these signatures are openraft's, not ours.
#![allow(clippy::result_large_err)]

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use entrepot_cluster::{LogStore, NodeId, PeerServer, Request, TcpNetwork, TypeConfig};
use entrepot_storage::LogConfig;
use openraft::{BasicNode, Config, Raft, SnapshotPolicy};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(10);

struct Node {
    raft: Raft<TypeConfig>,
    sm: support::MessageMachine,
    server: PeerServer,
    _dir: tempfile::TempDir,
}

async fn start_node(id: NodeId, config: Arc<Config>) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let log_config = LogConfig {
        segment_bytes: 64 << 10,
        record_bytes_max: 16 << 10,
        ..LogConfig::default()
    };
    let log = LogStore::open(dir.path(), log_config).unwrap();
    let sm = support::MessageMachine::default();
    let raft = Raft::new(id, config, TcpNetwork::new(id), log, sm.clone())
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = PeerServer::start(listener, raft.clone()).unwrap();
    Node {
        raft,
        sm,
        server,
        _dir: dir,
    }
}

async fn scenario() {
    let config = Config {
        heartbeat_interval: 50,
        election_timeout_min: 300,
        election_timeout_max: 600,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(10),
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 1,
        snapshot_max_chunk_size: 256,
        ..Config::default()
    };
    let config = Arc::new(config.validate().unwrap());
    let first = start_node(0, Arc::clone(&config)).await;
    let addr0 = first.server.local_addr().to_string();
    let members: BTreeMap<NodeId, BasicNode> = [(0, BasicNode::new(&addr0))].into();
    first.raft.initialize(members).await.unwrap();
    first
        .raft
        .wait(Some(WAIT))
        .current_leader(0, "node 0 leads")
        .await
        .unwrap();

    let mut acked = Vec::new();
    for b in 0..40 {
        let messages: Vec<Bytes> = (0..4)
            .map(|m| Bytes::from(format!("batch {b} message {m}")))
            .collect();
        let request = Request::Produce {
            address: "orders".into(),
            messages: messages.clone(),
        };
        first.raft.client_write(request).await.unwrap();
        acked.extend(messages);
    }
    let purged = first
        .raft
        .wait(Some(WAIT))
        .metrics(|m| m.purged.is_some_and(|p| p.index >= 30), "log purged")
        .await
        .unwrap_or_else(|e| panic!("leader did not purge its log: {e} ({addr0})"))
        .purged;

    let second = start_node(1, Arc::clone(&config)).await;
    let addr1 = second.server.local_addr().to_string();
    tokio::time::timeout(
        WAIT,
        first.raft.add_learner(1, BasicNode::new(&addr1), true),
    )
    .await
    .unwrap_or_else(|_| panic!("learner not caught up within {WAIT:?} ({addr0}, {addr1})"))
    .unwrap();

    let last = first.raft.metrics().borrow().last_log_index;
    second
        .raft
        .wait(Some(WAIT))
        .applied_index_at_least(last, "learner applied")
        .await
        .unwrap_or_else(|e| panic!("learner did not apply {last:?}: {e} ({addr0}, {addr1})"));
    let m = second.raft.metrics().borrow().clone();
    assert!(
        m.snapshot
            .is_some_and(|s| Some(s.index) >= purged.map(|p| p.index)),
        "the learner caught up from a snapshot: {:?}, leader purged {purged:?}",
        m.snapshot
    );
    let stored = second.sm.messages("orders");
    assert_eq!(stored, acked, "the learner holds every message in order");

    for node in [first, second] {
        node.server.shutdown().await;
        node.raft.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_catches_up_from_a_chunked_snapshot_over_tcp() {
    let bound = Duration::from_secs(30);
    if tokio::time::timeout(bound, scenario()).await.is_err() {
        panic!("scenario did not finish within {bound:?}");
    }
}
