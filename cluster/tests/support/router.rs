//! An in-process Raft network for the cluster crate's own tests and benches: a call goes
//! straight to the target replica's `Raft` (no sockets, no encoding). Replicas are keyed by
//! (group, node), so one router carries many Raft groups; [`Router::group`] gives the
//! network factory of one of them. A replica removed from the router is "down": calls to
//! it fail with a network error, as to a crashed node.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use entrepot_cluster::{NodeId, TypeConfig};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode, Raft};

type Replicas = Arc<Mutex<BTreeMap<(u32, NodeId), Raft<TypeConfig>>>>;
type RpcResult<T, E = RaftError<NodeId>> = Result<T, RPCError<NodeId, BasicNode, E>>;

/// The network of group `group` (group 0 for a single-group test); clones share the
/// replicas of every group.
#[derive(Clone, Default)]
pub struct Router {
    group: u32,
    replicas: Replicas,
}

impl Router {
    /// The network of another group over the same replicas.
    pub fn group(&self, group: u32) -> Router {
        Router {
            group,
            replicas: Arc::clone(&self.replicas),
        }
    }

    /// Makes node `id` of this group reachable.
    pub fn add(&self, id: NodeId, raft: Raft<TypeConfig>) {
        self.lock().insert((self.group, id), raft);
    }

    /// Makes node `id` of this group unreachable ("killed").
    pub fn remove(&self, id: NodeId) -> Option<Raft<TypeConfig>> {
        self.lock().remove(&(self.group, id))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(u32, NodeId), Raft<TypeConfig>>> {
        self.replicas.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A client of one replica.
pub struct Connection {
    target: NodeId,
    router: Router,
}

impl Connection {
    fn raft(&self) -> Option<Raft<TypeConfig>> {
        self.router
            .lock()
            .get(&(self.router.group, self.target))
            .cloned()
    }
}

fn down<E: std::error::Error>(target: NodeId) -> RPCError<NodeId, BasicNode, E> {
    RPCError::Network(NetworkError::new(&AnyError::error(format!(
        "node {target} is down"
    ))))
}

impl RaftNetworkFactory<TypeConfig> for Router {
    type Network = Connection;
    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Connection {
        Connection {
            target,
            router: self.clone(),
        }
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let raft = self.raft().ok_or_else(|| down(self.target))?;
        raft.append_entries(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        let raft = self.raft().ok_or_else(|| down(self.target))?;
        raft.install_snapshot(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let raft = self.raft().ok_or_else(|| down(self.target))?;
        raft.vote(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}
