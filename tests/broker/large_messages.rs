//! Messages larger than one frame, and messages larger than the broker allows.
//!
//! Goal: a 5 MiB message crosses the broker in many transfer frames each way and arrives
//! byte-identical, also when it is delivered again with a new header; a message over `--max-message-bytes` costs its producer the link
//! (`amqp:link:message-size-exceeded`) but not the connection, which attaches a new sender
//! and carries on.
//!
//! Method: fe2o3-amqp for the round trip (it splits a delivery by the negotiated max frame
//! size). fe2o3 honours the `max-message-size` the broker advertises and refuses an
//! oversized message itself, so one test shows that; the broker's own enforcement is shown
//! by a raw AMQP client that streams a 2 MiB delivery in 60 KB frames and checks the
//! broker's exact replies.

use std::future::Future;
use std::time::Duration;

use fe2o3_amqp::link::SendError;
use fe2o3_amqp::types::messaging::{Data, Message};
use fe2o3_amqp::types::primitives::Binary;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use tokio::time::timeout;

use crate::harness::BrokerProcess;
use crate::raw_client;

/// Longest any single client operation may take (a 5 MiB message on a debug build
/// included).
const WAIT: Duration = Duration::from_secs(20);
/// How long a receiver listens to show that nothing arrives.
const QUIET: Duration = Duration::from_millis(500);
const MIB: usize = 1024 * 1024;

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {WAIT:?}"))
}

/// Bytes that differ from position to position, so a misplaced frame shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_five_mebibyte_message_round_trips_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut conn = within("open", Connection::open("large", broker.url().as_str()))
        .await
        .unwrap();
    let mut session = within("begin", Session::begin(&mut conn)).await.unwrap();
    let mut sender = within("attach", Sender::attach(&mut session, "s", "blobs"))
        .await
        .unwrap();
    let payload = pattern(5 * MIB);
    let message = Message::builder()
        .data(Binary::from(payload.clone()))
        .build();
    within("send", sender.send(message))
        .await
        .unwrap()
        .accepted_or_else(|o| o)
        .unwrap();

    let mut receiver = within("attach", Receiver::attach(&mut session, "r", "blobs"))
        .await
        .unwrap();
    let d = within("recv", receiver.recv::<Data>()).await.unwrap();
    assert_eq!(d.body().0.len(), payload.len());
    assert!(d.body().0[..] == payload[..], "the body changed in transit");
    // Delivered again after a failed attempt: the broker re-encodes the header with the
    // new delivery-count and sends it before the stored bytes, which are the same.
    let failed = fe2o3_amqp::types::messaging::Modified {
        delivery_failed: Some(true),
        undeliverable_here: None,
        message_annotations: None,
    };
    within("modify", receiver.modify(&d, failed)).await.unwrap();
    let d = within("recv again", receiver.recv::<Data>()).await.unwrap();
    let count = d.message().header.as_ref().map_or(0, |h| h.delivery_count);
    assert_eq!(count, 1, "the redelivery's header");
    assert!(
        d.body().0[..] == payload[..],
        "the redelivered body changed"
    );
    within("accept", receiver.accept(&d)).await.unwrap();
    within("close", receiver.close()).await.unwrap();
    within("close", sender.close()).await.unwrap();
    within("close", conn.close()).await.unwrap();

    // The same, as bytes on the wire: what a raw client streams in 60 KB frames is,
    // reassembled from the broker's transfer frames, exactly what it gets back.
    let message = raw_client::data_message(&payload);
    let mut raw = within("raw open", raw_client::Client::open(broker.amqp))
        .await
        .unwrap();
    within("attach", raw.attach_sender(0, "raw-s", "blobs-raw")).await;
    within("transfer", raw.transfer(0, 0, &message)).await;
    assert!(within("disposition", raw.expect(raw_client::accepted(0))).await);
    within("attach", raw.attach_receiver(1, "raw-r", "blobs-raw")).await;
    within("flow", raw.flow(1, 0, 1, false)).await;
    let (mut received, mut frames) = (Vec::with_capacity(message.len()), 0);
    loop {
        let frame = within("transfer", raw.next_frame()).await;
        let fe2o3_amqp::types::performatives::Performative::Transfer(t) = frame.performative else {
            continue;
        };
        received.extend_from_slice(&frame.payload);
        frames += 1;
        if !t.more {
            break;
        }
    }
    assert!(frames > 1, "5 MiB arrived in one frame");
    assert_eq!(received.len(), message.len());
    assert!(received == message, "the message bytes changed in transit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_advertises_its_message_size_limit_so_the_client_refuses_a_larger_message() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &["--max-message-bytes", "1048576"]);
    let mut conn = within("open", Connection::open("limit", broker.url().as_str()))
        .await
        .unwrap();
    let mut session = within("begin", Session::begin(&mut conn)).await.unwrap();
    let mut sender = within("attach", Sender::attach(&mut session, "s", "blobs"))
        .await
        .unwrap();
    let too_big = Message::builder()
        .data(Binary::from(pattern(2 * MIB)))
        .build();
    let refused = within("send", sender.send(too_big)).await;
    assert!(
        matches!(&refused, Err(SendError::MessageSizeExceeded(e)) if e.max_size == MIB as u64),
        "{refused:?}"
    );
    within("send", sender.send("small".to_string()))
        .await
        .unwrap()
        .accepted_or_else(|o| o)
        .unwrap();
    within("close", sender.close()).await.unwrap();
    within("close", conn.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_detaches_its_link_and_the_connection_attaches_a_new_sender() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &["--max-message-bytes", "1048576"]);
    let mut raw = within("raw open", raw_client::Client::open(broker.amqp))
        .await
        .unwrap();
    within("attach", raw.attach_sender(0, "big", "blobs")).await;

    let too_big = raw_client::data_message(&pattern(2 * MIB));
    within("transfer", raw.transfer(0, 0, &too_big)).await;
    let detach = within("detach", raw.expect(raw_client::detach_of(0))).await;
    assert!(detach.closed);
    let error = detach.error.expect("the detach carries an error");
    assert_eq!(
        error.condition,
        fe2o3_amqp::types::definitions::LinkError::MessageSizeExceeded.into()
    );
    within("detach", raw.detach(0)).await;

    within("attach", raw.attach_sender(1, "small", "blobs")).await;
    within(
        "transfer",
        raw.transfer(1, 1, &raw_client::data_message(b"fits")),
    )
    .await;
    let accepted = within("disposition", raw.expect(raw_client::accepted(1))).await;
    assert!(accepted);

    // Only the message that fit reached the queue.
    let mut conn = within("open", Connection::open("check", broker.url().as_str()))
        .await
        .unwrap();
    let mut session = within("begin", Session::begin(&mut conn)).await.unwrap();
    let mut receiver = within("attach", Receiver::attach(&mut session, "r", "blobs"))
        .await
        .unwrap();
    let d = within("recv", receiver.recv::<Data>()).await.unwrap();
    assert_eq!(&d.body().0[..], b"fits");
    within("accept", receiver.accept(&d)).await.unwrap();
    let more = timeout(QUIET, receiver.recv::<Data>()).await;
    assert!(more.is_err(), "the oversized message was queued after all");
    within("close", receiver.close()).await.unwrap();
    within("close", conn.close()).await.unwrap();
}
