//! One segment log per node, shared by every Raft group the node holds a replica of
//! (issue 12 step 4; raft-engine's design in TiKV). Each group sees its own openraft
//! `RaftLogStorage` + `RaftLogReader` ([`GroupLog`], `storage.rs`) over the shared log.
//!
//! Layout: every record names its group (`record.rs`, `cluster/FORMAT.md`): a Raft entry,
//! a truncation (a tombstone: other groups' records follow the removed suffix, so it
//! cannot be cut off), a purge point, a vote, or the group's removal. The node keeps, per
//! group, an index from Raft index to record offset and its small state (`group.rs`); it
//! is rebuilt by one scan of the log at open (`recovery.rs`).
//!
//! Invariants:
//! * One group commit for all groups: an append is reported flushed (`LogFlushed`) only
//!   after a sync of the node log covered it, by one flusher task per node, in append
//!   order per group. Threads per node do not grow with the groups: the segment log's sync
//!   and prefault threads, one tokio task.
//! * A vote, a truncation and a purge point are durable before the call returns.
//! * Entries at or below a group's purge point are never returned.
//! * A segment is deleted only when no group needs it: every group's oldest held entry
//!   is after it, and the vote and purge records of every group in it were written again
//!   further on (and synced) first — so recovery finds every group's latest state.
//! * A record that does not decode, or breaks its group's order, stops the open with a
//!   typed error naming its offset ([`ClusterError::NodeLogRecord`]); lengths and counts
//!   are bounded ([`MAX_GROUPS_PER_NODE`], [`MAX_INDEX_GAP`], the codecs' `MAX_*`).
//!
//! Memory per group: a `HashMap` slot with the group's state (≈ [`GROUP_STATE_BYTES`])
//! plus 8 bytes per entry held above its purge point (see `group.rs`).
//!
//! Does not (yet): rewrite *entries* forward. A group that lags in purging — an idle one
//! whose last snapshot is old, or one that never purges — pins every segment from its
//! oldest held entry on; rewriting those few entries forward, as raft-engine does, is a
//! later step. Nor does it keep the committed hint (`save_committed` is openraft's no-op):
//! one record per commit per group is not worth a shorter replay after a restart. Not
//! wired into the broker: it still runs one `LogStore` per node.

mod group;
mod record;
mod recovery;
mod storage;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use entrepot_storage::{Durable, Log, LogConfig, StorageError, SyncPolicy};
use openraft::storage::LogFlushed;
use openraft::Vote;
use tokio::sync::mpsc;

use crate::entry::entry_parts;
use crate::error::{ClusterError, Result};
use crate::placement::GroupId;
use crate::types::{Entry, LogId, NodeId, TypeConfig};
use group::GroupState;

pub use group::MAX_INDEX_GAP;
pub use record::{NODE_LOG_FLAG, NODE_RECORD_HEADER_LEN, NODE_RECORD_VERSION};
pub use storage::{GroupLog, GroupLogReader};

/// Most groups one node log holds; a log naming more is refused as corrupt.
pub const MAX_GROUPS_PER_NODE: usize = 1 << 16;
/// Appends whose durability is awaited at once, per node, before `append` waits for room.
pub const NODE_FLUSH_QUEUE_MAX: usize = 4096;
/// In-memory size of one group's state without its index, plus its `HashMap` slot.
pub const GROUP_STATE_BYTES: usize =
    std::mem::size_of::<GroupState>() + std::mem::size_of::<GroupId>();

type Flush = (Durable, LogFlushed<TypeConfig>);

/// A node's shared Raft log. Cheap to clone; clones share the log.
#[derive(Clone)]
pub struct NodeLog {
    shared: Arc<Shared>,
}

struct Shared {
    log: Log,
    /// One lock for every group: held while a record is appended and the group's index
    /// updated, so index order is log order (the segment log serializes appends anyway).
    groups: Mutex<HashMap<GroupId, GroupState>>,
    /// The node's one flusher task, started by the first append.
    flusher: Mutex<Option<mpsc::Sender<Flush>>>,
}

impl NodeLog {
    /// Opens (or creates) the node log in `dir` and rebuilds every group's state from it.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<NodeLog> {
        let log = Log::open(dir.as_ref(), config)?;
        let groups = recovery::recover(&log)?;
        Ok(NodeLog {
            shared: Arc::new(Shared {
                log,
                groups: Mutex::new(groups),
                flusher: Mutex::new(None),
            }),
        })
    }

    /// The storage of `group` on this node, created empty if the log holds nothing of it.
    /// openraft must own the only one per group.
    pub fn group(&self, group: GroupId) -> Result<GroupLog> {
        let mut groups = self.shared.lock()?;
        if !groups.contains_key(&group) {
            check_group_count(groups.len())?;
            groups.insert(group, GroupState::default());
        }
        Ok(GroupLog::new(self.clone(), group))
    }

    /// Drops `group` from this node (its replica moved away): a durable removal record,
    /// then its entries no longer keep segments.
    pub async fn remove_group(&self, group: GroupId) -> Result<()> {
        let durable = {
            let mut groups = self.shared.lock()?;
            if groups.remove(&group).is_none() {
                return Ok(());
            }
            let bytes = record::encode_remove(group);
            self.shared
                .log
                .append_parts(NODE_LOG_FLAG, &[&bytes])?
                .durable
        };
        durable.wait().await?;
        self.release_segments().await
    }

    /// Groups with state on this node, in no order.
    pub fn group_ids(&self) -> Result<Vec<GroupId>> {
        Ok(self.shared.lock()?.keys().copied().collect())
    }

    /// The segment log (metrics, tests).
    pub fn log(&self) -> &Log {
        &self.shared.log
    }

    /// Heap bytes of every group's index (what idle groups cost besides their state).
    pub fn index_heap_bytes(&self) -> Result<usize> {
        Ok(self
            .shared
            .lock()?
            .values()
            .map(GroupState::heap_bytes)
            .sum())
    }

    /// Appends one entry of `group` and returns its durability handle. openraft appends
    /// through [`GroupLog`]; this is for tools and tests that write a group's log directly.
    pub fn append_entry(&self, group: GroupId, entry: &Entry) -> Result<Durable> {
        let mut groups = self.shared.lock()?;
        let state = groups
            .get_mut(&group)
            .ok_or(ClusterError::UnknownGroup { group })?;
        state.check_push(entry.log_id)?;
        let header = record::entry_header(group);
        let (head, ops) = entry_parts(entry)?;
        let log = &self.shared.log;
        let appended = match ops {
            Some(ops) => log.append_parts(NODE_LOG_FLAG, &[&header, &head, ops])?,
            None => log.append_parts(NODE_LOG_FLAG, &[&header, &head])?,
        };
        state.push(appended.first, entry.log_id)?;
        Ok(appended.durable)
    }

    async fn truncate(&self, group: GroupId, since: u64) -> Result<()> {
        let durable = {
            let mut groups = self.shared.lock()?;
            let state = groups
                .get_mut(&group)
                .ok_or(ClusterError::UnknownGroup { group })?;
            if !state.holds_from(since) {
                return Ok(());
            }
            let bytes = record::encode_truncate(group, since);
            let appended = self.shared.log.append_parts(NODE_LOG_FLAG, &[&bytes])?;
            if let Some(offset) = state.truncate(since) {
                state.set_last(recovery::entry_log_id(&self.shared.log, offset, group)?);
            }
            appended.durable
        };
        Ok(durable.wait().await?)
    }

    async fn purge(&self, group: GroupId, id: LogId) -> Result<()> {
        let durable = {
            let mut groups = self.shared.lock()?;
            let state = groups
                .get_mut(&group)
                .ok_or(ClusterError::UnknownGroup { group })?;
            if state.purged >= Some(id) {
                return Ok(());
            }
            let bytes = record::encode_purge(group, &id);
            let appended = self.shared.log.append_parts(NODE_LOG_FLAG, &[&bytes])?;
            state.purge(id, appended.first);
            appended.durable
        };
        durable.wait().await?;
        self.release_segments().await
    }

    async fn save_vote(&self, group: GroupId, vote: &Vote<NodeId>) -> Result<()> {
        let durable = {
            let mut groups = self.shared.lock()?;
            let state = groups
                .get_mut(&group)
                .ok_or(ClusterError::UnknownGroup { group })?;
            let bytes = record::encode_vote(group, vote);
            let appended = self.shared.log.append_parts(NODE_LOG_FLAG, &[&bytes])?;
            state.set_vote(*vote, appended.first);
            appended.durable
        };
        Ok(durable.wait().await?)
    }

    /// Deletes the segments no group needs any more (see the module's invariants).
    async fn release_segments(&self) -> Result<()> {
        let log = &self.shared.log;
        let segments = log.segments();
        if segments.len() < 2 {
            return Ok(());
        }
        let (boundary, durable) = {
            let mut groups = self.shared.lock()?;
            let next = log.next_offset();
            let live = groups
                .values()
                .filter_map(GroupState::first_live_offset)
                .min()
                .unwrap_or(next);
            let Some(boundary) = segments
                .iter()
                .take_while(|s| s.sealed && s.next <= live)
                .last()
                .map(|s| s.next)
            else {
                return Ok(());
            };
            rewrite_state_below(log, &mut groups, boundary)?;
            let last = log.next_offset().saturating_sub(1);
            (boundary, Durable::watching(log.durable_watch(), last))
        };
        if log.config().sync != SyncPolicy::Never {
            durable.wait().await?;
        }
        log.purge_before(boundary)?;
        Ok(())
    }

    /// Hands an append's durability to the node's flusher, which calls back once synced.
    async fn report_flushed(&self, durable: Durable, callback: LogFlushed<TypeConfig>) {
        let tx = match self.flusher() {
            Ok(tx) => tx,
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e)));
                return;
            }
        };
        if let Err(mpsc::error::SendError((_, callback))) = tx.send((durable, callback)).await {
            callback.log_io_completed(Err(std::io::Error::other("node log flusher stopped")));
        }
    }

    fn flusher(&self) -> Result<mpsc::Sender<Flush>> {
        let mut slot = self
            .shared
            .flusher
            .lock()
            .map_err(|_| ClusterError::Storage(StorageError::Closed))?;
        if let Some(tx) = slot.as_ref().filter(|tx| !tx.is_closed()) {
            return Ok(tx.clone());
        }
        let (tx, rx) = mpsc::channel(NODE_FLUSH_QUEUE_MAX);
        tokio::spawn(run_flusher(rx));
        *slot = Some(tx.clone());
        Ok(tx)
    }
}

impl Shared {
    fn lock(&self) -> Result<MutexGuard<'_, HashMap<GroupId, GroupState>>> {
        self.groups
            .lock()
            .map_err(|_| ClusterError::Storage(StorageError::Closed))
    }
}

pub(crate) fn check_group_count(held: usize) -> Result<()> {
    if held >= MAX_GROUPS_PER_NODE {
        return Err(ClusterError::LimitExceeded {
            what: "raft groups in one node log",
            len: held as u64 + 1,
            max: MAX_GROUPS_PER_NODE as u64,
        });
    }
    Ok(())
}

/// Writes again, at the end of the log, every vote and purge record that lies below
/// `boundary` (whose segments are about to go), so recovery still finds them.
fn rewrite_state_below(
    log: &Log,
    groups: &mut HashMap<GroupId, GroupState>,
    boundary: u64,
) -> Result<()> {
    for (&group, state) in groups.iter_mut() {
        if let (Some(vote), Some(at)) = (state.vote, state.vote_at) {
            if at < boundary {
                let bytes = record::encode_vote(group, &vote);
                let appended = log.append_parts(NODE_LOG_FLAG, &[&bytes])?;
                state.vote_at = Some(appended.first);
            }
        }
        if let (Some(purged), Some(at)) = (state.purged, state.purge_at) {
            if at < boundary {
                let bytes = record::encode_purge(group, &purged);
                let appended = log.append_parts(NODE_LOG_FLAG, &[&bytes])?;
                state.purge_at = Some(appended.first);
            }
        }
    }
    Ok(())
}

/// The node's flusher: waits for each append's sync in the order appends were handed over
/// (the log's durable offset only grows, so one waiter serves every group).
async fn run_flusher(mut rx: mpsc::Receiver<Flush>) {
    while let Some((durable, callback)) = rx.recv().await {
        let result = durable.wait().await.map_err(std::io::Error::other);
        callback.log_io_completed(result);
    }
}
