//! The simulated network: openraft's `RaftNetworkFactory` delivering every RPC in-process
//! to the target's `Raft` handle, through faults drawn from the seeded generator.
//!
//! Per RPC: the target must be up and on the caller's side of the partition; the request
//! and the reply are each delayed (virtual time) and each lost with the current loss rate.
//! A lost request or reply is never answered: the caller sees openraft's `hard_ttl`
//! timeout, as it would on a real network. The partition is checked again when the reply
//! travels back, so a partition can cut an RPC in flight.
//!
//! Does not: reorder RPCs on one connection (openraft sends one at a time per target),
//! corrupt bytes, or serialize anything (the TCP codec has its own tests).

// openraft's error types are large; these signatures are openraft's, not ours.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use entrepot_cluster::{NodeId, TypeConfig};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode, Raft};

use crate::rng::Rng;

type RpcResult<T, E = RaftError<NodeId>> = Result<T, RPCError<NodeId, BasicNode, E>>;

/// The shared network of one simulated cluster; cheap to clone.
#[derive(Clone)]
pub struct Fabric {
    inner: Arc<Mutex<State>>,
}

struct State {
    rng: Rng,
    /// Nodes that are up, by id, with their incarnation (bumped by every start).
    nodes: BTreeMap<NodeId, (u64, Raft<TypeConfig>)>,
    incarnations: u64,
    /// Partition side of each node; nodes talk only to nodes on their side. Absent: side 0.
    side: BTreeMap<NodeId, u8>,
    /// Probability (per mille) that one request or one reply is lost.
    loss_per_mille: u64,
    /// One-way delay range, milliseconds.
    delay_ms: (u64, u64),
    /// A node that hears no replies (its requests still arrive): scripted scenarios.
    deaf: Option<NodeId>,
    /// Extra one-way delay of appends that carry entries (heartbeats and probes go at the
    /// normal pace): scripted scenarios.
    entries_delay: Duration,
    /// Extra one-way delay of every RPC to or from a node: scripted scenarios.
    slow: BTreeMap<NodeId, Duration>,
    stats: Stats,
}

/// What the network did during a run.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub delivered: u64,
    pub lost: u64,
    pub refused: u64,
}

/// What happens to one RPC, drawn when it is sent.
enum Plan {
    /// Target down or on the other side: refused at once.
    Refused,
    Send {
        raft: Raft<TypeConfig>,
        there: Duration,
        back: Duration,
        request_lost: bool,
        reply_lost: bool,
    },
}

impl Fabric {
    pub fn new(rng: Rng) -> Fabric {
        Fabric {
            inner: Arc::new(Mutex::new(State {
                rng,
                nodes: BTreeMap::new(),
                incarnations: 0,
                side: BTreeMap::new(),
                loss_per_mille: 0,
                delay_ms: (0, 2),
                deaf: None,
                entries_delay: Duration::ZERO,
                slow: BTreeMap::new(),
                stats: Stats::default(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The network of a new incarnation of node `id` (what its `Raft` sends through).
    /// Only the incarnation last attached may send: tasks of a crashed one are silent.
    pub fn endpoint(&self, id: NodeId) -> Endpoint {
        let mut s = self.lock();
        s.incarnations += 1;
        Endpoint {
            id,
            incarnation: s.incarnations,
            fabric: self.clone(),
        }
    }

    pub fn attach(&self, endpoint: &Endpoint, raft: Raft<TypeConfig>) {
        self.lock()
            .nodes
            .insert(endpoint.id, (endpoint.incarnation, raft));
    }

    pub fn detach(&self, id: NodeId) {
        self.lock().nodes.remove(&id);
    }

    /// Puts each node on a side; only nodes on the same side reach each other.
    pub fn partition(&self, side: BTreeMap<NodeId, u8>) {
        self.lock().side = side;
    }

    pub fn set_loss(&self, per_mille: u64) {
        self.lock().loss_per_mille = per_mille;
    }

    pub fn set_delay(&self, lo_ms: u64, hi_ms: u64) {
        self.lock().delay_ms = (lo_ms, hi_ms);
    }

    /// No partition, no loss, short delays.
    pub fn heal(&self) {
        let mut s = self.lock();
        s.side.clear();
        s.loss_per_mille = 0;
        s.delay_ms = (0, 2);
    }

    /// Loses every reply to `id` (`None`: none), so its followers store what it sends
    /// while it never learns they did.
    pub fn set_deaf(&self, id: Option<NodeId>) {
        self.lock().deaf = id;
    }

    /// Delays every append that carries entries by `extra` more, each way.
    pub fn set_entries_delay(&self, extra: Duration) {
        self.lock().entries_delay = extra;
    }

    /// Slows every RPC to or from `id` by `extra` more, each way (zero: normal again).
    pub fn set_slow(&self, id: NodeId, extra: Duration) {
        self.lock().slow.insert(id, extra);
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats
    }

    fn connected(s: &State, a: NodeId, b: NodeId) -> bool {
        s.side.get(&a).copied().unwrap_or(0) == s.side.get(&b).copied().unwrap_or(0)
    }

    fn alive(s: &State, id: NodeId, incarnation: u64) -> bool {
        s.nodes.get(&id).is_some_and(|(i, _)| *i == incarnation)
    }

    fn plan(&self, from: NodeId, incarnation: u64, to: NodeId, entries: bool) -> Plan {
        let mut s = self.lock();
        let raft = match s.nodes.get(&to) {
            Some((_, r)) if Self::connected(&s, from, to) && Self::alive(&s, from, incarnation) => {
                r.clone()
            }
            _ => {
                s.stats.refused += 1;
                return Plan::Refused;
            }
        };
        let (lo, hi) = s.delay_ms;
        let loss = s.loss_per_mille;
        let slow = |n: NodeId| s.slow.get(&n).copied().unwrap_or_default();
        let extra = slow(from).max(slow(to))
            + if entries {
                s.entries_delay
            } else {
                Duration::ZERO
            };
        let there = Duration::from_millis(s.rng.between(lo, hi)) + extra;
        let back = Duration::from_millis(s.rng.between(lo, hi)) + extra;
        let request_lost = s.rng.chance(loss);
        let reply_lost = s.rng.chance(loss);
        Plan::Send {
            raft,
            there,
            back,
            request_lost,
            reply_lost,
        }
    }

    /// After the target answered: can the reply reach the caller?
    fn reply_reaches(&self, from: NodeId, incarnation: u64, to: NodeId, lost: bool) -> bool {
        let mut s = self.lock();
        let ok = !lost
            && s.deaf != Some(from)
            && Self::alive(&s, from, incarnation)
            && Self::connected(&s, from, to);
        if ok {
            s.stats.delivered += 1;
        } else {
            s.stats.lost += 1;
        }
        ok
    }

    fn count_lost(&self) {
        self.lock().stats.lost += 1;
    }
}

/// One node's side of the fabric: its `RaftNetworkFactory` and, per target, its client.
#[derive(Clone)]
pub struct Endpoint {
    id: NodeId,
    incarnation: u64,
    fabric: Fabric,
}

/// A connection from one node to another.
pub struct Link {
    from: NodeId,
    incarnation: u64,
    to: NodeId,
    fabric: Fabric,
}

impl RaftNetworkFactory<TypeConfig> for Endpoint {
    type Network = Link;
    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Link {
        Link {
            from: self.id,
            incarnation: self.incarnation,
            to: target,
            fabric: self.fabric.clone(),
        }
    }
}

impl Link {
    /// Sends one RPC through the fabric; `handle` runs it on the target.
    async fn call<Resp, E, F, Fut>(
        &self,
        action: RPCTypes,
        entries: bool,
        option: &RPCOption,
        handle: F,
    ) -> RpcResult<Resp, RaftError<NodeId, E>>
    where
        E: std::error::Error,
        F: FnOnce(Raft<TypeConfig>) -> Fut,
        Fut: Future<Output = Result<Resp, RaftError<NodeId, E>>>,
    {
        let (raft, there, back, request_lost, reply_lost) =
            match self
                .fabric
                .plan(self.from, self.incarnation, self.to, entries)
            {
                Plan::Refused => {
                    let e = AnyError::error(format!("node {} unreachable", self.to));
                    return Err(RPCError::Unreachable(Unreachable::new(&e)));
                }
                Plan::Send {
                    raft,
                    there,
                    back,
                    request_lost,
                    reply_lost,
                } => (raft, there, back, request_lost, reply_lost),
            };
        let ttl = option.hard_ttl();
        let exchange = async {
            tokio::time::sleep(there).await;
            if request_lost {
                self.fabric.count_lost();
                return std::future::pending().await;
            }
            let answer = handle(raft).await;
            tokio::time::sleep(back).await;
            if !self
                .fabric
                .reply_reaches(self.from, self.incarnation, self.to, reply_lost)
            {
                return std::future::pending().await;
            }
            answer.map_err(|e| match e {
                RaftError::Fatal(f) => RPCError::Network(NetworkError::new(&f)),
                api => RPCError::RemoteError(RemoteError::new(self.to, api)),
            })
        };
        match tokio::time::timeout(ttl, exchange).await {
            Ok(r) => r,
            Err(_) => Err(RPCError::Timeout(Timeout {
                action,
                id: self.from,
                target: self.to,
                timeout: ttl,
            })),
        }
    }
}

impl RaftNetwork<TypeConfig> for Link {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let entries = !rpc.entries.is_empty();
        self.call(
            RPCTypes::AppendEntries,
            entries,
            &option,
            |raft| async move { raft.append_entries(rpc).await },
        )
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        self.call(
            RPCTypes::InstallSnapshot,
            true,
            &option,
            |raft| async move { raft.install_snapshot(rpc).await },
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        self.call(RPCTypes::Vote, false, &option, |raft| async move {
            raft.vote(rpc).await
        })
        .await
    }
}
