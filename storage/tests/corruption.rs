//! Goal: damaged bytes on disk give a typed error naming the file and position, or are cut
//! and counted — never a panic, never a wrong record.
//!
//! Method: write a real log, close it, flip or zero bytes in its files with plain file
//! I/O, reopen with each relevant setting and check the outcome: sealed-segment damage
//! (verify at open, verify on read, read-only up to the damage), tail damage (cut, counted,
//! appendable), a zeroed hole in the tail (stale frames behind it must not come back),
//! missing or damaged index files (rebuilt), an unknown version and a foreign file.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use entrepot_storage::{
    CorruptionPolicy, Log, LogConfig, StorageError, SyncPolicy, RECORD_HEADER_LEN,
    SEGMENT_HEADER_LEN,
};

const PAYLOAD_LEN: usize = 1000;
const FRAME_LEN: u64 = (RECORD_HEADER_LEN + PAYLOAD_LEN) as u64;

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

/// Writes `count` records of [`PAYLOAD_LEN`] bytes, syncs and closes the log.
fn write_log(dir: &Path, count: u64) {
    let log = Log::open(dir, config()).unwrap();
    for i in 0..count {
        log.append(&payload(i)).unwrap();
    }
    log.flush().unwrap();
}

fn files_with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    files.sort();
    files
}

/// Byte position of record `rel` (relative to its segment) when every record has
/// [`PAYLOAD_LEN`] bytes.
fn frame_pos(rel: u64) -> u64 {
    SEGMENT_HEADER_LEN as u64 + rel * FRAME_LEN
}

fn patch(path: &Path, pos: u64, f: impl FnOnce(&mut [u8])) {
    let mut bytes = fs::read(path).unwrap();
    f(&mut bytes[pos as usize..]);
    fs::write(path, bytes).unwrap();
}

fn flip(path: &Path, pos: u64) {
    patch(path, pos, |b| b[0] ^= 0x5a);
}

fn read_all(log: &Log) -> Vec<(u64, Vec<u8>)> {
    log.reader(log.first_offset())
        .map(|r| r.map(|r| (r.offset, r.payload.to_vec())))
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn flipped_byte_in_a_sealed_segment_is_reported_with_file_and_position() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 200);
    let segs = files_with_ext(dir.path(), "seg");
    assert!(segs.len() >= 3, "need sealed segments, got {segs:?}");
    let damaged = &segs[0];
    flip(damaged, frame_pos(10) + RECORD_HEADER_LEN as u64 + 5);

    // Verified at open: refuses, naming file, byte and offset.
    let err = Log::open(
        dir.path(),
        LogConfig {
            verify_sealed_on_open: true,
            ..config()
        },
    )
    .err()
    .unwrap();
    match &err {
        StorageError::Corrupt {
            path,
            position,
            offset,
            ..
        } => {
            assert_eq!(path, damaged);
            assert_eq!(*position, frame_pos(10));
            assert_eq!(*offset, 10);
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    assert!(
        err.to_string().contains(&damaged.display().to_string()),
        "{err}"
    );

    // Trusted seal: opens, and the damaged record fails its CRC when read.
    let log = Log::open(dir.path(), config()).unwrap();
    assert_eq!(log.read(9).unwrap().payload, payload(9));
    let err = log.read(10).unwrap_err();
    assert!(
        matches!(&err, StorageError::Corrupt { path, offset: 10, .. } if path == damaged),
        "{err}"
    );
    let err = log
        .reader(0)
        .find_map(|r| r.err())
        .expect("the reader must hit the damage");
    assert!(
        matches!(err, StorageError::Corrupt { offset: 10, .. }),
        "{err}"
    );
    assert_eq!(
        log.read(150).unwrap().payload,
        payload(150),
        "other segments unaffected"
    );
    drop(log);

    // Read-only up to the damage: the prefix reads, writes are refused, nothing is deleted.
    let ro = LogConfig {
        verify_sealed_on_open: true,
        corruption: CorruptionPolicy::ReadOnlyUpToCorruption,
        ..config()
    };
    let log = Log::open(dir.path(), ro).unwrap();
    assert!(log.is_read_only());
    let prefix = read_all(&log);
    assert_eq!(prefix.len(), 10);
    for (offset, bytes) in prefix {
        assert_eq!(bytes, payload(offset));
    }
    assert!(log.read(10).is_err());
    assert!(matches!(log.append(b"x"), Err(StorageError::ReadOnly)));
    assert!(matches!(log.truncate_from(5), Err(StorageError::ReadOnly)));
    drop(log);
    assert_eq!(
        files_with_ext(dir.path(), "seg"),
        segs,
        "read-only open deletes nothing"
    );
}

#[test]
fn flipped_byte_in_the_tail_is_cut_and_the_log_appends_again() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 90);
    let segs = files_with_ext(dir.path(), "seg");
    let tail = segs.last().unwrap();
    let tail_base: u64 = tail.file_stem().unwrap().to_str().unwrap().parse().unwrap();
    assert!(
        tail_base > 0 && tail_base + 10 < 90,
        "tail segment should hold records, base {tail_base}"
    );
    flip(tail, frame_pos(10) + 100);

    let log = Log::open(dir.path(), config()).unwrap();
    assert_eq!(
        log.next_offset(),
        tail_base + 10,
        "cut at the damaged record"
    );
    assert!(
        log.stats().recovered_torn_bytes.load(Ordering::Relaxed)
            >= (90 - tail_base - 10) * FRAME_LEN - 100
    );
    let kept = read_all(&log);
    assert_eq!(kept.len() as u64, tail_base + 10);
    assert!(kept.iter().all(|(o, b)| *b == payload(*o)));
    let appended = log.append(b"after the cut").unwrap();
    assert_eq!(appended.first, tail_base + 10);
    log.flush().unwrap();
    drop(log);

    let log = Log::open(dir.path(), config()).unwrap();
    assert_eq!(
        log.stats().recovered_torn_bytes.load(Ordering::Relaxed),
        0,
        "the cut was zeroed"
    );
    assert_eq!(log.next_offset(), tail_base + 11);
    assert_eq!(
        &log.read(tail_base + 10).unwrap().payload[..],
        b"after the cut"
    );
}

/// A power cut can lose one page of the tail while a later page reached the disk. The
/// frames behind the hole were never durable; they must be erased, or a later append of
/// the same size would make them verify again (right position, right offset, valid CRC).
#[test]
fn stale_frames_behind_a_zeroed_hole_never_come_back() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 40);
    let segs = files_with_ext(dir.path(), "seg");
    assert_eq!(segs.len(), 1);
    patch(&segs[0], frame_pos(10), |b| {
        b[..3 * FRAME_LEN as usize].fill(0)
    });

    let log = Log::open(dir.path(), config()).unwrap();
    assert_eq!(log.next_offset(), 10);
    assert!(
        log.stats().recovered_torn_bytes.load(Ordering::Relaxed) > 0,
        "bytes behind the hole are reported cut"
    );
    for i in 10..13 {
        log.append(&payload(1000 + i)).unwrap();
    }
    log.flush().unwrap();
    drop(log);

    let log = Log::open(dir.path(), config()).unwrap();
    assert_eq!(
        log.next_offset(),
        13,
        "records 13.. of the old tail must not reappear"
    );
    let records = read_all(&log);
    assert_eq!(records.len(), 13);
    assert_eq!(records[12].1, payload(1012));
}

#[test]
fn missing_and_damaged_index_files_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 200);
    let idx = files_with_ext(dir.path(), "idx");
    let tix = files_with_ext(dir.path(), "tix");
    assert!(
        idx.len() >= 3 && tix.len() == idx.len(),
        "sealed segments have index files"
    );
    let originals: Vec<Vec<u8>> = idx
        .iter()
        .chain(&tix)
        .map(|p| fs::read(p).unwrap())
        .collect();

    fs::remove_file(&idx[0]).unwrap();
    let len = fs::metadata(&tix[1]).unwrap().len();
    flip(&tix[1], len - 1);
    fs::write(&idx[2], b"ENTRPIDX but not really an index").unwrap();
    patch(&idx[1], 8, |b| b[0] = 99); // unknown index version

    let log = Log::open(dir.path(), config()).unwrap();
    let all = read_all(&log);
    assert_eq!(all.len(), 200);
    assert!(all.iter().all(|(o, b)| *b == payload(*o)));
    for o in [0, 37, 63, 64, 99, 130, 199] {
        assert_eq!(
            log.read(o).unwrap().payload,
            payload(o),
            "random read of {o}"
        );
    }
    let rebuilt: Vec<Vec<u8>> = idx
        .iter()
        .chain(&tix)
        .map(|p| fs::read(p).unwrap())
        .collect();
    assert_eq!(rebuilt, originals, "index files are rewritten exactly");
}

#[test]
fn unknown_segment_version_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 10);
    let seg = files_with_ext(dir.path(), "seg").remove(0);
    patch(&seg, 8, |b| b[..2].copy_from_slice(&7u16.to_le_bytes()));
    let err = Log::open(dir.path(), config()).err().unwrap();
    assert!(
        matches!(&err, StorageError::UnsupportedVersion { path, found: 7, supported: 2 } if *path == seg),
        "{err}"
    );
}

#[test]
fn a_foreign_file_named_like_a_segment_is_bad_magic() {
    let garbage: Vec<u8> = (0..70_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 200);
    let middle = files_with_ext(dir.path(), "seg").remove(1);
    fs::write(&middle, &garbage).unwrap();
    let err = Log::open(dir.path(), config()).err().unwrap();
    assert!(
        matches!(&err, StorageError::BadMagic { path, kind: "segment" } if *path == middle),
        "{err}"
    );

    let alone = tempfile::tempdir().unwrap();
    let short = alone.path().join("00000000000000000000.seg");
    fs::write(&short, b"short").unwrap();
    let err = Log::open(alone.path(), config()).err().unwrap();
    assert!(
        matches!(&err, StorageError::BadMagic { path, .. } if *path == short),
        "{err}"
    );
}

/// A crash while a new segment is being created leaves only a temporary file, which the
/// next open removes; the log opens with everything that was there.
#[test]
fn leftover_temporary_segment_from_an_interrupted_create_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 10);
    let tmp = dir.path().join("00000000000000000010.seg.tmp");
    fs::write(&tmp, vec![0u8; 64 * 1024]).unwrap();
    let log = Log::open(dir.path(), config()).unwrap();
    assert_eq!(log.next_offset(), 10);
    assert!(!tmp.exists());
}
