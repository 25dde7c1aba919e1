//! Consumer outcomes across a failover.
//!
//! Goal: a consumer that settles second (receiver-settle-mode `second`) learns when its
//! outcome is final. The broker settles such a delivery only once the acknowledgement is
//! committed by a majority, so the leader may die at any moment after that settlement and
//! the message still never comes back; what was accepted but not yet settled may (at
//! least once). Driven by the raw client, which sees every settlement frame. And failed
//! delivery attempts are replicated too: the new leader carries on counting them.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fe2o3_amqp::types::definitions::{ReceiverSettleMode, Role};
use fe2o3_amqp::types::messaging::{Accepted as AcceptedState, DeliveryState};
use fe2o3_amqp::types::performatives::{Disposition, Flow, Performative};

use crate::cluster_support::{assert_none_lost, drain, Accepted, Cluster, Load, LoadConfig};
use crate::raw_client::Client;

const QUEUE: &str = "settle.second";
const MESSAGES: u64 = 600;
/// Settlements the consumer waits for before the leader is killed.
const SETTLED_BEFORE_KILL: usize = 300;
/// Credit the raw consumer grants (all of it at once: many outcomes in flight).
const CREDIT: u32 = 400;
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The `seq` application property of a raw message: the str8 key `seq` followed by a
/// ulong (0x80), smallulong (0x53) or ulong0 (0x44).
fn raw_seq(payload: &[u8]) -> u64 {
    let key = b"\xa1\x03seq";
    let at = payload
        .windows(key.len())
        .position(|w| w == key)
        .expect("message has a seq property")
        + key.len();
    match payload[at] {
        0x80 => u64::from_be_bytes(payload[at + 1..at + 9].try_into().expect("8 bytes")),
        0x53 => u64::from(payload[at + 1]),
        0x44 => 0,
        other => panic!("seq is not a ulong (constructor {other:#x})"),
    }
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("amqp://")
        .parse()
        .expect("node URL is amqp://ip:port")
}

/// Consumes with receiver-settle-mode second from `addr` until `settled_target` deliveries
/// were settled by the broker; returns (settled seqs, accepted-but-unsettled seqs).
async fn consume_settling_second(
    addr: SocketAddr,
    settled_target: usize,
) -> (HashSet<u64>, HashSet<u64>) {
    let mut c = Client::open(addr).await.expect("raw connect");
    let answer = c
        .attach_receiver_settling(0, 0, "second", QUEUE, ReceiverSettleMode::Second)
        .await;
    assert_eq!(
        answer.rcv_settle_mode,
        ReceiverSettleMode::Second,
        "the broker keeps receiver-settle-mode second"
    );
    c.flow(0, 0, CREDIT, false).await;
    let mut seq_of_delivery: HashMap<u32, u64> = HashMap::new();
    let mut settled = HashSet::new();
    while settled.len() < settled_target {
        let f = c.next_frame().await;
        match f.performative {
            Performative::Transfer(t) => {
                let id = t.delivery_id.expect("first frame of a delivery has an id");
                assert!(!t.settled.unwrap_or(false), "deliveries come unsettled");
                seq_of_delivery.insert(id, raw_seq(&f.payload));
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
            Performative::Disposition(d) if d.role == Role::Sender => {
                assert!(d.settled, "the broker's answer to an accept settles it");
                assert!(
                    matches!(d.state, Some(DeliveryState::Accepted(_))),
                    "the settlement echoes the outcome: {:?}",
                    d.state
                );
                for id in d.first..=d.last.unwrap_or(d.first) {
                    let seq = seq_of_delivery
                        .get(&id)
                        .unwrap_or_else(|| panic!("settlement of unknown delivery {id}"));
                    settled.insert(*seq);
                }
            }
            Performative::Flow(Flow { .. }) => {}
            other => panic!("unexpected frame while consuming: {other:?}"),
        }
    }
    let pending = seq_of_delivery
        .values()
        .filter(|s| !settled.contains(s))
        .copied()
        .collect();
    (settled, pending)
}

#[test]
fn a_delivery_settled_second_never_comes_back_after_the_leader_dies() {
    let rt = runtime();
    let mut cluster = Cluster::isolated(3);
    let leader = cluster.start(&[0, 1, 2], STEP_TIMEOUT);
    let produced = Load::start(
        &rt,
        LoadConfig {
            queue: QUEUE.into(),
            urls: cluster.urls(&[0, 1, 2]),
            seqs: 0..MESSAGES,
            producers: 2,
            in_flight: 100,
        },
    )
    .finish(&rt, STEP_TIMEOUT);

    let addr = addr_of(&cluster.urls(&[leader])[0]);
    let started = Instant::now();
    let (settled, unsettled) = rt.block_on(async {
        tokio::time::timeout(
            STEP_TIMEOUT,
            consume_settling_second(addr, SETTLED_BEFORE_KILL),
        )
        .await
        .expect("settlements within the step timeout")
    });
    // No convergence wait: the leader dies right after the last settlement it sent.
    cluster.kill(leader);
    eprintln!(
        "{} settled, {} accepted and not yet settled after {:?}; leader {leader} killed",
        settled.len(),
        unsettled.len(),
        started.elapsed()
    );
    let survivor = cluster.wait_leader(|id| id != leader, STEP_TIMEOUT);
    // Accepted and not settled yet: the acknowledgement may or may not have committed, so
    // these may come back (once) or not; every other unsettled message must.
    let expected: HashSet<u64> = produced
        .seqs
        .iter()
        .filter(|s| !settled.contains(s) && !unsettled.contains(s))
        .copied()
        .collect();
    let received = rt.block_on(drain(
        &cluster.urls(&[survivor])[0],
        QUEUE,
        &expected,
        STEP_TIMEOUT,
    ));
    let back: Vec<u64> = received
        .keys()
        .filter(|s| settled.contains(s) && !produced.resent.contains(s))
        .copied()
        .collect();
    assert!(
        back.is_empty(),
        "{} deliveries the broker had settled came back after the failover, e.g. {:?}",
        back.len(),
        &back[..back.len().min(20)]
    );
    let undecided = received.keys().filter(|s| unsettled.contains(s)).count();
    eprintln!("{undecided} of the accepted-but-unsettled came back");
    let rest = Accepted {
        seqs: expected,
        resent: produced.resent.clone(),
    };
    assert_none_lost(&rest, &received);
}

/// Goal: failed delivery attempts are replicated like acknowledgements: after the leader
/// dies, the new leader redelivers the message with the count it had reached, and the
/// attempt that reaches `max-delivery-attempts` dead-letters it there.
#[test]
fn failed_attempts_carry_over_to_the_new_leader() {
    use fe2o3_amqp::link::receiver::CreditMode;
    use fe2o3_amqp::types::messaging::{Body, Message, Modified};
    use fe2o3_amqp::{Connection, Receiver, Sender, Session};

    const JOBS: &str = "settle.poison";
    let failed = || Modified {
        delivery_failed: Some(true),
        undeliverable_here: None,
        message_annotations: None,
    };
    let count_of = |m: &Message<Body<fe2o3_amqp::types::primitives::Value>>| {
        m.header.as_ref().map_or(0, |h| h.delivery_count)
    };
    let rt = runtime();
    let mut cluster = Cluster::isolated(3);
    cluster.serve_args(&["--max-delivery-attempts", "3"]);
    let leader = cluster.start(&[0, 1, 2], STEP_TIMEOUT);
    let term = cluster.leader_term(STEP_TIMEOUT);
    let url = cluster.urls(&[leader])[0].clone();
    rt.block_on(async {
        let mut conn = Connection::open("poison-producer", url.as_str())
            .await
            .unwrap();
        let mut session = Session::begin(&mut conn).await.unwrap();
        let mut sender = Sender::attach(&mut session, "s", JOBS).await.unwrap();
        sender
            .send("poison")
            .await
            .unwrap()
            .accepted_or_else(|o| o)
            .unwrap();
        let mut receiver = Receiver::builder()
            .name("r")
            .source(JOBS)
            .credit_mode(CreditMode::Manual)
            .attach(&mut session)
            .await
            .unwrap();
        for attempt in 0..2 {
            receiver.set_credit(1).await.unwrap();
            let d = tokio::time::timeout(STEP_TIMEOUT, receiver.recv::<Body<_>>())
                .await
                .expect("delivery in time")
                .unwrap();
            assert_eq!(count_of(d.message()), attempt);
            receiver.modify(&d, failed()).await.unwrap();
        }
        receiver.close().await.unwrap();
        sender.close().await.unwrap();
        conn.close().await.unwrap();
    });
    // The counts are committed before the leader goes (they were recorded, not settled).
    assert!(
        cluster.settle_consumption(term, STEP_TIMEOUT),
        "the leadership changed under a quiet cluster"
    );
    cluster.kill(leader);
    let survivor = cluster.wait_leader(|id| id != leader, STEP_TIMEOUT);
    let url = cluster.urls(&[survivor])[0].clone();
    rt.block_on(async {
        let mut conn = Connection::open("poison-consumer", url.as_str())
            .await
            .unwrap();
        let mut session = Session::begin(&mut conn).await.unwrap();
        let mut receiver = Receiver::attach(&mut session, "r2", JOBS).await.unwrap();
        let d = tokio::time::timeout(STEP_TIMEOUT, receiver.recv::<Body<_>>())
            .await
            .expect("redelivery in time")
            .unwrap();
        assert_eq!(
            count_of(d.message()),
            2,
            "the new leader forgot the failed attempts"
        );
        receiver.modify(&d, failed()).await.unwrap();
        let mut dlq = Receiver::attach(&mut session, "dlq", "DLQ").await.unwrap();
        let dead = tokio::time::timeout(STEP_TIMEOUT, dlq.recv::<Body<_>>())
            .await
            .expect("dead-lettered in time")
            .unwrap();
        assert_eq!(count_of(dead.message()), 3);
        dlq.accept(&dead).await.unwrap();
        receiver.close().await.unwrap();
        dlq.close().await.unwrap();
        conn.close().await.unwrap();
    });
}
