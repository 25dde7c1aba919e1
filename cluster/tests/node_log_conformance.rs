//! Goal: one group's storage on a node log shared with other groups keeps openraft's
//! storage contract, while the other groups write to the same log between its calls.
//! Method: openraft's conformance suite (`openraft::testing::Suite::test_all`) on group 7
//! of a fresh node log per case (real files, 64 KiB segments — the storage crate's
//! minimum — so purges cross segment boundaries), once with fsync on every group commit and
//! once without. The storage handed to the suite is a wrapper that, before each append,
//! truncation, purge and vote of group 7, appends an entry of 1–3 KiB to group 8 (which
//! then purges all but its last two) and saves a vote of group 9: group 7's records are
//! never adjacent, and the other groups' votes and purge points sit in the segments
//! group 7's purges free, so they must be written again before those segments go. The
//! minimal state machine is the cluster tests' (`tests/support/machine.rs`).

// openraft's error types are large; these signatures are openraft's, not ours.
#![allow(clippy::result_large_err)]

mod support;

use std::fmt::Debug;
use std::ops::RangeBounds;

use bytes::Bytes;
use entrepot_cluster::{
    Entry, GroupLog, GroupLogReader, LogId, NodeId, NodeLog, RaftStorageError, Request, TypeConfig,
};
use entrepot_storage::{LogConfig, SyncPolicy};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{AnyError, CommittedLeaderId, EntryPayload, RaftLogReader, StorageIOError, Vote};
use support::MessageMachine;

/// The group the suite runs on, and the two that write around it.
const GROUP: u64 = 7;
const NEIGHBOUR_ENTRIES: u64 = 8;
const NEIGHBOUR_VOTES: u64 = 9;

/// Group 7's storage, with the neighbours' writes slipped in before each of its writes.
struct Interleaved {
    inner: GroupLog,
    node: NodeLog,
    neighbour_index: u64,
    neighbour_term: u64,
}

fn storage_err(e: impl std::fmt::Display) -> RaftStorageError {
    StorageIOError::write(AnyError::error(e.to_string())).into()
}

impl Interleaved {
    async fn neighbours_write(&mut self) -> Result<(), RaftStorageError> {
        self.neighbour_index += 1;
        self.neighbour_term += 1;
        let body =
            vec![self.neighbour_index as u8; 1024 + (self.neighbour_index % 3) as usize * 1024];
        let entry = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), self.neighbour_index),
            payload: EntryPayload::Normal(Request::Produce {
                address: "neighbour".into(),
                messages: vec![Bytes::from(body)],
            }),
        };
        let durable = self
            .node
            .append_entry(NEIGHBOUR_ENTRIES, &entry)
            .map_err(storage_err)?;
        durable.wait().await.map_err(storage_err)?;
        if self.neighbour_index > 2 {
            // Group 8 keeps its last two entries only: group 7's own purges free segments.
            let mut entries = self.node.group(NEIGHBOUR_ENTRIES).map_err(storage_err)?;
            let purged = self.neighbour_index - 2;
            entries
                .purge(LogId::new(CommittedLeaderId::new(1, 1), purged))
                .await?;
        }
        let mut votes = self.node.group(NEIGHBOUR_VOTES).map_err(storage_err)?;
        votes.save_vote(&Vote::new(self.neighbour_term, 2)).await
    }
}

impl RaftLogReader<TypeConfig> for Interleaved {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, RaftStorageError> {
        self.inner.try_get_log_entries(range).await
    }
}

impl RaftLogStorage<TypeConfig> for Interleaved {
    type LogReader = GroupLogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, RaftStorageError> {
        self.inner.get_log_state().await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.inner.get_log_reader().await
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), RaftStorageError> {
        self.neighbours_write().await?;
        self.inner.save_vote(vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, RaftStorageError> {
        self.inner.read_vote().await
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
        self.neighbours_write().await?;
        self.inner.append(entries, callback).await
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        self.neighbours_write().await?;
        self.inner.truncate(log_id).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        self.neighbours_write().await?;
        self.inner.purge(log_id).await
    }
}

struct SharedNodeLog {
    sync: SyncPolicy,
}

impl StoreBuilder<TypeConfig, Interleaved, MessageMachine, tempfile::TempDir> for SharedNodeLog {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, Interleaved, MessageMachine), RaftStorageError> {
        let dir = tempfile::tempdir().map_err(storage_err)?;
        let config = LogConfig {
            segment_bytes: entrepot_storage::MIN_SEGMENT_BYTES,
            record_bytes_max: 32 * 1024,
            sync: self.sync,
            ..LogConfig::default()
        };
        let node = NodeLog::open(dir.path(), config).map_err(storage_err)?;
        node.group(NEIGHBOUR_ENTRIES).map_err(storage_err)?;
        let mut store = Interleaved {
            inner: node.group(GROUP).map_err(storage_err)?,
            node,
            neighbour_index: 0,
            neighbour_term: 0,
        };
        // The log does not start with group 7's records.
        store.neighbours_write().await?;
        Ok((dir, store, MessageMachine::default()))
    }
}

#[test]
fn openraft_storage_suite_passes_on_a_group_of_a_shared_node_log_with_fsync(
) -> Result<(), RaftStorageError> {
    Suite::test_all(SharedNodeLog {
        sync: SyncPolicy::Always,
    })
}

#[test]
fn openraft_storage_suite_passes_on_a_group_of_a_shared_node_log_without_fsync(
) -> Result<(), RaftStorageError> {
    Suite::test_all(SharedNodeLog {
        sync: SyncPolicy::Never,
    })
}
