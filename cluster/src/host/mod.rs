//! The node-level Raft host: what the broker will use to run many groups (issue 12, steps
//! 4 and 5 "Boundaries"), with openraft's types kept inside this crate.
//!
//! # Design: what the broker does with it
//! * **One group per address** (per partition later). The broker opens one [`Host`] per
//!   node — it owns the node's [`NodeLog`] (one segment log, one group commit for every
//!   group), the [`GroupRegistry`], the multiplexed [`TcpNetwork`] and the [`PeerServer`]
//!   — and one [`GroupHandle`] per address it holds a replica of, with the address's
//!   queue as the group's [`GroupMachine`].
//! * **A message is a proposal; its place is a [`Position`].** A producer's message is
//!   one proposal: its payload is the stored message (the broker's encoding, opaque
//!   here). [`GroupHandle::submit`] queues it; the group's batcher (`batch.rs`) packs
//!   whatever is queued into the next entry, with at most [`MAX_ENTRIES_IN_FLIGHT`]
//!   entries in flight, so the more load the more proposals per entry — openraft 0.9's
//!   core waits for each of its leader's appends to be flushed before it takes the next
//!   entry, so one group syncs once per *entry*, not per message. The [`Proposal`]
//!   resolves with `Position { index, slot }` once a majority has the entry on disk and
//!   it is applied here — the broker's `accepted`. The machine's `apply` gets each
//!   proposal with its position; consumers are served by [`GroupHandle::read`], a
//!   zero-copy slice of the node log's mapping: a message's Raft entry *is* its stored
//!   copy, no second write.
//! * **Acks are entries too**: a consumer's settlements are proposed as small entries
//!   holding index ranges (and delivery counts), applied in order by every replica, so a
//!   delivery settled and committed is never delivered again after a failover.
//! * **Leadership** ([`GroupHandle::leadership`], a `watch` of [`Leadership`]) tells the
//!   connection engine where a link's address is led: on this node it serves, elsewhere
//!   it forwards or redirects (step 3), and a change re-routes the links of that group
//!   only. [`GroupError::NotLeader`] names the leader a refused proposal should go to.
//! * **Replicas come and go** with [`Host::open_group`], [`Host::close_group`] (stopped,
//!   state kept: a moved leadership, an idle group) and [`Host::remove_group`] (the
//!   replica moved away: a durable removal in the node log), driven by placement (step 5).
//! * **Snapshots and purge.** A snapshot is the machine's own opaque state (the ack
//!   ranges, counts; not the messages) plus, for a member that installs it, the payloads
//!   of the entries the state still reads — from [`GroupMachine::lowest_needed`] (the
//!   oldest unacknowledged message) to the snapshot's index — which the sender generates
//!   as slices of its log. The host purges a group's log only below the `lowest_needed`
//!   recorded with its last persisted snapshot (and [`HostConfig::purge_keep`] entries
//!   below the snapshot for followers that lag a little), so a message is readable until
//!   its queue no longer needs it; a node-log segment is deleted when no group needs it.
//!   A member that installs a snapshot keeps the carried payloads in its persisted
//!   snapshot and serves them from there ([`GroupHandle::read`] looks in the log, then the
//!   snapshot).
//!
//! # Invariants
//! * A proposal resolves `Ok(position)` only after openraft committed its entry (a majority
//!   of the group's voters have it durable: every node log syncs before it reports an
//!   append flushed) and applied it on this node.
//! * Proposals submitted on one node land in the log in the order they were queued; an
//!   entry that fails fails every proposal in it with the same error.
//! * `read` returns only entries at or below this replica's applied index, byte for byte
//!   as proposed; a payload from the node log is a slice of its mapping, never a copy.
//! * The log of a group is purged only up to `min(snapshot − purge_keep,
//!   lowest_needed − 1)` of its last persisted snapshot.
//! * Every limit is a named constant: [`MAX_PROPOSAL_BYTES`], [`MAX_READ_ENTRIES`],
//!   [`MAX_BATCH_SLOTS`], [`MAX_BATCH_BYTES`], [`MAX_ENTRIES_IN_FLIGHT`],
//!   [`MAX_QUEUED_PROPOSALS`], [`MAX_READ_PROPOSALS`].
//!
//! * **Idle groups hibernate** when [`HostConfig::hibernation`] is set (off by default):
//!   the host's [`Hibernation`] stops a group's Raft instance on every replica once it is
//!   idle, and the group's handle, machine, batcher and leadership watch stay
//!   (`instance.rs`). The registry's starter is the host: a peer's RPC, a write
//!   ([`GroupHandle::submit`] — the batcher holds the instance for each entry, so a stop
//!   never cuts a write), [`GroupHandle::wake`] or the loss of the group's leader starts a
//!   new instance over the kept machine. A write where the group sleeps led by another
//!   node is `NotLeader` without a wake. Reads work while stopped (from the node log, up
//!   to the applied index). A restarted host opens the groups of its node log stopped.
//!
//! # Does not (yet)
//! * Balance leaderships by itself: [`GroupHandle::campaign`] is the tool (an election
//!   started on the replica that should lead; openraft 0.9 has no leader transfer), the
//!   broker's group opener decides when.
//! * Receive a snapshot into a file: an installed snapshot is received and decoded in
//!   memory (bounded by `MAX_SNAPSHOT_BYTES`) and its carried payloads are served from a
//!   heap buffer until the machine no longer needs them; a backlog of gigabytes wants the
//!   received file mapped instead.
//! * Rewrite a needed entry forward: a queue whose oldest message is old pins every
//!   node-log segment after it (the node log's own limit, `node_log/mod.rs`).

mod batch;
mod config;
pub mod handover;
mod instance;
mod machine;
mod snapshot;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, Config, Raft};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{ClusterError, GroupError, Result};
use crate::frame::MAX_RPC_FRAME_BYTES;
use crate::groups::{GroupRegistry, HeardCommit, Stopped};
use crate::hibernate::Hibernation;
use crate::network::TcpNetwork;
use crate::node_log::NodeLog;
use crate::peer_server::{PeerListener, PeerServer};
use crate::placement::GroupId;
use crate::types::{NodeId, TypeConfig, MAX_OPS_BYTES};

pub use batch::{
    Position, HOST_BATCH_VERSION, MAX_BATCH_BYTES, MAX_BATCH_SLOTS, MAX_ENTRIES_IN_FLIGHT,
    MAX_QUEUED_PROPOSALS,
};
pub use machine::{GroupMachine, MachineError};
pub use snapshot::{HOST_SNAPSHOT_VERSION, MAX_CARRIED_ENTRIES};

use batch::Slots;
pub use config::{
    HostConfig, PROPOSE_TIMEOUT, PURGE_KEEP_ENTRIES, SNAPSHOT_EVERY_ENTRIES, SNAPSHOT_EVERY_MAX,
};
pub use instance::HibernationCounters;
use instance::{Instance, Seen, StartFn};

const _: () = assert!(MAX_PROPOSAL_BYTES + batch::ENTRY_OVERHEAD_BYTES <= MAX_OPS_BYTES);
const _: () = assert!(
    (MAX_PAYLOAD_ENTRIES as usize)
        * (batch::ENTRY_OVERHEAD_BYTES + 4 + MAX_PROPOSAL_BYTES + MAX_BATCH_BYTES)
        <= MAX_RPC_FRAME_BYTES / 2
);

/// Directory of the node log inside the host's directory.
pub const HOST_LOG_DIR: &str = "log";
/// Directory of the groups' persisted snapshots (`groups/<id>/snapshot`).
pub const HOST_GROUPS_DIR: &str = "groups";
/// Largest payload one proposal may carry (the broker's largest clustered message); less
/// when the node log's records are smaller (an entry must fit in one record).
pub const MAX_PROPOSAL_BYTES: usize = 4 << 20;
/// Most entries one AppendEntries RPC of a host group carries: entries of up to
/// [`MAX_PROPOSAL_BYTES`] (or a batch of [`MAX_BATCH_BYTES`]) stay well inside the
/// inter-node frame limit.
pub const MAX_PAYLOAD_ENTRIES: u64 = 16;
/// Most entries one [`GroupHandle::read_range`] looks at.
pub const MAX_READ_ENTRIES: u64 = 4096;
/// [`GroupHandle::read_range`] stops after the entry that brings its answer to this many
/// proposals (whole entries only: the caller goes on from the next index).
pub const MAX_READ_PROPOSALS: usize = 16_384;

/// Who leads a group, as this replica knows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Leadership {
    /// The leader this replica knows of (`None` during an election).
    pub leader: Option<NodeId>,
    /// The term it knows.
    pub term: u64,
    /// This node leads the group (and may propose).
    pub leads: bool,
}

/// A group replica's positions, for operators and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupStatus {
    pub leadership: Leadership,
    /// Last index applied to the machine here (committed entries only).
    pub applied: Option<u64>,
    /// Highest index this replica knows committed ([`GroupHandle::committed`]).
    pub committed: Option<u64>,
    /// Last index of the group's log here.
    pub last_log: Option<u64>,
    /// Index of the last snapshot here.
    pub snapshot: Option<u64>,
    /// Entries at or below this are purged from the log here.
    pub purged: Option<u64>,
    /// The group's voters.
    pub voters: BTreeSet<NodeId>,
    /// The group's learners (members receiving the log without a vote).
    pub learners: BTreeSet<NodeId>,
    /// Log index of the membership entry `voters` and `learners` come from (`None`
    /// while the group is stopped, or formed by no entry yet): once `committed` reaches
    /// it, that membership cannot be undone.
    pub membership_index: Option<u64>,
}

/// One node's Raft groups over one node log and one peer port. Clones share the host.
#[derive(Clone)]
pub struct Host {
    inner: Arc<HostInner>,
}

struct HostInner {
    config: HostConfig,
    raft_config: Arc<Config>,
    node_log: NodeLog,
    registry: GroupRegistry,
    network: TcpNetwork,
    server: Mutex<Option<PeerServer>>,
    local_addr: SocketAddr,
    /// Open groups; `None` while one is being opened (so it is opened once).
    /// Ordered: a shutdown stops the groups in the same order every time (a simulation
    /// seed replays exactly).
    groups: Mutex<BTreeMap<GroupId, Option<GroupHandle>>>,
    /// Hibernation of idle groups, when configured ([`HostConfig::hibernation`]).
    hibernation: Option<Arc<Hibernation>>,
    /// Raised when a group opens or closes here, or when one of its replicas here sees
    /// its leadership or its membership change ([`Host::group_changes`]).
    changes: Arc<watch::Sender<u64>>,
    /// The first fatal error a group's Raft stopped with here ([`Host::failure`]).
    failure: Arc<watch::Sender<Option<String>>>,
}

impl Host {
    /// Opens the node log in `config.dir/log` (rebuilding every group's log state) and
    /// serves the inter-node port on `listener`. Groups start with [`Host::open_group`].
    ///
    /// `listener` is a `TcpListener`, or (feature `sim-net`) a simulated network's
    /// listener: the host then dials its peers through that network too.
    pub fn start(config: HostConfig, listener: impl Into<PeerListener>) -> Result<Host> {
        let listener = listener.into();
        let raft_config = config.raft_config()?;
        let node_log = NodeLog::open(config.dir.join(HOST_LOG_DIR), config.log.clone())?;
        let registry = GroupRegistry::new();
        let local_addr = listener
            .local_addr()
            .map_err(|e| ClusterError::io("reading the address of", &config.dir, e))?;
        let network = TcpNetwork::new(config.node)
            .with_secret(config.peer.secret.clone())
            .with_tls(config.peer.tls.clone());
        #[cfg(feature = "sim-net")]
        let network = match &listener {
            PeerListener::Sim(l) => network.with_sim(l.net().clone(), local_addr),
            PeerListener::Tcp(_) => network,
        };
        let server = PeerServer::serve(listener, registry.clone(), config.peer.clone())
            .map_err(|e| ClusterError::io("serving the peer port for", &config.dir, e))?;
        let hibernation = config.hibernation_config().map(|h| {
            let peers = BTreeMap::new();
            Arc::new(Hibernation::start(
                config.node,
                registry.clone(),
                network.clone(),
                peers,
                h,
            ))
        });
        let inner = Arc::new(HostInner {
            config,
            raft_config,
            node_log,
            registry,
            network,
            server: Mutex::new(Some(server)),
            local_addr,
            groups: Mutex::default(),
            hibernation,
            changes: Arc::new(watch::Sender::new(0)),
            failure: Arc::new(watch::Sender::new(None)),
        });
        // Proposals peers forward to this node's groups go to their handles.
        inner
            .registry
            .set_proposer(HostProposer(Arc::downgrade(&inner)));
        // A stopped group is started again through the host: its kept machine, its
        // Raft over the node log, a metrics task for the new instance.
        let weak = Arc::downgrade(&inner);
        inner.registry.set_starter(move |group| {
            let weak = weak.clone();
            async move {
                let inner = weak
                    .upgrade()
                    .ok_or_else(|| instance::start_error(group, "the host is shut down"))?;
                let handle = Host { inner }.group(group).ok_or_else(|| {
                    instance::start_error(group, "not open on this host (or still opening)")
                })?;
                handle.start_instance().await
            }
        });
        Ok(Host { inner })
    }

    /// Hibernation counters (all zero but `hosted`/`running` without hibernation).
    pub fn hibernation_counters(&self) -> HibernationCounters {
        let r = &self.inner.registry;
        let h = self.inner.hibernation.as_deref();
        HibernationCounters {
            hosted: r.len(),
            running: r.running_count(),
            wakes: r.wakes(),
            stops: r.stops(),
            group_rpcs_received: r.group_rpcs_received(),
            peers_lost: h.map_or(0, Hibernation::peers_lost),
            refusals: h.map_or(0, Hibernation::refusals),
            peers_watched: h.map_or(0, Hibernation::watched_peers),
            lost_peer_wakes: h.map(Hibernation::lost_peer_wakes).unwrap_or_default(),
            lag: h.map(|h| h.lag().0).unwrap_or_default(),
            liveness_timeout: h.map(|h| h.lag().1).unwrap_or_default(),
        }
    }

    /// Serves the hand-over requests peers send to this node with `handler` from now on
    /// (`handover.rs`; without one, they are refused).
    pub fn set_hand_over_handler(&self, handler: impl handover::HandOverHandler) {
        self.inner.registry.set_hand_over_handler(handler);
    }

    /// Serves the application requests peers send to this node with `handler` from now
    /// on (`app_request.rs`; without one, peers are answered "no handler").
    pub fn set_app_handler(&self, handler: impl crate::app_request::AppHandler) {
        self.inner.registry.set_app_handler(handler);
    }

    /// Sends `payload` as an application request to node `target` at member address
    /// `addr`, over this node's shared peer connection to it (`app_request.rs`), and
    /// waits up to `timeout` (at most [`crate::APP_TIMEOUT_MAX`]) for the answer.
    pub async fn app_request(
        &self,
        target: NodeId,
        addr: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> std::result::Result<Bytes, crate::AppCallError> {
        self.inner
            .network
            .app_request(target, addr, payload, timeout)
            .await
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.inner.config.node
    }

    /// The inter-node port's address (what peers put in a member address).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The node log (metrics: bytes appended and synced).
    pub fn node_log(&self) -> &NodeLog {
        &self.inner.node_log
    }

    /// Groups the node log holds state of (after a restart: the groups to open again).
    pub fn recovered_groups(&self) -> Result<Vec<GroupId>> {
        let mut ids = self.inner.node_log.group_ids()?;
        ids.sort_unstable();
        Ok(ids)
    }

    /// A counter raised whenever a group opens or closes on this host, or one of its
    /// replicas here sees its leader, its term, its membership (voters, learners, their
    /// addresses) change, or applies the entry of its latest membership (that membership
    /// is committed). What follows every group's leadership and membership (the broker's
    /// opener and balancer) waits on this instead of visiting every group on a timer.
    /// Heartbeats and other entries do not raise it.
    pub fn group_changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// The first fatal error one of this node's groups stopped with (`None` while
    /// none did): a storage failure of the node log — a full disk, a failed sync — or a
    /// bug. openraft does not run a group on after one, and the other groups share the
    /// node log, so the node can no longer be trusted to take part: the broker exits on
    /// it so that it is restarted and replays its log (as the one-group mode does).
    pub fn failure(&self) -> watch::Receiver<Option<String>> {
        self.inner.failure.subscribe()
    }

    /// The handle of an open group.
    pub fn group(&self, group: GroupId) -> Option<GroupHandle> {
        self.lock_groups().get(&group).cloned().flatten()
    }

    fn lock_groups(&self) -> std::sync::MutexGuard<'_, BTreeMap<GroupId, Option<GroupHandle>>> {
        // A poisoned lock only means a panic elsewhere; the map is whole.
        self.inner.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts this node's replica of `group` with `machine`: its log from the node log
    /// (empty for a new group), the machine restored from the group's persisted snapshot
    /// if any, then openraft re-applies the committed log after it. A new group is formed
    /// with [`GroupHandle::bootstrap`] on one member.
    ///
    /// With [`HostConfig::hibernation`], a group whose entries the node log already holds
    /// (a restart) is opened *stopped*: the machine is restored from its snapshot, but no
    /// Raft instance starts until a write, a peer's RPC, [`GroupHandle::wake`] or the loss
    /// of its leader wakes it; its leadership is what its persisted vote says (the voted
    /// leader once that vote is committed). Until it wakes, the machine has applied only
    /// up to its snapshot: reads above that are `NotApplied`.
    pub async fn open_group<M: GroupMachine>(
        &self,
        group: GroupId,
        machine: M,
    ) -> Result<GroupHandle> {
        {
            let mut groups = self.lock_groups();
            if groups.contains_key(&group) {
                return Err(ClusterError::GroupAlreadyOpen { group });
            }
            groups.insert(group, None);
        }
        let opened = self.start_group(group, machine).await;
        let mut groups = self.lock_groups();
        match opened {
            Ok(handle) => {
                groups.insert(group, Some(handle.clone()));
                drop(groups);
                note_change(&self.inner.changes);
                Ok(handle)
            }
            Err(e) => {
                groups.remove(&group);
                Err(e)
            }
        }
    }

    async fn start_group<M: GroupMachine>(
        &self,
        group: GroupId,
        machine: M,
    ) -> Result<GroupHandle> {
        let inner = &self.inner;
        let shared = Arc::new(GroupShared {
            group,
            node_log: inner.node_log.clone(),
            snapshot_dir: inner
                .config
                .dir
                .join(HOST_GROUPS_DIR)
                .join(group.to_string()),
            carried: RwLock::default(),
            applied: watch::Sender::new(None),
            purge_keep: inner.config.purge_keep,
            snapshot_inline: inner.config.snapshot_inline,
            purge_to: watch::Sender::new(None),
            heard_commit: std::sync::OnceLock::new(),
            generation: AtomicU64::new(0),
            seen: Mutex::default(),
            changes: Arc::clone(&inner.changes),
            failure: Arc::clone(&inner.failure),
            writes_held: watch::Sender::new(false),
            batcher_quiet: watch::Sender::new(false),
        });
        let adapter = machine::Adapter::open(Arc::clone(&shared), machine)?;
        let restored = adapter.restored();
        let (queue, queued) = mpsc::channel(MAX_QUEUED_PROPOSALS);
        let limits = batch::Limits::for_record(inner.config.log.record_bytes_max);
        let handle = GroupHandle {
            instance: Instance {
                group,
                node: inner.config.node,
                registry: inner.registry.clone(),
            },
            start: self.start_fn(group, adapter),
            shared,
            leadership: watch::Sender::new(Leadership::default()),
            queue,
            proposal_bytes: limits.proposal_bytes,
            propose_timeout: inner.config.propose_timeout,
            leader_lease: inner.config.election_timeout.end,
            hibernation: inner.hibernation.clone(),
            network: inner.network.group(group),
        };
        let recovered = match inner.hibernation {
            Some(_) => instance::recovered_stopped(&inner.node_log, group)?,
            None => None,
        };
        let registered = match recovered {
            Some(stopped) => self.register_stopped(&handle, stopped, restored),
            None => self.register_started(&handle).await,
        };
        registered?;
        tokio::spawn(batch::run(
            handle.instance.clone(),
            queued,
            limits,
            handle.addresses(),
            Arc::clone(&handle.shared),
        ));
        Ok(handle)
    }

    /// How `group`'s instances start: openraft over its node-log storage and the kept
    /// `adapter` (the machine as it stands).
    fn start_fn<M: GroupMachine>(&self, group: GroupId, adapter: machine::Adapter<M>) -> StartFn {
        // Not the host itself: the host holds the handle that holds this.
        let node = self.node();
        let raft_config = Arc::clone(&self.inner.raft_config);
        let network = self.inner.network.clone();
        let node_log = self.inner.node_log.clone();
        Arc::new(move || {
            let adapter = adapter.clone();
            let raft_config = Arc::clone(&raft_config);
            let network = network.group(group);
            let node_log = node_log.clone();
            Box::pin(async move {
                let log = node_log.group(group)?;
                Raft::new(node, raft_config, network, log, adapter)
                    .await
                    .map_err(|e| ClusterError::GroupStopped {
                        group,
                        reason: e.to_string(),
                    })
            })
        })
    }

    async fn register_started(&self, handle: &GroupHandle) -> Result<()> {
        let raft = handle.start_instance().await?;
        match self.inner.registry.insert(handle.group(), raft.clone()) {
            Ok(heard) => {
                let _ = handle.shared.heard_commit.set(heard);
                Ok(())
            }
            Err(e) => {
                let _ = raft.shutdown().await;
                Err(e)
            }
        }
    }

    /// Registers a group recovered from the node log stopped: its leadership from its
    /// vote, its members from its log (or its snapshot), watched by the hibernation.
    fn register_stopped(
        &self,
        handle: &GroupHandle,
        stopped: Stopped,
        restored: machine::Restored,
    ) -> Result<()> {
        let group = handle.group();
        let members = instance::last_members(&self.inner.node_log, group)?;
        let members = members.unwrap_or(restored.membership);
        handle.note_members(&members, restored.snapshot);
        instance::publish(
            &handle.leadership,
            instance::stopped_leadership(self.node(), &stopped),
        );
        let heard = self.inner.registry.insert_stopped(group, stopped)?;
        let _ = handle.shared.heard_commit.set(heard);
        Ok(())
    }

    /// Stops this node's replica of `group`: peers' RPCs for it are refused as for an
    /// unknown group from now on, its state stays in the node log and its snapshot, and
    /// [`Host::open_group`] starts it again (a replica moving away, or an idle one
    /// stopped). False when the group is not open (or still opening).
    pub async fn close_group(&self, group: GroupId) -> bool {
        let handle = {
            let mut groups = self.lock_groups();
            match groups.get(&group) {
                Some(Some(_)) => groups.remove(&group).flatten(),
                _ => None,
            }
        };
        let Some(handle) = handle else {
            return false;
        };
        if let Some(raft) = self.inner.registry.remove(handle.group()) {
            let _ = raft.shutdown().await;
        }
        handle.forget_members();
        note_change(&self.inner.changes);
        true
    }

    /// Removes this node's replica of `group` for good (it moved to another node, or the
    /// address was deleted): stops it, writes a durable removal record to the node log
    /// (its entries no longer keep segments) and deletes its snapshot. Call it after the
    /// group's membership no longer names this node.
    pub async fn remove_group(&self, group: GroupId) -> Result<()> {
        if matches!(self.lock_groups().get(&group), Some(None)) {
            return Err(ClusterError::GroupAlreadyOpen { group });
        }
        self.close_group(group).await;
        self.inner.node_log.remove_group(group).await?;
        let dir = self
            .inner
            .config
            .dir
            .join(HOST_GROUPS_DIR)
            .join(group.to_string());
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ClusterError::io("removing", dir, e)),
        }
    }

    /// Stops every group and the peer port, as a process exit would (the node log keeps
    /// everything durable; [`Host::start`] on the same directory recovers it).
    pub async fn shutdown(self) {
        if let Some(h) = &self.inner.hibernation {
            h.stop();
        }
        let handles: Vec<GroupHandle> = std::mem::take(&mut *self.lock_groups())
            .into_values()
            .flatten()
            .collect();
        for handle in handles {
            if let Some(raft) = self.inner.registry.remove(handle.group()) {
                let _ = raft.shutdown().await;
            }
        }
        let server = self
            .inner
            .server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(server) = server {
            server.shutdown().await;
        }
    }
}

/// Raises the host's change counter ([`Host::group_changes`]).
fn note_change(changes: &watch::Sender<u64>) {
    changes.send_modify(|n| *n = n.wrapping_add(1));
}

/// Serves forwarded proposals with the host's group handles (`forward.rs`).
struct HostProposer(std::sync::Weak<HostInner>);

impl crate::forward::Proposer for HostProposer {
    fn propose(&self, group: GroupId, payload: Bytes) -> Option<crate::forward::ProposeFuture> {
        let inner = self.0.upgrade()?;
        let handle = Host { inner }.group(group)?;
        Some(Box::pin(async move { handle.propose(payload).await }))
    }
}

/// What a group's handle, its state-machine adapter and its metrics task share.
pub(crate) struct GroupShared {
    group: GroupId,
    node_log: NodeLog,
    snapshot_dir: PathBuf,
    /// Payload entries a snapshot install brought that the node log does not hold.
    carried: RwLock<BTreeMap<u64, Slots>>,
    /// Last index applied to the machine.
    applied: watch::Sender<Option<u64>>,
    purge_keep: u64,
    /// [`HostConfig::snapshot_inline`].
    snapshot_inline: bool,
    /// The log may be purged up to this index (from the last persisted snapshot).
    purge_to: watch::Sender<Option<u64>>,
    /// The leader's commit index as the peer server last heard it for this group.
    heard_commit: std::sync::OnceLock<HeardCommit>,
    /// The latest instance started (only its metrics task publishes the leadership).
    generation: AtomicU64,
    /// Members and snapshot as last seen: what `status` reports while stopped.
    seen: Mutex<Seen>,
    /// The host's change counter ([`Host::group_changes`]).
    changes: Arc<watch::Sender<u64>>,
    /// The host's first fatal group error ([`Host::failure`]).
    failure: Arc<watch::Sender<Option<String>>>,
    /// Set during a hand-over: the batcher forms no entry (`batch.rs`, `handover.rs`).
    writes_held: watch::Sender<bool>,
    /// Set by the batcher while held with no entry in flight.
    batcher_quiet: watch::Sender<bool>,
}

impl GroupShared {
    /// Takes the persisted snapshot `snap` (at `last`) as the group's: its carried
    /// entries are what reads below the log find; the purge bound follows it.
    fn set_snapshot(&self, last: Option<u64>, snap: &snapshot::HostSnapshot) {
        *self.carried.write().unwrap_or_else(|e| e.into_inner()) = snap.entries.clone();
        let bound = last.and_then(|last| {
            let below_snapshot = last.checked_sub(self.purge_keep)?;
            let below_needed = snap.lowest_needed.checked_sub(1)?;
            Some(below_snapshot.min(below_needed))
        });
        self.purge_to.send_if_modified(|to| {
            if bound > *to {
                *to = bound;
                true
            } else {
                false
            }
        });
    }

    /// First index the node log may hold for this group (after its purge point).
    fn log_first_held(&self) -> Result<u64> {
        let state = self.node_log.log_state(self.group)?;
        Ok(state
            .last_purged_log_id
            .map_or(0, |p| p.index.saturating_add(1)))
    }

    fn carried_range(&self, from: u64, to: u64) -> Result<BTreeMap<u64, Slots>> {
        if from >= to {
            return Ok(BTreeMap::new());
        }
        let carried = self.carried.read().unwrap_or_else(|e| e.into_inner());
        Ok(carried
            .range(from..to)
            .map(|(i, b)| (*i, b.clone()))
            .collect())
    }

    /// Payload entries of `from..to` the node log holds (zero-copy slices).
    fn log_payloads(&self, from: u64, to: u64) -> Result<Vec<(u64, Slots)>> {
        let entries = self.node_log.entries(self.group, from..to)?;
        Ok(entries
            .into_iter()
            .filter_map(|e| match e.payload {
                openraft::EntryPayload::Normal(r) => Some((e.log_id.index, Slots::of(r)?)),
                _ => None,
            })
            .collect())
    }

    /// The payloads of entry `index`: from the node log, else carried by a snapshot.
    fn slots(&self, index: u64) -> Result<Option<Slots>> {
        let entries = self
            .node_log
            .entries(self.group, index..index.saturating_add(1))?;
        if let Some(entry) = entries.into_iter().next() {
            return Ok(match entry.payload {
                openraft::EntryPayload::Normal(r) => Slots::of(r),
                _ => None,
            });
        }
        let carried = self.carried.read().unwrap_or_else(|e| e.into_inner());
        match carried.get(&index) {
            Some(slots) => Ok(Some(slots.clone())),
            None => Err(ClusterError::Purged {
                group: self.group,
                index,
            }),
        }
    }
}

/// One group's replica on this host: propose, read, leadership. Cheap to clone. It
/// outlives the group's Raft instances: with hibernation, the instance stops when the
/// group is idle and starts again on the next write (`instance.rs`); reads, the
/// leadership watch and the applied index work either way.
#[derive(Clone)]
pub struct GroupHandle {
    /// The group's current Raft instance, through the registry.
    instance: Instance,
    /// Starts a new instance over the kept machine (a wake).
    start: StartFn,
    hibernation: Option<Arc<Hibernation>>,
    shared: Arc<GroupShared>,
    leadership: watch::Sender<Leadership>,
    /// The batcher's queue (`batch.rs`).
    queue: mpsc::Sender<batch::Queued>,
    /// Largest proposal: [`MAX_PROPOSAL_BYTES`], or less for small node-log records.
    proposal_bytes: usize,
    propose_timeout: Duration,
    /// openraft's `election_timeout_max` of this host: how long a follower that accepted
    /// this leader's heartbeat refuses other candidates ([`GroupHandle::leader_lease`]).
    leader_lease: Duration,
    /// The group's network over the node's peer links: where
    /// [`GroupHandle::propose_anywhere`] forwards to the leader.
    network: TcpNetwork,
}

/// A submitted proposal: resolves to its position (entry index and slot) once its entry
/// is committed and applied here.
pub struct Proposal {
    inner: Pin<Box<dyn Future<Output = Result<Position, GroupError>> + Send>>,
}

impl Future for Proposal {
    type Output = Result<Position, GroupError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl GroupHandle {
    /// The group's id.
    pub fn group(&self) -> GroupId {
        self.shared.group
    }

    /// Starts a new instance of the group (a wake, or the open) and its metrics task.
    async fn start_instance(&self) -> Result<Raft<TypeConfig>> {
        let raft = (self.start)().await?;
        let generation = self.shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::spawn(instance::follow_metrics(
            self.clone(),
            raft.clone(),
            generation,
        ));
        Ok(raft)
    }

    /// Makes sure the group runs here: a stopped group is started (a former leader comes
    /// back as leader). The machine then applies what the group committed; a group
    /// opened stopped at a restart has applied only up to its snapshot before.
    pub async fn wake(&self) -> Result<(), GroupError> {
        self.instance.running().await.map(|_| ())
    }

    /// Whether the group's Raft instance runs here (false while it hibernates).
    pub fn is_running(&self) -> bool {
        self.instance.current().is_some()
    }

    /// The group is in use (an attach, a consumer's flow): with hibernation, it does not
    /// hibernate for another `quiesce_after`. Writes need no touch.
    pub fn touch(&self) {
        if let Some(h) = &self.hibernation {
            h.touch(self.group());
        }
    }

    /// One round of the leader's lease: this node must lead the group. openraft's
    /// `get_read_log_id` sends every voter a fresh heartbeat carrying this leader's vote
    /// and succeeds once a quorum of the effective membership (this leader counted, a joint
    /// configuration in both halves) answered with anything but a higher vote. Each voter
    /// that accepted it refuses every candidate for [`Self::leader_lease`] after it
    /// received it (openraft 0.9: `vote.touch(now)` on the accepted heartbeat,
    /// `Engine::handle_vote_req` refuses while `now <= vote_utime + election_timeout_max`),
    /// and every quorum that could elect another leader shares a voter with the quorum
    /// that answered. So a caller that read its clock *before* calling knows no other
    /// leader of this group can exist before that instant plus [`Self::leader_lease`]
    /// (less a margin for clock rates; the broker's `raft/lease.rs` keeps it).
    ///
    /// A group hibernated here is woken first, and the instance is held for the round as
    /// for a write (a stop cannot cut it); a group stopped here and led elsewhere is
    /// `NotLeader` without a wake. A round no quorum answers within [`Self::leader_lease`]
    /// is [`GroupError::Timeout`] (a later answer could not extend anything anyway).
    /// Errors: `NotLeader` (naming the leader when known), `NoQuorum` (a higher vote
    /// answered, or too few voters), `Stopped`, `Timeout`.
    pub async fn lease_round(&self) -> Result<(), GroupError> {
        let group = self.group();
        let after = self.leader_lease;
        let round = async {
            let (raft, _hold) = self.instance.hold(self.addresses()).await?;
            match raft.get_read_log_id().await {
                Ok(_) => Ok(()),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    Err(GroupError::NotLeader {
                        group,
                        leader: f.leader_id,
                        leader_addr: f.leader_node.map(|n| n.addr),
                    })
                }
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
                    Err(GroupError::NoQuorum {
                        group,
                        reason: e.to_string(),
                    })
                }
                Err(RaftError::Fatal(e)) => Err(self.stopped(e)),
            }
        };
        tokio::time::timeout(after, round)
            .await
            .map_err(|_| GroupError::Timeout { group, after })?
    }

    /// How long after receiving one of this leader's lease rounds a voter refuses every
    /// other candidate: the host's longest election timeout (openraft's
    /// `election_timeout_max`). A lease built on [`Self::lease_round`] must be shorter.
    pub fn leader_lease(&self) -> Duration {
        self.leader_lease
    }

    /// Members as seen in `m` (and the snapshot index): kept for `status` and
    /// `NotLeader` while stopped; the hibernation pings every member.
    fn note_members(&self, m: &openraft::Membership<NodeId, BasicNode>, snapshot: Option<u64>) {
        let mut seen = self.shared.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.snapshot = snapshot;
        let changed = m.nodes().count() != seen.nodes.len()
            || m.nodes().any(|(id, n)| seen.nodes.get(id) != Some(&n.addr))
            || m.voter_ids().count() != seen.voters.len()
            || m.voter_ids().any(|v| !seen.voters.contains(&v));
        if !changed {
            return;
        }
        note_change(&self.shared.changes);
        let before = std::mem::replace(&mut *seen, Seen::of(m, snapshot));
        if let Some(h) = &self.hibernation {
            for (id, addr) in &seen.nodes {
                if !before.nodes.contains_key(id) {
                    h.add_group_peer(*id, addr.clone());
                }
            }
            for id in before.nodes.keys() {
                if !seen.nodes.contains_key(id) {
                    h.drop_group_peer(*id);
                }
            }
        }
    }

    /// The group leaves this host: its members no longer count for the pinged peers.
    fn forget_members(&self) {
        let seen = std::mem::take(&mut *self.shared.seen.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(h) = &self.hibernation {
            for id in seen.nodes.keys() {
                h.drop_group_peer(*id);
            }
        }
    }

    /// A closure naming a member's address, for `NotLeader` from the batcher.
    fn addresses(&self) -> impl Fn(NodeId) -> Option<String> + Send + Sync + 'static {
        let shared = Arc::clone(&self.shared);
        move |id| {
            let seen = shared.seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.nodes.get(&id).cloned()
        }
    }

    /// Forms the group with `members` (node → member address) as its voters; done once,
    /// on one member. A group already formed answers `Ok`.
    pub async fn bootstrap(&self, members: &BTreeMap<NodeId, String>) -> Result<(), GroupError> {
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .iter()
            .map(|(id, addr)| (*id, BasicNode::new(addr)))
            .collect();
        let raft = self.instance.running().await?;
        match raft.initialize(nodes).await {
            Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(RaftError::APIError(e)) => Err(GroupError::Membership {
                group: self.group(),
                reason: e.to_string(),
            }),
            Err(RaftError::Fatal(e)) => Err(self.stopped(e)),
        }
    }

    /// Queues `payload` as the group's next proposal (this node must lead the group) and
    /// returns once it is queued, in order behind every earlier submission on this node;
    /// it waits only while [`MAX_QUEUED_PROPOSALS`] are queued, and at most the propose
    /// timeout ([`GroupError::Timeout`], nothing queued). The [`Proposal`] resolves
    /// with its [`Position`] when its entry is committed and applied here. Whatever is
    /// queued while earlier entries are in flight goes in one entry (`batch.rs`): submit
    /// many before awaiting them, and one entry and one group commit carry them all.
    pub async fn submit(&self, payload: Bytes) -> Result<Proposal, GroupError> {
        if payload.len() > self.proposal_bytes {
            return Err(GroupError::TooLarge {
                len: payload.len(),
                max: self.proposal_bytes,
            });
        }
        let group = self.group();
        let after = self.propose_timeout;
        let (done, answer) = oneshot::channel();
        // A full queue (a leader without a quorum stops draining it) must not hold the
        // caller forever: waiting for room counts against the propose timeout.
        let queued = self.queue.send(batch::Queued { payload, done });
        match tokio::time::timeout(after, queued).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(self.stopped("the group's batcher ended")),
            Err(_) => return Err(GroupError::Timeout { group, after }),
        }
        Ok(self.proposal(answer))
    }

    /// [`Self::submit`] without waiting: `Ok(None)` when [`MAX_QUEUED_PROPOSALS`] are
    /// queued already (nothing is queued then). For a caller that must not await between
    /// numbering its proposals and queueing them (the broker's group store).
    pub fn try_submit(&self, payload: Bytes) -> Result<Option<Proposal>, GroupError> {
        if payload.len() > self.proposal_bytes {
            return Err(GroupError::TooLarge {
                len: payload.len(),
                max: self.proposal_bytes,
            });
        }
        let (done, answer) = oneshot::channel();
        match self.queue.try_send(batch::Queued { payload, done }) {
            Ok(()) => Ok(Some(self.proposal(answer))),
            Err(mpsc::error::TrySendError::Full(_)) => Ok(None),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(self.stopped("the group's batcher ended"))
            }
        }
    }

    /// The proposal whose outcome `answer` will carry, bounded by the propose timeout.
    fn proposal(&self, answer: oneshot::Receiver<Result<Position, GroupError>>) -> Proposal {
        let (group, after) = (self.group(), self.propose_timeout);
        let inner = async move {
            match tokio::time::timeout(after, answer).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(GroupError::Stopped {
                    group,
                    reason: "Raft stopped before answering".into(),
                }),
                Err(_) => Err(GroupError::Timeout { group, after }),
            }
        };
        Proposal {
            inner: Box::pin(inner),
        }
    }

    /// [`Self::submit`] and wait for the commit: the proposal's position.
    pub async fn propose(&self, payload: Bytes) -> Result<Position, GroupError> {
        self.submit(payload).await?.await
    }

    /// [`Self::propose`] from any replica: here when this node leads the group, else
    /// forwarded to the leader this replica knows of over the node's peer connection
    /// (`forward.rs`), and again to the leader a `NotLeader` answer names, at most
    /// [`crate::forward::MAX_FORWARD_HOPS`] times. While no leader is known it waits for
    /// one. Bounded by the propose timeout in all. The position is the leader's: read it
    /// here once [`Self::applied`] reaches it. Errors as [`Self::propose`], plus
    /// [`GroupError::Busy`] (the leader serves too many forwarded proposals) and
    /// [`GroupError::Forward`] (no answer from the leader: outcome unknown).
    pub async fn propose_anywhere(&self, payload: Bytes) -> Result<Position, GroupError> {
        let group = self.group();
        if payload.len() > self.proposal_bytes {
            return Err(GroupError::TooLarge {
                len: payload.len(),
                max: self.proposal_bytes,
            });
        }
        let deadline = tokio::time::Instant::now() + self.propose_timeout;
        let mut named: Option<(NodeId, String)> = None;
        let mut last = GroupError::NotLeader {
            group,
            leader: None,
            leader_addr: None,
        };
        for _ in 0..crate::forward::MAX_FORWARD_HOPS {
            let target = match named.take() {
                Some(t) => Some(t),
                None => self.known_leader(deadline).await?,
            };
            let Some((leader, addr)) = target.filter(|(id, _)| *id != self.instance.node) else {
                return self.propose(payload).await;
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let timeout = left.min(crate::forward::FORWARD_TIMEOUT_MAX);
            let answer = self
                .network
                .forward_proposal(leader, &addr, &payload, timeout)
                .await;
            match answer {
                Ok(Ok(at)) => return Ok(at),
                Ok(Err(e)) => {
                    named = crate::forward::next_hop(&e);
                    let retry = matches!(e, GroupError::NotLeader { .. } | GroupError::Busy { .. });
                    if !retry {
                        return Err(e);
                    }
                    last = e;
                    if named.is_none() {
                        tokio::time::sleep(crate::forward::FORWARD_RETRY_PAUSE).await;
                    }
                }
                Err(crate::PeerCallError::Refused(crate::RemoteRefusal::UnknownGroup(_))) => {
                    // The leader we knew does not host the group (any more): ask again.
                    tokio::time::sleep(crate::forward::FORWARD_RETRY_PAUSE).await;
                }
                Err(crate::PeerCallError::Connect { .. }) => {
                    // Nothing was sent (a leader that died, its port closed): wait for
                    // this replica to see another leader, then go there.
                    let mut watch = self.leadership();
                    let moved = watch.wait_for(|l| l.leader.is_some_and(|l| l != leader));
                    let _ = tokio::time::timeout_at(deadline, moved).await;
                }
                Err(e) => {
                    return Err(GroupError::Forward {
                        group,
                        leader,
                        reason: e.to_string(),
                    })
                }
            }
        }
        Err(last)
    }

    /// [`Self::propose_anywhere`] for a replica that may know no leader (a node joining:
    /// its replica of group 0 is empty until a leader adds it). When this replica knows
    /// a leader (or leads), exactly `propose_anywhere`; else the payload is sent to each
    /// of `seeds` in turn (member addresses, such as the initial peers), a `NotLeader`
    /// answer naming the leader followed at most [`crate::forward::MAX_FORWARD_HOPS`]
    /// times, each attempt bounded by [`crate::forward::FORWARD_TIMEOUT_MAX`]. Errors:
    /// the last seed's (nothing committed, except after [`GroupError::Forward`] or
    /// [`GroupError::Timeout`], whose outcome is unknown).
    pub async fn propose_via(
        &self,
        seeds: &[(NodeId, String)],
        payload: Bytes,
    ) -> Result<Position, GroupError> {
        if self.leadership().borrow().leader.is_some() {
            return self.propose_anywhere(payload).await;
        }
        let group = self.group();
        if payload.len() > self.proposal_bytes {
            return Err(GroupError::TooLarge {
                len: payload.len(),
                max: self.proposal_bytes,
            });
        }
        let mut last = GroupError::NotLeader {
            group,
            leader: None,
            leader_addr: None,
        };
        for seed in seeds.iter().filter(|(id, _)| *id != self.instance.node) {
            match self.forward_from(seed.clone(), &payload).await {
                Ok(at) => return Ok(at),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Sends `payload` to `first`, then to the leader each `NotLeader` names.
    async fn forward_from(
        &self,
        first: (NodeId, String),
        payload: &Bytes,
    ) -> Result<Position, GroupError> {
        let group = self.group();
        let mut target = first;
        let mut last = GroupError::NotLeader {
            group,
            leader: None,
            leader_addr: None,
        };
        for _ in 0..crate::forward::MAX_FORWARD_HOPS {
            let (leader, addr) = &target;
            let timeout = crate::forward::FORWARD_TIMEOUT_MAX;
            let answer = self
                .network
                .forward_proposal(*leader, addr, payload, timeout)
                .await;
            match answer {
                Ok(Ok(at)) => return Ok(at),
                Ok(Err(e)) => match crate::forward::next_hop(&e) {
                    Some(next) if next.0 != self.instance.node => {
                        last = e;
                        target = next;
                    }
                    _ => return Err(e),
                },
                Err(e) => {
                    return Err(GroupError::Forward {
                        group,
                        leader: *leader,
                        reason: e.to_string(),
                    })
                }
            }
        }
        Err(last)
    }

    /// The leader this replica knows of with its member address, waiting (up to
    /// `deadline`) while none is known; `None` when this node leads.
    async fn known_leader(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<Option<(NodeId, String)>, GroupError> {
        let group = self.group();
        let mut watch = self.leadership();
        let known = tokio::time::timeout_at(deadline, watch.wait_for(|l| l.leader.is_some()));
        let seen = match known.await {
            Ok(Ok(l)) => *l,
            Ok(Err(_)) => return Err(self.stopped("the leadership watch ended")),
            Err(_) => {
                let after = self.propose_timeout;
                return Err(GroupError::Timeout { group, after });
            }
        };
        if seen.leads {
            return Ok(None);
        }
        let Some(leader) = seen.leader else {
            return Ok(None);
        };
        match (self.addresses())(leader) {
            Some(addr) => Ok(Some((leader, addr))),
            None => Err(GroupError::NotLeader {
                group,
                leader: Some(leader),
                leader_addr: None,
            }),
        }
    }

    /// The payload proposed at `at`: `Ok(None)` when entry `at.index` is a blank or
    /// membership entry or has no such slot, [`ClusterError::NotApplied`] above this
    /// replica's applied index, [`ClusterError::Purged`] below what the group keeps. From
    /// the node log the bytes are a slice of its mapping (no copy).
    pub fn read(&self, at: Position) -> Result<Option<Bytes>> {
        self.check_applied(at.index)?;
        match self.shared.slots(at.index)? {
            Some(slots) => slots.get(at.slot),
            None => Ok(None),
        }
    }

    /// Every payload of entry `index`, in slot order (empty for a blank or membership
    /// entry); errors as [`Self::read`].
    pub fn read_entry(&self, index: u64) -> Result<Vec<Bytes>> {
        self.check_applied(index)?;
        match self.shared.slots(index)? {
            Some(slots) => slots.payloads(),
            None => Ok(Vec::new()),
        }
    }

    fn check_applied(&self, index: u64) -> Result<()> {
        let applied = *self.shared.applied.borrow();
        if applied.is_none_or(|a| index > a) {
            return Err(ClusterError::NotApplied {
                group: self.group(),
                index,
                applied,
            });
        }
        Ok(())
    }

    /// The payloads of the entries in `range` (blank and membership entries have none),
    /// in order, with their positions; at most [`MAX_READ_ENTRIES`] entries are looked
    /// at, nothing above the applied index, and no entry after the one that reaches
    /// [`MAX_READ_PROPOSALS`]. Entries the group no longer keeps are
    /// left out; a range that starts above the applied index is
    /// [`ClusterError::NotApplied`], one that starts below everything kept and finds
    /// nothing [`ClusterError::Purged`].
    pub fn read_range(&self, range: Range<u64>) -> Result<Vec<(Position, Bytes)>> {
        let group = self.group();
        let applied = *self.shared.applied.borrow();
        let Some(applied) = applied else {
            return Err(ClusterError::NotApplied {
                group,
                index: range.start,
                applied,
            });
        };
        if range.start > applied {
            return Err(ClusterError::NotApplied {
                group,
                index: range.start,
                applied: Some(applied),
            });
        }
        let end = range
            .end
            .min(applied.saturating_add(1))
            .min(range.start.saturating_add(MAX_READ_ENTRIES));
        let first_held = self.shared.log_first_held()?;
        let mut entries: Vec<(u64, Slots)> = self
            .shared
            .carried_range(range.start, end.min(first_held))?
            .into_iter()
            .collect();
        let from_carried = entries.last().map(|(i, _)| *i);
        let in_log = self.shared.log_payloads(range.start.max(first_held), end)?;
        entries.extend(in_log.into_iter().filter(|(i, _)| Some(*i) > from_carried));
        if entries.is_empty() && range.start < first_held && range.start < end {
            let carried = self
                .shared
                .carried
                .read()
                .unwrap_or_else(|e| e.into_inner());
            if carried.range(..first_held).next().is_none() {
                return Err(ClusterError::Purged {
                    group,
                    index: range.start,
                });
            }
        }
        let mut out = Vec::new();
        for (index, slots) in entries {
            if out.len() >= MAX_READ_PROPOSALS {
                break;
            }
            for (slot, payload) in slots.payloads()?.into_iter().enumerate() {
                out.push((Position::new(index, slot as u32), payload));
            }
        }
        Ok(out)
    }

    /// Who leads the group, updated on every change this replica sees.
    pub fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.subscribe()
    }

    /// The last index applied to the machine here (only committed entries are applied).
    pub fn applied(&self) -> watch::Receiver<Option<u64>> {
        self.shared.applied.subscribe()
    }

    /// The highest index this replica knows to be committed: what it applied, or the
    /// leader's commit index as the last `append_entries` here carried it (a follower
    /// learns of a commit one round later than the leader; openraft 0.9's metrics do not
    /// show it).
    pub fn committed(&self) -> Option<u64> {
        let applied = *self.shared.applied.borrow();
        let heard = self.shared.heard_commit.get().and_then(HeardCommit::get);
        applied.max(heard)
    }

    /// Where this replica stands (while the group is stopped: as it stopped, the log's
    /// positions from the node log).
    pub fn status(&self) -> GroupStatus {
        let Some(raft) = self.instance.current() else {
            return self.stopped_status();
        };
        let m = raft.metrics().borrow().clone();
        GroupStatus {
            leadership: *self.leadership.borrow(),
            applied: *self.shared.applied.borrow(),
            committed: self.committed(),
            last_log: m.last_log_index,
            snapshot: m.snapshot.map(|s| s.index),
            purged: m.purged.map(|p| p.index),
            voters: m.membership_config.membership().voter_ids().collect(),
            learners: m.membership_config.membership().learner_ids().collect(),
            membership_index: m.membership_config.log_id().map(|l| l.index),
        }
    }

    fn stopped_status(&self) -> GroupStatus {
        let log = self.shared.node_log.log_state(self.group()).ok();
        let seen = self
            .shared
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        GroupStatus {
            leadership: *self.leadership.borrow(),
            applied: *self.shared.applied.borrow(),
            committed: self.committed(),
            last_log: log.as_ref().and_then(|l| l.last_log_id).map(|l| l.index),
            snapshot: seen.snapshot,
            purged: log.and_then(|l| l.last_purged_log_id).map(|l| l.index),
            learners: seen
                .nodes
                .keys()
                .filter(|n| !seen.voters.contains(n))
                .copied()
                .collect(),
            membership_index: None,
            voters: seen.voters,
        }
    }

    /// Builds a snapshot now (besides every `snapshot_every` entries) and waits until it
    /// covers what was applied when called, up to the propose timeout (a stopped group is
    /// woken for it).
    pub async fn snapshot_now(&self) -> Result<(), GroupError> {
        let raft = self.instance.running().await?;
        // Not stopped while it builds (a stop would wait for the next idle check).
        let _hold = self.instance.registry.begin_write(self.group());
        let target = *self.shared.applied.borrow();
        let timeout = GroupError::Timeout {
            group: self.group(),
            after: self.propose_timeout,
        };
        let deadline = tokio::time::Instant::now() + self.propose_timeout;
        let mut metrics = raft.metrics();
        loop {
            let before = metrics.borrow_and_update().snapshot.map(|s| s.index);
            if before >= target {
                return Ok(());
            }
            // A trigger while a build runs is dropped by openraft: trigger again when the
            // snapshot moves and still does not cover the target.
            raft.trigger()
                .snapshot()
                .await
                .map_err(|e| self.stopped(e))?;
            let moved = metrics.wait_for(|m| m.snapshot.map(|s| s.index) != before);
            match tokio::time::timeout_at(deadline, moved).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return Err(self.stopped("Raft stopped")),
                Err(_) => return Err(timeout),
            }
        }
    }

    /// Whether this node's log holds nothing of the group — no entry, no purge point, no
    /// vote: the group never formed here (or not yet), so [`Self::bootstrap`] would
    /// initialize it. Read from the node log, not from openraft's metrics, which a
    /// just-started instance has not filled in yet.
    pub fn is_pristine(&self) -> Result<bool> {
        let group = self.group();
        let log = self.shared.node_log.log_state(group)?;
        let vote = self.shared.node_log.vote(group)?;
        Ok(log.last_log_id.is_none() && log.last_purged_log_id.is_none() && vote.is_none())
    }

    /// Starts an election with this replica as the candidate, now (openraft's
    /// `trigger().elect()`; a no-op where it leads already): how a group's preferred
    /// leader takes the group over, since openraft 0.9 has no leader transfer. It wins
    /// only with an up-to-date log and a majority of votes; a voter that heard its leader
    /// within the election timeout refuses (openraft's leader lease), so on a healthy
    /// group of three the candidate needs the current leader's own vote. A lost campaign
    /// costs an election: call it rarely (the opener backs off). Returns once the
    /// election is started, not won: watch [`Self::leadership`].
    pub async fn campaign(&self) -> Result<(), GroupError> {
        let raft = self.instance.running().await?;
        raft.trigger().elect().await.map_err(|e| self.stopped(e))
    }

    /// Adds `node` (member address `addr`) as a learner and waits until it has caught up
    /// (from the log, or by installing a snapshot). This node must lead the group.
    pub async fn add_learner(&self, node: NodeId, addr: &str) -> Result<(), GroupError> {
        let (raft, _hold) = self.instance.hold(self.addresses()).await?;
        let result = raft.add_learner(node, BasicNode::new(addr), true).await;
        result.map(|_| ()).map_err(|e| self.write_error(e))
    }

    /// Adds `node` (member address `addr`) as a learner and returns once the membership
    /// entry naming it is committed, without waiting for it to catch up: watch
    /// [`Self::matched`] (the balancer bounds that wait itself). This node must lead.
    pub async fn start_learner(&self, node: NodeId, addr: &str) -> Result<(), GroupError> {
        let (raft, _hold) = self.instance.hold(self.addresses()).await?;
        let result = raft.add_learner(node, BasicNode::new(addr), false).await;
        result.map(|_| ()).map_err(|e| self.write_error(e))
    }

    /// Removes `learners` (members without a vote) from the group: the leader stops
    /// sending them the log. A voter among them is refused. This node must lead.
    pub async fn remove_learners(&self, learners: BTreeSet<NodeId>) -> Result<(), GroupError> {
        let (raft, _hold) = self.instance.hold(self.addresses()).await?;
        let change = openraft::ChangeMembers::RemoveNodes(learners);
        let result = raft.change_membership(change, false).await;
        result.map(|_| ()).map_err(|e| self.write_error(e))
    }

    /// On the leader: the last log index each other member (voter or learner) is known
    /// to hold (`None`: nothing matched yet). Empty where this node does not lead or the
    /// group is stopped.
    pub fn matched(&self) -> BTreeMap<NodeId, Option<u64>> {
        let Some(raft) = self.instance.current() else {
            return BTreeMap::new();
        };
        let m = raft.metrics().borrow().clone();
        m.replication
            .map(|r| {
                r.iter()
                    .filter(|(n, _)| **n != m.id)
                    .map(|(n, l)| (*n, l.map(|l| l.index)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Makes `voters` the group's voters (joint consensus; learners must exist for the
    /// new ones). This node must lead the group.
    pub async fn change_voters(&self, voters: BTreeSet<NodeId>) -> Result<(), GroupError> {
        let (raft, _hold) = self.instance.hold(self.addresses()).await?;
        let result = raft.change_membership(voters, false).await;
        result.map(|_| ()).map_err(|e| self.write_error(e))
    }

    /// Like [`Self::change_voters`], but a voter that leaves stays a *learner*: it still
    /// receives the log, so it sees the membership that leaves it out and its commit (a
    /// voter removed outright never hears of either, the leader stops sending to it at
    /// once). Remove it with [`Self::remove_learners`] once it has.
    pub async fn replace_voters(&self, voters: BTreeSet<NodeId>) -> Result<(), GroupError> {
        let (raft, _hold) = self.instance.hold(self.addresses()).await?;
        let result = raft.change_membership(voters, true).await;
        result.map(|_| ()).map_err(|e| self.write_error(e))
    }

    fn write_error(&self, e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> GroupError {
        let group = self.group();
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => GroupError::NotLeader {
                group,
                leader: f.leader_id,
                leader_addr: f.leader_node.map(|n| n.addr),
            },
            RaftError::APIError(e) => GroupError::Membership {
                group,
                reason: e.to_string(),
            },
            RaftError::Fatal(e) => self.stopped(e),
        }
    }

    fn stopped(&self, e: impl std::fmt::Display) -> GroupError {
        GroupError::Stopped {
            group: self.group(),
            reason: e.to_string(),
        }
    }
}
