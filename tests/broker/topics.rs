//! Topics and subscriptions, end to end with fe2o3-amqp clients against the real binary:
//! fan-out to non-durable subscribers, durable subscriptions that survive detach, restart
//! and SIGKILL, shared subscriptions, selectors, replay and per-subscription outcomes.
//! Every receive is bounded by a timeout; "not delivered" is a receive that times out.

use std::time::Duration;

use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::link::ReceiverAttachError;
use fe2o3_amqp::types::definitions::{AmqpError, ErrorCondition};
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Message, Source, TerminusDurability, TerminusExpiryPolicy,
};
use fe2o3_amqp::types::primitives::{Symbol, Timestamp, Value};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;

use crate::harness::BrokerProcess;

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(400);

type Conn = fe2o3_amqp::connection::ConnectionHandle<()>;
type Sess = fe2o3_amqp::session::SessionHandle<()>;

async fn connect(broker: &BrokerProcess, container: &str) -> (Conn, Sess) {
    let mut conn = tokio::time::timeout(
        WAIT,
        Connection::builder()
            .container_id(container)
            .open(broker.url().as_str()),
    )
    .await
    .expect("open in time")
    .expect("open");
    let session = Session::begin(&mut conn).await.expect("begin");
    (conn, session)
}

fn durable_source(topic: &str) -> fe2o3_amqp::types::messaging::SourceBuilder {
    Source::builder()
        .address(topic)
        .durable(TerminusDurability::UnsettledState)
        .expiry_policy(TerminusExpiryPolicy::Never)
        .capabilities(vec![Symbol::from("topic")])
}

async fn attach(session: &mut Sess, name: &str, source: Source) -> Receiver {
    tokio::time::timeout(
        WAIT,
        Receiver::builder()
            .name(name)
            .source(source)
            .credit_mode(CreditMode::Auto(100))
            .attach(session),
    )
    .await
    .expect("attach in time")
    .expect("attach")
}

async fn publish(
    session: &mut Sess,
    topic: &str,
    bodies: impl IntoIterator<Item = (String, &'static str)>,
) {
    let mut sender = Sender::attach(session, format!("pub-{topic}"), topic)
        .await
        .expect("sender");
    for (body, color) in bodies {
        let msg = Message::builder()
            .application_properties(
                ApplicationProperties::builder()
                    .insert("color", color)
                    .build(),
            )
            .value(body)
            .build();
        tokio::time::timeout(WAIT, sender.send(msg))
            .await
            .expect("send in time")
            .expect("send")
            .accepted_or_else(|o| o)
            .expect("accepted");
    }
    sender.close().await.expect("close sender");
}

async fn recv_all(receiver: &mut Receiver, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let d = tokio::time::timeout(WAIT, receiver.recv::<String>())
            .await
            .expect("message in time")
            .expect("recv");
        out.push(d.body().clone());
        receiver.accept(&d).await.expect("accept");
    }
    out
}

async fn nothing_more(receiver: &mut Receiver) {
    let r = tokio::time::timeout(QUIET, receiver.recv::<String>()).await;
    assert!(
        r.is_err(),
        "expected no further message, got {:?}",
        r.map(|d| d.map(|d| d.body().clone()))
    );
}

fn bodies(prefix: &str, n: usize) -> Vec<(String, &'static str)> {
    (0..n)
        .map(|i| {
            (
                format!("{prefix}{i}"),
                if i % 2 == 0 { "red" } else { "blue" },
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_non_durable_subscriber_gets_every_message_published_after_it_attached() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let (_c, mut s) = connect(&broker, "fanout").await;
    publish(&mut s, "topic.news", bodies("early", 2)).await;
    let mut a = attach(&mut s, "a", Source::builder().address("topic.news").build()).await;
    let mut b = attach(&mut s, "b", Source::builder().address("topic.news").build()).await;
    publish(&mut s, "topic.news", bodies("m", 5)).await;
    let expected: Vec<String> = (0..5).map(|i| format!("m{i}")).collect();
    assert_eq!(recv_all(&mut a, 5).await, expected);
    assert_eq!(recv_all(&mut b, 5).await, expected);
    nothing_more(&mut a).await;
    let depth = broker.metric("entrepot_topic_published_total{topic=\"topic.news\"}");
    assert_eq!(depth, Some(7.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_durable_subscriber_resumes_where_it_stopped_and_closing_deletes_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let (mut c, mut s) = connect(&broker, "jms-client-1").await;
    let mut sub = attach(
        &mut s,
        "orders-audit",
        durable_source("topic.orders").build(),
    )
    .await;
    publish(&mut s, "topic.orders", bodies("a", 3)).await;
    assert_eq!(recv_all(&mut sub, 3).await, ["a0", "a1", "a2"]);
    sub.detach()
        .await
        .map_err(|(_, e)| e)
        .expect("detach keeps the subscription");
    publish(&mut s, "topic.orders", bodies("b", 4)).await;
    s.end().await.unwrap();
    c.close().await.unwrap();

    let (mut c, mut s) = connect(&broker, "jms-client-1").await;
    let mut sub = attach(
        &mut s,
        "orders-audit",
        durable_source("topic.orders").build(),
    )
    .await;
    assert_eq!(
        recv_all(&mut sub, 4).await,
        ["b0", "b1", "b2", "b3"],
        "backlog kept, accepted ones gone"
    );
    nothing_more(&mut sub).await;
    sub.close().await.expect("close deletes the subscription");
    publish(&mut s, "topic.orders", bodies("c", 2)).await;
    let mut sub = attach(
        &mut s,
        "orders-audit",
        durable_source("topic.orders").build(),
    )
    .await;
    nothing_more(&mut sub).await;
    sub.close().await.unwrap();
    s.end().await.unwrap();
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_durable_subscriber_gets_everything_after_sigkill_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), &[]);
    {
        let (mut c, mut s) = connect(&broker, "jms-client-2").await;
        let mut sub = attach(&mut s, "audit", durable_source("topic.payments").build()).await;
        publish(&mut s, "topic.payments", bodies("x", 2)).await;
        assert_eq!(recv_all(&mut sub, 1).await, ["x0"]);
        // Let the acceptance reach the broker before the link goes away.
        sub.detach().await.map_err(|(_, e)| e).unwrap();
        publish(&mut s, "topic.payments", bodies("y", 3)).await;
        s.end().await.unwrap();
        c.close().await.unwrap();
    }
    broker.kill();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let (mut c, mut s) = connect(&broker, "jms-client-2").await;
    let mut sub = attach(&mut s, "audit", durable_source("topic.payments").build()).await;
    assert_eq!(recv_all(&mut sub, 4).await, ["x1", "y0", "y1", "y2"]);
    nothing_more(&mut sub).await;
    sub.close().await.unwrap();
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_global_subscribers_compete_for_one_stream() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let shared = || {
        durable_source("topic.work")
            .capabilities(vec![
                Symbol::from("topic"),
                Symbol::from("shared"),
                Symbol::from("global"),
            ])
            .build()
    };
    let (_c1, mut s1) = connect(&broker, "worker-a").await;
    let (_c2, mut s2) = connect(&broker, "worker-b").await;
    let mut w1 = attach(&mut s1, "jobs", shared()).await;
    let mut w2 = attach(&mut s2, "jobs|1", shared()).await;
    publish(&mut s1, "topic.work", bodies("j", 20)).await;
    let mut got = Vec::new();
    for _ in 0..20 {
        tokio::select! {
            d = w1.recv::<String>() => { let d = d.unwrap(); got.push(d.body().clone()); w1.accept(&d).await.unwrap(); }
            d = w2.recv::<String>() => { let d = d.unwrap(); got.push(d.body().clone()); w2.accept(&d).await.unwrap(); }
            _ = tokio::time::sleep(WAIT) => panic!("only {} of 20 delivered", got.len()),
        }
    }
    got.sort();
    let mut expected: Vec<String> = (0..20).map(|i| format!("j{i}")).collect();
    expected.sort();
    assert_eq!(
        got, expected,
        "each message exactly once across the shared subscription"
    );
    nothing_more(&mut w1).await;
    nothing_more(&mut w2).await;
}

fn selector(expr: &str) -> Described<Value> {
    Described {
        descriptor: Descriptor::Code(0x0000_468C_0000_0004),
        value: Value::String(expr.to_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selector_filters_and_an_invalid_one_refuses_the_attach() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let (_c, mut s) = connect(&broker, "selective").await;
    let source = Source::builder()
        .address("topic.paint")
        .add_to_filter(
            "apache.org:selector-filter:string",
            selector("color = 'red'"),
        )
        .build();
    let mut red = attach(&mut s, "red-only", source).await;
    publish(&mut s, "topic.paint", bodies("p", 6)).await;
    assert_eq!(recv_all(&mut red, 3).await, ["p0", "p2", "p4"]);
    nothing_more(&mut red).await;

    let (_c2, mut s2) = connect(&broker, "selective-2").await;
    let bad = Source::builder()
        .address("topic.paint")
        .add_to_filter(
            "apache.org:selector-filter:string",
            selector("color = = 'red'"),
        )
        .build();
    let err = tokio::time::timeout(
        WAIT,
        Receiver::builder().name("bad").source(bad).attach(&mut s2),
    )
    .await
    .expect("answer in time")
    .expect_err("invalid selector must refuse the attach");
    assert!(
        matches!(&err, ReceiverAttachError::RemoteClosedWithError(e)
            if e.condition == ErrorCondition::AmqpError(AmqpError::InvalidField)),
        "an invalid selector refuses the attach with amqp:invalid-field: {err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_can_replay_retained_messages_from_first_last_an_offset_or_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("entrepot.yaml");
    std::fs::write(&config, "topic-retention-bytes: 1048576\n").unwrap();
    let data = dir.path().join("data");
    let broker = BrokerProcess::start(&data, &["--config", config.to_str().unwrap()]);
    let (_c, mut s) = connect(&broker, "replayer").await;
    publish(&mut s, "topic.history", bodies("h", 4)).await;
    let from_first = Source::builder()
        .address("topic.history")
        .add_to_filter_using_legacy_format("entrepot:offset-spec", Value::String("first".into()))
        .build();
    let mut all = attach(&mut s, "from-first", from_first).await;
    assert_eq!(recv_all(&mut all, 4).await, ["h0", "h1", "h2", "h3"]);
    let from_last = Source::builder()
        .address("topic.history")
        .add_to_filter_using_legacy_format("entrepot:offset-spec", Value::String("last".into()))
        .build();
    let mut last = attach(&mut s, "from-last", from_last).await;
    assert_eq!(recv_all(&mut last, 1).await, ["h3"]);
    nothing_more(&mut last).await;
    // A log offset: the topic's log starts at 0, so offset 2 is h2.
    let from_offset = Source::builder()
        .address("topic.history")
        .add_to_filter_using_legacy_format("entrepot:offset-spec", Value::Ulong(2))
        .build();
    let mut at_two = attach(&mut s, "from-offset", from_offset).await;
    assert_eq!(recv_all(&mut at_two, 2).await, ["h2", "h3"]);
    nothing_more(&mut at_two).await;
    // A timestamp: a millisecond strictly after h3 was stored (h3 was accepted, so its
    // store time is at most `stored_before`) and at or before h4 and h5 were sent.
    let stored_before = now_ms();
    let mut since = now_ms();
    while since <= stored_before {
        tokio::task::yield_now().await;
        since = now_ms();
    }
    publish(&mut s, "topic.history", bodies("late", 2)).await;
    let from_time = Source::builder()
        .address("topic.history")
        .add_to_filter_using_legacy_format(
            "entrepot:offset-spec",
            Value::Timestamp(Timestamp::from_milliseconds(since)),
        )
        .build();
    let mut recent = attach(&mut s, "from-time", from_time).await;
    assert_eq!(recv_all(&mut recent, 2).await, ["late0", "late1"]);
    nothing_more(&mut recent).await;
    let bad = Source::builder()
        .address("topic.history")
        .add_to_filter_using_legacy_format(
            "entrepot:offset-spec",
            Value::String("yesterday".into()),
        )
        .build();
    let refused = tokio::time::timeout(
        WAIT,
        Receiver::builder().name("bad").source(bad).attach(&mut s),
    )
    .await
    .expect("in time");
    assert!(
        matches!(&refused, Err(ReceiverAttachError::RemoteClosedWithError(e))
            if e.condition == ErrorCondition::AmqpError(AmqpError::InvalidField)),
        "an unknown offset spec refuses the attach with amqp:invalid-field: {refused:?}"
    );
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_rejected_by_one_subscription_is_dead_lettered_without_affecting_another() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let (_c, mut s) = connect(&broker, "outcomes").await;
    let mut a = attach(&mut s, "a", durable_source("topic.bills").build()).await;
    let mut b = attach(&mut s, "b", durable_source("topic.bills").build()).await;
    publish(&mut s, "topic.bills", bodies("bill", 1)).await;
    let d = tokio::time::timeout(WAIT, a.recv::<String>())
        .await
        .unwrap()
        .unwrap();
    a.reject(&d, None).await.unwrap();
    assert_eq!(recv_all(&mut b, 1).await, ["bill0"]);
    let mut dlq = attach(&mut s, "dlq", Source::builder().address("DLQ").build()).await;
    assert_eq!(recv_all(&mut dlq, 1).await, ["bill0"]);
    nothing_more(&mut a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_over_its_backlog_limit_drops_its_oldest_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("entrepot.yaml");
    std::fs::write(&config, "subscription-backlog-max: 5\n").unwrap();
    let broker = BrokerProcess::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let (_c, mut s) = connect(&broker, "slow-reader").await;
    let sub = attach(&mut s, "slow", durable_source("topic.flood").build()).await;
    sub.detach().await.map_err(|(_, e)| e).unwrap();
    publish(&mut s, "topic.flood", bodies("f", 8)).await;
    let mut sub = attach(&mut s, "slow", durable_source("topic.flood").build()).await;
    assert_eq!(recv_all(&mut sub, 5).await, ["f3", "f4", "f5", "f6", "f7"]);
    nothing_more(&mut sub).await;
    let dropped = broker.metric("entrepot_subscription_dropped_total{topic=\"topic.flood\",subscription=\"slow-reader:slow\",durable=\"true\"}");
    assert_eq!(dropped, Some(3.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_block_policy_producers_wait_for_credit_until_the_backlog_drains() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("entrepot.yaml");
    std::fs::write(
        &config,
        "subscription-backlog-max: 5\nsubscription-backlog-policy: block\nlink-credit: 4\n",
    )
    .unwrap();
    let broker = BrokerProcess::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let (_c, mut s) = connect(&broker, "blocked-reader").await;
    let mut sub = attach(&mut s, "slow", durable_source("topic.dam").build()).await;
    let (_pc, mut ps) = connect(&broker, "blocked-writer").await;
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&accepted);
    let producer = tokio::spawn(async move {
        let mut sender = Sender::attach(&mut ps, "w", "topic.dam")
            .await
            .expect("sender");
        for i in 0..30 {
            let msg = Message::builder().value(format!("d{i}")).build();
            sender
                .send(msg)
                .await
                .expect("send")
                .accepted_or_else(|o| o)
                .expect("accepted");
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        sender.close().await.ok();
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let held = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (5..30).contains(&held),
        "the producer is held back near the limit, got {held} accepted"
    );
    let got = recv_all(&mut sub, 30).await;
    assert_eq!(
        got,
        (0..30).map(|i| format!("d{i}")).collect::<Vec<_>>(),
        "nothing dropped, all in order"
    );
    tokio::time::timeout(WAIT, producer)
        .await
        .expect("producer finishes")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topics_segments_are_deleted_once_every_durable_subscription_consumed_them() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(
        dir.path(),
        &["--segment-bytes", "262144", "--max-message-bytes", "65536"],
    );
    let (_c, mut s) = connect(&broker, "retention").await;
    let mut a = attach(&mut s, "a", durable_source("topic.big").build()).await;
    let mut b = attach(&mut s, "b", durable_source("topic.big").build()).await;
    let body = "x".repeat(8 * 1024);
    let mut sender = Sender::attach(&mut s, "pub-big", "topic.big")
        .await
        .unwrap();
    for _ in 0..100 {
        sender
            .send(body.clone())
            .await
            .unwrap()
            .accepted_or_else(|o| o)
            .unwrap();
    }
    sender.close().await.unwrap();
    let segments = |broker: &BrokerProcess| broker.metric("entrepot_store_segments").unwrap_or(0.0);
    assert!(segments(&broker) >= 3.0, "800 KiB in 256 KiB segments");
    recv_all(&mut a, 100).await;
    let deleted = broker
        .metric("entrepot_store_segments_deleted_total")
        .unwrap_or(0.0);
    assert_eq!(deleted, 0.0, "subscription b still needs every record");
    recv_all(&mut b, 100).await;
    let deadline = std::time::Instant::now() + WAIT;
    while broker
        .metric("entrepot_store_segments_deleted_total")
        .unwrap_or(0.0)
        < 2.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "consumed segments were not deleted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
