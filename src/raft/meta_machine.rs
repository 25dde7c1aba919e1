//! The state machine of the metadata group, group 0 (issue 12, step 2 of "Where the
//! cluster goes next"): what is cluster-wide — the members, the placement of every
//! address on its group(s) and of every group on its replicas, the next group id.
//!
//! What it owns:
//! * **Members**: node id → its member address (what group memberships name, the
//!   inter-node port) and its AMQP address (what a client is redirected to).
//! * **Placement**: address → its groups, one per partition (1 today; partition `p` of
//!   an address is its `p`-th group); group → replicas, preferred leader, and its
//!   *founders* — the replica set it was declared with, which is the membership its
//!   first replica bootstraps it with (never changed: every replica that bootstraps a
//!   group uses the same set, which openraft allows). Replicas and preferred leaders come
//!   from `entrepot_cluster::placement`: a new group goes on the members holding the
//!   fewest replicas and is led by its replica leading the fewest groups (ties by node
//!   id), then [`balance_leaders`] evens the leaderships; a member joining or leaving
//!   runs [`rebalance`] over every group. Replicas per member and preferred leaderships
//!   per member stay within one of each other.
//! * **Group ids**: handed out in order from 1 ([`METADATA_GROUP`] is 0) and never
//!   reused, so a group id below `next_group` that no address holds was dropped.
//! * **The finalized metadata level** ([`MetaState::level`]): 1 until a
//!   [`MetaOp::FinalizeLevel`] raises it (never lowered), kept in snapshot version 3;
//!   while it is 1 the snapshot is written in the oldest version that holds the state (1,
//!   or 2 once a group is formed). At level 2 a node not yet a member joins only
//!   declaring a level at least the finalized one ([`MetaRefusal::LevelBelowFinalized`]).
//!   Who raises it, and why: `metadata_level.rs`.
//!
//! Invariants:
//! * Replicas applying the same proposals hold the same state: no clock, no randomness,
//!   no local state enters it (property-tested over random op sequences).
//! * A refused op (a typed [`MetaRefusal`]: a malformed body, a bound reached, an
//!   unknown address or member) changes nothing, on every replica alike; only a version
//!   or op kind this build does not know stops the group here ([`MetaMachineError`]),
//!   since applying past it would diverge.
//! * Every count is bounded by a named constant, on apply and when a snapshot is read.
//!
//! Does not: carry out the placement (the node-side opener opens, bootstraps and removes
//! groups, `group_opener.rs`; the balancer moves the replicas of existing groups and
//! makes group 0's voters follow the members, `balancer.rs`), or hold subscription
//! definitions or manifests yet (op kinds 5–8 are reserved for them,
//! [`codec::META_RESERVED_KINDS`]).

mod codec;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use entrepot_cluster::placement::{
    balance_leaders, rebalance, GroupId, Placement, Replicas, DEFAULT_REPLICATION_FACTOR,
};
use entrepot_cluster::{
    ClusterError, GroupError, GroupHandle, GroupMachine, Host, MachineError, NodeId, Position,
    METADATA_GROUP,
};
use tokio::sync::watch;

pub use codec::{
    encode_op, METADATA_LEVEL_FORMED, METADATA_LEVEL_MAX, METADATA_LEVEL_MIN, META_OPS_VERSION,
    META_RESERVED_KINDS, META_SNAPSHOT_VERSION,
};

/// Most members the cluster holds.
pub const MAX_MEMBERS: usize = 256;
/// Most addresses the metadata group places (a node hosts at most
/// `entrepot_cluster::MAX_HOSTED_GROUPS` groups).
pub const MAX_ADDRESSES: usize = 1 << 20;
/// Longest address name (the broker's own bound).
pub const MAX_ADDRESS_NAME_BYTES: usize = crate::broker::store::MAX_ADDRESS_LEN;
/// Longest member or AMQP address of a member.
pub const MAX_MEMBER_ADDR_BYTES: usize = 512;
/// Most partitions of one address: 1 until partitioned addresses are built (the format
/// has room for `u16::MAX`).
pub const MAX_PARTITIONS: usize = 1;
/// Most replicas of one group (a set is written with a `u8` count).
pub const MAX_REPLICAS: usize = 255;
/// Outcomes of the latest applied proposals kept for their proposers (not replicated
/// state: each node keeps what it applied).
pub const MAX_RECENT_OUTCOMES: usize = 4096;
/// Most groups one [`MetaOp::MarkFormed`] names (a leader marks what it leads in
/// batches of at most this many).
pub const MAX_FORMED_PER_OP: usize = 1024;

const _: () = assert!(MAX_MEMBER_ADDR_BYTES <= u16::MAX as usize);
const _: () = assert!(MAX_ADDRESS_NAME_BYTES <= u16::MAX as usize);
const _: () = assert!(DEFAULT_REPLICATION_FACTOR <= MAX_REPLICAS);
const _: () = assert!(MAX_ADDRESSES <= entrepot_cluster::MAX_HOSTED_GROUPS);

/// A member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its member address, as group memberships name it (the inter-node port first).
    pub peer: String,
    /// Where clients reach it over AMQP (`host:port`).
    pub amqp: String,
}

/// One change to the metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaOp {
    /// A node joins (idempotent with the same addresses); replicas are rebalanced.
    AddMember { node: NodeId, member: Member },
    /// A node leaves; its replicas are placed elsewhere.
    RemoveMember { node: NodeId },
    /// An address gets its group(s); declaring an existing address answers its group.
    DeclareAddress { name: String, partitions: u16 },
    /// An address and its groups go.
    DropAddress { name: String },
    /// These groups have formed: a leader of each was elected somewhere, so no replica
    /// may bootstrap one of them again (a replica placed on a node later waits for its
    /// leader's log). Ids no group holds (dropped since) are passed over. With no group,
    /// a *barrier*: its outcome, read where it was applied, shows that replica's state
    /// holds everything committed before it (how an opener makes sure its view is not
    /// older than its own restart before it bootstraps anything).
    MarkFormed { groups: Vec<GroupId> },
    /// A node joins declaring the highest metadata level its build supports (op kind 10,
    /// itself of level 2: proposed only once the cluster's level is finalized at 2, see
    /// `metadata_level.rs`). Refused, changing nothing, when that level is below the
    /// cluster's finalized level; otherwise as [`MetaOp::AddMember`].
    AddMemberAt {
        node: NodeId,
        member: Member,
        level: u8,
    },
    /// Every node holding group 0 supports metadata level `level` (op kind 11, proposed
    /// by group 0's leader once they all said so, `metadata_level.rs`): the finalized
    /// level rises to it (never falls). A replica whose build is below `level` stops.
    FinalizeLevel { level: u8 },
}

/// What an applied op did, for its proposer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaOutcome {
    /// A member op took effect (or changed nothing: it was already so).
    Members,
    /// The address's first group; `created` false when it existed already.
    Declared { group: GroupId, created: bool },
    /// The address's groups, now gone.
    Dropped { groups: Vec<GroupId> },
    /// How many of the named groups were not marked formed before.
    Formed { newly: usize },
    /// The finalized metadata level now.
    Finalized { level: u8 },
}

/// Why the metadata group refused an op: nothing changed, on any replica.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetaRefusal {
    #[error("malformed metadata op: {0}")]
    Malformed(&'static str),
    #[error("{what} of {len} bytes exceeds {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("empty {what}")]
    Empty { what: &'static str },
    #[error("the cluster has {max} members already")]
    TooManyMembers { max: usize },
    #[error("node {node} is a member with other addresses")]
    MemberConflict { node: NodeId },
    #[error("node {node} is not a member")]
    UnknownMember { node: NodeId },
    #[error("node {node} is the last member")]
    LastMember { node: NodeId },
    #[error("no members to place an address on")]
    NoMembers,
    #[error("{max} addresses are placed already")]
    TooManyAddresses { max: usize },
    #[error("{partitions} partitions asked, at most {max} supported")]
    Partitions { partitions: u16, max: usize },
    #[error("no address {name:?}")]
    UnknownAddress { name: String },
    #[error("{count} groups in one op, at most {max}")]
    TooManyGroups { count: usize, max: usize },
    /// A node not yet a member asked to join with a build below the cluster's finalized
    /// metadata level (an `AddMember`, op kind 1, declares no level: level 1): admitted,
    /// it would stop on the ops of that level in group 0's log (Kafka refuses a broker
    /// that does not support the finalized `metadata.version` the same way).
    #[error(
        "node {node} supports metadata level {level}, below the cluster's finalized level \
         {finalized}: upgrade it before it joins"
    )]
    LevelBelowFinalized {
        node: NodeId,
        level: u8,
        finalized: u8,
    },
}

/// Why this replica cannot follow the metadata group: it stops here.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetaMachineError {
    #[error("metadata op version {found} is not supported (this build writes {META_OPS_VERSION})")]
    UnsupportedOpVersion { found: u8 },
    #[error("metadata op kind {kind} is unknown to this build")]
    UnknownOpKind { kind: u8 },
    #[error("metadata snapshot version {found} is not supported (this build reads {META_SNAPSHOT_VERSION})")]
    UnsupportedSnapshotVersion { found: u8 },
    #[error("metadata snapshot: {what} {len} exceeds {max}")]
    SnapshotLimit {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("metadata snapshot malformed: {0}")]
    MalformedSnapshot(&'static str),
    #[error("metadata level {level} is above this build's ({max})")]
    UnsupportedLevel { level: u8, max: u8 },
}

/// What a proposer of a metadata op hears.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    /// This node does not lead group 0; propose at `leader` (its member address).
    #[error("the metadata group is not led here (leader: {leader:?} at {leader_addr:?})")]
    NotLeader {
        leader: Option<NodeId>,
        leader_addr: Option<String>,
    },
    #[error("refused: {0}")]
    Refused(#[from] MetaRefusal),
    /// No commit in time, the group stopped, …: see [`GroupError`].
    #[error(transparent)]
    Group(GroupError),
    /// Committed, but more than [`MAX_RECENT_OUTCOMES`] proposals applied since, so its
    /// outcome is no longer kept (read the state instead).
    #[error("the outcome of entry {index} slot {slot} is no longer kept")]
    OutcomeLost { index: u64, slot: u32 },
}

impl From<GroupError> for MetaError {
    fn from(e: GroupError) -> MetaError {
        match e {
            GroupError::NotLeader {
                leader,
                leader_addr,
                ..
            } => MetaError::NotLeader {
                leader,
                leader_addr,
            },
            e => MetaError::Group(e),
        }
    }
}

/// An address's groups, one per partition.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AddressEntry {
    groups: Vec<GroupId>,
}

/// Where one group lives, and what it was founded with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    /// The address the group holds (a partition of it).
    pub address: String,
    pub partition: u16,
    /// Its replicas now and its preferred leader.
    pub replicas: Replicas,
    /// The replica that bootstraps it (the preferred leader when it was declared).
    pub founder: NodeId,
    /// Its voters when declared: the membership it is bootstrapped with.
    pub founders: BTreeSet<NodeId>,
    /// A leader of it was elected somewhere ([`MetaOp::MarkFormed`]): never bootstrapped
    /// again, on any node.
    pub formed: bool,
}

/// An address as placed: its first group, partitions, replicas and preferred leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressPlacement {
    pub group: GroupId,
    pub partitions: u16,
    pub replicas: BTreeSet<NodeId>,
    pub leader: NodeId,
}

/// The replicated state (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaState {
    members: BTreeMap<NodeId, Member>,
    addresses: BTreeMap<String, AddressEntry>,
    groups: BTreeMap<GroupId, GroupEntry>,
    next_group: GroupId,
    replication: u8,
    /// The finalized metadata level: 1 until a [`MetaOp::FinalizeLevel`] raised it, read
    /// back from a version-3 snapshot (versions 1 and 2: level 1). Never falls: once
    /// the ops of a level may be in group 0's log, a node whose build is below it must
    /// not become a member (`metadata_level.rs`).
    level: u8,
}

impl Default for MetaState {
    fn default() -> Self {
        MetaState {
            members: BTreeMap::new(),
            addresses: BTreeMap::new(),
            groups: BTreeMap::new(),
            next_group: METADATA_GROUP + 1,
            replication: DEFAULT_REPLICATION_FACTOR as u8,
            level: METADATA_LEVEL_MIN,
        }
    }
}

impl MetaState {
    /// Applies `op`; a refusal leaves the state as it was.
    fn apply(&mut self, op: MetaOp) -> Result<MetaOutcome, MetaRefusal> {
        match op {
            MetaOp::AddMember { node, member } => self.add_member(node, member, None),
            MetaOp::AddMemberAt {
                node,
                member,
                level,
            } => self.add_member(node, member, Some(level)),
            MetaOp::FinalizeLevel { level } => {
                self.level = self.level.max(level);
                Ok(MetaOutcome::Finalized { level: self.level })
            }
            MetaOp::RemoveMember { node } => self.remove_member(node),
            MetaOp::DeclareAddress { name, partitions } => self.declare(name, partitions),
            MetaOp::DropAddress { name } => self.drop_address(&name),
            MetaOp::MarkFormed { groups } => Ok(self.mark_formed(&groups)),
        }
    }

    fn mark_formed(&mut self, groups: &[GroupId]) -> MetaOutcome {
        let mut newly = 0;
        for g in groups {
            if let Some(e) = self.groups.get_mut(g) {
                newly += usize::from(!e.formed);
                e.formed = true;
            }
        }
        MetaOutcome::Formed { newly }
    }

    /// `level`: what the joiner declared (`None`: an `AddMember`, level 1). A member
    /// already is not refused whatever it declares (a restarted member asks again at
    /// every start; a downgrade below the finalized level is not supported and not
    /// caught here).
    fn add_member(
        &mut self,
        node: NodeId,
        member: Member,
        level: Option<u8>,
    ) -> Result<MetaOutcome, MetaRefusal> {
        match self.members.get(&node) {
            Some(m) if *m == member => return Ok(MetaOutcome::Members),
            Some(_) => return Err(MetaRefusal::MemberConflict { node }),
            None if self.members.len() >= MAX_MEMBERS => {
                return Err(MetaRefusal::TooManyMembers { max: MAX_MEMBERS })
            }
            None => {}
        }
        let declared = level.unwrap_or(METADATA_LEVEL_MIN);
        if declared < self.level {
            return Err(MetaRefusal::LevelBelowFinalized {
                node,
                level: declared,
                finalized: self.level,
            });
        }
        self.members.insert(node, member);
        self.rebalance();
        Ok(MetaOutcome::Members)
    }

    /// The state once `node` left the members (`None`: the removal would be refused):
    /// where a draining node hands its leaderships over (`handover.rs`).
    pub fn after_removal(&self, node: NodeId) -> Option<MetaState> {
        let mut next = self.clone();
        next.remove_member(node).ok().map(|_| next)
    }

    fn remove_member(&mut self, node: NodeId) -> Result<MetaOutcome, MetaRefusal> {
        if !self.members.contains_key(&node) {
            return Err(MetaRefusal::UnknownMember { node });
        }
        if self.members.len() == 1 {
            return Err(MetaRefusal::LastMember { node });
        }
        self.members.remove(&node);
        self.rebalance();
        Ok(MetaOutcome::Members)
    }

    /// Every group's replicas and leader from [`rebalance`] over the members.
    fn rebalance(&mut self) {
        let members: BTreeSet<NodeId> = self.members.keys().copied().collect();
        let ids: BTreeSet<GroupId> = self.groups.keys().copied().collect();
        let placed = rebalance(
            &self.placement(),
            &members,
            &ids,
            usize::from(self.replication),
        );
        self.set_placement(placed);
    }

    fn placement(&self) -> Placement {
        self.groups
            .iter()
            .map(|(g, e)| (*g, e.replicas.clone()))
            .collect()
    }

    fn set_placement(&mut self, placement: Placement) {
        for (g, replicas) in placement {
            if let Some(e) = self.groups.get_mut(&g) {
                e.replicas = replicas;
            }
        }
    }

    fn declare(&mut self, name: String, partitions: u16) -> Result<MetaOutcome, MetaRefusal> {
        if let Some(a) = self.addresses.get(&name) {
            let group = a.groups.first().copied().unwrap_or_default();
            return Ok(MetaOutcome::Declared {
                group,
                created: false,
            });
        }
        if partitions == 0 || usize::from(partitions) > MAX_PARTITIONS {
            return Err(MetaRefusal::Partitions {
                partitions,
                max: MAX_PARTITIONS,
            });
        }
        if self.members.is_empty() {
            return Err(MetaRefusal::NoMembers);
        }
        if self.addresses.len() >= MAX_ADDRESSES {
            return Err(MetaRefusal::TooManyAddresses { max: MAX_ADDRESSES });
        }
        let first = self.next_group;
        let mut groups = Vec::new();
        for partition in 0..partitions {
            let group = self.next_group;
            self.next_group += 1;
            let replicas = self.place_new();
            let entry = GroupEntry {
                address: name.clone(),
                partition,
                founder: replicas.leader,
                founders: replicas.nodes.clone(),
                replicas,
                formed: false,
            };
            self.groups.insert(group, entry);
            groups.push(group);
        }
        self.addresses.insert(name, AddressEntry { groups });
        self.balance_leaders();
        Ok(MetaOutcome::Declared {
            group: first,
            created: true,
        })
    }

    /// A new group's replicas: the members holding the fewest replicas, led by the one of
    /// them leading the fewest groups (ties by node id) — what keeps a balanced placement
    /// balanced without moving any existing replica.
    fn place_new(&self) -> Replicas {
        let mut load: BTreeMap<NodeId, (usize, usize)> =
            self.members.keys().map(|n| (*n, (0, 0))).collect();
        for e in self.groups.values() {
            for n in &e.replicas.nodes {
                if let Some(l) = load.get_mut(n) {
                    l.0 += 1;
                }
            }
            if let Some(l) = load.get_mut(&e.replicas.leader) {
                l.1 += 1;
            }
        }
        let r = usize::from(self.replication).clamp(1, self.members.len().max(1));
        let mut by_replicas: Vec<(usize, NodeId)> =
            load.iter().map(|(n, (reps, _))| (*reps, *n)).collect();
        by_replicas.sort_unstable();
        let nodes: BTreeSet<NodeId> = by_replicas.iter().take(r).map(|(_, n)| *n).collect();
        let leader = nodes
            .iter()
            .min_by_key(|n| (load.get(n).map_or(0, |l| l.1), **n))
            .copied()
            .unwrap_or_default();
        Replicas { nodes, leader }
    }

    fn balance_leaders(&mut self) {
        let members: BTreeSet<NodeId> = self.members.keys().copied().collect();
        let mut placement = self.placement();
        balance_leaders(&mut placement, &members);
        self.set_placement(placement);
    }

    fn drop_address(&mut self, name: &str) -> Result<MetaOutcome, MetaRefusal> {
        let Some(a) = self.addresses.remove(name) else {
            return Err(MetaRefusal::UnknownAddress {
                name: name.to_owned(),
            });
        };
        for g in &a.groups {
            self.groups.remove(g);
        }
        self.balance_leaders();
        Ok(MetaOutcome::Dropped { groups: a.groups })
    }

    /// Where `name` is placed.
    pub fn address(&self, name: &str) -> Option<AddressPlacement> {
        let a = self.addresses.get(name)?;
        let group = *a.groups.first()?;
        let e = self.groups.get(&group)?;
        Some(AddressPlacement {
            group,
            partitions: a.groups.len() as u16,
            replicas: e.replicas.nodes.clone(),
            leader: e.replicas.leader,
        })
    }
}

/// What the machine holds: the state, and what only this replica knows.
#[derive(Debug, Default)]
struct Inner {
    /// Shared with readers ([`MetaMachine::state`]) and copied on write: an apply
    /// changes it in place unless a reader still holds the version it read, which it
    /// then copies once ([`Arc::make_mut`]).
    state: Arc<MetaState>,
    /// Outcomes of the latest proposals applied here, by position.
    outcomes: VecDeque<(Position, Result<MetaOutcome, MetaRefusal>)>,
    /// The entry after the last one applied (or restored).
    applied_end: u64,
}

/// The metadata group's machine; clones share it (the host applies to one, the opener
/// and proposers read another).
#[derive(Clone)]
pub struct MetaMachine {
    inner: Arc<Mutex<Inner>>,
    /// Bumped after every apply and restore: the opener follows it.
    changes: Arc<watch::Sender<u64>>,
}

impl Default for MetaMachine {
    fn default() -> Self {
        MetaMachine::new()
    }
}

impl MetaMachine {
    /// An empty state (no member, no address, next group 1).
    pub fn new() -> MetaMachine {
        MetaMachine {
            inner: Arc::default(),
            changes: Arc::new(watch::Sender::new(0)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means a panic elsewhere; the state is whole (apply
        // changes it only after checking).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A counter raised after each change of the state applied here.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The replicated state as it stands here: a shared version, not a copy (the
    /// machine's next apply copies it if it is still held then, so hold it for one
    /// round of work, not for ever).
    pub fn state(&self) -> Arc<MetaState> {
        Arc::clone(&self.lock().state)
    }

    /// The outcome of the proposal applied at `at`, while it is kept.
    pub fn outcome(&self, at: Position) -> Option<Result<MetaOutcome, MetaRefusal>> {
        let inner = self.lock();
        let i = inner.outcomes.partition_point(|(p, _)| *p < at);
        inner
            .outcomes
            .get(i)
            .filter(|(p, _)| *p == at)
            .map(|(_, o)| o.clone())
    }

    /// The members.
    pub fn members(&self) -> BTreeMap<NodeId, Member> {
        self.lock().state.members.clone()
    }

    /// Where `name` is placed.
    pub fn address(&self, name: &str) -> Option<AddressPlacement> {
        self.lock().state.address(name)
    }

    /// A group's entry.
    pub fn group(&self, group: GroupId) -> Option<GroupEntry> {
        self.lock().state.groups.get(&group).cloned()
    }

    /// Every group holding a replica on `node`.
    pub fn placed_on(&self, node: NodeId) -> BTreeMap<GroupId, GroupEntry> {
        let inner = self.lock();
        inner
            .state
            .groups
            .iter()
            .filter(|(_, e)| e.replicas.nodes.contains(&node))
            .map(|(g, e)| (*g, e.clone()))
            .collect()
    }

    /// Whether `group` was handed out, as far as this replica applied: a group id below
    /// this that no address holds was dropped, for good.
    pub fn next_group(&self) -> GroupId {
        self.lock().state.next_group
    }

    /// Every group's replicas and preferred leader.
    pub fn placement(&self) -> Placement {
        self.lock().state.placement()
    }

    /// The finalized metadata level as applied here ([`MetaState::level`]).
    pub fn level(&self) -> u8 {
        self.lock().state.level
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl MetaState {
    /// The members.
    pub fn members(&self) -> &BTreeMap<NodeId, Member> {
        &self.members
    }

    /// Every group and where it lives.
    pub fn groups(&self) -> &BTreeMap<GroupId, GroupEntry> {
        &self.groups
    }

    /// The next group id to be handed out.
    pub fn next_group(&self) -> GroupId {
        self.next_group
    }

    /// Replicas each group is placed on (fewer while the members are fewer).
    pub fn replication(&self) -> usize {
        usize::from(self.replication)
    }

    /// The finalized metadata level (see the field's docs).
    pub fn level(&self) -> u8 {
        self.level
    }
}

impl GroupMachine for MetaMachine {
    fn apply(&mut self, at: Position, payload: Bytes) -> Result<(), MachineError> {
        let op = codec::decode_op(payload).map_err(MachineError::new)?;
        {
            let mut inner = self.lock();
            let outcome = op.and_then(|op| Arc::make_mut(&mut inner.state).apply(op));
            if inner.outcomes.len() >= MAX_RECENT_OUTCOMES {
                inner.outcomes.pop_front();
            }
            inner.outcomes.push_back((at, outcome));
            inner.applied_end = at.index.saturating_add(1);
        }
        self.changed();
        Ok(())
    }

    fn snapshot(&self) -> Result<Bytes, MachineError> {
        Ok(codec::encode_snapshot(&self.lock().state))
    }

    fn restore(&mut self, last_index: u64, state: Bytes) -> Result<(), MachineError> {
        let state = codec::decode_snapshot(state).map_err(MachineError::new)?;
        {
            let mut inner = self.lock();
            inner.state = Arc::new(state);
            inner.outcomes.clear();
            inner.applied_end = last_index.saturating_add(1);
        }
        self.changed();
        Ok(())
    }

    fn lowest_needed(&self) -> u64 {
        // The state is whole in the snapshot: no entry is read back.
        self.lock().applied_end
    }
}

/// The name a barrier declares ([`barrier_op`]); an address of that name may exist.
pub const BARRIER_ADDRESS: &str = "entrepot.metadata-barrier";

/// A *barrier*: an op that changes nothing on any replica of any build since session 12
/// — a declare of zero partitions answers an existing address's group and is refused
/// (`Partitions`) for any other — so its outcome, read where it was applied, only shows
/// that this replica holds everything committed before it. Of metadata level 1: passed
/// at any level (session 19's barrier, an empty mark, is op kind 9, level 2).
pub fn barrier_op() -> MetaOp {
    MetaOp::DeclareAddress {
        name: BARRIER_ADDRESS.to_owned(),
        partitions: 0,
    }
}

/// The op that asks group 0 to take `node` (its build at metadata level `level`) as a
/// member, the cluster's level being `finalized` as far as the proposer knows: an
/// `AddMember` (kind 1, what every build reads) at level 1, an `AddMemberAt` (kind 10)
/// from level 2 on. A proposer that knows the level too low sends kind 1 and is refused
/// as a level-1 joiner would be.
pub fn join_op(node: NodeId, member: Member, level: u8, finalized: u8) -> MetaOp {
    if finalized >= METADATA_LEVEL_FORMED {
        MetaOp::AddMemberAt {
            node,
            member,
            level,
        }
    } else {
        MetaOp::AddMember { node, member }
    }
}

/// Proposes metadata ops through this node's replica of group 0 and tells their outcome.
#[derive(Clone)]
pub struct MetaGroup {
    pub handle: GroupHandle,
    pub machine: MetaMachine,
}

impl MetaGroup {
    /// Opens this node's replica of group 0 on `host` with a new machine (the host
    /// restores it from the group's snapshot, then re-applies its log).
    pub async fn open(host: &Host) -> Result<MetaGroup, ClusterError> {
        let machine = MetaMachine::new();
        let handle = host.open_group(METADATA_GROUP, machine.clone()).await?;
        Ok(MetaGroup { handle, machine })
    }

    /// Proposes `op` (this node must lead group 0) and waits for its outcome.
    pub async fn run(&self, op: &MetaOp) -> Result<MetaOutcome, MetaError> {
        let payload = encode_op(op)?;
        let at = self.handle.propose(payload).await?;
        match self.machine.outcome(at) {
            Some(outcome) => Ok(outcome?),
            None => Err(MetaError::OutcomeLost {
                index: at.index,
                slot: at.slot,
            }),
        }
    }

    /// [`Self::run`] from any node: proposed here when this node leads group 0, else
    /// forwarded to its leader over the peer connection
    /// (`GroupHandle::propose_anywhere`); the outcome is read from this node's machine
    /// once it has applied the position the leader answered (within the host's propose
    /// timeout). `run` itself stays leader-only (`MetaError::NotLeader`), which the
    /// balancer relies on.
    pub async fn run_anywhere(&self, op: &MetaOp) -> Result<MetaOutcome, MetaError> {
        let payload = encode_op(op)?;
        let at = self.handle.propose_anywhere(payload).await?;
        let mut applied = self.handle.applied();
        let reached = applied.wait_for(|a| a.is_some_and(|a| a >= at.index));
        match tokio::time::timeout(entrepot_cluster::host::PROPOSE_TIMEOUT, reached).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => {
                return Err(MetaError::Group(GroupError::Timeout {
                    group: METADATA_GROUP,
                    after: entrepot_cluster::host::PROPOSE_TIMEOUT,
                }))
            }
        }
        match self.machine.outcome(at) {
            Some(outcome) => Ok(outcome?),
            None => Err(MetaError::OutcomeLost {
                index: at.index,
                slot: at.slot,
            }),
        }
    }

    /// Proposes `op` from a node that may know no leader of group 0 yet (a node
    /// joining): `GroupHandle::propose_via` the `seeds` (member addresses). The outcome
    /// cannot be read here until this replica receives the log; the caller watches the
    /// state instead.
    pub async fn propose_via(
        &self,
        seeds: &[(NodeId, String)],
        op: &MetaOp,
    ) -> Result<Position, MetaError> {
        let payload = encode_op(op)?;
        Ok(self.handle.propose_via(seeds, payload).await?)
    }

    /// [`Self::declare_address`] from any node ([`Self::run_anywhere`]).
    /// A declare whose forward got no answer (`GroupError::Forward`: a pooled
    /// connection to a leader that just died) is sent again, once: a declare is
    /// idempotent (a repeat answers the existing group).
    pub async fn declare_address_anywhere(&self, name: &str) -> Result<GroupId, MetaError> {
        let op = MetaOp::DeclareAddress {
            name: name.to_owned(),
            partitions: 1,
        };
        let outcome = match self.run_anywhere(&op).await {
            Err(MetaError::Group(GroupError::Forward { .. })) => self.run_anywhere(&op).await,
            other => other,
        };
        match outcome? {
            MetaOutcome::Declared { group, .. } => Ok(group),
            _ => Err(MetaRefusal::Malformed("a declare answered something else").into()),
        }
    }

    /// Declares `name` (one partition) and answers its group; an existing address
    /// answers the group it has.
    pub async fn declare_address(&self, name: &str) -> Result<GroupId, MetaError> {
        let op = MetaOp::DeclareAddress {
            name: name.to_owned(),
            partitions: 1,
        };
        match self.run(&op).await? {
            MetaOutcome::Declared { group, .. } => Ok(group),
            _ => Err(MetaRefusal::Malformed("a declare answered something else").into()),
        }
    }

    /// Drops `name`; its groups.
    pub async fn drop_address(&self, name: &str) -> Result<Vec<GroupId>, MetaError> {
        let op = MetaOp::DropAddress {
            name: name.to_owned(),
        };
        match self.run(&op).await? {
            MetaOutcome::Dropped { groups } => Ok(groups),
            _ => Err(MetaRefusal::Malformed("a drop answered something else").into()),
        }
    }

    /// Adds `node`, a node of this build ([`METADATA_LEVEL_MAX`]), as a member.
    pub async fn add_member(&self, node: NodeId, member: Member) -> Result<(), MetaError> {
        self.add_member_at(node, member, METADATA_LEVEL_MAX).await
    }

    /// Adds `node`, whose build supports metadata level `level`, as a member: as an
    /// `AddMember` (kind 1) while this replica's level is 1, else as an `AddMemberAt`
    /// (kind 10, refused when `level` is below the finalized level).
    pub async fn add_member_at(
        &self,
        node: NodeId,
        member: Member,
        level: u8,
    ) -> Result<(), MetaError> {
        let seen = self.machine.level();
        let op = join_op(node, member.clone(), level, seen);
        match self.run(&op).await {
            Err(MetaError::Refused(MetaRefusal::LevelBelowFinalized { .. }))
                if self.machine.level() > seen =>
            {
                // The level rose between this replica's look and the add's commit: asked
                // again at the level it rose to.
                let op = join_op(node, member, level, self.machine.level());
                self.run(&op).await.map(|_| ())
            }
            other => other.map(|_| ()),
        }
    }

    /// Removes `node`.
    pub async fn remove_member(&self, node: NodeId) -> Result<(), MetaError> {
        self.run(&MetaOp::RemoveMember { node }).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests;
