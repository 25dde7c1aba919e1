//! openraft's network (`RaftNetworkFactory` / `RaftNetwork`, v1 API) for many Raft groups
//! over one multiplexed connection per peer (`peer_connection.rs`), TLS-wrapped when
//! [`TcpNetwork::with_tls`].
//!
//! A [`TcpNetwork`] is one group's factory ([`TcpNetwork::group`]); every factory derived
//! from the same [`TcpNetwork::new`] shares one pool of peer links, so openraft's many
//! clients — one per (group, target), created again for heartbeats — all send over the
//! node's one connection to that peer. A [`PeerClient`] stamps its group on every request
//! (`rpc.rs`) and checks it on the reply; the link correlates replies by request id, so
//! calls of one client, or of many, may overlap.
//!
//! Errors are mapped so openraft retries:
//! * cannot connect, or the TLS handshake fails (the peer's certificate refused, a peer
//!   not speaking TLS, no handshake within `PEER_TLS_HANDSHAKE_TIMEOUT`), or the peer hosts
//!   no replica of the group ([`RemoteRefusal::UnknownGroup`]) → `RPCError::Unreachable`
//!   (openraft backs off before the next try, so a misconfigured peer, or one that has not
//!   created the group yet, is not asked again on every heartbeat). In TLS 1.3 the peer's
//!   refusal of *our* certificate arrives as an alert on the first read, so it is a
//!   `Network` error;
//! * I/O failure, the connection lost (every request waiting on it fails; the next call
//!   dials anew), undecodable reply, peer's Raft stopping, [`crate::MAX_IN_FLIGHT_PER_PEER`]
//!   requests already in flight to the peer → `RPCError::Network`;
//! * no reply within the RPC's `hard_ttl` → `RPCError::Timeout`;
//! * an `append_entries` too large for a frame → `RPCError::PayloadTooLarge` (fewer entries);
//! * a snapshot chunk out of order → `RemoteError(InstallSnapshotError::SnapshotMismatch)`.
//!
//! Membership requests (`membership.rs`, [`TcpNetwork::client`]) address the metadata
//! group on a connection of their own: they may legitimately wait a minute for the leader
//! to catch a joiner up, longer than the shared connections' silence limit.
//!
//! Does not: pipeline one group's replication (openraft sends one RPC per target per group
//! at a time), or compress.

// openraft's error types are large; these signatures are openraft's, not ours.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
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

use crate::auth::{AuthError, PeerSecret};
use crate::error::ClusterError;
use crate::groups::METADATA_GROUP;
use crate::peer_connection::{Dialer, PeerLink};
use crate::placement::GroupId;
use crate::rpc::{self, Header, RemoteRefusal};
use crate::tls::{PeerTls, PeerTlsError};
use crate::types::{NodeId, TypeConfig};

type RpcResult<T, E = RaftError<NodeId>> = Result<T, RPCError<NodeId, BasicNode, E>>;

/// Most peers whose links a node keeps (one per member address it talks to); a link to
/// one more address is not pooled (it gets a connection of its own, closed after use).
pub const MAX_PEER_LINKS: usize = 1024;

/// The links of one node to its peers, by member address (host:port).
#[derive(Debug, Default)]
struct LinkPool {
    dialer: Dialer,
    links: Mutex<HashMap<String, Arc<PeerLink>>>,
}

impl LinkPool {
    fn link(&self, addr: &str) -> Arc<PeerLink> {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(link) = links.get(addr) {
            return Arc::clone(link);
        }
        let link = Arc::new(PeerLink::new(addr.to_owned(), self.dialer.clone()));
        if links.len() < MAX_PEER_LINKS {
            links.insert(addr.to_owned(), Arc::clone(&link));
        } else {
            tracing::debug!(
                peer = addr,
                limit = MAX_PEER_LINKS,
                "peer link not pooled (MAX_PEER_LINKS)"
            );
        }
        link
    }
}

/// Creates a [`PeerClient`] per target for one group; `BasicNode::addr` is the peer's
/// `host:port`. Clones and [`TcpNetwork::group`]s share the node's peer links.
#[derive(Debug, Clone)]
pub struct TcpNetwork {
    /// This node's id, reported in timeout errors.
    id: NodeId,
    /// The group whose RPCs this factory's clients send.
    group: GroupId,
    pool: Arc<LinkPool>,
}

impl TcpNetwork {
    /// The network of the metadata group ([`METADATA_GROUP`]), with links of its own.
    pub fn new(id: NodeId) -> TcpNetwork {
        TcpNetwork {
            id,
            group: METADATA_GROUP,
            pool: Arc::default(),
        }
    }

    /// Authenticates every connection with `secret` (peers must use the same one). Set it
    /// before deriving [`TcpNetwork::group`]s: it starts a new pool of links.
    pub fn with_secret(self, secret: Option<Arc<PeerSecret>>) -> TcpNetwork {
        let dialer = Dialer {
            secret,
            ..self.pool.dialer.clone()
        };
        self.with_dialer(dialer)
    }

    /// Wraps every connection in TLS with `tls` (peers must serve TLS from the same CA).
    /// Set it before deriving [`TcpNetwork::group`]s: it starts a new pool of links.
    pub fn with_tls(self, tls: Option<Arc<PeerTls>>) -> TcpNetwork {
        let dialer = Dialer {
            tls,
            ..self.pool.dialer.clone()
        };
        self.with_dialer(dialer)
    }

    /// Dials every peer through the simulated network `net`, as `from` (feature
    /// `sim-net`). Set it before deriving [`TcpNetwork::group`]s: it starts a new pool.
    #[cfg(feature = "sim-net")]
    pub fn with_sim(self, net: crate::sim_net::SimNet, from: std::net::SocketAddr) -> TcpNetwork {
        let dialer = Dialer {
            sim: Some((net, from)),
            ..self.pool.dialer.clone()
        };
        self.with_dialer(dialer)
    }

    fn with_dialer(mut self, dialer: Dialer) -> TcpNetwork {
        self.pool = Arc::new(LinkPool {
            dialer,
            links: Mutex::default(),
        });
        self
    }

    /// The network of group `group`, over the same peer links as this one.
    pub fn group(&self, group: GroupId) -> TcpNetwork {
        TcpNetwork {
            id: self.id,
            group,
            pool: Arc::clone(&self.pool),
        }
    }

    /// Connections this node's pooled links have established so far (one per peer while
    /// none breaks, however many groups).
    pub fn connections_opened(&self) -> u64 {
        let links = self.pool.links.lock().unwrap_or_else(|e| e.into_inner());
        links.values().map(|l| l.connections_opened()).sum()
    }
}

impl RaftNetworkFactory<TypeConfig> for TcpNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            id: self.id,
            target,
            group: self.group,
            link: self.pool.link(crate::identity::peer_addr(&node.addr)),
        }
    }
}

/// One group's client of one peer, over the node's shared link to it.
#[derive(Debug)]
pub struct PeerClient {
    id: NodeId,
    target: NodeId,
    group: GroupId,
    link: Arc<PeerLink>,
}

/// Why one call failed, before it becomes openraft's error (or, for a membership
/// request, the caller's).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerCallError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("connection to peer {addr} lost: {reason}")]
    ConnectionLost { addr: String, reason: String },
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("{limit} requests already in flight to peer {addr} (MAX_IN_FLIGHT_PER_PEER)")]
    TooManyInFlight { addr: String, limit: usize },
    #[error("TLS to peer {addr}: {source}")]
    Tls { addr: String, source: PeerTlsError },
    #[error("authenticating to peer {addr}: {source}")]
    Auth { addr: String, source: AuthError },
    #[error("peer {addr} answered kind {got:#x}, expected {expected:#x}")]
    UnexpectedReply { addr: String, expected: u8, got: u8 },
    #[error("peer {addr} answered for group {got}, asked for group {expected}")]
    WrongGroup {
        addr: String,
        expected: GroupId,
        got: GroupId,
    },
    #[error(transparent)]
    Decode(#[from] ClusterError),
    #[error(transparent)]
    Refused(RemoteRefusal),
}

impl TcpNetwork {
    /// A client for the peer at member address `addr` (node `target`), outside openraft:
    /// for the membership requests of `membership.rs`, on a connection of its own with no
    /// silence limit (a join waits for the joiner's catch-up, up to a minute).
    pub fn client(&self, target: NodeId, addr: &str) -> PeerClient {
        let addr = crate::identity::peer_addr(addr).to_string();
        PeerClient {
            id: self.id,
            target,
            group: METADATA_GROUP,
            link: Arc::new(PeerLink::patient(addr, self.pool.dialer.clone())),
        }
    }
}

impl TcpNetwork {
    /// A client of this group for the peer at member address `addr` (node `target`), over
    /// the pooled link to it: for the hibernate handshake and liveness pings.
    fn pooled(&self, target: NodeId, addr: &str) -> PeerClient {
        PeerClient {
            id: self.id,
            target,
            group: self.group,
            link: self.pool.link(crate::identity::peer_addr(addr)),
        }
    }

    /// One liveness heartbeat to the peer at member address `addr` (`KIND_PING`, on the
    /// node's shared connection to it, whatever this factory's group): `Ok` once it
    /// answered, within `timeout`.
    pub async fn ping(
        &self,
        target: NodeId,
        addr: &str,
        timeout: Duration,
    ) -> Result<(), PeerCallError> {
        let client = self.group(METADATA_GROUP).pooled(target, addr);
        let body = rpc::encode_empty(client.header());
        let option = RPCOption::new(timeout);
        let reply = client
            .call(rpc::KIND_PING, body, rpc::KIND_PONG, &option)
            .await?;
        Ok(rpc::decode_empty(reply, "pong")?)
    }

    /// Asks the peer at member address `addr` (node `target`) to stop its replica of this
    /// factory's group (`KIND_HIBERNATE`, `hibernate.rs`); the inner result is the peer's
    /// answer: stopped, or why not.
    pub async fn hibernate(
        &self,
        target: NodeId,
        addr: &str,
        request: &rpc::HibernateRequest,
        timeout: Duration,
    ) -> Result<Result<(), rpc::HibernateRefusal>, PeerCallError> {
        let client = self.pooled(target, addr);
        let body = rpc::encode_hibernate_request(client.header(), request);
        let option = RPCOption::new(timeout);
        let reply = client
            .call(
                rpc::KIND_HIBERNATE,
                body,
                rpc::KIND_HIBERNATE_REPLY,
                &option,
            )
            .await?;
        Ok(rpc::decode_hibernate_reply(reply)?)
    }
}

impl TcpNetwork {
    /// Asks the peer at member address `addr` (node `target`), a voter of this factory's
    /// group, to campaign now (`KIND_ELECT`, `host/handover.rs`); the inner result is its
    /// answer: campaigning, or why not.
    pub async fn elect(
        &self,
        target: NodeId,
        addr: &str,
        request: &crate::host::handover::ElectRequest,
        timeout: Duration,
    ) -> Result<Result<(), String>, PeerCallError> {
        let client = self.pooled(target, addr);
        let body = crate::host::handover::encode_request(client.header(), request);
        let option = RPCOption::new(timeout);
        let reply = client
            .call(rpc::KIND_ELECT, body, rpc::KIND_ELECT_REPLY, &option)
            .await?;
        Ok(crate::host::handover::decode_reply(reply)?)
    }
}

impl TcpNetwork {
    /// Asks the peer at member address `addr` (node `leader`), which leads this factory's
    /// group, to hand it over to `to` (`KIND_HAND_OVER`, `host/handover.rs`); the inner
    /// result is its answer: handed over, or why not.
    pub async fn ask_hand_over(
        &self,
        leader: NodeId,
        addr: &str,
        to: NodeId,
        timeout: Duration,
    ) -> Result<Result<(), String>, PeerCallError> {
        let client = self.pooled(leader, addr);
        let body = crate::host::handover::encode_ask(client.header(), to);
        let option = RPCOption::new(timeout);
        let reply = client
            .call(
                rpc::KIND_HAND_OVER,
                body,
                rpc::KIND_HAND_OVER_REPLY,
                &option,
            )
            .await?;
        Ok(crate::host::handover::decode_reply(reply)?)
    }
}

impl TcpNetwork {
    /// Forwards `payload` to the peer at member address `addr` (node `target`), which is
    /// to lead this factory's group (`KIND_PROPOSE`, `forward.rs`), on the node's shared
    /// connection to it. The inner result is the leader's answer: the committed position,
    /// or its typed refusal; the outer one, why no answer came (the outcome is then
    /// unknown unless the request never left).
    pub async fn forward_proposal(
        &self,
        target: NodeId,
        addr: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Result<crate::host::Position, crate::GroupError>, PeerCallError> {
        let client = self.pooled(target, addr);
        let body = crate::forward::encode_request(client.header(), payload)?;
        let option = RPCOption::new(timeout);
        let reply = client
            .call(rpc::KIND_PROPOSE, body, rpc::KIND_PROPOSE_REPLY, &option)
            .await?;
        Ok(crate::forward::decode_reply(reply)?)
    }

    /// Sends an application request (`app_request.rs`) to the peer at member address
    /// `addr` (node `target`) on the node's shared connection to it, and waits up to
    /// `timeout` (capped at [`crate::app_request::APP_TIMEOUT_MAX`]) for its handler's
    /// answer.
    pub async fn app_request(
        &self,
        target: NodeId,
        addr: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Bytes, crate::app_request::AppCallError> {
        use crate::app_request::{AppCallError, MAX_APP_PAYLOAD_BYTES};
        if payload.len() > MAX_APP_PAYLOAD_BYTES {
            return Err(AppCallError::TooLarge {
                len: payload.len(),
                max: MAX_APP_PAYLOAD_BYTES,
            });
        }
        let client = self.group(METADATA_GROUP).pooled(target, addr);
        let body = crate::app_request::encode_request(client.header(), payload)
            .map_err(PeerCallError::from)?;
        let option = RPCOption::new(timeout.min(crate::app_request::APP_TIMEOUT_MAX));
        let reply = client
            .call(rpc::KIND_APP, body, rpc::KIND_APP_REPLY, &option)
            .await?;
        crate::app_request::decode_reply(reply).map_err(PeerCallError::from)?
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
            .call(kind, body, rpc::KIND_MEMBERSHIP_REPLY, &option)
            .await?;
        Ok(rpc::decode_membership_reply(reply)?)
    }

    /// The header of this client's requests (the link stamps the request id).
    fn header(&self) -> Header {
        Header::request(self.group)
    }

    /// Sends one request and returns the body of its reply of kind `reply_kind`, within
    /// the RPC's hard TTL. Dropping the call (openraft times RPCs out itself) forgets the
    /// request: its late reply is discarded by the link, never read as another's.
    async fn call(
        &self,
        kind: u8,
        body: Vec<u8>,
        reply_kind: u8,
        option: &RPCOption,
    ) -> Result<Bytes, PeerCallError> {
        let ttl = option.hard_ttl();
        let (got, reply) = tokio::time::timeout(ttl, self.link.call(kind, body))
            .await
            .map_err(|_| PeerCallError::Timeout(ttl))??;
        let header = rpc::decode_header(&reply)?;
        if header.group != self.group {
            return Err(PeerCallError::WrongGroup {
                addr: self.link.addr().to_owned(),
                expected: self.group,
                got: header.group,
            });
        }
        if got == rpc::KIND_ERROR {
            return Err(PeerCallError::Refused(rpc::decode_refusal(reply)?));
        }
        if got != reply_kind {
            return Err(PeerCallError::UnexpectedReply {
                addr: self.link.addr().to_owned(),
                expected: reply_kind,
                got,
            });
        }
        Ok(reply)
    }

    /// openraft's error for a failed call; `Refused(SnapshotMismatch)` is handled by the
    /// snapshot RPC itself.
    fn rpc_error<E: std::error::Error>(
        &self,
        action: RPCTypes,
        e: PeerCallError,
    ) -> RPCError<NodeId, BasicNode, E> {
        match e {
            PeerCallError::Connect { .. }
            | PeerCallError::Tls { .. }
            | PeerCallError::Refused(RemoteRefusal::UnknownGroup(_)) => {
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
        let body = match rpc::encode_append_request(self.header(), &rpc) {
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
            .call(rpc::KIND_APPEND, body, rpc::KIND_APPEND_REPLY, &option)
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
        let body = rpc::encode_snapshot_request(self.header(), &rpc)
            .map_err(|e| self.rpc_error(action, e.into()))?;
        match self
            .call(rpc::KIND_SNAPSHOT, body, rpc::KIND_SNAPSHOT_REPLY, &option)
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
        let body = rpc::encode_vote_request(self.header(), &rpc);
        let reply = self
            .call(rpc::KIND_VOTE, body, rpc::KIND_VOTE_REPLY, &option)
            .await
            .map_err(|e| self.rpc_error(action, e))?;
        rpc::decode_vote_reply(reply).map_err(|e| self.rpc_error(action, e.into()))
    }
}
