//! Consumption state of a queue (or consumer group): which offsets of a data log have
//! been acknowledged, persisted in a small log of its own.
//!
//! Acknowledgements arrive out of order (competing consumers, redeliveries), so the state
//! is an [`OffsetSet`]. Each [`AckLog::ack`] appends one record listing offsets as
//! delta-varints; every [`SNAPSHOT_EVERY_RECORDS`] records a snapshot of the whole set is
//! appended and older ack segments are purged, so reopening replays a bounded amount.
//!
//! It also keeps *delivery counts*: how often a not yet acknowledged message of a group
//! was delivered without success (a consumer's `modified` with delivery-failed, or a link
//! closed with the delivery unsettled), so `max-delivery-attempts` and the delivery-count
//! a consumer sees survive a restart. A count is one small record when it changes (the
//! failure path, never the hot one), carried into every snapshot and forgotten once its
//! message is acknowledged.
//!
//! Out of space: an acknowledgement whose record cannot be appended (the next segment
//! cannot be preallocated: [`StorageError::DiskFull`]) is an error and is not applied in
//! memory either — never a silent success. The ack log takes no free-space reserve of its
//! own: the reserve other logs leave (`LogConfig::reserve_bytes`) is for it, because its
//! records are what lets the data log's segments be deleted.
//!
//! Invariant: an offset reported acknowledged after a restart was acknowledged before it
//! and its ack record was durable. A data segment may be deleted once
//! [`AckLog::contains_range`] covers it and the acks are durable.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

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
/// Longest an acknowledgement nobody waits for stays unsynced (`LogConfig::lazy_sync`):
/// a power cut within it delivers the message again. A settle-second consumer's or a
/// transaction's acknowledgement is synced at once (its holder waits for it).
pub const ACK_SYNC_DELAY: Duration = Duration::from_millis(10);

const FLAG_ACKS: u16 = 1;
const FLAG_SNAPSHOT: u16 = 2;
const FLAG_GROUP_ACKS: u16 = 3;
const FLAG_GROUP_SNAPSHOT: u16 = 4;
const FLAG_GROUP_DROP: u16 = 5;
const FLAG_DELIVERY_COUNT: u16 = 6;
const FLAG_COUNTS_SNAPSHOT: u16 = 7;

/// The group of the default consumption state (queues).
pub const DEFAULT_GROUP: u32 = 0;
/// Most groups one ack log tracks.
pub const MAX_GROUPS: usize = 1 << 20;

// Format (ack record, flags = 1, group 0): { count: varint | first: varint | (count - 1) × delta from previous: zigzag varint }
// Format (snapshot record, flags = 2, group 0 only; read, no longer written): OffsetSet::encode
// Format (group ack record, flags = 3): { group: varint | ack record }
// Format (group snapshot record, flags = 4): { groups: varint | groups × { group: varint | len: varint | OffsetSet::encode (len bytes) } }
// Format (group drop record, flags = 5): { group: varint }
// Format (delivery count record, flags = 6): { group: varint | offset: varint | count: varint }
// Format (delivery counts snapshot, flags = 7): { n: varint | n × { group: varint | offset: varint | count: varint } }
//   (written right after each group snapshot; replaces all counts)

/// Persistent sets of acknowledged offsets, one per consumer group (see the module docs).
/// Group [`DEFAULT_GROUP`] always exists.
pub struct AckLog {
    log: Log,
    state: Mutex<AckState>,
}

struct AckState {
    groups: HashMap<u32, OffsetSet>,
    /// Delivery counts of messages not yet acknowledged: (group, offset) → count.
    counts: HashMap<(u32, u64), u32>,
    since_snapshot: u64,
    /// Encode buffer reused by every ack (no allocation per acknowledgement).
    buf: Vec<u8>,
}

impl AckState {
    fn group(&mut self, group: u32) -> &mut OffsetSet {
        self.groups.entry(group).or_default()
    }

    fn is_acked(&self, group: u32, offset: u64) -> bool {
        self.groups.get(&group).is_none_or(|g| g.contains(offset))
    }

    /// Forgets counts whose message is acknowledged (or whose group is gone).
    fn prune_counts(&mut self) {
        let groups = &self.groups;
        self.counts
            .retain(|(g, o), _| groups.get(g).is_some_and(|set| !set.contains(*o)));
    }

    fn apply(&mut self, flags: u16, payload: &[u8]) -> Option<()> {
        match flags {
            FLAG_ACKS => {
                let set = self.group(DEFAULT_GROUP);
                decode_acks(payload, |o| {
                    set.insert(o);
                })?;
                self.since_snapshot += 1;
            }
            FLAG_SNAPSHOT => {
                *self.group(DEFAULT_GROUP) = OffsetSet::decode(payload)?;
                self.since_snapshot = 0;
            }
            FLAG_GROUP_ACKS => {
                let mut at = 0;
                let group = u32::try_from(get_varint(payload, &mut at)?).ok()?;
                let set = self.group(group);
                decode_acks(&payload[at..], |o| {
                    set.insert(o);
                })?;
                self.since_snapshot += 1;
            }
            FLAG_GROUP_SNAPSHOT => {
                self.groups = decode_group_snapshot(payload)?;
                self.since_snapshot = 0;
            }
            FLAG_GROUP_DROP => {
                let mut at = 0;
                let group = u32::try_from(get_varint(payload, &mut at)?).ok()?;
                self.groups.remove(&group);
            }
            FLAG_DELIVERY_COUNT => {
                let mut at = 0;
                let (key, count) = get_count(payload, &mut at)?;
                (at == payload.len()).then_some(())?;
                self.counts.insert(key, count);
            }
            FLAG_COUNTS_SNAPSHOT => self.counts = decode_counts(payload)?,
            _ => return None,
        }
        Some(())
    }
}

impl AckLog {
    /// Opens (or creates) the ack log in `dir` and replays it.
    pub fn open(dir: impl AsRef<Path>, mut config: LogConfig) -> Result<AckLog> {
        config.segment_bytes = config.segment_bytes.min(ACK_SEGMENT_BYTES);
        // The reserve other logs leave is for this one: it never refuses itself.
        config.reserve_bytes = 0;
        // Nobody appends acknowledgements waiting for the last ones' sync: gathering
        // would only spin (`LogConfig::gather`).
        config.gather = false;
        // Nor does anyone usually wait for them (a consumer settling first is told
        // nothing): sync at most every `ACK_SYNC_DELAY`, or when a waiter asks.
        config.lazy_sync = Some(ACK_SYNC_DELAY);
        config.record_bytes_max = config
            .record_bytes_max
            .min((config.segment_bytes / 2) as u32);
        let log = Log::open(dir, config)?;
        let mut state = AckState {
            groups: HashMap::new(),
            counts: HashMap::new(),
            since_snapshot: 0,
            buf: Vec::with_capacity(256),
        };
        for record in log.reader(log.first_offset()) {
            let record = record?;
            state
                .apply(record.flags, &record.payload)
                .ok_or_else(|| bad_record(&log, record.offset))?;
        }
        state.group(DEFAULT_GROUP);
        state.prune_counts();
        Ok(AckLog {
            log,
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, AckState>> {
        self.state.lock().map_err(|_| StorageError::Closed)
    }

    /// Records `offsets` as acknowledged in the default group; the returned handle
    /// completes when that is durable.
    pub fn ack(&self, offsets: &[u64]) -> Result<Durable> {
        self.ack_group(DEFAULT_GROUP, offsets)
    }

    /// Records `offsets` as acknowledged by consumer group `group`. An error means the
    /// offsets of the failing chunk (at most [`MAX_ACKS_PER_RECORD`]; earlier chunks are
    /// recorded) are *not* acknowledged, in memory or on disk: [`StorageError::DiskFull`]
    /// when the next segment cannot be preallocated, retryable once space is freed.
    pub fn ack_group(&self, group: u32, offsets: &[u64]) -> Result<Durable> {
        let mut last = None;
        for chunk in offsets.chunks(MAX_ACKS_PER_RECORD) {
            let mut state = self.lock()?;
            let mut buf = std::mem::take(&mut state.buf);
            buf.clear();
            let flags = if group == DEFAULT_GROUP {
                FLAG_ACKS
            } else {
                put_varint(u64::from(group), &mut buf);
                FLAG_GROUP_ACKS
            };
            encode_acks(chunk, &mut buf);
            let appended = self.log.append_parts(flags, &[&buf]);
            state.buf = buf;
            let appended = appended?;
            let set = state.group(group);
            for &o in chunk {
                set.insert(o);
            }
            if !state.counts.is_empty() {
                for &o in chunk {
                    state.counts.remove(&(group, o));
                }
            }
            state.since_snapshot += 1;
            if state.since_snapshot >= SNAPSHOT_EVERY_RECORDS {
                // The acknowledgement is recorded whatever happens to the snapshot, which
                // only bounds the replay: a snapshot that fails (no room for a segment) is
                // retried with the next acknowledgement, and nothing is purged meanwhile.
                if let Err(e) = self.snapshot_locked(&mut state) {
                    tracing::warn!(dir = %self.log.dir().display(), error = %e,
                        "ack log snapshot failed; retried with the next acknowledgement");
                }
            }
            last = Some(appended.durable);
        }
        Ok(last.unwrap_or_else(|| Durable::ready(0)))
    }

    /// Marks every offset below `floor` acknowledged in the default group. Durable with
    /// the returned handle (a snapshot is written).
    pub fn raise_floor(&self, floor: u64) -> Result<Durable> {
        self.raise_group_floor(DEFAULT_GROUP, floor)
    }

    /// Marks every offset below `floor` acknowledged by `group` (a new subscription starts
    /// at the end of the log). Creates the group if needed; durable with the handle.
    pub fn raise_group_floor(&self, group: u32, floor: u64) -> Result<Durable> {
        let mut state = self.lock()?;
        if state.groups.len() >= MAX_GROUPS && !state.groups.contains_key(&group) {
            return Err(StorageError::Config(format!(
                "more than {MAX_GROUPS} consumer groups"
            )));
        }
        state.group(group).raise_floor(floor);
        self.snapshot_locked(&mut state)
    }

    /// Forgets a consumer group (a deleted subscription).
    pub fn drop_group(&self, group: u32) -> Result<Durable> {
        let mut state = self.lock()?;
        let mut buf = Vec::with_capacity(5);
        put_varint(u64::from(group), &mut buf);
        let appended = self.log.append_parts(FLAG_GROUP_DROP, &[&buf])?;
        state.groups.remove(&group);
        state.counts.retain(|(g, _), _| *g != group);
        Ok(appended.durable)
    }

    /// Records that `group`'s message at `offset` was delivered without success `count`
    /// times (ignored once it is acknowledged); durable with the returned handle.
    pub fn set_delivery_count(&self, group: u32, offset: u64, count: u32) -> Result<Durable> {
        let mut state = self.lock()?;
        if state.is_acked(group, offset) {
            return Ok(Durable::ready(0));
        }
        let mut buf = Vec::with_capacity(16);
        put_count(&mut buf, (group, offset), count);
        let appended = self.log.append_parts(FLAG_DELIVERY_COUNT, &[&buf])?;
        state.counts.insert((group, offset), count);
        Ok(appended.durable)
    }

    /// How often `group`'s message at `offset` was delivered without success (0 if never).
    pub fn delivery_count(&self, group: u32, offset: u64) -> u32 {
        self.state
            .lock()
            .ok()
            .and_then(|s| s.counts.get(&(group, offset)).copied())
            .unwrap_or(0)
    }

    /// Every kept delivery count, encoded as a counts snapshot (a Raft snapshot carries it).
    pub fn export_counts(&self) -> Result<Vec<u8>> {
        let state = self.lock()?;
        Ok(encode_counts(&state.counts))
    }

    /// Replaces every delivery count with `data` from [`AckLog::export_counts`].
    pub fn import_counts(&self, data: &[u8]) -> Result<Durable> {
        let counts = decode_counts(data)
            .ok_or_else(|| self.malformed_import("malformed imported delivery counts"))?;
        let mut state = self.lock()?;
        state.counts = counts;
        state.prune_counts();
        self.snapshot_locked(&mut state)
    }

    /// A group snapshot, then a counts snapshot (always, even empty: purging is by whole
    /// segment, so count records before it may survive in its segment and must not
    /// outlive a replacement), then the purge of what they cover.
    fn snapshot_locked(&self, state: &mut AckState) -> Result<Durable> {
        let buf = encode_group_snapshot(state);
        let appended = self.log.append_parts(FLAG_GROUP_SNAPSHOT, &[&buf])?;
        state.since_snapshot = 0;
        state.prune_counts();
        let counts = encode_counts(&state.counts);
        let durable = self
            .log
            .append_parts(FLAG_COUNTS_SNAPSHOT, &[&counts])?
            .durable;
        self.log.purge_before(appended.first)?;
        Ok(durable)
    }

    fn malformed_import(&self, reason: &'static str) -> StorageError {
        StorageError::Corrupt {
            path: self.log.dir().to_path_buf(),
            position: 0,
            offset: 0,
            reason,
        }
    }

    /// Every group's set, encoded as a group snapshot (`Format (group snapshot record)`).
    pub fn export_groups(&self) -> Result<Vec<u8>> {
        let state = self.lock()?;
        Ok(encode_group_snapshot(&state))
    }

    /// Replaces every group's set with `data` from [`AckLog::export_groups`] (a Raft
    /// snapshot installed on a follower). Durable with the returned handle.
    pub fn import_groups(&self, data: &[u8]) -> Result<Durable> {
        let groups = decode_group_snapshot(data)
            .ok_or_else(|| self.malformed_import("malformed imported ack groups"))?;
        let mut state = self.lock()?;
        state.groups = groups;
        state.group(DEFAULT_GROUP);
        self.snapshot_locked(&mut state)
    }

    pub fn is_acked(&self, offset: u64) -> bool {
        self.is_group_acked(DEFAULT_GROUP, offset)
    }

    /// True if `group` acknowledged `offset` (false for an unknown group).
    pub fn is_group_acked(&self, group: u32, offset: u64) -> bool {
        self.state
            .lock()
            .is_ok_and(|s| s.groups.get(&group).is_some_and(|g| g.contains(offset)))
    }

    /// True if every offset in `from..to` is acknowledged in the default group.
    pub fn contains_range(&self, from: u64, to: u64) -> bool {
        self.state.lock().is_ok_and(|s| {
            s.groups
                .get(&DEFAULT_GROUP)
                .is_some_and(|g| g.contains_range(from, to))
        })
    }

    /// Every offset below this is acknowledged in the default group.
    pub fn floor(&self) -> u64 {
        self.state
            .lock()
            .map_or(0, |s| s.groups.get(&DEFAULT_GROUP).map_or(0, |g| g.floor()))
    }

    /// A copy of the default group's set (recovery of queues).
    pub fn snapshot_set(&self) -> OffsetSet {
        self.group_set(DEFAULT_GROUP).unwrap_or_default()
    }

    /// A copy of `group`'s set, `None` if the group is unknown.
    pub fn group_set(&self, group: u32) -> Option<OffsetSet> {
        self.state
            .lock()
            .ok()
            .and_then(|s| s.groups.get(&group).cloned())
    }

    /// The groups known, in no particular order.
    pub fn groups(&self) -> Vec<u32> {
        self.state
            .lock()
            .map(|s| s.groups.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The log holding the acks (for its stats).
    pub fn log(&self) -> &Log {
        &self.log
    }
}

fn encode_group_snapshot(state: &AckState) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut groups: Vec<_> = state.groups.iter().collect();
    groups.sort_by_key(|(g, _)| **g);
    put_varint(groups.len() as u64, &mut buf);
    let mut set_bytes = Vec::new();
    for (group, set) in groups {
        set_bytes.clear();
        set.encode(&mut set_bytes);
        put_varint(u64::from(*group), &mut buf);
        put_varint(set_bytes.len() as u64, &mut buf);
        buf.extend_from_slice(&set_bytes);
    }
    buf
}

fn decode_group_snapshot(data: &[u8]) -> Option<HashMap<u32, OffsetSet>> {
    let mut at = 0;
    let count = get_varint(data, &mut at)?;
    if count > MAX_GROUPS as u64 {
        return None;
    }
    let mut groups = HashMap::new();
    for _ in 0..count {
        let group = u32::try_from(get_varint(data, &mut at)?).ok()?;
        let len = usize::try_from(get_varint(data, &mut at)?).ok()?;
        let end = at.checked_add(len)?;
        groups.insert(group, OffsetSet::decode(data.get(at..end)?)?);
        at = end;
    }
    (at == data.len()).then_some(groups)
}

fn put_count(buf: &mut Vec<u8>, (group, offset): (u32, u64), count: u32) {
    put_varint(u64::from(group), buf);
    put_varint(offset, buf);
    put_varint(u64::from(count), buf);
}

fn get_count(data: &[u8], at: &mut usize) -> Option<((u32, u64), u32)> {
    let group = u32::try_from(get_varint(data, at)?).ok()?;
    let offset = get_varint(data, at)?;
    let count = u32::try_from(get_varint(data, at)?).ok()?;
    Some(((group, offset), count))
}

fn encode_counts(counts: &HashMap<(u32, u64), u32>) -> Vec<u8> {
    let mut sorted: Vec<_> = counts.iter().collect();
    sorted.sort_unstable();
    let mut buf = Vec::with_capacity(4 + sorted.len() * 8);
    put_varint(sorted.len() as u64, &mut buf);
    for (key, count) in sorted {
        put_count(&mut buf, *key, *count);
    }
    buf
}

fn decode_counts(data: &[u8]) -> Option<HashMap<(u32, u64), u32>> {
    let mut at = 0;
    let n = get_varint(data, &mut at)?;
    // Each entry takes at least 3 bytes: a bound before allocating.
    if n > (data.len() as u64) / 3 + 1 {
        return None;
    }
    let mut counts = HashMap::with_capacity(n as usize);
    for _ in 0..n {
        let (key, count) = get_count(data, &mut at)?;
        counts.insert(key, count);
    }
    (at == data.len()).then_some(counts)
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

    #[test]
    fn delivery_counts_survive_reopen_and_snapshots_and_go_with_the_ack() {
        let dir = tempfile::tempdir().unwrap();
        let open = || AckLog::open(dir.path(), LogConfig::default()).unwrap();
        let acks = open();
        acks.raise_group_floor(7, 0).unwrap();
        acks.set_delivery_count(DEFAULT_GROUP, 3, 1).unwrap();
        acks.set_delivery_count(DEFAULT_GROUP, 3, 2).unwrap();
        acks.set_delivery_count(DEFAULT_GROUP, 4, 1).unwrap();
        acks.set_delivery_count(7, 3, 5).unwrap();
        acks.ack(&[4]).unwrap();
        assert_eq!(
            acks.delivery_count(DEFAULT_GROUP, 4),
            0,
            "acknowledged: forgotten"
        );
        drop(acks);
        let acks = open();
        assert_eq!(acks.delivery_count(DEFAULT_GROUP, 3), 2);
        assert_eq!(acks.delivery_count(DEFAULT_GROUP, 4), 0);
        assert_eq!(acks.delivery_count(7, 3), 5);
        // A snapshot (a floor raise writes one and purges what it covers) keeps them.
        acks.raise_group_floor(9, 0).unwrap();
        drop(acks);
        let acks = open();
        assert_eq!(acks.delivery_count(DEFAULT_GROUP, 3), 2);
        assert_eq!(acks.delivery_count(7, 3), 5);
        // A count for an acknowledged message is not even written.
        acks.ack(&[10]).unwrap();
        acks.set_delivery_count(DEFAULT_GROUP, 10, 3).unwrap();
        assert_eq!(acks.delivery_count(DEFAULT_GROUP, 10), 0);
        // Exported counts replace another log's.
        let other_dir = tempfile::tempdir().unwrap();
        let other = AckLog::open(other_dir.path(), LogConfig::default()).unwrap();
        other.raise_group_floor(7, 0).unwrap();
        other.set_delivery_count(DEFAULT_GROUP, 99, 1).unwrap();
        other.import_counts(&acks.export_counts().unwrap()).unwrap();
        assert_eq!(other.delivery_count(DEFAULT_GROUP, 99), 0);
        assert_eq!(other.delivery_count(DEFAULT_GROUP, 3), 2);
        assert_eq!(other.delivery_count(7, 3), 5);
        // An empty import replaces the counts for good, also after a reopen.
        let empty_dir = tempfile::tempdir().unwrap();
        let empty = AckLog::open(empty_dir.path(), LogConfig::default()).unwrap();
        other
            .import_counts(&empty.export_counts().unwrap())
            .unwrap();
        drop(other);
        let other = AckLog::open(other_dir.path(), LogConfig::default()).unwrap();
        assert_eq!(other.delivery_count(DEFAULT_GROUP, 3), 0);
        drop(acks);
        let acks = open();
        acks.drop_group(7).unwrap();
        assert_eq!(acks.delivery_count(7, 3), 0);
        assert!(other.import_counts(&[5, 1]).is_err());
    }
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
    fn groups_are_independent_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let acks = AckLog::open(dir.path(), cfg()).unwrap();
            acks.ack(&[0, 1]).unwrap();
            acks.raise_group_floor(7, 100).unwrap();
            acks.ack_group(7, &[150, 101]).unwrap();
            acks.ack_group(9, &[5]).unwrap();
            acks.drop_group(9).unwrap();
            acks.log().flush().unwrap();
        }
        let acks = AckLog::open(dir.path(), cfg()).unwrap();
        assert_eq!(acks.floor(), 2);
        assert!(
            acks.is_group_acked(7, 99)
                && acks.is_group_acked(7, 150)
                && acks.is_group_acked(7, 101)
        );
        assert!(!acks.is_group_acked(7, 100));
        assert!(
            !acks.is_acked(150),
            "group 7 acks do not leak into the default group"
        );
        assert_eq!(acks.group_set(9), None, "dropped group stays dropped");
        let mut groups = acks.groups();
        groups.sort();
        assert_eq!(groups, vec![0, 7]);
    }

    #[test]
    fn exported_groups_replace_another_logs_state() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let from = AckLog::open(a.path(), cfg()).unwrap();
        from.ack(&[0, 2]).unwrap();
        from.raise_group_floor(4, 10).unwrap();
        let to = AckLog::open(b.path(), cfg()).unwrap();
        to.ack(&[7]).unwrap();
        to.import_groups(&from.export_groups().unwrap()).unwrap();
        assert!(to.is_acked(0) && to.is_acked(2) && !to.is_acked(7));
        assert!(to.is_group_acked(4, 9));
        to.log().flush().unwrap();
        drop(to);
        let to = AckLog::open(b.path(), cfg()).unwrap();
        assert!(to.is_acked(2) && !to.is_acked(7) && to.is_group_acked(4, 9));
        assert!(to.import_groups(b"garbage").is_err());
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
