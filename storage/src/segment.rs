//! One segment file: a preallocated, memory-mapped run of record frames.
//!
//! A segment owns its file, its mapping and its sparse index. Records are copied into the
//! mapping by the single writer (the log holds the writer lock) and published by bumping
//! `written` with release ordering; readers only look below `written`, so they never see
//! a half-written frame. Reads return `Bytes` slices of one `Bytes` that owns the mapping,
//! so a payload handed to a consumer keeps the mapping alive even after the segment is
//! deleted from the log.
//!
//! # Safety contract of the mapping
//! * A mapped segment file is never truncated or shrunk while mapped: truncation of the log
//!   writes a fresh file and renames it over the old one, and deletion only unlinks. On
//!   Linux an unlinked or replaced inode stays readable through existing mappings.
//! * Bytes below `written` are never modified again (except by recovery before the
//!   segment is shared with any reader).
//! * Space is reserved with `posix_fallocate` when the segment is created, so writing to
//!   the mapping never needs new blocks (a sparse mapping would SIGBUS on a full disk).
//!
//! Does not decide when to sync or roll: the log does.

use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Result, StorageError};
use crate::fsync;
use crate::index::{offset_index_path, time_index_path, SegmentIndex};
use crate::prepare::PreparedParts;
use crate::record::{self, FrameFault, Record, RecordHeader, RECORD_HEADER_LEN};

/// Magic bytes at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"ENTRPSEG";
/// Version of the segment and record format this build writes (2: the header carries the
/// salt the record CRCs start from, see `record.rs`).
pub const SEGMENT_VERSION: u16 = 2;
/// Oldest segment version this build reads (v1: no salt, read as salt 0).
pub const SEGMENT_VERSION_MIN: u16 = 1;
/// Bytes reserved for the segment header; the first record starts here.
pub const SEGMENT_HEADER_LEN: usize = 64;
const SEAL_MAGIC: [u8; 4] = *b"SEAL";
/// Header flag (bytes 10..12, v2): the file held an earlier segment, whose frames may lie
/// past this one's last record (recovery reads its tail accordingly, `recovery.rs`).
const FLAG_RECYCLED: u16 = 1;

// Format (segment header, 64 bytes):
// { magic: [u8; 8] = "ENTRPSEG" | version: u16 LE | flags: u16 LE (v2; bit 0 recycled) | salt: u32 LE (v2; zero in v1) | base_offset: u64 LE | created_ms: i64 LE
//   | header_crc: u32 LE (of bytes 0..32) | reserved: u32
//   | seal_magic: [u8; 4] = "SEAL" or zeros | seal_crc: u32 LE (of bytes 48..64) | next_offset: u64 LE | end_position: u64 LE }

/// How a scan of the written area ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScanEnd {
    /// Position after the last valid record.
    pub end_pos: u64,
    /// Offset after the last valid record.
    pub next_offset: u64,
    /// The first frame that failed, if the scan did not end on zeros.
    pub fault: Option<FrameFault>,
}

/// Owner handed to `Bytes::from_owner`: keeps the mapping alive while any slice lives.
struct MapOwner(Arc<MmapRaw>);

impl AsRef<[u8]> for MapOwner {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the mapping is valid for `len` bytes for as long as `self.0` lives; this is
        // called once, by `Bytes::from_owner`, before the segment is shared. Later slices
        // are only dereferenced below `written` (see the module's safety contract).
        unsafe { std::slice::from_raw_parts(self.0.as_ptr(), self.0.len()) }
    }
}

pub(crate) struct Segment {
    path: PathBuf,
    base: u64,
    capacity: u64,
    record_bytes_max: u32,
    map: Arc<MmapRaw>,
    view: Bytes,
    _file: File,
    written: AtomicU64,
    next_offset: AtomicU64,
    sealed: AtomicBool,
    /// Bytes from the start whose pages this process no longer maps (see
    /// [`Segment::release_below`]).
    released: AtomicU64,
    /// Position up to which pages past the written end were populated (see
    /// [`Segment::prefault_ahead`]).
    prefaulted: AtomicU64,
    /// The temporary name of a segment made from a prepared file (`prepare.rs`) until the
    /// sync round that first covers it has synced its header and renamed it to `path`.
    pending_name: Mutex<Option<PathBuf>>,
    /// What every record CRC of this segment starts from (`record.rs`; 0 in a v1 segment).
    salt: u32,
    /// The file held an earlier segment ([`FLAG_RECYCLED`]).
    recycled: bool,
    pub(crate) index: RwLock<SegmentIndex>,
}

/// A deleted segment's file, renamed to a temporary name and handed to the preparer to be
/// the file of a later segment (`prepare.rs`). Nothing maps it any more.
pub(crate) struct RecycledFile {
    pub path: PathBuf,
    pub file: File,
    pub capacity: u64,
    /// The salt of the segment it held, which the next one must not reuse.
    pub salt: u32,
}

/// A salt for a new segment, never `avoid` (the salt of the file's previous segment):
/// from the kernel's random source, or, should that fail, from the clock and a counter
/// (still different from `avoid`, which is what stale frames need; only a frame forged
/// inside a message body relies on the salt being unpredictable).
pub(crate) fn new_salt(avoid: u32) -> u32 {
    static FALLBACK: AtomicU64 = AtomicU64::new(0);
    let mut buf = [0u8; 4];
    // SAFETY: `buf` is valid for 4 writable bytes.
    let got = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    let mut salt = if got == 4 {
        u32::from_le_bytes(buf)
    } else {
        let n = FALLBACK.fetch_add(1, Ordering::Relaxed);
        let mix = (now_ms() as u64) ^ n.rotate_left(32) ^ u64::from(std::process::id());
        (mix ^ (mix >> 32)) as u32
    };
    if salt == avoid {
        salt = salt.wrapping_add(1);
    }
    salt
}

/// Granularity of releasing an active segment's synced pages: 1 MiB at a time.
pub const RELEASE_CHUNK_BYTES: u64 = 1 << 20;
/// How far past the written end [`Segment::prefault_ahead`] keeps pages populated at
/// least: 1 MiB, several group-commit rounds of small records (a round of 64 × 1 KiB is
/// 66 KiB). Rounds that cover more get twice their size ahead, up to
/// [`PREFAULT_AHEAD_MAX_BYTES`].
pub const PREFAULT_AHEAD_BYTES: u64 = 1 << 20;
/// Most pages populated ahead of the written end (dirty zeros resident until filled).
pub const PREFAULT_AHEAD_MAX_BYTES: u64 = 16 << 20;
const _: () = assert!(PREFAULT_AHEAD_BYTES <= PREFAULT_AHEAD_MAX_BYTES);
/// Page size assumed when rounding prefault ranges (x86-64, aarch64 with 4 KiB pages; a
/// larger page only makes the kernel round the range out).
const PAGE_BYTES: u64 = 4096;
/// Largest page-cache folio the kernel builds on x86-64 (a PMD, 2 MiB): what a read of a
/// recovered tail may have cached around its written end (see [`Segment::expect_appends`]).
const LARGE_FOLIO_BYTES: u64 = 2 << 20;

/// File name of the segment with base offset `base`.
pub(crate) fn segment_file_name(base: u64) -> String {
    format!("{base:020}.seg")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Segment {
    /// Creates, preallocates and maps a new empty segment, durable before it returns.
    ///
    /// The file is built under a `.tmp` name and renamed once its header is synced, so a
    /// crash in the middle leaves a temporary file (removed at the next open), never a
    /// `.seg` file without a valid header. The caller syncs the directory.
    pub fn create(dir: &Path, base: u64, capacity: u64, record_bytes_max: u32) -> Result<Segment> {
        let path = dir.join(segment_file_name(base));
        let tmp = path.with_extension("seg.tmp");
        let _ = std::fs::remove_file(&tmp);
        let seg = Self::create_at(&tmp, base, capacity, record_bytes_max, new_salt(0))?;
        if let Err(e) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(StorageError::io("naming new segment", &path, e));
        }
        Ok(seg.renamed(path))
    }

    /// Like [`Segment::create`] at an explicit path (truncation builds a temporary file,
    /// with the salt of the segment whose frames it copies).
    pub fn create_at(
        path: &Path,
        base: u64,
        capacity: u64,
        record_bytes_max: u32,
        salt: u32,
    ) -> Result<Segment> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| StorageError::io("creating segment", path, e))?;
        let built = Self::init_file(file, path, base, capacity, record_bytes_max, salt);
        if built.is_err() {
            let _ = std::fs::remove_file(path);
        }
        built
    }

    fn init_file(
        file: File,
        path: &Path,
        base: u64,
        capacity: u64,
        record_bytes_max: u32,
        salt: u32,
    ) -> Result<Segment> {
        #[cfg(feature = "crash-sim")]
        crate::crash_sim::before_allocate(path)
            .map_err(|e| StorageError::io("preallocating segment", path, e))?;
        // SAFETY: plain FFI call on an open descriptor.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, capacity as libc::off_t) };
        if rc != 0 {
            return Err(StorageError::io(
                "preallocating segment",
                path,
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        let mut seg = Self::map(file, path, base, capacity, record_bytes_max)?;
        seg.salt = salt;
        seg.expect_appends();
        seg.write_header();
        // One fsync makes the header (dirtied through the mapping, so in the page cache),
        // the size and the preallocated extents durable together; a separate `msync` of
        // the header first cost a second device flush, under the log's writer lock when
        // a roll creates the segment (issue 15).
        fsync::sync_file(&seg._file, path)
            .map_err(|e| StorageError::io("syncing segment", path, e))?;
        Ok(seg)
    }

    /// Writes the header (magic, version, salt, base, creation time, CRC; the seal zeroed:
    /// a recycled file still holds its previous segment's) into the mapping; the caller
    /// makes it durable.
    fn write_header(&self) {
        let mut header = [0u8; SEGMENT_HEADER_LEN];
        header[0..8].copy_from_slice(&SEGMENT_MAGIC);
        header[8..10].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        let flags = if self.recycled { FLAG_RECYCLED } else { 0 };
        header[10..12].copy_from_slice(&flags.to_le_bytes());
        header[12..16].copy_from_slice(&self.salt.to_le_bytes());
        header[16..24].copy_from_slice(&self.base.to_le_bytes());
        header[24..32].copy_from_slice(&now_ms().to_le_bytes());
        let crc = crc32fast::hash(&header[0..32]);
        header[32..36].copy_from_slice(&crc.to_le_bytes());
        // SAFETY: the segment is not shared yet; the header lies inside the mapping.
        unsafe { self.write_at(0, &header) };
    }

    /// Makes a segment of base `base` from a file prepared ahead (`prepare.rs`; a new file
    /// or a recycled one): draws its salt and writes its header into the mapping, nothing
    /// else — no system call but the salt's `getrandom`. The segment keeps its
    /// temporary name until [`Segment::name`]; its header is durable only once a sync of
    /// its range from 0 returned, which the log does before naming it.
    pub(crate) fn from_prepared(
        parts: PreparedParts,
        dir: &Path,
        base: u64,
        record_bytes_max: u32,
    ) -> Segment {
        let PreparedParts {
            path: tmp,
            file,
            map,
            capacity,
            prefaulted,
            previous_salt,
        } = parts;
        let mut seg = Self::from_map(
            file,
            map,
            &dir.join(segment_file_name(base)),
            base,
            capacity,
            record_bytes_max,
        );
        seg.salt = new_salt(previous_salt.unwrap_or(0));
        seg.recycled = previous_salt.is_some();
        seg.prefaulted.store(prefaulted, Ordering::Release);
        if let Ok(mut pending) = seg.pending_name.lock() {
            *pending = Some(tmp);
        }
        seg.write_header();
        seg
    }

    /// True unless the segment still has the temporary name of its prepared file.
    pub(crate) fn is_named(&self) -> bool {
        self.pending_name.lock().map_or(true, |p| p.is_none())
    }

    /// Renames a segment made from a prepared file to its final name (the caller synced
    /// its header, and syncs the directory next). Returns whether it renamed anything.
    pub(crate) fn name(&self) -> std::io::Result<bool> {
        let mut pending = self
            .pending_name
            .lock()
            .map_err(|_| std::io::Error::other("segment name lock poisoned"))?;
        let Some(tmp) = pending.as_ref() else {
            return Ok(false);
        };
        std::fs::rename(tmp, &self.path)?;
        *pending = None;
        Ok(true)
    }

    fn map(
        file: File,
        path: &Path,
        base: u64,
        capacity: u64,
        record_bytes_max: u32,
    ) -> Result<Segment> {
        let map = MmapOptions::new()
            .len(capacity as usize)
            .map_raw(&file)
            .map_err(|e| StorageError::io("mapping segment", path, e))?;
        Ok(Self::from_map(
            file,
            map,
            path,
            base,
            capacity,
            record_bytes_max,
        ))
    }

    fn from_map(
        file: File,
        map: MmapRaw,
        path: &Path,
        base: u64,
        capacity: u64,
        record_bytes_max: u32,
    ) -> Segment {
        let map = Arc::new(map);
        let view = Bytes::from_owner(MapOwner(Arc::clone(&map)));
        Segment {
            path: path.to_path_buf(),
            base,
            capacity,
            record_bytes_max,
            map,
            view,
            _file: file,
            written: AtomicU64::new(SEGMENT_HEADER_LEN as u64),
            next_offset: AtomicU64::new(base),
            sealed: AtomicBool::new(false),
            released: AtomicU64::new(0),
            prefaulted: AtomicU64::new(0),
            pending_name: Mutex::new(None),
            salt: 0,
            recycled: false,
            index: RwLock::new(SegmentIndex::default()),
        }
    }

    /// Maps an existing segment and checks its header. Records are not scanned yet.
    pub fn open(path: &Path, record_bytes_max: u32) -> Result<(Segment, Option<(u64, u64)>)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| StorageError::io("opening segment", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| StorageError::io("reading segment size", path, e))?
            .len();
        if len < SEGMENT_HEADER_LEN as u64 {
            return Err(StorageError::BadMagic {
                path: path.to_path_buf(),
                kind: "segment",
            });
        }
        let probe = Self::map(file, path, 0, len, record_bytes_max)?;
        let h = &probe.view[..SEGMENT_HEADER_LEN];
        if h[0..8] != SEGMENT_MAGIC {
            return Err(StorageError::BadMagic {
                path: path.to_path_buf(),
                kind: "segment",
            });
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if !(SEGMENT_VERSION_MIN..=SEGMENT_VERSION).contains(&version) {
            return Err(StorageError::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version,
                supported: SEGMENT_VERSION,
            });
        }
        if crc32fast::hash(&h[0..32]) != le_u32(&h[32..36]) {
            return Err(StorageError::Corrupt {
                path: path.to_path_buf(),
                position: 0,
                offset: 0,
                reason: "segment header CRC mismatch",
            });
        }
        let base = le_u64(&h[16..24]);
        let seal = (h[40..44] == SEAL_MAGIC && crc32fast::hash(&h[48..64]) == le_u32(&h[44..48]))
            .then(|| (le_u64(&h[48..56]), le_u64(&h[56..64])))
            .filter(|&(next, end)| next >= base && end >= SEGMENT_HEADER_LEN as u64 && end <= len);
        let (flags, salt) = match version {
            1 => (0, 0),
            _ => (u16::from_le_bytes([h[10], h[11]]), le_u32(&h[12..16])),
        };
        if flags & !FLAG_RECYCLED != 0 {
            return Err(StorageError::Corrupt {
                path: path.to_path_buf(),
                position: 10,
                offset: base,
                reason: "unknown segment header flags",
            });
        }
        let mut seg = probe;
        seg.salt = salt;
        seg.recycled = flags & FLAG_RECYCLED != 0;
        seg.base = base;
        seg.next_offset = AtomicU64::new(base);
        Ok((seg, seal))
    }

    pub fn base(&self) -> u64 {
        self.base
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn capacity(&self) -> u64 {
        self.capacity
    }
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }
    pub fn next_offset(&self) -> u64 {
        self.next_offset.load(Ordering::Acquire)
    }
    /// Position up to which pages past the written end are populated.
    pub(crate) fn prefaulted_to(&self) -> u64 {
        self.prefaulted.load(Ordering::Acquire)
    }
    pub fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }
    /// Number of records in the segment.
    pub fn len(&self) -> u64 {
        self.next_offset() - self.base
    }

    /// Copies `data` into the mapping at `pos`.
    ///
    /// # Safety
    /// The caller is the only writer and `pos..pos + data.len()` lies at or above `written`
    /// (no reader can look there) and inside the mapping.
    unsafe fn write_at(&self, pos: u64, data: &[u8]) {
        debug_assert!(pos + data.len() as u64 <= self.capacity);
        std::ptr::copy_nonoverlapping(
            data.as_ptr(),
            self.map.as_mut_ptr().add(pos as usize),
            data.len(),
        );
    }

    /// Bytes left for records.
    pub fn remaining(&self) -> u64 {
        self.capacity - self.written()
    }

    /// Appends one record frame. The caller holds the log's writer lock and has checked
    /// that `frame_len` fits in [`Segment::remaining`].
    /// Returns the record's offset and byte position.
    pub fn append(
        &self,
        timestamp_ms: i64,
        flags: u16,
        parts: &[&[u8]],
        frame_len: usize,
        index_interval: u32,
    ) -> (u64, u64) {
        let pos = self.written();
        let offset = self.next_offset();
        // SAFETY: single writer (log writer lock); the region is above `written` and the
        // caller checked it fits inside the mapping.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(pos as usize), frame_len)
        };
        record::encode(dst, self.salt, offset, timestamp_ms, flags, parts);
        if let Ok(mut index) = self.index.write() {
            index.observe(
                (offset - self.base) as u32,
                pos as u32,
                timestamp_ms,
                index_interval,
            );
        }
        self.next_offset.store(offset + 1, Ordering::Release);
        self.written
            .store(pos + frame_len as u64, Ordering::Release);
        (offset, pos)
    }

    /// Walks the frames from the header on, verifying each, rebuilding the index, and
    /// publishing what verified. Only called before the segment is shared.
    pub fn scan(&self, index_interval: u32) -> ScanEnd {
        let mut index = SegmentIndex::default();
        let mut pos = SEGMENT_HEADER_LEN as u64;
        let mut offset = self.base;
        let fault = loop {
            let data = &self.view[pos as usize..self.capacity as usize];
            match record::decode(data, self.salt, offset, self.record_bytes_max) {
                Ok(h) => {
                    index.observe(
                        (offset - self.base) as u32,
                        pos as u32,
                        h.timestamp_ms,
                        index_interval,
                    );
                    pos += h.frame_len() as u64;
                    offset += 1;
                }
                Err(FrameFault::Empty) => break None,
                Err(FrameFault::Truncated) if data.len() < RECORD_HEADER_LEN => break None,
                Err(fault) => break Some(fault),
            }
        };
        self.publish(pos, offset, index);
        ScanEnd {
            end_pos: pos,
            next_offset: offset,
            fault,
        }
    }

    /// Trusts a seal and an index loaded from disk instead of scanning.
    pub fn adopt(&self, end_pos: u64, next_offset: u64, index: SegmentIndex) {
        self.publish(end_pos, next_offset, index);
        self.sealed.store(true, Ordering::Release);
    }

    fn publish(&self, end_pos: u64, next_offset: u64, index: SegmentIndex) {
        if let Ok(mut slot) = self.index.write() {
            *slot = index;
        }
        self.next_offset.store(next_offset, Ordering::Release);
        self.written.store(end_pos, Ordering::Release);
    }

    /// Zeroes everything from `pos` to the end of the file and syncs it, so no stale frame
    /// past a cut can ever verify again. Only called before the segment is shared.
    pub fn zero_from(&self, pos: u64) -> Result<()> {
        let len = (self.capacity - pos) as usize;
        // SAFETY: not shared yet (recovery) — no reader holds slices of this region.
        unsafe { std::ptr::write_bytes(self.map.as_mut_ptr().add(pos as usize), 0, len) };
        self.sync_range(pos, self.capacity)
            .map_err(|e| StorageError::io("zeroing torn tail", &self.path, e))
    }

    /// Unmaps from this process the whole pages of `from..to` (`MADV_DONTNEED`) before a
    /// sync writes them back: writeback write-protects every mapped dirty page it cleans,
    /// one TLB shootdown (an IPI to each core running the process; a VM exit in a guest)
    /// per page, and that came to ~40 % of the sync thread's CPU (`benches/RESULTS.md`
    /// session 7). Unmapped first, the pages are cleaned without it. The bytes stay in the
    /// page cache, dirty until the sync: the mapping is shared, so an access faults the same
    /// page back, and an appender still writing the page holding `to` is not disturbed.
    pub(crate) fn unmap_before_sync(&self, from: u64, to: u64) {
        let from = from / PAGE_BYTES * PAGE_BYTES;
        let to = to.min(self.capacity) / PAGE_BYTES * PAGE_BYTES;
        if to <= from {
            return;
        }
        let _ = self.dont_need(from, to);
    }

    /// Syncs the byte range `from..to` of the mapping (`msync(MS_SYNC)`, i.e. fdatasync).
    pub fn sync_range(&self, from: u64, to: u64) -> std::io::Result<()> {
        if to <= from {
            return Ok(());
        }
        fsync::sync_mapped(
            &self._file,
            &self.path,
            &self.map,
            from as usize,
            (to - from) as usize,
        )
    }

    /// Marks the segment complete: writes and syncs the seal, then (best effort) the index
    /// files. Called after every record in it is synced.
    pub fn seal(&self) -> std::io::Result<()> {
        let mut seal = [0u8; 24];
        seal[0..4].copy_from_slice(&SEAL_MAGIC);
        seal[8..16].copy_from_slice(&self.next_offset().to_le_bytes());
        seal[16..24].copy_from_slice(&self.written().to_le_bytes());
        let crc = crc32fast::hash(&seal[8..24]);
        seal[4..8].copy_from_slice(&crc.to_le_bytes());
        // SAFETY: bytes 40..64 of the header are the seal slot, written only here, and
        // readers never read the header through `Bytes`.
        unsafe { self.write_at(40, &seal) };
        self.sync_range(0, SEGMENT_HEADER_LEN as u64)?;
        self.sealed.store(true, Ordering::Release);
        // The index files are a cache that the next open rebuilds when missing: failing to
        // write them (a full disk) must not fail the sync and poison the log.
        if let Ok(index) = self.index.read() {
            if let Err(e) = index.persist(&self.path, self.base) {
                tracing::warn!(path = %self.path.display(), error = %e, "could not write index files, they will be rebuilt on open");
            }
        }
        self.release_pages();
        // Never written again: readers catching up from the disk get readahead back.
        if let Err(e) = self.map.advise(memmap2::Advice::Normal) {
            tracing::debug!(path = %self.path.display(), error = %e, "madvise(NORMAL) failed");
        }
        Ok(())
    }

    /// Prepares the mapping for appends: no readahead on a page fault (`MADV_RANDOM`), and
    /// no page-cache pages left above the written end that a read brought in with it.
    ///
    /// Why: a fault on a file mapping reads around the faulting page, and on a file system
    /// with large folios (ext4 since Linux 6.x) readahead fills the page cache with folios of
    /// up to 2 MiB. The first write to a page makes the kernel dirty its *whole folio*
    /// (`page_mkwrite` commits every block of it), and every `msync` then writes the whole
    /// folio back — after each sync it is write-protected, so the next 1 KiB append dirties
    /// it again. Measured (issue 15, `benches/RESULTS.md` session 7): 1 KiB frames synced
    /// every 64 wrote 1,026 MB to the disk for 67 MB of records, and each sync took 1.6×
    /// fio's `fdatasync` of the same 64 KiB. Without readahead a fault brings one 4 KiB
    /// page, and a sync writes the pages appended since the last one.
    pub(crate) fn expect_appends(&self) {
        if let Err(e) = self.map.advise(memmap2::Advice::Random) {
            tracing::debug!(path = %self.path.display(), error = %e, "madvise(RANDOM) failed");
        }
        let written = self.written();
        if written <= SEGMENT_HEADER_LEN as u64 {
            return; // created by this process: nothing was read in
        }
        // A recovered tail was scanned with readahead: drop the cached folios from the one
        // that holds the written end (a folio is at most LARGE_FOLIO_BYTES) to the end of
        // the file. Clean pages only go (the kernel keeps dirty ones); readers fault the
        // written bytes back from the disk.
        let from = written / LARGE_FOLIO_BYTES * LARGE_FOLIO_BYTES;
        let _ = self.dont_need(from, self.capacity);
        // SAFETY: plain FFI call on an open descriptor; the range lies inside the file.
        let rc = unsafe {
            libc::posix_fadvise(
                self._file.as_raw_fd(),
                from as libc::off_t,
                (self.capacity - from) as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        if rc != 0 {
            tracing::debug!(path = %self.path.display(), error = rc, "posix_fadvise(DONTNEED) failed");
        }
    }

    /// Faults in, writable, the pages from the written end to `ahead` bytes past it
    /// (clamped to [`PREFAULT_AHEAD_BYTES`]..=[`PREFAULT_AHEAD_MAX_BYTES`]) that are not yet (`MADV_POPULATE_WRITE`, Linux 5.14+), so appends copy into
    /// present pages instead of faulting under the writer lock. Meant for the log's
    /// prefault thread while a sync waits for the disk: a first-touch fault of a page of a
    /// preallocated file costs a page allocation, zeroing and the file system's
    /// `page_mkwrite` — 5-9 µs on the machine of `benches/RESULTS.md` session 7, and a
    /// round of 64 × 1 KiB appends touches 16 new pages. Returns false when the kernel
    /// refuses the advice (the caller stops asking).
    ///
    /// Writes no byte: the pages read as the zeros the file holds there, a reader never
    /// looks past `written`, and pages already present (the one holding the written end,
    /// which appenders share) are only made writable. The populated pages are dirty zeros
    /// until records fill them and a sync covers them; written back earlier, they write
    /// zeros over zeros.
    pub(crate) fn prefault_ahead(&self, ahead: u64) -> bool {
        let ahead = ahead.clamp(PREFAULT_AHEAD_BYTES, PREFAULT_AHEAD_MAX_BYTES);
        let written = self.written();
        let from = self
            .prefaulted
            .load(Ordering::Acquire)
            .max(written.next_multiple_of(PAGE_BYTES));
        let to = ((written + ahead).min(self.capacity) / PAGE_BYTES) * PAGE_BYTES;
        if to <= from || self.is_sealed() {
            return true;
        }
        match self.map.advise_range(
            memmap2::Advice::PopulateWrite,
            from as usize,
            (to - from) as usize,
        ) {
            Ok(()) => {
                self.prefaulted.fetch_max(to, Ordering::AcqRel);
                true
            }
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "madvise(POPULATE_WRITE) failed, appends fault their own pages");
                false
            }
        }
    }

    /// Drops this process's mapping of the segment's pages (`MADV_DONTNEED`): a sealed
    /// segment is synced and never written again, so its pages need not count in the
    /// broker's resident memory — a reader that comes later faults them back in from the
    /// page cache or the file. Without it every page written stays resident until the
    /// segment is deleted (issue 15: 1 MiB messages peaked at ~200 MiB of file pages).
    /// Releases the pages of whole [`RELEASE_CHUNK_BYTES`] chunks below `pos` not released
    /// yet, as [`Segment::release_pages`] does for a whole sealed segment: the log calls it
    /// on the active segment with a synced position, so a segment being filled keeps only
    /// its tail resident. The caller never writes below `pos` again.
    pub(crate) fn release_below(&self, pos: u64) {
        let from = self.released.load(Ordering::Acquire);
        self.release_range(from, pos);
    }

    /// Releases everything below `pos` again, pages readers faulted back in included (the
    /// periodic pass of [`crate::Log::release_resident`]).
    pub(crate) fn release_again_below(&self, pos: u64) {
        self.release_range(0, pos);
    }

    fn release_range(&self, from: u64, pos: u64) {
        let to = pos.min(self.capacity) / RELEASE_CHUNK_BYTES * RELEASE_CHUNK_BYTES;
        if to <= from {
            return;
        }
        if self.dont_need(from, to) {
            self.released.fetch_max(to, Ordering::AcqRel);
        }
    }

    /// Drops this process's mapping of the pages `from..to` (`MADV_DONTNEED`, the range
    /// clamped to the mapping); returns whether the kernel took the advice (a refusal is
    /// logged at debug: the pages then simply stay mapped).
    fn dont_need(&self, from: u64, to: u64) -> bool {
        let to = to.min(self.capacity);
        if to <= from {
            return true;
        }
        // SAFETY: as in `release_pages`; `from..to` lies inside the mapping (clamped).
        let advised = unsafe {
            self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                from as usize,
                (to - from) as usize,
            )
        };
        if let Err(e) = &advised {
            tracing::debug!(path = %self.path.display(), error = %e, "madvise(DONTNEED) failed");
        }
        advised.is_ok()
    }

    pub(crate) fn release_pages(&self) {
        // SAFETY: the mapping is shared and backed by the file (`map_raw`): after
        // MADV_DONTNEED an access repopulates the page from the file's current contents
        // (dirty pages stay dirty in the page cache), so no byte any reader holds changes.
        // Only private or anonymous mappings would read back zeros.
        let advised = unsafe {
            self.map
                .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
        };
        if let Err(e) = advised {
            tracing::debug!(path = %self.path.display(), error = %e, "madvise(DONTNEED) failed");
        }
    }

    /// Finds the byte position of `offset`, walking forward from the nearest index entry.
    fn locate(&self, offset: u64) -> Result<(u64, RecordHeader)> {
        let rel = (offset - self.base) as u32;
        let (mut at_rel, mut pos) = self
            .index
            .read()
            .ok()
            .and_then(|idx| idx.floor_offset(rel))
            .map_or((0, SEGMENT_HEADER_LEN as u64), |(r, p)| (r, u64::from(p)));
        let written = self.written() as usize;
        loop {
            let data = &self.view[pos as usize..written];
            if at_rel == rel {
                let h = record::decode(data, self.salt, offset, self.record_bytes_max)
                    .map_err(|f| self.corrupt(pos, offset, f))?;
                return Ok((pos, h));
            }
            if data.len() < RECORD_HEADER_LEN {
                return Err(self.corrupt(
                    pos,
                    self.base + u64::from(at_rel),
                    FrameFault::Truncated,
                ));
            }
            let h = record::peek_header(data);
            if h.offset != self.base + u64::from(at_rel) || h.len > self.record_bytes_max {
                return Err(self.corrupt(
                    pos,
                    self.base + u64::from(at_rel),
                    FrameFault::BadOffset,
                ));
            }
            pos += h.frame_len() as u64;
            at_rel += 1;
        }
    }

    fn corrupt(&self, position: u64, offset: u64, fault: FrameFault) -> StorageError {
        StorageError::Corrupt {
            path: self.path.clone(),
            position,
            offset,
            reason: fault.reason(),
        }
    }

    /// Reads the record at `offset`, which must lie in `base..next_offset`.
    pub fn read(&self, offset: u64) -> Result<(Record, u64)> {
        let (pos, h) = self.locate(offset)?;
        Ok((self.record_at(pos, &h), pos + h.frame_len() as u64))
    }

    /// Reads the record that starts at `pos` and must carry `offset` (sequential readers).
    pub fn read_at(&self, pos: u64, offset: u64) -> Result<(Record, u64)> {
        let data = &self.view[pos as usize..self.written() as usize];
        let h = record::decode(data, self.salt, offset, self.record_bytes_max)
            .map_err(|f| self.corrupt(pos, offset, f))?;
        Ok((self.record_at(pos, &h), pos + h.frame_len() as u64))
    }

    fn record_at(&self, pos: u64, h: &RecordHeader) -> Record {
        let start = pos as usize + RECORD_HEADER_LEN;
        Record {
            offset: h.offset,
            timestamp_ms: h.timestamp_ms,
            flags: h.flags,
            payload: self.view.slice(start..start + h.len as usize),
        }
    }

    /// The raw bytes from `pos` to the end of the file (recovery's report of a cut tail).
    pub fn raw_tail(&self, pos: u64) -> &[u8] {
        &self.view[pos as usize..self.capacity as usize]
    }

    /// The raw bytes of the records before `pos` (used to copy a prefix on truncation).
    pub fn prefix(&self, pos: u64) -> &[u8] {
        &self.view[SEGMENT_HEADER_LEN..pos as usize]
    }

    /// Appends already framed bytes (a verified prefix of another segment) to a fresh,
    /// unshared segment, then rescans to rebuild the index.
    pub fn fill_from(&self, frames: &[u8], index_interval: u32) -> ScanEnd {
        // SAFETY: unshared fresh segment; `frames` fits because it came from a segment of
        // the same capacity.
        unsafe { self.write_at(SEGMENT_HEADER_LEN as u64, frames) };
        self.scan(index_interval)
    }

    /// Gives a segment built under a temporary name its final path (after the rename).
    pub fn renamed(mut self, path: PathBuf) -> Segment {
        self.path = path;
        self
    }

    /// The salt its record CRCs start from (0 in a v1 segment).
    pub(crate) fn salt(&self) -> u32 {
        self.salt
    }

    /// True when the file held an earlier segment: bytes past the last record are that
    /// segment's frames, not zeros.
    pub(crate) fn is_recycled(&self) -> bool {
        self.recycled
    }

    /// Turns a deleted segment into a file for a later one, when nothing else maps it (no
    /// reader holds a payload of it: those bytes must keep their meaning) and it is named
    /// and sealed: unmaps it, deletes its index files and renames it to `to`, unsynced (the
    /// preparer syncs the directory before anything writes to the file). Otherwise it is
    /// unlinked as [`Segment::unlink`] does, and `None` returned. The caller took it out
    /// of the log's map and holds the only handle.
    pub(crate) fn into_recycled(self, to: &Path) -> std::io::Result<Option<RecycledFile>> {
        let reusable = self.is_named() && self.is_sealed();
        let unlinked = if reusable { Ok(()) } else { self.unlink() };
        let Segment {
            path,
            capacity,
            map,
            view,
            _file: file,
            salt,
            ..
        } = self;
        unlinked?;
        drop(view); // the last `Bytes` of the mapping unless a reader holds a slice
        if !reusable {
            return Ok(None);
        }
        let _ = std::fs::remove_file(offset_index_path(&path));
        let _ = std::fs::remove_file(time_index_path(&path));
        if Arc::strong_count(&map) != 1 {
            // A reader's payload keeps the mapping (and with it the inode) alive: closing
            // our handle here evicts nothing, that reader's last drop will.
            std::fs::remove_file(&path)?;
            return Ok(None);
        }
        drop(map); // unmapped; the pages stay in the page cache for the next segment
        std::fs::rename(&path, to)?;
        Ok(Some(RecycledFile {
            path: to.to_path_buf(),
            file,
            capacity,
            salt,
        }))
    }

    /// Removes the files of this segment from the directory (the mapping stays valid).
    pub fn unlink(&self) -> std::io::Result<()> {
        if let Some(tmp) = self.pending_name.lock().ok().and_then(|mut p| p.take()) {
            return std::fs::remove_file(tmp);
        }
        let _ = std::fs::remove_file(offset_index_path(&self.path));
        let _ = std::fs::remove_file(time_index_path(&self.path));
        std::fs::remove_file(&self.path)
    }

    /// The first offset in this segment whose timestamp is at or after `ts`, or `None` if
    /// every record is older.
    pub fn seek_time(&self, ts: i64) -> Result<Option<u64>> {
        let start_rel = self.index.read().map_or(0, |idx| idx.floor_time(ts));
        let mut offset = self.base + u64::from(start_rel);
        if offset >= self.next_offset() {
            return Ok(None);
        }
        let (mut pos, mut header) = self.locate(offset)?;
        loop {
            if header.timestamp_ms >= ts {
                return Ok(Some(offset));
            }
            pos += header.frame_len() as u64;
            offset += 1;
            if offset >= self.next_offset() {
                return Ok(None);
            }
            header = record::peek_header(&self.view[pos as usize..self.written() as usize]);
        }
    }
}

pub(crate) fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_le_bytes(a)
}

pub(crate) fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}
