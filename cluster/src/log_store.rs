//! openraft's log storage (`RaftLogStorage` + `RaftLogReader`, storage-v2) on one
//! `entrepot_storage::Log`.
//!
//! Layout: every Raft entry is one record (flags [`RAFT_ENTRY_FLAG`], payload encoded by
//! `entry.rs`, which carries the entry's own log id). Records are dense and so are Raft
//! indexes, hence `raft index = record offset + bias` (`index_map.rs`). The bias is not
//! stored: it is read back from the records at open, and chosen by the first append while
//! the log is empty.
//!
//! Invariants:
//! * The record at offset `o` holds the index the map says; checked on every read.
//! * `append` reports an entry flushed (`LogFlushed`) only after the segment log's group
//!   commit made it durable, and in append order (one flusher task per store).
//! * The purge point is durable (`raft-state`) *before* any segment is deleted; entries at
//!   or below it are never returned, even while their segment still exists (the segment
//!   log purges whole segments only).
//! * A purge at or past the last entry empties the log (`truncate_from` its first offset),
//!   so the next append — at `purged + 1` — starts a new bias. A crash in between is
//!   repaired at open: a log whose every record is purged is emptied again.
//! * The vote is durable before `save_vote` returns.
//!
//! Does not: keep entries in memory (reads go to the mapping), or make `save_committed`
//! durable — the committed log id is a restart hint written without fsync; `read_committed`
//! returns it only if this log (or the purged prefix) still holds exactly that log id, and
//! ignores a hint a power cut damaged, so a lost, stale or torn hint costs re-application
//! time, never safety nor a start.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use entrepot_storage::{Durable, Log, LogConfig, StorageError};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{RaftLogReader, StorageIOError, Vote};
use tokio::sync::mpsc;

use crate::entry::{decode_entry, decode_log_id, entry_parts};
use crate::error::{raft_err, ClusterError, RaftStorageError, Result};
use crate::index_map::IndexMap;
use crate::state_file::{
    self, DurableState, COMMITTED_FILE, COMMITTED_MAGIC, STATE_FILE, STATE_MAGIC,
};
use crate::types::{Entry, LogId, NodeId, TypeConfig};

/// Record flags marking a Raft entry (the segment log gives callers the low 8 bits).
pub const RAFT_ENTRY_FLAG: u16 = 0x10;
/// Appends whose durability is awaited at once, per store, before `append` waits for room.
pub const FLUSH_QUEUE_MAX: usize = 1024;
/// Name of the segment-log directory inside the store's directory.
pub const LOG_DIR: &str = "log";

/// openraft's log storage for one Raft group, in a directory of its own.
pub struct LogStore {
    shared: Arc<Shared>,
    /// Hands (durability handle, callback) pairs to the flusher task, in append order.
    flusher: Option<mpsc::Sender<(Durable, LogFlushed<TypeConfig>)>>,
}

/// A read handle for openraft's replication tasks; shares the store's log.
#[derive(Clone)]
pub struct LogStoreReader {
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    log: Log,
    meta: Mutex<Meta>,
}

#[derive(Debug, Default)]
struct Meta {
    /// Offset ↔ Raft index of the records (one run in a real cluster).
    map: IndexMap,
    /// Log id of the last record, `None` while the log holds no record.
    last: Option<LogId>,
    durable: DurableState,
}

impl LogStore {
    /// Opens (or creates) the store in `dir`: the segment log in `dir/log`, the state
    /// files beside it. Repairs a purge that a crash interrupted.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<LogStore> {
        let dir = dir.as_ref().to_path_buf();
        let log = Log::open(dir.join(LOG_DIR), config)?;
        let durable = match state_file::read(&dir, STATE_FILE, STATE_MAGIC)? {
            Some(body) => DurableState::decode(body)?,
            None => DurableState::default(),
        };
        let (map, last) = read_map(&log)?;
        let mut meta = Meta { map, last, durable };
        if let (Some(purged), Some(last)) = (meta.durable.purged, meta.last) {
            if last.index <= purged.index {
                empty_log(&log, &mut meta)?;
            }
        }
        Ok(LogStore {
            shared: Arc::new(Shared {
                dir,
                log,
                meta: Mutex::new(meta),
            }),
            flusher: None,
        })
    }

    /// The segment log holding the entries (for metrics and tests).
    pub fn log(&self) -> &Log {
        &self.shared.log
    }

    fn append_one(&self, entry: &Entry) -> Result<Durable> {
        let mut meta = self.shared.lock()?;
        // Only the last record bounds the index: an entry at or below the purge point is
        // stored but never read back (openraft's suite does this; a real cluster does not).
        if let Some(last) = meta.last.filter(|l| entry.log_id.index <= l.index) {
            return Err(ClusterError::AppendOutOfOrder {
                last: last.index,
                got: entry.log_id.index,
            });
        }
        let (head, ops) = entry_parts(entry)?;
        let appended = match ops {
            Some(ops) => self
                .shared
                .log
                .append_parts(RAFT_ENTRY_FLAG, &[&head, ops])?,
            None => self.shared.log.append_parts(RAFT_ENTRY_FLAG, &[&head])?,
        };
        meta.map.push(appended.first, entry.log_id.index);
        meta.last = Some(entry.log_id);
        Ok(appended.durable)
    }

    fn truncate_since(&self, index: u64) -> Result<()> {
        let mut meta = self.shared.lock()?;
        let Some(offset) = meta.map.offset_of(index) else {
            return Ok(());
        };
        let log = &self.shared.log;
        if offset <= log.first_offset() {
            return empty_log(log, &mut meta);
        }
        log.truncate_from(offset)?;
        meta.map.truncate(offset);
        meta.last = Some(decode_log_id(log.read(offset - 1)?.payload)?);
        Ok(())
    }

    fn purge_upto(&self, log_id: LogId) -> Result<()> {
        let mut meta = self.shared.lock()?;
        if meta.durable.purged >= Some(log_id) {
            return Ok(());
        }
        let mut durable = meta.durable.clone();
        durable.purged = Some(log_id);
        state_file::write(
            &self.shared.dir,
            STATE_FILE,
            STATE_MAGIC,
            &durable.encode(),
            true,
        )?;
        meta.durable = durable;
        let Some(last) = meta.last else { return Ok(()) };
        let log = &self.shared.log;
        if log_id.index >= last.index {
            return empty_log(log, &mut meta);
        }
        if let Some(keep) = meta.map.offset_of(log_id.index + 1) {
            let first = log.purge_before(keep)?;
            meta.map.purge_before(first);
        }
        Ok(())
    }

    fn save_vote_durably(&self, vote: &Vote<NodeId>) -> Result<()> {
        let mut meta = self.shared.lock()?;
        let mut durable = meta.durable.clone();
        durable.vote = Some(*vote);
        state_file::write(
            &self.shared.dir,
            STATE_FILE,
            STATE_MAGIC,
            &durable.encode(),
            true,
        )?;
        meta.durable = durable;
        Ok(())
    }

    /// The committed hint, if this node still holds exactly that entry (or purged it).
    /// The hint is never synced, so a power cut may leave it damaged (empty, torn): that
    /// is no hint, not an error, or the node could not start again.
    fn committed_hint(&self) -> Result<Option<LogId>> {
        let body = match state_file::read(&self.shared.dir, COMMITTED_FILE, COMMITTED_MAGIC) {
            Ok(Some(body)) => body,
            Ok(None) => return Ok(None),
            Err(
                e @ (ClusterError::BadFile { .. }
                | ClusterError::UnsupportedVersion { .. }
                | ClusterError::LimitExceeded { .. }),
            ) => {
                tracing::warn!(error = %e, "ignoring the unsynced committed hint");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let mut d = crate::codec::Decoder::new(body, "raft-committed file");
        let Some(committed) = state_file::decode_opt_log_id(&mut d)? else {
            return Ok(None);
        };
        d.finish()?;
        let meta = self.shared.lock()?;
        if meta
            .durable
            .purged
            .is_some_and(|p| committed.index <= p.index)
        {
            return Ok(Some(committed));
        }
        drop(meta);
        let held = self.shared.entries(committed.index..=committed.index)?;
        Ok(held
            .first()
            .filter(|e| e.log_id == committed)
            .map(|e| e.log_id))
    }
}

impl Shared {
    fn lock(&self) -> Result<MutexGuard<'_, Meta>> {
        self.meta
            .lock()
            .map_err(|_| ClusterError::Storage(StorageError::Closed))
    }

    fn log_state(&self) -> Result<LogState<TypeConfig>> {
        let meta = self.lock()?;
        let purged = meta.durable.purged;
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: meta.last.max(purged),
        })
    }

    /// Entries with index in `range` that this log holds, in order. A concurrent
    /// truncation ends the list early instead of failing.
    fn entries<RB: RangeBounds<u64>>(&self, range: RB) -> Result<Vec<Entry>> {
        let (map, purged) = {
            let meta = self.lock()?;
            (meta.map.clone(), meta.durable.purged)
        };
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        }
        .max(purged.map_or(0, |p| p.index + 1));
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        let Some(offset) = map.offset_of(start) else {
            return Ok(Vec::new());
        };
        let mut reader = self.log.reader(offset.max(self.log.first_offset()));
        let mut out = Vec::new();
        loop {
            let offset = reader.offset();
            let Some(expected) = map.index_at(offset) else {
                break;
            };
            if expected >= end {
                break;
            }
            let record = match reader.next_record() {
                Ok(Some(record)) => record,
                Ok(None) | Err(StorageError::OffsetOutOfRange { .. }) => break,
                Err(e) => return Err(e.into()),
            };
            let entry = decode_entry(record.payload)?;
            if entry.log_id.index != expected {
                break; // truncated and re-appended under us; the caller asks again
            }
            out.push(entry);
        }
        Ok(out)
    }
}

/// Maps the records of `log` to Raft indexes: from its two ends when they agree with one
/// run (always, unless entries were appended with gaps), otherwise by a scan.
fn read_map(log: &Log) -> Result<(IndexMap, Option<LogId>)> {
    let (first, next) = (log.first_offset(), log.next_offset());
    if next <= first {
        return Ok((IndexMap::default(), None));
    }
    let head = decode_log_id(log.read(first)?.payload)?;
    let tail = decode_log_id(log.read(next - 1)?.payload)?;
    if tail.index.checked_sub(head.index) == Some(next - 1 - first) {
        return Ok((
            IndexMap::single_run(first, head.index, next - first),
            Some(tail),
        ));
    }
    let mut map = IndexMap::default();
    let mut last: Option<LogId> = None;
    let mut reader = log.reader(first);
    while let Some(record) = reader.next_record()? {
        let id = decode_log_id(record.payload)?;
        if last.is_some_and(|l| id.index <= l.index) {
            return Err(ClusterError::IndexMismatch {
                offset: record.offset,
                expected: last.map_or(0, |l| l.index + 1),
                found: id.index,
            });
        }
        map.push(record.offset, id.index);
        last = Some(id);
    }
    Ok((map, last))
}

/// Drops every record (all purged or all truncated); the next append starts a new run.
fn empty_log(log: &Log, meta: &mut Meta) -> Result<()> {
    log.truncate_from(log.first_offset())?;
    meta.map.clear();
    meta.last = None;
    Ok(())
}

async fn run_flusher(mut rx: mpsc::Receiver<(Durable, LogFlushed<TypeConfig>)>) {
    while let Some((durable, callback)) = rx.recv().await {
        let result = durable.wait().await.map_err(io::Error::other);
        callback.log_io_completed(result);
    }
}

impl RaftLogReader<TypeConfig> for LogStoreReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, RaftStorageError> {
        self.shared
            .entries(range)
            .map_err(raft_err(StorageIOError::read_logs))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, RaftStorageError> {
        self.shared
            .entries(range)
            .map_err(raft_err(StorageIOError::read_logs))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStoreReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, RaftStorageError> {
        self.shared
            .log_state()
            .map_err(raft_err(StorageIOError::read_logs))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        LogStoreReader {
            shared: Arc::clone(&self.shared),
        }
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), RaftStorageError> {
        self.save_vote_durably(vote)
            .map_err(raft_err(StorageIOError::write_vote))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, RaftStorageError> {
        let meta = self
            .shared
            .lock()
            .map_err(raft_err(StorageIOError::read_vote))?;
        Ok(meta.durable.vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), RaftStorageError> {
        let mut e = crate::codec::Encoder::default();
        state_file::encode_opt_log_id(&mut e, &committed);
        state_file::write(
            &self.shared.dir,
            COMMITTED_FILE,
            COMMITTED_MAGIC,
            &e.buf,
            false,
        )
        .map_err(raft_err(StorageIOError::write))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, RaftStorageError> {
        self.committed_hint()
            .map_err(raft_err(StorageIOError::read))
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
                .append_one(&entry)
                .map_err(raft_err(StorageIOError::write_logs))?;
            last = Some(durable);
        }
        let Some(durable) = last else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        let tx = self.flusher.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel(FLUSH_QUEUE_MAX);
            tokio::spawn(run_flusher(rx));
            tx
        });
        if let Err(mpsc::error::SendError((_, callback))) = tx.send((durable, callback)).await {
            callback.log_io_completed(Err(io::Error::other("log flusher stopped")));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        self.truncate_since(log_id.index)
            .map_err(raft_err(StorageIOError::write_logs))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        self.purge_upto(log_id)
            .map_err(raft_err(StorageIOError::write_logs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn config() -> LogConfig {
        LogConfig {
            segment_bytes: 64 * 1024,
            record_bytes_max: 32 * 1024,
            ..LogConfig::default()
        }
    }

    fn blank(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn big(term: u64, index: u64) -> Entry {
        let messages = vec![bytes::Bytes::from(vec![index as u8; 8 * 1024])];
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(crate::Request::Produce {
                address: "q".into(),
                messages,
            }),
        }
    }

    async fn append(store: &mut LogStore, entries: Vec<Entry>) {
        for e in &entries {
            let durable = store.append_one(e).unwrap();
            durable.wait().await.unwrap();
        }
    }

    async fn indexes(store: &mut LogStore) -> Vec<u64> {
        let entries = store.try_get_log_entries(..).await.unwrap();
        entries.iter().map(|e| e.log_id.index).collect()
    }

    #[tokio::test]
    async fn entries_vote_and_purge_point_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path(), config()).unwrap();
        append(&mut store, (1..=30).map(|i| big(1, i)).collect()).await;
        store.save_vote(&Vote::new_committed(2, 1)).await.unwrap();
        store
            .purge(LogId::new(CommittedLeaderId::new(1, 1), 20))
            .await
            .unwrap();
        assert!(
            store.log().first_offset() > 0,
            "whole segments below the purge point went"
        );
        store
            .truncate(LogId::new(CommittedLeaderId::new(1, 1), 26))
            .await
            .unwrap();
        drop(store);

        let mut store = LogStore::open(dir.path(), config()).unwrap();
        assert_eq!(
            store.read_vote().await.unwrap(),
            Some(Vote::new_committed(2, 1))
        );
        assert_eq!(indexes(&mut store).await, (21..=25).collect::<Vec<_>>());
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(20));
        assert_eq!(state.last_log_id.map(|l| l.index), Some(25));
        append(&mut store, vec![big(2, 26)]).await;
        assert_eq!(
            store.try_get_log_entries(26..27).await.unwrap()[0],
            big(2, 26)
        );
    }

    #[tokio::test]
    async fn a_purge_past_the_end_empties_the_log_and_the_next_append_follows_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path(), config()).unwrap();
        append(&mut store, (0..5).map(|i| blank(1, i)).collect()).await;
        store
            .purge(LogId::new(CommittedLeaderId::new(3, 1), 1000))
            .await
            .unwrap();
        assert!(indexes(&mut store).await.is_empty());
        append(&mut store, vec![blank(3, 1001), blank(3, 1002)]).await;
        drop(store);
        let mut store = LogStore::open(dir.path(), config()).unwrap();
        assert_eq!(indexes(&mut store).await, [1001, 1002]);
        assert!(matches!(
            store.append_one(&blank(3, 1002)),
            Err(ClusterError::AppendOutOfOrder {
                last: 1002,
                got: 1002
            })
        ));
    }

    #[tokio::test]
    async fn the_committed_hint_is_returned_only_while_the_log_holds_that_entry() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path(), config()).unwrap();
        append(&mut store, (0..5).map(|i| blank(1, i)).collect()).await;
        let committed = LogId::new(CommittedLeaderId::new(1, 1), 3);
        store.save_committed(Some(committed)).await.unwrap();
        assert_eq!(store.read_committed().await.unwrap(), Some(committed));
        store
            .truncate(LogId::new(CommittedLeaderId::new(1, 1), 3))
            .await
            .unwrap();
        append(&mut store, vec![blank(2, 3)]).await;
        assert_eq!(
            store.read_committed().await.unwrap(),
            None,
            "index 3 now holds another entry"
        );
    }

    #[tokio::test]
    async fn a_damaged_committed_hint_is_no_hint_and_the_store_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path(), config()).unwrap();
        append(&mut store, (0..3).map(|i| blank(1, i)).collect()).await;
        let committed = LogId::new(CommittedLeaderId::new(1, 1), 2);
        store.save_committed(Some(committed)).await.unwrap();
        drop(store);
        // What a power cut leaves of the unsynced hint: an empty file, or a torn one.
        let path = dir.path().join(COMMITTED_FILE);
        let whole = std::fs::read(&path).unwrap();
        for damaged in [Vec::new(), whole[..whole.len() - 3].to_vec()] {
            std::fs::write(&path, &damaged).unwrap();
            let mut store = LogStore::open(dir.path(), config()).unwrap();
            assert_eq!(store.read_committed().await.unwrap(), None);
            assert_eq!(indexes(&mut store).await, vec![0, 1, 2]);
        }
    }

    #[tokio::test]
    async fn an_appended_entry_is_durable_when_its_handle_completes() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), config()).unwrap();
        let durable = store.append_one(&blank(1, 0)).unwrap();
        let offset = durable.offset();
        durable.wait().await.unwrap();
        assert!(store.log().durable_offset() > offset);
    }
}
