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

use crate::client::{connect, within, WAIT};
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

/// One frame of a multi-frame delivery on `handle` (`more` unless `last`).
async fn partial_frame(
    c: &mut Client,
    channel: u16,
    handle: u32,
    id: u32,
    first: bool,
    last: bool,
) {
    let t = fe2o3_amqp::types::performatives::Transfer {
        handle: fe2o3_amqp::types::definitions::Handle(handle),
        delivery_id: first.then_some(id),
        delivery_tag: first.then(|| id.to_be_bytes().to_vec().into()),
        message_format: first.then_some(0),
        settled: first.then_some(false),
        more: !last,
        rcv_settle_mode: None,
        state: None,
        resume: false,
        aborted: false,
        batchable: false,
    };
    // A data section whose bytes run over many frames: the broker only looks at the whole.
    let payload = if first {
        let mut p = vec![0x00, 0x53, 0x75, 0xb0];
        p.extend_from_slice(&(FRAMES_PER_DELIVERY as u32 * CHUNK as u32 - 8).to_be_bytes());
        p.resize(CHUNK, 7);
        p
    } else {
        vec![7; CHUNK]
    };
    c.send_on(channel, &Performative::Transfer(t), &payload)
        .await;
}

const CHUNK: usize = 60_000;
const FRAMES_PER_DELIVERY: usize = 16;
/// Bytes the broker charges one held frame (payload + `CHUNK_OVERHEAD_BYTES`).
const CHARGED: u64 = CHUNK as u64 + 64;

/// Starts a delivery on `handle` and sends `frames` of it, never the last.
async fn hold(c: &mut Client, handle: u32, frames: usize) {
    for i in 0..frames {
        partial_frame(c, 0, handle, handle, i == 0, false).await;
    }
}

fn resource_limit(d: &fe2o3_amqp::types::performatives::Detach) -> String {
    let e = d.error.as_ref().expect("the detach carries an error");
    assert_eq!(condition_of(e), "amqp:resource-limit-exceeded", "{e:?}");
    e.description.clone().unwrap_or_default()
}

/// Issue 14.2: unfinished multi-frame deliveries (`more=true`, never finished) used to
/// grow the broker without bound (2.25 GB in 9 s from one connection). They are now
/// bounded per link (max-message-bytes), per connection and broker-wide; a connection
/// over its share is refused at once, one over the broker's budget waits unread for room
/// (and proceeds when another connection frees it) or is refused after the wait; every
/// byte is given back when its connection goes, and /metrics shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_multi_frame_deliveries_are_bounded_per_connection_and_broker_wide() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(
        dir.path(),
        &[
            "--max-message-bytes",
            "2097152",
            "--max-incomplete-bytes-per-connection",
            "2621440",
            "--max-incomplete-bytes",
            "4194304",
        ],
    );
    let held = || {
        broker
            .metric("entrepot_incomplete_delivery_bytes")
            .unwrap_or(-1.0) as u64
    };
    // One connection over its share: links 0 and 1 hold 20 frames each, link 2 is refused
    // at its 4th frame (2,402,560 + 4 × 60,064 > 2,621,440).
    let mut c1 = within("open", Client::open(broker.amqp)).await.unwrap();
    for h in 0..3 {
        c1.attach_sender(h, &format!("hold-{h}"), "incomplete")
            .await;
    }
    hold(&mut c1, 0, 20).await;
    hold(&mut c1, 1, 20).await;
    hold(&mut c1, 2, 4).await;
    let d = within(
        "per-connection refusal",
        c1.expect(crate::raw_client::detach_of(2)),
    )
    .await;
    assert!(
        resource_limit(&d).contains("max-incomplete-bytes-per-connection"),
        "{d:?}"
    );
    assert_eq!(
        held(),
        40 * CHARGED,
        "links 0 and 1 hold; refused link 2 gave its 3 back"
    );
    // Broker-wide: a second connection holds 20 frames (room left: 9 frames); its next
    // delivery's 10th frame waits, unread, until the first connection goes away.
    let mut c2 = within("open", Client::open(broker.amqp)).await.unwrap();
    c2.attach_sender(0, "hold-a", "incomplete").await;
    c2.attach_sender(1, "whole", "incomplete").await;
    hold(&mut c2, 0, 20).await;
    for i in 0..FRAMES_PER_DELIVERY {
        partial_frame(&mut c2, 0, 1, 1, i == 0, i + 1 == FRAMES_PER_DELIVERY).await;
    }
    drop(c1);
    assert!(
        within("accepted after room freed", c2.expect(accepted(1))).await,
        "the waiting delivery went through once the other connection's bytes were freed"
    );
    // Broker-wide, and nobody frees room: refused after the bounded wait.
    let mut c3 = within("open", Client::open(broker.amqp)).await.unwrap();
    c3.attach_sender(0, "hold-b", "incomplete").await;
    c3.attach_sender(1, "hold-c", "incomplete").await;
    hold(&mut c3, 0, 20).await;
    hold(&mut c3, 1, 20).await;
    // The third connection's frames are held before the second one asks for more.
    let deadline = std::time::Instant::now() + WAIT;
    while held() != 60 * CHARGED && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        held(),
        60 * CHARGED,
        "20 frames of the second connection, 40 of the third"
    );
    c2.attach_sender(2, "late", "incomplete").await;
    hold(&mut c2, 2, 12).await;
    let d = within(
        "broker-wide refusal",
        c2.expect(crate::raw_client::detach_of(2)),
    )
    .await;
    let description = resource_limit(&d);
    assert!(
        description.contains("max-incomplete-bytes (4194304") && description.contains("waited"),
        "{description}"
    );
    assert!(held() <= 4_194_304);
    // Everyone else is still served, and every byte comes back when connections go.
    round_trip(&broker, "after-incomplete").await;
    drop(c2);
    drop(c3);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while held() != 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        held(),
        0,
        "closing the connections gave every held byte back"
    );
    assert_eq!(
        broker.metric("entrepot_incomplete_delivery_refusals_total"),
        Some(2.0)
    );
}

/// Issue 14.4: messages stored but not yet confirmed to their producer used to vanish
/// from memory when its connection closed early — invisible to consumers, back after a
/// restart, their space never reclaimed. They are durable, so they are delivered: the
/// same answer before and after a restart, and nothing comes back once consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_a_producer_that_closes_before_its_accepts_are_delivered() {
    const SENT: u32 = 300;
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), &[]);
    let mut c = within("open", Client::open(broker.amqp)).await.unwrap();
    c.attach_sender(0, "p", "early-close").await;
    for id in 0..SENT {
        c.transfer(0, id, &data_message(&id.to_be_bytes())).await;
    }
    // Gone before the group commit that covers the last of them can answer: our FIN
    // follows the last transfer, and the broker ends the connection on reading it.
    c.finish_and_wait_close(WAIT).await;
    let (mut conn, mut session) = connect(&broker, "early-close-consumer").await;
    let mut receiver = within("attach", Receiver::attach(&mut session, "r", "early-close"))
        .await
        .expect("attach");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..SENT {
        let d = within(
            "a message of the closed producer",
            receiver.recv::<fe2o3_amqp::types::messaging::Data>(),
        )
        .await
        .expect("recv");
        let body = d.body().0.as_slice().to_vec();
        assert!(seen.insert(body), "no message twice");
        receiver.accept(&d).await.expect("accept");
    }
    assert_eq!(seen.len(), SENT as usize);
    let _ = receiver.close().await;
    let _ = session.end().await;
    let _ = conn.close().await;
    // After a clean restart nothing comes back: each was consumed once, for good.
    assert_eq!(broker.terminate(), Some(0));
    let broker = BrokerProcess::start(dir.path(), &[]);
    let (mut conn, mut session) = connect(&broker, "after-restart").await;
    let mut receiver = within("attach", Receiver::attach(&mut session, "r", "early-close"))
        .await
        .expect("attach");
    let more = tokio::time::timeout(
        crate::client::QUIET,
        receiver.recv::<fe2o3_amqp::types::messaging::Data>(),
    )
    .await;
    assert!(
        more.is_err(),
        "a consumed message came back after the restart: {more:?}"
    );
    let _ = conn.close().await;
}

/// A single-frame transfer on `handle` whose delivery-tag is `tag_len` bytes long.
fn tagged(handle: u32, id: u32, tag_len: usize) -> Performative {
    Performative::Transfer(fe2o3_amqp::types::performatives::Transfer {
        handle: fe2o3_amqp::types::definitions::Handle(handle),
        delivery_id: Some(id),
        delivery_tag: Some(vec![7u8; tag_len].into()),
        message_format: Some(0),
        settled: Some(false),
        more: false,
        rcv_settle_mode: None,
        state: None,
        resume: false,
        aborted: false,
        batchable: false,
    })
}

/// Issue 14.7: a delivery-tag beyond the spec's 32 bytes is refused (its link detached
/// with `amqp:invalid-field` naming the limit); the connection carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_tag_over_32_bytes_detaches_its_link() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut c = within("open", Client::open(broker.amqp)).await.unwrap();
    c.attach_sender(0, "long-tag", "tags").await;
    c.send_on(0, &tagged(0, 0, 33), &data_message(b"x")).await;
    let d = within("detach", c.expect(crate::raw_client::detach_of(0))).await;
    let e = d.error.expect("an error");
    assert_eq!(condition_of(&e), "amqp:invalid-field", "{e:?}");
    assert!(e
        .description
        .unwrap_or_default()
        .contains("MAX_DELIVERY_TAG_BYTES"));
    // Same connection, a new link with a 32-byte tag: accepted.
    c.attach_sender(1, "ok-tag", "tags").await;
    c.send_on(0, &tagged(1, 1, 32), &data_message(b"y")).await;
    assert!(within("accepted", c.expect(accepted(1))).await);
}

/// Issue 14.7: without manifests, attaching to ever new names used to create queues
/// without bound (20,000 by attach alone, /metrics 11.8 MB). Auto-creation stops at
/// `--max-auto-created-addresses`, refused with `amqp:resource-limit-exceeded` naming it;
/// existing addresses keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_creation_stops_at_max_auto_created_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &["--max-auto-created-addresses", "3"]);
    let mut c = within("open", Client::open(broker.amqp)).await.unwrap();
    for (h, name) in ["a", "b", "topic.c"].iter().enumerate() {
        c.attach_sender(h as u32, name, name).await;
    }
    let target = fe2o3_amqp::types::messaging::TargetArchetype::Target(
        fe2o3_amqp::types::messaging::Target::builder()
            .address("d")
            .build(),
    );
    let attach = crate::raw_client::sender_attach(3, "d", target);
    c.send_on(0, &Performative::Attach(attach), &[]).await;
    let d = within("refusal", c.expect(crate::raw_client::detach_of(3))).await;
    let e = d.error.expect("an error");
    assert_eq!(condition_of(&e), "amqp:resource-limit-exceeded", "{e:?}");
    assert!(
        e.description
            .unwrap_or_default()
            .contains("max-auto-created-addresses (3)"),
        "the refusal names the limit"
    );
    c.transfer(0, 0, &data_message(b"still")).await;
    assert!(within("accepted on an existing queue", c.expect(accepted(0))).await);
}

/// Issue 14.7: the broker raises its open-files soft limit to the hard limit at start
/// (every connection and segment is a descriptor), whatever soft limit it inherited.
#[test]
fn the_open_files_limit_is_raised_to_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new("sh");
    command.arg("-c").arg(format!(
        "ulimit -S -n 256 && exec {} serve --listen 127.0.0.1:0 --http 127.0.0.1:0 --data-dir {}",
        env!("CARGO_BIN_EXE_entrepot"),
        dir.path().display()
    ));
    let broker = BrokerProcess::launch(command, dir.path());
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", broker.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (fields[3], fields[4]);
    assert_eq!(soft, hard, "soft limit raised to the hard one: {line}");
    assert_ne!(soft, "256", "{line}");
}
