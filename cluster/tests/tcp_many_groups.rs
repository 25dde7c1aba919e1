//! Goal: one node hosts many Raft groups over the real inter-node port — every group
//! elects and commits, all groups share exactly one connection per peer, a group the peer
//! does not host is refused as such, connections cut mid-traffic lose no acknowledged
//! message and everything recovers, and hostile frames cost only their own connection.
//! Method: three nodes in this process, each a `PeerServer` over a `GroupRegistry` on
//! `127.0.0.1:0` hosting `GROUPS` groups, each group's replica a `Raft` with its own
//! `LogStore` in a temporary directory and the tests' minimal state machine
//! (`support/machine.rs`), all groups of a node sending through one `TcpNetwork` pool.
//! Connections are counted by the servers (accepted) and the pools (opened). Every wait
//! is bounded; each test runs under `TEST_TIMEOUT`.

// openraft's error types are large; these signatures are openraft's, not ours.
#![allow(clippy::result_large_err)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use entrepot_cluster::{
    GroupRegistry, NodeId, PeerServer, PeerServerOptions, Request, TcpNetwork, TypeConfig,
};
use openraft::error::{ClientWriteError, RPCError, RaftError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::VoteRequest;
use openraft::{BasicNode, Config, Raft, Vote};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Groups hosted by every node (group ids 1..=GROUPS; 0 is the metadata group's).
const GROUPS: u64 = 20;
const NODES: u64 = 3;
const TEST_TIMEOUT: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(20);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts of one write when leadership moves under it.
const WRITE_ATTEMPTS: usize = 20;

struct Replica {
    raft: Raft<TypeConfig>,
    sm: support::MessageMachine,
    _dir: tempfile::TempDir,
}

struct Node {
    network: TcpNetwork,
    server: PeerServer,
    groups: GroupRegistry,
    replicas: BTreeMap<u64, Replica>,
}

struct Cluster {
    nodes: BTreeMap<NodeId, Node>,
    addrs: BTreeMap<NodeId, String>,
}

fn config() -> Arc<Config> {
    // Slower than the broker's: 60 replicas share two busy cores in a debug build.
    let config = Config {
        heartbeat_interval: 100,
        election_timeout_min: 1000,
        election_timeout_max: 2000,
        ..Config::default()
    };
    Arc::new(config.validate().unwrap())
}

/// Three nodes, every one hosting a replica of every group, each group initialized (and
/// so most likely led) by node `group % NODES`; returns once every group has a leader.
async fn start_cluster() -> Cluster {
    let mut listeners = BTreeMap::new();
    for id in 0..NODES {
        listeners.insert(id, TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs: BTreeMap<NodeId, String> = listeners
        .iter()
        .map(|(id, l)| (*id, l.local_addr().unwrap().to_string()))
        .collect();
    let config = config();
    let mut nodes = BTreeMap::new();
    for (id, listener) in listeners {
        let network = TcpNetwork::new(id);
        let groups = GroupRegistry::new();
        let server =
            PeerServer::serve(listener, groups.clone(), PeerServerOptions::default()).unwrap();
        let mut replicas = BTreeMap::new();
        for g in 1..=GROUPS {
            let (log, sm, dir) = support::open_stores();
            let raft = Raft::new(id, Arc::clone(&config), network.group(g), log, sm.clone())
                .await
                .unwrap();
            groups.insert(g, raft.clone()).unwrap();
            let replica = Replica {
                raft,
                sm,
                _dir: dir,
            };
            replicas.insert(g, replica);
        }
        let node = Node {
            network,
            server,
            groups,
            replicas,
        };
        nodes.insert(id, node);
    }
    let members: BTreeMap<NodeId, BasicNode> = addrs
        .iter()
        .map(|(id, addr)| (*id, BasicNode::new(addr)))
        .collect();
    for g in 1..=GROUPS {
        let first = &nodes[&(g % NODES)].replicas[&g].raft;
        first.initialize(members.clone()).await.unwrap();
    }
    let cluster = Cluster { nodes, addrs };
    for g in 1..=GROUPS {
        cluster.leader(g, None).await;
    }
    cluster
}

impl Cluster {
    /// The leader of group `g` as node 0's replica sees it, other than `not`.
    async fn leader(&self, g: u64, not: Option<NodeId>) -> NodeId {
        let raft = &self.nodes[&0].replicas[&g].raft;
        let m = raft
            .wait(Some(WAIT))
            .metrics(
                |m| m.current_leader.is_some() && m.current_leader != not,
                "a leader",
            )
            .await
            .unwrap_or_else(|e| panic!("group {g}: no leader within {WAIT:?}: {e}; {self}"));
        m.current_leader.unwrap()
    }

    /// Writes one batch to group `g` through its leader, following leadership moves;
    /// `Ok` once committed. An error is a write whose outcome is unknown.
    async fn write(&self, g: u64, messages: Vec<Bytes>) -> Result<(), String> {
        let mut leader = self.leader(g, None).await;
        let mut last = String::new();
        for _ in 0..WRITE_ATTEMPTS {
            let request = Request::Produce {
                address: "orders".into(),
                messages: messages.clone(),
            };
            let raft = &self.nodes[&leader].replicas[&g].raft;
            match tokio::time::timeout(WRITE_TIMEOUT, raft.client_write(request)).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                    last = format!("forward to {:?}", f.leader_id);
                    leader = match f.leader_id {
                        Some(l) => l,
                        None => self.leader(g, None).await,
                    };
                }
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err(format!("not committed within {WRITE_TIMEOUT:?}")),
            }
        }
        Err(format!("{WRITE_ATTEMPTS} attempts, last: {last}"))
    }

    /// Every replica of group `g` applies the leader's log and holds every message of
    /// `acked` and nothing outside `sent`.
    async fn assert_replicated(&self, g: u64, acked: &[Bytes], sent: &BTreeSet<Bytes>) {
        let leader = self.leader(g, None).await;
        let last = self.nodes[&leader].replicas[&g]
            .raft
            .metrics()
            .borrow()
            .last_log_index;
        for (id, node) in &self.nodes {
            let replica = &node.replicas[&g];
            replica
                .raft
                .wait(Some(WAIT))
                .applied_index_at_least(last, "all applied")
                .await
                .unwrap_or_else(|e| panic!("group {g} node {id}: not applied {last:?}: {e}"));
            let stored: BTreeSet<Bytes> = replica.sm.messages("orders").into_iter().collect();
            let lost = acked.iter().filter(|m| !stored.contains(*m)).count();
            assert_eq!(
                lost, 0,
                "group {g} node {id} lost acknowledged messages; {self}"
            );
            let invented = stored.iter().filter(|m| !sent.contains(*m)).count();
            assert_eq!(
                invented, 0,
                "group {g} node {id} holds unsent messages; {self}"
            );
        }
    }

    async fn shutdown(self) {
        for (_, node) in self.nodes {
            node.server.shutdown().await;
            for (_, r) in node.replicas {
                r.raft.shutdown().await.unwrap();
            }
        }
    }
}

impl std::fmt::Display for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nodes {:?}", self.addrs)
    }
}

fn batch(g: u64, b: u64) -> Vec<Bytes> {
    (0..3)
        .map(|m| Bytes::from(format!("group {g} batch {b} message {m}")))
        .collect()
}

async fn bounded(scenario: impl std::future::Future<Output = ()>) {
    support::bounded(TEST_TIMEOUT, scenario).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_groups_on_three_nodes_commit_over_one_connection_per_peer() {
    bounded(async {
        let cluster = start_cluster().await;
        let mut leaders = BTreeMap::<NodeId, u64>::new();
        for g in 1..=GROUPS {
            *leaders.entry(cluster.leader(g, None).await).or_default() += 1;
            let messages = batch(g, 0);
            cluster.write(g, messages.clone()).await.unwrap();
            let sent = messages.iter().cloned().collect();
            cluster.assert_replicated(g, &messages, &sent).await;
        }
        // A group the peer does not host: refused as such (openraft backs off on it),
        // on the same shared connection.
        let (from, to) = (0, 1);
        let mut stranger = cluster.nodes[&from]
            .network
            .group(999)
            .new_client(to, &BasicNode::new(&cluster.addrs[&to]))
            .await;
        let vote = VoteRequest::new(Vote::new(1, from), None);
        let err = stranger.vote(vote, RPCOption::new(WAIT)).await.unwrap_err();
        assert!(
            matches!(&err, RPCError::Unreachable(_)) && err.to_string().contains("group 999"),
            "unknown group: {err}; {cluster}"
        );
        // Each node leads some groups (each initialized a third of them), so each sends
        // to both peers: over one connection to each, whatever the number of groups.
        assert_eq!(
            leaders.len() as u64,
            NODES,
            "leaders {leaders:?}; {cluster}"
        );
        for (id, node) in &cluster.nodes {
            let opened = node.network.connections_opened();
            let accepted = node.server.connections_accepted();
            assert_eq!(
                (opened, accepted),
                (NODES - 1, NODES - 1),
                "node {id}: connections (opened, accepted); leaders {leaders:?}; {cluster}"
            );
            assert_eq!(node.groups.len() as u64, GROUPS);
        }
        cluster.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_traffic_lose_nothing_and_every_group_recovers() {
    bounded(async {
        let cluster = Arc::new(start_cluster().await);
        const BATCHES: u64 = 12;
        const CUT_AFTER: [u64; 3] = [3, 6, 9];
        let (progress, mut done) = tokio::sync::mpsc::channel(GROUPS as usize * 4);
        let mut writers = tokio::task::JoinSet::new();
        for g in 1..=GROUPS {
            let cluster = Arc::clone(&cluster);
            let progress = progress.clone();
            writers.spawn(async move {
                let (mut acked, mut sent) = (Vec::new(), BTreeSet::new());
                for b in 0..BATCHES {
                    let messages = batch(g, b);
                    sent.extend(messages.iter().cloned());
                    match cluster.write(g, messages.clone()).await {
                        Ok(()) => acked.extend(messages),
                        Err(e) => panic!("group {g} batch {b}: {e}; {cluster}"),
                    }
                    let _ = progress.send(b).await;
                }
                (g, acked, sent)
            });
        }
        drop(progress);
        // Cut every connection of every node each time all groups passed a mark.
        let mut passed = BTreeMap::<u64, u64>::new();
        let mut cuts = 0;
        while let Some(b) = done.recv().await {
            let count = passed.entry(b).or_default();
            *count += 1;
            if CUT_AFTER.contains(&b) && *count == GROUPS {
                for node in cluster.nodes.values() {
                    node.server.drop_connections();
                }
                cuts += 1;
            }
        }
        assert_eq!(cuts, CUT_AFTER.len(), "every cut happened");
        let mut results = Vec::new();
        while let Some(r) = writers.join_next().await {
            results.push(r.unwrap());
        }
        for (g, acked, sent) in &results {
            assert_eq!(acked.len() as u64, BATCHES * 3, "group {g}; {cluster}");
            cluster.assert_replicated(*g, acked, sent).await;
        }
        let accepted: u64 = cluster
            .nodes
            .values()
            .map(|n| n.server.connections_accepted())
            .sum();
        assert!(
            accepted > NODES * (NODES - 1),
            "peers reconnected after the cuts: {accepted} accepted; {cluster}"
        );
        let Ok(cluster) = Arc::try_unwrap(cluster) else {
            panic!("writers still hold the cluster");
        };
        cluster.shutdown().await;
    })
    .await;
}

/// A frame `{ len | kind | body }`.
fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.push(kind);
    f.extend_from_slice(body);
    f
}

/// A vote request body of wire version `version` for `group`, request `id`.
fn vote_body(version: u8, id: u64, group: u64) -> Vec<u8> {
    let mut b = vec![version];
    b.extend_from_slice(&id.to_le_bytes());
    b.extend_from_slice(&group.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes()); // term
    b.extend_from_slice(&9u64.to_le_bytes()); // node
    b.push(0); // not committed
    b.push(0); // no last log id
    b
}

/// Reads until the server closes the connection; bounded by [`WAIT`].
async fn closed_by_server(mut s: TcpStream) -> bool {
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    read.await.is_ok()
}

/// Goal: frames a hostile or confused peer might send — an older wire version, a huge
/// entry count, the reserved request id, a reply where a request belongs — each close
/// only their own connection; a peer already connected keeps being served on its
/// connection, and a reply naming another request id is never taken for the caller's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_close_only_their_connection_and_mismatched_ids_are_not_replies() {
    bounded(async {
        let (log, sm, _dir) = support::open_stores();
        let config = Arc::new(Config::default().validate().unwrap());
        let raft = Raft::new(1, config, TcpNetwork::new(1), log, sm)
            .await
            .unwrap();
        let groups = GroupRegistry::new();
        groups.insert(7, raft.clone()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = PeerServer::serve(listener, groups, PeerServerOptions::default()).unwrap();
        let addr = server.local_addr().to_string();
        let mut network = TcpNetwork::new(9).group(7);
        let mut good = network.new_client(1, &BasicNode::new(&addr)).await;
        let vote = |term| VoteRequest::new(Vote::new(term, 9), None);
        good.vote(vote(1), RPCOption::new(WAIT)).await.unwrap();

        // append entries: { header | vote | no prev_log_id | no leader_commit | n }
        let mut huge_count = vote_body(2, 1, 7)[..34].to_vec();
        huge_count.extend_from_slice(&[0, 0]);
        huge_count.extend_from_slice(&u32::MAX.to_le_bytes());
        let hostile: [(&str, Vec<u8>); 4] = [
            ("wire version 1", frame(1, &vote_body(1, 1, 7))),
            ("u32::MAX entries", frame(2, &huge_count)),
            ("request id 0", frame(1, &vote_body(2, 0, 7))),
            ("a reply as a request", frame(0x81, &vote_body(2, 1, 7))),
        ];
        for (what, bytes) in hostile {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            s.write_all(&bytes).await.unwrap();
            assert!(closed_by_server(s).await, "{what}: not closed ({addr})");
            let reply = good.vote(vote(2), RPCOption::new(WAIT)).await;
            assert!(reply.is_ok(), "after {what}: {reply:?} ({addr})");
        }
        assert_eq!(
            network.connections_opened(),
            1,
            "the good peer kept its connection"
        );

        // A peer answering with another request id first: that answer is not the reply.
        let fake = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake_addr = fake.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = fake.accept().await.unwrap();
            let mut header = [0u8; 5];
            s.read_exact(&mut header).await.unwrap();
            let mut body = vec![0u8; u32::from_le_bytes(header[..4].try_into().unwrap()) as usize];
            s.read_exact(&mut body).await.unwrap();
            let id = u64::from_le_bytes(body[1..9].try_into().unwrap());
            // vote reply: { vote (term 5 | node 1 | committed) | granted | no last log id }
            let reply = |id: u64, term: u64| {
                let mut b = vote_body(2, id, 7)[..17].to_vec();
                b.extend_from_slice(&term.to_le_bytes());
                b.extend_from_slice(&1u64.to_le_bytes());
                b.extend_from_slice(&[0, 1, 0]);
                frame(0x81, &b)
            };
            s.write_all(&reply(id + 1000, 666)).await.unwrap();
            s.write_all(&reply(id, 5)).await.unwrap();
            // Keep the connection open until the client is done.
            let _ = s.read(&mut header).await;
        });
        let mut client = TcpNetwork::new(9)
            .group(7)
            .new_client(2, &BasicNode::new(&fake_addr))
            .await;
        let reply = client.vote(vote(3), RPCOption::new(WAIT)).await.unwrap();
        assert_eq!(
            reply.vote.leader_id().term,
            5,
            "took another id's reply: {reply:?}"
        );

        server.shutdown().await;
        raft.shutdown().await.unwrap();
    })
    .await;
}

/// Goal: a peer that accepts requests and never answers anything (a stopped process, a
/// path that silently drops) has its shared connection closed after
/// `SILENT_CONNECTION_TIMEOUT` — the waiting request fails as a network error, before its
/// own longer timeout — and the next call dials a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_connection_is_closed_and_the_next_call_redials() {
    bounded(async {
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let (accepted_tx, mut accepted) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut held = Vec::new();
            for _ in 0..2 {
                let Ok((s, _)) = silent.accept().await else {
                    return;
                };
                held.push(s); // read nothing, answer nothing
                let _ = accepted_tx.send(()).await;
            }
            std::future::pending::<()>().await;
        });
        let mut network = TcpNetwork::new(9).group(7);
        let mut client = network.new_client(2, &BasicNode::new(&addr)).await;
        let ttl = entrepot_cluster::SILENT_CONNECTION_TIMEOUT * 3;
        let vote = VoteRequest::new(Vote::new(1, 9), None);
        let err = client
            .vote(vote.clone(), RPCOption::new(ttl))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RPCError::Network(_))
                && err.to_string().contains("SILENT_CONNECTION_TIMEOUT"),
            "{err}"
        );
        accepted.recv().await.unwrap();
        let call = client.vote(vote, RPCOption::new(Duration::from_millis(200)));
        let err = call.await.unwrap_err();
        assert!(matches!(err, RPCError::Timeout(_)), "{err}");
        accepted.recv().await.unwrap();
        assert_eq!(network.connections_opened(), 2, "the second call redialled");
    })
    .await;
}

/// Reads one frame `(kind, request id)`; bounded by [`WAIT`].
async fn read_reply(s: &mut TcpStream) -> (u8, u64) {
    let read = async {
        let mut header = [0u8; 5];
        s.read_exact(&mut header).await.unwrap();
        let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.unwrap();
        (
            header[4],
            u64::from_le_bytes(body[1..9].try_into().unwrap()),
        )
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("a reply within WAIT")
}

/// Goal: requests of one connection are served concurrently: a request that takes long
/// in one group (a join waiting for a learner that never catches up) does not hold back
/// another group's vote sent after it on the same connection. Method: raw frames on one
/// socket, the join first; the vote's reply must come back while the join still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_of_one_group_does_not_hold_back_another_group_on_the_connection() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let config = Arc::new(Config::default().validate().unwrap());
        let groups = GroupRegistry::new();
        let mut dirs = Vec::new();
        for g in [0, 7] {
            let (log, sm, dir) = support::open_stores();
            let raft = Raft::new(1, Arc::clone(&config), TcpNetwork::new(1).group(g), log, sm)
                .await
                .unwrap();
            groups.insert(g, raft).unwrap();
            dirs.push(dir);
        }
        let server =
            PeerServer::serve(listener, groups.clone(), PeerServerOptions::default()).unwrap();
        let metadata = groups.raft(0).unwrap();
        metadata
            .initialize(BTreeMap::from([(1, BasicNode::new(&addr))]))
            .await
            .unwrap();
        metadata
            .wait(Some(WAIT))
            .current_leader(1, "leads group 0")
            .await
            .unwrap();

        // join { node 5 at a closed port }: its catch-up can never finish.
        let mut join = vote_body(2, 1, 0)[..17].to_vec();
        join.extend_from_slice(&5u64.to_le_bytes());
        let member = b"127.0.0.1:1";
        join.extend_from_slice(&(member.len() as u16).to_le_bytes());
        join.extend_from_slice(member);
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(&frame(4, &join)).await.unwrap();
        s.write_all(&frame(1, &vote_body(2, 2, 7))).await.unwrap();
        let (kind, id) = read_reply(&mut s).await;
        assert_eq!(
            (kind, id),
            (0x81, 2),
            "the vote of group 7 is answered first"
        );

        server.shutdown().await;
        for g in [0, 7] {
            groups.remove(g).unwrap().shutdown().await.unwrap();
        }
    })
    .await;
}
