//! Local transactions (issue 17.4): a coordinator link, declare and discharge,
//! transactional sends and acknowledgements.
//!
//! Method: python-qpid-proton's own transaction API (`proton_tx.py`) commits and aborts
//! sends and acknowledgements against the real binary, which is killed (SIGKILL) and
//! restarted between the phases; raw frames (tests/broker/raw_client.rs) play the hostile
//! or careless client — unknown ids, a discharge sent twice, too many transactions, a
//! connection that goes away in the middle of one — and the exact outcomes are checked;
//! an in-process node under the storage crash seam takes a power cut in the middle of
//! transactions (seeds as in power_loss.rs: `ENTREPOT_CRASH_SEEDS`, `ENTREPOT_CRASH_SEED`).

use std::time::Duration;

use fe2o3_amqp::types::messaging::{
    Accepted, AmqpValue, DeliveryState, Outcome, Target, TargetArchetype,
};
use fe2o3_amqp::types::performatives::{Disposition, Performative};
use fe2o3_amqp::types::primitives::Binary;
use fe2o3_amqp::types::transaction::{
    Coordinator, Declare, Discharge, TransactionalState, TxnCapability,
};
use fe2o3_amqp_types::definitions::{ReceiverSettleMode, Role};

use crate::client::within;
use crate::harness::BrokerProcess;
use crate::raw_client::{data_message, sender_attach, Client};

/// Coordinator link handle, and the sending and receiving links' handles.
const COORD: u32 = 0;
const SEND: u32 = 1;
const RECV: u32 = 2;

/// The broker's disposition settling our delivery `id` (we sent it): its state.
fn outcome_of(id: u32) -> impl Fn(Performative) -> Option<Option<DeliveryState>> {
    move |p| match p {
        Performative::Disposition(d)
            if d.role == Role::Receiver && d.first <= id && d.last.unwrap_or(d.first) >= id =>
        {
            assert!(d.settled, "the broker settles what it answers: {d:?}");
            Some(d.state)
        }
        _ => None,
    }
}

pub(crate) fn rejection(state: Option<DeliveryState>) -> (String, String) {
    match state {
        Some(DeliveryState::Rejected(r)) => {
            let e = r.error.expect("a rejection names its error");
            (
                entrepot::connection::condition_name(&e.condition),
                e.description.unwrap_or_default(),
            )
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn amqp_value<T: serde::Serialize>(value: T) -> Vec<u8> {
    serde_amqp::to_vec(&AmqpValue(value)).expect("control message encodes")
}

/// A raw client with a coordinator attached on [`COORD`] and a sender to `queue` on
/// [`SEND`].
async fn with_coordinator(broker: &BrokerProcess, queue: &str) -> Client {
    let mut c = within("open", Client::open(broker.amqp)).await.unwrap();
    let caps = vec![TxnCapability::LocalTransactions];
    let coordinator = TargetArchetype::Coordinator(Coordinator::new(Some(caps.into())));
    let reply = within(
        "coordinator attach",
        c.attach_as_given_on(0, sender_attach(COORD, "txn-ctrl", coordinator)),
    )
    .await;
    assert!(
        matches!(
            reply.target.as_deref(),
            Some(TargetArchetype::Coordinator(_))
        ),
        "the coordinator is accepted: {reply:?}"
    );
    let target = TargetArchetype::Target(Target::builder().address(queue).build());
    within(
        "sender attach",
        c.attach_as_given_on(0, sender_attach(SEND, "sender", target)),
    )
    .await;
    c
}

/// Declares a transaction with delivery `id` on the coordinator; returns its answer.
async fn declare(c: &mut Client, id: u32) -> Option<DeliveryState> {
    let msg = amqp_value(Declare::new(None));
    c.transfer(COORD, id, &msg).await;
    within("declare's answer", Box::pin(c.expect(outcome_of(id)))).await
}

pub(crate) async fn declared(c: &mut Client, id: u32) -> Binary {
    match declare(c, id).await {
        Some(DeliveryState::Declared(d)) => d.txn_id,
        other => panic!("expected declared, got {other:?}"),
    }
}

async fn discharge(c: &mut Client, id: u32, txn_id: Binary, fail: bool) -> Option<DeliveryState> {
    let msg = amqp_value(Discharge {
        txn_id,
        fail: Some(fail),
    });
    c.transfer(COORD, id, &msg).await;
    within("discharge's answer", Box::pin(c.expect(outcome_of(id)))).await
}

fn in_txn(txn_id: &Binary, outcome: Option<Outcome>) -> DeliveryState {
    DeliveryState::TransactionalState(TransactionalState {
        txn_id: txn_id.clone(),
        outcome,
    })
}

/// Sends `body` to [`SEND`] as delivery `id` in transaction `txn_id`; returns its answer.
pub(crate) async fn send_in_txn(
    c: &mut Client,
    id: u32,
    txn_id: &Binary,
    body: &[u8],
) -> Option<DeliveryState> {
    let state = Some(in_txn(txn_id, None));
    c.transfer_with_state_on(0, SEND, id, &data_message(body), state)
        .await;
    within(
        "transactional transfer's answer",
        Box::pin(c.expect(outcome_of(id))),
    )
    .await
}

/// The bodies of every transfer on [`RECV`] until the broker is quiet, with ids.
/// (Frame-reading futures are boxed here and below: each holds a 16 KiB read buffer, and
/// a debug build's test future grows by one per await, past a test thread's stack.)
async fn received(c: &mut Client) -> Vec<(u32, Vec<u8>)> {
    let frames = Box::pin(c.frames_until_quiet(Duration::from_millis(500))).await;
    frames
        .into_iter()
        .filter_map(|f| match f.performative {
            Performative::Transfer(t) if t.handle.0 == RECV => {
                let body = f.payload[f.payload.len().saturating_sub(2)..].to_vec();
                Some((
                    t.delivery_id.expect("single-frame deliveries carry an id"),
                    body,
                ))
            }
            _ => None,
        })
        .collect()
}

/// proton's `declare_transaction`: sends committed and aborted (only the committed
/// arrive), acknowledgements aborted (redelivered, delivery-count raised) and committed
/// (gone). The broker is killed with SIGKILL right after each phase's last commit was
/// answered, so what a commit made must already be durable.
#[test]
fn proton_transactions_commit_and_abort_and_commits_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let run = |broker: &BrokerProcess, phase: &str| {
        crate::harness::run_proton_script(
            broker,
            "proton_tx.py",
            &["tx-orders", phase],
            Duration::from_secs(60),
        )
    };
    let mut broker = BrokerProcess::start(dir.path(), &[]);
    let out = run(&broker, "produce");
    assert!(out.contains("ok: committed 5, aborted 3"), "{out}");
    broker.kill();
    let mut broker = BrokerProcess::start(dir.path(), &[]);
    let out = run(&broker, "consume");
    assert!(
        out.contains("ok: rolled back 5, redelivered 5, committed 5"),
        "{out}"
    );
    broker.kill();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let out = run(&broker, "empty");
    assert!(out.contains("ok: empty"), "{out}");
}

/// Unknown ids, a discharge sent twice and the per-connection limit are each refused
/// with the condition the spec gives (or the limit's name), and the coordinator keeps
/// working after every refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_second_discharges_and_too_many_transactions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut c = with_coordinator(&broker, "tx-hostile").await;
    let mut id = 0u32;
    let mut next = || {
        id += 1;
        id - 1
    };
    // A txn-id we never issued (and not even of our length).
    let bogus = Binary::from(vec![0xde, 0xad]);
    let (cond, _) = rejection(discharge(&mut c, next(), bogus.clone(), false).await);
    assert_eq!(cond, "amqp:transaction:unknown-id");
    let (cond, _) = rejection(send_in_txn(&mut c, next(), &bogus, b"x1").await);
    assert_eq!(cond, "amqp:transaction:unknown-id");
    // Commit, then the same discharge again.
    let txn = declared(&mut c, next()).await;
    assert_eq!(txn.len(), entrepot::connection::TXN_ID_BYTES);
    let first = discharge(&mut c, next(), txn.clone(), false).await;
    assert!(
        matches!(first, Some(DeliveryState::Accepted(_))),
        "{first:?}"
    );
    let (cond, _) = rejection(discharge(&mut c, next(), txn.clone(), false).await);
    assert_eq!(cond, "amqp:transaction:unknown-id");
    // A sender's transfer in the discharged transaction is refused too.
    let (cond, _) = rejection(send_in_txn(&mut c, next(), &txn, b"x2").await);
    assert_eq!(cond, "amqp:transaction:unknown-id");
    // Up to the limit, then one more.
    let max = entrepot::connection::MAX_TRANSACTIONS_PER_CONNECTION;
    let mut open = Vec::new();
    for _ in 0..max {
        open.push(declared(&mut c, next()).await);
    }
    let (cond, description) = rejection(declare(&mut c, next()).await);
    assert_eq!(cond, "amqp:resource-limit-exceeded");
    assert!(
        description.contains("MAX_TRANSACTIONS_PER_CONNECTION"),
        "{description}"
    );
    // A rollback frees a place.
    let aborted = discharge(&mut c, next(), open.pop().unwrap(), true).await;
    assert!(
        matches!(aborted, Some(DeliveryState::Accepted(_))),
        "{aborted:?}"
    );
    declared(&mut c, next()).await;
}

/// A connection that goes away with a transaction open: what it sent in it is never
/// seen, what it acknowledged in it is delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closing_with_an_open_transaction_rolls_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let queue = "tx-closing";
    let mut c = with_coordinator(&broker, queue).await;
    c.transfer(SEND, 0, &data_message(b"m0")).await;
    assert!(
        within(
            "m0 accepted",
            Box::pin(c.expect(crate::raw_client::accepted(0)))
        )
        .await
    );
    let txn = declared(&mut c, 1).await;
    for (i, body) in [b"s1", b"s2"].iter().enumerate() {
        let answer = send_in_txn(&mut c, 2 + i as u32, &txn, &body[..]).await;
        let accepted = Some(in_txn(&txn, Some(Outcome::Accepted(Accepted {}))));
        assert_eq!(answer, accepted, "a transactional send's answer");
    }
    // Take m0 and accept it in the transaction.
    within("receiver", c.attach_receiver(RECV, "receiver", queue)).await;
    c.flow(RECV, 0, 10, false).await;
    let got = within("m0", received(&mut c)).await;
    assert_eq!(got, vec![(0, b"m0".to_vec())], "only m0 is visible");
    let ack = Disposition {
        role: Role::Receiver,
        first: 0,
        last: None,
        settled: true,
        state: Some(in_txn(&txn, Some(Outcome::Accepted(Accepted {})))),
        batchable: false,
    };
    c.send_on(0, &Performative::Disposition(ack), &[]).await;
    within("gone", c.finish_and_wait_close(Duration::from_secs(5))).await;

    let mut c = within("open", Client::open(broker.amqp)).await.unwrap();
    within("receiver", c.attach_receiver(RECV, "receiver", queue)).await;
    c.flow(RECV, 0, 10, false).await;
    let got = within("after the rollback", received(&mut c)).await;
    assert_eq!(
        got,
        vec![(0, b"m0".to_vec())],
        "m0 is back, s1 and s2 never existed"
    );
}

/// A transaction's staged bytes are charged to the connection's budget of incomplete
/// deliveries: the send that does not fit is refused naming the limit, and the
/// transaction can no longer commit (`amqp:transaction:rollback`) — nothing of it is
/// stored, not even the sends that fitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_over_its_byte_budget_refuses_the_send_and_cannot_commit() {
    let dir = tempfile::tempdir().unwrap();
    let limits = [
        "--max-message-bytes",
        "40000",
        "--max-incomplete-bytes-per-connection",
        "100000",
    ];
    let broker = BrokerProcess::start(dir.path(), &limits);
    let queue = "tx-budget";
    let mut c = with_coordinator(&broker, queue).await;
    let txn = declared(&mut c, 0).await;
    let body = vec![b'x'; 30_000];
    for id in 1..=3 {
        let answer = send_in_txn(&mut c, id, &txn, &body).await;
        assert!(
            matches!(answer, Some(DeliveryState::TransactionalState(_))),
            "send {id} fits: {answer:?}"
        );
    }
    let (cond, description) = rejection(send_in_txn(&mut c, 4, &txn, &body).await);
    assert_eq!(cond, "amqp:resource-limit-exceeded");
    assert!(
        description.contains("max-incomplete-bytes-per-connection"),
        "{description}"
    );
    let (cond, description) = rejection(discharge(&mut c, 5, txn, false).await);
    assert_eq!(cond, "amqp:transaction:rollback", "{description}");
    within("receiver", c.attach_receiver(RECV, "receiver", queue)).await;
    c.flow(RECV, 0, 10, false).await;
    let got = within("nothing", received(&mut c)).await;
    assert!(
        got.is_empty(),
        "nothing of the transaction was stored: {got:?}"
    );
}

/// A consumer's outcome in a transaction belongs to the transaction: the consumer's
/// link may close before the commit, and the commit still consumes the message. An
/// outcome naming an unknown transaction detaches the consumer's link with
/// `amqp:transaction:unknown-id`, and the message comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_in_a_transaction_outlives_its_link_and_an_unknown_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let queue = "tx-acks";
    let mut c = with_coordinator(&broker, queue).await;
    for (id, body) in [(0, b"m0"), (1, b"m1")] {
        c.transfer(SEND, id, &data_message(body)).await;
        assert!(
            within(
                "stored",
                Box::pin(c.expect(crate::raw_client::accepted(id)))
            )
            .await
        );
    }
    let txn = declared(&mut c, 2).await;
    let ack = |first: u32, txn_id: &Binary| Disposition {
        role: Role::Receiver,
        first,
        last: None,
        settled: true,
        state: Some(in_txn(txn_id, Some(Outcome::Accepted(Accepted {})))),
        batchable: false,
    };
    // An unknown transaction: the link goes, m0 (its first delivery) comes back.
    within("receiver", c.attach_receiver(RECV, "receiver", queue)).await;
    c.flow(RECV, 0, 1, false).await;
    let got = within("m0", received(&mut c)).await;
    assert_eq!(got, vec![(0, b"m0".to_vec())]);
    let bogus = Binary::from(vec![0u8; 8]);
    c.send_on(0, &Performative::Disposition(ack(0, &bogus)), &[])
        .await;
    let d = within(
        "detach",
        Box::pin(c.expect(crate::raw_client::detach_of(RECV))),
    )
    .await;
    let e = d.error.expect("an error");
    assert_eq!(
        entrepot::connection::condition_name(&e.condition),
        "amqp:transaction:unknown-id"
    );
    c.detach(RECV).await;
    // Accept m0 (again delivery 1 of this session) in `txn`, close the link, commit.
    within("receiver", c.attach_receiver(RECV, "receiver2", queue)).await;
    c.flow(RECV, 0, 1, false).await;
    let got = within("m0 again", received(&mut c)).await;
    assert_eq!(got, vec![(1, b"m0".to_vec())], "m0 came back first");
    c.send_on(0, &Performative::Disposition(ack(1, &txn)), &[])
        .await;
    c.detach(RECV).await;
    within(
        "detached",
        Box::pin(c.expect(crate::raw_client::detach_of(RECV))),
    )
    .await;
    let committed = discharge(&mut c, 3, txn, false).await;
    assert!(
        matches!(committed, Some(DeliveryState::Accepted(_))),
        "{committed:?}"
    );
    within("receiver", c.attach_receiver(RECV, "receiver3", queue)).await;
    c.flow(RECV, 0, 10, false).await;
    let got = within("what is left", received(&mut c)).await;
    assert_eq!(
        got,
        vec![(2, b"m1".to_vec())],
        "m0 was consumed by the commit"
    );
}

/// A consumer in receiver-settle-mode `second` that accepts in a transaction leaves its
/// delivery unsettled: the broker settles it back, with the transactional state the
/// consumer sent, once the commit is durable — not before the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsettled_transactional_acceptance_is_settled_back_at_commit() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let queue = "tx-second";
    let mut c = with_coordinator(&broker, queue).await;
    c.transfer(SEND, 0, &data_message(b"m0")).await;
    assert!(within("stored", Box::pin(c.expect(crate::raw_client::accepted(0)))).await);
    let txn = declared(&mut c, 1).await;
    within(
        "receiver",
        c.attach_receiver_settling(0, RECV, "receiver", queue, ReceiverSettleMode::Second),
    )
    .await;
    c.flow(RECV, 0, 1, false).await;
    let got = within("m0", received(&mut c)).await;
    assert_eq!(got, vec![(0, b"m0".to_vec())]);
    let state = in_txn(&txn, Some(Outcome::Accepted(Accepted {})));
    let accept = Disposition {
        role: Role::Receiver,
        first: 0,
        last: None,
        settled: false,
        state: Some(state.clone()),
        batchable: false,
    };
    c.send_on(0, &Performative::Disposition(accept), &[]).await;
    let ours = |f: &crate::raw_client::Frame| match &f.performative {
        Performative::Disposition(d) if d.role == Role::Sender && d.first == 0 => Some(d.clone()),
        _ => None,
    };
    let early = Box::pin(c.frames_until_quiet(Duration::from_millis(300))).await;
    assert!(
        early.iter().all(|f| ours(f).is_none()),
        "settled before the commit: {early:?}"
    );

    let msg = amqp_value(Discharge {
        txn_id: txn,
        fail: Some(false),
    });
    c.transfer(COORD, 2, &msg).await;
    let frames = Box::pin(c.frames_until_quiet(Duration::from_millis(500))).await;
    let committed = frames
        .iter()
        .find_map(|f| outcome_of(2)(f.performative.clone()));
    assert!(
        matches!(committed, Some(Some(DeliveryState::Accepted(_)))),
        "the commit is answered: {frames:?}"
    );
    let back = frames
        .iter()
        .find_map(ours)
        .unwrap_or_else(|| panic!("the delivery is settled back at commit: {frames:?}"));
    assert!(back.settled, "{back:?}");
    assert_eq!(
        format!("{:?}", back.state),
        format!("{:?}", Some(state)),
        "with the state the consumer sent"
    );
}

/// Messages per transaction in the power-cut test.
const CUT_TXN_MESSAGES: usize = 5;
/// Padding per message in the power-cut test: a batch spans several 4 KiB pages.
const CUT_PADDING_BYTES: usize = 3000;

/// What the transactional producer of the power-cut test saw: transactions whose commit
/// was answered `accepted`, and those it rolled back.
#[derive(Default)]
struct TxnSeen {
    committed: Vec<u32>,
    aborted: Vec<u32>,
}

/// Declares, sends [`CUT_TXN_MESSAGES`] and discharges transaction after transaction
/// (every fourth rolled back), recording what the broker answered, until it stops.
async fn txn_producer(addr: std::net::SocketAddr, seen: std::sync::Arc<std::sync::Mutex<TxnSeen>>) {
    let mut c = with_coordinator_at(addr, crate::power_loss::QUEUE).await;
    let mut id = 0u32;
    for n in 0u32.. {
        let txn = match declare(&mut c, id).await {
            Some(DeliveryState::Declared(d)) => d.txn_id,
            _ => return,
        };
        id += 1;
        for i in 0..CUT_TXN_MESSAGES {
            // Padded to span pages, so that a cut can tear a batch in the middle.
            let body = format!("t{n:04}-{i}-{}", "x".repeat(CUT_PADDING_BYTES));
            let state = Some(in_txn(&txn, None));
            c.transfer_with_state_on(0, SEND, id, &data_message(body.as_bytes()), state)
                .await;
            id += 1;
        }
        let abort = n % 4 == 3;
        let answer = discharge(&mut c, id, txn, abort).await;
        id += 1;
        let mut s = seen.lock().expect("lock");
        match (abort, answer) {
            (true, Some(DeliveryState::Accepted(_))) => s.aborted.push(n),
            (false, Some(DeliveryState::Accepted(_))) => s.committed.push(n),
            _ => return,
        }
    }
}

/// A raw client on a broker at `addr` (an in-process one) with a coordinator on
/// [`COORD`] and a sender to `queue` on [`SEND`].
pub(crate) async fn with_coordinator_at(addr: std::net::SocketAddr, queue: &str) -> Client {
    let mut c = within("open", Client::open(addr)).await.unwrap();
    let coordinator = TargetArchetype::Coordinator(Coordinator::new(None));
    within(
        "coordinator attach",
        c.attach_as_given_on(0, sender_attach(COORD, "txn-ctrl", coordinator)),
    )
    .await;
    let target = TargetArchetype::Target(Target::builder().address(queue).build());
    within(
        "sender attach",
        c.attach_as_given_on(0, sender_attach(SEND, "sender", target)),
    )
    .await;
    c
}

/// A power cut (the storage crash seam: unsynced pages lost, torn or garbage per seed)
/// in the middle of transactions: after the restart every transaction whose commit was
/// answered is there whole, no rolled-back one is, and every transaction shows all of
/// its messages or none — a commit cut short leaves nothing half-visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_keeps_answered_commits_whole_and_leaves_no_half_transaction() {
    use entrepot_storage::crash_sim::CrashSim;
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    let mut checked = 0;
    for seed in crate::power_loss::seeds() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (live, crashed) = (tmp.path().join("live"), tmp.path().join("crashed"));
        let sim = CrashSim::install(&live).expect("install");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let config = crate::power_loss::config(&live, "always");
        let node = entrepot::server::Node::start(config, stop_rx)
            .await
            .expect("start");
        let seen = Arc::new(Mutex::new(TxnSeen::default()));
        let producer = tokio::spawn(txn_producer(node.amqp_addr, Arc::clone(&seen)));
        let cut_after = 1 + (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) % 12) as usize;
        within("commits before the cut", async {
            while seen.lock().expect("lock").committed.len() < cut_after {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
        sim.crash_into(&crashed, seed).expect("crash");
        tokio::time::sleep(Duration::from_millis(50)).await;
        producer.abort();
        let _ = stop_tx.send(true);
        drop(node);
        let seen = std::mem::take(&mut *seen.lock().expect("lock"));

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let config = crate::power_loss::config(&crashed, "always");
        let node = entrepot::server::Node::start(config, stop_rx)
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: reopening the crashed store: {e:#}"));
        let mut c = within("open", Client::open(node.amqp_addr)).await.unwrap();
        within(
            "receiver",
            c.attach_receiver(RECV, "drain", crate::power_loss::QUEUE),
        )
        .await;
        c.flow(RECV, 0, 10_000, false).await;
        let frames = Box::pin(c.frames_until_quiet(Duration::from_secs(1))).await;
        let mut per_txn: BTreeMap<u32, usize> = BTreeMap::new();
        for f in frames {
            if let Performative::Transfer(t) = f.performative {
                assert_eq!(t.handle.0, RECV);
                let body = String::from_utf8_lossy(&f.payload[8..]).into_owned();
                let n: u32 = body[1..5].parse().expect("t<nnnn>-<i>");
                *per_txn.entry(n).or_default() += 1;
            }
        }
        let _ = stop_tx.send(true);
        for n in &seen.committed {
            assert_eq!(
                per_txn.get(n),
                Some(&CUT_TXN_MESSAGES),
                "seed {seed}: committed transaction {n} not whole after the cut: {per_txn:?}"
            );
        }
        for (n, count) in &per_txn {
            assert_eq!(
                *count, CUT_TXN_MESSAGES,
                "seed {seed}: transaction {n} half there"
            );
            assert!(
                !seen.aborted.contains(n),
                "seed {seed}: rolled-back {n} is there"
            );
        }
        checked += seen.committed.len();
    }
    println!("transactions across power cuts: {checked} answered commits checked");
}
