//! The server side of the inter-node port: accepts peer connections and hands each RPC
//! to the local `Raft` handle.
//!
//! One task accepts; one task per connection reads a request frame, awaits the local Raft's
//! answer and writes the reply frame, in order (peers send one RPC at a time per
//! connection). Connections are capped by [`MAX_PEER_CONNECTIONS`].
//!
//! With [`PeerServerOptions::tls`], each connection task first completes a TLS handshake
//! that requires a client certificate from the cluster CA (`tls.rs`), bounded by
//! [`crate::PEER_TLS_HANDSHAKE_TIMEOUT`]; with [`PeerServerOptions::secret`], the peer then
//! proves it knows the cluster secret (`auth.rs`, inside TLS when both are set). A peer
//! that fails either is logged (its address and why) and dropped; the handshakes run in
//! the connection's own task, so a stalled or hostile peer never delays the others.
//!
//! Invariants:
//! * Dropping or [`PeerServer::shutdown`]-ing the server ends the accept task and, with it,
//!   every connection task (they live in its `JoinSet`): the port closes and peers see
//!   their connections reset, exactly as if the node had died.
//! * A request that does not decode closes its connection; nothing undecoded reaches Raft.
//!
//! Besides openraft's RPCs it serves the membership requests of `membership.rs` (a node
//! joining or leaving), behind the same TLS and secret handshakes, and it remembers the
//! leader's commit index carried by the last `append_entries` it received
//! ([`HeardCommit`]): openraft 0.9's metrics do not show a follower how far the leader has
//! committed, and readiness (`/readyz`) compares its applied index with that.
//!
//! Does not: serve clients (AMQP is the broker's port).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::Raft;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::auth::{server_handshake, AuthError, PeerSecret, KIND_HELLO};
use crate::error::Result;
use crate::frame::{read_frame, write_frame};
use crate::rpc::{self, RemoteRefusal};
use crate::stream::PeerStream;
use crate::tls::PeerTls;
use crate::types::TypeConfig;

/// Most peer connections served at once: a few per peer (replication, votes, snapshots)
/// for clusters far larger than any we run.
pub const MAX_PEER_CONNECTIONS: usize = 256;
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Longest a connecting peer may take to prove it knows the cluster secret.
pub const PEER_AUTH_TIMEOUT: Duration = Duration::from_secs(10);

/// How the peer server admits connections; the default admits every peer in plain TCP.
#[derive(Debug, Clone, Default)]
pub struct PeerServerOptions {
    /// Peers must prove they know this secret before any RPC (`auth.rs`).
    pub secret: Option<Arc<PeerSecret>>,
    /// Every connection is TLS with a client certificate from the cluster CA (`tls.rs`).
    pub tls: Option<Arc<PeerTls>>,
}

/// The leader's commit index, as the last `append_entries` this node received carried
/// it (shared by the peer server's connections and whoever reads it).
#[derive(Debug, Clone, Default)]
pub struct HeardCommit(Arc<AtomicU64>);

impl HeardCommit {
    /// The last commit index heard from a leader; `None` before any.
    pub fn get(&self) -> Option<u64> {
        self.0.load(Ordering::Relaxed).checked_sub(1)
    }

    fn record(&self, index: u64) {
        // Stored plus one, so that zero means "none heard".
        self.0.store(index.saturating_add(1), Ordering::Relaxed);
    }
}

/// A running inter-node server; the port stays open until it is shut down or dropped.
#[derive(Debug)]
pub struct PeerServer {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
    heard_commit: HeardCommit,
}

impl PeerServer {
    /// Serves `raft` on an already-bound listener (bind to port 0 in tests, then share
    /// [`PeerServer::local_addr`] with the peers).
    pub fn start(listener: TcpListener, raft: Raft<TypeConfig>) -> io::Result<PeerServer> {
        PeerServer::start_with(listener, raft, PeerServerOptions::default())
    }

    /// [`PeerServer::start`], admitting only peers that prove they know `secret`
    /// (`auth.rs`); `None` admits every peer.
    pub fn start_with_secret(
        listener: TcpListener,
        raft: Raft<TypeConfig>,
        secret: Option<Arc<PeerSecret>>,
    ) -> io::Result<PeerServer> {
        let options = PeerServerOptions { secret, tls: None };
        PeerServer::start_with(listener, raft, options)
    }

    /// [`PeerServer::start`], admitting peers as `options` say (TLS, secret, both).
    pub fn start_with(
        listener: TcpListener,
        raft: Raft<TypeConfig>,
        options: PeerServerOptions,
    ) -> io::Result<PeerServer> {
        let local_addr = listener.local_addr()?;
        let heard_commit = HeardCommit::default();
        let task = tokio::spawn(accept_loop(listener, raft, options, heard_commit.clone()));
        Ok(PeerServer {
            local_addr,
            task,
            heard_commit,
        })
    }

    /// The leader's commit index as last heard in an `append_entries`.
    pub fn heard_commit(&self) -> HeardCommit {
        self.heard_commit.clone()
    }

    /// The address peers connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, closes every connection, and waits until the port is closed.
    pub async fn shutdown(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    raft: Raft<TypeConfig>,
    options: PeerServerOptions,
    heard_commit: HeardCommit,
) {
    let limit = Arc::new(Semaphore::new(MAX_PEER_CONNECTIONS));
    // Owning the connection tasks here means aborting this task aborts them all.
    let mut connections = JoinSet::new();
    loop {
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "inter-node accept failed");
                tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        connections.spawn(serve_connection(
            stream,
            raft.clone(),
            options.clone(),
            heard_commit.clone(),
            permit,
        ));
        while connections.try_join_next().is_some() {}
    }
}

async fn serve_connection(
    tcp: TcpStream,
    raft: Raft<TypeConfig>,
    options: PeerServerOptions,
    heard_commit: HeardCommit,
    _permit: OwnedSemaphorePermit,
) {
    let peer = tcp.peer_addr().ok();
    let mut stream = match &options.tls {
        None => PeerStream::Plain(tcp),
        Some(tls) => match tls.accept(tcp).await {
            Ok(s) => s.into(),
            // A dialer giving up mid-handshake is not an attack: no warning storm.
            Err(e) if e.is_peer_gone() => {
                tracing::debug!(?peer, error = %e, "inter-node peer went away during the TLS handshake");
                return;
            }
            Err(e) => {
                tracing::warn!(?peer, error = %e, "inter-node peer refused: TLS handshake failed");
                return;
            }
        },
    };
    if let Some(secret) = &options.secret {
        let handshake = async {
            let first = read_frame(&mut stream).await?.ok_or(AuthError::Closed)?;
            server_handshake(&mut stream, secret, first).await
        };
        let outcome = tokio::time::timeout(PEER_AUTH_TIMEOUT, handshake).await;
        match outcome {
            Ok(Ok(())) => {}
            // A flaky network or a peer going away is not an attack: no warning storm.
            Ok(Err(AuthError::Io(e))) => {
                tracing::debug!(?peer, error = %e, "inter-node handshake interrupted");
                return;
            }
            Ok(Err(AuthError::Closed)) => {
                tracing::debug!(?peer, "inter-node peer closed during the handshake");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(?peer, error = %e, "inter-node peer refused: authentication failed");
                let refusal = RemoteRefusal::Unavailable(format!("authentication failed: {e}"));
                let _ =
                    write_frame(&mut stream, rpc::KIND_ERROR, &rpc::encode_refusal(&refusal)).await;
                return;
            }
            Err(_) => {
                tracing::info!(?peer, timeout = ?PEER_AUTH_TIMEOUT, "inter-node peer refused: no authentication in time (PEER_AUTH_TIMEOUT)");
                return;
            }
        }
    }
    loop {
        let (kind, body) = match read_frame(&mut stream).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "inter-node connection read failed");
                return;
            }
        };
        if kind == KIND_HELLO {
            tracing::warn!(
                ?peer,
                "inter-node peer sent an authentication handshake, but this node has no \
                 --cluster-secret-file; closing"
            );
            return;
        }
        let (reply_kind, reply) = match dispatch(&raft, &heard_commit, kind, body).await {
            Ok(reply) => reply,
            Err(e) => {
                tracing::warn!(error = %e, kind, "undecodable inter-node request; closing");
                return;
            }
        };
        if let Err(e) = write_frame(&mut stream, reply_kind, &reply).await {
            tracing::debug!(error = %e, "inter-node connection write failed");
            return;
        }
    }
}

/// Decodes one request, asks Raft, and encodes the reply (or a refusal).
async fn dispatch(
    raft: &Raft<TypeConfig>,
    heard_commit: &HeardCommit,
    kind: u8,
    body: Bytes,
) -> Result<(u8, Vec<u8>)> {
    Ok(match kind {
        rpc::KIND_VOTE => match raft.vote(rpc::decode_vote_request(body)?).await {
            Ok(r) => (rpc::KIND_VOTE_REPLY, rpc::encode_vote_reply(&r)),
            Err(e) => refusal(&e),
        },
        rpc::KIND_APPEND => {
            let request = rpc::decode_append_request(body)?;
            let commit = request.leader_commit.map(|l| l.index);
            match raft.append_entries(request).await {
                Ok(r) => {
                    // Any leader this node accepts as current (not a deposed one's).
                    let current =
                        !matches!(r, openraft::raft::AppendEntriesResponse::HigherVote(_));
                    if let (Some(index), true) = (commit, current) {
                        heard_commit.record(index);
                    }
                    (rpc::KIND_APPEND_REPLY, rpc::encode_append_reply(&r))
                }
                Err(e) => refusal(&e),
            }
        }
        rpc::KIND_JOIN | rpc::KIND_LEAVE => {
            let request = rpc::decode_membership_request(kind, body)?;
            let reply = crate::membership::serve(raft, request).await;
            (
                rpc::KIND_MEMBERSHIP_REPLY,
                rpc::encode_membership_reply(&reply),
            )
        }
        rpc::KIND_SNAPSHOT => match raft
            .install_snapshot(rpc::decode_snapshot_request(body)?)
            .await
        {
            Ok(r) => (rpc::KIND_SNAPSHOT_REPLY, rpc::encode_snapshot_reply(&r)),
            Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m))) => (
                rpc::KIND_ERROR,
                rpc::encode_refusal(&RemoteRefusal::SnapshotMismatch(m)),
            ),
            Err(e) => refusal(&e),
        },
        _ => {
            return Err(crate::error::ClusterError::Decode {
                what: "inter-node frame",
                position: 4,
                reason: "unknown request kind",
            })
        }
    })
}

/// The local Raft could not answer (it is stopping or hit a fatal error).
fn refusal(e: &dyn std::error::Error) -> (u8, Vec<u8>) {
    let r = RemoteRefusal::Unavailable(e.to_string());
    (rpc::KIND_ERROR, rpc::encode_refusal(&r))
}
