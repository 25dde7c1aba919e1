//! Goal: issue 17's everyday client features work for a Rust client too — fe2o3-amqp's own
//! API, not our frames: a temporary queue from a dynamic source (request/reply), the
//! anonymous relay (a sender whose target has no address), browsing (distribution-mode
//! `copy`) and local transactions (fe2o3's `Controller` and `Transaction`).
//!
//! Method: a broker process per test; fe2o3-amqp clients over loopback; every wait bounded.
//! The proton side of the same features is in `interop.rs` and `transactions.rs`.

use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::link::RecvError;
use fe2o3_amqp::transaction::{
    Controller, Transaction, TransactionDischarge, TransactionPosting, TransactionRetirement,
};
use fe2o3_amqp::types::messaging::{
    AmqpValue, DistributionMode, Message, Outcome, Properties, Source, Target,
};
use fe2o3_amqp::{Receiver, Sender};

use crate::client::{connect, within, within_for, QUIET};
use crate::harness::BrokerProcess;

fn text(body: &str) -> Message<AmqpValue<String>> {
    Message::builder().value(body.to_string()).build()
}

fn to(address: &str, body: &str) -> Message<AmqpValue<String>> {
    Message::builder()
        .properties(Properties::builder().to(address.to_string()).build())
        .value(body.to_string())
        .build()
}

async fn receive_text(receiver: &mut Receiver) -> String {
    let d = within("recv", receiver.recv::<String>())
        .await
        .expect("recv");
    within("accept", receiver.accept(&d)).await.expect("accept");
    d.body().clone()
}

/// A dynamic source gets a broker-named temporary queue: a request names it as reply-to,
/// the server answers there, and the queue goes away with its link (a sender to it is
/// then refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamic_receiver_gets_a_temporary_queue_that_ends_with_its_link() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let (mut conn, mut session) = connect(&broker, "fe2o3-tmp").await;
    let mut replies = within(
        "attach dynamic",
        Receiver::builder()
            .name("replies")
            .source(Source::builder().dynamic(true).build())
            .attach(&mut session),
    )
    .await
    .expect("attach dynamic receiver");
    let address = replies
        .source()
        .as_ref()
        .and_then(|s| s.address.clone())
        .expect("the broker names the temporary queue");
    assert!(address.starts_with("$tmp."), "temporary address {address}");
    let mut sender = within(
        "attach",
        Sender::attach(&mut session, "answer", &address[..]),
    )
    .await
    .expect("attach to the temporary queue");
    let outcome = within("send", sender.send(text("pong")))
        .await
        .expect("send");
    assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    assert_eq!(receive_text(&mut replies).await, "pong");
    within("close", sender.close()).await.expect("close sender");
    within("close", replies.close())
        .await
        .expect("close receiver");
    // Gone with its link: a new sender to it is refused.
    let again = within("attach", Sender::attach(&mut session, "late", &address[..])).await;
    assert!(
        again.is_err(),
        "a sender attached to {address} after it ended"
    );
    drop(session);
    conn.close().await.ok();
}

/// A sender whose target has no address relays each message by its `to`; a message
/// without one is rejected alone and the link goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_sender_relays_each_message_by_its_to() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let (mut conn, mut session) = connect(&broker, "fe2o3-relay").await;
    let mut relay = within(
        "attach anonymous",
        Sender::builder()
            .name("relay")
            .target(Target::builder().build())
            .attach(&mut session),
    )
    .await
    .expect("attach anonymous sender");
    for (queue, body) in [("relay-a", "one"), ("relay-b", "two"), ("relay-a", "three")] {
        let outcome = within("send", relay.send(to(queue, body)))
            .await
            .expect("send");
        assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    }
    let outcome = within("send", relay.send(text("nowhere")))
        .await
        .expect("send without to");
    match outcome {
        Outcome::Rejected(r) => {
            let condition = r.error.expect("a rejection names its error").condition;
            assert_eq!(format!("{condition:?}"), "AmqpError(InvalidField)");
        }
        other => panic!("a message without `to` was not rejected: {other:?}"),
    }
    let outcome = within("send", relay.send(to("relay-b", "four")))
        .await
        .expect("the link goes on");
    assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    let mut a = within("attach", Receiver::attach(&mut session, "a", "relay-a"))
        .await
        .unwrap();
    let mut b = within("attach", Receiver::attach(&mut session, "b", "relay-b"))
        .await
        .unwrap();
    assert_eq!(receive_text(&mut a).await, "one");
    assert_eq!(receive_text(&mut a).await, "three");
    assert_eq!(receive_text(&mut b).await, "two");
    assert_eq!(receive_text(&mut b).await, "four");
    drop(session);
    conn.close().await.ok();
}

/// A browser (distribution-mode `copy`) sees every message in order and takes none:
/// a consumer afterwards receives them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_receiver_browses_without_consuming() {
    const N: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let (mut conn, mut session) = connect(&broker, "fe2o3-browse").await;
    let mut sender = within("attach", Sender::attach(&mut session, "s", "browsed"))
        .await
        .unwrap();
    for i in 0..N {
        within("send", sender.send(text(&format!("m{i}"))))
            .await
            .unwrap();
    }
    let mut browser = within(
        "attach browser",
        Receiver::builder()
            .name("browser")
            .source(
                Source::builder()
                    .address("browsed")
                    .distribution_mode(DistributionMode::Copy)
                    .build(),
            )
            .credit_mode(CreditMode::Auto(100))
            .attach(&mut session),
    )
    .await
    .expect("attach browser");
    for i in 0..N {
        let d = within("browse", browser.recv::<String>()).await.unwrap();
        assert_eq!(d.body(), &format!("m{i}"));
        // Browsed copies come pre-settled: accepting one changes nothing in the queue.
        browser.accept(&d).await.ok();
    }
    let more = within_for(QUIET * 2, "quiet", async {
        tokio::time::timeout(QUIET, browser.recv::<String>()).await
    })
    .await;
    assert!(more.is_err(), "the browser saw more than the queue held");
    within("close", browser.close()).await.unwrap();
    let mut consumer = within("attach", Receiver::attach(&mut session, "c", "browsed"))
        .await
        .unwrap();
    for i in 0..N {
        assert_eq!(receive_text(&mut consumer).await, format!("m{i}"));
    }
    drop(session);
    conn.close().await.ok();
}

/// fe2o3's transaction controller: posts in a committed transaction arrive, posts in a
/// rolled-back one never do; an acceptance in a rolled-back transaction gives the message
/// back, one in a committed transaction consumes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fe2o3_transactions_commit_and_roll_back_sends_and_acceptances() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let (mut conn, mut session) = connect(&broker, "fe2o3-txn").await;
    let controller = within("attach controller", Controller::attach(&mut session, "ctl"))
        .await
        .expect("attach controller");
    let mut sender = within("attach", Sender::attach(&mut session, "s", "txq"))
        .await
        .unwrap();

    let txn = within("declare", Transaction::declare(&controller, None))
        .await
        .expect("declare");
    within("post", txn.post(&mut sender, text("kept-1")))
        .await
        .expect("post");
    within("post", txn.post(&mut sender, text("kept-2")))
        .await
        .expect("post");
    within("commit", txn.commit()).await.expect("commit");

    let txn = within("declare", Transaction::declare(&controller, None))
        .await
        .expect("declare");
    within("post", txn.post(&mut sender, text("dropped")))
        .await
        .expect("post");
    within("rollback", txn.rollback()).await.expect("rollback");

    let mut receiver = within(
        "attach",
        Receiver::builder()
            .name("r")
            .source("txq")
            .credit_mode(CreditMode::Manual)
            .attach(&mut session),
    )
    .await
    .unwrap();
    within("credit", receiver.set_credit(1)).await.unwrap();
    let first = within("recv", receiver.recv::<String>()).await.unwrap();
    assert_eq!(first.body(), "kept-1");
    // Accept it in a transaction that rolls back: it comes again.
    let txn = within("declare", Transaction::declare(&controller, None))
        .await
        .expect("declare");
    within("txn accept", txn.accept(&mut receiver, &first))
        .await
        .expect("accept in txn");
    within("rollback", txn.rollback()).await.expect("rollback");
    within("credit", receiver.set_credit(1)).await.unwrap();
    let again = within("recv", receiver.recv::<String>()).await.unwrap();
    assert_eq!(
        again.body(),
        "kept-1",
        "a rolled-back acceptance gives it back"
    );
    // Accept it in a committed transaction: consumed.
    let txn = within("declare", Transaction::declare(&controller, None))
        .await
        .expect("declare");
    within("txn accept", txn.accept(&mut receiver, &again))
        .await
        .expect("accept in txn");
    within("commit", txn.commit()).await.expect("commit");
    within("credit", receiver.set_credit(10)).await.unwrap();
    let second = within("recv", receiver.recv::<String>()).await.unwrap();
    assert_eq!(second.body(), "kept-2");
    receiver.accept(&second).await.unwrap();
    let rest: Result<Result<_, RecvError>, _> =
        tokio::time::timeout(QUIET, receiver.recv::<String>()).await;
    assert!(
        rest.is_err(),
        "nothing else is in the queue: the rolled-back post and the committed acceptance are gone"
    );
    drop(session);
    conn.close().await.ok();
}
