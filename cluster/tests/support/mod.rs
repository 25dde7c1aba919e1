//! What the cluster tests share: a node's Raft log in a temporary directory with a minimal
//! state machine ([`machine`]), and the safety oracle — after a failover, every surviving node has applied the log and holds exactly
//! the acknowledged messages, none lost, none invented.

// Each test file uses the part it needs.
#![allow(dead_code)]

pub mod host;
pub mod machine;
pub mod router;

use std::collections::BTreeSet;
use std::fmt::Display;
use std::time::Duration;

use bytes::Bytes;
use entrepot_cluster::{LogStore, NodeId, TypeConfig};
use entrepot_storage::LogConfig;
use openraft::Raft;

pub use machine::MessageMachine;

/// Runs a test scenario, failing it when it takes longer than `limit` (every wait in the
/// cluster tests is bounded).
pub async fn bounded<F: std::future::Future>(limit: Duration, scenario: F) -> F::Output {
    tokio::time::timeout(limit, scenario)
        .await
        .unwrap_or_else(|_| panic!("scenario did not finish within {limit:?}"))
}

/// One listener per node `0..nodes` on loopback, and each one's address.
pub async fn bind_nodes(
    nodes: NodeId,
) -> (
    std::collections::BTreeMap<NodeId, tokio::net::TcpListener>,
    std::collections::BTreeMap<NodeId, String>,
) {
    let mut listeners = std::collections::BTreeMap::new();
    for id in 0..nodes {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listeners.insert(id, listener);
    }
    let addrs = listeners
        .iter()
        .map(|(id, l)| (*id, l.local_addr().unwrap().to_string()))
        .collect();
    (listeners, addrs)
}

/// A node's Raft log in a fresh temporary directory (kept alive by the returned guard),
/// with small segments, and a test state machine.
pub fn open_stores() -> (LogStore, MessageMachine, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let log_config = LogConfig {
        segment_bytes: 1 << 20,
        record_bytes_max: 512 << 10,
        ..LogConfig::default()
    };
    let log = LogStore::open(dir.path(), log_config).unwrap();
    (log, MessageMachine::default(), dir)
}

/// Waits until `raft` applied `last`, then checks its state machine against `acked`
/// (messages of address `orders`). `ctx` is printed on failure (seed, ports).
pub async fn assert_holds_exactly(
    id: NodeId,
    raft: &Raft<TypeConfig>,
    sm: &MessageMachine,
    last: Option<u64>,
    acked: &[Bytes],
    wait: Duration,
    ctx: &dyn Display,
) {
    raft.wait(Some(wait))
        .applied_index_at_least(last, "all applied")
        .await
        .unwrap_or_else(|e| panic!("node {id} did not apply up to {last:?}: {e}; {ctx}"));
    let stored: BTreeSet<Bytes> = sm.messages("orders").into_iter().collect();
    let missing: Vec<_> = acked.iter().filter(|m| !stored.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "node {id} lost {} acknowledged messages, first {:?}; {ctx}",
        missing.len(),
        missing.first()
    );
    assert_eq!(
        stored.len(),
        acked.len(),
        "node {id} holds exactly the acknowledged messages; {ctx}"
    );
}
