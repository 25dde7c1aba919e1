//! Recycled segment files (`LogConfig::recycle_segments`, `storage/src/prepare.rs`): a
//! deleted segment's file becomes a later segment's, and what the earlier segment left in
//! it never reads as a record of the new one — not its old frames, not a frame a client
//! forged inside a message body, not after a restart.
//!
//! Frames are built here by hand from `storage/FORMAT.md` (not with the crate's encoder),
//! as an attacker who knows the format would.

use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use entrepot_storage::{Log, LogConfig, SyncPolicy, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};

const SEGMENT_BYTES: u64 = 64 * 1024;
/// Every record's payload: 40 records per segment ((65,536 − 64) / (28 + 1,600)).
const RECORD: usize = 1600;
const PER_SEGMENT: u64 =
    (SEGMENT_BYTES - SEGMENT_HEADER_LEN as u64) / (RECORD_HEADER_LEN + RECORD) as u64;
/// The last record of segment 1 fills it exactly, so the next append rolls, whatever its
/// size, into the segment that starts here.
const RECYCLED_BASE: u64 = 2 * PER_SEGMENT + 1;
/// Where, inside record 0's payload, the forged frame starts.
const FORGED_AT: usize = 100;

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: SEGMENT_BYTES,
        record_bytes_max: 16 * 1024,
        sync: SyncPolicy::Always,
        recycle_segments: 1,
        ..LogConfig::default()
    }
}

fn payload(offset: u64) -> Vec<u8> {
    let fill = SEGMENT_BYTES as usize
        - SEGMENT_HEADER_LEN
        - PER_SEGMENT as usize * (RECORD_HEADER_LEN + RECORD)
        - RECORD_HEADER_LEN;
    let len = if offset == RECYCLED_BASE - 1 {
        fill
    } else {
        RECORD
    };
    (0..len)
        .map(|j| (offset as usize * 7 + j) as u8 | 1)
        .collect()
}

/// A frame as FORMAT.md describes a v1 one (plain CRC-32, no salt), for `offset`.
fn forged_frame(offset: u64, body: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; RECORD_HEADER_LEN + body.len()];
    f[0..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
    f[8..16].copy_from_slice(&offset.to_le_bytes());
    f[16..24].copy_from_slice(&1_700_000_000_000i64.to_le_bytes());
    f[RECORD_HEADER_LEN..].copy_from_slice(body);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&f[0..4]);
    crc.update(&f[8..]);
    f[4..8].copy_from_slice(&crc.finalize().to_le_bytes());
    f
}

async fn append_all(log: &Log, payloads: impl IntoIterator<Item = Vec<u8>>) {
    let mut last = None;
    for p in payloads {
        last = Some(log.append(&p).unwrap().durable);
    }
    if let Some(d) = last {
        d.wait().await.unwrap();
    }
}

async fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn header_flags(path: &Path) -> u16 {
    let bytes = fs::read(path).unwrap();
    u16::from_le_bytes([bytes[10], bytes[11]])
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// A log whose segment 0 is full and sealed, with one record in segment 1.
async fn log_with_a_sealed_segment(dir: &Path) -> Log {
    let log = Log::open(dir, config()).unwrap();
    append_all(&log, (0..PER_SEGMENT + 1).map(payload)).await;
    wait_until("segment 0 sealed", || log.segments()[0].sealed).await;
    log
}

fn seg_path(dir: &Path, base: u64) -> std::path::PathBuf {
    dir.join(format!("{base:020}.seg"))
}

/// Fills segments 0 and 1, deletes segment 0 (its file goes to the preparer), and fills
/// segment 1 until the prepared (recycled) file is ready; the next append rolls into it.
/// Record 0 carries `forged` at `FORGED_AT` in its payload.
async fn log_about_to_roll_into_a_recycled_file(dir: &Path, forged: &[u8]) -> Log {
    let log = Log::open(dir, config()).unwrap();
    let mut first = payload(0);
    first[FORGED_AT..FORGED_AT + forged.len()].copy_from_slice(forged);
    append_all(&log, [first]).await;
    // Past half of segment 0 a new file is prepared for segment 1: let the roll take it,
    // so that the preparation for segment 2 is the one that finds the recycled file.
    append_all(&log, (1..PER_SEGMENT / 2 + 2).map(payload)).await;
    wait_until("a new file prepared", || log.next_segment_prepared()).await;
    append_all(&log, (PER_SEGMENT / 2 + 2..PER_SEGMENT + 1).map(payload)).await;
    assert_eq!(log.segments().len(), 2, "record {PER_SEGMENT} rolled");
    assert!(!log.next_segment_prepared());
    wait_until("segment 0 sealed", || log.segments()[0].sealed).await;
    assert_eq!(log.purge_before(PER_SEGMENT).unwrap(), PER_SEGMENT);
    let stats = log.stats();
    assert_eq!(stats.segments_recycled.load(Ordering::Relaxed), 1);
    assert!(!seg_path(dir, 0).exists(), "the old name is gone");
    append_all(&log, (PER_SEGMENT + 1..RECYCLED_BASE).map(payload)).await;
    wait_until("the recycled file prepared", || log.next_segment_prepared()).await;
    assert_eq!(log.segments().len(), 1, "segment 1 is full, not rolled yet");
    log
}

#[tokio::test]
async fn a_deleted_segment_file_becomes_the_next_segment_and_reads_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_about_to_roll_into_a_recycled_file(dir.path(), b"").await;
    // Ten records into the recycled file: fewer than it held, so old frames follow them.
    append_all(&log, (RECYCLED_BASE..RECYCLED_BASE + 10).map(payload)).await;
    let recycled = seg_path(dir.path(), RECYCLED_BASE);
    assert_eq!(header_flags(&recycled) & 1, 1, "the header says recycled");
    let leftovers: Vec<_> = file_names(dir.path())
        .into_iter()
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "no file left waiting: {leftovers:?}");
    let expect = |log: &Log| {
        assert_eq!(log.first_offset(), PER_SEGMENT);
        assert_eq!(log.next_offset(), RECYCLED_BASE + 10);
        for (i, record) in log.reader(PER_SEGMENT).enumerate() {
            let record = record.unwrap();
            assert_eq!(record.offset, PER_SEGMENT + i as u64);
            assert_eq!(record.payload, payload(record.offset));
        }
    };
    expect(&log);
    drop(log);

    // Reopened: the recycled segment ends at its last record (its file's older frames
    // after it are not a torn tail), is sealed there, and the next append rolls.
    let log = Log::open(dir.path(), config()).unwrap();
    expect(&log);
    assert_eq!(log.stats().recovered_torn_bytes.load(Ordering::Relaxed), 0);
    assert!(log.segments().last().unwrap().sealed);
    append_all(&log, [payload(RECYCLED_BASE + 10)]).await;
    let spans = log.segments();
    assert_eq!(spans.last().unwrap().base, RECYCLED_BASE + 10);
    drop(log);
    let log = Log::open(dir.path(), config()).unwrap();
    assert_eq!(log.next_offset(), RECYCLED_BASE + 11);
    assert_eq!(
        log.read(RECYCLED_BASE + 10).unwrap().payload,
        payload(RECYCLED_BASE + 10)
    );
}

/// A client knows the format and can guess offsets: it hides a valid v1 frame inside a
/// message body, at the position and with the offset a later segment in the same file
/// would expect next. The salt the new segment drew after that body was written keeps
/// the frame from verifying, after a restart too.
#[tokio::test]
async fn a_frame_forged_inside_an_old_body_never_reads_as_a_record() {
    let dir = tempfile::tempdir().unwrap();
    // The recycled segment starts at RECYCLED_BASE; its first record, FORGED_AT bytes
    // long, ends where the forged frame starts in the old record 0, which expects the
    // next offset there.
    let target = RECYCLED_BASE + 1;
    let forged = forged_frame(target, b"forged by a client");
    let log = log_about_to_roll_into_a_recycled_file(dir.path(), &forged).await;
    let first = log.append(&[0x42u8; FORGED_AT]).unwrap();
    assert_eq!(first.first, RECYCLED_BASE);
    first.durable.wait().await.unwrap();
    let recycled = seg_path(dir.path(), RECYCLED_BASE);
    assert_eq!(header_flags(&recycled) & 1, 1, "the file is segment 0's");
    let bytes = fs::read(&recycled).unwrap();
    let at = SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + FORGED_AT;
    assert_eq!(
        &bytes[at..at + forged.len()],
        &forged[..],
        "the forged frame is in place"
    );
    assert_eq!(log.next_offset(), target);
    drop(log);
    let log = Log::open(dir.path(), config()).unwrap();
    assert_eq!(
        log.next_offset(),
        target,
        "the forged frame was read as a record"
    );
    assert!(log.read(target).is_err());
    assert_eq!(
        log.read(RECYCLED_BASE).unwrap().payload,
        vec![0x42u8; FORGED_AT]
    );
    let next = log.append(b"real").unwrap();
    assert_eq!(next.first, target);
    next.durable.wait().await.unwrap();
    drop(log);
    let log = Log::open(dir.path(), config()).unwrap();
    assert_eq!(log.read(target).unwrap().payload, b"real".to_vec());
}

/// A payload a reader still holds is a slice of the segment's mapping: its file must not
/// be written again while it lives, so that segment is deleted, not recycled.
#[tokio::test]
async fn a_segment_whose_payload_a_reader_holds_is_not_recycled() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with_a_sealed_segment(dir.path()).await;
    let held = log.read(3).unwrap().payload;
    log.purge_before(PER_SEGMENT).unwrap();
    assert_eq!(log.stats().segments_recycled.load(Ordering::Relaxed), 0);
    assert_eq!(log.stats().segments_deleted.load(Ordering::Relaxed), 1);
    // Two more segments' worth of appends: with the file recycled they would overwrite it.
    append_all(&log, (PER_SEGMENT + 1..3 * PER_SEGMENT + 5).map(payload)).await;
    assert_eq!(held, payload(3), "a held payload changed under its reader");
    drop(held);
    // With nothing held, the next deletion recycles.
    wait_until("segment 1 sealed", || log.segments()[0].sealed).await;
    log.purge_before(RECYCLED_BASE).unwrap();
    assert_eq!(log.stats().segments_recycled.load(Ordering::Relaxed), 1);
}

/// A crash between a roll and the seal of the segment before it leaves that segment
/// unsealed with a later one after it. A recycled one then looks like a torn tail (its
/// file's older frames follow its last record), but with no gap before the next segment
/// it was complete: nothing after it may be cut.
#[tokio::test]
async fn an_unsealed_recycled_segment_before_another_keeps_every_later_record() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_about_to_roll_into_a_recycled_file(dir.path(), b"").await;
    // 35 records, then one too large for the rest of the segment: the recycled segment
    // ends ~8 KiB before its file's older frames do.
    let big_at = RECYCLED_BASE + 35;
    let big = vec![0x7eu8; 16_000];
    let record = |offset: u64| {
        if offset == big_at {
            big.clone()
        } else {
            payload(offset)
        }
    };
    let end = big_at + 5;
    append_all(&log, (RECYCLED_BASE..end).map(record)).await;
    assert_eq!(log.segments().len(), 3);
    assert_eq!(log.segments()[2].base, big_at);
    // Sealed by the sync thread after the round that covered it: wait, or its seal may
    // land after the patch below.
    wait_until("the recycled segment sealed", || log.segments()[1].sealed).await;
    drop(log);
    let recycled = seg_path(dir.path(), RECYCLED_BASE);
    assert_eq!(header_flags(&recycled) & 1, 1);
    let mut bytes = fs::read(&recycled).unwrap();
    assert_eq!(&bytes[40..44], b"SEAL");
    bytes[40..64].fill(0); // the seal never written
    fs::write(&recycled, bytes).unwrap();

    let log = Log::open(dir.path(), config()).unwrap();
    assert_eq!(
        log.next_offset(),
        end,
        "records after the recycled segment were cut"
    );
    for offset in PER_SEGMENT..end {
        assert_eq!(
            log.read(offset).unwrap().payload,
            record(offset),
            "record {offset}"
        );
    }
    assert!(log.segments()[1].sealed, "sealed at open");
}

/// Near a full disk a deleted segment's space is worth more than its file: the broker's
/// store refuses producers until a reclaim makes room, which a kept file would not. Here
/// the log's reserve stands for a disk that keeps too little free.
#[tokio::test]
async fn near_a_full_disk_a_deleted_segment_is_unlinked_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with_a_sealed_segment(dir.path()).await;
    drop(log);
    let free = entrepot_storage::free_bytes(dir.path()).unwrap();
    let short = LogConfig {
        reserve_bytes: free,
        ..config()
    };
    let log = Log::open(dir.path(), short).unwrap();
    assert_eq!(log.purge_before(PER_SEGMENT).unwrap(), PER_SEGMENT);
    assert_eq!(log.stats().segments_recycled.load(Ordering::Relaxed), 0);
    assert_eq!(log.stats().segments_deleted.load(Ordering::Relaxed), 1);
    assert_eq!(
        file_names(dir.path()),
        vec![format!("{PER_SEGMENT:020}.seg")],
        "only the active segment is left"
    );
}
