//! The HTTP endpoint: health probes and the Prometheus metrics an operator relies on.
//!
//! Goal: `/healthz` and `/readyz` answer 200 on a running broker; `/metrics` reports each
//! queue's depth as it really is after sends, deliveries and accepts, the message log's
//! fsync latency histogram has observations once messages were stored, and the broker's
//! read→accepted histogram one per accepted transfer.
//!
//! Method: drive a queue with fe2o3-amqp to known states and read `/metrics` over plain
//! HTTP. A queue's depth is exact as soon as the producer holds its `accepted` (a message
//! enters its queue before that disposition goes out); after a consumer's accept the test
//! closes the consumer's link, whose detach reply shows the broker handled the accepts.

use std::future::Future;
use std::time::Duration;

use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use tokio::time::timeout;

use crate::harness::BrokerProcess;

/// Longest any single client operation may take.
const WAIT: Duration = Duration::from_secs(5);

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {WAIT:?}"))
}

/// The broker's metrics answer, fetched off the async runtime (the harness's HTTP
/// client blocks).
async fn metric(broker: &BrokerProcess, series: &str) -> Option<f64> {
    tokio::task::block_in_place(|| broker.metric(series))
}

/// The value of `series` in a scraped body.
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        l.strip_prefix(series)
            .filter(|rest| rest.starts_with(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_probes_answer_200() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    for path in ["/healthz", "/readyz"] {
        let (status, _) = tokio::task::block_in_place(|| broker.http_get(path));
        assert_eq!(status, "HTTP/1.1 200 OK", "{path}");
    }
    let (status, _) = tokio::task::block_in_place(|| broker.http_get("/no-such-page"));
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_depth_follows_sends_and_accepts_and_fsyncs_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let depth = r#"entrepot_queue_depth{queue="invoices"}"#;
    let unsettled = r#"entrepot_queue_unsettled{queue="invoices"}"#;
    assert_eq!(
        metric(&broker, depth).await,
        None,
        "no queue before first use"
    );

    let mut conn = within("open", Connection::open("metrics", broker.url().as_str()))
        .await
        .unwrap();
    let mut session = within("begin", Session::begin(&mut conn)).await.unwrap();
    let mut sender = within("attach", Sender::attach(&mut session, "s", "invoices"))
        .await
        .unwrap();
    for i in 0..5 {
        within("send", sender.send(format!("invoice {i}")))
            .await
            .unwrap()
            .accepted_or_else(|o| o)
            .unwrap();
    }
    assert_eq!(metric(&broker, depth).await, Some(5.0));
    assert_eq!(metric(&broker, unsettled).await, Some(0.0));

    let mut receiver = within(
        "attach",
        Receiver::builder()
            .name("r")
            .source("invoices")
            .credit_mode(CreditMode::Manual)
            .attach(&mut session),
    )
    .await
    .unwrap();
    within("credit", receiver.set_credit(2)).await.unwrap();
    let mut delivered = Vec::new();
    for _ in 0..2 {
        delivered.push(within("recv", receiver.recv::<String>()).await.unwrap());
    }
    assert_eq!(
        metric(&broker, depth).await,
        Some(5.0),
        "delivered but unsettled messages still count"
    );
    assert_eq!(metric(&broker, unsettled).await, Some(2.0));

    for d in &delivered {
        within("accept", receiver.accept(d)).await.unwrap();
    }
    within("close", receiver.close()).await.unwrap();
    assert_eq!(metric(&broker, depth).await, Some(3.0));
    assert_eq!(metric(&broker, unsettled).await, Some(0.0));
    assert_eq!(
        metric(
            &broker,
            r#"entrepot_queue_enqueued_total{queue="invoices"}"#
        )
        .await,
        Some(5.0)
    );
    assert_eq!(
        metric(
            &broker,
            r#"entrepot_queue_acknowledged_total{queue="invoices"}"#
        )
        .await,
        Some(2.0)
    );

    // One scrape, so count and buckets describe the same moment.
    let (_, body) = tokio::task::block_in_place(|| broker.http_get("/metrics"));
    let syncs = value(&body, "entrepot_fsync_seconds_count").expect("fsync histogram count");
    assert!(
        syncs > 0.0,
        "sync=always stored 5 messages without an fsync"
    );
    assert_eq!(
        value(&body, r#"entrepot_fsync_seconds_bucket{le="+Inf"}"#),
        Some(syncs),
        "the +Inf bucket holds every observation"
    );
    let sum = value(&body, "entrepot_fsync_seconds_sum");
    assert!(
        sum.is_some_and(|s| s > 0.0),
        "{syncs} fsyncs took no time at all: {sum:?}"
    );
    // The broker's share of produce->accepted: one observation per accepted transfer
    // (the 5 sends; the consumer's accepts are not produces), each at least an fsync.
    assert_eq!(
        value(&body, "entrepot_produce_accept_seconds_count"),
        Some(5.0),
        "one read->accepted observation per accepted transfer"
    );
    assert_eq!(
        value(
            &body,
            r#"entrepot_produce_accept_seconds_bucket{le="+Inf"}"#
        ),
        Some(5.0)
    );
    let accept_sum = value(&body, "entrepot_produce_accept_seconds_sum");
    assert!(
        accept_sum.is_some_and(|s| s > 0.0),
        "accepts after an fsync took no time at all: {accept_sum:?}"
    );
    within("close", sender.close()).await.unwrap();
    within("close", conn.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entrepot_status_lists_queues_with_their_depth_and_consumers() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut conn = fe2o3_amqp::Connection::open("status", broker.url().as_str())
        .await
        .unwrap();
    let mut session = fe2o3_amqp::Session::begin(&mut conn).await.unwrap();
    let mut sender = fe2o3_amqp::Sender::attach(&mut session, "s", "status-q")
        .await
        .unwrap();
    for _ in 0..2 {
        sender
            .send("x")
            .await
            .unwrap()
            .accepted_or_else(|o| o)
            .unwrap();
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_entrepot"))
        .args(["status", "--http", &broker.http.to_string()])
        .output()
        .expect("run entrepot status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let parsed: serde_yaml::Value = serde_yaml::from_str(&text).expect("status is YAML");
    let queue = parsed["queues"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "status-q")
        .expect("queue listed")
        .clone();
    assert_eq!(queue["ready"].as_u64(), Some(2), "{text}");
    assert_eq!(parsed["connections"].as_u64(), Some(1), "{text}");
    sender.close().await.unwrap();
    conn.close().await.unwrap();
    let down = std::process::Command::new(env!("CARGO_BIN_EXE_entrepot"))
        .args(["status", "--http", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(
        !down.status.success(),
        "status of an unreachable node fails"
    );
}
