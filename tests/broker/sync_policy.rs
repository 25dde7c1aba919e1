//! Goal: `--sync interval:<ms>` keeps its promise, and a stalled sync holds back exactly
//! the acceptances that wait for it — nothing else.
//!
//! The promise of `interval:<ms>` (README's `--sync`, `SyncPolicy::Interval`, ARCHITECTURE's
//! durability table): the store syncs at most once every `<ms>`, and a message's durability
//! handle — hence its `accepted`, and a settle-second consumer's settlement — completes
//! only with the first sync after it was written, as under `always`. So a power cut never
//! loses an accepted message or a settled acceptance; it loses what was written since the
//! last sync (the last `<ms>` and the sync under way), and no producer was told those were
//! accepted. What the interval trades is latency: a producer waits for the next sync.
//!
//! Method: the power cut of `power_loss.rs` (seeded, the node's data directory under the
//! storage crate's crash seam) run under `interval:<ms>`: its checks (every accepted
//! message back, no settled one back) plus the latency side of the promise — the
//! producer sends a batch only after the last one's outcomes, so its rounds are bounded by
//! the syncs the interval allows — and the loss bound, at most the batch in flight. Then a
//! 2 s stall injected into the next sync (`SyncFault::Stall`): transfers sent during it
//! get no outcome until the sync returned, while another connection is served a message
//! that was already durable and `/healthz` answers; afterwards everything is accepted.
//! Only lower bounds on time are asserted (a stalled sync cannot return early).

use std::time::{Duration, Instant};

use entrepot::server::Node;
use entrepot_storage::crash_sim::{CrashSim, SyncFault};
use fe2o3_amqp::types::definitions::{ReceiverSettleMode, Role};
use fe2o3_amqp::types::messaging::DeliveryState;
use fe2o3_amqp::types::performatives::Performative;
use tokio::sync::watch;

use crate::power_loss::{self, body_of, config, http_get, seq_of, step, BATCH, QUEUE};
use crate::raw_client::{data_message, Client};

/// The interval under test (`--sync interval:50`).
const INTERVAL: Duration = Duration::from_millis(50);
/// How long the injected sync stall lasts.
const STALL: Duration = Duration::from_secs(2);
/// Transfers sent while the sync stalls.
const DURING_STALL: u32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_sync_loses_no_accepted_message_and_at_most_the_batch_in_flight() {
    let sync = format!("interval:{}", INTERVAL.as_millis());
    for seed in power_loss::seeds() {
        let out = power_loss::run_seed(seed, &sync).await;
        let seen = &out.seen;
        // Latency side: each round waits for a sync, syncs come at most every INTERVAL.
        let rounds = seen.accepted.len().div_ceil(BATCH as usize) as u128;
        let allowed = out.ran.as_millis() / INTERVAL.as_millis() + 1;
        assert!(
            rounds <= allowed,
            "seed {seed}: {rounds} accepted rounds in {:?}, more than one per {INTERVAL:?} \
             sync: acceptance did not wait for the interval's sync",
            out.ran
        );
        // Loss side: only the batch whose outcomes were awaited may be gone.
        let lost: Vec<u64> = seen
            .sent
            .iter()
            .filter(|s| !out.back.contains(s) && !seen.consumed.contains(s))
            .copied()
            .collect();
        assert!(
            lost.iter().all(|s| !seen.accepted.contains(s)) && lost.len() <= BATCH as usize,
            "seed {seed}: lost {lost:?}, beyond the unaccepted batch in flight"
        );
        println!(
            "interval power cut, seed {seed}: {} accepted in {rounds} rounds over {:?}, \
             {} syncs before the cut, {} unaccepted lost, {} pages damaged",
            seen.accepted.len(),
            out.ran,
            out.report.syncs,
            lost.len(),
            out.report.pages_old
                + out.report.pages_new
                + out.report.pages_torn
                + out.report.pages_garbage
        );
    }
}

/// Waits for the outcome of each of `ids` on the producer; returns when the last came.
async fn outcomes(mut c: Client, ids: Vec<u32>) -> (Vec<Option<DeliveryState>>, Instant) {
    let mut states = vec![None; ids.len()];
    let mut open = ids.len();
    while open > 0 {
        if let Performative::Disposition(d) = c.next_frame().await.performative {
            if d.role != Role::Receiver {
                continue;
            }
            for id in d.first..=d.last.unwrap_or(d.first) {
                if let Some(i) = ids.iter().position(|x| *x == id) {
                    open -= usize::from(states[i].is_none());
                    states[i] = d.state.clone();
                }
            }
        }
    }
    (states, Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sync_holds_back_only_the_acceptances_waiting_for_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sim = CrashSim::install(tmp.path()).expect("install");
    let (stop_tx, stop_rx) = watch::channel(false);
    let node = Node::start(config(tmp.path(), "always"), stop_rx)
        .await
        .expect("start");
    let mut producer = Client::open(node.amqp_addr).await.expect("connect");
    producer.attach_sender_on(0, 0, "producer", QUEUE).await;
    producer.transfer(0, 0, &data_message(&body_of(0))).await;
    let first = step(producer.expect(crate::raw_client::accepted(0))).await;
    assert!(first, "message 0 accepted before the stall");
    // The consumer is attached (without credit) before the stall, so nothing it does
    // afterwards needs a sync: it never settles.
    let mut consumer = Client::open(node.amqp_addr).await.expect("connect");
    consumer
        .attach_receiver_settling(0, 0, "consumer", QUEUE, ReceiverSettleMode::Second)
        .await;

    sim.inject(SyncFault::Stall(STALL), 1);
    let stalled_from = Instant::now();
    for id in 1..=DURING_STALL {
        producer
            .transfer(0, id, &data_message(&body_of(u64::from(id))))
            .await;
    }
    let waiting = tokio::spawn(outcomes(producer, (1..=DURING_STALL).collect()));

    // Other work goes on while the sync stalls: a durable message is delivered...
    consumer.flow(0, 0, 1, false).await;
    let delivered = step(async {
        loop {
            let f = consumer.next_frame().await;
            if matches!(f.performative, Performative::Transfer(_)) {
                return seq_of(&f.payload);
            }
        }
    })
    .await;
    assert_eq!(
        delivered, 0,
        "the durable message is delivered during the stall"
    );
    // ...and the health endpoint answers...
    let health = http_get(node.http_addr, "/healthz").await;
    assert!(health.contains("200 OK"), "{health}");
    // ...while none of the stalled transfers has an outcome yet.
    assert!(
        !waiting.is_finished(),
        "an outcome arrived while its sync stalled ({:?} after the stall began)",
        stalled_from.elapsed()
    );

    let (states, answered) = step(waiting).await.expect("producer task");
    assert!(
        states
            .iter()
            .all(|s| matches!(s, Some(DeliveryState::Accepted(_)))),
        "after the stall every transfer is accepted: {states:?}"
    );
    assert!(
        answered - stalled_from >= STALL,
        "accepted {:?} after the stall began, before its sync could return",
        answered - stalled_from
    );
    // And the store is healthy again: the next message is accepted as usual, and every
    // message is there for the consumer.
    let mut producer = Client::open(node.amqp_addr).await.expect("connect");
    producer.attach_sender_on(0, 0, "after", QUEUE).await;
    let last = DURING_STALL + 1;
    producer
        .transfer(0, 0, &data_message(&body_of(u64::from(last))))
        .await;
    assert!(step(producer.expect(crate::raw_client::accepted(0))).await);
    consumer.flow(0, 1, last, false).await;
    let mut seqs = Vec::new();
    for f in consumer
        .frames_until_quiet(Duration::from_millis(500))
        .await
    {
        if matches!(f.performative, Performative::Transfer(_)) {
            seqs.push(seq_of(&f.payload));
        }
    }
    assert_eq!(seqs, (1..=u64::from(last)).collect::<Vec<_>>());
    let ready = http_get(node.http_addr, "/readyz").await;
    assert!(
        ready.contains("200 OK"),
        "a stall is not a failure: {ready}"
    );
    let _ = stop_tx.send(true);
}
