//! A compact set of acknowledged offsets: a floor below which everything is acknowledged,
//! and 4096-bit bitmap chunks above it for out-of-order acknowledgements.
//!
//! Memory is one bit per offset between the floor and the highest acknowledged offset
//! (512 bytes per 4096 offsets), whatever the order of acknowledgement — so a slow queue
//! sharing a log with fast ones costs bits, not tree nodes.

use std::collections::BTreeMap;

const CHUNK_BITS: u64 = 4096;
const WORDS: usize = (CHUNK_BITS / 64) as usize;

/// Set of offsets, see the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffsetSet {
    floor: u64,
    chunks: BTreeMap<u64, Box<[u64; WORDS]>>,
}

impl OffsetSet {
    /// Every offset below the floor is in the set.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Number of bitmap chunks held (for memory accounting).
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    pub fn contains(&self, offset: u64) -> bool {
        if offset < self.floor {
            return true;
        }
        self.chunks
            .get(&(offset / CHUNK_BITS))
            .is_some_and(|c| c[word(offset)] & bit(offset) != 0)
    }

    /// Adds `offset`; returns false if it was already in the set.
    pub fn insert(&mut self, offset: u64) -> bool {
        if self.contains(offset) {
            return false;
        }
        let chunk = self
            .chunks
            .entry(offset / CHUNK_BITS)
            .or_insert_with(|| Box::new([0; WORDS]));
        chunk[word(offset)] |= bit(offset);
        if offset == self.floor {
            self.advance_floor();
        }
        true
    }

    /// Adds every offset below `floor`.
    pub fn raise_floor(&mut self, floor: u64) {
        if floor > self.floor {
            self.floor = floor;
            self.advance_floor();
        }
    }

    fn advance_floor(&mut self) {
        loop {
            let idx = self.floor / CHUNK_BITS;
            let Some(chunk) = self.chunks.get(&idx) else {
                break;
            };
            let w = word(self.floor);
            let ones = (chunk[w] >> (self.floor % 64)).trailing_ones() as u64;
            self.floor += ones;
            if self.floor % 64 != 0 || ones == 0 {
                break;
            }
        }
        // Drop whole chunks below the floor without reallocating the map (this runs on
        // every in-order acknowledgement).
        let keep_from = self.floor / CHUNK_BITS;
        while self
            .chunks
            .first_key_value()
            .is_some_and(|(&idx, _)| idx < keep_from)
        {
            self.chunks.pop_first();
        }
    }

    /// How many offsets in `from..to` are in the set.
    pub fn count_range(&self, from: u64, to: u64) -> u64 {
        if to <= from {
            return 0;
        }
        let below = self.floor.clamp(from, to) - from;
        let start = from.max(self.floor);
        if start >= to {
            return below;
        }
        let mut n = below;
        for (&idx, chunk) in self
            .chunks
            .range(start / CHUNK_BITS..=(to - 1) / CHUNK_BITS)
        {
            let lo = start.max(idx * CHUNK_BITS);
            let hi = to.min((idx + 1) * CHUNK_BITS);
            n += (lo..hi).filter(|&o| chunk[word(o)] & bit(o) != 0).count() as u64;
        }
        n
    }

    /// True if every offset in `from..to` is in the set.
    pub fn contains_range(&self, from: u64, to: u64) -> bool {
        self.count_range(from, to) == to.saturating_sub(from)
    }

    /// Serialises the set.
    // Format: { floor: u64 LE | chunk_count: u32 LE | chunk_count × { chunk_index: u64 LE | bits: [u64 LE; 64] } }
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.floor.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for (idx, chunk) in &self.chunks {
            out.extend_from_slice(&idx.to_le_bytes());
            for w in chunk.iter() {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
    }

    /// Parses what [`OffsetSet::encode`] wrote; `None` on malformed input.
    pub fn decode(data: &[u8]) -> Option<OffsetSet> {
        let floor = u64::from_le_bytes(data.get(0..8)?.try_into().ok()?);
        let count = u32::from_le_bytes(data.get(8..12)?.try_into().ok()?) as usize;
        let entry = 8 + 8 * WORDS;
        let body = data.get(12..)?;
        if body.len() != count.checked_mul(entry)? {
            return None;
        }
        let mut chunks = BTreeMap::new();
        for e in body.chunks_exact(entry) {
            let idx = u64::from_le_bytes(e[0..8].try_into().ok()?);
            let mut bits = Box::new([0u64; WORDS]);
            for (i, w) in e[8..].chunks_exact(8).enumerate() {
                bits[i] = u64::from_le_bytes(w.try_into().ok()?);
            }
            chunks.insert(idx, bits);
        }
        Some(OffsetSet { floor, chunks })
    }
}

fn word(offset: u64) -> usize {
    ((offset % CHUNK_BITS) / 64) as usize
}

fn bit(offset: u64) -> u64 {
    1 << (offset % 64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn floor_advances_over_contiguous_acks() {
        let mut s = OffsetSet::default();
        s.insert(1);
        s.insert(2);
        assert_eq!(s.floor(), 0);
        s.insert(0);
        assert_eq!(s.floor(), 3);
        for o in 3..10_000 {
            s.insert(o);
        }
        assert_eq!(s.floor(), 10_000);
        assert_eq!(s.chunk_count(), 1);
    }

    proptest! {
        #[test]
        fn behaves_like_a_btreeset(ops in proptest::collection::vec(0u64..20_000, 0..2_000), a in 0u64..20_000, b in 0u64..20_000) {
            let mut s = OffsetSet::default();
            let mut model = BTreeSet::new();
            for o in ops {
                prop_assert_eq!(s.insert(o), model.insert(o));
            }
            for o in 0..20_000 {
                prop_assert_eq!(s.contains(o), model.contains(&o));
            }
            let (lo, hi) = (a.min(b), a.max(b));
            prop_assert_eq!(s.count_range(lo, hi), model.range(lo..hi).count() as u64);
            let mut buf = Vec::new();
            s.encode(&mut buf);
            prop_assert_eq!(OffsetSet::decode(&buf), Some(s));
        }
    }

    #[test]
    fn ranges_below_the_floor_are_counted_whole() {
        let mut s = OffsetSet::default();
        s.raise_floor(10_000);
        assert_eq!(s.count_range(5, 9), 4);
        assert!(s.contains_range(0, 10_000));
        assert!(!s.contains_range(0, 10_001));
    }

    #[test]
    fn decode_rejects_garbage() {
        assert_eq!(OffsetSet::decode(&[1, 2, 3]), None);
        let mut buf = Vec::new();
        let mut s = OffsetSet::default();
        s.insert(5);
        s.encode(&mut buf);
        buf.pop();
        assert_eq!(OffsetSet::decode(&buf), None);
    }
}
