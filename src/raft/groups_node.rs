//! A clustered node in `cluster-mode: groups` (issue 12): one Raft group per address over
//! one node log, the metadata group (group 0) placing addresses, one broker for the
//! node's whole life.
//!
//! The start sequence ([`GroupsNode::start`]):
//! 1. The node's [`Host`] in `<data-dir>/host` (its node log, synced per `--sync`: a
//!    message is accepted once a majority's node logs hold it as `--sync` says), serving
//!    the inter-node port (`--cluster-listen`, with `--cluster-secret-file` and
//!    `--cluster-tls-*` as in the one-group mode).
//! 2. Group 0 opened ([`MetaGroup::open`]). Formed by *every* initial peer whose node log
//!    holds nothing of it, each with the identical voter set from `--peers` (openraft
//!    0.9 allows repeated identical initializations, never different ones): no node has
//!    to wait for the lowest id to come up. A node absent from `--peers` does not form it.
//! 3. The broker ([`crate::server::Node::start_with`], its own store in
//!    `<data-dir>/broker` for what stays local: temporary queues, topics), with the
//!    router ([`GroupRouter`]) set before any listener serves.
//! 4. The level queries answered (`metadata_level.rs`: this node's `--metadata-level-max`
//!    and group 0's finalized level), the level controller started (on group 0's leader
//!    it raises the finalized level once every node supports the next).
//!    The group opener follows group 0 and opens the groups placed here; each `Opened`
//!    spawns a [`GroupDriver`] on the broker (it serves the address while this node leads
//!    its group), each `Closed` stops it. The [`Balancer`] moves the replicas of the
//!    groups this node leads to their placement (after a join or a leave).
//! 5. The joiner (`groups_membership::join`): every node, an initial peer or one joining
//!    later (`--auto-join --cluster-advertise`), asks group 0 to take it as a member —
//!    through the peers while it knows no leader — until its replica shows it one; a
//!    drained node started again asks again. Nobody else adds members but
//!    `POST /cluster/add`, so a drained or removed node stays out.
//!
//! Readiness (`/readyz`): not while draining; group 0 has a leader and this node is a
//! member; until the node was ready once, also every group placed on it is open, has it
//! as a voter (a joiner is ready only once its moves completed) and has applied what it
//! knows committed (a restarted node replayed). After that an apply lag does not make it
//! unready: under load every follower applies a few entries behind, and a readiness that
//! flapped with it would take the node out of its Service. `/status` adds a `groups:` section (members,
//! drain state, balancer counters, the metadata level, every group open here with its
//! placement, voters, learners, leader and whether it is marked formed); `/metrics` adds `entrepot_groups_{open,led,served}`,
//! `entrepot_cluster_members` and `entrepot_balancer_moves_*`. The `/cluster` API
//! (add, remove, drain): `groups_membership.rs`.
//!
//! Before a planned stop (SIGTERM) `main` calls [`GroupsNode::hand_over`]: the groups led
//! here move to another voter at once (`handover.rs`) instead of after an election.
//!
//! Does not (yet): replicate topics, subscriptions, manifests or transactions.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use entrepot_cluster::{
    HibernationConfig, HibernationCounters, Host, HostConfig, NodeId, PeerServerOptions,
};
use entrepot_storage::LogConfig;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::balancer::{Balancer, BalancerConfig, BalancerProgress};
use super::drain::DrainState;
use super::group_driver::GroupDriver;
use super::group_opener::{GroupEvent, GroupOpener, OpenerConfig};
use super::group_router::{Drivers, ForwardVia, GroupRouter};
use super::groups_membership::{self, Joiner, Membership};
use super::handover::{HandOver, HandOverReport, HandOverServer};
use super::link_forward::{ForwardStats, LinkForwardServer};
use super::meta_machine::MetaGroup;
use super::metadata_level::{LevelController, LevelProgress, NodeAppHandler};
use super::{ClusterConfig, ClusterStartError, ELECTION_TIMEOUT_MS, HEARTBEAT_MS};
use crate::broker::Broker;
use crate::config::{BrokerConfig, LinkRouting};
use crate::metrics::{counter, gauge, ClusterView, Reply, Source};
use crate::server::{Node, StartError};

/// Directory of the node's host (node log, group snapshots) inside the data directory.
pub const HOST_DIR: &str = "host";
/// Directory of the node's local broker store inside the data directory.
pub const BROKER_DIR: &str = "broker";
/// Largest record of the node log (defined beside the setting it bounds, in `config`,
/// which must not reach up into `raft`).
pub use crate::config::NODE_LOG_RECORD_MAX;

/// A running node in groups mode.
pub struct GroupsNode {
    pub id: NodeId,
    pub host: Host,
    pub node: Node,
    pub peer_addr: std::net::SocketAddr,
    meta: MetaGroup,
    opener: Arc<GroupOpener>,
    balancer: Balancer,
    level: LevelController,
    drivers: Drivers,
    tasks: Vec<JoinHandle<()>>,
}

impl GroupsNode {
    /// Starts the node (see the module docs) and serves until `shutdown`.
    pub async fn start(
        mut config: BrokerConfig,
        cluster: ClusterConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Result<GroupsNode, ClusterStartError> {
        super::cap_message_size(&mut config);
        let host = start_host(&config, &cluster).await?;
        let peer_addr = host.local_addr();
        let meta = MetaGroup::open(&host)
            .await
            .map_err(ClusterStartError::Host)?;
        let level_max = cluster.metadata_level_max;
        // Level queries are answered from now on; link forwarding once the broker runs.
        host.set_app_handler(NodeAppHandler::new(level_max, meta.machine.clone(), None));
        warn_below_finalized(&meta, level_max);
        form_group_zero(&meta, &cluster).await;
        let opener_config = OpenerConfig {
            metadata_level_max: level_max,
            ..OpenerConfig::default()
        };
        let (opener, events) =
            GroupOpener::start(host.clone(), meta.machine.clone(), opener_config);
        let opener = Arc::new(opener);
        let level = LevelController::start(host.clone(), copy(&meta), level_max);
        let balancer = Balancer::start(
            host.clone(),
            meta.machine.clone(),
            BalancerConfig::default(),
        );
        let drivers: Drivers = Arc::default();
        let (drain, draining) = watch::channel(DrainState::Serving);
        let forward = Arc::new(ForwardStats::default());
        let mut router = GroupRouter::new(
            cluster.node_id,
            copy(&meta),
            Arc::clone(&opener),
            Arc::clone(&drivers),
        )
        .busy_from(host.clone());
        if config.link_routing == LinkRouting::Forward {
            let (host, stats) = (host.clone(), Arc::clone(&forward));
            router = router.forwarding(ForwardVia { host, stats });
        }
        let view = Arc::new(GroupsView {
            node: cluster.node_id,
            meta: copy(&meta),
            opener: Arc::clone(&opener),
            drivers: Arc::clone(&drivers),
            broker: Mutex::new(None),
            balancer: balancer.progress(),
            level: level.progress(),
            level_max,
            membership: Membership {
                node: cluster.node_id,
                host: host.clone(),
                meta: copy(&meta),
                opener: Arc::clone(&opener),
                drivers: Arc::clone(&drivers),
                drain,
            },
            ready_once: AtomicBool::new(false),
            forward: Arc::clone(&forward),
            host: host.clone(),
        });
        let mut broker_config = config.clone();
        broker_config.data_dir = config.data_dir.join(BROKER_DIR);
        let router = Arc::new(router);
        let setup_view = Arc::clone(&view);
        let forward_host = host.clone();
        let forward_meta = meta.machine.clone();
        let hand_over_server = |any_voter| HandOverServer {
            node: cluster.node_id,
            meta: copy(&meta),
            opener: Arc::clone(&opener),
            drivers: Arc::clone(&drivers),
            any_voter,
        };
        balancer.hand_over_with(Arc::new(hand_over_server(true)));
        let hand_over_server = hand_over_server(false);
        let node = Node::start_with(broker_config, shutdown.clone(), move |broker| {
            broker.route_by(router);
            // Serves the links other nodes forward here, whatever this node's own routing.
            let server = LinkForwardServer::new(Arc::downgrade(broker), forward);
            forward_host.set_app_handler(NodeAppHandler::new(
                level_max,
                forward_meta,
                Some(server),
            ));
            forward_host.set_hand_over_handler(hand_over_server);
            *setup_view.broker.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(broker));
            Source::Cluster(setup_view)
        })
        .await?;
        tracing::info!(node = cluster.node_id, amqp = %node.amqp_addr, http = %node.http_addr,
            peers = %peer_addr, "entrepot node listening (cluster-mode: groups)");
        let mut tasks = vec![tokio::spawn(drive_events(
            events,
            Arc::clone(&node.broker),
            Arc::clone(&drivers),
            shutdown.clone(),
        ))];
        match joiner(&cluster) {
            Some(j) => tasks.push(tokio::spawn(groups_membership::join(
                host.clone(),
                copy(&meta),
                j,
                shutdown,
                draining,
            ))),
            None => tracing::info!(
                node = cluster.node_id,
                "not among --peers and no --auto-join: waiting for `entrepot cluster add`"
            ),
        }
        Ok(GroupsNode {
            id: cluster.node_id,
            host,
            node,
            peer_addr,
            meta,
            opener,
            balancer,
            level,
            drivers,
            tasks,
        })
    }

    /// Before a planned stop (SIGTERM: a restart or a rolling update; nothing is led
    /// here any more after a drain): hands every group led here to another voter
    /// (`handover.rs`, bounded by `HAND_OVER_TIMEOUT`), aiming at the preferred leaders.
    /// The opener's campaigns stay held: this node is going.
    pub async fn hand_over(&self) -> HandOverReport {
        let placement = self.meta.machine.state();
        let round = HandOver {
            node: self.id,
            meta: &self.meta,
            opener: &self.opener,
            drivers: &self.drivers,
        };
        round.run(&placement).await
    }

    /// Completes if one of this node's groups stops on a fatal error (a node log that
    /// cannot write — a full disk, a failed sync — or a bug; [`Host::failure`]): the node
    /// can no longer take part, and `main` exits so that it is restarted and replays its
    /// log rather than linger half alive, as the one-group mode does
    /// (`ClusterNode::failed`). Never completes otherwise.
    pub async fn failed(&self) -> String {
        let mut failure = self.host.failure();
        let reason = match failure.wait_for(|f| f.is_some()).await {
            Ok(f) => f.clone().unwrap_or_default(),
            Err(_) => std::future::pending().await,
        };
        reason
    }

    /// Waits for the shutdown, stops the drivers, the opener and the host, and makes the
    /// local store durable.
    pub async fn stopped(self) -> Result<(), StartError> {
        for t in self.tasks {
            let _ = t.await;
        }
        self.balancer.stop().await;
        self.level.stop().await;
        let drivers: Vec<GroupDriver> = {
            let mut d = self.drivers.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut *d).into_values().collect()
        };
        for d in drivers {
            d.stop().await;
        }
        if let Ok(opener) = Arc::try_unwrap(self.opener) {
            opener.stop().await;
        }
        let result = self.node.stopped().await;
        self.host.shutdown().await;
        result
    }
}

fn copy(meta: &MetaGroup) -> MetaGroup {
    MetaGroup {
        handle: meta.handle.clone(),
        machine: meta.machine.clone(),
    }
}

/// The host: its node log synced as `--sync` says, in segments of
/// `--node-log-segment-bytes`; the broker's Raft timing; the inter-node port with the
/// cluster's secret and TLS.
async fn start_host(
    config: &BrokerConfig,
    cluster: &ClusterConfig,
) -> Result<Host, ClusterStartError> {
    let dir = config.data_dir.join(HOST_DIR);
    let mut host_config = HostConfig::new(cluster.node_id, &dir);
    host_config.log = LogConfig {
        segment_bytes: config.node_log_segment_bytes,
        record_bytes_max: NODE_LOG_RECORD_MAX,
        sync: config.sync,
        ..LogConfig::default()
    };
    host_config.heartbeat = Duration::from_millis(HEARTBEAT_MS);
    host_config.election_timeout =
        Duration::from_millis(ELECTION_TIMEOUT_MS.0)..Duration::from_millis(ELECTION_TIMEOUT_MS.1);
    if config.hibernate_groups {
        // The host raises the liveness timeout to the longest election timeout itself.
        host_config.hibernation = Some(HibernationConfig::default());
    }
    host_config.peer = PeerServerOptions {
        secret: cluster.secret.clone(),
        tls: cluster.tls.clone(),
    };
    let listener =
        TcpListener::bind(cluster.listen)
            .await
            .map_err(|source| ClusterStartError::BindPeers {
                addr: cluster.listen,
                source,
            })?;
    tokio::task::block_in_place(|| Host::start(host_config, listener))
        .map_err(ClusterStartError::Host)
}

/// Forms group 0 with the initial peers as voters, where this node's log holds nothing
/// of it and this node is one of them (see the module docs).
async fn form_group_zero(meta: &MetaGroup, cluster: &ClusterConfig) {
    let member = cluster.peers.iter().any(|p| p.id == cluster.node_id);
    if !member || !matches!(meta.handle.is_pristine(), Ok(true)) {
        return;
    }
    let voters: BTreeMap<NodeId, String> = cluster
        .peers
        .iter()
        .map(|p| (p.id, p.addr.clone()))
        .collect();
    match meta.handle.bootstrap(&voters).await {
        Ok(()) => tracing::info!(voters = voters.len(), "metadata group formed"),
        Err(e) => tracing::warn!(error = %e, "metadata group: forming it failed"),
    }
}

/// Spawns a driver for every group the opener opens, stops it when the group closes.
async fn drive_events(
    mut events: mpsc::Receiver<GroupEvent>,
    broker: Arc<Broker>,
    drivers: Drivers,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Some(event) = event else { return };
        let old = match event {
            GroupEvent::Opened(g) => {
                tracing::info!(address = %g.address, group = g.group, "address group opened here");
                let driver =
                    GroupDriver::spawn(Arc::clone(&broker), g.address.clone(), g.handle, g.machine);
                let mut d = drivers.lock().unwrap_or_else(|e| e.into_inner());
                d.insert(g.address, driver)
            }
            GroupEvent::Closed { address, group } => {
                tracing::info!(%address, group, "address group closed here");
                let mut d = drivers.lock().unwrap_or_else(|e| e.into_inner());
                d.remove(&address)
            }
        };
        if let Some(old) = old {
            old.stop().await;
        }
    }
}

/// The joiner of this node: its member address from `--auto-join`'s announcement or
/// its own `--peers` entry, the other peers as seeds; `None` when it has neither (it
/// waits for `entrepot cluster add`).
fn joiner(cluster: &ClusterConfig) -> Option<Joiner> {
    let own = cluster.peers.iter().find(|p| p.id == cluster.node_id);
    let member_addr = cluster
        .auto_join
        .clone()
        .or_else(|| own.map(|p| p.addr.clone()))?;
    let seeds = cluster
        .peers
        .iter()
        .filter(|p| p.id != cluster.node_id)
        .map(|p| (p.id, p.addr.clone()))
        .collect();
    Some(Joiner {
        node: cluster.node_id,
        member_addr,
        seeds,
        level_max: cluster.metadata_level_max,
    })
}

/// A node whose `--metadata-level-max` is below the level its replica of group 0 holds
/// was downgraded: not supported (an older build would stop on group 0's log); this one
/// runs on, proposing no op above its level.
fn warn_below_finalized(meta: &MetaGroup, level_max: u8) {
    let finalized = meta.machine.level();
    if level_max < finalized {
        tracing::error!(
            level_max,
            finalized,
            "this node runs below the cluster's finalized metadata level (a downgrade is not \
             supported: a build of that level stops on group 0's log)"
        );
    }
}

/// What the HTTP endpoint shows of a node in groups mode.
struct GroupsView {
    node: NodeId,
    meta: MetaGroup,
    opener: Arc<GroupOpener>,
    drivers: Drivers,
    broker: Mutex<Option<Arc<Broker>>>,
    balancer: BalancerProgress,
    /// The level controller's last poll (while this node leads group 0 below its level).
    level: LevelProgress,
    /// What this node advertises (`--metadata-level-max`).
    level_max: u8,
    membership: Membership,
    /// Set once this node was ready: from then on a group placed here but still moving
    /// to it no longer makes it unready (see [`GroupsView::unready`]).
    ready_once: AtomicBool,
    /// Link forwarding's counters (`link_forward.rs`).
    forward: Arc<ForwardStats>,
    /// The node's host, for its hibernation counters.
    host: Host,
}

impl GroupsView {
    /// `(address, group)` of the groups this node leads, and of those it serves.
    fn led(&self) -> (Vec<(String, u64)>, usize, usize) {
        let opened = self.opener.opened();
        let led: Vec<(String, u64)> = opened
            .values()
            .filter(|g| g.handle.leadership().borrow().leads)
            .map(|g| (g.address.clone(), g.group))
            .collect();
        let served = {
            let d = self.drivers.lock().unwrap_or_else(|e| e.into_inner());
            d.values()
                .filter(|d| d.serving().borrow().is_some())
                .count()
        };
        (led, opened.len(), served)
    }

    /// Why a node that was never ready is not yet: a group placed here that is not open,
    /// or of which this node is not a voter yet (its move — learner, catch-up, voter —
    /// is under way). Checked until the node is ready once, so a joiner turns ready only
    /// with every replica placed on it caught up, while a ready node stays ready when the
    /// placement later moves a group to it (its clients are served meanwhile).
    fn not_joined(&self) -> Option<String> {
        let opened = self.opener.opened();
        for (group, entry) in self.meta.machine.placed_on(self.node) {
            let Some(g) = opened.get(&group) else {
                return Some(format!(
                    "group {group} ({}) placed here is not open yet",
                    entry.address
                ));
            };
            if !g.handle.status().voters.contains(&self.node) {
                return Some(format!(
                    "group {group} ({}) placed here is moving to this node (not a voter yet)",
                    entry.address
                ));
            }
        }
        None
    }

    /// The `metadata-level` line of `/status`: what this node supports, the finalized
    /// level its replica of group 0 holds, and — on group 0's leader while the level is
    /// below its own — the effective level and what each node advertised.
    fn metadata_level(&self, out: &mut String) {
        let (effective, advertised) = match self.level.last() {
            Some(p) => (p.effective.to_string(), format!("{:?}", p.levels)),
            None => ("none".to_owned(), "none".to_owned()),
        };
        let _ = writeln!(
            out,
            "  metadata-level: {{ supported: {}, finalized: {}, effective: {effective}, advertised: {advertised} }}",
            self.level_max,
            self.meta.machine.level(),
        );
    }

    /// Lines of `/status` for every group open here.
    fn groups_here(&self, out: &mut String) {
        let placement = self.meta.machine.state();
        let _ = writeln!(out, "  groups-here:");
        let mut open: Vec<(u64, String, entrepot_cluster::host::GroupStatus)> = vec![(
            entrepot_cluster::METADATA_GROUP,
            String::new(),
            self.meta.handle.status(),
        )];
        open.extend(
            self.opener
                .opened()
                .into_values()
                .map(|g| (g.group, g.address, g.handle.status())),
        );
        for (group, name, st) in open {
            let entry = placement.groups().get(&group);
            let placed: Vec<NodeId> = entry
                .map(|e| e.replicas.nodes.iter().copied().collect())
                .unwrap_or_else(|| placement.members().keys().copied().collect());
            let preferred = entry.map_or("none".to_owned(), |e| e.replicas.leader.to_string());
            let formed = entry.is_some_and(|e| e.formed);
            let _ = writeln!(
                out,
                "    - {{ group: {group}, name: {name:?}, placed: {placed:?}, preferred: {preferred}, voters: {:?}, learners: {:?}, leader: {}, applied: {}, committed: {}, formed: {formed} }}",
                st.voters,
                st.learners,
                st.leadership.leader.map_or("none".to_owned(), |l| l.to_string()),
                st.applied.map_or(-1, |a| a as i64),
                st.committed.map_or(-1, |c| c as i64),
            );
        }
    }
}

impl ClusterView for GroupsView {
    fn broker(&self) -> Option<Arc<Broker>> {
        self.broker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn unready(&self) -> Option<String> {
        let drain = *self.membership.drain.borrow();
        if drain != DrainState::Serving {
            return Some(format!("draining: {drain:?}").to_lowercase());
        }
        let meta = *self.meta.handle.leadership().borrow();
        if meta.leader.is_none() {
            return Some("the metadata group has no leader".into());
        }
        if !self.meta.machine.members().contains_key(&self.node) {
            return Some("this node is not a member of the metadata group yet".into());
        }
        if self.ready_once.load(Ordering::Relaxed) {
            // Once ready, a group applying a few entries behind its commit index is the
            // normal state under load (and its clients are served by its leader, here
            // or redirected): readiness must not flap with it.
            return None;
        }
        if let Some(why) = self.not_joined() {
            return Some(why);
        }
        for g in self.opener.opened().values() {
            let applied = *g.handle.applied().borrow();
            if g.handle.committed() > applied {
                return Some(format!("group {} ({}) is catching up", g.group, g.address));
            }
        }
        self.ready_once.store(true, Ordering::Relaxed);
        None
    }

    fn refuses_connections(&self) -> bool {
        *self.membership.drain.borrow() != DrainState::Serving
    }

    fn status(&self) -> String {
        self.status_extra()
    }

    fn status_extra(&self) -> String {
        let (led, open, served) = self.led();
        let meta_leader = self.meta.handle.leadership().borrow().leader;
        let drain = format!("{:?}", *self.membership.drain.borrow()).to_lowercase();
        let members: Vec<NodeId> = self.meta.machine.members().keys().copied().collect();
        let b = self.balancer.stats();
        let mut out = format!(
            "groups:\n  mode: groups\n  node: {}\n  drain: {drain}\n  members: {members:?}\n  metadata-leader: {}\n  open: {open}\n  led: {}\n  served: {served}\n  balancer: {{ started: {}, done: {}, failed: {}, in-flight: {} }}\n  led-addresses:\n",
            self.node,
            meta_leader.map_or("none".to_owned(), |l| l.to_string()),
            led.len(),
            b.started,
            b.done,
            b.failed,
            b.in_flight,
        );
        for (address, group) in &led {
            out.push_str(&format!(
                "    - {{ address: {address:?}, group: {group} }}\n"
            ));
        }
        self.metadata_level(&mut out);
        self.groups_here(&mut out);
        out
    }

    fn metrics(&self) -> String {
        let (led, open, served) = self.led();
        let mut out = String::new();
        gauge(
            &mut out,
            "entrepot_groups_open",
            "Groups open on this node.",
            open,
        );
        gauge(
            &mut out,
            "entrepot_groups_led",
            "Groups this node leads.",
            led.len(),
        );
        gauge(
            &mut out,
            "entrepot_groups_served",
            "Addresses this node serves (it leads their group and its driver is active).",
            served,
        );
        gauge(
            &mut out,
            "entrepot_cluster_members",
            "Members of the cluster as this node's replica of the metadata group has them.",
            self.meta.machine.members().len(),
        );
        hibernation_metrics(&mut out, &self.host.hibernation_counters());
        self.forward.render(&mut out);
        let b = self.balancer.stats();
        counter(
            &mut out,
            "entrepot_balancer_moves_started_total",
            "Replica moves this node's balancer began (a retry counts again).",
            b.started,
        );
        counter(
            &mut out,
            "entrepot_balancer_moves_done_total",
            "Replica moves this node's balancer completed.",
            b.done,
        );
        counter(
            &mut out,
            "entrepot_balancer_moves_failed_total",
            "Replica moves this node's balancer saw fail (each is retried after a backoff).",
            b.failed,
        );
        gauge(
            &mut out,
            "entrepot_balancer_moves_in_flight",
            "Replica moves this node's balancer is running now.",
            b.in_flight,
        );
        out
    }

    fn http<'a>(
        &'a self,
        method: &'a str,
        target: &'a str,
    ) -> Pin<Box<dyn Future<Output = Reply> + Send + 'a>> {
        Box::pin(self.membership.http(method, target, self.status_extra()))
    }
}

/// The hibernation's series of `/metrics` (`--hibernate-groups`; mostly zero without).
fn hibernation_metrics(out: &mut String, h: &HibernationCounters) {
    gauge(
        out,
        "entrepot_groups_running",
        "Groups whose Raft instance runs here (the others hibernate: --hibernate-groups).",
        h.running,
    );
    counter(
        out,
        "entrepot_groups_hibernation_stops_total",
        "Times a group's Raft instance was stopped here for idleness.",
        h.stops,
    );
    counter(
        out,
        "entrepot_groups_hibernation_wakes_total",
        "Times a hibernated group's Raft instance was started again here.",
        h.wakes,
    );
    counter(
        out,
        "entrepot_cluster_peers_lost_total",
        "Times a peer was found lost here (silent for the stretched liveness timeout).",
        h.peers_lost,
    );
    let w = h.lost_peer_wakes;
    gauge(
        out,
        "entrepot_groups_lost_peer_wakes_queued",
        "Groups of lost peers waiting here to be woken (MAX_LOST_PEER_WAKES settle at once).",
        w.queued,
    );
    gauge(
        out,
        "entrepot_groups_lost_peer_wakes_settling",
        "Groups of lost peers woken here and not yet settled on a new leader.",
        w.in_flight,
    );
    gauge(
        out,
        "entrepot_groups_lost_peer_wakes_settling_max",
        "The most groups of lost peers ever settling here at once.",
        w.in_flight_max,
    );
    counter(
        out,
        "entrepot_groups_lost_peer_wakes_total",
        "Groups of lost peers taken from the queue here to be woken.",
        w.started,
    );
    counter(
        out,
        "entrepot_groups_lost_peer_wakes_dropped_total",
        "Groups of lost peers dropped from the queue here because the peer answered again.",
        w.dropped,
    );
    gauge(
        out,
        "entrepot_node_lag_seconds",
        "How late this node's own timers fired lately (what stretches the liveness timeout).",
        h.lag.as_secs_f64(),
    );
    gauge(
        out,
        "entrepot_cluster_liveness_timeout_seconds",
        "The peer-liveness timeout as stretched by this node's lag now.",
        h.liveness_timeout.as_secs_f64(),
    );
}
