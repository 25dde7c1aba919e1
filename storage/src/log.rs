//! The segment log: an ordered set of segments with one writer, many readers and a
//! group-commit thread.
//!
//! Invariants:
//! * Offsets are dense: the n-th record ever appended (after truncations) has offset n.
//! * Segments are sealed in order; an unsealed segment is always part of the tail: the
//!   segments a crash left unsealed are sealed at open, and a segment is never deleted
//!   while one before it is unsealed (recovery would read that gap as a torn tail).
//! * The durable offset published through [`Log::durable_watch`] never passes bytes that
//!   have not been synced (policy `Always`/`Interval`), nor a record whose segment's name
//!   is not yet durable in the directory (a roll leaves that directory sync to the next
//!   group-commit round).
//! * A roll takes the file `prepare.rs` prepared ahead when one is ready, and then costs
//!   the appender the header's 64 bytes: that segment keeps its temporary name until the
//!   first sync round that covers it has synced its header, so every `.seg` name that can
//!   reach the disk has a durable header (`FORMAT.md`); rolls without a ready file create
//!   their segment themselves, as before.
//! * Deleting or truncating never modifies bytes a reader may hold (see `segment.rs`).
//! * A deleted segment is released (unmapped and closed, when the kernel evicts its pages
//!   and frees its blocks) by the release thread of `retire.rs`, never under the log's
//!   locks: done under the `io` lock it stalled the sync thread, and every appender
//!   waiting for durability, for the ~0.1 s a 128 MiB segment takes (issue 15).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use tokio::sync::watch;

use crate::config::{LogConfig, SyncPolicy, MAX_BATCH_RECORDS};
use crate::error::{Result, StorageError};
use crate::prepare::{PrepareSpec, Preparer, PREPARE_AT_FILL_PERCENT};
use crate::record::{Record, RECORD_HEADER_LEN};
use crate::recovery;
use crate::retire;
use crate::segment::{Segment, PREFAULT_AHEAD_BYTES, PREFAULT_AHEAD_MAX_BYTES, SEGMENT_HEADER_LEN};
use crate::sync::{self, Durable, DurableState, LogStats, Prefault, SyncSignal};

/// A handle to an open log. Cheap to clone; all clones share one log.
#[derive(Clone)]
pub struct Log {
    inner: Arc<Inner>,
}

/// Where an appended record (or batch) went and how to wait for it.
#[derive(Debug)]
pub struct Appended {
    /// Offset of the first record appended.
    pub first: u64,
    /// Offset of the last record appended.
    pub last: u64,
    /// Completes when the last (and so every) record of the append is durable.
    pub durable: Durable,
}

/// Where a segment starts and ends, for retention and acknowledgement decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSpan {
    pub base: u64,
    /// Offset after the segment's last record.
    pub next: u64,
    /// Bytes of records in it.
    pub bytes: u64,
    /// True once every record in it is synced and it receives no more appends.
    pub sealed: bool,
    /// Timestamp of its last record (0 when empty).
    pub last_timestamp_ms: i64,
}

pub(crate) struct Inner {
    dir: PathBuf,
    config: LogConfig,
    read_only: bool,
    writer: Mutex<Writer>,
    /// Held by the sync thread during a sync round and by structural changes.
    io: Mutex<()>,
    segments: RwLock<BTreeMap<u64, Arc<Segment>>>,
    durable_tx: watch::Sender<DurableState>,
    signal: Arc<SyncSignal>,
    /// Populates the pages ahead of the appends during each sync (policies that sync; its
    /// thread starts with the first sync that has something to cover).
    prefault: Option<Arc<Prefault>>,
    /// Prepares the next segment's file once the active one is half full (policies that
    /// sync, writable logs; see `prepare.rs`).
    preparer: Option<Arc<Preparer>>,
    stats: LogStats,
}

/// What one group-commit round covered, for the sync thread's next gathering.
pub(crate) struct SyncRound {
    /// Records that became durable in this round.
    pub covered: u64,
    /// [`LogStats::records_appended`] when the round took its snapshot: appends counted
    /// above it were not covered and wait for the next round.
    pub appended: u64,
}

struct Writer {
    active: Arc<Segment>,
    next_offset: u64,
    last_timestamp_ms: i64,
    /// Rolled segments not yet synced and sealed.
    unsynced: Vec<Arc<Segment>>,
    /// Position up to which the active segment is synced.
    synced_pos: u64,
    poisoned: Option<Arc<str>>,
    /// Rolls so far, and how many of them a directory sync covered. A roll renames its new
    /// segment into the directory under the writer lock but leaves the directory sync to
    /// the sync thread, which does it before it publishes any record of that segment
    /// (a device flush less in the appenders' way, issue 15).
    rolls: u64,
    rolls_dir_synced: u64,
    /// The next segment's file was asked of the preparer for this active segment.
    prepare_requested: bool,
}

/// Synced bytes at the end of the active segment that readers may keep mapped in the
/// process (the records consumers read next); below them the pages are released, 1 MiB
/// at a time, so resident memory does not grow with the segment size (issue 15). Each
/// sync already unmaps the pages it covers (`Segment::unmap_before_sync`): what this
/// bounds are the pages readers fault back in.
pub const RESIDENT_TAIL_BYTES: u64 = 4 << 20;

/// Names of recycled files, unique in the process (as `prepare.rs` names its files).
static RECYCLED_NAME: AtomicU64 = AtomicU64::new(0);

/// What [`Inner::recycle`] did with a deleted segment.
enum Recycling {
    /// Not taken (recycling off or full, another handle on the segment): still to delete.
    Declined(Arc<Segment>),
    /// Consumed: its file renamed for the preparer, or unlinked; the outcome of that.
    Done(Result<()>),
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    crate::fsync::sync_dir(dir).map_err(|e| StorageError::io("syncing directory", dir, e))
}

impl Log {
    /// Opens the log in `dir` (created if missing), recovering from whatever state a crash
    /// left: verifies the unsealed tail, cuts a torn or corrupt end, rebuilds indexes.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<Log> {
        config.validate()?;
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir)
            .map_err(|e| StorageError::io("creating log directory", &dir, e))?;
        let recovered = recovery::recover(&dir, &config)?;
        let stats = LogStats::default();
        stats
            .recovered_torn_bytes
            .store(recovered.torn_bytes, Ordering::Relaxed);
        let active = match recovered.segments.last_key_value() {
            Some((_, seg)) => Arc::clone(seg),
            None => Arc::new(Segment::create(
                &dir,
                0,
                config.segment_bytes,
                config.record_bytes_max,
            )?),
        };
        let mut segments = recovered.segments;
        segments
            .entry(active.base())
            .or_insert_with(|| Arc::clone(&active));
        if !recovered.read_only {
            seal_leftovers(&segments, &active)?;
            if !active.is_sealed() {
                sync_recovered_tail(&active)?;
                active.expect_appends();
            }
        }
        sync_dir(&dir)?;
        let next_offset = active.next_offset();
        let last_timestamp_ms = segments
            .values()
            .map(|s| last_timestamp(s))
            .max()
            .unwrap_or(0);
        let (durable_tx, _) = watch::channel(DurableState {
            durable: next_offset,
            failed: None,
        });
        let signal = Arc::new(SyncSignal::default());
        let preparer = (config.sync != SyncPolicy::Never && !recovered.read_only).then(|| {
            Arc::new(Preparer::new(PrepareSpec {
                dir: dir.clone(),
                segment_bytes: config.segment_bytes,
                reserve_bytes: config.reserve_bytes,
                recycle_max: config.recycle_segments,
            }))
        });
        let inner = Arc::new(Inner {
            dir,
            read_only: recovered.read_only,
            writer: Mutex::new(Writer {
                synced_pos: active.written(),
                active,
                next_offset,
                last_timestamp_ms,
                unsynced: Vec::new(),
                poisoned: None,
                rolls: 0,
                rolls_dir_synced: 0,
                prepare_requested: false,
            }),
            io: Mutex::new(()),
            segments: RwLock::new(segments),
            durable_tx,
            signal: Arc::clone(&signal),
            prefault: (config.sync != SyncPolicy::Never).then(Arc::<Prefault>::default),
            preparer,
            stats,
            config,
        });
        let interval = match inner.config.sync {
            SyncPolicy::Always => Some(None),
            SyncPolicy::Interval(d) => Some(Some(d)),
            SyncPolicy::Never => None,
        };
        // A log reopened with its active segment past the mark asks at once.
        if let Ok(mut w) = inner.writer.lock() {
            inner.prepare_when_due(&mut w);
        }
        if let Some(interval) = interval {
            let weak = Arc::downgrade(&inner);
            let gather = inner.config.gather;
            let lazy = inner.config.lazy_delay();
            std::thread::Builder::new()
                .name("entrepot-sync".into())
                .spawn(move || sync::run(weak, signal, interval, gather, lazy))
                .map_err(|e| StorageError::io("starting sync thread", &inner.dir, e))?;
        }
        Ok(Log { inner })
    }

    /// The directory this log lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The configuration the log was opened with.
    pub fn config(&self) -> &LogConfig {
        &self.inner.config
    }

    /// Appends one record; returns its offset at once and a handle that completes when it
    /// is durable.
    pub fn append(&self, payload: &[u8]) -> Result<Appended> {
        self.append_parts(0, &[payload])
    }

    /// Appends one record whose payload is the concatenation of `parts`, with user `flags`
    /// (low 8 bits). Lets a caller prepend its own header without building a buffer.
    pub fn append_parts(&self, flags: u16, parts: &[&[u8]]) -> Result<Appended> {
        let mut w = self.inner.lock_writer()?;
        let (offset, _) = self.inner.append_locked(&mut w, flags, parts)?;
        drop(w);
        Ok(self.inner.appended(offset, offset))
    }

    /// Like [`Log::append_parts`], and also returns the stored payload as a zero-copy
    /// slice of the mapping, so the caller can drop its own buffer and keep this view.
    pub fn append_view(&self, flags: u16, parts: &[&[u8]]) -> Result<(Appended, Record)> {
        let mut w = self.inner.lock_writer()?;
        let (offset, pos) = self.inner.append_locked(&mut w, flags, parts)?;
        let seg = Arc::clone(&w.active);
        drop(w);
        let record = seg.read_at(pos, offset).map(|(r, _)| r)?;
        Ok((self.inner.appended(offset, offset), record))
    }

    /// Appends many records under one lock acquisition; they become durable together.
    pub fn append_batch<P: AsRef<[u8]>>(&self, payloads: &[P]) -> Result<Appended> {
        if payloads.len() > MAX_BATCH_RECORDS {
            return Err(StorageError::BatchTooLarge {
                count: payloads.len(),
                max: MAX_BATCH_RECORDS,
            });
        }
        let mut w = self.inner.lock_writer()?;
        let first = w.next_offset;
        let mut last = first;
        for p in payloads {
            last = self.inner.append_locked(&mut w, 0, &[p.as_ref()])?.0;
        }
        drop(w);
        if payloads.is_empty() {
            return Ok(Appended {
                first,
                last: first,
                durable: Durable::ready(first),
            });
        }
        Ok(self.inner.appended(first, last))
    }

    /// Reads the record at `offset`. The payload is a zero-copy slice of the mapping.
    pub fn read(&self, offset: u64) -> Result<Record> {
        let seg = self.inner.segment_for(offset)?;
        seg.read(offset).map(|(r, _)| r)
    }

    /// A sequential reader starting at `offset`.
    pub fn reader(&self, offset: u64) -> LogReader {
        LogReader {
            log: self.clone(),
            offset,
            at: None,
        }
    }

    /// Offset of the first retained record.
    pub fn first_offset(&self) -> u64 {
        self.inner
            .segments
            .read()
            .ok()
            .and_then(|s| s.values().next().map(|s| s.base()))
            .unwrap_or(0)
    }

    /// Offset the next append will get.
    pub fn next_offset(&self) -> u64 {
        self.inner.writer.lock().map_or(0, |w| w.next_offset)
    }

    /// Every offset below this is durable.
    pub fn durable_offset(&self) -> u64 {
        self.inner.durable_tx.borrow().durable
    }

    /// A receiver of durability progress, for callers that track many records at once.
    pub fn durable_watch(&self) -> watch::Receiver<DurableState> {
        self.inner.durable_tx.subscribe()
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &LogStats {
        &self.inner.stats
    }

    /// True when the next segment's file is prepared and a roll would take it instead of
    /// creating one under the writer lock (`prepare.rs`; for tests and diagnostics).
    pub fn next_segment_prepared(&self) -> bool {
        self.inner.preparer.as_ref().is_some_and(|p| p.is_ready())
    }

    /// True if the log was opened read-only because of corruption.
    pub fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    /// Syncs everything appended so far and waits for it (also under policy `Never`).
    pub fn flush(&self) -> Result<()> {
        self.inner.sync_once()
    }

    /// The first offset whose record's timestamp is at or after `timestamp_ms`, or `None`
    /// if every retained record is older.
    pub fn seek_time(&self, timestamp_ms: i64) -> Result<Option<u64>> {
        for seg in self.inner.snapshot() {
            if seg.len() > 0 && last_timestamp(&seg) >= timestamp_ms {
                return seg.seek_time(timestamp_ms);
            }
        }
        Ok(None)
    }

    /// Drops this process's mapping of the pages readers faulted back in since their
    /// segment released them: every sealed segment whole, the active one below its last
    /// [`RESIDENT_TAIL_BYTES`] synced. Meant to run periodically (the broker's
    /// housekeeping), so resident memory follows what consumers read recently.
    pub fn release_resident(&self) {
        let active = self
            .inner
            .lock_writer()
            .map(|w| (Arc::clone(&w.active), w.synced_pos));
        for seg in self.inner.snapshot() {
            if seg.is_sealed() {
                seg.release_pages();
            }
        }
        if let Ok((active, synced)) = active {
            if !active.is_sealed() {
                active.release_again_below(synced.saturating_sub(RESIDENT_TAIL_BYTES));
            }
        }
    }

    /// Start, end, size and state of every retained segment, oldest first.
    pub fn segments(&self) -> Vec<SegmentSpan> {
        self.inner
            .snapshot()
            .iter()
            .map(|s| SegmentSpan {
                base: s.base(),
                next: s.next_offset(),
                bytes: s.written() - SEGMENT_HEADER_LEN as u64,
                sealed: s.is_sealed(),
                last_timestamp_ms: last_timestamp(s),
            })
            .collect()
    }

    /// Deletes one sealed segment (queues use this once every record in it is
    /// acknowledged). The active segment is never deleted. Returns whether it was.
    ///
    /// The file's name is gone when this returns; its pages and blocks are freed by a
    /// background thread moments later (see `retire.rs`: the release of a 128 MiB segment
    /// takes ~0.1 s, and neither the caller nor the log's sync waits for it). A roll that
    /// finds the disk full waits for pending releases before it reports [`StorageError::DiskFull`].
    pub fn delete_segment(&self, base: u64) -> Result<bool> {
        let _io = self.inner.lock_io()?;
        let w = self.inner.lock_writer()?;
        if w.active.base() == base {
            return Ok(false);
        }
        // Never behind an unsealed segment: recovery reads a gap after an unsealed
        // segment as a torn tail and cuts everything after it (see `seal_leftovers`).
        let removed = self
            .inner
            .segments
            .write()
            .ok()
            .and_then(|mut s| match s.get(&base) {
                Some(seg)
                    if seg.is_sealed() && s.range(..base).all(|(_, prev)| prev.is_sealed()) =>
                {
                    s.remove(&base)
                }
                _ => None,
            });
        drop(w);
        let Some(seg) = removed else { return Ok(false) };
        let seg = match self.inner.recycle(seg) {
            Recycling::Declined(seg) => seg,
            Recycling::Done(outcome) => {
                drop(_io);
                outcome?;
                self.inner
                    .stats
                    .segments_deleted
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(true);
            }
        };
        let unlinked = seg
            .unlink()
            .map_err(|e| StorageError::io("deleting segment", seg.path(), e));
        drop(_io);
        // Unmapping and closing the unlinked file is when the kernel evicts its pages and
        // frees its blocks (~0.1 s for 128 MiB): never under the `io` lock the sync thread
        // needs, nor on the caller's thread (see `retire.rs`).
        retire::retire(seg);
        unlinked?;
        self.inner
            .stats
            .segments_deleted
            .fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Deletes every whole segment whose records all lie below `offset` (the Raft log's
    /// purge, topic retention). Segment-granular: records below `offset` that share a
    /// segment with later ones stay readable. Returns the new first offset.
    pub fn purge_before(&self, offset: u64) -> Result<u64> {
        let bases: Vec<u64> = self
            .segments()
            .iter()
            .filter(|s| s.next <= offset && s.sealed)
            .map(|s| s.base)
            .collect();
        for base in bases {
            self.delete_segment(base)?;
        }
        Ok(self.first_offset())
    }

    /// Removes every record at or after `offset` (the Raft log's conflicting suffix). When
    /// it returns, the shorter log is durable and the next append gets `offset`.
    pub fn truncate_from(&self, offset: u64) -> Result<()> {
        if self.inner.read_only {
            return Err(StorageError::ReadOnly);
        }
        let _io = self.inner.lock_io()?;
        let mut w = self.inner.lock_writer()?;
        if offset >= w.next_offset {
            return Ok(());
        }
        self.inner.truncate_locked(&mut w, offset)
    }
}

impl Log {
    /// Empties the log and makes `base` the next offset: every segment is deleted and a
    /// fresh one starts at `base` (a Raft snapshot replacing a follower's store). Readers
    /// keep the bytes they hold. When it returns, the empty log is durable.
    pub fn reset_to(&self, base: u64) -> Result<()> {
        if self.inner.read_only {
            return Err(StorageError::ReadOnly);
        }
        let _io = self.inner.lock_io()?;
        let mut w = self.inner.lock_writer()?;
        self.inner.truncate_locked(&mut w, 0)?;
        if w.next_offset == base {
            return Ok(());
        }
        // The log is one empty active segment now; replace it with one at `base`.
        let old = Arc::clone(&w.active);
        let fresh = Arc::new(Segment::create(
            &self.inner.dir,
            base,
            self.inner.config.segment_bytes,
            self.inner.config.record_bytes_max,
        )?);
        old.unlink()
            .map_err(|e| StorageError::io("deleting segment", old.path(), e))?;
        sync_dir(&self.inner.dir)?;
        if let Ok(mut s) = self.inner.segments.write() {
            s.clear();
            s.insert(base, Arc::clone(&fresh));
        }
        w.unsynced.clear();
        w.synced_pos = fresh.written();
        w.next_offset = base;
        w.active = fresh;
        w.prepare_requested = false;
        self.inner.durable_tx.send_modify(|s| s.durable = base);
        retire::retire(old);
        Ok(())
    }
}

impl Inner {
    pub(crate) fn stats(&self) -> &LogStats {
        &self.stats
    }

    fn lock_writer(&self) -> Result<MutexGuard<'_, Writer>> {
        self.writer.lock().map_err(|_| StorageError::Closed)
    }

    fn lock_io(&self) -> Result<MutexGuard<'_, ()>> {
        self.io.lock().map_err(|_| StorageError::Closed)
    }

    fn snapshot(&self) -> Vec<Arc<Segment>> {
        self.segments
            .read()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }

    fn segment_for(&self, offset: u64) -> Result<Arc<Segment>> {
        let segments = self.segments.read().map_err(|_| StorageError::Closed)?;
        let found = segments
            .range(..=offset)
            .next_back()
            .map(|(_, s)| s)
            .filter(|s| offset < s.next_offset());
        match found {
            Some(seg) => Ok(Arc::clone(seg)),
            None => Err(StorageError::OffsetOutOfRange {
                offset,
                first: segments.values().next().map_or(0, |s| s.base()),
                next: segments.values().next_back().map_or(0, |s| s.next_offset()),
            }),
        }
    }

    fn appended(&self, first: u64, last: u64) -> Appended {
        let durable = match self.config.sync {
            SyncPolicy::Never => Durable::ready(last),
            _ => {
                // A lazy log's append only arms the deadline; a waiter asks (`demand`).
                let demand = match self.config.lazy_delay() {
                    Some(_) => {
                        self.signal.arm();
                        Some(Arc::clone(&self.signal))
                    }
                    None => {
                        self.signal.notify();
                        None
                    }
                };
                Durable {
                    rx: Some(self.durable_tx.subscribe()),
                    offset: last,
                    demand,
                }
            }
        };
        Appended {
            first,
            last,
            durable,
        }
    }

    /// Appends under the writer lock; returns the offset and byte position in the active segment.
    fn append_locked(&self, w: &mut Writer, flags: u16, parts: &[&[u8]]) -> Result<(u64, u64)> {
        if self.read_only {
            return Err(StorageError::ReadOnly);
        }
        if let Some(reason) = &w.poisoned {
            return Err(StorageError::SyncFailed {
                path: self.dir.clone(),
                reason: reason.to_string(),
            });
        }
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len as u64 > u64::from(self.config.record_bytes_max) {
            return Err(StorageError::RecordTooLarge {
                size: len as u64,
                max: u64::from(self.config.record_bytes_max),
            });
        }
        let frame_len = RECORD_HEADER_LEN + len;
        if w.active.is_sealed() || (frame_len as u64) > w.active.remaining() {
            self.roll(w)?;
        }
        let ts = now_ms().max(w.last_timestamp_ms);
        w.last_timestamp_ms = ts;
        let (offset, pos) = w.active.append(
            ts,
            flags & crate::record::FLAGS_USER_MASK,
            parts,
            frame_len,
            self.config.index_interval_bytes,
        );
        w.next_offset = offset + 1;
        self.prepare_when_due(w);
        self.stats.records_appended.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_appended
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok((offset, pos))
    }

    /// Asks the preparer for the next segment's file once the active one is filled past
    /// [`PREPARE_AT_FILL_PERCENT`] (once per segment).
    fn prepare_when_due(&self, w: &mut Writer) {
        if !w.prepare_requested
            && w.active.written() * 100 >= w.active.capacity() * PREPARE_AT_FILL_PERCENT
        {
            if let (Some(preparer), Some(prefault)) = (&self.preparer, &self.prefault) {
                if preparer.request() && !prefault.request_prepare(preparer) {
                    preparer.close(); // no thread to run it: rolls create their segments
                }
            }
            w.prepare_requested = true;
        }
    }

    /// Starts a new active segment. The old one is sealed by the sync thread once synced
    /// (or at once under policy `Never`), and the sync thread also syncs the directory
    /// that now names the new one before it publishes any record of it: under the writer
    /// lock a roll costs the file's creation, preallocation and one fsync. Fails with
    /// `ReserveReached` when the new segment would eat into the configured free-space
    /// reserve, with `DiskFull` when it cannot be preallocated; either way the log is
    /// unchanged and the append can be retried.
    fn roll(&self, w: &mut Writer) -> Result<()> {
        let started = Instant::now();
        let prepared = self
            .preparer
            .as_ref()
            .and_then(|p| p.take())
            .filter(|f| f.capacity() == self.config.segment_bytes)
            .and_then(|f| f.take());
        let from_prepared = prepared.is_some();
        let seg = match prepared {
            Some(parts) => Arc::new(Segment::from_prepared(
                parts,
                &self.dir,
                w.next_offset,
                self.config.record_bytes_max,
            )),
            None => self.create_rolled(w.next_offset)?,
        };
        w.rolls += 1;
        w.prepare_requested = false;
        if self.config.sync == SyncPolicy::Never {
            sync_dir(&self.dir)?; // no sync thread to do it
            w.rolls_dir_synced = w.rolls;
        }
        if let Ok(mut segments) = self.segments.write() {
            segments.insert(seg.base(), Arc::clone(&seg));
        }
        let old = std::mem::replace(&mut w.active, seg);
        // A prepared file's header is in the page cache only: the first round syncs it
        // with the records (the same page) before it names the segment.
        w.synced_pos = if from_prepared {
            0
        } else {
            SEGMENT_HEADER_LEN as u64
        };
        if self.config.sync == SyncPolicy::Never {
            old.seal()
                .map_err(|e| StorageError::io("sealing segment", old.path(), e))?;
        } else if !old.is_sealed() {
            w.unsynced.push(old);
        }
        self.stats.observe_roll(started.elapsed(), from_prepared);
        Ok(())
    }

    /// Keeps the file of a deleted segment for a later one when the preparer takes one and
    /// the segment is this log's only handle on it (`Segment::into_recycled`, which
    /// unlinks it instead when a reader still maps it); otherwise declines, and the
    /// caller unlinks and retires the segment.
    fn recycle(&self, seg: Arc<Segment>) -> Recycling {
        let Some(preparer) = self.preparer.as_ref().filter(|p| p.wants_recycled()) else {
            return Recycling::Declined(seg);
        };
        if seg.capacity() != self.config.segment_bytes {
            return Recycling::Declined(seg);
        }
        let seg = match Arc::try_unwrap(seg) {
            Ok(seg) => seg,
            Err(shared) => return Recycling::Declined(shared),
        };
        let old = seg.path().to_path_buf();
        let to = self.dir.join(format!(
            "recycled-{}.seg.tmp",
            RECYCLED_NAME.fetch_add(1, Ordering::Relaxed)
        ));
        let file = match seg.into_recycled(&to) {
            Ok(Some(file)) => file,
            Ok(None) => return Recycling::Done(Ok(())),
            Err(e) => return Recycling::Done(Err(StorageError::io("recycling segment", &old, e))),
        };
        if let Err(file) = preparer.offer(file) {
            let _ = fs::remove_file(&file.path);
            return Recycling::Done(Ok(()));
        }
        self.stats.segments_recycled.fetch_add(1, Ordering::Relaxed);
        Recycling::Done(Ok(()))
    }

    /// Creates the segment of a roll that found no prepared file.
    fn create_rolled(&self, base: u64) -> Result<Arc<Segment>> {
        match self.create_next(base) {
            // Segments deleted a moment ago give their blocks back once the release
            // thread dropped them: wait for it before reporting the disk full.
            Err(e) if e.is_out_of_space() && retire::is_busy() => {
                retire::wait_idle(retire::RETIRE_WAIT_MAX);
                self.create_next(base)
            }
            created => created,
        }
    }

    /// Creates the segment a roll starts at `base`, if it leaves the free-space reserve.
    fn create_next(&self, base: u64) -> Result<Arc<Segment>> {
        crate::space::check_reserve(
            &self.dir,
            self.config.segment_bytes,
            self.config.reserve_bytes,
        )?;
        Segment::create(
            &self.dir,
            base,
            self.config.segment_bytes,
            self.config.record_bytes_max,
        )
        .map(Arc::new)
    }

    /// One group-commit round: sync what is written (and the directory after a roll),
    /// publish, then seal the segments completed since the last round.
    pub(crate) fn sync_once(&self) -> Result<()> {
        self.sync_round().map(|_| ())
    }

    /// [`Inner::sync_once`], telling the sync thread what the round covered.
    pub(crate) fn sync_round(&self) -> Result<SyncRound> {
        let _io = self.lock_io()?;
        let (rolled, active, from, to, next, appended, rolls) = {
            let w = self.lock_writer()?;
            if let Some(reason) = &w.poisoned {
                return Err(StorageError::SyncFailed {
                    path: self.dir.clone(),
                    reason: reason.to_string(),
                });
            }
            (
                w.unsynced.clone(),
                Arc::clone(&w.active),
                w.synced_pos,
                w.active.written(),
                w.next_offset,
                // Appends count under the writer lock, so this matches `next`.
                self.stats.records_appended.load(Ordering::Relaxed),
                (w.rolls > w.rolls_dir_synced).then_some(w.rolls),
            )
        };
        // The appenders this sync will release copy into the pages after `to` next: have
        // them populated while the disk works — twice what this round covers, so a round
        // of large records does not outrun them. The thread is woken only once fewer
        // than that are populated ahead, and then populates twice as far: one wake-up
        // per few rounds instead of one per round (each cost both threads a context
        // switch, a quarter of the prefault thread's CPU once recycled files made the
        // populating itself cheap, `benches/RESULTS.md` session 21).
        let ahead =
            (2 * to.saturating_sub(from)).clamp(PREFAULT_AHEAD_BYTES, PREFAULT_AHEAD_MAX_BYTES);
        let lead = active.prefaulted_to().saturating_sub(to);
        if let Some(prefault) = self.prefault.as_ref().filter(|_| to > from && lead < ahead) {
            prefault.request(&active, 2 * ahead);
        }
        let started = Instant::now();
        let result = self.sync_segments(&rolled, &active, from, to, rolls.is_some());
        self.stats.observe_sync(started.elapsed());
        if let Err(e) = result {
            return Err(self.poison(e));
        }
        let mut w = self.lock_writer()?;
        w.unsynced
            .retain(|s| !rolled.iter().any(|r| Arc::ptr_eq(r, s)));
        if Arc::ptr_eq(&w.active, &active) {
            w.synced_pos = w.synced_pos.max(to);
        }
        if let Some(rolls) = rolls {
            w.rolls_dir_synced = w.rolls_dir_synced.max(rolls);
        }
        drop(w);
        // Synced and never written again: only the tail the consumers are about to read
        // stays mapped (sealed segments release everything when sealed).
        active.release_below(to.saturating_sub(RESIDENT_TAIL_BYTES));
        let mut covered = 0;
        self.durable_tx.send_if_modified(|s| {
            covered = next.saturating_sub(s.durable);
            s.durable = s.durable.max(next);
            covered > 0
        });
        // Seal the rolled segments only now: their records are synced and published, and
        // the seal's own flush, index files and release are no longer in the way of the
        // appenders this round covered (issue 15). Still under the `io` lock, so nothing
        // deletes a segment behind one that is not sealed yet.
        for seg in &rolled {
            seg.seal().map_err(|e| {
                self.poison(StorageError::SyncFailed {
                    path: seg.path().to_path_buf(),
                    reason: e.to_string(),
                })
            })?;
        }
        Ok(SyncRound { covered, appended })
    }

    /// Makes the log read-only after a failed sync (the kernel may have dropped dirty
    /// pages) and tells every waiter; returns the error for the caller to report.
    fn poison(&self, e: StorageError) -> StorageError {
        let reason: Arc<str> = Arc::from(e.to_string());
        if let Ok(mut w) = self.writer.lock() {
            w.poisoned = Some(Arc::clone(&reason));
        }
        self.durable_tx.send_modify(|s| s.failed = Some(reason));
        tracing::error!(error = %e, dir = %self.dir.display(), "sync failed, log is now read-only");
        e
    }

    /// Syncs the tails of the rolled segments, `from..to` of the active one and, after a
    /// roll (`dir`), the directory: the segments rolled since the last round are in it for
    /// good before any of their records is published.
    fn sync_segments(
        &self,
        rolled: &[Arc<Segment>],
        active: &Segment,
        from: u64,
        to: u64,
        dir: bool,
    ) -> Result<()> {
        for seg in rolled {
            seg.sync_range(0, seg.written())
                .map_err(|e| StorageError::SyncFailed {
                    path: seg.path().to_path_buf(),
                    reason: e.to_string(),
                })?;
        }
        active.unmap_before_sync(from, to);
        active
            .sync_range(from, to)
            .map_err(|e| StorageError::SyncFailed {
                path: active.path().to_path_buf(),
                reason: e.to_string(),
            })?;
        // Segments made from prepared files get their names now that their headers are
        // synced (rolled ones above from 0, the active one from 0 in its first round), in
        // order, and the directory sync below makes the names durable.
        for seg in rolled.iter().map(|s| &**s).chain([active]) {
            seg.name().map_err(|e| StorageError::SyncFailed {
                path: seg.path().to_path_buf(),
                reason: e.to_string(),
            })?;
        }
        if dir {
            crate::fsync::sync_dir(&self.dir).map_err(|e| StorageError::SyncFailed {
                path: self.dir.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }

    fn truncate_locked(&self, w: &mut Writer, offset: u64) -> Result<()> {
        self.name_pending(w)?;
        let doomed: Vec<Arc<Segment>> = self
            .snapshot()
            .into_iter()
            .filter(|s| s.base() >= offset)
            .rev()
            .collect();
        for seg in doomed {
            seg.unlink()
                .map_err(|e| StorageError::io("deleting segment", seg.path(), e))?;
            if let Ok(mut s) = self.segments.write() {
                s.remove(&seg.base());
            }
            self.stats.segments_deleted.fetch_add(1, Ordering::Relaxed);
            // Rare (Raft truncation, snapshot install): handed over under the locks.
            retire::retire(seg);
        }
        let keep = self.snapshot().pop();
        let active = match keep {
            Some(seg) if seg.next_offset() > offset => Arc::new(self.rewrite_prefix(&seg, offset)?),
            Some(seg) => seg,
            None => Arc::new(Segment::create(
                &self.dir,
                offset,
                self.config.segment_bytes,
                self.config.record_bytes_max,
            )?),
        };
        sync_dir(&self.dir)?;
        if let Ok(mut s) = self.segments.write() {
            s.insert(active.base(), Arc::clone(&active));
        }
        w.unsynced.retain(|s| s.base() < active.base());
        w.synced_pos = active.written();
        w.next_offset = offset;
        w.active = active;
        w.prepare_requested = false;
        self.durable_tx
            .send_modify(|s| s.durable = s.durable.min(offset));
        Ok(())
    }

    /// Syncs and names the segments still under a prepared file's temporary name, and the
    /// directory (truncation and reset replace files by name; rare, under both locks).
    fn name_pending(&self, w: &Writer) -> Result<()> {
        let pending: Vec<&Arc<Segment>> = w
            .unsynced
            .iter()
            .chain([&w.active])
            .filter(|s| !s.is_named())
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        for seg in pending {
            seg.sync_range(0, seg.written())
                .and_then(|()| seg.name().map(|_| ()))
                .map_err(|e| StorageError::io("naming a prepared segment", seg.path(), e))?;
        }
        sync_dir(&self.dir)
    }

    /// Copies the records of `seg` below `offset` into a new file and renames it over the
    /// old one, so readers of the old mapping keep seeing unchanged bytes.
    fn rewrite_prefix(&self, seg: &Segment, offset: u64) -> Result<Segment> {
        let pos = seg_position(seg, offset)?;
        let tmp = seg.path().with_extension("seg.tmp");
        let _ = fs::remove_file(&tmp);
        let fresh = Segment::create_at(
            &tmp,
            seg.base(),
            seg.capacity(),
            self.config.record_bytes_max,
            seg.salt(),
        )?;
        fresh.fill_from(seg.prefix(pos), self.config.index_interval_bytes);
        fresh
            .sync_range(0, fresh.written())
            .map_err(|e| StorageError::io("syncing truncated segment", &tmp, e))?;
        fs::rename(&tmp, seg.path())
            .map_err(|e| StorageError::io("replacing truncated segment", seg.path(), e))?;
        let _ = fs::remove_file(crate::index::offset_index_path(seg.path()));
        let _ = fs::remove_file(crate::index::time_index_path(seg.path()));
        Ok(fresh.renamed(seg.path().to_path_buf()))
    }
}

fn seg_position(seg: &Segment, offset: u64) -> Result<u64> {
    let mut reader_pos = SEGMENT_HEADER_LEN as u64;
    let mut at = seg.base();
    if let Some((rel, pos)) = seg
        .index
        .read()
        .ok()
        .and_then(|i| i.floor_offset((offset - seg.base()) as u32))
    {
        at = seg.base() + u64::from(rel);
        reader_pos = u64::from(pos);
    }
    while at < offset {
        let (_, next) = seg.read_at(reader_pos, at)?;
        reader_pos = next;
        at += 1;
    }
    Ok(reader_pos)
}

fn last_timestamp(seg: &Segment) -> i64 {
    match seg.len() {
        0 => 0,
        n => seg
            .read(seg.base() + n - 1)
            .map_or(0, |(r, _)| r.timestamp_ms),
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.signal.close();
        if let Some(prefault) = &self.prefault {
            prefault.close();
        }
        if self.config.sync != SyncPolicy::Never && !self.read_only {
            if let Err(e) = self.sync_once() {
                tracing::error!(error = %e, "final sync on close failed");
            }
        }
        if let Some(preparer) = &self.preparer {
            preparer.close();
        }
    }
}

/// Seals every unsealed segment but the active one, after syncing it: a process killed
/// after a roll and before the sync thread sealed the old segment leaves it unsealed, and
/// nothing in the new process would ever seal it (only the segments it rolls itself wait
/// in `Writer::unsynced`). Left unsealed, it is never reclaimed, and once a later sealed
/// segment is deleted the next recovery sees a gap after an unsealed segment — the mark
/// of a torn tail — and cuts every later segment, acknowledged or not.
fn seal_leftovers(segments: &BTreeMap<u64, Arc<Segment>>, active: &Arc<Segment>) -> Result<()> {
    for seg in segments.values() {
        if Arc::ptr_eq(seg, active) || seg.is_sealed() {
            continue;
        }
        seg.sync_range(0, seg.written())
            .and_then(|()| seg.seal())
            .map_err(|e| StorageError::io("sealing a segment left unsealed", seg.path(), e))?;
        tracing::info!(path = %seg.path().display(), "sealed a segment a crash left unsealed");
    }
    Ok(())
}

/// Syncs the records recovery found in the active segment before the log reports them
/// durable (it publishes everything it recovered as durable, and syncs later appends by
/// the range they were written to). After a process crash they may exist only in the
/// page cache, never synced by the process that wrote them: a power cut after the restart
/// could lose their pages and keep a later, acknowledged append, and recovery — which
/// stops at the first frame that does not verify — would then cut that append too.
/// Cheap when they were synced: only dirty pages are written.
fn sync_recovered_tail(active: &Segment) -> Result<()> {
    active
        .sync_range(SEGMENT_HEADER_LEN as u64, active.written())
        .map_err(|e| StorageError::io("syncing the recovered tail", active.path(), e))
}

/// Reads records in offset order, remembering its position so each step is one decode.
pub struct LogReader {
    log: Log,
    offset: u64,
    at: Option<(Arc<Segment>, u64)>,
}

impl LogReader {
    /// The offset the next call to [`LogReader::next_record`] reads.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next record, `Ok(None)` at the end of the written log. Skips holes left by
    /// deleted segments.
    pub fn next_record(&mut self) -> Result<Option<Record>> {
        loop {
            if let Some((seg, pos)) = &self.at {
                if self.offset < seg.next_offset() {
                    let (rec, next_pos) = seg.read_at(*pos, self.offset)?;
                    self.at = Some((Arc::clone(seg), next_pos));
                    self.offset += 1;
                    return Ok(Some(rec));
                }
                if !seg.is_sealed() && self.offset >= self.log.next_offset() {
                    return Ok(None);
                }
            }
            let segments = self
                .log
                .inner
                .segments
                .read()
                .map_err(|_| StorageError::Closed)?;
            let seg = segments
                .range(..=self.offset)
                .next_back()
                .map(|(_, s)| s)
                .filter(|s| self.offset < s.next_offset())
                .or_else(|| segments.range(self.offset + 1..).next().map(|(_, s)| s))
                .cloned();
            drop(segments);
            let Some(seg) = seg else { return Ok(None) };
            if seg.base() > self.offset {
                self.offset = seg.base();
            }
            if self.offset >= seg.next_offset() {
                return Ok(None);
            }
            let pos = seg_position(&seg, self.offset)?;
            self.at = Some((seg, pos));
        }
    }
}

impl Iterator for LogReader {
    type Item = Result<Record>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}
