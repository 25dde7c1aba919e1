//! A leader that was paused and resumes delivers nothing from its stale queues.
//!
//! Goal: the delivery lease (`src/raft/lease.rs`). A SIGSTOPped leader is deposed while
//! it sleeps; the new leader delivers its messages and they are accepted. When the old
//! leader resumes it still believes it leads for a moment, and its in-memory queue still
//! holds those messages: without the lease it hands them to the consumer connected to it
//! (duplicates of accepted messages); with it, nothing goes out, because the lease it held
//! was anchored before the pause and has expired, and a deposed leader never renews it.
//!
//! Method: three real `entrepot serve` processes on loopback. [`MESSAGES`] accepted
//! messages wait in a queue; a raw consumer attached directly to the leader holds no
//! credit. The leader is SIGSTOPped; the consumer grants credit (the flow waits in the
//! stopped node's socket buffer, so the old leader reads it first thing on resume); a
//! survivor leads and a second consumer takes and accepts every message there. Then
//! SIGCONT. Asserted: the raw consumer receives no transfer before its connection ends
//! or goes quiet, its connection is closed with `amqp:connection:forced` (go to the new
//! leader), the old leader logged and counted the lapse of its lease
//! (`entrepot_cluster_lease_lapses_total`), and the new leader holds its own
//! (`entrepot_cluster_lease_held`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use fe2o3_amqp::types::definitions::ConnectionError;
use fe2o3_amqp::types::messaging::Source;
use fe2o3_amqp::types::performatives::Performative;
use fe2o3_amqp::{Connection, Sender, Session};

use crate::cluster_support::{consume, Cluster};
use crate::raw_client::Client;

const QUEUE: &str = "lease.stale";
const MESSAGES: usize = 20;
/// Credit the consumer on the paused leader grants (more than the queue holds).
const CREDIT: u32 = 100;
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
/// The resumed node's consumer is judged after this much silence (or the socket closing).
const QUIET: Duration = Duration::from_secs(3);

#[test]
fn a_resumed_deposed_leader_delivers_nothing_from_its_stale_queues() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut cluster = Cluster::on_loopback(3);
    let leader = cluster.start(&[0, 1, 2], STEP_TIMEOUT);
    let url = cluster.urls(&[leader])[0].clone();
    let mut stale = rt.block_on(async {
        let mut conn = Connection::open("lease-producer", url.as_str())
            .await
            .expect("connect");
        let mut session = Session::begin(&mut conn).await.expect("begin");
        let mut sender = Sender::attach(&mut session, "s", QUEUE)
            .await
            .expect("attach");
        for seq in 0..MESSAGES as u64 {
            let message = crate::cluster_support::message(seq);
            let outcome = sender.send(message).await.expect("send");
            assert!(outcome.is_accepted(), "message {seq} accepted");
        }
        sender.close().await.expect("close sender");
        conn.close().await.expect("close");
        let mut c = Client::open(cluster.amqp(leader))
            .await
            .expect("raw connect");
        c.attach_receiver(0, "stale", QUEUE).await;
        c
    });
    cluster.freeze(leader, true);
    rt.block_on(stale.flow(0, 0, CREDIT, false));
    let survivor = cluster.wait_leader(|id| id != leader, STEP_TIMEOUT);
    let url = cluster.urls(&[survivor])[0].clone();
    let consumed = rt.block_on(consume(
        &url,
        "lease-consumer",
        "fresh",
        Source::builder().address(QUEUE).build(),
        MESSAGES,
        &HashSet::new(),
        STEP_TIMEOUT,
    ));
    assert_eq!(
        consumed.len(),
        MESSAGES,
        "the new leader delivers every message"
    );
    cluster.freeze(leader, false);
    let frames = rt.block_on(stale.frames_until_quiet_or_closed(QUIET));
    let transfers = frames
        .iter()
        .filter(|f| matches!(f.performative, Performative::Transfer(_)))
        .count();
    let others: Vec<&Performative> = frames
        .iter()
        .map(|f| &f.performative)
        .filter(|p| !matches!(p, Performative::Transfer(_)))
        .collect();
    eprintln!("the resumed old leader sent its consumer: {others:?}");
    assert_eq!(
        transfers, 0,
        "the resumed old leader delivered {transfers} messages the new leader had delivered \
         and had accepted; its other frames: {others:?}"
    );
    assert!(
        others.iter().any(
            |p| matches!(p, Performative::Close(c) if c.error.as_ref().is_some_and(
                |e| e.condition == ConnectionError::ConnectionForced.into()
            ))
        ),
        "the resumed old leader closes its consumer's connection (connection-forced); sent \
         {others:?}"
    );
    assert!(
        cluster.log_count(leader, "delivery lease lapsed") >= 1,
        "the resumed leader logs the lapse of its lease"
    );
    let lapses = cluster.metric(leader, "entrepot_cluster_lease_lapses_total");
    assert!(
        lapses.is_some_and(|n| n >= 1.0),
        "the resumed leader counts the lapse: {lapses:?}"
    );
    // Renewed every 40 ms: a loaded machine may catch it between a lapse and a renewal.
    let deadline = Instant::now() + STEP_TIMEOUT;
    while cluster.metric(survivor, "entrepot_cluster_lease_held") != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "the new leader never holds its lease"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
