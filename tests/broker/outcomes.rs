//! What each consumer outcome does to a message.
//!
//! Goal: `accepted` removes a message for good (also across a clean restart); `released`
//! gives it back untouched; `modified` counts a failed attempt and can exclude one
//! consumer; `rejected` and too many failed attempts dead-letter it to `DLQ` with its
//! reason; whatever a closing receiver leaves unsettled goes to the next consumer as a
//! failed attempt.
//!
//! Method: a real broker on loopback, fe2o3-amqp senders and receivers. The broker rewrites
//! the header's delivery-count on redelivery, so each test reads it from the received
//! message. "Not delivered" claims are a bounded `recv` that must time out.

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{Error as AmqpError, ErrorCondition};
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::Modified;
use fe2o3_amqp::types::primitives::{Symbol, Value};
use fe2o3_amqp::{Delivery, Receiver, Sender};
use tokio::time::timeout;

use crate::client::{connect, within, QUIET};
use crate::harness::BrokerProcess;

/// The header's delivery-count; an absent header means 0.
fn delivery_count<T>(d: &Delivery<T>) -> u32 {
    d.message().header.as_ref().map_or(0, |h| h.delivery_count)
}

fn annotation<T>(d: &Delivery<T>, key: &str) -> Option<Value> {
    d.message()
        .message_annotations
        .as_ref()?
        .0
        .get(&OwnedKey::Symbol(Symbol::from(key)))
        .cloned()
}

fn failed() -> Modified {
    Modified {
        delivery_failed: Some(true),
        undeliverable_here: None,
        message_annotations: None,
    }
}

async fn send_all(session: &mut SessionHandle<()>, address: &str, bodies: &[&str]) {
    let mut sender = within("attach sender", Sender::attach(session, "sender", address))
        .await
        .unwrap();
    for body in bodies {
        within("send", sender.send(body.to_string()))
            .await
            .unwrap()
            .accepted_or_else(|o| o)
            .unwrap();
    }
    within("close sender", sender.close()).await.unwrap();
}

/// A broker on a new directory and one connection to it (the directory lives as long
/// as the returned guard).
async fn fresh(
    name: &str,
    args: &[&str],
) -> (
    tempfile::TempDir,
    BrokerProcess,
    ConnectionHandle<()>,
    SessionHandle<()>,
) {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), args);
    let (conn, session) = connect(&broker, name).await;
    (dir, broker, conn, session)
}

/// An auto-credit receiver on `source`.
async fn attach(session: &mut SessionHandle<()>, name: &str, source: &str) -> Receiver {
    within("attach", Receiver::attach(session, name, source))
        .await
        .unwrap()
}

async fn accept(receiver: &mut Receiver, delivery: &Delivery<String>) {
    within("accept", receiver.accept(delivery)).await.unwrap();
}

/// A receiver that gets only the credit the test grants.
async fn manual_receiver(session: &mut SessionHandle<()>, name: &str, source: &str) -> Receiver {
    within(
        "attach",
        Receiver::builder()
            .name(name)
            .source(source)
            .credit_mode(CreditMode::Manual)
            .attach(session),
    )
    .await
    .unwrap()
}

async fn recv(receiver: &mut Receiver) -> Delivery<String> {
    within("recv", receiver.recv::<String>()).await.unwrap()
}

async fn assert_nothing_arrives(receiver: &mut Receiver) {
    let got = timeout(QUIET, receiver.recv::<String>()).await;
    assert!(
        got.is_err(),
        "expected no delivery, got {:?}",
        got.map(|r| r.map(|d| d.body().clone()))
    );
}

/// Closes the receivers, then the connection. fe2o3 can put a connection's `close` ahead
/// of link frames still queued in its session, so closing a link first (which waits for
/// the broker's detach) makes sure every disposition before it went out.
async fn close(mut conn: ConnectionHandle<()>, receivers: Vec<Receiver>) {
    for r in receivers {
        within("close receiver", r.close()).await.unwrap();
    }
    within("close connection", conn.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_messages_are_gone_also_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), &[]);
    let (mut conn, mut session) = connect(&broker, "accept").await;
    send_all(&mut session, "orders", &["a", "b", "c"]).await;
    let mut receiver = manual_receiver(&mut session, "r1", "orders").await;
    within("credit", receiver.set_credit(2)).await.unwrap();
    for want in ["a", "b"] {
        let d = recv(&mut receiver).await;
        assert_eq!(d.body(), want);
        accept(&mut receiver, &d).await;
    }
    within("close", receiver.close()).await.unwrap();

    let mut receiver = attach(&mut session, "r2", "orders").await;
    let c = recv(&mut receiver).await;
    assert_eq!(
        c.body(),
        "c",
        "a and b were accepted and must not come back"
    );
    assert_nothing_arrives(&mut receiver).await;
    within("release", receiver.release(&c)).await.unwrap();
    within("close", receiver.close()).await.unwrap();
    within("end", session.end()).await.unwrap();
    within("close", conn.close()).await.unwrap();

    assert_eq!(broker.terminate(), Some(0));
    let broker = BrokerProcess::start(dir.path(), &[]);
    let (conn, mut session) = connect(&broker, "after-restart").await;
    let mut receiver = attach(&mut session, "r3", "orders").await;
    let c = recv(&mut receiver).await;
    assert_eq!(
        c.body(),
        "c",
        "only the unaccepted message survives the restart"
    );
    accept(&mut receiver, &c).await;
    assert_nothing_arrives(&mut receiver).await;
    close(conn, vec![receiver]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_message_is_redelivered_with_its_delivery_count_unchanged() {
    let (_dir, _broker, conn, mut session) = fresh("release", &[]).await;
    send_all(&mut session, "q", &["m"]).await;
    let mut receiver = attach(&mut session, "r", "q").await;
    let first = recv(&mut receiver).await;
    assert_eq!(delivery_count(&first), 0);
    within("release", receiver.release(&first)).await.unwrap();
    let again = recv(&mut receiver).await;
    assert_eq!(again.body(), "m");
    assert_eq!(
        delivery_count(&again),
        0,
        "released is not a failed attempt"
    );
    accept(&mut receiver, &again).await;
    assert_nothing_arrives(&mut receiver).await;
    close(conn, vec![receiver]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_modified_as_failed_comes_back_with_delivery_count_plus_one() {
    let (_dir, _broker, conn, mut session) = fresh("modify", &[]).await;
    send_all(&mut session, "q", &["m"]).await;
    let mut receiver = attach(&mut session, "r", "q").await;
    for attempt in 0..3 {
        let d = recv(&mut receiver).await;
        assert_eq!(d.body(), "m");
        assert_eq!(delivery_count(&d), attempt);
        within("modify", receiver.modify(&d, failed()))
            .await
            .unwrap();
    }
    let d = recv(&mut receiver).await;
    assert_eq!(delivery_count(&d), 3);
    accept(&mut receiver, &d).await;
    close(conn, vec![receiver]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_modified_undeliverable_here_goes_to_another_consumer_only() {
    let (_dir, _broker, conn, mut session) = fresh("undeliverable", &[]).await;
    send_all(&mut session, "q", &["m"]).await;
    let mut picky = attach(&mut session, "picky", "q").await;
    let d = recv(&mut picky).await;
    let not_here = Modified {
        delivery_failed: None,
        undeliverable_here: Some(true),
        message_annotations: None,
    };
    within("modify", picky.modify(&d, not_here)).await.unwrap();
    assert_nothing_arrives(&mut picky).await;

    let mut other = attach(&mut session, "other", "q").await;
    let d = recv(&mut other).await;
    assert_eq!(d.body(), "m");
    assert_eq!(
        delivery_count(&d),
        0,
        "undeliverable-here alone is not a failure"
    );
    accept(&mut other, &d).await;
    assert_nothing_arrives(&mut picky).await;
    close(conn, vec![picky, other]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_message_is_dead_lettered_with_its_reason_and_original_address() {
    let (_dir, _broker, conn, mut session) = fresh("reject", &[]).await;
    send_all(&mut session, "payments", &["bad", "good"]).await;
    let mut receiver = attach(&mut session, "r", "payments").await;
    let bad = recv(&mut receiver).await;
    assert_eq!(bad.body(), "bad");
    let error = AmqpError::new(
        ErrorCondition::Custom(Symbol::from("app:invalid-payment")),
        Some("amount is negative".to_owned()),
        None,
    );
    within("reject", receiver.reject(&bad, error))
        .await
        .unwrap();
    let good = recv(&mut receiver).await;
    assert_eq!(good.body(), "good");
    accept(&mut receiver, &good).await;
    assert_nothing_arrives(&mut receiver).await;

    let mut dlq = attach(&mut session, "dlq", "DLQ").await;
    let dead = recv(&mut dlq).await;
    assert_eq!(dead.body(), "bad");
    assert_eq!(
        annotation(&dead, "x-opt-dead-letter-reason"),
        Some(Value::Symbol(Symbol::from("app:invalid-payment")))
    );
    assert_eq!(
        annotation(&dead, "x-opt-original-address"),
        Some(Value::String("payments".into()))
    );
    assert_eq!(
        annotation(&dead, "x-opt-dead-letter-description"),
        Some(Value::String("amount is negative".into()))
    );
    accept(&mut dlq, &dead).await;
    assert_nothing_arrives(&mut dlq).await;
    close(conn, vec![receiver, dlq]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_failing_max_delivery_attempts_times_is_dead_lettered() {
    let (_dir, _broker, conn, mut session) =
        fresh("poison", &["--max-delivery-attempts", "3"]).await;
    send_all(&mut session, "jobs", &["poison"]).await;
    let mut receiver = attach(&mut session, "r", "jobs").await;
    for attempt in 0..3 {
        let d = recv(&mut receiver).await;
        assert_eq!(delivery_count(&d), attempt);
        within("modify", receiver.modify(&d, failed()))
            .await
            .unwrap();
    }
    assert_nothing_arrives(&mut receiver).await;

    let mut dlq = attach(&mut session, "dlq", "DLQ").await;
    let dead = recv(&mut dlq).await;
    assert_eq!(dead.body(), "poison");
    assert_eq!(delivery_count(&dead), 3);
    assert_eq!(
        annotation(&dead, "x-opt-dead-letter-reason"),
        Some(Value::Symbol(Symbol::from("delivery-limit")))
    );
    assert_eq!(
        annotation(&dead, "x-opt-original-address"),
        Some(Value::String("jobs".into()))
    );
    accept(&mut dlq, &dead).await;
    close(conn, vec![receiver, dlq]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_left_unsettled_by_a_closed_link_go_to_another_consumer_as_a_failed_attempt() {
    let (_dir, _broker, conn, mut session) = fresh("link-close", &[]).await;
    send_all(&mut session, "q", &["m1", "m2"]).await;
    let mut first = attach(&mut session, "first", "q").await;
    let m1 = recv(&mut first).await;
    assert_eq!(m1.body(), "m1");
    let m2 = recv(&mut first).await;
    assert_eq!(m2.body(), "m2");
    accept(&mut first, &m2).await;
    within("close", first.close()).await.unwrap();

    let mut second = attach(&mut session, "second", "q").await;
    let again = recv(&mut second).await;
    assert_eq!(again.body(), "m1");
    assert_eq!(delivery_count(&again), 1);
    accept(&mut second, &again).await;
    assert_nothing_arrives(&mut second).await;
    close(conn, vec![second]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_left_unsettled_by_a_closed_connection_go_to_another_consumer_as_a_failed_attempt(
) {
    let (_dir, broker, conn, mut session) = fresh("stays", &[]).await;
    send_all(&mut session, "q", &["m"]).await;
    let mut later = manual_receiver(&mut session, "later", "q").await;

    let (mut doomed_conn, mut doomed_session) = connect(&broker, "doomed").await;
    let mut doomed = attach(&mut doomed_session, "doomed", "q").await;
    let d = recv(&mut doomed).await;
    assert_eq!(delivery_count(&d), 0);
    within("close", doomed_conn.close()).await.unwrap();

    within("credit", later.set_credit(10)).await.unwrap();
    let again = recv(&mut later).await;
    assert_eq!(again.body(), "m");
    assert_eq!(delivery_count(&again), 1);
    accept(&mut later, &again).await;
    assert_nothing_arrives(&mut later).await;
    close(conn, vec![later]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_refused_by_every_consumer_does_not_hold_up_later_messages() {
    let (_dir, _broker, conn, mut session) = fresh("head", &[]).await;
    let mut sender = within("attach", Sender::attach(&mut session, "s", "q"))
        .await
        .unwrap();
    let mut only = attach(&mut session, "only", "q").await;
    within("send", sender.send("refused".to_string()))
        .await
        .unwrap();
    let d = recv(&mut only).await;
    let not_here = Modified {
        delivery_failed: None,
        undeliverable_here: Some(true),
        message_annotations: None,
    };
    within("modify", only.modify(&d, not_here)).await.unwrap();
    for body in ["next-1", "next-2"] {
        within("send", sender.send(body.to_string())).await.unwrap();
        let d = recv(&mut only).await;
        assert_eq!(d.body(), body);
        accept(&mut only, &d).await;
    }
    assert_nothing_arrives(&mut only).await;
    close(conn, vec![only]).await;
}

/// Goal: failed attempts survive a crash — the delivery-count a consumer sees and
/// `max-delivery-attempts` carry on where they were, so a poison message cannot escape the
/// dead-letter queue by crashing the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attempts_count_on_after_a_crash_and_still_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--max-delivery-attempts", "3"];
    let mut broker = BrokerProcess::start(dir.path(), &args);
    let (conn, mut session) = connect(&broker, "poison-crash").await;
    send_all(&mut session, "crash-jobs", &["poison"]).await;
    // One delivery at a time: nothing is left unsettled when the link closes.
    let mut receiver = manual_receiver(&mut session, "r", "crash-jobs").await;
    for attempt in 0..2 {
        within("credit", receiver.set_credit(1)).await.unwrap();
        let d = recv(&mut receiver).await;
        assert_eq!((d.body().as_str(), delivery_count(&d)), ("poison", attempt));
        within("modify", receiver.modify(&d, failed()))
            .await
            .unwrap();
    }
    // Closing the link waits for the broker's detach: both outcomes were processed.
    close(conn, vec![receiver]).await;
    broker.kill();

    let broker = BrokerProcess::start(dir.path(), &args);
    let (conn, mut session) = connect(&broker, "after-crash").await;
    let mut receiver = attach(&mut session, "r2", "crash-jobs").await;
    let d = recv(&mut receiver).await;
    assert_eq!(
        (d.body().as_str(), delivery_count(&d)),
        ("poison", 2),
        "the two failed attempts before the crash still count"
    );
    within("modify", receiver.modify(&d, failed()))
        .await
        .unwrap();
    assert_nothing_arrives(&mut receiver).await;
    let mut dlq = attach(&mut session, "dlq", "DLQ").await;
    let dead = recv(&mut dlq).await;
    assert_eq!((dead.body().as_str(), delivery_count(&dead)), ("poison", 3));
    accept(&mut dlq, &dead).await;
    close(conn, vec![receiver, dlq]).await;
}

/// Goal: a delivery left unsettled by a closing link counts as a failed attempt, and the
/// attempt that reaches `max-delivery-attempts` dead-letters it there and then, as a
/// `modified` failure does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_link_reaching_max_delivery_attempts_dead_letters_the_message() {
    let (_dir, _broker, conn, mut session) =
        fresh("walkaway", &["--max-delivery-attempts", "2"]).await;
    send_all(&mut session, "walkaway-jobs", &["poison"]).await;
    for attempt in 0..2 {
        let mut r = within(
            "attach",
            Receiver::attach(&mut session, format!("r{attempt}"), "walkaway-jobs"),
        )
        .await
        .unwrap();
        let d = recv(&mut r).await;
        assert_eq!(delivery_count(&d), attempt);
        within("close", r.close()).await.unwrap();
    }
    let mut r = attach(&mut session, "r-last", "walkaway-jobs").await;
    assert_nothing_arrives(&mut r).await;
    let mut dlq = attach(&mut session, "dlq", "DLQ").await;
    let dead = recv(&mut dlq).await;
    assert_eq!((dead.body().as_str(), delivery_count(&dead)), ("poison", 2));
    accept(&mut dlq, &dead).await;
    close(conn, vec![r, dlq]).await;
}
