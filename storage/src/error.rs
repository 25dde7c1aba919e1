//! The storage crate's one error type.
//!
//! Variants are structured so a caller can act on them: [`StorageError::DiskFull`] and
//! [`StorageError::ReserveReached`] are retryable once space is freed, [`StorageError::SyncFailed`] is fatal for the log (the
//! kernel may have dropped dirty pages, so the log refuses further writes), and the
//! corruption variants name the file and the position so an operator can find the damage.

use std::io;
use std::path::PathBuf;

/// Errors returned by the segment log, the indexes and the ack log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// An I/O call failed; `verb` says what the log was doing and `path` on which file.
    #[error("{verb} {path}: {source}")]
    Io {
        verb: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file system has no room for a new segment (ENOSPC/EDQUOT). Nothing already
    /// durable is affected; the append can be retried once space is freed.
    #[error("disk full while {verb} {path}")]
    DiskFull { verb: &'static str, path: PathBuf },
    /// A new segment would leave less free space than the log's
    /// [`crate::LogConfig::reserve_bytes`], which is kept for logs that free space (the
    /// ack log). Retryable like [`StorageError::DiskFull`] once space is freed.
    #[error(
        "{path}: a new segment of {segment_bytes} bytes would leave less than the reserve of \
         {reserve_bytes} bytes free ({free_bytes} bytes free)"
    )]
    ReserveReached {
        path: PathBuf,
        free_bytes: u64,
        segment_bytes: u64,
        reserve_bytes: u64,
    },
    /// An fsync/msync failed. The log is poisoned: every pending and later append fails,
    /// because after a failed sync the kernel may have discarded the dirty pages.
    #[error("sync of {path} failed, the log accepts no more writes: {reason}")]
    SyncFailed { path: PathBuf, reason: String },
    /// A file does not start with the expected magic bytes.
    #[error("{path} is not an entrepot {kind} file (bad magic)")]
    BadMagic { path: PathBuf, kind: &'static str },
    /// A file was written by a format version this build does not know.
    #[error("{path} has format version {found}, this build reads versions 1 to {supported}")]
    UnsupportedVersion {
        path: PathBuf,
        found: u16,
        supported: u16,
    },
    /// A record inside a sealed (fully synced) segment fails its checksum or framing.
    #[error("corrupt record in sealed segment {path} at byte {position} (expected offset {offset}): {reason}")]
    Corrupt {
        path: PathBuf,
        position: u64,
        offset: u64,
        reason: &'static str,
    },
    /// A payload larger than the configured `record_bytes_max`.
    #[error("record of {size} bytes exceeds the limit of {max} bytes")]
    RecordTooLarge { size: u64, max: u64 },
    /// A batch with more records than [`crate::MAX_BATCH_RECORDS`].
    #[error("batch of {count} records exceeds the limit of {max}")]
    BatchTooLarge { count: usize, max: usize },
    /// The requested offset is not (or no longer) in the log.
    #[error("offset {offset} is not in the log (retained range {first}..{next})")]
    OffsetOutOfRange { offset: u64, first: u64, next: u64 },
    /// The configuration is inconsistent.
    #[error("invalid storage configuration: {0}")]
    Config(String),
    /// The log was opened read-only (after corruption) and refuses writes.
    #[error("the log is open read-only")]
    ReadOnly,
    /// The log has been closed.
    #[error("the log is closed")]
    Closed,
}

impl StorageError {
    /// Wraps an `io::Error`, turning ENOSPC and EDQUOT into [`StorageError::DiskFull`].
    pub(crate) fn io(verb: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => StorageError::DiskFull { verb, path },
            _ => StorageError::Io { verb, path, source },
        }
    }

    /// True when the file system has (or may keep) no room for this log:
    /// [`StorageError::DiskFull`] or [`StorageError::ReserveReached`]. Retryable once
    /// space is freed; nothing durable was touched.
    pub fn is_out_of_space(&self) -> bool {
        matches!(
            self,
            StorageError::DiskFull { .. } | StorageError::ReserveReached { .. }
        )
    }

    /// True when the error ends the log's life (it must be reopened after operator action).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            StorageError::SyncFailed { .. }
                | StorageError::Corrupt { .. }
                | StorageError::ReadOnly
                | StorageError::Closed
        )
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
