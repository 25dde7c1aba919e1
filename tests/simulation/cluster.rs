//! The simulated cluster: N nodes in temporary directories on one [`Fabric`], and the
//! operations the fault schedule uses (crash, restart, wait for convergence).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use entrepot_cluster::NodeId;
use openraft::{BasicNode, ServerState};

use crate::fabric::Fabric;
use crate::node::{self, Counters, Leader, Running, Snapshots};

/// The nodes of one run; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    pub fabric: Fabric,
    pub ids: Vec<NodeId>,
    /// What every node's snapshots did, over all incarnations.
    pub counters: Arc<Counters>,
    config: Arc<openraft::Config>,
    dirs: BTreeMap<NodeId, PathBuf>,
    nodes: Arc<Mutex<BTreeMap<NodeId, Running>>>,
}

impl Cluster {
    /// Starts `n` nodes under `root` that never snapshot and forms the cluster from node 0.
    pub async fn form(n: u64, root: &std::path::Path, fabric: Fabric) -> Cluster {
        Cluster::form_with(n, root, fabric, Snapshots::Never).await
    }

    /// Starts `n` nodes under `root` and forms the cluster from node 0.
    pub async fn form_with(
        n: u64,
        root: &std::path::Path,
        fabric: Fabric,
        snapshots: Snapshots,
    ) -> Cluster {
        let ids: Vec<NodeId> = (0..n).collect();
        let dirs: BTreeMap<NodeId, PathBuf> = ids
            .iter()
            .map(|id| (*id, root.join(format!("node-{id}"))))
            .collect();
        let cluster = Cluster {
            fabric,
            ids: ids.clone(),
            counters: Arc::default(),
            config: node::raft_config(snapshots),
            dirs,
            nodes: Arc::default(),
        };
        for id in &ids {
            cluster.restart(*id).await.expect("a new node starts");
        }
        let members: BTreeMap<NodeId, BasicNode> = ids
            .iter()
            .map(|id| (*id, BasicNode::new(format!("sim-{id}"))))
            .collect();
        let first = cluster.lock()[&0].raft.clone();
        first.initialize(members).await.expect("initialize");
        cluster
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<NodeId, Running>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn up(&self) -> Vec<NodeId> {
        self.lock().keys().copied().collect()
    }

    pub fn down(&self) -> Vec<NodeId> {
        let up = self.lock();
        self.ids
            .iter()
            .copied()
            .filter(|id| !up.contains_key(id))
            .collect()
    }

    /// Every node whose broker is active (more than one while an old leader is cut off).
    pub fn leaders(&self) -> Vec<Arc<Leader>> {
        self.lock().values().filter_map(|r| r.active()).collect()
    }

    /// Node `id`'s active broker as it changes (`None` while it does not lead or is down).
    pub fn leader_watch(
        &self,
        id: NodeId,
    ) -> Option<tokio::sync::watch::Receiver<Option<Arc<Leader>>>> {
        self.lock().get(&id).map(|r| r.leader.clone())
    }

    pub fn raft(&self, id: NodeId) -> Option<openraft::Raft<entrepot_cluster::TypeConfig>> {
        self.lock().get(&id).map(|r| r.raft.clone())
    }

    pub fn machine(&self, id: NodeId) -> Option<entrepot::raft::state_machine::StoreMachine> {
        self.lock().get(&id).map(|r| r.machine.clone())
    }

    pub async fn crash(&self, id: NodeId) {
        let running = self.lock().remove(&id);
        if let Some(r) = running {
            r.crash(&self.fabric, id).await;
        }
    }

    /// Starts `id` from its directory (a no-op if it is up).
    pub async fn restart(&self, id: NodeId) -> Result<(), String> {
        if self.lock().contains_key(&id) {
            return Ok(());
        }
        let running = node::start(
            id,
            &self.dirs[&id],
            &self.fabric,
            Arc::clone(&self.config),
            &self.counters,
        )
        .await
        .map_err(|e| format!("node {id} cannot restart: {e}"))?;
        self.lock().insert(id, running);
        Ok(())
    }

    /// A node that died of a storage error (openraft stopped it): its id and the error.
    pub fn fatal(&self) -> Option<(NodeId, String)> {
        self.lock().iter().find_map(|(id, r)| {
            let m = r.raft.metrics();
            let m = m.borrow();
            m.running_state.as_ref().err().map(|e| (*id, e.to_string()))
        })
    }

    /// Waits (virtual time, bounded) until every node is up, one leader's broker is
    /// active, the leader committed and applied its whole log, and every node applied it
    /// too. Returns the leader, or a description of what did not converge.
    pub async fn converge(&self, within: Duration) -> Result<NodeId, String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some((id, e)) = self.fatal() {
                return Err(format!("node {id} stopped: {e}"));
            }
            let status = self.convergence();
            if let Ok(leader) = status {
                return Ok(leader);
            }
            if tokio::time::Instant::now() >= deadline {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn convergence(&self) -> Result<NodeId, String> {
        let nodes = self.lock();
        if nodes.len() != self.ids.len() {
            return Err("not every node is up".into());
        }
        let leaders: Vec<NodeId> = nodes
            .iter()
            .filter(|(_, r)| r.active().is_some())
            .map(|(id, _)| *id)
            .collect();
        let [leader] = leaders[..] else {
            return Err(format!("active brokers on {leaders:?}"));
        };
        let lm = nodes[&leader].raft.metrics().borrow().clone();
        if lm.state != ServerState::Leader {
            return Err(format!("node {leader} has a broker but is {:?}", lm.state));
        }
        let last = lm.last_log_index;
        for (id, r) in nodes.iter() {
            let m = r.raft.metrics().borrow().clone();
            let applied = m.last_applied.map(|l| l.index);
            if applied != last || m.current_leader != Some(leader) {
                return Err(format!(
                    "node {id} applied {applied:?} of {last:?}, sees leader {:?}",
                    m.current_leader
                ));
            }
        }
        Ok(leader)
    }

    pub async fn shutdown(&self) {
        for id in self.up() {
            self.crash(id).await;
        }
    }
}
