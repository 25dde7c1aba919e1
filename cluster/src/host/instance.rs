//! A host group's Raft instance across hibernation (issue 12 step 5, through the host).
//!
//! A group opened on a [`super::Host`] keeps its [`super::GroupHandle`], its state
//! machine (the adapter, `machine.rs`), its batcher and its leadership watch for as long
//! as it is open; its openraft instance comes and goes. The registry (`groups.rs`) holds
//! the current one, or `Stopped` when the group hibernated (`hibernate.rs`) or was
//! recovered stopped at the host's start. This module owns:
//! * [`Instance`]: finding the running instance, waking a stopped one (through the
//!   registry, whose starter is the host), and holding it for a write (a
//!   [`WriteHold`]: a stop is refused while one is held, so an entry handed to openraft
//!   never meets an instance shut down under it).
//! * [`follow_metrics`]: one task per *instance* that publishes its [`Leadership`] (not
//!   openraft's initial metrics of a woken instance, whose term is below the one shown) and
//!   what a stopped group still reports (members, snapshot), purges its log, and, when
//!   the instance ends because the group stopped, publishes the leadership the group
//!   stopped with — so the watch stays truthful across stop and wake (a stopped group
//!   knows its leader and term; `leads` stays true where it was led: a write there wakes
//!   it as leader).
//! * [`recovered_stopped`] and [`last_members`]: what a group recovered stopped at a
//!   restart knows from the node log (its vote, its last log id, its membership).
//!
//! Invariants: a write to a group stopped here and led by another node is refused
//! `NotLeader` without waking it (waking it would only start an election timer there);
//! a write to a group stopped here and led here, or with no known leader, wakes it (the
//! latter then waits, at most `PROPOSE_LEADER_WAIT`, for an election); every
//! wake is bounded by the registry's `WAKE_TIMEOUT`, and a write tries at most
//! [`PROPOSE_WAKE_ATTEMPTS`] wakes. Only the latest instance of a group publishes its
//! leadership (a generation number), so a late metrics update of a stopped instance never
//! overwrites its successor's.
//!
//! Does not: decide when a group stops (`hibernate.rs`), or keep a stopped group's
//! machine out of memory — the machine stays as it was (an idle queue's index is small);
//! only openraft's instance, tasks and timers go.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use openraft::{EntryPayload, Membership, Raft, ServerState};
use tokio::sync::watch;

use super::{GroupHandle, Leadership};
use crate::error::{ClusterError, GroupError, Result};
use crate::groups::{GroupRegistry, HostState, Stopped, WriteHold};
use crate::hibernate::{PROPOSE_LEADER_WAIT, PROPOSE_WAKE_ATTEMPTS};
use crate::node_log::NodeLog;
use crate::placement::GroupId;
use crate::types::{NodeId, TypeConfig};

/// Entries read at a time when looking back through a recovered group's log for its last
/// membership.
const MEMBERSHIP_SCAN_CHUNK: u64 = 256;

/// Starts one new instance of a group over its kept adapter (the registry's starter calls
/// it through the host).
pub(crate) type StartFn =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<Raft<TypeConfig>>> + Send>> + Send + Sync>;

/// The way to a group's current instance. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Instance {
    pub(crate) group: GroupId,
    pub(crate) node: NodeId,
    pub(crate) registry: GroupRegistry,
}

impl Instance {
    /// The running instance, if any.
    pub(crate) fn current(&self) -> Option<Raft<TypeConfig>> {
        self.registry.raft(self.group)
    }

    /// The running instance, woken first if the group is stopped here: a group this node
    /// led comes back as leader (openraft restores its committed vote), and is asked to
    /// campaign in case it does not; a group stopped with no known leader (opened after a
    /// restart that interrupted an election) is given up to [`PROPOSE_LEADER_WAIT`] to
    /// elect one, so the write that woke it goes to a leader rather than being refused
    /// `NotLeader` with none named.
    pub(crate) async fn running(&self) -> Result<Raft<TypeConfig>, GroupError> {
        if let Some(raft) = self.current() {
            return Ok(raft);
        }
        let before = self.registry.state(self.group);
        let (hosted, started) = self
            .registry
            .wake_hosted(self.group)
            .await
            .map_err(|e| self.stopped(e))?;
        let led_here =
            matches!(before, Some(HostState::Stopped(st)) if st.leader == Some(self.node));
        if started && led_here {
            hosted
                .raft
                .trigger()
                .elect()
                .await
                .map_err(|e| self.stopped(e))?;
        }
        let leaderless = matches!(before, Some(HostState::Stopped(st)) if st.leader.is_none());
        if started && leaderless {
            // Bounded; without a leader by then, the write is refused as it would be.
            let _ = hosted
                .raft
                .wait(Some(PROPOSE_LEADER_WAIT))
                .metrics(|m| m.current_leader.is_some(), "a leader after the wake")
                .await;
        }
        Ok(hosted.raft)
    }

    /// The running instance held for one write (woken if stopped here and not led
    /// elsewhere); `leader_addr` names a leader's member address for `NotLeader`.
    pub(crate) async fn hold(
        &self,
        leader_addr: impl Fn(NodeId) -> Option<String>,
    ) -> Result<(Raft<TypeConfig>, WriteHold), GroupError> {
        for _ in 0..PROPOSE_WAKE_ATTEMPTS {
            if let Some(HostState::Stopped(st)) = self.registry.state(self.group) {
                if let Some(leader) = st.leader.filter(|l| *l != self.node) {
                    return Err(GroupError::NotLeader {
                        group: self.group,
                        leader: Some(leader),
                        leader_addr: leader_addr(leader),
                    });
                }
            }
            if let Some(held) = self.registry.begin_write(self.group) {
                return Ok(held);
            }
            self.running().await?;
        }
        Err(self.stopped(format!(
            "stopped again after each of {PROPOSE_WAKE_ATTEMPTS} wakes (PROPOSE_WAKE_ATTEMPTS)"
        )))
    }

    fn stopped(&self, e: impl std::fmt::Display) -> GroupError {
        GroupError::Stopped {
            group: self.group,
            reason: e.to_string(),
        }
    }
}

/// The leadership a group stopped with, as its watch shows it while stopped.
pub(crate) fn stopped_leadership(node: NodeId, st: &Stopped) -> Leadership {
    Leadership {
        leader: st.leader,
        term: st.term,
        leads: st.leader == Some(node),
    }
}

/// What a group recovered from the node log stops with: its vote's leader when that vote
/// is committed (a leader was elected with it), its term, its last log id. `None` when the
/// node log holds no entry of the group (a new group: it is started, for its bootstrap).
pub(crate) fn recovered_stopped(log: &NodeLog, group: GroupId) -> Result<Option<Stopped>> {
    let Ok(state) = log.log_state(group) else {
        return Ok(None);
    };
    let Some(last_log_id) = state.last_log_id else {
        return Ok(None);
    };
    let vote = log.vote(group)?;
    let leader = vote.filter(|v| v.committed).map(|v| v.leader_id.node_id);
    Ok(Some(Stopped {
        leader,
        term: vote.map_or(0, |v| v.leader_id.term),
        last_log_id: Some(last_log_id),
    }))
}

/// The last membership in `group`'s log held by the node log (looked for from the end,
/// [`MEMBERSHIP_SCAN_CHUNK`] entries at a time), if any entry holds one.
pub(crate) fn last_members(
    log: &NodeLog,
    group: GroupId,
) -> Result<Option<Membership<NodeId, openraft::BasicNode>>> {
    let state = log.log_state(group)?;
    let first = state.last_purged_log_id.map_or(0, |p| p.index + 1);
    let mut end = state.last_log_id.map_or(0, |l| l.index + 1);
    while end > first {
        let start = end.saturating_sub(MEMBERSHIP_SCAN_CHUNK).max(first);
        let entries = log.entries(group, start..end)?;
        for e in entries.into_iter().rev() {
            if let EntryPayload::Membership(m) = e.payload {
                return Ok(Some(m));
            }
        }
        end = start;
    }
    Ok(None)
}

/// How a host's groups hibernate, for operators and tests (counters since the start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HibernationCounters {
    /// Groups registered here, running or stopped.
    pub hosted: usize,
    /// Groups with a running Raft instance.
    pub running: usize,
    /// Instances started by a wake (an RPC, a write, a lost leader).
    pub wakes: u64,
    /// Instances stopped by hibernation.
    pub stops: u64,
    /// Raft RPCs of any group this host's peer port received (not the liveness pings).
    pub group_rpcs_received: u64,
    /// Times a peer was found lost (0 without hibernation).
    pub peers_lost: u64,
    /// Hibernate handshakes a follower refused (0 without hibernation).
    pub refusals: u64,
    /// Peers pinged now: the other members of this host's groups (0 without
    /// hibernation).
    pub peers_watched: usize,
    /// The groups of lost peers queued and settling (`hibernate/lost_peer.rs`).
    pub lost_peer_wakes: crate::hibernate::WakeQueueStats,
    /// This node's own recent lag (its timers' lateness), what stretches the liveness
    /// timeout.
    pub lag: std::time::Duration,
    /// The liveness timeout as stretched now (zero without hibernation).
    pub liveness_timeout: std::time::Duration,
}

/// What a group's replica last knew of its membership and snapshot: what
/// [`GroupHandle::status`] reports while it is stopped.
#[derive(Debug, Default, Clone)]
pub(crate) struct Seen {
    pub(crate) voters: BTreeSet<NodeId>,
    /// Every member (voters and learners) and its member address.
    pub(crate) nodes: BTreeMap<NodeId, String>,
    pub(crate) snapshot: Option<u64>,
}

impl Seen {
    pub(crate) fn of(m: &Membership<NodeId, openraft::BasicNode>, snapshot: Option<u64>) -> Seen {
        Seen {
            voters: m.voter_ids().collect(),
            nodes: m.nodes().map(|(id, n)| (*id, n.addr.clone())).collect(),
            snapshot,
        }
    }
}

/// Follows one instance of a group (generation `generation`): publishes its
/// [`Leadership`] and members, purges its log up to the bound of its last snapshot when
/// that moves, and when the instance ends because the group stopped, publishes the
/// leadership it stopped with; a fatal error it stopped on becomes the host's
/// [`super::Host::failure`].
pub(crate) async fn follow_metrics(handle: GroupHandle, raft: Raft<TypeConfig>, generation: u64) {
    let shared = Arc::clone(&handle.shared);
    let mut metrics = raft.metrics();
    let mut purge_to = shared.purge_to.subscribe();
    let mut requested: Option<u64> = None;
    // The membership entry last seen applied here (its commit raised the host's change
    // counter once).
    let mut applied_membership: Option<u64> = None;
    loop {
        let snapshot = {
            let m = metrics.borrow_and_update();
            // `Fatal::Stopped` is openraft's word for a stop the host asked for (a
            // removal, a hibernation, the shutdown): not a failure.
            let fatal = m
                .running_state
                .as_ref()
                .err()
                .filter(|f| !matches!(f, openraft::error::Fatal::Stopped));
            if let Some(fatal) = fatal {
                let group = handle.group();
                tracing::error!(group, error = %fatal, "the group's Raft stopped on a fatal error");
                shared.failure.send_if_modified(|f| {
                    let first = f.is_none();
                    if first {
                        *f = Some(format!("group {group}: {fatal}"));
                    }
                    first
                });
            }
            if m.state == ServerState::Shutdown {
                break;
            }
            // A woken instance first reports openraft's initial metrics (term 0, no
            // leader, no members) before it has loaded its vote and log: terms only grow,
            // so a term below the one published is that, and is not published.
            let loaded = m.current_term >= handle.leadership.borrow().term;
            if loaded && shared.generation.load(Ordering::SeqCst) == generation {
                let now = Leadership {
                    leader: m.current_leader,
                    term: m.current_term,
                    leads: m.state == ServerState::Leader
                        && m.current_leader == Some(handle.instance.node),
                };
                if publish(&handle.leadership, now) {
                    super::note_change(&shared.changes);
                }
                handle.note_members(
                    m.membership_config.membership(),
                    m.snapshot.map(|s| s.index),
                );
                let membership = m.membership_config.log_id().map(|l| l.index);
                let applied = m.last_applied.map(|l| l.index);
                if membership.is_some() && membership <= applied && membership != applied_membership
                {
                    applied_membership = membership;
                    super::note_change(&shared.changes);
                }
            }
            m.snapshot.map(|s| s.index)
        };
        // openraft purges only what its snapshot covers, and hears of a snapshot after
        // the adapter persisted it: wait for both.
        let bound = (*purge_to.borrow_and_update()).min(snapshot);
        if let Some(to) = bound.filter(|&to| Some(to) > requested) {
            if raft.trigger().purge_log(to).await.is_err() {
                break;
            }
            requested = Some(to);
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { break },
            changed = purge_to.changed() => if changed.is_err() { break },
        }
    }
    if shared.generation.load(Ordering::SeqCst) != generation {
        return;
    }
    if let Some(HostState::Stopped(st)) = handle.instance.registry.state(shared.group) {
        let now = stopped_leadership(handle.instance.node, &st);
        if publish(&handle.leadership, now) {
            super::note_change(&shared.changes);
        }
    }
}

/// Sets the leadership watch to `now`; true when it changed.
pub(crate) fn publish(leadership: &watch::Sender<Leadership>, now: Leadership) -> bool {
    leadership.send_if_modified(|l| {
        let changed = *l != now;
        *l = now;
        changed
    })
}

/// Why a group could not be (re)started through the host.
pub(crate) fn start_error(group: GroupId, reason: &str) -> ClusterError {
    ClusterError::GroupStart {
        group,
        reason: reason.to_string(),
    }
}
