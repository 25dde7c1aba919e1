//! Persistent 1 KiB send-and-receive through the real server over loopback.
//!
//! The broker runs in-process (same binary code, real TCP on 127.0.0.1, real files with
//! sync `always` in a directory under `target/`), driven by fe2o3-amqp clients: P
//! producers each keep `WINDOW` unsettled deliveries in flight; C consumers accept every
//! message with link credit 1000 (`ENTREPOT_BENCH_CREDIT`; fe2o3-amqp's default 200 stalls
//! its receiver). Criterion measures messages per second; the bench also prints the p50/p99 of
//! send→accepted latency it saw, since criterion reports means only.
//!
//! Note: client and broker share this machine's cores, and fe2o3-amqp's client is the
//! heavier side; see `benches/RESULTS.md` (when present) for context.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod support;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Messages per criterion iteration.
const BATCH: u64 = 2000;
/// Unsettled deliveries each producer keeps in flight.
const WINDOW: usize = 64;
const BODY_BYTES: usize = 1024;

struct Bench {
    rt: tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
    _node: support::BenchNode,
    latencies: Arc<Mutex<Vec<u32>>>,
}

fn start() -> Bench {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let node = support::start_node(&rt, "always");
    Bench {
        rt,
        addr: node.amqp,
        _node: node,
        latencies: Arc::new(Mutex::new(Vec::new())),
    }
}

/// Link credit of each consumer: `ENTREPOT_BENCH_CREDIT`, default 1000.
fn credit() -> u32 {
    std::env::var("ENTREPOT_BENCH_CREDIT")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(1000)
}

fn run(b: &Bench, producers: u64, consumers: u64, iters: u64, round: u64) -> Duration {
    let total = BATCH * iters;
    let queue = format!("bench-{producers}x{consumers}-{round}");
    b.rt.block_on(async {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..consumers {
            tasks.push(tokio::spawn(support::consume(
                b.addr,
                queue.clone(),
                total / consumers,
                credit(),
            )));
        }
        let mut producing = Vec::new();
        for _ in 0..producers {
            producing.push(tokio::spawn(support::produce(
                b.addr,
                queue.clone(),
                total / producers,
                BODY_BYTES,
                WINDOW,
            )));
        }
        for t in producing {
            let lat = t.await.expect("producer");
            b.latencies.lock().expect("lat").extend(lat);
        }
        for t in tasks {
            t.await.expect("consumer");
        }
        started.elapsed()
    })
}

fn report(name: &str, latencies: &Mutex<Vec<u32>>) {
    let mut l = latencies.lock().expect("lat");
    if l.is_empty() {
        return;
    }
    l.sort_unstable();
    let p = |q: f64| l[((l.len() as f64 * q) as usize).min(l.len() - 1)];
    println!(
        "{name}: send->accepted latency over {} messages: p50 {} us, p99 {} us, max {} us",
        l.len(),
        p(0.5),
        p(0.99),
        l[l.len() - 1]
    );
    l.clear();
}

fn roundtrip(c: &mut Criterion) {
    let bench = start();
    let mut group = c.benchmark_group("broker_roundtrip_persistent_1k");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(15))
        .warm_up_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements(BATCH));
    // ENTREPOT_BENCH_CASES="1x1,8x8" picks producer x consumer cases (0 consumers: send only).
    let cases: Vec<(u64, u64)> = std::env::var("ENTREPOT_BENCH_CASES")
        .unwrap_or_else(|_| "1x1,8x8".into())
        .split(',')
        .filter_map(|c| {
            c.split_once('x')
                .and_then(|(p, c)| Some((p.trim().parse().ok()?, c.trim().parse().ok()?)))
        })
        .collect();
    for (p, cons) in cases {
        let mut round = 0;
        group.bench_function(format!("{p}p_{cons}c"), |bn| {
            bn.iter_custom(|iters| {
                round += 1;
                run(&bench, p, cons, iters, round)
            })
        });
        report(&format!("{p}p_{cons}c"), &bench.latencies);
    }
    group.finish();
}

criterion_group!(benches, roundtrip);
criterion_main!(benches);
