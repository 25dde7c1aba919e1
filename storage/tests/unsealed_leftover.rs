//! Goal: a segment a crash left unsealed never makes a later restart cut acknowledged-free
//! records — the message loss the broker's fault campaign found (1,029 confirmed messages
//! gone after a full disk and two SIGKILLs).
//!
//! The sequence: a process is killed after a roll, before its sync thread sealed the old
//! segment (S1). The next process recovers S1 intact but unsealed; nothing in that process
//! ever sealed it, so it stayed unsealed while later segments were sealed and, once every
//! record in them was acknowledged, deleted (S2). At the next restart recovery saw an
//! unsealed segment followed by a gap — the signature of a torn tail — and deleted every
//! later segment, the active one with its unacknowledged records included.
//!
//! Method: write a real log with small segments and close it; clear S1's seal slot with
//! plain file I/O, which is byte for byte what a kill before the seal leaves (the seal is
//! the only write a seal makes to the segment). Then run the broker's own steps: open,
//! delete S2 as the reclaim does, append more, close, open again — every record outside
//! S2 must still be there.

use std::fs;
use std::path::{Path, PathBuf};

use entrepot_storage::{Log, LogConfig, SyncPolicy};

const PAYLOAD_LEN: usize = 1000;
/// Bytes 40..64 of a segment's header hold its seal (`segment.rs`).
const SEAL_SLOT: std::ops::Range<usize> = 40..64;

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 64 * 1024,
        record_bytes_max: 16 * 1024,
        sync: SyncPolicy::Always,
        ..LogConfig::default()
    }
}

fn payload(i: u64) -> Vec<u8> {
    (0..PAYLOAD_LEN)
        .map(|j| (i as usize * 31 + j * 7 + 1) as u8)
        .collect()
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort_by_key(|p| {
        p.file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u64>().ok())
    });
    files
}

/// What a SIGKILL between a roll and the sync thread's seal leaves: the seal slot blank.
fn unseal(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    bytes[SEAL_SLOT].fill(0);
    fs::write(path, bytes).unwrap();
}

fn offsets(log: &Log) -> Vec<u64> {
    log.reader(log.first_offset())
        .map(|r| {
            let r = r.unwrap();
            assert_eq!(
                &r.payload[..],
                &payload(r.offset)[..],
                "record {}",
                r.offset
            );
            r.offset
        })
        .collect()
}

#[test]
fn a_segment_left_unsealed_by_a_crash_does_not_cut_later_segments_after_a_reclaim() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config()).unwrap();
    for i in 0..200 {
        log.append(&payload(i)).unwrap();
    }
    log.flush().unwrap();
    drop(log);
    let files = segment_files(dir.path());
    assert!(
        files.len() >= 4,
        "need S1, S2, S3 and an active segment: {files:?}"
    );
    unseal(&files[0]);

    // The restarted process: S2 is all acknowledged and reclaimed, more is appended.
    let log = Log::open(dir.path(), config()).unwrap();
    let spans = log.segments();
    let s2 = spans[1];
    assert!(s2.sealed, "S2 was sealed before the crash");
    assert!(
        log.delete_segment(s2.base).unwrap(),
        "S2 is deletable once S1 is sealed again"
    );
    for i in 200..260 {
        assert_eq!(log.append(&payload(i)).unwrap().first, i);
    }
    log.flush().unwrap();
    drop(log);

    // The next restart keeps everything but S2.
    let log = Log::open(dir.path(), config()).unwrap();
    let expected: Vec<u64> = (0..260)
        .filter(|o| !(s2.base..s2.next).contains(o))
        .collect();
    assert_eq!(offsets(&log), expected, "only S2's records are gone");
    assert_eq!(log.next_offset(), 260);
    assert!(
        log.segments().iter().rev().skip(1).all(|s| s.sealed),
        "every segment but the active one is sealed: {:?}",
        log.segments()
    );
}
