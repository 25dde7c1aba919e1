//! Hibernation of idle Raft groups (issue 12 step 5): an idle group stops its Raft
//! instances on every replica — no task, no timer, no heartbeat — and starts them again
//! when it is needed; liveness between nodes comes from one heartbeat per peer, not per
//! group. TiKV's hibernate regions, CockroachDB's quiesced ranges.
//!
//! [`Hibernation`] runs two tasks on a node:
//! * *Quiesce* (every `check_interval`): a group this node leads that has had no new log
//!   entry (write, membership change) and no [`Hibernation::touch`] for `quiesce_after`,
//!   whose every replica has matched the leader's last log id and which has applied it
//!   (so it is committed, and the followers learn it with the next heartbeat), on one
//!   membership config that is itself committed, is put to sleep: the leader sends
//!   `KIND_HIBERNATE {group, term, leader, last log id}` to every other member; each
//!   follower stops its instance only if it holds exactly that (term, leader, last log
//!   index, applied log id — [`serve_request`]), else it refuses with a typed
//!   [`HibernateRefusal`] and the group stays awake; when every member stopped, the
//!   leader stops its own instance (re-checking, under the group's transition lock, that
//!   nothing was appended meanwhile). A refused attempt waits `quiesce_after` again.
//! * *Liveness* (per peer, every `liveness_interval`): one `KIND_PING` on the node's
//!   shared connection to the peer. A peer that has answered nothing for
//!   `liveness_timeout` (the election timeout) — stretched by this node's own recent lag
//!   (`lag.rs`: a starved node does not blame its peers for its own lateness) — is lost:
//!   the groups stopped here whose last leader was that peer are woken in bounded
//!   batches (`lost_peer.rs`: at most [`MAX_LOST_PEER_WAKES`] settling at once, one
//!   campaign each, the rest queued and dropped if the peer answers again). Groups led
//!   elsewhere stay stopped.
//!
//! Waking: a Raft RPC for a stopped group wakes it on the receiving node
//! (`peer_server.rs`); on the leader node, [`Hibernation::wake`] (or
//! [`Hibernation::propose`], the write path the broker calls) starts it. A former leader
//! starts again *as leader* — openraft 0.9 restores a node whose persisted vote is its own
//! committed one as Leader — and its first append wakes the followers, so a write waits
//! for no election; `trigger().elect()` is still sent (openraft ignores it on a leader)
//! for a replica that was not restored as leader. A replica woken elsewhere (a follower
//! node) runs its election timer; openraft restores a persisted committed vote with a
//! fresh leader lease, so a just-woken replica refuses other candidates for
//! `election_timeout_max`: an election after a wake takes that much longer.
//!
//! A [`crate::Host`] runs one when `HostConfig::hibernation` is set: it is the registry's
//! starter (a wake reopens the group over its kept machine), every write of its groups
//! holds the instance, and the peers it pings are the other members of its groups, as it
//! sees their memberships (a peer no group names any more is no longer pinged); see
//! `host/instance.rs`.
//!
//! Safety needs nothing new: a stopped replica is a follower that has not heard from its
//! leader lately; its vote and log are in the node log, nothing changes them while it is
//! stopped, and openraft's own rules decide every election after a wake.
//!
//! Invariants: at most [`MAX_CONCURRENT_HIBERNATIONS`] handshakes at once per node; at
//! most [`MAX_LOST_PEER_WAKES`] groups of lost peers settling at once per node; every
//! hibernate request is bounded by [`HIBERNATE_RPC_TIMEOUT`], every ping by the liveness
//! timeout, every wake by `WAKE_TIMEOUT` (`groups.rs`), every wait for a leader in
//! [`Hibernation::propose`] by [`PROPOSE_LEADER_WAIT`]. Dropping or shutting down the
//! [`Hibernation`] ends its tasks (the groups stay as they are).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

// tokio's clock, not std's: every timeout here is slept on it, and a simulation pauses it.
use tokio::time::Instant;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, RaftMetrics, ServerState};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

use crate::error::{ClusterError, Result};
use crate::groups::{GroupRegistry, HostState, StopOutcome, Stopped};
use crate::network::TcpNetwork;
use crate::placement::GroupId;
use crate::rpc::{self, Header, HibernateRefusal, HibernateRequest, RemoteRefusal};
use crate::types::{LogId, NodeId, Request, Response};

mod lag;
mod lost_peer;

pub use lag::{
    stretched_timeout, LagMeter, LAG_PROBE_INTERVAL, LAG_TIMEOUT_FACTOR, LAG_WINDOW,
    LIVENESS_TIMEOUT_MAX,
};
use lost_peer::{LostPeers, SettleCtx};
pub use lost_peer::{
    WakeQueue, WakeQueueStats, ELECT_FALLBACK_LEASES, LOST_PEER_WAKE_SETTLE, MAX_LOST_PEER_WAKES,
};

/// How long a group must be idle (no new entry, no touch) before its leader puts it to
/// sleep.
pub const QUIESCE_AFTER: Duration = Duration::from_secs(5);
/// How often the leader looks for idle groups.
pub const QUIESCE_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// Longest a follower may take to answer a hibernate request.
pub const HIBERNATE_RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// Most hibernate handshakes one node runs at once (the others wait for a later check).
pub const MAX_CONCURRENT_HIBERNATIONS: usize = 64;
/// How often a node pings each peer (the per-peer liveness heartbeat).
pub const LIVENESS_INTERVAL: Duration = Duration::from_millis(100);
/// A peer that answered no ping for this long is lost (the broker's longest election
/// timeout plus margin): the groups stopped here that it led are woken. Stretched by this
/// node's own recent lag ([`stretched_timeout`]).
pub const LIVENESS_TIMEOUT: Duration = Duration::from_millis(500);
/// Wakes [`Hibernation::propose`] tries before giving up on a group that keeps being
/// stopped between its wake and the write (a hibernation racing it).
pub const PROPOSE_WAKE_ATTEMPTS: usize = 3;
/// Longest [`Hibernation::propose`] waits for the woken group to have a leader.
pub const PROPOSE_LEADER_WAIT: Duration = Duration::from_secs(5);

/// When groups hibernate and peers count as lost; [`Default`] is the named constants.
#[derive(Debug, Clone, Copy)]
pub struct HibernationConfig {
    /// [`QUIESCE_AFTER`].
    pub quiesce_after: Duration,
    /// [`QUIESCE_CHECK_INTERVAL`].
    pub check_interval: Duration,
    /// [`LIVENESS_INTERVAL`].
    pub liveness_interval: Duration,
    /// [`LIVENESS_TIMEOUT`]: set it to the Raft election timeout in use.
    pub liveness_timeout: Duration,
}

impl Default for HibernationConfig {
    fn default() -> HibernationConfig {
        HibernationConfig {
            quiesce_after: QUIESCE_AFTER,
            check_interval: QUIESCE_CHECK_INTERVAL,
            liveness_interval: LIVENESS_INTERVAL,
            liveness_timeout: LIVENESS_TIMEOUT,
        }
    }
}

/// What a follower answers a hibernate request: stop if it holds exactly what the leader
/// named (the peer server calls this for `KIND_HIBERNATE`).
pub(crate) async fn serve_request(
    groups: &GroupRegistry,
    h: Header,
    r: HibernateRequest,
) -> (u8, Vec<u8>) {
    let reply = match groups.stop_if(h.group, |m| follower_check(m, &r)).await {
        StopOutcome::Stopped => Ok(()),
        // A repeated request (its first reply lost) finds the group stopped as it asked.
        StopOutcome::AlreadyStopped(st) => stopped_check(&st, &r),
        StopOutcome::Refused(refusal) => Err(refusal),
        StopOutcome::Busy => Err(HibernateRefusal::Busy),
        StopOutcome::Unknown => {
            let refusal = RemoteRefusal::UnknownGroup(h.group);
            return (rpc::KIND_ERROR, rpc::encode_refusal(h, &refusal));
        }
    };
    if let Err(refusal) = &reply {
        tracing::debug!(group = h.group, %refusal, "hibernate request refused");
    }
    (
        rpc::KIND_HIBERNATE_REPLY,
        rpc::encode_hibernate_reply(h, &reply),
    )
}

fn follower_check(
    m: &RaftMetrics<NodeId, BasicNode>,
    r: &HibernateRequest,
) -> std::result::Result<Stopped, HibernateRefusal> {
    if m.current_term != r.term {
        return Err(HibernateRefusal::WrongTerm {
            asked: r.term,
            ours: m.current_term,
        });
    }
    let following = matches!(m.state, ServerState::Follower | ServerState::Learner);
    if !following || m.current_leader != Some(r.leader) || m.id == r.leader {
        return Err(HibernateRefusal::NotLeader {
            asked: r.leader,
            known: m.current_leader,
        });
    }
    let index = r.last_log_id.map(|l| l.index);
    if r.last_log_id.is_none() || m.last_log_index != index || m.last_applied != r.last_log_id {
        return Err(HibernateRefusal::LogMismatch {
            asked: r.last_log_id,
            last_index: m.last_log_index,
            applied: m.last_applied,
        });
    }
    Ok(Stopped {
        leader: Some(r.leader),
        term: r.term,
        last_log_id: r.last_log_id,
    })
}

fn stopped_check(st: &Stopped, r: &HibernateRequest) -> std::result::Result<(), HibernateRefusal> {
    if st.term != r.term {
        return Err(HibernateRefusal::WrongTerm {
            asked: r.term,
            ours: st.term,
        });
    }
    if st.leader != Some(r.leader) {
        return Err(HibernateRefusal::NotLeader {
            asked: r.leader,
            known: st.leader,
        });
    }
    if st.last_log_id != r.last_log_id {
        return Err(HibernateRefusal::LogMismatch {
            asked: r.last_log_id,
            last_index: st.last_log_id.map(|l| l.index),
            applied: st.last_log_id,
        });
    }
    Ok(())
}

/// A led group's activity, as the quiesce task last saw it.
#[derive(Debug, Clone, Copy)]
struct Activity {
    last_index: Option<u64>,
    since: Instant,
}

struct Shared {
    id: NodeId,
    groups: GroupRegistry,
    network: TcpNetwork,
    config: HibernationConfig,
    activity: Mutex<HashMap<GroupId, Activity>>,
    /// Groups with a handshake running.
    hibernating: Mutex<HashSet<GroupId>>,
    slots: Arc<Semaphore>,
    refused: AtomicU64,
    peers_lost: AtomicU64,
    /// This node's own lateness (what stretches the liveness timeout).
    lag: Arc<LagMeter>,
    /// The peers found lost now.
    lost: Arc<LostPeers>,
    /// The groups of lost peers to wake, in bounded batches.
    wakes: Arc<WakeQueue>,
}

impl Shared {
    fn activity(&self) -> MutexGuard<'_, HashMap<GroupId, Activity>> {
        self.activity.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn hibernating(&self) -> MutexGuard<'_, HashSet<GroupId>> {
        self.hibernating.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn touch(&self, group: GroupId) {
        if let Some(a) = self.activity().get_mut(&group) {
            a.since = Instant::now();
        }
    }
}

/// The hibernation of one node's groups: its quiesce and liveness tasks, and the wake
/// and write path. See the module documentation.
pub struct Hibernation {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    /// The liveness task of each peer watched, and why it is.
    peers: Mutex<HashMap<NodeId, Watched>>,
}

/// One watched peer: its liveness task, the groups that name it (a host's
/// [`Hibernation::add_group_peer`]), and whether it was named at the start or by
/// [`Hibernation::watch_peer`] (then it is watched for good).
struct Watched {
    task: JoinHandle<()>,
    groups: usize,
    pinned: bool,
}

impl std::fmt::Debug for Hibernation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hibernation")
            .field("id", &self.shared.id)
            .field("groups", &self.shared.groups)
            .finish()
    }
}

impl Drop for Hibernation {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Hibernation {
    /// Starts hibernating the groups of `groups` that node `id` leads, and pinging
    /// `peers` (node id → member address; this node's own entry is skipped). `network` is
    /// the node's pool (any group's factory of it). The registry needs a starter
    /// (`GroupRegistry::set_starter`) for anything to wake.
    pub fn start(
        id: NodeId,
        groups: GroupRegistry,
        network: TcpNetwork,
        peers: BTreeMap<NodeId, String>,
        config: HibernationConfig,
    ) -> Hibernation {
        let shared = Arc::new(Shared {
            id,
            groups,
            network,
            config,
            activity: Mutex::default(),
            hibernating: Mutex::default(),
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT_HIBERNATIONS)),
            refused: AtomicU64::new(0),
            peers_lost: AtomicU64::new(0),
            lag: Arc::default(),
            lost: Arc::default(),
            wakes: Arc::new(WakeQueue::new(MAX_LOST_PEER_WAKES)),
        });
        let settle_ctx = Arc::new(SettleCtx {
            id,
            groups: shared.groups.clone(),
            lost: Arc::clone(&shared.lost),
        });
        let settle = move |group, peer| lost_peer::settle(Arc::clone(&settle_ctx), group, peer);
        let tasks = vec![
            tokio::spawn(quiesce_loop(Arc::clone(&shared))),
            tokio::spawn(lag::probe(Arc::clone(&shared.lag))),
            tokio::spawn(lost_peer::drain(Arc::clone(&shared.wakes), settle)),
        ];
        let hibernation = Hibernation {
            shared,
            tasks,
            peers: Mutex::default(),
        };
        for (peer, addr) in peers {
            hibernation.watch_peer(peer, addr);
        }
        hibernation
    }

    /// Pings `peer` at `addr` from now on and for good (its liveness task), unless it is
    /// this node; a peer already watched keeps its address.
    pub fn watch_peer(&self, peer: NodeId, addr: String) {
        self.watch(peer, addr, |w| w.pinned = true);
    }

    /// One more group names `peer` at `addr` as a member: pinged while any does (a host
    /// calls this as it sees its groups' memberships, and [`Self::drop_group_peer`] when a
    /// group no longer names it).
    pub(crate) fn add_group_peer(&self, peer: NodeId, addr: String) {
        self.watch(peer, addr, |w| w.groups += 1);
    }

    /// One group fewer names `peer`: once none does (and it was not watched for good),
    /// it is no longer pinged.
    pub(crate) fn drop_group_peer(&self, peer: NodeId) {
        let mut peers = self.lock_peers();
        let Some(w) = peers.get_mut(&peer) else {
            return;
        };
        w.groups = w.groups.saturating_sub(1);
        if w.groups == 0 && !w.pinned {
            w.task.abort();
            peers.remove(&peer);
        }
    }

    /// Peers pinged now.
    pub fn watched_peers(&self) -> usize {
        self.lock_peers().len()
    }

    /// `peer`'s entry, its liveness task started first if it had none; `f` updates it.
    /// Nothing for this node itself.
    fn watch(&self, peer: NodeId, addr: String, f: impl FnOnce(&mut Watched)) {
        if peer == self.shared.id {
            return;
        }
        let mut peers = self.lock_peers();
        let w = peers.entry(peer).or_insert_with(|| Watched {
            task: tokio::spawn(watch_peer(Arc::clone(&self.shared), peer, addr)),
            groups: 0,
            pinned: false,
        });
        f(w);
    }

    fn lock_peers(&self) -> MutexGuard<'_, HashMap<NodeId, Watched>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the quiesce and liveness tasks now (the groups stay as they are).
    pub fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
        for w in self.lock_peers().values() {
            w.task.abort();
        }
    }

    /// The group is in use (an attach, a consumer's flow): it does not hibernate for
    /// another `quiesce_after`. Writes need no touch: a new entry counts as activity.
    pub fn touch(&self, group: GroupId) {
        self.shared.touch(group);
    }

    /// Makes sure `group` runs here: a stopped group is started from the node log (a
    /// former leader comes back as leader; else, when this node led it, it campaigns at
    /// once). Returns once started, not necessarily with a leader.
    pub async fn wake(&self, group: GroupId) -> Result<()> {
        let before = self.shared.groups.state(group);
        let (hosted, started) = self.shared.groups.wake_hosted(group).await?;
        self.shared.touch(group);
        let led_here =
            matches!(before, Some(HostState::Stopped(st)) if st.leader == Some(self.shared.id));
        if started && led_here {
            hosted
                .raft
                .trigger()
                .elect()
                .await
                .map_err(|e| ClusterError::Raft {
                    group,
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }

    /// Replicates `request` through `group`, waking it first ([`Hibernation::wake`]):
    /// the write path of a hibernated address. `NotLeader` when another node leads it.
    pub async fn propose(&self, group: GroupId, request: Request) -> Result<Response> {
        // The instance is held while the write runs, so no hibernation stops it under the
        // write; it may stop between the wake and the hold, then the write wakes it again.
        let mut attempts = 0;
        let (raft, _hold) = loop {
            self.wake(group).await?;
            if let Some(held) = self.shared.groups.begin_write(group) {
                break held;
            }
            attempts += 1;
            if attempts >= PROPOSE_WAKE_ATTEMPTS {
                return Err(ClusterError::Raft {
                    group,
                    reason: format!(
                        "stopped again after each of {PROPOSE_WAKE_ATTEMPTS} wakes (PROPOSE_WAKE_ATTEMPTS)"
                    ),
                });
            }
        };
        let leader = raft
            .wait(Some(PROPOSE_LEADER_WAIT))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .map_err(|e| ClusterError::Raft {
                group,
                reason: format!(
                    "no leader within {PROPOSE_LEADER_WAIT:?} (PROPOSE_LEADER_WAIT): {e}"
                ),
            })?
            .current_leader;
        if leader != Some(self.shared.id) {
            return Err(ClusterError::NotLeader { group, leader });
        }
        let written = raft.client_write(request).await;
        self.shared.touch(group);
        match written {
            Ok(r) => Ok(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(ClusterError::NotLeader {
                    group,
                    leader: f.leader_id,
                })
            }
            Err(e) => Err(ClusterError::Raft {
                group,
                reason: e.to_string(),
            }),
        }
    }

    /// Hibernate attempts a follower refused, since the start.
    pub fn refusals(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// Times a peer was found lost (silent for the liveness timeout), since the start.
    pub fn peers_lost(&self) -> u64 {
        self.shared.peers_lost.load(Ordering::Relaxed)
    }

    /// The groups of lost peers queued and settling (see `lost_peer.rs`).
    pub fn lost_peer_wakes(&self) -> WakeQueueStats {
        self.shared.wakes.stats()
    }

    /// This node's own recent lag (its timers' lateness over the last 10–20 s) and the
    /// liveness timeout it stretches to now.
    pub fn lag(&self) -> (Duration, Duration) {
        let lag = self.shared.lag.recent(Instant::now());
        (
            lag,
            stretched_timeout(self.shared.config.liveness_timeout, lag),
        )
    }

    /// Ends the quiesce and liveness tasks (handshakes in flight finish on their own).
    pub async fn shutdown(mut self) {
        let peers: Vec<JoinHandle<()>> = self.lock_peers().drain().map(|(_, w)| w.task).collect();
        for t in self.tasks.drain(..).chain(peers) {
            t.abort();
            let _ = t.await;
        }
    }
}

/// A led group ready to sleep: the leader's term, its last log id (committed, matched by
/// every member), the other members' ids and addresses.
struct Ready {
    term: u64,
    last: LogId,
    others: Vec<(NodeId, String)>,
}

/// What the leader needs to put a group to sleep: its term, last log id, and the other
/// members' addresses; `None` when it is not ready (not leader, something not committed,
/// a follower not matched, a membership change not done).
fn leader_ready(m: &RaftMetrics<NodeId, BasicNode>) -> Option<Ready> {
    if m.state != ServerState::Leader || m.current_leader != Some(m.id) {
        return None;
    }
    let last = m.last_applied?;
    if m.last_log_index != Some(last.index) {
        return None;
    }
    let membership = m.membership_config.membership();
    let committed_config = m.membership_config.log_id().map(|l| l.index) <= Some(last.index);
    if membership.get_joint_config().len() != 1 || !committed_config {
        return None;
    }
    let replication = m.replication.as_ref()?;
    let others: Vec<(NodeId, String)> = membership
        .nodes()
        .filter(|(id, _)| **id != m.id)
        .map(|(id, node)| (*id, node.addr.clone()))
        .collect();
    let matched = others.iter().all(|(id, _)| {
        replication
            .get(id)
            .is_some_and(|matched| *matched == Some(last))
    });
    matched.then_some(Ready {
        term: m.current_term,
        last,
        others,
    })
}

async fn quiesce_loop(shared: Arc<Shared>) {
    let mut handshakes = JoinSet::new();
    loop {
        tokio::time::sleep(shared.config.check_interval).await;
        while handshakes.try_join_next().is_some() {}
        let now = Instant::now();
        let running = shared.groups.running();
        let mut seen = HashSet::with_capacity(running.len());
        for (group, raft) in running {
            let ready = {
                let metrics = raft.metrics();
                let m = metrics.borrow();
                if m.state != ServerState::Leader {
                    continue;
                }
                seen.insert(group);
                let mut activity = shared.activity();
                let a = activity.entry(group).or_insert(Activity {
                    last_index: m.last_log_index,
                    since: now,
                });
                if a.last_index != m.last_log_index {
                    *a = Activity {
                        last_index: m.last_log_index,
                        since: now,
                    };
                    continue;
                }
                if now.duration_since(a.since) < shared.config.quiesce_after {
                    continue;
                }
                leader_ready(&m)
            };
            let Some(Ready { term, last, others }) = ready else {
                continue;
            };
            if !shared.hibernating().insert(group) {
                continue;
            }
            let Ok(slot) = Arc::clone(&shared.slots).try_acquire_owned() else {
                shared.hibernating().remove(&group);
                continue;
            };
            let shared = Arc::clone(&shared);
            handshakes.spawn(async move {
                hibernate_group(&shared, group, term, last, others).await;
                shared.hibernating().remove(&group);
                drop(slot);
            });
        }
        // Forget groups no longer led (or running) here.
        shared.activity().retain(|g, _| seen.contains(g));
    }
}

/// The leader's half of the handshake for one group.
async fn hibernate_group(
    shared: &Shared,
    group: GroupId,
    term: u64,
    last: LogId,
    others: Vec<(NodeId, String)>,
) {
    let request = HibernateRequest {
        term,
        leader: shared.id,
        last_log_id: Some(last),
    };
    let network = shared.network.group(group);
    let mut asks = JoinSet::new();
    for (peer, addr) in others {
        let network = network.clone();
        asks.spawn(async move {
            let answer = network
                .hibernate(peer, &addr, &request, HIBERNATE_RPC_TIMEOUT)
                .await;
            (peer, answer)
        });
    }
    let mut all_stopped = true;
    while let Some(joined) = asks.join_next().await {
        let Ok((peer, answer)) = joined else {
            all_stopped = false;
            continue;
        };
        match answer {
            Ok(Ok(())) => {}
            Ok(Err(refusal)) => {
                all_stopped = false;
                tracing::debug!(group, peer, %refusal, "follower refused to hibernate");
            }
            Err(e) => {
                all_stopped = false;
                tracing::debug!(group, peer, error = %e, "hibernate request failed");
            }
        }
    }
    if !all_stopped {
        // The group stays awake; followers that did stop answer this leader's
        // heartbeats without waking and wake on its next entry. Try again later.
        shared.refused.fetch_add(1, Ordering::Relaxed);
        shared.touch(group);
        return;
    }
    let id = shared.id;
    let outcome = shared
        .groups
        .stop_if(group, |m| {
            let unchanged = m.state == ServerState::Leader
                && m.current_term == term
                && m.last_log_index == Some(last.index)
                && m.last_applied == Some(last);
            if unchanged {
                Ok(Stopped {
                    leader: Some(id),
                    term,
                    last_log_id: Some(last),
                })
            } else {
                Err(())
            }
        })
        .await;
    if let StopOutcome::Refused(()) | StopOutcome::Busy = outcome {
        // Something was appended while the followers stopped: they wake on its
        // replication; the group stays awake.
        shared.touch(group);
    }
}

/// The liveness heartbeat to one peer, and what its loss wakes: a peer is lost once it
/// answered nothing for the liveness timeout stretched by this node's own lag (measured
/// here too: a ping whose timeout fired late, a sleep that overran).
async fn watch_peer(shared: Arc<Shared>, peer: NodeId, addr: String) {
    let config = shared.config;
    let mut last_answer = Instant::now();
    let mut lost = false;
    loop {
        let began = Instant::now();
        let timeout = stretched_timeout(config.liveness_timeout, shared.lag.recent(began));
        let answered = shared.network.ping(peer, &addr, timeout).await.is_ok();
        let now = Instant::now();
        // A ping that failed later than its timeout: this node ran late.
        let late = now.duration_since(began).saturating_sub(timeout);
        if !answered && !late.is_zero() {
            shared.lag.record(now, late);
        }
        if answered {
            last_answer = now;
            if lost {
                lost = false;
                shared.lost.set(peer, false);
                let dropped = shared.wakes.forget_peer(peer);
                tracing::info!(
                    peer,
                    dropped,
                    "peer answers again: its groups still queued stay asleep"
                );
            }
        } else {
            let timeout = stretched_timeout(config.liveness_timeout, shared.lag.recent(now));
            if !lost && now.duration_since(last_answer) >= timeout {
                lost = true;
                shared.lost.set(peer, true);
                shared.peers_lost.fetch_add(1, Ordering::Relaxed);
                let led = shared.groups.stopped_led_by(peer);
                let queued = shared.wakes.push(peer, led);
                tracing::info!(
                    peer,
                    queued,
                    ?timeout,
                    "peer lost (no ping answered within the liveness timeout): waking the stopped groups it led, {MAX_LOST_PEER_WAKES} at a time"
                );
            }
        }
        let pause = config.liveness_interval.saturating_sub(began.elapsed());
        let slept = Instant::now();
        tokio::time::sleep(pause).await;
        let overran = slept.elapsed().saturating_sub(pause);
        if !overran.is_zero() {
            shared.lag.record(Instant::now(), overran);
        }
    }
}
