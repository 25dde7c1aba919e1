//! The state machine of one address's Raft group on the node-level host (issue 12,
//! step 4.1): it applies the broker's ops batches (`broker/replication.rs`) to an
//! *index* of the address — which messages are live and where their bodies lie in the
//! group's log, what each consumer group acknowledged, the delivery counts — and never
//! holds a message body: a message's Raft entry is its stored copy, read back with
//! `GroupHandle::read(position)`.
//!
//! What it owns:
//! * **Offsets.** Messages are numbered densely in log order, from 0: the `n`-th message
//!   op applied is offset `n` on every replica. A message op's own `offset` is the
//!   proposer's expectation; when it differs (a leader that lost its term numbered past
//!   entries that were dropped) the log's order wins and [`AddressMachine::renumbered`]
//!   counts it. The proposer learns the true offset from its proposal's position
//!   ([`AddressMachine::offset_at`]).
//! * **Positions.** A message op is alone in its payload (one proposal), so the
//!   message's position `(entry index, slot)` locates its record: the payload's bytes
//!   from [`MESSAGE_RECORD_AT`]. Consecutive messages in consecutive slots of one entry
//!   are one *run* `{ offset, index, slot, count }`: a batch of 1,000 messages costs one.
//! * **Consumption.** Per consumer group, the acknowledged offsets as a set of disjoint
//!   ranges (op 2/3 acks, op 4 floors). Group [`DEFAULT_GROUP`] (a queue's own consumers;
//!   a topic acknowledges its record there once every subscription is done with it)
//!   decides what is live: an offset below the next one that it has not acknowledged.
//!   Delivery counts (op 7) of unacknowledged messages, forgotten at their ack.
//! * **`lowest_needed`**: the entry of the oldest live message, or the entry after the
//!   last applied one when none is live. The host purges the group's log only below it.
//!
//! Invariants:
//! * Every replica that applied the same entries holds the same index (no clock, no
//!   randomness, no local state enters it).
//! * Below the oldest live offset nothing is kept: runs that end there are dropped, every
//!   group counts those offsets acknowledged (they are gone), their delivery counts too —
//!   so the index stays a few ranges however the acks came.
//! * The snapshot is the index, never a body; its format is versioned (below) and an
//!   unknown version or a length past its bound is a typed error.
//!
//! Does not: replace the broker's `Store` (step 4.2, `ARCHITECTURE.md`), accept a file op
//! (the subscription registry is cluster-wide: the metadata group's), or know about
//! leadership.
//!
//! ```text
//! // Format: address index snapshot, version 1 (the GroupMachine state in the host
//! // snapshot; integers little-endian)
//! { version: u8 = 1 | next_offset: u64 | applied_end: u64 | renumbered: u64
//!   | runs: u32 | runs × { offset: u64 | index: u64 | slot: u32 | count: u32 }
//!   | groups: u32 | groups × { group: u32 | ranges: u32 | ranges × { start: u64 | end: u64 } }
//!   | counts: u32 | counts × { group: u32 | offset: u64 | count: u32 } }
//! ```
//! Runs ascend by offset and position; groups ascend; a group's ranges ascend, are
//! non-empty and neither overlap nor touch; counts ascend by (group, offset).

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use entrepot_cluster::{GroupMachine, MachineError, Position};
use entrepot_storage::DEFAULT_GROUP;

use crate::broker::replication::{decode_ops, ApplyError, Op};

pub use crate::broker::replication::MESSAGE_RECORD_AT;

/// Version byte of the address index snapshot.
pub const ADDRESS_SNAPSHOT_VERSION: u8 = 1;
/// Most runs a snapshot holds.
pub const MAX_SNAPSHOT_RUNS: usize = 16 << 20;
/// Most consumer groups a snapshot holds (the ack log's own bound).
pub const MAX_SNAPSHOT_GROUPS: usize = entrepot_storage::MAX_GROUPS;
/// Most acknowledged ranges of one group a snapshot holds.
pub const MAX_SNAPSHOT_RANGES: usize = 16 << 20;
/// Most delivery counts a snapshot holds.
pub const MAX_SNAPSHOT_COUNTS: usize = 16 << 20;

const RUN_BYTES: usize = 8 + 8 + 4 + 4;
const RANGE_BYTES: usize = 8 + 8;
const COUNT_BYTES: usize = 4 + 8 + 4;

/// Why the machine refused an entry or a snapshot (the group stops on this replica, as
/// on every other: they all refuse the same entry).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AddressMachineError {
    #[error("entry {index} slot {slot}: {source}")]
    Ops {
        index: u64,
        slot: u32,
        #[source]
        source: ApplyError,
    },
    #[error("entry {index} slot {slot}: a message op must be alone in its payload")]
    MessageNotAlone { index: u64, slot: u32 },
    #[error("entry {index} slot {slot}: a file op belongs to the metadata group")]
    FileOp { index: u64, slot: u32 },
    #[error("address snapshot version {found} is not supported (this build reads {ADDRESS_SNAPSHOT_VERSION})")]
    UnsupportedVersion { found: u8 },
    #[error("address snapshot: {what} {len} exceeds {max}")]
    LimitExceeded {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("address snapshot malformed: {0}")]
    Malformed(&'static str),
}

/// Consecutive messages in consecutive slots of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    offset: u64,
    index: u64,
    slot: u32,
    count: u32,
}

impl Run {
    fn end(&self) -> u64 {
        self.offset + u64::from(self.count)
    }
}

/// Disjoint, non-touching half-open ranges of offsets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start → end (exclusive).
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// Adds `from..to`, merging with what it overlaps or touches.
    pub fn insert(&mut self, from: u64, to: u64) {
        if from >= to {
            return;
        }
        let (mut start, mut end) = (from, to);
        if let Some((&s, &e)) = self.ranges.range(..=from).next_back() {
            if e >= from {
                start = s;
                end = end.max(e);
            }
        }
        let inside: Vec<u64> = self.ranges.range(start..=end).map(|(&s, _)| s).collect();
        for s in inside {
            if let Some(e) = self.ranges.remove(&s) {
                end = end.max(e);
            }
        }
        self.ranges.insert(start, end);
    }

    pub fn contains(&self, offset: u64) -> bool {
        self.ranges
            .range(..=offset)
            .next_back()
            .is_some_and(|(_, &e)| e > offset)
    }

    /// The smallest offset not in the set.
    pub fn first_gap(&self) -> u64 {
        match self.ranges.first_key_value() {
            Some((0, &end)) => end,
            _ => 0,
        }
    }

    /// The ranges, ascending.
    pub fn ranges(&self) -> Vec<Range<u64>> {
        self.ranges.iter().map(|(&s, &e)| s..e).collect()
    }

    /// How many ranges the set holds (what its snapshot costs).
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// The index of one address (see the module docs). Replicas that applied the same
/// entries hold equal indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressIndex {
    /// The offset the next message gets.
    next_offset: u64,
    /// The entry after the last one applied (with a payload, or restored).
    applied_end: u64,
    /// Message ops whose own offset was not the one the log gave them.
    renumbered: u64,
    /// Runs from the one holding the oldest live offset on, ascending.
    runs: VecDeque<Run>,
    /// Acknowledged offsets per consumer group; [`DEFAULT_GROUP`] is always there.
    groups: BTreeMap<u32, RangeSet>,
    /// Failed deliveries of unacknowledged messages: (group, offset) → count.
    counts: BTreeMap<(u32, u64), u32>,
}

impl Default for AddressIndex {
    fn default() -> Self {
        AddressIndex {
            next_offset: 0,
            applied_end: 0,
            renumbered: 0,
            runs: VecDeque::new(),
            groups: [(DEFAULT_GROUP, RangeSet::default())].into_iter().collect(),
            counts: BTreeMap::new(),
        }
    }
}

impl AddressIndex {
    /// Offsets below this are no longer live (acknowledged in the default group).
    fn live_from(&self) -> u64 {
        let gap = self
            .groups
            .get(&DEFAULT_GROUP)
            .map_or(0, RangeSet::first_gap);
        gap.min(self.next_offset)
    }

    fn is_acked(&self, group: u32, offset: u64) -> bool {
        // As the ack log: a group it does not know has nothing pending.
        self.groups.get(&group).is_none_or(|s| s.contains(offset))
    }

    fn position(&self, offset: u64) -> Option<Position> {
        let i = self.runs.partition_point(|r| r.end() <= offset);
        let run = self.runs.get(i).filter(|r| r.offset <= offset)?;
        let within = u32::try_from(offset - run.offset).ok()?;
        Some(Position::new(run.index, run.slot + within))
    }

    fn offset_at(&self, at: Position) -> Option<u64> {
        let i = self
            .runs
            .partition_point(|r| (r.index, r.slot + r.count) <= (at.index, at.slot));
        let run = self.runs.get(i)?;
        (run.index == at.index && run.slot <= at.slot)
            .then(|| run.offset + u64::from(at.slot - run.slot))
    }

    fn apply(&mut self, at: Position, payload: &Bytes) -> Result<(), AddressMachineError> {
        let (index, slot) = (at.index, at.slot);
        let ops = decode_ops(payload).map_err(|source| AddressMachineError::Ops {
            index,
            slot,
            source,
        })?;
        let messages = ops
            .iter()
            .filter(|op| matches!(op, Op::Message { .. }))
            .count();
        if messages > 0 && ops.len() > 1 {
            return Err(AddressMachineError::MessageNotAlone { index, slot });
        }
        for op in ops {
            match op {
                Op::Message { offset, .. } => self.add_message(offset, at),
                Op::Ack { group, offsets } => {
                    let group = group.unwrap_or(DEFAULT_GROUP);
                    let set = self.groups.entry(group).or_default();
                    for &o in &offsets {
                        set.insert(o, o.saturating_add(1));
                    }
                    for o in offsets {
                        self.counts.remove(&(group, o));
                    }
                }
                Op::GroupFloor { group, floor } => {
                    self.groups.entry(group).or_default().insert(0, floor);
                    self.counts.retain(|&(g, o), _| g != group || o >= floor);
                }
                Op::DropGroup { group } => {
                    // The default group is the address's own: it is never dropped.
                    if group != DEFAULT_GROUP {
                        self.groups.remove(&group);
                        self.counts.retain(|&(g, _), _| g != group);
                    }
                }
                Op::DeliveryCount {
                    group,
                    offset,
                    count,
                } => {
                    if offset < self.next_offset && !self.is_acked(group, offset) {
                        self.counts.insert((group, offset), count);
                    }
                }
                Op::File { .. } => return Err(AddressMachineError::FileOp { index, slot }),
            }
        }
        self.applied_end = index + 1;
        self.compact();
        Ok(())
    }

    fn add_message(&mut self, proposed: u64, at: Position) {
        let offset = self.next_offset;
        if proposed != offset {
            self.renumbered += 1;
        }
        self.next_offset += 1;
        if let Some(last) = self.runs.back_mut() {
            if last.index == at.index && last.slot + last.count == at.slot && last.end() == offset {
                last.count += 1;
                return;
            }
        }
        self.runs.push_back(Run {
            offset,
            index: at.index,
            slot: at.slot,
            count: 1,
        });
    }

    /// Forgets what lies below the oldest live offset (see the module invariants).
    fn compact(&mut self) {
        let live_from = self.live_from();
        while self.runs.front().is_some_and(|r| r.end() <= live_from) {
            self.runs.pop_front();
        }
        if live_from == 0 {
            return;
        }
        for set in self.groups.values_mut() {
            if set.first_gap() < live_from {
                set.insert(0, live_from);
            }
        }
        if !self.counts.is_empty() {
            self.counts.retain(|&(_, o), _| o >= live_from);
        }
    }

    fn lowest_needed(&self) -> u64 {
        let live_from = self.live_from();
        if live_from >= self.next_offset {
            return self.applied_end;
        }
        // The run holding it was kept by `compact`; if not, keep everything.
        self.position(live_from).map_or(0, |p| p.index)
    }

    fn encode(&self) -> Bytes {
        let ranges: usize = self.groups.values().map(RangeSet::len).sum();
        let mut b = BytesMut::with_capacity(
            1 + 24
                + 4
                + RUN_BYTES * self.runs.len()
                + 4
                + 8 * self.groups.len()
                + RANGE_BYTES * ranges
                + 4
                + COUNT_BYTES * self.counts.len(),
        );
        b.put_u8(ADDRESS_SNAPSHOT_VERSION);
        b.put_u64_le(self.next_offset);
        b.put_u64_le(self.applied_end);
        b.put_u64_le(self.renumbered);
        b.put_u32_le(self.runs.len() as u32);
        for r in &self.runs {
            b.put_u64_le(r.offset);
            b.put_u64_le(r.index);
            b.put_u32_le(r.slot);
            b.put_u32_le(r.count);
        }
        b.put_u32_le(self.groups.len() as u32);
        for (g, set) in &self.groups {
            b.put_u32_le(*g);
            b.put_u32_le(set.len() as u32);
            for (s, e) in &set.ranges {
                b.put_u64_le(*s);
                b.put_u64_le(*e);
            }
        }
        b.put_u32_le(self.counts.len() as u32);
        for ((g, o), c) in &self.counts {
            b.put_u32_le(*g);
            b.put_u64_le(*o);
            b.put_u32_le(*c);
        }
        b.freeze()
    }

    fn decode(mut d: Bytes) -> Result<AddressIndex, AddressMachineError> {
        let version = get(&mut d, 1)?.get_u8();
        if version != ADDRESS_SNAPSHOT_VERSION {
            return Err(AddressMachineError::UnsupportedVersion { found: version });
        }
        let mut head = get(&mut d, 24)?;
        let mut index = AddressIndex {
            next_offset: head.get_u64_le(),
            applied_end: head.get_u64_le(),
            renumbered: head.get_u64_le(),
            runs: VecDeque::new(),
            groups: BTreeMap::new(),
            counts: BTreeMap::new(),
        };
        let n = count(&mut d, "runs", MAX_SNAPSHOT_RUNS, RUN_BYTES)?;
        for _ in 0..n {
            let mut r = get(&mut d, RUN_BYTES)?;
            let run = Run {
                offset: r.get_u64_le(),
                index: r.get_u64_le(),
                slot: r.get_u32_le(),
                count: r.get_u32_le(),
            };
            let ordered = index.runs.back().is_none_or(|l| {
                l.end() <= run.offset && (l.index, l.slot + l.count) <= (run.index, run.slot)
            });
            if run.count == 0 || !ordered || run.end() > index.next_offset {
                return Err(AddressMachineError::Malformed("runs out of order"));
            }
            index.runs.push_back(run);
        }
        let n = count(&mut d, "groups", MAX_SNAPSHOT_GROUPS, 8)?;
        for _ in 0..n {
            let mut h = get(&mut d, 8)?;
            let group = h.get_u32_le();
            let ranges = h.get_u32_le() as usize;
            check(ranges, "ranges", MAX_SNAPSHOT_RANGES, RANGE_BYTES, &d)?;
            let mut set = RangeSet::default();
            let mut prev_end = None;
            for _ in 0..ranges {
                let mut r = get(&mut d, RANGE_BYTES)?;
                let (s, e) = (r.get_u64_le(), r.get_u64_le());
                if s >= e || prev_end.is_some_and(|p| p >= s) {
                    return Err(AddressMachineError::Malformed("ranges out of order"));
                }
                prev_end = Some(e);
                set.ranges.insert(s, e);
            }
            if index
                .groups
                .last_key_value()
                .is_some_and(|(&g, _)| g >= group)
            {
                return Err(AddressMachineError::Malformed("groups out of order"));
            }
            index.groups.insert(group, set);
        }
        index.groups.entry(DEFAULT_GROUP).or_default();
        let n = count(&mut d, "counts", MAX_SNAPSHOT_COUNTS, COUNT_BYTES)?;
        for _ in 0..n {
            let mut c = get(&mut d, COUNT_BYTES)?;
            let key = (c.get_u32_le(), c.get_u64_le());
            if index
                .counts
                .last_key_value()
                .is_some_and(|(&k, _)| k >= key)
            {
                return Err(AddressMachineError::Malformed("counts out of order"));
            }
            index.counts.insert(key, c.get_u32_le());
        }
        if !d.is_empty() {
            return Err(AddressMachineError::Malformed("bytes after the end"));
        }
        Ok(index)
    }
}

/// The next `n` bytes of `d`.
fn get(d: &mut Bytes, n: usize) -> Result<Bytes, AddressMachineError> {
    if d.len() < n {
        return Err(AddressMachineError::Malformed("truncated"));
    }
    Ok(d.split_to(n))
}

/// A `u32` count, checked against `max` and against the bytes left.
fn count(
    d: &mut Bytes,
    what: &'static str,
    max: usize,
    each: usize,
) -> Result<usize, AddressMachineError> {
    let n = get(d, 4)?.get_u32_le() as usize;
    check(n, what, max, each, d)?;
    Ok(n)
}

fn check(
    n: usize,
    what: &'static str,
    max: usize,
    each: usize,
    d: &Bytes,
) -> Result<(), AddressMachineError> {
    if n > max {
        return Err(AddressMachineError::LimitExceeded { what, len: n, max });
    }
    if n.saturating_mul(each) > d.len() {
        return Err(AddressMachineError::Malformed("count beyond the snapshot"));
    }
    Ok(())
}

/// One address's [`GroupMachine`]; clones share the index (the host applies through one,
/// the broker reads through another).
#[derive(Debug, Clone, Default)]
pub struct AddressMachine {
    index: Arc<Mutex<AddressIndex>>,
}

impl AddressMachine {
    pub fn new() -> AddressMachine {
        AddressMachine::default()
    }

    fn lock(&self) -> MutexGuard<'_, AddressIndex> {
        // A poisoned lock only means a panic elsewhere; the index is whole between ops.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the whole index (replicas that applied the same entries compare equal).
    pub fn index(&self) -> AddressIndex {
        self.lock().clone()
    }

    /// The offset the next message gets.
    pub fn next_offset(&self) -> u64 {
        self.lock().next_offset
    }

    /// The live (unacknowledged) messages from `from` on, at most `max`, with their
    /// positions: what a queue serves, in order.
    pub fn live(&self, from: u64, max: usize) -> Vec<(u64, Position)> {
        let index = self.lock();
        let default = index.groups.get(&DEFAULT_GROUP);
        let mut out = Vec::new();
        for run in &index.runs {
            for o in run.offset.max(from)..run.end() {
                if out.len() == max {
                    return out;
                }
                if default.is_none_or(|s| !s.contains(o)) {
                    let slot = run.slot + (o - run.offset) as u32;
                    out.push((o, Position::new(run.index, slot)));
                }
            }
        }
        out
    }

    /// Where the record of live message `offset` is (`None` once it is not live or
    /// never was).
    pub fn position(&self, offset: u64) -> Option<Position> {
        let index = self.lock();
        if offset < index.live_from() || index.is_acked(DEFAULT_GROUP, offset) {
            return None;
        }
        index.position(offset)
    }

    /// The offset of the message proposed at `at` (`None` when no message is there, or
    /// it is no longer kept).
    pub fn offset_at(&self, at: Position) -> Option<u64> {
        self.lock().offset_at(at)
    }

    /// Whether `group` acknowledged `offset` (an unknown group has nothing pending).
    pub fn is_acked(&self, group: u32, offset: u64) -> bool {
        self.lock().is_acked(group, offset)
    }

    /// `group`'s acknowledged ranges.
    pub fn acked(&self, group: u32) -> Vec<Range<u64>> {
        self.lock()
            .groups
            .get(&group)
            .map(RangeSet::ranges)
            .unwrap_or_default()
    }

    /// Failed deliveries of `group`'s message at `offset` (0 if none recorded).
    pub fn delivery_count(&self, group: u32, offset: u64) -> u32 {
        self.lock()
            .counts
            .get(&(group, offset))
            .copied()
            .unwrap_or(0)
    }

    /// Message ops the log renumbered (see the module docs).
    pub fn renumbered(&self) -> u64 {
        self.lock().renumbered
    }

    /// Runs and ranges the index holds: what its snapshot costs.
    pub fn size(&self) -> (usize, usize) {
        let index = self.lock();
        (
            index.runs.len(),
            index.groups.values().map(RangeSet::len).sum(),
        )
    }
}

/// The record of a payload that is one message op (a slice of it: zero-copy when the
/// payload is a slice of the log).
pub fn message_record(payload: &Bytes) -> Option<Bytes> {
    match decode_ops(payload).ok()?.as_slice() {
        [Op::Message { record, .. }] => Some(record.clone()),
        _ => None,
    }
}

impl GroupMachine for AddressMachine {
    fn apply(&mut self, at: Position, payload: Bytes) -> Result<(), MachineError> {
        self.lock().apply(at, &payload).map_err(MachineError::new)
    }

    fn snapshot(&self) -> Result<Bytes, MachineError> {
        Ok(self.lock().encode())
    }

    fn restore(&mut self, last_index: u64, state: Bytes) -> Result<(), MachineError> {
        let mut index = AddressIndex::decode(state).map_err(MachineError::new)?;
        index.applied_end = last_index.saturating_add(1);
        *self.lock() = index;
        Ok(())
    }

    fn lowest_needed(&self) -> u64 {
        self.lock().lowest_needed()
    }
}

#[cfg(test)]
mod tests;
