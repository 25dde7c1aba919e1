//! What a clustered store replicates: every change to the store (a stored message, an
//! acknowledgement, a consumer group's floor, the subscription registry) as an *operation*,
//! in the order it happened on the leader, batched into one Raft entry per round trip.
//!
//! The leader's store writes a message locally first (so it already has its offset and a
//! slice of the mapping), then queues the operation here; acknowledgements, group changes
//! and the registry are only queued, and written when applied. The replicator (`crate::raft`)
//! takes everything queued as one batch, commits it through Raft, and raises the
//! *committed* watch; the broker accepts a producer's transfer only when that watch passes
//! the message's operation — the clustered meaning of "durable".
//!
//! Every node (the leader too) applies committed batches with [`apply`]. Applying is
//! idempotent and repairs divergence: a message whose offset already holds the same record
//! is skipped; one whose offset holds a different record (written by a leader that lost
//! its term before committing) cuts the local log there and appends. So replaying the Raft
//! log from its start after a restart is always safe.
//!
//! ```text
//! // Format (ops batch, v1): { version: u8 = 1 | op* }   (integers little-endian)
//! //   op 1 message    { offset: u64 | len: u32 | record payload (store.rs format) }
//! //   op 2 ack        { n: u32 | n × offset: u64 }
//! //   op 3 ack group  { group: u32 | n: u32 | n × offset: u64 }
//! //   op 4 group floor{ group: u32 | floor: u64 }
//! //   op 5 drop group { group: u32 }
//! //   op 6 file       { name_len: u16 | name | len: u32 | contents }   (data-dir file)
//! //   op 7 delivery count { group: u32 | offset: u64 | count: u32 }   (failed deliveries)
//! ```
//! Invariants: operations are queued in the order the store changed (the queue's lock is
//! held across the local write); no node persists an acknowledgement before it commits;
//! sequence numbers are dense from 0 for one leadership;
//! the committed watch only moves forward, and fails once the leadership ends.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use bytes::{BufMut, Bytes, BytesMut};
use entrepot_storage::{AckLog, Durable, DurableState, Log, StorageError};
use tokio::sync::{watch, Notify};

/// Version byte of the ops batch format.
pub const OPS_VERSION: u8 = 1;
/// Bytes after which a batch is closed and the next one starts (one Raft entry each).
/// With [`crate::raft::MAX_CLUSTER_MESSAGE_BYTES`] and openraft's `max_payload_entries`
/// this keeps one AppendEntries RPC well inside the inter-node frame limit.
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// Longest file name an op may carry.
const MAX_FILE_NAME: usize = 255;
/// Files an op may write: only the subscription registry.
const REPLICATED_FILES: &[&str] = &[super::subscriptions::REGISTRY_FILE];

const OP_MESSAGE: u8 = 1;
const OP_ACK: u8 = 2;
const OP_ACK_GROUP: u8 = 3;
const OP_GROUP_FLOOR: u8 = 4;
const OP_DROP_GROUP: u8 = 5;
const OP_FILE: u8 = 6;
const OP_DELIVERY_COUNT: u8 = 7;

/// Why a batch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("ops batch version {0} is not supported (this build reads {OPS_VERSION})")]
    Version(u8),
    #[error("malformed ops batch: {0}")]
    Malformed(&'static str),
    #[error("committed message at offset {offset} differs from the local record")]
    CommittedDiverges { offset: u64 },
    #[error("message at offset {offset} would leave a gap (log ends at {next})")]
    Gap { offset: u64, next: u64 },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("writing {name}: {source}")]
    File {
        name: String,
        source: std::io::Error,
    },
}

/// The operations of one leadership waiting to be replicated; see the module docs.
pub struct Replication {
    queue: Mutex<Queue>,
    wake: Notify,
    committed: watch::Sender<DurableState>,
    /// What the replicator committed, for metrics.
    pub stats: ReplicationStats,
}

/// Counters of one leadership's replication.
#[derive(Debug, Default)]
pub struct ReplicationStats {
    /// Raft entries (batches) committed.
    pub batches: std::sync::atomic::AtomicU64,
    /// Bytes of operations committed.
    pub bytes: std::sync::atomic::AtomicU64,
    /// From submitting a batch to its commit (and apply on the leader).
    pub commit_latency: super::latency::LatencyHistogram,
}

struct Queue {
    /// The batch filling now.
    buf: BytesMut,
    /// Full batches (each about [`MAX_BATCH_BYTES`]) waiting to be taken, oldest first.
    full: VecDeque<Batch>,
    /// Sequence number the next operation gets.
    next_seq: u64,
}

/// A batch taken for replication: its bytes and the sequence number after its last op.
pub struct Batch {
    pub ops: Bytes,
    pub end_seq: u64,
}

impl Default for Replication {
    fn default() -> Self {
        Self::new()
    }
}

impl Replication {
    pub fn new() -> Replication {
        let (committed, _) = watch::channel(DurableState::default());
        Replication {
            queue: Mutex::new(Queue {
                buf: BytesMut::new(),
                full: VecDeque::new(),
                next_seq: 0,
            }),
            wake: Notify::new(),
            committed,
            stats: ReplicationStats::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `write` (the local store change) and queues its operation, under one lock so
    /// operations keep the store's order. Returns what `write` returned and the handle
    /// that completes when the operation is committed.
    pub(crate) fn record<T, E>(
        &self,
        write: impl FnOnce() -> Result<T, E>,
        encode: impl FnOnce(&T, &mut BytesMut),
    ) -> Result<(T, Durable), E> {
        let mut q = self.lock();
        let out = write()?;
        if q.buf.is_empty() {
            q.buf.put_u8(OPS_VERSION);
        }
        encode(&out, &mut q.buf);
        let seq = q.next_seq;
        q.next_seq += 1;
        if q.buf.len() >= MAX_BATCH_BYTES {
            let batch = Batch {
                ops: q.buf.split().freeze(),
                end_seq: q.next_seq,
            };
            q.full.push_back(batch);
        }
        drop(q);
        self.wake.notify_one();
        Ok((out, Durable::watching(self.committed.subscribe(), seq)))
    }

    /// Takes everything queued (`None` when nothing is).
    /// Takes the oldest queued batch (`None` when nothing is queued). A batch holds at
    /// most about [`MAX_BATCH_BYTES`] (more only when one op alone is bigger).
    pub fn take(&self) -> Option<Batch> {
        let mut q = self.lock();
        if let Some(batch) = q.full.pop_front() {
            return Some(batch);
        }
        if q.buf.is_empty() {
            return None;
        }
        let ops = q.buf.split().freeze();
        Some(Batch {
            ops,
            end_seq: q.next_seq,
        })
    }

    /// Completes when an operation is queued (or at once if one was queued since the
    /// last wait).
    pub async fn queued(&self) {
        self.wake.notified().await
    }

    /// Everything before `end_seq` is committed by a majority.
    pub fn committed(&self, end_seq: u64) {
        self.committed.send_if_modified(|s| {
            let moved = s.durable < end_seq;
            s.durable = s.durable.max(end_seq);
            moved
        });
    }

    /// The leadership ended (or Raft failed): nothing queued will be committed by this
    /// leader; everyone waiting hears `reason`.
    pub fn fail(&self, reason: &str) {
        self.committed.send_modify(|s| {
            if s.failed.is_none() {
                s.failed = Some(reason.into());
            }
        });
    }

    /// Operations recorded and not yet committed (what a failover now would undo).
    pub fn uncommitted(&self) -> u64 {
        let next = self.lock().next_seq;
        next.saturating_sub(self.committed.borrow().durable)
    }

    /// The committed watch (a connection waits on it for its producers' acceptances).
    pub fn watch(&self) -> watch::Receiver<DurableState> {
        self.committed.subscribe()
    }
}

/// Appends op 1 (the op encoders are public for `tests/broker/format_fixtures.rs`).
pub fn encode_message(buf: &mut BytesMut, offset: u64, record: &[u8]) {
    buf.put_u8(OP_MESSAGE);
    buf.put_u64_le(offset);
    buf.put_u32_le(record.len() as u32);
    buf.put_slice(record);
}

pub fn encode_ack(buf: &mut BytesMut, group: Option<u32>, offsets: &[u64]) {
    match group {
        None => buf.put_u8(OP_ACK),
        Some(g) => {
            buf.put_u8(OP_ACK_GROUP);
            buf.put_u32_le(g);
        }
    }
    buf.put_u32_le(offsets.len() as u32);
    offsets.iter().for_each(|o| buf.put_u64_le(*o));
}

pub fn encode_group_floor(buf: &mut BytesMut, group: u32, floor: u64) {
    buf.put_u8(OP_GROUP_FLOOR);
    buf.put_u32_le(group);
    buf.put_u64_le(floor);
}

pub fn encode_drop_group(buf: &mut BytesMut, group: u32) {
    buf.put_u8(OP_DROP_GROUP);
    buf.put_u32_le(group);
}

pub fn encode_delivery_count(buf: &mut BytesMut, group: u32, offset: u64, count: u32) {
    buf.put_u8(OP_DELIVERY_COUNT);
    buf.put_u32_le(group);
    buf.put_u64_le(offset);
    buf.put_u32_le(count);
}

pub fn encode_file(buf: &mut BytesMut, name: &str, contents: &[u8]) {
    buf.put_u8(OP_FILE);
    buf.put_u16_le(name.len() as u16);
    buf.put_slice(name.as_bytes());
    buf.put_u32_le(contents.len() as u32);
    buf.put_slice(contents);
}

/// Where applying stands: the offset after the last message applied, so a new leader
/// can cut a local tail that was never committed.
#[derive(Debug, Default, Clone, Copy)]
pub struct Applied {
    pub message_end: Option<u64>,
}

/// Applies one committed batch to a node's store (see the module docs).
pub fn apply(
    ops: &Bytes,
    log: &Log,
    acks: &AckLog,
    dir: &Path,
    applied: &mut Applied,
) -> Result<(), ApplyError> {
    let mut r = Reader { buf: ops, pos: 0 };
    let version = r.u8()?;
    if version != OPS_VERSION {
        return Err(ApplyError::Version(version));
    }
    while r.pos < ops.len() {
        match r.u8()? {
            OP_MESSAGE => {
                let offset = r.u64()?;
                let len = r.u32()? as usize;
                let record = r.slice(len)?;
                apply_message(log, offset, &record, applied.message_end.unwrap_or(0))?;
                applied.message_end = Some(offset + 1);
            }
            OP_ACK => apply_acks(&mut r, None, acks)?,
            OP_ACK_GROUP => {
                let group = r.u32()?;
                apply_acks(&mut r, Some(group), acks)?;
            }
            OP_GROUP_FLOOR => {
                let group = r.u32()?;
                let floor = r.u64()?;
                acks.raise_group_floor(group, floor)?;
            }
            OP_DROP_GROUP => {
                let group = r.u32()?;
                acks.drop_group(group)?;
            }
            OP_DELIVERY_COUNT => {
                let group = r.u32()?;
                let offset = r.u64()?;
                let count = r.u32()?;
                if acks.delivery_count(group, offset) != count {
                    acks.set_delivery_count(group, offset, count)?;
                }
            }
            OP_FILE => apply_file(&mut r, dir)?,
            _ => return Err(ApplyError::Malformed("unknown op")),
        }
    }
    Ok(())
}

/// One decoded operation of an ops batch (what [`decode_ops`] returns): the per-address
/// group machine (`crate::raft::address_machine`) applies these to its index instead of
/// to a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// op 1: a message record; `offset` as the proposer numbered it.
    Message { offset: u64, record: Bytes },
    /// op 2 (`group` `None`) and op 3: offsets acknowledged.
    Ack {
        group: Option<u32>,
        offsets: Vec<u64>,
    },
    /// op 4: everything below `floor` consumed by `group`.
    GroupFloor { group: u32, floor: u64 },
    /// op 5: a subscription's group deleted.
    DropGroup { group: u32 },
    /// op 6: a data-directory file replaced whole.
    File { name: String, contents: Bytes },
    /// op 7: failed deliveries of an unacknowledged message.
    DeliveryCount { group: u32, offset: u64, count: u32 },
}

/// Bytes before a lone message op's record in its batch: version, op, offset, length.
/// A payload that is one message op holds its record at `MESSAGE_RECORD_AT..`.
pub const MESSAGE_RECORD_AT: usize = 1 + 1 + 8 + 4;

/// Decodes an ops batch (checking its version and every length) without applying it;
/// records and file contents are slices of `ops`.
pub fn decode_ops(ops: &Bytes) -> Result<Vec<Op>, ApplyError> {
    let mut r = Reader { buf: ops, pos: 0 };
    let version = r.u8()?;
    if version != OPS_VERSION {
        return Err(ApplyError::Version(version));
    }
    let mut out = Vec::new();
    while r.pos < ops.len() {
        let op = match r.u8()? {
            OP_MESSAGE => {
                let offset = r.u64()?;
                let len = r.u32()? as usize;
                Op::Message {
                    offset,
                    record: r.slice(len)?,
                }
            }
            OP_ACK => Op::Ack {
                group: None,
                offsets: read_offsets(&mut r)?,
            },
            OP_ACK_GROUP => {
                let group = r.u32()?;
                Op::Ack {
                    group: Some(group),
                    offsets: read_offsets(&mut r)?,
                }
            }
            OP_GROUP_FLOOR => Op::GroupFloor {
                group: r.u32()?,
                floor: r.u64()?,
            },
            OP_DROP_GROUP => Op::DropGroup { group: r.u32()? },
            OP_DELIVERY_COUNT => Op::DeliveryCount {
                group: r.u32()?,
                offset: r.u64()?,
                count: r.u32()?,
            },
            OP_FILE => {
                let name_len = r.u16()? as usize;
                if name_len > MAX_FILE_NAME {
                    return Err(ApplyError::Malformed("file name too long"));
                }
                let name = std::str::from_utf8(&r.slice(name_len)?)
                    .map_err(|_| ApplyError::Malformed("file name is not UTF-8"))?
                    .to_owned();
                let len = r.u32()? as usize;
                Op::File {
                    name,
                    contents: r.slice(len)?,
                }
            }
            _ => return Err(ApplyError::Malformed("unknown op")),
        };
        out.push(op);
    }
    Ok(out)
}

/// An ack op's offsets, after its group.
fn read_offsets(r: &mut Reader<'_>) -> Result<Vec<u64>, ApplyError> {
    let n = r.u32()? as usize;
    if n > (r.buf.len() - r.pos) / 8 {
        return Err(ApplyError::Malformed("ack count beyond the batch"));
    }
    (0..n).map(|_| r.u64()).collect()
}

/// An ack op's offsets (after its group, read by the caller): those not yet acknowledged
/// are, in the default group or in `group`.
fn apply_acks(r: &mut Reader<'_>, group: Option<u32>, acks: &AckLog) -> Result<(), ApplyError> {
    let n = r.u32()? as usize;
    if n > (r.buf.len() - r.pos) / 8 {
        return Err(ApplyError::Malformed("ack count beyond the batch"));
    }
    let offsets: Vec<u64> = (0..n).map(|_| r.u64()).collect::<Result<_, _>>()?;
    let fresh: Vec<u64> = offsets
        .into_iter()
        .filter(|o| match group {
            None => !acks.is_acked(*o),
            Some(g) => !acks.is_group_acked(g, *o),
        })
        .collect();
    if fresh.is_empty() {
        return Ok(());
    }
    match group {
        None => acks.ack(&fresh)?,
        Some(g) => acks.ack_group(g, &fresh)?,
    };
    Ok(())
}

/// A file op: one of [`REPLICATED_FILES`] replaced whole in `dir`.
fn apply_file(r: &mut Reader<'_>, dir: &Path) -> Result<(), ApplyError> {
    let name_len = r.u16()? as usize;
    if name_len > MAX_FILE_NAME {
        return Err(ApplyError::Malformed("file name too long"));
    }
    let name = std::str::from_utf8(&r.slice(name_len)?)
        .map_err(|_| ApplyError::Malformed("file name is not UTF-8"))?
        .to_owned();
    let len = r.u32()? as usize;
    let contents = r.slice(len)?;
    if !REPLICATED_FILES.contains(&name.as_str()) {
        return Err(ApplyError::Malformed(
            "op writes a file that is not replicated",
        ));
    }
    write_file(dir, &name, &contents).map_err(|source| ApplyError::File { name, source })
}

/// Idempotent message apply: skip when the same record is there, cut and rewrite when a
/// different one is, append when the log ends here.
fn apply_message(
    log: &Log,
    offset: u64,
    record: &[u8],
    committed_end: u64,
) -> Result<(), ApplyError> {
    let next = log.next_offset();
    if offset < next {
        if offset < log.first_offset() {
            return Ok(()); // reclaimed here already: it was acknowledged
        }
        match log.read(offset) {
            Ok(existing) if existing.payload[..] == *record => return Ok(()),
            _ if offset < committed_end => {
                // Below the committed end only the same record may stand: anything else
                // is a bug, and cutting would destroy committed messages.
                return Err(ApplyError::CommittedDiverges { offset });
            }
            _ => {
                tracing::warn!(
                    offset,
                    local_end = next,
                    "local log diverges from the committed one; cutting it"
                );
                log.truncate_from(offset)?;
            }
        }
    } else if offset > next {
        return Err(ApplyError::Gap { offset, next });
    }
    let (_, written) = log.append_view(0, &[record])?;
    if written.offset != offset {
        return Err(ApplyError::Gap {
            offset,
            next: written.offset,
        });
    }
    Ok(())
}

/// Writes `dir/name` whole: temporary file, fsync, rename, directory fsync (the syncs
/// through `entrepot_storage::fsync`, the storage crate's one door to the disk).
pub fn write_file(dir: &Path, name: &str, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        entrepot_storage::fsync::sync_file(&f, &tmp)?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    entrepot_storage::fsync::sync_dir(dir)
}

struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], ApplyError> {
        let b = self
            .buf
            .get(self.pos..self.pos + N)
            .ok_or(ApplyError::Malformed("truncated"))?;
        self.pos += N;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, ApplyError> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, ApplyError> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32, ApplyError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, ApplyError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    fn slice(&mut self, len: usize) -> Result<Bytes, ApplyError> {
        if self.buf.len() - self.pos < len {
            return Err(ApplyError::Malformed("truncated"));
        }
        let out = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use entrepot_storage::{LogConfig, SyncPolicy};

    /// A small unsynced message log and ack log in `dir` (shared by the store tests).
    pub(crate) fn open(dir: &Path) -> (Log, AckLog) {
        let config = LogConfig {
            segment_bytes: 1 << 20,
            record_bytes_max: 64 << 10,
            sync: SyncPolicy::Never,
            ..LogConfig::default()
        };
        (
            Log::open(dir.join("messages"), config.clone()).unwrap(),
            AckLog::open(dir.join("acks"), config).unwrap(),
        )
    }

    fn batch(f: impl FnOnce(&mut BytesMut)) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(OPS_VERSION);
        f(&mut b);
        b.freeze()
    }

    #[test]
    fn applying_twice_changes_nothing_and_divergence_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (log, acks) = open(dir.path());
        let mut applied = Applied::default();
        let ops = batch(|b| {
            encode_message(b, 0, b"zero");
            encode_message(b, 1, b"one");
            encode_ack(b, None, &[0]);
            encode_delivery_count(b, 0, 1, 3);
            encode_file(b, "subscriptions.yaml", b"version: 1\n");
        });
        apply(&ops, &log, &acks, dir.path(), &mut applied).unwrap();
        apply(&ops, &log, &acks, dir.path(), &mut applied).unwrap();
        assert_eq!(log.next_offset(), 2);
        assert!(acks.is_acked(0) && !acks.is_acked(1));
        assert_eq!(acks.delivery_count(0, 1), 3);
        assert_eq!(applied.message_end, Some(2));
        // A stale local tail (offset 2 never committed) is replaced by the committed one.
        log.append_view(0, &[b"stale"]).unwrap();
        log.append_view(0, &[b"stale too"]).unwrap();
        let ops = batch(|b| encode_message(b, 2, b"two"));
        apply(&ops, &log, &acks, dir.path(), &mut applied).unwrap();
        assert_eq!(log.next_offset(), 3);
        assert_eq!(&log.read(2).unwrap().payload[..], b"two");
        let gap = batch(|b| encode_message(b, 9, b"nine"));
        assert!(matches!(
            apply(&gap, &log, &acks, dir.path(), &mut applied),
            Err(ApplyError::Gap { .. })
        ));
        let evil = batch(|b| encode_file(b, "../etc/passwd", b"x"));
        assert!(apply(&evil, &log, &acks, dir.path(), &mut applied).is_err());
        assert!(apply(
            &Bytes::from_static(&[9]),
            &log,
            &acks,
            dir.path(),
            &mut applied
        )
        .is_err());
    }

    #[tokio::test]
    async fn committed_watch_completes_recorded_ops_in_order_and_fails_the_rest() {
        let r = Replication::new();
        let (_, first) = r
            .record(|| Ok::<_, ()>(()), |_, b| encode_drop_group(b, 1))
            .unwrap();
        let (_, second) = r
            .record(|| Ok::<_, ()>(()), |_, b| encode_drop_group(b, 2))
            .unwrap();
        let taken = r.take().unwrap();
        assert_eq!(taken.end_seq, 2);
        assert!(r.take().is_none());
        // Big batches close at MAX_BATCH_BYTES and are taken oldest first.
        let big = vec![7u8; MAX_BATCH_BYTES / 2 + 1];
        for i in 0..5u64 {
            r.record(|| Ok::<_, ()>(()), |_, b| encode_message(b, i, &big))
                .unwrap();
        }
        let ends: Vec<u64> = std::iter::from_fn(|| r.take().map(|b| b.end_seq)).collect();
        assert_eq!(ends, [4, 6, 7]);
        r.committed(1);
        first.wait().await.unwrap();
        assert!(!second.is_durable());
        r.fail("leadership lost");
        assert!(second.wait().await.is_err());
    }
}
