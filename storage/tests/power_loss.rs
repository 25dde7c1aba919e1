//! Goal: `Durable` means "on the disk", not "in the page cache". After a power cut at any
//! point, every record whose handle completed is recovered byte for byte at its offset,
//! every acknowledgement whose handle completed is in the recovered ack set, nothing is
//! recovered that was never appended, and a torn tail is cut so the log reopens, appends
//! and reopens again cleanly.
//!
//! Method: the storage crate's `crash_sim` seam records what each sync made durable.
//! Per seed, several tokio tasks append records of varying sizes (small segments, so
//! segments roll, seal and write index files under load) and wait for their handles, an
//! acknowledger acks completed offsets in the ack log; once a seeded number of handles
//! completed, the power is cut: every later sync fails, and the crashed tree — unsynced
//! bytes per page old, new, torn or garbage, unsynced directory entries either way, all
//! drawn from the seed — is written to a fresh directory, which is reopened and checked.
//! Appends and acks keep running while the cut happens, so it falls between an append and
//! its sync, inside a roll, between a sync and its publication.
//! `ENTREPOT_CRASH_SEEDS=<n>` runs n seeds (default [`DEFAULT_SEEDS`]);
//! `ENTREPOT_CRASH_SEED=<s>` replays one. Every failure names its seed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use entrepot_storage::crash_sim::{CrashReport, CrashSim};
use entrepot_storage::{AckLog, Log, LogConfig, SyncPolicy};

/// Seeds run by default (each a few hundred milliseconds).
const DEFAULT_SEEDS: u64 = 16;
const APPENDERS: u64 = 4;
/// Most appends one task makes in a run (it stops earlier at the cut).
const APPENDS_PER_TASK_MAX: u64 = 2_000;
/// The cut comes after 1..=this many completed handles.
const CRASH_AFTER_MAX: u64 = 600;
/// Largest payload, so a 64 KiB segment holds tens of records and rolls often.
const PAYLOAD_BYTES_MAX: u64 = 3_000;
/// Longest one seed may run before the test gives up on it.
const RUN_LIMIT: Duration = Duration::from_secs(20);

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 64 * 1024,
        record_bytes_max: 8 * 1024,
        sync: SyncPolicy::Always,
        index_interval_bytes: 256,
        ..LogConfig::default()
    }
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The payload task `task` appends as its `seq`-th record: `{task, seq}` then filler.
fn payload(seed: u64, task: u64, seq: u64) -> Vec<u8> {
    let h = mix(seed ^ mix(task << 32 | seq));
    let len = 16 + (h % PAYLOAD_BYTES_MAX) as usize;
    let mut p = Vec::with_capacity(len);
    p.extend_from_slice(&task.to_le_bytes());
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend((0..len - 16).map(|i| (h >> (i % 8 * 8)) as u8 ^ i as u8));
    p
}

fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("ENTREPOT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![seed];
    }
    let n = std::env::var("ENTREPOT_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEEDS);
    (1..=n).collect()
}

/// What the run saw complete before (and during) the cut.
#[derive(Default)]
struct Seen {
    /// offset → (task, seq) of every record whose handle completed.
    durable: BTreeMap<u64, (u64, u64)>,
    /// Offsets handed to the ack log, and those whose ack handle completed.
    acks_tried: BTreeSet<u64>,
    acks_durable: BTreeSet<u64>,
}

#[test]
fn completed_handles_survive_power_loss_at_seeded_points() {
    let mut totals = (0usize, 0usize, 0u64);
    for seed in seeds() {
        let (durable, acks, report) = run_seed(seed);
        totals.0 += durable;
        totals.1 += acks;
        totals.2 += report.pages_old + report.pages_new + report.pages_torn + report.pages_garbage;
    }
    println!(
        "power loss: {} seeds, {} completed appends and {} completed acks checked, {} damaged pages",
        seeds().len(),
        totals.0,
        totals.1,
        totals.2
    );
}

fn run_seed(seed: u64) -> (usize, usize, CrashReport) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let live = tmp.path().join("live");
    let crashed = tmp.path().join("crashed");
    let sim = CrashSim::install(&live).expect("install the crash simulation");
    let crash_after = 1 + mix(seed) % CRASH_AFTER_MAX;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let report = rt.block_on(async {
        let log = Log::open(live.join("messages"), config()).expect("open log");
        let acks = AckLog::open(live.join("acks"), config()).expect("open ack log");
        let completed = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for task in 0..APPENDERS {
            let (log, seen, completed) = (log.clone(), Arc::clone(&seen), Arc::clone(&completed));
            tasks.push(tokio::spawn(append_until_cut(
                seed, task, log, seen, completed,
            )));
        }
        tasks.push(tokio::spawn(ack_until_cut(
            acks,
            log.clone(),
            Arc::clone(&seen),
        )));
        let deadline = tokio::time::Instant::now() + RUN_LIMIT;
        while completed.load(Ordering::Relaxed) < crash_after {
            assert!(
                tokio::time::Instant::now() < deadline,
                "seed {seed}: no progress"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let report = sim.crash_into(&crashed, seed).expect("crash");
        for t in tasks {
            tokio::time::timeout(RUN_LIMIT, t)
                .await
                .unwrap_or_else(|_| panic!("seed {seed}: a task did not stop after the cut"))
                .expect("task");
        }
        drop(log);
        report
    });
    drop(rt);
    let seen = Arc::try_unwrap(seen)
        .ok()
        .expect("tasks ended")
        .into_inner()
        .expect("lock");
    check_recovered(seed, &crashed, &seen);
    (seen.durable.len(), seen.acks_durable.len(), report)
}

async fn append_until_cut(
    seed: u64,
    task: u64,
    log: Log,
    seen: Arc<Mutex<Seen>>,
    completed: Arc<AtomicU64>,
) {
    for seq in 0..APPENDS_PER_TASK_MAX {
        let Ok(appended) = log.append(&payload(seed, task, seq)) else {
            return;
        };
        if appended.durable.wait().await.is_err() {
            return;
        }
        seen.lock()
            .expect("lock")
            .durable
            .insert(appended.first, (task, seq));
        completed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Acks, every few milliseconds, the durable offsets not acked yet (every third one, so the
/// set has holes), until the ack log or the message log fails.
async fn ack_until_cut(acks: AckLog, log: Log, seen: Arc<Mutex<Seen>>) {
    let deadline = tokio::time::Instant::now() + RUN_LIMIT;
    while tokio::time::Instant::now() < deadline && log.durable_watch().borrow().failed.is_none() {
        let batch: Vec<u64> = {
            let s = seen.lock().expect("lock");
            let from = s.acks_tried.last().map_or(0, |&o| o + 1);
            s.durable
                .range(from..)
                .map(|(&o, _)| o)
                .filter(|o| o % 3 != 1)
                .collect()
        };
        if !batch.is_empty() {
            seen.lock()
                .expect("lock")
                .acks_tried
                .extend(batch.iter().copied());
            let Ok(durable) = acks.ack(&batch) else {
                return;
            };
            if durable.wait().await.is_err() {
                return;
            }
            seen.lock().expect("lock").acks_durable.extend(batch);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn check_recovered(seed: u64, crashed: &Path, seen: &Seen) {
    let log = Log::open(crashed.join("messages"), config())
        .unwrap_or_else(|e| panic!("seed {seed}: reopening the crashed log: {e}"));
    for (&offset, &(task, seq)) in &seen.durable {
        let record = log
            .read(offset)
            .unwrap_or_else(|e| panic!("seed {seed}: durable record {offset} lost: {e}"));
        assert!(
            record.payload[..] == payload(seed, task, seq)[..],
            "seed {seed}: durable record {offset} differs after the cut"
        );
    }
    let mut next = log.first_offset();
    for record in log.reader(0) {
        let record = record.unwrap_or_else(|e| panic!("seed {seed}: reading back: {e}"));
        assert_eq!(record.offset, next, "seed {seed}: offsets not dense");
        next += 1;
        let task = u64::from_le_bytes(record.payload[0..8].try_into().expect("8 bytes"));
        let seq = u64::from_le_bytes(record.payload[8..16].try_into().expect("8 bytes"));
        assert!(
            task < APPENDERS && record.payload[..] == payload(seed, task, seq)[..],
            "seed {seed}: record {} was never appended",
            record.offset
        );
    }
    assert!(
        next >= seen.durable.keys().next_back().map_or(0, |o| o + 1),
        "seed {seed}"
    );
    // The cut tail is gone for good: the log appends, and reopens with that append.
    let after = log.append(b"after the cut").expect("append after recovery");
    log.flush().expect("flush");
    drop(log);
    let log = Log::open(crashed.join("messages"), config()).expect("second reopen");
    assert_eq!(
        &log.read(after.first).expect("read").payload[..],
        b"after the cut",
        "seed {seed}"
    );
    let acks = AckLog::open(crashed.join("acks"), config())
        .unwrap_or_else(|e| panic!("seed {seed}: reopening the crashed ack log: {e}"));
    for &offset in &seen.acks_durable {
        assert!(
            acks.is_acked(offset),
            "seed {seed}: durable ack of {offset} lost"
        );
    }
    for offset in 0..next {
        assert!(
            !acks.is_acked(offset) || seen.acks_tried.contains(&offset),
            "seed {seed}: {offset} acked but never acknowledged"
        );
    }
}

/// Records of each phase of the restart test below.
const RESTART_RECORDS: u64 = 12;
/// Seeds of the power cut after the restart (each leaves unsynced pages differently).
const RESTART_CUT_SEEDS: u64 = 8;

/// A process killed before its sync leaves records in the page cache that the next
/// process recovers as its tail. Those must be synced before the new process reports
/// anything durable: a later append is synced by the range it was written to, and if a
/// power cut then loses the older, never-synced pages in front of it, recovery stops at
/// them and cuts the acknowledged record too.
///
/// Method: A is appended and synced; B is appended by a log with `SyncPolicy::Never`
/// that is dropped unsynced (the page cache of a killed process: readable, not on the
/// disk); a restarted log appends C and waits for it; then the power is cut with several
/// seeds. Every crashed tree must hold A and C (B may go only if C goes with it — it
/// cannot, C was acknowledged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_recovered_from_the_page_cache_are_synced_before_later_appends_complete() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let live = tmp.path().join("live");
    let sim = CrashSim::install(&live).expect("install");
    let dir = live.join("log");
    let record = |phase: u8, i: u64| vec![phase; 900 + i as usize];
    let log = Log::open(&dir, config()).expect("open");
    for i in 0..RESTART_RECORDS {
        log.append(&record(b'A', i)).expect("append");
    }
    log.flush().expect("A synced");
    drop(log);
    let killed = Log::open(
        &dir,
        LogConfig {
            sync: SyncPolicy::Never,
            ..config()
        },
    )
    .expect("open");
    for i in 0..RESTART_RECORDS {
        killed.append(&record(b'B', i)).expect("append");
    }
    drop(killed); // never synced: what SIGKILL leaves in the page cache
    let log = Log::open(&dir, config()).expect("restart");
    assert_eq!(log.next_offset(), 2 * RESTART_RECORDS, "B is recovered");
    let mut acked = Vec::new();
    for i in 0..RESTART_RECORDS {
        let c = log.append(&record(b'C', i)).expect("append");
        c.durable.wait().await.expect("C durable");
        acked.push(c.first);
    }
    for seed in 0..RESTART_CUT_SEEDS {
        let crashed = tmp.path().join(format!("crashed-{seed}"));
        sim.crash_into(&crashed, seed).expect("crash");
        let reopened = Log::open(crashed.join("log"), config()).expect("reopen");
        for (i, &offset) in acked.iter().enumerate() {
            let r = reopened
                .read(offset)
                .unwrap_or_else(|e| panic!("seed {seed}: acknowledged C{i} at {offset} lost: {e}"));
            assert_eq!(r.payload[..], record(b'C', i as u64)[..], "seed {seed}");
        }
    }
}
