//! Sending to and receiving from queues: round trip, auto-create off, competing consumers.

use fe2o3_amqp::{Connection, Receiver, Sender, Session};

use crate::harness::BrokerProcess;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_to_a_queue_is_received_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut conn = Connection::open("t1", broker.url().as_str()).await.unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let mut sender = Sender::attach(&mut session, "s", "orders").await.unwrap();
    for i in 0..100 {
        let outcome = sender.send(format!("hello {i}")).await.unwrap();
        outcome.accepted_or_else(|o| o).unwrap();
    }
    let mut receiver = Receiver::attach(&mut session, "r", "orders").await.unwrap();
    for i in 0..100 {
        let d = receiver.recv::<String>().await.unwrap();
        assert_eq!(d.body(), &format!("hello {i}"));
        receiver.accept(&d).await.unwrap();
    }
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
    session.end().await.unwrap();
    conn.close().await.unwrap();
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
