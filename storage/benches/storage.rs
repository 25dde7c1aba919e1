//! Throughput of the segment log on the real disk.
//!
//! * `append_sync_always/{1,8,64}`: 1 KiB records, `SyncPolicy::Always`, N tokio tasks each
//!   awaiting its durability handle before the next append — group commit at work.
//!   Throughput is in bytes of payload; records/s = bytes/s ÷ 1024.
//!   After each count it prints the group commit's own figures (stderr, and appended to
//!   the file named by `ENTREPOT_BENCH_REPORT` if set, as `key=value` words): records and
//!   bytes per flush, flushes per second, mean sync call, the share of wall time spent
//!   inside sync calls, bytes dirtied for the disk, page faults appenders took and CPU
//!   time of the process per flush — what `benches/disk-limit.sh` sets beside fio's.
//! * `append_in_flight/{8x8,8x64}`: the broker's shape — 8 tasks each keeping up to 8 or
//!   64 records in flight, one wake-up releasing every record a sync covered (as a
//!   connection drains its pending FIFO), and sealed segments freed behind the durable
//!   offset every 50 ms (as the broker's reclaim frees acknowledged ones, so their files
//!   are recycled unless `ENTREPOT_BENCH_RECYCLE=0`); same figures printed.
//! * `append_paced/{10k,40k}`: one task appending on a fixed clock — a burst every
//!   millisecond (10 or 40 records), then waiting for the burst's durability and the next
//!   tick — as a producer at a moderate rate: its appends do not answer the last sync, so
//!   what counts is the CPU per record the log spends to keep up (`cpu_us_per_record` in
//!   the printed figures; the throughput is the clock's). Session 23 found the sync thread
//!   spinning up to 200 µs per round for such appends.
//! * `append_sync_never`: the same records without syncing (memcpy into the mapping).
//! * `read/sequential`: a `LogReader` over a pre-filled log (warm page cache).
//! * `read/random`: `Log::read` at random offsets of the same log.
//! * `recovery/{trusted_seals,verify_all}`: `Log::open` of a log of
//!   `ENTREPOT_BENCH_RECOVERY_BYTES` bytes (default 1 GiB), trusting seals and index files,
//!   or verifying every CRC (`verify_sealed_on_open`). Warm page cache after the first run.
//!
//! Data lives under `CARGO_TARGET_TMPDIR` (the target directory's disk), not `/tmp`.
//! Short run: `cargo bench -p entrepot-storage -- --warm-up-time 1 --measurement-time 2`.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use entrepot_storage::{Log, LogConfig, SyncPolicy};

const RECORD_BYTES: usize = 1024;
const READ_LOG_BYTES: u64 = 256 << 20;
const DEFAULT_RECOVERY_BYTES: u64 = 1 << 30;

fn bench_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temporary directory under the target dir")
}

/// The bench's logs recycle one deleted segment file, as the broker's do
/// (`RECYCLE_SEGMENTS`); `ENTREPOT_BENCH_RECYCLE=0` measures new files for every segment.
fn config(sync: SyncPolicy) -> LogConfig {
    let recycle_segments = std::env::var("ENTREPOT_BENCH_RECYCLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    LogConfig {
        segment_bytes: 64 << 20,
        record_bytes_max: 1 << 20,
        sync,
        recycle_segments,
        ..LogConfig::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Appends `iters` records split over `tasks` tasks, each awaiting durability before its
/// next append; returns the wall time.
fn append_durable(rt: &tokio::runtime::Runtime, log: &Log, tasks: u64, iters: u64) -> Duration {
    let remaining = Arc::new(AtomicU64::new(iters));
    let started = Instant::now();
    rt.block_on(async {
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let log = log.clone();
                let remaining = Arc::clone(&remaining);
                tokio::spawn(async move {
                    let record = [0x5au8; RECORD_BYTES];
                    while remaining
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        log.append(&record)
                            .expect("append")
                            .durable
                            .wait()
                            .await
                            .expect("durable");
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.expect("appender task");
        }
    });
    started.elapsed()
}

/// What the group commit did over every iteration of one bench function (warm-up included).
#[derive(Default)]
struct FlushReport {
    records: u64,
    bytes: u64,
    syncs: u64,
    sync_nanos: u64,
    wall: Duration,
    /// Bytes this process dirtied for the disk (`write_bytes` of `/proc/self/io`: a page
    /// or folio counts whole when dirtied), so write amplification shows on a shared disk.
    dirtied: u64,
    /// Page faults taken by appenders and the sync thread, not the prefault thread (first
    /// touch of a page of the mapping — counted major, the kernel "reads" it — and the
    /// write after a sync made a page read-only).
    faults: u64,
    /// CPU time of the whole process (user + system), every thread.
    cpu: Duration,
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// `write_bytes` of `/proc/self/io`, and the page faults of this process's threads but
/// the logs' prefault threads (`/proc/self/task/*/stat`): the faults appenders and the
/// sync thread take themselves (0 where /proc is missing).
fn io_counters() -> (u64, u64) {
    let dirtied = std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| {
                    l.strip_prefix("write_bytes: ")
                        .map(|v| v.trim().parse().ok())
                })
                .flatten()
        })
        .unwrap_or(0);
    let faults = std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
        .filter_map(|stat| {
            // "tid (comm) state ppid ... minflt cminflt majflt": fields after the comm.
            let (head, rest) = stat.rsplit_once(") ")?;
            if head.contains("(entrepot-prefa") {
                return None;
            }
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let minflt: u64 = fields.get(7)?.parse().ok()?;
            let majflt: u64 = fields.get(9)?.parse().ok()?;
            Some(minflt + majflt)
        })
        .sum();
    (dirtied, faults)
}

impl FlushReport {
    /// Runs `f` and adds the log's counters it moved.
    fn measure(&mut self, log: &Log, f: impl FnOnce() -> Duration) -> Duration {
        let stats = log.stats();
        let before = (
            stats.records_appended.load(Ordering::Relaxed),
            stats.bytes_appended.load(Ordering::Relaxed),
            stats.syncs.load(Ordering::Relaxed),
            stats.sync_nanos_total.load(Ordering::Relaxed),
        );
        let io = io_counters();
        let cpu = cpu_time();
        let took = f();
        self.cpu += cpu_time().saturating_sub(cpu);
        let io_after = io_counters();
        self.dirtied += io_after.0.saturating_sub(io.0);
        self.faults += io_after.1.saturating_sub(io.1);
        self.records += stats.records_appended.load(Ordering::Relaxed) - before.0;
        self.bytes += stats.bytes_appended.load(Ordering::Relaxed) - before.1;
        self.syncs += stats.syncs.load(Ordering::Relaxed) - before.2;
        self.sync_nanos += stats.sync_nanos_total.load(Ordering::Relaxed) - before.3;
        self.wall += took;
        took
    }

    /// Prints the figures on stderr and appends them to `ENTREPOT_BENCH_REPORT`.
    fn print(&self, name: &str) {
        let syncs = self.syncs.max(1) as f64;
        let wall = self.wall.as_secs_f64().max(1e-9);
        let line = format!(
            "bench={name} records={} records_per_flush={:.1} bytes_per_flush={:.0} \
             flushes_per_s={:.0} sync_us_mean={:.0} sync_share={:.2} records_per_s={:.0} \
             dirtied_per_flush={:.0} faults_per_flush={:.1} cpu_us_per_flush={:.0} \
             cpu_us_per_record={:.2}",
            self.records,
            self.records as f64 / syncs,
            self.bytes as f64 / syncs,
            self.syncs as f64 / wall,
            self.sync_nanos as f64 / syncs / 1e3,
            self.sync_nanos as f64 / 1e9 / wall,
            self.records as f64 / wall,
            self.dirtied as f64 / syncs,
            self.faults as f64 / syncs,
            self.cpu.as_secs_f64() * 1e6 / syncs,
            self.cpu.as_secs_f64() * 1e6 / self.records.max(1) as f64,
        );
        eprintln!("group commit: {line}");
        if let Ok(path) = std::env::var("ENTREPOT_BENCH_REPORT") {
            use std::io::Write;
            let appended = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut f| writeln!(f, "{line}"));
            if let Err(e) = appended {
                eprintln!("could not append to {path}: {e}");
            }
        }
    }
}

/// Keeps the bench log from growing without bound between samples.
fn trim(log: &Log) {
    log.purge_before(log.next_offset()).expect("purge");
}

/// One appending shape run `iters` times (records), returning the wall time.
type Shape = Box<dyn Fn(&tokio::runtime::Runtime, &Log, u64) -> Duration>;

/// A group of group-commit benches: each case on a fresh log that syncs always, its
/// group-commit figures printed after it (`FlushReport`).
fn group_commit_group(c: &mut Criterion, group_name: &str, cases: Vec<(String, Shape)>) {
    let rt = runtime();
    let mut group = c.benchmark_group(group_name);
    group.throughput(Throughput::Bytes(RECORD_BYTES as u64));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    for (name, run) in cases {
        let dir = bench_dir();
        let log = Log::open(dir.path(), config(SyncPolicy::Always)).expect("open");
        let mut report = FlushReport::default();
        group.bench_function(BenchmarkId::from_parameter(&name), |b| {
            b.iter_custom(|iters| {
                let took = report.measure(&log, || run(&rt, &log, iters));
                trim(&log);
                took
            })
        });
        if report.records > 0 {
            report.print(&format!("{group_name}/{name}"));
        }
    }
    group.finish();
}

fn append_sync_always(c: &mut Criterion) {
    let cases = [1u64, 8, 64]
        .into_iter()
        .map(|tasks| {
            let run: Shape = Box::new(move |rt: &tokio::runtime::Runtime, log: &Log, iters| {
                append_durable(rt, log, tasks, iters)
            });
            (tasks.to_string(), run)
        })
        .collect();
    group_commit_group(c, "append_sync_always", cases);
}

/// Appenders of the broker's shape: `tasks` tasks each keep up to `in_flight` records
/// appended and not yet durable, and one wake-up of a task (the durable offset passing its
/// oldest record) releases every record of it the sync covered, as a connection drains
/// its pending FIFO (`src/connection/`). Returns the wall time for `iters` records.
fn append_in_flight_run(
    rt: &tokio::runtime::Runtime,
    log: &Log,
    tasks: u64,
    in_flight: usize,
    iters: u64,
) -> Duration {
    let remaining = Arc::new(AtomicU64::new(iters));
    let started = Instant::now();
    rt.block_on(async {
        // Consumers that keep up: every fully durable sealed segment is freed soon after
        // it is sealed, as the broker's reclaim does, so new segments can reuse their
        // files (`LogConfig::recycle_segments`).
        let freeing = {
            let log = log.clone();
            let remaining = Arc::clone(&remaining);
            tokio::spawn(async move {
                while remaining.load(Ordering::Relaxed) > 0 {
                    tokio::time::sleep(Duration::from_millis(RECLAIM_EVERY_MS)).await;
                    log.purge_before(log.durable_offset()).expect("purge");
                }
            })
        };
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let log = log.clone();
                let remaining = Arc::clone(&remaining);
                tokio::spawn(async move {
                    let record = [0x5au8; RECORD_BYTES];
                    let mut durable = log.durable_watch();
                    let mut pending = std::collections::VecDeque::with_capacity(in_flight);
                    loop {
                        while pending.len() < in_flight
                            && remaining
                                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                    n.checked_sub(1)
                                })
                                .is_ok()
                        {
                            pending.push_back(log.append(&record).expect("append").last);
                        }
                        let Some(&oldest) = pending.front() else {
                            break;
                        };
                        let upto = durable
                            .wait_for(|s| s.durable > oldest)
                            .await
                            .expect("durable")
                            .durable;
                        while pending.front().is_some_and(|&o| o < upto) {
                            pending.pop_front();
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.expect("appender task");
        }
        freeing.abort(); // not awaited: its sleep is not the appenders' time
    });
    started.elapsed()
}

/// How often `append_in_flight` frees the segments behind the durable offset.
const RECLAIM_EVERY_MS: u64 = 50;

/// `append_in_flight/{tasks}x{in_flight}`: the broker's shape beside `append_sync_always`'s
/// closed loop of one record per task (issue 15: one wake-up covering many records).
fn append_in_flight(c: &mut Criterion) {
    let cases = [(8u64, 8usize), (8, 64)]
        .into_iter()
        .map(|(tasks, in_flight)| {
            let run: Shape = Box::new(move |rt: &tokio::runtime::Runtime, log: &Log, iters| {
                append_in_flight_run(rt, log, tasks, in_flight, iters)
            });
            (format!("{tasks}x{in_flight}"), run)
        })
        .collect();
    group_commit_group(c, "append_in_flight", cases);
}

/// Appends `iters` records in bursts of `burst`, one burst per millisecond tick, waiting
/// for each burst's durability before the next tick; returns the wall time.
fn append_paced_run(rt: &tokio::runtime::Runtime, log: &Log, burst: u64, iters: u64) -> Duration {
    let started = Instant::now();
    rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let record = [0x5au8; RECORD_BYTES];
        let mut left = iters;
        while left > 0 {
            tick.tick().await;
            let n = burst.min(left);
            left -= n;
            let mut last = None;
            for _ in 0..n {
                last = Some(log.append(&record).expect("append").durable);
            }
            if let Some(durable) = last {
                durable.wait().await.expect("durable");
            }
        }
    });
    started.elapsed()
}

fn append_paced(c: &mut Criterion) {
    let cases = [("10k", 10u64), ("40k", 40)]
        .into_iter()
        .map(|(name, burst)| {
            let run: Shape = Box::new(move |rt: &tokio::runtime::Runtime, log: &Log, iters| {
                append_paced_run(rt, log, burst, iters)
            });
            (name.to_string(), run)
        })
        .collect();
    group_commit_group(c, "append_paced", cases);
}

fn append_sync_never(c: &mut Criterion) {
    let dir = bench_dir();
    let log = Log::open(dir.path(), config(SyncPolicy::Never)).expect("open");
    let record = [0x5au8; RECORD_BYTES];
    let mut group = c.benchmark_group("append_sync_never");
    group.throughput(Throughput::Bytes(RECORD_BYTES as u64));
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("1", |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            for _ in 0..iters {
                log.append(&record).expect("append");
            }
            let took = started.elapsed();
            trim(&log);
            took
        })
    });
    group.finish();
}

/// Records per `append_batch` of [`prefill`].
const PREFILL_BATCH: u64 = 256;

/// How many records [`prefill`] writes for `bytes`: whole batches, at least `bytes`.
fn prefill_count(bytes: u64) -> u64 {
    bytes
        .div_ceil(RECORD_BYTES as u64)
        .next_multiple_of(PREFILL_BATCH)
}

/// Fills a log in `dir` with about `bytes` of 1 KiB records and closes it (synced).
fn prefill(dir: &Path, bytes: u64, config: LogConfig) -> u64 {
    let log = Log::open(dir, config).expect("open");
    let batch: Vec<[u8; RECORD_BYTES]> = (0..PREFILL_BATCH)
        .map(|i| [i as u8; RECORD_BYTES])
        .collect();
    while log.next_offset() < prefill_count(bytes) {
        log.append_batch(&batch).expect("append");
    }
    log.flush().expect("flush");
    log.next_offset()
}

/// The read benches' log, filled on first use: a run filtered to other benches (such as
/// `benches/disk-limit.sh`'s) neither waits for nor writes its 256 MiB, which would also
/// load the disk that fio measures next.
struct ReadLog {
    dir: tempfile::TempDir,
    log: Log,
}

fn reads(c: &mut Criterion) {
    let count = prefill_count(READ_LOG_BYTES);
    let state: std::cell::OnceCell<ReadLog> = std::cell::OnceCell::new();
    let read_log = || {
        state.get_or_init(|| {
            let dir = bench_dir();
            let filled = prefill(dir.path(), READ_LOG_BYTES, config(SyncPolicy::Never));
            assert_eq!(filled, count);
            let log = Log::open(dir.path(), config(SyncPolicy::Never)).expect("open");
            ReadLog { dir, log }
        })
    };
    let mut group = c.benchmark_group("read");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Bytes(count * RECORD_BYTES as u64));
    group.bench_function("sequential", |b| {
        let log = &read_log().log;
        b.iter(|| {
            let mut bytes = 0usize;
            for record in log.reader(0) {
                bytes += record.expect("read").payload.len();
            }
            assert_eq!(bytes as u64, count * RECORD_BYTES as u64);
        })
    });
    group.throughput(Throughput::Bytes(RECORD_BYTES as u64));
    let mut x = 0x2545_f491_4f6c_dd1du64;
    group.bench_function("random", |b| {
        let log = &read_log().log;
        b.iter(|| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            log.read(x % count).expect("read").payload.len()
        })
    });
    group.finish();
    if let Some(filled) = state.into_inner() {
        drop(filled.log);
        drop(filled.dir);
    }
}

fn recovery(c: &mut Criterion) {
    let bytes = std::env::var("ENTREPOT_BENCH_RECOVERY_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_RECOVERY_BYTES);
    let count = prefill_count(bytes);
    let write_config = LogConfig {
        segment_bytes: 128 << 20,
        ..config(SyncPolicy::Always)
    };
    // Filled on first use, like the read benches' log. The last segment is left partly
    // filled and unsealed, so recovery scans a real tail.
    let state: std::cell::OnceCell<tempfile::TempDir> = std::cell::OnceCell::new();
    let filled_dir = || {
        state.get_or_init(|| {
            let dir = bench_dir();
            assert_eq!(prefill(dir.path(), bytes, write_config.clone()), count);
            dir
        })
    };
    let mut group = c.benchmark_group("recovery");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Bytes(count * RECORD_BYTES as u64));
    for (name, verify) in [("trusted_seals", false), ("verify_all", true)] {
        let open_config = LogConfig {
            verify_sealed_on_open: verify,
            sync: SyncPolicy::Never,
            ..write_config.clone()
        };
        group.bench_function(name, |b| {
            let dir = filled_dir().path();
            b.iter(|| {
                let log = Log::open(dir, open_config.clone()).expect("recover");
                assert_eq!(log.next_offset(), count);
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    append_sync_always,
    append_in_flight,
    append_paced,
    append_sync_never,
    reads,
    recovery
);
criterion_main!(benches);
