//! Which record offset of the segment log holds which Raft index.
//!
//! Records are dense (offsets 0, 1, 2, …) and so are the Raft indexes openraft appends,
//! so in practice the map is one run: `index = offset + bias`. It is kept as runs of
//! consecutive indexes because openraft's conformance suite appends with gaps (index 1,
//! then 3), which a real cluster never does; a gap costs one more run, and a scan of the
//! log at open to rebuild the runs (a single-run log is rebuilt from its two ends).
//!
//! Invariant: runs are sorted and increasing in both offset and index; a run ends where
//! the next begins, the last at `next_offset`.

use std::collections::BTreeMap;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct IndexMap {
    /// First offset of each run → the Raft index stored at that offset.
    runs: BTreeMap<u64, u64>,
    /// Offset after the last mapped record.
    next_offset: u64,
}

impl IndexMap {
    /// A map of one run: `len` records from `first_offset`, the first holding `first_index`.
    pub(crate) fn single_run(first_offset: u64, first_index: u64, len: u64) -> IndexMap {
        let mut map = IndexMap::default();
        if len > 0 {
            map.runs.insert(first_offset, first_index);
            map.next_offset = first_offset + len;
        }
        map
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Records that `offset` (the next one) holds `index`.
    pub(crate) fn push(&mut self, offset: u64, index: u64) {
        debug_assert!(self.runs.is_empty() || offset == self.next_offset);
        if self.runs.is_empty() || self.index_after_last() != index {
            self.runs.insert(offset, index);
        }
        self.next_offset = offset + 1;
    }

    fn index_after_last(&self) -> u64 {
        self.runs
            .last_key_value()
            .map_or(0, |(fo, fi)| fi + (self.next_offset - fo))
    }

    /// The Raft index held at `offset`, if mapped.
    pub(crate) fn index_at(&self, offset: u64) -> Option<u64> {
        if offset >= self.next_offset {
            return None;
        }
        let (fo, fi) = self.runs.range(..=offset).next_back()?;
        Some(fi + (offset - fo))
    }

    /// The offset of the first record whose index is `index` or more.
    pub(crate) fn offset_of(&self, index: u64) -> Option<u64> {
        let mut runs = self.runs.iter().peekable();
        while let Some((&fo, &fi)) = runs.next() {
            let end = runs.peek().map_or(self.next_offset, |(&next, _)| next);
            if index < fi + (end - fo) {
                return Some(fo + index.saturating_sub(fi));
            }
        }
        None
    }

    /// Forgets every record at or after `offset`.
    pub(crate) fn truncate(&mut self, offset: u64) {
        let _dropped = self.runs.split_off(&offset);
        self.next_offset = if self.runs.is_empty() {
            0
        } else {
            offset.min(self.next_offset)
        };
    }

    /// Forgets runs that end at or before `first_offset` (their segments were deleted).
    pub(crate) fn purge_before(&mut self, first_offset: u64) {
        while let Some(second) = self.runs.keys().nth(1).copied() {
            if second > first_offset {
                break;
            }
            self.runs.pop_first();
        }
        if first_offset >= self.next_offset {
            self.clear();
        }
    }

    pub(crate) fn clear(&mut self) {
        self.runs.clear();
        self.next_offset = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_run_is_an_affine_map() {
        let map = IndexMap::single_run(10, 100, 5);
        assert_eq!(map.index_at(10), Some(100));
        assert_eq!(map.index_at(14), Some(104));
        assert_eq!(map.index_at(15), None);
        assert_eq!(map.offset_of(0), Some(10));
        assert_eq!(map.offset_of(103), Some(13));
        assert_eq!(map.offset_of(105), None);
    }

    #[test]
    fn gaps_start_runs_and_lookups_skip_them() {
        let mut map = IndexMap::default();
        map.push(0, 1);
        map.push(1, 3); // gap: index 2 missing
        map.push(2, 4);
        assert_eq!(map.runs.len(), 2);
        assert_eq!(map.index_at(1), Some(3));
        assert_eq!(
            map.offset_of(2),
            Some(1),
            "first index >= 2 is 3 at offset 1"
        );
        map.truncate(1);
        assert_eq!(map.offset_of(3), None);
        assert_eq!(map.index_at(0), Some(1));
        map.push(1, 2);
        assert_eq!(map.runs.len(), 1, "contiguous again");
        map.purge_before(1);
        assert_eq!(map.index_at(1), Some(2));
        map.purge_before(2);
        assert!(map.is_empty());
    }
}
