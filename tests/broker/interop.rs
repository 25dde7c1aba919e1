//! What real AMQP clients do every day (issue 17), against the real binary.
//!
//! Method: raw clients (tests/broker/raw_client.rs) send the frames a client library
//! sends — here, a consumer releasing prefetched deliveries one by one as proton does
//! when it stops early — and the next consumer's deliveries are checked in order.

use fe2o3_amqp::types::definitions::ReceiverSettleMode;
use fe2o3_amqp::types::messaging::{DeliveryState, Released};
use fe2o3_amqp::types::performatives::{Disposition, Performative};
use fe2o3_amqp_types::definitions::Role;

use crate::client::within;
use crate::harness::BrokerProcess;
use crate::raw_client::{accepted, data_message, Client};

/// Receives `n` transfers on `handle` and returns the last byte of each payload (the
/// message number the test put there).
async fn receive_numbers(c: &mut Client, handle: u32, n: usize) -> Vec<(u32, u8)> {
    let mut got = Vec::new();
    while got.len() < n {
        let f = within("a delivery", c.next_frame()).await;
        if let Performative::Transfer(t) = f.performative {
            if t.handle.0 == handle {
                let id = t.delivery_id.expect("single-frame deliveries carry an id");
                got.push((id, *f.payload.last().expect("a body")));
            }
        }
    }
    got
}

/// Issue 17.5: a consumer that leaves with prefetched deliveries and releases them one by
/// one used to put them back in reverse (55, 54, 53 … then 56); released messages now go
/// back in their queue order, as Artemis and RabbitMQ keep it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_messages_go_back_in_their_original_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut c = within("open", Client::open(broker.amqp)).await.unwrap();
    c.attach_sender(0, "p", "order").await;
    for i in 0..12u32 {
        c.transfer(0, i, &data_message(&[i as u8])).await;
        assert!(within("accepted", c.expect(accepted(i))).await);
    }
    c.attach_receiver_settling(0, 1, "first", "order", ReceiverSettleMode::First)
        .await;
    c.flow(1, 0, 10, false).await;
    let first = receive_numbers(&mut c, 1, 10).await;
    assert_eq!(
        first.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        (0..10).collect::<Vec<u8>>()
    );
    // Accept 0..4, then release 5..9 one disposition at a time, in order.
    let settle = |first: u32, last: u32, state: DeliveryState| Disposition {
        role: Role::Receiver,
        first,
        last: Some(last),
        settled: true,
        state: Some(state),
        batchable: false,
    };
    let (id0, _) = first[0];
    c.send_on(
        0,
        &Performative::Disposition(settle(
            id0,
            id0 + 4,
            DeliveryState::Accepted(fe2o3_amqp::types::messaging::Accepted {}),
        )),
        &[],
    )
    .await;
    for (id, _) in &first[5..] {
        c.send_on(
            0,
            &Performative::Disposition(settle(*id, *id, DeliveryState::Released(Released {}))),
            &[],
        )
        .await;
    }
    c.detach(1).await;
    c.attach_receiver_settling(0, 2, "second", "order", ReceiverSettleMode::First)
        .await;
    c.flow(2, 0, 10, false).await;
    let second = receive_numbers(&mut c, 2, 7).await;
    assert_eq!(
        second.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        vec![5, 6, 7, 8, 9, 10, 11],
        "released messages keep their place ahead of the rest, in order"
    );
}

/// Issue 17.2 and 17.6: the broker's open offers ANONYMOUS-RELAY and SHARED-SUBS and
/// names its product and version; one proton sender with no target address (proton's
/// anonymous sender, qpid-jms's anonymous producer) sends to several queues by each
/// message's `to`, and a message without one is rejected alone (`amqp:invalid-field`),
/// the link staying up.
#[test]
fn the_anonymous_relay_routes_each_message_by_its_to() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let out = crate::harness::run_proton_script(
        &broker,
        "proton_relay.py",
        &[
            "-",
            "-",
            "relay-a=accepted",
            "relay-b=accepted",
            "=amqp:invalid-field",
            "relay-a=accepted",
        ],
        std::time::Duration::from_secs(60),
    );
    assert!(out.contains("routed 3 messages"), "{out}");
}

/// Issue 17.2: under manifests every message on the relay is authorized and resolved on
/// its own: an address the user may not send to is `rejected` with
/// `amqp:unauthorized-access`, an undeclared one with `amqp:not-found` — outcomes of that
/// message, not errors of the link or the connection.
#[test]
fn the_anonymous_relay_authorizes_and_resolves_each_message() {
    let root = tempfile::tempdir().unwrap();
    let broker = crate::access::start(root.path());
    // bob may send to `orders` only; alice to `orders*`, of which only `orders` exists.
    let out = crate::harness::run_proton_script(
        &broker,
        "proton_relay.py",
        &[
            "bob",
            "bob-pw",
            "--no-receive",
            "orders=accepted",
            "audit=amqp:unauthorized-access",
            "orders=accepted",
        ],
        std::time::Duration::from_secs(60),
    );
    assert!(
        out.contains("routed 2 messages by `to`, refused 1"),
        "{out}"
    );
    let out = crate::harness::run_proton_script(
        &broker,
        "proton_relay.py",
        &[
            "alice",
            "alice-pw",
            "--no-receive",
            "orders-nope=amqp:not-found",
            "orders=accepted",
        ],
        std::time::Duration::from_secs(60),
    );
    assert!(
        out.contains("routed 1 messages by `to`, refused 1"),
        "{out}"
    );
    // The three accepted messages are in the space's `orders` queue, nothing elsewhere.
    assert_eq!(
        broker.metric("entrepot_queue_depth{queue=\"app/orders\"}"),
        Some(3.0)
    );
}

/// Issue 17.1: request/reply with a temporary queue, as proton's client.py and
/// server.py do: a receiver with a dynamic source gets a broker-made address (named in
/// the attach reply), replies reach it through the anonymous relay, and the queue is
/// deleted with its link — afterwards a reply to it is `amqp:not-found`, and nothing of
/// it is left in /metrics.
#[test]
fn request_reply_through_a_temporary_queue() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let out = crate::harness::run_proton_script(
        &broker,
        "proton_request_reply.py",
        &["requests", "20"],
        std::time::Duration::from_secs(60),
    );
    let reply_to = out
        .trim()
        .strip_prefix("ok: ")
        .unwrap_or_else(|| panic!("{out}"));
    assert!(reply_to.starts_with("$tmp."), "{reply_to}");
    let (_, metrics) = broker.http_get("/metrics");
    assert!(
        !metrics.contains("$tmp."),
        "the temporary queue is gone from /metrics"
    );
}

/// Issue 17.3: a receiver with distribution-mode `copy` (proton's `Copy()`, a JMS
/// QueueBrowser) used to remove every message it browsed. It now sees a snapshot of the
/// queue, in order, pre-settled — with a selector, only the matches — and a consumer
/// afterwards still gets every message.
#[test]
fn browsing_a_queue_leaves_every_message_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let out = crate::harness::run_proton_script(
        &broker,
        "proton_browse.py",
        &["browsed"],
        std::time::Duration::from_secs(60),
    );
    assert!(out.contains("ok: browsed 10 and 3, consumed 10"), "{out}");
}

/// Issue 17.4: a transactional client attaches a sender to a `coordinator` target. That
/// used to be a decode error closing the whole connection ("Wrong descriptor code value
/// for Target archetype"). Local transactions are supported now (tests/broker/
/// transactions.rs); a coordinator that requires distributed transactions is refused on
/// that link alone with `amqp:not-implemented` naming the capability, and the connection
/// keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_requiring_distributed_transactions_is_refused_on_its_link_only() {
    use fe2o3_amqp::types::messaging::TargetArchetype;
    use fe2o3_amqp::types::transaction::{Coordinator, TxnCapability};
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut c = within("open", Client::open(broker.amqp)).await.unwrap();
    let txn_caps = vec![TxnCapability::DistributedTransactions];
    let coordinator = TargetArchetype::Coordinator(Coordinator::new(Some(txn_caps.into())));
    let attach = crate::raw_client::sender_attach(0, "txn-ctrl", coordinator);
    c.send_on(0, &Performative::Attach(attach), &[]).await;
    let d = within("refusal", c.expect(crate::raw_client::detach_of(0))).await;
    let e = d.error.expect("an error");
    assert_eq!(
        entrepot::connection::condition_name(&e.condition),
        "amqp:not-implemented",
        "{e:?}"
    );
    let txn_description = e.description.unwrap_or_default();
    assert!(
        txn_description.contains("amqp:distributed-transactions"),
        "{txn_description}"
    );
    c.attach_sender(1, "plain", "after-txn").await;
    c.transfer(1, 0, &data_message(b"still here")).await;
    assert!(within("accepted", c.expect(accepted(0))).await);
}
