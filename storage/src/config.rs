//! Configuration of a segment log and the limits it enforces.
//!
//! Every limit is a named constant with its default; [`LogConfig::validate`] rejects
//! combinations that cannot work (a record that could never fit in a segment, say).

use std::time::Duration;

use crate::error::{Result, StorageError};
use crate::record::RECORD_HEADER_LEN;
use crate::segment::SEGMENT_HEADER_LEN;

/// Default size a segment is preallocated to and rolled at: 128 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 128 * 1024 * 1024;
/// Smallest allowed segment size: 64 KiB.
pub const MIN_SEGMENT_BYTES: u64 = 64 * 1024;
/// Largest allowed segment size: 1 GiB (positions inside a segment are `u32`).
pub const MAX_SEGMENT_BYTES: u64 = 1024 * 1024 * 1024;
/// Default limit for one record's payload: 100 MiB (the broker's default max message size).
pub const DEFAULT_RECORD_BYTES: u32 = 100 * 1024 * 1024;
/// Most records one `append_batch` call may carry.
pub const MAX_BATCH_RECORDS: usize = 64 * 1024;
/// Default distance in bytes between two sparse index entries.
pub const DEFAULT_INDEX_INTERVAL_BYTES: u32 = 4096;
/// Most deleted segment files a log keeps for its next segments: none by default (a log
/// that deletes segments rarely would only hold disk space with them).
pub const DEFAULT_RECYCLE_SEGMENTS: usize = 0;
/// Most a configuration may ask to keep (each holds `segment_bytes` of disk).
pub const MAX_RECYCLE_SEGMENTS: usize = 8;

/// When appended records become durable — what survives a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// A record's durability handle completes only after the data is on stable storage
    /// (`msync(MS_SYNC)`, which is `fdatasync` of the range). Concurrent appends share one
    /// sync (group commit). Survives power loss. The default.
    Always,
    /// Data is synced at most this often; durability handles complete after the next sync,
    /// so a completed handle survives a power cut as with `Always`. A power cut loses the
    /// records written since the last sync (up to one interval's), none of whose handles
    /// had completed; the interval costs latency, not acknowledged data.
    Interval(Duration),
    /// Never synced by the log (the kernel writes back eventually); durability handles
    /// complete at once. Survives a process crash, not a power cut. Tests and benches only.
    Never,
}

/// How a [`SyncPolicy`] is written in configuration (the broker's `--sync`, its YAML
/// `sync:`): `always`, `never` or `interval:<ms>`; [`Display`](std::fmt::Display) writes
/// the same form, so a policy read back prints as it was given.
impl std::str::FromStr for SyncPolicy {
    type Err = ParseSyncPolicyError;

    fn from_str(s: &str) -> std::result::Result<SyncPolicy, ParseSyncPolicyError> {
        match s {
            "always" => Ok(SyncPolicy::Always),
            "never" => Ok(SyncPolicy::Never),
            other => other
                .strip_prefix("interval:")
                .and_then(|ms| ms.parse::<u64>().ok())
                .filter(|&ms| ms > 0)
                .map(|ms| SyncPolicy::Interval(Duration::from_millis(ms)))
                .ok_or_else(|| ParseSyncPolicyError {
                    given: other.to_owned(),
                }),
        }
    }
}

impl std::fmt::Display for SyncPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyncPolicy::Always => f.write_str("always"),
            SyncPolicy::Never => f.write_str("never"),
            SyncPolicy::Interval(d) => write!(f, "interval:{}", d.as_millis()),
        }
    }
}

/// A sync policy that is none of `always`, `never`, `interval:<ms>` (ms a positive integer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sync must be always, never or interval:<ms> with ms a positive integer, not {given:?}")]
pub struct ParseSyncPolicyError {
    /// The text that was given.
    pub given: String,
}

/// What to do when a sealed segment turns out to be corrupt while opening.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CorruptionPolicy {
    /// Refuse to open, naming the file and position. The default.
    #[default]
    Fail,
    /// Open read-only, exposing the records up to the first corrupt one.
    ReadOnlyUpToCorruption,
}

/// Settings of one segment log.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Size each segment file is preallocated to; a segment rolls when the next record
    /// would not fit. Default [`DEFAULT_SEGMENT_BYTES`].
    pub segment_bytes: u64,
    /// Largest payload of one record. Default [`DEFAULT_RECORD_BYTES`].
    pub record_bytes_max: u32,
    /// Durability policy. Default [`SyncPolicy::Always`].
    pub sync: SyncPolicy,
    /// Bytes between sparse index entries. Default [`DEFAULT_INDEX_INTERVAL_BYTES`].
    pub index_interval_bytes: u32,
    /// Verify every record's CRC in sealed segments at open (the unsealed tail is always
    /// verified). Default false: sealed segments are verified on read.
    pub verify_sealed_on_open: bool,
    /// What to do about corruption in a sealed segment at open.
    pub corruption: CorruptionPolicy,
    /// Free bytes a new segment of this log must leave on the file system, for other logs
    /// that need them more (the broker's message log leaves room for its ack log, which
    /// is what frees space); a roll that would eat into it fails with
    /// [`StorageError::ReserveReached`]. Measured with `statvfs` once per new segment.
    /// Default 0: no reserve, nothing measured.
    pub reserve_bytes: u64,
    /// After a round that covered several records, the sync thread waits (spinning, up to
    /// [`crate::sync::GATHER_MAX`]) for as many appends before the next sync, so appenders
    /// that wait for durability share one (`sync.rs`, `gather`). Default true. The ack log
    /// turns it off: no appender of acknowledgements waits for them before appending
    /// again, and the spin only takes a core from the connections (a consumer at credit
    /// 250 lost 15–30 % of its rate to it, benches/RESULTS.md session 17).
    pub gather: bool,
    /// With [`SyncPolicy::Always`]: appends do not wake the sync thread; it syncs this
    /// long after the first append a round has not covered, or at once when someone
    /// waits for a record ([`crate::Durable::wait`]). For a log whose records nobody
    /// usually waits for: the ack log, since a consumer that settles first (every
    /// client's default) is told nothing about its acknowledgement's durability — a
    /// power cut within the delay delivers those messages again (at-least-once), as
    /// Kafka's committed offsets and RabbitMQ's acks allow. Default `None`: every append
    /// wakes the thread.
    pub lazy_sync: Option<Duration>,
    /// Deleted segments whose files the log keeps, renamed, to be the files of its next
    /// segments instead of new ones (`prepare.rs`): written blocks sync without the
    /// unwritten-extent conversion and resident pages need no allocation. Each holds
    /// `segment_bytes` of disk until a roll takes it (or the log closes). Only logs
    /// that sync (not [`SyncPolicy::Never`]). Default [`DEFAULT_RECYCLE_SEGMENTS`], at most
    /// [`MAX_RECYCLE_SEGMENTS`].
    pub recycle_segments: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            record_bytes_max: DEFAULT_RECORD_BYTES,
            sync: SyncPolicy::Always,
            index_interval_bytes: DEFAULT_INDEX_INTERVAL_BYTES,
            verify_sealed_on_open: false,
            corruption: CorruptionPolicy::Fail,
            reserve_bytes: 0,
            gather: true,
            lazy_sync: None,
            recycle_segments: DEFAULT_RECYCLE_SEGMENTS,
        }
    }
}

impl LogConfig {
    /// The delay a lazy log syncs after (`lazy_sync`), when it applies: only under
    /// [`SyncPolicy::Always`] (`Interval` already waits, `Never` does not sync).
    pub(crate) fn lazy_delay(&self) -> Option<Duration> {
        self.lazy_sync.filter(|_| self.sync == SyncPolicy::Always)
    }

    /// Rejects settings that cannot work.
    pub fn validate(&self) -> Result<()> {
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&self.segment_bytes) {
            return Err(StorageError::Config(format!(
                "segment_bytes {} outside {MIN_SEGMENT_BYTES}..={MAX_SEGMENT_BYTES}",
                self.segment_bytes
            )));
        }
        let room = self.segment_bytes - SEGMENT_HEADER_LEN as u64 - RECORD_HEADER_LEN as u64;
        if u64::from(self.record_bytes_max) > room || self.record_bytes_max == 0 {
            return Err(StorageError::Config(format!(
                "record_bytes_max {} must be between 1 and {room} for segment_bytes {}",
                self.record_bytes_max, self.segment_bytes
            )));
        }
        if self.index_interval_bytes < 64 {
            return Err(StorageError::Config(
                "index_interval_bytes must be at least 64".into(),
            ));
        }
        if self.lazy_sync.is_some_and(|d| d.is_zero()) {
            return Err(StorageError::Config(
                "lazy_sync must be positive (use None)".into(),
            ));
        }
        if self.recycle_segments > MAX_RECYCLE_SEGMENTS {
            return Err(StorageError::Config(format!(
                "recycle_segments {} exceeds {MAX_RECYCLE_SEGMENTS}",
                self.recycle_segments
            )));
        }
        if let SyncPolicy::Interval(d) = self.sync {
            if d.is_zero() {
                return Err(StorageError::Config(
                    "sync interval must be positive (use Always)".into(),
                ));
            }
        }
        Ok(())
    }
}
