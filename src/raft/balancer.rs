//! The mover (issue 12 point 3, issue 13): carries out the metadata group's placement on
//! the Raft memberships of existing groups after members join or leave. One
//! [`Balancer`] per node, started beside the [`super::group_opener::GroupOpener`] with
//! the same host and the same replica of group 0's machine.
//!
//! What it owns, on its node — the groups this node **leads** (only a leader can change
//! a membership; every node runs a balancer, so whoever leads a group moves it, and a
//! move cut short by a leader change is taken over by the next leader):
//! * **A move**, for a group whose voters or learners differ from its target: (1)
//!   learners no longer wanted are removed; (2) every new replica is added as a
//!   *learner* (`GroupHandle::start_learner`): the opener on its node has opened the
//!   group there, pristine, and never bootstraps it (it is not a founder: the opener
//!   bootstraps only with the founders' set), so the replica receives the log — or a
//!   snapshot — from this leader; (3) the move waits until every new replica's matched
//!   index reaches the leader's last log index as it stood when the learners were in
//!   ([`BalancerConfig::catch_up_timeout`] at most, then the move fails and is retried);
//!   (4) `GroupHandle::replace_voters` makes the placed replicas the voters (openraft's
//!   joint consensus: the old and the new majority both commit the change), a voter that
//!   leaves staying a learner so that it receives the membership leaving it out and hears
//!   it committed; (5) once it matched that entry, and [`LEARNER_LINGER`] later, it is
//!   removed from the group. Its node's opener removes its copy as soon as it sees a
//!   *committed* membership without it as a voter (never earlier: a change that could
//!   still be undone may need its vote and log).
//!   A leader whose own node is not in the target removes itself the same way: openraft
//!   0.9 keeps it leading until the final membership commits, then it steps down and the
//!   remaining voters elect a leader once their lease runs out (~ one election timeout:
//!   0.9 has no leadership transfer; the new leader is whichever wins, and the opener of
//!   the preferred leader campaigns for it afterwards).
//! * **Targets.** An address group's voters are its placed replicas
//!   (`GroupEntry::replicas`), with no learner. Group 0's voters follow the members: the
//!   voters that are still members, topped up with the lowest-id members up to
//!   [`MAX_META_VOTERS`] (cut to it from the highest ids), every other member a learner —
//!   so every member's opener receives the metadata, and a member leaving is removed
//!   from group 0 too.
//! * **A few at a time.** At most [`MAX_MOVES_IN_FLIGHT`] moves run at once on a node,
//!   so the leader's other groups keep their traffic (a move costs one learner's catch-up
//!   and two membership entries); a failed move is retried after a backoff doubling
//!   from [`RETRY_BACKOFF_MIN`] to [`RETRY_BACKOFF_MAX`].
//! * **When it looks** (`rounds.rs`): on a change of the metadata or of a group here
//!   (opened, closed, its leadership or membership), when a move ends or a failed one's
//!   retry is due, and otherwise every [`BalancerConfig::safety_net`]; rounds at least
//!   [`BalancerConfig::round`] apart. A round reads the metadata as a shared version and
//!   asks a group's status only where this node leads it.
//! * **Progress**: [`BalancerStats`] (moves started, done, failed, in flight) and
//!   `tracing` lines per move.
//!
//! Invariants: a voter is added only once it is a learner that caught up (openraft also
//! refuses a voter that is not a learner); the target is read from the metadata applied
//! here, never computed locally; the balancer never bootstraps, opens or removes a
//! group on the host (the opener does).
//!
//! Does not: move leaderships (the metadata's preferred leaders and the opener's
//! campaigns do, best effort on openraft 0.9 — see `group_opener.rs`), hand a leadership
//! over before its node is removed (0.9 cannot: the leader steps down after the change),
//! or order moves across nodes (each leader moves its own groups; the metadata is the
//! plan).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use entrepot_cluster::placement::GroupId;
use entrepot_cluster::{GroupError, GroupHandle, GroupStatus, Host, NodeId, METADATA_GROUP};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::meta_machine::{MetaMachine, MetaState, METADATA_LEVEL_FORMED};
use super::rounds::Rounds;
use entrepot_cluster::host::handover::HandOverHandler;

/// Most membership changes one node carries out at once.
pub const MAX_MOVES_IN_FLIGHT: usize = 2;
/// Most voters of group 0; further members are its learners.
pub const MAX_META_VOTERS: usize = 5;
/// Default: the longest a new replica may take to catch up before its move fails.
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a move looks at a learner's matched index while it catches up.
pub const CATCH_UP_POLL: Duration = Duration::from_millis(50);
/// First wait before a failed group's move is tried again.
pub const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest wait between two tries of one group's move.
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long a voter that left stays a learner after it matched the membership leaving
/// it out: several heartbeats, so it hears that membership committed before the leader
/// stops sending to it (its opener removes its copy only then).
pub const LEARNER_LINGER: Duration = Duration::from_secs(1);
/// Longest a move waits for a voter that left to match the membership leaving it out
/// before it is removed anyway.
pub const LEARNER_WAIT_MAX: Duration = Duration::from_secs(5);
/// Default: the least time between two rounds of the balancer (it looks on a change of
/// the metadata or of a group, when a move ends or a retry is due: `rounds.rs`).
pub const BALANCER_ROUND: Duration = super::rounds::ROUND_GAP_MIN;

const _: () = assert!(MAX_MOVES_IN_FLIGHT >= 1);
const _: () = assert!(MAX_META_VOTERS % 2 == 1);
const _: () = assert!(RETRY_BACKOFF_MIN.as_millis() <= RETRY_BACKOFF_MAX.as_millis());

/// How a balancer runs.
#[derive(Debug, Clone)]
pub struct BalancerConfig {
    /// The least time between two rounds ([`super::rounds::ROUND_GAP_MIN`]).
    pub round: Duration,
    /// Look again at the latest this long after the last round when nothing changed
    /// ([`super::rounds::SAFETY_NET`]).
    pub safety_net: Duration,
    /// See [`CATCH_UP_TIMEOUT`].
    pub catch_up_timeout: Duration,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        BalancerConfig {
            round: BALANCER_ROUND,
            safety_net: super::rounds::SAFETY_NET,
            catch_up_timeout: CATCH_UP_TIMEOUT,
        }
    }
}

/// What the balancer did, for operators and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalancerStats {
    /// Moves begun (a retry counts again).
    pub started: u64,
    /// Moves that reached their target.
    pub done: u64,
    /// Moves that failed (retried after a backoff).
    pub failed: u64,
    /// Moves running now.
    pub in_flight: u64,
}

/// Why a move failed (it is retried).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MoveError {
    #[error(transparent)]
    Group(#[from] GroupError),
    #[error("node {node} is not a member: no address to add it with")]
    UnknownMember { node: NodeId },
    #[error("node {node} did not catch up within {after:?} (matched {matched:?} of {goal})")]
    CatchUp {
        node: NodeId,
        matched: Option<u64>,
        goal: u64,
        after: Duration,
    },
}

/// Who a group should have.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    voters: BTreeSet<NodeId>,
    learners: BTreeSet<NodeId>,
}

#[derive(Default)]
struct Shared {
    started: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
    in_flight: AtomicU64,
    /// Hands a group over before this leader would remove itself ([`Balancer::hand_over_with`]).
    hand_over: std::sync::OnceLock<Arc<dyn HandOverHandler>>,
}

/// The node's balancer (see the module docs). Groups stay as they are when it stops.
pub struct Balancer {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Balancer {
    /// Starts carrying out `meta`'s placement (this node's replica of group 0) on the
    /// groups `host` leads.
    pub fn start(host: Host, meta: MetaMachine, config: BalancerConfig) -> Balancer {
        let shared = Arc::new(Shared::default());
        let (stop, stopped) = watch::channel(false);
        let mover = Mover {
            host,
            meta,
            config,
            shared: Arc::clone(&shared),
            running: JoinSet::new(),
            busy: BTreeSet::new(),
            retry: HashMap::new(),
            seen_members: BTreeSet::new(),
        };
        let task = tokio::spawn(mover.run(stopped));
        Balancer { shared, stop, task }
    }

    pub fn stats(&self) -> BalancerStats {
        self.progress().stats()
    }

    /// A reader of [`Self::stats`] that outlives this handle's borrow (the HTTP
    /// endpoint keeps one while the node owns the balancer, to stop it).
    pub fn progress(&self) -> BalancerProgress {
        BalancerProgress(Arc::clone(&self.shared))
    }

    /// From now on, a leader whose node leaves a group's voters hands the group over with
    /// `handler` (to the placement's preferred leader when it is a voter already, else to
    /// another voter that stays) and leaves the move to the next leader, instead of
    /// removing itself and leaving the others to an election. Set once.
    pub fn hand_over_with(&self, handler: Arc<dyn HandOverHandler>) {
        let _ = self.shared.hand_over.set(handler);
    }

    /// Stops: running moves are abandoned where they are (the next leader, or this node
    /// started again, carries them on from the membership they left).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Reads a running [`Balancer`]'s counters.
#[derive(Clone)]
pub struct BalancerProgress(Arc<Shared>);

impl BalancerProgress {
    pub fn stats(&self) -> BalancerStats {
        let s = &self.0;
        BalancerStats {
            started: s.started.load(Ordering::Relaxed),
            done: s.done.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            in_flight: s.in_flight.load(Ordering::Relaxed),
        }
    }
}

/// When a failed group may be tried again, and the wait after the next failure.
struct Retry {
    at: Instant,
    backoff: Duration,
}

struct Mover {
    host: Host,
    meta: MetaMachine,
    config: BalancerConfig,
    shared: Arc<Shared>,
    running: JoinSet<(GroupId, Result<(), MoveError>)>,
    busy: BTreeSet<GroupId>,
    retry: HashMap<GroupId, Retry>,
    /// Every member this balancer has seen: a voter of group 0 that was one and is no
    /// more has left (see [`meta_target`]).
    seen_members: BTreeSet<NodeId>,
}

impl Mover {
    async fn run(mut self, mut stopped: watch::Receiver<bool>) {
        let mut rounds = Rounds::new(
            &self.meta,
            &self.host,
            self.config.safety_net,
            self.config.round,
        );
        loop {
            rounds.begin();
            let due = self.round();
            tokio::select! {
                _ = rounds.wait(due) => {}
                Some(joined) = self.running.join_next(), if !self.running.is_empty() => {
                    if let Ok((group, result)) = joined {
                        self.finished(group, result);
                    }
                }
                _ = stopped.changed() => break,
            }
            if *stopped.borrow() {
                break;
            }
        }
        self.running.abort_all();
        self.shared.in_flight.store(0, Ordering::Relaxed);
    }

    /// Starts the moves due, up to [`MAX_MOVES_IN_FLIGHT`]; answers when the next retry
    /// of a failed move is due (nothing else here waits on a timer: a move ending wakes
    /// the loop, and so does any change of the metadata or of a group).
    fn round(&mut self) -> Option<Instant> {
        let state = self.meta.state();
        let now = Instant::now();
        let node = self.host.node();
        self.seen_members.extend(state.members().keys().copied());
        let groups = std::iter::once(METADATA_GROUP).chain(state.groups().keys().copied());
        for group in groups {
            if self.busy.len() >= MAX_MOVES_IN_FLIGHT {
                break;
            }
            if self.busy.contains(&group) || self.retry.get(&group).is_some_and(|r| r.at > now) {
                continue;
            }
            let Some(handle) = self.host.group(group) else {
                continue;
            };
            if !handle.leadership().borrow().leads {
                continue;
            }
            let status = handle.status();
            if !status.voters.contains(&node) {
                // A leader that removed itself, stepping down: the next one carries on.
                continue;
            }
            let Some(target) = target(&state, group, &status.voters, &self.seen_members) else {
                continue;
            };
            if status.voters == target.voters && status.learners == target.learners {
                self.retry.remove(&group);
                continue;
            }
            self.start_move(&state, handle, &status, target);
        }
        self.retry
            .values()
            .map(|r| r.at)
            .filter(|at| *at > now)
            .min()
    }

    fn start_move(
        &mut self,
        state: &MetaState,
        handle: GroupHandle,
        status: &GroupStatus,
        target: Target,
    ) {
        let group = handle.group();
        let addrs: BTreeMap<NodeId, String> = state
            .members()
            .iter()
            .map(|(n, m)| (*n, m.peer.clone()))
            .collect();
        tracing::info!(
            group,
            from = ?status.voters,
            to = ?target.voters,
            learners = ?target.learners,
            "balancer: moving the group's replicas"
        );
        self.busy.insert(group);
        self.shared.started.fetch_add(1, Ordering::Relaxed);
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        let timeout = self.config.catch_up_timeout;
        let node = self.host.node();
        let hand_over = self.shared.hand_over.get().cloned();
        let preferred = state.groups().get(&group).map(|e| e.replicas.leader);
        self.running.spawn(async move {
            if let Some(h) = hand_over.filter(|_| !target.voters.contains(&node)) {
                if hand_over_first(&handle, node, &target, preferred, h.as_ref()).await {
                    return (group, Ok(()));
                }
            }
            let result = carry_out(&handle, &target, &addrs, timeout, node).await;
            (group, result)
        });
    }

    fn finished(&mut self, group: GroupId, result: Result<(), MoveError>) {
        self.busy.remove(&group);
        self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(()) => {
                self.shared.done.fetch_add(1, Ordering::Relaxed);
                self.retry.remove(&group);
                tracing::info!(group, "balancer: move done");
            }
            Err(e) => {
                self.shared.failed.fetch_add(1, Ordering::Relaxed);
                let backoff = self.retry.get(&group).map_or(RETRY_BACKOFF_MIN, |r| {
                    (r.backoff * 2).min(RETRY_BACKOFF_MAX)
                });
                self.retry.insert(
                    group,
                    Retry {
                        at: Instant::now() + backoff,
                        backoff,
                    },
                );
                tracing::warn!(group, error = %e, ?backoff, "balancer: move failed, retried later");
            }
        }
    }
}

/// What `group`'s membership should be (module docs, "Targets"), its voters now being
/// `voters`; `seen` are the members this balancer has seen. `None` for a group the
/// metadata does not hold, or (at metadata level 2) does not yet know formed.
fn target(
    state: &MetaState,
    group: GroupId,
    voters: &BTreeSet<NodeId>,
    seen: &BTreeSet<NodeId>,
) -> Option<Target> {
    if group == METADATA_GROUP {
        let members: BTreeSet<NodeId> = state.members().keys().copied().collect();
        return Some(meta_target(&members, voters, seen));
    }
    let entry = state.groups().get(&group)?;
    if !entry.formed && state.level() >= METADATA_LEVEL_FORMED {
        // Not yet marked formed (its leader's opener marks it within a round): a move
        // before the mark could bring a replica back onto a founder that, restarted,
        // would see a group to bootstrap (`group_opener.rs`, "Forming"). Below metadata
        // level 2 nothing is ever marked: groups move unmarked, as before session 19.
        return None;
    }
    Some(Target {
        voters: entry.replicas.nodes.clone(),
        learners: BTreeSet::new(),
    })
}

/// Group 0's target: its voters that are members — or that this balancer never saw as
/// members (group 0 is formed before its founders are added as members: a voter not yet
/// a member is not one that left) —, topped up with the lowest-id members (or cut from
/// the highest ids) to `min(members, MAX_META_VOTERS)`; the other members are learners.
fn meta_target(
    members: &BTreeSet<NodeId>,
    voters: &BTreeSet<NodeId>,
    seen: &BTreeSet<NodeId>,
) -> Target {
    let kept: BTreeSet<NodeId> = voters
        .iter()
        .filter(|v| members.contains(v) || !seen.contains(v))
        .copied()
        .collect();
    let want = members
        .len()
        .min(MAX_META_VOTERS)
        .max(kept.len().min(MAX_META_VOTERS));
    let mut chosen = kept;
    for m in members {
        if chosen.len() >= want {
            break;
        }
        chosen.insert(*m);
    }
    while chosen.len() > want {
        // Cut a non-member first, then the highest id.
        let cut = chosen
            .iter()
            .rev()
            .find(|n| !members.contains(n))
            .or_else(|| chosen.last())
            .copied();
        let Some(cut) = cut else { break };
        chosen.remove(&cut);
    }
    if chosen.is_empty() {
        chosen = voters.clone();
    }
    let learners = members.difference(&chosen).copied().collect();
    Target {
        voters: chosen,
        learners,
    }
}

/// A leader leaving the group's voters hands it over first: to `preferred` when it is a
/// voter that stays, else to the voter that stays and matched most. True when it did
/// (the next leader carries the move out).
async fn hand_over_first(
    handle: &GroupHandle,
    me: NodeId,
    target: &Target,
    preferred: Option<NodeId>,
    h: &dyn HandOverHandler,
) -> bool {
    let status = handle.status();
    let staying: BTreeSet<NodeId> = status
        .voters
        .intersection(&target.voters)
        .copied()
        .collect();
    let Some(to) = super::handover::choose_target(me, &staying, preferred, &handle.matched())
    else {
        return false;
    };
    match h.hand_over(handle.group(), to).await {
        Ok(()) => {
            tracing::info!(
                group = handle.group(),
                to,
                "balancer: handed the group over before leaving its voters"
            );
            true
        }
        Err(why) => {
            tracing::info!(group = handle.group(), %why, "balancer: no hand-over, removing itself");
            false
        }
    }
}

/// One group's move, on its leader (module docs, "A move").
async fn carry_out(
    handle: &GroupHandle,
    target: &Target,
    addrs: &BTreeMap<NodeId, String>,
    catch_up_timeout: Duration,
    self_node: NodeId,
) -> Result<(), MoveError> {
    let status = handle.status();
    let wanted: BTreeSet<NodeId> = target.voters.union(&target.learners).copied().collect();
    let present: BTreeSet<NodeId> = status.voters.union(&status.learners).copied().collect();
    for node in wanted.difference(&present) {
        let addr = addrs
            .get(node)
            .ok_or(MoveError::UnknownMember { node: *node })?;
        handle.start_learner(*node, addr).await?;
    }
    let new_voters: BTreeSet<NodeId> = target.voters.difference(&status.voters).copied().collect();
    if !new_voters.is_empty() {
        let goal = handle.status().last_log.unwrap_or(0);
        catch_up(handle, &new_voters, goal, catch_up_timeout).await?;
    }
    if status.voters != target.voters {
        handle.replace_voters(target.voters.clone()).await?;
    }
    if !target.voters.contains(&self_node) || !handle.leadership().borrow().leads {
        // It removed itself and steps down: the next leader drops the learners left.
        return Ok(());
    }
    let status = handle.status();
    let stray: BTreeSet<NodeId> = status.learners.difference(&wanted).copied().collect();
    if stray.is_empty() {
        return Ok(());
    }
    // A voter that left stays a learner until it holds the membership leaving it out
    // and has heard it committed (its opener removes its copy then): matched that entry,
    // then a few heartbeats more. A node no longer a member is not waited for.
    let goal = status.membership_index.unwrap_or(0);
    let members: BTreeSet<NodeId> = stray
        .iter()
        .filter(|n| addrs.contains_key(n))
        .copied()
        .collect();
    // Not waited for beyond LEARNER_WAIT_MAX: a learner whose copy is gone already (it
    // saw the commit under the previous leader) never matches here.
    if !members.is_empty() {
        if let Err(e) = learners_heard(handle, &members, goal).await {
            tracing::info!(group = handle.group(), error = %e, "balancer: removing learners that did not match");
        }
    }
    tokio::time::sleep(LEARNER_LINGER).await;
    handle.remove_learners(stray).await?;
    Ok(())
}

/// Waits until every learner of `nodes` matched `goal`, at most [`LEARNER_WAIT_MAX`]; one
/// that matched nothing after [`LEARNER_LINGER`] is not answering (its copy is gone
/// already — it saw the commit under the previous leader — or its node is down) and is
/// not waited for.
async fn learners_heard(
    handle: &GroupHandle,
    nodes: &BTreeSet<NodeId>,
    goal: u64,
) -> Result<(), MoveError> {
    tokio::time::sleep(LEARNER_LINGER).await;
    let silent: BTreeSet<NodeId> = {
        let matched = handle.matched();
        nodes
            .iter()
            .filter(|n| matched.get(n).copied().flatten().is_none())
            .copied()
            .collect()
    };
    let answering: BTreeSet<NodeId> = nodes.difference(&silent).copied().collect();
    if answering.is_empty() {
        return Ok(());
    }
    catch_up(handle, &answering, goal, LEARNER_WAIT_MAX).await
}

/// Waits until every node of `nodes` matched the leader's log up to `goal`, at most
/// `timeout`.
async fn catch_up(
    handle: &GroupHandle,
    nodes: &BTreeSet<NodeId>,
    goal: u64,
    timeout: Duration,
) -> Result<(), MoveError> {
    let deadline = Instant::now() + timeout;
    loop {
        let matched = handle.matched();
        let behind = nodes
            .iter()
            .find(|n| matched.get(n).copied().flatten().is_none_or(|m| m < goal));
        let Some(node) = behind else {
            return Ok(());
        };
        if !handle.leadership().borrow().leads {
            return Err(GroupError::NotLeader {
                group: handle.group(),
                leader: handle.leadership().borrow().leader,
                leader_addr: None,
            }
            .into());
        }
        if Instant::now() >= deadline {
            return Err(MoveError::CatchUp {
                node: *node,
                matched: matched.get(node).copied().flatten(),
                goal,
                after: timeout,
            });
        }
        tokio::time::sleep(CATCH_UP_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn group_zero_voters_follow_the_members_up_to_the_bound() {
        let all = set(&[0, 1, 2, 3, 4, 5, 6, 7]);
        let t = meta_target(&set(&[0, 1, 2, 3]), &set(&[0, 1, 2]), &all);
        assert_eq!(t.voters, set(&[0, 1, 2, 3]));
        assert!(t.learners.is_empty());
        let members = set(&[0, 1, 3, 4, 5, 6, 7]);
        let t = meta_target(&members, &set(&[0, 1, 2]), &all);
        // 2 left; kept 0 and 1, topped up with the lowest ids.
        assert_eq!(t.voters, set(&[0, 1, 3, 4, 5]));
        assert_eq!(t.learners, set(&[6, 7]));
        let t = meta_target(&members, &set(&[7, 6, 5, 4, 3, 1]), &all);
        assert_eq!(t.voters, set(&[1, 3, 4, 5, 6]));
        assert_eq!(t.learners, set(&[0, 7]));
    }

    #[test]
    fn a_founding_voter_not_yet_a_member_is_kept() {
        // Group 0 formed on 0, 1, 2; only 0 added as a member so far.
        let t = meta_target(&set(&[0]), &set(&[0, 1, 2]), &set(&[0]));
        assert_eq!(t.voters, set(&[0, 1, 2]));
        // 2 was seen as a member and left: it goes.
        let t = meta_target(&set(&[0, 1]), &set(&[0, 1, 2]), &set(&[0, 1, 2]));
        assert_eq!(t.voters, set(&[0, 1]));
    }
}
