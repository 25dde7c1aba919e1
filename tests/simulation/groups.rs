//! Goal (issue 12, point 6): the groups mode — a Raft group per address on the node-level
//! host, every group of a node in one node log — loses no accepted message, brings back
//! no consumed one and keeps each group's order, whatever the network, the nodes and the
//! placement do.
//!
//! Method: per seed, [`NODES`] real `entrepot_cluster::Host`s in this process, each on
//! its own node log (`SyncPolicy::Never`: a crash keeps the page cache, as SIGKILL does),
//! joined by the cluster crate's simulated network (`sim_net`, feature `sim-net`: in-memory
//! streams the test partitions and cuts) on tokio's paused clock. [`GROUPS`] address
//! groups, each with the broker's own `AddressMachine`, are placed on three of the four
//! nodes in turn. Per group one producer proposes message ops (the broker's encoding) to
//! whichever replica leads it, one at a time; in half the groups one consumer reads the
//! live messages of the leader and proposes their acknowledgement (the other half keep
//! every message, so the oracle checks each one). A seeded schedule ([`inject`]) then, for
//! [`FAULT_PHASE`] of cluster time: partitions the nodes, isolates the node leading most
//! groups, heals, crashes a node and restarts it from its directory, moves a group's
//! leadership (a follower campaigns) and moves a replica (a learner on a fourth node,
//! caught up, voters changed, the old replica removed, as the balancer does).
//!
//! Oracle, after healing and again after restarting every node:
//! * every group converges: one agreed leader, every voter applied up to its commit;
//! * **no accepted message lost**: each message whose proposal resolved `Ok(position)` is
//!   on every voter at that position, byte for byte, live unless its ack committed;
//! * **no consumed message comes back**: the consumer checks each read against the acks
//!   that committed (a replica that applied past an ack must not show its offset live),
//!   and at the end every committed ack is applied on every voter;
//! * **per-group order**: accepted messages' offsets ascend in the order they were
//!   proposed (one producer per group, one proposal in flight);
//! * the voters of a group agree on its offsets and acknowledgements.
//!
//! Mutation-checked: an `AddressMachine` that drops the first offset of each ack op
//! fails every seed ("offset 0, acknowledged in entry …, is live again").
//!
//! Seeds: `ENTREPOT_SIM_GROUP_SEEDS=n` runs seeds `1..=n` (default
//! [`DEFAULT_GROUP_SEEDS`], CI's bound); `ENTREPOT_SIM_SEED=s` replays one (openraft's
//! election timeouts come from the seed, `entrepot_cluster::runtime`, and the network
//! draws nothing of its own); `ENTREPOT_SIM_TRACE=1` prints the faults and moves.
//!
//! Snapshots every [`SNAPSHOT_EVERY`] entries with [`PURGE_KEEP`] kept below: every seed
//! snapshots and purges, restarted replicas start from their snapshot, and a replica a
//! move brings or one that lagged installs the leader's (the hosts build and install
//! them inline, `HostConfig::snapshot_inline`, so a seed still replays exactly).
//!
//! Power cuts (`power_cuts_…`): the node logs sync every append, every node's directory
//! is under the storage crate's crash seam, and where the other runs crash a node this one
//! cuts its power — the node restarts from what its disk kept (unsynced pages reverted,
//! torn or garbage, per seed); the whole rack is cut once under load and once at the end.
//! Half of the single-node cuts come with the node's syncs stalled for a window of cluster
//! time first (`Sim::power_cut_in_flight`): its appends reach the page cache, its group
//! commit does not complete, and the cut must lose only what no one was told is durable.
//! Syncs run on the storage crate's real threads beside the paused clock; as in the
//! one-group power-cut run, a task holds the clock while a node log's sync is under way
//! (`cluster::hold_clock_while`: without it a vote's sync let the clock run past the
//! election timeout, and under CPU load 5 of 24 seeds ended with a group that elected no
//! leader within 30 s of cluster time). Thread timing can still make a replay go
//! differently.
//!
//! Full disks (`a_full_disk_…`): every node's directory is under the storage crate's
//! seam, whose `set_disk_full` makes each new segment's preallocation fail with ENOSPC as
//! a full file system does; segments are small ([`FULL_DISK_SEGMENT_BYTES`]) so a node
//! rolls every few seconds. A fault fills one node's disk (or frees it); the node runs on
//! until its node log needs a segment, then the group whose append failed stops on a
//! fatal storage error, `Host::failure` reports it, and the node *exits* as the broker
//! does (`GroupsNode::failed`) — the schedule's supervisor crashes it at its next step, as
//! Kubernetes restarts an exited container; a restart on a disk still full may fail again
//! (a crash loop). Healing frees every disk. A seed fails unless some node exited on a
//! full disk; in every run, a group failing for any other reason is a violation — a
//! removal, a hibernation or a shutdown is openraft's `Fatal::Stopped`, which must never
//! make a node exit (mutation-checked: counting it as a failure, 3 of 3 seeds of the
//! plain run fail on the first replica move).
//!
//! Hibernation (`hibernating_groups_…`): the hosts stop idle groups on every replica
//! (`HostConfig::hibernation`, quiesce after [`QUIESCE_AFTER`]); producers pause now and
//! then so groups go to sleep, and wake on the next write, a peer's RPC or the loss of the
//! node that led them (liveness pings over the same simulated network). A seed fails
//! unless some instance stopped and some woke. Healing wakes every replica before it
//! checks convergence.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use entrepot::broker::replication::{encode_ack, encode_message, OPS_VERSION};
use entrepot::raft::address_machine::{message_record, AddressMachine};
use entrepot_cluster::placement::GroupId;
use entrepot_cluster::sim_net::SimNet;
use entrepot_cluster::{GroupHandle, HibernationConfig, Host, HostConfig, NodeId, Position};
use entrepot_storage::crash_sim::{CrashSim, SyncFault};
use entrepot_storage::{LogConfig, SyncPolicy, DEFAULT_GROUP};
use tokio::sync::watch;

use crate::rng::Rng;
use crate::sim_trace;

/// Nodes per cluster: every group has three replicas, so one node is free for moves.
const NODES: u64 = 4;
/// Replicas of each group.
const REPLICAS: u64 = 3;
/// Address groups (group ids 1..=GROUPS).
const GROUPS: u64 = 6;
/// Seeds per run unless `ENTREPOT_SIM_GROUP_SEEDS` says otherwise (CI's bound).
const DEFAULT_GROUP_SEEDS: u64 = 6;
/// Cluster time under faults per seed.
const FAULT_PHASE: Duration = Duration::from_secs(8);
/// Longest the healed cluster may take to converge (cluster time).
const CONVERGE_WITHIN: Duration = Duration::from_secs(30);
/// A client's bound on one proposal or read round (cluster time).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// A move's bound on each of its steps (cluster time).
const MOVE_STEP_TIMEOUT: Duration = Duration::from_secs(3);
/// Entries between two snapshots of a group: small, so every seed snapshots, purges and
/// has lagging replicas catch up by installing one.
const SNAPSHOT_EVERY: u64 = 64;
/// Entries kept below a snapshot for followers that lag a little.
const PURGE_KEEP: u64 = 8;
/// Seeds of the power-cut run unless `ENTREPOT_SIM_GROUP_SEEDS` says otherwise: real
/// syncs make a seed slower.
const POWER_GROUP_SEEDS: u64 = 3;
/// Real time a stalled sync waits before it runs ([`Sim::power_cut_in_flight`]): longer
/// than the real time the cut's window of cluster time takes.
const SYNC_STALL: Duration = Duration::from_millis(100);
/// Syncs stalled before an in-flight cut: the node log's next group commits (a vote or a
/// snapshot file may take one).
const STALLS_PER_CUT: u32 = 3;
/// Longest the full-disk run's load goes on past the fault phase for a full disk to stop
/// its node (cluster time): a node rolls a segment every few seconds under this load.
const FULL_DISK_BITES_WITHIN: Duration = Duration::from_secs(20);
/// Seeds of the full-disk run unless `ENTREPOT_SIM_GROUP_SEEDS` says otherwise.
const FULL_DISK_SEEDS: u64 = 2;
/// Segment size of the full-disk run: the smallest the storage crate takes, so a node
/// needs a new segment every few seconds of traffic.
const FULL_DISK_SEGMENT_BYTES: u64 = entrepot_storage::MIN_SEGMENT_BYTES;
/// Seeds of the hibernating run unless `ENTREPOT_SIM_GROUP_SEEDS` says otherwise.
const HIBERNATING_SEEDS: u64 = 4;
/// A hibernating run's group stops after this long without a write.
const QUIESCE_AFTER: Duration = Duration::from_millis(400);
/// Chance per message (per mille) that a hibernating run's producer pauses for two to four
/// [`QUIESCE_AFTER`]s.
const IDLE_PER_MILLE: u64 = 30;
/// Groups 1..=CONSUMED_GROUPS have a consumer; the others keep every message they accept
/// (the oracle then checks each one on every voter).
const CONSUMED_GROUPS: u64 = GROUPS / 2;
/// Most live messages the consumer takes in one round.
const CONSUME_BATCH: usize = 32;

/// Every fault, on many groups: partitions, crashes and restarts, leader and replica moves.
#[test]
fn many_groups_lose_no_accepted_message_and_bring_back_no_consumed_one() {
    run_seeds(Mode::PLAIN, DEFAULT_GROUP_SEEDS);
}

/// The same with idle groups hibernating: producers pause now and then, their groups stop
/// on every replica and wake on the next write, on a peer's RPC or when the node that led
/// them is lost.
#[test]
fn hibernating_groups_lose_no_accepted_message_and_bring_back_no_consumed_one() {
    let mode = Mode {
        hibernation: Hibernation::On,
        ..Mode::PLAIN
    };
    run_seeds(mode, HIBERNATING_SEEDS);
}

/// Power cuts where the others crash a node: of one node, and of the whole rack under
/// load and at the end; each node log syncs every append (`SyncPolicy::Always`) and keeps
/// only what it synced (the storage crate's crash seam).
#[test]
fn power_cuts_lose_no_accepted_message_across_many_groups() {
    let mode = Mode {
        disk: Disk::Synced,
        ..Mode::PLAIN
    };
    run_seeds(mode, POWER_GROUP_SEEDS);
}

/// Full disks: one node's disk fills (new segments fail with ENOSPC) under load; the node
/// stops on the fatal storage error and exits, is restarted (perhaps into the same full
/// disk), and catches up once its disk is freed. Nothing accepted is lost: an append that
/// failed was never reported durable.
#[test]
fn a_full_disk_stops_its_node_and_loses_no_accepted_message() {
    let mode = Mode {
        full_disks: true,
        ..Mode::PLAIN
    };
    run_seeds(mode, FULL_DISK_SEEDS);
}

/// What a run simulates besides the network and process crashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mode {
    hibernation: Hibernation,
    disk: Disk,
    /// Disks fill (and are freed) among the faults.
    full_disks: bool,
}

impl Mode {
    const PLAIN: Mode = Mode {
        hibernation: Hibernation::Off,
        disk: Disk::PageCache,
        full_disks: false,
    };

    /// Whether every node's directory is under the storage crate's seam.
    fn seams(self) -> bool {
        self.disk == Disk::Synced || self.full_disks
    }
}

/// What a node's disk keeps when the node stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disk {
    /// Everything written (the node logs never sync; a crash is a process crash).
    PageCache,
    /// Only what was synced: power cuts (the crash seam), node logs syncing every append.
    Synced,
}

/// Whether idle groups hibernate (`HostConfig::hibernation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hibernation {
    Off,
    On,
}

fn run_seeds(mode: Mode, default: u64) {
    let seeds: Vec<u64> = match crate::env_u64("ENTREPOT_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (1..=crate::env_u64("ENTREPOT_SIM_GROUP_SEEDS").unwrap_or(default)).collect(),
    };
    let mut failures = Vec::new();
    for seed in seeds {
        match run_seed(seed, mode) {
            Ok(summary) => eprintln!("groups seed {seed}: ok, {summary}"),
            Err(e) => {
                eprintln!("groups seed {seed}: FAILED: {e}  (replay: ENTREPOT_SIM_SEED={seed})");
                failures.push(format!("seed {seed}: {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "groups simulation failures:\n{}",
        failures.join("\n")
    );
}

/// A groups seed replays exactly too: the same summary (counts and trace digest) twice.
#[test]
fn a_groups_seed_replays_exactly() {
    let seed = 2;
    assert_eq!(
        run_seed(seed, Mode::PLAIN),
        run_seed(seed, Mode::PLAIN),
        "groups seed {seed} went differently when replayed"
    );
}

fn run_seed(seed: u64, mode: Mode) -> Result<String, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(simulate(seed, mode))
}

fn addr_of(id: NodeId) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, id as u8 + 1], 7000))
}

fn config(id: NodeId, dir: PathBuf, mode: Mode) -> HostConfig {
    let mut c = HostConfig::new(id, dir);
    let small = mode.full_disks;
    c.log = LogConfig {
        segment_bytes: if small {
            FULL_DISK_SEGMENT_BYTES
        } else {
            1 << 20
        },
        record_bytes_max: if small { 32 << 10 } else { 256 << 10 },
        sync: match mode.disk {
            Disk::PageCache => SyncPolicy::Never,
            Disk::Synced => SyncPolicy::Always,
        },
        ..LogConfig::default()
    };
    c.heartbeat = Duration::from_millis(50);
    c.election_timeout = Duration::from_millis(300)..Duration::from_millis(600);
    c.snapshot_every = SNAPSHOT_EVERY;
    c.purge_keep = PURGE_KEEP;
    c.propose_timeout = CLIENT_TIMEOUT;
    // Snapshots on the runtime's thread: a blocking thread's timing would move a replay.
    c.snapshot_inline = true;
    if mode.hibernation == Hibernation::On {
        c.hibernation = Some(HibernationConfig {
            quiesce_after: QUIESCE_AFTER,
            check_interval: Duration::from_millis(100),
            liveness_interval: Duration::from_millis(100),
            liveness_timeout: c.election_timeout.end,
        });
    }
    c
}

/// One running node: its host and the machine of each group open on it.
#[derive(Clone)]
struct Node {
    host: Host,
    machines: BTreeMap<GroupId, AddressMachine>,
}

/// What the clients were told, per group.
#[derive(Debug, Default)]
struct GroupHistory {
    /// Messages whose proposal resolved: producer sequence → position.
    accepted: BTreeMap<u64, Position>,
    /// Producer sequences proposed whose outcome is unknown.
    in_doubt: u64,
    /// Offsets whose acknowledgement committed: the ack's entry index and the producer
    /// sequence the consumer read there.
    consumed: BTreeMap<u64, (u64, u64)>,
    /// Messages whose acknowledgement's outcome is unknown: sequence → offset read.
    ack_in_doubt: BTreeMap<u64, u64>,
    /// Highest entry index of a committed acknowledgement.
    ack_index: u64,
}

#[derive(Clone)]
struct Sim {
    net: SimNet,
    root: PathBuf,
    nodes: Arc<Mutex<BTreeMap<NodeId, Node>>>,
    history: Arc<Mutex<BTreeMap<GroupId, GroupHistory>>>,
    violations: Arc<Mutex<Vec<String>>>,
    counters: Arc<Mutex<Counters>>,
    mode: Mode,
    /// Each node's directory (a power cut moves it to the crashed image).
    dirs: Arc<Mutex<BTreeMap<NodeId, PathBuf>>>,
    /// Each node's crash seam ([`Mode::seams`] only).
    seams: Arc<Mutex<BTreeMap<NodeId, Arc<CrashSim>>>>,
    /// Nodes whose disk is full now.
    full: Arc<Mutex<BTreeSet<NodeId>>>,
    /// Set while the clock is not held for syncs ([`Sim::power_cut_in_flight`]).
    released: Arc<Mutex<bool>>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counters {
    crashes: u64,
    restarts: u64,
    partitions: u64,
    leader_moves: u64,
    replica_moves: u64,
    replica_moves_failed: u64,
    reads: u64,
    /// Hibernation, summed over every host incarnation: instances stopped, woken, and
    /// peers found lost.
    stops: u64,
    wakes: u64,
    peers_lost: u64,
    /// Nodes whose power was cut, and pages written after their last sync that a cut lost
    /// or damaged.
    power_cuts: u64,
    pages_lost: u64,
    /// Of the power cuts, those made while the node's syncs were stalled.
    cuts_in_flight: u64,
    /// Disks filled, nodes that exited on a fatal group error, restarts that failed (a
    /// disk still full).
    disks_filled: u64,
    failed_exits: u64,
    failed_starts: u64,
    /// `failed_exits` when the last disk filled.
    exits_at_fill: u64,
}

impl Sim {
    fn node(&self, id: NodeId) -> Option<Node> {
        self.nodes.lock().unwrap().get(&id).cloned()
    }

    fn up(&self) -> Vec<NodeId> {
        self.nodes.lock().unwrap().keys().copied().collect()
    }

    fn violation(&self, what: String) {
        sim_trace!("VIOLATION: {what}");
        self.violations.lock().unwrap().push(what);
    }

    /// Starts node `id` on its directory and opens every group its node log holds and
    /// every group in `fresh` (replicas the caller places here).
    async fn start(&self, id: NodeId, fresh: &[GroupId]) -> Result<(), String> {
        let dir = self
            .dirs
            .lock()
            .unwrap()
            .entry(id)
            .or_insert_with(|| self.root.join(id.to_string()))
            .clone();
        if self.mode.seams() && !self.seams.lock().unwrap().contains_key(&id) {
            // A new node: its empty directory is what its disk holds.
            std::fs::create_dir_all(&dir).map_err(|e| format!("node {id}: {e}"))?;
            let seam = CrashSim::install(&dir).map_err(|e| format!("crash seam: {e}"))?;
            self.seams.lock().unwrap().insert(id, seam);
        }
        let listener = self.net.listen(addr_of(id));
        let host = Host::start(config(id, dir, self.mode), listener)
            .map_err(|e| format!("node {id} does not start: {e}"))?;
        let mut groups: BTreeSet<GroupId> = host
            .recovered_groups()
            .map_err(|e| format!("node {id}: {e}"))?
            .into_iter()
            .collect();
        groups.extend(fresh.iter().copied());
        let mut machines = BTreeMap::new();
        for g in groups {
            let machine = AddressMachine::new();
            if let Err(e) = host.open_group(g, machine.clone()).await {
                // The process exits: nothing of it may run on beside the next start.
                self.net.unplug(addr_of(id));
                host.shutdown().await;
                return Err(format!("node {id} does not open group {g}: {e}"));
            }
            machines.insert(g, machine);
        }
        self.nodes
            .lock()
            .unwrap()
            .insert(id, Node { host, machines });
        Ok(())
    }

    /// A process crash: every task of the node stops, its connections reset; the node
    /// log keeps what it wrote (page cache).
    async fn crash(&self, id: NodeId) {
        let Some(node) = self.nodes.lock().unwrap().remove(&id) else {
            return;
        };
        self.net.unplug(addr_of(id));
        let h = node.host.hibernation_counters();
        {
            let mut c = self.counters.lock().unwrap();
            c.stops += h.stops;
            c.wakes += h.wakes;
            c.peers_lost += h.peers_lost;
        }
        node.host.shutdown().await;
    }

    /// Cuts the power of `ids` (up or down) at one instant: each disk keeps what its syncs
    /// made durable and the seam damages the rest (choices from `seed`); the nodes stop and
    /// restart later from their crashed disks.
    async fn power_cut(&self, ids: &[NodeId], seed: u64) -> Result<(), String> {
        let mut cut = Vec::new();
        {
            // One synchronous step: no task runs between two nodes' cuts, and a cut node
            // is off the network before any task runs again.
            let mut seams = self.seams.lock().unwrap();
            let mut c = self.counters.lock().unwrap();
            for (i, id) in ids.iter().copied().enumerate() {
                c.power_cuts += 1;
                let seam = seams.remove(&id).ok_or(format!("node {id} has no disk"))?;
                let image = self.root.join(format!("{id}.cut{}", c.power_cuts));
                let report = seam
                    .crash_into(&image, seed.wrapping_add(i as u64))
                    .map_err(|e| format!("power cut of node {id}: {e}"))?;
                self.net.unplug(addr_of(id));
                c.pages_lost +=
                    report.pages_old + report.pages_new + report.pages_torn + report.pages_garbage;
                sim_trace!("power cut of node {id}: {report:?}");
                // The crashed seam stays alive until the node stopped: its syncs fail.
                cut.push((id, image, seam));
            }
        }
        for (id, image, old) in cut {
            self.crash(id).await;
            drop(old);
            let seam = CrashSim::install(&image).map_err(|e| format!("crash seam: {e}"))?;
            self.seams.lock().unwrap().insert(id, seam);
            self.dirs.lock().unwrap().insert(id, image);
        }
        Ok(())
    }

    /// Fills node `id`'s disk.
    fn fill_disk(&self, id: NodeId) {
        self.set_disk_full(id, true);
        let mut c = self.counters.lock().unwrap();
        c.disks_filled += 1;
        c.exits_at_fill = c.failed_exits;
    }

    /// Whether a node exited on a failed group since the last disk filled.
    fn exited_since_fill(&self) -> bool {
        let c = self.counters.lock().unwrap();
        c.failed_exits > c.exits_at_fill
    }

    /// Fills (or frees) node `id`'s disk.
    fn set_disk_full(&self, id: NodeId, full: bool) {
        if let Some(seam) = self.seams.lock().unwrap().get(&id) {
            seam.set_disk_full(full);
        }
        let mut set = self.full.lock().unwrap();
        if full {
            set.insert(id);
        } else {
            set.remove(&id);
        }
    }

    /// The supervisor: a node one of whose groups stopped on a fatal error exits (the
    /// broker's `GroupsNode::failed`), so it is crashed here; answers what exited.
    async fn supervise(&self) -> Vec<String> {
        let failed: Vec<(NodeId, String)> = self
            .nodes
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(id, n)| n.host.failure().borrow().clone().map(|why| (*id, why)))
            .collect();
        let mut exits = Vec::new();
        for (id, why) in failed {
            // Only a full disk stops a group here: a removal, a hibernation or a
            // shutdown is a stop the host asked for, never a failure.
            if !(self.mode.full_disks && why.contains("disk full")) {
                self.violation(format!(
                    "node {id}: a group failed without a full disk: {why}"
                ));
            }
            self.crash(id).await;
            self.counters.lock().unwrap().failed_exits += 1;
            exits.push(format!("node {id} exited: {why}"));
        }
        exits
    }

    /// Cuts node `id`'s power while its writes are on their way to the disk: its next
    /// syncs stall ([`SYNC_STALL`] of real time each, the seam's `SyncFault::Stall`), the
    /// cluster runs on for `window` (the node appends, its node log's group commit does
    /// not complete: nothing of it may count as durable), then [`Sim::power_cut`].
    async fn power_cut_in_flight(
        &self,
        id: NodeId,
        window: Duration,
        seed: u64,
    ) -> Result<(), String> {
        if let Some(seam) = self.seams.lock().unwrap().get(&id) {
            seam.inject(SyncFault::Stall(SYNC_STALL), STALLS_PER_CUT);
        }
        self.counters.lock().unwrap().cuts_in_flight += 1;
        *self.released.lock().unwrap() = true;
        tokio::time::sleep(window).await;
        let cut = self.power_cut(&[id], seed).await;
        *self.released.lock().unwrap() = false;
        cut
    }

    /// The node that leads `g` and the node's handle and machine, if one (running) does.
    fn leader_of(&self, g: GroupId) -> Option<(NodeId, GroupHandle, AddressMachine)> {
        let nodes = self.nodes.lock().unwrap();
        nodes.iter().find_map(|(id, n)| {
            let h = n.host.group(g)?;
            let leads = h.leadership().borrow().leads;
            leads.then(|| (*id, h, n.machines.get(&g).cloned().unwrap_or_default()))
        })
    }

    /// Each group's leading node count per node.
    fn leaders_per_node(&self) -> BTreeMap<NodeId, u64> {
        let mut per = BTreeMap::new();
        for g in 1..=GROUPS {
            if let Some((id, _, _)) = self.leader_of(g) {
                *per.entry(id).or_default() += 1;
            }
        }
        per
    }
}

async fn simulate(seed: u64, mode: Mode) -> Result<String, String> {
    crate::start_clock();
    entrepot_cluster::runtime::seed_thread_rng(seed);
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut rng = Rng::new(seed);
    let net = SimNet::new();
    net.set_latency(Duration::from_millis(1));
    let sim = Sim {
        net: net.clone(),
        root: dir.path().to_owned(),
        nodes: Arc::default(),
        history: Arc::default(),
        violations: Arc::default(),
        counters: Arc::default(),
        mode,
        dirs: Arc::default(),
        seams: Arc::default(),
        full: Arc::default(),
        released: Arc::default(),
    };
    if mode.disk == Disk::Synced {
        // As in the one-group power-cut run: a node log's sync costs at most a tick of
        // cluster time, so that elections do not time out while a vote is being synced.
        let (nodes, released) = (Arc::downgrade(&sim.nodes), Arc::downgrade(&sim.released));
        tokio::spawn(crate::cluster::hold_clock_while(move || {
            let (nodes, released) = (nodes.upgrade()?, released.upgrade()?);
            if *released.lock().unwrap() {
                return Some(Vec::new());
            }
            let nodes = nodes.lock().unwrap();
            Some(
                nodes
                    .values()
                    .map(|n| n.host.node_log().log().clone())
                    .collect(),
            )
        }));
    }
    // Group g on nodes g-1, g, g+1 (mod NODES), formed by the first.
    let placed =
        |g: GroupId| -> BTreeSet<NodeId> { (0..REPLICAS).map(|r| (g - 1 + r) % NODES).collect() };
    for id in 0..NODES {
        let fresh: Vec<GroupId> = (1..=GROUPS).filter(|g| placed(*g).contains(&id)).collect();
        sim.start(id, &fresh).await?;
    }
    for g in 1..=GROUPS {
        let members: BTreeMap<NodeId, String> = placed(g)
            .into_iter()
            .map(|id| (id, addr_of(id).to_string()))
            .collect();
        let first = *members.keys().next().expect("replicas");
        let handle = sim
            .node(first)
            .and_then(|n| n.host.group(g))
            .expect("opened");
        handle
            .bootstrap(&members)
            .await
            .map_err(|e| format!("group {g} does not form: {e}"))?;
        sim.history
            .lock()
            .unwrap()
            .insert(g, GroupHistory::default());
    }
    let (stop, stop_rx) = watch::channel(false);
    let mut clients = Vec::new();
    for g in 1..=GROUPS {
        clients.push(tokio::spawn(produce(
            sim.clone(),
            g,
            rng.fork(),
            stop_rx.clone(),
        )));
        if g <= CONSUMED_GROUPS {
            clients.push(tokio::spawn(consume(
                sim.clone(),
                g,
                rng.fork(),
                stop_rx.clone(),
            )));
        }
    }
    let mut faults = Vec::new();
    let result = async {
        inject(&sim, &mut rng, &mut faults).await?;
        if mode.full_disks {
            full_disk_bites(&sim, &mut faults).await?;
        }
        if mode.disk == Disk::Synced {
            // The whole rack under load: no node keeps what it had not synced.
            sim.power_cut(&(0..NODES).collect::<Vec<_>>(), rng.next_u64())
                .await?;
            faults.push(format!("{}ms power cut of every node", crate::elapsed_ms()));
            heal(&sim).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let _ = stop.send(true);
        for c in clients {
            let _ = c.await;
        }
        heal(&sim).await?;
        verify(&sim, "after healing")?;
        if mode.disk == Disk::Synced {
            sim.power_cut(&(0..NODES).collect::<Vec<_>>(), rng.next_u64())
                .await?;
        } else {
            for id in 0..NODES {
                sim.crash(id).await;
            }
        }
        heal(&sim).await?;
        verify(&sim, "after restarting every node")
    }
    .await;
    for id in 0..NODES {
        sim.crash(id).await;
    }
    let checked = result.map_err(|e| format!("{e}; faults: {}", faults.join(", ")))?;
    let violations = sim.violations.lock().unwrap().clone();
    if !violations.is_empty() {
        return Err(format!(
            "{}; faults: {}",
            violations.join("; "),
            faults.join(", ")
        ));
    }
    let h = sim.history.lock().unwrap();
    let accepted: usize = h.values().map(|g| g.accepted.len()).sum();
    let consumed: usize = h.values().map(|g| g.consumed.len()).sum();
    let in_doubt: u64 = h.values().map(|g| g.in_doubt).sum();
    let c = *sim.counters.lock().unwrap();
    if mode.full_disks && c.failed_exits == 0 {
        return Err(format!(
            "no full disk stopped a node ({} disks filled)",
            c.disks_filled
        ));
    }
    if mode.hibernation == Hibernation::On && (c.stops == 0 || c.wakes == 0) {
        return Err(format!(
            "no hibernation to check: {} instances stopped, {} woken",
            c.stops, c.wakes
        ));
    }
    let links = net.stats();
    Ok(format!(
        "{accepted} accepted, {in_doubt} in doubt, {consumed} consumed ({} reads); \
         {} faults: {} partitions, {} crashes, {} restarts, {} leader moves, {} replica \
         moves ({} failed); {checked}; hibernation: {} stops, {} wakes, {} peers lost; \
         {} power cuts ({} with syncs stalled; {} pages lost or damaged); {} disks filled, {} exits on a failed \
         group, {} failed restarts; links {} made {} cut; trace {:016x}",
        c.reads,
        faults.len(),
        c.partitions,
        c.crashes,
        c.restarts,
        c.leader_moves,
        c.replica_moves,
        c.replica_moves_failed,
        c.stops,
        c.wakes,
        c.peers_lost,
        c.power_cuts,
        c.cuts_in_flight,
        c.pages_lost,
        c.disks_filled,
        c.failed_exits,
        c.failed_starts,
        links.links_made,
        links.links_cut,
        crate::trace_digest()
    ))
}

/// The producer of group `g`: one message op at a time to whichever replica leads.
async fn produce(sim: Sim, g: GroupId, mut rng: Rng, stop: watch::Receiver<bool>) {
    let mut seq = 0u64;
    while !*stop.borrow() {
        tokio::time::sleep(Duration::from_millis(rng.between(5, 40))).await;
        if sim.mode.hibernation == Hibernation::On && rng.chance(IDLE_PER_MILLE) {
            // Idle long enough for the group to hibernate.
            let idle = QUIESCE_AFTER.as_millis() as u64;
            tokio::time::sleep(Duration::from_millis(rng.between(2 * idle, 4 * idle))).await;
        }
        let Some((_, handle, machine)) = sim.leader_of(g) else {
            continue;
        };
        seq += 1;
        let mut b = BytesMut::new();
        b.put_u8(OPS_VERSION);
        encode_message(&mut b, machine.next_offset(), &record(g, seq));
        match tokio::time::timeout(CLIENT_TIMEOUT, handle.propose(b.freeze())).await {
            Ok(Ok(position)) => {
                sim.history
                    .lock()
                    .unwrap()
                    .entry(g)
                    .or_default()
                    .accepted
                    .insert(seq, position);
            }
            _ => sim.history.lock().unwrap().entry(g).or_default().in_doubt += 1,
        }
    }
}

fn record(g: GroupId, seq: u64) -> Vec<u8> {
    format!("group {g} message {seq}").into_bytes()
}

/// The producer sequence of a record of group `g`.
fn seq_of(g: GroupId, record: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(record).ok()?;
    text.strip_prefix(&format!("group {g} message "))?
        .parse()
        .ok()
}

/// The consumer of group `g`: reads the live messages of a replica that applied past
/// every acknowledgement committed so far (the leader, most often), checks none of them
/// was consumed, and acknowledges them through the leader.
async fn consume(sim: Sim, g: GroupId, mut rng: Rng, stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        tokio::time::sleep(Duration::from_millis(rng.between(20, 80))).await;
        let Some((node, handle, machine)) = sim.leader_of(g) else {
            continue;
        };
        let ack_index = sim.history.lock().unwrap().entry(g).or_default().ack_index;
        let mut applied = handle.applied();
        let caught_up = tokio::time::timeout(
            CLIENT_TIMEOUT,
            applied.wait_for(|a| a.unwrap_or(0) >= ack_index),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if !caught_up {
            continue;
        }
        sim.counters.lock().unwrap().reads += 1;
        let live = machine.live(0, CONSUME_BATCH);
        if live.is_empty() {
            continue;
        }
        let mut read = Vec::with_capacity(live.len());
        for (offset, position) in &live {
            let seq = match handle.read(*position) {
                Ok(Some(payload)) => message_record(&payload).and_then(|r| seq_of(g, &r)),
                _ => None,
            };
            let Some(seq) = seq else {
                sim.violation(format!(
                    "group {g}: node {node} cannot read live offset {offset} at {position:?}"
                ));
                break;
            };
            read.push((*offset, seq));
        }
        {
            let h = sim.history.lock().unwrap();
            let consumed = &h.get(&g).expect("group").consumed;
            for (offset, seq) in &read {
                if let Some((index, _)) = consumed.get(offset) {
                    sim.violation(format!(
                        "group {g}: offset {offset} (message {seq}) live on node {node}, which \
                         applied past its acknowledgement (entry {index})"
                    ));
                }
            }
        }
        let offsets: Vec<u64> = read.iter().map(|(o, _)| *o).collect();
        let mut b = BytesMut::new();
        b.put_u8(OPS_VERSION);
        encode_ack(&mut b, None, &offsets);
        let acked = tokio::time::timeout(CLIENT_TIMEOUT, handle.propose(b.freeze())).await;
        let mut h = sim.history.lock().unwrap();
        let gh = h.entry(g).or_default();
        match acked {
            Ok(Ok(position)) => {
                for (o, seq) in read {
                    gh.ack_in_doubt.remove(&seq);
                    gh.consumed.insert(o, (position.index, seq));
                }
                gh.ack_index = gh.ack_index.max(position.index);
            }
            _ => {
                for (o, seq) in read {
                    gh.ack_in_doubt.insert(seq, o);
                }
            }
        }
    }
}

/// The fault schedule: one fault every 50–600 ms of cluster time for [`FAULT_PHASE`].
async fn inject(sim: &Sim, rng: &mut Rng, log: &mut Vec<String>) -> Result<(), String> {
    let end = tokio::time::Instant::now() + FAULT_PHASE;
    if sim.mode.full_disks {
        // One disk full from the start, so its node needs a segment within the phase.
        let id = rng.below(NODES);
        sim.fill_disk(id);
        log.push(format!("0ms disk of node {id} full"));
    }
    while tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(rng.between(50, 600))).await;
        let at = crate::elapsed_ms();
        for exit in sim.supervise().await {
            sim_trace!("{exit}");
            log.push(format!("{at}ms {exit}"));
        }
        let up = sim.up();
        let down: Vec<NodeId> = (0..NODES).filter(|id| !up.contains(id)).collect();
        let fault = match rng.below(100) {
            // Checked first: in the full-disk run these replace some partitions.
            0..=9 if sim.mode.full_disks => {
                let full: Vec<NodeId> = sim.full.lock().unwrap().iter().copied().collect();
                match full.first() {
                    // Freed once a node exited on a failed group since it filled (an
                    // operator's answer to the crash loop), not before.
                    Some(&id) if sim.exited_since_fill() && rng.chance(500) => {
                        sim.set_disk_full(id, false);
                        format!("disk of node {id} freed")
                    }
                    None if !up.is_empty() => {
                        let id = up[rng.below(up.len() as u64) as usize];
                        sim.fill_disk(id);
                        format!("disk of node {id} full")
                    }
                    _ => continue,
                }
            }
            0..=14 => {
                let sides: BTreeMap<SocketAddr, u8> = (0..NODES)
                    .map(|id| (addr_of(id), rng.below(2) as u8))
                    .collect();
                let text = format!("partition {:?}", sides.values().collect::<Vec<_>>());
                sim.net.partition(sides);
                sim.counters.lock().unwrap().partitions += 1;
                text
            }
            15..=24 => {
                let per = sim.leaders_per_node();
                let Some((&busiest, _)) = per.iter().max_by_key(|(id, n)| (**n, u64::MAX - **id))
                else {
                    continue;
                };
                let sides = (0..NODES)
                    .map(|id| (addr_of(id), u8::from(id == busiest)))
                    .collect();
                sim.net.partition(sides);
                sim.counters.lock().unwrap().partitions += 1;
                format!("isolate node {busiest} (leads {per:?})")
            }
            25..=39 => {
                sim.net.heal();
                "heal".to_owned()
            }
            40..=52 if down.is_empty() => {
                let id = up[rng.below(up.len() as u64) as usize];
                if sim.mode.disk == Disk::Synced && rng.chance(500) {
                    let window = Duration::from_millis(rng.between(10, 200));
                    sim.power_cut_in_flight(id, window, rng.next_u64()).await?;
                    format!("power cut of node {id} with its syncs stalled for {window:?}")
                } else if sim.mode.disk == Disk::Synced {
                    sim.power_cut(&[id], rng.next_u64()).await?;
                    format!("power cut of node {id}")
                } else {
                    sim.crash(id).await;
                    sim.counters.lock().unwrap().crashes += 1;
                    format!("crash node {id}")
                }
            }
            40..=64 if !down.is_empty() => {
                let id = down[rng.below(down.len() as u64) as usize];
                match sim.start(id, &[]).await {
                    Ok(()) => {
                        sim.counters.lock().unwrap().restarts += 1;
                        format!("restart node {id}")
                    }
                    // A crash loop on a full disk, as Kubernetes would show it.
                    Err(e) if sim.full.lock().unwrap().contains(&id) => {
                        sim.counters.lock().unwrap().failed_starts += 1;
                        format!("restart of node {id} failed on its full disk: {e}")
                    }
                    Err(e) => return Err(e),
                }
            }
            65..=81 => {
                let g = 1 + rng.below(GROUPS);
                let Some((leader, handle, _)) = sim.leader_of(g) else {
                    continue;
                };
                let voters = handle.status().voters;
                let others: Vec<NodeId> = voters
                    .into_iter()
                    .filter(|v| *v != leader && up.contains(v))
                    .collect();
                if others.is_empty() {
                    continue;
                }
                let to = others[rng.below(others.len() as u64) as usize];
                let Some(h) = sim.node(to).and_then(|n| n.host.group(g)) else {
                    continue;
                };
                let outcome = tokio::time::timeout(MOVE_STEP_TIMEOUT, h.campaign()).await;
                sim.counters.lock().unwrap().leader_moves += 1;
                format!(
                    "group {g}: node {to} campaigns (leader {leader}): {}",
                    brief(&outcome)
                )
            }
            82..=99 => match move_replica(sim, rng).await {
                Some(text) => text,
                None => continue,
            },
            _ => continue,
        };
        sim_trace!("fault: {fault}");
        log.push(format!("{at}ms {fault}"));
    }
    Ok(())
}

fn brief<T, E: std::fmt::Display>(r: &Result<Result<T, E>, tokio::time::error::Elapsed>) -> String {
    match r {
        Ok(Ok(_)) => "ok".into(),
        Ok(Err(e)) => format!("refused ({e})"),
        Err(_) => "timed out".into(),
    }
}

/// Moves one replica of a random group from a follower to the node that has none, as the
/// balancer does: learner, caught up, voters changed, old replica removed.
async fn move_replica(sim: &Sim, rng: &mut Rng) -> Option<String> {
    let g = 1 + rng.below(GROUPS);
    let (leader, handle, _) = sim.leader_of(g)?;
    let voters = handle.status().voters;
    let up = sim.up();
    let from_choices: Vec<NodeId> = voters
        .iter()
        .copied()
        .filter(|v| *v != leader && up.contains(v))
        .collect();
    let to = (0..NODES).find(|id| !voters.contains(id) && up.contains(id))?;
    if from_choices.is_empty() {
        return None;
    }
    let from = from_choices[rng.below(from_choices.len() as u64) as usize];
    let text =
        |outcome: &str| format!("group {g}: replica {from} → {to} (leader {leader}): {outcome}");
    let target = sim.node(to)?;
    if target.host.group(g).is_none() {
        let machine = AddressMachine::new();
        if let Err(e) = target.host.open_group(g, machine.clone()).await {
            return Some(text(&format!("not opened: {e}")));
        }
        if let Some(n) = sim.nodes.lock().unwrap().get_mut(&to) {
            n.machines.insert(g, machine);
        }
    }
    sim.counters.lock().unwrap().replica_moves += 1;
    let failed = |sim: &Sim, why: String| {
        sim.counters.lock().unwrap().replica_moves_failed += 1;
        Some(text(&why))
    };
    let added = tokio::time::timeout(
        MOVE_STEP_TIMEOUT,
        handle.add_learner(to, &addr_of(to).to_string()),
    )
    .await;
    if !matches!(added, Ok(Ok(()))) {
        return failed(sim, format!("learner {}", brief(&added)));
    }
    let caught_up = tokio::time::timeout(MOVE_STEP_TIMEOUT, async {
        loop {
            let committed = handle.committed().unwrap_or(0);
            if handle.matched().get(&to).copied().flatten().unwrap_or(0) >= committed {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if caught_up.is_err() {
        return failed(sim, "learner did not catch up".into());
    }
    let mut next = voters.clone();
    next.remove(&from);
    next.insert(to);
    let changed = tokio::time::timeout(MOVE_STEP_TIMEOUT, handle.change_voters(next)).await;
    if !matches!(changed, Ok(Ok(()))) {
        return failed(sim, format!("voters {}", brief(&changed)));
    }
    // The old replica goes once the change no longer names it.
    if let Some(old) = sim.node(from) {
        if let Err(e) = old.host.remove_group(g).await {
            sim.violation(format!(
                "group {g}: node {from} cannot remove its replica: {e}"
            ));
        }
        if let Some(n) = sim.nodes.lock().unwrap().get_mut(&from) {
            n.machines.remove(&g);
        }
    }
    Some(text("done"))
}

/// After the fault phase of the full-disk run: if no node has exited on its full disk yet
/// (it was isolated or down for most of the phase), the network heals, the nodes that are
/// down start, and the load runs on until one does (bounded by [`FULL_DISK_BITES_WITHIN`]
/// of cluster time; the seed then fails on its count).
async fn full_disk_bites(sim: &Sim, log: &mut Vec<String>) -> Result<(), String> {
    if sim.counters.lock().unwrap().failed_exits > 0 {
        return Ok(());
    }
    if sim.full.lock().unwrap().is_empty() {
        if let Some(&id) = sim.up().first() {
            sim.fill_disk(id);
            log.push(format!("{}ms disk of node {id} full", crate::elapsed_ms()));
        }
    }
    sim.net.heal();
    for id in 0..NODES {
        if sim.node(id).is_none() {
            // A restart into the full disk may fail (the crash loop): counted, not fatal.
            if sim.start(id, &[]).await.is_err() {
                sim.counters.lock().unwrap().failed_starts += 1;
            }
        }
    }
    let deadline = tokio::time::Instant::now() + FULL_DISK_BITES_WITHIN;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let exits = sim.supervise().await;
        if !exits.is_empty() {
            let at = crate::elapsed_ms();
            log.extend(exits.into_iter().map(|e| format!("{at}ms {e}")));
            return Ok(());
        }
    }
    Ok(())
}

/// Heals the network, starts every node that is down, and waits until every group has
/// one leader and every voter applied up to its commit.
async fn heal(sim: &Sim) -> Result<(), String> {
    sim.net.heal();
    // Space freed: a node that stopped on its full disk is restarted below.
    let full: Vec<NodeId> = sim.full.lock().unwrap().iter().copied().collect();
    for id in full {
        sim.set_disk_full(id, false);
    }
    sim.supervise().await;
    for id in 0..NODES {
        if sim.node(id).is_none() {
            sim.start(id, &[]).await?;
        }
    }
    let deadline = tokio::time::Instant::now() + CONVERGE_WITHIN;
    for g in 1..=GROUPS {
        loop {
            // A hibernated group is woken on every replica (it may quiesce again later).
            let handles: Vec<GroupHandle> = (0..NODES)
                .filter_map(|id| sim.node(id).and_then(|n| n.host.group(g)))
                .collect();
            for h in handles {
                let _ = tokio::time::timeout(CLIENT_TIMEOUT, h.wake()).await;
            }
            if converged(sim, g).is_ok() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "group {g} did not converge: {}",
                    converged(sim, g).unwrap_err()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Whether group `g` has one leader whose log is committed and applied by every voter.
fn converged(sim: &Sim, g: GroupId) -> Result<(), String> {
    let (leader, handle, _) = sim.leader_of(g).ok_or("no leader")?;
    let status = handle.status();
    let last = status.last_log.ok_or("empty log")?;
    if status.committed != Some(last) {
        return Err(format!(
            "leader {leader} committed {:?} of {last}",
            status.committed
        ));
    }
    for v in &status.voters {
        let h = sim
            .node(*v)
            .and_then(|n| n.host.group(g))
            .ok_or(format!("voter {v} has no replica"))?;
        let s = h.status();
        if s.applied != Some(last) || s.leadership.leader != Some(leader) {
            return Err(format!(
                "voter {v} applied {:?} of {last}, follows {:?}",
                s.applied, s.leadership.leader
            ));
        }
    }
    Ok(())
}

/// The oracle over every group's voters.
fn verify(sim: &Sim, when: &str) -> Result<String, String> {
    let history = sim.history.lock().unwrap();
    let mut checked = 0u64;
    let (mut snapshots, mut purged) = (0u64, 0u64);
    for g in 1..=GROUPS {
        let h = &history[&g];
        let (leader, handle, _) = sim
            .leader_of(g)
            .ok_or(format!("{when}: group {g} has no leader"))?;
        let voters = handle.status().voters;
        let mut views = Vec::new();
        for v in &voters {
            let node = sim
                .node(*v)
                .ok_or(format!("{when}: voter {v} of group {g} down"))?;
            let handle = node
                .host
                .group(g)
                .ok_or(format!("{when}: voter {v} lacks group {g}"))?;
            let machine = node
                .machines
                .get(&g)
                .cloned()
                .ok_or(format!("{when}: no machine"))?;
            let consumed_at: BTreeMap<u64, u64> = h
                .consumed
                .iter()
                .map(|(offset, (_, seq))| (*seq, *offset))
                .collect();
            let mut last_offset = None;
            for (seq, position) in &h.accepted {
                // A consumed message is gone from the index (below the oldest live one):
                // its acknowledgement is checked below, its order here.
                if let Some(offset) = consumed_at.get(seq).copied() {
                    if last_offset.is_some_and(|l| l >= offset) {
                        return Err(format!(
                            "{when}: group {g}: consumed message {seq} at offset {offset} after \
                             offset {last_offset:?} of an earlier one"
                        ));
                    }
                    last_offset = Some(offset);
                    continue;
                }
                let Some(offset) = machine.offset_at(*position) else {
                    // Gone from the index: only if an acknowledgement whose outcome the
                    // consumer never heard did commit.
                    match h.ack_in_doubt.get(seq) {
                        Some(o) if machine.is_acked(DEFAULT_GROUP, *o) => {
                            last_offset = Some(*o);
                            continue;
                        }
                        _ => {
                            return Err(format!(
                                "{when}: group {g} message {seq} accepted at {position:?} is not \
                                 on node {v} (leader {leader})"
                            ))
                        }
                    }
                };
                let payload = handle
                    .read(*position)
                    .map_err(|e| format!("{when}: group {g} node {v} read {position:?}: {e}"))?
                    .ok_or(format!(
                        "{when}: group {g} node {v}: no entry at {position:?}"
                    ))?;
                let stored = message_record(&payload).unwrap_or_default();
                if stored != record(g, *seq) {
                    return Err(format!(
                        "{when}: group {g} node {v}: message {seq} reads {stored:?}"
                    ));
                }
                if machine.is_acked(DEFAULT_GROUP, offset) && !h.ack_in_doubt.contains_key(seq) {
                    return Err(format!(
                        "{when}: group {g} node {v}: message {seq} at offset {offset} acknowledged, \
                         but no consumer's acknowledgement of it committed"
                    ));
                }
                if last_offset.is_some_and(|l| l >= offset) {
                    return Err(format!(
                        "{when}: group {g} node {v}: message {seq} at offset {offset} after offset \
                         {last_offset:?} of an earlier one"
                    ));
                }
                last_offset = Some(offset);
                checked += 1;
            }
            for (offset, (index, _)) in &h.consumed {
                if !machine.is_acked(DEFAULT_GROUP, *offset) {
                    return Err(format!(
                        "{when}: group {g} node {v}: offset {offset}, acknowledged in entry \
                         {index}, is live again"
                    ));
                }
            }
            let status = handle.status();
            snapshots += u64::from(status.snapshot.is_some());
            purged += u64::from(status.purged.is_some());
            views.push((*v, machine.next_offset(), machine.acked(DEFAULT_GROUP)));
        }
        if let Some((first, rest)) = views.split_first() {
            for other in rest {
                if (other.1, &other.2) != (first.1, &first.2) {
                    return Err(format!(
                        "{when}: group {g}: nodes {} and {} disagree: next offset {} vs {}, acks \
                         {:?} vs {:?}",
                        first.0, other.0, first.1, other.1, first.2, other.2
                    ));
                }
            }
        }
    }
    Ok(format!(
        "{when}: {checked} message copies checked, {snapshots} replicas with a snapshot, \
         {purged} with a purged log"
    ))
}
