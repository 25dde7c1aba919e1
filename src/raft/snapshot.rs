//! A snapshot of a node's store at one applied Raft entry: what a lagging or new member
//! installs instead of replaying a log prefix that has been purged.
//!
//! It holds the store's *live* state only: the unacknowledged message records with their
//! offsets, every consumer group's acknowledged set, the delivery counts of failed
//! deliveries, and the subscription registry — not the acknowledged history. Installing it resets the local message log to start at the
//! first live offset and rewrites the records at their offsets; an offset between them
//! that was acknowledged gets an empty placeholder record (acknowledged in the imported
//! set, or by an entry after the snapshot that is applied before anything is served), which
//! keeps offsets identical on every node.
//!
//! Nothing here holds a snapshot's messages in memory or writes them twice:
//! * **Persisted** (`raft/sm/snapshot`) is only the [`StoreState`] — where the committed
//!   messages end, the ack sets, the registry. The records are already in the store, which
//!   is flushed before the state is persisted.
//! * **Sent** is a [`StoreSource`]: the wire format generated on read from `Bytes` slices
//!   of the store's mapping (about 48 bytes of index per live record), chunk by chunk.
//! * **Received** goes into a file, which [`install_from`] checks in one pass and installs
//!   in a second, record by record.
//!
//! ```text
//! // Format (store snapshot on the wire, v2; integers little-endian):
//! //   { version: u8 = 2 | message_end: u64 | base: u64 | acks_len: u32 | acks (ack.rs group
//! //     snapshot encoding) | registry_len: u32 | registry (subscriptions.yaml bytes)
//! //     | counts_len: u32 | counts (ack.rs delivery counts snapshot encoding)
//! //     | n: u64 | n × { offset: u64 | len: u32 | record } }    offsets ascending, in base..message_end
//! //   (v1, sent by earlier builds: the same without counts_len and counts)
//! // Format (store state, persisted, v3):
//! //   { version: u8 = 3 | message_end: u64 | acks_len: u32 | acks | registry_len: u32 | registry
//! //     | counts_len: u32 | counts }
//! //   (v2, written by builds b1c80cf..d269f7d: the same without counts_len and counts;
//! //   a v1 file, written by earlier builds, holds a whole wire v1 snapshot: its head is read)
//! ```
//! Invariants: every record of a snapshot lies below `message_end`, the end of the
//! *committed* messages (a leader's local, uncommitted tail never enters a snapshot); a
//! received snapshot is checked whole (bounds, order, lengths) before the store is touched.
//!
//! Does not: exclude a leader's acknowledgements not yet committed (they are
//! at-least-once anyway).

use std::io::{BufReader, Read, Seek, SeekFrom};
use std::sync::{Mutex, OnceLock};

use bytes::{BufMut, Bytes};
use entrepot_cluster::SnapshotSource;
use entrepot_storage::{AckLog, Log, StorageError};

use crate::broker::replication;
use crate::broker::subscriptions::REGISTRY_FILE;

/// Version byte of the store snapshot wire format this build sends.
pub const STORE_SNAPSHOT_VERSION: u8 = 2;
/// The wire format of earlier builds (no delivery counts), still read.
const STORE_SNAPSHOT_V1: u8 = 1;
/// Version byte of the persisted store state.
pub const STORE_STATE_VERSION: u8 = 3;
/// The persisted state of builds b1c80cf..d269f7d (no delivery counts), still read.
const STORE_STATE_V2: u8 = 2;
/// Largest record a received snapshot may carry (far above any stored message).
pub const MAX_SNAPSHOT_RECORD_BYTES: u32 = 64 << 20;
/// Largest ack-set or registry part of a snapshot.
pub const MAX_SNAPSHOT_PART_BYTES: u32 = 1 << 30;
/// Bytes of a record's frame in the wire format: offset u64, length u32.
const RECORD_HEAD: usize = 12;
/// Most bytes one read of a [`StoreSource`] copies before returning.
const SOURCE_READ_BYTES: usize = 256 * 1024;

/// Why a snapshot could not be taken, installed or read back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    #[error(
        "store snapshot version {0} is not supported (this build reads 1, {STORE_SNAPSHOT_VERSION} and {STORE_STATE_VERSION})"
    )]
    Version(u8),
    #[error("malformed store snapshot: {0}")]
    Malformed(&'static str),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("snapshot file or subscription registry: {0}")]
    Io(#[from] std::io::Error),
    /// The persisted snapshot file (its frame, written by `entrepot-cluster`).
    #[error(transparent)]
    File(#[from] entrepot_cluster::ClusterError),
}

/// The part of a store snapshot that is not message records (persisted; see module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreState {
    pub message_end: u64,
    acks: Vec<u8>,
    registry: Vec<u8>,
    /// Delivery counts (ack.rs counts snapshot encoding; empty from a v1 snapshot).
    counts: Vec<u8>,
}

impl StoreState {
    /// The ack sets and registry now, for the messages below `message_end`.
    pub fn capture(
        acks: &AckLog,
        dir: &std::path::Path,
        message_end: u64,
    ) -> Result<StoreState, SnapshotError> {
        let registry = match std::fs::read(dir.join(REGISTRY_FILE)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        Ok(StoreState {
            message_end,
            acks: acks.export_groups()?,
            registry,
            counts: acks.export_counts()?,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(21 + self.parts_len());
        out.put_u8(STORE_STATE_VERSION);
        out.put_u64_le(self.message_end);
        self.put_parts(&mut out);
        out
    }

    /// Bytes of the three length-prefixed parts.
    fn parts_len(&self) -> usize {
        12 + self.acks.len() + self.registry.len() + self.counts.len()
    }

    /// The ack sets, registry and delivery counts, each behind its u32 length (the order
    /// both formats share; [`read_part`] reads one back).
    fn put_parts(&self, out: &mut Vec<u8>) {
        for part in [&self.acks, &self.registry, &self.counts] {
            out.put_u32_le(part.len() as u32);
            out.put_slice(part);
        }
    }

    /// Reads a persisted state: v3; v2, which builds b1c80cf..d269f7d wrote (the v3
    /// layout without the counts part — no build ever persisted a whole v2 wire
    /// snapshot, so a leading 2 here is that state); or v1, the head of a whole wire v1
    /// snapshot that earlier builds persisted.
    pub fn decode(data: &[u8]) -> Result<StoreState, SnapshotError> {
        if data.first() == Some(&STORE_STATE_V2) {
            return decode_state_v2(&data[1..]);
        }
        let mut r = data;
        let head = read_head(&mut r)?;
        if head.version == STORE_STATE_VERSION && !r.is_empty() {
            return Err(SnapshotError::Malformed("trailing bytes"));
        }
        Ok(head.state)
    }
}

/// The body of a persisted state v2: `message_end | acks part | registry part`, and
/// nothing after; its delivery counts start empty (that build kept none).
fn decode_state_v2(mut r: &[u8]) -> Result<StoreState, SnapshotError> {
    let message_end = read_u64(&mut r)?;
    let acks = read_part(&mut r)?;
    let registry = read_part(&mut r)?;
    if !r.is_empty() {
        return Err(SnapshotError::Malformed("trailing bytes"));
    }
    Ok(StoreState {
        message_end,
        acks,
        registry,
        counts: Vec::new(),
    })
}

/// What precedes the records: the state, and for the wire format where records start.
struct Head {
    version: u8,
    state: StoreState,
    /// Wire format only: the first record's offset and how many records follow.
    base: u64,
    records: u64,
}

fn read_head(r: &mut impl Read) -> Result<Head, SnapshotError> {
    let mut version = [0u8; 1];
    read_exact(r, &mut version)?;
    let version = version[0];
    let wire = version == STORE_SNAPSHOT_VERSION || version == STORE_SNAPSHOT_V1;
    if !wire && version != STORE_STATE_VERSION {
        return Err(SnapshotError::Version(version));
    }
    let message_end = read_u64(r)?;
    let base = match wire {
        true => read_u64(r)?,
        false => message_end,
    };
    let acks = read_part(r)?;
    let registry = read_part(r)?;
    let counts = match version {
        STORE_SNAPSHOT_V1 => Vec::new(),
        _ => read_part(r)?,
    };
    let records = match wire {
        true => read_u64(r)?,
        false => 0,
    };
    if base > message_end || records > message_end - base {
        return Err(SnapshotError::Malformed("more records than offsets"));
    }
    Ok(Head {
        version,
        state: StoreState {
            message_end,
            acks,
            registry,
            counts,
        },
        base,
        records,
    })
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), SnapshotError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => SnapshotError::Malformed("truncated"),
        _ => SnapshotError::Io(e),
    })
}

fn read_u64(r: &mut impl Read) -> Result<u64, SnapshotError> {
    let mut b = [0u8; 8];
    read_exact(r, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_u32(r: &mut impl Read) -> Result<u32, SnapshotError> {
    let mut b = [0u8; 4];
    read_exact(r, &mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_part(r: &mut impl Read) -> Result<Vec<u8>, SnapshotError> {
    let len = read_u32(r)?;
    if len > MAX_SNAPSHOT_PART_BYTES {
        return Err(SnapshotError::Malformed("part longer than the limit"));
    }
    let mut part = Vec::new();
    r.take(u64::from(len)).read_to_end(&mut part)?;
    if part.len() != len as usize {
        return Err(SnapshotError::Malformed("truncated"));
    }
    Ok(part)
}

/// A store snapshot in the wire format, generated on read (see the module docs).
pub struct StoreSource {
    head: Vec<u8>,
    records: Vec<(u64, Bytes)>,
    /// Position just after each record's frame.
    ends: Vec<u64>,
}

impl StoreSource {
    /// The live records of `log` below `state.message_end` — those not acknowledged in the
    /// default group now (acknowledged since the state was taken is fine: the entry that
    /// did it follows the snapshot in the Raft log) — behind the state's head.
    pub fn new(state: &StoreState, log: &Log, acks: &AckLog) -> Result<StoreSource, SnapshotError> {
        let acked = acks.snapshot_set();
        let mut records = Vec::new();
        let start = log.first_offset().max(acked.floor());
        for offset in start..state.message_end.min(log.next_offset()) {
            if acked.contains(offset) {
                continue;
            }
            match log.read(offset) {
                Ok(r) => records.push((offset, r.payload)),
                Err(StorageError::OffsetOutOfRange { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let base = records.first().map_or(state.message_end, |r| r.0);
        let mut head = Vec::with_capacity(25 + state.parts_len());
        head.put_u8(STORE_SNAPSHOT_VERSION);
        head.put_u64_le(state.message_end);
        head.put_u64_le(base);
        state.put_parts(&mut head);
        head.put_u64_le(records.len() as u64);
        let mut end = head.len() as u64;
        let ends = records
            .iter()
            .map(|(_, r)| {
                end += (RECORD_HEAD + r.len()) as u64;
                end
            })
            .collect();
        Ok(StoreSource {
            head,
            records,
            ends,
        })
    }

    /// Records the snapshot carries.
    pub fn records(&self) -> usize {
        self.records.len()
    }
}

impl SnapshotSource for StoreSource {
    fn len(&self) -> u64 {
        self.ends.last().copied().unwrap_or(self.head.len() as u64)
    }

    fn read_at(&self, pos: u64, buf: &mut [u8]) -> usize {
        let copy = |from: &[u8], buf: &mut [u8]| {
            let n = from.len().min(buf.len());
            buf[..n].copy_from_slice(&from[..n]);
            n
        };
        let head = self.head.len() as u64;
        if pos < head {
            return copy(&self.head[pos as usize..], buf);
        }
        let i = self.ends.partition_point(|&e| e <= pos);
        let Some((offset, record)) = self.records.get(i) else {
            return 0;
        };
        let start = if i == 0 { head } else { self.ends[i - 1] };
        let within = (pos - start) as usize;
        if within < RECORD_HEAD {
            let mut frame = [0u8; RECORD_HEAD];
            frame[..8].copy_from_slice(&offset.to_le_bytes());
            frame[8..].copy_from_slice(&(record.len() as u32).to_le_bytes());
            return copy(&frame[within..], buf);
        }
        copy(&record[within - RECORD_HEAD..], buf)
    }
}

/// A [`StoreSource`] made on first read (a snapshot's data that may never be read). If
/// making it fails, the failure is logged and the source is empty, which a receiver
/// refuses as truncated (openraft then retries with a fresh snapshot).
pub struct LazySource {
    make: Mutex<Option<MakeSource>>,
    made: OnceLock<StoreSource>,
}

type MakeSource = Box<dyn FnOnce() -> Result<StoreSource, SnapshotError> + Send>;

impl LazySource {
    pub fn new(
        make: impl FnOnce() -> Result<StoreSource, SnapshotError> + Send + 'static,
    ) -> LazySource {
        LazySource {
            make: Mutex::new(Some(Box::new(make))),
            made: OnceLock::new(),
        }
    }

    fn get(&self) -> &StoreSource {
        self.made.get_or_init(|| {
            let make = self.make.lock().unwrap_or_else(|p| p.into_inner()).take();
            match make.map(|make| make()) {
                Some(Ok(source)) => source,
                Some(Err(e)) => {
                    tracing::error!(error = %e, "cannot read the store for a snapshot");
                    StoreSource::empty()
                }
                None => StoreSource::empty(),
            }
        })
    }
}

impl SnapshotSource for LazySource {
    fn len(&self) -> u64 {
        self.get().len()
    }

    fn read_at(&self, pos: u64, buf: &mut [u8]) -> usize {
        self.get().read_at(pos, buf)
    }
}

impl StoreSource {
    fn empty() -> StoreSource {
        StoreSource {
            head: Vec::new(),
            records: Vec::new(),
            ends: Vec::new(),
        }
    }

    /// Reads the whole snapshot into `out` (tests, and small tools).
    pub fn read_all(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len() as usize];
        let mut pos = 0;
        while pos < out.len() {
            let end = (pos + SOURCE_READ_BYTES).min(out.len());
            let n = self.read_at(pos as u64, &mut out[pos..end]);
            if n == 0 {
                break;
            }
            pos += n;
        }
        out
    }
}

/// Replaces the store with the wire snapshot in `file` and makes it durable; returns its
/// state (for persisting). The whole file is checked before the store is touched.
pub fn install_from(
    file: std::fs::File,
    log: &Log,
    acks: &AckLog,
    dir: &std::path::Path,
) -> Result<StoreState, SnapshotError> {
    let mut r = BufReader::new(file);
    let head = read_head(&mut r)?;
    if head.version == STORE_STATE_VERSION {
        return Err(SnapshotError::Malformed("not a wire snapshot"));
    }
    let records_at = r.stream_position()?;
    // Pass 1: frames in order and in range, lengths bounded, nothing after the last.
    let mut next = head.base;
    for i in 0..head.records {
        let offset = read_u64(&mut r)?;
        let len = read_u32(&mut r)?;
        let first_is_base = i > 0 || offset == head.base;
        if offset < next || offset >= head.state.message_end || !first_is_base {
            return Err(SnapshotError::Malformed(
                "record offsets out of order or range",
            ));
        }
        if len > MAX_SNAPSHOT_RECORD_BYTES {
            return Err(SnapshotError::Malformed("record longer than the limit"));
        }
        let skipped = std::io::copy(&mut (&mut r).take(u64::from(len)), &mut std::io::sink())?;
        if skipped != u64::from(len) {
            return Err(SnapshotError::Malformed("truncated"));
        }
        next = offset + 1;
    }
    if r.read(&mut [0u8; 1])? != 0 {
        return Err(SnapshotError::Malformed("trailing bytes"));
    }
    // Pass 2: install.
    r.seek(SeekFrom::Start(records_at))?;
    log.reset_to(head.base)?;
    let mut record = Vec::new();
    let mut next = head.base;
    for _ in 0..head.records {
        let offset = read_u64(&mut r)?;
        let len = read_u32(&mut r)? as usize;
        for _ in next..offset {
            log.append_view(0, &[])?;
        }
        record.resize(len, 0);
        read_exact(&mut r, &mut record)?;
        log.append_view(0, &[&record])?;
        next = offset + 1;
    }
    for _ in next..head.state.message_end {
        log.append_view(0, &[])?;
    }
    log.flush()?;
    let state = head.state;
    acks.import_groups(&state.acks)?;
    // Always replaced: a v1 snapshot (no counts) leaves none behind either.
    const NO_COUNTS: &[u8] = &[0];
    acks.import_counts(match state.counts.is_empty() {
        true => NO_COUNTS,
        false => &state.counts,
    })?;
    acks.log().flush()?;
    if state.registry.is_empty() {
        match std::fs::remove_file(dir.join(REGISTRY_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    } else {
        replication::write_file(dir, REGISTRY_FILE, &state.registry)?;
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::replication::tests::open;

    fn file_with(dir: &std::path::Path, bytes: &[u8]) -> std::fs::File {
        let path = dir.join("received");
        std::fs::write(&path, bytes).unwrap();
        std::fs::File::open(&path).unwrap()
    }

    #[test]
    fn a_snapshot_carries_live_records_at_their_offsets_and_only_committed_ones() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (log, acks) = open(a.path());
        for i in 0..10u8 {
            log.append_view(0, &[&[i; 3]]).unwrap();
        }
        acks.ack(&[0, 1, 2, 5]).unwrap();
        acks.raise_group_floor(3, 7).unwrap();
        acks.set_delivery_count(0, 6, 2).unwrap();
        replication::write_file(a.path(), REGISTRY_FILE, b"version: 1\n").unwrap();
        // 8 and 9 are a local tail that was never committed.
        let state = StoreState::capture(&acks, a.path(), 8).unwrap();
        assert_eq!(StoreState::decode(&state.encode()).unwrap(), state);
        let source = StoreSource::new(&state, &log, &acks).unwrap();
        assert_eq!(source.records(), 4, "3, 4, 6 and 7 are live");
        let bytes = source.read_all();
        assert_eq!(bytes.len() as u64, source.len());
        // The head of a v1 wire snapshot reads as its state (a v1 persisted file).
        let mut v1 = bytes.to_vec();
        v1[0] = STORE_SNAPSHOT_V1;
        let counts_at = 1 + 8 + 8 + 4 + state.acks.len() + 4 + state.registry.len();
        v1.drain(counts_at..counts_at + 4 + state.counts.len());
        let head = StoreState::decode(&v1).unwrap();
        assert_eq!(
            (head.message_end, &head.acks, &head.registry),
            (state.message_end, &state.acks, &state.registry)
        );
        assert!(head.counts.is_empty());

        let (log2, acks2) = open(b.path());
        for _ in 0..20 {
            log2.append_view(0, &[b"stale"]).unwrap();
        }
        acks2.ack(&[4]).unwrap();
        acks2.set_delivery_count(0, 7, 9).unwrap();
        let installed = install_from(file_with(b.path(), &bytes), &log2, &acks2, b.path()).unwrap();
        assert_eq!(installed, state);
        assert_eq!((log2.first_offset(), log2.next_offset()), (3, 8));
        for o in [3u64, 4, 6, 7] {
            assert_eq!(&log2.read(o).unwrap().payload[..], &[o as u8; 3]);
        }
        assert!(acks2.is_acked(5) && !acks2.is_acked(4) && acks2.is_group_acked(3, 6));
        assert_eq!(
            acks2.delivery_count(0, 6),
            2,
            "delivery counts travel with it"
        );
        assert_eq!(acks2.delivery_count(0, 7), 0, "and replace the receiver's");
        assert_eq!(
            std::fs::read(b.path().join(REGISTRY_FILE)).unwrap(),
            b"version: 1\n"
        );
    }

    #[test]
    fn a_damaged_snapshot_is_refused_before_the_store_is_touched() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (log, acks) = open(a.path());
        for i in 0..6u8 {
            log.append_view(0, &[&[i; 5]]).unwrap();
        }
        acks.ack(&[1]).unwrap();
        let state = StoreState::capture(&acks, a.path(), 6).unwrap();
        let bytes = StoreSource::new(&state, &log, &acks).unwrap().read_all();
        let (log2, acks2) = open(b.path());
        for _ in 0..9 {
            log2.append_view(0, &[b"kept"]).unwrap();
        }
        let untouched = |log2: &Log| {
            assert_eq!((log2.first_offset(), log2.next_offset()), (0, 9));
            assert_eq!(&log2.read(8).unwrap().payload[..], b"kept");
        };
        for cut in 0..bytes.len() {
            let r = install_from(file_with(b.path(), &bytes[..cut]), &log2, &acks2, b.path());
            assert!(r.is_err(), "a snapshot cut at byte {cut} was installed");
            untouched(&log2);
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(install_from(file_with(b.path(), &longer), &log2, &acks2, b.path()).is_err());
        let mut bad = bytes.clone();
        bad[0] = 9;
        assert!(matches!(
            install_from(file_with(b.path(), &bad), &log2, &acks2, b.path()),
            Err(SnapshotError::Version(9))
        ));
        untouched(&log2);
    }

    #[test]
    fn a_lazy_source_indexes_the_store_once_and_only_when_read() {
        let a = tempfile::tempdir().unwrap();
        let (log, acks) = open(a.path());
        log.append_view(0, &[b"live"]).unwrap();
        let state = StoreState::capture(&acks, a.path(), 1).unwrap();
        let expected = StoreSource::new(&state, &log, &acks).unwrap().read_all();
        let made = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = std::sync::Arc::clone(&made);
        let lazy = LazySource::new(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            StoreSource::new(&state, &log, &acks)
        });
        assert_eq!(made.load(std::sync::atomic::Ordering::SeqCst), 0);
        let mut got = vec![0u8; lazy.len() as usize];
        let mut pos = 0;
        while pos < got.len() {
            pos += lazy.read_at(pos as u64, &mut got[pos..]);
        }
        assert_eq!(got, expected);
        assert_eq!(made.load(std::sync::atomic::Ordering::SeqCst), 1);
        let failing = LazySource::new(|| Err(SnapshotError::Malformed("unreadable")));
        assert_eq!(
            failing.len(),
            0,
            "a failure reads as an empty, refused snapshot"
        );
    }

    #[test]
    fn a_source_reads_the_same_bytes_from_any_position() {
        let a = tempfile::tempdir().unwrap();
        let (log, acks) = open(a.path());
        for i in 0..50u8 {
            log.append_view(0, &[&vec![i; usize::from(i) * 7]]).unwrap();
        }
        let state = StoreState::capture(&acks, a.path(), 50).unwrap();
        let source = StoreSource::new(&state, &log, &acks).unwrap();
        let whole = source.read_all();
        for pos in (0..whole.len()).step_by(13) {
            let mut buf = [0u8; 29];
            let n = source.read_at(pos as u64, &mut buf);
            assert!(n > 0);
            assert_eq!(&buf[..n], &whole[pos..pos + n]);
        }
        assert_eq!(source.read_at(whole.len() as u64, &mut [0u8; 4]), 0);
    }
}
