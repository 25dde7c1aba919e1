//! The simulated cluster: N nodes in temporary directories on one [`Fabric`], and the
//! operations the fault schedule uses (crash, restart, power cut, wait for convergence).
//!
//! A cluster formed with [`Disk::Synced`] keeps each node's directory under the storage
//! crate's crash seam (`entrepot_storage::crash_sim`): [`Cluster::power_cut`] writes what
//! each disk holds — synced bytes as synced, the rest damaged per seed — into a new
//! directory, and the node restarts from there. The old directory is left as it was, so a
//! task of the dead incarnation that still writes cannot touch the new one.
//!
//! Syncs run on the storage crate's threads, outside the paused clock, which advances to
//! the next timer whenever every task waits — for a sync, too. So that a sync does not
//! cost a random amount of virtual time (elections timing out while a disk writes), a
//! task of a synced cluster ([`hold_clock_for_syncs`]) looks every [`SYNC_TICK`] for Raft
//! logs with appends not yet durable and waits for them in a blocking task, which stops
//! tokio from advancing the clock meanwhile: a sync costs at most one tick of cluster time.
//!
//! That hold also means a cut at a timer never finds a Raft-log sync under way, so
//! [`Cluster::power_cut_in_flight`] makes one: it stalls the next syncs of the nodes to
//! be cut (the seam's `SyncFault::Stall`), releases the clock, lets the cluster run for a
//! while with those syncs stuck — appends written, not durable — and cuts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use entrepot_cluster::NodeId;
use entrepot_storage::crash_sim::{CrashSim, SyncFault};
use entrepot_storage::Log;
use openraft::{BasicNode, ServerState};

use crate::fabric::Fabric;
use crate::node::{self, Counters, Disk, Leader, Running, Snapshots};
use crate::sim_trace;

/// The nodes of one run; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    pub fabric: Fabric,
    pub ids: Vec<NodeId>,
    /// What every node's snapshots did, over all incarnations.
    pub counters: Arc<Counters>,
    config: Arc<openraft::Config>,
    root: PathBuf,
    /// Each node's current directory (a new one after each power cut).
    dirs: Arc<Mutex<BTreeMap<NodeId, PathBuf>>>,
    nodes: Arc<Mutex<BTreeMap<NodeId, Running>>>,
    disk: Disk,
    /// With [`Disk::Synced`]: each node's crash seam, and what the power cuts did.
    disks: Arc<Mutex<Disks>>,
}

/// The crash seams of a [`Disk::Synced`] cluster.
#[derive(Default)]
struct Disks {
    /// The seam over each node's current directory, up or down.
    sims: BTreeMap<NodeId, Arc<CrashSim>>,
    stats: PowerStats,
    /// Set while the clock is not held for syncs ([`Cluster::power_cut_in_flight`]).
    released: bool,
}

/// What the power cuts of one cluster did (for the run's summary).
#[derive(Debug, Default, Clone, Copy)]
pub struct PowerStats {
    /// Nodes that lost power (a rack cut of three counts three).
    pub cuts: u64,
    /// Of those, the nodes cut while their next syncs were stalled.
    pub in_flight: u64,
    /// Successful syncs recorded on the cut nodes' disks before their cuts.
    pub syncs: u64,
    /// Pages written after their last sync, damaged or reverted by a cut.
    pub pages_lost: u64,
    /// Directory entries changed after their directory's last sync.
    pub entries_lost: u64,
}

/// How often a synced cluster looks for Raft-log syncs to wait for (cluster time).
const SYNC_TICK: Duration = Duration::from_millis(1);
/// Longest real time the clock is held for one round of syncs (a stuck sync thread must
/// not hang the run; past it the clock moves on as it would without the hold).
const SYNC_WAIT_MAX: Duration = Duration::from_secs(2);
/// Real time a stalled sync waits before it runs ([`Cluster::power_cut_in_flight`]): far
/// longer than the real time the cluster needs to run through the cut's window.
const SYNC_STALL: Duration = Duration::from_millis(100);
/// Syncs stalled per node before an in-flight cut: its store's, its Raft log's, and one
/// more in case a state file takes one.
const STALLS_PER_CUT: u32 = 3;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// True while `log` holds appends its syncs have not made durable yet (and can).
fn sync_pending(log: &Log) -> bool {
    log.next_offset() > log.durable_offset() && log.durable_watch().borrow().failed.is_none()
}

/// Holds the paused clock while a Raft log of a running node waits for its sync (see the
/// module doc); ends with the cluster.
async fn hold_clock_for_syncs(
    nodes: Weak<Mutex<BTreeMap<NodeId, Running>>>,
    disks: Weak<Mutex<Disks>>,
) {
    hold_clock_while(move || {
        let (nodes, disks) = (nodes.upgrade()?, disks.upgrade()?);
        if lock(&disks).released {
            return Some(Vec::new());
        }
        let logs = lock(&nodes).values().map(|r| r.raft_log.clone()).collect();
        Some(logs)
    })
    .await
}

/// Every [`SYNC_TICK`], waits in a blocking task (which stops the paused clock from
/// advancing) until the logs `logs()` names are durable, at most [`SYNC_WAIT_MAX`] of
/// real time; ends when `logs()` answers `None` (the cluster is gone). The groups
/// simulation holds its clock the same way.
pub(crate) async fn hold_clock_while(mut logs: impl FnMut() -> Option<Vec<Log>>) {
    while let Some(logs) = logs() {
        let pending: Vec<Log> = logs.into_iter().filter(sync_pending).collect();
        if pending.is_empty() {
            tokio::time::sleep(SYNC_TICK).await;
            continue;
        }
        // A blocking task inhibits the paused clock's auto-advance while it runs.
        let _ = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            while pending.iter().any(sync_pending) && started.elapsed() < SYNC_WAIT_MAX {
                std::thread::sleep(Duration::from_micros(20));
            }
        })
        .await;
    }
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
        Cluster::form_on(n, root, fabric, snapshots, Disk::PageCache).await
    }

    /// Starts `n` nodes whose logs reach the disk as `disk` says, and forms the cluster.
    pub async fn form_on(
        n: u64,
        root: &std::path::Path,
        fabric: Fabric,
        snapshots: Snapshots,
        disk: Disk,
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
            root: root.to_path_buf(),
            dirs: Arc::new(Mutex::new(dirs)),
            nodes: Arc::default(),
            disk,
            disks: Arc::default(),
        };
        if disk == Disk::Synced {
            tokio::spawn(hold_clock_for_syncs(
                Arc::downgrade(&cluster.nodes),
                Arc::downgrade(&cluster.disks),
            ));
        }
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
        let dir = lock(&self.dirs)[&id].clone();
        if self.disk == Disk::Synced && !lock(&self.disks).sims.contains_key(&id) {
            // A new node: its empty directory is what its disk holds.
            let sim = CrashSim::install(&dir).map_err(|e| format!("crash seam: {e}"))?;
            lock(&self.disks).sims.insert(id, sim);
        }
        let running = node::start(
            id,
            &dir,
            &self.fabric,
            Arc::clone(&self.config),
            &self.counters,
            self.disk,
        )
        .await
        .map_err(|e| format!("node {id} cannot restart: {e}"))?;
        self.lock().insert(id, running);
        Ok(())
    }

    /// Cuts the power of `ids` (up or down) at one instant: every disk keeps what its
    /// syncs made durable and the seam damages the rest (choices from `seed`), the nodes
    /// stop, and each restarts later from its crashed disk.
    pub async fn power_cut(&self, ids: &[NodeId], seed: u64) -> Result<(), String> {
        if self.disk != Disk::Synced {
            return Err("power cut on a cluster whose nodes do not sync".into());
        }
        let mut cut = Vec::new();
        {
            // One synchronous step: no task runs between two nodes' cuts, and none of the
            // cut nodes is heard from again (every sync after its cut fails, and it is
            // off the network before any task runs).
            let mut disks = lock(&self.disks);
            for (i, id) in ids.iter().copied().enumerate() {
                disks.stats.cuts += 1;
                let sim = disks
                    .sims
                    .remove(&id)
                    .ok_or(format!("node {id} has no disk"))?;
                let image = self.root.join(format!("node-{id}.cut{}", disks.stats.cuts));
                let report = sim
                    .crash_into(&image, seed.wrapping_add(i as u64))
                    .map_err(|e| format!("power cut of node {id}: {e}"))?;
                self.fabric.detach(id);
                disks.stats.syncs += report.syncs;
                disks.stats.pages_lost +=
                    report.pages_old + report.pages_new + report.pages_torn + report.pages_garbage;
                disks.stats.entries_lost += report.entries_old + report.entries_new;
                sim_trace!("power cut of node {id}: {report:?}");
                // The crashed seam stays alive until the node stopped: its syncs fail.
                cut.push((id, image, sim));
            }
        }
        for (id, image, old) in cut {
            self.crash(id).await;
            drop(old);
            let sim = CrashSim::install(&image).map_err(|e| format!("crash seam: {e}"))?;
            lock(&self.disks).sims.insert(id, sim);
            lock(&self.dirs).insert(id, image);
        }
        Ok(())
    }

    /// Cuts the power of `ids` while writes are on their way to the disk: their next
    /// syncs stall, the clock runs freely for `window` (appends go on, their syncs do not
    /// complete), then [`Cluster::power_cut`].
    pub async fn power_cut_in_flight(
        &self,
        ids: &[NodeId],
        window: Duration,
        seed: u64,
    ) -> Result<(), String> {
        {
            let mut disks = lock(&self.disks);
            disks.released = true;
            disks.stats.in_flight += ids.len() as u64;
            for id in ids {
                if let Some(sim) = disks.sims.get(id) {
                    sim.inject(SyncFault::Stall(SYNC_STALL), STALLS_PER_CUT);
                }
            }
        }
        tokio::time::sleep(window).await;
        let cut = self.power_cut(ids, seed).await;
        lock(&self.disks).released = false;
        cut
    }

    /// What the power cuts did so far.
    pub fn power_stats(&self) -> PowerStats {
        lock(&self.disks).stats
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
