//! The node side of the placement (issue 12, step 4.3 of "Where the cluster goes next"):
//! one [`GroupOpener`] per node follows the metadata group's applied state
//! ([`MetaMachine`]) and makes the node's open address groups match it.
//!
//! What it owns, on its node:
//! * **Opening.** Every group the placement puts a replica of on this node is opened on
//!   the host with a fresh [`AddressMachine`] (restored by the host from the group's
//!   snapshot and log after a restart) and announced as [`GroupEvent::Opened`] with its
//!   `(address, GroupHandle, AddressMachine)` — what a leadership driver takes.
//! * **Forming.** A new group (no log here, no voters known) is bootstrapped by its
//!   *founder* — the preferred leader it was declared with — with its *founders* (the
//!   replica set it was declared with, fixed in the metadata), so the founder is also its
//!   first leader. If the founder never does it (it crashed before, or runs no opener),
//!   every other founding replica bootstraps it with the same set after
//!   [`OpenerConfig::bootstrap_fallback_after`]: openraft allows several nodes to
//!   initialize with an *identical* membership (the vote decides), never with different
//!   ones — which is why the set is the founders', not today's replicas. A group with a
//!   log here is never bootstrapped again (a restart reopens it as it was), and neither
//!   is a replica a *move* brings here ([`Tracked::moved_in`]: the group was seen placed
//!   without this node, or removed from it, since the opener started), even on a
//!   founder: the group formed elsewhere and moved on, and a second bootstrap — found in
//!   session 17's elasticity run, where 4 → 3 moved replicas back onto their founders —
//!   made that empty replica campaign with the founders' membership, pushed the group's
//!   term up (3 → 11 in a second) and deposed its leader each time, while the router
//!   there held attaches "electing a leader". What the opener saw is in memory only, so
//!   the metadata keeps it too: the leader of a group marks it *formed* in group 0 as
//!   soon as its opener sees it lead ([`MetaOp::MarkFormed`], batched), the balancer
//!   moves no replica of a group before that mark, and no replica ever bootstraps a
//!   group marked formed. A restarted node's metadata can be older than its restart
//!   (group 0 applies its log again only once it hears the commit index), so before its
//!   first bootstrap an opener passes a *barrier*: a no-op proposed at group 0's
//!   leader and awaited until applied here; the groups are looked at again after it.
//!   (Session 19: a founder restarted while its group moved back onto it used to
//!   bootstrap its empty replica.) Marks are metadata level 2 ops (kind 9): while the
//!   cluster's finalized level (or this node's `--metadata-level-max`) is 1, the opener
//!   proposes none and no group is ever formed, as before session 19 — the protection
//!   is off until every member runs a level-2 build (`metadata_level.rs`). The barrier
//!   is a level-1 op ([`barrier_op`]: session 19 used an empty mark), so it is passed at
//!   any level — a node restarted on a view from before the level rose to 2 catches up
//!   with the level and the marks before its first bootstrap.
//! * **Removing.** A group whose id the metadata handed out but no address holds any
//!   more (dropped; ids are never reused) is removed from the host — stopped, a removal
//!   record in the node log, its snapshot deleted — and announced as
//!   [`GroupEvent::Closed`]; a group left in the node log from before a restart is
//!   removed the same way. A group id at or above the metadata's `next_group` is one
//!   this replica of group 0 has not applied yet (a restart replays it): left alone.
//! * **Leaders spread**, mostly without campaigns: a group forms led by its founder (its
//!   preferred leader when declared), and a restarted former leader comes back leading
//!   (openraft 0.9 restores its committed vote as leader). Where this node is a group's
//!   preferred leader and another node leads it (it was away, or the preference moved),
//!   the opener campaigns for it ([`GroupHandle::campaign`]) at most once per
//!   [`OpenerConfig::campaign_backoff`], [`MAX_CAMPAIGNS_PER_ROUND`] groups at a time and
//!   [`MAX_CAMPAIGNS_PER_GROUP`] times per group. Best effort: the other voters refuse
//!   the vote while their leader lease runs, the campaign makes the old leader step
//!   down, and the next election goes to whichever timer fires first — often the old
//!   leader's, which has no lease to wait out (in one run of four, 20 campaigns in a row
//!   lost). Making the old leader stand aside (`elect(false)` for a while) was tried and
//!   left a group leaderless for tens of seconds; openraft 0.10's `transfer_leader` is
//!   the real answer.
//!
//! **When it looks** (`rounds.rs`): a round visits every group placed here, so it runs on
//! a change — group 0 applied something, a group here opened, closed, or saw its
//! leadership or membership change — and, while a bootstrap fallback, a campaign backoff
//! or a removal waits or a step failed, every [`OpenerConfig::round`]; otherwise only
//! every [`OpenerConfig::safety_net`]. Rounds begin at least
//! [`OpenerConfig::round_gap`] apart. The metadata's state is read as a shared version
//! ([`MetaMachine::state`]), never copied whole.
//!
//! Invariants: it never removes a group the metadata still places here, nor one it has
//! not seen handed out; it bootstraps only with the founders' membership, only a group
//! not marked formed, and only after a barrier showed its metadata current.
//!
//! Does not: move replicas of an existing group after a member change (the
//! [`super::balancer::Balancer`] on the group's leader does: learner, catch-up, joint
//! change; a group placed elsewhere stays open here until a *committed* membership no
//! longer names this node as a voter, then is removed), activate queues
//! (the leadership driver does, from the events), or open group 0 (the caller does,
//! [`super::meta_machine::MetaGroup::open`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use entrepot_cluster::placement::GroupId;
use entrepot_cluster::{GroupHandle, Host, NodeId, METADATA_GROUP};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::address_machine::AddressMachine;
use super::meta_machine::{
    barrier_op, GroupEntry, MetaError, MetaGroup, MetaMachine, MetaOp, MetaOutcome, MetaState,
    MAX_FORMED_PER_OP, METADATA_LEVEL_FORMED, METADATA_LEVEL_MAX,
};
use super::rounds::Rounds;

/// Events the opener may have queued for a slow reader before it waits for room.
pub const MAX_PENDING_EVENTS: usize = 1024;
/// Most campaigns one round of the opener starts.
pub const MAX_CAMPAIGNS_PER_ROUND: usize = 4;
/// Most campaigns for one group while it stays open here: each costs the group an
/// election, and on a healthy group of three openraft 0.9 often hands the leadership
/// back to the old leader (see the module docs), so the opener gives up rather than
/// disrupt the group every backoff for ever.
pub const MAX_CAMPAIGNS_PER_GROUP: u32 = 5;
/// Default: how soon the opener looks again while a bootstrap fallback or a campaign
/// waits on its delay, or a step failed (otherwise it looks on a change: `rounds.rs`).
pub const OPENER_ROUND: Duration = Duration::from_millis(250);
/// Default: how long the founding replicas other than the founder wait before they
/// bootstrap a group that has not formed.
pub const BOOTSTRAP_FALLBACK_AFTER: Duration = Duration::from_secs(5);
/// Default: the least time between two campaigns for one group.
pub const CAMPAIGN_BACKOFF: Duration = Duration::from_secs(2);

/// Whether `node`, the preferred leader of a group placed on `placed`, should campaign
/// for it now that its replica shows `status`:
/// * only against a known leader (during an election the vote decides anyway);
/// * only as a voter (a new replica is a learner until the balancer's move makes it one);
/// * only once the group's membership *is* its placement, no learner in it: while a move
///   is under way its leader is changing the membership (learner, catch-up, joint
///   change, maybe removing itself), and a campaign then makes that leader step down
///   mid-move (the move fails and is retried) and costs the group one more election
///   right before the one the move itself may cause — three leaders in two seconds,
///   each a detach of the group's links (found by the groups-mode elasticity run: a
///   producer without progress for 3.5 s during a join).
fn campaign_is_due(
    node: NodeId,
    placed: &BTreeSet<NodeId>,
    status: &entrepot_cluster::host::GroupStatus,
) -> bool {
    let l = status.leadership;
    !l.leads
        && l.leader.is_some()
        && status.voters.contains(&node)
        && status.voters == *placed
        && status.learners.is_empty()
}

/// How an opener runs.
#[derive(Debug, Clone)]
pub struct OpenerConfig {
    /// Look again this soon while something waits on a delay (a bootstrap fallback, a
    /// campaign's backoff, a group awaiting its removal) or a step failed.
    pub round: Duration,
    /// Look again at the latest this long after the last round when nothing changed
    /// ([`super::rounds::SAFETY_NET`]).
    pub safety_net: Duration,
    /// The least time between two rounds ([`super::rounds::ROUND_GAP_MIN`]).
    pub round_gap: Duration,
    /// See [`BOOTSTRAP_FALLBACK_AFTER`]; measure it against the election timeout: a
    /// founder that is merely slow loses nothing when others bootstrap too.
    pub bootstrap_fallback_after: Duration,
    /// See [`CAMPAIGN_BACKOFF`]; several election timeouts.
    pub campaign_backoff: Duration,
    /// Campaign for the groups this node should lead (off: leaders stay where the
    /// elections put them).
    pub spread_leaders: bool,
    /// The highest metadata level this node runs at (`--metadata-level-max`,
    /// [`METADATA_LEVEL_MAX`] by default): marks (op kind 9, level 2) are proposed only
    /// while both it and the cluster's finalized level are at least 2
    /// (`metadata_level.rs`).
    pub metadata_level_max: u8,
}

impl Default for OpenerConfig {
    fn default() -> Self {
        OpenerConfig {
            round: OPENER_ROUND,
            safety_net: super::rounds::SAFETY_NET,
            round_gap: super::rounds::ROUND_GAP_MIN,
            bootstrap_fallback_after: BOOTSTRAP_FALLBACK_AFTER,
            campaign_backoff: CAMPAIGN_BACKOFF,
            spread_leaders: true,
            metadata_level_max: METADATA_LEVEL_MAX,
        }
    }
}

/// One address group open on this node: what a leadership driver takes.
#[derive(Clone)]
pub struct OpenedGroup {
    pub address: String,
    pub group: GroupId,
    pub handle: GroupHandle,
    pub machine: AddressMachine,
}

/// What the opener did to the node's groups.
pub enum GroupEvent {
    /// The group is open here (its leadership is the handle's watch).
    Opened(OpenedGroup),
    /// The group is no longer open here (dropped, or moved away): drop its queue.
    Closed { address: String, group: GroupId },
}

/// What the opener did, for operators and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenerCounters {
    pub opened: u64,
    pub removed: u64,
    /// Bootstraps this node started (as founder or as fallback).
    pub bootstraps: u64,
    /// Groups this node marked formed in the metadata (it led them first).
    pub marked_formed: u64,
    pub campaigns: u64,
    /// Opens, bootstraps, removals or campaigns that failed (retried next round).
    pub failures: u64,
}

#[derive(Default)]
struct Shared {
    opened: Mutex<BTreeMap<GroupId, OpenedGroup>>,
    opens: AtomicU64,
    removed: AtomicU64,
    bootstraps: AtomicU64,
    marked_formed: AtomicU64,
    campaigns: AtomicU64,
    failures: AtomicU64,
    /// No campaign while set ([`GroupOpener::hold_campaigns`]).
    campaigns_held: AtomicBool,
    /// Set once a barrier through group 0 applied here: this node's metadata holds
    /// everything committed before the opener started (see [`Opener::form`]).
    current: AtomicBool,
    /// A barrier or a mark is on its way through group 0 (one at a time each).
    barrier_in_flight: AtomicBool,
    mark_in_flight: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<GroupId, OpenedGroup>> {
        self.opened.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The node's opener (see the module docs). Dropping it leaves its task running until
/// [`GroupOpener::stop`]; groups stay open on the host either way.
pub struct GroupOpener {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl GroupOpener {
    /// Starts following `meta` (this node's replica of group 0) on `host`; the events
    /// go to the returned receiver (dropping it is allowed: events are then discarded).
    pub fn start(
        host: Host,
        meta: MetaMachine,
        config: OpenerConfig,
    ) -> (GroupOpener, mpsc::Receiver<GroupEvent>) {
        let (events, receiver) = mpsc::channel(MAX_PENDING_EVENTS);
        let shared = Arc::new(Shared::default());
        let (stop, stopped) = watch::channel(false);
        let opener = Opener {
            node: host.node(),
            host,
            meta,
            config,
            shared: Arc::clone(&shared),
            events,
            groups: HashMap::new(),
            recovered: BTreeSet::new(),
            seen_elsewhere: HashSet::new(),
            waiting: false,
        };
        let task = tokio::spawn(opener.run(stopped));
        (GroupOpener { shared, stop, task }, receiver)
    }

    /// The groups open through this opener.
    pub fn opened(&self) -> BTreeMap<GroupId, OpenedGroup> {
        self.shared.lock().clone()
    }

    /// One open group.
    pub fn get(&self, group: GroupId) -> Option<OpenedGroup> {
        self.shared.lock().get(&group).cloned()
    }

    pub fn counters(&self) -> OpenerCounters {
        let s = &self.shared;
        OpenerCounters {
            opened: s.opens.load(Ordering::Relaxed),
            removed: s.removed.load(Ordering::Relaxed),
            bootstraps: s.bootstraps.load(Ordering::Relaxed),
            marked_formed: s.marked_formed.load(Ordering::Relaxed),
            campaigns: s.campaigns.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
        }
    }

    /// Holds (or resumes) this node's campaigns: while it hands its leaderships over
    /// (a drain, a stop) it must not campaign for its preferred groups right back.
    pub fn hold_campaigns(&self, held: bool) {
        self.shared.campaigns_held.store(held, Ordering::Relaxed);
    }

    /// Whether this node's campaigns are held ([`Self::hold_campaigns`]).
    pub fn campaigns_held(&self) -> bool {
        self.shared.campaigns_held.load(Ordering::Relaxed)
    }

    /// Stops following the metadata (the groups stay open on the host).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// What the opener keeps about a group it opened.
struct Tracked {
    opened_at: Instant,
    /// The node log holds state of it here (an entry or a vote): no bootstrap needed.
    formed: bool,
    last_bootstrap: Option<Instant>,
    last_campaign: Option<Instant>,
    campaigns: u32,
    /// Placed here by a move (seen placed elsewhere, or removed from here, before): the
    /// group formed elsewhere, so this replica never bootstraps it — it waits for the
    /// leader's log.
    moved_in: bool,
}

struct Opener {
    node: NodeId,
    host: Host,
    meta: MetaMachine,
    config: OpenerConfig,
    shared: Arc<Shared>,
    events: mpsc::Sender<GroupEvent>,
    groups: HashMap<GroupId, Tracked>,
    /// Groups the node log held at the start, not opened (yet).
    recovered: BTreeSet<GroupId>,
    /// Groups seen placed without this node, or removed from it, since the opener
    /// started: a replica opened here later is a move's (see [`Tracked::moved_in`]).
    seen_elsewhere: HashSet<GroupId>,
    /// This round left something waiting on a delay, or a step failed.
    waiting: bool,
}

impl Opener {
    async fn run(mut self, mut stopped: watch::Receiver<bool>) {
        match self.host.recovered_groups() {
            Ok(ids) => self.recovered = ids.into_iter().collect(),
            Err(e) => tracing::warn!(error = %e, "group opener: reading the recovered groups"),
        }
        self.recovered.remove(&METADATA_GROUP);
        let mut rounds = Rounds::new(
            &self.meta,
            &self.host,
            self.config.safety_net,
            self.config.round_gap,
        );
        loop {
            rounds.begin();
            let waiting = self.round().await;
            let due = waiting.then(|| Instant::now() + self.config.round);
            tokio::select! {
                _ = rounds.wait(due) => {}
                _ = stopped.changed() => return,
            }
            if *stopped.borrow() {
                return;
            }
        }
    }

    /// One look at every group placed here; true when something waits on a delay or
    /// failed (the next round comes after [`OpenerConfig::round`], not on a change).
    ///
    /// The metadata's state is held only between awaits: an apply while it is held
    /// copies it ([`MetaMachine::state`]).
    async fn round(&mut self) -> bool {
        self.waiting = false;
        let (opening, gone) = {
            let state = self.meta.state();
            let node = self.node;
            let mut opening: Vec<(GroupId, GroupEntry)> = Vec::new();
            for (g, e) in state.groups() {
                if !e.replicas.nodes.contains(&node) {
                    self.seen_elsewhere.insert(*g);
                } else if !self.groups.contains_key(g) {
                    opening.push((*g, e.clone()));
                }
            }
            // Dropped groups' ids are never handed out again: forget them once they
            // outnumber the live ones (the set stays under twice the group count).
            if self.seen_elsewhere.len() > state.groups().len() {
                self.seen_elsewhere
                    .retain(|g| state.groups().contains_key(g));
            }
            let (gone, staying): (Vec<GroupId>, Vec<GroupId>) = self
                .groups
                .keys()
                .chain(self.recovered.iter())
                .copied()
                .filter(|g| placed_here(&state, *g, node).is_none())
                .partition(|g| self.may_remove(&state, *g));
            // A group open here and moved away waits for the membership leaving this
            // node out to commit (its apply here raises the host's changes; looked at
            // again on a delay as well, as before rounds ran on changes).
            self.waiting |= staying
                .iter()
                .any(|g| *g < state.next_group() && self.groups.contains_key(g));
            (opening, gone)
        };
        for (group, entry) in &opening {
            self.open(*group, entry).await;
        }
        for group in gone {
            self.remove(group).await;
        }
        if !self.shared.current.load(Ordering::Acquire) {
            // Passed once, as early as group 0 answers, so that a group declared later
            // is bootstrapped the moment it opens here (see `form`).
            self.barrier();
            self.waiting = true;
        }
        if self.marks() {
            self.mark_formed();
        }
        self.form().await;
        if self.config.spread_leaders {
            self.campaign().await;
        }
        self.waiting
    }

    /// Whether `group`, not placed here, may go: dropped (handed out, held by no
    /// address), or moved away and no longer a voter here in a committed membership.
    fn may_remove(&self, state: &MetaState, group: GroupId) -> bool {
        if group >= state.next_group() {
            return false;
        }
        if !state.groups().contains_key(&group) {
            return true;
        }
        let Some(handle) = self.host.group(group) else {
            return false;
        };
        // Only once the membership that leaves this node out is committed (known here:
        // the balancer keeps a removed voter as a learner until it is): a change that
        // could still be undone may need this replica's vote and log again.
        let s = handle.status();
        let committed = s.membership_index.is_some_and(|i| s.committed >= Some(i));
        committed && !s.voters.is_empty() && !s.voters.contains(&self.node)
    }

    async fn open(&mut self, group: GroupId, entry: &GroupEntry) {
        let machine = AddressMachine::new();
        let handle = match self.host.open_group(group, machine.clone()).await {
            Ok(handle) => handle,
            Err(e) => {
                self.failed(group, "opening", &e);
                return;
            }
        };
        self.recovered.remove(&group);
        self.groups.insert(
            group,
            Tracked {
                opened_at: Instant::now(),
                formed: false,
                last_bootstrap: None,
                last_campaign: None,
                campaigns: 0,
                moved_in: self.seen_elsewhere.contains(&group),
            },
        );
        let opened = OpenedGroup {
            address: entry.address.clone(),
            group,
            handle,
            machine,
        };
        self.shared.lock().insert(group, opened.clone());
        self.shared.opens.fetch_add(1, Ordering::Relaxed);
        // A reader that went away does not stop the opener.
        let _ = self.events.send(GroupEvent::Opened(opened)).await;
    }

    async fn remove(&mut self, group: GroupId) {
        if let Err(e) = self.host.remove_group(group).await {
            self.failed(group, "removing", &e);
            return;
        }
        self.recovered.remove(&group);
        self.groups.remove(&group);
        self.seen_elsewhere.insert(group);
        let opened = self.shared.lock().remove(&group);
        self.shared.removed.fetch_add(1, Ordering::Relaxed);
        if let Some(o) = opened {
            let closed = GroupEvent::Closed {
                address: o.address,
                group,
            };
            let _ = self.events.send(closed).await;
        }
    }

    /// Bootstraps the groups that have not formed here: the founder at once, the other
    /// founders after the fallback delay (and again after each further delay).
    async fn form(&mut self) {
        let state = self.meta.state();
        let now = Instant::now();
        let fallback = self.config.bootstrap_fallback_after;
        let node = self.node;
        let mut due = Vec::new();
        let mut waiting = false;
        for (group, t) in self.groups.iter_mut().filter(|(_, t)| !t.formed) {
            let Some(entry) = placed_here(&state, *group, node) else {
                continue;
            };
            // Not formed yet: a founder's fallback runs on a delay, and a new replica
            // is formed when its leader's log reaches it.
            waiting = true;
            let Some(handle) = self.host.group(*group) else {
                continue;
            };
            match handle.is_pristine() {
                Ok(true) => {}
                Ok(false) => {
                    t.formed = true;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(group, error = %e, "group opener: reading the group's log");
                    continue;
                }
            }
            if t.moved_in || entry.formed {
                // Formed elsewhere: bootstrapping it here would start a second
                // membership's campaigns against the group's leader.
                continue;
            }
            let founder = entry.founder == node;
            let waited = now.duration_since(t.last_bootstrap.unwrap_or(t.opened_at));
            let first = t.last_bootstrap.is_none();
            if (founder && first) || (entry.founders.contains(&node) && waited >= fallback) {
                due.push((*group, handle, entry.founders.clone()));
            }
        }
        self.waiting |= waiting;
        if due.is_empty() {
            return;
        }
        if !self.shared.current.load(Ordering::Acquire) {
            // This node's metadata may be older than its own restart (group 0 applies
            // its log again only once it hears the commit index): in such a view a
            // group that formed, moved away and came back looks new. Nothing is
            // bootstrapped before a barrier shows the view current; then the groups
            // are looked at again.
            drop(state);
            self.barrier();
            return;
        }
        let members = state.members().clone();
        drop(state);
        for (group, _, _) in &due {
            if let Some(t) = self.groups.get_mut(group) {
                t.last_bootstrap = Some(now);
            }
        }
        for (group, handle, founders) in due {
            let addrs: BTreeMap<NodeId, String> = founders
                .iter()
                .filter_map(|n| members.get(n).map(|m| (*n, m.peer.clone())))
                .collect();
            if addrs.len() != founders.len() {
                // A founder left the members: its address is gone, the identical
                // membership cannot be written.
                tracing::warn!(group, "group opener: a founder is no longer a member");
                continue;
            }
            self.shared.bootstraps.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = handle.bootstrap(&addrs).await {
                self.failed(group, "bootstrapping", &e);
            }
        }
    }

    /// Campaigns for the groups this node should lead and does not.
    async fn campaign(&mut self) {
        if self.shared.campaigns_held.load(Ordering::Relaxed) {
            return;
        }
        let state = self.meta.state();
        let now = Instant::now();
        let backoff = self.config.campaign_backoff;
        let node = self.node;
        let mut due = Vec::new();
        let mut waiting = false;
        for (group, t) in self.groups.iter_mut() {
            let Some(entry) = placed_here(&state, *group, node) else {
                continue;
            };
            if entry.replicas.leader != node || !t.formed || t.campaigns >= MAX_CAMPAIGNS_PER_GROUP
            {
                continue;
            }
            let recent = t
                .last_campaign
                .is_some_and(|at| now.duration_since(at) < backoff);
            if recent || due.len() >= MAX_CAMPAIGNS_PER_ROUND {
                // Whether it still should campaign is seen once the backoff ends (or the
                // next round, for one past this round's bound).
                waiting = waiting || !self_leads(&self.host, *group);
                continue;
            }
            let Some(handle) = self.host.group(*group) else {
                continue;
            };
            if !campaign_is_due(self.node, &entry.replicas.nodes, &handle.status()) {
                continue;
            }
            t.last_campaign = Some(now);
            t.campaigns += 1;
            due.push((*group, handle));
        }
        self.waiting |= waiting || !due.is_empty();
        drop(state);
        for (group, handle) in due {
            self.shared.campaigns.fetch_add(1, Ordering::Relaxed);
            // With a leader known, ask it to hand the group over (it stops its writes
            // and this node wins at once); a campaign would depose it even when lost,
            // since this replica's log is behind under traffic. In a task: the answer
            // takes a round trip or more, the opener's round must not wait for it.
            if handle.leadership().borrow().leader.is_some() {
                tokio::spawn(async move {
                    if let Err(why) = handle.ask_hand_over().await {
                        tracing::info!(group, %why, "group opener: the leader did not hand the group over");
                    }
                });
            } else if let Err(e) = handle.campaign().await {
                self.failed(group, "campaigning for", &e);
            }
        }
    }

    /// Starts a barrier through group 0 ([`barrier_op`], proposed at
    /// its leader and awaited until applied here) unless one is on its way; on success
    /// this node's view of the metadata is current from then on.
    fn barrier(&mut self) {
        if self.shared.barrier_in_flight.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(meta) = self.meta_group() else {
            self.shared
                .barrier_in_flight
                .store(false, Ordering::Release);
            return;
        };
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            match meta.run_anywhere(&barrier_op()).await {
                // Applied here either way: a refusal is an outcome too.
                Ok(_) | Err(MetaError::Refused(_)) => shared.current.store(true, Ordering::Release),
                Err(e) => {
                    shared.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(error = %e, "group opener: the barrier through the metadata group failed; bootstraps wait");
                }
            }
            shared.barrier_in_flight.store(false, Ordering::Release);
        });
    }

    /// Marks the groups this node leads and the metadata does not yet know formed
    /// ([`MetaOp::MarkFormed`], at most [`MAX_FORMED_PER_OP`] at a time, one mark on
    /// its way at a time, in a task: a group 0 without a leader must not hold the
    /// round up).
    fn mark_formed(&mut self) {
        let unmarked: Vec<GroupId> = {
            let state = self.meta.state();
            self.groups
                .keys()
                .filter(|g| state.groups().get(g).is_some_and(|e| !e.formed))
                .filter(|g| self_leads(&self.host, **g))
                .take(MAX_FORMED_PER_OP)
                .copied()
                .collect()
        };
        if unmarked.is_empty() {
            return;
        }
        // Looked at again after the mark applied (an apply of group 0 is a change) or
        // failed.
        self.waiting = true;
        if self.shared.mark_in_flight.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(meta) = self.meta_group() else {
            self.shared.mark_in_flight.store(false, Ordering::Release);
            return;
        };
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            let op = MetaOp::MarkFormed { groups: unmarked };
            match meta.run_anywhere(&op).await {
                Ok(MetaOutcome::Formed { newly }) => {
                    shared
                        .marked_formed
                        .fetch_add(newly as u64, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => {
                    shared.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(error = %e, "group opener: marking groups formed failed; tried again");
                }
            }
            shared.mark_in_flight.store(false, Ordering::Release);
        });
    }

    /// Whether this node proposes marks (op kind 9): only at metadata level 2, the
    /// cluster's finalized level and this node's own (`metadata_level.rs`); below it a
    /// member's build may not know the kind.
    fn marks(&self) -> bool {
        self.meta.level().min(self.config.metadata_level_max) >= METADATA_LEVEL_FORMED
    }

    /// This node's replica of group 0 as a proposer (`None` before it is open).
    fn meta_group(&self) -> Option<MetaGroup> {
        let handle = self.host.group(METADATA_GROUP)?;
        Some(MetaGroup {
            handle,
            machine: self.meta.clone(),
        })
    }

    fn failed(&mut self, group: GroupId, verb: &str, e: &dyn std::fmt::Display) {
        self.waiting = true;
        self.shared.failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(group, error = %e, "group opener: {verb} the group failed");
    }
}

/// `group`'s entry when the placement puts a replica of it on `node`.
fn placed_here(state: &MetaState, group: GroupId, node: NodeId) -> Option<&GroupEntry> {
    state
        .groups()
        .get(&group)
        .filter(|e| e.replicas.nodes.contains(&node))
}

/// Whether this node leads `group` (false when it is not open here).
fn self_leads(host: &Host, group: GroupId) -> bool {
    host.group(group)
        .is_some_and(|h| h.leadership().borrow().leads)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use entrepot_cluster::host::{GroupStatus, Leadership};

    use super::campaign_is_due;

    fn status(leader: Option<u64>, leads: bool, voters: &[u64], learners: &[u64]) -> GroupStatus {
        GroupStatus {
            leadership: Leadership {
                leader,
                term: 3,
                leads,
            },
            voters: voters.iter().copied().collect(),
            learners: learners.iter().copied().collect(),
            ..GroupStatus::default()
        }
    }

    #[test]
    fn the_preferred_leader_campaigns_only_once_the_membership_is_its_placement() {
        let placed: BTreeSet<u64> = [0, 2, 3].into();
        // Settled on the placement, led by another voter: campaign.
        assert!(campaign_is_due(
            3,
            &placed,
            &status(Some(0), false, &[0, 2, 3], &[])
        ));
        // A move under way: the leader (1) is replacing itself by 3, whose replica is
        // already a voter of the joint membership; or 3 is still a learner.
        assert!(!campaign_is_due(
            3,
            &placed,
            &status(Some(1), false, &[0, 1, 2, 3], &[])
        ));
        assert!(!campaign_is_due(
            3,
            &placed,
            &status(Some(1), false, &[0, 1, 2], &[3])
        ));
        // The voters are the placement but a learner is still being caught up.
        assert!(!campaign_is_due(
            3,
            &placed,
            &status(Some(0), false, &[0, 2, 3], &[4])
        ));
        // Already leading, no known leader (an election), not a voter.
        assert!(!campaign_is_due(
            3,
            &placed,
            &status(Some(3), true, &[0, 2, 3], &[])
        ));
        assert!(!campaign_is_due(
            3,
            &placed,
            &status(None, false, &[0, 2, 3], &[])
        ));
        let elsewhere: BTreeSet<u64> = [0, 1, 2].into();
        assert!(!campaign_is_due(
            3,
            &elsewhere,
            &status(Some(0), false, &[0, 1, 2], &[])
        ));
    }
}
