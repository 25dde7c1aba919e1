//! Goal: idle Raft groups hibernate over the real inter-node port (issue 12 step 5) —
//! every instance stops and no RPC of any group flows while they sleep; a write on the
//! former leader wakes the group and commits; a hibernated group whose leader node dies
//! elects a leader on the survivors within the election timeout + 1 s (woken by the
//! per-peer liveness heartbeat) and commits; a follower that does not hold exactly what a
//! hibernate request names refuses with a typed reason, and a group the peer does not host
//! is refused as such; concurrent wakes of one group start one instance.
//!
//! Method: three nodes in this process, each a `PeerServer` on `127.0.0.1:0` over a
//! `GroupRegistry`, one `NodeLog` per node (so a stopped group's state is in the node's
//! log and a wake reads it back), the tests' state machine kept per (node, group) across
//! restarts, and a `Hibernation` per node with short timings. Every wait is bounded; each
//! test runs under `TEST_TIMEOUT`.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use entrepot_cluster::{
    ClusterError, GroupRegistry, HibernateRefusal, HibernateRequest, Hibernation,
    HibernationConfig, HostState, NodeId, NodeLog, PeerCallError, PeerServer, PeerServerOptions,
    RemoteRefusal, Request, Stopped, TcpNetwork, TypeConfig,
};
use entrepot_storage::LogConfig;
use openraft::{BasicNode, Config, Raft};
use support::MessageMachine;

const NODES: u64 = 3;
const TEST_TIMEOUT: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(20);
/// Raft timing of these tests (debug build, two busy cores, a few groups).
const HEARTBEAT_MS: u64 = 50;
const ELECTION_MS: (u64, u64) = (300, 600);
/// A group idle this long hibernates.
const QUIESCE_AFTER: Duration = Duration::from_millis(400);

fn raft_config() -> Arc<Config> {
    let config = Config {
        heartbeat_interval: HEARTBEAT_MS,
        election_timeout_min: ELECTION_MS.0,
        election_timeout_max: ELECTION_MS.1,
        ..Config::default()
    };
    Arc::new(config.validate().unwrap())
}

fn hibernation_config() -> HibernationConfig {
    HibernationConfig {
        quiesce_after: QUIESCE_AFTER,
        check_interval: Duration::from_millis(100),
        liveness_interval: Duration::from_millis(100),
        // The (shortest) election timeout.
        liveness_timeout: Duration::from_millis(ELECTION_MS.0),
    }
}

type Machines = Arc<Mutex<HashMap<u64, MessageMachine>>>;

struct Node {
    network: TcpNetwork,
    server: PeerServer,
    groups: GroupRegistry,
    hibernation: Option<Hibernation>,
    machines: Machines,
    _dir: tempfile::TempDir,
}

struct Cluster {
    nodes: BTreeMap<NodeId, Node>,
    addrs: BTreeMap<NodeId, String>,
}

impl std::fmt::Display for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nodes {:?}", self.addrs)?;
        for (id, n) in &self.nodes {
            write!(
                f,
                "; node {id}: {} running of {}, {} wakes, {} stops",
                n.groups.running_count(),
                n.groups.len(),
                n.groups.wakes(),
                n.groups.stops()
            )?;
        }
        Ok(())
    }
}

/// Three nodes hosting `groups`, each started through the registry's starter (a stopped
/// entry, then a wake), group `g` initialized by node `lead(g)`; with hibernation when
/// `hibernate`. Returns once every group committed one batch.
async fn start_cluster(groups: &[u64], lead: impl Fn(u64) -> NodeId, hibernate: bool) -> Cluster {
    let (listeners, addrs) = support::bind_nodes(NODES).await;
    let config = raft_config();
    let mut nodes = BTreeMap::new();
    for (id, listener) in listeners {
        let dir = tempfile::tempdir().unwrap();
        let log_config = LogConfig {
            segment_bytes: 1 << 20,
            record_bytes_max: 512 << 10,
            ..LogConfig::default()
        };
        let node_log = NodeLog::open(dir.path(), log_config).unwrap();
        let network = TcpNetwork::new(id);
        let registry = GroupRegistry::new();
        let machines: Machines = Arc::default();
        registry.set_starter({
            let (network, config, machines) =
                (network.clone(), Arc::clone(&config), Arc::clone(&machines));
            move |g: u64| {
                let (network, config, node_log) =
                    (network.group(g), Arc::clone(&config), node_log.clone());
                let sm = machines.lock().unwrap().entry(g).or_default().clone();
                async move {
                    let log = node_log.group(g)?;
                    Raft::new(id, config, network, log, sm).await.map_err(|e| {
                        ClusterError::GroupStart {
                            group: g,
                            reason: e.to_string(),
                        }
                    })
                }
            }
        });
        for &g in groups {
            let never = Stopped {
                leader: None,
                term: 0,
                last_log_id: None,
            };
            registry.insert_stopped(g, never).unwrap();
            registry.wake(g).await.unwrap();
        }
        let server =
            PeerServer::serve(listener, registry.clone(), PeerServerOptions::default()).unwrap();
        let node = Node {
            network,
            server,
            groups: registry,
            hibernation: None,
            machines,
            _dir: dir,
        };
        nodes.insert(id, node);
    }
    let members: BTreeMap<NodeId, BasicNode> = addrs
        .iter()
        .map(|(id, addr)| (*id, BasicNode::new(addr)))
        .collect();
    for &g in groups {
        let raft = nodes[&lead(g)].groups.raft(g).unwrap();
        raft.initialize(members.clone()).await.unwrap();
    }
    let mut cluster = Cluster { nodes, addrs };
    for &g in groups {
        let leader = lead(g);
        let raft = cluster.nodes[&leader].groups.raft(g).unwrap();
        raft.wait(Some(WAIT))
            .current_leader(leader, "elected")
            .await
            .unwrap_or_else(|e| panic!("group {g}: node {leader} not leader: {e}"));
        raft.client_write(produce(g, 0)).await.unwrap();
    }
    if hibernate {
        for (id, node) in cluster.nodes.iter_mut() {
            node.hibernation = Some(Hibernation::start(
                *id,
                node.groups.clone(),
                node.network.clone(),
                cluster.addrs.clone(),
                hibernation_config(),
            ));
        }
    }
    cluster
}

fn produce(g: u64, b: u64) -> Request {
    Request::Produce {
        address: "orders".into(),
        messages: vec![Bytes::from(format!("group {g} batch {b}"))],
    }
}

impl Cluster {
    /// Waits until no node runs an instance of any group.
    async fn all_stopped(&self) {
        let began = Instant::now();
        while self.nodes.values().any(|n| n.groups.running_count() > 0) {
            assert!(
                began.elapsed() < WAIT,
                "groups did not hibernate within {WAIT:?}; {self}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A group counts as stopped as soon as its entry says so, before its instance's
        // shutdown finished: let a heartbeat sent meanwhile arrive.
        tokio::time::sleep(Duration::from_millis(HEARTBEAT_MS * 4)).await;
    }

    fn group_rpcs(&self) -> Vec<u64> {
        self.nodes
            .values()
            .map(|n| n.groups.group_rpcs_received())
            .collect()
    }

    /// Every replica of `g` on `on` applied up to the index `leader`'s replica holds and
    /// has message `b` of the group.
    async fn assert_has(&self, g: u64, b: u64, leader: NodeId, on: &[NodeId]) {
        let last = self.nodes[&leader]
            .groups
            .raft(g)
            .unwrap()
            .metrics()
            .borrow()
            .last_log_index;
        let message = Bytes::from(format!("group {g} batch {b}"));
        for id in on {
            let node = &self.nodes[id];
            let began = Instant::now();
            loop {
                let applied = match node.groups.raft(g) {
                    Some(raft) => raft.metrics().borrow().last_applied.map(|l| l.index),
                    None => None,
                };
                let sm = node.machines.lock().unwrap().get(&g).cloned();
                let has = sm.is_some_and(|sm| sm.messages("orders").contains(&message));
                if applied >= last && has {
                    break;
                }
                assert!(
                    began.elapsed() < WAIT,
                    "group {g} node {id}: applied {applied:?} of {last:?}, has batch {b}: {has}; {self}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    async fn shutdown(self) {
        for (_, node) in self.nodes {
            if let Some(h) = node.hibernation {
                h.shutdown().await;
            }
            node.server.shutdown().await;
            for (_, raft) in node.groups.running() {
                let _ = raft.shutdown().await;
            }
        }
    }
}

async fn bounded(scenario: impl std::future::Future<Output = ()>) {
    support::bounded(TEST_TIMEOUT, scenario).await
}

/// Goal: idle groups stop every instance on every node and then exchange no RPC at all
/// (liveness pings are per peer, not per group, and are not counted); a write on the
/// former leader wakes the group, commits, and reaches every replica (the followers woken
/// by its replication); the group then hibernates again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_hibernate_without_traffic_and_a_write_wakes_and_commits() {
    bounded(async {
        let groups = [1, 2, 3, 4, 5, 6];
        let cluster = start_cluster(&groups, |g| g % NODES, true).await;
        cluster.all_stopped().await;
        for (id, node) in &cluster.nodes {
            for g in groups {
                let state = node.groups.state(g);
                let led = g % NODES;
                assert!(
                    matches!(state, Some(HostState::Stopped(st)) if st.leader == Some(led)),
                    "node {id} group {g}: {state:?}; {cluster}"
                );
            }
        }
        let before = cluster.group_rpcs();
        tokio::time::sleep(QUIESCE_AFTER * 3).await;
        let after = cluster.group_rpcs();
        assert_eq!(
            before, after,
            "RPCs of hibernated groups received per node; {cluster}"
        );
        assert!(cluster
            .nodes
            .values()
            .all(|n| n.groups.running_count() == 0));

        // A write on the former leader wakes the group and commits on every replica.
        let g = 4;
        let leader = g % NODES;
        let began = Instant::now();
        let hibernation = cluster.nodes[&leader].hibernation.as_ref().unwrap();
        hibernation.propose(g, produce(g, 1)).await.unwrap();
        let waited = began.elapsed();
        let all: Vec<NodeId> = (0..NODES).collect();
        cluster.assert_has(g, 1, leader, &all).await;
        // Only that group woke.
        for (id, node) in &cluster.nodes {
            assert_eq!(node.groups.running_count(), 1, "node {id}; {cluster}");
        }
        println!("write to a hibernated group committed after {waited:?}");
        cluster.all_stopped().await;
        cluster.shutdown().await;
    })
    .await;
}

/// Goal: a hibernated group whose leader node dies (its server and tasks dropped) is
/// woken on the survivors by the per-peer liveness heartbeat, elects a leader among them
/// within the election timeout + 1 s, and commits a write; groups led elsewhere stay
/// stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hibernated_group_whose_leader_dies_elects_on_the_survivors_and_commits() {
    bounded(async {
        // Groups 1..=3 led by node 0 (the one that dies), 4 led by node 1.
        let groups = [1, 2, 3, 4];
        let lead = |g: u64| if g <= 3 { 0 } else { 1 };
        let mut cluster = start_cluster(&groups, lead, true).await;
        cluster.all_stopped().await;

        let dead = cluster.nodes.remove(&0).unwrap();
        let killed = Instant::now();
        if let Some(h) = dead.hibernation {
            h.shutdown().await;
        }
        dead.server.shutdown().await;
        drop(dead.groups);

        let bound = Duration::from_millis(ELECTION_MS.1) + Duration::from_secs(1);
        for g in [1, 2, 3] {
            let new_leader = loop {
                let leader = cluster.nodes.iter().find_map(|(id, n)| {
                    let raft = n.groups.raft(g)?;
                    let m = raft.metrics().borrow().clone();
                    (m.current_leader == Some(*id)).then_some(*id)
                });
                if let Some(l) = leader {
                    break l;
                }
                assert!(
                    killed.elapsed() < WAIT,
                    "group {g}: no leader on the survivors; {cluster}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            let elected = killed.elapsed();
            assert!(
                elected <= bound,
                "group {g}: leader {new_leader} after {elected:?}, more than {bound:?}; {cluster}"
            );
            println!("group {g}: node {new_leader} leads {elected:?} after its leader died");
            let hibernation = cluster.nodes[&new_leader].hibernation.as_ref().unwrap();
            hibernation.propose(g, produce(g, 1)).await.unwrap();
            cluster.assert_has(g, 1, new_leader, &[1, 2]).await;
        }
        for (id, node) in &cluster.nodes {
            assert!(
                matches!(node.groups.state(4), Some(HostState::Stopped(_))),
                "node {id}: group 4, led by a live node, stays stopped; {cluster}"
            );
        }
        cluster.shutdown().await;
    })
    .await;
}

/// Goal: hibernate requests a follower must refuse are refused with a typed reason and
/// leave its instance running — a term that is not its own, a requester that is not its
/// leader, a last log id it does not hold (a follower behind the leader's claim) — and a
/// group it does not host is refused as `UnknownGroup`; the exact request stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_refuses_hibernate_requests_it_does_not_match_exactly() {
    bounded(async {
        let g = 1;
        let cluster = start_cluster(&[g], |_| 0, false).await;
        let leader = cluster.nodes[&0].groups.raft(g).unwrap();
        // The leader's metrics once they show its last entry applied.
        let m = leader
            .wait(Some(WAIT))
            .metrics(
                |m| {
                    m.last_log_index.is_some()
                        && m.last_applied.map(|l| l.index) == m.last_log_index
                },
                "the last entry applied",
            )
            .await
            .unwrap();
        let (term, last) = (m.current_term, m.last_applied.unwrap());
        let follower = 1;
        cluster.nodes[&follower]
            .groups
            .raft(g)
            .unwrap()
            .wait(Some(WAIT))
            .metrics(
                |m| m.last_applied == Some(last),
                "the leader's last entry applied",
            )
            .await
            .unwrap();
        let network = cluster.nodes[&0].network.group(g);
        let addr = &cluster.addrs[&follower];
        let ask = |r: HibernateRequest| {
            let network = network.clone();
            async move {
                network
                    .hibernate(follower, addr, &r, WAIT)
                    .await
                    .unwrap_or_else(|e| panic!("no answer to {r:?}: {e}"))
            }
        };
        let exact = HibernateRequest {
            term,
            leader: 0,
            last_log_id: Some(last),
        };
        let ahead = openraft::LogId::new(last.leader_id, last.index + 1);
        let cases = [
            (
                HibernateRequest {
                    term: term + 1,
                    ..exact
                },
                HibernateRefusal::WrongTerm {
                    asked: term + 1,
                    ours: term,
                },
            ),
            (
                HibernateRequest { leader: 2, ..exact },
                HibernateRefusal::NotLeader {
                    asked: 2,
                    known: Some(0),
                },
            ),
            (
                HibernateRequest {
                    last_log_id: Some(ahead),
                    ..exact
                },
                HibernateRefusal::LogMismatch {
                    asked: Some(ahead),
                    last_index: Some(last.index),
                    applied: Some(last),
                },
            ),
        ];
        for (request, expected) in cases {
            assert_eq!(ask(request).await, Err(expected), "{request:?}; {cluster}");
            let state = cluster.nodes[&follower].groups.state(g);
            assert_eq!(state, Some(HostState::Running), "{request:?}; {cluster}");
        }
        // A group the follower does not host.
        let stranger = cluster.nodes[&0].network.group(999);
        let err = stranger.hibernate(follower, addr, &exact, WAIT).await;
        assert!(
            matches!(
                err,
                Err(PeerCallError::Refused(RemoteRefusal::UnknownGroup(999)))
            ),
            "{err:?}; {cluster}"
        );
        // The leader itself refuses: it follows nobody.
        let to_leader = network.hibernate(0, &cluster.addrs[&0], &exact, WAIT).await;
        assert!(
            matches!(to_leader, Ok(Err(HibernateRefusal::NotLeader { .. }))),
            "{to_leader:?}"
        );
        // The exact request stops the follower; once stopped, a wrong term is still refused.
        assert_eq!(ask(exact).await, Ok(()), "{cluster}");
        let stopped = cluster.nodes[&follower].groups.state(g);
        assert!(
            matches!(stopped, Some(HostState::Stopped(_))),
            "{stopped:?}"
        );
        let wrong = HibernateRequest {
            term: term + 7,
            ..exact
        };
        assert!(matches!(
            ask(wrong).await,
            Err(HibernateRefusal::WrongTerm { .. })
        ));
        // The leader's next write wakes it (its append carries an entry).
        leader.client_write(produce(g, 1)).await.unwrap();
        cluster.assert_has(g, 1, 0, &[follower]).await;
        cluster.shutdown().await;
    })
    .await;
}

/// Goal: a group whose follower is behind (its node unreachable) is never put to sleep:
/// the leader's instance keeps running past several quiesce periods and nothing stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_with_a_follower_behind_stays_awake() {
    bounded(async {
        let g = 1;
        let mut cluster = start_cluster(&[g], |_| 0, true).await;
        let cut = cluster.nodes.remove(&2).unwrap();
        if let Some(h) = cut.hibernation {
            h.shutdown().await;
        }
        cut.server.shutdown().await;
        let leader = cluster.nodes[&0].groups.raft(g).unwrap();
        leader.client_write(produce(g, 1)).await.unwrap();
        tokio::time::sleep(QUIESCE_AFTER * 4).await;
        for (id, node) in &cluster.nodes {
            assert_eq!(
                node.groups.state(g),
                Some(HostState::Running),
                "node {id}; {cluster}"
            );
            assert_eq!(node.groups.stops(), 0, "node {id}; {cluster}");
        }
        cluster.shutdown().await;
    })
    .await;
}

/// Goal: a group whose instance is held for a write (`begin_write`, what
/// `Hibernation::propose` takes) is not put to sleep however long it is idle; released,
/// it hibernates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_held_for_a_write_is_not_stopped_under_it() {
    bounded(async {
        let g = 1;
        let cluster = start_cluster(&[g], |_| 0, true).await;
        let (_raft, hold) = cluster.nodes[&0].groups.begin_write(g).unwrap();
        tokio::time::sleep(QUIESCE_AFTER * 4).await;
        assert_eq!(
            cluster.nodes[&0].groups.state(g),
            Some(HostState::Running),
            "{cluster}"
        );
        drop(hold);
        cluster.all_stopped().await;
        cluster.shutdown().await;
    })
    .await;
}

/// Goal: concurrent wakes of one stopped group start exactly one instance, all callers
/// get it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_wakes_of_one_group_start_one_instance() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let node_log = NodeLog::open(dir.path(), LogConfig::default()).unwrap();
        let registry = GroupRegistry::new();
        let starts = Arc::new(AtomicU64::new(0));
        registry.set_starter({
            let starts = Arc::clone(&starts);
            move |g: u64| {
                let node_log = node_log.clone();
                starts.fetch_add(1, Ordering::SeqCst);
                async move {
                    // Slow enough for every caller to arrive meanwhile.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let config = Arc::new(Config::default().validate().unwrap());
                    let network = TcpNetwork::new(1).group(g);
                    let sm = MessageMachine::default();
                    Raft::<TypeConfig>::new(1, config, network, node_log.group(g)?, sm)
                        .await
                        .map_err(|e| ClusterError::GroupStart {
                            group: g,
                            reason: e.to_string(),
                        })
                }
            }
        });
        let stopped = Stopped {
            leader: Some(2),
            term: 1,
            last_log_id: None,
        };
        registry.insert_stopped(7, stopped).unwrap();
        let mut wakes = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let registry = registry.clone();
            wakes.spawn(async move { registry.wake(7).await.map(|r| r.metrics().borrow().id) });
        }
        while let Some(r) = wakes.join_next().await {
            assert_eq!(r.unwrap().unwrap(), 1);
        }
        assert_eq!(starts.load(Ordering::SeqCst), 1, "one instance started");
        assert_eq!(registry.wakes(), 1);
        assert_eq!(registry.state(7), Some(HostState::Running));
        let unknown = registry.wake(8).await.err();
        assert!(
            matches!(unknown, Some(ClusterError::UnknownGroup { group: 8 })),
            "{unknown:?}"
        );
        registry.remove(7).unwrap().shutdown().await.unwrap();
    })
    .await;
}
