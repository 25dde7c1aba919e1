//! openraft's log storage (`RaftLogStorage` + `RaftLogReader`, storage-v2) of one group
//! on the node log: every call names the group and goes to the shared [`NodeLog`].
//!
//! Reads go to the segment log's mapping at the offsets the group's index gives, each
//! record checked to be an entry of this group at the expected index. Nothing of a group
//! is cached but that index.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use entrepot_storage::StorageError;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{RaftLogReader, StorageIOError, Vote};

use super::{record, NodeLog};
use crate::error::{raft_err, ClusterError, RaftStorageError, Result};
use crate::placement::GroupId;
use crate::types::{Entry, LogId, NodeId, TypeConfig};

/// openraft's log storage of one group, on its node's shared log.
pub struct GroupLog {
    node: NodeLog,
    group: GroupId,
}

/// A read handle for openraft's replication tasks of one group.
#[derive(Clone)]
pub struct GroupLogReader {
    node: NodeLog,
    group: GroupId,
}

impl GroupLog {
    pub(super) fn new(node: NodeLog, group: GroupId) -> GroupLog {
        GroupLog { node, group }
    }

    /// The group this storage is for.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// The node log it shares.
    pub fn node(&self) -> &NodeLog {
        &self.node
    }
}

impl NodeLog {
    pub(crate) fn log_state(&self, group: GroupId) -> Result<LogState<TypeConfig>> {
        let groups = self.shared.lock()?;
        let state = groups
            .get(&group)
            .ok_or(ClusterError::UnknownGroup { group })?;
        Ok(LogState {
            last_purged_log_id: state.purged,
            last_log_id: state.last.max(state.purged),
        })
    }

    pub(crate) fn vote(&self, group: GroupId) -> Result<Option<Vote<NodeId>>> {
        let groups = self.shared.lock()?;
        let state = groups
            .get(&group)
            .ok_or(ClusterError::UnknownGroup { group })?;
        Ok(state.vote)
    }

    /// Entries of `group` with index in `range`, in order. A segment deleted under the
    /// read (a concurrent purge) ends the list early instead of failing.
    pub(crate) fn entries<RB: RangeBounds<u64>>(
        &self,
        group: GroupId,
        range: RB,
    ) -> Result<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        let located = {
            let groups = self.shared.lock()?;
            let state = groups
                .get(&group)
                .ok_or(ClusterError::UnknownGroup { group })?;
            state.locate(start, end)
        };
        let mut out = Vec::with_capacity(located.len());
        for (index, offset) in located {
            let record = match self.shared.log.read(offset) {
                Ok(record) => record,
                Err(StorageError::OffsetOutOfRange { .. }) => break,
                Err(e) => return Err(e.into()),
            };
            let entry = record::decode_group_entry(record.payload, group)?;
            if entry.log_id.index != index {
                return Err(ClusterError::IndexMismatch {
                    offset,
                    expected: index,
                    found: entry.log_id.index,
                });
            }
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogReader<TypeConfig> for GroupLogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, RaftStorageError> {
        self.node
            .entries(self.group, range)
            .map_err(raft_err(StorageIOError::read_logs))
    }
}

impl RaftLogReader<TypeConfig> for GroupLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, RaftStorageError> {
        self.node
            .entries(self.group, range)
            .map_err(raft_err(StorageIOError::read_logs))
    }
}

impl RaftLogStorage<TypeConfig> for GroupLog {
    type LogReader = GroupLogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, RaftStorageError> {
        self.node
            .log_state(self.group)
            .map_err(raft_err(StorageIOError::read_logs))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        GroupLogReader {
            node: self.node.clone(),
            group: self.group,
        }
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), RaftStorageError> {
        self.node
            .save_vote(self.group, vote)
            .await
            .map_err(raft_err(StorageIOError::write_vote))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, RaftStorageError> {
        self.node
            .vote(self.group)
            .map_err(raft_err(StorageIOError::read_vote))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut last = None;
        for entry in entries {
            let durable = self
                .node
                .append_entry(self.group, &entry)
                .map_err(raft_err(StorageIOError::write_logs))?;
            last = Some(durable);
        }
        match last {
            None => callback.log_io_completed(Ok(())),
            Some(durable) => self.node.report_flushed(durable, callback).await,
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        self.node
            .truncate(self.group, log_id.index)
            .await
            .map_err(raft_err(StorageIOError::write_logs))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        self.node
            .purge(self.group, log_id)
            .await
            .map_err(raft_err(StorageIOError::write_logs))
    }
}
