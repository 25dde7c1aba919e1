//! Members joining and leaving in `cluster-mode: groups` (issue 12 point 3, issue 13):
//! the joiner a node runs at start, and the `/cluster` API of a groups node
//! (`GET /cluster`, `POST /cluster/add`, `/cluster/remove`, `/cluster/drain`; the CLI's
//! `entrepot cluster status|add|remove` and `entrepot drain` speak to it unchanged).
//!
//! What it owns:
//! * **The joiner** ([`join`]). A node asks group 0 to take it as a member by proposing
//!   `AddMember` itself: through the leader its replica of group 0 knows, or — a node
//!   that never was a member knows no leader: its replica is empty until a leader adds
//!   it — through each of its `--peers` in turn (`MetaGroup::propose_via`, a forwarded
//!   proposal that follows `NotLeader` to the leader). It then waits until its own
//!   replica of group 0 shows it a member (the balancer on group 0's leader has added it
//!   to group 0, so it receives the metadata); between rounds it backs off from
//!   `JOIN_BACKOFF_MIN` to `JOIN_BACKOFF_MAX` (the one-group joiner's). It runs after
//!   every start (`AddMember` with the same addresses changes nothing), so a node drained
//!   earlier and started again joins again; a drain ends it. Before it asks, a node not
//!   yet a member asks its seeds for the cluster's finalized metadata level
//!   (`metadata_level.rs`): at level 2 it joins with an `AddMemberAt` declaring its own
//!   level, and a node whose level is below the finalized one refuses itself, naming
//!   both levels (group 0 would refuse it the same way), and asks again only after
//!   `JOIN_BACKOFF_MAX`. The placement then gives
//!   the new member replicas and each group's leader moves one to it (`balancer.rs`:
//!   learner, caught up, voter).
//! * **Leaving** ([`Membership::drain`], [`Membership::remove`]): refused, naming the
//!   limit, when the node is the last member or fewer members than the replication
//!   factor would remain ([`leave_refusal`]); else `RemoveMember` through group 0, after
//!   which the placement puts its replicas elsewhere, the balancer on each group's leader
//!   moves them away (the node's leaderships end as it stops being a voter), and group
//!   0's leader takes it out of group 0. The answer waits until no group open on the
//!   answering node — group 0 included — has the node as a voter or leader, and on the
//!   draining node itself until no address group is open any more (its opener closes a
//!   copy once a committed membership leaves it out), at most [`DRAIN_TIMEOUT`]. A drain also marks
//!   the node [`DrainState::Leaving`] first (`/readyz` 503, new client connections
//!   closed at once) and [`DrainState::Drained`] at the end; the node keeps running,
//!   hosting nothing, until it is stopped.
//!
//! Invariants: the member set changes only through group 0 (proposed from any node,
//! applied by every replica in order); this module never changes a group's Raft
//! membership itself (the balancer does, on each group's leader), so a drain can never
//! take a group below a majority of caught-up voters.
//!
//! A drain hands this node's leaderships over first (`handover.rs`: to the preferred
//! leaders of the placement without it, the opener's campaigns held), then leaves; a
//! `remove` of another node does not (each of its leaders removes itself and steps down).
//!
//! Does not: tell a restart from a scale-down (`entrepot drain --desired-replicas` does),
//! or see the groups of other nodes: a `remove` of another node waits only for the groups
//! open where it is asked.

use std::sync::Arc;
use std::time::Duration;

use entrepot_cluster::membership::{JOIN_BACKOFF_MAX, JOIN_BACKOFF_MIN};
use entrepot_cluster::{identity, Host, NodeId};
use tokio::sync::watch;
use tokio::time::Instant;

use super::admin::{bounded, AdminRequest, Reply};
use super::drain::{DrainState, DRAIN_TIMEOUT};
use super::group_opener::GroupOpener;
use super::group_router::Drivers;
use super::handover::HandOver;
use super::meta_machine::{
    join_op, Member, MetaError, MetaGroup, MetaOp, MetaRefusal, MetaState, METADATA_LEVEL_FORMED,
    METADATA_LEVEL_MIN,
};
use super::metadata_level;

/// How long the joiner waits, after its `AddMember` committed, for its own replica of
/// group 0 to show it a member (the balancer adds it to group 0 first) before it asks
/// again.
pub const JOIN_WAIT: Duration = Duration::from_secs(10);
/// How often a leave looks at the memberships it waits for.
pub const LEAVE_POLL: Duration = Duration::from_millis(100);

/// Why a node may not leave.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LeaveRefusal {
    #[error("node {node} is not a member")]
    NotMember { node: NodeId },
    #[error("node {node} is the last member")]
    LastMember { node: NodeId },
    #[error(
        "{left} members would remain, fewer than the replication factor ({replication}): \
         add a node first"
    )]
    BelowReplication { left: usize, replication: usize },
}

/// Whether `node` may leave the members of `state`.
pub fn leave_refusal(state: &MetaState, node: NodeId) -> Option<LeaveRefusal> {
    let members = state.members();
    if !members.contains_key(&node) {
        return Some(LeaveRefusal::NotMember { node });
    }
    let left = members.len() - 1;
    if left == 0 {
        return Some(LeaveRefusal::LastMember { node });
    }
    let replication = state.replication();
    (left < replication).then_some(LeaveRefusal::BelowReplication { left, replication })
}

/// What the joiner needs: who this node is, what it announces, whom it asks.
pub struct Joiner {
    pub node: NodeId,
    /// This node's member address (`host:peer_port/amqp_port[/amqps_port]`).
    pub member_addr: String,
    /// The initial peers' member addresses, asked while no leader is known here.
    pub seeds: Vec<(NodeId, String)>,
    /// The highest metadata level this node supports (`--metadata-level-max`).
    pub level_max: u8,
}

/// The member `addr` names: its member address and its AMQP listener.
fn member(addr: &str) -> Member {
    Member {
        peer: addr.to_owned(),
        amqp: identity::amqp_addr(addr),
    }
}

/// Asks group 0 until this node is a member (see the module docs); ends early on
/// shutdown or when a drain starts.
pub async fn join(
    host: Host,
    meta: MetaGroup,
    joiner: Joiner,
    mut shutdown: watch::Receiver<bool>,
    mut drain: watch::Receiver<DrainState>,
) {
    tokio::select! {
        _ = ask_until_member(&host, &meta, &joiner) => {}
        _ = shutdown.wait_for(|s| *s) => {}
        _ = drain.wait_for(|d| *d != DrainState::Serving) => {
            tracing::info!("draining: no longer asking to join");
        }
    }
}

/// The cluster's finalized metadata level as a node can tell before it is a member: its
/// own replica of group 0's, or the highest a seed answers (one that does not answer
/// counts as level 1).
pub async fn cluster_level(host: &Host, meta: &MetaGroup, seeds: &[(NodeId, String)]) -> u8 {
    let mut level = meta.machine.level();
    for (node, addr) in seeds {
        if let Some(a) = metadata_level::ask(host, *node, addr).await {
            level = level.max(a.finalized);
        }
    }
    level
}

/// The op this node asks to join with: an `AddMember` at level 1, an `AddMemberAt` from
/// level 2; refused here, as group 0 would refuse it, when this node is not a member yet
/// and its level is below the cluster's finalized level ([`cluster_level`]).
pub async fn join_request(
    host: &Host,
    meta: &MetaGroup,
    joiner: &Joiner,
) -> Result<MetaOp, MetaRefusal> {
    let member = member(&joiner.member_addr);
    if meta.machine.members().get(&joiner.node) == Some(&member) {
        // A member already (a restart): asked again with what every replica knows.
        let finalized = meta.machine.level();
        return Ok(join_op(joiner.node, member, joiner.level_max, finalized));
    }
    let finalized = cluster_level(host, meta, &joiner.seeds).await;
    if joiner.level_max < finalized {
        return Err(MetaRefusal::LevelBelowFinalized {
            node: joiner.node,
            level: joiner.level_max,
            finalized,
        });
    }
    Ok(join_op(joiner.node, member, joiner.level_max, finalized))
}

async fn ask_until_member(host: &Host, meta: &MetaGroup, joiner: &Joiner) {
    let mut backoff = JOIN_BACKOFF_MIN;
    loop {
        let op = match join_request(host, meta, joiner).await {
            Ok(op) => op,
            Err(refusal) => {
                tracing::error!(node = joiner.node, %refusal, "not joining the cluster");
                tokio::time::sleep(JOIN_BACKOFF_MAX).await;
                continue;
            }
        };
        match meta.propose_via(&joiner.seeds, &op).await {
            Ok(_) => {
                let mut changes = meta.machine.changes();
                let member =
                    changes.wait_for(|_| meta.machine.members().contains_key(&joiner.node));
                if tokio::time::timeout(JOIN_WAIT, member).await.is_ok() {
                    tracing::info!(node = joiner.node, addr = %joiner.member_addr, "member of the cluster");
                    return;
                }
                tracing::info!(node = joiner.node, "joined, but the metadata has not reached this node within JOIN_WAIT; asking again");
            }
            Err(e) => {
                tracing::info!(node = joiner.node, error = %e, "asking to join failed; asking again")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(JOIN_BACKOFF_MAX);
    }
}

/// The `/cluster` API of a groups node (see the module docs).
pub struct Membership {
    pub node: NodeId,
    /// The node's host (a node being added is asked for its metadata level through it).
    pub host: Host,
    pub meta: MetaGroup,
    pub opener: Arc<GroupOpener>,
    /// The address drivers, stood down while their groups are handed over.
    pub drivers: Drivers,
    pub drain: watch::Sender<DrainState>,
}

impl Membership {
    /// Answers a `/cluster…` request; `status` is what `GET /cluster` shows.
    pub async fn http(&self, method: &str, target: &str, status: String) -> Reply {
        match AdminRequest::parse(method, target) {
            Err(reply) => reply,
            Ok(AdminRequest::Status) => ("200 OK", status),
            Ok(AdminRequest::Add { id, addr }) => bounded(self.add(id, addr)).await,
            Ok(AdminRequest::Remove { id }) => bounded(self.remove(id)).await,
            Ok(AdminRequest::Drain) => self.drain().await,
        }
    }

    /// `POST /cluster/add?id=N&addr=A`: at metadata level 2 the node is asked for its
    /// level first (one that does not answer counts as level 1, and is refused).
    async fn add(&self, id: NodeId, addr: String) -> Reply {
        let finalized = self.meta.machine.level();
        let level = if finalized >= METADATA_LEVEL_FORMED {
            metadata_level::ask(&self.host, id, &addr)
                .await
                .map_or(METADATA_LEVEL_MIN, |a| a.supported)
        } else {
            METADATA_LEVEL_MIN
        };
        let op = join_op(id, member(&addr), level, finalized);
        match self.meta.run_anywhere(&op).await {
            Ok(_) => (
                "200 OK",
                format!(
                    "node {id} is a member ({addr}): the balancer on each group's leader moves \
                     its replicas to it\n"
                ),
            ),
            Err(e) => meta_refusal(e),
        }
    }

    /// `POST /cluster/remove?id=N`: the drain's steps without the local ones.
    async fn remove(&self, id: NodeId) -> Reply {
        if let Some(why) = leave_refusal(&self.meta.machine.state(), id) {
            return ("409 Conflict", format!("refused: {why}\n"));
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut lines = Vec::new();
        match self.leave(id, deadline, &mut lines).await {
            Ok(()) => ("200 OK", lines.join("\n") + "\n"),
            Err(status) => (status, lines.join("\n") + "\n"),
        }
    }

    /// `POST /cluster/drain`: see the module docs.
    pub async fn drain(&self) -> Reply {
        let me = self.node;
        if *self.drain.borrow() == DrainState::Drained {
            return ("200 OK", format!("node {me} is drained already\n"));
        }
        if let Some(why) = leave_refusal(&self.meta.machine.state(), me) {
            return ("409 Conflict", format!("refused: {why}\n"));
        }
        self.drain.send_replace(DrainState::Leaving);
        tracing::info!(node = me, "draining: leaving the members");
        let mut lines = vec![format!(
            "node {me}: draining (not ready, new connections refused)"
        )];
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        // The leaderships first, to where the placement without this node puts them:
        // its clients are served again at once, not after an election each.
        let state = self.meta.machine.state();
        let aim = state.after_removal(me).map(Arc::new).unwrap_or(state);
        let round = HandOver {
            node: me,
            meta: &self.meta,
            opener: &self.opener,
            drivers: &self.drivers,
        };
        lines.push(format!("node {me}: {}", round.run(&aim).await));
        if let Err(status) = self.leave(me, deadline, &mut lines).await {
            self.opener.hold_campaigns(false);
            tracing::warn!(node = me, "drain did not complete: {}", lines.join("; "));
            return (status, lines.join("\n") + "\n");
        }
        self.drain.send_replace(DrainState::Drained);
        tracing::info!(node = me, "drained: hosts no voter replica");
        lines.push(format!("node {me}: drained"));
        ("200 OK", lines.join("\n") + "\n")
    }

    /// Removes `node` from the members, then waits until no group open here has it as
    /// a voter; one line per step into `lines`; the failure's HTTP status.
    async fn leave(
        &self,
        node: NodeId,
        deadline: Instant,
        lines: &mut Vec<String>,
    ) -> Result<(), &'static str> {
        let started = Instant::now();
        let op = MetaOp::RemoveMember { node };
        let removal = self.meta.run_anywhere(&op);
        match tokio::time::timeout_at(deadline, removal).await {
            Ok(Ok(_)) => lines.push(format!(
                "node {node}: removed from the members (group 0): its replicas are placed on the others"
            )),
            Ok(Err(e)) => {
                if *self.drain.borrow() == DrainState::Leaving {
                    self.drain.send_replace(DrainState::Serving);
                }
                let (status, why) = meta_refusal(e);
                lines.push(format!("node {node}: leaving failed: {}", why.trim_end()));
                return Err(status);
            }
            Err(_) => {
                lines.push(format!(
                    "node {node}: the removal did not commit within DRAIN_TIMEOUT ({DRAIN_TIMEOUT:?})"
                ));
                return Err("504 Gateway Timeout");
            }
        }
        loop {
            let held = self.held_by(node);
            if held.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                lines.push(format!(
                    "node {node}: still holds groups {held:?} after DRAIN_TIMEOUT \
                     ({DRAIN_TIMEOUT:?}); the balancer goes on moving them"
                ));
                return Err("504 Gateway Timeout");
            }
            tokio::time::sleep(LEAVE_POLL).await;
        }
        lines.push(format!(
            "node {node}: holds no voter replica or leadership of the groups open on node {} \
             (group 0 included), {:.1} s after the removal",
            self.node,
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// The groups open here (group 0 included) that `node` still holds: as a voter, or
    /// as the leader (a leader that removed itself leads until that change commits); on
    /// `node` itself, every address group still open (its opener closes a copy once a
    /// committed membership leaves it out).
    pub fn held_by(&self, node: NodeId) -> Vec<u64> {
        let holds = |st: &entrepot_cluster::host::GroupStatus| {
            st.voters.contains(&node) || st.leadership.leader == Some(node)
        };
        let mut groups: Vec<u64> = self
            .opener
            .opened()
            .values()
            .filter(|g| node == self.node || holds(&g.handle.status()))
            .map(|g| g.group)
            .collect();
        if holds(&self.meta.handle.status()) {
            groups.insert(0, entrepot_cluster::METADATA_GROUP);
        }
        groups
    }
}

/// The HTTP answer to a failed metadata op.
fn meta_refusal(e: MetaError) -> Reply {
    match e {
        MetaError::Refused(r) => ("409 Conflict", format!("refused: {r}\n")),
        other => ("503 Service Unavailable", format!("{other}\n")),
    }
}
