//! Our connection engine against fe2o3-amqp's own acceptor, on the same workload and the
//! same client.
//!
//! Both servers run in this process on one 2-worker tokio runtime, over TCP_NODELAY
//! sockets on 127.0.0.1, driven by the same fe2o3-amqp 0.18 client:
//!
//! * `send`: one producer sends `BATCH` unsettled 1 KiB messages with `WINDOW` in flight
//!   (`send_batchable`); the server accepts every one.
//! * `receive`: the server sends `BATCH` unsettled 1 KiB messages to one consumer with
//!   credit 1000, which accepts every one.
//!
//! Only the message flow is timed (first send → last outcome, or first → last receive);
//! connecting, attaching, closing and (for `receive`) filling the Entrepot queue are not.
//!
//! To compare engines, not storage, neither server makes anything durable: Entrepot runs
//! with `sync: never` (it still appends each message to its log in the page cache and
//! records acknowledgements — work the fe2o3 server does not do, so the ratio slightly
//! flatters fe2o3), and the fe2o3 server keeps nothing: it decodes each message, accepts
//! it and drops it, and for `receive` encodes one prepared message `BATCH` times. The
//! fe2o3 acceptor's receivers use its default credit (200, refilled automatically);
//! Entrepot grants 1000. With 64 in flight neither limits the producer.
//!
//! Criterion prints time per batch and throughput; the bench also prints msgs/s for both
//! servers and the ratio once each case has been measured.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod support;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fe2o3_amqp::acceptor::{ConnectionAcceptor, LinkAcceptor, LinkEndpoint, SessionAcceptor};
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::types::messaging::{Body, Data, Header, Message, Outcome};
use fe2o3_amqp::types::primitives::{Binary, Value};
use fe2o3_amqp::{Receiver, Sender, Session};
use tokio::net::{TcpListener, TcpStream};

/// Messages per criterion iteration.
const BATCH: u64 = 2000;
/// Unsettled deliveries the producer keeps in flight.
const WINDOW: usize = 64;
/// Link credit the consumer grants (as in `benches/roundtrip.rs`).
const CONSUMER_CREDIT: u32 = 1000;
const BODY_BYTES: usize = 1024;
/// Longest an untimed close may take before the bench moves on.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Source address prefix telling the fe2o3 server how many messages to send: `gen/<n>`.
const GEN_PREFIX: &str = "gen/";

/// Which server a case runs against.
#[derive(Clone, Copy, PartialEq)]
enum Server {
    Entrepot,
    Fe2o3,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Entrepot => "entrepot",
            Server::Fe2o3 => "fe2o3_acceptor",
        }
    }
}

struct Bench {
    rt: tokio::runtime::Runtime,
    entrepot: SocketAddr,
    fe2o3: SocketAddr,
    _node: support::BenchNode,
}

fn start() -> Bench {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let node = support::start_node(&rt, "never");
    let entrepot = node.amqp;
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
    let fe2o3 = listener.local_addr().expect("addr");
    rt.spawn(fe2o3_server(listener));
    Bench {
        rt,
        entrepot,
        fe2o3,
        _node: node,
    }
}

// ---- the fe2o3-amqp acceptor server ----

async fn fe2o3_server(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        stream.set_nodelay(true).expect("nodelay");
        tokio::spawn(fe2o3_connection(stream));
    }
}

async fn fe2o3_connection(stream: TcpStream) {
    let acceptor = ConnectionAcceptor::new("fe2o3-acceptor");
    let Ok(mut connection) = acceptor.accept(stream).await else {
        return;
    };
    let sessions = SessionAcceptor::new();
    while let Ok(session) = sessions.accept(&mut connection).await {
        tokio::spawn(fe2o3_session(session));
    }
    let _ = connection.on_close().await;
}

async fn fe2o3_session(mut session: fe2o3_amqp::acceptor::ListenerSessionHandle) {
    let links = LinkAcceptor::new();
    while let Ok(link) = links.accept(&mut session).await {
        match link {
            LinkEndpoint::Receiver(r) => tokio::spawn(fe2o3_accept_all(r)),
            LinkEndpoint::Sender(s) => tokio::spawn(fe2o3_generate(s)),
        };
    }
    let _ = session.on_end().await;
}

/// Receives, accepts and drops every message until the client detaches.
async fn fe2o3_accept_all(mut receiver: Receiver) {
    while let Ok(d) = receiver.recv::<Body<Value>>().await {
        if receiver.accept(&d).await.is_err() {
            break;
        }
    }
    let _ = receiver.close().await;
}

/// Sends as many messages as the source address `gen/<n>` asks for, up to the consumer's
/// credit unsettled, then waits for the client to detach.
async fn fe2o3_generate(mut sender: Sender) {
    let count: u64 = sender
        .source()
        .as_ref()
        .and_then(|s| s.address.as_deref())
        .and_then(|a| a.strip_prefix(GEN_PREFIX))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let msg = message();
    let mut inflight = VecDeque::new();
    for _ in 0..count {
        if inflight.len() >= CONSUMER_CREDIT as usize {
            let fut = inflight.pop_front().expect("inflight");
            let outcome: Result<Outcome, _> = fut.await;
            if outcome.is_err() {
                return;
            }
        }
        match sender.send_batchable(msg.clone()).await {
            Ok(fut) => inflight.push_back(fut),
            Err(_) => return,
        }
    }
    for fut in inflight {
        let _: Result<Outcome, _> = fut.await;
    }
    let _ = sender.on_detach().await;
    let _ = sender.close().await;
}

// ---- the client side, the same for both servers ----

fn message() -> Message<Data> {
    Message::builder()
        .header(Header {
            durable: true,
            ..Default::default()
        })
        .data(Binary::from(vec![0x5au8; BODY_BYTES]))
        .build()
}

async fn connect(addr: SocketAddr, id: &str) -> ConnectionHandle<()> {
    support::connect(addr, id).await
}

/// Sends `count` messages with `WINDOW` in flight; returns the time from the first send
/// to the last `accepted`.
async fn produce(addr: SocketAddr, queue: &str, count: u64) -> Duration {
    let mut conn = connect(addr, "bench-producer").await;
    let mut session = Session::begin(&mut conn).await.expect("begin");
    let mut sender = Sender::attach(&mut session, "p", queue)
        .await
        .expect("attach");
    let msg = message();
    let mut inflight = VecDeque::with_capacity(WINDOW);
    let started = Instant::now();
    for _ in 0..count {
        if inflight.len() >= WINDOW {
            let fut = inflight.pop_front().expect("inflight");
            expect_accepted(fut.await);
        }
        inflight.push_back(sender.send_batchable(msg.clone()).await.expect("send"));
    }
    for fut in inflight {
        expect_accepted(fut.await);
    }
    let elapsed = started.elapsed();
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        sender.close().await.ok();
        session.end().await.ok();
        conn.close().await.ok();
    })
    .await;
    elapsed
}

fn expect_accepted(outcome: Result<Outcome, fe2o3_amqp::link::SendError>) {
    outcome
        .expect("outcome")
        .accepted_or_else(|o| o)
        .expect("accepted");
}

/// Receives and accepts `count` messages from `source`; returns the time from the first
/// to the last receive.
async fn consume(addr: SocketAddr, source: &str, count: u64) -> Duration {
    let mut conn = connect(addr, "bench-consumer").await;
    let mut session = Session::begin(&mut conn).await.expect("begin");
    let mut receiver = Receiver::builder()
        .name("c")
        .source(source)
        .credit_mode(CreditMode::Auto(CONSUMER_CREDIT))
        .attach(&mut session)
        .await
        .expect("attach");
    let mut started = None;
    for _ in 0..count {
        let d = receiver.recv::<Body<Value>>().await.expect("recv");
        started.get_or_insert_with(Instant::now);
        receiver.accept(&d).await.expect("accept");
    }
    let elapsed = started.map_or(Duration::ZERO, |s| s.elapsed());
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        receiver.close().await.ok();
        session.end().await.ok();
        conn.close().await.ok();
    })
    .await;
    elapsed
}

fn run_send(b: &Bench, server: Server, iters: u64, round: u64) -> Duration {
    let total = BATCH * iters;
    let addr = match server {
        Server::Entrepot => b.entrepot,
        Server::Fe2o3 => b.fe2o3,
    };
    b.rt.block_on(produce(addr, &format!("send-{round}"), total))
}

fn run_receive(b: &Bench, server: Server, iters: u64, round: u64) -> Duration {
    let total = BATCH * iters;
    b.rt.block_on(async {
        match server {
            Server::Entrepot => {
                // Fill the queue first (untimed); the consumer then drains it.
                let queue = format!("receive-{round}");
                produce(b.entrepot, &queue, total).await;
                consume(b.entrepot, &queue, total).await
            }
            Server::Fe2o3 => consume(b.fe2o3, &format!("{GEN_PREFIX}{total}"), total).await,
        }
    })
}

/// One case: runs `iters` batches against a server in round `round`, returns the time.
type Run = fn(&Bench, Server, u64, u64) -> Duration;

/// Messages per second each server reached in each case, for the closing comparison.
type Rates = Mutex<Vec<(String, Server, f64)>>;

fn engine_vs_fe2o3(c: &mut Criterion) {
    let bench = start();
    let rates: Arc<Rates> = Arc::default();
    let mut group = c.benchmark_group("engine_vs_fe2o3_1k");
    group.sample_size(10);
    group.throughput(Throughput::Elements(BATCH));
    let cases: [(&str, Run); 2] = [("send", run_send), ("receive", run_receive)];
    let mut round = 0;
    for (case, run) in cases {
        for server in [Server::Entrepot, Server::Fe2o3] {
            let (mut msgs, mut secs) = (0u64, 0f64);
            group.bench_function(format!("{case}/{}", server.name()), |bn| {
                bn.iter_custom(|iters| {
                    round += 1;
                    let took = run(&bench, server, iters, round);
                    msgs += BATCH * iters;
                    secs += took.as_secs_f64();
                    took
                })
            });
            let rate = msgs as f64 / secs.max(f64::EPSILON);
            rates
                .lock()
                .expect("rates")
                .push((case.to_owned(), server, rate));
        }
    }
    group.finish();
    report(&rates.lock().expect("rates"));
}

fn report(rates: &[(String, Server, f64)]) {
    println!("\nengine_vs_fe2o3 (1 KiB, mean over warm-up and measurement):");
    for case in ["send", "receive"] {
        let rate = |s: Server| {
            rates
                .iter()
                .find(|(c, srv, _)| c == case && *srv == s)
                .map(|r| r.2)
        };
        if let (Some(ours), Some(theirs)) = (rate(Server::Entrepot), rate(Server::Fe2o3)) {
            println!(
                "  {case:8} entrepot {ours:>9.0} msgs/s   fe2o3 acceptor {theirs:>9.0} msgs/s   ratio {:.2}x",
                ours / theirs
            );
        }
    }
}

criterion_group!(benches, engine_vs_fe2o3);
criterion_main!(benches);
