//! Consumption state of a queue (or consumer group): which offsets of a data log have
//! been acknowledged, persisted in a small log of its own.
//!
//! Acknowledgements arrive out of order (competing consumers, redeliveries), so the state
//! is an [`OffsetSet`]. Each [`AckLog::ack`] appends one record listing offsets as
//! delta-varints; every [`SNAPSHOT_EVERY_RECORDS`] records a snapshot of the whole set is
//! appended and older ack segments are purged, so reopening replays a bounded amount.
//!
//! Invariant: an offset reported acknowledged after a restart was acknowledged before it
//! and its ack record was durable. A data segment may be deleted once
//! [`AckLog::contains_range`] covers it and the acks are durable.

use std::path::Path;
use std::sync::Mutex;

use crate::config::LogConfig;
use crate::error::{Result, StorageError};
use crate::log::Log;
use crate::offset_set::OffsetSet;
use crate::sync::Durable;

/// Ack records between two snapshots.
pub const SNAPSHOT_EVERY_RECORDS: u64 = 50_000;
/// Default segment size of an ack log: 8 MiB.
pub const ACK_SEGMENT_BYTES: u64 = 8 * 1024 * 1024;
/// Most offsets one ack record carries.
pub const MAX_ACKS_PER_RECORD: usize = 64 * 1024;

const FLAG_ACKS: u16 = 1;
const FLAG_SNAPSHOT: u16 = 2;

// Format (ack record, flags = 1): { count: varint | first: varint | (count - 1) × delta from previous: zigzag varint }
// Format (snapshot record, flags = 2): OffsetSet::encode

/// Persistent set of acknowledged offsets.
pub struct AckLog {
    log: Log,
    state: Mutex<AckState>,
}

struct AckState {
    set: OffsetSet,
    since_snapshot: u64,
}

impl AckLog {
    /// Opens (or creates) the ack log in `dir` and replays it.
    pub fn open(dir: impl AsRef<Path>, mut config: LogConfig) -> Result<AckLog> {
        config.segment_bytes = config.segment_bytes.min(ACK_SEGMENT_BYTES);
        config.record_bytes_max = config
            .record_bytes_max
            .min((config.segment_bytes / 2) as u32);
        let log = Log::open(dir, config)?;
        let mut set = OffsetSet::default();
        let mut since_snapshot = 0;
        for record in log.reader(log.first_offset()) {
            let record = record?;
            match record.flags {
                FLAG_SNAPSHOT => {
                    set = OffsetSet::decode(&record.payload)
                        .ok_or_else(|| bad_record(&log, record.offset))?;
                    since_snapshot = 0;
                }
                FLAG_ACKS => {
                    decode_acks(&record.payload, |o| {
                        set.insert(o);
                    })
                    .ok_or_else(|| bad_record(&log, record.offset))?;
                    since_snapshot += 1;
                }
                _ => return Err(bad_record(&log, record.offset)),
            }
        }
        Ok(AckLog {
            log,
            state: Mutex::new(AckState {
                set,
                since_snapshot,
            }),
        })
    }

    /// Records `offsets` as acknowledged; the returned handle completes when that is durable.
    pub fn ack(&self, offsets: &[u64]) -> Result<Durable> {
        let mut last = None;
        for chunk in offsets.chunks(MAX_ACKS_PER_RECORD) {
            let mut buf = Vec::with_capacity(chunk.len() * 3 + 8);
            encode_acks(chunk, &mut buf);
            let mut state = self.state.lock().map_err(|_| StorageError::Closed)?;
            let appended = self.log.append_parts(FLAG_ACKS, &[&buf])?;
            for &o in chunk {
                state.set.insert(o);
            }
            state.since_snapshot += 1;
            if state.since_snapshot >= SNAPSHOT_EVERY_RECORDS {
                self.snapshot_locked(&mut state)?;
            }
            last = Some(appended.durable);
        }
        Ok(last.unwrap_or_else(|| Durable::ready(0)))
    }

    /// Marks every offset below `floor` acknowledged (for example records that are not
    /// queue messages). Durable with the next snapshot or ack.
    pub fn raise_floor(&self, floor: u64) -> Result<Durable> {
        let mut state = self.state.lock().map_err(|_| StorageError::Closed)?;
        state.set.raise_floor(floor);
        self.snapshot_locked(&mut state)
    }

    fn snapshot_locked(&self, state: &mut AckState) -> Result<Durable> {
        let mut buf = Vec::new();
        state.set.encode(&mut buf);
        let appended = self.log.append_parts(FLAG_SNAPSHOT, &[&buf])?;
        state.since_snapshot = 0;
        self.log.purge_before(appended.first)?;
        Ok(appended.durable)
    }

    pub fn is_acked(&self, offset: u64) -> bool {
        self.state.lock().is_ok_and(|s| s.set.contains(offset))
    }

    /// True if every offset in `from..to` is acknowledged.
    pub fn contains_range(&self, from: u64, to: u64) -> bool {
        self.state
            .lock()
            .is_ok_and(|s| s.set.contains_range(from, to))
    }

    /// Every offset below this is acknowledged.
    pub fn floor(&self) -> u64 {
        self.state.lock().map_or(0, |s| s.set.floor())
    }

    /// A copy of the whole set (recovery of queues).
    pub fn snapshot_set(&self) -> OffsetSet {
        self.state.lock().map(|s| s.set.clone()).unwrap_or_default()
    }

    /// The log holding the acks (for its stats).
    pub fn log(&self) -> &Log {
        &self.log
    }
}

fn bad_record(log: &Log, offset: u64) -> StorageError {
    StorageError::Corrupt {
        path: log.dir().to_path_buf(),
        position: 0,
        offset,
        reason: "malformed ack record",
    }
}

fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(data: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *data.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

fn encode_acks(offsets: &[u64], out: &mut Vec<u8>) {
    put_varint(offsets.len() as u64, out);
    let mut prev = 0u64;
    for (i, &o) in offsets.iter().enumerate() {
        if i == 0 {
            put_varint(o, out);
        } else {
            let d = o.wrapping_sub(prev) as i64;
            put_varint(((d << 1) ^ (d >> 63)) as u64, out);
        }
        prev = o;
    }
}

fn decode_acks(data: &[u8], mut each: impl FnMut(u64)) -> Option<()> {
    let mut at = 0;
    let count = get_varint(data, &mut at)?;
    if count > MAX_ACKS_PER_RECORD as u64 {
        return None;
    }
    let mut prev = 0u64;
    for i in 0..count {
        let v = get_varint(data, &mut at)?;
        let o = if i == 0 {
            v
        } else {
            prev.wrapping_add((((v >> 1) as i64) ^ -((v & 1) as i64)) as u64)
        };
        each(o);
        prev = o;
    }
    (at == data.len()).then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SyncPolicy;

    fn cfg() -> LogConfig {
        LogConfig {
            sync: SyncPolicy::Never,
            segment_bytes: 64 * 1024,
            record_bytes_max: 32 * 1024,
            ..LogConfig::default()
        }
    }

    #[test]
    fn acks_encode_round_trip() {
        let offsets = [5u64, 3, 1_000_000, 4, 4, 0, u64::MAX / 2];
        let mut buf = Vec::new();
        encode_acks(&offsets, &mut buf);
        let mut back = Vec::new();
        decode_acks(&buf, |o| back.push(o)).unwrap();
        assert_eq!(back, offsets);
        assert!(decode_acks(&buf[..buf.len() - 1], |_| {}).is_none());
    }

    #[test]
    fn acks_survive_reopen_and_snapshots_bound_the_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let acks = AckLog::open(dir.path(), cfg()).unwrap();
            for o in (0..200_000u64).step_by(2) {
                acks.ack(&[o]).unwrap();
            }
            acks.ack(&[1, 3, 5]).unwrap();
            acks.log().flush().unwrap();
        }
        let acks = AckLog::open(dir.path(), cfg()).unwrap();
        assert_eq!(acks.floor(), 7);
        assert!(acks.is_acked(199_998));
        assert!(!acks.is_acked(199_999));
        assert!(acks.contains_range(0, 7));
        assert!(!acks.contains_range(0, 8));
        let spans = acks.log().segments();
        let bytes: u64 = spans.iter().map(|s| s.bytes).sum();
        assert!(
            bytes < 2 * 1024 * 1024,
            "ack log should be compacted, holds {bytes} bytes"
        );
    }
}
