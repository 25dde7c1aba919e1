//! The Raft groups this node hosts: [`GroupRegistry`], by [`GroupId`], what the peer
//! server (`peer_server.rs`) dispatches every inbound RPC to.
//!
//! A group is *running* (a started `Raft` instance) or *stopped* (hibernated, issue 12
//! step 5: no instance, no task, no timer — its vote and log stay in the node's log, and
//! the registry keeps only [`Stopped`]: who led it, at which term, up to which log id).
//! So the peer server tells "stopped here" (wake it, then serve) from "unknown here"
//! (refuse with `UnknownGroup`). Groups are added, stopped, woken and removed at any time
//! while the server runs. Lookups take a read lock held only to clone the handle, never
//! across an `await`, so no change of one group waits on an RPC in progress, and an RPC
//! already dispatched to an instance being stopped finishes (or fails) on the handle it
//! holds.
//!
//! Waking ([`GroupRegistry::wake`]) starts the instance again through the owner's
//! [`GroupStarter`] (which opens the group's storage with `NodeLog::group` and its state
//! machine). Invariants:
//! * At most one instance per group: a group's stops and wakes are serialized by its own
//!   transition lock, and a wake re-checks the state under it, so concurrent wakes start
//!   one instance and a wake never overlaps the shutdown of the previous one.
//! * A wake is bounded: [`WAKE_TIMEOUT`] for the whole of it (waiting for the group's
//!   lock, for one of the [`MAX_CONCURRENT_WAKES`] slots, and the start); it runs in a
//!   task of its own, so a caller giving up (an RPC timing out, a connection closing)
//!   never abandons a half-started instance; one such task per group at a time — other
//!   callers wait for its end — so retried RPCs for a slow start never pile up tasks.
//! * At most [`MAX_HOSTED_GROUPS`] groups, running or stopped; one more is `LimitExceeded`.
//! * Each group has its own [`HeardCommit`]: the leader's commit index heard by *that*
//!   group's replica (readiness compares it with that group's applied index); it survives
//!   a stop and a wake.
//!
//! Does not: decide when to stop a group (`hibernate.rs`) or decide placement
//! (`placement.rs`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use openraft::{Raft, RaftMetrics};
use tokio::sync::Semaphore;

use crate::error::{ClusterError, Result};
use crate::placement::GroupId;
use crate::types::{LogId, NodeId, TypeConfig};

/// The metadata group (members, placement): the one a node's membership requests
/// (`KIND_JOIN`, `KIND_LEAVE`) address, and today's broker's only group.
pub const METADATA_GROUP: GroupId = 0;
/// Most Raft groups one node hosts (issue 12 aims at thousands of addresses per node).
pub const MAX_HOSTED_GROUPS: usize = 1 << 20;
/// Longest a wake of a stopped group may take, from the call to a running instance
/// (waiting for the group's transition lock and a wake slot included).
pub const WAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most groups of one node starting at once (after a peer is lost, every group it led
/// wakes): the others wait for a slot, within their [`WAKE_TIMEOUT`].
pub const MAX_CONCURRENT_WAKES: usize = 64;

/// The leader's commit index, as the last `append_entries` this node received for one
/// group carried it (shared by the peer server's connections and whoever reads it).
#[derive(Debug, Clone, Default)]
pub struct HeardCommit(Arc<AtomicU64>);

impl HeardCommit {
    /// The last commit index heard from a leader; `None` before any.
    pub fn get(&self) -> Option<u64> {
        self.0.load(Ordering::Relaxed).checked_sub(1)
    }

    pub(crate) fn record(&self, index: u64) {
        // Stored plus one, so that zero means "none heard".
        self.0.store(index.saturating_add(1), Ordering::Relaxed);
    }
}

/// What a stopped (hibernated) group's replica held when it stopped: enough to answer the
/// leader's heartbeats of that same term without waking (`peer_server.rs`), and to know
/// which peer's loss must wake it (`hibernate.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// The group's leader when it stopped (this node, or a peer); `None`: not known (a
    /// group registered stopped after a restart, before any leader was heard).
    pub leader: Option<NodeId>,
    /// The term of that leader.
    pub term: u64,
    /// The last log id this replica held, applied, when it stopped.
    pub last_log_id: Option<LogId>,
}

/// Whether a hosted group runs ([`GroupRegistry::state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    Running,
    Stopped(Stopped),
}

type StartFuture = Pin<Box<dyn Future<Output = Result<Raft<TypeConfig>>> + Send>>;

/// Starts a stopped group's instance again: opens its storage over the node's log
/// (`NodeLog::group`), its state machine and its network (`TcpNetwork::group`), and calls
/// `Raft::new`. The owner of the groups provides it; any `Fn(GroupId) -> impl Future`
/// closure is one.
pub trait GroupStarter: Send + Sync + 'static {
    fn start(&self, group: GroupId) -> StartFuture;
}

impl<F, Fut> GroupStarter for F
where
    F: Fn(GroupId) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Raft<TypeConfig>>> + Send + 'static,
{
    fn start(&self, group: GroupId) -> StartFuture {
        Box::pin(self(group))
    }
}

/// One running group: its Raft handle and what the peer server heard for it.
#[derive(Clone)]
pub(crate) struct HostedGroup {
    pub raft: Raft<TypeConfig>,
    pub heard_commit: HeardCommit,
}

/// What the peer server finds for a group.
pub(crate) enum Lookup {
    Running(HostedGroup),
    Stopped(Stopped),
    Unknown,
}

#[derive(Clone)]
enum Run {
    Running(Raft<TypeConfig>),
    Stopped(Stopped),
}

/// The one wake of a group under way (see [`GroupRegistry::wake`]).
#[derive(Default)]
struct Waking {
    busy: std::sync::atomic::AtomicBool,
    done: tokio::sync::Notify,
}

/// Ends a group's wake when dropped, however the wake ended (even a starter's panic).
struct WakeDone(Arc<Waking>);

impl Drop for WakeDone {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::SeqCst);
        self.0.done.notify_waiters();
    }
}

/// One hosted group.
struct Slot {
    run: Run,
    heard_commit: HeardCommit,
    /// Serializes this group's stops and wakes (held across the instance's start or
    /// shutdown, never across anything else).
    transition: Arc<tokio::sync::Mutex<()>>,
    /// Whether a wake of this group is under way, and its end.
    waking: Arc<Waking>,
    /// Proposals holding this instance ([`GroupRegistry::begin_write`]): a stop is
    /// refused while any does.
    writes: Arc<AtomicUsize>,
}

impl Slot {
    fn new(run: Run) -> Slot {
        Slot {
            run,
            heard_commit: HeardCommit::default(),
            transition: Arc::default(),
            waking: Arc::default(),
            writes: Arc::default(),
        }
    }
}

struct Inner {
    groups: RwLock<HashMap<GroupId, Slot>>,
    starter: RwLock<Option<Arc<dyn GroupStarter>>>,
    /// Who serves proposals forwarded by peers (`forward.rs`); `None`: refused as for an
    /// unknown group.
    forwarded: RwLock<Option<crate::forward::ForwardServer>>,
    /// Who serves application requests (`app_request.rs`); `None`: answered "no handler".
    app: RwLock<Option<crate::app_request::AppServer>>,
    /// Who serves hand-over requests (`host/handover.rs`); `None`: refused.
    hand_over: RwLock<Option<Arc<dyn crate::host::handover::HandOverHandler>>>,
    wake_slots: Arc<Semaphore>,
    /// Instances started by wakes, and stopped by hibernation, since the start.
    woken: AtomicU64,
    stopped: AtomicU64,
    /// Raft RPCs (vote, append, snapshot, hibernate) the peer server received for any
    /// group: what "no traffic for idle groups" is checked against.
    group_rpcs: AtomicU64,
}

impl Default for Inner {
    fn default() -> Inner {
        Inner {
            groups: RwLock::default(),
            starter: RwLock::default(),
            forwarded: RwLock::default(),
            app: RwLock::default(),
            hand_over: RwLock::default(),
            wake_slots: Arc::new(Semaphore::new(MAX_CONCURRENT_WAKES)),
            woken: AtomicU64::new(0),
            stopped: AtomicU64::new(0),
            group_rpcs: AtomicU64::new(0),
        }
    }
}

/// The groups of this node; clones share one registry.
#[derive(Clone, Default)]
pub struct GroupRegistry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for GroupRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupRegistry")
            .field("groups", &self.len())
            .field("running", &self.running_count())
            .finish()
    }
}

/// Why a stop was not done ([`GroupRegistry::stop_if`]): the check's refusal, or the
/// group is not running here.
#[derive(Debug)]
pub(crate) enum StopOutcome<E> {
    Stopped,
    AlreadyStopped(Stopped),
    Unknown,
    Refused(E),
    /// A proposal holds the instance ([`GroupRegistry::begin_write`]).
    Busy,
}

/// A proposal's hold on a running instance: while any is held, the group is not stopped,
/// so a write never meets an instance shut down under it (its outcome would be unknown).
/// Released when dropped.
#[derive(Debug)]
pub struct WriteHold(Arc<AtomicUsize>);

impl Drop for WriteHold {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl GroupRegistry {
    pub fn new() -> GroupRegistry {
        GroupRegistry::default()
    }

    /// Wakes stopped groups with `starter` from now on (without one, a wake is
    /// [`ClusterError::NoGroupStarter`]).
    pub fn set_starter(&self, starter: impl GroupStarter) {
        let mut s = self
            .inner
            .starter
            .write()
            .unwrap_or_else(|e| e.into_inner());
        *s = Some(Arc::new(starter));
    }

    /// Serves proposals peers forward to this node's replicas with `proposer` from now on
    /// (`forward.rs`; the host sets it to its own groups).
    pub fn set_proposer(&self, proposer: impl crate::forward::Proposer) {
        let server = crate::forward::ForwardServer::new(Arc::new(proposer));
        let mut f = self
            .inner
            .forwarded
            .write()
            .unwrap_or_else(|e| e.into_inner());
        *f = Some(server);
    }

    /// The server of forwarded proposals, when one is set.
    pub(crate) fn forwarded(&self) -> Option<crate::forward::ForwardServer> {
        self.inner
            .forwarded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Serves the application requests peers send to this node with `handler` from now
    /// on (`app_request.rs`), replacing a previous one.
    pub fn set_app_handler(&self, handler: impl crate::app_request::AppHandler) {
        let server = crate::app_request::AppServer::new(Arc::new(handler));
        let mut a = self.inner.app.write().unwrap_or_else(|e| e.into_inner());
        *a = Some(server);
    }

    /// Serves the hand-over requests peers send to this node with `handler` from now on.
    pub fn set_hand_over_handler(&self, handler: impl crate::host::handover::HandOverHandler) {
        let mut h = self
            .inner
            .hand_over
            .write()
            .unwrap_or_else(|e| e.into_inner());
        *h = Some(Arc::new(handler));
    }

    /// The hand-over handler, when one is set.
    pub(crate) fn hand_over_handler(
        &self,
    ) -> Option<Arc<dyn crate::host::handover::HandOverHandler>> {
        self.inner
            .hand_over
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The server of application requests, when a handler is set.
    pub(crate) fn app_server(&self) -> Option<crate::app_request::AppServer> {
        self.inner
            .app
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Serves `raft` as group `group` from now on (replacing a previous handle or stopped
    /// entry of the same group); returns the group's [`HeardCommit`].
    pub fn insert(&self, group: GroupId, raft: Raft<TypeConfig>) -> Result<HeardCommit> {
        self.insert_run(group, Run::Running(raft))
    }

    /// Hosts `group` stopped (e.g. registered at a node's start from its node log, without
    /// starting an instance): its first RPC, [`GroupRegistry::wake`], or the loss of
    /// `stopped.leader` wakes it.
    pub fn insert_stopped(&self, group: GroupId, stopped: Stopped) -> Result<HeardCommit> {
        self.insert_run(group, Run::Stopped(stopped))
    }

    fn insert_run(&self, group: GroupId, run: Run) -> Result<HeardCommit> {
        let mut groups = self.write();
        if let Some(slot) = groups.get_mut(&group) {
            slot.run = run;
            return Ok(slot.heard_commit.clone());
        }
        if groups.len() >= MAX_HOSTED_GROUPS {
            return Err(ClusterError::LimitExceeded {
                what: "hosted Raft groups (MAX_HOSTED_GROUPS)",
                len: groups.len() as u64 + 1,
                max: MAX_HOSTED_GROUPS as u64,
            });
        }
        let slot = Slot::new(run);
        let heard = slot.heard_commit.clone();
        groups.insert(group, slot);
        Ok(heard)
    }

    /// Stops serving `group`: its RPCs are refused as an unknown group from now on. The
    /// running instance, if any, is returned for its owner to shut down.
    pub fn remove(&self, group: GroupId) -> Option<Raft<TypeConfig>> {
        match self.write().remove(&group)?.run {
            Run::Running(raft) => Some(raft),
            Run::Stopped(_) => None,
        }
    }

    /// The Raft handle of `group`, if hosted and running.
    pub fn raft(&self, group: GroupId) -> Option<Raft<TypeConfig>> {
        match self.read().get(&group)?.run {
            Run::Running(ref raft) => Some(raft.clone()),
            Run::Stopped(_) => None,
        }
    }

    /// Whether `group` is hosted here, running or stopped.
    pub fn state(&self, group: GroupId) -> Option<HostState> {
        self.read().get(&group).map(|s| match s.run {
            Run::Running(_) => HostState::Running,
            Run::Stopped(st) => HostState::Stopped(st),
        })
    }

    /// What the peer server heard for `group`, if hosted.
    pub fn heard_commit(&self, group: GroupId) -> Option<HeardCommit> {
        self.read().get(&group).map(|g| g.heard_commit.clone())
    }

    /// How many groups are hosted, running or stopped.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many hosted groups have a running instance.
    pub fn running_count(&self) -> usize {
        let groups = self.read();
        groups
            .values()
            .filter(|s| matches!(s.run, Run::Running(_)))
            .count()
    }

    /// The running groups and their handles (a snapshot).
    pub fn running(&self) -> Vec<(GroupId, Raft<TypeConfig>)> {
        let groups = self.read();
        let mut out = Vec::new();
        for (g, slot) in groups.iter() {
            if let Run::Running(raft) = &slot.run {
                out.push((*g, raft.clone()));
            }
        }
        out
    }

    /// The stopped groups whose last known leader is `leader`.
    pub fn stopped_led_by(&self, leader: NodeId) -> Vec<GroupId> {
        let groups = self.read();
        let led = |s: &Slot| matches!(s.run, Run::Stopped(st) if st.leader == Some(leader));
        groups
            .iter()
            .filter(|(_, s)| led(s))
            .map(|(g, _)| *g)
            .collect()
    }

    /// Instances started by wakes since the registry was created.
    pub fn wakes(&self) -> u64 {
        self.inner.woken.load(Ordering::Relaxed)
    }

    /// Instances stopped by hibernation since the registry was created.
    pub fn stops(&self) -> u64 {
        self.inner.stopped.load(Ordering::Relaxed)
    }

    /// Raft RPCs of any group (vote, append entries, install snapshot, hibernate) the
    /// peer server received since the start — not the per-peer liveness heartbeats.
    pub fn group_rpcs_received(&self) -> u64 {
        self.inner.group_rpcs.load(Ordering::Relaxed)
    }

    pub(crate) fn count_group_rpc(&self) {
        self.inner.group_rpcs.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn lookup(&self, group: GroupId) -> Lookup {
        match self.read().get(&group) {
            None => Lookup::Unknown,
            Some(slot) => match &slot.run {
                Run::Running(raft) => Lookup::Running(HostedGroup {
                    raft: raft.clone(),
                    heard_commit: slot.heard_commit.clone(),
                }),
                Run::Stopped(st) => Lookup::Stopped(*st),
            },
        }
    }

    /// The running instance of `group`, started first if the group is stopped (see the
    /// module's invariants); bounded by [`WAKE_TIMEOUT`].
    pub async fn wake(&self, group: GroupId) -> Result<Raft<TypeConfig>> {
        self.wake_hosted(group).await.map(|(h, _)| h.raft)
    }

    /// [`GroupRegistry::wake`]; `true` when this call started the instance (not a
    /// concurrent one, and it was not running already).
    pub(crate) async fn wake_hosted(&self, group: GroupId) -> Result<(HostedGroup, bool)> {
        let deadline = tokio::time::Instant::now() + WAKE_TIMEOUT;
        let late = || ClusterError::GroupStart {
            group,
            reason: format!("not started within {WAKE_TIMEOUT:?} (WAKE_TIMEOUT)"),
        };
        loop {
            let (transition, waking) = match self.read().get(&group) {
                None => return Err(ClusterError::UnknownGroup { group }),
                Some(slot) => match &slot.run {
                    Run::Running(raft) => {
                        let hosted = HostedGroup {
                            raft: raft.clone(),
                            heard_commit: slot.heard_commit.clone(),
                        };
                        return Ok((hosted, false));
                    }
                    Run::Stopped(_) => (Arc::clone(&slot.transition), Arc::clone(&slot.waking)),
                },
            };
            // One start per group at a time: the others wait for it (a caller that gives
            // up leaves nothing behind), so RPCs retried for a slow start never pile up
            // tasks.
            let done = waking.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if waking.busy.swap(true, Ordering::SeqCst) {
                if tokio::time::timeout_at(deadline, done).await.is_err() {
                    return Err(late());
                }
                continue;
            }
            // In a task of its own: a caller that gives up never abandons a half-started
            // instance; the next caller finds it running.
            let registry = self.clone();
            let ours = WakeDone(Arc::clone(&waking));
            let task = tokio::spawn(async move {
                let _done = ours;
                registry.start_stopped(group, transition).await
            });
            return match tokio::time::timeout_at(deadline, task).await {
                Ok(Ok(result)) => result,
                Ok(Err(join)) => Err(ClusterError::GroupStart {
                    group,
                    reason: format!("wake task ended: {join}"),
                }),
                Err(_) => Err(late()),
            };
        }
    }

    async fn start_stopped(
        &self,
        group: GroupId,
        transition: Arc<tokio::sync::Mutex<()>>,
    ) -> Result<(HostedGroup, bool)> {
        let _transition = transition.lock().await;
        // Re-check under the lock: a concurrent wake may have started it, a removal ended it.
        if let Lookup::Running(hosted) = self.lookup(group) {
            return Ok((hosted, false));
        }
        if matches!(self.lookup(group), Lookup::Unknown) {
            return Err(ClusterError::UnknownGroup { group });
        }
        let starter = self
            .inner
            .starter
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(ClusterError::NoGroupStarter { group })?;
        let _slot = Arc::clone(&self.inner.wake_slots)
            .acquire_owned()
            .await
            .map_err(|_| ClusterError::GroupStart {
                group,
                reason: "wake slots closed".into(),
            })?;
        let raft = starter.start(group).await?;
        let hosted = {
            let mut groups = self.write();
            groups.get_mut(&group).map(|slot| {
                slot.run = Run::Running(raft.clone());
                HostedGroup {
                    raft: raft.clone(),
                    heard_commit: slot.heard_commit.clone(),
                }
            })
        };
        let Some(hosted) = hosted else {
            // Removed while starting: the owner no longer wants it.
            let _ = raft.shutdown().await;
            return Err(ClusterError::UnknownGroup { group });
        };
        self.inner.woken.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(group, "raft group woken");
        Ok((hosted, true))
    }

    /// The running instance of `group` held for a proposal (see [`WriteHold`]): whoever
    /// writes through a group's `Raft` other than by `Hibernation::propose` takes one for
    /// the write. `None` when not running.
    pub fn begin_write(&self, group: GroupId) -> Option<(Raft<TypeConfig>, WriteHold)> {
        let groups = self.read();
        let slot = groups.get(&group)?;
        match &slot.run {
            Run::Running(raft) => {
                slot.writes.fetch_add(1, Ordering::SeqCst);
                Some((raft.clone(), WriteHold(Arc::clone(&slot.writes))))
            }
            Run::Stopped(_) => None,
        }
    }

    /// Stops `group`'s running instance if `check` accepts its current metrics (checked
    /// under the group's transition lock, so no wake or other stop runs meanwhile): the
    /// entry becomes [`Stopped`] first (new RPCs then wake it again, after the shutdown),
    /// then the instance is shut down.
    pub(crate) async fn stop_if<E>(
        &self,
        group: GroupId,
        check: impl FnOnce(&RaftMetrics<NodeId, openraft::BasicNode>) -> Result<Stopped, E>,
    ) -> StopOutcome<E> {
        let transition = match self.read().get(&group) {
            None => return StopOutcome::Unknown,
            Some(slot) => Arc::clone(&slot.transition),
        };
        let _transition = transition.lock().await;
        let raft = match self.lookup(group) {
            Lookup::Unknown => return StopOutcome::Unknown,
            Lookup::Stopped(st) => return StopOutcome::AlreadyStopped(st),
            Lookup::Running(hosted) => hosted.raft,
        };
        let metrics = raft.metrics().borrow().clone();
        let stopped = match check(&metrics) {
            Ok(s) => s,
            Err(e) => return StopOutcome::Refused(e),
        };
        {
            let mut groups = self.write();
            match groups.get_mut(&group) {
                // Taken under the same lock as `begin_write`'s: a proposal holding the
                // instance has registered by now.
                Some(slot) if slot.writes.load(Ordering::SeqCst) > 0 => return StopOutcome::Busy,
                Some(slot) => slot.run = Run::Stopped(stopped),
                None => return StopOutcome::Unknown,
            }
        }
        if let Err(e) = raft.shutdown().await {
            tracing::warn!(group, error = %e, "stopping a hibernating raft group failed");
        }
        self.inner.stopped.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(group, ?stopped, "raft group stopped (hibernated)");
        StopOutcome::Stopped
    }

    // A poisoned lock only means a panic elsewhere while holding it; the map itself is
    // always whole (every write is one insert, remove or assignment).
    fn read(&self) -> RwLockReadGuard<'_, HashMap<GroupId, Slot>> {
        self.inner.groups.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<GroupId, Slot>> {
        self.inner.groups.write().unwrap_or_else(|e| e.into_inner())
    }
}
