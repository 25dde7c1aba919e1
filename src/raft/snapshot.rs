//! A snapshot of a node's store at one applied Raft entry: what a lagging or new member
//! installs instead of replaying a log prefix that has been purged.
//!
//! It holds the store's *live* state only: the unacknowledged message records with their
//! offsets, every consumer group's acknowledged set, and the subscription registry — not
//! the acknowledged history. Installing it resets the local message log to start at the
//! first live offset and rewrites the records at their offsets; an offset between them
//! that was acknowledged gets an empty placeholder record (acknowledged in the imported
//! set, so nothing ever reads it), which keeps offsets identical on every node.
//!
//! ```text
//! // Format (store snapshot, v1; integers little-endian):
//! //   { version: u8 = 1 | message_end: u64 | base: u64 | acks_len: u32 | acks (ack.rs group
//! //     snapshot encoding) | registry_len: u32 | registry (subscriptions.yaml bytes)
//! //     | n: u64 | n × { offset: u64 | len: u32 | record } }    offsets ascending, in base..message_end
//! ```
//! Invariants: every record of a snapshot lies below `message_end`, the end of the
//! *committed* messages (a leader's local, uncommitted tail never enters a snapshot); a
//! decoded snapshot is checked (bounds, order) before the store is touched.
//!
//! Does not: stream (the whole snapshot is one buffer, bounded by `MAX_SNAPSHOT_BYTES`), or
//! exclude a leader's acknowledgements not yet committed (they are at-least-once anyway).

use bytes::{Buf, BufMut, Bytes};
use entrepot_storage::{AckLog, Log, StorageError};

use crate::broker::replication;
use crate::broker::subscriptions::REGISTRY_FILE;

/// Version byte of the store snapshot format.
pub const STORE_SNAPSHOT_VERSION: u8 = 1;

/// Why a snapshot could not be taken or installed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "store snapshot version {0} is not supported (this build reads {STORE_SNAPSHOT_VERSION})"
    )]
    Version(u8),
    #[error("malformed store snapshot: {0}")]
    Malformed(&'static str),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("subscription registry: {0}")]
    Registry(#[from] std::io::Error),
}

/// The live state of a store, as captured.
pub struct StoreSnapshot {
    pub message_end: u64,
    acks: Vec<u8>,
    registry: Vec<u8>,
    records: Vec<(u64, Bytes)>,
}

impl StoreSnapshot {
    /// Captures the store: records below `message_end` not acknowledged in the default
    /// group, all groups' sets, the registry. Records reclaimed meanwhile were acknowledged
    /// and are skipped.
    pub fn capture(
        log: &Log,
        acks: &AckLog,
        dir: &std::path::Path,
        message_end: u64,
    ) -> Result<StoreSnapshot, SnapshotError> {
        let acked = acks.snapshot_set();
        let exported = acks.export_groups()?;
        let registry = match std::fs::read(dir.join(REGISTRY_FILE)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let mut records = Vec::new();
        let start = log.first_offset().max(acked.floor());
        for offset in start..message_end.min(log.next_offset()) {
            if acked.contains(offset) {
                continue;
            }
            match log.read(offset) {
                Ok(r) => records.push((offset, r.payload)),
                Err(StorageError::OffsetOutOfRange { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(StoreSnapshot {
            message_end,
            acks: exported,
            registry,
            records,
        })
    }

    /// The first offset the snapshot holds a record for (`message_end` when none).
    fn base(&self) -> u64 {
        self.records.first().map_or(self.message_end, |r| r.0)
    }

    pub fn encode(&self) -> Vec<u8> {
        let bytes: usize = self.records.iter().map(|r| 12 + r.1.len()).sum();
        let mut out = Vec::with_capacity(64 + self.acks.len() + self.registry.len() + bytes);
        out.put_u8(STORE_SNAPSHOT_VERSION);
        out.put_u64_le(self.message_end);
        out.put_u64_le(self.base());
        out.put_u32_le(self.acks.len() as u32);
        out.put_slice(&self.acks);
        out.put_u32_le(self.registry.len() as u32);
        out.put_slice(&self.registry);
        out.put_u64_le(self.records.len() as u64);
        for (offset, record) in &self.records {
            out.put_u64_le(*offset);
            out.put_u32_le(record.len() as u32);
            out.put_slice(record);
        }
        out
    }

    pub fn decode(data: Bytes) -> Result<StoreSnapshot, SnapshotError> {
        let mut d = data;
        let need = |d: &Bytes, n: usize| {
            (d.remaining() >= n)
                .then_some(())
                .ok_or(SnapshotError::Malformed("truncated"))
        };
        need(&d, 17)?;
        let version = d.get_u8();
        if version != STORE_SNAPSHOT_VERSION {
            return Err(SnapshotError::Version(version));
        }
        let message_end = d.get_u64_le();
        let base = d.get_u64_le();
        let chunk = |d: &mut Bytes| -> Result<Bytes, SnapshotError> {
            need(d, 4)?;
            let len = d.get_u32_le() as usize;
            need(d, len)?;
            Ok(d.split_to(len))
        };
        let acks = chunk(&mut d)?.to_vec();
        let registry = chunk(&mut d)?.to_vec();
        need(&d, 8)?;
        let n = d.get_u64_le();
        if n > message_end.saturating_sub(base) || n as usize > d.remaining() / 12 {
            return Err(SnapshotError::Malformed("more records than offsets"));
        }
        let mut records = Vec::with_capacity(n as usize);
        let mut next = base;
        for _ in 0..n {
            need(&d, 8)?;
            let offset = d.get_u64_le();
            if offset < next || offset >= message_end {
                return Err(SnapshotError::Malformed(
                    "record offsets out of order or range",
                ));
            }
            next = offset + 1;
            records.push((offset, chunk(&mut d)?));
        }
        if d.has_remaining() {
            return Err(SnapshotError::Malformed("trailing bytes"));
        }
        if records.first().is_some_and(|r| r.0 != base) {
            return Err(SnapshotError::Malformed("base is not the first record"));
        }
        Ok(StoreSnapshot {
            message_end,
            acks,
            registry,
            records,
        })
    }

    /// Replaces the store with this snapshot and makes it durable.
    pub fn install(
        &self,
        log: &Log,
        acks: &AckLog,
        dir: &std::path::Path,
    ) -> Result<(), SnapshotError> {
        log.reset_to(self.base())?;
        let mut records = self.records.iter().peekable();
        for offset in self.base()..self.message_end {
            match records.peek() {
                Some((o, record)) if *o == offset => {
                    log.append_view(0, &[record])?;
                    records.next();
                }
                _ => {
                    log.append_view(0, &[])?;
                }
            }
        }
        log.flush()?;
        acks.import_groups(&self.acks)?;
        acks.log().flush()?;
        if self.registry.is_empty() {
            match std::fs::remove_file(dir.join(REGISTRY_FILE)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        } else {
            replication::write_file(dir, REGISTRY_FILE, &self.registry)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::replication::tests::open;

    #[test]
    fn a_snapshot_carries_live_records_at_their_offsets_and_only_committed_ones() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (log, acks) = open(a.path());
        for i in 0..10u8 {
            log.append_view(0, &[&[i; 3]]).unwrap();
        }
        acks.ack(&[0, 1, 2, 5]).unwrap();
        acks.raise_group_floor(3, 7).unwrap();
        replication::write_file(a.path(), REGISTRY_FILE, b"version: 1\n").unwrap();
        // 8 and 9 are a local tail that was never committed.
        let snap = StoreSnapshot::capture(&log, &acks, a.path(), 8).unwrap();
        let bytes = snap.encode();
        let decoded = StoreSnapshot::decode(Bytes::from(bytes.clone())).unwrap();

        let (log2, acks2) = open(b.path());
        for _ in 0..20 {
            log2.append_view(0, &[b"stale"]).unwrap();
        }
        acks2.ack(&[4]).unwrap();
        decoded.install(&log2, &acks2, b.path()).unwrap();
        assert_eq!((log2.first_offset(), log2.next_offset()), (3, 8));
        for o in [3u64, 4, 6, 7] {
            assert_eq!(&log2.read(o).unwrap().payload[..], &[o as u8; 3]);
        }
        assert!(acks2.is_acked(5) && !acks2.is_acked(4) && acks2.is_group_acked(3, 6));
        assert_eq!(
            std::fs::read(b.path().join(REGISTRY_FILE)).unwrap(),
            b"version: 1\n"
        );
        // Every truncation and a flipped version are refused before touching a store.
        for cut in 0..bytes.len() {
            assert!(StoreSnapshot::decode(Bytes::copy_from_slice(&bytes[..cut])).is_err());
        }
        let mut bad = bytes.clone();
        bad[0] = 9;
        assert!(matches!(
            StoreSnapshot::decode(Bytes::from(bad)),
            Err(SnapshotError::Version(9))
        ));
    }
}
