//! Goal: logs written by released format versions keep opening, with the exact records
//! they hold — the on-disk format is a contract (see `storage/FORMAT.md`).
//!
//! Method: each directory under `tests/fixtures/` is a small log written by a released
//! build. It is copied to a temporary directory (recovery may rewrite a torn tail) and
//! opened; records are compared with the payloads the generator derived from the offset.
//!
//! Regenerate only when adding a *new* format version, never to make a test pass:
//! `cargo test -p entrepot-storage --test format_fixtures -- --ignored generate_fixtures`
//! writes `fixtures/v<SEGMENT_VERSION>-*` (refusing to overwrite existing directories).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use entrepot_storage::{
    Log, LogConfig, SyncPolicy, MIN_SEGMENT_BYTES, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
    SEGMENT_VERSION,
};

const BASIC_RECORDS: u64 = 60;
const TORN_RECORDS: u64 = 30;

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: MIN_SEGMENT_BYTES,
        record_bytes_max: 16 * 1024,
        sync: SyncPolicy::Always,
        ..LogConfig::default()
    }
}

/// Payload of record `offset` in every fixture: 1500 bytes of a known pattern, except a
/// few short and empty ones so the edge cases of the frame are pinned too.
fn payload(offset: u64) -> Vec<u8> {
    let len = match offset % 10 {
        3 => 0,
        7 => 5,
        _ => 1500,
    };
    (0..len)
        .map(|j| (offset as usize * 13 + j * 3 + 7) as u8)
        .collect()
}

/// User flags of record `offset` (low 8 bits of the frame's flags field).
fn flags(offset: u64) -> u16 {
    (offset % 4) as u16
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn copy_of(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    dir
}

fn assert_records(log: &Log, count: u64) {
    let mut last_ts = 0;
    let mut seen = 0;
    for record in log.reader(0) {
        let record = record.unwrap();
        assert_eq!(record.offset, seen);
        assert_eq!(record.payload, payload(seen), "payload of {seen}");
        assert_eq!(record.flags, flags(seen), "flags of {seen}");
        assert!(record.timestamp_ms >= last_ts && record.timestamp_ms > 1_600_000_000_000);
        last_ts = record.timestamp_ms;
        seen += 1;
    }
    assert_eq!(seen, count);
    assert_eq!(log.read(count / 2).unwrap().payload, payload(count / 2));
}

#[test]
fn v1_basic_opens_with_its_exact_records() {
    basic_opens_with_its_exact_records("v1-basic");
}

#[test]
fn v2_basic_opens_with_its_exact_records() {
    basic_opens_with_its_exact_records("v2-basic");
}

#[test]
fn v1_torn_tail_opens_without_the_torn_record() {
    torn_tail_opens_without_the_torn_record("v1-torn-tail");
}

#[test]
fn v2_torn_tail_opens_without_the_torn_record() {
    torn_tail_opens_without_the_torn_record("v2-torn-tail");
}

fn basic_opens_with_its_exact_records(name: &str) {
    let dir = copy_of(name);
    let log = Log::open(dir.path(), config()).unwrap();
    let spans = log.segments();
    assert_eq!(spans.len(), 2);
    assert!(spans[0].sealed && !spans[1].sealed);
    assert_eq!(log.stats().recovered_torn_bytes.load(Ordering::Relaxed), 0);
    assert_records(&log, BASIC_RECORDS);
    drop(log);
    let verified = Log::open(
        dir.path(),
        LogConfig {
            verify_sealed_on_open: true,
            ..config()
        },
    )
    .unwrap();
    assert_records(&verified, BASIC_RECORDS);
    assert_eq!(verified.append(b"next").unwrap().first, BASIC_RECORDS);
}

fn torn_tail_opens_without_the_torn_record(name: &str) {
    let dir = copy_of(name);
    let log = Log::open(dir.path(), config()).unwrap();
    assert_eq!(log.next_offset(), TORN_RECORDS - 1);
    assert!(log.stats().recovered_torn_bytes.load(Ordering::Relaxed) > 0);
    assert_records(&log, TORN_RECORDS - 1);
    assert_eq!(log.append(b"next").unwrap().first, TORN_RECORDS - 1);
}

fn write_fixture(name: &str, count: u64) -> PathBuf {
    let dir = fixture(name);
    assert!(
        !dir.exists(),
        "{} exists; fixtures of a released format are never rewritten",
        dir.display()
    );
    let log = Log::open(&dir, config()).unwrap();
    for offset in 0..count {
        log.append_parts(flags(offset), &[&payload(offset)])
            .unwrap();
    }
    log.flush().unwrap();
    dir
}

/// Writes the fixtures of the current format version. Ignored: run by hand (see the
/// module docs) when a new format version is released.
#[test]
#[ignore]
fn generate_fixtures() {
    let basic = write_fixture(&format!("v{SEGMENT_VERSION}-basic"), BASIC_RECORDS);
    let log = Log::open(&basic, config()).unwrap();
    assert_eq!(
        log.segments().len(),
        2,
        "the basic fixture should span two segments"
    );
    drop(log);

    let torn = write_fixture(&format!("v{SEGMENT_VERSION}-torn-tail"), TORN_RECORDS);
    // Tear the last record: keep its header and the first part of its payload, zero the
    // rest, as a power cut in the middle of writing back its page would.
    let seg = torn.join("00000000000000000000.seg");
    let mut bytes = fs::read(&seg).unwrap();
    let last_pos = SEGMENT_HEADER_LEN
        + (0..TORN_RECORDS - 1)
            .map(|o| RECORD_HEADER_LEN + payload(o).len())
            .sum::<usize>();
    let last_end = last_pos + RECORD_HEADER_LEN + payload(TORN_RECORDS - 1).len();
    bytes[last_pos + RECORD_HEADER_LEN + 100..last_end].fill(0);
    fs::write(&seg, bytes).unwrap();
}
