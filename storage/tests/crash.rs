//! Goal: a record whose durability handle completed survives a SIGKILL, byte for byte, at
//! the offset it was given — across many crashes into the same directory.
//!
//! Method: the test binary re-executes itself (`current_exe`) with `ENTREPOT_CRASH_CHILD`
//! set; the child test then appends forever from several tokio tasks (so group commit
//! batches them) with `SyncPolicy::Always`, small segments (so it rolls often) and varying
//! payload sizes, and prints `durable <offset> <round> <task> <seq>` after each handle
//! completes. The parent kills it with SIGKILL after a random 20–300 ms, reopens the log
//! (recovery runs) and checks every offset printed in every round so far holds exactly the
//! payload derived from `(round, task, seq)`, and that the whole log reads back cleanly.
//! The seed is printed; `ENTREPOT_CRASH_SEED=<n>` replays a run.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use entrepot_storage::{Log, LogConfig, SyncPolicy};

const CHILD_ENV: &str = "ENTREPOT_CRASH_CHILD";
const ROUND_ENV: &str = "ENTREPOT_CRASH_ROUND";
const ROUNDS: u64 = 24;
const TASKS: u64 = 8;
/// The child stops by itself after this long, in case the kill never comes.
const CHILD_LIFETIME: Duration = Duration::from_secs(5);

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 256 * 1024,
        record_bytes_max: 128 * 1024,
        sync: SyncPolicy::Always,
        ..LogConfig::default()
    }
}

/// splitmix64: a tiny deterministic generator, enough for sizes and kill times.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The payload the child appends for `(round, task, seq)`; mostly small, sometimes large
/// enough that a segment rolls after a few of them.
fn payload(round: u64, task: u64, seq: u64) -> Vec<u8> {
    let h = mix(round << 40 ^ task << 32 ^ seq);
    let len = match h % 32 {
        0 => 20_000 + (h >> 8) as usize % 80_000,
        1..=6 => 2_000 + (h >> 8) as usize % 8_000,
        _ => (h >> 8) as usize % 600,
    };
    let mut bytes: Vec<u8> = (0..len.div_ceil(8) as u64)
        .flat_map(|i| mix(h ^ i).to_le_bytes())
        .collect();
    bytes.truncate(len);
    bytes
}

/// The child: runs only when re-executed by `records_survive_repeated_sigkill`.
#[test]
fn crash_child_appends_until_killed() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let round: u64 = std::env::var(ROUND_ENV)
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let log = Log::open(&dir, config()).unwrap();
        let started = Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut seq = 0;
                    while started.elapsed() < CHILD_LIFETIME {
                        let appended = log.append(&payload(round, task, seq)).unwrap();
                        appended.durable.wait().await.unwrap();
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "durable {} {round} {task} {seq}", appended.first).unwrap();
                        out.flush().unwrap();
                        seq += 1;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
}

/// One line the child printed: `offset` holds the payload of `(round, task, seq)`.
#[derive(Debug, Clone, Copy)]
struct Promise {
    offset: u64,
    round: u64,
    task: u64,
    seq: u64,
}

fn parse(line: &str) -> Option<Promise> {
    let mut it = line
        .strip_prefix("durable ")?
        .split_whitespace()
        .map(|w| w.parse::<u64>());
    let mut next = || it.next()?.ok();
    Some(Promise {
        offset: next()?,
        round: next()?,
        task: next()?,
        seq: next()?,
    })
}

/// Runs one child for `kill_after`, then SIGKILLs it; returns what it promised.
fn run_child(dir: &Path, round: u64, kill_after: Duration) -> Vec<Promise> {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "crash_child_appends_until_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir)
        .env(ROUND_ENV, round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let seen = Arc::clone(&seen);
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout);
            let mut line = String::new();
            // A line cut by the kill has no newline and is ignored: it was never complete.
            while lines.read_line(&mut line).unwrap_or(0) > 0 {
                if line.ends_with('\n') {
                    if let Some(p) = parse(line.trim_end()) {
                        seen.lock().unwrap().push(p);
                    }
                }
                line.clear();
            }
        })
    };
    std::thread::sleep(kill_after);
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    reader.join().unwrap();
    let promised = seen.lock().unwrap().clone();
    promised
}

#[test]
fn records_survive_repeated_sigkill() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let seed = std::env::var("ENTREPOT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("crash test seed: {seed} (replay with ENTREPOT_CRASH_SEED={seed})");
    let dir = tempfile::tempdir().unwrap();
    let mut promised: Vec<Promise> = Vec::new();
    let mut torn_rounds = 0;
    for round in 0..ROUNDS {
        let kill_after = Duration::from_millis(20 + mix(seed ^ round) % 281);
        let got = run_child(dir.path(), round, kill_after);
        promised.extend(got.iter().copied());

        let log = Log::open(dir.path(), config())
            .unwrap_or_else(|e| panic!("seed {seed} round {round}: reopen failed: {e}"));
        if log
            .stats()
            .recovered_torn_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
        {
            torn_rounds += 1;
        }
        for p in &promised {
            let record = log
                .read(p.offset)
                .unwrap_or_else(|e| panic!("seed {seed} round {round}: lost {p:?}: {e}"));
            assert!(
                record.payload == payload(p.round, p.task, p.seq),
                "seed {seed} round {round}: {p:?} reads back different bytes"
            );
        }
        let mut expected_offset = 0;
        for record in log.reader(0) {
            let record =
                record.unwrap_or_else(|e| panic!("seed {seed} round {round}: log unreadable: {e}"));
            assert_eq!(
                record.offset, expected_offset,
                "seed {seed} round {round}: offsets are dense"
            );
            expected_offset += 1;
        }
        assert_eq!(expected_offset, log.next_offset());
        println!(
            "round {round}: killed after {kill_after:?}, {} new durable records, log holds {} records in {} segments",
            got.len(),
            log.next_offset(),
            log.segments().len()
        );
    }
    println!(
        "{} durable records checked, {torn_rounds} recoveries cut a torn tail",
        promised.len()
    );
    assert!(
        promised.len() > 100,
        "seed {seed}: the child reported too few durable records to mean anything"
    );
    let segments = Log::open(dir.path(), config()).unwrap().segments().len();
    assert!(
        segments > 2,
        "seed {seed}: the log should have rolled, has {segments} segments"
    );
}
