//! Declared address types beyond queue and topic: `anycast` and `multicast` (in memory,
//! at-most-once) and `subscription` (a named durable subscription on a topic).
//!
//! Goal: anycast gives each message to one receiver, round robin, and holds a producer
//! back by credit while no receiver is attached; multicast gives each message to every
//! receiver and releases it when there is none; neither writes to the store; a declared
//! subscription collects a topic's messages before any receiver attaches, and closing a
//! receiver's link does not delete it.
//!
//! Method: the real binary with `--manifests` (one space, anonymous allowed), fe2o3-amqp
//! clients; "not delivered" is a bounded receive that times out.

use std::path::Path;
use std::time::Duration;

use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::link::SenderAttachError;
use fe2o3_amqp::types::definitions::{AmqpError, ErrorCondition};
use fe2o3_amqp::types::messaging::{Outcome, Source};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use tokio::time::timeout;

use crate::harness::BrokerProcess;

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(500);

type Conn = fe2o3_amqp::connection::ConnectionHandle<()>;
type Sess = fe2o3_amqp::session::SessionHandle<()>;

const MANIFESTS: &str = "\
apiVersion: admin.enmasse.io/v1beta2
kind: AddressSpacePlan
metadata: {name: standard}
spec: {}
---
apiVersion: admin.enmasse.io/v1beta2
kind: AddressPlan
metadata: {name: standard}
spec: {}
---
apiVersion: enmasse.io/v1beta1
kind: AddressSpace
metadata: {name: app}
spec: {type: standard, plan: standard, allowAnonymous: true}
---
apiVersion: enmasse.io/v1beta1
kind: Address
metadata: {name: app.work}
spec: {address: work, type: anycast, plan: standard}
---
apiVersion: enmasse.io/v1beta1
kind: Address
metadata: {name: app.news}
spec: {address: news, type: multicast, plan: standard}
---
apiVersion: enmasse.io/v1beta1
kind: Address
metadata: {name: app.events}
spec: {address: events, type: topic, plan: standard}
---
apiVersion: enmasse.io/v1beta1
kind: Address
metadata: {name: app.events-audit}
spec: {address: events-audit, type: subscription, topic: events, plan: standard}
";

fn start(root: &Path) -> BrokerProcess {
    let dir = root.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("app.yaml"), MANIFESTS).unwrap();
    BrokerProcess::start(&root.join("data"), &["--manifests", dir.to_str().unwrap()])
}

async fn connect(broker: &BrokerProcess) -> (Conn, Sess) {
    let mut conn = timeout(
        WAIT,
        Connection::builder()
            .container_id("types-test")
            .hostname("app")
            .open(broker.url().as_str()),
    )
    .await
    .expect("open in time")
    .expect("open");
    let session = Session::begin(&mut conn).await.expect("begin");
    (conn, session)
}

async fn sender(s: &mut Sess, address: &str) -> Sender {
    timeout(WAIT, Sender::attach(s, format!("to-{address}"), address))
        .await
        .expect("attach in time")
        .expect("attach sender")
}

async fn receiver(s: &mut Sess, name: &str, address: &str) -> Receiver {
    timeout(
        WAIT,
        Receiver::builder()
            .name(name)
            .source(Source::builder().address(address).build())
            .credit_mode(CreditMode::Auto(100))
            .attach(s),
    )
    .await
    .expect("attach in time")
    .expect("attach receiver")
}

async fn send(tx: &mut Sender, body: &str) -> Outcome {
    timeout(WAIT, tx.send(body.to_string()))
        .await
        .expect("settled in time")
        .expect("send")
}

async fn recv(rx: &mut Receiver) -> Option<String> {
    let d = timeout(QUIET, rx.recv::<String>())
        .await
        .ok()?
        .expect("recv");
    rx.accept(&d).await.expect("accept");
    Some(d.body().clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anycast_gives_each_message_to_one_receiver_and_waits_for_one() {
    let root = tempfile::tempdir().unwrap();
    let broker = start(root.path());
    let (_c, mut s) = connect(&broker).await;
    // No receiver yet: the producer gets no credit.
    let mut tx = sender(&mut s, "work").await;
    let first = tokio::spawn(async move {
        let outcome = tx.send("w0".to_string()).await;
        (tx, outcome)
    });
    tokio::time::sleep(QUIET).await;
    assert!(
        !first.is_finished(),
        "anycast producer got credit without a receiver"
    );

    let (_c2, mut s2) = connect(&broker).await;
    let mut a = receiver(&mut s2, "a", "work").await;
    let mut b = receiver(&mut s2, "b", "work").await;
    let (mut tx, outcome) = timeout(WAIT, first)
        .await
        .expect("credit once a receiver attached")
        .unwrap();
    assert!(matches!(outcome, Ok(Outcome::Accepted(_))), "{outcome:?}");
    for i in 1..5 {
        assert!(matches!(
            send(&mut tx, &format!("w{i}")).await,
            Outcome::Accepted(_)
        ));
    }
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    while let Some(m) = recv(&mut a).await {
        got_a.push(m);
    }
    while let Some(m) = recv(&mut b).await {
        got_b.push(m);
    }
    let mut all = [got_a.clone(), got_b.clone()].concat();
    all.sort();
    assert_eq!(
        all,
        ["w0", "w1", "w2", "w3", "w4"],
        "each message exactly once"
    );
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "round robin: {got_a:?} / {got_b:?}"
    );
    // Nothing went through the store.
    assert_eq!(
        broker.metric("entrepot_queue_depth{queue=\"app/work\"}"),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multicast_gives_every_receiver_each_message_and_releases_it_without_one() {
    let root = tempfile::tempdir().unwrap();
    let broker = start(root.path());
    let (_c, mut s) = connect(&broker).await;
    let mut tx = sender(&mut s, "news").await;
    let outcome = send(&mut tx, "nobody listens").await;
    assert!(matches!(outcome, Outcome::Released(_)), "{outcome:?}");

    let mut a = receiver(&mut s, "a", "news").await;
    let mut b = receiver(&mut s, "b", "news").await;
    assert!(matches!(send(&mut tx, "hello").await, Outcome::Accepted(_)));
    assert_eq!(recv(&mut a).await.as_deref(), Some("hello"));
    assert_eq!(recv(&mut b).await.as_deref(), Some("hello"));
    assert_eq!(
        recv(&mut a).await,
        None,
        "the released message was delivered later"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_subscription_collects_its_topic_before_and_after_a_receiver() {
    let root = tempfile::tempdir().unwrap();
    let broker = start(root.path());
    let (_c, mut s) = connect(&broker).await;
    let mut tx = sender(&mut s, "events").await;
    assert!(matches!(send(&mut tx, "e0").await, Outcome::Accepted(_)));

    let mut rx = receiver(&mut s, "auditor", "events-audit").await;
    assert_eq!(recv(&mut rx).await.as_deref(), Some("e0"));
    // Closing the link (closed = true) does not delete a declared subscription.
    rx.close().await.unwrap();
    assert!(matches!(send(&mut tx, "e1").await, Outcome::Accepted(_)));
    let mut rx = receiver(&mut s, "auditor-2", "events-audit").await;
    assert_eq!(recv(&mut rx).await.as_deref(), Some("e1"));

    // Sending to a subscription is refused.
    let refused = timeout(WAIT, Sender::attach(&mut s, "wrong", "events-audit"))
        .await
        .unwrap();
    assert!(
        matches!(&refused, Err(SenderAttachError::RemoteClosedWithError(e))
            if e.condition == ErrorCondition::AmqpError(AmqpError::NotAllowed)),
        "a sender to a subscription is refused with amqp:not-allowed: {refused:?}"
    );
}
