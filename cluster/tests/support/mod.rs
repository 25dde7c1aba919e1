//! The safety oracle shared by the cluster tests: after a failover, every surviving node
//! has applied the log and holds exactly the acknowledged messages — none lost, none
//! invented.

use std::collections::BTreeSet;
use std::fmt::Display;
use std::time::Duration;

use bytes::Bytes;
use entrepot_cluster::{NodeId, StateMachineStore, TypeConfig};
use openraft::Raft;

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
