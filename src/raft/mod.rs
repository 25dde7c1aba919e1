//! A clustered broker node: the broker's store replicated through one Raft group
//! (`entrepot-cluster`, openraft), served by whichever node leads it.
//!
//! What this owns:
//! * the Raft instance of the node, its inter-node port ([`PeerServer`]) and its state
//!   machine ([`StoreMachine`]: the node's store);
//! * *activation*: when this node becomes leader it makes sure everything committed is
//!   applied, cuts any local tail the previous leadership never committed, rebuilds the
//!   broker's queues from the store (the restart path) and serves clients; when it stops
//!   leading it closes every client connection and drops the broker (producers waiting for
//!   a commit hear an error and resend to the new leader);
//! * the *replicator* of an active leader: takes the store operations queued since the last
//!   batch, submits them as one Raft entry (several in flight, submitted in order), and
//!   raises the committed watch as entries commit — a producer's transfer is accepted only
//!   then;
//! * the *delivery lease* of an active leader (`lease.rs`): renewed by majority rounds,
//!   so that a leader paused and deposed in the meantime delivers nothing from its stale
//!   queues when it resumes (`broker::lease` gates every connection's writes);
//! * the *front door*: the AMQP listener of every node, and its amqps listener when a
//!   certificate is configured (both share one connection cap). The leader serves the
//!   connection (doing the TLS handshake itself on the amqps listener); a follower forwards
//!   it byte for byte to the leader's port of the same kind, so a client or router may
//!   attach anywhere. A follower never decrypts: TLS passes through it to the leader, which
//!   sees the client's SNI and picks the address space from it, so every node must serve
//!   the same certificate (`--tls-cert`/`--tls-key`).
//!
//! Invariants:
//! * At most one broker per node, and only while this node is the Raft leader.
//! * Its clients' sockets get no delivery after the lease ran out (see `lease.rs`).
//! * The store is written only by the applier, or by the active broker through
//!   [`Replication`]; both keep offsets identical on every node.
//!
//! * *membership of its own*: unless `--no-auto-join`, a node asks the leader to make it a
//!   voter at every start (`entrepot_cluster::membership::auto_join`; a member is told so
//!   and nothing changes), and `POST /cluster/drain` takes it out before a scale-down
//!   (`drain.rs`).
//!
//! * compaction: the state machine snapshots the store every `--raft-snapshot-every`
//!   entries (`snapshot.rs`) so openraft can purge the log; lagging or new members install
//!   the snapshot.
//!
//! One Raft group covers every address: simple, and one leader's group commit batches all
//! addresses together. ARCHITECTURE.md explains how the per-address split follows.

pub mod address_machine;
pub mod admin;
pub mod balancer;
pub mod drain;
mod error;
pub mod group_driver;
pub mod group_opener;
pub mod group_queue;
pub mod group_router;
pub mod group_store;
pub mod groups_membership;
pub mod groups_node;
pub mod handover;
pub mod lease;
pub mod link_forward;
pub mod meta_machine;
pub mod metadata_level;
mod proxy;
pub mod replicator;
pub mod rounds;
pub mod snapshot;
pub mod state_machine;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use entrepot_cluster::identity::Peer;
use entrepot_cluster::membership;
use entrepot_cluster::{LogStore, NodeId, PeerServer, PeerServerOptions, TcpNetwork, TypeConfig};
use entrepot_storage::LogConfig;
use openraft::{BasicNode, Raft, ServerState, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::auth::Gatekeeper;
use crate::broker::lease::DeliveryLease;
use crate::broker::replication::Replication;
use crate::broker::store::{DiskGuard, Store};
use crate::broker::Broker;
use crate::config::BrokerConfig;
use crate::connection::{self, Accepted};
use crate::server::{Listeners, StartError};
use crate::tls::TlsFiles;
pub use error::{ActivationError, ClusterStartError};
use state_machine::StoreMachine;

/// How often a clustered node syncs its store in the background, whatever `--sync` says
/// (except `never`): the store is not the copy a message's acceptance waits for — the Raft
/// log is — so this paces writeback, it promises nothing (see [`store_sync`]).
pub const STORE_SYNC_INTERVAL: Duration = Duration::from_millis(100);
/// How often a node measures the free space of its data directory's filesystem.
pub const DISK_CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// Free space kept beyond one new Raft-log segment and one new store segment; below the
/// sum, the leader refuses new messages (see `DiskGuard`).
pub const DISK_RESERVE_MARGIN: u64 = 64 << 20;
/// Raft heartbeat period.
pub const HEARTBEAT_MS: u64 = 40;
/// Election timeout range: a follower that hears no leader for this long campaigns. In
/// openraft 0.9 a follower first waits out the leader's lease (= the range's maximum), so
/// a dead leader is replaced after 240 ms + 120…240 ms: well within a second.
pub const ELECTION_TIMEOUT_MS: (u64, u64) = (120, 240);
/// What a node's clients are told when it stops leading (deposed, or drained out of the
/// voters).
const STOPPED_LEADING: &str = "this node stopped leading; resend to the new leader";
/// How often an active leader checks that a majority still hears it.
pub const QUORUM_CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// A leader that cannot confirm its leadership with a majority for this long stops serving
/// clients (openraft 0.9 keeps it `Leader` until it hears of a newer term): its clients are
/// disconnected and reconnect to the majority's side instead of waiting forever.
pub const QUORUM_LOSS: Duration = Duration::from_millis(4 * ELECTION_TIMEOUT_MS.1);
/// Pause between two rounds of the quorum check within one [`QUORUM_LOSS`] period.
pub const QUORUM_RETRY: Duration = Duration::from_millis(50);
/// How long a new connection waits for a leader to be known before it is closed.
pub const LEADER_WAIT: Duration = Duration::from_secs(5);
/// Directory of the Raft log inside the data directory.
pub const RAFT_DIR: &str = "raft";
/// Largest Raft entry (one replicated batch: about 4 MiB plus at most one message).
pub const RAFT_RECORD_MAX: u32 = 16 << 20;
/// Largest message a clustered node takes: every message travels inside a Raft entry
/// and an AppendEntries RPC, whose frame is bounded (`MAX_RPC_FRAME_BYTES`).
pub const MAX_CLUSTER_MESSAGE_BYTES: u64 = 4 << 20;
/// Most entries one AppendEntries RPC carries: with batches of about 4 MiB (+ one
/// message) this stays under a quarter of the inter-node frame limit.
pub const MAX_PAYLOAD_ENTRIES: u64 = 8;
/// Raft entries between two snapshots of the store (each entry one replicated batch).
pub const SNAPSHOT_EVERY_ENTRIES: u64 = 16 * 1024;
/// Entries kept in the Raft log before the last snapshot, so a follower that lags by less
/// catches up from the log instead of installing a snapshot.
pub const LOG_KEPT_AFTER_SNAPSHOT: u64 = 1024;
/// Segment size of the Raft log.
pub const RAFT_SEGMENT_BYTES: u64 = 256 << 20;

/// How this node joins a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub node_id: NodeId,
    /// The initial members (this node among them, unless it joins later: by itself with
    /// [`ClusterConfig::auto_join`], or through `entrepot cluster add`); the joiner asks
    /// them first. Empty: wait to be added.
    pub peers: Vec<Peer>,
    /// Where the inter-node port listens.
    pub listen: SocketAddr,
    /// Raft entries between two store snapshots ([`SNAPSHOT_EVERY_ENTRIES`]).
    pub snapshot_every: u64,
    /// The shared secret peers prove they know before any RPC (`--cluster-secret-file`);
    /// `None`: the inter-node port admits anyone who can reach it.
    pub secret: Option<Arc<entrepot_cluster::PeerSecret>>,
    /// TLS on the inter-node port, mutually authenticated against the cluster CA
    /// (`--cluster-tls-cert/-key/-ca`); `None`: plain TCP.
    pub tls: Option<Arc<entrepot_cluster::PeerTls>>,
    /// Ask the leader to make this node a voter at start (see the module docs), as the
    /// member address given; `None`: wait for `entrepot cluster add` (`--no-auto-join`).
    pub auto_join: Option<String>,
    /// In `cluster-mode: groups`, the highest metadata level this node advertises and
    /// runs at (`--metadata-level-max`, hidden: for tests and upgrades;
    /// `meta_machine::METADATA_LEVEL_MAX` by default; `metadata_level.rs`).
    pub metadata_level_max: u8,
}

/// What the front door does with a new connection.
#[derive(Clone)]
pub enum Role {
    /// No leader known (an election is running, or this node is cut off).
    Unknown,
    /// Another node leads: forward plain connections to its AMQP address and TLS ones to
    /// its amqps address (both from its member address).
    Follower {
        leader: NodeId,
        amqp: String,
        amqps: String,
    },
    /// This node leads and its broker is serving.
    Leader(Arc<Active>),
}

/// The broker of an active leader and what stops it.
pub struct Active {
    pub broker: Arc<Broker>,
    pub gate: Arc<Gatekeeper>,
    replication: Arc<Replication>,
    /// Until when this leader may deliver (renewed by `lease::renew_one_group`).
    lease: Arc<DeliveryLease>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Active {
    fn stop(&self, reason: &str) {
        // Its clients hear the same reason when their connections close — recorded before
        // the store fails, so a connection that sees the failure also sees why, and closes
        // with `connection-forced` rather than an internal error.
        self.broker.closing_because(reason);
        self.replication.fail(reason);
        // Nothing more is written to a client: connections waiting for a renewal close.
        self.lease.end();
        let _ = self.shutdown.send(true);
    }
}

/// A running clustered node.
pub struct ClusterNode {
    pub id: NodeId,
    pub raft: Raft<TypeConfig>,
    pub amqp_addr: SocketAddr,
    /// The amqps listener, when a certificate is configured.
    pub amqps_addr: Option<SocketAddr>,
    pub http_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    role: watch::Receiver<Role>,
    tasks: Vec<JoinHandle<()>>,
    peer_server: PeerServer,
    machine: StoreMachine,
    /// The Raft log's sync policy, as opened (from `--sync`).
    raft_log_sync: entrepot_storage::SyncPolicy,
}

impl ClusterNode {
    /// Opens the store and the Raft log, joins the cluster and serves until `shutdown`.
    pub async fn start(
        mut config: BrokerConfig,
        cluster: ClusterConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Result<ClusterNode, ClusterStartError> {
        crate::server::settle_config(&mut config);
        // Loaded before Raft starts, so a bad certificate fails the start.
        let tls = crate::server::load_tls(&config)?;
        cap_message_size(&mut config);
        let (machine, log_store) = open_state(&config)?;
        let raft_log_sync = log_store.log().config().sync;
        let network = TcpNetwork::new(cluster.node_id)
            .with_secret(cluster.secret.clone())
            .with_tls(cluster.tls.clone());
        let raft = start_raft(&cluster, network.clone(), log_store, &machine).await?;
        let peer_server = start_peer_server(&cluster, &raft).await?;
        let peer_addr = peer_server.local_addr();
        initialize(&raft, &cluster).await?;
        let (drain_tx, drain_rx) = watch::channel(drain::DrainState::Serving);

        let listeners = Listeners::bind(&config).await?;
        let (amqp_addr, http_addr, amqps_addr) = (
            listeners.amqp_addr,
            listeners.http_addr,
            listeners.amqps_addr,
        );
        let id = cluster.node_id;
        tracing::info!(node = id, amqp = %amqp_addr, amqps = %listeners.amqps_shown(), http = %http_addr,
            peers = %peer_addr, data_dir = %config.data_dir.display(), sync = %raft_log_sync,
            "entrepot cluster node listening");
        let (role_tx, role_rx) = watch::channel(Role::Unknown);
        let join = cluster
            .auto_join
            .clone()
            .map(|addr| membership::JoinConfig {
                id,
                addr,
                seeds: cluster.peers.clone(),
                network: network.clone(),
            });
        let node_tasks = NodeTasks {
            raft: raft.clone(),
            machine: machine.clone(),
            config: Arc::new(config),
            tls,
            role: role_rx.clone(),
            shutdown,
            drain: drain_rx,
            handle: admin::HandleParts {
                heard_commit: peer_server.heard_commit(),
                network,
                drain: Arc::new(drain_tx),
                lease_lapses: Arc::new(AtomicU64::new(0)),
            },
            join,
        };
        let tasks = node_tasks.spawn(listeners, role_tx);
        Ok(ClusterNode {
            id,
            raft,
            amqp_addr,
            amqps_addr,
            http_addr,
            peer_addr,
            role: role_rx,
            tasks,
            peer_server,
            machine,
            raft_log_sync,
        })
    }

    /// The sync policy the Raft log was opened with: `--sync`, as on a single node.
    pub fn raft_log_sync(&self) -> entrepot_storage::SyncPolicy {
        self.raft_log_sync
    }

    /// Completes if this node's Raft stops on a fatal error (a storage failure, a bug):
    /// the node can no longer take part, and the process should exit so that it is
    /// restarted (and replays its log) rather than linger half alive.
    pub async fn failed(&self) -> String {
        let mut metrics = self.raft.metrics();
        let failed = metrics
            .wait_for(|m| m.running_state.is_err())
            .await
            .map(|m| match &m.running_state {
                Err(e) => e.to_string(),
                Ok(()) => String::new(),
            });
        failed.unwrap_or_else(|_| "Raft stopped".into())
    }

    /// What the front door currently does.
    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    /// Waits for shutdown, stops Raft, and flushes the store.
    pub async fn stopped(self) -> Result<(), StartError> {
        for t in self.tasks {
            let _ = t.await;
        }
        self.peer_server.shutdown().await;
        let _ = self.raft.shutdown().await;
        let (log, acks) = self.machine.logs();
        let final_sync = |log: &'static str| move |source| StartError::FinalSync { log, source };
        log.flush().map_err(final_sync("store"))?;
        acks.log().flush().map_err(final_sync("ack log"))?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// A clustered node carries at most [`MAX_CLUSTER_MESSAGE_BYTES`] per message (one Raft
/// entry must hold it): a larger `max-message-bytes` is lowered, and the log says so.
fn cap_message_size(config: &mut BrokerConfig) {
    if config.max_message_bytes > MAX_CLUSTER_MESSAGE_BYTES {
        tracing::info!(
            configured = config.max_message_bytes,
            limit = MAX_CLUSTER_MESSAGE_BYTES,
            "clustered: largest message lowered to the replication limit"
        );
        config.max_message_bytes = MAX_CLUSTER_MESSAGE_BYTES;
    }
}

/// Opens what this node keeps on disk: the store (as the Raft state machine, from its
/// persisted snapshot) and the Raft log. A data directory holding a single node's
/// messages and no Raft log is refused.
fn open_state(config: &BrokerConfig) -> Result<(StoreMachine, LogStore), ClusterStartError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::CreateDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let record_max = Broker::record_bytes_max(config);
    let (log, acks) = tokio::task::block_in_place(|| {
        Store::open_parts(
            &config.data_dir,
            store_sync(config.sync),
            config.segment_bytes,
            record_max,
        )
    })
    .map_err(|e| StartError::OpenStore {
        path: config.data_dir.clone(),
        source: e.into(),
    })?;
    let raft_dir = raft_dir(&config.data_dir);
    if !raft_dir.exists() && log.next_offset() > 0 {
        return Err(ClusterStartError::SingleNodeStore {
            dir: config.data_dir.clone(),
            messages: log.next_offset(),
        });
    }
    let machine = StoreMachine::open(config.data_dir.clone(), &raft_dir, log, Arc::new(acks))
        .map_err(ClusterStartError::Snapshot)?;
    // `--sync` governs the Raft log: an append is acknowledged to the leader (and a
    // message accepted, once a majority acknowledged) only as `sync` allows.
    let raft_config = LogConfig {
        segment_bytes: RAFT_SEGMENT_BYTES,
        record_bytes_max: RAFT_RECORD_MAX,
        sync: config.sync,
        ..LogConfig::default()
    };
    let log_store = tokio::task::block_in_place(|| LogStore::open(&raft_dir, raft_config))
        .map_err(ClusterStartError::RaftLog)?;
    Ok((machine, log_store))
}

/// Starts this node's Raft instance over its log and state machine.
async fn start_raft(
    cluster: &ClusterConfig,
    network: TcpNetwork,
    log_store: LogStore,
    machine: &StoreMachine,
) -> Result<Raft<TypeConfig>, ClusterStartError> {
    let raft_settings = openraft::Config {
        cluster_name: "entrepot".into(),
        heartbeat_interval: HEARTBEAT_MS,
        election_timeout_min: ELECTION_TIMEOUT_MS.0,
        election_timeout_max: ELECTION_TIMEOUT_MS.1,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cluster.snapshot_every.max(1)),
        max_in_snapshot_log_to_keep: LOG_KEPT_AFTER_SNAPSHOT.min(cluster.snapshot_every),
        max_payload_entries: MAX_PAYLOAD_ENTRIES,
        ..Default::default()
    }
    .validate()
    .map_err(|e| ClusterStartError::RaftSettings(Box::new(e)))?;
    let id = cluster.node_id;
    Raft::new(
        id,
        Arc::new(raft_settings),
        network,
        log_store,
        machine.clone(),
    )
    .await
    .map_err(|e| ClusterStartError::RaftStart(Box::new(e)))
}

/// Binds the inter-node port and serves Raft's RPCs on it (warning when peers are neither
/// authenticated nor encrypted). The node's one Raft is the cluster crate's metadata group
/// (group 0, `METADATA_GROUP`): `PeerServer::start_with` registers it as such, and every
/// RPC and membership request of this node names that group.
async fn start_peer_server(
    cluster: &ClusterConfig,
    raft: &Raft<TypeConfig>,
) -> Result<PeerServer, ClusterStartError> {
    let peer_listener =
        TcpListener::bind(cluster.listen)
            .await
            .map_err(|source| ClusterStartError::BindPeers {
                addr: cluster.listen,
                source,
            })?;
    if cluster.secret.is_none() && cluster.tls.is_none() {
        tracing::warn!(
            "no --cluster-secret-file: the inter-node port admits any peer that can reach it"
        );
    }
    if cluster.tls.is_none() {
        tracing::warn!("no --cluster-tls-cert/-key/-ca: inter-node traffic is not encrypted");
    }
    let options = PeerServerOptions {
        secret: cluster.secret.clone(),
        tls: cluster.tls.clone(),
    };
    Ok(PeerServer::start_with(
        peer_listener,
        raft.clone(),
        options,
    )?)
}

/// What a started node's tasks share: its Raft, its store, its settings, the amqps
/// certificate, the front door's role, the drain state and the shutdown signal; what the
/// admin API needs; the joiner's settings when it auto-joins.
struct NodeTasks {
    raft: Raft<TypeConfig>,
    machine: StoreMachine,
    config: Arc<BrokerConfig>,
    tls: Option<Arc<TlsFiles>>,
    role: watch::Receiver<Role>,
    shutdown: watch::Receiver<bool>,
    drain: watch::Receiver<drain::DrainState>,
    handle: admin::HandleParts,
    join: Option<membership::JoinConfig>,
}

impl NodeTasks {
    /// Spawns the node's tasks: leadership (which activates the broker while this node
    /// leads and sets `role`), the front door of each client listener, the HTTP endpoint,
    /// and the joiner when the node auto-joins.
    fn spawn(self, listeners: Listeners, role: watch::Sender<Role>) -> Vec<JoinHandle<()>> {
        let NodeTasks {
            raft,
            machine,
            config,
            tls,
            role: role_rx,
            shutdown,
            drain,
            handle,
            join,
        } = self;
        let permits = Arc::new(Semaphore::new(config.max_connections));
        let lease_lapses = Arc::clone(&handle.lease_lapses);
        let handle = admin::ClusterHandle::new(raft.clone(), role_rx.clone(), handle);
        let mut tasks = Vec::new();
        if let Some(join) = join {
            let (raft, shutdown, mut draining) = (raft.clone(), shutdown.clone(), drain.clone());
            // A drain ends the joiner: a node on its way out must not ask to join again.
            tasks.push(tokio::spawn(async move {
                tokio::select! {
                    _ = membership::auto_join(raft, join, shutdown) => {}
                    _ = draining.wait_for(|d| *d != drain::DrainState::Serving) => {
                        tracing::info!("draining: no longer asking to join");
                    }
                }
            }));
        }
        let leading = Leading {
            raft,
            machine,
            config,
            lease_lapses,
        };
        tasks.push(tokio::spawn(leadership(leading, role, shutdown.clone())));
        let door = |listener, kind| {
            let front = FrontDoor {
                door: kind,
                role: role_rx.clone(),
                drain: drain.clone(),
            };
            tokio::spawn(front.run(listener, Arc::clone(&permits), shutdown.clone()))
        };
        tasks.push(door(listeners.amqp, Door::Plain));
        if let (Some(listener), Some(tls)) = (listeners.amqps, tls) {
            tasks.push(door(listener, Door::Tls(tls)));
        }
        tasks.push(tokio::spawn(crate::metrics::serve_http_source(
            listeners.http,
            crate::metrics::Source::Cluster(Arc::new(handle)),
            shutdown,
        )));
        tasks
    }
}

/// The sync policy of a clustered node's store. The Raft log is the durable copy (a message
/// is accepted once a majority's Raft logs hold it, synced per `--sync`); the store is
/// rebuilt from the last snapshot and the Raft log after a crash, and flushed before every
/// snapshot, so nobody waits for its syncs. It is still synced every
/// [`STORE_SYNC_INTERVAL`], so its dirty pages go to disk in small steady amounts instead
/// of the kernel's large writeback bursts that would stall the Raft log's syncs behind
/// them — unless `--sync never`, which asks for no sync at all.
pub fn store_sync(sync: entrepot_storage::SyncPolicy) -> entrepot_storage::SyncPolicy {
    match sync {
        entrepot_storage::SyncPolicy::Never => entrepot_storage::SyncPolicy::Never,
        _ => entrepot_storage::SyncPolicy::Interval(STORE_SYNC_INTERVAL),
    }
}

/// The smallest-id initial member forms the cluster when its log is empty; everyone else
/// waits to hear from a leader. A node absent from `peers` joins by itself (auto-join) or
/// waits to be added (`entrepot cluster add`).
async fn initialize(
    raft: &Raft<TypeConfig>,
    cluster: &ClusterConfig,
) -> Result<(), ClusterStartError> {
    let first = cluster.peers.iter().map(|p| p.id).min();
    if first != Some(cluster.node_id) || raft.is_initialized().await? {
        return Ok(());
    }
    let members: std::collections::BTreeMap<NodeId, BasicNode> = cluster
        .peers
        .iter()
        .map(|p| (p.id, BasicNode::new(&p.addr)))
        .collect();
    match raft.initialize(members).await {
        Ok(()) => tracing::info!(members = cluster.peers.len(), "cluster formed"),
        Err(e) => tracing::info!(error = %e, "cluster already formed"),
    }
    Ok(())
}

/// What the leadership task activates a broker with.
struct Leading {
    raft: Raft<TypeConfig>,
    machine: StoreMachine,
    config: Arc<BrokerConfig>,
    /// Lapses of this node's delivery lease, over all its leaderships (a metric).
    lease_lapses: Arc<AtomicU64>,
}

/// Follows Raft's view of the leader: activates the broker on becoming leader, stops it on
/// losing leadership, and tells the front door where clients go.
async fn leadership(
    leading: Leading,
    role: watch::Sender<Role>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Leading {
        raft,
        machine,
        config,
        ref lease_lapses,
    } = leading;
    // Big enough for a new Raft-log segment and a new store segment (both preallocated).
    let reserve = RAFT_SEGMENT_BYTES + config.segment_bytes + DISK_RESERVE_MARGIN;
    let guard = Arc::new(DiskGuard::new(&config.data_dir, reserve));
    let mut disk_check = tokio::time::interval(DISK_CHECK_INTERVAL);
    let mut metrics = raft.metrics();
    let id = raft.metrics().borrow().id;
    let mut active: Option<Arc<Active>> = None;
    // A follower's store is tended here (the leader's broker does its own housekeeping).
    let mut reclaim = tokio::time::interval(crate::broker::HOUSEKEEPING_INTERVAL * 4);
    let mut quorum_check = tokio::time::interval(QUORUM_CHECK_INTERVAL);
    loop {
        let (state, leader, leader_addr) = {
            let m = metrics.borrow_and_update();
            let leader_addr = m.current_leader.and_then(|l| {
                m.membership_config
                    .membership()
                    .get_node(&l)
                    .map(|n| n.addr.clone())
            });
            (m.state, m.current_leader, leader_addr)
        };
        let leading = state == ServerState::Leader && leader == Some(id);
        if !leading {
            if let Some(a) = active.take() {
                tracing::warn!(node = id, "leadership lost: closing client connections");
                a.stop(STOPPED_LEADING);
            }
            follow(&role, id, leader, leader_addr);
        } else if active.is_none() {
            let activation = Activation {
                raft: &raft,
                machine: &machine,
                config: &config,
                guard: &guard,
                lease_lapses,
            };
            let Some(a) = become_active(activation, id).await else {
                continue;
            };
            role.send_replace(Role::Leader(Arc::clone(&a)));
            active = Some(a);
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { break },
            _ = quorum_check.tick(), if active.is_some() => {
                if !quorum_confirmed(&raft, id).await {
                    if let Some(a) = active.take() {
                        // A leader that removed itself (a drain) fails the check as soon as
                        // it is no voter: it stopped leading, it did not lose anyone.
                        let voter = raft
                            .metrics()
                            .borrow()
                            .membership_config
                            .membership()
                            .voter_ids()
                            .any(|v| v == id);
                        if voter {
                            tracing::warn!(node = id, "no majority hears this leader: closing client connections");
                            a.stop("this leader lost the majority; resend to the new leader");
                        } else {
                            tracing::warn!(node = id, "left the voters: closing client connections");
                            a.stop(STOPPED_LEADING);
                        }
                        role.send_replace(Role::Unknown);
                    }
                }
            }
            _ = disk_check.tick() => {
                if let Err(e) = guard.refresh() {
                    tracing::warn!(error = %e, "cannot measure free disk space");
                }
            }
            _ = reclaim.tick(), if active.is_none() => {
                let (log, acks) = machine.logs();
                if let Err(e) = crate::broker::store::reclaim(&log, &acks) {
                    tracing::warn!(error = %e, "segment reclaim failed");
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    if let Some(a) = active.take() {
        a.stop("node shutting down");
        let tasks = std::mem::take(&mut *a.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
    }
    role.send_replace(Role::Unknown);
}

/// Activates the broker of this new leader (`id`); `None` when leadership ended while
/// activation waited on the majority (the caller then points clients at the new leader at
/// once) or activation failed (retried after a pause).
async fn become_active(activation: Activation<'_>, id: NodeId) -> Option<Arc<Active>> {
    let raft = activation.raft;
    let mut watch = raft.metrics();
    let attempt = tokio::select! {
        r = activate(activation) => r,
        _ = watch.wait_for(|m| !(m.state == ServerState::Leader && m.current_leader == Some(id))) => {
            return None;
        }
    };
    match attempt {
        Ok(a) => {
            tracing::info!(node = id, "leading: broker active");
            Some(a)
        }
        Err(e) => {
            tracing::warn!(node = id, error = %e, "could not activate the broker");
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}

/// Whether a majority confirms this node's leadership within [`QUORUM_LOSS`]. A round
/// that fails before the deadline (openraft answers `QuorumNotEnough` as soon as one
/// heartbeat round misses a majority — a joint membership while a new voter catches up,
/// a slow disk) is retried every [`QUORUM_RETRY`]: only a majority unheard for the whole
/// period, or another leader, ends the leadership's service.
async fn quorum_confirmed(raft: &Raft<TypeConfig>, id: NodeId) -> bool {
    use openraft::error::{CheckIsLeaderError, RaftError};
    let deadline = tokio::time::Instant::now() + QUORUM_LOSS;
    loop {
        match tokio::time::timeout_at(deadline, raft.ensure_linearizable()).await {
            Ok(Ok(_)) => return true,
            Err(_) => return false,
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)))) => return false,
            Ok(Err(e)) => {
                tracing::debug!(node = id, error = %e, "leadership not confirmed this round; retrying");
            }
        }
        if tokio::time::Instant::now() + QUORUM_RETRY >= deadline {
            return false;
        }
        tokio::time::sleep(QUORUM_RETRY).await;
    }
}

/// Points the front door of this node (`id`, not leading) at `leader`, whose member
/// address is `leader_addr`, or at nobody while no other leader is known. Only a change
/// wakes the front door's waiters (the leadership loop also runs on timers).
fn follow(
    role: &watch::Sender<Role>,
    id: NodeId,
    leader: Option<NodeId>,
    leader_addr: Option<String>,
) {
    let next = match (leader, leader_addr) {
        (Some(l), Some(addr)) if l != id => Role::Follower {
            leader: l,
            amqp: entrepot_cluster::identity::amqp_addr(&addr),
            amqps: entrepot_cluster::identity::amqps_addr(&addr),
        },
        _ => Role::Unknown,
    };
    role.send_if_modified(|current| {
        let same = match (&*current, &next) {
            (Role::Unknown, Role::Unknown) => true,
            (Role::Follower { leader: a, .. }, Role::Follower { leader: b, .. }) => a == b,
            _ => false,
        };
        if !same {
            *current = next;
        }
        !same
    });
}

/// What a new leader's broker is made of.
struct Activation<'a> {
    raft: &'a Raft<TypeConfig>,
    machine: &'a StoreMachine,
    config: &'a Arc<BrokerConfig>,
    guard: &'a Arc<DiskGuard>,
    lease_lapses: &'a Arc<AtomicU64>,
}

/// Makes this leader's broker: everything committed applied, the uncommitted local tail
/// cut, queues rebuilt from the store, replicator, lease renewal and housekeeping running.
/// It delivers nothing before the first renewal of its lease.
async fn activate(activation: Activation<'_>) -> Result<Arc<Active>, ActivationError> {
    let Activation {
        raft,
        machine,
        config,
        guard,
        lease_lapses,
    } = activation;
    let (store, replication) = leader_store(raft, machine).await?;
    let store = store.with_guard(Arc::clone(guard));
    let broker = tokio::task::block_in_place(|| Broker::with_store((**config).clone(), store))?;
    let lease = Arc::new(DeliveryLease::new());
    broker.deliver_under(Arc::clone(&lease));
    let gate = tokio::task::block_in_place(|| crate::server::admit(config, &broker))?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = vec![
        tokio::spawn(replicator::run(
            raft.clone(),
            Arc::clone(&replication),
            shutdown_rx.clone(),
        )),
        tokio::spawn(lease::renew_one_group(
            raft.clone(),
            Arc::clone(&lease),
            Arc::clone(lease_lapses),
            shutdown_rx.clone(),
        )),
    ];
    tasks.extend(crate::server::broker_tasks(
        &broker,
        &gate,
        config,
        shutdown_rx,
    ));
    Ok(Arc::new(Active {
        broker,
        gate,
        replication,
        lease,
        shutdown: shutdown_tx,
        tasks: Mutex::new(tasks),
    }))
}

/// The store a new leader's broker writes through, once [`settle_store`] made it the
/// committed one, and the queue its operations wait in for the replicator.
pub async fn leader_store(
    raft: &Raft<TypeConfig>,
    machine: &StoreMachine,
) -> Result<(Store, Arc<Replication>), ActivationError> {
    settle_store(raft, machine).await?;
    let (log, acks) = machine.logs();
    let replication = Arc::new(Replication::new());
    let store = Store::replicated(machine.dir(), log, acks, Arc::clone(&replication));
    Ok((store, replication))
}

/// Makes a new leader's store exactly the committed one before its broker writes to it:
/// confirms leadership with a majority, waits until every entry of this node's Raft log is
/// applied (after a restart openraft may restore the leadership in the same term, and
/// entries of the previous incarnation then commit *after* the term's first one — their
/// offsets must not be handed out again), then cuts the messages this node stored locally
/// but never submitted. Nothing applied means no message was ever committed (the log is
/// never purged), so the whole local message log goes.
pub async fn settle_store(
    raft: &Raft<TypeConfig>,
    machine: &StoreMachine,
) -> Result<(), ActivationError> {
    tokio::time::timeout(QUORUM_LOSS, raft.ensure_linearizable())
        .await
        .map_err(|_| ActivationError::NoMajority)?
        .map_err(|e| ActivationError::NotLeader(e.to_string()))?;
    let mut metrics = raft.metrics();
    let last = metrics.borrow().last_log_index;
    tokio::time::timeout(
        QUORUM_LOSS,
        metrics.wait_for(|m| m.last_applied.map(|l| l.index) >= last),
    )
    .await
    .map_err(|_| ActivationError::NotCommitted)?
    .map_err(|_| ActivationError::RaftStopped)?;
    let (log, _) = machine.logs();
    let end = machine.applied_message_end().unwrap_or(0);
    if log.next_offset() > end {
        tracing::warn!(
            committed_end = end,
            local_end = log.next_offset(),
            "cutting messages this node stored but never committed"
        );
        log.truncate_from(end)?;
    }
    Ok(())
}

/// Which listener of the front door a connection came through.
#[derive(Clone)]
enum Door {
    /// Plain AMQP: served as it is, or forwarded to the leader's AMQP port.
    Plain,
    /// amqps: the TLS handshake happens at the leader (with this certificate), so a
    /// follower forwards the still-encrypted bytes to the leader's amqps port.
    Tls(Arc<TlsFiles>),
}

/// One listener of a clustered node and what it routes by; see the module docs.
#[derive(Clone)]
struct FrontDoor {
    door: Door,
    role: watch::Receiver<Role>,
    drain: watch::Receiver<drain::DrainState>,
}

impl FrontDoor {
    async fn run(
        self,
        listener: TcpListener,
        permits: Arc<Semaphore>,
        shutdown: watch::Receiver<bool>,
    ) {
        crate::server::accept_loop(listener, permits, shutdown, move |stream| {
            self.clone().route(stream)
        })
        .await
    }

    /// Serves or forwards one client connection, waiting (bounded) for a leader; closes it
    /// at once on a draining node.
    async fn route(self, stream: tokio::net::TcpStream) {
        if *self.drain.borrow() != drain::DrainState::Serving {
            tracing::debug!(peer = ?stream.peer_addr().ok(), "draining: closing a new connection");
            return;
        }
        let mut role = self.role.clone();
        let current =
            tokio::time::timeout(LEADER_WAIT, role.wait_for(|r| !matches!(r, Role::Unknown))).await;
        let current = match current.map(|r| r.map(|r| r.clone())) {
            Ok(Ok(r)) => r,
            _ => {
                tracing::info!(peer = ?stream.peer_addr().ok(), "no leader known: closing the connection");
                return;
            }
        };
        let (leader, addr, on_drain) = match (current, &self.door) {
            (Role::Leader(active), door) => return serve(stream, door, &active).await,
            (Role::Follower { leader, amqp, .. }, Door::Plain) => {
                (leader, amqp, proxy::OnDrain::Close)
            }
            (Role::Follower { leader, amqps, .. }, Door::Tls(_)) => {
                (leader, amqps, proxy::OnDrain::Cut)
            }
            (Role::Unknown, _) => return,
        };
        let drained = drained(self.drain.clone());
        proxy::forward(
            stream,
            leader,
            &addr,
            leader_gone(role, leader),
            drained,
            on_drain,
        )
        .await
    }
}

/// Completes once this node is drained (out of the membership).
async fn drained(mut drain: watch::Receiver<drain::DrainState>) {
    if drain
        .wait_for(|d| *d == drain::DrainState::Drained)
        .await
        .is_err()
    {
        // The node is stopping: its connections end with it.
        std::future::pending::<()>().await;
    }
}

/// Completes once this node no longer follows `leader` (another leader, or none known).
async fn leader_gone(mut role: watch::Receiver<Role>, leader: NodeId) {
    let _ = role
        .wait_for(|r| !matches!(r, Role::Follower { leader: l, .. } if *l == leader))
        .await;
}

/// Serves a connection on this leader's broker, after the TLS handshake on the amqps door.
async fn serve(stream: tokio::net::TcpStream, door: &Door, active: &Active) {
    // Subscribed before the handshake, so a leadership lost meanwhile still closes it.
    let shutdown = active.shutdown.subscribe();
    let accepted = match door {
        Door::Plain => Some(Accepted::tcp(stream)),
        Door::Tls(tls) => crate::server::accept_tls(stream, tls).await,
    };
    // Lost before or during the handshake: the client reconnects to the new leader.
    if *shutdown.borrow() {
        return;
    }
    if let Some(accepted) = accepted {
        connection::serve(
            accepted,
            Arc::clone(&active.broker),
            Arc::clone(&active.gate),
            shutdown,
        )
        .await
    }
}

/// Where a node keeps its Raft log and snapshots inside its data directory.
pub fn raft_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join(RAFT_DIR)
}
