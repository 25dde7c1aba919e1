//! Free space on the file system that holds a log, and the reserve a log leaves for others.
//!
//! Segments are preallocated whole (`posix_fallocate`), so a log needs a segment's worth of
//! free blocks at the moment it rolls, not byte by byte. A log that may eat the disk (the
//! broker's message log) is opened with [`crate::LogConfig::reserve_bytes`]: it refuses a
//! new segment with [`StorageError::ReserveReached`] when fewer than that many bytes would
//! stay free afterwards, so a log that *frees* space (the ack log, whose records let the
//! message log's segments be deleted) can still get its segments on a full disk — the
//! headroom Kafka and RocksDB keep for the same reason.
//!
//! Does not watch the disk: free space is measured when a segment is about to be created,
//! and by callers that ask ([`free_bytes`]).

use std::ffi::CString;
use std::path::Path;

use crate::error::{Result, StorageError};

/// Bytes an unprivileged writer can still allocate on the file system holding `path`
/// (`statvfs`: available blocks × fragment size).
pub fn free_bytes(path: &Path) -> Result<u64> {
    let io = |e| StorageError::io("measuring free space of", path, e);
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io(std::io::Error::other(e)))?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a valid NUL-terminated string and `st` a writable statvfs.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Checks that a new segment of `segment_bytes` in `dir` leaves `reserve_bytes` free;
/// a reserve of 0 checks nothing (and measures nothing).
pub(crate) fn check_reserve(dir: &Path, segment_bytes: u64, reserve_bytes: u64) -> Result<()> {
    if reserve_bytes == 0 {
        return Ok(());
    }
    let free = free_bytes(dir)?;
    let needed = segment_bytes.saturating_add(reserve_bytes);
    if free < needed {
        return Err(StorageError::ReserveReached {
            path: dir.to_path_buf(),
            free_bytes: free,
            segment_bytes,
            reserve_bytes,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_no_disk_has_is_refused_with_the_figures() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        check_reserve(dir.path(), 1, 0).unwrap();
        check_reserve(dir.path(), 1, 1).unwrap();
        let err = check_reserve(dir.path(), 1 << 20, u64::MAX / 2).unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::ReserveReached {
                    segment_bytes: 1_048_576,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.is_out_of_space() && !err.is_fatal());
    }
}
