//! One simulated broker node: a real `openraft::Raft` on a real `LogStore` and a real
//! `StoreMachine` over the node's store, in its own directory, plus the leader's write
//! path (activation and replicator).
//!
//! The leader's write path is the broker's own: `entrepot::raft::leader_store` (settles
//! the store: leadership confirmed, own log applied, uncommitted tail cut) and
//! `entrepot::raft::replicator::run`; only the leadership loop is mirrored (it builds
//! no broker). The broker's queues are not built: the simulated client writes through the
//! `Store` directly, as a connection would.
//!
//! A crash aborts the node's tasks, stops its `Raft` and drops every handle; a restart
//! reopens everything from the same directory. Logs run with `SyncPolicy::Never`: the data
//! stays in the page cache, so a crash here is a process crash (SIGKILL), not a power cut.

// openraft's error types are large; these signatures are openraft's, not ours.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use entrepot::broker::replication::Replication;
use entrepot::broker::store::Store;
use entrepot::raft::state_machine::StoreMachine;
use entrepot_cluster::{LogStore, NodeId, TypeConfig};
use entrepot_storage::{LogConfig, SyncPolicy};
use openraft::{Raft, ServerState, SnapshotPolicy};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::fabric::Fabric;
use crate::sim_trace;

/// Segment size of every log (the smallest the storage crate allows: small files).
const SEGMENT_BYTES: u64 = 1 << 20;
/// Largest record (a message, or one Raft entry carrying a batch).
const RECORD_BYTES_MAX: u32 = 256 << 10;

/// The broker of a node while it leads: its store and replication queue.
pub struct Leader {
    pub node: NodeId,
    pub store: Store,
    replication: Arc<Replication>,
    stop: watch::Sender<bool>,
}

impl Leader {
    fn stop(&self, reason: &str) {
        sim_trace!("node {} broker stops: {reason}", self.node);
        self.replication.fail(reason);
        let _ = self.stop.send(true);
    }
}

/// A node that is up.
pub struct Running {
    pub raft: Raft<TypeConfig>,
    pub machine: StoreMachine,
    /// `Some` while this node leads and its broker is active.
    pub leader: watch::Receiver<Option<Arc<Leader>>>,
    leadership: JoinHandle<()>,
}

pub fn raft_config() -> Arc<openraft::Config> {
    let config = openraft::Config {
        cluster_name: "entrepot-sim".into(),
        heartbeat_interval: entrepot::raft::HEARTBEAT_MS,
        election_timeout_min: entrepot::raft::ELECTION_TIMEOUT_MS.0,
        election_timeout_max: entrepot::raft::ELECTION_TIMEOUT_MS.1,
        snapshot_policy: SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: u64::MAX,
        ..Default::default()
    };
    Arc::new(config.validate().expect("raft config"))
}

/// Opens (or reopens) node `id` in `dir` and joins it to `fabric`. Fails when the
/// store, the Raft log or openraft's start (which re-applies the committed log) does.
pub async fn start(id: NodeId, dir: &Path, fabric: &Fabric) -> Result<Running, String> {
    let (log, acks) = Store::open_parts(dir, SyncPolicy::Never, SEGMENT_BYTES, RECORD_BYTES_MAX)
        .map_err(|e| format!("open the store: {e}"))?;
    let machine = StoreMachine::new(dir.to_path_buf(), log, Arc::new(acks))
        .map_err(|e| format!("open the state machine: {e}"))?;
    let raft_log = LogConfig {
        segment_bytes: SEGMENT_BYTES,
        record_bytes_max: RECORD_BYTES_MAX * 2,
        sync: SyncPolicy::Never,
        ..LogConfig::default()
    };
    let log_store =
        LogStore::open(raft_dir(dir), raft_log).map_err(|e| format!("open the Raft log: {e}"))?;
    let endpoint = fabric.endpoint(id);
    let raft = Raft::new(
        id,
        raft_config(),
        endpoint.clone(),
        log_store,
        machine.clone(),
    )
    .await
    .map_err(|e| format!("start Raft: {e}"))?;
    fabric.attach(&endpoint, raft.clone());
    let (tx, rx) = watch::channel(None);
    let leadership = tokio::spawn(leadership(raft.clone(), machine.clone(), tx));
    Ok(Running {
        raft,
        machine,
        leader: rx,
        leadership,
    })
}

pub fn raft_dir(dir: &Path) -> PathBuf {
    dir.join("raft")
}

impl Running {
    /// Kills the node: unreachable at once, its broker's waiters fail, Raft stops.
    pub async fn crash(self, fabric: &Fabric, id: NodeId) {
        fabric.detach(id);
        self.leadership.abort();
        let _ = self.leadership.await;
        if let Some(l) = self.leader.borrow().clone() {
            l.stop("node crashed");
        }
        let _ = self.raft.shutdown().await;
        // Let aborted tasks and Raft's workers drop their handles on the files.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    pub fn active(&self) -> Option<Arc<Leader>> {
        self.leader.borrow().clone()
    }
}

/// Mirrors `src/raft/mod.rs` `leadership`: activate on becoming leader, stop on losing it.
async fn leadership(
    raft: Raft<TypeConfig>,
    machine: StoreMachine,
    role: watch::Sender<Option<Arc<Leader>>>,
) {
    let mut metrics = raft.metrics();
    let id = raft.metrics().borrow().id;
    let mut active: Option<Arc<Leader>> = None;
    loop {
        let (state, leader) = {
            let m = metrics.borrow_and_update();
            (m.state, m.current_leader)
        };
        let leading = state == ServerState::Leader && leader == Some(id);
        if !leading {
            if let Some(a) = active.take() {
                a.stop("this node stopped leading; resend to the new leader");
                role.send_replace(None);
            }
        } else if active.is_none() {
            match activate(&raft, &machine, id).await {
                Ok(a) => {
                    role.send_replace(Some(Arc::clone(&a)));
                    active = Some(a);
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        if metrics.changed().await.is_err() {
            break;
        }
    }
    if let Some(a) = active.take() {
        a.stop("node shutting down");
    }
    role.send_replace(None);
}

/// `src/raft/mod.rs` `activate` without the broker's queues: the real
/// [`entrepot::raft::leader_store`] and [`entrepot::raft::replicator::run`].
async fn activate(
    raft: &Raft<TypeConfig>,
    machine: &StoreMachine,
    id: NodeId,
) -> Result<Arc<Leader>, String> {
    let (store, replication) = entrepot::raft::leader_store(raft, machine)
        .await
        .map_err(|e| e.to_string())?;
    sim_trace!(
        "node {id} activates in term {}: applied message end {:?}, local end {}",
        raft.metrics().borrow().current_term,
        machine.applied_message_end(),
        store.log().next_offset()
    );
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(entrepot::raft::replicator::run(
        raft.clone(),
        Arc::clone(&replication),
        stop_rx,
    ));
    Ok(Arc::new(Leader {
        node: id,
        store,
        replication,
        stop,
    }))
}
