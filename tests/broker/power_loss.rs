//! Goal: a producer's `accepted` and a settle-second consumer's settlement mean "on the
//! disk": after a power cut every message a producer saw accepted is there unless a
//! consumer's acceptance was settled back, and every settled acceptance stays; a failing
//! sync is refused to producers by name and shown on `/readyz` and `/metrics`.
//!
//! Method: an in-process node (`server::Node`) on a data directory under the storage
//! crate's `crash_sim` seam; raw AMQP clients over loopback — a producer sending batches
//! and recording the seqs accepted, a consumer in receiver-settle-mode second recording
//! the seqs the broker settled back. After a seeded number of acceptances the power is
//! cut (unsynced bytes and directory entries damaged per seed); a fresh node opens the
//! crashed tree and a consumer drains it. `ENTREPOT_CRASH_SEEDS=<n>` runs n seeds
//! (default [`DEFAULT_SEEDS`]), `ENTREPOT_CRASH_SEED=<s>` one; failures name the seed.
//! `sync_policy.rs` runs the same cut under `--sync interval:<ms>` ([`run_seed`]).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use entrepot::config::BrokerConfig;
use entrepot::server::Node;
use entrepot_storage::crash_sim::{CrashReport, CrashSim, SyncFault};
use fe2o3_amqp::types::definitions::{ReceiverSettleMode, Role};
use fe2o3_amqp::types::messaging::{Accepted as AcceptedState, DeliveryState};
use fe2o3_amqp::types::performatives::{Disposition, Performative};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::raw_client::{data_message, Client};

const DEFAULT_SEEDS: u64 = 4;
pub(crate) const QUEUE: &str = "power-loss";
/// Transfers the producer sends before it waits for their outcomes.
pub(crate) const BATCH: u32 = 8;
/// The cut comes after 1..=this many acceptances.
const CRASH_AFTER_MAX: u64 = 150;
/// Longest any step may take.
const STEP: Duration = Duration::from_secs(10);
/// A drain ends once the broker was quiet this long.
const QUIET: Duration = Duration::from_secs(1);

pub(crate) fn config(dir: &Path, sync: &str) -> BrokerConfig {
    BrokerConfig {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        http: "127.0.0.1:0".parse().expect("addr"),
        sync: sync.parse().expect("sync policy"),
        segment_bytes: 256 * 1024,
        max_message_bytes: 64 * 1024,
        allow_anonymous: true,
        ..BrokerConfig::default()
    }
}

pub(crate) fn seeds() -> Vec<u64> {
    let var = |name| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    match (var("ENTREPOT_CRASH_SEED"), var("ENTREPOT_CRASH_SEEDS")) {
        (Some(seed), _) => vec![seed],
        (None, n) => (1..=n.unwrap_or(DEFAULT_SEEDS)).collect(),
    }
}

pub(crate) fn body_of(seq: u64) -> Vec<u8> {
    let mut body = vec![(seq % 251) as u8; 16 + (seq % 7) as usize * 300];
    body[..8].copy_from_slice(&seq.to_be_bytes());
    body
}

/// The seq of a delivered message: the first 8 bytes of its data section.
pub(crate) fn seq_of(payload: &[u8]) -> u64 {
    let at = payload
        .windows(4)
        .position(|w| w == [0x00, 0x53, 0x75, 0xb0])
        .expect("a data section");
    u64::from_be_bytes(payload[at + 8..at + 16].try_into().expect("8 bytes"))
}

#[derive(Default)]
pub(crate) struct Seen {
    pub sent: BTreeSet<u64>,
    pub accepted: BTreeSet<u64>,
    /// Seqs the consumer accepted (its ack may or may not have been recorded)...
    pub consumed: BTreeSet<u64>,
    /// ...and those whose acceptance the broker settled back (recorded for certain).
    pub settled: BTreeSet<u64>,
}

/// One seed's run: what the clients saw, what came back after the cut, the cut's report,
/// and how long the node ran before it.
pub(crate) struct Outcome {
    pub seen: Seen,
    pub back: BTreeSet<u64>,
    pub report: CrashReport,
    pub ran: Duration,
}

pub(crate) async fn step<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f)
        .await
        .expect("step within its time bound")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_and_settled_survive_power_loss() {
    let (mut accepted, mut settled) = (0, 0);
    for seed in seeds() {
        let seen = run_seed(seed, "always").await.seen;
        accepted += seen.accepted.len();
        settled += seen.settled.len();
    }
    println!(
        "broker power loss: {} seeds, {accepted} acceptances and {settled} settlements checked",
        seeds().len()
    );
}

/// Runs one seed with the store's `sync` setting, checks that every accepted message and
/// every settled acceptance survived the cut, and returns what happened.
pub(crate) async fn run_seed(seed: u64, sync: &str) -> Outcome {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (live, crashed) = (tmp.path().join("live"), tmp.path().join("crashed"));
    let sim = CrashSim::install(&live).expect("install");
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = std::time::Instant::now();
    let node = Node::start(config(&live, sync), stop_rx)
        .await
        .expect("start");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let producer = tokio::spawn(produce(node.amqp_addr, Arc::clone(&seen)));
    let consumer = tokio::spawn(consume(node.amqp_addr, Arc::clone(&seen)));
    let crash_after = 1 + seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) % CRASH_AFTER_MAX;
    step(async {
        while (seen.lock().expect("lock").accepted.len() as u64) < crash_after {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    let report = sim.crash_into(&crashed, seed).expect("crash");
    let ran = started.elapsed();
    // What the clients saw is final now: nothing becomes durable after the cut.
    tokio::time::sleep(Duration::from_millis(50)).await;
    producer.abort();
    consumer.abort();
    let _ = stop_tx.send(true);
    drop(node);
    let seen = std::mem::take(&mut *seen.lock().expect("lock"));

    let (stop_tx, stop_rx) = watch::channel(false);
    let node = Node::start(config(&crashed, sync), stop_rx)
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: reopening the crashed store: {e:#}"));
    let back = drain(node.amqp_addr).await;
    let _ = stop_tx.send(true);
    for seq in &seen.accepted {
        assert!(
            back.contains(seq) || seen.consumed.contains(seq),
            "seed {seed}: accepted message {seq} lost ({} pages damaged in {} files, {report:?})",
            report.pages_old + report.pages_new + report.pages_torn + report.pages_garbage,
            report.files
        );
    }
    for seq in &back {
        assert!(
            !seen.settled.contains(seq),
            "seed {seed}: settled message {seq} came back"
        );
        assert!(seen.sent.contains(seq), "seed {seed}: {seq} was never sent");
    }
    Outcome {
        seen,
        back,
        report,
        ran,
    }
}

/// Sends batches of [`BATCH`] (each after the last one's outcomes) and records which the
/// broker accepted, until it stops.
async fn produce(addr: std::net::SocketAddr, seen: Arc<Mutex<Seen>>) {
    let mut c = Client::open(addr).await.expect("connect");
    c.attach_sender_on(0, 0, "producer", QUEUE).await;
    let mut seq_of_id: HashMap<u32, u64> = HashMap::new();
    for round in 0u32.. {
        for i in 0..BATCH {
            let id = round * BATCH + i;
            let seq = u64::from(id);
            seen.lock().expect("lock").sent.insert(seq);
            seq_of_id.insert(id, seq);
            c.transfer(0, id, &data_message(&body_of(seq))).await;
        }
        let mut open = BATCH;
        while open > 0 {
            match c.next_frame().await.performative {
                Performative::Disposition(d) if d.role == Role::Receiver => {
                    for id in d.first..=d.last.unwrap_or(d.first) {
                        open = open.saturating_sub(1);
                        if matches!(d.state, Some(DeliveryState::Accepted(_))) {
                            let seq = seq_of_id[&id];
                            seen.lock().expect("lock").accepted.insert(seq);
                        }
                    }
                }
                Performative::Close(_) | Performative::End(_) | Performative::Detach(_) => return,
                _ => {}
            }
        }
    }
}

/// Accepts every delivery unsettled (mode second) and records what the broker settles.
async fn consume(addr: std::net::SocketAddr, seen: Arc<Mutex<Seen>>) {
    let mut c = Client::open(addr).await.expect("connect");
    c.attach_receiver_settling(0, 0, "consumer", QUEUE, ReceiverSettleMode::Second)
        .await;
    c.flow(0, 0, u32::from(u16::MAX), false).await;
    let mut seq_of_id: HashMap<u32, u64> = HashMap::new();
    loop {
        let f = c.next_frame().await;
        match f.performative {
            Performative::Transfer(t) => {
                let id = t.delivery_id.expect("one frame per delivery");
                let seq = seq_of(&f.payload);
                seq_of_id.insert(id, seq);
                seen.lock().expect("lock").consumed.insert(seq);
                let accept = Disposition {
                    role: Role::Receiver,
                    first: id,
                    last: None,
                    settled: false,
                    state: Some(DeliveryState::Accepted(AcceptedState {})),
                    batchable: false,
                };
                c.send_on(0, &Performative::Disposition(accept), &[]).await;
            }
            Performative::Disposition(d) if d.role == Role::Sender && d.settled => {
                for id in d.first..=d.last.unwrap_or(d.first) {
                    seen.lock().expect("lock").settled.insert(seq_of_id[&id]);
                }
            }
            Performative::Close(_) | Performative::End(_) | Performative::Detach(_) => return,
            _ => {}
        }
    }
}

/// Every seq the queue still holds (accepted nothing, settle-first consumer).
async fn drain(addr: std::net::SocketAddr) -> BTreeSet<u64> {
    let mut c = step(Client::open(addr)).await.expect("connect");
    step(c.attach_receiver_settling(0, 0, "drain", QUEUE, ReceiverSettleMode::First)).await;
    c.flow(0, 0, u32::from(u16::MAX), false).await;
    let mut back = BTreeSet::new();
    for f in c.frames_until_quiet(QUIET).await {
        if matches!(f.performative, Performative::Transfer(_)) {
            assert!(back.insert(seq_of(&f.payload)), "delivered twice");
        }
    }
    back
}

pub(crate) async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = step(tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    step(s.read_to_string(&mut out)).await.expect("read");
    out
}

async fn failing_sync_is_refused(fault: SyncFault) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sim = CrashSim::install(tmp.path()).expect("install");
    let (stop_tx, stop_rx) = watch::channel(false);
    let node = Node::start(config(tmp.path(), "always"), stop_rx)
        .await
        .expect("start");
    let mut c = Client::open(node.amqp_addr).await.expect("connect");
    c.attach_sender_on(0, 0, "producer", QUEUE).await;
    c.transfer(0, 0, &data_message(&body_of(0))).await;
    let first = step(c.expect(|p| match p {
        Performative::Disposition(d) if d.role == Role::Receiver => Some(d.state),
        _ => None,
    }))
    .await;
    assert!(
        matches!(first, Some(DeliveryState::Accepted(_))),
        "{first:?}"
    );
    assert!(http_get(node.http_addr, "/readyz").await.contains("200 OK"));

    sim.inject(fault, 1);
    c.transfer(0, 1, &data_message(&body_of(1))).await;
    // No outcome for the message whose sync failed: the connection ends naming the store.
    let close = step(c.expect(|p| match p {
        Performative::Disposition(d) if d.role == Role::Receiver => {
            panic!("{fault:?}: an outcome for a message whose sync failed: {d:?}")
        }
        Performative::Close(close) => Some(close),
        _ => None,
    }))
    .await;
    let error = close.error.expect("the close carries the reason");
    let text = format!(
        "{:?} {}",
        error.condition,
        error.description.unwrap_or_default()
    );
    assert!(
        text.contains("InternalError") && text.contains("store failed"),
        "{text}"
    );
    let ready = http_get(node.http_addr, "/readyz").await;
    assert!(
        ready.contains("503") && ready.contains("store failed"),
        "{ready}"
    );
    let metrics = http_get(node.http_addr, "/metrics").await;
    assert!(metrics.contains("entrepot_store_failed 1"), "{metrics}");
    // A new connection is refused at once, naming the store.
    let mut again = step(Client::connect(node.amqp_addr, "again", None))
        .await
        .expect("connect");
    let close = step(again.expect(|p| match p {
        Performative::Close(close) => Some(close),
        _ => None,
    }))
    .await;
    let reason = format!("{:?}", close.error);
    assert!(reason.contains("store failed"), "{fault:?}: {reason}");
    let _ = stop_tx.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eio_sync_is_refused_to_producers_and_reported() {
    failing_sync_is_refused(SyncFault::Eio).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enospc_sync_is_refused_to_producers_and_reported() {
    failing_sync_is_refused(SyncFault::Enospc).await;
}
