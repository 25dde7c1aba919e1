//! Goal: a peer's hostile values are bounded and refused at the scope they belong to,
//! and no single connection's work can freeze the broker for the others (issue 14).
//!
//! Method: a raw client (tests/broker/raw_client.rs) sends the exact frames — a
//! disposition whose range wraps around 2^32, unfinished multi-frame deliveries, a
//! handshake dribbled one byte at a time, an oversized delivery-tag — and reads the
//! broker's answer, while a well-behaved fe2o3 client on another connection must still
//! finish a round trip within [`WAIT`]. Each refusal is checked by its AMQP condition.

use fe2o3_amqp::types::definitions::ReceiverSettleMode;
use fe2o3_amqp::types::messaging::{Accepted, DeliveryState};
use fe2o3_amqp::types::performatives::{Disposition, Performative};
use fe2o3_amqp::{Receiver, Sender};
use fe2o3_amqp_types::definitions::Role;

use crate::client::{connect, within};
use crate::harness::BrokerProcess;
use crate::raw_client::{accepted, data_message, Client};

/// A well-behaved client's send-and-receive on its own connection and queue.
async fn round_trip(broker: &BrokerProcess, queue: &str) {
    let (mut conn, mut session) = connect(broker, &format!("bystander-{queue}")).await;
    let mut sender = within("attach", Sender::attach(&mut session, "s", queue))
        .await
        .expect("attach sender");
    within("send", sender.send("ping"))
        .await
        .expect("send")
        .accepted_or_else(|o| o)
        .expect("accepted");
    let mut receiver = within("attach", Receiver::attach(&mut session, "r", queue))
        .await
        .expect("attach receiver");
    let d = within("recv", receiver.recv::<String>())
        .await
        .expect("recv");
    within("accept", receiver.accept(&d)).await.expect("accept");
    let _ = sender.close().await;
    let _ = receiver.close().await;
    let _ = session.end().await;
    let _ = conn.close().await;
}

fn condition_of(e: &fe2o3_amqp::types::definitions::Error) -> String {
    entrepot::connection::condition_name(&e.condition)
}

/// Issue 14.1: `disposition(first=1, last=0)` used to make the session walk 2^32 ids with
/// one core pinned for ~50 s. It is refused with `amqp:invalid-field`, ending only that
/// session: the connection's other session and every other client carry on, and the
/// deliveries of the ended session go back to the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapping_disposition_range_ends_its_session_only() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut c = within("open", Client::open(broker.amqp))
        .await
        .expect("raw open");
    c.attach_sender(0, "p", "wrap").await;
    for id in 0..3u32 {
        c.transfer(0, id, &data_message(b"m")).await;
        assert!(within("accepted", c.expect(accepted(id))).await);
    }
    c.attach_receiver_settling(0, 1, "c", "wrap", ReceiverSettleMode::First)
        .await;
    c.flow(1, 0, 10, false).await;
    for _ in 0..3 {
        within(
            "delivery",
            c.expect(|p| matches!(p, Performative::Transfer(_)).then_some(())),
        )
        .await;
    }
    let hostile = Disposition {
        role: Role::Receiver,
        first: 1,
        last: Some(0),
        settled: true,
        state: Some(DeliveryState::Accepted(Accepted {})),
        batchable: false,
    };
    c.send_on(0, &Performative::Disposition(hostile), &[]).await;
    // Another client is served at once, while the hostile connection is answered.
    round_trip(&broker, "bystander").await;
    let end = within(
        "end with an error",
        c.expect_on(|ch, p| match p {
            Performative::End(e) if ch == 0 => Some(e),
            _ => None,
        }),
    )
    .await;
    let error = end.error.expect("the end carries the error");
    assert_eq!(condition_of(&error), "amqp:invalid-field", "{error:?}");
    assert!(
        error
            .description
            .as_deref()
            .is_some_and(|d| d.contains("MAX_DISPOSITION_SPAN")),
        "the refusal names the limit: {error:?}"
    );
    // The connection lives on: answer the end, begin a new session, send on it.
    c.send_on(
        0,
        &Performative::End(fe2o3_amqp::types::performatives::End { error: None }),
        &[],
    )
    .await;
    c.begin(1).await;
    c.attach_sender_on(1, 0, "p2", "wrap").await;
    c.transfer_on(1, 0, 0, &data_message(b"after")).await;
    assert!(within("accepted on the new session", c.expect(accepted(0))).await);
    // The three deliveries of the ended session were released: all four are there.
    let (mut conn, mut session) = connect(&broker, "drain").await;
    let mut receiver = within("attach", Receiver::attach(&mut session, "r", "wrap"))
        .await
        .expect("attach");
    for _ in 0..4 {
        let d = within(
            "redelivery",
            receiver.recv::<fe2o3_amqp::types::messaging::Data>(),
        )
        .await
        .expect("recv");
        receiver.accept(&d).await.expect("accept");
    }
    let _ = conn.close().await;
}

/// Issue 14.5: a client dribbling its header and `open` one byte at a time used to be
/// cut off only when a single read waited 10 s. One deadline (`--handshake-timeout-ms`)
/// now covers header, SASL and open, however slowly the bytes come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_dribbled_byte_by_byte_is_cut_off_at_the_deadline() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &["--handshake-timeout-ms", "2000"]);
    let addr = broker.amqp;
    let open = fe2o3_amqp::types::performatives::Open {
        container_id: "dribbler".into(),
        hostname: None,
        max_frame_size: 65536.into(),
        channel_max: 16.into(),
        idle_time_out: None,
        outgoing_locales: None,
        incoming_locales: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    let body = serde_amqp::to_vec(&Performative::Open(open)).unwrap();
    let mut bytes = b"AMQP\x00\x01\x00\x00".to_vec();
    bytes.extend_from_slice(&((8 + body.len()) as u32).to_be_bytes());
    bytes.extend_from_slice(&[2, 0, 0, 0]);
    bytes.extend_from_slice(&body);
    let closed_after = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        let mut reader = stream.try_clone().unwrap();
        let start = Instant::now();
        let done = std::thread::spawn(move || {
            let mut sink = [0u8; 1024];
            reader
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
            start.elapsed()
        });
        // 100 ms a byte: the whole header and open would take several seconds.
        for b in bytes {
            if done.is_finished() || stream.write_all(&[b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        done.join().unwrap()
    })
    .await
    .unwrap();
    assert!(
        closed_after >= Duration::from_millis(1900) && closed_after < Duration::from_secs(5),
        "the dribbling client was cut off after {closed_after:?}, not at the 2 s deadline"
    );
    round_trip(&broker, "after-dribble").await;
}
