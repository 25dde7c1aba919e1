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
