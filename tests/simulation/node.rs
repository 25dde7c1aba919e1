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
//! reopens everything from the same directory (the state machine from its persisted
//! snapshot, if any). openraft drives the real `StoreMachine` through [`Observed`], which
//! only counts snapshot builds and installs. With [`Disk::PageCache`] logs run with
//! `SyncPolicy::Never`: the data stays in the page cache, so a crash here is a process
//! crash (SIGKILL), not a power cut. With [`Disk::Synced`] they sync as a clustered broker's
//! do, and the cluster can cut a node's power through the storage crate's crash seam
//! (`Cluster::power_cut`).

// openraft's error types are large; these signatures are openraft's, not ours.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use entrepot::broker::replication::Replication;
use entrepot::broker::store::Store;
use entrepot::raft::state_machine::StoreMachine;
use entrepot_cluster::{LogStore, NodeId, RaftStorageError, Response, TypeConfig};
use entrepot_storage::{Log, LogConfig, SyncPolicy};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, LogId, Raft, ServerState, SnapshotMeta, SnapshotPolicy, StoredMembership,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::fabric::Fabric;
use crate::sim_trace;

/// Segment size of every log (the smallest the storage crate allows: small files).
const SEGMENT_BYTES: u64 = 1 << 20;
/// Largest record (a message, or one Raft entry carrying a batch).
const RECORD_BYTES_MAX: u32 = 256 << 10;

/// How a node's logs reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disk {
    /// Nothing is synced: a crash keeps the page cache (a process crash), fast.
    PageCache,
    /// As a clustered broker (`src/raft/mod.rs`): the Raft log `Always` — an entry is
    /// reported flushed, and a vote saved, only once on the disk — and the store synced in
    /// the background every [`entrepot::raft::STORE_SYNC_INTERVAL`] (it is rebuilt from the
    /// Raft log). What a power cut keeps is what these syncs made durable.
    Synced,
}

impl Disk {
    fn policies(self) -> (SyncPolicy, SyncPolicy) {
        match self {
            Disk::PageCache => (SyncPolicy::Never, SyncPolicy::Never),
            Disk::Synced => (
                SyncPolicy::Interval(entrepot::raft::STORE_SYNC_INTERVAL),
                SyncPolicy::Always,
            ),
        }
    }
}

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
    /// The segment log under this node's Raft log (to see its syncs pending).
    pub raft_log: Log,
    leadership: JoinHandle<()>,
}

/// When the nodes snapshot their stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Snapshots {
    /// Never: the Raft log keeps everything (the scripted scenarios).
    Never,
    /// Every `every` entries since the last snapshot, keeping `keep` entries before it.
    Every { every: u64, keep: u64 },
}

pub fn raft_config(snapshots: Snapshots) -> Arc<openraft::Config> {
    let (snapshot_policy, max_in_snapshot_log_to_keep) = match snapshots {
        Snapshots::Never => (SnapshotPolicy::Never, u64::MAX),
        Snapshots::Every { every, keep } => (SnapshotPolicy::LogsSinceLast(every), keep),
    };
    let config = openraft::Config {
        cluster_name: "entrepot-sim".into(),
        heartbeat_interval: entrepot::raft::HEARTBEAT_MS,
        election_timeout_min: entrepot::raft::ELECTION_TIMEOUT_MS.0,
        election_timeout_max: entrepot::raft::ELECTION_TIMEOUT_MS.1,
        snapshot_policy,
        max_in_snapshot_log_to_keep,
        ..Default::default()
    };
    Arc::new(config.validate().expect("raft config"))
}

/// What the nodes of one cluster did with snapshots (shared by every incarnation).
#[derive(Debug, Default)]
pub struct Counters {
    /// Snapshots built (a `build_snapshot` that succeeded).
    pub built: AtomicU64,
    /// Snapshots installed into a state machine (an `install_snapshot` that succeeded).
    pub installed: AtomicU64,
    /// Node starts whose state machine began from a persisted snapshot.
    pub started_from_snapshot: AtomicU64,
}

/// A snapshot of the [`Counters`], for summaries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    pub built: u64,
    pub installed: u64,
    pub started_from_snapshot: u64,
}

impl Counters {
    pub fn get(&self) -> Counted {
        Counted {
            built: self.built.load(Ordering::Relaxed),
            installed: self.installed.load(Ordering::Relaxed),
            started_from_snapshot: self.started_from_snapshot.load(Ordering::Relaxed),
        }
    }
}

/// The node's real [`StoreMachine`], counting what openraft does with snapshots; every
/// call goes to the real machine unchanged.
#[derive(Clone)]
pub struct Observed {
    machine: StoreMachine,
    counters: Arc<Counters>,
}

impl openraft::RaftSnapshotBuilder<TypeConfig> for Observed {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        let mut builder = self.machine.get_snapshot_builder().await;
        let built = builder.build_snapshot().await;
        if built.is_ok() {
            self.counters.built.fetch_add(1, Ordering::Relaxed);
        }
        sim_trace!(
            "snapshot built: {:?}",
            built.as_ref().map(|s| s.meta.last_log_id)
        );
        built
    }
}

impl RaftStateMachine<TypeConfig> for Observed {
    type SnapshotBuilder = Observed;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), RaftStorageError>
    {
        self.machine.applied_state().await
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, RaftStorageError>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        self.machine.apply(entries).await
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<entrepot_cluster::SnapshotData>, RaftStorageError> {
        self.machine.begin_receiving_snapshot().await
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<entrepot_cluster::SnapshotData>,
    ) -> Result<(), RaftStorageError> {
        let installed = self.machine.install_snapshot(meta, snapshot).await;
        if installed.is_ok() {
            self.counters.installed.fetch_add(1, Ordering::Relaxed);
        }
        sim_trace!(
            "snapshot {:?} installed: {:?}, message end now {:?}",
            meta.last_log_id,
            installed.is_ok(),
            self.machine.applied_message_end()
        );
        installed
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, RaftStorageError> {
        self.machine.get_current_snapshot().await
    }
}

/// Opens (or reopens) node `id` in `dir` and joins it to `fabric`. Fails when the
/// store, the Raft log or openraft's start (which re-applies the committed log) does.
pub async fn start(
    id: NodeId,
    dir: &Path,
    fabric: &Fabric,
    config: Arc<openraft::Config>,
    counters: &Arc<Counters>,
    disk: Disk,
) -> Result<Running, String> {
    let (store_sync, raft_sync) = disk.policies();
    let (log, acks) = Store::open_parts(dir, store_sync, SEGMENT_BYTES, RECORD_BYTES_MAX)
        .map_err(|e| format!("open the store: {e}"))?;
    let machine = StoreMachine::new(dir.to_path_buf(), log, Arc::new(acks))
        .map_err(|e| format!("open the state machine: {e}"))?;
    // Only a persisted snapshot gives a state machine an applied position at open.
    if machine.applied_message_end().is_some() {
        counters
            .started_from_snapshot
            .fetch_add(1, Ordering::Relaxed);
        sim_trace!(
            "node {id} starts from its snapshot: message end {:?}",
            machine.applied_message_end()
        );
    }
    let raft_log = LogConfig {
        segment_bytes: SEGMENT_BYTES,
        record_bytes_max: RECORD_BYTES_MAX * 2,
        sync: raft_sync,
        ..LogConfig::default()
    };
    let log_store =
        LogStore::open(raft_dir(dir), raft_log).map_err(|e| format!("open the Raft log: {e}"))?;
    let raft_log = log_store.log().clone();
    let endpoint = fabric.endpoint(id);
    let observed = Observed {
        machine: machine.clone(),
        counters: Arc::clone(counters),
    };
    let raft = Raft::new(id, config, endpoint.clone(), log_store, observed)
        .await
        .map_err(|e| format!("start Raft: {e}"))?;
    fabric.attach(&endpoint, raft.clone());
    let (tx, rx) = watch::channel(None);
    let leadership = tokio::spawn(leadership(raft.clone(), machine.clone(), tx));
    Ok(Running {
        raft,
        machine,
        leader: rx,
        raft_log,
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
