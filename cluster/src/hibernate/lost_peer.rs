//! Waking the groups a lost peer led, in bounded batches.
//!
//! When a peer is found lost, every group stopped here that it led must elect a new
//! leader. Waking them all at once is what collapsed a loaded 3-node cluster of 10,000
//! hibernated groups (benches/RESULTS.md, session 15): thousands of instances started
//! together, thousands of elections, thousands of groups heartbeating every 40 ms on a
//! machine already starved — which made more nodes look lost. So the groups go into a
//! [`WakeQueue`] (in group order, each once) and at most [`MAX_LOST_PEER_WAKES`] are
//! *settling* at once on this node: woken, their election held by one survivor, and
//! waited for until a new leader is known (or they stop again, or
//! [`LOST_PEER_WAKE_SETTLE`] passed). The rest wait their turn. When the peer answers
//! again, its groups still queued are dropped (they stay asleep: their leader is back)
//! and a group woken for it that held no election yet is put back to sleep as it was
//! ([`settle`]).
//!
//! One election per group: a woken replica's own election timer is switched off while it
//! settles (`runtime_config().elect(false)`); the surviving voter with the smallest id
//! campaigns once the restored leader lease ran out (`election_timeout_max`), and again
//! after each further lease without a leader (a replica woken by that campaign's vote
//! request refuses it for one lease: its own restored lease); if no leader is known
//! after [`ELECT_FALLBACK_LEASES`] leases every replica's timer runs again, so a group is
//! never left without elections.
//!
//! Invariants: at most [`MAX_LOST_PEER_WAKES`] groups settling at once per node (the
//! counter [`WakeQueueStats::in_flight_max`] shows the most ever seen); each settling
//! group's slot is released within [`LOST_PEER_WAKE_SETTLE`]; a group is queued once.
//!
//! Does not: bound wakes from other causes (a peer's RPC for a stopped group wakes it
//! in the peer server, bounded by `MAX_CONCURRENT_WAKES` starting at once; a write wakes
//! its group).

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use openraft::{Raft, ServerState};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::groups::{GroupRegistry, HostState, StopOutcome, Stopped, WAKE_TIMEOUT};
use crate::placement::GroupId;
use crate::types::{NodeId, TypeConfig};

/// Most groups of lost peers settling (woken, electing) at once on one node.
pub const MAX_LOST_PEER_WAKES: usize = 16;
/// Longest one group holds its slot: from its wake to a known new leader.
pub const LOST_PEER_WAKE_SETTLE: Duration = Duration::from_secs(5);
/// Leases (`election_timeout_max`) after which a settling replica's election timer is
/// switched on again if no leader is known.
pub const ELECT_FALLBACK_LEASES: u32 = 5;
/// How often a settling group is looked at.
const SETTLE_POLL: Duration = Duration::from_millis(20);

/// The groups of lost peers waiting to be woken, and those settling.
#[derive(Debug)]
pub struct WakeQueue {
    bound: usize,
    state: Mutex<Queued>,
    ready: Notify,
    in_flight: AtomicUsize,
    in_flight_max: AtomicUsize,
    started: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Debug, Default)]
struct Queued {
    order: VecDeque<(GroupId, NodeId)>,
    members: HashSet<GroupId>,
}

/// What a [`WakeQueue`] holds and did, for operators and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WakeQueueStats {
    /// Groups waiting for a slot.
    pub queued: usize,
    /// Groups settling now (at most the bound).
    pub in_flight: usize,
    /// The most groups ever settling at once.
    pub in_flight_max: usize,
    /// Groups taken from the queue to settle, since the start.
    pub started: u64,
    /// Groups dropped from the queue because their peer answered again.
    pub dropped: u64,
}

impl WakeQueue {
    /// A queue letting at most `bound` (at least 1) groups settle at once.
    pub fn new(bound: usize) -> WakeQueue {
        WakeQueue {
            bound: bound.max(1),
            state: Mutex::default(),
            ready: Notify::new(),
            in_flight: AtomicUsize::new(0),
            in_flight_max: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues `groups` of lost peer `peer`, in group order; a group already queued stays
    /// where it is. Returns how many were added.
    pub fn push(&self, peer: NodeId, groups: impl IntoIterator<Item = GroupId>) -> usize {
        let mut groups: Vec<GroupId> = groups.into_iter().collect();
        groups.sort_unstable();
        let mut q = self.lock();
        let mut added = 0;
        for g in groups {
            if q.members.insert(g) {
                q.order.push_back((g, peer));
                added += 1;
            }
        }
        drop(q);
        if added > 0 {
            self.ready.notify_one();
        }
        added
    }

    /// `peer` answers again: its groups still queued are dropped. Returns how many.
    pub fn forget_peer(&self, peer: NodeId) -> usize {
        let mut q = self.lock();
        let before = q.order.len();
        let Queued { order, members } = &mut *q;
        order.retain(|(g, p)| {
            let keep = *p != peer;
            if !keep {
                members.remove(g);
            }
            keep
        });
        let dropped = before - q.order.len();
        self.dropped.fetch_add(dropped as u64, Ordering::Relaxed);
        dropped
    }

    pub fn stats(&self) -> WakeQueueStats {
        WakeQueueStats {
            queued: self.lock().order.len(),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            in_flight_max: self.in_flight_max.load(Ordering::Relaxed),
            started: self.started.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }

    fn pop(&self) -> Option<(GroupId, NodeId)> {
        let mut q = self.lock();
        let next = q.order.pop_front()?;
        q.members.remove(&next.0);
        Some(next)
    }

    fn lock(&self) -> MutexGuard<'_, Queued> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Drains `queue` for good: each group is given to `settle` (group, lost peer) once a
/// slot is free, with at most the queue's bound running at once; a slot is freed when
/// `settle` ends or after [`LOST_PEER_WAKE_SETTLE`].
pub(crate) async fn drain<F, Fut>(queue: Arc<WakeQueue>, settle: F)
where
    F: Fn(GroupId, NodeId) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(queue.bound));
    let mut settling = JoinSet::new();
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        while settling.try_join_next().is_some() {}
        let (group, peer) = loop {
            if let Some(next) = queue.pop() {
                break next;
            }
            // `notify_one` keeps a permit when nobody waits: a push between the pop and
            // this wait is not missed.
            queue.ready.notified().await;
        };
        let now = queue.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        queue.in_flight_max.fetch_max(now, Ordering::SeqCst);
        queue.started.fetch_add(1, Ordering::Relaxed);
        let work = settle(group, peer);
        let queue = Arc::clone(&queue);
        settling.spawn(async move {
            if tokio::time::timeout(LOST_PEER_WAKE_SETTLE, work)
                .await
                .is_err()
            {
                tracing::debug!(group, peer, "a lost peer's group did not settle in time");
            }
            queue.in_flight.fetch_sub(1, Ordering::SeqCst);
            drop(slot);
        });
    }
}

/// The peers this node's liveness loops find lost now.
#[derive(Debug, Default)]
pub(crate) struct LostPeers(Mutex<HashSet<NodeId>>);

impl LostPeers {
    pub(crate) fn set(&self, peer: NodeId, lost: bool) {
        let mut peers = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if lost {
            peers.insert(peer);
        } else {
            peers.remove(&peer);
        }
    }

    pub(crate) fn is_lost(&self, peer: NodeId) -> bool {
        let peers = self.0.lock().unwrap_or_else(|e| e.into_inner());
        peers.contains(&peer)
    }
}

/// What [`settle`] needs of the node.
pub(crate) struct SettleCtx {
    pub id: NodeId,
    pub groups: GroupRegistry,
    /// The liveness loops' verdicts.
    pub lost: Arc<LostPeers>,
}

/// Switches a woken replica's election timer back on when dropped — however its settling
/// ended, even cut short by [`LOST_PEER_WAKE_SETTLE`] — unless it went back to sleep.
struct ElectOff<'a> {
    raft: &'a Raft<TypeConfig>,
    asleep: bool,
}

impl Drop for ElectOff<'_> {
    fn drop(&mut self) {
        if !self.asleep {
            self.raft.runtime_config().elect(true);
        }
    }
}

/// Wakes `group`, whose leader `lost` is gone, and waits until it has a new leader (see
/// the module documentation): its election timer off, the first surviving voter
/// campaigning once the lease ran out, every timer on again after
/// [`ELECT_FALLBACK_LEASES`] leases. Put back to sleep as it was if `lost` answers again
/// before any election changed it.
pub(crate) async fn settle(ctx: Arc<SettleCtx>, group: GroupId, lost: NodeId) {
    let Some(HostState::Stopped(before)) = ctx.groups.state(group) else {
        return; // running already (an RPC woke it), or gone
    };
    if before.leader != Some(lost) || !ctx.lost.is_lost(lost) {
        return;
    }
    let raft = match ctx.groups.wake(group).await {
        Ok(raft) => raft,
        Err(e) => {
            tracing::warn!(group, error = %e, "waking a group of a lost peer failed");
            return;
        }
    };
    raft.runtime_config().elect(false);
    let mut off = ElectOff {
        raft: &raft,
        asleep: false,
    };
    let outcome = hold_election(&ctx, group, lost, &raft, before).await;
    off.asleep = outcome == Settled::Asleep;
    drop(off);
    tracing::debug!(group, lost, ?outcome, "a lost peer's group settled");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    NewLeader,
    Asleep,
    Stopped,
    TimersOn,
}

async fn hold_election(
    ctx: &SettleCtx,
    group: GroupId,
    lost: NodeId,
    raft: &Raft<TypeConfig>,
    before: Stopped,
) -> Settled {
    let started = Instant::now();
    let loaded = raft
        .wait(Some(WAKE_TIMEOUT))
        .metrics(
            |m| {
                m.membership_config
                    .membership()
                    .voter_ids()
                    .next()
                    .is_some()
            },
            "membership loaded",
        )
        .await;
    let Ok(m) = loaded else {
        return Settled::TimersOn;
    };
    let first = m
        .membership_config
        .membership()
        .voter_ids()
        .filter(|v| *v != lost)
        .min();
    let lease = Duration::from_millis(raft.config().election_timeout_max);
    let fallback = lease.saturating_mul(ELECT_FALLBACK_LEASES);
    let mut campaigns = 0u32;
    loop {
        let m = raft.metrics().borrow().clone();
        if m.state == ServerState::Shutdown {
            return Settled::Stopped;
        }
        if m.current_leader.is_some_and(|l| l != lost) {
            return Settled::NewLeader;
        }
        let unchanged = m.current_term == before.term
            && m.last_log_index == before.last_log_id.map(|l| l.index)
            && m.last_applied == before.last_log_id;
        if unchanged && !ctx.lost.is_lost(lost) && sleep_again(ctx, group, before).await {
            return Settled::Asleep;
        }
        let elapsed = started.elapsed();
        if elapsed >= fallback {
            return Settled::TimersOn;
        }
        if first == Some(ctx.id) && elapsed >= lease.saturating_mul(campaigns + 1) {
            campaigns += 1;
            if let Err(e) = raft.trigger().elect().await {
                tracing::debug!(group, error = %e, "campaign after the leader's loss failed");
            }
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

/// Stops `group` again with exactly the state it was woken from, if it still holds it (a
/// follower of the same leader and term, the same log): its leader answers again, so it
/// goes back to sleep rather than electing.
async fn sleep_again(ctx: &SettleCtx, group: GroupId, before: Stopped) -> bool {
    let outcome = ctx
        .groups
        .stop_if(group, |m| {
            let same = matches!(m.state, ServerState::Follower | ServerState::Learner)
                && m.current_term == before.term
                && m.last_log_index == before.last_log_id.map(|l| l.index)
                && m.last_applied == before.last_log_id;
            if same {
                Ok(before)
            } else {
                Err(())
            }
        })
        .await;
    matches!(outcome, StopOutcome::Stopped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn at_most_the_bound_settles_at_once_and_every_group_is_settled() {
        let queue = Arc::new(WakeQueue::new(4));
        let now = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(Mutex::new(Vec::new()));
        let settle = {
            let (now, most, done) = (Arc::clone(&now), Arc::clone(&most), Arc::clone(&done));
            move |g: GroupId, _peer: NodeId| {
                let (now, most, done) = (Arc::clone(&now), Arc::clone(&most), Arc::clone(&done));
                async move {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    done.lock().unwrap().push(g);
                }
            }
        };
        let task = tokio::spawn(drain(Arc::clone(&queue), settle));
        assert_eq!(queue.push(7, (1..=40).rev()), 40);
        assert_eq!(
            queue.push(7, [3, 5, 41]),
            1,
            "a queued group is queued once"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        let s = queue.stats();
        assert_eq!((s.queued, s.in_flight), (37, 4), "{s:?}");
        tokio::time::sleep(Duration::from_secs(10)).await;
        let s = queue.stats();
        assert_eq!((s.queued, s.in_flight, s.in_flight_max), (0, 0, 4), "{s:?}");
        assert_eq!(most.load(Ordering::SeqCst), 4);
        let done = done.lock().unwrap().clone();
        assert_eq!(done.len(), 41);
        assert_eq!(&done[..4], &[1, 2, 3, 4], "in group order");
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_answers_again_has_its_queued_groups_dropped() {
        let queue = Arc::new(WakeQueue::new(2));
        let settled = Arc::new(AtomicUsize::new(0));
        let settle = {
            let settled = Arc::clone(&settled);
            move |_g: GroupId, _peer: NodeId| {
                let settled = Arc::clone(&settled);
                async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    settled.fetch_add(1, Ordering::SeqCst);
                }
            }
        };
        let task = tokio::spawn(drain(Arc::clone(&queue), settle));
        queue.push(1, 0..10);
        queue.push(2, 10..15);
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Groups 0 and 1 settled, 2 and 3 settling: peer 1's other six are dropped.
        assert_eq!(queue.forget_peer(1), 6);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(settled.load(Ordering::SeqCst), 4 + 5);
        let s = queue.stats();
        assert_eq!((s.queued, s.dropped, s.started), (0, 6, 9), "{s:?}");
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_settle_that_never_ends_frees_its_slot_after_the_settle_bound() {
        let queue = Arc::new(WakeQueue::new(1));
        let task = tokio::spawn(drain(Arc::clone(&queue), |_g: GroupId, _p: NodeId| {
            std::future::pending::<()>()
        }));
        queue.push(1, [1, 2]);
        tokio::time::sleep(LOST_PEER_WAKE_SETTLE / 2).await;
        assert_eq!(queue.stats().queued, 1);
        tokio::time::sleep(LOST_PEER_WAKE_SETTLE).await;
        let s = queue.stats();
        assert_eq!((s.queued, s.in_flight, s.started), (0, 1, 2), "{s:?}");
        task.abort();
    }
}
