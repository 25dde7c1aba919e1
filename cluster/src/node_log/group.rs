//! One group's view of the node log, in memory: which record offset holds each of its Raft
//! entries, its last entry, purge point and vote, and where the records of the last two
//! are (so they can be written again before their segment goes).
//!
//! The index is a `VecDeque<u64>` of record offsets, one per Raft index from
//! `first_index`: a group's entries are dense in Raft index but interleaved with other
//! groups' records, so runs of consecutive offsets would be one entry long. It costs 8
//! bytes per entry the group still holds (above its purge point) and is trimmed at every
//! purge. A missing index (openraft's conformance suite appends 1 then 3; a real cluster
//! never does) is [`HOLE`]; a gap longer than [`MAX_INDEX_GAP`] is refused.
//!
//! Invariants: `offsets` is increasing (ignoring holes), its first and last slots are
//! never holes, `last` is the log id of its last slot; entries at or below `purged` are
//! never handed out.
//!
//! Does not: touch the disk. The caller (`node_log/mod.rs`) writes the record first, then
//! updates this.

use std::collections::VecDeque;

use openraft::Vote;

use crate::error::{ClusterError, Result};
use crate::types::{LogId, NodeId};

/// A Raft index the group has no entry for.
pub(crate) const HOLE: u64 = u64::MAX;
/// Largest gap of missing Raft indexes one append may leave (openraft leaves none; its
/// conformance suite leaves one). Past it the record is refused as corrupt.
pub const MAX_INDEX_GAP: u64 = 1024;
/// Spare capacity of the index a purge leaves before giving memory back.
const SPARE_SLOTS_MAX: usize = 16;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct GroupState {
    /// Raft index of `offsets[0]`.
    first_index: u64,
    offsets: VecDeque<u64>,
    /// Log id of the last entry held; `None` while none is.
    pub(crate) last: Option<LogId>,
    pub(crate) purged: Option<LogId>,
    pub(crate) vote: Option<Vote<NodeId>>,
    /// Offset of the record that holds `purged` (rewritten before its segment goes).
    pub(crate) purge_at: Option<u64>,
    /// Offset of the record that holds `vote`.
    pub(crate) vote_at: Option<u64>,
}

impl GroupState {
    /// Fails unless `id` may follow the entries held: a later index, after a gap of at
    /// most [`MAX_INDEX_GAP`].
    pub(crate) fn check_push(&self, id: LogId) -> Result<()> {
        let Some(last) = self.last else { return Ok(()) };
        if id.index <= last.index {
            return Err(ClusterError::AppendOutOfOrder {
                last: last.index,
                got: id.index,
            });
        }
        let gap = id.index - last.index - 1;
        if gap > MAX_INDEX_GAP {
            return Err(ClusterError::LimitExceeded {
                what: "gap of raft indexes in one group",
                len: gap,
                max: MAX_INDEX_GAP,
            });
        }
        Ok(())
    }

    /// Records that the entry `id` is at `offset` (the newest record of the log).
    pub(crate) fn push(&mut self, offset: u64, id: LogId) -> Result<()> {
        self.check_push(id)?;
        match self.last {
            None => self.first_index = id.index,
            Some(last) => {
                // At most MAX_INDEX_GAP, checked above.
                let gap = id.index - last.index - 1;
                self.offsets.extend(std::iter::repeat_n(HOLE, gap as usize));
            }
        }
        self.offsets.push_back(offset);
        self.last = Some(id);
        Ok(())
    }

    /// Forgets the entries at index `since` and after. Returns the offset of the entry
    /// that is last now, whose log id the caller reads back and sets with [`Self::set_last`]
    /// (`None`: the group holds no entry).
    pub(crate) fn truncate(&mut self, since: u64) -> Option<u64> {
        let keep = since.saturating_sub(self.first_index);
        if keep < self.offsets.len() as u64 {
            // keep < len, so it fits in usize.
            self.offsets.truncate(keep as usize);
        }
        while self.offsets.back() == Some(&HOLE) {
            self.offsets.pop_back();
        }
        let last = self.offsets.back().copied();
        if last.is_none() {
            self.last = None;
        }
        last
    }

    pub(crate) fn set_last(&mut self, id: LogId) {
        self.last = Some(id);
    }

    /// Whether an entry at `index` or later is held (a truncation has work to do).
    pub(crate) fn holds_from(&self, index: u64) -> bool {
        self.last.is_some_and(|l| l.index >= index)
    }

    /// Moves the purge point to `id` (if later) and forgets the entries at or below it.
    pub(crate) fn purge(&mut self, id: LogId, record_offset: u64) {
        if self.purged > Some(id) {
            return;
        }
        if self.purged == Some(id) {
            self.purge_at = Some(record_offset); // the same point written again further on
            return;
        }
        self.purged = Some(id);
        self.purge_at = Some(record_offset);
        while self.first_index <= id.index || self.offsets.front() == Some(&HOLE) {
            if self.offsets.pop_front().is_none() {
                break;
            }
            self.first_index += 1;
        }
        if self.offsets.is_empty() {
            self.last = None;
        }
        if self.offsets.capacity() > 2 * self.offsets.len() + SPARE_SLOTS_MAX {
            self.offsets.shrink_to_fit();
        }
    }

    pub(crate) fn set_vote(&mut self, vote: Vote<NodeId>, record_offset: u64) {
        self.vote = Some(vote);
        self.vote_at = Some(record_offset);
    }

    /// `(index, offset)` of the entries held with index in `start..end` above the purge
    /// point, in order.
    pub(crate) fn locate(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let start = start
            .max(self.first_index)
            .max(self.purged.map_or(0, |p| p.index.saturating_add(1)));
        let held_end = self.first_index + self.offsets.len() as u64;
        let end = end.min(held_end);
        (start..end)
            .filter_map(|index| {
                let slot = usize::try_from(index - self.first_index).ok()?;
                let offset = *self.offsets.get(slot)?;
                (offset != HOLE).then_some((index, offset))
            })
            .collect()
    }

    /// Offset of the oldest entry record this group still needs.
    pub(crate) fn first_live_offset(&self) -> Option<u64> {
        self.offsets.iter().copied().find(|&o| o != HOLE)
    }

    /// Bytes this group's state takes on the heap (the index).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.offsets.capacity() * std::mem::size_of::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn id(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    #[test]
    fn interleaved_offsets_truncate_and_purge() {
        let mut g = GroupState::default();
        for (i, offset) in [(5, 10), (6, 13), (7, 20), (8, 21)] {
            g.push(offset, id(i)).unwrap();
        }
        assert_eq!(g.locate(0, u64::MAX), [(5, 10), (6, 13), (7, 20), (8, 21)]);
        assert!(matches!(
            g.push(30, id(8)),
            Err(ClusterError::AppendOutOfOrder { last: 8, got: 8 })
        ));
        assert_eq!(g.truncate(7), Some(13));
        g.set_last(id(6));
        g.push(40, id(7)).unwrap();
        assert_eq!(g.locate(6, 8), [(6, 13), (7, 40)]);
        g.purge(id(6), 41);
        assert_eq!(g.locate(0, u64::MAX), [(7, 40)]);
        assert_eq!(g.first_live_offset(), Some(40));
        g.purge(id(100), 42);
        assert_eq!(g.last, None);
        assert_eq!(g.first_live_offset(), None);
        assert!(g.locate(0, u64::MAX).is_empty());
    }

    #[test]
    fn gaps_are_holes_and_a_long_gap_is_refused() {
        let mut g = GroupState::default();
        g.push(0, id(1)).unwrap();
        g.push(1, id(3)).unwrap();
        assert_eq!(g.locate(0, 10), [(1, 0), (3, 1)]);
        assert!(matches!(
            g.push(2, id(3 + MAX_INDEX_GAP + 2)),
            Err(ClusterError::LimitExceeded { .. })
        ));
        assert_eq!(g.truncate(3), Some(0), "the hole before 3 goes too");
        g.purge(id(1), 5);
        assert_eq!(g.first_live_offset(), None);
    }

    #[test]
    fn entries_appended_at_or_below_the_purge_point_are_never_returned() {
        let mut g = GroupState::default();
        g.push(0, id(1)).unwrap();
        g.purge(id(10), 1);
        // openraft's suite does this: the group is empty, so any index may come next.
        g.push(2, id(9)).unwrap();
        g.push(3, id(10)).unwrap();
        g.push(4, id(11)).unwrap();
        assert_eq!(g.locate(0, u64::MAX), [(11, 4)]);
    }

    #[test]
    fn a_purge_gives_back_the_index_memory() {
        let mut g = GroupState::default();
        for i in 0..10_000 {
            g.push(i, id(i)).unwrap();
        }
        assert!(g.heap_bytes() >= 80_000);
        g.purge(id(9_990), 10_000);
        assert!(
            g.heap_bytes() <= (9 + 2 * 9 + SPARE_SLOTS_MAX) * 8,
            "{}",
            g.heap_bytes()
        );
    }
}
