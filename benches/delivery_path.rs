//! The delivery path without the rest of the stack: messages already in a queue go through
//! the connection engine (queue dispatch → session → link → transfer encoding → the
//! engine's write buffer) and come out as encoded transfer frames, read by a minimal raw
//! consumer. No producer, no client library, no fsync: a regression in this path shows
//! here on its own, not diluted by fe2o3-amqp's client (the heavier half of
//! `benches/roundtrip.rs`).
//!
//! Untimed setup, per criterion sample: a broker over a real store (segment log and ack
//! log in a temporary directory, sync `never`) and `BATCH × iters` persistent 1 KiB
//! messages appended to the store and put in one queue, as durable produced messages
//! would be. Timed: from the consumer's first `flow` to the last transfer frame read.
//! Afterwards (untimed) the consumer detaches and closes, the queue must be empty, and
//! fully acknowledged segments are deleted so the store stays small.
//!
//! The consumer keeps `CREDIT` granted (a new `flow` once half is used) and, for
//! unsettled deliveries, accepts everything one read brought in one disposition, as a
//! batching client does. It splits frames and reads the delivery id and `more` flag from
//! the engine's hand-encoded transfer header; it decodes nothing else on the hot path.
//!
//! Cases, `transport/settlement`:
//! * `memory`: the engine's byte stream is an in-memory pipe (`tokio::io::duplex`);
//! * `tcp`: a loopback TCP socket accepted as the listener does (`Accepted::tcp`: NODELAY,
//!   prompt ACKs), adding the socket system calls and the kernel's loopback;
//! * `presettled`: the consumer attaches with snd-settle-mode `settled`;
//! * `accepted`: unsettled deliveries, accepted in batches: adds the queue's settle and
//!   the ack log append.
//!
//! Engine and consumer share one current-thread runtime, so the time per message is the
//! CPU the engine and the (light) consumer spend per message, not a race between threads
//! (the store's background threads aside). Criterion reports wall-clock time; after each
//! case the bench also prints the runtime thread's CPU time per message over every sample
//! (`CLOCK_THREAD_CPUTIME_ID`), the figure to read on a shared, loaded machine.
//! `cargo test --bench delivery_path` runs each case once, with `BATCH` messages.

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use entrepot::amqp::frame::{encode_frame, split_performative, FrameDecoder, AMQP_HEADER};
use entrepot::auth::Gatekeeper;
use entrepot::broker::Broker;
use entrepot::config::BrokerConfig;
use entrepot::connection::{serve, Accepted};
use fe2o3_amqp_types::definitions::{Handle, ReceiverSettleMode, Role, SenderSettleMode};
use fe2o3_amqp_types::messaging::TargetArchetype;
use fe2o3_amqp_types::messaging::{Accepted as AcceptedState, DeliveryState, Source, Target};
use fe2o3_amqp_types::performatives::{
    Attach, Begin, ChannelMax, Close, Detach, Disposition, Flow, MaxFrameSize, Open, Performative,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Messages per criterion iteration.
const BATCH: u64 = 1000;
const BODY_BYTES: usize = 1024;
/// Link credit the consumer keeps granted (the broker's default grant to producers).
const CREDIT: u32 = 1000;
/// Transfer frames the consumer's session lets the broker send until its next flow.
const SESSION_WINDOW: u32 = 1 << 20;
/// The consumer's max-frame-size: a 1 KiB message is one frame.
const CLIENT_MAX_FRAME: u32 = 64 * 1024;
/// Bytes buffered in each direction of the in-memory pipe: above the engine's flush
/// threshold (256 KiB), so one flush never waits for the reader mid-way.
const PIPE_BYTES: usize = 1024 * 1024;
/// Segment size of the bench's store: small, so acknowledged segments are deleted
/// between samples and the directory stays small.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// Largest message the bench's broker accepts (must fit a segment with the framing).
const MAX_MESSAGE_BYTES: u64 = 1024 * 1024;
/// Longest any untimed step (handshake, close) may take before the bench fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the timed drain of one sample may take before the bench fails.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// The queue every case drains (empty between samples).
const QUEUE: &str = "delivery-path";
/// The consumer's link handle.
const HANDLE: u32 = 0;
/// Descriptor code of `transfer` (AMQP 1.0 §2.7.5).
const TRANSFER_CODE: u8 = 0x14;

#[derive(Clone, Copy)]
enum Transport {
    Memory,
    Tcp,
}

#[derive(Clone, Copy, PartialEq)]
enum Settlement {
    Presettled,
    Accepted,
}

struct Rig {
    rt: tokio::runtime::Runtime,
    broker: Arc<Broker>,
    gate: Arc<Gatekeeper>,
    tcp: std::net::SocketAddr,
    shutdown: watch::Receiver<bool>,
    /// CPU time of the runtime thread during the timed drains, and messages drained, since
    /// the last [`Rig::take_spent`].
    spent: Cell<(Duration, u64)>,
    _stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

fn rig() -> Rig {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = BrokerConfig {
        data_dir: dir.path().to_path_buf(),
        sync: "never".parse().expect("sync policy"),
        segment_bytes: SEGMENT_BYTES,
        max_message_bytes: MAX_MESSAGE_BYTES,
        allow_anonymous: true,
        ..BrokerConfig::default()
    };
    let broker = Broker::open(config).expect("broker");
    let gate = Arc::new(Gatekeeper::default());
    let (stop, shutdown) = watch::channel(false);
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
    let tcp = listener.local_addr().expect("addr");
    let (b, g, s) = (Arc::clone(&broker), Arc::clone(&gate), shutdown.clone());
    rt.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let accepted = Accepted::tcp(stream);
            tokio::spawn(serve(accepted, Arc::clone(&b), Arc::clone(&g), s.clone()));
        }
    });
    Rig {
        rt,
        broker,
        gate,
        tcp,
        shutdown,
        spent: Cell::new((Duration::ZERO, 0)),
        _stop: stop,
        _dir: dir,
    }
}

impl Rig {
    /// CPU µs per message drained since the last call, and the messages it covers.
    fn take_spent(&self) -> (f64, u64) {
        let (cpu, messages) = self.spent.replace((Duration::ZERO, 0));
        (cpu.as_secs_f64() * 1e6 / messages.max(1) as f64, messages)
    }
}

/// CPU time of the calling thread so far.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec at a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A persistent message: a header section (durable) and one data section of `body`.
fn message_bytes(body: &[u8]) -> Vec<u8> {
    // Format: header { 0x00 0x53 0x70 | list8 size 2, count 1 | durable: true }
    let mut m = vec![0x00, 0x53, 0x70, 0xc0, 0x02, 0x01, 0x41];
    // Format: data { 0x00 0x53 0x75 | vbin32 len: u32 BE | bytes }
    m.extend_from_slice(&[0x00, 0x53, 0x75, 0xb0]);
    m.extend_from_slice(&(body.len() as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// Appends `count` messages to the store and puts them in the queue, as the produce path
/// does once they are durable.
fn prefill(broker: &Arc<Broker>, count: u64) {
    let message = message_bytes(&[0x5a; BODY_BYTES]);
    let queue = broker.queue(QUEUE).expect("queue");
    let mut stored = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let (_, offset, at_ms, bytes) = broker.store().append(QUEUE, &[&message]).expect("append");
        stored.push(entrepot::broker::queued(offset, bytes, at_ms));
    }
    queue.enqueue_all(broker, stored);
}

/// Untimed: prefill, connect, attach. Timed: the drain. Untimed: close, check, reclaim.
fn sample(rig: &Rig, transport: Transport, settlement: Settlement, iters: u64) -> Duration {
    let total = BATCH * iters;
    prefill(&rig.broker, total);
    let (elapsed, cpu) = rig.rt.block_on(async {
        match transport {
            Transport::Memory => {
                let (client, server) = tokio::io::duplex(PIPE_BYTES);
                let (rd, wr) = tokio::io::split(server);
                let accepted = Accepted {
                    rd: Box::new(rd),
                    wr: Box::new(wr),
                    peer: None,
                    sni: None,
                    tls: false,
                    quickack: None,
                };
                let engine = tokio::spawn(serve(
                    accepted,
                    Arc::clone(&rig.broker),
                    Arc::clone(&rig.gate),
                    rig.shutdown.clone(),
                ));
                let (rd, wr) = tokio::io::split(client);
                let elapsed = consume(rd, wr, settlement, total).await;
                tokio::time::timeout(STEP_TIMEOUT, engine)
                    .await
                    .expect("connection ends after close")
                    .expect("connection task");
                elapsed
            }
            Transport::Tcp => {
                let stream = TcpStream::connect(rig.tcp).await.expect("connect");
                stream.set_nodelay(true).expect("nodelay");
                let (rd, wr) = stream.into_split();
                consume(rd, wr, settlement, total).await
            }
        }
    });
    // Over TCP the engine may still be tearing down: wait (bounded) for the queue to let go.
    let queue = rig.broker.queue(QUEUE).expect("queue");
    let deadline = Instant::now() + STEP_TIMEOUT;
    while queue.consumer_count() > 0 && Instant::now() < deadline {
        rig.rt
            .block_on(tokio::time::sleep(Duration::from_millis(1)));
    }
    assert_eq!(queue.depth(), (0, 0), "every message delivered and settled");
    rig.broker.store().reclaim().expect("reclaim");
    let (spent, messages) = rig.spent.get();
    rig.spent.set((spent + cpu, messages + total));
    elapsed
}

/// The raw consumer: open, begin, attach; then (timed) grant credit and read `total`
/// messages; then detach and close. Returns the drain's wall-clock and thread CPU time.
async fn consume<R, W>(rd: R, wr: W, settlement: Settlement, total: u64) -> (Duration, Duration)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut c = Consumer {
        rd,
        wr,
        rbuf: BytesMut::with_capacity(PIPE_BYTES),
        out: BytesMut::new(),
        decoder: FrameDecoder::new(CLIENT_MAX_FRAME),
        broker_next_outgoing: 0,
        frames_in: 0,
        received: 0,
        granted: 0,
        first_unsettled: None,
        last_delivery: 0,
    };
    tokio::time::timeout(STEP_TIMEOUT, c.attach(settlement))
        .await
        .expect("attach in time");
    let (started, cpu_before) = (Instant::now(), thread_cpu());
    tokio::time::timeout(DRAIN_TIMEOUT, c.drain(settlement, total))
        .await
        .expect("every message delivered in time");
    let (elapsed, cpu) = (started.elapsed(), thread_cpu() - cpu_before);
    tokio::time::timeout(STEP_TIMEOUT, c.close())
        .await
        .expect("close in time");
    (elapsed, cpu)
}

struct Consumer<R, W> {
    rd: R,
    wr: W,
    rbuf: BytesMut,
    out: BytesMut,
    decoder: FrameDecoder,
    /// The broker's next-outgoing-id from its begin: our next-incoming-id is this plus
    /// the transfer frames read.
    broker_next_outgoing: u32,
    frames_in: u32,
    /// Whole messages read (last frame with `more` false).
    received: u64,
    /// Credit granted so far in all (the link's delivery-count plus its credit).
    granted: u64,
    /// First delivery id read and not yet accepted.
    first_unsettled: Option<u32>,
    last_delivery: u32,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Consumer<R, W> {
    async fn attach(&mut self, settlement: Settlement) {
        let open = Open {
            container_id: "delivery-path".into(),
            hostname: None,
            max_frame_size: MaxFrameSize(CLIENT_MAX_FRAME),
            channel_max: ChannelMax(0),
            idle_time_out: None,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        let begin = Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: SESSION_WINDOW,
            outgoing_window: SESSION_WINDOW,
            handle_max: Handle(HANDLE),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        let snd_settle_mode = match settlement {
            Settlement::Presettled => SenderSettleMode::Settled,
            Settlement::Accepted => SenderSettleMode::Unsettled,
        };
        let attach = Attach {
            name: "delivery-path".into(),
            handle: Handle(HANDLE),
            role: Role::Receiver,
            snd_settle_mode,
            rcv_settle_mode: ReceiverSettleMode::First,
            source: Some(Box::new(Source::builder().address(QUEUE).build())),
            target: Some(Box::new(TargetArchetype::Target(Target::default()))),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: None,
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        self.out.extend_from_slice(&AMQP_HEADER);
        for p in [
            Performative::Open(open),
            Performative::Begin(begin),
            Performative::Attach(attach),
        ] {
            encode_frame(&mut self.out, 0, &p, &[]).expect("encode");
        }
        self.write_out().await;
        let mut header = [0u8; AMQP_HEADER.len()];
        self.rd.read_exact(&mut header).await.expect("header");
        assert_eq!(
            header, AMQP_HEADER,
            "the broker answers with the AMQP header"
        );
        loop {
            match self.next_performative().await {
                Performative::Begin(b) => self.broker_next_outgoing = b.next_outgoing_id,
                Performative::Attach(a) => {
                    assert!(a.source.is_some(), "the broker refused the attach: {a:?}");
                    return;
                }
                Performative::Open(_) => {}
                other => panic!("unexpected {other:?} before the attach"),
            }
        }
    }

    /// Grants credit and reads until `total` messages have arrived.
    async fn drain(&mut self, settlement: Settlement, total: u64) {
        self.top_up_credit();
        self.write_out().await;
        while self.received < total {
            let n = self.rd.read_buf(&mut self.rbuf).await.expect("read");
            assert!(n > 0, "the broker closed the connection mid-drain");
            while let Some(frame) = self.decoder.decode(&mut self.rbuf).expect("frame") {
                self.on_frame(&frame.body);
            }
            if settlement == Settlement::Accepted {
                self.accept_read();
            }
            if self.received < total {
                self.top_up_credit();
            }
            self.write_out().await;
            if self.rbuf.capacity() < CLIENT_MAX_FRAME as usize {
                self.rbuf.reserve(PIPE_BYTES);
            }
        }
    }

    fn on_frame(&mut self, body: &Bytes) {
        if body.get(..3) != Some(&[0x00, 0x53, TRANSFER_CODE][..]) {
            // Heartbeats and the occasional flow: nothing to do while draining.
            return;
        }
        self.frames_in = self.frames_in.wrapping_add(1);
        let (delivery_id, more) = transfer_fields(body)
            .expect("a transfer in the engine's hand-encoded form (src/amqp/frame.rs)");
        if let Some(id) = delivery_id {
            self.first_unsettled.get_or_insert(id);
            self.last_delivery = id;
        }
        if !more {
            self.received += 1;
        }
    }

    /// One disposition accepting every delivery read so far.
    fn accept_read(&mut self) {
        let Some(first) = self.first_unsettled.take() else {
            return;
        };
        let last = self.last_delivery;
        let disposition = Disposition {
            role: Role::Receiver,
            first,
            last: (last != first).then_some(last),
            settled: true,
            state: Some(DeliveryState::Accepted(AcceptedState {})),
            batchable: false,
        };
        let p = Performative::Disposition(disposition);
        encode_frame(&mut self.out, 0, &p, &[]).expect("encode");
    }

    /// A flow back to `CREDIT` once less than half of it is left.
    fn top_up_credit(&mut self) {
        if self.granted - self.received >= u64::from(CREDIT / 2) {
            return;
        }
        self.granted = self.received + u64::from(CREDIT);
        let flow = Flow {
            next_incoming_id: Some(self.broker_next_outgoing.wrapping_add(self.frames_in)),
            incoming_window: SESSION_WINDOW,
            next_outgoing_id: 0,
            outgoing_window: SESSION_WINDOW,
            handle: Some(Handle(HANDLE)),
            delivery_count: Some(self.received as u32),
            link_credit: Some(CREDIT),
            available: None,
            drain: false,
            echo: false,
            properties: None,
        };
        encode_frame(&mut self.out, 0, &Performative::Flow(flow), &[]).expect("encode");
    }

    async fn close(&mut self) {
        let detach = Detach {
            handle: Handle(HANDLE),
            closed: true,
            error: None,
        };
        let p = Performative::Detach(detach);
        encode_frame(&mut self.out, 0, &p, &[]).expect("encode");
        let p = Performative::Close(Close { error: None });
        encode_frame(&mut self.out, 0, &p, &[]).expect("encode");
        self.write_out().await;
        while !matches!(self.next_performative().await, Performative::Close(_)) {}
    }

    /// The next performative that is not a transfer or heartbeat (decoded with serde).
    async fn next_performative(&mut self) -> Performative {
        loop {
            while let Some(frame) = self.decoder.decode(&mut self.rbuf).expect("frame") {
                if frame.body.is_empty() || frame.body.get(2) == Some(&TRANSFER_CODE) {
                    continue;
                }
                return split_performative(&frame.body).expect("performative").0;
            }
            let n = self.rd.read_buf(&mut self.rbuf).await.expect("read");
            assert!(n > 0, "the broker closed the connection");
        }
    }

    async fn write_out(&mut self) {
        if self.out.is_empty() {
            return;
        }
        self.wr.write_all(&self.out).await.expect("write");
        self.wr.flush().await.expect("flush");
        self.out.clear();
    }
}

/// Delivery id (absent on a continuation frame) and `more` of a transfer encoded by
/// `entrepot::amqp::frame::encode_transfer`:
/// `{ 0x00 0x53 0x14 | 0xc0 size count | handle | delivery-id | vbin8 tag | format | settled | more }`.
fn transfer_fields(body: &[u8]) -> Option<(Option<u32>, bool)> {
    let mut pos = 6; // descriptor (3) and list8 header (3)
    let _handle = read_uint(body, &mut pos)?;
    let delivery_id = read_uint(body, &mut pos)?;
    if *body.get(pos)? != 0xa0 {
        return None;
    }
    pos += 2 + usize::from(*body.get(pos + 1)?);
    let _format = read_uint(body, &mut pos)?;
    let _settled = *body.get(pos)?;
    let more = *body.get(pos + 1)? == 0x41;
    Some((delivery_id, more))
}

/// An AMQP `uint` (uint0, smalluint, uint) or `null`, advancing `pos`.
fn read_uint(body: &[u8], pos: &mut usize) -> Option<Option<u32>> {
    let (value, len) = match *body.get(*pos)? {
        0x40 => (None, 1),
        0x43 => (Some(0), 1),
        0x52 => (Some(u32::from(*body.get(*pos + 1)?)), 2),
        0x70 => {
            let b = body.get(*pos + 1..*pos + 5)?;
            (Some(u32::from_be_bytes(b.try_into().ok()?)), 5)
        }
        _ => return None,
    };
    *pos += len;
    Some(value)
}

fn delivery_path(c: &mut Criterion) {
    let rig = rig();
    let mut g = c.benchmark_group("delivery_path");
    g.throughput(Throughput::Elements(BATCH));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(4));
    for (transport, t) in [(Transport::Memory, "memory"), (Transport::Tcp, "tcp")] {
        for (settlement, s) in [
            (Settlement::Presettled, "presettled"),
            (Settlement::Accepted, "accepted"),
        ] {
            rig.take_spent();
            g.bench_function(format!("{t}/{s}"), |b| {
                b.iter_custom(|iters| sample(&rig, transport, settlement, iters))
            });
            let (cpu_us, messages) = rig.take_spent();
            println!(
                "delivery_path/{t}/{s}: {cpu_us:.2} us CPU per message (runtime thread: engine + consumer), over {messages} messages"
            );
        }
    }
    g.finish();
}

criterion_group!(benches, delivery_path);
criterion_main!(benches);
