//! Sparse per-segment indexes: offset → byte position, and timestamp → offset.
//!
//! An entry is added every `index_interval_bytes` of records, so a lookup lands at most
//! that many bytes before the wanted record and a short forward walk finds it. The active
//! segment keeps its index in memory; sealing writes both tables to `<base>.idx` and
//! `<base>.tix`. The files are a cache: if one is missing, damaged or of an unknown
//! version it is ignored and rebuilt by scanning the segment, never trusted blindly.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Magic at the start of an offset index file.
pub const OFFSET_INDEX_MAGIC: [u8; 8] = *b"ENTRPIDX";
/// Magic at the start of a time index file.
pub const TIME_INDEX_MAGIC: [u8; 8] = *b"ENTRPTIX";
/// Version of both index file formats.
pub const INDEX_VERSION: u16 = 1;
/// Bytes of an index file header.
pub const INDEX_HEADER_LEN: usize = 32;
/// Most entries an index file may claim; bounds the allocation before reading it.
pub const MAX_INDEX_ENTRIES: u32 = 16 * 1024 * 1024;

// Format (index file header): { magic: [u8; 8] | version: u16 LE | reserved: u16 | count: u32 LE | base_offset: u64 LE | crc: u32 LE (of the entries) | reserved: u32 }
// Format (offset entry, 8 bytes): { relative_offset: u32 LE | position: u32 LE }
// Format (time entry, 12 bytes): { timestamp_ms: i64 LE | relative_offset: u32 LE }

/// The sparse indexes of one segment.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct SegmentIndex {
    /// `(relative offset, byte position)`, strictly increasing in both.
    pub offsets: Vec<(u32, u32)>,
    /// `(timestamp, relative offset)`, strictly increasing in both.
    pub times: Vec<(i64, u32)>,
    /// Position of the record that received the last offset entry.
    last_indexed_pos: Option<u32>,
}

impl SegmentIndex {
    /// Notes a record at `pos` during append or scan; adds entries every `interval` bytes.
    pub fn observe(&mut self, rel: u32, pos: u32, timestamp_ms: i64, interval: u32) {
        let due = match self.last_indexed_pos {
            None => true,
            Some(last) => pos >= last.saturating_add(interval),
        };
        if !due {
            return;
        }
        self.offsets.push((rel, pos));
        self.last_indexed_pos = Some(pos);
        if self.times.last().is_none_or(|&(ts, _)| timestamp_ms > ts) {
            self.times.push((timestamp_ms, rel));
        }
    }

    /// The indexed `(relative offset, position)` at or before `rel`.
    pub fn floor_offset(&self, rel: u32) -> Option<(u32, u32)> {
        let i = self.offsets.partition_point(|&(r, _)| r <= rel);
        i.checked_sub(1).map(|i| self.offsets[i])
    }

    /// An indexed relative offset from which a forward walk finds the first record with a
    /// timestamp at or after `ts`.
    pub fn floor_time(&self, ts: i64) -> u32 {
        let i = self.times.partition_point(|&(t, _)| t < ts);
        i.checked_sub(1).map_or(0, |i| self.times[i].1)
    }

    /// Writes both tables next to the segment (write to a temporary file, then rename).
    pub fn persist(&self, segment_path: &Path, base: u64) -> std::io::Result<()> {
        let mut body = Vec::with_capacity(self.offsets.len() * 8);
        for &(rel, pos) in &self.offsets {
            body.extend_from_slice(&rel.to_le_bytes());
            body.extend_from_slice(&pos.to_le_bytes());
        }
        write_table(
            &offset_index_path(segment_path),
            OFFSET_INDEX_MAGIC,
            base,
            self.offsets.len(),
            &body,
        )?;
        body.clear();
        for &(ts, rel) in &self.times {
            body.extend_from_slice(&ts.to_le_bytes());
            body.extend_from_slice(&rel.to_le_bytes());
        }
        write_table(
            &time_index_path(segment_path),
            TIME_INDEX_MAGIC,
            base,
            self.times.len(),
            &body,
        )
    }

    /// Loads both tables; `None` if either is missing, damaged or not for this segment.
    pub fn load(segment_path: &Path, base: u64, end_pos: u32) -> Option<SegmentIndex> {
        let offsets = read_table(
            &offset_index_path(segment_path),
            OFFSET_INDEX_MAGIC,
            base,
            8,
        )?;
        let times = read_table(&time_index_path(segment_path), TIME_INDEX_MAGIC, base, 12)?;
        let offsets: Vec<(u32, u32)> = offsets
            .chunks_exact(8)
            .map(|c| (le_u32(&c[0..4]), le_u32(&c[4..8])))
            .collect();
        let times: Vec<(i64, u32)> = times
            .chunks_exact(12)
            .map(|c| (le_u64(&c[0..8]) as i64, le_u32(&c[8..12])))
            .collect();
        let increasing = offsets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1)
            && times.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1)
            && offsets.iter().all(|&(_, pos)| pos < end_pos);
        if !increasing {
            return None;
        }
        let last_indexed_pos = offsets.last().map(|&(_, p)| p);
        Some(SegmentIndex {
            offsets,
            times,
            last_indexed_pos,
        })
    }
}

/// `<base>.idx` beside `<base>.seg`.
pub(crate) fn offset_index_path(segment_path: &Path) -> PathBuf {
    segment_path.with_extension("idx")
}

/// `<base>.tix` beside `<base>.seg`.
pub(crate) fn time_index_path(segment_path: &Path) -> PathBuf {
    segment_path.with_extension("tix")
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

fn write_table(
    path: &Path,
    magic: [u8; 8],
    base: u64,
    count: usize,
    body: &[u8],
) -> std::io::Result<()> {
    let mut header = [0u8; INDEX_HEADER_LEN];
    header[0..8].copy_from_slice(&magic);
    header[8..10].copy_from_slice(&INDEX_VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&(count as u32).to_le_bytes());
    header[16..24].copy_from_slice(&base.to_le_bytes());
    header[24..28].copy_from_slice(&crc32fast::hash(body).to_le_bytes());
    let tmp = path.with_extension("tmp");
    let written = fs::File::create(&tmp)
        .and_then(|mut file| file.write_all(&header).and_then(|()| file.write_all(body)))
        .and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

fn read_table(path: &Path, magic: [u8; 8], base: u64, entry_len: usize) -> Option<Vec<u8>> {
    let data = fs::read(path).ok()?;
    if data.len() < INDEX_HEADER_LEN || data[0..8] != magic {
        return None;
    }
    let version = u16::from_le_bytes([data[8], data[9]]);
    let count = le_u32(&data[12..16]);
    if version != INDEX_VERSION || count > MAX_INDEX_ENTRIES || le_u64(&data[16..24]) != base {
        return None;
    }
    let body = &data[INDEX_HEADER_LEN..];
    if body.len() != count as usize * entry_len || crc32fast::hash(body) != le_u32(&data[24..28]) {
        return None;
    }
    Some(body.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SegmentIndex {
        let mut idx = SegmentIndex::default();
        for i in 0..100u32 {
            idx.observe(i, 64 + i * 1000, 1000 + i64::from(i / 3), 4096);
        }
        idx
    }

    #[test]
    fn sparse_entries_and_floor_lookups() {
        let idx = sample();
        assert!(idx.offsets.len() > 10 && idx.offsets.len() < 40);
        assert_eq!(idx.floor_offset(0), Some((0, 64)));
        let (rel, pos) = idx.floor_offset(57).unwrap();
        assert!(rel <= 57 && 57 - rel <= 5);
        assert_eq!(pos, 64 + rel * 1000);
        assert!(idx.floor_time(1010) <= 30);
        assert_eq!(idx.floor_time(0), 0);
    }

    #[test]
    fn persist_and_load_round_trip_and_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let seg = dir.path().join("00000000000000000007.seg");
        let idx = sample();
        idx.persist(&seg, 7).unwrap();
        assert_eq!(SegmentIndex::load(&seg, 7, 200_000), Some(idx.clone()));
        assert_eq!(SegmentIndex::load(&seg, 8, 200_000), None, "other base");
        let mut bytes = fs::read(offset_index_path(&seg)).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(offset_index_path(&seg), &bytes).unwrap();
        assert_eq!(SegmentIndex::load(&seg, 7, 200_000), None, "flipped byte");
        fs::remove_file(offset_index_path(&seg)).unwrap();
        assert_eq!(SegmentIndex::load(&seg, 7, 200_000), None, "missing file");
    }
}
