//! An `accepted` message survives SIGKILL of the broker mid-stream, uncorrupted.
//!
//! Method: four producer connections send 10,000 unsettled 1 KiB messages with up to
//! [`IN_FLIGHT_PER_SENDER`] transfers in flight each (`send_batchable`), recording the
//! sequence number of every message the broker accepts. Once [`KILL_AFTER_ACCEPTED`]
//! are accepted the broker is SIGKILLed while the rest are still streaming. A new broker
//! on the same data directory must then deliver every accepted sequence number — it may
//! deliver more (stored but not yet acknowledged when killed) but never fewer, never one
//! twice — and every body must match the pattern its sequence number determines.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fe2o3_amqp::types::messaging::{ApplicationProperties, Data, Message, Outcome};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::harness::BrokerProcess;

const MESSAGES: u64 = 10_000;
const BODY_BYTES: usize = 1024;
const SENDERS: u64 = 4;
const IN_FLIGHT_PER_SENDER: usize = 500;
const KILL_AFTER_ACCEPTED: usize = 3_000;
const QUEUE: &str = "crash";
/// Bound on each phase: producing until the kill, and consuming after the restart.
const PHASE_TIMEOUT: Duration = Duration::from_secs(120);
/// After every accepted message is back, how long we wait for stragglers.
const QUIET: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_message_survives_sigkill_mid_stream() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), &[]);
    let accepted = Arc::new(Mutex::new(HashSet::new()));
    let accepted_count = Arc::new(AtomicUsize::new(0));
    let mut producers = Vec::new();
    for k in 0..SENDERS {
        let (url, accepted, count) = (broker.url(), accepted.clone(), accepted_count.clone());
        producers.push(tokio::spawn(produce(url, k, accepted, count)));
    }
    tokio::time::timeout(PHASE_TIMEOUT, async {
        while accepted_count.load(Ordering::Relaxed) < KILL_AFTER_ACCEPTED {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("producers did not reach the kill point in time");
    broker.kill();
    // fe2o3 may leave a send waiting on a dead connection; what matters is only what was
    // accepted, so stop the producers (aborting a producer drops its outcome tasks).
    for p in &producers {
        p.abort();
    }
    for p in producers {
        let _ = p.await;
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(
        accepted.len() < MESSAGES as usize,
        "the kill came after every message was accepted: not mid-stream"
    );
    eprintln!("accepted before SIGKILL: {}", accepted.len());

    let broker = BrokerProcess::start(dir.path(), &[]);
    let received = consume_all(&broker, &accepted).await;
    let missing: Vec<u64> = accepted.difference(&received).copied().collect();
    assert!(
        missing.is_empty(),
        "accepted but lost: {} e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    eprintln!(
        "received after restart: {} ({} beyond the accepted ones)",
        received.len(),
        received.len() - accepted.len()
    );
}

/// Sends every `SENDERS`-th sequence number from `k`, recording accepted ones, until done
/// or the connection dies.
async fn produce(url: String, k: u64, accepted: Arc<Mutex<HashSet<u64>>>, count: Arc<AtomicUsize>) {
    let Ok(mut conn) = Connection::open(format!("crash-producer-{k}"), url.as_str()).await else {
        return;
    };
    let Ok(mut session) = Session::begin(&mut conn).await else {
        return;
    };
    let Ok(mut sender) = Sender::attach(&mut session, format!("p{k}"), QUEUE).await else {
        return;
    };
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT_PER_SENDER));
    let mut outcomes = JoinSet::new();
    for seq in (k..MESSAGES).step_by(SENDERS as usize) {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let send = tokio::time::timeout(PHASE_TIMEOUT, sender.send_batchable(message(seq)));
        let Ok(Ok(fut)) = send.await else { break };
        let (accepted, count) = (accepted.clone(), count.clone());
        outcomes.spawn(async move {
            if let Ok(Ok(Outcome::Accepted(_))) = tokio::time::timeout(PHASE_TIMEOUT, fut).await {
                accepted.lock().unwrap().insert(seq);
                count.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        });
    }
    while outcomes.join_next().await.is_some() {}
    // The broker is (about to be) dead; a clean close is neither expected nor needed.
    drop(sender);
    drop(session);
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close()).await;
}

/// Receives until every accepted sequence number is back and the queue stays quiet;
/// checks each body and that no sequence number comes twice.
async fn consume_all(broker: &BrokerProcess, accepted: &HashSet<u64>) -> HashSet<u64> {
    let mut conn = Connection::open("crash-consumer", broker.url().as_str())
        .await
        .unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let mut receiver = Receiver::attach(&mut session, "c", QUEUE).await.unwrap();
    let mut received = HashSet::new();
    let deadline = tokio::time::Instant::now() + PHASE_TIMEOUT;
    loop {
        let wait = if received.is_superset(accepted) {
            QUIET
        } else {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        };
        let Ok(delivery) = tokio::time::timeout(wait, receiver.recv::<Data>()).await else {
            break;
        };
        let delivery = delivery.unwrap();
        let seq = sequence_of(delivery.message());
        assert_eq!(
            delivery.body().0.as_slice(),
            body(seq).as_slice(),
            "body of {seq} is corrupt"
        );
        assert!(
            received.insert(seq),
            "sequence number {seq} delivered twice"
        );
        receiver.accept(&delivery).await.unwrap();
    }
    receiver.close().await.unwrap();
    session.end().await.unwrap();
    conn.close().await.unwrap();
    received
}

fn message(seq: u64) -> Message<Data> {
    Message::builder()
        .application_properties(ApplicationProperties::builder().insert("seq", seq).build())
        .data(Binary::from(body(seq)))
        .build()
}

/// 1 KiB determined by `seq`, so a torn or mixed-up body shows.
fn body(seq: u64) -> Vec<u8> {
    let mut b = seq.to_le_bytes().to_vec();
    b.extend(
        (0..BODY_BYTES - 8).map(|j| (seq.wrapping_mul(31).wrapping_add(j as u64) % 251) as u8),
    );
    b
}

fn sequence_of(m: &Message<Data>) -> u64 {
    let props = m
        .application_properties
        .as_ref()
        .expect("application-properties");
    match props.0.get("seq") {
        Some(SimpleValue::Ulong(seq)) => *seq,
        other => panic!("seq property is {other:?}"),
    }
}
