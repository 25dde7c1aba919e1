//! The Raft groups this node hosts: [`GroupRegistry`], by [`GroupId`], what the peer
//! server (`peer_server.rs`) dispatches every inbound RPC to.
//!
//! A group is added when its `Raft` has started on this node and removed before (or when)
//! it stops; both can happen at any time while the server runs. Lookups take a read lock
//! held only to clone the handle, never across an `await`, so adding or removing a group
//! never waits on an RPC in progress, and an RPC already dispatched to a removed group
//! finishes on the handle it holds.
//!
//! Invariants:
//! * At most [`MAX_HOSTED_GROUPS`] groups; adding one more is `LimitExceeded`.
//! * Each group has its own [`HeardCommit`]: the leader's commit index heard by *that*
//!   group's replica (readiness compares it with that group's applied index).
//!
//! Does not: create, start or stop a `Raft` (its owner does), or decide placement
//! (`placement.rs`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::Raft;

use crate::error::{ClusterError, Result};
use crate::placement::GroupId;
use crate::types::TypeConfig;

/// The metadata group (members, placement): the one a node's membership requests
/// (`KIND_JOIN`, `KIND_LEAVE`) address, and today's broker's only group.
pub const METADATA_GROUP: GroupId = 0;
/// Most Raft groups one node hosts (issue 12 aims at thousands of addresses per node).
pub const MAX_HOSTED_GROUPS: usize = 1 << 20;

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

/// One hosted group: its Raft handle and what the peer server heard for it.
#[derive(Clone)]
pub(crate) struct HostedGroup {
    pub raft: Raft<TypeConfig>,
    pub heard_commit: HeardCommit,
}

/// The groups of this node; clones share one registry.
#[derive(Clone, Default)]
pub struct GroupRegistry {
    groups: Arc<RwLock<HashMap<GroupId, HostedGroup>>>,
}

impl std::fmt::Debug for GroupRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupRegistry")
            .field("groups", &self.len())
            .finish()
    }
}

impl GroupRegistry {
    pub fn new() -> GroupRegistry {
        GroupRegistry::default()
    }

    /// Serves `raft` as group `group` from now on (replacing a previous handle of the same
    /// group); returns the group's [`HeardCommit`].
    pub fn insert(&self, group: GroupId, raft: Raft<TypeConfig>) -> Result<HeardCommit> {
        let mut groups = self.write();
        if !groups.contains_key(&group) && groups.len() >= MAX_HOSTED_GROUPS {
            return Err(ClusterError::LimitExceeded {
                what: "hosted Raft groups (MAX_HOSTED_GROUPS)",
                len: groups.len() as u64 + 1,
                max: MAX_HOSTED_GROUPS as u64,
            });
        }
        let heard_commit = HeardCommit::default();
        let hosted = HostedGroup {
            raft,
            heard_commit: heard_commit.clone(),
        };
        groups.insert(group, hosted);
        Ok(heard_commit)
    }

    /// Stops serving `group`: its RPCs are refused as an unknown group from now on.
    pub fn remove(&self, group: GroupId) -> Option<Raft<TypeConfig>> {
        self.write().remove(&group).map(|g| g.raft)
    }

    /// The Raft handle of `group`, if hosted.
    pub fn raft(&self, group: GroupId) -> Option<Raft<TypeConfig>> {
        self.get(group).map(|g| g.raft)
    }

    /// What the peer server heard for `group`, if hosted.
    pub fn heard_commit(&self, group: GroupId) -> Option<HeardCommit> {
        self.get(group).map(|g| g.heard_commit)
    }

    /// How many groups are hosted.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn get(&self, group: GroupId) -> Option<HostedGroup> {
        self.read().get(&group).cloned()
    }

    // A poisoned lock only means a panic elsewhere while holding it; the map itself is
    // always whole (every write is one insert or remove).
    fn read(&self) -> RwLockReadGuard<'_, HashMap<GroupId, HostedGroup>> {
        self.groups.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<GroupId, HostedGroup>> {
        self.groups.write().unwrap_or_else(|e| e.into_inner())
    }
}
