//! Cluster administration: status, readiness and membership changes, for the HTTP admin
//! API (`GET /cluster`, `POST /cluster/add?id=N&addr=host:port/amqp[/amqps]`,
//! `POST /cluster/remove?id=N`, `POST /cluster/drain`) and `entrepot cluster
//! status|add|remove`, `entrepot drain`.
//!
//! Adding a node: it joins as a learner, catches up by replaying the Raft log, and only
//! then becomes a voter (`entrepot_cluster::membership::add_voter`, the steps a joining
//! node's own request takes too). Removing a node demotes it to learner, then removes it;
//! removing the leader is allowed: it commits the membership in which it is a learner and
//! steps down, and the next leader removes it (the CLI retries on the other nodes).
//! Membership changes run on the leader; any other node answers 421 naming the leader.
//! Draining this node: `drain.rs`.
//!
//! Readiness ([`ClusterHandle::ready`]): the leader is ready; a follower only while it is a
//! *voter* whose applied index is within [`READY_LAG_ENTRIES`] of the leader's commit
//! index. openraft 0.9's metrics do not carry the leader's commit index, so the peer server
//! keeps the one the last `append_entries` carried (`HeardCommit`); comparing with the
//! follower's own last log index instead would call ready a follower that has received
//! only the first of many batches it lacks. A learner (still catching up, or demoted by a
//! drain), a node outside the membership, a draining node and a node without a leader are
//! not ready.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::sync::atomic::Ordering;

use entrepot_cluster::membership::{self, ChangeError};
use entrepot_cluster::{HeardCommit, NodeId, TcpNetwork, TypeConfig};
use openraft::{Raft, ServerState};
use tokio::sync::watch;

use super::drain::DrainState;
use super::Role;
use crate::broker::Broker;
use crate::metrics::{counter, gauge, render_latency};

/// Most time a membership change may take (a learner's catch-up included) before the
/// HTTP request gives up waiting; the change itself goes on.
pub const CHANGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// A voter follower is ready while its applied index is at most this many Raft entries
/// (replicated batches) behind the leader's commit index: more than the replicator keeps
/// in flight (8), so a follower keeping up under load stays ready.
pub const READY_LAG_ENTRIES: u64 = 32;

/// A node's view of its cluster, for the admin API.
#[derive(Clone)]
pub struct ClusterHandle {
    raft: Raft<TypeConfig>,
    role: watch::Receiver<Role>,
    /// The leader's commit index as last heard (readiness).
    heard_commit: HeardCommit,
    /// How to reach the leader (a drain's leave request).
    network: TcpNetwork,
    /// Where this node stands with respect to a drain.
    drain: std::sync::Arc<watch::Sender<DrainState>>,
    /// Lapses of this node's delivery lease (a metric).
    lease_lapses: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// What [`ClusterHandle`] needs besides Raft and the role.
pub struct HandleParts {
    pub heard_commit: HeardCommit,
    pub network: TcpNetwork,
    pub drain: std::sync::Arc<watch::Sender<DrainState>>,
    /// Lapses of this node's delivery lease, over all its leaderships.
    pub lease_lapses: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// An HTTP answer: status line, body.
pub type Reply = (&'static str, String);

impl ClusterHandle {
    pub fn new(
        raft: Raft<TypeConfig>,
        role: watch::Receiver<Role>,
        parts: HandleParts,
    ) -> ClusterHandle {
        ClusterHandle {
            raft,
            role,
            heard_commit: parts.heard_commit,
            network: parts.network,
            drain: parts.drain,
            lease_lapses: parts.lease_lapses,
        }
    }

    /// The active broker, when this node leads.
    pub fn broker(&self) -> Option<std::sync::Arc<Broker>> {
        match &*self.role.borrow() {
            Role::Leader(a) => Some(std::sync::Arc::clone(&a.broker)),
            _ => None,
        }
    }

    /// True when clients can be served here: this node leads, or it is a voter that has
    /// caught up with the leader (see the module docs); never while draining.
    pub fn ready(&self) -> bool {
        self.unready().is_none()
    }

    /// Why this node is not ready, or `None` when it is (see the module docs).
    pub fn unready(&self) -> Option<String> {
        let drain = *self.drain.borrow();
        if drain != DrainState::Serving {
            return Some(format!("draining: {drain:?}").to_lowercase());
        }
        match &*self.role.borrow() {
            Role::Leader(_) => None,
            Role::Unknown => Some("no leader known".to_owned()),
            Role::Follower { .. } => self.lag(),
        }
    }

    /// Why a follower is not ready: it is no voter (a learner catching up, or not a
    /// member), or its applied index trails the leader's commit index by more than
    /// [`READY_LAG_ENTRIES`]; `None` when it is a caught-up voter.
    fn lag(&self) -> Option<String> {
        let m = self.raft.metrics().borrow().clone();
        let voter = m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == m.id);
        if !voter {
            return Some("not a voter (a learner catching up, or not a member)".to_owned());
        }
        if m.state != ServerState::Follower {
            return Some(format!("raft state {:?}", m.state).to_lowercase());
        }
        let Some(committed) = self.heard_commit.get() else {
            return Some("no commit index heard from a leader yet".to_owned());
        };
        let applied = m.last_applied.map_or(0, |l| l.index);
        (applied.saturating_add(READY_LAG_ENTRIES) < committed).then(|| {
            format!(
                "catching up: applied {applied}, leader committed {committed} \
                 (READY_LAG_ENTRIES {READY_LAG_ENTRIES})"
            )
        })
    }

    /// `GET /cluster`: YAML.
    pub fn status(&self) -> String {
        let m = self.raft.metrics().borrow().clone();
        let mut out = String::new();
        let role = match &*self.role.borrow() {
            Role::Leader(_) => "leader",
            Role::Follower { .. } => "follower",
            Role::Unknown => "no-leader",
        };
        let _ = writeln!(out, "node: {}", m.id);
        let _ = writeln!(out, "role: {role}");
        let _ = writeln!(out, "ready: {}", self.ready());
        let drain = match *self.drain.borrow() {
            DrainState::Serving => "serving",
            DrainState::Leaving => "leaving",
            DrainState::Drained => "drained",
        };
        let _ = writeln!(out, "drain: {drain}");
        let _ = writeln!(out, "state: {:?}", m.state);
        let _ = writeln!(out, "term: {}", m.current_term);
        match m.current_leader {
            Some(l) => writeln!(out, "leader: {l}"),
            None => writeln!(out, "leader: null"),
        }
        .ok();
        let _ = writeln!(
            out,
            "last_log_index: {}",
            m.last_log_index.map_or(-1, |i| i as i64)
        );
        let _ = writeln!(
            out,
            "last_applied: {}",
            m.last_applied.map_or(-1, |l| l.index as i64)
        );
        // What the node holds as a snapshot and how far its Raft log is purged: a node
        // whose log is purged can only have come back from its snapshot.
        let _ = writeln!(
            out,
            "snapshot_index: {}",
            m.snapshot.map_or(-1, |l| l.index as i64)
        );
        let _ = writeln!(
            out,
            "purged_index: {}",
            m.purged.map_or(-1, |l| l.index as i64)
        );
        if let Role::Leader(a) = &*self.role.borrow() {
            let _ = writeln!(out, "uncommitted_ops: {}", a.replication.uncommitted());
        }
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let _ = writeln!(out, "members:");
        for (id, node) in membership.nodes() {
            let kind = if voters.contains(id) {
                "voter"
            } else {
                "learner"
            };
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(id).cloned().flatten())
                .map_or(-1, |l| l.index as i64);
            let _ = writeln!(
                out,
                "  - {{ id: {id}, addr: \"{}\", kind: {kind}, matched: {matched} }}",
                node.addr
            );
        }
        out
    }

    /// Prometheus lines for this node's Raft state.
    pub fn metrics(&self) -> String {
        let m = self.raft.metrics().borrow().clone();
        let leader = matches!(&*self.role.borrow(), Role::Leader(_));
        let mut out = String::new();
        gauge(
            &mut out,
            "entrepot_raft_term",
            "Current Raft term.",
            m.current_term,
        );
        gauge(
            &mut out,
            "entrepot_raft_leader",
            "1 if this node leads and serves clients.",
            u8::from(leader),
        );
        gauge(
            &mut out,
            "entrepot_raft_last_log_index",
            "Index of the last Raft entry in this node's log.",
            m.last_log_index.map_or(-1, |i| i as i64),
        );
        gauge(
            &mut out,
            "entrepot_raft_last_applied_index",
            "Index of the last Raft entry applied to this node's store.",
            m.last_applied.map_or(-1, |l| l.index as i64),
        );
        counter(
            &mut out,
            "entrepot_cluster_lease_lapses_total",
            "Times this node's delivery lease ran out while it led (deliveries paused until a majority confirmed it again).",
            self.lease_lapses.load(Ordering::Relaxed),
        );
        if let Role::Leader(a) = &*self.role.borrow() {
            gauge(
                &mut out,
                "entrepot_cluster_lease_held",
                "1 while this leader holds its delivery lease (it delivers only then).",
                u8::from(a.lease.holds()),
            );
            let st = &a.replication.stats;
            counter(
                &mut out,
                "entrepot_raft_batches_total",
                "Replicated batches (Raft entries) this leadership committed.",
                st.batches.load(Ordering::Relaxed),
            );
            counter(
                &mut out,
                "entrepot_raft_replicated_bytes_total",
                "Bytes of store operations this leadership committed.",
                st.bytes.load(Ordering::Relaxed),
            );
            gauge(
                &mut out,
                "entrepot_raft_uncommitted_ops",
                "Store operations this leader recorded and Raft has not committed yet.",
                a.replication.uncommitted(),
            );
            render_latency(
                &mut out,
                "entrepot_raft_commit_seconds",
                "From submitting a batch to Raft to its commit on a majority",
                &st.commit_latency,
            );
        }
        gauge(
            &mut out,
            "entrepot_raft_members",
            "Nodes in the membership (voters and learners).",
            m.membership_config.membership().nodes().count(),
        );
        out
    }

    /// Handles `/cluster` requests.
    pub async fn http(&self, method: &str, target: &str) -> Reply {
        match AdminRequest::parse(method, target) {
            Err(reply) => reply,
            Ok(AdminRequest::Status) => ("200 OK", self.status()),
            Ok(AdminRequest::Add { id, addr }) => bounded(self.add(id, addr)).await,
            Ok(AdminRequest::Remove { id }) => bounded(self.remove(id)).await,
            Ok(AdminRequest::Drain) => {
                super::drain::drain(&self.raft, &self.network, &self.drain).await
            }
        }
    }

    async fn add(&self, id: NodeId, addr: String) -> Reply {
        match membership::add_voter(&self.raft, id, &addr).await {
            Ok(detail) => ("200 OK", format!("{detail}\n")),
            Err(e) => refusal(e),
        }
    }

    async fn remove(&self, id: NodeId) -> Reply {
        match membership::remove(&self.raft, id).await {
            Ok(detail) => ("200 OK", format!("{detail}\n")),
            Err(e) => refusal(e),
        }
    }
}

/// The HTTP endpoint (`crate::metrics`) reads the node through this view.
impl crate::metrics::ClusterView for ClusterHandle {
    fn broker(&self) -> Option<std::sync::Arc<Broker>> {
        ClusterHandle::broker(self)
    }

    fn unready(&self) -> Option<String> {
        ClusterHandle::unready(self)
    }

    fn status(&self) -> String {
        ClusterHandle::status(self)
    }

    fn metrics(&self) -> String {
        ClusterHandle::metrics(self)
    }

    fn http<'a>(
        &'a self,
        method: &'a str,
        target: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Reply> + Send + 'a>> {
        Box::pin(ClusterHandle::http(self, method, target))
    }
}

/// A `/cluster` request, in either cluster mode.
pub(super) enum AdminRequest {
    /// `GET /cluster`.
    Status,
    /// `POST /cluster/add?id=N&addr=host:port/amqp[/amqps]`.
    Add { id: NodeId, addr: String },
    /// `POST /cluster/remove?id=N`.
    Remove { id: NodeId },
    /// `POST /cluster/drain`.
    Drain,
}

impl AdminRequest {
    /// The request `method target` asks for, or the reply refusing it (400, 404).
    pub(super) fn parse(method: &str, target: &str) -> Result<AdminRequest, Reply> {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let param = |name: &str| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_owned())
        };
        match (method, path) {
            ("GET", "/cluster") => Ok(AdminRequest::Status),
            ("POST", "/cluster/add") => {
                let (Some(id), Some(addr)) =
                    (param("id").and_then(|v| v.parse().ok()), param("addr"))
                else {
                    return Err((
                        "400 Bad Request",
                        "expected ?id=<node id>&addr=<host:port/amqp[/amqps]>\n".into(),
                    ));
                };
                if let Err(e) = entrepot_cluster::identity::parse_peers(&format!("{id}={addr}")) {
                    return Err(("400 Bad Request", format!("{e}\n")));
                }
                Ok(AdminRequest::Add { id, addr })
            }
            ("POST", "/cluster/remove") => match param("id").and_then(|v| v.parse().ok()) {
                Some(id) => Ok(AdminRequest::Remove { id }),
                None => Err(("400 Bad Request", "expected ?id=<node id>\n".into())),
            },
            ("POST", "/cluster/drain") => Ok(AdminRequest::Drain),
            _ => Err(("404 Not Found", "not found\n".into())),
        }
    }
}

/// `change`, or a 504 once it ran [`CHANGE_TIMEOUT`] (the change itself goes on).
pub(super) async fn bounded(change: impl std::future::Future<Output = Reply>) -> Reply {
    tokio::time::timeout(CHANGE_TIMEOUT, change)
        .await
        .unwrap_or((
            "504 Gateway Timeout",
            "membership change still running\n".into(),
        ))
}

fn refusal(e: ChangeError) -> Reply {
    match e {
        ChangeError::NotLeader { .. } => ("421 Misdirected Request", format!("{e}\n")),
        other => ("409 Conflict", format!("{other}\n")),
    }
}
