//! What the cluster tests share: a node's stores in a temporary directory, and the safety
//! oracle — after a failover, every surviving node has applied the log and holds exactly
//! the acknowledged messages, none lost, none invented.

// Each test file uses the part it needs.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fmt::Display;
use std::time::Duration;

use bytes::Bytes;
use entrepot_cluster::{LogStore, NodeId, StateMachineStore, TypeConfig};
use entrepot_storage::LogConfig;
use openraft::Raft;

/// A node's Raft log and stand-in state machine in a fresh temporary directory (kept
/// alive by the returned guard), with small segments.
pub fn open_stores() -> (LogStore, StateMachineStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let log_config = LogConfig {
        segment_bytes: 1 << 20,
        record_bytes_max: 512 << 10,
        ..LogConfig::default()
    };
    let log = LogStore::open(dir.path(), log_config).unwrap();
    let sm = StateMachineStore::open(dir.path().join("sm")).unwrap();
    (log, sm, dir)
}

/// Waits until `raft` applied `last`, then checks its state machine against `acked`
/// (messages of address `orders`). `ctx` is printed on failure (seed, ports).
pub async fn assert_holds_exactly(
    id: NodeId,
    raft: &Raft<TypeConfig>,
    sm: &StateMachineStore,
    last: Option<u64>,
    acked: &[Bytes],
    wait: Duration,
    ctx: &dyn Display,
) {
    raft.wait(Some(wait))
        .applied_index_at_least(last, "all applied")
        .await
        .unwrap_or_else(|e| panic!("node {id} did not apply up to {last:?}: {e}; {ctx}"));
    let stored: BTreeSet<Bytes> = sm
        .model()
        .unwrap()
        .messages("orders")
        .into_iter()
        .map(|(_, m)| m)
        .collect();
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
