//! Goal: a segment prepared ahead of its roll (`storage/src/prepare.rs`) changes nothing
//! a reader, a crash or a power cut can see: a roll takes it, every record reads back
//! across it and after a reopen, and a prepared file that was never used — or used by a
//! roll whose first sync never came — is deleted at recovery without touching a durable
//! record; a power cut at that point never leaves a `.seg` name without its header.
//!
//! Method: real files on the test's disk with real `fsync` (the first two tests), the
//! files copied while the log is live as a SIGKILL leaves them (same bytes, page cache
//! included); the `crash_sim` seam for the power cut (the third), over several seeds,
//! half of them with the round that would name the rolled-to segment stalled, half right
//! after that round published the roll's records. Every wait is bounded.

use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use entrepot_storage::crash_sim::{CrashSim, SyncFault};
use entrepot_storage::{Log, LogConfig, SyncPolicy};

const SEGMENT_BYTES: u64 = 256 * 1024;
const RECORD_BYTES: usize = 1000;
/// Longest a test waits for the preparing thread.
const READY_WAIT: Duration = Duration::from_secs(10);
/// Most records a test appends while waiting for something.
const APPENDS_MAX: u64 = 10_000;
/// Seeds of the power cut.
const CUT_SEEDS: u64 = 8;

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: SEGMENT_BYTES,
        record_bytes_max: 8 * 1024,
        sync: SyncPolicy::Always,
        ..LogConfig::default()
    }
}

fn record(i: u64) -> Vec<u8> {
    let mut r = vec![(i % 251) as u8; RECORD_BYTES];
    r[..8].copy_from_slice(&i.to_le_bytes());
    r
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

/// How long a dropped log's last temporary file may take to be renamed or removed.
const TEMPORARIES_GONE_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

fn temporaries(dir: &Path) -> Vec<String> {
    names(dir)
        .into_iter()
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

/// Opens the log in `dir`, checking that the temporary files a crash left are gone (the
/// reopened log may prepare a file of its own at once).
fn open_after_crash(dir: &Path, what: &str) -> Log {
    let left = temporaries(dir);
    let log = Log::open(dir, config()).unwrap_or_else(|e| panic!("{what}: reopening: {e}"));
    let still: Vec<_> = temporaries(dir)
        .into_iter()
        .filter(|n| left.contains(n))
        .collect();
    assert!(still.is_empty(), "{what}: {still:?} survived the open");
    log
}

/// Appends (each awaited durable) until the next segment's file is prepared and the
/// active segment has no room for more than `room_records`; returns the next offset.
async fn fill_until_prepared(log: &Log, from: u64, room_records: u64) -> u64 {
    let mut next = from;
    let deadline = Instant::now() + READY_WAIT;
    loop {
        let span = *log.segments().last().expect("a segment");
        let left = SEGMENT_BYTES - 64 - span.bytes;
        let room = left / (RECORD_BYTES as u64 + 28);
        if room <= room_records {
            while !log.next_segment_prepared() {
                assert!(
                    Instant::now() < deadline,
                    "the next segment was never prepared"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            return next;
        }
        let a = log.append(&record(next)).expect("append");
        assert_eq!(a.first, next);
        a.durable.wait().await.expect("durable");
        next += 1;
        assert!(next - from < APPENDS_MAX, "the segment never filled");
    }
}

fn copy_files(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for name in names(from) {
        fs::copy(from.join(&name), to.join(&name)).expect("copy");
    }
}

fn check_reads(log: &Log, count: u64) {
    let mut n = 0;
    for r in log.reader(0) {
        let r = r.expect("read back");
        assert_eq!(r.offset, n);
        assert_eq!(&r.payload[..], &record(n)[..], "record {n}");
        n += 1;
    }
    assert_eq!(n, count, "every record and nothing else");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolls_take_the_prepared_file_and_everything_reads_back_after_reopen() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("log");
    let log = Log::open(&dir, config()).expect("open");
    let mut next = 0;
    for _ in 0..3 {
        next = fill_until_prepared(&log, next, 0).await;
        let a = log.append(&record(next)).expect("the roll");
        a.durable.wait().await.expect("durable");
        next += 1;
    }
    let stats = log.stats();
    assert_eq!(stats.rolls.load(Ordering::Relaxed), 3);
    assert_eq!(
        stats.rolls_prepared.load(Ordering::Relaxed),
        3,
        "each roll took the prepared file"
    );
    // Every durable segment has its final name: four segments, each named by its base.
    let spans = log.segments();
    assert_eq!(spans.len(), 4);
    for s in &spans {
        assert!(
            dir.join(format!("{:020}.seg", s.base)).exists(),
            "{:?} named",
            s
        );
    }
    check_reads(&log, next);
    drop(log);
    // The last sealed segment's index tables may still be in writing (`index.rs` writes
    // them through a temporary name) on the log's thread as the log is dropped: none may
    // stay behind, within a bound (a fresh-clone CI saw `<base>.tmp` at once, once).
    let deadline = std::time::Instant::now() + TEMPORARIES_GONE_WITHIN;
    while !temporaries(&dir).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(temporaries(&dir).is_empty(), "{:?}", names(&dir));
    let log = Log::open(&dir, config()).expect("reopen");
    check_reads(&log, next);
    assert_eq!(log.segments().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_file_left_by_a_kill_is_deleted_at_open_and_costs_no_record() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("log");
    let sim = CrashSim::install(tmp.path()).expect("install");
    let log = Log::open(&dir, config()).expect("open");
    let durable = fill_until_prepared(&log, 0, 0).await;
    // (1) Killed with a prepared file ready and unused.
    assert_eq!(temporaries(&dir).len(), 1, "{:?}", names(&dir));
    let killed = tmp.path().join("killed-ready");
    copy_files(&dir, &killed);
    // (2) Killed after a roll took it and before the round that names it: its first sync
    // is held, so the roll's record is in the page cache only and the file still has its
    // temporary name.
    sim.inject(SyncFault::Stall(Duration::from_millis(500)), 1);
    let rolled = log.append(&record(durable)).expect("the roll");
    assert!(!rolled.durable.is_durable());
    let named = dir.join(format!("{durable:020}.seg"));
    assert!(!named.exists(), "named before its header is synced");
    let killed_rolled = tmp.path().join("killed-rolled");
    copy_files(&dir, &killed_rolled);
    rolled
        .durable
        .wait()
        .await
        .expect("durable after the stall");
    assert!(named.exists(), "named by the round that synced it");
    drop(log);
    drop(sim);
    for (killed, expect) in [(&killed, durable), (&killed_rolled, durable)] {
        assert_eq!(
            temporaries(killed).len(),
            1,
            "the kill left the prepared file"
        );
        let log = open_after_crash(killed, "after the kill");
        assert_eq!(log.next_offset(), expect);
        check_reads(&log, expect);
        // It appends and rolls again, and reopens with all of it.
        let again = fill_until_prepared(&log, expect, 0).await;
        let a = log.append(&record(again)).expect("roll");
        a.durable.wait().await.expect("durable");
        drop(log);
        let log = Log::open(killed, config()).expect("second reopen");
        check_reads(&log, again + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_before_the_first_round_of_a_prepared_segment_loses_nothing_durable() {
    for seed in 0..CUT_SEEDS {
        let tmp = tempfile::tempdir().expect("tempdir");
        let live = tmp.path().join("live");
        let sim = CrashSim::install(&live).expect("install");
        let log = Log::open(live.join("log"), config()).expect("open");
        // A few records short of the roll, so the cut also catches unsynced records of
        // the old segment beside the new one.
        let mut durable = fill_until_prepared(&log, 0, 3).await;
        // Even seeds: the cut comes before the first round of the new segment (held by a
        // stall). Odd seeds: right after that round published the roll's record.
        let before_round = seed % 2 == 0;
        if before_round {
            sim.inject(SyncFault::Stall(Duration::from_millis(300)), 1);
        }
        let mut next = durable;
        let mut last = None;
        while log.segments().len() < 2 {
            last = Some(log.append(&record(next)).expect("append"));
            next += 1;
            assert!(next - durable < 10, "seed {seed}: no roll");
        }
        if !before_round {
            let last = last.expect("appended");
            last.durable.wait().await.expect("durable");
            durable = next;
        }
        let crashed = tmp.path().join("crashed");
        sim.crash_into(&crashed, seed).expect("crash");
        drop(log);
        let log = open_after_crash(&crashed.join("log"), &format!("seed {seed}"));
        let recovered = log.next_offset();
        assert!(
            (durable..=next).contains(&recovered),
            "seed {seed}: recovered {recovered}, durable {durable}, appended {next}"
        );
        check_reads(&log, recovered);
        let a = log
            .append(&record(recovered))
            .expect("append after the cut");
        a.durable.wait().await.expect("durable");
        drop(log);
        let log = Log::open(crashed.join("log"), config()).expect("second reopen");
        check_reads(&log, recovered + 1);
    }
}
