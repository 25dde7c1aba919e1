//! The client side of the inter-node port: openraft's `RaftNetworkFactory` / `RaftNetwork`
//! (v1 API) over one TCP connection per peer, TLS-wrapped when [`TcpNetwork::with_tls`].
//!
//! A [`PeerClient`] connects lazily to the address in the target's `BasicNode`, sends one
//! request frame and waits for its reply (openraft calls it with `&mut self`, so there is
//! never more than one RPC in flight on a connection and replies need no correlation id).
//! Any failure drops the connection, so the next RPC starts on a fresh one.
//!
//! Errors are mapped so openraft retries:
//! * cannot connect, or the TLS handshake fails (the peer's certificate refused, a peer
//!   not speaking TLS, no handshake within `PEER_TLS_HANDSHAKE_TIMEOUT`) →
//!   `RPCError::Unreachable` (openraft backs off before the next try, so a misconfigured
//!   peer is not re-dialled on every heartbeat). In TLS 1.3 the peer's refusal of *our*
//!   certificate arrives as an alert on the first read, so it is a `Network` error;
//! * I/O failure, undecodable reply, peer's Raft stopping → `RPCError::Network`;
//! * no reply within the RPC's `hard_ttl` → `RPCError::Timeout`;
//! * an `append_entries` too large for a frame → `RPCError::PayloadTooLarge` (fewer entries);
//! * a snapshot chunk out of order → `RemoteError(InstallSnapshotError::SnapshotMismatch)`.
//!
//! A new connection is, in order: TCP connect (`TCP_NODELAY`), the TLS handshake when
//! configured (`tls.rs`: the peer's certificate must chain to the cluster CA and name the
//! host of its member address), then the cluster-secret handshake when configured
//! (`auth.rs`, inside the TLS stream).
//!
//! Does not: pipeline, multiplex or compress.

// openraft's error types are large; these signatures are openraft's, not ours.
#![allow(clippy::result_large_err)]

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout,
    Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use tokio::net::TcpStream;

use crate::auth::{client_handshake, AuthError, PeerSecret};
use crate::error::ClusterError;
use crate::frame::{read_frame, write_frame};
use crate::rpc::{self, RemoteRefusal};
use crate::stream::PeerStream;
use crate::tls::{PeerTls, PeerTlsError};
use crate::types::{NodeId, TypeConfig};

type RpcResult<T, E = RaftError<NodeId>> = Result<T, RPCError<NodeId, BasicNode, E>>;

/// Creates a [`PeerClient`] per target; `BasicNode::addr` is the peer's `host:port`.
#[derive(Debug, Clone)]
pub struct TcpNetwork {
    /// This node's id, reported in timeout errors.
    id: NodeId,
    /// The cluster secret every new connection proves it knows (`auth.rs`).
    secret: Option<Arc<PeerSecret>>,
    /// TLS for every new connection (`tls.rs`); `None`: plain TCP.
    tls: Option<Arc<PeerTls>>,
}

impl TcpNetwork {
    pub fn new(id: NodeId) -> TcpNetwork {
        TcpNetwork {
            id,
            secret: None,
            tls: None,
        }
    }

    /// Authenticates every connection with `secret` (peers must use the same one).
    pub fn with_secret(mut self, secret: Option<Arc<PeerSecret>>) -> TcpNetwork {
        self.secret = secret;
        self
    }

    /// Wraps every connection in TLS with `tls` (peers must serve TLS from the same CA).
    pub fn with_tls(mut self, tls: Option<Arc<PeerTls>>) -> TcpNetwork {
        self.tls = tls;
        self
    }
}

impl RaftNetworkFactory<TypeConfig> for TcpNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            id: self.id,
            target,
            addr: crate::identity::peer_addr(&node.addr).to_string(),
            stream: None,
            secret: self.secret.clone(),
            tls: self.tls.clone(),
        }
    }
}

/// One peer's connection; reconnects on the next RPC after any failure.
#[derive(Debug)]
pub struct PeerClient {
    id: NodeId,
    target: NodeId,
    addr: String,
    /// `None` until the first RPC, during one, and again after any error or a call dropped
    /// midway (the stream may hold half a frame or a late reply, so it is never reused).
    stream: Option<PeerStream>,
    secret: Option<Arc<PeerSecret>>,
    tls: Option<Arc<PeerTls>>,
}

/// Why one call failed, before it becomes openraft's error (or, for a membership
/// request, the caller's).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerCallError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("{verb} peer {addr}: {source}")]
    Io {
        verb: &'static str,
        addr: String,
        source: io::Error,
    },
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("TLS to peer {addr}: {source}")]
    Tls { addr: String, source: PeerTlsError },
    #[error("authenticating to peer {addr}: {source}")]
    Auth { addr: String, source: AuthError },
    #[error("peer {addr} answered kind {got:#x}, expected {expected:#x}")]
    UnexpectedReply { addr: String, expected: u8, got: u8 },
    #[error(transparent)]
    Decode(#[from] ClusterError),
    #[error(transparent)]
    Refused(RemoteRefusal),
}

impl TcpNetwork {
    /// A client for the peer at member address `addr` (node `target`), outside openraft:
    /// for the membership requests of `membership.rs`.
    pub fn client(&self, target: NodeId, addr: &str) -> PeerClient {
        PeerClient {
            id: self.id,
            target,
            addr: crate::identity::peer_addr(addr).to_string(),
            stream: None,
            secret: self.secret.clone(),
            tls: self.tls.clone(),
        }
    }
}

impl PeerClient {
    /// Sends a membership request (join, leave) and waits up to `timeout` for its reply;
    /// the connection is authenticated like any Raft RPC's.
    pub async fn membership(
        &mut self,
        request: &rpc::MembershipRequest,
        timeout: Duration,
    ) -> Result<rpc::MembershipReply, PeerCallError> {
        let (kind, body) = rpc::encode_membership_request(request)?;
        let option = RPCOption::new(timeout);
        let reply = self
            .call(kind, &body, rpc::KIND_MEMBERSHIP_REPLY, &option)
            .await?;
        Ok(rpc::decode_membership_reply(reply)?)
    }

    /// Sends one request frame and returns the body of its reply of kind `reply_kind`.
    async fn call(
        &mut self,
        kind: u8,
        body: &[u8],
        reply_kind: u8,
        option: &RPCOption,
    ) -> Result<Bytes, PeerCallError> {
        let ttl = option.hard_ttl();
        // The stream is out of `self` during the exchange and goes back only with a whole
        // reply read. openraft drops an RPC future at its own timeout (the same TTL, and
        // it fires first); a stream left behind would hold a request whose late reply
        // the next call reads as its own — the leader then records a follower as matching
        // entries it never acknowledged. A dropped call leaves no stream: the next one
        // connects anew.
        let stream = self.stream.take();
        match tokio::time::timeout(ttl, self.exchange(stream, kind, body, reply_kind)).await {
            Ok(Ok((stream, reply))) => {
                self.stream = Some(stream);
                Ok(reply)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(PeerCallError::Timeout(ttl)),
        }
    }

    /// One request and its reply on `stream` (a new connection when `None`); returns the
    /// stream for the next call with the reply.
    async fn exchange(
        &self,
        stream: Option<PeerStream>,
        kind: u8,
        body: &[u8],
        reply_kind: u8,
    ) -> Result<(PeerStream, Bytes), PeerCallError> {
        let addr = self.addr.clone();
        let mut stream = match stream {
            Some(s) => s,
            None => self.connect().await?,
        };
        let io = |verb, source| PeerCallError::Io {
            verb,
            addr: addr.clone(),
            source,
        };
        write_frame(&mut stream, kind, body)
            .await
            .map_err(|e| io("write to", e))?;
        let frame = read_frame(&mut stream)
            .await
            .map_err(|e| io("read from", e))?;
        let Some((got, reply)) = frame else {
            let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed");
            return Err(io("read from", eof));
        };
        if got == rpc::KIND_ERROR {
            return Err(PeerCallError::Refused(rpc::decode_refusal(reply)?));
        }
        if got != reply_kind {
            return Err(PeerCallError::UnexpectedReply {
                addr: self.addr.clone(),
                expected: reply_kind,
                got,
            });
        }
        Ok((stream, reply))
    }

    /// A new connection: TCP, then TLS and the secret handshake when configured.
    async fn connect(&self) -> Result<PeerStream, PeerCallError> {
        let addr = &self.addr;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| PeerCallError::Connect {
                addr: addr.clone(),
                source,
            })?;
        // RPCs are small and latency-bound: never wait to coalesce.
        let _ = tcp.set_nodelay(true);
        let mut stream = match &self.tls {
            None => PeerStream::Plain(tcp),
            Some(tls) => tls
                .connect(addr, tcp)
                .await
                .map_err(|source| PeerCallError::Tls {
                    addr: addr.clone(),
                    source,
                })?
                .into(),
        };
        if let Some(secret) = &self.secret {
            client_handshake(&mut stream, secret)
                .await
                .map_err(|source| PeerCallError::Auth {
                    addr: addr.clone(),
                    source,
                })?;
        }
        Ok(stream)
    }

    /// openraft's error for a failed call; `Refused(SnapshotMismatch)` is handled by the
    /// snapshot RPC itself.
    fn rpc_error<E: std::error::Error>(
        &self,
        action: RPCTypes,
        e: PeerCallError,
    ) -> RPCError<NodeId, BasicNode, E> {
        match e {
            PeerCallError::Connect { .. } | PeerCallError::Tls { .. } => {
                RPCError::Unreachable(Unreachable::new(&e))
            }
            PeerCallError::Timeout(timeout) => RPCError::Timeout(Timeout {
                action,
                id: self.id,
                target: self.target,
                timeout,
            }),
            _ => RPCError::Network(NetworkError::new(&e)),
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let n = rpc.entries.len() as u64;
        let body = match rpc::encode_append_request(&rpc) {
            Ok(b) => b,
            Err(ClusterError::LimitExceeded { .. }) if n > 1 => {
                return Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint(n / 2),
                ));
            }
            Err(e) => return Err(RPCError::Network(NetworkError::new(&e))),
        };
        let action = RPCTypes::AppendEntries;
        let reply = self
            .call(rpc::KIND_APPEND, &body, rpc::KIND_APPEND_REPLY, &option)
            .await
            .map_err(|e| self.rpc_error(action, e))?;
        rpc::decode_append_reply(reply).map_err(|e| self.rpc_error(action, e.into()))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        let action = RPCTypes::InstallSnapshot;
        let body =
            rpc::encode_snapshot_request(&rpc).map_err(|e| self.rpc_error(action, e.into()))?;
        match self
            .call(rpc::KIND_SNAPSHOT, &body, rpc::KIND_SNAPSHOT_REPLY, &option)
            .await
        {
            Ok(reply) => {
                rpc::decode_snapshot_reply(reply).map_err(|e| self.rpc_error(action, e.into()))
            }
            Err(PeerCallError::Refused(RemoteRefusal::SnapshotMismatch(m))) => {
                let api = RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m));
                Err(RPCError::RemoteError(RemoteError::new(self.target, api)))
            }
            Err(e) => Err(self.rpc_error(action, e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let action = RPCTypes::Vote;
        let body = rpc::encode_vote_request(&rpc);
        let reply = self
            .call(rpc::KIND_VOTE, &body, rpc::KIND_VOTE_REPLY, &option)
            .await
            .map_err(|e| self.rpc_error(action, e))?;
        rpc::decode_vote_reply(reply).map_err(|e| self.rpc_error(action, e.into()))
    }
}
