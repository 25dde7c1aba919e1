//! Three real `entrepot_cluster::Host`s in this process running the metadata group
//! (group 0, `MetaMachine`) and, on each, a `GroupOpener` that opens the address groups
//! group 0 places there: the setup `meta_group.rs` uses. Host configuration, directories
//! (node log with an fsync per commit) and ports as in `three_hosts.rs`; a restart is
//! `GroupOpener::stop` + `Host::shutdown`, then everything started again on the same
//! directory and port. Every wait is bounded by [`WAIT`]; nothing is timed.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use entrepot::raft::group_opener::{GroupEvent, GroupOpener, OpenedGroup, OpenerConfig};
use entrepot::raft::meta_machine::{Member, MetaGroup, METADATA_LEVEL_MAX};
use entrepot::raft::metadata_level::{LevelController, NodeAppHandler};
use entrepot_cluster::placement::GroupId;
use entrepot_cluster::{Host, NodeId};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::three_hosts::config;

pub const NODES: u64 = 3;
pub const WAIT: Duration = Duration::from_secs(30);

pub struct MetaNode {
    pub host: Host,
    pub meta: MetaGroup,
    /// `None` when started without one (a founder that never bootstraps).
    pub opener: Option<GroupOpener>,
    pub events: Option<mpsc::Receiver<GroupEvent>>,
    /// Raises the metadata level while this node leads group 0 (`metadata_level.rs`).
    pub level: LevelController,
}

pub struct MetaCluster {
    pub nodes: BTreeMap<NodeId, MetaNode>,
    pub addrs: BTreeMap<NodeId, String>,
    pub dirs: BTreeMap<NodeId, tempfile::TempDir>,
    pub openers: BTreeMap<NodeId, bool>,
}

/// Longer than any test: the openers' and balancers' safety-net rounds never come
/// within one, so whatever they do there comes from a change or their own delays.
pub const NO_SAFETY_NET: Duration = Duration::from_secs(3600);

/// The openers' timing in these tests: quick rounds while a delay runs, no safety net
/// ([`NO_SAFETY_NET`]), a fallback of a few election timeouts, campaigns a few election
/// timeouts apart.
pub fn opener_config() -> OpenerConfig {
    OpenerConfig {
        round: Duration::from_millis(100),
        safety_net: NO_SAFETY_NET,
        round_gap: Duration::from_millis(20),
        bootstrap_fallback_after: Duration::from_secs(3),
        campaign_backoff: Duration::from_secs(3),
        spread_leaders: true,
        metadata_level_max: METADATA_LEVEL_MAX,
    }
}

/// The AMQP address recorded for node `n` (nothing listens there in these tests).
pub fn amqp_addr(n: NodeId) -> String {
    format!("127.0.0.1:{}", 15672 + n)
}

async fn start_node(id: NodeId, dir: &Path, listener: TcpListener, opener: bool) -> MetaNode {
    let host = Host::start(config(id, dir), listener).unwrap();
    let meta = MetaGroup::open(&host).await.unwrap();
    host.set_app_handler(NodeAppHandler::new(
        METADATA_LEVEL_MAX,
        meta.machine.clone(),
        None,
    ));
    let level = LevelController::start(host.clone(), meta.clone(), METADATA_LEVEL_MAX);
    let (opener, events) = if opener {
        let (o, e) = GroupOpener::start(host.clone(), meta.machine.clone(), opener_config());
        (Some(o), Some(e))
    } else {
        (None, None)
    };
    MetaNode {
        host,
        meta,
        opener,
        events,
        level,
    }
}

/// Polls `cond` every 50 ms until it holds, at most [`WAIT`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl MetaCluster {
    /// Three hosts, group 0 formed on all, every host a member; an opener on the nodes
    /// `openers` says (all when empty).
    pub async fn start(without_opener: &[NodeId]) -> MetaCluster {
        let mut listeners = BTreeMap::new();
        for id in 0..NODES {
            listeners.insert(id, TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let addrs: BTreeMap<NodeId, String> = listeners
            .iter()
            .map(|(id, l)| (*id, l.local_addr().unwrap().to_string()))
            .collect();
        let openers: BTreeMap<NodeId, bool> = (0..NODES)
            .map(|n| (n, !without_opener.contains(&n)))
            .collect();
        let mut nodes = BTreeMap::new();
        let mut dirs = BTreeMap::new();
        for (id, listener) in listeners {
            let dir = tempfile::tempdir().unwrap();
            nodes.insert(id, start_node(id, dir.path(), listener, openers[&id]).await);
            dirs.insert(id, dir);
        }
        let c = MetaCluster {
            nodes,
            addrs,
            dirs,
            openers,
        };
        c.nodes[&0].meta.handle.bootstrap(&c.addrs).await.unwrap();
        let leader = c.meta_leader().await;
        for n in 0..NODES {
            let member = Member {
                peer: c.addrs[&n].clone(),
                amqp: amqp_addr(n),
            };
            leader.add_member(n, member).await.unwrap();
        }
        c
    }

    /// Group 0's leader among the running hosts, once there is one.
    pub async fn meta_leader(&self) -> MetaGroup {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let leads = |n: &&MetaNode| n.meta.handle.leadership().borrow().leads;
            if let Some(n) = self.nodes.values().find(leads) {
                return n.meta.clone();
            }
            assert!(tokio::time::Instant::now() < deadline, "no group 0 leader");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn opener(&self, n: NodeId) -> &GroupOpener {
        self.nodes[&n].opener.as_ref().unwrap()
    }

    /// Waits until node `n`'s opener has `group` open; the opened group.
    pub async fn opened(&self, n: NodeId, group: GroupId) -> OpenedGroup {
        let opener = self.opener(n);
        wait_until(&format!("group {group} open on node {n}"), || {
            opener.get(group).is_some()
        })
        .await;
        opener.get(group).unwrap()
    }

    /// The node leading `group` (through the openers' handles), once one does.
    pub async fn group_leader(&self, group: GroupId) -> NodeId {
        let mut leader = None;
        wait_until(&format!("a leader of group {group}"), || {
            leader = self.nodes.iter().find_map(|(n, node)| {
                let o = node.opener.as_ref()?.get(group)?;
                o.handle.leadership().borrow().leads.then_some(*n)
            });
            leader.is_some()
        })
        .await;
        leader.unwrap()
    }

    /// How many of `groups` each node leads now.
    pub fn leads(&self, groups: &[GroupId]) -> BTreeMap<NodeId, usize> {
        let mut out: BTreeMap<NodeId, usize> = self.nodes.keys().map(|n| (*n, 0)).collect();
        for (n, node) in &self.nodes {
            for g in groups {
                let host_group = node.host.group(*g);
                if host_group.is_some_and(|h| h.leadership().borrow().leads) {
                    *out.entry(*n).or_default() += 1;
                }
            }
        }
        out
    }

    /// Every event node `n`'s opener queued so far.
    pub fn drain_events(&mut self, n: NodeId) -> Vec<GroupEvent> {
        let mut out = Vec::new();
        if let Some(rx) = self.nodes.get_mut(&n).and_then(|n| n.events.as_mut()) {
            while let Ok(e) = rx.try_recv() {
                out.push(e);
            }
        }
        out
    }

    /// Stops node `n`'s opener and host (directory and port kept).
    pub async fn stop(&mut self, n: NodeId) {
        if let Some(node) = self.nodes.remove(&n) {
            node.level.stop().await;
            if let Some(o) = node.opener {
                o.stop().await;
            }
            node.host.shutdown().await;
        }
    }

    /// Starts node `n` again on its directory and port (group 0 reopens from its log).
    pub async fn start_again(&mut self, n: NodeId) {
        let listener = TcpListener::bind(&self.addrs[&n]).await.unwrap();
        let dir = self.dirs[&n].path().to_path_buf();
        let node = start_node(n, &dir, listener, self.openers[&n]).await;
        self.nodes.insert(n, node);
    }

    pub async fn restart_all(&mut self) {
        for n in 0..NODES {
            self.stop(n).await;
        }
        for n in 0..NODES {
            self.start_again(n).await;
        }
    }

    pub async fn shutdown(mut self) {
        for n in 0..NODES {
            self.stop(n).await;
        }
    }
}
