//! Opening a log after a clean stop or a crash.
//!
//! Sealed segments were completely synced before their seal was written, so their seal
//! and index files are trusted (and their CRCs checked on every read, or at open with
//! `verify_sealed_on_open`). The unsealed tail is scanned record by record: the first frame
//! that does not verify, or a gap before the next segment, marks where the durable prefix
//! ends. Everything after it was never reported durable, so it is cut: the rest of that
//! segment is zeroed and later segments are deleted. The cut is logged and counted.
//!
//! A *recycled* segment (its file held an earlier segment, `prepare.rs`) ends differently:
//! past its last record lie the earlier segment's frames, which fail the salted CRC, so the
//! first frame that does not verify is its end, whatever follows. Zeroing that rest (up to
//! a whole segment of writes) at every open would cost more than recycling saves, and
//! appending after it again would risk what the zeroing prevents (a never-durable frame of
//! this segment behind a lost page lining up again). So an unsealed recycled segment is
//! sealed at its recovered end instead, and the first append rolls to a new segment, as
//! RocksDB starts a new WAL after recovery. One that precedes another segment, with no gap
//! before it, was complete (a crash between a roll and its seal): it is sealed as any.
//!
//! A fault inside a sealed segment is real corruption, not a torn write: opening fails with
//! [`StorageError::Corrupt`] naming the file and byte, unless the caller asked to open
//! read-only up to the damage.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{CorruptionPolicy, LogConfig};
use crate::error::{Result, StorageError};
use crate::index::SegmentIndex;
use crate::segment::{Segment, SEGMENT_HEADER_LEN};

pub(crate) struct Recovered {
    pub segments: BTreeMap<u64, Arc<Segment>>,
    pub torn_bytes: u64,
    pub read_only: bool,
}

/// Segment files in `dir`, sorted by base offset. Leftover temporary files are removed.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let entries =
        fs::read_dir(dir).map_err(|e| StorageError::io("listing log directory", dir, e))?;
    for entry in entries {
        let path = entry
            .map_err(|e| StorageError::io("listing log directory", dir, e))?
            .path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.ends_with(".tmp") {
            let _ = fs::remove_file(&path);
            continue;
        }
        let Some(stem) = name.strip_suffix(".seg") else {
            continue;
        };
        if let Ok(base) = stem.parse::<u64>() {
            found.push((base, path));
        }
    }
    found.sort();
    Ok(found)
}

pub(crate) fn recover(dir: &Path, config: &LogConfig) -> Result<Recovered> {
    let files = list_segments(dir)?;
    let mut out = Recovered {
        segments: BTreeMap::new(),
        torn_bytes: 0,
        read_only: false,
    };
    let mut iter = files.into_iter().peekable();
    while let Some((base, path)) = iter.next() {
        let (seg, seal) = Segment::open(&path, config.record_bytes_max)?;
        if seg.base() != base {
            return Err(StorageError::Corrupt {
                path,
                position: 16,
                offset: base,
                reason: "header base offset differs from file name",
            });
        }
        let prev_next = out.segments.values().next_back().map(|s| s.next_offset());
        if prev_next.is_some_and(|n| base < n) {
            return Err(StorageError::Corrupt {
                path,
                position: 16,
                offset: base,
                reason: "segment overlaps its predecessor",
            });
        }
        let next_base = iter.peek().map(|(b, _)| *b);
        let stop = match seal {
            Some((next, end)) => open_sealed(&seg, next, end, config, &mut out)?,
            None => open_unsealed(&seg, next_base, config, &mut out)?,
        };
        out.segments.insert(base, Arc::new(seg));
        if stop {
            for (_, later) in iter.by_ref() {
                if !out.read_only {
                    remove_segment_files(&later);
                }
            }
        }
    }
    Ok(out)
}

/// Returns true when recovery must stop after this segment (read-only after corruption).
fn open_sealed(
    seg: &Segment,
    next: u64,
    end: u64,
    config: &LogConfig,
    out: &mut Recovered,
) -> Result<bool> {
    let index = (!config.verify_sealed_on_open)
        .then(|| SegmentIndex::load(seg.path(), seg.base(), end as u32))
        .flatten();
    if let Some(index) = index {
        seg.adopt(end, next, index);
        return Ok(false);
    }
    let scanned = seg.scan(config.index_interval_bytes);
    if scanned.fault.is_none() && scanned.end_pos == end && scanned.next_offset == next {
        seg.adopt(
            end,
            next,
            seg.index.read().map(|i| i.clone()).unwrap_or_default(),
        );
        if let Err(e) = seg.index.read().map(|i| i.persist(seg.path(), seg.base())) {
            tracing::warn!(?e, "could not rewrite index files");
        }
        return Ok(false);
    }
    let reason = scanned
        .fault
        .map_or("sealed segment ends early", |f| f.reason());
    match config.corruption {
        CorruptionPolicy::Fail => Err(StorageError::Corrupt {
            path: seg.path().to_path_buf(),
            position: scanned.end_pos,
            offset: scanned.next_offset,
            reason,
        }),
        CorruptionPolicy::ReadOnlyUpToCorruption => {
            tracing::error!(path = %seg.path().display(), position = scanned.end_pos, offset = scanned.next_offset, reason, "corrupt sealed segment, opening read-only up to it");
            out.read_only = true;
            Ok(true)
        }
    }
}

/// Scans an unsealed segment; cuts a torn tail. Returns true when later segments must go.
fn open_unsealed(
    seg: &Segment,
    next_base: Option<u64>,
    config: &LogConfig,
    out: &mut Recovered,
) -> Result<bool> {
    let scanned = seg.scan(config.index_interval_bytes);
    let contiguous = next_base.is_none_or(|b| b == scanned.next_offset);
    if seg.is_recycled() && contiguous {
        if next_base.is_none() && !out.read_only {
            seg.sync_range(SEGMENT_HEADER_LEN as u64, scanned.end_pos)
                .and_then(|()| seg.seal())
                .map_err(|e| StorageError::io("sealing a recycled segment", seg.path(), e))?;
            tracing::info!(
                path = %seg.path().display(),
                position = scanned.end_pos,
                next_offset = scanned.next_offset,
                "sealed the recovered recycled segment at its last record, appends start a new one"
            );
        }
        return Ok(false);
    }
    // Zeros where a frame should be can be a page that never reached the disk, with later
    // (never durable) frames behind it: those must be erased too, or an append of the same
    // size would line them up at the right position and offset and they would verify again.
    let torn = tail_extent(seg, scanned.end_pos);
    if scanned.fault.is_none() && contiguous && torn == 0 {
        return Ok(false);
    }
    out.torn_bytes += torn;
    let reason = match scanned.fault {
        Some(fault) => fault.reason(),
        None if !contiguous => "gap before next segment",
        None => "non-zero bytes after a zeroed frame",
    };
    tracing::warn!(
        path = %seg.path().display(),
        position = scanned.end_pos,
        next_offset = scanned.next_offset,
        reason,
        torn_bytes = torn,
        "cutting torn tail of the log"
    );
    if !out.read_only {
        seg.zero_from(scanned.end_pos)?;
    }
    Ok(true)
}

/// How many non-zero bytes follow `pos` (for the report of what was cut).
fn tail_extent(seg: &Segment, pos: u64) -> u64 {
    let view = seg.raw_tail(pos);
    view.iter()
        .rposition(|&b| b != 0)
        .map_or(0, |i| i as u64 + 1)
}

fn remove_segment_files(path: &Path) {
    tracing::warn!(path = %path.display(), "deleting segment after the recovered end of the log");
    let _ = fs::remove_file(crate::index::offset_index_path(path));
    let _ = fs::remove_file(crate::index::time_index_path(path));
    let _ = fs::remove_file(path);
}

/// Silences the unused warning for the header constant in builds without tracing.
const _: () = assert!(SEGMENT_HEADER_LEN >= 64);
