//! Topic fan-out: one producer, N durable subscribers, persistent 1 KiB messages.
//!
//! The broker runs in-process (real TCP on 127.0.0.1, real files with sync `always` in a
//! directory under `target/`). Each case creates N durable subscriptions of its own topic
//! (durable source, expiry-policy `never`, `topic` capability), one fe2o3-amqp connection
//! per subscriber with link credit 1000, attached once before measuring; an iteration then
//! publishes `msgs` messages (up to `WINDOW` unsettled in flight, each waited for until
//! `accepted`) while every subscriber receives and accepts all of them. Criterion reports
//! delivered messages per second: `Throughput::Elements(msgs × N)`. N = 100 publishes fewer
//! messages per iteration so one iteration stays well under a second.
//!
//! # Allocations per delivered message
//!
//! A counting `#[global_allocator]` (`benches/support/counting.rs`, wrapping `System`) counts every `alloc`,
//! `alloc_zeroed` and `realloc` call — frees are not counted — and attributes it to the
//! thread that made it. Broker and clients run on two separate tokio runtimes: the
//! broker's threads (workers and blocking pool) mark themselves `broker` from
//! `on_thread_start`, the clients' runtime threads and the main thread mark themselves
//! `client`. A thread that never marked itself is one the broker started on its own (the
//! store's `entrepot-sync` group-commit thread) and counts as broker. So the broker figure
//! is exactly what the broker's code allocated while the iterations ran (publish path,
//! fan-out, delivery, dispositions, ack-log appends, housekeeping timers), divided by the
//! deliveries made; no baseline subtraction is involved. Not counted: allocations made
//! before a thread ran its start hook (thread creation only), and an iteration's last
//! dispositions still in flight when it ends (they land in the next iteration's count).
//! The client figure is printed for context; fe2o3-amqp dominates it.
//!
//! Note: the clients share the machine's cores with the broker and are the heavier side,
//! so msgs/s is a floor of what the broker can do.

use std::time::{Duration, Instant};

mod support;

use support::counting::{mark, Allocs, Counting, Role};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::types::messaging::{Body, Source, TerminusDurability, TerminusExpiryPolicy};
use fe2o3_amqp::types::primitives::{Symbol, Value};
use fe2o3_amqp::{Receiver, Sender, Session};

const BODY_BYTES: usize = 1024;
/// Unsettled deliveries the producer keeps in flight.
const WINDOW: usize = 64;
/// Link credit of every subscriber (fe2o3-amqp's default 200 stalls its receiver).
const CREDIT: u32 = 1000;
/// Longest one iteration may take before the bench gives up.
const ITERATION_TIMEOUT: Duration = Duration::from_secs(120);
/// (subscribers, messages published per iteration).
const CASES: [(usize, u64); 3] = [(1, 2000), (10, 500), (100, 50)];

#[global_allocator]
static ALLOC: Counting = Counting;

// ---------------------------------------------------------------------------------------
// Broker and clients

struct Bench {
    broker_rt: tokio::runtime::Runtime,
    client_rt: tokio::runtime::Runtime,
    url: String,
    _node: support::BenchNode,
}

fn runtime(name: &str, role: Role) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .on_thread_start(move || mark(role))
        .enable_all()
        .build()
        .expect("runtime")
}

fn start() -> Bench {
    mark(Role::Client);
    let broker_rt = runtime("broker", Role::Broker);
    let client_rt = runtime("client", Role::Client);
    let node = support::start_node(&broker_rt, "always");
    let url = format!("amqp://{}", node.amqp);
    Bench {
        broker_rt,
        client_rt,
        url,
        _node: node,
    }
}

type Conn = fe2o3_amqp::connection::ConnectionHandle<()>;
type Sess = fe2o3_amqp::session::SessionHandle<()>;

/// Opens a client connection (TCP_NODELAY) and a session.
async fn connect(url: &str, id: &str) -> (Conn, Sess) {
    let addr = url.trim_start_matches("amqp://").parse().expect("addr");
    let mut conn = support::connect(addr, id).await;
    let session = Session::begin(&mut conn).await.expect("begin");
    (conn, session)
}

/// One case's clients: the producer and N attached durable subscribers.
struct Fanout {
    msgs: u64,
    producer: Option<Sender>,
    receivers: Vec<Receiver>,
    connections: Vec<(Conn, Sess)>,
}

async fn setup(url: &str, subscribers: usize, msgs: u64) -> Fanout {
    let topic = format!("topic.fanout.{subscribers}");
    let mut connections = Vec::with_capacity(subscribers + 1);
    let mut receivers = Vec::with_capacity(subscribers);
    for i in 0..subscribers {
        let (conn, mut session) = connect(url, &format!("fanout-{subscribers}-sub-{i}")).await;
        let source = Source::builder()
            .address(topic.clone())
            .durable(TerminusDurability::UnsettledState)
            .expiry_policy(TerminusExpiryPolicy::Never)
            .capabilities(vec![Symbol::from("topic")])
            .build();
        let receiver = Receiver::builder()
            .name(format!("sub-{i}"))
            .source(source)
            .credit_mode(CreditMode::Auto(CREDIT))
            .attach(&mut session)
            .await
            .expect("attach subscriber");
        receivers.push(receiver);
        connections.push((conn, session));
    }
    let (conn, mut session) = connect(url, &format!("fanout-{subscribers}-producer")).await;
    let producer = Sender::attach(&mut session, "producer", topic)
        .await
        .expect("attach producer");
    connections.push((conn, session));
    Fanout {
        msgs,
        producer: Some(producer),
        receivers,
        connections,
    }
}

/// Closes every link (deleting the durable subscriptions) and connection.
async fn teardown(f: Fanout) {
    for r in f.receivers {
        r.close().await.expect("close subscriber");
    }
    if let Some(p) = f.producer {
        p.close().await.ok();
    }
    for (mut conn, mut session) in f.connections {
        session.end().await.ok();
        conn.close().await.ok();
    }
}

async fn produce(mut sender: Sender, count: u64) -> Sender {
    support::send_window(&mut sender, count, BODY_BYTES, WINDOW).await;
    sender
}

async fn consume(mut receiver: Receiver, count: u64) -> Receiver {
    for _ in 0..count {
        let d = receiver.recv::<Body<Value>>().await.expect("recv");
        receiver.accept(&d).await.expect("accept");
    }
    receiver
}

/// One iteration of `iters` batches: publish and fan out, until every subscriber accepted
/// every message.
async fn run(f: &mut Fanout, iters: u64) -> Duration {
    let count = f.msgs * iters;
    let started = Instant::now();
    let consumers: Vec<_> = f
        .receivers
        .drain(..)
        .map(|r| tokio::spawn(consume(r, count)))
        .collect();
    let producer = tokio::spawn(produce(f.producer.take().expect("producer"), count));
    let work = async {
        let producer = producer.await.expect("producer task");
        let mut receivers = Vec::with_capacity(consumers.len());
        for c in consumers {
            receivers.push(c.await.expect("consumer task"));
        }
        (producer, receivers)
    };
    let (producer, receivers) = tokio::time::timeout(ITERATION_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| panic!("fan-out of {count} messages did not finish in time"));
    let elapsed = started.elapsed();
    f.producer = Some(producer);
    f.receivers = receivers;
    elapsed
}

fn fanout(c: &mut Criterion) {
    let bench = start();
    let mut group = c.benchmark_group("topic_fanout_durable_persistent_1k");
    for (subscribers, msgs) in CASES {
        let mut f = bench
            .client_rt
            .block_on(setup(&bench.url, subscribers, msgs));
        group.throughput(Throughput::Elements(msgs * subscribers as u64));
        let mut allocs = Allocs::default();
        let mut published = 0u64;
        group.bench_function(format!("{subscribers}_subscribers"), |b| {
            b.iter_custom(|iters| {
                let before = Allocs::now();
                let took = bench.client_rt.block_on(run(&mut f, iters));
                let spent = Allocs::now().since(&before);
                allocs.broker += spent.broker;
                allocs.client += spent.client;
                published += msgs * iters;
                took
            })
        });
        report(subscribers, published, allocs);
        bench.client_rt.block_on(teardown(f));
    }
    group.finish();
    // The broker's runtime must outlive every client; drop it last.
    drop(bench.client_rt);
    drop(bench.broker_rt);
}

fn report(subscribers: usize, published: u64, allocs: Allocs) {
    let delivered = published * subscribers as u64;
    if delivered == 0 {
        return;
    }
    println!(
        "{subscribers} subscribers: {published} published, {delivered} delivered; allocations \
         per delivered message: broker {:.1}, clients {:.1} (broker per published message {:.1})",
        allocs.broker as f64 / delivered as f64,
        allocs.client as f64 / delivered as f64,
        allocs.broker as f64 / published as f64,
    );
}

criterion_group! {
    name = benches;
    // Set here rather than on the group so `--warm-up-time`/`--measurement-time` on the
    // command line still override them.
    config = Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(15))
        .warm_up_time(Duration::from_secs(2));
    targets = fanout
}
criterion_main!(benches);
