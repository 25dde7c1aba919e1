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

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod support;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fe2o3_amqp::{Receiver, Sender, Session};

/// Messages per criterion iteration.
const BATCH: u64 = 2000;
/// Unsettled deliveries each producer keeps in flight.
const WINDOW: usize = 64;
const BODY_BYTES: usize = 1024;

struct Bench {
    rt: tokio::runtime::Runtime,
    url: String,
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
    let url = format!("amqp://{}", node.amqp);
    Bench {
        rt,
        url,
        _node: node,
        latencies: Arc::new(Mutex::new(Vec::new())),
    }
}

async fn connect(url: &str, id: &str) -> fe2o3_amqp::connection::ConnectionHandle<()> {
    support::connect(url.trim_start_matches("amqp://").parse().expect("addr"), id).await
}

async fn produce(url: String, queue: String, count: u64, latencies: Arc<Mutex<Vec<u32>>>) {
    let mut conn = connect(&url, "bench-producer").await;
    let mut session = Session::begin(&mut conn).await.expect("begin");
    let mut sender = Sender::attach(&mut session, "p", queue)
        .await
        .expect("attach");
    let body = vec![0x5au8; BODY_BYTES];
    let mut inflight = VecDeque::with_capacity(WINDOW);
    let mut lat = Vec::with_capacity(count as usize);
    for _ in 0..count {
        if inflight.len() >= WINDOW {
            let (t, fut): (Instant, _) = inflight.pop_front().expect("inflight");
            let outcome: Result<fe2o3_amqp::types::messaging::Outcome, _> = fut.await;
            outcome
                .expect("outcome")
                .accepted_or_else(|o| o)
                .expect("accepted");
            lat.push(t.elapsed().as_micros() as u32);
        }
        let msg = fe2o3_amqp::types::messaging::Message::builder()
            .header(fe2o3_amqp::types::messaging::Header {
                durable: true,
                ..Default::default()
            })
            .data(fe2o3_amqp::types::primitives::Binary::from(body.clone()))
            .build();
        let fut = sender.send_batchable(msg).await.expect("send");
        inflight.push_back((Instant::now(), fut));
    }
    for (t, fut) in inflight {
        fut.await
            .expect("outcome")
            .accepted_or_else(|o| o)
            .expect("accepted");
        lat.push(t.elapsed().as_micros() as u32);
    }
    latencies.lock().expect("lat").extend(lat);
    sender.close().await.ok();
    session.end().await.ok();
    conn.close().await.ok();
}

async fn consume(url: String, queue: String, count: u64) {
    let mut conn = connect(&url, "bench-consumer").await;
    let mut session = Session::begin(&mut conn).await.expect("begin");
    let credit: u32 = std::env::var("ENTREPOT_BENCH_CREDIT")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(1000);
    let mut receiver = Receiver::builder()
        .name("c")
        .source(queue)
        .credit_mode(fe2o3_amqp::link::receiver::CreditMode::Auto(credit))
        .attach(&mut session)
        .await
        .expect("attach");
    for _ in 0..count {
        let d = receiver
            .recv::<fe2o3_amqp::types::messaging::Body<fe2o3_amqp::types::primitives::Value>>()
            .await
            .expect("recv");
        receiver.accept(&d).await.expect("accept");
    }
    receiver.close().await.ok();
    session.end().await.ok();
    conn.close().await.ok();
}

fn run(b: &Bench, producers: u64, consumers: u64, iters: u64, round: u64) -> Duration {
    let total = BATCH * iters;
    let queue = format!("bench-{producers}x{consumers}-{round}");
    b.rt.block_on(async {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..consumers {
            tasks.push(tokio::spawn(consume(
                b.url.clone(),
                queue.clone(),
                total / consumers,
            )));
        }
        for _ in 0..producers {
            tasks.push(tokio::spawn(produce(
                b.url.clone(),
                queue.clone(),
                total / producers,
                Arc::clone(&b.latencies),
            )));
        }
        for t in tasks {
            t.await.expect("task");
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
