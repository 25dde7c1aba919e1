//! Heap allocations and CPU time per message on the broker's hot path, through the real
//! server over loopback: persistent 1 KiB messages produced (window 64 unsettled), then
//! consumed (credit 1000, each accepted), then both at once.
//!
//! A counting global allocator (`benches/support/counting.rs`) tells the broker's
//! allocations from the client's: the
//! fe2o3-amqp clients run on a thread of their own (a current-thread runtime) that counts
//! into its own counter, so what is left is the broker — connection tasks, queues, the
//! store and its sync thread. CPU time is the whole process's (`getrusage`) minus the
//! client thread's (`CLOCK_THREAD_CPUTIME_ID`). Sync policy `never`: the figures are the
//! CPU path, not the disk's.
//!
//! Run `cargo bench --bench allocations` for the figures (also a criterion measurement of
//! the produce+consume round); in `cargo test --bench allocations` (CI) one round runs and
//! the broker must stay under [`MAX_ALLOCS_PER_MESSAGE`] (and producing alone under
//! [`MAX_PRODUCE_ALLOCS_PER_MESSAGE`]) — a regression guard, so an allocation added per
//! message on the hot path fails CI instead of hiding in the noise.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

mod support;

use support::counting::{mark, Allocs, Counting, Role};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Messages per phase.
const MESSAGES: u64 = 5_000;
const BODY_BYTES: usize = 1024;
/// Unsettled deliveries the producer keeps in flight.
const WINDOW: usize = 64;
/// Link credit of the consumer.
const CREDIT: u32 = 1000;
/// The guard: broker heap allocations per message, produce and consume together (measured
/// 2026-12-03: 3.2 producing, 1.1 consuming, 4.0 both at once; see benches/RESULTS.md).
const MAX_ALLOCS_PER_MESSAGE: f64 = 6.0;
/// The guard of the produce phase alone: 2.0–2.2 measured 2026-12-04 once the list of a
/// message's parts no longer goes on the heap (src/connection/link.rs `store_message`);
/// 3.0 with it (the build before, same run), which this bound fails.
const MAX_PRODUCE_ALLOCS_PER_MESSAGE: f64 = 2.7;

#[global_allocator]
static GLOBAL: Counting = Counting;

/// CPU time of the whole process so far.
fn process_cpu() -> Duration {
    cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// CPU time of the calling thread so far.
fn thread_cpu() -> Duration {
    cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn cpu_clock(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec at a valid pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// What the broker spent on one phase.
#[derive(Debug, Clone, Copy)]
struct Spent {
    allocs: u64,
    bytes: u64,
    cpu: Duration,
    wall: Duration,
}

impl Spent {
    fn per_message(&self, n: u64) -> (f64, f64, f64) {
        let n = n as f64;
        (
            self.allocs as f64 / n,
            self.bytes as f64 / n,
            self.cpu.as_secs_f64() * 1e6 / n,
        )
    }
}

/// The client side: a thread with a current-thread runtime whose allocations and CPU
/// time are counted apart from the broker's.
struct Client;

impl Client {
    /// Runs `work` on a fresh client thread; returns what the broker spent meanwhile.
    fn measure<F, Fut>(addr: SocketAddr, work: F) -> Spent
    where
        F: FnOnce(SocketAddr) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let allocs0 = Allocs::now();
        let cpu0 = process_cpu();
        let started = Instant::now();
        let client_cpu = std::thread::spawn(move || {
            mark(Role::Client);
            let before = thread_cpu();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("client runtime");
            rt.block_on(work(addr));
            drop(rt);
            thread_cpu() - before
        })
        .join()
        .expect("client thread");
        let wall = started.elapsed();
        let counted = Allocs::now().since(&allocs0);
        Spent {
            allocs: counted.broker,
            bytes: counted.broker_bytes,
            cpu: (process_cpu() - cpu0).saturating_sub(client_cpu),
            wall,
        }
    }
}

/// The producer's part of a phase (the latencies it returns are not needed here).
async fn produce(addr: SocketAddr, queue: String, n: u64) {
    support::produce(addr, queue, n, BODY_BYTES, WINDOW).await;
}

async fn consume(addr: SocketAddr, queue: String, n: u64) {
    support::consume(addr, queue, n, CREDIT).await;
}

/// One round: produce-only, consume-only (the backlog just made), then both at once.
fn round(addr: SocketAddr, tag: &str) -> [(&'static str, Spent); 3] {
    let q = format!("alloc-{tag}");
    let (q1, q2) = (q.clone(), q.clone());
    let produced = Client::measure(addr, move |a| produce(a, q1, MESSAGES));
    let consumed = Client::measure(addr, move |a| consume(a, q2, MESSAGES));
    let q3 = format!("{q}-both");
    let both = Client::measure(addr, move |a| async move {
        let c = tokio::spawn(consume(a, q3.clone(), MESSAGES));
        produce(a, q3, MESSAGES).await;
        c.await.expect("consumer");
    });
    [("produce", produced), ("consume", consumed), ("both", both)]
}

fn report(spent: &[(&str, Spent)]) {
    for (phase, s) in spent {
        let (a, b, cpu) = s.per_message(MESSAGES);
        println!(
            "allocations {phase:>7}: {a:6.1} allocs/msg {b:8.0} B/msg, broker cpu {cpu:6.2} us/msg, {:.0} msg/s",
            MESSAGES as f64 / s.wall.as_secs_f64()
        );
    }
}

fn allocations(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let node = support::start_node(&rt, "never");
    let addr = node.amqp;
    // Warm up (first connections, segment creation), then the measured round.
    round(addr, "warmup");
    let spent = round(addr, "measured");
    report(&spent);
    let produced = spent[0].1.allocs as f64 / MESSAGES as f64;
    assert!(
        produced <= MAX_PRODUCE_ALLOCS_PER_MESSAGE,
        "broker allocations per produced message {produced:.1} exceed MAX_PRODUCE_ALLOCS_PER_MESSAGE ({MAX_PRODUCE_ALLOCS_PER_MESSAGE})"
    );
    let both = spent[2].1;
    let per_message = both.allocs as f64 / MESSAGES as f64;
    assert!(
        per_message <= MAX_ALLOCS_PER_MESSAGE,
        "broker allocations per message (produce+consume) {per_message:.1} exceed MAX_ALLOCS_PER_MESSAGE ({MAX_ALLOCS_PER_MESSAGE})"
    );
    let mut group = c.benchmark_group("broker_hot_path_1k_sync_never");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(MESSAGES));
    let mut n = 0u64;
    group.bench_function("produce_and_consume", |b| {
        b.iter_custom(|iters| {
            let mut wall = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let q = format!("alloc-crit-{n}");
                wall += Client::measure(addr, move |a| async move {
                    let c = tokio::spawn(consume(a, q.clone(), MESSAGES));
                    produce(a, q, MESSAGES).await;
                    c.await.expect("consumer");
                })
                .wall;
            }
            wall
        })
    });
    group.finish();
}

criterion_group!(benches, allocations);
criterion_main!(benches);
