//! SIGTERM is a clean shutdown: exit code 0, connected clients told why, nothing lost.
//!
//! Method: a client sends 500 messages (all accepted) and stays connected with an idle
//! sender and a receiver on another queue; the broker gets SIGTERM. It must exit with
//! code 0 (bounded by the harness), the client must see its connection closed — with
//! `amqp:connection:forced` — and a broker restarted on the same directory must still
//! hold all 500 messages, in order.

use std::time::Duration;

use fe2o3_amqp::connection::Error as ConnectionError;
use fe2o3_amqp::types::definitions::{ConnectionError as Condition, ErrorCondition};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};

use crate::harness::BrokerProcess;

const MESSAGES: usize = 500;
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_closes_clients_with_forced_and_keeps_messages() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), &[]);
    let mut conn = Connection::open("shutdown", broker.url().as_str())
        .await
        .unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let mut sender = Sender::attach(&mut session, "s", "kept").await.unwrap();
    for i in 0..MESSAGES {
        let outcome = sender.send(format!("message {i}")).await.unwrap();
        outcome.accepted_or_else(|o| o).unwrap();
    }
    let _receiver = Receiver::attach(&mut session, "r", "idle").await.unwrap();

    let code = tokio::task::spawn_blocking(move || {
        let code = broker.terminate();
        (code, broker)
    })
    .await
    .unwrap();
    let (code, broker) = code;
    assert_eq!(
        code,
        Some(0),
        "exit code after SIGTERM; log:\n{}",
        broker.drain_logs().join("\n")
    );

    let closed = tokio::time::timeout(WAIT, conn.on_close())
        .await
        .expect("client did not see its connection close");
    match closed {
        Err(ConnectionError::RemoteClosedWithError(e)) => assert!(
            matches!(
                e.condition,
                ErrorCondition::ConnectionError(Condition::ConnectionForced)
            ),
            "closed with {e:?}"
        ),
        other => panic!("expected a close with amqp:connection:forced, got {other:?}"),
    }
    drop(broker);

    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut conn = Connection::open("after-restart", broker.url().as_str())
        .await
        .unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let mut receiver = Receiver::attach(&mut session, "r", "kept").await.unwrap();
    for i in 0..MESSAGES {
        let d = tokio::time::timeout(WAIT, receiver.recv::<String>())
            .await
            .unwrap_or_else(|_| panic!("message {i} missing after restart"))
            .unwrap();
        assert_eq!(d.body(), &format!("message {i}"));
        receiver.accept(&d).await.unwrap();
    }
    receiver.close().await.unwrap();
    session.end().await.unwrap();
    conn.close().await.unwrap();
}
