//! The server side of the inter-node port: accepts peer connections and hands each RPC
//! to the local `Raft` of the group it names, from a [`GroupRegistry`].
//!
//! One task accepts; one task per connection reads request frames and serves them
//! *concurrently* — each request in a task of its own, up to
//! [`MAX_CONCURRENT_REQUESTS_PER_CONNECTION`] at once (past it the connection is not read
//! until one finishes, so TCP pushes back on the peer) — and one writer sends the replies
//! in the order they are ready, each carrying its request's id (`rpc.rs`). A slow group (a
//! long fsync, a snapshot being installed) therefore never holds back the heartbeats of
//! the other groups sharing the connection. Connections are capped by
//! [`MAX_PEER_CONNECTIONS`].
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
//!   every connection task and every request task (they live in its `JoinSet`s): the port
//!   closes and peers see their connections reset, exactly as if the node had died.
//! * A request that does not decode (unknown kind or version, bad length or count) closes
//!   its connection; nothing undecoded reaches Raft. Requests already running on it are
//!   abandoned with it (their peer's calls fail and are retried on a new connection).
//! * A request for a group the registry does not hold is answered with
//!   [`RemoteRefusal::UnknownGroup`]; the connection stays open.
//! * A Raft RPC for a group *stopped* here (hibernated, `hibernate.rs`) wakes it first
//!   (`GroupRegistry::wake`, bounded by `WAKE_TIMEOUT`, in the request's own task, so
//!   other groups' requests on the connection go on meanwhile); a wake that fails is
//!   answered `Unavailable` naming why. One exception: a heartbeat of the very leader,
//!   term and last log id the group stopped with (no entries, same commit) is answered
//!   `Success` without waking — what the running replica would have answered, from state
//!   that cannot change while it is stopped — so a heartbeat still in flight when the
//!   group hibernated does not wake it again.
//! * The group is looked up when its frame is read, so requests of one connection see
//!   the registry in the order they were sent (a heartbeat sent before a hibernate
//!   request meets the running instance).
//! * `KIND_PING` (the per-peer liveness heartbeat) is answered with `KIND_PONG` and
//!   touches no group.
//! * `KIND_PROPOSE` (a proposal a peer forwards to this node as the group's leader,
//!   `forward.rs`) goes to the registry's proposer — the host's group handle, which
//!   refuses it `NotLeader` where this node does not lead; without a proposer, or for a
//!   group not open here, it is answered unknown group.
//! * `KIND_ELECT` (a leader handing its group over asks this voter to campaign,
//!   `host/handover.rs`) meets the group's Raft like a vote request; the replica checks
//!   it still follows that leader in that term and holds its last index before it does.
//!
//! Besides openraft's RPCs it serves the membership requests of `membership.rs` (a node
//! joining or leaving, always the metadata group's), behind the same TLS and secret
//! handshakes, and it remembers, per group, the leader's commit index carried by the last
//! `append_entries` it received ([`HeardCommit`]): openraft 0.9's metrics do not show a
//! follower how far the leader has committed, and readiness (`/readyz`) compares its
//! applied index with that.
//!
//! Does not: serve clients (AMQP is the broker's port), or start or stop groups (the
//! registry's owner does).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::Raft;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::auth::{server_handshake, AuthError, PeerSecret, KIND_HELLO};
use crate::error::Result;
use crate::frame::{read_frame, write_frame};
use crate::groups::{GroupRegistry, HeardCommit, HostedGroup, Lookup, Stopped, METADATA_GROUP};
use crate::rpc::{self, Header, HibernateRequest, MembershipRequest, RemoteRefusal};
use crate::stream::PeerStream;
use crate::tls::PeerTls;
use crate::types::{NodeId, TypeConfig};

/// Most peer connections served at once: one per peer node (every group shares it), plus
/// membership requests and reconnections, for clusters far larger than any we run.
pub const MAX_PEER_CONNECTIONS: usize = 256;
/// Most requests of one connection served at once. Openraft keeps at most one
/// replication RPC per (group, target) in flight, plus votes; past this the server stops
/// reading the connection until a request finishes.
pub const MAX_CONCURRENT_REQUESTS_PER_CONNECTION: usize = 4096;
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

/// A running inter-node server; the port stays open until it is shut down or dropped.
#[derive(Debug)]
pub struct PeerServer {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
    groups: GroupRegistry,
    /// The metadata group's, when the server was started with one `Raft`.
    heard_commit: HeardCommit,
    /// Connections accepted since the start (TCP, before any handshake).
    accepted: Arc<AtomicU64>,
    /// Bumped to close every open connection ([`PeerServer::drop_connections`]).
    generation: watch::Sender<u64>,
}

impl PeerServer {
    /// Serves `raft` as the metadata group ([`METADATA_GROUP`]) on an already-bound
    /// listener (bind to port 0 in tests, then share [`PeerServer::local_addr`]).
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
        let groups = GroupRegistry::new();
        let heard_commit = groups
            .insert(METADATA_GROUP, raft)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let mut server = PeerServer::serve(listener, groups, options)?;
        server.heard_commit = heard_commit;
        Ok(server)
    }

    /// Serves every group of `groups` (which may gain and lose groups while it runs),
    /// admitting peers as `options` say.
    pub fn serve(
        listener: impl Into<PeerListener>,
        groups: GroupRegistry,
        options: PeerServerOptions,
    ) -> io::Result<PeerServer> {
        let listener = listener.into();
        let local_addr = listener.local_addr()?;
        let heard_commit = groups.heard_commit(METADATA_GROUP).unwrap_or_default();
        let accepted = Arc::new(AtomicU64::new(0));
        let (generation, _) = watch::channel(0);
        let shared = Shared {
            groups: groups.clone(),
            options,
            accepted: Arc::clone(&accepted),
            generation: generation.subscribe(),
        };
        let task = tokio::spawn(accept_loop(listener, shared));
        Ok(PeerServer {
            local_addr,
            task,
            groups,
            heard_commit,
            accepted,
            generation,
        })
    }

    /// The metadata group's commit index as last heard in an `append_entries` (for a
    /// server [`PeerServer::serve`]d without that group at the start: never updated; ask
    /// [`GroupRegistry::heard_commit`] instead).
    pub fn heard_commit(&self) -> HeardCommit {
        self.heard_commit.clone()
    }

    /// The groups this server dispatches to.
    pub fn groups(&self) -> &GroupRegistry {
        &self.groups
    }

    /// Connections accepted since the start, counted before any handshake: with every
    /// group sharing one connection per peer, a node with `n` peers accepts `n` as long as
    /// none breaks.
    pub fn connections_accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Closes every open connection (the port stays open; peers reconnect on their next
    /// RPC), e.g. to make peers present new certificates.
    pub fn drop_connections(&self) {
        self.generation.send_modify(|g| *g += 1);
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

/// What every connection task gets.
#[derive(Clone)]
struct Shared {
    groups: GroupRegistry,
    options: PeerServerOptions,
    accepted: Arc<AtomicU64>,
    generation: watch::Receiver<u64>,
}

/// Where the peer port takes connections: a TCP listener, or (feature `sim-net`) the
/// simulated network's.
#[derive(Debug)]
pub enum PeerListener {
    Tcp(TcpListener),
    #[cfg(feature = "sim-net")]
    Sim(crate::sim_net::SimListener),
}

impl From<TcpListener> for PeerListener {
    fn from(l: TcpListener) -> PeerListener {
        PeerListener::Tcp(l)
    }
}

#[cfg(feature = "sim-net")]
impl From<crate::sim_net::SimListener> for PeerListener {
    fn from(l: crate::sim_net::SimListener) -> PeerListener {
        PeerListener::Sim(l)
    }
}

/// One accepted connection, before any handshake.
enum Incoming {
    Tcp(TcpStream),
    #[cfg(feature = "sim-net")]
    Sim(tokio::io::DuplexStream, SocketAddr),
}

impl PeerListener {
    /// The address peers dial.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            PeerListener::Tcp(l) => l.local_addr(),
            #[cfg(feature = "sim-net")]
            PeerListener::Sim(l) => Ok(l.local_addr()),
        }
    }

    async fn accept(&mut self) -> io::Result<Incoming> {
        match self {
            PeerListener::Tcp(l) => {
                let (stream, _) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok(Incoming::Tcp(stream))
            }
            #[cfg(feature = "sim-net")]
            PeerListener::Sim(l) => match l.accept().await {
                Some((stream, from)) => Ok(Incoming::Sim(stream, from)),
                // The switch let go of this address: nothing more will come.
                None => std::future::pending().await,
            },
        }
    }
}

async fn accept_loop(mut listener: PeerListener, shared: Shared) {
    let limit = Arc::new(Semaphore::new(MAX_PEER_CONNECTIONS));
    // Owning the connection tasks here means aborting this task aborts them all.
    let mut connections = JoinSet::new();
    loop {
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "inter-node accept failed");
                tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let mut generation = shared.generation.clone();
        generation.mark_unchanged();
        let connection = serve_connection(stream, shared.clone(), permit);
        connections.spawn(async move {
            tokio::select! {
                () = connection => {}
                _ = generation.changed() => {}
            }
        });
        while connections.try_join_next().is_some() {}
    }
}

async fn serve_connection(incoming: Incoming, shared: Shared, _permit: OwnedSemaphorePermit) {
    let admitted = match incoming {
        Incoming::Tcp(tcp) => {
            let peer = tcp.peer_addr().ok();
            admit(tcp, peer, &shared.options).await.map(|s| (s, peer))
        }
        #[cfg(feature = "sim-net")]
        Incoming::Sim(stream, from) => admit_simulated(stream, from, &shared.options).await,
    };
    let Some((stream, peer)) = admitted else {
        return;
    };
    let (rd, wr) = tokio::io::split(stream);
    let (replies, outgoing) = mpsc::channel(MAX_CONCURRENT_REQUESTS_PER_CONNECTION);
    // Request tasks live here: ending the connection aborts them.
    let mut requests = JoinSet::new();
    tokio::select! {
        () = read_requests(rd, peer, &shared.groups, replies, &mut requests) => {}
        () = write_replies(wr, outgoing) => {}
    }
}

/// The TLS and secret handshakes as the options ask; `None`: the peer is refused (logged).
async fn admit(
    tcp: TcpStream,
    peer: Option<SocketAddr>,
    options: &PeerServerOptions,
) -> Option<PeerStream> {
    let stream = match &options.tls {
        None => PeerStream::Plain(tcp),
        Some(tls) => match tls.accept(tcp).await {
            Ok(s) => s.into(),
            // A dialer giving up mid-handshake is not an attack: no warning storm.
            Err(e) if e.is_peer_gone() => {
                tracing::debug!(?peer, error = %e, "inter-node peer went away during the TLS handshake");
                return None;
            }
            Err(e) => {
                tracing::warn!(?peer, error = %e, "inter-node peer refused: TLS handshake failed");
                return None;
            }
        },
    };
    authenticate(stream, peer, options).await
}

/// A simulated connection: no TLS (a configuration asking for it is refused), then the
/// secret handshake as configured.
#[cfg(feature = "sim-net")]
async fn admit_simulated(
    stream: tokio::io::DuplexStream,
    from: SocketAddr,
    options: &PeerServerOptions,
) -> Option<(PeerStream, Option<SocketAddr>)> {
    if options.tls.is_some() {
        tracing::warn!(peer = %from, "simulated inter-node connection refused: TLS is not simulated");
        return None;
    }
    let peer = Some(from);
    authenticate(PeerStream::Sim(stream), peer, options)
        .await
        .map(|s| (s, peer))
}

/// The secret handshake when one is configured.
async fn authenticate(
    mut stream: PeerStream,
    peer: Option<SocketAddr>,
    options: &PeerServerOptions,
) -> Option<PeerStream> {
    let Some(secret) = &options.secret else {
        return Some(stream);
    };
    let handshake = async {
        let first = read_frame(&mut stream).await?.ok_or(AuthError::Closed)?;
        server_handshake(&mut stream, secret, first).await
    };
    match tokio::time::timeout(PEER_AUTH_TIMEOUT, handshake).await {
        Ok(Ok(())) => Some(stream),
        // A flaky network or a peer going away is not an attack: no warning storm.
        Ok(Err(AuthError::Io(e))) => {
            tracing::debug!(?peer, error = %e, "inter-node handshake interrupted");
            None
        }
        Ok(Err(AuthError::Closed)) => {
            tracing::debug!(?peer, "inter-node peer closed during the handshake");
            None
        }
        Ok(Err(e)) => {
            tracing::warn!(?peer, error = %e, "inter-node peer refused: authentication failed");
            // Not about one request: the whole connection's refusal.
            let refusal = RemoteRefusal::Unavailable(format!("authentication failed: {e}"));
            let header = Header::request(METADATA_GROUP);
            let body = rpc::encode_refusal(header, &refusal);
            let _ = write_frame(&mut stream, rpc::KIND_ERROR, &body).await;
            None
        }
        Err(_) => {
            tracing::info!(?peer, timeout = ?PEER_AUTH_TIMEOUT, "inter-node peer refused: no authentication in time (PEER_AUTH_TIMEOUT)");
            None
        }
    }
}

/// Reads requests until the connection ends or one does not decode, each served in a task
/// of its own in `requests`, at most [`MAX_CONCURRENT_REQUESTS_PER_CONNECTION`] at once.
async fn read_requests(
    mut rd: ReadHalf<PeerStream>,
    peer: Option<SocketAddr>,
    groups: &GroupRegistry,
    replies: mpsc::Sender<(u8, Vec<u8>)>,
    requests: &mut JoinSet<()>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS_PER_CONNECTION));
    loop {
        // Never closed; waiting here is the backpressure on a peer past the limit.
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            return;
        };
        let (kind, body) = match read_frame(&mut rd).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(?peer, error = %e, "inter-node connection read failed");
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
        let (header, request) = match decode_request(kind, body) {
            Ok(decoded) => decoded,
            Err(e) => {
                tracing::warn!(?peer, error = %e, kind, "undecodable inter-node request; closing");
                return;
            }
        };
        let found = match request {
            Inbound::Ping | Inbound::Propose(_) | Inbound::App(_) | Inbound::HandOver(_) => {
                Lookup::Unknown
            }
            _ => groups.lookup(header.group),
        };
        let replies = replies.clone();
        let groups = groups.clone();
        requests.spawn(async move {
            let reply = dispatch(&groups, found, header, request).await;
            // The writer is gone only when the connection is.
            let _ = replies.send(reply).await;
            drop(permit);
        });
        while requests.try_join_next().is_some() {}
    }
}

/// Writes replies as they become ready, until the connection fails or ends.
async fn write_replies(mut wr: WriteHalf<PeerStream>, mut outgoing: mpsc::Receiver<(u8, Vec<u8>)>) {
    while let Some((kind, body)) = outgoing.recv().await {
        if let Err(e) = write_frame(&mut wr, kind, &body).await {
            tracing::debug!(error = %e, "inter-node connection write failed");
            return;
        }
    }
}

/// A decoded request, before it meets its group.
enum Inbound {
    Vote(VoteRequest<NodeId>),
    Append(AppendEntriesRequest<TypeConfig>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    Membership(MembershipRequest),
    Hibernate(HibernateRequest),
    Ping,
    /// A proposal forwarded to this node as its group's leader (`forward.rs`).
    Propose(Bytes),
    /// An application request for the broker's handler (`app_request.rs`).
    App(Bytes),
    /// A leader handing its group over asks this voter to campaign (`host/handover.rs`).
    Elect(crate::host::handover::ElectRequest),
    /// A voter asks this node, its group's leader, to hand the group over to it.
    HandOver(NodeId),
}

/// Decodes a whole request frame: header and body.
fn decode_request(kind: u8, body: Bytes) -> Result<(Header, Inbound)> {
    let header = rpc::decode_header(&body)?;
    if header.request_id == rpc::CONNECTION_REQUEST_ID {
        return Err(crate::error::ClusterError::Decode {
            what: "inter-node request",
            position: 1,
            reason: "request id 0 is reserved for the connection",
        });
    }
    let inbound = match kind {
        rpc::KIND_VOTE => Inbound::Vote(rpc::decode_vote_request(body)?),
        rpc::KIND_APPEND => Inbound::Append(rpc::decode_append_request(body)?),
        rpc::KIND_SNAPSHOT => Inbound::Snapshot(rpc::decode_snapshot_request(body)?),
        rpc::KIND_JOIN | rpc::KIND_LEAVE if header.group == METADATA_GROUP => {
            Inbound::Membership(rpc::decode_membership_request(kind, body)?)
        }
        rpc::KIND_HIBERNATE => Inbound::Hibernate(rpc::decode_hibernate_request(body)?),
        rpc::KIND_PING => {
            rpc::decode_empty(body, "ping")?;
            Inbound::Ping
        }
        rpc::KIND_PROPOSE => Inbound::Propose(crate::forward::decode_request(body)?),
        rpc::KIND_APP => Inbound::App(crate::app_request::decode_request(body)?),
        rpc::KIND_ELECT => Inbound::Elect(crate::host::handover::decode_request(body)?),
        rpc::KIND_HAND_OVER => Inbound::HandOver(crate::host::handover::decode_ask(body)?),
        _ => {
            return Err(crate::error::ClusterError::Decode {
                what: "inter-node frame",
                position: 4,
                reason: "unknown request kind (or membership outside the metadata group)",
            })
        }
    };
    Ok((header, inbound))
}

/// Asks the group's Raft (woken first if stopped) and encodes the reply (or a refusal)
/// under the request's header.
async fn dispatch(
    groups: &GroupRegistry,
    found: Lookup,
    h: Header,
    request: Inbound,
) -> (u8, Vec<u8>) {
    let unknown = || {
        let refusal = RemoteRefusal::UnknownGroup(h.group);
        (rpc::KIND_ERROR, rpc::encode_refusal(h, &refusal))
    };
    let request = match request {
        Inbound::Ping => return (rpc::KIND_PONG, rpc::encode_empty(h)),
        Inbound::Hibernate(r) => {
            groups.count_group_rpc();
            return crate::hibernate::serve_request(groups, h, r).await;
        }
        // Submitted through the host's handle, which wakes a stopped group itself.
        Inbound::Propose(payload) => {
            let served = match groups.forwarded() {
                Some(server) => server.serve(h, payload).await,
                None => None,
            };
            return served.unwrap_or_else(unknown);
        }
        Inbound::HandOver(to) => {
            let answer = match groups.hand_over_handler() {
                Some(handler) => handler.hand_over(h.group, to).await,
                None => Err("this node serves no hand-over requests".to_owned()),
            };
            let body = crate::host::handover::encode_reply(h, &answer);
            return (rpc::KIND_HAND_OVER_REPLY, body);
        }
        Inbound::App(payload) => {
            return match groups.app_server() {
                Some(server) => server.serve(h, payload).await,
                None => crate::app_request::no_handler(h),
            };
        }
        other => other,
    };
    groups.count_group_rpc();
    let HostedGroup { raft, heard_commit } = match found {
        Lookup::Unknown => return unknown(),
        Lookup::Running(hosted) => hosted,
        Lookup::Stopped(stopped) => {
            if let Inbound::Append(a) = &request {
                if is_heartbeat_of(&stopped, a) {
                    let ok = openraft::raft::AppendEntriesResponse::Success;
                    return (rpc::KIND_APPEND_REPLY, rpc::encode_append_reply(h, &ok));
                }
            }
            match groups.wake_hosted(h.group).await {
                Ok((hosted, _)) => hosted,
                Err(crate::ClusterError::UnknownGroup { .. }) => return unknown(),
                Err(e) => return refusal(h, &e),
            }
        }
    };
    match request {
        Inbound::Ping
        | Inbound::Hibernate(_)
        | Inbound::Propose(_)
        | Inbound::App(_)
        | Inbound::HandOver(_) => unknown(),
        Inbound::Vote(v) => match raft.vote(v).await {
            Ok(r) => (rpc::KIND_VOTE_REPLY, rpc::encode_vote_reply(h, &r)),
            Err(e) => refusal(h, &e),
        },
        Inbound::Append(a) => {
            let commit = a.leader_commit.map(|l| l.index);
            match raft.append_entries(a).await {
                Ok(r) => {
                    // Any leader this node accepts as current (not a deposed one's).
                    let current =
                        !matches!(r, openraft::raft::AppendEntriesResponse::HigherVote(_));
                    if let (Some(index), true) = (commit, current) {
                        heard_commit.record(index);
                    }
                    (rpc::KIND_APPEND_REPLY, rpc::encode_append_reply(h, &r))
                }
                Err(e) => refusal(h, &e),
            }
        }
        Inbound::Elect(e) => {
            let reply = crate::host::handover::serve(&raft, e).await;
            let body = crate::host::handover::encode_reply(h, &reply);
            (rpc::KIND_ELECT_REPLY, body)
        }
        Inbound::Membership(m) => {
            let reply = crate::membership::serve(&raft, m).await;
            let body = rpc::encode_membership_reply(h, &reply);
            (rpc::KIND_MEMBERSHIP_REPLY, body)
        }
        Inbound::Snapshot(s) => match raft.install_snapshot(s).await {
            Ok(r) => (rpc::KIND_SNAPSHOT_REPLY, rpc::encode_snapshot_reply(h, &r)),
            Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m))) => (
                rpc::KIND_ERROR,
                rpc::encode_refusal(h, &RemoteRefusal::SnapshotMismatch(m)),
            ),
            Err(e) => refusal(h, &e),
        },
    }
}

/// Whether `a` is a heartbeat of the leader, term and last log id `stopped` holds: no
/// entries, nothing new committed — what the stopped replica answers `Success` to
/// without waking.
fn is_heartbeat_of(stopped: &Stopped, a: &AppendEntriesRequest<TypeConfig>) -> bool {
    a.entries.is_empty()
        && a.vote.committed
        && stopped.leader == Some(a.vote.leader_id.node_id)
        && stopped.term == a.vote.leader_id.term
        && stopped.last_log_id.is_some()
        && a.prev_log_id == stopped.last_log_id
        && a.leader_commit == stopped.last_log_id
}

/// The local Raft could not answer (it is stopping or hit a fatal error).
fn refusal(h: Header, e: &dyn std::error::Error) -> (u8, Vec<u8>) {
    let r = RemoteRefusal::Unavailable(e.to_string());
    (rpc::KIND_ERROR, rpc::encode_refusal(h, &r))
}
