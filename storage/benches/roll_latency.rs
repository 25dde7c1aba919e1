//! Latency of appends across segment rolls, at a fixed rate (issue 15).
//!
//! One thread appends 1 KiB records at `ENTREPOT_ROLL_RATE` records/s (default 20,000,
//! about the broker's half load in `benches/RESULTS.md`), each at its scheduled time, for
//! `ENTREPOT_ROLL_SECS` seconds (default 20), to a log with `SyncPolicy::Always` and
//! segments of `ENTREPOT_ROLL_SEGMENT_MIB` MiB (default 128, the broker's default). A
//! second thread plays the broker's housekeeping: every 500 ms it deletes each sealed
//! segment (as `reclaim` does once every record in it is acknowledged). A third follows
//! the durable offset and stamps every record it covers.
//!
//! Printed: the distribution of schedule → durable (what the broker's `accepted` waits
//! for, without coordinated omission: a late append counts from when it was due), the
//! longest `append` call (time under the writer lock), the rolls (how many took a
//! segment prepared ahead, the appender's mean and longest time inside them), and a timeline of the episodes
//! where records waited more than `ENTREPOT_ROLL_SLOW_MS` beside the rolls, seals and deletions around them.
//!
//! Run: `cargo bench -p entrepot-storage --bench roll_latency` (data under the target
//! directory's disk, like the other storage benches).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use entrepot_storage::{Log, LogConfig, SyncPolicy};

const RECORD_BYTES: usize = 1024;
/// Housekeeping period of the broker (`HOUSEKEEPING_INTERVAL`).
const RECLAIM_EVERY: Duration = Duration::from_millis(500);
/// A record that waited longer than this many ms (`ENTREPOT_ROLL_SLOW_MS`, default 5)
/// belongs to an episode of the timeline.
const DEFAULT_SLOW_MS: u64 = 5;
/// Most lines of the timeline printed.
const TIMELINE_MAX: usize = 120;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Events(Mutex<Vec<(Duration, String)>>);

impl Events {
    fn push(&self, at: Duration, what: String) {
        if let Ok(mut e) = self.0.lock() {
            e.push((at, what));
        }
    }
}

fn main() {
    let rate = env_u64("ENTREPOT_ROLL_RATE", 20_000).max(1);
    let secs = env_u64("ENTREPOT_ROLL_SECS", 20).clamp(1, 600);
    let segment_bytes = env_u64("ENTREPOT_ROLL_SEGMENT_MIB", 128) << 20;
    let slow = Duration::from_millis(env_u64("ENTREPOT_ROLL_SLOW_MS", DEFAULT_SLOW_MS));
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temporary directory");
    let config = LogConfig {
        segment_bytes,
        record_bytes_max: 64 << 10,
        sync: SyncPolicy::Always,
        ..LogConfig::default()
    };
    let log = Log::open(dir.path(), config).expect("open log");
    let total = rate * secs;
    let start = Instant::now();
    let due = |i: u64| start + Duration::from_nanos(i * 1_000_000_000 / rate);
    let done_at: Arc<Mutex<Vec<Option<Instant>>>> =
        Arc::new(Mutex::new(vec![None; total as usize]));
    let events = Arc::new(Events(Mutex::new(Vec::new())));
    let stop = Arc::new(AtomicBool::new(false));

    let watcher = {
        let mut rx = log.durable_watch();
        let done_at = Arc::clone(&done_at);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mut stamped = 0u64;
                while stamped < total {
                    let changed = tokio::time::timeout(Duration::from_secs(30), rx.changed()).await;
                    if !matches!(changed, Ok(Ok(()))) {
                        return;
                    }
                    let durable = rx.borrow_and_update().durable.min(total);
                    let now = Instant::now();
                    if let Ok(mut d) = done_at.lock() {
                        for slot in &mut d[stamped as usize..durable as usize] {
                            *slot = Some(now);
                        }
                    }
                    stamped = stamped.max(durable);
                }
            });
        })
    };
    let reclaimer = {
        let log = log.clone();
        let events = Arc::clone(&events);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut known = 0;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(RECLAIM_EVERY);
                let segments = log.segments();
                if segments.len() != known {
                    known = segments.len();
                    let sealed = segments.iter().filter(|s| s.sealed).count();
                    events.push(
                        start.elapsed(),
                        format!("segments {known} ({sealed} sealed)"),
                    );
                }
                for s in segments.iter().filter(|s| s.sealed) {
                    let t = Instant::now();
                    let deleted = log.delete_segment(s.base).expect("delete segment");
                    let took = t.elapsed();
                    events.push(
                        t - start,
                        format!("delete_segment({}) = {deleted} took {took:?}", s.base),
                    );
                }
            }
        })
    };

    let payload = vec![0x5au8; RECORD_BYTES];
    let mut append_max = (Duration::ZERO, 0u64);
    let mut segment_base = 0;
    for i in 0..total {
        let at = due(i);
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let t = Instant::now();
        let appended = log.append(&payload).expect("append");
        let took = t.elapsed();
        if took > append_max.0 {
            append_max = (took, i);
        }
        let segments = log.segments();
        if let Some(last) = segments.last().filter(|s| s.base != segment_base) {
            segment_base = last.base;
            events.push(
                t - start,
                format!("roll to {} (append took {took:?})", last.base),
            );
        }
        drop(appended);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    let _ = reclaimer.join();

    let d = done_at.lock().expect("stamps");
    let mut lat: Vec<(Duration, u64)> = (0..total)
        .filter_map(|i| d[i as usize].map(|t| (t.saturating_duration_since(due(i)), i)))
        .collect();
    let mut sorted: Vec<Duration> = lat.iter().map(|l| l.0).collect();
    sorted.sort();
    let q = |p: f64| sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)];
    println!(
        "roll_latency: rate={rate}/s secs={secs} segment_mib={} records={} durable={} p50_us={} p99_us={} p999_us={} max_us={} append_call_max_us={} (record {})",
        segment_bytes >> 20,
        total,
        sorted.len(),
        q(0.5).as_micros(),
        q(0.99).as_micros(),
        q(0.999).as_micros(),
        sorted.last().map_or(0, |m| m.as_micros()),
        append_max.0.as_micros(),
        append_max.1,
    );
    let stats = log.stats();
    let rolls = stats.rolls.load(Ordering::Relaxed);
    println!(
        "rolls={rolls} from_prepared={} roll_us_mean={:.0} roll_us_max={} (the appender's time inside `roll`, under the writer lock)",
        stats.rolls_prepared.load(Ordering::Relaxed),
        stats.roll_nanos_total.load(Ordering::Relaxed) as f64 / rolls.max(1) as f64 / 1e3,
        stats.roll_nanos_max.load(Ordering::Relaxed) / 1_000,
    );
    // Episodes: runs of records that waited more than SLOW.
    lat.sort_by_key(|l| l.1);
    let mut timeline: Vec<(Duration, String)> = Vec::new();
    let mut episode: Option<(u64, u64, Duration)> = None;
    for &(l, i) in &lat {
        match (&mut episode, l > slow) {
            (Some((_, last, worst)), true) => {
                *last = i;
                *worst = (*worst).max(l);
            }
            (None, true) => episode = Some((i, i, l)),
            (Some((first, last, worst)), false) => {
                timeline.push((
                    due(*first) - start,
                    format!("slow: records {first}..={last} due, worst wait {worst:?}"),
                ));
                episode = None;
            }
            (None, false) => {}
        }
    }
    timeline.extend(events.0.lock().expect("events").drain(..));
    timeline.sort_by_key(|e| e.0);
    for (at, what) in timeline.iter().take(TIMELINE_MAX) {
        println!("  {:>10.3} ms  {what}", at.as_secs_f64() * 1e3);
    }
}
