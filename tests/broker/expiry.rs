//! Message expiry: ttl and absolute-expiry-time.
//!
//! Goal: a message whose lifetime ends before anyone consumes it is never delivered from
//! its queue and shows up on `ExpiryQueue`, annotated with where it came from; a message
//! with a lifetime to spare is delivered as usual.
//!
//! Method: send with a short header ttl (or an absolute-expiry-time just ahead), wait
//! (bounded) for the copy on `ExpiryQueue` — the broker's housekeeping moves it — then show
//! that a receiver on the original queue gets nothing within a quiet period.

use std::time::{SystemTime, UNIX_EPOCH};

use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{AmqpValue, Header, Message, Properties};
use fe2o3_amqp::types::primitives::{Symbol, Timestamp, Value};
use fe2o3_amqp::{Delivery, Receiver, Sender};
use tokio::time::timeout;

use crate::client::{connect, within, QUIET};
use crate::harness::BrokerProcess;

async fn send(session: &mut SessionHandle<()>, address: &str, message: Message<AmqpValue<String>>) {
    let mut sender = within("attach sender", Sender::attach(session, "sender", address))
        .await
        .unwrap();
    within("send", sender.send(message))
        .await
        .unwrap()
        .accepted_or_else(|o| o)
        .unwrap();
    within("close sender", sender.close()).await.unwrap();
}

fn annotation<T>(d: &Delivery<T>, key: &str) -> Option<Value> {
    d.message()
        .message_annotations
        .as_ref()?
        .0
        .get(&OwnedKey::Symbol(Symbol::from(key)))
        .cloned()
}

fn with_ttl(body: &str, ttl_ms: u32) -> Message<AmqpValue<String>> {
    Message::builder()
        .header(Header::builder().ttl(ttl_ms).build())
        .value(body.to_owned())
        .build()
}

/// Grants `receiver` one credit and expects no delivery within [`QUIET`]: what it could
/// get has expired.
async fn credit_brings_nothing(receiver: &mut Receiver, who: &str) {
    within("credit", receiver.set_credit(1)).await.unwrap();
    let got = timeout(QUIET, receiver.recv::<String>()).await;
    assert!(
        got.is_err(),
        "{who}: credit granted after the ttl brought the expired message: {:?}",
        got.map(|r| r.map(|d| d.body().clone()))
    );
}

/// Expects `body` on `ExpiryQueue`, moved from `queue`, and nothing left on `queue`.
async fn assert_expired(session: &mut SessionHandle<()>, queue: &str, body: &str) {
    let mut expired = within(
        "attach",
        Receiver::attach(session, "expired", "ExpiryQueue"),
    )
    .await
    .unwrap();
    let d = within("expired message", expired.recv::<String>())
        .await
        .unwrap();
    assert_eq!(d.body(), body);
    assert_eq!(
        annotation(&d, "x-opt-original-address"),
        Some(Value::String(queue.into()))
    );
    within("accept", expired.accept(&d)).await.unwrap();

    let mut receiver = within("attach", Receiver::attach(session, "late", queue))
        .await
        .unwrap();
    let got = timeout(QUIET, receiver.recv::<String>()).await;
    assert!(
        got.is_err(),
        "an expired message was delivered: {:?}",
        got.map(|r| r.map(|d| d.body().clone()))
    );
    // Closing the links before the connection makes sure the accept went out (fe2o3 may
    // send a connection's close ahead of link frames still queued in its session).
    within("close", receiver.close()).await.unwrap();
    within("close", expired.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_ttl_passes_unconsumed_is_never_delivered_and_moves_to_the_expiry_queue() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let (mut conn, mut session) = connect(&broker, "expiry").await;
    send(&mut session, "offers", with_ttl("flash sale", 200)).await;
    assert_expired(&mut session, "offers", "flash sale").await;
    within("close", conn.close()).await.unwrap();
}

/// A consumer that is attached but grants no credit does not keep a message alive: it
/// expires on the queue, moves to `ExpiryQueue`, and credit granted afterwards brings
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_expires_while_a_consumer_without_credit_is_attached() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let (mut conn, mut session) = connect(&broker, "expiry").await;
    let mut waiting = within(
        "attach",
        Receiver::builder()
            .name("waiting")
            .source("offers")
            .credit_mode(CreditMode::Manual)
            .attach(&mut session),
    )
    .await
    .unwrap();
    send(&mut session, "offers", with_ttl("flash sale", 200)).await;
    assert_expired(&mut session, "offers", "flash sale").await;
    credit_brings_nothing(&mut waiting, "the attached consumer").await;
    within("close", waiting.close()).await.unwrap();
    within("close", conn.close()).await.unwrap();
}

/// A message that expired while its consumer had no credit is not handed over when the
/// credit comes, even before housekeeping (every 500 ms) moved it: the delivery itself
/// checks expiry. Three rounds, so that a sweep falling between expiry and credit (30 of
/// every 500 ms) cannot hide a delivery that skips the check in all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_that_comes_after_the_ttl_brings_nothing_even_before_the_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let (mut conn, mut session) = connect(&broker, "expiry").await;
    for round in 0..3 {
        let mut waiting = within(
            "attach",
            Receiver::builder()
                .name(format!("waiting-{round}"))
                .source("offers")
                .credit_mode(CreditMode::Manual)
                .attach(&mut session),
        )
        .await
        .unwrap();
        send(
            &mut session,
            "offers",
            with_ttl(&format!("deal {round}"), 50),
        )
        .await;
        tokio::time::sleep(std::time::Duration::from_millis(80)).await;
        credit_brings_nothing(&mut waiting, &format!("round {round}")).await;
        within("close", waiting.close()).await.unwrap();
    }
    let mut expired = within(
        "attach",
        Receiver::attach(&mut session, "expired", "ExpiryQueue"),
    )
    .await
    .unwrap();
    for round in 0..3 {
        let d = within("expired message", expired.recv::<String>())
            .await
            .unwrap();
        assert_eq!(d.body(), &format!("deal {round}"));
        within("accept", expired.accept(&d)).await.unwrap();
    }
    within("close", expired.close()).await.unwrap();
    within("close", conn.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_past_its_absolute_expiry_time_is_never_delivered_and_moves_to_the_expiry_queue()
{
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let (mut conn, mut session) = connect(&broker, "expiry").await;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let message = Message::builder()
        .properties(
            Properties::builder()
                .absolute_expiry_time(Timestamp::from_milliseconds(now_ms + 200))
                .build(),
        )
        .value("quote".to_owned())
        .build();
    send(&mut session, "quotes", message).await;
    assert_expired(&mut session, "quotes", "quote").await;
    within("close", conn.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_with_a_long_ttl_is_delivered_normally() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let (mut conn, mut session) = connect(&broker, "expiry").await;
    send(&mut session, "offers", with_ttl("weekly deal", 60_000)).await;
    let mut receiver = within("attach", Receiver::attach(&mut session, "r", "offers"))
        .await
        .unwrap();
    let d = within("recv", receiver.recv::<String>()).await.unwrap();
    assert_eq!(d.body(), "weekly deal");
    assert_eq!(
        d.message().header.as_ref().and_then(|h| h.ttl),
        Some(60_000)
    );
    within("accept", receiver.accept(&d)).await.unwrap();

    let mut expired = within(
        "attach",
        Receiver::attach(&mut session, "expired", "ExpiryQueue"),
    )
    .await
    .unwrap();
    let got = timeout(QUIET, expired.recv::<String>()).await;
    assert!(
        got.is_err(),
        "nothing expired, yet ExpiryQueue had a message"
    );
    within("close", receiver.close()).await.unwrap();
    within("close", expired.close()).await.unwrap();
    within("close", conn.close()).await.unwrap();
}
