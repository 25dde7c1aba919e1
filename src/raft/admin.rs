//! Cluster administration: status and membership changes, for the HTTP admin API
//! (`GET /cluster`, `POST /cluster/add?id=N&addr=host:port/amqp[/amqps]`,
//! `POST /cluster/remove?id=N`) and `entrepot cluster status|add|remove`.
//!
//! Adding a node: it joins as a learner, catches up by replaying the Raft log, and only
//! then becomes a voter (openraft's `add_learner` with blocking, then
//! `change_membership`). Removing the leader is allowed: it commits the new membership
//! and then steps down, so its leadership moves before it leaves. Membership changes run
//! on the leader; any other node answers 421 naming the leader.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::sync::atomic::Ordering;

use entrepot_cluster::{NodeId, TypeConfig};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Raft};
use tokio::sync::watch;

use super::Role;
use crate::broker::Broker;
use crate::metrics::{counter, gauge, render_latency};

/// Most time a membership change may take (a learner's catch-up included) before the
/// HTTP request gives up waiting; the change itself goes on.
pub const CHANGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A node's view of its cluster, for the admin API.
#[derive(Clone)]
pub struct ClusterHandle {
    raft: Raft<TypeConfig>,
    role: watch::Receiver<Role>,
}

/// An HTTP answer: status line, body.
pub type Reply = (&'static str, String);

impl ClusterHandle {
    pub fn new(raft: Raft<TypeConfig>, role: watch::Receiver<Role>) -> ClusterHandle {
        ClusterHandle { raft, role }
    }

    /// The active broker, when this node leads.
    pub fn broker(&self) -> Option<std::sync::Arc<Broker>> {
        match &*self.role.borrow() {
            Role::Leader(a) => Some(std::sync::Arc::clone(&a.broker)),
            _ => None,
        }
    }

    /// True when clients can be served here (this node leads, or knows who does).
    pub fn ready(&self) -> bool {
        !matches!(&*self.role.borrow(), Role::Unknown)
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
        if let Role::Leader(a) = &*self.role.borrow() {
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
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let param = |name: &str| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_owned())
        };
        match (method, path) {
            ("GET", "/cluster") => ("200 OK", self.status()),
            ("POST", "/cluster/add") => {
                let (Some(id), Some(addr)) =
                    (param("id").and_then(|v| v.parse().ok()), param("addr"))
                else {
                    return (
                        "400 Bad Request",
                        "expected ?id=<node id>&addr=<host:port/amqp[/amqps]>\n".into(),
                    );
                };
                if let Err(e) = entrepot_cluster::identity::parse_peers(&format!("{id}={addr}")) {
                    return ("400 Bad Request", format!("{e}\n"));
                }
                self.bounded(self.add(id, addr)).await
            }
            ("POST", "/cluster/remove") => {
                let Some(id) = param("id").and_then(|v| v.parse().ok()) else {
                    return ("400 Bad Request", "expected ?id=<node id>\n".into());
                };
                self.bounded(self.remove(id)).await
            }
            _ => ("404 Not Found", "not found\n".into()),
        }
    }

    async fn bounded(&self, change: impl std::future::Future<Output = Reply>) -> Reply {
        tokio::time::timeout(CHANGE_TIMEOUT, change)
            .await
            .unwrap_or((
                "504 Gateway Timeout",
                "membership change still running\n".into(),
            ))
    }

    async fn add(&self, id: NodeId, addr: String) -> Reply {
        if let Err(e) = self.raft.add_learner(id, BasicNode::new(&addr), true).await {
            return refusal(e);
        }
        let mut voters = self.voters();
        voters.insert(id);
        match self.raft.change_membership(voters, false).await {
            Ok(_) => ("200 OK", format!("node {id} added as a voter\n")),
            Err(e) => refusal(e),
        }
    }

    async fn remove(&self, id: NodeId) -> Reply {
        let mut voters = self.voters();
        if !voters.remove(&id) {
            return ("404 Not Found", format!("node {id} is not a voter\n"));
        }
        if voters.is_empty() {
            return ("409 Conflict", "cannot remove the last voter\n".into());
        }
        match self.raft.change_membership(voters, false).await {
            Ok(_) => ("200 OK", format!("node {id} removed\n")),
            Err(e) => refusal(e),
        }
    }

    fn voters(&self) -> BTreeSet<NodeId> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }
}

/// The HTTP endpoint (`crate::metrics`) reads the node through this view.
impl crate::metrics::ClusterView for ClusterHandle {
    fn broker(&self) -> Option<std::sync::Arc<Broker>> {
        ClusterHandle::broker(self)
    }

    fn ready(&self) -> bool {
        ClusterHandle::ready(self)
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

fn refusal(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> Reply {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => (
            "421 Misdirected Request",
            match (f.leader_id, f.leader_node) {
                (Some(id), Some(n)) => format!("not the leader; node {id} ({}) leads\n", n.addr),
                _ => "not the leader; no leader known yet\n".into(),
            },
        ),
        other => ("409 Conflict", format!("{other}\n")),
    }
}
