//! Membership changes a node asks for itself: joining (scale up, `KIND_JOIN`) and leaving
//! (drain before a scale-down, `KIND_LEAVE`), served by the leader over the inter-node
//! port, and the joiner that a node beyond the initial members runs at start.
//!
//! What this owns:
//! * [`serve`]: the leader's side. A join adds the node as a learner, waits until it has
//!   caught up (snapshot + log, openraft's blocking `add_learner`, bounded by
//!   [`CATCH_UP_TIMEOUT`]), then makes it a voter (joint consensus). A leave demotes a voter
//!   to learner (`change_membership` with `retain`, joint consensus), then removes the
//!   node. A follower answers [`MembershipReply::NotLeader`] naming the leader it knows.
//! * [`auto_join`]: the joiner. It asks the seeds (the initial members) and every member
//!   it hears of, one after another, until a leader answers that it is a voter; between
//!   rounds it backs off from [`JOIN_BACKOFF_MIN`] to [`JOIN_BACKOFF_MAX`]. A node that is
//!   already a voter is told so at once and nothing changes, so it runs after every start:
//!   a node drained earlier and started again on its old volume finds out from the leader,
//!   not from its own (possibly stale) copy of the membership, that it must join again.
//! * [`leave`]: the leaving node's side of a drain, bounded by its caller's deadline: a
//!   leader demotes itself locally (and then steps down), anyone else asks the leader.
//!
//! Why a voter leaves as a *learner* first: openraft 0.9 stops replicating to a removed
//! node as soon as the change is appended, so a voter removed outright keeps a membership
//! naming it a voter and, restarted, campaigns with ever higher terms; one of those terms
//! reaching the leader later deposes it. Demoted first, the node hears the uniform config
//! in which it is a learner, and a learner never campaigns.
//!
//! Why the leaving leader does not hand its leadership over first: openraft 0.9 has no
//! leadership transfer, and an election triggered on another voter is refused while the
//! voters still hold the leader's lease (`handle_vote_req`). Committing a membership
//! without itself is what makes openraft 0.9's leader step down (`leader_step_down`; a
//! demoted leader leads on as a learner, so it removes itself entirely, and its own log
//! then holds the membership without it, so it never campaigns again); the others elect
//! one of themselves once its lease runs out (~0.3–0.5 s without a leader). Its clients
//! are closed as on any leadership loss and reconnect to the new leader.
//!
//! Invariants:
//! * One membership change at a time on a node ([`CHANGE_LOCK`]); a concurrent one is
//!   refused by openraft and retried by its asker.
//! * The last voter never leaves (refused, the reason names it).
//! * Every request and reply is bounded (`rpc.rs`: addresses by `MAX_NODE_ADDR_BYTES`,
//!   reasons by `MAX_RPC_STRING_BYTES`), and every wait by a named timeout.
//!
//! Does not: resolve DNS (a seed's name is resolved when it is dialled), or decide when a
//! node should leave (`entrepot drain` does).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Raft, ServerState};
use tokio::sync::watch;

use crate::identity::Peer;
use crate::network::{PeerCallError, TcpNetwork};
pub use crate::rpc::{MembershipReply, MembershipRequest};
use crate::types::{NodeId, TypeConfig};

/// Longest the leader waits for a new learner to catch up before it refuses the join (the
/// learner stays a learner and keeps catching up; the joiner asks again).
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(45);
/// Longest one membership request may take, catch-up included (the asker's read timeout).
pub const MEMBERSHIP_RPC_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest one change of the voters (two joint-consensus commits) may take.
pub const VOTER_CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a leaving node's removal waits for it to have the membership that demoted it
/// (then it is removed anyway: it may be gone, or too slow to wait for).
pub const DEMOTION_SEEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often that wait looks at the leader's replication progress.
const DEMOTION_SEEN_POLL: Duration = Duration::from_millis(20);
/// First pause of the joiner after a round in which no leader made it a voter.
pub const JOIN_BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest pause of the joiner between two rounds (the backoff doubles up to it).
pub const JOIN_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Most nodes one joiner round asks (seeds plus members heard of).
pub const JOIN_CANDIDATES_MAX: usize = 64;
/// Pause of a leaving node between two attempts (no leader known, a change running).
pub const LEAVE_RETRY: Duration = Duration::from_millis(100);
/// How long a leaving node that is no voter in its own view waits to hear of a leader
/// before it concludes it has nothing to leave (it never joined, or left already).
pub const LEAVE_NO_LEADER_GRACE: Duration = Duration::from_secs(3);

/// One membership change at a time on this node (the HTTP admin API takes it too).
pub static CHANGE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Serves a membership request on this node: changes the membership when it leads, names
/// the leader when it does not.
pub async fn serve(raft: &Raft<TypeConfig>, request: MembershipRequest) -> MembershipReply {
    let outcome = match request {
        MembershipRequest::Join { node, addr } => add_voter(raft, node, &addr).await,
        MembershipRequest::Leave { node } => remove(raft, node).await,
    };
    match outcome {
        Ok(detail) => MembershipReply::Done { detail },
        Err(ChangeError::NotLeader { leader }) => MembershipReply::NotLeader { leader },
        Err(ChangeError::Refused(reason)) => MembershipReply::Refused { reason },
        Err(ChangeError::LastVoter { node }) => MembershipReply::LastVoter { node },
    }
}

/// Why a membership change was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChangeError {
    /// This node does not lead; the leader it knows of, `(id, member address)`.
    #[error("not the leader; {}", match leader {
        Some((id, addr)) => format!("node {id} ({addr}) leads"),
        None => "no leader known yet".to_owned(),
    })]
    NotLeader { leader: Option<(NodeId, String)> },
    /// The change is refused or failed for now; the reason says which.
    #[error("{0}")]
    Refused(String),
    /// `node` is the last voter: it may not leave, the cluster would have none.
    #[error("node {node} is the last voter: removing it would leave the cluster without one")]
    LastVoter { node: NodeId },
}

/// The leader this node knows of, with its member address.
pub fn known_leader(raft: &Raft<TypeConfig>) -> Option<(NodeId, String)> {
    let m = raft.metrics().borrow().clone();
    let leader = m.current_leader?;
    let node = m.membership_config.membership().get_node(&leader)?.clone();
    Some((leader, node.addr))
}

/// Whether this node leads now.
fn leads(raft: &Raft<TypeConfig>) -> bool {
    let m = raft.metrics().borrow().clone();
    m.state == ServerState::Leader && m.current_leader == Some(m.id)
}

fn not_leader(raft: &Raft<TypeConfig>) -> ChangeError {
    ChangeError::NotLeader {
        leader: known_leader(raft).filter(|(id, _)| *id != raft.metrics().borrow().id),
    }
}

fn voters(raft: &Raft<TypeConfig>) -> BTreeSet<NodeId> {
    raft.metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect()
}

fn is_member(raft: &Raft<TypeConfig>, id: NodeId) -> bool {
    raft.metrics()
        .borrow()
        .membership_config
        .membership()
        .get_node(&id)
        .is_some()
}

/// openraft's refusal as ours.
fn refusal(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> ChangeError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ChangeError::NotLeader {
            leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
        },
        other => ChangeError::Refused(other.to_string()),
    }
}

/// Runs `change` bounded by `timeout`, its refusal and its timeout as [`ChangeError`].
async fn bounded<T>(
    what: &str,
    timeout: Duration,
    change: impl std::future::Future<
        Output = Result<T, RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>>,
    >,
) -> Result<T, ChangeError> {
    match tokio::time::timeout(timeout, change).await {
        Ok(r) => r.map_err(refusal),
        Err(_) => Err(ChangeError::Refused(format!(
            "{what} did not complete within {timeout:?}"
        ))),
    }
}

/// On the leader: makes node `id` (member address `addr`) a voter — a learner first, until
/// it has caught up — unless it is one already. The same steps as `entrepot cluster add`.
pub async fn add_voter(
    raft: &Raft<TypeConfig>,
    id: NodeId,
    addr: &str,
) -> Result<String, ChangeError> {
    let _one_change = CHANGE_LOCK.lock().await;
    if !leads(raft) {
        return Err(not_leader(raft));
    }
    if voters(raft).contains(&id) {
        return Ok(format!("node {id} is already a voter"));
    }
    tracing::info!(
        node = id,
        addr,
        "adding a node: learner first, until it has caught up"
    );
    bounded(
        "the new learner's catch-up (CATCH_UP_TIMEOUT)",
        CATCH_UP_TIMEOUT,
        raft.add_learner(id, BasicNode::new(addr), true),
    )
    .await?;
    let mut voters = voters(raft);
    voters.insert(id);
    bounded(
        "making the learner a voter (VOTER_CHANGE_TIMEOUT)",
        VOTER_CHANGE_TIMEOUT,
        raft.change_membership(voters, false),
    )
    .await?;
    tracing::info!(node = id, "node added as a voter");
    Ok(format!("node {id} added as a voter"))
}

/// On the leader: node `id` leaves — demoted to learner if it votes, then removed. The
/// last voter is refused. When `id` is this leader it removes itself too, and steps down
/// once that commits (openraft 0.9 keeps a leader leading until it is no member at all).
pub async fn remove(raft: &Raft<TypeConfig>, id: NodeId) -> Result<String, ChangeError> {
    let _one_change = CHANGE_LOCK.lock().await;
    if !leads(raft) {
        return Err(not_leader(raft));
    }
    if !is_member(raft, id) {
        return Ok(format!("node {id} is not a member"));
    }
    let mut voters = voters(raft);
    if voters.remove(&id) {
        if voters.is_empty() {
            return Err(ChangeError::LastVoter { node: id });
        }
        tracing::info!(node = id, "demoting a voter to learner before it leaves");
        let demoted = bounded(
            "demoting the voter (VOTER_CHANGE_TIMEOUT)",
            VOTER_CHANGE_TIMEOUT,
            raft.change_membership(voters, true),
        )
        .await?;
        // The node must hold its demotion before it is removed: removed first, it hears of
        // neither (no leader replicates to it any more), still counts itself a voter and
        // campaigns on with rising terms — after a restart too. A lagging node (catching
        // up by snapshots under load) can be that far behind.
        if id != raft.metrics().borrow().id {
            await_replicated(raft, id, demoted.log_id.index).await;
        }
    }
    // openraft 0.9 lets a learner lead: a leader demoted above leads on and removes
    // itself next, then steps down (it is no longer in the membership it committed).
    if !leads(raft) {
        return Err(not_leader(raft));
    }
    bounded(
        "removing the node (VOTER_CHANGE_TIMEOUT)",
        VOTER_CHANGE_TIMEOUT,
        raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false),
    )
    .await?;
    tracing::info!(node = id, "node removed from the membership");
    Ok(format!("node {id} left the membership"))
}

/// Waits, at most [`DEMOTION_SEEN_TIMEOUT`], until the leader's replication to `id` has
/// matched `index`; logs when it gives up.
async fn await_replicated(raft: &Raft<TypeConfig>, id: NodeId, index: u64) {
    let matched = |raft: &Raft<TypeConfig>| {
        let m = raft.metrics();
        let m = m.borrow();
        m.replication
            .as_ref()
            .and_then(|r| r.get(&id).copied().flatten())
            .map(|l| l.index)
    };
    let deadline = tokio::time::Instant::now() + DEMOTION_SEEN_TIMEOUT;
    loop {
        if matched(raft).is_some_and(|m| m >= index) {
            return;
        }
        if tokio::time::Instant::now() >= deadline || !leads(raft) {
            tracing::warn!(
                node = id,
                index,
                matched = ?matched(raft),
                timeout = ?DEMOTION_SEEN_TIMEOUT,
                "the leaving node has not received its demotion: removing it anyway (DEMOTION_SEEN_TIMEOUT)"
            );
            return;
        }
        tokio::time::sleep(DEMOTION_SEEN_POLL).await;
    }
}

/// What the joiner needs: who it is, where it is reached, whom to ask first.
#[derive(Debug, Clone)]
pub struct JoinConfig {
    pub id: NodeId,
    /// This node's member address `host:peer_port/amqp_port[/amqps_port]`.
    pub addr: String,
    /// The initial members (this node is skipped if among them).
    pub seeds: Vec<Peer>,
    /// How to reach them (the same TLS and secret as Raft traffic).
    pub network: TcpNetwork,
}

/// Asks the cluster until a leader says this node is a voter (or `shutdown`); returns
/// whether it is. See the module docs.
pub async fn auto_join(
    raft: Raft<TypeConfig>,
    config: JoinConfig,
    mut shutdown: watch::Receiver<bool>,
) -> bool {
    let mut backoff = JOIN_BACKOFF_MIN;
    let mut progress = JoinProgress::default();
    loop {
        if *shutdown.borrow() {
            return false;
        }
        // Only a majority of the current voters can have elected it.
        if leads(&raft) {
            tracing::info!(
                node = config.id,
                "leading: already a voter, nothing to join"
            );
            return true;
        }
        for (target, addr) in join_candidates(&raft, &config, &progress.heard) {
            let request = MembershipRequest::Join {
                node: config.id,
                addr: config.addr.clone(),
            };
            let mut client = config.network.client(target, &addr);
            let reply = tokio::select! {
                r = client.membership(&request, MEMBERSHIP_RPC_TIMEOUT) => r,
                _ = shutdown.changed() => return false,
            };
            if progress.note(&config, target, reply) {
                return true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return false,
        }
        backoff = (backoff * 2).min(JOIN_BACKOFF_MAX);
    }
}

/// What the joiner learnt so far and what it has said.
#[derive(Default)]
struct JoinProgress {
    /// Leaders named by the nodes asked (at most [`JOIN_CANDIDATES_MAX`]).
    heard: BTreeMap<NodeId, String>,
    /// "joining the cluster" was logged.
    announced: bool,
    /// An authentication failure was logged.
    refused: bool,
}

impl JoinProgress {
    /// Takes in node `target`'s reply; true once this node is a voter.
    fn note(
        &mut self,
        config: &JoinConfig,
        target: NodeId,
        reply: Result<MembershipReply, PeerCallError>,
    ) -> bool {
        let id = config.id;
        match reply {
            Ok(MembershipReply::Done { detail }) if detail.contains("already") => {
                tracing::info!(
                    node = id,
                    leader = target,
                    "already a voter: nothing to join"
                );
                return true;
            }
            Ok(MembershipReply::Done { detail }) => {
                tracing::info!(node = id, leader = target, %detail, "joined the cluster as a voter");
                return true;
            }
            Ok(MembershipReply::NotLeader {
                leader: Some((leader, addr)),
            }) => {
                if leader != id && self.heard.len() < JOIN_CANDIDATES_MAX {
                    self.heard.insert(leader, addr);
                }
            }
            Ok(MembershipReply::NotLeader { leader: None } | MembershipReply::LastVoter { .. }) => {
            }
            Ok(MembershipReply::Refused { reason }) => {
                tracing::info!(node = id, asked = target, %reason, "join refused for now; retrying");
            }
            // A peer that refuses this node's credentials will not change its mind: said
            // once, loudly (a wrong secret or certificate is an operator's fix).
            Err(e @ (PeerCallError::Auth { .. } | PeerCallError::Tls { .. })) if !self.refused => {
                self.refused = true;
                tracing::warn!(node = id, asked = target, error = %e, "join refused: the peer port's authentication failed (cluster secret or TLS certificate)");
            }
            Err(e) => tracing::debug!(node = id, asked = target, error = %e, "join request failed"),
        }
        if !self.announced {
            self.announced = true;
            tracing::info!(node = id, addr = %config.addr, "joining the cluster");
        }
        false
    }
}

/// Whom one joiner round asks, best first: the leader heard of, the members this node's
/// own Raft state names, the seeds; never itself; at most [`JOIN_CANDIDATES_MAX`].
fn join_candidates(
    raft: &Raft<TypeConfig>,
    config: &JoinConfig,
    heard: &BTreeMap<NodeId, String>,
) -> Vec<(NodeId, String)> {
    let mut out: Vec<(NodeId, String)> = Vec::new();
    let mut push = |id: NodeId, addr: String| {
        if id != config.id && out.len() < JOIN_CANDIDATES_MAX && !out.iter().any(|(i, _)| *i == id)
        {
            out.push((id, addr));
        }
    };
    if let Some((id, addr)) = known_leader(raft) {
        push(id, addr);
    }
    for (id, addr) in heard {
        push(*id, addr.clone());
    }
    let members: Vec<(NodeId, String)> = raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .nodes()
        .map(|(id, n)| (*id, n.addr.clone()))
        .collect();
    for (id, addr) in members {
        push(id, addr);
    }
    for p in &config.seeds {
        push(p.id, p.addr.clone());
    }
    out
}

/// A leaving node's side of a drain: until `deadline`, asks the leader to take node `id`
/// (this node) out of the membership — itself when it leads, which demotes it and makes
/// it step down first. Returns the steps taken, one line each.
pub async fn leave(
    raft: &Raft<TypeConfig>,
    network: &TcpNetwork,
    deadline: Instant,
) -> Result<Vec<String>, ChangeError> {
    let id = raft.metrics().borrow().id;
    let mut steps = Vec::new();
    let mut last = ChangeError::NotLeader { leader: None };
    let started = Instant::now();
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        if leads(raft) {
            match remove(raft, id).await {
                Ok(detail) => {
                    steps.push(format!(
                        "{detail}; it led: it steps down and the remaining voters elect a leader"
                    ));
                    return Ok(steps);
                }
                Err(e @ ChangeError::LastVoter { .. }) => return Err(e),
                Err(e) => last = e,
            }
        } else if let Some((leader, addr)) = known_leader(raft).filter(|(l, _)| *l != id) {
            let mut client = network.client(leader, &addr);
            let request = MembershipRequest::Leave { node: id };
            match client
                .membership(&request, left.min(MEMBERSHIP_RPC_TIMEOUT))
                .await
            {
                Ok(MembershipReply::Done { detail }) => {
                    steps.push(format!("{detail} (leader: node {leader})"));
                    return Ok(steps);
                }
                Ok(MembershipReply::LastVoter { node }) => {
                    return Err(ChangeError::LastVoter { node })
                }
                Ok(MembershipReply::Refused { reason }) => last = ChangeError::Refused(reason),
                Ok(MembershipReply::NotLeader { leader }) => {
                    last = ChangeError::NotLeader { leader }
                }
                Err(e) => last = ChangeError::Refused(format!("asking node {leader}: {e}")),
            }
        } else if !voters(raft).contains(&id) && started.elapsed() >= LEAVE_NO_LEADER_GRACE {
            steps.push(format!(
                "node {id} is no voter and hears from no leader: nothing to leave"
            ));
            return Ok(steps);
        }
        tokio::time::sleep(LEAVE_RETRY.min(deadline.saturating_duration_since(Instant::now())))
            .await;
    }
    Err(last)
}
