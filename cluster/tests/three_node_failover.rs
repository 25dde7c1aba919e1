//! Goal: a 3-node cluster on our log storage elects a leader, replicates produce batches,
//! survives losing its leader, and loses no committed (acknowledged) message.
//! Method: three openraft nodes in one process, each with its own `LogStore` in a
//! temporary directory and the tests' minimal state machine (`support/machine.rs`), joined by the in-memory router of `support/router.rs`, which calls
//! the target node's `Raft` directly. The leader is "killed" by removing it from the router
//! and shutting it down; waits are bounded by timeouts, never asserted on wall-clock time.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use entrepot_cluster::{NodeId, Request, Response, TypeConfig};
use openraft::{BasicNode, Config, Raft};
use support::router::Router;

struct Node {
    raft: Raft<TypeConfig>,
    sm: support::MessageMachine,
    _dir: tempfile::TempDir,
}

async fn start_node(id: NodeId, router: &Router, config: Arc<Config>) -> Node {
    let (log, sm, dir) = support::open_stores();
    let raft = Raft::new(id, config, router.clone(), log, sm.clone())
        .await
        .unwrap();
    router.add(id, raft.clone());
    Node {
        raft,
        sm,
        _dir: dir,
    }
}

async fn wait_for_leader(nodes: &BTreeMap<NodeId, Node>, not: Option<NodeId>) -> NodeId {
    let (_, any) = nodes.iter().next().unwrap();
    let metrics = any
        .raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| m.current_leader.is_some() && m.current_leader != not,
            "a leader",
        )
        .await
        .unwrap();
    metrics.current_leader.unwrap()
}

/// Produces `batches` batches of 16 messages through `leader`; returns the acknowledged bodies.
async fn produce(leader: &Raft<TypeConfig>, first_batch: u32, batches: u32) -> Vec<Bytes> {
    let mut acked = Vec::new();
    for b in first_batch..first_batch + batches {
        let messages: Vec<Bytes> = (0..16)
            .map(|m| Bytes::from(format!("batch {b} message {m}")))
            .collect();
        let request = Request::Produce {
            address: "orders".into(),
            messages: messages.clone(),
        };
        let reply = leader.client_write(request).await.unwrap();
        assert!(matches!(reply.data, Response::Produced { count: 16, .. }));
        acked.extend(messages);
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_takes_over_and_no_acknowledged_message_is_lost() {
    let config = Config {
        heartbeat_interval: 50,
        election_timeout_min: 300,
        election_timeout_max: 600,
        ..Config::default()
    };
    let config = Arc::new(config.validate().unwrap());
    let router = Router::default();
    let mut nodes = BTreeMap::new();
    for id in 0..3 {
        nodes.insert(id, start_node(id, &router, Arc::clone(&config)).await);
    }
    let members: BTreeMap<NodeId, BasicNode> = (0..3)
        .map(|id| (id, BasicNode::new(format!("127.0.0.1:{}", 5680 + id))))
        .collect();
    nodes[&0].raft.initialize(members).await.unwrap();

    let leader = wait_for_leader(&nodes, None).await;
    let mut acked = produce(&nodes[&leader].raft, 0, 20).await;

    // Kill the leader: unreachable at once, then stopped.
    router.remove(leader);
    let dead = nodes.remove(&leader).unwrap();
    dead.raft.shutdown().await.unwrap();

    let new_leader = wait_for_leader(&nodes, Some(leader)).await;
    assert_ne!(new_leader, leader);
    acked.extend(produce(&nodes[&new_leader].raft, 20, 20).await);

    let last = nodes[&new_leader].raft.metrics().borrow().last_log_index;
    for (id, node) in &nodes {
        support::assert_holds_exactly(
            *id,
            &node.raft,
            &node.sm,
            last,
            &acked,
            Duration::from_secs(10),
            &"in-memory cluster",
        )
        .await;
    }
    for node in nodes.values() {
        node.raft.shutdown().await.unwrap();
    }
}
