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
//!    to wait for the lowest id to come up. A node absent from `--peers` does not form it
//!    and is not added (joining in groups mode is not built).
//! 3. The broker ([`crate::server::Node::start_with`], its own store in
//!    `<data-dir>/broker` for what stays local: temporary queues, topics), with the
//!    router ([`GroupRouter`]) set before any listener serves.
//! 4. The group opener follows group 0 and opens the groups placed here; each `Opened`
//!    spawns a [`GroupDriver`] on the broker (it serves the address while this node leads
//!    its group), each `Closed` stops it.
//! 5. While this node leads group 0, it adds every initial peer missing from group 0's
//!    members (member address and AMQP address from `--peers`), every
//!    [`MEMBERS_ROUND`].
//!
//! Readiness (`/readyz`): group 0 has a leader, this node is a member, and every group
//! open here has applied what it knows committed. `/status` adds a `groups:` section;
//! `/metrics` adds `entrepot_groups_open`, `entrepot_groups_led` and
//! `entrepot_groups_served`.
//!
//! Does not (yet): forward links (a link led elsewhere is redirected), add members after
//! the start or drain, move replicas or leaderships after a join or leave (the balancer),
//! replicate topics, subscriptions, manifests or transactions.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use entrepot_cluster::identity;
use entrepot_cluster::{Host, HostConfig, NodeId, PeerServerOptions};
use entrepot_storage::LogConfig;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::group_driver::GroupDriver;
use super::group_opener::{GroupEvent, GroupOpener, OpenerConfig};
use super::group_router::{Drivers, GroupRouter};
use super::meta_machine::{Member, MetaGroup};
use super::{ClusterConfig, ClusterStartError, ELECTION_TIMEOUT_MS, HEARTBEAT_MS};
use crate::broker::Broker;
use crate::config::BrokerConfig;
use crate::metrics::{ClusterView, Reply, Source};
use crate::server::{Node, StartError};

/// Directory of the node's host (node log, group snapshots) inside the data directory.
pub const HOST_DIR: &str = "host";
/// Directory of the node's local broker store inside the data directory.
pub const BROKER_DIR: &str = "broker";
/// How often group 0's leader checks that every initial peer is a member.
pub const MEMBERS_ROUND: Duration = Duration::from_millis(250);
/// Largest record of the node log: one entry of a group (a batch of proposals of up to
/// `MAX_BATCH_BYTES`, or one message of up to the cluster's 4 MiB, plus framing).
pub const NODE_LOG_RECORD_MAX: u32 = 16 << 20;
/// Segment size of the node log.
pub const NODE_LOG_SEGMENT_BYTES: u64 = 256 << 20;

/// A running node in groups mode.
pub struct GroupsNode {
    pub id: NodeId,
    pub host: Host,
    pub node: Node,
    pub peer_addr: std::net::SocketAddr,
    opener: Arc<GroupOpener>,
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
        form_group_zero(&meta, &cluster).await;
        let (opener, events) =
            GroupOpener::start(host.clone(), meta.machine.clone(), OpenerConfig::default());
        let opener = Arc::new(opener);
        let drivers: Drivers = Arc::default();
        let router = GroupRouter::new(
            cluster.node_id,
            copy(&meta),
            Arc::clone(&opener),
            Arc::clone(&drivers),
        );
        let view = Arc::new(GroupsView {
            node: cluster.node_id,
            meta: copy(&meta),
            opener: Arc::clone(&opener),
            drivers: Arc::clone(&drivers),
            broker: Mutex::new(None),
        });
        let mut broker_config = config.clone();
        broker_config.data_dir = config.data_dir.join(BROKER_DIR);
        let router = Arc::new(router);
        let setup_view = Arc::clone(&view);
        let node = Node::start_with(broker_config, shutdown.clone(), move |broker| {
            broker.route_by(router);
            *setup_view.broker.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(broker));
            Source::Cluster(setup_view)
        })
        .await?;
        tracing::info!(node = cluster.node_id, amqp = %node.amqp_addr, http = %node.http_addr,
            peers = %peer_addr, "entrepot node listening (cluster-mode: groups)");
        let tasks = vec![
            tokio::spawn(drive_events(
                events,
                Arc::clone(&node.broker),
                Arc::clone(&drivers),
                shutdown.clone(),
            )),
            tokio::spawn(add_members(copy(&meta), cluster.peers.clone(), shutdown)),
        ];
        Ok(GroupsNode {
            id: cluster.node_id,
            host,
            node,
            peer_addr,
            opener,
            drivers,
            tasks,
        })
    }

    /// Waits for the shutdown, stops the drivers, the opener and the host, and makes the
    /// local store durable.
    pub async fn stopped(self) -> Result<(), StartError> {
        for t in self.tasks {
            let _ = t.await;
        }
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

/// The host: its node log synced as `--sync` says, the broker's Raft timing, the
/// inter-node port with the cluster's secret and TLS.
async fn start_host(
    config: &BrokerConfig,
    cluster: &ClusterConfig,
) -> Result<Host, ClusterStartError> {
    let dir = config.data_dir.join(HOST_DIR);
    let mut host_config = HostConfig::new(cluster.node_id, &dir);
    host_config.log = LogConfig {
        segment_bytes: NODE_LOG_SEGMENT_BYTES,
        record_bytes_max: NODE_LOG_RECORD_MAX,
        sync: config.sync,
        ..LogConfig::default()
    };
    host_config.heartbeat = Duration::from_millis(HEARTBEAT_MS);
    host_config.election_timeout =
        Duration::from_millis(ELECTION_TIMEOUT_MS.0)..Duration::from_millis(ELECTION_TIMEOUT_MS.1);
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

/// While this node leads group 0, adds every initial peer missing from its members.
async fn add_members(
    meta: MetaGroup,
    peers: Vec<identity::Peer>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if meta.handle.leadership().borrow().leads {
            let members = meta.machine.members();
            for p in peers.iter().filter(|p| !members.contains_key(&p.id)) {
                let member = Member {
                    peer: p.addr.clone(),
                    amqp: identity::amqp_addr(&p.addr),
                };
                match meta.add_member(p.id, member).await {
                    Ok(()) => tracing::info!(node = p.id, addr = %p.addr, "member added"),
                    Err(e) => {
                        tracing::debug!(node = p.id, error = %e, "adding a member failed; next round")
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(MEMBERS_ROUND) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// What the HTTP endpoint shows of a node in groups mode.
struct GroupsView {
    node: NodeId,
    meta: MetaGroup,
    opener: Arc<GroupOpener>,
    drivers: Drivers,
    broker: Mutex<Option<Arc<Broker>>>,
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
}

impl ClusterView for GroupsView {
    fn broker(&self) -> Option<Arc<Broker>> {
        self.broker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn unready(&self) -> Option<String> {
        let meta = *self.meta.handle.leadership().borrow();
        if meta.leader.is_none() {
            return Some("the metadata group has no leader".into());
        }
        if !self.meta.machine.members().contains_key(&self.node) {
            return Some("this node is not a member of the metadata group yet".into());
        }
        for g in self.opener.opened().values() {
            let applied = *g.handle.applied().borrow();
            if g.handle.committed() > applied {
                return Some(format!("group {} ({}) is catching up", g.group, g.address));
            }
        }
        None
    }

    fn status(&self) -> String {
        self.status_extra()
    }

    fn status_extra(&self) -> String {
        let (led, open, served) = self.led();
        let meta_leader = self.meta.handle.leadership().borrow().leader;
        let mut out = format!(
            "groups:\n  mode: groups\n  node: {}\n  metadata-leader: {}\n  open: {open}\n  led: {}\n  served: {served}\n  led-addresses:\n",
            self.node,
            meta_leader.map_or("none".to_owned(), |l| l.to_string()),
            led.len(),
        );
        for (address, group) in &led {
            out.push_str(&format!(
                "    - {{ address: {address:?}, group: {group} }}\n"
            ));
        }
        out
    }

    fn metrics(&self) -> String {
        let (led, open, served) = self.led();
        format!(
            "# TYPE entrepot_groups_open gauge\nentrepot_groups_open {open}\n\
             # TYPE entrepot_groups_led gauge\nentrepot_groups_led {}\n\
             # TYPE entrepot_groups_served gauge\nentrepot_groups_served {served}\n",
            led.len()
        )
    }

    fn http<'a>(
        &'a self,
        _method: &'a str,
        _target: &'a str,
    ) -> Pin<Box<dyn Future<Output = Reply> + Send + 'a>> {
        Box::pin(async {
            (
                "404 Not Found",
                "the /cluster API is not available in cluster-mode groups\n".to_owned(),
            )
        })
    }
}
