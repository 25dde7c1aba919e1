//! # entrepot-storage
//!
//! The durable heart of Entrepot: an append-only log of records in preallocated,
//! memory-mapped segment files, with group commit, crash recovery and zero-copy reads.
//! Queue messages, topic messages, subscription cursors and (later) the Raft log all live
//! in logs of this crate. It knows nothing of AMQP or Raft.
//!
//! Guarantees:
//! * A record whose [`Durable`] handle completed (policy [`SyncPolicy::Always`]) survives
//!   a process crash and a power cut, byte for byte, at the same offset.
//! * After any crash the log reopens as a prefix of what was appended: a torn tail is cut
//!   (and counted in [`LogStats::recovered_torn_bytes`]), never returned.
//! * Bad bytes on disk give a typed error naming the file and position, never a panic.
//! * A `Bytes` payload from a read points into the mapping and stays valid while held,
//!   even after its segment is deleted.
//!
//! Not here: what a record means, who consumes it, replication.
//!
//! ## A tour: open → append → sync → read → recover
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), entrepot_storage::StorageError> {
//! use entrepot_storage::{Log, LogConfig, SyncPolicy};
//! let dir = tempfile::tempdir().expect("a temporary directory");
//! let config = LogConfig { segment_bytes: 1 << 20, record_bytes_max: 64 << 10, ..LogConfig::default() };
//! assert_eq!(config.sync, SyncPolicy::Always);
//!
//! let log = Log::open(dir.path(), config.clone())?;
//! let first = log.append(b"hello")?;          // offset assigned at once
//! let batch = log.append_batch(&[b"a", b"b"])?; // one lock, one durability handle
//! batch.durable.wait().await?;                  // one group-commit fsync covered both
//! assert!(first.durable.is_durable());
//!
//! let record = log.read(first.first)?;          // zero-copy slice of the mapping
//! assert_eq!(&record.payload[..], b"hello");
//! drop(log);
//!
//! let log = Log::open(dir.path(), config)?;     // recovery verifies the tail's CRCs
//! let all: Vec<_> = log.reader(0).map(|r| r.map(|r| r.payload)).collect::<Result<_, _>>()?;
//! assert_eq!(all, [&b"hello"[..], b"a", b"b"]);
//! # Ok(()) }
//! ```
//!
//! The on-disk format is specified in `storage/FORMAT.md`.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod ack;
mod config;
#[cfg(feature = "crash-sim")]
pub mod crash_sim;
mod error;
pub mod fsync;
mod index;
mod log;
mod offset_set;
mod prepare;
mod record;
mod recovery;
mod retention;
mod retire;
mod segment;
mod space;
mod sync;

pub use ack::{AckLog, ACK_SEGMENT_BYTES, DEFAULT_GROUP, MAX_GROUPS, SNAPSHOT_EVERY_RECORDS};
pub use config::{
    CorruptionPolicy, LogConfig, ParseSyncPolicyError, SyncPolicy, DEFAULT_INDEX_INTERVAL_BYTES,
    DEFAULT_RECORD_BYTES, DEFAULT_SEGMENT_BYTES, MAX_BATCH_RECORDS, MAX_SEGMENT_BYTES,
    MIN_SEGMENT_BYTES,
};
pub use error::{Result, StorageError};
pub use log::{Appended, Log, LogReader, SegmentSpan, RESIDENT_TAIL_BYTES};
pub use offset_set::OffsetSet;
pub use prepare::{PREPARE_AT_FILL_PERCENT, PREPARE_FREE_SEGMENTS_MIN};
pub use record::{Record, RECORD_HEADER_LEN};
pub use retention::Retention;
pub use retire::{RETIRE_QUEUE_MAX, RETIRE_WAIT_MAX};
pub use segment::{RELEASE_CHUNK_BYTES, SEGMENT_HEADER_LEN, SEGMENT_MAGIC, SEGMENT_VERSION};
pub use space::free_bytes;
pub use sync::{Durable, DurableState, LogStats, SYNC_LATENCY_BUCKETS_US};
