//! Goal: three nodes talking over the real inter-node TCP port elect a leader, replicate
//! produce batches, survive losing the leader (its Raft and its port both gone), elect a
//! new one, keep committing, and every survivor holds every acknowledged message.
//! Method: one process, three `Raft`s on `LogStore` in temporary directories (with the
//! tests' minimal state machine, `support/machine.rs`), each served by a `PeerServer` on `127.0.0.1:0`; the bound addresses go into
//! the initial membership, so `TcpNetwork` dials what the membership says. Every wait is
//! bounded and the whole test is under a 30 s timeout; failures print the seed and ports
//! (set `ENTREPOT_TEST_SEED` to replay the batch sizes).

// openraft's error types are large; these signatures are openraft's, not ours.
#![allow(clippy::result_large_err)]

mod support;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use entrepot_cluster::{NodeId, PeerServer, Request, Response, TcpNetwork, TypeConfig};
use openraft::{BasicNode, Config, Raft};
use tokio::net::TcpListener;

const TEST_TIMEOUT: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a failure message needs to be replayed and diagnosed.
#[derive(Clone)]
struct Ctx {
    seed: u64,
    addrs: BTreeMap<NodeId, String>,
}

impl fmt::Display for Ctx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} (ENTREPOT_TEST_SEED), nodes {:?}",
            self.seed, self.addrs
        )
    }
}

struct Node {
    raft: Raft<TypeConfig>,
    sm: support::MessageMachine,
    server: PeerServer,
    _dir: tempfile::TempDir,
}

async fn start_node(id: NodeId, listener: TcpListener, config: Arc<Config>) -> Node {
    let (log, sm, dir) = support::open_stores();
    let raft = Raft::new(id, config, TcpNetwork::new(id), log, sm.clone())
        .await
        .unwrap();
    let server = PeerServer::start(listener, raft.clone()).unwrap();
    Node {
        raft,
        sm,
        server,
        _dir: dir,
    }
}

async fn wait_for_leader(nodes: &BTreeMap<NodeId, Node>, not: Option<NodeId>, ctx: &Ctx) -> NodeId {
    let (_, any) = nodes.iter().next().unwrap();
    let metrics = any
        .raft
        .wait(Some(WAIT))
        .metrics(
            |m| m.current_leader.is_some() && m.current_leader != not,
            "a leader",
        )
        .await
        .unwrap_or_else(|e| panic!("no leader other than {not:?} within {WAIT:?}: {e}; {ctx}"));
    metrics.current_leader.unwrap()
}

/// A tiny deterministic generator, so the seed replays the same batch sizes.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Produces `batches` batches through `leader`; returns the acknowledged bodies.
async fn produce(
    leader: &Raft<TypeConfig>,
    first_batch: u32,
    batches: u32,
    rng: &mut u64,
    ctx: &Ctx,
) -> Vec<Bytes> {
    let mut acked = Vec::new();
    for b in first_batch..first_batch + batches {
        let count = 1 + (next(rng) % 32) as usize;
        let messages: Vec<Bytes> = (0..count)
            .map(|m| Bytes::from(format!("batch {b} message {m}")))
            .collect();
        let request = Request::Produce {
            address: "orders".into(),
            messages: messages.clone(),
        };
        let reply = tokio::time::timeout(WRITE_TIMEOUT, leader.client_write(request))
            .await
            .unwrap_or_else(|_| panic!("batch {b} not committed within {WRITE_TIMEOUT:?}; {ctx}"))
            .unwrap_or_else(|e| panic!("batch {b} failed: {e}; {ctx}"));
        assert!(
            matches!(reply.data, Response::Produced { count: c, .. } if c as usize == count),
            "batch {b}: {:?}; {ctx}",
            reply.data
        );
        acked.extend(messages);
    }
    acked
}

async fn scenario(seed: u64, report: Arc<Mutex<String>>) {
    let config = Config {
        heartbeat_interval: 50,
        election_timeout_min: 300,
        election_timeout_max: 600,
        ..Config::default()
    };
    let config = Arc::new(config.validate().unwrap());
    let mut listeners = BTreeMap::new();
    for id in 0..3 {
        listeners.insert(id, TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let ctx = Ctx {
        seed,
        addrs: listeners
            .iter()
            .map(|(id, l)| (*id, l.local_addr().unwrap().to_string()))
            .collect(),
    };
    *report.lock().unwrap() = ctx.to_string();
    let mut nodes = BTreeMap::new();
    for (id, listener) in listeners {
        nodes.insert(id, start_node(id, listener, Arc::clone(&config)).await);
    }
    for (id, node) in &nodes {
        assert_eq!(node.server.local_addr().to_string(), ctx.addrs[id], "{ctx}");
    }
    let members: BTreeMap<NodeId, BasicNode> = ctx
        .addrs
        .iter()
        .map(|(id, addr)| (*id, BasicNode::new(addr)))
        .collect();
    nodes[&0].raft.initialize(members).await.unwrap();

    let mut rng = seed | 1;
    let leader = wait_for_leader(&nodes, None, &ctx).await;
    let mut acked = produce(&nodes[&leader].raft, 0, 20, &mut rng, &ctx).await;

    // Kill the leader: its port closes, then its Raft stops.
    let dead = nodes.remove(&leader).unwrap();
    dead.server.shutdown().await;
    dead.raft.shutdown().await.unwrap();
    drop(dead.sm);

    let new_leader = wait_for_leader(&nodes, Some(leader), &ctx).await;
    assert_ne!(new_leader, leader, "{ctx}");
    acked.extend(produce(&nodes[&new_leader].raft, 20, 20, &mut rng, &ctx).await);

    let last = nodes[&new_leader].raft.metrics().borrow().last_log_index;
    for (id, node) in &nodes {
        support::assert_holds_exactly(*id, &node.raft, &node.sm, last, &acked, WAIT, &ctx).await;
    }
    for (_, node) in nodes {
        node.server.shutdown().await;
        node.raft.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_cluster_elects_a_new_leader_and_loses_no_acknowledged_message() {
    let seed = std::env::var("ENTREPOT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            now.as_nanos() as u64
        });
    let report = Arc::new(Mutex::new(format!("seed {seed} (ENTREPOT_TEST_SEED)")));
    if tokio::time::timeout(TEST_TIMEOUT, scenario(seed, Arc::clone(&report)))
        .await
        .is_err()
    {
        let ctx = report.lock().unwrap().clone();
        panic!("scenario did not finish within {TEST_TIMEOUT:?}; {ctx}");
    }
}
