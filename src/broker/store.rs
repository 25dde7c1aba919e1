//! The broker's message store: the messages of every queue in one shared segment log, so
//! one group-commit fsync covers all queues, and consumer acknowledgements in one ack log.
//!
//! A queue is not a file: it is the set of records in the shared log that carry its name
//! and are not yet acknowledged. Recovery replays the log once, skipping acknowledged
//! offsets, and hands each queue its messages in offset order. A sealed segment is
//! deleted once every record in it is acknowledged.
//!
//! In a cluster ([`Store::replicated`]) every change is also queued for Raft (see
//! `replication.rs`), and "durable" means "committed by a majority": the durability handles
//! and [`Store::durable_watch`] follow the committed watch instead of the local fsync.
//!
//! Out of space (single node): the message log is opened with a free-space reserve
//! ([`ack_reserve_bytes`]: [`ACK_RESERVE_SEGMENTS`] ack-log segments plus
//! [`RESERVE_MARGIN_BYTES`]), so producers are refused while the ack log — whose records
//! are what frees space — can still get its segments. An acknowledgement the ack log
//! cannot record is an error to the caller (and counted), never a silent success. Either
//! refusal raises the store's out-of-space alarm ([`Store::out_of_space`], `/readyz`),
//! which [`Store::check_space`] clears once a new message segment fits again.
//!
//! A committed transaction's messages are one batch of consecutive records
//! ([`Store::append_txn_batch`], kind [`KIND_TXN_MESSAGE`]); recovery shows a batch only
//! when it finds all of it, so a crash in the middle of a commit leaves none of it.
//!
//! Invariant: a record's bytes after the store header are the AMQP message exactly as the
//! producer sent it; the store never re-encodes a message.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use entrepot_storage::{
    AckLog, Appended, Durable, DurableState, Log, LogConfig, Result as StorageResult, StorageError,
    SyncPolicy, ACK_SEGMENT_BYTES,
};
use tokio::sync::watch;

use super::replication::{self, Replication};

/// Version byte of the message record format.
pub const RECORD_VERSION: u8 = 1;
/// Kind byte of a message record.
pub const KIND_MESSAGE: u8 = 1;
/// Longest address (queue name) the store accepts, in bytes.
pub const MAX_ADDRESS_LEN: usize = 1024;

/// Ack-log segments the message log leaves room for on its file system. Between two
/// snapshots (every 50,000 records of ~31 bytes, ~1.5 MB) the ack log grows by at most
/// one 8 MiB segment, and a snapshot (≤ 4 MiB) may need one more before the purge frees
/// the old ones: two suffice, the third is headroom.
pub const ACK_RESERVE_SEGMENTS: u64 = 3;
/// Reserve beyond the ack log's segments: index files written when segments are sealed,
/// the subscription registry, a new ack-log directory entry.
pub const RESERVE_MARGIN_BYTES: u64 = 1024 * 1024;
/// Fully acknowledged segment files each of the store's logs keeps for its next segment
/// (`LogConfig::recycle_segments`): a queue that keeps up with its producers frees a
/// segment about as often as it fills one, and the next then reuses written blocks and
/// resident pages instead of a new file (`storage/src/prepare.rs`). One segment of disk
/// per log is held for it. Single-node stores only (`Store::open`): a cluster node's store
/// (`Store::open_parts`) does not recycle yet — the groups-mode elasticity test stalled
/// 2.05 s (limit 2) in one of three CI runs with it, not understood (session 21).
pub const RECYCLE_SEGMENTS: usize = 1;

/// Free bytes a new message-log segment must leave (see the module docs): 25 MiB with the
/// default 128 MiB segments (8 MiB ack segments), 1.75 MiB with 256 KiB segments.
pub const fn ack_reserve_bytes(segment_bytes: u64) -> u64 {
    let ack_segment = if segment_bytes < ACK_SEGMENT_BYTES {
        segment_bytes
    } else {
        ACK_SEGMENT_BYTES
    };
    ACK_RESERVE_SEGMENTS * ack_segment + RESERVE_MARGIN_BYTES
}

const _: () = assert!(ack_reserve_bytes(entrepot_storage::DEFAULT_SEGMENT_BYTES) == 25 << 20);

// Format (message record payload, v1): { version: u8 = 1 | kind: u8 = 1 | address_len: u16 LE | address: [u8; address_len] (UTF-8) | message: AMQP 1.0 sections as received }
// Format (timed message record payload, v1): { version: u8 = 1 | kind: u8 = 3 | address_len: u16 LE | address | stored_at_ms: i64 LE (the proposer's clock) | message }
// Format (transaction message record payload, v1): { version: u8 = 1 | kind: u8 = 2 | address_len: u16 LE | address | txn_batch: u64 LE (random) | txn_remaining: u32 LE (records of the batch after this one) | message }

/// Kind byte of a message written by a transaction's commit (see [`Store::append_txn_batch`]).
pub const KIND_TXN_MESSAGE: u8 = 2;
/// Kind byte of a message record that carries its own store time: written by a clustered
/// address's group store (`raft::group_store`), whose log entries have no timestamp, so a
/// message's `ttl` still counts from when it was stored after a restart or a failover.
/// Never written to the shared log (whose records have their own timestamp).
pub const KIND_TIMED_MESSAGE: u8 = 3;
/// Bytes a transaction message record carries between its address and its message.
const TXN_TRAILER_LEN: usize = 12;

/// A message found in the log at start-up.
pub struct StoredMessage {
    pub offset: u64,
    pub timestamp_ms: i64,
    pub address: String,
    pub message: Bytes,
}

/// A message of a committed transaction's batch, as stored.
pub struct TxnStored {
    pub offset: u64,
    pub timestamp_ms: i64,
    /// The message alone, a slice of the mapping.
    pub message: Bytes,
}

/// The store; see the module docs.
pub struct Store {
    dir: PathBuf,
    log: Log,
    acks: Arc<AckLog>,
    /// Set in a cluster: where changes wait for Raft.
    replica: Option<Arc<Replication>>,
    /// Set in a cluster: new messages are refused while the disk is below its reserve.
    guard: Option<Arc<DiskGuard>>,
    /// Free bytes the message log leaves for the ack log (0 in a cluster, see `DiskGuard`).
    reserve_bytes: u64,
    /// Why the store is out of space, from the last refusal until space is back.
    out_of_space: Mutex<Option<String>>,
    /// Acknowledgements the ack log could not record.
    acks_refused: AtomicU64,
}

/// A free-space reserve for the data directory's filesystem. A clustered node cannot
/// refuse a Raft entry once it is replicated (a failed Raft-log append is fatal), so the
/// leader refuses new messages — the producer gets `resource-limit-exceeded`, like a full
/// disk on a single node — while free space is below the reserve, as RabbitMQ's disk
/// alarm does. [`DiskGuard::refresh`] is called periodically.
#[derive(Debug)]
pub struct DiskGuard {
    dir: PathBuf,
    min_free: u64,
    low: std::sync::atomic::AtomicBool,
}

impl DiskGuard {
    pub fn new(dir: &Path, min_free: u64) -> DiskGuard {
        DiskGuard {
            dir: dir.to_path_buf(),
            min_free,
            low: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Measures free space (statvfs) and updates the alarm; returns the free bytes.
    pub fn refresh(&self) -> StorageResult<u64> {
        let free = entrepot_storage::free_bytes(&self.dir)?;
        let low = free < self.min_free;
        let was = self.low.swap(low, std::sync::atomic::Ordering::Relaxed);
        if low != was {
            match low {
                true => tracing::warn!(free, reserve = self.min_free, dir = %self.dir.display(),
                    "disk below its free-space reserve: refusing new messages"),
                false => tracing::info!(free, "disk above its free-space reserve again"),
            }
        }
        Ok(free)
    }

    pub fn is_low(&self) -> bool {
        self.low.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Errors specific to the store's record format.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("address of {0} bytes exceeds {MAX_ADDRESS_LEN}")]
    AddressTooLong(usize),
    /// A transaction's batch on a clustered store: its atomicity is not carried through
    /// Raft (a leader lost mid-batch could commit a prefix), so it is refused.
    #[error("transactions are not available on a clustered node")]
    TxnReplicated,
    #[error("no randomness for a transaction batch id")]
    TxnBatchId,
}

/// The store of one address that keeps its messages and its consumption apart from the
/// shared [`Store`]: a clustered address's Raft group (`raft::group_store`, issue 12 step
/// 4.2). It is the seam that lets a [`super::queue::Queue`] run over either store: a queue
/// touches its store only to record what its consumers did, and a queue whose owner is
/// [`super::queue::QueueOwner::Group`] records it here instead of in the ack log.
/// Messages reach such a queue only after their commit: the connection enqueues what
/// [`AddressAppend::committed`] says once its durable handle completed.
pub trait AddressStore: Send + Sync + std::fmt::Debug {
    /// Appends `message` (given as chunks); it enters the queue only once
    /// [`AddressAppend::committed`] says where it lies.
    fn append(
        &self,
        message: &[&[u8]],
        stored_at_ms: i64,
    ) -> Result<AddressAppend, AddressStoreError>;
    /// Marks `offsets` consumed for good in the address's own group; an error means they
    /// are not, and the queue keeps the messages.
    fn ack(&self, offsets: &[u64]) -> Result<Durable, AddressStoreError>;
    /// Records the failed deliveries of the address's message at `offset`.
    fn set_delivery_count(&self, offset: u64, count: u32) -> Result<Durable, AddressStoreError>;
}

/// A message an [`AddressStore`] took: durable (the producer's `accepted`) once `durable`
/// completes — and by then `committed` can tell the message's offset and stored body.
pub struct AddressAppend {
    pub durable: Durable,
    pub committed: Box<dyn PendingCommit>,
}

/// Where a message an [`AddressStore`] took lies once committed.
pub trait PendingCommit: Send {
    /// `None` while it is not committed; once its durable handle completed (or failed),
    /// the answer: its offset and body (read by the caller, not by the store's pipeline),
    /// or why there is none.
    fn try_committed(&mut self) -> Option<Result<CommittedMessage, AddressStoreError>>;
}

/// A committed message of an [`AddressStore`]: its offset (the store's numbering) and the
/// message as stored (a slice of the store's mapping).
#[derive(Debug, Clone)]
pub struct CommittedMessage {
    pub offset: u64,
    /// When it was stored (the proposer's clock), as the store keeps it.
    pub stored_at_ms: i64,
    pub message: Bytes,
}

/// Why an [`AddressStore`] refused a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressStoreError {
    /// This node does not lead the address (its group's leader, if known).
    #[error("address {address} is not led by this node (leader: {leader:?})")]
    NotLeader {
        address: String,
        leader: Option<u64>,
    },
    /// Too many changes wait already: retry later.
    #[error("address {address}: too many changes in flight")]
    Busy { address: String },
    /// The store accepts nothing any more (its leadership ended, it was closed).
    #[error("address {address}: store unavailable: {reason}")]
    Unavailable { address: String, reason: String },
    /// The address is no longer served by this node: its store was retired (the
    /// leadership of its group here ended, or could not be confirmed).
    #[error("address {address} is no longer served by this node: {reason}")]
    Retired { address: String, reason: String },
}

/// What a queue's store refused while recording a consumer's outcome: the shared store's
/// error, or an address store's.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Address(#[from] AddressStoreError),
}

impl RecordError {
    /// The shared store is out of space (an address store never says so).
    pub fn is_out_of_space(&self) -> bool {
        matches!(self, RecordError::Storage(e) if e.is_out_of_space())
    }
}

impl StoreError {
    /// The disk is full or at its reserve: refuse with `amqp:resource-limit-exceeded`.
    pub fn is_out_of_space(&self) -> bool {
        matches!(self, StoreError::Storage(e) if e.is_out_of_space())
    }
}

impl Store {
    /// Opens the message log in `dir/messages` and the ack log in `dir/acks`.
    pub fn open(
        dir: &Path,
        sync: SyncPolicy,
        segment_bytes: u64,
        record_bytes_max: u32,
    ) -> StorageResult<Store> {
        let reserve_bytes = ack_reserve_bytes(segment_bytes);
        let config = LogConfig {
            segment_bytes,
            record_bytes_max,
            sync,
            reserve_bytes,
            recycle_segments: RECYCLE_SEGMENTS,
            ..LogConfig::default()
        };
        let (log, acks) = Store::open_logs(dir, config)?;
        Ok(Store {
            reserve_bytes,
            ..Store::over(dir, log, Arc::new(acks), None)
        })
    }

    /// A store over logs someone else keeps open (a cluster node's state machine), whose
    /// changes are queued on `replica` for Raft.
    pub fn replicated(dir: &Path, log: Log, acks: Arc<AckLog>, replica: Arc<Replication>) -> Store {
        Store::over(dir, log, acks, Some(replica))
    }

    fn over(dir: &Path, log: Log, acks: Arc<AckLog>, replica: Option<Arc<Replication>>) -> Store {
        Store {
            dir: dir.to_path_buf(),
            log,
            acks,
            replica,
            guard: None,
            reserve_bytes: 0,
            out_of_space: Mutex::new(None),
            acks_refused: AtomicU64::new(0),
        }
    }

    /// Refuses new messages while `guard` reports the disk below its reserve.
    pub fn with_guard(mut self, guard: Arc<DiskGuard>) -> Store {
        self.guard = Some(guard);
        self
    }

    /// Opens the message log in `dir/messages` and the ack log in `dir/acks`, without a
    /// free-space reserve (a cluster node keeps its reserve with a `DiskGuard`: an entry
    /// it already replicated cannot be refused by its store).
    pub fn open_parts(
        dir: &Path,
        sync: SyncPolicy,
        segment_bytes: u64,
        record_bytes_max: u32,
    ) -> StorageResult<(Log, AckLog)> {
        let config = LogConfig {
            segment_bytes,
            record_bytes_max,
            sync,
            ..LogConfig::default()
        };
        Store::open_logs(dir, config)
    }

    fn open_logs(dir: &Path, config: LogConfig) -> StorageResult<(Log, AckLog)> {
        let log = Log::open(dir.join("messages"), config.clone())?;
        let acks = AckLog::open(
            dir.join("acks"),
            LogConfig {
                record_bytes_max: 4 << 20,
                ..config
            },
        )?;
        Ok((log, acks))
    }

    /// Appends `message` (given as chunks) for `address`. Returns the durability handle
    /// and the stored message as a slice of the mapping.
    pub fn append(
        &self,
        address: &str,
        message: &[&[u8]],
    ) -> Result<(Appended, u64, i64, Bytes), StoreError> {
        if address.len() > MAX_ADDRESS_LEN {
            return Err(StoreError::AddressTooLong(address.len()));
        }
        if self.guard.as_ref().is_some_and(|g| g.is_low()) {
            return Err(StoreError::Storage(StorageError::DiskFull {
                verb: "keeping the free-space reserve for",
                path: self.dir.clone(),
            }));
        }
        let header = record_header(address);
        let mut parts: smallvec_parts::Parts = smallvec_parts::Parts::new();
        parts.push(&header);
        parts.push(address.as_bytes());
        for m in message {
            parts.push(m);
        }
        let appended = match &self.replica {
            None => self.log.append_view(0, parts.as_slice()),
            Some(r) => r
                .record(
                    || self.log.append_view(0, parts.as_slice()),
                    |(_, rec), buf| replication::encode_message(buf, rec.offset, &rec.payload),
                )
                .map(|((a, record), durable)| (Appended { durable, ..a }, record)),
        };
        let (appended, record) = appended.inspect_err(|e| self.note_refusal("message log", e))?;
        let skip = 4 + address.len();
        let offset = record.offset;
        Ok((
            appended,
            offset,
            record.timestamp_ms,
            record.payload.slice(skip..),
        ))
    }

    /// Whether changes go through Raft (a clustered node).
    pub fn is_replicated(&self) -> bool {
        self.replica.is_some()
    }

    /// Appends a committing transaction's messages `(address, message)` as one batch
    /// under one writer lock, so they are consecutive records covered by one group
    /// commit; returns the batch's durability handle and `(offset, timestamp, stored
    /// message)` for each, in order. Each record names a random batch id and how many
    /// records of the batch follow it: recovery shows a batch only when it finds it whole
    /// (see [`Store::recover`]), so a crash mid-append leaves nothing of it visible.
    pub fn append_txn_batch(
        &self,
        messages: &[(&str, &Bytes)],
    ) -> Result<(Durable, Vec<TxnStored>), StoreError> {
        if self.replica.is_some() {
            return Err(StoreError::TxnReplicated);
        }
        if let Some((address, _)) = messages.iter().find(|(a, _)| a.len() > MAX_ADDRESS_LEN) {
            return Err(StoreError::AddressTooLong(address.len()));
        }
        let mut txn_batch = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut txn_batch)
            .map_err(|_| StoreError::TxnBatchId)?;
        let n = messages.len();
        let payloads: Vec<Vec<u8>> = messages
            .iter()
            .enumerate()
            .map(|(i, (address, message))| {
                let batch = u64::from_le_bytes(txn_batch);
                txn_payload(address, batch, (n - 1 - i) as u32, message)
            })
            .collect();
        let appended = self
            .log
            .append_batch(&payloads)
            .inspect_err(|e| self.note_refusal("message log", e))?;
        let mut stored = Vec::with_capacity(n);
        for (i, (address, _)) in messages.iter().enumerate() {
            let record = self.log.read(appended.first + i as u64)?;
            let skip = 4 + address.len() + TXN_TRAILER_LEN;
            stored.push(TxnStored {
                offset: record.offset,
                timestamp_ms: record.timestamp_ms,
                message: record.payload.slice(skip..),
            });
        }
        Ok((appended.durable, stored))
    }

    /// Runs a local change, or in a cluster only queues its operation for Raft: the ack
    /// log and the registry change when the operation is applied, after the commit, so no
    /// node ever holds an acknowledgement the cluster did not commit. (The broker's own
    /// in-memory state moves at once; only the persisted state waits.)
    fn change(
        &self,
        write: impl FnOnce() -> StorageResult<Durable>,
        encode: impl FnOnce(&mut bytes::BytesMut),
    ) -> StorageResult<Durable> {
        match &self.replica {
            None => write(),
            Some(r) => r
                .record(|| Ok::<_, StorageError>(()), |_, buf| encode(buf))
                .map(|(_, d)| d),
        }
    }

    /// Marks offsets acknowledged (consumed for good). An error means they are not: the
    /// caller still owns the messages (see [`Store::acks_refused`]).
    pub fn ack(&self, offsets: &[u64]) -> StorageResult<Durable> {
        self.change(
            || self.acks.ack(offsets),
            |b| replication::encode_ack(b, None, offsets),
        )
        .inspect_err(|e| self.ack_refused(e))
    }

    /// Marks offsets acknowledged by a subscription's consumer group; an error means they
    /// are not.
    pub fn ack_group(&self, group: u32, offsets: &[u64]) -> StorageResult<Durable> {
        self.change(
            || self.acks.ack_group(group, offsets),
            |b| replication::encode_ack(b, Some(group), offsets),
        )
        .inspect_err(|e| self.ack_refused(e))
    }

    fn ack_refused(&self, e: &StorageError) {
        self.acks_refused.fetch_add(1, Ordering::Relaxed);
        self.note_refusal("ack log", e);
    }

    /// Raises the out-of-space alarm when `e` says `log` has no room.
    fn note_refusal(&self, log: &str, e: &StorageError) {
        if !e.is_out_of_space() {
            return;
        }
        let mut reason = self.out_of_space.lock().unwrap_or_else(|p| p.into_inner());
        if reason.is_none() {
            tracing::warn!(dir = %self.dir.display(), error = %e,
                "store out of space: refusing what it cannot record until space is freed");
        }
        *reason = Some(format!("{log}: {e}"));
    }

    /// Why the store cannot take new messages for lack of space (`/readyz`), or `None`.
    pub fn out_of_space(&self) -> Option<String> {
        if let Some(reason) = self
            .out_of_space
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Some(reason);
        }
        self.guard.as_ref().filter(|g| g.is_low()).map(|g| {
            format!(
                "{} is below its free-space reserve of {} bytes",
                g.dir.display(),
                g.min_free
            )
        })
    }

    /// Clears the out-of-space alarm once a new message segment fits above the reserve
    /// again (the same test the log makes before a roll); returns the free bytes measured,
    /// or `None` when no alarm was raised (nothing is measured then).
    pub fn check_space(&self) -> StorageResult<Option<u64>> {
        if self
            .out_of_space
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
        {
            return Ok(None);
        }
        let free = self.free_bytes()?;
        let needed = self.log.config().segment_bytes + self.reserve_bytes;
        if free >= needed {
            tracing::info!(free, needed, "store has space again: accepting messages");
            *self.out_of_space.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        Ok(Some(free))
    }

    /// Free bytes on the data directory's file system.
    pub fn free_bytes(&self) -> StorageResult<u64> {
        entrepot_storage::free_bytes(self.log.dir())
    }

    /// Free bytes a new message segment must leave for the ack log (0: none kept).
    pub fn reserve_bytes(&self) -> u64 {
        self.reserve_bytes
    }

    /// Acknowledgements the ack log refused since start (metrics).
    pub fn acks_refused(&self) -> u64 {
        self.acks_refused.load(Ordering::Relaxed)
    }

    /// Starts a subscription's group: everything below `floor` counts as consumed.
    pub fn start_group(&self, group: u32, floor: u64) -> StorageResult<Durable> {
        self.change(
            || self.acks.raise_group_floor(group, floor),
            |b| replication::encode_group_floor(b, group, floor),
        )
    }

    /// Records how often `group`'s message at `offset` was delivered without success, so
    /// `max-delivery-attempts` and the delivery-count survive a restart or failover.
    pub fn set_delivery_count(
        &self,
        group: u32,
        offset: u64,
        count: u32,
    ) -> StorageResult<Durable> {
        self.change(
            || self.acks.set_delivery_count(group, offset, count),
            |b| replication::encode_delivery_count(b, group, offset, count),
        )
    }

    /// The failed deliveries recorded for `group`'s message at `offset` (0 if none).
    pub fn delivery_count(&self, group: u32, offset: u64) -> u32 {
        self.acks.delivery_count(group, offset)
    }

    /// Forgets a deleted subscription's group.
    pub fn drop_group(&self, group: u32) -> StorageResult<Durable> {
        self.change(
            || self.acks.drop_group(group),
            |b| replication::encode_drop_group(b, group),
        )
    }

    /// Replaces the data-directory file `name` whole (the subscription registry); in a
    /// cluster, when the operation is applied.
    pub fn put_file(&self, name: &str, contents: &[u8]) -> std::io::Result<()> {
        match &self.replica {
            None => replication::write_file(&self.dir, name, contents),
            Some(r) => r
                .record(
                    || Ok::<_, std::io::Error>(()),
                    |_, b| replication::encode_file(b, name, contents),
                )
                .map(drop),
        }
    }

    /// What producers wait on before their messages count as stored: the local fsync, or
    /// in a cluster the Raft commit.
    pub fn durable_watch(&self) -> watch::Receiver<DurableState> {
        match &self.replica {
            None => self.log.durable_watch(),
            Some(r) => r.watch(),
        }
    }

    /// True if `group` consumed `offset`.
    pub fn group_acked(&self, group: u32, offset: u64) -> bool {
        self.acks.is_group_acked(group, offset)
    }

    /// Reads every unacknowledged message, oldest first. Records that do not parse are
    /// skipped with a warning (and counted), never fatal. A transaction's batch counts
    /// only when all its records are there, consecutive and in order ([`TxnRun`]); the
    /// records of a batch cut short by a crash are acknowledged (best effort), so they
    /// never count later either.
    pub fn recover(&self) -> StorageResult<Vec<StoredMessage>> {
        let acked = self.acks.snapshot_set();
        let mut out = Vec::new();
        let mut txn_run = TxnRun::default();
        let mut txn_orphans = Vec::new();
        for record in self.log.reader(self.log.first_offset()) {
            let record = record?;
            if record.payload.get(1) == Some(&KIND_TXN_MESSAGE) {
                let done = acked.contains(record.offset);
                txn_run.push(&record, done, &mut out, &mut txn_orphans);
                continue;
            }
            txn_run.cut(&mut txn_orphans);
            if acked.contains(record.offset) {
                continue;
            }
            match parse_record(&record.payload) {
                Some((address, message)) => out.push(StoredMessage {
                    offset: record.offset,
                    timestamp_ms: record.timestamp_ms,
                    address,
                    message,
                }),
                None => {
                    tracing::warn!(offset = record.offset, "skipping unreadable message record")
                }
            }
        }
        txn_run.cut(&mut txn_orphans);
        if !txn_orphans.is_empty() {
            tracing::warn!(
                records = txn_orphans.len(),
                "dropping the messages of a transaction whose commit was cut short"
            );
            if let Err(e) = self.ack(&txn_orphans) {
                // Still invisible: a batch is never completed by later records.
                tracing::warn!(error = %e, "could not acknowledge an incomplete transaction batch");
            }
        }
        Ok(out)
    }

    /// Why the store accepts nothing any more — a sync of the message log or the ack log
    /// failed, so the kernel may have dropped their dirty pages (`/readyz`,
    /// `entrepot_store_failed`) — or `None`. Only a restart clears it.
    pub fn failed(&self) -> Option<String> {
        let reason = |log: &Log| log.durable_watch().borrow().failed.clone();
        reason(&self.log)
            .map(|r| format!("message log: {r}"))
            .or_else(|| reason(self.acks.log()).map(|r| format!("ack log: {r}")))
    }

    /// Deletes sealed segments whose records are all acknowledged; returns how many.
    pub fn reclaim(&self) -> StorageResult<usize> {
        reclaim(&self.log, &self.acks)
    }

    /// The message log (stats, durable watch).
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// The ack log (stats).
    pub fn acks(&self) -> &AckLog {
        &self.acks
    }
}

/// Deletes the sealed segments of `log` whose records `acks` holds all acknowledged, and
/// releases the pages readers mapped again ([`Log::release_resident`]); a cluster follower
/// runs this on its own store, which no broker tends.
pub fn reclaim(log: &Log, acks: &AckLog) -> StorageResult<usize> {
    let mut deleted = 0;
    let spans: Vec<_> = log
        .segments()
        .into_iter()
        .filter(|s| s.sealed && acks.contains_range(s.base, s.next))
        .collect();
    if !spans.is_empty() {
        // The acknowledgements that free a segment are durable before it goes (the ack
        // log's invariant): the ack log syncs lazily (`ACK_SYNC_DELAY`).
        acks.log().flush()?;
    }
    for span in spans {
        if log.delete_segment(span.base)? {
            deleted += 1;
        }
    }
    // Pages consumers faulted back in leave the resident set again (issue 15).
    log.release_resident();
    Ok(deleted)
}

/// Recovery's view of the transaction batch being read: its id, how many records must
/// follow, and its unacknowledged messages so far. A batch is complete when a record says
/// none follow; any other record — another batch's, a plain message, the end of the log
/// — cuts it, and its records are dropped (a random 64-bit id keeps a later batch from
/// completing an earlier, torn one).
#[derive(Default)]
struct TxnRun {
    batch: Option<(u64, u32)>,
    members: Vec<StoredMessage>,
}

impl TxnRun {
    fn push(
        &mut self,
        record: &entrepot_storage::Record,
        acked: bool,
        out: &mut Vec<StoredMessage>,
        orphans: &mut Vec<u64>,
    ) {
        let Some((address, batch, remaining, message)) = parse_txn_record(&record.payload) else {
            tracing::warn!(
                offset = record.offset,
                "skipping unreadable transaction record"
            );
            self.cut(orphans);
            return;
        };
        if self
            .batch
            .is_some_and(|(b, r)| b != batch || r != remaining)
        {
            self.cut(orphans);
        }
        if !acked {
            self.members.push(StoredMessage {
                offset: record.offset,
                timestamp_ms: record.timestamp_ms,
                address,
                message,
            });
        }
        match remaining.checked_sub(1) {
            Some(next) => self.batch = Some((batch, next)),
            None => {
                out.append(&mut self.members);
                self.batch = None;
            }
        }
    }

    /// The batch read so far is incomplete: its messages become orphans.
    fn cut(&mut self, orphans: &mut Vec<u64>) {
        self.batch = None;
        orphans.extend(self.members.drain(..).map(|m| m.offset));
    }
}

/// A transaction message record's payload (see the format above).
fn txn_payload(address: &str, batch: u64, remaining: u32, message: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + address.len() + TXN_TRAILER_LEN + message.len());
    p.extend_from_slice(&[RECORD_VERSION, KIND_TXN_MESSAGE]);
    p.extend_from_slice(&(address.len() as u16).to_le_bytes());
    p.extend_from_slice(address.as_bytes());
    p.extend_from_slice(&batch.to_le_bytes());
    p.extend_from_slice(&remaining.to_le_bytes());
    p.extend_from_slice(message);
    p
}

/// `(address, batch, remaining, message)` of a transaction message record.
fn parse_txn_record(payload: &Bytes) -> Option<(String, u64, u32, Bytes)> {
    if payload.len() < 4 || payload[0] != RECORD_VERSION || payload[1] != KIND_TXN_MESSAGE {
        return None;
    }
    let len = u16::from_le_bytes([payload[2], payload[3]]) as usize;
    let address = std::str::from_utf8(payload.get(4..4 + len)?)
        .ok()?
        .to_owned();
    let trailer = payload.get(4 + len..4 + len + TXN_TRAILER_LEN)?;
    let batch = u64::from_le_bytes(trailer[..8].try_into().ok()?);
    let remaining = u32::from_le_bytes(trailer[8..].try_into().ok()?);
    Some((
        address,
        batch,
        remaining,
        payload.slice(4 + len + TXN_TRAILER_LEN..),
    ))
}

/// The 4 bytes before the address of a message record (format above); `address` is at
/// most [`MAX_ADDRESS_LEN`] bytes (checked by the caller).
pub(crate) fn record_header(address: &str) -> [u8; 4] {
    let mut header = [0u8; 4];
    header[0] = RECORD_VERSION;
    header[1] = KIND_MESSAGE;
    header[2..4].copy_from_slice(&(address.len() as u16).to_le_bytes());
    header
}

/// The bytes before the message of a timed message record (format above) for `address`
/// (at most [`MAX_ADDRESS_LEN`] bytes, checked by the caller), stored at `stored_at_ms`.
pub(crate) fn timed_record_prefix(address: &str, stored_at_ms: i64) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + address.len() + 8);
    p.extend_from_slice(&[RECORD_VERSION, KIND_TIMED_MESSAGE]);
    p.extend_from_slice(&(address.len() as u16).to_le_bytes());
    p.extend_from_slice(address.as_bytes());
    p.extend_from_slice(&stored_at_ms.to_le_bytes());
    p
}

/// `(address, stored_at_ms, message)` of a timed message record; the message is a slice
/// of `payload`.
pub(crate) fn parse_timed_record(payload: &Bytes) -> Option<(String, i64, Bytes)> {
    if payload.len() < 4 || payload[0] != RECORD_VERSION || payload[1] != KIND_TIMED_MESSAGE {
        return None;
    }
    let len = u16::from_le_bytes([payload[2], payload[3]]) as usize;
    let address = std::str::from_utf8(payload.get(4..4 + len)?)
        .ok()?
        .to_owned();
    let at = i64::from_le_bytes(payload.get(4 + len..4 + len + 8)?.try_into().ok()?);
    Some((address, at, payload.slice(4 + len + 8..)))
}

/// `(address, message)` of a message record; the message is a slice of `payload`.
pub(crate) fn parse_record(payload: &Bytes) -> Option<(String, Bytes)> {
    if payload.len() < 4 || payload[0] != RECORD_VERSION || payload[1] != KIND_MESSAGE {
        return None;
    }
    let len = u16::from_le_bytes([payload[2], payload[3]]) as usize;
    let address = std::str::from_utf8(payload.get(4..4 + len)?)
        .ok()?
        .to_owned();
    Some((address, payload.slice(4 + len..)))
}

/// A few slices on the stack: an append's parts without a heap allocation.
mod smallvec_parts {
    /// Most parts one append carries; more are rare and spill to the heap.
    const INLINE: usize = 8;

    pub struct Parts<'a> {
        inline: [&'a [u8]; INLINE],
        len: usize,
        spill: Vec<&'a [u8]>,
    }

    impl<'a> Parts<'a> {
        pub fn new() -> Self {
            Parts {
                inline: [&[]; INLINE],
                len: 0,
                spill: Vec::new(),
            }
        }

        pub fn push(&mut self, part: &'a [u8]) {
            if self.len < INLINE && self.spill.is_empty() {
                self.inline[self.len] = part;
                self.len += 1;
            } else {
                if self.spill.is_empty() {
                    self.spill.extend_from_slice(&self.inline[..self.len]);
                }
                self.spill.push(part);
            }
        }

        pub fn as_slice(&self) -> &[&'a [u8]] {
            if self.spill.is_empty() {
                &self.inline[..self.len]
            } else {
                &self.spill
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_survive_reopen_and_acked_ones_do_not_come_back() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), SyncPolicy::Always, 1 << 20, 64 << 10).unwrap();
            let (a, o1, _, view) = store.append("orders", &[b"one"]).unwrap();
            assert_eq!(&view[..], b"one");
            let (_, o2, _, _) = store.append("other", &[b"t", b"wo"]).unwrap();
            a.durable.wait().await.unwrap();
            store.ack(&[o1]).unwrap().wait().await.unwrap();
            store.log().flush().unwrap();
            assert_eq!(o2, o1 + 1);
        }
        let store = Store::open(dir.path(), SyncPolicy::Always, 1 << 20, 64 << 10).unwrap();
        let msgs = store.recover().unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].address, "other");
        assert_eq!(&msgs[0].message[..], b"two");
    }

    fn recovered(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let store = Store::open(dir, SyncPolicy::Always, 1 << 20, 64 << 10).unwrap();
        let msgs = store.recover().unwrap();
        store.acks().log().flush().unwrap();
        msgs.into_iter()
            .map(|m| (m.address, m.message.to_vec()))
            .collect()
    }

    /// A committed transaction's batch comes back whole (less what was acknowledged);
    /// a batch cut short by a crash comes back not at all — not even when the next
    /// records would continue its countdown (another batch of one) — and stays gone.
    #[tokio::test]
    async fn a_transaction_batch_is_recovered_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), SyncPolicy::Always, 1 << 20, 64 << 10).unwrap();
            let (t0, t1, t2) = (Bytes::from("t0"), Bytes::from("t1"), Bytes::from("t2"));
            let (durable, stored) = store
                .append_txn_batch(&[("q", &t0), ("q", &t1), ("r", &t2)])
                .unwrap();
            assert_eq!(
                &stored[2].message[..],
                b"t2",
                "the view is the message alone"
            );
            durable.wait().await.unwrap();
            store
                .ack(&[stored[1].offset])
                .unwrap()
                .wait()
                .await
                .unwrap();
            // A torn batch (7: two records of three), then a whole batch of one (9),
            // whose `remaining` (0) is what batch 7 would have needed next.
            store
                .log()
                .append(&txn_payload("q", 7, 2, b"torn0"))
                .unwrap();
            store
                .log()
                .append(&txn_payload("q", 7, 1, b"torn1"))
                .unwrap();
            store
                .log()
                .append(&txn_payload("q", 9, 0, b"single"))
                .unwrap();
            store
                .log()
                .append(&txn_payload("q", 11, 1, b"tail0"))
                .unwrap();
            store.append("q", &[b"plain"]).unwrap();
            store.log().flush().unwrap();
        }
        let want: Vec<(String, Vec<u8>)> =
            [("q", "t0"), ("r", "t2"), ("q", "single"), ("q", "plain")]
                .iter()
                .map(|(a, m)| (a.to_string(), m.as_bytes().to_vec()))
                .collect();
        assert_eq!(recovered(dir.path()), want);
        // The orphans were acknowledged: a later recovery agrees.
        assert_eq!(recovered(dir.path()), want);
    }

    #[test]
    fn below_the_free_space_reserve_new_messages_are_refused_as_disk_full() {
        let dir = tempfile::tempdir().unwrap();
        let (log, acks) =
            Store::open_parts(dir.path(), SyncPolicy::Never, 1 << 20, 64 << 10).unwrap();
        let replica = Arc::new(Replication::new());
        // A reserve no disk has: the real statvfs reports it low.
        let guard = Arc::new(DiskGuard::new(dir.path(), u64::MAX / 2));
        let store = Store::replicated(dir.path(), log, Arc::new(acks), replica)
            .with_guard(Arc::clone(&guard));
        assert!(store.append("q", &[b"before"]).is_ok(), "not measured yet");
        let free = guard.refresh().unwrap();
        assert!(free > 0 && guard.is_low());
        assert!(matches!(
            store.append("q", &[b"refused"]),
            Err(StoreError::Storage(StorageError::DiskFull { .. }))
        ));
        // Acknowledgements still go through: they are what frees space.
        assert!(store.ack(&[0]).is_ok());
        let roomy = DiskGuard::new(dir.path(), 1);
        roomy.refresh().unwrap();
        assert!(!roomy.is_low());
    }
}
