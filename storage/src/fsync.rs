//! The one door through which bytes become durable: every `msync`, `fdatasync` and
//! directory sync of the storage crate goes through these three functions.
//!
//! In a normal build they are the plain system calls. With the `crash-sim` feature (tests
//! only; dev-dependencies enable it) each call first asks [`crate::crash_sim`] whether a
//! fault is injected for its path (EIO, ENOSPC, a stall), and after a successful call
//! reports what it made durable, so a test can rebuild the files a power cut would leave.
//!
//! [`sync_file`] and [`sync_dir`] are public so the other crates' small durable files
//! (the Raft vote and snapshot, the subscription registry) sync through the same door,
//! and a simulated power cut keeps of them only what was synced.
//!
//! Does not decide when to sync: the log and the segments do.

use std::fs::File;
use std::io;
use std::path::Path;

use memmap2::MmapRaw;

/// Syncs `len` bytes of a segment's mapping from `from` (`msync(MS_SYNC)`: the range's
/// dirty pages are written and the call waits for the device).
pub(crate) fn sync_mapped(
    file: &File,
    path: &Path,
    map: &MmapRaw,
    from: usize,
    len: usize,
) -> io::Result<()> {
    #[cfg(feature = "crash-sim")]
    crate::crash_sim::before_sync(path)?;
    map.flush_range(from, len)?;
    #[cfg(feature = "crash-sim")]
    {
        // SAFETY: `from..from + len` lies inside the mapping (flush_range accepted it) and
        // is below the segment's published `written`, which no writer modifies any more.
        let synced = unsafe { std::slice::from_raw_parts(map.as_ptr().add(from), len) };
        crate::crash_sim::synced_range(file, path, from as u64, synced)?;
    }
    #[cfg(not(feature = "crash-sim"))]
    let _ = (file, path);
    Ok(())
}

/// `fsync` of a whole file plus its size (a new segment's preallocation, a small file
/// written whole before its rename). `path` names the file for the crash seam.
pub fn sync_file(file: &File, path: &Path) -> io::Result<()> {
    #[cfg(feature = "crash-sim")]
    crate::crash_sim::before_sync(path)?;
    file.sync_all()?;
    #[cfg(feature = "crash-sim")]
    crate::crash_sim::synced_file(file, path)?;
    #[cfg(not(feature = "crash-sim"))]
    let _ = path;
    Ok(())
}

/// Syncs a directory, making its entries (creations, renames, unlinks) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(feature = "crash-sim")]
    crate::crash_sim::before_sync(dir)?;
    File::open(dir).and_then(|d| d.sync_all())?;
    #[cfg(feature = "crash-sim")]
    crate::crash_sim::synced_dir(dir)?;
    Ok(())
}
