//! Preparing a log's next segment file off the appenders' path (issue 15).
//!
//! A roll used to create its segment under the log's writer lock: open, `posix_fallocate`
//! of the whole segment, header and one `fsync` — 0.6–1.1 ms on a quiet disk, up to 5 ms
//! on a loaded one, during which no appender of the log could append. Once the active
//! segment is half full the log asks for the next file, and its prefault thread
//! (`sync.rs`, no thread of its own: a log keeps one sync and one prefault thread)
//! creates it under a temporary name (`next-<n>.seg.tmp`), preallocates it, maps it
//! (`MADV_RANDOM`, see `Segment::expect_appends`), populates its first pages and syncs it
//! (size and extents durable), and leaves it ready. The roll then only writes the header
//! into the mapping; the group-commit round that first covers the new segment's records
//! syncs its header with them, renames it to `<base>.seg` and syncs the directory before
//! it publishes any of them (`log.rs`).
//!
//! Invariants:
//! * A prepared file is a `*.tmp` file until a sync round names it, after its header was
//!   synced: a crash at any point leaves either a temporary file, which recovery deletes
//!   (`recovery.rs`), or a `.seg` file whose header is durable. No record in a temporary
//!   file was ever reported durable. The on-disk format is unchanged (`FORMAT.md`).
//! * Preparing never runs the disk out: a file is prepared only while the file system keeps
//!   at least [`PREPARE_FREE_SEGMENTS_MIN`] segments (plus the log's reserve) free, so near
//!   a full disk rolls create their segment themselves, as before, and report `DiskFull` or
//!   `ReserveReached` at the same fill level.
//! * At most one file is prepared per log at a time; an unused one is deleted when the log
//!   closes ([`Preparer::close`] waits for a preparation in progress, bounded).
//!
//! * A recycled file (a deleted segment's, [`Preparer::offer`]) is renamed to a
//!   temporary name before it is offered and the directory is synced before it is
//!   prepared: no write into it can reach the disk while its old `<base>.seg` name still
//!   could after a crash. At most `recycle_max` files wait; the rest are deleted, and so
//!   are the waiting ones when the log closes (and any `*.tmp` at open). Near a full disk
//!   (the room rule above) a deleted segment is unlinked, not kept: its space comes back.
//!
//! # Recycling (RocksDB's `recycle_log_file_num`)
//! A new file costs the disk an unwritten-extent conversion per sync (a journal commit:
//! `fdatasync` into fallocated blocks takes twice as long as into written ones, fio in
//! `benches/RESULTS.md` session 20) and the kernel a fresh page-cache page per 4 KiB
//! (allocation, zeroing, accounting: half of the CPU of the group-commit bench). A fully
//! acknowledged segment's file has both already: written blocks and, usually, resident
//! pages. So a log that deletes a sealed segment offers its file here, and the next
//! preparation takes it instead of creating one. Its old frames stay past the written end
//! of the new segment; the salt of the segment format v2 (`record.rs`) keeps them from
//! ever verifying.
//!
//! Does not decide when to roll, nor name or seal segments: the log does.

use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use memmap2::{MmapOptions, MmapRaw};

use crate::fsync;
use crate::segment::{RecycledFile, PREFAULT_AHEAD_BYTES};

/// A file is prepared only while the file system keeps this many segments free (plus the
/// log's reserve) after it; below, rolls create their segments themselves.
pub const PREPARE_FREE_SEGMENTS_MIN: u64 = 2;
/// A log asks for its next file once the active segment is filled past this share (in
/// percent): late enough that a log that never fills a segment (an idle Raft group's)
/// holds no second file, early enough that the file is ready long before the roll.
pub const PREPARE_AT_FILL_PERCENT: u64 = 50;
/// Longest [`Preparer::close`] waits for a preparation in progress (one preallocation
/// and one `fsync`), so a closed log leaves no temporary file behind it.
pub const PREPARE_CLOSE_WAIT_MAX: Duration = Duration::from_secs(5);

/// Names of prepared files, unique in the process: a log reopened while the thread of its
/// previous instance still finishes never takes or deletes that thread's file.
static NEXT_NAME: AtomicU64 = AtomicU64::new(0);

/// A preallocated, synced, mapped segment file under a temporary name, not yet a segment.
/// Dropped unused, it deletes its file.
pub(crate) struct PreparedFile {
    parts: Option<PreparedParts>,
}

pub(crate) struct PreparedParts {
    pub path: PathBuf,
    pub file: File,
    pub map: MmapRaw,
    pub capacity: u64,
    /// Position up to which pages are populated (see `Segment::prefault_ahead`).
    pub prefaulted: u64,
    /// Salt of the segment a recycled file held (the new one must differ); `None` for a
    /// new file, which holds no frame.
    pub previous_salt: Option<u32>,
}

impl PreparedFile {
    /// The file and mapping, for `Segment::from_prepared`; the caller owns the file now.
    pub fn take(mut self) -> Option<PreparedParts> {
        self.parts.take()
    }

    pub fn capacity(&self) -> u64 {
        self.parts.as_ref().map_or(0, |p| p.capacity)
    }
}

impl Drop for PreparedFile {
    fn drop(&mut self) {
        if let Some(parts) = self.parts.take() {
            let _ = std::fs::remove_file(&parts.path);
        }
    }
}

/// What the preparing thread needs to know about the log.
pub(crate) struct PrepareSpec {
    pub dir: PathBuf,
    pub segment_bytes: u64,
    pub reserve_bytes: u64,
    /// Most recycled files waiting for a preparation (`LogConfig::recycle_segments`).
    pub recycle_max: usize,
}

/// One log's preparer: a slot for the ready file; the work runs on the log's prefault
/// thread ([`Preparer::run_job`]).
pub(crate) struct Preparer {
    spec: PrepareSpec,
    state: Mutex<PrepareState>,
    cond: Condvar,
}

#[derive(Default)]
struct PrepareState {
    wanted: bool,
    busy: bool,
    ready: Option<PreparedFile>,
    /// Deleted segments' files, renamed, waiting to be prepared again.
    recycled: Vec<RecycledFile>,
    closed: bool,
}

impl Preparer {
    pub fn new(spec: PrepareSpec) -> Preparer {
        Preparer {
            spec,
            state: Mutex::new(PrepareState::default()),
            cond: Condvar::new(),
        }
    }

    /// Marks a file wanted; true when the caller must have [`Preparer::run_job`] run (on
    /// the prefault thread), false when one is ready or being prepared, or the log closed.
    pub fn request(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        if s.closed || s.ready.is_some() || s.busy || s.wanted {
            return false;
        }
        s.wanted = true;
        true
    }

    /// Takes a deleted segment's file (already renamed to a `*.tmp` name) for a later
    /// segment; gives it back when the log closed, recycling is off, the file is not of
    /// this log's size or `recycle_max` files already wait (the caller deletes it then).
    pub fn offer(&self, file: RecycledFile) -> std::result::Result<(), RecycledFile> {
        let Ok(mut s) = self.state.lock() else {
            return Err(file);
        };
        if s.closed
            || file.capacity != self.spec.segment_bytes
            || s.recycled.len() >= self.spec.recycle_max
        {
            return Err(file);
        }
        s.recycled.push(file);
        Ok(())
    }

    /// True when another recycled file would be taken ([`Preparer::offer`]) and the disk
    /// has room to spare for it: near a full disk a deleted segment's space is worth more
    /// than its file (the store refuses producers until a reclaim makes room, which a kept
    /// file would not), so it is unlinked as before.
    pub fn wants_recycled(&self) -> bool {
        let open = self
            .state
            .lock()
            .is_ok_and(|s| !s.closed && s.recycled.len() < self.spec.recycle_max);
        open && has_room(&self.spec).unwrap_or(false)
    }

    /// Prepares the file asked for, if still wanted (the prefault thread calls this): a
    /// recycled one when one waits, a new one otherwise.
    pub fn run_job(&self) {
        if !self.next_job() {
            return;
        }
        let recycled = self.state.lock().ok().and_then(|mut s| s.recycled.pop());
        let prepared = match recycled {
            Some(file) => match prepare_recycled(&self.spec, file) {
                Ok(p) => Ok(Some(p)),
                Err(e) => {
                    tracing::warn!(dir = %self.spec.dir.display(), error = %e, "could not reuse a deleted segment's file, creating one");
                    prepare(&self.spec)
                }
            },
            None => prepare(&self.spec),
        };
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(dir = %self.spec.dir.display(), error = %e, "could not prepare the next segment, the roll will create it");
                None
            }
        };
        self.finish(prepared);
    }

    /// True when a file is ready for the next roll.
    pub fn is_ready(&self) -> bool {
        self.state.lock().is_ok_and(|s| s.ready.is_some())
    }

    /// The ready file, if any (does not wait).
    pub fn take(&self) -> Option<PreparedFile> {
        self.state.lock().ok()?.ready.take()
    }

    /// Refuses further work and deletes an unused file, waiting (bounded) for a
    /// preparation in progress to end so that its file goes too.
    pub fn close(&self) {
        let Ok(mut s) = self.state.lock() else { return };
        s.closed = true;
        s.wanted = false;
        let unused = s.ready.take();
        let recycled = std::mem::take(&mut s.recycled);
        self.cond.notify_all();
        let deadline = Instant::now() + PREPARE_CLOSE_WAIT_MAX;
        while s.busy {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = match self.cond.wait_timeout(s, left) {
                Ok((g, _)) => g,
                Err(_) => return,
            };
        }
        drop(s);
        drop(unused);
        for file in recycled {
            let _ = std::fs::remove_file(&file.path);
        }
    }

    /// Takes the request, if any and the log is open.
    fn next_job(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        if s.closed || !s.wanted {
            return false;
        }
        s.wanted = false;
        s.busy = true;
        true
    }

    /// Stores a prepared file (or deletes it when the log closed meanwhile).
    fn finish(&self, prepared: Option<PreparedFile>) {
        let Ok(mut s) = self.state.lock() else {
            return; // `prepared` is dropped (deleted) on return
        };
        if s.closed {
            // Deleted before `busy` clears, so a `close` waiting for it returns after.
            drop(prepared);
        } else {
            s.ready = prepared;
        }
        s.busy = false;
        self.cond.notify_all();
    }
}

/// True while the file system keeps [`PREPARE_FREE_SEGMENTS_MIN`] segments plus the log's
/// reserve free: the room to prepare a new file ahead, or to keep a deleted one.
fn has_room(spec: &PrepareSpec) -> std::io::Result<bool> {
    let free = crate::space::free_bytes(&spec.dir).map_err(std::io::Error::other)?;
    let needed = spec
        .segment_bytes
        .saturating_mul(PREPARE_FREE_SEGMENTS_MIN)
        .saturating_add(spec.reserve_bytes);
    Ok(free >= needed)
}

/// Creates, preallocates, maps, populates the first pages of and syncs one file; `None`
/// when the file system has too little room left to prepare ahead.
fn prepare(spec: &PrepareSpec) -> std::io::Result<Option<PreparedFile>> {
    if !has_room(spec)? {
        return Ok(None);
    }
    let n = NEXT_NAME.fetch_add(1, Ordering::Relaxed);
    let path = spec.dir.join(format!("next-{n}.seg.tmp"));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    match build(&file, &path, spec.segment_bytes) {
        Ok((map, prefaulted)) => Ok(Some(PreparedFile {
            parts: Some(PreparedParts {
                path,
                file,
                map,
                capacity: spec.segment_bytes,
                prefaulted,
                previous_salt: None,
            }),
        })),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(e)
        }
    }
}

/// A recycled file made ready: the directory synced (its rename away from `<base>.seg` is
/// durable before anything writes into it), mapped and its first pages populated. Its
/// size and blocks are the deleted segment's, durable long ago: no preallocation, no file
/// sync. On failure the file is deleted.
fn prepare_recycled(spec: &PrepareSpec, recycled: RecycledFile) -> std::io::Result<PreparedFile> {
    let RecycledFile {
        path,
        file,
        capacity,
        salt,
    } = recycled;
    let ready = fsync::sync_dir(&spec.dir).and_then(|()| map_populated(&file, capacity));
    match ready {
        Ok((map, prefaulted)) => Ok(PreparedFile {
            parts: Some(PreparedParts {
                path,
                file,
                map,
                capacity,
                prefaulted,
                previous_salt: Some(salt),
            }),
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(e)
        }
    }
}

/// Preallocates, maps, populates and syncs a new file; returns the mapping and how far
/// its pages are populated.
fn build(file: &File, path: &Path, capacity: u64) -> std::io::Result<(MmapRaw, u64)> {
    #[cfg(feature = "crash-sim")]
    crate::crash_sim::before_allocate(path)?;
    // SAFETY: plain FFI call on an open descriptor.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, capacity as libc::off_t) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    let (map, prefaulted) = map_populated(file, capacity)?;
    // Size, extents and the populated (zero) pages durable: the roll that takes the file
    // writes only its header, which the first sync round covering it makes durable.
    fsync::sync_file(file, path)?;
    Ok((map, prefaulted))
}

/// Maps a file for appends and populates its first pages.
fn map_populated(file: &File, capacity: u64) -> std::io::Result<(MmapRaw, u64)> {
    let map = MmapOptions::new().len(capacity as usize).map_raw(file)?;
    // As for a segment created by a roll: no readahead folios (see
    // `Segment::expect_appends`), and the first pages present and writable, so neither the
    // header nor the first appends after the roll fault under the writer lock.
    if let Err(e) = map.advise(memmap2::Advice::Random) {
        tracing::debug!(error = %e, "madvise(RANDOM) of a prepared segment failed");
    }
    let ahead = PREFAULT_AHEAD_BYTES.min(capacity);
    let prefaulted = match map.advise_range(memmap2::Advice::PopulateWrite, 0, ahead as usize) {
        Ok(()) => ahead,
        Err(_) => 0,
    };
    Ok((map, prefaulted))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn preparer(dir: &Path, segment_bytes: u64, reserve_bytes: u64) -> Arc<Preparer> {
        Arc::new(Preparer::new(PrepareSpec {
            dir: dir.to_path_buf(),
            segment_bytes,
            reserve_bytes,
            recycle_max: 1,
        }))
    }

    /// Runs the job as the prefault thread would.
    fn request(p: &Arc<Preparer>) {
        if p.request() {
            let p = Arc::clone(p);
            std::thread::spawn(move || p.run_job());
        }
    }

    fn wait_ready(p: &Preparer) -> Option<PreparedFile> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(f) = p.take() {
                return Some(f);
            }
            let idle = p.state.lock().map(|s| !s.busy && !s.wanted).unwrap_or(true);
            if idle {
                return p.take();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }

    fn tmp_files(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn a_prepared_file_is_preallocated_and_an_unused_one_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let p = preparer(dir.path(), 1 << 20, 0);
        request(&p);
        let file = wait_ready(&p).expect("a prepared file");
        assert_eq!(file.capacity(), 1 << 20);
        let names = tmp_files(dir.path());
        assert_eq!(names.len(), 1, "{names:?}");
        let meta = std::fs::metadata(dir.path().join(&names[0])).unwrap();
        assert_eq!(meta.len(), 1 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 >= 1 << 20, "preallocated");
        drop(file);
        assert!(tmp_files(dir.path()).is_empty(), "deleted unused");
        // A file ready at close is deleted by the close.
        request(&p);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tmp_files(dir.path()).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        p.close();
        assert!(tmp_files(dir.path()).is_empty());
        assert!(!p.request(), "closed");
        assert!(p.take().is_none(), "closed");
    }

    #[test]
    fn nothing_is_prepared_when_the_disk_keeps_too_few_segments_free() {
        let dir = tempfile::tempdir().unwrap();
        let free = crate::space::free_bytes(dir.path()).unwrap();
        let p = preparer(dir.path(), 1 << 20, free);
        request(&p);
        assert!(wait_ready(&p).is_none());
        assert!(tmp_files(dir.path()).is_empty());
        p.close();
    }
}
