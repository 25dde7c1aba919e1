//! Goal: failures on the inter-node port reach openraft as the errors it retries on, and a
//! peer that sends garbage is cut off without disturbing Raft.
//! Method: one `Raft` served by a `PeerServer` on `127.0.0.1:0`; a `PeerClient` from
//! `TcpNetwork` calls it directly (as openraft would), and a raw socket sends bad frames.
//! Every wait is bounded by a timeout.

// openraft's error types are large; these signatures are openraft's, not ours.
#![allow(clippy::result_large_err)]

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use entrepot_cluster::{NodeId, PeerSecret, PeerServer, TcpNetwork, TypeConfig};
use openraft::error::{InstallSnapshotError, RPCError, RaftError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{InstallSnapshotRequest, VoteRequest};
use openraft::{BasicNode, Config, Membership, Raft, SnapshotMeta, StoredMembership, Vote};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(5);

struct Served {
    raft: Raft<TypeConfig>,
    server: PeerServer,
    _dir: tempfile::TempDir,
}

async fn serve_one_node(id: NodeId) -> Served {
    serve_one_node_with(id, None).await
}

async fn serve_one_node_with(id: NodeId, secret: Option<Arc<PeerSecret>>) -> Served {
    let (log, sm, dir) = support::open_stores();
    let config = Arc::new(Config::default().validate().unwrap());
    let raft = Raft::new(id, config, TcpNetwork::new(id), log, sm)
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = PeerServer::start_with_secret(listener, raft.clone(), secret).unwrap();
    Served {
        raft,
        server,
        _dir: dir,
    }
}

async fn client_to(addr: String) -> entrepot_cluster::PeerClient {
    client_with(addr, None).await
}

async fn client_with(
    addr: String,
    secret: Option<Arc<PeerSecret>>,
) -> entrepot_cluster::PeerClient {
    TcpNetwork::new(9)
        .with_secret(secret)
        .new_client(1, &BasicNode::new(addr))
        .await
}

fn secret(s: &str) -> Option<Arc<PeerSecret>> {
    Some(Arc::new(PeerSecret::new(s.as_bytes()).unwrap()))
}

/// Goal: a node with a cluster secret answers only peers that prove they know it; a
/// wrong secret, no secret, or a handshake to a node without one all fail clearly, and
/// the node keeps serving the right peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_peers_that_know_the_cluster_secret_are_served() {
    let node = serve_one_node_with(1, secret("the-right-cluster-secret")).await;
    let addr = node.server.local_addr().to_string();
    let vote = || VoteRequest::new(Vote::new(1, 9), None);

    let mut right = client_with(addr.clone(), secret("the-right-cluster-secret")).await;
    let reply = right.vote(vote(), option()).await;
    assert!(reply.is_ok(), "right secret: {reply:?} ({addr})");

    let mut wrong = client_with(addr.clone(), secret("a-wrong-cluster-secret")).await;
    let err = wrong.vote(vote(), option()).await.unwrap_err();
    assert!(
        err.to_string().contains("cluster secret"),
        "wrong secret: {err} ({addr})"
    );

    let mut none = client_to(addr.clone()).await;
    let err = none.vote(vote(), option()).await.unwrap_err();
    assert!(
        err.to_string().contains("authentication failed"),
        "no secret: {err} ({addr})"
    );

    // A node without a secret closes on a handshake instead of guessing.
    let open = serve_one_node(2).await;
    let open_addr = open.server.local_addr().to_string();
    let mut eager = client_with(open_addr.clone(), secret("the-right-cluster-secret")).await;
    let err = eager.vote(vote(), option()).await.unwrap_err();
    assert!(
        err.to_string().contains("authenticating"),
        "handshake to an open node: {err} ({open_addr})"
    );

    let reply = right.vote(vote(), option()).await;
    assert!(reply.is_ok(), "still serving the right peer: {reply:?}");
    node.server.shutdown().await;
    node.raft.shutdown().await.unwrap();
    open.server.shutdown().await;
    open.raft.shutdown().await.unwrap();
}

fn option() -> RPCOption {
    RPCOption::new(WAIT)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_is_unreachable_and_a_stopped_raft_is_a_network_error() {
    let node = serve_one_node(1).await;
    let addr = node.server.local_addr().to_string();
    let mut client = client_to(addr.clone()).await;

    let reply = client
        .vote(VoteRequest::new(Vote::new(1, 9), None), option())
        .await;
    assert!(
        reply.is_ok(),
        "a live node answers a vote: {reply:?} ({addr})"
    );

    node.raft.shutdown().await.unwrap();
    let err = client
        .vote(VoteRequest::new(Vote::new(2, 9), None), option())
        .await
        .unwrap_err();
    assert!(
        matches!(err, RPCError::Network(_)),
        "stopped raft: {err:?} ({addr})"
    );

    // The refusal above did not close the shared connection; closing the port does. A
    // call racing the client's reading of that close fails on the old connection (a
    // network error); the call after it dials, and a closed port is unreachable.
    node.server.shutdown().await;
    let err = client
        .vote(VoteRequest::new(Vote::new(3, 9), None), option())
        .await
        .unwrap_err();
    assert!(
        matches!(err, RPCError::Unreachable(_) | RPCError::Network(_)),
        "closed port, first call: {err:?} ({addr})"
    );
    let err = client
        .vote(VoteRequest::new(Vote::new(4, 9), None), option())
        .await
        .unwrap_err();
    assert!(
        matches!(err, RPCError::Unreachable(_)),
        "closed port: {err:?} ({addr})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_order_snapshot_chunk_comes_back_as_a_snapshot_mismatch() {
    let node = serve_one_node(1).await;
    let addr = node.server.local_addr().to_string();
    let mut client = client_to(addr.clone()).await;
    let nodes: BTreeMap<NodeId, BasicNode> = [(9, BasicNode::new("127.0.0.1:1"))].into();
    let membership = Membership::new(vec![[9].into()], nodes);
    let rpc = InstallSnapshotRequest::<TypeConfig> {
        vote: Vote::new_committed(1, 9),
        meta: SnapshotMeta {
            last_log_id: None,
            last_membership: StoredMembership::new(None, membership),
            snapshot_id: "never-started".into(),
        },
        offset: 4096,
        data: vec![0; 16],
        done: false,
    };
    let err = client.install_snapshot(rpc, option()).await.unwrap_err();
    assert!(
        matches!(
            &err,
            RPCError::RemoteError(r)
                if matches!(r.source, RaftError::APIError(InstallSnapshotError::SnapshotMismatch(_)))
        ),
        "{err:?} ({addr})"
    );
    node.server.shutdown().await;
    node.raft.shutdown().await.unwrap();
}

/// Reads until the server closes the connection; bounded by [`WAIT`].
async fn closed_by_server(mut s: TcpStream) -> bool {
    let mut buf = [0u8; 64];
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_close_the_connection_and_the_node_keeps_serving() {
    let node = serve_one_node(1).await;
    let addr = node.server.local_addr().to_string();

    // An unknown request kind.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&[1, 0, 0, 0, 0x42, 1]).await.unwrap();
    assert!(closed_by_server(s).await, "unknown kind ({addr})");

    // A length past MAX_RPC_FRAME_BYTES: refused before the body is read or allocated.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&[0xff, 0xff, 0xff, 0xff, 1]).await.unwrap();
    assert!(closed_by_server(s).await, "oversize frame ({addr})");

    // A vote request that does not decode (wrong version byte).
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&[1, 0, 0, 0, 1, 99]).await.unwrap();
    assert!(closed_by_server(s).await, "bad version ({addr})");

    let mut client = client_to(addr.clone()).await;
    let reply = client
        .vote(VoteRequest::new(Vote::new(1, 9), None), option())
        .await;
    assert!(reply.is_ok(), "still serving: {reply:?} ({addr})");
    node.server.shutdown().await;
    node.raft.shutdown().await.unwrap();
}

/// Goal: an RPC dropped before its reply (openraft times out every RPC itself and drops
/// the call) leaves nothing behind: the next RPC to that peer gets its own reply, never
/// the late reply of the dropped one. A late reply read as the next one's made a leader
/// record a follower as holding entries it never acknowledged (openraft's "follower log
/// reversion" panic in the cluster tests). Method: the client reaches a real node through
/// a proxy that holds the first connection's replies back for a while; the first vote
/// (term 1) is dropped after 50 ms, the second (term 2) must come back with term 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_call_leaves_no_late_reply_for_the_next() {
    let node = serve_one_node(1).await;
    let upstream = node.server.local_addr();
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = proxy.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        for n in 0.. {
            let Ok((client, _)) = proxy.accept().await else {
                return;
            };
            let server = TcpStream::connect(upstream).await.unwrap();
            let (mut client_rd, mut client_wr) = client.into_split();
            let (mut server_rd, mut server_wr) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_rd, &mut server_wr).await;
            });
            tokio::spawn(async move {
                if n == 0 {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                let _ = tokio::io::copy(&mut server_rd, &mut client_wr).await;
            });
        }
    });
    let mut client = client_to(proxy_addr).await;
    let dropped = tokio::time::timeout(
        Duration::from_millis(50),
        client.vote(VoteRequest::new(Vote::new(1, 9), None), option()),
    )
    .await;
    assert!(
        dropped.is_err(),
        "the first vote was not held back: {dropped:?}"
    );
    let reply = tokio::time::timeout(
        WAIT,
        client.vote(VoteRequest::new(Vote::new(2, 9), None), option()),
    )
    .await
    .expect("the second vote within WAIT")
    .expect("the second vote");
    assert_eq!(
        reply.vote.leader_id().term,
        2,
        "the second vote got another call's reply: {reply:?}"
    );
    node.server.shutdown().await;
    node.raft.shutdown().await.unwrap();
}
