//! Sending to and receiving from queues: round trip, auto-create off, competing consumers.

use fe2o3_amqp::types::performatives::Performative;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};

use crate::harness::BrokerProcess;
use crate::raw_client;

/// The bytes a producer sends are the bytes a consumer gets: raw frames both ways, so
/// nothing is decoded and re-encoded on the test's side. Each message has properties
/// (a message-id), application-properties and a data section of every byte value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_to_a_queue_is_received_byte_identical() {
    const MESSAGES: u32 = 100;
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut raw = bounded("raw open", raw_client::Client::open(broker.amqp))
        .await
        .unwrap();
    bounded("attach", raw.attach_sender(0, "s", "orders")).await;
    let sent: Vec<Vec<u8>> = (0..MESSAGES).map(encoded_message).collect();
    for (id, message) in (0..).zip(&sent) {
        bounded("transfer", raw.transfer(0, id, message)).await;
        let accepted = bounded("disposition", raw.expect(raw_client::accepted(id))).await;
        assert!(accepted, "message {id} was not accepted");
    }
    bounded("attach", raw.attach_receiver(1, "r", "orders")).await;
    bounded("flow", raw.flow(1, 0, MESSAGES, false)).await;
    let mut received = Vec::new();
    while received.len() < sent.len() {
        let frame = bounded("transfer", raw.next_frame()).await;
        if let Performative::Transfer(t) = frame.performative {
            assert_eq!(t.handle.0, 1);
            assert!(!t.more, "a small message arrived in several frames");
            received.push(frame.payload);
        }
    }
    for (i, (got, want)) in received.iter().zip(&sent).enumerate() {
        assert!(
            got == want,
            "message {i} changed in the queue:\n sent {want:02x?}\n  got {got:02x?}"
        );
    }
}

/// Message `i`, encoded by hand: properties { message-id: "msg-i" },
/// application-properties { "n": smalluint i }, data [i, i+1, ..., i+255 (mod 256)].
fn encoded_message(i: u32) -> Vec<u8> {
    let id = format!("msg-{i}");
    let mut m = vec![0x00, 0x53, 0x73, 0xc0, 3 + id.len() as u8, 0x01, 0xa1];
    m.push(id.len() as u8);
    m.extend_from_slice(id.as_bytes());
    m.extend_from_slice(&[0x00, 0x53, 0x74, 0xc1, 0x06, 0x02, 0xa1, 0x01, b'n', 0x52]);
    m.push(i as u8);
    let body: Vec<u8> = (0..=255u8).map(|b| b.wrapping_add(i as u8)).collect();
    m.extend_from_slice(&raw_client::data_message(&body));
    m
}

async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    let limit = std::time::Duration::from_secs(10);
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_data_message_keeps_its_header_and_body() {
    use fe2o3_amqp::types::messaging::{Body, Header, Message};
    use fe2o3_amqp::types::primitives::{Binary, Value};
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut conn = Connection::open("t2", broker.url().as_str()).await.unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let mut sender = Sender::attach(&mut session, "s", "data").await.unwrap();
    let msg = Message::builder()
        .header(Header {
            durable: true,
            ..Default::default()
        })
        .data(Binary::from(vec![7u8; 1024]))
        .build();
    sender
        .send(msg)
        .await
        .unwrap()
        .accepted_or_else(|o| o)
        .unwrap();
    let mut receiver = Receiver::attach(&mut session, "r", "data").await.unwrap();
    let d = receiver.recv::<Body<Value>>().await.unwrap();
    assert!(d.message().header.as_ref().unwrap().durable);
    match d.body() {
        Body::Data(batch) => assert_eq!(batch[0].0.as_slice(), &[7u8; 1024][..]),
        other => panic!("unexpected body {other:?}"),
    }
    receiver.accept(&d).await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_consumer_gets_pipelined_messages() {
    use fe2o3_amqp::types::messaging::{Body, Header, Message};
    use fe2o3_amqp::types::primitives::{Binary, Value};
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let url = broker.url();
    let consumer = tokio::spawn(async move {
        let mut conn = Connection::open("c", url.as_str()).await.unwrap();
        let mut session = Session::begin(&mut conn).await.unwrap();
        let mut receiver = Receiver::attach(&mut session, "r", "pipe").await.unwrap();
        for _ in 0..500 {
            let d = receiver.recv::<Body<Value>>().await.unwrap();
            receiver.accept(&d).await.unwrap();
        }
        conn.close().await.unwrap();
    });
    let mut conn = Connection::open("p", broker.url().as_str()).await.unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let mut sender = Sender::attach(&mut session, "s", "pipe").await.unwrap();
    let mut futs = Vec::new();
    for _ in 0..500 {
        let msg = Message::builder()
            .header(Header {
                durable: true,
                ..Default::default()
            })
            .data(Binary::from(vec![7u8; 1024]))
            .build();
        futs.push(sender.send_batchable(msg).await.unwrap());
    }
    for f in futs {
        f.await.unwrap().accepted_or_else(|o| o).unwrap();
    }
    tokio::time::timeout(std::time::Duration::from_secs(20), consumer)
        .await
        .unwrap()
        .unwrap();
    conn.close().await.unwrap();
}
